//! Prometheus `/metrics`: the `metrics` facade with the Prometheus recorder, served with hyper
//! ([`outrelay_lifecycle::dashboard::serve`]) on its own listener (so a port-0 bind can be
//! reported in the ready file), next to the read-only dashboard (`/`, `/status.json`).

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::Response;
use hyper::body::Bytes;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use outrelay_lifecycle::dashboard::{self, Route};
use tokio::net::TcpListener;

use crate::app::App;

/// Installs the global recorder.
///
/// # Errors
/// When a recorder is already installed.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new().install_recorder()
}

/// HELP of `outrelay_controller_refusals_total`: names every reason label.
pub const REFUSALS_HELP: &str = "Refusals by reason: tls_handshake, unix_not_admin, bad_identity, revoked, \
         not_authorized, anonymous, anonymous_rate, token_malformed, token_unknown, token_used, token_expired, \
         csr_mismatch, renew_rate_limited, max_connections, source_connections, source_rate, \
         fd_exhausted, anonymous_connections, anonymous_idle, anonymous_max_age, message_too_large, \
         services_per_agent";

/// HELP texts for the series of the abuse budgets (each refusal reason is a label of
/// `outrelay_controller_refusals_total`; see [`crate::refusals::Refusal`]).
pub fn describe() {
    metrics::describe_counter!("outrelay_controller_refusals_total", REFUSALS_HELP);
    metrics::describe_counter!(
        "outrelay_controller_refusal_audit_rows_total",
        "Aggregated refusal audit rows queued (at most one per source and reason per audit.refusal_interval_ms)"
    );
    metrics::describe_counter!(
        "outrelay_controller_refusal_audit_overflow_total",
        "Refusals audited under the shared overflow key (audit.refusal_keys_max reached)"
    );
    metrics::describe_gauge!(
        "outrelay_controller_connections",
        "Open gRPC TCP connections (kind=all|anonymous)"
    );
    metrics::describe_counter!(
        "outrelay_controller_store_jobs_total",
        "Store write jobs run by the writer thread (result=ok|failed)"
    );
    metrics::describe_counter!(
        "outrelay_controller_pruned_rows_total",
        "Rows deleted by the retention prune (table=enrollment_tokens|leases|issued_certs)"
    );
    metrics::describe_counter!(
        "outrelay_controller_lease_renewals_total",
        "Lease renewals recorded (durable, without an audit row)"
    );
    metrics::describe_counter!(
        "outrelay_controller_prune_failures_total",
        "Retention prune jobs that failed (retried at the next interval)"
    );
    // Series that existed before the abuse budgets, described here so that every series has
    // HELP from its first sample (promtool), whichever event makes it appear first.
    metrics::describe_counter!(
        "outrelay_controller_accept_errors_total",
        "Errors accepting a gRPC TCP connection"
    );
    metrics::describe_counter!(
        "outrelay_controller_audit_dropped_total",
        "Audit records refused or lost before they were stored"
    );
    metrics::describe_counter!(
        "outrelay_controller_audit_records_total",
        "Audit records stored"
    );
    metrics::describe_counter!(
        "outrelay_controller_certificates_issued_total",
        "Certificates issued by enrollment or renewal"
    );
    metrics::describe_counter!(
        "outrelay_controller_lease_refused_total",
        "Lease grants refused, by reason"
    );
    metrics::describe_counter!(
        "outrelay_controller_policy_changes_total",
        "Policy rules added or removed"
    );
    metrics::describe_counter!(
        "outrelay_controller_registry_changes_total",
        "Service registry changes"
    );
    metrics::describe_counter!(
        "outrelay_controller_relay_heartbeats_total",
        "Relay heartbeats received"
    );
    metrics::describe_counter!(
        "outrelay_controller_revocations_total",
        "Identities revoked"
    );
    metrics::describe_counter!(
        "outrelay_controller_rpc_refused_total",
        "RPCs refused by the authorisation check"
    );
    metrics::describe_counter!(
        "outrelay_controller_store_commit_failures_total",
        "Store transactions whose COMMIT failed (their jobs were refused)"
    );
    metrics::describe_counter!(
        "outrelay_controller_store_rejected_total",
        "Store jobs refused before the writer took them, by reason"
    );
    metrics::describe_histogram!(
        "outrelay_controller_store_commit_seconds",
        "Time of one group-commit transaction (synchronous=FULL) in seconds"
    );
    metrics::describe_histogram!(
        "outrelay_controller_store_batch_jobs",
        "Jobs committed together in one group-commit transaction"
    );
    metrics::describe_counter!(
        "outrelay_controller_tls_handshake_failures_total",
        "TLS handshakes on the gRPC port that failed"
    );
    metrics::describe_counter!(
        "outrelay_controller_watch_disconnects_total",
        "Watch streams cut because the watcher fell behind or left"
    );
    metrics::describe_gauge!("outrelay_controller_watchers", "Open Watch streams");
}

/// Binds `addr`; returns the listener and its bound address.
///
/// # Errors
/// Bind failures.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Serves the metrics listener forever: `GET /metrics` (Prometheus), and with `app` the
/// read-only dashboard, `GET /status.json` and `GET /` ([`crate::dashboard`]); any other
/// method is 405, any other path 404.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, app: Option<Arc<App>>) {
    outrelay_lifecycle::dashboard::serve(listener, move |route| {
        let (handle, app) = (handle.clone(), app.clone());
        async move {
            match (route, app) {
                (Route::Metrics, _) => dashboard::metrics(handle.render()),
                (Route::Snapshot, Some(app)) => match crate::dashboard::snapshot(&app).await {
                    Ok(snapshot) => dashboard::json(&snapshot),
                    Err(e) => unavailable(&e),
                },
                (Route::Page, Some(app)) => match crate::dashboard::snapshot(&app).await {
                    Ok(snapshot) => dashboard::page(crate::dashboard::render(&snapshot)),
                    Err(e) => unavailable(&e),
                },
                (other, _) => dashboard::refusal(other),
            }
        }
    })
    .await;
}

/// A 503 naming why the snapshot could not be read.
fn unavailable(e: &crate::store::StoreError) -> Response<Full<Bytes>> {
    tracing::warn!(error = %e, "dashboard: the store could not be read");
    let mut r = Response::new(Full::new(Bytes::from(format!(
        "the store could not be read: {e}\n"
    ))));
    *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
    r
}
