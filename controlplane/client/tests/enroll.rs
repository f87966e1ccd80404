//! Enrollment, pinning and renewal against a real `outrelay-controller` process (mTLS on
//! 127.0.0.1:0, a real SQLite file, a CA written here into its state directory).
//!
//! Build the controller first: `cargo build --release -p outrelay-controller`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

use outrelay_api::pb::{self, pki_client::PkiClient};
use outrelay_client::{
    EnrollError, EnrollOptions, IdentityStore, PinError, Reloadable, Target, TokenError, enroll,
    renew, renew_at, renewal_loop,
};
use outrelay_proto::identity::{Identity, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject as _;

struct Controller {
    child: Child,
    url: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn controller_bin() -> PathBuf {
    // target/release/deps/enroll-<hash> → target/release/outrelay-controller
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("outrelay-controller");
    assert!(
        p.exists(),
        "{} missing: build it first with `cargo build --release -p outrelay-controller`",
        p.display()
    );
    p
}

/// A CA in `state/` (the controller loads it instead of creating one), an admin client
/// certificate, and a server chain `[leaf, CA]` for the controller to present.
struct TestPki {
    state: PathBuf,
    ca_pem: String,
}

fn key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key")
}

fn write_pki(dir: &Path) -> TestPki {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    let ca_key = key();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "client test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
    std::fs::write(state.join("ca.pem"), &ca_pem).expect("ca.pem");
    std::fs::write(state.join("ca-key.pem"), ca_key.serialize_pem()).expect("ca-key");
    std::fs::set_permissions(
        state.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let issuer = Issuer::new(ca, ca_key);

    let server_key = key();
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("params");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_pem = server
        .signed_by(&server_key, &issuer)
        .expect("server")
        .pem();
    std::fs::write(dir.join("server-chain.pem"), server_pem + &ca_pem).expect("chain");
    std::fs::write(dir.join("server-key.pem"), server_key.serialize_pem()).expect("key");

    let admin_key = key();
    let mut admin = CertificateParams::new(Vec::<String>::new()).expect("params");
    admin.subject_alt_names.push(SanType::URI(
        "outrelay://system/admin/test".try_into().expect("ia5"),
    ));
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    std::fs::write(
        dir.join("admin.pem"),
        admin.signed_by(&admin_key, &issuer).expect("admin").pem(),
    )
    .expect("admin");
    std::fs::write(dir.join("admin-key.pem"), admin_key.serialize_pem()).expect("admin key");
    TestPki { state, ca_pem }
}

/// Starts the controller. `full_chain`: present `[leaf, CA]` (pinnable); else let it self-issue
/// a leaf-only server certificate, as a controller with no `[tls]` section does.
fn start(dir: &Path, pki: &TestPki, full_chain: bool, extra: &str) -> Controller {
    let config = dir.join("controller.toml");
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let tls = if full_chain {
        format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            dir.join("server-chain.pem").display().to_string(),
            dir.join("server-key.pem").display().to_string()
        )
    } else {
        String::new()
    };
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[grpc]\nlisten = \"127.0.0.1:0\"\n{tls}[admin]\nsocket_path = \"\"\n[metrics]\nlisten = \"\"\n{extra}",
            pki.state.display().to_string(),
        ),
    )
    .expect("config");
    let child = Command::new(controller_bin())
        .args(["--log", "warn", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .spawn()
        .expect("spawn controller");
    let mut c = Controller {
        child,
        url: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    c.url = loop {
        if let Ok(text) = std::fs::read_to_string(&ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            break format!("https://{}", v["grpc"].as_str().expect("grpc"));
        }
        assert!(Instant::now() < deadline, "controller not ready");
        if let Ok(Some(st)) = c.child.try_wait() {
            panic!("controller exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    c
}

async fn token(c: &Controller, dir: &Path, tenant: &str) -> String {
    token_for(c, dir, agent_token(tenant)).await
}

fn agent_token(tenant: &str) -> pb::CreateEnrollmentTokenRequest {
    pb::CreateEnrollmentTokenRequest {
        tenant: tenant.to_owned(),
        role: pb::EnrollRole::Agent as i32,
        ..Default::default()
    }
}

async fn token_for(c: &Controller, dir: &Path, req: pb::CreateEnrollmentTokenRequest) -> String {
    let ch = outrelay_client::connect(&Target {
        url: c.url.clone(),
        cert: Some(dir.join("admin.pem")),
        key: Some(dir.join("admin-key.pem")),
        ca: Some(dir.join("state/ca.pem")),
    })
    .await
    .expect("admin channel");
    PkiClient::new(ch)
        .create_enrollment_token(req)
        .await
        .expect("token")
        .into_inner()
        .token
}

fn agent_opts() -> EnrollOptions {
    EnrollOptions {
        role: Some(Role::Agent),
        ..EnrollOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_store_replay_pin_and_renew() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = write_pki(dir.path());
    let c = start(dir.path(), &pki, true, "");

    // Enroll: the controller chooses a fresh agent identity in the token's tenant.
    let tok = token(&c, dir.path(), "acme").await;
    let issued = enroll(&c.url, &tok, &agent_opts()).await.expect("enroll");
    let Identity::Agent { tenant, .. } = &issued.identity else {
        panic!("not an agent: {}", issued.identity);
    };
    assert_eq!(tenant.as_str(), "acme");
    assert!(
        issued
            .identity
            .to_string()
            .starts_with("outrelay://acme/agent/")
    );
    assert_eq!(issued.ca_pem.trim(), pki.ca_pem.trim());
    assert!(issued.not_after > SystemTime::now());

    // Files, key mode 0600, and they load back.
    let store = IdentityStore::new(dir.path().join("agent-state"));
    store.save(&issued).expect("save");
    let mode = std::fs::metadata(store.key_path())
        .expect("key.pem")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(store.cert_path().exists() && store.ca_path().exists());
    assert_eq!(store.load().expect("load").identity, issued.identity);

    // The same token again: spent.
    let e = enroll(&c.url, &tok, &agent_opts())
        .await
        .expect_err("replay");
    match &e {
        EnrollError::Refused { message, .. } => {
            assert!(message.contains("already used"), "{e}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A fresh token with one hex digit of its fingerprint changed: refused by pinning on the
    // client (a `Pin` error, not the controller's own `Refused`), and the real token still works.
    let tok2 = token(&c, dir.path(), "acme").await;
    let altered = flip_last_hex(&tok2);
    let e = enroll(&c.url, &altered, &agent_opts())
        .await
        .expect_err("altered pin");
    assert!(
        matches!(e, EnrollError::Pin(PinError::CaNotPresented { .. })),
        "{e:?}"
    );
    enroll(&c.url, &tok2, &agent_opts())
        .await
        .expect("the token was never sent to the unpinned peer, so it still works");

    // A relay token given to an agent: issued (the token is spent), but not accepted.
    let relay_tok = token_for(
        &c,
        dir.path(),
        pb::CreateEnrollmentTokenRequest {
            role: pb::EnrollRole::Relay as i32,
            relay_region: "eu".to_owned(),
            relay_id: "r1".to_owned(),
            ..Default::default()
        },
    )
    .await;
    let e = enroll(&c.url, &relay_tok, &agent_opts())
        .await
        .expect_err("relay token for an agent");
    assert!(
        matches!(
            e,
            EnrollError::WrongRole {
                expected: "agent",
                ..
            }
        ),
        "{e:?}"
    );

    // A malformed token: typed error, no network.
    let e = enroll(&c.url, "ort1.nothex.abc", &agent_opts())
        .await
        .expect_err("malformed");
    assert!(matches!(e, EnrollError::Token(TokenError::Secret)), "{e:?}");

    // Renew with the enrolled identity: same URI, new key, new certificate.
    let renewed = renew(&store.target(&c.url)).await.expect("renew");
    assert_eq!(renewed.identity, issued.identity);
    assert_ne!(*renewed.key_pem, *issued.key_pem);
    assert_ne!(renewed.cert_pem, issued.cert_pem);
    store.save(&renewed).expect("save renewed");
    assert_eq!(store.load().expect("load").cert_pem, renewed.cert_pem);
    // And the renewed files work for the next renewal.
    let again = renew(&store.target(&c.url)).await.expect("renew again");
    assert_eq!(again.identity, issued.identity);

    // renew_at of a real leaf (24 h + 5 min backdate): 70 % in.
    let at = renew_at(&renewed.cert_pem).expect("renew_at");
    let in_s = at
        .duration_since(SystemTime::now())
        .expect("in the future")
        .as_secs();
    let expected_s = (86_400 + 300) * 7 / 10 - 300;
    assert!(in_s.abs_diff(expected_s) < 120, "renew in {in_s} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_controller_presents_its_ca_and_an_out_of_band_ca_is_checked() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = write_pki(dir.path());
    let c = start(dir.path(), &pki, false, "");
    let tok = token(&c, dir.path(), "acme").await;

    // A CA given out of band that is not the pinned one: refused before connecting.
    let other_ca = {
        let k = key();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.self_signed(&k).expect("ca").pem()
    };
    let e = enroll(
        &c.url,
        &tok,
        &EnrollOptions {
            ca_pem: Some(other_ca),
            ..agent_opts()
        },
    )
    .await
    .expect_err("wrong CA");
    assert!(matches!(e, EnrollError::CaNotPinned { .. }), "{e:?}");
    // The controller's self-issued server certificate comes with its CA, so the token alone
    // pins it. That this SAME token still works proves the first attempt never sent it (the
    // controller burns a token on first sight).
    let issued = enroll(&c.url, &tok, &agent_opts())
        .await
        .expect("enroll with the token alone");
    assert!(matches!(issued.identity, Identity::Agent { .. }));
    // The right CA given out of band also pins.
    let tok = token(&c, dir.path(), "acme").await;
    let issued = enroll(
        &c.url,
        &tok,
        &EnrollOptions {
            ca_pem: Some(pki.ca_pem.clone()),
            ..agent_opts()
        },
    )
    .await
    .expect("enroll with the CA given");
    assert!(matches!(issued.identity, Identity::Agent { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_loop_renews_saves_and_swaps() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = write_pki(dir.path());
    // 60 s leaves, backdated 300 s by the controller: past their 70 % mark when issued, so
    // the loop renews at once and then every RENEW_MIN_INTERVAL_MS.
    let c = start(dir.path(), &pki, true, "[pki]\nleaf_lifetime_s = 60\n");
    let tok = token(&c, dir.path(), "acme").await;
    let issued = enroll(&c.url, &tok, &agent_opts()).await.expect("enroll");
    let store = IdentityStore::new(dir.path().join("agent-state"));
    store.save(&issued).expect("save");
    let reloadable = Reloadable::new(&issued.cert_pem, &issued.key_pem).expect("reloadable");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(renewal_loop(
        store.clone(),
        c.url.clone(),
        Some(reloadable.clone()),
        move |i: &outrelay_client::Issued| {
            let _ = tx.send(i.clone());
        },
    ));
    let mut seen = vec![issued.cert_pem.clone()];
    for _ in 0..2 {
        let next = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("renewed within 30 s")
            .expect("loop alive");
        assert_eq!(next.identity, issued.identity);
        assert!(
            !seen.contains(&next.cert_pem),
            "a new certificate each time"
        );
        seen.push(next.cert_pem.clone());
        // Saved before the callback, and swapped into the resolver.
        assert_eq!(store.load().expect("load").cert_pem, next.cert_pem);
        let der = rustls::pki_types::CertificateDer::from_pem_slice(next.cert_pem.as_bytes())
            .expect("der");
        assert_eq!(reloadable.current().cert[0], der);
    }
    task.abort();
}

/// Changes the last hex digit of the token (the end of the CA fingerprint).
fn flip_last_hex(token: &str) -> String {
    let mut s = token.to_owned();
    let last = s.pop().expect("non-empty");
    s.push(if last == '0' { '1' } else { '0' });
    s
}
