//! A worker's listeners: SO_REUSEPORT sockets, one per worker for each of the public TLS port,
//! the reverse-session port and every TCP lease port, so the kernel spreads new connections
//! over the workers and each accepts its own on its own ring.
//!
//! Accept takes up to [`ACCEPT_BATCH`] connections per readiness, then re-arms (others' turn).
//! Out of descriptors (EMFILE/ENFILE) the worker closes its reserve descriptor, accepts and
//! resets what waits (`fd_exhausted`) and reopens the reserve: nobody hangs in the backlog and
//! the loop does not spin (R3). Other failures (ENOBUFS, ENOMEM) park the listener until the
//! next tick instead of spinning.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::time::Duration;

use outrelay_io::Interest;
use socket2::{Domain, Protocol, Socket, Type};

use super::Worker;
use crate::ingress::stats::Drop;

/// Connections accepted per readiness event before the listener waits its turn again.
const ACCEPT_BATCH: usize = 64;
/// Connections taken with the reserve descriptor per EMFILE, before it is reopened.
const SHED_BATCH: usize = 64;
/// Listen backlog of each worker's socket.
const BACKLOG: i32 = 4096;
/// Listener keys: this bit, then the listener's index and generation.
pub(crate) const LISTENER_BIT: u64 = 1 << 59;

/// What a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Public TLS, routed by SNI.
    Sni,
    /// Agents' reverse sessions.
    Reverse,
    /// A TCP lease port.
    Tcp(u16),
    /// Every TCP lease port at once: the lookup program steers them here, and the accepted
    /// socket's local address names the port the client dialled.
    TcpRange,
}

/// Binds `n` SO_REUSEPORT listeners on `addr`: the first on `addr` as given (port 0: the
/// kernel picks), the others on the port the first got. Non-blocking.
///
/// # Errors
/// Any socket call failed (the address is taken by another user, say).
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> std::io::Result<Vec<TcpListener>> {
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(n.max(1));
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        let listener: TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// A listener owned by a worker.
#[derive(Debug)]
pub(crate) struct Listening {
    pub(crate) kind: ListenerKind,
    pub(crate) socket: TcpListener,
    pub(crate) armed: Interest,
    /// Not re-armed after a failure other than EMFILE; re-armed at the next tick.
    pub(crate) parked: bool,
}

/// How an accept failed.
enum AcceptError {
    /// The peer went away before the accept, or a signal: try again at once.
    Transient,
    /// EMFILE/ENFILE: shed with the reserve descriptor.
    NoDescriptors,
    /// Anything else (ENOBUFS, ENOMEM): back off.
    Other,
}

impl AcceptError {
    fn of(e: &std::io::Error) -> AcceptError {
        use nix::errno::Errno;
        match e.raw_os_error().map(Errno::from_raw) {
            Some(Errno::EMFILE | Errno::ENFILE) => AcceptError::NoDescriptors,
            Some(Errno::ECONNABORTED | Errno::ECONNRESET | Errno::EINTR | Errno::EPROTO) => {
                AcceptError::Transient
            }
            _ => AcceptError::Other,
        }
    }
}

/// Closes a refused connection with a reset (SO_LINGER 0): the client learns at once, and
/// the relay keeps no TIME_WAIT for it.
pub(crate) fn reset<S: std::os::fd::AsFd>(stream: S) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// The key of listener `index`.
pub(crate) fn listener_key(index: usize) -> u64 {
    LISTENER_BIT | index as u64
}

impl Worker {
    /// Takes over `socket` as one of this worker's listeners and waits for its connections.
    pub(crate) fn listen(&mut self, kind: ListenerKind, socket: TcpListener) {
        if self.stopping {
            return; // dropped: closed
        }
        let _ = socket.set_nonblocking(true);
        let index = match self.listeners.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.listeners.push(None);
                self.listeners.len() - 1
            }
        };
        self.listeners[index] = Some(Listening {
            kind,
            socket,
            armed: Interest::NONE,
            parked: false,
        });
        self.arm_listener(index);
    }

    fn arm_listener(&mut self, index: usize) {
        let Some(Some(l)) = self.listeners.get_mut(index) else {
            return;
        };
        if let Ok(armed) = self.engine.arm_user(
            l.socket.as_fd(),
            listener_key(index),
            l.armed,
            Interest::READ,
        ) {
            l.armed = armed;
        } else {
            l.parked = true;
        }
    }

    /// Closes the listeners of `kind` (all of them with `None`).
    pub(crate) fn unlisten(&mut self, kind: Option<ListenerKind>) {
        for index in 0..self.listeners.len() {
            let matches = self.listeners[index]
                .as_ref()
                .is_some_and(|l| kind.is_none_or(|k| l.kind == k));
            if matches && let Some(l) = self.listeners[index].take() {
                self.engine
                    .forget_user(l.socket.as_fd(), listener_key(index), l.armed);
            }
        }
    }

    /// Re-arms listeners parked after an accept failure, and reopens a reserve descriptor
    /// lost to exhaustion (once per tick).
    pub(crate) fn unpark_listeners(&mut self) {
        if self.reserve.is_none() {
            self.reserve = std::fs::File::open("/dev/null").ok();
        }
        for index in 0..self.listeners.len() {
            let parked = self.listeners[index].as_ref().is_some_and(|l| l.parked);
            if parked {
                if let Some(Some(l)) = self.listeners.get_mut(index) {
                    l.parked = false;
                }
                self.arm_listener(index);
            }
        }
    }

    /// Listener `index` is readable: accept a batch, then wait again.
    pub(crate) fn accept_ready(&mut self, index: usize) {
        let Some(Some(l)) = self.listeners.get_mut(index) else {
            return;
        };
        l.armed = Interest::NONE;
        let kind = l.kind;
        let mut park = false;
        for _ in 0..ACCEPT_BATCH {
            let Some(Some(l)) = self.listeners.get(index) else {
                return;
            };
            match l.socket.accept() {
                Ok((stream, peer)) => self.accepted(kind, stream, peer),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => match AcceptError::of(&e) {
                    AcceptError::Transient => {}
                    AcceptError::NoDescriptors => {
                        if !self.shed(index) {
                            park = true;
                            break;
                        }
                    }
                    AcceptError::Other => {
                        park = true;
                        break;
                    }
                },
            }
        }
        if park {
            if let Some(Some(l)) = self.listeners.get_mut(index) {
                l.parked = true;
            }
        } else {
            self.arm_listener(index);
        }
    }

    /// Frees the reserve descriptor, accepts and resets what waits in the backlog, reopens
    /// the reserve. False when nothing could be shed.
    fn shed(&mut self, index: usize) -> bool {
        self.ingress.note_fd_exhausted(self.now);
        if self.reserve.take().is_none() {
            self.reserve = std::fs::File::open("/dev/null").ok();
            return false;
        }
        let mut shed = 0;
        while shed < SHED_BATCH {
            let Some(Some(l)) = self.listeners.get(index) else {
                break;
            };
            match l.socket.accept() {
                Ok((stream, _)) => {
                    reset(stream);
                    self.ingress.stats.drop(Drop::FdExhausted);
                    shed += 1;
                }
                Err(_) => break,
            }
        }
        self.reserve = std::fs::File::open("/dev/null").ok();
        shed > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuseport_listeners_share_the_port_the_first_got() {
        let listeners = bind_reuseport("127.0.0.1:0".parse().expect("addr"), 3).expect("bind");
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").port())
            .collect();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|p| *p == ports[0] && *p != 0), "{ports:?}");
    }
}
