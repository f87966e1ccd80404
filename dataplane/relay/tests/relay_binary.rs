//! The `outrelay-relay` binary as a process: config validation (exit 64, one line), start-up
//! with a ready file, refusing plain HTTP on the public TLS port, and a clean SIGTERM.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outrelay-relay"))
}

/// A CA and a relay certificate (URI SAN `outrelay://test/relay/r1`) in `dir`.
fn write_pki(dir: &Path) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write ca");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("relay key");
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(
        "outrelay://test/relay/r1".try_into().expect("uri"),
    )];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = leaf.signed_by(&key, &issuer).expect("relay cert");
    std::fs::write(dir.join("relay.pem"), cert.pem()).expect("write cert");
    std::fs::write(dir.join("relay-key.pem"), key.serialize_pem()).expect("write key");
}

fn config(extra: &str) -> String {
    format!(
        "public_url = \"https://relay.outrelay.test\"\nworkers = 1\n\
         [tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n\
         [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n{extra}"
    )
}

struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every `[resume]` key at a bound is accepted (the refusals below are not a blanket refusal).
#[test]
fn resume_keys_at_their_bounds_are_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_pki(dir.path());
    for table in [
        "[resume]\nenabled = false\npark_timeout_ms = 300000\nmax_parked = 1\nmax_parked_per_agent = 1\n",
        "[resume]\nenabled = true\npark_timeout_ms = 1\n",
    ] {
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, format!("{}{table}", config(""))).expect("write config");
        let out = Command::new(binary())
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .expect("run relay");
        assert!(
            out.status.success(),
            "{table}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn invalid_config_exits_64_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_pki(dir.path());
    let cases = [
        ("public_url = \"\"\n", "public_url"),
        (
            "[ingress]\nclaim_timeout_ms = 5\n",
            "ingress.claim_timeout_ms",
        ),
        (
            "[leases]\ntcp = true\nmin_port = 40000\nmax_port = 40100\n",
            "leases.min_port/max_port",
        ),
        ("bogus_key = 1\n", "bogus_key"),
        ("[ingress]\nlease_conn_max = 0\n", "ingress.lease_conn_max"),
        (
            "[ingress]\npending_conn_max = 0\n",
            "ingress.pending_conn_max",
        ),
        (
            "[ingress]\npending_per_source_max = 0\n",
            "ingress.pending_per_source_max",
        ),
        (
            "[ingress]\ntenant_conn_max = 0\n",
            "ingress.tenant_conn_max",
        ),
        (
            "[ingress]\nreverse_unauth_per_lease_max = 0\n",
            "ingress.reverse_unauth_per_lease_max",
        ),
        ("[ingress]\nfd_reserve = 10\n", "ingress.fd_reserve"),
        (
            "[ingress]\nroot_conn_max_ms = 60000\n",
            "ingress.root_conn_max_ms",
        ),
        (
            "[udp]\nflow_per_source_max = 0\n",
            "udp.flow_per_source_max",
        ),
        ("[udp]\nflow_evict_idle_ms = 5\n", "udp.flow_evict_idle_ms"),
        ("[public_tls]\ncert = \"relay.pem\"\n", "public_tls"),
        (
            "[public_tls]\ncert = \"relay.pem\"\nkey = \"missing.pem\"\n",
            "public_tls",
        ),
        (
            "[splice]\nstall_timeout_ms = 50\n",
            "splice.stall_timeout_ms",
        ),
        (
            "[splice]\nstall_timeout_ms = 30000\nwrite_stall_timeout_ms = 30000\n",
            "splice.stall_timeout_ms",
        ),
        (
            "[splice]\ncopy_buffer_bytes = 10\n",
            "splice.copy_buffer_bytes",
        ),
        ("[splice]\nidle_timeout_ms = 0\n", "splice.idle_timeout_ms"),
        ("[resume]\npark_timeout_ms = 0\n", "resume.park_timeout_ms"),
        (
            "[resume]\npark_timeout_ms = 300001\n",
            "resume.park_timeout_ms",
        ),
        ("[resume]\nmax_parked = 0\n", "resume.max_parked"),
        (
            "[resume]\nmax_parked_per_agent = 0\n",
            "resume.max_parked_per_agent",
        ),
        ("[resume]\nenable = true\n", "enable"),
    ];
    for (bad, key) in cases {
        let text = if bad.starts_with("public_url") {
            config("").replace("public_url = \"https://relay.outrelay.test\"\n", bad)
        } else if bad.starts_with('[') {
            format!("{}{bad}", config(""))
        } else {
            format!("{bad}{}", config(""))
        };
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).expect("write config");
        let out = Command::new(binary())
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .expect("run relay");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{key}: one line: {stderr}"
        );
        assert!(stderr.contains(key), "{key} named: {stderr}");
    }
}

#[test]
fn starts_reports_its_addresses_refuses_plain_http_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_pki(dir.path());
    let path = dir.path().join("relay.toml");
    let admin = dir.path().join("relay.sock");
    // Plain keys after the config's last table land in [listen].
    let extra = format!("admin_socket = \"{}\"\n", admin.display());
    std::fs::write(&path, config(&extra)).expect("write config");
    let ready = dir.path().join("ready.json");
    for backend in io_backends() {
        let _ = std::fs::remove_file(&ready);
        let started = Instant::now();
        let relay = Relay(
            Command::new(binary())
                .arg("--config")
                .arg(&path)
                .arg("--ready-file")
                .arg(&ready)
                .arg("--io-backend")
                .arg(backend)
                .stderr(Stdio::null())
                .spawn()
                .expect("start relay"),
        );
        while !ready.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{backend}: no ready file"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{backend}: ready after {:?}", started.elapsed());
        let info: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&ready).expect("ready file"))
                .expect("json");
        assert_eq!(info["io_backend"], backend);
        let public: std::net::SocketAddr = info["public_tls"]
            .as_str()
            .expect("addr")
            .parse()
            .expect("addr");
        assert_ne!(public.port(), 0);

        let mut c = TcpStream::connect(public).expect("connect");
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut buf = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        assert_eq!(
            c.read_to_end(&mut buf).expect("closed, not reset"),
            0,
            "no bytes for plain HTTP"
        );

        // The refusal shows on /metrics under its reason.
        let metrics = info["metrics"]
            .as_str()
            .expect("metrics address")
            .to_owned();
        let started = Instant::now();
        loop {
            let body = scrape(&metrics);
            if body.contains("outrelay_relay_ingress_drops_total{reason=\"plain_http\"} 1") {
                let info_line =
                    format!("outrelay_relay_io_backend_info{{backend=\"{backend}\"}} 1");
                assert!(body.contains(&info_line), "{body}");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{backend}: plain_http not counted:\n{body}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        // The admin socket reports the same refusal, and the io backend.
        let status = admin_status(&admin);
        assert_eq!(status["io_backend"], backend, "{status}");
        assert_eq!(status["drops"]["plain_http"], 1, "{status}");
        assert_eq!(status["leases"], serde_json::json!([]), "{status}");

        let mut relay = relay;
        let pid = relay.0.id();
        let stop = Instant::now();
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("kill");
        loop {
            if let Some(status) = relay.0.try_wait().expect("wait") {
                assert!(status.success(), "{backend}: exit status {status}");
                break;
            }
            assert!(
                stop.elapsed() < Duration::from_secs(30),
                "{backend}: did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{backend}: stopped {:?} after SIGTERM", stop.elapsed());
    }
}

/// GET /metrics with a plain HTTP/1.1 request.
fn scrape(addr: &str) -> String {
    let mut c = TcpStream::connect(addr).expect("connect metrics");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    c.read_to_string(&mut body).expect("response");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// `status` on the relay's admin socket.
fn admin_status(path: &Path) -> serde_json::Value {
    let mut c = std::os::unix::net::UnixStream::connect(path).expect("connect admin socket");
    c.write_all(b"status\n").expect("command");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("answer");
    serde_json::from_str(answer.trim()).expect("JSON status")
}

/// The io backends this machine can run; io_uring is skipped LOUDLY where the kernel refuses it.
fn io_backends() -> Vec<&'static str> {
    let mut backends = vec!["epoll"];
    if outrelay_io::Backend::probe() == outrelay_io::Backend::Uring {
        backends.push("io_uring");
    } else {
        eprintln!("SKIP io_uring backend: this kernel or sandbox refuses io_uring_setup");
    }
    backends
}
