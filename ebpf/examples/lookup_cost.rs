//! What a lease port range costs through `sk_lookup`, and how soon an opened port routes.
//!
//! `cargo run --release -p outrelay-ebpf --example lookup_cost [-- PORTS]` (root; default
//! 10,000 ports on 127.80.0.1 from 10000): prints the descriptors the attach added, the kernel
//! memory its maps and program are charged (`memlock` in /proc/self/fdinfo), and the time from
//! `open()` to an accepted connection on that port (median and p99 over the range). The memory
//! counts the maps still open here; the program and the 4 KiB `cpu_worker` array are held by
//! the kernel through the link, without a descriptor of ours, and are not in it.

use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use outrelay_ebpf::{LeasePortSteering, Proto};

const IP: Ipv4Addr = Ipv4Addr::new(127, 80, 0, 1);
const PORT_LO: u16 = 10_000;

fn main() {
    let ports: u16 = std::env::args()
        .nth(1)
        .map_or(10_000, |a| a.parse().expect("PORTS: a number"));
    let hi = PORT_LO + (ports - 1);
    let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("tcp listener");
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("udp socket");
    let before = fds();
    let mut steering =
        LeasePortSteering::attach(PORT_LO..=hi, IpAddr::V4(IP), &[&tcp], &[&udp], &[])
            .expect("attach (needs root)");
    let added: Vec<u32> = fds()
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .collect();
    let memlock_bytes: u64 = added.iter().map(|fd| memlock_bytes(*fd)).sum();
    println!("range {PORT_LO}..={hi} ({ports} ports) on {IP}, 1 TCP + 1 UDP socket");
    println!("descriptors added by attach: {}", added.len());
    println!(
        "kernel memory charged (memlock): {} KiB",
        memlock_bytes / 1024
    );

    let mut routable = Vec::with_capacity(usize::from(ports));
    for port in PORT_LO..=hi {
        let start = Instant::now();
        steering.open(Proto::Tcp, port).expect("open");
        let client = TcpStream::connect((IP, port)).expect("connect right after open");
        let (server, _) = tcp.accept().expect("accept");
        routable.push(start.elapsed());
        drop((client, server));
    }
    routable.sort();
    let at = |q: usize| routable[(routable.len() - 1) * q / 100];
    println!(
        "open() to accepted connection: median {} us, p99 {} us, max {} us",
        micros(at(50)),
        micros(at(99)),
        micros(at(100))
    );
    let start = Instant::now();
    for port in PORT_LO..=hi {
        steering.open(Proto::Udp, port).expect("open udp");
    }
    println!(
        "open() alone: {} ns per port",
        start.elapsed().as_nanos() / u128::from(ports)
    );
    println!("{:?}", steering.stats());
}

fn fds() -> Vec<u32> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn memlock_bytes(fd: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("memlock:")?.trim().parse().ok())
        .unwrap_or(0)
}

fn micros(d: Duration) -> u128 {
    d.as_micros()
}
