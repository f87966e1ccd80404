//! `outrelay-agent`: `run` (from a TOML config), `expose` (one lease from flags), `provide` /
//! `consume` (one service stream provider / consumer from flags), `status` (a summary read
//! from a running agent's `/status`). Invalid configuration exits 64 with one line naming the
//! key.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use outrelay_agent::config::{
    CommonArgs, ConfigError, ConsumeArgs, DEFAULT_METRICS_LISTEN, ExposeArgs, ProvideArgs,
    Settings, pair_methods,
};

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Timeout of the `status` request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// OutRelay agent: exposes local services through relays (outbound connections only).
#[derive(Debug, Parser)]
#[command(name = "outrelay-agent", version)]
struct Flags {
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, global = true, default_value = "info", env = "OUTRELAY_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run from a config file (every lease in it, on every relay in it).
    Run {
        /// Config file (TOML).
        #[arg(long, value_name = "FILE", default_value = "/etc/outrelay/agent.toml")]
        config: PathBuf,
        /// Write the metrics address and the leases' public names and ports here as JSON
        /// once connected with every lease granted.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
        /// Validate the configuration and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Expose one local service under a lease name (defaults for everything else).
    Expose {
        #[command(flatten)]
        common: Common,
        /// Lease name: the public hostname is `<name>.<root_host>`.
        #[arg(long)]
        name: String,
        /// Local TLS server for public TLS passthrough (SNI).
        #[arg(long, value_name = "ADDR")]
        tls_to: Option<String>,
        /// Local TCP server for a public TCP port.
        #[arg(long, value_name = "ADDR")]
        tcp_to: Option<String>,
        /// Local UDP service (ip:port) for a public UDP port.
        #[arg(long, value_name = "ADDR")]
        udp_to: Option<String>,
        /// Write a PROXY protocol header (v1 or v2; v2 only with --udp-to) with the public
        /// client's address to the local service before its first byte.
        #[arg(long, value_name = "VERSION", default_value = "")]
        proxy_protocol: String,
    },
    /// Provide a service to other agents' streams: register it and join incoming streams to
    /// local targets.
    Provide {
        #[command(flatten)]
        common: Common,
        /// Service name (one lowercase DNS label).
        #[arg(long)]
        service: String,
        /// Local target (host:port). Without a `--method` just before it: the default target
        /// of every method that has none of its own.
        #[arg(long, value_name = "ADDR", required = true)]
        to: Vec<String>,
        /// A method whose local target is the NEXT `--to`; other methods go to the default
        /// target, or get 404 without one.
        #[arg(long, value_name = "M")]
        method: Vec<String>,
        /// Write a PROXY protocol header (v2: the consumer's identity URI as TLV 0xE0; v1:
        /// `PROXY UNKNOWN`) to the local target before the stream's first byte.
        #[arg(long, value_name = "VERSION", default_value = "")]
        proxy_protocol: String,
    },
    /// Consume a service: every connection to the local listener becomes a stream to it.
    Consume {
        #[command(flatten)]
        common: Common,
        /// Service name (resolved in this agent's tenant).
        #[arg(long)]
        service: String,
        /// Local listener (ip:port; port 0 picks one, named in the ready file).
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Method claimed when opening streams.
        #[arg(long, value_name = "M", default_value = "")]
        method: String,
    },
    /// Enroll with the controller: a key made here, a certificate for it from the controller
    /// (pinned by the CA fingerprint in the one-time token), stored in the state directory.
    Enroll {
        /// Controller gRPC address (https://host:port).
        #[arg(long, value_name = "URL")]
        controller: String,
        /// One-time enrollment token (`outrelay token create --role agent`).
        #[arg(long, env = "OUTRELAY_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// Where to store key.pem (0600), cert.pem and ca.pem [default: /var/lib/outrelay-agent
        /// as root, the per-user data directory otherwise].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// The controller's CA certificate, when its server certificate does not come with it
        /// (still checked against the token's fingerprint).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
    /// Print a running agent's connections, leases, pools and counters.
    Status {
        /// The agent's metrics/status listener.
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS_LISTEN)]
        metrics: String,
        /// Print the raw JSON instead.
        #[arg(long)]
        json: bool,
    },
}

/// The flags `expose`, `provide` and `consume` share.
#[derive(Debug, Args)]
struct Common {
    /// Relay QUIC address (host:port).
    #[arg(long, value_name = "ADDR")]
    relay: String,
    /// Name checked in the relay's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Certificate chain (PEM) with the agent identity URI.
    #[arg(long, requires_all = ["key", "ca"], conflicts_with = "state_dir")]
    cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Controller CA bundle (PEM).
    #[arg(long, requires = "cert")]
    ca: Option<PathBuf>,
    /// State directory holding cert.pem, key.pem and ca.pem (as written by enrollment).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Ready file (as for `run`).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Metrics and status listener ("" = off).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

impl Common {
    /// The settings part and the ready file.
    fn split(self) -> (CommonArgs, Option<PathBuf>) {
        let files = match (self.cert, self.key, self.ca) {
            (Some(c), Some(k), Some(a)) => Some((c, k, a)),
            _ => None,
        };
        let args = CommonArgs {
            relay: self.relay,
            server_name: self.server_name,
            files,
            state_dir: self.state_dir,
            metrics: self.metrics,
        };
        (args, self.ready_file)
    }
}

/// The values of `id` with their positions on the command line.
fn indexed(m: &ArgMatches, id: &str) -> Vec<(usize, String)> {
    let values = m.get_many::<String>(id).into_iter().flatten().cloned();
    m.indices_of(id).into_iter().flatten().zip(values).collect()
}

/// `provide`'s flags as settings: `--method`/`--to` paired by position.
fn provide_args(
    common: CommonArgs,
    service: String,
    proxy_protocol: String,
    matches: Option<&ArgMatches>,
) -> Result<ProvideArgs, ConfigError> {
    let (methods, tos) = matches.map_or_else(Default::default, |m| {
        (indexed(m, "method"), indexed(m, "to"))
    });
    let (to, methods) = pair_methods(&methods, &tos)?;
    Ok(ProvideArgs {
        common,
        service,
        to,
        methods,
        proxy_protocol,
    })
}

fn main() -> ExitCode {
    let matches = Flags::command().get_matches();
    let flags = match Flags::from_arg_matches(&matches) {
        Ok(f) => f,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&flags.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config_path = match &flags.command {
        Command::Run { config, .. } => Some(config.clone()),
        _ => None,
    };
    let (settings, ready_file) = match flags.command {
        Command::Status { metrics, json } => return status(&metrics, json),
        Command::Enroll {
            controller,
            token,
            state_dir,
            ca,
        } => return enroll(&controller, &token, state_dir, ca),
        Command::Run {
            config,
            ready_file,
            check_config,
        } => match Settings::load(&config) {
            Ok(s) if check_config => {
                drop(s);
                println!("config ok");
                return ExitCode::SUCCESS;
            }
            Ok(s) => (s, ready_file),
            Err(e) => return config_error(&e),
        },
        Command::Expose {
            common,
            name,
            tls_to,
            tcp_to,
            udp_to,
            proxy_protocol,
        } => {
            let (common, ready_file) = common.split();
            let args = ExposeArgs {
                common,
                name,
                tls_to,
                tcp_to,
                udp_to,
                proxy_protocol,
            };
            match Settings::from_expose(args) {
                Ok(s) => (s, ready_file),
                Err(e) => return config_error(&e),
            }
        }
        Command::Provide {
            common,
            service,
            proxy_protocol,
            ..
        } => {
            let (common, ready_file) = common.split();
            let sub = matches.subcommand_matches("provide");
            match provide_args(common, service, proxy_protocol, sub)
                .and_then(Settings::from_provide)
            {
                Ok(s) => (s, ready_file),
                Err(e) => return config_error(&e),
            }
        }
        Command::Consume {
            common,
            service,
            listen,
            method,
        } => {
            let (common, ready_file) = common.split();
            let args = ConsumeArgs {
                common,
                service,
                listen,
                method,
            };
            match Settings::from_consume(args) {
                Ok(s) => (s, ready_file),
                Err(e) => return config_error(&e),
            }
        }
    };
    match run(settings, ready_file, config_path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrelay-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("outrelay-agent: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn run(
    settings: Settings,
    ready_file: Option<PathBuf>,
    config_path: Option<PathBuf>,
) -> anyhow::Result<()> {
    let metrics = outrelay_agent::http::install()?;
    outrelay_agent::metric_help::describe();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agent-control")
        .enable_all()
        .build()?;
    runtime.block_on(outrelay_agent::run(
        settings,
        ready_file,
        metrics,
        config_path,
    ))?;
    // Engine threads and lingering tasks end with the process.
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// `enroll`: enroll, store, and remember the controller for renewal.
fn enroll(controller: &str, token: &str, dir: Option<PathBuf>, ca: Option<PathBuf>) -> ExitCode {
    let done = (|| -> anyhow::Result<(PathBuf, String)> {
        let dir = match dir {
            Some(d) => d,
            None => outrelay_client::store::default_dir("agent")?,
        };
        let ca_pem = match &ca {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            ),
            None => None,
        };
        let opts = outrelay_client::EnrollOptions {
            role: Some(outrelay_proto::identity::Role::Agent),
            ca_pem,
            ..outrelay_client::EnrollOptions::default()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let issued = runtime.block_on(outrelay_client::enroll(controller, token, &opts))?;
        outrelay_client::IdentityStore::new(dir.clone()).save(&issued)?;
        let url_file = dir.join(outrelay_agent::config::STATE_CONTROLLER_FILE);
        std::fs::write(&url_file, format!("{controller}\n"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", url_file.display()))?;
        Ok((dir, issued.identity.to_string()))
    })();
    match done {
        Ok((dir, identity)) => {
            println!(
                "enrolled as {identity}; key, certificate and CA in {}",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outrelay-agent enroll: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `status`: GET /status and print a summary.
fn status(addr: &str, raw: bool) -> ExitCode {
    match fetch_status(addr) {
        Ok(doc) if raw => {
            println!("{doc:#}");
            ExitCode::SUCCESS
        }
        Ok(doc) => {
            print!("{}", summary(&doc));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outrelay-agent status: {addr}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn fetch_status(addr: &str) -> anyhow::Result<serde_json::Value> {
    let sock: std::net::SocketAddr = addr.parse()?;
    let mut s = TcpStream::connect_timeout(&sock, STATUS_TIMEOUT)?;
    s.set_read_timeout(Some(STATUS_TIMEOUT))?;
    s.write_all(
        format!("GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("{}", head.lines().next().unwrap_or_default());
    }
    Ok(serde_json::from_str(body)?)
}

fn summary(doc: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let _ = writeln!(out, "agent {}", s(&doc["agent_uri"]));
    for r in doc["relays"].as_array().into_iter().flatten() {
        if r["addr"].as_str().is_none_or(str::is_empty) && r["connected"].as_bool() != Some(true) {
            // An HA slot with no relay to hold (fewer distinct relays than ha_connections).
            let _ = writeln!(out, "relay slot idle: no other relay candidate free");
            continue;
        }
        let up = if r["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "DISCONNECTED"
        };
        let mut head = format!("relay {} {up}", s(&r["addr"]));
        if let Some(id) = r["relay_id"].as_str().filter(|i| !i.is_empty()) {
            let _ = write!(head, " {id}");
        }
        if let Some(t) = r["transport"].as_str() {
            let _ = write!(head, " via {t}");
        }
        if let Some(t) = r["tunnel_addr"].as_str() {
            let _ = write!(head, " (tunnel to {t})");
        }
        if let Some(n) = r["name"]
            .as_str()
            .filter(|n| !n.is_empty() && Some(*n) != r["addr"].as_str())
        {
            let _ = write!(head, " (from {n})");
        }
        let _ = writeln!(out, "{head}");
        for l in r["leases"].as_array().into_iter().flatten() {
            let mut line = format!("  lease {} {}", s(&l["name"]), s(&l["state"]));
            if let Some(h) = l["hostname"].as_str().filter(|h| !h.is_empty()) {
                let _ = write!(line, " https://{h}");
            }
            if let Some(t) = l["tcp_addr"].as_str() {
                let _ = write!(line, " tcp {t}");
            }
            if let Some(r) = l["reverse_addr"].as_str() {
                let _ = write!(line, " reverse sessions to {r}");
            }
            if l["pool"].is_object() {
                let p = &l["pool"];
                let _ = write!(
                    line,
                    " pool idle {}/{} (open {})",
                    p["idle"], p["target"], p["open"]
                );
            }
            if let Some(e) = l["last_error"].as_str() {
                let _ = write!(line, " last error: {e}");
            }
            let _ = writeln!(out, "{line}");
        }
        for v in r["services"].as_array().into_iter().flatten() {
            let mut line = format!("  service {} {}", s(&v["service"]), s(&v["state"]));
            if let Some(id) = v["service_id"].as_str().filter(|i| !i.is_empty()) {
                let _ = write!(line, " {id}");
            }
            if let Some(e) = v["last_error"].as_str() {
                let _ = write!(line, " last error: {e}");
            }
            let _ = writeln!(out, "{line}");
        }
    }
    for c in doc["candidates"].as_array().into_iter().flatten() {
        if c["state"].as_str() == Some("held") {
            continue;
        }
        let mut line = format!("candidate {} {}", s(&c["addr"]), s(&c["state"]));
        if let Some(id) = c["relay_id"].as_str().filter(|i| !i.is_empty()) {
            let _ = write!(line, " {id}");
        }
        if c["state"].as_str() == Some("backoff") {
            let _ = write!(line, " retry in {} ms", c["retry_in_ms"]);
        }
        if let Some(e) = c["last_error"].as_str() {
            let _ = write!(line, " last error: {e}");
        }
        let _ = writeln!(out, "{line}");
    }
    for c in doc["consumers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "consumer {} on {}",
            s(&c["service"]),
            s(&c["listen_addr"])
        );
    }
    for role in ["consumer", "provider"] {
        let m = &doc["mesh"][role];
        if m.is_object() {
            let _ = writeln!(
                out,
                "mesh {role}: accepted {} active {} bytes to relay {} to local {}",
                m["streams"]["accepted"], m["active"], m["bytes_to_relay"], m["bytes_to_local"]
            );
        }
    }
    let c = &doc["counters"];
    let _ = writeln!(
        out,
        "sessions opened {} claimed tls {} tcp {} dead {}; splices {}; reconnects {}",
        c["sessions_opened"],
        c["sessions_claimed_tls"],
        c["sessions_claimed_tcp"],
        c["sessions_dead"],
        c["splices"],
        c["reconnects"]
    );
    let _ = writeln!(out, "local connect failures {}", c["local_connect_failed"]);
    let sp = &doc["splice"];
    let _ = writeln!(
        out,
        "splice pairs active {} total {} bytes {}",
        sp["pairs_active"], sp["pairs_total"], sp["bytes"]
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provide(argv: &[&str]) -> Result<ProvideArgs, ConfigError> {
        let base = [
            "outrelay-agent",
            "provide",
            "--relay",
            "r:1",
            "--state-dir",
            "s",
        ];
        let matches = Flags::command()
            .try_get_matches_from(base.iter().chain(argv))
            .expect("parses");
        let Ok(Flags {
            command: Command::Provide {
                common, service, ..
            },
            ..
        }) = Flags::from_arg_matches(&matches)
        else {
            panic!("not provide");
        };
        provide_args(
            common.split().0,
            service,
            String::new(),
            matches.subcommand_matches("provide"),
        )
    }

    #[test]
    fn each_method_takes_the_next_to_and_a_bare_to_is_the_default() {
        let a = provide(&[
            "--service",
            "payments",
            "--method",
            "charge",
            "--to",
            "127.0.0.1:8081",
            "--to",
            "127.0.0.1:8080",
            "--method",
            "refund",
            "--to",
            "127.0.0.1:8082",
        ])
        .expect("valid");
        assert_eq!(a.to.as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(
            a.methods,
            vec![
                ("charge".to_owned(), "127.0.0.1:8081".to_owned()),
                ("refund".to_owned(), "127.0.0.1:8082".to_owned()),
            ]
        );
        let only =
            provide(&["--service", "p", "--method", "m", "--to", "127.0.0.1:1"]).expect("valid");
        assert_eq!(only.to, None);
        let e = provide(&["--service", "p", "--to", "127.0.0.1:1", "--method", "m"])
            .expect_err("dangling --method");
        assert!(e.to_string().starts_with("invalid config: --method"), "{e}");
    }
}
