//! Distances between two sets of feature vectors: the Fréchet distance of their Gaussian fits
//! (FID when the features are Inception pool3 activations) and the kernel distance (KID).

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::linalg::symmetric_eigen;
use crate::rng::Rng;

/// The mean and covariance (the unbiased one, divided by n − 1, as NumPy's `np.cov`) of n
/// feature vectors, in F64.
#[derive(Debug, Clone)]
pub struct FeatureStats {
    pub n: usize,
    pub dim: usize,
    pub mean: Vec<f64>,
    /// dim × dim, row-major.
    pub cov: Vec<f64>,
}

impl FeatureStats {
    /// From features [n, dim] (any float dtype, any device); n must be at least 2.
    pub fn from_features(features: &Tensor) -> Result<Self> {
        let (n, dim) = features.dims2()?;
        if n < 2 {
            bail!("a covariance needs at least 2 feature vectors, got {n}")
        }
        let x = features.to_dtype(DType::F64)?;
        let mean = x.mean_keepdim(0)?;
        let centred = x.broadcast_sub(&mean)?;
        let cov = (centred.t()?.matmul(&centred)? / (n - 1) as f64)?;
        Ok(Self {
            n,
            dim,
            mean: mean.flatten_all()?.to_vec1()?,
            cov: cov.flatten_all()?.to_vec1()?,
        })
    }
}

/// The Fréchet distance between the Gaussians N(μ₁, Σ₁) and N(μ₂, Σ₂) (Dowson & Landau 1982):
/// |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½.
///
/// The matrix square roots come from symmetric eigen-decompositions in F64 (see
/// `trace_sqrt_product`), so unlike `scipy.linalg.sqrtm(Σ₁ Σ₂)` of the usual FID code no
/// complex parts or non-symmetric iterations arise.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    ensure!(
        a.dim == b.dim,
        "feature sets of {} and {} dimensions",
        a.dim,
        b.dim
    );
    let n = a.dim;
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let trace = |m: &[f64]| (0..n).map(|i| m[i * n + i]).sum::<f64>();
    Ok(mean_term + trace(&a.cov) + trace(&b.cov) - 2.0 * trace_sqrt_product(a, b)?)
}

/// tr (Σ₁^½ Σ₂ Σ₁^½)^½. With Σ₁ = V diag(λ) Vᵀ, the nonzero eigenvalues of Σ₁^½ Σ₂ Σ₁^½ are those
/// of the r × r matrix A Σ₂ Aᵀ, A = diag(√λ) Vᵀ restricted to the r eigenvalues above rounding
/// noise (λ > n ε λ_max). Working in Σ₁'s range keeps the null space of a rank-deficient
/// covariance (fewer images than features) out: there rounding noise δ would add √δ each.
fn trace_sqrt_product(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    let n = a.dim;
    let eig = symmetric_eigen(&a.cov, n, true)?;
    let largest = eig.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let tolerance = n as f64 * f64::EPSILON * largest;
    let vectors = eig.vectors.expect("asked for");
    let mut rows = Vec::new();
    for (i, &lambda) in eig.values.iter().enumerate() {
        if lambda > tolerance {
            let root = lambda.sqrt();
            rows.extend(vectors[i * n..(i + 1) * n].iter().map(|v| v * root));
        }
    }
    let r = rows.len() / n;
    if r == 0 {
        return Ok(0.0);
    }
    let a_rows = Tensor::from_vec(rows, (r, n), &Device::Cpu)?;
    let cov_b = Tensor::from_slice(&b.cov, (n, n), &Device::Cpu)?;
    let m = a_rows.matmul(&cov_b)?.matmul(&a_rows.t()?)?;
    // Symmetric in exact arithmetic; average away the rounding.
    let m = ((&m + m.t()?)? * 0.5)?;
    let inner = symmetric_eigen(&m.flatten_all()?.to_vec1::<f64>()?, r, false)?;
    Ok(inner.values.iter().map(|v| v.max(0.0).sqrt()).sum())
}

/// KID's settings: the subsets of Bińkowski et al. (2018) as torch-fidelity and clean-fid draw
/// them (100 subsets of 1,000, or of the smaller set's size when that is smaller).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KidConfig {
    pub subsets: usize,
    pub subset_size: usize,
    pub seed: u64,
}

impl Default for KidConfig {
    fn default() -> Self {
        Self {
            subsets: 100,
            subset_size: 1000,
            seed: 0,
        }
    }
}

/// KID over the subsets: the mean and the sample standard deviation (n − 1) of the unbiased
/// MMD² estimates, with the subset size actually used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Kid {
    pub mean: f64,
    pub std: f64,
    pub subsets: usize,
    pub subset_size: usize,
}

/// The kernel inception distance (Bińkowski et al. 2018): the unbiased estimate of the squared
/// maximum mean discrepancy with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged
/// over random subsets drawn without replacement. Features x [n, d] and y [m, d].
///
/// The kernel matrices of the whole sets are computed once (F64 matrix products on the
/// features' device, O((n + m)²) memory) and each subset sums its entries.
pub fn kernel_inception_distance(x: &Tensor, y: &Tensor, cfg: &KidConfig) -> Result<Kid> {
    let (n, d) = x.dims2()?;
    let (m, d2) = y.dims2()?;
    ensure!(d == d2, "feature sets of {d} and {d2} dimensions");
    let size = cfg.subset_size.min(n).min(m);
    if size < 2 {
        bail!("KID needs at least 2 feature vectors in each set, got {n} and {m}")
    }
    if cfg.subsets == 0 {
        bail!("KID needs at least one subset")
    }
    let (x, y) = (x.to_dtype(DType::F64)?, y.to_dtype(DType::F64)?);
    let kernel = |a: &Tensor, b: &Tensor| -> Result<Vec<f64>> {
        let k = ((a.matmul(&b.t()?)? / d as f64)? + 1.0)?.powf(3.0)?;
        Ok(k.flatten_all()?.to_vec1()?)
    };
    let (kxx, kyy, kxy) = (kernel(&x, &x)?, kernel(&y, &y)?, kernel(&x, &y)?);
    let mut rng = Rng::new(cfg.seed);
    let estimates: Vec<f64> = (0..cfg.subsets)
        .map(|_| {
            let ix = sample_without_replacement(n, size, &mut rng);
            let iy = sample_without_replacement(m, size, &mut rng);
            mmd2_unbiased(&kxx, n, &kyy, m, &kxy, &ix, &iy)
        })
        .collect();
    let s = super::summary::MeanStd::of(&estimates)?;
    Ok(Kid {
        mean: s.mean,
        std: s.std,
        subsets: cfg.subsets,
        subset_size: size,
    })
}

/// `k` distinct indices below `n` (a partial Fisher–Yates shuffle).
fn sample_without_replacement(n: usize, k: usize, rng: &mut Rng) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + rng.below(n - i);
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool
}

/// MMD²ᵤ (Gretton et al. 2012, eq. 3) of the subsets `ix` and `iy` of equal size s, from the
/// kernel matrices of the whole sets (`kxx` n × n, `kyy` m × m, `kxy` n × m, row-major):
/// Σ_{i≠j} k(xᵢ, xⱼ) / s(s−1) + Σ_{i≠j} k(yᵢ, yⱼ) / s(s−1) − 2 Σ_{i,j} k(xᵢ, yⱼ) / s².
fn mmd2_unbiased(
    kxx: &[f64],
    n: usize,
    kyy: &[f64],
    m: usize,
    kxy: &[f64],
    ix: &[usize],
    iy: &[usize],
) -> f64 {
    let s = ix.len() as f64;
    let off_diagonal = |k: &[f64], stride: usize, idx: &[usize]| -> f64 {
        let mut total = 0.0;
        for (a, &i) in idx.iter().enumerate() {
            for (b, &j) in idx.iter().enumerate() {
                if a != b {
                    total += k[i * stride + j];
                }
            }
        }
        total
    };
    let mut cross = 0.0;
    for &i in ix {
        for &j in iy {
            cross += kxy[i * m + j];
        }
    }
    (off_diagonal(kxx, n, ix) + off_diagonal(kyy, m, iy)) / (s * (s - 1.0)) - 2.0 * cross / (s * s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(rows: usize, dim: usize, shift: f64, scale: f64, seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let v: Vec<f64> = (0..rows * dim)
            .map(|_| shift + scale * rng.normal())
            .collect();
        Tensor::from_vec(v, (rows, dim), &Device::Cpu).unwrap()
    }

    fn stats(mean: Vec<f64>, cov: Vec<f64>) -> FeatureStats {
        FeatureStats {
            n: 0,
            dim: mean.len(),
            mean,
            cov,
        }
    }

    /// B Bᵀ for a row-major d × d B.
    fn gram(b: &[f64], d: usize) -> Vec<f64> {
        let mut c = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] = (0..d).map(|k| b[i * d + k] * b[j * d + k]).sum();
            }
        }
        c
    }

    #[test]
    fn fid_of_a_set_against_itself_is_zero() {
        // Fewer samples than dimensions: the covariance is singular, as at 2048-d with < 2049
        // images.
        for (n, dim) in [(300, 40), (30, 64)] {
            let s = FeatureStats::from_features(&features(n, dim, 0.3, 1.7, 1)).unwrap();
            let fid = frechet_distance(&s, &s).unwrap();
            assert!(fid.abs() <= 1e-6, "n {n}, dim {dim}: {fid}");
        }
    }

    #[test]
    fn fid_matches_closed_forms() {
        // 2-d: tr (Σ₁Σ₂)^½ = √(tr Σ₁Σ₂ + 2 √(det Σ₁ det Σ₂)) (the square root of a 2 × 2
        // matrix with positive eigenvalues).
        let (s1, s2) = ([2.0, 0.6, 0.6, 1.0], [0.5, -0.3, -0.3, 1.5]);
        let (m1, m2) = (vec![1.0, -2.0], vec![0.5, 0.5]);
        let tr_prod = s1[0] * s2[0] + s1[1] * s2[2] + s1[2] * s2[1] + s1[3] * s2[3];
        let det = |s: [f64; 4]| s[0] * s[3] - s[1] * s[2];
        let tr_sqrt = (tr_prod + 2.0 * (det(s1) * det(s2)).sqrt()).sqrt();
        let expected = 0.25 + 6.25 + (3.0 + 2.0) - 2.0 * tr_sqrt;
        let got = frechet_distance(&stats(m1, s1.to_vec()), &stats(m2, s2.to_vec())).unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");

        // 3-d, non-commuting: scipy.linalg.sqrtm in scripts/reference/eval_metrics.py.
        let b1 = [1.0, 0.2, 0.0, 0.3, 0.8, 0.1, 0.0, -0.4, 0.5];
        let b2 = [0.6, 0.0, 0.3, -0.2, 1.1, 0.0, 0.1, 0.2, 0.9];
        let got = frechet_distance(
            &stats(vec![0.1, -0.2, 0.3], gram(&b1, 3)),
            &stats(vec![0.4, 0.0, -0.1], gram(&b2, 3)),
        )
        .unwrap();
        assert!((got - 1.082816405570).abs() < 1e-10, "{got}");

        // Commuting, 16-d: Σ = Q diag(a) Qᵀ and Q diag(b) Qᵀ give Σ (√aᵢ − √bᵢ)².
        let d = 16;
        let q = {
            // A Householder reflection I − 2 v vᵀ / vᵀv is orthogonal.
            let v: Vec<f64> = (0..d).map(|i| (i as f64 * 0.7).sin() + 0.2).collect();
            let vv: f64 = v.iter().map(|x| x * x).sum();
            let mut q = vec![0.0; d * d];
            for i in 0..d {
                for j in 0..d {
                    q[i * d + j] = f64::from(i == j) - 2.0 * v[i] * v[j] / vv;
                }
            }
            q
        };
        let rotate = |vals: &[f64]| {
            let mut c = vec![0.0; d * d];
            for i in 0..d {
                for j in 0..d {
                    c[i * d + j] = (0..d).map(|k| q[i * d + k] * vals[k] * q[j * d + k]).sum();
                }
            }
            c
        };
        let a: Vec<f64> = (0..d).map(|i| 0.1 + i as f64 * 0.3).collect();
        let b: Vec<f64> = (0..d).map(|i| 2.0 / (1.0 + i as f64)).collect();
        let expected: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
            .sum();
        let got = frechet_distance(
            &stats(vec![0.0; d], rotate(&a)),
            &stats(vec![0.0; d], rotate(&b)),
        )
        .unwrap();
        assert!((got - expected).abs() < 1e-10, "{got} vs {expected}");
    }

    #[test]
    fn fid_of_gaussian_samples_approaches_the_closed_form() {
        // N(0.5, 1) against N(0, 4) per coordinate, 8-d: 8 (0.25 + (1 − 2)²) = 10.
        let (n, d) = (20_000, 8);
        let a = FeatureStats::from_features(&features(n, d, 0.5, 1.0, 11)).unwrap();
        let b = FeatureStats::from_features(&features(n, d, 0.0, 2.0, 12)).unwrap();
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - 10.0).abs() < 0.15, "{got}");
    }

    #[test]
    fn fid_refuses_mismatched_or_too_few_features() {
        assert!(FeatureStats::from_features(&features(1, 4, 0.0, 1.0, 1)).is_err());
        let a = FeatureStats::from_features(&features(5, 4, 0.0, 1.0, 1)).unwrap();
        let b = FeatureStats::from_features(&features(5, 3, 0.0, 1.0, 1)).unwrap();
        assert!(frechet_distance(&a, &b).is_err());
    }

    /// MMD²ᵤ written out from the definition, pair by pair, from the raw feature vectors.
    fn mmd2_direct(x: &[Vec<f64>], y: &[Vec<f64>]) -> f64 {
        let d = x[0].len() as f64;
        let k = |a: &[f64], b: &[f64]| {
            (a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>() / d + 1.0).powi(3)
        };
        let s = x.len() as f64;
        let mut xx = 0.0;
        let mut yy = 0.0;
        let mut xy = 0.0;
        for i in 0..x.len() {
            for j in 0..x.len() {
                if i != j {
                    xx += k(&x[i], &x[j]);
                    yy += k(&y[i], &y[j]);
                }
                xy += k(&x[i], &y[j]);
            }
        }
        xx / (s * (s - 1.0)) + yy / (s * (s - 1.0)) - 2.0 * xy / (s * s)
    }

    fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_vec2::<f64>().unwrap()
    }

    #[test]
    fn kid_matches_a_direct_computation() {
        let x = features(40, 6, 0.2, 1.0, 3);
        let y = features(40, 6, 0.0, 1.3, 4);
        // One subset of the whole sets: no sampling left.
        let cfg = KidConfig {
            subsets: 1,
            subset_size: 40,
            seed: 0,
        };
        let kid = kernel_inception_distance(&x, &y, &cfg).unwrap();
        let direct = mmd2_direct(&rows(&x), &rows(&y));
        assert!(
            (kid.mean - direct).abs() < 1e-12,
            "{} vs {direct}",
            kid.mean
        );
        assert_eq!((kid.subsets, kid.subset_size, kid.std), (1, 40, 0.0));

        // Subsets: each estimate is the direct computation on the drawn rows, in draw order.
        let cfg = KidConfig {
            subsets: 5,
            subset_size: 10,
            seed: 9,
        };
        let kid = kernel_inception_distance(&x, &y, &cfg).unwrap();
        let mut rng = Rng::new(9);
        let (xr, yr) = (rows(&x), rows(&y));
        let direct: Vec<f64> = (0..5)
            .map(|_| {
                let ix = sample_without_replacement(40, 10, &mut rng);
                let iy = sample_without_replacement(40, 10, &mut rng);
                let pick = |r: &[Vec<f64>], idx: &[usize]| -> Vec<Vec<f64>> {
                    idx.iter().map(|&i| r[i].clone()).collect()
                };
                mmd2_direct(&pick(&xr, &ix), &pick(&yr, &iy))
            })
            .collect();
        let mean = direct.iter().sum::<f64>() / 5.0;
        assert!((kid.mean - mean).abs() < 1e-12);
        assert_eq!(kid.subset_size, 10);
    }

    #[test]
    fn kid_is_near_zero_for_one_distribution_and_not_for_two() {
        let cfg = KidConfig {
            subsets: 20,
            subset_size: 100,
            seed: 1,
        };
        let a = features(300, 16, 0.0, 1.0, 5);
        let b = features(300, 16, 0.0, 1.0, 6);
        let c = features(300, 16, 0.5, 1.0, 7);
        let same = kernel_inception_distance(&a, &b, &cfg).unwrap();
        let different = kernel_inception_distance(&a, &c, &cfg).unwrap();
        // Measured: 0.0056 ± 0.021 and 0.92 ± 0.13.
        assert!(same.mean.abs() < 3.0 * same.std, "{same:?}");
        assert!(
            different.mean > 5.0 * different.std && different.mean > 20.0 * same.std,
            "{same:?} {different:?}"
        );
        assert!(kernel_inception_distance(&a.narrow(0, 0, 1).unwrap(), &b, &cfg).is_err());
    }
}
