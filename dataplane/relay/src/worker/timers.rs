//! The worker's timers: one FIFO deadline queue per kind of timeout.
//!
//! Every timer of a kind has the same duration (a config value), so deadlines pushed in time
//! order are already sorted: arming is a push at the back, expiry pops from the front (after a
//! reload shortened a duration, a new deadline is inserted in order instead), and a
//! timer whose connection moved on is skipped when it comes up (its key's generation or phase
//! no longer matches). No syscall and no task per timer, O(1) per event, exact to the loop's
//! wake-up; the loop sleeps until the earliest front deadline.

use std::collections::VecDeque;
use std::time::Instant;

/// What a timer bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerKind {
    /// The ClientHello, from accept (`hello_deadline_ms`).
    Hello = 0,
    /// The reverse handshake, from accept (`reverse_handshake_deadline_ms`).
    Handshake = 1,
    /// A claim waiting for an idle session (`claim_timeout_ms`).
    Claim = 2,
    /// The marker and replayed bytes to a claimed session (`marker_write_deadline_ms`).
    Marker = 3,
}

const KINDS: usize = 4;

/// Deadline queues, one per [`TimerKind`].
#[derive(Debug, Default)]
pub(crate) struct Timers {
    queues: [VecDeque<(u64, Instant)>; KINDS],
}

impl Timers {
    /// Arms a timer for connection `key` at `deadline`: at the back, as all of a kind share
    /// one duration, unless a reload shortened it and earlier timers end later.
    pub(crate) fn arm(&mut self, kind: TimerKind, key: u64, deadline: Instant) {
        let queue = &mut self.queues[kind as usize];
        match queue.back() {
            Some(&(_, last)) if last > deadline => {
                let at = queue.partition_point(|&(_, d)| d <= deadline);
                queue.insert(at, (key, deadline));
            }
            _ => queue.push_back((key, deadline)),
        }
    }

    /// The earliest deadline armed, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queues
            .iter()
            .filter_map(|q| q.front().map(|(_, d)| *d))
            .min()
    }

    /// Pops every timer due at `now` into `due` (kind, key).
    pub(crate) fn expire(&mut self, now: Instant, due: &mut Vec<(TimerKind, u64)>) {
        for (kind, queue) in [
            TimerKind::Hello,
            TimerKind::Handshake,
            TimerKind::Claim,
            TimerKind::Marker,
        ]
        .into_iter()
        .zip(self.queues.iter_mut())
        {
            while let Some(&(key, deadline)) = queue.front() {
                if deadline > now {
                    break;
                }
                queue.pop_front();
                due.push((kind, key));
            }
        }
    }

    /// Timers armed (stale ones included until they come up).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timers_come_up_in_deadline_order_per_kind() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.arm(TimerKind::Hello, 1, t0 + Duration::from_millis(10));
        timers.arm(TimerKind::Hello, 2, t0 + Duration::from_millis(20));
        timers.arm(TimerKind::Claim, 3, t0 + Duration::from_millis(5));
        assert_eq!(timers.next_deadline(), Some(t0 + Duration::from_millis(5)));
        let mut due = Vec::new();
        timers.expire(t0 + Duration::from_millis(10), &mut due);
        assert_eq!(due, vec![(TimerKind::Hello, 1), (TimerKind::Claim, 3)]);
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.next_deadline(), Some(t0 + Duration::from_millis(20)));
    }

    #[test]
    fn a_shorter_duration_after_a_reload_comes_up_first() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut timers = Timers::default();
        timers.arm(TimerKind::Claim, 1, ms(10_000));
        timers.arm(TimerKind::Claim, 2, ms(10_010));
        // claim_timeout_ms lowered to 100 by a reload.
        timers.arm(TimerKind::Claim, 3, ms(120));
        assert_eq!(timers.next_deadline(), Some(ms(120)));
        let mut due = Vec::new();
        timers.expire(ms(200), &mut due);
        assert_eq!(due, vec![(TimerKind::Claim, 3)]);
        timers.expire(ms(10_010), &mut due);
        assert_eq!(
            due,
            vec![
                (TimerKind::Claim, 3),
                (TimerKind::Claim, 1),
                (TimerKind::Claim, 2)
            ]
        );
    }
}
