//! Bandwidth limit records (`Leases.SetLimit`, `Leases.ListLimits`; issue 21).
//!
//! One record per (tenant, lease name); an empty name is the tenant's record, which caps every
//! lease of the tenant together. Each direction in bytes per second, 0 = no limit that way (a
//! record with both 0 is an explicit "unlimited" over the relay's `[bandwidth]` default). Setting
//! or clearing one is an operator abuse control: global admins only, audited as an admin action,
//! durable (group commit), then pushed to relays as a LIMIT decision (Watch snapshot and live).

use outrelay_api::pb::{self, lease_decision};
use rusqlite::{Connection, params};
use tonic::{Response, Status};

use crate::app::App;
use crate::audit;
use crate::grpc::{Principal, invalid, store_status, tenant_arg};
use crate::leases::{LeaseState, MAX_LEASE_NAME_BYTES};
use crate::store::StoreError;

/// Highest rate a record may carry, in bytes per second: 1 Tbit/s.
pub const MAX_RATE_BYTES_PER_S: u64 = 125_000_000_000;

/// The records as kept in memory, by (tenant, name).
pub type Limits = std::collections::BTreeMap<(String, String), pb::BandwidthLimit>;

/// Loads every record (start-up).
///
/// # Errors
/// SQLite errors.
pub fn load(conn: &Connection) -> Result<Limits, StoreError> {
    let mut out = Limits::new();
    let mut stmt = conn.prepare(
        "SELECT tenant, name, to_service_bytes_per_s, to_client_bytes_per_s FROM bandwidth_limits",
    )?;
    for l in stmt.query_map([], |r| {
        Ok(pb::BandwidthLimit {
            tenant: r.get(0)?,
            name: r.get(1)?,
            to_service_bytes_per_s: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
            to_client_bytes_per_s: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
        })
    })? {
        let l = l?;
        out.insert((l.tenant.clone(), l.name.clone()), l);
    }
    Ok(out)
}

/// The Watch event for one record set (`cleared` false) or removed.
pub fn event(l: &pb::BandwidthLimit, cleared: bool) -> (String, pb::LeaseDecision) {
    (
        l.tenant.clone(),
        pb::LeaseDecision {
            kind: lease_decision::Kind::Limit as i32,
            tenant: l.tenant.clone(),
            limit: Some(l.clone()),
            limit_cleared: cleared,
            ..Default::default()
        },
    )
}

/// The snapshot events of `tenant`'s records (every tenant's for `None`).
pub fn snapshot(s: &LeaseState, tenant: Option<&str>) -> Vec<(String, pb::LeaseDecision)> {
    s.limits
        .values()
        .filter(|l| tenant.is_none_or(|t| t == l.tenant))
        .map(|l| event(l, false))
        .collect()
}

/// Checks a request's record: tenant and name syntax, rates at most 1 Tbit/s, no rates with
/// `clear`.
///
/// # Errors
/// INVALID_ARGUMENT naming the field.
pub fn validate(r: &pb::SetLimitRequest) -> Result<pb::BandwidthLimit, Status> {
    let Some(l) = r.limit.clone() else {
        return Err(invalid("limit", "required"));
    };
    tenant_arg("limit.tenant", &l.tenant)?;
    if l.name.len() > MAX_LEASE_NAME_BYTES || !l.name.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(
            "limit.name",
            "empty (the whole tenant) or a lease name: printable ASCII, up to 253 bytes",
        ));
    }
    for (field, v) in [
        ("limit.to_service_bytes_per_s", l.to_service_bytes_per_s),
        ("limit.to_client_bytes_per_s", l.to_client_bytes_per_s),
    ] {
        if v > MAX_RATE_BYTES_PER_S {
            return Err(invalid(
                field,
                &format!("at most {MAX_RATE_BYTES_PER_S} bytes per second (1 Tbit/s)"),
            ));
        }
        if r.clear && v != 0 {
            return Err(invalid(field, "must be 0 with clear"));
        }
    }
    Ok(l)
}

/// `Leases.SetLimit`: validates, persists (with its audit row), publishes.
///
/// # Errors
/// INVALID_ARGUMENT, PERMISSION_DENIED (not a global admin), NOT_FOUND (clearing a record that
/// does not exist), store errors.
pub async fn set_limit(
    app: &App,
    p: &Principal,
    r: pb::SetLimitRequest,
) -> Result<Response<pb::SetLimitResponse>, Status> {
    const M: &str = "Leases.SetLimit";
    let l = validate(&r)?;
    app.require_global_admin(p, M)?;
    // One writer per (tenant, name): the store's order and the published order agree.
    let _held = app.lease_writes.name(&l.tenant, &l.name).await;
    let key = (l.tenant.clone(), l.name.clone());
    if r.clear && !app.leases.with_state(|s| s.limits.contains_key(&key)) {
        return Err(Status::not_found(format!(
            "limit: no bandwidth limit for tenant `{}`{}",
            l.tenant,
            if l.name.is_empty() {
                String::new()
            } else {
                format!(" lease `{}`", l.name)
            }
        )));
    }
    let what = if r.clear {
        "cleared".to_owned()
    } else {
        format!(
            "to_service_bytes_per_s={} to_client_bytes_per_s={}",
            l.to_service_bytes_per_s, l.to_client_bytes_per_s
        )
    };
    let target = if l.name.is_empty() { "*" } else { &l.name };
    let ev = App::admin_event(&l.tenant, audit::kind::ADMIN, &p.name(), target, M, &what);
    let (l2, clear) = (l.clone(), r.clear);
    app.store
        .write(move |conn, ctx| {
            if clear {
                conn.prepare_cached(
                    "DELETE FROM bandwidth_limits WHERE tenant = ?1 AND name = ?2",
                )?
                .execute(params![l2.tenant, l2.name])?;
            } else {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO bandwidth_limits (tenant, name, \
                     to_service_bytes_per_s, to_client_bytes_per_s) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    l2.tenant,
                    l2.name,
                    i64::try_from(l2.to_service_bytes_per_s).unwrap_or(i64::MAX),
                    i64::try_from(l2.to_client_bytes_per_s).unwrap_or(i64::MAX)
                ])?;
            }
            audit::append(conn, &mut ctx.audit, &ev).map(|_| ())
        })
        .await
        .map_err(store_status)?;
    app.leases.publish(|s| {
        if r.clear {
            s.limits.remove(&key);
        } else {
            s.limits.insert(key, l.clone());
        }
        vec![event(&l, r.clear)]
    });
    Ok(Response::new(pb::SetLimitResponse {
        limit: Some(l),
        cleared: r.clear,
    }))
}

/// `Leases.ListLimits`: any admin; a tenant admin sees its own tenant's records only.
///
/// # Errors
/// INVALID_ARGUMENT, PERMISSION_DENIED.
pub fn list_limits(
    app: &App,
    p: &Principal,
    r: &pb::ListLimitsRequest,
) -> Result<Response<pb::ListLimitsResponse>, Status> {
    const M: &str = "Leases.ListLimits";
    let scope = app.require_any_admin(p, M)?;
    let filter = if r.tenant.is_empty() {
        scope.map(|t| t.to_string())
    } else {
        tenant_arg("tenant", &r.tenant)?;
        app.require_admin_of(p, M, &r.tenant)?;
        Some(r.tenant.clone())
    };
    // BTreeMap order: tenant, then name; the tenant's own record (empty name) first.
    let limits = app.leases.with_state(|s| {
        s.limits
            .values()
            .filter(|l| filter.as_deref().is_none_or(|t| l.tenant == t))
            .cloned()
            .collect()
    });
    Ok(Response::new(pb::ListLimitsResponse { limits }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, to_service: u64, to_client: u64, clear: bool) -> pb::SetLimitRequest {
        pb::SetLimitRequest {
            limit: Some(pb::BandwidthLimit {
                tenant: "acme".into(),
                name: name.into(),
                to_service_bytes_per_s: to_service,
                to_client_bytes_per_s: to_client,
            }),
            clear,
        }
    }

    #[test]
    fn validation_names_the_field() {
        let field = |r: pb::SetLimitRequest| {
            validate(&r)
                .expect_err("refused")
                .message()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        assert!(validate(&req("", 0, 0, false)).is_ok());
        assert!(validate(&req("web", MAX_RATE_BYTES_PER_S, 1, false)).is_ok());
        assert!(validate(&req("web", 0, 0, true)).is_ok());
        assert_eq!(
            field(req("web", MAX_RATE_BYTES_PER_S + 1, 0, false)),
            "limit.to_service_bytes_per_s"
        );
        assert_eq!(
            field(req("web", 0, u64::MAX, false)),
            "limit.to_client_bytes_per_s"
        );
        assert_eq!(
            field(req("web", 5, 0, true)),
            "limit.to_service_bytes_per_s"
        );
        assert_eq!(field(req("a b", 5, 0, false)), "limit.name");
        assert_eq!(field(req(&"x".repeat(254), 5, 0, false)), "limit.name");
        let mut bad_tenant = req("web", 1, 1, false);
        if let Some(l) = bad_tenant.limit.as_mut() {
            l.tenant = "system".into();
        }
        assert_eq!(field(bad_tenant), "limit.tenant");
        assert_eq!(
            field(pb::SetLimitRequest {
                limit: None,
                clear: false
            }),
            "limit"
        );
    }
}
