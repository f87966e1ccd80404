//! Review M9 against the REAL `outrelay-relay` and `outrelay-agent` binaries: the agent dials a
//! grant's reverse address only on the relay's own host (or an allow-listed one), and answers
//! its MAC and acts on markers only after the peer proved the session key.
//!
//! Build the relay first (`cargo build --release -p outrelay-relay`). Both relay io backends are
//! covered by the suite's two runs (`OUTRELAY_IO_BACKEND=epoll` in the second).
//! `OUTRELAY_AGENT_BIN` / `OUTRELAY_RELAY_BIN` run them against other builds.

mod common;

use common::Ca;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outrelay_proto::reverse;
use rcgen::ExtendedKeyUsagePurpose;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const AGENT: &str = "outrelay://test/agent/00000000-0000-4000-8000-0000000000b9";
const RELAY: &str = "outrelay://test/relay/r1";
/// Bound on single waits (process start, ready files, counters).
const WAIT: Duration = Duration::from_secs(30);
/// The secret a public client sends to the lease.
const SECRET: &[u8] = b"secret: the public client's plaintext";

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CA, relay and agent certificates in one temp dir.
fn pki() -> tempfile::TempDir {
    let ca = Ca::new("outrelay reverse trust CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = ca.leaf(
        "relay r1",
        &["localhost"],
        Some(RELAY),
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    // A second relay's own identity (an agent holds relays once per identity, issue 22).
    let relay2 = ca.leaf(
        "relay r2",
        &["localhost"],
        Some("outrelay://test/relay/r2"),
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let agent = ca.leaf(
        AGENT,
        &[],
        Some(AGENT),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    );
    for (name, text) in [
        ("ca.pem", &ca.pem),
        ("relay.pem", &relay.cert_pem),
        ("relay-key.pem", &relay.key_pem),
        ("relay2.pem", &relay2.cert_pem),
        ("relay2-key.pem", &relay2.key_pem),
        ("agent.pem", &agent.cert_pem),
        ("agent-key.pem", &agent.key_pem),
    ] {
        std::fs::write(dir.path().join(name), text).expect("write PKI file");
    }
    dir
}

/// The relay next to this test's deps directory; `OUTRELAY_RELAY_BIN` overrides it (to run these
/// tests against another build, e.g. the code before the fix).
fn relay_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("OUTRELAY_RELAY_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("outrelay-relay");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p outrelay-relay` first",
        bin.display()
    );
    bin
}

async fn wait_for_file(path: &Path, child: &mut Proc, what: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            return v;
        }
        if let Some(status) = child.0.try_wait().expect("poll child") {
            panic!("{what} exited before it was ready: {status}");
        }
        assert!(started.elapsed() < WAIT, "{what}: no ready file");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn addr_of(info: &serde_json::Value, key: &str) -> SocketAddr {
    info[key]
        .as_str()
        .unwrap_or_else(|| panic!("ready file names {key}: {info}"))
        .parse()
        .expect("socket address")
}

struct Relay {
    _proc: Proc,
    quic: SocketAddr,
    reverse: SocketAddr,
    metrics: SocketAddr,
}

/// Starts a relay in `dir` (which holds the PKI) whose grants name `advertise` as the reverse
/// address (`None`: its own bound reverse listener).
async fn start_relay(dir: &Path, advertise: Option<String>) -> Relay {
    let ports = outrelay_testkit::claim_port_range();
    let ready = dir.join("relay-ready.json");
    let _ = std::fs::remove_file(&ready);
    let advertise = advertise.map_or(String::new(), |a| format!("reverse_advertise = \"{a}\"\n"));
    let config = format!(
        "public_url = \"https://relay.outrelay.test\"\nworkers = 1\n{advertise}\
         [tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n\
         [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"127.0.0.1:0\"\n\
         metrics = \"127.0.0.1:0\"\nlease_bind_ip = \"127.0.0.1\"\nadmin_socket = \"{}\"\n\
         [leases]\ntcp = true\nmin_port = {}\nmax_port = {}\n\
         [ingress]\nclaim_timeout_ms = 1000\nkeepalive_interval_ms = 1000\n\
         lease_sync_interval_ms = 20\n",
        dir.join("relay-admin.sock").display(),
        ports.0,
        ports.1
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, config).expect("write relay config");
    let child = Command::new(relay_binary())
        .arg("--config")
        .arg(&path)
        .arg("--ready-file")
        .arg(&ready)
        .args(["--log", "warn"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start outrelay-relay");
    let mut proc = Proc(child);
    let info = wait_for_file(&ready, &mut proc, "relay").await;
    Relay {
        quic: addr_of(&info, "quic"),
        reverse: addr_of(&info, "reverse"),
        metrics: addr_of(&info, "metrics"),
        _proc: proc,
    }
}

/// A second relay directory: the same CA, the second relay identity (`relay2.pem`).
fn copy_pki(from: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (f, to) in [
        ("ca.pem", "ca.pem"),
        ("relay2.pem", "relay.pem"),
        ("relay2-key.pem", "relay-key.pem"),
    ] {
        std::fs::copy(from.join(f), dir.path().join(to)).expect("copy PKI");
    }
    dir
}

struct Agent {
    proc: Proc,
    ready: PathBuf,
}

/// Starts `outrelay-agent run` against `relays` with one TCP lease `demo` to `target`.
fn start_agent(dir: &Path, relays: &[SocketAddr], target: SocketAddr, extra: &str) -> Agent {
    let relays: Vec<String> = relays.iter().map(ToString::to_string).collect();
    let config = format!(
        "relays = {relays:?}\nserver_name = \"localhost\"\n{extra}\n\
         [identity]\ncert = \"agent.pem\"\nkey = \"agent-key.pem\"\nca = \"ca.pem\"\n\
         [[lease]]\nname = \"demo\"\ntcp_to = \"{target}\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [pool]\nidle = 2\nmax = 4\nretry_initial_ms = 100\nretry_max_ms = 500\n\
         [connection]\nkeepalive_ms = 500\nidle_timeout_ms = 3000\nping_interval_ms = 1000\n\
         reconnect_initial_ms = 200\nreconnect_max_ms = 1000\n"
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).expect("write agent config");
    let ready = dir.join("agent-ready.json");
    let _ = std::fs::remove_file(&ready);
    let binary = std::env::var_os("OUTRELAY_AGENT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_outrelay-agent")),
        PathBuf::from,
    );
    let child = Command::new(binary)
        .args(["--log", "info", "run", "--config"])
        .arg(&path)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .spawn()
        .expect("start outrelay-agent");
    Agent {
        proc: Proc(child),
        ready,
    }
}

impl Agent {
    /// The ready file once `relays` relays are in it.
    async fn ready_with(&mut self, relays: usize) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let v = wait_for_file(&self.ready, &mut self.proc, "agent").await;
            if v["relays"].as_array().map(Vec::len) == Some(relays) {
                return v;
            }
            assert!(start.elapsed() < WAIT, "{relays} relays in {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The public TCP port of lease `demo` on the relay whose QUIC address is `quic`.
fn demo_port(ready: &serde_json::Value, quic: SocketAddr) -> u16 {
    let relay = ready["relays"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["addr"] == quic.to_string()))
        .unwrap_or_else(|| panic!("relay {quic} in {ready}"));
    let lease = relay["leases"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "demo"))
        .unwrap_or_else(|| panic!("lease demo in {relay}"));
    let addr = lease["tcp_addr"].as_str().expect("tcp_addr");
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `series` at `/metrics` of `addr` is at least `want`.
async fn metric_reaches(addr: &str, series: &str, want: f64) {
    let start = Instant::now();
    loop {
        let addr_owned = addr.to_owned();
        let text = tokio::task::spawn_blocking(move || http_get(&addr_owned, "/metrics"))
            .await
            .expect("join");
        if metric(&text, series) >= want {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "{series} never reached {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends [`SECRET`] to the public port and returns what came back (the echo, or nothing when
/// the relay closed the client). A port the relay has not bound yet (it binds lease ports on
/// its next route sync) is retried until it listens, so every call reaches the relay.
async fn send_secret(port: u16) -> Vec<u8> {
    let start = Instant::now();
    let mut c = loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(start.elapsed() < WAIT, "port {port} never listened: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let attempt = async {
        c.write_all(SECRET).await.ok()?;
        let mut got = vec![0u8; SECRET.len()];
        let mut have = 0;
        while have < got.len() {
            match c.read(&mut got[have..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => have += n,
            }
        }
        got.truncate(have);
        Some(got)
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// A transparent forwarder from `listener` to `upstream` that records every byte either way
/// and counts its connections: stronger than the review's nonce/MAC oracle (it forwards the
/// relay's whole answer too).
fn recording_proxy(
    listener: TcpListener,
    upstream: SocketAddr,
) -> (Arc<Mutex<Vec<u8>>>, Arc<Mutex<usize>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let accepted = Arc::new(Mutex::new(0usize));
    let (s, a) = (seen.clone(), accepted.clone());
    tokio::spawn(async move {
        while let Ok((agent, _)) = listener.accept().await {
            *a.lock().expect("lock") += 1;
            let Ok(relay) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (ar, aw) = agent.into_split();
            let (rr, rw) = relay.into_split();
            tokio::spawn(pump(ar, rw, s.clone()));
            tokio::spawn(pump(rr, aw, s.clone()));
        }
    });
    (seen, accepted)
}

/// Copies `from` to `to`, recording the bytes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        seen.lock().expect("lock").extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Review M9, the on-path proxy: relay A names a reverse address on another host (a proxy on
/// 127.0.0.2 in front of A's real reverse listener, as a DNS or `/etc/hosts` redirect would).
/// The agent refuses to dial it (counted, logged once), so the proxy never sees a connection,
/// let alone the public client's secret, which A refuses (claim timeout, counted); relay B,
/// honest, serves the same lease meanwhile. Before the fix the agent dialled the proxy, the
/// proxy relayed the handshake and read the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverse_address_off_the_relay_host_is_refused_and_a_proxy_sees_nothing() {
    let pki = pki();
    let proxy = match TcpListener::bind("127.0.0.2:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIP (no 127.0.0.2 on loopback: {e})");
            return;
        }
    };
    let proxy_addr = proxy.local_addr().expect("proxy addr");
    let relay_a = start_relay(pki.path(), Some(proxy_addr.to_string())).await;
    let (seen, accepted) = recording_proxy(proxy, relay_a.reverse);
    let dir_b = copy_pki(pki.path());
    let relay_b = start_relay(dir_b.path(), None).await;
    let (target, _echo) = common::echo_server().await;
    let mut agent = start_agent(pki.path(), &[relay_a.quic, relay_b.quic], target, "");
    let ready = agent.ready_with(2).await;
    let metrics = ready["metrics"].as_str().expect("metrics").to_owned();

    // Relay B (its own host) serves the lease.
    let port_b = demo_port(&ready, relay_b.quic);
    let start = Instant::now();
    while send_secret(port_b).await != SECRET {
        assert!(start.elapsed() < WAIT, "relay B never served the lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Public clients of relay A: their secret must never reach the proxy.
    let port_a = demo_port(&ready, relay_a.quic);
    let mut replies = Vec::new();
    for _ in 0..3 {
        replies.push(send_secret(port_a).await);
    }
    let seen = seen.lock().expect("lock").clone();
    assert!(
        !seen.windows(6).any(|w| w == b"secret"),
        "the proxy saw the secret ({} bytes through it)",
        seen.len()
    );
    assert_eq!(
        *accepted.lock().expect("lock"),
        0,
        "the agent dialled the proxy"
    );
    // Relay A has no session for the lease: each client is refused (claim timeout, counted).
    for reply in &replies {
        assert_eq!(reply.as_slice(), b"", "relay A answered");
    }
    let series = "outrelay_relay_ingress_drops_total{reason=\"claim_timeout\"}";
    metric_reaches(&relay_a.metrics.to_string(), series, 3.0).await;
    // B still serves while A refuses.
    assert_eq!(send_secret(port_b).await, SECRET);
    // The refusal is counted once per refused grant, not per renewal.
    metric_reaches(&metrics, "outrelay_agent_reverse_addr_refused_total", 1.0).await;
    let text = http_get(&metrics, "/metrics");
    assert_eq!(
        metric(&text, "outrelay_agent_reverse_addr_refused_total"),
        1.0,
        "{text}"
    );
}

/// The allow-list: the same relay A, its proxy address allowed, is served (through the proxy,
/// which stays a plain TCP forwarder of an authenticated session: the spec's trade-off until
/// `reverse_tls`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_listed_reverse_address_is_dialled() {
    let pki = pki();
    let proxy = match TcpListener::bind("127.0.0.2:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIP (no 127.0.0.2 on loopback: {e})");
            return;
        }
    };
    let proxy_addr = proxy.local_addr().expect("proxy addr");
    let relay = start_relay(pki.path(), Some(proxy_addr.to_string())).await;
    let (_seen, accepted) = recording_proxy(proxy, relay.reverse);
    let (target, _echo) = common::echo_server().await;
    let mut agent = start_agent(
        pki.path(),
        &[relay.quic],
        target,
        &format!("reverse_allow = [\"{proxy_addr}\"]"),
    );
    let ready = agent.ready_with(1).await;
    let port = demo_port(&ready, relay.quic);
    let start = Instant::now();
    while send_secret(port).await != SECRET {
        assert!(
            start.elapsed() < WAIT,
            "the allow-listed address never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(*accepted.lock().expect("lock") > 0);
    let metrics = ready["metrics"].as_str().expect("metrics").to_owned();
    let text = http_get(&metrics, "/metrics");
    assert_eq!(
        metric(&text, "outrelay_agent_reverse_addr_refused_total"),
        0.0
    );
}

/// Review M9, the relay without `K`: the grant's reverse address is on the relay's host (so
/// it is dialled) but whoever answers there does not know the session key. It answers the
/// preamble with a nonce and a proof under a wrong key, then a marker and bytes: the agent
/// sends nothing after its preamble (no MAC to relay anywhere), closes, counts `relay_proof`,
/// and its target never sees a connection. Before the fix the agent answered the MAC to any
/// 16 bytes and acted on the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_the_key_gets_no_mac_from_the_agent() {
    let pki = pki();
    let fake = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("fake reverse");
    let fake_addr = fake.local_addr().expect("addr");
    let relay = start_relay(pki.path(), Some(fake_addr.to_string())).await;
    // The target counts its connections: none may come from a forged claim.
    let target = TcpListener::bind("127.0.0.1:0").await.expect("target");
    let target_addr = target.local_addr().expect("addr");
    let connected = Arc::new(Mutex::new(0usize));
    let c = connected.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = target.accept().await {
            *c.lock().expect("lock") += 1;
        }
    });
    let mut agent = start_agent(pki.path(), &[relay.quic], target_addr, "");
    let ready = agent.ready_with(1).await;
    let metrics = ready["metrics"].as_str().expect("metrics").to_owned();
    for round in 0u8..3 {
        let (mut s, _) = tokio::time::timeout(WAIT, fake.accept())
            .await
            .expect("the agent dials the relay's host")
            .expect("accept");
        // Exactly the preamble, whatever its version (an agent before the fix sends version 1
        // and answers the first 16 bytes below with its MAC).
        let mut preamble = [0u8; reverse::PREAMBLE_BYTES];
        let mut have = 0;
        while have < reverse::preamble_len(&preamble[..have]) {
            let want = reverse::preamble_len(&preamble[..have]);
            let n = tokio::time::timeout(WAIT, s.read(&mut preamble[have..want]))
                .await
                .expect("the preamble in time")
                .expect("preamble");
            assert!(n > 0, "closed inside the preamble");
            have += n;
        }
        let (lease_id, agent_nonce) = match reverse::decode_preamble(&preamble[..have]) {
            Ok(Some(reverse::Preamble::V2 {
                lease_id,
                agent_nonce,
            })) => (lease_id, agent_nonce),
            Ok(Some(reverse::Preamble::V1 { lease_id })) => (lease_id, [0; 16]),
            other => panic!("not a preamble: {other:?}"),
        };
        let mut answer =
            reverse::encode_challenge(&[0x66; 32], &lease_id, &agent_nonce, &[round; 16]).to_vec();
        answer.extend_from_slice(b"\x01");
        answer.extend_from_slice(SECRET);
        s.write_all(&answer).await.expect("forged answer");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
            .await
            .expect("the agent closes");
        assert!(
            rest.is_empty(),
            "round {round}: the agent sent {} bytes after its preamble ({read:?})",
            rest.len()
        );
    }
    metric_reaches(
        &metrics,
        "outrelay_agent_reverse_sessions_failed_total{reason=\"relay_proof\"}",
        3.0,
    )
    .await;
    assert_eq!(
        *connected.lock().expect("lock"),
        0,
        "a forged marker reached the target"
    );
    let text = http_get(&metrics, "/metrics");
    assert_eq!(
        metric(&text, "outrelay_agent_reverse_sessions_opened_total"),
        0.0
    );
}
