//! Relay-to-relay forwarding (`orp.md` "Open a stream", issue 22): the pool of outbound
//! mutual-TLS QUIC connections to peer relays, its bounds and counters, and the TLS client
//! side that checks a peer relay's certificate.
//!
//! A consumer on this relay whose provider the controller's registry places on another relay
//! is served by a FORWARD_STREAM (frame 0x140, payload `IncomingStream`) on ONE pooled
//! connection per peer relay (`quic::forward` opens and joins it). The pool is bounded:
//! at most [`ForwardConfig::max_peers`] peers, [`ForwardConfig::max_streams_per_peer`]
//! forwarded streams per peer, [`ForwardConfig::max_streams_per_peer_per_tenant`] of them one
//! tenant's (each way: the receiving relay checks it too) and [`ForwardConfig::max_streams`]
//! in all; each refusal is a named [`Refusal`] with a counter.
//!
//! All forwarded streams to one peer share its connection's flow-control window, and a
//! stream whose reader stalls holds its whole stream window of it. A relay connection's
//! receive window is therefore [`ForwardConfig::connection_receive_window_bytes`]: twice what
//! one tenant's streams to the peer can hold, so one tenant whose agents stop reading stalls
//! only its own streams. Per-peer metrics carry a `peer` label whose values are
//! the relay ids in the pool (at most `max_peers` at a time).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use outrelay_proto::frame::ORP_ALPN;
use outrelay_proto::identity::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Default bound of peer relays with a pooled connection.
pub const DEFAULT_MAX_PEERS: usize = 64;
/// Default bound of concurrent forwarded streams to one peer relay.
pub const DEFAULT_MAX_STREAMS_PER_PEER: usize = 1024;
/// Default bound of concurrent forwarded streams, all peers together.
pub const DEFAULT_MAX_STREAMS: usize = 8192;
/// The largest QUIC variable-length integer (flow-control limits are sent as one).
const VARINT_MAX: u64 = (1 << 62) - 1;
/// Default bound of one tenant's concurrent forwarded streams to (or from) one peer relay.
pub const DEFAULT_MAX_STREAMS_PER_PEER_PER_TENANT: usize = 64;
/// Default deadline of a connection to a peer relay (resolution, handshake).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3_000;
/// The TLS server name sent to peer relays (they serve one certificate whatever the name;
/// the peer is checked by its identity URI, not by a DNS name).
const PEER_SERVER_NAME: &str = "outrelay-relay";

/// `[forward]`: relay-to-relay forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// The QUIC address peer relays dial (`host:port`), sent in the heartbeat; empty: the
    /// bound QUIC address (`<root host>:<port>` when bound to a wildcard address).
    pub advertise: String,
    /// Peer relays with a pooled connection (at least 1).
    pub max_peers: usize,
    /// Concurrent forwarded streams per peer relay, each way (at least 1).
    pub max_streams_per_peer: usize,
    /// One tenant's concurrent forwarded streams per peer relay, each way (at least 1; above
    /// `max_streams_per_peer` that bound is the tenant's too).
    pub max_streams_per_peer_per_tenant: usize,
    /// Concurrent forwarded streams, all peers together (at least 1).
    pub max_streams: usize,
    /// Deadline of a connection to a peer relay, milliseconds (at least 100).
    pub connect_timeout_ms: u64,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            advertise: String::new(),
            max_peers: DEFAULT_MAX_PEERS,
            max_streams_per_peer: DEFAULT_MAX_STREAMS_PER_PEER,
            max_streams_per_peer_per_tenant: DEFAULT_MAX_STREAMS_PER_PEER_PER_TENANT,
            max_streams: DEFAULT_MAX_STREAMS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
        }
    }
}

impl ForwardConfig {
    /// Checks the limits.
    ///
    /// # Errors
    /// `(key, why)` of the first bad field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (key, v) in [
            ("forward.max_peers", self.max_peers),
            ("forward.max_streams_per_peer", self.max_streams_per_peer),
            (
                "forward.max_streams_per_peer_per_tenant",
                self.max_streams_per_peer_per_tenant,
            ),
            ("forward.max_streams", self.max_streams),
        ] {
            if v == 0 {
                return Err((key, "must be at least 1".to_owned()));
            }
        }
        if self.connect_timeout_ms < 100 {
            return Err((
                "forward.connect_timeout_ms",
                "must be at least 100 ms".to_owned(),
            ));
        }
        if !self.advertise.is_empty() && !valid_host_port(&self.advertise) {
            return Err((
                "forward.advertise",
                "must be host:port (ASCII, at most 255 bytes, port 1..=65535)".to_owned(),
            ));
        }
        Ok(())
    }

    /// The endpoint advertised in the heartbeat for a QUIC socket bound on `bound`.
    pub fn advertised(&self, bound: SocketAddr, root_host: &str) -> String {
        if !self.advertise.is_empty() {
            self.advertise.clone()
        } else if bound.ip().is_unspecified() {
            format!("{root_host}:{}", bound.port())
        } else {
            bound.to_string()
        }
    }

    /// The receive window of a relay connection, bytes (each relay sets it for the data it
    /// receives): twice what one tenant's streams to the peer can hold
    /// (`max_streams_per_peer_per_tenant` × `stream_window_bytes`), and never below an agent
    /// connection's `agent_window_bytes`. A stalled stream holds its whole stream window of the
    /// connection's; with this window one tenant whose agents stop reading leaves half of it
    /// to the others, where the agents' 8 MiB would let 8 stalled streams stop every tenant's.
    pub fn connection_receive_window_bytes(
        &self,
        stream_window_bytes: u64,
        agent_window_bytes: u64,
    ) -> u64 {
        let share = self
            .max_streams_per_peer_per_tenant
            .min(self.max_streams_per_peer);
        let per_tenant = u64::try_from(share).unwrap_or(u64::MAX);
        per_tenant
            .saturating_mul(stream_window_bytes)
            .saturating_mul(2)
            .max(agent_window_bytes)
            .min(VARINT_MAX)
    }
}

/// `host:port` with a non-empty host and a port 1..=65535 (the controller keeps 255 bytes).
fn valid_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    s.len() <= 255
        && s.is_ascii()
        && !host.is_empty()
        && !s
            .chars()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Why a forwarded stream was refused before it reached the peer (its drop reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The pool already holds `max_peers` peers, each with live streams.
    #[error("at most {0} peer relays")]
    PeersFull(usize),
    /// The peer already carries `max_streams_per_peer` forwarded streams.
    #[error("at most {0} forwarded streams per peer relay")]
    PeerStreamsFull(usize),
    /// The stream's tenant already has `max_streams_per_peer_per_tenant` forwarded streams
    /// to (or from) the peer.
    #[error("at most {0} forwarded streams per peer relay for one tenant")]
    TenantStreamsFull(usize),
    /// The relay already carries `max_streams` forwarded streams.
    #[error("at most {0} forwarded streams in all")]
    StreamsFull(usize),
    /// The registry gave no endpoint for the peer.
    #[error("the peer relay advertises no endpoint")]
    NoEndpoint,
    /// The peer could not be reached (resolution, handshake, timeout).
    #[error("the peer relay cannot be reached")]
    ConnectFailed,
    /// A peer relay's connection opened a stream that did not start with FORWARD_STREAM, or
    /// sent a FORWARD_STREAM that is not valid (inbound).
    #[error("protocol error on a relay connection")]
    ProtocolError,
    /// A relay connection arrived while this relay already serves `max_peers` inbound ones.
    #[error("too many inbound relay connections")]
    InboundFull,
}

impl Refusal {
    /// Every refusal (counter index order).
    pub const ALL: [Refusal; 8] = [
        Refusal::PeersFull(0),
        Refusal::PeerStreamsFull(0),
        Refusal::TenantStreamsFull(0),
        Refusal::StreamsFull(0),
        Refusal::NoEndpoint,
        Refusal::ConnectFailed,
        Refusal::ProtocolError,
        Refusal::InboundFull,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::PeersFull(_) => "peers_full",
            Refusal::PeerStreamsFull(_) => "peer_streams_full",
            Refusal::TenantStreamsFull(_) => "tenant_streams_full",
            Refusal::StreamsFull(_) => "streams_full",
            Refusal::NoEndpoint => "no_endpoint",
            Refusal::ConnectFailed => "connect_failed",
            Refusal::ProtocolError => "protocol_error",
            Refusal::InboundFull => "inbound_full",
        }
    }

    fn index(self) -> usize {
        match self {
            Refusal::PeersFull(_) => 0,
            Refusal::PeerStreamsFull(_) => 1,
            Refusal::StreamsFull(_) => 2,
            Refusal::NoEndpoint => 3,
            Refusal::ConnectFailed => 4,
            Refusal::ProtocolError => 5,
            Refusal::InboundFull => 6,
            Refusal::TenantStreamsFull(_) => 7,
        }
    }
}

/// What became of a STREAM_CHECKPOINT on a checkpoint lane (one unidirectional stream per
/// direction of a relay connection, carrying the checkpoints of the resumable forwarded
/// streams it shares with the peer relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointOutcome {
    /// Written to the lane toward the peer relay.
    Sent,
    /// From the peer relay, put on the local agent's control queue.
    Delivered,
    /// From the peer relay, for a stream this relay does not share with it: dropped.
    NoPair,
    /// From the peer relay, but the local agent's control queue was full (or its connection
    /// gone): dropped (checkpoints are cumulative: the next one says it all again).
    QueueFull,
}

impl CheckpointOutcome {
    /// Every outcome (counter index order).
    pub const ALL: [CheckpointOutcome; 4] = [
        CheckpointOutcome::Sent,
        CheckpointOutcome::Delivered,
        CheckpointOutcome::NoPair,
        CheckpointOutcome::QueueFull,
    ];

    /// The `result` label.
    pub fn label(self) -> &'static str {
        match self {
            CheckpointOutcome::Sent => "sent",
            CheckpointOutcome::Delivered => "delivered",
            CheckpointOutcome::NoPair => "no_pair",
            CheckpointOutcome::QueueFull => "queue_full",
        }
    }
}

/// Counters of forwarding (also exported as Prometheus metrics).
#[derive(Debug, Default)]
pub struct ForwardStats {
    refused: [AtomicU64; Refusal::ALL.len()],
    checkpoints: [AtomicU64; CheckpointOutcome::ALL.len()],
    /// Connections to peer relays established.
    pub connects: AtomicU64,
    /// Forwarded streams this relay opened to peers (accepted by them).
    pub streams_out: AtomicU64,
    /// Forwarded streams peers opened here (accepted).
    pub streams_in: AtomicU64,
}

impl ForwardStats {
    /// Counts one refusal, labelled by `peer` (a relay id in the pool, or `""`).
    pub fn refuse(&self, r: Refusal, peer: &str) {
        if let Some(c) = self.refused.get(r.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!(
            "outrelay_relay_forward_refused_total",
            "reason" => r.label(),
            "peer" => peer.to_owned()
        )
        .increment(1);
    }

    /// Counts one checkpoint on a lane of `peer` (a relay id) as `o`.
    pub fn checkpoint(&self, o: CheckpointOutcome, peer: &str) {
        if let Some(c) = self.checkpoints.get(o as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!(
            "outrelay_relay_forward_checkpoints_total",
            "result" => o.label(),
            "peer" => peer.to_owned()
        )
        .increment(1);
    }

    /// Checkpoints counted as `o`.
    pub fn checkpoints(&self, o: CheckpointOutcome) -> u64 {
        self.checkpoints
            .get(o as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Refusals counted for `r`.
    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused
            .get(r.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// One peer relay in the pool.
#[derive(Debug)]
struct PeerEntry {
    /// Its pooled connection; the async lock is held while one connect is under way, so
    /// concurrent first streams share it (never held on the byte path).
    conn: Arc<tokio::sync::Mutex<Option<quinn::Connection>>>,
    /// Forwarded streams to it now.
    streams: Arc<AtomicUsize>,
}

/// A forwarded stream's slot in the per-peer, per-tenant and global bounds; given back on
/// drop.
#[derive(Debug)]
pub struct StreamSlot {
    peer: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
    peer_id: String,
    _tenant: TenantSlot,
}

/// Which way a forwarded stream goes, for the per-tenant bound (each way has its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Way {
    /// Opened by this relay toward the peer.
    Out,
    /// Opened by the peer toward this relay.
    In,
}

/// Live forwarded streams per (peer relay id, tenant, way); an entry leaves at 0, so the
/// table holds at most one entry per live forwarded stream. Touched at stream open and end.
type TenantCounts = Arc<Mutex<HashMap<(String, String, Way), usize>>>;

/// A forwarded stream's place in its tenant's per-peer bound; given back on drop.
#[derive(Debug)]
pub struct TenantSlot {
    counts: TenantCounts,
    key: (String, String, Way),
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let left = self.peer.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        self.total.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("outrelay_relay_forward_streams_active", "peer" => self.peer_id.clone())
            .set(left as f64);
    }
}

/// The pool of connections to peer relays.
pub struct Peers {
    config: ForwardConfig,
    /// This relay's id (for audits and logs).
    relay_id: String,
    /// Where connections are dialled from (the relay's own endpoint); taken by
    /// [`Peers::shutdown`] so a stopping (or handed-over) process stops reading the socket.
    endpoint: Mutex<Option<quinn::Endpoint>>,
    cert: Arc<dyn rustls::client::ResolvesClientCert>,
    roots: Arc<RootCertStore>,
    transport: Arc<quinn::TransportConfig>,
    peers: Mutex<HashMap<String, PeerEntry>>,
    total: Arc<AtomicUsize>,
    tenants: TenantCounts,
    /// Inbound relay connections being served.
    inbound: AtomicUsize,
    /// The counters.
    pub stats: ForwardStats,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("relay_id", &self.relay_id)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why a peer relay's certificate or connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The TLS client configuration could not be built.
    #[error("tls: {0}")]
    Tls(String),
    /// The peer's endpoint did not resolve, or the connection failed.
    #[error("{0}")]
    Connect(String),
}

impl Peers {
    /// A pool dialling from `endpoint` (the relay's own QUIC endpoint; `None`: every connect
    /// fails, for unit tests) with `cert` as the client certificate, trusting `ca_roots`.
    ///
    /// # Errors
    /// [`ForwardError::Tls`] when a CA root is refused.
    pub fn new(
        config: ForwardConfig,
        relay_id: String,
        endpoint: Option<quinn::Endpoint>,
        cert: Arc<dyn rustls::client::ResolvesClientCert>,
        ca_roots: &[CertificateDer<'static>],
        transport: quinn::TransportConfig,
    ) -> Result<Arc<Peers>, ForwardError> {
        let mut roots = RootCertStore::empty();
        for ca in ca_roots {
            roots
                .add(ca.clone())
                .map_err(|e| ForwardError::Tls(format!("CA root: {e}")))?;
        }
        Ok(Arc::new(Peers {
            config,
            relay_id,
            endpoint: Mutex::new(endpoint),
            cert,
            roots: Arc::new(roots),
            transport: Arc::new(transport),
            peers: Mutex::new(HashMap::new()),
            total: Arc::new(AtomicUsize::new(0)),
            tenants: TenantCounts::default(),
            inbound: AtomicUsize::new(0),
            stats: ForwardStats::default(),
        }))
    }

    /// The settings.
    pub fn config(&self) -> &ForwardConfig {
        &self.config
    }

    /// This relay's id.
    pub fn relay_id(&self) -> &str {
        &self.relay_id
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<String, PeerEntry>> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Peer relays in the pool now.
    pub fn peer_count(&self) -> usize {
        self.peers().len()
    }

    /// Forwarded streams (outbound) now.
    pub fn streams(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Takes a slot for a stream of `tenant` toward `peer` (adding the peer to the pool when
    /// there is room: a full pool evicts a peer without streams first). Counted on refusal.
    ///
    /// # Errors
    /// [`Refusal::PeersFull`], [`Refusal::PeerStreamsFull`], [`Refusal::TenantStreamsFull`]
    /// or [`Refusal::StreamsFull`].
    pub fn stream_slot(&self, peer: &str, tenant: &str) -> Result<StreamSlot, Refusal> {
        let refused = |r: Refusal| {
            self.stats.refuse(r, peer);
            Err(r)
        };
        let mut peers = self.peers();
        if !peers.contains_key(peer) && peers.len() >= self.config.max_peers {
            let idle = peers
                .iter()
                .find(|(_, e)| e.streams.load(Ordering::Acquire) == 0)
                .map(|(id, _)| id.clone());
            match idle {
                Some(id) => {
                    if let Some(e) = peers.remove(&id)
                        && let Ok(conn) = e.conn.try_lock()
                        && let Some(c) = conn.as_ref()
                    {
                        c.close(0u32.into(), b"peer pool full");
                    }
                    metrics::gauge!("outrelay_relay_forward_streams_active", "peer" => id).set(0.0);
                }
                None => {
                    // Labelled with no peer: only relays in the pool name a label value, so
                    // the series stay bounded by `max_peers`.
                    let r = Refusal::PeersFull(self.config.max_peers);
                    self.stats.refuse(r, "");
                    return Err(r);
                }
            }
        }
        let entry = peers.entry(peer.to_owned()).or_insert_with(|| PeerEntry {
            conn: Arc::new(tokio::sync::Mutex::new(None)),
            streams: Arc::new(AtomicUsize::new(0)),
        });
        let streams = entry.streams.clone();
        metrics::gauge!("outrelay_relay_forward_peers").set(peers.len() as f64);
        drop(peers);
        if streams.load(Ordering::Acquire) >= self.config.max_streams_per_peer {
            return refused(Refusal::PeerStreamsFull(self.config.max_streams_per_peer));
        }
        let tenant_slot = self.tenant_slot(peer, tenant, Way::Out)?;
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.config.max_streams {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return refused(Refusal::StreamsFull(self.config.max_streams));
        }
        let now = streams.fetch_add(1, Ordering::AcqRel) + 1;
        if now > self.config.max_streams_per_peer {
            // Lost a race with another open: give both back.
            streams.fetch_sub(1, Ordering::AcqRel);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return refused(Refusal::PeerStreamsFull(self.config.max_streams_per_peer));
        }
        metrics::gauge!("outrelay_relay_forward_streams_active", "peer" => peer.to_owned())
            .set(now as f64);
        Ok(StreamSlot {
            peer: streams,
            total: self.total.clone(),
            peer_id: peer.to_owned(),
            _tenant: tenant_slot,
        })
    }

    /// Takes a place for a stream of `tenant` that `peer` forwards here (the peer bounds its
    /// own side too; this keeps a peer that does not from letting one tenant take every
    /// stream credit of the connection). Counted on refusal.
    ///
    /// # Errors
    /// [`Refusal::TenantStreamsFull`].
    pub fn inbound_stream(&self, peer: &str, tenant: &str) -> Result<TenantSlot, Refusal> {
        self.tenant_slot(peer, tenant, Way::In)
    }

    /// One place in `tenant`'s bound of streams with `peer` going `way`.
    fn tenant_slot(&self, peer: &str, tenant: &str, way: Way) -> Result<TenantSlot, Refusal> {
        let cap = self.config.max_streams_per_peer_per_tenant;
        let key = (peer.to_owned(), tenant.to_owned(), way);
        let mut counts = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= cap {
            drop(counts);
            let r = Refusal::TenantStreamsFull(cap);
            self.stats.refuse(r, peer);
            return Err(r);
        }
        *n += 1;
        Ok(TenantSlot {
            counts: self.tenants.clone(),
            key,
        })
    }

    /// The pooled connection to `peer` at `endpoint` (`host:port`), connecting when there is
    /// none (or it ended). Call with a [`StreamSlot`] for `peer` held (the entry exists).
    ///
    /// # Errors
    /// A reason when the endpoint does not resolve or the connection fails in time
    /// (counted as [`Refusal::ConnectFailed`] or [`Refusal::NoEndpoint`]).
    pub async fn connection(
        &self,
        peer: &str,
        endpoint: &str,
    ) -> Result<quinn::Connection, String> {
        let Some(cell) = self.peers().get(peer).map(|e| e.conn.clone()) else {
            return Err("not in the peer pool".to_owned());
        };
        if endpoint.is_empty() {
            self.stats.refuse(Refusal::NoEndpoint, peer);
            return Err("the registry gives no endpoint for it".to_owned());
        }
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let connected = tokio::time::timeout(timeout, async {
            let mut slot = cell.lock().await;
            if let Some(c) = slot.as_ref()
                && c.close_reason().is_none()
            {
                return Ok(c.clone());
            }
            let conn = self.connect(peer, endpoint).await?;
            *slot = Some(conn.clone());
            Ok(conn)
        })
        .await
        .unwrap_or_else(|_| Err(format!("no connection within {} ms", timeout.as_millis())));
        match connected {
            Ok(c) => Ok(c),
            Err(e) => {
                self.stats.refuse(Refusal::ConnectFailed, peer);
                Err(e)
            }
        }
    }

    async fn connect(&self, peer: &str, endpoint: &str) -> Result<quinn::Connection, String> {
        let Some(ep) = self
            .endpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Err("no QUIC endpoint (stopping)".to_owned());
        };
        let addr = tokio::net::lookup_host(endpoint)
            .await
            .map_err(|e| format!("{endpoint}: {e}"))?
            .next()
            .ok_or_else(|| format!("{endpoint}: no address"))?;
        let client = self.client_config(peer).map_err(|e| e.to_string())?;
        let conn = ep
            .connect_with(client, addr, PEER_SERVER_NAME)
            .map_err(|e| format!("{endpoint}: {e}"))?
            .await
            .map_err(|e| format!("{endpoint}: {e}"))?;
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("outrelay_relay_forward_connects_total", "peer" => peer.to_owned())
            .increment(1);
        tracing::info!(peer, %addr, "connected to peer relay");
        Ok(conn)
    }

    /// The QUIC client configuration for `peer`: this relay's certificate as the client's,
    /// the peer's checked by [`PeerCertVerifier`].
    fn client_config(&self, peer: &str) -> Result<quinn::ClientConfig, ForwardError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = Arc::new(PeerCertVerifier {
            roots: self.roots.clone(),
            expected_id: peer.to_owned(),
            provider: provider.clone(),
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ForwardError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.cert.clone());
        tls.alpn_protocols = vec![ORP_ALPN.as_bytes().to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ForwardError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(self.transport.clone());
        Ok(client)
    }

    /// The relay is stopping (or handing its socket over): drops this pool's endpoint handle
    /// and closes every pooled connection, so nothing here keeps the QUIC socket read. New
    /// forwarded streams fail with [`Refusal::ConnectFailed`] from now on.
    pub fn shutdown(&self) {
        self.endpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for e in self.peers().values() {
            if let Ok(conn) = e.conn.try_lock()
                && let Some(c) = conn.as_ref()
            {
                c.close(0u32.into(), b"relay stopping");
            }
        }
    }

    /// Takes an inbound relay connection's place (at most `max_peers` at once).
    pub fn inbound(self: &Arc<Self>) -> Result<InboundSlot, Refusal> {
        if self.inbound.fetch_add(1, Ordering::AcqRel) >= self.config.max_peers {
            self.inbound.fetch_sub(1, Ordering::AcqRel);
            self.stats.refuse(Refusal::InboundFull, "");
            return Err(Refusal::InboundFull);
        }
        Ok(InboundSlot {
            peers: self.clone(),
        })
    }
}

/// An inbound relay connection's place; given back on drop.
#[derive(Debug)]
pub struct InboundSlot {
    peers: Arc<Peers>,
}

impl Drop for InboundSlot {
    fn drop(&mut self) {
        self.peers.inbound.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A peer relay's server certificate: the chain to the controller CA (with the serverAuth
/// EKU), exactly one identity URI with role `relay`, and the relay id the registry named.
/// No DNS name is checked: relays are named by identity.
#[derive(Debug)]
struct PeerCertVerifier {
    roots: Arc<RootCertStore>,
    expected_id: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PeerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_peer_identity(end_entity, &self.expected_id).map_err(rustls::Error::General)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate names exactly one relay identity with id `expected_id`.
fn check_peer_identity(cert: &CertificateDer<'_>, expected_id: &str) -> Result<(), String> {
    let (identity, _) = crate::quic::cert_identity(cert).map_err(|e| e.to_string())?;
    match identity {
        Identity::Relay { id, .. } if id.as_str() == expected_id => Ok(()),
        Identity::Relay { id, .. } => Err(format!(
            "peer certificate is relay {id}, the registry named {expected_id}"
        )),
        other => Err(format!(
            "peer certificate role is {}, not relay",
            other.role().as_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_peers: usize, per_peer: usize, total: usize) -> Arc<Peers> {
        pool_with(ForwardConfig {
            max_peers,
            max_streams_per_peer: per_peer,
            max_streams_per_peer_per_tenant: per_peer,
            max_streams: total,
            ..ForwardConfig::default()
        })
    }

    /// A pool with `config` that dials nowhere.
    fn pool_with(config: ForwardConfig) -> Arc<Peers> {
        let cert = outrelay_client::Reloadable::from_certified(test_key());
        Peers::new(
            config,
            "relay-1".to_owned(),
            None,
            cert,
            &[],
            quinn::TransportConfig::default(),
        )
        .expect("pool")
    }

    fn test_key() -> rustls::sign::CertifiedKey {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["x".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        crate::quic::certified_key(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("der"),
        )
        .expect("certified key")
    }

    #[test]
    fn per_peer_stream_cap_refuses_the_excess_and_counts_it_while_other_peers_are_served() {
        let p = pool(4, 2, 100);
        let a1 = p.stream_slot("relay-2", "demo").expect("first");
        let _a2 = p.stream_slot("relay-2", "demo").expect("second");
        assert_eq!(
            p.stream_slot("relay-2", "demo").expect_err("refused"),
            Refusal::PeerStreamsFull(2)
        );
        assert_eq!(p.stats.refused(Refusal::PeerStreamsFull(0)), 1);
        let _b = p
            .stream_slot("relay-3", "demo")
            .expect("another peer is served");
        drop(a1);
        let _a3 = p.stream_slot("relay-2", "demo").expect("a slot came back");
        assert_eq!(p.streams(), 3);
    }

    #[test]
    fn one_tenant_fills_only_its_share_of_a_peer_each_way_and_another_tenant_is_served() {
        let p = pool_with(ForwardConfig {
            max_streams_per_peer: 10,
            max_streams_per_peer_per_tenant: 2,
            ..ForwardConfig::default()
        });
        let x1 = p.stream_slot("relay-2", "x").expect("x 1");
        let _x2 = p.stream_slot("relay-2", "x").expect("x 2");
        assert_eq!(
            p.stream_slot("relay-2", "x")
                .expect_err("x is at its share"),
            Refusal::TenantStreamsFull(2)
        );
        let _y = p
            .stream_slot("relay-2", "y")
            .expect("another tenant is served");
        let _x_elsewhere = p
            .stream_slot("relay-3", "x")
            .expect("x toward another peer");
        // Inbound streams from the peer have their own share.
        let i1 = p.inbound_stream("relay-2", "x").expect("in 1");
        let _i2 = p.inbound_stream("relay-2", "x").expect("in 2");
        assert_eq!(
            p.inbound_stream("relay-2", "x")
                .expect_err("x is at its inbound share"),
            Refusal::TenantStreamsFull(2)
        );
        assert!(p.inbound_stream("relay-2", "y").is_ok());
        assert_eq!(p.stats.refused(Refusal::TenantStreamsFull(0)), 2);
        drop((x1, i1));
        let _x3 = p.stream_slot("relay-2", "x").expect("a slot came back");
        assert!(
            p.inbound_stream("relay-2", "x").is_ok(),
            "a place came back"
        );
        assert_eq!(p.streams(), 4);
    }

    #[test]
    fn global_cap_holds_over_all_peers() {
        let p = pool(8, 10, 3);
        let slots: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|peer| p.stream_slot(peer, "demo").expect("room"))
            .collect();
        assert_eq!(
            p.stream_slot("d", "demo").expect_err("refused"),
            Refusal::StreamsFull(3)
        );
        assert_eq!(p.stats.refused(Refusal::StreamsFull(0)), 1);
        drop(slots);
        assert_eq!(p.streams(), 0);
        assert!(p.stream_slot("d", "demo").is_ok());
    }

    #[test]
    fn a_full_pool_evicts_an_idle_peer_and_refuses_when_every_peer_is_busy() {
        let p = pool(2, 10, 100);
        let busy = p.stream_slot("relay-2", "demo").expect("2");
        let idle = p.stream_slot("relay-3", "demo").expect("3");
        drop(idle);
        let _four = p
            .stream_slot("relay-4", "demo")
            .expect("relay-3 is idle: evicted");
        assert_eq!(p.peer_count(), 2);
        assert_eq!(
            p.stream_slot("relay-5", "demo").expect_err("refused"),
            Refusal::PeersFull(2)
        );
        assert_eq!(p.stats.refused(Refusal::PeersFull(0)), 1);
        drop(busy);
        assert!(
            p.stream_slot("relay-5", "demo").is_ok(),
            "relay-2 is idle now"
        );
        assert_eq!(p.peer_count(), 2);
    }

    #[test]
    fn inbound_relay_connections_are_bounded_by_max_peers() {
        let p = pool(2, 10, 100);
        let a = p.inbound().expect("1");
        let _b = p.inbound().expect("2");
        assert_eq!(p.inbound().expect_err("refused"), Refusal::InboundFull);
        drop(a);
        assert!(p.inbound().is_ok());
    }

    #[tokio::test]
    async fn a_peer_without_endpoint_or_unreachable_is_refused_and_counted() {
        let p = pool(2, 10, 100);
        let _slot = p.stream_slot("relay-2", "demo").expect("slot");
        assert!(p.connection("relay-2", "").await.is_err());
        assert_eq!(p.stats.refused(Refusal::NoEndpoint), 1);
        assert!(p.connection("relay-2", "127.0.0.1:1").await.is_err());
        assert_eq!(p.stats.refused(Refusal::ConnectFailed), 1);
    }

    #[test]
    fn config_validation_names_the_key() {
        let ok = ForwardConfig::default();
        assert!(ok.validate().is_ok());
        for (bad, key) in [
            (
                ForwardConfig {
                    max_peers: 0,
                    ..ok.clone()
                },
                "forward.max_peers",
            ),
            (
                ForwardConfig {
                    max_streams_per_peer: 0,
                    ..ok.clone()
                },
                "forward.max_streams_per_peer",
            ),
            (
                ForwardConfig {
                    max_streams_per_peer_per_tenant: 0,
                    ..ok.clone()
                },
                "forward.max_streams_per_peer_per_tenant",
            ),
            (
                ForwardConfig {
                    connect_timeout_ms: 5,
                    ..ok.clone()
                },
                "forward.connect_timeout_ms",
            ),
            (
                ForwardConfig {
                    advertise: "no-port".to_owned(),
                    ..ok.clone()
                },
                "forward.advertise",
            ),
        ] {
            assert_eq!(bad.validate().expect_err("refused").0, key);
        }
        let bound: SocketAddr = "0.0.0.0:7443".parse().expect("addr");
        assert_eq!(ok.advertised(bound, "relay.example"), "relay.example:7443");
        let bound: SocketAddr = "10.0.0.5:7443".parse().expect("addr");
        assert_eq!(ok.advertised(bound, "relay.example"), "10.0.0.5:7443");
    }
}
