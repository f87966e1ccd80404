//! The agent's configuration: TOML read into raw structs, converted ONCE into validated
//! [`Settings`] before any socket is opened. Every timeout and interval is a config value (at
//! least [`MIN_DURATION_MS`]) so end-to-end tests can use short ones. `expose` builds the same
//! [`Settings`] from flags ([`Settings::from_expose`]).
//!
//! ```toml
//! relays = ["relay.example.com:7443"]   # QUIC addresses or names, one or more (candidates)
//! ha_connections = 2                    # distinct relays held at once (each gets every lease)
//! server_name = "localhost"             # name checked in the relay certificate
//! reverse_allow = ["relay2.example.com:8443"]   # reverse addresses a grant may name besides
//!                                       # the relay's own dialled host (default: none)
//! [identity]  cert = "agent.pem"  key = "agent-key.pem"  ca = "ca.pem"   # relative to this file
//! #           or: state_dir = "/var/lib/outrelay-agent" (cert.pem, key.pem, ca.pem inside: the layout of outrelay_client::store)
//! #               controller = "https://controller:7444" (renewal at 70 % of the certificate's
//! #               life; default: the `controller` file `outrelay-agent enroll` wrote there)
//! [[lease]]   name = "demo"  tls_to = "127.0.0.1:8443"  tcp_to = "127.0.0.1:9000"
//!             udp_to = "127.0.0.1:5353"  wildcard = false  ttl_s = 30
//! [udp]       flow_idle_ms = 30000  flow_max = 1024   # per UDP lease: one local socket per flow
//! [metrics]   listen = "127.0.0.1:7462"        # "" = off (also turns off /status)
//! [pool]      idle = 2  max = 8  dead_session_ms = 30000  connect_timeout_ms = 5000
//!             handshake_timeout_ms = 5000  growth_window_ms = 1000
//!             retry_initial_ms = 100  retry_max_ms = 5000
//! [connection] keepalive_ms = 3000  idle_timeout_ms = 10000  ping_interval_ms = 1000
//!             hello_timeout_ms = 10000  reconnect_initial_ms = 1000  reconnect_max_ms = 30000
//!             renew_ms = 0 (0 = half the granted TTL)  release_timeout_ms = 2000
//! [local]     connect_timeout_ms = 5000  failure_log_interval_ms = 10000
//! [splice]    workers = 2  io_backend = "auto"  idle_timeout_ms = 3600000
//!             half_closed_timeout_ms = 60000  stall_timeout_ms = 2000
//!             write_stall_timeout_ms = 30000  pipe_budget_bytes = 50331648
//!             max_pipe_bytes = 1048576  copy_budget_bytes = 4194304
//!             copy_buffer_bytes = 16384  spill_budget_bytes = 8388608   # budgets: whole agent
//! [[provide]] service = "payments"  to = "127.0.0.1:8080"       # `to`: the default target
//!             methods = { charge = "127.0.0.1:8081" }           # per-method targets
//! [[consume]] service = "payments"  listen = "127.0.0.1:18080"  method = ""   # port 0 allowed
//! [mesh]      open_timeout_ms = 10000  dial_timeout_ms = 5000
//! [fallback]  mode = "auto"  quic_timeout_ms = 3000  connect_timeout_ms = 5000
//!             quic_retry_initial_ms = 5000  quic_retry_max_ms = 60000  server_name = ""
//!             queue_bytes = 1048576  addrs = { "relay.example.com:7443" = "relay.example.com:443" }
//!             # TCP/443 fallback when UDP is blocked (ORP over QUIC over TLS/TCP); an addrs
//!             # value may be a list, tried in order (default: host:443, then host:7443)
//! [resume]    enabled = true  ring_bytes = 16777216  checkpoint_interval_ms = 100
//!             timeout_ms = 60000   # service streams survive a relay restart (orp.md "Resume")
//! ```
//! At least one `[[lease]]`, `[[provide]]` or `[[consume]]` is required.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outrelay_io::{Backend, BufferLimits, EngineConfig, PipeLimits};
use serde::Deserialize;

/// Shortest accepted duration for any timeout or interval.
pub const MIN_DURATION_MS: u64 = 100;
/// The default agent metrics / status listener (product.md).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7462";
/// Certificate file name inside a state directory.
pub const STATE_CERT_FILE: &str = "cert.pem";
/// Private key file name inside a state directory.
pub const STATE_KEY_FILE: &str = "key.pem";
/// CA bundle file name inside a state directory.
pub const STATE_CA_FILE: &str = "ca.pem";
/// In a state directory: the controller URL `outrelay-agent enroll` used (for renewal).
pub const STATE_CONTROLLER_FILE: &str = "controller";
/// Default lease TTL asked for (public-ingress.md).
pub const DEFAULT_LEASE_TTL_S: u32 = 30;
/// Largest pool a lease may grow to (the relay's ready queue caps idle sessions anyway).
pub const POOL_MAX_LIMIT: usize = 1024;
/// Most `[[provide]]` (and, separately, `[[consume]]`) entries.
pub const MESH_ENTRIES_MAX: usize = 256;
/// Longest method name, in bytes.
pub const METHOD_MAX_BYTES: usize = 255;

/// Why a configuration was refused: one line naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Default of `ha_connections`: relays held at once.
pub const DEFAULT_HA_CONNECTIONS: usize = 2;
/// Largest `ha_connections`.
pub const MAX_HA_CONNECTIONS: usize = 16;

fn bad(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("invalid config: {key}: {why}"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    relays: Vec<String>,
    ha_connections: u64,
    server_name: String,
    reverse_allow: Vec<String>,
    identity: RawIdentity,
    lease: Vec<RawLease>,
    metrics: RawMetrics,
    pool: RawPool,
    connection: RawConnection,
    local: RawLocal,
    splice: RawSplice,
    udp: RawUdp,
    lifecycle: outrelay_lifecycle::RawLifecycle,
    provide: Vec<RawProvide>,
    consume: Vec<RawConsume>,
    mesh: RawMesh,
    resume: RawResume,
    fallback: RawFallback,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawFallback {
    mode: String,
    quic_timeout_ms: u64,
    connect_timeout_ms: u64,
    quic_retry_initial_ms: u64,
    quic_retry_max_ms: u64,
    server_name: String,
    queue_bytes: usize,
    addrs: BTreeMap<String, RawAddrs>,
}

/// One TCP address, or several tried in order (`[fallback] addrs` values).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAddrs {
    One(String),
    Many(Vec<String>),
}

impl Default for RawFallback {
    fn default() -> Self {
        let d = FallbackConfig::default();
        RawFallback {
            mode: "auto".into(),
            quic_timeout_ms: ms(d.quic_timeout),
            connect_timeout_ms: ms(d.connect_timeout),
            quic_retry_initial_ms: ms(d.quic_retry_initial),
            quic_retry_max_ms: ms(d.quic_retry_max),
            server_name: String::new(),
            queue_bytes: d.queue_bytes,
            addrs: BTreeMap::new(),
        }
    }
}

/// When the agent carries its QUIC connection inside TLS on TCP (`[fallback] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FallbackMode {
    /// QUIC first; the TCP fallback when QUIC does not connect within `quic_timeout`, and back
    /// to QUIC when a background attempt succeeds.
    #[default]
    Auto,
    /// QUIC only.
    Off,
    /// The TCP fallback only.
    Only,
}

/// The TCP/443 fallback (issue 22): ORP over QUIC over mutual TLS on TCP (ALPN `orp/1`).
#[derive(Debug, Clone)]
pub struct FallbackConfig {
    /// auto, off or only.
    pub mode: FallbackMode,
    /// How long QUIC may take to connect before the fallback is tried (auto).
    pub quic_timeout: Duration,
    /// TCP connect plus TLS handshake of the tunnel.
    pub connect_timeout: Duration,
    /// First delay of the background QUIC attempts while on the fallback (doubles).
    pub quic_retry_initial: Duration,
    /// Longest delay between background QUIC attempts.
    pub quic_retry_max: Duration,
    /// SNI of the tunnel (the relay's root host); `None`: the relay address's host, or the
    /// top-level `server_name` when that host is an IP literal.
    pub server_name: Option<String>,
    /// Bound of the tunnel's send queue; a packet that does not fit is dropped (counted).
    pub queue_bytes: usize,
    /// Relay address (as in `relays`) → TCP addresses tried in order (its public TLS port,
    /// then its reverse-session port, which also accepts the tunnel); unlisted relays: the
    /// relay address's host with port 443, then 7443.
    pub addrs: BTreeMap<String, Vec<String>>,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        FallbackConfig {
            mode: FallbackMode::Auto,
            quic_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(5),
            quic_retry_initial: Duration::from_secs(5),
            quic_retry_max: Duration::from_secs(60),
            server_name: None,
            queue_bytes: 1024 * 1024,
            addrs: BTreeMap::new(),
        }
    }
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            relays: Vec::new(),
            ha_connections: DEFAULT_HA_CONNECTIONS as u64,
            server_name: "localhost".into(),
            reverse_allow: Vec::new(),
            identity: RawIdentity::default(),
            lease: Vec::new(),
            metrics: RawMetrics::default(),
            pool: RawPool::default(),
            connection: RawConnection::default(),
            local: RawLocal::default(),
            splice: RawSplice::default(),
            udp: RawUdp::default(),
            lifecycle: outrelay_lifecycle::RawLifecycle::default(),
            provide: Vec::new(),
            consume: Vec::new(),
            mesh: RawMesh::default(),
            resume: RawResume::default(),
            fallback: RawFallback::default(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawIdentity {
    cert: String,
    key: String,
    ca: String,
    state_dir: String,
    controller: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLease {
    name: String,
    #[serde(default)]
    tls_to: String,
    #[serde(default)]
    tcp_to: String,
    #[serde(default)]
    udp_to: String,
    #[serde(default)]
    wildcard: bool,
    #[serde(default = "default_ttl")]
    ttl_s: u32,
    #[serde(default)]
    proxy_protocol: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvide {
    service: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    methods: BTreeMap<String, String>,
    #[serde(default)]
    proxy_protocol: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsume {
    service: String,
    listen: String,
    #[serde(default)]
    method: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMesh {
    open_timeout_ms: u64,
    dial_timeout_ms: u64,
}

impl Default for RawMesh {
    fn default() -> Self {
        let d = MeshConfig::default();
        RawMesh {
            open_timeout_ms: ms(d.open_timeout),
            dial_timeout_ms: ms(d.dial_timeout),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawResume {
    enabled: bool,
    ring_bytes: usize,
    checkpoint_interval_ms: u64,
    timeout_ms: u64,
}

impl Default for RawResume {
    fn default() -> Self {
        let d = ResumeConfig::default();
        RawResume {
            enabled: d.enabled,
            ring_bytes: d.ring_bytes,
            checkpoint_interval_ms: ms(d.checkpoint_interval),
            timeout_ms: ms(d.timeout),
        }
    }
}

fn default_ttl() -> u32 {
    DEFAULT_LEASE_TTL_S
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUdp {
    flow_idle_ms: u64,
    flow_max: usize,
}

impl Default for RawUdp {
    fn default() -> Self {
        let d = UdpConfig::default();
        RawUdp {
            flow_idle_ms: u64::try_from(d.flow_idle.as_millis()).unwrap_or(u64::MAX),
            flow_max: d.flow_max,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMetrics {
    listen: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            listen: DEFAULT_METRICS_LISTEN.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPool {
    idle: usize,
    max: usize,
    dead_session_ms: u64,
    connect_timeout_ms: u64,
    handshake_timeout_ms: u64,
    growth_window_ms: u64,
    retry_initial_ms: u64,
    retry_max_ms: u64,
}

impl Default for RawPool {
    fn default() -> Self {
        let d = PoolConfig::default();
        RawPool {
            idle: d.idle,
            max: d.max,
            dead_session_ms: ms(d.dead_session),
            connect_timeout_ms: ms(d.connect_timeout),
            handshake_timeout_ms: ms(d.handshake_timeout),
            growth_window_ms: ms(d.growth_window),
            retry_initial_ms: ms(d.retry_initial),
            retry_max_ms: ms(d.retry_max),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConnection {
    keepalive_ms: u64,
    idle_timeout_ms: u64,
    ping_interval_ms: u64,
    hello_timeout_ms: u64,
    reconnect_initial_ms: u64,
    reconnect_max_ms: u64,
    renew_ms: u64,
    release_timeout_ms: u64,
}

impl Default for RawConnection {
    fn default() -> Self {
        let d = ConnectionConfig::default();
        RawConnection {
            keepalive_ms: ms(d.keepalive),
            idle_timeout_ms: ms(d.idle_timeout),
            ping_interval_ms: ms(d.ping_interval),
            hello_timeout_ms: ms(d.hello_timeout),
            reconnect_initial_ms: ms(d.reconnect_initial),
            reconnect_max_ms: ms(d.reconnect_max),
            renew_ms: d.renew.map_or(0, ms),
            release_timeout_ms: ms(d.release_timeout),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLocal {
    connect_timeout_ms: u64,
    failure_log_interval_ms: u64,
}

impl Default for RawLocal {
    fn default() -> Self {
        let d = LocalConfig::default();
        RawLocal {
            connect_timeout_ms: ms(d.connect_timeout),
            failure_log_interval_ms: ms(d.failure_log_interval),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSplice {
    workers: usize,
    io_backend: String,
    idle_timeout_ms: u64,
    half_closed_timeout_ms: u64,
    stall_timeout_ms: u64,
    write_stall_timeout_ms: u64,
    pipe_budget_bytes: usize,
    max_pipe_bytes: usize,
    copy_budget_bytes: usize,
    copy_buffer_bytes: usize,
    spill_budget_bytes: usize,
}

impl Default for RawSplice {
    fn default() -> Self {
        let p = PipeLimits::default();
        let b = BufferLimits::default();
        RawSplice {
            // Two: a thread splicing is not also the one a session's next set-up step waits for
            // (measured: one core, 32 clients, 6.4k conn/s with 1, 7.7k with 2).
            workers: 2,
            io_backend: "auto".into(),
            idle_timeout_ms: 3_600_000,
            half_closed_timeout_ms: 60_000,
            stall_timeout_ms: 2_000,
            write_stall_timeout_ms: 30_000,
            pipe_budget_bytes: p.budget_bytes,
            max_pipe_bytes: p.max_pipe_bytes,
            copy_budget_bytes: b.copy_budget_bytes,
            copy_buffer_bytes: b.copy_buffer_bytes,
            spill_budget_bytes: b.spill_budget_bytes,
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where the agent's certificate, key and CA bundle are read from.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    /// Certificate chain (PEM), leaf first; the leaf carries the agent URI SAN.
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// Controller CA bundle (PEM) the relay certificate must chain to.
    pub ca: PathBuf,
}

impl IdentityFiles {
    /// The files of a state directory ([`STATE_CERT_FILE`], [`STATE_KEY_FILE`],
    /// [`STATE_CA_FILE`]).
    pub fn in_state_dir(dir: &Path) -> IdentityFiles {
        IdentityFiles {
            cert: dir.join(STATE_CERT_FILE),
            key: dir.join(STATE_KEY_FILE),
            ca: dir.join(STATE_CA_FILE),
        }
    }
}

/// One lease to hold on every relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSpec {
    /// The lease name (one DNS label; the relay normalises and checks it).
    pub name: String,
    /// Local TLS server for SNI passthrough claims (marker 0x02); `None`: no `tls` exposure.
    pub tls_to: Option<String>,
    /// Local TCP server for TCP-port claims (marker 0x01); `None`: no `tcp` exposure.
    pub tcp_to: Option<String>,
    /// Local UDP service for the lease's UDP port; `None`: no `udp` exposure.
    pub udp_to: Option<String>,
    /// Also route `*.<name>.<root_host>`.
    pub wildcard: bool,
    /// TTL asked for, in seconds.
    pub ttl_s: u32,
    /// PROXY protocol header written to the local target before the client's first byte
    /// (`proxy_protocol`); the agent then asks the relay for the client's addresses.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// The PROXY protocol version written to a local service (`proxy_protocol = "v1" | "v2"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// The text header (`PROXY TCP4 ...\r\n`; `PROXY UNKNOWN` without addresses). TCP only.
    V1,
    /// The binary header (addresses, TLVs; DGRAM for UDP).
    V2,
}

impl ProxyProtocol {
    /// Parses `"v1"`, `"v2"`; `""` is off.
    ///
    /// # Errors
    /// Any other value, naming `key`.
    pub fn parse(key: &str, v: &str) -> Result<Option<ProxyProtocol>, ConfigError> {
        match v {
            "" => Ok(None),
            "v1" => Ok(Some(ProxyProtocol::V1)),
            "v2" => Ok(Some(ProxyProtocol::V2)),
            other => Err(bad(key, format!("{other:?}: want \"v1\" or \"v2\""))),
        }
    }
}

/// The reverse-session pool of each lease.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Idle sessions kept open when no claims arrive.
    pub idle: usize,
    /// Most sessions (idle + connecting) the pool grows to with the claim rate.
    pub max: usize,
    /// An idle session with no byte for this long is dead (relay keep-alives come every 15 s).
    pub dead_session: Duration,
    /// TCP connect timeout to the relay's reverse address.
    pub connect_timeout: Duration,
    /// Deadline for the relay's nonce after the preamble.
    pub handshake_timeout: Duration,
    /// Claims within this window raise the pool's target above `idle`.
    pub growth_window: Duration,
    /// First delay before reopening after a failed session (doubles to `retry_max`).
    pub retry_initial: Duration,
    /// Longest delay between failed session attempts.
    pub retry_max: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            idle: 2,
            max: 8,
            dead_session: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            growth_window: Duration::from_secs(1),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// The QUIC connection to each relay.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// QUIC keep-alive interval.
    pub keepalive: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// ORP PING interval on the control stream. A connection with no frame for 3 intervals
    /// is dropped and redialled: this, not the QUIC idle timeout, is what notices a relay
    /// that restarted without sending a stateless reset (default 1 s, so about 3 s).
    pub ping_interval: Duration,
    /// Deadline for the QUIC handshake plus HELLO_ACK.
    pub hello_timeout: Duration,
    /// First reconnect delay (doubles, with jitter, to `reconnect_max`).
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Fixed renew interval; `None`: half the granted TTL.
    pub renew: Option<Duration>,
    /// How long a stopping agent waits for its LEASE_RELEASE answers.
    pub release_timeout: Duration,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            keepalive: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(1),
            hello_timeout: Duration::from_secs(10),
            reconnect_initial: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(30),
            renew: None,
            release_timeout: Duration::from_secs(2),
        }
    }
}

/// Connections to local targets.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Connect timeout to a local target.
    pub connect_timeout: Duration,
    /// At most one log line per lease per this interval for local connect failures.
    pub failure_log_interval: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            connect_timeout: Duration::from_secs(5),
            failure_log_interval: Duration::from_secs(10),
        }
    }
}

/// UDP leases: flows to the local services.
#[derive(Debug, Clone)]
pub struct UdpConfig {
    /// A flow with no datagram either way for this long is closed (its local socket too).
    pub flow_idle: Duration,
    /// Flows per UDP lease (the relay caps them too); datagrams of further flows are dropped.
    pub flow_max: usize,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            flow_idle: Duration::from_secs(30),
            flow_max: 1024,
        }
    }
}

/// One provided service (`[[provide]]`, `outrelay-agent provide`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvideSpec {
    /// The service name (one DNS label, registered with REGISTER).
    pub service: String,
    /// The default local target: every method without a target of its own.
    pub to: Option<String>,
    /// Per-method local targets.
    pub methods: BTreeMap<String, String>,
    /// PROXY protocol header written to the target before the consumer's first byte (v2:
    /// LOCAL with the consumer's URI as TLV 0xE0; v1: `PROXY UNKNOWN`).
    pub proxy_protocol: Option<ProxyProtocol>,
}

impl ProvideSpec {
    /// The local target for `method`: its own, else the default; `None` (the provider answers
    /// 404) when neither exists.
    pub fn target(&self, method: &str) -> Option<&str> {
        self.methods
            .get(method)
            .or(self.to.as_ref())
            .map(String::as_str)
    }
}

/// One consumed service (`[[consume]]`, `outrelay-agent consume`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeSpec {
    /// The service name opened (resolved in the agent's tenant by the relay).
    pub service: String,
    /// Local listener (port 0: any; the bound address is in the ready file).
    pub listen: SocketAddr,
    /// The method claimed in OPEN_STREAM (`""`: none).
    pub method: String,
}

/// Service-to-service streams.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Consumer: deadline from a local connection to the relay's STREAM_ACCEPT/REJECT.
    pub open_timeout: Duration,
    /// Provider: connect timeout to the local target (and the deadline for INCOMING_STREAM).
    pub dial_timeout: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            open_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(5),
        }
    }
}

/// Smallest per-stream resume ring.
pub const RESUME_RING_MIN_BYTES: usize = 64 * 1024;
/// Largest per-stream resume ring.
pub const RESUME_RING_MAX_BYTES: usize = 1 << 30;

/// Stream resume (orp.md "Resume"): every service stream keeps the bytes it sent until the
/// peer acknowledged them, so it survives a relay restart or a move to another relay.
#[derive(Debug, Clone)]
pub struct ResumeConfig {
    /// Ask relays for resumable streams (HELLO capability `stream_resume`).
    pub enabled: bool,
    /// Unacknowledged bytes kept per stream and direction; a full ring blocks the sender.
    pub ring_bytes: usize,
    /// STREAM_CHECKPOINT at least this often while bytes move (and at every quarter ring).
    pub checkpoint_interval: Duration,
    /// How long a broken stream tries to resume (reconnect, park, peer) before it fails.
    pub timeout: Duration,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        ResumeConfig {
            enabled: true,
            ring_bytes: 16 << 20,
            checkpoint_interval: Duration::from_millis(100),
            timeout: Duration::from_secs(60),
        }
    }
}

/// The engine threads: reverse sessions and their splices.
#[derive(Debug, Clone)]
pub struct SpliceConfig {
    /// Engine threads (default 2).
    pub workers: usize,
    /// Readiness backend.
    pub io_backend: Backend,
    /// Timeouts and budgets for the whole agent (each engine runs
    /// [`EngineConfig::per_worker`] of it).
    pub engine: EngineConfig,
}

/// Validated settings; nothing here can be wrong any more.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Relay QUIC addresses (`host:port`); a name may resolve to several relays. Every
    /// resolved address is a candidate (`control::Candidates`).
    pub relays: Vec<String>,
    /// How many distinct relays (by certificate identity) the agent holds connections to.
    pub ha_connections: usize,
    /// Server name checked against the relay certificate's DNS names.
    pub server_name: String,
    /// `host:port` reverse addresses a grant may name besides the dialled relay host
    /// (`control::pin_reverse`).
    pub reverse_allow: Vec<String>,
    /// Identity files.
    pub identity: IdentityFiles,
    /// With a state directory: the directory and the controller that renews its certificate
    /// (`None` when neither the config nor the enrollment named one: no renewal).
    pub renewal: Option<(PathBuf, Option<String>)>,
    /// Leases (unique names; with the services below, at least one entry).
    pub leases: Vec<LeaseSpec>,
    /// Provided services (unique names), registered on every relay.
    pub provides: Vec<ProvideSpec>,
    /// Consumed services (unique listen addresses).
    pub consumes: Vec<ConsumeSpec>,
    /// Stream timeouts.
    pub mesh: MeshConfig,
    /// Stream resume.
    pub resume: ResumeConfig,
    /// `/metrics` and `/status` listener; `None` when off.
    pub metrics_listen: Option<SocketAddr>,
    /// Reverse-session pools.
    pub pool: PoolConfig,
    /// Relay connections.
    pub connection: ConnectionConfig,
    /// Local targets.
    pub local: LocalConfig,
    /// UDP flows.
    pub udp: UdpConfig,
    /// Splice engines.
    pub splice: SpliceConfig,
    /// After SIGTERM, how long spliced connections may take to finish.
    pub shutdown_grace_ms: u64,
    /// The TCP/443 fallback.
    pub fallback: FallbackConfig,
}

/// The flags `expose`, `provide` and `consume` share.
#[derive(Debug, Clone, Default)]
pub struct CommonArgs {
    /// Relay QUIC address.
    pub relay: String,
    /// Server name of the relay certificate.
    pub server_name: String,
    /// `--cert/--key/--ca`.
    pub files: Option<(PathBuf, PathBuf, PathBuf)>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--metrics` (`""` = off; `None` = default).
    pub metrics: Option<String>,
}

/// The flags of `outrelay-agent expose`.
#[derive(Debug, Clone, Default)]
pub struct ExposeArgs {
    /// Relay, identity and metrics flags.
    pub common: CommonArgs,
    /// Lease name.
    pub name: String,
    /// `--tls-to`.
    pub tls_to: Option<String>,
    /// `--tcp-to`.
    pub tcp_to: Option<String>,
    /// `--udp-to`.
    pub udp_to: Option<String>,
    /// `--proxy-protocol` (`""`: off).
    pub proxy_protocol: String,
}

/// The flags of `outrelay-agent provide`.
#[derive(Debug, Clone, Default)]
pub struct ProvideArgs {
    /// Relay, identity and metrics flags.
    pub common: CommonArgs,
    /// `--service`.
    pub service: String,
    /// The `--to` given without a `--method` before it.
    pub to: Option<String>,
    /// `--method M --to ADDR` pairs.
    pub methods: Vec<(String, String)>,
    /// `--proxy-protocol` (`""`: off).
    pub proxy_protocol: String,
}

/// The flags of `outrelay-agent consume`.
#[derive(Debug, Clone, Default)]
pub struct ConsumeArgs {
    /// Relay, identity and metrics flags.
    pub common: CommonArgs,
    /// `--service`.
    pub service: String,
    /// `--listen`.
    pub listen: String,
    /// `--method` (`""`: none).
    pub method: String,
}

/// The default target and the `(method, target)` pairs of `provide`'s flags.
pub type MethodTargets = (Option<String>, Vec<(String, String)>);

/// Pairs `provide`'s `--method` and `--to` values by their position on the command line
/// (`(index, value)` as clap's `indices_of` reports them): each `--method` binds to the NEXT
/// `--to`; a `--to` with no `--method` before it is the default target.
///
/// # Errors
/// A `--method` with no `--to` after it, two defaults, or a method given twice.
pub fn pair_methods(
    methods: &[(usize, String)],
    tos: &[(usize, String)],
) -> Result<MethodTargets, ConfigError> {
    let mut all: Vec<(usize, bool, &str)> = methods
        .iter()
        .map(|(i, m)| (*i, true, m.as_str()))
        .chain(tos.iter().map(|(i, t)| (*i, false, t.as_str())))
        .collect();
    all.sort_by_key(|(i, _, _)| *i);
    let mut default = None;
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut pending: Option<&str> = None;
    for (_, is_method, v) in all {
        match (is_method, pending.take()) {
            (true, Some(m)) => return Err(bad("--method", format!("{m:?} has no --to after it"))),
            (true, None) => pending = Some(v),
            (false, Some(m)) => {
                if pairs.iter().any(|(o, _)| o == m) {
                    return Err(bad("--method", format!("{m:?} given twice")));
                }
                pairs.push((m.to_owned(), v.to_owned()));
            }
            (false, None) if default.is_some() => {
                return Err(bad(
                    "--to",
                    "more than one default target (give --method before the others)",
                ));
            }
            (false, None) => default = Some(v.to_owned()),
        }
    }
    if let Some(m) = pending {
        return Err(bad("--method", format!("{m:?} has no --to after it")));
    }
    Ok((default, pairs))
}

impl Settings {
    /// Reads and validates `path`; relative identity paths are relative to its directory.
    ///
    /// # Errors
    /// One line naming the first bad key (the caller exits 64).
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("config", format!("{}: {e}", path.display())))?;
        let raw: Raw =
            toml::from_str(&text).map_err(|e| bad("config", e.message().replace('\n', " ")))?;
        Settings::from_raw(raw, path.parent().unwrap_or(Path::new(".")))
    }

    /// The settings of `expose`: one lease from flags, every other value at its default.
    ///
    /// # Errors
    /// As [`Settings::load`], naming the flag.
    pub fn from_expose(args: ExposeArgs) -> Result<Settings, ConfigError> {
        if args.tls_to.is_none() && args.tcp_to.is_none() && args.udp_to.is_none() {
            return Err(bad("--tls-to/--tcp-to/--udp-to", "give at least one"));
        }
        let mut raw = Raw::from_common(args.common)?;
        raw.lease.push(RawLease {
            name: args.name,
            tls_to: args.tls_to.unwrap_or_default(),
            tcp_to: args.tcp_to.unwrap_or_default(),
            udp_to: args.udp_to.unwrap_or_default(),
            wildcard: false,
            ttl_s: DEFAULT_LEASE_TTL_S,
            proxy_protocol: args.proxy_protocol,
        });
        Settings::from_flags(raw)
    }

    /// The settings of `provide`: one provided service from flags.
    ///
    /// # Errors
    /// As [`Settings::load`], naming the flag.
    pub fn from_provide(args: ProvideArgs) -> Result<Settings, ConfigError> {
        if args.to.is_none() && args.methods.is_empty() {
            return Err(bad("--to", "give a default target or --method M --to ADDR"));
        }
        let mut raw = Raw::from_common(args.common)?;
        raw.provide.push(RawProvide {
            service: args.service,
            to: args.to.unwrap_or_default(),
            methods: args.methods.into_iter().collect(),
            proxy_protocol: args.proxy_protocol,
        });
        Settings::from_flags(raw)
    }

    /// The settings of `consume`: one consumed service from flags.
    ///
    /// # Errors
    /// As [`Settings::load`], naming the flag.
    pub fn from_consume(args: ConsumeArgs) -> Result<Settings, ConfigError> {
        let mut raw = Raw::from_common(args.common)?;
        raw.consume.push(RawConsume {
            service: args.service,
            listen: args.listen,
            method: args.method,
        });
        Settings::from_flags(raw)
    }

    /// Validates settings built from flags; errors name the config key, which is the flag's
    /// spelling in TOML (`provide[0].to` is `--to`).
    fn from_flags(raw: Raw) -> Result<Settings, ConfigError> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Settings::from_raw(raw, &cwd)
    }

    fn from_raw(raw: Raw, base: &Path) -> Result<Settings, ConfigError> {
        if raw.relays.is_empty() {
            return Err(bad("relays", "at least one relay address is required"));
        }
        for r in &raw.relays {
            check_host_port("relays", r)?;
        }
        if raw.ha_connections == 0 || raw.ha_connections > MAX_HA_CONNECTIONS as u64 {
            return Err(bad(
                "ha_connections",
                format!("must be 1..={MAX_HA_CONNECTIONS}"),
            ));
        }
        for r in &raw.reverse_allow {
            check_host_port("reverse_allow", r)?;
        }
        if raw.server_name.is_empty() {
            return Err(bad("server_name", "must not be empty"));
        }
        let resolve = |p: &str| {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let id = &raw.identity;
        let files_given = [&id.cert, &id.key, &id.ca]
            .iter()
            .filter(|s| !s.is_empty())
            .count();
        let renewal = (!id.state_dir.is_empty()).then(|| {
            let dir = resolve(&id.state_dir);
            let url = Some(id.controller.trim().to_owned())
                .filter(|u| !u.is_empty())
                .or_else(|| {
                    std::fs::read_to_string(dir.join(STATE_CONTROLLER_FILE))
                        .ok()
                        .map(|u| u.trim().to_owned())
                        .filter(|u| !u.is_empty())
                });
            (dir, url)
        });
        let identity = match (files_given, id.state_dir.is_empty()) {
            (3, true) => IdentityFiles {
                cert: resolve(&id.cert),
                key: resolve(&id.key),
                ca: resolve(&id.ca),
            },
            (0, false) => IdentityFiles::in_state_dir(&resolve(&id.state_dir)),
            (0, true) => {
                return Err(bad(
                    "identity",
                    "give cert, key and ca, or state_dir (run `outrelay-agent enroll` first)",
                ));
            }
            (_, false) => {
                return Err(bad("identity", "cert/key/ca and state_dir are exclusive"));
            }
            _ => return Err(bad("identity", "cert, key and ca go together")),
        };
        if raw.lease.is_empty() && raw.provide.is_empty() && raw.consume.is_empty() {
            return Err(bad(
                "lease",
                "at least one [[lease]], [[provide]] or [[consume]] is required",
            ));
        }
        let provides = provides(raw.provide)?;
        let consumes = consumes(raw.consume)?;
        let mut leases: Vec<LeaseSpec> = Vec::with_capacity(raw.lease.len());
        for (i, l) in raw.lease.into_iter().enumerate() {
            let key = format!("lease[{i}]");
            if !outrelay_proto::identity::is_label(&l.name.to_ascii_lowercase()) {
                return Err(bad(
                    &format!("{key}.name"),
                    format!("{:?} is not one DNS label", l.name),
                ));
            }
            if leases.iter().any(|o| o.name.eq_ignore_ascii_case(&l.name)) {
                return Err(bad(&format!("{key}.name"), "duplicate lease name"));
            }
            let opt = |field: &str, v: String| -> Result<Option<String>, ConfigError> {
                if v.is_empty() {
                    return Ok(None);
                }
                check_host_port(&format!("{key}.{field}"), &v)?;
                Ok(Some(v))
            };
            let tls_to = opt("tls_to", l.tls_to)?;
            let tcp_to = opt("tcp_to", l.tcp_to)?;
            let udp_to = opt("udp_to", l.udp_to)?;
            if let Some(u) = &udp_to
                && u.parse::<SocketAddr>().is_err()
            {
                return Err(bad(&format!("{key}.udp_to"), "must be ip:port"));
            }
            if tls_to.is_none() && tcp_to.is_none() && udp_to.is_none() {
                return Err(bad(&key, "give tls_to, tcp_to or udp_to"));
            }
            if l.wildcard && tls_to.is_none() {
                return Err(bad(&format!("{key}.wildcard"), "needs tls_to"));
            }
            if l.ttl_s == 0 {
                return Err(bad(&format!("{key}.ttl_s"), "must be at least 1"));
            }
            let proxy_protocol =
                ProxyProtocol::parse(&format!("{key}.proxy_protocol"), &l.proxy_protocol)?;
            if proxy_protocol == Some(ProxyProtocol::V1) && udp_to.is_some() {
                return Err(bad(
                    &format!("{key}.proxy_protocol"),
                    "\"v1\" has no datagram form: use \"v2\" with udp_to",
                ));
            }
            leases.push(LeaseSpec {
                name: l.name,
                tls_to,
                tcp_to,
                udp_to,
                wildcard: l.wildcard,
                ttl_s: l.ttl_s,
                proxy_protocol,
            });
        }
        let metrics_listen = match raw.metrics.listen.as_str() {
            "" => None,
            m => Some(m.parse().map_err(|e| bad("metrics.listen", e))?),
        };
        let dur = |key: &str, v: u64| -> Result<Duration, ConfigError> {
            if v < MIN_DURATION_MS {
                return Err(bad(key, format!("must be at least {MIN_DURATION_MS} ms")));
            }
            Ok(Duration::from_millis(v))
        };
        let p = raw.pool;
        if p.idle == 0 {
            return Err(bad("pool.idle", "must be at least 1"));
        }
        if p.max < p.idle || p.max > POOL_MAX_LIMIT {
            return Err(bad(
                "pool.max",
                format!("must be between pool.idle and {POOL_MAX_LIMIT}"),
            ));
        }
        let pool = PoolConfig {
            idle: p.idle,
            max: p.max,
            dead_session: dur("pool.dead_session_ms", p.dead_session_ms)?,
            connect_timeout: dur("pool.connect_timeout_ms", p.connect_timeout_ms)?,
            handshake_timeout: dur("pool.handshake_timeout_ms", p.handshake_timeout_ms)?,
            growth_window: dur("pool.growth_window_ms", p.growth_window_ms)?,
            retry_initial: dur("pool.retry_initial_ms", p.retry_initial_ms)?,
            retry_max: dur("pool.retry_max_ms", p.retry_max_ms)?,
        };
        if pool.retry_max < pool.retry_initial {
            return Err(bad("pool.retry_max_ms", "must be >= pool.retry_initial_ms"));
        }
        let c = raw.connection;
        let connection = ConnectionConfig {
            keepalive: dur("connection.keepalive_ms", c.keepalive_ms)?,
            idle_timeout: dur("connection.idle_timeout_ms", c.idle_timeout_ms)?,
            ping_interval: dur("connection.ping_interval_ms", c.ping_interval_ms)?,
            hello_timeout: dur("connection.hello_timeout_ms", c.hello_timeout_ms)?,
            reconnect_initial: dur("connection.reconnect_initial_ms", c.reconnect_initial_ms)?,
            reconnect_max: dur("connection.reconnect_max_ms", c.reconnect_max_ms)?,
            renew: match c.renew_ms {
                0 => None,
                v => Some(dur("connection.renew_ms", v)?),
            },
            release_timeout: dur("connection.release_timeout_ms", c.release_timeout_ms)?,
        };
        if connection.keepalive >= connection.idle_timeout {
            return Err(bad(
                "connection.keepalive_ms",
                "must be below connection.idle_timeout_ms",
            ));
        }
        if connection.reconnect_max < connection.reconnect_initial {
            return Err(bad(
                "connection.reconnect_max_ms",
                "must be >= connection.reconnect_initial_ms",
            ));
        }
        let local = LocalConfig {
            connect_timeout: dur("local.connect_timeout_ms", raw.local.connect_timeout_ms)?,
            failure_log_interval: dur(
                "local.failure_log_interval_ms",
                raw.local.failure_log_interval_ms,
            )?,
        };
        let s = raw.splice;
        if s.workers == 0 || s.workers > 64 {
            return Err(bad("splice.workers", "must be 1..=64"));
        }
        let io_backend = match s.io_backend.as_str() {
            "auto" => Backend::auto(),
            other => other
                .parse()
                .map_err(|e: String| bad("splice.io_backend", e))?,
        };
        let engine = EngineConfig {
            backend: io_backend,
            pipes: PipeLimits {
                budget_bytes: s.pipe_budget_bytes,
                max_pipe_bytes: s.max_pipe_bytes.max(4096),
                ..PipeLimits::default()
            },
            buffers: BufferLimits {
                copy_budget_bytes: s.copy_budget_bytes,
                copy_buffer_bytes: s.copy_buffer_bytes,
                spill_budget_bytes: s.spill_budget_bytes,
            },
            idle_timeout: dur("splice.idle_timeout_ms", s.idle_timeout_ms)?,
            half_closed_timeout: dur("splice.half_closed_timeout_ms", s.half_closed_timeout_ms)?,
            stall_timeout: dur("splice.stall_timeout_ms", s.stall_timeout_ms)?,
            write_stall_timeout: dur("splice.write_stall_timeout_ms", s.write_stall_timeout_ms)?,
            ..EngineConfig::default()
        };
        engine
            .validate()
            .map_err(|(key, why)| bad(&format!("splice.{key}"), why))?;
        let splice = SpliceConfig {
            workers: s.workers,
            io_backend,
            engine,
        };
        if raw.udp.flow_max == 0 {
            return Err(bad("udp.flow_max", "must be at least 1"));
        }
        let udp = UdpConfig {
            flow_idle: dur("udp.flow_idle_ms", raw.udp.flow_idle_ms)?,
            flow_max: raw.udp.flow_max,
        };
        let mesh = MeshConfig {
            open_timeout: dur("mesh.open_timeout_ms", raw.mesh.open_timeout_ms)?,
            dial_timeout: dur("mesh.dial_timeout_ms", raw.mesh.dial_timeout_ms)?,
        };
        let r = raw.resume;
        if !(RESUME_RING_MIN_BYTES..=RESUME_RING_MAX_BYTES).contains(&r.ring_bytes) {
            return Err(bad(
                "resume.ring_bytes",
                format!("must be {RESUME_RING_MIN_BYTES}..={RESUME_RING_MAX_BYTES}"),
            ));
        }
        let resume = ResumeConfig {
            enabled: r.enabled,
            ring_bytes: r.ring_bytes,
            checkpoint_interval: dur("resume.checkpoint_interval_ms", r.checkpoint_interval_ms)?,
            timeout: dur("resume.timeout_ms", r.timeout_ms)?,
        };
        let f = raw.fallback;
        let fallback = FallbackConfig {
            mode: match f.mode.as_str() {
                "auto" => FallbackMode::Auto,
                "off" => FallbackMode::Off,
                "only" => FallbackMode::Only,
                other => {
                    return Err(bad(
                        "fallback.mode",
                        format!("{other:?} is not auto, off or only"),
                    ));
                }
            },
            quic_timeout: dur("fallback.quic_timeout_ms", f.quic_timeout_ms)?,
            connect_timeout: dur("fallback.connect_timeout_ms", f.connect_timeout_ms)?,
            quic_retry_initial: dur("fallback.quic_retry_initial_ms", f.quic_retry_initial_ms)?,
            quic_retry_max: dur("fallback.quic_retry_max_ms", f.quic_retry_max_ms)?,
            server_name: (!f.server_name.is_empty()).then_some(f.server_name),
            queue_bytes: f.queue_bytes,
            addrs: f
                .addrs
                .into_iter()
                .map(|(relay, a)| match a {
                    RawAddrs::One(one) => (relay, vec![one]),
                    RawAddrs::Many(many) => (relay, many),
                })
                .collect(),
        };
        if fallback.quic_retry_max < fallback.quic_retry_initial {
            return Err(bad(
                "fallback.quic_retry_max_ms",
                "must be at least quic_retry_initial_ms",
            ));
        }
        if fallback.queue_bytes < 64 * 1024 {
            return Err(bad("fallback.queue_bytes", "must be at least 65536"));
        }
        for (relay, tcp) in &fallback.addrs {
            check_host_port("fallback.addrs", relay)?;
            if tcp.is_empty() {
                return Err(bad("fallback.addrs", format!("{relay:?} lists no address")));
            }
            for a in tcp {
                check_host_port("fallback.addrs", a)?;
            }
        }
        Ok(Settings {
            fallback,
            relays: raw.relays,
            ha_connections: usize::try_from(raw.ha_connections).unwrap_or(MAX_HA_CONNECTIONS),
            server_name: raw.server_name,
            reverse_allow: raw.reverse_allow,
            identity,
            renewal,
            leases,
            provides,
            consumes,
            mesh,
            resume,
            metrics_listen,
            pool,
            connection,
            local,
            udp,
            splice,
            shutdown_grace_ms: raw.lifecycle.shutdown_grace_ms,
        })
    }
}

impl Raw {
    /// A config with the shared flags filled in.
    fn from_common(c: CommonArgs) -> Result<Raw, ConfigError> {
        if c.files.is_none() && c.state_dir.is_none() {
            return Err(bad("--cert/--key/--ca", "give them, or --state-dir"));
        }
        let mut raw = Raw {
            relays: vec![c.relay],
            ..Raw::default()
        };
        if !c.server_name.is_empty() {
            raw.server_name = c.server_name;
        }
        if let Some((cert, key, ca)) = c.files {
            raw.identity.cert = cert.display().to_string();
            raw.identity.key = key.display().to_string();
            raw.identity.ca = ca.display().to_string();
        }
        if let Some(dir) = c.state_dir {
            raw.identity.state_dir = dir.display().to_string();
        }
        if let Some(m) = c.metrics {
            raw.metrics.listen = m;
        }
        Ok(raw)
    }
}

/// A service name as the relay registers it: one DNS label, `^[a-z0-9][a-z0-9-]{0,62}$`.
pub fn is_service_name(s: &str) -> bool {
    outrelay_proto::identity::is_label(s)
}

/// A method name: 1..=[`METHOD_MAX_BYTES`] printable ASCII bytes without spaces.
pub fn is_method_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= METHOD_MAX_BYTES && s.bytes().all(|c| c.is_ascii_graphic())
}

fn provides(raw: Vec<RawProvide>) -> Result<Vec<ProvideSpec>, ConfigError> {
    if raw.len() > MESH_ENTRIES_MAX {
        return Err(bad(
            "provide",
            format!("at most {MESH_ENTRIES_MAX} entries"),
        ));
    }
    let mut out: Vec<ProvideSpec> = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let key = format!("provide[{i}]");
        if !is_service_name(&p.service) {
            return Err(bad(
                &format!("{key}.service"),
                format!(
                    "{:?} is not a service name (one lowercase DNS label)",
                    p.service
                ),
            ));
        }
        if out.iter().any(|o| o.service == p.service) {
            return Err(bad(&format!("{key}.service"), "duplicate service name"));
        }
        let to = if p.to.is_empty() {
            None
        } else {
            check_host_port(&format!("{key}.to"), &p.to)?;
            Some(p.to)
        };
        for (m, t) in &p.methods {
            if !is_method_name(m) {
                return Err(bad(
                    &format!("{key}.methods"),
                    format!("{m:?} is not a method name"),
                ));
            }
            check_host_port(&format!("{key}.methods.{m}"), t)?;
        }
        if to.is_none() && p.methods.is_empty() {
            return Err(bad(&format!("{key}.to"), "give to or methods"));
        }
        let proxy_protocol =
            ProxyProtocol::parse(&format!("{key}.proxy_protocol"), &p.proxy_protocol)?;
        out.push(ProvideSpec {
            service: p.service,
            to,
            methods: p.methods,
            proxy_protocol,
        });
    }
    Ok(out)
}

fn consumes(raw: Vec<RawConsume>) -> Result<Vec<ConsumeSpec>, ConfigError> {
    if raw.len() > MESH_ENTRIES_MAX {
        return Err(bad(
            "consume",
            format!("at most {MESH_ENTRIES_MAX} entries"),
        ));
    }
    let mut out: Vec<ConsumeSpec> = Vec::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let key = format!("consume[{i}]");
        if !is_service_name(&c.service) {
            return Err(bad(
                &format!("{key}.service"),
                format!(
                    "{:?} is not a service name (one lowercase DNS label)",
                    c.service
                ),
            ));
        }
        let listen: SocketAddr = c.listen.parse().map_err(|_| {
            bad(
                &format!("{key}.listen"),
                format!("{:?} is not ip:port", c.listen),
            )
        })?;
        if listen.port() != 0 && out.iter().any(|o| o.listen == listen) {
            return Err(bad(&format!("{key}.listen"), "duplicate listen address"));
        }
        if !c.method.is_empty() && !is_method_name(&c.method) {
            return Err(bad(
                &format!("{key}.method"),
                format!("{:?} is not a method name", c.method),
            ));
        }
        out.push(ConsumeSpec {
            service: c.service,
            listen,
            method: c.method,
        });
    }
    Ok(out)
}

/// `host:port` with a non-empty host and a non-zero port (host names are resolved at dial time).
fn check_host_port(key: &str, v: &str) -> Result<(), ConfigError> {
    if v.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = v.rsplit_once(':') else {
        return Err(bad(key, format!("{v:?} is not host:port")));
    };
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(bad(key, format!("{v:?} has no valid host")));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(bad(key, format!("{v:?} has no valid port"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| bad("config", e.message()))?;
        Settings::from_raw(raw, Path::new("/etc/outrelay"))
    }

    const MINIMAL: &str = "relays = [\"127.0.0.1:7443\"]\n\
        [identity]\ncert = \"a.pem\"\nkey = \"k.pem\"\nca = \"/ca.pem\"\n\
        [[lease]]\nname = \"demo\"\ntls_to = \"127.0.0.1:8443\"\n";

    #[test]
    fn fallback_addrs_take_one_address_or_an_ordered_list() {
        let one = parse(&format!(
            "{MINIMAL}[fallback]\naddrs = {{ \"127.0.0.1:7443\" = \"127.0.0.1:443\" }}\n"
        ))
        .expect("one address");
        assert_eq!(one.fallback.addrs["127.0.0.1:7443"], ["127.0.0.1:443"]);
        let list = parse(&format!(
            "{MINIMAL}[fallback]\naddrs = {{ \"127.0.0.1:7443\" = [\"127.0.0.1:443\", \"127.0.0.1:7443\"] }}\n"
        ))
        .expect("a list");
        assert_eq!(
            list.fallback.addrs["127.0.0.1:7443"],
            ["127.0.0.1:443", "127.0.0.1:7443"]
        );
        for bad in ["[]", "[\"no-port\"]", "\"no-port\""] {
            let text = format!("{MINIMAL}[fallback]\naddrs = {{ \"127.0.0.1:7443\" = {bad} }}\n");
            assert!(parse(&text).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn minimal_config_gets_defaults_and_relative_paths() {
        let s = parse(MINIMAL).expect("valid");
        assert_eq!(s.identity.cert, PathBuf::from("/etc/outrelay/a.pem"));
        assert_eq!(s.identity.ca, PathBuf::from("/ca.pem"));
        assert!(
            s.reverse_allow.is_empty(),
            "no reverse address allowed beyond the relay's host"
        );
        assert_eq!(s.pool.idle, 2);
        assert_eq!(s.pool.dead_session, Duration::from_secs(30));
        assert_eq!(s.connection.reconnect_initial, Duration::from_secs(1));
        assert_eq!(s.connection.reconnect_max, Duration::from_secs(30));
        assert_eq!(
            s.metrics_listen,
            Some("127.0.0.1:7462".parse().expect("addr"))
        );
        assert_eq!(s.leases[0].tcp_to, None);
        assert_eq!(s.leases[0].proxy_protocol, None);
        assert_eq!(s.server_name, "localhost");
        assert_eq!(s.ha_connections, DEFAULT_HA_CONNECTIONS);
        let pp = parse(&MINIMAL.replace(
            "tls_to = \"127.0.0.1:8443\"",
            "tls_to = \"127.0.0.1:8443\"\nudp_to = \"127.0.0.1:53\"\nproxy_protocol = \"v2\"",
        ))
        .expect("v2 with udp_to is valid");
        assert_eq!(pp.leases[0].proxy_protocol, Some(ProxyProtocol::V2));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("relays = []", "relays"),
            (&format!("ha_connections = 0\n{MINIMAL}"), "ha_connections"),
            (&format!("ha_connections = 17\n{MINIMAL}"), "ha_connections"),
            (
                &format!("reverse_allow = [\"relay2.example.com\"]\n{MINIMAL}"),
                "reverse_allow",
            ),
            (
                &MINIMAL.replace("tls_to = \"127.0.0.1:8443\"", "") as &str,
                "lease[0]",
            ),
            (&MINIMAL.replace("demo", "bad_name"), "lease[0].name"),
            (
                &format!("{MINIMAL}[pool]\ndead_session_ms = 5\n"),
                "pool.dead_session_ms",
            ),
            (&format!("{MINIMAL}[pool]\nidle = 4\nmax = 2\n"), "pool.max"),
            (
                &format!("{MINIMAL}[metrics]\nlisten = \"nope\"\n"),
                "metrics.listen",
            ),
            (&MINIMAL.replace("ca = \"/ca.pem\"", ""), "identity"),
            (&format!("{MINIMAL}bogus = 1\n"), "config"),
            (
                &MINIMAL.replace(
                    "tls_to = \"127.0.0.1:8443\"",
                    "udp_to = \"127.0.0.1:53\"\nproxy_protocol = \"v1\"",
                ),
                "lease[0].proxy_protocol",
            ),
            (
                &MINIMAL.replace(
                    "tls_to = \"127.0.0.1:8443\"",
                    "tls_to = \"127.0.0.1:8443\"\nproxy_protocol = \"v3\"",
                ),
                "lease[0].proxy_protocol",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(key).to_string();
            assert!(
                e.starts_with(&format!("invalid config: {key}")),
                "{key}: {e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn state_dir_names_the_three_files() {
        let s = parse(
            "relays = [\"r.example:7443\"]\n[identity]\nstate_dir = \"state\"\n\
             [[lease]]\nname = \"x\"\ntcp_to = \"127.0.0.1:9\"\n",
        )
        .expect("valid");
        assert_eq!(s.identity.key, PathBuf::from("/etc/outrelay/state/key.pem"));
    }

    const MESH_ONLY: &str = "relays = [\"127.0.0.1:7443\"]\n\
        [identity]\ncert = \"a.pem\"\nkey = \"k.pem\"\nca = \"/ca.pem\"\n\
        [[provide]]\nservice = \"payments\"\nto = \"127.0.0.1:8080\"\n\
        methods = { charge = \"127.0.0.1:8081\" }\n\
        [[consume]]\nservice = \"ledger\"\nlisten = \"127.0.0.1:0\"\nmethod = \"read\"\n";

    #[test]
    fn services_without_leases_are_a_valid_config() {
        let s = parse(MESH_ONLY).expect("valid");
        assert!(s.leases.is_empty());
        let p = &s.provides[0];
        assert_eq!(p.service, "payments");
        assert_eq!(p.target("charge"), Some("127.0.0.1:8081"));
        assert_eq!(p.target("other"), Some("127.0.0.1:8080"));
        assert_eq!(
            s.consumes,
            vec![ConsumeSpec {
                service: "ledger".into(),
                listen: "127.0.0.1:0".parse().expect("addr"),
                method: "read".into(),
            }]
        );
        assert_eq!(s.mesh.open_timeout, Duration::from_secs(10));
        assert_eq!(s.mesh.dial_timeout, Duration::from_secs(5));
        let s = parse(&format!(
            "{MESH_ONLY}[mesh]\nopen_timeout_ms = 500\ndial_timeout_ms = 200\n"
        ))
        .expect("valid");
        assert_eq!(s.mesh.open_timeout, Duration::from_millis(500));
        assert_eq!(s.mesh.dial_timeout, Duration::from_millis(200));
    }

    #[test]
    fn only_method_targets_means_404_for_other_methods() {
        let s = parse(&MESH_ONLY.replace("to = \"127.0.0.1:8080\"\n", "")).expect("valid");
        assert_eq!(s.provides[0].to, None);
        assert_eq!(s.provides[0].target("charge"), Some("127.0.0.1:8081"));
        assert_eq!(s.provides[0].target("refund"), None);
        assert_eq!(s.provides[0].target(""), None);
    }

    #[test]
    fn service_errors_name_the_key() {
        let second_provider = "[[provide]]\nservice = \"payments\"\nto = \"127.0.0.1:9\"\n";
        let second_consumer = "[[consume]]\nservice = \"x\"\nlisten = \"127.0.0.1:18080\"\n";
        let cases = [
            (
                MESH_ONLY.replace("\"payments\"", "\"Pay_ments\""),
                "provide[0].service",
            ),
            (
                MESH_ONLY.replace("\"127.0.0.1:8080\"", "\"nope\""),
                "provide[0].to",
            ),
            (
                MESH_ONLY.replace("\"127.0.0.1:8081\"", "\"127.0.0.1\""),
                "provide[0].methods.charge",
            ),
            (
                MESH_ONLY.replace("charge = ", "\"a b\" = "),
                "provide[0].methods",
            ),
            (
                MESH_ONLY
                    .replace("to = \"127.0.0.1:8080\"\n", "")
                    .replace("methods = { charge = \"127.0.0.1:8081\" }\n", ""),
                "provide[0].to",
            ),
            (
                format!("{MESH_ONLY}{second_provider}"),
                "provide[1].service",
            ),
            (
                MESH_ONLY.replace("\"ledger\"", "\"\""),
                "consume[0].service",
            ),
            (
                MESH_ONLY.replace("\"127.0.0.1:0\"", "\"localhost:80\""),
                "consume[0].listen",
            ),
            (
                MESH_ONLY.replace("\"read\"", "\"re ad\""),
                "consume[0].method",
            ),
            (
                format!(
                    "{}{second_consumer}{second_consumer}",
                    MESH_ONLY.replace("127.0.0.1:0", "127.0.0.1:18081")
                ),
                "consume[2].listen",
            ),
            (
                format!("{MESH_ONLY}[mesh]\nopen_timeout_ms = 5\n"),
                "mesh.open_timeout_ms",
            ),
            (
                format!("{MESH_ONLY}[mesh]\ndial_timeout_ms = 0\n"),
                "mesh.dial_timeout_ms",
            ),
            (
                "relays = [\"127.0.0.1:7443\"]\n[identity]\nstate_dir = \"s\"\n".to_owned(),
                "lease",
            ),
        ];
        for (text, key) in cases {
            let e = parse(&text).expect_err(key).to_string();
            assert!(
                e.starts_with(&format!("invalid config: {key}:")),
                "{key}: {e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // Two port-0 consumers are two different listeners.
        let two = format!("{MESH_ONLY}[[consume]]\nservice = \"y\"\nlisten = \"127.0.0.1:0\"\n");
        assert_eq!(parse(&two).expect("valid").consumes.len(), 2);
    }

    fn at(v: &[(usize, &str)]) -> Vec<(usize, String)> {
        v.iter().map(|(i, s)| (*i, (*s).to_owned())).collect()
    }

    #[test]
    fn methods_pair_with_the_next_to_by_position() {
        // provide --method a --to A --to D --method b --to B
        let (default, pairs) = pair_methods(
            &at(&[(1, "a"), (7, "b")]),
            &at(&[(3, "A"), (5, "D"), (9, "B")]),
        )
        .expect("valid");
        assert_eq!(default.as_deref(), Some("D"));
        assert_eq!(
            pairs,
            vec![("a".into(), "A".into()), ("b".into(), "B".into())]
        );
        // Only a default.
        let (default, pairs) = pair_methods(&[], &at(&[(1, "D")])).expect("valid");
        assert_eq!((default.as_deref(), pairs.len()), (Some("D"), 0));
        let errors = [
            (at(&[(5, "a")]), at(&[(1, "D")]), "--method"),
            (at(&[(1, "a"), (3, "b")]), at(&[(5, "A")]), "--method"),
            (at(&[]), at(&[(1, "D"), (3, "E")]), "--to"),
            (
                at(&[(1, "a"), (5, "a")]),
                at(&[(3, "A"), (7, "B")]),
                "--method",
            ),
        ];
        for (methods, tos, key) in errors {
            let e = pair_methods(&methods, &tos).expect_err(key).to_string();
            assert!(e.starts_with(&format!("invalid config: {key}:")), "{e}");
        }
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;
    use outrelay_lifecycle::config_doc;

    fn is_default(path: &str, v: &toml::Value) -> Option<bool> {
        // The serde-required keys of each array entry; the rest take their defaults.
        let context = match path.split_once('.').map(|(s, _)| s) {
            Some("lease") => "[[lease]]\nname = \"demo\"\n",
            Some("provide") => "[[provide]]\nservice = \"s\"\n",
            Some("consume") => "[[consume]]\nservice = \"s\"\nlisten = \"127.0.0.1:0\"\n",
            _ => "",
        };
        config_doc::default_matches::<Raw>(path, v, context)
    }

    #[test]
    fn docs_config_md_lists_every_agent_key_with_its_default() {
        let keys = config_doc::keys::<Raw>().expect("walk the raw config");
        let md = include_str!("../../../docs/config.md");
        let problems = config_doc::check(md, "outrelay-agent", &keys, is_default);
        assert!(
            problems.is_empty(),
            "docs/config.md no longer matches dataplane/agent/src/config.rs:\n{}",
            problems.join("\n")
        );
    }
}

#[cfg(test)]
mod proxy_flag_tests {
    use super::*;

    fn expose(udp: bool, proxy_protocol: &str) -> Result<Settings, ConfigError> {
        Settings::from_expose(ExposeArgs {
            common: CommonArgs {
                relay: "127.0.0.1:7443".into(),
                state_dir: Some(PathBuf::from("/var/lib/outrelay-agent")),
                ..CommonArgs::default()
            },
            name: "demo".into(),
            tcp_to: Some("127.0.0.1:9000".into()),
            udp_to: udp.then(|| "127.0.0.1:9053".into()),
            proxy_protocol: proxy_protocol.into(),
            ..ExposeArgs::default()
        })
    }

    #[test]
    fn expose_proxy_protocol_maps_to_the_lease_and_v1_with_udp_is_refused() {
        let s = expose(true, "v2").expect("v2 with udp");
        assert_eq!(s.leases[0].proxy_protocol, Some(ProxyProtocol::V2));
        assert_eq!(
            expose(false, "").expect("off").leases[0].proxy_protocol,
            None
        );
        let e = expose(true, "v1").expect_err("v1 has no datagram form");
        assert!(e.to_string().contains("proxy_protocol"), "{e}");
        assert!(expose(false, "v9").is_err());
    }
}
