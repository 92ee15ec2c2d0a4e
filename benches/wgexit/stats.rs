//! Summaries of latency samples.

use serde::Serialize;

/// Order statistics of samples in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            // Nearest rank.
            let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1]
        };
        Summary {
            n: v.len(),
            min: v.first().copied().unwrap_or(f64::NAN),
            median: q(0.5),
            p95: q(0.95),
            p99: q(0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The spread of a ratio a/b over rounds: the lowest and highest of the rounds' ratios of
/// medians. Samples taken interleaved (a, b, a, b, ...) are cut into `rounds` consecutive
/// rounds; `None` when a round would be empty.
pub fn ratio_spread(a: &[f64], b: &[f64], rounds: usize) -> Option<(f64, f64)> {
    let n = a.len().min(b.len());
    if rounds == 0 || n < rounds {
        return None;
    }
    let per = n / rounds;
    let ratios: Vec<f64> = (0..rounds)
        .map(|r| {
            let end = if r + 1 == rounds { n } else { (r + 1) * per };
            let (x, y) = (&a[r * per..end], &b[r * per..end]);
            Summary::of(x).median / Summary::of(y).median
        })
        .collect();
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((lo, hi))
}

/// The lowest and highest of `v`.
pub fn range(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}
