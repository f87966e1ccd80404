//! The mesh's counters: plain atomics bumped on the set-up path and per chunk on the byte path,
//! copied into the metrics recorder by the scrape.

use std::sync::atomic::{AtomicU64, Ordering};

/// How an OPEN_STREAM ended (`outrelay_relay_mesh_streams_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshResult {
    /// Joined with its provider.
    Accepted,
    /// 403: a policy decision.
    Denied,
    /// 404: no provider in the caller's tenant.
    NotFound,
    /// 409: the stream id is in use.
    Collision,
    /// 502: the provider (or its relay) cannot be reached.
    Unreachable,
    /// 503: the provider refused.
    ProviderRejected,
    /// The stream broke the protocol (no STREAM_REJECT is owed: it is reset).
    ProtocolError,
    /// 400: the first frame declared more than the first-frame limit (refused from its header).
    FrameTooLarge,
    /// 400: `target_service` or `method` out of bounds (refused before policy, cache, audit).
    Invalid,
    /// 429: the tenant is at `max_streams_per_tenant`.
    TenantLimit,
}

impl MeshResult {
    /// Every result, in label order.
    pub const ALL: [MeshResult; 10] = [
        MeshResult::Accepted,
        MeshResult::Denied,
        MeshResult::NotFound,
        MeshResult::Collision,
        MeshResult::Unreachable,
        MeshResult::ProviderRejected,
        MeshResult::ProtocolError,
        MeshResult::FrameTooLarge,
        MeshResult::Invalid,
        MeshResult::TenantLimit,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            MeshResult::Accepted => "accepted",
            MeshResult::Denied => "rejected_403",
            MeshResult::NotFound => "rejected_404",
            MeshResult::Collision => "rejected_409",
            MeshResult::Unreachable => "rejected_502",
            MeshResult::ProviderRejected => "rejected_503",
            MeshResult::ProtocolError => "protocol_error",
            MeshResult::FrameTooLarge => "frame_too_large",
            MeshResult::Invalid => "rejected_400",
            MeshResult::TenantLimit => "rejected_429",
        }
    }

    /// The STREAM_REJECT code (0 for the two that send none).
    pub fn code(self) -> u32 {
        match self {
            MeshResult::Accepted | MeshResult::ProtocolError => 0,
            MeshResult::Denied => 403,
            MeshResult::NotFound => 404,
            MeshResult::Collision => 409,
            MeshResult::Unreachable => 502,
            MeshResult::ProviderRejected => 503,
            MeshResult::FrameTooLarge | MeshResult::Invalid => 400,
            MeshResult::TenantLimit => 429,
        }
    }
}

/// Counters of the mesh.
#[derive(Debug, Default)]
pub struct MeshStats {
    results: [AtomicU64; MeshResult::ALL.len()],
    /// Streams joined right now.
    pub streams_active: AtomicU64,
    /// Bytes consumer → provider.
    pub bytes_to_provider: AtomicU64,
    /// Bytes provider → consumer.
    pub bytes_to_consumer: AtomicU64,
    /// Live streams cut because the policy no longer allows them.
    pub cut_policy: AtomicU64,
    /// Live streams cut because their allowing rule expired.
    pub cut_expired: AtomicU64,
    /// Joined streams that ended with a reset or a lost connection on either side.
    pub streams_failed: AtomicU64,
    /// REGISTER frames answered with REGISTER_ACK.
    pub registrations_ok: AtomicU64,
    /// REGISTER frames answered with STREAM_REJECT, but for the two below.
    pub registrations_rejected: AtomicU64,
    /// REGISTERs refused because another identity holds the service (409 `service_taken`).
    pub registrations_taken: AtomicU64,
    /// REGISTERs refused by a provide rule (403 `provide_denied`).
    pub registrations_provide_denied: AtomicU64,
    /// REGISTERs refused at `max_providers_per_service` (429 `providers_full`).
    pub registrations_providers_full: AtomicU64,
    /// Policy snapshots installed.
    pub policy_updates: AtomicU64,
    /// Audit events produced.
    pub audit_events: AtomicU64,
    /// STREAM_READY frames not sent because a control queue was full.
    pub ready_dropped: AtomicU64,
    /// Opens that went on to another provider after one did not answer (a provider whose
    /// connection died before the relay noticed).
    pub provider_retries: AtomicU64,
    /// Ended pairs dropped at `ENDED_PAIRS_MAX` before their linger was over (their last
    /// checkpoints, if any, then find no pair).
    pub ended_pairs_evicted: AtomicU64,
    /// Audit events with a field cut to its cap.
    pub audit_truncated: AtomicU64,
    /// Stream resume (STREAM_RESUME halves, parked halves, retransmitted bytes).
    pub resume: super::resume::ResumeStats,
}

impl MeshStats {
    /// Counts one finished open.
    pub fn count(&self, r: MeshResult) {
        if let Some(c) = self.results.get(r as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Opens that ended as `r`.
    pub fn result(&self, r: MeshResult) -> u64 {
        self.results
            .get(r as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}
