//! Readiness notification: one-shot interest in a file descriptor becoming readable or
//! writable, delivered as a token. Two backends with identical semantics:
//! - [`Backend::Uring`]: io_uring `IORING_OP_POLL_ADD` (one SQE per interest), waited for with
//!   one `io_uring_enter` that also submits; the worker's ring.
//! - [`Backend::Epoll`]: epoll with `EPOLLONESHOT`, the fallback where io_uring is missing or
//!   disabled (`kernel.io_uring_disabled`, seccomp), and forceable for tests.
//!
//! The splice itself is a plain non-blocking `splice(2)` on the worker thread in both cases:
//! io_uring's `IORING_OP_SPLICE` always runs on io-wq kernel threads (measured at about half
//! the throughput of inline splice with 64 KiB pipes), so readiness is what we take from it.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::uring::UringPoller;

/// The environment variable [`Backend::auto`] reads.
pub const BACKEND_ENV: &str = "OUTRELAY_IO_BACKEND";

/// Which readiness backend an engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring poll requests.
    Uring,
    /// epoll, one-shot.
    Epoll,
}

impl Backend {
    /// io_uring when the kernel lets this process create a ring, else epoll.
    pub fn probe() -> Backend {
        if UringPoller::available() {
            Backend::Uring
        } else {
            Backend::Epoll
        }
    }

    /// What `io_backend = "auto"` means: the backend named by the environment variable
    /// [`BACKEND_ENV`] (`io_uring` or `epoll`) when it is set, else [`Backend::probe`]. The
    /// variable lets an operator (a systemd `Environment=` line) or the test suite (its epoll
    /// pass) force a backend without editing configs; an unknown value is ignored with the
    /// probe's answer. A forced `io_uring` the kernel refuses fails at start, like the config
    /// key.
    pub fn auto() -> Backend {
        std::env::var(BACKEND_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(Backend::probe)
    }

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "io_uring" | "uring" => Ok(Backend::Uring),
            "epoll" => Ok(Backend::Epoll),
            other => Err(format!("unknown io backend {other:?} (io_uring or epoll)")),
        }
    }
}

/// Interest bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interest(u8);

impl Interest {
    /// Nothing.
    pub const NONE: Interest = Interest(0);
    /// Readable (or hung up).
    pub const READ: Interest = Interest(1);
    /// Writable (or hung up).
    pub const WRITE: Interest = Interest(2);

    /// Both sets.
    pub fn union(self, other: Interest) -> Interest {
        Interest(self.0 | other.0)
    }
    /// Bits of `self` not in `other`.
    pub fn minus(self, other: Interest) -> Interest {
        Interest(self.0 & !other.0)
    }
    /// No bit set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// All bits of `other` are set in `self`.
    pub fn contains(self, other: Interest) -> bool {
        self.0 & other.0 == other.0
    }
    pub(crate) fn bits(self) -> u64 {
        u64::from(self.0)
    }
    pub(crate) fn from_bits(bits: u64) -> Interest {
        Interest(u8::try_from(bits & 3).unwrap_or(0))
    }
}

/// Tokens carry the interest they were armed with in their two low bits.
pub(crate) const INTEREST_BITS: u32 = 2;
/// Token of the engine's wake-up eventfd.
pub(crate) const WAKE_TOKEN: u64 = u64::MAX;

/// A readiness backend instance (one per engine, so its size does not matter).
#[allow(
    clippy::large_enum_variant,
    reason = "one per engine, never moved on a hot path"
)]
pub(crate) enum Poller {
    Uring(UringPoller),
    Epoll(EpollPoller),
}

impl Poller {
    pub(crate) fn new(
        backend: Backend,
        wake: BorrowedFd<'_>,
        entries: u32,
    ) -> std::io::Result<Poller> {
        Ok(match backend {
            Backend::Uring => Poller::Uring(UringPoller::new(entries, wake)?),
            Backend::Epoll => Poller::Epoll(EpollPoller::new(wake)?),
        })
    }

    /// Makes sure `want` is armed for `fd`, given what is `armed` already; returns the new
    /// armed set. `token` has zero interest bits.
    pub(crate) fn arm(
        &mut self,
        fd: BorrowedFd<'_>,
        token: u64,
        armed: Interest,
        want: Interest,
    ) -> std::io::Result<Interest> {
        let missing = want.minus(armed);
        if missing.is_empty() {
            return Ok(armed);
        }
        match self {
            Poller::Uring(u) => {
                for bit in [Interest::READ, Interest::WRITE] {
                    if missing.contains(bit) {
                        u.poll_add(fd.as_raw_fd(), token | bit.bits(), bit)?;
                    }
                }
            }
            Poller::Epoll(e) => e.arm(fd, token, armed.union(want))?,
        }
        Ok(armed.union(want))
    }

    /// Drops every armed interest of `fd` before it is closed.
    pub(crate) fn forget(&mut self, fd: BorrowedFd<'_>, token: u64, armed: Interest) {
        match self {
            Poller::Uring(u) => {
                if armed.contains(Interest::READ) {
                    u.cancel(token | Interest::READ.bits());
                }
                u.forget_write(fd.as_raw_fd());
            }
            Poller::Epoll(e) => e.forget(fd),
        }
    }

    /// Waits up to `timeout` (or not at all with `Some(ZERO)`) and appends fired tokens; each
    /// fired token's interest bits are no longer armed.
    pub(crate) fn wait(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<u64>,
    ) -> std::io::Result<()> {
        match self {
            Poller::Uring(u) => u.wait(timeout, out),
            Poller::Epoll(e) => e.wait(timeout, out),
        }
    }
}

/// The epoll fallback.
pub(crate) struct EpollPoller {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl EpollPoller {
    fn new(wake: BorrowedFd<'_>) -> std::io::Result<EpollPoller> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
        Ok(EpollPoller {
            epoll,
            events: vec![EpollEvent::empty(); 256],
        })
    }

    fn arm(&mut self, fd: BorrowedFd<'_>, token: u64, interest: Interest) -> std::io::Result<()> {
        let mut flags = EpollFlags::EPOLLONESHOT;
        if interest.contains(Interest::READ) {
            // RDHUP only with READ: after the peer's FIN it stays set, and a write-only
            // registration carrying it would fire at once on every re-arm.
            flags |= EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        }
        if interest.contains(Interest::WRITE) {
            flags |= EpollFlags::EPOLLOUT;
        }
        let mut event = EpollEvent::new(flags, token | interest.bits());
        match self.epoll.modify(fd, &mut event) {
            Err(nix::errno::Errno::ENOENT) => Ok(self.epoll.add(fd, event)?),
            other => Ok(other?),
        }
    }

    fn forget(&mut self, fd: BorrowedFd<'_>) {
        // ENOENT (never armed) is fine; the fd is about to be closed anyway.
        let _ = self.epoll.delete(fd);
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<u64>) -> std::io::Result<()> {
        let timeout = match timeout {
            None => EpollTimeout::NONE,
            Some(d) => EpollTimeout::try_from(d).unwrap_or(EpollTimeout::MAX),
        };
        let n = match self.epoll.wait(&mut self.events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        out.extend(self.events[..n].iter().map(EpollEvent::data));
        Ok(())
    }
}
