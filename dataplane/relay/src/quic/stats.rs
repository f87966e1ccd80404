//! Counters of the agent endpoint: plain atomics, read by the admin socket and tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use outrelay_proto::frame::FrameType;

use crate::lease::LeaseErrorCode;

/// A per-identity, per-connection or per-tenant budget that refused or slowed something
/// (`outrelay_relay_quic_limited_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A connection refused: its identity already has `quic.max_connections_per_identity`.
    IdentityConnections,
    /// A stream's first frame declared more than the first-frame limit (refused 400).
    FirstFrameTooLarge,
    /// A control-stream frame declared more than the control-frame limit (connection closed).
    ControlFrameTooLarge,
    /// A lease or REGISTER frame waited for the connection's token bucket.
    LeaseFrameRate,
    /// A new application stream waited for the connection's stream-open token bucket.
    StreamOpenRate,
    /// LEASE_REGISTER refused: the agent holds `leases.max_per_agent` leases.
    AgentLeases,
    /// REGISTER refused: the connection has `mesh.max_services_per_agent` (live or pending).
    Services,
    /// REGISTER refused: `local_addr` is not a bounded `host:port`.
    LocalAddr,
    /// OPEN_STREAM refused: its tenant has `mesh.max_streams_per_tenant` live streams.
    TenantStreams,
    /// A joined stream moved no byte for `mesh.stream_idle_timeout_ms` and was reset.
    StreamIdle,
    /// STREAM_RESUME refused: `resume.max_parked` or `resume.max_parked_per_agent` halves wait.
    ResumeParked,
}

impl Limit {
    /// Every limit, in label order.
    pub const ALL: [Limit; 11] = [
        Limit::IdentityConnections,
        Limit::FirstFrameTooLarge,
        Limit::ControlFrameTooLarge,
        Limit::LeaseFrameRate,
        Limit::StreamOpenRate,
        Limit::AgentLeases,
        Limit::Services,
        Limit::LocalAddr,
        Limit::TenantStreams,
        Limit::StreamIdle,
        Limit::ResumeParked,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Limit::IdentityConnections => "identity_connections_max",
            Limit::FirstFrameTooLarge => "first_frame_too_large",
            Limit::ControlFrameTooLarge => "control_frame_too_large",
            Limit::LeaseFrameRate => "lease_frame_rate",
            Limit::StreamOpenRate => "stream_open_rate",
            Limit::AgentLeases => "agent_leases_max",
            Limit::Services => "services_max",
            Limit::LocalAddr => "invalid_local_addr",
            Limit::TenantStreams => "tenant_streams_max",
            Limit::StreamIdle => "stream_idle_timeout",
            Limit::ResumeParked => "resume_parked_max",
        }
    }
}

/// What became of a P2P signal or checkpoint an agent sent for one of its joined streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalOutcome {
    /// Sent to the other end's control stream.
    Forwarded = 0,
    /// No joined stream with that id has the sender on it.
    NoPair,
    /// Candidates of a stream whose policy says `P2P_FORBIDDEN`.
    Forbidden,
    /// The other end's control queue was full (or its connection gone).
    PeerQueueFull,
}

impl SignalOutcome {
    /// Every outcome, in index order.
    pub const ALL: [SignalOutcome; 4] = [
        SignalOutcome::Forwarded,
        SignalOutcome::NoPair,
        SignalOutcome::Forbidden,
        SignalOutcome::PeerQueueFull,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            SignalOutcome::Forwarded => "forwarded",
            SignalOutcome::NoPair => "no_pair",
            SignalOutcome::Forbidden => "p2p_forbidden",
            SignalOutcome::PeerQueueFull => "peer_queue_full",
        }
    }
}

/// Every counter of the agent endpoint. Relaxed atomics: they are statistics, not sync.
#[derive(Debug, Default)]
pub struct QuicStats {
    /// The TCP/443 fallback's tunnels (`fallback`).
    pub fallback: Arc<super::fallback::FallbackStats>,
    /// Connections whose handshake completed with an agent certificate.
    pub connections_accepted: AtomicU64,
    /// Handshakes that failed for any reason (including the refusals below).
    pub handshakes_failed: AtomicU64,
    /// Client certificates that do not chain to the controller CA (or lack clientAuth).
    pub refused_bad_chain: AtomicU64,
    /// Client certificates whose URI role is not `agent`.
    pub refused_bad_role: AtomicU64,
    /// Client certificates without exactly one valid identity URI.
    pub refused_bad_identity: AtomicU64,
    /// Connections closed because HELLO's `agent_uri` (or protocol version) did not match.
    pub refused_hello_mismatch: AtomicU64,
    /// Connections closed because HELLO did not arrive in time.
    pub refused_hello_timeout: AtomicU64,
    /// Connections refused after HELLO, or closed later, because the identity is revoked.
    pub refused_revoked: AtomicU64,
    /// Connections refused after HELLO because no revocation snapshot is loaded yet.
    pub refused_revocations_unavailable: AtomicU64,
    /// Connections closed right after the handshake because the relay is draining.
    pub refused_draining: AtomicU64,
    /// Connections closed for a protocol error on the control stream.
    pub protocol_errors: AtomicU64,
    /// Connections closed because their control-stream send queue was full.
    pub send_queue_overflows: AtomicU64,
    /// Bidirectional streams after the control stream, refused (not served yet).
    pub streams_refused: AtomicU64,
    /// Control-stream frames received, by type (index: position in [`FrameType::ALL`]).
    frames: [AtomicU64; FrameType::ALL.len()],
    /// Control-stream frames with an unknown type code (skipped).
    pub frames_unknown: AtomicU64,
    /// Control-stream frames of a known type an agent has no reason to send there (skipped).
    pub frames_ignored: AtomicU64,
    /// OBSERVED_ADDR_QUERY answered.
    pub observed_addr_answers: AtomicU64,
    /// MIGRATE_TO_P2P recorded.
    pub migrations_to_p2p: AtomicU64,
    /// MIGRATE_TO_RELAY received (on a fresh stream; refused until streams resume).
    pub migrations_to_relay: AtomicU64,
    /// P2P signals and checkpoints, by [`SignalOutcome`].
    signals: [AtomicU64; SignalOutcome::ALL.len()],
    /// LEASE_ERROR answers, by code (index: position in [`LeaseErrorCode::ALL`]).
    lease_errors: [AtomicU64; LeaseErrorCode::ALL.len()],
    /// Budget refusals, by [`Limit`] (index: position in [`Limit::ALL`]).
    limited: [AtomicU64; Limit::ALL.len()],
}

impl QuicStats {
    /// Control-stream frames of `frame_type` received.
    pub fn frames(&self, frame_type: FrameType) -> u64 {
        FrameType::ALL
            .iter()
            .position(|t| *t == frame_type)
            .and_then(|i| self.frames.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// LEASE_ERROR answers with `code`.
    pub fn lease_errors(&self, code: LeaseErrorCode) -> u64 {
        LeaseErrorCode::ALL
            .iter()
            .position(|c| *c == code)
            .and_then(|i| self.lease_errors.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Refusals (or waits) of `limit`.
    pub fn limited(&self, limit: Limit) -> u64 {
        self.limited
            .get(limit as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts one refusal (or wait) of `limit`.
    pub fn limit(&self, limit: Limit) {
        if let Some(c) = self.limited.get(limit as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// P2P signals (CANDIDATE_OFFER/ANSWER, STREAM_CHECKPOINT) with `outcome`.
    pub fn signals(&self, outcome: SignalOutcome) -> u64 {
        self.signals
            .get(outcome as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub(crate) fn count_signal(&self, outcome: SignalOutcome) {
        if let Some(c) = self.signals.get(outcome as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_frame(&self, frame_type: FrameType) {
        if let Some(c) = FrameType::ALL
            .iter()
            .position(|t| *t == frame_type)
            .and_then(|i| self.frames.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_lease_error(&self, code: LeaseErrorCode) {
        if let Some(c) = LeaseErrorCode::ALL
            .iter()
            .position(|c| *c == code)
            .and_then(|i| self.lease_errors.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
