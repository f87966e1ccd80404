//! `outrelay`: the OutRelay operator CLI.
//!
//! Talks to the controller over its local Unix socket (default; root and members of
//! `outrelay-admin` are global admins there) or over `https://host:7444` with a client
//! certificate. Exit codes: 0 ok, 1 remote error or not found, 2 usage error.
//!
//! `outrelay relay status|drain|upgrade` talk to a relay's local admin socket instead
//! (`--relay unix:///run/outrelay/relay.sock`).
#![forbid(unsafe_code)]

mod dev_pki;
mod dev_serve;
mod output;
mod rate;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use outrelay_api::pb;
use outrelay_client as client;
use serde_json::json;

use crate::output::{Output, print_rows};

/// Exit code for a remote error or a missing object.
const EXIT_REMOTE: u8 = 1;

/// OutRelay operator CLI.
#[derive(Debug, Parser)]
#[command(name = "outrelay", version, propagate_version = true)]
struct Cli {
    /// Controller address: unix:///path/to.sock or https://host:port.
    #[arg(
        long,
        global = true,
        default_value = "unix:///run/outrelay/controller.sock",
        env = "OUTRELAY_CONTROLLER"
    )]
    controller: String,
    /// Client certificate (PEM) for https controllers.
    #[arg(long, global = true, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Client key (PEM) for https controllers.
    #[arg(long, global = true, value_name = "FILE")]
    key: Option<PathBuf>,
    /// CA certificate (PEM) that signed the controller's certificate.
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Access policy rules.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Certificates.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Registered services.
    #[command(subcommand)]
    Services(ServicesCmd),
    /// Relays known to the controller.
    #[command(subcommand)]
    Relays(RelaysCmd),
    /// Public leases and their approval.
    #[command(subcommand)]
    Leases(LeasesCmd),
    /// A relay's local admin socket.
    #[command(subcommand)]
    Relay(RelayCmd),
    /// Writes a development PKI (CA and certificates) into a directory.
    DevPki {
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// The relay's public root host, e.g. relay.example.test.
        #[arg(long)]
        root_host: String,
    },
    /// Runs the quickstart's demo services: an HTTPS server, a TCP echo and a UDP echo
    /// (development only).
    DevServe {
        /// HTTPS listen address.
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: std::net::SocketAddr,
        /// Certificate (PEM) the HTTPS server presents, e.g. the dev PKI's demo.pem.
        #[arg(long)]
        cert: PathBuf,
        /// Its key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// TCP echo listen address.
        #[arg(long, default_value = "127.0.0.1:9000")]
        echo: std::net::SocketAddr,
        /// UDP echo listen address.
        #[arg(long, default_value = "127.0.0.1:9053")]
        udp_echo: std::net::SocketAddr,
        /// Write the bound addresses here as JSON.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
        /// Expect a PROXY protocol header (v1 or v2) on the HTTPS and TCP echo listeners and
        /// report the client address it names (HTTPS: in the answer; echo: on stderr).
        #[arg(long)]
        proxy_protocol: bool,
    },
    /// Prints shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Writes man pages (one per command) into a directory.
    Man {
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DecisionArg {
    Allow,
    Deny,
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Adds a rule.
    Add {
        #[arg(long)]
        tenant: String,
        /// Caller pattern (glob, `*` = any run).
        #[arg(long)]
        caller: String,
        /// Target pattern (glob).
        #[arg(long)]
        target: String,
        /// Method pattern (empty = any).
        #[arg(long, default_value = "")]
        method: String,
        /// allow or deny.
        #[arg(long, value_enum)]
        decision: DecisionArg,
        /// Lifetime, e.g. 1h (default: never expires).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// Lists a tenant's rules in creation order.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Removes a rule.
    Remove {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Queries events, newest first.
    Query {
        /// Tenant (empty: every tenant, global admins only).
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long, default_value = "")]
        caller: String,
        #[arg(long, default_value = "")]
        target: String,
        /// Only events newer than this, e.g. 1h.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Verifies the HMAC chain; prints the head MAC and row count.
    Verify,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Agent,
    Relay,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Creates a single-use enrollment token.
    Create {
        /// Tenant (agents; relay tokens belong to `system`).
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long, value_enum, default_value_t = RoleArg::Agent)]
        role: RoleArg,
        /// Lifetime, e.g. 10m (default: the controller's, 10 minutes).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Bind the token to this agent uuid.
        #[arg(long, conflicts_with_all = ["relay_id", "region"])]
        agent_uuid: Option<String>,
        /// Relay id (relay tokens).
        #[arg(long, requires = "region")]
        relay_id: Option<String>,
        /// Relay region (relay tokens).
        #[arg(long, requires = "relay_id")]
        region: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CertCmd {
    /// Revokes every certificate of an identity.
    Revoke {
        #[arg(long)]
        uri: String,
    },
}

#[derive(Debug, Subcommand)]
enum ServicesCmd {
    /// Lists registered providers.
    List {
        #[arg(long, default_value = "")]
        tenant: String,
    },
}

#[derive(Debug, Subcommand)]
enum RelayCmd {
    /// Workers, leases with their idle reverse sessions, drops by reason, splice counters.
    Status {
        /// The relay's admin socket.
        #[arg(
            long,
            default_value = "unix:///run/outrelay/relay.sock",
            env = "OUTRELAY_RELAY"
        )]
        relay: String,
    },
    /// Drains the relay: no new agent connection or lease, GOAWAY to every agent (they move
    /// to their other relays); prints what is left (agents, leases, pairs, streams).
    Drain {
        /// The relay's admin socket.
        #[arg(
            long,
            default_value = "unix:///run/outrelay/relay.sock",
            env = "OUTRELAY_RELAY"
        )]
        relay: String,
        /// Polls every 500 ms, printing progress, until nothing is left (exit 1 on timeout).
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits, in seconds.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        timeout_s: u64,
    },
    /// Hitless binary upgrade: the relay starts its binary again, hands the new process its
    /// listening sockets and leases, and exits once its spliced pairs end. A new process
    /// that fails leaves the old one serving (exit 1 with the reason).
    Upgrade {
        /// The relay's admin socket.
        #[arg(
            long,
            default_value = "unix:///run/outrelay/relay.sock",
            env = "OUTRELAY_RELAY"
        )]
        relay: String,
        /// How long the new process has to become ready, in seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout_s: u64,
    },
}

#[derive(Debug, Subcommand)]
enum RelaysCmd {
    /// Lists relays and whether they are up.
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Auto,
    Manual,
}

#[derive(Debug, Subcommand)]
enum LeasesCmd {
    /// Lists leases.
    List {
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Approves a pending lease.
    Approve {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        id: String,
    },
    /// Denies a lease.
    Deny {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        id: String,
    },
    /// Bans a lease's name in its tenant.
    Ban {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        id: String,
    },
    /// Sets a tenant's lease quota (0 = unlimited).
    Quota {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        max: u32,
    },
    /// Sets a tenant's approval mode.
    Mode {
        #[arg(long)]
        tenant: String,
        #[arg(value_enum)]
        mode: ModeArg,
    },
    /// Switches TCP and UDP port leases on or off on every relay, or on one (global admins).
    #[command(group(clap::ArgGroup::new("transport").required(true).multiple(true).args(["tcp", "udp"])))]
    Gate {
        /// TCP port leases.
        #[arg(long, value_enum)]
        tcp: Option<OnOff>,
        /// Most live TCP port leases per relay (0 = no limit beyond the port range).
        #[arg(long, default_value_t = 0, requires = "tcp")]
        tcp_max: u32,
        /// UDP leases.
        #[arg(long, value_enum)]
        udp: Option<OnOff>,
        /// Most live UDP leases per relay (0 = no limit beyond the port range).
        #[arg(long, default_value_t = 0, requires = "udp")]
        udp_max: u32,
        /// One relay's id; absent: the default of every relay.
        #[arg(long, default_value = "")]
        relay: String,
    },
    /// Sets or clears the bandwidth limit of one lease, or of a whole tenant (global admins).
    ///
    /// RATE is per second: decimal bits (`200Mbit`, `1.5Gbit`, `10Gbit`; Mbit = 10^6 bit),
    /// bytes (`50MB`, `1MiB`, or a plain number of bytes), `0` or `unlimited` for no limit.
    /// A lease limit (`--name`) and its tenant's limit both apply; relays follow within a
    /// second, running transfers included.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["rate", "to_service", "clear"])))]
    Limit {
        #[arg(long)]
        tenant: String,
        /// The lease name as registered (not the hostname); absent: every lease of the tenant
        /// together.
        #[arg(long, default_value = "")]
        name: String,
        /// The same RATE both ways.
        #[arg(long, value_name = "RATE", value_parser = parse_rate)]
        rate: Option<u64>,
        /// RATE from the public client (or consumer) to the service.
        #[arg(long, value_name = "RATE", value_parser = parse_rate, requires = "to_client")]
        to_service: Option<u64>,
        /// RATE from the service to the public client (or consumer).
        #[arg(long, value_name = "RATE", value_parser = parse_rate, requires = "to_service")]
        to_client: Option<u64>,
        /// Removes the record (the relay's `[bandwidth]` default applies again).
        #[arg(long)]
        clear: bool,
    },
    /// Lists bandwidth limit records (a tenant admin sees its own tenant's).
    Limits {
        #[arg(long, default_value = "")]
        tenant: String,
    },
}

/// `--rate` and friends, in bytes per second.
fn parse_rate(s: &str) -> Result<u64, rate::RateError> {
    rate::parse_bytes_per_s(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outrelay: {e}");
            return ExitCode::from(EXIT_REMOTE);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(status) = e.downcast_ref::<tonic::Status>() {
                eprintln!("outrelay: {:?}: {}", status.code(), status.message());
            } else {
                eprintln!("outrelay: {e:#}");
            }
            ExitCode::from(EXIT_REMOTE)
        }
    }
}

fn now_unix_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let out = cli.output;
    let target = client::Target {
        url: cli.controller.clone(),
        cert: cli.cert.clone(),
        key: cli.key.clone(),
        ca: cli.ca.clone(),
    };
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "outrelay",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out: dir } => {
            write_man_pages(&dir)?;
            println!("man pages written to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::DevPki {
            out: dir,
            root_host,
        } => {
            let files = dev_pki::write(&dir, &root_host)?;
            print_rows(
                out,
                &["file", "what"],
                files
                    .iter()
                    .map(|(f, w)| vec![f.clone(), w.clone()])
                    .collect(),
                json!(
                    files
                        .iter()
                        .map(|(f, w)| json!({"file": f, "what": w}))
                        .collect::<Vec<_>>()
                ),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::DevServe {
            https,
            cert,
            key,
            echo,
            udp_echo,
            ready_file,
            proxy_protocol,
        } => {
            let listen = dev_serve::Listen {
                https,
                echo,
                udp_echo,
                proxy_protocol,
            };
            dev_serve::run(listen, &cert, &key, ready_file.as_deref()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(cmd) => {
            let mut c = pb::policy_client::PolicyClient::new(client::connect(&target).await?);
            match cmd {
                PolicyCmd::Add {
                    tenant,
                    caller,
                    target: tgt,
                    method,
                    decision,
                    expires,
                } => {
                    let rule = pb::PolicyRule {
                        tenant,
                        caller_pattern: caller,
                        target_pattern: tgt,
                        method_pattern: method,
                        decision: match decision {
                            DecisionArg::Allow => pb::Decision::Allow as i32,
                            DecisionArg::Deny => pb::Decision::Deny as i32,
                        },
                        expires_unix_ms: expires
                            .map(|d| now_unix_ms().saturating_add(ms(d)))
                            .unwrap_or(0),
                        ..Default::default()
                    };
                    let id = c
                        .add_policy(pb::AddPolicyRequest { rule: Some(rule) })
                        .await?
                        .into_inner()
                        .id;
                    print_rows(out, &["id"], vec![vec![id.clone()]], json!({ "id": id }));
                }
                PolicyCmd::List { tenant } => {
                    let rules = c
                        .list_policies(pb::ListPoliciesRequest { tenant })
                        .await?
                        .into_inner()
                        .rules;
                    output::rules(out, &rules);
                }
                PolicyCmd::Remove { tenant, id } => {
                    let removed = c
                        .remove_policy(pb::RemovePolicyRequest {
                            tenant,
                            id: id.clone(),
                        })
                        .await?
                        .into_inner()
                        .removed;
                    if !removed {
                        eprintln!("outrelay: no rule {id}");
                        return Ok(ExitCode::from(EXIT_REMOTE));
                    }
                    print_rows(
                        out,
                        &["removed"],
                        vec![vec![id.clone()]],
                        json!({ "removed": id }),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(cmd) => {
            let mut c = pb::audit_client::AuditClient::new(client::connect(&target).await?);
            match cmd {
                AuditCmd::Query {
                    tenant,
                    caller,
                    target: tgt,
                    since,
                    limit,
                } => {
                    let since_unix_ms = since
                        .map(|d| now_unix_ms().saturating_sub(ms(d)))
                        .unwrap_or(0);
                    let mut stream = c
                        .query(pb::QueryRequest {
                            tenant,
                            caller,
                            target: tgt,
                            since_unix_ms,
                            limit,
                        })
                        .await?
                        .into_inner();
                    let mut events = Vec::new();
                    while let Some(ev) = stream.message().await? {
                        events.push(ev);
                    }
                    output::audit_events(out, &events);
                    Ok(ExitCode::SUCCESS)
                }
                AuditCmd::Verify => {
                    let v = c.verify(pb::VerifyRequest {}).await?.into_inner();
                    let j = json!({"ok": v.ok, "row_count": v.row_count, "head_mac": v.head_mac_hex, "first_bad_row": if v.ok { None } else { Some(v.first_bad_seq) }, "error": v.error});
                    match out {
                        Output::Json => println!("{j}"),
                        Output::Table => {
                            if v.ok {
                                println!(
                                    "audit chain OK: {} rows, head MAC {}",
                                    v.row_count, v.head_mac_hex
                                );
                            } else {
                                println!(
                                    "audit chain BROKEN at row {}: {} ({} rows)",
                                    v.first_bad_seq, v.error, v.row_count
                                );
                            }
                        }
                    }
                    Ok(if v.ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_REMOTE)
                    })
                }
            }
        }
        Command::Token(TokenCmd::Create {
            tenant,
            role,
            ttl,
            agent_uuid,
            relay_id,
            region,
        }) => {
            let mut c = pb::pki_client::PkiClient::new(client::connect(&target).await?);
            let t = c
                .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
                    tenant,
                    role: match role {
                        RoleArg::Agent => pb::EnrollRole::Agent as i32,
                        RoleArg::Relay => pb::EnrollRole::Relay as i32,
                    },
                    ttl_seconds: ttl.map(|d| d.as_secs()).unwrap_or(0),
                    agent_uuid: agent_uuid.unwrap_or_default(),
                    relay_region: region.unwrap_or_default(),
                    relay_id: relay_id.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_rows(
                out,
                &["token", "expires_unix_ms", "identity"],
                vec![vec![
                    t.token.clone(),
                    t.expires_unix_ms.to_string(),
                    t.identity.clone(),
                ]],
                json!({"token": t.token, "expires_unix_ms": t.expires_unix_ms, "ca_fingerprint_sha256": t.ca_fingerprint_sha256, "identity": t.identity}),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cert(CertCmd::Revoke { uri }) => {
            let mut c = pb::pki_client::PkiClient::new(client::connect(&target).await?);
            let newly = c
                .revoke(pb::RevokeRequest { uri: uri.clone() })
                .await?
                .into_inner()
                .newly_revoked;
            print_rows(
                out,
                &["uri", "newly_revoked"],
                vec![vec![uri.clone(), newly.to_string()]],
                json!({"uri": uri, "newly_revoked": newly}),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Services(ServicesCmd::List { tenant }) => {
            let channel = client::connect(&target).await?;
            let mut c = pb::registry_client::RegistryClient::new(channel.clone());
            let providers = c
                .list_services(pb::ListServicesRequest { tenant })
                .await?
                .into_inner()
                .providers;
            // Whether each provider's relay is up (the controller's view of its heartbeats).
            let relays = pb::relays_client::RelaysClient::new(channel)
                .list_relays(pb::ListRelaysRequest {})
                .await?
                .into_inner()
                .relays;
            output::providers(out, &providers, &relays);
            Ok(ExitCode::SUCCESS)
        }
        Command::Relay(RelayCmd::Status { relay }) => relay_status(&relay, out).await,
        Command::Relay(RelayCmd::Drain {
            relay,
            wait,
            timeout_s,
        }) => relay_drain(&relay, wait, Duration::from_secs(timeout_s), out).await,
        Command::Relay(RelayCmd::Upgrade { relay, timeout_s }) => {
            relay_upgrade(&relay, timeout_s, out).await
        }
        Command::Relays(RelaysCmd::List) => {
            let mut c = pb::relays_client::RelaysClient::new(client::connect(&target).await?);
            let relays = c
                .list_relays(pb::ListRelaysRequest {})
                .await?
                .into_inner()
                .relays;
            output::relays(out, &relays);
            Ok(ExitCode::SUCCESS)
        }
        Command::Leases(cmd) => {
            let mut c = pb::leases_client::LeasesClient::new(client::connect(&target).await?);
            match cmd {
                LeasesCmd::List { tenant } => {
                    let leases = c
                        .list(pb::ListLeasesRequest { tenant })
                        .await?
                        .into_inner()
                        .leases;
                    output::leases(out, &leases);
                }
                LeasesCmd::Approve { tenant, id } => {
                    let l = c
                        .approve(pb::LeaseActionRequest { tenant, id })
                        .await?
                        .into_inner()
                        .lease;
                    output::leases(out, &l.into_iter().collect::<Vec<_>>());
                }
                LeasesCmd::Deny { tenant, id } => {
                    let l = c
                        .deny(pb::LeaseActionRequest { tenant, id })
                        .await?
                        .into_inner()
                        .lease;
                    output::leases(out, &l.into_iter().collect::<Vec<_>>());
                }
                LeasesCmd::Ban { tenant, id } => {
                    let l = c
                        .ban(pb::LeaseActionRequest { tenant, id })
                        .await?
                        .into_inner()
                        .lease;
                    output::leases(out, &l.into_iter().collect::<Vec<_>>());
                }
                LeasesCmd::Quota { tenant, max } => {
                    c.set_quota(pb::SetQuotaRequest {
                        tenant: tenant.clone(),
                        max_leases: max,
                    })
                    .await?;
                    print_rows(
                        out,
                        &["tenant", "max_leases"],
                        vec![vec![tenant.clone(), max.to_string()]],
                        json!({"tenant": tenant, "max_leases": max}),
                    );
                }
                LeasesCmd::Gate {
                    tcp,
                    tcp_max,
                    udp,
                    udp_max,
                    relay,
                } => {
                    let gate = |g: Option<OnOff>, max: u32| {
                        g.map(|g| pb::PortGate {
                            enabled: g == OnOff::On,
                            max_leases: max,
                        })
                    };
                    let set = c
                        .set_gate(pb::SetGateRequest {
                            relay_id: relay,
                            tcp: gate(tcp, tcp_max),
                            udp: gate(udp, udp_max),
                        })
                        .await?
                        .into_inner();
                    let show = |g: Option<pb::PortGate>| match g {
                        None => "config".to_owned(),
                        Some(g) if !g.enabled => "off".to_owned(),
                        Some(g) if g.max_leases == 0 => "on".to_owned(),
                        Some(g) => format!("on (max {})", g.max_leases),
                    };
                    let relay = if set.relay_id.is_empty() {
                        "*".to_owned()
                    } else {
                        set.relay_id.clone()
                    };
                    let (t, u) = (show(set.tcp), show(set.udp));
                    print_rows(
                        out,
                        &["relay", "tcp", "udp"],
                        vec![vec![relay.clone(), t.clone(), u.clone()]],
                        json!({"relay": relay, "tcp": t, "udp": u}),
                    );
                }
                LeasesCmd::Limit {
                    tenant,
                    name,
                    rate,
                    to_service,
                    to_client,
                    clear,
                } => {
                    let (to_service, to_client) = match rate {
                        Some(r) => (r, r),
                        None => (to_service.unwrap_or(0), to_client.unwrap_or(0)),
                    };
                    let set = c
                        .set_limit(pb::SetLimitRequest {
                            limit: Some(pb::BandwidthLimit {
                                tenant,
                                name,
                                to_service_bytes_per_s: to_service,
                                to_client_bytes_per_s: to_client,
                            }),
                            clear,
                        })
                        .await?
                        .into_inner();
                    if set.cleared {
                        let l = set.limit.unwrap_or_default();
                        let name = if l.name.is_empty() { "*" } else { &l.name };
                        print_rows(
                            out,
                            &["tenant", "name", "limit"],
                            vec![vec![
                                l.tenant.clone(),
                                name.to_owned(),
                                "cleared".to_owned(),
                            ]],
                            json!({"tenant": l.tenant, "name": l.name, "cleared": true}),
                        );
                    } else {
                        output::limits(out, &set.limit.into_iter().collect::<Vec<_>>());
                    }
                }
                LeasesCmd::Limits { tenant } => {
                    let limits = c
                        .list_limits(pb::ListLimitsRequest { tenant })
                        .await?
                        .into_inner()
                        .limits;
                    output::limits(out, &limits);
                }
                LeasesCmd::Mode { tenant, mode } => {
                    let (m, name) = match mode {
                        ModeArg::Auto => (pb::ApprovalMode::Auto, "auto"),
                        ModeArg::Manual => (pb::ApprovalMode::Manual, "manual"),
                    };
                    c.set_approval_mode(pb::SetApprovalModeRequest {
                        tenant: tenant.clone(),
                        mode: m as i32,
                    })
                    .await?;
                    print_rows(
                        out,
                        &["tenant", "mode"],
                        vec![vec![tenant.clone(), name.to_owned()]],
                        json!({"tenant": tenant, "mode": name}),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    fn walk(cmd: &clap::Command, prefix: &str, dir: &std::path::Path) -> anyhow::Result<()> {
        let name = if prefix.is_empty() {
            cmd.get_name().to_owned()
        } else {
            format!("{prefix}-{}", cmd.get_name())
        };
        let page = clap_mangen::Man::new(cmd.clone().name(name.clone()));
        let mut buf = Vec::new();
        page.render(&mut buf)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, buf).with_context(|| format!("write {}", path.display()))?;
        for sub in cmd.get_subcommands() {
            if sub.get_name() != "help" {
                walk(sub, &name, dir)?;
            }
        }
        Ok(())
    }
    let mut cmd = Cli::command();
    cmd.build();
    walk(&cmd, "", dir)
}

/// Interval of `outrelay relay drain --wait`'s progress polls.
const DRAIN_POLL_MS: u64 = 500;

/// One command line to the relay's admin socket, its one JSON answer (`Err(code)`: the relay
/// refused, already reported).
async fn admin_command(
    relay: &str,
    command: &str,
) -> anyhow::Result<Result<serde_json::Value, ExitCode>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = relay
        .strip_prefix("unix://")
        .ok_or_else(|| anyhow::anyhow!("--relay must be unix:///path/to/relay.sock"))?;
    let mut stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| anyhow::anyhow!("relay admin socket {path}: {e}"))?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let answer: serde_json::Value = serde_json::from_str(answer.trim())?;
    if let Some(error) = answer.get("error") {
        eprintln!("outrelay: relay refused: {error}");
        return Ok(Err(ExitCode::from(EXIT_REMOTE)));
    }
    Ok(Ok(answer))
}

/// Whether a drain progress document shows nothing left.
fn drain_empty(p: &serde_json::Value) -> bool {
    ["agents", "leases", "pairs", "streams"]
        .iter()
        .all(|k| p[*k].as_u64() == Some(0))
}

/// Prints one drain progress document: a line (table) or one JSON document per line.
fn print_drain(out: Output, p: &serde_json::Value) {
    match out {
        Output::Json => println!("{p}"),
        Output::Table => println!(
            "draining {}: {} agents, {} leases, {} pairs, {} streams left",
            p["draining"].as_bool().unwrap_or(false),
            p["agents"],
            p["leases"],
            p["pairs"],
            p["streams"],
        ),
    }
}

/// `outrelay relay drain`: sends `drain`, then with `--wait` polls `status` every
/// [`DRAIN_POLL_MS`] until no agent, lease, pair or stream is left (exit 1 at the timeout).
async fn relay_drain(
    relay: &str,
    wait: bool,
    timeout: Duration,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let mut progress = match admin_command(relay, "drain").await? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    print_drain(out, &progress);
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while !drain_empty(&progress) {
        if tokio::time::Instant::now() >= deadline {
            eprintln!("outrelay: drain not finished after {} s", timeout.as_secs());
            return Ok(ExitCode::from(EXIT_REMOTE));
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_POLL_MS)).await;
        progress = match admin_command(relay, "status").await? {
            Ok(status) => status["drain"].clone(),
            Err(code) => return Ok(code),
        };
        print_drain(out, &progress);
    }
    if matches!(out, Output::Table) {
        println!("drained");
    }
    Ok(ExitCode::SUCCESS)
}

/// `outrelay relay upgrade`: sends `upgrade <timeout_s>` and prints the hand-over; a failed
/// upgrade is the relay's refusal (its `error`).
async fn relay_upgrade(relay: &str, timeout_s: u64, out: Output) -> anyhow::Result<ExitCode> {
    let answer = match admin_command(relay, &format!("upgrade {timeout_s}")).await? {
        Ok(a) => a,
        Err(code) => return Ok(code),
    };
    match out {
        Output::Json => println!("{answer}"),
        Output::Table => {
            let h = &answer["handed_over"];
            println!(
                "upgraded: pid {} -> {}; handed over {} TCP listeners, {} UDP sockets, {} leases",
                answer["old_pid"],
                answer["new_pid"],
                h["tcp_listeners"],
                h["udp_sockets"],
                h["leases"],
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `outrelay relay status`: one command line to the relay's admin socket, one JSON answer.
async fn relay_status(relay: &str, out: Output) -> anyhow::Result<ExitCode> {
    let status = match admin_command(relay, "status").await? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    if matches!(out, Output::Table) {
        let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let drain = &status["drain"];
        if let Some(state) = status["upgrade"]["state"].as_str()
            && state != "serving"
        {
            println!(
                "UPGRADE: {state} (new pid {})",
                status["upgrade"]["new_pid"]
            );
        }
        if drain["draining"].as_bool() == Some(true) {
            println!(
                "DRAINING: {} agents, {} leases, {} pairs, {} streams left",
                count(&drain["agents"]),
                count(&drain["leases"]),
                count(&drain["pairs"]),
                count(&drain["streams"]),
            );
        }
        println!(
            "io backend {}, {} workers, {} pairs active, {} bytes spliced, {} pipe bytes held",
            status["io_backend"].as_str().unwrap_or("?"),
            count(&status["workers"]),
            count(&status["splice"]["pairs_active"]),
            count(&status["splice"]["bytes"]),
            count(&status["splice"]["pipe_held_bytes"]),
        );
        if let Some(generation) = status["config"]["generation"].as_u64() {
            // `systemctl reload` moves it; the age says whether the last reload was taken.
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let at_ms = status["config"]["applied_at_unix_ms"]
                .as_i64()
                .unwrap_or(now_ms);
            println!(
                "config generation {generation}, applied {} s ago",
                now_ms.saturating_sub(at_ms) / 1000
            );
        }
        let ebpf = &status["ebpf"];
        let programs: Vec<&str> = ebpf["programs"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, on)| on.as_bool() == Some(true))
                    .map(|(name, _)| name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "ebpf mode {}: {}{}",
            ebpf["mode"].as_str().unwrap_or("?"),
            if programs.is_empty() {
                "no program".to_owned()
            } else {
                programs.join(", ")
            },
            match ebpf["unavailable"].as_str() {
                Some(why) => format!(" (unavailable: {why})"),
                None => format!(
                    "; accepts local {} / hash {}; lease ports steered {} tcp {} udp, refused {} tcp {} udp",
                    count(&ebpf["reuseport"]["public"]["local"])
                        + count(&ebpf["reuseport"]["reverse"]["local"]),
                    count(&ebpf["reuseport"]["public"]["no_worker"])
                        + count(&ebpf["reuseport"]["public"]["busy"])
                        + count(&ebpf["reuseport"]["reverse"]["no_worker"])
                        + count(&ebpf["reuseport"]["reverse"]["busy"]),
                    count(&ebpf["lookup"]["tcp"]["steered"]),
                    count(&ebpf["lookup"]["udp"]["steered"]),
                    count(&ebpf["lookup"]["tcp"]["refused"]),
                    count(&ebpf["lookup"]["udp"]["refused"]),
                ),
            },
        );
        for w in status["worker_stats"].as_array().into_iter().flatten() {
            let cpu = w["cpu"]
                .as_u64()
                .map_or(String::new(), |c| format!(", on cpu {c}"));
            println!(
                "worker {}: accepts {} public / {} reverse, claims {} ({} cross-worker), \
                 hand-offs {}, in set-up {}, pairs {}{cpu}",
                count(&w["worker"]),
                count(&w["accepts_public"]),
                count(&w["accepts_reverse"]),
                count(&w["claims"]),
                count(&w["cross_worker_claims"]),
                count(&w["handoffs"]),
                count(&w["setup_connections"]),
                count(&w["pairs_active"]),
            );
        }
        let drops: Vec<String> = status["drops"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| count(v) > 0)
                    .map(|(k, v)| format!("{k}={}", count(v)))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "drops: {}",
            if drops.is_empty() {
                "none".to_owned()
            } else {
                drops.join(" ")
            }
        );
        // Stream resume: every non-zero result, parked halves, retransmitted bytes, and the
        // P2P signalling of joined streams (checkpoints, candidates) with the migrations.
        let resume = &status["resume"];
        let nonzero = |v: &serde_json::Value| -> String {
            let list: Vec<String> = v
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(_, n)| count(n) > 0)
                        .map(|(k, n)| format!("{k}={}", count(n)))
                        .collect()
                })
                .unwrap_or_default();
            if list.is_empty() {
                "none".to_owned()
            } else {
                list.join(" ")
            }
        };
        println!(
            "resume: {}; parked {}, {} bytes retransmitted; p2p signals: {}; migrations to p2p {} / to relay {}",
            nonzero(&resume["results"]),
            count(&resume["parked"]),
            count(&resume["bytes_retransmitted"]),
            nonzero(&resume["p2p_signals"]),
            count(&resume["migrations"]["to_p2p"]),
            count(&resume["migrations"]["to_relay"]),
        );
    }
    let leases = status["leases"].as_array().cloned().unwrap_or_default();
    let cell = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let rows = leases
        .iter()
        .map(|l| {
            [
                "hostname",
                "tenant",
                "tls",
                "wildcard",
                "tcp_port",
                "udp_port",
                "idle_sessions",
            ]
            .iter()
            .map(|k| cell(&l[*k]))
            .collect()
        })
        .collect();
    print_rows(
        out,
        &[
            "HOSTNAME",
            "TENANT",
            "TLS",
            "WILDCARD",
            "TCP",
            "UDP",
            "IDLE SESSIONS",
        ],
        rows,
        status,
    );
    Ok(ExitCode::SUCCESS)
}
