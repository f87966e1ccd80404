//! The io_uring readiness backend. The one module with `unsafe` in the project: pushing an SQE
//! is unsafe because the kernel may read memory the entry points to until it completes.
//! Every entry pushed here points to no memory at all (POLL_ADD and ASYNC_CANCEL carry only a
//! file descriptor, a mask and user data), which is what makes each block sound.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};

use crate::poller::{INTEREST_BITS, Interest, WAKE_TOKEN};

/// User data of cancel requests (their completions are ignored).
const CANCEL_TOKEN: u64 = u64::MAX - 1;

pub(crate) struct UringPoller {
    ring: IoUring,
    wake_fd: RawFd,
}

impl UringPoller {
    /// Whether this process may create a ring (kernel support, `io_uring_disabled`, seccomp).
    pub(crate) fn available() -> bool {
        IoUring::new(2).is_ok()
    }

    pub(crate) fn new(entries: u32, wake: BorrowedFd<'_>) -> std::io::Result<UringPoller> {
        let ring = IoUring::builder().setup_clamp().build(entries.max(8))?;
        let mut poller = UringPoller {
            ring,
            wake_fd: wake.as_raw_fd(),
        };
        poller.arm_wake()?;
        Ok(poller)
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
        let mask = if interest.contains(Interest::READ) {
            libc::POLLIN | libc::POLLRDHUP
        } else {
            libc::POLLOUT
        };
        let mask = u32::from(mask.cast_unsigned());
        let entry = opcode::PollAdd::new(types::Fd(fd), mask)
            .build()
            .user_data(token);
        self.push(&entry)
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
        for cqe in self.ring.completion() {
            match cqe.user_data() {
                CANCEL_TOKEN => {}
                WAKE_TOKEN => rearm_wake = true,
                token => out.push(token),
            }
        }
        if rearm_wake {
            out.push(WAKE_TOKEN);
            self.arm_wake()?;
        }
        Ok(())
    }
}

/// Interest bits are the low bits of every token.
const _: () = assert!(INTEREST_BITS == 2);
