//! `outrelay dev-pki`: a development CA and certificates, for tests and the quickstart. Never
//! for production: keys are written unencrypted next to each other.
//!
//! The directory is laid out so it can also be the controller's `--state-dir` (it looks for
//! `ca.pem` and `ca-key.pem` there), making the controller issue from the same CA.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Lifetime of development leaves.
pub const DEV_LEAF_DAYS: i64 = 30;
/// Lifetime of the development CA.
pub const DEV_CA_DAYS: i64 = 3650;

/// Fixed uuids for the two development agents (stable across runs, easy to write policies for).
pub const DEV_AGENT_UUIDS: [&str; 2] = [
    "00000000-0000-4000-8000-000000000001",
    "00000000-0000-4000-8000-000000000002",
];

/// (file stem, DNS names, identity URI, EKUs, description)
type Leaf = (&'static str, Vec<String>, Option<String>, Eku, String);

#[derive(Clone, Copy)]
enum Eku {
    Client,
    Server,
    Both,
}

/// Writes the PKI into `dir`; returns (file, description) pairs.
///
/// # Errors
/// An invalid root host, I/O or certificate errors.
pub fn write(dir: &Path, root_host: &str) -> anyhow::Result<Vec<(String, String)>> {
    anyhow::ensure!(
        !root_host.is_empty()
            && root_host.len() <= 253
            && root_host.split('.').all(outrelay_proto::identity::is_label),
        "--root-host `{root_host}` is not a lowercase DNS name"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let now = OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "OutRelay development CA");
    dn.push(DnType::OrganizationName, "OutRelay");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - Duration::minutes(5);
    ca.not_after = now + Duration::days(DEV_CA_DAYS);
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut files = Vec::new();
    put(dir, "ca.pem", ca_cert.pem().as_bytes(), 0o644)?;
    put(dir, "ca-key.pem", ca_key.serialize_pem().as_bytes(), 0o600)?;
    files.push((
        "ca.pem".to_owned(),
        "development CA certificate (ca-key.pem: its key)".to_owned(),
    ));
    let issuer = Issuer::new(ca, ca_key);

    let relay_uri = "outrelay://dev/relay/relay-1".to_owned();
    let admin_uri = "outrelay://system/admin/dev".to_owned();
    let wildcard = format!("*.{root_host}");
    let demo = format!("demo.{root_host}");
    let mut leaves: Vec<Leaf> = vec![
        (
            "controller",
            vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            None,
            Eku::Server,
            "controller gRPC server (localhost)".into(),
        ),
        (
            "relay",
            vec!["localhost".into(), "127.0.0.1".into()],
            Some(relay_uri.clone()),
            Eku::Both,
            relay_uri.clone(),
        ),
        (
            "admin",
            vec![],
            Some(admin_uri.clone()),
            Eku::Client,
            format!("{admin_uri} (global admin)"),
        ),
        (
            "root-host",
            vec![root_host.to_owned()],
            None,
            Eku::Server,
            root_host.to_owned(),
        ),
        (
            "wildcard",
            vec![wildcard.clone()],
            None,
            Eku::Server,
            wildcard.clone(),
        ),
        ("demo", vec![demo.clone()], None, Eku::Server, demo.clone()),
    ];
    for (i, uuid) in DEV_AGENT_UUIDS.iter().enumerate() {
        let uri = format!("outrelay://demo/agent/{uuid}");
        let name: &'static str = if i == 0 { "agent-1" } else { "agent-2" };
        leaves.push((name, vec![], Some(uri.clone()), Eku::Client, uri));
    }
    for (name, dns, uri, eku, what) in leaves {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(dns.clone())?;
        if let Some(u) = &uri {
            p.subject_alt_names
                .push(SanType::URI(u.as_str().try_into()?));
        }
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            uri.clone()
                .or_else(|| dns.first().cloned())
                .unwrap_or_else(|| name.to_owned()),
        );
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = match eku {
            Eku::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Eku::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Eku::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + Duration::days(DEV_LEAF_DAYS);
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &issuer)?;
        put(dir, &format!("{name}.pem"), cert.pem().as_bytes(), 0o644)?;
        put(
            dir,
            &format!("{name}-key.pem"),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        files.push((format!("{name}.pem"), what));
    }
    Ok(files)
}

fn put(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}
