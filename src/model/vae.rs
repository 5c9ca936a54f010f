//! The 8-channel KL-regularised VAE (paper §3.2.1): 256×256×1 → 32×32×8 and back.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use std::sync::Arc;

use super::attention::SpatialSelfAttention;
use super::checkpointing::{self, GradCheckpoint};
use super::layers::{group_norm, Conv2d, GroupNorm};
use super::resnet::{conv3x3, ResBlock, ResBlockConfig, NORM_EPS};
use crate::config::VaeConfig;

/// A ResBlock optionally followed by self-attention.
#[derive(Debug, Clone)]
struct Stage {
    res: ResBlock,
    attn: Option<SpatialSelfAttention>,
}

impl Stage {
    fn new(cfg: ResBlockConfig, attention: bool, vb: VarBuilder) -> Result<Self> {
        let attn = if attention {
            Some(SpatialSelfAttention::new(
                cfg.out_channels,
                cfg.groups,
                vb.pp("attn"),
            )?)
        } else {
            None
        };
        Ok(Self {
            res: ResBlock::new(&cfg, vb.pp("res"))?,
            attn,
        })
    }

    fn forward(&self, xs: &Tensor, ckpt: Option<&GradCheckpoint>) -> Result<Tensor> {
        let res = self.res.clone();
        let xs = checkpointing::run(ckpt, xs, Arc::new(move |x: &Tensor| res.forward(x, None)))?;
        match &self.attn {
            Some(attn) => {
                let attn = attn.clone();
                checkpointing::run(ckpt, &xs, Arc::new(move |x: &Tensor| attn.forward(x)))
            }
            None => Ok(xs),
        }
    }
}

/// The encoder's output: a diagonal Gaussian over the latent.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// [B, C, h, w]
    pub mean: Tensor,
    /// [B, C, h, w], clamped to [-30, 20] as in LDM so that exp() stays finite.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// mean + σ·noise, with `noise` ~ N(0, I) of the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (self.logvar.affine(0.5, 0.)?.exp()? * noise)?
    }

    /// KL(q ‖ N(0, I)) averaged over every latent element (a scalar). The paper's KL of 2.5–3.5
    /// at λ = 1e-4 only adds up with its printed total loss under this averaging (docs/architecture.md).
    pub fn kl(&self) -> Result<Tensor> {
        let var = self.logvar.exp()?;
        ((self.mean.sqr()? + var)? - 1.0)?
            .sub(&self.logvar)?
            .mean_all()?
            .affine(0.5, 0.)
    }
}

#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    stages: Vec<Stage>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_groups;
        let mut ch = cfg.encoder.stem_channels;
        let conv_in = conv3x3(cfg.image_channels, ch, 1, vb.pp("conv_in"))?;
        let mut stages = Vec::with_capacity(cfg.encoder.blocks.len());
        for (i, b) in cfg.encoder.blocks.iter().enumerate() {
            let rc = ResBlockConfig {
                in_channels: ch,
                out_channels: b.channels,
                groups: g,
                time_channels: None,
                down: b.down,
            };
            stages.push(Stage::new(rc, b.attention, vb.pp("blocks").pp(i))?);
            ch = b.channels;
        }
        Ok(Self {
            conv_in,
            stages,
            norm_out: group_norm(g, ch, NORM_EPS, vb.pp("norm_out"))?,
            conv_out: conv3x3(ch, 2 * cfg.latent_channels, 1, vb.pp("conv_out"))?,
        })
    }

    /// [B, 1, H, W] in [-1, 1] → Gaussian over [B, C_lat, H/2^k, W/2^k]
    pub fn forward(&self, xs: &Tensor, ckpt: Option<&GradCheckpoint>) -> Result<DiagonalGaussian> {
        let mut h = self.conv_in.forward(xs)?;
        for s in &self.stages {
            h = s.forward(&h, ckpt)?;
        }
        let moments = self.conv_out.forward(&self.norm_out.forward_silu(&h)?)?;
        let c = moments.dim(1)? / 2;
        Ok(DiagonalGaussian {
            mean: moments.narrow(1, 0, c)?,
            logvar: moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    /// Each stage with whether a 2× nearest upsample precedes it.
    stages: Vec<(bool, Stage)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_groups;
        let mut ch = cfg.decoder.blocks[0].channels;
        let conv_in = conv3x3(cfg.latent_channels, ch, 1, vb.pp("conv_in"))?;
        let mut stages = Vec::with_capacity(cfg.decoder.blocks.len());
        for (i, b) in cfg.decoder.blocks.iter().enumerate() {
            let rc = ResBlockConfig {
                in_channels: ch,
                out_channels: b.channels,
                groups: g,
                time_channels: None,
                down: false,
            };
            stages.push((b.up, Stage::new(rc, b.attention, vb.pp("blocks").pp(i))?));
            ch = b.channels;
        }
        Ok(Self {
            conv_in,
            stages,
            norm_out: group_norm(g, ch, NORM_EPS, vb.pp("norm_out"))?,
            conv_out: conv3x3(ch, cfg.image_channels, 1, vb.pp("conv_out"))?,
        })
    }

    /// [B, C_lat, h, w] → [B, 1, h·2^k, w·2^k] (unbounded; ≈ [-1, 1] once trained)
    pub fn forward(&self, z: &Tensor, ckpt: Option<&GradCheckpoint>) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        for (up, s) in &self.stages {
            if *up {
                let (_, _, hh, ww) = h.dims4()?;
                h = h.upsample_nearest2d(2 * hh, 2 * ww)?;
            }
            h = s.forward(&h, ckpt)?;
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

#[derive(Debug, Clone)]
pub struct Vae {
    pub encoder: Encoder,
    pub decoder: Decoder,
    /// The compute precision: that of the weights it was built from.
    dtype: DType,
    checkpoint: Option<GradCheckpoint>,
}

impl Vae {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            dtype: vb.dtype(),
            checkpoint: None,
        })
    }

    /// Recompute ResBlocks and attention blocks in the backward pass instead of keeping their
    /// activations (None: keep them).
    pub fn set_checkpointing(&mut self, ckpt: Option<GradCheckpoint>) {
        self.checkpoint = ckpt;
    }

    /// [B, 1, H, W] → latent Gaussian in F32, computed in the precision of the weights.
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        let g = self
            .encoder
            .forward(&xs.to_dtype(self.dtype)?, self.checkpoint.as_ref())?;
        Ok(DiagonalGaussian {
            mean: g.mean.to_dtype(DType::F32)?,
            logvar: g.logvar.to_dtype(DType::F32)?,
        })
    }

    /// [B, C_lat, h, w] → [B, 1, H, W] in F32, computed in the precision of the weights.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder
            .forward(&z.to_dtype(self.dtype)?, self.checkpoint.as_ref())?
            .to_dtype(DType::F32)
    }
}
