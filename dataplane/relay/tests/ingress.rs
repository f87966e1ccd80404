//! Public ingress end to end on real loopback sockets: reverse sessions authenticated both ways
//! with exporter-keyed MACs, SNI routing of real captured ClientHellos, TCP lease ports, the splice
//! engine, and every refusal counted by its reason. The QUIC side is replaced by a lease table
//! and a snapshot published by the test (the keys are what the QUIC exporter would give).

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
use outrelay_relay::lease::{ConnId, ControllerDecision, LeaseConfig, LeaseTable, PortLeaseConfig};
use outrelay_relay::state::{Shared, Snapshot};
use outrelay_relay::worker::{WorkerOptions, bind_reuseport};

const KEY: [u8; 32] = [0x5a; 32];
const ROOT: &str = "outrelay.test";

fn hello(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../proto/testdata/client_hello/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(path).expect("captured ClientHello")
}

struct Relay {
    ingress: Arc<Ingress>,
    shared: Arc<Shared>,
    sni: SocketAddr,
    reverse: SocketAddr,
    tls_lease: LeaseId,
    wild_lease: LeaseId,
    tcp_port: u16,
    /// A TCP lease granted `client_addr` (marker 0x03 + the client's address block).
    addr_port: u16,
}

/// Starts ingress with one TLS lease `demo`, one TLS lease `wild` with a wildcard, and one
/// TCP lease `echo` (published with `KEY`). The engine's finished pairs go back to the
/// ingress's per-lease connection counts, as in the relay binary.
async fn start(config: IngressConfig) -> Relay {
    start_on(config, 1, Backend::auto()).await
}

/// Both io backends where the kernel lets this process create a ring, else epoll only
/// (loudly).
fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Epoll];
    if Backend::probe() == Backend::Uring {
        backends.push(Backend::Uring);
    } else {
        eprintln!("SKIP io_uring backend: this kernel or sandbox refuses io_uring_setup");
    }
    backends
}

/// [`start`] with `workers` worker threads on `backend`.
async fn start_on(config: IngressConfig, workers: usize, backend: Backend) -> Relay {
    // A 10-port range no other relay (of this process or a concurrent test process) uses.
    let (base, _) = outrelay_testkit::claim_port_range();
    let mut table = LeaseTable::new(LeaseConfig {
        root_host: ROOT.to_owned(),
        min_port: base,
        max_port: base + 9,
        tcp: PortLeaseConfig::on(),
        ..LeaseConfig::default()
    })
    .expect("lease config");
    let agent =
        Identity::parse("outrelay://acme/agent/0f8fad5b-d9cb-469f-a165-70867728950e").expect("uri");
    let mut ids = {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; 16]
        }
    };
    let now = Instant::now();
    let tls = table
        .register(
            ConnId(1),
            &agent,
            &orp::LeaseRegister {
                name: "demo".into(),
                tls: true,
                ttl_s: 300,
                ..Default::default()
            },
            &ControllerDecision::Approved,
            &mut ids,
            now,
        )
        .expect("tls lease");
    let wild = table
        .register(
            ConnId(1),
            &agent,
            &orp::LeaseRegister {
                name: "wild".into(),
                tls: true,
                wildcard: true,
                ttl_s: 300,
                ..Default::default()
            },
            &ControllerDecision::Approved,
            &mut ids,
            now,
        )
        .expect("wildcard lease");
    let tcp = table
        .register(
            ConnId(1),
            &agent,
            &orp::LeaseRegister {
                name: "echo".into(),
                tcp: true,
                ttl_s: 300,
                ..Default::default()
            },
            &ControllerDecision::Approved,
            &mut ids,
            now,
        )
        .expect("tcp lease");
    let addr = table
        .register(
            ConnId(1),
            &agent,
            &orp::LeaseRegister {
                name: "addr".into(),
                tcp: true,
                client_addr: true,
                ttl_s: 300,
                ..Default::default()
            },
            &ControllerDecision::Approved,
            &mut ids,
            now,
        )
        .expect("client_addr lease");
    assert!(addr.client_addr, "the grant echoes client_addr");
    let shared = Arc::new(Shared::default());
    let tls_lease = tls.lease_id;
    let tcp_port = tcp.tcp_port.expect("tcp port");
    shared.publish(Snapshot {
        routes: table.routes(),
        reverse_keys: HashMap::from([
            (tls_lease, KEY),
            (wild.lease_id, KEY),
            (tcp.lease_id, KEY),
            (addr.lease_id, KEY),
        ]),
        udp_conns: HashMap::new(),
        generation: 1,
    });
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
            steering: std::sync::Arc::new(outrelay_relay::steer::Steering::off(
                outrelay_relay::steer::EbpfMode::Off,
                workers,
            )),
            lease_range: Vec::new(),
        },
    )
    .expect("workers");
    std::mem::forget(workers); // they run until the test process exits
    ingress.serve_maintenance();
    Relay {
        ingress,
        shared,
        sni: sni_addr,
        reverse: reverse_addr,
        tls_lease,
        wild_lease: wild.lease_id,
        tcp_port,
        addr_port: addr.tcp_port.expect("tcp port"),
    }
}

/// The agent's side of one reverse session: handshake (the relay's proof is read, not
/// checked: a wrong `key` must reach the relay's MAC check), then wait for a claim.
fn open_session(relay: SocketAddr, lease: LeaseId, key: &[u8; 32]) -> TcpStream {
    let mut s = TcpStream::connect(relay).expect("connect reverse");
    let agent_nonce = [0x11u8; reverse::NONCE_BYTES];
    s.write_all(&reverse::encode_preamble(&lease, &agent_nonce))
        .expect("preamble");
    let mut challenge = [0u8; reverse::CHALLENGE_BYTES];
    s.read_exact(&mut challenge).expect("nonce and proof");
    let mut relay_nonce = [0u8; reverse::NONCE_BYTES];
    relay_nonce.copy_from_slice(&challenge[..reverse::NONCE_BYTES]);
    s.write_all(&reverse::agent_mac(key, &lease, &agent_nonce, &relay_nonce))
        .expect("mac");
    s
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

/// Reads the marker, skips `replay_len` bytes (checking them), then echoes until EOF.
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

/// Sends `payload` after `head`, half-closes, and returns everything read back.
fn client_round_trip(
    addr: SocketAddr,
    head: Vec<u8>,
    payload: Vec<u8>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).expect("connect public");
        c.write_all(&head).expect("head");
        let reader = {
            let mut c = c.try_clone().expect("clone");
            std::thread::spawn(move || {
                let mut all = Vec::new();
                c.read_to_end(&mut all).expect("read back");
                all
            })
        };
        c.write_all(&payload).expect("payload");
        c.shutdown(std::net::Shutdown::Write).expect("fin");
        reader.join().expect("reader")
    })
}

fn payload(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).expect("byte"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_and_tcp_leases_reach_the_agent_through_reverse_sessions() {
    for backend in backends() {
        eprintln!("--- sni_and_tcp_leases_reach_the_agent_through_reverse_sessions on {backend:?}");
        sni_and_tcp_leases_reach_the_agent_through_reverse_sessions_on(backend).await;
    }
}

async fn sni_and_tcp_leases_reach_the_agent_through_reverse_sessions_on(backend: Backend) {
    let relay = start_on(IngressConfig::default(), 1, backend).await;
    for (file, sessions) in [
        ("openssl_tls13.bin", 1),
        ("rustls_pq.bin", 1),
        ("chromium.bin", 1),
    ] {
        let hello = hello(file);
        let agent = {
            let (r, l) = (relay.reverse, relay.tls_lease);
            tokio::task::spawn_blocking(move || open_session(r, l, &KEY))
                .await
                .expect("session")
        };
        eventually("session queued", || {
            relay.ingress.idle_sessions(&relay.tls_lease) == sessions
        })
        .await;
        let echo = echo_agent(agent, 0x02, hello.clone());
        let data = payload(1 << 20);
        let back = client_round_trip(relay.sni, hello.clone(), data.clone());
        let back = tokio::task::spawn_blocking(move || back.join().expect("client"))
            .await
            .expect("join");
        assert_eq!(back.len(), data.len(), "{file}: echoed length");
        assert!(back == data, "{file}: echoed bytes differ");
        tokio::task::spawn_blocking(move || echo.join().expect("agent"))
            .await
            .expect("join");
    }

    // A TCP lease port: marker 0x01, no replay.
    let agent = {
        let r = relay.reverse;
        let lease = relay
            .shared
            .load()
            .routes
            .lookup_tcp(relay.tcp_port)
            .expect("route")
            .lease_id;
        tokio::task::spawn_blocking(move || open_session(r, lease, &KEY))
            .await
            .expect("session")
    };
    let echo = echo_agent(agent, 0x01, Vec::new());
    let addr: SocketAddr = ([127, 0, 0, 1], relay.tcp_port).into();
    // Listening once we can no longer bind it ourselves (a probe connection would claim the
    // agent's only session).
    eventually("TCP lease port listening", || {
        std::net::TcpListener::bind(addr).is_err()
    })
    .await;
    let data = payload(256 * 1024);
    let back = client_round_trip(addr, Vec::new(), data.clone());
    let back = tokio::task::spawn_blocking(move || back.join().expect("client"))
        .await
        .expect("join");
    assert!(
        back == data,
        "TCP lease echo differs ({} bytes back)",
        back.len()
    );
    tokio::task::spawn_blocking(move || echo.join().expect("agent"))
        .await
        .expect("join");
    assert_eq!(
        relay
            .ingress
            .stats
            .spliced
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_by_reason() {
    for backend in backends() {
        eprintln!("--- refusals_are_counted_by_reason on {backend:?}");
        refusals_are_counted_by_reason_on(backend).await;
    }
}

async fn refusals_are_counted_by_reason_on(backend: Backend) {
    let relay = start_on(
        IngressConfig {
            claim_timeout_ms: 300,
            hello_deadline_ms: 500,
            ..IngressConfig::default()
        },
        1,
        backend,
    )
    .await;
    let send = |bytes: Vec<u8>| {
        let addr = relay.sni;
        std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            let _ = c.write_all(&bytes);
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
        })
    };
    let cases: Vec<(Vec<u8>, Drop)> = vec![
        (
            b"GET / HTTP/1.1\r\nHost: demo.outrelay.test\r\n\r\n".to_vec(),
            Drop::PlainHttp,
        ),
        (hello("rustls_no_sni.bin"), Drop::NoSni),
        (vec![0x16, 0x03, 0x01, 0x00, 0x00], Drop::BadHello),
        (hello("openssl_tls13.bin"), Drop::ClaimTimeout), // routed, but no session is idle
        (
            hello("openssl_tls13.bin")[..20].to_vec(),
            Drop::HelloTimeout,
        ),
    ];
    for (bytes, reason) in cases {
        let before = relay.ingress.stats.drops(reason);
        let t = send(bytes);
        eventually(reason.label(), || {
            relay.ingress.stats.drops(reason) > before
        })
        .await;
        tokio::task::spawn_blocking(move || t.join().expect("client"))
            .await
            .expect("join");
    }

    // Unknown host: the same hello once the lease is gone from the snapshot.
    relay.shared.publish(Snapshot::default());
    let before = relay.ingress.stats.drops(Drop::UnknownHost);
    let t = send(hello("openssl_tls13.bin"));
    eventually("unknown_host", || {
        relay.ingress.stats.drops(Drop::UnknownHost) > before
    })
    .await;
    tokio::task::spawn_blocking(move || t.join().expect("client"))
        .await
        .expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_handshakes_that_must_fail_do() {
    for backend in backends() {
        eprintln!("--- reverse_handshakes_that_must_fail_do on {backend:?}");
        reverse_handshakes_that_must_fail_do_on(backend).await;
    }
}

async fn reverse_handshakes_that_must_fail_do_on(backend: Backend) {
    let relay = start_on(
        IngressConfig {
            ready_queue_max: 8,
            ..IngressConfig::default()
        },
        1,
        backend,
    )
    .await;
    let lease = relay.tls_lease;
    let reverse_addr = relay.reverse;

    // Wrong key (what a lease held by another QUIC connection would give).
    let before = relay.ingress.stats.drops(Drop::BadMac);
    tokio::task::spawn_blocking(move || drop(open_session(reverse_addr, lease, &[1; 32])))
        .await
        .expect("join");
    eventually("bad_mac", || {
        relay.ingress.stats.drops(Drop::BadMac) > before
    })
    .await;

    // Unknown lease id.
    let before = relay.ingress.stats.drops(Drop::UnknownLease);
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(reverse_addr).expect("connect");
        s.write_all(&reverse::encode_preamble(&LeaseId([0xee; 16]), &[0; 16]))
            .expect("preamble");
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0, "closed without a nonce");
    })
    .await
    .expect("join");
    eventually("unknown_lease", || {
        relay.ingress.stats.drops(Drop::UnknownLease) > before
    })
    .await;

    // The relay proves K first: its answer verifies with the lease's key only, and is bound to
    // this session's agent nonce.
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(reverse_addr).expect("connect");
        let agent_nonce = [0x22u8; 16];
        s.write_all(&reverse::encode_preamble(&lease, &agent_nonce))
            .expect("preamble");
        let mut challenge = [0u8; reverse::CHALLENGE_BYTES];
        s.read_exact(&mut challenge).expect("nonce and proof");
        assert!(reverse::verify_challenge(&KEY, &lease, &agent_nonce, &challenge).is_ok());
        assert_eq!(
            reverse::verify_challenge(&[1; 32], &lease, &agent_nonce, &challenge),
            Err(reverse::ReverseError::BadRelayProof)
        );
        assert_eq!(
            reverse::verify_challenge(&KEY, &lease, &[0x23; 16], &challenge),
            Err(reverse::ReverseError::BadRelayProof)
        );
    })
    .await
    .expect("join");

    // An old agent's one-way preamble: refused at its version byte, no nonce, counted.
    let before = relay.ingress.stats.drops(Drop::ReverseV1Refused);
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(reverse_addr).expect("connect");
        s.write_all(&reverse::encode_preamble_v1(&lease))
            .expect("preamble");
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0, "closed without a nonce");
    })
    .await
    .expect("join");
    eventually("reverse_v1_refused", || {
        relay.ingress.stats.drops(Drop::ReverseV1Refused) > before
    })
    .await;

    // A recorded handshake replayed: the relay's new nonce makes the old MAC worthless.
    let before = relay.ingress.stats.drops(Drop::BadMac);
    tokio::task::spawn_blocking(move || {
        let agent_nonce = [0x33u8; 16];
        let mut first = TcpStream::connect(reverse_addr).expect("connect");
        first
            .write_all(&reverse::encode_preamble(&lease, &agent_nonce))
            .expect("preamble");
        let mut challenge = [0u8; reverse::CHALLENGE_BYTES];
        first.read_exact(&mut challenge).expect("nonce");
        let nonce = reverse::verify_challenge(&KEY, &lease, &agent_nonce, &challenge)
            .expect("the relay's proof");
        let recorded = reverse::agent_mac(&KEY, &lease, &agent_nonce, &nonce);
        first.write_all(&recorded).expect("mac");
        let mut replay = TcpStream::connect(reverse_addr).expect("connect");
        replay
            .write_all(&reverse::encode_preamble(&lease, &agent_nonce))
            .expect("preamble");
        let mut other = [0u8; reverse::CHALLENGE_BYTES];
        replay.read_exact(&mut other).expect("nonce");
        assert_ne!(other[..16], nonce, "nonces never repeat");
        replay.write_all(&recorded).expect("replayed mac");
        let mut b = [0u8; 1];
        assert_eq!(
            replay.read(&mut b).unwrap_or(0),
            0,
            "replayed handshake closed"
        );
        first
    })
    .await
    .expect("join");
    eventually("replay refused", || {
        relay.ingress.stats.drops(Drop::BadMac) > before
    })
    .await;

    // The 9th idle session is closed (the first one above is idle already).
    let mut kept = Vec::new();
    for _ in 0..8 {
        kept.push(
            tokio::task::spawn_blocking(move || open_session(reverse_addr, lease, &KEY))
                .await
                .expect("join"),
        );
    }
    eventually("ready queue full", || {
        relay.ingress.stats.drops(Drop::ReadyQueueFull) >= 1
    })
    .await;
    eventually("8 idle", || relay.ingress.idle_sessions(&lease) == 8).await;
}

/// `ingress.reverse_accept_v1 = true` (an upgrade window): an old agent's one-way handshake
/// still makes an idle session, on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_one_way_handshake_is_accepted_only_when_configured() {
    for backend in backends() {
        eprintln!("--- an_old_one_way_handshake_is_accepted_only_when_configured on {backend:?}");
        let relay = start_on(
            IngressConfig {
                reverse_accept_v1: true,
                ..IngressConfig::default()
            },
            1,
            backend,
        )
        .await;
        let (lease, reverse_addr) = (relay.tls_lease, relay.reverse);
        let session = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(reverse_addr).expect("connect");
            s.write_all(&reverse::encode_preamble_v1(&lease))
                .expect("preamble");
            let mut nonce = [0u8; reverse::NONCE_BYTES];
            s.read_exact(&mut nonce).expect("bare nonce");
            s.write_all(&reverse::compute_mac_v1(&KEY, &nonce, &lease))
                .expect("mac");
            s
        })
        .await
        .expect("join");
        eventually("v1 idle", || relay.ingress.idle_sessions(&lease) == 1).await;
        assert_eq!(relay.ingress.stats.drops(Drop::ReverseV1Refused), 0);
        drop(session);
    }
}

/// R2: a thousand clients trickling a ClientHello are all closed by the deadline, while a normal
/// client still gets through (its latency is logged, not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_hello_senders_are_closed_at_the_deadline() {
    const SLOW: usize = 1000;
    let relay = start(IngressConfig {
        hello_deadline_ms: 1_000,
        // Every slow sender is one loopback host: this test is about the deadline, not the
        // per-source share (tests/abuse_ingress.rs).
        pending_per_source_max: SLOW + 16,
        ..IngressConfig::default()
    })
    .await;
    let addr = relay.sni;
    let hello_bytes = hello("openssl_tls13.bin");
    let slow = tokio::task::spawn_blocking(move || {
        let mut conns = Vec::with_capacity(SLOW);
        for _ in 0..SLOW {
            let mut c = TcpStream::connect(addr).expect("connect slow client");
            c.write_all(&hello_bytes[..3]).expect("first bytes");
            conns.push(c);
        }
        conns
    })
    .await
    .expect("join");
    let opened = Instant::now();

    // A normal client meanwhile.
    let (r, l) = (relay.reverse, relay.tls_lease);
    let agent = tokio::task::spawn_blocking(move || open_session(r, l, &KEY))
        .await
        .expect("session");
    eventually("session queued", || {
        relay.ingress.idle_sessions(&relay.tls_lease) == 1
    })
    .await;
    let hello_bytes = hello("openssl_tls13.bin");
    let echo = echo_agent(agent, 0x02, hello_bytes.clone());
    let normal_start = Instant::now();
    let back = client_round_trip(relay.sni, hello_bytes, b"ping".to_vec());
    let back = tokio::task::spawn_blocking(move || back.join().expect("client"))
        .await
        .expect("join");
    assert_eq!(back, b"ping");
    eprintln!(
        "normal client round trip with {SLOW} slow senders pending: {:?}",
        normal_start.elapsed()
    );
    tokio::task::spawn_blocking(move || echo.join().expect("agent"))
        .await
        .expect("join");

    // Every slow sender is closed once the deadline has passed.
    eventually("all slow senders timed out", || {
        relay.ingress.stats.drops(Drop::HelloTimeout) >= SLOW as u64
    })
    .await;
    let closed_after = opened.elapsed();
    let still_open = tokio::task::spawn_blocking(move || {
        slow.into_iter()
            .filter_map(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut b = [0u8; 1];
                // Closed: EOF or reset. A timeout or a byte means it is still open.
                let closed = match c.read(&mut b) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                };
                (!closed).then_some(())
            })
            .count()
    })
    .await
    .expect("join");
    assert_eq!(
        still_open, 0,
        "every slow sender sees its connection closed"
    );
    eprintln!("{SLOW} slow senders closed {closed_after:?} after opening (deadline 1 s)");
}

// ---------- hellos rebuilt from the captured ones ----------

/// The handshake bytes of `records` (TLS records), without the record headers.
fn handshake_bytes(records: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = records;
    while !rest.is_empty() {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        out.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    out
}

/// `handshake` framed as `n` handshake records of (nearly) equal size.
fn reframe(handshake: &[u8], n: usize) -> Vec<u8> {
    let size = handshake.len().div_ceil(n);
    let mut out = Vec::new();
    for chunk in handshake.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&be16(chunk.len()));
        out.extend_from_slice(chunk);
    }
    out
}

fn be16(n: usize) -> [u8; 2] {
    u16::try_from(n).expect("fits u16").to_be_bytes()
}

/// The captured OpenSSL hello with its server_name replaced by `name`, every enclosing
/// length (extension, extensions, handshake, record) fixed up.
fn with_sni(name: &str) -> Vec<u8> {
    let handshake = handshake_bytes(&hello("openssl_tls13.bin"));
    let body = &handshake[4..];
    // version, random, session id, cipher suites, compression methods, then extensions.
    let mut at = 2 + 32;
    at += 1 + usize::from(body[at]);
    at += 2 + usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
    at += 1 + usize::from(body[at]);
    let mut exts = &body[at + 2..];
    let mut new_exts = Vec::new();
    while !exts.is_empty() {
        let kind = u16::from_be_bytes([exts[0], exts[1]]);
        let len = usize::from(u16::from_be_bytes([exts[2], exts[3]]));
        if kind == 0 {
            let n = name.len();
            new_exts.extend_from_slice(&[0, 0]);
            new_exts.extend_from_slice(&be16(n + 5));
            new_exts.extend_from_slice(&be16(n + 3));
            new_exts.push(0);
            new_exts.extend_from_slice(&be16(n));
            new_exts.extend_from_slice(name.as_bytes());
        } else {
            new_exts.extend_from_slice(&exts[..4 + len]);
        }
        exts = &exts[4 + len..];
    }
    let mut new_body = body[..at].to_vec();
    new_body.extend_from_slice(&be16(new_exts.len()));
    new_body.extend_from_slice(&new_exts);
    let len = u32::try_from(new_body.len()).expect("fits").to_be_bytes();
    let mut new_handshake = vec![0x01, len[1], len[2], len[3]];
    new_handshake.extend_from_slice(&new_body);
    reframe(&new_handshake, 1)
}

/// A public client: sends `head` (one byte per TCP segment when `per_byte`: TCP_NODELAY and a
/// short pause after each byte), then `payload`, half-closes and returns what came back.
fn trickle_round_trip(
    addr: SocketAddr,
    head: Vec<u8>,
    per_byte: bool,
    payload: Vec<u8>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).expect("connect public");
        c.set_nodelay(true).expect("nodelay");
        if per_byte {
            for b in &head {
                c.write_all(std::slice::from_ref(b)).expect("one byte");
                std::thread::sleep(Duration::from_micros(200));
            }
        } else {
            c.write_all(&head).expect("head");
        }
        c.write_all(&payload).expect("payload");
        c.shutdown(std::net::Shutdown::Write).expect("fin");
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        all
    })
}

/// Opens one session of `lease`, waits until it is idle, sends `head` as a public client and
/// checks the agent gets marker 0x02, `head` replayed byte for byte, and a working echo.
async fn routes_to(relay: &Relay, lease: LeaseId, head: Vec<u8>, per_byte: bool, what: &str) {
    let (r, before) = (relay.reverse, relay.ingress.idle_sessions(&lease));
    let agent = tokio::task::spawn_blocking(move || open_session(r, lease, &KEY))
        .await
        .expect("session");
    eventually("session queued", || {
        relay.ingress.idle_sessions(&lease) == before + 1
    })
    .await;
    let echo = echo_agent(agent, 0x02, head.clone());
    let data = format!("ping through {what}").into_bytes();
    let started = Instant::now();
    let back = trickle_round_trip(relay.sni, head, per_byte, data.clone());
    let back = tokio::task::spawn_blocking(move || back.join().expect("client"))
        .await
        .expect("join");
    assert_eq!(back, data, "{what}: echoed through the lease");
    tokio::task::spawn_blocking(move || echo.join().expect("agent"))
        .await
        .expect("join");
    eprintln!("{what}: routed in {:?}", started.elapsed());
}

/// Sends `bytes` to the SNI listener and waits until `reason` is counted once more.
async fn refused_with(relay: &Relay, bytes: Vec<u8>, reason: Drop) {
    let before = relay.ingress.stats.drops(reason);
    let addr = relay.sni;
    let t = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).expect("connect");
        let _ = c.write_all(&bytes);
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
        sink
    });
    eventually(reason.label(), || {
        relay.ingress.stats.drops(reason) > before
    })
    .await;
    let answer = tokio::task::spawn_blocking(move || t.join().expect("client"))
        .await
        .expect("join");
    assert!(answer.is_empty(), "{}: not a byte back", reason.label());
}

// ---------- routing under adversarial segmentation, wildcard, refusals ----------

/// R1 end to end: every captured hello with an SNI, sent one byte per TCP segment, re-framed
/// into several TLS records, and both at once, reaches the lease with its bytes replayed
/// exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_one_byte_per_segment_and_split_across_records_route_to_the_lease() {
    for backend in backends() {
        eprintln!(
            "--- hellos_one_byte_per_segment_and_split_across_records_route_to_the_lease on {backend:?}"
        );
        hellos_one_byte_per_segment_and_split_across_records_route_to_the_lease_on(backend).await;
    }
}

async fn hellos_one_byte_per_segment_and_split_across_records_route_to_the_lease_on(
    backend: Backend,
) {
    let relay = start_on(IngressConfig::default(), 1, backend).await;
    for file in [
        "openssl_tls13.bin",
        "curl.bin",
        "rustls_pq.bin",
        "rustls_ech_grease.bin",
        "rustls_fragmented.bin",
        "chromium.bin",
    ] {
        let original = hello(file);
        let handshake = handshake_bytes(&original);
        let variants = [
            ("one byte per segment", original.clone(), true),
            ("2 records", reframe(&handshake, 2), false),
            (
                "7 records, one byte per segment",
                reframe(&handshake, 7),
                true,
            ),
        ];
        for (how, bytes, per_byte) in variants {
            let what = format!("{file}, {how}");
            routes_to(&relay, relay.tls_lease, bytes, per_byte, &what).await;
        }
    }
    assert_eq!(relay.ingress.stats.drops(Drop::BadHello), 0);
    assert_eq!(relay.ingress.stats.drops(Drop::HelloTimeout), 0);
}

/// `*.wild.<root>` routes one level below the wildcard lease, never two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_level_wildcard_routes_a_child_but_not_a_grandchild() {
    let relay = start(IngressConfig::default()).await;
    let child = with_sni("a.wild.outrelay.test");
    routes_to(
        &relay,
        relay.wild_lease,
        child,
        false,
        "a.wild.outrelay.test",
    )
    .await;
    let idle = relay.ingress.idle_sessions(&relay.wild_lease);
    refused_with(
        &relay,
        with_sni("a.b.wild.outrelay.test"),
        Drop::UnknownHost,
    )
    .await;
    assert_eq!(
        relay.ingress.idle_sessions(&relay.wild_lease),
        idle,
        "the grandchild claimed nothing"
    );
    // The captured hellos name demo, which has no wildcard: a child of demo is unknown.
    refused_with(&relay, with_sni("a.demo.outrelay.test"), Drop::UnknownHost).await;
}

/// IP-literal SNIs (v4 and v6), and the root host when no root-host listener is configured,
/// are refused and counted under their own reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_literal_sni_and_an_unserved_root_host_are_refused_and_counted() {
    let relay = start(IngressConfig {
        root_host: ROOT.to_owned(),
        root_fallback: None,
        ..IngressConfig::default()
    })
    .await;
    refused_with(&relay, with_sni("10.0.0.1"), Drop::IpLiteralSni).await;
    refused_with(&relay, with_sni("::ffff:10.20.30.40"), Drop::IpLiteralSni).await;
    refused_with(&relay, with_sni(ROOT), Drop::RootUnavailable).await;
    assert_eq!(relay.ingress.stats.drops(Drop::IpLiteralSni), 2);
}

/// Beyond `lease_conn_max` concurrent public connections a lease refuses more (counted); a
/// finished pair gives its place back through the engine's finished list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_lease_cap_are_refused_until_one_ends() {
    let relay = start(IngressConfig {
        lease_conn_max: 2,
        ..IngressConfig::default()
    })
    .await;
    let lease = relay.tls_lease;
    let hello_bytes = hello("openssl_tls13.bin");
    let mut agents = Vec::new();
    for _ in 0..3 {
        let r = relay.reverse;
        agents.push(
            tokio::task::spawn_blocking(move || open_session(r, lease, &KEY))
                .await
                .expect("session"),
        );
    }
    eventually("3 sessions idle", || {
        relay.ingress.idle_sessions(&lease) == 3
    })
    .await;
    // Two public connections, spliced and held open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(relay.sni).expect("connect");
        c.write_all(&hello_bytes).expect("hello");
        held.push(c);
    }
    eventually("2 connections spliced", || {
        relay
            .ingress
            .stats
            .spliced
            .load(std::sync::atomic::Ordering::Relaxed)
            == 2
    })
    .await;
    assert_eq!(relay.ingress.lease_conns().count(&lease), 2);
    refused_with(&relay, hello_bytes.clone(), Drop::LeaseConnLimit).await;
    eventually("the refused connection claimed no session", || {
        relay.ingress.idle_sessions(&lease) == 1
    })
    .await;

    // One pair ends (client and agent close): its place comes back.
    drop(held.remove(0));
    for s in agents.iter().take(2) {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    eventually("a place given back", || {
        relay.ingress.lease_conns().count(&lease) < 2
    })
    .await;
    let third = agents.pop().expect("third session");
    let echo = echo_agent(third, 0x02, hello_bytes.clone());
    let back = trickle_round_trip(relay.sni, hello_bytes, false, b"again".to_vec());
    let back = tokio::task::spawn_blocking(move || back.join().expect("client"))
        .await
        .expect("join");
    assert_eq!(back, b"again");
    tokio::task::spawn_blocking(move || echo.join().expect("agent"))
        .await
        .expect("join");
    assert_eq!(relay.ingress.stats.drops(Drop::LeaseConnLimit), 1);
}

/// Beyond `pending_conn_max` public connections in set-up, new ones are closed at once and
/// counted; places come back when the pending ones end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_connections_beyond_the_global_cap_are_refused() {
    let relay = start(IngressConfig {
        pending_conn_max: 3,
        hello_deadline_ms: 10_000,
        ..IngressConfig::default()
    })
    .await;
    // Three silent clients (and one on a TCP lease port would count the same).
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(relay.sni).expect("connect"));
    }
    eventually("3 pending", || relay.ingress.pending_conns() == 3).await;
    refused_with(&relay, hello("openssl_tls13.bin"), Drop::PendingFull).await;
    assert_eq!(relay.ingress.stats.drops(Drop::HelloTimeout), 0);
    drop(silent);
    eventually("pending places given back", || {
        relay.ingress.pending_conns() == 0
    })
    .await;
    refused_with(&relay, b"GET / HTTP/1.1\r\n\r\n".to_vec(), Drop::PlainHttp).await;
    assert_eq!(relay.ingress.stats.drops(Drop::PendingFull), 1);
}

// ---------- per-core workers ----------

/// Public connections accepted per worker, as the workers count them.
fn accepts(relay: &Relay, kind: usize) -> Vec<u64> {
    relay
        .ingress
        .worker_stats()
        .iter()
        .map(|w| w.accepts[kind].load(std::sync::atomic::Ordering::Relaxed))
        .collect()
}

fn counter(relay: &Relay, f: impl Fn(&outrelay_relay::worker::WorkerStats) -> u64) -> Vec<u64> {
    relay.ingress.worker_stats().iter().map(|w| f(w)).collect()
}

/// The worker whose accept counter (of `kind`) moved between `before` and now; waits for it.
async fn accepted_by(relay: &Relay, kind: usize, before: &[u64]) -> usize {
    let mut which = None;
    eventually("the accept is counted", || {
        which = accepts(relay, kind)
            .iter()
            .zip(before)
            .position(|(now, was)| now > was);
        which.is_some()
    })
    .await;
    which.expect("a worker")
}

/// Opens a reverse session of `lease` and returns it with the worker that accepted it.
async fn session_on_a_worker(relay: &Relay, lease: LeaseId) -> (TcpStream, usize) {
    let before = accepts(relay, 1);
    let r = relay.reverse;
    let agent = tokio::task::spawn_blocking(move || open_session(r, lease, &KEY))
        .await
        .expect("session");
    (agent, accepted_by(relay, 1, &before).await)
}

/// Joins a client and an echo agent thread; the client's bytes back.
async fn join_both(
    client: std::thread::JoinHandle<Vec<u8>>,
    echo: std::thread::JoinHandle<()>,
) -> Vec<u8> {
    let back = tokio::task::spawn_blocking(move || client.join().expect("client"))
        .await
        .expect("join");
    tokio::task::spawn_blocking(move || echo.join().expect("agent"))
        .await
        .expect("join");
    back
}

/// SO_REUSEPORT spreads public connections and reverse sessions over every worker: each
/// worker's accept counters move, and every connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_over_all_workers() {
    for backend in backends() {
        let relay = start_on(IngressConfig::default(), 2, backend).await;
        let lease = relay.tls_lease;
        let hello_bytes = hello("openssl_tls13.bin");
        for i in 0..32 {
            let r = relay.reverse;
            let agent = tokio::task::spawn_blocking(move || open_session(r, lease, &KEY))
                .await
                .expect("session");
            let echo = echo_agent(agent, 0x02, hello_bytes.clone());
            let data = format!("connection {i}").into_bytes();
            let client = client_round_trip(relay.sni, hello_bytes.clone(), data.clone());
            let back = join_both(client, echo).await;
            assert_eq!(back, data, "{backend:?}: connection {i} echoed");
        }
        let (public, reverse) = (accepts(&relay, 0), accepts(&relay, 1));
        let claims = counter(&relay, |w| {
            w.claims.load(std::sync::atomic::Ordering::Relaxed)
        });
        eprintln!(
            "{backend:?}: public accepts per worker {public:?}, reverse {reverse:?}, claims {claims:?}"
        );
        // 32 connections each way, hashed by 4-tuple: one worker getting none has odds 2^-31.
        assert!(public.iter().all(|n| *n > 0), "public spread: {public:?}");
        assert!(
            reverse.iter().all(|n| *n > 0),
            "reverse spread: {reverse:?}"
        );
        assert_eq!(public.iter().sum::<u64>(), 32);
        assert_eq!(claims.iter().sum::<u64>(), 32);
    }
}

/// A lease whose only idle session sits on one worker still serves a connection another
/// worker accepted: that worker steals the session (`cross_claims`). And a claim waiting on
/// one worker with nothing idle anywhere gets the next session even when another worker
/// authenticates it (`handoffs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_one_worker_serve_connections_accepted_by_another() {
    for backend in backends() {
        let relay = start_on(
            IngressConfig {
                claim_timeout_ms: 10_000,
                ..IngressConfig::default()
            },
            2,
            backend,
        )
        .await;
        let lease = relay.tls_lease;
        let hello_bytes = hello("openssl_tls13.bin");
        let relaxed = std::sync::atomic::Ordering::Relaxed;

        // Part 1: the session is idle on worker W; retry until a connection lands on the
        // other worker (each round has odds 1/2; 20 rounds).
        let mut stolen = false;
        for round in 0..20 {
            let (agent, home) = session_on_a_worker(&relay, lease).await;
            eventually("session idle", || {
                relay.ingress.worker_stats()[home].idle_sessions(&lease) == 1
            })
            .await;
            let echo = echo_agent(agent, 0x02, hello_bytes.clone());
            let cross_before = counter(&relay, |w| w.cross_claims.load(relaxed));
            let before = accepts(&relay, 0);
            let data = format!("round {round}").into_bytes();
            let client = client_round_trip(relay.sni, hello_bytes.clone(), data.clone());
            let by = accepted_by(&relay, 0, &before).await;
            let back = join_both(client, echo).await;
            assert_eq!(back, data, "{backend:?} round {round}: served");
            if by != home {
                let cross = counter(&relay, |w| w.cross_claims.load(relaxed));
                assert_eq!(
                    cross[by],
                    cross_before[by] + 1,
                    "{backend:?}: worker {by} claimed worker {home}'s session"
                );
                eprintln!("{backend:?}: stolen across workers in round {round}");
                stolen = true;
                break;
            }
        }
        assert!(
            stolen,
            "{backend:?}: no connection landed on the other worker in 20 rounds"
        );

        // Part 2: a claim waits on worker A with nothing idle; sessions arrive until one is
        // authenticated on the other worker, which hands it over.
        let mut handed = false;
        for round in 0..20 {
            let before = accepts(&relay, 0);
            let data = format!("waiting {round}").into_bytes();
            let client = client_round_trip(relay.sni, hello_bytes.clone(), data.clone());
            let waiting_on = accepted_by(&relay, 0, &before).await;
            let handoffs_before: u64 = counter(&relay, |w| w.handoffs.load(relaxed)).iter().sum();
            let cross_before: u64 = counter(&relay, |w| w.cross_claims.load(relaxed))
                .iter()
                .sum();
            let (agent, home) = session_on_a_worker(&relay, lease).await;
            let echo = echo_agent(agent, 0x02, hello_bytes.clone());
            let back = join_both(client, echo).await;
            assert_eq!(back, data, "{backend:?} waiting round {round}: served");
            // The round's session went to the other worker's waiting claim: both ends count
            // it (judged by the counters, not by which worker the accept counters name).
            let handoffs: u64 = counter(&relay, |w| w.handoffs.load(relaxed)).iter().sum();
            let cross: u64 = counter(&relay, |w| w.cross_claims.load(relaxed))
                .iter()
                .sum();
            assert_eq!(
                handoffs - handoffs_before,
                cross - cross_before,
                "{backend:?}: every session handed over was claimed across workers"
            );
            if cross > cross_before {
                eprintln!(
                    "{backend:?}: handed over to a waiting claim in round {round} (session on \
                     worker {home}, claim on worker {waiting_on})"
                );
                handed = true;
                break;
            }
        }
        assert!(
            handed,
            "{backend:?}: no session landed on the other worker in 20 rounds"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_addr_lease_gets_marker_0x03_and_the_clients_addresses() {
    use outrelay_proto::client_addr::{BLOCK_V4_BYTES, ClientAddr};
    let relay = start(IngressConfig::default()).await;
    let lease_of = |port: u16| {
        relay
            .shared
            .load()
            .routes
            .lookup_tcp(port)
            .expect("route")
            .lease_id
    };
    for (port, client_addr) in [(relay.addr_port, true), (relay.tcp_port, false)] {
        let agent = {
            let (r, lease) = (relay.reverse, lease_of(port));
            tokio::task::spawn_blocking(move || open_session(r, lease, &KEY))
                .await
                .expect("session")
        };
        let target: SocketAddr = ([127, 0, 0, 1], port).into();
        eventually("TCP lease port listening", || {
            std::net::TcpListener::bind(target).is_err()
        })
        .await;
        let (client, mut agent) = tokio::task::spawn_blocking(move || {
            let mut agent = agent;
            let mut client = TcpStream::connect(target).expect("connect public");
            client.write_all(b"hello").expect("client bytes");
            let mut marker = [0u8; 1];
            agent.read_exact(&mut marker).expect("marker");
            let mut block = [0u8; BLOCK_V4_BYTES];
            if client_addr {
                assert_eq!(marker[0], 0x03, "a client_addr lease's marker");
                agent.read_exact(&mut block).expect("address block");
                let want = ClientAddr::new(
                    client.local_addr().expect("client addr"),
                    client.peer_addr().expect("dialled addr"),
                );
                assert_eq!(ClientAddr::decode(&block), Ok((want, &[][..])));
                eprintln!("block names the client {}", want.source);
            } else {
                assert_eq!(marker[0], 0x01, "a plain lease's marker is unchanged");
            }
            let mut first = [0u8; 5];
            agent.read_exact(&mut first).expect("client bytes");
            assert_eq!(&first, b"hello", "the client's bytes follow the block");
            agent.write_all(b"back").expect("answer");
            let mut back = [0u8; 4];
            client
                .read_exact(&mut back)
                .expect("answer through the pair");
            assert_eq!(&back, b"back");
            (client, agent)
        })
        .await
        .expect("join");
        drop(client);
        let _ = agent.flush();
    }
}
