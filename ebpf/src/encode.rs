//! The pure part: what the loader writes into the programs' `.rodata` and maps, validated.
//! No syscalls here, so it is unit-tested without BPF.

use std::net::IpAddr;
use std::ops::RangeInclusive;

use crate::{EbpfError, Proto};

/// Sockets per program (the size of the socket arrays, `WORKERS_MAX` in `ebpf/bpf/*.bpf.c`).
pub const WORKERS_MAX: usize = 256;
/// CPUs the `cpu_worker` arrays cover (`CPUS_MAX` in `ebpf/bpf/*.bpf.c`); a CPU past it has no
/// worker.
pub const CPUS_MAX: usize = 1024;

/// Address families as the kernel numbers them (`ctx->family`).
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The `cpu_worker` array: entry c = worker pinned on CPU c plus one, 0 for none.
///
/// # Errors
/// `Map` when `cpu_worker` is longer than [`CPUS_MAX`] or names a worker >= `workers`.
pub(crate) fn cpu_slots(cpu_worker: &[Option<u32>], workers: usize) -> Result<Vec<u32>, EbpfError> {
    if cpu_worker.len() > CPUS_MAX {
        return Err(EbpfError::Map(format!(
            "cpu_worker has {} CPUs, the map holds {CPUS_MAX}",
            cpu_worker.len()
        )));
    }
    cpu_worker
        .iter()
        .enumerate()
        .map(|(cpu, worker)| match worker {
            None => Ok(0),
            Some(w) if usize::try_from(*w).is_ok_and(|w| w < workers) => Ok(w + 1),
            Some(w) => Err(EbpfError::Map(format!(
                "cpu_worker[{cpu}] = worker {w}, but there are {workers} sockets"
            ))),
        })
        .collect()
}

/// Checks a socket list's length against [`WORKERS_MAX`]; returns it as the program's `n`.
pub(crate) fn socket_count(what: &str, len: usize) -> Result<u32, EbpfError> {
    u32::try_from(len)
        .ok()
        .filter(|_| len <= WORKERS_MAX)
        .ok_or_else(|| EbpfError::Map(format!("{len} {what} sockets, the map holds {WORKERS_MAX}")))
}

/// The lookup program's `.rodata` (names as in `ebpf/bpf/lookup.bpf.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LookupConfig {
    pub port_lo: u32,
    pub port_hi: u32,
    pub family: u32,
    /// 1: every local address of `family`.
    pub addr_any: u32,
    /// The address in network byte order, as `ctx->local_ip4` / `local_ip6[4]` hold it: the
    /// address bytes read as native-endian words. IPv4 uses `[0]`.
    pub bind_addr: [u32; 4],
}

impl LookupConfig {
    /// # Errors
    /// `Map` for an empty range.
    pub(crate) fn new(ports: &RangeInclusive<u16>, bind_ip: IpAddr) -> Result<Self, EbpfError> {
        if ports.is_empty() {
            return Err(EbpfError::Map(format!(
                "empty port range {}..={}",
                ports.start(),
                ports.end()
            )));
        }
        let mut bind_addr = [0u32; 4];
        let family = match bind_ip {
            IpAddr::V4(v4) => {
                bind_addr[0] = u32::from_ne_bytes(v4.octets());
                AF_INET
            }
            IpAddr::V6(v6) => {
                for (word, bytes) in bind_addr.iter_mut().zip(v6.octets().chunks_exact(4)) {
                    *word = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                }
                AF_INET6
            }
        };
        Ok(Self {
            port_lo: u32::from(*ports.start()),
            port_hi: u32::from(*ports.end()),
            family,
            addr_any: u32::from(bind_ip.is_unspecified()),
            bind_addr,
        })
    }

    /// Entries of the `open_ports` array: one per port of the range.
    pub(crate) fn ports_len(&self) -> u32 {
        self.port_hi - self.port_lo + 1
    }

    /// `port`'s index in `open_ports`.
    ///
    /// # Errors
    /// `Map` when `port` is outside the range.
    pub(crate) fn index(&self, port: u16) -> Result<u32, EbpfError> {
        let port = u32::from(port);
        if (self.port_lo..=self.port_hi).contains(&port) {
            Ok(port - self.port_lo)
        } else {
            Err(EbpfError::Map(format!(
                "port {port} outside the lease range {}..={}",
                self.port_lo, self.port_hi
            )))
        }
    }
}

/// `proto`'s bit in an `open_ports` value (`OPEN_TCP` / `OPEN_UDP` in lookup.bpf.c).
pub(crate) fn open_bit(proto: Proto) -> u32 {
    match proto {
        Proto::Tcp => 1,
        Proto::Udp => 2,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn cpu_slots_store_worker_plus_one_and_refuse_unknown_workers() {
        let slots = cpu_slots(&[Some(1), None, Some(0)], 2).expect("valid");
        assert_eq!(slots, vec![2, 0, 1]);
        assert!(matches!(cpu_slots(&[Some(2)], 2), Err(EbpfError::Map(_))));
        assert!(matches!(cpu_slots(&[Some(0)], 0), Err(EbpfError::Map(_))));
        assert!(matches!(
            cpu_slots(&vec![None; CPUS_MAX + 1], 1),
            Err(EbpfError::Map(_))
        ));
        assert_eq!(
            cpu_slots(&vec![None; CPUS_MAX], 1).expect("fits").len(),
            CPUS_MAX
        );
    }

    #[test]
    fn socket_count_is_bounded_by_the_map() {
        assert_eq!(socket_count("tcp", 0).expect("empty is fine"), 0);
        assert_eq!(socket_count("tcp", WORKERS_MAX).expect("fits"), 256);
        assert!(matches!(
            socket_count("udp", WORKERS_MAX + 1),
            Err(EbpfError::Map(_))
        ));
    }

    #[test]
    fn ipv4_address_is_stored_in_network_byte_order() {
        let config =
            LookupConfig::new(&(20_000..=20_999), IpAddr::V4(Ipv4Addr::new(127, 77, 0, 1)))
                .expect("valid");
        // The word's bytes in memory are the address octets, as in ctx->local_ip4.
        assert_eq!(config.bind_addr[0].to_ne_bytes(), [127, 77, 0, 1]);
        assert_eq!(config.bind_addr[1..], [0, 0, 0]);
        assert_eq!((config.family, config.addr_any), (AF_INET, 0));
        assert_eq!(
            (config.port_lo, config.port_hi, config.ports_len()),
            (20_000, 20_999, 1_000)
        );
    }

    #[test]
    fn ipv6_address_words_follow_the_octets() {
        let ip: Ipv6Addr = "2001:db8::1:2".parse().expect("literal");
        let config = LookupConfig::new(&(1..=1), IpAddr::V6(ip)).expect("valid");
        let bytes: Vec<u8> = config
            .bind_addr
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        assert_eq!(bytes, ip.octets());
        assert_eq!(
            (config.family, config.addr_any, config.ports_len()),
            (AF_INET6, 0, 1)
        );
    }

    #[test]
    fn unspecified_address_matches_the_whole_family() {
        let v4 = LookupConfig::new(&(1..=2), IpAddr::V4(Ipv4Addr::UNSPECIFIED)).expect("valid");
        let v6 = LookupConfig::new(&(1..=2), IpAddr::V6(Ipv6Addr::UNSPECIFIED)).expect("valid");
        assert_eq!((v4.family, v4.addr_any), (AF_INET, 1));
        assert_eq!((v6.family, v6.addr_any), (AF_INET6, 1));
    }

    #[test]
    fn the_whole_port_space_fits_and_empty_ranges_are_refused() {
        let all =
            LookupConfig::new(&(0..=u16::MAX), IpAddr::V4(Ipv4Addr::UNSPECIFIED)).expect("ok");
        assert_eq!(all.ports_len(), 65_536);
        assert_eq!(all.index(u16::MAX).expect("in range"), 65_535);
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 5..=4;
        assert!(matches!(
            LookupConfig::new(&empty, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            Err(EbpfError::Map(_))
        ));
    }

    #[test]
    fn index_is_relative_to_the_range_and_checked() {
        let config = LookupConfig::new(&(100..=199), IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("ok");
        assert_eq!(config.index(100).expect("first"), 0);
        assert_eq!(config.index(199).expect("last"), 99);
        assert!(matches!(config.index(99), Err(EbpfError::Map(_))));
        assert!(matches!(config.index(200), Err(EbpfError::Map(_))));
        assert_ne!(open_bit(Proto::Tcp), open_bit(Proto::Udp));
    }
}
