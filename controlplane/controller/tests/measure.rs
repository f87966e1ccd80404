//! Measurements, not assertions (machines here are shared and noisy). Run with:
//! `cargo test --release -p outrelay-controller --test measure -- --ignored --nocapture`

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Controller;
use outrelay_api::pb::{self, audit_client::AuditClient, policy_client::PolicyClient};
use outrelay_controller::pki::LeafProfile;

const RUN: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn durable_writes_per_second_and_watch_fanout() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let relay = c.cert("outrelay://eu/relay/r1", LeafProfile::ClientServer);
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(c.channel(Some(&relay)).await);
    }
    for writers in [1usize, 16, 64] {
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (ch, done) = (channels[w % channels.len()].clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut client = AuditClient::new(ch);
                while start.elapsed() < RUN {
                    let ev = pb::AuditEvent {
                        tenant: "acme".into(),
                        caller: "c".into(),
                        target: "t".into(),
                        decision: pb::Decision::Allow as i32,
                        ..Default::default()
                    };
                    client
                        .record(pb::RecordRequest { event: Some(ev) })
                        .await
                        .expect("record");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
        let n = done.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        let rate = n as f64 / start.elapsed().as_secs_f64();
        println!(
            "durable acknowledged writes (Audit.Record over mTLS gRPC, synchronous=FULL, group commit): {writers:>2} writers: {rate:>8.0}/s ({n} in {:.1}s)",
            start.elapsed().as_secs_f64()
        );
    }

    // Watch fan-out: 100 relays watching policy; time from AddPolicy call to each delivery.
    let admin = c.cert("outrelay://system/admin/ops", LeafProfile::Client);
    let mut policy = PolicyClient::new(c.channel(Some(&admin)).await);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    for i in 0..100 {
        let ch = channels[i % channels.len()].clone();
        let tx = tx.clone();
        let mut stream = PolicyClient::new(ch)
            .watch(pb::WatchPoliciesRequest {
                tenant: String::new(),
            })
            .await
            .expect("watch")
            .into_inner();
        loop {
            let ev = stream.message().await.expect("ev").expect("some");
            if ev.kind == pb::policy_event::Kind::SnapshotEnd as i32 {
                break;
            }
        }
        tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.message().await {
                if let Some(r) = ev.rule {
                    let _ = tx.send((r.id, Instant::now()));
                }
            }
        });
    }
    let mut lat_us: Vec<u128> = Vec::new();
    for i in 0..50 {
        let id = format!("fanout-{i}");
        let t0 = Instant::now();
        policy
            .add_policy(pb::AddPolicyRequest {
                rule: Some(pb::PolicyRule {
                    id: id.clone(),
                    tenant: "acme".into(),
                    caller_pattern: "*".into(),
                    target_pattern: "x".into(),
                    decision: 1,
                    ..Default::default()
                }),
            })
            .await
            .expect("add");
        let mut got = 0;
        while got < 100 {
            let (rid, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("delivery")
                .expect("open");
            if rid == id {
                lat_us.push(at.duration_since(t0).as_micros());
                got += 1;
            }
        }
    }
    lat_us.sort_unstable();
    let pct = |p: usize| lat_us[(lat_us.len() * p / 100).min(lat_us.len() - 1)];
    println!(
        "policy change to 100 watchers (AddPolicy call incl. durable commit -> delivery), {} samples: p50 {} us, p99 {} us, max {} us",
        lat_us.len(),
        pct(50),
        pct(99),
        lat_us[lat_us.len() - 1]
    );
}

/// The admin's write path with and without an unauthenticated flood, in the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn admin_writes_with_and_without_an_anonymous_flood() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let admin = c.cert("outrelay://system/admin/ops", LeafProfile::Client);
    let mut policy = PolicyClient::new(c.channel(Some(&admin)).await);
    let mut pki = pb::pki_client::PkiClient::new(c.channel(Some(&admin)).await);
    let rss_kib = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let mut n = 0u32;
    for flood in [false, true] {
        let f = if flood {
            Some(common::Flood::start(&c).await)
        } else {
            None
        };
        let jobs0 = c.metric("outrelay_controller_store_jobs_total").await;
        let start = Instant::now();
        let mut lat_us = Vec::new();
        while start.elapsed() < RUN {
            let t = Instant::now();
            policy
                .add_policy(pb::AddPolicyRequest {
                    rule: Some(pb::PolicyRule {
                        tenant: "acme".into(),
                        caller_pattern: "*".into(),
                        target_pattern: format!("m{n}"),
                        decision: 1,
                        ..Default::default()
                    }),
                })
                .await
                .expect("add");
            pki.revoke(pb::RevokeRequest {
                uri: format!("outrelay://acme/agent/00000000-0000-4000-8000-{n:012x}"),
            })
            .await
            .expect("revoke");
            lat_us.push(t.elapsed().as_micros());
            n += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        let rss = rss_kib(c.child.id());
        let hostile = match f {
            Some(f) => f.stop().await,
            None => 0,
        };
        let jobs = c.metric("outrelay_controller_store_jobs_total").await - jobs0;
        lat_us.sort_unstable();
        let pct = |p: usize| lat_us[(lat_us.len() * p / 100).min(lat_us.len() - 1)];
        #[allow(clippy::cast_precision_loss)]
        let rate = lat_us.len() as f64 / secs;
        #[allow(clippy::cast_precision_loss)]
        let hostile_rate = hostile as f64 / secs;
        println!(
            "flood={flood}: admin AddPolicy+Revoke {rate:.0} pairs/s, p50 {} us, p99 {} us; hostile {hostile_rate:.0}/s; store jobs {jobs}; controller RSS {rss} KiB",
            pct(50),
            pct(99),
        );
    }
    let auth = c
        .metric("outrelay_controller_refusal_audit_rows_total")
        .await;
    println!("aggregated refusal audit rows written over the whole run: {auth}");
}
