//! The controller's shared state: settings, store, CA, and the in-memory views (with their
//! Watch hubs) that the gRPC services read and update.

use std::collections::BTreeMap;
use std::sync::Arc;

use outrelay_api::pb;
use tokio::sync::mpsc;

use crate::audit::{self, AUDIT_MAC_BYTES};
use crate::config::Settings;
use crate::leases::LeaseState;
use crate::pki::Ca;
use crate::registry::{RegistryEvent, RegistryState};
use crate::store::{Store, StoreError, StoreSettings};
use crate::watch::Hub;

/// Security audit events (refusals, failed handshakes) queued for the store; a full queue drops
/// and counts, so an unauthenticated flood cannot block the accept path.
pub const SECURITY_AUDIT_QUEUE_MAX: usize = 1024;

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// State directory problems.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The audit key.
    #[error(transparent)]
    AuditKey(#[from] audit::AuditKeyError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
}

/// Revoked identities: URI → revocation time.
pub type Revocations = BTreeMap<String, i64>;

/// Everything the services share.
pub struct App {
    /// Validated settings.
    pub settings: Settings,
    /// The store.
    pub store: Store,
    /// The audit chain key (for Verify).
    pub audit_key: [u8; AUDIT_MAC_BYTES],
    /// The CA.
    pub ca: Ca,
    /// Policy rules (all tenants, in creation order) and their watchers.
    pub policies: Hub<Vec<pb::PolicyRule>, PolicyChange>,
    /// Registry and relays.
    pub registry: Hub<RegistryState, RegistryEvent>,
    /// Revoked identities and their watchers.
    pub revocations: Hub<Revocations, pb::RevocationEvent>,
    /// Lease records, bans, tenant settings and their watchers.
    pub leases: Hub<LeaseState, (String, pb::LeaseDecision)>,
    security_audit: mpsc::Sender<pb::AuditEvent>,
}

/// One policy change as delivered to watchers.
#[derive(Debug, Clone)]
pub struct PolicyChange {
    /// The rule's tenant.
    pub tenant: String,
    /// The event sent on the wire.
    pub event: pb::PolicyEvent,
}

impl App {
    /// Opens the state directory (creating it 0700), the audit key, the store and the CA, and
    /// loads the in-memory views. Must run inside a tokio runtime (spawns the audit sink).
    ///
    /// # Errors
    /// Any [`StartError`].
    pub fn open(settings: Settings) -> Result<Arc<App>, StartError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = &settings.state_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StartError::StateDir {
                path: dir.display().to_string(),
                source,
            })?;
        let audit_key = audit::load_or_create_key(&dir.join("audit.key"))?;
        let store = Store::open(
            &StoreSettings {
                path: dir.join("controller.db"),
                write_queue_max: settings.write_queue_max,
                max_batch: settings.max_batch,
                read_pool_max: 4,
            },
            audit_key,
        )?;
        let ca = Ca::load_or_create(dir)?;
        let rules = store.read_blocking(crate::policy::load_all)?;
        let revoked = store.read_blocking(crate::pki::service::load_revocations)?;
        let lease_state = store.read_blocking(crate::leases::load_state)?;
        let q = settings.watch_queue_events;
        let (tx, rx) = mpsc::channel(SECURITY_AUDIT_QUEUE_MAX);
        let app = Arc::new(App {
            policies: Hub::new("policy", rules, q),
            registry: Hub::new("registry", RegistryState::default(), q),
            revocations: Hub::new("revocations", revoked, q),
            leases: Hub::new("leases", lease_state, q),
            settings,
            store,
            audit_key,
            ca,
            security_audit: tx,
        });
        tokio::spawn(security_audit_sink(app.store.clone(), rx));
        Ok(app)
    }

    /// True when every certificate of `uri` is refused.
    pub fn is_revoked(&self, uri: &str) -> bool {
        self.revocations.with_state(|r| r.contains_key(uri))
    }

    /// Queues a security audit row (kind `auth`, decision `deny`) without waiting.
    pub fn audit_security(&self, tenant: &str, caller: &str, method: &str, reason: &str) {
        let ev = pb::AuditEvent {
            ts_unix_ms: now_unix_ms(),
            tenant: tenant.to_owned(),
            caller: caller.to_owned(),
            target: String::new(),
            method: method.to_owned(),
            decision: "deny".to_owned(),
            reason: reason.to_owned(),
            stream_id: String::new(),
            kind: audit::kind::AUTH.to_owned(),
            seq: 0,
        };
        if self.security_audit.try_send(ev).is_err() {
            metrics::counter!("outrelay_controller_audit_dropped_total", "reason" => "security_queue_full")
                .increment(1);
        }
    }

    /// Appends an audit row of kind `kind` inside a store write job.
    pub fn admin_event(
        tenant: &str,
        kind: &str,
        caller: &str,
        target: &str,
        method: &str,
        reason: &str,
    ) -> pb::AuditEvent {
        pb::AuditEvent {
            ts_unix_ms: now_unix_ms(),
            tenant: tenant.to_owned(),
            caller: caller.to_owned(),
            target: target.to_owned(),
            method: method.to_owned(),
            decision: "allow".to_owned(),
            reason: reason.to_owned(),
            stream_id: String::new(),
            kind: kind.to_owned(),
            seq: 0,
        }
    }
}

async fn security_audit_sink(store: Store, mut rx: mpsc::Receiver<pb::AuditEvent>) {
    while let Some(ev) = rx.recv().await {
        // Each row is its own job; the writer batches them with everything else queued.
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = store
                .write(move |conn, ctx| audit::append(conn, &mut ctx.audit, &ev))
                .await
            {
                metrics::counter!("outrelay_controller_audit_dropped_total", "reason" => "store_error")
                    .increment(1);
                tracing::error!(error = %e, "security audit row not written");
            }
        });
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
