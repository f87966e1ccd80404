//! The splice engines (outrelay-io), each on its own thread, and the handle the pools use to
//! hand them (reverse session, local target) pairs. No byte of a claimed session is copied in
//! user space: the engine moves it socket → pipe → socket.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use outrelay_io::{AddError, Engine, EngineConfig, EngineHandle, EngineStats};

use crate::config::SpliceConfig;

/// How often each engine publishes its stats for `/metrics`.
const STATS_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// Hands pairs to the engines, round robin.
#[derive(Clone)]
pub struct Splicer {
    handles: Arc<Vec<EngineHandle>>,
    next: Arc<AtomicUsize>,
    /// Each engine's last published stats.
    pub stats: Vec<Arc<Mutex<EngineStats>>>,
    /// Pairs handed to an engine and not yet finished, exact at every moment (the published
    /// stats lag by up to [`STATS_PUBLISH_INTERVAL`]; the SIGTERM drain must not).
    pub in_flight: Arc<AtomicUsize>,
}

impl Splicer {
    /// Starts `config.workers` engine threads (`splice-N`).
    ///
    /// # Errors
    /// An engine could not be created (io_uring refused) or a thread could not start.
    pub fn start(config: &SpliceConfig) -> std::io::Result<Splicer> {
        let mut handles = Vec::with_capacity(config.workers);
        let mut stats = Vec::with_capacity(config.workers);
        let in_flight = Arc::new(AtomicUsize::new(0));
        for i in 0..config.workers {
            // Budgets are the whole agent's: each engine gets an equal share.
            let mut engine = Engine::new(EngineConfig {
                backend: config.io_backend,
                ..config.engine.per_worker(config.workers)
            })?;
            handles.push(engine.handle());
            let published = Arc::new(Mutex::new(EngineStats::default()));
            stats.push(published.clone());
            let in_flight = in_flight.clone();
            std::thread::Builder::new()
                .name(format!("splice-{i}"))
                .spawn(move || {
                    let mut clock = Instant::now;
                    let mut finished = Vec::new();
                    let mut last_publish = Instant::now();
                    loop {
                        if let Err(e) =
                            engine.run_once(Duration::from_secs(1), &mut clock, &mut finished)
                        {
                            tracing::error!(error = %e, "splice engine failed");
                            std::process::exit(1);
                        }
                        // Every pair handed over ends up here once (refused ones too).
                        in_flight.fetch_sub(finished.len(), Ordering::Relaxed);
                        finished.clear();
                        if last_publish.elapsed() >= STATS_PUBLISH_INTERVAL {
                            last_publish = Instant::now();
                            *published.lock().unwrap_or_else(PoisonError::into_inner) =
                                engine.stats();
                        }
                    }
                })?;
        }
        Ok(Splicer {
            handles: Arc::new(handles),
            next: Arc::new(AtomicUsize::new(0)),
            stats,
            in_flight,
        })
    }

    /// Queues `a` ⇄ `b` on the next engine.
    ///
    /// # Errors
    /// The engine's inbox is full or it stopped (the sockets are closed).
    pub fn add(&self, a: OwnedFd, b: OwnedFd, tag: u64) -> Result<(), AddError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len().max(1);
        // Counted before the hand-over: the engine may finish the pair before `add` returns.
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let added = match self.handles.get(i) {
            Some(h) => h.add(a, b, tag),
            None => Err(AddError::Stopped),
        };
        if added.is_err() {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        added
    }
}
