//! One relay: dial (QUIC mTLS, ALPN `orp/1`), HELLO, register every lease, renew at TTL/2,
//! re-register on `lease_not_found`, retry `pending_approval` at TTL/2, PING, follow GOAWAY,
//! reconnect with backoff (initial doubling to max, ±20 % jitter), release on stop.
//!
//! Service streams: every provided service is REGISTERed on every (re)connection; a
//! STREAM_REJECT answering a REGISTER is retried after [`SERVICE_RETRY_INITIAL`] doubling to
//! [`SERVICE_RETRY_MAX`]. The live connection is published to [`MeshCtx`] for consumers, and
//! the streams the relay opens on it are served by [`crate::mesh::serve_incoming`].
//!
//! Tasks per connection: this task (state machine; owns every lease's state, so nothing is
//! locked), a reader task that decodes control-stream frames into a bounded queue, and a writer
//! task that drains a bounded queue into the control stream. Pools are separate tasks, aborted
//! when their grant ends.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outrelay_proto::frame::{Decoded, Frame, decode};
use outrelay_proto::orp;
use outrelay_proto::reverse::{EXPORTER_KEY_BYTES, EXPORTER_LABEL, LeaseId};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::candidates::{Candidates, Ended, Pick, Target};
use crate::config::{LeaseSpec, Settings};
use crate::fallback;
use crate::mesh::{self, MeshCtx};
use crate::pool::{self, FailLog, PoolCtx, PoolParams};
use crate::stats::{
    Board, LeaseState, LeaseStatus, MeshRole, PoolGauge, RelayStatus, ServiceState, ServiceStatus,
    Stats, Transport,
};
use crate::udp;

/// The HELLO `protocol_version`.
pub const PROTOCOL_VERSION: &str = "orp/1";
/// The HELLO capability for lease frames.
pub const FEATURE_LEASES: &str = "leases";
/// HELLO capability: STREAM_ACCEPT on our consumer streams (an explicit answer before the
/// joined bytes; a relay without it would join silently, as the Go relay does).
pub const FEATURE_STREAM_ACCEPT: &str = "stream_accept";
/// HELLO capability: this agent keeps rings and resumes service streams (orp.md "Resume");
/// sent when `[resume] enabled`.
pub const FEATURE_STREAM_RESUME: &str = "stream_resume";

/// The HELLO capabilities this agent asks for.
fn capabilities(settings: &crate::config::Settings) -> Vec<String> {
    let mut caps = vec![FEATURE_LEASES.to_owned(), FEATURE_STREAM_ACCEPT.to_owned()];
    if settings.resume.enabled {
        caps.push(FEATURE_STREAM_RESUME.to_owned());
    }
    caps
}
/// Reverse-session port when a grant's `reverse_addr` is empty (public-ingress.md).
pub const DEFAULT_REVERSE_PORT: u16 = 7443;
/// Bound of the control-stream send and receive queues, in frames.
const CONTROL_QUEUE_FRAMES: usize = 64;
/// Bytes read from the control stream per call.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// A connection with no frame for this many ping intervals is considered dead.
const PING_MISSES_MAX: u32 = 3;
/// Longest wait for the QUIC endpoint to flush its close on stop.
const CLOSE_FLUSH: Duration = Duration::from_millis(500);
/// First delay before a refused REGISTER is sent again.
pub const SERVICE_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Longest delay between refused REGISTERs of one service.
pub const SERVICE_RETRY_MAX: Duration = Duration::from_secs(30);

/// What every relay task shares.
pub struct RelayCtx {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// The agent's URI SAN (HELLO).
    pub agent_uri: String,
    /// quinn client configuration (mTLS, relay-role verifier).
    pub client: quinn::ClientConfig,
    /// TLS of the TCP fallback (same certificate and verifier; `crate::fallback`).
    pub fallback_tls: Arc<rustls::ClientConfig>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Status board.
    pub board: Arc<Board>,
    /// What pools share.
    pub pools: Arc<PoolCtx>,
    /// Service streams: where live connections are published, what providers serve.
    pub mesh: Arc<MeshCtx>,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("connect: {0}")]
    Connect(String),
    #[error("no HELLO_ACK in time")]
    HelloTimeout,
    #[error("control stream: {0}")]
    Control(String),
    /// The relay closed the connection with a reason before HELLO_ACK (revoked identity, no
    /// revocation list yet, HELLO mismatch, too many connections: its close codes).
    #[error("relay refused the connection (close code {code}): {reason}")]
    Refused { code: u64, reason: String },
    #[error("relay sent {0} where HELLO_ACK was expected")]
    NotHelloAck(&'static str),
    #[error("no frame for {0:?}")]
    Silent(Duration),
}

/// Why the control stream ended before HELLO_ACK: the relay's close code and reason when it
/// closed the connection itself, else `error`.
fn refused_or(conn: &quinn::Connection, error: String) -> Lost {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => Lost::Refused {
            code: c.error_code.into_inner(),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        _ => Lost::Control(error),
    }
}

enum Outcome {
    /// The agent is stopping (leases released).
    Stopped,
    /// GOAWAY: reconnect after the relay's delay.
    GoAway(Duration),
    /// The relay (this identity) is already held by another slot.
    Duplicate(String),
    /// The connection failed or ended; `established` when HELLO_ACK had arrived.
    Lost { error: Lost, established: bool },
}

/// Per lease state that outlives connections.
struct Slot {
    spec: LeaseSpec,
    name: Arc<str>,
    tls_to: Option<Arc<str>>,
    tcp_to: Option<Arc<str>>,
    udp_to: Option<Arc<str>>,
    fail_log: Arc<FailLog>,
}

/// Per lease state on one connection.
struct Live {
    state: LeaseState,
    lease_id: Option<LeaseId>,
    hostname: String,
    tcp_addr: Option<String>,
    udp_addr: Option<String>,
    /// Where its reverse sessions go (`agent status`).
    reverse_addr: Option<String>,
    /// The slot this connection's mux serves for the lease.
    udp_slot: Option<u32>,
    last_error: Option<String>,
    /// The grant's reverse address last refused by the pinning rule (logged and counted once).
    refused_reverse: Option<String>,
    pool: Option<JoinHandle<()>>,
    gauge: Arc<PoolGauge>,
    /// Renew (granted) or retry (pending, refused) at this time.
    due: Option<Instant>,
}

impl Live {
    fn new() -> Live {
        Live {
            state: LeaseState::Registering,
            lease_id: None,
            hostname: String::new(),
            tcp_addr: None,
            udp_addr: None,
            reverse_addr: None,
            udp_slot: None,
            last_error: None,
            refused_reverse: None,
            pool: None,
            gauge: Arc::new(PoolGauge::default()),
            due: None,
        }
    }

    fn stop_pool(&mut self) {
        if let Some(p) = self.pool.take() {
            p.abort();
        }
        self.gauge = Arc::new(PoolGauge::default());
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.stop_pool();
    }
}

/// Per provided service state on one connection.
struct SvcLive {
    state: ServiceState,
    service_id: String,
    last_error: Option<String>,
    /// Delay before the next REGISTER after a refusal.
    backoff: Duration,
    /// Register again at this time (after a refusal).
    due: Option<Instant>,
}

impl SvcLive {
    fn new() -> SvcLive {
        SvcLive {
            state: ServiceState::Registering,
            service_id: String::new(),
            last_error: None,
            backoff: SERVICE_RETRY_INITIAL,
            due: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Request {
    Register(usize),
    Renew(usize),
    Release,
    /// REGISTER of provided service `i`.
    Service(usize),
}

/// Runs HA slot `index` until `stop` turns true: picks a candidate ([`Candidates::pick`]),
/// holds a connection to it until it ends, then refills the slot from the other candidates.
pub async fn run(
    index: usize,
    ctx: Arc<RelayCtx>,
    cands: Arc<Candidates>,
    mut stop: watch::Receiver<bool>,
) {
    let slots: Vec<Slot> = ctx
        .settings
        .leases
        .iter()
        .map(|spec| Slot {
            spec: spec.clone(),
            name: Arc::from(spec.name.as_str()),
            tls_to: spec.tls_to.as_deref().map(Arc::from),
            tcp_to: spec.tcp_to.as_deref().map(Arc::from),
            udp_to: spec.udp_to.as_deref().map(Arc::from),
            fail_log: Arc::new(FailLog::default()),
        })
        .collect();
    // The relay this slot last held, and the candidate it last dialled.
    let mut last_relay: Option<String> = None;
    let mut avoid: Option<SocketAddr> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        cands.refresh().await;
        let target = match cands.pick(index, avoid) {
            Pick::Dial(t) => t,
            Pick::Wait(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
        };
        ctx.stats.connect_attempts.fetch_add(1, Ordering::Relaxed);
        let outcome = connect_once(
            index,
            &target,
            &ctx,
            &cands,
            &slots,
            &mut stop,
            &mut last_relay,
        )
        .await;
        let addr = target.addr.to_string();
        publish_disconnected(index, &addr, &ctx, &slots);
        avoid = Some(target.addr);
        let (ended, error) = match outcome {
            Outcome::Stopped => {
                cands.release(index, target.addr, Ended::Stopped, None);
                return;
            }
            Outcome::Duplicate(id) => {
                tracing::info!(relay = %addr, relay_id = %id, "relay already held through another address: trying another candidate");
                (Ended::Duplicate, None)
            }
            Outcome::GoAway(after) => {
                ctx.stats.goaways.fetch_add(1, Ordering::Relaxed);
                tracing::info!(relay = %addr, after_ms = after.as_millis(), "GOAWAY: replacing the relay");
                (Ended::GoAway(after), Some("goaway".to_owned()))
            }
            Outcome::Lost { error, established } => {
                if established {
                    ctx.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(relay = %addr, %error, "relay connection lost: replacing it");
                    (Ended::Lost, Some(error.to_string()))
                } else {
                    ctx.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(relay = %addr, %error, "cannot connect to relay candidate");
                    (Ended::Failed, Some(error.to_string()))
                }
            }
        };
        cands.release(index, target.addr, ended, error);
    }
}

/// `d` ± 20 %.
pub(crate) fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX)
    } else {
        0.5
    };
    d.mul_f64(0.8 + 0.4 * r)
}

/// The relay's identity URI from its certificate (verified by `tls::RelayCertVerifier`);
/// the remote address when it cannot be read (never the case with that verifier).
fn relay_identity(conn: &quinn::Connection) -> String {
    conn.peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| {
            certs
                .first()
                .and_then(|c| crate::tls::cert_identity(c).ok())
                .map(|(_, uri)| uri)
        })
        .unwrap_or_else(|| format!("addr:{}", conn.remote_address()))
}

/// The host part of `host:port` (brackets of an IPv6 literal kept).
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Why a grant's reverse address is not dialled (review M9: a relay, or whoever answers for
/// it, must not point the agent's pools at any host and port of the agent's network).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PinRefusal {
    /// Not `host:port` with a port above 0.
    #[error("not host:port")]
    Malformed,
    /// Neither the host the agent dialled for QUIC (same name, or the IP its QUIC connection
    /// went to) nor in `reverse_allow`.
    #[error("neither the relay's dialled host nor in reverse_allow")]
    NotPinned,
}

/// The address to dial for a grant's reverse address `granted`, when the agent may: `granted`
/// is in `allow` (`host:port`, the host compared without case; dialled as named), its host is
/// `dialled_host` (the host part of the relay address dialled for QUIC; then the sessions go to
/// `quic_ip`, the IP that QUIC connection verified, so a later DNS answer cannot divert them),
/// or its host is the IP literal `quic_ip`.
///
/// # Errors
/// [`PinRefusal`].
pub fn pin_reverse(
    granted: &str,
    dialled_host: &str,
    quic_ip: IpAddr,
    allow: &[String],
) -> Result<String, PinRefusal> {
    let (host, port) = granted.rsplit_once(':').ok_or(PinRefusal::Malformed)?;
    let port: u16 = port.parse().map_err(|_| PinRefusal::Malformed)?;
    if port == 0 || host.is_empty() {
        return Err(PinRefusal::Malformed);
    }
    let bare = |h: &str| -> String { h.trim_start_matches('[').trim_end_matches(']').to_owned() };
    let literal = bare(host).parse::<IpAddr>().ok();
    let same_host = match literal {
        Some(ip) => ip == quic_ip,
        None => bare(host).eq_ignore_ascii_case(&bare(dialled_host)),
    };
    // Listed: dialled as named, even on the dialled host (a reverse listener on another IP
    // under the relay's name).
    if allow.iter().any(|a| a.eq_ignore_ascii_case(granted)) {
        return Ok(granted.to_owned());
    }
    if same_host {
        return Ok(SocketAddr::new(quic_ip, port).to_string());
    }
    Err(PinRefusal::NotPinned)
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn publish_disconnected(index: usize, addr: &str, ctx: &RelayCtx, slots: &[Slot]) {
    let previous = ctx.board.snapshot().into_iter().nth(index);
    ctx.board.set(
        index,
        RelayStatus {
            addr: addr.to_owned(),
            name: previous
                .as_ref()
                .map(|p| p.name.clone())
                .unwrap_or_default(),
            relay_id: previous.map(|p| p.relay_id).unwrap_or_default(),
            connected: false,
            transport: Transport::Quic,
            tunnel_addr: None,
            leases: slots
                .iter()
                .map(|s| LeaseStatus {
                    name: s.spec.name.clone(),
                    state: LeaseState::Disconnected,
                    hostname: String::new(),
                    tcp_addr: None,
                    udp_addr: None,
                    reverse_addr: None,
                    last_error: None,
                    pool: None,
                })
                .collect(),
            services: ctx
                .settings
                .provides
                .iter()
                .map(|p| ServiceStatus::disconnected(&p.service))
                .collect(),
        },
    );
}

/// One connection from dial to its end.
async fn connect_once(
    index: usize,
    target: &Target,
    ctx: &Arc<RelayCtx>,
    cands: &Candidates,
    slots: &[Slot],
    stop: &mut watch::Receiver<bool>,
    last_relay: &mut Option<String>,
) -> Outcome {
    // The configured entry: its host is the one reverse addresses are pinned to.
    let addr = target.name.as_str();
    let lost = |error| Outcome::Lost {
        error,
        established: false,
    };
    let cfg = &ctx.settings.connection;
    let remote = target.addr;
    let started = Instant::now();
    // The handshake deadline, plus what the fallback may spend before its QUIC handshake
    // starts (QUIC's own try, then each TCP address in turn): a blocked first address must
    // not eat the time of the next one.
    let hello_timeout = cfg.hello_timeout + fallback::setup_budget(addr, &ctx.settings.fallback);
    // QUIC, or QUIC inside the TCP/443 fallback (`[fallback]`).
    let dialled = tokio::select! {
        r = tokio::time::timeout(hello_timeout, fallback::dial(addr, remote, ctx)) => match r {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return lost(Lost::Connect(e.to_string())),
            Err(_) => return lost(Lost::HelloTimeout),
        },
        _ = stop.changed() => return Outcome::Stopped,
    };
    // `_tunnel`: the fallback's TCP connection, closed when this connection ends.
    let fallback::Dialled {
        endpoint,
        conn,
        send,
        recv,
        transport,
        tunnel: _tunnel,
        tunnel_addr,
    } = dialled;
    let relay_id = relay_identity(&conn);
    if !cands.claim(index, remote, &relay_id) {
        conn.close(0u32.into(), b"relay already held");
        let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
        return Outcome::Duplicate(relay_id);
    }
    let back_to_quic = fallback::quic_returns(transport, remote, ctx);
    let mut back_to_quic = std::pin::pin!(back_to_quic);
    let (out_tx, out_rx) = mpsc::channel::<Frame>(CONTROL_QUEUE_FRAMES);
    let writer = tokio::spawn(write_frames(send, out_rx));
    let (in_tx, mut in_rx) = mpsc::channel::<Result<Frame, String>>(CONTROL_QUEUE_FRAMES);
    let reader = tokio::spawn(read_frames(recv, in_tx));
    let (udp, udp_task) = udp::spawn(
        conn.clone(),
        ctx.stats.udp.clone(),
        ctx.settings.udp.clone(),
    );
    let _tasks = AbortOnDrop(vec![writer, reader, udp_task]);

    let hello = Frame::Hello(orp::Hello {
        protocol_version: PROTOCOL_VERSION.to_owned(),
        agent_uri: ctx.agent_uri.clone(),
        capabilities: capabilities(&ctx.settings),
    });
    if out_tx.send(hello).await.is_err() {
        return lost(Lost::Control("writer ended".into()));
    }
    let remaining = hello_timeout.saturating_sub(started.elapsed());
    let ack = tokio::select! {
        r = tokio::time::timeout(remaining, in_rx.recv()) => r,
        _ = stop.changed() => return Outcome::Stopped,
    };
    let ack = match ack {
        Err(_) => return lost(Lost::HelloTimeout),
        Ok(None) => return lost(refused_or(&conn, "ended before HELLO_ACK".into())),
        Ok(Some(Err(e))) => return lost(refused_or(&conn, e)),
        Ok(Some(Ok(Frame::HelloAck(ack)))) => ack,
        Ok(Some(Ok(other))) => return lost(Lost::NotHelloAck(other.frame_type().name())),
    };
    for feature in [FEATURE_LEASES, FEATURE_STREAM_ACCEPT] {
        if !ack.accepted_features.iter().any(|f| f == feature) {
            tracing::warn!(relay = %addr, feature, "relay did not accept a feature this agent uses");
        }
    }
    // Relay clock minus ours, for reading grant expiry times.
    let clock_offset_ms = ack.server_time_unix_ms.saturating_sub(unix_ms());
    tracing::info!(relay = %addr, remote = %remote, relay_id = %relay_id, slot = index, session = %ack.session_id, took_ms = started.elapsed().as_millis(), "connected to relay");
    if last_relay.as_ref().is_some_and(|r| *r != relay_id) {
        cands.replacements.fetch_add(1, Ordering::Relaxed);
    }
    *last_relay = Some(relay_id.clone());

    let link = Arc::new(mesh::Link::new(conn.clone(), out_tx.clone(), target.rank));
    let incoming = tokio::spawn(mesh::serve_incoming(link, ctx.mesh.clone()));
    let _incoming = AbortOnDrop(vec![incoming]);
    ctx.mesh.set_connection(
        index,
        Some(mesh::Link::new(conn.clone(), out_tx.clone(), target.rank)),
    );
    let mut c = Conn {
        index,
        addr,
        remote: remote.to_string(),
        relay_id: relay_id.clone(),
        ctx,
        slots,
        conn: &conn,
        out: &out_tx,
        udp,
        live: slots.iter().map(|_| Live::new()).collect(),
        services: ctx
            .settings
            .provides
            .iter()
            .map(|_| SvcLive::new())
            .collect(),
        requests: HashMap::new(),
        next_request: 1,
        clock_offset_ms,
        default_reverse: format!("{}:{DEFAULT_REVERSE_PORT}", host_of(addr)),
        broken: false,
        transport,
        tunnel_addr,
    };
    for i in 0..slots.len() {
        c.register(i);
    }
    for i in 0..c.services.len() {
        c.register_service(i);
    }
    c.publish();
    let mut last_rx = Instant::now();
    let mut next_ping = Instant::now() + cfg.ping_interval;
    let silent_max = cfg.ping_interval * PING_MISSES_MAX;
    let result = loop {
        if c.broken {
            break Outcome::Lost {
                error: Lost::Control("control send queue full".into()),
                established: true,
            };
        }
        let due = c
            .live
            .iter()
            .filter_map(|l| l.due)
            .chain(c.services.iter().filter_map(|s| s.due))
            .min()
            .map_or(next_ping, |d| d.min(next_ping));
        tokio::select! {
            frame = in_rx.recv() => {
                last_rx = Instant::now();
                match frame {
                    Some(Ok(Frame::GoAway(g))) => {
                        let after = Duration::from_millis(u64::from(g.reconnect_after_ms));
                        tracing::info!(relay = %addr, reason = %g.reason, "GOAWAY");
                        break Outcome::GoAway(after);
                    }
                    Some(Ok(frame)) => c.on_frame(frame),
                    Some(Err(e)) => break Outcome::Lost { error: Lost::Control(e), established: true },
                    None => break Outcome::Lost { error: Lost::Control("reader ended".into()), established: true },
                }
            }
            _ = tokio::time::sleep_until(due.into()) => {
                let now = Instant::now();
                if now >= next_ping {
                    if now.saturating_duration_since(last_rx) > silent_max {
                        break Outcome::Lost { error: Lost::Silent(silent_max), established: true };
                    }
                    c.send(Frame::Ping);
                    next_ping = now + cfg.ping_interval;
                }
                c.on_timers(now);
            }
            e = conn.closed() => {
                break Outcome::Lost { error: Lost::Control(e.to_string()), established: true };
            }
            () = &mut back_to_quic => {
                // A clean switch back from the TCP fallback: the GOAWAY path (resume included).
                tracing::info!(relay = %addr, "QUIC reachable again: leaving the TCP fallback");
                break Outcome::GoAway(Duration::ZERO);
            }
            _ = stop.changed() => {
                c.release_all(&mut in_rx).await;
                // Joined service streams finish within the grace before the connection closes
                // (the consumer listeners are already closed: nothing new starts locally).
                let mesh = &ctx.stats.mesh;
                let grace = Duration::from_millis(ctx.settings.shutdown_grace_ms);
                let left = outrelay_lifecycle::drain(grace, || {
                    let n = mesh.active(MeshRole::Consumer) + mesh.active(MeshRole::Provider);
                    usize::try_from(n).unwrap_or(usize::MAX)
                })
                .await;
                if left > 0 {
                    tracing::warn!(cut = left, "grace period over: cutting service streams");
                }
                break Outcome::Stopped;
            }
        }
    };
    ctx.mesh.set_connection(index, None);
    // Idle sessions of this connection can never be claimed any more.
    for l in &mut c.live {
        l.stop_pool();
    }
    drop(c);
    conn.close(0u32.into(), b"agent reconnecting or stopping");
    let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
    result
}

/// A client endpoint on `bind` whose socket has room for datagram bursts.
pub(crate) fn client_endpoint(bind: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: the kernel caps the sizes; a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(udp::QUIC_SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(udp::QUIC_SOCKET_BUFFER_BYTES);
    socket.bind(&bind.into())?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// One established connection's state machine.
struct Conn<'a> {
    index: usize,
    /// The configured entry dialled (logs, reverse pinning).
    addr: &'a str,
    /// The resolved address dialled (`/status`).
    remote: String,
    /// The relay's certificate URI.
    relay_id: String,
    ctx: &'a Arc<RelayCtx>,
    slots: &'a [Slot],
    conn: &'a quinn::Connection,
    out: &'a mpsc::Sender<Frame>,
    /// This connection's UDP lease mux.
    udp: udp::Mux,
    live: Vec<Live>,
    /// Provided services, in `settings.provides` order.
    services: Vec<SvcLive>,
    requests: HashMap<u64, Request>,
    next_request: u64,
    clock_offset_ms: i64,
    default_reverse: String,
    /// A frame could not be queued: end this connection.
    broken: bool,
    /// QUIC, or QUIC inside the TCP fallback (`agent status`).
    transport: Transport,
    /// On the TCP fallback: the relay TCP address the tunnel reached. Reverse sessions dial
    /// it instead of the grant's `reverse_addr` (a network that lets the tunnel through may
    /// allow nothing else; the relay tells a reverse session from a tunnel by its first byte).
    tunnel_addr: Option<SocketAddr>,
}

impl Conn<'_> {
    fn send(&mut self, frame: Frame) {
        // A full queue means the relay stopped reading. Never block the state machine, and
        // never lose a lease frame silently: the connection is redialled instead.
        if self.out.try_send(frame).is_err() {
            self.broken = true;
        }
    }

    fn request_id(&mut self, r: Request) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(id, r);
        id
    }

    fn register(&mut self, i: usize) {
        let spec = &self.slots[i].spec;
        let frame = orp::LeaseRegister {
            name: spec.name.clone(),
            tls: spec.tls_to.is_some(),
            tcp: spec.tcp_to.is_some(),
            udp: spec.udp_to.is_some(),
            ttl_s: spec.ttl_s,
            reverse_tls: false,
            request_id: 0,
            wildcard: spec.wildcard,
            client_addr: spec.proxy_protocol.is_some(),
        };
        let id = self.request_id(Request::Register(i));
        self.live[i].state = LeaseState::Registering;
        self.live[i].due = None;
        self.send(Frame::LeaseRegister(orp::LeaseRegister {
            request_id: id,
            ..frame
        }));
    }

    fn register_service(&mut self, i: usize) {
        let Some(spec) = self.ctx.settings.provides.get(i) else {
            return;
        };
        let frame = orp::Register {
            service_name: spec.service.clone(),
            local_addr: spec.to.clone().unwrap_or_default(),
            request_id: 0,
        };
        let id = self.request_id(Request::Service(i));
        if let Some(s) = self.services.get_mut(i) {
            s.state = ServiceState::Registering;
            s.due = None;
        }
        self.send(Frame::Register(orp::Register {
            request_id: id,
            ..frame
        }));
    }

    fn on_register_ack(&mut self, i: usize, ack: &orp::RegisterAck) {
        let name = self.service_name(i);
        self.ctx
            .stats
            .mesh
            .registered
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(relay = %self.addr, service = %name, service_id = %ack.service_id, "service registered");
        if let Some(s) = self.services.get_mut(i) {
            s.state = ServiceState::Registered;
            s.service_id.clone_from(&ack.service_id);
            s.last_error = None;
            s.backoff = SERVICE_RETRY_INITIAL;
            s.due = None;
        }
    }

    fn on_register_reject(&mut self, i: usize, r: &orp::StreamReject) {
        let name = self.service_name(i);
        self.ctx
            .stats
            .mesh
            .register_rejected
            .fetch_add(1, Ordering::Relaxed);
        let addr = self.addr;
        if let Some(s) = self.services.get_mut(i) {
            let retry = s.backoff;
            tracing::warn!(relay = %addr, service = %name, code = r.code, reason = %r.reason, retry_ms = retry.as_millis(), "service registration refused");
            s.state = ServiceState::Refused;
            s.service_id.clear();
            s.last_error = Some(format!("{}: {}", r.code, r.reason));
            s.due = Some(Instant::now() + retry);
            s.backoff = (retry * 2).min(SERVICE_RETRY_MAX);
        }
    }

    fn service_name(&self, i: usize) -> String {
        self.ctx
            .settings
            .provides
            .get(i)
            .map(|p| p.service.clone())
            .unwrap_or_default()
    }

    fn half_ttl(&self, i: usize) -> Duration {
        Duration::from_millis(u64::from(self.slots[i].spec.ttl_s) * 500)
            .max(Duration::from_millis(crate::config::MIN_DURATION_MS))
    }

    /// When to renew a grant that expires at `expires_unix_ms` (relay clock).
    fn renew_after(&self, i: usize, expires_unix_ms: i64) -> Duration {
        if let Some(fixed) = self.ctx.settings.connection.renew {
            return fixed;
        }
        let relay_now = unix_ms().saturating_add(self.clock_offset_ms);
        let left_ms = u64::try_from(expires_unix_ms.saturating_sub(relay_now)).unwrap_or(0);
        Duration::from_millis(left_ms / 2)
            .min(self.half_ttl(i))
            .max(Duration::from_millis(crate::config::MIN_DURATION_MS))
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Ping => self.send(Frame::Pong),
            Frame::Pong | Frame::HelloAck(_) => {}
            Frame::StreamCheckpoint(c) => self.ctx.mesh.checkpoint(&c),
            Frame::StreamReady(r) => {
                self.ctx
                    .stats
                    .mesh
                    .stream_ready
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(relay = %self.addr, stream_id = r.stream_id, peer = %r.peer_agent_uri, "STREAM_READY");
            }
            Frame::RegisterAck(a) => {
                match self.requests.remove(&a.request_id) {
                    Some(Request::Service(i)) => self.on_register_ack(i, &a),
                    Some(other) => {
                        self.requests.insert(a.request_id, other);
                    }
                    None => {
                        tracing::debug!(relay = %self.addr, request_id = a.request_id, "REGISTER_ACK for no request");
                    }
                }
                self.publish();
            }
            Frame::StreamReject(r) => {
                match self.requests.remove(&r.request_id) {
                    Some(Request::Service(i)) => self.on_register_reject(i, &r),
                    Some(other) => {
                        self.requests.insert(r.request_id, other);
                    }
                    None => {
                        tracing::debug!(relay = %self.addr, request_id = r.request_id, code = r.code, reason = %r.reason, "STREAM_REJECT for no request");
                    }
                }
                self.publish();
            }
            Frame::LeaseGrant(g) => {
                match self.requests.remove(&g.request_id) {
                    Some(Request::Register(i) | Request::Renew(i)) => self.on_grant(i, &g),
                    Some(Request::Release | Request::Service(_)) | None => {}
                }
                self.publish();
            }
            Frame::LeaseError(e) => {
                self.ctx.stats.lease_errors.fetch_add(1, Ordering::Relaxed);
                match self.requests.remove(&e.request_id) {
                    Some(Request::Register(i)) => self.on_register_error(i, &e),
                    Some(Request::Renew(i)) => {
                        tracing::info!(relay = %self.addr, lease = %self.slots[i].name, code = %e.code, "renew refused: registering again");
                        self.ctx
                            .stats
                            .lease_reregistered
                            .fetch_add(1, Ordering::Relaxed);
                        self.live[i].stop_pool();
                        self.live[i].lease_id = None;
                        // The lease is gone: so are its UDP flows (the next grant may reuse
                        // the slot and the port for other clients).
                        self.stop_udp(i);
                        self.register(i);
                    }
                    Some(Request::Release | Request::Service(_)) | None => {}
                }
                self.publish();
            }
            other => {
                tracing::debug!(relay = %self.addr, frame = other.frame_type().name(), "ignored frame");
            }
        }
    }

    fn on_grant(&mut self, i: usize, g: &orp::LeaseGrant) {
        let Some(lease_id) = LeaseId::from_slice(&g.lease_id) else {
            tracing::warn!(relay = %self.addr, lease = %self.slots[i].name, "grant without a 16-byte lease id: registering again");
            self.register(i);
            return;
        };
        let renew = self.renew_after(i, g.expires_unix_ms);
        let same = self.live[i].lease_id == Some(lease_id) && self.live[i].pool.is_some();
        {
            let l = &mut self.live[i];
            l.state = LeaseState::Granted;
            l.hostname.clone_from(&g.hostname);
            l.tcp_addr = (!g.tcp_addr.is_empty()).then(|| g.tcp_addr.clone());
            l.udp_addr = (!g.udp_addr.is_empty()).then(|| g.udp_addr.clone());
            l.last_error = None;
            l.due = Some(Instant::now() + renew);
        }
        self.serve_udp(i, lease_id, g.udp_slot, g.client_addr);
        if same {
            return;
        }
        let mut key = [0u8; EXPORTER_KEY_BYTES];
        if self
            .conn
            .export_keying_material(&mut key, EXPORTER_LABEL, &lease_id.0)
            .is_err()
        {
            tracing::error!(relay = %self.addr, "TLS exporter failed: no reverse sessions possible");
            return;
        }
        let granted = if g.reverse_addr.is_empty() {
            self.default_reverse.as_str()
        } else {
            g.reverse_addr.as_str()
        };
        // On the TCP fallback the sessions follow the tunnel: the address the agent dialled
        // itself (from its config) and that got through, so no pinning is needed.
        let reverse_addr = match self.tunnel_addr.map(|a| a.to_string()) {
            Some(tunnel) => Ok(tunnel),
            None => pin_reverse(
                granted,
                host_of(self.addr),
                self.conn.remote_address().ip(),
                &self.ctx.settings.reverse_allow,
            ),
        };
        let reverse_addr = match reverse_addr {
            Ok(a) => a,
            Err(why) => {
                let l = &mut self.live[i];
                l.stop_pool();
                l.lease_id = Some(lease_id);
                l.last_error = Some(format!("reverse address {granted} refused: {why}"));
                if l.refused_reverse.as_deref() != Some(granted) {
                    l.refused_reverse = Some(granted.to_owned());
                    self.ctx
                        .stats
                        .reverse_addr_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        relay = %self.addr,
                        lease = %self.slots[i].name,
                        reverse = %granted,
                        reason = %why,
                        "reverse address refused: no reverse sessions for this lease (add it to reverse_allow if it is the relay's)"
                    );
                }
                return;
            }
        };
        self.live[i].refused_reverse = None;
        let slot = &self.slots[i];
        tracing::info!(
            relay = %self.addr,
            lease = %slot.name,
            hostname = %g.hostname,
            tcp_addr = %g.tcp_addr,
            udp_addr = %g.udp_addr,
            reverse = %reverse_addr,
            renew_ms = renew.as_millis(),
            "lease granted"
        );
        let l = &mut self.live[i];
        l.stop_pool();
        l.lease_id = Some(lease_id);
        l.reverse_addr =
            (slot.tls_to.is_some() || slot.tcp_to.is_some()).then(|| reverse_addr.clone());
        if slot.tls_to.is_none() && slot.tcp_to.is_none() {
            // A UDP-only lease has no reverse sessions.
            return;
        }
        let params = PoolParams {
            name: slot.name.clone(),
            reverse_addr,
            lease_id,
            key,
            tls_to: slot.tls_to.clone(),
            tcp_to: slot.tcp_to.clone(),
            proxy_protocol: slot.spec.proxy_protocol,
            gauge: l.gauge.clone(),
            fail_log: slot.fail_log.clone(),
        };
        l.pool = Some(pool::spawn(params, self.ctx.pools.clone()));
    }

    /// Points the mux at the lease's local UDP service for the granted slot (0: no UDP). A new
    /// `lease_id` on the same slot closes the slot's flows (the mux compares it).
    fn serve_udp(&mut self, i: usize, lease_id: LeaseId, slot: u32, client_addr: bool) {
        let proxy = match self.slots[i].spec.proxy_protocol {
            Some(_) => crate::udp::UdpProxy::V2 { client_addr },
            None => crate::udp::UdpProxy::Off,
        };
        let target = self.slots[i]
            .udp_to
            .as_deref()
            .and_then(|t| t.parse::<SocketAddr>().ok());
        let want = target.filter(|_| slot != 0).map(|t| (slot, t));
        let l = &mut self.live[i];
        if let Some(old) = l.udp_slot
            && want.map(|(s, _)| s) != Some(old)
        {
            self.udp.remove(old);
        }
        l.udp_slot = want.map(|(s, _)| s);
        if let Some((slot, target)) = want {
            self.udp.set(slot, lease_id, target, proxy);
        }
    }

    /// Stops serving the lease's UDP slot, if any (its flows close).
    fn stop_udp(&mut self, i: usize) {
        if let Some(old) = self.live[i].udp_slot.take() {
            self.udp.remove(old);
        }
    }

    fn on_register_error(&mut self, i: usize, e: &orp::LeaseError) {
        let pending = e.code == "pending_approval" || e.message == "pending_approval";
        let retry = self.half_ttl(i);
        self.stop_udp(i);
        let l = &mut self.live[i];
        let text = format!("{}: {}", e.code, e.message);
        if l.last_error.as_deref() != Some(text.as_str()) {
            tracing::warn!(relay = %self.addr, lease = %self.slots[i].name, error = %text, retry_ms = retry.as_millis(), "lease refused");
        }
        l.stop_pool();
        l.lease_id = None;
        l.state = if pending {
            LeaseState::Pending
        } else {
            LeaseState::Refused
        };
        l.last_error = Some(text);
        l.due = Some(Instant::now() + retry);
    }

    fn on_timers(&mut self, now: Instant) {
        for i in 0..self.services.len() {
            if self.services[i].due.is_some_and(|d| d <= now) {
                self.register_service(i);
            }
        }
        for i in 0..self.live.len() {
            let Some(due) = self.live[i].due else {
                continue;
            };
            if due > now {
                continue;
            }
            self.live[i].due = None;
            match (self.live[i].state, self.live[i].lease_id) {
                (LeaseState::Granted, Some(id)) => {
                    let rid = self.request_id(Request::Renew(i));
                    self.send(Frame::LeaseRenew(orp::LeaseRenew {
                        lease_id: id.0.to_vec(),
                        ttl_s: self.slots[i].spec.ttl_s,
                        request_id: rid,
                    }));
                }
                _ => self.register(i),
            }
        }
        self.publish();
    }

    /// Releases every granted lease and waits (bounded) for the answers.
    async fn release_all(&mut self, in_rx: &mut mpsc::Receiver<Result<Frame, String>>) {
        for l in &mut self.live {
            l.stop_pool();
        }
        let mut waiting = 0usize;
        for i in 0..self.live.len() {
            if let Some(id) = self.live[i].lease_id.take() {
                let rid = self.request_id(Request::Release);
                self.send(Frame::LeaseRelease(orp::LeaseRelease {
                    lease_id: id.0.to_vec(),
                    request_id: rid,
                }));
                waiting += 1;
            }
        }
        let deadline = Instant::now() + self.ctx.settings.connection.release_timeout;
        while waiting > 0 {
            match tokio::time::timeout_at(deadline.into(), in_rx.recv()).await {
                Ok(Some(Ok(Frame::LeaseGrant(_) | Frame::LeaseError(_)))) => waiting -= 1,
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        tracing::info!(relay = %self.addr, unanswered = waiting, "leases released");
    }

    fn publish(&self) {
        self.ctx.board.set(
            self.index,
            RelayStatus {
                addr: self.remote.clone(),
                name: self.addr.to_owned(),
                relay_id: self.relay_id.clone(),
                connected: true,
                transport: self.transport,
                tunnel_addr: self.tunnel_addr.map(|a| a.to_string()),
                leases: self
                    .slots
                    .iter()
                    .zip(&self.live)
                    .map(|(s, l)| LeaseStatus {
                        name: s.spec.name.clone(),
                        state: l.state,
                        hostname: l.hostname.clone(),
                        tcp_addr: l.tcp_addr.clone(),
                        udp_addr: l.udp_addr.clone(),
                        reverse_addr: l.reverse_addr.clone(),
                        last_error: l.last_error.clone(),
                        pool: Some(l.gauge.clone()),
                    })
                    .collect(),
                services: self
                    .ctx
                    .settings
                    .provides
                    .iter()
                    .zip(&self.services)
                    .map(|(p, s)| ServiceStatus {
                        service: p.service.clone(),
                        state: s.state,
                        service_id: s.service_id.clone(),
                        last_error: s.last_error.clone(),
                    })
                    .collect(),
            },
        );
    }
}

/// Decodes control-stream frames into `tx` until the stream ends or fails.
async fn read_frames(mut recv: quinn::RecvStream, tx: mpsc::Sender<Result<Frame, String>>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        match decode(&buf) {
            Ok(Decoded::Frame { frame, used }) => {
                let decoded = Frame::decode(&frame).map_err(|e| e.to_string());
                buf.drain(..used);
                let failed = decoded.is_err();
                if tx.send(decoded).await.is_err() || failed {
                    return;
                }
                continue;
            }
            Ok(Decoded::NeedMore { .. }) => {}
            Err(e) => {
                let _ = tx.send(Err(e.to_string())).await;
                return;
            }
        }
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Ok(None) => {
                let _ = tx
                    .send(Err("relay finished the control stream".into()))
                    .await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string())).await;
                return;
            }
        }
    }
}

/// Drains the queue into the control stream; finishes it when the queue closes.
async fn write_frames(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Frame>) {
    let mut bytes = Vec::new();
    while let Some(frame) = rx.recv().await {
        bytes.clear();
        if frame.encode(&mut bytes).is_err() || send.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_millis(1000));
            assert!(
                d >= Duration::from_millis(800) && d <= Duration::from_millis(1200),
                "{d:?}"
            );
        }
    }

    /// Review M9: the agent dials a grant's reverse address only on the relay's own host (then
    /// at the IP its QUIC connection verified) or when allow-listed.
    #[test]
    fn reverse_addresses_are_pinned_to_the_dialled_host_or_the_allow_list() {
        let quic: IpAddr = "192.0.2.7".parse().expect("ip");
        let none: Vec<String> = Vec::new();
        // Same name (any case): dialled at the QUIC connection's IP, never resolved again.
        assert_eq!(
            pin_reverse("Relay.Example.com:8443", "relay.example.com", quic, &none),
            Ok("192.0.2.7:8443".to_owned())
        );
        // The IP literal the QUIC connection went to.
        assert_eq!(
            pin_reverse("192.0.2.7:7443", "relay.example.com", quic, &none),
            Ok("192.0.2.7:7443".to_owned())
        );
        let v6: IpAddr = "2001:db8::7".parse().expect("ip");
        assert_eq!(
            pin_reverse("[2001:db8::7]:7443", "[2001:db8::7]", v6, &none),
            Ok("[2001:db8::7]:7443".to_owned())
        );
        // Another host, another IP, a name for the dialled IP: refused.
        for other in [
            "evil.example.net:7443",
            "192.0.2.8:7443",
            "10.0.0.1:22",
            "relay.example.com.evil.net:7443",
        ] {
            assert_eq!(
                pin_reverse(other, "relay.example.com", quic, &none),
                Err(PinRefusal::NotPinned),
                "{other}"
            );
        }
        assert_eq!(
            pin_reverse(
                "localhost:7443",
                "127.0.0.1",
                "127.0.0.1".parse().expect("ip"),
                &none
            ),
            Err(PinRefusal::NotPinned)
        );
        // The allow-list: exact host:port (host without case), dialled by name.
        let allow = vec!["relay2.example.com:8443".to_owned()];
        assert_eq!(
            pin_reverse("RELAY2.example.com:8443", "relay.example.com", quic, &allow),
            Ok("RELAY2.example.com:8443".to_owned())
        );
        assert_eq!(
            pin_reverse("relay2.example.com:22", "relay.example.com", quic, &allow),
            Err(PinRefusal::NotPinned)
        );
        // Listed on the dialled name: by name (a reverse listener on another IP).
        let own = vec!["relay.example.com:8443".to_owned()];
        assert_eq!(
            pin_reverse("relay.example.com:8443", "relay.example.com", quic, &own),
            Ok("relay.example.com:8443".to_owned())
        );
        for bad in [
            "relay.example.com",
            "relay.example.com:0",
            ":7443",
            "h:port",
        ] {
            assert_eq!(
                pin_reverse(bad, "relay.example.com", quic, &allow),
                Err(PinRefusal::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn host_of_keeps_names_and_ipv6_brackets() {
        assert_eq!(host_of("relay.example.com:7443"), "relay.example.com");
        assert_eq!(host_of("127.0.0.1:9"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7443"), "[::1]");
    }
}
