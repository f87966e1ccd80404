//! The service-mesh world the agent's end-to-end tests share (`mod common;` then
//! `use common::world::*;`): the REAL `outrelay-controller`, `outrelay-relay`, `outrelay-agent`
//! and `outrelay` binaries as processes, a CA made here, relays following the controller,
//! agents with certificates from the CA, and helpers to call through consumers, poll, scrape
//! and read logs. Moved out of `tests/mesh.rs` so every multi-relay test (issue 22) starts
//! its daemons the same way.
#![allow(dead_code, reason = "each test file uses part of the world")]

use super::Ca;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const ADMIN: &str = "outrelay://system/admin/test";
pub const RELAY: &str = "outrelay://dev/relay/relay-1";
/// The relay id the controller lists (from [`RELAY`]).
pub const RELAY_ID: &str = "relay-1";
/// A second relay's identity (the resume tests).
pub const RELAY2: &str = "outrelay://dev/relay/relay-2";
pub const TENANT_A: &str = "acme";
pub const TENANT_B: &str = "globex";
pub const PROVIDER_A: &str = "outrelay://acme/agent/00000000-0000-4000-8000-00000000a001";
pub const CONSUMER_A: &str = "outrelay://acme/agent/00000000-0000-4000-8000-00000000a002";
pub const CONSUMER_A2: &str = "outrelay://acme/agent/00000000-0000-4000-8000-00000000a003";
pub const PROVIDER_A2: &str = "outrelay://acme/agent/00000000-0000-4000-8000-00000000a004";
pub const CONSUMER_B: &str = "outrelay://globex/agent/00000000-0000-4000-8000-00000000b001";
/// Every agent of tenant A.
pub const ANY_A: &str = "outrelay://acme/agent/*";
/// Bound on single waits (process start, ready files, eventual conditions).
pub const WAIT: Duration = Duration::from_secs(30);
/// Bound on one call through a consumer (the agents' open timeout is 5 s here).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on a policy change reaching the relay / cutting a stream (20 × the 1 s target).
pub const POLICY_BOUND: Duration = Duration::from_secs(20);
/// Bytes sent each way in the bulk test.
pub const BULK_BYTES: u64 = 100 * 1024 * 1024;
/// What the in-test HTTP server answers.
pub const BODY: &str = "hello from the provider behind the mesh\n";

// ---------- PKI ----------

// ---------- processes ----------

/// A child process, SIGKILLed (and reaped) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A binary next to `outrelay-agent` in `target/release/`.
pub fn sibling_binary(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_outrelay-agent")).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p outrelay-controller -p outrelay-relay \
         -p outrelay-agent -p outrelay-cli` first",
        bin.display()
    );
    bin
}

/// Spawns `cmd` with stdout and stderr written to `log` (a new file).
pub fn spawn_logged(cmd: Command, log: &Path) -> Proc {
    let _ = std::fs::remove_file(log);
    spawn_logged_append(cmd, log)
}

/// Spawns `cmd` with stdout and stderr appended to `log` (a restarted daemon keeps its log).
pub fn spawn_logged_append(mut cmd: Command, log: &Path) -> Proc {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log");
    let err = out.try_clone().expect("clone log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    Proc(child)
}

pub async fn wait_for_ready(path: &Path, proc: &mut Proc, what: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            return v;
        }
        if let Some(status) = proc.0.try_wait().expect("poll child") {
            panic!("{what} exited before it was ready: {status}");
        }
        assert!(
            started.elapsed() < WAIT,
            "{what}: no ready file within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn addr_in(info: &serde_json::Value, key: &str) -> SocketAddr {
    info[key]
        .as_str()
        .unwrap_or_else(|| panic!("ready file names {key}: {info}"))
        .parse()
        .expect("socket address")
}

/// A port that was free a moment ago (for a local target that must NOT listen).
pub fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

pub async fn run_blocking(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output())
        .await
        .expect("join")
        .expect("run command")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn have(bin: &str, arg: &str) -> bool {
    Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------- metrics ----------

/// GET `/metrics` from `addr` (blocking; short).
pub fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to a metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

/// The sum of the samples of `name` whose labels include every `k="v"` of `labels`, in any
/// order (0 when none).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The `mesh` lines of a metrics page (for failure messages).
pub fn mesh_lines(text: &str) -> String {
    text.lines()
        .filter(|l| l.contains("mesh") && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------- local targets ----------

pub use outrelay_testkit::answer_http;

/// An HTTP/1.1 server answering every request with [`BODY`] and closing.
pub async fn http_target() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let addr = listener.local_addr().expect("http addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(answer_http(s, BODY));
        }
    });
    (addr, task)
}

/// Starts the controller with `ca` as its CA (in its state directory under `d`; it issues
/// itself a server certificate from it); the process and its gRPC URL.
pub async fn start_controller(d: &Path, ca: &Ca) -> (Proc, String) {
    start_controller_on(d, ca, "127.0.0.1:0").await
}

/// [`start_controller`] on a given gRPC address (a restart keeps the relay's URL valid). The
/// state directory is kept: a restart finds its CA, database and audit key.
pub async fn start_controller_on(d: &Path, ca: &Ca, listen: &str) -> (Proc, String) {
    start_controller_named(d, ca, listen, &[]).await
}

/// [`start_controller_on`] whose self-issued server certificate also names `extra_names`
/// (e.g. a veth address that agents in a namespace enroll through).
pub async fn start_controller_named(
    d: &Path,
    ca: &Ca,
    listen: &str,
    extra_names: &[&str],
) -> (Proc, String) {
    let mut names = vec!["localhost", "127.0.0.1"];
    for name in extra_names {
        if !names.contains(name) {
            names.push(name);
        }
    }
    let state = d.join("controller-state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("ca.pem"), &ca.pem).expect("ca.pem");
    std::fs::write(state.join("ca-key.pem"), &ca.key_pem).expect("ca-key.pem");
    let config = d.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[grpc]\nlisten = {listen:?}\n[admin]\nsocket_path = \"\"\n\
             [metrics]\nlisten = \"\"\n[tls]\nserver_names = {names:?}\n",
            state = state.display().to_string(),
        ),
    )
    .expect("controller config");
    let ready = d.join("controller-ready.json");
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(sibling_binary("outrelay-controller"));
    cmd.args(["--log", "info", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready);
    let started = Instant::now();
    let mut controller = spawn_logged(cmd, &d.join("controller.log"));
    let info = wait_for_ready(&ready, &mut controller, "controller").await;
    eprintln!("controller ready after {:?}: {info}", started.elapsed());
    (controller, format!("https://{}", addr_in(&info, "grpc")))
}

// ---------- the world: controller + relay + CLI ----------

/// The admin socket of relay `name` (`outrelay relay status|drain --relay unix://…`).
pub fn admin_socket(d: &Path, name: &str) -> PathBuf {
    d.join(format!("{name}.sock"))
}

/// Starts relay `name` (certificate `<name>.pem`, config `<name>.toml`, log `<name>.log`) with
/// QUIC on `quic` and `tail` appended to its config; the process and its ready file.
pub async fn spawn_relay(
    d: &Path,
    name: &str,
    quic: &str,
    tail: &str,
) -> (Proc, serde_json::Value) {
    spawn_relay_at(d, name, quic, "127.0.0.1", tail).await
}

/// The one relay spawner: QUIC on `quic`, the reverse and public TLS listeners on `ip` (port
/// 0), metrics on loopback, short QUIC timeouts, `tail` after; waits for its ready file.
pub async fn spawn_relay_at(
    d: &Path,
    name: &str,
    quic: &str,
    ip: &str,
    tail: &str,
) -> (Proc, serde_json::Value) {
    let config = d.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "public_url = \"https://relay.mesh.test\"\nworkers = 1\n\
             [tls]\ncert = \"{name}.pem\"\nkey = \"{name}-key.pem\"\nca = \"ca.pem\"\n\
             [listen]\nquic = \"{quic}\"\nreverse = \"{ip}:0\"\n\
             public_tls = \"{ip}:0\"\nmetrics = \"127.0.0.1:0\"\nadmin_socket = {admin:?}\n\
             [quic]\nidle_timeout_ms = 2000\nkeep_alive_ms = 500\n{tail}",
            admin = admin_socket(d, name).display().to_string(),
        ),
    )
    .expect("relay config");
    let ready = d.join(format!("{name}-ready.json"));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(sibling_binary("outrelay-relay"));
    cmd.args(["--log", "info", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready);
    let started = Instant::now();
    let log = d.join(format!("{name}.log"));
    let mut relay = spawn_logged_append(cmd, &log);
    let info = wait_for_ready(&ready, &mut relay, name).await;
    if tail.contains("[controller]") {
        wait_admitting(&info, name).await;
    }
    eprintln!("{name} ready after {:?}: {info}", started.elapsed());
    (relay, info)
}

/// Waits until a relay that follows a controller admits agents: it refuses HELLO (close code
/// 9, `revocations_unavailable`) until its revocation snapshot is in, and an agent refused
/// there takes its next relay candidate, so a test that puts agents on given relays starts
/// them only after this (the ready file is written once the listeners are bound).
async fn wait_admitting(info: &serde_json::Value, name: &str) {
    let metrics = addr_in(info, "metrics");
    let admitting = || {
        metric(
            &scrape(metrics),
            "outrelay_relay_controller_connected",
            &[("stream", "revocations")],
        ) >= 1.0
    };
    assert!(
        poll(Duration::from_secs(15), admitting).await,
        "{name}: no revocation snapshot from the controller within 15 s (it refuses agents)"
    );
}

pub struct World {
    pub ca: Ca,
    /// `None` for a standalone relay.
    pub controller: Option<Proc>,
    /// The controller's gRPC address (`https://…`; empty for a standalone relay).
    pub grpc_url: String,
    pub relay: Proc,
    /// The relay config's `[controller]` or `[[policy]]` part (for restarts and a second relay).
    pub relay_tail: String,
    pub quic: SocketAddr,
    pub relay_metrics: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl World {
    /// A controller, and a relay following it.
    pub async fn new() -> World {
        World::start(None).await
    }

    /// A relay without a controller, with `policy` (`[[policy]]` tables) as its static rules.
    pub async fn standalone(policy: &str) -> World {
        World::start(Some(policy)).await
    }

    /// A controller, and a relay following it with `extra` (TOML tables) in its config.
    pub async fn with_relay_config(extra: &str) -> World {
        World::start_with(None, extra).await
    }

    pub async fn start(standalone_policy: Option<&str>) -> World {
        World::start_with(standalone_policy, "").await
    }

    pub async fn start_with(standalone_policy: Option<&str>, extra: &str) -> World {
        World::start_full(standalone_policy, extra, "127.0.0.1").await
    }

    /// A controller with its gRPC (enrollment) port on `ip` (e.g. a veth address, so agents in
    /// a namespace can enroll), and a relay following it with `extra` in its config.
    pub async fn with_controller_on(ip: &str, extra: &str) -> World {
        World::start_full(None, extra, ip).await
    }

    async fn start_full(
        standalone_policy: Option<&str>,
        extra: &str,
        controller_ip: &str,
    ) -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let ca = Ca::new("outrelay mesh e2e CA");
        std::fs::write(d.join("ca.pem"), &ca.pem).expect("ca.pem");
        ca.write_leaf(d, "relay", RELAY, true);
        let (controller, grpc_url, relay_tail) = match standalone_policy {
            Some(policy) => (None, String::new(), format!("{policy}{extra}")),
            None => {
                let (proc, url) =
                    start_controller_named(d, &ca, &format!("{controller_ip}:0"), &[controller_ip])
                        .await;
                let tail = format!(
                    "[controller]\nurl = \"{url}\"\nheartbeat_interval_ms = 200\n\
                     reconnect_backoff_ms = 100\nreconnect_backoff_max_ms = 500\n\
                     state_dir = \"relay-state\"\n{extra}"
                );
                ca.write_leaf(d, "admin", ADMIN, false);
                (Some(proc), url, tail)
            }
        };
        let (relay, info) = spawn_relay(d, "relay", "127.0.0.1:0", &relay_tail).await;
        World {
            quic: addr_in(&info, "quic"),
            relay_metrics: addr_in(&info, "metrics"),
            ca,
            controller,
            grpc_url,
            relay,
            relay_tail,
            dir,
        }
    }

    /// `kill -9` of the relay, then the same relay again on the same QUIC port (its
    /// identity on disk, so agents get a stateless reset at once); when the new process was
    /// started.
    pub async fn kill9_and_restart_relay(&mut self) -> Instant {
        self.relay.kill9();
        let restarted = Instant::now();
        let quic = self.quic.to_string();
        let (relay, info) = spawn_relay(self.dir.path(), "relay", &quic, &self.relay_tail).await;
        self.relay = relay;
        self.relay_metrics = addr_in(&info, "metrics");
        restarted
    }

    /// A second relay like the first (its own identity and ports; same policy source).
    pub async fn second_relay(&self) -> (Proc, SocketAddr, SocketAddr) {
        let (proc, info) = self.extra_relay("relay2", "relay-2", "").await;
        (proc, addr_in(&info, "quic"), addr_in(&info, "metrics"))
    }

    /// Another relay like the first, named `name` (config, log, ready file) with identity
    /// `outrelay://dev/relay/<id>` and `extra` (TOML) after its `[controller]` part; returns
    /// the process and its ready file (`quic`, `reverse`, `public_tls`, `metrics`, …).
    pub async fn extra_relay(
        &self,
        name: &str,
        id: &str,
        extra: &str,
    ) -> (Proc, serde_json::Value) {
        let d = self.path();
        self.ca
            .write_leaf(d, name, &format!("outrelay://dev/relay/{id}"), true);
        let tail = format!("{}{extra}", self.relay_tail);
        spawn_relay(d, name, "127.0.0.1:0", &tail).await
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `outrelay --output json ARGS` as the global admin; the output whatever the exit code.
    pub async fn cli_raw(&self, args: &[&str]) -> Output {
        let d = self.path();
        let mut cmd = Command::new(sibling_binary("outrelay"));
        cmd.arg("--controller")
            .arg(&self.grpc_url)
            .arg("--cert")
            .arg(d.join("admin.pem"))
            .arg("--key")
            .arg(d.join("admin-key.pem"))
            .arg("--ca")
            .arg(d.join("ca.pem"))
            .args(["--output", "json"])
            .args(args);
        run_blocking(cmd).await
    }

    /// As [`World::cli_raw`], asserting success; stdout parsed as JSON.
    pub async fn cli(&self, args: &[&str]) -> serde_json::Value {
        let o = self.cli_raw(args).await;
        assert!(o.status.success(), "outrelay {args:?}: {}", text(&o));
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("outrelay {args:?}: not JSON ({e}): {}", text(&o)))
    }

    /// `outrelay token create --tenant TENANT`, then `outrelay-agent enroll` run by `cmd` (a
    /// command whose last argument so far is the agent binary, e.g. inside a namespace) into
    /// `<world>/<name>-identity`; the issued certificate and key.
    pub async fn enroll(&self, mut cmd: Command, name: &str, tenant: &str) -> (PathBuf, PathBuf) {
        let t = self.cli(&["token", "create", "--tenant", tenant]).await;
        let token = t["token"].as_str().expect("token").to_owned();
        let dir = self.path().join(format!("{name}-identity"));
        cmd.args(["enroll", "--controller", &self.grpc_url, "--token", &token])
            .arg("--state-dir")
            .arg(&dir)
            .arg("--ca")
            .arg(self.path().join("ca.pem"));
        let out = run_blocking(cmd).await;
        assert!(
            out.status.success(),
            "outrelay-agent enroll: {}",
            text(&out)
        );
        eprintln!("enrolled {name}: {}", text(&out).trim());
        (dir.join("cert.pem"), dir.join("key.pem"))
    }

    /// `outrelay policy add`; the rule id.
    pub async fn rule(
        &self,
        tenant: &str,
        caller: &str,
        target: &str,
        decision: &str,
        expires: Option<&str>,
    ) -> String {
        let mut args = vec![
            "policy",
            "add",
            "--tenant",
            tenant,
            "--caller",
            caller,
            "--target",
            target,
            "--decision",
            decision,
        ];
        if let Some(e) = expires {
            args.extend(["--expires", e]);
        }
        let v = self.cli(&args).await;
        let id = v["id"].as_str().expect("rule id").to_owned();
        eprintln!("policy add {tenant} {caller} -> {target} {decision} {expires:?}: {id}");
        id
    }

    pub async fn remove_rule(&self, tenant: &str, id: &str) {
        self.cli(&["policy", "remove", "--tenant", tenant, "--id", id])
            .await;
    }

    /// `outrelay services list --tenant T`.
    pub async fn services(&self, tenant: &str) -> Vec<serde_json::Value> {
        self.cli(&["services", "list", "--tenant", tenant])
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The `stream` rows of `outrelay audit query --tenant T` (newest first).
    pub async fn stream_audit(&self, tenant: &str) -> Vec<serde_json::Value> {
        self.cli(&["audit", "query", "--tenant", tenant, "--limit", "1000"])
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r["kind"] == "stream")
            .collect()
    }

    /// Starts `outrelay-agent run` for identity `uri` with `body` ([[provide]] / [[consume]])
    /// under short timeouts.
    pub fn agent(&self, name: &str, uri: &str, body: &str) -> Agent {
        self.agent_on(name, uri, &[self.quic], body)
    }

    /// As [`World::agent`], connected to `relays` (in that order).
    pub fn agent_on(&self, name: &str, uri: &str, relays: &[SocketAddr], body: &str) -> Agent {
        let relays: Vec<String> = relays.iter().map(ToString::to_string).collect();
        let cmd = Command::new(env!("CARGO_BIN_EXE_outrelay-agent"));
        self.agent_with(cmd, name, uri, &relays, "", "127.0.0.1", body)
    }

    /// The one agent spawner: `cmd` (the agent binary, possibly behind a prefix such as
    /// `ip netns exec NS`) runs `run --config` for identity `uri` with `relays` written as
    /// given, `top` (top-level keys) before the tables, the metrics and status listener on
    /// `metrics_ip`, short timeouts, and `body` ([[provide]] / [[consume]] / [[lease]] ...).
    #[allow(clippy::too_many_arguments)]
    pub fn agent_with(
        &self,
        cmd: Command,
        name: &str,
        uri: &str,
        relays: &[String],
        top: &str,
        metrics_ip: &str,
        body: &str,
    ) -> Agent {
        let (cert, key) = self.ca.write_leaf(self.path(), name, uri, false);
        self.agent_with_identity(cmd, name, &cert, &key, relays, top, metrics_ip, body)
    }

    /// As [`World::agent_with`], with the identity in `cert` and `key` (e.g. from
    /// `outrelay-agent enroll`) instead of a leaf made here.
    #[allow(
        clippy::too_many_arguments,
        reason = "one spawner, every knob explicit"
    )]
    pub fn agent_with_identity(
        &self,
        mut cmd: Command,
        name: &str,
        cert: &Path,
        key: &Path,
        relays: &[String],
        top: &str,
        metrics_ip: &str,
        body: &str,
    ) -> Agent {
        let d = self.path();
        let config = format!(
            "relays = {relays:?}\nserver_name = \"localhost\"\n{top}\n\
             [identity]\ncert = {cert:?}\nkey = {key:?}\nca = {ca:?}\n\
             [metrics]\nlisten = \"{metrics_ip}:0\"\n\
             [connection]\nkeepalive_ms = 500\nidle_timeout_ms = 3000\nping_interval_ms = 1000\n\
             reconnect_initial_ms = 200\nreconnect_max_ms = 1000\n\
             [mesh]\nopen_timeout_ms = 5000\ndial_timeout_ms = 2000\n{body}\n",
            cert = cert.display().to_string(),
            key = key.display().to_string(),
            ca = d.join("ca.pem").display().to_string(),
        );
        let path = d.join(format!("{name}.toml"));
        std::fs::write(&path, config).expect("agent config");
        let ready = d.join(format!("{name}-ready.json"));
        cmd.args(["--log", "info", "run", "--config"])
            .arg(&path)
            .arg("--ready-file")
            .arg(&ready);
        Agent {
            proc: spawn_logged(cmd, &d.join(format!("{name}.log"))),
            name: name.to_owned(),
            ready,
            started: Instant::now(),
            info: serde_json::Value::Null,
        }
    }

    /// Starts `outrelay-agent SUBCOMMAND ARGS` (`provide` / `consume` from flags) for identity
    /// `uri`, with the common flags.
    pub fn agent_cli(&self, name: &str, uri: &str, subcommand: &str, args: &[&str]) -> Agent {
        let d = self.path();
        let (cert, key) = self.ca.write_leaf(d, name, uri, false);
        let ready = d.join(format!("{name}-ready.json"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outrelay-agent"));
        cmd.args(["--log", "info", subcommand, "--relay"])
            .arg(self.quic.to_string())
            .args(["--server-name", "localhost", "--metrics", "127.0.0.1:0"])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--ca")
            .arg(d.join("ca.pem"))
            .arg("--ready-file")
            .arg(&ready)
            .args(args);
        Agent {
            proc: spawn_logged(cmd, &d.join(format!("{name}.log"))),
            name: name.to_owned(),
            ready,
            started: Instant::now(),
            info: serde_json::Value::Null,
        }
    }

    pub fn relay_scrape(&self) -> String {
        scrape(self.relay_metrics)
    }
}

impl Drop for World {
    /// On a failing test: the tail of every daemon's log (they live in the temp dir).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "----- {} (last {} lines)\n{}",
                log.display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

pub struct Agent {
    pub proc: Proc,
    pub name: String,
    pub ready: PathBuf,
    pub started: Instant,
    pub info: serde_json::Value,
}

impl Agent {
    /// Waits for the ready file (every service registered, every consumer listening).
    pub async fn ready(&mut self) -> serde_json::Value {
        let info = wait_for_ready(&self.ready, &mut self.proc, &self.name).await;
        eprintln!(
            "agent {} ready after {:?}: {info}",
            self.name,
            self.started.elapsed()
        );
        self.info = info.clone();
        info
    }

    /// The listen address of the `i`-th consumer in the ready file.
    pub fn consumer(&self, i: usize) -> SocketAddr {
        self.info["consumers"][i]["listen_addr"]
            .as_str()
            .unwrap_or_else(|| panic!("consumers[{i}].listen_addr in {}", self.info))
            .parse()
            .expect("listen address")
    }

    pub fn scrape(&self) -> String {
        scrape(addr_in(&self.info, "metrics"))
    }

    /// `outrelay_agent_mesh_streams_total{role, result}`.
    pub fn streams(&self, role: &str, result: &str) -> f64 {
        metric(
            &self.scrape(),
            "outrelay_agent_mesh_streams_total",
            &[("role", role), ("result", result)],
        )
    }
}

// ---------- calls through a consumer ----------

/// One HTTP GET through the consumer listening on `addr`: `Ok` with the response when the
/// provider's HTTP server answered, `Err` with what happened otherwise.
pub async fn http_call(addr: SocketAddr) -> Result<String, String> {
    let attempt = async {
        let mut c = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        c.write_all(b"GET /mesh HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        c.read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.starts_with("HTTP/1.1 200") && text.ends_with(BODY) {
            Ok(text)
        } else if text.is_empty() {
            Err("closed without a response".to_owned())
        } else {
            Err(format!("unexpected response {text:?}"))
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CALL_TIMEOUT:?}")))
}

/// Calls through `addr` until one succeeds; the time since `from`.
pub async fn eventually_ok(addr: SocketAddr, from: Instant, what: &str) -> Duration {
    loop {
        match http_call(addr).await {
            Ok(_) => return from.elapsed(),
            Err(e) => assert!(
                from.elapsed() < POLICY_BOUND,
                "{what}: still failing after {POLICY_BOUND:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `cond` every 20 ms up to `bound`; whether it became true.
pub async fn poll(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > bound {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every service stream has ENDED on both agents within 10 s (`mesh.{consumer,provider}.active`
/// back to 0). A resumable stream's direction ends only when the peer acknowledged its last
/// byte, and that last STREAM_CHECKPOINT travels after the relays joined both FINs: a relay
/// that forgets the pair too early leaves both agents holding the stream for ever.
/// `relay_scrapes`: the relays' `/metrics` texts, for the failure message.
pub async fn assert_streams_end(
    consumer: &Agent,
    provider: &Agent,
    relay_scrapes: impl Fn() -> Vec<String>,
) {
    let active = |a: &Agent, role: &str| {
        metric(
            &a.scrape(),
            "outrelay_agent_mesh_streams_active",
            &[("role", role)],
        )
    };
    let ended = poll(Duration::from_secs(10), || {
        active(consumer, "consumer") == 0.0 && active(provider, "provider") == 0.0
    })
    .await;
    if !ended {
        let signals: Vec<String> = relay_scrapes()
            .iter()
            .flat_map(|t| t.lines())
            .filter(|l| l.contains("signals_total") || l.contains("checkpoints_total"))
            .map(str::to_owned)
            .collect();
        panic!(
            "streams still active: consumer {}, provider {}; relay signals:\n{}",
            active(consumer, "consumer"),
            active(provider, "provider"),
            signals.join("\n")
        );
    }
}

/// One call through the consumer `agent`'s `i`-th listener must fail with `code`: the local
/// connection is closed without an answer and the agent counts `rejected_<code>`.
pub async fn expect_rejected(agent: &Agent, i: usize, code: u16) {
    let result = format!("rejected_{code}");
    let before = agent.streams("consumer", &result);
    let r = http_call(agent.consumer(i)).await;
    assert!(
        r.is_err(),
        "a call expected to be rejected with {code} went through"
    );
    let counted = poll(Duration::from_secs(10), || {
        agent.streams("consumer", &result) > before
    })
    .await;
    assert!(
        counted,
        "call failed ({r:?}) but {} did not count consumer {result}:\n{}",
        agent.name,
        mesh_lines(&agent.scrape())
    );
}

/// Calls through the consumer `agent`'s `i`-th listener until one is rejected with `code`;
/// the time since `from`. Calls that fail otherwise (another code, a timeout) are retried.
pub async fn eventually_rejected(agent: &Agent, i: usize, code: u16, from: Instant) -> Duration {
    let result = format!("rejected_{code}");
    loop {
        let before = agent.streams("consumer", &result);
        let r = http_call(agent.consumer(i)).await;
        if r.is_err()
            && poll(Duration::from_secs(2), || {
                agent.streams("consumer", &result) > before
            })
            .await
        {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < WAIT,
            "no {result} within {WAIT:?} (last call: {r:?}):\n{}",
            mesh_lines(&agent.scrape())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A long-lived stream through a consumer to an echo target.
pub struct LiveStream {
    pub conn: TcpStream,
    pub n: u64,
}

impl LiveStream {
    pub async fn open(addr: SocketAddr) -> LiveStream {
        let conn = TcpStream::connect(addr).await.expect("connect consumer");
        let mut s = LiveStream { conn, n: 0 };
        s.ping().await.expect("first echo through the live stream");
        s
    }

    /// Retries [`LiveStream::open`] until a rule lets the stream through, for up to `bound`.
    pub async fn open_when_allowed(addr: SocketAddr, bound: Duration, what: &str) -> LiveStream {
        let t0 = Instant::now();
        loop {
            let conn = TcpStream::connect(addr).await.expect("connect consumer");
            let mut s = LiveStream { conn, n: 0 };
            if s.ping().await.is_ok() {
                return s;
            }
            assert!(t0.elapsed() < bound, "{what}: not allowed within {bound:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One 16-byte echo round trip.
    pub async fn ping(&mut self) -> Result<(), String> {
        self.n += 1;
        let msg = format!("ping {:011}", self.n);
        let attempt = async {
            self.conn
                .write_all(msg.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut buf = [0u8; 16];
            self.conn
                .read_exact(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if buf == msg.as_bytes() {
                Ok(())
            } else {
                Err(format!("wrong echo {:?}", String::from_utf8_lossy(&buf)))
            }
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .unwrap_or_else(|_| Err("no echo within 5 s".to_owned()))
    }

    /// Pings every 20 ms until the stream breaks; the time since `from` and the error.
    pub async fn wait_cut(&mut self, from: Instant, bound: Duration) -> (Duration, String) {
        loop {
            if let Err(e) = self.ping().await {
                return (from.elapsed(), e);
            }
            assert!(
                from.elapsed() < bound,
                "the live stream still flows {bound:?} after the change"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Keeps pinging for `d`: every round trip must work.
    pub async fn keep_flowing(&mut self, d: Duration) {
        let start = Instant::now();
        let mut pings = 0u32;
        while start.elapsed() < d {
            self.ping()
                .await
                .unwrap_or_else(|e| panic!("the live stream broke after {pings} pings: {e}"));
            pings += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A consumer of `service` on port 0.
pub fn consume(service: &str) -> String {
    format!("[[consume]]\nservice = \"{service}\"\nlisten = \"127.0.0.1:0\"\n")
}

/// A consumer of `service` calling `method`, on port 0.
pub fn consume_method(service: &str, method: &str) -> String {
    format!(
        "[[consume]]\nservice = \"{service}\"\nlisten = \"127.0.0.1:0\"\nmethod = \"{method}\"\n"
    )
}

/// A provider of `service` with default target `to`.
pub fn provide(service: &str, to: SocketAddr) -> String {
    format!("[[provide]]\nservice = \"{service}\"\nto = \"{to}\"\n")
}

// ---------- HA agents (issue 22) ----------

impl World {
    /// As [`World::agent_on`], with `relays` written as given (addresses or `host:port`
    /// names) and `top` (top-level keys such as `ha_connections = 2`) before the tables.
    pub fn agent_ha(
        &self,
        name: &str,
        uri: &str,
        relays: &[String],
        top: &str,
        body: &str,
    ) -> Agent {
        let cmd = Command::new(env!("CARGO_BIN_EXE_outrelay-agent"));
        self.agent_with(cmd, name, uri, relays, top, "127.0.0.1", body)
    }

    /// A relay named `name` with identity `outrelay://dev/relay/<id>` on QUIC `quic` (an
    /// earlier one's port to restart it there) with `tail` as its whole config tail (build it
    /// from [`World::relay_tail`] to follow the controller); its ready file.
    pub async fn relay_with_tail(
        &self,
        name: &str,
        id: &str,
        quic: &str,
        tail: &str,
    ) -> (Proc, serde_json::Value) {
        let d = self.path();
        self.ca
            .write_leaf(d, name, &format!("outrelay://dev/relay/{id}"), true);
        spawn_relay(d, name, quic, tail).await
    }

    /// `GET /status` of an agent (its metrics listener).
    pub fn agent_status(agent: &Agent) -> serde_json::Value {
        let addr = addr_in(&agent.info, "metrics");
        let mut s = std::net::TcpStream::connect(addr).expect("connect to the agent's /status");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        std::io::Write::write_all(
            &mut s,
            format!("GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("request");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).expect("response");
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("/status JSON: {e}: {text}"))
    }
}

// ---------- issue 22: TCP/443 fallback (network namespaces) ----------

/// As [`spawn_relay`], with its QUIC, reverse and public TLS listeners on `ip` (port 0 each)
/// instead of loopback, so an agent in another network namespace reaches them over a veth.
pub async fn spawn_relay_on_ip(
    d: &Path,
    name: &str,
    ip: &str,
    tail: &str,
) -> (Proc, serde_json::Value) {
    spawn_relay_at(d, name, &format!("{ip}:0"), ip, tail).await
}

impl World {
    /// Another relay (identity `outrelay://dev/relay/<id>`, this world's policy or controller
    /// part, then `extra`) with its listeners on `ip` ([`spawn_relay_on_ip`]).
    pub async fn relay_on_ip(
        &self,
        name: &str,
        id: &str,
        ip: &str,
        extra: &str,
    ) -> (Proc, serde_json::Value) {
        let d = self.path();
        self.ca
            .write_leaf(d, name, &format!("outrelay://dev/relay/{id}"), true);
        let tail = format!("{}{extra}", self.relay_tail);
        spawn_relay_on_ip(d, name, ip, &tail).await
    }

    /// As [`World::agent_on`], but run by `cmd` (a command whose last argument so far is the
    /// agent binary, e.g. `ip netns exec NS outrelay-agent`) with its metrics and status
    /// listener on `metrics_ip`.
    pub fn agent_via(
        &self,
        cmd: Command,
        name: &str,
        uri: &str,
        relays: &[SocketAddr],
        metrics_ip: &str,
        body: &str,
    ) -> Agent {
        let relays: Vec<String> = relays.iter().map(ToString::to_string).collect();
        self.agent_with(cmd, name, uri, &relays, "", metrics_ip, body)
    }
}

/// An HTTPS server for `host` (a server leaf of `ca`) on `listener` (bound wherever the test
/// needs it, e.g. inside a namespace) answering every request with [`BODY`]: the real TLS
/// server behind a TLS passthrough lease.
pub fn https_target_on(listener: std::net::TcpListener, ca: &Ca, host: &str) -> JoinHandle<()> {
    https_target_with(listener, ca, host, BODY)
}

/// [`https_target_on`] answering with `body`.
pub fn https_target_with(
    listener: std::net::TcpListener,
    ca: &Ca,
    host: &str,
    body: &'static str,
) -> JoinHandle<()> {
    let leaf = ca.leaf(
        host,
        &[host],
        None,
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
    );
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(leaf.chain, leaf.key)
        .expect("server cert");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    answer_http(tls, body).await;
                }
            });
        }
    })
}

/// `curl` GET of `https://host:port/` through `ip` (`--resolve`), trusting the world's CA in
/// `dir`; the body, or why not. `None`: no curl here (the caller skips loudly).
pub async fn curl_https(
    dir: &Path,
    host: &str,
    ip: &str,
    port: u16,
) -> Option<Result<String, String>> {
    if !have("curl", "--version") {
        return None;
    }
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(dir.join("ca.pem"))
        .arg("--resolve")
        .arg(format!("{host}:{port}:{ip}"))
        .arg(format!("https://{host}:{port}/"));
    let out = run_blocking(cmd).await;
    Some(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}
