//! Leases carried across a hitless upgrade (issue 20). The stub of this round's U1 part: U2
//! implements these three functions (reservations seeded, public connections waiting for an
//! agent that has not re-registered yet); U1 calls them.

use super::LeaseTable;

/// A lease the old process held at a hand-over (issue 20): the new process reserves its
/// name and ports to its agent and lets public connections to it wait for the agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InheritedLease {
    /// The owner's tenant.
    pub tenant: String,
    /// The owner's identity URI.
    pub agent_uri: String,
    /// The lease name as registered.
    pub name: String,
    /// The SNI host name it serves (`<name>.<root_host>`), if TLS.
    pub hostname: Option<String>,
    /// Its TCP lease port, if any.
    pub tcp_port: Option<u16>,
    /// Its UDP lease port, if any.
    pub udp_port: Option<u16>,
}

impl LeaseTable {
    /// The leases to hand to a new process (stub until U2).
    pub fn inherited_leases(&self) -> Vec<InheritedLease> {
        Vec::new()
    }

    /// Reserves `leases` to their agents in the new process (stub until U2).
    pub fn inherit(&mut self, leases: &[InheritedLease], now: std::time::Instant) {
        let _ = (leases, now);
    }
}

impl crate::ingress::Ingress {
    /// Lets public connections to `leases` wait up to `wait_ms` for their agents (stub until
    /// U2).
    pub fn expect_leases(&self, leases: &[InheritedLease], wait_ms: u64) {
        let _ = (leases, wait_ms);
    }
}
