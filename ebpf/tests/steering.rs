//! The programs against real sockets on loopback: CPU-local accept in a reuseport group, and a
//! lease port range served through one TCP and one UDP socket. Each test needs CAP_BPF and
//! CAP_NET_ADMIN and a kernel that loads the programs (`probe()`); without them it prints a loud
//! SKIP line with the reason and returns.
//!
//! The lookup tests steer an address of their own (127.77.x.1, or a claimed range on IPv6) so
//! they never take connections meant for another test process in the same namespace.

// Without `bpf` the steering types are empty (never constructed), which this lint notices.
#![cfg_attr(not(feature = "bpf"), allow(clippy::drop_non_drop))]

use std::io::{ErrorKind, IoSliceMut, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream,
    UdpSocket,
};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrIn,
    SockaddrStorage, bind, listen, recvmsg, setsockopt, socket, sockopt,
};
use nix::unistd::Pid;
use outrelay_ebpf::{EbpfError, LeasePortSteering, LoadWriter, Proto, ReuseportSteering, probe};

/// Bound on every wait for the kernel (accept queue, datagram, ICMP error).
const WAIT_MAX: Duration = Duration::from_secs(5);
/// Connections per CPU in the reuseport test.
const CONNECTIONS_PER_CPU: usize = 20;

/// Whether BPF steering can run here; prints the loud SKIP line when not.
fn bpf_or_skip(test: &str) -> bool {
    match probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIP (no CAP_BPF/kernel support: {e}) {test}");
            false
        }
    }
}

#[cfg(not(feature = "bpf"))]
#[test]
fn without_the_bpf_feature_every_constructor_says_not_built() {
    let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listener");
    assert!(matches!(probe(), Err(EbpfError::NotBuilt)));
    assert!(matches!(
        ReuseportSteering::attach(&[&tcp], &[], 1),
        Err(EbpfError::NotBuilt)
    ));
    let no_udp: [&UdpSocket; 0] = [];
    let lookup = LeasePortSteering::attach(
        1..=2,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &[&tcp],
        &no_udp,
        &[],
    );
    assert!(matches!(lookup, Err(EbpfError::NotBuilt)));
}

#[test]
fn steering_types_move_to_worker_threads() {
    fn send<T: Send>() {}
    send::<LoadWriter>();
    send::<ReuseportSteering>();
    send::<LeasePortSteering>();
}

#[test]
fn reuseport_accepts_on_the_worker_of_the_clients_cpu_and_falls_back_when_busy() {
    const TEST: &str =
        "reuseport_accepts_on_the_worker_of_the_clients_cpu_and_falls_back_when_busy";
    if !bpf_or_skip(TEST) {
        return;
    }
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        eprintln!("SKIP (needs 2 allowed CPUs, has {}) {TEST}", cpus.len());
        return;
    }
    // One worker per allowed CPU (at most 8), worker i pinned on cpus[i].
    let cpus = &cpus[..cpus.len().min(8)];
    let first = reuseport_listener(0);
    let port = first.local_addr().expect("local addr").port();
    let mut listeners = vec![first];
    listeners.extend(cpus[1..].iter().map(|_| reuseport_listener(port)));
    let mut cpu_worker = vec![None; cpus[cpus.len() - 1] + 1];
    for (worker, cpu) in (0u32..).zip(cpus) {
        cpu_worker[*cpu] = Some(worker);
    }
    let busy_at = 100;
    let steering = ReuseportSteering::attach(&listeners, &cpu_worker, busy_at).expect("attach");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

    for (worker, cpu) in cpus.iter().enumerate() {
        let accepted_on = connect_from_cpu(*cpu, addr, &listeners);
        assert_eq!(
            accepted_on,
            vec![worker; CONNECTIONS_PER_CPU],
            "clients on CPU {cpu} are accepted by worker {worker} (listener index per connection)"
        );
    }
    let before = steering.stats();
    assert!(
        before.local >= (cpus.len() * CONNECTIONS_PER_CPU) as u64,
        "local counted: {before:?}"
    );
    assert_eq!(before.busy, 0, "{before:?}");

    // Worker 0 over its budget: its CPU's clients still get through, by the kernel's hash.
    let mut writer = steering.load_writer(0).expect("writer");
    writer.set(busy_at).expect("publish load");
    let accepted_on = connect_from_cpu(cpus[0], addr, &listeners);
    assert_eq!(
        accepted_on.len(),
        CONNECTIONS_PER_CPU,
        "every connection accepted"
    );
    let after = steering.stats();
    assert!(
        after.busy >= before.busy + CONNECTIONS_PER_CPU as u64,
        "busy counted: {after:?}"
    );
    assert_eq!(
        after.local, before.local,
        "no local selection while busy: {after:?}"
    );

    // Back under budget: local again.
    writer.set(busy_at - 1).expect("publish load");
    assert_eq!(
        connect_from_cpu(cpus[0], addr, &listeners),
        vec![0; CONNECTIONS_PER_CPU]
    );
    let missing = u32::try_from(cpus.len()).expect("<= 8");
    assert!(
        matches!(steering.load_writer(missing), Err(EbpfError::Map(_))),
        "no such worker"
    );
}

#[test]
fn reuseport_steering_can_be_dropped_and_attached_again() {
    const TEST: &str = "reuseport_steering_can_be_dropped_and_attached_again";
    if !bpf_or_skip(TEST) {
        return;
    }
    let cpus = allowed_cpus();
    let first = reuseport_listener(0);
    let port = first.local_addr().expect("local addr").port();
    let listeners = [first, reuseport_listener(port)];
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // Every CPU maps to worker 1: each connection is then accepted on listener 1.
    let cpu_worker = vec![Some(1); cpus.iter().max().map_or(1, |c| c + 1)];
    for round in 0..3 {
        let steering = ReuseportSteering::attach(&listeners, &cpu_worker, u32::MAX)
            .unwrap_or_else(|e| panic!("attach round {round}: {e}"));
        let second = ReuseportSteering::attach(&listeners, &cpu_worker, u32::MAX);
        assert!(
            matches!(second, Err(EbpfError::Map(_))),
            "one steering per group"
        );
        assert_eq!(
            connect_from_cpu(cpus[0], addr, &listeners),
            vec![1; CONNECTIONS_PER_CPU]
        );
        assert!(steering.stats().local >= CONNECTIONS_PER_CPU as u64);
        drop(steering);
    }
    // Detached: the group accepts by hash, every connection still succeeds.
    assert_eq!(
        connect_from_cpu(cpus[0], addr, &listeners).len(),
        CONNECTIONS_PER_CPU
    );
    // No worker on any CPU: everything goes to the hash, counted as no_worker.
    let none = vec![None; cpu_worker.len()];
    let steering = ReuseportSteering::attach(&listeners, &none, u32::MAX).expect("attach");
    assert_eq!(
        connect_from_cpu(cpus[0], addr, &listeners).len(),
        CONNECTIONS_PER_CPU
    );
    let stats = steering.stats();
    assert!(
        stats.no_worker >= CONNECTIONS_PER_CPU as u64 && stats.local == 0,
        "{stats:?}"
    );
    drop(steering);
    let bad = ReuseportSteering::attach(&listeners, &[Some(2)], 1);
    assert!(
        matches!(bad, Err(EbpfError::Map(_))),
        "worker 2 does not exist"
    );
}

#[test]
fn lookup_serves_a_1000_port_range_through_one_tcp_and_one_udp_socket() {
    const TEST: &str = "lookup_serves_a_1000_port_range_through_one_tcp_and_one_udp_socket";
    if !bpf_or_skip(TEST) {
        return;
    }
    let ip = own_loopback_ip();
    let Some(ports) = free_range(ip, 1_000) else {
        eprintln!("SKIP (no free 1000-port range on {ip}) {TEST}");
        return;
    };
    let (lo, hi) = (*ports.start(), *ports.end());
    let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("tcp listener");
    tcp.set_nonblocking(true).expect("nonblocking");
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("udp socket");
    setsockopt(&udp, sockopt::Ipv4OrigDstAddr, &true).expect("IP_RECVORIGDSTADDR");
    udp.set_read_timeout(Some(WAIT_MAX)).expect("timeout");
    // No CPU pinned: the program picks cpu % 1 = socket 0.
    let mut steering =
        LeasePortSteering::attach(ports.clone(), IpAddr::V4(ip), &[&tcp], &[&udp], &[])
            .expect("attach");

    for port in ports.clone() {
        steering.open(Proto::Tcp, port).expect("open tcp");
    }
    for port in ports.clone() {
        let client =
            TcpStream::connect((ip, port)).unwrap_or_else(|e| panic!("connect {port}: {e}"));
        let server = accept_within(&tcp);
        assert_eq!(
            server.local_addr().expect("local"),
            SocketAddr::from((ip, port))
        );
        assert_eq!(
            server.peer_addr().expect("peer"),
            client.local_addr().expect("client")
        );
        echo_once(client, server);
    }
    let stats = steering.stats();
    assert!(stats.tcp_steered >= 1_000, "{stats:?}");

    // UDP: a few ports; the socket learns each datagram's original destination.
    let udp_ports = [lo, lo + 1, lo + 500, hi];
    for port in udp_ports {
        steering.open(Proto::Udp, port).expect("open udp");
    }
    let client = UdpSocket::bind((ip, 0)).expect("udp client");
    for port in udp_ports {
        client
            .send_to(&port.to_be_bytes(), (ip, port))
            .expect("send");
        let (payload, from, orig_dst) = recv_with_orig_dst(&udp);
        assert_eq!(payload, port.to_be_bytes());
        assert_eq!(from, client.local_addr().expect("client addr"));
        assert_eq!(orig_dst, SocketAddrV4::new(ip, port));
    }
    assert!(steering.stats().udp_steered >= udp_ports.len() as u64);

    // Ports of the range not open for a protocol: refused by the kernel, counted.
    let closed_udp = lo + 2;
    assert!(steering.is_open(Proto::Tcp, closed_udp) && !steering.is_open(Proto::Udp, closed_udp));
    let before = steering.stats();
    assert_eq!(udp_refused(ip, closed_udp), ErrorKind::ConnectionRefused);
    assert!(steering.stats().udp_refused > before.udp_refused);

    // close(): refused from the next SYN on.
    steering.close(Proto::Tcp, lo + 7).expect("close");
    let before = steering.stats();
    assert_refused(ip, lo + 7);
    assert!(steering.stats().tcp_refused > before.tcp_refused);
    steering.open(Proto::Tcp, lo + 7).expect("reopen");
    drop(TcpStream::connect((ip, lo + 7)).expect("reopened port routes again"));
    drop(accept_within(&tcp));

    // Outside the range: not ours to open.
    assert!(matches!(
        steering.open(Proto::Tcp, lo - 1),
        Err(EbpfError::Map(_))
    ));
    assert!(matches!(
        steering.open(Proto::Tcp, hi + 1),
        Err(EbpfError::Map(_))
    ));

    // Detached: the kernel's own lookup again, and nothing is bound there.
    drop(steering);
    assert_refused(ip, lo);
    assert_refused(ip, hi);
}

#[test]
fn lookup_on_any_ipv6_address_and_a_range_without_udp_sockets() {
    const TEST: &str = "lookup_on_any_ipv6_address_and_a_range_without_udp_sockets";
    if !bpf_or_skip(TEST) {
        return;
    }
    if TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_err() {
        eprintln!("SKIP (no IPv6 loopback) {TEST}");
        return;
    }
    // A claimed range: no other test process routes these ports while this one holds them.
    let (lo, hi) = outrelay_testkit::claim_port_range();
    let tcp = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect("tcp listener");
    tcp.set_nonblocking(true).expect("nonblocking");
    let cpu_worker = vec![Some(0); allowed_cpus().iter().max().map_or(1, |c| c + 1)];
    let no_udp: [&UdpSocket; 0] = [];
    let mut steering = LeasePortSteering::attach(
        lo..=hi,
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        &[&tcp],
        &no_udp,
        &cpu_worker,
    )
    .expect("attach");
    assert!(
        matches!(steering.open(Proto::Udp, lo), Err(EbpfError::Map(_))),
        "no UDP socket"
    );
    for port in lo..=hi {
        steering.open(Proto::Tcp, port).expect("open");
    }
    for port in lo..=hi {
        let client = TcpStream::connect((Ipv6Addr::LOCALHOST, port)).expect("connect");
        let server = accept_within(&tcp);
        assert_eq!(
            server.local_addr().expect("local"),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port))
        );
        echo_once(client, server);
    }
    // IPv4 is another family: untouched by this program (nothing listens there, so refused by
    // the kernel's own lookup, and not counted here).
    let before = steering.stats();
    assert_refused(Ipv4Addr::LOCALHOST, lo);
    assert_eq!(steering.stats().tcp_refused, before.tcp_refused);
    // UDP in the range, no UDP socket: refused and counted.
    let client = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).expect("udp client");
    client.connect((Ipv6Addr::LOCALHOST, lo)).expect("connect");
    client.set_read_timeout(Some(WAIT_MAX)).expect("timeout");
    assert_eq!(refused_on_recv(&client), ErrorKind::ConnectionRefused);
    let stats = steering.stats();
    assert!(
        stats.tcp_steered >= u64::from(hi - lo + 1) && stats.udp_refused >= 1,
        "{stats:?}"
    );

    // The same on one IPv6 address (::1), a second program beside the first on its own range.
    let (lo2, hi2) = outrelay_testkit::claim_port_range();
    let mut one = LeasePortSteering::attach(
        lo2..=hi2,
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        &[&tcp],
        &no_udp,
        &cpu_worker,
    )
    .expect("attach on ::1");
    one.open(Proto::Tcp, hi2).expect("open");
    let client = TcpStream::connect((Ipv6Addr::LOCALHOST, hi2)).expect("connect");
    let server = accept_within(&tcp);
    assert_eq!(server.local_addr().expect("local").port(), hi2);
    echo_once(client, server);
    assert_refused(Ipv6Addr::LOCALHOST, lo2);
    let stats = one.stats();
    assert!(
        stats.tcp_steered >= 1 && stats.tcp_refused >= 1,
        "{stats:?}"
    );
}

#[test]
fn udp_replies_leave_from_the_lease_port_through_a_connected_flow_socket() {
    const TEST: &str = "udp_replies_leave_from_the_lease_port_through_a_connected_flow_socket";
    if !bpf_or_skip(TEST) {
        return;
    }
    let ip = Ipv4Addr::new(127, 79, own_loopback_ip().octets()[2], 1);
    let Some(ports) = free_range(ip, 10) else {
        eprintln!("SKIP (no free 10-port range on {ip}) {TEST}");
        return;
    };
    let port = *ports.start();
    let worker = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("worker socket");
    setsockopt(&worker, sockopt::Ipv4OrigDstAddr, &true).expect("IP_RECVORIGDSTADDR");
    worker.set_read_timeout(Some(WAIT_MAX)).expect("timeout");
    worker.set_nonblocking(false).expect("blocking");
    let no_tcp: [&TcpListener; 0] = [];
    let mut steering =
        LeasePortSteering::attach(ports, IpAddr::V4(ip), &no_tcp, &[&worker], &[]).expect("attach");
    steering.open(Proto::Udp, port).expect("open");

    let client = UdpSocket::bind((ip, 0)).expect("client");
    client.set_read_timeout(Some(WAIT_MAX)).expect("timeout");
    client.send_to(b"first", (ip, port)).expect("send");
    let (payload, from, orig_dst) = recv_with_orig_dst(&worker);
    assert_eq!(
        (payload.as_slice(), orig_dst),
        (&b"first"[..], SocketAddrV4::new(ip, port))
    );

    // A reply must leave from the lease port, which the worker's socket is not bound to: a flow
    // socket bound to the original destination (SO_REUSEADDR: one per flow on that port) and
    // connected to the client.
    let flow = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    setsockopt(&flow, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    bind(flow.as_raw_fd(), &SockaddrIn::from(orig_dst)).expect("bind the lease port");
    let flow = UdpSocket::from(flow);
    flow.connect(from).expect("connect to the client");
    flow.set_read_timeout(Some(WAIT_MAX)).expect("timeout");
    flow.send(b"reply").expect("reply");
    let mut buf = [0u8; 16];
    let (n, reply_from) = client.recv_from(&mut buf).expect("client gets the reply");
    assert_eq!(
        (&buf[..n], reply_from),
        (&b"reply"[..], SocketAddr::from(orig_dst))
    );

    // The kernel finds a connected socket before running sk_lookup: the flow's next datagram
    // goes to the flow socket, not to the worker's.
    let steered = steering.stats().udp_steered;
    client.send_to(b"second", (ip, port)).expect("send");
    let n = flow
        .recv(&mut buf)
        .expect("flow socket gets the next datagram");
    assert_eq!(&buf[..n], b"second");
    assert_eq!(steering.stats().udp_steered, steered, "not steered again");
}

/// Env var that turns [`kill_9_child`] into the child of [`lookup_is_gone_after_kill_9`]:
/// `ip port_lo port_hi`.
const CHILD_ENV: &str = "OUTRELAY_EBPF_KILL9_CHILD";

#[test]
fn lookup_is_gone_after_kill_9() {
    const TEST: &str = "lookup_is_gone_after_kill_9";
    if !bpf_or_skip(TEST) {
        return;
    }
    let ip = Ipv4Addr::new(127, 78, own_loopback_ip().octets()[2], 1);
    let Some(ports) = free_range(ip, 10) else {
        eprintln!("SKIP (no free 10-port range on {ip}) {TEST}");
        return;
    };
    let port = *ports.start();
    // Our own plain listener on a port of the range: reachable unless a program refuses it.
    let listener = TcpListener::bind((ip, port)).expect("plain listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "kill_9_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{ip} {} {}", ports.start(), ports.end()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("child stdout"));
    let mut line = String::new();
    while !line.contains("ATTACHED") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).expect("read the child");
        assert!(n > 0, "the child exited before attaching");
    }
    // The child's program holds the range with every port closed: refused by the kernel.
    assert_refused(ip, port);
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    // Its descriptors are gone, so is the program: the plain listener answers again.
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        match TcpStream::connect((ip, port)) {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "still refused after kill -9: {e}"
            ),
        }
        thread::sleep(Duration::from_millis(10));
    }
    drop(accept_within(&listener));
}

/// Not a test of its own: the child process of [`lookup_is_gone_after_kill_9`] (does nothing
/// unless [`CHILD_ENV`] is set). Attaches, says so, and waits to be killed.
#[test]
fn kill_9_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut words = spec.split(' ');
    let mut next = || words.next().expect("three words");
    let ip: Ipv4Addr = next().parse().expect("ip");
    let lo: u16 = next().parse().expect("lo");
    let hi: u16 = next().parse().expect("hi");
    let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listener");
    let no_udp: [&UdpSocket; 0] = [];
    let _steering = LeasePortSteering::attach(lo..=hi, IpAddr::V4(ip), &[&tcp], &no_udp, &[])
        .expect("attach in the child");
    println!("ATTACHED");
    std::io::stdout().flush().expect("flush");
    thread::sleep(Duration::from_secs(60));
    panic!("the parent never killed this child");
}

// ---- helpers ----

/// The CPUs this process may run on, ascending.
fn allowed_cpus() -> Vec<usize> {
    let set = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
    (0..CpuSet::count())
        .filter(|c| set.is_set(*c).unwrap_or(false))
        .collect()
}

/// A TCP listener on 127.0.0.1:`port` with SO_REUSEPORT, non-blocking.
fn reuseport_listener(port: u16) -> TcpListener {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK,
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
    let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    bind(fd.as_raw_fd(), &addr).expect("bind");
    listen(&fd, Backlog::new(128).expect("backlog")).expect("listen");
    TcpListener::from(fd)
}

/// Connects [`CONNECTIONS_PER_CPU`] times from a thread pinned on `cpu`; returns, per
/// connection, the index of the listener that accepted it.
fn connect_from_cpu(cpu: usize, addr: SocketAddr, listeners: &[TcpListener]) -> Vec<usize> {
    let clients = thread::scope(|scope| {
        scope
            .spawn(move || {
                let mut set = CpuSet::new();
                set.set(cpu).expect("cpu in set");
                sched_setaffinity(Pid::from_raw(0), &set).expect("pin the client thread");
                (0..CONNECTIONS_PER_CPU)
                    .map(|_| TcpStream::connect(addr).expect("connect"))
                    .collect::<Vec<_>>()
            })
            .join()
            .expect("client thread")
    });
    // Drain both accept queues until every client is found; then name each one's listener.
    let mut accepted: Vec<(SocketAddr, usize)> = Vec::with_capacity(clients.len());
    let deadline = Instant::now() + WAIT_MAX;
    while accepted.len() < clients.len() {
        let mut progress = false;
        for (index, listener) in listeners.iter().enumerate() {
            if let Ok((_, peer)) = listener.accept() {
                accepted.push((peer, index));
                progress = true;
            }
        }
        if !progress {
            assert!(
                Instant::now() < deadline,
                "only {} of {} accepted",
                accepted.len(),
                clients.len()
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
    clients
        .iter()
        .map(|client| {
            let want = client.local_addr().expect("client addr");
            accepted
                .iter()
                .find(|(peer, _)| *peer == want)
                .map(|(_, index)| *index)
                .unwrap_or_else(|| panic!("connection from {want} not accepted"))
        })
        .collect()
}

/// 127.77.x.1 with x from the process id: an address no other test steers.
fn own_loopback_ip() -> Ipv4Addr {
    let x = u8::try_from(std::process::id() % 250).expect("< 250") + 1;
    Ipv4Addr::new(127, 77, x, 1)
}

/// A range of `len` ports in 10000..20000 (below the port-range claims and the ephemeral
/// range) where nothing could take `ip`'s connections (every port binds on `ip`).
fn free_range(ip: Ipv4Addr, len: u16) -> Option<std::ops::RangeInclusive<u16>> {
    (10_000..20_000u16)
        .step_by(usize::from(len))
        .map(|lo| lo..=lo + len - 1)
        .find(|range| {
            range
                .clone()
                .all(|port| TcpListener::bind((ip, port)).is_ok())
        })
}

fn accept_within(listener: &TcpListener) -> TcpStream {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                return stream;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// One byte each way: the steered connection is a real one.
fn echo_once(mut client: TcpStream, mut server: TcpStream) {
    client.set_read_timeout(Some(WAIT_MAX)).expect("timeout");
    server.set_read_timeout(Some(WAIT_MAX)).expect("timeout");
    client.write_all(b"x").expect("client write");
    let mut byte = [0u8; 1];
    server.read_exact(&mut byte).expect("server read");
    server.write_all(&byte).expect("server write");
    client.read_exact(&mut byte).expect("client read");
    assert_eq!(&byte, b"x");
    let _ = client.shutdown(Shutdown::Both);
}

fn assert_refused(ip: impl Into<IpAddr>, port: u16) {
    let addr = SocketAddr::new(ip.into(), port);
    match TcpStream::connect_timeout(&addr, WAIT_MAX) {
        Err(e) => assert_eq!(
            e.kind(),
            ErrorKind::ConnectionRefused,
            "connect {addr}: {e}"
        ),
        Ok(_) => panic!("connect {addr} succeeded, expected refused"),
    }
}

/// Sends to `ip:port` from a connected UDP socket; returns the error kind the ICMP answer
/// turned into.
fn udp_refused(ip: Ipv4Addr, port: u16) -> ErrorKind {
    let client = UdpSocket::bind((ip, 0)).expect("udp client");
    client.connect((ip, port)).expect("connect");
    client.set_read_timeout(Some(WAIT_MAX)).expect("timeout");
    refused_on_recv(&client)
}

fn refused_on_recv(client: &UdpSocket) -> ErrorKind {
    client.send(b"?").expect("send");
    let mut buf = [0u8; 16];
    match client.recv(&mut buf) {
        Ok(n) => panic!("got a {n}-byte answer, expected a refusal"),
        Err(e) => e.kind(),
    }
}

/// One datagram: (payload, sender, original destination from IP_ORIGDSTADDR).
fn recv_with_orig_dst(socket: &UdpSocket) -> (Vec<u8>, SocketAddr, SocketAddrV4) {
    let mut buf = [0u8; 64];
    let mut cmsg = nix::cmsg_space!(nix::libc::sockaddr_in);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .expect("recvmsg");
    let from = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::V4(SocketAddrV4::from(*v4)))
        })
        .expect("sender address");
    let orig = msg
        .cmsgs()
        .expect("cmsgs")
        .find_map(|c| match c {
            ControlMessageOwned::Ipv4OrigDstAddr(sin) => Some(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )),
            _ => None,
        })
        .expect("IP_ORIGDSTADDR control message");
    let len = msg.bytes;
    (buf[..len].to_vec(), from, orig)
}
