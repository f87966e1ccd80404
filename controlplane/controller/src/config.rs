//! Configuration: a TOML file plus command-line overrides, parsed once into validated
//! [`Settings`] before anything is bound. Every timeout and interval is here so tests can use
//! short ones.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the configuration was refused (the process exits 64 with this one line).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (names the key).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config: {field}: {reason}")]
    Invalid {
        /// The dotted key.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// One day in milliseconds (retention defaults).
const DAY_MS: u64 = 86_400_000;

/// Smallest accepted `grpc.max_message_bytes` (a CSR and any admin request fit).
pub const MIN_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest accepted `grpc.max_message_bytes`.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The file as written (every key optional; defaults applied in [`Settings::from_raw`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// State directory (database, CA, audit key).
    pub state_dir: Option<PathBuf>,
    /// gRPC over mTLS.
    #[serde(default)]
    pub grpc: RawGrpc,
    /// Controller server certificate.
    #[serde(default)]
    pub tls: RawTls,
    /// Local admin Unix socket.
    #[serde(default)]
    pub admin: RawAdmin,
    /// Prometheus endpoint.
    #[serde(default)]
    pub metrics: RawMetrics,
    /// Registry timings.
    #[serde(default)]
    pub registry: RawRegistry,
    /// PKI lifetimes.
    #[serde(default)]
    pub pki: RawPki,
    /// Store tuning.
    #[serde(default)]
    pub store: RawStore,
    /// Refusal audit aggregation.
    #[serde(default)]
    pub audit: RawAudit,
    /// Retention of growth sources (tokens, lease records, issued certificates).
    #[serde(default)]
    pub retention: RawRetention,
    /// SIGTERM grace.
    #[serde(default)]
    pub lifecycle: outrelay_lifecycle::RawLifecycle,
}

/// `[grpc]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrpc {
    /// Listen address (default `0.0.0.0:7444`).
    pub listen: Option<String>,
    /// TLS handshake deadline.
    pub handshake_timeout_ms: Option<u64>,
    /// Most open TCP connections (handshaking or served).
    pub max_connections: Option<usize>,
    /// Most open TCP connections from one source (an IPv4 address or an IPv6 /64).
    pub max_connections_per_source: Option<usize>,
    /// Most open connections without a client certificate.
    pub max_anonymous_connections: Option<usize>,
    /// New connections one source may open per second (burst: twice that).
    pub new_connections_per_source_per_s: Option<u32>,
    /// RPCs one source may make per second without a client certificate (burst: twice that).
    pub anonymous_rpcs_per_source_per_s: Option<u32>,
    /// An anonymous connection with no byte either way for this long is closed.
    pub anonymous_idle_timeout_ms: Option<u64>,
    /// An anonymous connection is closed this long after its handshake.
    pub anonymous_max_age_ms: Option<u64>,
    /// Largest request message decoded, in bytes.
    pub max_message_bytes: Option<usize>,
}

/// `[tls]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Server certificate chain (PEM); issued from the CA at start when absent.
    pub cert_file: Option<PathBuf>,
    /// Server key (PEM).
    pub key_file: Option<PathBuf>,
    /// DNS names / IPs for the self-issued server certificate.
    pub server_names: Option<Vec<String>>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Unix socket path ("" disables it).
    pub socket_path: Option<PathBuf>,
    /// Group whose members are global admins on the socket.
    pub group: Option<String>,
}

/// `[metrics]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Listen address ("" disables it).
    pub listen: Option<String>,
}

/// `[registry]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    /// A relay silent this long is marked down.
    pub relay_down_after_ms: Option<u64>,
    /// Events queued per watcher before it is disconnected.
    pub watch_queue_events: Option<usize>,
    /// Most distinct services one agent identity may register.
    pub max_services_per_agent: Option<usize>,
}

/// `[pki]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPki {
    /// Lifetime of issued leaves.
    pub leaf_lifetime_s: Option<u64>,
    /// Default enrollment token lifetime.
    pub token_default_ttl_s: Option<u64>,
    /// Longest enrollment token lifetime.
    pub token_max_ttl_s: Option<u64>,
    /// `Pki.Renew` calls one identity may make at once (token bucket size).
    pub renew_burst: Option<u32>,
    /// One more `Pki.Renew` is allowed per identity every this many ms.
    pub renew_refill_ms: Option<u64>,
}

/// `[audit]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// Refusals of one (source, method, reason) write at most one row per this interval.
    pub refusal_interval_ms: Option<u64>,
    /// Most (source, method, reason) keys tracked; more share one overflow row.
    pub refusal_keys_max: Option<usize>,
}

/// `[retention]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    /// How often the prune job runs.
    pub prune_interval_ms: Option<u64>,
    /// Used or expired enrollment tokens are deleted this long after use or expiry.
    pub token_retention_ms: Option<u64>,
    /// Released or expired lease records are deleted this long after release or expiry.
    pub lease_retention_ms: Option<u64>,
    /// Issued-certificate records are deleted this long after the certificate expired.
    pub cert_retention_ms: Option<u64>,
}

/// `[store]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Writes waiting for the writer thread.
    pub write_queue_max: Option<usize>,
    /// Jobs per group commit.
    pub max_batch: Option<usize>,
}

/// Command-line overrides (each wins over the file).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--state-dir`
    pub state_dir: Option<PathBuf>,
    /// `--grpc-listen`
    pub grpc_listen: Option<String>,
    /// `--admin-socket`
    pub admin_socket: Option<PathBuf>,
    /// `--metrics-listen`
    pub metrics_listen: Option<String>,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// After SIGTERM, how long in-flight RPCs and streams may take to finish.
    pub shutdown_grace_ms: u64,
    /// State directory.
    pub state_dir: PathBuf,
    /// gRPC listen address.
    pub grpc_listen: SocketAddr,
    /// TLS handshake deadline.
    pub handshake_timeout_ms: u64,
    /// Operator-provided server cert and key, or `None` to self-issue.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Names for the self-issued server certificate.
    pub server_names: Vec<String>,
    /// Admin socket, or `None` when disabled.
    pub admin_socket: Option<PathBuf>,
    /// Admin group name.
    pub admin_group: String,
    /// Metrics listen address, or `None` when disabled.
    pub metrics_listen: Option<SocketAddr>,
    /// A relay silent this long is down.
    pub relay_down_after_ms: u64,
    /// Events queued per watcher.
    pub watch_queue_events: usize,
    /// Leaf lifetime.
    pub leaf_lifetime_s: u64,
    /// Default token lifetime.
    pub token_default_ttl_s: u64,
    /// Longest token lifetime.
    pub token_max_ttl_s: u64,
    /// Store write queue.
    pub write_queue_max: usize,
    /// Jobs per commit.
    pub max_batch: usize,
    /// TCP connection caps and anonymous-connection timeouts.
    pub conn: ConnLimits,
    /// Largest request message decoded.
    pub max_message_bytes: usize,
    /// Anonymous RPCs per source per second.
    pub anonymous_rpcs_per_source_per_s: u32,
    /// Most distinct services per agent identity.
    pub max_services_per_agent: usize,
    /// Renew token bucket size.
    pub renew_burst: u32,
    /// Renew token bucket refill period.
    pub renew_refill_ms: u64,
    /// Refusal audit aggregation window.
    pub refusal_interval_ms: u64,
    /// Refusal audit keys tracked.
    pub refusal_keys_max: usize,
    /// Retention periods.
    pub retention: Retention,
}

/// Caps on the gRPC TCP listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Most open connections.
    pub max_connections: usize,
    /// Most open connections per source.
    pub max_per_source: usize,
    /// Most open anonymous connections.
    pub max_anonymous: usize,
    /// Anonymous idle timeout.
    pub anonymous_idle_timeout_ms: u64,
    /// Anonymous maximum age.
    pub anonymous_max_age_ms: u64,
    /// New connections per source per second.
    pub new_connections_per_source_per_s: u32,
}

/// How long growth sources are kept once they stopped mattering.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Prune period.
    pub prune_interval_ms: u64,
    /// Used/expired tokens.
    pub token_ms: u64,
    /// Released/expired lease records.
    pub lease_ms: u64,
    /// Expired issued-certificate records.
    pub cert_ms: u64,
}

impl Settings {
    /// Reads `path` (if any), applies `ov`, validates.
    ///
    /// # Errors
    /// The first problem found, naming the key.
    pub fn load(path: Option<&Path>, ov: &Overrides) -> Result<Settings, ConfigError> {
        let raw = match path {
            None => RawConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.display().to_string(),
                    message: e.message().to_owned()
                        + &e.span()
                            .map(|s| format!(" (at byte {})", s.start))
                            .unwrap_or_default(),
                })?
            }
        };
        Settings::from_raw(raw, ov)
    }

    /// Converts the raw file into settings.
    ///
    /// # Errors
    /// The first invalid value, naming its key.
    pub fn from_raw(raw: RawConfig, ov: &Overrides) -> Result<Settings, ConfigError> {
        let state_dir = ov
            .state_dir
            .clone()
            .or(raw.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/outrelay-controller"));
        if state_dir.as_os_str().is_empty() {
            return invalid("state_dir", "must not be empty");
        }
        let grpc_listen = parse_addr(
            "grpc.listen",
            ov.grpc_listen
                .as_deref()
                .or(raw.grpc.listen.as_deref())
                .unwrap_or("0.0.0.0:7444"),
        )?;
        let tls_files = match (raw.tls.cert_file, raw.tls.key_file) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return invalid("tls.cert_file", "cert_file and key_file go together"),
        };
        let server_names = raw
            .tls
            .server_names
            .unwrap_or_else(|| vec!["localhost".to_owned(), "127.0.0.1".to_owned()]);
        if server_names.is_empty() {
            return invalid("tls.server_names", "at least one name");
        }
        let admin_socket = match ov.admin_socket.clone().or(raw.admin.socket_path) {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p),
            None => Some(PathBuf::from("/run/outrelay/controller.sock")),
        };
        let metrics_listen = match ov
            .metrics_listen
            .as_deref()
            .or(raw.metrics.listen.as_deref())
            .unwrap_or("127.0.0.1:7461")
        {
            "" => None,
            s => Some(parse_addr("metrics.listen", s)?),
        };
        let handshake_timeout_ms = positive(
            "grpc.handshake_timeout_ms",
            raw.grpc.handshake_timeout_ms.unwrap_or(5_000),
        )?;
        let g = &raw.grpc;
        let conn = ConnLimits {
            max_connections: at_least_one(
                "grpc.max_connections",
                g.max_connections.unwrap_or(4096),
            )?,
            max_per_source: at_least_one(
                "grpc.max_connections_per_source",
                g.max_connections_per_source.unwrap_or(256),
            )?,
            max_anonymous: at_least_one(
                "grpc.max_anonymous_connections",
                g.max_anonymous_connections.unwrap_or(256),
            )?,
            anonymous_idle_timeout_ms: positive(
                "grpc.anonymous_idle_timeout_ms",
                g.anonymous_idle_timeout_ms.unwrap_or(10_000),
            )?,
            anonymous_max_age_ms: positive(
                "grpc.anonymous_max_age_ms",
                g.anonymous_max_age_ms.unwrap_or(60_000),
            )?,
            new_connections_per_source_per_s: match g.new_connections_per_source_per_s {
                Some(0) => {
                    return invalid(
                        "grpc.new_connections_per_source_per_s",
                        "must be at least 1",
                    );
                }
                v => v.unwrap_or(50),
            },
        };
        let max_message_bytes = g.max_message_bytes.unwrap_or(1 << 20);
        if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&max_message_bytes) {
            return invalid(
                "grpc.max_message_bytes",
                &format!("must be {MIN_MESSAGE_BYTES} to {MAX_MESSAGE_BYTES}"),
            );
        }
        let anonymous_rpcs_per_source_per_s = match g.anonymous_rpcs_per_source_per_s {
            Some(0) => {
                return invalid("grpc.anonymous_rpcs_per_source_per_s", "must be at least 1");
            }
            v => v.unwrap_or(20),
        };
        let max_services_per_agent = at_least_one(
            "registry.max_services_per_agent",
            raw.registry.max_services_per_agent.unwrap_or(64),
        )?;
        let renew_burst = raw.pki.renew_burst.unwrap_or(5);
        if renew_burst == 0 {
            return invalid("pki.renew_burst", "must be at least 1");
        }
        let renew_refill_ms = positive(
            "pki.renew_refill_ms",
            raw.pki.renew_refill_ms.unwrap_or(60_000),
        )?;
        let refusal_interval_ms = positive(
            "audit.refusal_interval_ms",
            raw.audit.refusal_interval_ms.unwrap_or(60_000),
        )?;
        let refusal_keys_max = at_least_one(
            "audit.refusal_keys_max",
            raw.audit.refusal_keys_max.unwrap_or(4096),
        )?;
        let rt = &raw.retention;
        let retention = Retention {
            prune_interval_ms: positive(
                "retention.prune_interval_ms",
                rt.prune_interval_ms.unwrap_or(3_600_000),
            )?,
            token_ms: positive(
                "retention.token_retention_ms",
                rt.token_retention_ms.unwrap_or(7 * DAY_MS),
            )?,
            lease_ms: positive(
                "retention.lease_retention_ms",
                rt.lease_retention_ms.unwrap_or(7 * DAY_MS),
            )?,
            cert_ms: positive(
                "retention.cert_retention_ms",
                rt.cert_retention_ms.unwrap_or(30 * DAY_MS),
            )?,
        };
        let relay_down_after_ms = positive(
            "registry.relay_down_after_ms",
            raw.registry.relay_down_after_ms.unwrap_or(30_000),
        )?;
        let watch_queue_events = raw.registry.watch_queue_events.unwrap_or(1024);
        if watch_queue_events == 0 {
            return invalid("registry.watch_queue_events", "must be at least 1");
        }
        let leaf_lifetime_s = positive(
            "pki.leaf_lifetime_s",
            raw.pki.leaf_lifetime_s.unwrap_or(86_400),
        )?;
        let token_default_ttl_s = positive(
            "pki.token_default_ttl_s",
            raw.pki.token_default_ttl_s.unwrap_or(600),
        )?;
        let token_max_ttl_s = positive(
            "pki.token_max_ttl_s",
            raw.pki.token_max_ttl_s.unwrap_or(7 * 86_400),
        )?;
        if token_default_ttl_s > token_max_ttl_s {
            return invalid("pki.token_default_ttl_s", "exceeds pki.token_max_ttl_s");
        }
        let write_queue_max = raw.store.write_queue_max.unwrap_or(4096);
        let max_batch = raw.store.max_batch.unwrap_or(512);
        if write_queue_max == 0 {
            return invalid("store.write_queue_max", "must be at least 1");
        }
        if max_batch == 0 {
            return invalid("store.max_batch", "must be at least 1");
        }
        Ok(Settings {
            state_dir,
            grpc_listen,
            handshake_timeout_ms,
            tls_files,
            server_names,
            admin_socket,
            admin_group: raw
                .admin
                .group
                .unwrap_or_else(|| "outrelay-admin".to_owned()),
            metrics_listen,
            relay_down_after_ms,
            watch_queue_events,
            leaf_lifetime_s,
            token_default_ttl_s,
            token_max_ttl_s,
            write_queue_max,
            max_batch,
            conn,
            max_message_bytes,
            anonymous_rpcs_per_source_per_s,
            max_services_per_agent,
            renew_burst,
            renew_refill_ms,
            refusal_interval_ms,
            refusal_keys_max,
            retention,
            shutdown_grace_ms: raw.lifecycle.shutdown_grace_ms,
        })
    }
}

fn invalid<T>(field: &'static str, reason: &str) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        field,
        reason: reason.to_owned(),
    })
}

fn at_least_one(field: &'static str, v: usize) -> Result<usize, ConfigError> {
    if v == 0 {
        invalid(field, "must be at least 1")
    } else {
        Ok(v)
    }
}

fn positive(field: &'static str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        invalid(field, "must be greater than 0")
    } else {
        Ok(v)
    }
}

fn parse_addr(field: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| ConfigError::Invalid {
        field,
        reason: format!("`{s}` is not an IP:port address"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let s = Settings::from_raw(RawConfig::default(), &Overrides::default()).expect("defaults");
        assert_eq!(s.grpc_listen.port(), 7444);
        assert_eq!(s.metrics_listen.map(|a| a.port()), Some(7461));
        assert_eq!(s.watch_queue_events, 1024);
        assert_eq!(s.max_message_bytes, 1 << 20);
        assert!(s.conn.max_per_source <= s.conn.max_connections);
    }

    #[test]
    fn abuse_limits_are_validated() {
        for (text, key) in [
            ("[grpc]\nmax_connections = 0", "grpc.max_connections"),
            (
                "[grpc]\nanonymous_rpcs_per_source_per_s = 0",
                "grpc.anonymous_rpcs_per_source_per_s",
            ),
            (
                "[grpc]\nnew_connections_per_source_per_s = 0",
                "grpc.new_connections_per_source_per_s",
            ),
            ("[grpc]\nmax_message_bytes = 10", "grpc.max_message_bytes"),
            (
                "[grpc]\nanonymous_max_age_ms = 0",
                "grpc.anonymous_max_age_ms",
            ),
            ("[pki]\nrenew_burst = 0", "pki.renew_burst"),
            (
                "[audit]\nrefusal_interval_ms = 0",
                "audit.refusal_interval_ms",
            ),
            (
                "[retention]\ntoken_retention_ms = 0",
                "retention.token_retention_ms",
            ),
            (
                "[registry]\nmax_services_per_agent = 0",
                "registry.max_services_per_agent",
            ),
        ] {
            let raw: RawConfig = toml::from_str(text).expect("toml");
            let e = Settings::from_raw(raw, &Overrides::default()).expect_err(key);
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let raw: RawConfig = toml::from_str("[grpc]\nlisten = \"nope\"").expect("toml");
        let e = Settings::from_raw(raw, &Overrides::default()).expect_err("invalid");
        assert!(e.to_string().contains("grpc.listen"), "{e}");
        let e = toml::from_str::<RawConfig>("bogus = 1").expect_err("unknown key");
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    /// Every key is an `Option` whose default [`Settings::from_raw`] applies: a documented
    /// default is right when setting it changes no setting.
    fn is_default(path: &str, v: &toml::Value) -> Option<bool> {
        let settings = |text: &str| {
            let raw: RawConfig = toml::from_str(text).ok()?;
            Settings::from_raw(raw, &Overrides::default())
                .ok()
                .map(|s| format!("{s:?}"))
        };
        let text = outrelay_lifecycle::config_doc::with_key("", path, v);
        Some(settings("")? == settings(&text)?)
    }

    #[test]
    fn docs_config_md_lists_every_controller_key_with_its_default() {
        use outrelay_lifecycle::config_doc;
        let keys = config_doc::keys::<RawConfig>().expect("walk the raw config");
        let md = include_str!("../../../docs/config.md");
        let problems = config_doc::check(md, "outrelay-controller", &keys, is_default);
        assert!(
            problems.is_empty(),
            "docs/config.md no longer matches controlplane/controller/src/config.rs:\n{}",
            problems.join("\n")
        );
    }
}
