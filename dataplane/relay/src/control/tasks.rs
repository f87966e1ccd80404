//! The controller client's tasks: heartbeat, lease Watch, revocation Watch, report drain (the
//! service-stream tasks are in `super::mesh`).
//! Each logs a failure once when its state changes (up → failing, failing → up), never per
//! attempt, and counts everything.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use outrelay_api::pb::{
    self, lease_decision, lease_report_request, leases_client::LeasesClient, pki_client::PkiClient,
    relays_client::RelaysClient, revocation_event,
};
use outrelay_client::{Target, connect};
use tokio::sync::{Mutex, mpsc};
use tonic::transport::Channel;

use super::decisions::{Decisions, Enforce, RecordState};
use super::revocations::Revocations;
use super::{ControlStats, ControllerConfig, ControllerDecider};
use crate::ingress::stats::CutReason;
use crate::quic::{LeaseEvent, LeaseEventKind, RelayHandle, close_code};

/// Everything the tasks share.
pub(super) struct TaskCtx {
    /// This relay's id (picks its own port lease gates from the decisions).
    pub(super) relay_id: String,
    pub(super) config: ControllerConfig,
    pub(super) link: Arc<Link>,
    pub(super) decider: Arc<ControllerDecider>,
    pub(super) relay: RelayHandle,
}

impl TaskCtx {
    fn stats(&self) -> &ControlStats {
        &self.decider.stats
    }

    /// The controller channel, connected within the call timeout (watch streams).
    pub(super) async fn connect(&self) -> Result<Channel, String> {
        tokio::time::timeout(self.call_timeout(), self.link.channel())
            .await
            .unwrap_or_else(|_| Err("connect timed out".to_owned()))
    }

    /// One unary call on the controller channel within the call timeout; any failure (link,
    /// status, timeout) as one line for the logs.
    pub(super) async fn unary<T, Fut>(&self, call: impl FnOnce(Channel) -> Fut) -> Result<T, String>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        tokio::time::timeout(self.call_timeout(), async {
            let channel = self.link.channel().await?;
            call(channel)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| format!("{}: {}", s.code(), s.message()))
        })
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
    }

    pub(super) fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.config.report_timeout_ms)
    }

    /// Ends the live leases `e` names; counts them.
    async fn enforce(&self, e: Enforce) {
        let (ended, reason) = match e {
            Enforce::Nothing => return,
            Enforce::Gates => {
                let g = self
                    .decider
                    .decisions()
                    .map(|d| d.gates_for(&self.relay_id))
                    .unwrap_or_default();
                self.relay.set_admin_gates(g.tcp, g.udp).await;
                return;
            }
            Enforce::Limits => {
                // The whole set each time (contract: `replace_overrides` swaps it at once).
                let limits = self
                    .decider
                    .decisions()
                    .map(|d| d.limits.clone())
                    .unwrap_or_default();
                self.relay.set_bandwidth_overrides(limits);
                return;
            }
            Enforce::EndName { tenant, name } => (
                self.relay
                    .revoke_leases(|l| l.owner.tenant == tenant && l.name.as_str() == name)
                    .await,
                CutReason::Banned,
            ),
            Enforce::EndAgentName {
                tenant,
                name,
                agent_uri,
            } => (
                self.relay
                    .revoke_leases(|l| {
                        l.owner.tenant == tenant
                            && l.name.as_str() == name
                            && l.owner.agent_uri == agent_uri
                    })
                    .await,
                CutReason::Denied,
            ),
        };
        if !ended.is_empty() {
            let n = u64::try_from(ended.len()).unwrap_or(u64::MAX);
            self.stats().leases_revoked.fetch_add(n, Ordering::Relaxed);
            counter!("outrelay_relay_controller_leases_revoked_total").increment(n);
            for l in &ended {
                tracing::info!(tenant = %l.owner.tenant, name = %l.name.as_str(), agent = %l.owner.agent_uri, "lease ended by a controller decision");
            }
            // Their live public connections end too (review M5).
            let ids = ended.iter().map(|l| l.id).collect();
            self.relay.cut_pairs(ids, reason).await;
        }
    }

    /// Applies `f` to the current decisions (copy, change, swap; retried on a concurrent swap)
    /// and returns what it asked to enforce. No-op before the first snapshot.
    fn update_decisions(&self, f: impl Fn(&mut Decisions) -> Enforce) -> Enforce {
        let mut out = Enforce::Nothing;
        self.decider.decisions.rcu(|cur| {
            cur.as_ref().map(|d| {
                let mut d = Decisions::clone(d);
                out = f(&mut d);
                Arc::new(d)
            })
        });
        out
    }
}

/// One channel to the controller, shared by every task; connected on first use. tonic
/// reconnects an established channel by itself, so it is kept until the relay's certificate
/// changes ([`Link::relink`]): the next call then connects a new channel with the files as they
/// are now, and streams on the old one run on until they end.
pub(super) struct Link {
    url: String,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
    /// Bumped by [`Link::relink`]; the cached channel is used only while it matches.
    generation: std::sync::atomic::AtomicU64,
    channel: Mutex<Option<(u64, Channel)>>,
}

impl Link {
    pub(super) fn new(config: &ControllerConfig) -> Link {
        Link {
            url: config.url.clone(),
            cert: config.cert.clone(),
            key: config.key.clone(),
            ca: config.ca.clone(),
            generation: std::sync::atomic::AtomicU64::new(0),
            channel: Mutex::new(None),
        }
    }

    /// The certificate files changed: later calls use a new channel.
    pub(super) fn relink(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) async fn channel(&self) -> Result<Channel, String> {
        let generation = self.generation.load(std::sync::atomic::Ordering::Relaxed);
        let mut slot = self.channel.lock().await;
        if let Some((g, c)) = &*slot
            && *g == generation
        {
            return Ok(c.clone());
        }
        let target = Target {
            url: self.url.clone(),
            cert: Some(self.cert.clone()),
            key: Some(self.key.clone()),
            ca: Some(self.ca.clone()),
        };
        let c = connect(&target).await.map_err(|e| format!("{e:#}"))?;
        *slot = Some((generation, c.clone()));
        Ok(c)
    }
}

/// Logs a state change of one link (heartbeat, a watch, reports) once.
pub(super) struct Health {
    what: &'static str,
    ok: Option<bool>,
}

impl Health {
    pub(super) fn new(what: &'static str) -> Health {
        Health { what, ok: None }
    }

    pub(super) fn up(&mut self) {
        if self.ok != Some(true) {
            tracing::info!(link = self.what, "controller link up");
        }
        self.ok = Some(true);
    }

    pub(super) fn down(&mut self, error: &str) {
        if self.ok != Some(false) {
            tracing::warn!(
                link = self.what,
                error,
                "controller link failing (logged once until it recovers)"
            );
        }
        self.ok = Some(false);
    }
}

fn set_connected(c: &AtomicU64, stream: &'static str, up: bool) {
    c.store(u64::from(up), Ordering::Relaxed);
    gauge!("outrelay_relay_controller_connected", "stream" => stream).set(f64::from(u8::from(up)));
}

/// `Relays.UpsertRelay` at start and every interval.
pub(super) async fn heartbeat(ctx: Arc<TaskCtx>, id: String, region: String, endpoint: String) {
    let mut health = Health::new("heartbeat");
    let mut tick = tokio::time::interval(Duration::from_millis(ctx.config.heartbeat_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let req = pb::UpsertRelayRequest {
            id: id.clone(),
            region: region.clone(),
            endpoint: endpoint.clone(),
        };
        let result = ctx
            .unary(|c| async move { RelaysClient::new(c).upsert_relay(req).await })
            .await;
        let stats = ctx.stats();
        match result {
            Ok(_) => {
                stats.heartbeats_ok.fetch_add(1, Ordering::Relaxed);
                counter!("outrelay_relay_controller_heartbeats_total", "result" => "ok")
                    .increment(1);
                gauge!("outrelay_relay_controller_connected", "stream" => "heartbeat").set(1.0);
                health.up();
            }
            Err(e) => {
                stats.heartbeats_failed.fetch_add(1, Ordering::Relaxed);
                counter!("outrelay_relay_controller_heartbeats_total", "result" => "failed")
                    .increment(1);
                gauge!("outrelay_relay_controller_connected", "stream" => "heartbeat").set(0.0);
                health.down(&e);
            }
        }
    }
}

/// Exponential backoff between reconnects; reset once a stream delivered its snapshot.
pub(super) struct Backoff {
    first_ms: u64,
    max_ms: u64,
    next_ms: u64,
}

impl Backoff {
    pub(super) fn new(config: &ControllerConfig) -> Backoff {
        Backoff {
            first_ms: config.reconnect_backoff_ms,
            max_ms: config.reconnect_backoff_max_ms,
            next_ms: config.reconnect_backoff_ms,
        }
    }

    pub(super) fn reset(&mut self) {
        self.next_ms = self.first_ms;
    }

    pub(super) async fn wait(&mut self) {
        tokio::time::sleep(Duration::from_millis(self.next_ms)).await;
        self.next_ms = self.next_ms.saturating_mul(2).min(self.max_ms);
    }
}

/// Follows `Leases.Watch` (all tenants) for the life of the relay.
pub(super) async fn watch_leases(ctx: Arc<TaskCtx>) {
    let mut health = Health::new("leases watch");
    let mut backoff = Backoff::new(&ctx.config);
    loop {
        let e = watch_leases_once(&ctx, &mut health, &mut backoff).await;
        set_connected(&ctx.stats().leases_connected, "leases", false);
        health.down(&e);
        backoff.wait().await;
    }
}

async fn watch_leases_once(ctx: &TaskCtx, health: &mut Health, backoff: &mut Backoff) -> String {
    let channel = match ctx.connect().await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut stream = match LeasesClient::new(channel)
        .watch(pb::WatchLeasesRequest {
            tenant: String::new(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return format!("{}: {}", s.code(), s.message()),
    };
    // A fresh snapshot is built aside and replaces the old one whole at SNAPSHOT_END; until
    // then the relay keeps deciding from the previous one.
    let mut building = Some(Decisions::default());
    loop {
        let event = match stream.message().await {
            Ok(Some(e)) => e,
            Ok(None) => return "stream ended".to_owned(),
            Err(s) => return format!("{}: {}", s.code(), s.message()),
        };
        ctx.stats()
            .decisions_received
            .fetch_add(1, Ordering::Relaxed);
        counter!("outrelay_relay_controller_decisions_total").increment(1);
        let end = event.kind == lease_decision::Kind::SnapshotEnd as i32;
        match (&mut building, end) {
            (Some(_), true) => {
                let fresh = building.take().unwrap_or_default();
                let enforce = fresh.enforce_all();
                ctx.decider.decisions.store(Some(Arc::new(fresh)));
                set_connected(&ctx.stats().leases_connected, "leases", true);
                health.up();
                backoff.reset();
                for e in enforce {
                    ctx.enforce(e).await;
                }
            }
            (Some(b), false) => {
                b.apply(&event);
            }
            (None, true) => {}
            (None, false) => {
                let e = ctx.update_decisions(|d| d.apply(&event));
                ctx.enforce(e).await;
            }
        }
    }
}

/// Follows `Pki.WatchRevocations` for the life of the relay.
pub(super) async fn watch_revocations(ctx: Arc<TaskCtx>) {
    let mut health = Health::new("revocations watch");
    let mut backoff = Backoff::new(&ctx.config);
    loop {
        let e = watch_revocations_once(&ctx, &mut health, &mut backoff).await;
        set_connected(&ctx.stats().revocations_connected, "revocations", false);
        health.down(&e);
        backoff.wait().await;
    }
}

async fn watch_revocations_once(
    ctx: &TaskCtx,
    health: &mut Health,
    backoff: &mut Backoff,
) -> String {
    let channel = match ctx.connect().await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut stream = match PkiClient::new(channel)
        .watch_revocations(pb::WatchRevocationsRequest {})
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return format!("{}: {}", s.code(), s.message()),
    };
    let mut building = Some(Revocations::default());
    loop {
        let event = match stream.message().await {
            Ok(Some(e)) => e,
            Ok(None) => return "stream ended".to_owned(),
            Err(s) => return format!("{}: {}", s.code(), s.message()),
        };
        let end = event.kind == revocation_event::Kind::SnapshotEnd as i32;
        let revoked = event.kind == revocation_event::Kind::Revoked as i32;
        if let Some(b) = &mut building {
            if revoked {
                b.uris.insert(event.uri);
                count_revocation(ctx);
            } else if end {
                let fresh = Arc::new(building.take().unwrap_or_default());
                ctx.decider.revocations.store(Some(fresh.clone()));
                set_connected(&ctx.stats().revocations_connected, "revocations", true);
                health.up();
                backoff.reset();
                persist(ctx, fresh.clone()).await;
                // Identities revoked while this relay was not listening.
                for uri in ctx.relay.agent_uris() {
                    if fresh.contains(&uri) {
                        close_revoked(ctx, &uri).await;
                    }
                }
            }
            continue;
        }
        if !revoked {
            continue;
        }
        // Publish first, then close: a HELLO racing with this either sees the new set or is
        // already in the registry that close_revoked scans.
        let uri = event.uri;
        let mut next = None;
        ctx.decider.revocations.rcu(|cur| {
            let mut r = cur.as_deref().cloned().unwrap_or_default();
            r.uris.insert(uri.clone());
            let r = Arc::new(r);
            next = Some(r.clone());
            Some(r)
        });
        count_revocation(ctx);
        close_revoked(ctx, &uri).await;
        if let Some(r) = next {
            persist(ctx, r).await;
        }
    }
}

fn count_revocation(ctx: &TaskCtx) {
    ctx.stats()
        .revocations_applied
        .fetch_add(1, Ordering::Relaxed);
    counter!("outrelay_relay_controller_revocations_applied_total").increment(1);
}

async fn close_revoked(ctx: &TaskCtx, uri: &str) {
    let n = ctx
        .relay
        .revoke_agent(uri, close_code::REVOKED, "identity revoked")
        .await;
    if n > 0 {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        ctx.stats()
            .revoked_connections_closed
            .fetch_add(n, Ordering::Relaxed);
        counter!("outrelay_relay_controller_revoked_connections_closed_total").increment(n);
        tracing::info!(
            agent = uri,
            connections = n,
            "closed a revoked agent's connections"
        );
    }
}

async fn persist(ctx: &TaskCtx, r: Arc<Revocations>) {
    let dir = ctx.config.state_dir.clone();
    match tokio::task::spawn_blocking(move || r.store(&dir)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not save the revocation snapshot"),
        Err(e) => tracing::warn!(error = %e, "revocation snapshot writer failed"),
    }
}

/// Drains the report queue into `Leases.Report`, one at a time, and follows the answers.
pub(super) async fn drain_reports(ctx: Arc<TaskCtx>, mut rx: mpsc::Receiver<LeaseEvent>) {
    let mut health = Health::new("reports");
    while let Some(event) = rx.recv().await {
        let kind = match event.kind {
            LeaseEventKind::Requested | LeaseEventKind::Granted => {
                lease_report_request::Kind::Grant
            }
            LeaseEventKind::Renewed => lease_report_request::Kind::Renew,
            LeaseEventKind::Released => lease_report_request::Kind::Release,
        };
        let started = Instant::now();
        let mut result = report(&ctx, &event, kind).await;
        if kind == lease_report_request::Kind::Renew
            && matches!(&result, Err(ReportError::Status(s)) if s.code() == tonic::Code::NotFound)
        {
            // The controller has no record (it lost the grant report, or restarted on an
            // older database): report the lease as a grant so its record exists again.
            result = report(&ctx, &event, lease_report_request::Kind::Grant).await;
        }
        tracing::trace!(elapsed_ms = started.elapsed().as_millis(), "lease report");
        match result {
            Ok(answer) => {
                ctx.stats().reports_sent.fetch_add(1, Ordering::Relaxed);
                counter!("outrelay_relay_controller_reports_total", "result" => "sent")
                    .increment(1);
                health.up();
                follow_answer(&ctx, &event, answer).await;
            }
            Err(e) => {
                ctx.stats().reports_failed.fetch_add(1, Ordering::Relaxed);
                counter!("outrelay_relay_controller_reports_total", "result" => "failed")
                    .increment(1);
                health.down(&e.to_string());
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReportError {
    #[error("{0}")]
    Link(String),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

async fn report(
    ctx: &TaskCtx,
    event: &LeaseEvent,
    kind: lease_report_request::Kind,
) -> Result<pb::LeaseReportResponse, ReportError> {
    let req = pb::LeaseReportRequest {
        kind: kind as i32,
        tenant: event.tenant.clone(),
        name: event.name.clone(),
        agent_uri: event.agent_uri.clone(),
        lease_kind: event.lease_kind.clone(),
        ttl_ms: u64::from(event.ttl_s).saturating_mul(1000),
    };
    tokio::time::timeout(ctx.call_timeout(), async {
        let channel = ctx.link.channel().await.map_err(ReportError::Link)?;
        LeasesClient::new(channel)
            .report(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(ReportError::Status)
    })
    .await
    .unwrap_or_else(|_| Err(ReportError::Link("timed out".to_owned())))
}

/// The controller's answer to a report: keep its record, and end a grant it refused.
async fn follow_answer(ctx: &TaskCtx, event: &LeaseEvent, answer: pb::LeaseReportResponse) {
    let msg = answer.message.as_str();
    // Only records the controller committed are kept ("name_taken" and "quota_exceeded"
    // answers carry a record that does not exist); a "banned" answer is a real ban.
    if let Some(l) = &answer.lease
        && matches!(msg, "" | "pending_approval" | "banned")
        && RecordState::from_pb(l.state).is_some()
    {
        let e = ctx.update_decisions(|d| d.apply_record(l));
        ctx.enforce(e).await;
    }
    if event.kind == LeaseEventKind::Granted && !msg.is_empty() {
        tracing::info!(tenant = %event.tenant, name = %event.name, reason = msg, "controller refused a granted lease; ending it");
        ctx.enforce(Enforce::EndAgentName {
            tenant: event.tenant.clone(),
            name: event.name.clone(),
            agent_uri: event.agent_uri.clone(),
        })
        .await;
    }
}
