//! The residual block shared by the VAE and the U-Net.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::layers::{conv2d, group_norm, linear, Conv2d, GroupNorm, Linear};

/// GroupNorm epsilon used throughout (as in LDM/diffusers).
pub const NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone, Copy)]
pub struct ResBlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub groups: usize,
    /// Width of the time embedding added after the first convolution (U-Net only).
    pub time_channels: Option<usize>,
    /// Halve the resolution: stride-2 first convolution, 2×2 average pool on the shortcut
    /// (the "ResNet-D" shortcut, which adds no parameters).
    pub down: bool,
}

/// GroupNorm → SiLU → 3×3 conv, twice, plus a shortcut (1×1 conv when the channels change).
#[derive(Debug, Clone)]
pub struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    down: bool,
}

pub fn conv3x3(in_c: usize, out_c: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    conv2d(in_c, out_c, 3, cfg, vb)
}

impl ResBlock {
    pub fn new(cfg: &ResBlockConfig, vb: VarBuilder) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let stride = if cfg.down { 2 } else { 1 };
        let time_emb_proj = match cfg.time_channels {
            Some(t) => Some(linear(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if cin != cout {
            Some(conv2d(
                cin,
                cout,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(cfg.groups, cin, NORM_EPS, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, stride, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(cfg.groups, cout, NORM_EPS, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, 1, vb.pp("conv2"))?,
            conv_shortcut,
            down: cfg.down,
        })
    }

    /// `xs`: [B, C_in, H, W], `temb`: [B, T] when the block has a time projection: the time
    /// embedding after its SiLU (taken once for all blocks by the caller)
    /// → [B, C_out, H', W'] with H' = H/2 when `down`, else H.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let a = self.norm1.forward_silu(xs)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => self.conv1.forward_shifted(&a, &proj.forward(t)?)?,
            (None, None) => self.conv1.forward(&a)?,
            (Some(_), None) => candle_core::bail!("ResBlock: time embedding expected"),
            (None, Some(_)) => candle_core::bail!("ResBlock: built without a time projection"),
        };
        let mut skip = if self.down {
            xs.avg_pool2d(2)?
        } else {
            xs.clone()
        };
        if let Some(conv) = &self.conv_shortcut {
            skip = conv.forward(&skip)?;
        }
        self.conv2.forward_add(&self.norm2.forward_silu(&h)?, &skip)
    }
}
