//! The controller's shared state: settings, store, CA, and the in-memory views (with their
//! Watch hubs) that the gRPC services read and update.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outrelay_api::pb;
use tokio::sync::mpsc;

use crate::audit::{self, AUDIT_MAC_BYTES};
use crate::config::Settings;
use crate::grpc::Principal;
use crate::leases::LeaseState;
use crate::pki::Ca;
use crate::refusals::{Refusal, RefusalAudit};
use crate::registry::{RegistryEvent, RegistryState};
use crate::store::{Store, StoreError, StoreSettings};
use crate::watch::Hub;

/// Security audit events (aggregated refusals) queued for the store; a full queue drops and
/// counts, so an unauthenticated flood cannot block the accept path.
pub const SECURITY_AUDIT_QUEUE_MAX: usize = 1024;
/// Most identities whose `Pki.Renew` buckets are tracked (full buckets are forgotten first).
pub const RENEW_BUCKETS_MAX: usize = 65_536;

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
    /// Serialises each lease decision with its commit (read, decide, write, publish).
    pub lease_writes: crate::leases::WriteLocks,
    /// Refusal counting and aggregated audit rows.
    pub refusals: RefusalAudit,
    /// Enrollment tokens by hash (mirror of the table, kept until pruned), so a token that
    /// does not exist, is used or expired is refused without queuing a write.
    pub tokens: Mutex<HashMap<String, TokenMemo>>,
    renew_buckets: Mutex<HashMap<String, Bucket>>,
    /// Anonymous RPCs per source (`grpc.anonymous_rpcs_per_source_per_s`).
    pub anonymous_rpcs: crate::grpc::limits::RateBuckets,
}

/// What the controller remembers of an enrollment token.
#[derive(Debug, Clone, Copy)]
pub struct TokenMemo {
    /// Expiry.
    pub expires_unix_ms: i64,
    /// Consumed.
    pub used: bool,
}

/// A `Pki.Renew` token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
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
        let tokens = store.read_blocking(crate::pki::service::load_tokens)?;
        let q = settings.watch_queue_events;
        let anon_rate = settings.anonymous_rpcs_per_source_per_s;
        let (tx, rx) = mpsc::channel(SECURITY_AUDIT_QUEUE_MAX);
        let refusals = RefusalAudit::new(
            Duration::from_millis(settings.refusal_interval_ms),
            settings.refusal_keys_max,
            tx,
        );
        let app = Arc::new(App {
            policies: Hub::new("policy", rules, q),
            registry: Hub::new("registry", RegistryState::default(), q),
            revocations: Hub::new("revocations", revoked, q),
            leases: Hub::new("leases", lease_state, q),
            lease_writes: crate::leases::WriteLocks::default(),
            settings,
            store,
            audit_key,
            ca,
            refusals,
            tokens: Mutex::new(tokens),
            renew_buckets: Mutex::new(HashMap::new()),
            anonymous_rpcs: crate::grpc::limits::RateBuckets::new(anon_rate),
        });
        tokio::spawn(security_audit_sink(app.store.clone(), rx));
        tokio::spawn(refusal_flusher(Arc::downgrade(&app)));
        tokio::spawn(crate::prune::run(Arc::downgrade(&app)));
        Ok(app)
    }

    /// What ends a watch stream of `p` (review M5): its identity being revoked (already, or
    /// while the stream is open), or its certificate's `not_after_unix_s` passing. `None`
    /// for a Unix-socket peer (nothing to revoke). A lost revocation subscription ends the
    /// stream too (it fails closed; the caller reconnects).
    pub fn watch_end(
        &self,
        p: &Principal,
        not_after_unix_s: Option<i64>,
    ) -> Option<crate::watch::StreamEnd> {
        let uri = match p {
            Principal::GlobalAdmin(uri) if uri.starts_with("outrelay://") => uri.clone(),
            Principal::TenantAdmin { uri, .. } | Principal::Relay { uri, .. } => uri.clone(),
            Principal::Agent(identity) => identity.to_string(),
            Principal::GlobalAdmin(_) | Principal::Anonymous(_) => return None,
        };
        let filter_uri = uri.clone();
        let sub = self.revocations.subscribe(
            |r| {
                r.get(&uri)
                    .map(|at| pb::RevocationEvent {
                        uri: uri.clone(),
                        revoked_at_unix_ms: *at,
                        ..pb::RevocationEvent::default()
                    })
                    .into_iter()
                    .collect()
            },
            move |e: &pb::RevocationEvent| e.uri == filter_uri,
        );
        let expiry = async move {
            let Some(not_after) = not_after_unix_s else {
                return std::future::pending().await;
            };
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let left_ms = not_after.saturating_mul(1000).saturating_sub(now_ms).max(0);
            tokio::time::sleep(Duration::from_millis(u64::try_from(left_ms).unwrap_or(0))).await;
        };
        Some(Box::pin(async move {
            tokio::select! {
                first = sub.first() => match first {
                    Some(_) => tonic::Status::permission_denied("identity revoked"),
                    None => tonic::Status::unavailable("revocation watch lost; reconnect"),
                },
                () = expiry => tonic::Status::unauthenticated("certificate expired"),
            }
        }))
    }

    /// True when every certificate of `uri` is refused.
    pub fn is_revoked(&self, uri: &str) -> bool {
        self.revocations.with_state(|r| r.contains_key(uri))
    }

    /// Counts a refusal and audits it aggregated (kind `auth`, decision `deny`): at most one
    /// row per (tenant, caller, method, reason) per `audit.refusal_interval_ms`. Never waits.
    pub fn audit_security(
        &self,
        why: Refusal,
        tenant: &str,
        caller: &str,
        method: &str,
        reason: &str,
    ) {
        self.refusals
            .record(Instant::now(), why, tenant, caller, method, reason);
    }

    /// Takes one `Pki.Renew` token from `identity`'s bucket (`pki.renew_burst` tokens, one
    /// more every `pki.renew_refill_ms`); false when it is empty.
    pub fn take_renew_token(&self, identity: &str, now: Instant) -> bool {
        let burst = f64::from(self.settings.renew_burst);
        let refill_ms = self.settings.renew_refill_ms as f64;
        let Ok(mut buckets) = self.renew_buckets.lock() else {
            return false;
        };
        let level = |b: &Bucket| {
            let ms = now.saturating_duration_since(b.at).as_secs_f64() * 1000.0;
            (b.tokens + ms / refill_ms).min(burst)
        };
        if buckets.len() >= RENEW_BUCKETS_MAX && !buckets.contains_key(identity) {
            buckets.retain(|_, b| level(b) < burst);
        }
        let b = buckets.entry(identity.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = level(b);
        if tokens < 1.0 {
            return false;
        }
        *b = Bucket {
            tokens: tokens - 1.0,
            at: now,
        };
        true
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
            decision: outrelay_api::pb::Decision::Allow as i32,
            reason: reason.to_owned(),
            stream_id: String::new(),
            kind: kind.to_owned(),
            seq: 0,
        }
    }
}

/// Writes the counts of aggregation windows that are over, until the app is gone.
async fn refusal_flusher(app: std::sync::Weak<App>) {
    let period = match app.upgrade() {
        Some(a) => Duration::from_millis((a.settings.refusal_interval_ms / 4).max(50)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        app.refusals.flush(Instant::now());
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
