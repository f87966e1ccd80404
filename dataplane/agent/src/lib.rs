//! `outrelay-agent`: runs next to a workload and exposes it through OutRelay relays.
//!
//! It holds QUIC mTLS connections (ALPN `orp/1`) to `ha_connections` distinct relays picked
//! from the configured relay addresses ([`candidates`]), says HELLO with the identity
//! URI of its certificate, registers each configured lease, and per granted lease keeps a pool
//! of authenticated idle reverse TCP sessions to the relay. A claimed session is joined to the
//! lease's local target and spliced in the kernel by the same engine as the relay's
//! (`outrelay-io`): the agent never copies a lease's payload byte in user space.
//!
//! Service-to-service streams ([`mesh`]): provided services are registered on every relay
//! and the relay's INCOMING_STREAMs joined to their local targets; each consumer listener
//! turns local connections into ORP streams on the held relay with the fewest live consumer
//! streams (ties: config order). Their bytes are
//! QUIC stream data, so they pass through user space (quinn's buffers, handed over without
//! further copies).
//!
//! Not here: enrollment (the `outrelay-client` library).
//!
//! Threads: one small tokio runtime (`agent-control`, 2 workers) for QUIC, leases, pool
//! accounting, service streams and the HTTP listener; one thread per splice engine
//! (`splice-N`), which runs its reverse sessions from connect to splice.
#![forbid(unsafe_code)]

pub mod candidates;
pub mod config;
pub mod control;
pub mod fallback;
pub mod http;
pub mod mesh;
pub mod metric_help;
pub mod pool;
pub mod proxy;
pub mod ready;
pub mod resume;
mod session;
pub mod splice;
pub mod stats;
pub mod tls;
pub mod udp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::config::Settings;
use crate::control::RelayCtx;
use crate::mesh::MeshCtx;
use crate::pool::PoolCtx;
use crate::splice::Splicer;
use crate::stats::{Board, ConsumerStatus, Stats};
use crate::tls::{AgentIdentity, TlsError};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Certificate material.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener, engine or file.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A consumer listener could not be bound.
    #[error("consumer listener {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The enrolled identity could not be loaded for renewal.
    #[error("certificate renewal: {0}")]
    Renewal(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

/// Runs the agent until SIGTERM or SIGINT, then releases its leases and returns.
///
/// `metrics` is the process's Prometheus recorder handle (installed by the caller, once).
///
/// # Errors
/// Startup failures: identity files, splice engines, the metrics listener.
/// `config` is the file SIGHUP re-reads (`None`: `expose`, nothing to re-read).
pub async fn run(
    settings: Settings,
    ready_file: Option<PathBuf>,
    metrics: PrometheusHandle,
    config: Option<PathBuf>,
) -> Result<(), AgentError> {
    let reloader = outrelay_lifecycle::Reloader::new(config.clone(), settings.shutdown_grace_ms);
    let mut signals = outrelay_lifecycle::Signals::install().map_err(io("signal handlers"))?;
    let settings = Arc::new(settings);
    let identity = AgentIdentity::load(&settings.identity)?;
    let reloadable = start_renewal(&settings)?;
    let fallback_tls =
        Arc::new(identity.fallback_client_config(reloadable.clone(), &settings.server_name)?);
    let client = identity.quic_client_config(&settings.connection, reloadable)?;
    let stats = Arc::new(Stats::default());
    let splicer = Splicer::start(
        &settings.splice,
        &settings.pool,
        &settings.local,
        stats.clone(),
    )
    .map_err(io("splice engine"))?;
    let in_flight = splicer.in_flight.clone();
    let board = Arc::new(Board::new(&settings));
    let cands = Arc::new(candidates::Candidates::new(
        settings.relays.clone(),
        settings.ha_connections,
        settings.connection.reconnect_initial,
        settings.connection.reconnect_max,
        &stats,
    ));
    let consumers = mesh::bind_consumers(&settings.consumes)
        .await
        .map_err(|(addr, source)| AgentError::Listen { addr, source })?;
    board.set_consumers(
        consumers
            .iter()
            .map(|(spec, _, bound)| ConsumerStatus {
                service: spec.service.clone(),
                listen_addr: bound.to_string(),
            })
            .collect(),
    );
    let metrics_addr: Option<SocketAddr> = match settings.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io("metrics listener"))?;
            let bound = listener.local_addr().map_err(io("metrics listener"))?;
            let sources = Arc::new(http::Sources {
                agent_uri: identity.uri.clone(),
                stats: stats.clone(),
                board: board.clone(),
                candidates: cands.clone(),
                engines: splicer.stats.clone(),
            });
            tokio::spawn(http::serve(listener, metrics, sources));
            Some(bound)
        }
        None => None,
    };
    tracing::info!(agent = %identity.uri, metrics = ?metrics_addr, relays = ?settings.relays, "agent starting");
    let pools = Arc::new(PoolCtx {
        pool: settings.pool.clone(),
        local: settings.local.clone(),
        stats: stats.clone(),
        splicer,
    });
    let mesh = Arc::new(MeshCtx::new(settings.clone(), stats.clone()));
    let consumer_tasks = mesh::spawn_consumers(consumers, &mesh);
    let ctx = Arc::new(RelayCtx {
        settings: settings.clone(),
        agent_uri: identity.uri.clone(),
        client,
        fallback_tls,
        stats,
        board: board.clone(),
        pools,
        mesh,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut relays = Vec::with_capacity(settings.ha_connections);
    for i in 0..settings.ha_connections {
        relays.push(tokio::spawn(control::run(
            i,
            ctx.clone(),
            cands.clone(),
            stop_rx.clone(),
        )));
    }
    let ready_task = tokio::spawn(ready::run(board, ready_file, metrics_addr));
    outrelay_lifecycle::Watchdog::default().start("agent-control");
    while signals.next().await == outrelay_lifecycle::Signal::Reload {
        reloader.reload(|| match &config {
            Some(path) => Settings::load(path)
                .map(|s| s.shutdown_grace_ms)
                .map_err(|e| e.to_string()),
            None => Ok(reloader
                .shutdown_grace()
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX)),
        });
    }
    outrelay_lifecycle::notify_stopping();
    let grace = reloader.shutdown_grace();
    tracing::info!(
        grace_ms = grace.as_millis(),
        "stopping: releasing leases, draining"
    );
    let _ = stop_tx.send(true);
    // New local connections are refused from here on; joined streams drain below.
    for t in consumer_tasks {
        t.abort();
    }
    for r in relays {
        let _ = r.await;
    }
    ready_task.abort();
    // Spliced connections already running finish within the grace.
    let active = || in_flight.load(std::sync::atomic::Ordering::Relaxed);
    let left = outrelay_lifecycle::drain(grace, active).await;
    if left > 0 {
        tracing::warn!(cut = left, "grace period over: cutting connections");
    }
    Ok(())
}

/// With an enrolled state directory and a controller to renew from: a swappable client
/// certificate and the renewal loop (at 70 % of the certificate's life, retried with backoff)
/// that swaps renewed certificates in. `None` when there is nothing to renew from.
fn start_renewal(
    settings: &Settings,
) -> Result<Option<Arc<outrelay_client::Reloadable>>, AgentError> {
    let Some((dir, url)) = &settings.renewal else {
        return Ok(None);
    };
    let Some(url) = url.clone() else {
        tracing::warn!(
            dir = %dir.display(),
            "no controller for certificate renewal (set [identity] controller): the certificate will expire"
        );
        return Ok(None);
    };
    let store = outrelay_client::IdentityStore::new(dir.clone());
    let stored = store
        .load()
        .map_err(|e| AgentError::Renewal(e.to_string()))?;
    let reloadable = outrelay_client::Reloadable::new(&stored.cert_pem, &stored.key_pem)
        .map_err(|e| AgentError::Renewal(e.to_string()))?;
    let r = reloadable.clone();
    tokio::spawn(async move {
        let done = outrelay_client::renewal_loop(store, url, Some(r), |issued| {
            tracing::info!(identity = %issued.identity, "client certificate renewed; new connections use it");
        })
        .await;
        if let Err(e) = done {
            tracing::error!(error = %e, "certificate renewal stopped");
        }
    });
    Ok(Some(reloadable))
}
