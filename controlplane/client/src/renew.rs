//! Renewal: a fresh key and `Pki.Renew` over mutual TLS with the current certificate, and when
//! to do it ([`renew_at`]: 70 % of the way through the current certificate's life).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use outrelay_api::pb::{self, pki_client::PkiClient};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::cert::{self, CertError, Issued, IssuedCheckError};
use crate::connect::Target;
use crate::tls::{self, ConnectFailure, HttpsUrl, UrlError};

/// Renew when this share of the certificate's lifetime (in percent) has passed.
pub const RENEW_AT_LIFETIME_PERCENT: u32 = 70;
/// Default deadline for connecting, and again for the Renew call.
pub const RENEW_TIMEOUT_MS: u64 = 15_000;

/// Why renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The target URL is not `https://host:port` (renewal needs mutual TLS).
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The target lacks `cert`, `key` or `ca`.
    #[error("renewal needs the current certificate, key and CA files")]
    MissingFiles,
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The current certificate, key or CA does not parse.
    #[error("current identity: {0}")]
    Current(String),
    /// Generating the key or the CSR failed.
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
    /// TCP/TLS failure or timeout.
    #[error("connect to {url}: {source}")]
    Connect {
        /// The controller URL.
        url: String,
        /// What failed.
        source: ConnectFailure,
    },
    /// The controller refused (expired or revoked certificate, ...).
    #[error("controller refused renewal ({code:?}): {message}")]
    Refused {
        /// The gRPC status code.
        code: tonic::Code,
        /// The controller's message.
        message: String,
    },
    /// The certificate returned does not pass the checks (same identity, our new key, the
    /// same CA).
    #[error(transparent)]
    BadCertificate(#[from] IssuedCheckError),
}

/// Renews the identity whose files `target` names (`cert`, `key`, `ca`, https URL).
///
/// The new leaf must carry the same identity, the new key, and verify under the same CA.
/// Nothing is written: save the result with [`crate::store::IdentityStore::save`].
///
/// # Errors
/// [`RenewError`].
pub async fn renew(target: &Target) -> Result<Issued, RenewError> {
    let (Some(c), Some(k), Some(a)) = (&target.cert, &target.key, &target.ca) else {
        return Err(RenewError::MissingFiles);
    };
    let cert_pem = read(c)?;
    let key_pem = zeroize::Zeroizing::new(read(k)?);
    let ca_pem = read(a)?;
    renew_pems(&target.url, &cert_pem, &key_pem, &ca_pem).await
}

/// [`renew`] with the current identity in memory instead of files.
///
/// # Errors
/// [`RenewError`].
pub async fn renew_pems(
    controller_url: &str,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<Issued, RenewError> {
    let url = HttpsUrl::parse(controller_url)?;
    let current = |e: String| RenewError::Current(e);
    let ca_der = cert::first_der(ca_pem).map_err(|e| current(e.to_string()))?;
    let ca_sha256 = cert::sha256_hex(&ca_der);
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| current(format!("certificate: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| current("no certificate".to_owned()))?;
    let identity = cert::inspect(leaf)
        .map_err(|e| current(e.to_string()))?
        .identity
        .map_err(|e| current(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| current(format!("key: {e}")))?;
    let provider = cert::provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).map_err(|e| current(e.to_string()))?;
    let connect_err = |source| RenewError::Connect {
        url: controller_url.to_owned(),
        source,
    };
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| connect_err(ConnectFailure::Transport(e.to_string())))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| current(format!("certificate and key: {e}")))?;
    let (new_key, csr_pem) = cert::key_and_csr()?;
    let timeout = Duration::from_millis(RENEW_TIMEOUT_MS);
    let channel = tls::channel(&url, cfg, timeout)
        .await
        .map_err(connect_err)?;
    let mut req = tonic::Request::new(pb::RenewRequest { csr_pem });
    req.set_timeout(timeout);
    let resp = PkiClient::new(channel)
        .renew(req)
        .await
        .map_err(|s| RenewError::Refused {
            code: s.code(),
            message: s.message().to_owned(),
        })?
        .into_inner();
    Ok(cert::check_response(
        resp,
        &new_key,
        &ca_sha256,
        Some(&identity),
        &provider,
    )?)
}

/// When to renew the certificate in `cert_pem`: `notBefore` + 70 % of its lifetime.
///
/// # Errors
/// [`CertError`] when the certificate does not parse.
pub fn renew_at(cert_pem: &str) -> Result<SystemTime, CertError> {
    let (not_before, not_after) = cert::validity(cert_pem)?;
    let lifetime = not_after
        .duration_since(not_before)
        .map_err(|_| CertError::Validity)?;
    let ms = lifetime.as_millis() * u128::from(RENEW_AT_LIFETIME_PERCENT) / 100;
    let ms = u64::try_from(ms).map_err(|_| CertError::Validity)?;
    Ok(not_before + Duration::from_millis(ms))
}

fn read(path: &Path) -> Result<String, RenewError> {
    std::fs::read_to_string(path).map_err(|source| RenewError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};
    use time::OffsetDateTime;

    fn cert_valid(from: OffsetDateTime, to: OffsetDateTime) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = CertificateParams::new(vec!["x.test".to_owned()]).expect("params");
        p.not_before = from;
        p.not_after = to;
        p.self_signed(&key).expect("cert").pem()
    }

    fn unix(t: SystemTime) -> u64 {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    }

    #[test]
    fn renews_at_seventy_percent_of_the_lifetime() {
        let nb = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time");
        // 24 h leaf backdated 5 min, as the controller issues them.
        let pem = cert_valid(nb, nb + time::Duration::seconds(86_400 + 300));
        let at = renew_at(&pem).expect("renew_at");
        assert_eq!(unix(at), 1_800_000_000 + (86_700 * 7 / 10));
        // 10 s lifetime: 7 s.
        let pem = cert_valid(nb, nb + time::Duration::seconds(10));
        assert_eq!(unix(renew_at(&pem).expect("renew_at")), 1_800_000_007);
        assert!(matches!(renew_at("not pem"), Err(CertError::Pem(_))));
    }
}
