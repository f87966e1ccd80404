//! The reverse-session pool of one granted lease on one relay connection.
//!
//! The pool keeps `pool.idle` authenticated idle TCP sessions open to the grant's
//! `reverse_addr`, and more (up to `pool.max`) while claims arrive: its target is `idle` plus
//! the claims seen within the last `pool.growth_window_ms`. Each session:
//!
//! 1. connects, sends the preamble, reads the relay's nonce, answers the exporter-keyed MAC
//!    (`outrelay_proto::reverse`);
//! 2. reads ONE byte at a time while idle: `0x00` keep-alives are skipped, a session with no
//!    byte for `pool.dead_session_ms` is dead (dropped, replaced);
//! 3. on a marker (`0x02` TLS passthrough → `tls_to`, `0x01` TCP port → `tcp_to`) tells the pool
//!    (which opens a replacement at once) and, in a task of its own that outlives the pool,
//!    connects the local target and hands both sockets to a splice engine. A target that
//!    refuses gets the session reset at once (SO_LINGER 0), so the relay closes the public
//!    client promptly; the failure is counted by reason and logged at most once per
//!    `local.failure_log_interval_ms` per lease.
//!
//! When claims stop, the target falls back to `idle` and the surplus idle sessions close at
//! their next keep-alive byte (so a burst does not pin `max` sessions on the relay forever).
//!
//! The pool dies with its grant: aborting its task drops the [`JoinSet`] of idle sessions,
//! which closes them. Claimed sessions are not in the set and keep flowing.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use outrelay_proto::reverse::{self, EXPORTER_KEY_BYTES, LeaseId, Marker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{LocalConfig, PoolConfig};
use crate::splice::Splicer;
use crate::stats::{LocalFail, PoolGauge, SessionFail, Stats};

/// What every pool shares.
pub struct PoolCtx {
    /// Pool sizes and timeouts.
    pub pool: PoolConfig,
    /// Local target connects.
    pub local: LocalConfig,
    /// Counters.
    pub stats: Arc<Stats>,
    /// The splice engines.
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
    /// Live sizes for `/status` and `/metrics`.
    pub gauge: Arc<PoolGauge>,
    /// Log throttle of this lease's local connect failures (shared across grants).
    pub fail_log: Arc<FailLog>,
}

/// Throttles "local target failed" log lines: one per interval, with the count suppressed.
#[derive(Debug, Default)]
pub struct FailLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl FailLog {
    /// Records one failure; logs it unless another was logged within `interval`.
    fn note(&self, name: &str, target: &str, reason: LocalFail, error: &str, interval: Duration) {
        let now = Instant::now();
        let log = {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            match *last {
                Some(t) if now.saturating_duration_since(t) < interval => false,
                _ => {
                    *last = Some(now);
                    true
                }
            }
        };
        if log {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(
                lease = name,
                target,
                reason = reason.label(),
                error,
                suppressed,
                "local target unreachable: public client closed"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What a session tells its pool.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// Handshake done; waiting for a claim.
    Idle,
    /// Claimed (was idle).
    Claimed,
    /// Ended without a claim; `was_idle` when it had reported [`Event::Idle`].
    Ended { was_idle: bool, failed: bool },
}

/// Starts the pool; abort the handle to stop it (idle sessions close, claimed ones go on).
pub fn spawn(params: PoolParams, ctx: Arc<PoolCtx>) -> JoinHandle<()> {
    tokio::spawn(run(Arc::new(params), ctx))
}

async fn run(p: Arc<PoolParams>, ctx: Arc<PoolCtx>) {
    let cfg = ctx.pool.clone();
    // Each session sends at most two events, and at most `max` sessions exist.
    let (tx, mut rx) = mpsc::channel::<Event>(cfg.max * 2 + 2);
    let mut sessions = JoinSet::new();
    let mut open = 0usize;
    let mut idle = 0usize;
    let mut claims: VecDeque<Instant> = VecDeque::new();
    let mut retry = cfg.retry_initial;
    let mut hold_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        while claims
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > cfg.growth_window)
        {
            claims.pop_front();
        }
        let target = (cfg.idle + claims.len()).min(cfg.max);
        p.gauge.target.store(target, Ordering::Relaxed);
        if hold_until.is_some_and(|t| now >= t) {
            hold_until = None;
        }
        if hold_until.is_none() {
            while open < target {
                open += 1;
                sessions.spawn(session(p.clone(), ctx.clone(), tx.clone()));
            }
        }
        p.gauge.open.store(open, Ordering::Relaxed);
        p.gauge.idle.store(idle, Ordering::Relaxed);
        p.gauge
            .surplus
            .store(open.saturating_sub(target).min(idle), Ordering::Relaxed);
        // Wake for the next event, the end of a retry hold, or the growth window sliding.
        let wake = hold_until
            .or_else(|| claims.front().map(|t| *t + cfg.growth_window))
            .unwrap_or(now + Duration::from_secs(3600));
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                match ev {
                    Event::Idle => idle += 1,
                    Event::Claimed => {
                        idle = idle.saturating_sub(1);
                        open = open.saturating_sub(1);
                        claims.push_back(Instant::now());
                        retry = cfg.retry_initial;
                    }
                    Event::Ended { was_idle, failed } => {
                        if was_idle {
                            idle = idle.saturating_sub(1);
                        }
                        open = open.saturating_sub(1);
                        if failed {
                            hold_until = Some(Instant::now() + retry);
                            retry = (retry * 2).min(cfg.retry_max);
                        } else {
                            retry = cfg.retry_initial;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

/// One reverse session from connect to claim (or its end).
async fn session(p: Arc<PoolParams>, ctx: Arc<PoolCtx>, tx: mpsc::Sender<Event>) {
    let end = |was_idle: bool, failed: bool| Event::Ended { was_idle, failed };
    let mut s = match handshake(&p, &ctx.pool).await {
        Ok(s) => s,
        Err(reason) => {
            ctx.stats.session_failed(reason);
            let _ = tx.send(end(false, true)).await;
            return;
        }
    };
    ctx.stats.sessions_opened.fetch_add(1, Ordering::Relaxed);
    let _ = tx.send(Event::Idle).await;
    let marker = loop {
        match tokio::time::timeout(ctx.pool.dead_session, s.read_u8()).await {
            Err(_) => {
                ctx.stats.sessions_dead.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(end(true, false)).await;
                return;
            }
            Ok(Err(_)) => {
                ctx.stats.session_failed(SessionFail::ClosedByRelay);
                let _ = tx.send(end(true, true)).await;
                return;
            }
            Ok(Ok(byte)) => match Marker::from_byte(byte) {
                Some(Marker::KeepAlive) => {
                    if take_one(&p.gauge.surplus) {
                        let _ = tx.send(end(true, false)).await;
                        return;
                    }
                }
                Some(m) => break m,
                None => {
                    ctx.stats.session_failed(SessionFail::BadByte);
                    tracing::debug!(lease = %p.name, byte, "unexpected byte on an idle session");
                    let _ = tx.send(end(true, true)).await;
                    return;
                }
            },
        }
    };
    match marker {
        Marker::Tls => ctx
            .stats
            .sessions_claimed_tls
            .fetch_add(1, Ordering::Relaxed),
        _ => ctx
            .stats
            .sessions_claimed_tcp
            .fetch_add(1, Ordering::Relaxed),
    };
    let _ = tx.send(Event::Claimed).await;
    // Detached: the public connection must not die with the pool (a reconnect, say).
    tokio::spawn(claimed(s, marker, p, ctx));
}

/// Decrements `n` if it is positive; true when this caller took one.
fn take_one(n: &std::sync::atomic::AtomicUsize) -> bool {
    n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
        .is_ok()
}

/// Connect, preamble, nonce, MAC.
async fn handshake(p: &PoolParams, cfg: &PoolConfig) -> Result<TcpStream, SessionFail> {
    let mut s = match tokio::time::timeout(
        cfg.connect_timeout,
        TcpStream::connect(p.reverse_addr.as_str()),
    )
    .await
    {
        Ok(Ok(s)) => s,
        _ => return Err(SessionFail::Connect),
    };
    let _ = s.set_nodelay(true);
    let exchange = async {
        s.write_all(&reverse::encode_preamble(&p.lease_id)).await?;
        let mut nonce = [0u8; reverse::NONCE_BYTES];
        s.read_exact(&mut nonce).await?;
        s.write_all(&reverse::compute_mac(&p.key, &nonce, &p.lease_id))
            .await?;
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(cfg.handshake_timeout, exchange).await {
        Ok(Ok(())) => Ok(s),
        _ => Err(SessionFail::Handshake),
    }
}

/// A claimed session: connect the local target and splice, or reset the session at once.
async fn claimed(session: TcpStream, marker: Marker, p: Arc<PoolParams>, ctx: Arc<PoolCtx>) {
    let target = match marker {
        Marker::Tls => p.tls_to.clone(),
        _ => p.tcp_to.clone(),
    };
    let Some(target) = target else {
        fail(
            &session,
            &p,
            &ctx,
            "-",
            LocalFail::NoTarget,
            "no target for this marker",
        );
        return;
    };
    let local =
        match tokio::time::timeout(ctx.local.connect_timeout, TcpStream::connect(&*target)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let reason = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => LocalFail::Refused,
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::NotFound => {
                        LocalFail::Resolve
                    }
                    _ => LocalFail::Other,
                };
                fail(&session, &p, &ctx, &target, reason, &e.to_string());
                return;
            }
            Err(_) => {
                fail(
                    &session,
                    &p,
                    &ctx,
                    &target,
                    LocalFail::Timeout,
                    "connect timed out",
                );
                return;
            }
        };
    let _ = local.set_nodelay(true);
    let pair = (|| -> std::io::Result<(OwnedFd, OwnedFd)> {
        let a = session.into_std()?;
        let b = local.into_std()?;
        let _ = socket2::SockRef::from(&a).set_keepalive(true);
        let _ = socket2::SockRef::from(&b).set_keepalive(true);
        Ok((OwnedFd::from(a), OwnedFd::from(b)))
    })();
    let Ok((a, b)) = pair else {
        ctx.stats.local_failed(LocalFail::EngineRefused);
        return;
    };
    let tag = ctx.stats.splices.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = ctx.splicer.add(a, b, tag) {
        ctx.stats.local_failed(LocalFail::EngineRefused);
        p.fail_log.note(
            &p.name,
            &target,
            LocalFail::EngineRefused,
            &e.to_string(),
            ctx.local.failure_log_interval,
        );
    }
}

/// Counts, logs (throttled) and resets the session so the relay closes the public client now.
fn fail(
    session: &TcpStream,
    p: &PoolParams,
    ctx: &PoolCtx,
    target: &str,
    reason: LocalFail,
    error: &str,
) {
    ctx.stats.local_failed(reason);
    p.fail_log.note(
        &p.name,
        target,
        reason,
        error,
        ctx.local.failure_log_interval,
    );
    // RST instead of FIN: the relay's splice sees an error and closes both sides at once,
    // rather than half-closing towards the client and waiting for it.
    let _ = socket2::SockRef::from(session).set_linger(Some(Duration::ZERO));
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
                "refused",
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
            "refused",
            Duration::ZERO,
        );
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 0);
    }
}
