//! The agent's configuration: TOML read into raw structs, converted ONCE into validated
//! [`Settings`] before any socket is opened. Every timeout and interval is a config value (at
//! least [`MIN_DURATION_MS`]) so end-to-end tests can use short ones. `expose` builds the same
//! [`Settings`] from flags ([`Settings::from_expose`]).
//!
//! ```toml
//! relays = ["relay.example.com:7443"]   # QUIC addresses, one or more (each gets every lease)
//! server_name = "localhost"             # name checked in the relay certificate
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
//! [splice]    workers = 1  io_backend = "auto"  idle_timeout_ms = 3600000
//!             half_closed_timeout_ms = 60000
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outrelay_io::Backend;
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
    relays: Vec<String>,
    server_name: String,
    identity: RawIdentity,
    lease: Vec<RawLease>,
    metrics: RawMetrics,
    pool: RawPool,
    connection: RawConnection,
    local: RawLocal,
    splice: RawSplice,
    udp: RawUdp,
    lifecycle: outrelay_lifecycle::RawLifecycle,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            relays: Vec::new(),
            server_name: "localhost".into(),
            identity: RawIdentity::default(),
            lease: Vec::new(),
            metrics: RawMetrics::default(),
            pool: RawPool::default(),
            connection: RawConnection::default(),
            local: RawLocal::default(),
            splice: RawSplice::default(),
            udp: RawUdp::default(),
            lifecycle: outrelay_lifecycle::RawLifecycle::default(),
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
}

impl Default for RawSplice {
    fn default() -> Self {
        RawSplice {
            workers: 1,
            io_backend: "auto".into(),
            idle_timeout_ms: 3_600_000,
            half_closed_timeout_ms: 60_000,
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

/// The splice engines.
#[derive(Debug, Clone)]
pub struct SpliceConfig {
    /// Engine threads.
    pub workers: usize,
    /// Readiness backend.
    pub io_backend: Backend,
    /// A spliced pair with no byte for this long is closed.
    pub idle_timeout: Duration,
    /// A pair with one direction ended is closed this long after.
    pub half_closed_timeout: Duration,
}

/// Validated settings; nothing here can be wrong any more.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Relay QUIC addresses (`host:port`), each dialled and given every lease.
    pub relays: Vec<String>,
    /// Server name checked against the relay certificate's DNS names.
    pub server_name: String,
    /// Identity files.
    pub identity: IdentityFiles,
    /// With a state directory: the directory and the controller that renews its certificate
    /// (`None` when neither the config nor the enrollment named one: no renewal).
    pub renewal: Option<(PathBuf, Option<String>)>,
    /// Leases (at least one, unique names).
    pub leases: Vec<LeaseSpec>,
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
}

/// The flags of `outrelay-agent expose`.
#[derive(Debug, Clone, Default)]
pub struct ExposeArgs {
    /// Relay QUIC address.
    pub relay: String,
    /// Server name of the relay certificate.
    pub server_name: String,
    /// Lease name.
    pub name: String,
    /// `--tls-to`.
    pub tls_to: Option<String>,
    /// `--tcp-to`.
    pub tcp_to: Option<String>,
    /// `--udp-to`.
    pub udp_to: Option<String>,
    /// `--cert/--key/--ca`.
    pub files: Option<(PathBuf, PathBuf, PathBuf)>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--metrics` (`""` = off; `None` = default).
    pub metrics: Option<String>,
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
        if args.files.is_none() && args.state_dir.is_none() {
            return Err(bad("--cert/--key/--ca", "give them, or --state-dir"));
        }
        let mut raw = Raw {
            relays: vec![args.relay],
            ..Raw::default()
        };
        if !args.server_name.is_empty() {
            raw.server_name = args.server_name;
        }
        if let Some((cert, key, ca)) = args.files {
            raw.identity.cert = cert.display().to_string();
            raw.identity.key = key.display().to_string();
            raw.identity.ca = ca.display().to_string();
        }
        if let Some(dir) = args.state_dir {
            raw.identity.state_dir = dir.display().to_string();
        }
        if let Some(m) = args.metrics {
            raw.metrics.listen = m;
        }
        raw.lease.push(RawLease {
            name: args.name,
            tls_to: args.tls_to.unwrap_or_default(),
            tcp_to: args.tcp_to.unwrap_or_default(),
            udp_to: args.udp_to.unwrap_or_default(),
            wildcard: false,
            ttl_s: DEFAULT_LEASE_TTL_S,
        });
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
        if raw.lease.is_empty() {
            return Err(bad("lease", "at least one [[lease]] is required"));
        }
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
            leases.push(LeaseSpec {
                name: l.name,
                tls_to,
                tcp_to,
                udp_to,
                wildcard: l.wildcard,
                ttl_s: l.ttl_s,
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
            "auto" => Backend::probe(),
            other => other
                .parse()
                .map_err(|e: String| bad("splice.io_backend", e))?,
        };
        let splice = SpliceConfig {
            workers: s.workers,
            io_backend,
            idle_timeout: dur("splice.idle_timeout_ms", s.idle_timeout_ms)?,
            half_closed_timeout: dur("splice.half_closed_timeout_ms", s.half_closed_timeout_ms)?,
        };
        if raw.udp.flow_max == 0 {
            return Err(bad("udp.flow_max", "must be at least 1"));
        }
        let udp = UdpConfig {
            flow_idle: dur("udp.flow_idle_ms", raw.udp.flow_idle_ms)?,
            flow_max: raw.udp.flow_max,
        };
        Ok(Settings {
            relays: raw.relays,
            server_name: raw.server_name,
            identity,
            renewal,
            leases,
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
    fn minimal_config_gets_defaults_and_relative_paths() {
        let s = parse(MINIMAL).expect("valid");
        assert_eq!(s.identity.cert, PathBuf::from("/etc/outrelay/a.pem"));
        assert_eq!(s.identity.ca, PathBuf::from("/ca.pem"));
        assert_eq!(s.pool.idle, 2);
        assert_eq!(s.pool.dead_session, Duration::from_secs(30));
        assert_eq!(s.connection.reconnect_initial, Duration::from_secs(1));
        assert_eq!(s.connection.reconnect_max, Duration::from_secs(30));
        assert_eq!(
            s.metrics_listen,
            Some("127.0.0.1:7462".parse().expect("addr"))
        );
        assert_eq!(s.leases[0].tcp_to, None);
        assert_eq!(s.server_name, "localhost");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("relays = []", "relays"),
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
}
