//! The splice engine: joins pairs of connected sockets and moves bytes between them in the
//! kernel (socket → pipe → socket), both ways, until both directions have ended.
//!
//! One engine per worker thread; nothing in it is shared, so nothing is locked. Other threads
//! hand it pairs through an [`EngineHandle`] (a bounded queue plus an eventfd wake-up).
//!
//! Per direction the engine calls non-blocking `splice(2)` inline until the kernel says
//! `EAGAIN`, then arms one-shot readiness for exactly what it is waiting for (source readable,
//! destination writable) and moves on. Half-close is preserved: when a source reaches EOF and
//! its pipe has drained, the engine shuts down the write side of the destination, and the
//! other direction keeps flowing until it ends too.
//!
//! A reader that stops reading must not pin the pipe budget (review H1): a direction whose
//! destination answered `EAGAIN` with bytes in flight is *stalled* until the destination takes
//! a byte. Pipes grow only when the destination has just drained them. A direction stalled for
//! `stall_timeout` gives its pipe (or copy buffer) back: its bytes move to a spill buffer
//! (within the spill budget) and it reads nothing more from its source until they are written. A direction that
//! holds bytes for a destination stalled for `write_stall_timeout` closes its pair
//! ([`CloseReason::WriteStall`]). When the pipe budget is spent, a direction with data moves it
//! through a small user-space copy buffer instead of waiting; only when that budget is spent too
//! does it wait for a pipe (FIFO). All timers are checked in the engine's sweep.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{SpliceFFlags, splice};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{Shutdown, shutdown};

use crate::buffer::{Buf, BufKind, BufferLimits, BufferPool, BufferStats};
use crate::pipe::{Pipe, PipeLimits, PipePool, PipeStats};
use crate::poller::{Backend, INTEREST_BITS, Interest, Poller, WAKE_TOKEN};
use crate::rate::{self, Bucket};

/// The token buckets one direction of a pair is held to: up to two (the relay: a lease's and
/// its tenant's). Every read from the source is capped to the tokens all of them grant.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// The buckets (`None`: no limit from that scope).
    pub buckets: [Option<Arc<Bucket>>; 2],
}

impl Limits {
    /// Held to `buckets` (either may be `None`).
    pub fn new(first: Option<Arc<Bucket>>, second: Option<Arc<Bucket>>) -> Limits {
        Limits {
            buckets: [first, second],
        }
    }

    /// Whether any bucket is attached (its rate may still be 0 = unlimited, live).
    pub fn is_limited(&self) -> bool {
        self.buckets[0].is_some() || self.buckets[1].is_some()
    }

    fn available(&self, now_ns: u64) -> u64 {
        self.buckets
            .iter()
            .flatten()
            .map(|b| b.available(now_ns))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The chunk a direction out of tokens reserves: the smallest [`Bucket::chunk_bytes`] of
    /// its limited buckets (0: none limited now).
    fn chunk_bytes(&self) -> u64 {
        self.buckets
            .iter()
            .flatten()
            .filter(|b| b.rate_bytes_per_s() > 0)
            .map(|b| b.chunk_bytes())
            .min()
            .unwrap_or(0)
    }

    /// Bytes the direction may read now: all its buckets grant, or 0 when that is less than
    /// one chunk. A sliver is not read: each read is a system call, and a direction that
    /// read every few bytes its bucket refilled would spend the engine on tiny splices. It
    /// reserves a whole chunk instead (the tokens it leaves are part of that chunk).
    fn grant(&self, now_ns: u64) -> u64 {
        let available = self.available(now_ns);
        if available < self.chunk_bytes() {
            0
        } else {
            available
        }
    }

    fn consume(&self, bytes: usize, now_ns: u64) {
        for b in self.buckets.iter().flatten() {
            b.consume(bytes as u64, now_ns);
        }
    }
}

/// Settings of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Readiness backend.
    pub backend: Backend,
    /// Pipe pool limits.
    pub pipes: PipeLimits,
    /// Copy-path and spill budgets.
    pub buffers: BufferLimits,
    /// Most pairs spliced at once; [`Engine::add`] refuses more.
    pub max_pairs: usize,
    /// Capacity of the queue other threads hand pairs through.
    pub inbox_max: usize,
    /// A pair with no byte moved for this long is closed.
    pub idle_timeout: Duration,
    /// A pair whose one direction has ended is closed once no byte moved for this long.
    pub half_closed_timeout: Duration,
    /// A direction whose destination took no byte for this long, with bytes in its pipe,
    /// gives the pipe back (its bytes move to a spill buffer).
    pub stall_timeout: Duration,
    /// A pair holding bytes for a destination that took no byte for this long is closed
    /// ([`CloseReason::WriteStall`]).
    pub write_stall_timeout: Duration,
    /// How often timeouts are checked.
    pub sweep_interval: Duration,
    /// Bytes one direction may move before the engine serves others (fairness).
    pub pump_budget_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            backend: Backend::auto(),
            pipes: PipeLimits::default(),
            buffers: BufferLimits::default(),
            max_pairs: 16_384,
            inbox_max: 1024,
            idle_timeout: Duration::from_secs(3600),
            half_closed_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(2),
            write_stall_timeout: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(1),
            pump_budget_bytes: 4 * 1024 * 1024,
        }
    }
}

impl EngineConfig {
    /// Checks what an operator sets (the `[splice]` keys of the relay and the agent).
    ///
    /// # Errors
    /// The config key (without its table) and why it is refused.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        for (key, d) in [
            ("idle_timeout_ms", self.idle_timeout),
            ("half_closed_timeout_ms", self.half_closed_timeout),
            ("stall_timeout_ms", self.stall_timeout),
            ("write_stall_timeout_ms", self.write_stall_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err((key, "must be at least 100 ms"));
            }
        }
        if self.stall_timeout >= self.write_stall_timeout {
            // A stalled pipe must be given back before its pair is cut, or it never is.
            return Err(("stall_timeout_ms", "must be below write_stall_timeout_ms"));
        }
        let b = &self.buffers;
        if !(4096..=1024 * 1024).contains(&b.copy_buffer_bytes) {
            return Err(("copy_buffer_bytes", "must be 4096..=1048576"));
        }
        if b.copy_budget_bytes != 0 && b.copy_budget_bytes < b.copy_buffer_bytes {
            return Err((
                "copy_budget_bytes",
                "must be 0 (no copy path) or at least copy_buffer_bytes",
            ));
        }
        if self.pipes.budget_bytes < crate::pipe::DEFAULT_PIPE_BYTES {
            return Err(("pipe_budget_bytes", "must be at least 65536"));
        }
        Ok(())
    }

    /// This config with its budgets (pipes, copy, spill) split evenly across `workers`
    /// engines: budgets are per process (the kernel's pipe limit is per user), engines are
    /// per thread. Each engine keeps room for at least one pipe and one copy buffer.
    pub fn per_worker(&self, workers: usize) -> EngineConfig {
        let n = workers.max(1);
        let mut c = self.clone();
        c.pipes.budget_bytes = (c.pipes.budget_bytes / n).max(crate::pipe::DEFAULT_PIPE_BYTES);
        if c.buffers.copy_budget_bytes > 0 {
            c.buffers.copy_budget_bytes =
                (c.buffers.copy_budget_bytes / n).max(c.buffers.copy_buffer_bytes);
        }
        c.buffers.spill_budget_bytes /= n;
        c
    }
}

/// Why a pair was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions ended with a FIN.
    Completed,
    /// A socket reported an error (reset, broken pipe).
    Error(Errno),
    /// No byte moved for `idle_timeout`.
    IdleTimeout,
    /// One direction ended and no byte moved for `half_closed_timeout` since.
    HalfClosedTimeout,
    /// The engine was shut down.
    Shutdown,
    /// A destination took no byte for `write_stall_timeout` while the pair held bytes for it.
    WriteStall,
    /// Handed over through [`EngineHandle::add`] but refused when the engine took it from its
    /// inbox (`max_pairs` reached); never spliced. Reported so the caller can give back what
    /// it reserved for the pair; counted in `pairs_refused`, not in `closed`.
    Refused,
    /// The owner closed it ([`Engine::close_where`]): it no longer allows the pair (the
    /// relay: its lease was banned or its agent revoked).
    Cut,
}

impl CloseReason {
    /// A metric label.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::Completed => "completed",
            CloseReason::Error(_) => "error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HalfClosedTimeout => "half_closed_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Refused => "refused",
            CloseReason::WriteStall => "write_stall",
            CloseReason::Cut => "cut",
        }
    }
}

/// The label of each [`EngineStats::closed`] counter, in order.
pub const CLOSED_LABELS: [&str; 7] = [
    "completed",
    "error",
    "idle_timeout",
    "half_closed_timeout",
    "shutdown",
    "write_stall",
    "cut",
];

/// A pair the engine is done with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// The caller's tag for the pair.
    pub tag: u64,
    /// Bytes moved a → b and b → a.
    pub bytes: [u64; 2],
    /// Why it ended.
    pub reason: CloseReason,
}

/// Why a pair was not taken.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The engine already splices `max_pairs` pairs (or its inbox is full).
    #[error("splice engine full")]
    Full,
    /// The engine is gone.
    #[error("splice engine stopped")]
    Stopped,
    /// A socket could not be made non-blocking.
    #[error("socket setup failed: {0}")]
    Socket(#[from] Errno),
}

/// Engine counters, read by the owner for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EngineStats {
    /// Pairs being spliced now.
    pub pairs_active: usize,
    /// Pairs ever added.
    pub pairs_added: u64,
    /// Pairs refused because the engine was full.
    pub pairs_refused: u64,
    /// Bytes moved, all pairs, both directions.
    pub bytes: u64,
    /// `splice(2)` calls made.
    pub splice_calls: u64,
    /// Pairs closed, by reason (labels in [`CLOSED_LABELS`]).
    pub closed: [u64; 7],
    /// Times a direction waited for a pipe (pipe and copy budgets both spent).
    pub pipe_waits: u64,
    /// Stalled directions that gave their pipe back (bytes moved to a spill buffer).
    pub spills: u64,
    /// Stalled directions that kept their pipe because the spill budget was spent (once per
    /// stall).
    pub spill_refusals: u64,
    /// The pipe pool's counters.
    pub pipes: PipeStats,
    /// The copy-path and spill buffers' counters.
    pub buffers: BufferStats,
    /// Times a limited direction waited for tokens ([`Engine::add_limited`]).
    pub throttles: u64,
}

impl EngineStats {
    /// Adds `other`'s counters and gauges to these (one total over several engines).
    pub fn accumulate(&mut self, other: &EngineStats) {
        self.pairs_active += other.pairs_active;
        self.pairs_added += other.pairs_added;
        self.pairs_refused += other.pairs_refused;
        self.bytes += other.bytes;
        self.splice_calls += other.splice_calls;
        for (t, c) in self.closed.iter_mut().zip(other.closed) {
            *t += c;
        }
        self.pipe_waits += other.pipe_waits;
        self.spills += other.spills;
        self.spill_refusals += other.spill_refusals;
        self.throttles += other.throttles;
        let (p, q) = (&mut self.pipes, &other.pipes);
        p.created += q.created;
        p.grown += q.grown;
        p.budget_refusals += q.budget_refusals;
        p.kernel_refusals += q.kernel_refusals;
        p.held_bytes += q.held_bytes;
        let (b, c) = (&mut self.buffers, &other.buffers);
        b.copy_held_bytes += c.copy_held_bytes;
        b.copy_active += c.copy_active;
        b.copy_taken += c.copy_taken;
        b.copy_refusals += c.copy_refusals;
        b.spill_held_bytes += c.spill_held_bytes;
    }
}

/// A pair handed over from another thread.
struct NewPair {
    a: OwnedFd,
    b: OwnedFd,
    tag: u64,
    limits: [Limits; 2],
}

/// Hands pairs to an engine running on another thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<NewPair>,
    wake: Arc<EventFd>,
}

impl EngineHandle {
    /// Queues a pair; the sockets must be connected TCP (or Unix stream) sockets.
    ///
    /// # Errors
    /// [`AddError::Full`] when the inbox is full (counted by the caller), [`AddError::Stopped`]
    /// when the engine has exited.
    pub fn add(&self, a: OwnedFd, b: OwnedFd, tag: u64) -> Result<(), AddError> {
        self.add_limited(a, b, tag, [Limits::default(), Limits::default()])
    }

    /// [`EngineHandle::add`] for a pair held to token buckets ([`Engine::add_limited`]).
    ///
    /// # Errors
    /// As [`EngineHandle::add`].
    pub fn add_limited(
        &self,
        a: OwnedFd,
        b: OwnedFd,
        tag: u64,
        limits: [Limits; 2],
    ) -> Result<(), AddError> {
        match self.tx.try_send(NewPair { a, b, tag, limits }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(AddError::Full),
            Err(TrySendError::Disconnected(_)) => return Err(AddError::Stopped),
        }
        self.wake()
    }

    /// Wakes the engine (to add queued pairs, or to notice a stop request).
    ///
    /// # Errors
    /// [`AddError::Stopped`] if the wake-up cannot be written.
    pub fn wake(&self) -> Result<(), AddError> {
        self.wake
            .write(1)
            .map(|_| ())
            .map_err(|_| AddError::Stopped)
    }
}

/// One direction of a pair: bytes from `fds[i]` to `fds[1 - i]`.
///
/// Its bytes in flight are in at most one place: the pipe (`in_pipe`) or the user-space
/// buffer (`buf`: a copy-path buffer, or the spill of a pipe it gave back).
#[derive(Debug, Default)]
struct Direction {
    pipe: Option<Pipe>,
    in_pipe: usize,
    buf: Option<Buf>,
    src_eof: bool,
    finished: bool,
    waiting_pipe: bool,
    /// Since when the destination has refused bytes (`EAGAIN`) while this direction held
    /// some; `None` once it takes a byte.
    stalled_since: Option<Instant>,
    /// The spill budget refused this stall (counted once per stall).
    spill_refused: bool,
    bytes: u64,
    /// The buckets this direction is held to ([`Engine::add_limited`]).
    limits: Limits,
    /// Out of tokens: not pumped before this (an entry in the engine's throttle queue).
    throttled_until: Option<Instant>,
    /// When it ran out of tokens, and which buckets it waits for (bit per bucket).
    throttled_since: Option<Instant>,
    throttled_by: u8,
    /// Bytes reserved (charged) from its buckets while throttled, read before taking more.
    credit: u64,
}

/// What a direction needs next.
enum Pump {
    /// Blocked: arm these.
    Wait { read: bool, write: bool },
    /// Moved its budget; serve others, then come back.
    Yield,
    /// No pipe and no copy buffer available within the budgets.
    NeedPipe,
    /// EOF forwarded; this direction is over.
    Finished,
    /// Out of tokens (a limited direction); `write`: also arm the destination.
    Throttled { write: bool },
}

/// What [`Direction::pump`] borrows from the engine.
struct PumpCx<'a> {
    pool: &'a mut PipePool,
    bufs: &'a mut BufferPool,
    budget_bytes: usize,
    others_waiting: bool,
    splice_calls: &'a mut u64,
    now: Instant,
}

impl Direction {
    /// Whether bytes read from the source wait for the destination.
    fn holds_bytes(&self) -> bool {
        self.in_pipe > 0 || self.buf.as_ref().is_some_and(|b| !b.is_empty())
    }

    fn pump(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        cx: &mut PumpCx<'_>,
    ) -> Result<Pump, Errno> {
        use nix::sys::socket::{MsgFlags, recv, send};
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        let mut moved = 0usize;
        let limited = self.limits.is_limited();
        let now_ns = if limited { rate::clock_ns(cx.now) } else { 0 };
        loop {
            let mut progressed = false;
            let mut read_blocked = false;
            let mut write_blocked = false;
            // The pipe was filled (bytes, or all its buffer slots) by this round's read.
            let mut filled = false;
            // A limited direction reads at most what its buckets grant (zero copy stays: the
            // splice into the pipe is only shorter). Unlimited directions pay this branch.
            let grant = if limited && !self.src_eof {
                let tokens = if self.credit > 0 {
                    self.credit
                } else {
                    self.limits.grant(now_ns)
                };
                usize::try_from(tokens).unwrap_or(usize::MAX)
            } else {
                usize::MAX
            };
            let throttled = grant == 0;
            if !self.src_eof && !throttled && self.pipe.is_none() && self.buf.is_none() {
                // Idle directions hold no pipe: look before taking one. When others already
                // wait for a pipe, queue behind them (FIFO) instead of overtaking them. With
                // the pipe budget spent, copy through a small buffer rather than wait.
                match peek(src) {
                    Ok(Peeked::Data) if cx.others_waiting => return Ok(Pump::NeedPipe),
                    Ok(Peeked::Data) => {
                        if let Some(pipe) = cx.pool.acquire() {
                            self.pipe = Some(pipe);
                        } else if let Some(buf) = cx.bufs.acquire_copy() {
                            self.buf = Some(buf);
                        } else {
                            return Ok(Pump::NeedPipe);
                        }
                    }
                    Ok(Peeked::Eof) => {
                        self.src_eof = true;
                        progressed = true;
                    }
                    Ok(Peeked::Empty) => read_blocked = true,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e),
                }
            }
            if !self.src_eof {
                if let Some(pipe) = self.pipe.as_mut() {
                    let room = pipe.capacity_bytes() - self.in_pipe;
                    if room > 0 && !throttled {
                        *cx.splice_calls += 1;
                        match splice(src, None, pipe.write_end(), None, room.min(grant), flags) {
                            Ok(0) => {
                                self.src_eof = true;
                                progressed = true;
                            }
                            Ok(n) => {
                                if limited {
                                    charge(&mut self.credit, &self.limits, n, now_ns);
                                }
                                self.in_pipe += n;
                                progressed = true;
                                filled = self.in_pipe == pipe.capacity_bytes();
                            }
                            // EAGAIN with bytes in flight may mean the PIPE ran out of buffer
                            // slots (one per TCP fragment, 16 by default) rather than the
                            // socket being empty: wait for the drain, which retries the read
                            // when it makes progress, instead of arming a read that would fire
                            // at once. A pipe that fills by slots is a bulk flow.
                            Err(Errno::EAGAIN) if self.in_pipe > 0 => filled = true,
                            Err(Errno::EAGAIN) => read_blocked = true,
                            Err(Errno::EINTR) => continue,
                            Err(e) => return Err(e),
                        }
                    }
                } else if let Some(buf) = self
                    .buf
                    .as_mut()
                    .filter(|b| b.kind() == BufKind::Copy && b.is_empty() && !throttled)
                {
                    // The copy path reads only into an empty buffer: while it holds unwritten
                    // bytes the rest waits in the source socket. A spill is never refilled.
                    let space = buf.space();
                    let len = space.len().min(grant);
                    match recv(src.as_fd_raw(), &mut space[..len], MsgFlags::MSG_DONTWAIT) {
                        Ok(0) => {
                            self.src_eof = true;
                            progressed = true;
                        }
                        Ok(n) => {
                            if limited {
                                charge(&mut self.credit, &self.limits, n, now_ns);
                            }
                            buf.filled(n);
                            progressed = true;
                        }
                        Err(Errno::EAGAIN) => read_blocked = true,
                        Err(Errno::EINTR) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
            let wrote = if self.in_pipe > 0 {
                let Some(pipe) = self.pipe.as_ref() else {
                    return Err(Errno::EINVAL); // unreachable: bytes in flight imply a pipe
                };
                *cx.splice_calls += 1;
                match splice(pipe.read_end(), None, dst, None, self.in_pipe, flags) {
                    Ok(0) | Err(Errno::EAGAIN) => None,
                    Ok(n) => {
                        self.in_pipe -= n;
                        Some(n)
                    }
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e),
                }
            } else if let Some(buf) = self.buf.as_mut().filter(|b| !b.is_empty()) {
                let out = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
                match send(dst.as_fd_raw(), buf.pending(), out) {
                    Ok(0) | Err(Errno::EAGAIN) => None,
                    Ok(n) => {
                        buf.consume(n);
                        Some(n)
                    }
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e),
                }
            } else {
                Some(0)
            };
            match wrote {
                Some(0) => {}
                Some(n) => {
                    self.bytes += n as u64;
                    moved += n;
                    progressed = true;
                    self.stalled_since = None;
                    self.spill_refused = false;
                }
                None => {
                    write_blocked = true;
                    if self.stalled_since.is_none() {
                        self.stalled_since = Some(cx.now);
                    }
                }
            }
            if filled && self.in_pipe == 0 && !cx.others_waiting {
                // A bulk flow whose destination drained the full pipe at once: give it a
                // bigger pipe, budget permitting. Never toward a destination that refused
                // bytes (the pipe would only pin more), nor while others wait for any pipe.
                if let Some(pipe) = self.pipe.as_mut() {
                    cx.pool.grow(pipe);
                }
            }
            let turn_over = cx.others_waiting && moved >= cx.budget_bytes;
            let at_rest = read_blocked || throttled || self.src_eof || turn_over;
            if self.in_pipe == 0 && at_rest {
                // Nothing in flight: hold no pipe while idle, nor across a yield while others
                // wait for one (the pipe budget is shared round-robin, not held by the first
                // bulk flows for their whole transfer).
                if let Some(pipe) = self.pipe.take() {
                    cx.pool.release(pipe);
                }
            }
            // An empty buffer goes back: a spill at once (the direction splices again), a copy
            // buffer when at rest or as soon as a pipe could be had again.
            let give_back = self.buf.as_ref().is_some_and(|b| {
                b.is_empty() && (b.kind() == BufKind::Spill || at_rest || cx.pool.has_capacity())
            });
            if give_back && let Some(buf) = self.buf.take() {
                cx.bufs.release(buf);
            }
            if self.src_eof && !self.holds_bytes() {
                if let Some(buf) = self.buf.take() {
                    cx.bufs.release(buf);
                }
                match shutdown(dst.as_fd_raw(), Shutdown::Write) {
                    Ok(()) | Err(Errno::ENOTCONN) => {}
                    Err(e) => return Err(e),
                }
                self.finished = true;
                return Ok(Pump::Finished);
            }
            if moved >= cx.budget_bytes {
                return Ok(Pump::Yield);
            }
            if !progressed && throttled {
                return Ok(Pump::Throttled {
                    write: write_blocked,
                });
            }
            if !progressed {
                return Ok(Pump::Wait {
                    read: read_blocked,
                    write: write_blocked,
                });
            }
        }
    }

    /// Gives back the carrier of a stalled direction (its pipe, or its copy buffer): its
    /// bytes move to a spill buffer within the spill budget. Returns whether it spilled
    /// (`false`: nothing held, already a spill, or no budget).
    ///
    /// # Errors
    /// The pipe could not be read back whole (the pair cannot keep its byte order).
    fn spill(&mut self, pool: &mut PipePool, bufs: &mut BufferPool) -> Result<bool, Errno> {
        if let Some(copy) = self.buf.as_ref() {
            if copy.kind() != BufKind::Copy || copy.is_empty() {
                return Ok(false);
            }
            let Some(mut spill) = bufs.acquire_spill(copy.pending().len()) else {
                return Ok(false);
            };
            let n = copy.pending().len();
            spill.space()[..n].copy_from_slice(copy.pending());
            spill.filled(n);
            if let Some(copy) = self.buf.replace(spill) {
                bufs.release(copy);
            }
            return Ok(true);
        }
        let Some(pipe) = self.pipe.as_ref() else {
            return Ok(false);
        };
        if self.in_pipe == 0 {
            return Ok(false);
        }
        let Some(mut buf) = bufs.acquire_spill(self.in_pipe) else {
            return Ok(false);
        };
        let want = self.in_pipe;
        let mut got = 0usize;
        let space = buf.space();
        while got < want {
            match nix::unistd::read(pipe.read_end(), &mut space[got..want]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        buf.filled(got);
        self.in_pipe -= got;
        if got < want {
            bufs.release(buf);
            return Err(Errno::EIO);
        }
        if let Some(pipe) = self.pipe.take() {
            pool.release(pipe);
        }
        self.buf = Some(buf);
        Ok(true)
    }
}

/// Charges `n` bytes read: from the reserved `credit` first, else from the buckets; counts
/// them on every bucket either way.
fn charge(credit: &mut u64, limits: &Limits, n: usize, now_ns: u64) {
    for b in limits.buckets.iter().flatten() {
        b.add_moved_bytes(n as u64);
    }
    if *credit > 0 {
        *credit = credit.saturating_sub(n as u64);
    } else {
        limits.consume(n, now_ns);
    }
}

enum Peeked {
    Data,
    Eof,
    Empty,
}

/// Whether a socket has a byte to read, has reached EOF, or has nothing yet.
fn peek(src: BorrowedFd<'_>) -> Result<Peeked, Errno> {
    use nix::sys::socket::{MsgFlags, recv};
    let mut byte = [0u8; 1];
    match recv(
        src.as_fd_raw(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => Ok(Peeked::Eof),
        Ok(_) => Ok(Peeked::Data),
        Err(Errno::EAGAIN) => Ok(Peeked::Empty),
        Err(e) => Err(e),
    }
}

/// Helpers to keep raw-fd plumbing out of the state machine above.
trait RawFdExt {
    fn as_fd_raw(&self) -> std::os::fd::RawFd;
}

impl RawFdExt for BorrowedFd<'_> {
    fn as_fd_raw(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

struct Pair {
    fds: [OwnedFd; 2],
    armed: [Interest; 2],
    dirs: [Direction; 2],
    tag: u64,
    last_activity: Instant,
    half_closed_since: Option<Instant>,
    queued: bool,
}

struct Slot {
    generation: u32,
    pair: Option<Pair>,
}

const GENERATION_BITS: u32 = 29;
const GENERATION_MASK: u64 = (1 << GENERATION_BITS) - 1;

fn token(index: u32, generation: u32, side: usize) -> u64 {
    (u64::from(index) << 32)
        | ((u64::from(generation) & GENERATION_MASK) << (INTEREST_BITS + 1))
        | ((side as u64 & 1) << INTEREST_BITS)
}

/// Tokens with this bit belong to the owner's own descriptors ([`Engine::arm_user`]); pair
/// tokens never have it (pair indices stay below 2^31). The three reserved tokens (wake-up,
/// cancel, write set) have bit 62 set as well, which a user token never has.
const USER_BIT: u64 = 1 << 63;
/// User keys are below this, so a user token never collides with a reserved token.
pub const USER_KEY_LIMIT: u64 = 1 << 60;
/// Most pair slots (pair tokens must not reach [`USER_BIT`]).
const MAX_SLOTS: usize = 1 << 31;

fn user_token(key: u64) -> u64 {
    USER_BIT | (key << INTEREST_BITS)
}

fn untoken(token: u64) -> (u32, u32, usize) {
    let index = u32::try_from(token >> 32).unwrap_or(u32::MAX);
    let generation = u32::try_from((token >> (INTEREST_BITS + 1)) & GENERATION_MASK).unwrap_or(0);
    let side = usize::from(token & (1 << INTEREST_BITS) != 0);
    (index, generation, side)
}

/// A splice engine (see the module docs). Drive it with [`Engine::run_once`] on one thread.
pub struct Engine {
    config: EngineConfig,
    poller: Poller,
    pool: PipePool,
    bufs: BufferPool,
    slots: Vec<Slot>,
    free: Vec<u32>,
    ready: VecDeque<(u32, u32)>,
    pipe_waiters: VecDeque<(u32, u32)>,
    /// Limited directions out of tokens, by when they are due (index, generation, side).
    throttled: BinaryHeap<Reverse<(Instant, u32, u32, u8)>>,
    stats: EngineStats,
    fired: Vec<u64>,
    inbox: Receiver<NewPair>,
    handle: EngineHandle,
    last_sweep: Option<Instant>,
}

impl Engine {
    /// Creates an engine with the configured backend.
    ///
    /// # Errors
    /// The backend could not be created (for io_uring: the kernel refused a ring).
    pub fn new(config: EngineConfig) -> std::io::Result<Engine> {
        let wake = Arc::new(EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?);
        let entries = u32::try_from(config.max_pairs.clamp(64, 4096)).unwrap_or(4096);
        let poller = Poller::new(config.backend, wake.as_fd(), entries)?;
        let (tx, inbox) = sync_channel(config.inbox_max);
        Ok(Engine {
            pool: PipePool::new(config.pipes),
            bufs: BufferPool::new(config.buffers),
            poller,
            slots: Vec::new(),
            free: Vec::new(),
            ready: VecDeque::new(),
            pipe_waiters: VecDeque::new(),
            throttled: BinaryHeap::new(),
            stats: EngineStats::default(),
            fired: Vec::with_capacity(256),
            inbox,
            handle: EngineHandle { tx, wake },
            last_sweep: None,
            config,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.config.backend
    }

    /// Takes `config`'s four timeouts (idle, half-closed, stall, write stall; validated by the
    /// caller) from the next sweep on, for every pair, established ones included (a relay's
    /// live reload). The budgets stay as built: the pools are sized once.
    pub fn set_timeouts(&mut self, config: &EngineConfig) {
        self.config.idle_timeout = config.idle_timeout;
        self.config.half_closed_timeout = config.half_closed_timeout;
        self.config.stall_timeout = config.stall_timeout;
        self.config.write_stall_timeout = config.write_stall_timeout;
    }

    /// A handle for other threads.
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            pipes: self.pool.stats(),
            buffers: self.bufs.stats(),
            ..self.stats
        }
    }

    /// Starts splicing `a` ⇄ `b` (both made non-blocking here).
    ///
    /// # Errors
    /// [`AddError::Full`] at `max_pairs` (the sockets are closed), or a socket error.
    pub fn add(&mut self, a: OwnedFd, b: OwnedFd, tag: u64, now: Instant) -> Result<(), AddError> {
        self.add_limited(a, b, tag, [Limits::default(), Limits::default()], now)
    }

    /// [`Engine::add`], with each direction (`limits[0]`: a → b, `limits[1]`: b → a) held to
    /// its token buckets: a direction out of tokens arms nothing and waits in the engine's
    /// throttle queue until they are due; the time it waits is added to the empty buckets'
    /// throttled time. A bucket's rate is read on every read, so a change applies at once.
    ///
    /// # Errors
    /// As [`Engine::add`].
    pub fn add_limited(
        &mut self,
        a: OwnedFd,
        b: OwnedFd,
        tag: u64,
        limits: [Limits; 2],
        now: Instant,
    ) -> Result<(), AddError> {
        if self.stats.pairs_active >= self.config.max_pairs {
            self.stats.pairs_refused += 1;
            return Err(AddError::Full);
        }
        for fd in [&a, &b] {
            let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
            let flags = nix::fcntl::OFlag::from_bits_retain(flags);
            if !flags.contains(nix::fcntl::OFlag::O_NONBLOCK) {
                let flags = flags | nix::fcntl::OFlag::O_NONBLOCK;
                nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
            }
        }
        let pair = Pair {
            fds: [a, b],
            armed: [Interest::NONE; 2],
            dirs: limits.map(|limits| Direction {
                limits,
                ..Direction::default()
            }),
            tag,
            last_activity: now,
            half_closed_since: None,
            queued: true,
        };
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.slots.len() >= MAX_SLOTS {
                    self.stats.pairs_refused += 1;
                    return Err(AddError::Full);
                }
                self.slots.push(Slot {
                    generation: 0,
                    pair: None,
                });
                u32::try_from(self.slots.len() - 1).map_err(|_| AddError::Full)?
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.pair = Some(pair);
        self.ready.push_back((index, slot.generation));
        self.stats.pairs_active += 1;
        self.stats.pairs_added += 1;
        Ok(())
    }

    /// Runs one round: waits up to `timeout` for readiness (not at all if work is queued),
    /// serves what fired and what is queued, checks timeouts, and appends pairs that ended to
    /// `finished`. `clock` is read after the wait (tests inject a fake one).
    ///
    /// # Errors
    /// The readiness backend failed (the engine cannot continue).
    pub fn run_once(
        &mut self,
        timeout: Duration,
        clock: &mut dyn FnMut() -> Instant,
        finished: &mut Vec<Finished>,
    ) -> std::io::Result<()> {
        let mut user = Vec::new();
        self.run_once_with(timeout, clock, finished, &mut user)
    }

    /// Makes sure `want` is armed for the owner's own descriptor `fd` under `key` (below
    /// [`USER_KEY_LIMIT`]), given what is `armed` already; returns the new armed set. Fired
    /// keys come back from [`Engine::run_once_with`], one-shot like the pairs' own readiness.
    /// This is how a worker thread waits for its listeners and connections in set-up on the
    /// same ring (or epoll set) as its spliced pairs.
    ///
    /// # Errors
    /// The backend refused the request.
    pub fn arm_user(
        &mut self,
        fd: BorrowedFd<'_>,
        key: u64,
        armed: Interest,
        want: Interest,
    ) -> std::io::Result<Interest> {
        debug_assert!(key < USER_KEY_LIMIT, "user key {key} out of range");
        self.poller.arm(fd, user_token(key), armed, want)
    }

    /// Drops `fd`'s armed interest under `key` before the owner closes it.
    pub fn forget_user(&mut self, fd: BorrowedFd<'_>, key: u64, armed: Interest) {
        self.poller.forget(fd, user_token(key), armed);
    }

    /// [`Engine::run_once`], also appending the owner's fired keys ([`Engine::arm_user`]) with
    /// the interest that fired to `user`. The wait ends early when a key fires.
    ///
    /// # Errors
    /// The readiness backend failed (the engine cannot continue).
    pub fn run_once_with(
        &mut self,
        timeout: Duration,
        clock: &mut dyn FnMut() -> Instant,
        finished: &mut Vec<Finished>,
        user: &mut Vec<(u64, Interest)>,
    ) -> std::io::Result<()> {
        let mut wait = if self.ready.is_empty() {
            timeout.min(self.config.sweep_interval)
        } else {
            Duration::ZERO
        };
        if let Some(Reverse((due, ..))) = self.throttled.peek() {
            // Whole milliseconds, rounded up (epoll's unit; never a busy wait).
            let ms = due
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000);
            wait = wait.min(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)));
        }
        let mut fired = std::mem::take(&mut self.fired);
        fired.clear();
        self.poller.wait(Some(wait), &mut fired)?;
        let now = clock();
        self.wake_throttled(now);
        for &t in &fired {
            if t == WAKE_TOKEN {
                self.drain_inbox(now, finished);
                continue;
            }
            if t & USER_BIT != 0 {
                let key = (t & !USER_BIT) >> INTEREST_BITS;
                user.push((key, Interest::from_bits(t)));
                continue;
            }
            let (index, generation, side) = untoken(t);
            let Some(pair) = self.pair_mut(index, generation) else {
                continue; // stale: the pair was closed and the slot reused
            };
            let cleared = Interest::from_bits(t);
            pair.armed[side] = pair.armed[side].minus(cleared);
            self.service(index, generation, now, finished);
        }
        self.fired = fired;
        // Serve what was queued before this round (pairs re-queued now wait for the next).
        for _ in 0..self.ready.len() {
            let Some((index, generation)) = self.ready.pop_front() else {
                break;
            };
            if let Some(pair) = self.pair_mut(index, generation) {
                pair.queued = false;
                self.service(index, generation, now, finished);
            }
        }
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.sweep_interval)
        {
            self.last_sweep = Some(now);
            self.sweep(now, finished);
        }
        Ok(())
    }

    /// Closes every pair (reason [`CloseReason::Shutdown`]).
    pub fn shutdown(&mut self, finished: &mut Vec<Finished>) {
        for index in 0..self.slots.len() {
            let generation = self.slots[index].generation;
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            if self.pair_mut(index, generation).is_some() {
                self.close(index, CloseReason::Shutdown, finished);
            }
        }
    }

    /// Closes every pair whose tag `cut` selects (reason [`CloseReason::Cut`]; both sockets
    /// shut down, so both peers see the end at once) and returns how many. For the owner's
    /// rare decisions (a ban, a revocation): it scans every slot.
    pub fn close_where(
        &mut self,
        mut cut: impl FnMut(u64) -> bool,
        finished: &mut Vec<Finished>,
    ) -> usize {
        let mut n = 0;
        for index in 0..self.slots.len() {
            let selected = self.slots[index]
                .pair
                .as_ref()
                .is_some_and(|pair| cut(pair.tag));
            if selected {
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                self.close(index, CloseReason::Cut, finished);
                n += 1;
            }
        }
        n
    }

    fn pair_mut(&mut self, index: u32, generation: u32) -> Option<&mut Pair> {
        let slot = self.slots.get_mut(index as usize)?;
        if u64::from(slot.generation) & GENERATION_MASK != u64::from(generation) & GENERATION_MASK {
            return None;
        }
        slot.pair.as_mut()
    }

    fn drain_inbox(&mut self, now: Instant, finished: &mut Vec<Finished>) {
        let _ = self.handle.wake.read(); // reset the eventfd counter; EAGAIN means already 0
        while let Ok(new) = self.inbox.try_recv() {
            // A refused pair's sockets are dropped (closed) here; the count is in the stats,
            // and the caller hears about the tag like any finished pair.
            let tag = new.tag;
            if self
                .add_limited(new.a, new.b, tag, new.limits, now)
                .is_err()
            {
                finished.push(Finished {
                    tag,
                    bytes: [0, 0],
                    reason: CloseReason::Refused,
                });
            }
        }
    }

    /// Pumps both directions of a pair, then arms what they wait for or closes the pair.
    fn service(&mut self, index: u32, generation: u32, now: Instant, finished: &mut Vec<Finished>) {
        let budget = self.config.pump_budget_bytes;
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        let Some(pair) = slot.pair.as_mut() else {
            return;
        };
        let mut want = [Interest::NONE; 2];
        let mut requeue = false;
        let mut error = None;
        let bytes_before = pair.dirs[0].bytes + pair.dirs[1].bytes;
        for d in 0..2 {
            let dir = &mut pair.dirs[d];
            if dir.finished || dir.waiting_pipe || dir.throttled_until.is_some() {
                continue;
            }
            let (src, dst) = (pair.fds[d].as_fd(), pair.fds[1 - d].as_fd());
            let mut cx = PumpCx {
                pool: &mut self.pool,
                bufs: &mut self.bufs,
                budget_bytes: budget,
                others_waiting: !self.pipe_waiters.is_empty(),
                splice_calls: &mut self.stats.splice_calls,
                now,
            };
            match dir.pump(src, dst, &mut cx) {
                Ok(Pump::Wait { read, write }) => {
                    if read {
                        want[d] = want[d].union(Interest::READ);
                    }
                    if write {
                        want[1 - d] = want[1 - d].union(Interest::WRITE);
                    }
                }
                Ok(Pump::Yield) => requeue = true,
                Ok(Pump::NeedPipe) => {
                    dir.waiting_pipe = true;
                    self.stats.pipe_waits += 1;
                    self.pipe_waiters.push_back((index, generation));
                }
                Ok(Pump::Throttled { write }) => {
                    if write {
                        want[1 - d] = want[1 - d].union(Interest::WRITE);
                    }
                    // Reserve the next chunk from every bucket (charged now) and sleep until
                    // it conforms: holders of one bucket queue in it and take turns.
                    let now_ns = rate::clock_ns(now);
                    let chunk = dir.limits.chunk_bytes();
                    let (mut wait_ns, mut by) = (0u64, 0u8);
                    for (i, b) in dir.limits.buckets.iter().enumerate() {
                        if let Some(b) = b {
                            let w = b.reserve(chunk, now_ns);
                            if w > 0 {
                                by |= 1 << i;
                            }
                            wait_ns = wait_ns.max(w);
                        }
                    }
                    dir.credit = chunk;
                    let until = now + Duration::from_nanos(wait_ns);
                    dir.throttled_until = Some(until);
                    if dir.throttled_since.is_none() {
                        dir.throttled_since = Some(now);
                        dir.throttled_by = by;
                    }
                    self.stats.throttles += 1;
                    let side = u8::try_from(d).unwrap_or(0);
                    self.throttled
                        .push(Reverse((until, index, generation, side)));
                }
                Ok(Pump::Finished) => {
                    if pair.half_closed_since.is_none() {
                        pair.half_closed_since = Some(now);
                    }
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let moved = pair.dirs[0].bytes + pair.dirs[1].bytes - bytes_before;
        if moved > 0 {
            pair.last_activity = now;
            // The half-closed timeout counts from the last byte moved, not from the FIN: a
            // pair still draining toward a slow reader is not cut.
            if pair.half_closed_since.is_some() {
                pair.half_closed_since = Some(now);
            }
            self.stats.bytes += moved;
        }
        let done = pair.dirs[0].finished && pair.dirs[1].finished;
        if let Some(e) = error {
            self.close(index, CloseReason::Error(e), finished);
        } else if done {
            self.close(index, CloseReason::Completed, finished);
        } else {
            if requeue && !pair.queued {
                pair.queued = true;
                self.ready.push_back((index, generation));
            }
            for (side, want) in want.into_iter().enumerate() {
                let t = token(index, generation, side);
                match self
                    .poller
                    .arm(pair.fds[side].as_fd(), t, pair.armed[side], want)
                {
                    Ok(armed) => pair.armed[side] = armed,
                    Err(_) => {
                        error = Some(Errno::ENOMEM);
                        break;
                    }
                }
            }
            if let Some(e) = error {
                self.close(index, CloseReason::Error(e), finished);
            }
        }
        self.wake_pipe_waiters();
    }

    /// Requeues throttled directions whose tokens are due, and adds the time they waited to
    /// the buckets that held them back.
    fn wake_throttled(&mut self, now: Instant) {
        while let Some(&Reverse((until, index, generation, side))) = self.throttled.peek() {
            if until > now {
                break;
            }
            self.throttled.pop();
            let Some(pair) = self.pair_mut(index, generation) else {
                continue;
            };
            let dir = &mut pair.dirs[usize::from(side & 1)];
            if dir.throttled_until != Some(until) {
                continue;
            }
            dir.throttled_until = None;
            if let Some(since) = dir.throttled_since.take() {
                let ns = u64::try_from(now.saturating_duration_since(since).as_nanos())
                    .unwrap_or(u64::MAX);
                for (i, b) in dir.limits.buckets.iter().enumerate() {
                    if dir.throttled_by & (1 << i) != 0
                        && let Some(b) = b
                    {
                        b.add_throttled_ns(ns);
                    }
                }
            }
            if !pair.queued {
                pair.queued = true;
                self.ready.push_back((index, generation));
            }
        }
    }

    /// Requeues directions that waited for a pipe, now that one (or a copy buffer) may be
    /// free.
    fn wake_pipe_waiters(&mut self) {
        if !self.pool.has_capacity() && !self.bufs.has_copy_capacity() {
            return;
        }
        while let Some((index, generation)) = self.pipe_waiters.pop_front() {
            if let Some(pair) = self.pair_mut(index, generation) {
                for dir in &mut pair.dirs {
                    dir.waiting_pipe = false;
                }
                if !pair.queued {
                    pair.queued = true;
                    self.ready.push_back((index, generation));
                }
            }
        }
    }

    fn sweep(&mut self, now: Instant, finished: &mut Vec<Finished>) {
        let idle = self.config.idle_timeout;
        let half = self.config.half_closed_timeout;
        let stall = self.config.stall_timeout;
        let write_stall = self.config.write_stall_timeout;
        let stalled_for = |dir: &Direction, limit: Duration| {
            dir.holds_bytes()
                && dir
                    .stalled_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= limit)
        };
        for index in 0..self.slots.len() {
            let Some(pair) = self.slots[index].pair.as_mut() else {
                continue;
            };
            // A stalled direction gives its pipe back to the pool (bytes to a spill buffer).
            let mut spill_error = None;
            for dir in &mut pair.dirs {
                let spilled = dir.buf.as_ref().is_some_and(|b| b.kind() == BufKind::Spill);
                if spilled || !stalled_for(dir, stall) {
                    continue;
                }
                match dir.spill(&mut self.pool, &mut self.bufs) {
                    Ok(true) => self.stats.spills += 1,
                    Ok(false) if !dir.spill_refused => {
                        dir.spill_refused = true;
                        self.stats.spill_refusals += 1;
                    }
                    Ok(false) => {}
                    Err(e) => spill_error = Some(e),
                }
            }
            let reason = if let Some(e) = spill_error {
                Some(CloseReason::Error(e))
            } else if pair.dirs.iter().any(|d| stalled_for(d, write_stall)) {
                Some(CloseReason::WriteStall)
            } else if now.saturating_duration_since(pair.last_activity) >= idle {
                Some(CloseReason::IdleTimeout)
            } else if pair
                .half_closed_since
                .is_some_and(|t| now.saturating_duration_since(t) >= half)
            {
                Some(CloseReason::HalfClosedTimeout)
            } else {
                None
            };
            if let Some(reason) = reason {
                self.close(u32::try_from(index).unwrap_or(u32::MAX), reason, finished);
            }
        }
        // Timeouts free pipes, and a kernel refusal (EMFILE, ENOMEM) is retried once per
        // sweep instead of on every round.
        self.pool.retry_kernel();
        self.wake_pipe_waiters();
    }

    fn close(&mut self, index: u32, reason: CloseReason, finished: &mut Vec<Finished>) {
        let slot = &mut self.slots[index as usize];
        let Some(mut pair) = slot.pair.take() else {
            return;
        };
        let generation = slot.generation;
        slot.generation = slot.generation.wrapping_add(1);
        for side in 0..2 {
            let fd = pair.fds[side].as_fd();
            self.poller
                .forget(fd, token(index, generation, side), pair.armed[side]);
            // A poll still pending in the kernel holds a reference to the socket; shutting it
            // down makes sure the peer sees the close whatever happens to that reference.
            let _ = shutdown(fd.as_fd_raw(), Shutdown::Both);
        }
        for dir in &mut pair.dirs {
            if let Some(pipe) = dir.pipe.take() {
                if dir.in_pipe == 0 {
                    self.pool.release(pipe);
                } else {
                    self.pool.discard(pipe);
                }
            }
            if let Some(buf) = dir.buf.take() {
                self.bufs.release(buf);
            }
        }
        let counter = match reason {
            CloseReason::Completed => 0,
            CloseReason::Error(_) => 1,
            CloseReason::IdleTimeout => 2,
            CloseReason::HalfClosedTimeout => 3,
            CloseReason::Shutdown | CloseReason::Refused => 4,
            CloseReason::WriteStall => 5,
            CloseReason::Cut => 6,
        };
        self.stats.closed[counter] += 1;
        self.stats.pairs_active -= 1;
        self.free.push(index);
        finished.push(Finished {
            tag: pair.tag,
            bytes: [pair.dirs[0].bytes, pair.dirs[1].bytes],
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_name_the_key_and_budgets_split_per_worker() {
        let ok = EngineConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let mut c = ok.clone();
        c.stall_timeout = Duration::from_millis(50);
        assert_eq!(c.validate().map_err(|e| e.0), Err("stall_timeout_ms"));
        let mut c = ok.clone();
        c.stall_timeout = c.write_stall_timeout;
        assert_eq!(c.validate().map_err(|e| e.0), Err("stall_timeout_ms"));
        let mut c = ok.clone();
        c.buffers.copy_budget_bytes = 100;
        assert_eq!(c.validate().map_err(|e| e.0), Err("copy_budget_bytes"));
        let w = ok.per_worker(4);
        assert_eq!(w.pipes.budget_bytes, ok.pipes.budget_bytes / 4);
        assert_eq!(
            w.buffers.spill_budget_bytes,
            ok.buffers.spill_budget_bytes / 4
        );
        let tiny = ok.per_worker(100_000);
        assert_eq!(tiny.pipes.budget_bytes, crate::pipe::DEFAULT_PIPE_BYTES);
        assert_eq!(tiny.buffers.copy_budget_bytes, ok.buffers.copy_buffer_bytes);
    }

    /// The owner's descriptors fire on the engine's own wait, with their key and interest,
    /// on both backends, and a forgotten key stays silent.
    #[test]
    fn user_keys_fire_through_the_engines_wait() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        let mut backends = vec![Backend::Epoll];
        if crate::uring::UringPoller::available() {
            backends.push(Backend::Uring);
        }
        for backend in backends {
            let mut engine = Engine::new(EngineConfig {
                backend,
                ..EngineConfig::default()
            })
            .expect("engine");
            let (mut a, b) = UnixStream::pair().expect("pair");
            let (c, _d) = UnixStream::pair().expect("pair");
            let key = USER_KEY_LIMIT - 1;
            let armed = engine
                .arm_user(b.as_fd(), key, Interest::NONE, Interest::READ)
                .expect("arm");
            let armed_c = engine
                .arm_user(c.as_fd(), 7, Interest::NONE, Interest::READ)
                .expect("arm");
            engine.forget_user(c.as_fd(), 7, armed_c);
            assert_eq!(armed, Interest::READ);
            a.write_all(b"x").expect("write");
            let (mut finished, mut user) = (Vec::new(), Vec::new());
            let mut clock = Instant::now;
            for _ in 0..50 {
                engine
                    .run_once_with(
                        Duration::from_millis(20),
                        &mut clock,
                        &mut finished,
                        &mut user,
                    )
                    .expect("run");
                if !user.is_empty() {
                    break;
                }
            }
            assert_eq!(user, vec![(key, Interest::READ)], "{backend:?}");
            assert!(finished.is_empty());
        }
    }

    #[test]
    fn tokens_round_trip() {
        for (i, g, s) in [
            (0u32, 0u32, 0usize),
            (7, 12345, 1),
            (u32::MAX - 1, (1 << 29) - 1, 1),
        ] {
            let t = token(i, g, s);
            assert_eq!(t & 3, 0, "interest bits free");
            assert_eq!(untoken(t | 3), (i, g, s));
            assert_ne!(t, WAKE_TOKEN);
        }
    }
}
