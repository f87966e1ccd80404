//! Start-up order: settings (already validated) → state dir, audit key, store, CA → TLS config
//! → bind gRPC, admin socket, metrics → ready file, `READY=1` → serve; SIGHUP re-validates the
//! config (only `[lifecycle]` is live), SIGTERM/SIGINT stops accepting and lets in-flight RPCs
//! and streams finish within `lifecycle.shutdown_grace_ms`.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::app::App;
use crate::config::Settings;
use crate::grpc::server;

/// Why the controller stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Opening state.
    #[error(transparent)]
    Start(#[from] crate::app::StartError),
    /// TLS / certificate files.
    #[error(transparent)]
    Transport(#[from] server::TransportError),
    /// Binding a listener.
    #[error("bind {what}: {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing the ready file.
    #[error("ready file {path}: {source}")]
    ReadyFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// How SIGHUP re-reads the config: the file and the daemon's full validation (the new grace in
/// ms, or the one-line reason it is refused).
pub struct Reload {
    /// The config file (`None`: defaults only).
    pub path: Option<std::path::PathBuf>,
    /// Loads and validates it again.
    pub load: Box<dyn Fn() -> Result<u64, String> + Send>,
}

/// Runs the controller until SIGTERM or SIGINT.
///
/// # Errors
/// Any [`RunError`].
pub async fn run(
    settings: Settings,
    ready_file: Option<&Path>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    reload: Reload,
) -> Result<(), RunError> {
    let reloader = outrelay_lifecycle::Reloader::new(reload.path, settings.shutdown_grace_ms);
    let mut signals = outrelay_lifecycle::Signals::install().map_err(|source| RunError::Bind {
        what: "signal handlers".to_owned(),
        source,
    })?;
    crate::metrics::describe();
    let app = App::open(settings)?;
    let tls = server::tls_config(&app)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let bind_err = |what: String| move |source| RunError::Bind { what, source };
    let grpc = tokio::net::TcpListener::bind(app.settings.grpc_listen)
        .await
        .map_err(bind_err(format!("grpc {}", app.settings.grpc_listen)))?;
    let grpc_addr = grpc.local_addr().map_err(bind_err("grpc".to_owned()))?;
    let (tx, rx) = mpsc::channel(server::ACCEPT_QUEUE_MAX);
    let admin_socket = match &app.settings.admin_socket {
        Some(path) => {
            let l = crate::admin::bind(path, &app.settings.admin_group)
                .map_err(bind_err(format!("admin socket {}", path.display())))?;
            tokio::spawn(server::accept_unix(app.clone(), l, tx.clone()));
            Some(path.clone())
        }
        None => None,
    };
    let metrics_addr = match (app.settings.metrics_listen, metrics) {
        (Some(addr), Some(handle)) => {
            let (l, a) = crate::metrics::bind(addr)
                .await
                .map_err(bind_err(format!("metrics {addr}")))?;
            tokio::spawn(crate::metrics::serve(l, handle, Some(app.clone())));
            Some(a)
        }
        _ => None,
    };
    tokio::spawn(server::accept_tls(app.clone(), grpc, acceptor, tx));
    if let Some(path) = ready_file {
        let json = serde_json::json!({
            "grpc": grpc_addr.to_string(),
            "admin_socket": admin_socket.as_ref().map(|p| p.display().to_string()),
            "metrics": metrics_addr.map(|a| a.to_string()),
            "ca_fingerprint_sha256": app.ca.fingerprint_hex(),
            "pid": std::process::id(),
        });
        write_ready(path, &json.to_string()).map_err(|source| RunError::ReadyFile {
            path: path.display().to_string(),
            source,
        })?;
    }
    tracing::info!(grpc = %grpc_addr, admin = ?admin_socket, metrics = ?metrics_addr, "controller ready");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut serving = tokio::spawn(server::serve(app, rx, async {
        let _ = stop_rx.await;
    }));
    outrelay_lifecycle::notify_ready();
    outrelay_lifecycle::Watchdog::default().start("controller-runtime");
    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                outrelay_lifecycle::Signal::Reload => {
                    reloader.reload(&reload.load);
                }
                outrelay_lifecycle::Signal::Stop => break,
            },
            done = &mut serving => {
                return done.unwrap_or(Ok(())).map_err(RunError::from);
            }
        }
    }
    // SIGTERM: tonic stops taking connections and waits for in-flight ones; long-lived
    // streams (relays' watches) are cut when the grace is over.
    outrelay_lifecycle::notify_stopping();
    let grace = reloader.shutdown_grace();
    tracing::info!(grace_ms = grace.as_millis(), "stopping: draining RPCs");
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, &mut serving).await {
        Ok(done) => done.unwrap_or(Ok(()))?,
        Err(_) => {
            serving.abort();
            tracing::warn!("grace period over: cutting the remaining streams");
        }
    }
    tracing::info!("controller stopped");
    Ok(())
}

fn write_ready(path: &Path, json: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}
