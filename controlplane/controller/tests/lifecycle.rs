//! Issue 9, the controller's lifecycle under a `NOTIFY_SOCKET` of the test's own (systemd is
//! not PID 1 here): `READY=1` after the ready file, `WATCHDOG=1` pings, SIGHUP with an invalid
//! config refused with the reason (the running config stays), `STOPPING=1` and exit 0 on
//! SIGTERM.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outrelay_testkit::notify::NotifyListener;

const WAIT: Duration = Duration::from_secs(20);

fn scrape(addr: &str) -> String {
    let mut m = std::net::TcpStream::connect(addr).expect("metrics connect");
    m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("get");
    let mut body = String::new();
    m.read_to_string(&mut body).expect("read");
    body
}

#[test]
fn controller_notifies_and_refuses_an_invalid_reload() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("controller.toml");
    let ready = dir.path().join("ready.json");
    let log = dir.path().join("controller.log");
    let good = format!(
        "state_dir = {:?}\n[grpc]\nlisten = \"127.0.0.1:0\"\n[admin]\nsocket_path = \"\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n[lifecycle]\nshutdown_grace_ms = 2000\n",
        dir.path().join("state").display().to_string()
    );
    std::fs::write(&config, &good).expect("write config");
    let mut notify = NotifyListener::bind(dir.path(), Some(&ready));
    let mut child = Command::new(env!("CARGO_BIN_EXE_outrelay-controller"))
        .arg("--config")
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn controller");
    let r = notify.wait_for("READY=1", 1, WAIT).expect("READY=1");
    assert!(r.ready_file_existed, "READY=1 came before the ready file");
    notify
        .wait_for("WATCHDOG=1", 3, WAIT)
        .expect("3 WATCHDOG=1 pings");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).expect("ready")).expect("json");
    let metrics = info["metrics"].as_str().expect("metrics addr").to_owned();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));

    std::fs::write(
        &config,
        good.replace("[grpc]\n", "[grpc]\nhandshake_timeout_ms = 0\n"),
    )
    .expect("write bad config");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    notify
        .wait_for("RELOADING=1", 1, WAIT)
        .expect("RELOADING=1");
    notify
        .wait_for("READY=1", 2, WAIT)
        .expect("READY=1 after the reload");
    let deadline = Instant::now() + WAIT;
    while !scrape(&metrics).contains("outrelay_config_reloads_total{result=\"error\"} 1") {
        assert!(Instant::now() < deadline, "no error reload counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.contains("config reload refused"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{text}"));
    eprintln!("refusal: {line}");
    assert!(
        line.contains("ERROR") && line.contains("handshake_timeout_ms"),
        "{line}"
    );

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    notify.wait_for("STOPPING=1", 1, WAIT).expect("STOPPING=1");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
}
