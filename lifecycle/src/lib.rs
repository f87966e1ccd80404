//! The daemons' lifecycle, shared by `outrelay-relay`, `outrelay-agent` and
//! `outrelay-controller`: SIGTERM/SIGINT/SIGHUP as a stream of [`Signal`]s, systemd
//! notifications (`READY=1`, `STOPPING=1`, `RELOADING=1`) and a [`Watchdog`] that pings only
//! while every registered worker beats, the diff of two config files for a reload
//! ([`changed_keys`]), and the bounded wait for in-flight work ([`drain`]). [`config_doc`]
//! checks docs/config.md against each daemon's config structs (used by their tests).
//! [`dashboard`] is the relay's and the controller's read-only HTML page and JSON snapshot on
//! their metrics listener (routes, headers, layout).
//!
//! Not here: what a daemon applies live on reload (each daemon decides; ARCHITECTURE.md).
//! Without `NOTIFY_SOCKET` every notification is a no-op, so a daemon behaves the same under
//! systemd, under a test's notify listener, and on a terminal.
#![forbid(unsafe_code)]

pub mod config_doc;
pub mod dashboard;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Default grace period for established connections after SIGTERM (`shutdown_grace_ms`).
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 30_000;
/// A worker that has not beaten for this long (or the watchdog interval, if longer) is wedged.
pub const WORKER_STALE_MIN_MS: u64 = 2_000;

/// A signal the daemons act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: stop accepting, drain, exit.
    Stop,
    /// SIGHUP: re-read the configuration.
    Reload,
}

/// SIGTERM, SIGINT and SIGHUP, installed once.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime).
    ///
    /// # Errors
    /// The runtime refused a signal handler.
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal.
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

/// `READY=1`: the listeners are bound (call after writing the ready file).
pub fn notify_ready() {
    send(&[NotifyState::Ready]);
}

/// `MAINPID=<pid>`, sent by the service's main process: after a hitless upgrade the relay
/// names the new process that took its sockets as the main process, so the unit keeps
/// `NotifyAccess=main` (the new process then says `READY=1` itself, as the main one).
pub fn notify_main_pid(pid: u32) {
    send(&[NotifyState::MainPid(pid)]);
}

/// `STOPPING=1`: shutdown has begun.
pub fn notify_stopping() {
    send(&[NotifyState::Stopping]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` (systemd ≥ 253 needs both); follow with
/// [`notify_ready`] once the reload is decided.
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

fn send(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// One worker's heartbeat: the worker calls [`Beat::beat`] at least every second.
#[derive(Debug, Clone)]
pub struct Beat {
    name: Arc<str>,
    origin: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Beat {
    /// Records that the worker is alive (one relaxed store; fine on a hot loop).
    pub fn beat(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn age(&self, now: Instant) -> Duration {
        let at = self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(at)
    }
}

/// Sends `WATCHDOG=1` at half of `WATCHDOG_USEC` while every registered [`Beat`] is fresh; a
/// wedged worker stops the pings, so systemd restarts the daemon.
#[derive(Debug, Clone)]
pub struct Watchdog {
    origin: Instant,
    beats: Arc<Mutex<Vec<Beat>>>,
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog {
            origin: Instant::now(),
            beats: Arc::default(),
        }
    }
}

impl Watchdog {
    /// Registers a worker; it starts fresh.
    pub fn register(&self, name: &str) -> Beat {
        let b = Beat {
            name: name.into(),
            origin: self.origin,
            last_ms: Arc::new(AtomicU64::new(0)),
        };
        b.beat();
        self.beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(b.clone());
        b
    }

    /// The first stale worker's name, if any.
    pub fn stale(&self, now: Instant, limit: Duration) -> Option<String> {
        let beats = self
            .beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        beats
            .iter()
            .find(|b| b.age(now) > limit)
            .map(|b| b.name.to_string())
    }

    /// With `WATCHDOG_USEC` set: a thread that pings at half the interval while no worker is
    /// stale, plus a beat of the current tokio runtime (`runtime`, spawned here). Without it:
    /// nothing.
    pub fn start(&self, runtime: &str) {
        let Some(interval) = sd_notify::watchdog_enabled() else {
            return;
        };
        let rt = self.register(runtime);
        let tick = (interval / 4).max(Duration::from_millis(50));
        tokio::spawn(async move {
            loop {
                rt.beat();
                tokio::time::sleep(tick).await;
            }
        });
        let me = self.clone();
        let limit = interval.max(Duration::from_millis(WORKER_STALE_MIN_MS));
        let spawned = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut logged = false;
                loop {
                    match me.stale(Instant::now(), limit) {
                        None => {
                            send(&[NotifyState::Watchdog]);
                            logged = false;
                        }
                        Some(name) if !logged => {
                            tracing::error!(worker = %name, "worker wedged: watchdog pings stop");
                            logged = true;
                        }
                        Some(_) => {}
                    }
                    std::thread::sleep(interval / 2);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "watchdog thread not started");
        }
    }
}

/// Dotted keys whose values differ between two TOML documents (added, removed or changed
/// leaves; arrays compare whole). Both must parse.
///
/// # Errors
/// The TOML parser's message for the first document that does not parse.
pub fn changed_keys(old: &str, new: &str) -> Result<Vec<String>, String> {
    let old: toml::Table = toml::from_str(old).map_err(|e| e.message().replace('\n', " "))?;
    let new: toml::Table = toml::from_str(new).map_err(|e| e.message().replace('\n', " "))?;
    let mut out = Vec::new();
    diff("", &old, &new, &mut out);
    out.sort();
    Ok(out)
}

fn diff(prefix: &str, old: &toml::Table, new: &toml::Table, out: &mut Vec<String>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    let empty = toml::Table::new();
    for (k, v) in old {
        match (v, new.get(k)) {
            (toml::Value::Table(a), Some(toml::Value::Table(b))) => diff(&key(k), a, b, out),
            (toml::Value::Table(a), None) => diff(&key(k), a, &empty, out),
            (a, Some(b)) if a == b => {}
            _ => out.push(key(k)),
        }
    }
    for (k, v) in new {
        match (v, old.contains_key(k)) {
            (_, true) => {}
            (toml::Value::Table(b), false) => diff(&key(k), &empty, b, out),
            (_, false) => out.push(key(k)),
        }
    }
}

/// `[lifecycle]` as it appears in each daemon's config file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLifecycle {
    /// After SIGTERM, how long established connections may take to finish.
    pub shutdown_grace_ms: u64,
}

impl Default for RawLifecycle {
    fn default() -> Self {
        RawLifecycle {
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
        }
    }
}

/// Whether [`Reloader::reload`] applies the dotted config key `key` live for the agent and
/// the controller (only `[lifecycle]`); every other changed key is logged `needs_restart`.
/// The relay has its own, longer list (`outrelay_relay::reload::key_reload`). docs/config.md's
/// "reload" column is checked against it ([`config_doc::check`]).
pub fn applied_live(key: &str) -> bool {
    key.starts_with("lifecycle.")
}

/// What SIGHUP does with one changed key of a daemon's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyReload {
    /// Applied by the reload (to new connections, streams and leases).
    Live,
    /// Applied only by a new process: logged `needs_restart`.
    Restart,
    /// Applied only by a new process that takes the sockets over (`outrelay-relay upgrade`):
    /// logged `needs_upgrade`.
    Upgrade,
}

/// The agent's and the controller's classes: [`applied_live`] keys are live, the rest need a
/// restart.
pub fn key_reload(key: &str) -> KeyReload {
    if applied_live(key) {
        KeyReload::Live
    } else {
        KeyReload::Restart
    }
}

/// SIGHUP handling: validate the file again, keep the running config when it is invalid,
/// otherwise let the daemon apply its live keys, apply the grace and name the changed keys
/// that need a restart or an upgrade.
#[derive(Debug)]
pub struct Reloader {
    path: Option<std::path::PathBuf>,
    /// The file as read at start-up: what the non-live settings still reflect.
    started_with: String,
    /// The file as last accepted: live keys changed since are the ones a reload applies.
    applied: Mutex<String>,
    shutdown_grace_ms: AtomicU64,
    classify: fn(&str) -> KeyReload,
}

impl Reloader {
    /// A reloader for `path` (`None`: no file, SIGHUP only re-validates the defaults) whose
    /// live keys are [`applied_live`]'s.
    pub fn new(path: Option<std::path::PathBuf>, shutdown_grace_ms: u64) -> Reloader {
        Reloader::with_classes(path, shutdown_grace_ms, key_reload)
    }

    /// A reloader whose keys are classed by `classify` (the relay's).
    pub fn with_classes(
        path: Option<std::path::PathBuf>,
        shutdown_grace_ms: u64,
        classify: fn(&str) -> KeyReload,
    ) -> Reloader {
        let started_with = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        Reloader {
            path,
            applied: Mutex::new(started_with.clone()),
            started_with,
            shutdown_grace_ms: AtomicU64::new(shutdown_grace_ms),
            classify,
        }
    }

    /// The SIGTERM grace now in force.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms.load(Ordering::Relaxed))
    }

    /// `RELOADING=1`, then `load()` (the daemon's full validation, which also publishes its
    /// live settings, returning the new grace in ms or the one-line reason), the log line,
    /// the counter, `READY=1`. Returns whether the new file was accepted.
    pub fn reload(&self, load: impl FnOnce() -> Result<u64, String>) -> bool {
        notify_reloading();
        let shown = self
            .path
            .as_ref()
            .map_or_else(|| "(defaults)".to_owned(), |p| p.display().to_string());
        let text = self
            .path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let ok = match load() {
            Err(e) => {
                tracing::error!(config = %shown, error = %e,
                    "config reload refused; the running config stays");
                false
            }
            Ok(grace_ms) => {
                let mut applied = self
                    .applied
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let (live, restart, upgrade) = self.sort_changes(&applied, &text);
                *applied = text;
                self.shutdown_grace_ms.store(grace_ms, Ordering::Relaxed);
                if restart.is_empty() && upgrade.is_empty() {
                    tracing::info!(config = %shown, applied = ?live, "config reloaded");
                } else if restart.is_empty() {
                    tracing::warn!(config = %shown, applied = ?live, needs_upgrade = ?upgrade,
                        "config reloaded; some changed keys take effect only after an upgrade \
                         (outrelay-relay upgrade)");
                } else {
                    tracing::warn!(config = %shown, applied = ?live, needs_restart = ?restart,
                        needs_upgrade = ?upgrade,
                        "config reloaded; some changed keys take effect only after a restart");
                }
                true
            }
        };
        count_reload(ok);
        notify_ready();
        ok
    }

    /// Live keys changed since the last accepted file; keys of the other classes that differ
    /// from the file the process started with.
    fn sort_changes(&self, applied: &str, text: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
        let (mut live, mut restart, mut upgrade) = (Vec::new(), Vec::new(), Vec::new());
        for k in changed_keys(applied, text).unwrap_or_default() {
            if (self.classify)(&k) == KeyReload::Live {
                live.push(k);
            }
        }
        for k in changed_keys(&self.started_with, text).unwrap_or_default() {
            match (self.classify)(&k) {
                KeyReload::Live => {}
                KeyReload::Restart => restart.push(k),
                KeyReload::Upgrade => upgrade.push(k),
            }
        }
        (live, restart, upgrade)
    }
}

/// Counts one reload outcome: `outrelay_config_reloads_total{result="ok"|"error"}`.
pub fn count_reload(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::describe_counter!(
        "outrelay_config_reloads_total",
        "SIGHUP config reloads, by result (error: the running config stayed)."
    );
    metrics::counter!("outrelay_config_reloads_total", "result" => result).increment(1);
}

/// Waits until `in_flight()` reads 0 twice in a row (10 ms apart) or `grace` passes; returns
/// what is still in flight (0: drained).
pub async fn drain(grace: Duration, in_flight: impl Fn() -> usize) -> usize {
    let deadline = tokio::time::Instant::now() + grace;
    let mut zeros = 0;
    loop {
        let n = in_flight();
        zeros = if n == 0 { zeros + 1 } else { 0 };
        if zeros >= 2 || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_names_leaves() {
        let old = "a = 1\n[x]\nb = 2\nc = [1]\n";
        let new = "a = 1\nd = 4\n[x]\nb = 3\nc = [1]\n[y]\ne = 5\n";
        assert_eq!(
            changed_keys(old, new),
            Ok(vec!["d".into(), "x.b".into(), "y.e".into()])
        );
        assert!(changed_keys(old, "a = ").is_err());
    }

    #[test]
    fn stale_worker_is_named() {
        let w = Watchdog::default();
        let _b = w.register("splice-0");
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(w.stale(Instant::now(), Duration::from_secs(1)), None);
        assert_eq!(
            w.stale(later, Duration::from_secs(1)).as_deref(),
            Some("splice-0")
        );
    }

    #[test]
    fn reload_sorts_keys_by_class() {
        fn relay_like(k: &str) -> KeyReload {
            match k.split('.').next() {
                Some("listen") => KeyReload::Upgrade,
                Some("ingress" | "lifecycle") => KeyReload::Live,
                _ => KeyReload::Restart,
            }
        }
        let start = "[ingress]\nclaim_timeout_ms = 100\n[listen]\nquic = \"a\"\n";
        let r = Reloader::with_classes(None, 1, relay_like);
        let text = "[ingress]\nclaim_timeout_ms = 200\n[listen]\nquic = \"b\"\nworkers = 2\n";
        let (live, restart, upgrade) = r.sort_changes(start, text);
        assert_eq!(live, vec!["ingress.claim_timeout_ms".to_owned()]);
        assert_eq!(restart, Vec::<String>::new());
        assert_eq!(
            upgrade,
            vec!["listen.quic".to_owned(), "listen.workers".to_owned()]
        );
        // Nothing changed since the last accepted file: nothing is applied again.
        let (live, _, _) = r.sort_changes(text, text);
        assert!(live.is_empty());
    }
}
