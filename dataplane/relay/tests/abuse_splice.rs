//! Review H1 against the real relay binary: stalled readers must not pin the splice engines'
//! pipe budget and freeze the data path of other tenants.
//!
//! Tenant A's TCP lease target writes zeros forever; 60 public clients with `SO_RCVBUF=4096`
//! send nothing and never read. The relay runs with a small pipe budget and short stall and
//! write-stall timeouts. Meanwhile tenant B's echo lease must keep working (1 KiB and 1 MiB,
//! hashes checked), the attackers' pairs must be closed `write_stall`, and the pipe bytes held
//! must stay within the budget.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Stalled public clients of tenant A.
const ATTACKERS: usize = 60;
/// The whole relay's pipe budget (two workers: 512 KiB, eight default pipes, each).
const PIPE_BUDGET_BYTES: u64 = 1024 * 1024;
const WRITE_STALL_MS: u64 = 10_000;
const TENANT_B: &str = "outrelay://tenantb/agent/00000000-0000-4000-8000-0000000000b2";

/// Stalled pipes are given back after 500 ms (their bytes spilled); tenant B splices.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_readers_of_one_tenant_do_not_freeze_another_tenants_lease() {
    for backend in io_backends() {
        eprintln!("--- io backend {backend}");
        stalled_readers_against(backend, 500).await;
    }
}

/// The stall time is longer than the test's look: the attackers keep every pipe, and
/// tenant B moves its bytes on the copy path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_every_pipe_pinned_another_tenant_moves_its_bytes_on_the_copy_path() {
    for backend in io_backends() {
        eprintln!("--- io backend {backend}");
        stalled_readers_against(backend, WRITE_STALL_MS - 1000).await;
    }
}

async fn stalled_readers_against(backend: &str, stall_ms: u64) {
    let pinned = stall_ms > 5000;
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay_with(
        &ca,
        Opts {
            leases: format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
            tables: format!(
                "[pipes]\nbudget_bytes = {PIPE_BUDGET_BYTES}\nmax_pipe_bytes = 262144\n\
                 [splice]\nstall_timeout_ms = {stall_ms}\nwrite_stall_timeout_ms = {WRITE_STALL_MS}\n"
            ),
            backend: Some(backend.to_owned()),
            ..Opts::default()
        },
    )
    .await;
    let (zeros, _zeros_task) = zeros_target().await;
    let (echo, _echo_task) = echo_each_target().await;
    let mut agent_a = Agent::connect(&relay, &ca).await;
    let lease_a = agent_a.register("download", false, true).await;
    agent_a.serve_lease_with(&relay, &lease_a, zeros, 16);
    let mut agent_b = Agent::connect_as(&relay, &ca, TENANT_B).await;
    let lease_b = agent_b.register("echo", false, true).await;
    agent_b.serve_lease(&relay, &lease_b, echo);
    let port_a = std::net::SocketAddr::from(([127, 0, 0, 1], lease_port(&lease_a)));
    let port_b = std::net::SocketAddr::from(([127, 0, 0, 1], lease_port(&lease_b)));

    let before = echo_exchange(port_b, 1024, 1)
        .await
        .unwrap_or_else(|e| panic!("{backend}: tenant B before the attack: {e}"));
    eprintln!("{backend}: tenant B 1 KiB echo before the attack: {before:?}");

    // The attack: 60 readers that never read a byte of an endless download.
    let mut attackers = Vec::with_capacity(ATTACKERS);
    for _ in 0..ATTACKERS {
        attackers.push(stalled_reader(port_a).await.expect("attacker connects"));
    }
    let attack_started = Instant::now();
    relay
        .metric_above("outrelay_relay_splice_pairs_active", (ATTACKERS - 1) as f64)
        .await;
    // Every pipe is filled and stalled by now; stalled ones are being given back (unless
    // the stall time is longer than this test looks).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = relay.scrape().await;
    let copy_active = sample(&during, "outrelay_relay_splice_copy_active");
    eprintln!(
        "{backend}: {:?} into the attack: pipe held {} B, spill held {} B, copy active \
         {copy_active}, pipe waits {}",
        attack_started.elapsed(),
        sample(&during, "outrelay_relay_pipe_held_bytes"),
        sample(&during, "outrelay_relay_splice_spill_held_bytes"),
        sample(&during, "outrelay_relay_pipe_waits_total"),
    );
    if pinned {
        assert!(
            copy_active > 0.0,
            "{backend}: the attackers spilled onto the copy path"
        );
    }
    let fallbacks_before = sample(&during, "outrelay_relay_splice_copy_fallbacks_total");

    // Tenant B still works, while the attackers are connected.
    let small = echo_exchange(port_b, 1024, 2)
        .await
        .unwrap_or_else(|e| panic!("{backend}: tenant B 1 KiB echo under attack: {e}"));
    let bulk = echo_exchange(port_b, 1024 * 1024, 3)
        .await
        .unwrap_or_else(|e| panic!("{backend}: tenant B 1 MiB echo under attack: {e}"));
    eprintln!(
        "{backend}: tenant B under attack: 1 KiB echo in {small:?}, 1 MiB each way in {bulk:?} \
         (hashes equal)"
    );
    // B was served while the attackers were still connected, not after they were cut.
    let served = relay.scrape().await;
    let cut_by_then = sample(
        &served,
        "outrelay_relay_splice_closed_total{reason=\"write_stall\"}",
    );
    if pinned {
        // Stats are published once a second: wait for B's copy-path directions to show.
        let fallbacks = relay
            .metric_above(
                "outrelay_relay_splice_copy_fallbacks_total",
                fallbacks_before,
            )
            .await;
        eprintln!("{backend}: copy-path fallbacks {fallbacks_before} -> {fallbacks}");
    }
    assert!(
        cut_by_then < ATTACKERS as f64,
        "{backend}: tenant B was served only after the attackers were cut ({cut_by_then})"
    );

    // The attackers are cut at their write-stall timeout, counted.
    let write_stalls = relay
        .metric_above(
            "outrelay_relay_splice_closed_total{reason=\"write_stall\"}",
            (ATTACKERS - 1) as f64,
        )
        .await;
    let after = relay.scrape().await;
    let pipe_held = sample(&after, "outrelay_relay_pipe_held_bytes");
    let spills = sample(&after, "outrelay_relay_splice_spills_total");
    eprintln!(
        "{backend}: {write_stalls} pairs closed write_stall after {:?}; pipe held {pipe_held} B; \
         {spills} spills",
        attack_started.elapsed()
    );
    assert!(
        pipe_held <= PIPE_BUDGET_BYTES as f64,
        "{backend}: pipe bytes held {pipe_held} above the budget {PIPE_BUDGET_BYTES}"
    );
    let during_pipe = sample(&during, "outrelay_relay_pipe_held_bytes");
    assert!(
        during_pipe <= PIPE_BUDGET_BYTES as f64,
        "{backend}: pipe bytes held {during_pipe} above the budget during the attack"
    );
    if !pinned {
        assert!(spills > 0.0, "{backend}: no stalled pipe was given back");
    }
    // Tenant B after the attack too.
    echo_exchange(port_b, 1024, 4)
        .await
        .unwrap_or_else(|e| panic!("{backend}: tenant B after the attack: {e}"));
    drop(attackers);
}
