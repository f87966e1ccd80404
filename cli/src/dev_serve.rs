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

/// Longest PROXY protocol header dev-serve reads (v1's is at most 107 bytes).
const PROXY_HEADER_MAX_BYTES: usize = 4096;

/// Where dev-serve listens, and whether a PROXY protocol header comes first.
#[derive(Debug, Clone, Copy)]
pub struct Listen {
    /// HTTPS listen address.
    pub https: SocketAddr,
    /// TCP echo listen address.
    pub echo: SocketAddr,
    /// UDP echo listen address.
    pub udp_echo: SocketAddr,
    /// The HTTPS and TCP echo connections start with a v1 or v2 PROXY header.
    pub proxy_protocol: bool,
}

/// Serves until the process is stopped; writes `{"https": addr, "echo": addr, "udp_echo":
/// addr}` to `ready`.
///
/// # Errors
/// Unreadable PEM files or unbindable addresses.
pub async fn run(
    listen: Listen,
    cert: &Path,
    key: &Path,
    ready: Option<&Path>,
) -> anyhow::Result<()> {
    let Listen {
        https,
        echo,
        udp_echo,
        proxy_protocol,
    } = listen;
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
    tokio::spawn(serve_echo(echo, proxy_protocol));
    tokio::spawn(serve_udp_echo(udp_echo, proxy_protocol));
    loop {
        let Ok((mut tcp, peer)) = https.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let client = if proxy_protocol {
                match read_proxy_header(&mut tcp).await {
                    Ok(client) => Some(client),
                    Err(e) => {
                        eprintln!("outrelay dev-serve: https from {peer}: {e:#}");
                        return;
                    }
                }
            } else {
                None
            };
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let mut body = format!(
                    "{GREETING}\npath: {}\nseen from: {peer} (the agent's local connection)\n",
                    req.uri().path()
                );
                match client {
                    Some(Some(c)) => body.push_str(&format!("client {c}\n")),
                    Some(None) => body.push_str("client unknown (PROXY LOCAL/UNKNOWN)\n"),
                    None => {}
                }
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn serve_echo(listener: TcpListener, proxy_protocol: bool) {
    loop {
        let Ok((mut tcp, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if proxy_protocol {
                match read_proxy_header(&mut tcp).await {
                    Ok(Some(c)) => eprintln!("outrelay dev-serve: echo client {c}"),
                    Ok(None) => eprintln!("outrelay dev-serve: echo client unknown"),
                    Err(e) => {
                        eprintln!("outrelay dev-serve: echo from {peer}: {e:#}");
                        return;
                    }
                }
            }
            let (mut r, mut w) = tcp.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Echoes each datagram; with `proxy_protocol` each starts with a v2 DGRAM header, which is
/// reported on stderr and not echoed (a datagram without one is dropped).
async fn serve_udp_echo(socket: tokio::net::UdpSocket, proxy_protocol: bool) {
    let mut buf = vec![0u8; 65_536];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let mut payload = &buf[..n];
        if proxy_protocol {
            let Ok(h) = ppp::v2::Header::try_from(payload) else {
                eprintln!("outrelay dev-serve: udp echo from {from}: no PROXY v2 header");
                continue;
            };
            eprintln!("outrelay dev-serve: udp echo client {:?}", h.addresses);
            payload = &payload[h.len()..];
        }
        let _ = socket.send_to(payload, from).await;
    }
}

/// Reads exactly one PROXY protocol header (v1 or v2) from the start of `tcp`, never a byte
/// of what follows (the TLS ClientHello), and parses it with `ppp`: the client's source
/// address, `None` for v2 LOCAL / v1 UNKNOWN.
async fn read_proxy_header(tcp: &mut tokio::net::TcpStream) -> anyhow::Result<Option<SocketAddr>> {
    use tokio::io::AsyncReadExt as _;
    // 12 bytes are in every header: v2's signature, or v1's "PROXY " and more.
    let mut buf = vec![0u8; 12];
    tcp.read_exact(&mut buf).await.context("PROXY header")?;
    if buf[..] == ppp::v2::PROTOCOL_PREFIX[..] {
        let mut fixed = [0u8; 4];
        tcp.read_exact(&mut fixed)
            .await
            .context("PROXY v2 header")?;
        buf.extend_from_slice(&fixed);
        let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        anyhow::ensure!(
            16 + len <= PROXY_HEADER_MAX_BYTES,
            "PROXY v2 header too long"
        );
        let start = buf.len();
        buf.resize(start + len, 0);
        tcp.read_exact(&mut buf[start..])
            .await
            .context("PROXY v2 header")?;
        let h = ppp::v2::Header::try_from(&buf[..])
            .map_err(|e| anyhow::anyhow!("PROXY v2 header: {e}"))?;
        return Ok(match (h.command, h.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => Some((a.source_address, a.source_port).into()),
            (_, ppp::v2::Addresses::IPv6(a)) => Some((a.source_address, a.source_port).into()),
            _ => None,
        });
    }
    anyhow::ensure!(buf.starts_with(b"PROXY "), "no PROXY header");
    while !buf.ends_with(b"\r\n") {
        anyhow::ensure!(buf.len() < 107, "PROXY v1 header too long");
        let b = tcp.read_u8().await.context("PROXY v1 header")?;
        buf.push(b);
    }
    let h =
        ppp::v1::Header::try_from(&buf[..]).map_err(|e| anyhow::anyhow!("PROXY v1 header: {e}"))?;
    Ok(match h.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
        ppp::v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
        ppp::v1::Addresses::Unknown => None,
    })
}
