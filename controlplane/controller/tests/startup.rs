//! Start-up contract: invalid config exits 64 with one line; `--check-config`; the ready file
//! and the Prometheus endpoint.

mod common;

use std::io::{Read, Write};
use std::process::Command;

use common::Controller;

#[test]
fn invalid_config_exits_64_with_one_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[grpc]\nlisten = \"not an address\"\n").expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_outrelay-controller"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("grpc.listen"), "{err}");

    std::fs::write(&cfg, "[registry]\nunknown_knob = 1\n").expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_outrelay-controller"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown_knob"));

    std::fs::write(&cfg, "[grpc]\nlisten = \"127.0.0.1:0\"\n").expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_outrelay-controller"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .expect("run");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn metrics_endpoint_serves_controller_metrics() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    // Produce at least one counter: a TLS handshake that fails.
    let mut s = std::net::TcpStream::connect(c.grpc).expect("connect");
    s.write_all(b"this is not TLS\r\n\r\n").expect("write");
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let addr = c.metrics.clone().expect("metrics address in ready file");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut m = std::net::TcpStream::connect(&addr).expect("metrics connect");
        m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("get");
        let mut body = String::new();
        m.read_to_string(&mut body).expect("read");
        assert!(body.starts_with("HTTP/1.0 200"), "{body}");
        if body.contains("outrelay_controller_tls_handshake_failures_total") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metric never appeared: {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
