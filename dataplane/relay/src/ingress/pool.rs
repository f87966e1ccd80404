//! Per-lease ready queues of authenticated idle reverse sessions.
//!
//! - FIFO, at most `ready_queue_max` idle sessions per lease; an extra one is closed (counted).
//! - A claim takes the oldest LIVE session (a session the agent has closed is discarded on the
//!   way, counted); with none idle it waits up to the claim timeout for the next one offered.
//! - Keep-alive: [`SessionPool::keepalive`] writes `0x00` to every session idle for the
//!   keep-alive interval. Sessions are owned by the pool while idle and by exactly one claimer
//!   after, so a keep-alive byte can never interleave with a marker.
//!
//! The lock is a plain mutex held for queue operations and non-blocking one-byte writes only;
//! no await, no blocking I/O under it.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outrelay_proto::reverse::{LeaseId, Marker};
use tokio::sync::oneshot;

use super::stats::{Drop, IngressStats};

/// An authenticated reverse session waiting to be claimed.
#[derive(Debug)]
pub struct IdleSession {
    /// The agent's TCP connection (non-blocking).
    pub stream: TcpStream,
    /// When the last keep-alive (or the handshake) was written.
    pub last_write: Instant,
}

#[derive(Default)]
struct LeaseQueue {
    idle: VecDeque<IdleSession>,
    waiters: VecDeque<oneshot::Sender<IdleSession>>,
}

/// Every lease's queue.
pub struct SessionPool {
    queues: Mutex<HashMap<LeaseId, LeaseQueue>>,
    ready_queue_max: usize,
    waiters_max: usize,
}

impl SessionPool {
    /// A pool keeping at most `ready_queue_max` idle sessions and `waiters_max` waiting claims
    /// per lease.
    pub fn new(ready_queue_max: usize, waiters_max: usize) -> SessionPool {
        SessionPool {
            queues: Mutex::new(HashMap::new()),
            ready_queue_max,
            waiters_max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, LeaseQueue>> {
        // A panic while holding the lock leaves plain queues behind, still consistent.
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Offers a freshly authenticated session: handed straight to a waiting claim, queued, or
    /// closed when the queue is full.
    pub fn offer(&self, lease: LeaseId, session: IdleSession, stats: &IngressStats) {
        let mut queues = self.lock();
        let queue = queues.entry(lease).or_default();
        let mut session = session;
        while let Some(waiter) = queue.waiters.pop_front() {
            match waiter.send(session) {
                Ok(()) => return,
                Err(back) => session = back, // that claim gave up; try the next
            }
        }
        if queue.idle.len() >= self.ready_queue_max {
            stats.drop(Drop::ReadyQueueFull);
            return; // dropped: closed
        }
        queue.idle.push_back(session);
    }

    /// Takes the oldest live idle session of `lease`, waiting up to `timeout` for one.
    pub async fn claim(
        &self,
        lease: LeaseId,
        timeout: Duration,
        stats: &IngressStats,
    ) -> Option<IdleSession> {
        let rx = {
            let mut queues = self.lock();
            let queue = queues.entry(lease).or_default();
            while let Some(session) = queue.idle.pop_front() {
                if is_alive(&session.stream) {
                    return Some(session);
                }
                stats.drop(Drop::DeadSession);
            }
            if queue.waiters.len() >= self.waiters_max {
                stats.drop(Drop::ClaimWaitersFull);
                return None;
            }
            let (tx, rx) = oneshot::channel();
            queue.waiters.push_back(tx);
            rx
        };
        let mut rx = rx;
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(session)) => Some(session),
            _ => {
                // An offer may have raced the timeout: close the slot, and use a session
                // that arrived in between rather than dropping it.
                rx.close();
                if let Ok(session) = rx.try_recv() {
                    return Some(session);
                }
                stats.drop(Drop::ClaimTimeout);
                None
            }
        }
    }

    /// Writes a keep-alive to every session idle for at least `interval`; drops the sessions
    /// that cannot take it at once or whose agent has gone. Also forgets queues of leases that
    /// `is_live` says are gone (their sessions are closed).
    pub fn keepalive(
        &self,
        now: Instant,
        interval: Duration,
        is_live: impl Fn(&LeaseId) -> bool,
        stats: &IngressStats,
    ) {
        let mut queues = self.lock();
        queues.retain(|lease, queue| {
            if !is_live(lease) {
                for _ in queue.idle.drain(..) {
                    stats.drop(Drop::LeaseGone);
                }
                queue.waiters.clear();
                return false;
            }
            queue.idle.retain_mut(|s| {
                if now.saturating_duration_since(s.last_write) < interval {
                    return true;
                }
                let ok = is_alive(&s.stream) && write_byte_now(&s.stream, Marker::KeepAlive as u8);
                if ok {
                    s.last_write = now;
                } else {
                    stats.drop(Drop::KeepaliveFailed);
                }
                ok
            });
            queue.waiters.retain(|w| !w.is_closed());
            !queue.idle.is_empty() || !queue.waiters.is_empty()
        });
    }

    /// Idle sessions of a lease (for the admin socket and tests).
    pub fn idle_count(&self, lease: &LeaseId) -> usize {
        self.lock().get(lease).map_or(0, |q| q.idle.len())
    }
}

/// False when the agent has closed or reset the session (EOF or an error on a peek).
fn is_alive(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte) {
        Ok(0) => false,
        // An agent never sends on an idle session; a byte here is a protocol error.
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::WouldBlock,
    }
}

/// Writes one byte without blocking; true when it was written.
pub(crate) fn write_byte_now(mut stream: &TcpStream, byte: u8) -> bool {
    use std::io::Write;
    matches!(stream.write(&[byte]), Ok(1))
}
