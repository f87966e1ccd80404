//! Counters and the status board: what `/metrics`, `/status` and the ready file read.
//!
//! The data path bumps plain atomics; each relay task replaces its own entry of the board under
//! a short `std::sync::Mutex` (never held across I/O or an `.await`) and pokes a `Notify` so the
//! ready-file writer can react.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use outrelay_io::EngineStats;
use serde::Serialize;
use tokio::sync::Notify;

/// Why a claimed session could not reach its local target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFail {
    /// The target refused the connection (nothing listening).
    Refused,
    /// No answer within `local.connect_timeout_ms`.
    Timeout,
    /// The address did not resolve.
    Resolve,
    /// Any other connect error.
    Other,
    /// The marker asked for an exposure this lease has no target for.
    NoTarget,
    /// The splice engine refused the pair (full or stopped).
    EngineRefused,
    /// The PROXY protocol header could not be written to the fresh local connection at once.
    ProxyHeader,
}

impl LocalFail {
    /// Every reason, for metric label registration.
    pub const ALL: [LocalFail; 7] = [
        LocalFail::Refused,
        LocalFail::Timeout,
        LocalFail::Resolve,
        LocalFail::Other,
        LocalFail::NoTarget,
        LocalFail::EngineRefused,
        LocalFail::ProxyHeader,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            LocalFail::Refused => "refused",
            LocalFail::Timeout => "timeout",
            LocalFail::Resolve => "resolve",
            LocalFail::Other => "other",
            LocalFail::NoTarget => "no_target",
            LocalFail::EngineRefused => "engine_refused",
            LocalFail::ProxyHeader => "proxy_header",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why an idle reverse session ended without a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionFail {
    /// TCP connect to the reverse address failed or timed out.
    Connect,
    /// The preamble / nonce / MAC exchange failed (I/O, deadline).
    Handshake,
    /// The peer of the reverse address did not prove the session key: no MAC was sent.
    RelayProof,
    /// The relay closed the idle session (wrong MAC, lease gone, ready queue full).
    ClosedByRelay,
    /// A byte that is neither a keep-alive nor a marker.
    BadByte,
    /// The client address block after marker 0x03/0x04 was malformed or cut short.
    BadClientAddr,
    /// The engine threads' queue of sessions to open was full (never opened).
    EngineFull,
}

impl SessionFail {
    /// Every reason.
    pub const ALL: [SessionFail; 7] = [
        SessionFail::Connect,
        SessionFail::Handshake,
        SessionFail::RelayProof,
        SessionFail::ClosedByRelay,
        SessionFail::BadByte,
        SessionFail::BadClientAddr,
        SessionFail::EngineFull,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            SessionFail::Connect => "connect",
            SessionFail::Handshake => "handshake",
            SessionFail::RelayProof => "relay_proof",
            SessionFail::ClosedByRelay => "closed_by_relay",
            SessionFail::BadByte => "bad_byte",
            SessionFail::BadClientAddr => "bad_client_addr",
            SessionFail::EngineFull => "engine_full",
        }
    }
}

/// Process-wide counters (monotonic unless named a gauge).
#[derive(Debug, Default)]
pub struct Stats {
    /// Reverse sessions that completed the handshake.
    pub sessions_opened: AtomicU64,
    /// Grants whose reverse address was refused by the pinning rule (no pool started).
    pub reverse_addr_refused: AtomicU64,
    /// Reverse sessions claimed with marker 0x02.
    pub sessions_claimed_tls: AtomicU64,
    /// Reverse sessions claimed with marker 0x01.
    pub sessions_claimed_tcp: AtomicU64,
    /// Idle sessions dropped after the dead-session timeout.
    pub sessions_dead: AtomicU64,
    session_failed: [AtomicU64; SessionFail::ALL.len()],
    /// Claimed sessions handed to a splice engine with their local target.
    pub splices: AtomicU64,
    local_connect_failed: [AtomicU64; LocalFail::ALL.len()],
    /// PROXY protocol headers written to local targets (sessions, datagrams, service streams).
    pub proxy_headers: AtomicU64,
    /// Claims and datagrams of a `proxy_protocol` lease that came without the client's
    /// addresses (a relay that does not grant `client_addr`): a LOCAL / UNKNOWN header went.
    pub client_addr_missing: AtomicU64,
    /// QUIC connection attempts to relays.
    pub connect_attempts: AtomicU64,
    /// Attempts that failed before HELLO_ACK.
    pub connect_failed: AtomicU64,
    /// Reconnects after an established connection ended.
    pub reconnects: AtomicU64,
    /// GOAWAY frames received.
    pub goaways: AtomicU64,
    /// HA slots that connected to another relay than the one they lost.
    pub relay_replacements: Arc<AtomicU64>,
    /// Resolved relay addresses dropped because the candidate list was full.
    pub relay_candidates_dropped: Arc<AtomicU64>,
    /// The TCP/443 fallback's tunnels.
    pub fallback: Arc<crate::fallback::FallbackStats>,
    /// LEASE_ERROR answers received.
    pub lease_errors: AtomicU64,
    /// Leases registered again after `lease_not_found`.
    pub lease_reregistered: AtomicU64,
    /// UDP lease counters.
    pub udp: Arc<crate::udp::UdpStats>,
    /// Service-to-service stream counters.
    pub mesh: MeshStats,
}

/// A stream's side in service-to-service streams (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshRole {
    /// A local connection to a `[[consume]]` listener, opened as an ORP stream.
    Consumer,
    /// An INCOMING_STREAM from the relay, joined to a local target.
    Provider,
}

impl MeshRole {
    /// Both roles.
    pub const ALL: [MeshRole; 2] = [MeshRole::Consumer, MeshRole::Provider];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            MeshRole::Consumer => "consumer",
            MeshRole::Provider => "provider",
        }
    }
}

/// How one service stream's open ended (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshResult {
    /// STREAM_ACCEPT: bytes flowed.
    Accepted,
    /// STREAM_REJECT 403 received (consumer).
    Rejected403,
    /// STREAM_REJECT 404 received (consumer) or sent: no handler for the service or method.
    Rejected404,
    /// STREAM_REJECT 409 received.
    Rejected409,
    /// STREAM_REJECT 502 received, or sent: the local target could not be dialled.
    Rejected502,
    /// STREAM_REJECT 503 received.
    Rejected503,
    /// STREAM_REJECT with any other code.
    RejectedOther,
    /// Consumer: no relay connected.
    NoRelay,
    /// No answer (consumer) or no INCOMING_STREAM (provider) in time.
    Timeout,
    /// The stream could not be opened, or ended before its first frame.
    StreamError,
    /// The first frame was malformed or of the wrong type.
    BadFrame,
    /// Consumer: too many local connections on this listener at once.
    Overloaded,
}

impl MeshResult {
    /// Every result.
    pub const ALL: [MeshResult; 12] = [
        MeshResult::Accepted,
        MeshResult::Rejected403,
        MeshResult::Rejected404,
        MeshResult::Rejected409,
        MeshResult::Rejected502,
        MeshResult::Rejected503,
        MeshResult::RejectedOther,
        MeshResult::NoRelay,
        MeshResult::Timeout,
        MeshResult::StreamError,
        MeshResult::BadFrame,
        MeshResult::Overloaded,
    ];

    /// The result for a STREAM_REJECT `code`.
    pub fn rejected(code: u32) -> MeshResult {
        match code {
            403 => MeshResult::Rejected403,
            404 => MeshResult::Rejected404,
            409 => MeshResult::Rejected409,
            502 => MeshResult::Rejected502,
            503 => MeshResult::Rejected503,
            _ => MeshResult::RejectedOther,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            MeshResult::Accepted => "accepted",
            MeshResult::Rejected403 => "rejected_403",
            MeshResult::Rejected404 => "rejected_404",
            MeshResult::Rejected409 => "rejected_409",
            MeshResult::Rejected502 => "rejected_502",
            MeshResult::Rejected503 => "rejected_503",
            MeshResult::RejectedOther => "rejected_other",
            MeshResult::NoRelay => "no_relay",
            MeshResult::Timeout => "timeout",
            MeshResult::StreamError => "stream_error",
            MeshResult::BadFrame => "bad_frame",
            MeshResult::Overloaded => "overloaded",
        }
    }
}

/// Service-to-service stream counters.
#[derive(Debug, Default)]
pub struct MeshStats {
    streams: [[AtomicU64; 12]; 2],
    /// Raw bytes per role: `[to_relay, to_local]`.
    bytes: [[AtomicU64; 2]; 2],
    /// Streams joined now, per role.
    active: [AtomicU64; 2],
    /// REGISTER_ACKs received.
    pub registered: AtomicU64,
    /// REGISTERs refused with STREAM_REJECT.
    pub register_rejected: AtomicU64,
    /// STREAM_READY frames received on control streams.
    pub stream_ready: AtomicU64,
    /// Consumer opens made once more on another relay because the relay connection died
    /// under the first attempt (high availability, `ha_connections`).
    pub reopened: AtomicU64,
    /// Stream resume (orp.md "Resume").
    pub resume: ResumeStats,
}

/// Stream resume counters (`crate::resume`).
#[derive(Debug, Default)]
pub struct ResumeStats {
    /// Joined streams that keep a ring (both agents and the relay agreed), per role.
    pub resumable: AtomicU64,
    /// Broken streams that resumed (the peer's STREAM_RESUME arrived, ring retransmitted).
    pub resumed: AtomicU64,
    /// Broken streams that could not resume in `resume.timeout_ms` (or were refused).
    pub failed: AtomicU64,
    /// Broken streams whose peer asked for bytes older than the ring's tail: lost, the local
    /// connection was reset.
    pub lost: AtomicU64,
    /// Times a sender stopped reading its local connection because its ring was full.
    pub ring_full: AtomicU64,
    /// Times a sender waited for the agent-wide ring budget.
    pub budget_full: AtomicU64,
    /// Bytes sent again from rings after a resume.
    pub retransmitted_bytes: AtomicU64,
    /// STREAM_CHECKPOINT frames queued on control streams.
    pub checkpoints_sent: AtomicU64,
    /// STREAM_CHECKPOINT frames not queued (control queue full; the next one carries more).
    pub checkpoints_dropped: AtomicU64,
    /// STREAM_CHECKPOINT frames received (forwarded by the relay from the peer).
    pub checkpoints_received: AtomicU64,
    /// Streams trying to resume now.
    pub resuming: AtomicU64,
    /// Bytes held in rings now (all streams).
    pub ring_bytes: AtomicU64,
}

impl MeshStats {
    /// Counts one stream open's outcome.
    pub fn stream(&self, role: MeshRole, result: MeshResult) {
        self.streams[role as usize][result as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Stream opens for `role` that ended with `result`.
    pub fn streams(&self, role: MeshRole, result: MeshResult) -> u64 {
        self.streams[role as usize][result as usize].load(Ordering::Relaxed)
    }

    /// Adds `n` bytes moved towards the relay (`to_relay`) or the local side.
    pub fn add_bytes(&self, role: MeshRole, to_relay: bool, n: u64) {
        self.bytes[role as usize][usize::from(!to_relay)].fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes moved for `role` towards the relay (`to_relay`) or the local side.
    pub fn bytes(&self, role: MeshRole, to_relay: bool) -> u64 {
        self.bytes[role as usize][usize::from(!to_relay)].load(Ordering::Relaxed)
    }

    /// A joined stream started (`+1`) or ended (`-1`).
    pub fn set_active(&self, role: MeshRole, started: bool) {
        let a = &self.active[role as usize];
        if started {
            a.fetch_add(1, Ordering::Relaxed);
        } else {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Joined streams now.
    pub fn active(&self, role: MeshRole) -> u64 {
        self.active[role as usize].load(Ordering::Relaxed)
    }
}

/// Where a provided service stands on one relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Not connected to the relay.
    Disconnected,
    /// REGISTER sent, no answer yet.
    Registering,
    /// REGISTER_ACK received.
    Registered,
    /// Refused with STREAM_REJECT; retried with backoff.
    Refused,
}

/// One provided service on one relay, as shown by `/status` and the ready file.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    /// Service name.
    pub service: String,
    /// State.
    pub state: ServiceState,
    /// `<tenant>/<name>` from REGISTER_ACK (empty until registered).
    pub service_id: String,
    /// The last refusal, `code: reason`.
    pub last_error: Option<String>,
}

impl ServiceStatus {
    /// A service not registered on a relay.
    pub fn disconnected(service: &str) -> ServiceStatus {
        ServiceStatus {
            service: service.to_owned(),
            state: ServiceState::Disconnected,
            service_id: String::new(),
            last_error: None,
        }
    }
}

/// A consumer listener, as shown by `/status` and the ready file.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConsumerStatus {
    /// Service name.
    pub service: String,
    /// The bound local address.
    pub listen_addr: String,
}

impl Stats {
    /// Counts a local connect failure.
    pub fn local_failed(&self, reason: LocalFail) {
        self.local_connect_failed[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Local connect failures for `reason`.
    pub fn local_failures(&self, reason: LocalFail) -> u64 {
        self.local_connect_failed[reason.index()].load(Ordering::Relaxed)
    }

    /// Counts a failed idle session.
    pub fn session_failed(&self, reason: SessionFail) {
        self.session_failed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Failed idle sessions for `reason`.
    pub fn session_failures(&self, reason: SessionFail) -> u64 {
        self.session_failed[reason as usize].load(Ordering::Relaxed)
    }
}

/// Live sizes of one lease's reverse-session pool.
#[derive(Debug, Default)]
pub struct PoolGauge {
    /// Sessions connecting, handshaking or idle.
    pub open: AtomicUsize,
    /// Sessions authenticated and waiting for a claim.
    pub idle: AtomicUsize,
    /// What the pool currently aims for (grows with the claim rate).
    pub target: AtomicUsize,
    /// Idle sessions above the target: that many close at their next keep-alive byte.
    pub surplus: AtomicUsize,
}

/// Where a lease stands on one relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Not connected to the relay.
    Disconnected,
    /// LEASE_REGISTER sent, no answer yet.
    Registering,
    /// Granted: routable, pool running.
    Granted,
    /// Refused with `pending_approval`; retried at TTL/2.
    Pending,
    /// Refused with another code; retried later.
    Refused,
}

impl LeaseState {
    /// Every state, for gauges.
    pub const ALL: [LeaseState; 5] = [
        LeaseState::Disconnected,
        LeaseState::Registering,
        LeaseState::Granted,
        LeaseState::Pending,
        LeaseState::Refused,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            LeaseState::Disconnected => "disconnected",
            LeaseState::Registering => "registering",
            LeaseState::Granted => "granted",
            LeaseState::Pending => "pending",
            LeaseState::Refused => "refused",
        }
    }
}

/// One lease on one relay, as shown by `/status` and the ready file.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseStatus {
    /// Lease name.
    pub name: String,
    /// State.
    pub state: LeaseState,
    /// Public hostname from the grant (empty until granted or without `tls`).
    pub hostname: String,
    /// Public TCP address from the grant.
    pub tcp_addr: Option<String>,
    /// Public UDP address from the grant.
    pub udp_addr: Option<String>,
    /// The relay address its reverse sessions dial (the grant's `reverse_addr`, or the TCP
    /// fallback tunnel's address while on it); `None` before a grant or without TLS/TCP.
    pub reverse_addr: Option<String>,
    /// The last refusal, `code: message`.
    pub last_error: Option<String>,
    /// Pool sizes (not serialised directly).
    #[serde(skip)]
    pub pool: Option<Arc<PoolGauge>>,
}

/// How the agent reaches a relay (`agent status`, the ready file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// QUIC over UDP (the normal case).
    #[default]
    Quic,
    /// The TCP fallback: ORP over TLS on TCP (issue 22), while UDP cannot reach the relay.
    TlsTcp,
}

/// One relay connection.
#[derive(Debug, Clone, Serialize)]
pub struct RelayStatus {
    /// The address dialled (resolved from `name`).
    pub addr: String,
    /// The configured `relays` entry it was resolved from (empty before a first connection).
    pub name: String,
    /// The relay's identity URI from its certificate (empty before a first handshake).
    pub relay_id: String,
    /// HELLO_ACK received and the connection is up.
    pub connected: bool,
    /// The transport of the current (or last) connection.
    pub transport: Transport,
    /// On the TCP fallback: the relay TCP address the tunnel runs to (its public TLS port or
    /// its reverse port, whichever connected first).
    pub tunnel_addr: Option<String>,
    /// The leases.
    pub leases: Vec<LeaseStatus>,
    /// The provided services.
    pub services: Vec<ServiceStatus>,
}

impl RelayStatus {
    /// Connected with every lease granted and every provided service registered.
    pub fn ready(&self) -> bool {
        self.connected
            && self.leases.iter().all(|l| l.state == LeaseState::Granted)
            && self
                .services
                .iter()
                .all(|s| s.state == ServiceState::Registered)
    }
}

/// The status of every relay connection, and who to wake when it changes.
#[derive(Debug, Default)]
pub struct Board {
    relays: Mutex<Vec<RelayStatus>>,
    consumers: Mutex<Vec<ConsumerStatus>>,
    /// Notified after every change.
    pub changed: Notify,
}

impl Board {
    /// A board with one disconnected entry per HA slot (`ha_connections`).
    pub fn new(settings: &crate::config::Settings) -> Board {
        let leases = &settings.leases;
        let entries = (0..settings.ha_connections)
            .map(|_| RelayStatus {
                addr: String::new(),
                name: String::new(),
                relay_id: String::new(),
                connected: false,
                transport: Transport::Quic,
                tunnel_addr: None,
                leases: leases
                    .iter()
                    .map(|l| LeaseStatus {
                        name: l.name.clone(),
                        state: LeaseState::Disconnected,
                        hostname: String::new(),
                        tcp_addr: None,
                        udp_addr: None,
                        reverse_addr: None,
                        last_error: None,
                        pool: None,
                    })
                    .collect(),
                services: settings
                    .provides
                    .iter()
                    .map(|p| ServiceStatus::disconnected(&p.service))
                    .collect(),
            })
            .collect();
        Board {
            relays: Mutex::new(entries),
            consumers: Mutex::new(Vec::new()),
            changed: Notify::new(),
        }
    }

    /// Records the bound consumer listeners (once, at start).
    pub fn set_consumers(&self, consumers: Vec<ConsumerStatus>) {
        *self
            .consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = consumers;
        self.changed.notify_one();
    }

    /// The bound consumer listeners.
    pub fn consumers(&self) -> Vec<ConsumerStatus> {
        self.consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces HA slot `index`'s entry.
    pub fn set(&self, index: usize, status: RelayStatus) {
        {
            let mut relays = self.relays.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = relays.get_mut(index) {
                *slot = status;
            }
        }
        self.changed.notify_one();
    }

    /// A copy of every entry.
    pub fn snapshot(&self) -> Vec<RelayStatus> {
        self.relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Every splice engine's last published stats, summed.
pub fn splice_totals(engines: &[Arc<Mutex<EngineStats>>]) -> EngineStats {
    let mut total = EngineStats::default();
    for e in engines {
        let e = *e.lock().unwrap_or_else(PoisonError::into_inner);
        total.accumulate(&e);
    }
    total
}
