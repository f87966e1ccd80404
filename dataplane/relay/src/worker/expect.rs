//! Public connections waiting for an expected lease (issue 20): after a hitless upgrade the
//! new process serves the public ports before the agents have re-registered their leases
//! here. A connection whose host name or TCP port has no route but is expected
//! ([`crate::state::Shared::expected`]) waits, holding its pending place, instead of being
//! refused:
//!
//! ```text
//! no route, expected ─► AwaitLease ─┬─ routed (publish wakes us, or the tick) ─► admit ─► claim
//!                                   └─ expectation over, no route ─► lease_wait_timeout
//! ```
//!
//! Bounded per name or port per worker by the claim waiters' share (`lease_wait_full`) and
//! relay-wide by the pending budget. Re-checked when a snapshot is published (the publish hook
//! wakes every worker while leases are expected) and at every tick.

use std::collections::HashMap;

use super::Worker;
use outrelay_proto::reverse::Marker;

use super::conn::{AwaitLease, Conn, LeaseTarget, State};
use crate::ingress::stats::Drop;

/// One worker's connections waiting for an expected lease.
#[derive(Debug, Default)]
pub(crate) struct LeaseWaits {
    /// Keys of waiting connections (a key whose connection moved on is skipped).
    keys: Vec<u64>,
    /// Live waiters per target.
    counts: HashMap<LeaseTarget, usize>,
    /// The publish count when they were last checked.
    seen_publishes: u64,
}

impl LeaseWaits {
    /// True when no connection waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// A waiter of `target` left (admitted, refused or closed).
    pub(crate) fn left(&mut self, target: &LeaseTarget) {
        if let Some(n) = self.counts.get_mut(target) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(target);
            }
        }
        if self.counts.is_empty() {
            self.keys.clear();
        }
    }
}

impl Worker {
    /// `client` has no route, but its lease is expected: wait for it (bounded).
    pub(crate) fn await_lease(&mut self, client: std::net::TcpStream, wait: AwaitLease) {
        let target = wait.target;
        let waiting = self.lease_waits.counts.get(&target).copied().unwrap_or(0);
        if waiting >= self.waiters_max {
            return self.refuse(client, Drop::LeaseWaitFull);
        }
        let conn = Conn {
            socket: client,
            armed: outrelay_io::Interest::NONE,
            state: State::AwaitLease(Box::new(wait)),
        };
        let Some(key) = self.conns.insert(conn) else {
            return; // slab full: dropped (closed)
        };
        if self.lease_waits.is_empty() {
            self.lease_waits.seen_publishes = self.ingress.shared.publishes();
        }
        *self.lease_waits.counts.entry(target).or_insert(0) += 1;
        self.lease_waits.keys.push(key);
    }

    /// Re-checks the waiting connections when a snapshot was published since the last look,
    /// or always with `force` (the tick: expectations end with time, not with a publish).
    pub(crate) fn recheck_lease_waits(&mut self, force: bool) {
        if self.lease_waits.is_empty() {
            return;
        }
        let publishes = self.ingress.shared.publishes();
        if !force && publishes == self.lease_waits.seen_publishes {
            return;
        }
        self.lease_waits.seen_publishes = publishes;
        let snapshot = self.ingress.shared.load();
        let expected = self.ingress.shared.expected();
        let keys = std::mem::take(&mut self.lease_waits.keys);
        let mut keep = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(Conn {
                state: State::AwaitLease(w),
                ..
            }) = self.conns.get(key)
            else {
                continue; // moved on
            };
            let route = match &w.target {
                LeaseTarget::Host(host) => snapshot.routes.lookup_sni(host),
                LeaseTarget::Tcp(port) => snapshot.routes.lookup_tcp(*port),
            };
            let admitted = match route {
                Some(route) => self
                    .ingress
                    .admit_live(route.lease_id, &route.tenant, w.source)
                    .map(|slot| (route.lease_id, slot, route.client_addr)),
                None => {
                    let still = match &w.target {
                        LeaseTarget::Host(host) => expected.host(host, self.now),
                        LeaseTarget::Tcp(port) => expected.tcp(*port, self.now),
                    };
                    if still {
                        keep.push(key);
                        continue;
                    }
                    Err(Drop::LeaseWaitTimeout)
                }
            };
            let Some(conn) = self.take(key) else { continue };
            let State::AwaitLease(w) = conn.state else {
                continue;
            };
            self.lease_waits.left(&w.target);
            let AwaitLease {
                _pending: pending,
                marker,
                replay,
                ..
            } = *w;
            drop(pending);
            match admitted {
                Ok((lease, slot, client_addr)) => {
                    let _ = conn.socket.set_nodelay(true);
                    let marker = Marker::claim(marker == Marker::Tls, client_addr);
                    self.wait_for_session(conn.socket, lease, slot, marker, replay);
                }
                Err(reason) => self.refuse(conn.socket, reason),
            }
        }
        if !self.lease_waits.is_empty() {
            self.lease_waits.keys.extend(keep);
        }
    }
}
