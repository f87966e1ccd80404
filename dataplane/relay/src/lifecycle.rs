//! SIGHUP for the relay: re-read the config file, keep the running one if the new one is
//! invalid (error log + `outrelay_config_reloads_total{result="error"}`), otherwise apply what
//! is live and name the changed keys that need a restart. See ARCHITECTURE.md, "Reload".
//!
//! Live today: `[lifecycle]` (the SIGTERM grace). Everything else is read once at start-up
//! (listeners, TLS, engines and the ingress limits the hot path holds without a lock).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::{Overrides, Settings};

/// Keys (dotted prefixes) a reload applies without a restart.
pub const LIVE_KEYS: &[&str] = &["lifecycle."];

/// Re-reads the config file on SIGHUP.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    overrides: Overrides,
    /// The file as read at start-up: what the non-live settings still reflect.
    started_with: String,
    shutdown_grace_ms: Arc<AtomicU64>,
}

impl Reloader {
    /// A reloader for `path`, whose start-up settings are `settings`.
    pub fn new(path: PathBuf, overrides: Overrides, settings: &Settings) -> Reloader {
        let started_with = std::fs::read_to_string(&path).unwrap_or_default();
        Reloader {
            path,
            overrides,
            started_with,
            shutdown_grace_ms: Arc::new(AtomicU64::new(settings.shutdown_grace_ms)),
        }
    }

    /// The SIGTERM grace now in force.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms.load(Ordering::Relaxed))
    }

    /// Re-reads and applies the file (with `RELOADING=1` … `READY=1` around it); returns
    /// whether it was accepted.
    pub fn reload(&self) -> bool {
        outrelay_lifecycle::notify_reloading();
        let ok = self.apply();
        outrelay_lifecycle::count_reload(ok);
        outrelay_lifecycle::notify_ready();
        ok
    }

    fn apply(&self) -> bool {
        let settings = match Settings::load(&self.path, &self.overrides) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(config = %self.path.display(), error = %e,
                    "config reload refused; the running config stays");
                return false;
            }
        };
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let changed =
            outrelay_lifecycle::changed_keys(&self.started_with, &text).unwrap_or_default();
        let (live, restart): (Vec<String>, Vec<String>) = changed
            .into_iter()
            .partition(|k| LIVE_KEYS.iter().any(|p| k.starts_with(p)));
        self.shutdown_grace_ms
            .store(settings.shutdown_grace_ms, Ordering::Relaxed);
        if restart.is_empty() {
            tracing::info!(applied = ?live, "config reloaded");
        } else {
            tracing::warn!(applied = ?live, needs_restart = ?restart,
                "config reloaded; some changed keys take effect only after a restart");
        }
        true
    }
}
