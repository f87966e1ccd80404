//! One public port allocator (the relay keeps one for TCP and one for UDP over the same
//! configured range): lowest free port first, and a released port stays reserved for its
//! `(agent identity, name)` for the reservation period and is handed back to it (sticky).

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use super::ReservationKey;

/// Ports of one transport. Every port of the range is in exactly one of `free`, `held`,
/// `reserved` (checked by the property test through [`PortAllocator::check_invariants`]).
#[derive(Debug)]
pub(crate) struct PortAllocator {
    /// `None` when the configured range is unusable (`min_port == 0` or `min_port > max_port`).
    range: Option<(u16, u16)>,
    /// Neither held by a live lease nor reserved: `first()` is the lowest free port.
    free: BTreeSet<u16>,
    /// Held by a live lease.
    held: BTreeSet<u16>,
    /// Released recently: reserved to an `(agent identity, name)` until the instant.
    reserved: HashMap<u16, (ReservationKey, Instant)>,
    /// The reverse index of `reserved` (one reserved port per key at most).
    sticky: HashMap<ReservationKey, u16>,
}

impl PortAllocator {
    /// An allocator over `min_port..=max_port`; an invalid range allocates nothing.
    pub(crate) fn new(min_port: u16, max_port: u16) -> PortAllocator {
        let range = (min_port != 0 && min_port <= max_port).then_some((min_port, max_port));
        let free = match range {
            Some((lo, hi)) => (lo..=hi).collect(),
            None => BTreeSet::new(),
        };
        PortAllocator {
            range,
            free,
            held: BTreeSet::new(),
            reserved: HashMap::new(),
            sticky: HashMap::new(),
        }
    }

    /// True when the configured range is usable.
    pub(crate) fn range_is_valid(&self) -> bool {
        self.range.is_some()
    }

    /// Number of ports held by live leases.
    pub(crate) fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Frees every reservation that ended at or before `now`.
    pub(crate) fn expire(&mut self, now: Instant) {
        let ended: Vec<u16> = self
            .reserved
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(port, _)| *port)
            .collect();
        for port in ended {
            if let Some((key, _)) = self.reserved.remove(&port) {
                self.sticky.remove(&key);
            }
            self.free.insert(port);
        }
    }

    /// The earliest end of a reservation, if any.
    pub(crate) fn next_until(&self) -> Option<Instant> {
        self.reserved.values().map(|(_, until)| *until).min()
    }

    /// The port `key` would get now, without taking it: its sticky port if one is reserved
    /// to it, else the lowest free port. `None` when the range is exhausted. Call
    /// [`PortAllocator::expire`] first.
    pub(crate) fn pick(&self, key: &ReservationKey) -> Option<u16> {
        self.sticky
            .get(key)
            .copied()
            .or_else(|| self.free.first().copied())
    }

    /// Marks `port` (from [`PortAllocator::pick`]) held by a live lease.
    pub(crate) fn take(&mut self, port: u16) {
        self.free.remove(&port);
        if let Some((key, _)) = self.reserved.remove(&port) {
            self.sticky.remove(&key);
        }
        self.held.insert(port);
    }

    /// Gives `port` back from a lease that ended; it stays reserved to `key` until `until`.
    pub(crate) fn release(&mut self, port: u16, key: ReservationKey, until: Instant) {
        self.held.remove(&port);
        if let Some(old) = self.sticky.insert(key.clone(), port)
            && old != port
        {
            // A key keeps one sticky port: the older one becomes free.
            self.reserved.remove(&old);
            self.free.insert(old);
        }
        self.reserved.insert(port, (key, until));
    }

    /// Reserves `port` to `key` until `until` (a lease inherited at an upgrade): from free, or
    /// taken over from another reservation; `key`'s older sticky port, if another, becomes
    /// free. False (nothing changes) when `port` is outside the range or held by a live lease.
    pub(crate) fn reserve(&mut self, port: u16, key: ReservationKey, until: Instant) -> bool {
        let in_range = self.range.is_some_and(|(lo, hi)| (lo..=hi).contains(&port));
        if !in_range || self.held.contains(&port) {
            return false;
        }
        if let Some((old_key, _)) = self.reserved.remove(&port) {
            self.sticky.remove(&old_key);
        }
        self.free.remove(&port);
        if let Some(old) = self.sticky.insert(key.clone(), port)
            && old != port
        {
            self.reserved.remove(&old);
            self.free.insert(old);
        }
        self.reserved.insert(port, (key, until));
        true
    }

    /// Panics (tests only) when a port is in two states or outside the range.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let Some((lo, hi)) = self.range else {
            assert!(self.free.is_empty() && self.held.is_empty() && self.reserved.is_empty());
            return;
        };
        let total = usize::from(hi - lo) + 1;
        assert_eq!(
            self.free.len() + self.held.len() + self.reserved.len(),
            total,
            "every port in exactly one state"
        );
        for port in self
            .free
            .iter()
            .chain(&self.held)
            .chain(self.reserved.keys())
        {
            assert!((lo..=hi).contains(port), "port {port} outside {lo}..={hi}");
        }
        for port in &self.held {
            assert!(!self.free.contains(port) && !self.reserved.contains_key(port));
        }
        for (key, port) in &self.sticky {
            assert_eq!(self.reserved.get(port).map(|(k, _)| k), Some(key));
        }
        assert_eq!(self.sticky.len(), self.reserved.len());
    }
}
