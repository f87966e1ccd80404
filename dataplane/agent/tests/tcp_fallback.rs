//! Issue 22, TCP/443 fallback: an agent in a network namespace whose nftables drop every UDP
//! datagram leaving it connects to the relay over TLS on the relay's public TLS port (its QUIC
//! carried inside), serves a TLS lease, a TCP lease (reverse sessions over TCP), a service
//! stream and a UDP lease through it, says `tls-tcp` in `agent status`, and moves to QUIC when
//! UDP is allowed again, still serving. Real processes; root, `ip` and `nft` needed (the test
//! prints SKIP without them).

mod common;
use common::world::*;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use outrelay_testkit::netns::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A TCP echo listener and a UDP echo socket bound on 127.0.0.1 INSIDE `ns`.
fn targets_in(ns: &Netns) -> (SocketAddr, SocketAddr) {
    let (tcp, udp) = ns
        .within(|| {
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind TCP echo");
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP echo");
            tcp.set_nonblocking(true).expect("nonblocking");
            udp.set_nonblocking(true).expect("nonblocking");
            (tcp, udp)
        })
        .expect("enter the namespace");
    let (tcp_addr, udp_addr) = (
        tcp.local_addr().expect("addr"),
        udp.local_addr().expect("addr"),
    );
    let tcp = TcpListener::from_std(tcp).expect("tokio listener");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let udp = UdpSocket::from_std(udp).expect("tokio UDP");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], from).await;
        }
    });
    (tcp_addr, udp_addr)
}

/// A real TLS ClientHello for `host` (what the SNI listener routes on).
fn client_hello(host: &str) -> Vec<u8> {
    use tokio_rustls::rustls;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).expect("server name");
    let mut conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("ClientHello");
    hello
}

/// Sends `payload` on a new TCP connection to `addr` and reads it back (the echo target).
async fn tcp_echo(addr: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let run = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(payload).await.map_err(|e| e.to_string())?;
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        if back == payload {
            Ok(())
        } else {
            Err("echo differs".to_owned())
        }
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| "timeout".to_owned())?
}

/// One UDP datagram to `addr` and its echo.
async fn udp_echo(addr: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let s = UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..10 {
        s.send_to(payload, addr).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2048];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await
            && &buf[..n] == payload
        {
            return Ok(());
        }
    }
    Err("no UDP echo".to_owned())
}

/// Retries `f` until it succeeds (bounded by [`WAIT`]).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let from = Instant::now();
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) if from.elapsed() > WAIT => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `outrelay-agent status --metrics ADDR` output.
fn agent_status(metrics: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_outrelay-agent"))
        .args(["status", "--metrics", metrics])
        .output()
        .expect("outrelay-agent status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lease_port(ready: &serde_json::Value, name: &str, key: &str) -> u16 {
    ready["leases"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .and_then(|l| l[key].as_str())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{key} of lease {name} in {ready}"))
}

/// Every path through the relay: TLS lease (SNI), TCP lease, service stream, UDP lease.
async fn serve_all(
    public_tls: SocketAddr,
    web_host: &str,
    tcp_lease: SocketAddr,
    udp_lease: SocketAddr,
    consumer: SocketAddr,
    round: &str,
) {
    let hello = client_hello(web_host);
    eventually(&format!("{round}: TLS lease"), || {
        tcp_echo(public_tls, &hello)
    })
    .await;
    eventually(&format!("{round}: TCP lease"), || {
        tcp_echo(tcp_lease, b"tcp lease bytes")
    })
    .await;
    eventually(&format!("{round}: service stream"), || {
        tcp_echo(consumer, b"service stream bytes")
    })
    .await;
    eventually(&format!("{round}: UDP lease"), || {
        udp_echo(udp_lease, b"udp lease datagram")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_behind_a_udp_drop_serves_over_tcp_443_then_moves_to_quic() {
    if let Some(why) = Netns::probe() {
        eprintln!("SKIP agent_behind_a_udp_drop_serves_over_tcp_443_then_moves_to_quic: {why}");
        return;
    }
    let tag = format!("{}", std::process::id() % 100_000);
    let subnet = u8::try_from(std::process::id() % 250).expect("subnet") + 1;
    let ns = Netns::create(&tag, subnet).expect("namespace with veth");
    ns.drop_udp().expect("nftables UDP drop");
    let host_ip = ns.host_ip.to_string();

    let (lo, hi) = outrelay_testkit::claim_port_range();
    let w = World::standalone(&format!(
        "[[policy]]\ntenant = \"{TENANT_A}\"\ncaller = \"*\"\ntarget = \"svc\"\n\
         decision = \"allow\"\n\
         [leases]\ntcp = true\nudp = true\nmin_port = {lo}\nmax_port = {hi}\n"
    ))
    .await;
    // The root host's connection cap is short here: a tunnel must outlive it.
    let (_relay, info) = w
        .relay_on_ip(
            "relay-veth",
            "relay-veth",
            &host_ip,
            "[ingress]\nroot_conn_max_ms = 300\n",
        )
        .await;
    let quic = addr_in(&info, "quic");
    let public_tls = addr_in(&info, "public_tls");
    eprintln!("relay on the veth: quic {quic}, public TLS {public_tls}");

    let (echo, udp_target) = targets_in(&ns);
    let body = format!(
        "[[lease]]\nname = \"web\"\ntls_to = \"{echo}\"\n\
         [[lease]]\nname = \"raw\"\ntcp_to = \"{echo}\"\n\
         [[lease]]\nname = \"ping\"\nudp_to = \"{udp_target}\"\n\
         {provide}\
         [fallback]\nquic_timeout_ms = 1000\nconnect_timeout_ms = 3000\n\
         quic_retry_initial_ms = 500\nquic_retry_max_ms = 1000\n\
         server_name = \"relay.mesh.test\"\naddrs = {{ \"{quic}\" = \"{public_tls}\" }}\n",
        provide = provide("svc", echo),
    );
    let mut provider = w.agent_via(
        ns.command(env!("CARGO_BIN_EXE_outrelay-agent")),
        "provider-ns",
        PROVIDER_A,
        &[quic],
        &ns.ns_ip.to_string(),
        &body,
    );
    let ready = provider.ready().await;
    let metrics = addr_in(&ready, "metrics").to_string();
    let status = agent_status(&metrics);
    eprintln!("agent status:\n{status}");
    assert!(
        held_via(&status, "tls-tcp"),
        "status must say tls-tcp while UDP is dropped:\n{status}"
    );
    let web_host = ready["leases"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "web"))
        .and_then(|l| l["hostname"].as_str())
        .unwrap_or_else(|| panic!("hostname of web in {ready}"))
        .to_owned();
    let tcp_lease: SocketAddr = format!("{host_ip}:{}", lease_port(&ready, "raw", "tcp_addr"))
        .parse()
        .expect("tcp lease addr");
    let udp_lease: SocketAddr = format!("{host_ip}:{}", lease_port(&ready, "ping", "udp_addr"))
        .parse()
        .expect("udp lease addr");

    let mut consumer = w.agent_on("consumer", CONSUMER_A, &[quic], &consume("svc"));
    consumer.ready().await;
    let consumer_addr = consumer.consumer(0);

    serve_all(
        public_tls,
        &web_host,
        tcp_lease,
        udp_lease,
        consumer_addr,
        "over TCP/443",
    )
    .await;
    let relay_metrics = scrape(addr_in(&info, "metrics"));
    let tunnels = metric(&relay_metrics, "outrelay_relay_fallback_tunnels", &[]);
    let packets_in = metric(
        &relay_metrics,
        "outrelay_relay_fallback_packets_total",
        &[("direction", "in")],
    );
    eprintln!("MEASURED fallback tunnels_live={tunnels} packets_in={packets_in}");
    assert_eq!(tunnels, 1.0, "one tunnel on the relay:\n{relay_metrics}");
    assert!(packets_in > 0.0, "packets came through the tunnel");
    // Well past the root host's 300 ms cap: the same tunnel still serves.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    serve_all(
        public_tls,
        &web_host,
        tcp_lease,
        udp_lease,
        consumer_addr,
        "after 1 s",
    )
    .await;
    let opened = metric(
        &scrape(addr_in(&info, "metrics")),
        "outrelay_relay_fallback_tunnels_total",
        &[],
    );
    assert_eq!(opened, 1.0, "the first tunnel lived on (no second one)");

    // UDP allowed again: the background QUIC attempt succeeds and the agent moves over.
    ns.allow_udp().expect("remove the UDP drop");
    let moved_from = Instant::now();
    let moved = poll(WAIT, || held_via(&agent_status(&metrics), "quic")).await;
    assert!(
        moved,
        "the agent did not move to QUIC:\n{}",
        agent_status(&metrics)
    );
    eprintln!(
        "MEASURED fallback_to_quic_ms={}",
        moved_from.elapsed().as_millis()
    );
    let returns = metric(
        &provider.scrape(),
        "outrelay_agent_fallback_quic_returns_total",
        &[],
    );
    assert!(returns >= 1.0, "quic_returns counted: {returns}");
    serve_all(
        public_tls,
        &web_host,
        tcp_lease,
        udp_lease,
        consumer_addr,
        "over QUIC",
    )
    .await;
    let gone = poll(WAIT, || {
        metric(
            &scrape(addr_in(&info, "metrics")),
            "outrelay_relay_fallback_tunnels",
            &[],
        ) == 0.0
    })
    .await;
    assert!(gone, "the tunnel closes after the move to QUIC");
}

/// Bytes sent through each provider in the throughput comparison.
const MEASURE_BYTES: u64 = 32 * 1024 * 1024;

/// A target that reads to EOF and answers the byte count (u64, big-endian).
async fn counting_sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().expect("sink addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    addr
}

/// Sends [`MEASURE_BYTES`] through `consumer`; Gbit/s once the sink's count came back.
async fn bulk_gbps(consumer: SocketAddr) -> f64 {
    let mut s = TcpStream::connect(consumer).await.expect("consumer");
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < MEASURE_BYTES {
        s.write_all(&chunk).await.expect("send");
        sent += chunk.len() as u64;
    }
    s.shutdown().await.expect("shutdown");
    let mut count = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut count))
        .await
        .expect("count in time")
        .expect("count");
    let took = started.elapsed();
    assert_eq!(
        u64::from_be_bytes(count),
        MEASURE_BYTES,
        "every byte arrived"
    );
    MEASURE_BYTES as f64 * 8.0 / took.as_secs_f64() / 1e9
}

/// Bulk throughput of a service stream whose provider is on the TCP fallback against one whose
/// provider is on QUIC (same relay, loopback; the consumer is on QUIC in both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_bulk_throughput_against_quic() {
    let w = World::standalone(&format!(
        "[[policy]]\ntenant = \"{TENANT_A}\"\ncaller = \"*\"\ntarget = \"*\"\ndecision = \"allow\"\n"
    ))
    .await;
    let relay_info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(w.path().join("relay-ready.json")).expect("relay ready file"),
    )
    .expect("relay ready JSON");
    let public_tls = addr_in(&relay_info, "public_tls");
    let sink = counting_sink().await;
    let mut quic_provider = w.agent(
        "provider-quic",
        PROVIDER_A,
        &format!("{}[fallback]\nmode = \"off\"\n", provide("bulkq", sink)),
    );
    let mut tcp_provider = w.agent(
        "provider-tcp",
        PROVIDER_A2,
        &format!(
            "{}[fallback]\nmode = \"only\"\nserver_name = \"relay.mesh.test\"\n\
             addrs = {{ \"{quic}\" = \"{public_tls}\" }}\n",
            provide("bulkt", sink),
            quic = w.quic,
        ),
    );
    quic_provider.ready().await;
    tcp_provider.ready().await;
    let status = agent_status(&addr_in(&tcp_provider.info, "metrics").to_string());
    assert!(held_via(&status, "tls-tcp"), "{status}");
    let mut consumer = w.agent(
        "consumer",
        CONSUMER_A,
        &format!("{}{}", consume("bulkq"), consume("bulkt")),
    );
    consumer.ready().await;
    let (to_quic, to_tcp) = (consumer.consumer(0), consumer.consumer(1));
    // Warm both paths (first stream, congestion windows), then measure.
    let _ = bulk_gbps(to_quic).await;
    let _ = bulk_gbps(to_tcp).await;
    let quic_gbps = bulk_gbps(to_quic).await;
    let tcp_gbps = bulk_gbps(to_tcp).await;
    let drops = metric(
        &tcp_provider.scrape(),
        "outrelay_agent_fallback_packets_dropped_total",
        &[("reason", "queue_full")],
    );
    let relay_drops = metric(
        &w.relay_scrape(),
        "outrelay_relay_fallback_packets_dropped_total",
        &[("reason", "queue_full")],
    );
    eprintln!(
        "MEASURED tcp_fallback_gbps={tcp_gbps:.3} quic_gbps={quic_gbps:.3} bytes={MEASURE_BYTES} \
         agent_queue_drops={drops} relay_queue_drops={relay_drops}"
    );
    assert!(tcp_gbps > 0.0 && quic_gbps > 0.0);
}

/// Whether `agent status` shows a CONNECTED relay line on `transport` (an idle HA slot's line
/// says `DISCONNECTED … via quic` and must not count).
fn held_via(status: &str, transport: &str) -> bool {
    status.lines().any(|l| {
        l.starts_with("relay ")
            && l.contains(" connected")
            && l.contains(&format!(" via {transport}"))
    })
}

/// A namespace for one of the "one TCP port only" tests (`suffix` keeps names apart), a relay
/// on its veth (TCP and UDP leases) and that relay's ready file. With `controller`, the world
/// has a controller whose enrollment port is on the veth too (policy: add rules), else the
/// relay is standalone with a rule letting tenant A call `svc`.
async fn one_port_world(
    suffix: u32,
    controller: bool,
) -> Option<(Netns, World, Proc, serde_json::Value)> {
    if let Some(why) = Netns::probe() {
        eprintln!("SKIP: {why}");
        return None;
    }
    let tag = format!("{}{suffix}", std::process::id() % 10_000);
    let subnet = u8::try_from((std::process::id() + suffix * 83) % 250).expect("subnet") + 1;
    let ns = Netns::create(&tag, subnet).expect("namespace with veth");
    let host_ip = ns.host_ip.to_string();
    let (lo, hi) = outrelay_testkit::claim_port_range();
    let leases = format!("[leases]\ntcp = true\nudp = true\nmin_port = {lo}\nmax_port = {hi}\n");
    let (w, extra) = if controller {
        let w = World::with_controller_on(&host_ip, "").await;
        w.rule(TENANT_A, ANY_A, "svc", "allow", None).await;
        (w, leases)
    } else {
        let policy = format!(
            "[[policy]]\ntenant = \"{TENANT_A}\"\ncaller = \"*\"\ntarget = \"svc\"\n\
             decision = \"allow\"\n{leases}"
        );
        (World::standalone(&policy).await, String::new())
    };
    let (relay, info) = w
        .relay_on_ip("relay-veth", "relay-veth", &host_ip, &extra)
        .await;
    Some((ns, w, relay, info))
}

/// The `[fallback]` table of an agent that may reach the relay only over TCP: `addrs` lists
/// the public TLS port first, then the reverse port.
fn fallback_table(quic: SocketAddr, public_tls: SocketAddr, reverse: SocketAddr) -> String {
    format!(
        "[fallback]\nquic_timeout_ms = 1000\nconnect_timeout_ms = 1000\n\
         quic_retry_initial_ms = 5000\nquic_retry_max_ms = 10000\n\
         server_name = \"relay.mesh.test\"\n\
         addrs = {{ \"{quic}\" = [\"{public_tls}\", \"{reverse}\"] }}\n"
    )
}

/// Issue 22, only 443/tcp open: the agent's namespace lets out ONLY TCP to the relay's public
/// TLS port and the controller's enrollment port (no UDP, not the reverse port). The agent
/// enrolls, then its tunnel runs to the TLS port, and so do the reverse
/// sessions (first bytes `ORRS` on the TLS port): a TLS passthrough lease (curl through the
/// relay's TLS port to a real TLS server behind the agent), a TCP lease, a service stream and a
/// UDP lease all work; `agent status` names the port; the relay counts the sessions as having
/// come through its TLS port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_allowed_only_the_tls_port_serves_every_path_through_it() {
    let Some((ns, w, _relay, info)) = one_port_world(1, true).await else {
        eprintln!("SKIP agent_allowed_only_the_tls_port_serves_every_path_through_it");
        return;
    };
    let host_ip = ns.host_ip.to_string();
    let (quic, public_tls, reverse) = (
        addr_in(&info, "quic"),
        addr_in(&info, "public_tls"),
        addr_in(&info, "reverse"),
    );
    let enroll_port = w
        .grpc_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("controller port");
    ns.allow_only_tcp(&[public_tls.port(), enroll_port])
        .expect("nftables: only the TLS and enrollment ports");
    let (cert, key) = w
        .enroll(
            ns.command(env!("CARGO_BIN_EXE_outrelay-agent")),
            "provider-443",
            TENANT_A,
        )
        .await;
    let (echo, udp_target) = targets_in(&ns);
    let web_host = "web.relay.mesh.test";
    let https = ns
        .within(|| std::net::TcpListener::bind("127.0.0.1:0").expect("bind HTTPS target"))
        .expect("enter the namespace");
    let https_addr = https.local_addr().expect("addr");
    let _https = https_target_on(https, &w.ca, web_host);
    let body = format!(
        "[[lease]]\nname = \"web\"\ntls_to = \"{https_addr}\"\n\
         [[lease]]\nname = \"raw\"\ntcp_to = \"{echo}\"\n\
         [[lease]]\nname = \"ping\"\nudp_to = \"{udp_target}\"\n\
         {provide}{fallback}",
        provide = provide("svc", echo),
        fallback = fallback_table(quic, public_tls, reverse),
    );
    let mut provider = w.agent_with_identity(
        ns.command(env!("CARGO_BIN_EXE_outrelay-agent")),
        "provider-443",
        &cert,
        &key,
        &[quic.to_string()],
        "",
        &ns.ns_ip.to_string(),
        &body,
    );
    let ready = provider.ready().await;
    let metrics = addr_in(&ready, "metrics").to_string();
    let status = agent_status(&metrics);
    eprintln!("agent status:\n{status}");
    assert!(held_via(&status, "tls-tcp"), "{status}");
    assert!(
        status.contains(&format!("tunnel to {public_tls}")),
        "status names the tunnel's port:\n{status}"
    );
    assert!(
        status.contains(&format!("reverse sessions to {public_tls}")),
        "status names where reverse sessions go:\n{status}"
    );
    assert_eq!(
        ready["leases"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["name"] == "web"))
            .and_then(|l| l["hostname"].as_str()),
        Some(web_host)
    );
    let tcp_lease: SocketAddr = format!("{host_ip}:{}", lease_port(&ready, "raw", "tcp_addr"))
        .parse()
        .expect("tcp lease addr");
    let udp_lease: SocketAddr = format!("{host_ip}:{}", lease_port(&ready, "ping", "udp_addr"))
        .parse()
        .expect("udp lease addr");
    let mut consumer = w.agent_on("consumer", CONSUMER_A, &[quic], &consume("svc"));
    consumer.ready().await;
    let consumer_addr = consumer.consumer(0);

    // TLS passthrough: curl through the relay's TLS port, verified end to end.
    let from = Instant::now();
    loop {
        match curl_https(w.path(), web_host, &host_ip, public_tls.port()).await {
            None => {
                eprintln!("SKIP the curl part: no curl here; a raw ClientHello instead");
                eventually("TLS lease", || tcp_echo_hello(public_tls, web_host)).await;
                break;
            }
            Some(Ok(got)) => {
                assert_eq!(got, BODY);
                break;
            }
            Some(Err(e)) => {
                assert!(from.elapsed() < WAIT, "curl through the TLS port: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    eventually("TCP lease", || tcp_echo(tcp_lease, b"tcp lease bytes")).await;
    eventually("service stream", || {
        tcp_echo(consumer_addr, b"service stream bytes")
    })
    .await;
    eventually("UDP lease", || udp_echo(udp_lease, b"udp lease datagram")).await;

    let m = scrape(addr_in(&info, "metrics"));
    let via = metric(
        &m,
        "outrelay_relay_reverse_via_tls_port_total",
        &[("phase", "authenticated")],
    );
    let all = metric(
        &m,
        "outrelay_relay_reverse_sessions_authenticated_total",
        &[],
    );
    eprintln!("MEASURED reverse sessions via the TLS port {via} of {all} authenticated");
    assert!(via >= 2.0, "sessions came through the TLS port:\n{m}");
    assert_eq!(via, all, "every session came through the TLS port");
    assert_eq!(metric(&m, "outrelay_relay_fallback_tunnels", &[]), 1.0);
}

/// The ClientHello for `host` to `addr` comes back from the echo target behind a TLS lease
/// (a stand-in for curl where it is missing).
async fn tcp_echo_hello(addr: SocketAddr, host: &str) -> Result<(), String> {
    tcp_echo(addr, &client_hello(host)).await
}

/// Issue 22, only the reverse port open: the public TLS port is blocked too, so the fallback
/// moves on to the next address, the relay's reverse-session port, which hands the tunnel to
/// the fallback acceptor; a service stream and a TCP lease work through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_allowed_only_the_reverse_port_tunnels_through_it() {
    let Some((ns, w, _relay, info)) = one_port_world(2, false).await else {
        eprintln!("SKIP agent_allowed_only_the_reverse_port_tunnels_through_it");
        return;
    };
    let host_ip = ns.host_ip.to_string();
    let (quic, public_tls, reverse) = (
        addr_in(&info, "quic"),
        addr_in(&info, "public_tls"),
        addr_in(&info, "reverse"),
    );
    ns.allow_only_tcp(&[reverse.port()])
        .expect("nftables: only the reverse port");
    let (echo, _udp) = targets_in(&ns);
    let body = format!(
        "[[lease]]\nname = \"raw\"\ntcp_to = \"{echo}\"\n{provide}{fallback}",
        provide = provide("svc", echo),
        fallback = fallback_table(quic, public_tls, reverse),
    );
    let mut provider = w.agent_via(
        ns.command(env!("CARGO_BIN_EXE_outrelay-agent")),
        "provider-rev",
        PROVIDER_A,
        &[quic],
        &ns.ns_ip.to_string(),
        &body,
    );
    let ready = provider.ready().await;
    let status = agent_status(&addr_in(&ready, "metrics").to_string());
    eprintln!("agent status:\n{status}");
    assert!(held_via(&status, "tls-tcp"), "{status}");
    assert!(
        status.contains(&format!("tunnel to {reverse}")),
        "the tunnel runs to the reverse port:\n{status}"
    );
    let tcp_lease: SocketAddr = format!("{host_ip}:{}", lease_port(&ready, "raw", "tcp_addr"))
        .parse()
        .expect("tcp lease addr");
    let mut consumer = w.agent_on("consumer", CONSUMER_A, &[quic], &consume("svc"));
    consumer.ready().await;
    let consumer_addr = consumer.consumer(0);
    eventually("service stream", || {
        tcp_echo(consumer_addr, b"service stream bytes")
    })
    .await;
    eventually("TCP lease", || tcp_echo(tcp_lease, b"tcp lease bytes")).await;
    let m = scrape(addr_in(&info, "metrics"));
    let via_reverse = metric(&m, "outrelay_relay_fallback_via_reverse_port_total", &[]);
    let failed = metric(
        &provider.scrape(),
        "outrelay_agent_fallback_tunnels_total",
        &[("result", "failed")],
    );
    eprintln!(
        "MEASURED tunnels via the reverse port {via_reverse}; agent attempts failed {failed}"
    );
    assert!(via_reverse >= 1.0, "{m}");
    assert!(failed >= 1.0, "the blocked TLS port was tried first");
    assert_eq!(
        metric(
            &m,
            "outrelay_relay_reverse_via_tls_port_total",
            &[("phase", "handshake")]
        ),
        0.0,
        "no session went to the blocked TLS port"
    );
}
