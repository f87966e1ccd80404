//! The relay's own identity against the REAL binaries (review M10): `outrelay-relay enroll`
//! with a relay token from the real `outrelay-controller`, an agent that verifies the relay BY
//! NAME, and a renewal that swaps the certificate while a transfer runs through the relay.
//!
//! Build first: `cargo build --release -p outrelay-relay -p outrelay-controller`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use outrelay_api::pb::{self, pki_client::PkiClient};
use outrelay_proto::frame::ORP_ALPN;
use outrelay_proto::orp;
use rcgen::ExtendedKeyUsagePurpose;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A relay token from the controller (what `outrelay token create --role relay --region test
/// --relay-id r1` sends).
async fn relay_token(controller: &ControllerProc, ca: &Ca) -> String {
    PkiClient::new(controller.admin(ca).await)
        .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
            role: pb::EnrollRole::Relay as i32,
            relay_region: "test".into(),
            relay_id: "r1".into(),
            ..Default::default()
        })
        .await
        .expect("relay token")
        .into_inner()
        .token
}

/// `outrelay-relay enroll` into `<dir>/identity`, the names from `--config` (the root host) and
/// `--name`/`--ip`; then `relay.toml` is switched to `[tls] state_dir` with `[controller]`.
fn enroll(dir: &Path, controller: &ControllerProc, token: &str) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outrelay-relay"))
        .arg("enroll")
        .args(["--controller", &format!("https://{}", controller.grpc)])
        .args(["--token", token])
        .arg("--state-dir")
        .arg(dir.join("identity"))
        .arg("--config")
        .arg(dir.join("relay.toml"))
        .args(["--name", "localhost", "--ip", "127.0.0.1"])
        .output()
        .expect("run outrelay-relay enroll");
    let config = std::fs::read_to_string(dir.join("relay.toml")).expect("relay.toml");
    let config = config.replace(
        "[tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n",
        "[tls]\nstate_dir = \"identity\"\n",
    );
    std::fs::write(
        dir.join("relay.toml"),
        format!(
            "{config}\n[controller]\nurl = \"https://{}\"\nstate_dir = \"controller-state\"\n",
            controller.grpc
        ),
    )
    .expect("relay.toml");
    out
}

/// A QUIC handshake as an agent that verifies the relay's certificate under `ca` for
/// `server_name` (webpki: chain and name, as the agent's `RelayCertVerifier` does). Returns
/// the connection and the leaf the relay presented.
async fn dial_by_name(
    quic: SocketAddr,
    ca: &Ca,
    server_name: &str,
) -> Result<(quinn::Endpoint, quinn::Connection, CertificateDer<'static>), String> {
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
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = tokio::time::timeout(
        WAIT,
        endpoint
            .connect(quic, server_name)
            .expect("connect")
            .into_future(),
    )
    .await
    .map_err(|_| "no handshake in time".to_owned())?
    .map_err(|e| e.to_string())?;
    let certs = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("no peer certificate")?;
    let leaf = certs.first().cloned().ok_or("empty chain")?;
    Ok((endpoint, conn, leaf))
}

fn serial(der: &[u8]) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("relay leaf parses");
    hex(c.raw_serial())
}

fn dns_names(der: &[u8]) -> Vec<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("relay leaf parses");
    let mut out = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => out.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    out.push(format!("ip:{}", hex(ip)));
                }
                _ => {}
            }
        }
    }
    out
}

/// Review M10: a relay enrolled from a relay token serves an agent that verifies it by the
/// relay's DNS name (before: the leaf had no DNS SAN, `CertNotValidForName`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_relay_is_verified_by_its_dns_name() {
    let ca = Ca::new();
    let Some(controller) = start_controller(&ca).await else {
        eprintln!("SKIP: build outrelay-controller first");
        return;
    };
    let token = relay_token(&controller, &ca).await;
    let opts = Opts::default();
    let dir = relay_dir(&ca, &opts);
    let out = enroll(dir.path(), &controller, &token);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "enroll: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout}");
    assert!(stdout.contains(RELAY), "{stdout}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("identity/key.pem"))
            .expect("key.pem")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key.pem mode {mode:o}");
        assert!(
            !dir.path().join("identity/.enroll-key.pem").exists(),
            "pending key removed"
        );
    }
    // The same token again (another key): refused, nothing overwritten.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_outrelay-relay"))
        .arg("enroll")
        .args(["--controller", &format!("https://{}", controller.grpc)])
        .args(["--token", &token])
        .arg("--state-dir")
        .arg(dir.path().join("other"))
        .output()
        .expect("run enroll");
    assert_eq!(again.status.code(), Some(1), "a spent token is refused");
    // A malformed token is a usage error.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_outrelay-relay"))
        .args([
            "enroll",
            "--controller",
            "https://127.0.0.1:1",
            "--token",
            "x",
        ])
        .output()
        .expect("run enroll");
    assert_eq!(bad.status.code(), Some(64));

    let relay = spawn_relay(dir, opts).await;
    let (_e, conn, leaf) = dial_by_name(relay.quic, &ca, ROOT_HOST)
        .await
        .expect("an agent verifying the relay as relay.outrelay.test connects");
    let names = dns_names(leaf.as_ref());
    assert!(
        names.iter().any(|n| n == ROOT_HOST) && names.iter().any(|n| n == "localhost"),
        "{names:?}"
    );
    conn.close(0u32.into(), b"done");
    // A name the relay did not enroll with is still refused.
    let other = dial_by_name(relay.quic, &ca, "other.outrelay.test").await;
    assert!(other.is_err(), "a name not in the leaf is refused");
    // The relay is a full member: an agent gets HELLO_ACK through it.
    let _agent = Agent::connect(&relay, &ca).await;
}

/// A renewal (the relay's own loop, at 70 % of a short leaf's life) swaps the certificate while
/// a transfer runs through a TCP lease: the bytes arrive intact both ways, the serving agent's
/// QUIC connection is untouched, and a new agent connection sees the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewal_swaps_the_certificate_under_a_running_transfer() {
    let ca = Ca::new();
    // 133 s leaves backdated 300 s: 70 % of the life is ~3 s after each issue.
    let Some(controller) = start_controller_with(
        &ca,
        "[pki]\nleaf_lifetime_s = 133\nrenew_burst = 100\nrenew_refill_ms = 100\n",
    )
    .await
    else {
        eprintln!("SKIP: build outrelay-controller first");
        return;
    };
    let token = relay_token(&controller, &ca).await;
    let (lo, hi) = free_port_range();
    let opts = Opts {
        leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
        ..Opts::default()
    };
    let dir = relay_dir(&ca, &opts);
    let out = enroll(dir.path(), &controller, &token);
    assert!(
        out.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let relay = spawn_relay(dir, opts).await;
    let (_e0, c0, leaf0) = dial_by_name(relay.quic, &ca, ROOT_HOST)
        .await
        .expect("first handshake");
    c0.close(0u32.into(), b"done");
    let first = serial(leaf0.as_ref());

    let (target, echo) = echo_target().await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let grant = agent
        .register_with(orp::LeaseRegister {
            name: "bulk".to_owned(),
            tcp: true,
            ttl_s: 300,
            request_id: 1,
            ..orp::LeaseRegister::default()
        })
        .await;
    agent.serve_lease(&relay, &grant, target);
    let port = lease_port(&grant);

    // First half of the transfer, then wait for the swap, then the second half.
    const HALF_BYTES: usize = 4 << 20;
    let data: Vec<u8> = (0..2 * HALF_BYTES)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    let sent_hash = Sha256::digest(&data).to_vec();
    let started = Instant::now();
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => break s,
            Err(_) if started.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("lease port {port}: {e}"),
        }
    };
    let (mut r, mut w) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.map(|_| back)
    });
    w.write_all(&data[..HALF_BYTES]).await.expect("first half");
    let swapped_at = Instant::now();
    let renewed = loop {
        let (_e, c, leaf) = dial_by_name(relay.quic, &ca, ROOT_HOST)
            .await
            .expect("handshake during renewals");
        c.close(0u32.into(), b"done");
        let s = serial(leaf.as_ref());
        if s != first {
            assert!(
                dns_names(leaf.as_ref()).iter().any(|n| n == ROOT_HOST),
                "the renewed leaf keeps the relay's names"
            );
            break s;
        }
        assert!(
            swapped_at.elapsed() < WAIT,
            "the certificate was never renewed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "certificate {first} -> {renewed} after {:?}",
        swapped_at.elapsed()
    );
    w.write_all(&data[HALF_BYTES..]).await.expect("second half");
    w.shutdown().await.expect("half-close");
    let back = tokio::time::timeout(WAIT, reader)
        .await
        .expect("echo in time")
        .expect("reader task")
        .expect("read echo");
    assert_eq!(back.len(), data.len() + 32, "echo and trailer");
    let (echoed, trailer) = back.split_at(data.len());
    assert_eq!(
        Sha256::digest(echoed).to_vec(),
        sent_hash,
        "echo hash (client end)"
    );
    assert_eq!(trailer, sent_hash.as_slice(), "hash at the target end");
    let (n, target_hash) = echo.await.expect("echo target");
    assert_eq!(usize::try_from(n).expect("fits"), data.len());
    assert_eq!(target_hash, sent_hash);
    assert!(
        agent.conn.close_reason().is_none(),
        "the agent's established QUIC connection is untouched: {:?}",
        agent.conn.close_reason()
    );
    assert!(
        relay
            .metric("outrelay_relay_cert_renewals_total{result=\"ok\"}")
            .await
            >= 1.0
    );
    assert!(
        relay
            .metric("outrelay_relay_cert_expiry_unix_seconds")
            .await
            > 0.0
    );
}

/// The serial of the certificate the relay's root host (`[public_tls]`) presents.
async fn root_serial(relay: &Relay, ca: &Ca) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.clone()).expect("CA root");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(relay.public_tls)
        .await
        .expect("public TLS");
    let name = rustls::pki_types::ServerName::try_from(ROOT_HOST).expect("name");
    let s = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .expect("root host handshake in time")
    .expect("root host handshake");
    let leaf = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("root host certificate");
    serial(leaf.as_ref())
}

fn sighup(relay: &Relay) {
    let pid = i32::try_from(relay.child.id()).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
}

/// Writes `leaf` over `<name>.pem` / `<name>-key.pem` in `dir`, each by rename.
fn replace_files(dir: &Path, name: &str, leaf: &Leaf) {
    for (file, text) in [
        (format!("{name}.pem"), &leaf.cert_pem),
        (format!("{name}-key.pem"), &leaf.key_pem),
    ] {
        let tmp = dir.join(format!("{file}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, dir.join(file)).expect("rename");
    }
}

/// The operator's path: certificate files replaced by hand, then SIGHUP (`systemctl reload`).
/// New agent handshakes and the root host get the new certificates, an established agent
/// connection is untouched, and a certificate naming another relay is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_replaced_certificate_files() {
    let ca = Ca::new();
    let relay = start_relay(&ca, "", None).await;
    let agent = Agent::connect(&relay, &ca).await;
    let (_e, c, leaf) = dial_by_name(relay.quic, &ca, "localhost")
        .await
        .expect("first handshake");
    c.close(0u32.into(), b"done");
    let first = serial(leaf.as_ref());
    let root_first = root_serial(&relay, &ca).await;

    let eku = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    replace_files(
        relay.dir.path(),
        "relay",
        &ca.leaf("relay r1", &["localhost"], Some(RELAY), eku.clone()),
    );
    replace_files(
        relay.dir.path(),
        "root",
        &ca.leaf(
            ROOT_HOST,
            &[ROOT_HOST],
            None,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        ),
    );
    sighup(&relay);
    let started = Instant::now();
    let second = loop {
        let (_e, c, leaf) = dial_by_name(relay.quic, &ca, "localhost")
            .await
            .expect("handshake after SIGHUP");
        c.close(0u32.into(), b"done");
        let s = serial(leaf.as_ref());
        if s != first {
            break s;
        }
        assert!(
            started.elapsed() < WAIT,
            "SIGHUP never swapped the certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(
        root_serial(&relay, &ca).await,
        root_first,
        "root host reloaded"
    );
    assert!(
        agent.conn.close_reason().is_none(),
        "established agent connection untouched"
    );

    // Another relay's certificate: refused, the current one stays.
    replace_files(
        relay.dir.path(),
        "relay",
        &ca.leaf(
            "relay r2",
            &["localhost"],
            Some("outrelay://test/relay/r2"),
            eku,
        ),
    );
    sighup(&relay);
    let started = Instant::now();
    while relay
        .metric("outrelay_relay_cert_reloads_total{result=\"refused\"}")
        .await
        < 1.0
    {
        assert!(started.elapsed() < WAIT, "the reload was never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_e, c, leaf) = dial_by_name(relay.quic, &ca, "localhost")
        .await
        .expect("handshake after a refused reload");
    c.close(0u32.into(), b"done");
    assert_eq!(
        serial(leaf.as_ref()),
        second,
        "another identity is not swapped in"
    );
    assert_eq!(
        relay.metric("outrelay_relay_cert_swaps_total").await,
        1.0,
        "one swap"
    );
}
