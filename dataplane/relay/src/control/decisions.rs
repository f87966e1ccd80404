//! The relay's copy of the controller's lease decisions (pure: no I/O, time is an argument).
//!
//! Built from `Leases.Watch` (snapshot, SNAPSHOT_END, live) plus the records the controller
//! returns from `Leases.Report`, and published whole through one `ArcSwap`: the lease path
//! answers every LEASE_REGISTER from it without I/O.
//!
//! How each controller verdict maps to a LEASE_REGISTER answer ([`Decisions::decide`]):
//!
//! | record for (tenant, name) | answer |
//! |---|---|
//! | BANNED (any agent) | `unauthorized` / `banned` |
//! | DENIED for this agent | `lease_rejected` / `denied` (sticky until an admin approves it) |
//! | APPROVED for this agent | granted (already counted in the quota) |
//! | none, tenant quota used up | `lease_rejected` / `quota_exceeded` |
//! | none, tenant in manual mode | `lease_rejected` / `pending_approval`; the relay reports the request, the controller creates the pending record, the agent retries at TTL/2 and is granted once the APPROVED decision arrives |
//! | none, auto mode | granted; the relay reports the grant |
//!
//! The controller's answer to each GRANT report stays authoritative: if it disagrees (quota
//! counted across relays, a ban the relay had not seen yet), the relay ends the lease.

use std::collections::HashMap;

use crate::bandwidth::{Limit, Scope};
use crate::lease::{AdminGate, ControllerDecision};
use outrelay_api::pb::{self, lease, lease_decision};

/// Where a controller lease record stands (the subset the relay acts on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    /// Waiting for an admin (counts toward the quota).
    Pending,
    /// Routable.
    Approved,
    /// Refused by an admin for this agent.
    Denied,
    /// The (tenant, name) is banned for every agent.
    Banned,
    /// Released: counts for nothing.
    Released,
}

impl RecordState {
    /// The state of a controller record; `None` for unspecified.
    pub fn from_pb(state: i32) -> Option<RecordState> {
        Some(match lease::State::try_from(state).ok()? {
            lease::State::Pending => RecordState::Pending,
            lease::State::Approved => RecordState::Approved,
            lease::State::Denied => RecordState::Denied,
            lease::State::Banned => RecordState::Banned,
            lease::State::Released => RecordState::Released,
            lease::State::Unspecified => return None,
        })
    }
}

/// One controller lease record, as the relay keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The controller's record id (what admins approve, deny and ban).
    pub id: String,
    /// The agent that asked for it.
    pub agent_uri: String,
    /// Where it stands.
    pub state: RecordState,
    /// When the record stops counting toward the quota on this relay (the controller never
    /// expires records; this relay only uses it to forget other relays' stale records).
    pub expires_unix_ms: i64,
}

/// One tenant's lease settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantRule {
    /// Manual approval mode.
    pub manual: bool,
    /// Most pending plus approved leases (0 = unlimited).
    pub max_leases: u32,
}

/// The port lease admin gates an operator set (`Leases.SetGate`); `None`: the configured one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateRule {
    /// TCP port leases.
    pub tcp: Option<AdminGate>,
    /// UDP leases.
    pub udp: Option<AdminGate>,
}

/// Every decision the relay knows, by tenant and (tenant, name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Tenant settings (absent: auto, unlimited).
    pub tenants: HashMap<String, TenantRule>,
    /// Lease records by `(tenant, name)`.
    pub records: HashMap<(String, String), Record>,
    /// Port lease admin gates by relay id (`` = every relay).
    pub gates: HashMap<String, GateRule>,
    /// The controller's bandwidth limit records (`Leases.SetLimit`): a tenant's (empty lease
    /// name) and single leases'.
    pub limits: HashMap<Scope, Limit>,
}

/// What applying one decision asks the relay to do to its live leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforce {
    /// Nothing.
    Nothing,
    /// End every live lease of (tenant, name) (a ban).
    EndName {
        /// Tenant.
        tenant: String,
        /// Lease name.
        name: String,
    },
    /// Apply this relay's port lease admin gates ([`Decisions::gates_for`]) to the lease table.
    Gates,
    /// Hand the whole set of bandwidth limit records ([`Decisions::limits`]) to the data path.
    Limits,
    /// End the live lease of (tenant, name) held by `agent_uri` (a denial).
    EndAgentName {
        /// Tenant.
        tenant: String,
        /// Lease name.
        name: String,
        /// Agent identity URI.
        agent_uri: String,
    },
}

impl Decisions {
    /// The gates for relay `relay_id`, per transport: its own, else every relay's, else `None`
    /// (the relay's configuration).
    pub fn gates_for(&self, relay_id: &str) -> GateRule {
        let own = self.gates.get(relay_id).copied().unwrap_or_default();
        let all = self.gates.get("").copied().unwrap_or_default();
        GateRule {
            tcp: own.tcp.or(all.tcp),
            udp: own.udp.or(all.udp),
        }
    }

    /// The verdict for `agent_uri` of `tenant` asking for lease `name` (normalised) at `now`.
    pub fn decide(
        &self,
        tenant: &str,
        name: &str,
        agent_uri: &str,
        now_unix_ms: i64,
    ) -> ControllerDecision {
        let key = (tenant.to_owned(), name.to_owned());
        if let Some(r) = self.records.get(&key) {
            match r.state {
                RecordState::Banned => return ControllerDecision::Banned,
                RecordState::Denied if r.agent_uri == agent_uri => {
                    return ControllerDecision::Rejected("denied".to_owned());
                }
                RecordState::Approved if r.agent_uri == agent_uri => {
                    return ControllerDecision::Approved;
                }
                _ => {}
            }
        }
        let rule = self.tenants.get(tenant).copied().unwrap_or_default();
        if rule.max_leases > 0 {
            let active = self
                .records
                .iter()
                .filter(|((t, n), r)| {
                    t == tenant
                        && n != name
                        && matches!(r.state, RecordState::Pending | RecordState::Approved)
                        && r.expires_unix_ms > now_unix_ms
                })
                .count();
            if active >= usize::try_from(rule.max_leases).unwrap_or(usize::MAX) {
                return ControllerDecision::QuotaExceeded;
            }
        }
        if rule.manual {
            // A pending record of this agent stays pending; anything else is a new request.
            return ControllerDecision::PendingApproval;
        }
        ControllerDecision::Approved
    }

    /// Applies one `Leases.Watch` event (not SNAPSHOT_END) and says what to enforce.
    pub fn apply(&mut self, d: &pb::LeaseDecision) -> Enforce {
        match lease_decision::Kind::try_from(d.kind).unwrap_or(lease_decision::Kind::Unspecified) {
            lease_decision::Kind::Quota => {
                self.tenants.entry(d.tenant.clone()).or_default().max_leases = d.max_leases;
                Enforce::Nothing
            }
            lease_decision::Kind::Mode => {
                self.tenants.entry(d.tenant.clone()).or_default().manual =
                    d.mode == pb::ApprovalMode::Manual as i32;
                Enforce::Nothing
            }
            lease_decision::Kind::Approved
            | lease_decision::Kind::Denied
            | lease_decision::Kind::Banned => match &d.lease {
                Some(l) => self.apply_record(l),
                None => Enforce::Nothing,
            },
            lease_decision::Kind::Gate => {
                let gate = |g: Option<pb::PortGate>| {
                    g.map(|g| AdminGate {
                        enabled: g.enabled,
                        max_leases: (g.max_leases > 0).then_some(g.max_leases),
                    })
                };
                self.gates.insert(
                    d.relay_id.clone(),
                    GateRule {
                        tcp: gate(d.tcp),
                        udp: gate(d.udp),
                    },
                );
                Enforce::Gates
            }
            lease_decision::Kind::Limit => match &d.limit {
                Some(l) if !l.tenant.is_empty() => {
                    let scope = limit_scope(l);
                    if d.limit_cleared {
                        self.limits.remove(&scope);
                    } else {
                        self.limits.insert(
                            scope,
                            Limit {
                                to_service_bytes_per_s: l.to_service_bytes_per_s,
                                to_client_bytes_per_s: l.to_client_bytes_per_s,
                            },
                        );
                    }
                    Enforce::Limits
                }
                _ => Enforce::Nothing,
            },
            lease_decision::Kind::SnapshotEnd | lease_decision::Kind::Unspecified => {
                Enforce::Nothing
            }
        }
    }

    /// Stores a controller record (from Watch or a Report answer) and says what to enforce.
    pub fn apply_record(&mut self, l: &pb::Lease) -> Enforce {
        let Some(state) = RecordState::from_pb(l.state) else {
            return Enforce::Nothing;
        };
        self.records.insert(
            (l.tenant.clone(), l.name.clone()),
            Record {
                id: l.id.clone(),
                agent_uri: l.agent_uri.clone(),
                state,
                expires_unix_ms: l.expires_unix_ms,
            },
        );
        match state {
            RecordState::Banned => Enforce::EndName {
                tenant: l.tenant.clone(),
                name: l.name.clone(),
            },
            RecordState::Denied => Enforce::EndAgentName {
                tenant: l.tenant.clone(),
                name: l.name.clone(),
                agent_uri: l.agent_uri.clone(),
            },
            _ => Enforce::Nothing,
        }
    }

    /// Everything to enforce after a fresh snapshot replaced the decisions.
    pub fn enforce_all(&self) -> Vec<Enforce> {
        // Gates and limits first, always: a fresh snapshot without any puts the configured
        // ones back (and clears every controller limit).
        [Enforce::Gates, Enforce::Limits]
            .into_iter()
            .chain(
                self.records
                    .iter()
                    .filter_map(|((tenant, name), r)| match r.state {
                        RecordState::Banned => Some(Enforce::EndName {
                            tenant: tenant.clone(),
                            name: name.clone(),
                        }),
                        RecordState::Denied => Some(Enforce::EndAgentName {
                            tenant: tenant.clone(),
                            name: name.clone(),
                            agent_uri: r.agent_uri.clone(),
                        }),
                        _ => None,
                    }),
            )
            .collect()
    }
}

/// What a limit record applies to: its tenant (empty name) or one lease.
fn limit_scope(l: &pb::BandwidthLimit) -> Scope {
    if l.name.is_empty() {
        Scope::Tenant(l.tenant.clone())
    } else {
        Scope::Lease {
            tenant: l.tenant.clone(),
            name: l.name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A1: &str = "outrelay://demo/agent/00000000-0000-4000-8000-000000000001";
    const A2: &str = "outrelay://demo/agent/00000000-0000-4000-8000-000000000002";

    fn record(name: &str, agent: &str, state: lease::State, expires: i64) -> pb::Lease {
        pb::Lease {
            id: format!("id-{name}"),
            tenant: "demo".into(),
            name: name.into(),
            agent_uri: agent.into(),
            state: state as i32,
            expires_unix_ms: expires,
            ..pb::Lease::default()
        }
    }

    fn event(kind: lease_decision::Kind, l: Option<pb::Lease>) -> pb::LeaseDecision {
        pb::LeaseDecision {
            kind: kind as i32,
            lease: l,
            tenant: "demo".into(),
            ..pb::LeaseDecision::default()
        }
    }

    #[test]
    fn auto_mode_without_records_approves() {
        let d = Decisions::default();
        assert_eq!(d.decide("demo", "web", A1, 0), ControllerDecision::Approved);
    }

    #[test]
    fn manual_mode_is_pending_until_approved_for_that_agent() {
        let mut d = Decisions::default();
        let mut mode = event(lease_decision::Kind::Mode, None);
        mode.mode = pb::ApprovalMode::Manual as i32;
        assert_eq!(d.apply(&mode), Enforce::Nothing);
        assert_eq!(
            d.decide("demo", "web", A1, 0),
            ControllerDecision::PendingApproval
        );
        d.apply(&event(
            lease_decision::Kind::Approved,
            Some(record("web", A1, lease::State::Approved, 10)),
        ));
        assert_eq!(d.decide("demo", "web", A1, 0), ControllerDecision::Approved);
        assert_eq!(
            d.decide("demo", "web", A2, 0),
            ControllerDecision::PendingApproval
        );
    }

    #[test]
    fn ban_applies_to_every_agent_and_asks_to_end_the_name() {
        let mut d = Decisions::default();
        let e = d.apply(&event(
            lease_decision::Kind::Banned,
            Some(record("web", A1, lease::State::Banned, 10)),
        ));
        assert_eq!(
            e,
            Enforce::EndName {
                tenant: "demo".into(),
                name: "web".into()
            }
        );
        assert_eq!(d.decide("demo", "web", A2, 0), ControllerDecision::Banned);
        assert_eq!(d.enforce_all(), vec![Enforce::Gates, Enforce::Limits, e]);
    }

    #[test]
    fn gates_are_per_relay_then_every_relay_then_configured() {
        let mut d = Decisions::default();
        let gate =
            |relay: &str, tcp: Option<pb::PortGate>, udp: Option<pb::PortGate>| pb::LeaseDecision {
                kind: lease_decision::Kind::Gate as i32,
                relay_id: relay.into(),
                tcp,
                udp,
                ..pb::LeaseDecision::default()
            };
        let off = pb::PortGate {
            enabled: false,
            max_leases: 0,
        };
        let two = pb::PortGate {
            enabled: true,
            max_leases: 2,
        };
        assert_eq!(d.gates_for("r1"), GateRule::default());
        assert_eq!(d.apply(&gate("", Some(off), Some(off))), Enforce::Gates);
        assert_eq!(d.apply(&gate("r1", Some(two), None)), Enforce::Gates);
        let closed = AdminGate {
            enabled: false,
            max_leases: None,
        };
        let r1 = d.gates_for("r1");
        assert_eq!(
            r1.tcp,
            Some(AdminGate {
                enabled: true,
                max_leases: Some(2)
            })
        );
        assert_eq!(r1.udp, Some(closed), "r1 has no UDP gate of its own");
        assert_eq!(d.gates_for("r2").tcp, Some(closed));
    }

    #[test]
    fn denial_is_per_agent_and_sticky() {
        let mut d = Decisions::default();
        let e = d.apply(&event(
            lease_decision::Kind::Denied,
            Some(record("web", A1, lease::State::Denied, 10)),
        ));
        assert!(matches!(e, Enforce::EndAgentName { .. }));
        assert_eq!(
            d.decide("demo", "web", A1, 0),
            ControllerDecision::Rejected("denied".into())
        );
        assert_eq!(d.decide("demo", "web", A2, 0), ControllerDecision::Approved);
    }

    #[test]
    fn quota_counts_other_live_pending_and_approved_records() {
        let mut d = Decisions::default();
        let mut q = event(lease_decision::Kind::Quota, None);
        q.max_leases = 2;
        d.apply(&q);
        d.apply_record(&record("a", A1, lease::State::Approved, 100));
        assert_eq!(d.decide("demo", "b", A1, 50), ControllerDecision::Approved);
        d.apply_record(&record("b", A1, lease::State::Pending, 100));
        assert_eq!(
            d.decide("demo", "c", A1, 50),
            ControllerDecision::QuotaExceeded
        );
        // Renewing an approved lease is not a new one.
        assert_eq!(d.decide("demo", "a", A1, 50), ControllerDecision::Approved);
        // Released and stale records do not count.
        d.apply_record(&record("b", A1, lease::State::Released, 100));
        assert_eq!(d.decide("demo", "c", A1, 50), ControllerDecision::Approved);
        d.apply_record(&record("b", A1, lease::State::Approved, 40));
        assert_eq!(d.decide("demo", "c", A1, 50), ControllerDecision::Approved);
        // Other tenants are not counted.
        assert_eq!(d.decide("other", "c", A1, 50), ControllerDecision::Approved);
    }

    #[test]
    fn unknown_kinds_and_states_change_nothing() {
        let mut d = Decisions::default();
        let mut e = event(lease_decision::Kind::Approved, None);
        e.kind = 99;
        assert_eq!(d.apply(&e), Enforce::Nothing);
        let mut r = record("a", A1, lease::State::Approved, 1);
        r.state = 42;
        assert_eq!(d.apply_record(&r), Enforce::Nothing);
        assert_eq!(d, Decisions::default());
    }

    fn limit(name: &str, to_service: u64, to_client: u64, cleared: bool) -> pb::LeaseDecision {
        pb::LeaseDecision {
            kind: lease_decision::Kind::Limit as i32,
            tenant: "demo".into(),
            limit: Some(pb::BandwidthLimit {
                tenant: "demo".into(),
                name: name.into(),
                to_service_bytes_per_s: to_service,
                to_client_bytes_per_s: to_client,
            }),
            limit_cleared: cleared,
            ..pb::LeaseDecision::default()
        }
    }

    #[test]
    fn limits_are_kept_by_scope_replaced_and_cleared() {
        let mut d = Decisions::default();
        assert_eq!(d.apply(&limit("", 100, 200, false)), Enforce::Limits);
        assert_eq!(
            d.apply(&limit("web", 25_000_000, 0, false)),
            Enforce::Limits
        );
        let tenant = Scope::Tenant("demo".into());
        let web = Scope::Lease {
            tenant: "demo".into(),
            name: "web".into(),
        };
        assert_eq!(
            d.limits.get(&tenant),
            Some(&Limit {
                to_service_bytes_per_s: 100,
                to_client_bytes_per_s: 200
            })
        );
        assert_eq!(
            d.limits.get(&web),
            Some(&Limit {
                to_service_bytes_per_s: 25_000_000,
                to_client_bytes_per_s: 0
            })
        );
        // A second record for the same scope replaces the first.
        d.apply(&limit("web", 1, 2, false));
        assert_eq!(d.limits.len(), 2);
        assert_eq!(d.limits[&web].to_client_bytes_per_s, 2);
        // Clearing the lease record leaves the tenant's.
        assert_eq!(d.apply(&limit("web", 0, 0, true)), Enforce::Limits);
        assert_eq!(d.limits.keys().collect::<Vec<_>>(), vec![&tenant]);
        // Clearing one that does not exist still hands the (unchanged) set over.
        assert_eq!(d.apply(&limit("db", 0, 0, true)), Enforce::Limits);
        assert_eq!(d.limits.len(), 1);
    }

    #[test]
    fn a_limit_without_a_record_or_tenant_changes_nothing() {
        let mut d = Decisions::default();
        let mut e = limit("web", 1, 1, false);
        e.limit = None;
        assert_eq!(d.apply(&e), Enforce::Nothing);
        let mut e = limit("web", 1, 1, false);
        if let Some(l) = e.limit.as_mut() {
            l.tenant.clear();
        }
        assert_eq!(d.apply(&e), Enforce::Nothing);
        assert_eq!(d, Decisions::default());
    }

    #[test]
    fn a_fresh_snapshot_always_hands_its_limits_over_even_none() {
        // A snapshot without records must clear what an earlier one set: enforce_all always
        // asks for Limits, and the fresh Decisions has none.
        let fresh = Decisions::default();
        assert!(fresh.enforce_all().contains(&Enforce::Limits));
        assert!(fresh.limits.is_empty());
        let mut with = Decisions::default();
        with.apply(&limit("", 5, 5, false));
        assert!(with.enforce_all().contains(&Enforce::Limits));
        assert_eq!(with.limits.len(), 1);
    }
}
