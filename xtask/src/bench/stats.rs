//! The few statistics the benchmark reports: medians (robust to the odd disturbed round on a
//! shared machine), means and ranges.

/// Summary of one series of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

/// Median (mean of the two middle values for an even count); `None` when empty or when a
/// sample is NaN.
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    })
}

/// Median, mean, min and max; `None` when empty.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let median = median(samples)?;
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Summary {
        median,
        mean,
        min,
        max,
    })
}

/// Nearest-rank percentile (`p` in 0..=100): the smallest sample with at least `p` % of the
/// samples at or below it, so every value reported is one that was measured (with 40
/// samples, p99 is the largest). `None` when empty or when a sample is NaN.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// Element-wise `a[i] - b[i]` (pairs from the same round).
pub fn paired_differences(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), Some(10.0));
        assert_eq!(percentile(&s, 90.0), Some(18.0));
        assert_eq!(percentile(&s, 99.0), Some(20.0));
        assert_eq!(percentile(&s, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0, f64::NAN], 50.0), None);
    }

    #[test]
    fn summary_and_pairs() {
        let s = summarize(&[26.0, 27.0, 26.0, 30.0]).unwrap();
        assert_eq!((s.median, s.mean, s.min, s.max), (26.5, 27.25, 26.0, 30.0));
        assert_eq!(
            paired_differences(&[27.0, 28.0], &[26.0, 26.0, 99.0]),
            vec![1.0, 2.0]
        );
        assert!(summarize(&[]).is_none());
    }
}
