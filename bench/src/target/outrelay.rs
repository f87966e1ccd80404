//! `outrelay`: the relay and the agent, two hops like rathole. A development PKI is written with
//! `outrelay dev-pki`; the relay runs with its default worker count and io backend; the agent
//! dials it over QUIC and keeps reverse sessions to it. With [`Routing::Tcp`] the front is the
//! agent's TCP port lease on the relay (client → relay → reverse session → agent → backend);
//! with [`Routing::Sni`] the front is the relay's public TLS listener and the lease routes the
//! ClientHello's server name to the backend (a TLS server); with [`Routing::Udp`] the front is
//! the agent's UDP lease port (datagrams ride QUIC datagrams between relay and agent). Both
//! processes count as the relay.
//!
//! With [`Routing::Mesh`] (P6) it is the service mesh instead: a standalone relay (no
//! controller; one static `[[policy]]` rule allows tenant `demo` to open service `bulk`), a
//! provider agent (`agent-2`, `[[provide]] bulk` → the backend) and a consumer agent
//! (`agent-1`, `[[consume]] bulk` on 127.0.0.1:0). The front is the consumer's listen address;
//! each connection to it becomes one QUIC stream consumer → relay → provider → backend. Only
//! the relay process counts as the relay; the two agents are helpers (the ends of the path).
//! Build them with `cargo build --release -p outrelay-relay -p outrelay-agent -p outrelay-cli`.
//!
//! Issue 22 adds two more mesh-only targets, each the same one stream from the consumer's
//! listen address to the sink:
//!
//! - `mesh-forward`: `outrelay-controller` (state and CA in the dev PKI dir), two relays
//!   enrolled with it (`outrelay token create --role relay` + `outrelay-relay enroll`, ids
//!   `relay-1` and `relay-2`, `[forward]` written out), the provider on relay 2 only and the
//!   consumer on relay 1 only, an allow rule added with `outrelay policy add`: every stream
//!   goes consumer → relay 1 → FORWARD_STREAM → relay 2 → provider. Both relays count as the
//!   relay (the figure is their sum); the controller is neither relay nor helper.
//! - `fallback`: the single-relay mesh with both agents on the TCP/443 fallback (`[fallback]
//!   mode = "only"`: ORP over QUIC inside mutual TLS on TCP to the relay's public TLS port).
//!
//! Each checks on the consumer's relay that a measured stream took its path
//! ([`super::MeshCheck`]).
//!
//! [`Routing::Failover`] (the failover scenario) starts `mesh-forward`'s controller and two
//! enrolled relays again, with a short QUIC idle timeout, each relay's config then fixed to the
//! QUIC port it got, and both agents on both relays (`ha_connections = 2`, metrics on for
//! `/status`); [`restart_relay`] starts a killed relay again on that port.
//!
//! `outrelay-base` is the same target with its binaries taken from the directory in
//! `OUTRELAY_BASE_BIN` (a build of the commit before a change), so one run measures before and
//! after side by side. Both take `--relay-workers` (the relay's top-level `workers = N`),
//! `--relay-ebpf` (the relay's `[ebpf]`) and `--agent-resume` (every agent's `[resume]`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{
    AbuseEnds, AgentResume, Availability, FailoverEnds, FailoverRelay, LEASE_RANGE_FIRST, Launch,
    LeaseEnds, MeshCheck, MeshVia, RelayBandwidth, RelayEbpf, Routing, RunningTarget, Target,
    UpgradeEnds, free_loopback_addr, ports, wait_listening, wait_ready, wait_udp_bound,
};
use crate::process::OwnedProcess;

/// The relay's public root host in the bench PKI.
const ROOT_HOST: &str = "outrelay.test";
/// How long the relay and the agent get to write their ready files.
const READY_TIMEOUT_MS: u64 = 20_000;
/// The service the mesh's provider offers and its consumer opens.
const MESH_SERVICE: &str = "bulk";
/// The tenant of the dev PKI's agents.
const MESH_TENANT: &str = "demo";
/// `agent-2.pem`'s identity in the dev PKI (`outrelay dev-pki`'s second agent UUID).
const AGENT_2_URI: &str = "outrelay://demo/agent/00000000-0000-4000-8000-000000000002";
/// `[ingress] pending_conn_max` of the abuse topology: the default (10,000) scaled down so
/// that a flood this box can hold (each root-host connection costs the relay 3 fds, and open
/// files are capped at 20,000 here) reaches it, as the full-size flood reaches 10,000.
pub const ABUSE_PENDING_CONN_MAX: usize = 1_000;

/// `[ingress] lease_sync_interval_ms` of the leases topology: the relay's default, written
/// out so the grant-to-routable figures can be read against it.
const LEASE_SYNC_INTERVAL_MS: u64 = 100;

/// The environment variable naming `outrelay-base`'s binary directory.
pub const BASE_BIN_ENV: &str = "OUTRELAY_BASE_BIN";

/// The region of the forwarded mesh's relays (enrolled as `outrelay://dev/relay/relay-1` and
/// `relay-2`).
const FORWARD_REGION: &str = "dev";
/// The caller pattern of the forwarded mesh's allow rule (every agent of the dev tenant).
const MESH_CALLERS: &str = "outrelay://demo/agent/*";
/// How long `mesh-forward` may take from its agents being ready to the first forwarded stream
/// (the provider's registration reaching relay 1 through the controller, the rule reaching
/// both relays).
const FORWARD_ROUTE_TIMEOUT_MS: u64 = 20_000;

/// Which mesh path an OutRelay target measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshPath {
    /// One standalone relay (`outrelay`, `outrelay-base`); every routing.
    Single,
    /// `mesh-forward`: controller, two relays, the stream forwarded relay 1 → relay 2.
    Forward,
    /// `fallback`: the single relay with both agents on the TCP/443 fallback.
    Fallback,
}

/// OutRelay's relay and agent: `outrelay` (this tree's release build), `outrelay-base`
/// (binaries from [`BASE_BIN_ENV`]), or one of the mesh-only paths of this tree's build.
pub struct Outrelay {
    /// Whether this is `outrelay-base`.
    pub base: bool,
    /// The mesh path (anything but [`MeshPath::Single`] runs [`Routing::Mesh`] only).
    pub path: MeshPath,
}

const BINARIES: [&str; 3] = ["outrelay-relay", "outrelay-agent", "outrelay"];

impl Outrelay {
    /// The directory the binaries come from; `None` for `outrelay-base` without
    /// [`BASE_BIN_ENV`].
    fn bin_dir(&self) -> Option<PathBuf> {
        if self.base {
            std::env::var_os(BASE_BIN_ENV)
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        } else {
            Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"))
        }
    }
}

impl Target for Outrelay {
    fn name(&self) -> &'static str {
        match (self.path, self.base) {
            (MeshPath::Single, false) => "outrelay",
            (MeshPath::Single, true) => "outrelay-base",
            (MeshPath::Forward, _) => "mesh-forward",
            (MeshPath::Fallback, _) => "fallback",
        }
    }

    fn description(&self) -> &'static str {
        match (self.path, self.base) {
            (MeshPath::Single, false) => {
                "OutRelay relay + agent (two hops over a reverse session, splice on both hops); routes by SNI"
            }
            (MeshPath::Single, true) => {
                "outrelay with the binaries in $OUTRELAY_BASE_BIN (a build to compare against in the same run)"
            }
            (MeshPath::Forward, _) => {
                "mesh only: controller + 2 enrolled relays, consumer on relay 1, provider on relay 2 (forwarded)"
            }
            (MeshPath::Fallback, _) => {
                "mesh only: the outrelay mesh with both agents on the TCP/443 fallback ([fallback] mode = only)"
            }
        }
    }

    fn availability(&self) -> Availability {
        let Some(dir) = self.bin_dir() else {
            return Availability::NotAvailable(format!(
                "{BASE_BIN_ENV} not set (a directory with outrelay-relay, outrelay-agent, outrelay)"
            ));
        };
        let controller = (self.path == MeshPath::Forward).then_some("outrelay-controller");
        match BINARIES
            .iter()
            .copied()
            .chain(controller)
            .find(|b| !dir.join(b).exists())
        {
            None => Availability::Available,
            Some(missing) if self.base => Availability::NotAvailable(format!(
                "{missing} not in {BASE_BIN_ENV}={}",
                dir.display()
            )),
            Some(missing) => Availability::NotAvailable(format!(
                "{missing} not built: cargo build --release -p outrelay-relay -p outrelay-agent -p outrelay-cli{}",
                if controller.is_some() {
                    " -p outrelay-controller"
                } else {
                    ""
                }
            )),
        }
    }

    fn supports(&self, routing: Routing) -> bool {
        self.path == MeshPath::Single || matches!(routing, Routing::Mesh { .. })
    }

    fn routes_sni(&self) -> bool {
        self.path == MeshPath::Single
    }

    fn takes_relay_workers(&self) -> bool {
        true
    }

    fn start(
        &self,
        backend: SocketAddr,
        routing: Routing,
        dir: &Path,
        launch: &Launch,
    ) -> Result<RunningTarget> {
        let bins = Bins {
            dir: self
                .bin_dir()
                .with_context(|| format!("{BASE_BIN_ENV} not set"))?,
            launch,
        };
        let pki = dir.join("pki");
        let out = std::process::Command::new(bins.path("outrelay"))
            .args(["dev-pki", "--root-host", ROOT_HOST, "--out"])
            .arg(&pki)
            .output()
            .context("running outrelay dev-pki")?;
        if !out.status.success() {
            bail!("dev-pki: {}", String::from_utf8_lossy(&out.stderr));
        }
        if let Routing::Abuse { flood } = routing {
            return start_abuse(&bins, backend, flood, dir, &pki);
        }
        if let Routing::Leases { ports, udp } = routing {
            return start_leases(&bins, ports, udp, dir, &pki);
        }
        if let Routing::Upgrade { sni, udp_echo } = routing {
            return start_upgradable(&bins, backend, sni, udp_echo, dir, &pki);
        }
        if routing == Routing::Failover {
            return start_failover(&bins, backend, dir, &pki);
        }
        if matches!(routing, Routing::Mesh { .. }) && self.path == MeshPath::Forward {
            return start_mesh_forward(&bins, backend, dir, &pki);
        }
        let fallback = self.path == MeshPath::Fallback;
        let lease_ports = ports::lease_ports().scenario;
        let public_tls = free_loopback_addr()?;
        let policy = if matches!(routing, Routing::Mesh { .. }) {
            format!(
                "[[policy]]\ntenant = \"{MESH_TENANT}\"\ncaller = \"*\"\n\
                 target = \"{MESH_SERVICE}\"\nmethod = \"\"\ndecision = \"allow\"\n"
            )
        } else {
            String::new()
        };
        let relay_config = format!(
            "public_url = \"https://{ROOT_HOST}\"\n{workers}\
             [tls]\ncert = \"{p}/relay.pem\"\nkey = \"{p}/relay-key.pem\"\nca = \"{p}/ca.pem\"\n\
             [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"{public_tls}\"\n\
             lease_bind_ip = \"127.0.0.1\"\nmetrics = \"{metrics}\"\nadmin_socket = \"\"\n\
             [leases]\nmin_port = {lo}\nmax_port = {hi}\ntcp = true\nudp = {udp}\n{ebpf}{policy}",
            p = pki.display(),
            // The fallback's check reads the relay's counters; the recorder runs either way.
            metrics = if fallback { "127.0.0.1:0" } else { "" },
            lo = lease_ports.0,
            hi = lease_ports.1,
            udp = routing == Routing::Udp,
            workers = workers_line(launch),
            ebpf = ebpf_section(launch),
        );
        let StartedRelay {
            mut processes,
            quic,
            lookup,
            metrics,
        } = start_relay(&bins, dir, &relay_config)?;
        let (lease_line, sni_routed) = match routing {
            Routing::Tcp => (format!("tcp_to = \"{backend}\""), false),
            Routing::Sni(_) => (format!("tls_to = \"{backend}\""), true),
            Routing::Udp => (format!("udp_to = \"{backend}\""), false),
            Routing::Mesh { .. } if fallback => {
                let tail = fallback_section(&quic, public_tls);
                let ends = MeshEnds {
                    provider_quic: &quic,
                    consumer_quic: &quic,
                    agent_tail: &tail,
                };
                let mut running = start_mesh(&bins, backend, dir, &pki, &ends, processes)?;
                running.mesh_check = Some(MeshCheck {
                    relay_metrics: metrics.context("relay ready file: metrics")?,
                    via: MeshVia::Fallback,
                });
                return Ok(running);
            }
            Routing::Mesh { .. } => {
                let ends = MeshEnds {
                    provider_quic: &quic,
                    consumer_quic: &quic,
                    agent_tail: "",
                };
                return start_mesh(&bins, backend, dir, &pki, &ends, processes);
            }
            Routing::Abuse { .. }
            | Routing::Leases { .. }
            | Routing::Upgrade { .. }
            | Routing::Failover => {
                bail!("the abuse, leases, upgrade and failover topologies have their own relay")
            }
        };
        let name = match routing {
            Routing::Sni(server_name) => server_name
                .strip_suffix(&format!(".{ROOT_HOST}"))
                .with_context(|| format!("SNI {server_name} is not under {ROOT_HOST}"))?,
            Routing::Tcp
            | Routing::Udp
            | Routing::Mesh { .. }
            | Routing::Abuse { .. }
            | Routing::Leases { .. }
            | Routing::Upgrade { .. }
            | Routing::Failover => "bench",
        };
        let agent = start_agent(
            &bins,
            "agent",
            dir,
            &agent_config(
                &quic,
                &pki,
                "agent-1",
                launch,
                &format!("[[lease]]\nname = \"{name}\"\n{lease_line}\n"),
            ),
            &mut processes,
        )?;
        let front = match routing {
            Routing::Sni(_) => public_tls,
            // The grant names the relay's public host; the port listens on lease_bind_ip.
            Routing::Tcp => granted_port(&agent, "tcp_addr")?,
            Routing::Udp => granted_port(&agent, "udp_addr")?,
            Routing::Mesh { .. }
            | Routing::Abuse { .. }
            | Routing::Leases { .. }
            | Routing::Upgrade { .. }
            | Routing::Failover => {
                bail!("no single lease front")
            }
        };
        // The relay binds a granted lease port on its next route sync, just after the grant;
        // with the sk_lookup program a TCP lease port has no listener of its own and routes
        // before the grant goes out (UDP ports keep a socket each, for the replies).
        if routing == Routing::Udp {
            wait_udp_bound(&[front], &mut processes)?;
        } else if !(routing == Routing::Tcp && lookup) {
            wait_listening(&[front], &mut processes)?;
        }
        Ok(RunningTarget::new(front, sni_routed, processes))
    }
}

/// Where one start's binaries are and how its processes are launched.
struct Bins<'a> {
    dir: PathBuf,
    launch: &'a Launch,
}

impl Bins<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Starts `binary` (a name in the bin dir) as `name`, through the launch's pinning.
    fn spawn(&self, name: &str, binary: &str, args: &[String], dir: &Path) -> Result<OwnedProcess> {
        self.launch.spawn(name, &self.path(binary), args, dir)
    }
}

/// The relay config's top-level `workers = N` line for `launch` (empty: the default).
fn workers_line(launch: &Launch) -> String {
    launch
        .relay_workers
        .map_or_else(String::new, |n| format!("workers = {n}\n"))
}

/// The relay config's `[ebpf]` and `[bandwidth]` sections for `launch` (empty: none, the
/// relay's defaults).
fn ebpf_section(launch: &Launch) -> String {
    launch
        .relay_ebpf
        .map_or_else(String::new, RelayEbpf::config_section)
        + &launch
            .relay_bandwidth
            .map_or_else(String::new, RelayBandwidth::config_section)
}

/// The agent config's `[resume]` section for `launch` (empty: none, the agent's default).
fn resume_section(launch: &Launch) -> String {
    launch
        .agent_resume
        .map_or_else(String::new, AgentResume::config_section)
}

/// A started relay: its process, QUIC address, the eBPF programs its ready file says run and
/// its metrics listener (when the config has one).
struct StartedRelay {
    processes: Vec<OwnedProcess>,
    quic: String,
    /// The metrics listener from the ready file (`None`: `metrics = ""`).
    metrics: Option<SocketAddr>,
    /// Whether TCP lease ports are served by the sk_lookup program: they then have no
    /// listener of their own (nothing in `/proc/net/tcp` to wait for) and route before their
    /// grant goes out. Read from the ready file, so the relay's `auto` default counts too.
    lookup: bool,
}

/// Starts the relay from `config` (TOML text, written to `dir/relay.toml`) and reads its ready
/// file. With an `[ebpf]` setup in `launch`, the programs the relay reports must be the ones
/// the setup asked for, so a row never describes another setup.
fn start_relay(bins: &Bins<'_>, dir: &Path, config: &str) -> Result<StartedRelay> {
    let relay_config = dir.join("relay.toml");
    std::fs::write(&relay_config, config)?;
    let relay_ready = dir.join("relay.ready");
    // A relay started again in the same dir (failover) must not find its last ready file.
    let _ = std::fs::remove_file(&relay_ready);
    let mut processes = vec![bins.spawn(
        "outrelay-relay",
        "outrelay-relay",
        &[
            "--log".to_owned(),
            "warn".to_owned(),
            "--config".to_owned(),
            relay_config.display().to_string(),
            "--ready-file".to_owned(),
            relay_ready.display().to_string(),
        ],
        dir,
    )?];
    let relay = wait_ready(&relay_ready, &mut processes, READY_TIMEOUT_MS)?;
    let quic = relay["quic"]
        .as_str()
        .context("relay ready file: quic")?
        .to_owned();
    let programs: Vec<&str> = relay["ebpf"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    if let Some(setup) = bins.launch.relay_ebpf {
        check_programs(setup, &programs)?;
    }
    let metrics = relay["metrics"].as_str().and_then(|m| m.parse().ok());
    Ok(StartedRelay {
        processes,
        quic,
        metrics,
        lookup: programs.contains(&"lookup"),
    })
}

/// Errors unless `running` (the ready file's `ebpf` list) is what `setup` asks for: the public
/// group's CPU-local accept with `reuseport`/`all`, the lookup program with `lookup`/`all`,
/// nothing with `off`.
fn check_programs(setup: RelayEbpf, running: &[&str]) -> Result<()> {
    let (reuseport, lookup) = match setup {
        RelayEbpf::Off => (false, false),
        RelayEbpf::Reuseport => (true, false),
        RelayEbpf::Lookup => (false, true),
        RelayEbpf::All => (true, true),
    };
    let has = |p: &str| running.contains(&p);
    if has("reuseport_public") != reuseport
        || has("lookup") != lookup
        || (setup == RelayEbpf::Off && !running.is_empty())
    {
        bail!(
            "relay runs eBPF programs {running:?}, not what ebpf={} asks for",
            setup.as_str()
        );
    }
    Ok(())
}

/// An agent's TOML: relay `quic`, the dev PKI's identity `who` (`agent-1`, `agent-2`), metrics
/// off, the `[resume]` section of `launch` (if any), then `sections` ([[lease]], [[provide]],
/// [[consume]]).
fn agent_config(quic: &str, pki: &Path, who: &str, launch: &Launch, sections: &str) -> String {
    format!(
        "relays = [\"{quic}\"]\nserver_name = \"localhost\"\n\
         [identity]\ncert = \"{p}/{who}.pem\"\nkey = \"{p}/{who}-key.pem\"\nca = \"{p}/ca.pem\"\n\
         [metrics]\nlisten = \"\"\n{resume}{sections}",
        p = pki.display(),
        resume = resume_section(launch),
    )
}

/// Starts `outrelay-agent run` from `config` as `dir/<name>.toml`, pushes it onto `processes`
/// and returns its ready file's JSON.
fn start_agent(
    bins: &Bins<'_>,
    name: &str,
    dir: &Path,
    config: &str,
    processes: &mut Vec<OwnedProcess>,
) -> Result<serde_json::Value> {
    let config_path = dir.join(format!("{name}.toml"));
    std::fs::write(&config_path, config)?;
    let ready = dir.join(format!("{name}.ready"));
    processes.push(bins.spawn(
        &format!("outrelay-{name}"),
        "outrelay-agent",
        &[
            "run".to_owned(),
            "--config".to_owned(),
            config_path.display().to_string(),
            "--ready-file".to_owned(),
            ready.display().to_string(),
        ],
        dir,
    )?);
    wait_ready(&ready, processes, READY_TIMEOUT_MS)
}

/// Where the mesh's two agents connect, and what else their configs say.
struct MeshEnds<'a> {
    /// The provider's relay (QUIC address).
    provider_quic: &'a str,
    /// The consumer's relay.
    consumer_quic: &'a str,
    /// Tables both agents' configs get before their `[[provide]]` / `[[consume]]`
    /// (`[fallback]`), or empty.
    agent_tail: &'a str,
}

/// The mesh (P6): provider `agent-2` serving [`MESH_SERVICE`] to `backend`, consumer `agent-1`
/// listening for it on 127.0.0.1:0, each on its relay in `ends`; `relays` (already started)
/// are the measured processes.
fn start_mesh(
    bins: &Bins<'_>,
    backend: SocketAddr,
    dir: &Path,
    pki: &Path,
    ends: &MeshEnds<'_>,
    relays: Vec<OwnedProcess>,
) -> Result<RunningTarget> {
    let mut all = relays;
    let measured = all.len();
    let provide = format!(
        "{}[[provide]]\nservice = \"{MESH_SERVICE}\"\nto = \"{backend}\"\n",
        ends.agent_tail
    );
    start_agent(
        bins,
        "provider",
        dir,
        &agent_config(ends.provider_quic, pki, "agent-2", bins.launch, &provide),
        &mut all,
    )?;
    let consume = format!(
        "{}[[consume]]\nservice = \"{MESH_SERVICE}\"\nlisten = \"127.0.0.1:0\"\n",
        ends.agent_tail
    );
    let consumer = start_agent(
        bins,
        "consumer",
        dir,
        &agent_config(ends.consumer_quic, pki, "agent-1", bins.launch, &consume),
        &mut all,
    )?;
    let listen = consumer["consumers"][0]["listen_addr"]
        .as_str()
        .context("consumer ready file: consumers[0].listen_addr")?;
    let front: SocketAddr = listen
        .parse()
        .with_context(|| format!("consumer listen_addr {listen}"))?;
    wait_listening(&[front], &mut all)?;
    let helpers = all.split_off(measured);
    let mut running = RunningTarget::new(front, false, all);
    running.helpers = helpers;
    Ok(running)
}

/// The agents' `[fallback]` for the `fallback` target: the TCP fallback only, to the relay's
/// public TLS listener (`public_tls`) for its QUIC address `quic`, SNI the root host.
fn fallback_section(quic: &str, public_tls: SocketAddr) -> String {
    format!(
        "[fallback]\nmode = \"only\"\nserver_name = \"{ROOT_HOST}\"\n\
         addrs = {{ \"{quic}\" = \"{public_tls}\" }}\n"
    )
}

/// A started `outrelay-controller` (state and CA in the dev PKI dir, so it issues from the
/// same CA as the dev certificates).
struct StartedController {
    process: OwnedProcess,
    /// Its gRPC (mutual TLS) address.
    grpc: SocketAddr,
    /// Its admin socket (`outrelay --controller unix://…`).
    admin_socket: PathBuf,
}

/// Starts the controller in `dir` with `pki` (the dev PKI) as its state directory.
fn start_controller(bins: &Bins<'_>, dir: &Path, pki: &Path) -> Result<StartedController> {
    if !bins.path("outrelay-controller").exists() {
        bail!("outrelay-controller not built: cargo build --release -p outrelay-controller");
    }
    let admin_socket = dir.join("controller.sock");
    let controller_config = dir.join("controller.toml");
    std::fs::write(
        &controller_config,
        format!(
            "state_dir = \"{p}\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n\
             [tls]\ncert_file = \"{p}/controller.pem\"\nkey_file = \"{p}/controller-key.pem\"\n\
             [admin]\nsocket_path = \"{s}\"\n[metrics]\nlisten = \"\"\n",
            p = pki.display(),
            s = admin_socket.display(),
        ),
    )?;
    let controller_ready = dir.join("controller.ready");
    let mut processes = vec![bins.spawn(
        "outrelay-controller",
        "outrelay-controller",
        &[
            "--log".to_owned(),
            "warn".to_owned(),
            "--config".to_owned(),
            controller_config.display().to_string(),
            "--ready-file".to_owned(),
            controller_ready.display().to_string(),
        ],
        dir,
    )?];
    let ready = wait_ready(&controller_ready, &mut processes, READY_TIMEOUT_MS)?;
    let grpc: SocketAddr = ready["grpc"]
        .as_str()
        .context("controller ready file: grpc")?
        .parse()
        .context("controller ready file: grpc address")?;
    let process = processes.pop().context("the controller process")?;
    Ok(StartedController {
        process,
        grpc,
        admin_socket,
    })
}

/// Runs `outrelay --controller unix://<admin socket> --output json ARGS`; its JSON answer.
fn controller_cli(
    bins: &Bins<'_>,
    controller: &StartedController,
    args: &[&str],
) -> Result<serde_json::Value> {
    let out = std::process::Command::new(bins.path("outrelay"))
        .arg("--controller")
        .arg(format!("unix://{}", controller.admin_socket.display()))
        .args(["--output", "json"])
        .args(args)
        .output()
        .with_context(|| format!("running outrelay {args:?}"))?;
    if !out.status.success() {
        bail!(
            "outrelay {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("outrelay {args:?}: not JSON"))
}

/// Enrolls relay `id` with the controller the way an operator does (a one-time relay token,
/// then `outrelay-relay enroll`, names localhost and 127.0.0.1); the identity's state
/// directory (`[tls] state_dir`).
fn enroll_relay(
    bins: &Bins<'_>,
    controller: &StartedController,
    id: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let answer = controller_cli(
        bins,
        controller,
        &[
            "token",
            "create",
            "--role",
            "relay",
            "--region",
            FORWARD_REGION,
            "--relay-id",
            id,
            "--ttl",
            "10m",
        ],
    )?;
    let token = answer["token"]
        .as_str()
        .with_context(|| format!("token create: no token in {answer}"))?;
    let identity = dir.join(format!("{id}-identity"));
    let out = std::process::Command::new(bins.path("outrelay-relay"))
        .arg("enroll")
        .arg("--controller")
        .arg(format!("https://{}", controller.grpc))
        .arg("--state-dir")
        .arg(&identity)
        .args(["--name", "localhost", "--ip", "127.0.0.1"])
        .env("OUTRELAY_TOKEN", token)
        .output()
        .context("running outrelay-relay enroll")?;
    if !out.status.success() {
        bail!(
            "outrelay-relay enroll ({id}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(identity)
}

/// Adds the allow rule for the dev tenant's agents ([`MESH_CALLERS`]) to open
/// [`MESH_SERVICE`] (`outrelay policy add`).
fn allow_mesh_service(bins: &Bins<'_>, controller: &StartedController) -> Result<()> {
    controller_cli(
        bins,
        controller,
        &[
            "policy",
            "add",
            "--tenant",
            MESH_TENANT,
            "--caller",
            MESH_CALLERS,
            "--target",
            MESH_SERVICE,
            "--decision",
            "allow",
        ],
    )?;
    Ok(())
}

/// Enrolls relay `id` with `controller` and writes nothing yet: its dir (`dir/<id>`, made) and
/// its config (QUIC on port 0, metrics on, following the controller, `controller_extra` in its
/// `[controller]` table, `tail` after the tables, the launch's workers and `[ebpf]`).
fn enrolled_relay(
    bins: &Bins<'_>,
    controller: &StartedController,
    id: &str,
    dir: &Path,
    controller_extra: &str,
    tail: &str,
) -> Result<(PathBuf, String)> {
    let identity = enroll_relay(bins, controller, id, dir)?;
    let relay_dir = dir.join(id);
    std::fs::create_dir_all(&relay_dir).context("creating the relay's dir")?;
    let config = format!(
        "public_url = \"https://{ROOT_HOST}\"\n{workers}\
         [tls]\nstate_dir = \"{identity}\"\n\
         [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\n\
         public_tls = \"{public_tls}\"\nlease_bind_ip = \"127.0.0.1\"\n\
         metrics = \"127.0.0.1:0\"\nadmin_socket = \"\"\n\
         [controller]\nurl = \"https://{grpc}\"\nstate_dir = \"{state}\"\n{controller_extra}\
         {tail}{ebpf}",
        identity = identity.display(),
        public_tls = free_loopback_addr()?,
        grpc = controller.grpc,
        state = relay_dir.join("state").display(),
        workers = workers_line(bins.launch),
        ebpf = ebpf_section(bins.launch),
    );
    Ok((relay_dir, config))
}

/// The forwarded mesh (`mesh-forward`): the controller, relays `relay-1` and `relay-2`
/// enrolled with it and following it (`[forward]` written out, metrics on), the allow rule
/// for the dev tenant's agents to open [`MESH_SERVICE`], the provider on relay 2 and the
/// consumer on relay 1. Returns once one stream was forwarded (relay 1 counted it): the
/// provider's registration and the rule have reached the relays.
fn start_mesh_forward(
    bins: &Bins<'_>,
    backend: SocketAddr,
    dir: &Path,
    pki: &Path,
) -> Result<RunningTarget> {
    let controller = start_controller(bins, dir, pki)?;
    allow_mesh_service(bins, &controller)?;
    let mut relays = Vec::new();
    let mut quic = Vec::new();
    let mut metrics = Vec::new();
    for id in ["relay-1", "relay-2"] {
        let (relay_dir, config) = enrolled_relay(
            bins,
            &controller,
            id,
            dir,
            "",
            "[forward]\nmax_streams_per_peer = 1024\nconnect_timeout_ms = 3000\n",
        )?;
        let started = start_relay(bins, &relay_dir, &config)?;
        quic.push(started.quic);
        metrics.push(started.metrics.context("relay ready file: metrics")?);
        relays.extend(started.processes);
    }
    let ends = MeshEnds {
        provider_quic: &quic[1],
        consumer_quic: &quic[0],
        agent_tail: "",
    };
    let mut running = start_mesh(bins, backend, dir, pki, &ends, relays)?;
    running.add_support(controller.process);
    let check = MeshCheck {
        relay_metrics: metrics[0],
        via: MeshVia::Forward,
    };
    wait_forwarded(running.front, check, &mut running)?;
    running.mesh_check = Some(check);
    Ok(running)
}

/// Opens streams through the consumer (`front`) until relay 1 counts one forwarded, or
/// errors after [`FORWARD_ROUTE_TIMEOUT_MS`]. A stream refused meanwhile (no provider known
/// yet, no rule yet) is closed by the consumer and retried.
fn wait_forwarded(front: SocketAddr, check: MeshCheck, running: &mut RunningTarget) -> Result<()> {
    use std::io::Write;
    let deadline = Instant::now() + Duration::from_millis(FORWARD_ROUTE_TIMEOUT_MS);
    let before = check.read()?;
    loop {
        running.ensure_running()?;
        let mut s = std::net::TcpStream::connect(front)
            .with_context(|| format!("connecting to the consumer on {front}"))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))
            .context("write timeout")?;
        // A refused stream may reset the connection: a failed write is one more try.
        let _ = s.write_all(&[0x17; 4096]);
        let tried = Instant::now();
        while tried.elapsed() < Duration::from_secs(2) {
            if check.verify(before, check.read()?).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(s);
        if Instant::now() >= deadline {
            bail!(
                "no stream forwarded relay-1 -> relay-2 within {FORWARD_ROUTE_TIMEOUT_MS} ms \
                 ({} on relay 1 did not rise)",
                check.counter()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The failover topology's relay `[quic] idle_timeout_ms` (the end-to-end test's value).
const FAILOVER_RELAY_IDLE_TIMEOUT_MS: u64 = 2_000;
/// Its `[quic] keep_alive_ms`.
const FAILOVER_RELAY_KEEP_ALIVE_MS: u64 = 500;
/// The failover topology's relay `[lifecycle] shutdown_grace_ms`: a relay stopped with SIGTERM
/// (GOAWAY, drain) exits within it.
pub const FAILOVER_RELAY_SHUTDOWN_GRACE_MS: u64 = 2_000;
/// The failover agents' `[connection] idle_timeout_ms` (the end-to-end test's value).
const FAILOVER_AGENT_IDLE_TIMEOUT_MS: u64 = 3_000;

/// How [`restart_relay`] starts a relay of the failover topology again: the binaries'
/// directory and the launch of the first start.
#[derive(Debug, Clone)]
pub struct RelayRestart {
    bin_dir: PathBuf,
    launch: Launch,
}

/// Starts `relay` again (same config, dir, identity and controller state, so the same QUIC
/// address); errors unless its ready file names that address. The new process.
pub fn restart_relay(restart: &RelayRestart, relay: &FailoverRelay) -> Result<OwnedProcess> {
    let bins = Bins {
        dir: restart.bin_dir.clone(),
        launch: &restart.launch,
    };
    let mut started = start_relay(&bins, &relay.dir, &relay.config)?;
    let quic: SocketAddr = started.quic.parse().context("relay ready file: quic")?;
    if quic != relay.quic {
        bail!("relay restarted on {quic}, not on {}", relay.quic);
    }
    started.processes.pop().context("the relay process")
}

/// An HA agent's TOML for the failover topology: both relays, `ha_connections = 2`, metrics
/// (its `/status`) on loopback, the end-to-end test's short connection and mesh timeouts, then
/// `sections`.
fn ha_agent_config(
    relays: &[SocketAddr],
    pki: &Path,
    who: &str,
    launch: &Launch,
    sections: &str,
) -> String {
    let relays: Vec<String> = relays.iter().map(ToString::to_string).collect();
    format!(
        "relays = {relays:?}\nserver_name = \"localhost\"\nha_connections = 2\n\
         [identity]\ncert = \"{p}/{who}.pem\"\nkey = \"{p}/{who}-key.pem\"\nca = \"{p}/ca.pem\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [connection]\nkeepalive_ms = 500\nidle_timeout_ms = {FAILOVER_AGENT_IDLE_TIMEOUT_MS}\n\
         ping_interval_ms = 1000\nreconnect_initial_ms = 200\nreconnect_max_ms = 1000\n\
         [mesh]\nopen_timeout_ms = 5000\ndial_timeout_ms = 2000\n{resume}{sections}",
        p = pki.display(),
        resume = resume_section(launch),
    )
}

/// The metrics listener (`/status`) in an agent's ready file.
fn agent_metrics(ready: &serde_json::Value, who: &str) -> Result<SocketAddr> {
    ready["metrics"]
        .as_str()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("{who} ready file: metrics"))
}

/// The failover topology ([`Routing::Failover`]): the controller with the allow rule of
/// `mesh-forward`, relays `relay-1` and `relay-2` enrolled with it (short QUIC idle timeout,
/// quick controller reconnects), each started once on port 0 and its config then fixed to the
/// QUIC port it got (so a restart comes back there); provider `agent-2` of [`MESH_SERVICE`] to
/// `backend` and consumer `agent-1`, both on both relays with `ha_connections = 2`. The relays
/// count as the relay, the agents are helpers, the controller is support.
fn start_failover(
    bins: &Bins<'_>,
    backend: SocketAddr,
    dir: &Path,
    pki: &Path,
) -> Result<RunningTarget> {
    let controller = start_controller(bins, dir, pki)?;
    allow_mesh_service(bins, &controller)?;
    let mut all = Vec::new();
    let mut relays = Vec::new();
    for id in ["relay-1", "relay-2"] {
        let (relay_dir, config) = enrolled_relay(
            bins,
            &controller,
            id,
            dir,
            "heartbeat_interval_ms = 200\nreconnect_backoff_ms = 100\n\
             reconnect_backoff_max_ms = 500\n",
            &format!(
                "[quic]\nidle_timeout_ms = {FAILOVER_RELAY_IDLE_TIMEOUT_MS}\n\
                 keep_alive_ms = {FAILOVER_RELAY_KEEP_ALIVE_MS}\n\
                 [lifecycle]\nshutdown_grace_ms = {FAILOVER_RELAY_SHUTDOWN_GRACE_MS}\n"
            ),
        )?;
        let started = start_relay(bins, &relay_dir, &config)?;
        let quic: SocketAddr = started.quic.parse().context("relay ready file: quic")?;
        let config = config.replacen("quic = \"127.0.0.1:0\"", &format!("quic = \"{quic}\""), 1);
        all.extend(started.processes);
        relays.push(FailoverRelay {
            quic,
            dir: relay_dir,
            config,
        });
    }
    let quics: Vec<SocketAddr> = relays.iter().map(|r| r.quic).collect();
    let measured = all.len();
    let provide = format!("[[provide]]\nservice = \"{MESH_SERVICE}\"\nto = \"{backend}\"\n");
    let provider = start_agent(
        bins,
        "provider",
        dir,
        &ha_agent_config(&quics, pki, "agent-2", bins.launch, &provide),
        &mut all,
    )?;
    let consume = format!("[[consume]]\nservice = \"{MESH_SERVICE}\"\nlisten = \"127.0.0.1:0\"\n");
    let consumer = start_agent(
        bins,
        "consumer",
        dir,
        &ha_agent_config(&quics, pki, "agent-1", bins.launch, &consume),
        &mut all,
    )?;
    let listen = consumer["consumers"][0]["listen_addr"]
        .as_str()
        .context("consumer ready file: consumers[0].listen_addr")?;
    let front: SocketAddr = listen
        .parse()
        .with_context(|| format!("consumer listen_addr {listen}"))?;
    wait_listening(&[front], &mut all)?;
    let helpers = all.split_off(measured);
    let mut running = RunningTarget::new(front, false, all);
    running.helpers = helpers;
    running.add_support(controller.process);
    running.failover = Some(FailoverEnds {
        relays,
        consumer_status: agent_metrics(&consumer, "consumer")?,
        provider_status: agent_metrics(&provider, "provider")?,
        quic_idle_timeout_ms: FAILOVER_RELAY_IDLE_TIMEOUT_MS.min(FAILOVER_AGENT_IDLE_TIMEOUT_MS),
        relay_idle_timeout_ms: FAILOVER_RELAY_IDLE_TIMEOUT_MS,
        agent_idle_timeout_ms: FAILOVER_AGENT_IDLE_TIMEOUT_MS,
        restart: RelayRestart {
            bin_dir: bins.dir.clone(),
            launch: bins.launch.clone(),
        },
    });
    Ok(running)
}

/// The abuse topology ([`Routing::Abuse`]): `outrelay-controller` (state and CA in the dev
/// PKI dir, auto approval), a relay attached to it (metrics on, root host served from the dev
/// PKI's `root-host.pem`, [`ABUSE_PENDING_CONN_MAX`]) and `agent-1` with the SNI lease `demo`
/// to `backend` and the TCP lease `bulk` to `flood`. The relay and the agent count as the
/// relay; the controller is a helper.
fn start_abuse(
    bins: &Bins<'_>,
    backend: SocketAddr,
    flood: SocketAddr,
    dir: &Path,
    pki: &Path,
) -> Result<RunningTarget> {
    let controller = start_controller(bins, dir, pki)?;
    let controller_grpc = controller.grpc;
    let helpers = vec![controller.process];

    let lease_ports = ports::lease_ports().abuse;
    let public_tls = free_loopback_addr()?;
    let relay_config = format!(
        "public_url = \"https://{ROOT_HOST}\"\n{workers}\
         [tls]\ncert = \"{p}/relay.pem\"\nkey = \"{p}/relay-key.pem\"\nca = \"{p}/ca.pem\"\n\
         [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"{public_tls}\"\n\
         lease_bind_ip = \"127.0.0.1\"\nmetrics = \"127.0.0.1:0\"\nadmin_socket = \"\"\n\
         [leases]\nmin_port = {lo}\nmax_port = {hi}\ntcp = true\n\
         [ingress]\npending_conn_max = {ABUSE_PENDING_CONN_MAX}\n\
         [public_tls]\ncert = \"{p}/root-host.pem\"\nkey = \"{p}/root-host-key.pem\"\n\
         [controller]\nurl = \"https://{controller_grpc}\"\nstate_dir = \"{d}/relay-state\"\n{ebpf}",
        p = pki.display(),
        d = dir.display(),
        lo = lease_ports.0,
        hi = lease_ports.1,
        workers = workers_line(bins.launch),
        ebpf = ebpf_section(bins.launch),
    );
    let StartedRelay {
        mut processes,
        quic,
        lookup,
        metrics,
    } = start_relay(bins, dir, &relay_config)?;
    let relay_metrics = metrics.context("relay ready file: metrics")?;
    let relay_pid = processes[0].pid();
    let leases = format!(
        "[[lease]]\nname = \"demo\"\ntls_to = \"{backend}\"\n\
         [[lease]]\nname = \"bulk\"\ntcp_to = \"{flood}\"\n"
    );
    let agent = start_agent(
        bins,
        "agent",
        dir,
        &agent_config(&quic, pki, "agent-1", bins.launch, &leases),
        &mut processes,
    )?;
    let bulk = agent["leases"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == "bulk"))
        .context("agent ready file: no lease `bulk`")?;
    let bulk_front = granted_port(&serde_json::json!({ "leases": [bulk] }), "tcp_addr")?;
    if lookup {
        // The lease port has no listener of its own (sk_lookup); it routed at its grant.
        wait_listening(&[public_tls], &mut processes)?;
    } else {
        wait_listening(&[public_tls, bulk_front], &mut processes)?;
    }
    let mut running = RunningTarget::new(public_tls, true, processes);
    running.abuse = Some(AbuseEnds {
        cli: bins.path("outrelay"),
        relay_pid,
        controller_pid: helpers[0].pid(),
        relay_metrics,
        relay_quic: quic.parse().context("relay ready file: quic address")?,
        public_tls,
        bulk_front,
        root_host: ROOT_HOST,
        controller_grpc,
        pki: pki.to_owned(),
        attacker_uri: AGENT_2_URI.to_owned(),
        pending_conn_max: ABUSE_PENDING_CONN_MAX,
    });
    running.helpers = helpers;
    Ok(running)
}

/// The leases topology ([`Routing::Leases`]): a standalone relay (no controller: every lease
/// is approved) whose lease range is `ports` ports from [`LEASE_RANGE_FIRST`], TCP leases on
/// (and UDP when `udp`), with the caps that would refuse a range's worth of leases from one
/// identity raised to the range: `[leases] max_per_agent` and the QUIC lease frame rate. The
/// lease TTL is the cap (300 s), longer than any measurement. Only the relay runs.
fn start_leases(
    bins: &Bins<'_>,
    ports: u16,
    udp: bool,
    dir: &Path,
    pki: &Path,
) -> Result<RunningTarget> {
    let first = LEASE_RANGE_FIRST;
    ports::hold_leases_range(first)?;
    let last = first
        .checked_add(ports.max(1) - 1)
        .context("lease range past port 65535")?;
    let public_tls = free_loopback_addr()?;
    let relay_config = format!(
        "public_url = \"https://{ROOT_HOST}\"\n{workers}\
         [tls]\ncert = \"{p}/relay.pem\"\nkey = \"{p}/relay-key.pem\"\nca = \"{p}/ca.pem\"\n\
         [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"{public_tls}\"\n\
         lease_bind_ip = \"127.0.0.1\"\nmetrics = \"\"\nadmin_socket = \"\"\n\
         [leases]\nmin_port = {first}\nmax_port = {last}\ntcp = true\nudp = {udp}\n\
         max_per_agent = {cap}\n\
         [ingress]\nlease_sync_interval_ms = {LEASE_SYNC_INTERVAL_MS}\n\
         [quic]\nlease_frames_per_s = {cap}\nlease_frames_burst = {cap}\n{ebpf}",
        p = pki.display(),
        cap = u32::from(ports).max(100) * 2,
        workers = workers_line(bins.launch),
        ebpf = ebpf_section(bins.launch),
    );
    let StartedRelay {
        processes, quic, ..
    } = start_relay(bins, dir, &relay_config)?;
    let relay_pid = processes[0].pid();
    let mut running = RunningTarget::new(public_tls, false, processes);
    running.leases = Some(LeaseEnds {
        relay_pid,
        relay_quic: quic.parse().context("relay ready file: quic address")?,
        pki: pki.to_owned(),
        ports: (first, last),
        bind_ip: IpAddr::from([127, 0, 0, 1]),
        lease_sync_interval_ms: LEASE_SYNC_INTERVAL_MS,
        udp,
    });
    Ok(running)
}

/// `[ingress] pending_per_source_max` of the upgrade topology: the load generator is one
/// address, and the public connections that wait for the agents to move (about half a second
/// of the load) keep their pending place; at the default (256) that one source would shed its
/// own waiting connections (`pending_per_source`), which many real clients would not.
const UPGRADE_PENDING_PER_SOURCE_MAX: usize = 8192;

/// The upgrade topology ([`Routing::Upgrade`]): a standalone relay with its admin socket
/// (`dir/relay.sock`) and TCP and UDP leases, and `agent-1` with the lease under test (the
/// SNI lease `demo` to `backend`, or the TCP lease `bench`) and the UDP lease `ping` to
/// `udp_echo`. Both processes count as the relay; the scenario runs `outrelay-relay upgrade`
/// ([`UpgradeEnds::Outrelay`]).
fn start_upgradable(
    bins: &Bins<'_>,
    backend: SocketAddr,
    sni: Option<&'static str>,
    udp_echo: SocketAddr,
    dir: &Path,
    pki: &Path,
) -> Result<RunningTarget> {
    let lease_ports = ports::lease_ports().scenario;
    let public_tls = free_loopback_addr()?;
    let admin_socket = dir.join("relay.sock");
    let relay_config = format!(
        "public_url = \"https://{ROOT_HOST}\"\n{workers}\
         [tls]\ncert = \"{p}/relay.pem\"\nkey = \"{p}/relay-key.pem\"\nca = \"{p}/ca.pem\"\n\
         [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"{public_tls}\"\n\
         lease_bind_ip = \"127.0.0.1\"\nmetrics = \"\"\nadmin_socket = \"{admin}\"\n\
         [leases]\nmin_port = {lo}\nmax_port = {hi}\ntcp = true\nudp = true\n\
         [ingress]\npending_per_source_max = {UPGRADE_PENDING_PER_SOURCE_MAX}\n{ebpf}",
        p = pki.display(),
        admin = admin_socket.display(),
        lo = lease_ports.0,
        hi = lease_ports.1,
        workers = workers_line(bins.launch),
        ebpf = ebpf_section(bins.launch),
    );
    let StartedRelay {
        mut processes,
        quic,
        lookup,
        ..
    } = start_relay(bins, dir, &relay_config)?;
    let relay_pid = processes[0].pid();
    let lease = match sni {
        Some(server_name) => {
            let name = server_name
                .strip_suffix(&format!(".{ROOT_HOST}"))
                .with_context(|| format!("SNI {server_name} is not under {ROOT_HOST}"))?;
            format!("[[lease]]\nname = \"{name}\"\ntls_to = \"{backend}\"\n")
        }
        None => format!("[[lease]]\nname = \"bench\"\ntcp_to = \"{backend}\"\n"),
    };
    let leases = format!("{lease}[[lease]]\nname = \"ping\"\nudp_to = \"{udp_echo}\"\n");
    let agent = start_agent(
        bins,
        "agent",
        dir,
        &agent_config(&quic, pki, "agent-1", bins.launch, &leases),
        &mut processes,
    )?;
    let ping = agent["leases"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == "ping"))
        .context("agent ready file: no lease `ping`")?;
    let udp_front = granted_port(&serde_json::json!({ "leases": [ping] }), "udp_addr")?;
    let front = match sni {
        Some(_) => public_tls,
        None => granted_port(&agent, "tcp_addr")?,
    };
    wait_udp_bound(&[udp_front], &mut processes)?;
    if sni.is_some() || !lookup {
        wait_listening(&[front], &mut processes)?;
    }
    let mut running = RunningTarget::new(front, sni.is_some(), processes);
    running.upgrade = Some(UpgradeEnds::Outrelay {
        relay_bin: bins.path("outrelay-relay"),
        admin_socket,
        relay_pid,
        agents: 1,
        udp_front,
    });
    Ok(running)
}

/// `127.0.0.1:<port>` of the first lease's `key` (`tcp_addr`, `udp_addr`: "<root host>:<port>")
/// in the agent's ready file.
fn granted_port(agent: &serde_json::Value, key: &str) -> Result<SocketAddr> {
    let granted = agent["leases"][0][key]
        .as_str()
        .with_context(|| format!("agent ready file: leases[0].{key}"))?;
    let port = granted
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .with_context(|| format!("agent ready file: {key} {granted}"))?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_count_is_a_top_level_line_only_when_given() {
        assert_eq!(workers_line(&Launch::default()), "");
        let launch = Launch {
            relay_workers: Some(3),
            ..Launch::default()
        };
        assert_eq!(workers_line(&launch), "workers = 3\n");
    }

    #[test]
    fn the_ebpf_section_says_mode_on_for_every_program_setup() {
        assert_eq!(ebpf_section(&Launch::default()), "");
        let with = |e| Launch {
            relay_ebpf: Some(e),
            ..Launch::default()
        };
        assert_eq!(
            ebpf_section(&with(RelayEbpf::Off)),
            "[ebpf]\nmode = \"off\"\n"
        );
        assert_eq!(
            ebpf_section(&with(RelayEbpf::Reuseport)),
            "[ebpf]\nmode = \"on\"\nreuseport = true\nlookup = false\n"
        );
        assert_eq!(
            ebpf_section(&with(RelayEbpf::Lookup)),
            "[ebpf]\nmode = \"on\"\nreuseport = false\nlookup = true\n"
        );
        assert_eq!(
            ebpf_section(&with(RelayEbpf::All)),
            "[ebpf]\nmode = \"on\"\nreuseport = true\nlookup = true\n"
        );
    }

    #[test]
    fn every_agent_config_gets_the_resume_section_only_when_given() {
        let pki = Path::new("/pki");
        let plain = agent_config("127.0.0.1:1", pki, "agent-1", &Launch::default(), "");
        assert!(!plain.contains("[resume]"), "{plain}");
        for (resume, enabled) in [(AgentResume::On, true), (AgentResume::Off, false)] {
            let launch = Launch {
                agent_resume: Some(resume),
                ..Launch::default()
            };
            let sections = "[[consume]]\nservice = \"bulk\"\nlisten = \"127.0.0.1:0\"\n";
            let text = agent_config("127.0.0.1:1", pki, "agent-1", &launch, sections);
            // A table of its own before the sections, so [[consume]] does not swallow it.
            assert!(
                text.contains(&format!("[resume]\nenabled = {enabled}\n[[consume]]")),
                "{text}"
            );
            assert_eq!(text.matches("[resume]").count(), 1, "{text}");
        }
    }

    #[test]
    fn a_setup_must_find_the_programs_it_asked_for_running() {
        let all = ["reuseport_public", "reuseport_reverse", "lookup"];
        assert!(check_programs(RelayEbpf::All, &all).is_ok());
        assert!(check_programs(RelayEbpf::Reuseport, &all[..2]).is_ok());
        assert!(check_programs(RelayEbpf::Lookup, &["lookup"]).is_ok());
        assert!(check_programs(RelayEbpf::Off, &[]).is_ok());
        // auto fell back, or ran more than asked for: the row would describe another setup.
        assert!(check_programs(RelayEbpf::Reuseport, &[]).is_err());
        assert!(check_programs(RelayEbpf::Lookup, &all).is_err());
        assert!(check_programs(RelayEbpf::Off, &["lookup"]).is_err());
    }

    #[test]
    fn the_base_target_needs_its_bin_dir() {
        let base = Outrelay {
            base: true,
            path: MeshPath::Single,
        };
        assert_eq!(base.name(), "outrelay-base");
        // Decided by the environment the tests run in; both answers are checked.
        match std::env::var_os(BASE_BIN_ENV) {
            None => {
                let Availability::NotAvailable(why) = base.availability() else {
                    panic!("outrelay-base available without {BASE_BIN_ENV}");
                };
                assert!(why.contains(BASE_BIN_ENV), "{why}");
            }
            Some(dir) => assert_eq!(base.bin_dir(), Some(PathBuf::from(dir))),
        }
        assert!(
            Outrelay {
                base: false,
                path: MeshPath::Single
            }
            .bin_dir()
            .is_some()
        );
    }
}
