//! What the harness reads from `/proc`: CPU time and PSS of a process tree, kernel slab, and
//! which loopback ports are listening (so readiness checks never open a stray connection).

use std::collections::{BTreeSet, HashSet};
use std::fs;

use anyhow::{Context, Result, bail};

/// The fields of `/proc/<pid>/stat` the harness uses, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFields {
    /// Parent process id.
    pub ppid: u32,
    /// User-mode CPU of the process (all its threads).
    pub utime_ticks: u64,
    /// Kernel-mode CPU of the process (all its threads).
    pub stime_ticks: u64,
    /// User-mode CPU of children it has waited for (e.g. socat's forked copies).
    pub cutime_ticks: u64,
    /// Kernel-mode CPU of children it has waited for.
    pub cstime_ticks: u64,
}

impl StatFields {
    /// All four CPU counters together: the process and its reaped children.
    pub fn total_ticks(&self) -> u64 {
        self.utime_ticks + self.stime_ticks + self.cutime_ticks + self.cstime_ticks
    }
}

/// Parses one `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the LAST `)`.
pub fn parse_stat(line: &str) -> Result<StatFields> {
    let close = line.rfind(')').context("stat line without ')'")?;
    let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let field = |n: usize| -> Result<u64> {
        let raw = rest
            .get(n - 3)
            .with_context(|| format!("stat line has no field {n}"))?;
        raw.parse::<u64>()
            .with_context(|| format!("stat field {n} is not a number: {raw:?}"))
    };
    Ok(StatFields {
        ppid: u32::try_from(field(4)?).context("ppid out of range")?,
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        cutime_ticks: field(16)?,
        cstime_ticks: field(17)?,
    })
}

/// `roots` and all their live descendants, found by scanning `/proc/*/stat` for parent ids.
/// Processes that exit during the scan are skipped.
pub fn process_tree(roots: &[u32]) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(stat) = read_stat(pid) {
                parent_of.push((pid, stat.ppid));
            }
        }
    }
    let mut tree: BTreeSet<u32> = roots.iter().copied().collect();
    loop {
        let before = tree.len();
        for &(pid, ppid) in &parent_of {
            if tree.contains(&ppid) {
                tree.insert(pid);
            }
        }
        if tree.len() == before {
            return tree.into_iter().collect();
        }
    }
}

/// Reads and parses `/proc/<pid>/stat`.
pub fn read_stat(pid: u32) -> Result<StatFields> {
    let line = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat(&line)
}

/// CPU seconds (user + system, including reaped children) used so far by the process trees
/// under `roots`. Sample before and after a measurement and subtract.
pub fn tree_cpu_seconds(roots: &[u32]) -> f64 {
    let ticks: u64 = process_tree(roots)
        .into_iter()
        .filter_map(|pid| read_stat(pid).ok())
        .map(|s| s.total_ticks())
        .sum();
    ticks as f64 / clock_ticks_per_second()
}

/// `sysconf(_SC_CLK_TCK)`, 100 when it cannot be read (the value on every Linux we run on).
fn clock_ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    }
}

/// Parses the `Pss:` line of `/proc/<pid>/smaps_rollup`, in bytes.
pub fn parse_smaps_rollup_pss_bytes(text: &str) -> Result<u64> {
    kib_field(text, "Pss:").map(|kib| kib * 1024)
}

/// Total proportional set size (bytes) of the process trees under `roots`: shared pages are
/// divided among the processes sharing them, so summing over a tree does not double-count.
pub fn tree_pss_bytes(roots: &[u32]) -> u64 {
    process_tree(roots)
        .into_iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|text| parse_smaps_rollup_pss_bytes(&text).ok())
        .sum()
}

/// Parses the `VmRSS:` line of `/proc/<pid>/status`, in bytes.
pub fn parse_status_rss_bytes(text: &str) -> Result<u64> {
    kib_field(text, "VmRSS:").map(|kib| kib * 1024)
}

/// Resident set size of one process now (`/proc/<pid>/status` `VmRSS`), in bytes; `None` when
/// the process is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_rss_bytes(&text).ok()
}

/// Parses the `Slab:` line of `/proc/meminfo`, in bytes.
pub fn parse_meminfo_slab_bytes(text: &str) -> Result<u64> {
    kib_field(text, "Slab:").map(|kib| kib * 1024)
}

/// System-wide kernel slab memory now, in bytes (noisy: every process on the box moves it).
pub fn slab_bytes() -> Result<u64> {
    parse_meminfo_slab_bytes(&fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?)
}

/// Ports with a TCP socket in LISTEN state on 127.0.0.1 or 0.0.0.0 (from `/proc/net/tcp`).
pub fn listening_loopback_ports() -> Result<HashSet<u16>> {
    parse_listening_ports(&fs::read_to_string("/proc/net/tcp").context("reading /proc/net/tcp")?)
}

/// Ports with a bound UDP socket on 127.0.0.1 or 0.0.0.0 (from `/proc/net/udp`).
pub fn bound_udp_loopback_ports() -> Result<HashSet<u16>> {
    parse_loopback_ports(
        &fs::read_to_string("/proc/net/udp").context("reading /proc/net/udp")?,
        None,
    )
}

/// Parses `/proc/net/tcp`: local address `0100007F:1F90` (hex, host byte order on x86) and
/// state `0A` (LISTEN).
pub fn parse_listening_ports(text: &str) -> Result<HashSet<u16>> {
    const TCP_LISTEN: &str = "0A";
    parse_loopback_ports(text, Some(TCP_LISTEN))
}

/// Loopback or wildcard local ports of a `/proc/net/{tcp,udp}` table, only in `state` if given.
fn parse_loopback_ports(text: &str, state_filter: Option<&str>) -> Result<HashSet<u16>> {
    let mut ports = HashSet::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state)) = (cols.get(1), cols.get(3)) else {
            bail!("short /proc/net table line: {line:?}");
        };
        if state_filter.is_some_and(|f| f != *state) {
            continue;
        }
        let (ip, port) = local.split_once(':').context("local address without ':'")?;
        if ip == "0100007F" || ip == "00000000" {
            ports.insert(u16::from_str_radix(port, 16).context("port is not hex")?);
        }
    }
    Ok(ports)
}

/// Sockets of `/proc/net/<proto>` and `<proto>6` (`tcp`: LISTEN only; `udp`: any state)
/// whose local port is in `lo..=hi`, on any address; one per socket (SO_REUSEPORT groups
/// count each member).
pub fn ports_in_range(proto: &str, lo: u16, hi: u16) -> Result<u64> {
    let mut n = 0;
    for table in [proto.to_owned(), format!("{proto}6")] {
        let path = format!("/proc/net/{table}");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // no IPv6 here
        };
        n += count_ports_in_range(&text, (proto == "tcp").then_some("0A"), lo, hi)
            .with_context(|| format!("parsing {path}"))?;
    }
    Ok(n)
}

/// Rows of a `/proc/net/{tcp,udp}{,6}` table with a local port in `lo..=hi` (in `state` if
/// given).
pub fn count_ports_in_range(text: &str, state: Option<&str>, lo: u16, hi: u16) -> Result<u64> {
    let mut n = 0;
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(st)) = (cols.get(1), cols.get(3)) else {
            bail!("short /proc/net table line: {line:?}");
        };
        if state.is_some_and(|s| s != *st) {
            continue;
        }
        let (_, port) = local
            .rsplit_once(':')
            .context("local address without ':'")?;
        let port = u16::from_str_radix(port, 16).context("port is not hex")?;
        if (lo..=hi).contains(&port) {
            n += 1;
        }
    }
    Ok(n)
}

/// Open file descriptors of one process now (entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> Result<u64> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?;
    Ok(u64::try_from(entries.count()).unwrap_or(u64::MAX))
}

/// Parses the soft `Max open files` limit of a `/proc/<pid>/limits` text.
pub fn parse_limits_nofile(text: &str) -> Result<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no Max open files line")?;
    let soft = line["Max open files".len()..]
        .split_whitespace()
        .next()
        .context("Max open files line without a value")?;
    if soft == "unlimited" {
        return Ok(u64::MAX);
    }
    soft.parse()
        .with_context(|| format!("Max open files {soft:?} is not a number"))
}

/// A process's soft open-file limit (`RLIMIT_NOFILE`).
pub fn nofile_limit(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .with_context(|| format!("reading /proc/{pid}/limits"))?;
    parse_limits_nofile(&text)
}

/// The socket counts of `/proc/net/sockstat` (this network namespace's sockets; the `mem`
/// figures are pages of buffer memory charged to the protocol across every namespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sockstat {
    /// `sockets: used`.
    pub sockets_used: u64,
    /// `TCP: inuse` (listeners included).
    pub tcp_inuse: u64,
    /// `TCP: mem`, in pages.
    pub tcp_mem_pages: u64,
    /// `UDP: inuse`.
    pub udp_inuse: u64,
    /// `UDP: mem`, in pages.
    pub udp_mem_pages: u64,
}

/// Parses `/proc/net/sockstat`.
pub fn parse_sockstat(text: &str) -> Result<Sockstat> {
    let field = |proto: &str, name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(proto))
            .with_context(|| format!("sockstat: no {proto} line"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words
            .iter()
            .position(|w| *w == name)
            .with_context(|| format!("sockstat: no {name} in {line:?}"))?;
        words
            .get(at + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("sockstat: {name} in {line:?} has no number"))
    };
    Ok(Sockstat {
        sockets_used: field("sockets:", "used")?,
        tcp_inuse: field("TCP:", "inuse")?,
        tcp_mem_pages: field("TCP:", "mem")?,
        udp_inuse: field("UDP:", "inuse")?,
        udp_mem_pages: field("UDP:", "mem")?,
    })
}

/// `/proc/net/sockstat` now.
pub fn sockstat() -> Result<Sockstat> {
    parse_sockstat(&std::fs::read_to_string("/proc/net/sockstat").context("reading sockstat")?)
}

/// The number in a `Name:   1234 kB` line.
fn kib_field(text: &str, name: &str) -> Result<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .with_context(|| format!("no {name} line"))?;
    let mut words = line[name.len()..].split_whitespace();
    let value = words
        .next()
        .with_context(|| format!("{name} line without a value"))?;
    if words.next() != Some("kB") {
        bail!("{name} line is not in kB: {line:?}");
    }
    value
        .parse::<u64>()
        .with_context(|| format!("{name} value is not a number: {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_limits_and_fds_are_read() {
        let text = "sockets: used 11\nTCP: inuse 3 orphan 0 tw 1 alloc 4 mem 216\n\
                    UDP: inuse 2 mem 180\nUDPLITE: inuse 0\nRAW: inuse 0\n";
        assert_eq!(
            parse_sockstat(text).expect("valid"),
            Sockstat {
                sockets_used: 11,
                tcp_inuse: 3,
                tcp_mem_pages: 216,
                udp_inuse: 2,
                udp_mem_pages: 180
            }
        );
        assert!(parse_sockstat("sockets: used 1\n").is_err());
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_limits_nofile(limits).expect("valid"), 20_000);
        // Our own: a file we open shows up, and the limit is above what we hold.
        let me = std::process::id();
        let before = open_fds(me).expect("own fds");
        let f = std::fs::File::open("/proc/self/stat").expect("open");
        assert!(open_fds(me).expect("own fds") > before);
        drop(f);
        assert!(nofile_limit(me).expect("own limit") >= before);
        sockstat().expect("this kernel's sockstat");
        let table = "  sl  local_address rem_address   st\n\
                     0: 0100007F:2710 00000000:0000 0A\n\
                     1: 0100007F:2710 00000000:0000 0A\n\
                     2: 0100007F:4E20 00000000:0000 0A\n\
                     3: 0100007F:2711 0100007F:9C40 01\n";
        assert_eq!(
            count_ports_in_range(table, Some("0A"), 10_000, 19_999).expect("valid"),
            2
        );
        assert_eq!(
            count_ports_in_range(table, None, 10_000, 20_000).expect("valid"),
            4
        );
    }

    #[test]
    fn rss_is_read_from_the_status_vmrss_line() {
        let status = "Name:\toutrelay-relay\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(
            parse_status_rss_bytes(status).expect("VmRSS"),
            10_240 * 1024
        );
        assert!(parse_status_rss_bytes("Name:\tx\n").is_err());
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
    }

    #[test]
    fn stat_fields_are_counted_after_the_last_paren() {
        // A command name with spaces and a ')' inside, as a process may choose.
        let line = "4242 (weird) name) S 17 4242 4242 0 -1 4194560 300 0 0 0 \
                    123 45 6 7 20 0 3 0 100 1000000 200 18446744073709551615 0";
        let s = parse_stat(line).expect("valid stat line");
        assert_eq!(
            s,
            StatFields {
                ppid: 17,
                utime_ticks: 123,
                stime_ticks: 45,
                cutime_ticks: 6,
                cstime_ticks: 7
            }
        );
        assert_eq!(s.total_ticks(), 181);
    }

    #[test]
    fn truncated_or_garbled_stat_lines_are_errors() {
        assert!(parse_stat("12 (x) S 1 2 3").is_err());
        assert!(parse_stat("no paren here").is_err());
        let garbled = "1 (x) S 0 1 1 0 -1 0 0 0 0 0 abc 1 1 1";
        assert!(parse_stat(garbled).is_err());
    }

    #[test]
    fn our_own_stat_parses_and_we_are_in_our_tree() {
        let me = std::process::id();
        read_stat(me).expect("own /proc/self/stat parses");
        assert!(process_tree(&[me]).contains(&me));
    }

    #[test]
    fn pss_and_slab_lines_are_read_in_bytes() {
        let smaps = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss: 9000 kB\nPss:  4096 kB\n\
                     Pss_Anon: 100 kB\n";
        assert_eq!(
            parse_smaps_rollup_pss_bytes(smaps).expect("has Pss"),
            4096 * 1024
        );
        let meminfo = "MemTotal: 100 kB\nSlab:     2048 kB\nSReclaimable: 5 kB\n";
        assert_eq!(
            parse_meminfo_slab_bytes(meminfo).expect("has Slab"),
            2048 * 1024
        );
        assert!(parse_meminfo_slab_bytes("Slab: 12 pages\n").is_err());
        assert!(parse_meminfo_slab_bytes("MemTotal: 1 kB\n").is_err());
    }

    #[test]
    fn listening_loopback_ports_are_found_and_others_ignored() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue\n\
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n\
           1: 0100007F:1F91 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 0 0 2\n\
           2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 3\n\
           3: 0202000A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 4\n";
        let ports = parse_listening_ports(text).expect("valid table");
        assert_eq!(ports, HashSet::from([8080, 22]));
    }

    #[test]
    fn a_listener_we_open_shows_up() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = l.local_addr().expect("local addr").port();
        assert!(
            listening_loopback_ports()
                .expect("reads /proc/net/tcp")
                .contains(&port)
        );
    }

    #[test]
    fn a_udp_socket_we_bind_shows_up_in_any_state() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        let port = s.local_addr().expect("local addr").port();
        assert!(
            bound_udp_loopback_ports()
                .expect("reads /proc/net/udp")
                .contains(&port)
        );
        // A connected UDP socket is state 01 (ESTABLISHED); still bound.
        let text = "  sl  local_address rem_address   st tx_queue rx_queue\n\
           0: 0100007F:1F90 0100007F:0035 01 00000000:00000000 00:00000000 00000000 0 0 1\n";
        assert_eq!(
            parse_loopback_ports(text, None).expect("valid table"),
            HashSet::from([8080])
        );
    }
}
