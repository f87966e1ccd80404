//! Issue 21 (B): bandwidth limits of the REAL relay binary. A TCP lease with
//! `[bandwidth] lease_to_client_bytes_per_s` set moves at the limit (within 10 %), a SIGHUP
//! changing it applies to the running transfer, and `relay status` shows the limit and the
//! throttled time; a UDP lease over its limit drops datagrams as `rate_limited`, counted per
//! lease.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use outrelay_proto::orp;
use tokio::io::AsyncReadExt;

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));

/// Replaces `from` (which must be there) with `to` in the relay's config file, by rename.
fn edit(relay: &Relay, from: &str, to: &str) {
    let path = relay.dir.path().join("relay.toml");
    let text = std::fs::read_to_string(&path).expect("read relay.toml");
    assert!(text.contains(from), "relay.toml has {from:?}:\n{text}");
    let tmp = relay.dir.path().join("relay.toml.tmp");
    std::fs::write(&tmp, text.replacen(from, to, 1)).expect("write relay.toml");
    std::fs::rename(&tmp, &path).expect("rename relay.toml");
}

/// SIGHUP, then waits until the config generation reaches `generation`.
async fn reload(relay: &Relay, generation: f64) {
    let pid = i32::try_from(relay.child.id()).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let start = Instant::now();
    while relay.metric("outrelay_relay_config_generation").await < generation {
        assert!(start.elapsed() < WAIT, "the reload was never applied");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Bytes per second `count` grows at over `span`.
async fn rate_over(count: &AtomicU64, span: Duration) -> f64 {
    let (t0, b0) = (Instant::now(), count.load(Ordering::SeqCst));
    tokio::time::sleep(span).await;
    let (t1, b1) = (Instant::now(), count.load(Ordering::SeqCst));
    (b1 - b0) as f64 / (t1 - t0).as_secs_f64()
}

/// The status entry of the lease named by `hostname`.
fn lease_status(status: &serde_json::Value, hostname: &str) -> serde_json::Value {
    status["leases"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["hostname"] == hostname))
        .cloned()
        .unwrap_or_else(|| panic!("no lease {hostname} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_limit_holds_a_download_and_a_reload_changes_it_mid_transfer() {
    const LIMIT: u64 = 16_000_000;
    for backend in io_backends() {
        let ca = Ca::new();
        let (lo, hi) = free_port_range();
        let relay = start_relay_with(
            &ca,
            Opts {
                leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
                tables: format!("[bandwidth]\nlease_to_client_bytes_per_s = {LIMIT}\n"),
                backend: Some(backend.to_owned()),
                ..Opts::default()
            },
        )
        .await;
        let (zeros, _z) = zeros_target().await;
        let mut agent = Agent::connect(&relay, &ca).await;
        let grant = agent.register("dl", false, true).await;
        agent.serve_lease_with(&relay, &grant, zeros, 2);
        let mut client = connect_lease_port(LOCAL, lease_port(&grant)).await;
        let count = Arc::new(AtomicU64::new(0));
        let reader = {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = client.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    count.fetch_add(n as u64, Ordering::SeqCst);
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rate = rate_over(&count, Duration::from_secs(2)).await;
        let err = (rate - LIMIT as f64).abs() / LIMIT as f64;
        eprintln!(
            "{backend}: {:.2} MB/s through a {} MB/s lease ({:.1} %)",
            rate / 1e6,
            LIMIT / 1_000_000,
            err * 100.0
        );
        assert!(err < 0.10, "{backend}: {rate} B/s, limit {LIMIT}");

        // Halved by SIGHUP: the running transfer follows within a second.
        edit(
            &relay,
            &format!("lease_to_client_bytes_per_s = {LIMIT}"),
            &format!("lease_to_client_bytes_per_s = {}", LIMIT / 2),
        );
        reload(&relay, 2.0).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let half = rate_over(&count, Duration::from_secs(2)).await;
        let err = (half - (LIMIT / 2) as f64).abs() / (LIMIT / 2) as f64;
        eprintln!("{backend}: {:.2} MB/s after the reload", half / 1e6);
        assert!(err < 0.10, "{backend}: {half} B/s after the reload");

        // What the client has read BEFORE the status is taken: the relay read every one of
        // those bytes earlier (it may have read more, still in flight to the client).
        let received = count.load(Ordering::SeqCst);
        let status = relay.admin("status").await;
        let lease = lease_status(&status, &grant.hostname);
        let bw = &lease["bandwidth"];
        assert_eq!(bw["to_client_bytes_per_s"], LIMIT / 2, "{lease}");
        assert_eq!(bw["to_service_bytes_per_s"], 0, "{lease}");
        assert!(
            bw["throttled_ms"]["to_client"].as_u64().unwrap_or(0) > 0,
            "throttled time counted: {lease}"
        );
        let tenants = status["bandwidth_tenants"].as_array().expect("tenants");
        assert!(tenants.iter().any(|t| t["tenant"] == "test"), "{status}");
        assert!(relay.metric("outrelay_relay_splice_throttles_total").await > 0.0);
        // The lease's byte count (the dashboard's bytes column) has every byte the client
        // had read; at most socket buffers and a pipe more (32 MiB is far above both).
        let counted = lease["bytes"]["to_client"].as_u64().unwrap_or(0);
        assert!(
            counted >= received && counted <= received + 32 * 1024 * 1024,
            "lease bytes to_client {counted}, the client read {received}: {lease}"
        );
        reader.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_datagrams_over_the_lease_limit_are_dropped_rate_limited() {
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("udp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            // 100 kB/s: the burst (64 KiB) goes, most of 300 kB at once does not.
            tables: "[bandwidth]\nlease_to_service_bytes_per_s = 100000\n".to_owned(),
            ..Opts::default()
        },
    )
    .await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let grant = agent
        .register_with(orp::LeaseRegister {
            name: "dgram".to_owned(),
            udp: true,
            request_id: 1,
            ..orp::LeaseRegister::default()
        })
        .await;
    let port = port_of(&grant.udp_addr);
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind client");
    client
        .connect(("127.0.0.1", port))
        .await
        .expect("connect client");
    let series = "outrelay_relay_udp_drops_total{reason=\"rate_limited\"}";
    let start = Instant::now();
    // The port binds at the relay's next route sync: send until datagrams are refused.
    while relay.metric(series).await < 1.0 {
        assert!(start.elapsed() < WAIT, "no datagram was ever rate limited");
        for _ in 0..300 {
            let _ = client.send(&[7u8; 1000]).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = relay
        .metric("outrelay_relay_udp_datagrams_total{direction=\"to_agent\"}")
        .await;
    assert!(sent >= 60.0, "the burst went through: {sent}");
    let lease = lease_status(&relay.admin("status").await, &grant.hostname);
    let dropped = lease["bandwidth"]["udp_rate_limited_datagrams"]
        .as_u64()
        .unwrap_or(0);
    assert!(dropped > 0, "counted per lease: {lease}");
    assert_eq!(lease["bandwidth"]["to_service_bytes_per_s"], 100_000);
}

/// A service stream is held to the provider tenant's `to_service` limit: it waits for tokens
/// (every byte arrives, in order), and the wait is the tenant's throttled time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_stream_waits_for_its_tenants_limit() {
    const LIMIT: u64 = 2_000_000;
    const LEN: usize = 6_000_000;
    let ca = Ca::new();
    let relay = start_relay_with(
        &ca,
        Opts {
            tables: format!(
                "[bandwidth]\ntenant_to_service_bytes_per_s = {LIMIT}\n\
                 [[policy]]\ntenant = \"b\"\ncaller = \"*\"\ntarget = \"echo\"\ndecision = \"allow\"\n"
            ),
            ..Opts::default()
        },
    )
    .await;
    let uri = |n: u8| format!("outrelay://b/agent/00000000-0000-4000-8000-0000000000{n:02x}");
    let mut provider = Agent::connect_as(&relay, &ca, &uri(1)).await;
    provider.provide("echo").await;
    provider.serve_streams(true);
    let consumer = Agent::connect_as(&relay, &ca, &uri(2)).await;
    let started = Instant::now();
    let (answer, mut send, mut recv) = consumer.open_stream("echo", "", 1).await;
    assert_eq!(
        answer,
        outrelay_proto::frame::Frame::StreamAccept(orp::StreamAccept::default())
    );
    let (n, sent, got) = echo_through(&mut send, &mut recv, LEN, 7).await;
    let took = started.elapsed().as_secs_f64();
    assert_eq!((n, &got), (LEN, &sent), "every byte, in order");
    let want = LEN as f64 / LIMIT as f64;
    eprintln!("{LEN} bytes through a {LIMIT} B/s tenant limit in {took:.2} s (want {want:.2} s)");
    assert!(
        (took - want).abs() / want < 0.10,
        "{took} s for {LEN} bytes at {LIMIT} B/s"
    );
    let status = relay.admin("status").await;
    let b = status["bandwidth_tenants"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tenant"] == "b"))
        .cloned()
        .unwrap_or_else(|| panic!("tenant b in {status}"));
    assert_eq!(b["to_service_bytes_per_s"], LIMIT, "{b}");
    assert!(
        b["throttled_ms"]["to_service"].as_u64().unwrap_or(0) > 1000,
        "{b}"
    );
}

/// Starts a reader of `client` counting into the returned counter.
fn count_reads(mut client: tokio::net::TcpStream) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = client.read(&mut buf).await {
            if n == 0 {
                break;
            }
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
    });
    (count, task)
}

/// A tenant limit holds two of its leases together: their sum is at the limit (within 10 %),
/// and each gets a share of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_limit_caps_two_leases_together() {
    const LIMIT: u64 = 16_000_000;
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            tables: format!("[bandwidth]\ntenant_to_client_bytes_per_s = {LIMIT}\n"),
            ..Opts::default()
        },
    )
    .await;
    let (zeros, _z) = zeros_target().await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let mut flows = Vec::new();
    for name in ["one", "two"] {
        let grant = agent.register(name, false, true).await;
        agent.serve_lease_with(&relay, &grant, zeros, 2);
        let client = connect_lease_port(LOCAL, lease_port(&grant)).await;
        flows.push(count_reads(client));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a, b) = tokio::join!(
        rate_over(&flows[0].0, Duration::from_secs(2)),
        rate_over(&flows[1].0, Duration::from_secs(2))
    );
    let sum = a + b;
    eprintln!(
        "two leases under a {} MB/s tenant limit: {:.2} + {:.2} = {:.2} MB/s",
        LIMIT / 1_000_000,
        a / 1e6,
        b / 1e6,
        sum / 1e6
    );
    assert!(
        (sum - LIMIT as f64).abs() / (LIMIT as f64) < 0.10,
        "sum {sum} B/s, limit {LIMIT}"
    );
    assert!(
        a > 0.1 * LIMIT as f64 && b > 0.1 * LIMIT as f64,
        "each gets a share: {a} {b}"
    );
    for (_, task) in flows {
        task.abort();
    }
}
