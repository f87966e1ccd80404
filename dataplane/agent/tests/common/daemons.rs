//! Real daemons for the agent's end-to-end tests: a standalone `outrelay-relay` with lease
//! ports, reverse sessions and static `[[policy]]` rules, and `outrelay-agent`s from config
//! bodies, each logging to a file in the test's directory and killed when dropped.
#![allow(dead_code, reason = "each test file uses part of it")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Ca;

/// Bound on a daemon's ready file.
pub const READY_WAIT: Duration = Duration::from_secs(30);
/// The relay's identity.
pub const RELAY_URI: &str = "outrelay://dev/relay/relay-1";
/// The relay's public URL: leases live under `relay.outrelay.test`.
pub const PUBLIC_URL: &str = "https://relay.outrelay.test";

/// A child process, killed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A binary next to `outrelay-agent` in `target/release/`.
pub fn sibling_binary(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_outrelay-agent")).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p outrelay-relay -p outrelay-agent` first",
        bin.display()
    );
    bin
}

/// Spawns `cmd` with stdout and stderr written to `log`.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Proc {
    let out = std::fs::File::create(log).expect("create log");
    let err = out.try_clone().expect("clone log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    Proc(child)
}

/// Waits for a JSON ready file; panics if the process exits first or the bound passes.
pub async fn wait_for_ready(path: &Path, proc: &mut Proc, what: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            eprintln!("{what} ready after {:?}: {v}", started.elapsed());
            return v;
        }
        if let Some(status) = proc.0.try_wait().expect("poll child") {
            panic!("{what} exited before it was ready: {status}");
        }
        assert!(
            started.elapsed() < READY_WAIT,
            "{what}: no ready file within {READY_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `ip:port` named `key` in a ready file.
pub fn addr_in(info: &serde_json::Value, key: &str) -> SocketAddr {
    info[key]
        .as_str()
        .unwrap_or_else(|| panic!("ready file names {key}: {info}"))
        .parse()
        .expect("socket address")
}

/// The port of the `key` address (`tcp_addr`, `udp_addr`) of lease `name` in an agent's
/// ready file.
pub fn lease_port(ready: &serde_json::Value, name: &str, key: &str) -> u16 {
    let lease = ready["leases"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .unwrap_or_else(|| panic!("lease {name} in {ready}"));
    let addr = lease[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} of {name} in {ready}"));
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("port in {addr}"))
}

/// A free loopback TCP port (bound and released).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A standalone relay (TCP and UDP lease ports, reverse sessions, static policy `tail`) and
/// the agents started against it, all in one temp dir.
pub struct Stand {
    pub ca: Ca,
    pub relay: Proc,
    pub quic: SocketAddr,
    pub public_tls: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Stand {
    /// Starts the relay; `tail` is appended to its config (`[[policy]]` tables).
    pub async fn start(tail: &str) -> Stand {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let ca = Ca::new("outrelay agent daemons CA");
        std::fs::write(d.join("ca.pem"), &ca.pem).expect("ca.pem");
        ca.write_leaf(d, "relay", RELAY_URI, true);
        let (min, max) = outrelay_testkit::claim_port_range();
        let reverse = free_tcp_port();
        let config = format!(
            "public_url = \"{PUBLIC_URL}\"\nworkers = 1\nreverse_advertise = \"127.0.0.1:{reverse}\"\n\
             [tls]\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\nca = \"ca.pem\"\n\
             [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:{reverse}\"\n\
             public_tls = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\nlease_bind_ip = \"127.0.0.1\"\n\
             admin_socket = {admin:?}\n\
             [quic]\nidle_timeout_ms = 2000\nkeep_alive_ms = 500\n\
             [leases]\ntcp = true\nudp = true\nmin_port = {min}\nmax_port = {max}\n\
             [ingress]\nclaim_timeout_ms = 5000\nlease_sync_interval_ms = 20\n{tail}",
            admin = d.join("relay-admin.sock").display().to_string(),
        );
        let path = d.join("relay.toml");
        std::fs::write(&path, config).expect("relay config");
        let ready = d.join("relay-ready.json");
        let mut cmd = Command::new(sibling_binary("outrelay-relay"));
        cmd.args(["--log", "info", "--config"])
            .arg(&path)
            .arg("--ready-file")
            .arg(&ready);
        let mut relay = spawn_logged(cmd, &d.join("relay.log"));
        let info = wait_for_ready(&ready, &mut relay, "relay").await;
        Stand {
            ca,
            relay,
            quic: addr_in(&info, "quic"),
            public_tls: addr_in(&info, "public_tls"),
            dir,
        }
    }

    /// The temp dir (configs, logs, certificates).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `outrelay-agent run` for identity `uri` with config `body` (`[[lease]]`,
    /// `[[provide]]`, `[[consume]]` tables) and waits for its ready file.
    pub async fn agent(&self, name: &str, uri: &str, body: &str) -> (Proc, serde_json::Value) {
        let d = self.path();
        let (cert, key) = self.ca.write_leaf(d, name, uri, false);
        let config = format!(
            "relays = [\"{quic}\"]\nserver_name = \"localhost\"\n\
             [identity]\ncert = {cert:?}\nkey = {key:?}\nca = {ca:?}\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [connection]\nkeepalive_ms = 500\nidle_timeout_ms = 3000\nping_interval_ms = 1000\n\
             reconnect_initial_ms = 200\nreconnect_max_ms = 1000\n{body}\n",
            quic = self.quic,
            cert = cert.display().to_string(),
            key = key.display().to_string(),
            ca = d.join("ca.pem").display().to_string(),
        );
        let path = d.join(format!("{name}.toml"));
        std::fs::write(&path, config).expect("agent config");
        let ready = d.join(format!("{name}-ready.json"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outrelay-agent"));
        cmd.args(["--log", "info", "run", "--config"])
            .arg(&path)
            .arg("--ready-file")
            .arg(&ready);
        let mut proc = spawn_logged(cmd, &d.join(format!("{name}.log")));
        let info = wait_for_ready(&ready, &mut proc, name).await;
        (proc, info)
    }

    /// The last `lines` lines of `name`.log (for failure messages).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.path().join(format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
