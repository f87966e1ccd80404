//! Swapping in a renewed certificate without dropping connections, and the loop that renews.
//!
//! rustls asks its certificate resolver at every handshake; [`Reloadable`] answers with whatever
//! [`CertifiedKey`] was stored last (one `ArcSwap`). Existing connections keep the certificate
//! they were established with; new ones (and QUIC reconnects) get the renewed one.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{SignatureScheme, crypto::CryptoProvider};

use crate::cert::{self, Issued};
use crate::renew::{self, RenewError};
use crate::store::{IdentityStore, StoreError};

/// First retry delay after a failed renewal.
pub const RETRY_INITIAL_MS: u64 = 1_000;
/// Longest retry delay.
pub const RETRY_MAX_MS: u64 = 60_000;
/// Least time between two successful renewals. Leaves are backdated (5 min at the controller),
/// so a very short-lived leaf can be past its 70 % mark as soon as it is issued; without a floor
/// the loop would renew back to back.
pub const RENEW_MIN_INTERVAL_MS: u64 = 1_000;

/// Why a certificate could not be loaded into a [`Reloadable`].
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The certificate chain does not parse.
    #[error("certificate: {0}")]
    Cert(String),
    /// The key does not parse or is of an unsupported kind.
    #[error("private key: {0}")]
    Key(String),
}

/// A certificate resolver (client and server side) whose certificate can be replaced at any
/// time.
#[derive(Debug)]
pub struct Reloadable {
    current: ArcSwap<CertifiedKey>,
}

impl Reloadable {
    /// A resolver serving `cert_pem` (leaf first) with `key_pem`.
    ///
    /// # Errors
    /// [`ReloadError`].
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Arc<Reloadable>, ReloadError> {
        Ok(Arc::new(Reloadable {
            current: ArcSwap::from_pointee(certified_key(cert_pem, key_pem)?),
        }))
    }

    /// A resolver serving `key` (built by the caller, e.g. from DER).
    pub fn from_certified(key: CertifiedKey) -> Arc<Reloadable> {
        Arc::new(Reloadable {
            current: ArcSwap::from_pointee(key),
        })
    }

    /// Replaces the certificate for every later handshake with `key`.
    pub fn swap_certified(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// Replaces the certificate for every later handshake.
    ///
    /// # Errors
    /// [`ReloadError`]; the previous certificate stays in place.
    pub fn swap(&self, cert_pem: &str, key_pem: &str) -> Result<(), ReloadError> {
        self.current
            .store(Arc::new(certified_key(cert_pem, key_pem)?));
        Ok(())
    }

    /// The certificate now served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesClientCert for Reloadable {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let ck = self.current.load_full();
        ck.key.choose_scheme(sigschemes).is_some().then_some(ck)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Builds a [`CertifiedKey`] from PEM with this crate's provider.
///
/// # Errors
/// [`ReloadError`].
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, ReloadError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ReloadError::Cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(ReloadError::Cert("no certificate".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ReloadError::Key(e.to_string()))?;
    let provider: Arc<CryptoProvider> = cert::provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(|e| ReloadError::Key(e.to_string()))
}

/// Why the renewal loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum RenewalLoopError {
    /// The stored identity could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Renews the identity in `store` forever: sleeps until [`renew::renew_at`] of the stored
/// certificate, renews over mTLS with the stored files, saves, swaps `reloadable` (when given),
/// then calls `on_renewed`. Successive renewals are at least [`RENEW_MIN_INTERVAL_MS`] apart.
/// A failed renewal (or save, or swap) is retried with backoff from
/// [`RETRY_INITIAL_MS`] doubling to [`RETRY_MAX_MS`]; it keeps being retried past expiry (the
/// controller will then refuse, and the log says why).
///
/// Uses tokio's clock for sleeping, so a paused test clock drives it.
///
/// # Errors
/// Returns only when the stored identity cannot be read at all.
pub async fn renewal_loop<F>(
    store: IdentityStore,
    controller_url: String,
    reloadable: Option<Arc<Reloadable>>,
    mut on_renewed: F,
) -> Result<(), RenewalLoopError>
where
    F: FnMut(&Issued) + Send,
{
    let mut backoff_ms = RETRY_INITIAL_MS;
    let mut floor = Duration::ZERO;
    loop {
        let stored = store.load()?;
        let at = match renew::renew_at(&stored.cert_pem) {
            Ok(at) => at,
            Err(e) => {
                tracing::warn!(error = %e, "stored certificate unreadable; renewing now");
                SystemTime::now()
            }
        };
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .max(floor);
        tracing::info!(identity = %stored.identity, wait_s = wait.as_secs(), "next certificate renewal");
        tokio::time::sleep(wait).await;
        loop {
            match renew_once(&store, &controller_url, reloadable.as_deref()).await {
                Ok(issued) => {
                    backoff_ms = RETRY_INITIAL_MS;
                    floor = Duration::from_millis(RENEW_MIN_INTERVAL_MS);
                    tracing::info!(identity = %issued.identity, "certificate renewed");
                    on_renewed(&issued);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_ms = backoff_ms, "certificate renewal failed");
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms = backoff_ms.saturating_mul(2).min(RETRY_MAX_MS);
                }
            }
        }
    }
}

/// One renewal: renew, save, swap.
async fn renew_once(
    store: &IdentityStore,
    controller_url: &str,
    reloadable: Option<&Reloadable>,
) -> Result<Issued, RenewOnceError> {
    let issued = renew::renew(&store.target(controller_url)).await?;
    store.save(&issued)?;
    if let Some(r) = reloadable {
        r.swap(&issued.cert_pem, &issued.key_pem)?;
    }
    Ok(issued)
}

#[derive(Debug, thiserror::Error)]
enum RenewOnceError {
    #[error(transparent)]
    Renew(#[from] RenewError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Reload(#[from] ReloadError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn swap_changes_what_later_handshakes_get() {
        let (c1, k1) = pair("one.test");
        let (c2, k2) = pair("two.test");
        let r = Reloadable::new(&c1, &k1).expect("new");
        let schemes = [SignatureScheme::ECDSA_NISTP256_SHA256];
        let before = ResolvesClientCert::resolve(&*r, &[], &schemes).expect("cert");
        r.swap(&c2, &k2).expect("swap");
        let after = ResolvesClientCert::resolve(&*r, &[], &schemes).expect("cert");
        assert_ne!(before.cert, after.cert);
        assert_eq!(
            after.cert[0].as_ref(),
            cert::first_der(&c2).expect("der").as_ref()
        );
        // The old Arc held by an established connection is untouched.
        assert_eq!(
            before.cert[0].as_ref(),
            cert::first_der(&c1).expect("der").as_ref()
        );
        // A bad swap keeps the current certificate.
        assert!(r.swap("junk", &k1).is_err());
        assert_eq!(r.current().cert, after.cert);
        // No scheme we can sign with: no certificate offered.
        assert!(ResolvesClientCert::resolve(&*r, &[], &[SignatureScheme::ED25519]).is_none());
    }
}
