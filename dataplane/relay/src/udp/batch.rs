//! Batched datagram I/O on a non-blocking UDP socket: one `recvmmsg(2)` fills up to [`BATCH`]
//! datagrams, one `sendmmsg(2)` sends up to [`BATCH`] replies to as many addresses. Data
//! buffers and address arrays are allocated once per port and reused; nix's message-header
//! array (`MultiHeaders`, raw pointers, so not `Send`) is built per call and never held across
//! an await: one small allocation per batch of up to 32 datagrams, instead of an `unsafe impl
//! Send` outside the io_uring module.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

use bytes::Bytes;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};

/// Datagrams per system call.
pub const BATCH: usize = 32;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Bytes stored in its slot (at most the slot size).
    pub len: usize,
    /// The sender.
    pub from: SocketAddr,
    /// Larger than the slot: cut by the kernel (the caller drops it as too large).
    pub truncated: bool,
    /// The receive slot its bytes are in (its position in the `recvmmsg` batch, which is not
    /// its position among the datagrams kept when one is skipped).
    pub slot: usize,
    /// The port the client sent it to (IP_RECVORIGDSTADDR; only for a batch made with
    /// [`RecvBatch::with_orig_dst`], else 0).
    pub to_port: u16,
}

/// Receive buffers: [`BATCH`] slots of `slot_bytes`.
pub struct RecvBatch {
    buf: Vec<u8>,
    slot_bytes: usize,
    got: Vec<Received>,
    /// Ask for each datagram's original destination (a lease-range socket).
    orig_dst: bool,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slot_bytes", &self.slot_bytes)
            .finish_non_exhaustive()
    }
}

impl RecvBatch {
    /// Buffers for [`BATCH`] datagrams of up to `slot_bytes` each.
    pub fn new(slot_bytes: usize) -> RecvBatch {
        RecvBatch {
            buf: vec![0; slot_bytes * BATCH],
            slot_bytes,
            got: Vec::with_capacity(BATCH),
            orig_dst: false,
        }
    }

    /// [`RecvBatch::new`] that also reads each datagram's original destination port (the
    /// socket has IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR on).
    pub fn with_orig_dst(slot_bytes: usize) -> RecvBatch {
        RecvBatch {
            orig_dst: true,
            ..RecvBatch::new(slot_bytes)
        }
    }

    /// One `recvmmsg` without blocking. Returns how many datagrams arrived (0 never: no datagram
    /// is `WouldBlock`).
    ///
    /// # Errors
    /// The socket's error (`WouldBlock` when nothing is queued).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<usize> {
        self.got.clear();
        let mut chunks = self.buf.chunks_mut(self.slot_bytes);
        let mut slices: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let cmsg = self
            .orig_dst
            .then(|| nix::cmsg_space!(nix::libc::sockaddr_in6));
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, cmsg);
        let results = recvmmsg(
            fd.as_raw_fd(),
            &mut headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(std::io::Error::from)?;
        let results = results.map(|r| {
            (
                r.bytes,
                r.address.as_ref().and_then(to_socket_addr),
                r.flags.contains(MsgFlags::MSG_TRUNC),
                r.cmsgs()
                    .ok()
                    .and_then(|mut c| c.find_map(|m| orig_dst_port(&m)))
                    .unwrap_or(0),
            )
        });
        keep(&mut self.got, self.slot_bytes, results);
        Ok(self.got.len())
    }

    /// The datagrams of the last [`RecvBatch::recv`], with their bytes.
    pub fn received(&self) -> impl Iterator<Item = (Received, &[u8])> + Clone {
        self.got.iter().map(|r| {
            let start = r.slot * self.slot_bytes;
            (*r, self.buf.get(start..start + r.len).unwrap_or_default())
        })
    }
}

/// Replies waiting for one `sendmmsg`.
pub struct SendBatch {
    payloads: Vec<Bytes>,
    addrs: [Option<SockaddrStorage>; BATCH],
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("queued", &self.payloads.len())
            .finish_non_exhaustive()
    }
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            payloads: Vec::with_capacity(BATCH),
            addrs: [None; BATCH],
        }
    }
}

impl SendBatch {
    /// Queues one reply; false when the batch is full (flush first).
    pub fn push(&mut self, to: SocketAddr, payload: Bytes) -> bool {
        let i = self.payloads.len();
        if i == BATCH {
            return false;
        }
        self.addrs[i] = Some(SockaddrStorage::from(to));
        self.payloads.push(payload);
        true
    }

    /// Queued replies.
    pub fn len(&self) -> usize {
        self.payloads.len()
    }

    /// No reply queued.
    pub fn is_empty(&self) -> bool {
        self.payloads.is_empty()
    }

    /// Sends the queued replies with as few `sendmmsg` calls as the kernel allows. Returns
    /// `(datagrams sent, bytes sent)`; what the socket could not take at once (`WouldBlock`) or
    /// refused is dropped: the caller counts `queued - sent` as dropped. The batch is empty
    /// afterwards.
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> (usize, u64) {
        let n = self.payloads.len();
        let mut sent = 0;
        let mut bytes = 0u64;
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        while sent < n {
            let slices: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|i| {
                [IoSlice::new(
                    self.payloads.get(sent + i).map_or(&[][..], |b| &b[..]),
                )]
            });
            let result = sendmmsg(
                fd.as_raw_fd(),
                &mut headers,
                slices[..n - sent].iter(),
                &self.addrs[sent..n],
                [],
                MsgFlags::MSG_DONTWAIT,
            );
            let Ok(results) = result else { break };
            let mut round = 0;
            for r in results {
                round += 1;
                bytes += r.bytes as u64;
            }
            if round == 0 {
                break;
            }
            sent += round;
        }
        self.payloads.clear();
        self.addrs = [None; BATCH];
        (sent, bytes)
    }
}

/// Keeps the datagrams of one batch, given in slot order as (length, sender, truncated,
/// original destination port); one whose sender is not an IPv4/IPv6 address is skipped, and
/// every kept one remembers its own slot.
fn keep(
    got: &mut Vec<Received>,
    slot_bytes: usize,
    results: impl Iterator<Item = (usize, Option<SocketAddr>, bool, u16)>,
) {
    for (slot, (len, from, truncated, to_port)) in results.enumerate() {
        let Some(from) = from else { continue };
        got.push(Received {
            len: len.min(slot_bytes),
            from,
            truncated,
            slot,
            to_port,
        });
    }
}

/// The destination port of an IP_RECVORIGDSTADDR control message.
fn orig_dst_port(m: &nix::sys::socket::ControlMessageOwned) -> Option<u16> {
    use nix::sys::socket::ControlMessageOwned;
    match m {
        ControlMessageOwned::Ipv4OrigDstAddr(a) => Some(u16::from_be(a.sin_port)),
        ControlMessageOwned::Ipv6OrigDstAddr(a) => Some(u16::from_be(a.sin6_port)),
        _ => None,
    }
}

fn to_socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// L8: a skipped datagram (sender not convertible) must not shift the slots of the ones
    /// after it.
    #[test]
    fn a_skipped_datagram_leaves_the_later_payloads_in_their_own_slots() {
        let mut rx = RecvBatch::new(8);
        for (slot, chunk) in rx.buf.chunks_mut(8).enumerate().take(3) {
            chunk.fill(u8::try_from(slot).expect("small") + 1);
        }
        let from: SocketAddr = "192.0.2.1:53".parse().expect("addr");
        rx.got.clear();
        keep(
            &mut rx.got,
            8,
            [
                (4, Some(from), false, 0),
                (5, None, false, 0),
                (6, Some(from), false, 0),
            ]
            .into_iter(),
        );
        let got: Vec<(usize, Vec<u8>)> = rx.received().map(|(r, d)| (r.slot, d.to_vec())).collect();
        assert_eq!(got, vec![(0, vec![1; 4]), (2, vec![3; 6])]);
    }

    #[test]
    fn a_batch_round_trips_between_two_sockets_and_marks_truncation() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b_addr = b.local_addr().expect("addr");
        let mut out = SendBatch::default();
        for i in 0..40u8 {
            if !out.push(b_addr, Bytes::from(vec![i; 10 + usize::from(i)])) {
                break;
            }
        }
        assert_eq!(out.len(), BATCH);
        let (sent, bytes) = out.flush(a.as_fd());
        assert_eq!(sent, BATCH);
        assert_eq!(bytes, (0..BATCH as u64).map(|i| 10 + i).sum::<u64>());
        assert!(out.is_empty());
        // One datagram larger than the receive slot.
        a.send_to(&[7; 100], b_addr).expect("send");
        let mut rx = RecvBatch::new(32);
        let mut seen = Vec::new();
        while seen.len() < BATCH + 1 {
            match rx.recv(b.as_fd()) {
                Ok(_) => seen.extend(rx.received().map(|(r, d)| (r, d.to_vec()))),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        }
        for (i, (r, d)) in seen.iter().take(22).enumerate() {
            assert_eq!(r.from, a.local_addr().expect("addr"));
            assert_eq!(d, &vec![u8::try_from(i).expect("small"); 10 + i]);
            assert!(!r.truncated);
        }
        // 10 + 22 = 32 bytes fit exactly; 33 and above are cut and marked.
        assert!(seen[23].0.truncated);
        let last = seen.last().expect("a datagram");
        assert!(last.0.truncated);
        assert_eq!(last.1.len(), 32);
    }
}
