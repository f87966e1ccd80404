//! The relay's lease table: every lease rule of `shared/spec/public-ingress.md` ("Leases") as
//! pure, single-threaded logic owned by the relay's control thread. No sockets, no clock, no
//! tokio: every operation takes `now: Instant`, lease ids come from an injected source, and the
//! controller's verdict is an input ([`ControllerDecision`]).
//!
//! Data path hand-off: after a mutating call the relay checks [`LeaseTable::generation`] and, if
//! it moved, publishes [`LeaseTable::routes`] (an immutable [`RouteTable`]) with one `ArcSwap`.
//!
//! Liveness: a lease is live while `now < expires_at`. Every operation first expires what has
//! ended (so an expired lease can be neither renewed nor conflict with a new one); the
//! janitor's [`LeaseTable::sweep`] returns the leases that ended so the relay can close their
//! reverse sessions and republish routes.

mod inherit;
mod ports;
mod routes;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use outrelay_proto::hostname::{HostName, LeaseName};
use outrelay_proto::identity::Identity;
use outrelay_proto::orp;
use outrelay_proto::reverse::LeaseId;

pub use inherit::{
    EXPECT_WAIT_MAX_MS, Expected, Inherited, InheritedLease, WantedPorts, expected_until,
};
use ports::PortAllocator;
pub use routes::{RouteEntry, RouteTable};

/// Default lease TTL when LEASE_REGISTER or LEASE_RENEW says `ttl_s: 0`.
pub const DEFAULT_TTL_S: u32 = 30;
/// Default cap on a requested TTL (Portal has none, which is a hole).
pub const DEFAULT_TTL_CAP_S: u32 = 300;
/// Default time a released or expired hostname or port stays reserved (5 minutes).
pub const DEFAULT_RESERVATION_MS: u64 = 5 * 60 * 1000;
/// Default janitor interval (how often the relay calls [`LeaseTable::sweep`]).
pub const DEFAULT_JANITOR_INTERVAL_MS: u64 = 5_000;
/// Shortest duration any config value may have (end-to-end tests use short ones).
pub const MIN_DURATION_MS: u64 = 100;
/// Default lowest public port for TCP/UDP leases (below Linux's default ephemeral range
/// 32768..=60999, which config validation refuses to overlap).
pub const DEFAULT_MIN_PORT: u16 = 20_000;
/// Default highest public port for TCP/UDP leases.
pub const DEFAULT_MAX_PORT: u16 = 20_999;
/// Default bound on live leases one agent identity may hold on this relay (all its
/// connections together).
pub const DEFAULT_MAX_LEASES_PER_AGENT: usize = 256;
/// The LEASE_ERROR message (code `lease_rejected`) when an agent is at
/// [`LeaseConfig::max_leases_per_agent`].
pub const AGENT_LEASE_LIMIT: &str = "agent_lease_limit";
/// How many random lease ids [`LeaseTable::register`] tries before answering `internal`.
pub const LEASE_ID_ATTEMPTS_MAX: u32 = 4;

/// The LEASE_ERROR message for `hostname_conflict` when another tenant holds or reserves the
/// name (held or reserved alike, so a probe learns no more than "not available").
const HOSTNAME_UNAVAILABLE: &str = "hostname is not available";
/// The LEASE_ERROR message for `hostname_conflict` when another agent of the same tenant holds
/// the name, or it is still reserved to that agent (the controller's answer for a live record
/// of another agent is the same word).
pub const NAME_TAKEN: &str = "name_taken";

/// Names one agent QUIC connection (the relay numbers them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// The two port transports, each with its own allocator and gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortTransport {
    /// Raw TCP port leases.
    Tcp,
    /// UDP port leases.
    Udp,
}

/// The admin's runtime enablement of one port transport (from the controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminGate {
    /// False: requests get `tcp_port_disabled` / `udp_disabled`.
    pub enabled: bool,
    /// Most live leases of this transport on this relay; `None`: no limit beyond the range.
    pub max_leases: Option<u32>,
}

/// Configuration of one port transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortLeaseConfig {
    /// The feature is compiled/configured on; false: `feature_unavailable`.
    pub feature_enabled: bool,
    /// The admin gate the table starts with (the controller may change it at run time).
    pub admin: AdminGate,
}

/// Every lease limit of `public-ingress.md`, with units in the names. `Default` matches the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The host part of the relay's public URL, lowercased (see [`root_host_from_url`]).
    pub root_host: String,
    /// TTL used when a request says `ttl_s: 0`.
    pub ttl_default_s: u32,
    /// Requested TTLs above this are cut to it.
    pub ttl_cap_s: u32,
    /// How long a released or expired hostname and port stay reserved to the agent identity
    /// that held them (and that name, for the port).
    pub reservation_ms: u64,
    /// How often the relay calls [`LeaseTable::sweep`] (the table itself does not use it).
    pub janitor_interval_ms: u64,
    /// Lowest public port of both the TCP and the UDP allocator.
    pub min_port: u16,
    /// Highest public port (inclusive) of both allocators.
    pub max_port: u16,
    /// TCP port leases.
    pub tcp: PortLeaseConfig,
    /// UDP port leases.
    pub udp: PortLeaseConfig,
    /// Live leases one agent identity may hold (replacing one of its own names does not
    /// count twice); at least 1.
    pub max_leases_per_agent: usize,
}

impl PortLeaseConfig {
    /// Port leases switched on in config and admin-enabled without a cap.
    pub fn on() -> PortLeaseConfig {
        PortLeaseConfig {
            feature_enabled: true,
            admin: AdminGate {
                enabled: true,
                max_leases: None,
            },
        }
    }

    /// Port leases switched off in config (`feature_unavailable`).
    pub fn off() -> PortLeaseConfig {
        PortLeaseConfig {
            feature_enabled: false,
            ..PortLeaseConfig::on()
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        // Public TCP/UDP lease ports are off unless configured (product.md: "off when unset");
        // once an operator turns them on, the admin gate starts open without a cap and the
        // controller restricts it.
        let port = PortLeaseConfig::off();
        LeaseConfig {
            root_host: "localhost".to_owned(),
            ttl_default_s: DEFAULT_TTL_S,
            ttl_cap_s: DEFAULT_TTL_CAP_S,
            reservation_ms: DEFAULT_RESERVATION_MS,
            janitor_interval_ms: DEFAULT_JANITOR_INTERVAL_MS,
            min_port: DEFAULT_MIN_PORT,
            max_port: DEFAULT_MAX_PORT,
            tcp: port,
            udp: port,
            max_leases_per_agent: DEFAULT_MAX_LEASES_PER_AGENT,
        }
    }
}

/// Why a [`LeaseConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `root_host` is not a valid host name.
    #[error("root_host {0:?} is not a valid host name")]
    BadRootHost(String),
    /// A public URL had no host part.
    #[error("public URL {0:?} has no host")]
    BadPublicUrl(String),
    /// A TTL is zero or the default exceeds the cap.
    #[error("ttl_default_s ({default_s}) must be between 1 and ttl_cap_s ({cap_s})")]
    BadTtl {
        /// The configured default.
        default_s: u32,
        /// The configured cap.
        cap_s: u32,
    },
    /// A duration below [`MIN_DURATION_MS`].
    #[error("{field} must be at least {MIN_DURATION_MS} ms, got {value_ms} ms")]
    DurationTooShort {
        /// The config field.
        field: &'static str,
        /// Its value.
        value_ms: u64,
    },
    /// A count limit of zero.
    #[error("{0} must be at least 1")]
    ZeroLimit(&'static str),
    /// The port range overlaps the kernel's ephemeral port range.
    #[error(
        "port range {min_port}..={max_port} overlaps the ephemeral range {eph_min}..={eph_max}"
    )]
    EphemeralOverlap {
        /// Configured lowest port.
        min_port: u16,
        /// Configured highest port.
        max_port: u16,
        /// Kernel's lowest ephemeral port.
        eph_min: u16,
        /// Kernel's highest ephemeral port.
        eph_max: u16,
    },
}

impl LeaseConfig {
    /// Checks the values the table relies on. An unusable port range is not refused here (the
    /// spec gates TCP/UDP leases on "a valid port range": such requests get
    /// `feature_unavailable`); see [`LeaseConfig::check_ephemeral_overlap`] for the kernel check.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        HostName::parse(self.root_host.as_bytes())
            .map_err(|_| ConfigError::BadRootHost(self.root_host.clone()))?;
        if self.ttl_default_s == 0 || self.ttl_default_s > self.ttl_cap_s {
            return Err(ConfigError::BadTtl {
                default_s: self.ttl_default_s,
                cap_s: self.ttl_cap_s,
            });
        }
        for (field, value_ms) in [
            ("reservation_ms", self.reservation_ms),
            ("janitor_interval_ms", self.janitor_interval_ms),
        ] {
            if value_ms < MIN_DURATION_MS {
                return Err(ConfigError::DurationTooShort { field, value_ms });
            }
        }
        if self.max_leases_per_agent == 0 {
            return Err(ConfigError::ZeroLimit("max_leases_per_agent"));
        }
        Ok(())
    }

    /// Refuses a port range that overlaps the kernel's ephemeral range
    /// (`net.ipv4.ip_local_port_range`, read by the caller).
    ///
    /// # Errors
    /// [`ConfigError::EphemeralOverlap`].
    pub fn check_ephemeral_overlap(&self, eph_min: u16, eph_max: u16) -> Result<(), ConfigError> {
        let port_leases_on = self.tcp.feature_enabled || self.udp.feature_enabled;
        if port_leases_on && self.min_port <= eph_max && eph_min <= self.max_port {
            return Err(ConfigError::EphemeralOverlap {
                min_port: self.min_port,
                max_port: self.max_port,
                eph_min,
                eph_max,
            });
        }
        Ok(())
    }
}

/// `root_host` from the relay's public URL: the host part, lowercased, no port, no path
/// (`https://portal.example.com:8443/admin` → `portal.example.com`).
///
/// # Errors
/// [`ConfigError::BadPublicUrl`] without a host, [`ConfigError::BadRootHost`] for an invalid one.
pub fn root_host_from_url(url: &str) -> Result<String, ConfigError> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host_port.split_once(':').map_or(host_port, |(h, _)| h);
    if host.is_empty() {
        return Err(ConfigError::BadPublicUrl(url.to_owned()));
    }
    HostName::parse(host.as_bytes())
        .map(|h| h.as_str().to_owned())
        .map_err(|_| ConfigError::BadRootHost(host.to_owned()))
}

/// Every LEASE_ERROR code of `public-ingress.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseErrorCode {
    /// 400: a malformed request (bad name, hostname too long).
    InvalidRequest,
    /// 403: the identity may not hold leases, or it is banned.
    Unauthorized,
    /// 404: no such lease on this connection.
    LeaseNotFound,
    /// 403: the controller did not make the lease routable (manual approval, quota, rejection).
    LeaseRejected,
    /// 409: the hostname is held by another identity or reserved to another one.
    HostnameConflict,
    /// 409: the requested exposures cannot be served together (see [`LeaseTable::register`]).
    TransportMismatch,
    /// 503: TCP or UDP port leases are off in config, or the port range is unusable.
    FeatureUnavailable,
    /// 403: the admin has TCP port leases disabled.
    TcpPortDisabled,
    /// 503: the admin's max number of TCP port leases is reached.
    TcpPortCapacityExceeded,
    /// 503: no free TCP port in the range.
    TcpPortExhausted,
    /// 403: the admin has UDP leases disabled.
    UdpDisabled,
    /// 503: the admin's max number of UDP leases is reached.
    UdpCapacityExceeded,
    /// 503: no free UDP port in the range.
    UdpPortExhausted,
    /// 500: the relay failed (e.g. could not draw a fresh lease id).
    Internal,
    /// 503: the relay is draining (`outrelay relay drain`): register on another relay.
    Draining,
}

impl LeaseErrorCode {
    /// Every code, for exhaustive tests and metric label registration.
    pub const ALL: [LeaseErrorCode; 15] = [
        LeaseErrorCode::InvalidRequest,
        LeaseErrorCode::Unauthorized,
        LeaseErrorCode::LeaseNotFound,
        LeaseErrorCode::LeaseRejected,
        LeaseErrorCode::HostnameConflict,
        LeaseErrorCode::TransportMismatch,
        LeaseErrorCode::FeatureUnavailable,
        LeaseErrorCode::TcpPortDisabled,
        LeaseErrorCode::TcpPortCapacityExceeded,
        LeaseErrorCode::TcpPortExhausted,
        LeaseErrorCode::UdpDisabled,
        LeaseErrorCode::UdpCapacityExceeded,
        LeaseErrorCode::UdpPortExhausted,
        LeaseErrorCode::Internal,
        LeaseErrorCode::Draining,
    ];

    /// The wire string (LEASE_ERROR `code`).
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseErrorCode::InvalidRequest => "invalid_request",
            LeaseErrorCode::Unauthorized => "unauthorized",
            LeaseErrorCode::LeaseNotFound => "lease_not_found",
            LeaseErrorCode::LeaseRejected => "lease_rejected",
            LeaseErrorCode::HostnameConflict => "hostname_conflict",
            LeaseErrorCode::TransportMismatch => "transport_mismatch",
            LeaseErrorCode::FeatureUnavailable => "feature_unavailable",
            LeaseErrorCode::TcpPortDisabled => "tcp_port_disabled",
            LeaseErrorCode::TcpPortCapacityExceeded => "tcp_port_capacity_exceeded",
            LeaseErrorCode::TcpPortExhausted => "tcp_port_exhausted",
            LeaseErrorCode::UdpDisabled => "udp_disabled",
            LeaseErrorCode::UdpCapacityExceeded => "udp_capacity_exceeded",
            LeaseErrorCode::UdpPortExhausted => "udp_port_exhausted",
            LeaseErrorCode::Internal => "internal",
            LeaseErrorCode::Draining => "draining",
        }
    }

    /// The HTTP-like status the spec gives the code.
    pub fn status(self) -> u16 {
        match self {
            LeaseErrorCode::InvalidRequest => 400,
            LeaseErrorCode::Unauthorized
            | LeaseErrorCode::LeaseRejected
            | LeaseErrorCode::TcpPortDisabled
            | LeaseErrorCode::UdpDisabled => 403,
            LeaseErrorCode::LeaseNotFound => 404,
            LeaseErrorCode::HostnameConflict | LeaseErrorCode::TransportMismatch => 409,
            LeaseErrorCode::Internal => 500,
            LeaseErrorCode::FeatureUnavailable
            | LeaseErrorCode::TcpPortCapacityExceeded
            | LeaseErrorCode::TcpPortExhausted
            | LeaseErrorCode::UdpCapacityExceeded
            | LeaseErrorCode::UdpPortExhausted
            | LeaseErrorCode::Draining => 503,
        }
    }
}

impl fmt::Display for LeaseErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused lease operation: the code and a short message for LEASE_ERROR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} ({}): {message}", code.status())]
pub struct Refusal {
    /// The LEASE_ERROR code.
    pub code: LeaseErrorCode,
    /// Human-readable detail; for manual approval exactly `pending_approval`. Never names
    /// another tenant or connection.
    pub message: Cow<'static, str>,
}

impl Refusal {
    fn new(code: LeaseErrorCode, message: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// The LEASE_ERROR frame answering request `request_id`.
    pub fn to_frame(&self, request_id: u64) -> orp::LeaseError {
        orp::LeaseError {
            request_id,
            code: self.code.as_str().to_owned(),
            message: self.message.to_string(),
        }
    }
}

impl From<LeaseErrorCode> for Refusal {
    fn from(code: LeaseErrorCode) -> Refusal {
        Refusal::new(code, code.as_str())
    }
}

/// The controller's verdict on a LEASE_REGISTER (approval mode, quotas, bans), fetched by the
/// relay before it calls [`LeaseTable::register`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControllerDecision {
    /// Routable.
    Approved,
    /// Manual approval mode and not yet approved → `lease_rejected` / `pending_approval`.
    PendingApproval,
    /// Rejected with a reason → `lease_rejected` / the reason.
    Rejected(String),
    /// The tenant or agent is banned → `unauthorized` / `banned`.
    Banned,
    /// The tenant's lease quota is used up → `lease_rejected` / `quota_exceeded`.
    QuotaExceeded,
}

/// Who holds a lease: the tenant and the agent's identity URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseOwner {
    /// The agent's tenant.
    pub tenant: String,
    /// The agent's identity URI (`outrelay://<tenant>/agent/<uuid>`).
    pub agent_uri: String,
}

impl LeaseOwner {
    /// The owner for an authenticated identity; only agents hold leases.
    ///
    /// # Errors
    /// `unauthorized` for relay and admin identities.
    pub fn from_identity(identity: &Identity) -> Result<LeaseOwner, Refusal> {
        match identity {
            Identity::Agent { tenant, .. } => Ok(LeaseOwner {
                tenant: tenant.as_str().to_owned(),
                agent_uri: identity.to_string(),
            }),
            _ => Err(Refusal::new(
                LeaseErrorCode::Unauthorized,
                "only agents hold leases",
            )),
        }
    }
}

/// The key a released port stays reserved to: `(agent identity URI, name)` (the URI names the
/// tenant too).
pub(crate) type ReservationKey = (String, LeaseName);

/// A live lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Relay-chosen random id.
    pub id: LeaseId,
    /// The connection that was granted the lease (the only one whose frames it honours).
    pub conn: ConnId,
    /// Who holds it.
    pub owner: LeaseOwner,
    /// The normalised name.
    pub name: LeaseName,
    /// `<name>.<root_host>`, held by this lease whatever its exposures.
    pub hostname: HostName,
    /// Routed by SNI on the public TLS port.
    pub tls: bool,
    /// Also routes `*.<hostname>` (one level).
    pub wildcard: bool,
    /// The agent asked for the public client's addresses (`LeaseRegister.client_addr`): its
    /// sessions get markers 0x03/0x04 + address block, its datagrams the block.
    pub client_addr: bool,
    /// The public TCP port, if a TCP lease.
    pub tcp_port: Option<u16>,
    /// The public UDP port, if a UDP lease.
    pub udp_port: Option<u16>,
    /// The UDP slot on its connection (1-based; 0 without UDP).
    pub udp_slot: u32,
    /// The effective TTL (after default and cap).
    pub ttl_s: u32,
    /// The lease stops routing at this instant unless renewed.
    pub expires_at: Instant,
}

impl Lease {
    /// The grant describing this lease now.
    pub fn grant(&self) -> Grant {
        Grant {
            lease_id: self.id,
            hostname: self.hostname,
            tcp_port: self.tcp_port,
            udp_port: self.udp_port,
            udp_slot: self.udp_slot,
            client_addr: self.client_addr,
            ttl_s: self.ttl_s,
            expires_at: self.expires_at,
        }
    }
}

/// The answer to a successful register or renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The lease.
    pub lease_id: LeaseId,
    /// `<name>.<root_host>`.
    pub hostname: HostName,
    /// The public TCP port, if any.
    pub tcp_port: Option<u16>,
    /// The public UDP port, if any.
    pub udp_port: Option<u16>,
    /// The UDP slot (0 without UDP).
    pub udp_slot: u32,
    /// The relay passes the client's addresses (echoed in LEASE_GRANT).
    pub client_addr: bool,
    /// The effective TTL.
    pub ttl_s: u32,
    /// When the lease expires unless renewed.
    pub expires_at: Instant,
}

/// Relay addresses a LEASE_GRANT carries.
#[derive(Debug, Clone, Copy)]
pub struct GrantAddrs<'a> {
    /// Public host for `tcp_addr`/`udp_addr` (`host:port`), usually the root host.
    pub public_host: &'a str,
    /// The reverse-session address `host:port`.
    pub reverse_addr: &'a str,
}

impl Grant {
    /// The LEASE_GRANT frame. `now`/`now_unix_ms` are the same moment on the two clocks; the
    /// expiry is converted from `expires_at`.
    pub fn to_frame(
        &self,
        request_id: u64,
        addrs: GrantAddrs<'_>,
        now: Instant,
        now_unix_ms: i64,
    ) -> orp::LeaseGrant {
        let left_ms = i64::try_from(self.expires_at.saturating_duration_since(now).as_millis())
            .unwrap_or(i64::MAX);
        let addr = |port: Option<u16>| {
            port.map(|p| format!("{}:{p}", addrs.public_host))
                .unwrap_or_default()
        };
        orp::LeaseGrant {
            request_id,
            lease_id: self.lease_id.0.to_vec(),
            hostname: self.hostname.as_str().to_owned(),
            tcp_addr: addr(self.tcp_port),
            udp_addr: addr(self.udp_port),
            reverse_addr: addrs.reverse_addr.to_owned(),
            expires_unix_ms: now_unix_ms.saturating_add(left_ms),
            udp_slot: self.udp_slot,
            client_addr: self.client_addr,
        }
    }
}

/// The LEASE_GRANT answering a successful LEASE_RELEASE (`expires_unix_ms: 0`).
pub fn release_frame(request_id: u64, lease_id: LeaseId) -> orp::LeaseGrant {
    orp::LeaseGrant {
        request_id,
        lease_id: lease_id.0.to_vec(),
        expires_unix_ms: 0,
        ..orp::LeaseGrant::default()
    }
}

/// Where lease ids come from (the relay passes getrandom; tests a counter).
pub trait LeaseIdSource {
    /// 16 fresh random bytes.
    fn next_id(&mut self) -> [u8; 16];
}

impl<F: FnMut() -> [u8; 16]> LeaseIdSource for F {
    fn next_id(&mut self) -> [u8; 16] {
        self()
    }
}

/// A hostname reservation: to the agent `agent_uri` of `tenant` until `until`.
#[derive(Debug, Clone)]
struct NameReservation {
    tenant: String,
    agent_uri: String,
    until: Instant,
}

/// The relay's lease table. See the module docs.
#[derive(Debug)]
pub struct LeaseTable {
    config: LeaseConfig,
    tcp_gate: AdminGate,
    udp_gate: AdminGate,
    leases: HashMap<LeaseId, Lease>,
    by_name: HashMap<LeaseName, LeaseId>,
    by_conn: HashMap<ConnId, BTreeSet<LeaseId>>,
    name_reservations: HashMap<LeaseName, NameReservation>,
    tcp: PortAllocator,
    udp: PortAllocator,
    /// Leases that ended since the last [`LeaseTable::sweep`] (expired, not released).
    ended: Vec<Lease>,
    generation: u64,
    /// Live leases per agent identity URI.
    per_agent: HashMap<String, usize>,
    /// No lease expiry and no reservation end is earlier than this (a lower bound, lowered by
    /// every new expiry or reservation), so operations skip the O(all) expiry scan until it
    /// passes (review M1).
    next_deadline: Option<Instant>,
}

impl LeaseTable {
    /// An empty table.
    ///
    /// # Errors
    /// [`LeaseConfig::validate`]'s.
    pub fn new(config: LeaseConfig) -> Result<LeaseTable, ConfigError> {
        config.validate()?;
        Ok(LeaseTable {
            tcp_gate: config.tcp.admin,
            udp_gate: config.udp.admin,
            tcp: PortAllocator::new(config.min_port, config.max_port),
            udp: PortAllocator::new(config.min_port, config.max_port),
            config,
            leases: HashMap::new(),
            by_name: HashMap::new(),
            by_conn: HashMap::new(),
            name_reservations: HashMap::new(),
            ended: Vec::new(),
            generation: 0,
            per_agent: HashMap::new(),
            next_deadline: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Applies a reloaded `[leases]` (validated) to new grants and renewals: TTL default and
    /// cap, the reservation after a lease ends, leases per agent, and the janitor's interval
    /// (from its next sweep). Leases already granted keep
    /// their expiry and agents over a lowered cap keep theirs (they cannot add more). The root
    /// host, the port range and the TCP/UDP switches stay (they decide sockets).
    pub fn reload(&mut self, config: &LeaseConfig) {
        self.config.ttl_default_s = config.ttl_default_s;
        self.config.ttl_cap_s = config.ttl_cap_s;
        self.config.reservation_ms = config.reservation_ms;
        self.config.janitor_interval_ms = config.janitor_interval_ms;
        self.config.max_leases_per_agent = config.max_leases_per_agent;
    }

    /// Changes the admin gate of one port transport. Existing leases keep their ports; the
    /// gate applies to new registrations.
    pub fn set_admin_gate(&mut self, transport: PortTransport, gate: AdminGate) {
        match transport {
            PortTransport::Tcp => self.tcp_gate = gate,
            PortTransport::Udp => self.udp_gate = gate,
        }
    }

    /// Bumped on every change to the routes; republish [`LeaseTable::routes`] when it moves.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of live leases (as of the last operation).
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True with no live lease.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// A live lease by id (any connection: for the relay's own use, never for answering an agent).
    pub fn get(&self, lease_id: &LeaseId) -> Option<&Lease> {
        self.leases.get(lease_id)
    }

    /// The lease `lease_id` if `conn` holds it: the check for reverse sessions.
    pub fn get_on_conn(&self, conn: ConnId, lease_id: &LeaseId, now: Instant) -> Option<&Lease> {
        self.leases
            .get(lease_id)
            .filter(|l| l.conn == conn && now < l.expires_at)
    }

    /// Every live lease.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// LEASE_REGISTER from `identity` on `conn`, with the controller's `decision`.
    ///
    /// Checks in order: the identity is an agent (`unauthorized`); the name and hostname are
    /// valid (`invalid_request`); the exposures (`transport_mismatch`); the controller's
    /// decision; the hostname (`hostname_conflict`); then TCP and UDP gates and ports. On
    /// success a live lease of the same identity and name (on any connection) is replaced, and
    /// it keeps its ports. Nothing changes on error.
    ///
    /// # Errors
    /// A [`Refusal`] with any code but `lease_not_found`.
    pub fn register(
        &mut self,
        conn: ConnId,
        identity: &Identity,
        req: &orp::LeaseRegister,
        decision: &ControllerDecision,
        ids: &mut impl LeaseIdSource,
        now: Instant,
    ) -> Result<Grant, Refusal> {
        self.expire(now);
        let owner = LeaseOwner::from_identity(identity)?;
        let name = LeaseName::parse(&req.name).map_err(|e| {
            Refusal::new(LeaseErrorCode::InvalidRequest, format!("lease name: {e}"))
        })?;
        let hostname = HostName::parse(format!("{name}.{}", self.config.root_host).as_bytes())
            .map_err(|e| Refusal::new(LeaseErrorCode::InvalidRequest, format!("hostname: {e}")))?;
        // transport_mismatch: the spec's 409 for exposures the relay cannot serve together.
        // - none of tls/tcp/udp: there is nothing to route, and it is a conflict with what a
        //   lease is rather than a malformed frame;
        // - reverse_tls: relay-terminated TLS is not implemented (passthrough only), so the
        //   requested exposure does not match what this relay serves;
        // - wildcard without tls: the wildcard is an SNI route, which only tls leases have.
        if !(req.tls || req.tcp || req.udp) {
            return Err(Refusal::new(
                LeaseErrorCode::TransportMismatch,
                "a lease needs tls, tcp or udp",
            ));
        }
        if req.reverse_tls {
            return Err(Refusal::new(
                LeaseErrorCode::TransportMismatch,
                "reverse_tls is not supported",
            ));
        }
        if req.wildcard && !req.tls {
            return Err(Refusal::new(
                LeaseErrorCode::TransportMismatch,
                "wildcard needs tls",
            ));
        }
        match decision {
            ControllerDecision::Approved => {}
            ControllerDecision::PendingApproval => {
                return Err(Refusal::new(
                    LeaseErrorCode::LeaseRejected,
                    "pending_approval",
                ));
            }
            ControllerDecision::Rejected(reason) => {
                return Err(Refusal::new(LeaseErrorCode::LeaseRejected, reason.clone()));
            }
            ControllerDecision::QuotaExceeded => {
                return Err(Refusal::new(
                    LeaseErrorCode::LeaseRejected,
                    "quota_exceeded",
                ));
            }
            ControllerDecision::Banned => {
                return Err(Refusal::new(LeaseErrorCode::Unauthorized, "banned"));
            }
        }

        // The hostname: held live by another identity, or reserved to another one (review
        // M12: a reservation belongs to the agent that held the lease, not to its tenant).
        // Another tenant gets the same message either way, so a probe learns no more than
        // "not available"; another agent of the same tenant gets `name_taken`.
        let conflict = |tenant: &str| {
            let message = if tenant == owner.tenant {
                NAME_TAKEN
            } else {
                HOSTNAME_UNAVAILABLE
            };
            Err(Refusal::new(LeaseErrorCode::HostnameConflict, message))
        };
        let replaced = self.by_name.get(&name).copied();
        if let Some(l) = replaced.and_then(|id| self.leases.get(&id))
            && l.owner != owner
        {
            return conflict(&l.owner.tenant);
        }
        if let Some(r) = self.name_reservations.get(&name)
            && (r.tenant != owner.tenant || r.agent_uri != owner.agent_uri)
        {
            return conflict(&r.tenant);
        }
        let old = replaced.and_then(|id| self.leases.get(&id));
        // Replacing one of its own names does not add a lease.
        let held = self.per_agent.get(&owner.agent_uri).copied().unwrap_or(0);
        if old.is_none() && held >= self.config.max_leases_per_agent {
            return Err(Refusal::new(
                LeaseErrorCode::LeaseRejected,
                AGENT_LEASE_LIMIT,
            ));
        }
        let key: ReservationKey = (owner.agent_uri.clone(), name.clone());
        let tcp_port = if req.tcp {
            Some(plan_port(
                PortTransport::Tcp,
                self.config.tcp,
                self.tcp_gate,
                &self.tcp,
                old.and_then(|l| l.tcp_port),
                &key,
            )?)
        } else {
            None
        };
        let udp_port = if req.udp {
            Some(plan_port(
                PortTransport::Udp,
                self.config.udp,
                self.udp_gate,
                &self.udp,
                old.and_then(|l| l.udp_port),
                &key,
            )?)
        } else {
            None
        };
        let ttl_s = self.effective_ttl_s(req.ttl_s);
        let expires_at = now
            .checked_add(Duration::from_secs(u64::from(ttl_s)))
            .ok_or_else(|| Refusal::new(LeaseErrorCode::Internal, "clock overflow"))?;
        let id = self.fresh_id(ids)?;

        // Commit: nothing below fails.
        if let Some(old_id) = replaced {
            self.remove(old_id, now);
        }
        self.name_reservations.remove(&name);
        if let Some(p) = tcp_port {
            self.tcp.take(p);
        }
        if let Some(p) = udp_port {
            self.udp.take(p);
        }
        let udp_slot = if udp_port.is_some() {
            self.free_udp_slot(conn)
        } else {
            0
        };
        let lease = Lease {
            id,
            conn,
            owner,
            name: name.clone(),
            hostname,
            tls: req.tls,
            wildcard: req.wildcard,
            client_addr: req.client_addr,
            tcp_port,
            udp_port,
            udp_slot,
            ttl_s,
            expires_at,
        };
        let grant = lease.grant();
        *self
            .per_agent
            .entry(lease.owner.agent_uri.clone())
            .or_insert(0) += 1;
        self.lower_deadline(expires_at);
        self.leases.insert(id, lease);
        self.by_name.insert(name, id);
        self.by_conn.entry(conn).or_default().insert(id);
        self.generation += 1;
        Ok(grant)
    }

    /// LEASE_RENEW: extends the lease by `ttl_s` (0: the default; capped) from `now`.
    ///
    /// # Errors
    /// `lease_not_found` unless `lease_id` is a live lease granted on `conn` (whatever else is
    /// true of it).
    pub fn renew(
        &mut self,
        conn: ConnId,
        lease_id: &[u8],
        ttl_s: u32,
        now: Instant,
    ) -> Result<Grant, Refusal> {
        self.expire(now);
        let id = self.owned_id(conn, lease_id)?;
        let ttl_s = self.effective_ttl_s(ttl_s);
        let expires_at = now
            .checked_add(Duration::from_secs(u64::from(ttl_s)))
            .ok_or_else(|| Refusal::new(LeaseErrorCode::Internal, "clock overflow"))?;
        let lease = self
            .leases
            .get_mut(&id)
            .ok_or_else(|| Refusal::from(LeaseErrorCode::LeaseNotFound))?;
        lease.ttl_s = ttl_s;
        lease.expires_at = expires_at;
        let grant = lease.grant();
        // A shorter TTL can bring the expiry forward.
        self.lower_deadline(expires_at);
        Ok(grant)
    }

    /// LEASE_RELEASE: ends the lease now; its hostname and ports go into reservation. Answer
    /// with [`release_frame`].
    ///
    /// # Errors
    /// `lease_not_found` unless `lease_id` is a live lease granted on `conn`.
    pub fn release(
        &mut self,
        conn: ConnId,
        lease_id: &[u8],
        now: Instant,
    ) -> Result<Lease, Refusal> {
        self.expire(now);
        let id = self.owned_id(conn, lease_id)?;
        self.remove(id, now)
            .ok_or_else(|| Refusal::from(LeaseErrorCode::LeaseNotFound))
    }

    /// The agent connection `conn` closed: its leases stop routing at once (hostnames and
    /// ports go into reservation). Returns the leases removed.
    pub fn connection_closed(&mut self, conn: ConnId, now: Instant) -> Vec<Lease> {
        self.expire(now);
        let ids = self.by_conn.remove(&conn).unwrap_or_default();
        ids.into_iter()
            .filter_map(|id| self.remove(id, now))
            .collect()
    }

    /// The janitor: expires leases and reservations that ended at or before `now`, and returns
    /// every lease that expired since the previous sweep (including those found expired by
    /// other operations meanwhile).
    pub fn sweep(&mut self, now: Instant) -> Vec<Lease> {
        self.expire(now);
        std::mem::take(&mut self.ended)
    }

    /// The route snapshot of every live lease (as of the last operation).
    pub fn routes(&self) -> RouteTable {
        let mut table = RouteTable::default();
        for lease in self.leases.values() {
            let entry = RouteEntry {
                lease_id: lease.id,
                conn: lease.conn,
                tenant: lease.owner.tenant.clone(),
                hostname: lease.hostname.as_str().to_owned(),
                udp_slot: lease.udp_slot,
                client_addr: lease.client_addr,
            };
            if lease.tls {
                let host: Box<str> = lease.hostname.as_str().into();
                if lease.wildcard {
                    table.wildcard.insert(host.clone(), entry.clone());
                }
                table.exact.insert(host, entry.clone());
            }
            if let Some(p) = lease.tcp_port {
                table.tcp.insert(p, entry.clone());
            }
            if let Some(p) = lease.udp_port {
                table.udp_slots.insert((lease.conn, lease.udp_slot), p);
                table.udp.insert(p, entry);
            }
        }
        table
    }

    /// The TTL a request for `ttl_s` gets (0: the default; capped).
    pub fn effective_ttl_s(&self, ttl_s: u32) -> u32 {
        if ttl_s == 0 {
            self.config.ttl_default_s
        } else {
            ttl_s.min(self.config.ttl_cap_s)
        }
    }

    fn reservation(&self) -> Duration {
        Duration::from_millis(self.config.reservation_ms)
    }

    /// `lease_id` if it is a live lease on `conn`; `lease_not_found` for anything else, with
    /// the same message whether or not it exists elsewhere.
    fn owned_id(&self, conn: ConnId, lease_id: &[u8]) -> Result<LeaseId, Refusal> {
        LeaseId::from_slice(lease_id)
            .filter(|id| self.leases.get(id).is_some_and(|l| l.conn == conn))
            .ok_or_else(|| Refusal::from(LeaseErrorCode::LeaseNotFound))
    }

    fn fresh_id(&self, ids: &mut impl LeaseIdSource) -> Result<LeaseId, Refusal> {
        for _ in 0..LEASE_ID_ATTEMPTS_MAX {
            let id = LeaseId(ids.next_id());
            if !self.leases.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(Refusal::new(
            LeaseErrorCode::Internal,
            "could not draw a fresh lease id",
        ))
    }

    fn free_udp_slot(&self, conn: ConnId) -> u32 {
        let used: BTreeSet<u32> = self
            .by_conn
            .get(&conn)
            .into_iter()
            .flatten()
            .filter_map(|id| self.leases.get(id))
            .filter(|l| l.udp_port.is_some())
            .map(|l| l.udp_slot)
            .collect();
        (1..).find(|s| !used.contains(s)).unwrap_or(u32::MAX)
    }

    /// Ends expired leases and reservations (`expires_at <= now`, `until <= now`).
    fn expire(&mut self, now: Instant) {
        if self.next_deadline.is_none_or(|d| now < d) {
            return;
        }
        // Sorted so that the order of `sweep`'s answer does not depend on hashing.
        let mut expired: Vec<LeaseId> = self
            .leases
            .values()
            .filter(|l| l.expires_at <= now)
            .map(|l| l.id)
            .collect();
        expired.sort_unstable();
        for id in expired {
            // Reservations start at the expiry, not at the sweep that noticed it.
            let at = self.leases.get(&id).map_or(now, |l| l.expires_at);
            if let Some(lease) = self.remove(id, at) {
                self.ended.push(lease);
            }
        }
        self.name_reservations.retain(|_, r| now < r.until);
        self.tcp.expire(now);
        self.udp.expire(now);
        // What is left ends after `now`: the earliest of it is the next deadline.
        self.next_deadline = self
            .leases
            .values()
            .map(|l| l.expires_at)
            .chain(self.name_reservations.values().map(|r| r.until))
            .chain(self.tcp.next_until())
            .chain(self.udp.next_until())
            .min();
    }

    fn lower_deadline(&mut self, at: Instant) {
        self.next_deadline = Some(self.next_deadline.map_or(at, |d| d.min(at)));
    }

    /// Removes a lease; its hostname and ports stay reserved to its agent identity (the ports
    /// to that identity and name) from `ended_at` for the reservation period.
    fn remove(&mut self, id: LeaseId, ended_at: Instant) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        self.generation += 1;
        if let Some(n) = self.per_agent.get_mut(&lease.owner.agent_uri) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_agent.remove(&lease.owner.agent_uri);
            }
        }
        if self.by_name.get(&lease.name) == Some(&id) {
            self.by_name.remove(&lease.name);
        }
        if let Some(set) = self.by_conn.get_mut(&lease.conn) {
            set.remove(&id);
            if set.is_empty() {
                self.by_conn.remove(&lease.conn);
            }
        }
        let until = ended_at.checked_add(self.reservation()).unwrap_or(ended_at);
        self.lower_deadline(until);
        self.name_reservations.insert(
            lease.name.clone(),
            NameReservation {
                tenant: lease.owner.tenant.clone(),
                agent_uri: lease.owner.agent_uri.clone(),
                until,
            },
        );
        let key: ReservationKey = (lease.owner.agent_uri.clone(), lease.name.clone());
        if let Some(p) = lease.tcp_port {
            self.tcp.release(p, key.clone(), until);
        }
        if let Some(p) = lease.udp_port {
            self.udp.release(p, key, until);
        }
        Some(lease)
    }
}

/// The port a registration would get on one transport, or the gate's error.
fn plan_port(
    transport: PortTransport,
    config: PortLeaseConfig,
    gate: AdminGate,
    alloc: &PortAllocator,
    replaced_port: Option<u16>,
    key: &ReservationKey,
) -> Result<u16, Refusal> {
    let (disabled, capacity, exhausted, what) = match transport {
        PortTransport::Tcp => (
            LeaseErrorCode::TcpPortDisabled,
            LeaseErrorCode::TcpPortCapacityExceeded,
            LeaseErrorCode::TcpPortExhausted,
            "tcp port leases",
        ),
        PortTransport::Udp => (
            LeaseErrorCode::UdpDisabled,
            LeaseErrorCode::UdpCapacityExceeded,
            LeaseErrorCode::UdpPortExhausted,
            "udp leases",
        ),
    };
    if !config.feature_enabled || !alloc.range_is_valid() {
        return Err(Refusal::new(
            LeaseErrorCode::FeatureUnavailable,
            format!("{what} are not available on this relay"),
        ));
    }
    if !gate.enabled {
        return Err(Refusal::from(disabled));
    }
    let held_by_others = alloc.held_count() - usize::from(replaced_port.is_some());
    if let Some(max) = gate.max_leases
        && held_by_others >= usize::try_from(max).unwrap_or(usize::MAX)
    {
        return Err(Refusal::from(capacity));
    }
    replaced_port
        .or_else(|| alloc.pick(key))
        .ok_or_else(|| Refusal::from(exhausted))
}

#[cfg(test)]
mod tests;
