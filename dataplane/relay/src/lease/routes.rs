//! The immutable route snapshot built from the lease table and published by the relay (one
//! `ArcSwap` swap per change); workers only read it.

use std::collections::HashMap;

use outrelay_proto::hostname::HostName;
use outrelay_proto::reverse::LeaseId;

use super::ConnId;

/// Where a public connection or datagram for a lease goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// The lease.
    pub lease_id: LeaseId,
    /// The agent's QUIC connection that holds the lease (its reverse sessions serve it).
    pub conn: ConnId,
    /// The lease's tenant (for per-tenant counters; never shown on the public side).
    pub tenant: String,
    /// The lease's hostname `<name>.<root_host>`.
    pub hostname: String,
    /// The lease's UDP slot on its connection (0 when the lease has no UDP port).
    pub udp_slot: u32,
    /// Claims write marker 0x03/0x04 + the client's address block, datagrams carry the block.
    pub client_addr: bool,
}

/// An immutable snapshot of every live lease's routes. There is no default route: the root
/// host itself is served by the relay and is never a lease route.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    pub(crate) exact: HashMap<Box<str>, RouteEntry>,
    /// Keyed by the wildcard's parent: `*.demo.example.com` is stored as `demo.example.com`.
    pub(crate) wildcard: HashMap<Box<str>, RouteEntry>,
    pub(crate) tcp: HashMap<u16, RouteEntry>,
    pub(crate) udp: HashMap<u16, RouteEntry>,
    /// UDP lease port by (connection, slot): where an agent's datagram goes.
    pub(crate) udp_slots: HashMap<(ConnId, u32), u16>,
}

impl RouteTable {
    /// The route for a TLS ClientHello's SNI: the exact hostname first, then a one-level
    /// wildcard (`*.p` matches `x.p`, never `y.x.p`). `None`: no route (the caller drops the
    /// connection, counted).
    pub fn lookup_sni(&self, sni: &HostName) -> Option<&RouteEntry> {
        self.exact
            .get(sni.as_str())
            .or_else(|| sni.parent().and_then(|p| self.wildcard.get(p)))
    }

    /// The route for a public TCP port.
    pub fn lookup_tcp(&self, port: u16) -> Option<&RouteEntry> {
        self.tcp.get(&port)
    }

    /// The route for a public UDP port.
    pub fn lookup_udp(&self, port: u16) -> Option<&RouteEntry> {
        self.udp.get(&port)
    }

    /// Every exact hostname route (for the admin socket and tests).
    pub fn hostnames(&self) -> impl Iterator<Item = (&str, &RouteEntry)> {
        self.exact.iter().map(|(k, v)| (&**k, v))
    }

    /// Every wildcard route, keyed by the wildcard's parent name.
    pub fn wildcard_parents(&self) -> impl Iterator<Item = (&str, &RouteEntry)> {
        self.wildcard.iter().map(|(k, v)| (&**k, v))
    }

    /// Every TCP port route.
    pub fn tcp_ports(&self) -> impl Iterator<Item = (u16, &RouteEntry)> {
        self.tcp.iter().map(|(k, v)| (*k, v))
    }

    /// The UDP lease port of `slot` on connection `conn` (slots are per connection, so a
    /// datagram can only reach leases of the connection it arrived on).
    pub fn lookup_udp_slot(&self, conn: ConnId, slot: u32) -> Option<u16> {
        self.udp_slots.get(&(conn, slot)).copied()
    }

    /// Every UDP port route.
    pub fn udp_ports(&self) -> impl Iterator<Item = (u16, &RouteEntry)> {
        self.udp.iter().map(|(k, v)| (*k, v))
    }

    /// Total number of routes of every kind.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len() + self.tcp.len() + self.udp.len()
    }

    /// True when there is no route at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
