//! eBPF steering end to end (`[ebpf]`, issue 17), against the real relay binary: a 1,000-port
//! lease range served through one socket per worker (TCP and UDP, each port echoing through
//! its own lease; an unleased or released port refused by the kernel and counted), CPU-local
//! accept (a client pinned to CPU k is accepted by the worker pinned on k), and the fallbacks
//! (`auto` without CAP_BPF serves through plain listeners; `on` refuses to start).
//!
//! Every test probes for BPF first and prints a loud SKIP line where it cannot load.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use outrelay_proto::orp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Why BPF programs cannot be loaded here (`None`: they can).
fn bpf_unavailable() -> Option<String> {
    outrelay_ebpf::probe().err().map(|e| e.to_string())
}

/// Skips the test loudly where BPF cannot load, unless `OUTRELAY_REQUIRE_BPF=1` (the suite
/// sets it when it runs as root, as CI does): then a missing program is a failure, not a skip.
macro_rules! require_bpf {
    ($name:literal) => {
        if let Some(why) = bpf_unavailable() {
            assert!(
                std::env::var("OUTRELAY_REQUIRE_BPF").as_deref() != Ok("1"),
                "{}: OUTRELAY_REQUIRE_BPF=1 but BPF is unavailable: {why}",
                $name
            );
            eprintln!("SKIP {}: BPF unavailable here ({why})", $name);
            return;
        }
    };
}

/// A target that answers every connection with `tag`, then echoes.
async fn tagged_echo(tag: u8) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                if w.write_all(&[tag]).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Connects to `port`, expects `tag` first, then the echo of what it sent.
async fn tcp_echo_through(port: u16, tag: u8) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("port {port}: connect: {e}"))?;
    let msg = format!("port {port}");
    s.write_all(msg.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut got = vec![0u8; 1 + msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .map_err(|_| format!("port {port}: no echo in time"))?
        .map_err(|e| format!("port {port}: read: {e}"))?;
    if got[0] != tag || &got[1..] != msg.as_bytes() {
        return Err(format!(
            "port {port}: got {got:?}, wanted tag {tag} and {msg:?}"
        ));
    }
    Ok(())
}

/// Sends to `port` from a connected socket until the echo comes back (UDP may lose the first
/// datagram while the flow starts).
async fn udp_echo_through(port: u16) -> Result<(), String> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    s.connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let msg = format!("udp {port}");
    let mut buf = [0u8; 64];
    for _ in 0..20 {
        s.send(msg.as_bytes()).await.map_err(|e| e.to_string())?;
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(250), s.recv(&mut buf)).await
        {
            return if &buf[..n] == msg.as_bytes() {
                Ok(())
            } else {
                Err(format!("port {port}: wrong echo {:?}", &buf[..n]))
            };
        }
    }
    Err(format!("udp port {port}: no echo"))
}

/// The relay's `status` document over its admin socket.
async fn admin_status(relay: &Relay) -> serde_json::Value {
    let mut s = tokio::net::UnixStream::connect(relay.dir.path().join("admin.sock"))
        .await
        .expect("admin socket");
    s.write_all(b"status\n").await.expect("ask");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("answer");
    serde_json::from_str(text.trim()).expect("status JSON")
}

const LEASES: u16 = 1_000;
const TAGS: u16 = 8;

/// Issue 17: a 1,000-port range with a TCP and a UDP lease on every port, all served through
/// the workers' range sockets (no per-port listener): each port echoes through its own lease
/// (the target's tag proves which lease answered); a released port is refused by the kernel
/// at once and counted, while every other port still routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_1000_port_range_routes_every_tcp_and_udp_lease_through_one_socket_per_worker() {
    require_bpf!("a_1000_port_range_routes_every_tcp_and_udp_lease_through_one_socket_per_worker");
    let ca = Ca::new();
    let (lo, hi) = outrelay_testkit::claim_port_ranges(LEASES / outrelay_testkit::RANGE_PORTS);
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!(
                "tcp = true\nudp = true\nmin_port = {lo}\nmax_port = {hi}\nmax_per_agent = 4096\n"
            ),
            // 2,000 grants at once: above the per-agent lease frame pacing (50/s).
            tables: "[ebpf]\nmode = \"on\"\n[quic]\nlease_frames_per_s = 100000\nlease_frames_burst = 100000\n"
                .to_owned(),
            ..Opts::default()
        },
    )
    .await;
    let fds_before = std::fs::read_dir(format!("/proc/{}/fd", relay.child.id()))
        .expect("relay fds")
        .count();
    let mut agent = Agent::connect(&relay, &ca).await;
    let mut targets = Vec::new();
    for tag in 0..TAGS {
        targets.push(tagged_echo(u8::try_from(tag).expect("small")).await);
    }
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let started = Instant::now();
    for i in 0..LEASES {
        let grant = agent
            .register_with(orp::LeaseRegister {
                name: format!("t{i}"),
                tcp: true,
                ttl_s: 300,
                request_id: u64::from(i),
                ..orp::LeaseRegister::default()
            })
            .await;
        agent.serve_lease_with(&relay, &grant, targets[usize::from(i % TAGS)], 1);
        tcp.push((lease_port(&grant), i % TAGS, grant));
        let grant = agent
            .register_with(orp::LeaseRegister {
                name: format!("u{i}"),
                udp: true,
                ttl_s: 300,
                request_id: u64::from(i),
                ..orp::LeaseRegister::default()
            })
            .await;
        udp.push(port_of(&grant.udp_addr));
    }
    agent.serve_udp_echo();
    eprintln!("{} leases granted in {:?}", 2 * LEASES, started.elapsed());
    let mut ports: Vec<u16> = tcp.iter().map(|(p, _, _)| *p).collect();
    ports.sort_unstable();
    assert_eq!(
        ports,
        (lo..=hi).collect::<Vec<_>>(),
        "every TCP port of the range leased"
    );

    // Every port echoes through its own lease, 50 at a time.
    for chunk in tcp.chunks(50) {
        let calls = chunk
            .iter()
            .map(|(port, tag, _)| tcp_echo_through(*port, u8::try_from(*tag).expect("small")));
        for r in futures_join_all(calls).await {
            r.expect("TCP echo through its lease");
        }
    }
    for chunk in udp.chunks(50) {
        for r in futures_join_all(chunk.iter().map(|p| udp_echo_through(*p))).await {
            r.expect("UDP echo through its lease");
        }
    }
    let body = relay.scrape().await;
    let steered_tcp = sample(
        &body,
        "outrelay_relay_ebpf_lookup_total{proto=\"tcp\",outcome=\"steered\"}",
    );
    let steered_udp = sample(
        &body,
        "outrelay_relay_ebpf_lookup_total{proto=\"udp\",outcome=\"steered\"}",
    );
    assert!(
        steered_tcp >= f64::from(LEASES),
        "tcp steered {steered_tcp}"
    );
    assert!(
        steered_udp >= f64::from(LEASES),
        "udp steered {steered_udp}"
    );
    assert_eq!(
        sample(&body, "outrelay_relay_ebpf_active{program=\"lookup\"}"),
        1.0
    );
    // TCP lease ports cost the relay no descriptor: what it holds beyond start-up is the
    // reverse sessions (one per TCP lease) and the UDP leases' reply sockets.
    let fds_after = std::fs::read_dir(format!("/proc/{}/fd", relay.child.id()))
        .expect("relay fds")
        .count();
    eprintln!(
        "relay fds: {fds_before} at start, {fds_after} with {LEASES} TCP + {LEASES} UDP leases"
    );
    assert!(
        fds_after < fds_before + 2 * usize::from(LEASES) + 100,
        "no listener per TCP lease port: {fds_before} -> {fds_after}"
    );

    // A released port is refused by the kernel at once (no grace tick), and counted; its
    // neighbours still route.
    let (port, _, grant) = &tcp[5];
    let refused_before = relay
        .metric("outrelay_relay_ebpf_lookup_total{proto=\"tcp\",outcome=\"refused\"}")
        .await;
    agent.release(grant).await;
    let err = TcpStream::connect(("127.0.0.1", *port))
        .await
        .expect_err("a released lease port is refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let refused_after = relay
        .metric("outrelay_relay_ebpf_lookup_total{proto=\"tcp\",outcome=\"refused\"}")
        .await;
    assert!(
        refused_after > refused_before,
        "{refused_before} -> {refused_after}"
    );
    let (next, tag, _) = &tcp[6];
    tcp_echo_through(*next, u8::try_from(*tag).expect("small"))
        .await
        .expect("the neighbour still routes");
}

/// `futures::future::join_all` without the dependency: spawn each and await in order.
async fn futures_join_all<F>(calls: impl Iterator<Item = F>) -> Vec<Result<(), String>>
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap_or_else(|e| Err(e.to_string())));
    }
    out
}

/// Issue 17: with the reuseport program, the worker pinned on CPU k accepts every connection
/// of a client thread pinned to CPU k (loopback processes the SYN on the sender's CPU).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinned_to_cpu_k_is_accepted_by_the_worker_on_cpu_k() {
    require_bpf!("a_client_pinned_to_cpu_k_is_accepted_by_the_worker_on_cpu_k");
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if cpus < 2 {
        eprintln!("SKIP a_client_pinned_to_cpu_k_is_accepted_by_the_worker_on_cpu_k: one CPU");
        return;
    }
    let ca = Ca::new();
    let relay = start_relay_with(
        &ca,
        Opts {
            tables: "[ebpf]\nmode = \"on\"\nreuseport = true\n".to_owned(),
            ..Opts::default()
        },
    )
    .await;
    let status = admin_status(&relay).await;
    assert_eq!(
        status["ebpf"]["programs"]["reuseport_public"], true,
        "{status}"
    );
    let workers: Vec<(u64, u64)> = status["worker_stats"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| {
            (
                w["worker"].as_u64().expect("id"),
                w["cpu"].as_u64().expect("pinned"),
            )
        })
        .collect();
    const CONNS: usize = 20;
    for &(worker, cpu) in &workers {
        let accepts = |s: &serde_json::Value| -> Vec<u64> {
            s["worker_stats"]
                .as_array()
                .expect("workers")
                .iter()
                .map(|w| w["accepts_public"].as_u64().expect("accepts"))
                .collect()
        };
        let before = accepts(&admin_status(&relay).await);
        let addr = relay.public_tls;
        std::thread::spawn(move || {
            let mut set = nix::sched::CpuSet::new();
            set.set(usize::try_from(cpu).expect("cpu"))
                .expect("cpu in set");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pin");
            for _ in 0..CONNS {
                let s = std::net::TcpStream::connect(addr).expect("connect");
                drop(s);
            }
        })
        .join()
        .expect("client thread");
        let deadline = Instant::now() + WAIT;
        let after = loop {
            let after = accepts(&admin_status(&relay).await);
            let total: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
            if total >= CONNS as u64 || Instant::now() > deadline {
                break after;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        eprintln!("client on CPU {cpu}: accepts per worker {delta:?}");
        let w = usize::try_from(worker).expect("index");
        assert_eq!(
            delta[w], CONNS as u64,
            "worker {worker} (CPU {cpu}) took them all: {delta:?}"
        );
    }
    let local = relay
        .metric("outrelay_relay_ebpf_reuseport_total{group=\"public\",outcome=\"local\"}")
        .await;
    assert!(local >= (CONNS * workers.len()) as f64, "local {local}");
}

/// Issue 17: a relay without CAP_BPF (run as nobody, as the packaged unit runs without its
/// eBPF drop-in) with `mode = "auto"` starts, says the programs are off, and serves a TCP
/// lease through plain per-port listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cap_bpf_auto_serves_through_plain_listeners() {
    let Some(why) = unprivileged_unavailable() else {
        return run_without_cap_bpf().await;
    };
    eprintln!("SKIP without_cap_bpf_auto_serves_through_plain_listeners: {why}");
}

async fn run_without_cap_bpf() {
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            tables: "[ebpf]\nmode = \"auto\"\n".to_owned(),
            unprivileged: true,
            ..Opts::default()
        },
    )
    .await;
    let body = relay.scrape().await;
    for program in ["lookup", "reuseport_public", "reuseport_reverse"] {
        assert_eq!(
            sample(
                &body,
                &format!("outrelay_relay_ebpf_active{{program=\"{program}\"}}")
            ),
            0.0,
            "{program} off without CAP_BPF"
        );
    }
    let mut agent = Agent::connect(&relay, &ca).await;
    let grant = agent.register("db", false, true).await;
    let target = tagged_echo(7).await;
    agent.serve_lease_with(&relay, &grant, target, 1);
    let port = lease_port(&grant);
    let deadline = Instant::now() + WAIT;
    // The per-port listeners are bound on the maintenance tick after the grant.
    loop {
        match tcp_echo_through(port, 7).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 17: `mode = "on"` where programs cannot load (no CAP_BPF) refuses to start with one
/// clear line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_on_without_cap_bpf_refuses_to_start_with_a_clear_error() {
    if let Some(why) = unprivileged_unavailable() {
        eprintln!("SKIP mode_on_without_cap_bpf_refuses_to_start_with_a_clear_error: {why}");
        return;
    }
    let ca = Ca::new();
    let opts = Opts {
        tables: "[ebpf]\nmode = \"on\"\n".to_owned(),
        unprivileged: true,
        ..Opts::default()
    };
    let dir = relay_dir(&ca, &opts);
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_outrelay-relay"))
        .arg("--config")
        .arg(dir.path().join("relay.toml"))
        .arg("--log")
        .arg("error")
        .output()
        .expect("run the relay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it must not start: {stderr}");
    assert!(
        stderr.contains("[ebpf] mode = \"on\""),
        "the error names the setting: {stderr}"
    );
}

/// Issue 17: nothing outlives the relay, even kill -9 (no bpffs pinning: the kernel frees the
/// programs with the process's descriptors). While the relay runs, a port of its range with no
/// lease is refused even to a plain listener someone else binds there; once it is killed, that
/// listener is reachable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leaves_no_program_behind() {
    require_bpf!("kill_9_leaves_no_program_behind");
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            tables: "[ebpf]\nmode = \"on\"\n".to_owned(),
            ..Opts::default()
        },
    )
    .await;
    let squatter = std::net::TcpListener::bind(("127.0.0.1", hi)).expect("bind a range port");
    let err = std::net::TcpStream::connect(("127.0.0.1", hi))
        .expect_err("the lookup program refuses an unleased port of its range");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let mut relay = relay;
    relay.child.kill().expect("kill -9");
    relay.child.wait().expect("reap");
    std::net::TcpStream::connect(("127.0.0.1", hi))
        .expect("with the relay gone, the program is gone too");
    drop(squatter);
}
