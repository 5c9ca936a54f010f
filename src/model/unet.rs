//! The denoising U-Net (paper §3.2.2): ResBlocks with a time embedding, self- and cross-attention
//! transformer blocks at the configured levels and in the middle, skip connections, epsilon output.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use std::sync::Arc;

use super::attention::SpatialTransformer;
use super::checkpointing::{self, GradCheckpoint};
use super::layers::{group_norm, linear, Conv2d, GroupNorm, Linear};
use super::resnet::{conv3x3, ResBlock, ResBlockConfig, NORM_EPS};
use crate::config::UnetConfig;

/// Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017; DDPM):
/// `t`: [B] → [B, dim], cosines first, frequencies 10000^(-i/(dim/2)).
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

/// A ResBlock and, at attention levels, a transformer block.
#[derive(Debug, Clone)]
struct Layer {
    res: ResBlock,
    attn: Option<SpatialTransformer>,
}

impl Layer {
    fn new(
        cfg: &UnetConfig,
        in_channels: usize,
        out_channels: usize,
        context_dim: usize,
        attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let rc = ResBlockConfig {
            in_channels,
            out_channels,
            groups: cfg.norm_groups,
            time_channels: Some(cfg.base_channels * cfg.time_embed_mult),
            down: false,
        };
        let attn = if attention {
            Some(SpatialTransformer::new(
                out_channels,
                context_dim,
                cfg.head_dim,
                cfg.ff_mult,
                cfg.norm_groups,
                vb.pp("attention"),
            )?)
        } else {
            None
        };
        Ok(Self {
            res: ResBlock::new(&rc, vb.pp("resnet"))?,
            attn,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        bias: Option<&Tensor>,
        ckpt: Option<&GradCheckpoint>,
    ) -> Result<Tensor> {
        let xs = resblock(&self.res, xs, temb, ckpt)?;
        match &self.attn {
            Some(attn) => {
                let (attn, context, bias) = (attn.clone(), context.clone(), bias.cloned());
                let f = Arc::new(move |x: &Tensor| attn.forward(x, &context, bias.as_ref()));
                checkpointing::run(ckpt, &xs, f)
            }
            None => Ok(xs),
        }
    }
}

/// A ResBlock with the time embedding, checkpointed when `ckpt` is given.
fn resblock(
    res: &ResBlock,
    xs: &Tensor,
    temb: &Tensor,
    ckpt: Option<&GradCheckpoint>,
) -> Result<Tensor> {
    let (res, temb) = (res.clone(), temb.clone());
    checkpointing::run(
        ckpt,
        xs,
        Arc::new(move |x: &Tensor| res.forward(x, Some(&temb))),
    )
}

#[derive(Debug, Clone)]
struct Level {
    layers: Vec<Layer>,
    /// Stride-2 convolution going down, nearest 2× upsample + convolution going up.
    resample: Option<Conv2d>,
}

#[derive(Debug, Clone)]
pub struct UNet {
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv2d,
    down: Vec<Level>,
    mid_1: Layer,
    mid_2: ResBlock,
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    base_channels: usize,
    /// The compute precision: that of the weights it was built from.
    dtype: DType,
    checkpoint: Option<GradCheckpoint>,
}

impl UNet {
    /// Recompute ResBlocks and transformer blocks in the backward pass instead of keeping their
    /// activations (None: keep them).
    pub fn set_checkpointing(&mut self, ckpt: Option<GradCheckpoint>) {
        self.checkpoint = ckpt;
    }

    /// `latent_channels`: the VAE's; `context_dim`: the text head's output width.
    pub fn new(
        cfg: &UnetConfig,
        latent_channels: usize,
        context_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let c0 = cfg.base_channels;
        let temb = c0 * cfg.time_embed_mult;
        let widths: Vec<usize> = cfg.channel_mult.iter().map(|m| c0 * m).collect();
        let n_levels = widths.len();

        let mut skip_channels = vec![c0];
        let mut ch = c0;
        let mut down = Vec::with_capacity(n_levels);
        for (i, &w) in widths.iter().enumerate() {
            let vb_l = vb.pp("down_blocks").pp(i);
            let attention = cfg.attention_levels.contains(&i);
            let mut layers = Vec::with_capacity(cfg.res_blocks);
            for j in 0..cfg.res_blocks {
                layers.push(Layer::new(cfg, ch, w, context_dim, attention, vb_l.pp(j))?);
                ch = w;
                skip_channels.push(ch);
            }
            let resample = if i + 1 < n_levels {
                skip_channels.push(ch);
                Some(conv3x3(ch, ch, 2, vb_l.pp("downsample"))?)
            } else {
                None
            };
            down.push(Level { layers, resample });
        }

        let vb_m = vb.pp("mid_block");
        let mid_1 = Layer::new(cfg, ch, ch, context_dim, cfg.mid_attention, vb_m.pp(0))?;
        let mid_2 = ResBlock::new(
            &ResBlockConfig {
                in_channels: ch,
                out_channels: ch,
                groups: cfg.norm_groups,
                time_channels: Some(temb),
                down: false,
            },
            vb_m.pp(1).pp("resnet"),
        )?;

        let mut up = Vec::with_capacity(n_levels);
        for (k, i) in (0..n_levels).rev().enumerate() {
            let vb_l = vb.pp("up_blocks").pp(k);
            let w = widths[i];
            let attention = cfg.attention_levels.contains(&i);
            let mut layers = Vec::with_capacity(cfg.res_blocks + 1);
            for j in 0..=cfg.res_blocks {
                let skip = skip_channels.pop().expect("one skip per down layer");
                layers.push(Layer::new(
                    cfg,
                    ch + skip,
                    w,
                    context_dim,
                    attention,
                    vb_l.pp(j),
                )?);
                ch = w;
            }
            let resample = if i > 0 {
                Some(conv3x3(ch, ch, 1, vb_l.pp("upsample"))?)
            } else {
                None
            };
            up.push(Level { layers, resample });
        }

        Ok(Self {
            time_linear_1: linear(c0, temb, vb.pp("time_embedding").pp("linear_1"))?,
            time_linear_2: linear(temb, temb, vb.pp("time_embedding").pp("linear_2"))?,
            conv_in: conv3x3(latent_channels, c0, 1, vb.pp("conv_in"))?,
            down,
            mid_1,
            mid_2,
            up,
            norm_out: group_norm(cfg.norm_groups, c0, NORM_EPS, vb.pp("norm_out"))?,
            conv_out: conv3x3(c0, latent_channels, 1, vb.pp("conv_out"))?,
            base_channels: c0,
            dtype: vb.dtype(),
            checkpoint: None,
        })
    }

    /// Predicts the noise.
    ///
    /// `xs`: noisy latents [B, C_lat, h, w]; `timesteps`: [B] (one per sample);
    /// `context`: text features [B, M, D]; `bias`: padding bias [B, 1, M] from
    /// [`super::attention::padding_bias`] → epsilon [B, C_lat, h, w] in F32. Inputs of any float
    /// type are computed in the precision of the weights.
    pub fn forward(
        &self,
        xs: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let xs = &xs.to_dtype(self.dtype)?;
        let context = &context.to_dtype(self.dtype)?;
        let temb = timestep_embedding(timesteps, self.base_channels)?.to_dtype(self.dtype)?;
        // Every ResBlock's time projection reads SiLU(temb): taken once here.
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&temb)?.silu()?)?
            .silu()?;

        let ckpt = self.checkpoint.as_ref();
        let mut h = self.conv_in.forward(xs)?;
        let mut skips = vec![h.clone()];
        for level in &self.down {
            for layer in &level.layers {
                h = layer.forward(&h, &temb, context, bias, ckpt)?;
                skips.push(h.clone());
            }
            if let Some(conv) = &level.resample {
                h = conv.forward(&h)?;
                skips.push(h.clone());
            }
        }

        h = self.mid_1.forward(&h, &temb, context, bias, ckpt)?;
        h = resblock(&self.mid_2, &h, &temb, ckpt)?;

        for level in &self.up {
            for layer in &level.layers {
                let skip = skips.pop().expect("one skip per up layer");
                h = layer.forward(&Tensor::cat(&[&h, &skip], 1)?, &temb, context, bias, ckpt)?;
            }
            if let Some(conv) = &level.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)?;
            }
        }
        self.conv_out
            .forward(&self.norm_out.forward_silu(&h)?)?
            .to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn timestep_embedding_values() -> Result<()> {
        // dim 4: frequencies 1 and 10000^(-1/2) = 0.01; cos first.
        let t = Tensor::new(&[0f32, 100.], &Device::Cpu)?;
        let e = timestep_embedding(&t, 4)?.to_vec2::<f32>()?;
        let want = [
            [1.0, 1.0, 0.0, 0.0],
            [100f32.cos(), 1f32.cos(), 100f32.sin(), 1f32.sin()],
        ];
        for (row, wrow) in e.iter().zip(want.iter()) {
            for (a, b) in row.iter().zip(wrow.iter()) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        Ok(())
    }
}
