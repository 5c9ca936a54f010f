//! Per-image values summarised as mean ± standard deviation.

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

#[cfg(test)]
mod tests {
    use super::*;

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
