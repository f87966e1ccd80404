//! Connection caps of the ingress: concurrent public connections per lease (`lease_conn_max`)
//! and public connections still in set-up across the relay (`pending_conn_max`).
//!
//! A lease's count covers a public connection from its route lookup (claim wait, marker) until
//! the splice engine reports its pair finished. The pair's engine tag maps back to the lease:
//! whoever drives an engine passes its [`outrelay_io::Finished`] list to
//! [`LeaseConns::finished`]. The mutex is taken once when a connection is admitted and once
//! when it ends, never per byte and never across I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use outrelay_io::Finished;
use outrelay_proto::reverse::LeaseId;

#[derive(Debug, Default)]
struct Inner {
    per_lease: HashMap<LeaseId, usize>,
    by_tag: HashMap<u64, LeaseId>,
    next_tag: u64,
}

/// Concurrent public connections per lease, shared by the ingress and the engines' drivers.
#[derive(Debug, Default)]
pub struct LeaseConns {
    inner: Mutex<Inner>,
}

/// One admitted public connection of a lease; dropping it gives the place back unless it was
/// handed to a splice engine with [`ConnSlot::into_tag`].
#[derive(Debug)]
pub struct ConnSlot {
    conns: Arc<LeaseConns>,
    lease: LeaseId,
    armed: bool,
}

impl LeaseConns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain counters: still consistent after a panic elsewhere.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits one more connection of `lease` unless it already has `max`.
    pub fn acquire(self: &Arc<Self>, lease: LeaseId, max: usize) -> Option<ConnSlot> {
        let mut inner = self.lock();
        let n = inner.per_lease.entry(lease).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            conns: self.clone(),
            lease,
            armed: true,
        })
    }

    /// Current connections of every lease.
    pub fn total(&self) -> usize {
        self.lock().per_lease.values().sum()
    }

    /// Current connections of `lease`.
    pub fn count(&self, lease: &LeaseId) -> usize {
        self.lock().per_lease.get(lease).copied().unwrap_or(0)
    }

    /// Gives back the places of pairs the engine has finished (tags from
    /// [`ConnSlot::into_tag`]; unknown tags are ignored).
    pub fn finished(&self, finished: &[Finished]) {
        if finished.is_empty() {
            return;
        }
        let mut inner = self.lock();
        for f in finished {
            release_tag(&mut inner, f.tag);
        }
    }

    /// Gives back the place of one tag (a pair the engine refused).
    pub fn release_tag(&self, tag: u64) {
        release_tag(&mut self.lock(), tag);
    }
}

impl ConnSlot {
    /// Turns the slot into an engine tag: the place is now given back by
    /// [`LeaseConns::finished`] (or [`LeaseConns::release_tag`]) for that tag.
    pub fn into_tag(mut self) -> u64 {
        self.armed = false;
        let mut inner = self.conns.lock();
        inner.next_tag = inner.next_tag.wrapping_add(1);
        let tag = inner.next_tag;
        inner.by_tag.insert(tag, self.lease);
        tag
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if self.armed {
            decrement(&mut self.conns.lock(), &self.lease);
        }
    }
}

fn release_tag(inner: &mut Inner, tag: u64) {
    if let Some(lease) = inner.by_tag.remove(&tag) {
        decrement(inner, &lease);
    }
}

fn decrement(inner: &mut Inner, lease: &LeaseId) {
    if let Some(n) = inner.per_lease.get_mut(lease) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            inner.per_lease.remove(lease);
        }
    }
}

/// Public connections in set-up (ClientHello peek, claim wait, marker write; the root-host
/// copy for its whole life) across the relay.
#[derive(Debug, Default)]
pub struct PendingConns {
    count: AtomicUsize,
}

/// One pending connection; dropping it gives the place back.
#[derive(Debug)]
pub struct PendingSlot<'a> {
    count: &'a AtomicUsize,
}

impl PendingConns {
    /// Admits one more pending connection unless `max` are pending.
    pub fn acquire(&self, max: usize) -> Option<PendingSlot<'_>> {
        let before = self.count.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(PendingSlot { count: &self.count })
    }

    /// Connections pending now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_places_are_capped_and_given_back_by_drop_or_by_tag() {
        let conns = Arc::new(LeaseConns::default());
        let (a, b) = (LeaseId([1; 16]), LeaseId([2; 16]));
        let s1 = conns.acquire(a, 2).expect("first");
        let s2 = conns.acquire(a, 2).expect("second");
        assert!(conns.acquire(a, 2).is_none(), "third refused");
        assert!(
            conns.acquire(b, 2).is_some(),
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
    }

    #[test]
    fn pending_places_are_capped() {
        let pending = PendingConns::default();
        let p1 = pending.acquire(1).expect("first");
        assert!(pending.acquire(1).is_none());
        drop(p1);
        assert!(pending.acquire(1).is_some());
        assert_eq!(pending.count(), 0);
    }
}
