//! 2-D convolution on the CPU in F32: forward, input gradient and kernel gradient, each as matrix
//! products over blocks of output rows (on CUDA and in other precisions, candle's convolution and
//! [`crate::model::conv`]'s gradients run instead).
//!
//! candle 0.11.1's CPU convolution first copies the whole input to channels-last, then gathers
//! each block's patches one value at a time with writes a block's width apart, multiplies, and
//! copies the result back to channels-first one value at a time; its kernel gradient is a
//! convolution whose kernel is the output gradient. Here the patch matrix of a block of output
//! rows is built from the channels-first input one contiguous row segment at a time, the matrix
//! product writes straight into the output's rows, and both gradients reuse the same blocks:
//!
//! - output block  [C_out, P] = W [C_out, K] · cols [K, P]
//! - input gradient, stride 1: itself such a convolution, of the output gradient padded by
//!   k − 1 − pad, with the kernel flipped and its channel axes swapped
//! - input gradient, other strides: cols_g [K, P] = Wᵀ · grad block, added back to the input
//!   positions each column came from (the adjoint of gathering the patches)
//! - kernel gradient: dW [C_out, K] += grad block [C_out, P] · colsᵀ
//!
//! with K = C_in·k·k ordered as the kernel's own [C_in, k, k], and P the block's pixels. A 1×1
//! convolution without stride or padding reads the input itself as its patch matrix. A 3×3
//! convolution of stride 1 with 16 channels or more on both sides and 256 outputs or more (the
//! VAE's, and the U-Net's at 32×32 and 16×16) runs as Winograd's F(2×2, 3×3) instead
//! ([`super::winograd`]): its forward, its kernel gradient (unless the padding is 3 or more and
//! the input gradient is wanted too) and its input gradient where that convolution fits too
//! (256 inputs or more).
//!
//! A bias (one per output channel, or one per image and output channel: a ResBlock's time
//! embedding folded into it) is where the output starts and the products accumulate onto it, so
//! that it costs no pass of its own; its gradient is the sum of each output-gradient row.

use candle_core::{bail, Result, Shape};
use rayon::prelude::*;

use super::weighted::{Gradients, Operand, Weighted};
use super::{matmul_par, vectorized, winograd};
use crate::model::affine::sum_outer;

/// Patch-matrix elements per block: 2 MiB of F32, which a last-level cache holds.
pub(super) const BLOCK_ELEMS: usize = 1 << 19;

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub b: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub k: usize,
    pub pad: usize,
    pub stride: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geometry {
    /// `x` [B, C_in, H, W], `w` [C_out, C_in, k, k].
    pub fn new(x: &Shape, w: &Shape, pad: usize, stride: usize) -> Result<Self> {
        let (b, c_in, h, wd) = x.dims4()?;
        let (c_out, wc, k, k2) = w.dims4()?;
        let empty = [b, c_in, h, wd, c_out, k].contains(&0);
        if empty || wc != c_in || k != k2 || stride == 0 || h + 2 * pad < k || wd + 2 * pad < k {
            bail!("conv2d: input {x:?} and kernel {w:?} with padding {pad}, stride {stride} do not fit");
        }
        Ok(Self {
            b,
            c_in,
            h,
            w: wd,
            c_out,
            k,
            pad,
            stride,
            oh: (h + 2 * pad - k) / stride + 1,
            ow: (wd + 2 * pad - k) / stride + 1,
        })
    }

    fn patch_len(&self) -> usize {
        self.c_in * self.k * self.k
    }

    /// The input is its own patch matrix.
    fn direct(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// For a convolution of stride 1 that reads patches, the convolution that gives its input
    /// gradient: of the output gradient, padded by k − 1 − pad, with the kernel [`flipped`].
    /// Its products have C_in rows; below 16 (gemm's F32 kernel is 16 rows tall on AVX2) the
    /// patch-gradient route is faster (8 → 48 channels at 32², batch 4: 2.0 against 2.8 ms
    /// forward and backward), so it gives None there.
    fn transposed(&self) -> Option<Geometry> {
        let fits = self.stride == 1 && self.pad < self.k && !self.direct();
        (fits && self.c_in >= 16).then(|| Geometry {
            b: self.b,
            c_in: self.c_out,
            h: self.oh,
            w: self.ow,
            c_out: self.c_in,
            k: self.k,
            pad: self.k - 1 - self.pad,
            stride: 1,
            oh: self.h,
            ow: self.w,
        })
    }

    /// Output rows per block.
    fn block_rows(&self) -> usize {
        (BLOCK_ELEMS / (self.patch_len() * self.ow).max(1)).clamp(1, self.oh)
    }

    /// Blocks of output rows: (first row, rows).
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        spans(self.oh, self.block_rows())
    }

    /// Output columns `ox` whose tap `t` reads an input column inside 0..n: a range of `ox`.
    fn valid(&self, t: usize, n: usize, n_out: usize) -> std::ops::Range<usize> {
        let (s, p) = (self.stride, self.pad);
        let lo = p.saturating_sub(t).div_ceil(s).min(n_out);
        let hi = (n + p).saturating_sub(t).div_ceil(s).min(n_out);
        lo..hi.max(lo)
    }
}

/// `0..total` in spans of `per` (the last one shorter): (first, length).
pub(super) fn spans(total: usize, per: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..total)
        .step_by(per)
        .map(move |r| (r, per.min(total - r)))
}

/// The patch matrix [K, rows·ow] of output rows `r0..r0 + rows` of one image `x` [C_in, H, W].
fn gather(g: &Geometry, x: &[f32], (r0, rows): (usize, usize), cols: &mut [f32]) {
    let (kk, p) = (g.k * g.k, rows * g.ow);
    cols.par_chunks_mut(kk * p)
        .zip(x.par_chunks(g.h * g.w))
        .for_each(|(chunk, xc)| {
            for (tap, row) in chunk.chunks_mut(p).enumerate() {
                let (ty, tx) = (tap / g.k, tap % g.k);
                let valid = g.valid(tx, g.w, g.ow);
                for (r, dst) in row.chunks_mut(g.ow).enumerate() {
                    let iy = ((r0 + r) * g.stride + ty) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize || valid.is_empty() {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &xc[iy as usize * g.w..][..g.w];
                    dst[..valid.start].fill(0.0);
                    dst[valid.end..].fill(0.0);
                    let first = valid.start * g.stride + tx - g.pad;
                    if g.stride == 1 {
                        dst[valid.clone()].copy_from_slice(&src[first..first + valid.len()]);
                    } else {
                        for (d, s) in dst[valid.clone()]
                            .iter_mut()
                            .zip(src[first..].iter().step_by(g.stride))
                        {
                            *d = *s;
                        }
                    }
                }
            }
        });
}

/// Adds the patch matrix `cols` [K, rows·ow] of output rows `r0..r0 + rows` back to the input
/// positions its entries came from, in one image's gradient `gx` [C_in, H, W].
fn scatter_add(g: &Geometry, cols: &[f32], (r0, rows): (usize, usize), gx: &mut [f32]) {
    let (kk, p) = (g.k * g.k, rows * g.ow);
    gx.par_chunks_mut(g.h * g.w)
        .zip(cols.par_chunks(kk * p))
        .for_each(|(gc, chunk)| {
            vectorized!(|| {
                for (tap, row) in chunk.chunks(p).enumerate() {
                    let (ty, tx) = (tap / g.k, tap % g.k);
                    let valid = g.valid(tx, g.w, g.ow);
                    if valid.is_empty() {
                        continue;
                    }
                    for (r, src) in row.chunks(g.ow).enumerate() {
                        let iy = ((r0 + r) * g.stride + ty) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let first = valid.start * g.stride + tx - g.pad;
                        let dst = &mut gc[iy as usize * g.w + first..];
                        for (j, v) in src[valid.clone()].iter().enumerate() {
                            dst[j * g.stride] += v;
                        }
                    }
                }
            })
        });
}

/// A per-channel bias of a convolution's output: `C_out` values shared by every image, or
/// `B · C_out` (image-major), one row per image.
#[derive(Clone, Copy)]
pub(crate) struct Bias<'a>(pub &'a [f32]);

impl Bias<'_> {
    /// Whether a bias of shape `dims` fits `g`'s output: [C_out] or [B, C_out].
    fn fits(dims: &[usize], g: &Geometry) -> bool {
        dims == [g.c_out] || dims == [g.b, g.c_out]
    }

    /// Image `bi`'s C_out values.
    pub(super) fn of_image(&self, bi: usize, c_out: usize) -> &[f32] {
        if self.0.len() == c_out {
            self.0
        } else {
            &self.0[bi * c_out..][..c_out]
        }
    }
}

/// `x` [B, C_in, H, W] ⊛ `w` [C_out, C_in, k, k] (+ `bias`) → [B, C_out, H', W'].
pub(crate) fn forward(g: &Geometry, x: &[f32], w: &[f32], bias: Option<Bias>) -> Vec<f32> {
    if winograd::fits(g) {
        return winograd::forward(g, x, w, bias);
    }
    let (kl, in_hw, out_hw) = (g.patch_len(), g.h * g.w, g.oh * g.ow);
    // Each output row starts at its bias and the products add onto it; without a bias they
    // write it (the blocks cover every output row of every image).
    let len = g.b * g.c_out * out_hw;
    let mut y = Vec::with_capacity(len);
    if let Some(bias) = bias {
        for bi in 0..g.b {
            for &v in bias.of_image(bi, g.c_out) {
                y.extend(std::iter::repeat_n(v, out_hw));
            }
        }
    }
    let y_ptr = y.as_mut_ptr();
    let mut cols = Vec::new();
    for bi in 0..g.b {
        let xb = &x[bi * g.c_in * in_hw..][..g.c_in * in_hw];
        for block in g.blocks() {
            let p = block.1 * g.ow;
            let rhs = if g.direct() {
                (xb[block.0 * g.ow..].as_ptr(), in_hw, 1)
            } else {
                cols.resize(kl * p, 0.0);
                gather(g, xb, block, &mut cols);
                (cols.as_ptr(), p, 1)
            };
            // SAFETY: w is [C_out, K]; the patches [K, P] are cols, or for a direct convolution
            // the block's pixels of xb's C_in = K rows; dst is the block's P pixels of y's C_out
            // rows of this image (inside y's capacity), which nothing else touches.
            unsafe {
                let dst = y_ptr.add((bi * g.c_out) * out_hw + block.0 * g.ow);
                matmul_par(
                    (g.c_out, p, kl),
                    dst,
                    out_hw,
                    bias.is_some(),
                    (w.as_ptr(), kl, 1),
                    rhs,
                )
            };
        }
    }
    // SAFETY: every element was written: the bias, or the blocks' products (K > 0).
    unsafe { y.set_len(len) };
    y
}

/// The kernel `w` [C_out, C_in, k, k] flipped in both spatial axes, with its channel axes
/// swapped: [C_in, C_out, k, k].
fn flipped(g: &Geometry, w: &[f32]) -> Vec<f32> {
    let kk = g.k * g.k;
    let mut out = vec![0f32; w.len()];
    // Written in order, one input channel's filters per task.
    out.par_chunks_mut(g.c_out * kk)
        .enumerate()
        .for_each(|(ci, filters)| {
            for (co, dst) in filters.chunks_exact_mut(kk).enumerate() {
                let src = &w[(co * g.c_in + ci) * kk..][..kk];
                for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = *s;
                }
            }
        });
    out
}

/// The gradient of Σ y·`gy` with respect to a bias of `len` values (C_out, or B · C_out): the
/// sum of each output-gradient row [H'·W'], and for a shared bias over the images in order.
fn bias_gradient(g: &Geometry, gy: &[f32], len: usize) -> Vec<f32> {
    let out_hw = g.oh * g.ow;
    if len == g.c_out {
        sum_outer(gy, (g.b, g.c_out, out_hw))
    } else {
        sum_outer(gy, (1, g.b * g.c_out, out_hw))
    }
}

/// The gradients of Σ y·`gy` with respect to `x` (None unless `want_x`) and `w`,
/// `gy` [B, C_out, H', W'].
pub(crate) fn backward(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    want_x: bool,
) -> (Option<Vec<f32>>, Vec<f32>) {
    let (kl, in_hw, out_hw) = (g.patch_len(), g.h * g.w, g.oh * g.ow);
    // With stride 1 (and 16 input channels or more: `transposed`) the input gradient is a
    // convolution of its own: its output is written by the products, where the patch-gradient
    // route writes K·P values per block and adds each back to its input position.
    let (mut gx, in_blocks) = match (want_x, g.transposed()) {
        (false, _) => (None, false),
        (true, Some(t)) => (Some(forward(&t, gy, &flipped(g, w), None)), false),
        (true, None) => (Some(vec![0f32; g.b * g.c_in * in_hw]), true),
    };
    if !in_blocks && winograd::fits(g) {
        return (gx, winograd::kernel_gradient(g, x, gy));
    }
    // The first block's product writes the kernel gradient, the others add to it.
    let mut gw = Vec::with_capacity(g.c_out * kl);
    let gw_ptr = gw.as_mut_ptr();
    let (mut cols, mut first) = (Vec::new(), true);
    for bi in 0..g.b {
        let xb = &x[bi * g.c_in * in_hw..][..g.c_in * in_hw];
        let mut gxb = gx
            .as_mut()
            .filter(|_| in_blocks)
            .map(|gx| &mut gx[bi * g.c_in * in_hw..][..g.c_in * in_hw]);
        for block in g.blocks() {
            let p = block.1 * g.ow;
            let gyb = (
                gy[(bi * g.c_out) * out_hw + block.0 * g.ow..].as_ptr(),
                out_hw,
                1,
            );
            // Wᵀ [K, C_out]: rows of w are its columns.
            let wt = (w.as_ptr(), 1, kl);
            // SAFETY (every product below): gyb is the block's P pixels of gy's C_out rows of
            // this image, w is [C_out, K], xb and gxb this image's C_in rows of H·W, cols [K, P],
            // gw [C_out, K] (its capacity); each destination is written by its product alone.
            if g.direct() {
                if let Some(gxb) = gxb.as_deref_mut() {
                    let dst = gxb[block.0 * g.ow..].as_mut_ptr();
                    unsafe { matmul_par((kl, p, g.c_out), dst, in_hw, false, wt, gyb) };
                }
                // xᵀ [P, K]: the block's pixels of the C_in = K rows of xb.
                let xt = (xb[block.0 * g.ow..].as_ptr(), 1, in_hw);
                unsafe { matmul_par((g.c_out, kl, p), gw_ptr, kl, !first, gyb, xt) };
            } else {
                cols.resize(kl * p, 0.0);
                if let Some(gxb) = gxb.as_deref_mut() {
                    unsafe { matmul_par((kl, p, g.c_out), cols.as_mut_ptr(), p, false, wt, gyb) };
                    scatter_add(g, &cols, block, gxb);
                }
                gather(g, xb, block, &mut cols);
                // colsᵀ [P, K]: rows of cols are its columns.
                let ct = (cols.as_ptr(), 1, p);
                unsafe { matmul_par((g.c_out, kl, p), gw_ptr, kl, !first, gyb, ct) };
            }
            first = false;
        }
    }
    // SAFETY: the first block's product wrote all C_out × K elements (there is one: B, H' ≥ 1).
    unsafe { gw.set_len(g.c_out * kl) };
    (gx, gw)
}

/// The convolution's arithmetic for [`CpuOp`]: [`forward`], [`backward`] and
/// [`bias_gradient`].
pub(crate) struct Conv2dCpu {
    pub pad: usize,
    pub stride: usize,
}

impl Weighted for Conv2dCpu {
    const NAMES: [&'static str; 2] = ["conv2d-cpu", "conv2d-bias-cpu"];

    fn forward(
        &self,
        (x, xs): Operand,
        (w, ws): Operand,
        bias: Option<Operand>,
    ) -> Result<(Vec<f32>, Shape)> {
        let g = Geometry::new(xs, ws, self.pad, self.stride)?;
        let bias = match bias {
            Some((b, bs)) => {
                if !Bias::fits(bs.dims(), &g) {
                    bail!(
                        "conv2d (CPU): a bias of shape {bs:?} for {} images of {} channels",
                        g.b,
                        g.c_out
                    );
                }
                Some(Bias(b))
            }
            None => None,
        };
        let y = forward(&g, x, w, bias);
        Ok((y, Shape::from((g.b, g.c_out, g.oh, g.ow))))
    }

    fn backward(
        &self,
        (x, xs): Operand,
        (w, ws): Operand,
        bias: Option<&Shape>,
        gy: &[f32],
        want_x: bool,
    ) -> Result<Gradients> {
        let g = Geometry::new(xs, ws, self.pad, self.stride)?;
        // The U-Net's and the VAE's first convolutions read data, which needs no gradient.
        let (gx, gw) = backward(&g, x, w, gy, want_x);
        let gb = bias.map(|b| bias_gradient(&g, gy, b.elem_count()));
        Ok((gx, gw, gb))
    }
}
