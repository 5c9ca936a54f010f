//! Per-image values summarised as mean ± standard deviation; counts as a proportion with its
//! confidence interval.

use anyhow::{bail, Result};
use serde::Serialize;

/// The mean and the sample standard deviation (n − 1; 0 for one value) of the finite values,
/// with how many there were and how many were +∞ (PSNR of identical images) and left out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub infinite: usize,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl MeanStd {
    /// Errors on no values, on NaN or −∞, and when every value is +∞.
    pub fn of(values: &[f64]) -> Result<Self> {
        if let Some(bad) = values
            .iter()
            .find(|v| v.is_nan() || **v == f64::NEG_INFINITY)
        {
            bail!("cannot summarise a value of {bad}")
        }
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let n = finite.len();
        if n == 0 {
            bail!("no finite values to summarise ({} infinite)", values.len())
        }
        let mean = finite.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Ok(Self {
            mean,
            std,
            n,
            infinite: values.len() - n,
        })
    }
}

/// The normal quantile of a two-sided 95 % interval.
const Z95: f64 = 1.959_963_984_540_054;

/// `hits` of `n` as a rate, with its 95 % Wilson score interval (Wilson 1927; Newcombe 1998's
/// method 3, without continuity correction): it stays inside [0, 1] and is sensible at 0 and n
/// hits and at small n, where the normal approximation is not.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Proportion {
    pub hits: usize,
    pub n: usize,
    pub rate: f64,
    pub low: f64,
    pub high: f64,
}

impl Proportion {
    /// None when `n` is 0 (or `hits` exceeds it).
    pub fn wilson(hits: usize, n: usize) -> Option<Self> {
        if n == 0 || hits > n {
            return None;
        }
        let (k, m, z2) = (hits as f64, n as f64, Z95 * Z95);
        let p = k / m;
        let denom = 1.0 + z2 / m;
        let centre = (p + z2 / (2.0 * m)) / denom;
        let half = Z95 / denom * (p * (1.0 - p) / m + z2 / (4.0 * m * m)).sqrt();
        Some(Self {
            hits,
            n,
            rate: p,
            low: (centre - half).max(0.0),
            high: (centre + half).min(1.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_intervals_match_newcombes_table() {
        // Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score, no
        // continuity correction), to the 4 decimals printed there.
        for (hits, n, low, high) in [
            (81, 263, 0.2553, 0.3662),
            (15, 148, 0.0624, 0.1605),
            (0, 20, 0.0, 0.1611),
            (1, 29, 0.0061, 0.1718),
        ] {
            let p = Proportion::wilson(hits, n).unwrap();
            assert!((p.low - low).abs() < 5e-5, "{hits}/{n}: {p:?}");
            assert!((p.high - high).abs() < 5e-5, "{hits}/{n}: {p:?}");
            assert_eq!(p.rate, hits as f64 / n as f64);
        }
        // All hits mirror no hits.
        let all = Proportion::wilson(20, 20).unwrap();
        assert!((all.low - (1.0 - 0.1611)).abs() < 5e-5 && all.high == 1.0);
        assert_eq!(Proportion::wilson(0, 0), None);
        assert_eq!(Proportion::wilson(3, 2), None);
    }

    #[test]
    fn mean_and_sample_std() {
        let s = MeanStd::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!((s.mean, s.n, s.infinite), (2.5, 4, 0));
        assert!((s.std - (5.0f64 / 3.0).sqrt()).abs() < 1e-15);
        assert_eq!(MeanStd::of(&[7.0]).unwrap().std, 0.0);
        let with_inf = MeanStd::of(&[30.0, f64::INFINITY, 32.0]).unwrap();
        assert_eq!((with_inf.mean, with_inf.n, with_inf.infinite), (31.0, 2, 1));
        assert!(MeanStd::of(&[]).is_err());
        assert!(MeanStd::of(&[1.0, f64::NAN]).is_err());
        assert!(MeanStd::of(&[f64::INFINITY]).is_err());
    }
}
