//! Bandwidth limits per lease and per tenant, each direction (issue 21).
//!
//! CONTRACT SKELETON: the types and the entry point the controller client calls are fixed
//! here; the token buckets, their use on the splice path, UDP leases and service streams, the
//! `[bandwidth]` defaults of relay.toml and the counters are built behind them.
//!
//! Where a limit comes from, most specific first: the controller's record for the lease
//! (`outrelay leases limit --tenant T --name N`), else the relay's `[bandwidth]` lease default;
//! and independently the controller's record for the tenant, else the relay's tenant default.
//! A transfer is held to both its lease's and its tenant's limit.

use std::collections::HashMap;

/// A limit in both directions, in bytes per second; 0 = no limit in that direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Public client (or consumer) → service.
    pub to_service_bytes_per_s: u64,
    /// Service → public client (or consumer).
    pub to_client_bytes_per_s: u64,
}

/// What a controller limit record applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every lease and service stream of a tenant, together.
    Tenant(String),
    /// One lease (`name` as registered, not the full hostname) of a tenant.
    Lease {
        /// The lease's tenant.
        tenant: String,
        /// The lease's name.
        name: String,
    },
}

/// The relay's limits: controller overrides over the configured defaults.
#[derive(Debug, Default)]
pub struct Bandwidth {
    overrides: arc_swap::ArcSwap<HashMap<Scope, Limit>>,
}

impl Bandwidth {
    /// Replaces every controller override at once (a Watch snapshot, or after any live
    /// LIMIT decision the whole set again); a scope missing from `overrides` falls back to the
    /// configured default. Running transfers follow within a second.
    pub fn replace_overrides(&self, overrides: HashMap<Scope, Limit>) {
        self.overrides.store(std::sync::Arc::new(overrides));
    }

    /// The controller overrides in force.
    pub fn overrides(&self) -> std::sync::Arc<HashMap<Scope, Limit>> {
        self.overrides.load_full()
    }
}
