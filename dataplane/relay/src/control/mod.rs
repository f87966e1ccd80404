//! The relay's controller client: heartbeat, lease decisions, lease reports, revocations.
//!
//! Optional: without a `[controller]` section the relay runs standalone (every lease approved,
//! no revocation list). With one, it talks to the controller over gRPC with mutual TLS, as the
//! identity in its own `[tls]` certificate (`outrelay://<region>/relay/<id>`):
//!
//! - **Heartbeat**: `Relays.UpsertRelay{id, region, endpoint}` at start and every
//!   `heartbeat_interval_ms`; failures are logged once per change of state.
//! - **Decisions**: `Leases.Watch` (all tenants) into a [`decisions::Decisions`] snapshot,
//!   replaced whole at each SNAPSHOT_END and updated per live event, published through one
//!   `ArcSwap`. The lease path ([`ControllerDecider`]) answers from it without I/O; before the
//!   first snapshot it refuses with `lease_rejected` / `controller_unavailable` (closed world).
//!   A ban or denial of a live lease ends it on the relay at once.
//! - **Reports**: grants, pending requests, renewals and releases go through a bounded queue
//!   (`report_queue_max`) drained by one task into `Leases.Report`; a full queue drops the
//!   report, counted as `queue_full`. The controller's answer is authoritative: a grant it
//!   refuses (`quota_exceeded`, `banned`, `denied`, `name_taken`, `pending_approval`) is ended.
//! - **Revocations**: `Pki.WatchRevocations` into a revocation set, saved atomically in
//!   `state_dir` after every change; agents are refused (close code
//!   [`crate::quic::close_code::REVOCATIONS_UNAVAILABLE`]) until a set is loaded from the
//!   controller or that file, a revoked identity is refused at HELLO and its live connections
//!   are closed with [`crate::quic::close_code::REVOKED`] as soon as the event arrives.
//!
//! - **Service streams** ([`mesh`]): registrations and deregistrations through one ordered
//!   queue into `Registry`, audit events into `Audit.Record`, and `Policy.Watch` /
//!   `Registry.Watch` into the [`crate::mesh::Mesh`] (see [`Controller::serve_mesh`]).
//!
//! Every stream reconnects with exponential backoff (`reconnect_backoff_ms` doubling up to
//! `reconnect_backoff_max_ms`); while the controller is away the relay keeps serving from its
//! last snapshots.

pub mod decisions;
pub mod mesh;
pub mod revocations;
mod tasks;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use outrelay_proto::hostname::LeaseName;
use outrelay_proto::identity::Identity;
use outrelay_proto::orp;
use tokio::sync::mpsc;

use crate::lease::ControllerDecision;
use crate::quic::{Admission, LeaseDecider, LeaseEvent, RelayHandle};
use decisions::Decisions;
use revocations::Revocations;

/// Default heartbeat interval (the controller marks a relay down after 30 s of silence).
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 10_000;
/// Default deadline of one unary call (connect included).
pub const DEFAULT_REPORT_TIMEOUT_MS: u64 = 5_000;
/// Default first reconnect delay of a watch stream.
pub const DEFAULT_RECONNECT_BACKOFF_MS: u64 = 500;
/// Default longest reconnect delay.
pub const DEFAULT_RECONNECT_BACKOFF_MAX_MS: u64 = 30_000;
/// Default bound of the report queue (lease events).
pub const DEFAULT_REPORT_QUEUE_MAX: usize = 1024;
/// Default state directory (the revocation snapshot).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/outrelay-relay";
/// Shortest accepted duration.
pub const MIN_DURATION_MS: u64 = 100;
/// The reason of a lease refused before the first decision snapshot.
pub const CONTROLLER_UNAVAILABLE: &str = "controller_unavailable";

/// Validated `[controller]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// `https://host:port` of the controller's gRPC listener.
    pub url: String,
    /// The relay's certificate chain (PEM), its client certificate to the controller.
    pub cert: PathBuf,
    /// The relay's key (PEM).
    pub key: PathBuf,
    /// The CA that signed the controller's server certificate (PEM).
    pub ca: PathBuf,
    /// Heartbeat interval.
    pub heartbeat_interval_ms: u64,
    /// Deadline of one unary call (heartbeat, report), connect included.
    pub report_timeout_ms: u64,
    /// First reconnect delay of a watch stream (doubles per failure).
    pub reconnect_backoff_ms: u64,
    /// Longest reconnect delay.
    pub reconnect_backoff_max_ms: u64,
    /// Bound of the report queue, in events.
    pub report_queue_max: usize,
    /// Where the revocation snapshot is kept.
    pub state_dir: PathBuf,
}

impl ControllerConfig {
    /// Defaults for everything but the URL and TLS files.
    pub fn new(url: String, cert: PathBuf, key: PathBuf, ca: PathBuf) -> ControllerConfig {
        ControllerConfig {
            url,
            cert,
            key,
            ca,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            report_timeout_ms: DEFAULT_REPORT_TIMEOUT_MS,
            reconnect_backoff_ms: DEFAULT_RECONNECT_BACKOFF_MS,
            reconnect_backoff_max_ms: DEFAULT_RECONNECT_BACKOFF_MAX_MS,
            report_queue_max: DEFAULT_REPORT_QUEUE_MAX,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// `(key, why)` for the first bad one (key relative to `[controller]`).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let Some(rest) = self.url.strip_prefix("https://") else {
            return Err(("url", "must be https://host:port".to_owned()));
        };
        if rest.trim_end_matches('/').is_empty() {
            return Err(("url", "has no host".to_owned()));
        }
        for (key, ms) in [
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("report_timeout_ms", self.report_timeout_ms),
            ("reconnect_backoff_ms", self.reconnect_backoff_ms),
            ("reconnect_backoff_max_ms", self.reconnect_backoff_max_ms),
        ] {
            if ms < MIN_DURATION_MS {
                return Err((key, format!("must be at least {MIN_DURATION_MS} ms")));
            }
        }
        if self.reconnect_backoff_max_ms < self.reconnect_backoff_ms {
            return Err((
                "reconnect_backoff_max_ms",
                "must be at least reconnect_backoff_ms".to_owned(),
            ));
        }
        if self.report_queue_max == 0 {
            return Err(("report_queue_max", "must be at least 1".to_owned()));
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(("state_dir", "must not be empty".to_owned()));
        }
        Ok(())
    }
}

/// Why the controller client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// An invalid configuration value.
    #[error("controller.{key}: {why}")]
    Config {
        /// The key under `[controller]`.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The controller client's counters (also exported as `outrelay_relay_controller_*`).
#[derive(Debug, Default)]
pub struct ControlStats {
    /// Reports the controller answered.
    pub reports_sent: AtomicU64,
    /// Reports that failed (controller unreachable, timeout, refused).
    pub reports_failed: AtomicU64,
    /// Reports dropped because the queue was full.
    pub reports_dropped_queue_full: AtomicU64,
    /// `Leases.Watch` events received (snapshot and live).
    pub decisions_received: AtomicU64,
    /// Live leases ended by a controller decision or a refused report.
    pub leases_revoked: AtomicU64,
    /// Revocation events applied (snapshot and live).
    pub revocations_applied: AtomicU64,
    /// Agent connections closed because their identity was revoked.
    pub revoked_connections_closed: AtomicU64,
    /// Heartbeats the controller acknowledged.
    pub heartbeats_ok: AtomicU64,
    /// Heartbeats that failed.
    pub heartbeats_failed: AtomicU64,
    /// 1 while the lease Watch stream is live (after its snapshot), else 0.
    pub leases_connected: AtomicU64,
    /// 1 while the revocation Watch stream is live (after its snapshot), else 0.
    pub revocations_connected: AtomicU64,
}

impl ControlStats {
    /// A counter's value (tests, status).
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The lease path's view of the controller: answers from the published snapshots only.
pub struct ControllerDecider {
    decisions: ArcSwapOption<Decisions>,
    revocations: ArcSwapOption<Revocations>,
    reports: mpsc::Sender<LeaseEvent>,
    stats: Arc<ControlStats>,
}

impl std::fmt::Debug for ControllerDecider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerDecider")
            .field("decisions_loaded", &self.decisions.load().is_some())
            .field("revocations_loaded", &self.revocations.load().is_some())
            .finish_non_exhaustive()
    }
}

impl ControllerDecider {
    /// The current decisions (`None` before the first snapshot).
    pub fn decisions(&self) -> Option<Arc<Decisions>> {
        self.decisions.load_full()
    }

    /// The current revocation set (`None` before one is loaded).
    pub fn revocations(&self) -> Option<Arc<Revocations>> {
        self.revocations.load_full()
    }

    /// The counters.
    pub fn stats(&self) -> Arc<ControlStats> {
        self.stats.clone()
    }
}

impl LeaseDecider for ControllerDecider {
    fn decide(&self, identity: &Identity, req: &orp::LeaseRegister) -> ControllerDecision {
        let Identity::Agent { tenant, .. } = identity else {
            // The lease table refuses non-agents with `unauthorized`.
            return ControllerDecision::Approved;
        };
        let Ok(name) = LeaseName::parse(&req.name) else {
            // The lease table refuses it with `invalid_request`.
            return ControllerDecision::Approved;
        };
        match &*self.decisions.load() {
            None => ControllerDecision::Rejected(CONTROLLER_UNAVAILABLE.to_owned()),
            Some(d) => d.decide(
                tenant.as_str(),
                name.as_str(),
                &identity.to_string(),
                crate::unix_ms(),
            ),
        }
    }

    fn admit(&self, identity: &Identity) -> Admission {
        match &*self.revocations.load() {
            None => Admission::NotReady,
            Some(r) if r.contains(&identity.to_string()) => Admission::Revoked,
            Some(_) => Admission::Admit,
        }
    }

    fn report(&self, event: LeaseEvent) {
        let reason = match self.reports.try_send(event) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats
                    .reports_dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                "queue_full"
            }
            // The drain task is gone (the client was stopped).
            Err(mpsc::error::TrySendError::Closed(_)) => "client_stopped",
        };
        metrics::counter!("outrelay_relay_controller_reports_dropped_total", "reason" => reason)
            .increment(1);
    }
}

/// The controller client before [`Controller::start`]: build it, give [`Controller::decider`]
/// to the QUIC endpoint, then start it with the endpoint's handle.
pub struct Controller {
    config: ControllerConfig,
    decider: Arc<ControllerDecider>,
    reports: mpsc::Receiver<LeaseEvent>,
    mesh_backend: Arc<mesh::ControllerMesh>,
    mesh_queues: mesh::Queues,
    mesh: Option<Arc<crate::mesh::Mesh>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The running client's tasks; dropping this stops them.
pub struct ControlTasks {
    _tasks: tokio::task::JoinSet<()>,
    link: Arc<tasks::Link>,
}

impl std::fmt::Debug for ControlTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlTasks").finish_non_exhaustive()
    }
}

impl ControlTasks {
    /// The relay's certificate files changed (renewal, SIGHUP): later controller calls and
    /// reconnecting watch streams use a new channel with the new client certificate;
    /// established streams run on.
    pub fn relink(&self) {
        self.link.relink();
    }
}

impl Controller {
    /// Validates `config` and loads the revocation snapshot from `state_dir` if there is one
    /// (an unreadable snapshot is logged and ignored: agents wait for the controller's).
    ///
    /// # Errors
    /// [`ControlError::Config`].
    pub fn new(config: ControllerConfig) -> Result<Controller, ControlError> {
        config
            .validate()
            .map_err(|(key, why)| ControlError::Config { key, why })?;
        let (tx, rx) = mpsc::channel(config.report_queue_max);
        let revocations = match Revocations::load(&config.state_dir) {
            Ok(Some(r)) => {
                tracing::info!(
                    revoked = r.uris.len(),
                    "revocation snapshot loaded from the state directory"
                );
                Some(Arc::new(r))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "revocation snapshot unusable; waiting for the controller");
                None
            }
        };
        let decider = Arc::new(ControllerDecider {
            decisions: ArcSwapOption::empty(),
            revocations: ArcSwapOption::new(revocations),
            reports: tx,
            stats: Arc::new(ControlStats::default()),
        });
        let (mesh_backend, mesh_queues) = mesh::ControllerMesh::new(config.report_queue_max);
        Ok(Controller {
            config,
            decider,
            reports: rx,
            mesh_backend: Arc::new(mesh_backend),
            mesh_queues,
            mesh: None,
        })
    }

    /// The decider to hand to [`crate::quic::QuicServer::bind_with_decider`].
    pub fn decider(&self) -> Arc<ControllerDecider> {
        self.decider.clone()
    }

    /// The backend to build the relay's [`crate::mesh::Mesh`] with (registrations and audit
    /// events go to the controller).
    pub fn mesh_backend(&self) -> Arc<mesh::ControllerMesh> {
        self.mesh_backend.clone()
    }

    /// Feeds `mesh` from the controller (policy and registry watches) once started.
    pub fn serve_mesh(&mut self, mesh: Arc<crate::mesh::Mesh>) {
        self.mesh = Some(mesh);
    }

    /// Starts the heartbeat, the two watch streams and the report drain on the current tokio
    /// runtime. `identity` is the relay's own (from its certificate); `endpoint` is the public
    /// QUIC address agents dial (`host:port`).
    pub fn start(self, relay: RelayHandle, identity: &Identity, endpoint: String) -> ControlTasks {
        let (region, id) = match identity {
            Identity::Relay { region, id } => (region.as_str().to_owned(), id.as_str().to_owned()),
            // QuicServer refuses a non-relay certificate; keep the URI for the logs anyway.
            other => (String::new(), other.to_string()),
        };
        let link = Arc::new(tasks::Link::new(&self.config));
        let ctx = Arc::new(tasks::TaskCtx {
            relay_id: id.clone(),
            config: self.config,
            link: link.clone(),
            decider: self.decider,
            relay,
        });
        let mut set = tokio::task::JoinSet::new();
        set.spawn(tasks::heartbeat(ctx.clone(), id.clone(), region, endpoint));
        set.spawn(tasks::watch_leases(ctx.clone()));
        set.spawn(tasks::watch_revocations(ctx.clone()));
        set.spawn(tasks::drain_reports(ctx.clone(), self.reports));
        set.spawn(mesh::registry_ops(
            ctx.clone(),
            id.clone(),
            self.mesh_queues.ops,
        ));
        set.spawn(mesh::drain_audit(ctx.clone(), self.mesh_queues.audit));
        if let Some(m) = self.mesh {
            set.spawn(mesh::watch_policies(ctx.clone(), m.clone()));
            set.spawn(mesh::watch_services(ctx, m, id.clone()));
        }
        ControlTasks { _tasks: set, link }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quic::LeaseEventKind;

    fn config() -> ControllerConfig {
        ControllerConfig::new(
            "https://127.0.0.1:7444".into(),
            "c".into(),
            "k".into(),
            "a".into(),
        )
    }

    fn event() -> LeaseEvent {
        LeaseEvent {
            kind: LeaseEventKind::Granted,
            tenant: "demo".into(),
            name: "web".into(),
            agent_uri: "outrelay://demo/agent/00000000-0000-4000-8000-000000000001".into(),
            lease_kind: "tls".into(),
            ttl_s: 30,
        }
    }

    #[test]
    fn config_validation_names_the_key() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.url = "http://x:1".into();
        assert_eq!(c.validate().map_err(|e| e.0), Err("url"));
        let mut c = config();
        c.heartbeat_interval_ms = 5;
        assert_eq!(c.validate().map_err(|e| e.0), Err("heartbeat_interval_ms"));
        let mut c = config();
        c.reconnect_backoff_max_ms = 200;
        c.reconnect_backoff_ms = 300;
        assert_eq!(
            c.validate().map_err(|e| e.0),
            Err("reconnect_backoff_max_ms")
        );
        let mut c = config();
        c.report_queue_max = 0;
        assert_eq!(c.validate().map_err(|e| e.0), Err("report_queue_max"));
    }

    #[test]
    fn a_full_report_queue_drops_and_counts_queue_full() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut c = config();
        c.report_queue_max = 2;
        c.state_dir = dir.path().to_path_buf();
        let controller = Controller::new(c).expect("controller");
        let decider = controller.decider();
        for _ in 0..5 {
            decider.report(event());
        }
        assert_eq!(
            ControlStats::get(&decider.stats().reports_dropped_queue_full),
            3
        );
    }

    #[test]
    fn closed_world_before_snapshots() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut c = config();
        c.state_dir = dir.path().to_path_buf();
        let controller = Controller::new(c).expect("controller");
        let decider = controller.decider();
        let agent = Identity::parse(&event().agent_uri).expect("uri");
        assert_eq!(decider.admit(&agent), Admission::NotReady);
        let req = orp::LeaseRegister {
            name: "Web".into(),
            tls: true,
            ..orp::LeaseRegister::default()
        };
        assert_eq!(
            decider.decide(&agent, &req),
            ControllerDecision::Rejected(CONTROLLER_UNAVAILABLE.into())
        );
    }

    #[test]
    fn a_stored_revocation_snapshot_admits_at_start() {
        let dir = tempfile::tempdir().expect("tmp");
        let revoked = "outrelay://demo/agent/00000000-0000-4000-8000-000000000002";
        Revocations {
            uris: [revoked.to_owned()].into_iter().collect(),
        }
        .store(dir.path())
        .expect("store");
        let mut c = config();
        c.state_dir = dir.path().to_path_buf();
        let decider = Controller::new(c).expect("controller").decider();
        let ok = Identity::parse(&event().agent_uri).expect("uri");
        assert_eq!(decider.admit(&ok), Admission::Admit);
        let bad = Identity::parse(revoked).expect("uri");
        assert_eq!(decider.admit(&bad), Admission::Revoked);
    }
}
