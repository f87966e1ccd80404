//! Summaries over rounds (median with min and max) and latency quantiles.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Median, min and max of one metric over the rounds of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// The median (mean of the two middle samples for an even count).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// How many finite samples went in.
    pub samples: usize,
}

impl Summary {
    /// Summarises `samples`, ignoring non-finite values; `None` when nothing finite is left.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            samples: n,
        })
    }
}

/// A latency histogram recording nanoseconds, from 1 ns to 60 s at 3 significant digits.
pub fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000_000, 3)?)
}

/// Records `elapsed` into `hist` in nanoseconds (saturating at the histogram's upper bound).
pub fn record_ns(hist: &mut Histogram<u64>, elapsed: std::time::Duration) {
    let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX).max(1);
    hist.saturating_record(ns);
}

/// The `quantile` (0..=1) of a nanosecond histogram, in microseconds.
pub fn quantile_us(hist: &Histogram<u64>, quantile: f64) -> f64 {
    hist.value_at_quantile(quantile) as f64 / 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_count_is_the_middle_sample() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).expect("three finite samples");
        assert_eq!((s.median, s.min, s.max, s.samples), (2.0, 1.0, 3.0, 3));
    }

    #[test]
    fn median_of_even_count_is_the_mean_of_the_middle_two() {
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).expect("four finite samples");
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
    }

    #[test]
    fn single_sample_is_its_own_median_min_and_max() {
        let s = Summary::of(&[7.5]).expect("one sample");
        assert_eq!((s.median, s.min, s.max, s.samples), (7.5, 7.5, 7.5, 1));
    }

    #[test]
    fn non_finite_samples_are_ignored_and_empty_is_none() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN, f64::INFINITY]), None);
        let s = Summary::of(&[f64::NAN, 5.0, 1.0]).expect("two finite samples");
        assert_eq!((s.median, s.samples), (3.0, 2));
    }

    #[test]
    fn quantiles_come_out_in_microseconds() {
        let mut h = latency_histogram().expect("valid bounds");
        for us in 1..=100_u64 {
            record_ns(&mut h, std::time::Duration::from_micros(us));
        }
        let p50 = quantile_us(&h, 0.5);
        let p99 = quantile_us(&h, 0.99);
        assert!((49.9..=50.1).contains(&p50), "p50 {p50}");
        assert!((98.9..=99.1).contains(&p99), "p99 {p99}");
    }
}
