//! The symmetric eigen-decomposition FID needs, in F64: Householder reduction to tridiagonal
//! form and the implicit QL algorithm, as in EISPACK's tred2/tql2 (Bowdler, Martin, Reinsch &
//! Wilkinson 1968) by way of JAMA's public-domain port.
//!
//! The eigenvector matrix V is stored transposed (row i of `vectors` is V's column i, the i-th
//! eigenvector) so that every inner loop runs over contiguous memory: at 2048 × 2048 the
//! column-wise loops of the textbook version are several times slower.

use anyhow::{bail, Result};

/// Eigenvalues in ascending order and, when asked for, the matching unit eigenvectors (row i of
/// the n × n row-major matrix is the eigenvector of value i).
pub struct Eigen {
    pub values: Vec<f64>,
    pub vectors: Option<Vec<f64>>,
}

/// The eigen-decomposition of the symmetric n × n row-major matrix `a` (only its lower
/// triangle is read). `vectors: false` skips the O(n³) work of accumulating the eigenvectors.
pub fn symmetric_eigen(a: &[f64], n: usize, vectors: bool) -> Result<Eigen> {
    if a.len() != n * n {
        bail!(
            "eigen-decomposition of {} values as a {n}×{n} matrix",
            a.len()
        )
    }
    if let Some(bad) = a.iter().find(|v| !v.is_finite()) {
        bail!("eigen-decomposition of a matrix holding {bad}")
    }
    if n == 0 {
        return Ok(Eigen {
            values: Vec::new(),
            vectors: vectors.then(Vec::new),
        });
    }
    // w[c * n + r] is V[r][c]; V starts as the matrix, which is symmetric.
    let mut w = a.to_vec();
    let (mut d, mut e) = tridiagonalize(&mut w, n, vectors);
    ql_implicit(&mut d, &mut e, vectors.then_some(&mut w[..]), n)?;
    Ok(Eigen {
        values: d,
        vectors: vectors.then_some(w),
    })
}

/// tred2: reduces the matrix in `w` to tridiagonal form, returning its diagonal and
/// subdiagonal (`e[i]` couples i − 1 and i); with `accumulate`, `w` then holds the orthogonal
/// transformation (transposed).
fn tridiagonalize(w: &mut [f64], n: usize, accumulate: bool) -> (Vec<f64>, Vec<f64>) {
    let mut d: Vec<f64> = (0..n).map(|j| w[j * n + n - 1]).collect();
    let mut e = vec![0.0; n];
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|v| v.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = w[j * n + i - 1];
                w[j * n + i] = 0.0;
                w[i * n + j] = 0.0;
            }
        } else {
            // The Householder vector, scaled against under- and overflow.
            for v in &mut d[..i] {
                *v /= scale;
                h += *v * *v;
            }
            let f = d[i - 1];
            let g = if f > 0.0 { -h.sqrt() } else { h.sqrt() };
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            e[..i].fill(0.0);
            // The similarity transformation of the remaining columns.
            for j in 0..i {
                let f = d[j];
                w[i * n + j] = f;
                let row = &w[j * n..j * n + i];
                let mut g = e[j] + row[j] * f;
                for k in j + 1..i {
                    g += row[k] * d[k];
                    e[k] += row[k] * f;
                }
                e[j] = g;
            }
            let mut f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                let (f, g) = (d[j], e[j]);
                let row = &mut w[j * n..j * n + i];
                for k in j..i {
                    row[k] -= f * e[k] + g * d[k];
                }
                d[j] = w[j * n + i - 1];
                w[j * n + i] = 0.0;
            }
        }
        d[i] = h;
    }
    if !accumulate {
        for (j, v) in d.iter_mut().enumerate() {
            *v = w[j * n + j];
        }
        e[0] = 0.0;
        return (d, e);
    }
    for i in 0..n - 1 {
        w[i * n + n - 1] = w[i * n + i];
        w[i * n + i] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            let (head, tail) = w.split_at_mut((i + 1) * n);
            let next = &mut tail[..i + 1];
            for k in 0..=i {
                d[k] = next[k] / h;
            }
            for j in 0..=i {
                let row = &mut head[j * n..j * n + i + 1];
                let g: f64 = next.iter().zip(row.iter()).map(|(a, b)| a * b).sum();
                for (v, dk) in row.iter_mut().zip(&d[..=i]) {
                    *v -= g * dk;
                }
            }
        }
        w[(i + 1) * n..(i + 1) * n + i + 1].fill(0.0);
    }
    for j in 0..n {
        d[j] = w[j * n + n - 1];
        w[j * n + n - 1] = 0.0;
    }
    w[n * n - 1] = 1.0;
    e[0] = 0.0;
    (d, e)
}

/// tql2: the eigenvalues of the symmetric tridiagonal matrix (`d`, `e`) into `d`, ascending,
/// rotating the rows of `vectors` along when given.
fn ql_implicit(
    d: &mut [f64],
    e: &mut [f64],
    mut vectors: Option<&mut [f64]>,
    n: usize,
) -> Result<()> {
    const MAX_ITERATIONS: usize = 60;
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        // The first negligible subdiagonal element at or after l (e[n − 1] is 0).
        let m = (l..n).find(|&m| e[m].abs() <= eps * tst1).unwrap_or(n - 1);
        if m > l {
            let mut iterations = 0;
            loop {
                iterations += 1;
                if iterations > MAX_ITERATIONS {
                    bail!("the eigenvalue iteration did not converge (value {l} of {n})")
                }
                // The implicit shift.
                let g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let h = g - d[l];
                for v in &mut d[l + 2..] {
                    *v -= h;
                }
                f += h;
                // The implicit QL transformation.
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    let g = c * e[i];
                    let h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    if let Some(w) = vectors.as_deref_mut() {
                        let (head, tail) = w.split_at_mut((i + 1) * n);
                        let (vi, vi1) = (&mut head[i * n..], &mut tail[..n]);
                        for (a, b) in vi.iter_mut().zip(vi1.iter_mut()) {
                            let h = *b;
                            *b = s * *a + c * h;
                            *a = c * *a - s * h;
                        }
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    // Ascending order, the vectors along.
    for i in 0..n.saturating_sub(1) {
        let k = (i..n).min_by(|&a, &b| d[a].total_cmp(&d[b])).unwrap_or(i);
        if k != i {
            d.swap(i, k);
            if let Some(w) = vectors.as_deref_mut() {
                let (head, tail) = w.split_at_mut(k * n);
                head[i * n..(i + 1) * n].swap_with_slice(&mut tail[..n]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// A random orthogonal matrix (Gram-Schmidt on Gaussian rows), row-major.
    fn orthogonal(n: usize, rng: &mut Rng) -> Vec<f64> {
        let mut q: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
        for i in 0..n {
            for j in 0..i {
                let dot: f64 = (0..n).map(|k| q[i * n + k] * q[j * n + k]).sum();
                for k in 0..n {
                    q[i * n + k] -= dot * q[j * n + k];
                }
            }
            let norm = (0..n).map(|k| q[i * n + k].powi(2)).sum::<f64>().sqrt();
            for k in 0..n {
                q[i * n + k] /= norm;
            }
        }
        q
    }

    /// Q^T diag(values) Q.
    fn with_spectrum(q: &[f64], values: &[f64]) -> Vec<f64> {
        let n = values.len();
        let mut a = vec![0.0; n * n];
        for r in 0..n {
            for c in 0..n {
                a[r * n + c] = (0..n)
                    .map(|k| q[k * n + r] * values[k] * q[k * n + c])
                    .sum();
            }
        }
        a
    }

    #[test]
    fn recovers_a_known_spectrum_and_its_vectors() {
        let mut rng = Rng::new(3);
        let n = 24;
        let q = orthogonal(n, &mut rng);
        // Distinct values, a repeated one and zeros (a rank-deficient covariance).
        let mut values: Vec<f64> = (0..n).map(|i| (i as f64 - 5.0) * 0.37).collect();
        values[3] = values[4];
        values[0] = 0.0;
        values[1] = 0.0;
        let a = with_spectrum(&q, &values);
        let eig = symmetric_eigen(&a, n, true).unwrap();
        let mut expected = values.clone();
        expected.sort_by(f64::total_cmp);
        for (got, want) in eig.values.iter().zip(&expected) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        // A v = λ v with unit v.
        let v = eig.vectors.unwrap();
        for i in 0..n {
            let vi = &v[i * n..(i + 1) * n];
            let norm: f64 = vi.iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-12);
            for r in 0..n {
                let av: f64 = (0..n).map(|c| a[r * n + c] * vi[c]).sum();
                assert!((av - eig.values[i] * vi[r]).abs() < 1e-12);
            }
        }
        let values_only = symmetric_eigen(&a, n, false).unwrap();
        assert!(values_only.vectors.is_none());
        for (x, y) in values_only.values.iter().zip(&eig.values) {
            assert!((x - y).abs() < 1e-12);
        }
    }

    #[test]
    fn small_cases_and_bad_input() {
        let one = symmetric_eigen(&[2.5], 1, true).unwrap();
        assert_eq!((one.values, one.vectors), (vec![2.5], Some(vec![1.0])));
        let two = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2, false).unwrap();
        assert!((two.values[0] - 1.0).abs() < 1e-15 && (two.values[1] - 3.0).abs() < 1e-15);
        let diag = symmetric_eigen(&[3.0, 0.0, 0.0, -1.0], 2, true).unwrap();
        assert_eq!(diag.values, [-1.0, 3.0]);
        assert!(symmetric_eigen(&[1.0, f64::NAN, f64::NAN, 1.0], 2, false).is_err());
        assert!(symmetric_eigen(&[1.0, 2.0, 3.0], 2, false).is_err());
    }
}
