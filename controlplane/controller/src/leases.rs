//! Public lease records and their approval (the Leases service).
//!
//! Relays report grants, renewals and releases; the controller answers with the decision.
//! Each tenant has an approval mode (auto by default; manual answers `pending_approval` until an
//! admin approves) and a quota of live leases (pending or approved, expiry not passed;
//! 0 = unlimited). Bans are by (tenant, name). Records are durable (group commit); decisions
//! reach relays via Watch.
//!
//! Who decides what (review M6, M7):
//! - quotas, approval modes, bans and the port lease admin gates are operator abuse controls:
//!   global admins only;
//! - a tenant admin approves or denies its own tenant's leases, but never a banned name; only a
//!   global admin's approve lifts a ban;
//! - an approval belongs to (tenant, name), not to one record: a later grant of the same name
//!   (after a disconnect, an agent or relay restart) is approved without asking again, until a
//!   deny or a ban takes the approval back;
//! - a record whose expiry passed (its relay died without reporting a release) no longer holds
//!   its name or counts toward the quota.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use outrelay_api::pb::{self, lease, lease_decision, lease_report_request, leases_server};
use outrelay_proto::identity::{Identity, Label};
use rusqlite::{Connection, params};
use tonic::{Request, Response, Status};

use crate::app::{App, now_unix_ms};
use crate::audit;
use crate::grpc::{Principal, invalid, store_status, tenant_arg};
use crate::policy::watch_scope;
use crate::store::StoreError;
use crate::watch::WatchStream;

/// Longest lease name, in bytes.
pub const MAX_LEASE_NAME_BYTES: usize = 253;

/// Per-tenant lease settings.
#[derive(Debug, Clone, Copy)]
pub struct TenantSettings {
    /// Approval mode (`pb::ApprovalMode` as i32).
    pub mode: i32,
    /// Most active leases (0 = unlimited).
    pub max_leases: u32,
}

impl Default for TenantSettings {
    fn default() -> Self {
        TenantSettings {
            mode: pb::ApprovalMode::Auto as i32,
            max_leases: 0,
        }
    }
}

/// The port lease admin gates set for one relay (or for every relay: relay id ``).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gates {
    /// TCP port leases; `None`: the relay's configured gate.
    pub tcp: Option<pb::PortGate>,
    /// UDP leases; `None`: the relay's configured gate.
    pub udp: Option<pb::PortGate>,
}

/// In-memory mirror of the lease tables.
#[derive(Debug, Default)]
pub struct LeaseState {
    leases: BTreeMap<String, pb::Lease>,
    bans: BTreeSet<(String, String)>,
    /// (tenant, name) pairs an admin approved (manual mode grants them at once).
    approved: BTreeSet<(String, String)>,
    tenants: BTreeMap<String, TenantSettings>,
    /// Admin gates by relay id (`` = every relay).
    gates: BTreeMap<String, Gates>,
    /// Bandwidth limit records by (tenant, lease name; `` = the whole tenant).
    pub(crate) limits: crate::bandwidth::Limits,
}

impl LeaseState {
    fn by_name(&self, tenant: &str, name: &str) -> Option<&pb::Lease> {
        self.leases
            .values()
            .find(|l| l.tenant == tenant && l.name == name)
    }

    /// Drops pruned records (the prune job deleted them from the table).
    pub(crate) fn forget(&mut self, ids: &[String]) {
        for id in ids {
            self.leases.remove(id);
        }
    }

    /// Live leases of `tenant` at `now_unix_ms` (what the quota counts).
    fn active_count(&self, tenant: &str, now_unix_ms: i64) -> usize {
        self.leases
            .values()
            .filter(|l| l.tenant == tenant && is_live(l, now_unix_ms))
            .count()
    }
}

fn is_active(state: i32) -> bool {
    state == lease::State::Pending as i32 || state == lease::State::Approved as i32
}

/// Pending or approved, and not expired: a record whose relay stopped renewing it (killed, or
/// its release report lost) stops holding its name and counting toward the quota at its expiry.
fn is_live(l: &pb::Lease, now_unix_ms: i64) -> bool {
    is_active(l.state) && l.expires_unix_ms > now_unix_ms
}

/// What a committed record also changes in the ban and approval sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Nothing.
    None,
    /// Ban (tenant, name); its approval is taken back.
    Ban,
    /// Approve (tenant, name); lifts a ban (only a global admin gets here with one).
    Approve,
    /// Take the approval of (tenant, name) back.
    Deny,
}

fn gate_row(enabled: Option<bool>, max: Option<u32>) -> Option<pb::PortGate> {
    enabled.map(|enabled| pb::PortGate {
        enabled,
        max_leases: max.unwrap_or(0),
    })
}

fn gate_event(relay_id: &str, g: Gates) -> (String, pb::LeaseDecision) {
    (
        String::new(),
        pb::LeaseDecision {
            kind: lease_decision::Kind::Gate as i32,
            relay_id: relay_id.to_owned(),
            tcp: g.tcp,
            udp: g.udp,
            ..Default::default()
        },
    )
}

/// Loads leases, bans and tenant settings (start-up).
///
/// # Errors
/// SQLite errors.
pub fn load_state(conn: &Connection) -> Result<LeaseState, StoreError> {
    let mut s = LeaseState::default();
    let mut stmt = conn.prepare(
        "SELECT id, tenant, name, agent_uri, relay_id, lease_kind, state, created_at_unix_ms, \
         updated_at_unix_ms, expires_unix_ms FROM leases",
    )?;
    for l in stmt.query_map([], |r| {
        Ok(pb::Lease {
            id: r.get(0)?,
            tenant: r.get(1)?,
            name: r.get(2)?,
            agent_uri: r.get(3)?,
            relay_id: r.get(4)?,
            lease_kind: r.get(5)?,
            state: r.get(6)?,
            created_at_unix_ms: r.get(7)?,
            updated_at_unix_ms: r.get(8)?,
            expires_unix_ms: r.get(9)?,
        })
    })? {
        let l = l?;
        s.leases.insert(l.id.clone(), l);
    }
    let mut stmt = conn.prepare("SELECT tenant, name FROM lease_bans")?;
    for b in stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
        s.bans.insert(b?);
    }
    let mut stmt = conn.prepare("SELECT tenant, approval_mode, max_leases FROM tenant_settings")?;
    for t in stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            TenantSettings {
                mode: r.get(1)?,
                max_leases: r.get(2)?,
            },
        ))
    })? {
        let (tenant, ts) = t?;
        s.tenants.insert(tenant, ts);
    }
    let mut stmt = conn.prepare("SELECT tenant, name FROM lease_approvals")?;
    for a in stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
        s.approved.insert(a?);
    }
    let mut stmt = conn.prepare(
        "SELECT relay_id, tcp_enabled, tcp_max_leases, udp_enabled, udp_max_leases FROM lease_gates",
    )?;
    for g in stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            Gates {
                tcp: gate_row(r.get(1)?, r.get(2)?),
                udp: gate_row(r.get(3)?, r.get(4)?),
            },
        ))
    })? {
        let (relay, g) = g?;
        s.gates.insert(relay, g);
    }
    s.limits = crate::bandwidth::load(conn)?;
    Ok(s)
}

fn save_lease(conn: &Connection, l: &pb::Lease) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO leases (id, tenant, name, agent_uri, relay_id, lease_kind, state, \
         created_at_unix_ms, updated_at_unix_ms, expires_unix_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, \
         ?7, ?8, ?9, ?10) ON CONFLICT(tenant, name) DO UPDATE SET id = excluded.id, agent_uri = \
         excluded.agent_uri, relay_id = excluded.relay_id, lease_kind = excluded.lease_kind, \
         state = excluded.state, updated_at_unix_ms = excluded.updated_at_unix_ms, \
         expires_unix_ms = excluded.expires_unix_ms",
    )?
    .execute(params![
        l.id,
        l.tenant,
        l.name,
        l.agent_uri,
        l.relay_id,
        l.lease_kind,
        l.state,
        l.created_at_unix_ms,
        l.updated_at_unix_ms,
        l.expires_unix_ms
    ])?;
    Ok(())
}

fn decision_of(l: &pb::Lease) -> Option<lease_decision::Kind> {
    match lease::State::try_from(l.state).ok()? {
        lease::State::Approved => Some(lease_decision::Kind::Approved),
        lease::State::Denied => Some(lease_decision::Kind::Denied),
        lease::State::Banned => Some(lease_decision::Kind::Banned),
        _ => None,
    }
}

fn lease_event(l: &pb::Lease, kind: lease_decision::Kind) -> (String, pb::LeaseDecision) {
    (
        l.tenant.clone(),
        pb::LeaseDecision {
            kind: kind as i32,
            lease: Some(l.clone()),
            tenant: l.tenant.clone(),
            ..Default::default()
        },
    )
}

/// Locks that make each lease decision and its commit one step.
///
/// A decision reads the mirror, decides, writes the store and publishes; two decisions about the
/// same (tenant, name) interleaved there lose one of them: two first grants both see no record
/// and the second replaces the first's id (an admin then approves an id that no longer exists), or
/// a renewal writes back the `pending` state an approval just replaced. Every write to a record
/// holds its (tenant, name) stripe; a grant, which also counts the tenant's quota, holds the
/// tenant's stripe first. Always tenant before name, so two holders never wait on each other.
/// Striped, so renewals of different names still batch into one group commit.
pub struct WriteLocks {
    tenants: [tokio::sync::Mutex<()>; TENANT_STRIPES],
    names: [tokio::sync::Mutex<()>; NAME_STRIPES],
}

const TENANT_STRIPES: usize = 16;
const NAME_STRIPES: usize = 64;

impl Default for WriteLocks {
    fn default() -> Self {
        WriteLocks {
            tenants: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
            names: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
        }
    }
}

fn stripe(key: impl std::hash::Hash, stripes: usize) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
    usize::try_from(h % stripes as u64).unwrap_or(0)
}

impl WriteLocks {
    /// Holds writes to one (tenant, name).
    pub(crate) async fn name(&self, tenant: &str, name: &str) -> tokio::sync::MutexGuard<'_, ()> {
        self.names[stripe((tenant, name), NAME_STRIPES)]
            .lock()
            .await
    }

    /// Holds grants of the tenant (quota), then writes to the name.
    async fn grant(
        &self,
        tenant: &str,
        name: &str,
    ) -> (
        tokio::sync::MutexGuard<'_, ()>,
        tokio::sync::MutexGuard<'_, ()>,
    ) {
        let t = self.tenants[stripe(tenant, TENANT_STRIPES)].lock().await;
        (t, self.name(tenant, name).await)
    }
}

/// The Leases service.
#[derive(Clone)]
pub struct LeasesService(pub Arc<App>);

impl LeasesService {
    /// Persists `l` (with an audit row when it is a state change: renewals carry none), then
    /// publishes it.
    async fn commit(
        &self,
        l: pb::Lease,
        ev: Option<pb::AuditEvent>,
        mark: Mark,
    ) -> Result<(), Status> {
        let l2 = l.clone();
        self.0
            .store
            .write(move |conn, ctx| {
                save_lease(conn, &l2)?;
                if mark == Mark::Ban {
                    conn.prepare_cached(
                        "INSERT OR REPLACE INTO lease_bans (tenant, name, agent_uri, banned_at_unix_ms) \
                         VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![l2.tenant, l2.name, l2.agent_uri, l2.updated_at_unix_ms])?;
                }
                if mark == Mark::Approve {
                    conn.prepare_cached(
                        "INSERT OR REPLACE INTO lease_approvals (tenant, name, approved_at_unix_ms) \
                         VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![l2.tenant, l2.name, l2.updated_at_unix_ms])?;
                    conn.prepare_cached("DELETE FROM lease_bans WHERE tenant = ?1 AND name = ?2")?
                        .execute(params![l2.tenant, l2.name])?;
                }
                if matches!(mark, Mark::Ban | Mark::Deny) {
                    conn.prepare_cached(
                        "DELETE FROM lease_approvals WHERE tenant = ?1 AND name = ?2",
                    )?
                    .execute(params![l2.tenant, l2.name])?;
                }
                match &ev {
                    Some(ev) => audit::append(conn, &mut ctx.audit, ev).map(|_| ()),
                    None => Ok(()),
                }
            })
            .await
            .map_err(store_status)?;
        self.0.leases.publish(|s| {
            let key = (l.tenant.clone(), l.name.clone());
            match mark {
                Mark::None => {}
                Mark::Ban => {
                    s.approved.remove(&key);
                    s.bans.insert(key);
                }
                Mark::Approve => {
                    s.bans.remove(&key);
                    s.approved.insert(key);
                }
                Mark::Deny => {
                    s.approved.remove(&key);
                }
            }
            // One record per (tenant, name), as in the table: a re-grant replaces the released
            // record, so `by_name` can never find the old one and renew it over the live row.
            s.leases
                .retain(|id, x| *id == l.id || x.tenant != l.tenant || x.name != l.name);
            s.leases.insert(l.id.clone(), l.clone());
            decision_of(&l)
                .map(|k| lease_event(&l, k))
                .into_iter()
                .collect()
        });
        Ok(())
    }

    async fn act(
        &self,
        req: Request<pb::LeaseActionRequest>,
        method: &'static str,
        state: lease::State,
    ) -> Result<Response<pb::LeaseActionResponse>, Status> {
        let app = &self.0;
        let p = app.authenticate(&req, method)?;
        let r = req.into_inner();
        tenant_arg("tenant", &r.tenant)?;
        // A ban is an operator's abuse control: a tenant admin must not set or undo it (M6).
        if state == lease::State::Banned {
            app.require_global_admin(&p, method)?;
        } else {
            app.require_admin_of(&p, method, &r.tenant)?;
        }
        let Some(key) = app.leases.with_state(|s| {
            s.leases
                .get(&r.id)
                .map(|l| (l.tenant.clone(), l.name.clone()))
        }) else {
            return Err(Status::not_found(format!(
                "id: no lease `{}` in tenant `{}`",
                r.id, r.tenant
            )));
        };
        let _held = app.lease_writes.name(&key.0, &key.1).await;
        // Read again under the lock: a grant may have replaced the record meanwhile.
        let Some((mut l, banned)) = app.leases.with_state(|s| {
            s.leases
                .get(&r.id)
                .filter(|l| l.tenant == r.tenant)
                .map(|l| {
                    (
                        l.clone(),
                        s.bans.contains(&(l.tenant.clone(), l.name.clone())),
                    )
                })
        }) else {
            return Err(Status::not_found(format!(
                "id: no lease `{}` in tenant `{}`",
                r.id, r.tenant
            )));
        };
        if banned && state != lease::State::Banned {
            if state == lease::State::Denied {
                return Err(Status::failed_precondition(format!(
                    "lease `{}` is banned: a ban stays until a global admin approves the lease",
                    l.name
                )));
            }
            if !matches!(p, Principal::GlobalAdmin(_)) {
                return Err(app.refuse(
                    &p,
                    method,
                    &format!(
                        "lease `{}` is banned: only a global admin may lift a ban",
                        l.name
                    ),
                ));
            }
        }
        let mark = match state {
            lease::State::Banned => Mark::Ban,
            lease::State::Approved => Mark::Approve,
            _ => Mark::Deny,
        };
        l.state = state as i32;
        l.updated_at_unix_ms = now_unix_ms();
        let ev = App::admin_event(
            &l.tenant,
            audit::kind::ADMIN,
            &p.name(),
            &l.name,
            method,
            &format!("lease {} -> {:?}", l.id, state),
        );
        self.commit(l.clone(), Some(ev), mark).await?;
        Ok(Response::new(pb::LeaseActionResponse { lease: Some(l) }))
    }

    async fn set_tenant(
        &self,
        p: &Principal,
        method: &'static str,
        tenant: &str,
        f: impl FnOnce(&mut TenantSettings),
    ) -> Result<TenantSettings, Status> {
        let app = &self.0;
        let mut ts = app
            .leases
            .with_state(|s| s.tenants.get(tenant).copied().unwrap_or_default());
        f(&mut ts);
        let ev = App::admin_event(
            tenant,
            audit::kind::ADMIN,
            &p.name(),
            tenant,
            method,
            &format!("mode={} max_leases={}", ts.mode, ts.max_leases),
        );
        let t2 = tenant.to_owned();
        app.store
            .write(move |conn, ctx| {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO tenant_settings (tenant, approval_mode, max_leases) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![t2, ts.mode, ts.max_leases])?;
                audit::append(conn, &mut ctx.audit, &ev)
            })
            .await
            .map_err(store_status)?;
        Ok(ts)
    }
}

#[tonic::async_trait]
impl leases_server::Leases for LeasesService {
    async fn report(
        &self,
        req: Request<pb::LeaseReportRequest>,
    ) -> Result<Response<pb::LeaseReportResponse>, Status> {
        const M: &str = "Leases.Report";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let (_, relay_id) = app.require_relay(&p, M)?;
        let r = req.into_inner();
        tenant_arg("tenant", &r.tenant)?;
        if r.name.is_empty()
            || r.name.len() > MAX_LEASE_NAME_BYTES
            || !r.name.bytes().all(|c| c.is_ascii_graphic())
        {
            return Err(invalid("name", "printable ASCII, 1 to 253 bytes"));
        }
        match Identity::parse(&r.agent_uri) {
            Ok(Identity::Agent { tenant, .. }) if tenant.as_str() == r.tenant => {}
            _ => {
                return Err(invalid(
                    "agent_uri",
                    "must be an agent identity of the request's tenant",
                ));
            }
        }
        let kind = lease_report_request::Kind::try_from(r.kind)
            .unwrap_or(lease_report_request::Kind::Unspecified);
        let _held = if kind == lease_report_request::Kind::Grant {
            let (t, n) = app.lease_writes.grant(&r.tenant, &r.name).await;
            (Some(t), n)
        } else {
            (None, app.lease_writes.name(&r.tenant, &r.name).await)
        };
        let now = now_unix_ms();
        let expires = now.saturating_add(i64::try_from(r.ttl_ms).unwrap_or(i64::MAX));
        let (existing, banned, ts, active, approved) = app.leases.with_state(|s| {
            (
                s.by_name(&r.tenant, &r.name).cloned(),
                s.bans.contains(&(r.tenant.clone(), r.name.clone())),
                s.tenants.get(&r.tenant).copied().unwrap_or_default(),
                s.active_count(&r.tenant, now),
                s.approved.contains(&(r.tenant.clone(), r.name.clone())),
            )
        });
        let caller = p.name();
        let ev = |reason: &str| {
            App::admin_event(&r.tenant, audit::kind::LEASE, &caller, &r.name, M, reason)
        };
        let reply = |l: &pb::Lease, msg: &str| {
            Response::new(pb::LeaseReportResponse {
                lease: Some(l.clone()),
                message: msg.to_owned(),
            })
        };
        match kind {
            lease_report_request::Kind::Unspecified => {
                Err(invalid("kind", "must be GRANT, RENEW or RELEASE"))
            }
            lease_report_request::Kind::Renew | lease_report_request::Kind::Release => {
                let Some(mut l) = existing.filter(|l| l.agent_uri == r.agent_uri) else {
                    return Err(Status::not_found(format!(
                        "name: no lease `{}` for this agent",
                        r.name
                    )));
                };
                l.updated_at_unix_ms = now;
                if kind == lease_report_request::Kind::Release {
                    // A banned record stays banned: the ban outlives the agent's connection.
                    if l.state != lease::State::Banned as i32 {
                        l.state = lease::State::Released as i32;
                    }
                } else {
                    l.expires_unix_ms = expires;
                }
                // A renewal only moves the expiry: durable, but not an audited state change
                // (one row per lease per renewal interval would grow the log without bound).
                let audited = (kind == lease_report_request::Kind::Release).then(|| ev("release"));
                if audited.is_none() {
                    metrics::counter!("outrelay_controller_lease_renewals_total").increment(1);
                }
                self.commit(l.clone(), audited, Mark::None).await?;
                Ok(reply(
                    &l,
                    if l.state == lease::State::Pending as i32 {
                        "pending_approval"
                    } else {
                        ""
                    },
                ))
            }
            lease_report_request::Kind::Grant => {
                // The ban is checked first: a record that is still live never outranks it (M6).
                if banned {
                    let mut l = existing.clone().unwrap_or_else(|| pb::Lease {
                        id: uuid::Uuid::new_v4().to_string(),
                        tenant: r.tenant.clone(),
                        name: r.name.clone(),
                        agent_uri: r.agent_uri.clone(),
                        relay_id: relay_id.to_string(),
                        lease_kind: r.lease_kind.clone(),
                        created_at_unix_ms: now,
                        updated_at_unix_ms: now,
                        expires_unix_ms: expires,
                        ..Default::default()
                    });
                    l.state = lease::State::Banned as i32;
                    return Ok(reply(&l, "banned"));
                }
                if let Some(l) = &existing
                    && is_live(l, now)
                {
                    if l.agent_uri != r.agent_uri {
                        let mut denied = l.clone();
                        denied.state = lease::State::Denied as i32;
                        return Ok(reply(&denied, "name_taken"));
                    }
                    let msg = if l.state == lease::State::Pending as i32 {
                        "pending_approval"
                    } else {
                        ""
                    };
                    // A request repeated while it waits for an admin keeps its record (and the
                    // id the admin sees) alive for another TTL.
                    if l.expires_unix_ms < expires {
                        let mut l = l.clone();
                        l.expires_unix_ms = expires;
                        l.updated_at_unix_ms = now;
                        self.commit(l.clone(), None, Mark::None).await?;
                        return Ok(reply(&l, msg));
                    }
                    return Ok(reply(l, msg));
                }
                let mut l = pb::Lease {
                    id: uuid::Uuid::new_v4().to_string(),
                    tenant: r.tenant.clone(),
                    name: r.name.clone(),
                    agent_uri: r.agent_uri.clone(),
                    relay_id: relay_id.to_string(),
                    lease_kind: r.lease_kind.clone(),
                    state: lease::State::Pending as i32,
                    created_at_unix_ms: now,
                    updated_at_unix_ms: now,
                    expires_unix_ms: expires,
                };
                if ts.max_leases > 0
                    && active >= usize::try_from(ts.max_leases).unwrap_or(usize::MAX)
                {
                    l.state = lease::State::Denied as i32;
                    metrics::counter!("outrelay_controller_lease_refused_total", "reason" => "quota_exceeded").increment(1);
                    return Ok(reply(&l, "quota_exceeded"));
                }
                // An approval outlives the record it was given to (M7): the same name granted
                // again after a disconnect or restart needs no second approval.
                let (msg, why) = if ts.mode != pb::ApprovalMode::Manual as i32 {
                    ("", "granted")
                } else if approved {
                    ("", "granted (approved earlier)")
                } else {
                    ("pending_approval", "pending_approval")
                };
                if msg.is_empty() {
                    l.state = lease::State::Approved as i32;
                }
                self.commit(l.clone(), Some(ev(why)), Mark::None).await?;
                Ok(reply(&l, msg))
            }
        }
    }

    type WatchStream = WatchStream<(String, pb::LeaseDecision), pb::LeaseDecision>;

    async fn watch(
        &self,
        req: Request<pb::WatchLeasesRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        const M: &str = "Leases.Watch";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let expires = crate::grpc::cert_not_after(&req);
        let tenant = watch_scope(app, &p, M, &req.into_inner().tenant)?;
        let t2 = tenant.clone();
        let sub = app.leases.subscribe(
            move |s| {
                let mut out = Vec::new();
                for (t, ts) in &s.tenants {
                    if t2.as_deref().is_some_and(|x| x != t) {
                        continue;
                    }
                    out.push((
                        t.clone(),
                        pb::LeaseDecision {
                            kind: lease_decision::Kind::Quota as i32,
                            tenant: t.clone(),
                            max_leases: ts.max_leases,
                            ..Default::default()
                        },
                    ));
                    out.push((
                        t.clone(),
                        pb::LeaseDecision {
                            kind: lease_decision::Kind::Mode as i32,
                            tenant: t.clone(),
                            mode: ts.mode,
                            ..Default::default()
                        },
                    ));
                }
                for l in s.leases.values() {
                    if t2.as_deref().is_some_and(|x| x != l.tenant) {
                        continue;
                    }
                    if let Some(k) = decision_of(l) {
                        out.push(lease_event(l, k));
                    }
                }
                // Gates concern relays only (tenant ``): a tenant's watch never sees them.
                if t2.is_none() {
                    out.extend(s.gates.iter().map(|(relay, g)| gate_event(relay, *g)));
                }
                out.extend(crate::bandwidth::snapshot(s, t2.as_deref()));
                out
            },
            move |(t, _): &(String, pb::LeaseDecision)| tenant.as_deref().is_none_or(|x| x == t),
        );
        let end = pb::LeaseDecision {
            kind: lease_decision::Kind::SnapshotEnd as i32,
            ..Default::default()
        };
        Ok(Response::new(
            sub.into_stream(end, |(_, d)| d)
                .until(app.watch_end(&p, expires)),
        ))
    }

    async fn list(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        const M: &str = "Leases.List";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let tenant = req.into_inner().tenant;
        let scope = app.require_any_admin(&p, M)?;
        let filter = if tenant.is_empty() {
            scope.map(|t| t.to_string())
        } else {
            tenant_arg("tenant", &tenant)?;
            app.require_admin_of(&p, M, &tenant)?;
            Some(tenant)
        };
        let mut leases: Vec<pb::Lease> = app.leases.with_state(|s| {
            s.leases
                .values()
                .filter(|l| filter.as_deref().is_none_or(|t| l.tenant == t))
                .cloned()
                .collect()
        });
        leases.sort_by(|a, b| (&a.tenant, &a.name).cmp(&(&b.tenant, &b.name)));
        Ok(Response::new(pb::ListLeasesResponse { leases }))
    }

    async fn approve(
        &self,
        req: Request<pb::LeaseActionRequest>,
    ) -> Result<Response<pb::LeaseActionResponse>, Status> {
        self.act(req, "Leases.Approve", lease::State::Approved)
            .await
    }

    async fn deny(
        &self,
        req: Request<pb::LeaseActionRequest>,
    ) -> Result<Response<pb::LeaseActionResponse>, Status> {
        self.act(req, "Leases.Deny", lease::State::Denied).await
    }

    async fn ban(
        &self,
        req: Request<pb::LeaseActionRequest>,
    ) -> Result<Response<pb::LeaseActionResponse>, Status> {
        self.act(req, "Leases.Ban", lease::State::Banned).await
    }

    async fn set_quota(
        &self,
        req: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::SetQuotaResponse>, Status> {
        const M: &str = "Leases.SetQuota";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        tenant_arg("tenant", &r.tenant)?;
        app.require_global_admin(&p, M)?;
        let ts = self
            .set_tenant(&p, M, &r.tenant, |ts| ts.max_leases = r.max_leases)
            .await?;
        app.leases.publish(|s| {
            s.tenants.insert(r.tenant.clone(), ts);
            vec![(
                r.tenant.clone(),
                pb::LeaseDecision {
                    kind: lease_decision::Kind::Quota as i32,
                    tenant: r.tenant.clone(),
                    max_leases: ts.max_leases,
                    ..Default::default()
                },
            )]
        });
        Ok(Response::new(pb::SetQuotaResponse {}))
    }

    async fn set_approval_mode(
        &self,
        req: Request<pb::SetApprovalModeRequest>,
    ) -> Result<Response<pb::SetApprovalModeResponse>, Status> {
        const M: &str = "Leases.SetApprovalMode";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        tenant_arg("tenant", &r.tenant)?;
        if r.mode != pb::ApprovalMode::Auto as i32 && r.mode != pb::ApprovalMode::Manual as i32 {
            return Err(invalid("mode", "must be AUTO or MANUAL"));
        }
        app.require_global_admin(&p, M)?;
        let ts = self
            .set_tenant(&p, M, &r.tenant, |ts| ts.mode = r.mode)
            .await?;
        app.leases.publish(|s| {
            s.tenants.insert(r.tenant.clone(), ts);
            vec![(
                r.tenant.clone(),
                pb::LeaseDecision {
                    kind: lease_decision::Kind::Mode as i32,
                    tenant: r.tenant.clone(),
                    mode: ts.mode,
                    ..Default::default()
                },
            )]
        });
        Ok(Response::new(pb::SetApprovalModeResponse {}))
    }

    async fn set_gate(
        &self,
        req: Request<pb::SetGateRequest>,
    ) -> Result<Response<pb::SetGateResponse>, Status> {
        const M: &str = "Leases.SetGate";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        if !r.relay_id.is_empty() && Label::new(&r.relay_id).is_none() {
            return Err(invalid(
                "relay_id",
                "empty (every relay) or a relay id ^[a-z0-9][a-z0-9-]{0,62}$",
            ));
        }
        if r.tcp.is_none() && r.udp.is_none() {
            return Err(invalid("tcp", "set tcp, udp or both"));
        }
        app.require_global_admin(&p, M)?;
        let mut g = app
            .leases
            .with_state(|s| s.gates.get(&r.relay_id).copied().unwrap_or_default());
        if r.tcp.is_some() {
            g.tcp = r.tcp;
        }
        if r.udp.is_some() {
            g.udp = r.udp;
        }
        let show = |x: Option<pb::PortGate>| match x {
            None => "config".to_owned(),
            Some(x) if !x.enabled => "off".to_owned(),
            Some(x) => format!("on max_leases={}", x.max_leases),
        };
        let relay = if r.relay_id.is_empty() {
            "*"
        } else {
            r.relay_id.as_str()
        };
        let ev = App::admin_event(
            outrelay_proto::identity::SYSTEM_TENANT,
            audit::kind::ADMIN,
            &p.name(),
            relay,
            M,
            &format!("tcp={} udp={}", show(g.tcp), show(g.udp)),
        );
        let relay_id = r.relay_id.clone();
        app.store
            .write(move |conn, ctx| {
                let col = |x: Option<pb::PortGate>| (x.map(|x| x.enabled), x.map(|x| x.max_leases));
                let ((te, tm), (ue, um)) = (col(g.tcp), col(g.udp));
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO lease_gates (relay_id, tcp_enabled, tcp_max_leases, \
                     udp_enabled, udp_max_leases) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![relay_id, te, tm, ue, um])?;
                audit::append(conn, &mut ctx.audit, &ev).map(|_| ())
            })
            .await
            .map_err(store_status)?;
        app.leases.publish(|s| {
            s.gates.insert(r.relay_id.clone(), g);
            vec![gate_event(&r.relay_id, g)]
        });
        Ok(Response::new(pb::SetGateResponse {
            relay_id: r.relay_id,
            tcp: g.tcp,
            udp: g.udp,
        }))
    }

    async fn set_limit(
        &self,
        req: Request<pb::SetLimitRequest>,
    ) -> Result<Response<pb::SetLimitResponse>, Status> {
        let p = self.0.authenticate(&req, "Leases.SetLimit")?;
        crate::bandwidth::set_limit(&self.0, &p, req.into_inner()).await
    }

    async fn list_limits(
        &self,
        req: Request<pb::ListLimitsRequest>,
    ) -> Result<Response<pb::ListLimitsResponse>, Status> {
        let p = self.0.authenticate(&req, "Leases.ListLimits")?;
        crate::bandwidth::list_limits(&self.0, &p, req.get_ref())
    }
}
