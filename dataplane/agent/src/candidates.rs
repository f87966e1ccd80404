//! Relay candidates for the agent's HA slots (issue 22): every address the configured `relays`
//! entries resolve to, with per-candidate backoff, and which slot holds which relay identity.
//!
//! `ha_connections` slot tasks (`control::run`) each hold at most one relay connection. A slot
//! looking for a relay re-resolves the entries ([`Candidates::refresh`]) and takes
//! ([`Candidates::pick`]) the first candidate in config order that no slot holds or is dialling,
//! whose relay identity (learnt at an earlier handshake) no other slot holds, and that is not
//! in backoff, preferring any other over the one it just lost. After the handshake it claims
//! the relay identity ([`Candidates::claim`]): a relay reached under two addresses is held
//! once. The list is capped at [`MAX_CANDIDATES`] (the rest dropped and counted). Everything
//! here runs under one short `std::sync::Mutex`, never held across an `.await`, and never on
//! the byte path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Most candidates kept (addresses over all entries); the rest are dropped and counted.
pub const MAX_CANDIDATES: usize = 64;

/// A candidate a slot is to dial.
#[derive(Debug, Clone)]
pub struct Target {
    /// The configured `relays` entry it came from (its host is the pinning host).
    pub name: String,
    /// The resolved address.
    pub addr: SocketAddr,
    /// Its position in the candidate list (config order, then resolution order).
    pub rank: usize,
}

/// What a slot does next.
#[derive(Debug, Clone)]
pub enum Pick {
    /// Dial this candidate (now marked as the slot's).
    Dial(Target),
    /// Nothing to dial: look again after this delay.
    Wait(Duration),
}

/// How a slot's connection to a candidate ended.
#[derive(Debug, Clone, Copy)]
pub enum Ended {
    /// The handshake or HELLO failed.
    Failed,
    /// An established connection was lost.
    Lost,
    /// GOAWAY: the candidate may be dialled after the relay's delay.
    GoAway(Duration),
    /// The relay's identity is already held by another slot (no backoff: skipped while held).
    Duplicate,
    /// The agent is stopping.
    Stopped,
}

/// A candidate's state as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateState {
    /// A slot holds (or is dialling) it.
    Held,
    /// Available.
    Standby,
    /// Failed recently: not dialled before its retry time while another is available.
    Backoff,
    /// Its relay identity is held through another address.
    Duplicate,
}

impl CandidateState {
    /// Every state, for gauges.
    pub const ALL: [CandidateState; 4] = [
        CandidateState::Held,
        CandidateState::Standby,
        CandidateState::Backoff,
        CandidateState::Duplicate,
    ];

    /// The metric label (as serialised).
    pub fn label(self) -> &'static str {
        match self {
            CandidateState::Held => "held",
            CandidateState::Standby => "standby",
            CandidateState::Backoff => "backoff",
            CandidateState::Duplicate => "duplicate",
        }
    }
}

/// One candidate in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateStatus {
    /// The configured entry.
    pub name: String,
    /// The resolved address.
    pub addr: String,
    /// The relay identity seen at the last handshake (empty before one).
    pub relay_id: String,
    /// State.
    pub state: CandidateState,
    /// Milliseconds until a candidate in backoff may be dialled again.
    pub retry_in_ms: u64,
    /// Why the last connection to it ended.
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Cand {
    name: String,
    addr: SocketAddr,
    relay_id: Option<String>,
    /// The slot dialling or holding it.
    slot: Option<usize>,
    /// Next backoff delay.
    backoff: Duration,
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    list: Vec<Cand>,
    /// Relay identity held by each slot.
    held: Vec<Option<String>>,
}

/// The candidate list shared by the slots.
#[derive(Debug)]
pub struct Candidates {
    entries: Vec<String>,
    initial: Duration,
    max: Duration,
    inner: Mutex<Inner>,
    /// Resolved addresses dropped because the list was full (`Stats::relay_candidates_dropped`).
    pub dropped: Arc<AtomicU64>,
    /// Slots that established a connection to another relay than the one they had lost
    /// (`Stats::relay_replacements`).
    pub replacements: Arc<AtomicU64>,
}

impl Candidates {
    /// An empty list for `slots` slots over the configured `entries`; backoff from `initial`
    /// doubling to `max`; counters from `stats`.
    pub fn new(
        entries: Vec<String>,
        slots: usize,
        initial: Duration,
        max: Duration,
        stats: &crate::stats::Stats,
    ) -> Candidates {
        Candidates {
            entries,
            initial,
            max,
            inner: Mutex::new(Inner {
                list: Vec::new(),
                held: vec![None; slots],
            }),
            dropped: stats.relay_candidates_dropped.clone(),
            replacements: stats.relay_replacements.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves every entry again; the state of addresses still resolved is kept, addresses no
    /// longer resolved are forgotten unless a slot holds them. An entry that fails to resolve
    /// keeps its previous addresses.
    pub async fn refresh(&self) {
        let mut resolved: Vec<(String, Vec<SocketAddr>)> = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let addrs = match e.parse::<SocketAddr>() {
                Ok(a) => Some(vec![a]),
                Err(_) => match tokio::net::lookup_host(e.as_str()).await {
                    Ok(it) => Some(it.take(MAX_CANDIDATES).collect()),
                    Err(err) => {
                        tracing::debug!(relay = %e, error = %err, "cannot resolve relay entry");
                        None
                    }
                },
            };
            if let Some(a) = addrs {
                resolved.push((e.clone(), a));
            }
        }
        let mut inner = self.lock();
        let mut next: Vec<Cand> = Vec::with_capacity(MAX_CANDIDATES);
        let mut dropped = 0u64;
        let mut old = std::mem::take(&mut inner.list);
        for e in &self.entries {
            let fresh = resolved
                .iter()
                .find(|(n, _)| n == e)
                .map(|(_, a)| a.clone());
            let addrs: Vec<SocketAddr> = match fresh {
                Some(a) => a,
                None => old
                    .iter()
                    .filter(|c| &c.name == e)
                    .map(|c| c.addr)
                    .collect(),
            };
            for addr in addrs {
                if next.iter().any(|c| c.addr == addr) {
                    continue;
                }
                let kept = old
                    .iter()
                    .position(|c| c.name == *e && c.addr == addr)
                    .map(|i| old.swap_remove(i));
                if next.len() >= MAX_CANDIDATES {
                    dropped += 1;
                    continue;
                }
                next.push(kept.unwrap_or_else(|| Cand {
                    name: e.clone(),
                    addr,
                    relay_id: None,
                    slot: None,
                    backoff: self.initial,
                    retry_at: None,
                    last_error: None,
                }));
            }
        }
        // A held candidate no longer resolved stays until its connection ends.
        for c in old.into_iter().filter(|c| c.slot.is_some()) {
            if next.len() < MAX_CANDIDATES {
                next.push(c);
            } else {
                dropped += 1;
            }
        }
        inner.list = next;
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// The next candidate for `slot` (marked as the slot's), avoiding `avoid` (the one just
    /// lost) while another is available.
    pub fn pick(&self, slot: usize, avoid: Option<SocketAddr>) -> Pick {
        let now = Instant::now();
        let mut inner = self.lock();
        let Inner { list, held } = &mut *inner;
        let held_elsewhere = |id: &Option<String>| {
            id.as_ref().is_some_and(|id| {
                held.iter()
                    .enumerate()
                    .any(|(s, h)| s != slot && h.as_deref() == Some(id.as_str()))
            })
        };
        let free: Vec<usize> = (0..list.len())
            .filter(|&i| list[i].slot.is_none() && !held_elsewhere(&list[i].relay_id))
            .collect();
        let ready = |i: &&usize| list[**i].retry_at.is_none_or(|t| t <= now);
        let choice = free
            .iter()
            .filter(ready)
            .find(|&&i| Some(list[i].addr) != avoid)
            .or_else(|| free.iter().find(ready))
            .copied();
        if let Some(i) = choice {
            let c = &mut list[i];
            c.slot = Some(slot);
            return Pick::Dial(Target {
                name: c.name.clone(),
                addr: c.addr,
                rank: i,
            });
        }
        // Nothing resolved yet: look again soon. Nothing free (every candidate held, or held
        // through another address): after `max` (a DNS change). Else when a backoff ends.
        let idle = if list.is_empty() {
            self.initial
        } else {
            self.max
        };
        let wait = free
            .iter()
            .filter_map(|&i| list[i].retry_at)
            .min()
            .map_or(idle, |t| t.saturating_duration_since(now))
            .clamp(
                Duration::from_millis(50),
                self.max.max(Duration::from_millis(50)),
            );
        Pick::Wait(wait)
    }

    /// After the handshake: records that `slot` holds relay `relay_id` at `addr`; `false` when
    /// another slot already holds that relay (the caller closes the connection).
    pub fn claim(&self, slot: usize, addr: SocketAddr, relay_id: &str) -> bool {
        let mut inner = self.lock();
        if let Some(c) = inner.list.iter_mut().find(|c| c.addr == addr) {
            c.relay_id = Some(relay_id.to_owned());
        }
        let taken = inner
            .held
            .iter()
            .enumerate()
            .any(|(s, h)| s != slot && h.as_deref() == Some(relay_id));
        if taken {
            return false;
        }
        if let Some(h) = inner.held.get_mut(slot) {
            *h = Some(relay_id.to_owned());
        }
        true
    }

    /// `slot`'s connection to `addr` ended: frees both and sets the candidate's backoff.
    pub fn release(&self, slot: usize, addr: SocketAddr, ended: Ended, error: Option<String>) {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(h) = inner.held.get_mut(slot) {
            *h = None;
        }
        let Some(c) = inner.list.iter_mut().find(|c| c.addr == addr) else {
            return;
        };
        if c.slot == Some(slot) {
            c.slot = None;
        }
        if error.is_some() {
            c.last_error = error;
        }
        match ended {
            Ended::Stopped | Ended::Duplicate => {}
            Ended::GoAway(after) => {
                c.backoff = self.initial;
                c.retry_at = Some(now + after);
            }
            Ended::Lost => {
                c.backoff = self.initial;
                c.retry_at = Some(now + crate::control::jitter(self.initial));
            }
            Ended::Failed => {
                c.retry_at = Some(now + crate::control::jitter(c.backoff));
                c.backoff = (c.backoff * 2).min(self.max);
            }
        }
    }

    /// Every candidate, for `/status`.
    pub fn statuses(&self) -> Vec<CandidateStatus> {
        let now = Instant::now();
        let inner = self.lock();
        inner
            .list
            .iter()
            .map(|c| {
                let retry = c
                    .retry_at
                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
                let duplicate = c.slot.is_none()
                    && c.relay_id
                        .as_ref()
                        .is_some_and(|id| inner.held.iter().any(|h| h.as_ref() == Some(id)));
                let state = if c.slot.is_some() {
                    CandidateState::Held
                } else if duplicate {
                    CandidateState::Duplicate
                } else if retry > Duration::ZERO {
                    CandidateState::Backoff
                } else {
                    CandidateState::Standby
                };
                CandidateStatus {
                    name: c.name.clone(),
                    addr: c.addr.to_string(),
                    relay_id: c.relay_id.clone().unwrap_or_default(),
                    state,
                    retry_in_ms: u64::try_from(retry.as_millis()).unwrap_or(u64::MAX),
                    last_error: c.last_error.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(entries: &[&str], slots: usize) -> Candidates {
        Candidates::new(
            entries.iter().map(|s| (*s).to_owned()).collect(),
            slots,
            Duration::from_millis(200),
            Duration::from_secs(2),
            &crate::stats::Stats::default(),
        )
    }

    fn dial(p: Pick) -> SocketAddr {
        match p {
            Pick::Dial(t) => t.addr,
            Pick::Wait(d) => panic!("waits {d:?}"),
        }
    }

    #[tokio::test]
    async fn slots_take_distinct_relays_and_a_lost_one_is_replaced_by_another() {
        let c = cands(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], 2);
        c.refresh().await;
        let a = dial(c.pick(0, None));
        let b = dial(c.pick(1, None));
        assert_ne!(a, b);
        assert!(c.claim(0, a, "outrelay://t/relay/1"));
        assert!(c.claim(1, b, "outrelay://t/relay/2"));
        c.release(0, a, Ended::Lost, Some("gone".into()));
        let r = dial(c.pick(0, Some(a)));
        assert_eq!(r.port(), 3, "the third candidate, not the one just lost");
        // A second address of relay 2 is a duplicate: refused at claim, then skipped.
        assert!(!c.claim(0, r, "outrelay://t/relay/2"));
        c.release(0, r, Ended::Duplicate, None);
        match c.pick(0, None) {
            Pick::Wait(_) => {}
            Pick::Dial(t) => panic!("dialled {t:?}: 1 is in backoff, 3 is relay 2"),
        }
        let states: Vec<CandidateState> = c.statuses().iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [
                CandidateState::Backoff,
                CandidateState::Held,
                CandidateState::Duplicate
            ]
        );
    }

    #[tokio::test]
    async fn a_failing_candidate_backs_off_doubling_and_names_resolve_to_candidates() {
        let c = cands(&["localhost:9"], 1);
        c.refresh().await;
        assert!(!c.statuses().is_empty(), "localhost resolves");
        let a = dial(c.pick(0, None));
        c.release(0, a, Ended::Failed, None);
        c.release(0, a, Ended::Failed, None);
        let inner = c.lock();
        let cand = inner.list.iter().find(|x| x.addr == a).expect("kept");
        assert_eq!(cand.backoff, Duration::from_millis(800));
    }

    #[tokio::test]
    async fn the_list_is_capped_and_the_rest_counted() {
        let entries: Vec<String> = (1..=70).map(|p| format!("127.0.0.1:{p}")).collect();
        let refs: Vec<&str> = entries.iter().map(String::as_str).collect();
        let c = cands(&refs, 2);
        c.refresh().await;
        assert_eq!(c.statuses().len(), MAX_CANDIDATES);
        assert_eq!(c.dropped.load(Ordering::Relaxed), 6);
    }
}
