//! Policy rules: validation, storage, the Policy gRPC service and its Watch.
//!
//! Rules are persisted (FULL sync, group commit) and mirrored in memory in creation order; the
//! in-memory list is the Watch snapshot, updated under the hub lock after each commit.

use std::sync::Arc;

use outrelay_api::MAX_PATTERN_BYTES;
use outrelay_api::pb::{self, policy_event, policy_server};
use rusqlite::{Connection, params};
use tonic::{Request, Response, Status};

use crate::app::{App, PolicyChange, now_unix_ms};
use crate::audit;
use crate::grpc::{Principal, invalid, store_status, tenant_arg};
use crate::store::StoreError;
use crate::watch::WatchStream;

/// Longest rule id accepted, in bytes.
pub const MAX_RULE_ID_BYTES: usize = 64;

/// The Policy service.
#[derive(Clone)]
pub struct PolicyService(pub Arc<App>);

/// Checks a rule from a request; returns it normalised (server-set id and creation time).
///
/// # Errors
/// INVALID_ARGUMENT naming the first bad field (`rule.tenant`, `rule.caller_pattern`, ...).
pub fn validate_rule(rule: Option<pb::PolicyRule>, now_ms: i64) -> Result<pb::PolicyRule, Status> {
    let mut rule = rule.ok_or_else(|| invalid("rule", "required"))?;
    tenant_arg("rule.tenant", &rule.tenant)?;
    pattern("rule.caller_pattern", &rule.caller_pattern, true)?;
    pattern("rule.target_pattern", &rule.target_pattern, true)?;
    pattern("rule.method_pattern", &rule.method_pattern, false)?;
    if rule.decision != pb::Decision::Allow as i32 && rule.decision != pb::Decision::Deny as i32 {
        return Err(invalid("rule.decision", "must be ALLOW or DENY"));
    }
    if rule.expires_unix_ms < 0 {
        return Err(invalid(
            "rule.expires_unix_ms",
            "must be 0 (never) or a time",
        ));
    }
    if pb::P2pMode::try_from(rule.p2p_mode).is_err() {
        return Err(invalid(
            "rule.p2p_mode",
            "must be P2P_ALLOWED, P2P_FORBIDDEN or P2P_REQUIRED",
        ));
    }
    if pb::RelayMode::try_from(rule.relay_mode).is_err() {
        return Err(invalid(
            "rule.relay_mode",
            "must be RELAY_MODE_SPLICE or RELAY_MODE_FORWARD",
        ));
    }
    if rule.id.is_empty() {
        rule.id = uuid::Uuid::new_v4().to_string();
    } else if rule.id.len() > MAX_RULE_ID_BYTES
        || !rule
            .id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        return Err(invalid("rule.id", "at most 64 of [A-Za-z0-9_-]"));
    }
    rule.created_at_unix_ms = now_ms;
    Ok(rule)
}

fn pattern(field: &str, p: &str, required: bool) -> Result<(), Status> {
    if required && p.is_empty() {
        return Err(invalid(field, "required"));
    }
    if p.len() > MAX_PATTERN_BYTES {
        return Err(invalid(field, "longer than 512 bytes"));
    }
    if !p.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(field, "must be printable ASCII without spaces"));
    }
    Ok(())
}

/// Loads every rule in creation order (start-up).
///
/// # Errors
/// SQLite errors.
pub fn load_all(conn: &Connection) -> Result<Vec<pb::PolicyRule>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, tenant, caller_pattern, target_pattern, method_pattern, decision, \
         expires_unix_ms, created_at_unix_ms, p2p_mode, relay_mode FROM policies ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(pb::PolicyRule {
            id: r.get(0)?,
            tenant: r.get(1)?,
            caller_pattern: r.get(2)?,
            target_pattern: r.get(3)?,
            method_pattern: r.get(4)?,
            decision: r.get(5)?,
            expires_unix_ms: r.get(6)?,
            created_at_unix_ms: r.get(7)?,
            p2p_mode: r.get(8)?,
            relay_mode: r.get(9)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Outcome of the insert job.
enum Added {
    Ok,
    Duplicate,
}

#[tonic::async_trait]
impl policy_server::Policy for PolicyService {
    async fn add_policy(
        &self,
        req: Request<pb::AddPolicyRequest>,
    ) -> Result<Response<pb::AddPolicyResponse>, Status> {
        const M: &str = "Policy.AddPolicy";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let rule = validate_rule(req.into_inner().rule, now_unix_ms())?;
        app.require_admin_of(&p, M, &rule.tenant)?;
        let ev = App::admin_event(
            &rule.tenant,
            audit::kind::ADMIN,
            &p.name(),
            &rule.target_pattern,
            M,
            &format!(
                "add rule {} caller={} decision={}",
                rule.id, rule.caller_pattern, rule.decision
            ),
        );
        let r = rule.clone();
        let added = app
            .store
            .write(move |conn, ctx| {
                let n = conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO policies (id, tenant, caller_pattern, target_pattern, \
                         method_pattern, decision, expires_unix_ms, created_at_unix_ms, p2p_mode, \
                         relay_mode) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    )?
                    .execute(params![
                        r.id,
                        r.tenant,
                        r.caller_pattern,
                        r.target_pattern,
                        r.method_pattern,
                        r.decision,
                        r.expires_unix_ms,
                        r.created_at_unix_ms,
                        r.p2p_mode,
                        r.relay_mode
                    ])?;
                if n == 0 {
                    return Ok(Added::Duplicate);
                }
                audit::append(conn, &mut ctx.audit, &ev)?;
                Ok(Added::Ok)
            })
            .await
            .map_err(store_status)?;
        if let Added::Duplicate = added {
            return Err(Status::already_exists(format!(
                "rule.id: `{}` exists",
                rule.id
            )));
        }
        metrics::counter!("outrelay_controller_policy_changes_total", "op" => "add").increment(1);
        let id = rule.id.clone();
        app.policies.publish(|rules| {
            rules.push(rule.clone());
            vec![PolicyChange {
                tenant: rule.tenant.clone(),
                event: pb::PolicyEvent {
                    kind: policy_event::Kind::Added as i32,
                    rule: Some(rule),
                    removed_id: String::new(),
                },
            }]
        });
        Ok(Response::new(pb::AddPolicyResponse { id }))
    }

    async fn remove_policy(
        &self,
        req: Request<pb::RemovePolicyRequest>,
    ) -> Result<Response<pb::RemovePolicyResponse>, Status> {
        const M: &str = "Policy.RemovePolicy";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        tenant_arg("tenant", &r.tenant)?;
        if r.id.is_empty() {
            return Err(invalid("id", "required"));
        }
        app.require_admin_of(&p, M, &r.tenant)?;
        let ev = App::admin_event(
            &r.tenant,
            audit::kind::ADMIN,
            &p.name(),
            &r.id,
            M,
            "remove rule",
        );
        let (tenant, id) = (r.tenant.clone(), r.id.clone());
        let removed = app
            .store
            .write(move |conn, ctx| {
                let n = conn
                    .prepare_cached("DELETE FROM policies WHERE tenant = ?1 AND id = ?2")?
                    .execute(params![tenant, id])?;
                if n > 0 {
                    audit::append(conn, &mut ctx.audit, &ev)?;
                }
                Ok(n > 0)
            })
            .await
            .map_err(store_status)?;
        if removed {
            metrics::counter!("outrelay_controller_policy_changes_total", "op" => "remove")
                .increment(1);
            app.policies.publish(|rules| {
                rules.retain(|x| !(x.tenant == r.tenant && x.id == r.id));
                vec![PolicyChange {
                    tenant: r.tenant.clone(),
                    event: pb::PolicyEvent {
                        kind: policy_event::Kind::Removed as i32,
                        rule: None,
                        removed_id: r.id.clone(),
                    },
                }]
            });
        }
        Ok(Response::new(pb::RemovePolicyResponse { removed }))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        const M: &str = "Policy.ListPolicies";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let tenant = req.into_inner().tenant;
        tenant_arg("tenant", &tenant)?;
        app.require_admin_of(&p, M, &tenant)?;
        let rules = app.policies.with_state(|rules| {
            rules
                .iter()
                .filter(|r| r.tenant == tenant)
                .cloned()
                .collect()
        });
        Ok(Response::new(pb::ListPoliciesResponse { rules }))
    }

    type WatchStream = WatchStream<PolicyChange, pb::PolicyEvent>;

    async fn watch(
        &self,
        req: Request<pb::WatchPoliciesRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        const M: &str = "Policy.Watch";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let expires = crate::grpc::cert_not_after(&req);
        let tenant = req.into_inner().tenant;
        let filter_tenant = watch_scope(app, &p, M, &tenant)?;
        let f2 = filter_tenant.clone();
        let sub = app.policies.subscribe(
            move |rules| {
                rules
                    .iter()
                    .filter(|r| f2.as_deref().is_none_or(|t| r.tenant == t))
                    .map(|r| PolicyChange {
                        tenant: r.tenant.clone(),
                        event: pb::PolicyEvent {
                            kind: policy_event::Kind::Added as i32,
                            rule: Some(r.clone()),
                            removed_id: String::new(),
                        },
                    })
                    .collect()
            },
            move |c: &PolicyChange| filter_tenant.as_deref().is_none_or(|t| c.tenant == t),
        );
        let end = pb::PolicyEvent {
            kind: policy_event::Kind::SnapshotEnd as i32,
            rule: None,
            removed_id: String::new(),
        };
        Ok(Response::new(
            sub.into_stream(end, |c| c.event)
                .until(app.watch_end(&p, expires)),
        ))
    }
}

/// Who may watch what: relays may watch every tenant (empty `tenant`) or one; admins watch one
/// tenant they administer. Returns the tenant filter (`None` = all).
///
/// # Errors
/// PERMISSION_DENIED (audited) or INVALID_ARGUMENT for a bad tenant.
pub fn watch_scope(
    app: &App,
    p: &Principal,
    method: &'static str,
    tenant: &str,
) -> Result<Option<String>, Status> {
    match p {
        Principal::Relay { .. } if tenant.is_empty() => Ok(None),
        Principal::Relay { .. } => {
            tenant_arg("tenant", tenant)?;
            Ok(Some(tenant.to_owned()))
        }
        _ => {
            if tenant.is_empty() {
                // Only relays may watch every tenant.
                return Err(match p {
                    Principal::GlobalAdmin(_) | Principal::TenantAdmin { .. } => {
                        invalid("tenant", "required (an empty tenant is for relays only)")
                    }
                    _ => app.refuse(p, method, "watch requires a relay or admin identity"),
                });
            }
            tenant_arg("tenant", tenant)?;
            app.require_admin_of(p, method, tenant)?;
            Ok(Some(tenant.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_rule() -> pb::PolicyRule {
        pb::PolicyRule {
            tenant: "acme".to_owned(),
            caller_pattern: "outrelay://acme/agent/*".to_owned(),
            target_pattern: "db".to_owned(),
            decision: pb::Decision::Allow as i32,
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(pb::PolicyRule, &str)> = vec![
            (
                pb::PolicyRule {
                    tenant: String::new(),
                    ..ok_rule()
                },
                "rule.tenant",
            ),
            (
                pb::PolicyRule {
                    tenant: "system".into(),
                    ..ok_rule()
                },
                "rule.tenant",
            ),
            (
                pb::PolicyRule {
                    caller_pattern: String::new(),
                    ..ok_rule()
                },
                "rule.caller_pattern",
            ),
            (
                pb::PolicyRule {
                    target_pattern: "x".repeat(513),
                    ..ok_rule()
                },
                "rule.target_pattern",
            ),
            (
                pb::PolicyRule {
                    method_pattern: "é".into(),
                    ..ok_rule()
                },
                "rule.method_pattern",
            ),
            (
                pb::PolicyRule {
                    decision: 0,
                    ..ok_rule()
                },
                "rule.decision",
            ),
            (
                pb::PolicyRule {
                    decision: 7,
                    ..ok_rule()
                },
                "rule.decision",
            ),
        ];
        for (rule, field) in cases {
            let e = validate_rule(Some(rule), 1).expect_err(field);
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with(field), "{field}: {}", e.message());
        }
        let ok = validate_rule(Some(ok_rule()), 42).expect("valid");
        assert_eq!(ok.created_at_unix_ms, 42);
        assert_eq!(ok.id.len(), 36);
        assert!(
            validate_rule(
                Some(pb::PolicyRule {
                    target_pattern: "x".repeat(512),
                    ..ok_rule()
                }),
                1
            )
            .is_ok()
        );
    }
}
