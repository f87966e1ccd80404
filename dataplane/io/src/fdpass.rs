//! Descriptor passing over a Unix socket (SCM_RIGHTS), for the relay's hitless upgrade: the
//! old process hands its listening sockets to the new one. Received descriptors come back
//! as [`OwnedFd`]s (closed on drop, close-on-exec set by `MSG_CMSG_CLOEXEC`): turning the
//! kernel's raw numbers into owned ones is the one `unsafe` step, fenced here.
#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD` is 253).
pub const FDS_PER_MESSAGE_MAX: usize = 64;

/// Sends `payload` with `fds` (at most [`FDS_PER_MESSAGE_MAX`]) in one message on `socket`
/// (a SOCK_SEQPACKET or SOCK_STREAM Unix socket). `MSG_NOSIGNAL`: a gone peer is an error,
/// never SIGPIPE.
///
/// # Errors
/// Too many descriptors, a short send, or the socket's error.
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    if fds.len() > FDS_PER_MESSAGE_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [IoSlice::new(payload)];
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if sent != payload.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "short send of a descriptor message",
        ));
    }
    Ok(())
}

/// Receives one message into `buf` with the descriptors it carries (at most
/// [`FDS_PER_MESSAGE_MAX`]). Returns the payload length (0: the peer closed) and the
/// descriptors, owned.
///
/// # Errors
/// The socket's error, or truncated control data (descriptors were lost).
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE_MAX]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut owned = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in this process for this message
                // (SCM_RIGHTS); nothing else knows the number, so this is its only owner.
                owned.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(std::io::Error::other(
            "descriptor message truncated (descriptors lost)",
        ));
    }
    Ok((msg.bytes, owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_cross_a_socketpair_and_still_name_the_same_socket() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        send_with_fds(a.as_fd(), b"x", &[listener.as_fd()]).expect("send");
        drop(listener);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).expect("recv");
        assert_eq!((n, fds.len()), (1, 1));
        let got = std::net::TcpListener::from(fds.into_iter().next().expect("one fd"));
        assert_eq!(got.local_addr().expect("addr"), addr);
        let _client = std::net::TcpStream::connect(addr).expect("the passed listener accepts");
        drop(a);
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).expect("recv after close");
        assert_eq!((n, fds.len()), (0, 0), "EOF once the peer closed");
    }
}
