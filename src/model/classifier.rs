//! The alignment classifier (`cxrgen train-classifier`): a small CNN that names the finding of a
//! radiograph, so that `eval` can check whether a generated image shows what its prompt says.
//!
//! A stride-2 stem, then stages that each halve the resolution (a stride-2 3×3 convolution and a
//! 3×3 convolution, each followed by GroupNorm and SiLU), global mean and max pooling (so any
//! square size works) and a linear layer to the class logits. The pooled vector is the in-domain
//! feature (`features`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::layers::{group_norm, linear, Conv2d, GroupNorm, Linear};
use super::resnet::{conv3x3, NORM_EPS};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub classes: usize,
    /// Channels of the stem, then of each stage (every one halves the resolution).
    pub channels: Vec<usize>,
    /// GroupNorm groups; must divide every entry of `channels`.
    pub norm_groups: usize,
}

impl ClassifierConfig {
    /// The stem at `width` channels and three stages doubling it.
    pub fn with_width(classes: usize, width: usize) -> Self {
        Self {
            classes,
            channels: vec![width, 2 * width, 4 * width, 8 * width],
            norm_groups: 4.min(width),
        }
    }
}

/// A 3×3 convolution followed by GroupNorm and SiLU.
#[derive(Debug, Clone)]
struct ConvNorm {
    conv: Conv2d,
    norm: GroupNorm,
}

impl ConvNorm {
    fn new(cin: usize, cout: usize, stride: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(cin, cout, stride, vb.pp("conv"))?,
            norm: group_norm(groups, cout, NORM_EPS, vb.pp("norm"))?,
        })
    }
}

impl Module for ConvNorm {
    /// [B, C_in, H, W] → [B, C_out, H/stride, W/stride].
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.norm.forward_silu(&self.conv.forward(xs)?)
    }
}

#[derive(Debug, Clone)]
pub struct Classifier {
    stem: ConvNorm,
    /// Per stage: the stride-2 convolution, then the stride-1 one.
    stages: Vec<(ConvNorm, ConvNorm)>,
    head: Linear,
}

impl Classifier {
    pub fn new(cfg: &ClassifierConfig, vb: VarBuilder) -> Result<Self> {
        let (c, g) = (&cfg.channels, cfg.norm_groups);
        if c.is_empty() || cfg.classes < 2 || c.iter().any(|&n| n == 0 || n % g != 0) {
            candle_core::bail!(
                "classifier: need 2+ classes and channels divisible by {g}: {cfg:?}"
            );
        }
        let stem = ConvNorm::new(1, c[0], 2, g, vb.pp("stem"))?;
        let stages = c
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let vb = vb.pp(format!("stages.{i}"));
                Ok((
                    ConvNorm::new(w[0], w[1], 2, g, vb.pp("down"))?,
                    ConvNorm::new(w[1], w[1], 1, g, vb.pp("conv"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let head = linear(2 * c.last().expect("non-empty"), cfg.classes, vb.pp("head"))?;
        Ok(Self { stem, stages, head })
    }

    /// Images in [−1, 1] → the pooled features, each map's mean then its maximum:
    /// [B, 1, S, S] → [B, 2·C_last].
    pub fn features(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.stem.forward(xs)?;
        for (down, conv) in &self.stages {
            h = conv.forward(&down.forward(&h)?)?;
        }
        // The maximum keeps a small finding (a thin rim of air) that the mean dilutes.
        let h = h.flatten_from(2)?;
        Tensor::cat(&[h.mean(2)?, h.max(2)?], 1)
    }
}

impl Module for Classifier {
    /// Images in [−1, 1] → class logits: [B, 1, S, S] → [B, classes].
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.head.forward(&self.features(xs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::seeded_var_builder;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn shapes_and_bad_configs() {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, &Device::Cpu);
        let cfg = ClassifierConfig::with_width(5, 4);
        let net = Classifier::new(&cfg, vb.clone()).unwrap();
        let x = Tensor::zeros((2, 1, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(net.forward(&x).unwrap().dims(), [2, 5]);
        assert_eq!(net.features(&x).unwrap().dims(), [2, 64]);
        let bad = ClassifierConfig {
            norm_groups: 3,
            ..cfg
        };
        assert!(Classifier::new(&bad, vb).is_err());
    }
}
