//! Review M5 (a) against the REAL relay and controller binaries: revoking an agent
//! (`Pki.Revoke`, what `outrelay cert revoke` calls) or banning its lease (`Leases.Ban`, what
//! `outrelay leases ban` calls) closes the lease's public connections that are already spliced,
//! within 2 s, on both io backends, while another tenant's lease keeps echoing.
//!
//! Build first: `cargo build --release -p outrelay-relay -p outrelay-controller`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use outrelay_api::pb::{self, leases_client::LeasesClient, pki_client::PkiClient};
use outrelay_proto::frame::Frame;
use outrelay_proto::orp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const VICTIM: &str = "outrelay://test/agent/00000000-0000-4000-8000-0000000000c1";
const OTHER: &str = "outrelay://other/agent/00000000-0000-4000-8000-0000000000c2";
/// The review's bound on how long a cut takes.
const CUT_WITHIN: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug)]
enum Action {
    Revoke,
    Ban,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_agent_closes_its_spliced_connections_within_2s() {
    for backend in io_backends() {
        if !cut_case(backend, Action::Revoke).await {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banning_the_lease_closes_its_spliced_connections_within_2s() {
    for backend in io_backends() {
        if !cut_case(backend, Action::Ban).await {
            return;
        }
    }
}

/// One case on one backend; false when it was skipped (no controller binary).
async fn cut_case(backend: &str, action: Action) -> bool {
    eprintln!("--- {action:?}, io backend {backend}");
    let ca = Ca::new();
    let Some(controller) = start_controller(&ca).await else {
        eprintln!(
            "SKIP cut tests: outrelay-controller is not built \
             (cargo build --release -p outrelay-controller)"
        );
        return false;
    };
    let admin = controller.admin(&ca).await;
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            backend: Some(backend.to_owned()),
            tables: format!(
                "[controller]\nurl = \"https://{}\"\nheartbeat_interval_ms = 200\n\
                 reconnect_backoff_ms = 100\nstate_dir = \"relay-state\"\n",
                controller.grpc
            ),
            ..Opts::default()
        },
    )
    .await;
    let (target, _echo) = echo_server().await;
    let mut victim = connect_when_ready(&relay, &ca, VICTIM).await;
    let mut other = connect_when_ready(&relay, &ca, OTHER).await;
    let victim_grant = register_when_ready(&mut victim, "web").await;
    let other_grant = register_when_ready(&mut other, "other-web").await;
    victim.serve_lease(&relay, &victim_grant, target);
    other.serve_lease(&relay, &other_grant, target);
    let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
    let victim_conn = connect_lease_port(localhost, lease_port(&victim_grant)).await;
    let other_conn = connect_lease_port(localhost, lease_port(&other_grant)).await;
    // Both sessions echo before the action.
    let victim_echo = Echoing::start(victim_conn).await;
    let other_echo = Echoing::start(other_conn).await;

    let mut started = Instant::now();
    match action {
        Action::Revoke => {
            PkiClient::new(admin.clone())
                .revoke(pb::RevokeRequest { uri: VICTIM.into() })
                .await
                .expect("Revoke");
        }
        Action::Ban => {
            ban(&admin, "web", &mut started).await;
        }
    }
    let rpc = started.elapsed();
    let closed = victim_echo
        .ended_within(WAIT)
        .await
        .map(|at| at.saturating_duration_since(started));
    eprintln!(
        "MEASURED ({backend}, {action:?}): the RPC took {rpc:?}; the public connection was \
         closed {closed:?} after the call started"
    );
    let closed = closed.unwrap_or_else(|| panic!("{action:?}: the public connection stayed open"));
    assert!(
        closed <= rpc + CUT_WITHIN,
        "{action:?}: closed {closed:?} after the call (the RPC took {rpc:?})"
    );
    // The other tenant's session kept echoing all along and still does.
    let rounds = other_echo.rounds.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        other_echo.rounds.load(Ordering::Relaxed) > rounds,
        "the other tenant's session stopped echoing"
    );
    assert!(
        other_echo.ended.borrow().is_none(),
        "the other tenant's session was closed"
    );
    let reason = match action {
        Action::Revoke => "revoked",
        Action::Ban => "banned",
    };
    assert!(
        relay
            .metric(&format!(
                "outrelay_relay_pairs_cut_total{{reason=\"{reason}\"}}"
            ))
            .await
            >= 1.0
    );
    true
}

/// A certificate that expires while its connection is up: the relay closes the connection at
/// its notAfter (TLS checked it only at the handshake), on a relay without a controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_connection_ends_when_its_certificate_expires() {
    const VALID_FOR: Duration = Duration::from_secs(3);
    let ca = Ca::new();
    let relay = start_relay(&ca, "", None).await;
    let issued = Instant::now();
    let (_endpoint, conn) = dial_until(&relay, &ca, AGENT, Some(VALID_FOR)).await;
    let (mut send, _recv) = conn.open_bi().await.expect("control stream");
    let hello = Frame::Hello(orp::Hello {
        protocol_version: "orp/1".to_owned(),
        agent_uri: AGENT.to_owned(),
        capabilities: vec!["leases".to_owned()],
    });
    send.write_all(&hello.to_vec().expect("encode"))
        .await
        .expect("HELLO");
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the relay closes the connection of an expired certificate");
    eprintln!(
        "MEASURED: a certificate valid for {VALID_FOR:?} (whole seconds) ended its connection \
         {:?} after it was issued",
        issued.elapsed()
    );
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code.into_inner(), 16, "CERT_EXPIRED: {c:?}");
        }
        other => panic!("closed otherwise: {other:?}"),
    }
    // Not before its notAfter (whole seconds, so at least VALID_FOR - 1 s after `issued`).
    assert!(issued.elapsed() >= VALID_FOR - Duration::from_secs(1));
}

/// Bans tenant `test`'s lease `name` once the relay has reported it; `started` is reset to
/// just before the Ban call.
async fn ban(admin: &tonic::transport::Channel, name: &str, started: &mut Instant) {
    let record = loop {
        let leases = LeasesClient::new(admin.clone())
            .list(pb::ListLeasesRequest {
                tenant: "test".into(),
            })
            .await
            .expect("List")
            .into_inner()
            .leases;
        if let Some(r) = leases
            .into_iter()
            .find(|l| l.name == name && l.state == pb::lease::State::Approved as i32)
        {
            break r;
        }
        assert!(started.elapsed() < WAIT, "lease {name} never reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    *started = Instant::now();
    LeasesClient::new(admin.clone())
        .ban(pb::LeaseActionRequest {
            tenant: "test".into(),
            id: record.id,
        })
        .await
        .expect("Ban");
}

/// A banned UDP lease's flow stops being carried: no reply after the ban (the port is
/// closed with its route), while the agent still echoes whatever reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_udp_lease_stops_carrying_its_flow() {
    let ca = Ca::new();
    let Some(controller) = start_controller(&ca).await else {
        eprintln!(
            "SKIP a_banned_udp_lease_stops_carrying_its_flow: outrelay-controller is not built"
        );
        return;
    };
    let admin = controller.admin(&ca).await;
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("udp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            tables: format!(
                "[controller]\nurl = \"https://{}\"\nheartbeat_interval_ms = 200\n\
                 reconnect_backoff_ms = 100\nstate_dir = \"relay-state\"\n",
                controller.grpc
            ),
            ..Opts::default()
        },
    )
    .await;
    let mut agent = connect_when_ready(&relay, &ca, VICTIM).await;
    let grant = register_req_when_ready(
        &mut agent,
        orp::LeaseRegister {
            name: "dns".to_owned(),
            udp: true,
            ttl_s: 300,
            request_id: 1,
            ..orp::LeaseRegister::default()
        },
    )
    .await;
    agent.serve_udp_echo();
    let lease = std::net::SocketAddr::from(([127, 0, 0, 1], port_of(&grant.udp_addr)));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut started = Instant::now();
    while !echoed(&client, lease).await {
        assert!(started.elapsed() < WAIT, "the UDP lease never echoed");
    }
    ban(&admin, "dns", &mut started).await;
    // Replies stop within the bound and stay stopped.
    while echoed(&client, lease).await {
        assert!(
            started.elapsed() < CUT_WITHIN,
            "the banned UDP lease still echoes {:?} after the Ban call",
            started.elapsed()
        );
    }
    eprintln!(
        "MEASURED: the banned UDP lease's flow stopped {:?} after the Ban call",
        started.elapsed()
    );
    for _ in 0..5 {
        assert!(!echoed(&client, lease).await, "a reply after the ban");
    }
}

/// One datagram to `lease`: whether its echo came back within 200 ms.
async fn echoed(client: &tokio::net::UdpSocket, lease: std::net::SocketAddr) -> bool {
    let mut buf = [0u8; 64];
    client.send_to(b"ping", lease).await.is_ok()
        && matches!(
            tokio::time::timeout(Duration::from_millis(200), client.recv_from(&mut buf)).await,
            Ok(Ok((4, _)))
        )
}

/// Connects as `uri`, retrying while the relay has no revocation list from its controller yet.
async fn connect_when_ready(relay: &Relay, ca: &Ca, uri: &str) -> Agent {
    let start = Instant::now();
    loop {
        match Agent::try_connect_as(relay, ca, uri).await {
            Ok(agent) => return agent,
            Err(e) => {
                assert!(start.elapsed() < WAIT, "agent {uri} never admitted: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A TCP lease `name`, retrying while the relay has no decisions from its controller yet.
async fn register_when_ready(agent: &mut Agent, name: &str) -> orp::LeaseGrant {
    register_req_when_ready(
        agent,
        orp::LeaseRegister {
            name: name.to_owned(),
            tcp: true,
            ttl_s: 300,
            request_id: 1,
            ..orp::LeaseRegister::default()
        },
    )
    .await
}

/// LEASE_REGISTER of `req`, retrying while the relay has no decisions from its controller yet.
async fn register_req_when_ready(agent: &mut Agent, req: orp::LeaseRegister) -> orp::LeaseGrant {
    let start = Instant::now();
    let name = req.name.clone();
    loop {
        let answer = agent.call(Frame::LeaseRegister(req.clone())).await;
        match answer {
            Frame::LeaseGrant(g) => return g,
            other => {
                assert!(start.elapsed() < WAIT, "{name} never granted: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A public connection through an echo lease, kept busy: a 1 KiB round trip every 20 ms until
/// it fails; `ended` holds when.
struct Echoing {
    rounds: Arc<AtomicU64>,
    ended: tokio::sync::watch::Receiver<Option<Instant>>,
}

impl Echoing {
    async fn start(mut stream: TcpStream) -> Echoing {
        stream.set_nodelay(true).expect("nodelay");
        // The first round trip proves the lease carries bytes.
        round_trip(&mut stream)
            .await
            .expect("an echo before the action");
        let rounds = Arc::new(AtomicU64::new(1));
        let (tx, ended) = tokio::sync::watch::channel(None);
        let counted = rounds.clone();
        tokio::spawn(async move {
            while round_trip(&mut stream).await.is_ok() {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tx.send(Some(Instant::now()));
        });
        Echoing { rounds, ended }
    }

    /// When the connection ended; `None` if it is still open after `within`.
    async fn ended_within(&self, within: Duration) -> Option<Instant> {
        let mut ended = self.ended.clone();
        *tokio::time::timeout(within, ended.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()?
    }
}

async fn round_trip(stream: &mut TcpStream) -> Result<(), String> {
    let data = [0x5au8; 1024];
    stream.write_all(&data).await.map_err(|e| e.to_string())?;
    let mut back = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .map_err(|_| "no echo within 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    if back != data {
        return Err("echo differs".to_owned());
    }
    Ok(())
}
