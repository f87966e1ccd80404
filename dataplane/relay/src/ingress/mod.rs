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
//! Everything per connection runs on the relay's workers ([`crate::worker`]): accept, the
//! ClientHello peek, the reverse handshake, the claim, the marker and the splice, each worker on
//! its own ring. This module holds what the workers share: the config, the relay-wide budgets
//! ([`limits`]: pending, per source, per lease and tenant, descriptors), the counters, the
//! workers' board and inboxes, the TCP lease ports' listeners (bound here, one SO_REUSEPORT
//! socket per worker) and the root host's tokio side ([`root`]). Routes and reverse-session
//! keys come from the published [`Snapshot`](crate::state::Snapshot), loaded per connection.

pub mod limits;
pub mod root;
pub mod stats;

use std::collections::HashSet;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use outrelay_proto::reverse::{self, CHALLENGE_BYTES, LeaseId, NONCE_BYTES, Preamble};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::state::Shared;
use crate::worker::listen::reset;
use crate::worker::{
    Board, Challenge, ListenerKind, Msg, WorkerHandle, WorkerStats, bind_reuseport,
};
use limits::{
    ConnSlot, Gauge, GaugeSlot, KeyedCounts, KeyedSlot, LeaseConns, LiveCaps, PendingConns,
    PendingSlot, SourceKey,
};
use stats::{CutReason, Drop, IngressStats};

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
    /// Accept the one-way version 1 reverse handshake of older agents (the relay never proves
    /// `K` to them); off: refused as `reverse_v1_refused`. Only for an upgrade window.
    pub reverse_accept_v1: bool,
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
            reverse_accept_v1: false,
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
/// How long after a worker ran out of descriptors every worker resets new connections.
const FD_EXHAUSTED_SHED_MS: u64 = 200;

/// Tries to hand a cut order to a worker whose inbox is full, [`CUT_RETRY_MS`] apart.
const CUT_TRIES_MAX: usize = 20;
const CUT_RETRY_MS: u64 = 50;

/// The ingress side of a relay: what its workers share.
pub struct Ingress {
    /// The limits in force: replaced whole by [`Ingress::reload`], read per connection.
    config: ArcSwap<IngressConfig>,
    /// Bumped by each [`Ingress::reload`]; workers compare it once per loop round and then
    /// re-read the timeouts and caps they cache.
    config_generation: AtomicU64,
    /// The splice engines' timeouts as last reloaded (`None`: as the engines were built);
    /// each worker hands them to its engine when the generation moves.
    splice_timeouts: arc_swap::ArcSwapOption<outrelay_io::EngineConfig>,
    /// The published routes and reverse-session keys.
    pub(crate) shared: Arc<Shared>,
    /// Worker threads (at least one).
    workers: usize,
    conns: Arc<LeaseConns>,
    pending: PendingConns,
    root: Arc<Gauge>,
    root_sources: Arc<KeyedCounts<SourceKey>>,
    reverse_pending: Arc<Gauge>,
    reverse_sources: Arc<KeyedCounts<SourceKey>>,
    reverse_unauth: Arc<KeyedCounts<LeaseId>>,
    /// Idle sessions and waiting claims per worker, for cross-worker claims.
    pub(crate) board: Board,
    /// The workers' inboxes and counters, set once by [`crate::worker::start`].
    handles: OnceLock<(Vec<WorkerHandle>, Vec<Arc<WorkerStats>>)>,
    /// Set once by [`Ingress::stop_accepting`]; every worker closes its listeners on it.
    stopping: AtomicBool,
    /// The eBPF lookup map, opened for expected lease ports too; set by
    /// [`crate::worker::start`].
    steering: OnceLock<Arc<crate::steer::Steering>>,
    /// When a worker last ran out of descriptors (ms since `epoch`; 0: never).
    fd_exhausted_at_ms: AtomicU64,
    epoch: Instant,
    /// Counters by reason.
    pub stats: IngressStats,
    /// TCP lease listeners held for a hand-over and inherited ones (issue 20 upgrade).
    handover: OnceLock<Arc<crate::upgrade::Sockets>>,
    /// The TCP/443 fallback: root-host ClientHellos offering ALPN `orp/1` go here.
    fallback: OnceLock<crate::quic::fallback::FallbackAcceptor>,
}

impl Ingress {
    /// An ingress reading routes from `shared`, for `workers` worker threads (start them with
    /// [`crate::worker::start`]).
    pub fn new(config: IngressConfig, shared: Arc<Shared>, workers: usize) -> Arc<Ingress> {
        let workers = workers.max(1);
        Arc::new(Ingress {
            config: ArcSwap::from_pointee(config),
            config_generation: AtomicU64::new(0),
            splice_timeouts: arc_swap::ArcSwapOption::empty(),
            shared,
            workers,
            conns: Arc::default(),
            pending: PendingConns::default(),
            root: Arc::default(),
            root_sources: Arc::default(),
            reverse_pending: Arc::default(),
            reverse_sources: Arc::default(),
            reverse_unauth: Arc::default(),
            board: Board::new(workers),
            handles: OnceLock::new(),
            stopping: AtomicBool::new(false),
            steering: OnceLock::new(),
            fd_exhausted_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            stats: IngressStats::default(),
            fallback: OnceLock::new(),
            handover: OnceLock::new(),
        })
    }

    /// Public connections to these host names (SNI) and TCP lease ports that arrive while no
    /// live lease serves them wait up to `wait_ms` for one (then `claim_timeout` as today);
    /// expectations end when the lease appears or `wait_ms` passes (issue 20: the leases the
    /// old process held at a hand-over, until their agents re-register here). Bounded per
    /// name or port by the claim waiters' bound (`lease_wait_full`) and globally by the
    /// pending budget (a waiting connection keeps its pending place); one that waits in vain
    /// is closed and counted (`lease_wait_timeout`). Expected TCP and UDP ports are opened in
    /// the eBPF lookup map (and get plain listeners on the maintenance tick) meanwhile.
    pub fn expect_leases(&self, leases: &[crate::lease::InheritedLease], wait_ms: u64) {
        self.shared.expect(leases, wait_ms);
        if let Some(steering) = self.steering.get() {
            steering.sync_ports(&self.shared);
        }
    }

    /// The steering the workers run with (its lookup map follows the expected ports too).
    pub(crate) fn set_steering(&self, steering: Arc<crate::steer::Steering>) {
        if self.steering.set(steering).is_ok()
            && !self.shared.expected().is_empty()
            && let Some(s) = self.steering.get()
        {
            s.sync_ports(&self.shared);
        }
    }

    /// Ends expectations whose time is up (a worker's tick): their ports close in the lookup
    /// map, so the kernel refuses them again as for any port without a lease.
    pub(crate) fn end_expired_expectations(&self, now: Instant) {
        let expected = self.shared.expected();
        if expected.next_end().is_some_and(|end| end <= now)
            && self.shared.prune_expected(now)
            && let Some(steering) = self.steering.get()
        {
            steering.sync_ports(&self.shared);
        }
    }

    /// Holds the TCP lease listeners bound from now on for a hand-over, and adopts the
    /// inherited ones (upgrade). Call before [`Ingress::serve_maintenance`].
    pub fn set_handover(&self, sockets: Arc<crate::upgrade::Sockets>) {
        let _ = self.handover.set(sockets);
    }

    /// Worker threads this ingress is built for.
    pub fn workers(&self) -> usize {
        self.workers
    }

    pub(crate) fn set_workers(&self, handles: Vec<WorkerHandle>, stats: Vec<Arc<WorkerStats>>) {
        let _ = self.handles.set((handles, stats));
    }

    /// Each worker's counters (empty before the workers start).
    pub fn worker_stats(&self) -> &[Arc<WorkerStats>] {
        self.handles.get().map_or(&[], |(_, s)| s.as_slice())
    }

    /// Sends `msg` to worker `w`; the message comes back when its inbox is full.
    pub(crate) fn send_to(&self, w: usize, msg: Msg) -> Result<(), Msg> {
        match self.handles.get().and_then(|(h, _)| h.get(w)) {
            Some(handle) => handle.send(msg),
            None => Err(msg),
        }
    }

    /// Tells every worker to close its spliced pairs of `leases`, whose routes are already
    /// unpublished (review M5). A full inbox is retried for up to a second; a worker that
    /// still refuses is counted (`cut_orders_lost`).
    pub async fn cut(&self, leases: Vec<LeaseId>, reason: CutReason) {
        if leases.is_empty() || self.handles.get().is_none() {
            return;
        }
        let leases: Arc<[LeaseId]> = leases.into();
        let mut pending: Vec<usize> = (0..self.workers).collect();
        for _ in 0..CUT_TRIES_MAX {
            pending.retain(|&w| {
                let msg = Msg::Cut {
                    leases: leases.clone(),
                    reason,
                };
                self.send_to(w, msg).is_err()
            });
            if pending.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(CUT_RETRY_MS)).await;
        }
        self.stats
            .cut_orders_lost
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
    }

    /// The per-lease connection counts (the workers give finished pairs back through it).
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

    /// The limits this ingress runs with now.
    pub fn config(&self) -> arc_swap::Guard<Arc<IngressConfig>> {
        self.config.load()
    }

    /// Publishes new limits (SIGHUP): every new connection, claim and handshake reads them;
    /// the workers re-read their cached timeouts and caps on their next loop round, and give
    /// their engines `splice`'s timeouts (`[splice]`: every pair, from the next sweep). What
    /// needs a socket stays as it was: `lease_bind_ip`, the root host and its listener.
    pub fn reload(&self, mut config: IngressConfig, splice: outrelay_io::EngineConfig) {
        let old = self.config.load();
        config.lease_bind_ip = old.lease_bind_ip;
        config.root_host.clone_from(&old.root_host);
        config.root_fallback = old.root_fallback;
        self.config.store(Arc::new(config));
        self.splice_timeouts.store(Some(Arc::new(splice)));
        self.config_generation.fetch_add(1, Ordering::Release);
    }

    /// The splice timeouts of the last [`Ingress::reload`] (`None`: none yet).
    pub(crate) fn splice_timeouts(&self) -> Option<Arc<outrelay_io::EngineConfig>> {
        self.splice_timeouts.load_full()
    }

    /// How many times [`Ingress::reload`] published (0: the start-up config).
    pub fn config_generation(&self) -> u64 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Closes every listener (public TLS, reverse sessions, TCP lease ports) and binds no new
    /// one; connections already accepted go on (SIGTERM's first step).
    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some((handles, _)) = self.handles.get() {
            for h in handles {
                h.wake();
            }
        }
    }

    /// A worker ran out of descriptors (EMFILE/ENFILE) at `now`.
    pub(crate) fn note_fd_exhausted(&self, now: Instant) {
        let ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(0);
        self.fd_exhausted_at_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// Whether a worker ran out of descriptors within [`FD_EXHAUSTED_SHED_MS`] of `now`: every
    /// worker then resets what it accepts (`fd_exhausted`), so the descriptors another worker
    /// freed to shed its backlog are not taken by a new connection elsewhere (the workers
    /// share one descriptor table) and every reserve can be reopened.
    pub(crate) fn fd_exhausted_recently(&self, now: Instant) -> bool {
        let at = self.fd_exhausted_at_ms.load(Ordering::Relaxed);
        let ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(0);
        at != 0 && ms.saturating_sub(at) < FD_EXHAUSTED_SHED_MS
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Public connections not finished yet: in set-up, or admitted to a lease (waiting for a
    /// session, or spliced). Zero once a drain is complete.
    pub fn in_flight(&self) -> usize {
        self.pending.count() + self.conns.total()
    }

    /// Idle sessions of a lease across the workers (as published at their last tick).
    pub fn idle_sessions(&self, lease: &LeaseId) -> usize {
        self.worker_stats()
            .iter()
            .map(|w| w.idle_sessions(lease))
            .sum()
    }

    /// Takes the places of a new public connection from `source`: the descriptor budget,
    /// then the pending pool and the source's share of it.
    pub(crate) fn admit_public(&self, source: SourceKey) -> Result<PendingSlot, Drop> {
        let config = self.config.load();
        if self.public_conns() >= config.public_conn_max {
            return Err(Drop::PublicConnFull);
        }
        self.pending.acquire(
            source,
            config.pending_conn_max,
            config.pending_per_source_max,
        )
    }

    fn live_caps(&self) -> LiveCaps {
        let config = self.config.load();
        LiveCaps {
            lease_max: config.lease_conn_max,
            tenant_max: config.tenant_conn_max,
            source_max: config.source_conn_max,
        }
    }

    /// Admits a live connection of `lease` (of `tenant`, from `source`) against the lease,
    /// tenant and source caps.
    pub(crate) fn admit_live(
        &self,
        lease: LeaseId,
        tenant: &str,
        source: SourceKey,
    ) -> Result<ConnSlot, Drop> {
        self.conns.admit(lease, tenant, source, self.live_caps())
    }

    /// Takes a reverse handshake's places: the relay's and its source's.
    pub(crate) fn admit_reverse(
        &self,
        source: SourceKey,
    ) -> Result<(GaugeSlot, KeyedSlot<SourceKey>), Drop> {
        let global = self
            .reverse_pending
            .acquire(self.config.load().reverse_pending_max)
            .ok_or(Drop::ReversePendingFull)?;
        let per_source = self
            .reverse_sources
            .acquire(source, self.config.load().reverse_pending_per_source_max)
            .ok_or(Drop::ReversePendingPerSource)?;
        Ok((global, per_source))
    }

    /// A preamble for a lease arrived on `socket`: check the lease is live here, take an
    /// unauthenticated place of the lease, send a fresh nonce (version 2: with the relay's
    /// proof of `K`).
    pub(crate) fn answer_preamble(
        &self,
        preamble: Preamble,
        socket: &std::net::TcpStream,
    ) -> Result<Challenge, Drop> {
        let lease = preamble.lease_id();
        let key = *self
            .shared
            .load()
            .reverse_keys
            .get(&lease)
            .ok_or(Drop::UnknownLease)?;
        let unauth = self
            .reverse_unauth
            .acquire(lease, self.config.load().reverse_unauth_per_lease_max)
            .ok_or(Drop::ReverseUnauthPerLease)?;
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).map_err(|_| Drop::BadPreamble)?;
        // Version 2: the relay's proof of `K` goes first, with its nonce; version 1 (only when
        // accepted, checked by the caller): the bare nonce.
        let (agent_nonce, answer, len) = match preamble {
            Preamble::V2 { agent_nonce, .. } => (
                Some(agent_nonce),
                reverse::encode_challenge(&key, &lease, &agent_nonce, &nonce),
                CHALLENGE_BYTES,
            ),
            Preamble::V1 { .. } => {
                let mut bare = [0u8; CHALLENGE_BYTES];
                bare[..NONCE_BYTES].copy_from_slice(&nonce);
                (None, bare, NONCE_BYTES)
            }
        };
        let answer = &answer[..len];
        // A fresh connection's send buffer always takes 48 bytes: a short write means the
        // agent is gone.
        let mut s = socket;
        match s.write(answer) {
            Ok(n) if n == answer.len() => {}
            _ => return Err(Drop::BadPreamble),
        }
        Ok(Challenge {
            _unauth: unauth,
            lease,
            key,
            nonce,
            agent_nonce,
        })
    }

    /// Keeps every worker listening on every routed TCP lease port (one SO_REUSEPORT socket
    /// each, bound here), and closes the ports whose route is gone, until the task is
    /// aborted. A port that cannot be bound is retried every round but logged once.
    pub fn serve_maintenance(self: &Arc<Self>) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut bound: HashSet<u16> = HashSet::new();
            let mut unbindable: HashSet<u16> = HashSet::new();
            // Ports whose closing could not be sent to every worker yet.
            let mut closing: HashSet<u16> = HashSet::new();
            loop {
                me.sync_tcp_listeners(&mut bound, &mut unbindable, &mut closing);
                let tick = Duration::from_millis(me.config.load().lease_sync_interval_ms.max(10));
                tokio::time::sleep(tick).await;
            }
        })
    }

    fn sync_tcp_listeners(
        &self,
        bound: &mut HashSet<u16>,
        unbindable: &mut HashSet<u16>,
        closing: &mut HashSet<u16>,
    ) {
        // Routed ports and ports expected for an inherited lease (issue 20): one computation
        // shared with the eBPF lookup map.
        let wanted = self.shared.wanted_ports(Instant::now()).tcp;
        unbindable.retain(|port| wanted.contains(port));
        let stopping = self.is_stopping();
        for port in bound.iter() {
            if !wanted.contains(port) || stopping {
                closing.insert(*port);
            }
        }
        bound.retain(|port| !closing.contains(port));
        let handover = self.handover.get();
        closing.retain(|port| {
            if let Some(h) = handover {
                h.unhold_tcp_port(*port);
            }
            // Every worker must hear it; retry the ones whose inbox was full next round.
            (0..self.workers).any(|w| self.send_to(w, Msg::Unlisten(*port)).is_err())
        });
        if stopping {
            return;
        }
        if let Some(h) = handover {
            h.expire_spares(Instant::now());
        }
        for &port in &wanted {
            if bound.contains(&port) || closing.contains(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.config.load().lease_bind_ip, port);
            let inherited = handover.and_then(|h| h.adopt_tcp_port(port, self.workers));
            let listeners = match inherited.map_or_else(|| bind_reuseport(addr, self.workers), Ok) {
                Ok(l) => l,
                Err(e) => {
                    if unbindable.insert(port) {
                        tracing::warn!(%addr, error = %e, "cannot bind TCP lease port; retrying");
                    }
                    continue;
                }
            };
            if let Some(h) = handover {
                h.hold_tcp_port(port, &listeners);
            }
            for (w, l) in listeners.into_iter().enumerate() {
                if self
                    .send_to(w, Msg::Listen(ListenerKind::Tcp(port), l))
                    .is_err()
                {
                    // That worker's socket is closed (it leaves the port's group): the others
                    // serve the port.
                    tracing::warn!(
                        port,
                        worker = w,
                        "worker inbox full: port not on that worker"
                    );
                }
            }
            bound.insert(port);
        }
    }

    /// Serves agents' TCP/443 fallback tunnels with `acceptor` (once; before the workers see
    /// traffic). Without it a root-host ClientHello offering `orp/1` goes to the root listener.
    pub fn serve_fallback(&self, acceptor: crate::quic::fallback::FallbackAcceptor) {
        let _ = self.fallback.set(acceptor);
    }

    /// The fallback acceptor, when one is served.
    pub(crate) fn fallback(&self) -> Option<&crate::quic::fallback::FallbackAcceptor> {
        self.fallback.get()
    }

    /// The root host: replay the ClientHello to the loopback HTTPS listener and copy both ways
    /// (low volume: a user-space copy), in the root host's own small pool (`root_conn_max`,
    /// `root_per_source_max`) and bounded by `root_conn_max_ms`.
    pub(crate) async fn serve_root(&self, client: TcpStream, replay: &[u8], source: SourceKey) {
        let Some(addr) = self.config.load().root_fallback else {
            return self.stats.drop(Drop::RootUnavailable);
        };
        let per_source = self.config.load().root_per_source_max;
        let Some(_source) = self.root_sources.acquire(source, per_source) else {
            self.stats.drop(Drop::RootPerSource);
            return reset(client);
        };
        let Some(_place) = self.root.acquire(self.config.load().root_conn_max) else {
            self.stats.drop(Drop::RootFull);
            return reset(client);
        };
        let limit = Duration::from_millis(self.config.load().root_conn_max_ms);
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
}
