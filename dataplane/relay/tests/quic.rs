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
use outrelay_relay::lease::{ControllerDecision, InheritedLease};
use outrelay_relay::lease::{LeaseConfig, LeaseErrorCode, LeaseTable, PortLeaseConfig};
use outrelay_relay::mesh::policy::StaticRule;
use outrelay_relay::mesh::{
    Mesh, MeshBackend, MeshConfig, MeshResult, RegisterFuture, Registration, Standalone,
};
use outrelay_relay::quic::{
    ApproveAll, DRAIN_REASON, DrainHandle, LeaseDecider, QuicConfig, QuicServer, QuicStats,
    RelayHandle, ShutdownHandle, TlsMaterial, close_code,
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
    drain: DrainHandle,
    handle: RelayHandle,
    task: tokio::task::JoinHandle<()>,
    /// The forwarding pool (relays with a mesh).
    forward: Option<Arc<outrelay_relay::forward::Peers>>,
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
    start_relay_full(ca, hello_deadline_ms, tweak, decider, None)
}

fn start_relay_full(
    ca: &Ca,
    hello_deadline_ms: u64,
    tweak: impl FnOnce(&mut QuicConfig),
    decider: Arc<dyn LeaseDecider>,
    mesh: Option<Arc<Mesh>>,
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
    let forward = mesh.map(|mesh| {
        server.serve_mesh(mesh);
        server
            .serve_forward(outrelay_relay::forward::ForwardConfig::default())
            .expect("forwarding")
    });
    udp.serve();
    assert_eq!(server.identity().to_string(), RELAY);
    let addr = server.local_addr().expect("local addr");
    let stats = server.stats();
    let stop = server.shutdown_handle();
    let drain = server.drain_handle();
    let handle = server.handle();
    let task = tokio::spawn(server.run());
    Relay {
        addr,
        shared,
        stats,
        stop,
        drain,
        handle,
        task,
        forward,
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
        capabilities: vec![
            "leases".to_owned(),
            "stream_accept".to_owned(),
            "not-a-feature".to_owned(),
        ],
    })
}

/// HELLO as the Go OutRelay agent sends it: no capabilities.
fn go_hello(uri: &str) -> Frame {
    Frame::Hello(orp::Hello {
        protocol_version: "orp/1".to_owned(),
        agent_uri: uri.to_owned(),
        capabilities: Vec::new(),
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
    assert_eq!(
        ack.accepted_features,
        vec!["leases".to_owned(), "stream_accept".to_owned()]
    );
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
async fn unknown_and_unexpected_control_frames_are_counted_and_skipped() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("connects");
    a.hello(AGENT_1).await;
    // A type no one defines (0x7ee, with a payload), and one only a relay sends.
    let mut unknown = vec![0x27, 0xee, 0, 0, 0, 0, 0, 3];
    unknown.extend_from_slice(b"xyz");
    a.send.write_all(&unknown).await.expect("send");
    a.send(Frame::HelloAck(orp::HelloAck::default()))
        .await
        .expect("send");
    // Still served: PING gets its PONG.
    assert_eq!(a.call(Frame::Ping).await, Frame::Pong);
    assert_eq!(relay.stats.frames_unknown.load(Ordering::Relaxed), 1);
    assert_eq!(relay.stats.frames_ignored.load(Ordering::Relaxed), 1);
    assert_eq!(relay.stats.protocol_errors.load(Ordering::Relaxed), 0);
    // A malformed payload of a known type is still a protocol error.
    a.send
        .write_all(&[0x20, 0x20, 0, 0, 0, 0, 0, 1, 0xff])
        .await
        .expect("send");
    assert_eq!(
        a.closed_code().await,
        Some(u64::from(close_code::PROTOCOL_ERROR))
    );
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
async fn an_admin_certificate_is_refused_at_the_handshake() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    refused(
        &relay,
        &ca,
        &ca.leaf("outrelay://system/admin/ops", &[], Eku::Both),
    )
    .await;
    assert_eq!(relay.stats.refused_bad_role.load(Ordering::Relaxed), 1);
}

/// A relay certificate passes the handshake (peer relays forward streams, issue 22) but never
/// gets an agent session: without forwarding served, its connection is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_certificate_gets_no_agent_session() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let leaf = ca.leaf("outrelay://dev/relay/other", &[], Eku::Both);
    match connect(&relay, &ca, &leaf).await {
        // Closed by the relay after the handshake, with the reason.
        Err(e) => assert!(e.contains("forwarding is not served"), "{e}"),
        Ok(mut a) => {
            let _ = a.send(hello(AGENT_1)).await;
            assert!(a.recv().await.is_err(), "a relay got a HELLO_ACK");
            assert_eq!(
                a.closed_code().await,
                Some(u64::from(close_code::STREAM_UNSUPPORTED))
            );
        }
    }
    assert_eq!(relay.stats.connections_accepted.load(Ordering::Relaxed), 1);
    assert_eq!(relay.stats.refused_bad_role.load(Ordering::Relaxed), 0);
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
async fn a_draining_relay_sends_goaway_refuses_new_leases_and_new_connections() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("connects");
    a.hello(AGENT_1).await;
    let held = a.register("held", 1).await;
    assert!(!relay.drain.is_draining());
    assert_eq!(relay.drain.agents(), 1);

    assert!(relay.drain.drain(750), "the first drain starts it");
    assert!(!relay.drain.drain(750), "a second drain changes nothing");
    assert!(relay.drain.is_draining());
    match a.recv().await.expect("GOAWAY") {
        Frame::GoAway(g) => assert_eq!(
            (g.reason.as_str(), g.reconnect_after_ms),
            (DRAIN_REASON, 750)
        ),
        other => panic!("expected GOAWAY, got {other:?}"),
    }
    // The connection is still served until the agent leaves: a new lease is refused with
    // `draining`, the held one still renews.
    match a
        .call(Frame::LeaseRegister(orp::LeaseRegister {
            name: "fresh".to_owned(),
            tls: true,
            request_id: 2,
            ..orp::LeaseRegister::default()
        }))
        .await
    {
        Frame::LeaseError(e) => {
            assert_eq!((e.code.as_str(), e.request_id), ("draining", 2));
        }
        other => panic!("expected LEASE_ERROR, got {other:?}"),
    }
    assert_eq!(relay.stats.lease_errors(LeaseErrorCode::Draining), 1);
    match a
        .call(Frame::LeaseRenew(orp::LeaseRenew {
            lease_id: held.lease_id.clone(),
            ttl_s: 60,
            request_id: 3,
        }))
        .await
    {
        Frame::LeaseGrant(g) => assert_eq!(g.lease_id, held.lease_id),
        other => panic!("expected LEASE_GRANT, got {other:?}"),
    }

    // A new connection is closed right after the handshake with DRAINING, counted.
    let b = connect(&relay, &ca, &ca.leaf(AGENT_2, &[], Eku::Client)).await;
    if let Ok(b) = b {
        assert_eq!(b.closed_code().await, Some(u64::from(close_code::DRAINING)));
    }
    eventually("the refusal is counted", || {
        relay.stats.refused_draining.load(Ordering::Relaxed) == 1
    })
    .await;

    // An agent that ignores GOAWAY is closed at the drain grace; its lease then ends.
    assert_eq!(
        a.closed_code().await,
        Some(u64::from(close_code::GOING_AWAY))
    );
    eventually("the lease ends with its connection", || {
        relay.shared.load().reverse_keys.is_empty() && relay.drain.agents() == 0
    })
    .await;
    assert!(
        !relay.task.is_finished(),
        "draining does not stop the relay"
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

/// Sends from `client` every 100 ms until the relay forwards a datagram to `agent` (the lease
/// port is bound a moment after the grant); its header and payload.
async fn first_datagram(
    agent: &Agent,
    client: &tokio::net::UdpSocket,
    payload: &[u8],
) -> (DatagramHeader, Vec<u8>) {
    let start = Instant::now();
    loop {
        client.send(payload).await.expect("send");
        if let Ok(Ok(d)) =
            tokio::time::timeout(Duration::from_millis(100), agent.conn.read_datagram()).await
        {
            let (h, p) = DatagramHeader::decode(&d).expect("relay header");
            return (h, p.to_vec());
        }
        assert!(start.elapsed() < WAIT, "no datagram reached the agent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_lease_registered_again_on_the_same_connection_gets_new_flow_ids() {
    // Review M4: ids restarted at 1 for the new lease, and the agent still mapped the old
    // lease's (slot, flow id) to the old client's local socket.
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("agent connects");
    a.hello(AGENT_1).await;
    let g1 = a.register_with(udp_lease("game", 1)).await;
    let port = port_of(&g1.udp_addr);
    let (c1, c2) = (client(port).await, client(port).await);
    let (h1, _) = first_datagram(&a, &c1, b"A-secret").await;
    c2.send(b"second").await.expect("send");
    let (h2, _) = next_datagram(&a).await;
    let old = [h1.flow_id, h2.flow_id];
    match a
        .call(Frame::LeaseRelease(orp::LeaseRelease {
            lease_id: g1.lease_id.clone(),
            request_id: 2,
        }))
        .await
    {
        Frame::LeaseGrant(g) => assert_eq!(g.expires_unix_ms, 0, "released"),
        other => panic!("expected LEASE_GRANT, got {other:?}"),
    }
    let g2 = a.register_with(udp_lease("game", 3)).await;
    assert_ne!(g2.lease_id, g1.lease_id);
    assert_eq!(
        (g2.udp_slot, port_of(&g2.udp_addr)),
        (g1.udp_slot, port),
        "same slot, sticky port: the case where ids collided"
    );
    let c3 = client(port).await;
    let (h3, p3) = first_datagram(&a, &c3, b"hello").await;
    assert_eq!((h3.udp_slot, p3.as_slice()), (g2.udp_slot, &b"hello"[..]));
    assert!(
        !old.contains(&h3.flow_id),
        "the new lease's first flow reused id {} of {old:?}",
        h3.flow_id
    );
    // The old client is a new flow of the new lease too, with a new id.
    c1.send(b"back").await.expect("send");
    let (h4, _) = next_datagram(&a).await;
    assert!(!old.contains(&h4.flow_id) && h4.flow_id != h3.flow_id);
    // A reply on an old id reaches nobody.
    a.conn
        .send_datagram(datagram(g2.udp_slot, h2.flow_id, b"stale"))
        .expect("send");
    a.conn
        .send_datagram(datagram(g2.udp_slot, h3.flow_id, b"to-three"))
        .expect("send");
    assert_eq!(recv_from(&c3).await, b"to-three");
    let mut buf = [0u8; 16];
    assert!(c2.try_recv(&mut buf).is_err(), "a stale id reached c2");
}

// ---------- service streams (REGISTER / OPEN_STREAM) ----------

const OTHER_TENANT_AGENT: &str = "outrelay://other/agent/00000000-0000-4000-8000-000000000003";

/// Keeps every audit row (the standalone backend only logs them).
#[derive(Default)]
struct AuditLog(std::sync::Mutex<Vec<outrelay_api::pb::AuditEvent>>);

impl MeshBackend for AuditLog {
    fn register(&self, reg: Registration) -> RegisterFuture {
        Standalone.register(reg)
    }
    fn deregister(&self, _: &str, _: &str, _: Vec<Registration>) {}
    fn audit(&self, event: outrelay_api::pb::AuditEvent) {
        self.0.lock().expect("audit lock").push(event);
    }
}

fn allow(tenant: &str, caller: &str, target: &str) -> StaticRule {
    StaticRule {
        tenant: tenant.into(),
        caller: caller.into(),
        target: target.into(),
        method: String::new(),
        allow: true,
    }
}

fn deny(tenant: &str, caller: &str, target: &str) -> StaticRule {
    StaticRule {
        allow: false,
        ..allow(tenant, caller, target)
    }
}

fn rules(list: &[StaticRule]) -> Vec<outrelay_api::pb::PolicyRule> {
    list.iter().enumerate().map(|(i, r)| r.to_rule(i)).collect()
}

struct MeshWorld {
    relay: Relay,
    mesh: Arc<Mesh>,
    audit: Arc<AuditLog>,
    ca: Ca,
}

fn mesh_world(policy: &[StaticRule]) -> MeshWorld {
    mesh_world_with(policy, |_| {})
}

/// [`mesh_world`] with the mesh settings changed by `tweak` (e.g. `[resume]`).
fn mesh_world_with(policy: &[StaticRule], tweak: impl FnOnce(&mut MeshConfig)) -> MeshWorld {
    let ca = Ca::new("test CA");
    let audit = Arc::new(AuditLog::default());
    let mut config = MeshConfig {
        open_timeout_ms: 2_000,
        ..MeshConfig::default()
    };
    tweak(&mut config);
    let mesh = Mesh::new(config, "relay-1".into(), audit.clone());
    mesh.set_policy(rules(policy));
    let relay = start_relay_full(
        &ca,
        10_000,
        |_| {},
        Arc::new(ApproveAll),
        Some(mesh.clone()),
    );
    MeshWorld {
        relay,
        mesh,
        audit,
        ca,
    }
}

impl MeshWorld {
    /// A test peer relay (`relay-9`, a relay certificate of the CA) connected to the relay.
    async fn peer_relay(&self) -> Agent {
        let peer = self.ca.leaf("outrelay://dev/relay/relay-9", &[], Eku::Both);
        connect(&self.relay, &self.ca, &peer)
            .await
            .expect("a peer relay connects")
    }

    async fn agent(&self, uri: &str) -> Agent {
        let mut a = connect(&self.relay, &self.ca, &self.ca.leaf(uri, &[], Eku::Client))
            .await
            .expect("connects");
        a.hello(uri).await;
        a
    }
}

impl Agent {
    async fn provide(&mut self, service: &str, request_id: u64) -> Frame {
        self.call(Frame::Register(orp::Register {
            service_name: service.to_owned(),
            local_addr: "127.0.0.1:8080".to_owned(),
            request_id,
        }))
        .await
    }

    /// Opens a stream with OPEN_STREAM; the relay's one answer and the stream.
    async fn open(
        &self,
        service: &str,
        method: &str,
        stream_id: u64,
    ) -> (Frame, quinn::SendStream, quinn::RecvStream) {
        let (send, mut recv) = send_open(&self.conn, service, method, stream_id).await;
        let answer = read_one(&mut recv).await;
        (answer, send, recv)
    }

    /// Accepts the relay's next stream: its INCOMING_STREAM and the stream.
    async fn incoming(&self) -> (orp::IncomingStream, quinn::SendStream, quinn::RecvStream) {
        let (send, mut recv) = tokio::time::timeout(WAIT, self.conn.accept_bi())
            .await
            .expect("incoming stream in time")
            .expect("accept_bi");
        match read_one(&mut recv).await {
            Frame::IncomingStream(i) => (i, send, recv),
            other => panic!("expected INCOMING_STREAM, got {other:?}"),
        }
    }
}

/// Reads exactly one frame from the start of a stream (nothing beyond it).
async fn read_one(recv: &mut quinn::RecvStream) -> Frame {
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

/// Opens a stream on `conn` and writes OPEN_STREAM (as a Go consumer does, waiting for no
/// answer): the stream.
async fn send_open(
    conn: &quinn::Connection,
    service: &str,
    method: &str,
    stream_id: u64,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.expect("open stream");
    let open = Frame::OpenStream(orp::OpenStream {
        target_service: service.to_owned(),
        method: method.to_owned(),
        stream_id,
    });
    write_frame(&mut send, open).await;
    (send, recv)
}

async fn write_frame(send: &mut quinn::SendStream, frame: Frame) {
    send.write_all(&frame.to_vec().expect("encode"))
        .await
        .expect("write frame");
}

fn reject_code(f: &Frame) -> u32 {
    match f {
        Frame::StreamReject(r) => r.code,
        other => panic!("expected STREAM_REJECT, got {other:?}"),
    }
}

/// Sends `len` pseudo-random bytes then FIN; returns their SHA-256.
async fn send_bulk(send: &mut quinn::SendStream, len: usize, seed: u8) -> Vec<u8> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut block = vec![0u8; 64 * 1024];
    let mut sent = 0;
    let mut x = u32::from(seed) + 1;
    while sent < len {
        for b in &mut block {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x.to_le_bytes()[0];
        }
        let n = block.len().min(len - sent);
        hash.update(&block[..n]);
        send.write_all(&block[..n]).await.expect("bulk write");
        sent += n;
    }
    send.finish().expect("finish");
    hash.finalize().to_vec()
}

/// Reads to FIN; returns the byte count and SHA-256.
async fn recv_bulk(recv: &mut quinn::RecvStream) -> (usize, Vec<u8>) {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut n = 0;
    while let Some(chunk) = recv.read_chunk(1 << 20, true).await.expect("bulk read") {
        n += chunk.bytes.len();
        hash.update(&chunk.bytes);
    }
    (n, hash.finalize().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_stream_is_registered_opened_joined_and_half_closed() {
    let w = mesh_world(&[allow("demo", "*", "pay")]);
    let mut provider = w.agent(AGENT_2).await;
    match provider.provide("pay", 11).await {
        Frame::RegisterAck(ack) => {
            assert_eq!((ack.service_id.as_str(), ack.request_id), ("demo/pay", 11))
        }
        other => panic!("expected REGISTER_ACK, got {other:?}"),
    }
    let mut consumer = w.agent(AGENT_1).await;
    let opening = consumer.open("pay", "charge", 42);
    let accepting = async {
        let (inc, mut send, recv) = provider.incoming().await;
        assert_eq!(
            (
                inc.target_service.as_str(),
                inc.method.as_str(),
                inc.source_agent_uri.as_str(),
                inc.stream_id
            ),
            ("pay", "charge", AGENT_1, 42)
        );
        write_frame(&mut send, Frame::StreamAccept(orp::StreamAccept::default())).await;
        (send, recv)
    };
    let ((answer, mut c_send, mut c_recv), (mut p_send, mut p_recv)) =
        tokio::join!(opening, accepting);
    assert_eq!(answer, Frame::StreamAccept(orp::StreamAccept::default()));
    for (agent, peer) in [(&mut consumer, AGENT_2), (&mut provider, AGENT_1)] {
        match agent.recv().await.expect("STREAM_READY") {
            Frame::StreamReady(r) => {
                assert_eq!((r.stream_id, r.peer_agent_uri.as_str()), (42, peer))
            }
            other => panic!("expected STREAM_READY, got {other:?}"),
        }
    }

    // 8 MiB up, FIN; the provider still answers with 8 MiB after it saw the FIN (half-close).
    const LEN: usize = 8 << 20;
    let up = async {
        let (sent, got) = tokio::join!(send_bulk(&mut c_send, LEN, 1), recv_bulk(&mut p_recv));
        assert_eq!(got, (LEN, sent), "consumer → provider bytes");
        send_bulk(&mut p_send, LEN, 2).await
    };
    let (sent_down, got_down) = tokio::join!(up, recv_bulk(&mut c_recv));
    assert_eq!(got_down, (LEN, sent_down), "provider → consumer bytes");
    assert_eq!(w.mesh.stats.result(MeshResult::Accepted), 1);

    // Both decisions audited with the stream id.
    let rows = w.audit.0.lock().expect("audit").clone();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.stream_id == "42"
        && r.decision == outrelay_api::pb::Decision::Allow as i32
        && r.kind == "stream"));
    assert_eq!(
        (rows[0].caller.as_str(), rows[0].target.as_str()),
        (AGENT_1, "pay")
    );
    assert!(
        rows[0].reason.starts_with("caller-side: rule static-0"),
        "{}",
        rows[0].reason
    );
    assert_eq!(
        (rows[1].caller.as_str(), rows[1].target.as_str()),
        (AGENT_2, AGENT_1)
    );
    assert!(
        rows[1].reason.starts_with("callee-side: no matching rule"),
        "{}",
        rows[1].reason
    );

    // The provider's connection ends: its service goes with it.
    provider.conn.close(0u32.into(), b"bye");
    let took = eventually("service deregistered", || {
        matches!(
            w.mesh.resolve("demo", "pay"),
            outrelay_relay::mesh::Resolved::NotFound
        )
    })
    .await;
    eprintln!("MEASURED: service gone {took:?} after the provider closed");
    let (answer, _, _) = consumer.open("pay", "", 43).await;
    assert_eq!(reject_code(&answer), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_opens_are_refused_with_the_specified_codes() {
    let w = mesh_world(&[
        allow("demo", "*", "*"),
        deny("demo", "*", "secret"),
        deny("demo", AGENT_2, AGENT_1),
        allow("other", "*", "*"),
    ]);
    let mut provider = w.agent(AGENT_2).await;
    for (i, name) in ["pay", "secret", "picky"].iter().enumerate() {
        assert!(matches!(
            provider.provide(name, i as u64 + 1).await,
            Frame::RegisterAck(_)
        ));
    }
    let consumer = w.agent(AGENT_1).await;

    // 403: an exact-target deny beats the wildcard allow.
    let (answer, _, _) = consumer.open("secret", "", 1).await;
    assert_eq!(reject_code(&answer), 403);
    // 403: the provider's callee-side deny names this consumer.
    let (answer, _, _) = consumer.open("pay", "", 2).await;
    assert_eq!(reject_code(&answer), 403);
    // 404: nobody provides it.
    let (answer, _, _) = consumer.open("nope", "", 3).await;
    assert_eq!(reject_code(&answer), 404);
    // Tenant isolation: tenant `other` may call anything of its own, and `pay` is not its.
    let stranger = w.agent(OTHER_TENANT_AGENT).await;
    let (answer, _, _) = stranger.open("pay", "", 4).await;
    assert_eq!(reject_code(&answer), 404);

    // Without the callee-side deny (third consumer identity) the provider is asked; it
    // rejects (no handler) → 503; then it accepts one, and a second open with the same id → 409.
    w.mesh.set_policy(rules(&[allow("demo", "*", "*")]));
    let open = consumer.open("picky", "unknown", 5);
    let refuse = async {
        let (inc, mut send, _recv) = provider.incoming().await;
        assert_eq!(inc.stream_id, 5);
        write_frame(
            &mut send,
            Frame::StreamReject(orp::StreamReject {
                code: 404,
                reason: "no handler".into(),
                request_id: 0,
            }),
        )
        .await;
    };
    let ((answer, _, _), ()) = tokio::join!(open, refuse);
    assert_eq!(reject_code(&answer), 503);

    let open = consumer.open("pay", "", 7);
    let accept = async {
        let (_, mut send, recv) = provider.incoming().await;
        write_frame(&mut send, Frame::StreamAccept(orp::StreamAccept::default())).await;
        (send, recv)
    };
    let ((answer, _c_send, mut c_recv), (_p_send, _p_recv)) = tokio::join!(open, accept);
    assert_eq!(answer, Frame::StreamAccept(orp::StreamAccept::default()));
    let (answer, _, _) = consumer.open("pay", "", 7).await;
    assert_eq!(reject_code(&answer), 409);
    for (r, n) in [
        (MeshResult::Denied, 2),
        (MeshResult::NotFound, 2),
        (MeshResult::ProviderRejected, 1),
        (MeshResult::Collision, 1),
        (MeshResult::Accepted, 1),
    ] {
        assert_eq!(w.mesh.stats.result(r), n, "{r:?}");
    }

    // A policy change cuts the live stream (both halves), well within 1 s.
    let changed = Instant::now();
    w.mesh.set_policy(rules(&[allow("demo", "*", "secret")]));
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, c_recv.read(&mut byte))
        .await
        .expect("cut in time");
    let took = changed.elapsed();
    eprintln!("MEASURED: live stream cut {took:?} after the policy change (target 1 s)");
    assert!(
        matches!(read, Err(quinn::ReadError::Reset(code)) if code.into_inner() == u64::from(close_code::POLICY_CUT)),
        "{read:?}"
    );
    assert_eq!(w.mesh.stats.cut_policy.load(Ordering::Relaxed), 1);

    // A stream that does not start with OPEN_STREAM is reset; the connection lives on.
    let (mut send, mut recv) = consumer.conn.open_bi().await.expect("open");
    write_frame(&mut send, Frame::Ping).await;
    let read = tokio::time::timeout(WAIT, recv.read(&mut byte))
        .await
        .expect("reset in time");
    assert!(read.is_err(), "{read:?}");
    assert_eq!(w.mesh.stats.result(MeshResult::ProtocolError), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_any_policy_every_open_is_refused() {
    let ca = Ca::new("test CA");
    let mesh = Mesh::new(
        MeshConfig::default(),
        "relay-1".into(),
        Arc::new(Standalone),
    );
    let relay = start_relay_full(
        &ca,
        10_000,
        |_| {},
        Arc::new(ApproveAll),
        Some(mesh.clone()),
    );
    let w = MeshWorld {
        relay,
        mesh,
        audit: Arc::new(AuditLog::default()),
        ca,
    };
    let mut provider = w.agent(AGENT_2).await;
    assert!(matches!(
        provider.provide("pay", 1).await,
        Frame::RegisterAck(_)
    ));
    // Invalid names are refused with the request id.
    match provider.provide("has space", 2).await {
        Frame::StreamReject(r) => assert_eq!((r.code, r.request_id), (400, 2)),
        other => panic!("expected STREAM_REJECT, got {other:?}"),
    }
    let consumer = w.agent(AGENT_1).await;
    let (answer, _, _) = consumer.open("pay", "", 9).await;
    assert_eq!(reject_code(&answer), 403);
}

// ---------- who may provide a service and hold a name (review M12) ----------

const AGENT_3: &str = "outrelay://demo/agent/00000000-0000-4000-8000-000000000003";

/// A provide rule: `caller` may provide `service` in `tenant`.
fn provide(tenant: &str, caller: &str, service: &str) -> StaticRule {
    StaticRule {
        method: outrelay_relay::mesh::policy::PROVIDE_METHOD.into(),
        ..allow(tenant, caller, service)
    }
}

/// Opens `service` from `consumer` and accepts it on `provider`: the joined stream pair
/// (consumer send/recv, provider send/recv) after both STREAM_READYs.
async fn join(
    consumer: &mut Agent,
    provider: &mut Agent,
    service: &str,
    stream_id: u64,
) -> (
    (quinn::SendStream, quinn::RecvStream),
    (quinn::SendStream, quinn::RecvStream),
) {
    let opening = consumer.open(service, "", stream_id);
    let accepting = async {
        let (inc, mut send, recv) = provider.incoming().await;
        assert_eq!(inc.stream_id, stream_id);
        write_frame(&mut send, Frame::StreamAccept(orp::StreamAccept::default())).await;
        (send, recv)
    };
    let ((answer, c_send, c_recv), p) = tokio::join!(opening, accepting);
    assert_eq!(answer, Frame::StreamAccept(orp::StreamAccept::default()));
    for agent in [consumer, provider] {
        assert!(matches!(
            agent.recv().await.expect("STREAM_READY"),
            Frame::StreamReady(r) if r.stream_id == stream_id
        ));
    }
    ((c_send, c_recv), p)
}

/// Writes `msg` on one half and reads exactly it on the other.
async fn echo(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, msg: &[u8]) {
    send.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, recv.read_exact(&mut got))
        .await
        .expect("bytes in time")
        .expect("read");
    assert_eq!(got, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_agent_of_the_tenant_cannot_take_a_service_without_a_provide_rule() {
    let w = mesh_world(&[allow("demo", "*", "payments")]);
    let mut p = w.agent(AGENT_2).await;
    assert!(matches!(
        p.provide("payments", 1).await,
        Frame::RegisterAck(_)
    ));
    let mut consumer = w.agent(AGENT_1).await;
    // A stream to P is live while X tries.
    let ((mut c_send, mut c_recv), (mut p_send, mut p_recv)) =
        join(&mut consumer, &mut p, "payments", 1).await;

    // X, same tenant, no rule: refused with 409 `service_taken`, counted.
    let mut x = w.agent(AGENT_3).await;
    match x.provide("payments", 7).await {
        Frame::StreamReject(r) => {
            assert_eq!((r.code, r.request_id), (409, 7), "{r:?}");
            assert!(r.reason.starts_with("service_taken"), "{}", r.reason);
        }
        other => panic!("expected STREAM_REJECT, got {other:?}"),
    }
    assert_eq!(w.mesh.stats.registrations_taken.load(Ordering::Relaxed), 1);
    // P's live stream keeps working both ways, and a new consumer stream reaches P.
    echo(&mut c_send, &mut p_recv, b"to P").await;
    echo(&mut p_send, &mut c_recv, b"from P").await;
    let ((mut c2_send, _c2_recv), (_p2_send, mut p2_recv)) =
        join(&mut consumer, &mut p, "payments", 2).await;
    echo(&mut c2_send, &mut p2_recv, b"still P").await;
    // P registering again (as after a reconnect) keeps it.
    assert!(matches!(
        p.provide("payments", 2).await,
        Frame::RegisterAck(_)
    ));

    // An operator rule lets X provide `payments`: X joins P (issue 22) and, with no live
    // stream against P's two, takes the next one; P's live streams are untouched.
    w.mesh.set_policy(rules(&[
        allow("demo", "*", "payments"),
        provide("demo", AGENT_3, "payments"),
    ]));
    assert!(matches!(
        x.provide("payments", 8).await,
        Frame::RegisterAck(_)
    ));
    let ((mut c3_send, _c3_recv), (_x_send, mut x_recv)) =
        join(&mut consumer, &mut x, "payments", 3).await;
    echo(&mut c3_send, &mut x_recv, b"to X").await;
    echo(&mut c_send, &mut p_recv, b"P's first stream lives on").await;
    // The rule pins `payments` to X: P (no rule) may not register it anew.
    match p.provide("payments", 3).await {
        Frame::StreamReject(r) => {
            assert_eq!(r.code, 403, "{r:?}");
            assert!(r.reason.starts_with("provide_denied"), "{}", r.reason);
        }
        other => panic!("expected STREAM_REJECT, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_lease_name_and_its_sticky_port_stay_with_the_agent_that_held_them() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let shop = orp::LeaseRegister {
        name: "shop".to_owned(),
        tls: true,
        udp: true,
        request_id: 1,
        ..orp::LeaseRegister::default()
    };
    let p_leaf = ca.leaf(AGENT_1, &[], Eku::Client);
    let mut p = connect(&relay, &ca, &p_leaf).await.expect("P connects");
    p.hello(AGENT_1).await;
    let first = p.register_with(shop.clone()).await;
    assert_eq!(first.hostname, "shop.relay.test");
    assert!(!first.udp_addr.is_empty());
    // P's connection drops: the name and the port go into reservation.
    p.conn.close(0u32.into(), b"network change");
    eventually("P's routes removed", || {
        relay
            .shared
            .load()
            .routes
            .lookup_sni(&sni("shop.relay.test"))
            .is_none()
    })
    .await;

    // X, same tenant, within the reservation: refused by name, counted.
    let mut x = connect(&relay, &ca, &ca.leaf(AGENT_2, &[], Eku::Client))
        .await
        .expect("X connects");
    x.hello(AGENT_2).await;
    let before = relay.stats.lease_errors(LeaseErrorCode::HostnameConflict);
    match x.call(Frame::LeaseRegister(shop.clone())).await {
        Frame::LeaseError(e) => {
            assert_eq!(
                (e.code.as_str(), e.message.as_str(), e.request_id),
                ("hostname_conflict", "name_taken", 1)
            );
        }
        other => panic!("expected LEASE_ERROR, got {other:?}"),
    }
    assert_eq!(
        relay.stats.lease_errors(LeaseErrorCode::HostnameConflict),
        before + 1
    );
    // X's other names are unaffected.
    x.register("elsewhere", 2).await;

    // P reconnects and gets the same name and the same (sticky) port.
    let mut p = connect(&relay, &ca, &p_leaf).await.expect("P reconnects");
    p.hello(AGENT_1).await;
    let again = p.register_with(shop).await;
    assert_eq!(
        (again.hostname.as_str(), again.udp_addr.as_str()),
        (first.hostname.as_str(), first.udp_addr.as_str())
    );
}

impl MeshWorld {
    /// An agent that speaks ORP as the Go OutRelay agent does: HELLO without capabilities.
    async fn go_agent(&self, uri: &str) -> Agent {
        let mut a = connect(&self.relay, &self.ca, &self.ca.leaf(uri, &[], Eku::Client))
            .await
            .expect("connects");
        match a.call(go_hello(uri)).await {
            Frame::HelloAck(ack) => assert!(ack.accepted_features.is_empty(), "{ack:?}"),
            other => panic!("expected HELLO_ACK, got {other:?}"),
        }
        a
    }
}

/// Reads exactly `n` raw bytes of a stream.
async fn read_exact(recv: &mut quinn::RecvStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, recv.read_exact(&mut buf))
        .await
        .expect("bytes in time")
        .expect("read_exact");
    buf
}

fn candidates(ip: &str) -> Vec<orp::Candidate> {
    vec![orp::Candidate {
        kind: "host".to_owned(),
        ip: ip.to_owned(),
        port: 5000,
        priority: 100,
    }]
}

/// Issue 19, Go compatibility: two agents speaking ORP as the shipped Go agent does (no HELLO
/// capabilities, REGISTER without a request id) stream through the relay with no stray byte
/// before the provider's; OBSERVED_ADDR_QUERY is answered with the agent's address;
/// CANDIDATE_OFFER/ANSWER and STREAM_CHECKPOINT reach the paired agent (and only it);
/// MIGRATE_TO_P2P is recorded; the stream keeps flowing throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_agents_stream_without_stray_bytes_and_their_p2p_signals_reach_the_peer() {
    let w = mesh_world(&[allow("demo", "*", "pay")]);
    let mut provider = w.go_agent(AGENT_2).await;
    match provider
        .call(Frame::Register(orp::Register {
            service_name: "pay".to_owned(),
            local_addr: "127.0.0.1:8080".to_owned(),
            request_id: 0,
        }))
        .await
    {
        Frame::RegisterAck(ack) => assert_eq!(ack.service_id, "demo/pay"),
        other => panic!("expected REGISTER_ACK, got {other:?}"),
    }
    let mut consumer = w.go_agent(AGENT_1).await;

    // The Go consumer writes OPEN_STREAM and copies the stream raw into its application.
    let (mut c_send, mut c_recv) = send_open(&consumer.conn, "pay", "", 42).await;
    let (inc, mut p_send, mut p_recv) = provider.incoming().await;
    assert_eq!(inc.stream_id, 42);
    write_frame(
        &mut p_send,
        Frame::StreamAccept(orp::StreamAccept::default()),
    )
    .await;
    p_send
        .write_all(b"hello from the provider")
        .await
        .expect("write");
    assert_eq!(
        read_exact(&mut c_recv, 23).await,
        b"hello from the provider",
        "the consumer's stream must start with the provider's bytes"
    );
    for a in [&mut consumer, &mut provider] {
        assert!(matches!(a.recv().await, Ok(Frame::StreamReady(r)) if r.stream_id == 42));
    }

    // OBSERVED_ADDR_QUERY: the address the relay sees.
    let local = consumer._endpoint.local_addr().expect("local addr");
    match consumer
        .call(Frame::ObservedAddrQuery(orp::ObservedAddrQuery {
            request_id: 7,
        }))
        .await
    {
        Frame::ObservedAddrResp(r) => {
            assert_eq!(
                (r.request_id, r.ip.as_str(), r.port),
                (7, "127.0.0.1", u32::from(local.port()))
            )
        }
        other => panic!("expected OBSERVED_ADDR_RESP, got {other:?}"),
    }

    // Candidates and checkpoints reach the paired agent's control stream, unchanged.
    let offer = Frame::CandidateOffer(orp::CandidateOffer {
        stream_id: 42,
        candidates: candidates("10.0.0.1"),
    });
    consumer.send(offer.clone()).await.expect("send");
    assert_eq!(provider.recv().await.expect("offer"), offer);
    let answer = Frame::CandidateAnswer(orp::CandidateAnswer {
        stream_id: 42,
        candidates: candidates("10.0.0.2"),
    });
    provider.send(answer.clone()).await.expect("send");
    assert_eq!(consumer.recv().await.expect("answer"), answer);
    let checkpoint = Frame::StreamCheckpoint(orp::StreamCheckpoint {
        stream_id: 42,
        my_position: 9,
        peer_ack_position: 23,
    });
    consumer.send(checkpoint.clone()).await.expect("send");
    assert_eq!(provider.recv().await.expect("checkpoint"), checkpoint);

    // An agent not on stream 42 (same tenant) cannot signal into it.
    let mut other = w.go_agent(AGENT_3).await;
    other.send(offer.clone()).await.expect("send");
    assert_eq!(other.call(Frame::Ping).await, Frame::Pong);
    assert_eq!(
        provider.call(Frame::Ping).await,
        Frame::Pong,
        "the outsider's offer arrived"
    );

    // MIGRATE_TO_P2P is recorded, and the stream still carries bytes both ways.
    consumer
        .send(Frame::MigrateToP2P(orp::MigrateToP2p {
            stream_id: 42,
            my_position: 0,
            peer_ack_position: 23,
            selected: candidates("10.0.0.2").pop(),
        }))
        .await
        .expect("send");
    assert_eq!(consumer.call(Frame::Ping).await, Frame::Pong);
    c_send.write_all(b"still here").await.expect("write");
    assert_eq!(read_exact(&mut p_recv, 10).await, b"still here");

    let q = &w.relay.stats;
    use outrelay_relay::quic::SignalOutcome;
    assert_eq!(q.signals(SignalOutcome::Forwarded), 3);
    assert_eq!(q.signals(SignalOutcome::NoPair), 1);
    assert_eq!(q.migrations_to_p2p.load(Ordering::Relaxed), 1);
    assert_eq!(q.observed_addr_answers.load(Ordering::Relaxed), 1);
    assert_eq!(q.protocol_errors.load(Ordering::Relaxed), 0);
}

/// A rule with `P2P_FORBIDDEN` keeps candidates from reaching the peer (checkpoints still do),
/// and our agents, which ask for `stream_accept`, still get STREAM_ACCEPT first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p2p_forbidden_rule_stops_candidates_and_our_agents_still_get_stream_accept() {
    let w = mesh_world(&[]);
    let mut rule = allow("demo", "*", "pay").to_rule(0);
    rule.p2p_mode = outrelay_api::pb::P2pMode::P2pForbidden as i32;
    w.mesh.set_policy(vec![rule]);
    let mut provider = w.go_agent(AGENT_2).await;
    assert!(matches!(
        provider.provide("pay", 0).await,
        Frame::RegisterAck(_)
    ));
    let mut consumer = w.agent(AGENT_1).await;
    let opening = consumer.open("pay", "", 77);
    let accepting = async {
        let (_, mut send, recv) = provider.incoming().await;
        write_frame(&mut send, Frame::StreamAccept(orp::StreamAccept::default())).await;
        (send, recv)
    };
    let ((answer, _c_send, _c_recv), _p) = tokio::join!(opening, accepting);
    assert_eq!(answer, Frame::StreamAccept(orp::StreamAccept::default()));
    for a in [&mut consumer, &mut provider] {
        assert!(matches!(a.recv().await, Ok(Frame::StreamReady(r)) if r.stream_id == 77));
    }
    consumer
        .send(Frame::CandidateOffer(orp::CandidateOffer {
            stream_id: 77,
            candidates: candidates("10.0.0.1"),
        }))
        .await
        .expect("send");
    let checkpoint = Frame::StreamCheckpoint(orp::StreamCheckpoint {
        stream_id: 77,
        my_position: 1,
        peer_ack_position: 0,
    });
    consumer.send(checkpoint.clone()).await.expect("send");
    assert_eq!(provider.recv().await.expect("checkpoint"), checkpoint);
    use outrelay_relay::quic::SignalOutcome;
    assert_eq!(w.relay.stats.signals(SignalOutcome::Forbidden), 1);
}

// ---------- stream resume (issue 19 part 2, relay side) ----------

const AGENT_4: &str = "outrelay://demo/agent/00000000-0000-4000-8000-000000000004";
const OTHER_TENANT_AGENT_2: &str = "outrelay://other/agent/00000000-0000-4000-8000-000000000004";

impl MeshWorld {
    /// An agent whose HELLO asks for `stream_resume` (and `stream_accept`, as ours does); the
    /// HELLO_ACK it got.
    async fn resume_agent(&self, uri: &str) -> (Agent, orp::HelloAck) {
        let mut a = connect(&self.relay, &self.ca, &self.ca.leaf(uri, &[], Eku::Client))
            .await
            .expect("connects");
        let hello = Frame::Hello(orp::Hello {
            protocol_version: "orp/1".to_owned(),
            agent_uri: uri.to_owned(),
            capabilities: vec![
                "streams".to_owned(),
                "stream_accept".to_owned(),
                "stream_resume".to_owned(),
            ],
        });
        match a.call(hello).await {
            Frame::HelloAck(ack) => (a, ack),
            other => panic!("expected HELLO_ACK, got {other:?}"),
        }
    }

    fn resume_stats(&self) -> &outrelay_relay::mesh::resume::ResumeStats {
        &self.mesh.stats.resume
    }

    fn parked(&self) -> u64 {
        self.resume_stats().parked.load(Ordering::Relaxed)
    }

    fn outcome(&self, o: outrelay_relay::mesh::resume::ResumeOutcome) -> u64 {
        self.resume_stats().outcome(o)
    }
}

/// STREAM_RESUME for `pay`/`charge` as our agent sends it.
fn resume_req(id: u64, my: u64, ack: u64, peer: &str, consumer: bool) -> orp::StreamResume {
    orp::StreamResume {
        stream_id: id,
        my_position: my,
        peer_ack_position: ack,
        peer_agent_uri: peer.to_owned(),
        target_service: "pay".to_owned(),
        method: "charge".to_owned(),
        consumer,
    }
}

impl Agent {
    /// Opens a fresh stream whose first frame is `req` (nothing more is written).
    async fn resume(&self, req: orp::StreamResume) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut send, recv) = self.conn.open_bi().await.expect("open stream");
        write_frame(&mut send, Frame::StreamResume(req)).await;
        (send, recv)
    }
}

/// The STREAM_REJECT of a refused resume, and that the stream then ends (FIN).
async fn refused_with(recv: &mut quinn::RecvStream) -> orp::StreamReject {
    let reject = match read_one(recv).await {
        Frame::StreamReject(r) => r,
        other => panic!("expected STREAM_REJECT, got {other:?}"),
    };
    let rest = tokio::time::timeout(WAIT, recv.read_to_end(64))
        .await
        .expect("FIN in time")
        .expect("clean end after STREAM_REJECT");
    assert!(rest.is_empty(), "bytes after STREAM_REJECT: {rest:?}");
    reject
}

fn peer_resume(f: Frame) -> orp::StreamResume {
    match f {
        Frame::StreamResume(r) => r,
        other => panic!("expected the peer's STREAM_RESUME, got {other:?}"),
    }
}

/// Both halves resume: each reads the OTHER's STREAM_RESUME (its positions, its certificate
/// URI, its role), then the pair is joined ONCE and carries bytes both ways with FIN on each
/// direction; STREAM_CHECKPOINT flows between the control streams again; the policy was
/// evaluated again and audited as a resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_halves_are_joined_once_and_carry_bytes_both_ways() {
    use outrelay_relay::mesh::resume::ResumeOutcome;
    let w = mesh_world(&[allow("demo", "*", "pay")]);
    let (mut consumer, ack) = w.resume_agent(AGENT_1).await;
    assert!(
        ack.accepted_features.iter().any(|f| f == "stream_resume"),
        "{ack:?}"
    );
    let (mut provider, _) = w.resume_agent(AGENT_2).await;

    // Consumer sent 100 bytes and got 40; provider sent 50 and got 90.
    let (mut c_send, mut c_recv) = consumer
        .resume(resume_req(77, 100, 40, AGENT_2, true))
        .await;
    eventually("the first half parked", || w.parked() == 1).await;
    let (mut p_send, mut p_recv) = provider
        .resume(resume_req(77, 50, 90, AGENT_1, false))
        .await;
    let to_consumer = peer_resume(read_one(&mut c_recv).await);
    let to_provider = peer_resume(read_one(&mut p_recv).await);
    assert_eq!(to_consumer, resume_req(77, 50, 90, AGENT_2, false));
    assert_eq!(to_provider, resume_req(77, 100, 40, AGENT_1, true));
    assert_eq!(w.parked(), 0);

    // Retransmission from the acknowledged positions, then new bytes, both ways.
    echo(&mut c_send, &mut p_recv, b"consumer bytes from position 90").await;
    echo(&mut p_send, &mut c_recv, b"provider bytes from position 40").await;
    assert_eq!(
        w.mesh.stats.streams_active.load(Ordering::Relaxed),
        1,
        "joined exactly once"
    );
    assert_eq!(w.outcome(ResumeOutcome::Resumed), 1);
    // (100 - 90) for the provider + (50 - 40) for the consumer.
    assert_eq!(
        w.resume_stats().bytes_retransmitted.load(Ordering::Relaxed),
        20
    );

    // The pair is registered: checkpoints reach the other end's control stream.
    let checkpoint = Frame::StreamCheckpoint(orp::StreamCheckpoint {
        stream_id: 77,
        my_position: 128,
        peer_ack_position: 84,
    });
    consumer.send(checkpoint.clone()).await.expect("send");
    assert_eq!(provider.recv().await.expect("checkpoint"), checkpoint);
    let back = Frame::StreamCheckpoint(orp::StreamCheckpoint {
        stream_id: 77,
        my_position: 84,
        peer_ack_position: 128,
    });
    provider.send(back.clone()).await.expect("send");
    assert_eq!(consumer.recv().await.expect("checkpoint"), back);
    assert_eq!(
        w.relay
            .stats
            .signals(outrelay_relay::quic::SignalOutcome::Forwarded),
        2
    );

    // FIN each way, each on its own.
    c_send.finish().expect("finish");
    let got = tokio::time::timeout(WAIT, p_recv.read_to_end(1024))
        .await
        .expect("FIN in time")
        .expect("FIN reaches the provider");
    assert!(got.is_empty());
    p_send.write_all(b"last words").await.expect("half-closed");
    p_send.finish().expect("finish");
    let got = tokio::time::timeout(WAIT, c_recv.read_to_end(1024))
        .await
        .expect("FIN in time")
        .expect("FIN reaches the consumer");
    assert_eq!(got, b"last words");
    eventually("the join ended", || {
        w.mesh.stats.streams_active.load(Ordering::Relaxed) == 0
    })
    .await;

    // Policy evaluated again, audited as a resume on both sides.
    let rows = w.audit.0.lock().expect("audit").clone();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows[0]
            .reason
            .starts_with("resume caller-side: rule static-0")
    );
    assert_eq!(
        (rows[0].caller.as_str(), rows[0].target.as_str()),
        (AGENT_1, "pay")
    );
    assert!(rows[1].reason.starts_with("resume callee-side: "));
    assert_eq!(
        (rows[1].caller.as_str(), rows[1].target.as_str()),
        (AGENT_2, AGENT_1)
    );
    assert!(
        rows.iter()
            .all(|r| r.stream_id == "77" && r.decision == outrelay_api::pb::Decision::Allow as i32)
    );
}

/// Security boundary: an agent of the same tenant that knows a parked stream id and names the
/// parked half's agent as its peer (or claims a second consumer) gets 409; the parked half
/// stays parked and its right peer still joins it. Meanwhile another tenant's agents open and
/// use a normal stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_agent_cannot_take_a_parked_half_and_the_right_peer_still_joins() {
    use outrelay_relay::mesh::resume::ResumeOutcome;
    let w = mesh_world(&[allow("demo", "*", "pay"), allow("other", "*", "pay")]);
    let (consumer, _) = w.resume_agent(AGENT_1).await;
    let (provider, _) = w.resume_agent(AGENT_2).await;
    let (thief, _) = w.resume_agent(AGENT_3).await;
    let (mut c_send, mut c_recv) = consumer.resume(resume_req(88, 10, 20, AGENT_2, true)).await;
    eventually("the first half parked", || w.parked() == 1).await;

    // The thief claims to be the consumer's peer (it is not AGENT_2).
    let (_s, mut r) = thief.resume(resume_req(88, 0, 0, AGENT_1, false)).await;
    let reject = refused_with(&mut r).await;
    assert_eq!(reject.code, 409, "{reject:?}");
    // A second consumer naming the right URIs is no better.
    let (_s, mut r) = thief.resume(resume_req(88, 0, 0, AGENT_1, true)).await;
    assert_eq!(refused_with(&mut r).await.code, 409);
    // Nor the right provider with another method.
    let (_s, mut r) = provider
        .resume(orp::StreamResume {
            method: "refund".to_owned(),
            ..resume_req(88, 0, 0, AGENT_1, false)
        })
        .await;
    assert_eq!(refused_with(&mut r).await.code, 409);
    assert_eq!(w.outcome(ResumeOutcome::RefusedMismatch), 3);
    assert_eq!(w.parked(), 1, "the parked half stays parked");
    // The parked id is reserved: opening a stream with it is a collision, before any policy.
    let (answer, _s, _r) = thief.open("pay", "", 88).await;
    assert_eq!(reject_code(&answer), 409);

    // Another tenant is served meanwhile.
    let mut other_p = w.agent(OTHER_TENANT_AGENT).await;
    assert!(matches!(
        other_p.provide("pay", 1).await,
        Frame::RegisterAck(_)
    ));
    let mut other_c = w.agent(OTHER_TENANT_AGENT_2).await;
    let ((mut oc_send, mut oc_recv), (mut op_send, mut op_recv)) =
        join(&mut other_c, &mut other_p, "pay", 5).await;
    echo(&mut oc_send, &mut op_recv, b"tenant other, served").await;
    echo(&mut op_send, &mut oc_recv, b"during the attack").await;

    // The right peer joins the parked half.
    let (mut p_send, mut p_recv) = provider
        .resume(resume_req(88, 20, 10, AGENT_1, false))
        .await;
    assert_eq!(
        peer_resume(read_one(&mut c_recv).await).peer_agent_uri,
        AGENT_2
    );
    assert_eq!(
        peer_resume(read_one(&mut p_recv).await).peer_agent_uri,
        AGENT_1
    );
    echo(&mut c_send, &mut p_recv, b"still ours").await;
    echo(&mut p_send, &mut c_recv, b"yes").await;
    assert_eq!(w.outcome(ResumeOutcome::Resumed), 1);
    assert_eq!(w.parked(), 0);
}

/// A half whose peer never comes gets 404 when the window ends, and its slot is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_half_without_its_peer_expires_with_404() {
    use outrelay_relay::mesh::resume::ResumeOutcome;
    let w = mesh_world_with(&[allow("demo", "*", "pay")], |m| {
        m.resume.park_timeout_ms = 300;
    });
    let (consumer, _) = w.resume_agent(AGENT_1).await;
    let (_s, mut r) = consumer.resume(resume_req(99, 0, 0, AGENT_2, true)).await;
    let reject = refused_with(&mut r).await;
    assert_eq!(reject.code, 404);
    assert_eq!(
        reject.reason,
        "resume window of 300 ms expired without the peer"
    );
    assert_eq!(w.outcome(ResumeOutcome::Expired), 1);
    assert_eq!(w.parked(), 0);
}

/// The policy is evaluated again at the join: a resume the current policy denies is refused
/// with 403 on both halves (and audited as a resume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_the_current_policy_denies_gets_403_on_both_halves() {
    use outrelay_relay::mesh::resume::ResumeOutcome;
    // Only AGENT_3 may call `pay` now.
    let w = mesh_world(&[allow("demo", AGENT_3, "pay")]);
    let (consumer, _) = w.resume_agent(AGENT_1).await;
    let (provider, _) = w.resume_agent(AGENT_2).await;
    let (_cs, mut c_recv) = consumer.resume(resume_req(66, 5, 5, AGENT_2, true)).await;
    eventually("the first half parked", || w.parked() == 1).await;
    let (_ps, mut p_recv) = provider.resume(resume_req(66, 5, 5, AGENT_1, false)).await;
    for recv in [&mut c_recv, &mut p_recv] {
        let reject = refused_with(recv).await;
        assert_eq!(reject.code, 403, "{reject:?}");
        assert!(reject.reason.starts_with("denied: "), "{reject:?}");
    }
    assert_eq!(w.outcome(ResumeOutcome::RefusedPolicy), 1);
    assert_eq!(w.outcome(ResumeOutcome::Resumed), 0);
    let rows = w.audit.0.lock().expect("audit").clone();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].reason.starts_with("resume caller-side: "));
    assert_eq!(rows[0].decision, outrelay_api::pb::Decision::Deny as i32);
}

/// The Go agent's STREAM_RESUME names no service: 403 (closed world). Invalid fields: 400.
/// A relay with resume disabled: 404, and its HELLO_ACK does not offer `stream_resume`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_style_invalid_and_disabled_resumes_are_refused() {
    use outrelay_relay::mesh::resume::ResumeOutcome;
    let w = mesh_world(&[allow("demo", "*", "pay")]);
    let (agent, _) = w.resume_agent(AGENT_1).await;
    let go_style = orp::StreamResume {
        stream_id: 5,
        my_position: 1,
        peer_ack_position: 1,
        peer_agent_uri: AGENT_2.to_owned(),
        ..orp::StreamResume::default()
    };
    let (_s, mut r) = agent.resume(go_style).await;
    let reject = refused_with(&mut r).await;
    assert_eq!(
        (reject.code, reject.reason.as_str()),
        (
            403,
            "resume needs target_service: the relay evaluates policy again (closed world)"
        )
    );
    assert_eq!(w.outcome(ResumeOutcome::RefusedPolicy), 1);
    for bad in [
        resume_req(0, 0, 0, AGENT_2, true),
        resume_req(6, 0, 0, AGENT_1, true),
        resume_req(7, 0, 0, OTHER_TENANT_AGENT, true),
        resume_req(8, 0, 0, RELAY, true),
        orp::StreamResume {
            target_service: "a b".to_owned(),
            ..resume_req(9, 0, 0, AGENT_2, true)
        },
    ] {
        let (_s, mut r) = agent.resume(bad.clone()).await;
        assert_eq!(refused_with(&mut r).await.code, 400, "{bad:?}");
    }
    assert_eq!(w.outcome(ResumeOutcome::RefusedInvalid), 5);
    assert_eq!(w.parked(), 0);

    let off = mesh_world_with(&[allow("demo", "*", "pay")], |m| m.resume.enabled = false);
    let (agent, ack) = off.resume_agent(AGENT_1).await;
    assert!(
        !ack.accepted_features.iter().any(|f| f == "stream_resume"),
        "{ack:?}"
    );
    let (_s, mut r) = agent.resume(resume_req(10, 0, 0, AGENT_2, true)).await;
    let reject = refused_with(&mut r).await;
    assert_eq!(
        (reject.code, reject.reason.as_str()),
        (404, "stream resume is disabled on this relay")
    );
    assert_eq!(off.outcome(ResumeOutcome::Disabled), 1);
}

/// Caps: a second parked half of one agent over `max_parked_per_agent` gets 503 (a counted
/// limit); the same agent resuming the same id again replaces its parked half (the old one is
/// reset), and the peer joins the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_is_capped_and_a_reconnected_half_replaces_its_old_one() {
    use outrelay_relay::mesh::resume::ResumeOutcome;
    let w = mesh_world_with(&[allow("demo", "*", "pay")], |m| {
        m.resume.max_parked_per_agent = 1;
    });
    let (consumer, _) = w.resume_agent(AGENT_1).await;
    let (provider, _) = w.resume_agent(AGENT_2).await;
    let (_old_send, mut old_recv) = consumer.resume(resume_req(11, 0, 0, AGENT_2, true)).await;
    eventually("the first half parked", || w.parked() == 1).await;
    let (_s, mut r) = consumer.resume(resume_req(12, 0, 0, AGENT_2, true)).await;
    assert_eq!(refused_with(&mut r).await.code, 503);
    assert_eq!(w.outcome(ResumeOutcome::RefusedFull), 1);
    assert_eq!(
        w.relay
            .stats
            .limited(outrelay_relay::quic::Limit::ResumeParked),
        1
    );

    // The consumer reconnects again while parked: its new half replaces the old one.
    let (mut c_send, mut c_recv) = consumer.resume(resume_req(11, 3, 0, AGENT_2, true)).await;
    let mut byte = [0u8; 1];
    let old = tokio::time::timeout(WAIT, old_recv.read(&mut byte))
        .await
        .expect("old half ended in time");
    assert!(
        matches!(old, Err(quinn::ReadError::Reset(_))),
        "old half reset: {old:?}"
    );
    assert_eq!(w.outcome(ResumeOutcome::Replaced), 1);
    assert_eq!(w.parked(), 1);
    let (mut p_send, mut p_recv) = provider.resume(resume_req(11, 0, 3, AGENT_1, false)).await;
    assert_eq!(peer_resume(read_one(&mut c_recv).await).my_position, 0);
    assert_eq!(peer_resume(read_one(&mut p_recv).await).my_position, 3);
    echo(&mut c_send, &mut p_recv, b"new half").await;
    echo(&mut p_send, &mut c_recv, b"joined").await;
    assert_eq!(w.outcome(ResumeOutcome::Resumed), 1);
}

/// INCOMING_STREAM.resume and STREAM_ACCEPT.resume are true only when both agents asked for
/// `stream_resume` (and the relay offers it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_marked_resumable_only_when_both_agents_asked() {
    async fn open_marks(
        consumer: &Agent,
        provider: &Agent,
        service: &str,
        id: u64,
    ) -> (bool, bool) {
        let opening = consumer.open(service, "", id);
        let accepting = async {
            let (inc, mut send, recv) = provider.incoming().await;
            write_frame(&mut send, Frame::StreamAccept(orp::StreamAccept::default())).await;
            (inc.resume, send, recv)
        };
        let ((answer, _cs, _cr), (incoming_resume, _ps, _pr)) = tokio::join!(opening, accepting);
        match answer {
            Frame::StreamAccept(a) => {
                // The consumer learns whom to name in its STREAM_RESUME.
                assert_eq!(a.peer_agent_uri.is_empty(), !a.resume, "{a:?}");
                (incoming_resume, a.resume)
            }
            other => panic!("expected STREAM_ACCEPT, got {other:?}"),
        }
    }
    for enabled in [true, false] {
        let w = mesh_world_with(&[allow("demo", "*", "*")], |m| m.resume.enabled = enabled);
        let (mut resuming_provider, _) = w.resume_agent(AGENT_2).await;
        assert!(matches!(
            resuming_provider.provide("pay", 1).await,
            Frame::RegisterAck(_)
        ));
        let mut plain_provider = w.agent(AGENT_3).await;
        assert!(matches!(
            plain_provider.provide("ledger", 1).await,
            Frame::RegisterAck(_)
        ));
        let (resuming_consumer, _) = w.resume_agent(AGENT_1).await;
        let plain_consumer = w.agent(AGENT_4).await;
        let both = open_marks(&resuming_consumer, &resuming_provider, "pay", 1).await;
        assert_eq!(
            both,
            (enabled, enabled),
            "both asked, relay enabled={enabled}"
        );
        assert_eq!(
            open_marks(&resuming_consumer, &plain_provider, "ledger", 2).await,
            (false, false),
            "the provider did not ask"
        );
        assert_eq!(
            open_marks(&plain_consumer, &resuming_provider, "pay", 3).await,
            (false, false),
            "the consumer did not ask"
        );
    }
}

/// A parked half whose agent's connection has ended cannot carry the stream: its peer's half
/// takes the place (the old one counted `expired`), and the agent, reconnected, joins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_half_whose_connection_ended_gives_way_to_its_peer() {
    use outrelay_relay::mesh::resume::ResumeOutcome;
    let w = mesh_world(&[allow("demo", "*", "pay")]);
    let (mut consumer, _) = w.resume_agent(AGENT_1).await;
    // A service of its own, so the test can see when the relay has noticed the close.
    assert!(matches!(
        consumer.provide("marker", 1).await,
        Frame::RegisterAck(_)
    ));
    let (provider, _) = w.resume_agent(AGENT_2).await;
    let _gone = consumer.resume(resume_req(33, 0, 0, AGENT_2, true)).await;
    eventually("the first half parked", || w.parked() == 1).await;
    consumer.conn.close(0u32.into(), b"network changed");
    eventually("the relay saw the connection end", || {
        matches!(
            w.mesh.resolve("demo", "marker"),
            outrelay_relay::mesh::Resolved::NotFound
        )
    })
    .await;
    let (mut p_send, mut p_recv) = provider.resume(resume_req(33, 0, 0, AGENT_1, false)).await;
    eventually("the stale half gave way", || {
        w.outcome(ResumeOutcome::Expired) == 1
    })
    .await;
    // The stale half leaves the table when its connection ends (or, if the relay had not
    // noticed yet, when the provider's half arrives): either way the provider's half parks.
    eventually("the provider's half is parked now", || w.parked() == 1).await;
    let (consumer, _) = w.resume_agent(AGENT_1).await;
    let (mut c_send, mut c_recv) = consumer.resume(resume_req(33, 0, 0, AGENT_2, true)).await;
    peer_resume(read_one(&mut c_recv).await);
    peer_resume(read_one(&mut p_recv).await);
    echo(&mut c_send, &mut p_recv, b"after the network change").await;
    echo(&mut p_send, &mut c_recv, b"welcome back").await;
    assert_eq!(w.outcome(ResumeOutcome::Resumed), 1);
}

/// An agent that reconnects (a network change) before this relay has noticed its old
/// connection's end resumes at once: the old join is ended (the other end sees a reset, as from
/// a failed peer), the other end resumes in turn, and the pair joins on the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_ends_the_old_join_so_the_other_end_resumes_at_once() {
    use outrelay_relay::mesh::resume::ResumeOutcome;
    let w = mesh_world(&[allow("demo", "*", "pay")]);
    let (mut provider, _) = w.resume_agent(AGENT_2).await;
    assert!(matches!(
        provider.provide("pay", 1).await,
        Frame::RegisterAck(_)
    ));
    let (old_consumer, _) = w.resume_agent(AGENT_1).await;
    let opening = old_consumer.open("pay", "", 300);
    let accepting = async {
        let (inc, mut send, recv) = provider.incoming().await;
        assert!(inc.resume, "{inc:?}");
        write_frame(&mut send, Frame::StreamAccept(orp::StreamAccept::default())).await;
        (send, recv)
    };
    let ((answer, mut oc_send, _oc_recv), (_op_send, mut op_recv)) =
        tokio::join!(opening, accepting);
    assert_eq!(
        answer,
        Frame::StreamAccept(orp::StreamAccept {
            resume: true,
            peer_agent_uri: AGENT_2.to_owned(),
        })
    );
    echo(&mut oc_send, &mut op_recv, b"before the network change").await;

    // The same agent on a new connection (the old one still open as far as the relay knows).
    let (consumer, _) = w.resume_agent(AGENT_1).await;
    let (mut c_send, mut c_recv) = consumer.resume(resume_req(300, 25, 0, AGENT_2, true)).await;
    let mut byte = [0u8; 1];
    let old = tokio::time::timeout(WAIT, op_recv.read(&mut byte))
        .await
        .expect("the provider's old half ends in time");
    assert!(
        matches!(old, Err(quinn::ReadError::Reset(c)) if c.into_inner() == u64::from(close_code::PEER_LOST)),
        "old half reset as from a lost peer (it resumes): {old:?}"
    );
    let (mut p_send, mut p_recv) = provider
        .resume(resume_req(300, 0, 25, AGENT_1, false))
        .await;
    assert_eq!(peer_resume(read_one(&mut c_recv).await).my_position, 0);
    assert_eq!(peer_resume(read_one(&mut p_recv).await).my_position, 25);
    echo(&mut c_send, &mut p_recv, b"after the network change").await;
    echo(&mut p_send, &mut c_recv, b"same stream").await;
    assert_eq!(w.outcome(ResumeOutcome::Resumed), 1);
    assert_eq!(w.mesh.stats.streams_active.load(Ordering::Relaxed), 1);
}

/// Issue 20: leases inherited from an old process (through the handle the hand-over uses) are
/// reserved to their agents: over real LEASE_REGISTER frames, the agent that held one gets its
/// name and its port back, another agent of the tenant gets `hostname_conflict`, and the list
/// the next hand-over would send names the live leases.
#[tokio::test]
async fn inherited_leases_come_back_to_their_agents_over_quic() {
    let ca = Ca::new("test CA");
    let relay = start_relay(&ca, 10_000);
    let mut b = connect(&relay, &ca, &ca.leaf(AGENT_2, &[], Eku::Client))
        .await
        .expect("agent 2 connects");
    b.hello(AGENT_2).await;
    // The lowest free port of this relay's range, to pick an inherited port that is not it.
    let probe = b.register_with(udp_lease("probe", 1)).await;
    let low = port_of(&probe.udp_addr);
    let inherited = vec![InheritedLease {
        tenant: "demo".into(),
        agent_uri: AGENT_1.into(),
        name: "game".into(),
        hostname: Some(format!("game.{ROOT_HOST}")),
        udp_port: Some(low + 3),
        tcp_port: None,
    }];
    let done = relay.handle.inherit_leases(&inherited).await;
    assert_eq!((done.names, done.ports, done.skipped), (1, 1, 0));
    match b
        .call(Frame::LeaseRegister(orp::LeaseRegister {
            tls: true,
            ..udp_lease("game", 2)
        }))
        .await
    {
        Frame::LeaseError(e) => assert_eq!(e.code, LeaseErrorCode::HostnameConflict.as_str()),
        other => panic!("expected LEASE_ERROR, got {other:?}"),
    }
    let other = b.register_with(udp_lease("other", 3)).await;
    assert_ne!(port_of(&other.udp_addr), low + 3, "not the inherited port");
    let mut a = connect(&relay, &ca, &ca.leaf(AGENT_1, &[], Eku::Client))
        .await
        .expect("agent 1 connects");
    a.hello(AGENT_1).await;
    let game = a
        .register_with(orp::LeaseRegister {
            tls: true,
            ..udp_lease("game", 4)
        })
        .await;
    assert_eq!(game.hostname, format!("game.{ROOT_HOST}"));
    assert_eq!(port_of(&game.udp_addr), low + 3, "the same port comes back");
    let names: Vec<String> = relay
        .handle
        .inherited_leases()
        .await
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, vec!["game", "other", "probe"]);
}

/// A peer relay's connection (issue 22) may only open streams that start with FORWARD_STREAM:
/// HELLO there is a protocol error (the stream is reset, counted); a FORWARD_STREAM whose
/// `source_agent_uri` is not an agent's is one too; a valid one for a service with no LOCAL
/// provider is answered STREAM_REJECT 404 (never forwarded again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_connection_may_only_open_forward_streams() {
    let w = mesh_world(&[allow("acme", "*", "*")]);
    let peer = w.ca.leaf("outrelay://dev/relay/relay-9", &[], Eku::Both);
    let mut a = connect(&w.relay, &w.ca, &peer)
        .await
        .expect("a peer relay connects");
    a.send(hello(AGENT_1)).await.expect("send");
    assert!(
        a.recv().await.is_err(),
        "HELLO on a relay connection was served"
    );
    let counted = async {
        while w.mesh.stats.result(MeshResult::ProtocolError) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, counted)
        .await
        .expect("protocol error counted");

    let forward = |source: &str| {
        Frame::ForwardStream(orp::IncomingStream {
            target_service: "nobody-here".to_owned(),
            method: String::new(),
            source_agent_uri: source.to_owned(),
            stream_id: 77,
            resume: false,
        })
    };
    let (send, recv) = a.conn.open_bi().await.expect("stream");
    let mut s = Agent {
        _endpoint: client_endpoint(&w.ca, &peer),
        conn: a.conn.clone(),
        send,
        recv,
        buf: Vec::new(),
    };
    s.send(forward("outrelay://dev/relay/relay-9"))
        .await
        .expect("send");
    assert!(s.recv().await.is_err(), "a relay as source was served");
    let (send, recv) = a.conn.open_bi().await.expect("stream");
    s.send = send;
    s.recv = recv;
    s.buf.clear();
    match s.call(forward(AGENT_1)).await {
        Frame::StreamReject(r) => assert_eq!(r.code, 404, "{r:?}"),
        other => panic!("expected STREAM_REJECT, got {other:?}"),
    }
    assert!(w.mesh.stats.result(MeshResult::ProtocolError) >= 2);
    assert!(
        a.conn.close_reason().is_none(),
        "the relay connection stays up"
    );
}

/// A peer relay's checkpoint lane (resume across the forwarded hop): a STREAM_CHECKPOINT for a
/// stream that relay does not share with this one (here: a local pair of two agents on the
/// same stream id) is dropped and counted `no_pair`, and never reaches either agent; anything
/// but a checkpoint on a lane is a protocol error (counted, the lane stopped), while the
/// relay connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_relays_checkpoint_for_a_stream_it_does_not_share_is_dropped_and_counted() {
    use outrelay_relay::forward::{CheckpointOutcome, Refusal};
    let w = mesh_world(&[allow("demo", "*", "pay")]);
    let forward = w.relay.forward.clone().expect("forwarding served");
    let mut provider = w.go_agent(AGENT_2).await;
    assert!(matches!(
        provider.provide("pay", 0).await,
        Frame::RegisterAck(_)
    ));
    let mut consumer = w.go_agent(AGENT_1).await;
    let (_c_send, _c_recv) = send_open(&consumer.conn, "pay", "", 42).await;
    let (_inc, mut p_send, _p_recv) = provider.incoming().await;
    write_frame(
        &mut p_send,
        Frame::StreamAccept(orp::StreamAccept::default()),
    )
    .await;
    for a in [&mut consumer, &mut provider] {
        assert!(matches!(a.recv().await, Ok(Frame::StreamReady(r)) if r.stream_id == 42));
    }

    // Relay 9 writes a checkpoint for stream 42 on its lane: not a stream it shares.
    let relay9 = w.peer_relay().await;
    let mut lane = tokio::time::timeout(WAIT, relay9.conn.open_uni())
        .await
        .expect("the relay grants a lane")
        .expect("lane");
    let checkpoint = Frame::StreamCheckpoint(orp::StreamCheckpoint {
        stream_id: 42,
        my_position: 1 << 20,
        peer_ack_position: 1 << 20,
    });
    lane.write_all(&checkpoint.to_vec().expect("encode"))
        .await
        .expect("write");
    let counted = async {
        while forward.stats.checkpoints(CheckpointOutcome::NoPair) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, counted)
        .await
        .expect("the checkpoint counted as no_pair");
    assert_eq!(forward.stats.checkpoints(CheckpointOutcome::Delivered), 0);
    for a in [&mut consumer, &mut provider] {
        assert_eq!(
            a.call(Frame::Ping).await,
            Frame::Pong,
            "the foreign checkpoint reached an agent"
        );
    }

    // Anything else on the lane: a protocol error, the lane stopped, the connection up.
    lane.write_all(&Frame::Ping.to_vec().expect("encode"))
        .await
        .expect("write");
    let stopped = tokio::time::timeout(WAIT, lane.stopped())
        .await
        .expect("the lane is stopped");
    assert_eq!(
        stopped.expect("stopped").map(u64::from),
        Some(u64::from(close_code::PROTOCOL_ERROR))
    );
    assert!(forward.stats.refused(Refusal::ProtocolError) >= 1);
    assert!(
        relay9.conn.close_reason().is_none(),
        "the relay connection stays up"
    );
}

/// Both halves of a joined stream, kept open (a dropped receive half stops the stream).
type LiveHalves = (
    quinn::SendStream,
    quinn::RecvStream,
    quinn::SendStream,
    quinn::RecvStream,
);

/// Relay 9 (a test peer relay on `conn`) forwards AGENT_1's stream `id` to `service`, which
/// `provider` accepts: (INCOMING_STREAM.resume, the answer's resume, its peer_agent_uri) and
/// the four live halves.
async fn forward_marks(
    conn: &quinn::Connection,
    provider: &Agent,
    service: &str,
    id: u64,
    asked: bool,
) -> (bool, bool, String, LiveHalves) {
    let opening = async {
        let (send, mut recv) = forward_open(conn, AGENT_1, service, id, asked).await;
        (read_one(&mut recv).await, send, recv)
    };
    let accepting = async {
        let (inc, mut send, recv) = provider.incoming().await;
        write_frame(&mut send, Frame::StreamAccept(orp::StreamAccept::default())).await;
        (inc.resume, send, recv)
    };
    let ((answer, cs, cr), (incoming_resume, ps, pr)) = tokio::join!(opening, accepting);
    match answer {
        Frame::StreamAccept(a) => (
            incoming_resume,
            a.resume,
            a.peer_agent_uri,
            (cs, cr, ps, pr),
        ),
        other => panic!("expected STREAM_ACCEPT, got {other:?}"),
    }
}

/// Resume across the forwarded hop, relay B's side: a FORWARD_STREAM is offered to the
/// provider as resumable only when relay A asked (`resume`) and the provider keeps rings, and
/// B's STREAM_ACCEPT says what was agreed (with the provider's URI). For the resumable pair,
/// checkpoints cross the hop on the lanes: relay A's reach the provider's control stream, the
/// provider's reach relay A on the lane B opens toward it. When relay A's connection ends, the
/// provider's half is reset with PEER_LOST, so the provider resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_stream_is_resumable_only_when_both_ends_asked_and_its_checkpoints_cross_the_hop()
 {
    use outrelay_relay::forward::CheckpointOutcome;
    let w = mesh_world(&[allow("demo", "*", "*")]);
    let forward = w.relay.forward.clone().expect("forwarding served");
    let (mut resuming, _) = w.resume_agent(AGENT_2).await;
    assert!(matches!(
        resuming.provide("pay", 1).await,
        Frame::RegisterAck(_)
    ));
    let mut plain = w.agent(AGENT_3).await;
    assert!(matches!(
        plain.provide("ledger", 1).await,
        Frame::RegisterAck(_)
    ));
    let relay9 = w.peer_relay().await;
    let (inc, acc, uri, _not_asked) =
        forward_marks(&relay9.conn, &resuming, "pay", 11, false).await;
    assert_eq!(
        (inc, acc, uri.as_str()),
        (false, false, ""),
        "relay A did not ask"
    );
    let (inc, acc, uri, _plain) = forward_marks(&relay9.conn, &plain, "ledger", 12, true).await;
    assert_eq!(
        (inc, acc, uri.as_str()),
        (false, false, ""),
        "the provider did not ask"
    );
    let (inc, acc, uri, (_cs, _cr, _ps, mut pr)) =
        forward_marks(&relay9.conn, &resuming, "pay", 13, true).await;
    assert_eq!(
        (inc, acc, uri.as_str()),
        (true, true, AGENT_2),
        "both asked"
    );

    // The consumer's checkpoint (on relay 9's lane) reaches the provider's control stream.
    let mut lane = tokio::time::timeout(WAIT, relay9.conn.open_uni())
        .await
        .expect("the relay grants a lane")
        .expect("lane");
    let from_consumer = Frame::StreamCheckpoint(orp::StreamCheckpoint {
        stream_id: 13,
        my_position: 5,
        peer_ack_position: 7,
    });
    lane.write_all(&from_consumer.to_vec().expect("encode"))
        .await
        .expect("write");
    let got = loop {
        match resuming.recv().await.expect("control frame") {
            Frame::StreamReady(_) => continue,
            other => break other,
        }
    };
    assert_eq!(got, from_consumer);
    // The lane counts after handing the frame over: the count may trail the frame.
    eventually("the checkpoint counted as delivered", || {
        forward.stats.checkpoints(CheckpointOutcome::Delivered) == 1
    })
    .await;

    // The provider's checkpoint reaches relay 9 on the lane the relay opens toward it.
    let from_provider = Frame::StreamCheckpoint(orp::StreamCheckpoint {
        stream_id: 13,
        my_position: 7,
        peer_ack_position: 5,
    });
    resuming.send(from_provider.clone()).await.expect("send");
    let mut back = tokio::time::timeout(WAIT, relay9.conn.accept_uni())
        .await
        .expect("the relay opens its lane")
        .expect("lane");
    assert_eq!(read_one(&mut back).await, from_provider);
    eventually("the checkpoint counted as sent", || {
        forward.stats.checkpoints(CheckpointOutcome::Sent) == 1
    })
    .await;

    // Relay A's connection ends (as when it dies): the provider's half is reset with
    // PEER_LOST (17), the code after which an agent resumes.
    relay9.conn.close(0u32.into(), b"relay A went away");
    let mut buf = [0u8; 16];
    match tokio::time::timeout(WAIT, pr.read(&mut buf))
        .await
        .expect("the provider's half is reset in time")
    {
        Err(quinn::ReadError::Reset(code)) => {
            assert_eq!(u64::from(code), u64::from(close_code::PEER_LOST));
        }
        other => panic!("expected a PEER_LOST reset, got {other:?}"),
    }
    drop(plain);
}

/// Relay B arms the rule-expiry timer of a forwarded stream from its own callee-side verdict:
/// when the one rule allowing the stream (both sides) expires, B cuts both halves with
/// POLICY_CUT by itself (relay A, here a silent test peer, never does), counted `cut_expired`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_b_cuts_a_forwarded_stream_when_its_allowing_rule_expires() {
    let w = mesh_world(&[]);
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms");
    let mut rule = allow("demo", "*", "*").to_rule(0);
    rule.expires_unix_ms = now_ms + 1_500;
    w.mesh.set_policy(vec![rule]);
    let (mut provider, _) = w.resume_agent(AGENT_2).await;
    assert!(matches!(
        provider.provide("pay", 1).await,
        Frame::RegisterAck(_)
    ));
    let relay9 = w.peer_relay().await;
    let (_, _, _, (_cs, mut cr, _ps, mut pr)) =
        forward_marks(&relay9.conn, &provider, "pay", 21, false).await;
    let mut buf = [0u8; 64];
    for (side, recv) in [("provider", &mut pr), ("relay A", &mut cr)] {
        let read = tokio::time::timeout(WAIT, recv.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{side}: the forwarded stream was never cut"));
        match read {
            Err(quinn::ReadError::Reset(code)) => {
                assert_eq!(u64::from(code), u64::from(close_code::POLICY_CUT), "{side}");
            }
            other => panic!("{side}: expected a POLICY_CUT reset, got {other:?}"),
        }
    }
    assert_eq!(w.mesh.stats.cut_expired.load(Ordering::Relaxed), 1);
}

/// Relay 9 (a test peer relay on `conn`) opens a FORWARD_STREAM of `consumer`'s stream `id` to
/// `service` (`resume`: the consumer asked for resume): the open stream, once its
/// FORWARD_STREAM is written.
async fn forward_open(
    conn: &quinn::Connection,
    consumer: &str,
    service: &str,
    id: u64,
    resume: bool,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.expect("stream");
    write_frame(
        &mut send,
        Frame::ForwardStream(orp::IncomingStream {
            target_service: service.to_owned(),
            method: String::new(),
            source_agent_uri: consumer.to_owned(),
            stream_id: id,
            resume,
        }),
    )
    .await;
    (send, recv)
}

/// All forwarded streams between two relays share one QUIC connection, and a stream whose
/// reader stops holds its whole stream window of the connection's. Tenant demo's provider
/// never reads: relay 9 forwards demo streams up to `max_streams_per_peer_per_tenant` to it
/// and writes into each until nothing moves (each holds its window at the relay); the next
/// demo stream is refused 429 (`tenant_streams_full`). Meanwhile tenant acme's forwarded
/// stream on the same connection still carries its bytes: with an agent-sized 8 MiB
/// connection window, 8 stalled demo streams stopped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_stalled_forwarded_streams_leave_another_tenants_stream_flowing() {
    use outrelay_relay::forward::Refusal;
    const ACME_1: &str = "outrelay://acme/agent/00000000-0000-4000-8000-000000000001";
    const ACME_2: &str = "outrelay://acme/agent/00000000-0000-4000-8000-000000000002";
    const WRITE_BYTES: usize = 4 << 20;
    let w = mesh_world(&[allow("demo", "*", "*"), allow("acme", "*", "*")]);
    let forward = w.relay.forward.clone().expect("forwarding served");
    let cap = outrelay_relay::forward::ForwardConfig::default().max_streams_per_peer_per_tenant;
    let mut stalled = w.agent(AGENT_2).await;
    assert!(matches!(
        stalled.provide("pay", 1).await,
        Frame::RegisterAck(_)
    ));
    let mut acme = w.agent(ACME_2).await;
    assert!(matches!(
        acme.provide("ledger", 1).await,
        Frame::RegisterAck(_)
    ));
    let relay9 = w.peer_relay().await;

    // Demo's streams: accepted by a provider that never reads, written into until stuck.
    let mut held = Vec::new();
    let mut writers = Vec::new();
    for i in 0..cap {
        let id = 1_000 + u64::try_from(i).expect("small");
        let opening = async {
            let (send, mut recv) = forward_open(&relay9.conn, AGENT_1, "pay", id, false).await;
            let (_inc, mut p_send, p_recv) = stalled.incoming().await;
            write_frame(
                &mut p_send,
                Frame::StreamAccept(orp::StreamAccept::default()),
            )
            .await;
            assert!(matches!(read_one(&mut recv).await, Frame::StreamAccept(_)));
            (send, recv, p_send, p_recv)
        };
        let (mut send, recv, p_send, p_recv) = tokio::time::timeout(WAIT, opening)
            .await
            .unwrap_or_else(|_| panic!("demo stream {i} could not open: the connection is stuck"));
        held.push((recv, p_send, p_recv));
        writers.push(tokio::spawn(async move {
            let chunk = vec![0x5a_u8; WRITE_BYTES];
            let _ = send.write_all(&chunk).await;
            send
        }));
    }
    // Stuck: relay 9's bytes on the wire stop growing (every demo stream holds its windows).
    let sent = || relay9.conn.stats().udp_tx.bytes;
    let mut last = sent();
    let mut still_since = Instant::now();
    let started = Instant::now();
    while still_since.elapsed() < Duration::from_millis(500) {
        assert!(started.elapsed() < WAIT * 3, "demo's writes never stalled");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sent();
        if now != last {
            last = now;
            still_since = Instant::now();
        }
    }
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "a demo stream took {WRITE_BYTES} bytes without its provider reading"
    );
    assert!(
        last > u64::try_from(cap).expect("small") << 20,
        "each stalled demo stream holds at least its 1 MiB window: {last} bytes sent"
    );

    // Demo is at its share of this peer: refused, counted.
    let refused = async {
        let (_s, mut r) = forward_open(&relay9.conn, AGENT_1, "pay", 5_000, false).await;
        read_one(&mut r).await
    };
    let answer = tokio::time::timeout(WAIT, refused)
        .await
        .expect("the refusal came back");
    assert_eq!(reject_code(&answer), 429);
    assert_eq!(
        forward.stats.refused(Refusal::TenantStreamsFull(0)),
        1,
        "counted tenant_streams_full"
    );

    // Acme's stream on the same connection carries its bytes.
    let message = vec![0xa5_u8; 256 << 10];
    let crossing = async {
        let (mut send, mut recv) = forward_open(&relay9.conn, ACME_1, "ledger", 6_000, false).await;
        let (_inc, mut p_send, mut p_recv) = acme.incoming().await;
        write_frame(
            &mut p_send,
            Frame::StreamAccept(orp::StreamAccept::default()),
        )
        .await;
        assert!(matches!(read_one(&mut recv).await, Frame::StreamAccept(_)));
        send.write_all(&message).await.expect("write");
        send.finish().expect("finish");
        p_recv.read_to_end(1 << 20).await.expect("read")
    };
    let got = tokio::time::timeout(WAIT, crossing)
        .await
        .expect("acme's bytes crossed while demo's streams were stalled");
    assert_eq!(got, message);
    drop((held, writers));
}
