//! The agent QUIC endpoint end to end: real QUIC on 127.0.0.1, real certificates from a
//! throw-away CA, and a small in-test ORP client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outrelay_proto::frame::{Decoded, Frame, ORP_ALPN, decode};
use outrelay_proto::hostname::HostName;
use outrelay_proto::orp;
use outrelay_proto::reverse::{EXPORTER_KEY_BYTES, EXPORTER_LABEL, LeaseId};
use outrelay_proto::udp::DatagramHeader;
use outrelay_relay::lease::ControllerDecision;
use outrelay_relay::lease::{LeaseConfig, LeaseErrorCode, LeaseTable, PortLeaseConfig};
use outrelay_relay::quic::{
    ApproveAll, LeaseDecider, QuicConfig, QuicServer, QuicStats, ShutdownHandle, TlsMaterial,
    close_code,
};
use outrelay_relay::state::Shared;
use outrelay_relay::udp::stats::UdpDrop;
use outrelay_relay::udp::{UdpConfig, UdpIngress};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const ROOT_HOST: &str = "relay.test";
const REVERSE_ADDR: &str = "relay.test:7443";
const AGENT_1: &str = "outrelay://demo/agent/00000000-0000-4000-8000-000000000001";
const AGENT_2: &str = "outrelay://demo/agent/00000000-0000-4000-8000-000000000002";
const RELAY: &str = "outrelay://dev/relay/relay-1";
/// Bound on every single wait in these tests (generous: the machine is shared).
const WAIT: Duration = Duration::from_secs(10);

// ---------- PKI ----------

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    pem: String,
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

// ---------- relay under test ----------

struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stats: Arc<QuicStats>,
    stop: ShutdownHandle,
    task: tokio::task::JoinHandle<()>,
    /// UDP leases (ports from a claimed range, `flow_max` = [`UDP_FLOW_MAX`]).
    udp: Arc<UdpIngress>,
    _dir: tempfile::TempDir,
}

/// Flows per UDP lease in these tests (small, so the cap is reachable).
const UDP_FLOW_MAX: usize = 3;

/// Starts a relay whose certificate and CA are read from PEM files in a temp dir.
fn start_relay(ca: &Ca, hello_deadline_ms: u64) -> Relay {
    start_relay_with(ca, hello_deadline_ms, |_| {}, Arc::new(ApproveAll))
}

fn start_relay_with(
    ca: &Ca,
    hello_deadline_ms: u64,
    tweak: impl FnOnce(&mut QuicConfig),
    decider: Arc<dyn LeaseDecider>,
) -> Relay {
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = ca.leaf(RELAY, &["localhost"], Eku::Both);
    let (cert, key, ca_path) = (
        dir.path().join("relay.pem"),
        dir.path().join("relay-key.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, &relay.cert_pem).expect("write cert");
    std::fs::write(&key, &relay.key_pem).expect("write key");
    std::fs::write(&ca_path, &ca.pem).expect("write ca");
    let material = TlsMaterial::from_pem_files(&cert, &key, &ca_path).expect("load PEM");
    let mut config = QuicConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        material,
        ROOT_HOST.to_owned(),
    );
    config.reverse_addr = REVERSE_ADDR.to_owned();
    config.hello_deadline_ms = hello_deadline_ms;
    config.drain_grace_ms = 500;
    tweak(&mut config);
    let (min_port, max_port) = outrelay_testkit::claim_port_range();
    let leases = LeaseTable::new(LeaseConfig {
        root_host: ROOT_HOST.to_owned(),
        janitor_interval_ms: 100,
        min_port,
        max_port,
        udp: PortLeaseConfig::on(),
        ..LeaseConfig::default()
    })
    .expect("lease table");
    let shared = Arc::new(Shared::default());
    let server =
        QuicServer::bind_with_decider(config, leases, shared.clone(), decider).expect("bind");
    let udp = UdpIngress::new(
        UdpConfig {
            flow_max: UDP_FLOW_MAX,
            bind_ip: [127, 0, 0, 1].into(),
            ..UdpConfig::default()
        },
        shared.clone(),
    );
    server.serve_udp(udp.clone());
    udp.serve();
    assert_eq!(server.identity().to_string(), RELAY);
    let addr = server.local_addr().expect("local addr");
    let stats = server.stats();
    let stop = server.shutdown_handle();
    let task = tokio::spawn(server.run());
    Relay {
        addr,
        shared,
        stats,
        stop,
        task,
        udp,
        _dir: dir,
    }
}

// ---------- in-test ORP client ----------

struct Agent {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

fn client_endpoint(ca: &Ca, leaf: &Leaf) -> quinn::Endpoint {
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
    endpoint
}

/// Connects and opens the control stream (nothing sent yet). Err: the connection failed.
async fn connect(relay: &Relay, ca: &Ca, leaf: &Leaf) -> Result<Agent, String> {
    let endpoint = client_endpoint(ca, leaf);
    let conn = tokio::time::timeout(
        WAIT,
        endpoint
            .connect(relay.addr, "localhost")
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

    /// HELLO with `uri`, expecting HELLO_ACK.
    async fn hello(&mut self, uri: &str) -> orp::HelloAck {
        match self.call(hello(uri)).await {
            Frame::HelloAck(ack) => ack,
            other => panic!("expected HELLO_ACK, got {other:?}"),
        }
    }

    async fn register(&mut self, name: &str, request_id: u64) -> orp::LeaseGrant {
        self.register_with(orp::LeaseRegister {
            name: name.to_owned(),
            tls: true,
            request_id,
            ..orp::LeaseRegister::default()
        })
        .await
    }

    async fn register_with(&mut self, req: orp::LeaseRegister) -> orp::LeaseGrant {
        match self.call(Frame::LeaseRegister(req)).await {
            Frame::LeaseGrant(g) => g,
            other => panic!("expected LEASE_GRANT, got {other:?}"),
        }
    }

    fn exporter(&self, lease_id: &[u8]) -> [u8; EXPORTER_KEY_BYTES] {
        let mut key = [0u8; EXPORTER_KEY_BYTES];
        self.conn
            .export_keying_material(&mut key, EXPORTER_LABEL, lease_id)
            .expect("exporter");
        key
    }

    /// Waits for the connection to be closed by the relay; its application close code.
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
        capabilities: vec!["leases".to_owned(), "not-a-feature".to_owned()],
    })
}

fn sni(host: &str) -> HostName {
    HostName::parse(host.as_bytes()).expect("host name")
}

fn lease_id(grant: &orp::LeaseGrant) -> LeaseId {
    LeaseId::from_slice(&grant.lease_id).expect("16-byte lease id")
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_ping_and_lease_lifecycle_with_matching_reverse_key() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("agent 1 connects");
    let ack = a.hello(AGENT_1).await;
    assert_eq!(ack.accepted_features, vec!["leases".to_owned()]);
    assert_eq!(ack.session_id.len(), 32, "16 random bytes in hex");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let skew = (i128::from(ack.server_time_unix_ms) - i128::try_from(now_ms).expect("ms")).abs();
    assert!(skew < 60_000, "server time off by {skew} ms");

    assert_eq!(a.call(Frame::Ping).await, Frame::Pong);

    // Register: grant, route, and the same K on both ends.
    let grant = a.register("Demo", 7).await;
    assert_eq!(grant.request_id, 7);
    assert_eq!(grant.hostname, format!("demo.{ROOT_HOST}"));
    assert_eq!(grant.reverse_addr, REVERSE_ADDR);
    let id = lease_id(&grant);
    let snap = relay.shared.load();
    let route = snap
        .routes
        .lookup_sni(&sni("demo.relay.test"))
        .expect("hostname routed");
    assert_eq!(route.lease_id, id);
    let relay_key = snap.reverse_keys.get(&id).expect("reverse key published");
    assert_eq!(
        *relay_key,
        a.exporter(&grant.lease_id),
        "both ends derive the same K"
    );
    assert_ne!(*relay_key, [0u8; EXPORTER_KEY_BYTES]);

    // Renew.
    let renewed = match a
        .call(Frame::LeaseRenew(orp::LeaseRenew {
            lease_id: grant.lease_id.clone(),
            ttl_s: 60,
            request_id: 8,
        }))
        .await
    {
        Frame::LeaseGrant(g) => g,
        other => panic!("expected LEASE_GRANT, got {other:?}"),
    };
    assert_eq!(renewed.request_id, 8);
    assert_eq!(renewed.lease_id, grant.lease_id);
    assert!(
        renewed.expires_unix_ms > grant.expires_unix_ms,
        "renew extends (30 s → 60 s)"
    );

    // Another connection (same tenant) can neither renew nor release it.
    let mut b = connect(&relay, &ca, &ca.leaf(AGENT_2, &[], Eku::Client))
        .await
        .expect("agent 2 connects");
    b.hello(AGENT_2).await;
    for frame in [
        Frame::LeaseRenew(orp::LeaseRenew {
            lease_id: grant.lease_id.clone(),
            ttl_s: 10,
            request_id: 21,
        }),
        Frame::LeaseRelease(orp::LeaseRelease {
            lease_id: grant.lease_id.clone(),
            request_id: 22,
        }),
    ] {
        match b.call(frame).await {
            Frame::LeaseError(e) => assert_eq!(e.code, "lease_not_found"),
            other => panic!("expected LEASE_ERROR, got {other:?}"),
        }
    }
    assert_eq!(relay.stats.lease_errors(LeaseErrorCode::LeaseNotFound), 2);
    assert!(
        relay
            .shared
            .load()
            .routes
            .lookup_sni(&sni("demo.relay.test"))
            .is_some(),
        "the foreign release changed nothing"
    );

    // The holder releases it: LEASE_GRANT with expiry 0, route and key gone.
    match a
        .call(Frame::LeaseRelease(orp::LeaseRelease {
            lease_id: grant.lease_id.clone(),
            request_id: 9,
        }))
        .await
    {
        Frame::LeaseGrant(g) => {
            assert_eq!((g.request_id, g.expires_unix_ms), (9, 0));
            assert_eq!(g.lease_id, grant.lease_id);
        }
        other => panic!("expected LEASE_GRANT, got {other:?}"),
    }
    let snap = relay.shared.load();
    assert!(snap.routes.lookup_sni(&sni("demo.relay.test")).is_none());
    assert!(snap.reverse_keys.is_empty());

    // An invalid name gets invalid_request, counted.
    match a
        .call(Frame::LeaseRegister(orp::LeaseRegister {
            name: "no.dots".to_owned(),
            tls: true,
            request_id: 10,
            ..orp::LeaseRegister::default()
        }))
        .await
    {
        Frame::LeaseError(e) => {
            assert_eq!((e.request_id, e.code.as_str()), (10, "invalid_request"))
        }
        other => panic!("expected LEASE_ERROR, got {other:?}"),
    }
    assert_eq!(relay.stats.lease_errors(LeaseErrorCode::InvalidRequest), 1);
    assert_eq!(relay.stats.frames(outrelay_proto::FrameType::Ping), 1);
    assert_eq!(
        relay.stats.frames(outrelay_proto::FrameType::LeaseRegister),
        2
    );
    assert_eq!(relay.stats.connections_accepted.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_agent_connection_removes_its_routes() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("connects");
    a.hello(AGENT_1).await;
    let grant = a.register("gone", 1).await;
    let id = lease_id(&grant);
    assert!(relay.shared.load().reverse_keys.contains_key(&id));
    a.conn.close(0u32.into(), b"bye");
    let took = eventually("routes removed after close", || {
        let snap = relay.shared.load();
        snap.routes.lookup_sni(&sni("gone.relay.test")).is_none() && snap.reverse_keys.is_empty()
    })
    .await;
    eprintln!("routes removed {took:?} after the agent closed its connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_with_another_agent_uri_closes_the_connection() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("connects");
    a.send(hello(AGENT_2)).await.expect("send HELLO");
    assert!(
        a.recv().await.is_err(),
        "no HELLO_ACK for a mismatched HELLO"
    );
    assert_eq!(
        a.closed_code().await,
        Some(u64::from(close_code::HELLO_MISMATCH))
    );
    assert_eq!(
        relay.stats.refused_hello_mismatch.load(Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hello_in_time_closes_the_connection() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 200);
    let a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("connects");
    assert_eq!(
        a.closed_code().await,
        Some(u64::from(close_code::HELLO_TIMEOUT))
    );
    assert_eq!(relay.stats.refused_hello_timeout.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_not_allowed_on_the_control_stream_closes_it() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("connects");
    a.hello(AGENT_1).await;
    a.send(Frame::HelloAck(orp::HelloAck::default()))
        .await
        .expect("send");
    assert_eq!(
        a.closed_code().await,
        Some(u64::from(close_code::PROTOCOL_ERROR))
    );
    assert_eq!(relay.stats.protocol_errors.load(Ordering::Relaxed), 1);
}

/// Tries HELLO over a connection that the relay must refuse at the handshake.
async fn refused(relay: &Relay, ca: &Ca, leaf: &Leaf) {
    match connect(relay, ca, leaf).await {
        Err(_) => {}
        Ok(mut a) => {
            // TLS 1.3: the client may finish before the server has judged its certificate.
            let _ = a.send(hello(AGENT_1)).await;
            assert!(a.recv().await.is_err(), "a refused client got an answer");
        }
    }
    assert_eq!(relay.stats.connections_accepted.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_certificate_is_refused_at_the_handshake() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    refused(
        &relay,
        &ca,
        &ca.leaf("outrelay://dev/relay/other", &[], Eku::Both),
    )
    .await;
    assert_eq!(relay.stats.refused_bad_role.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let relay = start_relay(&ca, 10_000);
    refused(&relay, &ca, &other.leaf(AGENT_1, &[], Eku::Client)).await;
    assert_eq!(relay.stats.refused_bad_chain.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_goaway_then_closes() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("connects");
    a.hello(AGENT_1).await;
    a.register("bye", 1).await;
    relay.stop.shutdown("upgrade", 250);
    match a.recv().await.expect("GOAWAY") {
        Frame::GoAway(g) => assert_eq!((g.reason.as_str(), g.reconnect_after_ms), ("upgrade", 250)),
        other => panic!("expected GOAWAY, got {other:?}"),
    }
    assert_eq!(
        a.closed_code().await,
        Some(u64::from(close_code::GOING_AWAY))
    );
    tokio::time::timeout(WAIT, relay.task)
        .await
        .expect("run returns after shutdown")
        .expect("run did not panic");
    assert!(
        relay
            .shared
            .load()
            .routes
            .lookup_sni(&sni("bye.relay.test"))
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decider_is_consulted_and_register_and_extra_streams_are_refused() {
    let ca = Ca::new("test CA");
    let decider = |_: &outrelay_proto::Identity, req: &orp::LeaseRegister| {
        if req.name == "manual" {
            ControllerDecision::PendingApproval
        } else {
            ControllerDecision::Approved
        }
    };
    let relay = start_relay_with(&ca, 10_000, |_| {}, Arc::new(decider));
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("connects");
    a.hello(AGENT_1).await;
    match a
        .call(Frame::LeaseRegister(orp::LeaseRegister {
            name: "manual".to_owned(),
            tls: true,
            request_id: 3,
            ..orp::LeaseRegister::default()
        }))
        .await
    {
        Frame::LeaseError(e) => {
            assert_eq!(
                (e.code.as_str(), e.message.as_str()),
                ("lease_rejected", "pending_approval")
            );
        }
        other => panic!("expected LEASE_ERROR, got {other:?}"),
    }
    assert_eq!(relay.stats.lease_errors(LeaseErrorCode::LeaseRejected), 1);
    a.register("auto", 4).await;

    // Service registration is not served yet: a clear STREAM_REJECT, not silence.
    match a
        .call(Frame::Register(orp::Register {
            service_name: "web".to_owned(),
            local_addr: "127.0.0.1:80".to_owned(),
            request_id: 5,
        }))
        .await
    {
        Frame::StreamReject(r) => assert_eq!((r.code, r.request_id), (503, 5)),
        other => panic!("expected STREAM_REJECT, got {other:?}"),
    }

    // A second bidirectional stream (OPEN_STREAM) is refused; the control stream lives on.
    let (mut send, mut recv) = a.conn.open_bi().await.expect("open stream");
    let open = Frame::OpenStream(orp::OpenStream {
        target_service: "web".to_owned(),
        method: "GET".to_owned(),
        stream_id: 1,
    });
    let _ = send.write_all(&open.to_vec().expect("encode")).await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, recv.read(&mut byte))
        .await
        .expect("stream refused in time");
    assert!(read.is_err(), "the extra stream is reset, got {read:?}");
    assert_eq!(relay.stats.streams_refused.load(Ordering::Relaxed), 1);
    assert_eq!(a.call(Frame::Ping).await, Frame::Pong);
}

/// One thread: the writer task cannot drain the queue while the control loop answers a burst,
/// so a queue of one frame overflows on the second PONG.
#[tokio::test(flavor = "current_thread")]
async fn a_full_control_send_queue_drops_the_connection() {
    let ca = Ca::new("test CA");
    let relay = start_relay_with(
        &ca,
        10_000,
        |c| c.control_send_queue_max = 1,
        Arc::new(ApproveAll),
    );
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("connects");
    a.hello(AGENT_1).await;
    let mut burst = Vec::new();
    for _ in 0..64 {
        Frame::Ping.encode(&mut burst).expect("encode");
    }
    a.send.write_all(&burst).await.expect("send burst");
    assert_eq!(
        a.closed_code().await,
        Some(u64::from(close_code::SEND_QUEUE_OVERFLOW))
    );
    assert_eq!(relay.stats.send_queue_overflows.load(Ordering::Relaxed), 1);
}

// ---------- UDP leases ----------

fn udp_lease(name: &str, request_id: u64) -> orp::LeaseRegister {
    orp::LeaseRegister {
        name: name.to_owned(),
        udp: true,
        request_id,
        ..orp::LeaseRegister::default()
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("port in {addr:?}"))
}

/// A datagram as an agent sends it: header, then payload.
fn datagram(slot: u32, flow_id: u64, payload: &[u8]) -> bytes::Bytes {
    let header = DatagramHeader {
        udp_slot: slot,
        flow_id,
    };
    let mut out = vec![0u8; header.encoded_len()];
    header.encode(&mut out);
    out.extend_from_slice(payload);
    out.into()
}

/// The next datagram the relay sends to `agent`: (header, payload).
async fn next_datagram(agent: &Agent) -> (DatagramHeader, Vec<u8>) {
    let d = tokio::time::timeout(WAIT, agent.conn.read_datagram())
        .await
        .expect("a datagram in time")
        .expect("connection alive");
    let (h, payload) = DatagramHeader::decode(&d).expect("relay header");
    (h, payload.to_vec())
}

async fn recv_from(socket: &tokio::net::UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .expect("a reply in time")
        .expect("recv");
    buf.truncate(n);
    buf
}

async fn client(port: u16) -> tokio::net::UdpSocket {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind client");
    s.connect(("127.0.0.1", port))
        .await
        .expect("connect client");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_carry_datagrams_both_ways_within_the_abuse_limits() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let stats = relay.udp.stats.clone();
    let drops = |r: UdpDrop| stats.drops(r);
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("agent 1 connects");
    a.hello(AGENT_1).await;
    let g = a.register_with(udp_lease("dns", 1)).await;
    assert_eq!(g.udp_slot, 1);
    let port = port_of(&g.udp_addr);
    eventually("the UDP lease port is bound", || {
        stats.ports_bound.load(Ordering::Relaxed) == 1
    })
    .await;

    // Two client source ports: two flows, counted up from 1, replies to the right client.
    let (c1, c2) = (client(port).await, client(port).await);
    c1.send(b"one").await.expect("send");
    let (h1, p1) = next_datagram(&a).await;
    c2.send(b"two-two").await.expect("send");
    let (h2, p2) = next_datagram(&a).await;
    assert_eq!(
        (h1.udp_slot, h1.flow_id, p1.as_slice()),
        (1, 1, &b"one"[..])
    );
    assert_eq!(
        (h2.udp_slot, h2.flow_id, p2.as_slice()),
        (1, 2, &b"two-two"[..])
    );
    a.conn
        .send_datagram(datagram(1, 2, b"to-two"))
        .expect("send");
    a.conn
        .send_datagram(datagram(1, 1, b"to-one"))
        .expect("send");
    assert_eq!(recv_from(&c2).await, b"to-two");
    assert_eq!(recv_from(&c1).await, b"to-one");

    // Amplification: c1 sent 3 bytes, so 9 may come back; 6 did. 4 more are dropped, 3 pass.
    a.conn.send_datagram(datagram(1, 1, b"abcd")).expect("send");
    eventually("the amplification drop is counted", || {
        drops(UdpDrop::Amplification) == 1
    })
    .await;
    a.conn.send_datagram(datagram(1, 1, b"xyz")).expect("send");
    assert_eq!(
        recv_from(&c1).await,
        b"xyz",
        "the 4-byte reply never arrived"
    );

    // A flow id the relay never created.
    a.conn.send_datagram(datagram(1, 99, b"who")).expect("send");
    eventually("the unknown flow is counted", || {
        drops(UdpDrop::UnknownFlow) == 1
    })
    .await;

    // Too large: read the current maximum, then send one byte more and exactly the maximum.
    let max = usize::try_from(stats.payload_max_bytes.load(Ordering::Relaxed)).expect("usize");
    eprintln!("MEASURED UDP payload maximum on this connection: {max} bytes");
    assert!(max >= 1_000, "payload max {max}");
    c1.send(&vec![7u8; max + 1]).await.expect("send");
    eventually("the oversized datagram is counted", || {
        drops(UdpDrop::TooLarge) == 1
    })
    .await;
    c1.send(&vec![8u8; max]).await.expect("send");
    let (h, p) = next_datagram(&a).await;
    assert_eq!(
        (h.flow_id, p.len()),
        (1, max),
        "the largest datagram arrives whole"
    );
    assert!(p.iter().all(|b| *b == 8));

    // Flow cap (3): a third client gets flow 3, a fourth is dropped.
    let (c3, c4) = (client(port).await, client(port).await);
    c3.send(b"three").await.expect("send");
    let (h3, _) = next_datagram(&a).await;
    assert_eq!(h3.flow_id, 3);
    c4.send(b"four").await.expect("send");
    eventually("the flow cap is counted", || drops(UdpDrop::FlowLimit) == 1).await;

    // Another connection cannot reach this lease: its own slot 1 has no flows, and slot 2
    // (granted to agent 1 only) does not exist for it.
    let g2 = a.register_with(udp_lease("second", 2)).await;
    assert_eq!(g2.udp_slot, 2);
    let mut b = connect(&relay, &ca, &ca.leaf(AGENT_2, &[], Eku::Client))
        .await
        .expect("agent 2 connects");
    b.hello(AGENT_2).await;
    let gb = b.register_with(udp_lease("other", 3)).await;
    assert_eq!(gb.udp_slot, 1, "slots are per connection");
    b.conn
        .send_datagram(datagram(2, 1, b"spoof"))
        .expect("send");
    eventually("a slot of another connection is counted", || {
        drops(UdpDrop::UnknownSlot) == 1
    })
    .await;
    b.conn
        .send_datagram(datagram(1, 1, b"spoof"))
        .expect("send");
    eventually("a flow of another lease is counted", || {
        drops(UdpDrop::UnknownFlow) == 2
    })
    .await;
    // c1 received neither: the next datagram it gets is this marker (within budget: c1 sent
    // max + 1 + max bytes since).
    a.conn
        .send_datagram(datagram(1, 1, b"marker"))
        .expect("send");
    assert_eq!(recv_from(&c1).await, b"marker");
    assert_eq!(stats.flows_active.load(Ordering::Relaxed), 3);
}
