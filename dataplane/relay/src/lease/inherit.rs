//! Leases inherited at a hitless upgrade (issue 20): the old process sends the list of its
//! live leases ([`LeaseTable::inherited_leases`]) to the new one, which reserves each lease's
//! name and ports to its agent ([`LeaseTable::inherit`]: the agent re-registering gets the same
//! name and ports, nobody else can take them) and lets public connections to them wait for the
//! agent instead of being refused ([`Expected`], published in [`crate::state::Shared`] by
//! [`crate::ingress::Ingress::expect_leases`]).
//!
//! Pure like the rest of the table: no sockets, no clock (`now` is passed in).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use outrelay_proto::hostname::{HostName, LeaseName};
use outrelay_proto::identity::Identity;

use super::{LeaseTable, NameReservation, ReservationKey, RouteTable};

/// A lease the old process held at a hand-over (issue 20): the new process reserves its
/// name and ports to its agent and lets public connections to it wait for the agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InheritedLease {
    /// The agent's tenant.
    pub tenant: String,
    /// The agent's identity URI (`outrelay://<tenant>/agent/<uuid>`).
    pub agent_uri: String,
    /// The lease name as registered (normalised).
    pub name: String,
    /// The SNI host name it serves (`<name>.<root_host>`), if a TLS lease.
    pub hostname: Option<String>,
    /// Its public TCP port, if a TCP lease.
    pub tcp_port: Option<u16>,
    /// Its public UDP port, if a UDP lease.
    pub udp_port: Option<u16>,
}

/// What [`LeaseTable::inherit`] did with a list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inherited {
    /// Names reserved to their agents.
    pub names: usize,
    /// TCP and UDP ports reserved to their agents.
    pub ports: usize,
    /// Entries (or ports of entries) skipped: a bad name or identity, a name or port held by
    /// a live lease here already, a port outside this relay's range.
    pub skipped: usize,
}

impl LeaseTable {
    /// Every live lease, for the hand-over (sorted by name).
    pub fn inherited_leases(&self) -> Vec<InheritedLease> {
        let mut leases: Vec<InheritedLease> = self
            .leases
            .values()
            .map(|l| InheritedLease {
                tenant: l.owner.tenant.clone(),
                agent_uri: l.owner.agent_uri.clone(),
                name: l.name.as_str().to_owned(),
                hostname: l.tls.then(|| l.hostname.as_str().to_owned()),
                tcp_port: l.tcp_port,
                udp_port: l.udp_port,
            })
            .collect();
        leases.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        leases
    }

    /// Seeds name and port reservations to each lease's agent identity (the existing
    /// reservation mechanism, review M12 / sticky ports), for the reservation period, so the
    /// agent re-registering gets the same name and ports and nobody else can take them.
    ///
    /// Call it before the table serves agents. An entry whose name is already held by a live
    /// lease here is skipped (whoever holds it registered first); a port outside this relay's
    /// range or held by a live lease is skipped; an existing reservation of the name or port
    /// is replaced (the old process's live lease is the newer fact).
    pub fn inherit(&mut self, leases: &[InheritedLease], now: Instant) -> Inherited {
        self.expire(now);
        let until = now.checked_add(self.reservation()).unwrap_or(now);
        let mut done = Inherited::default();
        for l in leases {
            let owner_ok = Identity::parse(&l.agent_uri).is_ok_and(
                |id| matches!(&id, Identity::Agent { tenant, .. } if tenant.as_str() == l.tenant),
            );
            let name = LeaseName::parse(&l.name).ok();
            let Some(name) = name.filter(|_| owner_ok) else {
                done.skipped += 1;
                continue;
            };
            if self.by_name.contains_key(&name) {
                done.skipped += 1;
                continue;
            }
            self.name_reservations.insert(
                name.clone(),
                NameReservation {
                    tenant: l.tenant.clone(),
                    agent_uri: l.agent_uri.clone(),
                    until,
                },
            );
            done.names += 1;
            let key: ReservationKey = (l.agent_uri.clone(), name);
            for (port, alloc) in [(l.tcp_port, &mut self.tcp), (l.udp_port, &mut self.udp)] {
                let Some(port) = port else { continue };
                if alloc.reserve(port, key.clone(), until) {
                    done.ports += 1;
                } else {
                    done.skipped += 1;
                }
            }
        }
        self.lower_deadline(until);
        done
    }
}

/// Host names and lease ports the relay expects a lease for (inherited at an upgrade), each
/// until an instant: a public connection to one of them that finds no route waits instead of
/// being refused. Immutable once published (see [`crate::state::Shared::expect`]).
#[derive(Debug, Clone, Default)]
pub struct Expected {
    hosts: HashMap<HostName, Instant>,
    tcp: HashMap<u16, Instant>,
    udp: HashMap<u16, Instant>,
}

impl Expected {
    /// This set plus `leases`, expected until `until` (an entry already expected keeps the
    /// later of its two ends). Host names that do not parse are left out.
    pub fn with(&self, leases: &[InheritedLease], until: Instant) -> Expected {
        let mut next = self.clone();
        let later = |slot: &mut Instant| *slot = (*slot).max(until);
        for l in leases {
            if let Some(host) = l
                .hostname
                .as_deref()
                .and_then(|h| HostName::parse(h.as_bytes()).ok())
            {
                later(next.hosts.entry(host).or_insert(until));
            }
            if let Some(p) = l.tcp_port {
                later(next.tcp.entry(p).or_insert(until));
            }
            if let Some(p) = l.udp_port {
                later(next.udp.entry(p).or_insert(until));
            }
        }
        next
    }

    /// True when nothing is expected (not even an entry that ended and is not pruned yet).
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.tcp.is_empty() && self.udp.is_empty()
    }

    /// Whether a lease for the SNI host name `host` is expected at `now`.
    pub fn host(&self, host: &HostName, now: Instant) -> bool {
        self.hosts.get(host).is_some_and(|until| now < *until)
    }

    /// Whether a lease of TCP port `port` is expected at `now`.
    pub fn tcp(&self, port: u16, now: Instant) -> bool {
        self.tcp.get(&port).is_some_and(|until| now < *until)
    }

    /// Whether a lease of UDP port `port` is expected at `now`.
    pub fn udp(&self, port: u16, now: Instant) -> bool {
        self.udp.get(&port).is_some_and(|until| now < *until)
    }

    /// The set without what `routes` now serves and what ended at or before `now`; `None`
    /// when nothing would change.
    pub fn pruned(&self, routes: &RouteTable, now: Instant) -> Option<Expected> {
        let next = Expected {
            hosts: self
                .hosts
                .iter()
                .filter(|(h, until)| now < **until && !routes.exact.contains_key(h.as_str()))
                .map(|(h, u)| (*h, *u))
                .collect(),
            tcp: self
                .tcp
                .iter()
                .filter(|(p, until)| now < **until && routes.lookup_tcp(**p).is_none())
                .map(|(p, u)| (*p, *u))
                .collect(),
            udp: self
                .udp
                .iter()
                .filter(|(p, until)| now < **until && routes.lookup_udp(**p).is_none())
                .map(|(p, u)| (*p, *u))
                .collect(),
        };
        let same = next.hosts.len() == self.hosts.len()
            && next.tcp.len() == self.tcp.len()
            && next.udp.len() == self.udp.len();
        (!same).then_some(next)
    }

    /// When the earliest expectation ends, if any.
    pub fn next_end(&self) -> Option<Instant> {
        self.hosts
            .values()
            .chain(self.tcp.values())
            .chain(self.udp.values())
            .min()
            .copied()
    }
}

/// The TCP and UDP lease ports that must reach the relay: every routed port and every port
/// still expected. ONE computation for everything that opens ports: the plain listeners'
/// maintenance tick ([`crate::ingress::Ingress::serve_maintenance`]) and the eBPF lookup map
/// ([`crate::steer::Steering::sync_ports`]); see [`crate::state::Shared::wanted_ports`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WantedPorts {
    /// TCP lease ports.
    pub tcp: BTreeSet<u16>,
    /// UDP lease ports.
    pub udp: BTreeSet<u16>,
}

impl WantedPorts {
    /// The ports `routes` holds plus the ports `expected` still expects at `now`.
    pub fn of(routes: &RouteTable, expected: &Expected, now: Instant) -> WantedPorts {
        let live = |m: &HashMap<u16, Instant>| -> Vec<u16> {
            m.iter()
                .filter(|(_, until)| now < **until)
                .map(|(p, _)| *p)
                .collect()
        };
        WantedPorts {
            tcp: routes
                .tcp_ports()
                .map(|(p, _)| p)
                .chain(live(&expected.tcp))
                .collect(),
            udp: routes
                .udp_ports()
                .map(|(p, _)| p)
                .chain(live(&expected.udp))
                .collect(),
        }
    }
}

/// The longest an expectation lasts, whatever `wait_ms` says (a day: an upgrade's agents come
/// back within seconds; this only keeps `Instant` arithmetic from overflowing).
pub const EXPECT_WAIT_MAX_MS: u64 = 24 * 60 * 60 * 1000;

/// When an expectation of `wait_ms` made at `now` ends (`wait_ms` capped at
/// [`EXPECT_WAIT_MAX_MS`]).
pub fn expected_until(now: Instant, wait_ms: u64) -> Instant {
    let wait = Duration::from_millis(wait_ms.min(EXPECT_WAIT_MAX_MS));
    now.checked_add(wait).unwrap_or(now)
}
