//! A store on a tiny tmpfs: a write that does not fit returns an error to its caller, and
//! nothing already acknowledged is lost. Needs root (mount); skips LOUDLY otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Controller;
use outrelay_api::pb::{self, audit_client::AuditClient, policy_client::PolicyClient};
use outrelay_controller::pki::LeafProfile;
use tonic::Code;

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Result<Mount, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let o = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "mount -t tmpfs failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(Mount(dir.to_owned()))
}

#[tokio::test]
async fn disk_full_fails_the_write_and_keeps_what_was_committed() {
    let dir = tempfile::tempdir().expect("tmp");
    let small = dir.path().join("small");
    let mount = match mount_tmpfs(&small, "1m") {
        Ok(m) => m,
        Err(reason) => {
            eprintln!(
                "SKIPPED disk_full_fails_the_write_and_keeps_what_was_committed: {reason} (needs root and mount(2))"
            );
            return;
        }
    };
    let c = Controller::start(&small, "");
    let admin = c.cert("outrelay://system/admin/ops", LeafProfile::Client);
    let mut policy = PolicyClient::new(c.channel(Some(&admin)).await);
    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..20_000 {
        let id = format!("r{i}");
        let rule = pb::PolicyRule {
            id: id.clone(),
            tenant: "acme".into(),
            caller_pattern: format!("{}{i}", "c".repeat(500)),
            target_pattern: format!("{}{i}", "t".repeat(500)),
            decision: pb::Decision::Allow as i32,
            ..Default::default()
        };
        match policy
            .add_policy(pb::AddPolicyRequest { rule: Some(rule) })
            .await
        {
            Ok(_) => acked.push(id),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let e = failure.expect("a 1 MiB file system must fill up");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("full"), "{}", e.message());
    assert!(!acked.is_empty());

    // Give the file system room again, restart, and check every acknowledged write.
    let o = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&small)
        .output()
        .expect("remount");
    assert!(
        o.status.success(),
        "remount: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let c = c.restart();
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
    assert!(lost.is_empty(), "lost {} acknowledged writes", lost.len());
    let v = AuditClient::new(ch)
        .verify(pb::VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(v.ok, "{}", v.error);
    eprintln!(
        "disk full after {} acknowledged writes; all present after restart",
        acked.len()
    );
    drop(c);
    drop(mount);
}
