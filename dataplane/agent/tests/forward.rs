//! Relay-to-relay forwarding (issue 22, item 2), end to end with real processes: a controller
//! and two relays; the provider is connected only to relay 2, the consumer only to relay 1,
//! so every stream goes consumer → relay 1 → FORWARD_STREAM → relay 2 → provider.
//! Figures are printed as `MEASURED` lines; assertions use generous bounds (shared machine).

mod common;

use common::world::*;

use std::time::{Duration, Instant};

/// A provider of tenant B (local to relay 1 in the failure test).
const PROVIDER_B: &str = "outrelay://globex/agent/00000000-0000-4000-8000-00000000b002";
/// Every agent of tenant B.
const ANY_B: &str = "outrelay://globex/agent/*";
/// Relay 2's id.
const RELAY2_ID: &str = "relay-2";
/// Short timeouts for both relays: a stream open waits 2 s for its answer, a peer connection
/// 1 s (a dead peer answers 502 well within the agents' 5 s open timeout).
const FAST: &str = "[mesh]\nopen_timeout_ms = 2000\n[forward]\nconnect_timeout_ms = 1000\n";

/// utime + stime of `pid` in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Field 14 is the 12th after the name (state is field 3).
    field(11) + field(12)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn ticks_per_s() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The counter `name{labels}` of relay 2 (its metrics address from its ready file).
fn relay2_metric(info: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&scrape(addr_in(info, "metrics")), name, labels)
}

/// One 100 MiB transfer each way through the consumer's `i`-th listener to `echo`'s single
/// connection; asserts equal hashes, returns (seconds up, seconds down).
async fn bulk_both_ways(
    consumer: &Agent,
    i: usize,
    echo: tokio::task::JoinHandle<(u64, Vec<u8>)>,
    bytes: u64,
) -> (f64, f64) {
    let bulk = common::Bulk::start(consumer.consumer(i), bytes).await;
    finish_intact(bulk, echo, bytes).await
}

/// Waits for `bulk` to end; asserts every byte arrived once, in order, both ways (SHA-256 at
/// the target, of the echo, and the target's trailer after our FIN); (seconds up, down).
async fn finish_intact(
    bulk: common::Bulk,
    echo: tokio::task::JoinHandle<(u64, Vec<u8>)>,
    bytes: u64,
) -> (f64, f64) {
    let (sent, sent_hash, write_took, got, got_hash, trailer, read_took) = bulk.finish().await;
    let (echo_total, echo_hash) = tokio::time::timeout(Duration::from_secs(300), echo)
        .await
        .expect("echo finished")
        .expect("echo task");
    assert_eq!(sent, bytes);
    assert_eq!(echo_total, bytes, "the provider's target got every byte");
    assert_eq!(echo_hash, sent_hash, "SHA-256 at the target = SHA-256 sent");
    assert_eq!(got, bytes, "every byte came back");
    assert_eq!(got_hash, sent_hash, "SHA-256 of the echo = SHA-256 sent");
    assert_eq!(
        trailer, sent_hash,
        "the target's answer after our FIN (half-close)"
    );
    (write_took.as_secs_f64(), read_took.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_on_relay_1_streams_100_mib_each_way_to_a_provider_on_relay_2_and_audit_names_both_relays()
 {
    let w = World::with_relay_config(FAST).await;
    let (r2, info2) = w.extra_relay("relay2", RELAY2_ID, "").await;
    let q2 = addr_in(&info2, "quic");
    let (target, echo) = common::hashing_echo_target().await;
    let (web, _web_task) = http_target().await;
    let mut provider = w.agent_on(
        "provider",
        PROVIDER_A,
        &[q2],
        &format!("{}{}", provide("bulk", target), provide("web", web)),
    );
    provider.ready().await;
    let mut consumer = w.agent(
        "consumer",
        CONSUMER_A,
        &format!("{}{}", consume("bulk"), consume("web")),
    );
    consumer.ready().await;
    w.rule(TENANT_A, ANY_A, "*", "allow", None).await;
    // The registry (relay 2 → controller → relay 1) and the rule reach relay 1.
    let waited = eventually_ok(consumer.consumer(1), Instant::now(), "forwarded call").await;
    eprintln!("MEASURED first forwarded call ok after {waited:?} (rule + registry propagation)");

    let (pid1, pid2) = (w.relay.0.id(), r2.0.id());
    let (cpu1, cpu2) = (cpu_ticks(pid1), cpu_ticks(pid2));
    let (up_s, down_s) = bulk_both_ways(&consumer, 0, echo, BULK_BYTES).await;
    let tps = ticks_per_s();
    let (used1, used2) = (
        (cpu_ticks(pid1) - cpu1) as f64 / tps,
        (cpu_ticks(pid2) - cpu2) as f64 / tps,
    );
    let mib = BULK_BYTES as f64 / (1024.0 * 1024.0);
    let gbit = 2.0 * BULK_BYTES as f64 * 8.0 / 1e9;
    eprintln!(
        "MEASURED forwarded stream consumer -> relay-1 -> relay-2 -> provider: {mib:.0} MiB up in \
         {up_s:.2} s ({:.0} MiB/s), {mib:.0} MiB back in {down_s:.2} s ({:.0} MiB/s), both at once; \
         relay-1 CPU {used1:.2} s ({:.2} s/Gbit), relay-2 CPU {used2:.2} s ({:.2} s/Gbit)",
        mib / up_s,
        mib / down_s,
        used1 / gbit,
        used2 / gbit,
    );

    // Both relays count the forwarded stream, labelled by the other relay.
    let out = metric(
        &w.relay_scrape(),
        "outrelay_relay_forward_streams_total",
        &[("direction", "out"), ("peer", RELAY2_ID)],
    );
    let inbound = relay2_metric(
        &info2,
        "outrelay_relay_forward_streams_total",
        &[("direction", "in"), ("peer", RELAY_ID)],
    );
    assert!(
        out >= 2.0 && inbound >= 2.0,
        "forwarded streams counted: out {out}, in {inbound}"
    );
    // Both agents ended their streams: the last checkpoints crossed the hop after the joins.
    assert_streams_end(&consumer, &provider, || {
        vec![w.relay_scrape(), scrape(addr_in(&info2, "metrics"))]
    })
    .await;

    // The audit pair: relay 1's caller-side decision and relay 2's callee-side one, each
    // naming both relays.
    let pair = format!("forward {RELAY_ID}->{RELAY2_ID} ");
    let (found, rows) = {
        let t0 = Instant::now();
        loop {
            let rows = w.stream_audit(TENANT_A).await;
            let reason = |r: &serde_json::Value, side: &str| {
                r["reason"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&pair) && s.contains(side))
            };
            let caller = rows.iter().any(|r| {
                r["decision"] == "allow"
                    && r["caller"] == CONSUMER_A
                    && r["target"] == "bulk"
                    && reason(r, "caller-side")
            });
            let callee = rows.iter().any(|r| {
                r["decision"] == "allow"
                    && r["caller"] == PROVIDER_A
                    && r["target"] == CONSUMER_A
                    && reason(r, "callee-side")
            });
            if caller && callee {
                break (true, rows);
            }
            if t0.elapsed() > WAIT {
                break (false, rows);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    for r in rows.iter().take(6) {
        eprintln!("audit: {r}");
    }
    assert!(
        found,
        "no caller-side + callee-side audit pair naming {pair}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_streams_are_refused_by_deny_rules_and_the_per_peer_cap_and_a_dead_peer_is_502_while_local_streams_flow()
 {
    let w = World::with_relay_config(&format!("{FAST}max_streams_per_peer = 2\n")).await;
    let (mut r2, info2) = w.extra_relay("relay2", RELAY2_ID, "").await;
    let q2 = addr_in(&info2, "quic");
    let (web, _web_task) = http_target().await;
    let (echo, _echo_task) = common::echo_server().await;
    let mut provider = w.agent_on(
        "provider",
        PROVIDER_A,
        &[q2],
        &format!("{}{}", provide("web", web), provide("echo", echo)),
    );
    provider.ready().await;
    // Tenant B's provider and consumer are both on relay 1 (never forwarded).
    let mut provider_b = w.agent("provider-b", PROVIDER_B, &provide("local-echo", echo));
    provider_b.ready().await;
    let mut consumer_b = w.agent("consumer-b", CONSUMER_B, &consume("local-echo"));
    consumer_b.ready().await;
    let mut consumer = w.agent(
        "consumer",
        CONSUMER_A,
        &format!("{}{}", consume("web"), consume("echo")),
    );
    consumer.ready().await;
    w.rule(TENANT_A, ANY_A, "*", "allow", None).await;
    w.rule(TENANT_B, ANY_B, "*", "allow", None).await;
    eventually_ok(consumer.consumer(0), Instant::now(), "forwarded call").await;

    // A callee-side deny is decided at relay 2 and reaches the consumer as 403.
    let deny = w.rule(TENANT_A, PROVIDER_A, CONSUMER_A, "deny", None).await;
    let took = eventually_rejected(&consumer, 0, 403, Instant::now()).await;
    eprintln!("MEASURED callee-side deny at relay 2 refused a forwarded stream after {took:?}");
    let rows = w.stream_audit(TENANT_A).await;
    assert!(
        rows.iter().any(|r| r["decision"] == "deny"
            && r["caller"] == PROVIDER_A
            && r["reason"].as_str().is_some_and(
                |s| s.starts_with(&format!("forward {RELAY_ID}->{RELAY2_ID} callee-side"))
            )),
        "no callee-side deny row naming both relays"
    );
    w.remove_rule(TENANT_A, &deny).await;
    eventually_ok(consumer.consumer(0), Instant::now(), "deny removed").await;

    // The per-peer cap (2): two live forwarded streams, the third is refused with 429 and
    // counted, while the two keep flowing and a local stream of tenant B is served.
    let idle = poll(WAIT, || {
        metric(
            &w.relay_scrape(),
            "outrelay_relay_forward_streams_active",
            &[("peer", RELAY2_ID)],
        ) == 0.0
    })
    .await;
    assert!(idle, "earlier forwarded streams still hold their slots");
    let mut live1 = LiveStream::open(consumer.consumer(1)).await;
    let mut live2 = LiveStream::open(consumer.consumer(1)).await;
    let refused_before = metric(
        &w.relay_scrape(),
        "outrelay_relay_forward_refused_total",
        &[("reason", "peer_streams_full"), ("peer", RELAY2_ID)],
    );
    // 429 (too many streams, as the tenant cap): the agent counts it as `rejected_other`.
    let other_before = consumer.streams("consumer", "rejected_other");
    let r = http_call(consumer.consumer(0)).await;
    assert!(
        r.is_err(),
        "a third forwarded stream went through the cap of 2"
    );
    let counted = poll(Duration::from_secs(10), || {
        consumer.streams("consumer", "rejected_other") > other_before
    })
    .await;
    assert!(counted, "the consumer did not count the refusal ({r:?})");
    let refused = metric(
        &w.relay_scrape(),
        "outrelay_relay_forward_refused_total",
        &[("reason", "peer_streams_full"), ("peer", RELAY2_ID)],
    );
    assert!(
        refused > refused_before,
        "peer_streams_full {refused_before} -> {refused}"
    );
    live1.keep_flowing(Duration::from_millis(300)).await;
    live2.keep_flowing(Duration::from_millis(300)).await;
    let mut local = LiveStream::open(consumer_b.consumer(0)).await;
    local.keep_flowing(Duration::from_millis(300)).await;
    drop((live1, live2));

    // Relay 2 dies: forwarded opens answer 502 (its registry entries are still there), and
    // tenant B's local stream keeps flowing meanwhile; a new local stream is served too.
    r2.kill9();
    let t0 = Instant::now();
    let took = eventually_rejected(&consumer, 0, 502, t0).await;
    eprintln!("MEASURED dead peer relay -> first 502 after {took:?}");
    local.keep_flowing(Duration::from_millis(300)).await;
    let mut fresh = LiveStream::open(consumer_b.consumer(0)).await;
    fresh.keep_flowing(Duration::from_millis(200)).await;
    let connect_failed = metric(
        &w.relay_scrape(),
        "outrelay_relay_forward_refused_total",
        &[("reason", "connect_failed"), ("peer", RELAY2_ID)],
    );
    assert!(
        connect_failed >= 1.0,
        "connect_failed counted: {connect_failed}"
    );
    drop(provider);
}

/// The measurement, in-test: one stream of `OUTRELAY_FWD_MEASURE_MIB` (default 100)
/// each way through relay 1 alone (provider on relay 1) and then through relay 1 → relay 2
/// (provider on relay 2), with both relays' CPU from `/proc/<pid>/stat`. Prints `MEASURED`
/// lines; asserts only the hashes (no wall-clock gate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_forwarded_stream_against_a_single_relay_stream() {
    let mib: u64 = std::env::var("OUTRELAY_FWD_MEASURE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let bytes = mib * 1024 * 1024;
    let w = World::with_relay_config(FAST).await;
    let (r2, info2) = w.extra_relay("relay2", RELAY2_ID, "").await;
    let q2 = addr_in(&info2, "quic");
    let (local_target, local_echo) = common::hashing_echo_target().await;
    let (remote_target, remote_echo) = common::hashing_echo_target().await;
    let (web, _web_task) = http_target().await;
    let mut local = w.agent(
        "provider-local",
        PROVIDER_A2,
        &provide("bulk-local", local_target),
    );
    local.ready().await;
    let mut remote = w.agent_on(
        "provider-remote",
        PROVIDER_A,
        &[q2],
        &format!("{}{}", provide("bulk", remote_target), provide("web", web)),
    );
    remote.ready().await;
    let mut consumer = w.agent(
        "consumer",
        CONSUMER_A,
        &format!(
            "{}{}{}",
            consume("bulk-local"),
            consume("bulk"),
            consume("web")
        ),
    );
    consumer.ready().await;
    w.rule(TENANT_A, ANY_A, "*", "allow", None).await;
    eventually_ok(consumer.consumer(2), Instant::now(), "forwarded call").await;
    let (pid1, pid2) = (w.relay.0.id(), r2.0.id());
    let tps = ticks_per_s();
    let gbit = 2.0 * bytes as f64 * 8.0 / 1e9;
    for (path, i, echo) in [
        ("single-relay", 0, local_echo),
        ("forwarded", 1, remote_echo),
    ] {
        let (c1, c2) = (cpu_ticks(pid1), cpu_ticks(pid2));
        let t0 = Instant::now();
        let (up_s, down_s) = bulk_both_ways(&consumer, i, echo, bytes).await;
        let wall = t0.elapsed().as_secs_f64();
        let used1 = (cpu_ticks(pid1) - c1) as f64 / tps;
        let used2 = (cpu_ticks(pid2) - c2) as f64 / tps;
        eprintln!(
            "MEASURED {path} stream {mib} MiB each way: up {:.0} MiB/s, down {:.0} MiB/s, \
             {:.2} Gbit/s both ways together; relay-1 CPU {used1:.2} s ({:.3} s/Gbit), relay-2 CPU \
             {used2:.2} s ({:.3} s/Gbit), both relays {:.3} CPU-s/Gbit",
            mib as f64 / up_s,
            mib as f64 / down_s,
            gbit / wall,
            used1 / gbit,
            used2 / gbit,
            (used1 + used2) / gbit,
        );
    }
}

// ---------- resume across the forwarded hop ----------

/// The pace of the resumed transfers: 100 MiB each way lasts about 5 s, so the kill lands
/// mid-stream whatever the machine's speed.
const RESUME_PACE_BYTES_PER_S: u64 = 20 * 1024 * 1024;

/// Which relay of the forwarded stream dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dies {
    /// Relay 1: the consumer reconnects to relay 2, where the halves meet.
    ConsumersRelay,
    /// Relay 2: the provider reconnects to relay 1, where the halves meet.
    ProvidersRelay,
}

/// The resume lines of a metrics page (for failure messages).
fn resume_lines(text: &str) -> String {
    text.lines()
        .filter(|l| (l.contains("resume") || l.contains("checkpoint")) && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A 100 MiB stream each way, forwarded consumer -> relay 1 -> relay 2 -> provider with both
/// agents resuming (each holds one relay, the other is its fallback); `dies` is killed with
/// `kill -9` a quarter of the way in. The stream completes with equal hashes, both agents
/// count a resume, the surviving relay joined the halves, and tenant B's stream on the
/// surviving relay flows meanwhile.
async fn forwarded_stream_survives(dies: Dies) {
    let mut w = World::with_relay_config(FAST).await;
    let (mut r2, info2) = w.extra_relay("relay2", RELAY2_ID, "").await;
    let (q1, q2) = (w.quic.to_string(), addr_in(&info2, "quic").to_string());
    let (target, echo) = common::hashing_echo_target().await;
    let (web, _web_task) = http_target().await;
    let (b_echo, _b_echo_task) = common::echo_server().await;
    let one = "ha_connections = 1";
    let mut provider = w.agent_ha(
        "provider",
        PROVIDER_A,
        &[q2.clone(), q1.clone()],
        one,
        &format!("{}{}", provide("bulk", target), provide("web", web)),
    );
    provider.ready().await;
    let mut consumer = w.agent_ha(
        "consumer",
        CONSUMER_A,
        &[q1.clone(), q2.clone()],
        one,
        &format!("{}{}", consume("bulk"), consume("web")),
    );
    consumer.ready().await;
    // Tenant B, both ends on the relay that survives.
    let survivor = match dies {
        Dies::ConsumersRelay => q2.clone(),
        Dies::ProvidersRelay => q1.clone(),
    };
    let mut provider_b = w.agent_ha(
        "provider-b",
        PROVIDER_B,
        std::slice::from_ref(&survivor),
        one,
        &provide("local-echo", b_echo),
    );
    provider_b.ready().await;
    let mut consumer_b = w.agent_ha(
        "consumer-b",
        CONSUMER_B,
        std::slice::from_ref(&survivor),
        one,
        &consume("local-echo"),
    );
    consumer_b.ready().await;
    w.rule(TENANT_A, ANY_A, "*", "allow", None).await;
    w.rule(TENANT_B, ANY_B, "*", "allow", None).await;
    eventually_ok(consumer.consumer(1), Instant::now(), "forwarded call").await;
    let mut other_tenant =
        LiveStream::open_when_allowed(consumer_b.consumer(0), WAIT, "tenant B").await;

    let bulk =
        common::Bulk::start_paced(consumer.consumer(0), BULK_BYTES, RESUME_PACE_BYTES_PER_S).await;
    bulk.wait_received(BULK_BYTES / 4).await;
    // More than a ring (16 MiB) came back: checkpoints crossed the hop both ways.
    let (page1, page2) = (w.relay_scrape(), scrape(addr_in(&info2, "metrics")));
    let delivered1 = metric(
        &page1,
        "outrelay_relay_forward_checkpoints_total",
        &[("result", "delivered"), ("peer", RELAY2_ID)],
    );
    let delivered2 = metric(
        &page2,
        "outrelay_relay_forward_checkpoints_total",
        &[("result", "delivered"), ("peer", RELAY_ID)],
    );
    assert!(
        delivered1 >= 1.0 && delivered2 >= 1.0,
        "checkpoints across the hop: relay 1 delivered {delivered1}, relay 2 {delivered2}\n{}\n{}",
        resume_lines(&page1),
        resume_lines(&page2)
    );
    let forwarded = metric(
        &page1,
        "outrelay_relay_forward_streams_total",
        &[("direction", "out"), ("peer", RELAY2_ID)],
    );
    assert!(forwarded >= 2.0, "the streams were forwarded: {forwarded}");

    let at_kill = bulk.received();
    let killed = Instant::now();
    let survivor_metrics = match dies {
        Dies::ConsumersRelay => {
            w.relay.kill9();
            addr_in(&info2, "metrics")
        }
        Dies::ProvidersRelay => {
            r2.kill9();
            w.relay_metrics
        }
    };
    other_tenant.keep_flowing(Duration::from_millis(500)).await;
    let resumed_by = |agent: &Agent| {
        metric(
            &agent.scrape(),
            "outrelay_agent_resume_total",
            &[("result", "resumed")],
        ) >= 1.0
    };
    let resumed = poll(Duration::from_secs(60), || {
        resumed_by(&consumer) && resumed_by(&provider)
    })
    .await;
    assert!(
        resumed,
        "the stream did not resume within 60 s of the kill:\nconsumer:\n{}\nprovider:\n{}",
        resume_lines(&consumer.scrape()),
        resume_lines(&provider.scrape())
    );
    let took = killed.elapsed();
    let flowing = poll(Duration::from_secs(60), || bulk.received() > at_kill).await;
    assert!(flowing, "no byte came back within 60 s of the kill");
    eprintln!(
        "MEASURED forwarded stream, kill -9 of the {dies:?} at {} MiB echoed; both agents \
         resumed within {took:?} (agent idle timeout 3 s)",
        at_kill >> 20,
    );
    other_tenant.keep_flowing(Duration::from_millis(300)).await;
    finish_intact(bulk, echo, BULK_BYTES).await;
    for agent in [&consumer, &provider] {
        let page = agent.scrape();
        let count = |result| metric(&page, "outrelay_agent_resume_total", &[("result", result)]);
        assert!(
            count("resumed") >= 1.0,
            "{}:\n{}",
            agent.name,
            resume_lines(&page)
        );
        assert_eq!(
            count("lost"),
            0.0,
            "{}:\n{}",
            agent.name,
            resume_lines(&page)
        );
    }
    let page = scrape(survivor_metrics);
    assert!(
        metric(
            &page,
            "outrelay_relay_resume_total",
            &[("result", "resumed")]
        ) >= 1.0,
        "the halves met on the surviving relay:\n{}",
        resume_lines(&page)
    );
    drop((provider_b, r2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_100_mib_stream_each_way_survives_kill_9_of_the_consumers_relay() {
    forwarded_stream_survives(Dies::ConsumersRelay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_100_mib_stream_each_way_survives_kill_9_of_the_providers_relay() {
    forwarded_stream_survives(Dies::ProvidersRelay).await;
}
