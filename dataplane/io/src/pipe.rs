//! Pipes for splicing, pooled and budgeted.
//!
//! A splice moves pages socket → pipe → socket without copying them through user space, so
//! every direction with data in flight needs a pipe. Pipes cost kernel memory (a 1 MiB pipe
//! pins 256 pages) and an unprivileged process hits `fs.pipe-user-pages-soft` (16,384 pages =
//! 64 MiB) quickly, so:
//! - a direction holds a pipe only while bytes are in it, and returns it to the pool when the
//!   pipe drains and the source has nothing more to give;
//! - pipes start at the kernel default (64 KiB) and grow, one step at a time up to
//!   `max_pipe_bytes`, when a bulk flow fills them and its destination drains them at once
//!   (never toward a destination that refused bytes);
//! - the pool refuses to create or grow a pipe past `budget_bytes`; a refused direction moves
//!   its bytes through a copy buffer ([`crate::buffer`]), and waits for a release (counted as
//!   a pipe wait) only when the copy budget is spent too.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// The kernel's default pipe capacity, in bytes.
pub const DEFAULT_PIPE_BYTES: usize = 64 * 1024;
/// The largest pipe the engine grows to by default, in bytes.
pub const MAX_PIPE_BYTES: usize = 1024 * 1024;
/// Default total pipe capacity one engine may hold, in bytes (below the 64 MiB soft limit an
/// unprivileged user gets across all its processes).
pub const DEFAULT_PIPE_BUDGET_BYTES: usize = 48 * 1024 * 1024;

/// A pipe with both ends non-blocking.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity_bytes: usize,
}

impl Pipe {
    fn new() -> nix::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = fcntl(write.as_fd(), FcntlArg::F_GETPIPE_SZ)?;
        Ok(Pipe {
            read,
            write,
            capacity_bytes: usize::try_from(capacity).unwrap_or(DEFAULT_PIPE_BYTES),
        })
    }

    /// The read end.
    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// The write end.
    pub fn write_end(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// Current capacity in bytes.
    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    fn resize(&mut self, bytes: usize) -> nix::Result<()> {
        let want = i32::try_from(bytes).unwrap_or(i32::MAX);
        let got = fcntl(self.write.as_fd(), FcntlArg::F_SETPIPE_SZ(want))?;
        self.capacity_bytes = usize::try_from(got).unwrap_or(bytes);
        Ok(())
    }
}

/// Limits of a [`PipePool`].
#[derive(Debug, Clone, Copy)]
pub struct PipeLimits {
    /// Total capacity of all pipes held (in use and pooled), in bytes.
    pub budget_bytes: usize,
    /// Largest single pipe, in bytes (rounded by the kernel to pages, at most
    /// `/proc/sys/fs/pipe-max-size` for unprivileged processes).
    pub max_pipe_bytes: usize,
    /// How many idle pipes the pool keeps for reuse.
    pub pool_max: usize,
}

impl Default for PipeLimits {
    fn default() -> Self {
        PipeLimits {
            budget_bytes: DEFAULT_PIPE_BUDGET_BYTES,
            max_pipe_bytes: MAX_PIPE_BYTES,
            pool_max: 64,
        }
    }
}

/// Counters a pool keeps (read by the engine's stats).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PipeStats {
    /// Pipes created.
    pub created: u64,
    /// Pipes grown.
    pub grown: u64,
    /// Acquisitions refused because the budget was spent.
    pub budget_refusals: u64,
    /// Pipe creation or resize failures reported by the kernel (EMFILE, EPERM, ENOMEM).
    pub kernel_refusals: u64,
    /// Bytes of capacity held right now (in use plus pooled).
    pub held_bytes: usize,
}

/// A per-worker pipe pool (not shared across threads: no locks).
#[derive(Debug)]
pub struct PipePool {
    limits: PipeLimits,
    idle: Vec<Pipe>,
    stats: PipeStats,
    /// The kernel refused a pipe and nothing was released since: waiting directions stay
    /// parked instead of retrying `pipe2` in a loop.
    kernel_refused: bool,
}

impl PipePool {
    /// An empty pool.
    pub fn new(limits: PipeLimits) -> PipePool {
        PipePool {
            limits,
            idle: Vec::with_capacity(limits.pool_max),
            stats: PipeStats::default(),
            kernel_refused: false,
        }
    }

    /// Takes a pipe from the pool or creates one within the budget; `None` when the budget is
    /// spent or the kernel refused (both counted).
    pub fn acquire(&mut self) -> Option<Pipe> {
        if let Some(pipe) = self.idle.pop() {
            return Some(pipe);
        }
        if self.stats.held_bytes + DEFAULT_PIPE_BYTES > self.limits.budget_bytes {
            self.stats.budget_refusals += 1;
            return None;
        }
        match Pipe::new() {
            Ok(pipe) => {
                self.stats.created += 1;
                self.stats.held_bytes += pipe.capacity_bytes;
                Some(pipe)
            }
            Err(_) => {
                self.stats.kernel_refusals += 1;
                self.kernel_refused = true;
                None
            }
        }
    }

    /// Whether [`PipePool::acquire`] would succeed budget-wise (a pooled pipe, or room for a
    /// new one).
    pub fn has_capacity(&self) -> bool {
        !self.idle.is_empty()
            || (!self.kernel_refused
                && self.stats.held_bytes + DEFAULT_PIPE_BYTES <= self.limits.budget_bytes)
    }

    /// Lets the next [`PipePool::acquire`] ask the kernel again after a refusal (called
    /// periodically, not per round, so fd exhaustion does not become a busy loop).
    pub fn retry_kernel(&mut self) {
        self.kernel_refused = false;
    }

    /// Doubles `pipe` (up to the per-pipe maximum) if the budget allows; returns whether it grew.
    pub fn grow(&mut self, pipe: &mut Pipe) -> bool {
        let old = pipe.capacity_bytes;
        let want = (old * 2).min(self.limits.max_pipe_bytes);
        if want <= old || self.stats.held_bytes - old + want > self.limits.budget_bytes {
            return false;
        }
        match pipe.resize(want) {
            Ok(()) => {
                self.stats.grown += 1;
                self.stats.held_bytes = self.stats.held_bytes - old + pipe.capacity_bytes;
                pipe.capacity_bytes > old
            }
            Err(_) => {
                self.stats.kernel_refusals += 1;
                false
            }
        }
    }

    /// Returns an EMPTY pipe. Grown pipes are shrunk back to the default first so idle pipes
    /// pin as little memory as possible; pipes beyond `pool_max` are closed.
    pub fn release(&mut self, mut pipe: Pipe) {
        self.kernel_refused = false;
        if pipe.capacity_bytes > DEFAULT_PIPE_BYTES {
            let old = pipe.capacity_bytes;
            if pipe.resize(DEFAULT_PIPE_BYTES).is_err() {
                self.stats.held_bytes -= old;
                return; // dropped: closed
            }
            self.stats.held_bytes = self.stats.held_bytes - old + pipe.capacity_bytes;
        }
        if self.idle.len() < self.limits.pool_max {
            self.idle.push(pipe);
        } else {
            self.stats.held_bytes -= pipe.capacity_bytes;
        }
    }

    /// Forgets a pipe that still holds bytes (its connection died); it is closed.
    pub fn discard(&mut self, pipe: Pipe) {
        self.kernel_refused = false;
        self.stats.held_bytes -= pipe.capacity_bytes;
    }

    /// The pool's counters.
    pub fn stats(&self) -> PipeStats {
        self.stats
    }
}
