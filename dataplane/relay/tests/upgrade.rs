//! Hitless binary upgrade (issue 20), end to end with the REAL binary: `outrelay-relay upgrade`
//! makes the running relay start itself again and hand its sockets over. Checked: no public
//! connection refused while the processes swap, a spliced pair started before keeps flowing
//! in the old process until it ends, the old process exits then, the new one serves agents on
//! the same QUIC socket, and a new process that cannot start leaves the old one serving.
//!
//! Runs with whatever the environment picks (`OUTRELAY_IO_BACKEND`, `OUTRELAY_EBPF_MODE`): CI
//! runs it plain (`epoll`, eBPF off) and with the defaults.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use common::*;

/// A long GOAWAY grace: after a hand-over the old process must close its QUIC endpoint well
/// before it (the new one reads the same socket).
const TABLES: &str = "[quic]\ndrain_grace_ms = 2000\n[lifecycle]\nshutdown_grace_ms = 20000\n";

fn opts() -> Opts {
    Opts {
        tables: TABLES.to_owned(),
        ..Opts::default()
    }
}

/// A TLS target for `DEMO_HOST` that echoes every byte back.
async fn tls_echo_target(ca: &Ca) -> (std::net::SocketAddr, JoinHandle<()>) {
    common::tls_server(ca, |tls| async move {
        let (mut r, mut w) = tokio::io::split(tls);
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A TLS client to the relay's public port with SNI `DEMO_HOST`.
async fn tls_client(relay: &Relay, ca: &Ca) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.clone()).expect("CA root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(DEMO_HOST).expect("server name");
    let tcp = TcpStream::connect(relay.public_tls)
        .await
        .expect("connect public TLS");
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake through the relay")
}

/// Writes `msg` and reads the same bytes back.
async fn echo_once(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
    tls.write_all(msg).await.expect("write through the pair");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, tls.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo read");
    assert_eq!(back, msg, "the pair echoes");
}

/// Connects to `addr` in a tight loop until `stop`: (connections made, refused or failed).
fn connect_loop(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> (JoinHandle<()>, Arc<AtomicU64>, Arc<AtomicU64>) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (ok2, failed2) = (ok.clone(), failed.clone());
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    ok2.fetch_add(1, Ordering::Relaxed);
                    drop(s);
                }
                Err(e) => {
                    eprintln!("connect {addr}: {e}");
                    failed2.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    (task, ok, failed)
}

/// Waits until the process `child` exited; its exit code.
async fn exited(child: &mut std::process::Child) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("poll old relay") {
            return status.code();
        }
        assert!(
            start.elapsed() < WAIT,
            "the old relay did not exit in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The inode of the UDP socket bound on 127.0.0.1:`port` (`/proc/net/udp`).
fn udp_inode(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/udp").expect("read /proc/net/udp");
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.get(1) == Some(&local.as_str())).then(|| cols.get(9).map(|s| (*s).to_owned()))?
    })
}

/// The socket inodes process `pid` holds descriptors of.
fn socket_inodes(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_refuses_no_connection_and_keeps_the_spliced_pairs_of_the_old_process() {
    let ca = Ca::new();
    let mut relay = start_relay_with(&ca, opts()).await;
    let old_pid = relay.child.id();
    assert_eq!(
        relay.ready_info()["pid"].as_u64(),
        Some(u64::from(old_pid)),
        "the ready file names the pid"
    );
    let (target, _target) = tls_echo_target(&ca).await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let grant = agent.register("demo", true, false).await;
    agent.serve_lease(&relay, &grant, target);
    // A public TLS client spliced before the upgrade.
    let mut before = tls_client(&relay, &ca).await;
    echo_once(&mut before, b"before the upgrade").await;
    // Connections in a tight loop on both public ports while the processes swap.
    let stop = Arc::new(AtomicBool::new(false));
    let (public_loop, public_ok, public_failed) = connect_loop(relay.public_tls, stop.clone());
    let (reverse_loop, reverse_ok, reverse_failed) = connect_loop(relay.reverse, stop.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (code, answer) = relay.upgrade(20).await;
    let answered = Instant::now();
    assert_eq!(code, Some(0), "upgrade succeeded: {answer}");
    assert_eq!(answer["upgraded"], true, "{answer}");
    assert_eq!(
        answer["old_pid"].as_u64(),
        Some(u64::from(old_pid)),
        "{answer}"
    );
    let new_pid = answer["new_pid"].as_u64().expect("new pid");
    assert_ne!(new_pid, u64::from(old_pid));
    // QUIC + (reverse + public) per worker; UDP: the QUIC socket.
    assert_eq!(answer["handed_over"]["tcp_listeners"], 4, "{answer}");
    assert_eq!(answer["handed_over"]["udp_sockets"], 1, "{answer}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    public_loop.await.expect("public loop");
    reverse_loop.await.expect("reverse loop");
    let (made, refused) = (
        public_ok.load(Ordering::Relaxed) + reverse_ok.load(Ordering::Relaxed),
        public_failed.load(Ordering::Relaxed) + reverse_failed.load(Ordering::Relaxed),
    );
    eprintln!("connections during the upgrade: {made} made, {refused} refused or failed");
    assert!(made > 0, "the loops connected at all");
    assert_eq!(refused, 0, "no connection refused during the upgrade");

    let info = relay.ready_info();
    assert_eq!(
        info["pid"].as_u64(),
        Some(new_pid),
        "the new ready file: {info}"
    );
    assert_eq!(
        addr_of(&info, "public_tls"),
        relay.public_tls,
        "same public port"
    );
    assert_eq!(addr_of(&info, "quic"), relay.quic, "same QUIC port");
    assert_eq!(
        addr_of(&info, "reverse"),
        relay.reverse,
        "same reverse port"
    );
    let new_pid = u32::try_from(new_pid).expect("pid");
    assert!(alive(new_pid), "the new process runs");

    // The old process stops reading the shared QUIC socket within a second (its endpoint is
    // dropped), while the new one holds it.
    let quic_inode = udp_inode(relay.quic.port()).expect("the QUIC socket in /proc/net/udp");
    assert!(
        socket_inodes(new_pid).contains(&quic_inode),
        "the new process holds the QUIC socket"
    );
    while socket_inodes(old_pid).contains(&quic_inode) {
        assert!(
            answered.elapsed() < Duration::from_secs(1),
            "the old process still holds the QUIC socket a second after the hand-over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "old process let go of the QUIC socket within {:?} of the answer",
        answered.elapsed()
    );

    // The old process keeps its pair: bytes still echo, and it waits for the pair to end.
    echo_once(&mut before, b"after the upgrade").await;
    assert!(
        relay.child.try_wait().expect("poll").is_none(),
        "the old process waits for its spliced pair"
    );
    drop(before);
    assert_eq!(
        exited(&mut relay.child).await,
        Some(0),
        "the old process exits 0"
    );
    assert!(alive(new_pid), "the new process serves on");

    // The new process serves new agents and their public clients.
    let mut agent2 = connect_retrying(&relay, &ca, AGENT).await;
    let grant = agent2.register("demo", true, false).await;
    agent2.serve_lease(&relay, &grant, target);
    let mut after = tls_client(&relay, &ca).await;
    echo_once(&mut after, b"through the new process").await;
    drop(agent);
}

/// An agent connection, retried while the QUIC port changes hands.
async fn connect_retrying(relay: &Relay, ca: &Ca, uri: &str) -> Agent {
    let start = Instant::now();
    loop {
        match Agent::try_connect_as(relay, ca, uri).await {
            Ok(agent) => return agent,
            Err(e) => {
                assert!(
                    start.elapsed() < WAIT,
                    "no HELLO_ACK after the upgrade: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_an_upgrade_a_new_agent_gets_its_lease_from_the_new_process_on_the_same_quic_port() {
    let ca = Ca::new();
    let mut relay = start_relay_with(&ca, opts()).await;
    let old_pid = relay.child.id();
    let (code, answer) = relay.upgrade(20).await;
    assert_eq!(code, Some(0), "upgrade succeeded: {answer}");
    let new_pid = answer["new_pid"].as_u64().expect("new pid");
    assert_eq!(
        exited(&mut relay.child).await,
        Some(0),
        "the old process exits 0"
    );
    assert!(!alive(old_pid), "the old process is gone");
    let status = relay.admin("status").await;
    assert_eq!(status["upgrade"]["state"], "serving", "{status}");
    let (target, _target) = tls_echo_target(&ca).await;
    let mut agent = connect_retrying(&relay, &ca, AGENT).await;
    let grant = agent.register("demo", true, false).await;
    assert_eq!(grant.hostname, DEMO_HOST);
    agent.serve_lease(&relay, &grant, target);
    let mut client = tls_client(&relay, &ca).await;
    echo_once(&mut client, b"served by the new process").await;
    // The lease lives in the new process: its status lists it.
    let status = relay.admin("status").await;
    let leases = status["leases"].as_array().expect("leases");
    assert!(
        leases.iter().any(|l| l["hostname"] == DEMO_HOST),
        "the new process (pid {new_pid}) holds the lease: {status}"
    );
    let info = relay.ready_info();
    assert_eq!(info["pid"].as_u64(), Some(new_pid));
    // A second upgrade from the new process works too (it holds its sockets for it).
    let (code, answer) = relay.upgrade(20).await;
    assert_eq!(code, Some(0), "second upgrade: {answer}");
    assert_eq!(answer["old_pid"].as_u64(), Some(new_pid), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_that_cannot_start_leaves_the_old_one_serving() {
    let ca = Ca::new();
    let mut relay = start_relay_with(&ca, opts()).await;
    let old_pid = relay.child.id();
    let (target, _target) = tls_echo_target(&ca).await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let grant = agent.register("demo", true, false).await;
    agent.serve_lease(&relay, &grant, target);
    // The new process reads the same config: make it invalid.
    let config = relay.dir.path().join("relay.toml");
    let text = std::fs::read_to_string(&config).expect("read config");
    std::fs::write(&config, text.replace("workers = 2", "workers = \"many\""))
        .expect("write invalid config");

    let (code, answer) = relay.upgrade(20).await;
    assert_eq!(code, Some(1), "a failed upgrade exits 1: {answer}");
    assert_eq!(answer["upgraded"], false, "{answer}");
    let error = answer["error"].as_str().expect("error text");
    assert!(error.contains("exited"), "the answer says why: {error}");
    assert!(
        relay.child.try_wait().expect("poll").is_none(),
        "the old process runs"
    );
    assert_eq!(relay.ready_info()["pid"].as_u64(), Some(u64::from(old_pid)));
    // The old process still serves new connections through its lease.
    let mut client = tls_client(&relay, &ca).await;
    echo_once(&mut client, b"still served by the old process").await;
    assert_eq!(
        relay
            .metric("outrelay_relay_upgrades_total{result=\"failed\"}")
            .await,
        1.0
    );
    let status = relay.admin("status").await;
    assert_eq!(status["upgrade"]["state"], "serving", "{status}");
    // With the config fixed, the next upgrade goes through.
    std::fs::write(&config, text).expect("restore config");
    let (code, answer) = relay.upgrade(20).await;
    assert_eq!(code, Some(0), "upgrade after the fix: {answer}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_usage_errors_exit_64() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outrelay-relay"))
        .args(["upgrade", "--timeout-s", "zero"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tcp_lease_port_is_handed_over_and_its_queued_connection_served_once_the_lease_returns() {
    let ca = Ca::new();
    // One port in the range: the lease gets the same port again in the new process.
    let (lo, _) = free_port_range();
    let mut relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {lo}\n"),
            ..opts()
        },
    )
    .await;
    let (target, _target) = echo_server().await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let grant = agent.register("db", false, true).await;
    let port = lease_port(&grant);
    assert_eq!(port, lo);
    agent.serve_lease(&relay, &grant, target);
    wait_until_routed(port).await;
    let lookup = relay.ready_info()["ebpf"]
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p == "lookup"));

    let (code, answer) = relay.upgrade(20).await;
    assert_eq!(code, Some(0), "upgrade succeeded: {answer}");
    // Reverse and public per worker + the lease port per worker (plain) or the lookup
    // program's TCP range socket per worker (eBPF lookup).
    assert_eq!(answer["handed_over"]["tcp_listeners"], 6, "{answer}");
    assert_eq!(
        exited(&mut relay.child).await,
        Some(0),
        "the old process exits 0"
    );
    drop(agent);
    // The port takes a connection though no lease holds it yet in the new process: it waits
    // in the inherited listener's queue.
    let mut queued = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the lease port takes connections after the old process left");
    queued.write_all(b"queued").await.expect("write");
    // The agent comes back: the same port, the inherited listener adopted, the queued
    // connection served.
    let mut agent = connect_retrying(&relay, &ca, AGENT).await;
    let grant = agent.register("db", false, true).await;
    assert_eq!(lease_port(&grant), port);
    agent.serve_lease(&relay, &grant, target);
    if lookup {
        // The range socket's worker accepts it at once and finds no route yet: it waits for
        // the lease only with U2's `Ingress::expect_leases`.
        eprintln!("eBPF lookup: the queued connection is not checked (no lease wait yet)");
    } else {
        let mut back = [0u8; 6];
        tokio::time::timeout(WAIT, queued.read_exact(&mut back))
            .await
            .expect("the queued connection is served in time")
            .expect("echo read");
        assert_eq!(&back, b"queued");
    }
    // A new connection is served through the new process in both modes.
    wait_until_routed(port).await;
    let mut fresh = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect the lease port");
    fresh.write_all(b"fresh").await.expect("write");
    let mut back = [0u8; 5];
    tokio::time::timeout(WAIT, fresh.read_exact(&mut back))
        .await
        .expect("served in time")
        .expect("echo read");
    assert_eq!(&back, b"fresh");
}
