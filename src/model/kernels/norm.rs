//! GroupNorm and LayerNorm, each one kernel: statistics, standardisation, the per-channel scale
//! and shift and an optional SiLU (GroupNorm → SiLU opens every ResBlock), reading F16/BF16
//! directly with the statistics in F32. Composed of candle ops the same forward pass took about
//! 13 launches on CUDA (casts, two reductions, subtract, square, square root, reciprocal,
//! multiplies, adds) and as many passes over memory on the CPU.
//!
//! The backward pass keeps only the op's inputs and recomputes each row's statistics: dx =
//! r · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)) per row, with x̂ the standardised x, r = 1/√(var + eps)
//! and ĝ the gradient reaching x̂; the parameter gradients are summed in F32, per row (for
//! LayerNorm's short rows: per task of rows) and then over the batch in F64. One op (on CUDA two
//! kernels: the rows, then the parameter sums) where tensor ops took about thirty.
//!
//! Layout: x is viewed as [rows, n], n = channels_per_group · inner, and element j of row r
//! belongs to channel (r mod groups) · channels_per_group + ⌊j / inner⌋. GroupNorm of
//! [B, C, H, W]: rows = B·G, channels_per_group = C/G, inner = H·W; LayerNorm over the last
//! dimension D: groups = 1, channels_per_group = D, inner = 1.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{
    cpu_slice, dot_lanes, fast_exp, float_dispatch, same_dtype, sum_lanes, vectorized, Float,
};

/// How a norm groups the elements of its input.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    groups: usize,
    channels_per_group: usize,
    inner: usize,
    /// The output as tokens, [B, inner, C], instead of in x's layout [B, C, inner].
    tokens: bool,
}

impl Geometry {
    /// GroupNorm's of `dims` [B, C, ...].
    fn groups(dims: &[usize], groups: usize, tokens: bool) -> Result<Self> {
        if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
            candle_core::bail!(
                "group_norm: {groups} groups do not divide the channels of {dims:?}"
            );
        }
        Ok(Self {
            groups,
            channels_per_group: dims[1] / groups,
            inner: dims[2..].iter().product(),
            tokens,
        })
    }

    /// Elements per row.
    fn n(&self) -> usize {
        self.channels_per_group * self.inner
    }

    fn channels(&self) -> usize {
        self.groups * self.channels_per_group
    }

    /// Where element `j` of row `row` of x sits in the output (and in its gradient).
    #[inline(always)]
    fn out_index(&self, row: usize, j: usize) -> usize {
        if !self.tokens {
            return row * self.n() + j;
        }
        let (k, s) = (j / self.inner, j % self.inner);
        let c = (row % self.groups) * self.channels_per_group + k;
        ((row / self.groups) * self.inner + s) * self.channels() + c
    }

    /// The output's shape for input `x`.
    fn output_shape(&self, x: &Shape) -> Shape {
        if self.tokens {
            Shape::from((x.dims()[0], self.inner, self.channels()))
        } else {
            x.clone()
        }
    }
}

/// GroupNorm of `x` [B, C, ...] in `groups` groups, scaled by `weight` [C] and shifted by
/// `bias` [C], then SiLU when `silu` → [B, C, ...] in x's dtype.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let geometry = Geometry::groups(x.dims(), groups, false)?;
    apply(x, weight, bias, geometry, eps, silu)
}

/// [`group_norm`] (without SiLU) of `x` [B, C, ...] handed on as tokens: [B, H·W·..., C], as
/// attention reads a feature map (one op instead of the norm and a transposing copy).
pub fn group_norm_to_tokens(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let geometry = Geometry::groups(x.dims(), groups, true)?;
    apply(x, weight, bias, geometry, eps, false)
}

/// LayerNorm of `x` [..., D] over its last dimension, scaled by `weight` [D] and shifted by
/// `bias` [D] → [..., D] in x's dtype.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let geometry = Geometry {
        groups: 1,
        channels_per_group: x.dim(candle_core::D::Minus1)?,
        inner: 1,
        tokens: false,
    };
    apply(x, weight, bias, geometry, eps, false)
}

fn apply(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    geometry: Geometry,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    for (name, p) in [("weight", weight), ("bias", bias)] {
        if p.dims() != [geometry.channels()] {
            candle_core::bail!(
                "norm {name} of shape {:?} for {} channels of input {:?}",
                p.dims(),
                geometry.channels(),
                x.dims()
            );
        }
    }
    let dtype = x.dtype();
    x.contiguous()?.apply_op3(
        &weight.to_dtype(dtype)?.contiguous()?,
        &bias.to_dtype(dtype)?.contiguous()?,
        Norm {
            geometry,
            eps: eps as f32,
            silu,
        },
    )
}

#[derive(Clone)]
struct Norm {
    geometry: Geometry,
    eps: f32,
    silu: bool,
}

/// Mean and 1/√(var + eps) of a row, summed in f64 (deterministic: one thread per row).
#[inline(always)]
fn row_stats<T: Float>(x: &[T], eps: f32) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = sum_f64(x, |v| v as f64) / n;
    let var = sum_f64(x, |v| {
        let d = v as f64 - mean;
        d * d
    }) / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// [`row_stats`] of each row of `n` elements of `x`, computed before the rows are used: the
/// rows' statistics are then independent of each other and their divisions and square roots
/// overlap (interleaved with each row's pass they were a chain of latencies, the most of a
/// LayerNorm's short rows).
#[inline(always)]
fn task_stats<T: Float>(x: &[T], n: usize, eps: f32) -> Vec<(f32, f32)> {
    x.chunks(n).map(|row| row_stats(row, eps)).collect()
}

/// Σ f(x) in f64 over four interleaved partial sums: independent additions the compiler can
/// vectorise (one running sum waits on every addition before it).
#[inline(always)]
fn sum_f64<T: Float>(x: &[T], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().map(|v| f(v.to_f32())).sum();
    for chunk in chunks {
        for (acc, v) in lanes.iter_mut().zip(chunk) {
            *acc += f(v.to_f32());
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Rows per rayon task: short rows (LayerNorm's) are grouped to a few thousand elements.
fn rows_per_task(n: usize) -> usize {
    (4096 / n.max(1)).max(1)
}

#[inline(always)]
fn silu(v: f32) -> f32 {
    v / (1.0 + fast_exp(-v))
}

fn forward_cpu<T: Float>(inputs: (&[T], &[T], &[T]), g: Geometry, eps: f32, act: bool) -> Vec<T> {
    let y = if act {
        forward_rows::<T, true>(inputs, g, eps)
    } else {
        forward_rows::<T, false>(inputs, g, eps)
    };
    if !g.tokens {
        return y;
    }
    // [B, C, inner] → [B, inner, C], one batch element per task.
    let (c, inner) = (g.channels(), g.inner);
    let mut tokens = vec![T::zero(); y.len()];
    tokens
        .par_chunks_mut(c * inner)
        .zip(y.par_chunks(c * inner))
        .for_each(|(out, y)| {
            for (s, token) in out.chunks_mut(c).enumerate() {
                for (ch, o) in token.iter_mut().enumerate() {
                    *o = y[ch * inner + s];
                }
            }
        });
    tokens
}

/// The norm of every row (then SiLU when `ACT`), in x's layout. `ACT` is a constant so that the
/// vectorised loops compute the SiLU only where it is asked for: with a flag tested inside, the
/// compiler computed it for every element and blended.
fn forward_rows<T: Float, const ACT: bool>(
    (x, w, b): (&[T], &[T], &[T]),
    g: Geometry,
    eps: f32,
) -> Vec<T> {
    let n = g.n();
    let mut y = vec![T::zero(); x.len()];
    // A task's rows in one call: LayerNorm's rows are a few dozen elements each.
    let per_task = rows_per_task(n);
    y.par_chunks_mut(per_task * n)
        .zip(x.par_chunks(per_task * n))
        .enumerate()
        .for_each(|(task, (y, x))| {
            vectorized!(|| {
                let stats = task_stats(x, n, eps);
                for (i, (y, x)) in y.chunks_mut(n).zip(x.chunks(n)).enumerate() {
                    let row = task * per_task + i;
                    let (mean, rstd) = stats[i];
                    let c0 = (row % g.groups) * g.channels_per_group;
                    let (w, b) = (
                        &w[c0..c0 + g.channels_per_group],
                        &b[c0..c0 + g.channels_per_group],
                    );
                    let out = |v: f32, scale: f32, shift: f32| {
                        let v = (v - mean) * scale + shift;
                        T::from_f32(if ACT { silu(v) } else { v })
                    };
                    if g.inner == 1 {
                        for (((o, v), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                            *o = out(v.to_f32(), w.to_f32() * rstd, b.to_f32());
                        }
                    } else {
                        for (((ys, xs), w), b) in
                            y.chunks_mut(g.inner).zip(x.chunks(g.inner)).zip(w).zip(b)
                        {
                            let (scale, shift) = (w.to_f32() * rstd, b.to_f32());
                            for (o, v) in ys.iter_mut().zip(xs) {
                                *o = out(v.to_f32(), scale, shift);
                            }
                        }
                    }
                }
            })
        });
    y
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "fused-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            op: &Norm,
            (x, xl): (&CpuStorage, &Layout),
            (w, wl): (&CpuStorage, &Layout),
            (b, bl): (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let name = op.name();
            let inputs = (
                cpu_slice::<T>(x, xl, name)?,
                cpu_slice::<T>(w, wl, name)?,
                cpu_slice::<T>(b, bl, name)?,
            );
            let y = forward_cpu(inputs, op.geometry, op.eps, op.silu);
            Ok(T::to_cpu_storage_owned(y))
        }
        same_dtype(self.name(), x.dtype(), &[w.dtype(), b.dtype()])?;
        let y = float_dispatch!(x.dtype(), self.name(), run(self, (x, xl), (w, wl), (b, bl)))?;
        Ok((y, self.geometry.output_shape(xl.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, CudaFloat};
        fn run<T: CudaFloat>(
            op: &Norm,
            (x, xl): (&candle_core::CudaStorage, &Layout),
            (w, wl): (&candle_core::CudaStorage, &Layout),
            (b, bl): (&candle_core::CudaStorage, &Layout),
        ) -> Result<candle_core::CudaStorage> {
            let name = op.name();
            let dev = &x.device;
            let g = op.geometry;
            let (xs, ws, bs) = (
                cuda::view::<T>(x, xl, name)?,
                cuda::view::<T>(w, wl, name)?,
                cuda::view::<T>(b, bl, name)?,
            );
            let y = cuda::output::<T>(dev, xl.shape().elem_count())?;
            let groups = cuda::arg_u32(g.groups, "groups")?;
            let cpg = cuda::arg_u32(g.channels_per_group, "channels per group")?;
            let inner = cuda::arg_u32(g.inner, "elements per channel")?;
            cuda::arg_u32(g.n(), "elements per row")?;
            let (silu, tokens) = (op.silu as u32, g.tokens as u32);
            let cfg = cuda::blocks(xl.shape().elem_count() / g.n(), cuda::row_threads(g.n()))?;
            cuda::launch!(
                dev,
                &cuda::NORM,
                "norm_fwd",
                T::DTYPE,
                cfg,
                [&xs, &ws, &bs, &y, &groups, &cpg, &inner, &op.eps, &silu, &tokens]
            );
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        same_dtype(self.name(), x.dtype(), &[w.dtype(), b.dtype()])?;
        let y = float_dispatch!(x.dtype(), self.name(), run(self, (x, xl), (w, wl), (b, bl)))?;
        Ok((y, self.geometry.output_shape(xl.shape())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x = x.detach();
        let op = NormBackward {
            forward: self.clone(),
            weight: w.detach(),
            bias: b.detach(),
        };
        // dx, then the weight's and the bias's gradients, in one buffer.
        let all = x.apply_op2_no_bwd(&grad.detach().contiguous()?, &op)?;
        let (n, c) = (x.elem_count(), self.geometry.channels());
        let params = all.narrow(0, n, 2 * c)?;
        Ok((
            Some(all.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(params.narrow(0, 0, c)?),
            Some(params.narrow(0, c, c)?),
        ))
    }
}

/// The backward pass of [`Norm`]: (x, g) → [dx (x's elements) | dw (C) | db (C)] flat, in x's
/// dtype, the parameters read from the captured (detached) weight and bias.
struct NormBackward {
    forward: Norm,
    weight: Tensor,
    bias: Tensor,
}

/// x̂ and the gradient reaching the pre-activation z = x̂ · w + b (through the SiLU when `silu`:
/// silu'(z) = s · (1 + z · (1 − s)), s = sigmoid(z)).
#[inline(always)]
fn grad_at<const SILU: bool>(
    x: f32,
    g: f32,
    (w, b): (f32, f32),
    (mean, rstd): (f32, f32),
) -> (f32, f32) {
    let x_hat = (x - mean) * rstd;
    if !SILU {
        return (x_hat, g);
    }
    let z = x_hat * w + b;
    let s = 1.0 / (1.0 + fast_exp(-z));
    (x_hat, g * s * (1.0 + z * (1.0 - s)))
}

fn backward_cpu<T: Float>(
    inputs: (&[T], &[T]),
    params: (&[T], &[T]),
    geometry: Geometry,
    eps: f32,
    silu: bool,
) -> Vec<T> {
    // SiLU or not as a constant, as in the forward pass ([`forward_rows`]).
    match (geometry.inner == 1 && !geometry.tokens, silu) {
        (true, true) => backward_per_element::<T, true>(inputs, params, geometry, eps),
        (true, false) => backward_per_element::<T, false>(inputs, params, geometry, eps),
        (false, true) => backward_rows::<T, true>(inputs, params, geometry, eps),
        (false, false) => backward_rows::<T, false>(inputs, params, geometry, eps),
    }
}

/// [`backward_cpu`] of rows whose channels are runs of `inner` elements (GroupNorm).
fn backward_rows<T: Float, const SILU: bool>(
    (x, g): (&[T], &[T]),
    (w, b): (&[T], &[T]),
    geometry: Geometry,
    eps: f32,
) -> Vec<T> {
    let (n, cpg, inner) = (geometry.n(), geometry.channels_per_group, geometry.inner);
    // Each row's share of the parameter gradients: [rows, channels per group, 2] = (Σ g_z · x̂,
    // Σ g_z) over the elements of each of its channels (eight F32 partial sums each).
    let mut partial = vec![0f32; x.len() / n * cpg * 2];
    let mut out = vec![T::zero(); x.len() + 2 * geometry.channels()];
    let (dx, params) = out.split_at_mut(x.len());
    dx.par_chunks_mut(n)
        .zip(partial.par_chunks_mut(2 * cpg))
        .zip(x.par_chunks(n))
        .with_min_len(rows_per_task(n))
        .enumerate()
        // Per task, room for a row's g_z and x̂ (computed once, read by both passes below).
        .for_each_init(
            || vec![0f32; 2 * n],
            |scratch, (row, ((dx, partial), x))| {
                vectorized!(|| {
                    let (g_z, x_hat) = scratch.split_at_mut(n);
                    // The output gradient in x's layout (the tokens' layout is transposed).
                    if geometry.tokens {
                        for (j, v) in g_z.iter_mut().enumerate() {
                            *v = g[geometry.out_index(row, j)].to_f32();
                        }
                    } else {
                        for (v, g) in g_z.iter_mut().zip(&g[row * n..(row + 1) * n]) {
                            *v = g.to_f32();
                        }
                    }
                    let stats = row_stats(x, eps);
                    let c0 = (row % geometry.groups) * cpg;
                    let param = |k: usize| (w[c0 + k].to_f32(), b[c0 + k].to_f32());
                    let (mut sum_gh, mut sum_gh_xh) = (0f64, 0f64);
                    for (k, share) in partial.chunks_mut(2).enumerate() {
                        let (wc, bc) = param(k);
                        let run = k * inner..(k + 1) * inner;
                        let (gs, xh) = (&mut g_z[run.clone()], &mut x_hat[run.clone()]);
                        for ((g, xh), xv) in gs.iter_mut().zip(xh.iter_mut()).zip(&x[run]) {
                            (*xh, *g) = grad_at::<SILU>(xv.to_f32(), *g, (wc, bc), stats);
                        }
                        // One element per channel (a [B, C] input as tokens; LayerNorm's own
                        // loop is backward_per_element).
                        let (s_w, s_b) = match (&gs[..], &xh[..]) {
                            ([g], [xh]) => (g * xh, *g),
                            _ => (dot_lanes(gs, xh), sum_lanes(gs)),
                        };
                        sum_gh += s_b as f64 * wc as f64;
                        sum_gh_xh += s_w as f64 * wc as f64;
                        share[0] = s_w;
                        share[1] = s_b;
                    }
                    let (mean_gh, mean_gh_xh) =
                        ((sum_gh / n as f64) as f32, (sum_gh_xh / n as f64) as f32);
                    for (k, dx) in dx.chunks_mut(inner).enumerate() {
                        let wc = param(k).0;
                        let run = k * inner..(k + 1) * inner;
                        for ((dx, g), xh) in dx.iter_mut().zip(&g_z[run.clone()]).zip(&x_hat[run]) {
                            *dx = T::from_f32(stats.1 * (g * wc - mean_gh - xh * mean_gh_xh));
                        }
                    }
                })
            },
        );
    // Σ over the batch of the rows' shares, viewed as [batch, channels, 2].
    let channels = geometry.channels();
    let batch = partial.len() / (2 * channels);
    params.par_iter_mut().enumerate().for_each(|(i, out)| {
        let (which, c) = (i / channels, i % channels);
        let sum: f64 = (0..batch)
            .map(|bi| partial[(bi * channels + c) * 2 + which] as f64)
            .sum();
        *out = T::from_f32(sum as f32);
    });
    out
}

/// [`backward_cpu`] where each element of a row is a channel of its own (`inner` = 1:
/// LayerNorm, and GroupNorm of [B, C]): the rows of a task in one call, each row's sums in
/// eight F32 lanes, and the parameter gradients accumulated across the channels over a task's
/// rows, then over the tasks in order in F64. (Per element, the general loop's per-channel
/// bookkeeping and F64 sums cost ten times the arithmetic.)
fn backward_per_element<T: Float, const SILU: bool>(
    (x, g): (&[T], &[T]),
    (w, b): (&[T], &[T]),
    geometry: Geometry,
    eps: f32,
) -> Vec<T> {
    let (n, channels) = (geometry.n(), geometry.channels());
    let per_task = rows_per_task(n);
    let mut out = vec![T::zero(); x.len() + 2 * channels];
    let (dx, params) = out.split_at_mut(x.len());
    // Per task: [Σ g_z · x̂ | Σ g_z], a value per channel each.
    let shares: Vec<Vec<f32>> = dx
        .par_chunks_mut(per_task * n)
        .zip(x.par_chunks(per_task * n).zip(g.par_chunks(per_task * n)))
        .enumerate()
        .map(|(task, (dx, (x, g)))| {
            vectorized!(|| {
                let mut share = vec![0f32; 2 * channels];
                // A row's g_z, x̂ and g_z · w.
                let mut scratch = vec![0f32; 3 * n];
                let stats_of_rows = task_stats(x, n, eps);
                let rows = dx.chunks_mut(n).zip(x.chunks(n).zip(g.chunks(n)));
                for (i, (dx, (x, g))) in rows.enumerate() {
                    let row = task * per_task + i;
                    let c0 = (row % geometry.groups) * n;
                    let (w, b) = (&w[c0..c0 + n], &b[c0..c0 + n]);
                    let stats = stats_of_rows[i];
                    let (g_z, rest) = scratch.split_at_mut(n);
                    let (x_hat, g_w) = rest.split_at_mut(n);
                    let elements = g_z.iter_mut().zip(x_hat.iter_mut()).zip(g_w.iter_mut());
                    for ((((gz, xh), gw), (xv, gv)), (wv, bv)) in
                        elements.zip(x.iter().zip(g)).zip(w.iter().zip(b))
                    {
                        let wc = wv.to_f32();
                        let p = (wc, bv.to_f32());
                        (*xh, *gz) = grad_at::<SILU>(xv.to_f32(), gv.to_f32(), p, stats);
                        *gw = *gz * wc;
                    }
                    let mean_gw = sum_lanes(g_w) / n as f32;
                    let mean_gw_xh = dot_lanes(g_w, x_hat) / n as f32;
                    for ((dx, gw), xh) in dx.iter_mut().zip(&*g_w).zip(&*x_hat) {
                        *dx = T::from_f32(stats.1 * (gw - mean_gw - xh * mean_gw_xh));
                    }
                    let (s_w, s_b) = share.split_at_mut(channels);
                    let sums = s_w[c0..c0 + n].iter_mut().zip(&mut s_b[c0..c0 + n]);
                    for ((sw, sb), (gz, xh)) in sums.zip(g_z.iter().zip(&*x_hat)) {
                        *sw += gz * xh;
                        *sb += gz;
                    }
                }
                share
            })
        })
        .collect();
    for (i, p) in params.iter_mut().enumerate() {
        let sum: f64 = shares.iter().map(|s| s[i] as f64).sum();
        *p = T::from_f32(sum as f32);
    }
    out
}

impl NormBackward {
    /// `f` of the weight's and the bias's storages and layouts.
    fn with_params<R>(
        &self,
        f: impl FnOnce((&candle_core::Storage, &Layout), (&candle_core::Storage, &Layout)) -> Result<R>,
    ) -> Result<R> {
        let (w, wl) = self.weight.storage_and_layout();
        let (b, bl) = self.bias.storage_and_layout();
        f((&w, wl), (&b, bl))
    }
}

impl CustomOp2 for NormBackward {
    fn name(&self) -> &'static str {
        "fused-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            op: &NormBackward,
            (x, xl): (&CpuStorage, &Layout),
            (g, gl): (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let name = op.name();
            let (x, g) = (cpu_slice::<T>(x, xl, name)?, cpu_slice::<T>(g, gl, name)?);
            op.with_params(|(w, wl), (b, bl)| {
                let (candle_core::Storage::Cpu(w), candle_core::Storage::Cpu(b)) = (w, b) else {
                    candle_core::bail!("{name}: the parameters are on another device");
                };
                let params = (cpu_slice::<T>(w, wl, name)?, cpu_slice::<T>(b, bl, name)?);
                let f = &op.forward;
                let out = backward_cpu((x, g), params, f.geometry, f.eps, f.silu);
                Ok(T::to_cpu_storage_owned(out))
            })
        }
        same_dtype(
            self.name(),
            x.dtype(),
            &[g.dtype(), self.weight.dtype(), self.bias.dtype()],
        )?;
        let out = float_dispatch!(x.dtype(), self.name(), run(self, (x, xl), (g, gl)))?;
        let len = xl.shape().elem_count() + 2 * self.forward.geometry.channels();
        Ok((out, Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, CudaFloat};
        fn run<T: CudaFloat>(
            op: &NormBackward,
            (x, xl): (&candle_core::CudaStorage, &Layout),
            (g, gl): (&candle_core::CudaStorage, &Layout),
        ) -> Result<candle_core::CudaStorage> {
            let name = op.name();
            let dev = &x.device;
            let geometry = op.forward.geometry;
            let (len, channels) = (xl.shape().elem_count(), geometry.channels());
            let (rows, batch) = (len / geometry.n(), len / geometry.n() / geometry.groups);
            let (xs, gs) = (cuda::view::<T>(x, xl, name)?, cuda::view::<T>(g, gl, name)?);
            let out = cuda::output::<T>(dev, len + 2 * channels)?;
            let (dx, params) = (out.slice(0..len), out.slice(len..));
            let partial = cuda::output::<f32>(dev, rows * geometry.channels_per_group * 2)?;
            let groups = cuda::arg_u32(geometry.groups, "groups")?;
            let cpg = cuda::arg_u32(geometry.channels_per_group, "channels per group")?;
            let inner = cuda::arg_u32(geometry.inner, "elements per channel")?;
            cuda::arg_u32(geometry.n(), "elements per row")?;
            let (batch_arg, channels_arg) = (
                cuda::arg_u32(batch, "batch")?,
                cuda::arg_u32(channels, "channels")?,
            );
            let (silu, tokens) = (op.forward.silu as u32, geometry.tokens as u32);
            op.with_params(|(w, wl), (b, bl)| {
                let (candle_core::Storage::Cuda(w), candle_core::Storage::Cuda(b)) = (w, b) else {
                    candle_core::bail!("{name}: the parameters are on another device");
                };
                let (ws, bs) = (cuda::view::<T>(w, wl, name)?, cuda::view::<T>(b, bl, name)?);
                let cfg = cuda::blocks(rows, cuda::row_threads(geometry.n()))?;
                cuda::launch!(
                    dev,
                    &cuda::NORM,
                    "norm_bwd",
                    T::DTYPE,
                    cfg,
                    [
                        &xs,
                        &ws,
                        &bs,
                        &gs,
                        &dx,
                        &partial,
                        &groups,
                        &cpg,
                        &inner,
                        &op.forward.eps,
                        &silu,
                        &tokens
                    ]
                );
                Ok(())
            })?;
            let cfg = cuda::blocks(2 * channels, cuda::row_threads(batch))?;
            cuda::launch!(
                dev,
                &cuda::NORM,
                "norm_param_grads",
                T::DTYPE,
                cfg,
                [&partial, &params, &batch_arg, &channels_arg]
            );
            Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        same_dtype(
            self.name(),
            x.dtype(),
            &[g.dtype(), self.weight.dtype(), self.bias.dtype()],
        )?;
        let out = float_dispatch!(x.dtype(), self.name(), run(self, (x, xl), (g, gl)))?;
        let len = xl.shape().elem_count() + 2 * self.forward.geometry.channels();
        Ok((out, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::against_reference;
    use super::*;
    use crate::rng::Rng;
    use candle_core::{DType, Device, D};

    /// The norms as tensor ops (in F64, as the reference): standardise each group, scale, shift,
    /// SiLU.
    fn composite(t: &[Tensor], groups: Option<usize>, act: bool) -> Result<Tensor> {
        let (x, w, b) = (&t[0], &t[1], &t[2]);
        let dims = x.dims().to_vec();
        // The rows standardised together, and the shape that broadcasts a parameter.
        let (rows, axis) = match groups {
            Some(g) => (dims[0] * g, 1),
            None => (x.elem_count() / dims[dims.len() - 1], dims.len() - 1),
        };
        let mut shape = vec![1; dims.len()];
        shape[axis] = dims[axis];
        let param = |p: &Tensor| p.to_dtype(DType::F64)?.reshape(shape.clone());
        let x = x.to_dtype(DType::F64)?;
        let r = x.reshape((rows, x.elem_count() / rows))?;
        let centred = r.broadcast_sub(&r.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let y = centred
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .reshape(dims)?
            .broadcast_mul(&param(w)?)?
            .broadcast_add(&param(b)?)?;
        if act {
            y.silu()
        } else {
            Ok(y)
        }
    }

    /// Inputs with statistics that matter: shifted and scaled x, parameters away from 1 and 0;
    /// and the weights r of the loss Σ y ⊙ r.
    fn inputs(dims: &[usize], channels: usize, seed: u64) -> Result<[Tensor; 4]> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(seed);
        Ok([
            ((rng.randn(dims, &dev)? * 3.0)? + 1.5)?,
            (rng.randn(channels, &dev)? + 1.0)?,
            rng.randn(channels, &dev)?,
            rng.randn(dims, &dev)?,
        ])
    }

    type Op<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

    /// The fused op against the composite one, output and gradients, in F32 and half precision.
    fn check(fused: Op, reference: Op, [x, w, b, r]: &[Tensor; 4], what: &str) -> Result<()> {
        // (dtype, tolerance): F32 to summation order; F16/BF16 inputs to their rounding.
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 5e-3), (DType::BF16, 2e-2)] {
            let (_, errs) = against_reference(dtype, fused, reference, &[x, w, b], r)?;
            let worst = errs.iter().cloned().fold(0.0, f64::max);
            assert!(
                worst < tol,
                "{what}, {dtype:?}: errors (y, dx, dw, db) {errs:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn group_norm_equals_the_composite_ops() -> Result<()> {
        // Odd sizes: 3 channels per group, 5×3 positions; one position per channel (two would
        // standardise to ±1 whatever x, leaving a gradient of rounding noise); 4-D and 3-D.
        for (dims, groups) in [
            (vec![2, 6, 5, 3], 2),
            (vec![3, 6, 1, 1], 2),
            (vec![2, 9, 7], 3),
            // One element per channel, 1,400 rows of 3: two tasks of rows (rows_per_task).
            (vec![700, 6], 2),
        ] {
            let c = dims[1];
            let case = inputs(&dims, c, 9)?;
            for act in [false, true] {
                check(
                    &|t| group_norm(&t[0], &t[1], &t[2], groups, 1e-5, act),
                    &|t| composite(t, Some(groups), act),
                    &case,
                    &format!("group norm {dims:?} / {groups}, silu {act}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn group_norm_to_tokens_equals_the_norm_then_a_transpose() -> Result<()> {
        for (dims, groups) in [(vec![2, 6, 5, 3], 3), (vec![1, 4, 7], 2)] {
            let [x, w, b, _] = inputs(&dims, dims[1], 12)?;
            let (batch, c, inner) = (dims[0], dims[1], dims[2..].iter().product::<usize>());
            let r = Rng::new(13).randn((batch, inner, c), &Device::Cpu)?;
            let reference = |t: &[Tensor]| {
                composite(t, Some(groups), false)?
                    .reshape((batch, c, inner))?
                    .transpose(1, 2)
            };
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 5e-3)] {
                let (got, errs) = against_reference(
                    dtype,
                    &|t| group_norm_to_tokens(&t[0], &t[1], &t[2], groups, 1e-5),
                    &reference,
                    &[&x, &w, &b],
                    &r,
                )?;
                assert_eq!(got[0].dims(), [batch, inner, c]);
                let worst = errs.iter().cloned().fold(0.0, f64::max);
                assert!(worst < tol, "{dims:?}, {dtype:?}: {errs:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn layer_norm_equals_the_composite_ops() -> Result<()> {
        // [2, 300, 40]: 600 rows of 40, six tasks of rows.
        for dims in [
            vec![2, 5, 7],
            vec![3, 33],
            vec![1, 1, 130],
            vec![2, 300, 40],
        ] {
            let d = *dims.last().unwrap();
            check(
                &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
                &|t| composite(t, None, false),
                &inputs(&dims, d, 10)?,
                &format!("layer norm {dims:?}"),
            )?;
        }
        Ok(())
    }

    #[test]
    fn non_contiguous_input_and_bad_parameters() -> Result<()> {
        let [x, w, b, _] = inputs(&[2, 4, 3, 5], 4, 11)?;
        let t = x.transpose(2, 3)?;
        let want = group_norm(&t.contiguous()?, &w, &b, 2, 1e-5, true)?;
        let got = group_norm(&t, &w, &b, 2, 1e-5, true)?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let err = group_norm(&x, &w, &b, 3, 1e-5, false).unwrap_err();
        assert!(err.to_string().contains("3 groups"), "{err}");
        let err = layer_norm(&x, &w, &b, 1e-5).unwrap_err();
        assert!(err.to_string().contains("norm weight"), "{err}");
        Ok(())
    }
}
