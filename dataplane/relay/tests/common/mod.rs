//! The relay's end-to-end harness, shared by every test file that runs the REAL
//! `outrelay-relay` binary: a test PKI ([`Ca`]), the relay process ([`start_relay_with`],
//! [`Relay`]: ready file, `/metrics` scrapes), an in-process test agent ([`Agent`]: QUIC + ORP,
//! reverse sessions piped to a target) and targets (TLS, echo). Each file uses what it needs.
#![allow(dead_code, unreachable_pub)]

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

pub const PUBLIC_URL: &str = "https://relay.outrelay.test";
pub const DEMO_HOST: &str = "demo.relay.outrelay.test";
/// The root host (`PUBLIC_URL`'s host): served by the relay itself (`/healthz` only).
pub const ROOT_HOST: &str = "relay.outrelay.test";
pub const AGENT: &str = "outrelay://test/agent/00000000-0000-4000-8000-0000000000e2";
pub const RELAY: &str = "outrelay://test/relay/r1";
/// Bound on every single wait (generous: the machine may be shared).
pub const WAIT: Duration = Duration::from_secs(20);
/// Reverse sessions the test agent keeps open per lease.
pub const SESSIONS: usize = 4;
/// Bytes sent each way through the TCP lease.
pub const BULK_BYTES: u64 = 100 * 1024 * 1024;
/// The body the in-process TLS target serves.
pub const BODY: &str = "hello from demo through the outrelay relay\n";

// ---------- PKI ----------

pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub cert: CertificateDer<'static>,
    pub pem: String,
    /// The CA key (PEM), for a controller that signs with this CA.
    pub key_pem: String,
}

pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new() -> Ca {
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
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf with `cn`, DNS SANs `dns`, an optional URI SAN and the given EKUs.
    pub fn leaf(
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
pub struct Relay {
    pub child: Child,
    pub quic: SocketAddr,
    pub reverse: SocketAddr,
    pub public_tls: SocketAddr,
    /// `/metrics` address.
    pub metrics: String,
    pub opts: Opts,
    pub dir: tempfile::TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to start a relay.
#[derive(Clone, Default)]
pub struct Opts {
    /// The `[leases]` table body.
    pub leases: String,
    /// More `[ingress]` keys.
    pub ingress: String,
    /// `ingress.claim_timeout_ms` (default 5000).
    pub claim_timeout_ms: Option<u64>,
    /// Whole tables appended to the config (e.g. `[pipes]`).
    pub tables: String,
    /// `--io-backend`.
    pub backend: Option<String>,
    /// Run as `nobody` through `setpriv` (the caller has probed that it can).
    pub unprivileged: bool,
    /// Log at info level into `relay.log` in the temp dir instead of the test's stderr.
    pub log_file: bool,
    /// Extra environment (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
}

pub fn addr_of(info: &serde_json::Value, key: &str) -> SocketAddr {
    info[key]
        .as_str()
        .unwrap_or_else(|| panic!("ready file names {key}: {info}"))
        .parse()
        .expect("socket address in the ready file")
}

/// Writes the relay's PKI and config into a temp dir, starts the binary and waits for its
/// ready file. `leases` is the `[leases]` table body; `backend` forces `--io-backend`.
pub async fn start_relay(ca: &Ca, leases: &str, backend: Option<&str>) -> Relay {
    start_relay_with(
        ca,
        Opts {
            leases: leases.to_owned(),
            backend: backend.map(str::to_owned),
            ..Opts::default()
        },
    )
    .await
}

/// [`start_relay`] with every option. The relay also gets a root-host certificate
/// (`[public_tls]`, for `relay.outrelay.test`) and `/metrics` on loopback.
pub async fn start_relay_with(ca: &Ca, opts: Opts) -> Relay {
    let dir = relay_dir(ca, &opts);
    spawn_relay(dir, opts).await
}

/// The temp dir [`start_relay_with`] runs the relay from: PKI and `relay.toml` for `opts`.
pub fn relay_dir(ca: &Ca, opts: &Opts) -> tempfile::TempDir {
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
    let root_leaf = ca.leaf(
        ROOT_HOST,
        &[ROOT_HOST],
        None,
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    );
    for (name, text) in [
        ("relay.pem", &relay_leaf.cert_pem),
        ("relay-key.pem", &relay_leaf.key_pem),
        ("root.pem", &root_leaf.cert_pem),
        ("root-key.pem", &root_leaf.key_pem),
        ("ca.pem", &ca.pem),
    ] {
        std::fs::write(dir.path().join(name), text).expect("write PKI");
    }
    // The admin socket lives in the temp dir, never in /run (none for an unprivileged relay).
    let admin = if opts.unprivileged {
        String::new()
    } else {
        dir.path().join("admin.sock").display().to_string()
    };
    let config = format!(
        "public_url = \"{PUBLIC_URL}\"\nworkers = 2\n\
         [tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n\
         [public_tls]\ncert = \"root.pem\"\nkey = \"root-key.pem\"\n\
         [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"127.0.0.1:0\"\n\
         metrics = \"127.0.0.1:0\"\nlease_bind_ip = \"127.0.0.1\"\n\
         admin_socket = \"{admin}\"\n\
         [leases]\nttl_default_s = 60\nttl_cap_s = 300\njanitor_interval_ms = 200\n{}\n\
         [ingress]\nclaim_timeout_ms = {claim}\nkeepalive_interval_ms = 1000\n\
         lease_sync_interval_ms = 20\nreverse_handshake_deadline_ms = 5000\n\
         marker_write_deadline_ms = 2000\n{}\n{}\n",
        opts.leases,
        opts.ingress,
        opts.tables,
        claim = opts.claim_timeout_ms.unwrap_or(5000),
    );
    std::fs::write(dir.path().join("relay.toml"), config).expect("write config");
    if opts.unprivileged {
        // nobody reads every file and writes its ready file here.
        use std::os::unix::fs::PermissionsExt;
        for entry in std::fs::read_dir(dir.path()).expect("list dir") {
            let path = entry.expect("entry").path();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                .expect("chmod 0644");
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 0755");
        nix::unistd::chown(
            dir.path(),
            Some(nix::unistd::Uid::from_raw(NOBODY)),
            Some(nix::unistd::Gid::from_raw(NOBODY)),
        )
        .expect("chown the temp dir to nobody");
    }
    dir
}

/// The uid and gid of `nobody`.
pub const NOBODY: u32 = 65534;

/// Starts the binary on the config in `dir` and waits for its ready file.
pub async fn spawn_relay(dir: tempfile::TempDir, opts: Opts) -> Relay {
    let path = dir.path().join("relay.toml");
    let ready = dir.path().join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let started = Instant::now();
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_outrelay-relay"));
    let mut cmd = if opts.unprivileged {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&binary);
        c
    } else {
        Command::new(&binary)
    };
    cmd.arg("--config")
        .arg(&path)
        .arg("--ready-file")
        .arg(&ready)
        .arg("--log")
        .arg(if opts.log_file { "info" } else { "warn" })
        .stdin(Stdio::null());
    cmd.envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if opts.log_file {
        let log = std::fs::File::create(dir.path().join("relay.log")).expect("create relay.log");
        cmd.stderr(log);
    }
    if let Some(backend) = &opts.backend {
        cmd.arg("--io-backend").arg(backend);
    }
    let child = cmd.spawn().expect("start outrelay-relay");
    let mut relay = Relay {
        child,
        quic: "0.0.0.0:0".parse().expect("placeholder"),
        reverse: "0.0.0.0:0".parse().expect("placeholder"),
        public_tls: "0.0.0.0:0".parse().expect("placeholder"),
        metrics: String::new(),
        opts,
        dir,
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
    relay.metrics = addr_of(&info, "metrics").to_string();
    eprintln!("relay ready after {:?}: {info}", started.elapsed());
    relay
}

impl Relay {
    /// Kills the relay (SIGKILL: nothing is saved) and starts it again on the same config.
    pub async fn restart(self) -> Relay {
        let mut me = self;
        let _ = me.child.kill();
        let _ = me.child.wait();
        let dir = tempfile::tempdir().expect("placeholder dir");
        let dir = std::mem::replace(&mut me.dir, dir);
        let opts = me.opts.clone();
        drop(me);
        spawn_relay(dir, opts).await
    }

    /// One scrape of `/metrics`.
    pub async fn scrape(&self) -> String {
        let mut c = TcpStream::connect(&self.metrics)
            .await
            .expect("connect metrics");
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut body = String::new();
        c.read_to_string(&mut body).await.expect("response");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        body
    }

    /// The value of the sample `series` (name with labels, exactly as rendered); 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        sample(&self.scrape().await, series)
    }

    /// The relay's resident set size (`VmRSS` of `/proc/<pid>/status`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kb * 1024
    }

    /// Waits until `series` exceeds `above`.
    pub async fn metric_above(&self, series: &str, above: f64) -> f64 {
        let start = Instant::now();
        loop {
            let v = self.metric(series).await;
            if v > above {
                return v;
            }
            assert!(start.elapsed() < WAIT, "{series} stayed at {v} (≤ {above})");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The value of `series` in a Prometheus text body; 0 if absent.
pub fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A 10-port lease range no concurrent test process holds (see `outrelay_testkit`).
pub fn free_port_range() -> (u16, u16) {
    outrelay_testkit::claim_port_range()
}

// ---------- the test agent ----------

/// Counts of claimed reverse sessions, by marker.
#[derive(Default)]
pub struct Claims {
    pub tls: AtomicUsize,
    pub tcp: AtomicUsize,
}

pub struct Agent {
    pub _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub buf: Vec<u8>,
    pub workers: Vec<JoinHandle<()>>,
    pub claims: Arc<Claims>,
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
    pub async fn connect(relay: &Relay, ca: &Ca) -> Agent {
        Agent::connect_as(relay, ca, AGENT).await
    }

    /// [`Agent::connect`] with the identity `uri`.
    pub async fn connect_as(relay: &Relay, ca: &Ca, uri: &str) -> Agent {
        match Agent::try_connect_as(relay, ca, uri).await {
            Ok(agent) => agent,
            Err(e) => panic!("agent {uri} did not get HELLO_ACK: {e}"),
        }
    }

    /// [`Agent::connect_as`], but a relay that closes the connection (or answers HELLO with
    /// anything else) is an `Err` carrying the close reason.
    pub async fn try_connect_as(relay: &Relay, ca: &Ca, uri: &str) -> Result<Agent, String> {
        let (endpoint, conn) = dial(relay, ca, uri).await;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut agent = Agent {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            buf: Vec::new(),
            workers: Vec::new(),
            claims: Arc::new(Claims::default()),
        };
        let hello = Frame::Hello(orp::Hello {
            protocol_version: "orp/1".to_owned(),
            agent_uri: uri.to_owned(),
            capabilities: vec!["leases".to_owned(), "streams".to_owned()],
        });
        let bytes = hello.to_vec().expect("encode");
        // A write refused because the relay closed is answered below with the close reason.
        let _ = agent.send.write_all(&bytes).await;
        match agent.try_next_frame().await {
            Ok(Frame::HelloAck(_)) => Ok(agent),
            Ok(other) => Err(format!("expected HELLO_ACK, got {other:?}")),
            // The connection's close reason says more than the stream error.
            Err(e) => Err(match agent.conn.close_reason() {
                Some(reason) => reason.to_string(),
                None => e,
            }),
        }
    }

    pub async fn call(&mut self, frame: Frame) -> Frame {
        self.send_frame(&frame).await;
        self.next_frame().await
    }

    /// Dials as `uri`, writes `bytes` as the start of the control stream (instead of HELLO)
    /// and returns how the relay ended the connection (its close reason, as text).
    pub async fn try_connect_as_raw(relay: &Relay, ca: &Ca, uri: &str, bytes: &[u8]) -> String {
        let (_endpoint, conn) = dial(relay, ca, uri).await;
        let (mut send, _recv) = conn.open_bi().await.expect("control stream");
        let _ = send.write_all(bytes).await;
        tokio::time::timeout(WAIT, conn.closed())
            .await
            .expect("the relay closes the connection")
            .to_string()
    }

    /// Writes one frame on the control stream without waiting for an answer.
    pub async fn send_frame(&mut self, frame: &Frame) {
        let bytes = frame.to_vec().expect("encode");
        self.send.write_all(&bytes).await.expect("send frame");
    }

    /// The relay's next frame on the control stream.
    pub async fn next_frame(&mut self) -> Frame {
        match self.try_next_frame().await {
            Ok(f) => f,
            Err(e) => panic!("no frame from the relay: {e}"),
        }
    }

    /// The relay's next frame on the control stream; `Err` (with the reason) when the stream
    /// or connection ends first.
    pub async fn try_next_frame(&mut self) -> Result<Frame, String> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Decoded::Frame { frame, used } = decode(&self.buf).expect("relay frame") {
                    let f = Frame::decode(&frame).expect("relay payload");
                    self.buf.drain(..used);
                    return Ok(f);
                }
                let mut chunk = [0u8; 4096];
                match self.recv.read(&mut chunk).await {
                    Ok(Some(n)) => self.buf.extend_from_slice(&chunk[..n]),
                    Ok(None) => return Err("control stream finished".to_owned()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "no answer in time".to_owned())?
    }

    /// Opens an application stream and writes `bytes` (anything: a raw header, a frame, junk)
    /// without waiting; the write error, if any, is returned with the stream.
    pub async fn open_raw(
        &self,
        bytes: &[u8],
    ) -> (quinn::SendStream, quinn::RecvStream, Result<(), String>) {
        let (mut send, recv) = self.conn.open_bi().await.expect("open stream");
        let wrote = send.write_all(bytes).await.map_err(|e| e.to_string());
        if wrote.is_err() {
            // Stopped by the relay: reset, so the unsent rest leaves this end's send buffer
            // (quinn keeps it until the stream is reset or dropped).
            let _ = send.reset(0u32.into());
        }
        (send, recv, wrote)
    }

    /// Opens a stream with OPEN_STREAM; the relay's one answer and the stream.
    pub async fn open_stream(
        &self,
        service: &str,
        method: &str,
        stream_id: u64,
    ) -> (Frame, quinn::SendStream, quinn::RecvStream) {
        let open = Frame::OpenStream(orp::OpenStream {
            target_service: service.to_owned(),
            method: method.to_owned(),
            stream_id,
        });
        let (send, mut recv, wrote) = self.open_raw(&open.to_vec().expect("encode")).await;
        // An oversized frame may be refused (STOP_SENDING) before it is all written.
        if let Err(e) = wrote {
            eprintln!("OPEN_STREAM write ended early: {e}");
        }
        let answer = read_one(&mut recv).await;
        (answer, send, recv)
    }

    /// REGISTER `service`, expecting REGISTER_ACK.
    pub async fn provide(&mut self, service: &str) {
        let answer = self
            .call(Frame::Register(orp::Register {
                service_name: service.to_owned(),
                local_addr: "127.0.0.1:8080".to_owned(),
                request_id: 1,
            }))
            .await;
        assert!(
            matches!(answer, Frame::RegisterAck(_)),
            "REGISTER_ACK for {service}, got {answer:?}"
        );
    }

    /// Provider side: accepts every relay stream, answers STREAM_ACCEPT and echoes the bytes
    /// back (`echo`), or never reads them (`!echo`). Runs until the agent is dropped.
    pub fn serve_streams(&mut self, echo: bool) {
        let conn = self.conn.clone();
        self.workers.push(tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    if !matches!(read_one(&mut recv).await, Frame::IncomingStream(_)) {
                        return;
                    }
                    let accept = Frame::StreamAccept(orp::StreamAccept {});
                    if send
                        .write_all(&accept.to_vec().expect("encode"))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if !echo {
                        // Hold both halves without reading until the relay resets them.
                        let _ = send.stopped().await;
                        drop(recv);
                        return;
                    }
                    while let Ok(Some(chunk)) = recv.read_chunk(1 << 20, true).await {
                        if send.write_chunk(chunk.bytes).await.is_err() {
                            return;
                        }
                    }
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        }));
    }

    /// LEASE_REGISTER, expecting LEASE_GRANT.
    pub async fn register(&mut self, name: &str, tls: bool, tcp: bool) -> orp::LeaseGrant {
        self.register_with(orp::LeaseRegister {
            name: name.to_owned(),
            tls,
            tcp,
            ttl_s: 300,
            request_id: 1,
            ..orp::LeaseRegister::default()
        })
        .await
    }

    /// LEASE_REGISTER of `req`, expecting LEASE_GRANT.
    pub async fn register_with(&mut self, req: orp::LeaseRegister) -> orp::LeaseGrant {
        let name = req.name.clone();
        match self.call(Frame::LeaseRegister(req)).await {
            Frame::LeaseGrant(g) => g,
            other => panic!("expected LEASE_GRANT for {name}, got {other:?}"),
        }
    }

    /// LEASE_RELEASE, expecting the releasing LEASE_GRANT (`expires_unix_ms: 0`).
    pub async fn release(&mut self, grant: &orp::LeaseGrant) {
        let answer = self
            .call(Frame::LeaseRelease(orp::LeaseRelease {
                lease_id: grant.lease_id.clone(),
                request_id: 2,
            }))
            .await;
        match answer {
            Frame::LeaseGrant(g) => assert_eq!(g.expires_unix_ms, 0, "released: {g:?}"),
            other => panic!("expected LEASE_GRANT for the release, got {other:?}"),
        }
    }

    /// This connection's reverse-session key for `grant` (its TLS exporter).
    pub fn key(&self, grant: &orp::LeaseGrant) -> [u8; EXPORTER_KEY_BYTES] {
        let mut key = [0u8; EXPORTER_KEY_BYTES];
        self.conn
            .export_keying_material(&mut key, EXPORTER_LABEL, &grant.lease_id)
            .expect("exporter");
        key
    }

    /// Keeps [`SESSIONS`] reverse sessions of the lease open; each claimed one is piped to
    /// `target` (after its marker byte) and replaced by a fresh one.
    pub fn serve_lease(&mut self, relay: &Relay, grant: &orp::LeaseGrant, target: SocketAddr) {
        self.serve_lease_with(relay, grant, target, SESSIONS);
    }

    /// [`Agent::serve_lease`] with `sessions` reverse sessions.
    pub fn serve_lease_with(
        &mut self,
        relay: &Relay,
        grant: &orp::LeaseGrant,
        target: SocketAddr,
        sessions: usize,
    ) {
        let lease = LeaseId::from_slice(&grant.lease_id).expect("16-byte lease id");
        let key = self.key(grant);
        for _ in 0..sessions {
            let claims = self.claims.clone();
            let reverse_addr = relay.reverse;
            self.workers.push(tokio::spawn(async move {
                session_worker(reverse_addr, lease, key, target, claims).await;
            }));
        }
    }
}

/// Reads exactly one frame from the start of a stream (one byte at a time: nothing beyond it).
pub async fn read_one(recv: &mut quinn::RecvStream) -> Frame {
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Decoded::Frame { frame, used } = decode(&buf).expect("frame") {
                assert_eq!(used, buf.len(), "bytes after the answer frame");
                return Frame::decode(&frame).expect("payload");
            }
            let mut byte = [0u8; 1];
            match recv.read(&mut byte).await {
                Ok(Some(1)) => buf.push(byte[0]),
                other => panic!("stream ended before a frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a frame in time")
}

/// Sends `len` pseudo-random bytes on `send` while reading them back from `recv` (an echo);
/// returns (bytes back, SHA-256 sent, SHA-256 received).
pub async fn echo_through(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    len: usize,
    seed: u8,
) -> (usize, Vec<u8>, Vec<u8>) {
    let up = async {
        let mut hash = Sha256::new();
        let mut block = vec![0u8; 64 * 1024];
        let mut x = u32::from(seed) + 1;
        let mut sent = 0;
        while sent < len {
            for b in &mut block {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x.to_le_bytes()[0];
            }
            let n = block.len().min(len - sent);
            hash.update(&block[..n]);
            send.write_all(&block[..n]).await.expect("echo write");
            sent += n;
        }
        send.finish().expect("finish");
        hash.finalize().to_vec()
    };
    let down = async {
        let mut hash = Sha256::new();
        let mut n = 0;
        while let Some(chunk) = recv.read_chunk(1 << 20, true).await.expect("echo read") {
            n += chunk.bytes.len();
            hash.update(&chunk.bytes);
        }
        (n, hash.finalize().to_vec())
    };
    let (sent, (n, got)) = tokio::join!(up, down);
    (n, sent, got)
}

/// One reverse-session slot: open, authenticate, wait for the claim, hand the session to a
/// piping task, repeat.
pub async fn session_worker(
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
pub async fn open_and_wait(
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

pub async fn pipe_to_target(mut session: TcpStream, target: SocketAddr, marker: Marker) {
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

/// A QUIC connection to the relay with an agent certificate for `uri` (handshake done, no
/// stream opened yet).
pub async fn dial(relay: &Relay, ca: &Ca, uri: &str) -> (quinn::Endpoint, quinn::Connection) {
    let leaf = ca.leaf(
        uri,
        &[],
        Some(uri),
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
    (endpoint, conn)
}

// ---------- the controller process ----------

/// A running `outrelay-controller` (killed on drop) with its gRPC address.
pub struct ControllerProc {
    pub child: Child,
    /// `host:port` of its mTLS gRPC listener.
    pub grpc: String,
    pub dir: tempfile::TempDir,
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `target/release/outrelay-controller` (this test runs from `target/release/deps/`); `None`
/// when it is not built.
pub fn controller_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("outrelay-controller");
    p.exists().then_some(p)
}

/// Starts the real controller with `ca` as its CA (state in a temp dir), waits for its ready
/// file. `None` (the caller prints SKIP) when the binary is not built.
pub async fn start_controller(ca: &Ca) -> Option<ControllerProc> {
    let bin = controller_bin()?;
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("ca.pem"), &ca.pem).expect("ca.pem");
    std::fs::write(state.join("ca-key.pem"), &ca.key_pem).expect("ca-key.pem");
    let config = dir.path().join("controller.toml");
    let ready = dir.path().join("ready.json");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[grpc]\nlisten = \"127.0.0.1:0\"\n[admin]\nsocket_path = \"\"\n\
             [metrics]\nlisten = \"\"\n",
            state.display().to_string()
        ),
    )
    .expect("controller config");
    let child = Command::new(bin)
        .args(["--log", "warn", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn controller");
    let started = Instant::now();
    let grpc = loop {
        if let Ok(text) = std::fs::read_to_string(&ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            break v["grpc"].as_str().expect("grpc address").to_owned();
        }
        assert!(started.elapsed() < WAIT, "controller not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Some(ControllerProc { child, grpc, dir })
}

impl ControllerProc {
    /// An mTLS channel as a global admin (`outrelay://system/admin/test`).
    pub async fn admin(&self, ca: &Ca) -> tonic::transport::Channel {
        let leaf = ca.leaf(
            "admin",
            &[],
            Some("outrelay://system/admin/test"),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        let (cert, key, ca_path) = (
            self.dir.path().join("admin.pem"),
            self.dir.path().join("admin-key.pem"),
            self.dir.path().join("admin-ca.pem"),
        );
        std::fs::write(&cert, &leaf.cert_pem).expect("admin cert");
        std::fs::write(&key, &leaf.key_pem).expect("admin key");
        std::fs::write(&ca_path, &ca.pem).expect("admin ca");
        outrelay_client::connect(&outrelay_client::Target {
            url: format!("https://{}", self.grpc),
            cert: Some(cert),
            key: Some(key),
            ca: Some(ca_path),
        })
        .await
        .expect("admin channel")
    }
}

// ---------- targets ----------

/// An in-process TLS server for `demo` that answers any HTTP request with [`BODY`].
pub async fn tls_target(ca: &Ca) -> (SocketAddr, JoinHandle<()>) {
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
pub async fn echo_target() -> (SocketAddr, JoinHandle<(u64, Vec<u8>)>) {
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

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `bin arg` runs and exits 0.
pub fn have(bin: &str, arg: &str) -> bool {
    Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

pub async fn run_blocking(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output())
        .await
        .expect("join")
        .expect("run command")
}

/// Relay, agent with the TLS lease `demo` served by the in-process TLS target.
pub async fn demo_setup() -> (Ca, Relay, Agent, tempfile::TempDir, JoinHandle<()>) {
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

pub async fn eventually_claimed(what: &str, count: impl Fn() -> usize) {
    let start = Instant::now();
    while count() == 0 {
        assert!(start.elapsed() < WAIT, "{what}: no claim within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn ca_file(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

pub fn io_backends() -> Vec<&'static str> {
    let mut backends = vec!["epoll"];
    if outrelay_io::Backend::probe() == outrelay_io::Backend::Uring {
        backends.push("io_uring");
    } else {
        eprintln!("SKIP io_uring backend: this kernel or sandbox refuses io_uring_setup");
    }
    backends
}

/// A TLS client trusting `ca`: connects to the relay's public TLS port with SNI `host`, sends
/// `GET path` and returns the whole response. `Err` when the relay refuses the connection.
pub async fn https_get(relay: &Relay, ca: &Ca, host: &str, path: &str) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.clone()).expect("CA root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).expect("server name");
    let attempt = async {
        let tcp = TcpStream::connect(relay.public_tls)
            .await
            .map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        tls.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        // Servers may close without close_notify; what was read counts.
        let _ = tls.read_to_end(&mut answer).await;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    tokio::time::timeout(WAIT, attempt)
        .await
        .map_err(|_| "timed out".to_owned())?
}

pub fn drops(reason: &str) -> String {
    format!("outrelay_relay_ingress_drops_total{{reason=\"{reason}\"}}")
}
