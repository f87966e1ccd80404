//! Retention: a periodic job on the store writer deletes rows that stopped mattering, so the
//! database does not grow without bound on a long-running controller.
//!
//! - enrollment tokens used or expired more than `retention.token_retention_ms` ago (a replay
//!   of a pruned token is refused as unknown instead of used: still refused);
//! - lease records released or denied, or whose expiry passed, more than
//!   `retention.lease_retention_ms` ago (banned records are kept: a ban is an admin decision);
//! - issued-certificate records expired more than `retention.cert_retention_ms` ago.
//!
//! The audit log is NOT pruned: deleting rows inside the HMAC chain would make it unverifiable,
//! and deleting a prefix needs an anchor that `audit verify` does not have yet. Its growth is
//! bounded by rate instead (aggregated refusals, no row per lease renewal); see ARCHITECTURE.md.

use std::sync::{Arc, Weak};
use std::time::Duration;

use outrelay_api::pb::lease;
use rusqlite::params;

use crate::app::{App, now_unix_ms};
use crate::store::StoreError;

/// Rows deleted by one prune.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Token hashes deleted.
    pub tokens: Vec<String>,
    /// Lease ids deleted.
    pub leases: Vec<String>,
    /// Issued-certificate rows deleted.
    pub certs: usize,
}

/// Prunes every `retention.prune_interval_ms` until the app is gone.
pub async fn run(app: Weak<App>) {
    let period = match app.upgrade() {
        Some(a) => Duration::from_millis(a.settings.retention.prune_interval_ms),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        if let Err(e) = prune_once(&app, now_unix_ms()).await {
            metrics::counter!("outrelay_controller_prune_failures_total").increment(1);
            tracing::warn!(error = %e, "prune failed; retrying next interval");
        }
    }
}

/// Deletes what is past retention at `now_unix_ms` (one write job) and forgets it in memory.
///
/// # Errors
/// Store errors (nothing is deleted then).
pub async fn prune_once(app: &Arc<App>, now_unix_ms: i64) -> Result<Pruned, StoreError> {
    let r = app.settings.retention;
    let before = |ms: u64| now_unix_ms.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX));
    let (token_before, lease_before, cert_before) =
        (before(r.token_ms), before(r.lease_ms), before(r.cert_ms));
    let pruned = app
        .store
        .write(move |conn, _ctx| {
            let tokens = conn
                .prepare_cached(
                    "DELETE FROM enrollment_tokens WHERE expires_unix_ms < ?1 \
                     OR (used_at_unix_ms IS NOT NULL AND used_at_unix_ms < ?1) RETURNING hash",
                )?
                .query_map(params![token_before], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            let leases = conn
                .prepare_cached(
                    "DELETE FROM leases WHERE state <> ?2 AND (expires_unix_ms < ?1 \
                     OR (state IN (?3, ?4) AND updated_at_unix_ms < ?1)) RETURNING id",
                )?
                .query_map(
                    params![
                        lease_before,
                        lease::State::Banned as i32,
                        lease::State::Released as i32,
                        lease::State::Denied as i32
                    ],
                    |row| row.get::<_, String>(0),
                )?
                .collect::<Result<Vec<_>, _>>()?;
            let certs = conn
                .prepare_cached("DELETE FROM issued_certs WHERE not_after_unix_ms < ?1")?
                .execute(params![cert_before])?;
            Ok(Pruned {
                tokens,
                leases,
                certs,
            })
        })
        .await?;
    if let Ok(mut t) = app.tokens.lock() {
        for h in &pruned.tokens {
            t.remove(h);
        }
    }
    if !pruned.leases.is_empty() {
        app.leases.publish(|s| {
            s.forget(&pruned.leases);
            Vec::new()
        });
    }
    let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
    metrics::counter!("outrelay_controller_pruned_rows_total", "table" => "enrollment_tokens")
        .increment(n(pruned.tokens.len()));
    metrics::counter!("outrelay_controller_pruned_rows_total", "table" => "leases")
        .increment(n(pruned.leases.len()));
    metrics::counter!("outrelay_controller_pruned_rows_total", "table" => "issued_certs")
        .increment(n(pruned.certs));
    Ok(pruned)
}
