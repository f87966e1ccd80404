//! TLS for the agent endpoint: certificate material, the client-certificate verifier that
//! checks the chain AND the identity URI role, and the stateless-reset key derived from the
//! relay's certificate key.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use outrelay_proto::identity::{Identity, Role};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::crypto::tls13::OkmBlock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::{QuicError, QuicStats};
use outrelay_proto::frame::ORP_ALPN;

/// HKDF salt of the stateless-reset key (versioned so a change of derivation changes the key).
const RESET_KEY_SALT: &[u8] = b"outrelay-quic-stateless-reset-v1";
/// HKDF info of the stateless-reset key.
const RESET_KEY_INFO: &[u8] = b"quic stateless reset key";

/// The relay's certificate chain, key and the controller CA roots agents must chain to.
#[derive(Debug)]
pub struct TlsMaterial {
    /// Leaf first; the leaf carries the relay's `outrelay://<region>/relay/<id>` URI SAN.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The controller CA certificate(s).
    pub ca_roots: Vec<CertificateDer<'static>>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            ca_roots: self.ca_roots.clone(),
        }
    }
}

impl TlsMaterial {
    /// Reads the material from PEM files (chain, key, CA bundle).
    ///
    /// # Errors
    /// [`QuicError::Pem`] naming the file that could not be read or held no item.
    pub fn from_pem_files(
        cert_chain: &Path,
        key: &Path,
        ca_roots: &Path,
    ) -> Result<TlsMaterial, QuicError> {
        let pem_err = |path: &Path, e: rustls::pki_types::pem::Error| QuicError::Pem {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, QuicError> {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| pem_err(path, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err(path, e))?;
            if certs.is_empty() {
                return Err(QuicError::Pem {
                    path: path.display().to_string(),
                    reason: "no certificate".to_owned(),
                });
            }
            Ok(certs)
        };
        Ok(TlsMaterial {
            cert_chain: certs(cert_chain)?,
            key: PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?,
            ca_roots: certs(ca_roots)?,
        })
    }
}

/// The single URI SAN identity of a DER certificate.
///
/// # Errors
/// [`QuicError::BadIdentity`] when the certificate does not parse or its URI SANs are not
/// exactly one valid identity URI.
pub fn cert_identity(cert: &CertificateDer<'_>) -> Result<(Identity, String), QuicError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| QuicError::BadIdentity(format!("certificate: {e}")))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                uris.push(*uri);
            }
        }
    } else if parsed.subject_alternative_name().is_err() {
        return Err(QuicError::BadIdentity(
            "malformed subjectAltName".to_owned(),
        ));
    }
    let identity = Identity::from_uri_sans(uris.iter().copied())
        .map_err(|e| QuicError::BadIdentity(e.to_string()))?;
    let uri = uris.first().map(|u| (*u).to_owned()).unwrap_or_default();
    Ok((identity, uri))
}

/// The certificate's notAfter in Unix seconds (`None`: it cannot be parsed).
pub(crate) fn cert_not_after_unix_s(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// Client-certificate verifier: webpki checks the chain to the controller CA (and the
/// clientAuth EKU), then the leaf must carry exactly one valid identity URI with role `agent`
/// or `relay` (a peer relay forwarding streams: such a connection may only open
/// FORWARD_STREAMs, see `quic::forward`).
#[derive(Debug)]
pub(crate) struct AgentCertVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    stats: Arc<QuicStats>,
}

impl ClientCertVerifier for AgentCertVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
        {
            self.stats.refused_bad_chain.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        match cert_identity(end_entity) {
            Ok((identity, _)) if matches!(identity.role(), Role::Agent | Role::Relay) => {
                Ok(ClientCertVerified::assertion())
            }
            Ok(_) => {
                self.stats.refused_bad_role.fetch_add(1, Ordering::Relaxed);
                Err(rustls::Error::General(
                    "client certificate role is not agent or relay".to_owned(),
                ))
            }
            Err(e) => {
                self.stats
                    .refused_bad_identity
                    .fetch_add(1, Ordering::Relaxed);
                Err(rustls::Error::General(e.to_string()))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The relay's certificate as a rustls [`CertifiedKey`](rustls::sign::CertifiedKey) (what the
/// swappable resolver serves).
///
/// # Errors
/// [`QuicError::Tls`] when the key does not parse or does not match the leaf.
pub fn certified_key(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::sign::CertifiedKey, QuicError> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(cert_chain, key, &provider)
        .map_err(|e| QuicError::Tls(format!("certificate and key: {e}")))
}

/// The rustls/quinn server crypto: TLS 1.3 only, ALPN `orp/1`, mandatory agent client certs.
/// The certificate comes from `cert` at every handshake, so a swap reaches new connections
/// only (established ones keep theirs).
pub(crate) fn server_crypto(
    material: &TlsMaterial,
    cert: Arc<outrelay_client::Reloadable>,
    stats: Arc<QuicStats>,
) -> Result<QuicServerConfig, QuicError> {
    let tls = server_tls(material, cert, stats)?;
    QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))
}

/// The rustls side of [`server_crypto`] (also what the TCP fallback's TLS terminates with).
pub(crate) fn server_tls(
    material: &TlsMaterial,
    cert: Arc<outrelay_client::Reloadable>,
    stats: Arc<QuicStats>,
) -> Result<rustls::ServerConfig, QuicError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in &material.ca_roots {
        roots
            .add(ca.clone())
            .map_err(|e| QuicError::Tls(format!("CA root: {e}")))?;
    }
    let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| QuicError::Tls(format!("client verifier: {e}")))?;
    let verifier = Arc::new(AgentCertVerifier { chain, stats });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![ORP_ALPN.as_bytes().to_vec()];
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// The QUIC stateless-reset key: HMAC-SHA256 keyed with HKDF-SHA256(salt, certificate key
/// DER). The same certificate key gives the same reset key after a restart, so agents of the
/// previous process get a stateless reset at once instead of waiting for the idle timeout.
pub(crate) struct ResetKey {
    hkdf: &'static dyn rustls::crypto::tls13::Hkdf,
    key: OkmBlock,
}

impl ResetKey {
    /// Derives the key from the relay's private key.
    pub(crate) fn derive(
        provider: &CryptoProvider,
        key: &PrivateKeyDer<'_>,
    ) -> Result<ResetKey, QuicError> {
        let hkdf = provider
            .cipher_suites
            .iter()
            .filter_map(|s| s.tls13())
            .find(|s| {
                s.common.hash_provider.algorithm() == rustls::crypto::hash::HashAlgorithm::SHA256
            })
            .map(|s| s.hkdf_provider)
            .ok_or_else(|| QuicError::Tls("no HKDF-SHA256 in the crypto provider".to_owned()))?;
        let key = hkdf
            .extract_from_secret(Some(RESET_KEY_SALT), key.secret_der())
            .expand_block(&[RESET_KEY_INFO]);
        Ok(ResetKey { hkdf, key })
    }

    /// A 64-bit key for hashed connection ids, derived from the same secret.
    pub(crate) fn cid_key(&self) -> u64 {
        let tag = self
            .hkdf
            .hmac_sign(&self.key, b"outrelay connection id key");
        let mut first = [0_u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_le_bytes(first)
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let tag = self.hkdf.hmac_sign(&self.key, data);
        let tag = tag.as_ref();
        let n = tag.len().min(signature_out.len());
        signature_out[..n].copy_from_slice(&tag[..n]);
    }

    fn signature_len(&self) -> usize {
        self.hkdf.hmac_sign(&self.key, b"").as_ref().len()
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let tag = self.hkdf.hmac_sign(&self.key, data);
        let tag = tag.as_ref();
        // Constant time in the tag contents: fold every byte difference.
        let diff = tag
            .iter()
            .zip(signature)
            .fold(u8::from(tag.len() != signature.len()), |acc, (a, b)| {
                acc | (a ^ b)
            });
        if diff == 0 {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

#[cfg(test)]
mod tests {
    use quinn::crypto::HmacKey as _;
    use rustls::pki_types::PrivatePkcs8KeyDer;

    use super::*;

    fn key(bytes: &[u8]) -> ResetKey {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(bytes.to_vec()));
        ResetKey::derive(&rustls::crypto::aws_lc_rs::default_provider(), &der).expect("derive")
    }

    #[test]
    fn reset_key_is_stable_per_certificate_key_and_verifies() {
        let (a, a_again, b) = (key(b"key one"), key(b"key one"), key(b"key two"));
        assert_eq!(a.signature_len(), 32);
        let mut sig_a = [0u8; 32];
        let mut sig_a_again = [0u8; 32];
        let mut sig_b = [0u8; 32];
        a.sign(b"connection id", &mut sig_a);
        a_again.sign(b"connection id", &mut sig_a_again);
        b.sign(b"connection id", &mut sig_b);
        assert_eq!(sig_a, sig_a_again, "same key after a restart");
        assert_ne!(
            sig_a, sig_b,
            "another certificate key gives another reset key"
        );
        assert!(a.verify(b"connection id", &sig_a).is_ok());
        let mut bad = sig_a;
        bad[31] ^= 1;
        assert!(a.verify(b"connection id", &bad).is_err());
        assert!(a.verify(b"connection id", &sig_a[..31]).is_err());
        assert!(a.verify(b"another id", &sig_a).is_err());
    }
}
