//! Paired pixel metrics: SSIM, MS-SSIM, PSNR and MSE between two batches of images with
//! intensities in [0, `data_range`], one value per image (computed in F64).

use candle_core::{bail, DType, Device, Result, Tensor, D};
use serde::Serialize;

/// SSIM's settings (Wang et al. 2004). The defaults are scikit-image's `structural_similarity`
/// with `gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1`: an
/// 11-tap Gaussian window (its radius is `int(3.5 σ + 0.5)` = 5), K1 0.01, K2 0.03.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SsimConfig {
    /// Taps of the Gaussian window (odd).
    pub window: usize,
    pub sigma: f64,
    pub k1: f64,
    pub k2: f64,
    pub data_range: f64,
}

impl Default for SsimConfig {
    fn default() -> Self {
        Self {
            window: 11,
            sigma: 1.5,
            k1: 0.01,
            k2: 0.03,
            data_range: 1.0,
        }
    }
}

/// Structural similarity, the mean of the SSIM map over the pixels whose window lies inside the
/// image. scikit-image filters the whole image (reflecting at the border) and then crops the
/// window's radius from every side, which leaves exactly these pixels: so a "valid" filter
/// gives its numbers.
#[derive(Debug, Clone)]
pub struct Ssim {
    cfg: SsimConfig,
    /// The normalised 1-D Gaussian as a row [1, 1, 1, w] and a column [1, 1, w, 1] filter.
    row: Tensor,
    col: Tensor,
}

impl Ssim {
    pub fn new(cfg: SsimConfig, device: &Device) -> Result<Self> {
        if cfg.window.is_multiple_of(2) || cfg.window < 3 {
            bail!("SSIM window {}: must be odd and at least 3", cfg.window)
        }
        let r = (cfg.window / 2) as f64;
        let g: Vec<f64> = (0..cfg.window)
            .map(|i| (-0.5 * ((i as f64 - r) / cfg.sigma).powi(2)).exp())
            .collect();
        let total: f64 = g.iter().sum();
        let g: Vec<f64> = g.iter().map(|v| v / total).collect();
        let row = Tensor::from_vec(g, (1, 1, 1, cfg.window), device)?;
        let col = row.reshape((1, 1, cfg.window, 1))?;
        Ok(Self { cfg, row, col })
    }

    pub fn config(&self) -> &SsimConfig {
        &self.cfg
    }

    /// [B, C, H, W] twice → [B] (F64): SSIM per image, averaged over channels.
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(self.ssim_and_cs(x, y)?.0)
    }

    /// The per-image means of the SSIM map and of its contrast-structure part, each [B] (F64).
    fn ssim_and_cs(&self, x: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = x.dims4()?;
        if y.dims() != x.dims() {
            bail!("SSIM of images of shapes {:?} and {:?}", x.dims(), y.dims())
        }
        if h < self.cfg.window || w < self.cfg.window {
            bail!(
                "SSIM needs images of at least {0}×{0} pixels, got {h}×{w}",
                self.cfg.window
            )
        }
        let x = x.to_dtype(DType::F64)?.reshape((b * c, 1, h, w))?;
        let y = y.to_dtype(DType::F64)?.reshape((b * c, 1, h, w))?;
        // All five local moments with one pair of convolutions.
        let stacked = Tensor::cat(&[&x, &y, &x.sqr()?, &y.sqr()?, &(&x * &y)?], 0)?;
        let filtered = stacked
            .conv2d(&self.row, 0, 1, 1, 1)?
            .conv2d(&self.col, 0, 1, 1, 1)?;
        let m = |i: usize| filtered.narrow(0, i * b * c, b * c);
        let (mx, my) = (m(0)?, m(1)?);
        let (mxx, myy, mxy) = (mx.sqr()?, my.sqr()?, (&mx * &my)?);
        let vx = (m(2)? - &mxx)?;
        let vy = (m(3)? - &myy)?;
        let cov = (m(4)? - &mxy)?;
        let c1 = (self.cfg.k1 * self.cfg.data_range).powi(2);
        let c2 = (self.cfg.k2 * self.cfg.data_range).powi(2);
        let cs = ((cov * 2.0)? + c2)?.div(&((vx + vy)? + c2)?)?;
        let luminance = ((mxy * 2.0)? + c1)?.div(&((mxx + myy)? + c1)?)?;
        let ssim = (luminance * &cs)?;
        let per_image = |map: &Tensor| -> Result<Tensor> {
            map.flatten_from(1)?
                .mean(D::Minus1)?
                .reshape((b, c))?
                .mean(D::Minus1)
        };
        Ok((per_image(&ssim)?, per_image(&cs)?))
    }
}

/// Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) as pytorch-msssim computes it: at each of
/// five scales the contrast-structure term (clamped at 0), at the last the full SSIM, combined
/// with the standard weights; between scales a 2×2 average pool, zero-padded by one pixel on
/// each side of an odd dimension (PyTorch's `avg_pool2d(x, 2, padding=size % 2)`).
#[derive(Debug, Clone)]
pub struct MsSsim {
    ssim: Ssim,
}

impl MsSsim {
    /// Wang et al.'s weights of the five scales, finest first.
    pub const WEIGHTS: [f64; 5] = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333];

    pub fn new(cfg: SsimConfig, device: &Device) -> Result<Self> {
        Ok(Self {
            ssim: Ssim::new(cfg, device)?,
        })
    }

    /// The smallest image side it accepts: the window must still fit after four halvings
    /// (pytorch-msssim's bound).
    pub fn min_side(&self) -> usize {
        Self::min_side_of(self.ssim.cfg.window)
    }

    /// Taps of the Gaussian window.
    pub fn window(&self) -> usize {
        self.ssim.cfg.window
    }

    /// The smallest side [`Self::window_for`] accepts: a 7-tap window over five scales.
    pub const SMALLEST_SIDE: usize = Self::min_side_of(7);

    const fn min_side_of(window: usize) -> usize {
        (window - 1) * 16 + 1
    }

    /// The standard 11-tap window where images of `side` pixels allow it, else the largest odd
    /// window down to 7 that still fits five scales (7 at 128×128, as pytorch-msssim's
    /// `win_size=7`); `None` below [`Self::SMALLEST_SIDE`], where the coarsest scale would be
    /// too few pixels for a statistic.
    pub fn window_for(side: usize) -> Option<usize> {
        (7..=SsimConfig::default().window)
            .rev()
            .step_by(2)
            .find(|&w| Self::min_side_of(w) <= side)
    }

    /// [B, C, H, W] twice → [B] (F64).
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if h.min(w) < self.min_side() {
            bail!(
                "MS-SSIM needs images of at least {0}×{0} pixels (five scales of a window of {1} taps), got {h}×{w}",
                self.min_side(),
                self.ssim.cfg.window
            )
        }
        let (mut x, mut y) = (x.clone(), y.clone());
        let mut product: Option<Tensor> = None;
        let mut factor = |t: Tensor, weight: f64| -> Result<()> {
            let t = t.relu()?.powf(weight)?;
            product = Some(match product.take() {
                Some(p) => (p * t)?,
                None => t,
            });
            Ok(())
        };
        let last = Self::WEIGHTS.len() - 1;
        for (scale, &weight) in Self::WEIGHTS.iter().enumerate() {
            let (ssim, cs) = self.ssim.ssim_and_cs(&x, &y)?;
            if scale == last {
                factor(ssim, weight)?;
            } else {
                factor(cs, weight)?;
                x = half(&x)?;
                y = half(&y)?;
            }
        }
        Ok(product.expect("five scales"))
    }
}

/// 2×2 average pooling with one pixel of zero padding on both sides of an odd dimension.
fn half(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let x = x.pad_with_zeros(2, h % 2, h % 2)?;
    let x = x.pad_with_zeros(3, w % 2, w % 2)?;
    x.avg_pool2d(2)
}

/// Mean squared error per image: [B, ...] twice → [B] (F64).
pub fn mse(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.dims() != y.dims() {
        bail!("MSE of images of shapes {:?} and {:?}", x.dims(), y.dims())
    }
    let d = (x.to_dtype(DType::F64)? - y.to_dtype(DType::F64)?)?;
    d.sqr()?.flatten_from(1)?.mean(D::Minus1)
}

/// Peak signal-to-noise ratio in dB per image, 10 log10(range² / MSE): [B, ...] twice → [B]
/// (F64); +∞ for identical images, as scikit-image.
pub fn psnr(x: &Tensor, y: &Tensor, data_range: f64) -> Result<Tensor> {
    let ln_mse = mse(x, y)?.log()?;
    (ln_mse * (-10.0 / std::f64::consts::LN_10))? + 20.0 * data_range.log10()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SplitMix64's finaliser over (seed, i, j): uniform in [0, 1) with 53 bits. Mirrors
    /// `hash01` in scripts/reference/eval_metrics.py.
    fn hash01(seed: u64, i: u64, j: u64) -> f64 {
        let mut z = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(j.wrapping_mul(0x94D0_49BB_1331_11EB));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn quantise(v: f64) -> f64 {
        (v.clamp(0.0, 1.0) * 255.0 + 0.5).floor() / 255.0
    }

    /// `image(h, w, seed)` of the reference script: a smooth pattern plus pixel noise.
    pub(crate) fn test_image(h: usize, w: usize, seed: u64) -> Vec<f64> {
        let mut v = Vec::with_capacity(h * w);
        for i in 0..h {
            for j in 0..w {
                let (fi, fj) = (i as f64, j as f64);
                v.push(quantise(
                    0.5 + 0.3 * (0.11 * fi + seed as f64).sin() * (0.07 * fj).cos()
                        + 0.2 * (hash01(seed, i as u64, j as u64) - 0.5),
                ));
            }
        }
        v
    }

    /// `distorted(a, seed)` of the reference script: added noise and a ripple.
    pub(crate) fn test_distorted(a: &[f64], h: usize, w: usize, seed: u64) -> Vec<f64> {
        let mut v = Vec::with_capacity(h * w);
        for i in 0..h {
            for j in 0..w {
                let (fi, fj) = (i as f64, j as f64);
                v.push(quantise(
                    a[i * w + j]
                        + 0.15 * (hash01(seed, i as u64, j as u64) - 0.5)
                        + 0.05 * (0.2 * fj + 0.3 * fi).cos(),
                ));
            }
        }
        v
    }

    fn tensor(v: Vec<f64>, h: usize, w: usize) -> Tensor {
        Tensor::from_vec(v, (1, 1, h, w), &Device::Cpu).unwrap()
    }

    /// The reference script's pairs, by name, as [1, 1, H, W] F64 tensors.
    fn pair(name: &str) -> (Tensor, Tensor) {
        let (h, w, sa, sb, unrelated) = match name {
            "small_distorted" => (64, 48, 1, 2, false),
            "small_unrelated" => (64, 48, 3, 4, true),
            "odd_distorted" => (200, 177, 5, 6, false),
            "large_distorted" => (256, 256, 7, 8, false),
            "mid_distorted" => (128, 128, 9, 10, false),
            _ => unreachable!(),
        };
        let a = test_image(h, w, sa);
        let b = if unrelated {
            test_image(h, w, sb)
        } else {
            test_distorted(&a, h, w, sb)
        };
        (tensor(a, h, w), tensor(b, h, w))
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_vec1::<f64>().unwrap()[0]
    }

    /// Output of scripts/reference/eval_metrics.py (scikit-image 0.26.0, pytorch-msssim 1.0.0):
    /// name, SSIM, PSNR, MSE, MS-SSIM where the images are large enough (11 taps, 7 taps).
    #[allow(clippy::type_complexity)]
    const REFERENCE: [(&str, f64, f64, f64, Option<f64>, Option<f64>); 5] = [
        (
            "small_distorted",
            0.7972961451,
            25.1447031320,
            0.003058649318,
            None,
            None,
        ),
        (
            "small_unrelated",
            0.1971248248,
            15.3689735077,
            0.029047091263,
            None,
            None,
        ),
        (
            "odd_distorted",
            0.8020094275,
            25.0579359765,
            0.003120372217,
            Some(0.9233296008),
            Some(0.9202819392),
        ),
        (
            "large_distorted",
            0.8011817494,
            25.0592761626,
            0.003119409452,
            Some(0.9255263135),
            Some(0.9216013273),
        ),
        (
            "mid_distorted",
            0.8003097632,
            25.0682540560,
            0.003112967556,
            None,
            Some(0.9212155442),
        ),
    ];

    #[test]
    fn test_images_match_the_reference_formula() {
        // a[3,5], b[3,5] and a[-1,-1] in 8-bit levels, as the script printed them.
        for (name, a35, b35, last) in [
            ("small_distorted", 178.0, 188.0, 51.0),
            ("small_unrelated", 108.0, 68.0, 142.0),
            ("odd_distorted", 91.0, 86.0, 193.0),
            ("large_distorted", 182.0, 165.0, 83.0),
            ("mid_distorted", 125.0, 133.0, 179.0),
        ] {
            let (a, b) = pair(name);
            let px = |t: &Tensor, i: usize, j: usize| {
                t.get(0)
                    .unwrap()
                    .get(0)
                    .unwrap()
                    .get(i)
                    .unwrap()
                    .get(j)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    * 255.0
            };
            let (_, _, h, w) = a.dims4().unwrap();
            assert_eq!(
                (px(&a, 3, 5), px(&b, 3, 5), px(&a, h - 1, w - 1)),
                (a35, b35, last),
                "{name}"
            );
        }
    }

    #[test]
    fn ssim_psnr_mse_ms_ssim_match_the_references() {
        let ssim = Ssim::new(SsimConfig::default(), &Device::Cpu).unwrap();
        let ms = MsSsim::new(SsimConfig::default(), &Device::Cpu).unwrap();
        let cfg7 = SsimConfig {
            window: 7,
            ..SsimConfig::default()
        };
        let ms7 = MsSsim::new(cfg7, &Device::Cpu).unwrap();
        for (name, r_ssim, r_psnr, r_mse, r_ms, r_ms7) in REFERENCE {
            let (a, b) = pair(name);
            let got = scalar(&ssim.forward(&a, &b).unwrap());
            assert!(
                (got - r_ssim).abs() < 1e-4,
                "{name}: SSIM {got} vs {r_ssim}"
            );
            let got = scalar(&psnr(&a, &b, 1.0).unwrap());
            assert!(
                (got - r_psnr).abs() < 1e-4,
                "{name}: PSNR {got} vs {r_psnr}"
            );
            let got = scalar(&mse(&a, &b).unwrap());
            assert!((got - r_mse).abs() < 1e-8, "{name}: MSE {got} vs {r_mse}");
            if let Some(r_ms) = r_ms {
                let got = scalar(&ms.forward(&a, &b).unwrap());
                assert!((got - r_ms).abs() < 1e-4, "{name}: MS-SSIM {got} vs {r_ms}");
            }
            if let Some(r_ms) = r_ms7 {
                let got = scalar(&ms7.forward(&a, &b).unwrap());
                assert!(
                    (got - r_ms).abs() < 1e-4,
                    "{name}: MS-SSIM/7 {got} vs {r_ms}"
                );
            }
        }
    }

    #[test]
    fn the_window_is_the_largest_that_fits_five_scales() {
        assert_eq!(MsSsim::window_for(256), Some(11));
        assert_eq!(MsSsim::window_for(161), Some(11));
        assert_eq!(MsSsim::window_for(160), Some(9));
        assert_eq!(MsSsim::window_for(128), Some(7));
        assert_eq!(MsSsim::window_for(97), Some(7));
        assert_eq!(MsSsim::window_for(96), None);
        assert_eq!(MsSsim::window_for(64), None);
        assert_eq!(MsSsim::SMALLEST_SIDE, 97);
    }

    #[test]
    fn batches_give_each_image_its_own_value_and_identity_is_perfect() {
        let ssim = Ssim::new(SsimConfig::default(), &Device::Cpu).unwrap();
        let (a1, b1) = pair("small_distorted");
        let (a2, b2) = pair("small_unrelated");
        // F32 in, one value per image; the batch changes nothing.
        let x = Tensor::cat(&[&a1, &a2], 0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let y = Tensor::cat(&[&b1, &b2], 0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let both = ssim.forward(&x, &y).unwrap().to_vec1::<f64>().unwrap();
        assert!((both[0] - REFERENCE[0].1).abs() < 1e-4);
        assert!((both[1] - REFERENCE[1].1).abs() < 1e-4);
        let same = ssim.forward(&x, &x).unwrap().to_vec1::<f64>().unwrap();
        assert!(same.iter().all(|v| (v - 1.0).abs() < 1e-12), "{same:?}");
        assert_eq!(mse(&x, &x).unwrap().to_vec1::<f64>().unwrap(), [0.0, 0.0]);
        assert!(psnr(&x, &x, 1.0).unwrap().to_vec1::<f64>().unwrap()[0].is_infinite());
        let (a, _) = pair("large_distorted");
        let ms = MsSsim::new(SsimConfig::default(), &Device::Cpu).unwrap();
        assert!((scalar(&ms.forward(&a, &a).unwrap()) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn too_small_images_are_an_error_naming_the_size() {
        let ssim = Ssim::new(SsimConfig::default(), &Device::Cpu).unwrap();
        let t = Tensor::zeros((1, 1, 8, 32), DType::F32, &Device::Cpu).unwrap();
        let err = ssim.forward(&t, &t).unwrap_err().to_string();
        assert!(err.contains("11×11") && err.contains("8×32"), "{err}");
        let ms = MsSsim::new(SsimConfig::default(), &Device::Cpu).unwrap();
        let (a, b) = pair("small_distorted");
        let err = ms.forward(&a, &b).unwrap_err().to_string();
        assert!(err.contains("161×161") && err.contains("64×48"), "{err}");
    }
}
