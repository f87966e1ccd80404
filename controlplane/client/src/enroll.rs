//! First contact with the controller: `Pki.Enroll` with a single-use token, the controller pinned
//! by the CA fingerprint the token carries.
//!
//! # Pinning
//! The enrollee has no trust store yet; all it knows is `SHA-256(CA certificate DER)` from the
//! token. The TLS handshake is accepted only when
//! 1. some certificate the controller presents (or the CA given in
//!    [`EnrollOptions::ca_pem`]) hashes to exactly that fingerprint, and
//! 2. the server's leaf verifies under that CA ALONE as trust anchor (webpki: signature chain,
//!    validity dates, serverAuth EKU, the URL's host name).
//!
//! A hash match alone is not enough (anyone can replay the public CA certificate next to their
//! own leaf), and a valid chain to some other CA is not enough either. There is no fallback: a
//! controller that presents only its leaf cannot be pinned without the CA certificate, so the
//! token is NOT sent and the error is [`PinError::CaNotPresented`]; a MITM never sees the token.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outrelay_api::pb::{self, pki_client::PkiClient};
use outrelay_proto::identity::Role;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use zeroize::Zeroizing;

use crate::cert::{self, CertError, Issued, IssuedCheckError};
use crate::tls::{self, ConnectFailure, HttpsUrl, UrlError};

/// The token format version this client understands (`ort1.<secret>.<fingerprint>`).
pub const TOKEN_PREFIX: &str = "ort1";
/// Bytes of secret in a token (hex-encoded: twice as many characters).
pub const TOKEN_SECRET_BYTES: usize = 32;
/// Default deadline for connecting and for the Enroll call.
pub const ENROLL_TIMEOUT_MS: u64 = 15_000;

/// A parsed enrollment token. `Debug` never shows the secret.
#[derive(Clone)]
pub struct Token {
    text: Zeroizing<String>,
    ca_sha256: [u8; 32],
}

/// Why a token was refused before any network traffic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three dot-separated parts.
    #[error("enrollment token must be `{TOKEN_PREFIX}.<secret>.<ca sha256>`")]
    Shape,
    /// An unknown format version.
    #[error("enrollment token has an unknown prefix (expected `{TOKEN_PREFIX}`)")]
    Prefix,
    /// The secret is not 64 lowercase hex digits.
    #[error("enrollment token secret must be {} lowercase hex digits", TOKEN_SECRET_BYTES * 2)]
    Secret,
    /// The fingerprint is not 64 lowercase hex digits.
    #[error("enrollment token CA fingerprint must be 64 lowercase hex digits")]
    Fingerprint,
}

/// Why the controller's certificate was not accepted (the token was not sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// No certificate presented by the controller (nor the CA given in the options) has the
    /// token's fingerprint. Also the outcome for a controller that sends only its leaf.
    #[error(
        "the controller did not present the CA pinned by the token (sha256 {expected_sha256}); presented: [{}]",
        presented_sha256.join(", ")
    )]
    CaNotPresented {
        /// The token's fingerprint.
        expected_sha256: String,
        /// SHA-256 of every certificate presented, leaf first.
        presented_sha256: Vec<String>,
    },
    /// The pinned CA is there, but the server's leaf does not verify under it (another
    /// signer, expired, wrong name or EKU).
    #[error("the controller's certificate does not verify under the pinned CA: {0}")]
    ServerCert(String),
}

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The token is malformed (nothing was sent).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The controller URL is not `https://host:port` (nothing was sent).
    #[error(transparent)]
    Url(#[from] UrlError),
    /// [`EnrollOptions::ca_pem`] does not parse.
    #[error("CA certificate: {0}")]
    CaPem(CertError),
    /// [`EnrollOptions::ca_pem`] is not the CA the token pins (nothing was sent).
    #[error("the CA certificate given has sha256 {got}, the token pins {expected}")]
    CaNotPinned {
        /// The token's fingerprint.
        expected: String,
        /// The given CA's.
        got: String,
    },
    /// Generating the key or the CSR failed.
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
    /// The controller was refused by pinning (the token was not sent).
    #[error(transparent)]
    Pin(PinError),
    /// TCP/TLS failure or timeout that is not a pinning decision.
    #[error("connect to {url}: {source}")]
    Connect {
        /// The controller URL.
        url: String,
        /// What failed.
        source: ConnectFailure,
    },
    /// The controller answered the call with an error (unknown, used or expired token, ...).
    #[error("controller refused enrollment ({code:?}): {message}")]
    Refused {
        /// The gRPC status code.
        code: tonic::Code,
        /// The controller's message.
        message: String,
    },
    /// The certificate returned does not pass the checks in [`crate::cert`].
    #[error(transparent)]
    BadCertificate(#[from] IssuedCheckError),
    /// The token enrolled a different role than the caller expects (e.g. a relay token given
    /// to an agent).
    #[error("this token enrolls {got}, expected a {expected} identity")]
    WrongRole {
        /// The role asked for in [`EnrollOptions::role`].
        expected: &'static str,
        /// The identity issued.
        got: String,
    },
}

/// Options for [`enroll`].
#[derive(Clone)]
pub struct EnrollOptions {
    /// The role the caller is (agents pass `Some(Role::Agent)`, relays `Some(Role::Relay)`).
    /// A certificate for another role is refused after issuance (and the token is spent).
    pub role: Option<Role>,
    /// The CA certificate (PEM), when the operator has it out of band. It must hash to the
    /// token's fingerprint; it is then the only trust anchor, and the controller need not
    /// present it in its chain.
    pub ca_pem: Option<String>,
    /// Deadline for connecting, and again for the call.
    pub timeout: Duration,
    /// DNS names and IPs asked for as SANs (relays: the names agents dial; the controller
    /// ignores them for agents).
    pub names: Vec<String>,
    /// The private key (PKCS#8 PEM) to enroll, instead of a new one: a caller that keeps the
    /// key until the certificate is saved can retry after a lost answer, and the controller
    /// returns the same certificate for the same token and key.
    pub key_pem: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for EnrollOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollOptions")
            .field("role", &self.role)
            .field("ca_pem", &self.ca_pem.is_some())
            .field("timeout", &self.timeout)
            .field("names", &self.names)
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for EnrollOptions {
    fn default() -> Self {
        EnrollOptions {
            role: None,
            ca_pem: None,
            timeout: Duration::from_millis(ENROLL_TIMEOUT_MS),
            names: Vec::new(),
            key_pem: None,
        }
    }
}

impl Token {
    /// Parses `ort1.<64 hex secret>.<64 hex CA sha256>` (surrounding whitespace ignored).
    ///
    /// # Errors
    /// The first [`TokenError`] found.
    pub fn parse(text: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        let mut parts = text.split('.');
        let (Some(prefix), Some(secret), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Shape);
        };
        if prefix != TOKEN_PREFIX {
            return Err(TokenError::Prefix);
        }
        if !is_lower_hex(secret, TOKEN_SECRET_BYTES * 2) {
            return Err(TokenError::Secret);
        }
        if !is_lower_hex(fp, 64) {
            return Err(TokenError::Fingerprint);
        }
        let mut ca_sha256 = [0u8; 32];
        hex::decode_to_slice(fp, &mut ca_sha256).map_err(|_| TokenError::Fingerprint)?;
        Ok(Token {
            text: Zeroizing::new(text.to_owned()),
            ca_sha256,
        })
    }

    /// The pinned CA fingerprint, lowercase hex.
    pub fn ca_sha256_hex(&self) -> String {
        hex::encode(self.ca_sha256)
    }
}

impl std::str::FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Token::parse(s)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("ca_sha256", &self.ca_sha256_hex())
            .finish_non_exhaustive()
    }
}

/// A new ECDSA P-256 private key (PKCS#8 PEM) for [`EnrollOptions::key_pem`].
///
/// # Errors
/// Key generation failures.
pub fn new_key_pem() -> Result<Zeroizing<String>, rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    Ok(Zeroizing::new(key.serialize_pem()))
}

/// Enrolls with the controller at `controller_url` (`https://host:port`).
///
/// Generates an ECDSA P-256 key here, sends only a CSR, pins the controller (see the module
/// docs), and checks the answer: the leaf certifies our key, carries one identity URI equal to
/// the one the controller reports, verifies as a client certificate under the pinned CA, and
/// (with [`EnrollOptions::role`]) has the expected role.
///
/// # Errors
/// [`EnrollError`]; `Token`, `Url`, `CaPem` and `CaNotPinned` are decided before any network
/// traffic, `Pin` before the token is sent.
pub async fn enroll(
    controller_url: &str,
    token: &str,
    opts: &EnrollOptions,
) -> Result<Issued, EnrollError> {
    let token = Token::parse(token)?;
    let url = HttpsUrl::parse(controller_url)?;
    let provider = cert::provider();
    let fixed_ca = match &opts.ca_pem {
        None => None,
        Some(pem) => {
            let der = cert::first_der(pem).map_err(EnrollError::CaPem)?;
            let got = cert::sha256_hex(&der);
            if got != token.ca_sha256_hex() {
                return Err(EnrollError::CaNotPinned {
                    expected: token.ca_sha256_hex(),
                    got,
                });
            }
            Some(der)
        }
    };
    let verifier = Arc::new(PinnedCaVerifier::new(
        token.ca_sha256,
        fixed_ca,
        provider.clone(),
    ));
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| EnrollError::Connect {
            url: controller_url.to_owned(),
            source: ConnectFailure::Transport(e.to_string()),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let (key, csr_pem) =
        cert::key_and_csr_with(opts.key_pem.as_ref().map(|k| k.as_str()), &opts.names)?;
    let channel = match tls::channel(&url, cfg, opts.timeout).await {
        Ok(ch) => ch,
        Err(source) => {
            // The verifier's own verdict is the precise reason; the transport error only
            // carries rustls' generic one.
            if let Some(pin) = verifier.failure() {
                return Err(EnrollError::Pin(pin));
            }
            return Err(EnrollError::Connect {
                url: controller_url.to_owned(),
                source,
            });
        }
    };
    let mut req = tonic::Request::new(pb::EnrollRequest {
        token: token.text.to_string(),
        csr_pem,
    });
    req.set_timeout(opts.timeout);
    let resp = PkiClient::new(channel)
        .enroll(req)
        .await
        .map_err(|s| EnrollError::Refused {
            code: s.code(),
            message: s.message().to_owned(),
        })?
        .into_inner();
    let issued = cert::check_response(resp, &key, &token.ca_sha256_hex(), None, &provider)?;
    if let Some(role) = opts.role
        && issued.identity.role() != role
    {
        return Err(EnrollError::WrongRole {
            expected: role.as_str(),
            got: issued.identity.to_string(),
        });
    }
    Ok(issued)
}

/// The pinning verifier described in the module docs. Records its refusal so that
/// [`enroll`] can return a typed [`PinError`] instead of a transport error string.
#[derive(Debug)]
pub(crate) struct PinnedCaVerifier {
    ca_sha256: [u8; 32],
    /// Built once when the CA is known up front ([`EnrollOptions::ca_pem`]).
    fixed: Option<Arc<WebPkiServerVerifier>>,
    fixed_error: Option<String>,
    provider: Arc<CryptoProvider>,
    failure: Mutex<Option<PinError>>,
}

impl PinnedCaVerifier {
    pub(crate) fn new(
        ca_sha256: [u8; 32],
        fixed_ca: Option<CertificateDer<'static>>,
        provider: Arc<CryptoProvider>,
    ) -> PinnedCaVerifier {
        let (fixed, fixed_error) = match fixed_ca.map(|ca| anchored_verifier(ca, &provider)) {
            None => (None, None),
            Some(Ok(v)) => (Some(v), None),
            Some(Err(e)) => (None, Some(e)),
        };
        PinnedCaVerifier {
            ca_sha256,
            fixed,
            fixed_error,
            provider,
            failure: Mutex::new(None),
        }
    }

    /// The last refusal, if any.
    pub(crate) fn failure(&self) -> Option<PinError> {
        self.failure.lock().ok().and_then(|g| g.clone())
    }

    fn refuse(&self, e: PinError, tls: rustls::Error) -> rustls::Error {
        if let Ok(mut g) = self.failure.lock() {
            *g = Some(e);
        }
        tls
    }
}

/// A webpki server verifier whose only trust anchor is `ca`.
fn anchored_verifier(
    ca: CertificateDer<'static>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| e.to_string())?;
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| e.to_string())
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let unknown_issuer =
            || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        if let Some(e) = &self.fixed_error {
            return Err(self.refuse(PinError::ServerCert(e.clone()), unknown_issuer()));
        }
        let verifier = match &self.fixed {
            Some(v) => v.clone(),
            None => {
                // Only chain certificates are candidates: a leaf that IS the CA certificate is
                // refused (webpki would refuse it too, as a CA used as end entity).
                let found = intermediates
                    .iter()
                    .find(|c| cert::sha256_hex(c) == hex::encode(self.ca_sha256));
                let Some(ca) = found else {
                    let presented_sha256 = std::iter::once(end_entity)
                        .chain(intermediates)
                        .map(|c| cert::sha256_hex(c))
                        .collect();
                    return Err(self.refuse(
                        PinError::CaNotPresented {
                            expected_sha256: hex::encode(self.ca_sha256),
                            presented_sha256,
                        },
                        unknown_issuer(),
                    ));
                };
                match anchored_verifier(ca.clone().into_owned(), &self.provider) {
                    Ok(v) => v,
                    Err(e) => return Err(self.refuse(PinError::ServerCert(e), unknown_issuer())),
                }
            }
        };
        verifier
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| self.refuse(PinError::ServerCert(e.to_string()), e))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const SECRET: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    #[test]
    fn parses_tokens_and_names_each_defect() {
        let t = Token::parse(&format!(" ort1.{SECRET}.{FP}\n")).expect("token");
        assert_eq!(t.ca_sha256_hex(), FP);
        assert!(!format!("{t:?}").contains(SECRET), "Debug leaks the secret");
        let cases = [
            (String::new(), TokenError::Shape),
            (format!("ort1.{SECRET}"), TokenError::Shape),
            (format!("ort1.{SECRET}.{FP}.x"), TokenError::Shape),
            (format!("ort2.{SECRET}.{FP}"), TokenError::Prefix),
            (format!("ort1.{}.{FP}", &SECRET[1..]), TokenError::Secret),
            (
                format!("ort1.{}.{FP}", SECRET.to_uppercase()),
                TokenError::Secret,
            ),
            (
                format!("ort1.{SECRET}.{}", &FP[..62]),
                TokenError::Fingerprint,
            ),
            (
                format!("ort1.{SECRET}.{}g", &FP[..63]),
                TokenError::Fingerprint,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Token::parse(&text).err(), Some(want), "{text:?}");
        }
    }

    #[tokio::test]
    async fn malformed_token_fails_before_any_network() {
        // Port 1 on a documentation address: any connection attempt would hang or fail
        // differently; the token error must come first.
        let e = enroll(
            "https://192.0.2.1:1",
            "ort1.zz.zz",
            &EnrollOptions::default(),
        )
        .await
        .expect_err("malformed");
        assert!(matches!(e, EnrollError::Token(TokenError::Secret)), "{e}");
        let e = enroll(
            "unix:///x",
            &format!("ort1.{SECRET}.{FP}"),
            &EnrollOptions::default(),
        )
        .await
        .expect_err("url");
        assert!(matches!(e, EnrollError::Url(UrlError::NotHttps(_))), "{e}");
    }

    struct Pki {
        ca_der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Pki {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).expect("ca");
        Pki {
            ca_der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    fn server_leaf(pki: &Pki, name: &str, expired: bool) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = CertificateParams::new(vec![name.to_owned()]).expect("params");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if expired {
            p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(3);
            p.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        }
        p.signed_by(&key, &pki.issuer).expect("leaf").der().clone()
    }

    fn fp(der: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(cert::sha256_hex(der), &mut out).expect("hex");
        out
    }

    fn verify(
        v: &PinnedCaVerifier,
        leaf: &CertificateDer<'static>,
        chain: &[CertificateDer<'static>],
        name: &str,
    ) -> Result<(), PinError> {
        let name = ServerName::try_from(name.to_owned()).expect("name");
        match v.verify_server_cert(leaf, chain, &name, &[], UnixTime::now()) {
            Ok(_) => Ok(()),
            Err(_) => Err(v.failure().expect("a refusal is recorded")),
        }
    }

    #[test]
    fn pinning_needs_the_fingerprint_and_a_valid_chain_to_it() {
        let real = ca("real");
        let evil = ca("evil");
        let pin = fp(&real.ca_der);
        let p = cert::provider();
        let good = server_leaf(&real, "127.0.0.1", false);
        let v = || PinnedCaVerifier::new(pin, None, p.clone());

        verify(&v(), &good, std::slice::from_ref(&real.ca_der), "127.0.0.1").expect("pinned chain");
        // Leaf only: the CA cannot be checked, so nothing is trusted.
        assert!(matches!(
            verify(&v(), &good, &[], "127.0.0.1"),
            Err(PinError::CaNotPresented { .. })
        ));
        // A chain to another CA, however valid, is not the pinned one.
        let evil_leaf = server_leaf(&evil, "127.0.0.1", false);
        assert!(matches!(
            verify(
                &v(),
                &evil_leaf,
                std::slice::from_ref(&evil.ca_der),
                "127.0.0.1"
            ),
            Err(PinError::CaNotPresented { .. })
        ));
        // Replaying the real (public) CA certificate next to a leaf it did not sign.
        assert!(matches!(
            verify(
                &v(),
                &evil_leaf,
                std::slice::from_ref(&real.ca_der),
                "127.0.0.1"
            ),
            Err(PinError::ServerCert(_))
        ));
        // The CA certificate itself as the leaf.
        assert!(
            verify(
                &v(),
                &real.ca_der,
                std::slice::from_ref(&real.ca_der),
                "127.0.0.1"
            )
            .is_err()
        );
        // Expired leaf, wrong name.
        let old = server_leaf(&real, "127.0.0.1", true);
        assert!(matches!(
            verify(&v(), &old, std::slice::from_ref(&real.ca_der), "127.0.0.1"),
            Err(PinError::ServerCert(_))
        ));
        assert!(matches!(
            verify(
                &v(),
                &good,
                std::slice::from_ref(&real.ca_der),
                "ctl.example.com"
            ),
            Err(PinError::ServerCert(_))
        ));
        // With the CA given out of band, a leaf-only chain verifies, and only under that CA.
        let fixed = PinnedCaVerifier::new(pin, Some(real.ca_der.clone()), p.clone());
        verify(&fixed, &good, &[], "127.0.0.1").expect("out-of-band CA");
        assert!(matches!(
            verify(
                &fixed,
                &evil_leaf,
                std::slice::from_ref(&evil.ca_der),
                "127.0.0.1"
            ),
            Err(PinError::ServerCert(_))
        ));
    }
}
