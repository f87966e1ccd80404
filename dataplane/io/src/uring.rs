//! The io_uring readiness backend. The one module with `unsafe` in the project: pushing an SQE
//! is unsafe because the kernel may read memory the entry points to until it completes.
//! Every entry pushed here points to no memory at all (POLL_ADD and ASYNC_CANCEL carry only a
//! file descriptor, a mask and user data), which is what makes each block sound.
//!
//! Write readiness goes through a small epoll set that the ring itself polls. io_uring adds
//! EPOLLRDHUP (with ERR, HUP, NVAL) to every poll request's mask, so a POLLOUT poll on a socket
//! whose peer has sent FIN completes at once, forever: waiting there for a slow reader of a
//! half-closed connection would spin (a test caught it). epoll waits for exactly EPOLLOUT, and
//! the ring waits for the epoll fd, so the worker still blocks in one `io_uring_enter`.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::poller::{INTEREST_BITS, Interest, WAKE_TOKEN};

/// User data of cancel requests (their completions are ignored).
const CANCEL_TOKEN: u64 = u64::MAX - 1;
/// User data of the poll on the write-readiness epoll set.
const WRITE_SET_TOKEN: u64 = u64::MAX - 2;

pub(crate) struct UringPoller {
    ring: IoUring,
    wake_fd: RawFd,
    /// Sockets waiting to become writable (EPOLLOUT, one-shot), polled by the ring.
    write_set: Epoll,
    write_events: Vec<EpollEvent>,
}

impl UringPoller {
    /// Whether this process may create a ring (kernel support, `io_uring_disabled`, seccomp).
    /// The timed wait needs `IORING_FEAT_EXT_ARG` (Linux 5.11); older kernels use epoll.
    pub(crate) fn available() -> bool {
        IoUring::new(2).is_ok_and(|ring| ring.params().is_feature_ext_arg())
    }

    pub(crate) fn new(entries: u32, wake: BorrowedFd<'_>) -> std::io::Result<UringPoller> {
        // Up to four polls per pair can be outstanding: size the completion queue for them so
        // it does not overflow (which older kernels answer with EBUSY on submit).
        let entries = entries.max(8);
        // COOP_TASKRUN (Linux 5.19): completions are run when the worker next enters the
        // kernel instead of interrupting it with an IPI; the worker enters the kernel in every
        // round anyway. Older kernels refuse the flag: build without it.
        let build = |coop: bool| {
            let mut b = IoUring::builder();
            b.setup_clamp().setup_cqsize(entries.saturating_mul(4));
            if coop {
                b.setup_coop_taskrun();
            }
            b.build(entries)
        };
        let ring = build(true).or_else(|_| build(false))?;
        let mut poller = UringPoller {
            ring,
            wake_fd: wake.as_raw_fd(),
            write_set: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            write_events: vec![EpollEvent::empty(); 256],
        };
        poller.arm_wake()?;
        poller.arm_write_set()?;
        Ok(poller)
    }

    fn arm_write_set(&mut self) -> std::io::Result<()> {
        let fd = self.write_set.0.as_raw_fd();
        self.poll_add_raw(fd, WRITE_SET_TOKEN, libc::POLLIN)
    }

    fn arm_wake(&mut self) -> std::io::Result<()> {
        self.poll_add(self.wake_fd, WAKE_TOKEN, Interest::READ)
    }

    pub(crate) fn poll_add(
        &mut self,
        fd: RawFd,
        token: u64,
        interest: Interest,
    ) -> std::io::Result<()> {
        if interest.contains(Interest::READ) {
            return self.poll_add_raw(fd, token, libc::POLLIN | libc::POLLRDHUP);
        }
        // Write interest: one-shot EPOLLOUT in the write set (see the module docs).
        let borrowed = borrow_fd(fd);
        let mut event = EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLONESHOT, token);
        match self.write_set.modify(borrowed, &mut event) {
            Err(nix::errno::Errno::ENOENT) => Ok(self.write_set.add(borrowed, event)?),
            other => Ok(other?),
        }
    }

    fn poll_add_raw(&mut self, fd: RawFd, token: u64, mask: i16) -> std::io::Result<()> {
        let mask = u32::from(mask.cast_unsigned());
        let entry = opcode::PollAdd::new(types::Fd(fd), mask)
            .build()
            .user_data(token);
        self.push(&entry)
    }

    /// Forgets a socket's write interest before it is closed.
    pub(crate) fn forget_write(&mut self, fd: RawFd) {
        // ENOENT (never in the set) is fine.
        let _ = self.write_set.delete(borrow_fd(fd));
    }

    pub(crate) fn cancel(&mut self, token: u64) {
        let entry = opcode::AsyncCancel::new(token)
            .build()
            .user_data(CANCEL_TOKEN);
        // A failed cancel leaves a poll pending on a socket we are closing; its completion
        // carries a stale generation and is ignored. The engine shuts sockets down before
        // closing them, so the peer still sees the close.
        let _ = self.push(&entry);
    }

    fn push(&mut self, entry: &squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: POLL_ADD and ASYNC_CANCEL entries reference no user memory (only an fd
            // number, a poll mask and user data), so nothing has to outlive the submission.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand what is queued to the kernel and retry.
            self.ring.submit()?;
        }
    }

    pub(crate) fn wait(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<u64>,
    ) -> std::io::Result<()> {
        let submitted = match timeout {
            Some(Duration::ZERO) => self.ring.submit(),
            Some(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match submitted {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        let mut rearm_wake = false;
        let mut writable = false;
        for cqe in self.ring.completion() {
            if cqe.result() == -libc::ECANCELED {
                continue; // a poll we cancelled: nothing fired
            }
            match cqe.user_data() {
                CANCEL_TOKEN => {}
                WAKE_TOKEN => rearm_wake = true,
                WRITE_SET_TOKEN => writable = true,
                token => out.push(token),
            }
        }
        if rearm_wake {
            out.push(WAKE_TOKEN);
            self.arm_wake()?;
        }
        if writable {
            let n = match self
                .write_set
                .wait(&mut self.write_events, EpollTimeout::ZERO)
            {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            out.extend(self.write_events[..n].iter().map(EpollEvent::data));
            self.arm_write_set()?;
        }
        Ok(())
    }
}

/// Interest bits are the low bits of every token.
const _: () = assert!(INTEREST_BITS == 2);

/// Borrows a raw fd the engine owns (it stays open for the duration of the call).
fn borrow_fd<'a>(fd: RawFd) -> std::os::fd::BorrowedFd<'a> {
    // SAFETY: the engine owns `fd` (an OwnedFd in its pair table) and keeps it open for the
    // whole call that borrows it here; the borrow does not outlive the call.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
