//! Connecting to the controller: Unix socket or https with a client certificate (rustls,
//! aws-lc-rs provider).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tonic::transport::{Channel, Endpoint};

/// Where and how to connect.
pub struct Target {
    /// `unix:///path` or `https://host:port`.
    pub url: String,
    /// Client certificate (https).
    pub cert: Option<PathBuf>,
    /// Client key (https).
    pub key: Option<PathBuf>,
    /// CA for the controller's certificate (https).
    pub ca: Option<PathBuf>,
}

/// Opens a channel to the controller.
///
/// # Errors
/// A bad URL, unreadable PEM files, or a failed connection.
pub async fn connect(t: &Target) -> anyhow::Result<Channel> {
    if let Some(path) = t.url.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        let shown = path.display().to_string();
        return Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .with_context(|| format!("connect to controller socket {shown}"));
    }
    let Some(rest) = t.url.strip_prefix("https://") else {
        bail!(
            "--controller must be unix:///path or https://host:port, not `{}`",
            t.url
        );
    };
    let authority = rest.trim_end_matches('/');
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse::<u16>().context("--controller port")?),
        None => (authority.to_owned(), 7444),
    };
    let (Some(cert), Some(key), Some(ca)) = (&t.cert, &t.key, &t.ca) else {
        bail!("https controllers need --cert, --key and --ca");
    };
    let ca_der =
        CertificateDer::from_pem_file(ca).with_context(|| format!("read {}", ca.display()))?;
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("read {}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).context("CA certificate")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("client certificate")?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let server_name = ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
    .context("--controller host")?;
    let addr = format!("{host}:{port}");
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, name, addr) = (connector.clone(), server_name.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                // Without this, Nagle + delayed ACK add ~40 ms to every small HTTP/2 write.
                tcp.set_nodelay(true)?;
                Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await
        .with_context(|| format!("connect to {}", t.url))
}
