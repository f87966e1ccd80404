//! Service-to-service streams end to end (issue #8): the REAL `outrelay-controller`,
//! `outrelay-relay`, `outrelay-agent` and `outrelay` binaries as processes. One world per test:
//! a CA made here (rcgen) and handed to the controller as its state directory's CA, a relay
//! with `[controller]` and short QUIC timeouts, agents of two tenants with certificates from
//! that CA, policy rules added and removed with `outrelay policy`, audit rows read with
//! `outrelay audit query`, and local clients on the consumers' listen addresses (one test runs
//! a standalone relay with static `[[policy]]` rules instead). Every daemon binds 127.0.0.1:0
//! and reports its addresses in a ready file.
//!
//! Build the binaries first (`cargo build --release -p outrelay-controller -p outrelay-relay
//! -p outrelay-agent -p outrelay-cli`; a workspace run builds them anyway).
//!
//! Delays (policy propagation, stream cuts, deregistration) are logged as `MEASURED` lines
//! against their targets; assertions use generous bounds because the machine may be shared.
//! When a test fails, the tails of every daemon's log are printed.

mod common;

use common::world::*;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_http_through_consumer_relay_provider() {
    if !have("curl", "--version") {
        eprintln!("SKIP curl_gets_http_through_consumer_relay_provider: no curl on PATH");
        return;
    }
    let w = World::new().await;
    let (web, _web_task) = http_target().await;
    let mut provider = w.agent("provider", PROVIDER_A, &provide("web", web));
    let info = provider.ready().await;
    assert_eq!(info["services"][0]["service"], "web", "{info}");
    assert_eq!(info["services"][0]["service_id"], "acme/web", "{info}");
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("web"));
    let info = consumer.ready().await;
    assert_eq!(info["consumers"][0]["service"], "web", "{info}");
    let listen = consumer.consumer(0);
    let t0 = Instant::now();
    w.rule(TENANT_A, ANY_A, "web", "allow", None).await;
    let waited = eventually_ok(listen, t0, "allow rule reaches the relay").await;
    eprintln!("MEASURED policy add -> first allowed call: {waited:?} (target 1 s)");

    let url = format!("http://{listen}/hello");
    for _ in 0..5 {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "10", &url]);
        let out = run_blocking(cmd).await;
        assert!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), BODY);
    }
    // Every call was counted as accepted on both agents and on the relay.
    let accepted = consumer.streams("consumer", "accepted");
    assert!(accepted >= 6.0, "consumer accepted {accepted}");
    let served = provider.streams("provider", "accepted");
    assert!(served >= 6.0, "provider accepted {served}");
    let relay = metric(
        &w.relay_scrape(),
        "outrelay_relay_mesh_streams_total",
        &[("result", "accepted")],
    );
    assert!(
        relay >= 6.0,
        "relay accepted {relay}:\n{}",
        mesh_lines(&w.relay_scrape())
    );
    // Every stream ENDED on both agents (their last checkpoints crossed the relay).
    assert_streams_end(&consumer, &provider, || vec![w.relay_scrape()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mesh_stream_carries_100_mib_each_way_with_equal_hashes_and_half_close() {
    let w = World::new().await;
    let (target, echo) = common::hashing_echo_target().await;
    let (web, _web_task) = http_target().await;
    let mut provider = w.agent(
        "provider",
        PROVIDER_A,
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
    // The hashing target takes ONE connection: probe the rule on `web` first.
    let waited = eventually_ok(consumer.consumer(1), Instant::now(), "allow").await;
    eprintln!("allow rule effective after {waited:?}");
    let bulk = common::Bulk::start(consumer.consumer(0), BULK_BYTES).await;
    let (sent, sent_hash, write_took, got, got_hash, trailer, read_took) = bulk.finish().await;
    let (echo_total, echo_hash) = tokio::time::timeout(WAIT, echo)
        .await
        .expect("echo finished")
        .expect("echo task");
    let mib = BULK_BYTES as f64 / (1024.0 * 1024.0);
    eprintln!(
        "MEASURED mesh stream consumer -> relay -> provider: {mib:.0} MiB up in {write_took:?} \
         ({:.0} MiB/s), {mib:.0} MiB back in {read_took:?} ({:.0} MiB/s), both at once",
        mib / write_took.as_secs_f64(),
        mib / read_took.as_secs_f64()
    );
    eprintln!("sha256 sent {}", hex(&sent_hash));
    assert_eq!(sent, BULK_BYTES);
    assert_eq!(
        echo_total, BULK_BYTES,
        "the provider's target got every byte"
    );
    assert_eq!(echo_hash, sent_hash, "SHA-256 at the target = SHA-256 sent");
    assert_eq!(got, BULK_BYTES, "every byte came back");
    assert_eq!(got_hash, sent_hash, "SHA-256 of the echo = SHA-256 sent");
    assert_eq!(
        trailer, sent_hash,
        "the target's answer after our FIN arrived (half-close kept)"
    );
    let relay_bytes = {
        let mut v = 0.0;
        poll(Duration::from_secs(10), || {
            v = metric(&w.relay_scrape(), "outrelay_relay_mesh_bytes_total", &[]);
            v >= 2.0 * BULK_BYTES as f64
        })
        .await;
        v
    };
    eprintln!("relay mesh bytes counted: {relay_bytes}");
    assert!(
        relay_bytes >= 2.0 * BULK_BYTES as f64,
        "outrelay_relay_mesh_bytes_total {relay_bytes} < 200 MiB:\n{}",
        mesh_lines(&w.relay_scrape())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_world_no_rule_is_403_and_policy_changes_reach_the_relay_and_cut_live_streams() {
    let w = World::new().await;
    let (web, _web_task) = http_target().await;
    let (echo, _echo_task) = common::echo_server().await;
    let mut provider = w.agent(
        "provider",
        PROVIDER_A,
        &format!("{}{}", provide("web", web), provide("echo", echo)),
    );
    provider.ready().await;
    let mut consumer = w.agent(
        "consumer",
        CONSUMER_A,
        &format!("{}{}", consume("web"), consume("echo")),
    );
    consumer.ready().await;

    // No rule at all: closed world.
    let relay_403 = metric(
        &w.relay_scrape(),
        "outrelay_relay_mesh_streams_total",
        &[("result", "rejected_403")],
    );
    expect_rejected(&consumer, 0, 403).await;
    let now_403 = metric(
        &w.relay_scrape(),
        "outrelay_relay_mesh_streams_total",
        &[("result", "rejected_403")],
    );
    assert!(
        now_403 > relay_403,
        "relay counted rejected_403 {relay_403} -> {now_403}"
    );

    // An allow rule reaches the relay.
    let t0 = Instant::now();
    w.rule(TENANT_A, ANY_A, "web", "allow", None).await;
    let cli_took = t0.elapsed();
    let waited = eventually_ok(consumer.consumer(0), t0, "allow rule reaches the relay").await;
    eprintln!(
        "MEASURED policy add (CLI took {cli_took:?}) -> first allowed call: {waited:?} after the \
         CLI started (target 1 s)"
    );
    // The rule names its target exactly: echo is still closed.
    expect_rejected(&consumer, 1, 403).await;

    // Removing the allow cuts a live stream, and new opens are refused again.
    let allow_echo = w.rule(TENANT_A, ANY_A, "echo", "allow", None).await;
    let mut live =
        LiveStream::open_when_allowed(consumer.consumer(1), POLICY_BOUND, "echo never allowed")
            .await;
    live.keep_flowing(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    w.remove_rule(TENANT_A, &allow_echo).await;
    let cli_took = t0.elapsed();
    let (cut, why) = live.wait_cut(t0, POLICY_BOUND).await;
    eprintln!(
        "MEASURED policy remove (CLI took {cli_took:?}) -> live stream cut: {cut:?} ({why}) \
         (target 1 s)"
    );
    eventually_rejected(&consumer, 1, 403, Instant::now()).await;
    // web is untouched by the removal.
    http_call(consumer.consumer(0))
        .await
        .expect("web still allowed");

    // An exact deny for this consumer added while a stream is open cuts it too.
    w.rule(TENANT_A, ANY_A, "echo", "allow", None).await;
    let mut live = LiveStream::open_when_allowed(
        consumer.consumer(1),
        POLICY_BOUND,
        "echo never allowed again",
    )
    .await;
    let t0 = Instant::now();
    w.rule(TENANT_A, CONSUMER_A, "echo", "deny", None).await;
    let (cut, why) = live.wait_cut(t0, POLICY_BOUND).await;
    eprintln!("MEASURED policy add deny -> live stream cut: {cut:?} ({why}) (target 1 s)");
    eventually_rejected(&consumer, 1, 403, Instant::now()).await;
    let cuts = metric(
        &w.relay_scrape(),
        "outrelay_relay_mesh_streams_cut_total",
        &[],
    );
    eprintln!("relay streams cut: {cuts}");
    assert!(
        cuts >= 2.0,
        "relay counted {cuts} cuts:\n{}",
        mesh_lines(&w.relay_scrape())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_target_deny_beats_a_wildcard_allow() {
    let w = World::new().await;
    let (web, _web_task) = http_target().await;
    let mut provider = w.agent(
        "provider",
        PROVIDER_A,
        &format!(
            "{}{}{}",
            provide("web", web),
            provide("pay-other", web),
            provide("pay-third", web)
        ),
    );
    provider.ready().await;
    let mut consumer = w.agent(
        "consumer",
        CONSUMER_A,
        &format!(
            "{}{}{}",
            consume("web"),
            consume("pay-other"),
            consume("pay-third")
        ),
    );
    consumer.ready().await;
    // The deny first, then the allow: once the allow is seen, the deny is too. The allow names
    // the caller exactly and the deny does not: the target class decides, not the caller.
    w.rule(TENANT_A, "*", "web", "deny", None).await;
    w.rule(TENANT_A, CONSUMER_A, "*", "allow", None).await;
    let t0 = Instant::now();
    let waited = eventually_ok(consumer.consumer(1), t0, "wildcard allow for pay-other").await;
    eprintln!("wildcard allow effective after {waited:?}");
    for _ in 0..3 {
        expect_rejected(&consumer, 0, 403).await;
    }
    // An exact-target allow beats a wildcard-target deny added after it. `pay-third` is
    // allowed only by the wildcard allow: once the wildcard deny refuses it (same class: deny
    // beats allow), the relay has both new rules. (`pay-*`, not `*`: a `*` target would also
    // match the consumer's URI on the callee side, where a deny refuses.)
    w.rule(TENANT_A, ANY_A, "pay-other", "allow", None).await;
    w.rule(TENANT_A, "*", "pay-*", "deny", None).await;
    let waited = eventually_rejected(&consumer, 2, 403, Instant::now()).await;
    eprintln!("wildcard deny effective after {waited:?}");
    for _ in 0..3 {
        http_call(consumer.consumer(1))
            .await
            .expect("an exact-target allow beats a wildcard-target deny");
        expect_rejected(&consumer, 0, 403).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_side_deny_blocks_only_that_consumer() {
    let w = World::new().await;
    let (web, _web_task) = http_target().await;
    let mut provider = w.agent("provider", PROVIDER_A, &provide("web", web));
    provider.ready().await;
    let mut blocked = w.agent("consumer1", CONSUMER_A, &consume("web"));
    blocked.ready().await;
    let mut other = w.agent("consumer2", CONSUMER_A2, &consume("web"));
    other.ready().await;
    // The provider refuses CONSUMER_A (callee side); then the tenant-wide allow.
    w.rule(TENANT_A, PROVIDER_A, CONSUMER_A, "deny", None).await;
    w.rule(TENANT_A, ANY_A, "web", "allow", None).await;
    let t0 = Instant::now();
    eventually_ok(other.consumer(0), t0, "the other consumer").await;
    for _ in 0..3 {
        expect_rejected(&blocked, 0, 403).await;
        http_call(other.consumer(0))
            .await
            .expect("the other consumer still works");
    }
    // The audit says which side refused.
    let start = Instant::now();
    loop {
        let rows = w.stream_audit(TENANT_A).await;
        let callee_deny = rows.iter().any(|r| {
            r["decision"] == "deny"
                && r["caller"] == PROVIDER_A
                && r["target"] == CONSUMER_A
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("callee-side"))
        });
        if callee_deny {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no callee-side deny row in the audit: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_rule_stops_matching_and_cuts_its_streams() {
    let w = World::new().await;
    let (echo, _echo_task) = common::echo_server().await;
    let mut provider = w.agent("provider", PROVIDER_A, &provide("echo", echo));
    provider.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("echo"));
    consumer.ready().await;
    let lifetime = Duration::from_secs(8);
    let added = Instant::now();
    w.rule(TENANT_A, ANY_A, "echo", "allow", Some("8s")).await;
    let expires_at = added + lifetime;
    let mut live =
        LiveStream::open_when_allowed(consumer.consumer(0), lifetime, "the 8 s rule").await;
    eprintln!("expiring rule effective after {:?}", added.elapsed());
    let (cut, why) = live
        .wait_cut(expires_at, lifetime + POLICY_BOUND + Duration::from_secs(5))
        .await;
    // `cut` is measured from the expiry instant (the CLI adds 8 s to its own clock, read a
    // little after `added`), so it can be slightly negative in reality: it saturates to 0.
    let cut_at = added.elapsed();
    eprintln!(
        "MEASURED rule expiry -> live stream cut: {:?} after the expiry ({why}) (target 1 s)",
        cut_at.saturating_sub(lifetime)
    );
    assert!(
        cut_at + Duration::from_millis(500) >= lifetime,
        "the stream was cut {cut_at:?} after an 8 s rule was added, before it expired ({cut:?})"
    );
    let refused = eventually_rejected(&consumer, 0, 403, Instant::now()).await;
    eprintln!("new opens refused {refused:?} after the cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_b_cannot_reach_tenant_a_services_and_a_rules_never_match_b() {
    let w = World::new().await;
    let (web, _web_task) = http_target().await;
    let mut provider = w.agent("provider", PROVIDER_A, &provide("payments", web));
    provider.ready().await;
    let mut a = w.agent("consumer-a", CONSUMER_A, &consume("payments"));
    a.ready().await;
    let mut b = w.agent("consumer-b", CONSUMER_B, &consume("payments"));
    b.ready().await;
    // Tenant A allows everything.
    w.rule(TENANT_A, "*", "*", "allow", None).await;
    let t0 = Instant::now();
    eventually_ok(a.consumer(0), t0, "tenant A's own consumer").await;
    // Tenant B has no rule: A's allow-everything does not match B's caller.
    expect_rejected(&b, 0, 403).await;
    // Even a rule of A naming B's agent exactly (if the controller takes it) never lets B in.
    let o = w
        .cli_raw(&[
            "policy",
            "add",
            "--tenant",
            TENANT_A,
            "--caller",
            CONSUMER_B,
            "--target",
            "payments",
            "--decision",
            "allow",
        ])
        .await;
    eprintln!(
        "tenant-A rule naming a tenant-B caller: exit {:?}: {}",
        o.status.code(),
        text(&o).trim()
    );
    // A marker added after it: once A's consumer is refused, the relay has both rules.
    let marker = w.rule(TENANT_A, CONSUMER_A, "payments", "deny", None).await;
    eventually_rejected(&a, 0, 403, Instant::now()).await;
    expect_rejected(&b, 0, 403).await;
    w.remove_rule(TENANT_A, &marker).await;
    eventually_ok(
        a.consumer(0),
        Instant::now(),
        "A after the marker's removal",
    )
    .await;
    // With B's own allow-everything rule, "payments" resolves inside B: not found.
    w.rule(TENANT_B, "*", "*", "allow", None).await;
    let waited = eventually_rejected(&b, 0, 404, Instant::now()).await;
    eprintln!("tenant B's allow reached the relay: 404 after {waited:?}");
    for _ in 0..3 {
        expect_rejected(&b, 0, 404).await;
    }
    http_call(a.consumer(0)).await.expect("A still works");
    // B's services list does not show A's provider.
    let listed = w.services(TENANT_B).await;
    assert!(
        listed.iter().all(|p| p["agent_uri"] != PROVIDER_A),
        "tenant B lists tenant A's provider: {listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_404_and_a_provider_without_a_handler_is_503() {
    let w = World::new().await;
    let (web, _web_task) = http_target().await;
    // Providers from flags: `pay` has a target for method m1 only (no default); `down` has a
    // default target that does not listen (the provider's 502 becomes the consumer's 503).
    let mut pay = w.agent_cli(
        "provider-pay",
        PROVIDER_A,
        "provide",
        &[
            "--service",
            "pay",
            "--method",
            "m1",
            "--to",
            &web.to_string(),
        ],
    );
    let info = pay.ready().await;
    assert_eq!(info["services"][0]["service_id"], "acme/pay", "{info}");
    let dead = format!("127.0.0.1:{}", dead_port());
    let mut down = w.agent_cli(
        "provider-down",
        PROVIDER_A2,
        "provide",
        &["--service", "down", "--to", &dead],
    );
    down.ready().await;
    // A consumer from flags, and one from the config with several entries.
    let mut flags = w.agent_cli(
        "consumer-flags",
        CONSUMER_A2,
        "consume",
        &[
            "--service",
            "pay",
            "--method",
            "m1",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    flags.ready().await;
    let mut consumer = w.agent(
        "consumer",
        CONSUMER_A,
        &format!(
            "{}{}{}{}",
            consume_method("pay", "m1"),
            consume_method("pay", "m2"),
            consume("nosuch"),
            consume("down"),
        ),
    );
    consumer.ready().await;
    w.rule(TENANT_A, "*", "*", "allow", None).await;
    let t0 = Instant::now();
    eventually_ok(consumer.consumer(0), t0, "pay/m1").await;
    http_call(flags.consumer(0))
        .await
        .expect("pay/m1 through the consumer started from flags");
    expect_rejected(&consumer, 1, 503).await;
    expect_rejected(&consumer, 2, 404).await;
    expect_rejected(&consumer, 3, 503).await;
    // The providers counted their own refusals.
    let no_handler = pay.streams("provider", "rejected_404");
    assert!(
        no_handler >= 1.0,
        "provider pay counted rejected_404 {no_handler}:\n{}",
        mesh_lines(&pay.scrape())
    );
    let dial_failed = down.streams("provider", "rejected_502");
    assert!(
        dial_failed >= 1.0,
        "provider down counted rejected_502 {dial_failed}:\n{}",
        mesh_lines(&down.scrape())
    );
    let relay = w.relay_scrape();
    for code in ["rejected_404", "rejected_503"] {
        let n = metric(
            &relay,
            "outrelay_relay_mesh_streams_total",
            &[("result", code)],
        );
        assert!(n >= 1.0, "relay {code} = {n}:\n{}", mesh_lines(&relay));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_rows_carry_the_stream_id_and_both_decisions_and_the_chain_verifies() {
    let w = World::new().await;
    let (web, _web_task) = http_target().await;
    let mut provider = w.agent("provider", PROVIDER_A, &provide("web", web));
    provider.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("web"));
    consumer.ready().await;
    expect_rejected(&consumer, 0, 403).await;
    let rule = w.rule(TENANT_A, ANY_A, "web", "allow", None).await;
    eventually_ok(consumer.consumer(0), Instant::now(), "allow").await;

    let start = Instant::now();
    let rows = loop {
        let rows = w.stream_audit(TENANT_A).await;
        let caller_allow = rows
            .iter()
            .any(|r| r["decision"] == "allow" && r["caller"] == CONSUMER_A && r["target"] == "web");
        let caller_deny = rows
            .iter()
            .any(|r| r["decision"] == "deny" && r["caller"] == CONSUMER_A);
        let callee = rows.iter().any(|r| r["caller"] == PROVIDER_A);
        if caller_allow && caller_deny && callee {
            break rows;
        }
        assert!(
            start.elapsed() < WAIT,
            "stream audit rows incomplete after {WAIT:?}: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("stream audit rows: {rows:#?}");
    let stream_id = |r: &serde_json::Value| -> u64 {
        let s = r["stream_id"].as_str().unwrap_or("");
        let id: u64 = s
            .parse()
            .unwrap_or_else(|_| panic!("stream_id {s:?} is not a decimal u64: {r}"));
        assert_ne!(id, 0, "stream id 0 in {r}");
        id
    };
    // The refused open: one caller-side row, no callee-side row with its id.
    let deny = rows
        .iter()
        .find(|r| r["decision"] == "deny" && r["caller"] == CONSUMER_A)
        .expect("deny row");
    assert_eq!(deny["target"], "web", "{deny}");
    assert_eq!(deny["tenant"], TENANT_A, "{deny}");
    assert_eq!(
        deny["reason"], "caller-side: no matching rule",
        "reason of {deny}"
    );
    let denied_id = stream_id(deny);
    assert!(
        !rows
            .iter()
            .any(|r| r["caller"] == PROVIDER_A && r["stream_id"] == deny["stream_id"]),
        "a refused open has no callee-side row: {rows:#?}"
    );
    // The allowed open: caller-side row naming the rule, callee-side row with the same id.
    let allow = rows
        .iter()
        .find(|r| r["decision"] == "allow" && r["caller"] == CONSUMER_A && r["target"] == "web")
        .expect("allow row");
    assert_eq!(
        allow["reason"],
        format!("caller-side: rule {rule}"),
        "reason of {allow}"
    );
    let id = stream_id(allow);
    assert_ne!(id, denied_id, "two opens, two stream ids");
    let callee = rows
        .iter()
        .find(|r| r["caller"] == PROVIDER_A && r["stream_id"] == allow["stream_id"])
        .unwrap_or_else(|| panic!("no callee-side row for stream {id}: {rows:#?}"));
    assert_eq!(callee["target"], CONSUMER_A, "{callee}");
    assert_eq!(callee["decision"], "allow", "{callee}");
    assert!(
        callee["reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("callee-side")),
        "{callee}"
    );

    let v = w.cli(&["audit", "verify"]).await;
    eprintln!("outrelay audit verify: {v}");
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        v["row_count"].as_u64().unwrap_or(0) >= 3,
        "row count in {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_provider_disappears_from_services_list_and_new_opens_get_404() {
    let w = World::new().await;
    let (web, _web_task) = http_target().await;
    let mut provider = w.agent("provider", PROVIDER_A, &provide("web", web));
    provider.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("web"));
    consumer.ready().await;
    w.rule(TENANT_A, ANY_A, "web", "allow", None).await;
    eventually_ok(consumer.consumer(0), Instant::now(), "allow").await;
    let start = Instant::now();
    let listed = loop {
        let listed = w.services(TENANT_A).await;
        if listed
            .iter()
            .any(|p| p["service_id"] == "acme/web" && p["agent_uri"] == PROVIDER_A)
        {
            break listed;
        }
        assert!(start.elapsed() < WAIT, "acme/web never listed: {listed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("outrelay services list --tenant acme: {listed:?}");
    let p = listed
        .iter()
        .find(|p| p["service_id"] == "acme/web")
        .expect("listed");
    assert_eq!(p["relay_id"], RELAY_ID, "the provider's relay: {p}");

    let killed = Instant::now();
    provider.proc.kill9();
    loop {
        let listed = w.services(TENANT_A).await;
        if !listed
            .iter()
            .any(|p| p["service_id"] == "acme/web" && p["agent_uri"] == PROVIDER_A)
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "acme/web still listed 60 s after its agent was killed: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "MEASURED provider SIGKILL -> gone from services list: {:?} (target 10 s; relay QUIC idle \
         timeout 2 s)",
        killed.elapsed()
    );
    let waited = eventually_rejected(&consumer, 0, 404, killed).await;
    eprintln!("MEASURED provider SIGKILL -> first 404: {waited:?}");
    expect_rejected(&consumer, 0, 404).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controller_leaves_live_streams_and_new_opens_working() {
    let mut w = World::new().await;
    let (echo, _echo_task) = common::echo_server().await;
    let (web, _web_task) = http_target().await;
    let mut provider = w.agent(
        "provider",
        PROVIDER_A,
        &format!("{}{}", provide("echo", echo), provide("web", web)),
    );
    provider.ready().await;
    let mut consumer = w.agent(
        "consumer",
        CONSUMER_A,
        &format!("{}{}", consume("echo"), consume("web")),
    );
    consumer.ready().await;
    w.rule(TENANT_A, ANY_A, "*", "allow", None).await;
    eventually_ok(consumer.consumer(1), Instant::now(), "allow").await;
    let mut live = LiveStream::open(consumer.consumer(0)).await;
    w.controller.as_mut().expect("controller").kill9();
    eprintln!("controller killed");
    // Longer than the relay's heartbeat (200 ms), reconnect backoff (≤ 500 ms) and the agents'
    // QUIC idle timeouts (2-3 s).
    live.keep_flowing(Duration::from_secs(4)).await;
    for i in 0..10 {
        http_call(consumer.consumer(1))
            .await
            .unwrap_or_else(|e| panic!("new open {i} without the controller: {e}"));
    }
    let mut second = LiveStream::open(consumer.consumer(0)).await;
    second.keep_flowing(Duration::from_millis(500)).await;
    live.keep_flowing(Duration::from_millis(500)).await;

    // The controller comes back on the same address with an empty registry (it keeps the
    // registry in memory only): the relay registers its local providers again.
    let listen = w.grpc_url.trim_start_matches("https://").to_owned();
    let (proc, _) = start_controller_on(w.path(), &w.ca, &listen).await;
    w.controller = Some(proc);
    let t0 = Instant::now();
    loop {
        let services = w.services(TENANT_A).await;
        let names: Vec<String> = services
            .iter()
            .filter_map(|p| p["service_id"].as_str().map(str::to_owned))
            .collect();
        if names.iter().any(|n| n == "acme/web") && names.iter().any(|n| n == "acme/echo") {
            break;
        }
        assert!(
            t0.elapsed() < WAIT,
            "providers not registered again after the controller restart: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "MEASURED: providers listed again {:?} after the controller restarted",
        t0.elapsed()
    );
    live.keep_flowing(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_relay_applies_its_static_policy_rules() {
    let w = World::standalone(&format!(
        "[[policy]]\ntenant = \"{TENANT_A}\"\ncaller = \"*\"\ntarget = \"web\"\ndecision = \"allow\"\n\
         [[policy]]\ntenant = \"{TENANT_A}\"\ncaller = \"{CONSUMER_A2}\"\ntarget = \"web\"\n\
         decision = \"deny\"\n"
    ))
    .await;
    let (web, _web_task) = http_target().await;
    let mut provider = w.agent(
        "provider",
        PROVIDER_A,
        &format!("{}{}", provide("web", web), provide("other", web)),
    );
    let info = provider.ready().await;
    assert_eq!(info["services"][0]["service_id"], "acme/web", "{info}");
    let mut allowed = w.agent(
        "consumer",
        CONSUMER_A,
        &format!(
            "{}{}{}",
            consume("web"),
            consume("other"),
            consume("nosuch")
        ),
    );
    allowed.ready().await;
    let mut denied = w.agent("consumer2", CONSUMER_A2, &consume("web"));
    denied.ready().await;
    // The rules are there from the start: no waiting.
    for _ in 0..3 {
        http_call(allowed.consumer(0))
            .await
            .expect("allowed by the static rule");
    }
    // Same class (exact target): the deny beats the allow.
    expect_rejected(&denied, 0, 403).await;
    // No rule for `other` or `nosuch`: closed world, before the name is even resolved.
    expect_rejected(&allowed, 1, 403).await;
    expect_rejected(&allowed, 2, 403).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_consumer_cuts_its_live_stream_and_the_provider_keeps_serving_others() {
    let w = World::new().await;
    let (echo, _echo_task) = common::echo_server().await;
    let mut provider = w.agent("provider", PROVIDER_A, &provide("echo", echo));
    provider.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("echo"));
    consumer.ready().await;
    let mut other = w.agent("consumer2", CONSUMER_A2, &consume("echo"));
    other.ready().await;
    w.rule(TENANT_A, ANY_A, "echo", "allow", None).await;
    let mut live =
        LiveStream::open_when_allowed(consumer.consumer(0), POLICY_BOUND, "echo never allowed")
            .await;
    live.keep_flowing(Duration::from_millis(300)).await;
    let mut bystander = LiveStream::open(other.consumer(0)).await;
    bystander.keep_flowing(Duration::from_millis(300)).await;

    let t0 = Instant::now();
    let out = w.cli_raw(&["cert", "revoke", "--uri", CONSUMER_A]).await;
    assert!(out.status.success(), "cert revoke: {}", text(&out));
    let (cut, why) = live.wait_cut(t0, POLICY_BOUND).await;
    eprintln!("MEASURED revoke (CLI included) -> live stream cut: {cut:?} ({why}) (target 1 s)");
    // The other consumer's stream is untouched.
    bystander.keep_flowing(Duration::from_millis(500)).await;
    // The revoked agent dials again and is refused at HELLO; its log says why (the relay's
    // close code and reason, not "connection lost").
    let log = w.path().join("consumer.log");
    let says = || {
        std::fs::read_to_string(&log).is_ok_and(|t| {
            t.contains("relay refused the connection (close code 8): identity revoked")
        })
    };
    assert!(
        poll(WAIT, says).await,
        "the revoked agent's log does not name the refusal:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_joined_service_stream_finish_before_the_agent_exits() {
    let w = World::new().await;
    let (echo, _echo_task) = common::echo_server().await;
    let mut provider = w.agent("provider", PROVIDER_A, &provide("echo", echo));
    provider.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("echo"));
    consumer.ready().await;
    w.rule(TENANT_A, ANY_A, "echo", "allow", None).await;
    let mut live =
        LiveStream::open_when_allowed(consumer.consumer(0), POLICY_BOUND, "echo never allowed")
            .await;
    let pid = i32::try_from(consumer.proc.0.id()).expect("pid");
    let term = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    // The joined stream keeps flowing after SIGTERM (the default grace is 30 s).
    live.keep_flowing(Duration::from_millis(500)).await;
    drop(live);
    let exited = poll(WAIT, || matches!(consumer.proc.0.try_wait(), Ok(Some(_)))).await;
    assert!(
        exited,
        "the consumer agent did not exit after its stream ended"
    );
    let status = consumer.proc.0.try_wait().expect("wait").expect("exited");
    eprintln!(
        "MEASURED: consumer agent exited {:?} after SIGTERM ({status}), its stream ended at 500 ms",
        term.elapsed()
    );
    assert!(status.success(), "exit status {status}");
}

/// Review M12, real binaries: agent X of the tenant cannot take `payments` over from agent P
/// (409 `service_taken`, counted; every call still reaches P), until an operator writes a
/// provide rule with `outrelay policy add --method @provide`: then X joins P (issue 22).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_agent_cannot_take_a_service_over_until_a_provide_rule_allows_it() {
    let w = World::new().await;
    let (web, _web_task) = http_target().await;
    let mut p = w.agent("provider-p", PROVIDER_A, &provide("payments", web));
    p.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("payments"));
    consumer.ready().await;
    w.rule(TENANT_A, "*", "payments", "allow", None).await;
    eventually_ok(
        consumer.consumer(0),
        Instant::now(),
        "the consumer reaches P",
    )
    .await;

    // X registers `payments` too: refused (its agent retries with backoff, never ready).
    let mut x = w.agent("provider-x", PROVIDER_A2, &provide("payments", web));
    let taken = || {
        metric(
            &w.relay_scrape(),
            "outrelay_relay_mesh_registrations_total",
            &[("result", "taken")],
        )
    };
    assert!(
        poll(WAIT, || taken() >= 1.0).await,
        "X's REGISTER was not refused as taken: {}",
        mesh_lines(&w.relay_scrape())
    );
    let before = p.streams("provider", "accepted");
    for i in 0..3 {
        http_call(consumer.consumer(0))
            .await
            .unwrap_or_else(|e| panic!("call {i} while X tries: {e}"));
    }
    assert_eq!(
        p.streams("provider", "accepted"),
        before + 3.0,
        "every call reached P"
    );
    assert!(!x.ready.exists(), "X registered `payments` without a rule");

    // The operator lets X provide it: X's next retry is granted and it joins P (P was picked
    // last, so the next call goes to X).
    let o = w
        .cli_raw(&[
            "policy",
            "add",
            "--tenant",
            TENANT_A,
            "--caller",
            PROVIDER_A2,
            "--target",
            "payments",
            "--method",
            "@provide",
            "--decision",
            "allow",
        ])
        .await;
    assert!(
        o.status.success(),
        "policy add --method @provide: {}",
        text(&o)
    );
    x.ready().await;
    let took_over = Instant::now();
    eventually_ok(
        consumer.consumer(0),
        took_over,
        "the consumer after X joined",
    )
    .await;
    assert!(
        poll(WAIT, || x.streams("provider", "accepted") >= 1.0).await,
        "no call reached X after it joined"
    );
}

/// Review M12 on a standalone relay: a `[[policy]]` provide rule in relay.toml lets X join P
/// as a provider of `payments` (issue 22: they share the calls), and pins it (a third agent of
/// the tenant is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_provide_rule_lets_one_agent_take_a_service_over_and_pins_it() {
    let w = World::standalone(&format!(
        "[[policy]]\ntenant = \"{TENANT_A}\"\ncaller = \"*\"\ntarget = \"payments\"\n\
         decision = \"allow\"\n\
         [[policy]]\ntenant = \"{TENANT_A}\"\ncaller = \"{PROVIDER_A2}\"\ntarget = \"payments\"\n\
         method = \"@provide\"\ndecision = \"allow\"\n\
         [[policy]]\ntenant = \"{TENANT_A}\"\ncaller = \"{PROVIDER_A}\"\ntarget = \"payments\"\n\
         method = \"@provide\"\ndecision = \"allow\"\n"
    ))
    .await;
    let (web, _web_task) = http_target().await;
    let mut p = w.agent("provider-p", PROVIDER_A, &provide("payments", web));
    p.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("payments"));
    consumer.ready().await;
    eventually_ok(
        consumer.consumer(0),
        Instant::now(),
        "the consumer reaches P",
    )
    .await;
    assert_eq!(p.streams("provider", "accepted"), 1.0);

    // X is allowed: it joins P; P was picked last, so the next call reaches X.
    let mut x = w.agent("provider-x", PROVIDER_A2, &provide("payments", web));
    x.ready().await;
    http_call(consumer.consumer(0))
        .await
        .expect("a call after X registered");
    assert_eq!(x.streams("provider", "accepted"), 1.0, "the call reached X");
    assert_eq!(p.streams("provider", "accepted"), 1.0);

    // A third agent of the tenant (no provide rule) is refused: the rules pin `payments`.
    let y = w.agent("provider-y", CONSUMER_A2, &provide("payments", web));
    let denied = || {
        metric(
            &w.relay_scrape(),
            "outrelay_relay_mesh_registrations_total",
            &[("result", "provide_denied")],
        )
    };
    assert!(
        poll(WAIT, || denied() >= 1.0).await,
        "the third agent was not refused: {}",
        mesh_lines(&w.relay_scrape())
    );
    assert!(!y.ready.exists(), "the third agent registered `payments`");
    // Both serve, in turn (issue 22): P, then X.
    for i in 0..2 {
        http_call(consumer.consumer(0))
            .await
            .unwrap_or_else(|e| panic!("call {i} after the refusal: {e}"));
    }
    assert_eq!(p.streams("provider", "accepted"), 2.0);
    assert_eq!(x.streams("provider", "accepted"), 2.0);
}

// ---------- stream resume (issue 19) ----------

/// Bytes each way in the resume tests.
const RESUME_BULK_BYTES: u64 = 1 << 30;

/// A standalone relay allowing every agent of tenant A to call `service`.
async fn resume_world(service: &str) -> World {
    World::standalone(&format!(
        "[[policy]]\ntenant = \"{TENANT_A}\"\ncaller = \"*\"\ntarget = \"{service}\"\n\
         decision = \"allow\"\n"
    ))
    .await
}

/// `outrelay_agent_resume_total{result}` of `agent`.
fn agent_resumes(agent: &Agent, result: &str) -> f64 {
    metric(
        &agent.scrape(),
        "outrelay_agent_resume_total",
        &[("result", result)],
    )
}

/// The resume lines of a metrics page (for failure messages).
fn resume_lines(text: &str) -> String {
    text.lines()
        .filter(|l| l.contains("resume") && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks a finished bulk transfer: every byte once, in order, both ways.
async fn assert_bulk_intact(bulk: common::Bulk, echo: JoinHandle<(u64, Vec<u8>)>, bytes: u64) {
    let (sent, sent_hash, write_took, got, got_hash, trailer, read_took) = bulk.finish().await;
    let (echo_total, echo_hash) = tokio::time::timeout(WAIT, echo)
        .await
        .expect("echo finished")
        .expect("echo task");
    eprintln!(
        "{} MiB up in {write_took:?}, back in {read_took:?}; sha256 {}",
        bytes >> 20,
        hex(&sent_hash)
    );
    assert_eq!(sent, bytes);
    assert_eq!(echo_total, bytes, "the target got every byte, none twice");
    assert_eq!(echo_hash, sent_hash, "SHA-256 at the target = SHA-256 sent");
    assert_eq!(got, bytes, "every byte came back, none twice");
    assert_eq!(got_hash, sent_hash, "SHA-256 of the echo = SHA-256 sent");
    assert_eq!(
        trailer, sent_hash,
        "the target's answer after our FIN arrived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gigabyte_each_way_survives_kill_9_of_the_relay_and_its_restart() {
    let mut w = resume_world("bulk").await;
    let (target, echo) = common::hashing_echo_target().await;
    let mut provider = w.agent("provider", PROVIDER_A, &provide("bulk", target));
    provider.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("bulk"));
    consumer.ready().await;
    let bulk = common::Bulk::start(consumer.consumer(0), RESUME_BULK_BYTES).await;
    bulk.wait_received(RESUME_BULK_BYTES / 4).await;
    let at_kill = bulk.received();
    let restarted = w.kill9_and_restart_relay().await;
    let resumed = poll(Duration::from_secs(60), || bulk.received() > at_kill).await;
    assert!(
        resumed,
        "no byte came back within 60 s of the restart:\nconsumer:\n{}\nprovider:\n{}",
        resume_lines(&consumer.scrape()),
        resume_lines(&provider.scrape())
    );
    eprintln!(
        "MEASURED relay kill -9 at {} MiB echoed; restart -> echoed bytes again: {:?}",
        at_kill >> 20,
        restarted.elapsed()
    );
    assert_bulk_intact(bulk, echo, RESUME_BULK_BYTES).await;
    for agent in [&consumer, &provider] {
        assert!(
            agent_resumes(agent, "resumed") >= 1.0,
            "{}:\n{}",
            agent.name,
            resume_lines(&agent.scrape())
        );
        assert_eq!(agent_resumes(agent, "lost"), 0.0);
    }
    let relay = w.relay_scrape();
    assert!(
        metric(
            &relay,
            "outrelay_relay_resume_total",
            &[("result", "resumed")]
        ) >= 1.0,
        "{}",
        resume_lines(&relay)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gigabyte_each_way_moves_to_the_second_relay_when_the_first_gets_sigterm() {
    let w = resume_world("bulk").await;
    let (_relay2, quic2, metrics2) = w.second_relay().await;
    let relays = [w.quic, quic2];
    let (target, echo) = common::hashing_echo_target().await;
    let mut provider = w.agent_on("provider", PROVIDER_A, &relays, &provide("bulk", target));
    provider.ready().await;
    let mut consumer = w.agent_on("consumer", CONSUMER_A, &relays, &consume("bulk"));
    consumer.ready().await;
    // A consumer opens its streams on the first CONNECTED relay in config order, and it is
    // ready once any relay answers: under load relay 2 can come first, and then the stream
    // never touched relay 1 (CI saw exactly that: no resume). Start once both are connected.
    let both = poll(WAIT, || {
        metric(&consumer.scrape(), "outrelay_agent_relays_connected", &[]) == 2.0
    })
    .await;
    assert!(both, "the consumer never connected to both relays");
    let bulk = common::Bulk::start(consumer.consumer(0), RESUME_BULK_BYTES).await;
    bulk.wait_received(RESUME_BULK_BYTES / 4).await;
    let at_term = bulk.received();
    let pid = i32::try_from(w.relay.0.id()).expect("pid");
    let term = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let resumed = poll(Duration::from_secs(60), || bulk.received() > at_term).await;
    assert!(resumed, "no byte came back within 60 s of SIGTERM");
    eprintln!(
        "MEASURED relay 1 SIGTERM at {} MiB echoed; bytes again through relay 2 after {:?}",
        at_term >> 20,
        term.elapsed()
    );
    assert_bulk_intact(bulk, echo, RESUME_BULK_BYTES).await;
    let second = scrape(metrics2);
    assert_eq!(
        metric(
            &second,
            "outrelay_relay_resume_total",
            &[("result", "resumed")]
        ),
        1.0,
        "the stream resumed on relay 2:\n{}",
        resume_lines(&second)
    );
    assert!(agent_resumes(&consumer, "resumed") >= 1.0);
    assert!(agent_resumes(&provider, "resumed") >= 1.0);
}

/// `outrelay relay ARGS --relay unix://<relay NAME's admin socket>` (a blocking child).
fn relay_admin(w: &World, name: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(sibling_binary("outrelay"));
    cmd.arg("relay")
        .args(args)
        .arg("--relay")
        .arg(format!("unix://{}", admin_socket(w.path(), name).display()));
    cmd
}

/// Relay NAME's `drain` progress from `outrelay relay status --output json`.
async fn drain_status(w: &World, name: &str) -> serde_json::Value {
    let o = run_blocking(relay_admin(w, name, &["status", "--output", "json"])).await;
    assert!(o.status.success(), "relay status: {}", text(&o));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    status["drain"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_empties_a_relay_while_a_second_one_takes_its_agents() {
    let w = resume_world("echo").await;
    let (_relay2, quic2, metrics2) = w.second_relay().await;
    let relays = [w.quic, quic2];
    let (echo, _echo_task) = common::echo_server().await;
    // The provider also holds a public lease (on every relay of its list, as agents do).
    let mut provider = w.agent_on(
        "provider",
        PROVIDER_A,
        &relays,
        &format!(
            "{}[[lease]]\nname = \"drained\"\ntls_to = \"{echo}\"\n",
            provide("echo", echo)
        ),
    );
    provider.ready().await;
    let mut consumer = w.agent_on("consumer", CONSUMER_A, &relays, &consume("echo"));
    consumer.ready().await;
    // Ready means one relay is up: wait for both agents on both relays, so the stream opens
    // on relay 1 (the first of the list).
    let t0 = Instant::now();
    while drain_status(&w, "relay").await["agents"] != 2
        || drain_status(&w, "relay2").await["agents"] != 2
    {
        assert!(t0.elapsed() < WAIT, "the agents never reached both relays");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut live =
        LiveStream::open_when_allowed(consumer.consumer(0), WAIT, "no echo through relay 1").await;
    live.keep_flowing(Duration::from_millis(300)).await;
    let before = drain_status(&w, "relay").await;
    assert_eq!(before["draining"], false, "{before}");
    assert_eq!(before["agents"], 2, "both agents are on relay 1: {before}");
    assert_eq!(
        before["leases"], 1,
        "the provider's lease is on relay 1: {before}"
    );
    assert_eq!(
        before["streams"], 1,
        "the live stream goes through relay 1: {before}"
    );

    // Drain relay 1 while the stream keeps echoing: every echo must come back.
    let drain = tokio::spawn(run_blocking(relay_admin(
        &w,
        "relay",
        &["drain", "--wait", "--timeout-s", "60"],
    )));
    live.keep_flowing(Duration::from_secs(3)).await;
    let o = tokio::time::timeout(Duration::from_secs(90), drain)
        .await
        .expect("drain --wait returned")
        .expect("drain task");
    let out = text(&o);
    eprintln!("outrelay relay drain --wait:\n{out}");
    assert!(o.status.success(), "relay drain --wait: {out}");
    let last = out
        .lines()
        .rfind(|l| l.starts_with("draining"))
        .expect("progress lines");
    assert_eq!(
        last, "draining true: 0 agents, 0 leases, 0 pairs, 0 streams left",
        "{out}"
    );
    assert!(out.contains("drained"), "{out}");
    live.keep_flowing(Duration::from_millis(500)).await;

    // Relay 1 stays empty and says so; agents that come back are refused, counted.
    let after = drain_status(&w, "relay").await;
    assert_eq!(after["draining"], true, "{after}");
    assert_eq!(
        (after["agents"].as_u64(), after["streams"].as_u64()),
        (Some(0), Some(0))
    );
    let refused = poll(Duration::from_secs(10), || {
        metric(
            &w.relay_scrape(),
            "outrelay_relay_quic_refused_total",
            &[("reason", "draining")],
        ) >= 1.0
    })
    .await;
    assert!(refused, "no reconnect refused as draining");
    assert_eq!(
        metric(&w.relay_scrape(), "outrelay_relay_draining", &[]),
        1.0
    );

    // Relay 2 carries the resumed stream, and new opens go through it.
    let second = scrape(metrics2);
    assert_eq!(
        metric(
            &second,
            "outrelay_relay_resume_total",
            &[("result", "resumed")]
        ),
        1.0,
        "the stream resumed on relay 2:\n{}",
        resume_lines(&second)
    );
    assert_eq!(metric(&second, "outrelay_relay_draining", &[]), 0.0);
    let mut fresh = LiveStream::open(consumer.consumer(0)).await;
    fresh.keep_flowing(Duration::from_millis(300)).await;
    live.keep_flowing(Duration::from_millis(300)).await;
    assert_eq!(
        metric(&scrape(metrics2), "outrelay_relay_mesh_streams_active", &[]),
        2.0,
        "both streams go through relay 2"
    );
    assert_eq!(drain_status(&w, "relay").await["streams"], 0);
    let second = drain_status(&w, "relay2").await;
    assert_eq!(
        (&second["draining"], &second["agents"], &second["leases"]),
        (
            &serde_json::json!(false),
            &serde_json::json!(2),
            &serde_json::json!(1)
        ),
        "relay 2 holds both agents and the lease: {second}"
    );
    assert_eq!(agent_resumes(&consumer, "lost"), 0.0);
    assert_eq!(agent_resumes(&provider, "lost"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_relay_restart_to_resumed_bytes_over_ten_restarts() {
    const RESTARTS: usize = 10;
    let mut w = resume_world("echo").await;
    let (echo, _echo_task) = common::echo_server().await;
    let mut provider = w.agent("provider", PROVIDER_A, &provide("echo", echo));
    provider.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("echo"));
    consumer.ready().await;
    let mut conn = TcpStream::connect(consumer.consumer(0))
        .await
        .expect("connect consumer");
    let mut took = Vec::with_capacity(RESTARTS);
    for n in 0..=RESTARTS {
        let restarted = if n == 0 {
            Instant::now()
        } else {
            w.kill9_and_restart_relay().await
        };
        // Written at once: the agent keeps it in its ring until the stream resumed.
        let msg = format!("round {n:010}");
        conn.write_all(msg.as_bytes()).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(60), conn.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("restart {n}: no echo within 60 s"))
            .expect("read");
        assert_eq!(back, msg.as_bytes(), "restart {n}");
        if n > 0 {
            took.push(restarted.elapsed());
        }
    }
    took.sort();
    let median = took[RESTARTS / 2];
    eprintln!(
        "MEASURED relay restart (kill -9, new process started) -> resumed echo, {RESTARTS} \
         restarts: median {median:?}, min {:?}, max {:?}",
        took[0],
        took[RESTARTS - 1]
    );
    assert_eq!(agent_resumes(&consumer, "resumed"), RESTARTS as f64);
}

// ---------- hitless upgrade (issue 20) ----------

/// Connections per second per public path during the upgrade test (override with
/// `OUTRELAY_UPGRADE_RATE`; `measure_` runs use a higher one).
const UPGRADE_RATE_PER_S: u64 = 100;
/// Each in-flight transfer of the upgrade test, paced so it spans the hand-over.
const UPGRADE_BULK_BYTES: u64 = 100 * 1024 * 1024;
const UPGRADE_BULK_BYTES_PER_S: u64 = 16 * 1024 * 1024;

/// What one probe connection saw.
#[derive(Debug, Clone)]
enum Probe {
    /// Every byte came back; the time from connect to the first echoed byte.
    Echoed(Duration),
    /// The kernel refused the connect (no listener).
    Refused,
    /// Anything else: reset, closed early, wrong bytes, timeout.
    Failed(String),
}

/// One connection: connect, write `payload`, read it back.
async fn probe(addr: SocketAddr, payload: &[u8]) -> Probe {
    let start = Instant::now();
    let run = async {
        let mut s = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Probe::Refused;
            }
            Err(e) => return Probe::Failed(format!("connect: {e}")),
        };
        if let Err(e) = s.write_all(payload).await {
            return Probe::Failed(format!("write: {e}"));
        }
        let mut back = vec![0u8; payload.len()];
        if let Err(e) = s.read_exact(&mut back[..1]).await {
            return Probe::Failed(format!("first byte: {e}"));
        }
        let first = start.elapsed();
        if let Err(e) = s.read_exact(&mut back[1..]).await {
            return Probe::Failed(format!("read: {e}"));
        }
        if back != payload {
            return Probe::Failed("other bytes came back".into());
        }
        Probe::Echoed(first)
    };
    tokio::time::timeout(CALL_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Probe::Failed(format!("no echo within {CALL_TIMEOUT:?}")))
}

/// A steady connection load: every `1/rate` s one probe per path, until stopped (bounded by
/// `WAIT` x 4 whatever happens).
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<Vec<(&'static str, Instant, Probe)>>,
}

impl Load {
    fn start(paths: Vec<(&'static str, SocketAddr, Vec<u8>)>, rate_per_s: u64) -> Load {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let paths = std::sync::Arc::new(paths);
            let mut probes = tokio::task::JoinSet::new();
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 / rate_per_s.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let bound = Instant::now() + WAIT * 4;
            while !*stopped.borrow() && Instant::now() < bound {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                for i in 0..paths.len() {
                    let paths = paths.clone();
                    probes.spawn(async move {
                        let (label, addr, payload) = &paths[i];
                        let at = Instant::now();
                        (*label, at, probe(*addr, payload).await)
                    });
                }
            }
            let mut out = Vec::new();
            while let Some(r) = probes.join_next().await {
                out.push(r.expect("probe task"));
            }
            out
        });
        Load { stop, task }
    }

    async fn finish(self) -> Vec<(&'static str, Instant, Probe)> {
        let _ = self.stop.send(true);
        tokio::time::timeout(WAIT * 2, self.task)
            .await
            .expect("load finished")
            .expect("load task")
    }
}

/// A UDP client sending a numbered datagram every 10 ms and counting the echoes.
struct UdpPing {
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<(u32, u32)>,
    /// Echoes received so far.
    echoed: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl UdpPing {
    async fn start(port: u16) -> UdpPing {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind UDP client");
        s.connect(("127.0.0.1", port)).await.expect("connect");
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let echoed = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = echoed.clone();
        let task = tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut sent = 0u32;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut buf = [0u8; 64];
            let bound = Instant::now() + WAIT * 4;
            let mut ending: Option<Instant> = None;
            loop {
                if ending.is_some_and(|e| e.elapsed() > Duration::from_secs(1))
                    || Instant::now() > bound
                {
                    return (sent, u32::try_from(seen.len()).unwrap_or(u32::MAX));
                }
                tokio::select! {
                    _ = tick.tick(), if ending.is_none() => {
                        let _ = s.send(&sent.to_be_bytes()).await;
                        sent += 1;
                    }
                    r = s.recv(&mut buf) => {
                        if let Ok(4) = r
                            && seen.insert(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]))
                        {
                            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    _ = stopped.changed(), if ending.is_none() => ending = Some(Instant::now()),
                    _ = tokio::time::sleep(Duration::from_millis(50)), if ending.is_some() => {}
                }
            }
        });
        UdpPing { stop, task, echoed }
    }

    fn echoed(&self) -> u32 {
        self.echoed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// (sent, echoed) after a last second for late echoes.
    async fn finish(self) -> (u32, u32) {
        let _ = self.stop.send(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("UDP ping finished")
            .expect("UDP ping task")
    }
}

/// A real TLS ClientHello for `host` (rustls), replayed by every SNI probe.
fn client_hello(host: &str) -> Vec<u8> {
    use tokio_rustls::rustls;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).expect("server name");
    let mut conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("ClientHello");
    hello
}

/// The port of the `key` address (`tcp_addr`, `udp_addr`) of lease `name` in a ready file.
fn lease_port_in(ready: &serde_json::Value, name: &str, key: &str) -> u16 {
    ready["leases"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .and_then(|l| l[key].as_str())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{key} of lease {name} in {ready}"))
}

/// SIGKILLs a process that is not our child (the relay the upgrade started) on drop.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The `q`-quantile of `v` (sorted here); zero when empty.
fn quantile(v: &mut [Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    // Nearest rank: the smallest value with at least q of the samples at or below it.
    let rank = (1..=v.len())
        .find(|&k| k as f64 >= q * v.len() as f64)
        .unwrap_or(v.len());
    v[rank - 1]
}

/// What the upgrade under load measured.
struct UpgradeFigures {
    refused: usize,
    failed: Vec<String>,
    probes: usize,
    p99_before: Duration,
    p99_during: Duration,
    agents_moved: Duration,
    upgrade_took: Duration,
    udp_sent: u32,
    udp_echoed: u32,
    /// Echoes kept coming after the agents moved.
    udp_echoing_after: bool,
}

/// A standalone relay with TCP and UDP leases, a provider agent with a TLS, two TCP and a UDP
/// lease plus a service, and a consumer of that service. Under a steady load through the SNI
/// path and a TCP lease, with a 100 MiB transfer in flight through a TCP lease and through the
/// service stream and a UDP ping, `outrelay-relay upgrade` hands the relay over to a new
/// process; every transfer must finish intact and no connection may be refused or fail.
async fn upgrade_under_load(rate_per_s: u64) -> (UpgradeFigures, World, KillOnDrop) {
    let (lo, hi) = outrelay_testkit::claim_port_range();
    let w = World::standalone(&format!(
        "[[policy]]\ntenant = \"{TENANT_A}\"\ncaller = \"*\"\ntarget = \"svc\"\n\
         decision = \"allow\"\n\
         [leases]\ntcp = true\nudp = true\nmin_port = {lo}\nmax_port = {hi}\n\
         [ingress]\nclaim_timeout_ms = 10000\n[lifecycle]\nshutdown_grace_ms = 60000\n"
    ))
    .await;
    let d = w.path().to_owned();
    let (echo, _echo_task) = common::echo_server().await;
    let (bulk_target, bulk_echo) = common::hashing_echo_target().await;
    let (svc_target, svc_echo) = common::hashing_echo_target().await;
    let (udp_target, _udp_task) = common::udp_echo_server().await;
    let mut provider = w.agent(
        "provider",
        PROVIDER_A,
        &format!(
            "{}[[lease]]\nname = \"web\"\ntls_to = \"{echo}\"\n\
             [[lease]]\nname = \"raw\"\ntcp_to = \"{echo}\"\n\
             [[lease]]\nname = \"bulk\"\ntcp_to = \"{bulk_target}\"\n\
             [[lease]]\nname = \"ping\"\nudp_to = \"{udp_target}\"\n",
            provide("svc", svc_target)
        ),
    );
    let ready = provider.ready().await;
    let mut consumer = w.agent("consumer", CONSUMER_A, &consume("svc"));
    consumer.ready().await;
    let relay_info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("relay-ready.json")).expect("relay ready file"),
    )
    .expect("relay ready JSON");
    let public_tls = addr_in(&relay_info, "public_tls");
    let web_host = ready["leases"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "web"))
        .and_then(|l| l["hostname"].as_str())
        .unwrap_or_else(|| panic!("hostname of web in {ready}"))
        .to_owned();
    let raw: SocketAddr = ([127, 0, 0, 1], lease_port_in(&ready, "raw", "tcp_addr")).into();
    let bulk: SocketAddr = ([127, 0, 0, 1], lease_port_in(&ready, "bulk", "tcp_addr")).into();
    let ping_port = lease_port_in(&ready, "ping", "udp_addr");

    // Without the eBPF lookup program a TCP lease port gets its listener on the relay's next
    // lease sync tick after the grant: the load starts once `raw` accepts (its echo answers).
    let routed_from = Instant::now();
    while !matches!(probe(raw, b"routed?").await, Probe::Echoed(_)) {
        assert!(
            routed_from.elapsed() < WAIT,
            "lease port {raw} not routed within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let udp = UdpPing::start(ping_port).await;
    let load = Load::start(
        vec![
            ("sni", public_tls, client_hello(&web_host)),
            ("tcp", raw, b"0123456789abcdef".to_vec()),
        ],
        rate_per_s,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lease_bulk =
        common::Bulk::start_paced(bulk, UPGRADE_BULK_BYTES, UPGRADE_BULK_BYTES_PER_S).await;
    let svc_bulk = common::Bulk::start_paced(
        consumer.consumer(0),
        UPGRADE_BULK_BYTES,
        UPGRADE_BULK_BYTES_PER_S,
    )
    .await;
    lease_bulk.wait_received(UPGRADE_BULK_BYTES / 8).await;
    svc_bulk.wait_received(UPGRADE_BULK_BYTES / 8).await;

    let old_pid = i32::try_from(w.relay.0.id()).expect("pid");
    let admin = admin_socket(&d, "relay");
    let upgrade_at = Instant::now();
    let mut cmd = Command::new(sibling_binary("outrelay-relay"));
    cmd.arg("upgrade").arg("--admin-socket").arg(&admin);
    let out = run_blocking(cmd).await;
    let upgrade_took = upgrade_at.elapsed();
    assert!(out.status.success(), "upgrade failed: {}", text(&out));
    let answer: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{}: {e}", text(&out)));
    let new_pid = answer["new_pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or_else(|| panic!("new_pid in {answer}"));
    let new_relay = KillOnDrop(new_pid);
    assert_ne!(new_pid, old_pid, "{answer}");
    // Every agent on the new process: its admin socket (the path moved to it) counts both.
    let mut agents_moved = None;
    let mut last = serde_json::Value::Null;
    while upgrade_at.elapsed() < WAIT {
        last = drain_status(&w, "relay").await;
        if last["agents"].as_u64() >= Some(2) {
            agents_moved = Some(upgrade_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let agents_moved = agents_moved
        .unwrap_or_else(|| panic!("the agents were not on the new relay within {WAIT:?}: {last}"));
    let drops = |addr: SocketAddr| {
        scrape(addr)
            .lines()
            .filter(|l| l.contains("drops_total") && !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let new_info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("relay-ready.json")).expect("new relay ready file"),
    )
    .expect("new relay ready JSON");
    eprintln!(
        "drops of the old relay:\n{}\ndrops of the new relay:\n{}",
        drops(addr_in(&relay_info, "metrics")),
        drops(addr_in(&new_info, "metrics"))
    );
    let during_until = Instant::now() + Duration::from_secs(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let udp_after_move = udp.echoed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let udp_echoing_after = udp.echoed() > udp_after_move;
    let probes = load.finish().await;
    assert_bulk_intact(lease_bulk, bulk_echo, UPGRADE_BULK_BYTES).await;
    assert_bulk_intact(svc_bulk, svc_echo, UPGRADE_BULK_BYTES).await;
    let (udp_sent, udp_echoed) = udp.finish().await;
    assert!(
        agent_resumes(&consumer, "resumed") >= 1.0,
        "the service stream resumed:\n{}",
        resume_lines(&consumer.scrape())
    );
    // The old process ends by itself once its spliced pairs are done.
    let old_gone = poll(WAIT, || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid), None).is_err()
            || std::fs::read_to_string(format!("/proc/{old_pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
    })
    .await;
    assert!(
        old_gone,
        "the old relay {old_pid} still runs {WAIT:?} later"
    );

    let mut before = Vec::new();
    let mut during = Vec::new();
    let mut failed = Vec::new();
    let mut refused = 0;
    for (label, at, p) in &probes {
        match p {
            Probe::Echoed(first) if *at < upgrade_at => before.push(*first),
            Probe::Echoed(first) if *at < during_until => during.push(*first),
            Probe::Echoed(_) => {}
            Probe::Refused => refused += 1,
            Probe::Failed(e) => {
                let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                let ms = if *at >= upgrade_at {
                    ms(*at - upgrade_at)
                } else {
                    -ms(upgrade_at - *at)
                };
                failed.push(format!("{label} started {ms:+} ms from the upgrade: {e}"));
            }
        }
    }
    let figures = UpgradeFigures {
        refused,
        failed,
        probes: probes.len(),
        p99_before: quantile(&mut before, 0.99),
        p99_during: quantile(&mut during, 0.99),
        agents_moved,
        upgrade_took,
        udp_sent,
        udp_echoed,
        udp_echoing_after,
    };
    // The world lives on until the caller's assertions: a failure prints every daemon's log.
    (figures, w, new_relay)
}

fn report_upgrade(f: &UpgradeFigures, rate_per_s: u64) {
    eprintln!(
        "MEASURED upgrade at {rate_per_s} conn/s per path: {} probes, refused {}, failed {}, \
         first byte p99 before {:?} / during {:?}, upgrade command {:?}, every agent on the \
         new process after {:?}, UDP lost {} of {}",
        f.probes,
        f.refused,
        f.failed.len(),
        f.p99_before,
        f.p99_during,
        f.upgrade_took,
        f.agents_moved,
        f.udp_sent - f.udp_echoed.min(f.udp_sent),
        f.udp_sent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_under_load_refuses_nothing_and_every_transfer_finishes() {
    let rate = std::env::var("OUTRELAY_UPGRADE_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(UPGRADE_RATE_PER_S);
    let (f, _world, _new_relay) = upgrade_under_load(rate).await;
    report_upgrade(&f, rate);
    assert!(f.probes > 0);
    assert_eq!(
        f.refused, 0,
        "connections refused during the upgrade: {:?}",
        f.failed
    );
    assert!(f.failed.is_empty(), "failed connections: {:?}", f.failed);
    assert!(
        f.udp_echoing_after,
        "the UDP lease stopped echoing after the upgrade ({} of {})",
        f.udp_echoed, f.udp_sent
    );
}

// ---------- bandwidth limits from the controller (issue 21) ----------

/// The limit the iperf3 tests set, in bits per second (`--rate 200Mbit`).
const LIMIT_BITS_PER_S: f64 = 200e6;
/// How close a limited transfer must come to its limit (the "within 10 %").
const LIMIT_TOLERANCE: f64 = 0.10;

/// `iperf3 -s` on 127.0.0.1 (a free port), killed on drop.
fn iperf3_server(d: &Path, name: &str) -> (Proc, SocketAddr) {
    let port = dead_port();
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]);
    (
        spawn_logged(cmd, &d.join(format!("{name}.log"))),
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
}

/// Waits until TCP lease port `addr` accepts (the relay binds it on its next lease sync).
async fn wait_until_accepting(addr: SocketAddr) {
    let from = Instant::now();
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        assert!(from.elapsed() < WAIT, "lease port {addr} never accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One `iperf3 -c` run of `secs` seconds (first second omitted) through `to`; the receiver's
/// rate in bits per second (`end.sum_received`).
async fn iperf3_received_bits_per_s(to: SocketAddr, secs: u32) -> f64 {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-c", &to.ip().to_string(), "-p", &to.port().to_string()])
        .args(["-t", &secs.to_string(), "-O", "1", "-J"]);
    let o = run_blocking(cmd).await;
    assert!(o.status.success(), "iperf3 through {to}: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("end.sum_received.bits_per_second in {v}"))
}

/// `leases limit --tenant TENANT_A ARGS`.
fn limit<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["leases", "limit", "--tenant", TENANT_A];
    all.extend_from_slice(args);
    all
}

/// Asserts `got` (bits per second) is within [`LIMIT_TOLERANCE`] of `want`.
fn assert_near(what: &str, got: f64, want: f64) {
    let off = (got - want).abs() / want;
    eprintln!(
        "MEASURED {what}: {:.1} Mbit/s, limit {:.1} Mbit/s ({:+.1} %)",
        got / 1e6,
        want / 1e6,
        (got - want) / want * 100.0
    );
    assert!(
        off <= LIMIT_TOLERANCE,
        "{what}: {:.1} Mbit/s is not within 10 % of {:.1} Mbit/s",
        got / 1e6,
        want / 1e6
    );
}

/// Issue 21 "Tests": a controller, a relay following it, an agent with two TCP leases (`lim`,
/// `free`) in front of two iperf3 servers; limits set with the real `outrelay leases limit`.
/// 1. `lim` limited to 200 Mbit/s measures within 10 % of it (receiver side, 4 s, first second
///    omitted) while `free`, unlimited, runs at the same time well above it;
/// 2. a 200 Mbit/s limit on the tenant caps both leases together (sum within 10 %);
/// 3. lowering the limit of a running transfer to 50 Mbit/s shows in its per-interval rate
///    (`-i 0.5`, receiver side with `-R`) within one second of the CLI returning.
/// The phases run one after another (they would share the CPUs otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_bandwidth_limits_hold_iperf3_to_the_limit_and_apply_live() {
    if !have("iperf3", "--version") {
        eprintln!(
            "SKIP: iperf3 not installed (apt-get install iperf3); bandwidth limit test not run"
        );
        return;
    }
    let (lo, hi) = outrelay_testkit::claim_port_range();
    let w = World::with_relay_config(&format!(
        "[leases]\ntcp = true\nmin_port = {lo}\nmax_port = {hi}\n[ingress]\nclaim_timeout_ms = 10000\n"
    ))
    .await;
    let d = w.path().to_owned();
    let (_lim_srv, lim_target) = iperf3_server(&d, "iperf3-lim");
    let (_free_srv, free_target) = iperf3_server(&d, "iperf3-free");
    let mut provider = w.agent(
        "provider",
        PROVIDER_A,
        &format!(
            "[[lease]]\nname = \"lim\"\ntcp_to = \"{lim_target}\"\n\
             [[lease]]\nname = \"free\"\ntcp_to = \"{free_target}\"\n"
        ),
    );
    let ready = provider.ready().await;
    let lim: SocketAddr = ([127, 0, 0, 1], lease_port_in(&ready, "lim", "tcp_addr")).into();
    let free: SocketAddr = ([127, 0, 0, 1], lease_port_in(&ready, "free", "tcp_addr")).into();
    wait_until_accepting(lim).await;
    wait_until_accepting(free).await;

    // 1. One lease limited, one not, at the same time.
    let set = w.cli(&limit(&["--name", "lim", "--rate", "200Mbit"])).await;
    assert_eq!(set[0]["to_service_bytes_per_s"], 25_000_000, "{set}");
    let listed = w.cli(&["leases", "limits", "--tenant", TENANT_A]).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    // The relay gets the decision over its Watch within milliseconds; a second is generous.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (limited, unlimited) = tokio::join!(
        iperf3_received_bits_per_s(lim, 4),
        iperf3_received_bits_per_s(free, 4)
    );
    assert_near("lease limited to 200 Mbit/s", limited, LIMIT_BITS_PER_S);
    eprintln!(
        "MEASURED unlimited lease beside it: {:.1} Mbit/s",
        unlimited / 1e6
    );
    // Loose on purpose: the unlimited lease only has to show it is not held to the limit (an
    // unlimited loopback transfer runs at several Gbit/s; 2x leaves room for a busy machine).
    assert!(
        unlimited >= 2.0 * LIMIT_BITS_PER_S,
        "the unlimited lease ran at {:.1} Mbit/s: held back by the other lease's limit?",
        unlimited / 1e6
    );

    // 2. The tenant's limit caps its two leases together.
    w.cli(&limit(&["--name", "lim", "--clear"])).await;
    w.cli(&limit(&["--rate", "200Mbit"])).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a, b) = tokio::join!(
        iperf3_received_bits_per_s(lim, 4),
        iperf3_received_bits_per_s(free, 4)
    );
    eprintln!(
        "MEASURED two leases under one tenant limit: {:.1} + {:.1} Mbit/s",
        a / 1e6,
        b / 1e6
    );
    assert_near(
        "two leases under a 200 Mbit/s tenant limit",
        a + b,
        LIMIT_BITS_PER_S,
    );
    // Both get a share: waiting directions reserve their turn in the shared bucket, so the
    // first waiter cannot take every token (it did before: 0.0 + 199.9). Loose (a quarter of
    // the limit each): the split is not promised to be even, only that no lease starves.
    assert!(
        a.min(b) >= LIMIT_BITS_PER_S / 4.0,
        "one lease starved under the shared tenant limit: {:.1} + {:.1} Mbit/s",
        a / 1e6,
        b / 1e6
    );

    // 3. A running transfer follows a changed limit within a second.
    w.cli(&limit(&["--clear"])).await;
    w.cli(&limit(&["--name", "lim", "--rate", "200Mbit"])).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (intervals, changed_at) =
        iperf3_with_a_change(&w, lim, &limit(&["--name", "lim", "--rate", "50Mbit"])).await;
    let before: Vec<f64> = intervals
        .iter()
        .filter(|(end, _)| *end < changed_at.0 && *end > Duration::from_millis(1_500))
        .map(|(_, r)| *r)
        .collect();
    // Intervals that start at least one second after the CLI returned.
    let after: Vec<f64> = intervals
        .iter()
        .filter(|(end, _)| *end >= changed_at.1 + Duration::from_millis(1_500))
        .map(|(_, r)| *r)
        .collect();
    eprintln!(
        "MEASURED per-interval rates (Mbit/s) before the change {:?}, from 1 s after it {:?}",
        before
            .iter()
            .map(|r| (r / 1e5).round() / 10.0)
            .collect::<Vec<_>>(),
        after
            .iter()
            .map(|r| (r / 1e5).round() / 10.0)
            .collect::<Vec<_>>()
    );
    assert!(
        !before.is_empty() && after.len() >= 2,
        "{intervals:?} {changed_at:?}"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert_near("before the change", mean(&before), LIMIT_BITS_PER_S);
    assert_near("from 1 s after the change", mean(&after), 50e6);
    for r in &after {
        assert!(
            *r <= 50e6 * 1.25,
            "an interval from 1 s after the change still ran at {:.1} Mbit/s",
            r / 1e6
        );
    }
    drop(provider);
}

/// Runs `iperf3 -R` (service → client, so the client reports what it received) through `to`
/// for 6 s with 0.5 s intervals; after 2 s of it runs `outrelay ARGS`. Returns each interval as
/// (when its line arrived, bits per second), measured from the client's start, and (when the
/// CLI started, when it returned) on the same clock.
async fn iperf3_with_a_change(
    w: &World,
    to: SocketAddr,
    args: &[&str],
) -> (Vec<(Duration, f64)>, (Duration, Duration)) {
    use std::io::BufRead as _;
    let mut child = Command::new("iperf3")
        .args(["-c", &to.ip().to_string(), "-p", &to.port().to_string()])
        .args(["-R", "-t", "6", "-i", "0.5", "-f", "k", "--forceflush"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn iperf3");
    let t0 = Instant::now();
    let stdout = child.stdout.take().expect("stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Duration, String)>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((t0.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut intervals = Vec::new();
    let mut changed = None;
    let deadline = Duration::from_secs(30);
    while let Ok(Some((at, line))) =
        tokio::time::timeout(deadline.saturating_sub(t0.elapsed()), rx.recv()).await
    {
        // "[  5]   1.50-2.00   sec  11.9 MBytes  199880 Kbits/sec" (summary lines carry
        // "sender"/"receiver" and are skipped).
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = fields.iter().position(|f| *f == "Kbits/sec")
            && i > 0
            && !line.contains("sender")
            && !line.contains("receiver")
            && let Ok(kbits) = fields[i - 1].parse::<f64>()
        {
            intervals.push((at, kbits * 1e3));
        }
        if changed.is_none() && at >= Duration::from_secs(2) && !intervals.is_empty() {
            let started = t0.elapsed();
            let v = w.cli(args).await;
            let returned = t0.elapsed();
            eprintln!("limit changed at {started:?}..{returned:?}: {v}");
            changed = Some((started, returned));
        }
    }
    let status = child.wait().expect("iperf3 exit");
    let _ = reader.join();
    assert!(status.success(), "iperf3 -R through {to} failed: {status}");
    (
        intervals,
        changed.expect("the limit was changed during the run"),
    )
}
