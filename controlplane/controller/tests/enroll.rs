//! Idempotent enrollment (review M11) and relay names in relay leaves (review M10), against a
//! real controller process over real mTLS with a real SQLite file.

mod common;

use common::{Controller, csr};
use outrelay_api::pb::{self, pki_client::PkiClient};
use outrelay_controller::pki::LeafProfile;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tonic::Code;

const GLOBAL: &str = "outrelay://system/admin/ops";

/// A CSR for `key` asking for `names` as DNS/IP SANs.
fn csr_for(key: &rcgen::KeyPair, names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    rcgen::CertificateParams::new(names)
        .expect("params")
        .serialize_request(key)
        .expect("csr")
        .pem()
        .expect("pem")
}

fn new_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
}

/// The DNS names and IPs (as text) in a PEM leaf.
fn sans(cert_pem: &str) -> Vec<String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("der");
    let (_, c) = x509_parser::parse_x509_certificate(&der).expect("parse");
    let mut out = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => out.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    out.push(format!("{ip:?}"));
                }
                _ => {}
            }
        }
    }
    out
}

async fn token(c: &Controller, req: pb::CreateEnrollmentTokenRequest) -> String {
    let admin = c.cert(GLOBAL, LeafProfile::Client);
    PkiClient::new(c.channel(Some(&admin)).await)
        .create_enrollment_token(req)
        .await
        .expect("token")
        .into_inner()
        .token
}

fn relay_token_req() -> pb::CreateEnrollmentTokenRequest {
    pb::CreateEnrollmentTokenRequest {
        role: pb::EnrollRole::Relay as i32,
        relay_region: "eu-west".into(),
        relay_id: "r7".into(),
        ..Default::default()
    }
}

async fn enroll(
    c: &Controller,
    token: &str,
    csr_pem: String,
) -> Result<pb::CertificateResponse, tonic::Status> {
    PkiClient::new(c.channel(None).await)
        .enroll(pb::EnrollRequest {
            token: token.to_owned(),
            csr_pem,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn enroll_retry_with_the_same_key_returns_the_same_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let t = token(&c, relay_token_req()).await;
    let key = new_key();

    // A CSR that does not parse, or asks for a bad name, spends nothing.
    let e = enroll(&c, &t, "-----BEGIN CERTIFICATE REQUEST-----\njunk\n".into())
        .await
        .expect_err("malformed CSR");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = enroll(&c, &t, csr_for(&key, &["under_score.example"]))
        .await
        .expect_err("bad name");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let many: Vec<String> = (0..9).map(|i| format!("r{i}.example.test")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let e = enroll(&c, &t, csr_for(&key, &many))
        .await
        .expect_err("too many names");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());

    let csr_pem = csr_for(&key, &["relay.example.test", "192.0.2.7"]);
    let first = enroll(&c, &t, csr_pem.clone()).await.expect("enroll");
    assert_eq!(first.identity, "outrelay://eu-west/relay/r7");
    let names = sans(&first.cert_pem);
    assert!(
        names.iter().any(|n| n == "relay.example.test") && names.len() == 2,
        "relay names in the leaf: {names:?}"
    );
    // The first answer was "lost": the same token and key get the same certificate, byte for
    // byte, and nothing new is issued.
    let again = enroll(&c, &t, csr_for(&key, &["relay.example.test", "192.0.2.7"]))
        .await
        .expect("retry");
    assert_eq!(again.cert_pem, first.cert_pem, "byte-identical PEM");
    assert_eq!(again.identity, first.identity);
    assert_eq!(again.not_after_unix_ms, first.not_after_unix_ms);
    assert_eq!(again.ca_pem, first.ca_pem);
    // Another key with the spent token: refused.
    let e = enroll(&c, &t, csr(None)).await.expect_err("another key");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("already used"), "{}", e.message());
    assert_eq!(
        c.metric("outrelay_controller_certificates_issued_total{method=\"Pki.Enroll\"}")
            .await,
        1.0,
        "one issue for one token"
    );

    // Durable across a restart.
    let c = c.restart();
    let after = enroll(&c, &t, csr_pem).await.expect("retry after restart");
    assert_eq!(after.cert_pem, first.cert_pem);

    // Renewal keeps the relay's names (the renewal CSR asks for none).
    let me = (first.cert_pem.clone(), key.serialize_pem());
    let renewed = PkiClient::new(c.channel(Some(&me)).await)
        .renew(pb::RenewRequest { csr_pem: csr(None) })
        .await
        .expect("renew")
        .into_inner();
    assert_ne!(renewed.cert_pem, first.cert_pem);
    assert_eq!(sans(&renewed.cert_pem), names, "names kept by Pki.Renew");
}

#[tokio::test]
async fn agent_tokens_take_no_names() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let t = token(
        &c,
        pb::CreateEnrollmentTokenRequest {
            tenant: "acme".into(),
            role: pb::EnrollRole::Agent as i32,
            ..Default::default()
        },
    )
    .await;
    let cert = enroll(&c, &t, csr_for(&new_key(), &["relay.example.test"]))
        .await
        .expect("enroll");
    assert!(cert.identity.starts_with("outrelay://acme/agent/"));
    assert!(
        sans(&cert.cert_pem).is_empty(),
        "no DNS name in an agent leaf"
    );
}
