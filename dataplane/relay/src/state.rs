//! What the control side (QUIC connections, lease table) publishes to the data path
//! (listeners, reverse sessions): one immutable [`Snapshot`], swapped whole through an
//! `ArcSwap` whenever leases change. Readers load it per connection; nothing is locked and no
//! reader ever sees half an update.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use outrelay_proto::reverse::{EXPORTER_KEY_BYTES, LeaseId};
use tokio::sync::watch;

use crate::lease::{ConnId, Expected, InheritedLease, RouteTable, WantedPorts, expected_until};

/// The per-lease reverse-session key: the TLS exporter of the QUIC connection that holds the
/// lease (label `EXPORTER-outrelay-reverse-v1`, context = lease id, 32 bytes).
pub type ReverseKey = [u8; EXPORTER_KEY_BYTES];

/// One consistent view of every live lease.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Routes by SNI, TCP port and UDP port.
    pub routes: RouteTable,
    /// The reverse-session key of every live lease, keyed by lease id. A lease whose QUIC
    /// connection is gone is absent, so its sessions are refused.
    pub reverse_keys: HashMap<LeaseId, ReverseKey>,
    /// The QUIC connection of every agent that holds a UDP lease (its port tasks send client
    /// datagrams on it).
    pub udp_conns: HashMap<ConnId, quinn::Connection>,
    /// Increases with every published change.
    pub generation: u64,
}

/// Called after a publish while leases are expected (the workers' wake-up, so that public
/// connections waiting for an inherited lease are re-checked at once).
pub struct PublishHook(pub Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for PublishHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublishHook")
    }
}

/// The shared handle: control publishes, the data path loads.
#[derive(Debug)]
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    /// The generation of the last publish, for tasks that act on changes (binding lease ports).
    changed: watch::Sender<u64>,
    /// Leases inherited at an upgrade that no route serves yet (issue 20); empty otherwise.
    expected: ArcSwap<Expected>,
    /// Publishes so far (workers compare it to re-check waiting connections).
    publishes: AtomicU64,
    /// See [`PublishHook`]; set once by [`crate::worker::start`].
    hook: OnceLock<PublishHook>,
    /// Bandwidth limits (issue 21): the buckets of every live lease and tenant, read by the
    /// workers at each claim, by UDP ports per datagram, by service streams.
    pub bandwidth: Arc<crate::bandwidth::Bandwidth>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            snapshot: ArcSwap::default(),
            changed: watch::channel(0).0,
            expected: ArcSwap::default(),
            publishes: AtomicU64::new(0),
            hook: OnceLock::new(),
            bandwidth: Arc::default(),
        }
    }
}

impl Shared {
    /// The current snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the snapshot (control side only).
    pub fn publish(&self, snapshot: Snapshot) {
        let generation = snapshot.generation;
        self.snapshot.store(Arc::new(snapshot));
        self.publishes.fetch_add(1, Ordering::Release);
        self.changed.send_replace(generation);
        if !self.expected.load().is_empty() {
            // Expectations end when their lease is routed; waiting connections look again.
            self.prune_expected(Instant::now());
            if let Some(hook) = self.hook.get() {
                (hook.0)();
            }
        }
    }

    /// Publishes so far.
    pub fn publishes(&self) -> u64 {
        self.publishes.load(Ordering::Acquire)
    }

    /// Sets the hook called after each publish while leases are expected (once; later calls
    /// are ignored).
    pub fn set_publish_hook(&self, hook: PublishHook) {
        let _ = self.hook.set(hook);
    }

    /// The leases expected now (issue 20).
    pub fn expected(&self) -> Arc<Expected> {
        self.expected.load_full()
    }

    /// Expects `leases` for `wait_ms` from now: public connections to their host names and
    /// ports that find no route wait (see [`crate::ingress::Ingress::expect_leases`]).
    pub fn expect(&self, leases: &[InheritedLease], wait_ms: u64) {
        let until = expected_until(Instant::now(), wait_ms);
        self.expected
            .rcu(|current| Arc::new(current.with(leases, until)));
        self.prune_expected(Instant::now());
    }

    /// Drops expectations that ended at `now` or whose lease is routed. Returns whether
    /// anything changed.
    pub fn prune_expected(&self, now: Instant) -> bool {
        let mut changed = false;
        self.expected.rcu(|current| {
            let routes = &self.snapshot.load().routes;
            match current.pruned(routes, now) {
                Some(next) => {
                    changed = true;
                    Arc::new(next)
                }
                None => {
                    changed = false;
                    current.clone()
                }
            }
        });
        changed
    }

    /// The TCP and UDP lease ports that must reach the relay at `now`: routed or expected.
    /// The one computation behind the plain listeners' maintenance tick and the eBPF lookup
    /// map ([`WantedPorts`]).
    pub fn wanted_ports(&self, now: Instant) -> WantedPorts {
        WantedPorts::of(&self.snapshot.load().routes, &self.expected.load(), now)
    }

    /// Wakes on every publish (the value is the generation).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
