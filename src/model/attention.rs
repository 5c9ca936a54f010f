//! Attention: the scaled dot-product kernel (chunked over queries, masked), multi-head self- and
//! cross-attention, the transformer block of the U-Net and the single-head spatial attention of
//! the VAE.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::layers::{
    from_tokens, group_norm, linear, linear_no_bias, to_tokens, GroupNorm, LayerNorm, Linear,
};
use super::resnet::NORM_EPS;

/// Largest attention-score matrix materialised at once, in elements (64 MiB of f32). The VAE's
/// 64×64 attention has 4,096 tokens, a 16.7 M-entry matrix per image: it is computed in query
/// chunks so that a batch never holds all of them (SPEC: "never materialise it for a whole batch").
const MAX_SCORE_ELEMENTS: usize = 1 << 24;

/// Additive bias that hides padding: `mask` [B, M] with 1 for real tokens and 0 for padding
/// → [B, 1, M] with 0 and -1e9. Kept finite so that softmax never sees -inf - (-inf).
pub fn padding_bias(mask: &Tensor) -> Result<Tensor> {
    ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.unsqueeze(1)
}

/// softmax(q kᵀ · scale + bias) v.
///
/// `q`: [N, Lq, d], `k`, `v`: [N, Lk, d], `bias`: [N, 1, Lk] → [N, Lq, d]. Scores and softmax are
/// computed in F32 whatever the input precision.
pub fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, lq, d) = q.dims3()?;
    let lk = k.dim(1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let kt = k.transpose(1, 2)?.contiguous()?;
    let rows = (MAX_SCORE_ELEMENTS / (n * lk).max(1)).clamp(1, lq);
    let mut outs = Vec::with_capacity(lq.div_ceil(rows));
    let mut start = 0;
    while start < lq {
        let len = rows.min(lq - start);
        let qc = if len == lq {
            q.clone()
        } else {
            q.narrow(1, start, len)?
        };
        // Scaling q first keeps half-precision products in range.
        let mut scores = (qc * scale)?.matmul(&kt)?.to_dtype(DType::F32)?;
        if let Some(b) = bias {
            scores = scores.broadcast_add(b)?;
        }
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(v.dtype())?;
        outs.push(probs.matmul(v)?);
        start += len;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, 1)
    }
}

/// Multi-head attention; self-attention when no context is given.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `dim`: query width; `context_dim`: key/value source width (= `dim` for self-attention).
    /// q, k and v have no bias: a key bias cannot change the softmax and would get no gradient.
    pub fn new(dim: usize, context_dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            to_q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out"))?,
            heads,
        })
    }

    /// [B, L, C] → [B·heads, L, C/heads]
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, l, c) = xs.dims3()?;
        xs.reshape((b, l, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * self.heads, l, c / self.heads))
    }

    /// `xs`: [B, L, C]; `context`: [B, M, D] (None: self-attention); `bias`: [B, 1, M] from
    /// [`padding_bias`] → [B, L, C].
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l, c) = xs.dims3()?;
        let ctx = context.unwrap_or(xs);
        let q = self.split_heads(&self.to_q.forward(xs)?)?;
        let k = self.split_heads(&self.to_k.forward(ctx)?)?;
        let v = self.split_heads(&self.to_v.forward(ctx)?)?;
        let bias = match bias {
            Some(bias) => {
                let m = bias.dim(2)?;
                Some(
                    bias.unsqueeze(1)?
                        .broadcast_as((b, self.heads, 1, m))?
                        .contiguous()?
                        .reshape((b * self.heads, 1, m))?,
                )
            }
            None => None,
        };
        let out = scaled_dot_product(&q, &k, &v, bias.as_ref())?
            .reshape((b, self.heads, l, c / self.heads))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, c))?;
        self.to_out.forward(&out)
    }
}

/// GEGLU feed-forward (Shazeer, "GLU Variants Improve Transformer", 2020).
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn new(dim: usize, mult: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, 2 * mult * dim, vb.pp("proj_in"))?,
            proj_out: linear(mult * dim, dim, vb.pp("proj_out"))?,
        })
    }
}

impl Module for FeedForward {
    /// [B, L, C] → [B, L, C]
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(xs)?;
        let half = h.dim(D::Minus1)? / 2;
        let gated =
            (h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?)?;
        self.proj_out.forward(&gated)
    }
}

/// Pre-norm transformer block: self-attention, cross-attention to the text, feed-forward.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    pub fn new(
        dim: usize,
        context_dim: usize,
        heads: usize,
        ff_mult: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(dim, dim, heads, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(dim, context_dim, heads, vb.pp("attn2"))?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, ff_mult, vb.pp("ff"))?,
        })
    }

    /// `xs`: [B, L, C], `context`: [B, M, D], `bias`: [B, 1, M] → [B, L, C]
    pub fn forward(&self, xs: &Tensor, context: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context), bias)?
            + &xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + &xs
    }
}

/// A transformer block applied to a feature map: GroupNorm, project to tokens, block, project back,
/// residual (LDM's SpatialTransformer with depth 1).
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    block: TransformerBlock,
    proj_out: Linear,
}

impl SpatialTransformer {
    pub fn new(
        channels: usize,
        context_dim: usize,
        head_dim: usize,
        ff_mult: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            norm: group_norm(groups, channels, NORM_EPS, vb.pp("norm"))?,
            proj_in: linear(channels, channels, vb.pp("proj_in"))?,
            block: TransformerBlock::new(
                channels,
                context_dim,
                channels / head_dim,
                ff_mult,
                vb.pp("transformer_blocks").pp(0),
            )?,
            proj_out: linear(channels, channels, vb.pp("proj_out"))?,
        })
    }

    /// `xs`: [B, C, H, W], `context`: [B, M, D], `bias`: [B, 1, M] → [B, C, H, W]
    pub fn forward(&self, xs: &Tensor, context: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let tokens = self.proj_in.forward(&to_tokens(&self.norm.forward(xs)?)?)?;
        let tokens = self.block.forward(&tokens, context, bias)?;
        from_tokens(&self.proj_out.forward(&tokens)?, h, w)? + xs
    }
}

/// Single-head self-attention over a feature map with a residual (the VAE's attention).
#[derive(Debug, Clone)]
pub struct SpatialSelfAttention {
    norm: GroupNorm,
    attn: Attention,
}

impl SpatialSelfAttention {
    pub fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: group_norm(groups, channels, NORM_EPS, vb.pp("norm"))?,
            attn: Attention::new(channels, channels, 1, vb)?,
        })
    }
}

impl Module for SpatialSelfAttention {
    /// [B, C, H, W] → [B, C, H, W]
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let tokens = to_tokens(&self.norm.forward(xs)?)?;
        from_tokens(&self.attn.forward(&tokens, None, None)?, h, w)? + xs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let d = q.dim(2)? as f64;
        let mut s = (q.matmul(&k.t()?)? / d.sqrt())?;
        if let Some(b) = bias {
            s = s.broadcast_add(b)?;
        }
        candle_nn::ops::softmax(&s, D::Minus1)?.matmul(v)
    }

    #[test]
    fn chunked_attention_equals_full_attention() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(3);
        // 4,200 keys: a score row is large enough that the kernel must take several chunks.
        let (n, lq, lk, d) = (2, 4100, 4200, 8);
        let q = rng.randn((n, lq, d), &dev)?;
        let k = rng.randn((n, lk, d), &dev)?;
        let v = rng.randn((n, lk, d), &dev)?;
        assert!(n * lq * lk > MAX_SCORE_ELEMENTS);
        let got = scaled_dot_product(&q, &k, &v, None)?;
        let want = naive(&q, &k, &v, None)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn padding_is_never_attended() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(4);
        let q = rng.randn((1, 3, 4), &dev)?;
        let k = rng.randn((1, 5, 4), &dev)?;
        let v = rng.randn((1, 5, 4), &dev)?;
        let mask = Tensor::new(&[[1f32, 1., 1., 0., 0.]], &dev)?;
        let masked = scaled_dot_product(&q, &k, &v, Some(&padding_bias(&mask)?))?;
        // Same result as attending to the three real tokens only.
        let short = naive(&q, &k.narrow(1, 0, 3)?, &v.narrow(1, 0, 3)?, None)?;
        let diff = (masked - short)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
