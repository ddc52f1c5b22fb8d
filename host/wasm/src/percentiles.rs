//! Lock-free distributions of per-invocation values (duration, fuel) with percentiles.
//!
//! Each value lands in a logarithmic bucket (four per power of two, so a reported percentile
//! is at most 25% above the true value); recording is one atomic add, so the invocation path
//! takes no lock. The console and `GET /v1/handlers` read p50, p90 and p99 from it.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Sub-buckets per power of two.
const STEPS: u32 = 4;
/// Buckets: values 0..4 exactly, then four per power of two up to `u64::MAX`.
const BUCKETS: usize = (64 * STEPS) as usize;

/// A distribution of `u64` values, recorded concurrently without locks.
pub struct Distribution {
    buckets: Box<[AtomicU64]>,
}

impl Default for Distribution {
    fn default() -> Self {
        Distribution {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distribution")
            .field("percentiles", &self.percentiles())
            .finish()
    }
}

/// p50, p90 and p99 of a [`Distribution`], each the upper bound of its bucket (never below the
/// true value, at most 25% above it), and the number of values recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
}

/// The bucket of `value`.
fn bucket(value: u64) -> usize {
    if value < u64::from(STEPS) {
        return value as usize;
    }
    let power = 63 - value.leading_zeros(); // ≥ 2
    let step = (value >> (power - 2)) & u64::from(STEPS - 1);
    ((power - 1) * STEPS) as usize + step as usize
}

/// The largest value of bucket `index`.
fn upper_bound(index: usize) -> u64 {
    let index = index as u32;
    if index < STEPS {
        return u64::from(index);
    }
    let power = index / STEPS + 1;
    let step = u64::from(index % STEPS);
    let base = 1u64 << power;
    let width = 1u64 << (power - 2);
    // (step + 1) * width ≤ 2^63, and the last bucket ends exactly at u64::MAX.
    (base - 1).saturating_add((step + 1) * width)
}

impl Distribution {
    /// Records one value.
    pub fn record(&self, value: u64) {
        self.buckets[bucket(value)].fetch_add(1, Ordering::Relaxed);
    }

    /// The percentiles of everything recorded so far; `None` before the first value.
    pub fn percentiles(&self) -> Option<Percentiles> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return None;
        }
        let at = |quantile: f64| {
            // The rank of the quantile, 1-based: the smallest value with at least that share.
            let rank = ((count as f64) * quantile).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (index, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return upper_bound(index);
                }
            }
            upper_bound(BUCKETS - 1)
        };
        Some(Percentiles {
            count,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lies_in_a_bucket_whose_bound_is_at_most_25_percent_above_it() {
        let mut values: Vec<u64> = (0..5000).collect();
        values.extend((0..64).map(|p| 1u64 << p));
        values.extend((1..64).map(|p| (1u64 << p) - 1));
        values.extend([u64::MAX, u64::MAX - 1, 123_456_789, 999_999_999_999]);
        for value in values {
            let index = bucket(value);
            assert!(index < BUCKETS, "{value} → bucket {index}");
            let bound = upper_bound(index);
            assert!(bound >= value, "{value}: bound {bound} is below it");
            assert!(
                bound as f64 <= value as f64 * 1.25 + 1.0,
                "{value}: bound {bound} is too far above it"
            );
            if index > 0 {
                assert!(
                    upper_bound(index - 1) < value,
                    "{value} belongs in an earlier bucket"
                );
            }
        }
    }

    #[test]
    fn percentiles_follow_the_recorded_values() {
        let distribution = Distribution::default();
        assert_eq!(distribution.percentiles(), None);
        for value in 1..=1000u64 {
            distribution.record(value);
        }
        let p = distribution.percentiles().expect("values were recorded");
        assert_eq!(p.count, 1000);
        for (got, want) in [(p.p50, 500), (p.p90, 900), (p.p99, 990)] {
            assert!(
                got >= want && got as f64 <= want as f64 * 1.25,
                "{got} for {want}"
            );
        }
    }
}
