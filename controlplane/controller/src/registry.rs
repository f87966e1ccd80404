//! Service registry and relay liveness (the Registry and Relays services).
//!
//! Registry entries and relay heartbeats are soft state kept in memory only: relays re-register
//! their connected agents when they reconnect, so nothing here is worth an fsync. Several
//! providers per service are kept (one per agent and relay). A relay silent for
//! `relay_down_after_ms` is down and its providers are not resolved.

use std::collections::BTreeMap;
use std::sync::Arc;

use outrelay_api::pb::{self, registry_server, relays_server, watch_event};
use outrelay_proto::identity::Identity;
use tonic::{Request, Response, Status};

use crate::app::{App, now_unix_ms};
use crate::grpc::{Principal, invalid, tenant_arg};
use crate::policy::watch_scope;
use crate::watch::WatchStream;

/// Longest service name, in bytes.
pub const MAX_SERVICE_NAME_BYTES: usize = 253;
/// Longest provider `local_addr` (`host:port`), in bytes.
pub const MAX_LOCAL_ADDR_BYTES: usize = 255;

/// (tenant, service, agent_uri, relay_id)
type ProviderKey = (String, String, String, String);

/// In-memory registry.
#[derive(Debug, Default)]
pub struct RegistryState {
    providers: BTreeMap<ProviderKey, (String, i64)>,
    relays: BTreeMap<String, RelayRecord>,
}

#[derive(Debug, Clone)]
struct RelayRecord {
    region: String,
    endpoint: String,
    last_seen_unix_ms: i64,
}

/// One registry change with the tenant it belongs to.
#[derive(Debug, Clone)]
pub struct RegistryEvent {
    /// The provider's tenant.
    pub tenant: String,
    /// The event sent on the wire.
    pub event: pb::WatchEvent,
}

impl RegistryState {
    fn provider(&self, k: &ProviderKey, local_addr: &str, updated: i64) -> pb::Provider {
        pb::Provider {
            service_id: format!("{}/{}", k.0, k.1),
            agent_uri: k.2.clone(),
            relay_id: k.3.clone(),
            local_addr: local_addr.to_owned(),
            updated_at_unix_ms: updated,
            relay_endpoint: self
                .relays
                .get(&k.3)
                .map(|r| r.endpoint.clone())
                .unwrap_or_default(),
        }
    }

    /// Distinct services the agent of `k` provides, not counting `k`'s own service (so a
    /// re-registration is never refused).
    fn services_of(&self, k: &ProviderKey) -> usize {
        let mut names: Vec<&str> = self
            .providers
            .keys()
            .filter(|p| p.0 == k.0 && p.2 == k.2 && p.1 != k.1)
            .map(|p| p.1.as_str())
            .collect();
        names.dedup();
        names.len()
    }

    /// The dashboard's view (issue 21): at most `rows_max` relays (by id, as `ListRelays`
    /// answers them) and providers (by tenant, service, agent, relay, as `ListServices`, each
    /// with whether its relay is up), and the totals of each.
    pub fn dashboard_view(
        &self,
        now: i64,
        down_after_ms: u64,
        rows_max: usize,
    ) -> (usize, Vec<pb::RelayInfo>, usize, Vec<(pb::Provider, bool)>) {
        let relays = self
            .relays
            .iter()
            .take(rows_max)
            .map(|(id, r)| pb::RelayInfo {
                id: id.clone(),
                region: r.region.clone(),
                endpoint: r.endpoint.clone(),
                last_seen_unix_ms: r.last_seen_unix_ms,
                up: self.relay_up(id, now, down_after_ms),
            })
            .collect();
        let providers = self
            .providers
            .iter()
            .take(rows_max)
            .map(|(k, (addr, updated))| {
                (
                    self.provider(k, addr, *updated),
                    self.relay_up(&k.3, now, down_after_ms),
                )
            })
            .collect();
        (self.relays.len(), relays, self.providers.len(), providers)
    }

    fn relay_up(&self, id: &str, now: i64, down_after_ms: u64) -> bool {
        self.relays.get(id).is_some_and(|r| {
            now.saturating_sub(r.last_seen_unix_ms)
                < i64::try_from(down_after_ms).unwrap_or(i64::MAX)
        })
    }
}

/// The Registry service.
#[derive(Clone)]
pub struct RegistryService(pub Arc<App>);

/// The Relays service.
#[derive(Clone)]
pub struct RelaysService(pub Arc<App>);

fn service_name_arg(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(invalid("service_name", "required"));
    }
    if name.len() > MAX_SERVICE_NAME_BYTES || !name.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(
            "service_name",
            "printable ASCII, at most 253 bytes",
        ));
    }
    Ok(())
}

/// A provider's `local_addr`: empty, or `host:port` in printable ASCII, at most
/// [`MAX_LOCAL_ADDR_BYTES`]. It is published to every relay, so it is bounded before it is kept.
fn local_addr_arg(addr: &str) -> Result<(), Status> {
    if addr.is_empty() {
        return Ok(());
    }
    if addr.len() > MAX_LOCAL_ADDR_BYTES {
        return Err(invalid("local_addr", "at most 255 bytes"));
    }
    let ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && host.bytes().all(|c| c.is_ascii_graphic())
            && port.parse::<u16>().is_ok()
    });
    if !ok {
        return Err(invalid(
            "local_addr",
            "must be host:port in printable ASCII",
        ));
    }
    Ok(())
}

/// The relay named in a request must be the calling relay.
fn own_relay(app: &App, p: &Principal, m: &'static str, relay_id: &str) -> Result<(), Status> {
    let (_, id) = app.require_relay(p, m)?;
    if id.as_str() != relay_id {
        return Err(app.refuse(
            p,
            m,
            &format!("request names relay `{relay_id}`, caller is `{id}`"),
        ));
    }
    Ok(())
}

fn agent_of_tenant(tenant: &str, agent_uri: &str) -> Result<(), Status> {
    match Identity::parse(agent_uri) {
        Ok(Identity::Agent { tenant: t, .. }) if t.as_str() == tenant => Ok(()),
        Ok(_) => Err(invalid(
            "agent_uri",
            "must be an agent identity of the request's tenant",
        )),
        Err(e) => Err(invalid("agent_uri", &e.to_string())),
    }
}

#[tonic::async_trait]
impl registry_server::Registry for RegistryService {
    async fn register_service(
        &self,
        req: Request<pb::RegisterServiceRequest>,
    ) -> Result<Response<pb::RegisterServiceResponse>, Status> {
        const M: &str = "Registry.RegisterService";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        own_relay(app, &p, M, &r.relay_id)?;
        tenant_arg("tenant", &r.tenant)?;
        service_name_arg(&r.service_name)?;
        agent_of_tenant(&r.tenant, &r.agent_uri)?;
        local_addr_arg(&r.local_addr)?;
        let now = now_unix_ms();
        let cap = app.settings.max_services_per_agent;
        let key: ProviderKey = (
            r.tenant.clone(),
            r.service_name.clone(),
            r.agent_uri,
            r.relay_id,
        );
        let service_id = format!("{}/{}", r.tenant, r.service_name);
        let mut over_cap = false;
        app.registry.publish(|s| {
            // Checked and inserted under the same lock: pipelined registrations cannot race
            // past the cap.
            if s.services_of(&key) >= cap {
                over_cap = true;
                return Vec::new();
            }
            s.providers.insert(key.clone(), (r.local_addr.clone(), now));
            let provider = s.provider(&key, &r.local_addr, now);
            vec![RegistryEvent {
                tenant: key.0.clone(),
                event: pb::WatchEvent {
                    kind: watch_event::Kind::Register as i32,
                    provider: Some(provider),
                    service_name: key.1.clone(),
                },
            }]
        });
        if over_cap {
            crate::refusals::Refusal::ServicesPerAgent.count();
            return Err(Status::resource_exhausted(format!(
                "service_name: agent already provides {cap} services (registry.max_services_per_agent)"
            )));
        }
        metrics::counter!("outrelay_controller_registry_changes_total", "op" => "register")
            .increment(1);
        Ok(Response::new(pb::RegisterServiceResponse { service_id }))
    }

    async fn deregister_agent(
        &self,
        req: Request<pb::DeregisterAgentRequest>,
    ) -> Result<Response<pb::DeregisterAgentResponse>, Status> {
        const M: &str = "Registry.DeregisterAgent";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        own_relay(app, &p, M, &r.relay_id)?;
        tenant_arg("tenant", &r.tenant)?;
        agent_of_tenant(&r.tenant, &r.agent_uri)?;
        app.registry.publish(|s| {
            let gone: Vec<(ProviderKey, (String, i64))> = s
                .providers
                .iter()
                .filter(|(k, _)| k.0 == r.tenant && k.2 == r.agent_uri && k.3 == r.relay_id)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            gone.into_iter()
                .map(|(k, (addr, updated))| {
                    s.providers.remove(&k);
                    let provider = s.provider(&k, &addr, updated);
                    RegistryEvent {
                        tenant: k.0.clone(),
                        event: pb::WatchEvent {
                            kind: watch_event::Kind::Deregister as i32,
                            provider: Some(provider),
                            service_name: k.1,
                        },
                    }
                })
                .collect()
        });
        metrics::counter!("outrelay_controller_registry_changes_total", "op" => "deregister")
            .increment(1);
        Ok(Response::new(pb::DeregisterAgentResponse {}))
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        const M: &str = "Registry.Resolve";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        tenant_arg("tenant", &r.tenant)?;
        service_name_arg(&r.service_name)?;
        if !matches!(p, Principal::Relay { .. }) {
            app.require_admin_of(&p, M, &r.tenant)?;
        }
        let now = now_unix_ms();
        let down_after = app.settings.relay_down_after_ms;
        let mut providers: Vec<(bool, pb::Provider)> = app.registry.with_state(|s| {
            s.providers
                .iter()
                .filter(|(k, _)| k.0 == r.tenant && k.1 == r.service_name)
                .filter(|(k, _)| s.relay_up(&k.3, now, down_after))
                .map(|(k, (addr, updated))| {
                    let same_region = s.relays.get(&k.3).is_some_and(|rel| {
                        !r.caller_region.is_empty() && rel.region == r.caller_region
                    });
                    (same_region, s.provider(k, addr, *updated))
                })
                .collect()
        });
        providers.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then(b.1.updated_at_unix_ms.cmp(&a.1.updated_at_unix_ms))
                .then(a.1.agent_uri.cmp(&b.1.agent_uri))
        });
        Ok(Response::new(pb::ResolveResponse {
            providers: providers.into_iter().map(|(_, p)| p).collect(),
        }))
    }

    type WatchStream = WatchStream<RegistryEvent, pb::WatchEvent>;

    async fn watch(
        &self,
        req: Request<pb::WatchServicesRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        const M: &str = "Registry.Watch";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let expires = crate::grpc::cert_not_after(&req);
        let r = req.into_inner();
        let tenant = watch_scope(app, &p, M, &r.tenant)?;
        let names = r.service_names;
        let (t2, n2) = (tenant.clone(), names.clone());
        let wanted = move |t: &str, svc: &str, tenant: &Option<String>, names: &[String]| {
            tenant.as_deref().is_none_or(|x| x == t)
                && (names.is_empty() || names.iter().any(|n| n == svc))
        };
        let sub = app.registry.subscribe(
            move |s| {
                s.providers
                    .iter()
                    .filter(|(k, _)| wanted(&k.0, &k.1, &t2, &n2))
                    .map(|(k, (addr, updated))| RegistryEvent {
                        tenant: k.0.clone(),
                        event: pb::WatchEvent {
                            kind: watch_event::Kind::Register as i32,
                            provider: Some(s.provider(k, addr, *updated)),
                            service_name: k.1.clone(),
                        },
                    })
                    .collect()
            },
            move |e: &RegistryEvent| wanted(&e.tenant, &e.event.service_name, &tenant, &names),
        );
        let end = pb::WatchEvent {
            kind: watch_event::Kind::SnapshotEnd as i32,
            provider: None,
            service_name: String::new(),
        };
        Ok(Response::new(
            sub.into_stream(end, |e| e.event)
                .until(app.watch_end(&p, expires)),
        ))
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        const M: &str = "Registry.ListServices";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let tenant = req.into_inner().tenant;
        let scope = app.require_any_admin(&p, M)?;
        let filter = match (scope, tenant.is_empty()) {
            (None, true) => None,
            (_, false) => {
                tenant_arg("tenant", &tenant)?;
                app.require_admin_of(&p, M, &tenant)?;
                Some(tenant)
            }
            (Some(own), true) => Some(own.to_string()),
        };
        let providers = app.registry.with_state(|s| {
            s.providers
                .iter()
                .filter(|(k, _)| filter.as_deref().is_none_or(|t| k.0 == t))
                .map(|(k, (addr, updated))| s.provider(k, addr, *updated))
                .collect()
        });
        Ok(Response::new(pb::ListServicesResponse { providers }))
    }
}

#[tonic::async_trait]
impl relays_server::Relays for RelaysService {
    async fn upsert_relay(
        &self,
        req: Request<pb::UpsertRelayRequest>,
    ) -> Result<Response<pb::UpsertRelayResponse>, Status> {
        const M: &str = "Relays.UpsertRelay";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        let (region, id) = app.require_relay(&p, M)?;
        if r.id != id.as_str() || r.region != region.as_str() {
            return Err(app.refuse(
                &p,
                M,
                &format!(
                    "request names relay `{}/{}`, caller is `{region}/{id}`",
                    r.region, r.id
                ),
            ));
        }
        if r.endpoint.len() > 255 || !r.endpoint.is_ascii() {
            return Err(invalid("endpoint", "ASCII, at most 255 bytes"));
        }
        let now = now_unix_ms();
        app.registry.publish(|s| {
            s.relays.insert(
                r.id.clone(),
                RelayRecord {
                    region: r.region.clone(),
                    endpoint: r.endpoint.clone(),
                    last_seen_unix_ms: now,
                },
            );
            Vec::new()
        });
        metrics::counter!("outrelay_controller_relay_heartbeats_total").increment(1);
        Ok(Response::new(pb::UpsertRelayResponse {}))
    }

    async fn list_relays(
        &self,
        req: Request<pb::ListRelaysRequest>,
    ) -> Result<Response<pb::ListRelaysResponse>, Status> {
        const M: &str = "Relays.ListRelays";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        app.require_any_admin(&p, M)?;
        let now = now_unix_ms();
        let down_after = app.settings.relay_down_after_ms;
        let relays = app.registry.with_state(|s| {
            s.relays
                .iter()
                .map(|(id, r)| pb::RelayInfo {
                    id: id.clone(),
                    region: r.region.clone(),
                    endpoint: r.endpoint.clone(),
                    last_seen_unix_ms: r.last_seen_unix_ms,
                    up: s.relay_up(id, now, down_after),
                })
                .collect()
        });
        Ok(Response::new(pb::ListRelaysResponse { relays }))
    }
}
