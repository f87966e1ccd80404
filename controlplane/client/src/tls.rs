//! The https leg shared by enrollment and renewal: URL parsing and a tonic channel over one
//! rustls configuration, with a deadline on the whole connect.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

/// The controller's gRPC port when the URL names none.
pub const DEFAULT_CONTROLLER_PORT: u16 = 7444;

/// Why a controller URL was refused.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not `https://host[:port]`.
    #[error("controller URL must be https://host:port, not `{0}`")]
    NotHttps(String),
    /// The port is not a number in 1..=65535.
    #[error("controller URL `{0}`: bad port")]
    Port(String),
    /// The host is not a DNS name or an IP address.
    #[error("controller URL `{0}`: bad host")]
    Host(String),
}

/// A parsed `https://host[:port]`.
#[derive(Debug, Clone)]
pub(crate) struct HttpsUrl {
    pub(crate) server_name: ServerName<'static>,
    /// `host:port` to dial (brackets kept for IPv6).
    pub(crate) dial: String,
}

impl HttpsUrl {
    pub(crate) fn parse(url: &str) -> Result<HttpsUrl, UrlError> {
        let Some(rest) = url.strip_prefix("https://") else {
            return Err(UrlError::NotHttps(url.to_owned()));
        };
        let authority = rest.trim_end_matches('/');
        let (host, port) = match authority.rsplit_once(':') {
            // `[::1]` alone has colons but no port.
            Some((h, p)) if !p.ends_with(']') => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| UrlError::Port(url.to_owned()))?,
            ),
            _ => (authority, DEFAULT_CONTROLLER_PORT),
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.is_empty() {
            return Err(UrlError::Host(url.to_owned()));
        }
        let server_name =
            ServerName::try_from(bare.to_owned()).map_err(|_| UrlError::Host(url.to_owned()))?;
        Ok(HttpsUrl {
            server_name,
            dial: format!("{host}:{port}"),
        })
    }
}

/// Opens a gRPC channel to `url` with `cfg` (ALPN h2 is set here). The TLS handshake happens
/// before this returns, so a refused certificate is an error here, not on the first call.
pub(crate) async fn channel(
    url: &HttpsUrl,
    mut cfg: rustls::ClientConfig,
    timeout: Duration,
) -> Result<Channel, ConnectFailure> {
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let (name, addr) = (url.server_name.clone(), url.dial.clone());
    let endpoint = Endpoint::from_static("http://localhost").timeout(timeout);
    let fut = endpoint.connect_with_connector(tower::service_fn(move |_| {
        let (connector, name, addr) = (connector.clone(), name.clone(), addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            // Without this, Nagle + delayed ACK add ~40 ms to every small HTTP/2 write.
            tcp.set_nodelay(true)?;
            Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
        }
    }));
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(ConnectFailure::Timeout),
        Ok(Err(e)) => Err(ConnectFailure::Transport(error_chain(&e))),
        Ok(Ok(ch)) => Ok(ch),
    }
}

/// Why [`channel`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    /// No connection within the deadline.
    #[error("connect timed out")]
    Timeout,
    /// TCP or TLS failed (the message is the whole error chain).
    #[error("{0}")]
    Transport(String),
}

/// `a: b: c` from an error and its sources (tonic's transport error says little on its own).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let m = inner.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_controller_urls() {
        let u = HttpsUrl::parse("https://127.0.0.1:9000").expect("ip");
        assert_eq!(u.dial, "127.0.0.1:9000");
        let u = HttpsUrl::parse("https://ctl.example.com/").expect("default port");
        assert_eq!(u.dial, "ctl.example.com:7444");
        let u = HttpsUrl::parse("https://[::1]:7444").expect("v6");
        assert_eq!(u.dial, "[::1]:7444");
        let u = HttpsUrl::parse("https://[::1]").expect("v6 default port");
        assert_eq!(u.dial, "[::1]:7444");
        assert!(matches!(
            HttpsUrl::parse("http://x:1"),
            Err(UrlError::NotHttps(_))
        ));
        assert!(matches!(
            HttpsUrl::parse("unix:///run/x.sock"),
            Err(UrlError::NotHttps(_))
        ));
        assert!(matches!(
            HttpsUrl::parse("https://x:0"),
            Err(UrlError::Port(_))
        ));
        assert!(matches!(
            HttpsUrl::parse("https://x:http"),
            Err(UrlError::Port(_))
        ));
        assert!(matches!(
            HttpsUrl::parse("https://:1"),
            Err(UrlError::Host(_))
        ));
    }
}
