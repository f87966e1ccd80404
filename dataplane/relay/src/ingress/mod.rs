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
use limits::{
    ConnSlot, Gauge, KeyedCounts, LeaseConns, LiveCaps, PendingConns, PendingSlot, SourceKey,
};
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
    /// Public connections in set-up (ClientHello peek, route lookup) across the relay; more
    /// are refused at accept (`pending_full`).
    pub pending_conn_max: usize,
    /// Public connections in set-up per source address (IPv6: per /64); more are refused at
    /// accept (`pending_per_source`).
    pub pending_per_source_max: usize,
    /// Live public connections (claim wait to pair close) per tenant, across its leases
    /// (`tenant_conn_limit`).
    pub tenant_conn_max: usize,
    /// Live public connections per source address (IPv6: per /64) (`source_conn_limit`).
    pub source_conn_max: usize,
    /// Every public connection, pending or live, across the relay: the descriptor budget
    /// (config 0 = derived from `RLIMIT_NOFILE`, see [`limits::public_conn_budget`]). At the
    /// cap new connections are accepted and reset at once (`public_conn_full`).
    pub public_conn_max: usize,
    /// Root-host connections at once (the loopback `/healthz` listener's pool; `root_full`).
    pub root_conn_max: usize,
    /// Root-host connections per source address or /64 (`root_per_source`).
    pub root_per_source_max: usize,
    /// Longest life of a root-host connection after its ClientHello.
    pub root_conn_max_ms: u64,
    /// Reverse handshakes in progress across the relay (`reverse_pending_full`).
    pub reverse_pending_max: usize,
    /// Reverse handshakes in progress per source address or /64
    /// (`reverse_pending_per_source`).
    pub reverse_pending_per_source_max: usize,
    /// Reverse sessions of one lease past the preamble whose MAC is not verified yet
    /// (`reverse_unauth_per_lease`).
    pub reverse_unauth_per_lease_max: usize,
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
            pending_per_source_max: DEFAULT_PENDING_PER_SOURCE_MAX,
            tenant_conn_max: DEFAULT_TENANT_CONN_MAX,
            source_conn_max: DEFAULT_SOURCE_CONN_MAX,
            public_conn_max: limits::public_conn_budget(
                limits::open_files_limit(),
                limits::DEFAULT_FD_RESERVE,
                DEFAULT_PENDING_CONN_MAX,
            ),
            root_conn_max: DEFAULT_ROOT_CONN_MAX,
            root_per_source_max: DEFAULT_ROOT_PER_SOURCE_MAX,
            root_conn_max_ms: DEFAULT_ROOT_CONN_MAX_MS,
            reverse_pending_max: DEFAULT_REVERSE_PENDING_MAX,
            reverse_pending_per_source_max: DEFAULT_REVERSE_PENDING_PER_SOURCE_MAX,
            reverse_unauth_per_lease_max: DEFAULT_REVERSE_UNAUTH_PER_LEASE_MAX,
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
/// Default cap on connections in set-up from one address or /64: a ClientHello takes one
/// round trip, so even a large NAT rarely has more than a few in flight; a slowloris host
/// gets this many, not the whole pool.
pub const DEFAULT_PENDING_PER_SOURCE_MAX: usize = 256;
/// Default cap on live public connections per tenant (two busy leases' worth; several tenants
/// fit in the descriptor budget of a 65,536-file relay).
pub const DEFAULT_TENANT_CONN_MAX: usize = 8192;
/// Default cap on live public connections per address or /64.
pub const DEFAULT_SOURCE_CONN_MAX: usize = 1024;
/// Default size of the root host's pool (health checks only).
pub const DEFAULT_ROOT_CONN_MAX: usize = 64;
/// Default root-host connections per address or /64.
pub const DEFAULT_ROOT_PER_SOURCE_MAX: usize = 8;
/// Default life of a root-host connection (a health check takes milliseconds).
pub const DEFAULT_ROOT_CONN_MAX_MS: u64 = 5_000;
/// Default cap on reverse handshakes in progress (inside the descriptor reserve).
pub const DEFAULT_REVERSE_PENDING_MAX: usize = 1024;
/// Default cap on reverse handshakes in progress per address or /64 (an agent host opens at
/// most its pool size per lease at once).
pub const DEFAULT_REVERSE_PENDING_PER_SOURCE_MAX: usize = 128;
/// Default cap on unauthenticated sessions per lease (the agent's pool opens at most 8 at
/// once).
pub const DEFAULT_REVERSE_UNAUTH_PER_LEASE_MAX: usize = 32;
/// Bytes the ClientHello buffer grows by per read: what a pending connection holds is what
/// it sent plus less than this (R2), instead of a pre-allocated buffer and a stack chunk.
const HELLO_READ_STEP_BYTES: usize = 512;
/// Connections taken with the reserve descriptor per EMFILE, before the reserve is reopened.
const SHED_BATCH: usize = 64;

/// The ingress side of a relay.
pub struct Ingress {
    config: IngressConfig,
    shared: Arc<Shared>,
    pool: SessionPool,
    engines: Vec<EngineHandle>,
    next_engine: AtomicUsize,
    conns: Arc<LeaseConns>,
    pending: PendingConns,
    root: Arc<Gauge>,
    root_sources: Arc<KeyedCounts<SourceKey>>,
    reverse_pending: Arc<Gauge>,
    reverse_sources: Arc<KeyedCounts<SourceKey>>,
    reverse_unauth: Arc<KeyedCounts<LeaseId>>,
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
            root: Arc::default(),
            root_sources: Arc::default(),
            reverse_pending: Arc::default(),
            reverse_sources: Arc::default(),
            reverse_unauth: Arc::default(),
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

    /// Public connections now, pending or live (what `public_conn_max` caps).
    pub fn public_conns(&self) -> usize {
        self.pending.count() + self.conns.total()
    }

    /// Root-host connections now.
    pub fn root_conns(&self) -> usize {
        self.root.count()
    }

    /// Reverse handshakes in progress now.
    pub fn reverse_pending(&self) -> usize {
        self.reverse_pending.count()
    }

    /// The limits this ingress runs with.
    pub fn config(&self) -> &IngressConfig {
        &self.config
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

    /// The next accepted stream and its peer, or `None` once [`Ingress::stop_accepting`] was
    /// called. `stop` is the listener's subscription to `stopping`, taken once per listener
    /// (not per accept). Out of descriptors (EMFILE/ENFILE), the listener's `reserve`
    /// descriptor is closed, the waiting connections are accepted and reset at once
    /// (`fd_exhausted`), and the reserve is reopened: nobody hangs in the backlog, and the
    /// loop waits for the next connection instead of spinning (R3). Transient errors (a peer
    /// that reset before the accept) are retried at once; others back off.
    async fn accept(
        &self,
        listener: &TcpListener,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        reserve: &mut Reserve,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            if *stop.borrow_and_update() {
                return None;
            }
            tokio::select! {
                r = listener.accept() => match r {
                    Ok(conn) => return Some(conn),
                    Err(e) => match AcceptError::of(&e) {
                        AcceptError::Transient => {}
                        AcceptError::NoDescriptors => {
                            if !self.shed(listener, reserve).await {
                                accept_backoff().await;
                            }
                        }
                        AcceptError::Other => accept_backoff().await,
                    },
                },
                _ = stop.changed() => {}
            }
        }
    }

    /// Frees the reserve descriptor, accepts and resets what waits in the backlog, reopens
    /// the reserve. False when nothing could be shed (no reserve to free: back off).
    async fn shed(&self, listener: &TcpListener, reserve: &mut Reserve) -> bool {
        if reserve.0.take().is_none() {
            *reserve = Reserve::open();
            return false;
        }
        let mut shed = 0;
        while shed < SHED_BATCH {
            // Zero timeout: take what is already queued, never wait.
            match tokio::time::timeout(Duration::ZERO, listener.accept()).await {
                Ok(Ok((stream, _))) => {
                    reset(stream);
                    self.stats.drop(Drop::FdExhausted);
                    shed += 1;
                }
                _ => break,
            }
        }
        *reserve = Reserve::open();
        shed > 0
    }

    /// Takes the places of a new public connection from `source`: the descriptor budget,
    /// then the pending pool and the source's share of it.
    fn admit_public(&self, source: SourceKey) -> Result<PendingSlot, Drop> {
        if self.public_conns() >= self.config.public_conn_max {
            return Err(Drop::PublicConnFull);
        }
        self.pending.acquire(
            source,
            self.config.pending_conn_max,
            self.config.pending_per_source_max,
        )
    }

    fn live_caps(&self) -> LiveCaps {
        LiveCaps {
            lease_max: self.config.lease_conn_max,
            tenant_max: self.config.tenant_conn_max,
            source_max: self.config.source_conn_max,
        }
    }

    /// Idle sessions of a lease.
    pub fn idle_sessions(&self, lease: &LeaseId) -> usize {
        self.pool.idle_count(lease)
    }

    /// Accepts reverse sessions forever. A handshake holds a place in the reverse pool and in
    /// its source's share until it ends; beyond either the connection is reset at once.
    pub fn serve_reverse(self: &Arc<Self>, listener: TcpListener) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut stop = me.stopping.subscribe();
            let mut reserve = Reserve::open();
            loop {
                let Some((stream, peer)) = me.accept(&listener, &mut stop, &mut reserve).await
                else {
                    return;
                };
                let source = SourceKey::of(peer.ip());
                let Some(global) = me.reverse_pending.acquire(me.config.reverse_pending_max) else {
                    me.stats.drop(Drop::ReversePendingFull);
                    reset(stream);
                    continue;
                };
                let max = me.config.reverse_pending_per_source_max;
                let Some(per_source) = me.reverse_sources.acquire(source, max) else {
                    me.stats.drop(Drop::ReversePendingPerSource);
                    reset(stream);
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let _places = (global, per_source);
                    me.reverse_session(stream).await;
                });
            }
        })
    }

    /// Accepts public TLS connections forever.
    pub fn serve_sni(self: &Arc<Self>, listener: TcpListener) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut stop = me.stopping.subscribe();
            let mut reserve = Reserve::open();
            loop {
                let Some((stream, peer)) = me.accept(&listener, &mut stop, &mut reserve).await
                else {
                    return;
                };
                let source = SourceKey::of(peer.ip());
                match me.admit_public(source) {
                    Ok(pending) => {
                        let me = me.clone();
                        tokio::spawn(async move {
                            me.sni_connection(stream, source, pending).await;
                        });
                    }
                    Err(reason) => {
                        me.stats.drop(reason);
                        reset(stream);
                    }
                }
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
                    let mut reserve = Reserve::open();
                    loop {
                        let Some((stream, peer)) =
                            me.accept(&listener, &mut stop, &mut reserve).await
                        else {
                            return;
                        };
                        let source = SourceKey::of(peer.ip());
                        match me.admit_public(source) {
                            Ok(pending) => {
                                let me = me.clone();
                                tokio::spawn(async move {
                                    me.tcp_lease_connection(stream, port, source, pending).await;
                                });
                            }
                            Err(reason) => {
                                me.stats.drop(reason);
                                reset(stream);
                            }
                        }
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
        // Held until the MAC verifies: a flood of preambles for one lease id cannot take the
        // handshake places of other leases.
        let max = self.config.reverse_unauth_per_lease_max;
        let _unauth = self
            .reverse_unauth
            .acquire(lease, max)
            .ok_or(Drop::ReverseUnauthPerLease)?;
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

    /// A public TLS connection from its accept: ClientHello, then the root host or a lease.
    /// Until its first byte arrives a connection holds only this small future (the socket, its
    /// places, a timer): the ClientHello parser and everything after are boxed behind the
    /// first byte, so a silent connection costs far less than 1 KiB (R2, L1).
    async fn sni_connection(&self, stream: TcpStream, source: SourceKey, pending: PendingSlot) {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.hello_deadline_ms);
        // A peek, not `readable()`: a freshly registered socket may report readiness before
        // any byte is there, and the boxed phase must start only once one is.
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
            Err(_) => return self.stats.drop(Drop::HelloTimeout),
            Ok(Err(_) | Ok(0)) => return self.stats.drop(Drop::BadHello),
            Ok(Ok(_)) => {}
        }
        Box::pin(self.hello_and_route(stream, source, pending, deadline)).await;
    }

    /// The ClientHello (by `deadline`), then the root host or the lease's claim. Only the
    /// peek runs in this future; the claim and marker phase is boxed too.
    async fn hello_and_route(
        &self,
        stream: TcpStream,
        source: SourceKey,
        pending: PendingSlot,
        deadline: tokio::time::Instant,
    ) {
        let mut stream = stream;
        let mut replay = Vec::new();
        let peeked =
            tokio::time::timeout_at(deadline, self.peek_hello(&mut stream, &mut replay)).await;
        let server_name = match peeked {
            Err(_) => return self.stats.drop(Drop::HelloTimeout),
            Ok(Err(reason)) => return self.stats.drop(reason),
            Ok(Ok(None)) => return self.stats.drop(Drop::NoSni),
            Ok(Ok(Some(name))) => name,
        };
        if server_name.as_str() == self.config.root_host {
            // Handed off: the root host's own pool holds it from here.
            drop(pending);
            return Box::pin(self.serve_root(stream, &replay, source)).await;
        }
        let admitted = {
            let snapshot = self.shared.load();
            match snapshot.routes.lookup_sni(&server_name) {
                Some(route) => self
                    .conns
                    .admit(route.lease_id, &route.tenant, source, self.live_caps())
                    .map(|slot| (route.lease_id, slot)),
                None => return self.stats.drop(Drop::UnknownHost),
            }
        };
        // Admitted to a lease (or refused): no longer in set-up.
        drop(pending);
        match admitted {
            Ok((lease, slot)) => {
                Box::pin(self.claim_and_splice(stream, lease, slot, Marker::Tls, &replay)).await;
            }
            Err(reason) => {
                self.stats.drop(reason);
                reset(stream);
            }
        }
    }

    /// The root host: replay the ClientHello to the loopback HTTPS listener and copy both ways
    /// (low volume: a user-space copy), in the root host's own small pool (`root_conn_max`,
    /// `root_per_source_max`) and bounded by `root_conn_max_ms`.
    async fn serve_root(&self, client: TcpStream, replay: &[u8], source: SourceKey) {
        let Some(addr) = self.config.root_fallback else {
            return self.stats.drop(Drop::RootUnavailable);
        };
        let per_source = self.config.root_per_source_max;
        let Some(_source) = self.root_sources.acquire(source, per_source) else {
            self.stats.drop(Drop::RootPerSource);
            return reset(client);
        };
        let Some(_place) = self.root.acquire(self.config.root_conn_max) else {
            self.stats.drop(Drop::RootFull);
            return reset(client);
        };
        let limit = Duration::from_millis(self.config.root_conn_max_ms);
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

    /// Reads until the ClientHello is complete; keeps every byte read in `replay`, which grows
    /// by at most [`HELLO_READ_STEP_BYTES`] beyond what arrived. Waiting holds no buffer.
    async fn peek_hello(
        &self,
        stream: &mut TcpStream,
        replay: &mut Vec<u8>,
    ) -> Result<Option<outrelay_proto::hostname::HostName>, Drop> {
        let max = self.config.max_hello_bytes;
        let mut parser = ClientHelloParser::new(max);
        loop {
            stream.readable().await.map_err(|_| Drop::BadHello)?;
            let step = max
                .saturating_sub(replay.len())
                .clamp(1, HELLO_READ_STEP_BYTES);
            replay.reserve_exact(step);
            let start = replay.len();
            match stream.try_read_buf(replay) {
                Ok(0) => return Err(Drop::BadHello),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(Drop::BadHello),
            }
            match parser.feed(replay.get(start..).unwrap_or_default()) {
                Ok(Progress::NeedMore) => {}
                Ok(Progress::Done { hello, .. }) => return Ok(hello.server_name),
                Err(HelloError::PlainHttp) => return Err(Drop::PlainHttp),
                Err(HelloError::IpLiteral) => return Err(Drop::IpLiteralSni),
                Err(_) => return Err(Drop::BadHello),
            }
        }
    }

    async fn tcp_lease_connection(
        &self,
        stream: TcpStream,
        port: u16,
        source: SourceKey,
        pending: PendingSlot,
    ) {
        let admitted = {
            let snapshot = self.shared.load();
            match snapshot.routes.lookup_tcp(port) {
                Some(route) => self
                    .conns
                    .admit(route.lease_id, &route.tenant, source, self.live_caps())
                    .map(|slot| (route.lease_id, slot)),
                None => return self.stats.drop(Drop::NoTcpRoute),
            }
        };
        drop(pending);
        match admitted {
            Ok((lease, slot)) => {
                self.claim_and_splice(stream, lease, slot, Marker::Tcp, &[])
                    .await;
            }
            Err(reason) => {
                self.stats.drop(reason);
                reset(stream);
            }
        }
    }

    /// Claims a session of `lease` (admitted with `slot`), writes the marker and `replay`, and
    /// hands both sockets to a splice engine.
    async fn claim_and_splice(
        &self,
        client: TcpStream,
        lease: LeaseId,
        slot: ConnSlot,
        marker: Marker,
        replay: &[u8],
    ) {
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

/// After a failed accept that shedding could not serve (ENOBUFS, ENOMEM, no reserve
/// descriptor): pause instead of spinning (R3).
async fn accept_backoff() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// How an accept failed.
enum AcceptError {
    /// The peer went away before the accept, or a signal: try again at once.
    Transient,
    /// EMFILE/ENFILE: shed with the reserve descriptor.
    NoDescriptors,
    /// Anything else (ENOBUFS, ENOMEM): back off.
    Other,
}

impl AcceptError {
    fn of(e: &std::io::Error) -> AcceptError {
        use nix::errno::Errno;
        let errno = e.raw_os_error().map(Errno::from_raw);
        match errno {
            Some(Errno::EMFILE | Errno::ENFILE) => AcceptError::NoDescriptors,
            Some(Errno::ECONNABORTED | Errno::ECONNRESET | Errno::EINTR | Errno::EPROTO) => {
                AcceptError::Transient
            }
            _ => AcceptError::Other,
        }
    }
}

/// One descriptor an accept loop keeps open so that, out of descriptors, it can still accept
/// (and reset) what waits in its backlog.
struct Reserve(Option<std::fs::File>);

impl Reserve {
    fn open() -> Reserve {
        Reserve(std::fs::File::open("/dev/null").ok())
    }
}

/// Closes a refused connection with a reset (SO_LINGER 0): the client learns at once, and
/// the relay keeps no TIME_WAIT for it.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// L1 / R2: what a silent pending SNI connection holds is its task's future; it must stay
    /// small (no stack chunk, no claim-phase state before the hello).
    #[tokio::test]
    async fn a_pending_sni_connection_future_is_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let ingress = Ingress::new(IngressConfig::default(), Arc::default(), Vec::new());
        let source = SourceKey::of(peer.ip());
        let pending = ingress
            .admit_public(source)
            .expect("a place for the first connection");
        let future = ingress.sni_connection(stream, source, pending);
        let bytes = std::mem::size_of_val(&future);
        eprintln!(
            "sni_connection future: {bytes} bytes (parser {}, sleep {}, stream {}, slot {})",
            std::mem::size_of::<ClientHelloParser>(),
            std::mem::size_of::<tokio::time::Sleep>(),
            std::mem::size_of::<TcpStream>(),
            std::mem::size_of::<PendingSlot>(),
        );
        assert!(bytes <= 640, "sni_connection future is {bytes} bytes");
    }
}
