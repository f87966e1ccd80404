//! Ingress counters: every refusal and drop by a named reason (the metric label).

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a public connection or reverse session was refused or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Drop {
    /// ClientHello: no SNI.
    NoSni,
    /// ClientHello: the SNI names no lease.
    UnknownHost,
    /// ClientHello: not TLS, malformed, or refused by the parser (see `hello_refused`).
    BadHello,
    /// ClientHello: plain HTTP on the TLS port.
    PlainHttp,
    /// ClientHello: IP-literal SNI.
    IpLiteralSni,
    /// ClientHello: not complete within the deadline.
    HelloTimeout,
    /// No idle reverse session within the claim timeout.
    ClaimTimeout,
    /// Too many connections already waiting for a session of this lease.
    ClaimWaitersFull,
    /// An idle session turned out closed by the agent.
    DeadSession,
    /// A reverse session arrived while the lease's ready queue was full.
    ReadyQueueFull,
    /// A keep-alive could not be written at once.
    KeepaliveFailed,
    /// The lease ended while sessions were idle.
    LeaseGone,
    /// Reverse handshake: bad preamble.
    BadPreamble,
    /// Reverse handshake: the lease id is not live on this relay.
    UnknownLease,
    /// Reverse handshake: the MAC did not verify (wrong key, or a lease of another connection).
    BadMac,
    /// Reverse handshake: not complete within the deadline.
    HandshakeTimeout,
    /// Writing the marker and replayed bytes to a claimed session failed.
    MarkerWriteFailed,
    /// The splice engine refused the pair (full).
    EngineFull,
    /// A TCP lease port has no route (any more).
    NoTcpRoute,
    /// The lease already has `lease_conn_max` public connections.
    LeaseConnLimit,
    /// `pending_conn_max` public connections are already in set-up.
    PendingFull,
    /// The SNI is the root host but no root-host listener is configured (or it is unreachable).
    RootUnavailable,
}

impl Drop {
    /// Every reason, in counter order.
    pub const ALL: [Drop; 22] = [
        Drop::NoSni,
        Drop::UnknownHost,
        Drop::BadHello,
        Drop::PlainHttp,
        Drop::IpLiteralSni,
        Drop::HelloTimeout,
        Drop::ClaimTimeout,
        Drop::ClaimWaitersFull,
        Drop::DeadSession,
        Drop::ReadyQueueFull,
        Drop::KeepaliveFailed,
        Drop::LeaseGone,
        Drop::BadPreamble,
        Drop::UnknownLease,
        Drop::BadMac,
        Drop::HandshakeTimeout,
        Drop::MarkerWriteFailed,
        Drop::EngineFull,
        Drop::NoTcpRoute,
        Drop::LeaseConnLimit,
        Drop::PendingFull,
        Drop::RootUnavailable,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Drop::NoSni => "no_sni",
            Drop::UnknownHost => "unknown_host",
            Drop::BadHello => "bad_hello",
            Drop::PlainHttp => "plain_http",
            Drop::IpLiteralSni => "ip_literal_sni",
            Drop::HelloTimeout => "hello_timeout",
            Drop::ClaimTimeout => "claim_timeout",
            Drop::ClaimWaitersFull => "claim_waiters_full",
            Drop::DeadSession => "dead_session",
            Drop::ReadyQueueFull => "ready_queue_full",
            Drop::KeepaliveFailed => "keepalive_failed",
            Drop::LeaseGone => "lease_gone",
            Drop::BadPreamble => "bad_preamble",
            Drop::UnknownLease => "unknown_lease",
            Drop::BadMac => "bad_mac",
            Drop::HandshakeTimeout => "handshake_timeout",
            Drop::MarkerWriteFailed => "marker_write_failed",
            Drop::EngineFull => "engine_full",
            Drop::NoTcpRoute => "no_tcp_route",
            Drop::LeaseConnLimit => "lease_conn_limit",
            Drop::PendingFull => "pending_full",
            Drop::RootUnavailable => "root_unavailable",
        }
    }
}

/// Counters shared by the ingress tasks (relaxed atomics: they are statistics).
#[derive(Debug, Default)]
pub struct IngressStats {
    drops: [AtomicU64; Drop::ALL.len()],
    /// Public connections handed to the splice engine.
    pub spliced: AtomicU64,
    /// Reverse sessions authenticated.
    pub sessions_authenticated: AtomicU64,
    /// Public connections for the root host handed to the root-host listener.
    pub root_host: AtomicU64,
}

impl IngressStats {
    /// Counts one drop.
    pub fn drop(&self, reason: Drop) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The count of one reason.
    pub fn drops(&self, reason: Drop) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }
}
