//! OutRelay's optional eBPF steering, loaded by the relay.
//!
//! Two programs, written in C under `ebpf/bpf/`, compiled by `build.rs` with clang and loaded
//! with aya (`bpf` cargo feature, on by default):
//!
//! - [`ReuseportSteering`] (`sk_reuseport`): CPU-local accept in one `SO_REUSEPORT` group, the
//!   listener of the worker pinned on the CPU that took the SYN; the kernel's hash otherwise.
//! - [`LeasePortSteering`] (`sk_lookup`): every TCP connection / UDP datagram to a lease port
//!   range goes to one socket per worker; ports without a lease are refused by the kernel.
//!
//! Nothing is pinned in bpffs: programs, maps and links live exactly as long as the file
//! descriptors held here (and, for the reuseport program, its socket group), so a kill -9 leaves
//! nothing behind. Without the `bpf` feature every constructor returns [`EbpfError::NotBuilt`].
//!
//! Not here: choosing by SNI (a reuseport program runs at the SYN, before any ClientHello byte);
//! that stays in the worker after its peek. No `unsafe`: aya's safe API covers all we do.

#![forbid(unsafe_code)]

// Compiled with or without `bpf` so its unit tests run without clang; only the loader uses it.
#[cfg_attr(not(feature = "bpf"), allow(dead_code))]
mod encode;
#[cfg(feature = "bpf")]
mod loader;
#[cfg(not(feature = "bpf"))]
mod stub;

#[cfg(feature = "bpf")]
use loader as imp;
#[cfg(not(feature = "bpf"))]
use stub as imp;

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::os::fd::AsFd;

pub use encode::{CPUS_MAX, WORKERS_MAX};

/// A transport protocol of the lease port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP connections (the SYN is steered; established connections never go through lookup).
    Tcp,
    /// UDP datagrams (each one is steered).
    Udp,
}

/// Why eBPF steering is not running.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// Built without the `bpf` cargo feature (no programs compiled in).
    #[error("eBPF steering not built in (the `bpf` feature of outrelay-ebpf is off)")]
    NotBuilt,
    /// Loading or attaching failed: missing CAP_BPF/CAP_NET_ADMIN, old kernel, verifier... The
    /// string says what, in one line, for `mode = "on"`'s refusal and `auto`'s log line.
    #[error("eBPF steering unavailable: {0}")]
    Unavailable(String),
    /// A map update failed, or an argument does not fit the maps (port out of the range, worker
    /// index past the sockets, more than [`WORKERS_MAX`] sockets or [`CPUS_MAX`] CPUs...).
    #[error("eBPF map: {0}")]
    Map(String),
}

/// Counters of one reuseport group, summed over CPUs (monotonic while the group is attached).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReuseportStats {
    /// Connections handed to the worker pinned on the receiving CPU.
    pub local: u64,
    /// Left to the kernel's hash: no worker pinned on that CPU, or its socket is missing.
    pub no_worker: u64,
    /// Left to the kernel's hash: that worker's published load was >= `busy_at`.
    pub busy: u64,
}

/// Counters of the lease port range, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupStats {
    /// TCP connections (SYNs) handed to a worker's TCP socket.
    pub tcp_steered: u64,
    /// UDP datagrams handed to a worker's UDP socket.
    pub udp_steered: u64,
    /// TCP SYNs to a port of the range not open for TCP: the kernel answered RST.
    pub tcp_refused: u64,
    /// UDP datagrams to a port of the range not open for UDP: ICMP port unreachable.
    pub udp_refused: u64,
}

/// Probes whether the BPF programs can be loaded here: loads both programs (no attach, no
/// socket touched) and unloads them. `Err(Unavailable)` says why in one line (no CAP_BPF,
/// kernel without sk_lookup, verifier refusal); `Err(NotBuilt)` without the `bpf` feature.
pub fn probe() -> Result<(), EbpfError> {
    imp::probe()
}

/// CPU-local accept for ONE `SO_REUSEPORT` group (the relay makes two: public TLS, reverse).
///
/// Each group is its own load of the program, with its own maps, and has at most one
/// `ReuseportSteering` at a time (a second attach fails with `Map`: a socket sits in one
/// reuseport socket array only). Drop detaches the program
/// from the group (`SO_DETACH_REUSEPORT_BPF`); the group then selects by hash again. The value
/// holds a duplicate of `listeners[0]`'s descriptor for that detach, so that socket stays open
/// until this is dropped: drop the steering before (or together with) the listeners.
pub struct ReuseportSteering(imp::Reuseport);

impl ReuseportSteering {
    /// Loads the program, fills its maps and attaches it to the group of `listeners`.
    ///
    /// `listeners[w]` is worker w's listening socket of the group (all bound to the same port
    /// with `SO_REUSEPORT`, TCP listening or UDP bound; at most [`WORKERS_MAX`]).
    /// `cpu_worker[c]` is the worker pinned on CPU c (None: no worker there, so the kernel's
    /// hash; at most [`CPUS_MAX`] entries, CPUs past the slice have no worker).
    /// `busy_at`: a worker whose published load ([`LoadWriter::set`]) is >= this falls back to
    /// the hash (`u32::MAX`: never; 0: always).
    ///
    /// # Errors
    /// `Map` when a `cpu_worker` entry names a worker past `listeners` or the slices are too
    /// long, or a socket is refused by the socket array (not in a reuseport group);
    /// `Unavailable` when loading or attaching fails; `NotBuilt` without the `bpf` feature.
    pub fn attach<S: AsFd>(
        listeners: &[S],
        cpu_worker: &[Option<u32>],
        busy_at: u32,
    ) -> Result<Self, EbpfError> {
        imp::Reuseport::attach(listeners, cpu_worker, busy_at).map(Self)
    }

    /// A writer of `worker`'s load, with its own duplicated map descriptor (no lock shared
    /// between workers); `Send`, for the worker's thread.
    ///
    /// # Errors
    /// `Map` when `worker` is past the listeners or the descriptor cannot be duplicated.
    pub fn load_writer(&self, worker: u32) -> Result<LoadWriter, EbpfError> {
        self.0.load_writer(worker).map(LoadWriter)
    }

    /// The group's counters summed over CPUs. A counter that cannot be read (never expected on
    /// a map this value owns) reads 0.
    pub fn stats(&self) -> ReuseportStats {
        self.0.stats()
    }
}

/// One worker's published load in a [`ReuseportSteering`] group.
pub struct LoadWriter(imp::Writer);

impl LoadWriter {
    /// Publishes `pending` (the worker's pending connections): one `bpf()` syscall, no lock, no
    /// allocation. Call it when the value crosses a threshold, not per event.
    ///
    /// # Errors
    /// `Map` when the kernel refuses the update (not expected on an array slot in bounds).
    pub fn set(&mut self, pending: u32) -> Result<(), EbpfError> {
        self.0.set(pending)
    }
}

/// Lease ports through one socket per worker (`sk_lookup`), in the calling thread's network
/// namespace. Drop detaches (the link descriptor is closed) and frees the maps.
pub struct LeasePortSteering(imp::Lookup);

impl LeasePortSteering {
    /// Loads the program and attaches it to the calling thread's network namespace.
    ///
    /// Every TCP connection / UDP datagram to `bind_ip` (`0.0.0.0` or `::`: any local address
    /// of that family; the other family is never matched) with a destination port in `ports`
    /// goes to `tcp[w]` / `udp[w]`, w = the worker pinned on the receiving CPU (`cpu_worker`,
    /// as in [`ReuseportSteering::attach`]; CPUs without a worker use `cpu % len`; a missing
    /// socket falls back to index 0). A port of the range not open for that protocol is
    /// refused by the kernel (TCP RST, UDP ICMP port unreachable) and counted. Ports outside
    /// the range and other addresses are untouched, so relays with disjoint ranges share a
    /// namespace. All ports start closed.
    ///
    /// `tcp` are listening TCP sockets and `udp` bound UDP sockets (any address, e.g.
    /// `127.0.0.1:0`; the accepted socket's `local_addr()` / `IP_ORIGDSTADDR` gives the port
    /// dialled); either may be empty (that protocol is then refused in the whole range); at
    /// most [`WORKERS_MAX`] each. The maps hold references to these sockets until drop.
    ///
    /// # Errors
    /// `Map` for an empty range, a `cpu_worker` entry past both socket lists, too many
    /// sockets or CPUs, or a socket the sockmap refuses (TCP not listening, UDP not bound);
    /// `Unavailable` when loading or attaching fails; `NotBuilt` without the `bpf` feature.
    pub fn attach<S: AsFd, U: AsFd>(
        ports: RangeInclusive<u16>,
        bind_ip: IpAddr,
        tcp: &[S],
        udp: &[U],
        cpu_worker: &[Option<u32>],
    ) -> Result<Self, EbpfError> {
        imp::Lookup::attach(ports, bind_ip, tcp, udp, cpu_worker).map(Self)
    }

    /// Opens `port` for `proto`: from the next SYN / datagram on, it is routed (one map update).
    ///
    /// # Errors
    /// `Map` when `port` is outside the range, no socket of `proto` was given, or the update
    /// fails.
    pub fn open(&mut self, proto: Proto, port: u16) -> Result<(), EbpfError> {
        self.0.set_open(proto, port, true)
    }

    /// Closes `port` for `proto`: from the next SYN / datagram on, it is refused. Connections
    /// already established are not touched (the kernel finds them before any lookup).
    ///
    /// # Errors
    /// `Map` when `port` is outside the range or the update fails.
    pub fn close(&mut self, proto: Proto, port: u16) -> Result<(), EbpfError> {
        self.0.set_open(proto, port, false)
    }

    /// Whether `port` is open for `proto` (as last set here; false outside the range).
    pub fn is_open(&self, proto: Proto, port: u16) -> bool {
        self.0.is_open(proto, port)
    }

    /// The counters summed over CPUs. A counter that cannot be read reads 0.
    pub fn stats(&self) -> LookupStats {
        self.0.stats()
    }
}
