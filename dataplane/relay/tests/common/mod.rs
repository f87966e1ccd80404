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
        self.leaf_until(cn, dns, uri, eku, None)
    }

    /// [`Ca::leaf`] whose notAfter is `valid_for` from now (`None`: rcgen's far future).
    pub fn leaf_until(
        &self,
        cn: &str,
        dns: &[&str],
        uri: Option<&str>,
        eku: Vec<ExtendedKeyUsagePurpose>,
        valid_for: Option<Duration>,
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
        if let Some(valid_for) = valid_for {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970");
            let epoch = rcgen::date_time_ymd(1970, 1, 1);
            p.not_before = epoch + now.saturating_sub(Duration::from_secs(60));
            p.not_after = epoch + now + valid_for;
        }
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
    /// Processes that took over from this one (`outrelay-relay upgrade`): killed on drop too.
    pub successors: Vec<u32>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in &self.successors {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(*pid).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
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
    /// Run under `prlimit --nofile=N:N` (the caller has probed `prlimit`).
    pub nofile: Option<u64>,
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

/// Why the relay cannot be run as `nobody` here, if it cannot.
pub fn unprivileged_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root: cannot switch to nobody".to_owned());
    }
    if !have("setpriv", "--version") {
        return Some("no setpriv (util-linux)".to_owned());
    }
    let binary = env!("CARGO_BIN_EXE_outrelay-relay");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", binary])
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "nobody cannot run {binary}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("setpriv: {e}")),
    }
}

/// Waits until TCP lease port `port` takes connections: bound per port on the maintenance tick
/// after the grant (plain listeners), or open in the lookup map before it (eBPF). One probe
/// connection reaches the lease and is closed.
pub async fn wait_until_routed(port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(start.elapsed() < WAIT, "lease port {port} never routed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let mut cmd = if let Some(n) = opts.nofile {
        let mut c = Command::new("prlimit");
        c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&binary);
        c
    } else if opts.unprivileged {
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
        successors: Vec::new(),
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
    /// `outrelay-relay upgrade --admin-socket <dir>/admin.sock --timeout-s <timeout_s>`: its
    /// exit code and the JSON answer it printed. A new pid is remembered (killed on drop).
    pub async fn upgrade(&mut self, timeout_s: u64) -> (Option<i32>, serde_json::Value) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outrelay-relay"));
        cmd.arg("upgrade")
            .arg("--admin-socket")
            .arg(self.dir.path().join("admin.sock"))
            .arg("--timeout-s")
            .arg(timeout_s.to_string());
        let out = run_blocking(cmd).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "outrelay-relay upgrade: {:?} {text} {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: serde_json::Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("upgrade printed JSON ({e}): {text}"));
        if let Some(pid) = answer["new_pid"].as_u64() {
            self.successors
                .push(u32::try_from(pid).expect("pid fits u32"));
        }
        (out.status.code(), answer)
    }

    /// The ready file as it is now (a new process after an upgrade rewrites it).
    pub fn ready_info(&self) -> serde_json::Value {
        let text =
            std::fs::read_to_string(self.dir.path().join("ready.json")).expect("read ready file");
        serde_json::from_str(&text).expect("ready file is JSON")
    }

    /// One admin command's JSON answer.
    pub async fn admin(&self, command: &str) -> serde_json::Value {
        let mut s = tokio::net::UnixStream::connect(self.dir.path().join("admin.sock"))
            .await
            .expect("connect admin socket");
        s.write_all(format!("{command}\n").as_bytes())
            .await
            .expect("write command");
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.expect("read answer");
        serde_json::from_str(answer.trim()).expect("admin answers JSON")
    }

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

    /// [`Agent::connect`] with the identity `uri`. A relay following a controller refuses
    /// agents ("retry later", code 9) until its first revocation snapshot is loaded, which may
    /// come just after its ready file: retried for up to 10 s, as a real agent's backoff does.
    pub async fn connect_as(relay: &Relay, ca: &Ca, uri: &str) -> Agent {
        let start = std::time::Instant::now();
        loop {
            match Agent::try_connect_as(relay, ca, uri).await {
                Ok(agent) => return agent,
                Err(e) if e.contains("(code 9)") && start.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("agent {uri} did not get HELLO_ACK: {e}"),
            }
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
            capabilities: vec![
                "leases".to_owned(),
                "streams".to_owned(),
                "stream_accept".to_owned(),
            ],
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
                    let accept = Frame::StreamAccept(orp::StreamAccept::default());
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
        self.serve_lease_at(relay.reverse, grant, target, sessions);
    }

    /// [`Agent::serve_lease_with`], with the sessions opened to `reverse_addr` (the relay's
    /// public TLS port takes reverse sessions too: issue 22, only 443/tcp open).
    pub fn serve_lease_at(
        &mut self,
        reverse_addr: SocketAddr,
        grant: &orp::LeaseGrant,
        target: SocketAddr,
        sessions: usize,
    ) {
        let lease = LeaseId::from_slice(&grant.lease_id).expect("16-byte lease id");
        let key = self.key(grant);
        for _ in 0..sessions {
            let claims = self.claims.clone();
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
            Marker::Tls | Marker::TlsAddr => claims.tls.fetch_add(1, Ordering::Relaxed),
            Marker::Tcp | Marker::TcpAddr => claims.tcp.fetch_add(1, Ordering::Relaxed),
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
    let mut agent_nonce = [0u8; reverse::NONCE_BYTES];
    getrandom::fill(&mut agent_nonce).ok()?;
    s.write_all(&reverse::encode_preamble(&lease, &agent_nonce))
        .await
        .ok()?;
    let mut challenge = [0u8; reverse::CHALLENGE_BYTES];
    s.read_exact(&mut challenge).await.ok()?;
    // As the agent: nothing is answered to a peer that does not prove K.
    let nonce = reverse::verify_challenge(key, &lease, &agent_nonce, &challenge).ok()?;
    s.write_all(&reverse::agent_mac(key, &lease, &agent_nonce, &nonce))
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
    dial_until(relay, ca, uri, None).await
}

/// [`dial`] with a certificate valid for `valid_for` from now.
pub async fn dial_until(
    relay: &Relay,
    ca: &Ca,
    uri: &str,
    valid_for: Option<Duration>,
) -> (quinn::Endpoint, quinn::Connection) {
    let leaf = ca.leaf_until(
        uri,
        &[],
        Some(uri),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        valid_for,
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
    start_controller_with(ca, "").await
}

/// [`start_controller`] with `extra` appended to its config (whole tables, e.g. `[pki]`).
pub async fn start_controller_with(ca: &Ca, extra: &str) -> Option<ControllerProc> {
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
             [metrics]\nlisten = \"\"\n{extra}\n",
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

/// An in-process TLS server for `DEMO_HOST` (a leaf of `ca`) that runs `serve` on each
/// accepted TLS stream, on its own task.
pub async fn tls_server<F, Fut>(ca: &Ca, serve: F) -> (SocketAddr, JoinHandle<()>)
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
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
    let serve = Arc::new(serve);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let serve = serve.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            });
        }
    });
    (addr, task)
}

/// An in-process TLS server for `demo` that answers any HTTP request with [`BODY`].
pub async fn tls_target(ca: &Ca) -> (SocketAddr, JoinHandle<()>) {
    tls_server(ca, |tls| outrelay_testkit::answer_http(tls, BODY)).await
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

// ---------- hostile and legitimate clients of TCP leases ----------

/// The port of a grant's `tcp_addr`.
pub fn lease_port(grant: &orp::LeaseGrant) -> u16 {
    port_of(&grant.tcp_addr)
}

/// A target that writes zeros to every connection until it fails (a large download).
pub async fn zeros_target() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind zeros");
    let addr = listener.local_addr().expect("zeros addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let zeros = vec![0u8; 64 * 1024];
                while s.write_all(&zeros).await.is_ok() {}
            });
        }
    });
    (addr, task)
}

/// An echo target for any number of connections: each is echoed, and after the client's FIN
/// gets the SHA-256 of what it sent as a 32-byte trailer.
pub async fn echo_each_target() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            hasher.update(&buf[..n]);
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = w.write_all(&hasher.finalize()).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A client that connects with `SO_RCVBUF = 4096`, sends nothing and never reads (a stalled
/// reader, review H1). Keep it alive to keep the attack up.
pub async fn stalled_reader(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    socket.connect(addr).await
}

/// A legitimate client of [`echo_each_target`] through `addr`: sends `bytes` of pseudo-random
/// data (seeded), half-closes, reads the echo and the trailer, and checks both hashes.
/// A refused connect is retried (the lease port may not be open yet). Returns how long it took, or what did not match (or timed out after [`WAIT`]).
pub async fn echo_exchange(addr: SocketAddr, bytes: usize, seed: u64) -> Result<Duration, String> {
    let started = Instant::now();
    let run = async {
        // A lease port opens when the relay's listeners catch up with the grant.
        let s = loop {
            match TcpStream::connect(addr).await {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(format!("connect: {e}")),
            }
        };
        let _ = s.set_nodelay(true);
        let (mut r, mut w) = s.into_split();
        let mut x = seed | 1;
        let data: Vec<u8> = (0..bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        let sent: Vec<u8> = Sha256::digest(&data).to_vec();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await?;
            w.shutdown().await
        });
        let mut back = Vec::with_capacity(bytes + 32);
        r.read_to_end(&mut back)
            .await
            .map_err(|e| format!("read: {e}"))?;
        writer
            .await
            .map_err(|e| format!("writer: {e}"))?
            .map_err(|e| format!("write: {e}"))?;
        if back.len() != bytes + 32 {
            return Err(format!(
                "got {} bytes back, want {}",
                back.len(),
                bytes + 32
            ));
        }
        let (echo, trailer) = back.split_at(bytes);
        if Sha256::digest(echo).as_slice() != sent.as_slice() || trailer != sent.as_slice() {
            return Err("hash mismatch".to_owned());
        }
        Ok(())
    };
    match tokio::time::timeout(WAIT, run).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {WAIT:?}")),
    }
}

// ---------- abuse helpers: sources, process probes, many-connection targets ----------

/// A TCP connection to `to` from the local address `from` (any of 127/8 is loopback, so
/// `127.0.0.2` is a second source host).
pub async fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// Whether the peer closed (EOF or reset) within `within`; false when the connection stayed
/// open. Reads and discards whatever arrives.
pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A TCP echo server for any number of connections: each is echoed until the client's FIN,
/// then closed.
pub async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Sends `len` pseudo-random bytes through `stream` (an echo), half-closes, reads everything
/// back and checks the SHA-256 both ways. Returns the time it took.
pub async fn echo_round_trip(stream: TcpStream, len: usize) -> Duration {
    let started = Instant::now();
    let mut data = vec![0u8; len];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for b in &mut data {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *b = state.to_le_bytes()[0];
    }
    let sent = Sha256::digest(&data).to_vec();
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.expect("echo write");
        w.shutdown().await.expect("echo FIN");
    });
    let mut back = Vec::with_capacity(len);
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("echo back in time")
        .expect("echo read");
    writer.await.expect("writer");
    assert_eq!(back.len(), len, "echoed bytes");
    assert_eq!(Sha256::digest(&back).to_vec(), sent, "echoed SHA-256");
    started.elapsed()
}

/// The port of a grant's `tcp_addr` or `udp_addr`.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a port in {addr:?}"))
}

/// Connects to a lease port on 127.0.0.1 from `from`, retrying until the relay's next route
/// sync binds it.
pub async fn connect_lease_port(from: std::net::IpAddr, port: u16) -> TcpStream {
    let start = Instant::now();
    loop {
        match connect_from(from, SocketAddr::from(([127, 0, 0, 1], port))).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    start.elapsed() < WAIT,
                    "lease port {port} never listened: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Relay {
    /// The relay's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open descriptors of the relay (`/proc/<pid>/fd`).
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(Iterator::count)
            .unwrap_or(0)
    }

    /// Resident memory of the relay in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// CPU time of the relay so far (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("read /proc/<pid>/stat");
        // Fields after the command name (which may hold spaces): utime is the 12th, stime
        // the 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        f.iter().sum()
    }

    /// The relay's CPU use over `window`, as a fraction of one core (clock ticks at 100 Hz).
    pub async fn cpu_over(&self, window: Duration) -> f64 {
        let before = self.cpu_ticks();
        tokio::time::sleep(window).await;
        let ticks = self.cpu_ticks().saturating_sub(before);
        ticks as f64 / 100.0 / window.as_secs_f64()
    }
}

impl Agent {
    /// Answers every UDP datagram of this connection's leases with the same datagram (an
    /// echo at the agent: same slot, same flow, same payload).
    pub fn serve_udp_echo(&mut self) {
        let conn = self.conn.clone();
        self.workers.push(tokio::spawn(async move {
            while let Ok(d) = conn.read_datagram().await {
                let _ = conn.send_datagram(d);
            }
        }));
    }
}

/// The raw ClientHello a rustls client sends for `host` (to replay from attack sockets).
pub fn client_hello_bytes(host: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("hello bytes");
    }
    out
}
