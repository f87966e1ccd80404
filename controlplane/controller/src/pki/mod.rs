//! The certificate authority: ECDSA P-256, self-signed, 10 years, created at first start.
//!
//! The controller chooses every identity it signs: a CSR only supplies the public key, and a
//! CSR that names a different URI is refused. Agents get the clientAuth EKU only; relays get
//! serverAuth + clientAuth. All X.509 work is rcgen (building, CSR parsing) and x509-parser
//! (reading URI SANs); no cryptography is written here.

pub mod service;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use outrelay_proto::identity::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// CA lifetime.
pub const CA_LIFETIME_DAYS: i64 = 3650;
/// Issued leaves start this long in the past to tolerate clock skew.
pub const BACKDATE_S: i64 = 300;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing CA files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// rcgen refused to build or parse something.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CSR is not a valid, self-signed PKCS#10 request.
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    /// The CSR names an identity other than the one the controller chose.
    #[error("CSR names {requested}, but this enrollment is for {chosen}")]
    CsrIdentityMismatch {
        /// What the CSR asked for.
        requested: String,
        /// What the controller chose.
        chosen: String,
    },
    /// A certificate could not be parsed.
    #[error("certificate parse: {0}")]
    Parse(String),
    /// A relay name in the CSR is not a DNS name (RFC 1123) or an IP address, or there are
    /// too many.
    #[error("relay names: {0}")]
    BadName(String),
}

/// Most DNS names and IPs one relay certificate carries.
pub const RELAY_NAMES_MAX: usize = 8;

/// What the controller reads from a CSR before anything is written: the public key's hash
/// (idempotent enrollment) and the DNS names and IPs it asks for (used for relays only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrInfo {
    /// SHA-256 of the CSR's public key bytes, lowercase hex.
    pub spki_sha256: String,
    /// The DNS and IP SANs, validated ([`relay_names`]), lowercase, deduplicated, in order.
    pub names: Vec<String>,
}

/// Parses and checks a CSR (signature, SAN kinds, names) without issuing anything.
///
/// # Errors
/// [`PkiError::BadCsr`] or [`PkiError::BadName`].
pub fn inspect_csr(csr_pem: &str) -> Result<CsrInfo, PkiError> {
    use rcgen::PublicKeyData as _;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::BadCsr(e.to_string()))?;
    let mut names = Vec::new();
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::DnsName(n) => names.push(n.as_str().to_owned()),
            SanType::IpAddress(ip) => names.push(ip.to_string()),
            SanType::URI(_) => {}
            other => return Err(PkiError::BadCsr(format!("unsupported SAN {other:?}"))),
        }
    }
    Ok(CsrInfo {
        spki_sha256: hex::encode(Sha256::digest(csr.public_key.der_bytes())),
        names: relay_names(&names)?,
    })
}

/// Validates relay names: at most [`RELAY_NAMES_MAX`], each an IP address or a DNS host name
/// per RFC 1123 (labels of 1..=63 letters, digits and inner hyphens, at most 253 characters,
/// no wildcard, no trailing dot). Returns them lowercased and deduplicated.
///
/// # Errors
/// [`PkiError::BadName`] naming the first bad one.
pub fn relay_names(names: &[String]) -> Result<Vec<String>, PkiError> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        let n = n.to_ascii_lowercase();
        let ok = n.parse::<std::net::IpAddr>().is_ok() || is_dns_name(&n);
        if !ok {
            return Err(PkiError::BadName(format!(
                "`{n}` is neither a DNS host name (RFC 1123) nor an IP address"
            )));
        }
        if !out.contains(&n) {
            out.push(n);
        }
    }
    if out.len() > RELAY_NAMES_MAX {
        return Err(PkiError::BadName(format!(
            "{} names, at most {RELAY_NAMES_MAX}",
            out.len()
        )));
    }
    Ok(out)
}

fn is_dns_name(n: &str) -> bool {
    n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// The loaded CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
}

/// A certificate issued by [`Ca::issue`].
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, PEM.
    pub cert_pem: String,
    /// Serial number, hex.
    pub serial_hex: String,
    /// Expiry.
    pub not_after_unix_ms: i64,
}

/// Which EKUs a leaf gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafProfile {
    /// clientAuth only (agents, admins).
    Client,
    /// serverAuth + clientAuth (relays).
    ClientServer,
    /// serverAuth only (the controller, public names).
    Server,
}

impl Ca {
    /// Loads `ca.pem` / `ca-key.pem` from `dir`, creating both (key mode 0600) when neither
    /// exists.
    ///
    /// # Errors
    /// I/O errors, unparseable files, or only one of the two files present.
    pub fn load_or_create(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert_pem = read(&cert_path)?;
                let key_pem = read(&key_path)?;
                Ca::from_pem(&cert_pem, &key_pem)
            }
            (false, false) => {
                let (cert_pem, key_pem) = new_ca_pem("OutRelay CA")?;
                write_file(&key_path, key_pem.as_bytes(), 0o600)?;
                write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
                Ca::from_pem(&cert_pem, &key_pem)
            }
            _ => Err(PkiError::Io {
                path: dir.to_owned(),
                source: std::io::Error::other("only one of ca.pem and ca-key.pem exists"),
            }),
        }
    }

    /// A CA from PEM text.
    ///
    /// # Errors
    /// Unparseable certificate or key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        let cert_der = pem_to_der(cert_pem)?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert_der,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate's DER, lowercase hex.
    pub fn fingerprint_hex(&self) -> String {
        hex::encode(Sha256::digest(&self.cert_der))
    }

    /// Issues a leaf for `identity` with the public key of `csr_pem`. The CSR's own subject
    /// and extensions are ignored, except that any URI SAN it carries must equal `identity`.
    /// `names` (DNS names and IPs, already validated with [`relay_names`]) become DNS/IP SANs;
    /// the caller passes them only for relays.
    ///
    /// # Errors
    /// [`PkiError::BadCsr`], [`PkiError::CsrIdentityMismatch`], or a signing failure.
    pub fn issue_from_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        names: &[String],
        profile: LeafProfile,
        lifetime_s: u64,
        now: OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let chosen = identity.to_string();
        for san in &csr.params.subject_alt_names {
            if let SanType::URI(uri) = san
                && uri.as_str() != chosen
            {
                return Err(PkiError::CsrIdentityMismatch {
                    requested: uri.as_str().to_owned(),
                    chosen,
                });
            }
        }
        let params = leaf_params(names, Some(&chosen), profile, lifetime_s, now)?;
        self.sign(&params, &csr.public_key)
    }

    /// Issues a leaf for a key pair generated here (development PKI and the controller's own
    /// server certificate).
    ///
    /// # Errors
    /// Signing failures.
    pub fn issue_with_key(
        &self,
        dns_names: &[String],
        uri: Option<&str>,
        profile: LeafProfile,
        lifetime_s: u64,
        now: OffsetDateTime,
    ) -> Result<(Issued, String), PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = leaf_params(dns_names, uri, profile, lifetime_s, now)?;
        let issued = self.sign(&params, &key)?;
        Ok((issued, key.serialize_pem()))
    }

    fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<Issued, PkiError> {
        let cert = params.signed_by(public_key, &self.issuer)?;
        let serial_hex = params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.to_bytes()))
            .unwrap_or_default();
        Ok(Issued {
            cert_pem: cert.pem(),
            serial_hex,
            // X.509 times have whole seconds: the expiry the certificate really carries.
            not_after_unix_ms: params.not_after.unix_timestamp().saturating_mul(1000),
        })
    }
}

/// A fresh self-signed CA: (cert PEM, key PEM).
///
/// # Errors
/// Key generation or signing failures.
pub fn new_ca_pem(common_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "OutRelay");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::seconds(BACKDATE_S);
    params.not_after = now + Duration::days(CA_LIFETIME_DAYS);
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The identity in a DER certificate's URI SANs (exactly one, strictly parsed).
///
/// # Errors
/// An unparseable certificate, or the identity parser's error.
pub fn identity_of_cert(der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let mut uris: Vec<&str> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                uris.push(u);
            }
        }
    }
    Identity::from_uri_sans(uris).map_err(|e| PkiError::Parse(e.to_string()))
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn leaf_params(
    dns_names: &[String],
    uri: Option<&str>,
    profile: LeafProfile,
    lifetime_s: u64,
    now: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    if let Some(uri) = uri {
        params.subject_alt_names.push(SanType::URI(uri.try_into()?));
    }
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        uri.map(str::to_owned)
            .or_else(|| dns_names.first().cloned())
            .unwrap_or_else(|| "outrelay".to_owned()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match profile {
        LeafProfile::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        LeafProfile::ClientServer => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        LeafProfile::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
    };
    params.not_before = now - Duration::seconds(BACKDATE_S);
    params.not_after = now + Duration::seconds(i64::try_from(lifetime_s).unwrap_or(i64::MAX));
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| PkiError::Io {
        path: PathBuf::from("getrandom"),
        source: std::io::Error::other(e.to_string()),
    })?;
    // Positive, non-zero first byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| PkiError::Parse(e.to_string()))
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `bytes` to a new file created with `mode` (fails if it exists).
///
/// # Errors
/// I/O errors.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_the_chosen_identity_and_refuses_another() {
        let (cert, key) = new_ca_pem("test").expect("ca");
        let ca = Ca::from_pem(&cert, &key).expect("load");
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let id = Identity::parse("outrelay://acme/agent/0f8fad5b-d9cb-469f-a165-70867728950e")
            .expect("id");
        let csr = CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .serialize_request(&leaf_key)
            .expect("csr")
            .pem()
            .expect("pem");
        let now = OffsetDateTime::now_utc();
        let issued = ca
            .issue_from_csr(&csr, &id, &[], LeafProfile::Client, 3600, now)
            .expect("issue");
        let der = pem_to_der(&issued.cert_pem).expect("der");
        assert_eq!(identity_of_cert(&der).expect("identity"), id);

        let mut other = CertificateParams::new(Vec::<String>::new()).expect("params");
        other.subject_alt_names.push(SanType::URI(
            "outrelay://evil/agent/0f8fad5b-d9cb-469f-a165-70867728950e"
                .try_into()
                .expect("ia5"),
        ));
        let csr = other
            .serialize_request(&leaf_key)
            .expect("csr")
            .pem()
            .expect("pem");
        assert!(matches!(
            ca.issue_from_csr(&csr, &id, &[], LeafProfile::Client, 3600, now),
            Err(PkiError::CsrIdentityMismatch { .. })
        ));
    }

    #[test]
    fn relay_names_are_validated_and_become_sans() {
        let ok = relay_names(&[
            "Relay.Example.com".to_owned(),
            "relay.example.com".to_owned(),
            "192.0.2.7".to_owned(),
            "2001:db8::1".to_owned(),
            "localhost".to_owned(),
        ])
        .expect("valid");
        assert_eq!(
            ok,
            ["relay.example.com", "192.0.2.7", "2001:db8::1", "localhost"]
        );
        for bad in [
            "*.example.com",
            "-a.example.com",
            "a-.example.com",
            "a..b",
            "example.com.",
            "under_score.example",
            "",
        ] {
            assert!(
                matches!(relay_names(&[bad.to_owned()]), Err(PkiError::BadName(_))),
                "{bad:?}"
            );
        }
        let long = format!("{}.example", "a".repeat(64));
        assert!(relay_names(&[long]).is_err());
        let many: Vec<String> = (0..=RELAY_NAMES_MAX)
            .map(|i| format!("r{i}.test"))
            .collect();
        assert!(relay_names(&many).is_err());

        let (cert, key) = new_ca_pem("test").expect("ca");
        let ca = Ca::from_pem(&cert, &key).expect("load");
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = CertificateParams::new(vec!["relay.test".to_owned(), "127.0.0.1".to_owned()])
            .expect("params")
            .serialize_request(&leaf_key)
            .expect("csr")
            .pem()
            .expect("pem");
        let info = inspect_csr(&csr).expect("inspect");
        assert_eq!(info.names, ["relay.test", "127.0.0.1"]);
        let id = Identity::parse("outrelay://eu/relay/r1").expect("id");
        let issued = ca
            .issue_from_csr(
                &csr,
                &id,
                &info.names,
                LeafProfile::ClientServer,
                3600,
                OffsetDateTime::now_utc(),
            )
            .expect("issue");
        let der = pem_to_der(&issued.cert_pem).expect("der");
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let san = parsed
            .subject_alternative_name()
            .expect("san")
            .expect("present");
        let text = format!("{:?}", san.value.general_names);
        assert!(
            text.contains("relay.test") && text.contains("outrelay://eu/relay/r1"),
            "{text}"
        );
        assert!(inspect_csr("junk").is_err());
    }
}
