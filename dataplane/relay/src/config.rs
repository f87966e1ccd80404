//! The relay's configuration: TOML read into raw structs, converted ONCE into validated
//! [`Settings`] before any socket is bound. Every duration is a config value (at least 100 ms
//! where the spec says so) so end-to-end tests can use short ones.
//!
//! ```toml
//! public_url = "https://relay.example.com"   # root host: relay.example.com
//! workers = 0                                # per-core workers (accept, set-up, splice);
//!                                            # 0 = one per core
//! control_threads = 2                        # tokio: QUIC, controller, admin, metrics
//! io_backend = "auto"                        # auto | io_uring | epoll
//! [tls]      cert = "relay.pem"  key = "relay-key.pem"  ca = "ca.pem"
//!            # or: state_dir = "/var/lib/outrelay-relay"  (what `outrelay-relay enroll` wrote:
//!            # cert.pem, key.pem, ca.pem; renewed at 70 % of the leaf's life with [controller])
//! [listen]   quic = "0.0.0.0:7443"  reverse = "0.0.0.0:7443"  public_tls = "0.0.0.0:443"
//!            metrics = "127.0.0.1:7460"  lease_bind_ip = "0.0.0.0"
//!            admin_socket = "/run/outrelay/relay.sock"
//! [leases]   min_port = 20000  max_port = 20999  tcp = false  udp = false  ttl_cap_s = 300 ...
//! [ingress]  claim_timeout_ms = 10000  ready_queue_max = 8 ...
//!            reverse_accept_v1 = false   # true: old agents' one-way reverse handshake too
//!            pending_per_source_max = 256  source_conn_max = 1024  tenant_conn_max = 8192
//!            public_conn_max = 0 (from RLIMIT_NOFILE)  fd_reserve = 2048  root_conn_max = 64 ...
//! [udp]      flow_idle_ms = 30000  flow_max = 1024  flow_per_source_max = 64
//!            flow_evict_idle_ms = 5000  queue_max = 1024  socket_buffer_bytes = 4194304
//! [quic]     idle_timeout_ms = 10000  keep_alive_ms = 3000  max_connections_per_identity = 8
//!            lease_frames_per_s = 50  lease_frames_burst = 100  max_concurrent_streams = 256
//!            stream_opens_per_s = 500  stream_opens_burst = 1000
//!            connection_receive_window_bytes = 8388608  stream_receive_window_bytes = 1048576
//! [pipes]    budget_bytes = 50331648  max_pipe_bytes = 1048576
//! [splice]   idle_timeout_ms = 3600000  half_closed_timeout_ms = 60000
//!            stall_timeout_ms = 2000  write_stall_timeout_ms = 30000
//!            copy_budget_bytes = 8388608  copy_buffer_bytes = 16384  spill_budget_bytes = 16777216
//! [bandwidth] lease_to_service_bytes_per_s = 0  lease_to_client_bytes_per_s = 0  # 0 = none
//!            tenant_to_service_bytes_per_s = 0  tenant_to_client_bytes_per_s = 0   # (live)
//! [public_tls] cert = "root.pem"  key = "root-key.pem"   # root host /healthz; optional
//! [controller] url = "https://controller:7444"  heartbeat_interval_ms = 10000 ...  # optional
//! [lifecycle] shutdown_grace_ms = 30000      # SIGTERM: time for established connections
//! [ebpf]     mode = "auto"  reuseport = true  lookup = true   # optional steering (crate::steer)
//! [log]      level = ""                  # tracing filter; "" = --log / OUTRELAY_LOG (live)
//! [mesh]     open_timeout_ms = 10000  max_services_per_agent = 64  max_providers_per_service = 64
//!            decision_cache_max = 4096  decision_cache_ttl_ms = 5000
//!            max_streams_per_tenant = 4096  stream_idle_timeout_ms = 300000
//! [resume]   enabled = true  park_timeout_ms = 30000  # stream resume (live, as [mesh])
//!            max_parked = 4096  max_parked_per_agent = 256
//! [forward]  advertise = ""  max_peers = 64  max_streams_per_peer = 1024  # relay-to-relay
//!            max_streams_per_peer_per_tenant = 64  max_streams = 8192  connect_timeout_ms = 3000
//! [[policy]] tenant = "demo"  caller = "*"  target = "payments"  method = ""  decision = "allow"
//! ```
//!
//! Without `[controller]` the relay runs standalone: every lease is approved, there is no
//! revocation list (see [`crate::control`]), and the `[[policy]]` rules are the stream policy
//! (with a controller they are refused: the controller's rules are the only ones).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use std::time::Duration;

use outrelay_io::{Backend, BufferLimits, EngineConfig, PipeLimits};
use serde::Deserialize;

use crate::ingress::IngressConfig;
use crate::lease::{LeaseConfig, PortLeaseConfig, root_host_from_url};
use crate::mesh::MeshConfig;
use crate::mesh::policy::StaticRule;
use crate::mesh::resume::{MAX_PARK_TIMEOUT_MS, ResumeConfig};
use crate::quic::{QuicConfig, TlsMaterial};
use crate::udp::UdpConfig;

/// Why a configuration was refused: one line naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("invalid config: {key}: {why}"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    public_url: String,
    workers: usize,
    control_threads: usize,
    io_backend: String,
    tls: RawTls,
    listen: RawListen,
    reverse_advertise: String,
    leases: RawLeases,
    ingress: RawIngress,
    udp: RawUdp,
    quic: RawQuic,
    pipes: RawPipes,
    splice: RawSplice,
    bandwidth: RawBandwidth,
    public_tls: RawPublicTls,
    controller: Option<RawController>,
    lifecycle: RawLifecycle,
    mesh: RawMesh,
    resume: RawResume,
    forward: RawForward,
    policy: Vec<RawPolicy>,
    ebpf: RawEbpf,
    log: RawLog,
}

/// `[forward]`: relay-to-relay forwarding ([`crate::forward`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawForward {
    advertise: String,
    max_peers: usize,
    max_streams_per_peer: usize,
    max_streams_per_peer_per_tenant: usize,
    max_streams: usize,
    connect_timeout_ms: u64,
}

impl Default for RawForward {
    fn default() -> Self {
        let d = crate::forward::ForwardConfig::default();
        RawForward {
            advertise: d.advertise,
            max_peers: d.max_peers,
            max_streams_per_peer: d.max_streams_per_peer,
            max_streams_per_peer_per_tenant: d.max_streams_per_peer_per_tenant,
            max_streams: d.max_streams,
            connect_timeout_ms: d.connect_timeout_ms,
        }
    }
}

/// `[log]`: the log filter (empty: `--log` / `OUTRELAY_LOG`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
}

/// `[resume]`: stream resume (`crate::mesh::resume`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawResume {
    enabled: bool,
    park_timeout_ms: u64,
    max_parked: usize,
    max_parked_per_agent: usize,
}

impl Default for RawResume {
    fn default() -> Self {
        let d = ResumeConfig::default();
        RawResume {
            enabled: d.enabled,
            park_timeout_ms: d.park_timeout_ms,
            max_parked: d.max_parked,
            max_parked_per_agent: d.max_parked_per_agent,
        }
    }
}

/// `[ebpf]`: optional steering programs ([`crate::steer`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawEbpf {
    mode: String,
    reuseport: bool,
    lookup: bool,
}

impl Default for RawEbpf {
    fn default() -> Self {
        RawEbpf {
            mode: "auto".into(),
            reuseport: true,
            lookup: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMesh {
    open_timeout_ms: u64,
    max_services_per_agent: usize,
    max_providers_per_service: usize,
    decision_cache_max: usize,
    decision_cache_ttl_ms: u64,
    max_streams_per_tenant: usize,
    stream_idle_timeout_ms: u64,
}

impl Default for RawMesh {
    fn default() -> Self {
        let d = MeshConfig::default();
        RawMesh {
            open_timeout_ms: d.open_timeout_ms,
            max_services_per_agent: d.max_services_per_agent,
            max_providers_per_service: d.max_providers_per_service,
            decision_cache_max: d.decision_cache_max,
            decision_cache_ttl_ms: d.decision_cache_ttl_ms,
            max_streams_per_tenant: d.max_streams_per_tenant,
            stream_idle_timeout_ms: d.stream_idle_timeout_ms,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    tenant: String,
    caller: String,
    target: String,
    #[serde(default)]
    method: String,
    decision: String,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            public_url: String::new(),
            workers: 0,
            control_threads: 2,
            io_backend: "auto".into(),
            tls: RawTls::default(),
            listen: RawListen::default(),
            reverse_advertise: String::new(),
            leases: RawLeases::default(),
            ingress: RawIngress::default(),
            udp: RawUdp::default(),
            quic: RawQuic::default(),
            pipes: RawPipes::default(),
            splice: RawSplice::default(),
            bandwidth: RawBandwidth::default(),
            public_tls: RawPublicTls::default(),
            controller: None,
            lifecycle: RawLifecycle::default(),
            mesh: RawMesh::default(),
            resume: RawResume::default(),
            forward: RawForward::default(),
            policy: Vec::new(),
            ebpf: RawEbpf::default(),
            log: RawLog::default(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    state_dir: PathBuf,
}

/// `[controller]`: the controller client (absent: standalone). TLS comes from `[tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawController {
    url: String,
    heartbeat_interval_ms: Option<u64>,
    report_timeout_ms: Option<u64>,
    reconnect_backoff_ms: Option<u64>,
    reconnect_backoff_max_ms: Option<u64>,
    report_queue_max: Option<usize>,
    state_dir: Option<PathBuf>,
}

/// `[lifecycle]`: SIGTERM behaviour (read again on SIGHUP; applied live).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLifecycle {
    shutdown_grace_ms: u64,
}

impl Default for RawLifecycle {
    fn default() -> Self {
        RawLifecycle {
            shutdown_grace_ms: outrelay_lifecycle::DEFAULT_SHUTDOWN_GRACE_MS,
        }
    }
}

/// `[public_tls]`: the root host's certificate (root-host fallback, `/healthz` only).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPublicTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    quic: String,
    reverse: String,
    public_tls: String,
    lease_bind_ip: String,
    metrics: String,
    admin_socket: String,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            quic: "0.0.0.0:7443".into(),
            reverse: "0.0.0.0:7443".into(),
            public_tls: "0.0.0.0:443".into(),
            lease_bind_ip: "0.0.0.0".into(),
            metrics: "127.0.0.1:7460".into(),
            admin_socket: "/run/outrelay/relay.sock".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLeases {
    ttl_default_s: u32,
    ttl_cap_s: u32,
    reservation_ms: u64,
    janitor_interval_ms: u64,
    min_port: u16,
    max_port: u16,
    tcp: bool,
    udp: bool,
    max_per_agent: usize,
}

impl Default for RawLeases {
    fn default() -> Self {
        let d = LeaseConfig::default();
        RawLeases {
            ttl_default_s: d.ttl_default_s,
            ttl_cap_s: d.ttl_cap_s,
            reservation_ms: d.reservation_ms,
            janitor_interval_ms: d.janitor_interval_ms,
            min_port: d.min_port,
            max_port: d.max_port,
            tcp: false,
            udp: false,
            max_per_agent: d.max_leases_per_agent,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawIngress {
    hello_deadline_ms: u64,
    max_hello_bytes: usize,
    reverse_handshake_deadline_ms: u64,
    claim_timeout_ms: u64,
    ready_queue_max: usize,
    claim_waiters_max: usize,
    keepalive_interval_ms: u64,
    lease_sync_interval_ms: u64,
    marker_write_deadline_ms: u64,
    lease_conn_max: usize,
    pending_conn_max: usize,
    pending_per_source_max: usize,
    tenant_conn_max: usize,
    source_conn_max: usize,
    public_conn_max: usize,
    fd_reserve: usize,
    root_conn_max: usize,
    root_per_source_max: usize,
    root_conn_max_ms: u64,
    reverse_pending_max: usize,
    reverse_pending_per_source_max: usize,
    reverse_unauth_per_lease_max: usize,
    reverse_accept_v1: bool,
}

impl Default for RawIngress {
    fn default() -> Self {
        let d = IngressConfig::default();
        RawIngress {
            hello_deadline_ms: d.hello_deadline_ms,
            max_hello_bytes: d.max_hello_bytes,
            reverse_handshake_deadline_ms: d.reverse_handshake_deadline_ms,
            claim_timeout_ms: d.claim_timeout_ms,
            ready_queue_max: d.ready_queue_max,
            claim_waiters_max: d.claim_waiters_max,
            keepalive_interval_ms: d.keepalive_interval_ms,
            lease_sync_interval_ms: d.lease_sync_interval_ms,
            marker_write_deadline_ms: d.marker_write_deadline_ms,
            lease_conn_max: d.lease_conn_max,
            pending_conn_max: d.pending_conn_max,
            pending_per_source_max: d.pending_per_source_max,
            tenant_conn_max: d.tenant_conn_max,
            source_conn_max: d.source_conn_max,
            // 0: derived from RLIMIT_NOFILE and `fd_reserve` at start.
            public_conn_max: 0,
            fd_reserve: crate::ingress::limits::DEFAULT_FD_RESERVE,
            root_conn_max: d.root_conn_max,
            root_per_source_max: d.root_per_source_max,
            root_conn_max_ms: d.root_conn_max_ms,
            reverse_pending_max: d.reverse_pending_max,
            reverse_pending_per_source_max: d.reverse_pending_per_source_max,
            reverse_unauth_per_lease_max: d.reverse_unauth_per_lease_max,
            reverse_accept_v1: d.reverse_accept_v1,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUdp {
    flow_idle_ms: u64,
    flow_max: usize,
    flow_per_source_max: usize,
    flow_evict_idle_ms: u64,
    queue_max: usize,
    recv_slot_bytes: usize,
    socket_buffer_bytes: usize,
}

impl Default for RawUdp {
    fn default() -> Self {
        let d = UdpConfig::default();
        RawUdp {
            flow_idle_ms: d.flow_idle_ms,
            flow_max: d.flow_max,
            flow_per_source_max: d.flow_per_source_max,
            flow_evict_idle_ms: d.flow_evict_idle_ms,
            queue_max: d.queue_max,
            recv_slot_bytes: d.recv_slot_bytes,
            socket_buffer_bytes: d.socket_buffer_bytes,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawQuic {
    idle_timeout_ms: Option<u64>,
    keep_alive_ms: Option<u64>,
    hello_deadline_ms: Option<u64>,
    drain_grace_ms: Option<u64>,
    max_concurrent_streams: Option<u32>,
    max_connections_per_identity: Option<usize>,
    lease_frames_per_s: Option<u32>,
    lease_frames_burst: Option<u32>,
    stream_opens_per_s: Option<u32>,
    stream_opens_burst: Option<u32>,
    connection_receive_window_bytes: Option<u64>,
    stream_receive_window_bytes: Option<u64>,
    fallback_max_tunnels: Option<usize>,
    fallback_per_source_max: Option<usize>,
    fallback_queue_bytes: Option<usize>,
    fallback_handshake_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPipes {
    budget_bytes: usize,
    max_pipe_bytes: usize,
}

impl Default for RawPipes {
    fn default() -> Self {
        let d = PipeLimits::default();
        RawPipes {
            budget_bytes: d.budget_bytes,
            max_pipe_bytes: d.max_pipe_bytes,
        }
    }
}

/// `[splice]`: the engines' timers and user-space budgets (whole relay, split across
/// workers like `[pipes]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSplice {
    idle_timeout_ms: u64,
    half_closed_timeout_ms: u64,
    stall_timeout_ms: u64,
    write_stall_timeout_ms: u64,
    copy_budget_bytes: usize,
    copy_buffer_bytes: usize,
    spill_budget_bytes: usize,
}

impl Default for RawSplice {
    fn default() -> Self {
        let d = EngineConfig::default();
        let ms = |t: Duration| u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
        // The engine's defaults are per engine; the relay's keys are for the whole relay
        // (two workers' worth, like the pipe budget's headroom on a 2-core box).
        RawSplice {
            idle_timeout_ms: ms(d.idle_timeout),
            half_closed_timeout_ms: ms(d.half_closed_timeout),
            stall_timeout_ms: ms(d.stall_timeout),
            write_stall_timeout_ms: ms(d.write_stall_timeout),
            copy_budget_bytes: 2 * d.buffers.copy_budget_bytes,
            copy_buffer_bytes: d.buffers.copy_buffer_bytes,
            spill_budget_bytes: 2 * d.buffers.spill_budget_bytes,
        }
    }
}

/// `[bandwidth]`: the default limits of each lease and each tenant, bytes per second each
/// way (0 = none); a controller record for a lease or tenant replaces its default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBandwidth {
    lease_to_service_bytes_per_s: u64,
    lease_to_client_bytes_per_s: u64,
    tenant_to_service_bytes_per_s: u64,
    tenant_to_client_bytes_per_s: u64,
}

/// Most worker threads (each holds a ring, a listener per port and a board column).
const MAX_WORKERS: usize = 256;

/// Validated settings; nothing here can be wrong any more.
#[derive(Debug)]
pub struct Settings {
    /// Worker threads (each: its listeners, connection set-up and splice engine).
    pub workers: usize,
    /// Threads of the tokio runtime (QUIC endpoint, controller client, admin, metrics).
    pub control_threads: usize,
    /// Readiness backend of the engines.
    pub io_backend: Backend,
    /// Pipe limits of the whole relay (`[pipes]`).
    pub pipes: PipeLimits,
    /// The splice engines' settings for the whole relay (`[pipes]`, `[splice]`); each worker
    /// runs [`EngineConfig::per_worker`] of it.
    pub engine: EngineConfig,
    /// TCP address of the reverse-session listener.
    pub reverse_listen: SocketAddr,
    /// TCP address of the public TLS (SNI) listener.
    pub public_tls_listen: SocketAddr,
    /// Prometheus `/metrics` listener; `None` when `listen.metrics = ""`.
    pub metrics_listen: Option<SocketAddr>,
    /// The admin Unix socket; `None` when `listen.admin_socket = ""`.
    pub admin_socket: Option<PathBuf>,
    /// Lease rules.
    pub leases: LeaseConfig,
    /// Ingress limits.
    pub ingress: IngressConfig,
    /// UDP lease limits.
    pub udp: UdpConfig,
    /// The QUIC endpoint.
    pub quic: QuicConfig,
    /// The root-host listener's TLS (`[public_tls]`); `None`: the root host is refused.
    pub public_tls: Option<crate::ingress::root::RootTls>,
    /// The relay's own certificate, key and CA files (`[tls]`), read again on SIGHUP.
    pub tls_files: crate::identity::IdentityFiles,
    /// `[tls] state_dir`: the enrolled identity, renewed by the relay (with `[controller]`).
    pub tls_state_dir: Option<PathBuf>,
    /// The controller client (`[controller]`); `None`: standalone.
    pub controller: Option<crate::control::ControllerConfig>,
    /// After SIGTERM, how long established connections may take to finish.
    pub shutdown_grace_ms: u64,
    /// Service streams (`[mesh]`, and `[[policy]]` when standalone).
    pub mesh: MeshConfig,
    /// Relay-to-relay forwarding (`[forward]`).
    pub forward: crate::forward::ForwardConfig,
    /// eBPF steering (`[ebpf]`).
    pub ebpf: crate::steer::EbpfConfig,
    /// `[log] level` (tracing `EnvFilter` syntax); `None`: the `--log` flag's.
    pub log_level: Option<String>,
    /// `[bandwidth]`: default limits per lease and per tenant (live).
    pub bandwidth: crate::bandwidth::Defaults,
}

/// `[resume]`, checked.
fn resume_config(r: RawResume) -> Result<ResumeConfig, ConfigError> {
    if !(1..=MAX_PARK_TIMEOUT_MS).contains(&r.park_timeout_ms) {
        return Err(bad(
            "resume.park_timeout_ms",
            format!("must be 1..={MAX_PARK_TIMEOUT_MS} ms"),
        ));
    }
    if r.max_parked == 0 {
        return Err(bad("resume.max_parked", "must be at least 1"));
    }
    if r.max_parked_per_agent == 0 {
        return Err(bad("resume.max_parked_per_agent", "must be at least 1"));
    }
    Ok(ResumeConfig {
        enabled: r.enabled,
        park_timeout_ms: r.park_timeout_ms,
        max_parked: r.max_parked,
        max_parked_per_agent: r.max_parked_per_agent,
    })
}

/// `[mesh]`, `[resume]` and `[[policy]]`, checked.
fn mesh_config(
    m: RawMesh,
    resume: RawResume,
    rules: Vec<RawPolicy>,
    standalone: bool,
) -> Result<MeshConfig, ConfigError> {
    let resume = resume_config(resume)?;
    if m.open_timeout_ms < 100 {
        return Err(bad("mesh.open_timeout_ms", "must be at least 100 ms"));
    }
    if m.max_services_per_agent == 0 {
        return Err(bad("mesh.max_services_per_agent", "must be at least 1"));
    }
    if m.max_providers_per_service == 0 {
        return Err(bad("mesh.max_providers_per_service", "must be at least 1"));
    }
    if m.max_streams_per_tenant == 0 {
        return Err(bad("mesh.max_streams_per_tenant", "must be at least 1"));
    }
    if m.stream_idle_timeout_ms < 100 {
        return Err(bad(
            "mesh.stream_idle_timeout_ms",
            "must be at least 100 ms",
        ));
    }
    if !rules.is_empty() && !standalone {
        return Err(bad(
            "policy",
            "static rules are for a relay without [controller]; with one, add rules with `outrelay policy add`",
        ));
    }
    let mut static_rules = Vec::with_capacity(rules.len());
    for (i, r) in rules.into_iter().enumerate() {
        let key = |k: &str| format!("policy[{i}].{k}");
        for (k, v) in [
            ("tenant", &r.tenant),
            ("caller", &r.caller),
            ("target", &r.target),
        ] {
            if v.is_empty() {
                return Err(bad(&key(k), "required"));
            }
        }
        for (k, v) in [
            ("caller", &r.caller),
            ("target", &r.target),
            ("method", &r.method),
        ] {
            if v.len() > 512 || !v.is_ascii() {
                return Err(bad(&key(k), "ASCII, at most 512 bytes"));
            }
        }
        let allow = match r.decision.as_str() {
            "allow" => true,
            "deny" => false,
            _ => return Err(bad(&key("decision"), "must be allow or deny")),
        };
        static_rules.push(StaticRule {
            tenant: r.tenant,
            caller: r.caller,
            target: r.target,
            method: r.method,
            allow,
        });
    }
    Ok(MeshConfig {
        open_timeout_ms: m.open_timeout_ms,
        max_services_per_agent: m.max_services_per_agent,
        max_providers_per_service: m.max_providers_per_service,
        decision_cache_max: m.decision_cache_max,
        decision_cache_ttl_ms: m.decision_cache_ttl_ms,
        max_streams_per_tenant: m.max_streams_per_tenant,
        stream_idle_timeout_ms: m.stream_idle_timeout_ms,
        static_rules,
        resume,
    })
}

/// Command-line overrides (applied before validation).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--io-backend`.
    pub io_backend: Option<String>,
}

impl Settings {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// One line naming the first bad key (the caller exits 64).
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("config", format!("{}: {e}", path.display())))?;
        let raw: Raw =
            toml::from_str(&text).map_err(|e| bad("config", e.message().replace('\n', " ")))?;
        Settings::from_raw(raw, overrides, path.parent().unwrap_or(Path::new(".")))
    }

    fn from_raw(mut raw: Raw, overrides: &Overrides, base: &Path) -> Result<Settings, ConfigError> {
        let root_host = root_host_from_url(&raw.public_url).map_err(|e| bad("public_url", e))?;
        let backend_name = overrides.io_backend.clone().unwrap_or(raw.io_backend);
        let io_backend = match backend_name.as_str() {
            "auto" => Backend::auto(),
            other => other.parse().map_err(|e: String| bad("io_backend", e))?,
        };
        let workers = match raw.workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            n if n > MAX_WORKERS => return Err(bad("workers", format!("at most {MAX_WORKERS}"))),
            n => n,
        };
        if !(1..=64).contains(&raw.control_threads) {
            return Err(bad("control_threads", "must be 1..=64"));
        }
        let addr = |key: &str, v: &str| -> Result<SocketAddr, ConfigError> {
            v.parse().map_err(|e| bad(key, e))
        };
        let port_cfg = |on: bool| {
            if on {
                PortLeaseConfig::on()
            } else {
                PortLeaseConfig::off()
            }
        };
        let leases = LeaseConfig {
            root_host: root_host.clone(),
            ttl_default_s: raw.leases.ttl_default_s,
            ttl_cap_s: raw.leases.ttl_cap_s,
            reservation_ms: raw.leases.reservation_ms,
            janitor_interval_ms: raw.leases.janitor_interval_ms,
            min_port: raw.leases.min_port,
            max_port: raw.leases.max_port,
            tcp: port_cfg(raw.leases.tcp),
            udp: port_cfg(raw.leases.udp),
            max_leases_per_agent: raw.leases.max_per_agent,
        };
        if leases.max_leases_per_agent == 0 {
            return Err(bad("leases.max_per_agent", "must be at least 1"));
        }
        leases.validate().map_err(|e| bad("leases", e))?;
        if let Some((lo, hi)) = ephemeral_range() {
            leases
                .check_ephemeral_overlap(lo, hi)
                .map_err(|e| bad("leases.min_port/max_port", e))?;
        }
        let i = raw.ingress;
        for (key, ms) in [
            ("ingress.hello_deadline_ms", i.hello_deadline_ms),
            (
                "ingress.reverse_handshake_deadline_ms",
                i.reverse_handshake_deadline_ms,
            ),
            ("ingress.claim_timeout_ms", i.claim_timeout_ms),
            ("ingress.keepalive_interval_ms", i.keepalive_interval_ms),
            (
                "ingress.marker_write_deadline_ms",
                i.marker_write_deadline_ms,
            ),
        ] {
            if ms < 100 {
                return Err(bad(key, "must be at least 100 ms"));
            }
        }
        let limit = outrelay_proto::client_hello::MAX_HELLO_BYTES_LIMIT;
        if i.max_hello_bytes == 0 || i.max_hello_bytes > limit {
            return Err(bad(
                "ingress.max_hello_bytes",
                format!("must be 1..={limit}"),
            ));
        }
        if i.ready_queue_max == 0 {
            return Err(bad("ingress.ready_queue_max", "must be at least 1"));
        }
        if i.lease_conn_max == 0 {
            return Err(bad("ingress.lease_conn_max", "must be at least 1"));
        }
        for (key, v) in [
            ("ingress.pending_conn_max", i.pending_conn_max),
            ("ingress.pending_per_source_max", i.pending_per_source_max),
            ("ingress.tenant_conn_max", i.tenant_conn_max),
            ("ingress.source_conn_max", i.source_conn_max),
            ("ingress.root_conn_max", i.root_conn_max),
            ("ingress.root_per_source_max", i.root_per_source_max),
            ("ingress.reverse_pending_max", i.reverse_pending_max),
            (
                "ingress.reverse_pending_per_source_max",
                i.reverse_pending_per_source_max,
            ),
            (
                "ingress.reverse_unauth_per_lease_max",
                i.reverse_unauth_per_lease_max,
            ),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        if !(100..=crate::ingress::root::ROOT_CONN_MAX_MS).contains(&i.root_conn_max_ms) {
            return Err(bad(
                "ingress.root_conn_max_ms",
                format!("must be 100..={}", crate::ingress::root::ROOT_CONN_MAX_MS),
            ));
        }
        if i.fd_reserve < 64 {
            return Err(bad("ingress.fd_reserve", "must be at least 64"));
        }
        // The descriptor budget of public connections: below RLIMIT_NOFILE, two per spliced
        // pair, `fd_reserve` kept for listeners, agents and reverse sessions.
        let nofile = crate::ingress::limits::open_files_limit();
        let fd_budget = crate::ingress::limits::public_conn_budget(
            nofile,
            i.fd_reserve,
            crate::ingress::DEFAULT_PENDING_CONN_MAX,
        );
        let public_conn_max = match i.public_conn_max {
            0 => fd_budget,
            n => {
                if n > fd_budget {
                    tracing::warn!(
                        public_conn_max = n,
                        fd_budget,
                        ?nofile,
                        "ingress.public_conn_max is above what the open-files limit allows"
                    );
                }
                n
            }
        };
        let ingress = IngressConfig {
            hello_deadline_ms: i.hello_deadline_ms,
            max_hello_bytes: i.max_hello_bytes,
            reverse_handshake_deadline_ms: i.reverse_handshake_deadline_ms,
            claim_timeout_ms: i.claim_timeout_ms,
            ready_queue_max: i.ready_queue_max,
            claim_waiters_max: i.claim_waiters_max.max(1),
            keepalive_interval_ms: i.keepalive_interval_ms,
            lease_sync_interval_ms: i.lease_sync_interval_ms.max(10),
            lease_bind_ip: raw
                .listen
                .lease_bind_ip
                .parse::<IpAddr>()
                .map_err(|e| bad("listen.lease_bind_ip", e))?,
            marker_write_deadline_ms: i.marker_write_deadline_ms,
            lease_conn_max: i.lease_conn_max,
            pending_conn_max: i.pending_conn_max,
            pending_per_source_max: i.pending_per_source_max,
            tenant_conn_max: i.tenant_conn_max,
            source_conn_max: i.source_conn_max,
            public_conn_max,
            root_conn_max: i.root_conn_max,
            root_per_source_max: i.root_per_source_max,
            root_conn_max_ms: i.root_conn_max_ms,
            reverse_pending_max: i.reverse_pending_max,
            reverse_pending_per_source_max: i.reverse_pending_per_source_max,
            reverse_unauth_per_lease_max: i.reverse_unauth_per_lease_max,
            reverse_accept_v1: i.reverse_accept_v1,
            root_host: root_host.clone(),
            root_fallback: None,
        };
        let u = raw.udp;
        if u.flow_idle_ms < 100 {
            return Err(bad("udp.flow_idle_ms", "must be at least 100 ms"));
        }
        if u.flow_evict_idle_ms < 100 {
            return Err(bad("udp.flow_evict_idle_ms", "must be at least 100 ms"));
        }
        for (key, v) in [
            ("udp.flow_max", u.flow_max),
            ("udp.flow_per_source_max", u.flow_per_source_max),
            ("udp.queue_max", u.queue_max),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        // Above quinn's largest datagram (MTU upper bound 1452), so nothing that could travel
        // is ever cut by the receive slot.
        if !(1500..=65_536).contains(&u.recv_slot_bytes) {
            return Err(bad("udp.recv_slot_bytes", "must be 1500..=65536"));
        }
        let udp = UdpConfig {
            flow_idle_ms: u.flow_idle_ms,
            flow_max: u.flow_max,
            flow_per_source_max: u.flow_per_source_max,
            flow_evict_idle_ms: u.flow_evict_idle_ms,
            queue_max: u.queue_max,
            recv_slot_bytes: u.recv_slot_bytes,
            socket_buffer_bytes: u.socket_buffer_bytes,
            bind_ip: ingress.lease_bind_ip,
            ..UdpConfig::default()
        };
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let tls_state_dir = if raw.tls.state_dir.as_os_str().is_empty() {
            None
        } else {
            if [&raw.tls.cert, &raw.tls.key, &raw.tls.ca]
                .iter()
                .any(|p| !p.as_os_str().is_empty())
            {
                return Err(bad(
                    "tls.state_dir",
                    "names the enrolled cert.pem, key.pem and ca.pem: leave cert, key and ca out",
                ));
            }
            let dir = resolve(&raw.tls.state_dir);
            raw.tls.cert = dir.join(outrelay_client::store::CERT_FILE);
            raw.tls.key = dir.join(outrelay_client::store::KEY_FILE);
            raw.tls.ca = dir.join(outrelay_client::store::CA_FILE);
            Some(dir)
        };
        if raw.tls.cert.as_os_str().is_empty() {
            return Err(bad(
                "tls.cert",
                "required (the relay's certificate chain, PEM), or tls.state_dir",
            ));
        }
        let tls_files = crate::identity::IdentityFiles {
            cert: resolve(&raw.tls.cert),
            key: resolve(&raw.tls.key),
            ca: resolve(&raw.tls.ca),
        };
        let tls = TlsMaterial::from_pem_files(&tls_files.cert, &tls_files.key, &tls_files.ca)
            .map_err(|e| bad("tls", e))?;
        let public_tls = match (
            raw.public_tls.cert.as_os_str().is_empty(),
            raw.public_tls.key.as_os_str().is_empty(),
        ) {
            (true, true) => None,
            (false, false) => Some(
                crate::ingress::root::load_tls(
                    &resolve(&raw.public_tls.cert),
                    &resolve(&raw.public_tls.key),
                )
                .map_err(|e| bad("public_tls", e))?,
            ),
            _ => return Err(bad("public_tls", "cert and key go together")),
        };
        let controller = match raw.controller {
            None => None,
            Some(c) => {
                let d = crate::control::ControllerConfig::new(
                    c.url,
                    resolve(&raw.tls.cert),
                    resolve(&raw.tls.key),
                    resolve(&raw.tls.ca),
                );
                let cfg = crate::control::ControllerConfig {
                    heartbeat_interval_ms: c
                        .heartbeat_interval_ms
                        .unwrap_or(d.heartbeat_interval_ms),
                    report_timeout_ms: c.report_timeout_ms.unwrap_or(d.report_timeout_ms),
                    reconnect_backoff_ms: c.reconnect_backoff_ms.unwrap_or(d.reconnect_backoff_ms),
                    reconnect_backoff_max_ms: c
                        .reconnect_backoff_max_ms
                        .unwrap_or(d.reconnect_backoff_max_ms),
                    report_queue_max: c.report_queue_max.unwrap_or(d.report_queue_max),
                    state_dir: c.state_dir.map_or(d.state_dir.clone(), |p| resolve(&p)),
                    ..d
                };
                cfg.validate()
                    .map_err(|(key, why)| bad(&format!("controller.{key}"), why))?;
                Some(cfg)
            }
        };
        let mut quic = QuicConfig::new(addr("listen.quic", &raw.listen.quic)?, tls, root_host);
        quic.reverse_addr = raw.reverse_advertise;
        if let Some(v) = raw.quic.idle_timeout_ms {
            quic.idle_timeout_ms = v;
        }
        if let Some(v) = raw.quic.keep_alive_ms {
            quic.keep_alive_ms = v;
        }
        if let Some(v) = raw.quic.hello_deadline_ms {
            quic.hello_deadline_ms = v;
        }
        if let Some(v) = raw.quic.drain_grace_ms {
            quic.drain_grace_ms = v;
        }
        let q = &raw.quic;
        quic.max_concurrent_streams = q
            .max_concurrent_streams
            .unwrap_or(quic.max_concurrent_streams);
        quic.max_connections_per_identity = q
            .max_connections_per_identity
            .unwrap_or(quic.max_connections_per_identity);
        quic.lease_frames_per_s = q.lease_frames_per_s.unwrap_or(quic.lease_frames_per_s);
        quic.lease_frames_burst = q.lease_frames_burst.unwrap_or(quic.lease_frames_burst);
        quic.stream_opens_per_s = q.stream_opens_per_s.unwrap_or(quic.stream_opens_per_s);
        quic.stream_opens_burst = q.stream_opens_burst.unwrap_or(quic.stream_opens_burst);
        quic.connection_receive_window_bytes = q
            .connection_receive_window_bytes
            .unwrap_or(quic.connection_receive_window_bytes);
        quic.stream_receive_window_bytes = q
            .stream_receive_window_bytes
            .unwrap_or(quic.stream_receive_window_bytes);
        let f = &mut quic.fallback;
        f.max_tunnels = q.fallback_max_tunnels.unwrap_or(f.max_tunnels);
        f.per_source_max = q.fallback_per_source_max.unwrap_or(f.per_source_max);
        f.queue_bytes = q.fallback_queue_bytes.unwrap_or(f.queue_bytes);
        f.handshake_ms = q.fallback_handshake_ms.unwrap_or(f.handshake_ms);
        quic.validate().map_err(|e| bad("quic", e))?;
        if raw.pipes.budget_bytes < 64 * 1024 {
            return Err(bad("pipes.budget_bytes", "must be at least 65536"));
        }
        let mesh = mesh_config(raw.mesh, raw.resume, raw.policy, controller.is_none())?;
        let forward = crate::forward::ForwardConfig {
            advertise: raw.forward.advertise,
            max_peers: raw.forward.max_peers,
            max_streams_per_peer: raw.forward.max_streams_per_peer,
            max_streams_per_peer_per_tenant: raw.forward.max_streams_per_peer_per_tenant,
            max_streams: raw.forward.max_streams,
            connect_timeout_ms: raw.forward.connect_timeout_ms,
        };
        forward.validate().map_err(|(key, why)| bad(key, why))?;
        let ebpf = crate::steer::EbpfConfig {
            mode: match raw.ebpf.mode.as_str() {
                "auto" => crate::steer::EbpfMode::auto(),
                other => other.parse().map_err(|e: String| bad("ebpf.mode", e))?,
            },
            reuseport: raw.ebpf.reuseport,
            lookup: raw.ebpf.lookup,
        };
        let pipes = PipeLimits {
            budget_bytes: raw.pipes.budget_bytes,
            max_pipe_bytes: raw.pipes.max_pipe_bytes.max(4096),
            ..PipeLimits::default()
        };
        let engine = engine_config(raw.splice, io_backend, pipes)?;
        let log_level = match raw.log.level.as_str() {
            "" => None,
            level => {
                tracing_subscriber::EnvFilter::try_new(level).map_err(|e| bad("log.level", e))?;
                Some(level.to_owned())
            }
        };
        Ok(Settings {
            workers,
            control_threads: raw.control_threads,
            io_backend,
            pipes,
            engine,
            reverse_listen: addr("listen.reverse", &raw.listen.reverse)?,
            public_tls_listen: addr("listen.public_tls", &raw.listen.public_tls)?,
            admin_socket: match raw.listen.admin_socket.as_str() {
                "" => None,
                p => Some(PathBuf::from(p)),
            },
            metrics_listen: match raw.listen.metrics.as_str() {
                "" => None,
                m => Some(addr("listen.metrics", m)?),
            },
            leases,
            ingress,
            udp,
            quic,
            public_tls,
            tls_files,
            tls_state_dir,
            controller,
            shutdown_grace_ms: raw.lifecycle.shutdown_grace_ms,
            mesh,
            forward,
            ebpf,
            log_level,
            bandwidth: crate::bandwidth::Defaults {
                lease: crate::bandwidth::Limit {
                    to_service_bytes_per_s: raw.bandwidth.lease_to_service_bytes_per_s,
                    to_client_bytes_per_s: raw.bandwidth.lease_to_client_bytes_per_s,
                },
                tenant: crate::bandwidth::Limit {
                    to_service_bytes_per_s: raw.bandwidth.tenant_to_service_bytes_per_s,
                    to_client_bytes_per_s: raw.bandwidth.tenant_to_client_bytes_per_s,
                },
            },
        })
    }
}

/// `[splice]` (with `[pipes]`), checked.
fn engine_config(
    s: RawSplice,
    backend: Backend,
    pipes: PipeLimits,
) -> Result<EngineConfig, ConfigError> {
    let config = EngineConfig {
        backend,
        pipes,
        buffers: BufferLimits {
            copy_budget_bytes: s.copy_budget_bytes,
            copy_buffer_bytes: s.copy_buffer_bytes,
            spill_budget_bytes: s.spill_budget_bytes,
        },
        idle_timeout: Duration::from_millis(s.idle_timeout_ms),
        half_closed_timeout: Duration::from_millis(s.half_closed_timeout_ms),
        stall_timeout: Duration::from_millis(s.stall_timeout_ms),
        write_stall_timeout: Duration::from_millis(s.write_stall_timeout_ms),
        ..EngineConfig::default()
    };
    config.validate().map_err(|(key, why)| match key {
        "pipe_budget_bytes" => bad("pipes.budget_bytes", why),
        key => bad(&format!("splice.{key}"), why),
    })?;
    Ok(config)
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), if readable.
fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrelay_lifecycle::config_doc;

    /// The defaults of keys the raw struct leaves `None` (applied in [`Settings::from_raw`]).
    fn option_default(path: &str) -> Option<toml::Value> {
        use crate::control as c;
        use crate::quic as q;
        let int = |v: u64| i64::try_from(v).ok().map(toml::Value::Integer);
        match path {
            "quic.idle_timeout_ms" => int(q::DEFAULT_IDLE_TIMEOUT_MS),
            "quic.keep_alive_ms" => int(q::DEFAULT_KEEP_ALIVE_MS),
            "quic.hello_deadline_ms" => int(q::DEFAULT_HELLO_DEADLINE_MS),
            "quic.drain_grace_ms" => int(q::DEFAULT_DRAIN_GRACE_MS),
            "quic.max_concurrent_streams" => int(q::DEFAULT_MAX_CONCURRENT_STREAMS.into()),
            "quic.max_connections_per_identity" => {
                int(q::DEFAULT_MAX_CONNECTIONS_PER_IDENTITY as u64)
            }
            "quic.lease_frames_per_s" => int(q::DEFAULT_LEASE_FRAMES_PER_S.into()),
            "quic.lease_frames_burst" => int(q::DEFAULT_LEASE_FRAMES_BURST.into()),
            "quic.stream_opens_per_s" => int(q::DEFAULT_STREAM_OPENS_PER_S.into()),
            "quic.stream_opens_burst" => int(q::DEFAULT_STREAM_OPENS_BURST.into()),
            "quic.connection_receive_window_bytes" => {
                int(q::DEFAULT_CONNECTION_RECEIVE_WINDOW_BYTES)
            }
            "quic.stream_receive_window_bytes" => int(q::DEFAULT_STREAM_RECEIVE_WINDOW_BYTES),
            "quic.fallback_max_tunnels" => int(q::fallback::DEFAULT_MAX_TUNNELS as u64),
            "quic.fallback_per_source_max" => int(q::fallback::DEFAULT_PER_SOURCE_MAX as u64),
            "quic.fallback_queue_bytes" => int(q::fallback::DEFAULT_QUEUE_BYTES as u64),
            "quic.fallback_handshake_ms" => int(q::fallback::DEFAULT_HANDSHAKE_MS),
            "controller.heartbeat_interval_ms" => int(c::DEFAULT_HEARTBEAT_INTERVAL_MS),
            "controller.report_timeout_ms" => int(c::DEFAULT_REPORT_TIMEOUT_MS),
            "controller.reconnect_backoff_ms" => int(c::DEFAULT_RECONNECT_BACKOFF_MS),
            "controller.reconnect_backoff_max_ms" => int(c::DEFAULT_RECONNECT_BACKOFF_MAX_MS),
            "controller.report_queue_max" => int(c::DEFAULT_REPORT_QUEUE_MAX as u64),
            "controller.state_dir" => Some(toml::Value::String(c::DEFAULT_STATE_DIR.into())),
            _ => None,
        }
    }

    fn is_default(path: &str, v: &toml::Value) -> Option<bool> {
        if path.starts_with("quic.") || path.starts_with("controller.") {
            return option_default(path).map(|d| d == *v);
        }
        let context = if path.starts_with("policy.") {
            "[[policy]]\ntenant = \"t\"\ncaller = \"*\"\ntarget = \"s\"\ndecision = \"allow\"\n"
        } else {
            ""
        };
        config_doc::default_matches::<Raw>(path, v, context)
    }

    #[test]
    fn docs_config_md_lists_every_relay_key_with_its_default() {
        let keys = config_doc::keys::<Raw>().expect("walk the raw config");
        let md = include_str!("../../../docs/config.md");
        let problems = config_doc::check_with(
            md,
            "outrelay-relay",
            &keys,
            is_default,
            crate::reload::key_reload,
        );
        assert!(
            problems.is_empty(),
            "docs/config.md no longer matches dataplane/relay/src/config.rs:\n{}",
            problems.join("\n")
        );
    }
}
