//! Stream resume, relay side (`shared/spec/orp.md`, "Resume"): the `[resume]` settings and the
//! counters. The park table and the join are driven in `crate::quic::resume`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Default: the relay offers `stream_resume`.
pub const DEFAULT_RESUME_ENABLED: bool = true;
/// Default time the first half of a resumed stream waits for its peer.
pub const DEFAULT_PARK_TIMEOUT_MS: u64 = 30_000;
/// Longest accepted `park_timeout_ms`.
pub const MAX_PARK_TIMEOUT_MS: u64 = 300_000;
/// Default bound on parked halves, relay-wide.
pub const DEFAULT_MAX_PARKED: usize = 4096;
/// Default bound on parked halves per agent identity.
pub const DEFAULT_MAX_PARKED_PER_AGENT: usize = 256;

/// `[resume]` settings (restart-only, as `[mesh]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeConfig {
    /// HELLO_ACK accepts `stream_resume` and STREAM_RESUME streams are served.
    pub enabled: bool,
    /// How long a parked half waits for its peer (1 ..= [`MAX_PARK_TIMEOUT_MS`]).
    pub park_timeout_ms: u64,
    /// Parked halves on this relay (at least 1).
    pub max_parked: usize,
    /// Parked halves of one agent identity (at least 1).
    pub max_parked_per_agent: usize,
}

impl Default for ResumeConfig {
    fn default() -> ResumeConfig {
        ResumeConfig {
            enabled: DEFAULT_RESUME_ENABLED,
            park_timeout_ms: DEFAULT_PARK_TIMEOUT_MS,
            max_parked: DEFAULT_MAX_PARKED,
            max_parked_per_agent: DEFAULT_MAX_PARKED_PER_AGENT,
        }
    }
}

/// What became of a STREAM_RESUME (`outrelay_relay_resume_total{result}`). Join outcomes
/// (`Resumed`, and `RefusedPolicy` when the re-evaluated policy denies) count once per pair;
/// every other outcome once per half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// Both halves met, policy allowed, joined.
    Resumed,
    /// The park window ended without the peer (404).
    Expired,
    /// A parked half replaced by a newer half of the same agent (reset).
    Replaced,
    /// The id is parked by another pair (or the live stream id is taken): 409.
    RefusedMismatch,
    /// The policy denies the stream now, or the half named no `target_service`: 403.
    RefusedPolicy,
    /// Invalid fields (id 0, a peer URI that is not another agent of the tenant, bad names,
    /// bytes written before the peer's STREAM_RESUME): 400.
    RefusedInvalid,
    /// `max_parked`, `max_parked_per_agent` or the tenant's stream slots are spent: 503 / 429.
    RefusedFull,
    /// `[resume] enabled = false`: 404.
    Disabled,
}

impl ResumeOutcome {
    /// Every outcome, in index order.
    pub const ALL: [ResumeOutcome; 8] = [
        ResumeOutcome::Resumed,
        ResumeOutcome::Expired,
        ResumeOutcome::Replaced,
        ResumeOutcome::RefusedMismatch,
        ResumeOutcome::RefusedPolicy,
        ResumeOutcome::RefusedInvalid,
        ResumeOutcome::RefusedFull,
        ResumeOutcome::Disabled,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ResumeOutcome::Resumed => "resumed",
            ResumeOutcome::Expired => "expired",
            ResumeOutcome::Replaced => "replaced",
            ResumeOutcome::RefusedMismatch => "refused_mismatch",
            ResumeOutcome::RefusedPolicy => "refused_policy",
            ResumeOutcome::RefusedInvalid => "refused_invalid",
            ResumeOutcome::RefusedFull => "refused_full",
            ResumeOutcome::Disabled => "disabled",
        }
    }
}

/// Resume counters: bumped once per STREAM_RESUME, never per byte.
#[derive(Debug, Default)]
pub struct ResumeStats {
    outcomes: [AtomicU64; ResumeOutcome::ALL.len()],
    /// Halves parked right now.
    pub parked: AtomicU64,
    /// Bytes the agents announced they retransmit at the joins (from the positions: for each
    /// half, the other's `my_position` minus its `peer_ack_position`, saturating).
    pub bytes_retransmitted: AtomicU64,
}

impl ResumeStats {
    /// Counts one outcome.
    pub fn count(&self, o: ResumeOutcome) {
        if let Some(c) = self.outcomes.get(o as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many STREAM_RESUMEs ended as `o`.
    pub fn outcome(&self, o: ResumeOutcome) -> u64 {
        self.outcomes
            .get(o as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_indexed_in_label_order() {
        let stats = ResumeStats::default();
        for (i, o) in ResumeOutcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
            stats.count(*o);
        }
        assert!(ResumeOutcome::ALL.iter().all(|o| stats.outcome(*o) == 1));
    }
}
