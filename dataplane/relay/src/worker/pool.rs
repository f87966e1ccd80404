//! Reverse sessions on one worker, and the board the workers share to find each other's.
//!
//! - Each worker keeps its own idle sessions per lease (FIFO, at most `ready_queue_max` per
//!   lease on this worker; an extra one is closed, `ready_queue_full`) and its own waiting
//!   claims per lease (FIFO, `claim_waiters_max` spread over the workers).
//! - A session is owned by exactly one worker at a time (idle in its pool, then by the claim
//!   that takes it): a keep-alive byte can never interleave with a marker.
//! - The [`Board`] holds, per lease bucket and per worker, how many sessions sit idle and how
//!   many claims wait: a claim with nothing idle at home asks a worker that has some (a steal,
//!   answered by handing the socket over through that worker's inbox), and a worker that
//!   authenticates a session nobody at home waits for hands it to a worker whose claims wait.
//!   Buckets are hashed lease ids: a collision only causes a wasted request, never a wrong
//!   session (the receiver checks the lease).

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use outrelay_proto::reverse::{LeaseId, Marker};

/// An authenticated reverse session waiting to be claimed.
#[derive(Debug)]
pub(crate) struct IdleSession {
    /// The agent's TCP connection (non-blocking).
    pub(crate) stream: TcpStream,
    /// When the last keep-alive (or the handshake) was written.
    pub(crate) last_write: Instant,
}

/// Lease buckets of the board.
const BUCKETS: usize = 1024;

/// Idle sessions and waiting claims per lease bucket and worker, shared by the workers
/// (relaxed atomics: hints, checked by whoever acts on them).
#[derive(Debug)]
pub(crate) struct Board {
    workers: usize,
    idle: Box<[AtomicU32]>,
    waiting: Box<[AtomicU32]>,
}

impl Board {
    pub(crate) fn new(workers: usize) -> Board {
        let workers = workers.max(1);
        let cells = || (0..BUCKETS * workers).map(|_| AtomicU32::new(0)).collect();
        Board {
            workers,
            idle: cells(),
            waiting: cells(),
        }
    }

    fn cell(&self, lease: &LeaseId, worker: usize) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in lease.0 {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let bucket = usize::try_from(h % BUCKETS as u64).unwrap_or(0);
        bucket * self.workers + worker.min(self.workers - 1)
    }

    fn add(cells: &[AtomicU32], i: usize, delta: i32) {
        if let Some(c) = cells.get(i) {
            if delta >= 0 {
                c.fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
            } else {
                let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(delta.unsigned_abs()))
                });
            }
        }
    }

    pub(crate) fn idle_changed(&self, lease: &LeaseId, worker: usize, delta: i32) {
        Board::add(&self.idle, self.cell(lease, worker), delta);
    }

    pub(crate) fn waiting_changed(&self, lease: &LeaseId, worker: usize, delta: i32) {
        Board::add(&self.waiting, self.cell(lease, worker), delta);
    }

    /// Another worker than `me` that has idle sessions in `lease`'s bucket (the next after
    /// `me` first).
    pub(crate) fn worker_with_idle(&self, lease: &LeaseId, me: usize) -> Option<usize> {
        self.find(&self.idle, lease, me)
    }

    /// Another worker than `me` with claims waiting in `lease`'s bucket.
    pub(crate) fn worker_waiting(&self, lease: &LeaseId, me: usize) -> Option<usize> {
        self.find(&self.waiting, lease, me)
    }

    fn find(&self, cells: &[AtomicU32], lease: &LeaseId, me: usize) -> Option<usize> {
        (1..self.workers)
            .map(|i| (me + i) % self.workers)
            .find(|&w| {
                cells
                    .get(self.cell(lease, w))
                    .is_some_and(|c| c.load(Ordering::Relaxed) > 0)
            })
    }
}

#[derive(Debug, Default)]
struct LeaseQueue {
    idle: VecDeque<IdleSession>,
    /// Keys of waiting connections, oldest first (a key whose connection has gone is skipped).
    waiters: VecDeque<u64>,
    /// Live waiters (the queue may hold stale keys too).
    waiting: usize,
}

/// One worker's idle sessions and waiting claims.
#[derive(Debug, Default)]
pub(crate) struct LocalPool {
    queues: HashMap<LeaseId, LeaseQueue>,
    /// Idle sessions changed since the census was last published.
    pub(crate) dirty: bool,
}

impl LocalPool {
    /// Takes the oldest idle session of `lease` that is still open; `dead` counts those found
    /// closed by the agent on the way.
    pub(crate) fn take_idle(&mut self, lease: &LeaseId, dead: &mut u64) -> Option<IdleSession> {
        let queue = self.queues.get_mut(lease)?;
        while let Some(session) = queue.idle.pop_front() {
            self.dirty = true;
            if is_alive(&session.stream) {
                return Some(session);
            }
            *dead += 1;
        }
        None
    }

    /// Queues an idle session unless `max` are idle for the lease (then it is handed back).
    pub(crate) fn park(
        &mut self,
        lease: LeaseId,
        session: IdleSession,
        max: usize,
    ) -> Result<(), IdleSession> {
        let queue = self.queues.entry(lease).or_default();
        if queue.idle.len() >= max {
            return Err(session);
        }
        queue.idle.push_back(session);
        self.dirty = true;
        Ok(())
    }

    /// Puts a session back at the front (a hand-off that could not be sent).
    pub(crate) fn unpark(&mut self, lease: LeaseId, session: IdleSession) {
        self.queues
            .entry(lease)
            .or_default()
            .idle
            .push_front(session);
        self.dirty = true;
    }

    /// Live waiters of `lease` on this worker.
    pub(crate) fn waiting(&self, lease: &LeaseId) -> usize {
        self.queues.get(lease).map_or(0, |q| q.waiting)
    }

    pub(crate) fn add_waiter(&mut self, lease: LeaseId, key: u64) {
        let queue = self.queues.entry(lease).or_default();
        queue.waiters.push_back(key);
        queue.waiting += 1;
    }

    /// The oldest waiter key of `lease` (may be stale: the caller checks and calls
    /// [`LocalPool::waiter_left`] for live ones it serves).
    pub(crate) fn pop_waiter(&mut self, lease: &LeaseId) -> Option<u64> {
        self.queues.get_mut(lease)?.waiters.pop_front()
    }

    /// A live waiter of `lease` was served, timed out or closed.
    pub(crate) fn waiter_left(&mut self, lease: &LeaseId) {
        if let Some(q) = self.queues.get_mut(lease) {
            q.waiting = q.waiting.saturating_sub(1);
        }
    }

    /// Writes the idle sessions per lease into `census` (what the admin socket reads); the
    /// map keeps its capacity.
    pub(crate) fn census(&self, census: &mut HashMap<LeaseId, usize>) {
        census.clear();
        census.extend(
            self.queues
                .iter()
                .filter(|(_, q)| !q.idle.is_empty())
                .map(|(l, q)| (*l, q.idle.len())),
        );
    }

    /// Keep-alive round: writes `0x00` to every session idle for `interval`, drops those that
    /// cannot take it or whose agent has gone, and empties queues of leases `is_live` says
    /// are gone. Returns the leases whose idle count changed by how much, and counts of
    /// (keep-alive failures, sessions of gone leases); `gone_waiters` gets the waiter keys of
    /// gone leases.
    pub(crate) fn keepalive(
        &mut self,
        now: Instant,
        interval: Duration,
        is_live: impl Fn(&LeaseId) -> bool,
        changed: &mut Vec<(LeaseId, i32)>,
        gone_waiters: &mut Vec<u64>,
    ) -> (u64, u64) {
        let (mut failed, mut gone) = (0u64, 0u64);
        self.queues.retain(|lease, queue| {
            if !is_live(lease) {
                let n = queue.idle.len();
                gone += n as u64;
                if n > 0 {
                    changed.push((*lease, -i32::try_from(n).unwrap_or(i32::MAX)));
                }
                gone_waiters.extend(queue.waiters.drain(..));
                return false;
            }
            let before = queue.idle.len();
            queue.idle.retain_mut(|s| {
                if now.saturating_duration_since(s.last_write) < interval {
                    return true;
                }
                let ok = is_alive(&s.stream) && write_byte_now(&s.stream, Marker::KeepAlive as u8);
                if ok {
                    s.last_write = now;
                } else {
                    failed += 1;
                }
                ok
            });
            let lost = before - queue.idle.len();
            if lost > 0 {
                changed.push((*lease, -i32::try_from(lost).unwrap_or(i32::MAX)));
            }
            // Drop stale waiter keys once they outnumber the live ones.
            if queue.waiters.len() > 2 * queue.waiting + 16 {
                let keep = queue.waiting;
                let skip = queue.waiters.len() - keep;
                queue.waiters.drain(..skip.min(queue.waiters.len()));
            }
            !queue.idle.is_empty() || queue.waiting > 0
        });
        if !changed.is_empty() {
            self.dirty = true;
        }
        (failed, gone)
    }
}

/// False when the agent has closed or reset the session (EOF or an error on a peek), or sent
/// a byte (an agent never sends on an idle session).
fn is_alive(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte) {
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::WouldBlock,
    }
}

/// Writes one byte without blocking; true when it was written.
fn write_byte_now(mut stream: &TcpStream, byte: u8) -> bool {
    use std::io::Write;
    matches!(stream.write(&[byte]), Ok(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_board_points_at_another_worker_only() {
        let board = Board::new(3);
        let lease = LeaseId([7; 16]);
        assert_eq!(board.worker_with_idle(&lease, 0), None);
        board.idle_changed(&lease, 0, 1);
        assert_eq!(board.worker_with_idle(&lease, 0), None, "not itself");
        assert_eq!(board.worker_with_idle(&lease, 1), Some(0));
        board.idle_changed(&lease, 2, 2);
        assert_eq!(
            board.worker_with_idle(&lease, 1),
            Some(2),
            "the next after me first"
        );
        board.idle_changed(&lease, 2, -5);
        assert_eq!(
            board.worker_with_idle(&lease, 1),
            Some(0),
            "saturates at zero"
        );
        board.waiting_changed(&lease, 1, 1);
        assert_eq!(board.worker_waiting(&lease, 0), Some(1));
    }
}
