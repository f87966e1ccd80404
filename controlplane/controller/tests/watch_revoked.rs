//! Review M5 (b): a watch stream ends as soon as its caller's identity is revoked, so a revoked
//! relay stops receiving every tenant's rules, registry, lease decisions and revocations; another
//! relay's streams keep going.

mod common;

use std::time::{Duration, Instant};

use common::Controller;
use outrelay_api::pb::{
    self, leases_client::LeasesClient, pki_client::PkiClient, policy_client::PolicyClient,
    registry_client::RegistryClient,
};
use outrelay_controller::pki::LeafProfile;
use tonic::Code;

const GLOBAL: &str = "outrelay://system/admin/ops";
const REVOKED: &str = "outrelay://eu-west/relay/r1";
const OTHER: &str = "outrelay://eu-west/relay/r2";
/// Bound on each wait (the machine is shared): the stream ends in milliseconds.
const WAIT: Duration = Duration::from_secs(10);

/// The four watch streams of one relay.
struct Watches {
    policy: tonic::Streaming<pb::PolicyEvent>,
    registry: tonic::Streaming<pb::WatchEvent>,
    leases: tonic::Streaming<pb::LeaseDecision>,
    revocations: tonic::Streaming<pb::RevocationEvent>,
}

async fn watch_all(c: &Controller, uri: &str) -> Watches {
    let cert = c.cert(uri, LeafProfile::ClientServer);
    let ch = c.channel(Some(&cert)).await;
    let mut policy = PolicyClient::new(ch.clone())
        .watch(pb::WatchPoliciesRequest::default())
        .await
        .expect("Policy.Watch")
        .into_inner();
    // No rule yet: the snapshot is its end marker alone.
    let ev = policy.message().await.expect("event").expect("some");
    assert_eq!(ev.kind, pb::policy_event::Kind::SnapshotEnd as i32);
    let registry = RegistryClient::new(ch.clone())
        .watch(pb::WatchServicesRequest::default())
        .await
        .expect("Registry.Watch")
        .into_inner();
    let leases = LeasesClient::new(ch.clone())
        .watch(pb::WatchLeasesRequest::default())
        .await
        .expect("Leases.Watch")
        .into_inner();
    let revocations = PkiClient::new(ch)
        .watch_revocations(pb::WatchRevocationsRequest::default())
        .await
        .expect("Pki.WatchRevocations")
        .into_inner();
    Watches {
        policy,
        registry,
        leases,
        revocations,
    }
}

/// Reads `stream` until it ends; returns how it ended (`None`: a clean end) and what it
/// delivered before that. Panics if it stays open for `WAIT`.
async fn until_end<T: std::fmt::Debug>(
    what: &str,
    stream: &mut tonic::Streaming<T>,
) -> (Option<Code>, Vec<T>) {
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{what}: still open {WAIT:?} after the revocation"));
        match next {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (None, got),
            Err(status) => return (Some(status.code()), got),
        }
    }
}

#[tokio::test]
async fn a_revoked_relays_watches_end_and_it_gets_no_new_rule_while_another_relay_does() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let admin = c.cert(GLOBAL, LeafProfile::Client);
    let admin_ch = c.channel(Some(&admin)).await;
    let mut revoked = watch_all(&c, REVOKED).await;
    let mut other = watch_all(&c, OTHER).await;

    let started = Instant::now();
    let r = PkiClient::new(admin_ch.clone())
        .revoke(pb::RevokeRequest {
            uri: REVOKED.into(),
        })
        .await
        .expect("Revoke")
        .into_inner();
    assert!(r.newly_revoked);
    let (code, before) = until_end("revoked relay's Policy.Watch", &mut revoked.policy).await;
    eprintln!(
        "MEASURED: the revoked relay's Policy.Watch ended {:?} after Revoke was called",
        started.elapsed()
    );
    assert_eq!(code, Some(Code::PermissionDenied));
    assert!(before.is_empty(), "events before the end: {before:?}");

    // A rule added after the revocation reaches the other relay, never the revoked one.
    let id = PolicyClient::new(admin_ch)
        .add_policy(pb::AddPolicyRequest {
            rule: Some(pb::PolicyRule {
                tenant: "acme".into(),
                caller_pattern: "outrelay://acme/agent/*".into(),
                target_pattern: "db".into(),
                decision: pb::Decision::Allow as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("add")
        .into_inner()
        .id;
    let ev = tokio::time::timeout(WAIT, other.policy.message())
        .await
        .expect("the other relay's event in time")
        .expect("the other relay's stream is healthy")
        .expect("an event");
    assert_eq!(ev.kind, pb::policy_event::Kind::Added as i32);
    assert_eq!(ev.rule.map(|r| r.id), Some(id));
    assert!(
        tokio::time::timeout(WAIT, revoked.policy.message())
            .await
            .expect("an ended stream answers at once")
            .ok()
            .flatten()
            .is_none(),
        "the revoked relay got an event after its stream ended"
    );

    // Its other watches ended too (what they delivered before is the snapshot, if anything).
    let (code, _) = until_end("Registry.Watch", &mut revoked.registry).await;
    assert_eq!(code, Some(Code::PermissionDenied));
    let (code, _) = until_end("Leases.Watch", &mut revoked.leases).await;
    assert_eq!(code, Some(Code::PermissionDenied));
    let (code, _) = until_end("Pki.WatchRevocations", &mut revoked.revocations).await;
    assert_eq!(code, Some(Code::PermissionDenied));

    // A new watch of the revoked relay is refused outright.
    let cert = c.cert(REVOKED, LeafProfile::ClientServer);
    let refused = PolicyClient::new(c.channel(Some(&cert)).await)
        .watch(pb::WatchPoliciesRequest::default())
        .await
        .expect_err("a revoked relay cannot watch");
    assert_eq!(refused.code(), Code::PermissionDenied);
}

/// TLS checks a certificate only at the handshake: a watch made with a certificate that
/// expires while it is open ends then (UNAUTHENTICATED), instead of streaming on.
#[tokio::test]
async fn a_watch_ends_when_its_callers_certificate_expires() {
    const VALID_FOR_S: u64 = 3;
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let issued = Instant::now();
    let (cert, key) = c
        .ca()
        .issue_with_key(
            &[],
            Some(REVOKED),
            LeafProfile::ClientServer,
            VALID_FOR_S,
            time::OffsetDateTime::now_utc(),
        )
        .expect("issue");
    let mut policy = PolicyClient::new(c.channel(Some(&(cert.cert_pem, key))).await)
        .watch(pb::WatchPoliciesRequest::default())
        .await
        .expect("Policy.Watch")
        .into_inner();
    let ev = policy.message().await.expect("event").expect("some");
    assert_eq!(ev.kind, pb::policy_event::Kind::SnapshotEnd as i32);
    let (code, got) = until_end("Policy.Watch of an expiring certificate", &mut policy).await;
    eprintln!(
        "MEASURED: a watch made with a certificate valid for {VALID_FOR_S} s ended {:?} after \
         it was issued",
        issued.elapsed()
    );
    assert_eq!(code, Some(Code::Unauthenticated));
    assert!(got.is_empty(), "{got:?}");
    // Not before its notAfter (whole seconds).
    assert!(issued.elapsed() >= Duration::from_secs(VALID_FOR_S - 1));
}
