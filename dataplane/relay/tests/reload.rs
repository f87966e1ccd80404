//! Issue 20 (R): `systemctl reload` (SIGHUP) of the REAL relay binary applies every setting
//! that needs no new socket to new connections, streams and leases, as one validated snapshot,
//! while what is established keeps going. An invalid file changes nothing and says why; a
//! changed listen address is logged `needs_upgrade` and changes nothing. (A new certificate
//! served to new clients while an old connection keeps going: `identity.rs`,
//! `sighup_serves_replaced_certificate_files`.)

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use outrelay_proto::frame::Frame;
use outrelay_proto::orp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));

/// A tenant-`a` agent identity numbered `n`.
fn uri(n: u8) -> String {
    format!("outrelay://a/agent/00000000-0000-4000-8000-0000000000{n:02x}")
}

/// Replaces `from` (which must be there) with `to` in the relay's config file, by rename.
fn edit(relay: &Relay, from: &str, to: &str) {
    let path = relay.dir.path().join("relay.toml");
    let text = std::fs::read_to_string(&path).expect("read relay.toml");
    assert!(text.contains(from), "relay.toml has {from:?}:\n{text}");
    let tmp = relay.dir.path().join("relay.toml.tmp");
    std::fs::write(&tmp, text.replacen(from, to, 1)).expect("write relay.toml");
    std::fs::rename(&tmp, &path).expect("rename relay.toml");
}

fn sighup(relay: &Relay) {
    let pid = i32::try_from(relay.child.id()).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
}

/// Waits until `series` reads `value`.
async fn wait_for(relay: &Relay, series: &str, value: f64) {
    let start = Instant::now();
    loop {
        let now = relay.metric(series).await;
        if (now - value).abs() < f64::EPSILON {
            return;
        }
        assert!(start.elapsed() < WAIT, "{series} is {now}, never {value}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// SIGHUP, then waits for the outcome: `Some(generation)` for an accepted file (the gauge
/// reaches it), `None` for a refused one (`result="error"` moves).
async fn reload(relay: &Relay, accepted: Option<f64>) {
    let refused = relay
        .metric("outrelay_config_reloads_total{result=\"error\"}")
        .await;
    sighup(relay);
    match accepted {
        Some(generation) => {
            wait_for(relay, "outrelay_relay_config_generation", generation).await;
        }
        None => {
            wait_for(
                relay,
                "outrelay_config_reloads_total{result=\"error\"}",
                refused + 1.0,
            )
            .await;
        }
    }
}

fn log_of(relay: &Relay) -> String {
    std::fs::read_to_string(relay.dir.path().join("relay.log")).unwrap_or_default()
}

/// Waits until the relay's log has a line with every one of `words`; returns that line.
async fn log_line(relay: &Relay, words: &[&str]) -> String {
    let start = Instant::now();
    loop {
        if let Some(line) = log_of(relay)
            .lines()
            .find(|l| words.iter().all(|w| l.contains(w)))
        {
            return line.to_owned();
        }
        assert!(
            start.elapsed() < WAIT,
            "no log line with {words:?}:\n{}",
            log_of(relay)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `ping` through a spliced echo connection, and the echo back.
async fn ping(c: &mut TcpStream) -> Result<(), String> {
    c.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, c.read_exact(&mut back))
        .await
        .map_err(|_| "no echo in time".to_owned())?
        .map_err(|e| e.to_string())?;
    if &back == b"ping" {
        Ok(())
    } else {
        Err(format!("echoed {back:?}"))
    }
}

/// `ingress.source_conn_max` lowered by reload: the next public connection from the source
/// over the new cap is refused (`source_conn_limit`) while the two established ones keep
/// echoing; raised back, a new one is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_source_cap_refuses_the_next_connection_and_keeps_the_live_ones() {
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            ingress: "source_conn_max = 1024\n".to_owned(),
            ..Opts::default()
        },
    )
    .await;
    let (echo, _e) = echo_server().await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let raw = agent.register("raw", false, true).await;
    let port = lease_port(&raw);
    agent.serve_lease_with(&relay, &raw, echo, 8);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect_lease_port(LOCAL, port).await;
        ping(&mut c).await.expect("served before the reload");
        held.push(c);
    }

    edit(&relay, "source_conn_max = 1024", "source_conn_max = 2");
    reload(&relay, Some(2.0)).await;
    let mut over = connect_lease_port(LOCAL, port).await;
    assert!(
        ping(&mut over).await.is_err(),
        "a third connection from the source was served over the reloaded cap of 2"
    );
    relay.metric_above(&drops("source_conn_limit"), 0.0).await;
    for c in &mut held {
        ping(c)
            .await
            .expect("an established connection keeps going");
    }

    edit(&relay, "source_conn_max = 2", "source_conn_max = 1024");
    reload(&relay, Some(3.0)).await;
    let mut again = connect_lease_port(LOCAL, port).await;
    ping(&mut again)
        .await
        .expect("served once the cap is raised back");
    for c in &mut held {
        ping(c).await.expect("still going");
    }
}

/// `ingress.claim_timeout_ms` lowered by reload reaches the workers: a public connection to a
/// lease with no idle session waits the old 5 s before the reload and is refused
/// (`claim_timeout`) well before that after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_claim_timeout_reaches_the_workers() {
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            claim_timeout_ms: Some(5000),
            ..Opts::default()
        },
    )
    .await;
    let mut agent = Agent::connect(&relay, &ca).await;
    // No reverse session is ever offered: every claim waits for its timeout.
    let raw = agent.register("raw", false, true).await;
    let port = lease_port(&raw);
    let mut before = connect_lease_port(LOCAL, port).await;
    assert!(
        !closed_within(&mut before, Duration::from_millis(1500)).await,
        "claim_timeout_ms = 5000 holds a waiting claim for more than 1.5 s"
    );
    let timeouts = relay.metric(&drops("claim_timeout")).await;

    edit(&relay, "claim_timeout_ms = 5000", "claim_timeout_ms = 200");
    reload(&relay, Some(2.0)).await;
    let mut after = connect_lease_port(LOCAL, port).await;
    let started = Instant::now();
    assert!(
        closed_within(&mut after, Duration::from_millis(3000)).await,
        "after the reload a waiting claim still outlives 3 s (claim_timeout_ms = 200)"
    );
    eprintln!("claim refused {:?} after connect", started.elapsed());
    relay.metric_above(&drops("claim_timeout"), timeouts).await;
}

/// Standalone `[[policy]]` changed by reload: an open that was allowed is refused after, and
/// allowed again when the rule is put back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_static_policy_denies_an_open_that_was_allowed() {
    let ca = Ca::new();
    let relay = start_relay_with(
        &ca,
        Opts {
            tables: "[[policy]]\ntenant = \"a\"\ncaller = \"*\"\ntarget = \"echo\"\n\
                     decision = \"allow\"\n"
                .to_owned(),
            ..Opts::default()
        },
    )
    .await;
    let mut provider = Agent::connect_as(&relay, &ca, &uri(1)).await;
    provider.provide("echo").await;
    provider.serve_streams(true);
    let consumer = Agent::connect_as(&relay, &ca, &uri(2)).await;
    let (answer, mut send, mut recv) = consumer.open_stream("echo", "", 1).await;
    assert_eq!(
        answer,
        Frame::StreamAccept(orp::StreamAccept::default()),
        "allowed before the reload"
    );
    let (n, sent, got) = echo_through(&mut send, &mut recv, 4096, 1).await;
    assert_eq!((n, &got), (4096, &sent), "echo before the reload");
    drop((send, recv));

    edit(&relay, "decision = \"allow\"", "decision = \"deny\"");
    reload(&relay, Some(2.0)).await;
    let (answer, _, _) = consumer.open_stream("echo", "", 2).await;
    assert!(
        matches!(answer, Frame::StreamReject(_)),
        "denied after the reload, got {answer:?}"
    );

    edit(&relay, "decision = \"deny\"", "decision = \"allow\"");
    reload(&relay, Some(3.0)).await;
    let (answer, _, _) = consumer.open_stream("echo", "", 3).await;
    assert_eq!(
        answer,
        Frame::StreamAccept(orp::StreamAccept::default()),
        "allowed again"
    );
}

/// An invalid file changes nothing and says why (a log line naming the key, the error
/// counter, the generation stays); the next valid one applies: `quic.max_connections_per_identity`
/// lowered to 1 refuses the next connection of an identity that holds two, which stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_changes_nothing_and_the_next_valid_one_applies() {
    let ca = Ca::new();
    let relay = start_relay_with(
        &ca,
        Opts {
            tables: "[quic]\nmax_connections_per_identity = 8\n".to_owned(),
            log_file: true,
            ..Opts::default()
        },
    )
    .await;
    let me = uri(1);
    let first = Agent::connect_as(&relay, &ca, &me).await;
    let second = Agent::connect_as(&relay, &ca, &me).await;

    // Both changes in one file, one of them invalid: neither applies.
    edit(
        &relay,
        "max_connections_per_identity = 8",
        "max_connections_per_identity = 1",
    );
    edit(
        &relay,
        "keepalive_interval_ms = 1000",
        "keepalive_interval_ms = 5",
    );
    reload(&relay, None).await;
    let line = log_line(&relay, &["config reload refused", "keepalive_interval_ms"]).await;
    eprintln!("refusal: {line}");
    assert_eq!(
        relay.metric("outrelay_relay_config_generation").await,
        1.0,
        "the generation stays"
    );
    let third = Agent::try_connect_as(&relay, &ca, &me)
        .await
        .expect("the refused file's cap of 1 is not in force");
    drop(third);

    edit(
        &relay,
        "keepalive_interval_ms = 5",
        "keepalive_interval_ms = 1000",
    );
    reload(&relay, Some(2.0)).await;
    log_line(
        &relay,
        &["config reloaded", "quic.max_connections_per_identity"],
    )
    .await;
    let start = Instant::now();
    let why = loop {
        // The third connection's slot is given back when the relay sees its close.
        match Agent::try_connect_as(&relay, &ca, &me).await {
            Err(why) => break why,
            Ok(extra) => drop(extra),
        }
        assert!(
            start.elapsed() < WAIT,
            "the reloaded cap of 1 never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        why.contains("13"),
        "closed with TOO_MANY_CONNECTIONS (13): {why}"
    );
    assert!(
        first.conn.close_reason().is_none() && second.conn.close_reason().is_none(),
        "the established connections over the new cap stay"
    );
    let status = admin_status(&relay).await;
    assert_eq!(status["config"]["generation"], 2, "status: {status}");
    assert!(
        status["config"]["applied_at_unix_ms"].as_i64().unwrap_or(0) > 0,
        "status: {status}"
    );
}

/// A changed listen address is logged `needs_upgrade` and changes nothing: the old listener
/// still serves, the valid rest of the file is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_listen_address_needs_an_upgrade_and_changes_nothing() {
    let ca = Ca::new();
    let relay = start_relay_with(
        &ca,
        Opts {
            log_file: true,
            ..Opts::default()
        },
    )
    .await;
    let (tls, _t) = tls_target(&ca).await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let demo = agent.register("demo", true, false).await;
    agent.serve_lease(&relay, &demo, tls);
    let body = https_get(&relay, &ca, DEMO_HOST, "/")
        .await
        .expect("served before the reload");
    assert!(body.contains(BODY), "{body}");

    edit(
        &relay,
        "public_tls = \"127.0.0.1:0\"",
        "public_tls = \"127.0.0.2:0\"",
    );
    reload(&relay, Some(2.0)).await;
    let line = log_line(&relay, &["needs_upgrade", "listen.public_tls"]).await;
    eprintln!("logged: {line}");
    assert!(
        !line.contains("needs_restart"),
        "the relay says upgrade, not restart: {line}"
    );
    let body = https_get(&relay, &ca, DEMO_HOST, "/")
        .await
        .expect("the old listener still serves");
    assert!(body.contains(BODY), "{body}");
}

async fn admin_status(relay: &Relay) -> serde_json::Value {
    let path = relay.dir.path().join("admin.sock");
    let mut s = tokio::net::UnixStream::connect(&path)
        .await
        .expect("admin socket");
    s.write_all(b"status\n").await.expect("command");
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .expect("status in time")
        .expect("read status");
    serde_json::from_str(&out).expect("status is JSON")
}

/// `[splice] idle_timeout_ms` lowered by reload reaches every worker's engine: an idle spliced
/// pair that the old hour-long timeout kept is closed by the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_splice_idle_timeout_closes_an_idle_pair() {
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            tables: "[splice]\nidle_timeout_ms = 3600000\n".to_owned(),
            ..Opts::default()
        },
    )
    .await;
    let (echo, _e) = echo_server().await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let raw = agent.register("raw", false, true).await;
    let port = lease_port(&raw);
    agent.serve_lease_with(&relay, &raw, echo, 4);
    let mut idle = connect_lease_port(LOCAL, port).await;
    ping(&mut idle).await.expect("spliced");
    assert!(
        !closed_within(&mut idle, Duration::from_millis(1000)).await,
        "an hour-long idle timeout closed a pair within a second"
    );

    edit(&relay, "idle_timeout_ms = 3600000", "idle_timeout_ms = 300");
    reload(&relay, Some(2.0)).await;
    assert!(
        closed_within(&mut idle, Duration::from_millis(5000)).await,
        "the reloaded idle timeout of 300 ms never closed the idle pair"
    );
}

/// `[log] level` changed by reload: at `warn` the info line of the next reload is not written;
/// back at `info` it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_log_level_applies() {
    let ca = Ca::new();
    let relay = start_relay_with(
        &ca,
        Opts {
            tables: "[log]\nlevel = \"info\"\n".to_owned(),
            log_file: true,
            ..Opts::default()
        },
    )
    .await;
    log_line(&relay, &["relay ready"]).await;
    let reloaded = |relay: &Relay| {
        log_of(relay)
            .lines()
            .filter(|l| l.contains("config reloaded"))
            .count()
    };
    edit(&relay, "level = \"info\"", "level = \"warn\"");
    reload(&relay, Some(2.0)).await;
    edit(&relay, "claim_timeout_ms = 5000", "claim_timeout_ms = 4000");
    reload(&relay, Some(3.0)).await;
    assert_eq!(
        reloaded(&relay),
        0,
        "info lines written at level warn:\n{}",
        log_of(&relay)
    );
    edit(&relay, "level = \"warn\"", "level = \"info\"");
    reload(&relay, Some(4.0)).await;
    log_line(&relay, &["config reloaded", "log.level"]).await;
    assert_eq!(reloaded(&relay), 1, "{}", log_of(&relay));
}
