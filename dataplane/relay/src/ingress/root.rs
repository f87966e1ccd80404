//! Root-host fallback: the relay's own small HTTPS listener on loopback.
//!
//! A ClientHello whose SNI is exactly the root host (the host of `public_url`) is not a lease
//! route: the SNI listener connects to this loopback listener, replays the buffered ClientHello
//! bytes and copies both ways. The listener terminates TLS with the `[public_tls]` certificate
//! and answers `GET /healthz` with `200 ok` and every other request with `404`. Lease and
//! tenant information is never served here (it is on the admin socket).
//!
//! Why a loopback listener and a user-space copy instead of a splice pair: the root host is
//! low-volume (health checks), so `tokio::io::copy_bidirectional` is plenty, and keeping the
//! HTTPS server behind a real socket means the SNI path treats it like any other upstream
//! (replay, then copy) without a second TLS code path on the public listener. The SNI side
//! holds each connection in the root host's own pool (`ingress.root_conn_max`, per source
//! `root_per_source_max`) for at most `ingress.root_conn_max_ms`; this listener cuts any
//! connection at [`ROOT_CONN_MAX_MS`], the ceiling of that key.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Longest a root-host connection may last on the loopback listener, and the ceiling of
/// `ingress.root_conn_max_ms` (the SNI side's limit, 5 s by default).
pub const ROOT_CONN_MAX_MS: u64 = 30_000;

/// The TLS configuration of the root-host listener, built once at config validation. Its
/// certificate is read at every handshake from `cert`, which SIGHUP reloads from the files
/// (`[public_tls]`) without touching established connections.
#[derive(Debug, Clone)]
pub struct RootTls {
    /// The rustls configuration the listener serves.
    pub config: Arc<rustls::ServerConfig>,
    /// The certificate new handshakes get.
    pub cert: Arc<outrelay_client::Reloadable>,
    /// The certificate chain file (PEM).
    pub cert_path: PathBuf,
    /// The key file (PEM).
    pub key_path: PathBuf,
}

/// Why the `[public_tls]` certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RootTlsError {
    /// A PEM file could not be read or held no usable item.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the certificate and key (e.g. they do not match).
    #[error("certificate and key: {0}")]
    Tls(#[from] rustls::Error),
}

/// Reads the root host's certificate chain and key (PEM) into a [`CertifiedKey`].
///
/// # Errors
/// [`RootTlsError`] naming the file or the mismatch.
pub fn read_certified(cert: &Path, key: &Path) -> Result<CertifiedKey, RootTlsError> {
    let pem = |path: &Path, reason: String| RootTlsError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem(cert, "no certificate".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e.to_string()))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    Ok(CertifiedKey::from_der(chain, key, &provider)?)
}

/// Loads the root host's certificate chain and private key (PEM) into a rustls server config
/// (aws-lc-rs, TLS 1.2 and 1.3, ALPN `http/1.1`).
///
/// # Errors
/// [`RootTlsError`] naming the file or the mismatch.
pub fn load_tls(cert: &Path, key: &Path) -> Result<RootTls, RootTlsError> {
    let resolver = outrelay_client::Reloadable::from_certified(read_certified(cert, key)?);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(RootTls {
        config: Arc::new(config),
        cert: resolver,
        cert_path: cert.to_owned(),
        key_path: key.to_owned(),
    })
}

impl RootTls {
    /// Reads the files again and serves them to new handshakes; on error the current
    /// certificate stays.
    ///
    /// # Errors
    /// [`RootTlsError`].
    pub fn reload(&self) -> Result<(), RootTlsError> {
        self.cert
            .swap_certified(read_certified(&self.cert_path, &self.key_path)?);
        Ok(())
    }
}

/// Binds the root-host listener on `127.0.0.1:0` and serves it until the task is aborted.
/// Returns the bound address (what the SNI listener connects to).
///
/// # Errors
/// The loopback bind failed.
pub async fn spawn(
    tls: Arc<rustls::ServerConfig>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    Ok((addr, tokio::spawn(serve(listener, tls))))
}

/// Accepts TLS connections on `listener` forever and answers `/healthz`.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let conn = async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                    std::future::ready(Ok::<_, Infallible>(respond(&req)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            };
            let _ = tokio::time::timeout(Duration::from_millis(ROOT_CONN_MAX_MS), conn).await;
        });
    }
}

/// `GET /healthz` (or `HEAD`) → 200 `ok`; anything else → 404.
fn respond(req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let healthz = req.uri().path() == "/healthz"
        && matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD);
    let (status, body) = if healthz {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::NOT_FOUND, "not found\n")
    };
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}
