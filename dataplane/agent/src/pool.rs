//! The reverse-session pool of one granted lease on one relay connection.
//!
//! The pool keeps `pool.idle` authenticated idle TCP sessions open to the grant's
//! `reverse_addr`, and more (up to `pool.max`) while claims arrive: its target is `idle` plus
//! the claims seen within the last `pool.growth_window_ms`. The pool task (tokio) only counts
//! and decides; the sessions themselves run on the splice engine threads (`session`):
//! connect, handshake, keep-alives, the dead-session timeout, the marker, the local connect
//! and the splice, with no tokio task, timer or hand-off per session.
//!
//! Replenishment is batched and local: a claim raises the target by one and the engine thread
//! that saw it opens every session the pool is then short of at once, on its own ring (no
//! tokio wake-up per public connection: idle and claimed are atomics in `PoolLink`); the
//! pool task samples the claim counter for the growth window, tops up after ends and holds
//! after failures. A burst of N claims therefore costs about log2(N / idle) handshake round
//! trips to reach its size, not N sequential ones.
//!
//! Addresses are resolved here, on tokio, when the pool starts, again at the end of a retry
//! hold and every [`RESOLVE_INTERVAL`] when one of them is a name; the engine threads read the
//! last answer (an `ArcSwap`) and never resolve.
//!
//! When claims stop, the target falls back to `idle` and the surplus idle sessions close at
//! their next keep-alive byte (so a burst does not pin `max` sessions on the relay forever).
//!
//! The pool dies with its grant: aborting its task marks it stopped and pokes the engines,
//! which close its idle sessions. Claimed sessions keep flowing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use outrelay_proto::reverse::{EXPORTER_KEY_BYTES, LeaseId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{LocalConfig, PoolConfig};
use crate::splice::Splicer;
use crate::stats::{LocalFail, PoolGauge, SessionFail, Stats};

/// How often a pool whose addresses are names resolves them again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// What every pool shares.
pub struct PoolCtx {
    /// Pool sizes and timeouts.
    pub pool: PoolConfig,
    /// Local target connects.
    pub local: LocalConfig,
    /// Counters.
    pub stats: Arc<Stats>,
    /// The splice engines (which also run the sessions).
    pub splicer: Splicer,
}

/// One grant's pool parameters.
pub struct PoolParams {
    /// Lease name (logs).
    pub name: Arc<str>,
    /// `host:port` of the relay's reverse-session listener.
    pub reverse_addr: String,
    /// The granted lease id.
    pub lease_id: LeaseId,
    /// `K`: the TLS exporter of the QUIC connection that holds the lease.
    pub key: [u8; EXPORTER_KEY_BYTES],
    /// Target of TLS passthrough claims.
    pub tls_to: Option<Arc<str>>,
    /// Target of TCP port claims.
    pub tcp_to: Option<Arc<str>>,
    /// The PROXY protocol header written to the targets before the client's first byte.
    pub proxy_protocol: Option<crate::config::ProxyProtocol>,
    /// Live sizes for `/status` and `/metrics`.
    pub gauge: Arc<PoolGauge>,
    /// Log throttle of this lease's local connect failures (shared across grants).
    pub fail_log: Arc<FailLog>,
}

/// Throttles "local target failed" log lines: one per interval, with the count suppressed.
/// Lock-free: engine threads note failures.
#[derive(Debug, Default)]
pub struct FailLog {
    /// Milliseconds since [`log_epoch`] of the last line, plus one (0: never logged).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

fn log_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl FailLog {
    /// Records one failure; logs it unless another was logged within `interval`.
    pub(crate) fn note(
        &self,
        name: &str,
        target: &str,
        reason: LocalFail,
        error: &dyn std::fmt::Display,
        interval: Duration,
    ) {
        let now_ms = u64::try_from(log_epoch().elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= interval_ms;
        let log = due
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if log {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(
                lease = name,
                target,
                reason = reason.label(),
                error = %error,
                suppressed,
                "local target unreachable: public client closed"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What a session tells its pool task (only ends: idle and claimed are counted in atomics,
/// so a public connection wakes no tokio task).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    /// A session ended without a claim; `failed`: hold the pool's next attempts (backoff).
    Ended { failed: bool },
}

/// A local target as last resolved.
pub(crate) enum Target {
    /// The lease has no target for this marker.
    None,
    /// Its name (logs) and addresses, tried in order.
    Addrs(Arc<str>, Arc<[SocketAddr]>),
    /// Its name and why it did not resolve.
    Failed(Arc<str>, String),
}

/// A pool's addresses as last resolved (on tokio).
pub(crate) struct Resolved {
    /// The relay's reverse listener (empty: did not resolve; sessions fail to connect).
    pub(crate) reverse: Arc<[SocketAddr]>,
    /// Target of marker 0x02.
    pub(crate) tls: Target,
    /// Target of marker 0x01.
    pub(crate) tcp: Target,
}

/// What a pool shares with the engine threads that run its sessions. The counts are the
/// truth (engines and the pool task update them); the lease's [`PoolGauge`] mirrors them.
pub(crate) struct PoolLink {
    pub(crate) params: Arc<PoolParams>,
    pub(crate) resolved: ArcSwap<Resolved>,
    /// Sized for one event per open session: `try_send` never finds it full.
    pub(crate) events: mpsc::Sender<Event>,
    /// The pool stopped: its sessions that are not claimed close.
    pub(crate) closed: AtomicBool,
    /// A retry hold is on: nobody opens sessions.
    pub(crate) held: AtomicBool,
    /// `pool.max`.
    pub(crate) max: usize,
    /// Sessions connecting, handshaking or idle (reserved before they are asked for).
    pub(crate) open: AtomicUsize,
    /// Sessions authenticated and waiting for a claim.
    pub(crate) idle: AtomicUsize,
    /// What the pool aims for; a claim raises it by one at once (the pool task recomputes it
    /// from the growth window).
    pub(crate) target: AtomicUsize,
    /// Idle sessions above the target: that many close at their next keep-alive byte.
    pub(crate) surplus: AtomicUsize,
    /// Claims ever (the pool task samples it for the growth window).
    pub(crate) claims: AtomicU64,
}

impl PoolLink {
    pub(crate) fn new(
        params: Arc<PoolParams>,
        resolved: Resolved,
        events: mpsc::Sender<Event>,
        max: usize,
    ) -> PoolLink {
        PoolLink {
            params,
            resolved: ArcSwap::from_pointee(resolved),
            events,
            closed: AtomicBool::new(false),
            held: AtomicBool::new(false),
            max,
            open: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            target: AtomicUsize::new(0),
            surplus: AtomicUsize::new(0),
            claims: AtomicU64::new(0),
        }
    }

    /// Reserves one more open session when below the target (and not held or stopped).
    pub(crate) fn reserve(&self) -> bool {
        if self.held.load(Ordering::Relaxed) || self.closed.load(Ordering::Relaxed) {
            return false;
        }
        let target = self.target.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| {
                (o < target).then_some(o + 1)
            })
            .is_ok()
    }

    /// A session completed its handshake.
    pub(crate) fn became_idle(&self) {
        self.idle.fetch_add(1, Ordering::Relaxed);
    }

    /// An idle session was claimed: it leaves the pool, and the target grows by one.
    pub(crate) fn claimed(&self) {
        decrement(&self.idle);
        decrement(&self.open);
        self.claims.fetch_add(1, Ordering::Relaxed);
        let max = self.max;
        let _ = self
            .target
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + 1).min(max))
            });
    }

    /// A session ended unclaimed (or never opened): counted out, and the pool task told.
    pub(crate) fn ended(&self, was_idle: bool, failed: bool) {
        if was_idle {
            decrement(&self.idle);
        }
        decrement(&self.open);
        let _ = self.events.try_send(Event::Ended { failed });
    }
}

/// Decrements `n` if it is positive; true when this caller took one.
pub(crate) fn decrement(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
        .is_ok()
}

/// Marks the pool stopped when its task ends (abort included) and pokes the engines.
struct StopGuard {
    link: Arc<PoolLink>,
    splicer: Splicer,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.link.closed.store(true, Ordering::Relaxed);
        self.splicer.pool_stopped();
    }
}

/// Starts the pool; abort the handle to stop it (idle sessions close, claimed ones go on).
pub fn spawn(params: PoolParams, ctx: Arc<PoolCtx>) -> JoinHandle<()> {
    tokio::spawn(run(Arc::new(params), ctx))
}

async fn run(p: Arc<PoolParams>, ctx: Arc<PoolCtx>) {
    let cfg = ctx.pool.clone();
    // Each session sends at most one event, and at most `max` sessions are counted open.
    let (tx, mut rx) = mpsc::channel::<Event>(cfg.max + 2);
    let names = has_names(&p);
    let link = Arc::new(PoolLink::new(p.clone(), resolve(&p).await, tx, cfg.max));
    let mut resolved_at = Instant::now();
    let _stop = StopGuard {
        link: link.clone(),
        splicer: ctx.splicer.clone(),
    };
    // Samples of the claim counter: (when, total) while within the growth window.
    let tick =
        (cfg.growth_window / 10).clamp(Duration::from_millis(10), Duration::from_millis(100));
    let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
    let (mut base, mut seen) = (0u64, 0u64);
    let mut retry = cfg.retry_initial;
    let mut hold_until: Option<Instant> = None;
    loop {
        let mut now = Instant::now();
        let total = link.claims.load(Ordering::Relaxed);
        if total != seen {
            seen = total;
            samples.push_back((now, total));
            retry = cfg.retry_initial;
        }
        while let Some(&(t, n)) = samples.front() {
            if now.saturating_duration_since(t) <= cfg.growth_window {
                break;
            }
            base = n;
            samples.pop_front();
        }
        let in_window = usize::try_from(total - base).unwrap_or(usize::MAX);
        let target = cfg.idle.saturating_add(in_window).min(cfg.max);
        link.target.store(target, Ordering::Relaxed);
        if hold_until.is_some_and(|t| now >= t) {
            hold_until = None;
            if names {
                // A failure may be a stale address.
                link.resolved.store(Arc::new(resolve(&p).await));
                resolved_at = Instant::now();
                now = resolved_at;
            }
        }
        if names && now.saturating_duration_since(resolved_at) >= RESOLVE_INTERVAL {
            link.resolved.store(Arc::new(resolve(&p).await));
            resolved_at = Instant::now();
        }
        link.held.store(hold_until.is_some(), Ordering::Relaxed);
        // All that is missing at once: the sessions open concurrently on the engines.
        while link.reserve() {
            if !ctx.splicer.open(link.clone()) {
                decrement(&link.open);
                ctx.stats.session_failed(SessionFail::EngineFull);
                hold_until = Some(Instant::now() + retry);
                retry = (retry * 2).min(cfg.retry_max);
                link.held.store(true, Ordering::Relaxed);
                break;
            }
        }
        let (open, idle) = (
            link.open.load(Ordering::Relaxed),
            link.idle.load(Ordering::Relaxed),
        );
        let surplus = open.saturating_sub(target).min(idle);
        link.surplus.store(surplus, Ordering::Relaxed);
        let g = &p.gauge;
        g.target.store(target, Ordering::Relaxed);
        g.open.store(open, Ordering::Relaxed);
        g.idle.store(idle, Ordering::Relaxed);
        g.surplus.store(surplus, Ordering::Relaxed);
        // Wake for an end, the end of a retry hold, the next sample while claims are in the
        // window (or a second otherwise: the gauges) and the next resolution.
        let mut wake = now
            + if samples.is_empty() {
                Duration::from_secs(1)
            } else {
                tick
            };
        if let Some(t) = hold_until {
            wake = wake.min(t);
        }
        if names {
            wake = wake.min(resolved_at + RESOLVE_INTERVAL);
        }
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                let mut next = Some(ev);
                // Everything the engines sent since the last round, then one decision.
                while let Some(Event::Ended { failed }) = next {
                    if failed {
                        hold_until = Some(Instant::now() + retry);
                        retry = (retry * 2).min(cfg.retry_max);
                    } else {
                        retry = cfg.retry_initial;
                    }
                    next = rx.try_recv().ok();
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// Whether any address of the pool is a name (IP literals never need resolving again).
fn has_names(p: &PoolParams) -> bool {
    let literal = |a: &str| a.parse::<SocketAddr>().is_ok();
    !literal(&p.reverse_addr)
        || p.tls_to.as_deref().is_some_and(|a| !literal(a))
        || p.tcp_to.as_deref().is_some_and(|a| !literal(a))
}

async fn resolve(p: &PoolParams) -> Resolved {
    let reverse = match tokio::net::lookup_host(p.reverse_addr.as_str()).await {
        Ok(addrs) => addrs.collect(),
        Err(e) => {
            tracing::warn!(lease = %p.name, reverse = %p.reverse_addr, error = %e, "reverse address did not resolve");
            Vec::new()
        }
    };
    Resolved {
        reverse: reverse.into(),
        tls: target(p.tls_to.as_ref()).await,
        tcp: target(p.tcp_to.as_ref()).await,
    }
}

async fn target(to: Option<&Arc<str>>) -> Target {
    let Some(name) = to else {
        return Target::None;
    };
    match tokio::net::lookup_host(&**name).await {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Target::Failed(name.clone(), "no address".into())
            } else {
                Target::Addrs(name.clone(), addrs.into())
            }
        }
        Err(e) => Target::Failed(name.clone(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_log_logs_once_per_interval_and_counts_the_rest() {
        let log = FailLog::default();
        let interval = Duration::from_secs(3600);
        for _ in 0..5 {
            log.note(
                "demo",
                "127.0.0.1:9",
                LocalFail::Refused,
                &"refused",
                interval,
            );
        }
        assert_eq!(
            log.suppressed.load(Ordering::Relaxed),
            4,
            "one logged, four held back"
        );
        // A zero interval logs every time and reports what was held back.
        log.note(
            "demo",
            "127.0.0.1:9",
            LocalFail::Refused,
            &"refused",
            Duration::ZERO,
        );
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 0);
    }
}
