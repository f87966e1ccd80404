//! End to end: the built harness runs scenarios through real sockets on 127.0.0.1 with the
//! in-repo backends. Asserts what must hold on any machine (measurements exist, nothing
//! failed, outrelay is reported missing, never faked), never how fast anything was.
//! Peers that are not installed are skipped with a loud reason.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn harness(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_outrelay-bench"))
        .args(args)
        .output()
        .expect("harness binary runs");
    assert!(
        out.status.success(),
        "outrelay-bench {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `args` with `--json` into a temp file and returns (Markdown, stderr, JSON).
fn harness_json(args: &[&str]) -> (String, String, Value) {
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("out.json");
    let json_arg = json_path.to_str().expect("utf-8 temp path");
    let mut all = args.to_vec();
    all.extend(["--json", json_arg]);
    let out = harness(&all);
    let json = std::fs::read_to_string(&json_path).expect("JSON written");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        serde_json::from_str(&json).expect("valid JSON"),
    )
}

fn row<'a>(doc: &'a Value, target: &str) -> &'a Value {
    doc["result"]["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["target"] == target)
        .unwrap_or_else(|| panic!("no row for {target}: {doc:#}"))
}

fn median(row: &Value, key: &str) -> f64 {
    row["cells"][key]["median"]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {row:#}"))
}

#[test]
fn connrate_quick_against_direct_completes_connections_without_errors() {
    let (md, _, doc) = harness_json(&["run", "connrate", "--targets", "direct", "--quick"]);
    let direct = row(&doc, "direct");
    assert!(direct["status"].is_null(), "direct failed: {direct:#}");
    assert!(median(direct, "conn_per_s") > 0.0);
    assert_eq!(median(direct, "errors"), 0.0);
    assert!(median(direct, "p99_us") >= median(direct, "p50_us"));
    // direct never routes on SNI: one row, the tcp path.
    assert!(md.contains("| direct | tcp | c=32 |"), "{md}");
    assert!(md.contains("- ClientHello: "), "{md}");
    let header = [
        "- date: ",
        "- commit: ",
        "- kernel: ",
        "- CPU: ",
        "- peers: ",
        "- command: ",
        "- pinning: none",
    ];
    for line in header {
        assert!(md.contains(line), "missing {line:?} in\n{md}");
    }
}

/// Issue 16's connrate run in small: outrelay and outrelay-base (the same build, from
/// `OUTRELAY_BASE_BIN`), relay worker counts 1 and 2, both paths, targets pinned. Every
/// setup and path is measured, CPU per connection and the per-target-core figure exist, the
/// comparisons are filled in and the header names the pinning.
#[test]
fn connrate_measures_each_worker_count_and_path_pinned_against_a_base_build() {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    if !bin.join("outrelay-relay").exists() || !bin.join("outrelay-agent").exists() {
        eprintln!(
            "SKIP connrate_measures_each_worker_count_and_path_pinned_against_a_base_build: \
             cargo build --release -p outrelay-relay -p outrelay-agent -p outrelay-cli first"
        );
        return;
    }
    let taskset = Command::new("sh")
        .args(["-c", "command -v taskset"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !taskset {
        eprintln!(
            "SKIP connrate_measures_each_worker_count_and_path_pinned_against_a_base_build: \
             no taskset (util-linux)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_outrelay-bench"))
        .args([
            "run",
            "connrate",
            "--targets",
            "direct,outrelay,outrelay-base",
            "--quick",
            "--concurrency",
            "4",
            "--relay-workers",
            "1,2",
            "--pin-targets",
            "0",
            "--pin-load",
            "0",
            "--json",
        ])
        .arg(&json_path)
        .env("OUTRELAY_BASE_BIN", &bin)
        .output()
        .expect("harness binary runs");
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{md}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("JSON written"))
            .expect("valid JSON");
    let rows = doc["result"]["rows"].as_array().expect("rows");
    for target in ["outrelay", "outrelay-base"] {
        for setup in ["w=1", "w=2"] {
            for path in ["sni", "tcp"] {
                let r = rows
                    .iter()
                    .find(|r| r["target"] == target && r["setup"] == setup && r["path"] == path)
                    .unwrap_or_else(|| panic!("no {target} {setup} {path} row: {doc:#}"));
                assert!(median(r, "conn_per_s") > 0.0, "{r:#}");
                assert_eq!(median(r, "errors"), 0.0, "{r:#}");
                assert!(median(r, "relay_cpu_us_per_conn") > 0.0, "{r:#}");
                // One target core: conn/s per core is conn/s.
                assert_eq!(
                    median(r, "conn_per_s_per_target_core"),
                    median(r, "conn_per_s"),
                    "{r:#}"
                );
                assert!(median(r, "conn_per_s_ratio_to_base") > 0.0, "{r:#}");
                assert!(median(r, "conn_per_s_ratio_to_first_setup") > 0.0, "{r:#}");
                assert_eq!(median(r, "sni_routed"), f64::from(path == "sni"), "{r:#}");
            }
        }
    }
    let direct = row(&doc, "direct");
    assert_eq!(direct["path"], "tcp", "{direct:#}");
    assert!(
        direct["cells"]["conn_per_s_ratio_to_base"].is_null(),
        "x base is for the outrelay rows: {direct:#}"
    );
    assert!(
        md.contains(
            "- pinning: targets on CPUs 0 (taskset -c 0); load generator and backends on CPUs 0"
        ),
        "{md}"
    );
    assert!(md.contains("| outrelay | w=2 | tcp | c=4 |"), "{md}");
}

#[test]
fn latency_quick_through_direct_and_outrelay_measures_both() {
    // The workspace test run builds outrelay-relay, outrelay-agent and outrelay first, so the
    // two-hop target is really started here (dev PKI, relay, agent, TCP lease).
    let (md, _stderr, doc) =
        harness_json(&["run", "latency", "--targets", "direct,outrelay", "--quick"]);
    let direct = row(&doc, "direct");
    assert!(median(direct, "p50_us") > 0.0);
    assert!(median(direct, "p999_us") >= median(direct, "p99_us"));
    assert!(median(direct, "p99_us") >= median(direct, "p50_us"));
    assert_eq!(median(direct, "p50_us_added_over_direct"), 0.0);
    let outrelay = row(&doc, "outrelay");
    assert!(
        outrelay["status"].is_null(),
        "outrelay not measured: {outrelay}"
    );
    assert!(median(outrelay, "p50_us") > 0.0);
    assert!(md.contains("| outrelay |"), "{md}");
}

#[test]
fn udp_quick_through_direct_and_outrelay_counts_datagrams_and_skips_tcp_only_peers() {
    let (md, _stderr, doc) = harness_json(&[
        "run",
        "udp",
        "--targets",
        "direct,haproxy,outrelay",
        "--quick",
    ]);
    let rows = doc["result"]["rows"].as_array().expect("rows");
    let cell = |target: &str, variant: &str, key: &str| {
        rows.iter()
            .find(|r| r["target"] == target && r["variant"] == variant)
            .map(|r| median(r, key))
            .unwrap_or_else(|| panic!("no {target} {variant} row: {doc:#}"))
    };
    assert!(cell("direct", "saturate", "dgram_per_s") > 0.0);
    let outrelay = row(&doc, "outrelay");
    assert!(
        outrelay["status"].is_null(),
        "outrelay not measured: {outrelay}"
    );
    assert!(cell("outrelay", "saturate", "dgram_per_s") > 0.0);
    // The paced phase exists (outrelay was calibrated) and its loss is a percentage.
    let loss = cell("outrelay", "paced 80 %", "loss_pct");
    assert!((0.0..=100.0).contains(&loss), "{loss}");
    let haproxy = row(&doc, "haproxy");
    assert!(
        haproxy["status"]
            .as_str()
            .is_some_and(|s| s.contains("no UDP")),
        "{haproxy}"
    );
    assert!(md.contains("| outrelay | paced 80 % |"), "{md}");
}

#[test]
fn mesh_quick_moves_bytes_through_quinn_direct_and_the_outrelay_mesh() {
    // The workspace test run builds the relay, the agent and the CLI first, so the mesh is
    // really started here: standalone relay with a static allow rule, provider and consumer
    // agents, one stream consumer -> relay -> provider -> sink.
    let (md, _stderr, doc) = harness_json(&[
        "run",
        "mesh",
        "--targets",
        "quinn-direct,outrelay,haproxy",
        "--quick",
        "--duration-s",
        "1",
    ]);
    for target in ["quinn-direct", "outrelay"] {
        let r = row(&doc, target);
        assert!(r["status"].is_null(), "{target} not measured: {r:#}");
        assert!(median(r, "gbps") > 0.0, "{r:#}");
        assert!(median(r, "cpu_s_per_gbit") > 0.0, "{r:#}");
    }
    // P6's ratio: relay CPU per Gbit over quinn client + server CPU per Gbit, per round.
    let ratio = median(
        row(&doc, "outrelay"),
        "cpu_s_per_gbit_ratio_to_quinn-direct",
    );
    assert!(ratio.is_finite() && ratio > 0.0, "{ratio}");
    assert_eq!(
        median(
            row(&doc, "quinn-direct"),
            "cpu_s_per_gbit_ratio_to_quinn-direct"
        ),
        1.0
    );
    // The agents are the path's ends: reported apart, never as the relay.
    assert!(median(row(&doc, "outrelay"), "helpers_cpu_s_per_gbit") > 0.0);
    let haproxy = row(&doc, "haproxy");
    assert!(
        haproxy["status"]
            .as_str()
            .is_some_and(|s| s.contains("no QUIC mesh")),
        "{haproxy}"
    );
    assert!(md.contains("| outrelay | 1 stream |"), "{md}");
}

#[test]
fn mesh_runs_each_agent_resume_setup_and_compares_with_the_first() {
    // Issue 19: both agents with [resume] enabled = false, then = true, in the same round.
    // Without a relay that offers resume both carry plain streams; the plumbing is the same.
    let (md, _stderr, doc) = harness_json(&[
        "run",
        "mesh",
        "--targets",
        "outrelay",
        "--agent-resume",
        "off,on",
        "--quick",
        "--duration-s",
        "1",
    ]);
    let rows = doc["result"]["rows"].as_array().expect("rows");
    let setups: Vec<&str> = rows.iter().filter_map(|r| r["setup"].as_str()).collect();
    assert_eq!(setups, ["resume=off", "resume=on"], "{doc:#}");
    for r in rows {
        assert!(r["status"].is_null(), "not measured: {r:#}");
        assert!(median(r, "gbps") > 0.0, "{r:#}");
        assert!(median(r, "helpers_cpu_s_per_gbit") > 0.0, "{r:#}");
    }
    assert_eq!(median(&rows[0], "gbps_ratio_to_first_setup"), 1.0);
    assert!(median(&rows[1], "cpu_s_per_gbit_ratio_to_first_setup") > 0.0);
    assert!(median(&rows[1], "helpers_cpu_s_per_gbit_ratio_to_first_setup") > 0.0);
    assert!(md.contains("| outrelay | resume=on | 1 stream |"), "{md}");
    assert!(md.contains("agents CPU per Gbit x first setup"), "{md}");
}

/// Issue 22: the forwarded mesh (controller, two enrolled relays, provider on relay 2,
/// consumer on relay 1) and the mesh over the TCP fallback, in one quick run next to the
/// single-relay mesh; each row counts only if the relay saw the stream take its path.
#[test]
fn mesh_quick_forwards_between_two_relays_and_runs_over_the_tcp_fallback() {
    let controller =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/outrelay-controller");
    if !controller.exists() {
        eprintln!(
            "SKIP mesh_quick_forwards_between_two_relays_and_runs_over_the_tcp_fallback: \
             {} not built (cargo build --release -p outrelay-controller)",
            controller.display()
        );
        return;
    }
    let (md, _stderr, doc) = harness_json(&[
        "run",
        "mesh",
        "--targets",
        "outrelay,mesh-forward,fallback",
        "--quick",
        "--duration-s",
        "1",
    ]);
    for target in ["outrelay", "mesh-forward", "fallback"] {
        let r = row(&doc, target);
        assert!(r["status"].is_null(), "{target} not measured: {r:#}");
        assert!(median(r, "gbps") > 0.0, "{r:#}");
        assert!(median(r, "cpu_s_per_gbit") > 0.0, "{r:#}");
        assert!(median(r, "gbps_ratio_to_outrelay") > 0.0, "{r:#}");
        assert!(median(r, "cpu_s_per_gbit_ratio_to_outrelay") > 0.0, "{r:#}");
        assert!(median(r, "helpers_cpu_s_per_gbit") > 0.0, "{r:#}");
    }
    // The forwarded row's relay CPU is its two relays', each also reported apart.
    let forward = row(&doc, "mesh-forward");
    let each =
        median(forward, "relay_1_cpu_s_per_gbit") + median(forward, "relay_2_cpu_s_per_gbit");
    assert!(each > 0.0, "{forward:#}");
    assert!(row(&doc, "outrelay")["cells"]["relay_1_cpu_s_per_gbit"].is_null());
    // The fallback row reports the relay's tunnel queue drops; the QUIC rows have none.
    assert!(median(row(&doc, "fallback"), "tunnel_drops") >= 0.0);
    assert!(row(&doc, "outrelay")["cells"]["tunnel_drops"].is_null());
    assert!(md.contains("| mesh-forward | 1 stream |"), "{md}");
    assert!(md.contains("| fallback | 1 stream |"), "{md}");
    assert!(md.contains("CPU per Gbit x outrelay"), "{md}");
}

/// Issue 22: `failover --quick` stops relay 1 under two HA agents four times (kill -9, SIGTERM
/// with GOAWAY, twice) and times the first new stream through the consumer after each stop;
/// every stop is a sample of its row, the relay comes back on its port in between (or the run
/// fails). Targets other than outrelay are skipped.
#[test]
fn failover_quick_stops_the_consumers_relay_both_ways_and_times_the_first_new_stream() {
    let controller =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/outrelay-controller");
    if !controller.exists() {
        eprintln!(
            "SKIP failover_quick_stops_the_consumers_relay_both_ways_and_times_the_first_new_stream: \
             {} not built (cargo build --release -p outrelay-controller)",
            controller.display()
        );
        return;
    }
    let (md, _stderr, doc) =
        harness_json(&["run", "failover", "--targets", "direct,outrelay", "--quick"]);
    let r = row(&doc, "outrelay");
    assert!(r["status"].is_null(), "outrelay not measured: {r:#}");
    let stops: Vec<&Value> = doc["result"]["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter(|s| s["target"] == "outrelay")
        .collect();
    assert_eq!(stops.len(), 4, "one sample per stop: {doc:#}");
    for variant in ["kill -9 of relay 1", "SIGTERM of relay 1 (GOAWAY, drain)"] {
        let n = stops.iter().filter(|s| s["variant"] == variant).count();
        assert_eq!(n, 2, "{variant}: {doc:#}");
    }
    for k in &stops {
        let m = &k["metrics"];
        assert!(
            m["new_stream_ms"].as_f64().expect("new_stream_ms") > 0.0,
            "{k:#}"
        );
        assert!(m["restart_ms"].as_f64().expect("restart_ms") > 0.0, "{k:#}");
        assert!(m["rejoin_ms"].as_f64().expect("rejoin_ms") >= 0.0, "{k:#}");
        assert!(m["reopened"].as_f64().expect("reopened") >= 0.0, "{k:#}");
        assert_eq!(m["quic_idle_timeout_ms"].as_f64(), Some(2000.0), "{k:#}");
    }
    assert!(
        row(&doc, "direct")["status"]
            .as_str()
            .is_some_and(|s| s.contains("not available")),
        "{doc:#}"
    );
    assert!(md.contains("| outrelay | kill -9 of relay 1 |"), "{md}");
    assert!(
        md.contains("| outrelay | SIGTERM of relay 1 (GOAWAY, drain) |"),
        "{md}"
    );
    assert!(md.contains("QUIC idle timeout 2000 ms"), "{md}");
}

#[test]
fn abuse_quick_mounts_one_attack_and_measures_the_client_with_and_without_it() {
    // The workspace test run builds the controller, relay, agent and CLI first; a run of this
    // crate alone may not have the controller.
    let controller =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/outrelay-controller");
    if !controller.exists() {
        eprintln!(
            "SKIP abuse_quick_mounts_one_attack_and_measures_the_client_with_and_without_it: \
             {} not built (cargo build --release -p outrelay-controller)",
            controller.display()
        );
        return;
    }
    let (md, _stderr, doc) = harness_json(&["run", "abuse", "--quick", "--attacks", "slowloris"]);
    let rows = doc["result"]["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "one attack, one row: {doc:#}");
    let r = &rows[0];
    assert!(r["status"].is_null(), "outrelay not measured: {r:#}");
    assert_eq!(r["variant"], "slowloris");
    // Both windows ran and the attack was mounted; figures themselves are not asserted.
    assert!(median(r, "base_conn_per_s") > 0.0, "{r:#}");
    assert!(median(r, "attacked_conn_per_s") >= 0.0, "{r:#}");
    assert!(median(r, "ratio").is_finite(), "{r:#}");
    assert!(median(r, "attack_units") > 0.0, "{r:#}");
    assert!(median(r, "peak_rss_mib") > 0.0, "{r:#}");
    assert!(md.contains("| outrelay | slowloris |"), "{md}");
    assert!(
        md.contains("- verdict (medians over rounds): slowloris (H2) "),
        "{md}"
    );
}

/// Issue 17's lease range in small: every port of a 40-port range leased over one agent
/// connection, on both paths, and 5 grants timed to their first accepted connect.
#[test]
fn leases_quick_leases_every_port_of_the_range_and_times_grant_to_route() {
    let (md, _stderr, doc) = harness_json(&[
        "run",
        "leases",
        "--quick",
        "--lease-ports",
        "40",
        "--grants",
        "5",
        "--relay-workers",
        "1",
    ]);
    let rows = doc["result"]["rows"].as_array().expect("rows");
    let cell = |path: &str, variant: &str, key: &str| -> f64 {
        let r = rows
            .iter()
            .find(|r| r["path"] == path && r["variant"] == variant)
            .unwrap_or_else(|| panic!("no {path} {variant} row: {doc:#}"));
        median(r, key)
    };
    for path in ["tcp", "tcp+udp"] {
        // The range is far below the open-file limit: every port is leased, none is missing.
        assert_eq!(cell(path, "all leases", "leases"), 40.0, "{doc:#}");
        assert!(cell(path, "all leases", "fds") > 0.0);
        assert!(cell(path, "all leases", "rss_mib") > 0.0);
        let p50 = cell(path, "grant -> routable", "route_p50_ms");
        assert!(p50 >= 0.0 && p50 <= cell(path, "grant -> routable", "route_max_ms"));
        let at_grant = cell(path, "grant -> routable", "routable_at_grant_pct");
        assert!((0.0..=100.0).contains(&at_grant), "{at_grant}");
    }
    // Only the tcp+udp path binds UDP ports (one per lease without sk_lookup, none with it).
    assert_eq!(cell("tcp", "all leases", "udp_sockets"), 0.0);
    assert!(
        md.contains("| outrelay | w=1 | tcp+udp | all leases | 40 |"),
        "{md}"
    );
}

/// Whether the relay's eBPF programs can load here; prints a loud SKIP line for `test` when
/// not (the `--relay-ebpf` setups other than `off` say `mode = "on"` and would fail to start).
fn bpf_or_skip(test: &str) -> bool {
    match outrelay_ebpf::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIP {test}: no CAP_BPF/BPF here ({e})");
            false
        }
    }
}

/// Issue 17's l1 in small: the same range with plain listeners and with sk_lookup.
#[test]
fn leases_with_sk_lookup_hold_no_listener_per_port_and_route_at_grant() {
    if !bpf_or_skip("leases_with_sk_lookup_hold_no_listener_per_port_and_route_at_grant") {
        return;
    }
    let (md, _stderr, doc) = harness_json(&[
        "run",
        "leases",
        "--quick",
        "--lease-ports",
        "40",
        "--grants",
        "5",
        "--relay-workers",
        "2",
        "--relay-ebpf",
        "off,lookup",
    ]);
    let rows = doc["result"]["rows"].as_array().expect("rows");
    let cell = |setup: &str, path: &str, variant: &str, key: &str| -> f64 {
        let r = rows
            .iter()
            .find(|r| r["setup"] == setup && r["path"] == path && r["variant"] == variant)
            .unwrap_or_else(|| panic!("no {setup} {path} {variant} row: {doc:#}"));
        median(r, key)
    };
    for path in ["tcp", "tcp+udp"] {
        for setup in ["w=2 ebpf=off", "w=2 ebpf=lookup"] {
            assert_eq!(cell(setup, path, "all leases", "leases"), 40.0, "{doc:#}");
        }
        // Plain: one listener per worker per port. sk_lookup: none on the range's ports, and
        // the port map is updated before the grant goes out.
        assert_eq!(
            cell("w=2 ebpf=off", path, "all leases", "tcp_listeners"),
            80.0
        );
        assert_eq!(
            cell("w=2 ebpf=lookup", path, "all leases", "tcp_listeners"),
            0.0
        );
        assert_eq!(
            cell(
                "w=2 ebpf=lookup",
                path,
                "grant -> routable",
                "routable_at_grant_pct"
            ),
            100.0
        );
    }
    // Fewer descriptors than the plain relay's 2 per lease; not 0: with 40 leases a few fds the
    // relay opens meanwhile (a scrape, a QUIC path) move the figure (0.5 failed once in CI).
    let fds = cell("w=2 ebpf=lookup", "tcp", "all leases", "fds_per_lease");
    assert!(fds < 1.0, "{fds} fds per lease with sk_lookup: {doc:#}");
    assert!(
        md.contains("| outrelay | w=2 ebpf=lookup | tcp | all leases | 40 |"),
        "{md}"
    );
}

/// Issue 17's r1 in small: the SNI path with and without the CPU-local accept program, the
/// setups compared with the first.
#[test]
fn connrate_runs_each_ebpf_setup_and_compares_with_the_first() {
    if !bpf_or_skip("connrate_runs_each_ebpf_setup_and_compares_with_the_first") {
        return;
    }
    let (md, _stderr, doc) = harness_json(&[
        "run",
        "connrate",
        "--targets",
        "outrelay",
        "--paths",
        "sni",
        "--relay-workers",
        "2",
        "--relay-ebpf",
        "off,reuseport",
        "--quick",
    ]);
    let rows = doc["result"]["rows"].as_array().expect("rows");
    let setups: Vec<&str> = rows.iter().filter_map(|r| r["setup"].as_str()).collect();
    assert_eq!(setups, ["w=2 ebpf=off", "w=2 ebpf=reuseport"], "{doc:#}");
    for r in rows {
        assert!(r["status"].is_null(), "not measured: {r:#}");
        assert!(median(r, "conn_per_s") > 0.0);
        assert_eq!(median(r, "errors"), 0.0);
    }
    assert_eq!(median(&rows[0], "conn_per_s_ratio_to_first_setup"), 1.0);
    assert!(median(&rows[1], "relay_cpu_us_per_conn_ratio_to_first_setup") > 0.0);
    assert!(md.contains("CPU/conn x first setup"), "{md}");
}

#[test]
fn list_shows_every_scenario_and_target() {
    let out = harness(&["list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "bulk",
        "bulk-sni",
        "connrate",
        "latency",
        "idle-memory",
        "udp",
        "mesh",
        "abuse",
        "leases",
        "direct",
        "haproxy",
        "haproxy-chain",
        "nginx",
        "rathole",
        "socat",
        "outrelay",
        "quinn-direct",
        "upgrade",
        "haproxy-classic",
        "mesh-forward",
        "fallback",
        "failover",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}

/// Every installed peer starts from its template, relays, and (HAProxy, nginx) routes the
/// connrate ClientHello on SNI. Missing peers are skipped loudly.
#[test]
fn installed_peers_relay_and_route_on_sni() {
    let peers = [
        ("haproxy", "haproxy"),
        ("haproxy-chain", "haproxy"),
        ("nginx", "nginx"),
        ("rathole", "rathole"),
        ("socat", "socat"),
    ];
    let mut present = Vec::new();
    for (target, binary) in peers {
        let installed = Command::new("sh")
            .args([
                "-c",
                &format!("command -v {binary} || test -x \"$HOME/.cargo/bin/{binary}\""),
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        let module_ok =
            target != "nginx" || Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists();
        if installed && module_ok {
            present.push(target);
        } else {
            eprintln!(
                "SKIPPED peer {target}: {binary} (or its stream module) is not installed; \
                 run `outrelay-bench run latency --install-peers` to install it"
            );
        }
    }
    if present.is_empty() {
        eprintln!("SKIPPED installed_peers_relay_and_route_on_sni: no peer installed");
        return;
    }
    let targets = format!("direct,{}", present.join(","));
    let (_, _, doc) = harness_json(&[
        "run",
        "latency",
        "--targets",
        &targets,
        "--quick",
        "--round-trips",
        "200",
    ]);
    for target in &present {
        assert!(median(row(&doc, target), "p50_us") > 0.0, "{target}");
    }
    let (_, _, doc) = harness_json(&[
        "run",
        "connrate",
        "--targets",
        &targets,
        "--quick",
        "--concurrency",
        "4",
    ]);
    for target in &present {
        let r = row(&doc, target);
        assert!(r["status"].is_null(), "{target} failed: {r:#}");
        assert!(median(r, "conn_per_s") > 0.0, "{target}");
        let sni = target.starts_with("haproxy") || *target == "nginx";
        assert_eq!(
            median(r, "sni_routed"),
            if sni { 1.0 } else { 0.0 },
            "{target}"
        );
    }
}

/// The row of `target` on `path` (`sni`, `tcp`).
fn row_on<'a>(doc: &'a Value, target: &str, path: &str) -> &'a Value {
    doc["result"]["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["target"] == target && r["path"] == path)
        .unwrap_or_else(|| panic!("no row for {target} {path}: {doc:#}"))
}

/// Whether `binary` is on the PATH.
fn installed(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Checks one upgrade row: measured, every probe counted once, a hand-over time, both
/// latency windows filled.
fn assert_upgrade_row(doc: &Value, target: &str, path: &str, rate: f64) {
    let r = row_on(doc, target, path);
    assert!(r["status"].is_null(), "{target} {path} failed: {r:#}");
    assert_eq!(median(r, "rate_per_s"), rate, "{r:#}");
    let probes = median(r, "probes");
    // 1 s before, the hand-over, 2 s after it (--quick): at least 3 s of probes.
    assert!(probes >= rate * 2.0, "{probes} probes at {rate}/s: {r:#}");
    assert!(
        median(r, "refused") + median(r, "failed") <= probes,
        "{r:#}"
    );
    assert!(median(r, "upgrade_ms") > 0.0, "{r:#}");
    assert!(
        median(r, "p99_before_us") >= median(r, "p50_before_us"),
        "{r:#}"
    );
    assert!(
        median(r, "p99_during_us") >= median(r, "p50_during_us"),
        "{r:#}"
    );
    assert!(median(r, "p99_bump") > 0.0, "{r:#}");
}

/// HAProxy's seamless reload (master-worker, expose-fd listeners) and its classic one (-sf)
/// under an open-loop load on both paths. Skipped loudly without haproxy.
#[test]
fn upgrade_quick_reloads_haproxy_both_ways_under_load() {
    if !installed("haproxy") {
        eprintln!(
            "SKIPPED upgrade_quick_reloads_haproxy_both_ways_under_load: haproxy is not \
             installed; run `outrelay-bench run latency --install-peers` to install it"
        );
        return;
    }
    let (md, _, doc) = harness_json(&[
        "run",
        "upgrade",
        "--targets",
        "haproxy,haproxy-classic",
        "--quick",
        "--rate",
        "200",
    ]);
    for target in ["haproxy", "haproxy-classic"] {
        for path in ["sni", "tcp"] {
            assert_upgrade_row(&doc, target, path, 200.0);
            // HAProxy has no agents and no UDP lease: those cells stay empty.
            let r = row_on(&doc, target, path);
            assert!(r["cells"]["agents_moved_ms"].is_null(), "{r:#}");
            assert!(r["cells"]["udp_sent"].is_null(), "{r:#}");
        }
    }
    assert!(md.contains("| haproxy | sni | open loop | 200 |"), "{md}");
    assert!(
        md.contains("| haproxy-classic | tcp | open loop | 200 |"),
        "{md}"
    );
    assert!(md.contains("expose-fd listeners"), "{md}");
}

/// OutRelay's hand-over (`outrelay-relay upgrade`) under load on both paths, with the UDP
/// lease pinged and the agent followed to the new process. Needs a relay build with the
/// `upgrade` command (issue 20); skipped loudly without one.
#[test]
fn upgrade_quick_hands_outrelay_over_and_follows_its_agent() {
    let relay = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/outrelay-relay");
    let has_upgrade = Command::new(&relay)
        .args(["upgrade", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_upgrade {
        eprintln!(
            "SKIPPED upgrade_quick_hands_outrelay_over_and_follows_its_agent: {} has no \
             `upgrade` command (build a relay with issue 20's hand-over: cargo build --release \
             -p outrelay-relay -p outrelay-agent -p outrelay-cli)",
            relay.display()
        );
        return;
    }
    let (_, _, doc) = harness_json(&[
        "run",
        "upgrade",
        "--targets",
        "outrelay",
        "--quick",
        "--rate",
        "200",
    ]);
    for path in ["sni", "tcp"] {
        assert_upgrade_row(&doc, "outrelay", path, 200.0);
        let r = row_on(&doc, "outrelay", path);
        assert!(median(r, "agents_moved_ms") > 0.0, "{r:#}");
        let sent = median(r, "udp_sent");
        // A datagram every millisecond for more than 3 s.
        assert!(sent > 1_000.0, "{r:#}");
        assert!(median(r, "udp_lost") <= sent, "{r:#}");
    }
}
