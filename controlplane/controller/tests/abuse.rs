//! Attacks on the controller's TCP port and growth sources (review H5, M13, H6/H4 controller
//! side), each mounted against the real `outrelay-controller` binary on loopback, and each with
//! a legitimate admin or relay served meanwhile. Distinct attack sources are distinct loopback
//! addresses (127.0.0.2, 127.0.0.3: all of 127/8 is local on Linux); the legitimate clients
//! come from 127.0.0.1.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    Controller, UUID_A, UUID_B, closed_within, csr, eventually, fingerprint, ip, random_token,
    tcp_from, tls_channel_from,
};
use outrelay_api::pb::{
    self, audit_client::AuditClient, leases_client::LeasesClient, pki_client::PkiClient,
    policy_client::PolicyClient, registry_client::RegistryClient,
};
use outrelay_controller::pki::LeafProfile;
use rustls::pki_types::ServerName;
use tonic::Code;

const GLOBAL: &str = "outrelay://system/admin/ops";
const RELAY: &str = "outrelay://eu-west/relay/r1";

/// Audit rows of `kind` (all tenants), via the admin socket.
async fn audit_rows(c: &Controller, kind: &str) -> Vec<pb::AuditEvent> {
    let mut audit = AuditClient::new(c.unix_channel().await);
    let mut stream = audit
        .query(pb::QueryRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = stream.message().await.expect("row") {
        if ev.kind == kind {
            out.push(ev);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_flood_writes_bounded_aggregated_audit_and_admin_writes_keep_working() {
    let dir = tempfile::tempdir().expect("tmp");
    // A small write queue: one row per refusal (the old behaviour) would overflow it.
    let c = Controller::start(
        dir.path(),
        "[store]\nwrite_queue_max = 128\n[grpc]\nhandshake_timeout_ms = 1000\n",
    );
    let flood = common::Flood::start(&c).await;

    // Meanwhile an admin on TCP mTLS adds policies and revokes identities: every call succeeds.
    let admin = c.cert(GLOBAL, LeafProfile::Client);
    let mut policy = PolicyClient::new(c.channel(Some(&admin)).await);
    let mut pki = PkiClient::new(c.channel(Some(&admin)).await);
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut i = 0u32;
    while started.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        policy
            .add_policy(pb::AddPolicyRequest {
                rule: Some(pb::PolicyRule {
                    tenant: "acme".into(),
                    caller_pattern: "outrelay://acme/agent/*".into(),
                    target_pattern: format!("svc{i}"),
                    decision: pb::Decision::Allow as i32,
                    ..Default::default()
                }),
            })
            .await
            .expect("AddPolicy during the flood");
        let revoked = pki
            .revoke(pb::RevokeRequest {
                uri: format!("outrelay://acme/agent/00000000-0000-4000-8000-{i:012x}"),
            })
            .await
            .expect("Revoke during the flood")
            .into_inner();
        assert!(revoked.newly_revoked);
        worst = worst.max(t.elapsed());
        i += 1;
    }
    let n = flood.stop().await;
    println!(
        "flood: {n} hostile attempts; admin: {i} AddPolicy+Revoke pairs, worst pair {} ms",
        worst.as_millis()
    );
    assert!(i >= 3, "the admin got {i} writes through in 4 s");
    assert!(
        worst < Duration::from_secs(10),
        "worst admin pair {worst:?}"
    );

    // Attacker bounded: every refusal counted, but audit rows only per source and reason.
    let handshakes = c
        .metric("outrelay_controller_refusals_total{reason=\"tls_handshake\"")
        .await;
    let tokens = c
        .metric("outrelay_controller_refusals_total{reason=\"token_unknown\"")
        .await;
    println!("refusals counted: tls_handshake {handshakes}, token_unknown {tokens}");
    assert!(
        handshakes >= 20.0,
        "handshake refusals counted: {handshakes}"
    );
    assert!(tokens >= 50.0, "token refusals counted: {tokens}");
    let rate = c
        .metric("outrelay_controller_refusals_total{reason=\"source_rate\"")
        .await;
    let anon_rate = c
        .metric("outrelay_controller_refusals_total{reason=\"anonymous_rate\"")
        .await;
    println!(
        "connections refused before TLS (source_rate): {rate}; anonymous calls over their rate: {anon_rate}"
    );
    assert!(
        anon_rate >= 1.0,
        "anonymous calls from one source are rate-limited"
    );
    assert!(
        rate >= 1.0,
        "a source reconnecting in a loop is rate-limited"
    );
    let auth = audit_rows(&c, "auth").await;
    println!("auth audit rows: {}", auth.len());
    for r in &auth {
        println!("  {} {} {}", r.caller, r.method, r.reason);
    }
    assert!(
        auth.len() <= 16,
        "refusal audit rows must be aggregated: {} rows for {} refusals",
        auth.len(),
        handshakes + tokens
    );
    assert!(
        auth.iter()
            .any(|r| r.caller == "anonymous@127.0.0.3" && r.method == "Pki.Enroll"),
        "the enroll flood is audited once with its source"
    );
    assert_eq!(
        c.metric("outrelay_controller_store_rejected_total").await,
        0.0,
        "the writer queue never overflowed"
    );
    // The chain still verifies.
    let v = AuditClient::new(c.unix_channel().await)
        .verify(pb::VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(v.ok, "{}", v.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_anonymous_connections_are_capped_and_closed_while_a_relay_watch_keeps_working() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(
        dir.path(),
        "[grpc]\nmax_anonymous_connections = 8\nanonymous_idle_timeout_ms = 6000\n\
         anonymous_max_age_ms = 9000\nmax_connections_per_source = 16\n\
         handshake_timeout_ms = 5000\n",
    );
    let ca_pem = c.ca_pem();
    let relay = c.cert(RELAY, LeafProfile::ClientServer);
    let agent = format!("outrelay://acme/agent/{UUID_A}");

    // The relay's watch, opened before the attack and kept through it.
    let mut reg = RegistryClient::new(c.channel(Some(&relay)).await);
    let mut watch = reg
        .watch(pb::WatchServicesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let snap = watch.message().await.expect("snapshot end").expect("event");
    assert_eq!(snap.kind, pb::watch_event::Kind::SnapshotEnd as i32);

    // Attack 0: a chatty anonymous client (127.0.0.4) that is never idle: its connection is
    // cut at its max age (tonic reconnects it between calls; the metric shows the cut).
    let fp = fingerprint(&c).await;
    let chatty = {
        let (addr, ca_pem) = (c.grpc, ca_pem.clone());
        tokio::spawn(async move {
            let ch = tls_channel_from(addr, Some(ip("127.0.0.4")), &ca_pem, None)
                .await
                .expect("anonymous channel");
            let mut pki = PkiClient::new(ch);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(11) {
                let _ = pki
                    .enroll(pb::EnrollRequest {
                        token: random_token(&fp),
                        csr_pem: "x".into(),
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    eventually("the chatty client is served", || async {
        c.metric("outrelay_controller_refusals_total{reason=\"token_unknown\"")
            .await
            >= 1.0
    })
    .await;

    // Attack 1: 30 idle anonymous TLS connections from 127.0.0.3 (7 slots are left).
    let cfg = Arc::new(common::client_tls(&ca_pem, None));
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let mut idle = Vec::new();
    for _ in 0..30 {
        let tcp = tcp_from(c.grpc, Some(ip("127.0.0.3"))).await.expect("tcp");
        let name = ServerName::try_from("localhost").expect("name");
        if let Ok(tls) = connector.connect(name, tcp).await {
            idle.push(tls);
        }
    }
    // Attack 2: 40 silent TCP connections from 127.0.0.2 (they sit in the handshake).
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(tcp_from(c.grpc, Some(ip("127.0.0.2"))).await.expect("tcp"));
    }
    let t = Instant::now();
    let mut over_anon = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(50)).await {
            over_anon += 1;
        }
    }
    let mut over_source = 0;
    for s in &mut silent {
        if closed_within(s, Duration::from_millis(50)).await {
            over_source += 1;
        }
    }
    println!(
        "closed at once: {over_anon} of 30 anonymous, {over_source} of 40 silent (checked in {} ms)",
        t.elapsed().as_millis()
    );
    assert_eq!(
        over_anon, 23,
        "anonymous beyond the cap of 8 closed, those within kept"
    );
    assert_eq!(
        over_source, 24,
        "one source beyond its cap of 16 closed, those within kept"
    );

    // Meanwhile the relay (127.0.0.1) reconnects a second watch and registers a service; both
    // the old and the new watch see it.
    let t = Instant::now();
    let mut reg2 = RegistryClient::new(c.channel(Some(&relay)).await);
    let mut watch2 = reg2
        .watch(pb::WatchServicesRequest::default())
        .await
        .expect("watch reconnect during the attack")
        .into_inner();
    assert_eq!(
        watch2.message().await.expect("snap").expect("ev").kind,
        pb::watch_event::Kind::SnapshotEnd as i32
    );
    println!("relay watch reconnected in {} ms", t.elapsed().as_millis());
    let register = |name: &str| pb::RegisterServiceRequest {
        tenant: "acme".into(),
        service_name: name.into(),
        agent_uri: agent.clone(),
        relay_id: "r1".into(),
        local_addr: "127.0.0.1:5432".into(),
    };
    reg2.register_service(register("db"))
        .await
        .expect("register");
    for w in [&mut watch, &mut watch2] {
        let ev = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("event within 10 s")
            .expect("stream")
            .expect("event");
        assert_eq!(ev.service_name, "db");
    }

    // The anonymous connections within the cap are closed by the idle timeout / max age.
    let t = Instant::now();
    for s in &mut idle {
        assert!(
            closed_within(s, Duration::from_secs(10)).await,
            "idle anonymous connection closed"
        );
    }
    println!(
        "idle anonymous connections closed after {} ms",
        t.elapsed().as_millis()
    );
    // Past the anonymous max age (the chatty client is cut), the relay's long-lived watch is
    // still served.
    tokio::time::timeout(Duration::from_secs(40), chatty)
        .await
        .expect("chatty client ends")
        .expect("task");
    reg2.register_service(register("cache"))
        .await
        .expect("register");
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("event within 10 s")
        .expect("the relay's first watch survived the anonymous timeouts")
        .expect("event");
    assert_eq!(ev.service_name, "cache");

    let m = c.metrics_text().await;
    let get = |r: &str| {
        common::sum_metric(
            &m,
            &format!("outrelay_controller_refusals_total{{reason=\"{r}\""),
        ) + 0.0
    };
    println!(
        "refusals: anonymous_connections {} source_connections {} anonymous_idle {} anonymous_max_age {}",
        get("anonymous_connections"),
        get("source_connections"),
        get("anonymous_idle"),
        get("anonymous_max_age")
    );
    assert!(get("anonymous_connections") >= 23.0);
    assert!(get("source_connections") >= 24.0);
    assert!(get("anonymous_idle") >= 7.0);
    assert!(get("anonymous_max_age") >= 1.0);
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_with_a_bogus_used_or_expired_token_queues_no_store_write() {
    let dir = tempfile::tempdir().expect("tmp");
    // The anonymous call rate is not what this test is about: set it out of the way.
    let c = Controller::start(
        dir.path(),
        "[audit]\nrefusal_interval_ms = 3600000\n[grpc]\nanonymous_rpcs_per_source_per_s = 100000\n",
    );
    let fp = fingerprint(&c).await;
    let mut admin = PkiClient::new(c.unix_channel().await);
    let token = |ttl: u64| pb::CreateEnrollmentTokenRequest {
        tenant: "acme".into(),
        role: pb::EnrollRole::Agent as i32,
        ttl_seconds: ttl,
        ..Default::default()
    };
    let used = admin
        .create_enrollment_token(token(600))
        .await
        .expect("token")
        .into_inner()
        .token;
    let expired = admin
        .create_enrollment_token(token(1))
        .await
        .expect("token")
        .into_inner()
        .token;
    let mut anon = PkiClient::new(c.channel(None).await);
    anon.enroll(pb::EnrollRequest {
        token: used.clone(),
        csr_pem: csr(None),
    })
    .await
    .expect("legitimate enrollment");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Let the legitimate writes settle, then count.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let jobs_before = c.metric("outrelay_controller_store_jobs_total").await;
    let rows_before = c
        .metric("outrelay_controller_refusal_audit_rows_total")
        .await;
    let csr = csr(None);
    for i in 0..300 {
        let tok = match i % 3 {
            0 => random_token(&fp),
            1 => used.clone(),
            _ => expired.clone(),
        };
        let e = anon
            .enroll(pb::EnrollRequest {
                token: tok,
                csr_pem: csr.clone(),
            })
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    // And the legitimate path still works meanwhile.
    let fresh = admin
        .create_enrollment_token(token(600))
        .await
        .expect("token")
        .into_inner()
        .token;
    let mut jobs_expected_legit = 1.0; // the token's own write
    anon.enroll(pb::EnrollRequest {
        token: fresh,
        csr_pem: csr.clone(),
    })
    .await
    .expect("legitimate enrollment after the attack");
    jobs_expected_legit += 1.0; // one transaction: the token spent with the certificate (M11)
    let rows_metric = "outrelay_controller_refusal_audit_rows_total";
    eventually("refusal rows written", || async {
        c.metric(rows_metric).await - rows_before >= 3.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let jobs = c.metric("outrelay_controller_store_jobs_total").await - jobs_before;
    let audit_rows = c.metric(rows_metric).await - rows_before;
    let refused = c
        .metric("outrelay_controller_refusals_total{reason=\"token_")
        .await;
    println!(
        "300 refused enrollments: {jobs} store jobs ({audit_rows} aggregated audit rows, {jobs_expected_legit} legitimate), {refused} refusals counted"
    );
    assert!(refused >= 300.0);
    assert_eq!(
        audit_rows, 3.0,
        "one row per reason (unknown, used, expired)"
    );
    assert_eq!(
        jobs,
        audit_rows + jobs_expected_legit,
        "a refused token queues no write of its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_loop_is_rate_limited_renewals_add_no_audit_rows_and_prune_removes_old_records() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(
        dir.path(),
        "[pki]\nrenew_burst = 3\nrenew_refill_ms = 3600000\nleaf_lifetime_s = 1\n\
         [retention]\nprune_interval_ms = 200\ntoken_retention_ms = 1\nlease_retention_ms = 1\n\
         cert_retention_ms = 1\n",
    );
    // Renew loop by agent A: 3 pass, then RESOURCE_EXHAUSTED; agent B renews meanwhile.
    let a = c.cert(
        &format!("outrelay://acme/agent/{UUID_A}"),
        LeafProfile::Client,
    );
    let b = c.cert(
        &format!("outrelay://acme/agent/{UUID_B}"),
        LeafProfile::Client,
    );
    let mut pa = PkiClient::new(c.channel(Some(&a)).await);
    let mut pb_ = PkiClient::new(c.channel(Some(&b)).await);
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..30 {
        match pa.renew(pb::RenewRequest { csr_pem: csr(None) }).await {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => limited += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    let t = Instant::now();
    pb_.renew(pb::RenewRequest { csr_pem: csr(None) })
        .await
        .expect("another identity renews meanwhile");
    println!(
        "renew loop: {ok} renewed, {limited} rate-limited; other identity renewed in {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!((ok, limited), (3, 27));
    assert!(
        c.metric("outrelay_controller_refusals_total{reason=\"renew_rate_limited\"")
            .await
            >= 27.0
    );
    let enroll_rows = audit_rows(&c, "enroll").await.len();
    assert_eq!(
        enroll_rows, 4,
        "only the renewals that passed are issued and audited"
    );

    // Lease renewals: durable, but no audit row each.
    let relay = c.cert(RELAY, LeafProfile::ClientServer);
    let mut rel = LeasesClient::new(c.channel(Some(&relay)).await);
    let report = |kind: pb::lease_report_request::Kind| pb::LeaseReportRequest {
        kind: kind as i32,
        tenant: "acme".into(),
        name: "web".into(),
        agent_uri: format!("outrelay://acme/agent/{UUID_A}"),
        lease_kind: "tls".into(),
        ttl_ms: 60_000,
    };
    rel.report(report(pb::lease_report_request::Kind::Grant))
        .await
        .expect("grant");
    for _ in 0..50 {
        rel.report(report(pb::lease_report_request::Kind::Renew))
            .await
            .expect("renew");
    }
    let lease_rows = audit_rows(&c, "lease").await;
    assert_eq!(
        lease_rows.len(),
        1,
        "50 renewals add no audit row: {lease_rows:?}"
    );

    // Retention: a used token, a released lease and expired certificates are pruned.
    let mut admin = PkiClient::new(c.unix_channel().await);
    let tok = admin
        .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
            tenant: "acme".into(),
            role: pb::EnrollRole::Agent as i32,
            ..Default::default()
        })
        .await
        .expect("token")
        .into_inner()
        .token;
    let mut anon = PkiClient::new(c.channel(None).await);
    anon.enroll(pb::EnrollRequest {
        token: tok.clone(),
        csr_pem: csr(None),
    })
    .await
    .expect("enroll");
    rel.report(report(pb::lease_report_request::Kind::Release))
        .await
        .expect("release");
    let mut leases_admin = LeasesClient::new(c.unix_channel().await);
    eventually("released lease record pruned", || async {
        leases_admin
            .clone()
            .list(pb::ListLeasesRequest {
                tenant: "acme".into(),
            })
            .await
            .expect("list")
            .into_inner()
            .leases
            .is_empty()
    })
    .await;
    eventually("used token pruned", || async {
        anon.clone()
            .enroll(pb::EnrollRequest {
                token: tok.clone(),
                csr_pem: csr(None),
            })
            .await
            .is_err_and(|e| e.message().contains("unknown enrollment token"))
    })
    .await;
    eventually("expired certificate records pruned", || async {
        c.metric("outrelay_controller_pruned_rows_total{table=\"issued_certs\"")
            .await
            >= 5.0
    })
    .await;
    // The legitimate lease flow still works after the prune.
    let r = rel
        .report(report(pb::lease_report_request::Kind::Grant))
        .await
        .expect("re-grant")
        .into_inner();
    assert_eq!(
        r.lease.expect("lease").state,
        pb::lease::State::Approved as i32
    );
    let _ = leases_admin
        .list(pb::ListLeasesRequest {
            tenant: "acme".into(),
        })
        .await
        .expect("list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_registration_and_audit_record_are_refused_invalid_argument() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "[registry]\nmax_services_per_agent = 4\n");
    let relay = c.cert(RELAY, LeafProfile::ClientServer);
    let ch = c.channel(Some(&relay)).await;
    let mut reg = RegistryClient::new(ch.clone());
    let mut audit = AuditClient::new(ch);
    let agent = format!("outrelay://acme/agent/{UUID_A}");
    let register = |name: &str, addr: String| pb::RegisterServiceRequest {
        tenant: "acme".into(),
        service_name: name.into(),
        agent_uri: agent.clone(),
        relay_id: "r1".into(),
        local_addr: addr,
    };
    for (what, addr) in [
        ("4 MB local_addr", "x".repeat(4_000_000)),
        ("300-byte local_addr", format!("{}:80", "h".repeat(300))),
        ("no port", "db.internal".to_owned()),
    ] {
        let e = reg
            .register_service(register("db", addr))
            .await
            .expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    for (what, reason) in [
        ("5 MiB audit record", "r".repeat(5 << 20)),
        ("5000-byte reason", "r".repeat(5000)),
    ] {
        let e = audit
            .record(pb::RecordRequest {
                event: Some(pb::AuditEvent {
                    tenant: "acme".into(),
                    caller: "c".into(),
                    decision: pb::Decision::Deny as i32,
                    reason,
                    ..Default::default()
                }),
            })
            .await
            .expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    assert!(
        c.metric("outrelay_controller_refusals_total{reason=\"message_too_large\"")
            .await
            >= 2.0
    );

    // Pipelined registrations past the per-agent cap: exactly 4 services pass.
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut reg = reg.clone();
        let req = register(&format!("s{i}"), "127.0.0.1:80".into());
        calls.push(tokio::spawn(async move { reg.register_service(req).await }));
    }
    let mut ok = 0;
    for call in calls {
        match call.await.expect("task") {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
        }
    }
    assert_eq!(ok, 4, "the per-agent service cap holds under pipelining");
    // A re-registration of a service it has is not refused.
    let listed = RegistryClient::new(c.unix_channel().await)
        .list_services(pb::ListServicesRequest {
            tenant: "acme".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .providers;
    assert_eq!(listed.len(), 4);
    let name = listed[0]
        .service_id
        .rsplit('/')
        .next()
        .expect("name")
        .to_owned();
    reg.register_service(register(&name, "127.0.0.1:81".into()))
        .await
        .expect("re-registering a service it has is not refused");

    // Meanwhile legitimate traffic of another agent and normal audit rows pass.
    reg.register_service(pb::RegisterServiceRequest {
        agent_uri: format!("outrelay://acme/agent/{UUID_B}"),
        ..register("db", "[::1]:5432".into())
    })
    .await
    .expect("another agent registers");
    audit
        .record(pb::RecordRequest {
            event: Some(pb::AuditEvent {
                tenant: "acme".into(),
                caller: "c".into(),
                decision: pb::Decision::Allow as i32,
                method: "m".repeat(200),
                ..Default::default()
            }),
        })
        .await
        .expect("a normal audit record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_stay_below_the_open_files_limit_and_the_admin_socket_keeps_working() {
    let dir = tempfile::tempdir().expect("tmp");
    // 160 descriptors: grpc.max_connections (4096 by default) is lowered to 160 - 64 = 96.
    let c = Controller::start_with_nofile(
        dir.path(),
        "[grpc]\nmax_connections_per_source = 100000\nnew_connections_per_source_per_s = 100000\n\
         handshake_timeout_ms = 30000\n",
        160,
    );
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(tcp_from(c.grpc, Some(ip("127.0.0.2"))).await.expect("tcp"));
    }
    // Meanwhile the admin socket still gets a descriptor and the store writes.
    let t = Instant::now();
    PolicyClient::new(c.unix_channel().await)
        .add_policy(pb::AddPolicyRequest {
            rule: Some(pb::PolicyRule {
                tenant: "acme".into(),
                caller_pattern: "*".into(),
                target_pattern: "db".into(),
                decision: pb::Decision::Allow as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("admin write while the TCP port is full");
    println!(
        "admin AddPolicy over the Unix socket during the fd flood: {} ms",
        t.elapsed().as_millis()
    );
    let mut closed = 0;
    for s in &mut silent {
        if closed_within(s, Duration::from_millis(50)).await {
            closed += 1;
        }
    }
    println!("closed at accept: {closed} of 150 (cap 96 below a 160-descriptor limit)");
    assert_eq!(
        closed, 54,
        "connections beyond the lowered cap are closed at once"
    );
    assert!(
        c.metric("outrelay_controller_refusals_total{reason=\"max_connections\"")
            .await
            >= 54.0
    );
    // Once the attacker's connections are gone, a relay connects over TCP.
    drop(silent);
    let relay = c.cert(RELAY, LeafProfile::ClientServer);
    let agent = format!("outrelay://acme/agent/{UUID_A}");
    eventually("a relay registers over TCP after the flood", || async {
        let Ok(ch) = common::tls_channel(c.grpc, &c.ca_pem(), Some(&relay)).await else {
            return false;
        };
        RegistryClient::new(ch)
            .register_service(pb::RegisterServiceRequest {
                tenant: "acme".into(),
                service_name: "db".into(),
                agent_uri: agent.clone(),
                relay_id: "r1".into(),
                local_addr: "127.0.0.1:5432".into(),
            })
            .await
            .is_ok()
    })
    .await;
}
