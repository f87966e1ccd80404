//! A token bucket shared by threads without a lock: GCRA (the generic cell rate algorithm)
//! over one atomic "theoretical arrival time".
//!
//! A [`Bucket`] holds a rate in bytes per second (0 = unlimited, settable live) and the time
//! at which its last granted byte is "due" (`tat_ns`, nanoseconds on [`clock_ns`]'s clock).
//! Bytes may go when `tat_ns - now_ns` is within the burst tolerance; each byte granted pushes
//! `tat_ns` by `1e9 / rate` ns. The burst is [`burst_bytes`]`(rate)` = max(rate × 25 ms,
//! 64 KiB): small enough that a transfer follows the limit within a few percent over a second
//! from 10 Mbit/s to 10 Gbit/s, large enough that a pipe's worth (64 KiB) always fits, so a
//! limited splice is never cut into tiny pieces.
//!
//! Several engines (threads) may hold one bucket (a tenant's): [`Bucket::available`] and
//! [`Bucket::consume`] are separate so a direction held to two buckets (lease and tenant) can
//! read the smaller grant and then charge both; a race between threads can overshoot by at
//! most one read each, which the next reads pay back (the debt is in `tat_ns`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Burst window: the bucket holds at most this many milliseconds of its rate.
pub const BURST_WINDOW_MS: u64 = 25;
/// The smallest burst, whatever the rate (one default pipe).
pub const BURST_MIN_BYTES: u64 = 64 * 1024;

const NS_PER_S: u128 = 1_000_000_000;

/// The burst of a bucket at `rate_bytes_per_s`: max(rate × [`BURST_WINDOW_MS`],
/// [`BURST_MIN_BYTES`]).
pub fn burst_bytes(rate_bytes_per_s: u64) -> u64 {
    (rate_bytes_per_s / 1000)
        .saturating_mul(BURST_WINDOW_MS)
        .max(BURST_MIN_BYTES)
}

/// Nanoseconds since this process's first call, the clock every [`Bucket`] runs on.
pub fn clock_ns(now: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// A token bucket in bytes (see the module docs).
#[derive(Debug, Default)]
pub struct Bucket {
    rate_bytes_per_s: AtomicU64,
    tat_ns: AtomicU64,
    throttled_ns: AtomicU64,
    moved_bytes: AtomicU64,
}

/// What `bytes` cost in time at `rate`, rounded UP: above 1 GB/s a byte takes less than a
/// nanosecond, and a cost rounded down to 0 would let a holder take one byte after another
/// for free (the 10 Gbit/s collapse of issue 21: a pump looping on 1-byte grants).
fn cost_ns(bytes: u64, rate: u64) -> u64 {
    u64::try_from((u128::from(bytes) * NS_PER_S).div_ceil(u128::from(rate.max(1))))
        .unwrap_or(u64::MAX)
}

fn bytes_in(ns: u64, rate: u64) -> u64 {
    u64::try_from(u128::from(ns) * u128::from(rate) / NS_PER_S).unwrap_or(u64::MAX)
}

impl Bucket {
    /// A bucket at `rate_bytes_per_s` (0 = unlimited), full.
    pub fn new(rate_bytes_per_s: u64) -> Bucket {
        Bucket {
            rate_bytes_per_s: AtomicU64::new(rate_bytes_per_s),
            tat_ns: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            moved_bytes: AtomicU64::new(0),
        }
    }

    /// The rate in bytes per second (0 = unlimited).
    pub fn rate_bytes_per_s(&self) -> u64 {
        self.rate_bytes_per_s.load(Ordering::Relaxed)
    }

    /// Changes the rate; every holder follows on its next take. A debt owed at the old rate
    /// (at most one burst) is kept in time, not in bytes.
    pub fn set_rate(&self, rate_bytes_per_s: u64) {
        self.rate_bytes_per_s
            .store(rate_bytes_per_s, Ordering::Relaxed);
    }

    /// Bytes that may go at `now_ns` (`u64::MAX` when unlimited), without taking them.
    pub fn available(&self, now_ns: u64) -> u64 {
        let rate = self.rate_bytes_per_s();
        if rate == 0 {
            return u64::MAX;
        }
        let tau = cost_ns(burst_bytes(rate), rate);
        let tat = self.tat_ns.load(Ordering::Relaxed).max(now_ns);
        let room_ns = (now_ns.saturating_add(tau)).saturating_sub(tat);
        bytes_in(room_ns, rate)
    }

    /// Charges `bytes` at `now_ns` whatever is available (a grant already read with
    /// [`Bucket::available`]; overshoot becomes a debt the next takes pay).
    pub fn consume(&self, bytes: u64, now_ns: u64) {
        let rate = self.rate_bytes_per_s();
        if rate == 0 || bytes == 0 {
            return;
        }
        let cost = cost_ns(bytes, rate);
        let _ = self
            .tat_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                Some(tat.max(now_ns).saturating_add(cost))
            });
    }

    /// Takes up to `want_bytes` at `now_ns` and returns how many were granted (`0..=want`).
    pub fn take(&self, want_bytes: u64, now_ns: u64) -> u64 {
        let rate = self.rate_bytes_per_s();
        if rate == 0 {
            return want_bytes;
        }
        let tau = cost_ns(burst_bytes(rate), rate);
        let mut granted = 0;
        let _ = self
            .tat_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                let tat = tat.max(now_ns);
                let room_ns = (now_ns.saturating_add(tau)).saturating_sub(tat);
                granted = bytes_in(room_ns, rate).min(want_bytes);
                if granted == 0 {
                    return None;
                }
                Some(tat.saturating_add(cost_ns(granted, rate)))
            });
        granted
    }

    /// Charges `bytes` now and returns the nanoseconds until they conform (0: at once), so
    /// the caller waits, then sends them. Waiters queue in `tat_ns` itself: each reservation
    /// comes after the ones before it, so holders of one bucket take turns instead of the
    /// first to wake taking everything.
    pub fn reserve(&self, bytes: u64, now_ns: u64) -> u64 {
        let rate = self.rate_bytes_per_s();
        if rate == 0 || bytes == 0 {
            return 0;
        }
        let tau = cost_ns(burst_bytes(rate), rate);
        let cost = cost_ns(bytes, rate);
        let old = self
            .tat_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                Some(tat.max(now_ns).saturating_add(cost))
            })
            .unwrap_or(now_ns);
        old.max(now_ns)
            .saturating_add(cost)
            .saturating_sub(tau)
            .saturating_sub(now_ns)
    }

    /// Bytes a holder out of tokens should reserve at a time at this rate: a quarter burst
    /// (so three quarters of a burst is slack for late wake-ups), at most 64 KiB (one pipe),
    /// at most a tenth of a second of the rate (short waits at low rates).
    pub fn chunk_bytes(&self) -> u64 {
        let rate = self.rate_bytes_per_s();
        (burst_bytes(rate) / 4)
            .min(BURST_MIN_BYTES)
            .min((rate / 10).max(1))
    }

    /// Nanoseconds from `now_ns` until `bytes` (capped to the burst) may go; 0 when they may
    /// go now or the bucket is unlimited.
    pub fn wait_ns(&self, bytes: u64, now_ns: u64) -> u64 {
        let rate = self.rate_bytes_per_s();
        if rate == 0 {
            return 0;
        }
        let burst = burst_bytes(rate);
        let tau = cost_ns(burst, rate);
        let tat = self.tat_ns.load(Ordering::Relaxed).max(now_ns);
        let need = tat.saturating_add(cost_ns(bytes.min(burst), rate));
        need.saturating_sub(now_ns.saturating_add(tau))
    }

    /// Adds time a holder spent waiting for this bucket's tokens.
    pub fn add_throttled_ns(&self, ns: u64) {
        self.throttled_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Total time holders waited for this bucket's tokens, in nanoseconds.
    pub fn throttled_ns(&self) -> u64 {
        self.throttled_ns.load(Ordering::Relaxed)
    }

    /// Counts `bytes` that went through a holder (limited or not: the per-lease byte counts
    /// of `relay status` and the dashboard). One relaxed add per read, never per byte.
    pub fn add_moved_bytes(&self, bytes: u64) {
        self.moved_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes counted by [`Bucket::add_moved_bytes`].
    pub fn moved_bytes(&self) -> u64 {
        self.moved_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn unlimited_grants_everything() {
        let b = Bucket::new(0);
        assert_eq!(b.take(1 << 40, 5), 1 << 40);
        assert_eq!(b.available(5), u64::MAX);
        assert_eq!(b.wait_ns(1 << 20, 5), 0);
    }

    #[test]
    fn burst_is_a_function_of_the_rate() {
        assert_eq!(burst_bytes(1_250_000), BURST_MIN_BYTES); // 10 Mbit/s
        assert_eq!(burst_bytes(1_250_000_000), 31_250_000); // 10 Gbit/s: 25 ms
    }

    /// With a fake clock, a greedy taker gets rate × time (+ one burst) over any span, at
    /// every rate from 10 Mbit/s to 10 Gbit/s, with steps smaller and larger than a burst.
    #[test]
    fn a_greedy_taker_tracks_the_rate() {
        for rate in [1_250_000u64, 25_000_000, 125_000_000, 1_250_000_000] {
            for step_ns in [100_000u64, MS, 7 * MS] {
                let b = Bucket::new(rate);
                let mut now = 1_000 * MS;
                let mut got = 0u64;
                let end = now + 2_000 * MS;
                while now < end {
                    got += b.take(u64::MAX / 4, now);
                    now += step_ns;
                }
                let want = rate * 2 + burst_bytes(rate);
                let err = got.abs_diff(want) as f64 / (rate * 2) as f64;
                assert!(err < 0.01, "rate {rate} step {step_ns}: {got} vs {want}");
            }
        }
    }

    /// Above 1 GB/s a byte costs less than a nanosecond: no byte may come for free, or a
    /// holder re-reading its bucket at one instant takes byte after byte without limit (the
    /// 10 Gbit/s collapse of issue 21: a pump looping on 1-byte splices).
    #[test]
    fn above_a_gigabyte_per_second_no_byte_is_free() {
        for rate in [1_250_000_000u64, 5_000_000_000, 12_500_000_000] {
            let b = Bucket::new(rate);
            let t = 10_000 * MS;
            b.take(u64::MAX, t);
            let now = t + 1; // one nanosecond: at most a byte or two of room
            let taken: u64 = (0..1000).map(|_| b.take(1, now)).sum();
            assert!(taken <= 2, "rate {rate}: take gave {taken} bytes in 1 ns");
            let mut read = 0;
            for _ in 0..1000 {
                let g = b.available(now).min(1);
                b.consume(g, now);
                read += g;
            }
            assert!(
                read <= 2,
                "rate {rate}: available/consume gave {read} bytes"
            );
        }
    }

    #[test]
    fn partial_grants_and_the_wait_for_the_rest() {
        let rate = 1_000_000; // 1 MB/s, burst 64 KiB
        let b = Bucket::new(rate);
        let t = 10_000 * MS;
        assert_eq!(b.take(100_000, t), BURST_MIN_BYTES);
        assert_eq!(b.take(1, t), 0);
        // 1000 bytes take 1 ms at 1 MB/s.
        assert_eq!(b.wait_ns(1000, t), MS);
        assert_eq!(b.take(2000, t + MS), 1000);
        assert_eq!(b.available(t + MS), 0);
    }

    #[test]
    fn available_then_consume_charges_like_take() {
        let b = Bucket::new(1_000_000);
        let t = 10_000 * MS;
        let g = b.available(t).min(10_000);
        b.consume(g, t);
        assert_eq!(b.available(t), BURST_MIN_BYTES - 10_000);
        // Overshoot is a debt: nothing until it is paid.
        b.consume(BURST_MIN_BYTES, t);
        assert_eq!(b.available(t), 0);
        assert_eq!(b.available(t + 10 * MS), 0);
        assert_eq!(b.available(t + 20 * MS), 10_000);
    }

    #[test]
    fn a_rate_change_applies_to_the_next_take() {
        let b = Bucket::new(1_000_000);
        let t = 10_000 * MS;
        b.take(u64::MAX, t);
        b.set_rate(10_000_000);
        // Debt at the old rate is time; the new rate refills 10x faster after it.
        let got: u64 = (1..=100).map(|i| b.take(u64::MAX, t + i * MS)).sum();
        // The old debt (65.5 ms) is paid first, then 100 ms - 65.5 ms + one 25 ms burst.
        assert!((580_000..=610_000).contains(&got), "{got}");
        b.set_rate(0);
        assert_eq!(b.take(7, t), 7);
    }

    #[test]
    fn reservations_queue_their_holders() {
        let rate = 1_000_000;
        let b = Bucket::new(rate);
        let t = 10_000 * MS;
        assert_eq!(b.take(u64::MAX, t), BURST_MIN_BYTES);
        // Two holders out of tokens reserve 10 kB each: the second waits behind the first.
        assert_eq!(b.reserve(10_000, t), 10 * MS);
        assert_eq!(b.reserve(10_000, t), 20 * MS);
        assert_eq!(b.available(t + 20 * MS), 0);
        assert_eq!(b.reserve(0, t), 0);
        assert_eq!(Bucket::new(0).reserve(1 << 30, t), 0);
        assert_eq!(b.chunk_bytes(), 16_384);
        assert_eq!(Bucket::new(10_000).chunk_bytes(), 1000);
        assert_eq!(Bucket::new(1_250_000_000).chunk_bytes(), BURST_MIN_BYTES);
    }

    #[test]
    fn throttled_time_adds_up() {
        let b = Bucket::new(1);
        b.add_throttled_ns(5);
        b.add_throttled_ns(7);
        assert_eq!(b.throttled_ns(), 12);
        b.add_moved_bytes(3);
        b.add_moved_bytes(4);
        assert_eq!(b.moved_bytes(), 7);
    }

    #[test]
    fn threads_share_one_bucket() {
        let b = std::sync::Arc::new(Bucket::new(1_000_000));
        let t = 10_000 * MS;
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let b = b.clone();
                    s.spawn(move || (0..1000).map(|_| b.take(100, t)).sum::<u64>())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(total, BURST_MIN_BYTES);
    }
}
