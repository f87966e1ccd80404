//! Lease bans, approvals, quotas and port lease gates (review M6, M7) against a real controller
//! process over real mTLS on 127.0.0.1:0 with a real SQLite file. The relay is played by a
//! client with a relay certificate calling `Leases.Report` as a relay does.

mod common;

use std::time::{Duration, Instant};

use common::{Controller, UUID_A, UUID_B};
use outrelay_api::pb::{self, lease_report_request::Kind, leases_client::LeasesClient};
use outrelay_controller::pki::LeafProfile;
use tonic::Code;
use tonic::transport::Channel;

const GLOBAL: &str = "outrelay://system/admin/ops";
const TENANT_ADMIN: &str = "outrelay://acme/admin/alice";
const RELAY: &str = "outrelay://eu-west/relay/r1";

fn report(kind: Kind, name: &str, agent: &str, ttl_ms: u64) -> pb::LeaseReportRequest {
    pb::LeaseReportRequest {
        kind: kind as i32,
        tenant: "acme".into(),
        name: name.into(),
        agent_uri: format!("outrelay://acme/agent/{agent}"),
        lease_kind: "tls".into(),
        ttl_ms,
    }
}

fn action(id: &str) -> pb::LeaseActionRequest {
    pb::LeaseActionRequest {
        tenant: "acme".into(),
        id: id.into(),
    }
}

async fn client(c: &Controller, uri: &str, profile: LeafProfile) -> LeasesClient<Channel> {
    let cert = c.cert(uri, profile);
    LeasesClient::new(c.channel(Some(&cert)).await)
}

async fn grant(rel: &mut LeasesClient<Channel>, name: &str) -> pb::LeaseReportResponse {
    rel.report(report(Kind::Grant, name, UUID_A, 60_000))
        .await
        .expect("grant")
        .into_inner()
}

async fn manual(ops: &mut LeasesClient<Channel>) {
    ops.set_approval_mode(pb::SetApprovalModeRequest {
        tenant: "acme".into(),
        mode: pb::ApprovalMode::Manual as i32,
    })
    .await
    .expect("manual mode");
}

/// M6: a global admin bans a lease; the tenant admin's `approve` is refused and the name stays
/// banned for the live record, after a release and after a controller restart. Only a global
/// admin's approve lifts the ban.
#[tokio::test]
async fn a_ban_survives_tenant_approve_and_reregistration() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let mut ops = client(&c, GLOBAL, LeafProfile::Client).await;
    let mut adm = client(&c, TENANT_ADMIN, LeafProfile::Client).await;
    let mut rel = client(&c, RELAY, LeafProfile::ClientServer).await;
    let id = grant(&mut rel, "web").await.lease.expect("lease").id;
    ops.ban(action(&id)).await.expect("global admin bans");

    let e = adm.approve(action(&id)).await.expect_err("tenant approve");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("banned"), "{e:?}");
    let e = adm.deny(action(&id)).await.expect_err("deny of a ban");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // The agent re-registers: on the live connection, then after a disconnect.
    let r = grant(&mut rel, "web").await;
    assert_eq!(r.message, "banned");
    assert_eq!(
        r.lease.expect("lease").state,
        pb::lease::State::Banned as i32
    );
    rel.report(report(Kind::Release, "web", UUID_A, 0))
        .await
        .expect("release");
    assert_eq!(grant(&mut rel, "web").await.message, "banned");
    let listed = adm
        .list(pb::ListLeasesRequest {
            tenant: "acme".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .leases;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        listed[0].state,
        pb::lease::State::Banned as i32,
        "{listed:?}"
    );

    let c = c.restart();
    let mut ops = client(&c, GLOBAL, LeafProfile::Client).await;
    let mut adm = client(&c, TENANT_ADMIN, LeafProfile::Client).await;
    let mut rel = client(&c, RELAY, LeafProfile::ClientServer).await;
    let e = adm.approve(action(&id)).await.expect_err("after restart");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(grant(&mut rel, "web").await.message, "banned");

    // The operator lifts the ban.
    let lifted = ops.approve(action(&id)).await.expect("global approve");
    assert_eq!(
        lifted.into_inner().lease.expect("lease").state,
        pb::lease::State::Approved as i32
    );
    let r = grant(&mut rel, "web").await;
    assert_eq!(r.message, "");
    assert_eq!(
        r.lease.expect("lease").state,
        pb::lease::State::Approved as i32
    );
}

/// M6: quotas, approval modes, bans and gates are operator controls: a tenant admin gets
/// PERMISSION_DENIED for each, a global admin gets through, and a relay's Watch (never a
/// tenant's) carries the gates.
#[tokio::test]
async fn only_a_global_admin_sets_quota_mode_bans_and_gates() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let mut ops = client(&c, GLOBAL, LeafProfile::Client).await;
    let mut adm = client(&c, TENANT_ADMIN, LeafProfile::Client).await;
    let mut rel = client(&c, RELAY, LeafProfile::ClientServer).await;
    let id = grant(&mut rel, "web").await.lease.expect("lease").id;
    let off = pb::PortGate {
        enabled: false,
        max_leases: 0,
    };
    let gate = |relay_id: &str| pb::SetGateRequest {
        relay_id: relay_id.into(),
        tcp: Some(off),
        udp: None,
    };

    let quota = pb::SetQuotaRequest {
        tenant: "acme".into(),
        max_leases: 0,
    };
    let mode = pb::SetApprovalModeRequest {
        tenant: "acme".into(),
        mode: pb::ApprovalMode::Auto as i32,
    };
    let denied = [
        adm.set_quota(quota.clone()).await.map(|_| ()),
        adm.set_approval_mode(mode.clone()).await.map(|_| ()),
        adm.ban(action(&id)).await.map(|_| ()),
        adm.set_gate(gate("")).await.map(|_| ()),
    ];
    for (what, r) in ["SetQuota", "SetApprovalMode", "Ban", "SetGate"]
        .into_iter()
        .zip(denied)
    {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
    }
    let listed = ops
        .list(pb::ListLeasesRequest {
            tenant: "acme".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .leases;
    assert_eq!(listed[0].state, pb::lease::State::Approved as i32);

    ops.set_quota(quota).await.expect("global SetQuota");
    ops.set_approval_mode(mode)
        .await
        .expect("global SetApprovalMode");
    let set = ops
        .set_gate(gate("r1"))
        .await
        .expect("global SetGate")
        .into_inner();
    assert_eq!(set.tcp, Some(off));
    assert_eq!(set.udp, None);
    let e = ops
        .set_gate(pb::SetGateRequest {
            relay_id: "r1".into(),
            tcp: None,
            udp: None,
        })
        .await
        .expect_err("no gate");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // A relay's snapshot carries the gate (after a restart too); a tenant admin's does not.
    let c = c.restart();
    let rel = client(&c, RELAY, LeafProfile::ClientServer).await;
    let adm = client(&c, TENANT_ADMIN, LeafProfile::Client).await;
    let snapshot = |mut cl: LeasesClient<Channel>, tenant: &'static str| async move {
        let mut s = cl
            .watch(pb::WatchLeasesRequest {
                tenant: tenant.into(),
            })
            .await
            .expect("watch")
            .into_inner();
        let mut out = Vec::new();
        loop {
            let d = tokio::time::timeout(Duration::from_secs(10), s.message())
                .await
                .expect("snapshot in time")
                .expect("stream")
                .expect("event");
            if d.kind == pb::lease_decision::Kind::SnapshotEnd as i32 {
                return out;
            }
            out.push(d);
        }
    };
    let gates: Vec<_> = snapshot(rel, "")
        .await
        .into_iter()
        .filter(|d| d.kind == pb::lease_decision::Kind::Gate as i32)
        .collect();
    assert_eq!(gates.len(), 1, "{gates:?}");
    assert_eq!(gates[0].relay_id, "r1");
    assert_eq!(gates[0].tcp, Some(off));
    assert_eq!(gates[0].udp, None);
    let tenant_view = snapshot(adm, "acme").await;
    assert!(
        tenant_view
            .iter()
            .all(|d| d.kind != pb::lease_decision::Kind::Gate as i32),
        "{tenant_view:?}"
    );
}

/// M7 (a): in manual mode an approved (tenant, name) stays approved across the agent's
/// disconnects and a controller restart; a deny takes the approval back.
#[tokio::test]
async fn an_approval_survives_disconnects_and_restarts() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let mut ops = client(&c, GLOBAL, LeafProfile::Client).await;
    let mut adm = client(&c, TENANT_ADMIN, LeafProfile::Client).await;
    let mut rel = client(&c, RELAY, LeafProfile::ClientServer).await;
    manual(&mut ops).await;
    let r = grant(&mut rel, "api").await;
    assert_eq!(r.message, "pending_approval");
    let id = r.lease.expect("lease").id;
    adm.approve(action(&id))
        .await
        .expect("tenant admin approves");
    assert_eq!(grant(&mut rel, "api").await.message, "");

    // The agent restarts: its relay reports the release, then the new connection's grant.
    rel.report(report(Kind::Release, "api", UUID_A, 0))
        .await
        .expect("release");
    let r = grant(&mut rel, "api").await;
    assert_eq!(r.message, "", "a reconnect needed another approval");
    let l = r.lease.expect("lease");
    assert_eq!(l.state, pb::lease::State::Approved as i32);
    assert_ne!(l.id, id, "a new record");

    // The controller restarts (kill -9) between the release and the next grant.
    rel.report(report(Kind::Release, "api", UUID_A, 0))
        .await
        .expect("release");
    let c = c.restart();
    let mut adm = client(&c, TENANT_ADMIN, LeafProfile::Client).await;
    let mut rel = client(&c, RELAY, LeafProfile::ClientServer).await;
    let r = grant(&mut rel, "api").await;
    assert_eq!(r.message, "", "the approval did not survive a restart");
    let live = r.lease.expect("lease").id;

    // Another name of the tenant is still pending: the approval is per (tenant, name).
    assert_eq!(grant(&mut rel, "other").await.message, "pending_approval");

    // A deny takes the approval back: the next grant waits for an admin again.
    adm.deny(action(&live)).await.expect("deny");
    rel.report(report(Kind::Release, "api", UUID_A, 0))
        .await
        .expect("release");
    assert_eq!(grant(&mut rel, "api").await.message, "pending_approval");
}

/// M7 (b): quota 2; two leases whose relay dies (no release is ever reported); once their TTL
/// passed a third name is granted, and another agent may take an expired name.
#[tokio::test]
async fn expired_leases_stop_counting_toward_the_quota() {
    const TTL_MS: u64 = 3_000;
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let mut ops = client(&c, GLOBAL, LeafProfile::Client).await;
    let mut rel = client(&c, RELAY, LeafProfile::ClientServer).await;
    ops.set_quota(pb::SetQuotaRequest {
        tenant: "acme".into(),
        max_leases: 2,
    })
    .await
    .expect("quota");
    let started = Instant::now();
    for name in ["one", "two"] {
        let r = rel
            .report(report(Kind::Grant, name, UUID_A, TTL_MS))
            .await
            .expect("grant")
            .into_inner();
        assert_eq!(r.message, "", "{name}");
    }
    // Checked within the TTL only (the machine may be slow): the quota is used up.
    let r = rel
        .report(report(Kind::Grant, "three", UUID_A, TTL_MS))
        .await
        .expect("grant")
        .into_inner();
    if started.elapsed() < Duration::from_millis(TTL_MS) {
        assert_eq!(r.message, "quota_exceeded");
    }
    // The relay is gone: nothing renews or releases "one" and "two".
    tokio::time::sleep(Duration::from_millis(TTL_MS + 200).saturating_sub(started.elapsed())).await;
    let r = rel
        .report(report(Kind::Grant, "three", UUID_A, 60_000))
        .await
        .expect("grant")
        .into_inner();
    assert_eq!(r.message, "", "stale leases still count toward the quota");
    let r = rel
        .report(report(Kind::Grant, "one", UUID_B, 60_000))
        .await
        .expect("grant")
        .into_inner();
    assert_eq!(r.message, "", "an expired record still holds its name");
    assert_eq!(
        r.lease.expect("lease").agent_uri,
        format!("outrelay://acme/agent/{UUID_B}")
    );
    // Two live leases again: the quota holds.
    let r = rel
        .report(report(Kind::Grant, "four", UUID_B, 60_000))
        .await
        .expect("grant")
        .into_inner();
    assert_eq!(r.message, "quota_exceeded");
}

/// Concurrent reports are decided one at a time: 16 first grants of one name at once (a relay
/// retrying while its first report is in flight) make one record whose id an admin can approve,
/// 16 grants of new names under quota 4 admit exactly 4, and a renewal racing an approval never
/// writes the record back to pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reports_make_one_record_and_hold_the_quota() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let mut ops = client(&c, GLOBAL, LeafProfile::Client).await;
    let rel = client(&c, RELAY, LeafProfile::ClientServer).await;
    manual(&mut ops).await;

    let grants = (0..16).map(|_| {
        let mut rel = rel.clone();
        tokio::spawn(async move { grant(&mut rel, "web").await })
    });
    let mut ids = std::collections::BTreeSet::new();
    for r in all(grants).await {
        assert_eq!(r.message, "pending_approval");
        ids.insert(r.lease.expect("lease").id);
    }
    assert_eq!(ids.len(), 1, "one name, several records: {ids:?}");
    let id = ids.pop_first().expect("id");

    // Renewals race the approval; the approval is never undone by one of them.
    let renews = (0..16).map(|_| {
        let mut rel = rel.clone();
        tokio::spawn(async move {
            rel.report(report(Kind::Renew, "web", UUID_A, 60_000))
                .await
                .expect("renew")
        })
    });
    let renews: Vec<_> = renews.collect();
    ops.approve(action(&id))
        .await
        .expect("the first grant's id is the live record's");
    all(renews.into_iter()).await;
    let mut rel2 = rel.clone();
    assert_eq!(grant(&mut rel2, "web").await.message, "", "approval lost");

    ops.set_approval_mode(pb::SetApprovalModeRequest {
        tenant: "acme".into(),
        mode: pb::ApprovalMode::Auto as i32,
    })
    .await
    .expect("auto mode");
    ops.set_quota(pb::SetQuotaRequest {
        tenant: "acme".into(),
        max_leases: 4,
    })
    .await
    .expect("quota");
    let grants = (0..16).map(|i| {
        let mut rel = rel.clone();
        tokio::spawn(async move { grant(&mut rel, &format!("n{i}")).await })
    });
    let admitted = all(grants)
        .await
        .iter()
        .filter(|g| g.message.is_empty())
        .count();
    assert_eq!(admitted, 3, "quota 4 with `web` live admits 3 more");
}

async fn all<T>(tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let tasks: Vec<_> = tasks.collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// Issue 21: bandwidth limits are operator controls: a tenant admin's SetLimit is refused
/// (PERMISSION_DENIED), a global admin's is stored, validated, listed, pushed live to a relay's
/// Watch and in its snapshot after a controller restart (kill -9); a clear is pushed and
/// persisted too.
#[tokio::test]
async fn only_a_global_admin_sets_limits_and_they_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let mut ops = client(&c, GLOBAL, LeafProfile::Client).await;
    let mut adm = client(&c, TENANT_ADMIN, LeafProfile::Client).await;
    let limit = |name: &str, to_service: u64, to_client: u64| pb::BandwidthLimit {
        tenant: "acme".into(),
        name: name.into(),
        to_service_bytes_per_s: to_service,
        to_client_bytes_per_s: to_client,
    };
    let set = |l: pb::BandwidthLimit, clear: bool| pb::SetLimitRequest {
        limit: Some(l),
        clear,
    };
    let e = adm
        .set_limit(set(limit("web", 25_000_000, 25_000_000), false))
        .await
        .expect_err("tenant admin");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A relay watching live sees the global admin's record.
    let mut rel = client(&c, RELAY, LeafProfile::ClientServer).await;
    let mut live = rel
        .watch(pb::WatchLeasesRequest {
            tenant: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    loop {
        let d = tokio::time::timeout(Duration::from_secs(10), live.message())
            .await
            .expect("snapshot in time")
            .expect("stream")
            .expect("event");
        if d.kind == pb::lease_decision::Kind::SnapshotEnd as i32 {
            break;
        }
    }
    let web = limit("web", 25_000_000, 12_500_000);
    let got = ops
        .set_limit(set(web.clone(), false))
        .await
        .expect("global SetLimit")
        .into_inner();
    assert_eq!(got.limit.as_ref(), Some(&web));
    assert!(!got.cleared);
    let d = tokio::time::timeout(Duration::from_secs(10), live.message())
        .await
        .expect("live in time")
        .expect("stream")
        .expect("event");
    assert_eq!(d.kind, pb::lease_decision::Kind::Limit as i32, "{d:?}");
    assert_eq!(d.limit.as_ref(), Some(&web));
    assert!(!d.limit_cleared);
    ops.set_limit(set(limit("", 50_000_000, 0), false))
        .await
        .expect("tenant record");
    ops.set_limit(set(limit("db", 1, 1), false))
        .await
        .expect("db record");

    // Validation: above 1 Tbit/s, rates with clear, a bad name, clearing nothing.
    for (what, r, code) in [
        (
            "too fast",
            set(limit("web", 125_000_000_001, 0), false),
            Code::InvalidArgument,
        ),
        (
            "rates with clear",
            set(limit("web", 1, 0), true),
            Code::InvalidArgument,
        ),
        (
            "bad name",
            set(limit("a b", 1, 1), false),
            Code::InvalidArgument,
        ),
        (
            "clear nothing",
            set(limit("nope", 0, 0), true),
            Code::NotFound,
        ),
    ] {
        let e = ops.set_limit(r).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {e:?}");
    }
    let e = ops
        .set_limit(pb::SetLimitRequest {
            limit: Some(pb::BandwidthLimit {
                tenant: "system".into(),
                ..pb::BandwidthLimit::default()
            }),
            clear: false,
        })
        .await
        .expect_err("system tenant");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Clearing `db` is pushed live and durable.
    ops.set_limit(set(limit("db", 0, 0), true))
        .await
        .expect("clear db");
    let kinds: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                tokio::time::timeout(Duration::from_secs(10), live.message())
                    .await
                    .expect("live in time")
                    .expect("stream")
                    .expect("event"),
            );
        }
        v
    };
    let last = kinds.last().expect("three events");
    assert_eq!(last.limit.as_ref().map(|l| l.name.as_str()), Some("db"));
    assert!(last.limit_cleared, "{last:?}");

    // A tenant admin may list its own tenant's records, not another's.
    let mine = adm
        .list_limits(pb::ListLimitsRequest {
            tenant: String::new(),
        })
        .await
        .expect("own list")
        .into_inner()
        .limits;
    assert_eq!(mine.len(), 2, "{mine:?}");
    let e = adm
        .list_limits(pb::ListLimitsRequest {
            tenant: "other".into(),
        })
        .await
        .expect_err("other tenant");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // After kill -9 and a restart: the same records, in order (tenant record first), in the
    // list and in a relay's snapshot.
    let c = c.restart();
    let mut ops = client(&c, GLOBAL, LeafProfile::Client).await;
    let listed = ops
        .list_limits(pb::ListLimitsRequest {
            tenant: "acme".into(),
        })
        .await
        .expect("list after restart")
        .into_inner()
        .limits;
    assert_eq!(listed, vec![limit("", 50_000_000, 0), web.clone()]);
    let mut rel = client(&c, RELAY, LeafProfile::ClientServer).await;
    let mut s = rel
        .watch(pb::WatchLeasesRequest {
            tenant: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut snap = Vec::new();
    loop {
        let d = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("snapshot in time")
            .expect("stream")
            .expect("event");
        if d.kind == pb::lease_decision::Kind::SnapshotEnd as i32 {
            break;
        }
        if d.kind == pb::lease_decision::Kind::Limit as i32 {
            assert!(!d.limit_cleared);
            snap.extend(d.limit);
        }
    }
    assert_eq!(snap, vec![limit("", 50_000_000, 0), web]);
}
