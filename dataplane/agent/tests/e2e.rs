//! The agent end to end: the REAL `outrelay-relay` and `outrelay-agent` binaries as processes,
//! an rcgen PKI written to temp files, local targets in this process (a tokio-rustls HTTPS
//! server, TCP echo servers), and real public clients (`curl --resolve` through SNI
//! passthrough, TCP clients on the lease port).
//!
//! The relay binary is found next to this test's deps directory (`target/release/`); build it
//! first (`cargo build --release -p outrelay-relay`; a workspace run builds it anyway).
//!
//! Durations are logged; bounds are generous (at least 10 times the targets) because the
//! machine may be shared.

mod common;

use common::Ca;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::ExtendedKeyUsagePurpose;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const PUBLIC_URL: &str = "https://relay.outrelay.test";
const DEMO_HOST: &str = "demo.relay.outrelay.test";
const AGENT: &str = "outrelay://test/agent/00000000-0000-4000-8000-0000000000a9";
const RELAY: &str = "outrelay://test/relay/r1";
/// Bound on single waits (process start, ready files).
const WAIT: Duration = Duration::from_secs(30);
/// Bound on the agent's recovery after a relay restart (10 × the 5 s target).
const RECONNECT_BOUND: Duration = Duration::from_secs(60);
/// Bound on the public client being closed when the local target is down.
const CLOSE_BOUND: Duration = Duration::from_secs(10);
/// Bytes sent each way through the TCP lease.
const BULK_BYTES: u64 = 100 * 1024 * 1024;
/// The body the in-process HTTPS target serves.
const BODY: &str = "hello from the service behind outrelay-agent\n";

// ---------- PKI ----------

/// CA, relay and agent certificates written into one temp dir.
struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        Pki::with_relay_uri(RELAY)
    }

    /// A PKI whose relay certificate carries `relay_uri` as its identity.
    fn with_relay_uri(relay_uri: &str) -> Pki {
        let ca = Ca::new("outrelay agent e2e CA");
        let dir = tempfile::tempdir().expect("temp dir");
        let relay = ca.leaf(
            "relay r1",
            &["localhost"],
            Some(relay_uri),
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
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write PKI file");
        };
        write("ca.pem", &ca.pem);
        write("relay.pem", &relay.cert_pem);
        write("relay-key.pem", &relay.key_pem);
        write("agent.pem", &agent.cert_pem);
        write("agent-key.pem", &agent.key_pem);
        Pki { ca, dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

// ---------- processes ----------

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/release/deps/e2e-HASH → target/release/outrelay-relay
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

/// The relay's listening addresses.
#[derive(Debug, Clone)]
struct RelayAddrs {
    quic: SocketAddr,
    reverse: SocketAddr,
    public_tls: SocketAddr,
    /// `/metrics` (`None` for a fake relay).
    metrics: Option<SocketAddr>,
}

struct Relay {
    /// Killed with -9 on drop.
    proc: Proc,
    addrs: RelayAddrs,
}

/// A port that was free a moment ago.
fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A 10-port lease range no concurrent test process holds (see `outrelay_testkit`).
fn free_port_range() -> (u16, u16) {
    outrelay_testkit::claim_port_range()
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
        assert!(
            started.elapsed() < WAIT,
            "{what}: no ready file within {WAIT:?}"
        );
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

/// Starts the relay with the PKI in `pki`. `quic`/`public_tls` may be port 0; `reverse` must be
/// a real port (it is advertised in grants). `ports` is the TCP lease port range.
async fn start_relay(
    pki: &Pki,
    quic: &str,
    reverse: u16,
    public_tls: &str,
    ports: (u16, u16),
) -> Relay {
    start_relay_with(pki, quic, reverse, public_tls, ports, 1000).await
}

/// As [`start_relay`], with the idle-session keep-alive interval.
async fn start_relay_with(
    pki: &Pki,
    quic: &str,
    reverse: u16,
    public_tls: &str,
    ports: (u16, u16),
    keepalive_ms: u64,
) -> Relay {
    start_relay_in(
        pki.path(),
        quic,
        reverse,
        public_tls,
        ports,
        keepalive_ms,
        "",
    )
    .await
}

/// As [`start_relay_with`], with its config, ready file and admin socket in `dir` (which must
/// hold ca.pem, relay.pem and relay-key.pem), and `ingress_extra` lines in `[ingress]`.
async fn start_relay_in(
    dir: &Path,
    quic: &str,
    reverse: u16,
    public_tls: &str,
    ports: (u16, u16),
    keepalive_ms: u64,
    ingress_extra: &str,
) -> Relay {
    let admin = dir.join("relay-admin.sock");
    let _ = std::fs::remove_file(&admin);
    let ready = dir.join("relay-ready.json");
    let _ = std::fs::remove_file(&ready);
    let config = format!(
        "public_url = \"{PUBLIC_URL}\"\nworkers = 1\nreverse_advertise = \"127.0.0.1:{reverse}\"\n\
         [tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n\
         [listen]\nquic = \"{quic}\"\nreverse = \"127.0.0.1:{reverse}\"\npublic_tls = \"{public_tls}\"\n\
         metrics = \"127.0.0.1:0\"\nlease_bind_ip = \"127.0.0.1\"\nadmin_socket = \"{}\"\n\
         [leases]\nttl_default_s = 30\njanitor_interval_ms = 200\ntcp = true\nudp = true\n\
         min_port = {}\nmax_port = {}\n\
         [ingress]\nclaim_timeout_ms = 5000\nkeepalive_interval_ms = {keepalive_ms}\n\
         lease_sync_interval_ms = 20\n{ingress_extra}",
        admin.display(),
        ports.0,
        ports.1
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, config).expect("write relay config");
    let started = Instant::now();
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
    eprintln!("relay ready after {:?}: {info}", started.elapsed());
    Relay {
        addrs: RelayAddrs {
            quic: addr_of(&info, "quic"),
            reverse: addr_of(&info, "reverse"),
            public_tls: addr_of(&info, "public_tls"),
            metrics: Some(addr_of(&info, "metrics")),
        },
        proc,
    }
}

struct Agent {
    proc: Proc,
    ready: PathBuf,
    started: Instant,
}

/// Writes the agent config (short intervals) and starts `outrelay-agent run`.
fn start_agent(pki: &Pki, relay: &RelayAddrs, leases: &str) -> Agent {
    start_agent_with(pki, &[relay.quic], leases, 5000, "")
}

/// As [`start_agent`], with the dead-session timeout.
fn start_agent_with(
    pki: &Pki,
    relays: &[SocketAddr],
    leases: &str,
    dead_session_ms: u64,
    connection_extra: &str,
) -> Agent {
    spawn_agent(pki, relays, leases, dead_session_ms, connection_extra, &[])
}

/// As [`start_agent_with`], with extra environment (e.g. `NOTIFY_SOCKET`).
fn spawn_agent(
    pki: &Pki,
    relays: &[SocketAddr],
    leases: &str,
    dead_session_ms: u64,
    connection_extra: &str,
    env: &[(&str, String)],
) -> Agent {
    spawn_agent_sized(
        pki,
        relays,
        leases,
        dead_session_ms,
        connection_extra,
        env,
        (2, 8),
    )
}

/// As [`spawn_agent`], with the pool's `idle` and `max`; `OUTRELAY_AGENT_BIN` overrides the
/// binary (to measure another build).
fn spawn_agent_sized(
    pki: &Pki,
    relays: &[SocketAddr],
    leases: &str,
    dead_session_ms: u64,
    connection_extra: &str,
    env: &[(&str, String)],
    (idle, max): (usize, usize),
) -> Agent {
    let dir = pki.path();
    let relays: Vec<String> = relays.iter().map(ToString::to_string).collect();
    let config = format!(
        "relays = {relays:?}\nserver_name = \"localhost\"\n\
         [identity]\ncert = \"agent.pem\"\nkey = \"agent-key.pem\"\nca = \"ca.pem\"\n\
         {leases}\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\
         [pool]\nidle = {idle}\nmax = {max}\ndead_session_ms = {dead_session_ms}\n\
         [connection]\nkeepalive_ms = 500\nidle_timeout_ms = 3000\nping_interval_ms = 1000\n\
         reconnect_initial_ms = 200\nreconnect_max_ms = 1000\n{connection_extra}\n\
         [local]\nconnect_timeout_ms = 2000\nfailure_log_interval_ms = 1000\n"
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).expect("write agent config");
    let ready = dir.join("agent-ready.json");
    let _ = std::fs::remove_file(&ready);
    let started = Instant::now();
    let binary = std::env::var_os("OUTRELAY_AGENT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_outrelay-agent")),
        PathBuf::from,
    );
    let child = Command::new(binary)
        .args(["--log", "info", "run", "--config"])
        .arg(&path)
        .arg("--ready-file")
        .arg(&ready)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .spawn()
        .expect("start outrelay-agent");
    Agent {
        proc: Proc(child),
        ready,
        started,
    }
}

impl Agent {
    async fn ready(&mut self) -> serde_json::Value {
        let info = wait_for_file(&self.ready, &mut self.proc, "agent").await;
        eprintln!("agent ready after {:?}: {info}", self.started.elapsed());
        info
    }
}

/// The public TCP port of lease `name` in the agent's ready file.
fn lease_port(ready: &serde_json::Value, name: &str) -> u16 {
    port_in_ready(ready, name, "tcp_addr")
}

/// The port of the `key` address (`tcp_addr`, `udp_addr`) of lease `name` in a ready file.
fn port_in_ready(ready: &serde_json::Value, name: &str, key: &str) -> u16 {
    let lease = ready["leases"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .unwrap_or_else(|| panic!("lease {name} in {ready}"));
    let addr = lease[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} of {name} in {ready}"));
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("port in {addr}"))
}

/// GET `path` on the agent's metrics listener.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the agent's listener");
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

/// The value of the sample line that starts with `series` (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// ---------- targets ----------

/// An HTTPS server for `demo` answering every request with [`BODY`].
async fn tls_target(ca: &Ca) -> (SocketAddr, JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind target");
    let addr = listener.local_addr().expect("target addr");
    let task = common::world::https_target_with(listener, ca, DEMO_HOST, BODY);
    (addr, task)
}

// ---------- helpers ----------

fn have(bin: &str, arg: &str) -> bool {
    Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn run_blocking(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output())
        .await
        .expect("join")
        .expect("run command")
}

/// One echo round trip through the public TCP port; `Err` with the reason when it fails.
async fn echo_once(port: u16) -> Result<(), String> {
    let attempt = async {
        let mut c = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        c.write_all(b"ping through the relay")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 22];
        c.read_exact(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if &buf == b"ping through the relay" {
            Ok(())
        } else {
            Err("wrong echo".to_owned())
        }
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .unwrap_or_else(|_| Err("timeout".to_owned()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_the_tls_server_behind_the_agent_through_sni() {
    if !have("curl", "--version") {
        eprintln!("SKIP curl_reaches_the_tls_server_behind_the_agent_through_sni: no curl");
        return;
    }
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    let (target, _target_task) = tls_target(&pki.ca).await;
    let mut agent = start_agent(
        &pki,
        &relay.addrs,
        &format!("[[lease]]\nname = \"demo\"\ntls_to = \"{target}\"\n"),
    );
    let ready = agent.ready().await;
    assert_eq!(ready["relay"], relay.addrs.quic.to_string());
    assert_eq!(ready["leases"][0]["hostname"], DEMO_HOST);
    assert!(ready["leases"][0]["tcp_addr"].is_null(), "{ready}");
    let port = relay.addrs.public_tls.port();
    let url = format!("https://{DEMO_HOST}:{port}/");
    // The first routable request: retry from agent start until curl succeeds.
    let (stdout, first) = loop {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
            .arg(pki.path().join("ca.pem"))
            .arg("--resolve")
            .arg(format!("{DEMO_HOST}:{port}:127.0.0.1"))
            .arg(&url);
        let out = run_blocking(cmd).await;
        if out.status.success() {
            break (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                agent.started.elapsed(),
            );
        }
        assert!(
            agent.started.elapsed() < WAIT,
            "curl never succeeded: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("MEASURED agent start -> first routable request (curl via SNI): {first:?}");
    assert_eq!(stdout, BODY);

    // A few more, then the counters and `status` show them.
    for _ in 0..5 {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
            .arg(pki.path().join("ca.pem"))
            .arg("--resolve")
            .arg(format!("{DEMO_HOST}:{port}:127.0.0.1"))
            .arg(&url);
        let out = run_blocking(cmd).await;
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), BODY);
    }
    let metrics_addr = ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let text = http_get(&metrics_addr, "/metrics");
    let claimed = metric(
        &text,
        "outrelay_agent_reverse_sessions_claimed_total{marker=\"tls\"}",
    );
    assert!(
        claimed >= 6.0,
        "6 TLS claims counted, got {claimed}:\n{text}"
    );
    // The burst grew the pool; once claims stop it shrinks back to `idle` (2) as the surplus
    // sessions close at their next keep-alive (every second here).
    let pool_open = |addr: &str| -> u64 {
        let text = http_get(addr, "/status");
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let doc: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        // The one relay is held by whichever HA slot dialled first: sum over the slots.
        doc["relays"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["leases"][0]["pool"]["open"].as_u64())
            .sum()
    };
    let after_burst = pool_open(&metrics_addr);
    let start = Instant::now();
    while pool_open(&metrics_addr) != 2 {
        assert!(
            start.elapsed() < WAIT,
            "pool back to 2 open sessions (was {after_burst} after the burst)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "pool: {after_burst} open right after the burst, back to 2 in {:?}",
        start.elapsed()
    );
    let status = Command::new(env!("CARGO_BIN_EXE_outrelay-agent"))
        .args(["status", "--metrics", &metrics_addr])
        .output()
        .expect("run status");
    let summary = String::from_utf8_lossy(&status.stdout);
    eprintln!("outrelay-agent status:\n{summary}");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(summary.contains("connected"), "{summary}");
    assert!(
        summary.contains(&format!("lease demo granted https://{DEMO_HOST}")),
        "{summary}"
    );
    assert!(summary.contains(AGENT), "{summary}");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_lease_carries_100_mib_each_way_with_equal_hashes() {
    // The agent's splice engine on each readiness backend this kernel offers.
    let mut backends = vec!["epoll"];
    if outrelay_io::Backend::probe() == outrelay_io::Backend::Uring {
        backends.push("io_uring");
    } else {
        eprintln!(
            "SKIP io_uring backend for the agent: this kernel or sandbox refuses io_uring_setup"
        );
    }
    for backend in backends {
        eprintln!("--- agent io backend {backend}");
        bulk_through_tcp_lease(backend).await;
    }
}

async fn bulk_through_tcp_lease(backend: &str) {
    let pki = Pki::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        (lo, hi),
    )
    .await;
    let (target, echo) = common::hashing_echo_target().await;
    let mut agent = start_agent(
        &pki,
        &relay.addrs,
        &format!(
            "[[lease]]\nname = \"raw\"\ntcp_to = \"{target}\"\n[splice]\nio_backend = \"{backend}\"\n"
        ),
    );
    let ready = agent.ready().await;
    let port = lease_port(&ready, "raw");
    assert!((lo..=hi).contains(&port), "port {port} in {lo}..={hi}");
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
    let bulk = common::Bulk::start_on(client, BULK_BYTES);
    let (sent, sent_hash, write_took, got, got_hash, trailer, read_took) = bulk.finish().await;
    let (echo_total, echo_hash) = tokio::time::timeout(WAIT, echo)
        .await
        .expect("echo finished")
        .expect("echo task");
    let mib = BULK_BYTES as f64 / (1024.0 * 1024.0);
    eprintln!(
        "MEASURED tcp lease through relay + agent ({backend}): {mib:.0} MiB up in {write_took:?} ({:.0} MiB/s), \
         {mib:.0} MiB back in {read_took:?} ({:.0} MiB/s), both directions at once",
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
        "trailer after our FIN arrived (half-close kept)"
    );

    // The bytes went through the agent's splice engine (stats are published once a second).
    let metrics_addr = ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let start = Instant::now();
    loop {
        let text = http_get(&metrics_addr, "/metrics");
        let bytes = metric(&text, "outrelay_agent_splice_bytes_total");
        if bytes >= 2.0 * BULK_BYTES as f64 {
            eprintln!("agent splice engine moved {bytes} bytes");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "engine bytes {bytes} < 200 MiB:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_a_relay_restart_on_the_same_ports() {
    let pki = Pki::new();
    let ports = free_port_range();
    let reverse = free_tcp_port();
    let relay = start_relay(&pki, "127.0.0.1:0", reverse, "127.0.0.1:0", ports).await;
    let (target, _echo) = common::echo_server().await;
    let mut agent = start_agent(
        &pki,
        &relay.addrs,
        &format!("[[lease]]\nname = \"raw\"\ntcp_to = \"{target}\"\n"),
    );
    let ready = agent.ready().await;
    let port = lease_port(&ready, "raw");
    let start = Instant::now();
    while let Err(e) = echo_once(port).await {
        assert!(start.elapsed() < WAIT, "first echo never worked: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "MEASURED agent start -> first routable request (TCP lease): {:?}",
        agent.started.elapsed()
    );

    // Kill -9 the relay and start it again on the same ports with the same key.
    let addrs = relay.addrs.clone();
    drop(relay);
    let killed = Instant::now();
    let relay = start_relay(
        &pki,
        &addrs.quic.to_string(),
        addrs.reverse.port(),
        &addrs.public_tls.to_string(),
        ports,
    )
    .await;
    assert_eq!(relay.addrs.quic, addrs.quic);
    let restarted = Instant::now();
    loop {
        let Err(last) = echo_once(port).await else {
            break;
        };
        assert!(
            restarted.elapsed() < RECONNECT_BOUND,
            "public port {port} did not work again within {RECONNECT_BOUND:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "MEASURED reconnect after relay restart: public TCP lease works again {:?} after the new \
         relay was ready ({:?} after the kill)",
        restarted.elapsed(),
        killed.elapsed()
    );
    let metrics_addr = ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let text = http_get(&metrics_addr, "/metrics");
    assert!(
        metric(&text, "outrelay_agent_relay_reconnects_total") >= 1.0,
        "reconnect counted:\n{text}"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_target_down_closes_the_public_client_promptly_and_is_counted() {
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    // Nothing listens here.
    let dead = free_tcp_port();
    let mut agent = start_agent(
        &pki,
        &relay.addrs,
        &format!("[[lease]]\nname = \"down\"\ntcp_to = \"127.0.0.1:{dead}\"\n"),
    );
    let ready = agent.ready().await;
    let port = lease_port(&ready, "down");
    let start = Instant::now();
    let mut client = loop {
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
    let connected = Instant::now();
    let _ = client.write_all(b"hello?").await;
    let mut buf = [0u8; 64];
    let outcome = tokio::time::timeout(CLOSE_BOUND, client.read(&mut buf)).await;
    let took = connected.elapsed();
    match outcome {
        Ok(Ok(0)) => eprintln!("public client got EOF"),
        Ok(Err(e)) => eprintln!("public client got {e}"),
        Ok(Ok(n)) => panic!("public client received {n} bytes from a dead target"),
        Err(_) => panic!("public client still open after {CLOSE_BOUND:?}"),
    }
    eprintln!("MEASURED local target down -> public client closed in {took:?}");
    let metrics_addr = ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let text = http_get(&metrics_addr, "/metrics");
    let refused = metric(
        &text,
        "outrelay_agent_local_connect_failed_total{reason=\"refused\"}",
    );
    assert!(refused >= 1.0, "refusal counted:\n{text}");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_and_exits_zero() {
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    let (target, _echo) = common::echo_server().await;
    let mut agent = start_agent(
        &pki,
        &relay.addrs,
        &format!("[[lease]]\nname = \"bye\"\ntcp_to = \"{target}\"\n"),
    );
    agent.ready().await;
    let pid = agent.proc.0.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(killed.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = agent.proc.0.try_wait().expect("poll agent") {
            break s;
        }
        assert!(start.elapsed() < WAIT, "agent did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "agent stopped {:?} after SIGTERM: {status}",
        start.elapsed()
    );
    assert!(status.success(), "exit status {status}");
    drop(relay);
}

#[test]
fn invalid_config_exits_64_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        ("relays = []\n", "relays"),
        (
            "relays = [\"127.0.0.1:7443\"]\n[identity]\nstate_dir = \"s\"\n\
             [[lease]]\nname = \"x\"\ntcp_to = \"127.0.0.1:9\"\n[pool]\ndead_session_ms = 1\n",
            "pool.dead_session_ms",
        ),
        (
            "relays = [\"127.0.0.1:7443\"]\n[identity]\nstate_dir = \"s\"\n\
             [[lease]]\nname = \"x\"\n",
            "lease[0]",
        ),
        (
            "relays = [\"127.0.0.1:7443\"]\n[identity]\nstate_dir = \"s\"\n\
             [[lease]]\nname = \"x\"\ntcp_to = \"127.0.0.1:9\"\n\
             [splice]\nstall_timeout_ms = 40000\n",
            "splice.stall_timeout_ms",
        ),
        (
            "relays = [\"127.0.0.1:7443\"]\n[identity]\nstate_dir = \"s\"\n\
             [[lease]]\nname = \"x\"\ntcp_to = \"127.0.0.1:9\"\n\
             [splice]\ncopy_buffer_bytes = 1\n",
            "splice.copy_buffer_bytes",
        ),
    ];
    for (text, key) in cases {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_outrelay-agent"))
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .expect("run agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(&format!("invalid config: {key}")),
            "{key}: {stderr}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_outrelay-agent"))
        .args([
            "expose",
            "--relay",
            "127.0.0.1:7443",
            "--name",
            "x",
            "--state-dir",
            "/nonexistent",
        ])
        .output()
        .expect("run expose");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("invalid config: --tls-to/--tcp-to"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_follows_goaway_when_the_relay_stops_gracefully() {
    let pki = Pki::new();
    let ports = free_port_range();
    let relay = start_relay(&pki, "127.0.0.1:0", free_tcp_port(), "127.0.0.1:0", ports).await;
    let (target, _echo) = common::echo_server().await;
    let mut agent = start_agent(
        &pki,
        &relay.addrs,
        &format!("[[lease]]\nname = \"raw\"\ntcp_to = \"{target}\"\n"),
    );
    let ready = agent.ready().await;
    let port = lease_port(&ready, "raw");
    let start = Instant::now();
    while let Err(e) = echo_once(port).await {
        assert!(start.elapsed() < WAIT, "first echo never worked: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGTERM: the relay sends GOAWAY to its agents before it exits.
    let addrs = relay.addrs.clone();
    let mut relay = relay;
    let pid = relay.proc.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let stopping = Instant::now();
    while relay.proc.0.try_wait().expect("poll relay").is_none() {
        assert!(stopping.elapsed() < WAIT, "relay did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(relay);
    let relay = start_relay(
        &pki,
        &addrs.quic.to_string(),
        addrs.reverse.port(),
        &addrs.public_tls.to_string(),
        ports,
    )
    .await;
    let restarted = Instant::now();
    loop {
        let Err(last) = echo_once(port).await else {
            break;
        };
        assert!(
            restarted.elapsed() < RECONNECT_BOUND,
            "public port {port} did not work again within {RECONNECT_BOUND:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "MEASURED reconnect after a graceful relay restart (GOAWAY): {:?} after the new relay \
         was ready ({:?} after SIGTERM)",
        restarted.elapsed(),
        stopping.elapsed()
    );
    let metrics_addr = ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let text = http_get(&metrics_addr, "/metrics");
    assert!(
        metric(&text, "outrelay_agent_relay_goaways_total") >= 1.0,
        "GOAWAY counted:\n{text}"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_idle_sessions_are_dropped_as_dead_and_replaced() {
    let pki = Pki::new();
    // Relay keep-alives once a minute, agent dead-session timeout 300 ms: every idle session
    // goes silent for longer than the timeout.
    let relay = start_relay_with(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
        60_000,
    )
    .await;
    let (target, _echo) = common::echo_server().await;
    let mut agent = start_agent_with(
        &pki,
        &[relay.addrs.quic],
        &format!("[[lease]]\nname = \"quiet\"\ntcp_to = \"{target}\"\n"),
        300,
        "",
    );
    let ready = agent.ready().await;
    let metrics_addr = ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let start = Instant::now();
    let dead = loop {
        let text = http_get(&metrics_addr, "/metrics");
        let dead = metric(&text, "outrelay_agent_reverse_sessions_dead_total");
        if dead >= 4.0 {
            break dead;
        }
        assert!(
            start.elapsed() < WAIT,
            "dead sessions counted: {dead}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("{dead} dead sessions after {:?}", start.elapsed());
    // The replacements still serve the lease.
    let port = lease_port(&ready, "quiet");
    let start = Instant::now();
    while let Err(e) = echo_once(port).await {
        assert!(
            start.elapsed() < WAIT,
            "echo through replaced sessions: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expose_serves_tls_and_tcp_of_one_lease_at_once() {
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    let (tls, _tls_task) = tls_target(&pki.ca).await;
    let (tcp, _echo) = common::echo_server().await;
    let dir = pki.path();
    let ready_path = dir.join("expose-ready.json");
    let state = dir.join("state");
    std::fs::create_dir(&state).expect("state dir");
    for (from, to) in [
        ("agent.pem", "cert.pem"),
        ("agent-key.pem", "key.pem"),
        ("ca.pem", "ca.pem"),
    ] {
        std::fs::copy(dir.join(from), state.join(to)).expect("copy identity");
    }
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_outrelay-agent"))
        .args(["--log", "info", "expose", "--relay"])
        .arg(relay.addrs.quic.to_string())
        .args(["--name", "demo", "--tls-to"])
        .arg(tls.to_string())
        .arg("--tcp-to")
        .arg(tcp.to_string())
        // The enrolled layout (outrelay_client::store): cert.pem, key.pem, ca.pem.
        .arg("--state-dir")
        .arg(&state)
        .args(["--metrics", "127.0.0.1:0", "--ready-file"])
        .arg(&ready_path)
        .stdin(Stdio::null())
        .spawn()
        .expect("start outrelay-agent expose");
    let mut proc = Proc(child);
    let ready = wait_for_file(&ready_path, &mut proc, "agent expose").await;
    eprintln!("expose ready after {:?}: {ready}", started.elapsed());
    assert_eq!(ready["leases"][0]["hostname"], DEMO_HOST);
    let port = lease_port(&ready, "demo");
    let start = Instant::now();
    while let Err(e) = echo_once(port).await {
        assert!(start.elapsed() < WAIT, "TCP side of the lease: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if have("curl", "--version") {
        let public = relay.addrs.public_tls.port();
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
            .arg(dir.join("ca.pem"))
            .arg("--resolve")
            .arg(format!("{DEMO_HOST}:{public}:127.0.0.1"))
            .arg(format!("https://{DEMO_HOST}:{public}/"));
        let out = run_blocking(cmd).await;
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), BODY);
    } else {
        eprintln!("SKIP the curl half of expose_serves_tls_and_tcp_of_one_lease_at_once: no curl");
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_the_relay_forgot_is_registered_again() {
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    let (target, _echo) = common::echo_server().await;
    // TTL 1 s but renewals only every 2.5 s: the relay's janitor expires the lease first, so
    // the renewal is answered `lease_not_found` and the agent must register it again.
    let mut agent = start_agent_with(
        &pki,
        &[relay.addrs.quic],
        &format!("[[lease]]\nname = \"short\"\ntcp_to = \"{target}\"\nttl_s = 1\n"),
        5000,
        "renew_ms = 2500",
    );
    let ready = agent.ready().await;
    let metrics_addr = ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let start = Instant::now();
    loop {
        let text = http_get(&metrics_addr, "/metrics");
        if metric(&text, "outrelay_agent_lease_reregistered_total") >= 1.0 {
            break;
        }
        assert!(start.elapsed() < WAIT, "no re-registration:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("lease registered again after {:?}", start.elapsed());
    // The new grant (new lease id, new pool) serves the public port again.
    let port = lease_port(&ready, "short");
    let start = Instant::now();
    while let Err(e) = echo_once(port).await {
        assert!(start.elapsed() < WAIT, "echo after re-registration: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_relay_role_is_refused() {
    // A QUIC server that chains to the right CA, names localhost and speaks orp/1, but whose
    // certificate identity is an agent's, not a relay's.
    let pki = Pki::new();
    let fake = pki.ca.leaf(
        "not a relay",
        &["localhost"],
        Some("outrelay://test/agent/00000000-0000-4000-8000-0000000000ff"),
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    );
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(fake.chain, fake.key)
        .expect("server cert");
    tls.alpn_protocols = vec![b"orp/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("QUIC TLS");
    let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr"))
        .expect("fake relay endpoint");
    let quic = endpoint.local_addr().expect("fake relay addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (a, r) = (accepted.clone(), refused.clone());
    let server_task = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            match incoming.await {
                Ok(_) => a.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                Err(_) => r.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            };
        }
    });
    let addrs = RelayAddrs {
        quic,
        reverse: "127.0.0.1:9".parse().expect("addr"),
        public_tls: "127.0.0.1:9".parse().expect("addr"),
        metrics: None,
    };
    let mut agent = start_agent(
        &pki,
        &addrs,
        "[[lease]]\nname = \"nope\"\ntcp_to = \"127.0.0.1:9\"\n",
    );
    let start = Instant::now();
    while refused.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        assert!(start.elapsed() < WAIT, "the agent did not retry");
        assert!(
            agent.proc.0.try_wait().expect("poll agent").is_none(),
            "the agent keeps retrying instead of exiting"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no handshake with a non-relay server completes"
    );
    assert!(!agent.ready.exists(), "no ready file without a relay");
    server_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lease_is_served_by_every_configured_relay() {
    let pki = Pki::new();
    let relay_a = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    // The second relay: same CA, its own identity (the agent holds distinct relays by
    // certificate identity, issue 22) and directory.
    let other = tempfile::tempdir().expect("temp dir");
    std::fs::copy(pki.path().join("ca.pem"), other.path().join("ca.pem")).expect("copy CA");
    let leaf = pki.ca.leaf(
        "relay r2",
        &["localhost"],
        Some("outrelay://test/relay/r2"),
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    std::fs::write(other.path().join("relay.pem"), &leaf.cert_pem).expect("relay.pem");
    std::fs::write(other.path().join("relay-key.pem"), &leaf.key_pem).expect("relay key");
    let relay_b = start_relay_in(
        other.path(),
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
        1000,
        "",
    )
    .await;
    let (target, _echo) = common::echo_server().await;
    let mut agent = start_agent_with(
        &pki,
        &[relay_a.addrs.quic, relay_b.addrs.quic],
        &format!("[[lease]]\nname = \"twice\"\ntcp_to = \"{target}\"\n"),
        5000,
        "",
    );
    agent.ready().await;
    // The ready file lists every ready relay; wait until both are in it.
    let start = Instant::now();
    let ready = loop {
        let text = std::fs::read_to_string(&agent.ready).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if v["relays"].as_array().map(Vec::len) == Some(2) {
            break v;
        }
        assert!(
            start.elapsed() < WAIT,
            "both relays in the ready file: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let relays = ready["relays"].as_array().expect("relays");
    assert_ne!(
        lease_port(&relays[0], "twice"),
        lease_port(&relays[1], "twice"),
        "two relays, two public ports"
    );
    for r in relays {
        let port = lease_port(r, "twice");
        let start = Instant::now();
        while let Err(e) = echo_once(port).await {
            assert!(start.elapsed() < WAIT, "echo through {}: {e}", r["addr"]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop((relay_a, relay_b));
}

// ---------- UDP leases ----------

/// The public UDP port of lease `name` in the agent's ready file.
fn udp_lease_port(ready: &serde_json::Value, name: &str) -> u16 {
    port_in_ready(ready, name, "udp_addr")
}

async fn udp_client(port: u16) -> tokio::net::UdpSocket {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind client");
    s.connect(("127.0.0.1", port)).await.expect("connect");
    s
}

/// Sends `payload` and waits for one datagram back (`None`: nothing within `wait`).
async fn udp_round_trip(
    s: &tokio::net::UdpSocket,
    payload: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    s.send(payload).await.expect("send");
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(wait, s.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Round trips until one works (the lease port is bound a moment after the grant).
async fn udp_first_echo(s: &tokio::net::UdpSocket) -> Duration {
    let start = Instant::now();
    loop {
        if udp_round_trip(s, b"hello", Duration::from_millis(200))
            .await
            .as_deref()
            == Some(&b"hello"[..])
        {
            return start.elapsed();
        }
        assert!(start.elapsed() < WAIT, "no UDP echo within {WAIT:?}");
    }
}

fn relay_metric(relay: &RelayAddrs, series: &str) -> f64 {
    let addr = relay.metrics.expect("relay metrics").to_string();
    metric(&http_get(&addr, "/metrics"), series)
}

/// The relay's current maximum UDP payload (`outrelay_relay_udp_payload_max_bytes`).
fn payload_max(relay: &RelayAddrs) -> usize {
    let v = relay_metric(relay, "outrelay_relay_udp_payload_max_bytes");
    format!("{v:.0}").parse().expect("a whole number of bytes")
}

/// A datagram `i` of `len` bytes: its index, then a pattern derived from it.
fn numbered(i: u32, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len)
        .map(|k| {
            (u32::try_from(k)
                .unwrap_or(0)
                .wrapping_mul(31)
                .wrapping_add(i))
            .to_le_bytes()[0]
        })
        .collect();
    d[..4].copy_from_slice(&i.to_be_bytes());
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_matches_1000_datagrams_of_varied_sizes_on_two_flows() {
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    let (target, _echo) = common::udp_echo_server().await;
    let mut agent = start_agent(
        &pki,
        &relay.addrs,
        &format!("[[lease]]\nname = \"echo\"\nudp_to = \"{target}\"\n"),
    );
    let ready = agent.ready().await;
    let port = udp_lease_port(&ready, "echo");
    let (a, b) = (udp_client(port).await, udp_client(port).await);
    let first = udp_first_echo(&a).await;
    eprintln!(
        "MEASURED agent start -> first UDP echo: {:?} (first echo {first:?} after ready)",
        agent.started.elapsed()
    );
    udp_first_echo(&b).await;
    for (who, addr) in [
        ("relay", relay.addrs.metrics.expect("metrics").to_string()),
        (
            "agent",
            ready["metrics"].as_str().expect("agent metrics").to_owned(),
        ),
    ] {
        let text = http_get(&addr, "/metrics");
        let udp: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("_udp_") && !l.starts_with('#') && !l.ends_with(" 0"))
            .collect();
        eprintln!("{who} UDP counters after the first echoes: {udp:?}");
    }
    assert_eq!(
        relay_metric(&relay.addrs, "outrelay_relay_udp_flows_total"),
        2.0
    );

    // Read the current maximum payload when sending (it moves with path MTU discovery).
    let max = payload_max(&relay.addrs);
    eprintln!("MEASURED UDP payload maximum: {max} bytes");
    assert!(max >= 1_000, "payload max {max}");
    let started = Instant::now();
    for i in 0..1_000u32 {
        // Sizes cycle through 4..=max, with the maximum itself every 100th datagram.
        let len = if i % 100 == 99 {
            max
        } else {
            4 + (i as usize * 977) % (max - 3)
        };
        let (client, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let d = numbered(i, len);
        let back = udp_round_trip(client, &d, Duration::from_secs(5)).await;
        assert_eq!(back.as_deref(), Some(&d[..]), "datagram {i} of {len} bytes");
        // Nothing crossed to the other flow.
        let mut buf = [0u8; 16];
        assert!(
            other.try_recv(&mut buf).is_err(),
            "datagram {i} leaked to the other flow"
        );
    }
    eprintln!(
        "MEASURED 1000 UDP echoes (stop and wait): {:?}",
        started.elapsed()
    );
    for (who, addr, series) in [
        (
            "relay",
            relay.addrs.metrics.expect("metrics").to_string(),
            "outrelay_relay_udp_drops_total",
        ),
        (
            "agent",
            ready["metrics"].as_str().expect("agent metrics").to_owned(),
            "outrelay_agent_udp_drops_total",
        ),
    ] {
        let text = http_get(&addr, "/metrics");
        let dropped: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(series) && !l.ends_with(" 0"))
            .collect();
        assert!(dropped.is_empty(), "{who} dropped datagrams: {dropped:?}");
    }

    // One byte over the maximum: dropped and counted, never truncated.
    let before = relay_metric(
        &relay.addrs,
        "outrelay_relay_udp_drops_total{reason=\"udp_too_large\"}",
    );
    let max = payload_max(&relay.addrs);
    let back = udp_round_trip(&a, &numbered(7, max + 1), Duration::from_millis(500)).await;
    assert_eq!(back, None, "an oversized datagram came back");
    let after = relay_metric(
        &relay.addrs,
        "outrelay_relay_udp_drops_total{reason=\"udp_too_large\"}",
    );
    assert_eq!(after, before + 1.0);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_resolves_through_the_relay_from_dnsmasq_behind_the_agent() {
    if !have("dig", "-v") || !have("dnsmasq", "--version") {
        eprintln!("SKIP: dig or dnsmasq not installed (apt-get install bind9-dnsutils dnsmasq)");
        return;
    }
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    let (_dnsmasq, dns_port) = start_dnsmasq().await;
    let mut agent = start_agent(
        &pki,
        &relay.addrs,
        &format!("[[lease]]\nname = \"dns\"\nudp_to = \"127.0.0.1:{dns_port}\"\n"),
    );
    let ready = agent.ready().await;
    let port = udp_lease_port(&ready, "dns");
    let start = Instant::now();
    loop {
        let (text, stderr) = dig_once(port).await;
        if text == "10.9.8.7" {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "dig through the relay (dnsmasq answers directly): {text:?} {stderr}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "MEASURED dig answered through the relay {:?} after the agent was ready",
        start.elapsed()
    );
}

/// One `dig` query for svc.outrelay.test at `port`, one try of one second: the answer's text.
async fn dig_once(port: u16) -> (String, String) {
    let mut cmd = Command::new("dig");
    cmd.args([
        "@127.0.0.1",
        "-p",
        &port.to_string(),
        "svc.outrelay.test",
        "A",
        "+short",
        "+tries=1",
        "+time=1",
    ]);
    let out = run_blocking(cmd).await;
    (
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts dnsmasq answering svc.outrelay.test = 10.9.8.7 on a free loopback UDP port and
/// returns once it answers `dig` directly. The port was free a moment before dnsmasq binds
/// it: when another test took it meanwhile (dnsmasq exits), it tries another one. Without
/// this check a dnsmasq that never came up looked like a relay that never answered.
async fn start_dnsmasq() -> (Proc, u16) {
    let user = if nix_is_root() { "root" } else { "nobody" };
    for _ in 0..5 {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free UDP port")
            .port();
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--pid-file=",
                &format!("--user={user}"),
                &format!("--port={port}"),
                "--address=/svc.outrelay.test/10.9.8.7",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        let mut dnsmasq = Proc(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if dnsmasq.0.try_wait().ok().flatten().is_some() {
                break; // it could not bind: another port
            }
            if dig_once(port).await.0 == "10.9.8.7" {
                return (dnsmasq, port);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("dnsmasq did not answer on 127.0.0.1:{port}; another port");
    }
    panic!("dnsmasq never answered dig directly on five ports");
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_lease_keeps_its_port_when_the_agent_connection_comes_back() {
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    let (target, _echo) = common::udp_echo_server().await;
    let two = format!(
        "[[lease]]\nname = \"first\"\nudp_to = \"{target}\"\n\
         [[lease]]\nname = \"second\"\nudp_to = \"{target}\"\n"
    );
    let mut agent = start_agent(&pki, &relay.addrs, &two);
    let ready = agent.ready().await;
    let (p1, p2) = (
        udp_lease_port(&ready, "first"),
        udp_lease_port(&ready, "second"),
    );
    assert_ne!(p1, p2);
    udp_first_echo(&udp_client(p2).await).await;
    // The agent's QUIC connection goes away without a goodbye; the new one holds only
    // "second". Lowest-free would hand it p1; the lease keeps p2.
    drop(agent);
    let mut agent = start_agent(
        &pki,
        &relay.addrs,
        &format!("[[lease]]\nname = \"second\"\nudp_to = \"{target}\"\n"),
    );
    let ready = agent.ready().await;
    assert_eq!(
        udp_lease_port(&ready, "second"),
        p2,
        "the UDP port moved: {ready}"
    );
    let took = udp_first_echo(&udp_client(p2).await).await;
    eprintln!("MEASURED UDP echo on the same port {took:?} after the new agent was ready");
    drop(agent);
}

/// A local UDP service with per-source session state (as a game or VPN server keyed by the
/// client's 4-tuple): it answers every datagram with the FIRST datagram its source sent. The
/// sources it has seen are kept in `sources`.
async fn udp_session_service() -> (
    SocketAddr,
    Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    JoinHandle<()>,
) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind UDP service");
    let addr = socket.local_addr().expect("service addr");
    let sources = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = sources.clone();
    let task = tokio::spawn(async move {
        let mut first: std::collections::HashMap<SocketAddr, Vec<u8>> =
            std::collections::HashMap::new();
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let session = first.entry(from).or_insert_with(|| {
                seen.lock().expect("sources").push(from);
                buf[..n].to_vec()
            });
            let _ = socket.send_to(session, from).await;
        }
    });
    (addr, sources, task)
}

/// Sends `payload` every 200 ms until a datagram comes back (`WAIT` at most) and returns it.
async fn udp_until_answered(s: &tokio::net::UdpSocket, payload: &[u8]) -> Vec<u8> {
    let start = Instant::now();
    loop {
        if let Some(back) = udp_round_trip(s, payload, Duration::from_millis(200)).await {
            return back;
        }
        assert!(
            start.elapsed() < WAIT,
            "no answer to {payload:?} within {WAIT:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_after_a_re_registration_never_gets_an_old_clients_flow() {
    // Review M4: the relay counted a lease's flow ids from 1 again after the agent registered
    // the lease again on the same connection, and the agent kept its (slot, flow id) sockets
    // because slot and target were the same: the first new client was handed the previous
    // client's local socket, so the service took it for that client and answered with its
    // session.
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    let (target, sources, _service) = udp_session_service().await;
    // TTL 1 s, renewals every 2.5 s: the relay expires the lease before each renewal, the
    // renewal is refused and the agent registers the lease again on the same connection (same
    // slot, same sticky port, same target).
    let mut agent = start_agent_with(
        &pki,
        &[relay.addrs.quic],
        &format!("[[lease]]\nname = \"game\"\nudp_to = \"{target}\"\nttl_s = 1\n"),
        5000,
        "renew_ms = 2500",
    );
    let ready = agent.ready().await;
    let port = udp_lease_port(&ready, "game");
    let metrics_addr = ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let reregistered = || {
        metric(
            &http_get(&metrics_addr, "/metrics"),
            "outrelay_agent_lease_reregistered_total",
        )
    };

    let a = udp_client(port).await;
    assert_eq!(udp_until_answered(&a, b"A-secret").await, b"A-secret");
    let before = reregistered();
    let start = Instant::now();
    while reregistered() <= before {
        assert!(start.elapsed() < WAIT, "no re-registration within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "lease registered again {:?} after A's session began",
        start.elapsed()
    );
    // Client A is silent now (its agent-side socket is well within the 30 s flow idle time).
    let b = udp_client(port).await;
    let back = udp_until_answered(&b, b"hello").await;
    assert_eq!(
        String::from_utf8_lossy(&back),
        "hello",
        "client B was answered with another client's session"
    );
    // A few more round trips: every answer is B's own.
    for _ in 0..5 {
        if let Some(back) = udp_round_trip(&b, b"again", Duration::from_millis(200)).await {
            assert_eq!(String::from_utf8_lossy(&back), "hello");
        }
    }
    let seen = sources.lock().expect("sources").clone();
    assert_eq!(seen.len(), 2, "the service saw A and B as {seen:?}");
    drop(agent);
}

// ---------- lifecycle ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_notifies_systemd_and_lets_a_spliced_connection_finish_after_sigterm() {
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    let (target, _echo) = common::echo_server().await;
    let notify_dir = tempfile::tempdir().expect("temp dir");
    let mut notify = outrelay_testkit::notify::NotifyListener::bind(notify_dir.path(), None);
    let mut agent = spawn_agent(
        &pki,
        &[relay.addrs.quic],
        &format!("[[lease]]\nname = \"raw\"\ntcp_to = \"{target}\"\n"),
        5000,
        "",
        &[
            ("NOTIFY_SOCKET", notify.path.display().to_string()),
            ("WATCHDOG_USEC", "1000000".to_owned()),
        ],
    );
    let ready_doc = agent.ready().await;
    let ready =
        tokio::task::block_in_place(|| notify.wait_for("READY=1", 1, WAIT)).expect("READY=1");
    let written = std::fs::metadata(&agent.ready)
        .and_then(|m| m.modified())
        .expect("ready file mtime");
    assert!(ready.wall >= written, "READY=1 came before the ready file");
    tokio::task::block_in_place(|| notify.wait_for("WATCHDOG=1", 3, WAIT))
        .expect("3 WATCHDOG=1 pings");

    // A connection spliced through the agent, then SIGTERM: the connection keeps working
    // until the client ends it, and only then does the agent exit.
    let port = lease_port(&ready_doc, "raw");
    let start = Instant::now();
    let mut c = loop {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)).await {
            let mut buf = [0u8; 4];
            if c.write_all(b"ping").await.is_ok()
                && tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut buf))
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                break c;
            }
        }
        assert!(start.elapsed() < WAIT, "no echo through the lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.proc.0.id()).expect("pid"));
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    tokio::task::block_in_place(|| notify.wait_for("STOPPING=1", 1, WAIT)).expect("STOPPING=1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        agent.proc.0.try_wait().expect("poll").is_none(),
        "the agent exited with a connection still spliced"
    );
    c.write_all(b"still here")
        .await
        .expect("write after SIGTERM");
    let mut buf = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
        .await
        .expect("echo after SIGTERM in time")
        .expect("echo after SIGTERM");
    assert_eq!(&buf, b"still here");
    drop(c);
    let exited = loop {
        if let Some(status) = agent.proc.0.try_wait().expect("poll") {
            break status;
        }
        assert!(
            sent.elapsed() < WAIT,
            "the agent did not exit after its last connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exited.success(), "{exited}");
    eprintln!(
        "MEASURED agent exit {:?} after SIGTERM (connection closed after about 300 ms)",
        sent.elapsed()
    );
}

/// Review H1, the agent's side: the agent splices with the same engine as the relay, so
/// stalled public readers of one lease (an endless download, `SO_RCVBUF=4096`, never read)
/// must not stop another lease of the same agent. The agent runs with a four-pipe budget
/// and short stall and write-stall timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_readers_of_one_lease_do_not_stop_another_lease_of_the_agent() {
    for backend in common::io_backends() {
        eprintln!("--- agent io backend {backend}");
        stalled_readers_against_the_agent(backend).await;
    }
}

async fn stalled_readers_against_the_agent(backend: &str) {
    const ATTACKERS: usize = 30;
    const PIPE_BUDGET_BYTES: f64 = 262_144.0;
    let pki = Pki::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        (lo, hi),
    )
    .await;
    let (zeros, _zeros_task) = common::zeros_target().await;
    let (echo, _echo_task) = common::echo_server().await;
    let mut agent = start_agent(
        &pki,
        &relay.addrs,
        &format!(
            "[[lease]]\nname = \"download\"\ntcp_to = \"{zeros}\"\n\
             [[lease]]\nname = \"echo\"\ntcp_to = \"{echo}\"\n\
             [splice]\nio_backend = \"{backend}\"\npipe_budget_bytes = 262144\n\
             max_pipe_bytes = 65536\nstall_timeout_ms = 500\nwrite_stall_timeout_ms = 5000\n"
        ),
    );
    let ready = agent.ready().await;
    let download = SocketAddr::from(([127, 0, 0, 1], lease_port(&ready, "download")));
    let echo_port = lease_port(&ready, "echo");
    let metrics_addr = ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let before = echo_bytes(echo_port, 1024, 1)
        .await
        .unwrap_or_else(|e| panic!("{backend}: echo lease before the attack: {e}"));
    eprintln!("{backend}: echo lease 1 KiB before the attack: {before:?}");

    let mut attackers = Vec::with_capacity(ATTACKERS);
    for _ in 0..ATTACKERS {
        attackers.push(common::stalled_reader(download).await);
    }
    let attack_started = Instant::now();
    // Enough stalled pairs in the agent's engine to pin its four pipes many times over.
    loop {
        let text = http_get(&metrics_addr, "/metrics");
        let active = metric(&text, "outrelay_agent_splice_pairs_active");
        if active >= 8.0 {
            break;
        }
        assert!(
            attack_started.elapsed() < WAIT,
            "{backend}: only {active} stalled pairs in the agent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = http_get(&metrics_addr, "/metrics");
    eprintln!(
        "{backend}: {:?} into the attack: {} pairs, pipe held {} B, spill held {} B, \
         copy active {}",
        attack_started.elapsed(),
        metric(&during, "outrelay_agent_splice_pairs_active"),
        metric(&during, "outrelay_agent_pipe_held_bytes"),
        metric(&during, "outrelay_agent_splice_spill_held_bytes"),
        metric(&during, "outrelay_agent_splice_copy_active"),
    );
    let small = echo_bytes(echo_port, 1024, 2)
        .await
        .unwrap_or_else(|e| panic!("{backend}: echo lease 1 KiB under attack: {e}"));
    let bulk = echo_bytes(echo_port, 1024 * 1024, 3)
        .await
        .unwrap_or_else(|e| panic!("{backend}: echo lease 1 MiB under attack: {e}"));
    eprintln!(
        "{backend}: echo lease under attack: 1 KiB in {small:?}, 1 MiB each way in {bulk:?} \
         (hashes equal)"
    );

    // The agent cuts the attackers' pairs at its write-stall timeout, counted.
    let series = "outrelay_agent_splice_closed_total{reason=\"write_stall\"}";
    let stalls = loop {
        let text = http_get(&metrics_addr, "/metrics");
        let n = metric(&text, series);
        if n > 0.0 {
            break n;
        }
        assert!(
            attack_started.elapsed() < 2 * WAIT,
            "{backend}: no pair closed write_stall:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after = http_get(&metrics_addr, "/metrics");
    let pipe_held = metric(&after, "outrelay_agent_pipe_held_bytes");
    eprintln!(
        "{backend}: {stalls} pairs closed write_stall after {:?}; pipe held {pipe_held} B, \
         {} spills",
        attack_started.elapsed(),
        metric(&after, "outrelay_agent_splice_spills_total")
    );
    for text in [&during, &after] {
        let held = metric(text, "outrelay_agent_pipe_held_bytes");
        assert!(
            held <= PIPE_BUDGET_BYTES,
            "{backend}: pipe bytes held {held} above the budget"
        );
    }
    drop(attackers);
    drop(relay);
}

/// Sends `len` pseudo-random bytes (seeded) through the echo lease on `port`, half-closes,
/// reads the echo to EOF and compares hashes; returns how long it took.
async fn echo_bytes(port: u16, len: usize, seed: u64) -> Result<Duration, String> {
    let started = Instant::now();
    let attempt = async {
        let c = loop {
            match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(format!("connect: {e}")),
            }
        };
        let (mut r, mut w) = c.into_split();
        let mut x = seed | 1;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        let sent = Sha256::digest(&data).to_vec();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await?;
            w.shutdown().await
        });
        let mut back = Vec::with_capacity(len);
        r.read_to_end(&mut back)
            .await
            .map_err(|e| format!("read: {e}"))?;
        writer
            .await
            .map_err(|e| format!("writer: {e}"))?
            .map_err(|e| format!("write: {e}"))?;
        if back.len() != len || Sha256::digest(&back).to_vec() != sent {
            return Err(format!("{} bytes back, hash equal: false", back.len()));
        }
        Ok(())
    };
    match tokio::time::timeout(WAIT, attempt).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no echo within {WAIT:?}")),
    }
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(100);
    Duration::from_micros(ticks * 1_000_000 / per_s)
}

/// How many reverse sessions per second the agent establishes (handshake included) when every
/// public connection consumes one, and its CPU per session. Ignored by default (it loads the
/// machine for a few seconds); run it with
/// `cargo nextest run --release -p outrelay-agent --test e2e --run-ignored only -E 'test(session_rate)' --no-capture`.
/// `RATE_PIN` (agent alone on CPU 1, relay and clients on CPU 0), `RATE_SECS` (default 5), `RATE_CONC` (public clients at once, 32), `RATE_POOL_MAX` (8),
/// `RATE_READY_QUEUE_MAX` (the relay's `ingress.ready_queue_max`, 8), `RATE_SPLICE_WORKERS` (the
/// agent's `[splice] workers`, 2), `RATE_IO_BACKEND` (its `io_backend`, auto) and
/// `OUTRELAY_AGENT_BIN` (another agent build) vary it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: loads the machine for several seconds"]
async fn session_rate_through_a_tcp_lease() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (secs, conc, pool_max, ready_max) = (
        env("RATE_SECS", 5),
        env("RATE_CONC", 32),
        env("RATE_POOL_MAX", 8),
        env("RATE_READY_QUEUE_MAX", 8),
    );
    let workers = env("RATE_SPLICE_WORKERS", 2);
    let backend = std::env::var("RATE_IO_BACKEND").unwrap_or_else(|_| "auto".into());
    let pki = Pki::new();
    let relay = start_relay_in(
        pki.path(),
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
        1000,
        &format!("ready_queue_max = {ready_max}\n"),
    )
    .await;
    let (target, _echo) = common::echo_server().await;
    let mut agent = spawn_agent_sized(
        &pki,
        &[relay.addrs.quic],
        &format!(
            "[[lease]]\nname = \"rate\"\ntcp_to = \"{target}\"\n[splice]\nworkers = {workers}\n"
        ),
        5000,
        "",
        &[],
        (2, usize::try_from(pool_max).expect("pool max")),
    );
    let ready = agent.ready().await;
    let port = lease_port(&ready, "rate");
    let metrics = ready["metrics"].as_str().expect("metrics").to_owned();
    // Warm up until the lease answers.
    let start = Instant::now();
    while let Err(e) = echo_once(port).await {
        assert!(start.elapsed() < WAIT, "lease never answered: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened = |text: &str| metric(text, "outrelay_agent_reverse_sessions_opened_total");
    let opened_before = opened(&http_get(&metrics, "/metrics"));
    let (agent_pid, relay_pid) = (agent.proc.0.id(), relay.proc.0.id());
    if std::env::var_os("RATE_PIN").is_some() {
        // The agent alone on CPU 1; the relay and this process (clients, echo target) on CPU 0.
        let me = std::process::id();
        for (cpu, pid) in [("1", agent_pid), ("0", relay_pid), ("0", me)] {
            let pinned = Command::new("taskset")
                .args(["-a", "-pc", cpu, &pid.to_string()])
                .stdout(Stdio::null())
                .status();
            assert!(pinned.is_ok_and(|s| s.success()), "taskset {pid}");
        }
    }
    let (agent_cpu, relay_cpu) = (cpu_time(agent_pid), cpu_time(relay_pid));
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..conc {
        clients.spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut took_us: Vec<u32> = Vec::new();
            while Instant::now() < until {
                let begun = Instant::now();
                let one = async {
                    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
                    s.write_all(b"x").await?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await?;
                    std::io::Result::Ok(())
                };
                match tokio::time::timeout(CLOSE_BOUND, one).await {
                    Ok(Ok(())) => {
                        ok += 1;
                        took_us
                            .push(u32::try_from(begun.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed, took_us)
        });
    }
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut took_us = Vec::new();
    while let Some(r) = clients.join_next().await {
        let (o, f, t) = r.expect("client task");
        ok += o;
        failed += f;
        took_us.extend(t);
    }
    took_us.sort_unstable();
    let pct = |p: usize| took_us.get(took_us.len() * p / 100).copied().unwrap_or(0);
    let took = started.elapsed().as_secs_f64();
    let agent_us = (cpu_time(agent_pid) - agent_cpu).as_secs_f64() * 1e6;
    let relay_us = (cpu_time(relay_pid) - relay_cpu).as_secs_f64() * 1e6;
    let sessions = opened(&http_get(&metrics, "/metrics")) - opened_before;
    let ok_f = ok as f64;
    eprintln!(
        "MEASURED c={conc} pool.max={pool_max} ready_queue_max={ready_max} agent workers={workers} io={backend} {secs}s: {:.0} conn/s ({ok} ok, {failed} failed), \
         {:.0} sessions_opened/s, agent CPU {:.1} us/session, relay CPU {:.1} us/conn, \
         relay + agent {:.1} us/conn; connect to echo p50 {} us p99 {} us",
        ok_f / took,
        sessions / took,
        agent_us / sessions.max(1.0),
        relay_us / ok_f.max(1.0),
        (agent_us + relay_us) / ok_f.max(1.0),
        pct(50),
        pct(99),
    );
    if std::env::var_os("RATE_DUMP").is_some() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let relay_metrics = relay.addrs.metrics.expect("relay metrics").to_string();
        for (who, addr) in [
            ("agent", metrics.as_str()),
            ("relay", relay_metrics.as_str()),
        ] {
            for line in http_get(addr, "/metrics").lines() {
                let interesting = [
                    "session", "claim", "reverse", "ingress", "failed", "dropped",
                ];
                if !line.starts_with('#')
                    && interesting.iter().any(|k| line.contains(k))
                    && !line.ends_with(" 0")
                {
                    eprintln!("{who}: {line}");
                }
            }
        }
    }
    assert!(ok > 0, "no public connection completed");
    drop(relay);
}

/// Review M12, real binaries: agent P's lease dies with its connection (kill -9); within the
/// reservation agent X of the same tenant asks for the same name and is refused
/// (`hostname_conflict` / `name_taken`, counted by the relay, X never ready); P, back, gets
/// the same name and the same (sticky) public port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_name_and_its_port_stay_reserved_to_the_agent_that_held_them() {
    const AGENT_X: &str = "outrelay://test/agent/00000000-0000-4000-8000-0000000000b1";
    const CONFLICTS: &str = "outrelay_relay_lease_errors_total{code=\"hostname_conflict\"}";
    let pki = Pki::new();
    let relay = start_relay(
        &pki,
        "127.0.0.1:0",
        free_tcp_port(),
        "127.0.0.1:0",
        free_port_range(),
    )
    .await;
    let metrics = relay.addrs.metrics.expect("relay metrics").to_string();
    let relay_metric = |series: &str| metric(&http_get(&metrics, "/metrics"), series);
    let until = |what: &str, cond: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (target, _echo) = common::echo_server().await;
    let shop = format!("[[lease]]\nname = \"shop\"\ntcp_to = \"{target}\"\n");
    let mut p = start_agent(&pki, &relay.addrs, &shop);
    let ready = p.ready().await;
    let port = lease_port(&ready, "shop");

    // P dies without a goodbye: the relay ends its lease when the connection times out.
    drop(p);
    until("P's lease ended", &|| {
        relay_metric("outrelay_relay_leases_live ") == 0.0
    });

    // X: same tenant, another identity, the same lease name (its own certificate).
    let path = |f: &str| pki.path().join(f);
    let p_files = (
        std::fs::read(path("agent.pem")).expect("P cert"),
        std::fs::read(path("agent-key.pem")).expect("P key"),
    );
    let x_leaf = pki.ca.leaf(
        AGENT_X,
        &[],
        Some(AGENT_X),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    );
    std::fs::write(path("agent.pem"), &x_leaf.cert_pem).expect("X cert");
    std::fs::write(path("agent-key.pem"), &x_leaf.key_pem).expect("X key");
    let before = relay_metric(CONFLICTS);
    let x = start_agent(&pki, &relay.addrs, &shop);
    until("X refused", &|| relay_metric(CONFLICTS) > before);
    assert!(!x.ready.exists(), "X was granted P's reserved name");
    drop(x);

    // P comes back within the reservation: same name, same port, and it routes.
    std::fs::write(path("agent.pem"), &p_files.0).expect("P cert");
    std::fs::write(path("agent-key.pem"), &p_files.1).expect("P key");
    let mut p = start_agent(&pki, &relay.addrs, &shop);
    let ready = p.ready().await;
    assert_eq!(
        lease_port(&ready, "shop"),
        port,
        "the sticky port moved: {ready}"
    );
    let start = Instant::now();
    while let Err(e) = echo_once(port).await {
        assert!(
            start.elapsed() < WAIT,
            "P's lease does not route again: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(p);
}
