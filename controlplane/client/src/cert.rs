//! What enrollment and renewal hand back ([`Issued`]), and the checks every freshly issued leaf
//! goes through before it is believed: it carries OUR public key, exactly one identity URI, the
//! identity the controller said it chose, and it verifies as a client certificate under the CA
//! we trust. A controller that answers with anything else is treated as broken, not trusted.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outrelay_proto::identity::{Identity, IdentityError};
use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// A certificate issued by the controller, with the private key generated here.
///
/// The key never left this process; `key_pem` is wiped from memory when dropped.
#[derive(Clone)]
pub struct Issued {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The leaf's private key (PKCS#8 PEM, ECDSA P-256).
    pub key_pem: Zeroizing<String>,
    /// The controller's CA certificate, PEM (its SHA-256 was checked against the pin).
    pub ca_pem: String,
    /// The identity in the leaf's URI SAN.
    pub identity: Identity,
    /// The leaf's `notAfter`.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("identity", &self.identity.to_string())
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// No `CERTIFICATE` PEM block, or a broken one.
    #[error("no PEM certificate: {0}")]
    Pem(String),
    /// The DER inside is not an X.509 certificate.
    #[error("certificate does not parse: {0}")]
    Parse(String),
    /// The URI SAN is missing, repeated, or not an OutRelay identity.
    #[error("certificate identity: {0}")]
    Identity(#[from] IdentityError),
    /// A validity date before 1970 or a `notAfter` before `notBefore`.
    #[error("certificate validity dates are unusable")]
    Validity,
}

/// Why a certificate returned by the controller was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IssuedCheckError {
    /// The leaf or the CA does not parse.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The leaf certifies a public key other than the one in our CSR.
    #[error("the issued certificate is for another public key")]
    KeyMismatch,
    /// The identity in the leaf differs from the `identity` field of the answer, or (renewal)
    /// from the identity held before.
    #[error("the issued certificate names {got}, expected {expected}")]
    IdentityMismatch {
        /// What was expected.
        expected: String,
        /// What the leaf says.
        got: String,
    },
    /// The returned CA is not the pinned / trusted one.
    #[error("the controller answered with CA sha256 {got}, expected {expected}")]
    CaMismatch {
        /// The pinned fingerprint (hex).
        expected: String,
        /// The returned CA's fingerprint (hex).
        got: String,
    },
    /// The leaf does not verify as a client certificate under the CA (signature, dates, EKU).
    #[error("the issued certificate does not verify under the CA: {0}")]
    NotValidUnderCa(String),
}

/// Reads `notBefore` and `notAfter` of the first certificate in `cert_pem`.
///
/// # Errors
/// [`CertError`] when the PEM or the certificate does not parse.
pub fn validity(cert_pem: &str) -> Result<(SystemTime, SystemTime), CertError> {
    let der = first_der(cert_pem)?;
    Ok(inspect(&der)?.validity)
}

/// Lowercase hex SHA-256 of DER bytes (the token's fingerprint format).
pub(crate) fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The first certificate in a PEM text.
pub(crate) fn first_der(pem: &str) -> Result<CertificateDer<'static>, CertError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::Pem(e.to_string()))
}

/// The parts of a leaf we check.
pub(crate) struct LeafInfo {
    /// The raw subject public key (for EC: the uncompressed point).
    pub(crate) public_key: Vec<u8>,
    /// The identity in the URI SAN, strictly parsed.
    pub(crate) identity: Result<Identity, IdentityError>,
    /// (notBefore, notAfter).
    pub(crate) validity: (SystemTime, SystemTime),
}

pub(crate) fn inspect(der: &[u8]) -> Result<LeafInfo, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let mut uris: Vec<&str> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                uris.push(u);
            }
        }
    }
    let to_time = |secs: i64| -> Result<SystemTime, CertError> {
        let secs = u64::try_from(secs).map_err(|_| CertError::Validity)?;
        Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    let v = cert.validity();
    let validity = (
        to_time(v.not_before.timestamp())?,
        to_time(v.not_after.timestamp())?,
    );
    if validity.1 < validity.0 {
        return Err(CertError::Validity);
    }
    Ok(LeafInfo {
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        identity: Identity::from_uri_sans(uris),
        validity,
    })
}

/// Checks an answer from `Pki.Enroll` / `Pki.Renew` and assembles the [`Issued`].
///
/// `expected_ca_sha256` is the pin (enrollment) or the fingerprint of the CA used to connect
/// (renewal); `expected_identity` is `Some` on renewal (the identity must not change).
pub(crate) fn check_response(
    resp: outrelay_api::pb::CertificateResponse,
    key: &rcgen::KeyPair,
    expected_ca_sha256: &str,
    expected_identity: Option<&Identity>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Issued, IssuedCheckError> {
    let ca_der = first_der(&resp.ca_pem)?;
    let got = sha256_hex(&ca_der);
    if got != expected_ca_sha256 {
        return Err(IssuedCheckError::CaMismatch {
            expected: expected_ca_sha256.to_owned(),
            got,
        });
    }
    let leaf_der = first_der(&resp.cert_pem)?;
    let info = inspect(&leaf_der)?;
    if info.public_key != key.public_key_raw() {
        return Err(IssuedCheckError::KeyMismatch);
    }
    let identity = info.identity.map_err(CertError::from)?;
    let claimed = expected_identity
        .map(ToString::to_string)
        .unwrap_or_else(|| resp.identity.clone());
    if identity.to_string() != claimed || resp.identity != claimed {
        return Err(IssuedCheckError::IdentityMismatch {
            expected: claimed,
            got: identity.to_string(),
        });
    }
    verify_client_leaf(&leaf_der, ca_der, provider)
        .map_err(|e| IssuedCheckError::NotValidUnderCa(e.to_string()))?;
    Ok(Issued {
        cert_pem: resp.cert_pem,
        key_pem: Zeroizing::new(key.serialize_pem()),
        ca_pem: resp.ca_pem,
        identity,
        not_after: info.validity.1,
    })
}

/// Verifies `leaf` as a TLS client certificate chaining to `ca` alone (webpki: signature,
/// validity now, clientAuth EKU).
fn verify_client_leaf(
    leaf: &CertificateDer<'_>,
    ca: CertificateDer<'static>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    verifier.verify_client_cert(leaf, &[], UnixTime::now())?;
    Ok(())
}

/// A new ECDSA P-256 key and a CSR for it. The CSR names nothing: the controller chooses the
/// identity, and a CSR carrying another URI would be refused.
pub(crate) fn key_and_csr() -> Result<(rcgen::KeyPair, String), rcgen::Error> {
    key_and_csr_with(None, &[])
}

/// A CSR for `key_pem` (a new ECDSA P-256 key when `None`) asking for `names` (DNS names and
/// IPs) as SANs; the controller takes them only for relays.
pub(crate) fn key_and_csr_with(
    key_pem: Option<&str>,
    names: &[String],
) -> Result<(rcgen::KeyPair, String), rcgen::Error> {
    let key = match key_pem {
        Some(pem) => rcgen::KeyPair::from_pem(pem)?,
        None => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
    };
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// The crypto provider every connection in this crate uses.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
