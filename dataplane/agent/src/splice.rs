//! The engine threads (outrelay-io), each running its share of the reverse sessions
//! ([`crate::session`]) and splicing the claimed ones with their local targets on the same
//! ring. No byte of a claimed session is copied in user space: the engine moves it
//! socket → pipe → socket.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use outrelay_io::{Engine, EngineConfig, EngineHandle, EngineStats};
use tokio::sync::mpsc;

use crate::config::{LocalConfig, PoolConfig, SpliceConfig};
use crate::pool::PoolLink;
use crate::session::Sessions;
use crate::stats::Stats;

/// How often each engine publishes its stats for `/metrics`.
const STATS_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// Most session opens queued for one engine thread (beyond: `engine_full`, retried later).
pub const OPEN_QUEUE_MAX: usize = 4096;
/// Longest wait of an engine thread with nothing due.
const WAIT_MAX: Duration = Duration::from_secs(1);

/// One engine thread, as the pools see it.
struct EngineLink {
    handle: EngineHandle,
    opens: mpsc::Sender<Arc<PoolLink>>,
    pools_stopped: Arc<AtomicBool>,
}

/// Hands new sessions to the engine threads, round robin.
#[derive(Clone)]
pub struct Splicer {
    engines: Arc<Vec<EngineLink>>,
    next: Arc<AtomicUsize>,
    /// Each engine's last published stats.
    pub stats: Vec<Arc<Mutex<EngineStats>>>,
    /// Sessions claimed and not yet finished (being joined to their target, or spliced),
    /// exact at every moment (the published stats lag by up to [`STATS_PUBLISH_INTERVAL`];
    /// the SIGTERM drain must not).
    pub in_flight: Arc<AtomicUsize>,
}

impl Splicer {
    /// Starts `config.workers` engine threads (`splice-N`).
    ///
    /// # Errors
    /// An engine could not be created (io_uring refused) or a thread could not start.
    pub fn start(
        config: &SpliceConfig,
        pool: &PoolConfig,
        local: &LocalConfig,
        stats: Arc<Stats>,
    ) -> std::io::Result<Splicer> {
        let mut engines = Vec::with_capacity(config.workers);
        let mut published_all = Vec::with_capacity(config.workers);
        let in_flight = Arc::new(AtomicUsize::new(0));
        for i in 0..config.workers {
            // Budgets are the whole agent's: each engine gets an equal share.
            let engine = Engine::new(EngineConfig {
                backend: config.io_backend,
                ..config.engine.per_worker(config.workers)
            })?;
            let (opens, inbox) = mpsc::channel(OPEN_QUEUE_MAX);
            let pools_stopped = Arc::new(AtomicBool::new(false));
            engines.push(EngineLink {
                handle: engine.handle(),
                opens,
                pools_stopped: pools_stopped.clone(),
            });
            let published = Arc::new(Mutex::new(EngineStats::default()));
            published_all.push(published.clone());
            let sessions = Sessions::new(pool, local.clone(), stats.clone(), in_flight.clone());
            let in_flight = in_flight.clone();
            std::thread::Builder::new()
                .name(format!("splice-{i}"))
                .spawn(move || {
                    let thread = EngineThread {
                        engine,
                        sessions,
                        inbox,
                        pools_stopped,
                        in_flight,
                        published,
                    };
                    if let Err(e) = thread.run() {
                        tracing::error!(error = %e, "splice engine failed");
                        std::process::exit(1);
                    }
                })?;
        }
        Ok(Splicer {
            engines: Arc::new(engines),
            next: Arc::new(AtomicUsize::new(0)),
            stats: published_all,
            in_flight,
        })
    }

    /// Asks the next engine thread to open a session of `pool`; false when its queue is full
    /// or it stopped.
    pub(crate) fn open(&self, pool: Arc<PoolLink>) -> bool {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.engines.len().max(1);
        let Some(e) = self.engines.get(i) else {
            return false;
        };
        e.opens.try_send(pool).is_ok() && e.handle.wake().is_ok()
    }

    /// A pool stopped: every engine closes its sessions that are not claimed.
    pub(crate) fn pool_stopped(&self) {
        for e in self.engines.iter() {
            e.pools_stopped.store(true, Ordering::Relaxed);
            let _ = e.handle.wake();
        }
    }
}

/// What one engine thread owns.
struct EngineThread {
    engine: Engine,
    sessions: Sessions,
    inbox: mpsc::Receiver<Arc<PoolLink>>,
    pools_stopped: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    published: Arc<Mutex<EngineStats>>,
}

impl EngineThread {
    fn run(mut self) -> std::io::Result<()> {
        let mut clock = Instant::now;
        let mut finished = Vec::new();
        let mut fired = Vec::with_capacity(256);
        let mut last_publish = Instant::now();
        let mut wait = WAIT_MAX;
        loop {
            self.engine
                .run_once_with(wait, &mut clock, &mut finished, &mut fired)?;
            // Every pair added ends up here once.
            self.in_flight.fetch_sub(finished.len(), Ordering::Relaxed);
            finished.clear();
            let now = Instant::now();
            for (key, interest) in fired.drain(..) {
                self.sessions.ready(&mut self.engine, key, interest, now);
            }
            while let Ok(pool) = self.inbox.try_recv() {
                self.sessions.open(&mut self.engine, pool, now);
            }
            if self.pools_stopped.swap(false, Ordering::Relaxed) {
                self.sessions.close_stopped_pools(&mut self.engine);
            }
            // Rounded up to a millisecond: epoll's timeout would truncate it to a busy zero.
            wait = self
                .sessions
                .expire(&mut self.engine, now, WAIT_MAX)
                .max(Duration::from_millis(1));
            if now.saturating_duration_since(last_publish) >= STATS_PUBLISH_INTERVAL {
                last_publish = now;
                *self
                    .published
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = self.engine.stats();
            }
        }
    }
}
