//! R7: kill -9 of the controller while clients write; every acknowledged write is present after
//! restart and the audit chain still verifies.

mod common;

use std::sync::{Arc, Mutex};

use common::Controller;
use outrelay_api::pb::{self, audit_client::AuditClient, policy_client::PolicyClient};
use outrelay_controller::pki::LeafProfile;

const WRITERS: usize = 16;
const ACKED_BEFORE_KILL: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let admin = c.cert("outrelay://system/admin/ops", LeafProfile::Client);
    let ch = c.channel(Some(&admin)).await;
    let acked: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (ch, acked) = (ch.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = PolicyClient::new(ch);
            for i in 0.. {
                let id = format!("w{w}-{i}");
                let rule = pb::PolicyRule {
                    id: id.clone(),
                    tenant: "acme".into(),
                    caller_pattern: "*".into(),
                    target_pattern: format!("svc-{i}"),
                    decision: pb::Decision::Allow as i32,
                    ..Default::default()
                };
                match client
                    .add_policy(pb::AddPolicyRequest { rule: Some(rule) })
                    .await
                {
                    Ok(_) => acked.lock().expect("lock").push(id),
                    // The controller died mid-request: this write was never acknowledged.
                    Err(_) => return,
                }
            }
        }));
    }
    common::eventually("enough acknowledged writes", || async {
        acked.lock().expect("lock").len() >= ACKED_BEFORE_KILL
    })
    .await;
    let c = c.restart(); // SIGKILL while the writers are still writing, then start again.
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= ACKED_BEFORE_KILL);
    let admin = c.cert("outrelay://system/admin/ops", LeafProfile::Client);
    let ch = c.channel(Some(&admin)).await;
    let stored: std::collections::HashSet<String> = PolicyClient::new(ch.clone())
        .list_policies(pb::ListPoliciesRequest {
            tenant: "acme".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .rules
        .into_iter()
        .map(|r| r.id)
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    let v = AuditClient::new(ch)
        .verify(pb::VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(v.ok, "audit chain after kill -9: {}", v.error);
    assert!(v.row_count >= u64::try_from(acked.len()).expect("len"));
    eprintln!(
        "kill -9: {} acknowledged writes, all present; {} stored; audit rows {}",
        acked.len(),
        stored.len(),
        v.row_count
    );
}
