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
    /// Reverse handshake: a version 1 (one-way) preamble while `ingress.reverse_accept_v1` is
    /// off.
    ReverseV1Refused,
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
    /// `pending_per_source_max` connections from this address (or IPv6 /64) are in set-up.
    PendingPerSource,
    /// The lease's tenant already has `tenant_conn_max` live public connections.
    TenantConnLimit,
    /// This address (or IPv6 /64) already has `source_conn_max` live public connections.
    SourceConnLimit,
    /// `public_conn_max` public connections (pending and live: the descriptor budget) exist;
    /// accepted and reset at once.
    PublicConnFull,
    /// accept(2) failed for want of descriptors (EMFILE/ENFILE): the connection was taken
    /// with the listener's reserve descriptor and reset at once.
    FdExhausted,
    /// The root host's pool (`root_conn_max`) is full.
    RootFull,
    /// This address (or IPv6 /64) already holds `root_per_source_max` root-host connections.
    RootPerSource,
    /// `reverse_pending_max` reverse handshakes are in progress.
    ReversePendingFull,
    /// `reverse_pending_per_source_max` reverse handshakes from this address (or /64).
    ReversePendingPerSource,
    /// The lease already has `reverse_unauth_per_lease_max` sessions past the preamble whose
    /// MAC is not verified yet.
    ReverseUnauthPerLease,
    /// A public connection waited for an expected (inherited) lease that did not come within
    /// its wait (issue 20).
    LeaseWaitTimeout,
    /// Already as many public connections wait for this expected name or port on this worker
    /// as the claim waiters' bound allows.
    LeaseWaitFull,
    /// TLS on the reverse-session port that is not an agent's TCP fallback tunnel (SNI not the
    /// root host, no ALPN `orp/1`, or no fallback acceptor).
    ReversePortTls,
}

impl Drop {
    /// Every reason, in counter order.
    pub const ALL: [Drop; 36] = [
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
        Drop::ReverseV1Refused,
        Drop::HandshakeTimeout,
        Drop::MarkerWriteFailed,
        Drop::EngineFull,
        Drop::NoTcpRoute,
        Drop::LeaseConnLimit,
        Drop::PendingFull,
        Drop::RootUnavailable,
        Drop::PendingPerSource,
        Drop::TenantConnLimit,
        Drop::SourceConnLimit,
        Drop::PublicConnFull,
        Drop::FdExhausted,
        Drop::RootFull,
        Drop::RootPerSource,
        Drop::ReversePendingFull,
        Drop::ReversePendingPerSource,
        Drop::ReverseUnauthPerLease,
        Drop::LeaseWaitTimeout,
        Drop::LeaseWaitFull,
        Drop::ReversePortTls,
    ];

    /// Whether the connection is reset (SO_LINGER 0) rather than closed: a refusal at a cap,
    /// so the client learns at once and the relay keeps no TIME_WAIT. Protocol failures and
    /// timeouts close normally.
    pub fn resets(self) -> bool {
        matches!(
            self,
            Drop::PendingFull
                | Drop::PendingPerSource
                | Drop::PublicConnFull
                | Drop::FdExhausted
                | Drop::LeaseConnLimit
                | Drop::TenantConnLimit
                | Drop::SourceConnLimit
                | Drop::RootFull
                | Drop::RootPerSource
                | Drop::ReversePendingFull
                | Drop::ReversePendingPerSource
                | Drop::ReverseUnauthPerLease
                | Drop::LeaseWaitFull
        )
    }

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
            Drop::ReverseV1Refused => "reverse_v1_refused",
            Drop::HandshakeTimeout => "handshake_timeout",
            Drop::MarkerWriteFailed => "marker_write_failed",
            Drop::EngineFull => "engine_full",
            Drop::NoTcpRoute => "no_tcp_route",
            Drop::LeaseConnLimit => "lease_conn_limit",
            Drop::PendingFull => "pending_full",
            Drop::RootUnavailable => "root_unavailable",
            Drop::PendingPerSource => "pending_per_source",
            Drop::TenantConnLimit => "tenant_conn_limit",
            Drop::SourceConnLimit => "source_conn_limit",
            Drop::PublicConnFull => "public_conn_full",
            Drop::FdExhausted => "fd_exhausted",
            Drop::RootFull => "root_full",
            Drop::RootPerSource => "root_per_source",
            Drop::ReversePendingFull => "reverse_pending_full",
            Drop::ReversePendingPerSource => "reverse_pending_per_source",
            Drop::ReverseUnauthPerLease => "reverse_unauth_per_lease",
            Drop::LeaseWaitTimeout => "lease_wait_timeout",
            Drop::LeaseWaitFull => "lease_wait_full",
            Drop::ReversePortTls => "reverse_port_tls",
        }
    }
}

/// Why live spliced pairs were cut (closed by the relay, not by their peers): review M5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum CutReason {
    /// The lease's name was banned (`outrelay leases ban`).
    Banned,
    /// The lease's record was denied for its agent (`outrelay leases deny`).
    Denied,
    /// The lease's agent was revoked (`outrelay cert revoke`).
    Revoked,
}

impl CutReason {
    /// Every reason, in counter order.
    pub const ALL: [CutReason; 3] = [CutReason::Banned, CutReason::Denied, CutReason::Revoked];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CutReason::Banned => "banned",
            CutReason::Denied => "denied",
            CutReason::Revoked => "revoked",
        }
    }
}

/// Counters shared by the ingress tasks (relaxed atomics: they are statistics).
#[derive(Debug)]
pub struct IngressStats {
    drops: [AtomicU64; Drop::ALL.len()],
    cuts: [AtomicU64; CutReason::ALL.len()],
    /// Cut orders a worker's full inbox still refused after the retries (its pairs of those
    /// leases then run until they end by themselves).
    pub cut_orders_lost: AtomicU64,
    /// Public connections handed to the splice engine.
    pub spliced: AtomicU64,
    /// Reverse sessions authenticated.
    pub sessions_authenticated: AtomicU64,
    /// Public connections for the root host handed to the root-host listener.
    pub root_host: AtomicU64,
    /// Reverse-session handshakes that arrived on the public TLS port (first bytes `ORRS`
    /// instead of a TLS record): agents whose network allows only 443/tcp.
    pub reverse_via_tls_port: AtomicU64,
    /// Of those, sessions authenticated (also counted in `sessions_authenticated`).
    pub sessions_via_tls_port: AtomicU64,
    /// Agents' TCP fallback tunnels that arrived on the reverse-session port (a root-host
    /// ClientHello offering `orp/1` there) and were handed to the fallback acceptor.
    pub fallback_via_reverse_port: AtomicU64,
}

// By hand: `Default` is derived for arrays of at most 32 elements.
impl Default for IngressStats {
    fn default() -> Self {
        IngressStats {
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            cuts: std::array::from_fn(|_| AtomicU64::new(0)),
            cut_orders_lost: AtomicU64::new(0),
            spliced: AtomicU64::new(0),
            sessions_authenticated: AtomicU64::new(0),
            root_host: AtomicU64::new(0),
            reverse_via_tls_port: AtomicU64::new(0),
            sessions_via_tls_port: AtomicU64::new(0),
            fallback_via_reverse_port: AtomicU64::new(0),
        }
    }
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

    /// Counts `n` pairs cut for `reason`.
    pub fn cut(&self, reason: CutReason, n: u64) {
        self.cuts[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Pairs cut for `reason`.
    pub fn cuts(&self, reason: CutReason) -> u64 {
        self.cuts[reason as usize].load(Ordering::Relaxed)
    }
}
