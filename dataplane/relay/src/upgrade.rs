//! Hitless binary upgrade (issue 20): the running relay spawns the binary it was started from
//! (same argv) and hands it its listening sockets over a Unix socketpair, so the kernel never
//! refuses a connection while the two processes swap.
//!
//! ```text
//!  old (admin `upgrade`)                          new (OUTRELAY_UPGRADE_FD=0)
//!  socketpair(SEQPACKET); spawn exe, stdin = it ─► loads and validates its config (64: EOF)
//!  [len u32][inventory JSON] in chunks ─────────► Inventory { old_pid, fds, leases }
//!  fds with SCM_RIGHTS, ≤ 64 a message ─────────► adopts those whose address matches its
//!                                                  config; binds the rest; leases inherited;
//!                                                  its QUIC endpoint on a placeholder socket
//!                              ◄──────────────── "READY <pid>" (after the ready file)
//!  sd_notify MAINPID=<new pid> (it is the main process now; READY=1 from it after RELEASED)
//!  stops accepting, detaches reuseport programs,
//!  drops its copies, GOAWAY{"relay upgrading",
//!  300 ms} to agents, UDP lease tasks stopped,
//!  QUIC endpoint closed and dropped, "RELEASED" ─► rebinds its endpoint to the QUIC socket,
//!                                                  attaches its own reuseport programs
//!  spliced pairs finish (shutdown grace), exit 0
//!
//! One process at a time reads the QUIC socket: packets of the old process's connections that
//! reached the new one would be answered with stateless resets (and the old one refuses new
//! connections once closed). Agents reconnect after the GOAWAY's 300 ms; datagrams that arrive
//! before the new endpoint reads wait in the socket's receive buffer.
//! ```
//!
//! EOF, a bad message or no READY within the timeout: the old kills the child (if alive),
//! answers the failure and keeps serving (nothing was stopped).

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use outrelay_io::fdpass::{FDS_PER_MESSAGE_MAX, recv_with_fds, send_with_fds};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::lease::InheritedLease;

/// The environment variable naming the new process's end of the hand-over socket. The old
/// process passes it as the child's standard input, so its value is always `0`.
pub const UPGRADE_FD_ENV: &str = "OUTRELAY_UPGRADE_FD";
/// GOAWAY reason the old process sends its agents after the hand-over.
pub const UPGRADE_REASON: &str = "relay upgrading";
/// GOAWAY `reconnect_after_ms` after a hand-over: the time the old process needs to close its
/// QUIC endpoint, so that the agents' new Initials reach only the new process (both read the
/// same UDP socket until then, and the old one would refuse them).
pub const UPGRADE_RECONNECT_AFTER_MS: u32 = 300;
/// Default time the new process has to say READY.
pub const DEFAULT_TIMEOUT_S: u64 = 30;
/// Longest inventory accepted, in bytes.
pub const INVENTORY_MAX_BYTES: usize = 16 << 20;
/// Most descriptors one hand-over carries.
pub const FDS_MAX: usize = 65_536;
/// How long the new process waits for RELEASED before attaching its reuseport programs anyway.
pub const RELEASED_WAIT_MS: u64 = 10_000;
/// Bytes of one inventory message.
const CHUNK_BYTES: usize = 32 * 1024;
const READY: &str = "READY ";
const RELEASED: &[u8] = b"RELEASED";

/// What a handed-over descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FdKind {
    /// The agents' QUIC UDP socket.
    Quic,
    /// One worker's reverse-session listener.
    Reverse,
    /// One worker's public TLS listener.
    PublicTls,
    /// One worker's listener of a TCP lease port (plain mode).
    TcpLease,
    /// The UDP socket of a UDP lease port.
    UdpLease,
    /// One worker's TCP range socket of the eBPF lookup program.
    RangeTcp,
    /// One worker's UDP range socket of the eBPF lookup program.
    RangeUdp,
}

impl FdKind {
    fn is_tcp(self) -> bool {
        matches!(
            self,
            FdKind::Reverse | FdKind::PublicTls | FdKind::TcpLease | FdKind::RangeTcp
        )
    }
}

/// One descriptor of the inventory (in the order the descriptors follow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdEntry {
    /// What it is.
    pub kind: FdKind,
    /// Its bound address.
    pub addr: SocketAddr,
}

/// The hand-over's JSON message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// The old process.
    pub old_pid: u32,
    /// The descriptors, in the order they are sent.
    pub fds: Vec<FdEntry>,
    /// The leases the old process held.
    pub leases: Vec<InheritedLease>,
    /// TCP ports open in the old lookup map (eBPF lookup mode).
    #[serde(default)]
    pub lookup_tcp_ports: Vec<u16>,
    /// UDP ports open in the old lookup map.
    #[serde(default)]
    pub lookup_udp_ports: Vec<u16>,
}

/// Why an upgrade failed (the old process keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// A second `upgrade` while one runs.
    #[error("an upgrade is already running")]
    Busy,
    /// Draining or stopping.
    #[error("the relay is draining or stopping")]
    Stopping,
    /// This process handed over already.
    #[error("already handed over to pid {0}")]
    HandedOver(u32),
    /// The binary could not be started.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The binary.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The hand-over socket failed.
    #[error("hand-over socket: {0}")]
    Io(#[from] std::io::Error),
    /// The new process closed the socket (it exited: invalid config, say).
    #[error("the new process exited before it was ready{0}")]
    Exited(String),
    /// No READY in time.
    #[error("the new process was not ready within {0} s")]
    Timeout(u64),
    /// Something other than the protocol.
    #[error("hand-over protocol: {0}")]
    Protocol(String),
}

/// The sockets this process holds for a future hand-over (duplicates of what the workers,
/// the QUIC endpoint and the UDP port tasks own), and in a new process the inherited lease
/// sockets not adopted yet. Control path only.
#[derive(Debug, Default)]
pub struct Sockets {
    inner: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    fixed: Vec<(FdEntry, OwnedFd)>,
    tcp_ports: HashMap<u16, Vec<(SocketAddr, OwnedFd)>>,
    udp_ports: HashMap<u16, (SocketAddr, Arc<tokio::net::UdpSocket>)>,
    spare_tcp: HashMap<u16, Vec<TcpListener>>,
    spare_udp: HashMap<u16, UdpSocket>,
    spare_until: Option<Instant>,
    /// Handed over: holds nothing more.
    released: bool,
}

/// How many descriptors of each family a hand-over carries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// TCP listeners (reverse, public TLS, lease ports).
    pub tcp_listeners: usize,
    /// UDP sockets (QUIC, lease ports).
    pub udp_sockets: usize,
}

fn dup(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

impl Sockets {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds a duplicate of `fd` (QUIC, reverse or public TLS).
    ///
    /// # Errors
    /// `dup` failed (out of descriptors).
    pub fn hold(&self, kind: FdKind, fd: BorrowedFd<'_>, addr: SocketAddr) -> std::io::Result<()> {
        let fd = dup(fd)?;
        let mut held = self.lock();
        if !held.released {
            held.fixed.push((FdEntry { kind, addr }, fd));
        }
        Ok(())
    }

    /// Holds duplicates of a TCP lease port's listeners (one per worker).
    pub fn hold_tcp_port(&self, port: u16, listeners: &[TcpListener]) {
        let dups: Vec<(SocketAddr, OwnedFd)> = listeners
            .iter()
            .filter_map(|l| Some((l.local_addr().ok()?, dup(l.as_fd()).ok()?)))
            .collect();
        let mut held = self.lock();
        if !held.released {
            held.tcp_ports.insert(port, dups);
        }
    }

    /// Forgets a closed TCP lease port.
    pub fn unhold_tcp_port(&self, port: u16) {
        self.lock().tcp_ports.remove(&port);
    }

    /// Holds a UDP lease port's socket (shared with its port task: no extra descriptor).
    pub fn hold_udp_port(&self, port: u16, socket: Arc<tokio::net::UdpSocket>, addr: SocketAddr) {
        let mut held = self.lock();
        if !held.released {
            held.udp_ports.insert(port, (addr, socket));
        }
    }

    /// Forgets a closed UDP lease port.
    pub fn unhold_udp_port(&self, port: u16) {
        self.lock().udp_ports.remove(&port);
    }

    /// After a hand-over: closes every held copy and holds nothing more.
    pub fn release_all(&self) {
        let mut held = self.lock();
        *held = Held {
            released: true,
            ..Held::default()
        };
    }

    /// What a hand-over now would carry, with duplicates of the descriptors.
    fn to_send(&self) -> std::io::Result<(Vec<FdEntry>, Vec<OwnedFd>, Counts)> {
        let held = self.lock();
        let mut entries = Vec::new();
        let mut fds = Vec::new();
        for (entry, fd) in &held.fixed {
            entries.push(*entry);
            fds.push(dup(fd.as_fd())?);
        }
        for group in held.tcp_ports.values() {
            for (addr, fd) in group {
                entries.push(FdEntry {
                    kind: FdKind::TcpLease,
                    addr: *addr,
                });
                fds.push(dup(fd.as_fd())?);
            }
        }
        for (addr, fd) in held.udp_ports.values() {
            entries.push(FdEntry {
                kind: FdKind::UdpLease,
                addr: *addr,
            });
            fds.push(dup(fd.as_fd())?);
        }
        let tcp_listeners = entries.iter().filter(|e| e.kind.is_tcp()).count();
        let counts = Counts {
            tcp_listeners,
            udp_sockets: entries.len() - tcp_listeners,
        };
        Ok((entries, fds, counts))
    }

    /// New process: the inherited lease sockets, adopted by port as routes appear until
    /// `until` (then closed).
    pub fn set_spares(
        &self,
        tcp: HashMap<u16, Vec<TcpListener>>,
        udp: HashMap<u16, UdpSocket>,
        until: Instant,
    ) {
        let mut held = self.lock();
        held.spare_tcp = tcp;
        held.spare_udp = udp;
        held.spare_until = Some(until);
    }

    /// The inherited listeners of TCP lease `port` fitted to `workers`, if any.
    pub fn adopt_tcp_port(&self, port: u16, workers: usize) -> Option<Vec<TcpListener>> {
        let group = self.lock().spare_tcp.remove(&port)?;
        match fit_group(group, workers) {
            Ok(group) => {
                tracing::info!(port, "upgrade: TCP lease port adopted");
                Some(group)
            }
            Err(e) => {
                tracing::warn!(port, error = %e, "upgrade: inherited TCP lease port not adopted");
                None
            }
        }
    }

    /// The inherited socket of UDP lease `port`, if any.
    pub fn adopt_udp_port(&self, port: u16) -> Option<UdpSocket> {
        let socket = self.lock().spare_udp.remove(&port)?;
        tracing::info!(port, "upgrade: UDP lease port adopted");
        Some(socket)
    }

    /// Closes the inherited lease sockets no route took before their deadline.
    pub fn expire_spares(&self, now: Instant) {
        let mut held = self.lock();
        if held.spare_until.is_some_and(|t| now >= t) {
            let (tcp, udp) = (held.spare_tcp.len(), held.spare_udp.len());
            held.spare_tcp.clear();
            held.spare_udp.clear();
            held.spare_until = None;
            if tcp + udp > 0 {
                tracing::info!(
                    tcp_ports = tcp,
                    udp_ports = udp,
                    "upgrade: inherited lease ports no lease claimed in time closed"
                );
            }
        }
    }
}

/// Fits an inherited SO_REUSEPORT group to `workers`: adopted index-wise, extras bound on the
/// same address (SO_REUSEPORT), surplus ones closed (their queued connections are lost unless
/// `net.ipv4.tcp_migrate_req = 1`).
///
/// # Errors
/// An extra could not be bound.
pub fn fit_group(mut group: Vec<TcpListener>, workers: usize) -> std::io::Result<Vec<TcpListener>> {
    let workers = workers.max(1);
    group.truncate(workers);
    if let Some(first) = group.first()
        && group.len() < workers
    {
        let addr = first.local_addr()?;
        let extra = crate::worker::bind_reuseport(addr, workers - group.len())?;
        group.extend(extra);
    }
    for l in &group {
        l.set_nonblocking(true)?;
    }
    Ok(group)
}

/// Whether an inherited socket bound on `have` serves a config asking for `want` (port 0:
/// any port the old process got for it).
fn matches(have: SocketAddr, want: SocketAddr) -> bool {
    have.ip() == want.ip() && (want.port() == 0 || want.port() == have.port())
}

/// `listen.admin_socket` of the config at `path` (read as plain TOML: the config may be the
/// new, not yet valid one), else the default.
pub fn admin_socket_of(path: &std::path::Path) -> PathBuf {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| {
            t.get("listen")?
                .get("admin_socket")?
                .as_str()
                .map(PathBuf::from)
        })
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("/run/outrelay/relay.sock"))
}

/// `outrelay-relay upgrade`'s request: `upgrade <timeout_s>` to the admin socket at `path`;
/// the relay's answer as text.
///
/// # Errors
/// The socket's.
pub fn request(path: &std::path::Path, timeout_s: u64) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(timeout_s.saturating_add(10))))?;
    stream.write_all(format!("upgrade {timeout_s}\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Adopts the inherited listeners of `kind` where the config's address matches, else binds
/// `workers` SO_REUSEPORT listeners on `addr`.
///
/// # Errors
/// A bind failed.
pub fn listeners(
    inherited: &mut Option<Inherited>,
    kind: FdKind,
    addr: SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<TcpListener>> {
    if let Some(i) = inherited
        && let Some(group) = i.take_listeners(kind, addr, workers)?
    {
        return Ok(group);
    }
    crate::worker::bind_reuseport(addr, workers)
}

/// Holds duplicates of `group` in `sockets` for the next hand-over; returns more duplicates
/// (for the reuseport programs a new process attaches after RELEASED).
///
/// # Errors
/// `dup` failed (out of descriptors).
pub fn hold_group(
    sockets: &Sockets,
    kind: FdKind,
    group: &[TcpListener],
) -> std::io::Result<Vec<TcpListener>> {
    group
        .iter()
        .map(|l| {
            sockets.hold(kind, l.as_fd(), l.local_addr()?)?;
            l.try_clone()
        })
        .collect()
}

/// The new process's side: what the old one handed over, until adopted.
#[derive(Debug)]
pub struct Inherited {
    /// The old process.
    pub old_pid: u32,
    /// The leases it held.
    pub leases: Vec<InheritedLease>,
    lookup_ports: (Vec<u16>, Vec<u16>),
    fds: Vec<(FdEntry, Option<OwnedFd>)>,
    channel: OwnedFd,
}

/// The new process's end of the hand-over socket after READY.
#[derive(Debug)]
pub struct Channel(OwnedFd);

impl Inherited {
    /// Receives the hand-over when `OUTRELAY_UPGRADE_FD` is set (`None` otherwise). The
    /// socket is standard input; it is replaced by `/dev/null`.
    ///
    /// # Errors
    /// A malformed or truncated hand-over.
    pub fn from_env() -> Result<Option<Inherited>, UpgradeError> {
        let Some(value) = std::env::var_os(UPGRADE_FD_ENV) else {
            return Ok(None);
        };
        if value != "0" {
            return Err(UpgradeError::Protocol(format!(
                "{UPGRADE_FD_ENV}={value:?}: only 0 (standard input) is supported"
            )));
        }
        let channel = std::io::stdin().as_fd().try_clone_to_owned()?;
        let null = std::fs::File::open("/dev/null")?;
        nix::unistd::dup2_stdin(&null).map_err(std::io::Error::from)?;
        Inherited::receive(channel).map(Some)
    }

    /// Reads the inventory and its descriptors from `channel`.
    ///
    /// # Errors
    /// A malformed or truncated hand-over.
    pub fn receive(channel: OwnedFd) -> Result<Inherited, UpgradeError> {
        let proto = |m: &str| UpgradeError::Protocol(m.to_owned());
        let mut buf = vec![0u8; CHUNK_BYTES + 4];
        let (n, fds) = recv_with_fds(channel.as_fd(), &mut buf)?;
        if n < 4 || !fds.is_empty() {
            return Err(proto("no inventory header"));
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > INVENTORY_MAX_BYTES {
            return Err(proto("inventory too long"));
        }
        let mut json = Vec::with_capacity(len);
        json.extend_from_slice(&buf[4..n]);
        while json.len() < len {
            let (n, fds) = recv_with_fds(channel.as_fd(), &mut buf)?;
            if n == 0 || !fds.is_empty() {
                return Err(proto("inventory truncated"));
            }
            json.extend_from_slice(&buf[..n]);
        }
        if json.len() != len {
            return Err(proto("inventory longer than announced"));
        }
        let inventory: Inventory = serde_json::from_slice(&json)
            .map_err(|e| UpgradeError::Protocol(format!("inventory: {e}")))?;
        if inventory.fds.len() > FDS_MAX {
            return Err(proto("too many descriptors"));
        }
        let mut received: Vec<OwnedFd> = Vec::with_capacity(inventory.fds.len());
        while received.len() < inventory.fds.len() {
            let (n, fds) = recv_with_fds(channel.as_fd(), &mut buf)?;
            if n == 0 || fds.is_empty() {
                return Err(proto("descriptors truncated"));
            }
            received.extend(fds);
        }
        if received.len() != inventory.fds.len() {
            return Err(proto("more descriptors than the inventory lists"));
        }
        tracing::info!(
            old_pid = inventory.old_pid,
            fds = received.len(),
            leases = inventory.leases.len(),
            "upgrade: hand-over received"
        );
        Ok(Inherited {
            old_pid: inventory.old_pid,
            leases: inventory.leases,
            lookup_ports: (inventory.lookup_tcp_ports, inventory.lookup_udp_ports),
            fds: inventory
                .fds
                .into_iter()
                .zip(received)
                .map(|(e, fd)| (e, Some(fd)))
                .collect(),
            channel,
        })
    }

    fn take(&mut self, kind: FdKind, want: Option<SocketAddr>) -> Vec<(SocketAddr, OwnedFd)> {
        self.fds
            .iter_mut()
            .filter(|(e, fd)| {
                e.kind == kind && fd.is_some() && want.is_none_or(|w| matches(e.addr, w))
            })
            .filter_map(|(e, fd)| Some((e.addr, fd.take()?)))
            .collect()
    }

    /// The inherited listeners of `kind` bound where the config wants `want`, fitted to
    /// `workers` (see [`fit_group`]); `None` when none matches (bind anew).
    ///
    /// # Errors
    /// An extra listener could not be bound.
    pub fn take_listeners(
        &mut self,
        kind: FdKind,
        want: SocketAddr,
        workers: usize,
    ) -> std::io::Result<Option<Vec<TcpListener>>> {
        let group: Vec<TcpListener> = self
            .take(kind, Some(want))
            .into_iter()
            .map(|(_, fd)| TcpListener::from(fd))
            .collect();
        if group.is_empty() {
            return Ok(None);
        }
        let n = group.len();
        let group = fit_group(group, workers)?;
        tracing::info!(?kind, inherited = n, workers, "upgrade: listeners adopted");
        Ok(Some(group))
    }

    /// The inherited QUIC socket if it is bound where the config wants `want`.
    pub fn take_quic(&mut self, want: SocketAddr) -> Option<UdpSocket> {
        let (_, fd) = self.take(FdKind::Quic, Some(want)).into_iter().next()?;
        tracing::info!("upgrade: QUIC socket adopted");
        Some(UdpSocket::from(fd))
    }

    /// The inherited lease sockets by port, for [`Sockets::set_spares`].
    pub fn take_lease_ports(
        &mut self,
    ) -> (HashMap<u16, Vec<TcpListener>>, HashMap<u16, UdpSocket>) {
        let mut tcp: HashMap<u16, Vec<TcpListener>> = HashMap::new();
        for (addr, fd) in self.take(FdKind::TcpLease, None) {
            tcp.entry(addr.port())
                .or_default()
                .push(TcpListener::from(fd));
        }
        let udp = self
            .take(FdKind::UdpLease, None)
            .into_iter()
            .map(|(addr, fd)| (addr.port(), UdpSocket::from(fd)))
            .collect();
        (tcp, udp)
    }

    /// The lookup program's range sockets and open ports, kept open until `until`.
    pub fn take_range(&mut self, until: Instant) -> crate::steer::InheritedRange {
        let tcp = self
            .take(FdKind::RangeTcp, None)
            .into_iter()
            .map(|(_, fd)| TcpListener::from(fd))
            .collect();
        let udp = self
            .take(FdKind::RangeUdp, None)
            .into_iter()
            .map(|(_, fd)| UdpSocket::from(fd))
            .collect();
        let (tcp_ports, udp_ports) = std::mem::take(&mut self.lookup_ports);
        crate::steer::InheritedRange {
            sockets: crate::steer::RangeSockets { tcp, udp },
            tcp_ports,
            udp_ports,
            until: Some(until),
        }
    }

    /// Says READY to the old process; descriptors nothing adopted are closed here (a listen
    /// address that changed: the old socket closes with the old process).
    ///
    /// # Errors
    /// The old process is gone.
    pub fn ready(self, pid: u32) -> Result<Channel, UpgradeError> {
        let unused = self.fds.iter().filter(|(_, fd)| fd.is_some()).count();
        if unused > 0 {
            tracing::info!(unused, "upgrade: inherited sockets not adopted are closed");
        }
        send_with_fds(
            self.channel.as_fd(),
            format!("{READY}{pid}").as_bytes(),
            &[],
        )?;
        Ok(Channel(self.channel))
    }
}

impl Channel {
    /// Blocks until the old process says RELEASED (true), closes the socket or `timeout`
    /// passes (false).
    pub fn wait_released(self, timeout: Duration) -> bool {
        let mut buf = [0u8; 64];
        if wait_readable(self.0.as_fd(), timeout).is_err() {
            return false;
        }
        matches!(recv_with_fds(self.0.as_fd(), &mut buf), Ok((n, _)) if &buf[..n] == RELEASED)
    }
}

/// Waits until `fd` is readable (or hung up) within `timeout`.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<(), UpgradeError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(UpgradeError::Timeout(timeout.as_secs()));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(UpgradeError::Io(e.into())),
        }
    }
}

/// Upgrade state for `relay status`.
const SERVING: u8 = 0;
const UPGRADING: u8 = 1;
const HANDED_OVER: u8 = 2;

/// The old process's side: spawns the new binary and hands over.
pub struct Upgrader {
    exe: PathBuf,
    args: Vec<OsString>,
    sockets: Arc<Sockets>,
    relay: crate::quic::RelayHandle,
    drain: crate::quic::DrainHandle,
    ingress: Arc<crate::ingress::Ingress>,
    steering: Arc<crate::steer::Steering>,
    state: AtomicU8,
    new_pid: AtomicU32,
    done: tokio::sync::watch::Sender<Option<u32>>,
    /// The channel to the new process after READY, until [`Upgrader::release`] says RELEASED.
    channel: Mutex<Option<OwnedFd>>,
}

impl std::fmt::Debug for Upgrader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrader")
            .field("exe", &self.exe)
            .field("state", &self.state_name())
            .finish_non_exhaustive()
    }
}

/// What [`Upgrader::new`] needs.
pub struct UpgraderParts {
    /// The binary resolved at start-up (`std::env::current_exe()`).
    pub exe: PathBuf,
    /// The argv this process was started with (without argv\[0\]).
    pub args: Vec<OsString>,
    /// The sockets held for the hand-over.
    pub sockets: Arc<Sockets>,
    /// Leases to hand over.
    pub relay: crate::quic::RelayHandle,
    /// No upgrade while draining.
    pub drain: crate::quic::DrainHandle,
    /// Stops accepting after READY.
    pub ingress: Arc<crate::ingress::Ingress>,
    /// Detaches the reuseport programs after READY.
    pub steering: Arc<crate::steer::Steering>,
}

impl Upgrader {
    /// An upgrader; [`Upgrader::handed_over`] tells the main loop when to stop.
    pub fn new(parts: UpgraderParts) -> Arc<Upgrader> {
        Arc::new(Upgrader {
            exe: parts.exe,
            args: parts.args,
            sockets: parts.sockets,
            relay: parts.relay,
            drain: parts.drain,
            ingress: parts.ingress,
            steering: parts.steering,
            state: AtomicU8::new(SERVING),
            new_pid: AtomicU32::new(0),
            done: tokio::sync::watch::channel(None).0,
            channel: Mutex::new(None),
        })
    }

    /// After the hand-over, once this process's QUIC endpoint is dropped: tells the new process
    /// RELEASED (it then reads the QUIC socket and attaches its reuseport programs).
    pub fn release(&self) {
        let Some(channel) = self
            .channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        if let Err(e) = send_with_fds(channel.as_fd(), RELEASED, &[]) {
            tracing::warn!(error = %e, "upgrade: RELEASED not delivered");
        }
    }

    /// Resolves with the new pid once this process has handed over.
    pub fn handed_over(&self) -> tokio::sync::watch::Receiver<Option<u32>> {
        self.done.subscribe()
    }

    /// `serving`, `upgrading` or `handed over` (for `relay status`).
    pub fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::Acquire) {
            UPGRADING => "upgrading",
            HANDED_OVER => "handed over",
            _ => "serving",
        }
    }

    /// The status entry: state, and the new pid once handed over.
    pub fn status(&self) -> Value {
        let pid = self.new_pid.load(Ordering::Acquire);
        json!({"state": self.state_name(), "new_pid": (pid != 0).then_some(pid)})
    }

    /// Runs one upgrade; the admin answer, success or failure.
    pub async fn upgrade_answer(&self, timeout_s: u64) -> Value {
        match self.upgrade(timeout_s).await {
            Ok(v) => v,
            Err(e) => json!({"upgraded": false, "error": e.to_string()}),
        }
    }

    /// Spawns the new process, hands over and, on its READY, stops accepting here.
    ///
    /// # Errors
    /// Any [`UpgradeError`]; the process then serves as before.
    pub async fn upgrade(&self, timeout_s: u64) -> Result<Value, UpgradeError> {
        if self.drain.is_draining() || self.ingress.is_stopping() {
            return Err(UpgradeError::Stopping);
        }
        match self
            .state
            .compare_exchange(SERVING, UPGRADING, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {}
            Err(HANDED_OVER) => {
                return Err(UpgradeError::HandedOver(
                    self.new_pid.load(Ordering::Acquire),
                ));
            }
            Err(_) => return Err(UpgradeError::Busy),
        }
        let result = self.run(timeout_s.max(1)).await;
        match &result {
            Ok(_) => {
                metrics::counter!("outrelay_relay_upgrades_total", "result" => "ok").increment(1);
            }
            Err(e) => {
                self.state.store(SERVING, Ordering::Release);
                metrics::counter!("outrelay_relay_upgrades_total", "result" => "failed")
                    .increment(1);
                tracing::warn!(error = %e, "upgrade failed; serving on");
            }
        }
        result
    }

    async fn run(&self, timeout_s: u64) -> Result<Value, UpgradeError> {
        let leases = self.relay.inherited_leases().await;
        let (entries, fds, counts) = self.sockets.to_send()?;
        let old_pid = std::process::id();
        let (lookup_tcp_ports, lookup_udp_ports) = self.steering.open_ports();
        let inventory = Inventory {
            old_pid,
            fds: entries,
            leases,
            lookup_tcp_ports,
            lookup_udp_ports,
        };
        let lease_count = inventory.leases.len();
        let json = serde_json::to_vec(&inventory)
            .map_err(|e| UpgradeError::Protocol(format!("inventory: {e}")))?;
        if json.len() > INVENTORY_MAX_BYTES || fds.len() > FDS_MAX {
            return Err(UpgradeError::Protocol("inventory too large".to_owned()));
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let child = std::process::Command::new(&self.exe)
            .args(&self.args)
            .env(UPGRADE_FD_ENV, "0")
            .stdin(std::process::Stdio::from(theirs))
            .spawn()
            .map_err(|source| UpgradeError::Spawn {
                path: self.exe.display().to_string(),
                source,
            })?;
        let child_pid = child.id();
        tracing::info!(
            new_pid = child_pid,
            tcp_listeners = counts.tcp_listeners,
            udp_sockets = counts.udp_sockets,
            leases = lease_count,
            "upgrade: new process started; handing over"
        );
        let timeout = Duration::from_secs(timeout_s);
        let handshake =
            tokio::task::spawn_blocking(move || hand_over(ours, &json, &fds, timeout)).await;
        let (ours, new_pid) = match handshake {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                reap(child).await;
                return Err(e);
            }
            Err(e) => {
                reap(child).await;
                return Err(UpgradeError::Protocol(format!("hand-over task: {e}")));
            }
        };
        if new_pid != child_pid {
            tracing::warn!(new_pid, child_pid, "upgrade: READY names another pid");
        }
        // The new process serves: stop accepting here (the sockets live on there), detach the
        // reuseport programs, then let it attach its own.
        self.new_pid.store(new_pid, Ordering::Release);
        self.state.store(HANDED_OVER, Ordering::Release);
        // Under systemd the new process becomes the service's main process; only the main
        // process may say so with `NotifyAccess=main`.
        outrelay_lifecycle::notify_main_pid(new_pid);
        self.ingress.stop_accepting();
        self.steering.detach_reuseport();
        // The new process attached its lookup program with the same ports open, over the
        // same range sockets, before it said READY.
        self.steering.detach_lookup();
        self.sockets.release_all();
        // RELEASED waits for the QUIC endpoint to be gone ([`Upgrader::release`]): until then
        // this process reads the shared QUIC socket, and so must not the new one (it would
        // answer the old connections' packets with stateless resets).
        *self.channel.lock().unwrap_or_else(PoisonError::into_inner) = Some(ours);
        tracing::info!(
            new_pid,
            "upgrade: handed over; listeners closed here, GOAWAY to agents next"
        );
        drop(child); // not waited for: it outlives this process
        self.done.send_replace(Some(new_pid));
        Ok(json!({
            "upgraded": true,
            "old_pid": old_pid,
            "new_pid": new_pid,
            "handed_over": {
                "tcp_listeners": counts.tcp_listeners,
                "udp_sockets": counts.udp_sockets,
                "leases": lease_count,
            },
        }))
    }
}

/// Kills a failed new process (if alive) and reaps it.
async fn reap(mut child: std::process::Child) {
    let status = match child.try_wait() {
        Ok(Some(status)) => Some(status),
        _ => {
            let _ = child.kill();
            None
        }
    };
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    if let Some(status) = status {
        tracing::info!(%status, "upgrade: the new process had exited");
    }
}

/// The blocking hand-over: inventory, descriptors, then READY within `timeout`.
fn hand_over(
    ours: OwnedFd,
    json: &[u8],
    fds: &[OwnedFd],
    timeout: Duration,
) -> Result<(OwnedFd, u32), UpgradeError> {
    use nix::sys::socket::{setsockopt, sockopt::SendTimeout};
    let tv = nix::sys::time::TimeVal::new(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX), 0);
    setsockopt(&ours, SendTimeout, &tv).map_err(std::io::Error::from)?;
    let started = Instant::now();
    let gone = |e: std::io::Error| match e.raw_os_error() {
        Some(code) if code == nix::libc::EPIPE || code == nix::libc::ECONNRESET => {
            UpgradeError::Exited(String::new())
        }
        Some(code) if code == nix::libc::EAGAIN => UpgradeError::Timeout(timeout.as_secs()),
        _ => UpgradeError::Io(e),
    };
    let len = u32::try_from(json.len())
        .map_err(|_| UpgradeError::Protocol("inventory too large".to_owned()))?;
    let mut first = len.to_be_bytes().to_vec();
    let head = json.len().min(CHUNK_BYTES);
    first.extend_from_slice(&json[..head]);
    send_with_fds(ours.as_fd(), &first, &[]).map_err(gone)?;
    for chunk in json[head..].chunks(CHUNK_BYTES) {
        send_with_fds(ours.as_fd(), chunk, &[]).map_err(gone)?;
    }
    for batch in fds.chunks(FDS_PER_MESSAGE_MAX) {
        let borrowed: Vec<BorrowedFd<'_>> = batch.iter().map(AsFd::as_fd).collect();
        send_with_fds(ours.as_fd(), b"F", &borrowed).map_err(gone)?;
    }
    let left = timeout.saturating_sub(started.elapsed());
    wait_readable(ours.as_fd(), left)?;
    let mut buf = [0u8; 64];
    let (n, _) = recv_with_fds(ours.as_fd(), &mut buf).map_err(gone)?;
    if n == 0 {
        return Err(UpgradeError::Exited(String::new()));
    }
    let text = std::str::from_utf8(&buf[..n]).unwrap_or("");
    let pid = text
        .strip_prefix(READY)
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| UpgradeError::Protocol(format!("expected READY <pid>, got {text:?}")))?;
    Ok((ours, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_port_zero_matches_the_port_the_old_process_got() {
        let have: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
        assert!(matches(have, "127.0.0.1:0".parse().expect("addr")));
        assert!(matches(have, "127.0.0.1:4433".parse().expect("addr")));
        assert!(!matches(have, "127.0.0.1:4434".parse().expect("addr")));
        assert!(!matches(have, "0.0.0.0:4433".parse().expect("addr")));
    }

    #[test]
    fn an_inventory_with_its_descriptors_crosses_in_several_messages() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let listeners: Vec<TcpListener> = (0..FDS_PER_MESSAGE_MAX + 3)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let lease = InheritedLease {
            tenant: "t".into(),
            agent_uri: "outrelay://t/agent/a".into(),
            name: "x".repeat(100),
            hostname: None,
            tcp_port: Some(1),
            udp_port: None,
        };
        let inventory = Inventory {
            old_pid: 7,
            fds: listeners
                .iter()
                .map(|l| FdEntry {
                    kind: FdKind::TcpLease,
                    addr: l.local_addr().expect("addr"),
                })
                .collect(),
            // Longer than one chunk.
            leases: vec![lease; 2 * CHUNK_BYTES / 100],
            lookup_tcp_ports: vec![1],
            lookup_udp_ports: Vec::new(),
        };
        let json = serde_json::to_vec(&inventory).expect("json");
        assert!(json.len() > CHUNK_BYTES);
        let fds: Vec<OwnedFd> = listeners
            .iter()
            .map(|l| dup(l.as_fd()).expect("dup"))
            .collect();
        let sender = std::thread::spawn(move || {
            let r = hand_over(a, &json, &fds, Duration::from_secs(5));
            r.map(|(_, pid)| pid)
        });
        let mut got = Inherited::receive(b).expect("receive");
        assert_eq!(got.old_pid, 7);
        assert_eq!(got.leases, inventory.leases);
        let (tcp, udp) = got.take_lease_ports();
        assert_eq!(tcp.values().map(Vec::len).sum::<usize>(), listeners.len());
        assert!(udp.is_empty());
        let _ = got.ready(42).expect("ready");
        assert_eq!(sender.join().expect("join").expect("hand over"), 42);
    }

    #[test]
    fn a_new_process_that_closes_its_end_is_an_exit_not_a_hang() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        drop(b);
        let err = hand_over(a, b"{}", &[], Duration::from_secs(5)).expect_err("peer gone");
        assert!(matches!(err, UpgradeError::Exited(_)), "{err}");
    }
}
