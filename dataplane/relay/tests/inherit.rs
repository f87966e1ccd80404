//! Issue 20, the new process's inherited leases, end to end on real loopback sockets at library
//! level (no hand-over yet: the list the old process would send is taken from a first lease
//! table): public connections to an expected host name or TCP lease port wait for the lease
//! instead of being refused, and flow once the agent re-registers (same port) and offers a
//! reverse session; without the lease they are closed at the end of the wait and counted;
//! names that are not expected are refused at once as before.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outrelay_io::{Backend, EngineConfig};
use outrelay_proto::identity::Identity;
use outrelay_proto::orp;
use outrelay_proto::reverse::{self, LeaseId};
use outrelay_relay::ingress::stats::Drop;
use outrelay_relay::ingress::{Ingress, IngressConfig};
use outrelay_relay::lease::{
    ConnId, ControllerDecision, Grant, InheritedLease, LeaseConfig, LeaseTable, PortLeaseConfig,
};
use outrelay_relay::state::{Shared, Snapshot};
use outrelay_relay::steer::{EbpfConfig, EbpfMode, Inputs, LeaseRange, RangeSockets, Steering};
use outrelay_relay::udp::stats::UdpDrop;
use outrelay_relay::udp::{UdpConfig, UdpIngress};
use outrelay_relay::worker::{WorkerOptions, bind_reuseport};

const KEY: [u8; 32] = [0x5a; 32];
const ROOT: &str = "outrelay.test";
const AGENT: &str = "outrelay://acme/agent/0f8fad5b-d9cb-469f-a165-70867728950e";

fn hello(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../proto/testdata/client_hello/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(path).expect("captured ClientHello")
}

/// Both io backends where the kernel lets this process create a ring, else epoll only.
fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Epoll];
    if Backend::probe() == Backend::Uring {
        backends.push(Backend::Uring);
    } else {
        eprintln!("SKIP io_uring backend: this kernel or sandbox refuses io_uring_setup");
    }
    backends
}

/// The new process: an empty route snapshot, a lease table that inherited the old one's
/// leases, and the workers.
struct Relay {
    ingress: Arc<Ingress>,
    shared: Arc<Shared>,
    udp: Arc<UdpIngress>,
    table: LeaseTable,
    sni: SocketAddr,
    reverse: SocketAddr,
    /// What the old process sent: `demo` (TLS, the captured hellos' SNI) and `echo` (TCP).
    inherited: Vec<InheritedLease>,
    tcp_port: u16,
    udp_port: u16,
}

fn lease_config(base: u16) -> LeaseConfig {
    LeaseConfig {
        root_host: ROOT.to_owned(),
        min_port: base,
        max_port: base + 9,
        tcp: PortLeaseConfig::on(),
        udp: PortLeaseConfig::on(),
        ..LeaseConfig::default()
    }
}

fn register(table: &mut LeaseTable, conn: u64, req: orp::LeaseRegister, id: u8) -> Grant {
    let agent = Identity::parse(AGENT).expect("uri");
    table
        .register(
            ConnId(conn),
            &agent,
            &orp::LeaseRegister { ttl_s: 300, ..req },
            &ControllerDecision::Approved,
            &mut move || [id; 16],
            Instant::now(),
        )
        .expect("lease")
}

fn demo() -> orp::LeaseRegister {
    orp::LeaseRegister {
        name: "demo".into(),
        tls: true,
        ..Default::default()
    }
}

fn echo() -> orp::LeaseRegister {
    orp::LeaseRegister {
        name: "echo".into(),
        tcp: true,
        udp: true,
        ..Default::default()
    }
}

async fn start(config: IngressConfig, backend: Backend) -> Relay {
    start_with(config, backend, false, 1).await
}

/// [`start`], with the eBPF lookup program serving the lease range when `lookup` (the UDP
/// range sockets then go to a [`UdpIngress`] of their own).
async fn start_with(
    config: IngressConfig,
    backend: Backend,
    lookup: bool,
    workers: usize,
) -> Relay {
    let (base, _) = outrelay_testkit::claim_port_range();
    // The old process: two leases, the TCP one on a port that is not the lowest.
    let mut old = LeaseTable::new(lease_config(base)).expect("lease config");
    register(
        &mut old,
        9,
        orp::LeaseRegister {
            name: "filler".into(),
            tcp: true,
            ..Default::default()
        },
        9,
    );
    register(&mut old, 1, demo(), 1);
    let echo_grant = register(&mut old, 1, echo(), 2);
    let tcp_port = echo_grant.tcp_port.expect("tcp port");
    let udp_port = echo_grant.udp_port.expect("udp port");
    let inherited: Vec<InheritedLease> = old
        .inherited_leases()
        .into_iter()
        .filter(|l| l.name != "filler")
        .collect();
    // The new process.
    let mut table = LeaseTable::new(lease_config(base)).expect("lease config");
    table.inherit(&inherited, Instant::now());
    let shared = Arc::new(Shared::default());
    let ingress = Ingress::new(
        IngressConfig {
            lease_bind_ip: [127, 0, 0, 1].into(),
            ..config
        },
        shared.clone(),
        workers,
    );
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let sni = bind_reuseport(any, workers).expect("bind sni");
    let reverse = bind_reuseport(any, workers).expect("bind reverse");
    let (sni_addr, reverse_addr) = (
        sni[0].local_addr().expect("addr"),
        reverse[0].local_addr().expect("addr"),
    );
    let (steering, range) = if lookup {
        Steering::start(
            &EbpfConfig {
                mode: EbpfMode::On,
                reuseport: false,
                lookup: true,
            },
            Inputs {
                workers,
                public: &[],
                reverse: &[],
                lease_range: Some(LeaseRange {
                    ports: base..=base + 9,
                    bind_ip: [127, 0, 0, 1].into(),
                    tcp: true,
                    udp: true,
                }),
                busy_at: u32::MAX,
                inherited: None,
            },
        )
        .expect("lookup program")
    } else {
        (
            Steering::off(EbpfMode::Off, workers),
            RangeSockets::default(),
        )
    };
    let udp = UdpIngress::new(UdpConfig::default(), shared.clone());
    if lookup {
        udp.serve_range(range.udp).expect("udp range sockets");
    }
    let workers = outrelay_relay::worker::start(
        &ingress,
        WorkerOptions {
            engine: EngineConfig {
                backend,
                ..EngineConfig::default()
            },
            sni,
            reverse,
            runtime: tokio::runtime::Handle::current(),
            beats: Vec::new(),
            steering: Arc::new(steering),
            lease_range: range.tcp,
        },
    )
    .expect("workers");
    std::mem::forget(workers); // they run until the test process exits
    if !lookup {
        ingress.serve_maintenance();
    }
    Relay {
        ingress,
        shared,
        udp,
        table,
        sni: sni_addr,
        reverse: reverse_addr,
        inherited,
        tcp_port,
        udp_port,
    }
}

/// The agent's side of one reverse session (handshake, then wait for a claim).
fn open_session(relay: SocketAddr, lease: LeaseId) -> TcpStream {
    let mut s = TcpStream::connect(relay).expect("connect reverse");
    let agent_nonce = [0x11u8; reverse::NONCE_BYTES];
    s.write_all(&reverse::encode_preamble(&lease, &agent_nonce))
        .expect("preamble");
    let mut challenge = [0u8; reverse::CHALLENGE_BYTES];
    s.read_exact(&mut challenge).expect("nonce and proof");
    let mut relay_nonce = [0u8; reverse::NONCE_BYTES];
    relay_nonce.copy_from_slice(&challenge[..reverse::NONCE_BYTES]);
    s.write_all(&reverse::agent_mac(
        &KEY,
        &lease,
        &agent_nonce,
        &relay_nonce,
    ))
    .expect("mac");
    s
}

/// Reads the marker and the replayed bytes (checked), then echoes until EOF.
fn echo_agent(mut s: TcpStream, want_marker: u8, replay: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut m = [0u8; 1];
        s.read_exact(&mut m).expect("marker");
        assert_eq!(m[0], want_marker, "marker");
        let mut got = vec![0u8; replay.len()];
        s.read_exact(&mut got).expect("replayed bytes");
        assert_eq!(got, replay, "the ClientHello is replayed byte for byte");
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).expect("echo");
        }
        s.shutdown(std::net::Shutdown::Write).expect("fin");
    })
}

/// A public client: `head`, then `payload`, half-close, and everything read back (a refused
/// one may be reset before it is done writing: the bytes read back say what happened).
fn client(addr: SocketAddr, head: Vec<u8>, payload: Vec<u8>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).expect("connect public");
        let _ = c.write_all(&head);
        let _ = c.write_all(&payload);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        all
    })
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("{what}: after {:?}", start.elapsed());
}

async fn join<T: Send + 'static>(t: std::thread::JoinHandle<T>) -> T {
    tokio::task::spawn_blocking(move || t.join().expect("thread"))
        .await
        .expect("join")
}

/// Every drop reason counted so far, by label (for "nothing was refused").
fn drops(relay: &Relay) -> Vec<(&'static str, u64)> {
    Drop::ALL
        .iter()
        .map(|d| (d.label(), relay.ingress.stats.drops(*d)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_an_expected_lease_wait_for_it_and_then_flow() {
    for backend in backends() {
        eprintln!("--- on {backend:?}");
        connections_to_an_expected_lease_wait_for_it_and_then_flow_on(backend, 1).await;
    }
    // Two workers: the waiting connections and the sessions may land on different ones.
    eprintln!("--- on Epoll, 2 workers");
    connections_to_an_expected_lease_wait_for_it_and_then_flow_on(Backend::Epoll, 2).await;
}

async fn connections_to_an_expected_lease_wait_for_it_and_then_flow_on(
    backend: Backend,
    workers: usize,
) {
    let mut relay = start_with(IngressConfig::default(), backend, false, workers).await;
    relay.ingress.expect_leases(&relay.inherited, 20_000);
    // The expected TCP port gets its listeners before any lease holds it.
    let tcp_addr: SocketAddr = ([127, 0, 0, 1], relay.tcp_port).into();
    eventually("expected TCP lease port listening", || {
        std::net::TcpListener::bind(tcp_addr).is_err()
    })
    .await;
    let hello = hello("openssl_tls13.bin");
    let (tls_data, tcp_data) = (b"through the inherited name".to_vec(), vec![0xab; 100_000]);
    let tls_client = client(relay.sni, hello.clone(), tls_data.clone());
    let tcp_client = client(tcp_addr, Vec::new(), tcp_data.clone());
    eventually("both connections wait", || {
        relay.ingress.pending_conns() == 2
    })
    .await;
    // Several worker ticks (100 ms) later they still wait: nothing was refused.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(relay.ingress.pending_conns(), 2);
    assert_eq!(
        drops(&relay),
        vec![],
        "nothing refused while the leases are expected"
    );

    // The agent re-registers: same name, same port; the relay publishes.
    let tls = register(&mut relay.table, 5, demo(), 1);
    let tcp = register(&mut relay.table, 5, echo(), 2);
    assert_eq!(
        tcp.tcp_port,
        Some(relay.tcp_port),
        "the TCP port comes back equal"
    );
    relay.shared.publish(Snapshot {
        routes: relay.table.routes(),
        reverse_keys: HashMap::from([(tls.lease_id, KEY), (tcp.lease_id, KEY)]),
        udp_conns: HashMap::new(),
        generation: 1,
    });
    assert!(
        relay.shared.expected().is_empty(),
        "expectations end when their leases are routed"
    );
    // Admitted to their leases, they now wait for sessions (claim timeout, as always).
    eventually("admitted to their leases", || {
        relay.ingress.lease_conns().total() == 2
    })
    .await;
    let (r, tls_lease, tcp_lease) = (relay.reverse, tls.lease_id, tcp.lease_id);
    let agents = tokio::task::spawn_blocking(move || {
        (
            echo_agent(open_session(r, tls_lease), 0x02, hello),
            echo_agent(open_session(r, tcp_lease), 0x01, Vec::new()),
        )
    })
    .await
    .expect("sessions");
    assert_eq!(join(tls_client).await, tls_data, "TLS bytes echoed");
    assert!(join(tcp_client).await == tcp_data, "TCP bytes echoed");
    join(agents.0).await;
    join(agents.1).await;
    assert_eq!(
        relay
            .ingress
            .stats
            .spliced
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(drops(&relay), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_never_comes_ends_the_wait_and_strangers_are_refused_at_once() {
    let relay = start(
        IngressConfig {
            // One waiter per expected name or port on the (only) worker.
            claim_waiters_max: 1,
            ..IngressConfig::default()
        },
        Backend::auto(),
    )
    .await;
    relay.ingress.expect_leases(&relay.inherited, 1_500);
    let tcp_addr: SocketAddr = ([127, 0, 0, 1], relay.tcp_port).into();
    eventually("expected TCP lease port listening", || {
        std::net::TcpListener::bind(tcp_addr).is_err()
    })
    .await;
    let waiting = client(relay.sni, hello("openssl_tls13.bin"), Vec::new());
    let waiting_tcp = client(tcp_addr, Vec::new(), b"x".to_vec());
    eventually("two connections wait", || {
        relay.ingress.pending_conns() == 2
    })
    .await;
    // The bound per name: a second connection to the same name is refused.
    let full = client(relay.sni, hello("openssl_tls13.bin"), Vec::new());
    eventually("lease_wait_full", || {
        relay.ingress.stats.drops(Drop::LeaseWaitFull) == 1
    })
    .await;
    assert!(join(full).await.is_empty());
    // A name nobody expects is refused at once, as before, while the others still wait.
    let stranger = client(relay.sni, with_sni_of_unknown(), Vec::new());
    eventually("unknown_host", || {
        relay.ingress.stats.drops(Drop::UnknownHost) == 1
    })
    .await;
    assert!(join(stranger).await.is_empty());
    assert_eq!(relay.ingress.stats.drops(Drop::LeaseWaitTimeout), 0);
    assert_eq!(relay.ingress.pending_conns(), 2);
    // No lease: both are closed when the wait ends, and counted.
    eventually("lease_wait_timeout", || {
        relay.ingress.stats.drops(Drop::LeaseWaitTimeout) == 2
    })
    .await;
    assert!(join(waiting).await.is_empty(), "closed without a byte");
    assert!(join(waiting_tcp).await.is_empty(), "closed without a byte");
    assert_eq!(relay.ingress.pending_conns(), 0);
    assert_eq!(relay.ingress.stats.drops(Drop::ClaimTimeout), 0);
    // The expectation is over: the port's listeners close, its name is unknown again.
    eventually("expected TCP lease port closed", || {
        std::net::TcpListener::bind(tcp_addr).is_ok()
    })
    .await;
    let late = client(relay.sni, hello("openssl_tls13.bin"), Vec::new());
    eventually("unknown_host after the wait", || {
        relay.ingress.stats.drops(Drop::UnknownHost) == 2
    })
    .await;
    assert!(join(late).await.is_empty());
    assert_eq!(relay.ingress.stats.drops(Drop::LeaseWaitTimeout), 2);
}

/// The captured OpenSSL hello with its server_name replaced by `nope.outrelay.test` (the same
/// length: no enclosing length changes).
fn with_sni_of_unknown() -> Vec<u8> {
    let mut records = hello("openssl_tls13.bin");
    let from = b"demo.outrelay.test";
    let at = records
        .windows(from.len())
        .position(|w| w == from)
        .expect("SNI in the captured hello");
    records[at..at + 4].copy_from_slice(b"nope");
    records
}

/// Skips loudly where BPF cannot load, unless `OUTRELAY_REQUIRE_BPF=1` (as in tests/ebpf.rs).
fn bpf_unavailable(name: &str) -> bool {
    let Err(why) = outrelay_ebpf::probe() else {
        return false;
    };
    assert!(
        std::env::var("OUTRELAY_REQUIRE_BPF").as_deref() != Ok("1"),
        "{name}: OUTRELAY_REQUIRE_BPF=1 but BPF is unavailable: {why}"
    );
    eprintln!("SKIP {name}: BPF unavailable here ({why})");
    true
}

/// With the eBPF lookup program a port without a lease is refused by the kernel: an expected
/// port must be open in its map meanwhile, so that its connections reach a worker and wait,
/// and closed again when the expectation ends. UDP datagrams to it are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_lookup_program_expected_ports_reach_the_workers_until_the_wait_ends() {
    if bpf_unavailable(
        "with_the_lookup_program_expected_ports_reach_the_workers_until_the_wait_ends",
    ) {
        return;
    }
    let mut relay = start_with(IngressConfig::default(), Backend::auto(), true, 1).await;
    let tcp_addr: SocketAddr = ([127, 0, 0, 1], relay.tcp_port).into();
    let err = TcpStream::connect(tcp_addr).expect_err("no lease, not expected: refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    relay.ingress.expect_leases(&relay.inherited, 20_000);
    let tcp_data = vec![0x5c; 50_000];
    let tcp_client = client(tcp_addr, Vec::new(), tcp_data.clone());
    eventually("the connection waits", || {
        relay.ingress.pending_conns() == 1
    })
    .await;
    let udp_client = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp_client
        .send_to(b"early", SocketAddr::from(([127, 0, 0, 1], relay.udp_port)))
        .expect("send");
    eventually("udp lease_wait counted", || {
        relay.udp.stats.drops(UdpDrop::LeaseWait) == 1
    })
    .await;
    assert_eq!(drops(&relay), vec![]);

    let tcp = register(&mut relay.table, 5, echo(), 2);
    assert_eq!(tcp.tcp_port, Some(relay.tcp_port));
    relay.shared.publish(Snapshot {
        routes: relay.table.routes(),
        reverse_keys: HashMap::from([(tcp.lease_id, KEY)]),
        udp_conns: HashMap::new(),
        generation: 1,
    });
    let (r, lease) = (relay.reverse, tcp.lease_id);
    let agent =
        tokio::task::spawn_blocking(move || echo_agent(open_session(r, lease), 0x01, Vec::new()))
            .await
            .expect("session");
    assert!(join(tcp_client).await == tcp_data, "TCP bytes echoed");
    join(agent).await;

    // An expectation that ends without its lease closes the port in the map again.
    let other = InheritedLease {
        name: "gone".into(),
        hostname: None,
        tcp_port: Some(relay.tcp_port + 7),
        udp_port: None,
        ..relay.inherited[0].clone()
    };
    relay
        .ingress
        .expect_leases(std::slice::from_ref(&other), 300);
    let other_addr: SocketAddr = ([127, 0, 0, 1], relay.tcp_port + 7).into();
    let waiting = client(other_addr, Vec::new(), Vec::new());
    eventually("lease_wait_timeout", || {
        relay.ingress.stats.drops(Drop::LeaseWaitTimeout) == 1
    })
    .await;
    assert!(join(waiting).await.is_empty());
    eventually(
        "the ended expectation's port is refused by the kernel",
        || TcpStream::connect(other_addr).is_err(),
    )
    .await;
}
