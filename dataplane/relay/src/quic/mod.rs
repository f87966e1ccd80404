//! The relay's QUIC endpoint for agents (`shared/spec/orp.md`): mutual TLS 1.3 with ALPN
//! `orp/1`, HELLO on the control stream, and the lease frames of `public-ingress.md`.
//!
//! Threads of control: [`QuicServer::run`] accepts connections and runs the lease janitor;
//! each connection has one task reading its control stream and one writer task draining a
//! bounded queue into it. The lease table is shared behind a `tokio::sync::Mutex` that is never
//! held across network I/O; every change republishes the whole [`Snapshot`] (routes plus the
//! reverse-session keys of live leases) through [`Shared::publish`] while the lock is held, so
//! snapshots are published in generation order.
//!
//! QUIC datagrams from agents (UDP lease replies) are read by one task per connection and handed
//! to [`crate::udp::UdpIngress::from_agent`].
//!
//! Service streams (REGISTER, OPEN_STREAM and the join) are in `streams` with their state in
//! [`crate::mesh`]. Resumed streams (STREAM_RESUME: parked, matched, joined once) are
//! in `resume`. Relay-to-relay forwarding (FORWARD_STREAM, both relays' sides) is in
//! `forward`, its connection pool in [`crate::forward`]. Not here yet: keyless signing.

mod conn;
pub mod fallback;
mod forward;
mod inherit;
mod resume;
mod stats;
mod streams;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outrelay_proto::identity::{Identity, Role};
use outrelay_proto::orp;
use outrelay_proto::reverse::LeaseId;
use tokio::sync::{Mutex, watch};

use crate::lease::{
    AdminGate, ConnId, ControllerDecision, Lease, LeaseTable, MIN_DURATION_MS, PortTransport,
};
use crate::state::{ReverseKey, Shared, Snapshot};

pub use stats::{Limit, QuicStats, SignalOutcome};
pub use tls::{TlsMaterial, cert_identity, certified_key};

/// quinn's datagram buffers per agent connection, each way (UDP leases).
pub const QUIC_DATAGRAM_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// SO_RCVBUF / SO_SNDBUF asked for the agents' QUIC socket (capped by the kernel at
/// `net.core.rmem_max` / `wmem_max`): every agent's datagrams arrive on this one socket.
pub const QUIC_SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

fn varint(v: u64) -> Result<quinn::VarInt, QuicError> {
    quinn::VarInt::from_u64(v).map_err(|e| QuicError::Config(format!("window: {e}")))
}

/// The agents' UDP socket, with buffers for datagram bursts (best effort: the kernel caps them).
/// Binds the agents' QUIC UDP socket on `addr` (the endpoint's buffers).
///
/// # Errors
/// The socket's.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = socket.set_recv_buffer_size(QUIC_SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(QUIC_SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Default idle timeout of an agent connection (both ends).
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 10_000;
/// Default keep-alive interval (both ends).
pub const DEFAULT_KEEP_ALIVE_MS: u64 = 3_000;
/// Default time from the end of the handshake until HELLO must have arrived.
pub const DEFAULT_HELLO_DEADLINE_MS: u64 = 10_000;
/// Default bound of one connection's control-stream send queue (frames).
pub const DEFAULT_CONTROL_SEND_QUEUE_MAX: usize = 64;
/// Default bound of concurrently open bidirectional streams per connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default bound of concurrent QUIC connections one agent identity may hold on this relay.
pub const DEFAULT_MAX_CONNECTIONS_PER_IDENTITY: usize = 8;
/// Default sustained rate of lease and REGISTER frames per connection (token bucket refill).
pub const DEFAULT_LEASE_FRAMES_PER_S: u32 = 50;
/// Default burst of lease and REGISTER frames per connection (token bucket size).
pub const DEFAULT_LEASE_FRAMES_BURST: u32 = 100;
/// Default sustained rate of new application streams (OPEN_STREAM) accepted per connection.
pub const DEFAULT_STREAM_OPENS_PER_S: u32 = 500;
/// Default burst of new application streams per connection.
pub const DEFAULT_STREAM_OPENS_BURST: u32 = 1000;
/// Default QUIC connection-level receive window: what one agent connection can make the relay
/// buffer, all its streams together (target R19: at most 8 MiB per connection).
pub const DEFAULT_CONNECTION_RECEIVE_WINDOW_BYTES: u64 = 8 * 1024 * 1024;
/// Default QUIC per-stream receive window.
pub const DEFAULT_STREAM_RECEIVE_WINDOW_BYTES: u64 = 1024 * 1024;
/// Default time a stopping relay waits for GOAWAY to be acknowledged before closing.
pub const DEFAULT_DRAIN_GRACE_MS: u64 = 1_000;
/// The HELLO `protocol_version` this relay speaks.
pub const PROTOCOL_VERSION: &str = "orp/1";
/// The HELLO capability for lease frames: the only optional feature implemented so far, and so
/// the only one HELLO_ACK can accept.
pub const FEATURE_LEASES: &str = "leases";
/// Every feature this relay implements (what `accepted_features` is drawn from).
pub const IMPLEMENTED_FEATURES: &[&str] = &[
    FEATURE_LEASES,
    FEATURE_STREAMS,
    FEATURE_STREAM_ACCEPT,
    FEATURE_STREAM_RESUME,
];
/// HELLO capability: answer this agent's OPEN_STREAM with STREAM_ACCEPT on the stream before the
/// joined bytes. Without it (Go agents) an accepted stream carries only the provider's bytes, as
/// from the Go relay; refusals are STREAM_REJECT either way.
pub const FEATURE_STREAM_ACCEPT: &str = "stream_accept";
/// HELLO capability: this agent keeps rings and checkpoints for streams the relay marks
/// `resume` (INCOMING_STREAM / STREAM_ACCEPT), and sends STREAM_RESUME after a reconnect.
/// Accepted only while `[resume] enabled` (and a mesh is served); a stream is marked only when
/// both of its agents asked.
pub const FEATURE_STREAM_RESUME: &str = "stream_resume";
/// HELLO capability: service streams (REGISTER / OPEN_STREAM).
pub const FEATURE_STREAMS: &str = "streams";

/// QUIC application error codes the relay closes connections and streams with.
pub mod close_code {
    /// Orderly close (shutdown after GOAWAY, or the agent ended the control stream).
    pub const NO_ERROR: u32 = 0;
    /// A frame that cannot be decoded or is not allowed where it arrived.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// HELLO's `agent_uri` is not the certificate's URI SAN (or a bad protocol version).
    pub const HELLO_MISMATCH: u32 = 2;
    /// No HELLO within the deadline.
    pub const HELLO_TIMEOUT: u32 = 3;
    /// The control-stream send queue overflowed (the agent does not read).
    pub const SEND_QUEUE_OVERFLOW: u32 = 4;
    /// A stream kind this relay does not serve yet.
    pub const STREAM_UNSUPPORTED: u32 = 5;
    /// The relay is stopping (sent after GOAWAY).
    pub const GOING_AWAY: u32 = 6;
    /// The peer certificate could not be read after the handshake (should not happen).
    pub const BAD_IDENTITY: u32 = 7;
    /// The agent's identity is revoked (`Pki.WatchRevocations`): refused at HELLO, or its live
    /// connections closed when the revocation arrives.
    pub const REVOKED: u32 = 8;
    /// A controller is configured but no revocation snapshot is loaded yet (neither from the
    /// controller nor from the state file): agents are refused until one is.
    pub const REVOCATIONS_UNAVAILABLE: u32 = 9;
    /// Stream reset: the policy no longer allows this stream (or its rule expired).
    pub const POLICY_CUT: u32 = 10;
    /// Stream reset: the other half of a joined stream failed.
    pub const PEER_FAILED: u32 = 11;
    /// Stream reset: the first frame did not come in time.
    pub const OPEN_TIMEOUT: u32 = 12;
    /// Connection refused: its identity already holds `quic.max_connections_per_identity`.
    pub const TOO_MANY_CONNECTIONS: u32 = 13;
    /// A frame declared more than the receiver's limit for its position (also a stream reset
    /// code after STREAM_REJECT 400 for an oversized first frame).
    pub const FRAME_TOO_LARGE: u32 = 14;
    /// Stream reset: a joined stream moved no byte for `mesh.stream_idle_timeout_ms`.
    pub const STREAM_IDLE: u32 = 15;
    /// The agent's certificate passed its notAfter while connected (TLS checks it only at the
    /// handshake): it reconnects with its renewed certificate.
    pub const CERT_EXPIRED: u32 = 16;
    /// Stream reset: the other agent's CONNECTION ended (or it resumed the stream elsewhere),
    /// so it may come back with STREAM_RESUME: a resumable agent resumes on this code only
    /// (every other reset code ends its stream for good).
    pub const PEER_LOST: u32 = 17;
    /// Connection refused right after the handshake: the relay is draining (`outrelay relay
    /// drain`), so the agent goes to its other relays instead of coming straight back.
    pub const DRAINING: u32 = 18;
}

/// GOAWAY `reconnect_after_ms` sent to every agent when the relay starts draining.
pub const DRAIN_RECONNECT_AFTER_MS: u32 = 1_000;
/// GOAWAY `reason` of a drain (and the close reason of refused connections).
pub const DRAIN_REASON: &str = "relay draining";

/// Configuration of the agent endpoint. Durations are milliseconds, each at least
/// [`MIN_DURATION_MS`].
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Certificate chain, key and controller CA.
    pub tls: TlsMaterial,
    /// Idle timeout of a connection.
    pub idle_timeout_ms: u64,
    /// QUIC keep-alive interval (must be below the idle timeout).
    pub keep_alive_ms: u64,
    /// HELLO deadline from the end of the handshake.
    pub hello_deadline_ms: u64,
    /// Bound of each connection's control-stream send queue, in frames (at least 1).
    pub control_send_queue_max: usize,
    /// Concurrent bidirectional streams an agent may have open (at least 1: the control stream).
    pub max_concurrent_streams: u32,
    /// Host for `tcp_addr` / `udp_addr` in LEASE_GRANT.
    pub public_host: String,
    /// `reverse_addr` in LEASE_GRANT (`host:port`; empty: the host the agent dialled, 7443).
    pub reverse_addr: String,
    /// Time a stopping relay waits for each connection's GOAWAY to be acknowledged.
    pub drain_grace_ms: u64,
    /// Concurrent connections one agent identity may hold (at least 1).
    pub max_connections_per_identity: usize,
    /// Sustained lease and REGISTER frames per second per connection (at least 1).
    pub lease_frames_per_s: u32,
    /// Burst of lease and REGISTER frames per connection (at least 1).
    pub lease_frames_burst: u32,
    /// New application streams accepted per second per connection (at least 1).
    pub stream_opens_per_s: u32,
    /// Burst of new application streams per connection (at least 1).
    pub stream_opens_burst: u32,
    /// QUIC connection receive window, bytes (64 KiB ..= 1 GiB).
    pub connection_receive_window_bytes: u64,
    /// QUIC stream receive window, bytes (16 KiB ..= the connection window).
    pub stream_receive_window_bytes: u64,
    /// Bounds of the TCP/443 fallback's tunnels.
    pub fallback: fallback::FallbackLimits,
}

impl QuicConfig {
    /// A configuration with the spec's defaults.
    pub fn new(listen: SocketAddr, tls: TlsMaterial, public_host: String) -> QuicConfig {
        QuicConfig {
            listen,
            tls,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            keep_alive_ms: DEFAULT_KEEP_ALIVE_MS,
            hello_deadline_ms: DEFAULT_HELLO_DEADLINE_MS,
            control_send_queue_max: DEFAULT_CONTROL_SEND_QUEUE_MAX,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            public_host,
            reverse_addr: String::new(),
            drain_grace_ms: DEFAULT_DRAIN_GRACE_MS,
            max_connections_per_identity: DEFAULT_MAX_CONNECTIONS_PER_IDENTITY,
            lease_frames_per_s: DEFAULT_LEASE_FRAMES_PER_S,
            lease_frames_burst: DEFAULT_LEASE_FRAMES_BURST,
            stream_opens_per_s: DEFAULT_STREAM_OPENS_PER_S,
            stream_opens_burst: DEFAULT_STREAM_OPENS_BURST,
            connection_receive_window_bytes: DEFAULT_CONNECTION_RECEIVE_WINDOW_BYTES,
            stream_receive_window_bytes: DEFAULT_STREAM_RECEIVE_WINDOW_BYTES,
            fallback: fallback::FallbackLimits::default(),
        }
    }

    /// Checks the limits.
    ///
    /// # Errors
    /// [`QuicError::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<(), QuicError> {
        for (field, value_ms) in [
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("keep_alive_ms", self.keep_alive_ms),
            ("hello_deadline_ms", self.hello_deadline_ms),
            ("drain_grace_ms", self.drain_grace_ms),
        ] {
            if value_ms < MIN_DURATION_MS {
                return Err(QuicError::Config(format!(
                    "{field} must be at least {MIN_DURATION_MS} ms, got {value_ms} ms"
                )));
            }
        }
        if self.keep_alive_ms >= self.idle_timeout_ms {
            return Err(QuicError::Config(
                "keep_alive_ms must be below idle_timeout_ms".to_owned(),
            ));
        }
        if self.control_send_queue_max == 0 || self.max_concurrent_streams == 0 {
            return Err(QuicError::Config(
                "control_send_queue_max and max_concurrent_streams must be at least 1".to_owned(),
            ));
        }
        for (field, v) in [
            (
                "max_connections_per_identity",
                self.max_connections_per_identity as u64,
            ),
            ("lease_frames_per_s", u64::from(self.lease_frames_per_s)),
            ("lease_frames_burst", u64::from(self.lease_frames_burst)),
            ("stream_opens_per_s", u64::from(self.stream_opens_per_s)),
            ("stream_opens_burst", u64::from(self.stream_opens_burst)),
        ] {
            if v == 0 {
                return Err(QuicError::Config(format!("{field} must be at least 1")));
            }
        }
        if !(64 * 1024..=1 << 30).contains(&self.connection_receive_window_bytes) {
            return Err(QuicError::Config(
                "connection_receive_window_bytes must be 65536..=1073741824".to_owned(),
            ));
        }
        if self.stream_receive_window_bytes < 16 * 1024
            || self.stream_receive_window_bytes > self.connection_receive_window_bytes
        {
            return Err(QuicError::Config(
                "stream_receive_window_bytes must be 16384..=connection_receive_window_bytes"
                    .to_owned(),
            ));
        }
        let f = &self.fallback;
        if f.max_tunnels == 0 || f.per_source_max == 0 {
            return Err(QuicError::Config(
                "fallback_max_tunnels and fallback_per_source_max must be at least 1".to_owned(),
            ));
        }
        if f.queue_bytes < 64 * 1024 {
            return Err(QuicError::Config(
                "fallback_queue_bytes must be at least 65536".to_owned(),
            ));
        }
        if f.handshake_ms < MIN_DURATION_MS {
            return Err(QuicError::Config(format!(
                "fallback_handshake_ms must be at least {MIN_DURATION_MS} ms"
            )));
        }
        Ok(())
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// An invalid configuration value.
    #[error("quic config: {0}")]
    Config(String),
    /// A PEM file could not be read.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The TLS configuration was refused.
    #[error("tls: {0}")]
    Tls(String),
    /// A certificate's identity URI is missing or invalid, or the relay's is not a relay's.
    #[error("certificate identity: {0}")]
    BadIdentity(String),
    /// Binding the UDP socket failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where the verdict on a LEASE_REGISTER comes from (the controller: approval mode, quotas,
/// bans), whether an agent is admitted at all (revocations), and where lease changes are
/// reported. Every method is called on the connection's task, some with the lease table
/// locked: each must answer from a local snapshot and never block or do I/O.
pub trait LeaseDecider: Send + Sync + 'static {
    /// The controller's decision for `identity` asking for `req`.
    fn decide(&self, identity: &Identity, req: &orp::LeaseRegister) -> ControllerDecision;

    /// Whether `identity` may hold a session; asked after HELLO, once the connection is in
    /// the registry (so a revocation arriving meanwhile closes it either way). Default: yes.
    fn admit(&self, _identity: &Identity) -> Admission {
        Admission::Admit
    }

    /// A lease changed (for the controller's records). Must not block: queue or drop.
    /// Default: nothing.
    fn report(&self, _event: LeaseEvent) {}
}

/// The answer of [`LeaseDecider::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The agent may proceed.
    Admit,
    /// The identity is revoked: close with [`close_code::REVOKED`].
    Revoked,
    /// No revocation snapshot yet: close with [`close_code::REVOCATIONS_UNAVAILABLE`].
    NotReady,
}

/// What happened to a lease, as reported to the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEventKind {
    /// A LEASE_REGISTER refused with `pending_approval`: the controller needs the request to
    /// create its pending record (reported as a GRANT request).
    Requested,
    /// A lease was granted (or re-granted to the same identity and name).
    Granted,
    /// A lease was renewed.
    Renewed,
    /// A lease ended: released by the agent, expired, or its connection closed.
    Released,
}

/// One lease change for [`LeaseDecider::report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEvent {
    /// What happened.
    pub kind: LeaseEventKind,
    /// The agent's tenant.
    pub tenant: String,
    /// The normalised lease name.
    pub name: String,
    /// The agent's identity URI.
    pub agent_uri: String,
    /// The exposures, `+`-joined (`tls`, `tcp`, `udp`, `tls+tcp`, ...).
    pub lease_kind: String,
    /// The lease's TTL in seconds (0 for releases).
    pub ttl_s: u32,
}

impl LeaseEvent {
    /// The event `kind` for `lease`.
    pub fn of(kind: LeaseEventKind, lease: &Lease) -> LeaseEvent {
        LeaseEvent {
            kind,
            tenant: lease.owner.tenant.clone(),
            name: lease.name.as_str().to_owned(),
            agent_uri: lease.owner.agent_uri.clone(),
            lease_kind: lease_kind(
                lease.tls,
                lease.tcp_port.is_some(),
                lease.udp_port.is_some(),
            ),
            ttl_s: if kind == LeaseEventKind::Released {
                0
            } else {
                lease.ttl_s
            },
        }
    }
}

/// `tls`, `tcp`, `udp` joined with `+`, in that order.
pub(crate) fn lease_kind(tls: bool, tcp: bool, udp: bool) -> String {
    let parts: Vec<&str> = [(tls, "tls"), (tcp, "tcp"), (udp, "udp")]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
    parts.join("+")
}

impl<F> LeaseDecider for F
where
    F: Fn(&Identity, &orp::LeaseRegister) -> ControllerDecision + Send + Sync + 'static,
{
    fn decide(&self, identity: &Identity, req: &orp::LeaseRegister) -> ControllerDecision {
        self(identity, req)
    }
}

/// Approves every lease (until the controller client exists).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApproveAll;

impl LeaseDecider for ApproveAll {
    fn decide(&self, _: &Identity, _: &orp::LeaseRegister) -> ControllerDecision {
        ControllerDecision::Approved
    }
}

/// The lease table with the reverse-session keys of its leases; one lock for both.
#[derive(Debug)]
pub(crate) struct Control {
    pub(crate) table: LeaseTable,
    pub(crate) keys: HashMap<LeaseId, ReverseKey>,
    published: u64,
    /// The table generation the last publish saw.
    published_generation: u64,
}

/// State shared by the accept loop, the janitor and every connection.
pub(crate) struct Ctx {
    /// The TCP fallback's tunnels (a tunnel peer's real address).
    pub(crate) tunnels: Arc<fallback::Tunnels>,
    /// The settings in force: replaced whole by [`QuicReload::apply`]; read per connection,
    /// stream bucket and lease frame.
    config: arc_swap::ArcSwap<QuicConfig>,
    pub(crate) control: Mutex<Control>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) stats: Arc<QuicStats>,
    pub(crate) decider: Arc<dyn LeaseDecider>,
    pub(crate) shutdown: watch::Receiver<Option<orp::GoAway>>,
    /// Set once by `drain` (never cleared: a restart clears it). New connections are closed
    /// with [`close_code::DRAINING`] and new LEASE_REGISTERs refused with `draining`.
    pub(crate) draining: AtomicBool,
    /// The drain's GOAWAY, published once; every connection task watches it.
    pub(crate) drain: watch::Sender<Option<orp::GoAway>>,
    /// Agents past HELLO, by connection (to close a revoked identity's connections). A std
    /// mutex: held for map operations only, never across an await.
    pub(crate) agents: std::sync::Mutex<HashMap<ConnId, AgentConn>>,
    /// Live connections per agent identity URI (`max_connections_per_identity`).
    pub(crate) identities: std::sync::Mutex<HashMap<String, usize>>,
    /// Where agents' QUIC datagrams go (UDP leases); unset: datagrams are not read.
    pub(crate) udp: std::sync::OnceLock<Arc<crate::udp::UdpIngress>>,
    /// The lookup program's port map (eBPF steering), synced at each publish.
    pub(crate) steering: std::sync::OnceLock<Arc<crate::steer::Steering>>,
    /// Service streams (REGISTER / OPEN_STREAM); unset: refused.
    pub(crate) mesh: std::sync::OnceLock<Arc<crate::mesh::Mesh>>,
    /// The workers' side, to cut the spliced pairs of banned or revoked leases; unset: no
    /// pairs to cut.
    pub(crate) ingress: std::sync::OnceLock<Arc<crate::ingress::Ingress>>,
    /// Halves of resumed streams waiting for their peer, by stream id (touched once per
    /// STREAM_RESUME, never per byte).
    pub(crate) parked: std::sync::Mutex<resume::ParkTable>,
    /// Bandwidth limits (issue 21): controller overrides over the configured defaults.
    pub(crate) bandwidth: Arc<crate::bandwidth::Bandwidth>,
    /// Relay-to-relay forwarding (issue 22); unset: remote providers answer 502 and relay
    /// connections are closed.
    pub(crate) forward: std::sync::OnceLock<Arc<crate::forward::Peers>>,
    /// The checkpoint lanes of relay connections (resumable forwarded streams).
    pub(crate) lanes: forward::Lanes,
}

/// One registered agent connection.
pub(crate) struct AgentConn {
    pub(crate) uri: String,
    pub(crate) conn: quinn::Connection,
    /// Its control-stream send queue (STREAM_READY). Weak: the queue closing is what ends the
    /// control-stream writer at GOAWAY, so nothing but the connection's own task may keep it.
    pub(crate) control: tokio::sync::mpsc::WeakSender<outrelay_proto::frame::Frame>,
    /// Its HELLO asked for [`FEATURE_STREAM_RESUME`] (and the relay accepted it).
    pub(crate) resume: bool,
}

impl Ctx {
    /// The settings in force now.
    pub(crate) fn config(&self) -> Arc<QuicConfig> {
        self.config.load_full()
    }

    /// Drops keys of leases that no longer exist and publishes a new snapshot. Call with the
    /// lock held (publishing is a pointer swap, not I/O).
    pub(crate) fn publish(&self, control: &mut Control) {
        let Control {
            table,
            keys,
            published,
            published_generation,
        } = control;
        keys.retain(|id, _| table.get(id).is_some());
        *published += 1;
        *published_generation = table.generation();
        let routes = table.routes();
        self.bandwidth.sync_leases(
            table
                .leases()
                .map(|l| (l.id, l.owner.tenant.as_str(), l.name.as_str())),
        );
        let udp_conns = {
            let agents = self.agents();
            routes
                .udp_ports()
                .filter_map(|(_, r)| Some((r.conn, agents.get(&r.conn)?.conn.clone())))
                .collect()
        };
        self.shared.publish(Snapshot {
            routes,
            reverse_keys: keys.clone(),
            udp_conns,
            generation: *published,
        });
        // Bound (or opened in the lookup map) before any grant naming them goes out: this
        // runs with the lease lock held.
        if let Some(steering) = self.steering.get() {
            steering.sync_ports(&self.shared);
        }
        if let Some(udp) = self.udp.get() {
            udp.sync();
        }
    }

    /// [`Ctx::publish`] only when the table changed since the last publish (a refused or
    /// route-neutral operation republishes nothing: review M1).
    pub(crate) fn publish_if_changed(&self, control: &mut Control) {
        if control.table.generation() != control.published_generation {
            self.publish(control);
        }
    }

    /// A std mutex over the per-identity connection counts (map operations only).
    pub(crate) fn identities(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.identities
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The connection `conn` ended: its leases stop routing now.
    pub(crate) async fn connection_closed(&self, conn: ConnId) {
        let mut control = self.control.lock().await;
        let ended = control.table.connection_closed(conn, Instant::now());
        self.publish_if_changed(&mut control);
        drop(control);
        for lease in &ended {
            self.decider
                .report(LeaseEvent::of(LeaseEventKind::Released, lease));
        }
    }

    pub(crate) fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, AgentConn>> {
        self.agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the controller client may do to a running [`QuicServer`]: end leases the controller
/// revoked and close the connections of revoked identities.
#[derive(Clone)]
pub struct RelayHandle {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle").finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// Closes every connection of `agent_uri` with `code` and `reason`; returns how many.
    /// Their leases stop routing as the connection tasks end.
    pub fn close_agent(&self, agent_uri: &str, code: u32, reason: &str) -> usize {
        let agents = self.ctx.agents();
        let mut closed = 0;
        for agent in agents.values().filter(|a| a.uri == agent_uri) {
            agent.conn.close(code.into(), reason.as_bytes());
            closed += 1;
        }
        closed
    }

    /// Revokes `agent_uri` here (review M5): under the lease lock (so no lease of it can be
    /// granted meanwhile) closes its connections with `code` and `reason`, ends its leases
    /// and publishes the routes without them; then reports them released and cuts their
    /// spliced pairs. Returns how many connections were closed. Its service streams end
    /// with its connections (the join resets the peer's half).
    pub async fn revoke_agent(&self, agent_uri: &str, code: u32, reason: &str) -> usize {
        let mut control = self.ctx.control.lock().await;
        let targets: Vec<(ConnId, LeaseId)> = control
            .table
            .leases()
            .filter(|l| l.owner.agent_uri == agent_uri)
            .map(|l| (l.conn, l.id))
            .collect();
        let closed = self.close_agent(agent_uri, code, reason);
        let now = Instant::now();
        let mut ended = Vec::with_capacity(targets.len());
        for (conn, id) in &targets {
            if let Ok(lease) = control.table.release(*conn, &id.0, now) {
                ended.push(lease);
            }
        }
        if !ended.is_empty() {
            self.ctx.publish(&mut control);
        }
        drop(control);
        for lease in &ended {
            self.ctx
                .decider
                .report(LeaseEvent::of(LeaseEventKind::Released, lease));
        }
        let ids = targets.into_iter().map(|(_, id)| id).collect();
        self.cut_pairs(ids, crate::ingress::stats::CutReason::Revoked)
            .await;
        closed
    }

    /// Closes the live spliced pairs of `leases` on every worker within a loop round (their
    /// routes must already be unpublished, as [`RelayHandle::revoke_leases`] does).
    pub async fn cut_pairs(&self, leases: Vec<LeaseId>, reason: crate::ingress::stats::CutReason) {
        if let Some(ingress) = self.ctx.ingress.get() {
            ingress.cut(leases, reason).await;
        }
    }

    /// The identity URIs of every agent connection past HELLO.
    pub fn agent_uris(&self) -> Vec<String> {
        self.ctx.agents().values().map(|a| a.uri.clone()).collect()
    }

    /// Replaces the controller's bandwidth limits (`Leases.SetLimit` records) at once; running
    /// transfers follow within a second.
    pub fn set_bandwidth_overrides(
        &self,
        overrides: HashMap<crate::bandwidth::Scope, crate::bandwidth::Limit>,
    ) {
        self.ctx.bandwidth.replace_overrides(overrides);
    }

    /// Sets the port lease admin gates (`None`: the configured gate). Existing leases keep
    /// their ports; the gates apply to new registrations.
    pub async fn set_admin_gates(&self, tcp: Option<AdminGate>, udp: Option<AdminGate>) {
        let mut control = self.ctx.control.lock().await;
        let (tcp_config, udp_config) = (
            control.table.config().tcp.admin,
            control.table.config().udp.admin,
        );
        control
            .table
            .set_admin_gate(PortTransport::Tcp, tcp.unwrap_or(tcp_config));
        control
            .table
            .set_admin_gate(PortTransport::Udp, udp.unwrap_or(udp_config));
    }

    /// Ends every live lease for which `revoked` is true (a controller decision: ban, denial,
    /// quota) and publishes the routes without them. They are NOT reported back as releases:
    /// the controller's record already says why they ended. Returns the leases ended.
    pub async fn revoke_leases(&self, revoked: impl Fn(&Lease) -> bool) -> Vec<Lease> {
        let mut control = self.ctx.control.lock().await;
        let now = Instant::now();
        let targets: Vec<(ConnId, LeaseId)> = control
            .table
            .leases()
            .filter(|l| revoked(l))
            .map(|l| (l.conn, l.id))
            .collect();
        let mut ended = Vec::with_capacity(targets.len());
        for (conn, id) in targets {
            if let Ok(lease) = control.table.release(conn, &id.0, now) {
                ended.push(lease);
            }
        }
        if !ended.is_empty() {
            self.ctx.publish(&mut control);
        }
        ended
    }
}

/// Drains a running [`QuicServer`] without stopping it (`outrelay relay drain`): new
/// connections and new leases are refused, every agent gets GOAWAY and moves to its other
/// relays; spliced pairs and joined streams finish or resume elsewhere.
#[derive(Clone)]
pub struct DrainHandle {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for DrainHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainHandle")
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

impl DrainHandle {
    /// Starts draining: sets the flag, then sends GOAWAY{[`DRAIN_REASON`],
    /// `reconnect_after_ms`} to every connection. Returns false when already draining (the
    /// GOAWAY went out then; nothing is sent twice).
    pub fn drain(&self, reconnect_after_ms: u32) -> bool {
        if self.ctx.draining.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.ctx.drain.send_replace(Some(orp::GoAway {
            reason: DRAIN_REASON.to_owned(),
            reconnect_after_ms,
        }));
        true
    }

    /// Whether `drain` was called.
    pub fn is_draining(&self) -> bool {
        self.ctx.draining.load(Ordering::Acquire)
    }

    /// Agent connections past HELLO right now.
    pub fn agents(&self) -> usize {
        self.ctx.agents().len()
    }
}

/// Stops a running [`QuicServer`]: every connection gets GOAWAY, then is closed.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<Option<orp::GoAway>>>,
}

impl ShutdownHandle {
    /// Sends GOAWAY{reason, reconnect_after_ms} to every connection, closes them once it is
    /// acknowledged (or after the drain grace), and makes [`QuicServer::run`] return.
    pub fn shutdown(&self, reason: &str, reconnect_after_ms: u32) {
        self.tx.send_replace(Some(orp::GoAway {
            reason: reason.to_owned(),
            reconnect_after_ms,
        }));
    }
}

/// The bound agent endpoint.
pub struct QuicServer {
    endpoint: quinn::Endpoint,
    /// The TCP fallback's tunnels (synthetic peers of `endpoint`).
    tunnels: Arc<fallback::Tunnels>,
    ctx: Arc<Ctx>,
    shutdown_tx: Arc<watch::Sender<Option<orp::GoAway>>>,
    identity: Identity,
    cert: Arc<outrelay_client::Reloadable>,
    /// The TLS side of every `ServerConfig` (its certificate resolver swaps on its own).
    crypto: Arc<dyn quinn::crypto::ServerConfig>,
}

/// Applies a reloaded `[quic]` to the running endpoint ([`QuicServer::reloader`]).
pub struct QuicReload {
    endpoint: quinn::Endpoint,
    tunnels: Arc<fallback::Tunnels>,
    ctx: Arc<Ctx>,
    crypto: Arc<dyn quinn::crypto::ServerConfig>,
}

impl std::fmt::Debug for QuicReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicReload").finish_non_exhaustive()
    }
}

impl QuicReload {
    /// Publishes `config` (validated): new connections get its transport limits (a new
    /// `ServerConfig` on the same endpoint: idle timeout, keep-alive, stream and window
    /// limits), and its per-identity cap, HELLO deadline, drain grace and frame rates apply
    /// to connections accepted from now on. Established connections keep what they
    /// negotiated. What needs the socket or the certificate stays: `listen`, `tls`, the
    /// public host and the advertised reverse address.
    ///
    /// # Errors
    /// A [`QuicError::Config`] (the running config stays).
    pub fn apply(&self, mut config: QuicConfig) -> Result<(), QuicError> {
        config.validate()?;
        let old = self.ctx.config.load();
        config.listen = old.listen;
        config.tls = old.tls.clone();
        config.public_host.clone_from(&old.public_host);
        config.reverse_addr.clone_from(&old.reverse_addr);
        config.control_send_queue_max = old.control_send_queue_max;
        let server = server_config(&config, self.crypto.clone())?;
        self.endpoint.set_server_config(Some(server));
        self.tunnels.set_limits(config.fallback.clone());
        self.ctx.config.store(Arc::new(config));
        Ok(())
    }

    /// Applies a reloaded `[leases]` to the lease table ([`LeaseTable::reload`]).
    pub async fn apply_leases(&self, config: &crate::lease::LeaseConfig) {
        self.ctx.control.lock().await.table.reload(config);
    }
}

/// The endpoint's `ServerConfig`: `crypto` with `config`'s transport limits.
fn server_config(
    config: &QuicConfig,
    crypto: Arc<dyn quinn::crypto::ServerConfig>,
) -> Result<quinn::ServerConfig, QuicError> {
    let mut server_config = quinn::ServerConfig::with_crypto(crypto);
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(config.idle_timeout_ms))
        .map_err(|e| QuicError::Config(format!("idle_timeout_ms: {e}")))?;
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(Duration::from_millis(config.keep_alive_ms)))
        .max_concurrent_bidi_streams(config.max_concurrent_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        // M2: what one connection can make the relay buffer (all streams together), and
        // what the relay keeps unacknowledged toward it.
        .receive_window(varint(config.connection_receive_window_bytes)?)
        .stream_receive_window(varint(config.stream_receive_window_bytes)?)
        .send_window(config.connection_receive_window_bytes)
        // UDP leases: room for bursts (quinn drops the oldest received datagram when full,
        // and a full send buffer makes the port task drop the newest, counted).
        .datagram_receive_buffer_size(Some(QUIC_DATAGRAM_BUFFER_BYTES))
        .datagram_send_buffer_size(QUIC_DATAGRAM_BUFFER_BYTES);
    server_config.transport_config(Arc::new(transport));
    Ok(server_config)
}

impl std::fmt::Debug for QuicServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicServer")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl QuicServer {
    /// [`QuicServer::bind_with_decider`] with [`ApproveAll`] (until the controller client
    /// exists).
    ///
    /// # Errors
    /// Any [`QuicError`].
    pub fn bind(
        config: QuicConfig,
        leases: LeaseTable,
        shared: Arc<Shared>,
    ) -> Result<QuicServer, QuicError> {
        QuicServer::bind_with_decider(config, leases, shared, Arc::new(ApproveAll))
    }

    /// Validates the config, builds TLS (the relay identity comes from its own leaf, which
    /// must be a relay's), derives the stateless-reset key and binds the UDP socket. Must be
    /// called inside a tokio runtime. `decider` gives the controller's verdict on every
    /// LEASE_REGISTER.
    ///
    /// # Errors
    /// Any [`QuicError`].
    pub fn bind_with_decider(
        config: QuicConfig,
        leases: LeaseTable,
        shared: Arc<Shared>,
        decider: Arc<dyn LeaseDecider>,
    ) -> Result<QuicServer, QuicError> {
        QuicServer::bind_with_socket(config, leases, shared, decider, None)
    }

    /// [`QuicServer::bind_with_decider`] on `socket` when given (bound by [`bind_udp`], or
    /// inherited from the old process at a hand-over) instead of binding `config.listen`.
    ///
    /// # Errors
    /// Any [`QuicError`].
    pub fn bind_with_socket(
        config: QuicConfig,
        leases: LeaseTable,
        shared: Arc<Shared>,
        decider: Arc<dyn LeaseDecider>,
        socket: Option<std::net::UdpSocket>,
    ) -> Result<QuicServer, QuicError> {
        config.validate()?;
        let leaf = config
            .tls
            .cert_chain
            .first()
            .ok_or_else(|| QuicError::Tls("empty certificate chain".to_owned()))?;
        let (identity, _) = cert_identity(leaf)?;
        if identity.role() != Role::Relay {
            return Err(QuicError::BadIdentity(format!(
                "the relay certificate names {identity}, not a relay"
            )));
        }
        let stats = Arc::new(QuicStats::default());
        let cert = outrelay_client::Reloadable::from_certified(certified_key(
            config.tls.cert_chain.clone(),
            config.tls.key.clone_key(),
        )?);
        let crypto = tls::server_crypto(&config.tls, cert.clone(), stats.clone())?;
        let crypto: Arc<dyn quinn::crypto::ServerConfig> = Arc::new(crypto);
        let server_config = server_config(&config, crypto.clone())?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let reset_key = tls::ResetKey::derive(&provider, &config.tls.key)?;
        // Connection ids keyed from the same secret: after a restart the new process still
        // recognises its predecessor's ids as its own and answers them with a stateless reset
        // (a random per-process key would make it drop them silently, and agents would only
        // notice through missed pings).
        let cid_key = reset_key.cid_key();
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let socket = match socket {
            Some(s) => s,
            None => bind_udp(config.listen).map_err(|source| QuicError::Bind {
                addr: config.listen,
                source,
            })?,
        };
        // The real socket stays quinn's own (GSO/GRO); the wrapper adds the TCP fallback's
        // tunnels as synthetic peers.
        let bind_err = |source| QuicError::Bind {
            addr: config.listen,
            source,
        };
        let tunnels = fallback::Tunnels::new(config.fallback.clone(), stats.fallback.clone());
        let real =
            quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket).map_err(bind_err)?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config),
            Arc::new(fallback::RelaySocket::new(real, tunnels.clone())),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        let (tx, rx) = watch::channel(None);
        let ctx = Arc::new(Ctx {
            config: arc_swap::ArcSwap::from_pointee(config),
            control: Mutex::new(Control {
                table: leases,
                keys: HashMap::new(),
                published: 0,
                published_generation: 0,
            }),
            stats,
            decider,
            shutdown: rx,
            draining: AtomicBool::new(false),
            drain: watch::channel(None).0,
            agents: std::sync::Mutex::new(HashMap::new()),
            identities: std::sync::Mutex::new(HashMap::new()),
            udp: std::sync::OnceLock::new(),
            steering: std::sync::OnceLock::new(),
            mesh: std::sync::OnceLock::new(),
            ingress: std::sync::OnceLock::new(),
            parked: std::sync::Mutex::new(resume::ParkTable::default()),
            lanes: forward::Lanes::default(),
            bandwidth: shared.bandwidth.clone(),
            forward: std::sync::OnceLock::new(),
            tunnels: tunnels.clone(),
            shared,
        });
        Ok(QuicServer {
            endpoint,
            tunnels,
            ctx,
            shutdown_tx: Arc::new(tx),
            identity,
            cert,
            crypto,
        })
    }

    /// Routes agents' QUIC datagrams to `udp` (UDP leases). Call before [`QuicServer::run`];
    /// without it, datagrams from agents are not read.
    pub fn serve_udp(&self, udp: Arc<crate::udp::UdpIngress>) {
        let _ = self.ctx.udp.set(udp);
    }

    /// Opens and closes lease ports in the eBPF lookup map at every publish. Call before
    /// [`QuicServer::run`].
    pub fn serve_steering(&self, steering: Arc<crate::steer::Steering>) {
        let _ = self.ctx.steering.set(steering);
    }

    /// Lets [`RelayHandle::cut_pairs`] reach the workers. Call before [`QuicServer::run`].
    pub fn serve_ingress(&self, ingress: Arc<crate::ingress::Ingress>) {
        let _ = self.ctx.ingress.set(ingress);
    }

    /// Serves REGISTER and OPEN_STREAM from `mesh`. Call before [`QuicServer::run`]; without
    /// it REGISTER is answered with STREAM_REJECT 503 and application streams are refused.
    pub fn serve_mesh(&self, mesh: Arc<crate::mesh::Mesh>) {
        let _ = self.ctx.mesh.set(mesh);
    }

    /// Serves relay-to-relay forwarding with `config`: remote providers are reached through
    /// a pooled connection per peer relay dialled from this endpoint (this relay's
    /// certificate as the client's), and relay-role connections may open FORWARD_STREAMs.
    /// Call after [`QuicServer::serve_mesh`] and before [`QuicServer::run`].
    ///
    /// # Errors
    /// A [`QuicError`] when the client TLS or transport cannot be built.
    pub fn serve_forward(
        &self,
        config: crate::forward::ForwardConfig,
    ) -> Result<Arc<crate::forward::Peers>, QuicError> {
        let quic = self.ctx.config();
        let relay_id = match &self.identity {
            Identity::Relay { id, .. } => id.as_str().to_owned(),
            other => other.to_string(),
        };
        let mut transport = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(Duration::from_millis(quic.idle_timeout_ms))
            .map_err(|e| QuicError::Config(format!("idle_timeout_ms: {e}")))?;
        let window = config.connection_receive_window_bytes(
            quic.stream_receive_window_bytes,
            quic.connection_receive_window_bytes,
        );
        transport
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(Duration::from_millis(quic.keep_alive_ms)))
            // The peer opens no stream toward the dialling relay but its checkpoint lane.
            .max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(forward::LANE_STREAMS.into())
            // One tenant's stalled streams hold at most half of it (`[forward]`).
            .receive_window(varint(window)?)
            .stream_receive_window(varint(quic.stream_receive_window_bytes)?)
            .send_window(quic.connection_receive_window_bytes);
        let peers = crate::forward::Peers::new(
            config,
            relay_id,
            Some(self.endpoint.clone()),
            self.cert.clone(),
            &quic.tls.ca_roots,
            transport,
        )
        .map_err(|e| QuicError::Tls(e.to_string()))?;
        let _ = self.ctx.forward.set(peers.clone());
        Ok(peers)
    }

    /// The bound UDP address.
    ///
    /// # Errors
    /// The socket's.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Moves the endpoint (before it has connections) to `socket`: a new process after an
    /// upgrade binds on a placeholder and takes the inherited QUIC socket once the old one has
    /// let go of it (RELEASED). The handle is for that one call: drop it after.
    pub fn rebinder(
        &self,
    ) -> impl FnOnce(std::net::UdpSocket) -> std::io::Result<()> + Send + use<> {
        let endpoint = self.endpoint.clone();
        let tunnels = self.tunnels.clone();
        move |socket| {
            let real = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)?;
            endpoint.rebind_abstract(Arc::new(fallback::RelaySocket::new(real, tunnels)))
        }
    }

    /// The TCP/443 fallback's acceptor: TLS with this relay's identity certificate (swapped
    /// with it), ALPN `orp/1`, agent client certificates checked like QUIC's, packets into this
    /// endpoint. Give it to [`crate::ingress::Ingress::serve_fallback`].
    ///
    /// # Errors
    /// [`QuicError::Tls`] when the TLS configuration cannot be built.
    pub fn fallback_acceptor(&self) -> Result<fallback::FallbackAcceptor, QuicError> {
        let config = self.ctx.config();
        let tls = tls::server_tls(&config.tls, self.cert.clone(), self.ctx.stats.clone())?;
        Ok(fallback::FallbackAcceptor::new(
            Arc::new(tls),
            self.tunnels.clone(),
        ))
    }

    /// The relay identity from its certificate.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The certificate new handshakes get: [`outrelay_client::Reloadable::swap`] replaces it
    /// without touching established connections (renewal, SIGHUP).
    pub fn cert_resolver(&self) -> Arc<outrelay_client::Reloadable> {
        self.cert.clone()
    }

    /// Applies reloaded `[quic]` settings to this endpoint (SIGHUP).
    pub fn reloader(&self) -> QuicReload {
        QuicReload {
            endpoint: self.endpoint.clone(),
            tunnels: self.tunnels.clone(),
            ctx: self.ctx.clone(),
            crypto: self.crypto.clone(),
        }
    }

    /// The endpoint's counters.
    pub fn stats(&self) -> Arc<QuicStats> {
        self.ctx.stats.clone()
    }

    /// A handle for the controller client (lease revocation, closing revoked agents).
    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            ctx: self.ctx.clone(),
        }
    }

    /// A handle that drains the relay (`outrelay relay drain`) while it keeps running.
    pub fn drain_handle(&self) -> DrainHandle {
        DrainHandle {
            ctx: self.ctx.clone(),
        }
    }

    /// A handle that stops [`QuicServer::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            tx: self.shutdown_tx.clone(),
        }
    }

    /// Accepts agent connections and sweeps expired leases every janitor interval until
    /// [`ShutdownHandle::shutdown`]; then waits for the connections to drain and closes the
    /// endpoint.
    pub async fn run(self) {
        let ctx = self.ctx;
        let janitor_every =
            Duration::from_millis(ctx.control.lock().await.table.config().janitor_interval_ms);
        let mut janitor = tokio::time::interval(janitor_every);
        janitor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = ctx.shutdown.clone();
        let next_conn = AtomicU64::new(1);
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let conn_id = ConnId(next_conn.fetch_add(1, Ordering::Relaxed));
                    tasks.spawn(conn::handle(incoming, conn_id, ctx.clone()));
                }
                _ = janitor.tick() => {
                    let mut control = ctx.control.lock().await;
                    // A reload may have changed the interval: the next sweep follows it.
                    let every = Duration::from_millis(control.table.config().janitor_interval_ms);
                    if every != janitor.period() {
                        janitor = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                        janitor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    let before = control.table.generation();
                    let ended = control.table.sweep(Instant::now());
                    if !ended.is_empty() || control.table.generation() != before {
                        ctx.publish(&mut control);
                    }
                    drop(control);
                    for lease in &ended {
                        ctx.decider.report(LeaseEvent::of(LeaseEventKind::Released, lease));
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || shutdown.borrow().is_some() {
                        break;
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        // Connections saw the same signal and send GOAWAY; wait for them to finish. After a
        // hand-over only briefly: the new process reads the same UDP socket once this endpoint
        // is dropped (RELEASED), and the agents' new Initials come after the GOAWAY's delay.
        let upgrading = ctx
            .shutdown
            .borrow()
            .as_ref()
            .is_some_and(|g| g.reason == crate::upgrade::UPGRADE_REASON);
        // Upgrading: a third of the agents' reconnect delay for the GOAWAYs to go out, the
        // same again for the closes, well within UPGRADE_RECONNECT_AFTER_MS in all.
        let grace = if upgrading {
            Duration::from_millis(u64::from(crate::upgrade::UPGRADE_RECONNECT_AFTER_MS) / 3)
        } else {
            Duration::from_millis(ctx.config().drain_grace_ms.saturating_mul(2))
        };
        let _ =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        tasks.abort_all();
        // The forwarding pool holds a handle of this endpoint: let go of it (and of its
        // connections), or the socket stays read here after a hand-over.
        if let Some(peers) = ctx.forward.get() {
            peers.shutdown();
        }
        if upgrading {
            // Aborted tasks did not remove their connections: drop the handles here.
            ctx.agents().clear();
        }
        self.endpoint
            .close(close_code::GOING_AWAY.into(), b"relay stopping");
        let _ = tokio::time::timeout(grace, self.endpoint.wait_idle()).await;
    }
}
