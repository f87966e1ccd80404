//! Listeners: TCP with mutual TLS (rustls, aws-lc-rs provider) and the local Unix socket, both
//! feeding ONE tonic server with the same services. The server requests (does not require) a
//! client certificate so `Pki.Enroll` works without one; chain, validity and the clientAuth EKU
//! are verified by rustls/webpki against our CA. Failed handshakes (wrong CA, expired, ...) are
//! counted and audited (aggregated, [`crate::refusals`]).
//!
//! The TCP listener is capped ([`super::limits`]): connections over `grpc.max_connections` or
//! `grpc.max_connections_per_source` are accepted and closed at once (never left in the
//! backlog), anonymous ones over `grpc.max_anonymous_connections` are closed after the
//! handshake, and an anonymous connection is closed after `grpc.anonymous_idle_timeout_ms`
//! without a byte either way or `grpc.anonymous_max_age_ms` after its handshake. Authenticated
//! connections (relays' long-lived watches) are kept alive and reaped by HTTP/2 PINGs instead.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

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
use super::limits::{AnonSlot, ConnSlot, Limits};
use crate::app::App;
use crate::pki::{LeafProfile, identity_of_cert};
use crate::refusals::Refusal;

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

/// One accepted connection with its caller (and, on TCP, its slots and anonymous deadlines).
pub struct Conn {
    io: ConnIo,
    caller: Caller,
    _slot: Option<ConnSlot>,
    _anon: Option<AnonSlot>,
    deadline: Option<Box<AnonDeadline>>,
}

/// The idle and age deadlines of an anonymous connection.
struct AnonDeadline {
    idle: Duration,
    idle_at: Pin<Box<Sleep>>,
    max_age: Pin<Box<Sleep>>,
    fired: bool,
}

impl AnonDeadline {
    fn new(idle: Duration, max_age: Duration) -> AnonDeadline {
        let now = Instant::now();
        AnonDeadline {
            idle,
            idle_at: Box::pin(tokio::time::sleep_until(now + idle)),
            max_age: Box::pin(tokio::time::sleep_until(now + max_age)),
            fired: false,
        }
    }

    /// An error once either deadline passed (counted once); registers the waker otherwise.
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        let why = if self.fired {
            None
        } else if self.max_age.as_mut().poll(cx).is_ready() {
            Some(Refusal::AnonymousMaxAge)
        } else if self.idle_at.as_mut().poll(cx).is_ready() {
            Some(Refusal::AnonymousIdle)
        } else {
            return Ok(());
        };
        if let Some(why) = why {
            self.fired = true;
            why.count();
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "anonymous connection idle or too old",
        ))
    }

    fn touch(&mut self) {
        let at = Instant::now() + self.idle;
        self.idle_at.as_mut().reset(at);
    }
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
        let this = self.get_mut();
        if let Some(d) = this.deadline.as_mut() {
            d.check(cx)?;
        }
        let before = buf.filled().len();
        let r = match &mut this.io {
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ConnIo::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        if let (Some(d), Poll::Ready(Ok(()))) = (this.deadline.as_mut(), &r)
            && buf.filled().len() > before
        {
            d.touch();
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(d) = this.deadline.as_mut() {
            d.check(cx)?;
        }
        let r = match &mut this.io {
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ConnIo::Unix(s) => Pin::new(s).poll_write(cx, buf),
        };
        if let (Some(d), Poll::Ready(Ok(n))) = (this.deadline.as_mut(), &r)
            && *n > 0
        {
            d.touch();
        }
        r
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

/// Accepts TLS connections forever, handing finished handshakes to `tx`. Connections over a
/// cap are closed at once and counted by reason.
pub async fn accept_tls(
    app: Arc<App>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<Conn>,
) {
    let timeout = Duration::from_millis(app.settings.handshake_timeout_ms);
    let mut conn_caps = app.settings.conn;
    if let Some(nofile) = open_files_limit() {
        // Descriptors for the store, the admin socket, metrics and the runtime stay free.
        let usable = usize::try_from(nofile)
            .unwrap_or(usize::MAX)
            .saturating_sub(FD_HEADROOM)
            .max(1);
        if conn_caps.max_connections > usable {
            tracing::warn!(
                configured = conn_caps.max_connections,
                effective = usable,
                nofile,
                "grpc.max_connections lowered below the open-files limit"
            );
            conn_caps.max_connections = usable;
        }
    }
    let limits = Limits::new(conn_caps);
    let caps = limits.caps();
    // A descriptor kept in reserve: when accept fails for want of descriptors, it is given up
    // to accept the waiting connection and close it at once (a prompt refusal instead of a
    // client hanging in the backlog), then taken again.
    let mut reserve = std::fs::File::open("/dev/null").ok();
    let (idle, max_age) = (
        Duration::from_millis(caps.anonymous_idle_timeout_ms),
        Duration::from_millis(caps.anonymous_max_age_ms),
    );
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) if is_fd_exhaustion(&e) && reserve.is_some() => {
                drop(reserve.take());
                // Only a connection already waiting: never block here for the next one.
                if let Ok(Ok((tcp, _))) =
                    tokio::time::timeout(Duration::from_millis(1), listener.accept()).await
                {
                    drop(tcp);
                }
                Refusal::FdExhausted.count();
                reserve = std::fs::File::open("/dev/null").ok();
                continue;
            }
            Err(e) => {
                // Transient errors, or no reserve descriptor: back off instead of spinning.
                metrics::counter!("outrelay_controller_accept_errors_total", "listener" => "grpc")
                    .increment(1);
                tracing::debug!(error = %e, "grpc accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                reserve = reserve.or_else(|| std::fs::File::open("/dev/null").ok());
                continue;
            }
        };
        let slot = match limits.admit(peer.ip(), std::time::Instant::now()) {
            Ok(slot) => slot,
            Err(why) => {
                // Closed at once: the peer sees a prompt FIN instead of waiting in the backlog.
                why.count();
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (app, acceptor, tx, limits) =
            (app.clone(), acceptor.clone(), tx.clone(), limits.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return handshake_failed(&app, peer, &e.to_string()),
                Err(_) => return handshake_failed(&app, peer, "handshake timed out"),
            };
            let caller = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                None => Caller::Anonymous(Some(peer.ip())),
                Some(leaf) => match identity_of_cert(leaf) {
                    Ok(id) => Caller::Cert(id, cert_not_after_unix_s(leaf)),
                    Err(e) => Caller::BadCert(e.to_string()),
                },
            };
            let (anon, deadline) = if matches!(caller, Caller::Anonymous(_)) {
                match limits.admit_anonymous() {
                    Ok(a) => (Some(a), Some(Box::new(AnonDeadline::new(idle, max_age)))),
                    Err(why) => {
                        why.count();
                        return;
                    }
                }
            } else {
                (None, None)
            };
            if tx
                .send(Conn {
                    io: ConnIo::Tls(Box::new(tls)),
                    caller,
                    _slot: Some(slot),
                    _anon: anon,
                    deadline,
                })
                .await
                .is_err()
            {
                tracing::debug!("grpc server gone; dropping connection");
            }
        });
    }
}

/// Descriptors kept free for everything but gRPC TCP connections.
pub const FD_HEADROOM: usize = 64;

fn is_fd_exhaustion(e: &io::Error) -> bool {
    // EMFILE (24), ENFILE (23), ENOBUFS (105), ENOMEM (12).
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// The soft RLIMIT_NOFILE, read from /proc (no unsafe, no extra dependency).
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A verified leaf's notAfter in Unix seconds.
fn cert_not_after_unix_s(leaf: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn handshake_failed(app: &App, peer: SocketAddr, reason: &str) {
    metrics::counter!("outrelay_controller_tls_handshake_failures_total").increment(1);
    // One row per source address and reason per interval (the port is left out on purpose:
    // it changes with every connection).
    app.audit_security(
        Refusal::TlsHandshake,
        outrelay_proto::identity::SYSTEM_TENANT,
        &format!("tcp:{}", peer.ip()),
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
                _slot: None,
                _anon: None,
                deadline: None,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Serves every service on the connections arriving on `rx` until `shutdown` resolves. Request
/// messages over `grpc.max_message_bytes` are refused INVALID_ARGUMENT before they are
/// buffered.
///
/// # Errors
/// tonic transport errors.
pub async fn serve(
    app: Arc<App>,
    rx: mpsc::Receiver<Conn>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, io::Error>);
    let max = app.settings.max_message_bytes;
    tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            too_large_is_invalid::<tonic::body::Body>,
        ))
        .add_service(
            pb::registry_server::RegistryServer::new(crate::registry::RegistryService(app.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::relays_server::RelaysServer::new(crate::registry::RelaysService(app.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::policy_server::PolicyServer::new(crate::policy::PolicyService(app.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::audit_server::AuditServer::new(crate::audit::AuditService(app.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::pki_server::PkiServer::new(crate::pki::service::PkiService(app.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::leases_server::LeasesServer::new(crate::leases::LeasesService(app))
                .max_decoding_message_size(max),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// tonic answers a request message over the decode limit with OUT_OF_RANGE; it is a malformed
/// (oversized) argument, which relays and clients treat as permanent: INVALID_ARGUMENT, counted.
fn too_large_is_invalid<B>(
    mut resp: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    const OUT_OF_RANGE: &str = "11";
    let h = resp.headers();
    let oversized = h.get("grpc-status").is_some_and(|v| v == OUT_OF_RANGE)
        && h.get("grpc-message").is_some_and(|m| {
            let m = m.as_bytes();
            m.windows(14)
                .any(|w| w == b"length too lar" || w == b"length%20too%2")
        });
    if oversized {
        Refusal::MessageTooLarge.count();
        resp.headers_mut().insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("3"),
        );
    }
    resp
}

use tokio_stream::StreamExt as _;
