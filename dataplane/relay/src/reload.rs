//! Live reload (SIGHUP, `systemctl reload`): which keys of relay.toml a reload applies
//! ([`key_reload`]), the handles that publish the parts of ONE validated [`Settings`]
//! ([`LiveSettings::apply`]), and the settings generation that `/metrics` and
//! `outrelay relay status` show ([`ConfigGeneration`]).
//!
//! The file is loaded and validated exactly as at start-up (`Settings::load`); an invalid one
//! changes nothing. A valid one is published part by part, each part one swap (`ArcSwap`) that
//! new connections, streams and leases read: `[ingress]` (the workers re-read their cached
//! timeouts and caps when the generation moves), `[quic]` (a new `ServerConfig` on the same
//! endpoint plus the relay's own per-identity caps and rates), `[leases]` TTLs, reservation,
//! janitor interval and per-agent cap, `[udp]` (ports bound from then on), `[mesh]`, `[resume]`, the
//! standalone `[[policy]]`, and the `[splice]` timeouts (every pair, from each engine's next
//! sweep) and `[log] level` (main's reload filter). Otherwise what already exists keeps what
//! it started with.
//!
//! Not live (`needs_upgrade`: a new process, `outrelay-relay upgrade`): anything that decides
//! a socket or a thread (`[listen]`, `workers`, `control_threads`, `io_backend`, `[ebpf]`, the
//! lease port range and its TCP/UDP switches, `reverse_advertise`, `public_url`), the splice
//! engines' budgets (`[pipes]`, `[splice] *_bytes`: each worker's pools are sized when its
//! engine is built), `[controller]` (its tasks are started with their url, TLS and intervals) and
//! the `[tls]`/`[public_tls]` paths (their files are re-read on SIGHUP anyway).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use outrelay_lifecycle::KeyReload;

use crate::config::Settings;
use crate::ingress::Ingress;
use crate::mesh::Mesh;
use crate::quic::QuicReload;
use crate::udp::UdpIngress;

/// What a reload does with the dotted key `key` of relay.toml (`policy` for the whole
/// `[[policy]]` array). docs/config.md's "reload" column is checked against this.
pub fn key_reload(key: &str) -> KeyReload {
    let mut parts = key.splitn(2, '.');
    let section = parts.next().unwrap_or("");
    let field = parts.next().unwrap_or("");
    match (section, field) {
        (
            "lifecycle" | "ingress" | "quic" | "mesh" | "resume" | "policy" | "log" | "bandwidth",
            _,
        )
        | (
            "leases",
            "ttl_default_s"
            | "ttl_cap_s"
            | "reservation_ms"
            | "janitor_interval_ms"
            | "max_per_agent",
        ) => KeyReload::Live,
        // The range sockets' receive batches are sized once, at start.
        ("udp", f) if f != "recv_slot_bytes" => KeyReload::Live,
        // The engines' timers are read at each sweep; their budgets size pools built once.
        (
            "splice",
            "idle_timeout_ms"
            | "half_closed_timeout_ms"
            | "stall_timeout_ms"
            | "write_stall_timeout_ms",
        ) => KeyReload::Live,
        _ => KeyReload::Upgrade,
    }
}

/// How many settings snapshots this process has published (1: the start-up file) and when
/// the last one was.
#[derive(Debug)]
pub struct ConfigGeneration {
    generation: AtomicU64,
    applied_at_unix_ms: AtomicI64,
}

impl Default for ConfigGeneration {
    fn default() -> Self {
        ConfigGeneration {
            generation: AtomicU64::new(1),
            applied_at_unix_ms: AtomicI64::new(crate::unix_ms()),
        }
    }
}

impl ConfigGeneration {
    /// The generation now in force (1 at start, +1 per accepted reload).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// When it was applied, milliseconds since the Unix epoch.
    pub fn applied_at_unix_ms(&self) -> i64 {
        self.applied_at_unix_ms.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.applied_at_unix_ms
            .store(crate::unix_ms(), Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// The running relay's consumers of live settings.
pub struct LiveSettings {
    /// Workers' limits and timeouts.
    pub ingress: Arc<Ingress>,
    /// The agents' endpoint and the lease table.
    pub quic: QuicReload,
    /// Service streams and the standalone policy.
    pub mesh: Arc<Mesh>,
    /// UDP lease ports.
    pub udp: Arc<UdpIngress>,
    /// Bumped once per applied snapshot.
    pub generation: Arc<ConfigGeneration>,
}

impl std::fmt::Debug for LiveSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSettings")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl LiveSettings {
    /// Publishes the live parts of `settings` (validated by `Settings::load`) and bumps the
    /// generation; returns the new SIGTERM grace. The one step that can still refuse (the
    /// QUIC transport limits) runs first, so a refusal changes nothing.
    ///
    /// # Errors
    /// The one-line reason; nothing was applied.
    pub async fn apply(&self, settings: Settings) -> Result<u64, String> {
        self.quic
            .apply(settings.quic)
            .map_err(|e| format!("invalid config: quic: {e}"))?;
        self.quic.apply_leases(&settings.leases).await;
        self.ingress.reload(settings.ingress, settings.engine);
        self.udp.reload(settings.udp);
        self.mesh.reload(settings.mesh);
        self.ingress
            .shared
            .bandwidth
            .set_defaults(settings.bandwidth);
        self.generation.bump();
        Ok(settings.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_threads_and_engines_need_an_upgrade() {
        for key in [
            "listen.public_tls",
            "listen.quic",
            "workers",
            "control_threads",
            "io_backend",
            "ebpf.mode",
            "leases.min_port",
            "leases.tcp",
            "pipes.budget_bytes",
            "splice.copy_budget_bytes",
            "controller.url",
            "tls.state_dir",
            "udp.recv_slot_bytes",
        ] {
            assert_eq!(key_reload(key), KeyReload::Upgrade, "{key}");
        }
        for key in [
            "ingress.claim_timeout_ms",
            "quic.max_connections_per_identity",
            "leases.ttl_cap_s",
            "leases.janitor_interval_ms",
            "udp.flow_max",
            "mesh.open_timeout_ms",
            "resume.enabled",
            "policy",
            "policy.decision",
            "lifecycle.shutdown_grace_ms",
            "splice.idle_timeout_ms",
            "bandwidth.lease_to_client_bytes_per_s",
            "bandwidth.tenant_to_service_bytes_per_s",
        ] {
            assert_eq!(key_reload(key), KeyReload::Live, "{key}");
        }
    }
}
