//! Bandwidth limits per lease and per tenant, each direction (issue 21).
//!
//! The types and the entry point the controller client calls ([`Bandwidth::replace_overrides`])
//! are the contract with the control side; behind them are the token buckets
//! ([`outrelay_io::rate::Bucket`], lock-free, shared by every worker through `Arc`), their
//! use on the splice path (TCP and TLS leases: `worker/claim.rs`), on UDP leases (a datagram
//! over the limit is dropped, `rate_limited`) and on service streams (the provider tenant's
//! limit; the stream waits for tokens, never drops), the `[bandwidth]` defaults of relay.toml
//! (live on SIGHUP) and the counters.
//!
//! Buckets live in one table keyed by scope: a lease's `(tenant, name)` and a tenant. The
//! lease entries follow the lease table (synced at every publish: [`Bandwidth::sync_leases`]),
//! so the table is bounded by the lease table's caps, not by public input; a tenant's entry
//! lives while a lease or a service stream of it holds it. Every rate change (defaults,
//! overrides) re-rates every live bucket at once: running transfers read the rate on their
//! next read. Leases' limits do not apply to service streams (they have no lease); the
//! provider tenant's limit does.
//!
//! Where a limit comes from, most specific first: the controller's record for the lease
//! (`outrelay leases limit --tenant T --name N`), else the relay's `[bandwidth]` lease default;
//! and independently the controller's record for the tenant, else the relay's tenant default.
//! A transfer is held to both its lease's and its tenant's limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use outrelay_io::Limits;
use outrelay_io::rate::{Bucket, clock_ns};
use outrelay_proto::reverse::LeaseId;

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

/// The `[bandwidth]` defaults of relay.toml: what a scope without a controller record gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Defaults {
    /// Each lease (`lease_to_service_bytes_per_s`, `lease_to_client_bytes_per_s`).
    pub lease: Limit,
    /// Each tenant, all its leases and service streams together (`tenant_to_*`).
    pub tenant: Limit,
}

/// One scope's buckets, one per direction.
#[derive(Debug, Default)]
pub struct Buckets {
    /// Public client (or consumer) → service.
    pub to_service: Arc<Bucket>,
    /// Service → public client (or consumer).
    pub to_client: Arc<Bucket>,
}

impl Buckets {
    fn set(&self, limit: Limit) {
        self.to_service.set_rate(limit.to_service_bytes_per_s);
        self.to_client.set_rate(limit.to_client_bytes_per_s);
    }

    /// The rates in force.
    pub fn limit(&self) -> Limit {
        Limit {
            to_service_bytes_per_s: self.to_service.rate_bytes_per_s(),
            to_client_bytes_per_s: self.to_client.rate_bytes_per_s(),
        }
    }

    /// Bytes that went through these buckets: `[to_service, to_client]`.
    pub fn moved_bytes(&self) -> [u64; 2] {
        [self.to_service.moved_bytes(), self.to_client.moved_bytes()]
    }

    /// Time transfers waited for these buckets, ns: `[to_service, to_client]`.
    pub fn throttled_ns(&self) -> [u64; 2] {
        [
            self.to_service.throttled_ns(),
            self.to_client.throttled_ns(),
        ]
    }
}

/// A lease's buckets, with its tenant's.
#[derive(Debug)]
pub struct LeaseBandwidth {
    /// The lease's tenant.
    pub tenant: String,
    /// The lease's name.
    pub name: String,
    /// The lease's own buckets.
    pub lease: Buckets,
    /// Its tenant's (shared by every lease and service stream of the tenant).
    pub tenant_buckets: Arc<Buckets>,
    /// Datagrams of this UDP lease dropped over its (or its tenant's) limit.
    pub udp_rate_limited: AtomicU64,
}

impl LeaseBandwidth {
    /// The buckets a public client → agent direction is held to.
    pub fn to_service(&self) -> Limits {
        Limits::new(
            Some(self.lease.to_service.clone()),
            Some(self.tenant_buckets.to_service.clone()),
        )
    }

    /// The buckets an agent → public client direction is held to.
    pub fn to_client(&self) -> Limits {
        Limits::new(
            Some(self.lease.to_client.clone()),
            Some(self.tenant_buckets.to_client.clone()),
        )
    }

    /// Its limit in force and counters.
    pub fn counters(&self) -> LeaseCounters {
        LeaseCounters {
            limit: self.lease.limit(),
            throttled_ms: self.lease.throttled_ns().map(|ns| ns / 1_000_000),
            udp_rate_limited: self.udp_rate_limited.load(Ordering::Relaxed),
            bytes: self.lease.moved_bytes(),
        }
    }

    /// Whether one datagram of `bytes` may go now (`to_service`: client → agent); charged to
    /// both buckets when it may. `false`: drop it (counted here; the caller counts the
    /// reason).
    pub fn admit_datagram(&self, to_service: bool, bytes: usize) -> bool {
        let (lease, tenant) = if to_service {
            (&self.lease.to_service, &self.tenant_buckets.to_service)
        } else {
            (&self.lease.to_client, &self.tenant_buckets.to_client)
        };
        if lease.rate_bytes_per_s() == 0 && tenant.rate_bytes_per_s() == 0 {
            lease.add_moved_bytes(bytes as u64);
            tenant.add_moved_bytes(bytes as u64);
            return true;
        }
        let now_ns = clock_ns(std::time::Instant::now());
        let want = bytes as u64;
        if lease.available(now_ns) < want || tenant.available(now_ns) < want {
            self.udp_rate_limited.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        lease.consume(want, now_ns);
        tenant.consume(want, now_ns);
        lease.add_moved_bytes(want);
        tenant.add_moved_bytes(want);
        true
    }
}

/// Throttled time of buckets no longer in the table, so the totals only grow:
/// `[lease, tenant][to_service, to_client]`, ns.
type Retired = [[u64; 2]; 2];

#[derive(Debug, Default)]
struct Table {
    defaults: Defaults,
    leases: HashMap<(String, String), Arc<LeaseBandwidth>>,
    tenants: HashMap<String, Arc<Buckets>>,
    retired: Retired,
}

impl Table {
    fn limit(&self, overrides: &HashMap<Scope, Limit>, scope: &Scope) -> Limit {
        overrides.get(scope).copied().unwrap_or(match scope {
            Scope::Tenant(_) => self.defaults.tenant,
            Scope::Lease { .. } => self.defaults.lease,
        })
    }

    fn tenant(&mut self, overrides: &HashMap<Scope, Limit>, tenant: &str) -> Arc<Buckets> {
        if let Some(b) = self.tenants.get(tenant) {
            return b.clone();
        }
        let b = Arc::new(Buckets::default());
        b.set(self.limit(overrides, &Scope::Tenant(tenant.to_owned())));
        self.tenants.insert(tenant.to_owned(), b.clone());
        b
    }

    fn rerate(&self, overrides: &HashMap<Scope, Limit>) {
        for ((tenant, name), l) in &self.leases {
            let scope = Scope::Lease {
                tenant: tenant.clone(),
                name: name.clone(),
            };
            l.lease.set(self.limit(overrides, &scope));
        }
        for (tenant, b) in &self.tenants {
            b.set(self.limit(overrides, &Scope::Tenant(tenant.clone())));
        }
    }

    fn retire(retired: &mut [u64; 2], b: &Buckets) {
        let [s, c] = b.throttled_ns();
        retired[0] += s;
        retired[1] += c;
    }
}

/// A lease's limits and counters for `relay status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCounters {
    /// The lease's own limit in force (0 = none).
    pub limit: Limit,
    /// Time its transfers waited for the lease's buckets, ms: `[to_service, to_client]`.
    pub throttled_ms: [u64; 2],
    /// UDP datagrams dropped over the limit.
    pub udp_rate_limited: u64,
    /// Bytes of its spliced pairs (read from the source) and UDP datagrams (admitted):
    /// `[to_service, to_client]`.
    pub bytes: [u64; 2],
}

/// A tenant's limit and throttled time for `relay status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantCounters {
    /// The tenant.
    pub tenant: String,
    /// Its limit in force (0 = none).
    pub limit: Limit,
    /// Time its transfers waited for the tenant's buckets, ms: `[to_service, to_client]`.
    pub throttled_ms: [u64; 2],
}

/// The relay's limits: controller overrides over the configured defaults.
#[derive(Debug, Default)]
pub struct Bandwidth {
    overrides: arc_swap::ArcSwap<HashMap<Scope, Limit>>,
    /// Control side only (publishes, reloads, controller updates, status): never per byte.
    table: Mutex<Table>,
    /// The data path's view: each live lease's buckets by lease id, swapped at each sync.
    by_lease: arc_swap::ArcSwap<HashMap<LeaseId, Arc<LeaseBandwidth>>>,
}

impl Bandwidth {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces every controller override at once (a Watch snapshot, or after any live
    /// LIMIT decision the whole set again); a scope missing from `overrides` falls back to the
    /// configured default. Running transfers follow within a second.
    pub fn replace_overrides(&self, overrides: HashMap<Scope, Limit>) {
        let table = self.table();
        self.overrides.store(Arc::new(overrides));
        table.rerate(&self.overrides.load());
    }

    /// The controller overrides in force.
    pub fn overrides(&self) -> Arc<HashMap<Scope, Limit>> {
        self.overrides.load_full()
    }

    /// Takes the `[bandwidth]` defaults (at start and on each reload); every bucket follows.
    pub fn set_defaults(&self, defaults: Defaults) {
        let mut table = self.table();
        table.defaults = defaults;
        table.rerate(&self.overrides.load());
    }

    /// The `[bandwidth]` defaults in force.
    pub fn defaults(&self) -> Defaults {
        self.table().defaults
    }

    /// Makes the table follow the live leases `(id, tenant, name)`: new leases get buckets
    /// (an existing `(tenant, name)` keeps its own, so a re-registered lease keeps its
    /// counters), gone ones are dropped (their throttled time kept in the totals), and
    /// tenants no lease or stream holds any more are dropped too. Called at each publish.
    pub fn sync_leases<'a>(&self, leases: impl IntoIterator<Item = (LeaseId, &'a str, &'a str)>) {
        let overrides = self.overrides.load();
        let mut table = self.table();
        let mut old = std::mem::take(&mut table.leases);
        let mut by_lease = HashMap::new();
        for (id, tenant, name) in leases {
            let key = (tenant.to_owned(), name.to_owned());
            let known = table.leases.get(&key).cloned().or_else(|| old.remove(&key));
            let entry = match known {
                Some(e) => e,
                None => {
                    let tenant_buckets = table.tenant(&overrides, tenant);
                    let lease = Buckets::default();
                    lease.set(table.limit(
                        &overrides,
                        &Scope::Lease {
                            tenant: key.0.clone(),
                            name: key.1.clone(),
                        },
                    ));
                    Arc::new(LeaseBandwidth {
                        tenant: key.0.clone(),
                        name: key.1.clone(),
                        lease,
                        tenant_buckets,
                        udp_rate_limited: AtomicU64::new(0),
                    })
                }
            };
            by_lease.insert(id, entry.clone());
            table.leases.insert(key, entry);
        }
        for gone in old.into_values() {
            Table::retire(&mut table.retired[0], &gone.lease);
        }
        // The data path's view first: the old one still holds the gone leases' tenants.
        self.by_lease.store(Arc::new(by_lease));
        prune_tenants(&mut table);
    }

    /// The buckets of live lease `id` (the data path: one map lookup per claim or flow).
    pub fn lease(&self, id: &LeaseId) -> Option<Arc<LeaseBandwidth>> {
        self.by_lease.load().get(id).cloned()
    }

    /// A tenant's buckets (service streams of a provider tenant), created on first use.
    pub fn tenant(&self, tenant: &str) -> Arc<Buckets> {
        let overrides = self.overrides.load();
        self.table().tenant(&overrides, tenant)
    }

    /// Every live lease's limit and counters, keyed by `(tenant, name)`.
    pub fn lease_counters(&self) -> HashMap<(String, String), LeaseCounters> {
        let table = self.table();
        table
            .leases
            .iter()
            .map(|(k, l)| (k.clone(), l.counters()))
            .collect()
    }

    /// Every live tenant's limit and throttled time, sorted by tenant.
    pub fn tenant_counters(&self) -> Vec<TenantCounters> {
        let table = self.table();
        let mut out: Vec<TenantCounters> = table
            .tenants
            .iter()
            .map(|(t, b)| TenantCounters {
                tenant: t.clone(),
                limit: b.limit(),
                throttled_ms: b.throttled_ns().map(|ns| ns / 1_000_000),
            })
            .collect();
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }

    /// Total time transfers waited for tokens since start, ns:
    /// `[lease, tenant][to_service, to_client]` (for `/metrics`; never decreases).
    pub fn throttled_ns_total(&self) -> [[u64; 2]; 2] {
        let table = self.table();
        let mut t = table.retired;
        for l in table.leases.values() {
            let [s, c] = l.lease.throttled_ns();
            t[0][0] += s;
            t[0][1] += c;
        }
        for b in table.tenants.values() {
            let [s, c] = b.throttled_ns();
            t[1][0] += s;
            t[1][1] += c;
        }
        t
    }
}

/// Drops tenants only the table holds (no lease, no stream), keeping their throttled time.
fn prune_tenants(table: &mut Table) {
    let Table {
        tenants, retired, ..
    } = table;
    tenants.retain(|_, b| {
        let held = Arc::strong_count(b) > 1;
        if !held {
            Table::retire(&mut retired[1], b);
        }
        held
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> LeaseId {
        LeaseId([n; 16])
    }

    fn limit(s: u64, c: u64) -> Limit {
        Limit {
            to_service_bytes_per_s: s,
            to_client_bytes_per_s: c,
        }
    }

    #[test]
    fn overrides_win_over_defaults_and_every_change_rerates_live_buckets() {
        let bw = Bandwidth::default();
        bw.set_defaults(Defaults {
            lease: limit(100, 200),
            tenant: limit(1000, 0),
        });
        bw.sync_leases([(id(1), "t", "a"), (id(2), "t", "b"), (id(3), "u", "c")]);
        let a = bw.lease(&id(1)).expect("lease a");
        let held = a.to_client(); // what a running pair holds
        assert_eq!(a.lease.limit(), limit(100, 200));
        assert_eq!(a.tenant_buckets.limit(), limit(1000, 0));
        // Both leases of tenant t share one tenant bucket.
        let b = bw.lease(&id(2)).expect("lease b");
        assert!(Arc::ptr_eq(&a.tenant_buckets, &b.tenant_buckets));
        let mut o = HashMap::new();
        o.insert(
            Scope::Lease {
                tenant: "t".into(),
                name: "a".into(),
            },
            limit(5, 6),
        );
        o.insert(Scope::Tenant("u".into()), limit(7, 8));
        bw.replace_overrides(o);
        assert_eq!(a.lease.limit(), limit(5, 6));
        assert_eq!(
            held.buckets[0].as_ref().map(|b| b.rate_bytes_per_s()),
            Some(6),
            "a running pair's bucket follows at once"
        );
        assert_eq!(b.lease.limit(), limit(100, 200), "b keeps the default");
        let c = bw.lease(&id(3)).expect("lease c");
        assert_eq!(c.tenant_buckets.limit(), limit(7, 8));
        // A reload of the defaults: overridden scopes keep their override.
        bw.set_defaults(Defaults::default());
        assert_eq!(a.lease.limit(), limit(5, 6));
        assert_eq!(b.lease.limit(), limit(0, 0));
        // Overrides gone: back to the defaults.
        bw.replace_overrides(HashMap::new());
        assert_eq!(a.lease.limit(), limit(0, 0));
    }

    #[test]
    fn the_table_follows_the_leases_and_keeps_throttled_totals() {
        let bw = Bandwidth::default();
        bw.sync_leases([(id(1), "t", "a"), (id(2), "u", "b")]);
        let a = bw.lease(&id(1)).expect("a");
        a.lease.to_client.add_throttled_ns(3_000_000_000);
        a.tenant_buckets.to_service.add_throttled_ns(2_000_000_000);
        drop(a);
        assert_eq!(bw.tenant_counters().len(), 2);
        // Lease a is gone: its entry and its tenant (held by nothing else) go, the totals stay.
        bw.sync_leases([(id(2), "u", "b")]);
        assert!(bw.lease(&id(1)).is_none());
        assert_eq!(bw.lease_counters().len(), 1);
        assert_eq!(bw.tenant_counters().len(), 1);
        let t = bw.throttled_ns_total();
        assert_eq!(t[0][1], 3_000_000_000);
        assert_eq!(t[1][0], 2_000_000_000);
        // A tenant held by a service stream stays while it is held.
        let stream = bw.tenant("v");
        bw.sync_leases([(id(2), "u", "b")]);
        assert!(bw.tenant_counters().iter().any(|t| t.tenant == "v"));
        drop(stream);
        bw.sync_leases([(id(2), "u", "b")]);
        assert!(!bw.tenant_counters().iter().any(|t| t.tenant == "v"));
        // Many publishes of the same leases do not grow anything.
        for _ in 0..100 {
            bw.sync_leases([(id(2), "u", "b")]);
        }
        assert_eq!(bw.lease_counters().len(), 1);
        // A re-registered lease (new id, same name) keeps its buckets and counters.
        let before = bw.lease(&id(2)).expect("b");
        bw.sync_leases([(id(9), "u", "b")]);
        assert!(Arc::ptr_eq(&before, &bw.lease(&id(9)).expect("b again")));
    }

    #[test]
    fn datagrams_over_the_limit_are_refused_and_counted() {
        let bw = Bandwidth::default();
        bw.set_defaults(Defaults {
            lease: limit(100_000, 0),
            tenant: Limit::default(),
        });
        bw.sync_leases([(id(1), "t", "a")]);
        let a = bw.lease(&id(1)).expect("a");
        // The burst (64 KiB) goes, then nothing until tokens come back.
        let sent = (0..200).filter(|_| a.admit_datagram(true, 1000)).count();
        assert!((60..=70).contains(&sent), "{sent}");
        assert_eq!(a.counters().udp_rate_limited, 200 - sent as u64);
        // The other direction is unlimited.
        assert!((0..200).all(|_| a.admit_datagram(false, 1000)));
    }
}
