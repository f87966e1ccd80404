//! The aya side (feature `bpf`): loads the objects `build.rs` compiled, fills the maps,
//! attaches, and reads the counters back.

use std::error::Error as StdError;
use std::fs::File;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{Array, Map, MapData, PerCpuArray, ReusePortSockArray, SockMap};
use aya::programs::{SkLookup, SkReuseport, links::FdLink};
use aya::{Ebpf, EbpfLoader, include_bytes_aligned};

use crate::encode::{LookupConfig, cpu_slots, open_bit, socket_count};
use crate::{EbpfError, LookupStats, Proto, ReuseportStats};

static REUSEPORT_OBJ: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport.bpf.o"));
static LOOKUP_OBJ: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lookup.bpf.o"));

const REUSEPORT_PROG: &str = "select_local_worker";
const LOOKUP_PROG: &str = "steer_lease_port";

/// Longest `Unavailable` / `Map` message: a verifier log can be thousands of lines.
const MESSAGE_BYTES_MAX: usize = 400;

pub(crate) fn probe() -> Result<(), EbpfError> {
    let mut reuseport = load_object(EbpfLoader::new(), REUSEPORT_OBJ, "reuseport")?;
    program_mut::<SkReuseport>(&mut reuseport, REUSEPORT_PROG)?
        .load()
        .map_err(|e| unavailable("load the sk_reuseport program", &e))?;
    let mut lookup = load_object(EbpfLoader::new(), LOOKUP_OBJ, "lookup")?;
    program_mut::<SkLookup>(&mut lookup, LOOKUP_PROG)?
        .load()
        .map_err(|e| unavailable("load the sk_lookup program", &e))?;
    Ok(())
}

pub(crate) struct Reuseport {
    /// `listeners[0]`, duplicated: the handle for `SO_DETACH_REUSEPORT_BPF` on drop.
    group: OwnedFd,
    /// Emptied on drop: a socket belongs to one socket array at a time, and the kernel frees a
    /// dropped array later (deferred), so a re-attach right after a drop would get EBUSY.
    sockets: ReusePortSockArray<MapData>,
    /// The `load` array (the writers duplicate its descriptor).
    load: MapData,
    workers: u32,
    stats: PerCpuArray<MapData, u64>,
}

impl Reuseport {
    pub(crate) fn attach<S: AsFd>(
        listeners: &[S],
        cpu_worker: &[Option<u32>],
        busy_at: u32,
    ) -> Result<Self, EbpfError> {
        let workers = socket_count("listener", listeners.len())?;
        let Some(first) = listeners.first() else {
            return Err(EbpfError::Map(
                "no listener in the reuseport group".to_owned(),
            ));
        };
        let slots = cpu_slots(cpu_worker, listeners.len())?;
        let group = first
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| map_error("dup listener", &e))?;

        let mut loader = EbpfLoader::new();
        loader.override_global("busy_at", &busy_at, true);
        let mut ebpf = load_object(loader, REUSEPORT_OBJ, "reuseport")?;
        // Load the program first: it then holds its own references to the maps, so the ones
        // taken out of `ebpf` below may be dropped (their fds closed) before the attach.
        program_mut::<SkReuseport>(&mut ebpf, REUSEPORT_PROG)?
            .load()
            .map_err(|e| unavailable("load the sk_reuseport program", &e))?;

        let mut sockets: ReusePortSockArray<MapData> = take_map(&mut ebpf, "workers")?;
        for (worker, socket) in (0u32..).zip(listeners) {
            if let Err(e) = sockets.set(worker, &socket.as_fd(), 0) {
                // Release the sockets already placed (see `sockets`); EBUSY here means another
                // steering still holds this group.
                for placed in 0..worker {
                    let _ = sockets.clear_index(&placed);
                }
                return Err(map_error(
                    &format!("put worker {worker}'s listener in the group's socket array"),
                    &e,
                ));
            }
        }
        fill_cpu_worker(&mut ebpf, &slots)?;
        let load = take_map_data(&mut ebpf, "load")?;
        let stats: PerCpuArray<MapData, u64> = take_map(&mut ebpf, "stats")?;

        program_mut::<SkReuseport>(&mut ebpf, REUSEPORT_PROG)?
            .attach(group.as_fd())
            .map_err(|e| {
                unavailable(
                    "attach the sk_reuseport program (SO_ATTACH_REUSEPORT_EBPF)",
                    &e,
                )
            })?;
        // The group holds its own reference to the program: `ebpf` (program fd, the object's
        // other maps) can go.
        Ok(Self {
            group,
            sockets,
            load,
            workers,
            stats,
        })
    }

    pub(crate) fn load_writer(&self, worker: u32) -> Result<Writer, EbpfError> {
        if worker >= self.workers {
            return Err(EbpfError::Map(format!(
                "no worker {worker}: the group has {} listeners",
                self.workers
            )));
        }
        let fd = self
            .load
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| map_error("dup the load map", &e))?;
        let data = MapData::from_fd(fd).map_err(|e| map_error("open the load map", &e))?;
        let map = Map::from_map_data(data).map_err(|e| map_error("open the load map", &e))?;
        let load = Array::try_from(map).map_err(|e| map_error("open the load map", &e))?;
        Ok(Writer { load, worker })
    }

    pub(crate) fn stats(&self) -> ReuseportStats {
        let [local, no_worker, busy] = read_stats(&self.stats);
        ReuseportStats {
            local,
            no_worker,
            busy,
        }
    }
}

impl Drop for Reuseport {
    fn drop(&mut self) {
        // Nothing to do on failure: the group is gone with its sockets, and the program with it.
        let _ = SkReuseport::detach(self.group.as_fd());
        for worker in 0..self.workers {
            let _ = self.sockets.clear_index(&worker);
        }
    }
}

pub(crate) struct Writer {
    load: Array<MapData, u32>,
    worker: u32,
}

impl Writer {
    pub(crate) fn set(&mut self, pending: u32) -> Result<(), EbpfError> {
        self.load
            .set(self.worker, pending, 0)
            .map_err(|e| map_error("publish the worker load", &e))
    }
}

pub(crate) struct Lookup {
    config: LookupConfig,
    n_tcp: u32,
    n_udp: u32,
    /// What `open_ports` holds, per port of the range (OPEN_TCP | OPEN_UDP bits).
    open: Vec<u8>,
    open_ports: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    /// Emptied on drop, after the detach: the maps hold references to the relay's sockets, and
    /// the kernel frees dropped maps later (deferred); this releases them at once.
    socks: [(SockMap<MapData>, u32); 2],
    /// The netns attachment: closing the link fd detaches the program (always `Some` until drop).
    link: Option<FdLink>,
}

impl Lookup {
    pub(crate) fn attach<S: AsFd, U: AsFd>(
        ports: RangeInclusive<u16>,
        bind_ip: IpAddr,
        tcp: &[S],
        udp: &[U],
        cpu_worker: &[Option<u32>],
    ) -> Result<Self, EbpfError> {
        let config = LookupConfig::new(&ports, bind_ip)?;
        let n_tcp = socket_count("tcp", tcp.len())?;
        let n_udp = socket_count("udp", udp.len())?;
        let slots = cpu_slots(cpu_worker, tcp.len().max(udp.len()))?;
        // The calling thread's namespace (a thread may have entered another one than the
        // process's main thread).
        let netns = File::open("/proc/thread-self/ns/net")
            .map_err(|e| unavailable("open /proc/thread-self/ns/net", &e))?;

        let mut loader = EbpfLoader::new();
        loader
            .override_global("port_lo", &config.port_lo, true)
            .override_global("port_hi", &config.port_hi, true)
            .override_global("family", &config.family, true)
            .override_global("addr_any", &config.addr_any, true)
            .override_global("bind_addr", &config.bind_addr, true)
            .override_global("n_tcp", &n_tcp, true)
            .override_global("n_udp", &n_udp, true)
            .map_max_entries("open_ports", config.ports_len());
        let mut ebpf = load_object(loader, LOOKUP_OBJ, "lookup")?;
        // Load first (see Reuseport::attach); attach only once the maps are filled.
        program_mut::<SkLookup>(&mut ebpf, LOOKUP_PROG)?
            .load()
            .map_err(|e| unavailable("load the sk_lookup program", &e))?;

        let tcp_socks = fill_sockmap(&mut ebpf, "tcp_socks", "TCP listener", tcp)?;
        let udp_socks = fill_sockmap(&mut ebpf, "udp_socks", "UDP socket", udp)?;
        fill_cpu_worker(&mut ebpf, &slots)?;
        let open_ports: Array<MapData, u32> = take_map(&mut ebpf, "open_ports")?;
        let stats: PerCpuArray<MapData, u64> = take_map(&mut ebpf, "stats")?;

        let program = program_mut::<SkLookup>(&mut ebpf, LOOKUP_PROG)?;
        let link_id = program.attach(netns).map_err(|e| {
            unavailable("attach the sk_lookup program to the network namespace", &e)
        })?;
        let link = program
            .take_link(link_id)
            .map_err(|e| unavailable("take the sk_lookup link", &e))?;
        let len = usize::try_from(config.ports_len()).map_err(|e| map_error("range length", &e))?;
        Ok(Self {
            config,
            n_tcp,
            n_udp,
            open: vec![0; len],
            open_ports,
            stats,
            socks: [(tcp_socks, n_tcp), (udp_socks, n_udp)],
            link: Some(link.into()),
        })
    }

    pub(crate) fn set_open(
        &mut self,
        proto: Proto,
        port: u16,
        open: bool,
    ) -> Result<(), EbpfError> {
        let index = self.config.index(port)?;
        let sockets = match proto {
            Proto::Tcp => self.n_tcp,
            Proto::Udp => self.n_udp,
        };
        if open && sockets == 0 {
            return Err(EbpfError::Map(format!(
                "cannot open {proto:?} port {port}: no {proto:?} socket was given"
            )));
        }
        let slot = usize::try_from(index).map_err(|e| map_error("port index", &e))?;
        let bit = u8::try_from(open_bit(proto)).map_err(|e| map_error("open bit", &e))?;
        let bits = if open {
            self.open[slot] | bit
        } else {
            self.open[slot] & !bit
        };
        self.open_ports
            .set(index, u32::from(bits), 0)
            .map_err(|e| map_error(&format!("update port {port}"), &e))?;
        self.open[slot] = bits;
        Ok(())
    }

    pub(crate) fn is_open(&self, proto: Proto, port: u16) -> bool {
        let Ok(index) = self.config.index(port) else {
            return false;
        };
        usize::try_from(index)
            .ok()
            .and_then(|slot| self.open.get(slot))
            .is_some_and(|bits| u32::from(*bits) & open_bit(proto) != 0)
    }

    pub(crate) fn stats(&self) -> LookupStats {
        let [tcp_steered, udp_steered, tcp_refused, udp_refused] = read_stats(&self.stats);
        LookupStats {
            tcp_steered,
            udp_steered,
            tcp_refused,
            udp_refused,
        }
    }
}

impl Drop for Lookup {
    fn drop(&mut self) {
        drop(self.link.take());
        for (map, len) in &mut self.socks {
            for worker in 0..*len {
                let _ = map.clear_index(&worker);
            }
        }
    }
}

fn load_object(mut loader: EbpfLoader<'_>, object: &[u8], name: &str) -> Result<Ebpf, EbpfError> {
    loader
        .load(object)
        .map_err(|e| unavailable(&format!("load the {name} object (maps)"), &e))
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| EbpfError::Unavailable(format!("program {name} missing from the object")))?;
    program
        .try_into()
        .map_err(|e| unavailable(&format!("program {name}"), &e))
}

fn take_map_data(ebpf: &mut Ebpf, name: &str) -> Result<MapData, EbpfError> {
    match ebpf.take_map(name) {
        Some(
            Map::Array(data)
            | Map::PerCpuArray(data)
            | Map::ReusePortSockArray(data)
            | Map::SockMap(data),
        ) => Ok(data),
        Some(_) => Err(EbpfError::Unavailable(format!(
            "map {name} has an unexpected type"
        ))),
        None => Err(EbpfError::Unavailable(format!(
            "map {name} missing from the object"
        ))),
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| EbpfError::Unavailable(format!("map {name} missing from the object")))?;
    T::try_from(map).map_err(|e| unavailable(&format!("map {name}"), &e))
}

fn fill_cpu_worker(ebpf: &mut Ebpf, slots: &[u32]) -> Result<(), EbpfError> {
    let mut map: Array<MapData, u32> = take_map(ebpf, "cpu_worker")?;
    for (cpu, slot) in (0u32..).zip(slots) {
        if *slot != 0 {
            map.set(cpu, *slot, 0)
                .map_err(|e| map_error(&format!("cpu_worker[{cpu}]"), &e))?;
        }
    }
    Ok(())
}

fn fill_sockmap<S: AsFd>(
    ebpf: &mut Ebpf,
    name: &str,
    what: &str,
    sockets: &[S],
) -> Result<SockMap<MapData>, EbpfError> {
    let mut map: SockMap<MapData> = take_map(ebpf, name)?;
    for (worker, socket) in (0u32..).zip(sockets) {
        map.set(worker, &socket.as_fd(), 0)
            .map_err(|e| map_error(&format!("put worker {worker}'s {what} in {name}"), &e))?;
    }
    Ok(map)
}

fn read_stats<const N: usize>(stats: &PerCpuArray<MapData, u64>) -> [u64; N] {
    let mut sums = [0u64; N];
    for (index, sum) in (0u32..).zip(sums.iter_mut()) {
        if let Ok(values) = stats.get(&index, 0) {
            *sum = values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v));
        }
    }
    sums
}

fn unavailable(what: &str, error: &dyn StdError) -> EbpfError {
    EbpfError::Unavailable(one_line(what, error))
}

fn map_error(what: &str, error: &dyn StdError) -> EbpfError {
    EbpfError::Map(one_line(what, error))
}

fn is_log_statistics(line: &str) -> bool {
    [
        "processed ",
        "verification time",
        "stack depth",
        "Permission denied",
        "Invalid argument",
    ]
    .iter()
    .any(|p| line.starts_with(p))
}

/// `what: error: source: ...` on one line, at most [`MESSAGE_BYTES_MAX`]: a multi-line message
/// (the verifier's log) keeps its first and last lines, which say what was refused and why.
fn one_line(what: &str, error: &dyn StdError) -> String {
    let mut line = what.to_owned();
    let mut next = Some(error);
    let mut denied = false;
    while let Some(e) = next {
        let text = e.to_string();
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let first = lines.next().unwrap_or_default();
        // aya's errors often repeat their source's text: say it once.
        if !line.contains(first) {
            line.push_str(": ");
            line.push_str(first);
        }
        // The verifier's log ends with statistics; the reason is the line before them.
        if let Some(last) = lines.rev().find(|l| !is_log_statistics(l)) {
            line.push_str(" ... ");
            line.push_str(last);
        }
        denied |= text.contains("Operation not permitted");
        next = e.source();
    }
    if denied {
        line.push_str(" (needs CAP_BPF and CAP_NET_ADMIN)");
    }
    if line.len() > MESSAGE_BYTES_MAX {
        let mut cut = MESSAGE_BYTES_MAX;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    line
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    };

    use super::*;

    fn bpf_or_skip(test: &str) -> bool {
        if let Err(e) = probe() {
            eprintln!("SKIP (no CAP_BPF/kernel support: {e}) {test}");
            return false;
        }
        true
    }

    fn reuseport_listener() -> TcpListener {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .expect("socket");
        setsockopt(&fd, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
        let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        bind(fd.as_raw_fd(), &addr).expect("bind");
        listen(&fd, Backlog::new(16).expect("backlog")).expect("listen");
        TcpListener::from(fd)
    }

    #[test]
    fn drop_detaches_the_program_from_the_group() {
        if !bpf_or_skip("drop_detaches_the_program_from_the_group") {
            return;
        }
        let listener = reuseport_listener();
        // The check can tell: with a program attached, a detach succeeds...
        let steering = Reuseport::attach(&[&listener], &[Some(0)], u32::MAX).expect("attach");
        SkReuseport::detach(&listener).expect("a program was attached");
        drop(steering);
        // ...and after the drop there is none left to detach (ENOENT).
        let steering = Reuseport::attach(&[&listener], &[Some(0)], u32::MAX).expect("attach again");
        drop(steering);
        let error = SkReuseport::detach(&listener).expect_err("drop detached the program");
        assert!(
            error.to_string().contains("SO_DETACH_REUSEPORT_BPF"),
            "{error}"
        );
        let source = error.source().map(ToString::to_string).unwrap_or_default();
        assert!(source.contains("No such file"), "ENOENT expected: {source}");
    }

    #[test]
    fn a_multi_line_error_becomes_one_line_with_its_reason() {
        let log = std::io::Error::other(
            "BPF_PROG_LOAD failed. Verifier output: 0: R1=ctx()\n46: (61) r3 = *(u32 *)(r3 +0)\n\
             dereference of modified ctx ptr R3 off=40 disallowed\nverification time 90 usec\n\
             stack depth 24\nprocessed 39 insns (limit 1000000)\n",
        );
        let line = one_line("load the sk_lookup program", &log);
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("load the sk_lookup program: BPF_PROG_LOAD failed."),
            "{line}"
        );
        assert!(
            line.ends_with("dereference of modified ctx ptr R3 off=40 disallowed"),
            "{line}"
        );
        let denied = one_line("load", &std::io::Error::from_raw_os_error(1));
        assert!(
            denied.ends_with("(needs CAP_BPF and CAP_NET_ADMIN)"),
            "{denied}"
        );
        let long = std::io::Error::other("x".repeat(2 * MESSAGE_BYTES_MAX));
        assert_eq!(one_line("long", &long).len(), MESSAGE_BYTES_MAX);
    }
}
