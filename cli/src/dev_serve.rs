//! `outrelay dev-serve`: the quickstart's demo services, a small HTTPS server (the service an
//! agent exposes by SNI passthrough, so the relay never sees its key), a TCP echo (the
//! service behind a TCP port lease) and a UDP echo (behind a UDP port lease). Development only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::TcpListener;

/// The demo HTTPS answer's first line (the quickstart's self-test looks for it).
pub const GREETING: &str = "hello from the OutRelay demo service";

/// Serves until the process is stopped; writes `{"https": addr, "echo": addr, "udp_echo":
/// addr}` to `ready`.
///
/// # Errors
/// Unreadable PEM files or unbindable addresses.
pub async fn run(
    https: SocketAddr,
    cert: &Path,
    key: &Path,
    echo: SocketAddr,
    udp_echo: SocketAddr,
    ready: Option<&Path>,
) -> anyhow::Result<()> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("read {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("demo certificate")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let https = TcpListener::bind(https)
        .await
        .with_context(|| format!("bind {https}"))?;
    let echo = TcpListener::bind(echo)
        .await
        .with_context(|| format!("bind {echo}"))?;
    let udp_echo = tokio::net::UdpSocket::bind(udp_echo)
        .await
        .with_context(|| format!("bind UDP {udp_echo}"))?;
    let bound = serde_json::json!({
        "https": https.local_addr()?.to_string(),
        "echo": echo.local_addr()?.to_string(),
        "udp_echo": udp_echo.local_addr()?.to_string(),
    });
    if let Some(path) = ready {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bound.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    eprintln!("outrelay dev-serve: {bound}");
    tokio::spawn(serve_echo(echo));
    tokio::spawn(serve_udp_echo(udp_echo));
    loop {
        let Ok((tcp, peer)) = https.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = format!(
                    "{GREETING}\npath: {}\nseen from: {peer} (the agent's local connection)\n",
                    req.uri().path()
                );
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn serve_udp_echo(socket: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let _ = socket.send_to(&buf[..n], from).await;
    }
}
