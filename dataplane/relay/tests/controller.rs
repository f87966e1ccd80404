//! The relay's controller client against the REAL `outrelay-controller` binary (mTLS on
//! 127.0.0.1:0, a CA made here and handed to the controller, a real SQLite file) and the relay's
//! QUIC endpoint in-process, driven by a small ORP test agent.
//!
//! Build the controller first: `cargo build --release -p outrelay-controller`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outrelay_api::pb::{
    self, leases_client::LeasesClient, pki_client::PkiClient, relays_client::RelaysClient,
};
use outrelay_proto::frame::{Decoded, Frame, ORP_ALPN, decode};
use outrelay_proto::hostname::HostName;
use outrelay_proto::orp;
use outrelay_relay::control::decisions::RecordState;
use outrelay_relay::control::{
    ControlStats, ControlTasks, Controller, ControllerConfig, ControllerDecider,
};
use outrelay_relay::lease::{LeaseConfig, LeaseTable, PortLeaseConfig};
use outrelay_relay::quic::{QuicConfig, QuicServer, ShutdownHandle, TlsMaterial, close_code};
use outrelay_relay::state::Shared;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;

const ROOT_HOST: &str = "relay.test";
const TENANT: &str = "demo";
const AGENT_1: &str = "outrelay://demo/agent/00000000-0000-4000-8000-000000000001";
const AGENT_2: &str = "outrelay://demo/agent/00000000-0000-4000-8000-000000000002";
const RELAY: &str = "outrelay://dev/relay/relay-1";
const ADMIN: &str = "outrelay://system/admin/test";
/// Bound on every single wait (generous: the machine is shared).
const WAIT: Duration = Duration::from_secs(20);

// ---------- PKI ----------

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    pem: String,
    key_pem: String,
}

#[derive(Clone, Copy)]
enum Eku {
    Client,
    Both,
}

struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
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

    fn leaf(&self, uri: &str, dns: &[&str], eku: Eku) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::new(dns.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .expect("leaf params");
        p.subject_alt_names
            .push(SanType::URI(uri.try_into().expect("URI SAN")));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, uri);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = match eku {
            Eku::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Eku::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
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

// ---------- controller process ----------

struct ControllerProc {
    child: Child,
    grpc: String,
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `target/release/outrelay-controller`: this test runs from `target/release/deps/`.
fn controller_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    let p = deps
        .parent()
        .expect("profile dir")
        .join("outrelay-controller");
    assert!(
        p.exists(),
        "{} missing: build it first with `cargo build --release -p outrelay-controller`",
        p.display()
    );
    p
}

fn start_controller(dir: &Path, ca: &Ca) -> ControllerProc {
    let state = dir.join("controller-state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("ca.pem"), &ca.pem).expect("ca.pem");
    std::fs::write(state.join("ca-key.pem"), &ca.key_pem).expect("ca-key.pem");
    let config = dir.join("controller.toml");
    let ready = dir.join("controller-ready.json");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[grpc]\nlisten = \"127.0.0.1:0\"\n[admin]\nsocket_path = \"\"\n[metrics]\nlisten = \"\"\n",
            state = state.display().to_string(),
        ),
    )
    .expect("config");
    let child = Command::new(controller_bin())
        .args(["--log", "warn", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .spawn()
        .expect("spawn controller");
    let deadline = Instant::now() + Duration::from_secs(60);
    let grpc = loop {
        if let Ok(text) = std::fs::read_to_string(&ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            break v["grpc"].as_str().expect("grpc").to_owned();
        }
        assert!(Instant::now() < deadline, "controller not ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    ControllerProc { child, grpc }
}

fn write_leaf(dir: &Path, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&cert, &leaf.cert_pem).expect("cert");
    std::fs::write(&key, &leaf.key_pem).expect("key");
    (cert, key)
}

// ---------- the world: controller + relay + admin channel ----------

struct World {
    ca: Ca,
    controller: ControllerProc,
    admin: Channel,
    quic_addr: SocketAddr,
    shared: Arc<Shared>,
    decider: Arc<ControllerDecider>,
    relay_state: PathBuf,
    _tasks: ControlTasks,
    _stop: ShutdownHandle,
    dir: tempfile::TempDir,
}

async fn world() -> World {
    world_with(|_| {}).await
}

/// A world whose relay lease table starts from `LeaseConfig::default()` changed by `tune`.
async fn world_with(tune: impl FnOnce(&mut LeaseConfig)) -> World {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = Ca::new("controller test CA");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).expect("ca");
    let controller = start_controller(dir.path(), &ca);
    let url = format!("https://{}", controller.grpc);

    let (admin_cert, admin_key) =
        write_leaf(dir.path(), "admin", &ca.leaf(ADMIN, &[], Eku::Client));
    let admin = outrelay_client::connect(&outrelay_client::Target {
        url: url.clone(),
        cert: Some(admin_cert),
        key: Some(admin_key),
        ca: Some(ca_path.clone()),
    })
    .await
    .expect("admin channel");

    let (relay_cert, relay_key) = write_leaf(
        dir.path(),
        "relay",
        &ca.leaf(RELAY, &["localhost"], Eku::Both),
    );
    let relay_state = dir.path().join("relay-state");
    let mut cc = ControllerConfig::new(url, relay_cert.clone(), relay_key.clone(), ca_path.clone());
    cc.heartbeat_interval_ms = 200;
    cc.report_timeout_ms = 2_000;
    cc.reconnect_backoff_ms = 100;
    cc.reconnect_backoff_max_ms = 500;
    cc.state_dir = relay_state.clone();
    let control = Controller::new(cc).expect("controller client");
    let decider = control.decider();

    let material = TlsMaterial::from_pem_files(&relay_cert, &relay_key, &ca_path).expect("PEM");
    let mut qc = QuicConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        material,
        ROOT_HOST.to_owned(),
    );
    qc.drain_grace_ms = 200;
    let mut lc = LeaseConfig {
        root_host: ROOT_HOST.to_owned(),
        janitor_interval_ms: 100,
        ..LeaseConfig::default()
    };
    tune(&mut lc);
    let leases = LeaseTable::new(lc).expect("lease table");
    let shared = Arc::new(Shared::default());
    let server =
        QuicServer::bind_with_decider(qc, leases, shared.clone(), decider.clone()).expect("bind");
    let quic_addr = server.local_addr().expect("addr");
    let stop = server.shutdown_handle();
    let tasks = control.start(
        server.handle(),
        server.identity(),
        format!("{ROOT_HOST}:{}", quic_addr.port()),
    );
    tokio::spawn(server.run());
    let d = decider.clone();
    eventually("first lease and revocation snapshots", || {
        d.decisions().is_some() && d.revocations().is_some()
    })
    .await;
    World {
        ca,
        controller,
        admin,
        quic_addr,
        shared,
        decider,
        relay_state,
        _tasks: tasks,
        _stop: stop,
        dir,
    }
}

impl World {
    fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.admin.clone())
    }

    async fn agent(&self, uri: &str) -> Agent {
        let leaf = self.ca.leaf(uri, &[], Eku::Client);
        let mut a = connect(self.quic_addr, &self.ca, &leaf)
            .await
            .expect("connect");
        match a.call(hello(uri)).await {
            Frame::HelloAck(_) => a,
            other => panic!("expected HELLO_ACK, got {other:?}"),
        }
    }

    /// The controller's record of (demo, name), polled until `cond` holds.
    async fn record_where(&self, name: &str, cond: impl Fn(&pb::Lease) -> bool) -> pb::Lease {
        let start = Instant::now();
        loop {
            let list = self
                .leases()
                .list(pb::ListLeasesRequest {
                    tenant: TENANT.into(),
                })
                .await
                .expect("Leases.List")
                .into_inner();
            if let Some(l) = list.leases.into_iter().find(|l| l.name == name && cond(l)) {
                return l;
            }
            assert!(start.elapsed() < WAIT, "no matching record for {name}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn routed(&self, name: &str) -> bool {
        let host = HostName::parse(format!("{name}.{ROOT_HOST}").as_bytes()).expect("host");
        self.shared.load().routes.lookup_sni(&host).is_some()
    }
}

// ---------- in-test ORP agent (the minimum of tests/quic.rs) ----------

struct Agent {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    next_request: u64,
}

async fn connect(addr: SocketAddr, ca: &Ca, leaf: &Leaf) -> Result<Agent, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.clone()).expect("CA root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_client_auth_cert(leaf.chain.clone(), leaf.key.clone_key())
        .expect("client cert");
    tls.alpn_protocols = vec![ORP_ALPN.as_bytes().to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = tokio::time::timeout(
        WAIT,
        endpoint
            .connect(addr, "localhost")
            .expect("connect")
            .into_future(),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    Ok(Agent {
        _endpoint: endpoint,
        conn,
        send,
        recv,
        buf: Vec::new(),
        next_request: 1,
    })
}

impl Agent {
    async fn send(&mut self, frame: Frame) -> Result<(), String> {
        let bytes = frame.to_vec().expect("encode");
        self.send.write_all(&bytes).await.map_err(|e| e.to_string())
    }

    async fn recv(&mut self) -> Result<Frame, String> {
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
        .map_err(|_| "no frame in time".to_owned())?
    }

    async fn call(&mut self, frame: Frame) -> Frame {
        self.send(frame).await.expect("send");
        self.recv().await.expect("answer")
    }

    /// LEASE_REGISTER for a tls lease `name`: the grant, or the error.
    async fn register(&mut self, name: &str) -> Result<orp::LeaseGrant, orp::LeaseError> {
        self.next_request += 1;
        match self
            .call(Frame::LeaseRegister(orp::LeaseRegister {
                name: name.to_owned(),
                tls: true,
                request_id: self.next_request,
                ..orp::LeaseRegister::default()
            }))
            .await
        {
            Frame::LeaseGrant(g) => Ok(g),
            Frame::LeaseError(e) => Err(e),
            other => panic!("expected LEASE_GRANT or LEASE_ERROR, got {other:?}"),
        }
    }

    async fn renew(&mut self, lease_id: &[u8]) -> Result<orp::LeaseGrant, orp::LeaseError> {
        self.next_request += 1;
        match self
            .call(Frame::LeaseRenew(orp::LeaseRenew {
                lease_id: lease_id.to_vec(),
                ttl_s: 0,
                request_id: self.next_request,
            }))
            .await
        {
            Frame::LeaseGrant(g) => Ok(g),
            Frame::LeaseError(e) => Err(e),
            other => panic!("expected LEASE_GRANT or LEASE_ERROR, got {other:?}"),
        }
    }

    /// Waits until the relay closes the connection; its application close code.
    async fn closed_code(&self) -> Option<u64> {
        let err = tokio::time::timeout(WAIT, self.conn.closed())
            .await
            .expect("relay did not close the connection in time");
        match err {
            quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
            _ => None,
        }
    }
}

fn hello(uri: &str) -> Frame {
    Frame::Hello(orp::Hello {
        protocol_version: "orp/1".to_owned(),
        agent_uri: uri.to_owned(),
        capabilities: vec!["leases".to_owned()],
    })
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn refused(r: Result<orp::LeaseGrant, orp::LeaseError>) -> orp::LeaseError {
    match r {
        Ok(g) => panic!("expected a refusal, got {g:?}"),
        Err(e) => e,
    }
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_lists_the_relay_and_a_granted_lease_is_reported() {
    let w = world().await;
    let start = Instant::now();
    loop {
        let relays = RelaysClient::new(w.admin.clone())
            .list_relays(pb::ListRelaysRequest {})
            .await
            .expect("ListRelays")
            .into_inner()
            .relays;
        if let Some(r) = relays.iter().find(|r| r.id == "relay-1") {
            assert_eq!(r.region, "dev");
            assert!(r.up, "{r:?}");
            assert_eq!(r.endpoint, format!("{ROOT_HOST}:{}", w.quic_addr.port()));
            break;
        }
        assert!(start.elapsed() < WAIT, "relay never listed: {relays:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut a = w.agent(AGENT_1).await;
    let g = a.register("web").await.expect("granted");
    assert_eq!(g.hostname, "web.relay.test");
    let l = w
        .record_where("web", |l| l.state == pb::lease::State::Approved as i32)
        .await;
    assert_eq!(l.agent_uri, AGENT_1);
    assert_eq!(l.relay_id, "relay-1");
    assert_eq!(l.lease_kind, "tls");
    let stats = w.decider.stats();
    assert!(ControlStats::get(&stats.heartbeats_ok) >= 1);
    // Counted when the controller's answer is back, which may be after the record is visible.
    eventually("the grant's report counted as sent", || {
        ControlStats::get(&stats.reports_sent) >= 1
    })
    .await;
    // A release is reported too.
    a.send(Frame::LeaseRelease(orp::LeaseRelease {
        lease_id: g.lease_id.clone(),
        request_id: 99,
    }))
    .await
    .expect("send");
    assert!(matches!(a.recv().await, Ok(Frame::LeaseGrant(_))));
    w.record_where("web", |l| l.state == pb::lease::State::Released as i32)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_is_pending_until_an_admin_approves() {
    let w = world().await;
    w.leases()
        .set_approval_mode(pb::SetApprovalModeRequest {
            tenant: TENANT.into(),
            mode: pb::ApprovalMode::Manual as i32,
        })
        .await
        .expect("SetApprovalMode");
    let d = w.decider.clone();
    eventually("manual mode reaches the relay", || {
        d.decisions()
            .is_some_and(|x| x.tenants.get(TENANT).is_some_and(|t| t.manual))
    })
    .await;
    let mut a = w.agent(AGENT_1).await;
    let e = refused(a.register("web").await);
    assert_eq!(
        (e.code.as_str(), e.message.as_str()),
        ("lease_rejected", "pending_approval")
    );
    assert!(!w.routed("web"));
    // The report created the pending record; an admin approves it.
    let pending = w
        .record_where("web", |l| l.state == pb::lease::State::Pending as i32)
        .await;
    // A retry before approval is still pending.
    let e = refused(a.register("web").await);
    assert_eq!(e.message, "pending_approval");
    w.leases()
        .approve(pb::LeaseActionRequest {
            tenant: TENANT.into(),
            id: pending.id.clone(),
        })
        .await
        .expect("Approve");
    let waited = eventually("approval reaches the relay", || {
        d.decisions().is_some_and(|x| {
            x.records
                .get(&(TENANT.to_owned(), "web".to_owned()))
                .is_some_and(|r| r.state == RecordState::Approved)
        })
    })
    .await;
    eprintln!("approval reached the relay {waited:?} after Approve returned");
    let g = a.register("web").await.expect("granted after approval");
    assert_eq!(g.hostname, "web.relay.test");
    assert!(w.routed("web"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ban_of_a_live_lease_stops_its_routing() {
    let w = world().await;
    let mut a = w.agent(AGENT_1).await;
    let g = a.register("web").await.expect("granted");
    assert!(w.routed("web"));
    let rec = w
        .record_where("web", |l| l.state == pb::lease::State::Approved as i32)
        .await;
    let banned_at = Instant::now();
    w.leases()
        .ban(pb::LeaseActionRequest {
            tenant: TENANT.into(),
            id: rec.id,
        })
        .await
        .expect("Ban");
    let waited = eventually("banned lease stops routing", || !w.routed("web")).await;
    eprintln!(
        "ban → route gone: {waited:?} after Ban returned ({:?} from the call)",
        banned_at.elapsed()
    );
    // The lease is gone on the relay; a renewal is not found, a new register is banned, for
    // any agent of the tenant.
    let e = refused(a.renew(&g.lease_id).await);
    assert_eq!(e.code, "lease_not_found");
    let e = refused(a.register("web").await);
    assert_eq!(
        (e.code.as_str(), e.message.as_str()),
        ("unauthorized", "banned")
    );
    let mut b = w.agent(AGENT_2).await;
    let e = refused(b.register("web").await);
    assert_eq!(e.message, "banned");
    assert!(ControlStats::get(&w.decider.stats().leases_revoked) >= 1);
}

/// A TCP-only LEASE_REGISTER.
async fn register_tcp(a: &mut Agent, name: &str) -> Result<orp::LeaseGrant, orp::LeaseError> {
    a.next_request += 1;
    match a
        .call(Frame::LeaseRegister(orp::LeaseRegister {
            name: name.to_owned(),
            tcp: true,
            request_id: a.next_request,
            ..orp::LeaseRegister::default()
        }))
        .await
    {
        Frame::LeaseGrant(g) => Ok(g),
        Frame::LeaseError(e) => Err(e),
        other => panic!("expected LEASE_GRANT or LEASE_ERROR, got {other:?}"),
    }
}

/// `Leases.SetGate` (`outrelay leases gate`) reaches the relay's lease table: TCP port leases,
/// on in the relay's config, are refused `tcp_port_disabled` once a global admin switches them
/// off for every relay, and granted again once this relay's own gate switches them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_lease_gates_set_on_the_controller_reach_the_relay() {
    let w = world_with(|lc| lc.tcp = PortLeaseConfig::on()).await;
    let mut a = w.agent(AGENT_1).await;
    register_tcp(&mut a, "first")
        .await
        .expect("TCP leases are on in the config");
    let gate = |relay_id: &str, enabled: bool| pb::SetGateRequest {
        relay_id: relay_id.into(),
        tcp: Some(pb::PortGate {
            enabled,
            max_leases: 0,
        }),
        udp: None,
    };
    w.leases().set_gate(gate("", false)).await.expect("SetGate");
    let start = Instant::now();
    loop {
        match register_tcp(&mut a, "second").await {
            Err(e) if e.code == "tcp_port_disabled" => break,
            other => assert!(
                start.elapsed() < WAIT,
                "the gate never reached the relay: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.leases()
        .set_gate(gate("relay-1", true))
        .await
        .expect("SetGate");
    let start = Instant::now();
    while let Err(e) = register_tcp(&mut a, "third").await {
        assert!(
            start.elapsed() < WAIT,
            "this relay's own gate never won: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_is_refused_with_lease_rejected() {
    let w = world().await;
    w.leases()
        .set_quota(pb::SetQuotaRequest {
            tenant: TENANT.into(),
            max_leases: 1,
        })
        .await
        .expect("SetQuota");
    let d = w.decider.clone();
    eventually("quota reaches the relay", || {
        d.decisions()
            .is_some_and(|x| x.tenants.get(TENANT).is_some_and(|t| t.max_leases == 1))
    })
    .await;
    let mut a = w.agent(AGENT_1).await;
    a.register("one").await.expect("first lease within quota");
    // Once the controller has the first record (via the report answer), the second is refused.
    eventually("first record known to the relay", || {
        d.decisions().is_some_and(|x| {
            x.records
                .get(&(TENANT.to_owned(), "one".to_owned()))
                .is_some_and(|r| r.state == RecordState::Approved)
        })
    })
    .await;
    let e = refused(a.register("two").await);
    assert_eq!(
        (e.code.as_str(), e.message.as_str()),
        ("lease_rejected", "quota_exceeded")
    );
    assert!(!w.routed("two"));
    // Re-registering the lease it already holds is not a new one.
    a.register("one").await.expect("same lease again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_is_closed_and_refused_and_the_list_is_saved() {
    let w = world().await;
    let mut a = w.agent(AGENT_1).await;
    a.register("web").await.expect("granted");
    let mut other = w.agent(AGENT_2).await;
    let t0 = Instant::now();
    let r = PkiClient::new(w.admin.clone())
        .revoke(pb::RevokeRequest {
            uri: AGENT_1.into(),
        })
        .await
        .expect("Revoke")
        .into_inner();
    assert!(r.newly_revoked);
    let rpc = t0.elapsed();
    let code = a.closed_code().await;
    let closed = t0.elapsed();
    eprintln!(
        "Revoke RPC took {rpc:?}; the agent's connection was closed {closed:?} after the call started"
    );
    assert_eq!(code, Some(u64::from(close_code::REVOKED)));
    assert!(closed < Duration::from_secs(5), "closed after {closed:?}");
    eventually("revoked agent's lease stops routing", || !w.routed("web")).await;
    // A new HELLO with the revoked identity is refused; another agent is unaffected.
    let leaf = w.ca.leaf(AGENT_1, &[], Eku::Client);
    let mut again = connect(w.quic_addr, &w.ca, &leaf).await.expect("connect");
    again.send(hello(AGENT_1)).await.expect("hello");
    assert_eq!(
        again.closed_code().await,
        Some(u64::from(close_code::REVOKED))
    );
    other
        .register("api")
        .await
        .expect("other agent still served");
    // The snapshot is on disk for the next start.
    // (Written after the connections are closed: poll.)
    let file = w.relay_state.join("revocations.json");
    eventually("revocation saved to the state directory", || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(AGENT_1))
    })
    .await;
    assert!(ControlStats::get(&w.decider.stats().revoked_connections_closed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_down_keeps_serving_from_the_last_snapshot() {
    let mut w = world().await;
    let mut a = w.agent(AGENT_1).await;
    let g = a.register("web").await.expect("granted");
    w.record_where("web", |l| l.state == pb::lease::State::Approved as i32)
        .await;
    let _ = w.controller.child.kill();
    let _ = w.controller.child.wait();
    let d = w.decider.clone();
    eventually("relay notices the controller is gone", || {
        ControlStats::get(&d.stats().leases_connected) == 0
    })
    .await;
    assert!(w.routed("web"), "the live lease keeps routing");
    let r = a
        .renew(&g.lease_id)
        .await
        .expect("renewal works without the controller");
    assert_eq!(r.lease_id, g.lease_id);
    // A re-register of the approved lease is answered from the last snapshot.
    a.register("web")
        .await
        .expect("re-register from the snapshot");
    assert!(w.routed("web"));
    // New agents are still admitted (the revocation list is the last snapshot).
    let mut b = w.agent(AGENT_2).await;
    b.register("api")
        .await
        .expect("auto mode from the snapshot");
    let stats = d.stats();
    eventually("failed reports are counted", || {
        ControlStats::get(&stats.reports_failed) >= 1
    })
    .await;
    drop(w.dir);
}

// ---------- the relay binary with [controller] ----------

fn relay_config(dir: &Path, controller: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "public_url = \"https://{ROOT_HOST}\"\nworkers = 1\n\
             [tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n\
             [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"127.0.0.1:0\"\nmetrics = \"\"\nadmin_socket = \"\"\n\
             [controller]\n{controller}"
        ),
    )
    .expect("relay config");
    path
}

#[test]
fn invalid_controller_keys_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = Ca::new("test CA");
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).expect("ca");
    write_leaf(
        dir.path(),
        "relay",
        &ca.leaf(RELAY, &["localhost"], Eku::Both),
    );
    for (section, key) in [
        ("url = \"http://127.0.0.1:7444\"\n", "controller.url"),
        (
            "url = \"https://127.0.0.1:7444\"\nheartbeat_interval_ms = 5\n",
            "controller.heartbeat_interval_ms",
        ),
        (
            "url = \"https://127.0.0.1:7444\"\nreport_queue_max = 0\n",
            "controller.report_queue_max",
        ),
        ("url = \"https://127.0.0.1:7444\"\nbogus = 1\n", "bogus"),
    ] {
        let config = relay_config(dir.path(), section);
        let o = Command::new(env!("CARGO_BIN_EXE_outrelay-relay"))
            .arg("--config")
            .arg(&config)
            .arg("--check-config")
            .output()
            .expect("run relay");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(64), "{section}: {err}");
        assert!(err.contains(key), "{section}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_binary_heartbeats_and_follows_the_controller() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = Ca::new("binary test CA");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).expect("ca");
    write_leaf(
        dir.path(),
        "relay",
        &ca.leaf(RELAY, &["localhost"], Eku::Both),
    );
    let controller = start_controller(dir.path(), &ca);
    let config = relay_config(
        dir.path(),
        &format!(
            "url = \"https://{}\"\nheartbeat_interval_ms = 200\nreconnect_backoff_ms = 100\nstate_dir = \"relay-state\"\n",
            controller.grpc
        ),
    );
    let ready = dir.path().join("relay-ready.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_outrelay-relay"))
        .args(["--log", "warn", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .spawn()
        .expect("spawn relay");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut child);
    let start = Instant::now();
    let quic: SocketAddr = loop {
        if let Ok(text) = std::fs::read_to_string(&ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            break v["quic"].as_str().expect("quic").parse().expect("addr");
        }
        assert!(start.elapsed() < WAIT, "relay not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (cert, key) = write_leaf(dir.path(), "admin", &ca.leaf(ADMIN, &[], Eku::Client));
    let admin = outrelay_client::connect(&outrelay_client::Target {
        url: format!("https://{}", controller.grpc),
        cert: Some(cert),
        key: Some(key),
        ca: Some(ca_path),
    })
    .await
    .expect("admin channel");
    loop {
        let relays = RelaysClient::new(admin.clone())
            .list_relays(pb::ListRelaysRequest {})
            .await
            .expect("ListRelays")
            .into_inner()
            .relays;
        if relays.iter().any(|r| r.id == "relay-1" && r.up) {
            break;
        }
        assert!(start.elapsed() < WAIT, "relay binary never heartbeated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An agent is admitted once the revocation snapshot is in, and its lease is reported.
    let leaf = ca.leaf(AGENT_1, &[], Eku::Client);
    let mut a = loop {
        let mut a = connect(quic, &ca, &leaf).await.expect("connect");
        a.send(hello(AGENT_1)).await.expect("hello");
        match a.recv().await {
            Ok(Frame::HelloAck(_)) => break a,
            _ => {
                assert!(start.elapsed() < WAIT, "agent never admitted");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let g = loop {
        match a.register("web").await {
            Ok(g) => break g,
            Err(e) if e.message == "controller_unavailable" && start.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("refused: {e:?}"),
        }
    };
    assert_eq!(g.hostname, "web.relay.test");
    loop {
        let list = LeasesClient::new(admin.clone())
            .list(pb::ListLeasesRequest {
                tenant: TENANT.into(),
            })
            .await
            .expect("List")
            .into_inner();
        if list
            .leases
            .iter()
            .any(|l| l.name == "web" && l.relay_id == "relay-1")
        {
            break;
        }
        assert!(start.elapsed() < WAIT, "lease never reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dir.path().join("relay-state/revocations.json").exists());
}
