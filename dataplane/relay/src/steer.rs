//! Optional eBPF steering (`[ebpf]`; the programs and their loader are `outrelay-ebpf`).
//!
//! Two programs, each optional, neither needed for correctness:
//!
//! - **CPU-local accept** (`sk_reuseport`, one per SO_REUSEPORT group: public TLS, reverse
//!   sessions): the SYN goes to the listener of the worker pinned on the CPU that took the
//!   packet, so accept, ClientHello peek and splice share that core's caches. A CPU without a
//!   worker, or a worker whose set-up connections reached its share of
//!   `ingress.pending_conn_max`, falls back to the kernel's hash. Workers are pinned (worker i
//!   on the i-th CPU the relay may run on) only while this program runs: pinning is what makes
//!   "the worker on this CPU" mean something.
//! - **Lease ports through one socket per worker** (`sk_lookup`, in the relay's network
//!   namespace): every TCP connection and UDP datagram to `[leases] min_port..=max_port` goes to
//!   worker w's range socket; the socket learns the port the client dialled (getsockname,
//!   IP_RECVORIGDSTADDR). A port starts or stops routing with one map update, made when the
//!   lease table is published, before LEASE_GRANT goes out; a port with no live lease is refused
//!   by the kernel and counted. Without it, each TCP lease port is `workers` listeners bound on
//!   the maintenance tick.
//!
//! `mode = "auto"` probes and falls back to plain listeners with one log line; `"on"` refuses
//! to start; `"off"` never loads. Nothing is pinned in bpffs: programs, maps and links live
//! as long as the relay's descriptors, so even kill -9 leaves nothing behind.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use outrelay_ebpf::{EbpfError, LeasePortSteering, LoadWriter, Proto, ReuseportSteering};

use crate::state::Shared;
use crate::worker::bind_reuseport;

/// Environment variable that decides what `mode = "auto"` means: `off` or `on` forces it
/// (the test suite's plain-listener pass sets `off`); unset or `auto`: probe.
pub const MODE_ENV: &str = "OUTRELAY_EBPF_MODE";

/// `[ebpf] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EbpfMode {
    /// Load when possible; otherwise plain listeners and one log line.
    Auto,
    /// Load or refuse to start.
    On,
    /// Never load.
    Off,
}

impl EbpfMode {
    /// What `mode = "auto"` means here: [`MODE_ENV`] when it names a mode, else probing.
    pub fn auto() -> EbpfMode {
        std::env::var(MODE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(EbpfMode::Auto)
    }

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            EbpfMode::Auto => "auto",
            EbpfMode::On => "on",
            EbpfMode::Off => "off",
        }
    }
}

impl FromStr for EbpfMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EbpfMode::Auto),
            "on" => Ok(EbpfMode::On),
            "off" => Ok(EbpfMode::Off),
            other => Err(format!("{other:?} is not one of auto, on, off")),
        }
    }
}

/// `[ebpf]`, checked.
#[derive(Debug, Clone)]
pub struct EbpfConfig {
    /// Whether to load.
    pub mode: EbpfMode,
    /// CPU-local accept on the public TLS and reverse-session ports.
    pub reuseport: bool,
    /// The lease port range through one socket per worker.
    pub lookup: bool,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        EbpfConfig {
            mode: EbpfMode::Off,
            reuseport: true,
            lookup: true,
        }
    }
}

/// A worker's share of `ingress.pending_conn_max`: with this many connections in set-up it is
/// skipped by CPU-local accept (the kernel's hash picks another). The program and the workers'
/// load writers both use it.
pub fn busy_at(pending_conn_max: usize, workers: usize) -> usize {
    pending_conn_max.div_ceil(workers.max(1)).max(1)
}

/// The lease port range the lookup program serves.
#[derive(Debug, Clone)]
pub struct LeaseRange {
    /// `[leases] min_port..=max_port`.
    pub ports: RangeInclusive<u16>,
    /// `listen.lease_bind_ip` (unspecified: every local address of its family).
    pub bind_ip: IpAddr,
    /// TCP leases are on.
    pub tcp: bool,
    /// UDP leases are on.
    pub udp: bool,
}

/// What [`Steering::start`] steers.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// Worker threads.
    pub workers: usize,
    /// Each worker's public TLS listener (one SO_REUSEPORT group).
    pub public: &'a [TcpListener],
    /// Each worker's reverse-session listener.
    pub reverse: &'a [TcpListener],
    /// The lease port range; `None` when neither TCP nor UDP leases are on.
    pub lease_range: Option<LeaseRange>,
    /// A worker with this many connections in set-up is skipped by CPU-local accept.
    pub busy_at: u32,
    /// At a hand-over: the old process's range sockets and open ports (see
    /// [`InheritedRange`]).
    pub inherited: Option<InheritedRange>,
}

/// What a new process inherits for the lookup program at a hand-over: the range sockets
/// (used instead of binding when there is one per worker) and the ports the old process had
/// open, opened in the new map before anything else and kept without a route until `until`
/// (the agents' leases come back meanwhile).
#[derive(Debug, Default)]
pub struct InheritedRange {
    /// The old process's range sockets.
    pub sockets: RangeSockets,
    /// TCP ports open in the old map.
    pub tcp_ports: Vec<u16>,
    /// UDP ports open in the old map.
    pub udp_ports: Vec<u16>,
    /// When the ports not routed again close.
    pub until: Option<std::time::Instant>,
}

/// The lookup program's sockets, one per worker each (empty when it does not run).
#[derive(Debug, Default)]
pub struct RangeSockets {
    /// Listening TCP sockets: worker w accepts every lease-port connection steered to it.
    pub tcp: Vec<TcpListener>,
    /// UDP sockets receiving every lease-port datagram (IP_RECVORIGDSTADDR on).
    pub udp: Vec<UdpSocket>,
}

/// `[ebpf] mode = "on"` and a program could not be loaded or attached.
#[derive(Debug, thiserror::Error)]
#[error("[ebpf] mode = \"on\" but steering cannot start: {0}")]
pub struct SteerError(String);

/// The lookup program and the ports open in its map.
struct Lookup {
    /// `None` once detached (the old process after a hand-over).
    program: Option<LeasePortSteering>,
    range: LeaseRange,
    tcp: HashSet<u16>,
    udp: HashSet<u16>,
    /// Ports inherited at a hand-over, kept open without a route until `keep_until`.
    keep: HashSet<(bool, u16)>,
    keep_until: Option<std::time::Instant>,
}

/// The running programs (any may be absent) and what they count.
pub struct Steering {
    mode: EbpfMode,
    /// Why `auto` runs without programs.
    unavailable: Option<String>,
    /// CPU-local accept per group: `[public, reverse]`. Behind a lock only so that stopping
    /// can detach them (the program holds a duplicate of one listener of its group, which
    /// would otherwise keep the group taking connections nobody accepts).
    reuseport: Mutex<[Option<ReuseportSteering>; 2]>,
    lookup: Option<Mutex<Lookup>>,
    /// The CPU each worker is pinned to (`None`: not pinned).
    cpus: Vec<Option<usize>>,
    /// Port map updates the kernel refused (the port then stays as it was).
    map_errors: AtomicU64,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("mode", &self.mode)
            .field("unavailable", &self.unavailable)
            .field("cpus", &self.cpus)
            .finish_non_exhaustive()
    }
}

/// Counters of the running programs (summed over CPUs).
#[derive(Debug, Default, Clone, Copy)]
pub struct SteerCounters {
    /// `[public, reverse]` × `[local, no_worker, busy]`.
    pub reuseport: [[u64; 3]; 2],
    /// `[tcp, udp]` × `[steered, refused]`.
    pub lookup: [[u64; 2]; 2],
    /// Port map updates that failed.
    pub map_errors: u64,
}

impl Steering {
    /// No program: plain SO_REUSEPORT listeners, one per lease port per worker.
    pub fn off(mode: EbpfMode, workers: usize) -> Steering {
        Steering {
            mode,
            unavailable: None,
            reuseport: Mutex::new([None, None]),
            lookup: None,
            cpus: vec![None; workers],
            map_errors: AtomicU64::new(0),
        }
    }

    /// Loads and attaches what `config` asks for.
    ///
    /// # Errors
    /// Only with `mode = "on"`: something could not be loaded or attached (one line).
    pub fn start(
        config: &EbpfConfig,
        inputs: Inputs<'_>,
    ) -> Result<(Steering, RangeSockets), SteerError> {
        let wanted = config.reuseport || (config.lookup && inputs.lease_range.is_some());
        if config.mode == EbpfMode::Off || !wanted {
            return Ok((
                Steering::off(config.mode, inputs.workers),
                RangeSockets::default(),
            ));
        }
        let workers = inputs.workers;
        match Steering::attach(config, inputs) {
            Ok(started) => Ok(started),
            Err(why) if config.mode == EbpfMode::On => Err(SteerError(why)),
            Err(why) => {
                tracing::warn!(
                    reason = %why,
                    "ebpf steering unavailable (mode = \"auto\"): plain SO_REUSEPORT listeners"
                );
                let mut off = Steering::off(config.mode, workers);
                off.unavailable = Some(why);
                Ok((off, RangeSockets::default()))
            }
        }
    }

    /// All or nothing: a failure drops (detaches) what was attached before it.
    fn attach(config: &EbpfConfig, inputs: Inputs<'_>) -> Result<(Steering, RangeSockets), String> {
        let text = |e: EbpfError| e.to_string();
        outrelay_ebpf::probe().map_err(text)?;
        let mut me = Steering::off(config.mode, inputs.workers);
        let mut cpu_worker = Vec::new();
        if config.reuseport {
            let plan = cpu_plan(inputs.workers).map_err(|e| format!("CPU affinity: {e}"))?;
            me.cpus = plan.cpus;
            cpu_worker = plan.cpu_worker;
            let groups = me
                .reuseport
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner);
            for (slot, listeners) in groups.iter_mut().zip([inputs.public, inputs.reverse]) {
                if !listeners.is_empty() {
                    *slot = Some(
                        ReuseportSteering::attach(listeners, &cpu_worker, inputs.busy_at)
                            .map_err(text)?,
                    );
                }
            }
        }
        let mut sockets = RangeSockets::default();
        let range = inputs.lease_range.filter(|r| {
            // `::` takes IPv4 too (v4-mapped) with plain listeners; the program matches one
            // family, so a dual-stack range keeps its per-port listeners.
            let dual_stack = r.bind_ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
            if config.lookup && dual_stack {
                tracing::warn!("ebpf lookup skipped: lease_bind_ip = \"::\" is dual-stack, the program serves one family; TCP lease ports keep per-port listeners");
            }
            !dual_stack
        });
        if config.lookup
            && let Some(range) = range
        {
            let inherited = inputs.inherited.unwrap_or_default();
            let fits = |n: usize, on: bool| if on { n == inputs.workers } else { n == 0 };
            sockets = if fits(inherited.sockets.tcp.len(), range.tcp)
                && fits(inherited.sockets.udp.len(), range.udp)
                && inherited.sockets.tcp.len() + inherited.sockets.udp.len() > 0
            {
                tracing::info!("upgrade: lookup range sockets adopted");
                inherited.sockets
            } else {
                bind_range_sockets(&range, inputs.workers)
                    .map_err(|e| format!("range sockets: {e}"))?
            };
            let mut program = LeasePortSteering::attach(
                range.ports.clone(),
                range.bind_ip,
                &sockets.tcp,
                &sockets.udp,
                &cpu_worker,
            )
            .map_err(text)?;
            let (mut tcp, mut udp, mut keep) = (HashSet::new(), HashSet::new(), HashSet::new());
            for (is_tcp, port) in inherited
                .tcp_ports
                .iter()
                .map(|p| (true, *p))
                .chain(inherited.udp_ports.iter().map(|p| (false, *p)))
            {
                let proto = if is_tcp { Proto::Tcp } else { Proto::Udp };
                if program.open(proto, port).is_ok() {
                    keep.insert((is_tcp, port));
                    if is_tcp {
                        tcp.insert(port)
                    } else {
                        udp.insert(port)
                    };
                }
            }
            if !keep.is_empty() {
                tracing::info!(
                    ports = keep.len(),
                    "upgrade: inherited lease ports open in the lookup map"
                );
            }
            me.lookup = Some(Mutex::new(Lookup {
                program: Some(program),
                range,
                tcp,
                udp,
                keep,
                keep_until: inherited.until,
            }));
        }
        let reuseport = me.programs()[..2].iter().any(|(_, on)| *on);
        tracing::info!(
            reuseport,
            lookup = me.lookup.is_some(),
            cpus = ?me.cpus,
            "ebpf steering active"
        );
        Ok((me, sockets))
    }

    /// `[ebpf] mode` as configured.
    pub fn mode(&self) -> EbpfMode {
        self.mode
    }

    /// Why `auto` fell back to plain listeners (`None`: it did not).
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// The CPU worker `w` pins itself to.
    pub fn worker_cpu(&self, w: usize) -> Option<usize> {
        self.cpus.get(w).copied().flatten()
    }

    /// Whether lease ports are served through the range sockets (then no per-port listener is
    /// bound).
    pub fn lookup_active(&self) -> bool {
        self.lookup.is_some()
    }

    /// Which programs run: `(name, active)` for the `ebpf_active` gauge and `relay status`.
    pub fn programs(&self) -> [(&'static str, bool); 3] {
        let groups = self
            .reuseport
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        [
            ("reuseport_public", groups[0].is_some()),
            ("reuseport_reverse", groups[1].is_some()),
            ("lookup", self.lookup.is_some()),
        ]
    }

    /// Attaches CPU-local accept to `public` and `reverse` after start-up: a new process at a
    /// hand-over, once the old one detached its programs from the same groups (`RELEASED`).
    /// Workers started before have no load writers (they are never skipped when busy).
    /// Failures are logged: the groups keep the kernel's hash.
    pub fn attach_reuseport(
        &self,
        config: &EbpfConfig,
        public: &[TcpListener],
        reverse: &[TcpListener],
        busy_at: u32,
    ) {
        if config.mode == EbpfMode::Off || !config.reuseport || self.unavailable.is_some() {
            return;
        }
        let plan = match cpu_plan(self.cpus.len()) {
            Ok(p) => p,
            Err(e) => return tracing::warn!(error = %e, "reuseport steering not attached"),
        };
        let mut groups = self
            .reuseport
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (slot, listeners) in groups.iter_mut().zip([public, reverse]) {
            if listeners.is_empty() || slot.is_some() {
                continue;
            }
            match ReuseportSteering::attach(listeners, &plan.cpu_worker, busy_at) {
                Ok(p) => *slot = Some(p),
                Err(e) => tracing::warn!(error = %e, "reuseport steering not attached"),
            }
        }
        tracing::info!(
            public = groups[0].is_some(),
            reverse = groups[1].is_some(),
            "upgrade: reuseport steering attached"
        );
    }

    /// The lease ports open in the lookup map now: (TCP, UDP).
    pub fn open_ports(&self) -> (Vec<u16>, Vec<u16>) {
        self.lookup.as_ref().map_or_else(Default::default, |l| {
            let l = l.lock().unwrap_or_else(PoisonError::into_inner);
            (
                l.tcp.iter().copied().collect(),
                l.udp.iter().copied().collect(),
            )
        })
    }

    /// After a hand-over: detaches the lookup program (the new process attached its own, with
    /// the same ports open, over the same range sockets).
    pub fn detach_lookup(&self) {
        if let Some(l) = &self.lookup {
            l.lock().unwrap_or_else(PoisonError::into_inner).program = None;
        }
    }

    /// Stopping: detaches CPU-local accept, so the groups' sockets close with the workers'
    /// listeners (connections arriving meanwhile are refused, not queued).
    pub fn detach_reuseport(&self) {
        let mut groups = self
            .reuseport
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *groups = [None, None];
    }

    /// Worker `w`'s writers of its load, one per reuseport group (each its own map
    /// descriptor: nothing shared between workers).
    pub fn load_writers(&self, w: usize) -> Vec<LoadWriter> {
        let Ok(w) = u32::try_from(w) else {
            return Vec::new();
        };
        let groups = self
            .reuseport
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        groups
            .iter()
            .flatten()
            .filter_map(|p| match p.load_writer(w) {
                Ok(writer) => Some(writer),
                Err(e) => {
                    tracing::warn!(worker = w, error = %e, "no load writer: that worker is never skipped when busy");
                    None
                }
            })
            .collect()
    }

    /// Opens the lookup map for every TCP/UDP port `shared` wants (routed, or expected for a
    /// lease inherited at an upgrade: [`Shared::wanted_ports`]) and closes the rest. Called
    /// with the lease lock held, right after a snapshot is published and before any grant
    /// naming a new port goes out (a granted port routes at once, a released one is refused
    /// at once), and when leases are expected. The wanted set is read under the map's lock,
    /// so the last caller's view wins. One map update per changed port.
    pub fn sync_ports(&self, shared: &Shared) {
        let Some(lookup) = &self.lookup else {
            return;
        };
        let mut guard = lookup.lock().unwrap_or_else(PoisonError::into_inner);
        let wanted = shared.wanted_ports(std::time::Instant::now());
        let Lookup {
            program,
            range,
            tcp,
            udp,
            keep,
            keep_until,
        } = &mut *guard;
        let Some(program) = program.as_mut() else {
            return;
        };
        if keep_until.is_some_and(|t| std::time::Instant::now() >= t) {
            keep.clear();
            *keep_until = None;
        }
        let mut errors = 0u64;
        if range.tcp {
            sync_one(
                program,
                Proto::Tcp,
                tcp,
                wanted.tcp.iter().copied(),
                |p| wanted.tcp.contains(&p) || keep.contains(&(true, p)),
                &mut errors,
            );
        }
        if range.udp {
            sync_one(
                program,
                Proto::Udp,
                udp,
                wanted.udp.iter().copied(),
                |p| wanted.udp.contains(&p) || keep.contains(&(false, p)),
                &mut errors,
            );
        }
        if errors > 0 {
            self.map_errors.fetch_add(errors, Ordering::Relaxed);
        }
    }

    /// The programs' counters now.
    pub fn counters(&self) -> SteerCounters {
        let mut c = SteerCounters {
            map_errors: self.map_errors.load(Ordering::Relaxed),
            ..SteerCounters::default()
        };
        let groups = self
            .reuseport
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (i, group) in groups.iter().enumerate() {
            if let Some(p) = group {
                let s = p.stats();
                c.reuseport[i] = [s.local, s.no_worker, s.busy];
            }
        }
        drop(groups);
        if let Some(lookup) = &self.lookup
            && let Some(program) = &lookup
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .program
        {
            let s = program.stats();
            c.lookup = [
                [s.tcp_steered, s.tcp_refused],
                [s.udp_steered, s.udp_refused],
            ];
        }
        c
    }
}

/// Opens the ports of `live` missing from `open`, closes the ports of `open` that `holds`
/// no longer has.
fn sync_one(
    program: &mut LeasePortSteering,
    proto: Proto,
    open: &mut HashSet<u16>,
    live: impl Iterator<Item = u16>,
    holds: impl Fn(u16) -> bool,
    errors: &mut u64,
) {
    for port in live {
        if !open.contains(&port) {
            match program.open(proto, port) {
                Ok(()) => {
                    open.insert(port);
                }
                Err(e) => {
                    *errors += 1;
                    tracing::warn!(port, ?proto, error = %e, "lease port not opened in the lookup map");
                }
            }
        }
    }
    open.retain(|port| {
        if holds(*port) {
            return true;
        }
        match program.close(proto, *port) {
            Ok(()) => false,
            Err(e) => {
                *errors += 1;
                tracing::warn!(port, ?proto, error = %e, "lease port not closed in the lookup map; retried at the next publish");
                true
            }
        }
    });
}

/// Workers and CPUs: worker i on the i-th CPU the relay may run on (round robin when there
/// are more workers than CPUs); `cpu_worker[c]` is the first worker on CPU c.
struct CpuPlan {
    cpus: Vec<Option<usize>>,
    cpu_worker: Vec<Option<u32>>,
}

fn cpu_plan(workers: usize) -> nix::Result<CpuPlan> {
    use nix::sched::{CpuSet, sched_getaffinity};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0))?;
    let cpus_allowed: Vec<usize> = (0..CpuSet::count())
        .filter(|c| allowed.is_set(*c).unwrap_or(false))
        .collect();
    if cpus_allowed.is_empty() {
        return Err(nix::errno::Errno::EINVAL);
    }
    let cpus: Vec<Option<usize>> = (0..workers)
        .map(|w| Some(cpus_allowed[w % cpus_allowed.len()]))
        .collect();
    let last = cpus_allowed.iter().copied().max().unwrap_or(0);
    let mut cpu_worker = vec![None; last + 1];
    for (w, cpu) in cpus.iter().enumerate() {
        if let Some(c) = cpu
            && cpu_worker[*c].is_none()
        {
            cpu_worker[*c] = u32::try_from(w).ok();
        }
    }
    Ok(CpuPlan { cpus, cpu_worker })
}

/// One TCP listener and one UDP socket per worker for the lookup program, on the loopback
/// address of the range's family with a kernel-chosen port: the program hands them lease-port
/// traffic whatever address they are bound to, and binding loopback keeps their own port off
/// the network.
fn bind_range_sockets(range: &LeaseRange, workers: usize) -> std::io::Result<RangeSockets> {
    let ip: IpAddr = if range.bind_ip.is_ipv6() {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    let mut sockets = RangeSockets::default();
    if range.tcp {
        sockets.tcp = bind_reuseport(SocketAddr::new(ip, 0), workers)?;
    }
    if range.udp {
        for _ in 0..workers {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(SocketAddr::new(ip, 0)),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            socket.set_nonblocking(true)?;
            if ip.is_ipv6() {
                nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::Ipv6OrigDstAddr,
                    &true,
                )?;
            } else {
                nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::Ipv4OrigDstAddr,
                    &true,
                )?;
            }
            socket.bind(&SocketAddr::new(ip, 0).into())?;
            sockets.udp.push(socket.into());
        }
    }
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_name_themselves() {
        for m in [EbpfMode::Auto, EbpfMode::On, EbpfMode::Off] {
            assert_eq!(m.name().parse::<EbpfMode>(), Ok(m));
        }
        assert!("yes".parse::<EbpfMode>().is_err());
    }

    #[test]
    fn every_worker_gets_an_allowed_cpu_and_each_cpu_names_its_first_worker() {
        let plan = cpu_plan(5).expect("affinity");
        assert_eq!(plan.cpus.len(), 5);
        for (w, cpu) in plan.cpus.iter().enumerate() {
            let c = cpu.expect("pinned");
            let first = plan.cpu_worker[c].expect("a worker on that CPU");
            assert!(first as usize <= w);
            assert_eq!(plan.cpus[first as usize], Some(c));
        }
    }
}
