//! Service-to-service streams (`shared/spec/orp.md`, "Register" and "Open a stream"): which
//! agent provides which service, who may call whom, and the audit trail.
//!
//! This module holds the state; the streams themselves are driven in `crate::quic::streams`.
//!
//! - **Local providers** ([`Mesh::register_local`]): services registered by agents connected
//!   to THIS relay, by `(tenant, name)`: a SET of live providers (one per agent connection,
//!   at most `max_providers_per_service`, beyond: 429 `providers_full`); an agent's entries go
//!   the moment its connection ends (it takes no new stream), and the backend is told to
//!   deregister the agent (re-registering what its other live connections still provide, so a
//!   reconnect that overtook the old connection's end keeps its services).
//! - **Who may provide** ([`Mesh::check_provider`]): a service held by one identity (a live
//!   local registration) is refused to another identity of the tenant (409 `service_taken`)
//!   unless a provide rule (method [`policy::PROVIDE_METHOD`]) allows it, which then JOINS the
//!   set of providers (the holders keep theirs); a provide rule can also deny an identity, or
//!   close a service to every identity it does not allow (403 `provide_denied`). The same
//!   identity on another connection (a reconnect, a second connection) always joins. Checked
//!   before the backend is asked and again, atomically, when the registration is recorded.
//! - **Choice** ([`Mesh::resolve`], per OPEN_STREAM): the local provider with the fewest live
//!   streams (counted by [`Mesh::provider_stream`] guards while a stream to it lives), ties to
//!   the one picked longest ago (round-robin); each pick is recorded under the lock, so
//!   concurrent opens spread too. Only without a local provider: the controller's registry
//!   (`Registry.Watch`), the providers on other relays in turn (their load is unknown here).
//! - **Policy**: one [`policy::PolicySnapshot`] swapped whole (the decision cache lives inside
//!   it, so a swap flushes it); every swap bumps a generation that live streams watch, so a
//!   stream no longer allowed is cut at once. Before the first snapshot every open is refused.
//! - **Backend** ([`MeshBackend`]): where registrations and audit events go. Standalone:
//!   nowhere but the log (`outrelay::audit` target); with a controller: `control::mesh`.
//!
//! Locks: two std mutexes (local providers, active stream ids), held for map operations only
//! on the stream set-up path, never across an await and never on the byte path.

pub mod policy;
pub mod resume;
mod stats;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use outrelay_api::pb;
use tokio::sync::watch;

use crate::lease::ConnId;
use policy::{PolicySnapshot, ProvideVerdict, StaticRule};
pub use stats::{MeshResult, MeshStats};

/// Default deadline for the first frame of a stream (OPEN_STREAM from the consumer, the
/// provider's answer to INCOMING_STREAM).
pub const DEFAULT_OPEN_TIMEOUT_MS: u64 = 10_000;
/// How long the two ends of a stream whose join ended cleanly stay known for its last
/// STREAM_CHECKPOINTs: an agent sends its final one on the control stream when the FIN
/// arrives, after the relay has seen both FINs, and its peer ends the stream only when it
/// arrives (orp.md "Resume").
pub const ENDED_PAIR_LINGER: Duration = Duration::from_secs(5);
/// Most ended pairs kept at once; the oldest gives way first (counted
/// `outrelay_relay_mesh_ended_pairs_evicted_total`).
pub const ENDED_PAIRS_MAX: usize = 16_384;
/// Default bound on services one agent connection may register.
pub const DEFAULT_MAX_SERVICES_PER_AGENT: usize = 64;
/// Default bound on live local providers (agent connections) of one service.
pub const DEFAULT_MAX_PROVIDERS_PER_SERVICE: usize = 64;
/// Default bound of the caller-side decision cache, in decisions.
pub const DEFAULT_DECISION_CACHE_MAX: usize = 4096;
/// Default lifetime of a cached decision.
pub const DEFAULT_DECISION_CACHE_TTL_MS: u64 = 5_000;
/// Longest accepted service name (the controller's limit).
pub const MAX_SERVICE_NAME_BYTES: usize = outrelay_proto::fields::MAX_SERVICE_NAME_BYTES;
/// Default bound on live service streams (opening or joined) per tenant on this relay.
pub const DEFAULT_MAX_STREAMS_PER_TENANT: usize = 4096;
/// Default time a joined stream may move no byte either way before it is reset.
pub const DEFAULT_STREAM_IDLE_TIMEOUT_MS: u64 = 300_000;
/// Longest audit field (caller, target, method) once queued; longer values are cut.
pub const AUDIT_FIELD_MAX_BYTES: usize = 512;
/// Longest audit reason once queued; longer reasons are cut.
pub const AUDIT_REASON_MAX_BYTES: usize = 1024;
/// STREAM_REJECT code of a REGISTER for a service another identity holds.
pub const REJECT_SERVICE_TAKEN: u32 = 409;
/// STREAM_REJECT code of a REGISTER a provide rule refuses.
pub const REJECT_PROVIDE_DENIED: u32 = 403;
/// STREAM_REJECT code of a REGISTER for a service at `max_providers_per_service`.
pub const REJECT_PROVIDERS_FULL: u32 = 429;
/// The reason of [`REJECT_PROVIDERS_FULL`] starts with this.
pub const PROVIDERS_FULL: &str = "providers_full";
/// The reason of [`REJECT_SERVICE_TAKEN`] starts with this.
pub const SERVICE_TAKEN: &str = "service_taken";
/// The reason of [`REJECT_PROVIDE_DENIED`] starts with this.
pub const PROVIDE_DENIED: &str = "provide_denied";

/// `[mesh]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// Deadline of the first frame of a stream, each side.
    pub open_timeout_ms: u64,
    /// Services one agent connection may register.
    pub max_services_per_agent: usize,
    /// Live local providers (agent connections) of one service.
    pub max_providers_per_service: usize,
    /// Caller-side decisions cached (0: no cache).
    pub decision_cache_max: usize,
    /// Lifetime of a cached decision.
    pub decision_cache_ttl_ms: u64,
    /// Live service streams (opening or joined) per tenant.
    pub max_streams_per_tenant: usize,
    /// A joined stream that moves no byte either way for this long is reset.
    pub stream_idle_timeout_ms: u64,
    /// Standalone relays only (no `[controller]`): the rules, in file order.
    pub static_rules: Vec<StaticRule>,
    /// Stream resume (`[resume]`).
    pub resume: resume::ResumeConfig,
}

impl Default for MeshConfig {
    fn default() -> MeshConfig {
        MeshConfig {
            open_timeout_ms: DEFAULT_OPEN_TIMEOUT_MS,
            max_services_per_agent: DEFAULT_MAX_SERVICES_PER_AGENT,
            max_providers_per_service: DEFAULT_MAX_PROVIDERS_PER_SERVICE,
            decision_cache_max: DEFAULT_DECISION_CACHE_MAX,
            decision_cache_ttl_ms: DEFAULT_DECISION_CACHE_TTL_MS,
            max_streams_per_tenant: DEFAULT_MAX_STREAMS_PER_TENANT,
            stream_idle_timeout_ms: DEFAULT_STREAM_IDLE_TIMEOUT_MS,
            static_rules: Vec::new(),
            resume: resume::ResumeConfig::default(),
        }
    }
}

/// True for a name the controller's registry accepts: printable ASCII, 1 to 253 bytes.
pub fn valid_service_name(name: &str) -> bool {
    outrelay_proto::fields::valid_service_name(name)
}

/// One service registration of one agent on this relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The agent's tenant.
    pub tenant: String,
    /// The service name.
    pub service: String,
    /// The agent's identity URI.
    pub agent_uri: String,
    /// What the agent said it forwards to (informational).
    pub local_addr: String,
}

/// A refused registration: STREAM_REJECT{code, reason}.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP-like code.
    pub code: u32,
    /// Why.
    pub reason: String,
}

/// The future of [`MeshBackend::register`].
pub type RegisterFuture = Pin<Box<dyn Future<Output = Result<String, Rejection>> + Send>>;

/// Where registrations and audit events go. None of these may block: they queue or answer
/// from memory.
pub trait MeshBackend: Send + Sync + 'static {
    /// Registers one provider; resolves to the service id (`<tenant>/<name>`).
    fn register(&self, reg: Registration) -> RegisterFuture;
    /// The agent's connection ended: remove its services on this relay, then register
    /// `remaining` again (what its other live connections still provide).
    fn deregister(&self, tenant: &str, agent_uri: &str, remaining: Vec<Registration>);
    /// One audit row (queued; a full queue drops and counts).
    fn audit(&self, event: pb::AuditEvent);
}

/// A relay without a controller: registrations are local only, audit rows go to the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct Standalone;

impl MeshBackend for Standalone {
    fn register(&self, reg: Registration) -> RegisterFuture {
        Box::pin(async move { Ok(format!("{}/{}", reg.tenant, reg.service)) })
    }

    fn deregister(&self, _: &str, _: &str, _: Vec<Registration>) {}

    fn audit(&self, e: pb::AuditEvent) {
        tracing::info!(
            target: "outrelay::audit",
            tenant = %e.tenant, caller = %e.caller, target_service = %e.target, method = %e.method,
            decision = %e.decision, reason = %e.reason, stream_id = %e.stream_id,
            "stream decision"
        );
    }
}

/// One locally connected provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalProvider {
    /// Its connection.
    pub conn: ConnId,
    /// Its identity URI.
    pub agent_uri: String,
    /// Registration order.
    pub seq: u64,
}

/// A local provider in its service's set, with what the choice reads.
#[derive(Debug)]
struct Slot {
    provider: LocalProvider,
    /// Streams to it that live now ([`ProviderStream`] guards).
    active: usize,
    /// When it was last picked (the mesh's pick counter; 0: never).
    picked: u64,
}

#[derive(Debug, Default)]
struct Local {
    /// Connections past HELLO that have not ended (a registration finishing after its
    /// connection ended must not leave a stale entry).
    live: HashMap<ConnId, (String, String)>,
    by_name: HashMap<(String, String), Vec<Slot>>,
    by_conn: HashMap<ConnId, Vec<Registration>>,
    /// REGISTERs accepted on a connection and still waiting for the backend.
    pending: HashMap<ConnId, usize>,
    seq: u64,
    /// Picks so far ([`Slot::picked`]).
    picks: u64,
}

/// The registry as the controller last told it: providers by (tenant, service).
#[derive(Debug, Default, Clone)]
pub struct RemoteProviders {
    /// Providers per `(tenant, service)`.
    pub by_name: HashMap<(String, String), Vec<pb::Provider>>,
}

impl RemoteProviders {
    /// Applies one `Registry.Watch` event.
    pub fn apply(&mut self, event: &pb::WatchEvent) {
        use pb::watch_event::Kind;
        let Some(p) = &event.provider else { return };
        let tenant = p
            .service_id
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let key = (tenant, event.service_name.clone());
        let list = self.by_name.entry(key.clone()).or_default();
        list.retain(|q| !(q.agent_uri == p.agent_uri && q.relay_id == p.relay_id));
        if event.kind == Kind::Register as i32 {
            // Only what resolution reads is kept: `local_addr` and the rest are another
            // relay's business and could be large.
            list.push(pb::Provider {
                service_id: String::new(),
                agent_uri: p.agent_uri.clone(),
                relay_id: p.relay_id.clone(),
                relay_endpoint: p.relay_endpoint.clone(),
                ..pb::Provider::default()
            });
        }
        if list.is_empty() {
            self.by_name.remove(&key);
        }
    }
}

/// Where an OPEN_STREAM's target is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// An agent connected here.
    Local(LocalProvider),
    /// Known to the registry, on another relay.
    Remote {
        /// That relay's id.
        relay_id: String,
        /// That relay's QUIC endpoint (`host:port`, from its heartbeat; empty when unknown).
        endpoint: String,
        /// The provider's identity URI.
        agent_uri: String,
    },
    /// Nobody provides it in this tenant.
    NotFound,
}

/// One end of a joined stream, for signals forwarded to it.
#[derive(Debug, Clone)]
pub(crate) struct PairEnd {
    /// The agent's certificate URI.
    pub(crate) uri: String,
    /// Its control stream's send queue (weak: the connection owns it); for the end of a
    /// forwarded stream on another relay, the checkpoint lane toward that relay.
    pub(crate) control: tokio::sync::mpsc::WeakSender<outrelay_proto::frame::Frame>,
    /// The peer relay (its id) this end is on, for the far end of a forwarded stream; `None`
    /// for an agent connected here.
    pub(crate) relay: Option<Arc<str>>,
}

/// The two ends of a joined stream, and whether the policy that allowed it lets the agents
/// move it to a direct path (Go's P2P promotion).
#[derive(Debug, Clone)]
pub(crate) struct JoinedPair {
    pub(crate) consumer: PairEnd,
    pub(crate) provider: PairEnd,
    /// A deciding rule on either side says `P2P_FORBIDDEN`: candidates are not forwarded.
    pub(crate) p2p_forbidden: bool,
    /// Ends the join at once: one of its agents resumed this stream on a new connection, so
    /// this join (whose half on the old connection is dead) must let the other end resume too.
    pub(crate) superseded: Arc<tokio::sync::Notify>,
}

impl JoinedPair {
    /// The end on another relay (a forwarded stream) and the local end opposite it.
    pub(crate) fn remote_end(&self) -> Option<(&PairEnd, &PairEnd)> {
        if self.consumer.relay.is_some() {
            Some((&self.consumer, &self.provider))
        } else if self.provider.relay.is_some() {
            Some((&self.provider, &self.consumer))
        } else {
            None
        }
    }

    /// The end opposite `agent_uri`.
    pub(crate) fn peer_of(&self, agent_uri: &str) -> &PairEnd {
        if self.consumer.uri == agent_uri {
            &self.provider
        } else {
            &self.consumer
        }
    }
}

/// The config's `[[policy]]` rules as policy rules (standalone).
fn static_policy(config: &MeshConfig) -> Vec<pb::PolicyRule> {
    config
        .static_rules
        .iter()
        .enumerate()
        .map(|(i, r)| r.to_rule(i))
        .collect()
}

/// The mesh state shared by every connection of the relay.
pub struct Mesh {
    /// The settings in force: replaced whole by [`Mesh::reload`].
    config: arc_swap::ArcSwap<MeshConfig>,
    /// The policy is the config's `[[policy]]` rules (no controller).
    standalone: bool,
    relay_id: String,
    backend: Arc<dyn MeshBackend>,
    policy: ArcSwapOption<PolicySnapshot>,
    policy_generation: watch::Sender<u64>,
    /// The registry view: events are applied in place under this std mutex (held for map
    /// operations only), never by cloning the whole view per event (review H6).
    remote: Mutex<RemoteProviders>,
    local: Mutex<Local>,
    /// Stream ids in use; a joined stream's two ends once it is joined (P2P signalling).
    active_ids: Mutex<HashMap<u64, Option<Arc<JoinedPair>>>>,
    /// Streams whose join ended cleanly, for their last checkpoints ([`ENDED_PAIR_LINGER`]).
    ended: Mutex<EndedPairs>,
    /// Live streams per tenant (`max_streams_per_tenant`).
    tenant_streams: Mutex<HashMap<String, usize>>,
    /// Remote picks so far (round-robin over other relays' providers).
    remote_picks: AtomicUsize,
    /// Counters (exported by the metrics scrape).
    pub stats: Arc<MeshStats>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("relay_id", &self.relay_id)
            .field("policy_loaded", &self.policy.load().is_some())
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// A mesh for the relay `relay_id`. With a standalone backend the static rules of
    /// `config` are the policy from the start; with a controller the policy arrives with its
    /// first `Policy.Watch` snapshot (until then opens are refused).
    pub fn new(config: MeshConfig, relay_id: String, backend: Arc<dyn MeshBackend>) -> Arc<Mesh> {
        Mesh::build(config, relay_id, backend, false)
    }

    fn build(
        config: MeshConfig,
        relay_id: String,
        backend: Arc<dyn MeshBackend>,
        standalone: bool,
    ) -> Arc<Mesh> {
        let (generation, _) = watch::channel(0);
        Arc::new(Mesh {
            config: arc_swap::ArcSwap::from_pointee(config),
            standalone,
            relay_id,
            backend,
            policy: ArcSwapOption::empty(),
            policy_generation: generation,
            remote: Mutex::new(RemoteProviders::default()),
            local: Mutex::new(Local::default()),
            active_ids: Mutex::new(HashMap::new()),
            ended: Mutex::new(EndedPairs::default()),
            tenant_streams: Mutex::new(HashMap::new()),
            remote_picks: AtomicUsize::new(0),
            stats: Arc::new(MeshStats::default()),
        })
    }

    /// A standalone mesh whose policy is the config's `[[policy]]` rules.
    pub fn standalone(config: MeshConfig, relay_id: String) -> Arc<Mesh> {
        let rules = static_policy(&config);
        let mesh = Mesh::build(config, relay_id, Arc::new(Standalone), true);
        mesh.set_policy(rules);
        mesh
    }

    /// The settings in force now.
    pub fn config(&self) -> Arc<MeshConfig> {
        self.config.load_full()
    }

    /// Publishes reloaded `[mesh]`/`[resume]` settings for new streams (their open deadline,
    /// caps, idle timeout, resume) and, standalone, the new `[[policy]]` rules as the policy
    /// (one swap; live streams check themselves again, as after a controller update). With a
    /// controller, the decision cache's size and TTL apply from its next policy snapshot.
    pub fn reload(&self, config: MeshConfig) {
        let rules = self.standalone.then(|| static_policy(&config));
        self.config.store(Arc::new(config));
        if let Some(rules) = rules {
            self.set_policy(rules);
        }
    }

    /// This relay's id (as in its certificate).
    pub fn relay_id(&self) -> &str {
        &self.relay_id
    }

    pub(crate) fn backend(&self) -> &dyn MeshBackend {
        &*self.backend
    }

    /// Replaces the policy with `rules` (one swap; the decision cache starts empty) and
    /// wakes every live stream to check itself again.
    pub fn set_policy(&self, rules: Vec<pb::PolicyRule>) {
        let config = self.config.load();
        let snapshot = PolicySnapshot::new(
            rules,
            config.decision_cache_max,
            Duration::from_millis(config.decision_cache_ttl_ms),
        );
        self.policy.store(Some(Arc::new(snapshot)));
        self.policy_generation.send_modify(|g| *g += 1);
        self.stats.policy_updates.fetch_add(1, Ordering::Relaxed);
    }

    /// The current policy; `None` before the first snapshot.
    pub fn policy(&self) -> Option<Arc<PolicySnapshot>> {
        self.policy.load_full()
    }

    /// Changes every time the policy is replaced.
    pub fn policy_changes(&self) -> watch::Receiver<u64> {
        self.policy_generation.subscribe()
    }

    /// Replaces the registry view.
    pub fn set_remote(&self, remote: RemoteProviders) {
        *self.remote() = remote;
    }

    /// Applies `f` to the registry view in place (O(the change), not O(the view)).
    pub fn update_remote(&self, f: impl FnOnce(&mut RemoteProviders)) {
        f(&mut self.remote());
    }

    fn remote(&self) -> MutexGuard<'_, RemoteProviders> {
        self.remote.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves one of `conn`'s service slots for a REGISTER about to go to the backend;
    /// `None` when its live plus pending registrations are at `max_services_per_agent`. The
    /// slot counts as pending until the guard drops (after [`Mesh::register_local`]).
    pub(crate) fn reserve_registration(
        self: &Arc<Self>,
        conn: ConnId,
    ) -> Option<PendingRegistration> {
        let mut local = self.local();
        let live = local.by_conn.get(&conn).map_or(0, Vec::len);
        let pending = local.pending.entry(conn).or_insert(0);
        if live + *pending >= self.config().max_services_per_agent {
            return None;
        }
        *pending += 1;
        Some(PendingRegistration {
            mesh: self.clone(),
            conn,
        })
    }

    /// Takes one of `tenant`'s live-stream slots; `None` at `max_streams_per_tenant`.
    pub(crate) fn tenant_stream(&self, tenant: &str) -> Option<TenantStream<'_>> {
        let mut map = self
            .tenant_streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(tenant.to_owned()).or_insert(0);
        if *n >= self.config().max_streams_per_tenant {
            return None;
        }
        *n += 1;
        Some(TenantStream {
            mesh: self,
            tenant: tenant.to_owned(),
        })
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An agent connection passed HELLO.
    pub(crate) fn connection_opened(&self, conn: ConnId, tenant: &str, agent_uri: &str) {
        self.local()
            .live
            .insert(conn, (tenant.to_owned(), agent_uri.to_owned()));
    }

    /// May `reg.agent_uri` provide `reg.service` now (see the module docs)? A refusal is
    /// counted (`registrations_taken` or `registrations_provide_denied`).
    ///
    /// # Errors
    /// The STREAM_REJECT to answer: 409 `service_taken` or 403 `provide_denied`.
    pub fn check_provider(&self, reg: &Registration) -> Result<(), Rejection> {
        let local = self.local();
        self.may_provide(&local, reg, None)
    }

    /// [`Mesh::check_provider`]; `conn`: the connection recording it (its own entry does not
    /// count against `max_providers_per_service`; `None`: any entry of the same identity).
    fn may_provide(
        &self,
        local: &Local,
        reg: &Registration,
        conn: Option<ConnId>,
    ) -> Result<(), Rejection> {
        let verdict = self.policy().map_or(ProvideVerdict::Unruled, |p| {
            p.provide(&reg.tenant, &reg.agent_uri, &reg.service, crate::unix_ms())
        });
        let denied = |why: String| {
            self.stats
                .registrations_provide_denied
                .fetch_add(1, Ordering::Relaxed);
            Err(Rejection {
                code: REJECT_PROVIDE_DENIED,
                reason: format!("{PROVIDE_DENIED}: {why}"),
            })
        };
        match &verdict {
            ProvideVerdict::Allowed { .. } | ProvideVerdict::Unruled => {}
            ProvideVerdict::Denied { rule_id } => return denied(format!("rule {rule_id}")),
            ProvideVerdict::NotAllowed => {
                return denied(format!(
                    "no {} rule allows this agent to provide {:?}",
                    policy::PROVIDE_METHOD,
                    reg.service
                ));
            }
        }
        let key = (reg.tenant.clone(), reg.service.clone());
        let list = local.by_name.get(&key).map_or(&[][..], Vec::as_slice);
        let max = self.config().max_providers_per_service;
        let known = |s: &Slot| match conn {
            Some(c) => s.provider.conn == c,
            None => s.provider.agent_uri == reg.agent_uri,
        };
        if list.len() >= max && !list.iter().any(known) {
            self.stats
                .registrations_providers_full
                .fetch_add(1, Ordering::Relaxed);
            return Err(Rejection {
                code: REJECT_PROVIDERS_FULL,
                reason: format!(
                    "{PROVIDERS_FULL}: {:?} has {max} providers on this relay (mesh.max_providers_per_service)",
                    reg.service
                ),
            });
        }
        if matches!(verdict, ProvideVerdict::Allowed { .. }) {
            // An allowed identity joins the set.
            return Ok(());
        }
        let taken = list.iter().any(|s| s.provider.agent_uri != reg.agent_uri);
        if taken {
            self.stats
                .registrations_taken
                .fetch_add(1, Ordering::Relaxed);
            return Err(Rejection {
                code: REJECT_SERVICE_TAKEN,
                reason: format!(
                    "{SERVICE_TAKEN}: another agent provides {:?} (a {} rule may let this one join)",
                    reg.service,
                    policy::PROVIDE_METHOD
                ),
            });
        }
        Ok(())
    }

    /// Records a registration the backend accepted: `Ok(false)` when the connection has ended
    /// meanwhile (nothing is recorded). The provider check runs again under the same lock, so
    /// two identities racing for a free service cannot both hold it; the loser is taken out
    /// of the backend again (its other registrations re-sent).
    ///
    /// # Errors
    /// [`Mesh::check_provider`]'s.
    pub(crate) fn register_local(
        &self,
        conn: ConnId,
        reg: &Registration,
    ) -> Result<bool, Rejection> {
        let mut local = self.local();
        if !local.live.contains_key(&conn) {
            return Ok(false);
        }
        if let Err(rejection) = self.may_provide(&local, reg, Some(conn)) {
            let remaining: Vec<Registration> = local
                .by_conn
                .values()
                .flatten()
                .filter(|r| r.agent_uri == reg.agent_uri)
                .cloned()
                .collect();
            drop(local);
            self.backend
                .deregister(&reg.tenant, &reg.agent_uri, remaining);
            return Err(rejection);
        }
        local.seq += 1;
        let seq = local.seq;
        let key = (reg.tenant.clone(), reg.service.clone());
        let list = local.by_name.entry(key).or_default();
        if !list.iter().any(|s| s.provider.conn == conn) {
            list.push(Slot {
                provider: LocalProvider {
                    conn,
                    agent_uri: reg.agent_uri.clone(),
                    seq,
                },
                active: 0,
                picked: 0,
            });
        }
        let mine = local.by_conn.entry(conn).or_default();
        mine.retain(|r| r.service != reg.service);
        mine.push(reg.clone());
        Ok(true)
    }

    /// The connection ended: its services go, and the backend deregisters the agent on this
    /// relay (re-registering what the agent's other live connections provide).
    pub(crate) fn connection_closed(&self, conn: ConnId) {
        let (who, removed, remaining) = {
            let mut local = self.local();
            let who = local.live.remove(&conn);
            let removed = local.by_conn.remove(&conn).unwrap_or_default();
            for reg in &removed {
                let key = (reg.tenant.clone(), reg.service.clone());
                if let Some(list) = local.by_name.get_mut(&key) {
                    list.retain(|s| s.provider.conn != conn);
                    if list.is_empty() {
                        local.by_name.remove(&key);
                    }
                }
            }
            let remaining: Vec<Registration> = match &who {
                Some((_, uri)) => local
                    .by_conn
                    .values()
                    .flatten()
                    .filter(|r| &r.agent_uri == uri)
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            (who, removed, remaining)
        };
        if let Some((tenant, uri)) = who
            && !removed.is_empty()
        {
            self.backend.deregister(&tenant, &uri, remaining);
        }
    }

    /// Every local registration (re-sent to a controller that restarted).
    pub fn local_registrations(&self) -> Vec<Registration> {
        self.local().by_conn.values().flatten().cloned().collect()
    }

    /// Picks the provider of `service` in `tenant` for one stream (see the module docs): the
    /// live local provider with the fewest live streams, ties to the one picked longest ago;
    /// without one, the providers on other relays in turn. The pick is recorded; a caller
    /// that goes on to a local provider holds a [`Mesh::provider_stream`] guard meanwhile.
    pub fn resolve(&self, tenant: &str, service: &str) -> Resolved {
        self.resolve_skipping(tenant, service, &[])
    }

    /// Live local providers of `service` in `tenant` but those on the connections in `skip`.
    pub fn local_providers_left(&self, tenant: &str, service: &str, skip: &[ConnId]) -> usize {
        let key = (tenant.to_owned(), service.to_owned());
        self.local().by_name.get(&key).map_or(0, |list| {
            list.iter()
                .filter(|s| !skip.contains(&s.provider.conn))
                .count()
        })
    }

    /// [`Mesh::resolve`] without the local providers on the connections in `skip` (those
    /// that failed to answer this stream already).
    pub fn resolve_skipping(&self, tenant: &str, service: &str, skip: &[ConnId]) -> Resolved {
        let key = (tenant.to_owned(), service.to_owned());
        {
            let mut local = self.local();
            let Local { by_name, picks, .. } = &mut *local;
            if let Some(slot) = by_name.get_mut(&key).and_then(|list| {
                list.iter_mut()
                    .filter(|s| !skip.contains(&s.provider.conn))
                    .min_by_key(|s| (s.active, s.picked))
            }) {
                *picks += 1;
                slot.picked = *picks;
                return Resolved::Local(slot.provider.clone());
            }
        }
        let remote = self.remote();
        let others = remote.by_name.get(&key).map_or(&[][..], Vec::as_slice);
        let n = others
            .iter()
            .filter(|p| p.relay_id != self.relay_id)
            .count();
        let turn = match n {
            0 => 0,
            n => self.remote_picks.fetch_add(1, Ordering::Relaxed) % n,
        };
        match others
            .iter()
            .filter(|p| p.relay_id != self.relay_id)
            .nth(turn)
        {
            Some(p) => Resolved::Remote {
                relay_id: p.relay_id.clone(),
                endpoint: p.relay_endpoint.clone(),
                agent_uri: p.agent_uri.clone(),
            },
            None => Resolved::NotFound,
        }
    }

    /// Counts a stream to the local provider `p` of `service` until the guard drops (the
    /// choice's load). A provider that left the set meanwhile counts nothing.
    pub(crate) fn provider_stream(
        &self,
        tenant: &str,
        service: &str,
        p: &LocalProvider,
    ) -> ProviderStream<'_> {
        let key = (tenant.to_owned(), service.to_owned());
        if let Some(slot) = self
            .local()
            .by_name
            .get_mut(&key)
            .and_then(|list| list.iter_mut().find(|s| s.provider.conn == p.conn))
        {
            slot.active += 1;
        }
        ProviderStream {
            mesh: self,
            key,
            conn: p.conn,
        }
    }

    /// Live local providers of each service, by `(tenant, service)` (for the status).
    pub fn provider_counts(&self) -> Vec<(String, String, usize)> {
        let mut counts: Vec<(String, String, usize)> = self
            .local()
            .by_name
            .iter()
            .map(|((t, s), list)| (t.clone(), s.clone(), list.len()))
            .collect();
        counts.sort();
        counts
    }

    /// Reserves a stream id for the life of its stream; false when it is already in use.
    pub(crate) fn claim_stream_id(&self, id: u64) -> bool {
        let mut ids = self
            .active_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match ids.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(None);
                true
            }
        }
    }

    /// Records the two ends of the joined stream `id` (P2P signalling is forwarded between
    /// them while it lives).
    pub(crate) fn stream_joined(&self, id: u64, pair: JoinedPair) {
        if let Some(slot) = self
            .active_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&id)
        {
            *slot = Some(Arc::new(pair));
        }
    }

    /// The joined stream `id` when `agent_uri` is one of its two ends (a signal for any other
    /// stream, or from an agent that is not on it, finds nothing).
    pub(crate) fn joined_pair(&self, id: u64, agent_uri: &str) -> Option<Arc<JoinedPair>> {
        self.active_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .and_then(Option::clone)
            .filter(|p| p.consumer.uri == agent_uri || p.provider.uri == agent_uri)
    }

    /// The joined stream `id` when one of its ends is on peer relay `relay` (a forwarded
    /// stream that relay shares with this one): a checkpoint from that relay for any other
    /// stream finds nothing. A stream that ended cleanly moments ago still counts (its last
    /// checkpoints, [`ENDED_PAIR_LINGER`]).
    pub(crate) fn joined_via(&self, id: u64, relay: &str) -> Option<Arc<JoinedPair>> {
        let via = |p: &Arc<JoinedPair>| {
            p.remote_end()
                .is_some_and(|(end, _)| end.relay.as_deref() == Some(relay))
        };
        let live = self
            .active_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .and_then(Option::clone);
        live.or_else(|| {
            self.ended
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(id, Instant::now())
        })
        .filter(via)
    }

    /// The joined stream `id` ended cleanly (both FINs through): its id is given back and its
    /// two ends stay known for [`ENDED_PAIR_LINGER`] (see [`Mesh::ended_pair`]).
    pub(crate) fn stream_ended(&self, id: u64) {
        let pair = self
            .active_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id)
            .flatten();
        if let Some(pair) = pair {
            let evicted = self
                .ended
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, pair, Instant::now());
            self.stats
                .ended_pairs_evicted
                .fetch_add(evicted, Ordering::Relaxed);
        }
    }

    /// The stream `id` that ended cleanly less than [`ENDED_PAIR_LINGER`] ago, when
    /// `agent_uri` is one of its ends: where its last STREAM_CHECKPOINTs go.
    pub(crate) fn ended_pair(&self, id: u64, agent_uri: &str) -> Option<Arc<JoinedPair>> {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id, Instant::now())
            .filter(|p| p.consumer.uri == agent_uri || p.provider.uri == agent_uri)
    }

    /// Gives a stream id back.
    pub(crate) fn release_stream_id(&self, id: u64) {
        self.active_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Audits one decision on a stream (`kind` "stream", the stream id in decimal).
    pub(crate) fn audit(&self, row: &AuditRow<'_>, allow: bool, reason: String) {
        let AuditRow {
            tenant,
            caller,
            target,
            method,
            stream_id,
        } = *row;
        self.stats.audit_events.fetch_add(1, Ordering::Relaxed);
        // Bounded BEFORE it is queued (review H4): whatever a caller let through, a row is at
        // most a few KiB, far under any decode limit of the controller.
        let mut cut = false;
        let mut field = |v: &str, max: usize| {
            let b = bounded(v, max);
            cut |= b.len() < v.len();
            b.to_owned()
        };
        let event = pb::AuditEvent {
            ts_unix_ms: crate::unix_ms(),
            tenant: field(tenant, AUDIT_FIELD_MAX_BYTES),
            caller: field(caller, AUDIT_FIELD_MAX_BYTES),
            target: field(target, AUDIT_FIELD_MAX_BYTES),
            method: field(method, AUDIT_FIELD_MAX_BYTES),
            decision: if allow {
                pb::Decision::Allow
            } else {
                pb::Decision::Deny
            } as i32,
            reason: field(&reason, AUDIT_REASON_MAX_BYTES),
            stream_id: stream_id.to_string(),
            kind: "stream".to_owned(),
            seq: 0,
        };
        if cut {
            self.stats.audit_truncated.fetch_add(1, Ordering::Relaxed);
        }
        self.backend.audit(event);
    }
}

/// The longest prefix of `v` of at most `max` bytes that ends on a character boundary.
pub fn bounded(v: &str, max: usize) -> &str {
    if v.len() <= max {
        return v;
    }
    let mut end = max;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    &v[..end]
}

/// A REGISTER counted against its connection's service cap until it is recorded or refused.
pub(crate) struct PendingRegistration {
    mesh: Arc<Mesh>,
    conn: ConnId,
}

impl Drop for PendingRegistration {
    fn drop(&mut self) {
        let mut local = self.mesh.local();
        if let Some(n) = local.pending.get_mut(&self.conn) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                local.pending.remove(&self.conn);
            }
        }
    }
}

/// One of a tenant's live-stream slots, given back on drop.
pub(crate) struct TenantStream<'a> {
    mesh: &'a Mesh,
    tenant: String,
}

impl Drop for TenantStream<'_> {
    fn drop(&mut self) {
        let mut map = self
            .mesh
            .tenant_streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.tenant);
            }
        }
    }
}

/// A live stream counted against its local provider ([`Mesh::provider_stream`]), given back
/// on drop.
pub(crate) struct ProviderStream<'a> {
    mesh: &'a Mesh,
    key: (String, String),
    conn: ConnId,
}

impl Drop for ProviderStream<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self
            .mesh
            .local()
            .by_name
            .get_mut(&self.key)
            .and_then(|list| list.iter_mut().find(|s| s.provider.conn == self.conn))
        {
            slot.active = slot.active.saturating_sub(1);
        }
    }
}

/// Who called whom on which stream, for [`Mesh::audit`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AuditRow<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) caller: &'a str,
    pub(crate) target: &'a str,
    pub(crate) method: &'a str,
    pub(crate) stream_id: u64,
}

/// Joined pairs whose stream ended cleanly, oldest first, at most [`ENDED_PAIRS_MAX`], each
/// for [`ENDED_PAIR_LINGER`]. Touched once per ended stream and per late checkpoint.
#[derive(Debug, Default)]
struct EndedPairs {
    by_id: HashMap<u64, (Instant, Arc<JoinedPair>)>,
    order: VecDeque<(Instant, u64)>,
}

impl EndedPairs {
    /// Records `pair`, dropping the expired ones and, at the cap, the oldest; returns how
    /// many were dropped before their time.
    fn insert(&mut self, id: u64, pair: Arc<JoinedPair>, now: Instant) -> u64 {
        let mut evicted = 0;
        while let Some(&(at, old)) = self.order.front() {
            let expired = now.saturating_duration_since(at) >= ENDED_PAIR_LINGER;
            if !expired && self.order.len() < ENDED_PAIRS_MAX {
                break;
            }
            self.order.pop_front();
            // An id ended twice is removed by its newer entry only.
            if self.by_id.get(&old).is_some_and(|(t, _)| *t == at) {
                self.by_id.remove(&old);
                if !expired {
                    evicted += 1;
                }
            }
        }
        self.by_id.insert(id, (now, pair));
        self.order.push_back((now, id));
        evicted
    }

    fn get(&self, id: u64, now: Instant) -> Option<Arc<JoinedPair>> {
        self.by_id
            .get(&id)
            .filter(|(at, _)| now.saturating_duration_since(*at) < ENDED_PAIR_LINGER)
            .map(|(_, p)| p.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U1: &str = "outrelay://a/agent/00000000-0000-4000-8000-000000000001";

    fn reg(service: &str) -> Registration {
        Registration {
            tenant: "a".into(),
            service: service.into(),
            agent_uri: U1.into(),
            local_addr: String::new(),
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, usize)>>);

    impl MeshBackend for Recorder {
        fn register(&self, reg: Registration) -> RegisterFuture {
            Standalone.register(reg)
        }
        fn deregister(&self, _: &str, uri: &str, remaining: Vec<Registration>) {
            self.0
                .lock()
                .expect("lock")
                .push((uri.to_owned(), remaining.len()));
        }
        fn audit(&self, _: pb::AuditEvent) {}
    }

    /// The local connection `resolve` picks (panics on anything else).
    fn pick(mesh: &Mesh, service: &str) -> u64 {
        match mesh.resolve("a", service) {
            Resolved::Local(p) => p.conn.0,
            other => panic!("not local: {other:?}"),
        }
    }

    #[test]
    fn local_providers_all_serve_and_a_closed_connection_takes_its_services() {
        let rec = Arc::new(Recorder::default());
        let mesh = Mesh::new(MeshConfig::default(), "r1".into(), rec.clone());
        mesh.connection_opened(ConnId(1), "a", U1);
        mesh.connection_opened(ConnId(2), "a", U1);
        assert_eq!(mesh.register_local(ConnId(1), &reg("pay")), Ok(true));
        assert_eq!(mesh.register_local(ConnId(2), &reg("pay")), Ok(true));
        // Registering again on the same connection adds no second entry.
        assert_eq!(mesh.register_local(ConnId(2), &reg("pay")), Ok(true));
        let picks: Vec<u64> = (0..4).map(|_| pick(&mesh, "pay")).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
        assert_eq!(mesh.provider_counts(), vec![("a".into(), "pay".into(), 2)]);
        assert_eq!(mesh.resolve("b", "pay"), Resolved::NotFound);
        mesh.connection_closed(ConnId(2));
        // Gone at once: never chosen again.
        assert!((0..4).all(|_| pick(&mesh, "pay") == 1));
        // The agent still provides `pay` on connection 1: it is registered again.
        assert_eq!(*rec.0.lock().expect("lock"), vec![(U1.to_owned(), 1)]);
        mesh.connection_closed(ConnId(1));
        assert_eq!(mesh.resolve("a", "pay"), Resolved::NotFound);
        // A registration finishing after its connection ended leaves nothing behind.
        assert_eq!(mesh.register_local(ConnId(1), &reg("pay")), Ok(false));
        assert_eq!(mesh.resolve("a", "pay"), Resolved::NotFound);
    }

    const U2: &str = "outrelay://a/agent/00000000-0000-4000-8000-000000000002";

    fn reg_of(uri: &str, service: &str) -> Registration {
        Registration {
            agent_uri: uri.into(),
            ..reg(service)
        }
    }

    #[test]
    fn a_held_service_is_refused_to_another_identity_unless_a_provide_rule_allows_it() {
        let rec = Arc::new(Recorder::default());
        let mesh = Mesh::new(MeshConfig::default(), "r1".into(), rec.clone());
        mesh.set_policy(Vec::new());
        mesh.connection_opened(ConnId(1), "a", U1);
        mesh.connection_opened(ConnId(2), "a", U2);
        mesh.connection_opened(ConnId(3), "a", U1);
        assert_eq!(mesh.register_local(ConnId(1), &reg_of(U1, "pay")), Ok(true));
        assert_eq!(mesh.register_local(ConnId(2), &reg_of(U2, "own")), Ok(true));
        // Another identity: 409, before the backend (check) and when recording (race loser,
        // taken out of the backend again with its other services re-sent).
        let err = mesh.check_provider(&reg_of(U2, "pay")).expect_err("held");
        assert_eq!(err.code, REJECT_SERVICE_TAKEN);
        assert!(err.reason.starts_with(SERVICE_TAKEN), "{}", err.reason);
        let err = mesh
            .register_local(ConnId(2), &reg_of(U2, "pay"))
            .expect_err("held");
        assert_eq!(err.code, REJECT_SERVICE_TAKEN);
        assert_eq!(*rec.0.lock().expect("lock"), vec![(U2.to_owned(), 1)]);
        assert_eq!(mesh.stats.registrations_taken.load(Ordering::Relaxed), 2);
        assert_eq!(pick(&mesh, "pay"), 1);
        // The same identity on another connection (a reconnect) joins.
        assert_eq!(mesh.register_local(ConnId(3), &reg_of(U1, "pay")), Ok(true));
        // A provide rule allowing U2 lets it JOIN the set: the holder keeps its share.
        let rule = |caller: &str, allow: bool| StaticRule {
            tenant: "a".into(),
            caller: caller.into(),
            target: "pay".into(),
            method: policy::PROVIDE_METHOD.into(),
            allow,
        };
        mesh.set_policy(vec![rule(U2, true).to_rule(0)]);
        assert_eq!(mesh.register_local(ConnId(2), &reg_of(U2, "pay")), Ok(true));
        let mut picks: Vec<u64> = (0..6).map(|_| pick(&mesh, "pay")).collect();
        picks.sort_unstable();
        assert_eq!(picks, vec![1, 1, 2, 2, 3, 3]);
        // That rule pins `pay`: U1 (no rule) may not register it again; a deny says so by id.
        let err = mesh.check_provider(&reg_of(U1, "pay")).expect_err("pinned");
        assert_eq!(err.code, REJECT_PROVIDE_DENIED);
        mesh.set_policy(vec![rule(U2, false).to_rule(0)]);
        let err = mesh.check_provider(&reg_of(U2, "pay")).expect_err("denied");
        assert_eq!(
            (err.code, err.reason.as_str()),
            (REJECT_PROVIDE_DENIED, "provide_denied: rule static-0")
        );
        assert_eq!(
            mesh.stats
                .registrations_provide_denied
                .load(Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn the_least_active_provider_is_chosen_ties_in_turn() {
        let mesh = Mesh::new(MeshConfig::default(), "r1".into(), Arc::new(Standalone));
        for c in 1..=3 {
            mesh.connection_opened(ConnId(c), "a", U1);
            assert_eq!(mesh.register_local(ConnId(c), &reg("pay")), Ok(true));
        }
        let provider = |c: u64| LocalProvider {
            conn: ConnId(c),
            agent_uri: U1.into(),
            seq: 0,
        };
        // Two live streams on 1, one on 2: 3 until it has as many as 2, and so on.
        let g1 = mesh.provider_stream("a", "pay", &provider(1));
        let g2 = mesh.provider_stream("a", "pay", &provider(1));
        let g3 = mesh.provider_stream("a", "pay", &provider(2));
        assert_eq!(pick(&mesh, "pay"), 3);
        let g4 = mesh.provider_stream("a", "pay", &provider(3));
        // 2 and 3 tie at one stream: 2 was picked longest ago (never).
        assert_eq!(pick(&mesh, "pay"), 2);
        let g5 = mesh.provider_stream("a", "pay", &provider(2));
        assert_eq!(pick(&mesh, "pay"), 3);
        // Every stream ends: all three are equal, so they come in turn, least recent first.
        drop((g1, g2, g3, g4, g5));
        let picks: Vec<u64> = (0..6).map(|_| pick(&mesh, "pay")).collect();
        assert_eq!(picks, vec![1, 2, 3, 1, 2, 3]);
        // N concurrent streams (each holding its guard) spread evenly.
        let mut guards = Vec::new();
        let mut per = std::collections::BTreeMap::new();
        for _ in 0..30 {
            let c = pick(&mesh, "pay");
            *per.entry(c).or_insert(0) += 1;
            guards.push(mesh.provider_stream("a", "pay", &provider(c)));
        }
        assert_eq!(
            per.into_iter().collect::<Vec<_>>(),
            [(1, 10), (2, 10), (3, 10)]
        );
        // A closed connection's provider is never chosen, and its guards drop harmlessly.
        mesh.connection_closed(ConnId(1));
        assert!((0..10).all(|_| pick(&mesh, "pay") != 1));
        drop(guards);
        assert!((0..10).all(|_| pick(&mesh, "pay") != 1));
    }

    fn joined(consumer: &str, provider: &str) -> JoinedPair {
        let end = |uri: &str| PairEnd {
            uri: uri.into(),
            control: tokio::sync::mpsc::channel(1).0.downgrade(),
            relay: None,
        };
        JoinedPair {
            consumer: end(consumer),
            provider: end(provider),
            p2p_forbidden: false,
            superseded: Arc::new(tokio::sync::Notify::new()),
        }
    }

    #[test]
    fn a_cleanly_ended_stream_is_known_to_its_two_ends_for_the_linger_only() {
        let mesh = Mesh::new(MeshConfig::default(), "r1".into(), Arc::new(Standalone));
        assert!(mesh.claim_stream_id(7));
        mesh.stream_joined(7, joined(U1, U2));
        mesh.stream_ended(7);
        // The id is free again; the ends still find the pair, nobody else does.
        assert!(mesh.joined_pair(7, U1).is_none());
        assert!(mesh.ended_pair(7, U1).is_some() && mesh.ended_pair(7, U2).is_some());
        assert!(mesh.ended_pair(7, "outrelay://a/agent/other").is_none());
        assert!(mesh.claim_stream_id(7));
        mesh.release_stream_id(7);
        // A stream that never joined leaves nothing behind.
        assert!(mesh.claim_stream_id(8));
        mesh.stream_ended(8);
        assert!(mesh.ended_pair(8, U1).is_none());

        // The table itself: expiry, the cap (counted), and an id that ended twice.
        let t0 = Instant::now();
        let mut t = EndedPairs::default();
        let pair = Arc::new(joined(U1, U2));
        assert_eq!(t.insert(1, pair.clone(), t0), 0);
        assert!(t.get(1, t0 + ENDED_PAIR_LINGER / 2).is_some());
        assert!(t.get(1, t0 + ENDED_PAIR_LINGER).is_none());
        let later = t0 + ENDED_PAIR_LINGER;
        assert_eq!(
            t.insert(2, pair.clone(), later),
            0,
            "the expired one is not counted"
        );
        assert_eq!(t.by_id.len(), 1);
        for id in 3..(3 + ENDED_PAIRS_MAX as u64) {
            t.insert(id, pair.clone(), later);
        }
        assert_eq!(t.by_id.len(), ENDED_PAIRS_MAX);
        assert!(t.get(2, later).is_none(), "the oldest gave way at the cap");
        assert_eq!(t.insert(5, pair.clone(), later), 1);
        assert!(
            t.get(5, later).is_some(),
            "the newer entry of an id is kept"
        );
    }

    #[test]
    fn a_provider_that_failed_this_stream_is_skipped_then_none_is_left() {
        let mesh = Mesh::new(MeshConfig::default(), "r1".into(), Arc::new(Standalone));
        for c in 1..=2 {
            mesh.connection_opened(ConnId(c), "a", U1);
            assert_eq!(mesh.register_local(ConnId(c), &reg("pay")), Ok(true));
        }
        let first = pick(&mesh, "pay");
        let other = 3 - first;
        assert_eq!(mesh.local_providers_left("a", "pay", &[ConnId(first)]), 1);
        // The retry takes the other one, even though `first` is not busier.
        for _ in 0..3 {
            match mesh.resolve_skipping("a", "pay", &[ConnId(first)]) {
                Resolved::Local(p) => assert_eq!(p.conn.0, other),
                r => panic!("not local: {r:?}"),
            }
        }
        let both = [ConnId(1), ConnId(2)];
        assert_eq!(mesh.local_providers_left("a", "pay", &both), 0);
        assert_eq!(mesh.resolve_skipping("a", "pay", &both), Resolved::NotFound);
    }

    #[test]
    fn providers_per_service_are_bounded_and_counted() {
        let config = MeshConfig {
            max_providers_per_service: 2,
            ..MeshConfig::default()
        };
        let mesh = Mesh::new(config, "r1".into(), Arc::new(Standalone));
        for c in 1..=3 {
            mesh.connection_opened(ConnId(c), "a", U1);
        }
        assert_eq!(mesh.register_local(ConnId(1), &reg("pay")), Ok(true));
        assert_eq!(mesh.register_local(ConnId(2), &reg("pay")), Ok(true));
        let err = mesh
            .register_local(ConnId(3), &reg("pay"))
            .expect_err("full");
        assert_eq!(err.code, REJECT_PROVIDERS_FULL);
        assert!(err.reason.starts_with(PROVIDERS_FULL), "{}", err.reason);
        // A connection already in the set registers again; another service has its own cap.
        assert_eq!(mesh.register_local(ConnId(2), &reg("pay")), Ok(true));
        assert_eq!(mesh.register_local(ConnId(3), &reg("other")), Ok(true));
        assert_eq!(
            mesh.stats
                .registrations_providers_full
                .load(Ordering::Relaxed),
            1
        );
        mesh.connection_closed(ConnId(1));
        assert_eq!(mesh.register_local(ConnId(3), &reg("pay")), Ok(true));
    }

    #[test]
    fn remote_providers_on_another_relay_resolve_as_remote() {
        let mesh = Mesh::new(MeshConfig::default(), "r1".into(), Arc::new(Standalone));
        let provider = |relay: &str| pb::Provider {
            service_id: "a/pay".into(),
            agent_uri: U1.into(),
            relay_id: relay.into(),
            ..pb::Provider::default()
        };
        let event = |relay: &str, kind: pb::watch_event::Kind| pb::WatchEvent {
            kind: kind as i32,
            provider: Some(provider(relay)),
            service_name: "pay".into(),
        };
        mesh.update_remote(|r| r.apply(&event("r1", pb::watch_event::Kind::Register)));
        // Only this relay has it (stale: no local agent): not found.
        assert_eq!(mesh.resolve("a", "pay"), Resolved::NotFound);
        mesh.update_remote(|r| r.apply(&event("r2", pb::watch_event::Kind::Register)));
        assert_eq!(
            mesh.resolve("a", "pay"),
            Resolved::Remote {
                relay_id: "r2".into(),
                endpoint: String::new(),
                agent_uri: U1.into(),
            }
        );
        // Several relays: taken in turn.
        mesh.update_remote(|r| r.apply(&event("r3", pb::watch_event::Kind::Register)));
        let relays: Vec<String> = (0..4)
            .map(|_| match mesh.resolve("a", "pay") {
                Resolved::Remote { relay_id, .. } => relay_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(relays[0..2], relays[2..4]);
        assert_ne!(relays[0], relays[1]);
        // A local provider comes first.
        mesh.connection_opened(ConnId(1), "a", U1);
        assert_eq!(mesh.register_local(ConnId(1), &reg("pay")), Ok(true));
        assert_eq!(pick(&mesh, "pay"), 1);
        mesh.connection_closed(ConnId(1));
        mesh.update_remote(|r| r.apply(&event("r3", pb::watch_event::Kind::Deregister)));
        mesh.update_remote(|r| r.apply(&event("r2", pb::watch_event::Kind::Deregister)));
        assert_eq!(mesh.resolve("a", "pay"), Resolved::NotFound);
    }

    #[test]
    fn the_service_cap_counts_pending_registrations() {
        let config = MeshConfig {
            max_services_per_agent: 2,
            ..MeshConfig::default()
        };
        let mesh = Mesh::new(config, "r1".into(), Arc::new(Standalone));
        mesh.connection_opened(ConnId(1), "a", U1);
        let a = mesh.reserve_registration(ConnId(1)).expect("first");
        let b = mesh.reserve_registration(ConnId(1)).expect("second");
        // Both still pending: a third is refused at once (no await in between).
        assert!(mesh.reserve_registration(ConnId(1)).is_none());
        assert_eq!(mesh.register_local(ConnId(1), &reg("x")), Ok(true));
        drop(a);
        assert!(
            mesh.reserve_registration(ConnId(1)).is_none(),
            "1 live + 1 pending"
        );
        drop(b); // refused by the backend, say
        assert!(mesh.reserve_registration(ConnId(1)).is_some());
        // Another connection has its own budget.
        assert!(mesh.reserve_registration(ConnId(2)).is_some());
    }

    #[test]
    fn tenant_stream_slots_are_bounded_and_given_back() {
        let config = MeshConfig {
            max_streams_per_tenant: 1,
            ..MeshConfig::default()
        };
        let mesh = Mesh::new(config, "r1".into(), Arc::new(Standalone));
        let s = mesh.tenant_stream("a").expect("first");
        assert!(mesh.tenant_stream("a").is_none());
        assert!(mesh.tenant_stream("b").is_some());
        drop(s);
        assert!(mesh.tenant_stream("a").is_some());
    }

    #[test]
    fn audit_fields_are_cut_on_a_char_boundary() {
        assert_eq!(bounded("abc", 5), "abc");
        assert_eq!(bounded("abcdef", 3), "abc");
        assert_eq!(bounded("aé", 2), "a");
        assert_eq!(
            bounded(&"x".repeat(5 << 20), AUDIT_FIELD_MAX_BYTES).len(),
            512
        );
    }

    #[test]
    fn stream_ids_are_exclusive_while_in_use() {
        let mesh = Mesh::standalone(MeshConfig::default(), "r1".into());
        assert!(mesh.claim_stream_id(7));
        assert!(!mesh.claim_stream_id(7));
        mesh.release_stream_id(7);
        assert!(mesh.claim_stream_id(7));
    }

    #[test]
    fn service_names_follow_the_registry_rules() {
        assert!(valid_service_name("payments"));
        assert!(valid_service_name("Pay.v2"));
        assert!(!valid_service_name(""));
        assert!(!valid_service_name("a b"));
        assert!(!valid_service_name(&"x".repeat(254)));
    }
}
