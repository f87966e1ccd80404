//! Public ingress end to end: the REAL `outrelay-relay` binary as a process, a test agent in
//! this process (QUIC + ORP with an rcgen certificate, reverse sessions over TCP), and real
//! public clients: `curl` and `openssl s_client` through SNI passthrough, and 100 MiB each way
//! through a TCP lease port with SHA-256 checked on both ends and the half-close preserved.
//!
//! Assertions are on bytes and hashes only; durations are logged, never asserted.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outrelay_proto::orp;
use outrelay_proto::reverse::{self, LeaseId};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_reaches_the_agent_tls_server_through_sni_passthrough() {
    if !have("curl", "--version") {
        eprintln!("SKIP curl_reaches_the_agent_tls_server_through_sni_passthrough: no curl");
        return;
    }
    let (_ca, relay, agent, files, target) = demo_setup().await;
    let port = relay.public_tls.port();
    let url = format!("https://{DEMO_HOST}:{port}/");
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
        .arg(ca_file(files.path()))
        .arg("--resolve")
        .arg(format!("{DEMO_HOST}:{port}:127.0.0.1"))
        .arg(&url);
    let started = Instant::now();
    let out = run_blocking(cmd).await;
    eprintln!("curl {url}: {:?}", started.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed: {stderr}");
    assert_eq!(stdout, BODY, "curl got the agent's body (stderr: {stderr})");
    eventually_claimed("TLS marker", || agent.claims.tls.load(Ordering::Relaxed)).await;
    assert_eq!(agent.claims.tcp.load(Ordering::Relaxed), 0);
    target.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openssl_s_client_verifies_the_agent_certificate_through_the_relay() {
    if !have("openssl", "version") {
        eprintln!(
            "SKIP openssl_s_client_verifies_the_agent_certificate_through_the_relay: no openssl"
        );
        return;
    }
    let (_ca, relay, agent, files, target) = demo_setup().await;
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(relay.public_tls.to_string())
        .args(["-servername", DEMO_HOST, "-verify_hostname", DEMO_HOST])
        .arg("-CAfile")
        .arg(ca_file(files.path()))
        .args(["-verify_return_error", "-brief"]);
    let started = Instant::now();
    let out = run_blocking(cmd).await;
    eprintln!("openssl s_client: {:?}", started.elapsed());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "s_client failed:\n{text}");
    assert!(text.contains("Verification: OK"), "verified:\n{text}");
    assert!(text.contains(DEMO_HOST), "demo's certificate:\n{text}");
    eventually_claimed("TLS marker", || agent.claims.tls.load(Ordering::Relaxed)).await;
    target.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_lease_carries_100_mib_each_way_with_equal_hashes_and_half_close() {
    for backend in io_backends() {
        eprintln!("--- io backend {backend}");
        bulk_through_tcp_lease(backend).await;
    }
}

async fn bulk_through_tcp_lease(backend: &str) {
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay(
        &ca,
        &format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
        Some(backend),
    )
    .await;
    let (target, echo) = echo_target().await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let grant = agent.register("raw", false, true).await;
    let port: u16 = grant
        .tcp_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("tcp_addr with a port: {grant:?}"));
    assert!((lo..=hi).contains(&port), "port {port} in {lo}..={hi}");
    agent.serve_lease(&relay, &grant, target);

    // The relay binds the lease port on its next route sync: retry until it listens.
    let start = Instant::now();
    let client = loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    start.elapsed() < WAIT,
                    "lease port {port} never listened: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    client.set_nodelay(true).expect("nodelay");
    let (mut r, mut w) = client.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut chunk = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < BULK_BYTES {
            for word in chunk.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            let n = usize::try_from((BULK_BYTES - sent).min(chunk.len() as u64)).expect("fits");
            hasher.update(&chunk[..n]);
            w.write_all(&chunk[..n]).await.expect("client write");
            sent += n as u64;
        }
        // Half-close: no more bytes from us, but we keep reading everything back.
        w.shutdown().await.expect("client shutdown(Write)");
        let took = started.elapsed();
        (sent, hasher.finalize().to_vec(), took)
    });
    let reader = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        let mut trailer = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).await.expect("client read");
            if n == 0 {
                break;
            }
            let data = &buf[..n];
            let want = usize::try_from((BULK_BYTES - got).min(n as u64)).expect("fits");
            hasher.update(&data[..want]);
            got += want as u64;
            trailer.extend_from_slice(&data[want..]);
        }
        (got, hasher.finalize().to_vec(), trailer, started.elapsed())
    });
    let (sent, sent_hash, write_took) = tokio::time::timeout(Duration::from_secs(300), writer)
        .await
        .expect("writer finished")
        .expect("writer task");
    let (got, got_hash, trailer, read_took) =
        tokio::time::timeout(Duration::from_secs(300), reader)
            .await
            .expect("reader finished")
            .expect("reader task");
    let (echo_total, echo_hash) = tokio::time::timeout(WAIT, echo)
        .await
        .expect("echo finished")
        .expect("echo task");

    let mib = BULK_BYTES as f64 / (1024.0 * 1024.0);
    eprintln!(
        "tcp lease ({backend}): {mib:.0} MiB up in {write_took:?} ({:.0} MiB/s), {mib:.0} MiB back + trailer \
         in {read_took:?} ({:.0} MiB/s, both directions concurrently)",
        mib / write_took.as_secs_f64(),
        mib / read_took.as_secs_f64()
    );
    eprintln!("sha256 sent {}", hex(&sent_hash));
    assert_eq!(sent, BULK_BYTES);
    assert_eq!(echo_total, BULK_BYTES, "the target received every byte");
    assert_eq!(echo_hash, sent_hash, "SHA-256 at the target = SHA-256 sent");
    assert_eq!(got, BULK_BYTES, "every byte came back");
    assert_eq!(got_hash, sent_hash, "SHA-256 of the echo = SHA-256 sent");
    assert_eq!(
        trailer, sent_hash,
        "the target's trailer, written after our FIN, arrived intact (half-close preserved)"
    );
    assert!(agent.claims.tcp.load(Ordering::Relaxed) >= 1);
    assert_eq!(agent.claims.tls.load(Ordering::Relaxed), 0);
}

/// The io backends this machine can run; io_uring is skipped LOUDLY where the kernel refuses it.
// ---------- root host, expiry, sticky ports, restart, foreign sessions ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn root_host_answers_healthz_and_nothing_else() {
    for backend in io_backends() {
        eprintln!("--- root_host_answers_healthz_and_nothing_else on {backend}");
        root_host_answers_healthz_and_nothing_else_on(backend).await;
    }
}

async fn root_host_answers_healthz_and_nothing_else_on(backend: &str) {
    if !have("curl", "--version") {
        eprintln!("SKIP root_host_answers_healthz_and_nothing_else: no curl");
        return;
    }
    let ca = Ca::new();
    let relay = start_relay(&ca, "", Some(backend)).await;
    let files = tempfile::tempdir().expect("temp dir");
    std::fs::write(files.path().join("ca.pem"), &ca.pem).expect("write ca");
    let port = relay.public_tls.port();
    let curl = |path: &str| {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
            .arg(ca_file(files.path()))
            .arg("--resolve")
            .arg(format!("{ROOT_HOST}:{port}:127.0.0.1"))
            .args(["--write-out", "\n%{http_code}"])
            .arg(format!("https://{ROOT_HOST}:{port}{path}"));
        cmd
    };
    for (path, want) in [
        ("/healthz", "ok\n\n200"),
        ("/anything", "not found\n\n404"),
        ("/metrics", "not found\n\n404"),
        ("/", "not found\n\n404"),
    ] {
        let started = Instant::now();
        let out = run_blocking(curl(path)).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("curl {path}: {:?}", started.elapsed());
        assert!(out.status.success(), "curl {path} failed: {stderr}");
        assert_eq!(stdout, want, "curl {path} (stderr: {stderr})");
    }
    let served = relay.metric("outrelay_relay_ingress_root_host_total").await;
    assert_eq!(served, 4.0, "every root-host connection counted");
    assert_eq!(relay.metric(&drops("unknown_host")).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_expiry_stops_routing() {
    let ca = Ca::new();
    let relay = start_relay(&ca, "", None).await;
    let (target, _task) = tls_target(&ca).await;
    let mut agent = Agent::connect(&relay, &ca).await;
    // TTL 3 s and never renewed.
    let grant = agent
        .register_with(orp::LeaseRegister {
            name: "demo".to_owned(),
            tls: true,
            ttl_s: 3,
            request_id: 1,
            ..orp::LeaseRegister::default()
        })
        .await;
    let granted = Instant::now();
    agent.serve_lease(&relay, &grant, target);
    let body = https_get(&relay, &ca, DEMO_HOST, "/").await;
    assert!(
        body.as_deref().is_ok_and(|b| b.ends_with(BODY)),
        "routed before expiry ({:?} after the grant): {body:?}",
        granted.elapsed()
    );
    let start = Instant::now();
    while relay.metric("outrelay_relay_leases_live").await > 0.0 {
        assert!(start.elapsed() < WAIT, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "lease gone {:?} after its grant (TTL 3 s)",
        granted.elapsed()
    );
    let before = relay.metric(&drops("unknown_host")).await;
    let after = https_get(&relay, &ca, DEMO_HOST, "/").await;
    assert!(after.is_err(), "refused after expiry, got {after:?}");
    relay.metric_above(&drops("unknown_host"), before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_released_tcp_port_is_given_back_to_its_name_within_the_sticky_window() {
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay(
        &ca,
        &format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
        None,
    )
    .await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let first = agent.register("one", false, true).await;
    let port = lease_port(&first);
    assert_eq!(port, lo, "lowest free port first");
    agent.release(&first).await;
    // Another name must not get the released port: it is reserved to `one`.
    let other = agent.register("two", false, true).await;
    assert_eq!(lease_port(&other), lo + 1, "the reserved port is skipped");
    let again = agent.register("one", false, true).await;
    assert_eq!(lease_port(&again), port, "the same name gets its port back");
    assert_ne!(again.lease_id, first.lease_id, "a new lease");
}

/// What a relay restart keeps: nothing is persisted, so the agent registers again on its new
/// connection; it gets the same hostname (names are `<name>.<root>`) and, with a fresh table
/// and the lowest-free-first rule, the same port for the same first registration, and the
/// lease routes again. (The spec's sticky-port promise is for agent reconnects to a running
/// relay; the reservation table lives in memory and does not survive a restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_registers_again_after_a_relay_restart_and_routes() {
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay(
        &ca,
        &format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
        None,
    )
    .await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let before = agent
        .register_with(orp::LeaseRegister {
            name: "raw".to_owned(),
            tls: true,
            tcp: true,
            ttl_s: 300,
            request_id: 1,
            ..orp::LeaseRegister::default()
        })
        .await;
    drop(agent);
    let relay = relay.restart().await;
    let (target, echo) = echo_target().await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let after = agent
        .register_with(orp::LeaseRegister {
            name: "raw".to_owned(),
            tls: true,
            tcp: true,
            ttl_s: 300,
            request_id: 1,
            ..orp::LeaseRegister::default()
        })
        .await;
    assert_eq!(after.hostname, before.hostname, "same hostname");
    assert_eq!(
        lease_port(&after),
        lease_port(&before),
        "same (lowest free) port"
    );
    agent.serve_lease(&relay, &after, target);
    let port = lease_port(&after);
    let start = Instant::now();
    let mut client = loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    start.elapsed() < WAIT,
                    "port {port} never listened again: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    client.write_all(b"after restart").await.expect("write");
    client.shutdown().await.expect("fin");
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.expect("read");
    let (total, _) = tokio::time::timeout(WAIT, echo)
        .await
        .expect("echo done")
        .expect("echo task");
    assert_eq!(total, 13);
    assert_eq!(
        &back[..13],
        b"after restart",
        "echoed through the new lease"
    );
}

/// A reverse session for a lease held by ANOTHER agent connection is refused: the second
/// connection's exporter key is not the holder's, so its MAC fails (`bad_mac`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reverse_session_for_another_connections_lease_is_refused() {
    let ca = Ca::new();
    let relay = start_relay(&ca, "", None).await;
    let mut holder = Agent::connect(&relay, &ca).await;
    let grant = holder.register("demo", true, false).await;
    let intruder = Agent::connect_as(
        &relay,
        &ca,
        "outrelay://test/agent/00000000-0000-4000-8000-0000000000e3",
    )
    .await;
    let lease = LeaseId::from_slice(&grant.lease_id).expect("lease id");
    let before = relay.metric(&drops("bad_mac")).await;
    let agent_nonce = [0x44u8; reverse::NONCE_BYTES];
    let mut s = TcpStream::connect(relay.reverse).await.expect("connect");
    s.write_all(&reverse::encode_preamble(&lease, &agent_nonce))
        .await
        .expect("preamble");
    let mut challenge = [0u8; reverse::CHALLENGE_BYTES];
    s.read_exact(&mut challenge).await.expect("nonce and proof");
    // The relay proves the holder's key, which is not the intruder's.
    let intruder_key = intruder.key(&grant);
    assert_eq!(
        reverse::verify_challenge(&intruder_key, &lease, &agent_nonce, &challenge),
        Err(reverse::ReverseError::BadRelayProof)
    );
    let nonce = reverse::verify_challenge(&holder.key(&grant), &lease, &agent_nonce, &challenge)
        .expect("the relay proves the holder's key");
    s.write_all(&reverse::agent_mac(
        &intruder_key,
        &lease,
        &agent_nonce,
        &nonce,
    ))
    .await
    .expect("mac");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    relay.metric_above(&drops("bad_mac"), before).await;
    // The holder's own key is accepted on the same relay (the refusal was about the key).
    let mut ok = TcpStream::connect(relay.reverse).await.expect("connect");
    ok.write_all(&reverse::encode_preamble(&lease, &agent_nonce))
        .await
        .expect("preamble");
    ok.read_exact(&mut challenge).await.expect("nonce");
    let nonce = reverse::verify_challenge(&holder.key(&grant), &lease, &agent_nonce, &challenge)
        .expect("proof");
    ok.write_all(&reverse::agent_mac(
        &holder.key(&grant),
        &lease,
        &agent_nonce,
        &nonce,
    ))
    .await
    .expect("mac");
    let authed = "outrelay_relay_reverse_sessions_authenticated_total";
    relay.metric_above(authed, 0.0).await;
}

// ---------- unprivileged relay under its pipe budget ----------

/// One bulk client: `bytes` of pseudo-random data (seeded by `seed`) up, everything back, then
/// the target's trailer. It reads slowly through a small receive buffer, so the relay's
/// client-bound pipes fill and stay full (what makes the pipe budget bind). Returns an error
/// naming what did not match.
async fn bulk_client(port: u16, seed: u64, bytes: usize) -> Result<(), String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .set_recv_buffer_size(16 * 1024)
        .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    let c = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = c.into_split();
    let mut data = vec![0u8; bytes];
    let mut state = seed | 1;
    for word in data.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    let sent_hash = Sha256::digest(&data).to_vec();
    // The FIN goes out only once every byte has come back: a pair whose one direction has
    // ended is closed 60 s later whatever the other is doing (the engine's half-closed
    // timeout), and under a binding pipe budget a direction can wait that long for a pipe
    // (see the issue note); this test is about the budget and the bytes, not that timer.
    let (echoed_tx, echoed_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(64 * 1024) {
            w.write_all(chunk).await?;
        }
        let _ = echoed_rx.await;
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(bytes + 32);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut echoed_tx = Some(echoed_tx);
    loop {
        let n = r.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        back.extend_from_slice(&chunk[..n]);
        if back.len() >= bytes
            && let Some(tx) = echoed_tx.take()
        {
            let _ = tx.send(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(echoed_tx); // cut short: let the writer finish
    writer
        .await
        .map_err(|e| format!("writer: {e}"))?
        .map_err(|e| format!("write: {e}"))?;
    if back.len() != bytes + 32 {
        return Err(format!("{} bytes back, want {}", back.len(), bytes + 32));
    }
    if Sha256::digest(&back[..bytes]).to_vec() != sent_hash {
        return Err("echoed bytes differ".to_owned());
    }
    if back[bytes..] != sent_hash[..] {
        return Err("the target's trailer differs".to_owned());
    }
    Ok(())
}

/// P5 / issue 5: the relay run as `nobody` (root hides the kernel's per-user pipe limit,
/// `fs.pipe-user-pages-soft`) splices a few hundred concurrent bulk connections through a TCP
/// lease with every byte intact, while the pipe memory it reports on `/metrics` stays under
/// its configured budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unprivileged_relay_stays_under_its_pipe_budget_with_300_bulk_connections() {
    for backend in io_backends() {
        eprintln!(
            "--- an_unprivileged_relay_stays_under_its_pipe_budget_with_300_bulk_connections on {backend}"
        );
        an_unprivileged_relay_stays_under_its_pipe_budget_with_300_bulk_connections_on(backend)
            .await;
    }
}

async fn an_unprivileged_relay_stays_under_its_pipe_budget_with_300_bulk_connections_on(
    backend: &str,
) {
    const CONNS: usize = 300;
    // Enough that, with slow readers, data waits in the relay's pipes and the budget (well
    // below 300 pipes' worth) binds: measured here, 4 MiB each gives a held maximum equal to
    // the budget and tens of thousands of pipe waits in about 18 s. Beyond about 6 MiB each
    // the run falls off a cliff (minutes; pairs starved of a pipe for over 60 s): see the
    // note on pipe fairness in the issue. `OUTRELAY_PIPE_TEST_MIB` overrides it, to explore.
    let bytes_each: usize = std::env::var("OUTRELAY_PIPE_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
        << 20;
    const BUDGET: u64 = 8 * 1024 * 1024;
    if let Some(why) = unprivileged_unavailable() {
        eprintln!(
            "SKIP an_unprivileged_relay_stays_under_its_pipe_budget_with_300_bulk_connections: {why}"
        );
        return;
    }
    let soft = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft").unwrap_or_default();
    eprintln!("fs.pipe-user-pages-soft = {} pages", soft.trim());
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            // The claim wait is not what this test measures: on a loaded machine 300 clients
            // can wait longer than the default 10 s for the in-test agent's sessions.
            ingress: "ready_queue_max = 64\n".to_owned(),
            claim_timeout_ms: Some(120_000),
            tables: format!("[pipes]\nbudget_bytes = {BUDGET}\nmax_pipe_bytes = 1048576\n"),
            unprivileged: true,
            backend: Some(backend.to_owned()),
            ..Opts::default()
        },
    )
    .await;
    let uid = std::fs::read_to_string(format!("/proc/{}/status", relay.child.id()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        uid.split_whitespace().nth(1) == Some("65534"),
        "the relay runs as nobody: {uid}"
    );
    let (target, _echo) = echo_each_target().await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let grant = agent.register("bulk", false, true).await;
    let port = lease_port(&grant);
    agent.serve_lease_with(&relay, &grant, target, 32);
    wait_until_routed(port).await;

    // Sample /metrics while the connections run.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let metrics = relay.metrics.clone();
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let (mut max_held, mut max_pairs, mut samples) = (0f64, 0f64, 0u32);
            while sampling.load(Ordering::Relaxed) {
                if let Ok(body) = scrape_at(&metrics).await {
                    max_held = max_held.max(sample(&body, "outrelay_relay_pipe_held_bytes"));
                    max_pairs = max_pairs.max(sample(&body, "outrelay_relay_splice_pairs_active"));
                    samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (max_held, max_pairs, samples)
        })
    };
    let started = Instant::now();
    let clients: Vec<_> = (0..CONNS)
        .map(|i| tokio::spawn(bulk_client(port, 0x9E37_79B9 + i as u64, bytes_each)))
        .collect();
    let mut failures = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(300), c).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(format!("#{i}: {e}")),
            Ok(Err(e)) => failures.push(format!("#{i}: task {e}")),
            Err(_) => failures.push(format!("#{i}: timed out")),
        }
    }
    let took = started.elapsed();
    // One more second so the engines publish their last stats.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sampling.store(false, Ordering::Relaxed);
    let (max_held, max_pairs, samples) = sampler.await.expect("sampler");
    let body = relay.scrape().await;
    let waits = sample(&body, "outrelay_relay_pipe_waits_total");
    let created = sample(&body, "outrelay_relay_pipes_created_total");
    let errors = sample(
        &body,
        "outrelay_relay_splice_closed_total{reason=\"error\"}",
    );
    let completed = sample(
        &body,
        "outrelay_relay_splice_closed_total{reason=\"completed\"}",
    );
    eprintln!(
        "{CONNS} x {} KiB each way as nobody in {took:?}: pipe bytes held max {:.1} MiB \
         (budget {} MiB, {samples} samples), pairs active max {max_pairs}, pipes created \
         {created}, pipe waits {waits}, pairs completed {completed}, errors {errors}",
        bytes_each / 1024,
        max_held / (1024.0 * 1024.0),
        BUDGET / (1024 * 1024),
    );
    for line in body.lines().filter(|l| {
        (l.starts_with("outrelay_relay_ingress_drops_total")
            || l.starts_with("outrelay_relay_splice_closed_total"))
            && !l.ends_with(" 0")
    }) {
        eprintln!("  {line}");
    }
    failures.truncate(10);
    assert!(failures.is_empty(), "failed (first 10): {failures:?}");
    assert!(samples > 0, "/metrics was sampled");
    assert!(created > 0.0, "pipes were used");
    assert!(
        max_held <= BUDGET as f64,
        "pipe bytes held {max_held} over the budget {BUDGET}"
    );
    assert_eq!(errors, 0.0, "no pair ended in an error");
    assert!(
        completed >= CONNS as f64,
        "every pair completed: {completed}"
    );
}

/// One scrape of `/metrics` at `addr`.
async fn scrape_at(addr: &str) -> std::io::Result<String> {
    let mut c = TcpStream::connect(addr).await?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    c.read_to_string(&mut body).await?;
    Ok(body)
}

/// Issue 9: SIGTERM with 200 connections spliced through a TCP lease. The relay closes its
/// listeners at once (a new connection is refused), sends GOAWAY, and lets the established
/// pairs finish: every one of the 200 then sends more, half-closes and gets every byte and the
/// target's trailer back, and the relay exits 0 well within its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_200_connections_in_flight_finish_then_exits() {
    for backend in io_backends() {
        eprintln!("--- sigterm_lets_200_connections_in_flight_finish_then_exits on {backend}");
        sigterm_lets_200_connections_in_flight_finish_then_exits_on(backend).await;
    }
}

async fn sigterm_lets_200_connections_in_flight_finish_then_exits_on(backend: &str) {
    const CONNS: usize = 200;
    const GRACE_MS: u64 = 20_000;
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let mut relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            ingress: "ready_queue_max = 64\n".to_owned(),
            tables: format!("[lifecycle]\nshutdown_grace_ms = {GRACE_MS}\n"),
            log_file: true,
            backend: Some(backend.to_owned()),
            ..Opts::default()
        },
    )
    .await;
    let (target, _echo) = echo_each_target().await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let grant = agent.register("drain", false, true).await;
    let port = lease_port(&grant);
    agent.serve_lease_with(&relay, &grant, target, 32);
    wait_until_routed(port).await;

    // Each client proves its pair is spliced (4 KiB there and back), then waits for SIGTERM.
    let established = Arc::new(tokio::sync::Barrier::new(CONNS + 1));
    let (term_tx, term_rx) = tokio::sync::watch::channel(false);
    let clients: Vec<_> = (0..CONNS)
        .map(|i| {
            let established = established.clone();
            let mut term = term_rx.clone();
            tokio::spawn(async move {
                let c = TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map_err(|e| format!("#{i} connect: {e}"))?;
                let (mut r, mut w) = c.into_split();
                let mut hasher = Sha256::new();
                let first = vec![u8::try_from(i % 251).unwrap_or(0); 4096];
                w.write_all(&first)
                    .await
                    .map_err(|e| format!("#{i} write: {e}"))?;
                hasher.update(&first);
                let mut back = vec![0u8; first.len()];
                r.read_exact(&mut back)
                    .await
                    .map_err(|e| format!("#{i} echo: {e}"))?;
                established.wait().await;
                let _ = term.wait_for(|t| *t).await;
                // In flight across the SIGTERM: more bytes, then the half-close.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let more = vec![7u8; 64 * 1024];
                w.write_all(&more)
                    .await
                    .map_err(|e| format!("#{i} write after TERM: {e}"))?;
                hasher.update(&more);
                w.shutdown()
                    .await
                    .map_err(|e| format!("#{i} shutdown: {e}"))?;
                let mut rest = Vec::new();
                r.read_to_end(&mut rest)
                    .await
                    .map_err(|e| format!("#{i} read: {e}"))?;
                if rest.len() != more.len() + 32 {
                    return Err(format!(
                        "#{i}: {} bytes back, want {}",
                        rest.len(),
                        more.len() + 32
                    ));
                }
                if rest[more.len()..] != hasher.finalize()[..] {
                    return Err(format!("#{i}: the target's trailer differs"));
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    tokio::time::timeout(WAIT, established.wait())
        .await
        .expect("all 200 connections spliced");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(relay.child.id()).expect("pid"));
    let termed = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    term_tx.send_replace(true);
    // Stops accepting: a new connection to the lease port is refused.
    loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Err(_) => break,
            Ok(_) => {
                assert!(
                    termed.elapsed() < Duration::from_secs(2),
                    "lease port still accepts"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let mut failures = Vec::new();
    for c in clients {
        match tokio::time::timeout(Duration::from_millis(GRACE_MS), c).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => failures.push(e),
            Ok(Err(e)) => failures.push(format!("task {e}")),
            Err(_) => failures.push("timed out".to_owned()),
        }
    }
    let finished = termed.elapsed();
    let status = loop {
        if let Some(status) = relay.child.try_wait().expect("poll relay") {
            break status;
        }
        assert!(
            termed.elapsed() < Duration::from_millis(GRACE_MS + 10_000),
            "relay still running after the grace period"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let exited = termed.elapsed();
    let log = std::fs::read_to_string(relay.dir.path().join("relay.log")).unwrap_or_default();
    eprintln!(
        "SIGTERM with {CONNS} in flight: clients done after {finished:?}, relay exited ({status}) \
         after {exited:?}; log tail:\n{}",
        log.lines().rev().take(4).collect::<Vec<_>>().join("\n")
    );
    failures.truncate(10);
    assert!(failures.is_empty(), "cut (first 10): {failures:?}");
    assert!(status.success(), "relay exit status {status}");
    assert!(log.contains("drained: every connection finished"), "{log}");
}

/// Issue 9: SIGHUP with an invalid config keeps the running one and says why (error log and
/// `outrelay_config_reloads_total{result="error"}`); a valid one is accepted and the changed
/// keys that need a restart are named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_invalid_config_keeps_the_running_one_and_says_why() {
    let ca = Ca::new();
    let relay = start_relay_with(
        &ca,
        Opts {
            log_file: true,
            ..Opts::default()
        },
    )
    .await;
    let path = relay.dir.path().join("relay.toml");
    let good = std::fs::read_to_string(&path).expect("read config");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(relay.child.id()).expect("pid"));
    let hup = || nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");

    std::fs::write(
        &path,
        good.replace("[ingress]\n", "[ingress]\nready_queue_max = 0\n"),
    )
    .expect("write bad config");
    hup();
    relay
        .metric_above("outrelay_config_reloads_total{result=\"error\"}", 0.0)
        .await;
    let log = std::fs::read_to_string(relay.dir.path().join("relay.log")).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("config reload refused"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    eprintln!("refusal: {line}");
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains("ingress.ready_queue_max"),
        "names the key: {line}"
    );
    // Still serving on the old config.
    assert!(relay.child.id() > 0);
    assert!(relay.scrape().await.contains("outrelay_"));

    std::fs::write(
        &path,
        format!("{good}[lifecycle]\nshutdown_grace_ms = 1000\n")
            .replace("workers = 2", "workers = 1"),
    )
    .expect("write good config");
    hup();
    relay
        .metric_above("outrelay_config_reloads_total{result=\"ok\"}", 0.0)
        .await;
    let log = std::fs::read_to_string(relay.dir.path().join("relay.log")).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("config reloaded"))
        .unwrap_or_else(|| panic!("no reload logged:\n{log}"));
    eprintln!("reload: {line}");
    assert!(
        line.contains("lifecycle.shutdown_grace_ms") && line.contains("workers"),
        "{line}"
    );
}

/// Issue 9: under a `NOTIFY_SOCKET` of the test's own (systemd is not PID 1 here) the relay
/// sends `READY=1` after its ready file is written, `WATCHDOG=1` again and again while its
/// engine threads and runtime beat (`WATCHDOG_USEC` = 1 s: a ping every 0.5 s), and
/// `STOPPING=1` on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_notifies_ready_watchdog_and_stopping() {
    let ca = Ca::new();
    let notify_dir = tempfile::tempdir().expect("temp dir");
    let mut notify = outrelay_testkit::notify::NotifyListener::bind(notify_dir.path(), None);
    let mut relay = start_relay_with(
        &ca,
        Opts {
            env: vec![
                ("NOTIFY_SOCKET".into(), notify.path.display().to_string()),
                ("WATCHDOG_USEC".into(), "1000000".into()),
            ],
            ..Opts::default()
        },
    )
    .await;
    let ready =
        tokio::task::block_in_place(|| notify.wait_for("READY=1", 1, WAIT)).expect("READY=1");
    let written = std::fs::metadata(relay.dir.path().join("ready.json"))
        .and_then(|m| m.modified())
        .expect("ready file mtime");
    assert!(ready.wall >= written, "READY=1 came before the ready file");
    let started = Instant::now();
    tokio::task::block_in_place(|| notify.wait_for("WATCHDOG=1", 4, WAIT))
        .expect("4 WATCHDOG=1 pings");
    eprintln!("4 watchdog pings within {:?}", started.elapsed());
    let pid = nix::unistd::Pid::from_raw(i32::try_from(relay.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    tokio::task::block_in_place(|| notify.wait_for("STOPPING=1", 1, WAIT)).expect("STOPPING=1");
    let status = tokio::task::block_in_place(|| relay.child.wait()).expect("wait relay");
    assert!(status.success(), "{status}");
}
