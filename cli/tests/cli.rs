//! The `outrelay` binary against a real `outrelay-controller` process (mTLS on 127.0.0.1:0,
//! a dev PKI made by `outrelay dev-pki`, a real SQLite file).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

struct Controller {
    child: Child,
    grpc: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn controller_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_outrelay")).with_file_name("outrelay-controller");
    assert!(
        p.exists(),
        "{} missing: build it first with `cargo build --release -p outrelay-controller` (or run the workspace tests)",
        p.display()
    );
    p
}

fn start(dir: &Path, pki: &Path) -> Controller {
    let config = dir.join("controller.toml");
    let ready = dir.join("ready.json");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[grpc]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n[admin]\nsocket_path = {sock:?}\n[metrics]\nlisten = \"\"\n",
            state = pki.display().to_string(),
            cert = pki.join("controller.pem").display().to_string(),
            key = pki.join("controller-key.pem").display().to_string(),
            sock = dir.join("controller.sock").display().to_string(),
        ),
    )
    .expect("config");
    let child = Command::new(controller_bin())
        .args(["--log", "warn", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .spawn()
        .expect("spawn controller");
    let deadline = Instant::now() + Duration::from_secs(60);
    let grpc = loop {
        if let Ok(text) = std::fs::read_to_string(&ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            break v["grpc"].as_str().expect("grpc").to_owned();
        }
        assert!(Instant::now() < deadline, "controller not ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    Controller { child, grpc }
}

fn outrelay(c: &Controller, pki: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outrelay"))
        .arg("--controller")
        .arg(format!("https://{}", c.grpc))
        .arg("--cert")
        .arg(pki.join("admin.pem"))
        .arg("--key")
        .arg(pki.join("admin-key.pem"))
        .arg("--ca")
        .arg(pki.join("ca.pem"))
        .args(args)
        .output()
        .expect("run outrelay")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn dev_pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    let o = Command::new(env!("CARGO_BIN_EXE_outrelay"))
        .args(["dev-pki", "--root-host", "relay.example.test", "--out"])
        .arg(&pki)
        .output()
        .expect("dev-pki");
    assert!(o.status.success(), "{}", text(&o));
    pki
}

#[test]
fn dev_pki_writes_every_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = dev_pki(dir.path());
    for f in [
        "ca",
        "controller",
        "relay",
        "admin",
        "agent-1",
        "agent-2",
        "root-host",
        "wildcard",
        "demo",
    ] {
        assert!(pki.join(format!("{f}.pem")).exists(), "{f}.pem");
    }
    assert!(pki.join("ca-key.pem").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(pki.join("ca-key.pem"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "CA key must be private");
}

#[test]
fn policy_audit_and_tamper_detection_end_to_end() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = dev_pki(dir.path());
    let c = start(dir.path(), &pki);

    let o = outrelay(
        &c,
        &pki,
        &[
            "policy",
            "add",
            "--tenant",
            "acme",
            "--caller",
            "outrelay://acme/agent/*",
            "--target",
            "db",
            "--decision",
            "allow",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = outrelay(
        &c,
        &pki,
        &[
            "policy",
            "add",
            "--tenant",
            "acme",
            "--caller",
            "*",
            "--target",
            "*",
            "--decision",
            "deny",
            "--expires",
            "1h",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    // Any word but allow|deny is a usage error, never an allow.
    let o = outrelay(
        &c,
        &pki,
        &[
            "policy",
            "add",
            "--tenant",
            "acme",
            "--caller",
            "*",
            "--target",
            "db",
            "--decision",
            "permit",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // A remote refusal is exit 1.
    let o = outrelay(
        &c,
        &pki,
        &[
            "policy",
            "add",
            "--tenant",
            "system",
            "--caller",
            "*",
            "--target",
            "db",
            "--decision",
            "allow",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("rule.tenant"), "{}", text(&o));

    let o = outrelay(
        &c,
        &pki,
        &["--output", "json", "policy", "list", "--tenant", "acme"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let rules: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(rules.as_array().map(Vec::len), Some(2));
    assert_eq!(rules[0]["decision"], "allow");
    let o = outrelay(
        &c,
        &pki,
        &[
            "policy",
            "remove",
            "--tenant",
            "acme",
            "--id",
            "no-such-rule",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    let o = outrelay(&c, &pki, &["audit", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 rows"), "{}", text(&o));
    let o = outrelay(
        &c,
        &pki,
        &["--output", "json", "audit", "query", "--tenant", "acme"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(2));

    // Someone with write access to the database (but not the audit key) edits row 1.
    let db = rusqlite::Connection::open(pki.join("controller.db")).expect("open db");
    db.execute(
        "UPDATE audit SET reason = 'nothing to see' WHERE seq = 1",
        [],
    )
    .expect("tamper");
    drop(db);
    let o = outrelay(&c, &pki, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("row 1"), "{}", text(&o));

    let o = outrelay(
        &c,
        &pki,
        &["token", "create", "--tenant", "acme", "--ttl", "5m"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ort1."), "{}", text(&o));
    let o = outrelay(
        &c,
        &pki,
        &[
            "cert",
            "revoke",
            "--uri",
            "outrelay://acme/agent/00000000-0000-4000-8000-000000000001",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    for args in [
        &["services", "list"][..],
        &["relays", "list"],
        &["leases", "list"],
        &["leases", "mode", "--tenant", "acme", "manual"],
        &["leases", "quota", "--tenant", "acme", "--max", "3"],
    ] {
        let o = outrelay(&c, &pki, args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
    // The port lease admin gates (global admins): every relay's default, then one relay's.
    let o = outrelay(&c, &pki, &["leases", "gate", "--tcp", "off", "--udp", "on"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = outrelay(
        &c,
        &pki,
        &[
            "--output",
            "json",
            "leases",
            "gate",
            "--relay",
            "r1",
            "--udp",
            "on",
            "--udp-max",
            "5",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let set: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        set,
        serde_json::json!({"relay": "r1", "tcp": "config", "udp": "on (max 5)"})
    );
    let o = outrelay(&c, &pki, &["leases", "gate", "--relay", "r1"]);
    assert_eq!(o.status.code(), Some(2), "a gate is required: {}", text(&o));
}

/// Issue 21: `outrelay leases limit` / `limits` against a real controller: RATE units reach the
/// controller as bytes per second, a record can be listed and cleared, and bad RATEs or flag
/// combinations are usage errors (exit 2) that never reach it.
#[test]
fn leases_limit_sets_lists_and_clears_bandwidth_records() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = dev_pki(dir.path());
    let c = start(dir.path(), &pki);
    let json = |args: &[&str]| {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let o = outrelay(&c, &pki, &all);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")
    };
    let set = json(&[
        "leases", "limit", "--tenant", "acme", "--name", "web", "--rate", "1.5Gbit",
    ]);
    assert_eq!(
        set,
        serde_json::json!([{"tenant": "acme", "name": "web",
            "to_service_bytes_per_s": 187_500_000u64, "to_client_bytes_per_s": 187_500_000u64}])
    );
    json(&[
        "leases",
        "limit",
        "--tenant",
        "acme",
        "--to-service",
        "10Gbit",
        "--to-client",
        "50MB",
    ]);
    let listed = json(&["leases", "limits"]);
    assert_eq!(
        listed,
        serde_json::json!([
            {"tenant": "acme", "name": "", "to_service_bytes_per_s": 1_250_000_000u64,
             "to_client_bytes_per_s": 50_000_000u64},
            {"tenant": "acme", "name": "web", "to_service_bytes_per_s": 187_500_000u64,
             "to_client_bytes_per_s": 187_500_000u64},
        ])
    );
    let o = outrelay(&c, &pki, &["leases", "limits", "--tenant", "acme"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("1.5 Gbit/s (187500000 B/s)"),
        "{}",
        text(&o)
    );
    let cleared = json(&[
        "leases", "limit", "--tenant", "acme", "--name", "web", "--clear",
    ]);
    assert_eq!(
        cleared,
        serde_json::json!({"tenant": "acme", "name": "web", "cleared": true})
    );
    assert_eq!(
        json(&["leases", "limits"]).as_array().map(Vec::len),
        Some(1)
    );
    // Clearing it again: the controller's NOT_FOUND, exit 1.
    let o = outrelay(
        &c,
        &pki,
        &[
            "leases", "limit", "--tenant", "acme", "--name", "web", "--clear",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // Usage errors: a bad unit, no rate at all, two ways of saying it, half of a pair.
    for args in [
        &["leases", "limit", "--tenant", "acme", "--rate", "200Mbyte"][..],
        &["leases", "limit", "--tenant", "acme", "--rate", "fast"],
        &["leases", "limit", "--tenant", "acme"],
        &[
            "leases", "limit", "--tenant", "acme", "--rate", "1Mbit", "--clear",
        ],
        &[
            "leases",
            "limit",
            "--tenant",
            "acme",
            "--to-service",
            "1Mbit",
        ],
    ] {
        let o = outrelay(&c, &pki, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
    }
    let o = outrelay(
        &c,
        &pki,
        &["leases", "limit", "--tenant", "acme", "--rate", "200Mbyte"],
    );
    assert!(text(&o).contains("unknown unit `Mbyte`"), "{}", text(&o));
}

#[test]
fn completions_and_man_pages() {
    let o = Command::new(env!("CARGO_BIN_EXE_outrelay"))
        .args(["completions", "bash"])
        .output()
        .expect("run");
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("outrelay"));
    let dir = tempfile::tempdir().expect("tmp");
    let o = Command::new(env!("CARGO_BIN_EXE_outrelay"))
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", text(&o));
    for page in [
        "outrelay.1",
        "outrelay-policy-add.1",
        "outrelay-audit-verify.1",
        "outrelay-leases-mode.1",
        "outrelay-leases-limit.1",
        "outrelay-leases-limits.1",
    ] {
        assert!(dir.path().join(page).exists(), "{page}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_outrelay"))
        .args(["policy", "frobnicate"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
}

/// `outrelay relay status` against a real relay process, with a dev PKI from `outrelay dev-pki`.
#[test]
fn relay_status_reads_the_relay_admin_socket() {
    let relay_bin = Path::new(env!("CARGO_BIN_EXE_outrelay")).with_file_name("outrelay-relay");
    assert!(
        relay_bin.exists(),
        "{} missing: build it first with `cargo build --release -p outrelay-relay` (or run the workspace tests)",
        relay_bin.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let o = Command::new(env!("CARGO_BIN_EXE_outrelay"))
        .args(["dev-pki", "--root-host", "relay.outrelay.test", "--out"])
        .arg(&pki)
        .output()
        .expect("dev-pki");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let admin = dir.path().join("relay.sock");
    let ready = dir.path().join("ready.json");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "public_url = \"https://relay.outrelay.test\"\nworkers = 1\n\
             [tls]\ncert = \"{p}/relay.pem\"\nkey = \"{p}/relay-key.pem\"\nca = \"{p}/ca.pem\"\n\
             [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"127.0.0.1:0\"\n\
             metrics = \"\"\nadmin_socket = \"{a}\"\n",
            p = pki.display(),
            a = admin.display()
        ),
    )
    .expect("config");
    let mut relay = Command::new(&relay_bin)
        .arg("--config")
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start relay");
    let started = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "relay not ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let relay_arg = format!("unix://{}", admin.display());
    let table = Command::new(env!("CARGO_BIN_EXE_outrelay"))
        .args(["relay", "status", "--relay", &relay_arg])
        .output()
        .expect("relay status");
    let json = Command::new(env!("CARGO_BIN_EXE_outrelay"))
        .args(["relay", "status", "--output", "json", "--relay", &relay_arg])
        .output()
        .expect("relay status json");
    let missing = Command::new(env!("CARGO_BIN_EXE_outrelay"))
        .args([
            "relay",
            "status",
            "--relay",
            "unix:///nonexistent/relay.sock",
        ])
        .output()
        .expect("relay status, no relay");
    let outrelay_relay = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_outrelay"))
            .arg("relay")
            .args(args)
            .args(["--relay", &relay_arg])
            .output()
            .expect("outrelay relay")
    };
    // An idle relay drains at once; status then says draining.
    let drain = outrelay_relay(&["drain", "--output", "json", "--wait", "--timeout-s", "10"]);
    let drained_table = outrelay_relay(&["status"]);
    let drained_json = outrelay_relay(&["status", "--output", "json"]);
    // A draining relay refuses a hitless upgrade, and says why.
    let upgrade = outrelay_relay(&["upgrade", "--timeout-s", "5"]);
    let _ = relay.kill();
    let _ = relay.wait();
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains(" workers, ")
            && text.contains("ebpf mode ")
            && text.contains("worker 0: accepts")
            && text.contains("resume: none; parked 0, 0 bytes retransmitted")
            && text.contains("config generation 1, applied ")
            && text.contains("HOSTNAME"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON status");
    assert_eq!(v["workers"], 1);
    assert_eq!(v["config"]["generation"], 1, "settings generation: {v}");
    assert_eq!(
        v["worker_stats"][0]["worker"], 0,
        "per-worker counters: {v}"
    );
    assert_eq!(v["resume"]["results"]["resumed"], 0, "resume counters: {v}");
    assert_eq!(v["resume"]["parked"], 0, "resume counters: {v}");
    assert_eq!(
        v["resume"]["p2p_signals"]["forwarded"], 0,
        "P2P signalling counters: {v}"
    );
    assert_eq!(
        missing.status.code(),
        Some(1),
        "an unreachable relay is a remote error"
    );
    assert_eq!(v["drain"]["draining"], false, "{v}");
    assert!(
        drain.status.success(),
        "{}",
        String::from_utf8_lossy(&drain.stderr)
    );
    let first: serde_json::Value = serde_json::from_slice(
        String::from_utf8_lossy(&drain.stdout)
            .lines()
            .next()
            .expect("a progress line")
            .as_bytes(),
    )
    .expect("JSON progress");
    assert_eq!(
        (
            &first["draining"],
            &first["started_now"],
            &first["agents"],
            &first["streams"]
        ),
        (
            &serde_json::json!(true),
            &serde_json::json!(true),
            &serde_json::json!(0),
            &serde_json::json!(0)
        ),
        "{first}"
    );
    let text = String::from_utf8_lossy(&drained_table.stdout);
    assert!(
        text.starts_with("DRAINING: 0 agents, 0 leases, 0 pairs, 0 streams left"),
        "{text}"
    );
    let after: serde_json::Value =
        serde_json::from_slice(&drained_json.stdout).expect("JSON status");
    assert_eq!(after["drain"]["draining"], true, "{after}");
    assert_eq!(after["upgrade"]["state"], "serving", "{after}");
    assert_eq!(upgrade.status.code(), Some(1), "{upgrade:?}");
    let why = String::from_utf8_lossy(&upgrade.stderr);
    assert!(why.contains("draining or stopping"), "{why}");
}
