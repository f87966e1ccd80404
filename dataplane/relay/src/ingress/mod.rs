//! Public ingress: the SNI listener, TCP lease ports and the reverse-session listener, joined by
//! the splice engine.
//!
//! ```text
//! public client ──TLS :443──► peek ClientHello (deadline, cap) ─┐
//! public client ──TCP port──► route by port ────────────────────┤ claim the oldest live idle
//!                                                               │ session of the lease, write
//! agent ──TCP 7443──► preamble, nonce, MAC ──► ready queue ─────┘ the marker (0x02 + replayed
//!                                                                 hello, or 0x01), then splice
//! ```
//!
//! The per-connection set-up (accept, ClientHello peek, handshake, claim, marker) runs on a
//! tokio runtime; the bulk phase runs on [`outrelay_io`] splice engines, one thread each, to
//! which the two sockets are handed. Routes and reverse-session keys come from the published
//! [`Snapshot`](crate::state::Snapshot), loaded per connection.

pub mod limits;
pub mod pool;
pub mod root;
pub mod stats;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outrelay_io::{AddError, EngineHandle};
use outrelay_proto::client_hello::{ClientHelloParser, HelloError, Progress};
use outrelay_proto::reverse::{self, LeaseId, MAC_BYTES, Marker, NONCE_BYTES, PREAMBLE_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::state::Shared;
use limits::{LeaseConns, PendingConns};
use pool::{IdleSession, SessionPool};
use stats::{Drop, IngressStats};

/// Ingress limits, all from `public-ingress.md` (durations are config values so tests can
/// shorten them).
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// Total time from accept for the ClientHello.
    pub hello_deadline_ms: u64,
    /// Most raw ClientHello bytes read (records included).
    pub max_hello_bytes: usize,
    /// Time from accept for the whole reverse handshake.
    pub reverse_handshake_deadline_ms: u64,
    /// How long a public connection waits for an idle reverse session.
    pub claim_timeout_ms: u64,
    /// Idle reverse sessions kept per lease.
    pub ready_queue_max: usize,
    /// Public connections waiting for a session, per lease.
    pub claim_waiters_max: usize,
    /// Keep-alive interval on idle sessions.
    pub keepalive_interval_ms: u64,
    /// How often TCP lease listeners are brought in line with the routes.
    pub lease_sync_interval_ms: u64,
    /// Address TCP lease ports bind on.
    pub lease_bind_ip: IpAddr,
    /// Writing the marker and the replayed bytes to a claimed session.
    pub marker_write_deadline_ms: u64,
    /// Concurrent public connections per lease (claim wait to pair close); more are refused
    /// (`lease_conn_limit`).
    pub lease_conn_max: usize,
    /// Public connections in set-up (before their pair is spliced) across the relay; more are
    /// refused at accept (`pending_full`).
    pub pending_conn_max: usize,
    /// The root host (`public_url`'s host); its exact SNI goes to `root_fallback`.
    pub root_host: String,
    /// The root-host HTTPS listener on loopback ([`root`]); `None`: the root host is refused
    /// (`root_unavailable`).
    pub root_fallback: Option<SocketAddr>,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            hello_deadline_ms: 5_000,
            max_hello_bytes: outrelay_proto::client_hello::DEFAULT_MAX_HELLO_BYTES,
            reverse_handshake_deadline_ms: 5_000,
            claim_timeout_ms: 10_000,
            ready_queue_max: 8,
            claim_waiters_max: 1024,
            keepalive_interval_ms: 15_000,
            lease_sync_interval_ms: 100,
            lease_bind_ip: IpAddr::from([0, 0, 0, 0]),
            marker_write_deadline_ms: 5_000,
            lease_conn_max: DEFAULT_LEASE_CONN_MAX,
            pending_conn_max: DEFAULT_PENDING_CONN_MAX,
            root_host: String::new(),
            root_fallback: None,
        }
    }
}

/// Default cap on concurrent public connections per lease (the spec names the key, not a
/// value: high enough for a busy site behind one agent, low enough that one lease cannot take
/// every file descriptor of the relay).
pub const DEFAULT_LEASE_CONN_MAX: usize = 4096;
/// Default cap on public connections in set-up across the relay (below the 20,000 open files a
/// relay gets, so a slowloris flood leaves descriptors for spliced pairs and agents).
pub const DEFAULT_PENDING_CONN_MAX: usize = 10_000;

/// The ingress side of a relay.
pub struct Ingress {
    config: IngressConfig,
    shared: Arc<Shared>,
    pool: SessionPool,
    engines: Vec<EngineHandle>,
    next_engine: AtomicUsize,
    conns: Arc<LeaseConns>,
    pending: PendingConns,
    /// Set once by [`Ingress::stop_accepting`]; every accept loop ends on it.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Counters by reason.
    pub stats: IngressStats,
}

impl Ingress {
    /// An ingress reading routes from `shared` and splicing on `engines` (at least one).
    /// Per-lease connection counts are only given back if the engines' finished pairs reach
    /// [`Ingress::lease_conns`]; use [`Ingress::with_conns`] to share them with the engines'
    /// drivers from the start.
    pub fn new(
        config: IngressConfig,
        shared: Arc<Shared>,
        engines: Vec<EngineHandle>,
    ) -> Arc<Ingress> {
        Ingress::with_conns(config, shared, engines, Arc::default())
    }

    /// [`Ingress::new`] with the per-lease connection counts `conns`, which the threads driving
    /// the splice engines feed with [`LeaseConns::finished`].
    pub fn with_conns(
        config: IngressConfig,
        shared: Arc<Shared>,
        engines: Vec<EngineHandle>,
        conns: Arc<LeaseConns>,
    ) -> Arc<Ingress> {
        Arc::new(Ingress {
            pool: SessionPool::new(config.ready_queue_max, config.claim_waiters_max),
            config,
            shared,
            engines,
            next_engine: AtomicUsize::new(0),
            conns,
            pending: PendingConns::default(),
            stopping: tokio::sync::watch::Sender::new(false),
            stats: IngressStats::default(),
        })
    }

    /// The per-lease connection counts (give finished pairs back through it).
    pub fn lease_conns(&self) -> &Arc<LeaseConns> {
        &self.conns
    }

    /// Public connections in set-up now.
    pub fn pending_conns(&self) -> usize {
        self.pending.count()
    }

    /// Closes every listener (public TLS, reverse sessions, TCP lease ports) and binds no new
    /// one; connections already accepted go on (SIGTERM's first step).
    pub fn stop_accepting(&self) {
        self.stopping.send_replace(true);
    }

    /// Public connections not finished yet: in set-up, or admitted to a lease (spliced, or
    /// handed to an engine). Zero once a drain is complete.
    pub fn in_flight(&self) -> usize {
        self.pending.count() + self.conns.total()
    }

    /// The next accepted stream, or `None` once [`Ingress::stop_accepting`] was called. `stop`
    /// is the listener's subscription to `stopping`, taken once per listener (not per accept).
    async fn accept(
        listener: &TcpListener,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<TcpStream> {
        loop {
            if *stop.borrow_and_update() {
                return None;
            }
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _)) => return Some(stream),
                    Err(_) => accept_backoff().await,
                },
                _ = stop.changed() => {}
            }
        }
    }

    /// Idle sessions of a lease.
    pub fn idle_sessions(&self, lease: &LeaseId) -> usize {
        self.pool.idle_count(lease)
    }

    /// Accepts reverse sessions forever.
    pub fn serve_reverse(self: &Arc<Self>, listener: TcpListener) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut stop = me.stopping.subscribe();
            loop {
                let Some(stream) = Ingress::accept(&listener, &mut stop).await else {
                    return;
                };
                let me = me.clone();
                tokio::spawn(async move { me.reverse_session(stream).await });
            }
        })
    }

    /// Accepts public TLS connections forever.
    pub fn serve_sni(self: &Arc<Self>, listener: TcpListener) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut stop = me.stopping.subscribe();
            loop {
                let Some(stream) = Ingress::accept(&listener, &mut stop).await else {
                    return;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let Some(_pending) = me.pending.acquire(me.config.pending_conn_max) else {
                        return me.stats.drop(Drop::PendingFull);
                    };
                    me.sni_connection(stream).await;
                });
            }
        })
    }

    /// Keeps one listener per TCP lease port of the published routes, and the idle sessions'
    /// keep-alives, until the task is aborted.
    pub fn serve_maintenance(self: &Arc<Self>) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut listeners: HashMap<u16, JoinHandle<()>> = HashMap::new();
            let mut unbindable: HashSet<u16> = HashSet::new();
            let mut last_keepalive = Instant::now();
            let tick = Duration::from_millis(me.config.lease_sync_interval_ms.max(10));
            loop {
                me.sync_tcp_listeners(&mut listeners, &mut unbindable);
                let now = Instant::now();
                let interval = Duration::from_millis(me.config.keepalive_interval_ms);
                if now.saturating_duration_since(last_keepalive) >= tick {
                    let snapshot = me.shared.load();
                    me.pool.keepalive(
                        now,
                        interval,
                        |lease| snapshot.reverse_keys.contains_key(lease),
                        &me.stats,
                    );
                    last_keepalive = now;
                }
                tokio::time::sleep(tick).await;
            }
        })
    }

    /// Binds a listener for every routed TCP port and stops those whose route is gone. A port
    /// that cannot be bound is retried every round but logged once (`unbindable`).
    fn sync_tcp_listeners(
        self: &Arc<Self>,
        listeners: &mut HashMap<u16, JoinHandle<()>>,
        unbindable: &mut HashSet<u16>,
    ) {
        let snapshot = self.shared.load();
        unbindable.retain(|port| snapshot.routes.lookup_tcp(*port).is_some());
        listeners.retain(|port, task| {
            let keep = snapshot.routes.lookup_tcp(*port).is_some();
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, _) in snapshot.routes.tcp_ports() {
            if listeners.contains_key(&port) || *self.stopping.borrow() {
                continue;
            }
            let addr = SocketAddr::new(self.config.lease_bind_ip, port);
            let std = match std::net::TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    if unbindable.insert(port) {
                        tracing::warn!(%addr, error = %e, "cannot bind TCP lease port; retrying");
                    }
                    continue;
                }
            };
            let Ok(listener) = std
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(std))
            else {
                continue;
            };
            let me = self.clone();
            listeners.insert(
                port,
                tokio::spawn(async move {
                    let mut stop = me.stopping.subscribe();
                    loop {
                        let Some(stream) = Ingress::accept(&listener, &mut stop).await else {
                            return;
                        };
                        let me = me.clone();
                        tokio::spawn(async move {
                            let max = me.config.pending_conn_max;
                            let Some(_pending) = me.pending.acquire(max) else {
                                return me.stats.drop(Drop::PendingFull);
                            };
                            me.tcp_lease_connection(stream, port).await;
                        });
                    }
                }),
            );
        }
    }

    async fn reverse_session(&self, stream: TcpStream) {
        let deadline = Duration::from_millis(self.config.reverse_handshake_deadline_ms);
        let mut stream = stream;
        let outcome = tokio::time::timeout(deadline, self.reverse_handshake(&mut stream)).await;
        let lease = match outcome {
            Ok(Ok(lease)) => lease,
            Ok(Err(reason)) => return self.stats.drop(reason),
            Err(_) => return self.stats.drop(Drop::HandshakeTimeout),
        };
        let Ok(std) = stream.into_std() else { return };
        let _ = std.set_nodelay(true);
        self.stats
            .sessions_authenticated
            .fetch_add(1, Ordering::Relaxed);
        self.pool.offer(
            lease,
            IdleSession {
                stream: std,
                last_write: Instant::now(),
            },
            &self.stats,
        );
    }

    /// Preamble, nonce, MAC; returns the authenticated lease.
    async fn reverse_handshake(&self, stream: &mut TcpStream) -> Result<LeaseId, Drop> {
        let mut preamble = [0u8; PREAMBLE_BYTES];
        let mut have = 0;
        let lease = loop {
            let n = stream
                .read(&mut preamble[have..])
                .await
                .map_err(|_| Drop::BadPreamble)?;
            if n == 0 {
                return Err(Drop::BadPreamble);
            }
            have += n;
            match reverse::decode_preamble(&preamble[..have]) {
                Err(_) => return Err(Drop::BadPreamble),
                Ok(Some(lease)) => break lease,
                Ok(None) => {}
            }
        };
        let key = *self
            .shared
            .load()
            .reverse_keys
            .get(&lease)
            .ok_or(Drop::UnknownLease)?;
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).map_err(|_| Drop::BadPreamble)?;
        stream
            .write_all(&nonce)
            .await
            .map_err(|_| Drop::BadPreamble)?;
        let mut mac = [0u8; MAC_BYTES];
        stream
            .read_exact(&mut mac)
            .await
            .map_err(|_| Drop::BadMac)?;
        reverse::verify_mac(&key, &nonce, &lease, &mac).map_err(|_| Drop::BadMac)?;
        Ok(lease)
    }

    async fn sni_connection(&self, stream: TcpStream) {
        let mut stream = stream;
        let mut replay = Vec::with_capacity(1024);
        let deadline = Duration::from_millis(self.config.hello_deadline_ms);
        let peeked =
            tokio::time::timeout(deadline, self.peek_hello(&mut stream, &mut replay)).await;
        let server_name = match peeked {
            Err(_) => return self.stats.drop(Drop::HelloTimeout),
            Ok(Err(reason)) => return self.stats.drop(reason),
            Ok(Ok(None)) => return self.stats.drop(Drop::NoSni),
            Ok(Ok(Some(name))) => name,
        };
        if server_name.as_str() == self.config.root_host {
            return self.serve_root(stream, &replay).await;
        }
        let lease = {
            let snapshot = self.shared.load();
            match snapshot.routes.lookup_sni(&server_name) {
                Some(route) => route.lease_id,
                None => return self.stats.drop(Drop::UnknownHost),
            }
        };
        self.claim_and_splice(stream, lease, Marker::Tls, &replay)
            .await;
    }

    /// The root host: replay the ClientHello to the loopback HTTPS listener and copy both ways
    /// (low volume: a user-space copy, bounded by [`root::ROOT_CONN_MAX_MS`]).
    async fn serve_root(&self, client: TcpStream, replay: &[u8]) {
        let Some(addr) = self.config.root_fallback else {
            return self.stats.drop(Drop::RootUnavailable);
        };
        let limit = Duration::from_millis(root::ROOT_CONN_MAX_MS);
        let mut client = client;
        let copied = tokio::time::timeout(limit, async {
            let mut upstream = TcpStream::connect(addr).await.ok()?;
            let _ = upstream.set_nodelay(true);
            upstream.write_all(replay).await.ok()?;
            self.stats.root_host.fetch_add(1, Ordering::Relaxed);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            Some(())
        })
        .await;
        if matches!(copied, Ok(None)) {
            self.stats.drop(Drop::RootUnavailable);
        }
    }

    /// Reads until the ClientHello is complete; keeps every byte read in `replay`.
    async fn peek_hello(
        &self,
        stream: &mut TcpStream,
        replay: &mut Vec<u8>,
    ) -> Result<Option<outrelay_proto::hostname::HostName>, Drop> {
        let mut parser = ClientHelloParser::new(self.config.max_hello_bytes);
        let mut chunk = [0u8; 2048];
        loop {
            let n = stream.read(&mut chunk).await.map_err(|_| Drop::BadHello)?;
            if n == 0 {
                return Err(Drop::BadHello);
            }
            replay.extend_from_slice(&chunk[..n]);
            match parser.feed(&chunk[..n]) {
                Ok(Progress::NeedMore) => {}
                Ok(Progress::Done { hello, .. }) => return Ok(hello.server_name),
                Err(HelloError::PlainHttp) => return Err(Drop::PlainHttp),
                Err(HelloError::IpLiteral) => return Err(Drop::IpLiteralSni),
                Err(_) => return Err(Drop::BadHello),
            }
        }
    }

    async fn tcp_lease_connection(&self, stream: TcpStream, port: u16) {
        let lease = match self.shared.load().routes.lookup_tcp(port) {
            Some(route) => route.lease_id,
            None => return self.stats.drop(Drop::NoTcpRoute),
        };
        self.claim_and_splice(stream, lease, Marker::Tcp, &[]).await;
    }

    /// Claims a session of `lease`, writes the marker and `replay`, and hands both sockets to
    /// a splice engine.
    async fn claim_and_splice(
        &self,
        client: TcpStream,
        lease: LeaseId,
        marker: Marker,
        replay: &[u8],
    ) {
        let Some(slot) = self.conns.acquire(lease, self.config.lease_conn_max) else {
            return self.stats.drop(Drop::LeaseConnLimit);
        };
        let timeout = Duration::from_millis(self.config.claim_timeout_ms);
        let Some(session) = self.pool.claim(lease, timeout, &self.stats).await else {
            return;
        };
        let Ok(mut session) = TcpStream::from_std(session.stream) else {
            return self.stats.drop(Drop::MarkerWriteFailed);
        };
        let mut head = Vec::with_capacity(1 + replay.len());
        head.push(marker as u8);
        head.extend_from_slice(replay);
        let deadline = Duration::from_millis(self.config.marker_write_deadline_ms);
        if !matches!(
            tokio::time::timeout(deadline, session.write_all(&head)).await,
            Ok(Ok(()))
        ) {
            return self.stats.drop(Drop::MarkerWriteFailed);
        }
        let (Ok(client), Ok(session)) = (client.into_std(), session.into_std()) else {
            return self.stats.drop(Drop::MarkerWriteFailed);
        };
        // TCP keep-alive on both legs of a spliced pair (public-ingress.md): a vanished peer
        // is noticed by the kernel instead of holding the pair for the idle timeout.
        let _ = client.set_nodelay(true);
        for socket in [&client, &session] {
            let _ = socket2::SockRef::from(socket).set_keepalive(true);
        }
        let i = self.next_engine.fetch_add(1, Ordering::Relaxed) % self.engines.len().max(1);
        let Some(engine) = self.engines.get(i) else {
            return self.stats.drop(Drop::EngineFull);
        };
        let tag = slot.into_tag();
        match engine.add(OwnedFd::from(client), OwnedFd::from(session), tag) {
            Ok(()) => {
                self.stats.spliced.fetch_add(1, Ordering::Relaxed);
            }
            Err(AddError::Full | AddError::Stopped | AddError::Socket(_)) => {
                self.conns.release_tag(tag);
                self.stats.drop(Drop::EngineFull)
            }
        }
    }
}

/// After a failed accept (EMFILE, ENOBUFS): pause instead of spinning (R3).
async fn accept_backoff() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}
