//! Connection caps of the ingress, each a config key and each refusal a named drop reason:
//!
//! - live public connections (admitted to a lease: claim wait, marker, spliced pair) per lease
//!   (`lease_conn_max`), per tenant (`tenant_conn_max`) and per source (`source_conn_max`);
//! - public connections in set-up (ClientHello peek, route lookup) across the relay
//!   (`pending_conn_max`) and per source (`pending_per_source_max`);
//! - every public connection, pending or live, against the file-descriptor budget
//!   (`public_conn_max`, derived from `RLIMIT_NOFILE` by [`public_conn_budget`]).
//!
//! A source is an IPv4 address or an IPv6 /64 ([`SourceKey`]): one host gets one budget
//! however many addresses of its prefix it uses. A live connection's engine tag maps back to
//! its lease, tenant and source: whoever drives an engine passes its
//! [`outrelay_io::Finished`] list to [`LeaseConns::finished`]. Each mutex is taken once when a
//! connection is admitted and once when it ends, never per byte and never across I/O.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use outrelay_io::Finished;
use outrelay_proto::reverse::LeaseId;

use super::stats;

/// Who a budget is charged to: an IPv4 address, or the /64 of an IPv6 address (an
/// IPv4-mapped IPv6 address counts as its IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// One IPv4 address.
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
}

impl SourceKey {
    /// The budget key of `ip`.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    SourceKey::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }
}

/// Counts per key with a cap (per-source pending connections, reverse handshakes per source,
/// unauthenticated reverse sessions per lease). Keys at zero are forgotten, so the map holds
/// only keys with something in flight.
#[derive(Debug)]
pub struct KeyedCounts<K> {
    inner: Mutex<HashMap<K, usize>>,
}

impl<K> Default for KeyedCounts<K> {
    fn default() -> Self {
        KeyedCounts {
            inner: Mutex::new(HashMap::new()),
        }
    }
}

/// One place of a [`KeyedCounts`]; dropping it gives the place back.
#[derive(Debug)]
pub struct KeyedSlot<K: Eq + Hash> {
    counts: Arc<KeyedCounts<K>>,
    key: K,
}

impl<K: Eq + Hash + Copy> KeyedCounts<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, usize>> {
        // Plain counters: still consistent after a panic elsewhere.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One more place for `key` unless it already has `max`.
    pub fn acquire(self: &Arc<Self>, key: K, max: usize) -> Option<KeyedSlot<K>> {
        let mut map = self.lock();
        let n = map.entry(key).or_insert(0);
        if *n >= max {
            if *n == 0 {
                map.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(KeyedSlot {
            counts: self.clone(),
            key,
        })
    }

    /// Places `key` holds now.
    pub fn count(&self, key: &K) -> usize {
        self.lock().get(key).copied().unwrap_or(0)
    }

    /// Keys holding at least one place (bounded by what is in flight).
    pub fn keys(&self) -> usize {
        self.lock().len()
    }
}

impl<K: Eq + Hash + Copy> KeyedSlot<K> {
    /// The key this place is counted under.
    pub(crate) fn key(&self) -> K {
        self.key
    }
}

impl<K: Eq + Hash> Drop for KeyedSlot<K> {
    fn drop(&mut self) {
        let mut map = self
            .counts
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// A global count with a cap (lock-free).
#[derive(Debug, Default)]
pub struct Gauge {
    count: AtomicUsize,
}

/// One place of a [`Gauge`]; dropping it gives the place back.
#[derive(Debug)]
pub struct GaugeSlot {
    gauge: Arc<Gauge>,
}

impl Gauge {
    /// One more place unless `max` are taken.
    pub fn acquire(self: &Arc<Self>, max: usize) -> Option<GaugeSlot> {
        let before = self.count.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(GaugeSlot {
            gauge: self.clone(),
        })
    }

    /// Places taken now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

impl Drop for GaugeSlot {
    fn drop(&mut self) {
        self.gauge.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The caps a live public connection is admitted against.
#[derive(Debug, Clone, Copy)]
pub struct LiveCaps {
    /// Per lease (`lease_conn_max`).
    pub lease_max: usize,
    /// Per tenant of the lease (`tenant_conn_max`).
    pub tenant_max: usize,
    /// Per source address or /64 (`source_conn_max`).
    pub source_max: usize,
}

/// Whom a live connection is charged to.
#[derive(Debug, Clone)]
struct Owner {
    lease: LeaseId,
    tenant: String,
    source: SourceKey,
}

#[derive(Debug, Default)]
struct Inner {
    per_lease: HashMap<LeaseId, usize>,
    per_tenant: HashMap<String, usize>,
    per_source: HashMap<SourceKey, usize>,
    by_tag: HashMap<u64, Owner>,
    next_tag: u64,
}

/// Concurrent live public connections per lease, tenant and source, shared by the ingress and
/// the engines' drivers.
#[derive(Debug, Default)]
pub struct LeaseConns {
    inner: Mutex<Inner>,
    /// Every live connection (mirrors the maps, read without the lock).
    total: AtomicUsize,
}

/// One admitted public connection; dropping it gives the places back unless it was handed to
/// a splice engine with [`ConnSlot::into_tag`].
#[derive(Debug)]
pub struct ConnSlot {
    conns: Arc<LeaseConns>,
    owner: Option<Owner>,
}

impl LeaseConns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain counters: still consistent after a panic elsewhere.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits one more connection of `lease` (of `tenant`, from `source`) unless one of the
    /// caps is reached; the refusal names the first cap that was (lease, tenant, source).
    ///
    /// # Errors
    /// [`stats::Drop::LeaseConnLimit`], [`stats::Drop::TenantConnLimit`] or [`stats::Drop::SourceConnLimit`].
    pub fn admit(
        self: &Arc<Self>,
        lease: LeaseId,
        tenant: &str,
        source: SourceKey,
        caps: LiveCaps,
    ) -> Result<ConnSlot, stats::Drop> {
        let mut inner = self.lock();
        if inner.per_lease.get(&lease).copied().unwrap_or(0) >= caps.lease_max {
            return Err(stats::Drop::LeaseConnLimit);
        }
        if inner.per_tenant.get(tenant).copied().unwrap_or(0) >= caps.tenant_max {
            return Err(stats::Drop::TenantConnLimit);
        }
        if inner.per_source.get(&source).copied().unwrap_or(0) >= caps.source_max {
            return Err(stats::Drop::SourceConnLimit);
        }
        *inner.per_lease.entry(lease).or_insert(0) += 1;
        match inner.per_tenant.get_mut(tenant) {
            Some(n) => *n += 1,
            None => {
                inner.per_tenant.insert(tenant.to_owned(), 1);
            }
        }
        *inner.per_source.entry(source).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::AcqRel);
        Ok(ConnSlot {
            conns: self.clone(),
            owner: Some(Owner {
                lease,
                tenant: tenant.to_owned(),
                source,
            }),
        })
    }

    /// Current live connections of every lease.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Current connections of `lease`.
    pub fn count(&self, lease: &LeaseId) -> usize {
        self.lock().per_lease.get(lease).copied().unwrap_or(0)
    }

    /// Current connections of `tenant`.
    pub fn tenant_count(&self, tenant: &str) -> usize {
        self.lock().per_tenant.get(tenant).copied().unwrap_or(0)
    }

    /// Current connections from `source`.
    pub fn source_count(&self, source: &SourceKey) -> usize {
        self.lock().per_source.get(source).copied().unwrap_or(0)
    }

    /// Gives back the places of pairs the engine has finished (tags from
    /// [`ConnSlot::into_tag`]; unknown tags are ignored).
    pub fn finished(&self, finished: &[Finished]) {
        if finished.is_empty() {
            return;
        }
        let mut inner = self.lock();
        for f in finished {
            if let Some(owner) = inner.by_tag.remove(&f.tag) {
                self.release(&mut inner, &owner);
            }
        }
    }

    /// Gives back the place of one tag (a pair the engine refused).
    pub fn release_tag(&self, tag: u64) {
        let mut inner = self.lock();
        if let Some(owner) = inner.by_tag.remove(&tag) {
            self.release(&mut inner, &owner);
        }
    }

    /// The engine tags of the live pairs of `leases` (every worker's: each closes its own).
    /// Scans every pair under the lock: for the rare cut of a banned or revoked lease.
    pub fn tags_of(&self, leases: &[LeaseId]) -> std::collections::HashSet<u64> {
        self.lock()
            .by_tag
            .iter()
            .filter(|(_, owner)| leases.contains(&owner.lease))
            .map(|(tag, _)| *tag)
            .collect()
    }

    fn release(&self, inner: &mut Inner, owner: &Owner) {
        decrement(&mut inner.per_lease, &owner.lease);
        decrement(&mut inner.per_tenant, owner.tenant.as_str());
        decrement(&mut inner.per_source, &owner.source);
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnSlot {
    /// The lease this connection is charged to.
    pub fn lease(&self) -> Option<&LeaseId> {
        self.owner.as_ref().map(|o| &o.lease)
    }

    /// Turns the slot into an engine tag: the places are now given back by
    /// [`LeaseConns::finished`] (or [`LeaseConns::release_tag`]) for that tag.
    pub fn into_tag(mut self) -> u64 {
        let owner = self.owner.take();
        let mut inner = self.conns.lock();
        inner.next_tag = inner.next_tag.wrapping_add(1);
        let tag = inner.next_tag;
        if let Some(owner) = owner {
            inner.by_tag.insert(tag, owner);
        }
        tag
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            let mut inner = self.conns.lock();
            self.conns.release(&mut inner, &owner);
        }
    }
}

fn decrement<K, Q>(map: &mut HashMap<K, usize>, key: &Q)
where
    K: std::borrow::Borrow<Q> + Eq + Hash,
    Q: Eq + Hash + ?Sized,
{
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Public connections in set-up (ClientHello peek and route lookup; released when the
/// connection is admitted to a lease or handed to the root host) across the relay and per
/// source.
#[derive(Debug, Default)]
pub struct PendingConns {
    global: Arc<Gauge>,
    per_source: Arc<KeyedCounts<SourceKey>>,
}

/// One pending connection; dropping it gives both places back.
#[derive(Debug)]
pub struct PendingSlot {
    _global: GaugeSlot,
    _source: KeyedSlot<SourceKey>,
}

impl PendingConns {
    /// Admits one more pending connection from `source` unless `max` are pending, or
    /// `per_source_max` from that source.
    ///
    /// # Errors
    /// [`stats::Drop::PendingFull`] or [`stats::Drop::PendingPerSource`].
    pub fn acquire(
        &self,
        source: SourceKey,
        max: usize,
        per_source_max: usize,
    ) -> Result<PendingSlot, stats::Drop> {
        let global = self.global.acquire(max).ok_or(stats::Drop::PendingFull)?;
        let source = self
            .per_source
            .acquire(source, per_source_max)
            .ok_or(stats::Drop::PendingPerSource)?;
        Ok(PendingSlot {
            _global: global,
            _source: source,
        })
    }

    /// Connections pending now.
    pub fn count(&self) -> usize {
        self.global.count()
    }

    /// Connections pending now from `source`.
    pub fn source_count(&self, source: &SourceKey) -> usize {
        self.per_source.count(source)
    }
}

/// Descriptors kept out of the public-connection budget by default: listeners, the QUIC
/// socket, idle and pending reverse sessions, the root host's loopback pair, UDP lease ports,
/// metrics and admin connections, the controller channel.
pub const DEFAULT_FD_RESERVE: usize = 2048;

/// The soft `RLIMIT_NOFILE` of this process (from `/proc/self/limits`); `None` when it cannot
/// be read or is unlimited.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The most public connections (pending or live) the descriptors allow: each spliced pair
/// costs two descriptors on the relay, and `reserve` (at most half of the limit) is kept for
/// everything else. `nofile = None` (unlimited or unknown) gives `fallback`.
pub fn public_conn_budget(nofile: Option<u64>, reserve: usize, fallback: usize) -> usize {
    let Some(nofile) = nofile.and_then(|n| usize::try_from(n).ok()) else {
        return fallback;
    };
    let reserve = reserve.min(nofile / 2);
    (nofile.saturating_sub(reserve) / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A4: SourceKey = SourceKey::V4([10, 0, 0, 1]);
    const B4: SourceKey = SourceKey::V4([10, 0, 0, 2]);

    fn caps(lease_max: usize, tenant_max: usize, source_max: usize) -> LiveCaps {
        LiveCaps {
            lease_max,
            tenant_max,
            source_max,
        }
    }

    #[test]
    fn lease_places_are_capped_and_given_back_by_drop_or_by_tag() {
        let conns = Arc::new(LeaseConns::default());
        let (a, b) = (LeaseId([1; 16]), LeaseId([2; 16]));
        let c = caps(2, 100, 100);
        let s1 = conns.admit(a, "t", A4, c).expect("first");
        let s2 = conns.admit(a, "t", A4, c).expect("second");
        assert_eq!(
            conns.admit(a, "t", A4, c).err(),
            Some(stats::Drop::LeaseConnLimit)
        );
        assert!(
            conns.admit(b, "t", A4, c).is_ok(),
            "another lease is not affected"
        );
        drop(s1);
        assert_eq!(conns.count(&a), 1);
        let tag = s2.into_tag();
        assert_eq!(conns.count(&a), 1, "a tagged pair still holds its place");
        let done = Finished {
            tag,
            bytes: [0, 0],
            reason: outrelay_io::CloseReason::Completed,
        };
        conns.finished(&[done]);
        assert_eq!(conns.count(&a), 0);
        conns.finished(&[done]);
        assert_eq!(conns.count(&a), 0, "a tag is given back once");
        assert_eq!(conns.total(), 0);
        assert_eq!(conns.tenant_count("t"), 0);
        assert_eq!(conns.source_count(&A4), 0);
    }

    #[test]
    fn tenant_and_source_caps_refuse_by_name_and_spare_the_others() {
        let conns = Arc::new(LeaseConns::default());
        let (a, b) = (LeaseId([1; 16]), LeaseId([2; 16]));
        let c = caps(100, 2, 3);
        let _t1 = conns.admit(a, "acme", A4, c).expect("1");
        let _t2 = conns.admit(b, "acme", B4, c).expect("2");
        assert_eq!(
            conns.admit(a, "acme", B4, c).err(),
            Some(stats::Drop::TenantConnLimit),
            "the tenant's two places span its leases"
        );
        let _o1 = conns.admit(a, "other", A4, c).expect("another tenant");
        let _o2 = conns.admit(a, "other2", A4, c).expect("source place 3");
        assert_eq!(
            conns.admit(b, "third", A4, c).err(),
            Some(stats::Drop::SourceConnLimit)
        );
        assert!(conns.admit(b, "third", B4, c).is_ok(), "another source");
        assert_eq!(conns.total(), 4, "refusals took nothing");
    }

    #[test]
    fn pending_places_are_capped_globally_and_per_source() {
        let pending = PendingConns::default();
        let p1 = pending.acquire(A4, 3, 1).expect("first");
        assert_eq!(
            pending.acquire(A4, 3, 1).err(),
            Some(stats::Drop::PendingPerSource)
        );
        let p2 = pending.acquire(B4, 2, 1).expect("another source");
        assert_eq!(
            pending.acquire(SourceKey::V4([1, 1, 1, 1]), 2, 1).err(),
            Some(stats::Drop::PendingFull)
        );
        assert_eq!(pending.count(), 2, "refusals gave their places back");
        drop((p1, p2));
        assert_eq!(pending.count(), 0);
        assert_eq!(pending.source_count(&A4), 0);
        assert!(pending.acquire(A4, 1, 1).is_ok());
    }

    #[test]
    fn ipv6_sources_share_a_budget_per_64_and_mapped_ipv4_is_ipv4() {
        let k = |s: &str| SourceKey::of(s.parse().expect("ip"));
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
        assert_ne!(k("192.0.2.7"), k("192.0.2.8"));
    }

    #[test]
    fn the_public_budget_leaves_the_reserve_and_two_fds_per_pair() {
        assert_eq!(public_conn_budget(Some(65_536), 2048, 7), 31_744);
        assert_eq!(public_conn_budget(Some(4096), 2048, 7), 1024);
        assert_eq!(public_conn_budget(Some(1024), 2048, 7), 256);
        assert_eq!(public_conn_budget(None, 2048, 7), 7);
        assert!(public_conn_budget(Some(1), 2048, 7) >= 1);
    }
}
