//! Public ingress end to end: the REAL `outrelay-relay` binary as a process, a test agent in
//! this process (QUIC + ORP with an rcgen certificate, reverse sessions over TCP), and real
//! public clients: `curl` and `openssl s_client` through SNI passthrough, and 100 MiB each way
//! through a TCP lease port with SHA-256 checked on both ends and the half-close preserved.
//!
//! Assertions are on bytes and hashes only; durations are logged, never asserted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outrelay_proto::frame::{Decoded, Frame, ORP_ALPN, decode};
use outrelay_proto::orp;
use outrelay_proto::reverse::{self, EXPORTER_KEY_BYTES, EXPORTER_LABEL, LeaseId, Marker};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const PUBLIC_URL: &str = "https://relay.outrelay.test";
const DEMO_HOST: &str = "demo.relay.outrelay.test";
const AGENT: &str = "outrelay://test/agent/00000000-0000-4000-8000-0000000000e2";
const RELAY: &str = "outrelay://test/relay/r1";
/// Bound on every single wait (generous: the machine may be shared).
const WAIT: Duration = Duration::from_secs(20);
/// Reverse sessions the test agent keeps open per lease.
const SESSIONS: usize = 4;
/// Bytes sent each way through the TCP lease.
const BULK_BYTES: u64 = 100 * 1024 * 1024;
/// The body the in-process TLS target serves.
const BODY: &str = "hello from demo through the outrelay relay\n";

// ---------- PKI ----------

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    pem: String,
}

struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "outrelay e2e test CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA cert");
        Ca {
            cert: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf with `cn`, DNS SANs `dns`, an optional URI SAN and the given EKUs.
    fn leaf(
        &self,
        cn: &str,
        dns: &[&str],
        uri: Option<&str>,
        eku: Vec<ExtendedKeyUsagePurpose>,
    ) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::new(dns.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .expect("leaf params");
        if let Some(uri) = uri {
            p.subject_alt_names
                .push(SanType::URI(uri.try_into().expect("URI SAN")));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = eku;
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

// ---------- the relay process ----------

/// The running relay; killed (and reaped) on drop.
struct Relay {
    child: Child,
    quic: SocketAddr,
    reverse: SocketAddr,
    public_tls: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_of(info: &serde_json::Value, key: &str) -> SocketAddr {
    info[key]
        .as_str()
        .unwrap_or_else(|| panic!("ready file names {key}: {info}"))
        .parse()
        .expect("socket address in the ready file")
}

/// Writes the relay's PKI and config into a temp dir, starts the binary and waits for its
/// ready file. `leases` is the `[leases]` table body; `backend` forces `--io-backend`.
async fn start_relay(ca: &Ca, leases: &str, backend: Option<&str>) -> Relay {
    let dir = tempfile::tempdir().expect("temp dir");
    let relay_leaf = ca.leaf(
        "relay r1",
        &["localhost"],
        Some(RELAY),
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    std::fs::write(dir.path().join("relay.pem"), &relay_leaf.cert_pem).expect("write cert");
    std::fs::write(dir.path().join("relay-key.pem"), &relay_leaf.key_pem).expect("write key");
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).expect("write ca");
    // The admin socket lives in the temp dir, never in /run.
    let admin = dir.path().join("admin.sock").display().to_string();
    let config = format!(
        "public_url = \"{PUBLIC_URL}\"\nworkers = 2\n\
         [tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n\
         [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"127.0.0.1:0\"\n\
         metrics = \"\"\nlease_bind_ip = \"127.0.0.1\"\n\
         admin_socket = \"{admin}\"\n\
         [leases]\nttl_default_s = 60\nttl_cap_s = 300\njanitor_interval_ms = 200\n{leases}\n\
         [ingress]\nclaim_timeout_ms = 5000\nkeepalive_interval_ms = 1000\n\
         lease_sync_interval_ms = 20\nreverse_handshake_deadline_ms = 5000\n\
         marker_write_deadline_ms = 2000\n"
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config).expect("write config");
    let ready = dir.path().join("ready.json");
    let started = Instant::now();
    let mut cmd = Command::new(PathBuf::from(env!("CARGO_BIN_EXE_outrelay-relay")));
    cmd.arg("--config")
        .arg(&path)
        .arg("--ready-file")
        .arg(&ready)
        .arg("--log")
        .arg("warn")
        .stdin(Stdio::null());
    if let Some(backend) = backend {
        cmd.arg("--io-backend").arg(backend);
    }
    let child = cmd.spawn().expect("start outrelay-relay");
    let mut relay = Relay {
        child,
        quic: "0.0.0.0:0".parse().expect("placeholder"),
        reverse: "0.0.0.0:0".parse().expect("placeholder"),
        public_tls: "0.0.0.0:0".parse().expect("placeholder"),
        _dir: dir,
    };
    while !ready.exists() {
        if let Some(status) = relay.child.try_wait().expect("poll relay") {
            panic!("relay exited before it was ready: {status}");
        }
        assert!(started.elapsed() < WAIT, "no ready file within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).expect("read ready file"))
            .expect("ready file is JSON");
    relay.quic = addr_of(&info, "quic");
    relay.reverse = addr_of(&info, "reverse");
    relay.public_tls = addr_of(&info, "public_tls");
    eprintln!("relay ready after {:?}: {info}", started.elapsed());
    relay
}

/// A free range of 10 TCP ports on 127.0.0.1 in 20000..30000 (below the ephemeral range).
fn free_port_range() -> (u16, u16) {
    let offset = u16::try_from(std::process::id() % 997).expect("small");
    for i in 0..1000u16 {
        let lo = 20000 + ((offset + i) % 1000) * 10;
        let all_free = (lo..lo + 10).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return (lo, lo + 9);
        }
    }
    panic!("no free 10-port range in 20000..30000");
}

// ---------- the test agent ----------

/// Counts of claimed reverse sessions, by marker.
#[derive(Default)]
struct Claims {
    tls: AtomicUsize,
    tcp: AtomicUsize,
}

struct Agent {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    workers: Vec<JoinHandle<()>>,
    claims: Arc<Claims>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for w in &self.workers {
            w.abort();
        }
    }
}

impl Agent {
    /// Connects with an agent certificate (clientAuth only), opens the control stream and
    /// says HELLO.
    async fn connect(relay: &Relay, ca: &Ca) -> Agent {
        let leaf = ca.leaf(
            AGENT,
            &[],
            Some(AGENT),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert.clone()).expect("CA root");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_client_auth_cert(leaf.chain, leaf.key)
            .expect("client cert");
        tls.alpn_protocols = vec![ORP_ALPN.as_bytes().to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(1)));
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport));
        let mut endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        endpoint.set_default_client_config(client);
        let conn = tokio::time::timeout(
            WAIT,
            endpoint
                .connect(relay.quic, "localhost")
                .expect("connect")
                .into_future(),
        )
        .await
        .expect("QUIC connect in time")
        .expect("QUIC handshake");
        let (send, recv) = conn.open_bi().await.expect("control stream");
        let mut agent = Agent {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            buf: Vec::new(),
            workers: Vec::new(),
            claims: Arc::new(Claims::default()),
        };
        let ack = agent
            .call(Frame::Hello(orp::Hello {
                protocol_version: "orp/1".to_owned(),
                agent_uri: AGENT.to_owned(),
                capabilities: vec!["leases".to_owned()],
            }))
            .await;
        assert!(matches!(ack, Frame::HelloAck(_)), "HELLO_ACK, got {ack:?}");
        agent
    }

    async fn call(&mut self, frame: Frame) -> Frame {
        let bytes = frame.to_vec().expect("encode");
        self.send.write_all(&bytes).await.expect("send frame");
        tokio::time::timeout(WAIT, async {
            loop {
                if let Decoded::Frame { frame, used } = decode(&self.buf).expect("relay frame") {
                    let f = Frame::decode(&frame).expect("relay payload");
                    self.buf.drain(..used);
                    return f;
                }
                let mut chunk = [0u8; 4096];
                match self.recv.read(&mut chunk).await.expect("control stream") {
                    Some(n) => self.buf.extend_from_slice(&chunk[..n]),
                    None => panic!("control stream finished"),
                }
            }
        })
        .await
        .expect("answer in time")
    }

    /// LEASE_REGISTER, expecting LEASE_GRANT.
    async fn register(&mut self, name: &str, tls: bool, tcp: bool) -> orp::LeaseGrant {
        let answer = self
            .call(Frame::LeaseRegister(orp::LeaseRegister {
                name: name.to_owned(),
                tls,
                tcp,
                ttl_s: 300,
                request_id: 1,
                ..orp::LeaseRegister::default()
            }))
            .await;
        match answer {
            Frame::LeaseGrant(g) => g,
            other => panic!("expected LEASE_GRANT for {name}, got {other:?}"),
        }
    }

    /// Keeps [`SESSIONS`] reverse sessions of the lease open; each claimed one is piped to
    /// `target` (after its marker byte) and replaced by a fresh one.
    fn serve_lease(&mut self, relay: &Relay, grant: &orp::LeaseGrant, target: SocketAddr) {
        let lease = LeaseId::from_slice(&grant.lease_id).expect("16-byte lease id");
        let mut key = [0u8; EXPORTER_KEY_BYTES];
        self.conn
            .export_keying_material(&mut key, EXPORTER_LABEL, &grant.lease_id)
            .expect("exporter");
        for _ in 0..SESSIONS {
            let claims = self.claims.clone();
            let reverse_addr = relay.reverse;
            self.workers.push(tokio::spawn(async move {
                session_worker(reverse_addr, lease, key, target, claims).await;
            }));
        }
    }
}

/// One reverse-session slot: open, authenticate, wait for the claim, hand the session to a
/// piping task, repeat.
async fn session_worker(
    reverse_addr: SocketAddr,
    lease: LeaseId,
    key: [u8; EXPORTER_KEY_BYTES],
    target: SocketAddr,
    claims: Arc<Claims>,
) {
    loop {
        let Some((session, marker)) = open_and_wait(reverse_addr, lease, &key).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match marker {
            Marker::Tls => claims.tls.fetch_add(1, Ordering::Relaxed),
            Marker::Tcp => claims.tcp.fetch_add(1, Ordering::Relaxed),
            Marker::KeepAlive => unreachable!("keep-alives are skipped"),
        };
        tokio::spawn(pipe_to_target(session, target, marker));
    }
}

/// Handshake, then read until a claim marker. `None`: the session failed (retry).
async fn open_and_wait(
    reverse_addr: SocketAddr,
    lease: LeaseId,
    key: &[u8; EXPORTER_KEY_BYTES],
) -> Option<(TcpStream, Marker)> {
    let mut s = TcpStream::connect(reverse_addr).await.ok()?;
    s.set_nodelay(true).ok()?;
    s.write_all(&reverse::encode_preamble(&lease)).await.ok()?;
    let mut nonce = [0u8; reverse::NONCE_BYTES];
    s.read_exact(&mut nonce).await.ok()?;
    s.write_all(&reverse::compute_mac(key, &nonce, &lease))
        .await
        .ok()?;
    loop {
        let byte = s.read_u8().await.ok()?;
        match Marker::from_byte(byte) {
            Some(Marker::KeepAlive) => continue,
            Some(m) => return Some((s, m)),
            None => {
                eprintln!("agent: unexpected byte {byte:#04x} on an idle reverse session");
                return None;
            }
        }
    }
}

async fn pipe_to_target(mut session: TcpStream, target: SocketAddr, marker: Marker) {
    let started = Instant::now();
    let mut t = match TcpStream::connect(target).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agent: cannot reach target {target}: {e}");
            return;
        }
    };
    let _ = t.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut session, &mut t).await {
        Ok((up, down)) => eprintln!(
            "agent: {marker:?} session done in {:?}: {up} bytes to target, {down} back",
            started.elapsed()
        ),
        Err(e) => eprintln!("agent: {marker:?} session ended with {e}"),
    }
}

// ---------- targets ----------

/// An in-process TLS server for `demo` that answers any HTTP request with [`BODY`].
async fn tls_target(ca: &Ca) -> (SocketAddr, JoinHandle<()>) {
    let leaf = ca.leaf(
        DEMO_HOST,
        &[DEMO_HOST],
        None,
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    );
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(leaf.chain, leaf.key)
        .expect("server cert");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = listener.local_addr().expect("target addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut req = Vec::new();
                let mut chunk = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&chunk[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{BODY}",
                    BODY.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A TCP echo target for ONE connection: echoes everything, and after the client's FIN writes
/// the SHA-256 of what it received (32 bytes) and closes. The task yields (bytes received,
/// their SHA-256).
async fn echo_target() -> (SocketAddr, JoinHandle<(u64, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let task = tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept echo");
        let _ = s.set_nodelay(true);
        let (mut r, mut w) = s.into_split();
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).await.expect("echo read");
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
            w.write_all(&buf[..n]).await.expect("echo write");
        }
        let digest = hasher.finalize().to_vec();
        // Written after the client's FIN: proves the way back still works after a half-close.
        w.write_all(&digest).await.expect("trailer");
        w.shutdown().await.expect("echo fin");
        (total, digest)
    });
    (addr, task)
}

// ---------- helpers ----------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `bin arg` runs and exits 0.
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

/// Relay, agent with the TLS lease `demo` served by the in-process TLS target.
async fn demo_setup() -> (Ca, Relay, Agent, tempfile::TempDir, JoinHandle<()>) {
    let ca = Ca::new();
    let relay = start_relay(&ca, "", None).await;
    let (target, target_task) = tls_target(&ca).await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let grant = agent.register("demo", true, false).await;
    assert_eq!(grant.hostname, DEMO_HOST);
    agent.serve_lease(&relay, &grant, target);
    let files = tempfile::tempdir().expect("temp dir");
    std::fs::write(files.path().join("ca.pem"), &ca.pem).expect("write ca");
    (ca, relay, agent, files, target_task)
}

async fn eventually_claimed(what: &str, count: impl Fn() -> usize) {
    let start = Instant::now();
    while count() == 0 {
        assert!(start.elapsed() < WAIT, "{what}: no claim within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ca_file(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

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
fn io_backends() -> Vec<&'static str> {
    let mut backends = vec!["epoll"];
    if outrelay_io::Backend::probe() == outrelay_io::Backend::Uring {
        backends.push("io_uring");
    } else {
        eprintln!("SKIP io_uring backend: this kernel or sandbox refuses io_uring_setup");
    }
    backends
}
