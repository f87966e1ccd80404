//! Listeners: TCP with mutual TLS (rustls, aws-lc-rs provider) and the local Unix socket, both
//! feeding ONE tonic server with the same services. The server requests (does not require) a
//! client certificate so `Pki.Enroll` works without one; chain, validity and the clientAuth EKU
//! are verified by rustls/webpki against our CA. Failed handshakes (wrong CA, expired, ...) are
//! counted and audited.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use outrelay_api::pb;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::Caller;
use crate::app::App;
use crate::pki::{LeafProfile, identity_of_cert};

/// Accepted connections waiting for the gRPC server.
pub const ACCEPT_QUEUE_MAX: usize = 128;
/// Lifetime of the server certificate the controller issues itself at start.
pub const SELF_ISSUED_SERVER_CERT_S: u64 = 365 * 86_400;

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TLS configuration.
    #[error("tls: {0}")]
    Tls(String),
    /// A certificate or key file.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// One accepted connection with its caller.
pub struct Conn {
    io: ConnIo,
    caller: Caller,
}

enum ConnIo {
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl Connected for Conn {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ConnIo::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ConnIo::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ConnIo::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ConnIo::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Whether `leaf` names `ca` as its issuer (the operator's own file: a name check is enough to
/// decide whether sending the CA along helps; clients still verify the signature).
fn issued_by(leaf: &CertificateDer<'_>, ca: &CertificateDer<'_>) -> bool {
    let (Ok((_, leaf)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(leaf),
        x509_parser::parse_x509_certificate(ca),
    ) else {
        return false;
    };
    leaf.issuer() == ca.subject()
}

/// Builds the rustls server config: our CA as the only client root, client certs optional,
/// ALPN h2, aws-lc-rs provider (post-quantum hybrid key exchange preferred).
///
/// # Errors
/// Unreadable cert/key files or a rustls configuration error.
pub fn tls_config(app: &App) -> Result<rustls::ServerConfig, TransportError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(app.ca.cert_der().to_vec()))
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let (mut chain, key) = match &app.settings.tls_files {
        Some((cert, key)) => {
            let file_err = |p: &std::path::Path, e: String| TransportError::File {
                path: p.display().to_string(),
                message: e,
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| file_err(cert, e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(cert, e.to_string()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e.to_string()))?;
            (chain, key)
        }
        None => {
            let (issued, key_pem) = app
                .ca
                .issue_with_key(
                    &app.settings.server_names,
                    None,
                    LeafProfile::Server,
                    SELF_ISSUED_SERVER_CERT_S,
                    time::OffsetDateTime::now_utc(),
                )
                .map_err(|e| TransportError::Tls(e.to_string()))?;
            let chain = vec![
                CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
                    .map_err(|e| TransportError::Tls(e.to_string()))?,
            ];
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| TransportError::Tls(e.to_string()))?;
            (chain, key)
        }
    };
    // Enrollees know only the CA's fingerprint (from their token): the controller presents its
    // CA after a leaf that CA issued, so they can pin it on first contact.
    let ca_der = CertificateDer::from(app.ca.cert_der().to_vec());
    if chain.len() == 1 && issued_by(&chain[0], &ca_der) && !chain.contains(&ca_der) {
        chain.push(ca_der);
    }
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Accepts TLS connections forever, handing finished handshakes to `tx`.
pub async fn accept_tls(
    app: Arc<App>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<Conn>,
) {
    let timeout = Duration::from_millis(app.settings.handshake_timeout_ms);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                metrics::counter!("outrelay_controller_accept_errors_total", "listener" => "grpc")
                    .increment(1);
                tracing::warn!(error = %e, "grpc accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (app, acceptor, tx) = (app.clone(), acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return handshake_failed(&app, peer, &e.to_string()),
                Err(_) => return handshake_failed(&app, peer, "handshake timed out"),
            };
            let caller = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                None => Caller::Anonymous,
                Some(leaf) => match identity_of_cert(leaf) {
                    Ok(id) => Caller::Cert(id),
                    Err(e) => Caller::BadCert(e.to_string()),
                },
            };
            if tx
                .send(Conn {
                    io: ConnIo::Tls(Box::new(tls)),
                    caller,
                })
                .await
                .is_err()
            {
                tracing::debug!("grpc server gone; dropping connection");
            }
        });
    }
}

fn handshake_failed(app: &App, peer: SocketAddr, reason: &str) {
    metrics::counter!("outrelay_controller_tls_handshake_failures_total").increment(1);
    tracing::info!(%peer, reason, "tls handshake refused");
    app.audit_security(
        outrelay_proto::identity::SYSTEM_TENANT,
        &format!("tcp:{peer}"),
        "tls.handshake",
        &format!("tls handshake refused: {reason}"),
    );
}

/// Accepts Unix-socket connections forever; the caller is read with SO_PEERCRED.
pub async fn accept_unix(app: Arc<App>, listener: UnixListener, tx: mpsc::Sender<Conn>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                metrics::counter!("outrelay_controller_accept_errors_total", "listener" => "admin")
                    .increment(1);
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let caller = match stream.peer_cred() {
            Ok(cred) => Caller::Unix {
                uid: cred.uid(),
                admin: crate::admin::is_admin(cred.uid(), cred.gid(), &app.settings.admin_group),
            },
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; closing");
                continue;
            }
        };
        if tx
            .send(Conn {
                io: ConnIo::Unix(stream),
                caller,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Serves every service on the connections arriving on `rx` until `shutdown` resolves.
///
/// # Errors
/// tonic transport errors.
pub async fn serve(
    app: Arc<App>,
    rx: mpsc::Receiver<Conn>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, io::Error>);
    tonic::transport::Server::builder()
        .add_service(pb::registry_server::RegistryServer::new(
            crate::registry::RegistryService(app.clone()),
        ))
        .add_service(pb::relays_server::RelaysServer::new(
            crate::registry::RelaysService(app.clone()),
        ))
        .add_service(pb::policy_server::PolicyServer::new(
            crate::policy::PolicyService(app.clone()),
        ))
        .add_service(pb::audit_server::AuditServer::new(
            crate::audit::AuditService(app.clone()),
        ))
        .add_service(pb::pki_server::PkiServer::new(
            crate::pki::service::PkiService(app.clone()),
        ))
        .add_service(pb::leases_server::LeasesServer::new(
            crate::leases::LeasesService(app),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

use tokio_stream::StreamExt as _;
