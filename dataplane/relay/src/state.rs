//! What the control side (QUIC connections, lease table) publishes to the data path
//! (listeners, reverse sessions): one immutable [`Snapshot`], swapped whole through an
//! `ArcSwap` whenever leases change. Readers load it per connection; nothing is locked and no
//! reader ever sees half an update.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use outrelay_proto::reverse::{EXPORTER_KEY_BYTES, LeaseId};
use tokio::sync::watch;

use crate::lease::{ConnId, RouteTable};

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

/// The shared handle: control publishes, the data path loads.
#[derive(Debug)]
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    /// The generation of the last publish, for tasks that act on changes (binding lease ports).
    changed: watch::Sender<u64>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            snapshot: ArcSwap::default(),
            changed: watch::channel(0).0,
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
        self.changed.send_replace(generation);
    }

    /// Wakes on every publish (the value is the generation).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
