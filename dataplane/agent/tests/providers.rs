//! Several providers of one service (issue 22, item 4), with the REAL binaries (the world of
//! `common/world.rs`): two agents of different identities provide `payments` on one relay (a
//! provide rule allows both), each target answering with its own name; a consumer's calls are
//! spread over both (least active streams, ties in turn), `outrelay services list` shows both,
//! and after one is killed (-9) every call reaches the survivor: before the relay notices,
//! a stream the dead provider does not answer is passed on to the survivor.
//!
//! Build the binaries first (`cargo build --release -p outrelay-controller -p outrelay-relay
//! -p outrelay-agent -p outrelay-cli`). Shares are printed as `MEASURED` lines and asserted
//! with generous bounds.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::world::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Calls per round.
const CALLS: usize = 100;
/// Concurrent calls per batch in the concurrent round.
const BATCH: usize = 20;
/// A fair share of [`CALLS`] for either of two providers.
const FAIR: std::ops::RangeInclusive<usize> = 35..=65;

/// An HTTP/1.1 server answering every request with `name` and a newline, then closing.
async fn named_target(name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = listener.local_addr().expect("target addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let body = format!("{name}\n");
            tokio::spawn(async move { outrelay_testkit::answer_http(s, &body).await });
        }
    });
    (addr, task)
}

/// One GET through the consumer at `addr`: the name of the provider whose target answered.
async fn call(addr: SocketAddr) -> Result<String, String> {
    let attempt = async {
        let mut c = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        c.write_all(b"GET / HTTP/1.1\r\nHost: pay\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        c.read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&out).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => {
                Ok(body.trim_end().to_owned())
            }
            _ if text.is_empty() => Err("closed without a response".to_owned()),
            _ => Err(format!("unexpected response {text:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".to_owned()))
}

/// `n` calls one after another: answers per provider name (`"failed"` for a failure).
async fn sequential(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let who = call(addr).await.unwrap_or_else(|e| {
            eprintln!("call failed: {e}");
            "failed".to_owned()
        });
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

/// `n` calls in batches of [`BATCH`] at once: answers per provider name.
async fn concurrent(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n / BATCH {
        let mut set = JoinSet::new();
        for _ in 0..BATCH {
            set.spawn(call(addr));
        }
        while let Some(r) = set.join_next().await {
            let who = r.expect("call task").unwrap_or_else(|e| {
                eprintln!("call failed: {e}");
                "failed".to_owned()
            });
            *seen.entry(who).or_insert(0) += 1;
        }
    }
    seen
}

/// The agents `services list` shows as providers of `acme/payments`.
async fn payment_providers(w: &World) -> Vec<String> {
    let mut agents: Vec<String> = w
        .services(TENANT_A)
        .await
        .into_iter()
        .filter(|p| p["service_id"] == "acme/payments")
        .map(|p| {
            assert_eq!(p["relay_id"], RELAY_ID, "{p}");
            assert_eq!(p["relay_up"], true, "{p}");
            p["agent_uri"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    agents.sort();
    agents
}

/// Live providers of `acme/payments` in the relay's `outrelay relay status --output json`.
async fn relay_status_providers(w: &World) -> u64 {
    let mut cmd = std::process::Command::new(sibling_binary("outrelay"));
    cmd.args(["relay", "status", "--output", "json", "--relay"])
        .arg(format!(
            "unix://{}",
            admin_socket(w.path(), "relay").display()
        ));
    let o = run_blocking(cmd).await;
    assert!(o.status.success(), "relay status: {}", text(&o));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    status["services"]["providers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["tenant"] == TENANT_A && s["service"] == "payments")
        .and_then(|s| s["providers"].as_u64())
        .unwrap_or(0)
}

/// `outrelay policy add --method @provide` allowing `uri` to provide `payments`.
async fn provide_rule(w: &World, uri: &str) {
    w.cli(&[
        "policy",
        "add",
        "--tenant",
        TENANT_A,
        "--caller",
        uri,
        "--target",
        "payments",
        "--method",
        "@provide",
        "--decision",
        "allow",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_providers_share_the_calls_and_the_survivor_takes_all_after_one_dies() {
    // A short open deadline: a stream sent to the killed provider before the relay notices
    // fails fast.
    let w = World::with_relay_config("[mesh]\nopen_timeout_ms = 2000\n").await;
    w.rule(TENANT_A, "*", "payments", "allow", None).await;
    provide_rule(&w, PROVIDER_A).await;
    provide_rule(&w, PROVIDER_A2).await;
    let (t1, _t1) = named_target("p1").await;
    let (t2, _t2) = named_target("p2").await;
    let mut p1 = w.agent("provider-1", PROVIDER_A, &provide("payments", t1));
    let mut p2 = w.agent("provider-2", PROVIDER_A2, &provide("payments", t2));
    p1.ready().await;
    p2.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("payments"));
    consumer.ready().await;
    let addr = consumer.consumer(0);
    let start = Instant::now();
    while let Err(e) = call(addr).await {
        assert!(
            start.elapsed() < POLICY_BOUND,
            "no call succeeded within {POLICY_BOUND:?}: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Both are listed.
    let both = {
        let mut v = vec![PROVIDER_A.to_owned(), PROVIDER_A2.to_owned()];
        v.sort();
        v
    };
    let listed_at = Instant::now();
    loop {
        let listed = payment_providers(&w).await;
        if listed == both {
            break;
        }
        assert!(
            listed_at.elapsed() < WAIT,
            "services list shows {listed:?}, not both providers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(relay_status_providers(&w).await, 2, "relay status");

    // Sequential, then concurrent: each gets a fair share.
    for (round, seen) in [
        ("sequential", sequential(addr, CALLS).await),
        ("concurrent", concurrent(addr, CALLS).await),
    ] {
        let (a, b) = (
            seen.get("p1").copied().unwrap_or(0),
            seen.get("p2").copied().unwrap_or(0),
        );
        println!("MEASURED providers {round}: p1={a} p2={b} of {CALLS} (all: {seen:?})");
        assert_eq!(a + b, CALLS, "{round}: every call answered: {seen:?}");
        assert!(
            FAIR.contains(&a) && FAIR.contains(&b),
            "{round}: unfair split {seen:?}"
        );
    }

    // p1 dies; calls go on while the relay notices (counted), then all reach p2.
    p1.proc.kill9();
    let killed = Instant::now();
    let (mut between_ok, mut between_failed) = (0usize, 0usize);
    loop {
        if payment_providers(&w).await == vec![PROVIDER_A2.to_owned()] {
            break;
        }
        assert!(
            killed.elapsed() < WAIT,
            "the relay did not notice the killed provider within {WAIT:?}"
        );
        match call(addr).await {
            Ok(_) => between_ok += 1,
            Err(e) => {
                eprintln!("call while p1 is dead but listed: {e}");
                between_failed += 1;
            }
        }
    }
    let noticed = killed.elapsed();
    println!(
        "MEASURED provider killed -9: noticed after {} ms; calls meanwhile: {between_ok} ok, \
         {between_failed} failed",
        noticed.as_millis()
    );
    // Until the relay noticed, a stream sent to the dead provider went on to the survivor
    // within the open deadline (the relay's retry), so no call failed.
    let retries = metric(
        &w.relay_scrape(),
        "outrelay_relay_mesh_provider_retries_total",
        &[],
    );
    println!("MEASURED provider retries while p1 was dead but listed: {retries}");
    assert_eq!(
        between_failed, 0,
        "calls failed while the dead provider was listed: the relay must pass them on"
    );
    assert!(
        between_ok < 2 || retries >= 1.0,
        "{between_ok} calls while p1 was listed, none retried: did any go to p1?"
    );
    assert_eq!(
        relay_status_providers(&w).await,
        1,
        "relay status after the kill"
    );
    let after = sequential(addr, CALLS).await;
    println!("MEASURED providers after the kill: {after:?} of {CALLS}");
    assert_eq!(
        after.get("p2").copied(),
        Some(CALLS),
        "every call after the relay noticed must reach the survivor: {after:?}"
    );
}
