//! PROXY protocol to local services end to end (issue 21): the REAL `outrelay-relay` and
//! `outrelay-agent` binaries (the shared `common::daemons` stand), real peers behind them
//! (nginx with `listen ... proxy_protocol`, HAProxy with `accept-proxy`), and real public
//! clients that bind a chosen source port (`curl --local-port`), so the only way the service can
//! name that port is the header the agent wrote from the relay's client address block.
//!
//! Build first: `cargo build --release -p outrelay-relay -p outrelay-agent`. nginx, HAProxy and
//! curl are probed; a missing one skips its test LOUDLY (`scripts/test-all` installs them).

mod common;

use common::daemons::{Proc, Stand, free_tcp_port, lease_port, spawn_logged};
use common::world::poll;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rcgen::ExtendedKeyUsagePurpose;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AGENT: &str = "outrelay://acme/agent/00000000-0000-4000-8000-00000000b001";
const PROVIDER: &str = "outrelay://acme/agent/00000000-0000-4000-8000-00000000b002";
const CONSUMER: &str = "outrelay://acme/agent/00000000-0000-4000-8000-00000000b003";
const DEMO_HOST: &str = "demo.relay.outrelay.test";
/// Bound on the first request through a fresh lease (retried until it answers).
const FIRST_BOUND: Duration = Duration::from_secs(20);

fn have(bin: &str, arg: &str) -> bool {
    Command::new(bin)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `curl` from source port `local_port`, retried (a fresh port) until it succeeds or the bound
/// passes; the body and the source port that got it.
async fn curl_from_port(args: &[String]) -> (String, u16) {
    let started = Instant::now();
    loop {
        let port = free_tcp_port();
        let argv = args.to_vec();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("curl")
                .args(["-sS", "--max-time", "5", "--local-port"])
                .arg(port.to_string())
                .args(&argv)
                .output()
        })
        .await
        .expect("join")
        .expect("run curl");
        if out.status.success() {
            return (String::from_utf8_lossy(&out.stdout).into_owned(), port);
        }
        assert!(
            started.elapsed() < FIRST_BOUND,
            "curl {args:?} never succeeded: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// nginx as a child in `dir` (its own prefix, pid file, error log, `daemon off`).
fn start_nginx(dir: &Path, http: &str) -> Proc {
    let conf = dir.join("nginx.conf");
    std::fs::create_dir_all(dir.join("logs")).expect("nginx logs dir");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {pid};\nerror_log {err} info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
               fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
               log_format pp 'pp $proxy_protocol_addr:$proxy_protocol_port $server_port';\n{http}\n}}\n",
            pid = dir.join("nginx.pid").display(),
            err = dir.join("logs/error.log").display(),
            d = dir.display(),
        ),
    )
    .expect("nginx.conf");
    std::fs::create_dir_all(dir.join("tmp")).expect("nginx tmp");
    let mut cmd = Command::new("/usr/sbin/nginx");
    cmd.arg("-p").arg(dir).arg("-c").arg(&conf);
    spawn_logged(cmd, &dir.join("nginx.out"))
}

async fn wait_listening(addr: SocketAddr, what: &str) {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < FIRST_BOUND,
            "{what} never listened on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// nginx behind a TCP lease (v1) and a TLS passthrough lease (v2) logs the public client's
/// address and the source port curl bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_behind_tcp_and_tls_passthrough_leases_logs_the_public_clients_port() {
    if !Path::new("/usr/sbin/nginx").exists() || !have("curl", "--version") {
        eprintln!("SKIP: nginx (/usr/sbin/nginx) or curl missing (scripts/test-all installs them)");
        return;
    }
    let stand = Stand::start("").await;
    let d = stand.path();
    let leaf = stand.ca.leaf(
        DEMO_HOST,
        &[DEMO_HOST],
        None,
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    );
    std::fs::write(d.join("demo.pem"), &leaf.cert_pem).expect("cert");
    std::fs::write(d.join("demo-key.pem"), &leaf.key_pem).expect("key");
    let (tcp_port, tls_port) = (free_tcp_port(), free_tcp_port());
    let nginx_dir = d.join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let log = nginx_dir.join("logs/access.log");
    let _nginx = start_nginx(
        &nginx_dir,
        &format!(
            "  server {{\n    listen 127.0.0.1:{tcp_port} proxy_protocol;\n    access_log {log} pp;\n\
                 location / {{ return 200 \"tcp $proxy_protocol_addr:$proxy_protocol_port\\n\"; }}\n  }}\n\
               server {{\n    listen 127.0.0.1:{tls_port} ssl proxy_protocol;\n    access_log {log} pp;\n\
                 ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
                 location / {{ return 200 \"tls $proxy_protocol_addr:$proxy_protocol_port\\n\"; }}\n  }}\n",
            log = log.display(),
            cert = d.join("demo.pem").display(),
            key = d.join("demo-key.pem").display(),
        ),
    );
    wait_listening(([127, 0, 0, 1], tcp_port).into(), "nginx").await;
    let (_agent, ready) = stand
        .agent(
            "agent",
            AGENT,
            &format!(
                "[[lease]]\nname = \"plain\"\ntcp_to = \"127.0.0.1:{tcp_port}\"\nproxy_protocol = \"v1\"\n\
                 [[lease]]\nname = \"demo\"\ntls_to = \"127.0.0.1:{tls_port}\"\nproxy_protocol = \"v2\"\n"
            ),
        )
        .await;
    let public_tcp = lease_port(&ready, "plain", "tcp_addr");

    let (body, port) = curl_from_port(&[format!("http://127.0.0.1:{public_tcp}/")]).await;
    assert_eq!(
        body.trim(),
        format!("tcp 127.0.0.1:{port}"),
        "TCP lease, v1"
    );
    let tls = stand.public_tls.port();
    let (body, port_tls) = curl_from_port(&[
        "--cacert".into(),
        d.join("ca.pem").display().to_string(),
        "--resolve".into(),
        format!("{DEMO_HOST}:{tls}:127.0.0.1"),
        format!("https://{DEMO_HOST}:{tls}/"),
    ])
    .await;
    assert_eq!(
        body.trim(),
        format!("tls 127.0.0.1:{port_tls}"),
        "TLS passthrough, v2"
    );

    // nginx writes an access line in its log phase, which may come after curl has read the
    // response: wait (bounded) for both lines.
    let lines = [(port, tcp_port), (port_tls, tls_port)]
        .map(|(port, server)| format!("pp 127.0.0.1:{port} {server}"));
    let has_all = || {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        lines.iter().all(|want| logged.lines().any(|l| l == want))
    };
    poll(Duration::from_secs(5), has_all).await;
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("nginx access log:\n{logged}");
    for line in &lines {
        assert!(
            logged.lines().any(|l| l == line),
            "nginx logged {line:?}; relay log:\n{}\nagent log:\n{}",
            stand.log_tail("relay", 20),
            stand.log_tail("agent", 20)
        );
    }
}

/// HAProxy (`bind ... accept-proxy`) behind a TCP lease with v2 answers with the client's
/// source address and port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_accepts_v2_through_a_tcp_lease() {
    if !Path::new("/usr/sbin/haproxy").exists() || !have("curl", "--version") {
        eprintln!(
            "SKIP: haproxy (/usr/sbin/haproxy) or curl missing (scripts/test-all installs them)"
        );
        return;
    }
    let stand = Stand::start("").await;
    let d = stand.path();
    let port = free_tcp_port();
    let cfg = d.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  pidfile {pid}\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 5s\n  timeout server 5s\n\
             frontend fe\n  bind 127.0.0.1:{port} accept-proxy\n\
               http-request return status 200 content-type text/plain lf-string \"haproxy %[src]:%[src_port]\\n\"\n",
            pid = d.join("haproxy.pid").display(),
        ),
    )
    .expect("haproxy.cfg");
    let mut cmd = Command::new("/usr/sbin/haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let _haproxy = spawn_logged(cmd, &d.join("haproxy.log"));
    wait_listening(([127, 0, 0, 1], port).into(), "haproxy").await;
    let (_agent, ready) = stand
        .agent(
            "agent",
            AGENT,
            &format!("[[lease]]\nname = \"hap\"\ntcp_to = \"127.0.0.1:{port}\"\nproxy_protocol = \"v2\"\n"),
        )
        .await;
    let public_tcp = lease_port(&ready, "hap", "tcp_addr");
    let (body, local) = curl_from_port(&[format!("http://127.0.0.1:{public_tcp}/")]).await;
    assert_eq!(
        body.trim(),
        format!("haproxy 127.0.0.1:{local}"),
        "haproxy log:\n{}",
        stand.log_tail("haproxy", 20)
    );
}

/// A UDP lease with v2: the local service gets a DGRAM header naming the client before each
/// payload; replies go back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_service_gets_a_v2_dgram_header_before_each_datagram() {
    let stand = Stand::start("").await;
    let service = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("service");
    let service_addr = service.local_addr().expect("addr");
    let (_agent, ready) = stand
        .agent(
            "agent",
            AGENT,
            &format!(
                "[[lease]]\nname = \"dns\"\nudp_to = \"{service_addr}\"\nproxy_protocol = \"v2\"\n"
            ),
        )
        .await;
    let public: SocketAddr = ([127, 0, 0, 1], lease_port(&ready, "dns", "udp_addr")).into();
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("client");
    let client_addr = client.local_addr().expect("addr");
    let mut buf = vec![0u8; 2048];
    let started = Instant::now();
    let mut got = Vec::new();
    // UDP may be lost while the lease settles: resend until two datagrams arrived.
    while got.len() < 2 {
        assert!(
            started.elapsed() < FIRST_BOUND,
            "no datagram reached the service"
        );
        let payload = format!("ping {}", got.len());
        client
            .send_to(payload.as_bytes(), public)
            .await
            .expect("send");
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(300), service.recv_from(&mut buf)).await
        {
            got.push((buf[..n].to_vec(), from, payload));
        }
    }
    for (datagram, from, payload) in &got {
        let header = ppp::v2::Header::try_from(&datagram[..]).expect("a v2 header first");
        assert_eq!(header.command, ppp::v2::Command::Proxy);
        assert_eq!(header.protocol, ppp::v2::Protocol::Datagram);
        match header.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                assert_eq!(
                    SocketAddr::from((a.source_address, a.source_port)),
                    client_addr
                );
                assert_eq!(a.destination_port, public.port());
            }
            other => panic!("IPv4 addresses expected, got {other:?}"),
        }
        assert_eq!(
            &datagram[header.len()..],
            payload.as_bytes(),
            "the payload follows"
        );
        service.send_to(b"pong", from).await.expect("reply");
    }
    let (n, _) = tokio::time::timeout(FIRST_BOUND, client.recv_from(&mut buf))
        .await
        .expect("a reply in time")
        .expect("recv");
    assert_eq!(&buf[..n], b"pong", "replies carry no header");
}

/// A service stream's provider with `proxy_protocol = "v2"`: the local target reads a v2
/// header (with `ppp`) carrying the consumer's identity URI as TLV 0xE0 and the service as
/// the authority TLV, then the consumer's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_provider_reads_the_consumer_uri_tlv() {
    let stand = Stand::start(
        "[[policy]]\ntenant = \"acme\"\ncaller = \"*\"\ntarget = \"db\"\ndecision = \"allow\"\n",
    )
    .await;
    let target = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("target");
    let target_addr = target.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (mut s, _) = target.accept().await.expect("accept");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        // The header and then "hello": read until both are here.
        loop {
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before the header and bytes");
            buf.extend_from_slice(&chunk[..n]);
            if let Ok(h) = ppp::v2::Header::try_from(&buf[..])
                && buf.len() >= h.len() + 5
            {
                break;
            }
        }
        let h = ppp::v2::Header::try_from(&buf[..]).expect("v2 header");
        assert_eq!(h.command, ppp::v2::Command::Local);
        let tlvs: Vec<(u8, Vec<u8>)> = h
            .tlvs()
            .map(|t| t.expect("tlv"))
            .map(|t| (t.kind, t.value.to_vec()))
            .collect();
        let rest = buf[h.len()..].to_vec();
        s.write_all(b"ok").await.expect("answer");
        (tlvs, rest)
    });
    let (_provider, _) = stand
        .agent(
            "provider",
            PROVIDER,
            &format!(
                "[[provide]]\nservice = \"db\"\nto = \"{target_addr}\"\nproxy_protocol = \"v2\"\n"
            ),
        )
        .await;
    let (_consumer, info) = stand
        .agent(
            "consumer",
            CONSUMER,
            "[[consume]]\nservice = \"db\"\nlisten = \"127.0.0.1:0\"\n",
        )
        .await;
    let listen: SocketAddr = info["consumers"][0]["listen_addr"]
        .as_str()
        .unwrap_or_else(|| panic!("consumer listen_addr in {info}"))
        .parse()
        .expect("addr");
    let started = Instant::now();
    let mut answer = [0u8; 2];
    loop {
        assert!(
            started.elapsed() < FIRST_BOUND,
            "no answer through the consumer; provider log:\n{}",
            stand.log_tail("provider", 20)
        );
        let Ok(mut c) = tokio::net::TcpStream::connect(listen).await else {
            continue;
        };
        c.write_all(b"hello").await.expect("write");
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut answer)).await
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(&answer, b"ok");
    let (tlvs, rest) = tokio::time::timeout(FIRST_BOUND, server)
        .await
        .expect("the target finished")
        .expect("target assertions");
    assert_eq!(rest, b"hello", "the consumer's bytes follow the header");
    assert!(
        tlvs.contains(&(0xE0, CONSUMER.as_bytes().to_vec())),
        "TLV 0xE0 names the consumer: {tlvs:?}"
    );
    assert!(
        tlvs.contains(&(0x02, b"db".to_vec())),
        "authority TLV: {tlvs:?}"
    );
}
