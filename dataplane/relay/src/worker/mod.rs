//! Per-core relay workers: each owns a splice engine (its io_uring ring, or epoll), its
//! SO_REUSEPORT listeners (public TLS, reverse sessions, every TCP lease port), the public
//! connections it accepted from their first byte to their last, and its own idle reverse
//! sessions. Nothing on a worker's path waits for tokio or for another worker.
//!
//! ```text
//!             ┌──────────────── worker N (one thread, one ring) ────────────────┐
//!  :443 ──────┤ listen.rs  accept (batch) ─► conn.rs  ClientHello / handshake    │
//!  lease port ┤            reserve fd on EMFILE      route (snapshot) + admit   │
//!  reverse ───┤                                      claim.rs  claim ─► marker  │
//!             │ timers.rs  deadline queues ◄─────────┘          │      ─► Engine::add
//!             │ pool.rs    idle sessions per lease ─────────────┘   (splice, outrelay-io)
//!             └──── inbox (bounded): listeners, steal requests, handed-over sessions ─┘
//! ```
//!
//! The loop: wait on the engine (spliced pairs and this worker's own descriptors together,
//! up to the next timer or tick), serve fired keys, drain the inbox, expire timers; every
//! tick (`lease_sync_interval_ms`), keep-alives and published counters. The relay-wide
//! budgets (pending, per source, per lease and tenant, descriptors) are shared
//! ([`crate::ingress::Ingress`]), so they hold per relay, not per worker.

mod claim;
mod conn;
mod expect;
pub mod listen;
mod pool;
mod slab;
mod timers;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use outrelay_io::{Engine, EngineConfig, EngineHandle, EngineStats, Interest};
use outrelay_proto::reverse::LeaseId;

use crate::ingress::Ingress;
use crate::ingress::stats::{CutReason, Drop};
use crate::steer::Steering;
pub(crate) use conn::Challenge;
use conn::Conn;
pub use listen::{ListenerKind, bind_reuseport};
use pool::LocalPool;
pub(crate) use pool::{Board, IdleSession};
use slab::Slab;
use timers::Timers;

/// Messages other threads send a worker (its inbox is bounded; a full inbox refuses).
pub(crate) enum Msg {
    /// Take over this listener.
    Listen(ListenerKind, TcpListener),
    /// Close the listeners of this TCP lease port (its route is gone).
    Unlisten(u16),
    /// Worker `to` has a claim of `lease` waiting and nothing idle: send one if you can.
    Steal { lease: LeaseId, to: usize },
    /// An idle session of `lease`, handed over by worker `from`.
    Session {
        lease: LeaseId,
        session: IdleSession,
        from: usize,
    },
    /// Close the spliced pairs of these leases now, and splice none of theirs from now on
    /// (their routes are already unpublished): they were banned, denied or their agent
    /// revoked (review M5).
    Cut {
        leases: Arc<[LeaseId]>,
        reason: CutReason,
    },
}

/// Cut leases a worker remembers (so a claim already past its route lookup is not spliced
/// after the cut); beyond it the oldest are forgotten early.
const CUT_REMEMBERED_MAX: usize = 4096;

/// Capacity of a worker's inbox.
const INBOX_MAX: usize = 4096;

/// Sends to one worker: its inbox and its engine's wake-up.
#[derive(Clone)]
pub(crate) struct WorkerHandle {
    tx: SyncSender<Msg>,
    wake: EngineHandle,
}

impl WorkerHandle {
    /// Wakes the worker (to notice a stop).
    pub(crate) fn wake(&self) {
        let _ = self.wake.wake();
    }

    /// Queues `msg` and wakes the worker; the message comes back when the inbox is full.
    pub(crate) fn send(&self, msg: Msg) -> Result<(), Msg> {
        match self.tx.try_send(msg) {
            Ok(()) => {
                let _ = self.wake.wake();
                Ok(())
            }
            Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => Err(m),
        }
    }
}

/// One worker's counters (relaxed atomics; `/metrics` and `relay status` read them).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Connections accepted: `[public (TLS and TCP lease ports), reverse sessions]`.
    pub accepts: [AtomicU64; 2],
    /// Idle sessions claimed by this worker's public connections.
    pub claims: AtomicU64,
    /// Of those, sessions another worker handed over.
    pub cross_claims: AtomicU64,
    /// Sessions this worker handed to another worker (stolen from it, or sent to a waiting
    /// claim there).
    pub handoffs: AtomicU64,
    /// Messages another worker's full inbox refused.
    pub inbox_full: AtomicU64,
    /// Connections in set-up or waiting for a session now.
    pub conns: AtomicU64,
    /// The engine's counters, published once a second.
    engine: Mutex<EngineStats>,
    /// Idle sessions per lease on this worker, published after each loop round that changed
    /// them (one uncontended lock per round, not per session).
    census: Mutex<HashMap<LeaseId, usize>>,
}

impl WorkerStats {
    /// The engine counters as last published.
    pub fn engine(&self) -> EngineStats {
        *self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Idle sessions of `lease` on this worker, as last published.
    pub fn idle_sessions(&self, lease: &LeaseId) -> usize {
        self.census
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(lease)
            .copied()
            .unwrap_or(0)
    }
}

/// The worker threads of a relay.
pub struct Workers {
    /// Each worker's counters, by index.
    pub stats: Vec<Arc<WorkerStats>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Waits for every worker to exit (after [`Ingress::stop`]).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// What [`start`] needs.
pub struct WorkerOptions {
    /// The engine settings of each worker (budgets already split per worker).
    pub engine: EngineConfig,
    /// One public TLS listener per worker (from [`bind_reuseport`]); empty: none.
    pub sni: Vec<TcpListener>,
    /// One reverse-session listener per worker.
    pub reverse: Vec<TcpListener>,
    /// Where root-host connections are served (tokio).
    pub runtime: tokio::runtime::Handle,
    /// Called by each worker once per loop (the watchdog's beat), by worker index.
    pub beats: Vec<Box<dyn Fn() + Send>>,
    /// eBPF steering: the CPU each worker pins itself to, its load writers, the lease-range
    /// listeners ([`crate::steer`]); [`Steering::off`] for plain listeners.
    pub steering: Arc<Steering>,
    /// One lease-range listener per worker (sk_lookup steers every TCP lease port to it);
    /// empty without the lookup program.
    pub lease_range: Vec<TcpListener>,
}

/// Starts `ingress.workers()` worker threads named `worker-N`.
///
/// # Errors
/// An engine (ring) could not be created or a thread could not be spawned.
pub fn start(ingress: &Arc<Ingress>, options: WorkerOptions) -> std::io::Result<Workers> {
    let n = ingress.workers();
    let mut engines = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    let mut inboxes = Vec::with_capacity(n);
    for _ in 0..n {
        let engine = Engine::new(options.engine.clone())?;
        let (tx, rx) = sync_channel(INBOX_MAX);
        handles.push(WorkerHandle {
            tx,
            wake: engine.handle(),
        });
        engines.push(engine);
        inboxes.push(rx);
    }
    let stats: Vec<Arc<WorkerStats>> = (0..n).map(|_| Arc::default()).collect();
    // While leases are expected (issue 20), every publish wakes the workers, whose waiting
    // connections then look for their route at once.
    let wake = handles.clone();
    ingress
        .shared
        .set_publish_hook(crate::state::PublishHook(Box::new(move || {
            for h in &wake {
                h.wake();
            }
        })));
    ingress.set_workers(handles, stats.clone());
    ingress.set_steering(options.steering.clone());
    let config = ingress.config();
    let config_seen = ingress.config_generation();
    let timeouts = Timeouts::of(&config);
    let mut sni = options.sni.into_iter();
    let mut reverse = options.reverse.into_iter();
    let mut beats = options.beats.into_iter();
    let mut lease_range = options.lease_range.into_iter();
    let busy_at = crate::steer::busy_at(config.pending_conn_max, n);
    let mut workers = Workers {
        stats: Vec::with_capacity(n),
        threads: Vec::with_capacity(n),
    };
    for (id, (engine, inbox)) in engines.into_iter().zip(inboxes).enumerate() {
        let stats = stats[id].clone();
        workers.stats.push(stats.clone());
        let mut worker = Worker {
            id,
            ingress: ingress.clone(),
            engine,
            inbox,
            listeners: Vec::new(),
            conns: Slab::default(),
            pool: LocalPool::default(),
            lease_waits: expect::LeaseWaits::default(),
            timers: Timers::default(),
            timeouts,
            config_seen,
            ready_max: config.ready_queue_max,
            waiters_max: config.claim_waiters_max.div_ceil(n).max(1),
            stats,
            reserve: std::fs::File::open("/dev/null").ok(),
            cut: HashMap::new(),
            stopping: false,
            now: Instant::now(),
            runtime: options.runtime.clone(),
            load: Load {
                writers: options.steering.load_writers(id),
                busy_at,
                busy: false,
            },
        };
        for (kind, listener) in [
            (ListenerKind::Sni, sni.next()),
            (ListenerKind::Reverse, reverse.next()),
            (ListenerKind::TcpRange, lease_range.next()),
        ] {
            if let Some(l) = listener {
                worker.listen(kind, l);
            }
        }
        let beat = beats.next();
        let cpu = options.steering.worker_cpu(id);
        let thread = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to(id, cpu);
                }
                worker.run(beat);
            })?;
        workers.threads.push(thread);
    }
    Ok(workers)
}

/// Pins the calling worker thread to `cpu` (CPU-local accept sends it the connections that
/// CPU received). A failure is logged: the worker then runs wherever the scheduler puts it.
fn pin_to(id: usize, cpu: usize) {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    let pinned = set
        .set(cpu)
        .and_then(|()| sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    if let Err(e) = pinned {
        tracing::warn!(worker = id, cpu, error = %e, "worker not pinned");
    }
}

/// What a worker tells the reuseport programs about its load: the count of connections in
/// set-up, written (one map update per group) when it crosses `busy_at` either way and at
/// each tick, never per connection.
struct Load {
    writers: Vec<outrelay_ebpf::LoadWriter>,
    busy_at: usize,
    /// As last written.
    busy: bool,
}

impl Load {
    fn publish(&mut self, conns: usize, force: bool) {
        let busy = conns >= self.busy_at;
        if self.writers.is_empty() || (busy == self.busy && !force) {
            return;
        }
        self.busy = busy;
        let value = u32::try_from(conns).unwrap_or(u32::MAX);
        for w in &mut self.writers {
            // A failed write leaves the old value: the program then decides on stale load
            // until the next tick (nothing breaks).
            let _ = w.set(value);
        }
    }
}

/// Every timeout a worker arms, from the ingress config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) hello: Duration,
    pub(crate) handshake: Duration,
    pub(crate) claim: Duration,
    pub(crate) marker: Duration,
    pub(crate) keepalive: Duration,
    pub(crate) tick: Duration,
}

impl Timeouts {
    fn of(config: &crate::ingress::IngressConfig) -> Timeouts {
        Timeouts {
            hello: Duration::from_millis(config.hello_deadline_ms),
            handshake: Duration::from_millis(config.reverse_handshake_deadline_ms),
            claim: Duration::from_millis(config.claim_timeout_ms),
            marker: Duration::from_millis(config.marker_write_deadline_ms),
            keepalive: Duration::from_millis(config.keepalive_interval_ms),
            tick: Duration::from_millis(config.lease_sync_interval_ms.max(10)),
        }
    }
}

/// One worker (see the module docs).
pub(crate) struct Worker {
    pub(crate) id: usize,
    pub(crate) ingress: Arc<Ingress>,
    pub(crate) engine: Engine,
    inbox: Receiver<Msg>,
    pub(crate) listeners: Vec<Option<listen::Listening>>,
    pub(crate) conns: Slab<Conn>,
    pub(crate) pool: LocalPool,
    /// Public connections waiting for an expected lease (issue 20).
    pub(crate) lease_waits: expect::LeaseWaits,
    pub(crate) timers: Timers,
    pub(crate) timeouts: Timeouts,
    /// The ingress config generation `timeouts`, `ready_max`, `waiters_max` and the load
    /// threshold were read from (a reload bumps it; one relaxed compare per loop round).
    config_seen: u64,
    /// Idle sessions kept per lease on this worker.
    pub(crate) ready_max: usize,
    /// Claims waiting per lease on this worker (`claim_waiters_max` split over the workers).
    pub(crate) waiters_max: usize,
    pub(crate) stats: Arc<WorkerStats>,
    pub(crate) reserve: Option<std::fs::File>,
    /// Leases cut recently, with when: a claim of one that completes later is not spliced.
    /// Lease ids are never reused, so forgetting one after the longest claim is safe.
    pub(crate) cut: HashMap<LeaseId, Instant>,
    pub(crate) stopping: bool,
    /// The time of this loop round.
    pub(crate) now: Instant,
    runtime: tokio::runtime::Handle,
    load: Load,
}

impl Worker {
    fn run(mut self, beat: Option<Box<dyn Fn() + Send>>) {
        let mut fired = Vec::with_capacity(256);
        let mut finished = Vec::new();
        let mut due = Vec::new();
        let mut clock = Instant::now;
        let mut last_tick = Instant::now();
        let mut last_publish = Instant::now();
        loop {
            let now = Instant::now();
            let next = self
                .timers
                .next_deadline()
                .map_or(self.timeouts.tick, |d| d.saturating_duration_since(now))
                .min(self.timeouts.tick);
            fired.clear();
            if let Err(e) = self
                .engine
                .run_once_with(next, &mut clock, &mut finished, &mut fired)
            {
                tracing::error!(worker = self.id, error = %e, "worker's engine failed");
                std::process::exit(1);
            }
            self.now = Instant::now();
            if self.ingress.config_generation() != self.config_seen {
                self.reread_config();
            }
            self.ingress.lease_conns().finished(&finished);
            finished.clear();
            for &(key, interest) in &fired {
                self.fired(key, interest);
            }
            self.drain_inbox();
            self.recheck_lease_waits(false);
            due.clear();
            self.timers.expire(self.now, &mut due);
            for &(kind, key) in &due {
                self.expired(kind, key);
            }
            self.load.publish(self.conns.len(), false);
            if self.pool.dirty {
                self.pool.dirty = false;
                let mut census = self
                    .stats
                    .census
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                self.pool.census(&mut census);
            }
            if self.ingress.is_stopping() && !self.stopping {
                self.stopping = true;
                self.unlisten(None);
            }
            if self.now.saturating_duration_since(last_tick) >= self.timeouts.tick {
                last_tick = self.now;
                self.tick();
                if let Some(beat) = &beat {
                    beat();
                }
            }
            if self.now.saturating_duration_since(last_publish) >= Duration::from_secs(1) {
                last_publish = self.now;
                *self
                    .stats
                    .engine
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = self.engine.stats();
            }
        }
    }

    fn fired(&mut self, key: u64, interest: Interest) {
        if key & listen::LISTENER_BIT != 0 {
            let index = usize::try_from(key & !listen::LISTENER_BIT).unwrap_or(usize::MAX);
            return self.accept_ready(index);
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return; // stale
        };
        conn.armed = conn.armed.minus(interest);
        if interest.contains(Interest::WRITE) {
            self.writable(key);
        } else {
            self.readable(key);
        }
    }

    fn drain_inbox(&mut self) {
        // Bounded per round so a flood of messages cannot starve the worker's connections.
        for _ in 0..INBOX_MAX {
            let Ok(msg) = self.inbox.try_recv() else {
                return;
            };
            match msg {
                Msg::Listen(kind, socket) => self.listen(kind, socket),
                Msg::Unlisten(port) => self.unlisten(Some(ListenerKind::Tcp(port))),
                Msg::Steal { lease, to } => self.steal(lease, to),
                Msg::Session {
                    lease,
                    session,
                    from,
                } => self.offer(lease, session, Some(from)),
                Msg::Cut { leases, reason } => self.cut(&leases, reason),
            }
        }
    }

    /// Closes this worker's spliced pairs of `leases` and remembers the leases (see
    /// [`Msg::Cut`]).
    fn cut(&mut self, leases: &[LeaseId], reason: CutReason) {
        for lease in leases {
            if self.cut.len() >= CUT_REMEMBERED_MAX {
                let oldest = self.cut.iter().min_by_key(|(_, at)| **at).map(|(l, _)| *l);
                if let Some(oldest) = oldest {
                    self.cut.remove(&oldest);
                }
            }
            self.cut.insert(*lease, self.now);
        }
        let tags = self.ingress.lease_conns().tags_of(leases);
        if tags.is_empty() {
            return;
        }
        let mut finished = Vec::new();
        let n = self
            .engine
            .close_where(|tag| tags.contains(&tag), &mut finished);
        self.ingress.lease_conns().finished(&finished);
        self.ingress
            .stats
            .cut(reason, u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// Keep-alives, gone leases, parked listeners, published census.
    /// A reload published new ingress limits: timers armed from now on use the new
    /// durations (those already armed keep theirs), caps apply to the next claim or session,
    /// the engine's splice timeouts to every pair from its next sweep.
    fn reread_config(&mut self) {
        self.config_seen = self.ingress.config_generation();
        let config = self.ingress.config();
        let workers = self.ingress.workers();
        self.timeouts = Timeouts::of(&config);
        self.ready_max = config.ready_queue_max;
        self.waiters_max = config.claim_waiters_max.div_ceil(workers).max(1);
        self.load.busy_at = crate::steer::busy_at(config.pending_conn_max, workers);
        if let Some(splice) = self.ingress.splice_timeouts() {
            self.engine.set_timeouts(&splice);
        }
    }

    fn tick(&mut self) {
        let snapshot = self.ingress.shared.load();
        let mut changed = Vec::new();
        let mut gone_waiters = Vec::new();
        let (failed, gone) = self.pool.keepalive(
            self.now,
            self.timeouts.keepalive,
            |lease| snapshot.reverse_keys.contains_key(lease),
            &mut changed,
            &mut gone_waiters,
        );
        for _ in 0..failed {
            self.ingress.stats.drop(Drop::KeepaliveFailed);
        }
        for _ in 0..gone {
            self.ingress.stats.drop(Drop::LeaseGone);
        }
        for (lease, delta) in changed {
            self.ingress.board.idle_changed(&lease, self.id, delta);
        }
        for key in gone_waiters {
            if let Some(conn) = self.take(key)
                && let conn::State::Waiting(w) = &conn.state
            {
                self.ingress.board.waiting_changed(&w.lease, self.id, -1);
                self.refuse(conn.socket, Drop::ClaimTimeout);
            }
        }
        self.unpark_listeners();
        self.ingress.end_expired_expectations(self.now);
        self.recheck_lease_waits(true);
        if !self.cut.is_empty() {
            // Long enough for any claim that looked its route up before the cut to end.
            let keep = self.timeouts.claim + self.timeouts.marker + Duration::from_secs(1);
            let now = self.now;
            self.cut
                .retain(|_, at| now.saturating_duration_since(*at) < keep);
        }
        self.stats
            .conns
            .store(self.conns.len() as u64, Ordering::Relaxed);
        self.load.publish(self.conns.len(), true);
    }

    /// Serves an agent's TCP fallback tunnel on tokio (TLS, then QUIC packets both ways).
    pub(crate) fn spawn_fallback(&self, client: std::net::TcpStream, replay: Vec<u8>) {
        let ingress = self.ingress.clone();
        self.runtime.spawn(async move {
            let Some(acceptor) = ingress.fallback() else {
                return;
            };
            if let Ok(stream) = tokio::net::TcpStream::from_std(client) {
                acceptor.serve(stream, replay).await;
            }
        });
    }

    /// Serves a root-host connection on tokio (low volume: a user-space copy to the loopback
    /// HTTPS listener).
    pub(crate) fn spawn_root(
        &self,
        client: std::net::TcpStream,
        replay: Vec<u8>,
        source: crate::ingress::limits::SourceKey,
    ) {
        let ingress = self.ingress.clone();
        self.runtime.spawn(async move {
            if let Ok(stream) = tokio::net::TcpStream::from_std(client) {
                ingress.serve_root(stream, &replay, source).await;
            }
        });
    }
}
