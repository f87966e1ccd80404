//! UDP lease counters: every dropped datagram by a named reason (the metric label).

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum UdpDrop {
    /// A client datagram for a port whose lease is gone.
    NoRoute,
    /// The lease's agent connection is gone or cannot carry datagrams.
    NoAgent,
    /// Larger than the agent connection's current maximum datagram size (or than the
    /// receive slot): never truncated, dropped.
    TooLarge,
    /// The agent connection's datagram send buffer is full (newest dropped).
    ToAgentQueueFull,
    /// The port's queue of agent datagrams is full (newest dropped).
    FromAgentQueueFull,
    /// A new client while the lease already has `flow_max` flows, none evictable.
    FlowLimit,
    /// A new client whose address (or IPv6 /64) already has `flow_per_source_max` flows of
    /// the lease.
    FlowPerSource,
    /// A reply beyond 3 × the bytes its client sent since (no reflection amplifier).
    Amplification,
    /// An agent datagram for a slot not granted on its own connection.
    UnknownSlot,
    /// An agent datagram for a flow id this lease did not create (or that idled out).
    UnknownFlow,
    /// An agent datagram whose header does not decode.
    BadHeader,
    /// The lease port's socket did not take a reply at once.
    SendFailed,
    /// The lease port's queue of client datagrams from the lease-range sockets (eBPF lookup)
    /// is full (newest dropped).
    ClientQueueFull,
    /// A client datagram for a port whose lease is expected (inherited at an upgrade, issue
    /// 20) but not registered here yet: dropped, not buffered.
    LeaseWait,
    /// Over the lease's or its tenant's bandwidth limit (`[bandwidth]`, controller records):
    /// dropped, never queued (also counted per lease).
    RateLimited,
}

impl UdpDrop {
    /// Every reason, in counter order.
    pub const ALL: [UdpDrop; 15] = [
        UdpDrop::NoRoute,
        UdpDrop::NoAgent,
        UdpDrop::TooLarge,
        UdpDrop::ToAgentQueueFull,
        UdpDrop::FromAgentQueueFull,
        UdpDrop::FlowLimit,
        UdpDrop::FlowPerSource,
        UdpDrop::Amplification,
        UdpDrop::UnknownSlot,
        UdpDrop::UnknownFlow,
        UdpDrop::BadHeader,
        UdpDrop::SendFailed,
        UdpDrop::ClientQueueFull,
        UdpDrop::LeaseWait,
        UdpDrop::RateLimited,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            UdpDrop::NoRoute => "no_route",
            UdpDrop::NoAgent => "no_agent",
            UdpDrop::TooLarge => "udp_too_large",
            UdpDrop::ToAgentQueueFull => "to_agent_queue_full",
            UdpDrop::FromAgentQueueFull => "from_agent_queue_full",
            UdpDrop::FlowLimit => "flow_limit",
            UdpDrop::FlowPerSource => "flow_per_source",
            UdpDrop::Amplification => "amplification_limit",
            UdpDrop::UnknownSlot => "unknown_slot",
            UdpDrop::UnknownFlow => "unknown_flow",
            UdpDrop::BadHeader => "bad_header",
            UdpDrop::SendFailed => "send_failed",
            UdpDrop::ClientQueueFull => "client_queue_full",
            UdpDrop::LeaseWait => "lease_wait",
            UdpDrop::RateLimited => "rate_limited",
        }
    }
}

/// Counters shared by the UDP port tasks and the agent connections (relaxed atomics).
#[derive(Debug, Default)]
pub struct UdpStats {
    drops: [AtomicU64; UdpDrop::ALL.len()],
    /// Client datagrams sent to agents.
    pub to_agent_datagrams: AtomicU64,
    /// Their payload bytes.
    pub to_agent_bytes: AtomicU64,
    /// Agent datagrams sent to clients.
    pub to_client_datagrams: AtomicU64,
    /// Their payload bytes.
    pub to_client_bytes: AtomicU64,
    /// Flows created.
    pub flows_created: AtomicU64,
    /// Flows ended by the idle timeout.
    pub flows_expired: AtomicU64,
    /// Flows evicted from a full table for a new client (`flow_evict_idle_ms`).
    pub flows_evicted: AtomicU64,
    /// Flows alive now (all ports).
    pub flows_active: AtomicU64,
    /// Lease ports bound now.
    pub ports_bound: AtomicU64,
    /// The largest payload the last port to send could carry to its agent (the QUIC path's
    /// maximum datagram size less the header); moves with path MTU discovery.
    pub payload_max_bytes: AtomicU64,
}

impl UdpStats {
    /// Counts `n` drops of one reason.
    pub fn dropped_n(&self, reason: UdpDrop, n: u64) {
        self.drops[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one drop.
    pub fn dropped(&self, reason: UdpDrop) {
        self.dropped_n(reason, 1);
    }

    /// The count of one reason.
    pub fn drops(&self, reason: UdpDrop) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }
}
