//! Attention: multi-head self- and cross-attention (through the fused op of
//! [`super::kernels::attention`]), the scaled dot-product per head in tensor ops (chunked over
//! queries, masked: the fused op's backward pass on CUDA, and the forward pass of heads wider
//! than the CUDA kernel takes), the transformer block of the U-Net and the single-head spatial
//! attention of the VAE.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;

use super::kernels::attention as fused;
use super::kernels::geglu::geglu;
use super::layers::{group_norm, linear, linear_no_bias, GroupNorm, LayerNorm, Linear, Residual};
use super::precomputed::Precomputed;
use super::resnet::NORM_EPS;

/// Largest attention-score matrix materialised at once, in elements (64 MiB of f32). The VAE's
/// 64×64 attention has 4,096 tokens, a 16.7 M-entry matrix per image: it is computed in query
/// chunks so that a batch never holds all of them (SPEC: "never materialise it for a whole batch"),
/// in training too (see [`AttentionBackward`]).
const MAX_SCORE_ELEMENTS: usize = 1 << 24;

/// Additive bias that hides padding: `mask` [B, M] with 1 for real tokens and 0 for padding
/// → [B, 1, M] with 0 and -1e9. Kept finite so that softmax never sees -inf - (-inf).
pub fn padding_bias(mask: &Tensor) -> Result<Tensor> {
    ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.unsqueeze(1)
}

/// softmax(q kᵀ · scale + bias) v.
///
/// `q`: [N, Lq, d], `k`, `v`: [N, Lk, d], `bias`: [N, 1, Lk] → [N, Lq, d]. Scores and softmax are
/// computed in F32 whatever the input precision. When gradients are tracked, only the inputs and
/// the output are kept for the backward pass, which recomputes the scores chunk by chunk.
pub fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    chunked(q, k, v, bias, MAX_SCORE_ELEMENTS)
}

/// [`scaled_dot_product`] with at most `max_scores` score elements per chunk.
fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    max_scores: usize,
) -> Result<Tensor> {
    let chunks = Chunks::new(q, k, bias, max_scores)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return chunks.forward(q, v);
    }
    let y = chunks.forward(&q.detach(), &v.detach())?;
    q.apply_op3(
        k,
        v,
        AttentionBackward {
            chunks,
            output: Precomputed::new("attention", y),
        },
    )
}

/// The query chunks of one attention call and what every chunk needs.
struct Chunks {
    /// kᵀ: [N, d, Lk], detached.
    kt: Tensor,
    bias: Option<Tensor>,
    scale: f64,
    lq: usize,
    rows: usize,
}

impl Chunks {
    fn new(q: &Tensor, k: &Tensor, bias: Option<&Tensor>, max_scores: usize) -> Result<Self> {
        let (n, lq, d) = q.dims3()?;
        let lk = k.dim(1)?;
        Ok(Self {
            kt: k.detach().transpose(1, 2)?.contiguous()?,
            bias: bias.map(Tensor::detach),
            scale: 1.0 / (d as f64).sqrt(),
            lq,
            rows: (max_scores / (n * lk).max(1)).clamp(1, lq.max(1)),
        })
    }

    /// (start, length) of each chunk of query rows.
    fn ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.lq)
            .step_by(self.rows)
            .map(|start| (start, self.rows.min(self.lq - start)))
    }

    /// softmax(q_c kᵀ · scale + bias), F32: [N, len, Lk] for the queries `qc` [N, len, d].
    fn probabilities(&self, qc: &Tensor) -> Result<Tensor> {
        // Scaling q first keeps half-precision products in range.
        let mut scores = (qc * self.scale)?.matmul(&self.kt)?.to_dtype(DType::F32)?;
        if let Some(b) = &self.bias {
            scores = scores.broadcast_add(b)?;
        }
        candle_nn::ops::softmax(&scores, D::Minus1)
    }

    /// [N, Lq, d] → [N, Lq, d], chunk by chunk.
    fn forward(&self, q: &Tensor, v: &Tensor) -> Result<Tensor> {
        // One chunk is the whole tensor: narrow and cat then return it as is, without a copy.
        let mut outs = Vec::new();
        for (start, len) in self.ranges() {
            let qc = q.narrow(1, start, len)?;
            outs.push(self.probabilities(&qc)?.to_dtype(v.dtype())?.matmul(v)?);
        }
        Tensor::cat(&outs, 1)
    }
}

/// Attention's backward pass chunk by chunk, as FlashAttention's (Dao et al., 2022) but in tensor
/// ops: each chunk's probabilities P are recomputed from q and k, then dV += Pᵀ dO,
/// dP = dO vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dq = dS k · scale, dK += dSᵀ q · scale. Without it
/// autograd keeps every chunk's scores and probabilities until the backward pass: the VAE's 64×64
/// attention at the paper's batch of 32 would hold several 2 GiB matrices.
struct AttentionBackward {
    chunks: Chunks,
    output: Precomputed,
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "chunked-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.chunks.backward(q, k, v, grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl Chunks {
    /// The gradients of q, k and v ([N, L, d]) from the output's, chunk by chunk (see
    /// [`AttentionBackward`]).
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v, grad) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let dtype = q.dtype();
        let vt = v.t()?.contiguous()?;
        // dK and dV sum over every chunk: in F32 under mixed precision.
        let mut dk = Tensor::zeros(k.shape(), DType::F32, k.device())?;
        let mut dv = Tensor::zeros(v.shape(), DType::F32, v.device())?;
        let mut dq = Vec::new();
        for (start, len) in self.ranges() {
            let qc = q.narrow(1, start, len)?;
            let gc = grad.narrow(1, start, len)?.contiguous()?;
            let p = self.probabilities(&qc)?;
            dv = (dv + p.to_dtype(dtype)?.t()?.matmul(&gc)?.to_dtype(DType::F32)?)?;
            let dp = gc.matmul(&vt)?.to_dtype(DType::F32)?;
            let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
            let ds = ((p * dp.broadcast_sub(&row)?)? * self.scale)?.to_dtype(dtype)?;
            dq.push(ds.matmul(&k)?);
            dk = (dk + ds.t()?.matmul(&qc.contiguous()?)?.to_dtype(DType::F32)?)?;
        }
        Ok((
            Tensor::cat(&dq, 1)?,
            dk.to_dtype(k.dtype())?,
            dv.to_dtype(v.dtype())?,
        ))
    }
}

/// [B, L, heads·d] → [B·heads, L, d]
fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = xs.dims3()?;
    xs.reshape((b, l, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * heads, l, c / heads))
}

/// [B·heads, L, d] → [B, L, heads·d], the inverse of [`split_heads`].
fn merge_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, l, d) = xs.dims3()?;
    xs.reshape((n / heads, heads, l, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n / heads, l, heads * d))
}

/// The padding bias [B, 1, M] for each head: [B·heads, 1, M].
fn head_bias(bias: Option<&Tensor>, heads: usize) -> Result<Option<Tensor>> {
    bias.map(|bias| {
        let (b, _, m) = bias.dims3()?;
        bias.unsqueeze(1)?
            .broadcast_as((b, heads, 1, m))?
            .contiguous()?
            .reshape((b * heads, 1, m))
    })
    .transpose()
}

/// The gradients of multi-head attention's `q` [B, Lq, heads·d], `k` and `v` [B, Lk, heads·d]
/// (padding `bias` [B, 1, Lk]) from the output's [B, Lq, heads·d]: the chunked backward pass of
/// each head, recomputing its probabilities (the fused op's on CUDA; on the CPU it has its own).
pub(crate) fn multi_head_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let split = |t: &Tensor| split_heads(&t.detach(), heads);
    let (qh, kh) = (split(q)?, split(k)?);
    let chunks = Chunks::new(
        &qh,
        &kh,
        head_bias(bias, heads)?.as_ref(),
        MAX_SCORE_ELEMENTS,
    )?;
    let (dq, dk, dv) = chunks.backward(&qh, &kh, &split(v)?, &split(grad)?)?;
    Ok((
        merge_heads(&dq, heads)?,
        merge_heads(&dk, heads)?,
        merge_heads(&dv, heads)?,
    ))
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

    /// `xs`: [B, L, C]; `context`: [B, M, D] (None: self-attention); `bias`: [B, 1, M] from
    /// [`padding_bias`] → the attention plus `residual`: [B, L, C], or for [`Residual::Map`] the
    /// feature map [B, C, H, W] (L = H·W). The output projection's bias and the residual are
    /// added in one op.
    pub fn forward_add(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        bias: Option<&Tensor>,
        residual: Residual,
    ) -> Result<Tensor> {
        self.to_out
            .forward_add(&self.attend(xs, context, bias)?, residual)
    }

    /// The heads' outputs before the output projection: [B, L, C].
    fn attend(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let ctx = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let heads = self.heads;
        if fused::supported(xs.device(), q.dim(2)? / heads) {
            fused::attention(&q, &k, &v, heads, bias)
        } else {
            let (q, k, v) = (
                split_heads(&q, heads)?,
                split_heads(&k, heads)?,
                split_heads(&v, heads)?,
            );
            let bias = head_bias(bias, heads)?;
            merge_heads(&scaled_dot_product(&q, &k, &v, bias.as_ref())?, heads)
        }
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

impl FeedForward {
    /// `xs` [B, L, C] → the feed-forward of xs plus `residual` [B, L, C], the last bias and the
    /// residual added in one op.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.proj_out.forward_add(
            &geglu(&self.proj_in.forward(xs)?)?,
            Residual::Same(residual),
        )
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
        let xs =
            self.attn1
                .forward_add(&self.norm1.forward(xs)?, None, None, Residual::Same(xs))?;
        let xs = self.attn2.forward_add(
            &self.norm2.forward(&xs)?,
            Some(context),
            bias,
            Residual::Same(&xs),
        )?;
        self.ff.forward_add(&self.norm3.forward(&xs)?, &xs)
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
        let tokens = self.proj_in.forward(&self.norm.forward_to_tokens(xs)?)?;
        let tokens = self.block.forward(&tokens, context, bias)?;
        self.proj_out.forward_add(&tokens, Residual::Map(xs))
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
        let tokens = self.norm.forward_to_tokens(xs)?;
        self.attn
            .forward_add(&tokens, None, None, Residual::Map(xs))
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::testing::{outputs_and_gradients, worst_relative};
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

    /// Gradients of Σ attention · r with respect to q, k and v.
    fn gradients(
        attend: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        (q, k, v, r): (&Tensor, &Tensor, &Tensor, &Tensor),
    ) -> Result<Vec<Tensor>> {
        let all = outputs_and_gradients(&|t| attend(&t[0], &t[1], &t[2]), &[q, k, v], r)?;
        Ok(all[1..].to_vec())
    }

    #[test]
    fn chunked_backward_equals_autograd_through_full_attention() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(5);
        let (n, lq, lk, d) = (2, 7, 5, 4);
        let q = rng.randn((n, lq, d), &dev)?;
        let k = rng.randn((n, lk, d), &dev)?;
        let v = rng.randn((n, lk, d), &dev)?;
        let r = rng.randn((n, lq, d), &dev)?;
        let mask = Tensor::new(&[[1f32, 1., 1., 1., 0.], [1., 1., 0., 0., 0.]], &dev)?;
        let bias = padding_bias(&mask)?;
        let inputs = (&q, &k, &v, &r);
        for b in [None, Some(&bias)] {
            let want = gradients(|q, k, v| naive(q, k, v, b), inputs)?;
            // One chunk, and chunks of 3, 3 and 1 query rows.
            for max_scores in [1 << 20, 3 * n * lk] {
                let got = gradients(|q, k, v| chunked(q, k, v, b, max_scores), inputs)?;
                let err = worst_relative(&got, &want)?;
                assert!(err < 1e-5, "{err} with {max_scores} scores per chunk");
            }
        }
        // Half precision: within F16 rounding of the F32 gradients.
        let want = gradients(|q, k, v| naive(q, k, v, None), inputs)?;
        let half = |t: &Tensor| t.to_dtype(DType::F16);
        let got = gradients(
            |q, k, v| chunked(q, k, v, None, 3 * n * lk),
            (&half(&q)?, &half(&k)?, &half(&v)?, &r),
        )?;
        let err = worst_relative(&got, &want)?;
        assert!(err < 5e-3, "f16: {err}");
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
