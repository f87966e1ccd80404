//! Targets: the things traffic goes through. A target knows how to start itself in front of a
//! backend address and returns a [`RunningTarget`]: the front address clients connect to, plus
//! the processes whose CPU and memory count as "the relay". Dropping it stops everything.
//!
//! Wiring in a new target (OutRelay's relay + agent) is one file: implement [`Target`] and add
//! it to [`all`].

mod direct;
mod engine;
mod haproxy;
mod nginx;
mod outrelay;
mod ports;
mod quinn_direct;
mod rathole;
mod socat;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use outrelay::{
    ABUSE_PENDING_CONN_MAX, FAILOVER_RELAY_SHUTDOWN_GRACE_MS, MeshPath, restart_relay,
};

use crate::pinning::CpuList;
use crate::proc_stats;
use crate::process::OwnedProcess;

/// How long a started target gets to open its front port.
const READY_TIMEOUT_MS: u64 = 10_000;

/// How a target picks the backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Every connection goes to the backend (plain L4 relay).
    Tcp,
    /// Connections whose TLS ClientHello names this server go to the backend; others are
    /// closed. Targets that cannot read SNI fall back to [`Routing::Tcp`] and say so.
    Sni(&'static str),
    /// UDP datagrams from the front address go to the backend UDP address; replies follow
    /// the flow back.
    Udp,
    /// One TCP connection to the front becomes one QUIC stream to the backend (OutRelay's
    /// service mesh: consumer agent → relay → provider agent → backend), or the target carries
    /// its own QUIC load and counts it ([`RunningTarget::delivered`]: `quinn-direct`).
    Mesh {
        /// The rate `quinn-direct-paced` writes at, in Mbit/s (0: not measured yet).
        pace_mbps: u32,
    },
    /// The abuse scenario's topology (outrelay only): a controller, a relay attached to it, and
    /// one agent with two leases: the SNI lease `demo` to the backend (the legitimate client's
    /// path) and the TCP lease `bulk` to `flood` (a backend that writes a large body: the lease
    /// the stalled readers attack). The started target says where to attack in
    /// [`RunningTarget::abuse`].
    Abuse {
        /// The backend behind the attacked `bulk` lease.
        flood: SocketAddr,
    },
    /// The leases scenario's topology (outrelay only): a relay alone, its lease range
    /// [`LEASE_RANGE_FIRST`] .. + `ports` open to TCP (and UDP when `udp`) leases with the
    /// per-agent cap and the lease frame rate raised to the range. No agent: the scenario's
    /// lease driver ([`crate::lease_driver`]) asks for the leases. The started target says
    /// where in [`RunningTarget::leases`].
    Leases {
        /// Ports in the range.
        ports: u16,
        /// Whether the leases also take a UDP port.
        udp: bool,
    },
    /// The upgrade scenario's topology (issue 20; outrelay and haproxy only): the SNI path
    /// (`sni` names the server, as [`Routing::Sni`]) or the TCP path (`None`, as
    /// [`Routing::Tcp`]), started so that the scenario can hand it over to a new process
    /// while it serves ([`RunningTarget::upgrade`]): OutRelay with its admin socket and a UDP
    /// lease to `udp_echo`, HAProxy in master-worker mode or (`haproxy-classic`) ready for a
    /// `-sf` reload.
    Upgrade {
        /// The server name routed on (`None`: the TCP path).
        sni: Option<&'static str>,
        /// The UDP echo server behind OutRelay's UDP lease.
        udp_echo: SocketAddr,
    },
    /// The failover scenario's topology (issue 22; outrelay only): a controller, two relays
    /// enrolled with it, a provider of the service to the backend (an echo server) and a
    /// consumer, both agents on both relays with `ha_connections = 2` and short QUIC timeouts;
    /// the front is the consumer's listen address. The started target says how to kill and
    /// restart a relay in [`RunningTarget::failover`].
    Failover,
}

/// First port of the leases scenario's range (below the kernel's ephemeral range, away from
/// the tests' 20000-30000 and the other scenarios' claimed ranges in 20000-30000 ([`ports`]); 10,000 ports
/// end at 19999; one bench process at a time holds it).
pub const LEASE_RANGE_FIRST: u16 = 10_000;

impl Routing {
    /// Why a target that does not [`Target::supports`] this routing is skipped.
    pub fn unsupported_reason(self) -> &'static str {
        match self {
            Self::Udp => "no UDP forwarding in this harness",
            Self::Mesh { .. } => "no QUIC mesh stream in this harness",
            Self::Abuse { .. } => "the abuse scenario attacks OutRelay's own listeners only",
            Self::Leases { .. } => "the leases scenario measures OutRelay's lease ports only",
            Self::Upgrade { .. } => "the upgrade scenario hands over outrelay and haproxy only",
            Self::Failover => "the failover scenario kills OutRelay's own relays only",
            Self::Tcp | Self::Sni(_) => "QUIC mesh scenario only",
        }
    }
}

impl Routing {
    /// The path label of a scenario that measures more than one routing (`connrate`: `sni`
    /// and `tcp`); empty for the others.
    pub fn path_label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Sni(_) => "sni",
            Self::Udp => "udp",
            Self::Mesh { .. } => "mesh",
            Self::Abuse { .. } => "abuse",
            Self::Leases { udp: false, .. } => "tcp",
            Self::Leases { udp: true, .. } => "tcp+udp",
            Self::Upgrade { sni: Some(_), .. } => "sni",
            Self::Upgrade { sni: None, .. } => "tcp",
            Self::Failover => "",
        }
    }
}

/// How one start of a target launches its processes: CPU pinning, OutRelay's worker count,
/// its eBPF programs and its agents' stream resume. The default launches as the harness
/// itself runs, with the relay's default workers and `[ebpf]` section and the agents' default
/// `[resume]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launch {
    /// `(taskset, cpus)`: every process of the target runs under `taskset -c cpus`.
    pub pin: Option<(PathBuf, CpuList)>,
    /// OutRelay's relay top-level `workers = N`; `None`: the relay's default (one per core
    /// it may run on).
    pub relay_workers: Option<usize>,
    /// OutRelay's relay `[ebpf]` section; `None`: none (the relay's default, `mode = "auto"`).
    pub relay_ebpf: Option<RelayEbpf>,
    /// OutRelay's agents' `[resume]` section; `None`: none (the agent's default).
    pub agent_resume: Option<AgentResume>,
    /// OutRelay's relay `[bandwidth]` section; `None`: none (the relay's default, no limit).
    pub relay_bandwidth: Option<RelayBandwidth>,
}

/// A relay bandwidth setup (`--relay-bandwidth`, issue 21): `off` (an explicit `[bandwidth]`
/// with every limit 0) or a rate in bits per second that the relay's lease AND tenant
/// defaults are set to, both directions, so every byte of a limited transfer takes tokens
/// from two buckets (the worst case a configured limit costs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RelayBandwidth {
    /// The limit in bits per second; 0 = off.
    pub bits_per_s: u64,
}

impl RelayBandwidth {
    /// Parses `off`, `0` or `<number><k|m|g|t>bit` (decimal units: 1 mbit = 10^6 bit/s).
    ///
    /// # Errors
    /// Anything else, as one line for clap.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase();
        if t == "off" || t == "0" {
            return Ok(Self { bits_per_s: 0 });
        }
        let Some(number) = t.strip_suffix("bit") else {
            return Err(format!(
                "{text:?}: expected off or a rate like 200mbit, 10gbit"
            ));
        };
        let (digits, scale) = match number.chars().last() {
            Some('k') => (&number[..number.len() - 1], 1e3),
            Some('m') => (&number[..number.len() - 1], 1e6),
            Some('g') => (&number[..number.len() - 1], 1e9),
            Some('t') => (&number[..number.len() - 1], 1e12),
            _ => (number, 1.0),
        };
        let value: f64 = digits
            .parse()
            .map_err(|_| format!("{text:?}: {digits:?} is not a number"))?;
        let bits = value * scale;
        if !(bits.is_finite() && (8.0..=1e13).contains(&bits)) {
            return Err(format!("{text:?}: out of range (8 bit/s to 10 Tbit/s)"));
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // range checked above
        Ok(Self {
            bits_per_s: bits.round() as u64,
        })
    }

    /// The setup label's value (`bw=<this>`): `off`, or the rate in the largest whole unit.
    pub fn as_label(self) -> String {
        let b = self.bits_per_s;
        match b {
            0 => "off".to_owned(),
            _ if b.is_multiple_of(1_000_000_000) => format!("{}gbit", b / 1_000_000_000),
            _ if b.is_multiple_of(1_000_000) => format!("{}mbit", b / 1_000_000),
            _ if b.is_multiple_of(1_000) => format!("{}kbit", b / 1_000),
            _ => format!("{b}bit"),
        }
    }

    /// The relay config's `[bandwidth]` section (a whole table, ending in a newline).
    pub fn config_section(self) -> String {
        let bytes = self.bits_per_s / 8;
        format!(
            "[bandwidth]\nlease_to_service_bytes_per_s = {bytes}\nlease_to_client_bytes_per_s = {bytes}\n\
             tenant_to_service_bytes_per_s = {bytes}\ntenant_to_client_bytes_per_s = {bytes}\n"
        )
    }
}

/// Which of the relay's eBPF programs a setup runs (`--relay-ebpf`, issue 17). Every value
/// but `off` says `mode = "on"`, so a program that cannot load fails the start loudly instead
/// of falling back to plain listeners and measuring the wrong thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RelayEbpf {
    /// `mode = "off"`: plain SO_REUSEPORT listeners, one listener per worker per lease port.
    Off,
    /// The CPU-local accept program only (`reuseport = true`, `lookup = false`).
    Reuseport,
    /// The lease port range through one socket per worker only (`reuseport = false`,
    /// `lookup = true`).
    Lookup,
    /// Both programs.
    All,
}

impl RelayEbpf {
    /// The setup label's value (`ebpf=<this>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Reuseport => "reuseport",
            Self::Lookup => "lookup",
            Self::All => "all",
        }
    }

    /// The relay config's `[ebpf]` section (a whole table, ending in a newline).
    pub fn config_section(self) -> String {
        let (reuseport, lookup) = match self {
            Self::Off => return "[ebpf]\nmode = \"off\"\n".to_owned(),
            Self::Reuseport => (true, false),
            Self::Lookup => (false, true),
            Self::All => (true, true),
        };
        format!("[ebpf]\nmode = \"on\"\nreuseport = {reuseport}\nlookup = {lookup}\n")
    }
}

/// Whether OutRelay's agents ask for resumable streams (`--agent-resume`, issue 19): every
/// agent a target starts (the mesh's provider and consumer, the other topologies' one agent)
/// gets `[resume] enabled = true|false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AgentResume {
    /// `enabled = true`: rings, checkpoints, STREAM_RESUME after a broken relay stream.
    On,
    /// `enabled = false`: plain streams, as before resume.
    Off,
}

impl AgentResume {
    /// The setup label's value (`resume=<this>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
        }
    }

    /// The agent config's `[resume]` section (a whole table, ending in a newline).
    pub fn config_section(self) -> String {
        format!("[resume]\nenabled = {}\n", self == Self::On)
    }
}

impl Launch {
    /// Starts one of the target's processes ([`OwnedProcess::spawn`]), under `taskset` when
    /// pinned. `taskset` execs the program, so the pid (whose CPU is measured) is the
    /// program's own.
    pub fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        dir: &Path,
    ) -> Result<OwnedProcess> {
        let (program, args) = self.command(program, args);
        OwnedProcess::spawn(name, &program, &args, dir)
    }

    /// The program and arguments [`Self::spawn`] runs.
    pub fn command(&self, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        match &self.pin {
            None => (program.to_owned(), args.to_vec()),
            Some((taskset, cpus)) => {
                let mut all = vec![
                    "-c".to_owned(),
                    cpus.to_string(),
                    program.display().to_string(),
                ];
                all.extend_from_slice(args);
                (taskset.clone(), all)
            }
        }
    }
}

/// Whether a target can run on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Installed and runnable.
    Available,
    /// Not runnable; the reason is shown in reports as `not available (reason)`.
    NotAvailable(String),
}

/// One thing to measure traffic through.
pub trait Target {
    /// Short name used on the command line and in reports (`haproxy`, `rathole`, …).
    fn name(&self) -> &'static str;
    /// One line: what this target is and how it is configured.
    fn description(&self) -> &'static str;
    /// Whether it can run here (binaries installed, built, …).
    fn availability(&self) -> Availability;
    /// Whether it can be started with `routing`; scenarios report the others as not available
    /// ([`Routing::unsupported_reason`]). Default: TCP and SNI.
    fn supports(&self, routing: Routing) -> bool {
        matches!(routing, Routing::Tcp | Routing::Sni(_))
    }
    /// Whether [`Routing::Sni`] makes it route on the ClientHello (default: no, it forwards
    /// every connection, so its SNI and TCP paths are one path, measured once).
    fn routes_sni(&self) -> bool {
        false
    }
    /// Whether it takes [`Launch::relay_workers`] (OutRelay's relay), so `--relay-workers`
    /// runs it once per worker count.
    fn takes_relay_workers(&self) -> bool {
        false
    }
    /// Starts the target in front of `backend` in the empty directory `dir`, its processes
    /// launched through `launch`, and waits until its front port is listening (a TCP listener,
    /// or a bound UDP socket for [`Routing::Udp`]).
    fn start(
        &self,
        backend: SocketAddr,
        routing: Routing,
        dir: &Path,
        launch: &Launch,
    ) -> Result<RunningTarget>;
}

/// A started target. Dropping it stops its processes (SIGTERM, then SIGKILL, whole groups).
#[derive(Debug)]
pub struct RunningTarget {
    /// Where clients connect.
    pub front: SocketAddr,
    /// Whether connections are routed on SNI (false: every connection is forwarded).
    pub sni_routed: bool,
    /// Set by a target that carries its own load (`quinn-direct`: its client writes from the
    /// start): the stats address its receiver serves its byte count on
    /// ([`crate::quic_peer::read_received`]). `None`: the scenario sends through `front`.
    pub delivered: Option<SocketAddr>,
    /// The processes whose CPU and memory count as the relay.
    processes: Vec<OwnedProcess>,
    /// Processes the target needs but that are not the relay (the mesh's consumer and
    /// provider agents): checked for being alive, never measured as the relay.
    helpers: Vec<OwnedProcess>,
    /// Set by `outrelay` for [`Routing::Abuse`]: where the attacks go.
    pub abuse: Option<AbuseEnds>,
    /// Set by `outrelay` for [`Routing::Leases`]: where the lease driver connects.
    pub leases: Option<LeaseEnds>,
    /// Set by `outrelay` and `haproxy` for [`Routing::Upgrade`]: how to hand it over.
    pub upgrade: Option<UpgradeEnds>,
    /// Processes that were the relay before a hand-over and exit by themselves
    /// ([`Self::retire`]): no longer checked or measured, still stopped (group) on drop.
    retired: Vec<OwnedProcess>,
    /// Processes the target needs that are neither the relay nor the path's ends (the
    /// controller of `mesh-forward`): checked for being alive, never measured.
    support: Vec<OwnedProcess>,
    /// Set by `mesh-forward` and `fallback` ([`Routing::Mesh`]): the relay counter that proves
    /// a measured stream took that path.
    pub mesh_check: Option<MeshCheck>,
    /// Set by `outrelay` for [`Routing::Failover`]: the relays to kill and restart, the
    /// agents' status listeners.
    pub failover: Option<FailoverEnds>,
}

/// The failover topology's ends ([`Routing::Failover`]).
#[derive(Debug, Clone)]
pub struct FailoverEnds {
    /// The relays, in the agents' config order (relay 1 first); relay `i` is the relay
    /// process `i` of the [`RunningTarget`].
    pub relays: Vec<FailoverRelay>,
    /// The consumer agent's metrics listener (`GET /status`).
    pub consumer_status: SocketAddr,
    /// The provider agent's metrics listener.
    pub provider_status: SocketAddr,
    /// The QUIC idle timeout of the agents' connections to the relays: the smaller of the
    /// relay's `[quic] idle_timeout_ms` and the agent's `[connection] idle_timeout_ms`.
    pub quic_idle_timeout_ms: u64,
    /// The relay's `[quic] idle_timeout_ms`.
    pub relay_idle_timeout_ms: u64,
    /// The agents' `[connection] idle_timeout_ms`.
    pub agent_idle_timeout_ms: u64,
    /// How the relays were started (binaries, launch), to start one again.
    pub restart: RelayRestart,
}

/// One relay of [`FailoverEnds`]: its QUIC address (kept across restarts).
#[derive(Debug, Clone)]
pub struct FailoverRelay {
    /// The QUIC listener the agents dial.
    pub quic: SocketAddr,
    /// Its directory (config, ready file, controller state).
    pub dir: PathBuf,
    /// Its config text, with the QUIC address fixed to [`Self::quic`].
    pub config: String,
}

pub use outrelay::RelayRestart;

/// The path a mesh target's stream must take for its measurement to count, and where to read
/// the proof: a counter on the consumer's relay that rises only on that path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshCheck {
    /// The metrics listener of the relay the consumer agent is connected to.
    pub relay_metrics: SocketAddr,
    /// The path.
    pub via: MeshVia,
}

/// See [`MeshCheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshVia {
    /// Relay 1 forwards the stream to relay 2 (`outrelay_relay_forward_streams_total` rises
    /// by one per stream).
    Forward,
    /// The agents reach the relay over the TCP/443 fallback
    /// (`outrelay_relay_fallback_packets_total` rises with every QUIC packet tunnelled).
    Fallback,
}

/// [`MeshCheck::read`]: the counter that must rise, and the relay's fallback tunnel drops
/// (queue full: QUIC's loss signal on the fallback; 0 on the forwarded path).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeshCounters {
    /// The path's counter ([`MeshVia`]).
    pub path: f64,
    /// `outrelay_relay_fallback_packets_dropped_total`, all reasons.
    pub tunnel_drops: f64,
}

impl MeshCheck {
    /// The counter [`MeshVia`] names.
    pub fn counter(self) -> &'static str {
        match self.via {
            MeshVia::Forward => "outrelay_relay_forward_streams_total",
            MeshVia::Fallback => "outrelay_relay_fallback_packets_total",
        }
    }

    /// Reads the relay's counters now (a missing metric reads 0: nothing counted yet).
    pub fn read(self) -> Result<MeshCounters> {
        let body = crate::prom::scrape(self.relay_metrics)
            .with_context(|| format!("scraping the relay's metrics on {}", self.relay_metrics))?;
        Ok(MeshCounters {
            path: crate::prom::metric_sum(&body, self.counter()).unwrap_or(0.0),
            tunnel_drops: crate::prom::metric_sum(
                &body,
                "outrelay_relay_fallback_packets_dropped_total",
            )
            .unwrap_or(0.0),
        })
    }

    /// Errors unless the path's counter rose from `before` to `after` (the stream measured
    /// in between took the path).
    pub fn verify(self, before: MeshCounters, after: MeshCounters) -> Result<()> {
        if after.path > before.path {
            return Ok(());
        }
        bail!(
            "{} did not rise ({} -> {}): the measured stream did not take the {} path",
            self.counter(),
            before.path,
            after.path,
            match self.via {
                MeshVia::Forward => "forwarded",
                MeshVia::Fallback => "TCP fallback",
            }
        )
    }
}

/// How the upgrade scenario hands a started target over to a new process
/// ([`Routing::Upgrade`]).
#[derive(Debug, Clone)]
pub enum UpgradeEnds {
    /// OutRelay: `outrelay-relay upgrade --admin-socket <admin_socket>`; the new relay runs as
    /// the old one's child (same process group), the admin socket path moves to it.
    Outrelay {
        /// The `outrelay-relay` binary (its `upgrade` subcommand).
        relay_bin: PathBuf,
        /// The relay's admin socket (`status`: `drain.agents`).
        admin_socket: PathBuf,
        /// The relay process before the upgrade.
        relay_pid: u32,
        /// Agents connected to the relay (all must be on the new process).
        agents: u64,
        /// The UDP lease's port on the relay (echoed by the agent's UDP target).
        udp_front: SocketAddr,
    },
    /// HAProxy master-worker (`-W -S <master_socket>`, `stats socket … expose-fd listeners`):
    /// `kill -USR2 <master_pid>`, the new worker takes the listeners (seamless reload).
    HaproxyMaster {
        /// The master CLI socket (`show proc`).
        master_socket: PathBuf,
        /// The master process (its pid survives the reload: it re-executes itself).
        master_pid: u32,
    },
    /// HAProxy's classic reload: a new `haproxy -db -f <config> -sf <pid>` binds its own
    /// listeners (SO_REUSEPORT) and tells the old process to stop listening and finish.
    HaproxyClassic {
        /// The haproxy binary.
        binary: PathBuf,
        /// The config file both processes run.
        config: PathBuf,
        /// The process serving now.
        pid: u32,
        /// How the target's processes are launched (pinning).
        launch: Launch,
        /// The target's directory (logs of the new process).
        dir: PathBuf,
    },
}

/// Where the leases scenario's driver asks for leases ([`Routing::Leases`]) and what it
/// measures.
#[derive(Debug, Clone)]
pub struct LeaseEnds {
    /// The relay process (fds and RSS are read from it).
    pub relay_pid: u32,
    /// The relay's QUIC (agent) address.
    pub relay_quic: SocketAddr,
    /// The dev PKI directory (`agent-1.pem` is the driver's identity).
    pub pki: PathBuf,
    /// The lease range, first and last port.
    pub ports: (u16, u16),
    /// The address lease ports are served on.
    pub bind_ip: std::net::IpAddr,
    /// The relay's `[ingress] lease_sync_interval_ms`: how often plain listeners are bound.
    pub lease_sync_interval_ms: u64,
    /// Whether the range is open to UDP leases too (the driver then asks for both).
    pub udp: bool,
}

/// Where the abuse scenario's attackers and legitimate clients connect (outrelay's
/// [`Routing::Abuse`] topology), and which processes' memory it samples.
#[derive(Debug, Clone)]
pub struct AbuseEnds {
    /// The `outrelay` CLI binary.
    pub cli: PathBuf,
    /// The relay process (its RSS is the scenario's memory figure).
    pub relay_pid: u32,
    /// The controller process.
    pub controller_pid: u32,
    /// The relay's Prometheus endpoint (`/metrics`).
    pub relay_metrics: SocketAddr,
    /// The relay's QUIC (agent) address.
    pub relay_quic: SocketAddr,
    /// The relay's public TLS listener (`:443`): the SNI path, the root host.
    pub public_tls: SocketAddr,
    /// The attacked TCP lease's port (`bulk`, in front of the flood backend).
    pub bulk_front: SocketAddr,
    /// The relay's root host (its own name on the public listener).
    pub root_host: &'static str,
    /// The controller's gRPC (mTLS) address.
    pub controller_grpc: SocketAddr,
    /// The dev PKI directory (`outrelay dev-pki`): `ca.pem`, `admin.pem`, `agent-2.pem`, ….
    pub pki: PathBuf,
    /// Agent identity URI of `agent-2.pem` (the QUIC attacker's certificate).
    pub attacker_uri: String,
    /// The relay's `[ingress] pending_conn_max` in this topology (scaled down to the box).
    pub pending_conn_max: usize,
}

impl RunningTarget {
    /// A target whose `processes` all count as the relay.
    pub fn new(front: SocketAddr, sni_routed: bool, processes: Vec<OwnedProcess>) -> Self {
        Self {
            front,
            sni_routed,
            delivered: None,
            processes,
            helpers: Vec::new(),
            abuse: None,
            leases: None,
            upgrade: None,
            retired: Vec::new(),
            support: Vec::new(),
            mesh_check: None,
            failover: None,
        }
    }

    /// Adds `process` to the processes that are checked for being alive but never measured
    /// (neither relay nor helper: a controller).
    pub fn add_support(&mut self, process: OwnedProcess) {
        self.support.push(process);
    }

    /// Moves the relay process `pid` out of the measured and checked processes (it exits by
    /// itself after a hand-over); it is still stopped, with its process group, on drop.
    pub fn retire(&mut self, pid: u32) {
        if let Some(i) = self.processes.iter().position(|p| p.pid() == pid) {
            self.retired.push(self.processes.remove(i));
        }
    }

    /// Adds `process` (the new relay of a hand-over) to the relay's processes.
    pub fn adopt(&mut self, process: OwnedProcess) {
        self.processes.push(process);
    }

    /// A target with no processes of its own (the direct path).
    pub fn without_processes(front: SocketAddr) -> Self {
        Self::new(front, false, Vec::new())
    }

    /// The leaders of the helper processes' trees (not the relay; see [`Self::relay_roots`]).
    pub fn helper_roots(&self) -> Vec<u32> {
        self.helpers.iter().map(OwnedProcess::pid).collect()
    }

    /// The leaders of the relay's process trees (pass to the `tree_*` functions).
    pub fn relay_roots(&self) -> Vec<u32> {
        self.processes.iter().map(OwnedProcess::pid).collect()
    }

    /// `kill -9` of relay process `i` (its group), reaped; it stays in place, dead, until
    /// [`Self::replace_relay`].
    pub fn kill9_relay(&mut self, i: usize) -> Result<()> {
        self.processes
            .get_mut(i)
            .with_context(|| format!("no relay process {i}"))?
            .kill9();
        Ok(())
    }

    /// SIGTERM to relay process `i` (OutRelay: GOAWAY to its agents, then a drain); it stays
    /// in place until [`Self::wait_relay_exit`] and [`Self::replace_relay`].
    pub fn terminate_relay(&self, i: usize) -> Result<()> {
        self.processes
            .get(i)
            .with_context(|| format!("no relay process {i}"))?
            .terminate();
        Ok(())
    }

    /// Waits up to `timeout` for relay process `i` to exit (killed after it, with an error).
    pub fn wait_relay_exit(&mut self, i: usize, timeout: Duration) -> Result<()> {
        self.processes
            .get_mut(i)
            .with_context(|| format!("no relay process {i}"))?
            .wait_timeout(timeout)?;
        Ok(())
    }

    /// Puts `process` (a relay started again) in place of relay process `i`.
    pub fn replace_relay(&mut self, i: usize, process: OwnedProcess) -> Result<()> {
        let slot = self
            .processes
            .get_mut(i)
            .with_context(|| format!("no relay process {i}"))?;
        *slot = process;
        Ok(())
    }

    /// Whether the target has relay processes to measure.
    pub fn has_relay(&self) -> bool {
        !self.processes.is_empty()
    }

    /// Errors if any relay or helper process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.processes
            .iter_mut()
            .chain(self.helpers.iter_mut())
            .chain(self.support.iter_mut())
            .try_for_each(OwnedProcess::ensure_running)
    }
}

/// Every target the harness knows, in report order.
pub fn all() -> Vec<Box<dyn Target>> {
    vec![
        Box::new(direct::Direct),
        Box::new(haproxy::Haproxy {
            hops: 1,
            classic: false,
        }),
        Box::new(haproxy::Haproxy {
            hops: 2,
            classic: false,
        }),
        Box::new(haproxy::Haproxy {
            hops: 1,
            classic: true,
        }),
        Box::new(nginx::Nginx),
        Box::new(rathole::Rathole),
        Box::new(socat::Socat),
        Box::new(engine::Engine {
            backend: "io_uring",
        }),
        Box::new(engine::Engine { backend: "epoll" }),
        Box::new(outrelay::Outrelay {
            base: false,
            path: MeshPath::Single,
        }),
        Box::new(outrelay::Outrelay {
            base: true,
            path: MeshPath::Single,
        }),
        Box::new(outrelay::Outrelay {
            base: false,
            path: MeshPath::Forward,
        }),
        Box::new(outrelay::Outrelay {
            base: false,
            path: MeshPath::Fallback,
        }),
        Box::new(quinn_direct::QuinnDirect { paced: false }),
        Box::new(quinn_direct::QuinnDirect { paced: true }),
    ]
}

/// The targets named in `names`, in the order given; errors on an unknown name.
pub fn by_names(names: &[String]) -> Result<Vec<Box<dyn Target>>> {
    let mut known = all();
    let mut chosen = Vec::new();
    for name in names {
        let Some(i) = known.iter().position(|t| t.name() == name) else {
            let valid: Vec<&str> = all().iter().map(|t| t.name()).collect();
            bail!("unknown target {name:?}; known: {}", valid.join(", "));
        };
        chosen.push(known.remove(i));
    }
    Ok(chosen)
}

/// A loopback address with a port the kernel just reported free. The port is released before
/// the peer binds it, so another process could take it in between; with ports from the
/// kernel's ephemeral range that race is rare, and a lost race fails the start loudly.
pub fn free_loopback_addr() -> Result<SocketAddr> {
    let probe = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    probe.local_addr().context("reading probe address")
}

/// A loopback address with a UDP port the kernel just reported free (same race as
/// [`free_loopback_addr`]).
pub fn free_loopback_udp_addr() -> Result<SocketAddr> {
    let probe = UdpSocket::bind("127.0.0.1:0").context("binding UDP 127.0.0.1:0")?;
    probe.local_addr().context("reading probe address")
}

/// Waits until every address in `addrs` has a bound UDP socket (`/proc/net/udp`), without
/// sending to it. A bound port says the socket exists, not that the path behind it is up: the
/// UDP scenario also waits for a first datagram to come through.
pub fn wait_udp_bound(addrs: &[SocketAddr], processes: &mut [OwnedProcess]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    loop {
        for p in processes.iter_mut() {
            p.ensure_running()?;
        }
        let bound = proc_stats::bound_udp_loopback_ports()?;
        if addrs.iter().all(|a| bound.contains(&a.port())) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let tails: Vec<String> = processes.iter().map(OwnedProcess::log_tail).collect();
            bail!(
                "no UDP socket bound on {addrs:?} after {READY_TIMEOUT_MS} ms; logs:\n{}",
                tails.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every address in `addrs` has a listening socket, without connecting to it (a
/// stray connection would confuse iperf3 and count in the peers' statistics).
pub fn wait_listening(addrs: &[SocketAddr], processes: &mut [OwnedProcess]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    loop {
        for p in processes.iter_mut() {
            p.ensure_running()?;
        }
        let listening = proc_stats::listening_loopback_ports()?;
        if addrs.iter().all(|a| listening.contains(&a.port())) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let tails: Vec<String> = processes.iter().map(OwnedProcess::log_tail).collect();
            bail!(
                "not listening on {addrs:?} after {READY_TIMEOUT_MS} ms; logs:\n{}",
                tails.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The JSON of a daemon's `--ready-file`, once written (waits up to `timeout_ms`, failing
/// early with the logs if a process exits).
pub fn wait_ready(
    path: &Path,
    processes: &mut [OwnedProcess],
    timeout_ms: u64,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        for p in processes.iter_mut() {
            p.ensure_running()?;
        }
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            let tails: Vec<String> = processes.iter().map(OwnedProcess::log_tail).collect();
            bail!(
                "{} not written after {timeout_ms} ms; logs:\n{}",
                path.display(),
                tails.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A template's file name, its text and example values for its placeholders.
#[cfg(test)]
pub type TemplateExample = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

/// Every template with example values, for the test that renders them all.
#[cfg(test)]
pub fn template_examples() -> Vec<TemplateExample> {
    let mut all = haproxy::template_examples();
    all.extend(nginx::template_examples());
    all.extend(rathole::template_examples());
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_resolve() {
        let names: Vec<String> = all().iter().map(|t| t.name().to_owned()).collect();
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len());
        let chosen = by_names(&names).expect("all known names resolve");
        assert_eq!(chosen.len(), names.len());
        assert!(by_names(&["nope".to_owned()]).is_err());
    }

    #[test]
    fn outrelay_names_what_to_build_when_missing() {
        let t = by_names(&["outrelay".to_owned()]).expect("known target");
        if let Availability::NotAvailable(why) = t[0].availability() {
            assert!(why.contains("cargo build --release"), "{why}");
        }
    }

    #[test]
    fn quinn_direct_runs_the_mesh_only_and_the_tcp_peers_never_do() {
        const MESH: Routing = Routing::Mesh { pace_mbps: 0 };
        let t = by_names(&[
            "quinn-direct".to_owned(),
            "outrelay".to_owned(),
            "haproxy".to_owned(),
            "direct".to_owned(),
        ])
        .expect("known targets");
        assert!(t[0].supports(MESH));
        assert!(!t[0].supports(Routing::Tcp) && !t[0].supports(Routing::Udp));
        assert!(t[1].supports(MESH) && t[1].supports(Routing::Udp));
        assert!(!t[2].supports(MESH) && !t[2].supports(Routing::Udp));
        assert!(t[3].supports(MESH));
        let dir = tempfile::tempdir().expect("temp dir");
        let backend: SocketAddr = "127.0.0.1:9".parse().expect("literal address");
        assert!(
            t[0].start(backend, Routing::Tcp, dir.path(), &Launch::default())
                .is_err()
        );
    }

    #[test]
    fn the_issue_22_targets_run_the_mesh_only_and_need_their_binaries() {
        const MESH: Routing = Routing::Mesh { pace_mbps: 0 };
        let t =
            by_names(&["mesh-forward".to_owned(), "fallback".to_owned()]).expect("known targets");
        for target in &t {
            assert!(target.supports(MESH), "{}", target.name());
            assert!(
                !target.supports(Routing::Tcp)
                    && !target.supports(Routing::Udp)
                    && !target.supports(Routing::Sni("demo.outrelay.test")),
                "{}",
                target.name()
            );
            assert!(target.takes_relay_workers() && !target.routes_sni());
        }
        // The forwarded mesh also needs the controller, and says how to build it.
        if let Availability::NotAvailable(why) = t[0].availability() {
            assert!(why.contains("cargo build --release"), "{why}");
        }
    }

    #[test]
    fn a_mesh_check_passes_only_when_its_counter_rose() {
        let check = MeshCheck {
            relay_metrics: "127.0.0.1:9".parse().expect("literal address"),
            via: MeshVia::Forward,
        };
        let at = |path| MeshCounters {
            path,
            tunnel_drops: 0.0,
        };
        assert!(check.verify(at(3.0), at(4.0)).is_ok());
        let err = check
            .verify(at(4.0), at(4.0))
            .expect_err("no forwarded stream");
        assert!(
            err.to_string()
                .contains("outrelay_relay_forward_streams_total"),
            "{err}"
        );
        let fallback = MeshCheck {
            via: MeshVia::Fallback,
            ..check
        };
        assert_eq!(fallback.counter(), "outrelay_relay_fallback_packets_total");
        assert!(fallback.verify(at(0.0), at(0.0)).is_err());
        // Nothing listens on the discard port: reading fails instead of reading 0.
        assert!(check.read().is_err());
    }

    #[test]
    fn only_outrelay_and_one_hop_haproxy_are_handed_over_and_classic_does_nothing_else() {
        let upgrade = Routing::Upgrade {
            sni: Some("demo.outrelay.test"),
            udp_echo: "127.0.0.1:9".parse().expect("literal address"),
        };
        let t = by_names(
            &[
                "outrelay",
                "haproxy",
                "haproxy-classic",
                "haproxy-chain",
                "direct",
                "nginx",
            ]
            .map(str::to_owned),
        )
        .expect("known targets");
        let supports: Vec<bool> = t.iter().map(|t| t.supports(upgrade)).collect();
        assert_eq!(supports, [true, true, true, false, false, false]);
        // haproxy-classic exists for the reload only; the others keep their TCP and SNI paths.
        assert!(!t[2].supports(Routing::Tcp) && !t[2].supports(Routing::Sni("x")));
        assert!(t[1].supports(Routing::Tcp) && t[3].supports(Routing::Sni("x")));
        assert_eq!(upgrade.path_label(), "sni");
        let tcp = Routing::Upgrade {
            sni: None,
            udp_echo: "127.0.0.1:9".parse().expect("literal address"),
        };
        assert_eq!(tcp.path_label(), "tcp");
    }

    #[test]
    fn direct_front_is_the_backend_and_has_no_relay() {
        let backend: SocketAddr = "127.0.0.1:9".parse().expect("literal address");
        let dir = tempfile::tempdir().expect("temp dir");
        let t = by_names(&["direct".to_owned()]).expect("known target");
        let running = t[0]
            .start(backend, Routing::Tcp, dir.path(), &Launch::default())
            .expect("direct always starts");
        assert_eq!(running.front, backend);
        assert!(!running.has_relay());
        assert!(running.relay_roots().is_empty());
    }

    #[test]
    fn a_pinned_launch_runs_the_program_itself_on_the_given_cpus() {
        let Some(taskset) = crate::peers::find_binary("taskset") else {
            eprintln!("SKIP a_pinned_launch_runs_the_program_itself_on_the_given_cpus: no taskset");
            return;
        };
        let sleep = crate::peers::find_binary("sleep").expect("coreutils sleep");
        // The last CPU this process may use: on a 1-CPU box that is the only one.
        let now = CpuList::current().expect("sched_getaffinity");
        let last: CpuList = now
            .to_string()
            .rsplit([',', '-'])
            .next()
            .expect("non-empty list")
            .parse()
            .expect("one CPU");
        let launch = Launch {
            pin: Some((taskset, last.clone())),
            ..Launch::default()
        };
        let (program, args) = launch.command(&sleep, &["5".to_owned()]);
        assert!(program.ends_with("taskset"), "{}", program.display());
        assert_eq!(args[..2], ["-c".to_owned(), last.to_string()]);
        let dir = tempfile::tempdir().expect("temp dir");
        let child = launch
            .spawn("sleeper", &sleep, &["5".to_owned()], dir.path())
            .expect("spawns");
        let pid = child.pid();
        // taskset execs the program: wait until the pid is `sleep`, then read its affinity.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                break;
            }
            assert!(Instant::now() < deadline, "pid {pid} is still {comm:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim();
        assert_eq!(allowed, last.to_string());
        // Unpinned: the program as given.
        let (program, args) = Launch::default().command(&sleep, &["5".to_owned()]);
        assert_eq!((program, args), (sleep, vec!["5".to_owned()]));
    }
}
