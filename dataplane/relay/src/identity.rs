//! The relay's own identity (review M10): enrollment, renewal and the hot swap.
//!
//! - `outrelay-relay enroll` ([`enroll`]): first contact with a `token create --role relay`
//!   token, the controller pinned by the token's CA fingerprint (the agent's code,
//!   [`outrelay_client::enroll()`]). The key is generated here and kept in
//!   `<state_dir>/.enroll-key.pem` (0600) until the certificate is saved, so running the same
//!   command again after a lost answer gets the same certificate back (the controller's Enroll
//!   is idempotent for one token and one key, review M11). The relay's DNS names and IPs go
//!   into the CSR; the controller puts them into the leaf so agents verify the relay by name.
//! - Renewal ([`renewal_loop`]): with `[tls] state_dir` and `[controller]`, `Pki.Renew` at 70 %
//!   of the leaf's lifetime over mTLS with the current certificate, with backoff on failure;
//!   the files are replaced atomically ([`outrelay_client::IdentityStore::save`]).
//! - Hot swap ([`LiveIdentity::reload`], after each renewal and on SIGHUP): the certificate is
//!   read from the files and served to new QUIC handshakes (the endpoint's resolver), used by
//!   new controller channels ([`crate::control::ControlTasks::relink`]), and the root host's
//!   `[public_tls]` files are read again; established connections keep what they have. A
//!   certificate for another identity is refused (a restart changes identities).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outrelay_client::{IdentityStore, Reloadable};
use outrelay_proto::identity::{Identity, Role};
use zeroize::Zeroizing;

use crate::ingress::root::{RootTls, RootTlsError};
use crate::quic::{QuicError, TlsMaterial, cert_identity, certified_key};

/// The key of an enrollment in progress (removed once the certificate is saved).
pub const PENDING_KEY_FILE: &str = ".enroll-key.pem";
/// First retry delay after a failed renewal.
pub const RETRY_INITIAL_MS: u64 = 1_000;
/// Longest retry delay.
pub const RETRY_MAX_MS: u64 = 60_000;
/// Least time between two successful renewals (a leaf issued past its own 70 % mark, e.g. a
/// very short one with the controller's 5 min backdating, would otherwise renew back to back).
pub const RENEW_MIN_INTERVAL_MS: u64 = 1_000;

/// The relay's certificate, key and CA files (`[tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// The controller CA.
    pub ca: PathBuf,
}

/// Why the identity could not be reloaded, renewed or enrolled.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The files do not make a usable certificate.
    #[error(transparent)]
    Quic(#[from] QuicError),
    /// The new certificate is another identity's.
    #[error("the certificate in {path} names {got}, this relay is {want}: not swapped")]
    OtherIdentity {
        /// The certificate file.
        path: PathBuf,
        /// The running relay's identity.
        want: String,
        /// The file's.
        got: String,
    },
    /// The root host's files do not load.
    #[error("public_tls: {0}")]
    Root(#[from] RootTlsError),
    /// `Pki.Renew` failed.
    #[error(transparent)]
    Renew(#[from] outrelay_client::RenewError),
    /// Enrollment failed.
    #[error(transparent)]
    Enroll(#[from] outrelay_client::EnrollError),
    /// The state directory could not be read or written.
    #[error(transparent)]
    Store(#[from] outrelay_client::StoreError),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Key generation failed.
    #[error("key generation: {0}")]
    Key(String),
}

/// The relay's certificate as served: swapped by [`LiveIdentity::reload`].
pub struct LiveIdentity {
    identity: Identity,
    files: IdentityFiles,
    quic: Arc<Reloadable>,
    root: Option<RootTls>,
    relink: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveIdentity")
            .field("identity", &self.identity.to_string())
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl LiveIdentity {
    /// The identity `identity` (the QUIC endpoint's), served by `quic`, read from `files`;
    /// `root` is the root host's TLS, `relink` makes later controller calls use the new
    /// certificate. Sets the expiry gauge.
    pub fn new(
        identity: Identity,
        files: IdentityFiles,
        quic: Arc<Reloadable>,
        root: Option<RootTls>,
        relink: Box<dyn Fn() + Send + Sync>,
    ) -> LiveIdentity {
        let live = LiveIdentity {
            identity,
            files,
            quic,
            root,
            relink,
        };
        if let Some(leaf) = live.quic.current().cert.first() {
            set_expiry_gauge(leaf.as_ref());
        }
        live
    }

    /// Reads the files again. A changed certificate (same identity) is served to new
    /// handshakes and new controller channels; the root host's `[public_tls]` files are read
    /// again too. Returns whether the relay certificate changed. On error nothing of the
    /// relay certificate changed.
    ///
    /// # Errors
    /// [`IdentityError`]: unreadable or mismatched files, another identity, or the root
    /// host's files (the relay certificate was then swapped already).
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let m = TlsMaterial::from_pem_files(&self.files.cert, &self.files.key, &self.files.ca)?;
        let leaf = m
            .cert_chain
            .first()
            .ok_or_else(|| QuicError::Tls("empty certificate chain".to_owned()))?
            .clone();
        let (identity, _) = cert_identity(&leaf)?;
        if identity != self.identity || identity.role() != Role::Relay {
            return Err(IdentityError::OtherIdentity {
                path: self.files.cert.clone(),
                want: self.identity.to_string(),
                got: identity.to_string(),
            });
        }
        let changed = self.quic.current().cert.first() != Some(&leaf);
        if changed {
            self.quic
                .swap_certified(certified_key(m.cert_chain, m.key)?);
            (self.relink)();
            set_expiry_gauge(leaf.as_ref());
            metrics::counter!("outrelay_relay_cert_swaps_total").increment(1);
            tracing::info!(identity = %self.identity, serial = %serial_hex(leaf.as_ref()), "relay certificate swapped");
        }
        if let Some(root) = &self.root {
            root.reload()?;
        }
        Ok(changed)
    }
}

/// The serial number of a DER certificate, lowercase hex (empty when it does not parse).
pub fn serial_hex(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| hex::encode(c.raw_serial()))
        .unwrap_or_default()
}

fn set_expiry_gauge(der: &[u8]) {
    if let Ok((_, c)) = x509_parser::parse_x509_certificate(der) {
        // Seconds fit an f64 exactly for the next few hundred million years.
        #[allow(clippy::cast_precision_loss)]
        let at = c.validity().not_after.timestamp() as f64;
        metrics::gauge!("outrelay_relay_cert_expiry_unix_seconds").set(at);
    }
}

/// Renews the identity in `store` forever: at [`outrelay_client::renew_at`] of the stored
/// certificate (70 % of its life, at least [`RENEW_MIN_INTERVAL_MS`] after the previous
/// renewal), `Pki.Renew` at `controller_url`, save, then [`LiveIdentity::reload`]. A failure is
/// retried after [`RETRY_INITIAL_MS`] doubling to [`RETRY_MAX_MS`], also past expiry (the
/// controller then refuses, and the log says why). Counted in
/// `outrelay_relay_cert_renewals_total{result}`.
pub async fn renewal_loop(live: Arc<LiveIdentity>, store: IdentityStore, controller_url: String) {
    let mut backoff_ms = RETRY_INITIAL_MS;
    let mut floor = Duration::ZERO;
    loop {
        let at = match store.load() {
            Ok(stored) => outrelay_client::renew_at(&stored.cert_pem).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "stored relay certificate unreadable; renewing now");
                SystemTime::now()
            }),
            Err(e) => {
                tracing::warn!(error = %e, "relay identity unreadable; renewing now");
                SystemTime::now()
            }
        };
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .max(floor);
        tracing::info!(wait_s = wait.as_secs(), "next relay certificate renewal");
        tokio::time::sleep(wait).await;
        match renew_once(&live, &store, &controller_url).await {
            Ok(()) => {
                metrics::counter!("outrelay_relay_cert_renewals_total", "result" => "ok")
                    .increment(1);
                backoff_ms = RETRY_INITIAL_MS;
                floor = Duration::from_millis(RENEW_MIN_INTERVAL_MS);
            }
            Err(e) => {
                metrics::counter!("outrelay_relay_cert_renewals_total", "result" => "error")
                    .increment(1);
                tracing::warn!(error = %e, retry_ms = backoff_ms, "relay certificate renewal failed");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = backoff_ms.saturating_mul(2).min(RETRY_MAX_MS);
                floor = Duration::ZERO;
            }
        }
    }
}

async fn renew_once(
    live: &LiveIdentity,
    store: &IdentityStore,
    controller_url: &str,
) -> Result<(), IdentityError> {
    let issued = outrelay_client::renew(&store.target(controller_url)).await?;
    store.save(&issued)?;
    live.reload()?;
    Ok(())
}

/// What `outrelay-relay enroll` needs.
#[derive(Debug, Clone)]
pub struct EnrollArgs {
    /// `https://host:port` of the controller.
    pub controller: String,
    /// The `token create --role relay` token.
    pub token: String,
    /// Where `cert.pem`, `key.pem` and `ca.pem` go.
    pub state_dir: PathBuf,
    /// DNS names and IPs agents dial this relay by.
    pub names: Vec<String>,
    /// The CA certificate (PEM) when the operator has it out of band.
    pub ca_pem: Option<String>,
}

/// Enrolls the relay (see the module docs) and writes its identity into the state directory.
/// Returns the identity the controller chose.
///
/// # Errors
/// [`IdentityError`].
pub async fn enroll(args: &EnrollArgs) -> Result<Identity, IdentityError> {
    let dir = &args.state_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(outrelay_client::store::DIR_MODE)
        .create(dir)
        .map_err(|source| IdentityError::Io {
            path: dir.clone(),
            source,
        })?;
    let pending = dir.join(PENDING_KEY_FILE);
    let key_pem = pending_key(&pending)?;
    let opts = outrelay_client::EnrollOptions {
        role: Some(Role::Relay),
        ca_pem: args.ca_pem.clone(),
        names: args.names.clone(),
        key_pem: Some(key_pem),
        ..outrelay_client::EnrollOptions::default()
    };
    let issued = outrelay_client::enroll(&args.controller, &args.token, &opts).await?;
    IdentityStore::new(dir.clone()).save(&issued)?;
    std::fs::remove_file(&pending).map_err(|source| IdentityError::Io {
        path: pending,
        source,
    })?;
    Ok(issued.identity)
}

/// The key of the enrollment in progress: the one a previous attempt left, or a new one
/// written with mode 0600 before it is used.
fn pending_key(path: &Path) -> Result<Zeroizing<String>, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(pem) => return Ok(Zeroizing::new(pem)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let pem =
        outrelay_client::enroll::new_key_pem().map_err(|e| IdentityError::Key(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(outrelay_client::store::KEY_MODE)
        .open(path)
        .map_err(io)?;
    f.write_all(pem.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(pem)
}

/// The host of `public_url` in a relay config file (`enroll --config`), without validating
/// the rest of it (the certificate it names does not exist before enrollment).
///
/// # Errors
/// A reason when the file cannot be read or has no usable `public_url`.
pub fn public_host_of(config: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let value: toml::Value =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", config.display()))?;
    let url = value
        .get("public_url")
        .and_then(toml::Value::as_str)
        .ok_or_else(|| format!("{}: no public_url", config.display()))?;
    crate::lease::root_host_from_url(url)
        .map_err(|e| format!("{}: public_url: {e}", config.display()))
}
