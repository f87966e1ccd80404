//! Who may call what, enrollment and revocation, against a real controller process over real
//! mTLS on 127.0.0.1:0 with a real SQLite file.

mod common;

use common::{Controller, UUID_A, UUID_B, csr, eventually, mint};
use outrelay_api::pb::{
    self, audit_client::AuditClient, pki_client::PkiClient, policy_client::PolicyClient,
};
use outrelay_api::pb::{registry_client::RegistryClient, relays_client::RelaysClient};
use outrelay_controller::pki::{Ca, LeafProfile, new_ca_pem};
use tonic::Code;

const GLOBAL: &str = "outrelay://system/admin/ops";
const RELAY: &str = "outrelay://eu-west/relay/r1";

fn rule(tenant: &str, target: &str) -> pb::PolicyRule {
    pb::PolicyRule {
        tenant: tenant.to_owned(),
        caller_pattern: "outrelay://acme/agent/*".to_owned(),
        target_pattern: target.to_owned(),
        decision: pb::Decision::Allow as i32,
        ..Default::default()
    }
}

/// Audit rows of kind `auth` (refusals), via a global admin.
async fn refusals(c: &Controller) -> Vec<pb::AuditEvent> {
    let admin = c.cert(GLOBAL, LeafProfile::Client);
    let mut audit = AuditClient::new(c.channel(Some(&admin)).await);
    let mut stream = audit
        .query(pb::QueryRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = stream.message().await.expect("row") {
        if ev.kind == "auth" {
            out.push(ev);
        }
    }
    out
}

async fn refused_audited(c: &Controller, caller: &str, method: &str) {
    let (caller, method) = (caller.to_owned(), method.to_owned());
    eventually(&format!("audit row for {caller} {method}"), || async {
        refusals(c).await.iter().any(|e| {
            e.caller == caller && e.method == method && e.decision == pb::Decision::Deny as i32
        })
    })
    .await;
}

#[tokio::test]
async fn invalid_rules_name_the_field() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let admin = c.cert(GLOBAL, LeafProfile::Client);
    let mut policy = PolicyClient::new(c.channel(Some(&admin)).await);
    let cases = [
        (
            pb::PolicyRule {
                tenant: String::new(),
                ..rule("acme", "db")
            },
            "rule.tenant",
        ),
        (
            pb::PolicyRule {
                decision: 9,
                ..rule("acme", "db")
            },
            "rule.decision",
        ),
        (
            pb::PolicyRule {
                target_pattern: "x".repeat(513),
                ..rule("acme", "db")
            },
            "rule.target_pattern",
        ),
        (
            pb::PolicyRule {
                caller_pattern: String::new(),
                ..rule("acme", "db")
            },
            "rule.caller_pattern",
        ),
    ];
    for (r, field) in cases {
        let e = policy
            .add_policy(pb::AddPolicyRequest { rule: Some(r) })
            .await
            .expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let id = policy
        .add_policy(pb::AddPolicyRequest {
            rule: Some(rule("acme", "db")),
        })
        .await
        .expect("valid rule")
        .into_inner()
        .id;
    let listed = policy
        .list_policies(pb::ListPoliciesRequest {
            tenant: "acme".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .rules;
    assert_eq!(
        listed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec![id.as_str()]
    );
}

#[tokio::test]
async fn relay_may_not_administer_or_impersonate_another_relay() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let relay = c.cert(RELAY, LeafProfile::ClientServer);
    let ch = c.channel(Some(&relay)).await;
    let e = PolicyClient::new(ch.clone())
        .add_policy(pb::AddPolicyRequest {
            rule: Some(rule("acme", "db")),
        })
        .await
        .expect_err("relay cannot add policy");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = RelaysClient::new(ch.clone())
        .upsert_relay(pb::UpsertRelayRequest {
            id: "r2".into(),
            region: "eu-west".into(),
            endpoint: "x:1".into(),
        })
        .await
        .expect_err("other relay id");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = RegistryClient::new(ch.clone())
        .register_service(pb::RegisterServiceRequest {
            tenant: "acme".into(),
            service_name: "db".into(),
            agent_uri: format!("outrelay://acme/agent/{UUID_A}"),
            relay_id: "r2".into(),
            local_addr: "127.0.0.1:5432".into(),
        })
        .await
        .expect_err("register as another relay");
    assert_eq!(e.code(), Code::PermissionDenied);
    // Its own id works.
    RelaysClient::new(ch.clone())
        .upsert_relay(pb::UpsertRelayRequest {
            id: "r1".into(),
            region: "eu-west".into(),
            endpoint: "r1:7443".into(),
        })
        .await
        .expect("own heartbeat");
    refused_audited(&c, RELAY, "Policy.AddPolicy").await;
    refused_audited(&c, RELAY, "Relays.UpsertRelay").await;
    refused_audited(&c, RELAY, "Registry.RegisterService").await;
}

#[tokio::test]
async fn agent_may_only_renew_itself() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let uri = format!("outrelay://acme/agent/{UUID_A}");
    let agent = c.cert(&uri, LeafProfile::Client);
    let ch = c.channel(Some(&agent)).await;
    let e = PolicyClient::new(ch.clone())
        .list_policies(pb::ListPoliciesRequest {
            tenant: "acme".into(),
        })
        .await
        .expect_err("agent cannot list policies");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = AuditClient::new(ch.clone())
        .record(pb::RecordRequest {
            event: Some(pb::AuditEvent::default()),
        })
        .await
        .expect_err("agent cannot record audit");
    assert_eq!(e.code(), Code::PermissionDenied);
    let renewed = PkiClient::new(ch.clone())
        .renew(pb::RenewRequest { csr_pem: csr(None) })
        .await
        .expect("renew own identity")
        .into_inner();
    assert_eq!(renewed.identity, uri);
    let other = format!("outrelay://acme/agent/{UUID_B}");
    let e = PkiClient::new(ch.clone())
        .renew(pb::RenewRequest {
            csr_pem: csr(Some(&other)),
        })
        .await
        .expect_err("renew for another identity");
    assert_eq!(e.code(), Code::PermissionDenied);
    refused_audited(&c, &uri, "Policy.ListPolicies").await;
    refused_audited(&c, &uri, "Pki.Renew").await;
}

#[tokio::test]
async fn tenant_admin_is_confined_to_its_tenant() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let admin_uri = "outrelay://acme/admin/alice";
    let admin = c.cert(admin_uri, LeafProfile::Client);
    let mut policy = PolicyClient::new(c.channel(Some(&admin)).await);
    policy
        .add_policy(pb::AddPolicyRequest {
            rule: Some(rule("acme", "db")),
        })
        .await
        .expect("own tenant");
    let e = policy
        .add_policy(pb::AddPolicyRequest {
            rule: Some(rule("globex", "db")),
        })
        .await
        .expect_err("other tenant");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = policy
        .list_policies(pb::ListPoliciesRequest {
            tenant: "globex".into(),
        })
        .await
        .expect_err("other tenant list");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = PkiClient::new(c.channel(Some(&admin)).await)
        .revoke(pb::RevokeRequest {
            uri: format!("outrelay://globex/agent/{UUID_A}"),
        })
        .await
        .expect_err("revoke in other tenant");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = AuditClient::new(c.channel(Some(&admin)).await)
        .verify(pb::VerifyRequest {})
        .await
        .expect_err("verify is global");
    assert_eq!(e.code(), Code::PermissionDenied);
    refused_audited(&c, admin_uri, "Policy.AddPolicy").await;
    refused_audited(&c, admin_uri, "Pki.Revoke").await;
}

#[tokio::test]
async fn wrong_ca_expired_and_revoked_certificates_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let (other_cert, other_key) = new_ca_pem("intruder").expect("ca");
    let intruder = Ca::from_pem(&other_cert, &other_key).expect("ca");
    let foreign = mint(
        &intruder,
        GLOBAL,
        LeafProfile::Client,
        time::OffsetDateTime::now_utc(),
    );
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let expired = mint(&c.ca(), GLOBAL, LeafProfile::Client, past);
    for (what, cert) in [("wrong CA", &foreign), ("expired", &expired)] {
        let result = match common::tls_channel(c.grpc, &c.ca_pem(), Some(cert)).await {
            Err(_) => Err(()),
            Ok(ch) => PolicyClient::new(ch)
                .list_policies(pb::ListPoliciesRequest {
                    tenant: "acme".into(),
                })
                .await
                .map(|_| ())
                .map_err(|_| ()),
        };
        assert!(result.is_err(), "{what} certificate must be refused");
    }
    eventually("two audited handshake refusals", || async {
        refusals(&c)
            .await
            .iter()
            .filter(|e| e.method == "tls.handshake" && e.reason.contains("tls handshake refused"))
            .count()
            >= 2
    })
    .await;

    // Revocation is by identity: the original and a renewed certificate are both refused.
    let uri = format!("outrelay://acme/agent/{UUID_A}");
    let agent = c.cert(&uri, LeafProfile::Client);
    let (csr_pem, key_pem) = common::csr_with_key();
    let renewed = PkiClient::new(c.channel(Some(&agent)).await)
        .renew(pb::RenewRequest { csr_pem })
        .await
        .expect("renew")
        .into_inner();
    let renewed = (renewed.cert_pem, key_pem);
    let admin = c.cert(GLOBAL, LeafProfile::Client);
    let newly = PkiClient::new(c.channel(Some(&admin)).await)
        .revoke(pb::RevokeRequest { uri: uri.clone() })
        .await
        .expect("revoke")
        .into_inner()
        .newly_revoked;
    assert!(newly);
    for cert in [&agent, &renewed] {
        let e = PkiClient::new(c.channel(Some(cert)).await)
            .renew(pb::RenewRequest { csr_pem: csr(None) })
            .await
            .expect_err("revoked identity");
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.message().contains("revoked"), "{}", e.message());
    }
    refused_audited(&c, &uri, "Pki.Renew").await;
    // Relays following revocations get the snapshot.
    let relay = c.cert(RELAY, LeafProfile::ClientServer);
    let mut watch = PkiClient::new(c.channel(Some(&relay)).await)
        .watch_revocations(pb::WatchRevocationsRequest {})
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("event").expect("some");
    assert_eq!(first.uri, uri);
    let end = watch.message().await.expect("event").expect("some");
    assert_eq!(end.kind, pb::revocation_event::Kind::SnapshotEnd as i32);
}

#[tokio::test]
async fn enrollment_tokens_are_single_use_even_across_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let admin = c.cert(GLOBAL, LeafProfile::Client);
    let token = PkiClient::new(c.channel(Some(&admin)).await)
        .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
            tenant: "acme".into(),
            role: pb::EnrollRole::Agent as i32,
            ..Default::default()
        })
        .await
        .expect("token")
        .into_inner();
    assert!(token.token.ends_with(&token.ca_fingerprint_sha256));
    let anon = c.channel(None).await;
    let cert = PkiClient::new(anon.clone())
        .enroll(pb::EnrollRequest {
            token: token.token.clone(),
            csr_pem: csr(None),
        })
        .await
        .expect("enroll")
        .into_inner();
    assert!(
        cert.identity.starts_with("outrelay://acme/agent/"),
        "{}",
        cert.identity
    );
    let e = PkiClient::new(anon.clone())
        .enroll(pb::EnrollRequest {
            token: token.token.clone(),
            csr_pem: csr(None),
        })
        .await
        .expect_err("second use");
    assert_eq!(e.code(), Code::PermissionDenied);
    // Anonymous callers get nothing else.
    let e = PolicyClient::new(anon)
        .list_policies(pb::ListPoliciesRequest {
            tenant: "acme".into(),
        })
        .await
        .expect_err("anonymous");
    assert_eq!(e.code(), Code::PermissionDenied);

    // A token bound to a uuid with a CSR naming another identity is refused.
    let bound = PkiClient::new(c.channel(Some(&admin)).await)
        .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
            tenant: "acme".into(),
            role: pb::EnrollRole::Agent as i32,
            agent_uuid: UUID_A.into(),
            ..Default::default()
        })
        .await
        .expect("bound token")
        .into_inner();
    let e = PkiClient::new(c.channel(None).await)
        .enroll(pb::EnrollRequest {
            token: bound.token,
            csr_pem: csr(Some(&format!("outrelay://acme/agent/{UUID_B}"))),
        })
        .await
        .expect_err("csr for another uri");
    assert_eq!(e.code(), Code::PermissionDenied);

    let c = c.restart();
    let e = PkiClient::new(c.channel(None).await)
        .enroll(pb::EnrollRequest {
            token: token.token,
            csr_pem: csr(None),
        })
        .await
        .expect_err("replay after restart");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("already used"), "{}", e.message());

    // Relay tokens produce relay identities.
    let admin = c.cert(GLOBAL, LeafProfile::Client);
    let rt = PkiClient::new(c.channel(Some(&admin)).await)
        .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
            role: pb::EnrollRole::Relay as i32,
            relay_region: "eu-west".into(),
            relay_id: "r9".into(),
            ..Default::default()
        })
        .await
        .expect("relay token")
        .into_inner();
    let cert = PkiClient::new(c.channel(None).await)
        .enroll(pb::EnrollRequest {
            token: rt.token,
            csr_pem: csr(None),
        })
        .await
        .expect("relay enroll")
        .into_inner();
    assert_eq!(cert.identity, "outrelay://eu-west/relay/r9");
}

#[tokio::test]
async fn watches_send_snapshot_then_live_and_registry_resolves_live_relays() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "[registry]\nrelay_down_after_ms = 400\n");
    let admin = c.cert(GLOBAL, LeafProfile::Client);
    let mut policy = PolicyClient::new(c.channel(Some(&admin)).await);
    let first = policy
        .add_policy(pb::AddPolicyRequest {
            rule: Some(rule("acme", "db")),
        })
        .await
        .expect("add")
        .into_inner()
        .id;
    let relay = c.cert(RELAY, LeafProfile::ClientServer);
    let rch = c.channel(Some(&relay)).await;
    let mut w = PolicyClient::new(rch.clone())
        .watch(pb::WatchPoliciesRequest {
            tenant: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let ev = w.message().await.expect("ev").expect("some");
    assert_eq!(ev.kind, pb::policy_event::Kind::Added as i32);
    assert_eq!(ev.rule.map(|r| r.id), Some(first));
    let ev = w.message().await.expect("ev").expect("some");
    assert_eq!(ev.kind, pb::policy_event::Kind::SnapshotEnd as i32);
    let second = policy
        .add_policy(pb::AddPolicyRequest {
            rule: Some(rule("globex", "*")),
        })
        .await
        .expect("add")
        .into_inner()
        .id;
    let ev = w.message().await.expect("ev").expect("some");
    assert_eq!(ev.rule.map(|r| r.id), Some(second.clone()));
    policy
        .remove_policy(pb::RemovePolicyRequest {
            tenant: "globex".into(),
            id: second.clone(),
        })
        .await
        .expect("remove");
    let ev = w.message().await.expect("ev").expect("some");
    assert_eq!(ev.kind, pb::policy_event::Kind::Removed as i32);
    assert_eq!(ev.removed_id, second);

    // Registry: two providers of one service; resolve only while the relay heartbeats.
    RelaysClient::new(rch.clone())
        .upsert_relay(pb::UpsertRelayRequest {
            id: "r1".into(),
            region: "eu-west".into(),
            endpoint: "r1:7443".into(),
        })
        .await
        .expect("heartbeat");
    let mut reg = RegistryClient::new(rch.clone());
    for uuid in [UUID_A, UUID_B] {
        reg.register_service(pb::RegisterServiceRequest {
            tenant: "acme".into(),
            service_name: "db".into(),
            agent_uri: format!("outrelay://acme/agent/{uuid}"),
            relay_id: "r1".into(),
            local_addr: "127.0.0.1:5432".into(),
        })
        .await
        .expect("register");
    }
    let providers = reg
        .resolve(pb::ResolveRequest {
            tenant: "acme".into(),
            service_name: "db".into(),
            caller_region: "eu-west".into(),
        })
        .await
        .expect("resolve")
        .into_inner()
        .providers;
    assert_eq!(providers.len(), 2);
    assert_eq!(providers[0].relay_endpoint, "r1:7443");
    let mut rw = reg
        .watch(pb::WatchServicesRequest {
            tenant: "acme".into(),
            service_names: vec![],
        })
        .await
        .expect("registry watch")
        .into_inner();
    for _ in 0..2 {
        let ev = rw.message().await.expect("ev").expect("some");
        assert_eq!(ev.kind, pb::watch_event::Kind::Register as i32);
    }
    let ev = rw.message().await.expect("ev").expect("some");
    assert_eq!(ev.kind, pb::watch_event::Kind::SnapshotEnd as i32);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let providers = reg
        .resolve(pb::ResolveRequest {
            tenant: "acme".into(),
            service_name: "db".into(),
            caller_region: String::new(),
        })
        .await
        .expect("resolve")
        .into_inner()
        .providers;
    assert!(
        providers.is_empty(),
        "silent relay must not be resolved: {providers:?}"
    );
}

#[tokio::test]
async fn leases_auto_manual_quota_and_ban() {
    use outrelay_api::pb::leases_client::LeasesClient;
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let admin = c.cert("outrelay://acme/admin/alice", LeafProfile::Client);
    let relay = c.cert(RELAY, LeafProfile::ClientServer);
    let mut adm = LeasesClient::new(c.channel(Some(&admin)).await);
    let mut rel = LeasesClient::new(c.channel(Some(&relay)).await);
    // Quotas, modes and bans are operator controls (review M6): a global admin sets them.
    let mut ops = LeasesClient::new(c.channel(Some(&c.cert(GLOBAL, LeafProfile::Client))).await);
    let grant = |name: &str| pb::LeaseReportRequest {
        kind: pb::lease_report_request::Kind::Grant as i32,
        tenant: "acme".into(),
        name: name.into(),
        agent_uri: format!("outrelay://acme/agent/{UUID_A}"),
        lease_kind: "tls".into(),
        ttl_ms: 60_000,
    };
    let r = rel.report(grant("web")).await.expect("auto").into_inner();
    assert_eq!(
        r.lease.expect("lease").state,
        pb::lease::State::Approved as i32
    );
    ops.set_approval_mode(pb::SetApprovalModeRequest {
        tenant: "acme".into(),
        mode: pb::ApprovalMode::Manual as i32,
    })
    .await
    .expect("manual");
    let r = rel.report(grant("api")).await.expect("manual").into_inner();
    assert_eq!(r.message, "pending_approval");
    let id = r.lease.expect("lease").id;
    let approved = adm
        .approve(pb::LeaseActionRequest {
            tenant: "acme".into(),
            id: id.clone(),
        })
        .await
        .expect("approve")
        .into_inner();
    assert_eq!(
        approved.lease.expect("lease").state,
        pb::lease::State::Approved as i32
    );
    ops.set_quota(pb::SetQuotaRequest {
        tenant: "acme".into(),
        max_leases: 2,
    })
    .await
    .expect("quota");
    let r = rel
        .report(grant("third"))
        .await
        .expect("quota")
        .into_inner();
    assert_eq!(r.message, "quota_exceeded");
    ops.ban(pb::LeaseActionRequest {
        tenant: "acme".into(),
        id,
    })
    .await
    .expect("ban");
    let r = rel.report(grant("api")).await.expect("banned").into_inner();
    assert_eq!(r.message, "banned");
    let e = adm
        .list(pb::ListLeasesRequest {
            tenant: "globex".into(),
        })
        .await
        .expect_err("other tenant");
    assert_eq!(e.code(), Code::PermissionDenied);
    let listed = adm
        .list(pb::ListLeasesRequest {
            tenant: String::new(),
        })
        .await
        .expect("list")
        .into_inner()
        .leases;
    assert_eq!(listed.len(), 2);
}

#[tokio::test]
async fn a_renewal_after_release_and_regrant_renews_the_live_record() {
    use outrelay_api::pb::leases_client::LeasesClient;
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let admin = c.cert("outrelay://acme/admin/alice", LeafProfile::Client);
    let relay = c.cert(RELAY, LeafProfile::ClientServer);
    let mut adm = LeasesClient::new(c.channel(Some(&admin)).await);
    let mut rel = LeasesClient::new(c.channel(Some(&relay)).await);
    let report = |kind: pb::lease_report_request::Kind| pb::LeaseReportRequest {
        kind: kind as i32,
        tenant: "acme".into(),
        name: "web".into(),
        agent_uri: format!("outrelay://acme/agent/{UUID_A}"),
        lease_kind: "tls".into(),
        ttl_ms: 60_000,
    };
    use pb::lease_report_request::Kind;
    // Several release/re-grant cycles: each leaves an older record id behind that a lookup by
    // name must never find again.
    let mut live = String::new();
    for _ in 0..8 {
        let granted = rel.report(report(Kind::Grant)).await.expect("grant");
        live = granted.into_inner().lease.expect("lease").id;
        let renewed = rel.report(report(Kind::Renew)).await.expect("renew");
        let renewed = renewed.into_inner().lease.expect("lease");
        assert_eq!(renewed.id, live, "the renewal found a stale record");
        assert_eq!(renewed.state, pb::lease::State::Approved as i32);
        rel.report(report(Kind::Release)).await.expect("release");
    }
    rel.report(report(Kind::Grant)).await.expect("grant");
    rel.report(report(Kind::Renew)).await.expect("renew");
    let listed = adm
        .list(pb::ListLeasesRequest {
            tenant: "acme".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .leases;
    let web: Vec<_> = listed.iter().filter(|l| l.name == "web").collect();
    assert_eq!(web.len(), 1, "{listed:?}");
    assert_eq!(web[0].state, pb::lease::State::Approved as i32);
    assert_ne!(web[0].id, live, "the last grant made a new record");
}

#[tokio::test]
async fn unix_socket_root_is_global_admin() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "SKIPPED unix_socket_root_is_global_admin: not running as root, so SO_PEERCRED admin mapping cannot be exercised"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let ch = c.unix_channel().await;
    PolicyClient::new(ch.clone())
        .add_policy(pb::AddPolicyRequest {
            rule: Some(rule("acme", "db")),
        })
        .await
        .expect("root over unix socket");
    let v = AuditClient::new(ch)
        .verify(pb::VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(v.ok);
    assert_eq!(v.row_count, 1);
}
