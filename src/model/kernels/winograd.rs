//! A 3×3, stride-1 convolution on the CPU as Winograd's minimal filtering F(2×2, 3×3) (Lavin &
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 2×2 tile of the output
//! comes from a 4×4 tile of the input with 16 multiplications per channel pair instead of 36,
//! so the products do 4/9 of the im2col route's arithmetic ([`super::conv_cpu`]).
//!
//! With V = Bᵀ d B the transform of an input tile d [4, 4], U = G g Gᵀ that of a 3×3 filter g
//! and Y = Aᵀ M A the output tile [2, 2] of M [4, 4], each of the 16 positions ξ of a tile is
//! one matrix product over a block of tiles:
//!
//! - forward: M_ξ [C_out, T] = U_ξ [C_out, C_in] · V_ξ [C_in, T], then y = Aᵀ M A (+ bias)
//! - kernel gradient: dU_ξ [C_out, C_in] += dM_ξ [C_out, T] · V_ξᵀ, with dM = A dy Aᵀ, and at
//!   the end dW = Gᵀ dU G
//!
//! The input gradient of a stride-1 convolution is itself a convolution (of the output gradient
//! with the flipped kernel, [`super::conv_cpu`]), so it comes here through the forward.
//!
//! The transforms' coefficients are 0, ±1 and ±½, so the rounding is close to the direct sum's
//! (F32 results within a few units in the last place of the convolution's magnitude). Tiles are
//! blocked within one image, and `gemm` gives the same bits on one thread or several (its
//! threads split rows and columns, never the sum), so an image's result depends neither on the
//! batch it is in nor on the threads.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv_cpu::{spans, Bias, Geometry, BLOCK_ELEMS};
use super::{matmul, parallelism, vectorized, Strided};

/// Whether Winograd is the faster route for `g`: a 3×3 kernel of stride 1, 16 channels or more
/// on both sides (fewer make the products too thin to run near gemm's rate) and 256 outputs or
/// more, 16×16 (at 8×8 the 16/9 larger transformed kernel is read for too few tiles: forward and
/// backward at batch 4, 192 channels, 9.0 ms by im2col against 10.5–11.6).
pub(crate) fn fits(g: &Geometry) -> bool {
    g.k == 3 && g.stride == 1 && g.c_in >= 16 && g.c_out >= 16 && g.oh * g.ow >= 256
}

/// Tiles per group: the transforms work on eight adjacent tiles at a time, eight-lane vectors.
const LANES: usize = 8;

/// Eight lanes.
type Lanes = [f32; LANES];

/// The tile grid of one image and its blocks of tile rows.
struct Tiles {
    /// Tiles down and across: ⌈H'/2⌉ and ⌈W'/2⌉.
    ty: usize,
    tx: usize,
    /// Tile rows per block.
    rows: usize,
}

impl Tiles {
    fn new(g: &Geometry) -> Self {
        let (ty, tx) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
        // A block's transformed input and its products (16 values a tile per input channel,
        // per output channel) within BLOCK_ELEMS each.
        let rows = (BLOCK_ELEMS / (16 * g.c_in.max(g.c_out) * tx)).clamp(1, ty);
        Self { ty, tx, rows }
    }

    /// Blocks of tile rows: (first tile row, tile rows).
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        spans(self.ty, self.rows)
    }

    /// The stride of one position's tiles in a block of `rows` tile rows: the tiles, and room
    /// for the last group of eight to run past them.
    fn stride(&self, rows: usize) -> usize {
        rows * self.tx + LANES
    }

    /// Even and odd columns of a tile row's input or output rows, each this long: every group
    /// of eight tiles reads one more.
    fn half_width(&self) -> usize {
        self.tx.next_multiple_of(LANES) + 1
    }
}

/// `src`'s values at columns `off..` (negative: zeros before the row) into `even` and `odd`:
/// even[j] = src[2j − off], odd[j] = src[2j + 1 − off], zeros outside `src`.
#[inline(always)]
fn deinterleave(src: &[f32], off: usize, even: &mut [f32], odd: &mut [f32]) {
    let at = |sx: usize| {
        sx.checked_sub(off)
            .and_then(|i| src.get(i).copied())
            .unwrap_or(0.0)
    };
    // Pairs that reach outside src, one value at a time; those inside, in groups.
    let lo = off.div_ceil(2).min(even.len());
    let hi = ((src.len() + off) / 2).clamp(lo, even.len());
    for j in (0..lo).chain(hi..even.len()) {
        even[j] = at(2 * j);
        odd[j] = at(2 * j + 1);
    }
    // Eight pairs at a time without bounds checks (vectorised as shuffles), then the rest.
    let (even, odd, src) = (&mut even[lo..hi], &mut odd[lo..hi], &src[2 * lo - off..]);
    let groups = even.len() / LANES;
    for gi in 0..groups {
        let pairs: &[f32; 2 * LANES] = src[2 * LANES * gi..][..2 * LANES].try_into().unwrap();
        let (e, o) = (
            &mut even[LANES * gi..][..LANES],
            &mut odd[LANES * gi..][..LANES],
        );
        for l in 0..LANES {
            e[l] = pairs[2 * l];
            o[l] = pairs[2 * l + 1];
        }
    }
    for j in LANES * groups..even.len() {
        even[j] = src[2 * j];
        odd[j] = src[2 * j + 1];
    }
}

/// Eight lanes of `s` from `i`.
#[inline(always)]
fn lanes(s: &[f32], i: usize) -> Lanes {
    s[i..i + LANES].try_into().unwrap()
}

// The 1-D transforms on eight tiles at once, in plain loops over the lanes: closures in these
// loops were not always inlined (a call, compiled for the baseline, per tile and value).

/// The input transform Bᵀ d: (d0 − d2, d1 + d2, d2 − d1, d1 − d3).
#[inline(always)]
fn input_1d(d: [Lanes; 4]) -> [Lanes; 4] {
    let mut out = [[0f32; LANES]; 4];
    for l in 0..LANES {
        out[0][l] = d[0][l] - d[2][l];
        out[1][l] = d[1][l] + d[2][l];
        out[2][l] = d[2][l] - d[1][l];
        out[3][l] = d[1][l] - d[3][l];
    }
    out
}

/// The output transform Aᵀ m: (m0 + m1 + m2, m1 − m2 − m3).
#[inline(always)]
fn output_1d(m: [Lanes; 4]) -> [Lanes; 2] {
    let mut out = [[0f32; LANES]; 2];
    for l in 0..LANES {
        out[0][l] = m[0][l] + (m[1][l] + m[2][l]);
        out[1][l] = (m[1][l] - m[2][l]) - m[3][l];
    }
    out
}

/// The adjoint of the output transform, A y: (y0, y0 + y1, y0 − y1, −y1).
#[inline(always)]
fn output_1d_adjoint(y: [Lanes; 2]) -> [Lanes; 4] {
    let mut out = [[0f32; LANES]; 4];
    for l in 0..LANES {
        out[0][l] = y[0][l];
        out[1][l] = y[0][l] + y[1][l];
        out[2][l] = y[0][l] - y[1][l];
        out[3][l] = -y[1][l];
    }
    out
}

/// Column `c` of `N` rows of four lanes each.
#[inline(always)]
fn column<const N: usize>(rows: &[[Lanes; 4]; N], c: usize) -> [Lanes; N] {
    let mut out = [[0f32; LANES]; N];
    for (o, row) in out.iter_mut().zip(rows) {
        *o = row[c];
    }
    out
}

/// U = G g Gᵀ for every filter of `w` [C_out, C_in, 3, 3]: [C_out, 16, C_in].
fn kernel_transform(g: &Geometry, w: &[f32]) -> Vec<f32> {
    let mut u = vec![0f32; g.c_out * 16 * g.c_in];
    u.par_chunks_mut(16 * g.c_in)
        .enumerate()
        .for_each(|(co, uk)| {
            for ci in 0..g.c_in {
                let f = &w[(co * g.c_in + ci) * 9..][..9];
                // G f: rows f0, (f0 + f1 + f2)/2, (f0 − f1 + f2)/2, f2 of 3 values each.
                let mut gf = [[0f32; 3]; 4];
                for j in 0..3 {
                    let (a, b, c) = (f[j], f[3 + j], f[6 + j]);
                    gf[0][j] = a;
                    gf[1][j] = 0.5 * (a + b + c);
                    gf[2][j] = 0.5 * (a - b + c);
                    gf[3][j] = c;
                }
                // (G f) Gᵀ, the same on each row.
                for (i, [a, b, c]) in gf.into_iter().enumerate() {
                    let row = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                    for (j, v) in row.into_iter().enumerate() {
                        uk[(4 * i + j) * g.c_in + ci] = v;
                    }
                }
            }
        });
    u
}

/// dW = Gᵀ dU G for every filter: `du` [C_out, 16, C_in] → [C_out, C_in, 3, 3].
fn kernel_transform_adjoint(g: &Geometry, du: &[f32]) -> Vec<f32> {
    // Gᵀ u for a 4-vector u: (u0 + (u1 + u2)/2, (u1 − u2)/2, (u1 + u2)/2 + u3).
    let gt = |u: [f32; 4]| {
        let (s, d) = (0.5 * (u[1] + u[2]), 0.5 * (u[1] - u[2]));
        [u[0] + s, d, s + u[3]]
    };
    let mut dw = vec![0f32; g.c_out * g.c_in * 9];
    dw.par_chunks_mut(g.c_in * 9)
        .zip(du.par_chunks(16 * g.c_in))
        .for_each(|(dwk, duk)| {
            for (ci, f) in dwk.chunks_exact_mut(9).enumerate() {
                let at = |i: usize, j: usize| duk[(4 * i + j) * g.c_in + ci];
                // Gᵀ on each column, then on each row of the 3×4 result.
                let cols: [[f32; 3]; 4] =
                    std::array::from_fn(|j| gt([at(0, j), at(1, j), at(2, j), at(3, j)]));
                for i in 0..3 {
                    let row = gt([cols[0][i], cols[1][i], cols[2][i], cols[3][i]]);
                    f[3 * i..3 * i + 3].copy_from_slice(&row);
                }
            }
        });
    dw
}

/// V = Bᵀ d B of the tiles of tile rows `r0..r0 + rows` of one image `x` [C_in, H, W]:
/// `v` [C_in, 16, stride], zeros where a tile reaches past the input.
fn input_transform(
    g: &Geometry,
    t: &Tiles,
    x: &[f32],
    (r0, rows): (usize, usize),
    v: &mut [f32],
    split: Split,
) {
    let (n, hw) = (t.stride(rows), t.half_width());
    v.par_chunks_mut(16 * n)
        .zip(x.par_chunks(g.h * g.w))
        .with_min_len(split.within_image())
        .for_each(|(vc, xc)| {
            vectorized!(|| {
                // The block's 2·rows + 2 input rows (zeros above and below the image), their
                // even and odd columns of the padded row apart.
                let mut halves = vec![0f32; (2 * rows + 2) * 2 * hw];
                for (sy, half) in halves.chunks_exact_mut(2 * hw).enumerate() {
                    let iy = (2 * r0 + sy).checked_sub(g.pad).filter(|&iy| iy < g.h);
                    if let Some(iy) = iy {
                        let (even, odd) = half.split_at_mut(hw);
                        deinterleave(&xc[iy * g.w..][..g.w], g.pad, even, odd);
                    }
                }
                for r in 0..rows {
                    for i in (0..t.tx).step_by(LANES) {
                        // Bᵀ along each of the tile's four rows: even columns e, odd columns o
                        // of tile i + l at e[i + l], o[i + l], e[i + l + 1], o[i + l + 1].
                        let mut h = [[[0f32; LANES]; 4]; 4];
                        for (y, hy) in h.iter_mut().enumerate() {
                            let (e, o) = halves[(2 * r + y) * 2 * hw..][..2 * hw].split_at(hw);
                            *hy = input_1d([
                                lanes(e, i),
                                lanes(o, i),
                                lanes(e, i + 1),
                                lanes(o, i + 1),
                            ]);
                        }
                        // Then down each of the four columns.
                        for c in 0..4 {
                            let col = input_1d(column(&h, c));
                            for (y, vals) in col.into_iter().enumerate() {
                                vc[(4 * y + c) * n + r * t.tx + i..][..LANES]
                                    .copy_from_slice(&vals);
                            }
                        }
                    }
                }
            })
        });
}

/// y = Aᵀ M A (+ bias) for the tiles of tile rows `r0..r0 + rows`: `m` [C_out, 16, stride] into
/// one image's output `y` [C_out, H', W'], of which it writes those rows (the last tile row and
/// column only as far as the output reaches).
fn output_transform(
    g: &Geometry,
    t: &Tiles,
    m: &[f32],
    (r0, rows): (usize, usize),
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    split: Split,
) {
    let n = t.stride(rows);
    y.par_chunks_mut(g.oh * g.ow)
        .zip(m.par_chunks(16 * n))
        .with_min_len(split.within_image())
        .enumerate()
        .for_each(|(co, (yc, mc))| {
            let b = bias.map_or(0.0, |b| b[co]);
            vectorized!(|| {
                for r in 0..rows {
                    let oy = 2 * (r0 + r);
                    for i in (0..t.tx).step_by(LANES) {
                        let mut mm = [[[0f32; LANES]; 4]; 4];
                        for (y, my) in mm.iter_mut().enumerate() {
                            for (c, v) in my.iter_mut().enumerate() {
                                *v = lanes(mc, (4 * y + c) * n + r * t.tx + i);
                            }
                        }
                        // Aᵀ down each column, then along each of the two rows.
                        let mut down = [[[0f32; LANES]; 2]; 4];
                        for (c, d) in down.iter_mut().enumerate() {
                            *d = output_1d(column(&mm, c));
                        }
                        let width = (g.ow - 2 * i).min(2 * LANES);
                        for dy in 0..2.min(g.oh - oy) {
                            let [even, odd] =
                                output_1d([down[0][dy], down[1][dy], down[2][dy], down[3][dy]]);
                            let mut row = [0f32; 2 * LANES];
                            for l in 0..LANES {
                                row[2 * l] = b + even[l];
                                row[2 * l + 1] = b + odd[l];
                            }
                            let dst = &mut yc[(oy + dy) * g.ow + 2 * i..][..width];
                            // A loop of `MaybeUninit::write`s was not vectorised (8 % of
                            // the 256×256 convolution's samples).
                            // SAFETY: dst is `width` ≤ 2·LANES values that nothing else
                            // touches; row has 2·LANES.
                            unsafe {
                                let dst = dst.as_mut_ptr().cast::<f32>();
                                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, width);
                            }
                        }
                    }
                }
            })
        });
}

/// dM = A dy Aᵀ for the tiles of tile rows `r0..r0 + rows` of one image's output gradient `gy`
/// [C_out, H', W']: [C_out, 16, stride], the parts of tiles past the output read as zeros.
fn output_transform_adjoint(
    g: &Geometry,
    t: &Tiles,
    gy: &[f32],
    (r0, rows): (usize, usize),
    dm: &mut [f32],
    split: Split,
) {
    let (n, hw) = (t.stride(rows), t.half_width());
    dm.par_chunks_mut(16 * n)
        .zip(gy.par_chunks(g.oh * g.ow))
        .with_min_len(split.within_image())
        .for_each(|(dmc, gyc)| {
            vectorized!(|| {
                // A tile row's two output rows, even and odd columns apart.
                let mut halves = vec![0f32; 4 * hw];
                for r in 0..rows {
                    let oy = 2 * (r0 + r);
                    for (dy, half) in halves.chunks_exact_mut(2 * hw).enumerate() {
                        let (even, odd) = half.split_at_mut(hw);
                        if oy + dy < g.oh {
                            deinterleave(&gyc[(oy + dy) * g.ow..][..g.ow], 0, even, odd);
                        } else {
                            even.fill(0.0);
                            odd.fill(0.0);
                        }
                    }
                    for i in (0..t.tx).step_by(LANES) {
                        // A along each of the two rows, then down each of the four columns.
                        let mut along = [[[0f32; LANES]; 4]; 2];
                        for (dy, row) in along.iter_mut().enumerate() {
                            let (e, o) = halves[2 * dy * hw..][..2 * hw].split_at(hw);
                            *row = output_1d_adjoint([lanes(e, i), lanes(o, i)]);
                        }
                        for c in 0..4 {
                            let col = output_1d_adjoint(column(&along, c));
                            for (y, vals) in col.into_iter().enumerate() {
                                dmc[(4 * y + c) * n + r * t.tx + i..][..LANES]
                                    .copy_from_slice(&vals);
                            }
                        }
                    }
                }
            })
        });
}

/// How one image's work runs: split over rayon's threads, or on the calling thread when the
/// images of a batch are the tasks.
#[derive(Clone, Copy)]
enum Split {
    Threads,
    Serial,
}

impl Split {
    /// The images as tasks when there are at least as many as threads and each is one block: a
    /// small image split over the threads costs more in synchronisation than it gains (32 → 32
    /// channels at 16×16, batch 16, two threads: 2.46 ms split against 1.58 on one thread).
    fn of(g: &Geometry, t: &Tiles) -> Self {
        if g.b >= rayon::current_num_threads() && t.rows == t.ty {
            Split::Serial
        } else {
            Split::Threads
        }
    }

    /// The fewest chunks of a parallel iterator over one image's channels that a task takes:
    /// all of them, when the image is a task of its own.
    fn within_image(self) -> usize {
        match self {
            Split::Threads => 1,
            Split::Serial => usize::MAX,
        }
    }

    /// The same over the forward's images: all of them (one after another) when each is split.
    fn over_images(self) -> usize {
        match self {
            Split::Threads => usize::MAX,
            Split::Serial => 1,
        }
    }

    /// The 16 products of one block, dst_ξ [m, n] (+)= lhs_ξ [m, k] · rhs_ξ [k, n]: each
    /// operand is (its first position's matrix, the elements from one position to the next),
    /// dst (pointer, row stride, that step).
    ///
    /// # Safety
    /// As [`matmul`]'s, for each of the 16 positions (each position's first element of dst lies
    /// inside dst's buffer).
    unsafe fn products(
        self,
        dims: (usize, usize, usize),
        (dst, dst_rs, dst_step): (*mut f32, usize, usize),
        acc: bool,
        (lhs, rhs): ((Strided, usize), (Strided, usize)),
    ) {
        let threads = match self {
            Split::Threads => parallelism(),
            Split::Serial => gemm::Parallelism::None,
        };
        for xi in 0..16 {
            let at = |(p, rs, cs): Strided, step: usize| (p.wrapping_add(xi * step), rs, cs);
            // SAFETY: the caller's contract.
            unsafe {
                matmul(
                    dims,
                    (dst.add(xi * dst_step), dst_rs),
                    acc,
                    (at(lhs.0, lhs.1), at(rhs.0, rhs.1)),
                    1.0,
                    threads,
                )
            };
        }
    }
}

/// `x` [B, C_in, H, W] ⊛ `w` [C_out, C_in, 3, 3] (+ `bias`) → [B, C_out, H', W'], for a `g`
/// that [`fits`].
pub(crate) fn forward(g: &Geometry, x: &[f32], w: &[f32], bias: Option<Bias>) -> Vec<f32> {
    let t = Tiles::new(g);
    let (in_hw, out_hw) = (g.h * g.w, g.oh * g.ow);
    let u = kernel_transform(g, w);
    let len = g.b * g.c_out * out_hw;
    let mut y = Vec::with_capacity(len);
    let split = Split::of(g, &t);
    let image = |bi: usize, yb: &mut [MaybeUninit<f32>]| {
        let xb = &x[bi * g.c_in * in_hw..][..g.c_in * in_hw];
        let bias = bias.as_ref().map(|b| b.of_image(bi, g.c_out));
        let (mut v, mut m) = (Vec::new(), Vec::new());
        for block in t.blocks() {
            let (n, stride) = (block.1 * t.tx, t.stride(block.1));
            v.resize(g.c_in * 16 * stride, 0.0);
            m.resize(g.c_out * 16 * stride, 0.0);
            input_transform(g, &t, xb, block, &mut v, split);
            // SAFETY: u is [C_out, 16, C_in], v [C_in, 16, stride] and m [C_out, 16, stride]
            // (n ≤ stride): the strides reach the first n tiles of each position, inside its
            // buffer; m is written only here.
            unsafe {
                split.products(
                    (g.c_out, n, g.c_in),
                    (m.as_mut_ptr(), 16 * stride, stride),
                    false,
                    (
                        ((u.as_ptr(), 16 * g.c_in, 1), g.c_in),
                        ((v.as_ptr(), 16 * stride, 1), stride),
                    ),
                )
            };
            output_transform(g, &t, &m, block, bias, yb, split);
        }
    };
    let images = y.spare_capacity_mut()[..len].par_chunks_mut(g.c_out * out_hw);
    images
        .with_min_len(split.over_images())
        .enumerate()
        .for_each(|(bi, yb)| image(bi, yb));
    // SAFETY: the blocks' tile rows cover every output row of every image, and each tile row
    // writes all of its output rows' columns.
    unsafe { y.set_len(len) };
    y
}

/// The gradient of Σ y·`gy` with respect to `w`, for a `g` that [`fits`]: `x` [B, C_in, H, W],
/// `gy` [B, C_out, H', W'] → [C_out, C_in, 3, 3].
pub(crate) fn kernel_gradient(g: &Geometry, x: &[f32], gy: &[f32]) -> Vec<f32> {
    let t = Tiles::new(g);
    let (in_hw, out_hw) = (g.h * g.w, g.oh * g.ow);
    let split = Split::of(g, &t);
    // dU [C_out, 16, C_in] of one image, summed over its blocks.
    let image = |bi: usize| {
        let xb = &x[bi * g.c_in * in_hw..][..g.c_in * in_hw];
        let gyb = &gy[bi * g.c_out * out_hw..][..g.c_out * out_hw];
        let mut du = vec![0f32; g.c_out * 16 * g.c_in];
        let (mut v, mut dm) = (Vec::new(), Vec::new());
        for block in t.blocks() {
            let (n, stride) = (block.1 * t.tx, t.stride(block.1));
            v.resize(g.c_in * 16 * stride, 0.0);
            dm.resize(g.c_out * 16 * stride, 0.0);
            input_transform(g, &t, xb, block, &mut v, split);
            output_transform_adjoint(g, &t, gyb, block, &mut dm, split);
            // SAFETY: dm is [C_out, 16, stride], v [C_in, 16, stride] read transposed ([n,
            // C_in] of each position, n ≤ stride), du [C_out, 16, C_in]; du is written only
            // here.
            unsafe {
                split.products(
                    (g.c_out, g.c_in, n),
                    (du.as_mut_ptr(), 16 * g.c_in, g.c_in),
                    true,
                    (
                        ((dm.as_ptr(), 16 * stride, 1), stride),
                        ((v.as_ptr(), 1, 16 * stride), stride),
                    ),
                )
            };
        }
        du
    };
    // The images' sums added in order, so that the result does not depend on the threads; one
    // alive at a time where the images run one after another.
    let add = |mut sum: Vec<f32>, d: Vec<f32>| {
        sum.iter_mut().zip(&d).for_each(|(s, d)| *s += d);
        sum
    };
    let du = match split {
        Split::Threads => (0..g.b).map(image).reduce(add),
        Split::Serial => {
            let per_image: Vec<Vec<f32>> = (0..g.b).into_par_iter().map(image).collect();
            per_image.into_iter().reduce(add)
        }
    };
    kernel_transform_adjoint(g, &du.expect("a batch of at least one image"))
}

#[cfg(test)]
mod tests {
    use candle_core::{Shape, Tensor};

    use super::*;
    use crate::model::kernels::conv_cpu;
    use crate::model::kernels::testing::worst_relative;

    /// Standard normal values of `shape`, flat.
    fn values(shape: Shape) -> candle_core::Result<Vec<f32>> {
        let dev = candle_core::Device::Cpu;
        Tensor::randn(0f32, 1., shape, &dev)?
            .flatten_all()?
            .to_vec1()
    }

    /// Winograd's forward (with either bias) and kernel gradient, called directly, equal the
    /// im2col route's on geometries too small for [`fits`] (where `conv_cpu` takes im2col):
    /// one output, narrow and tall images, padding 0 to 3, several images.
    #[test]
    fn equals_the_im2col_route() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let cases = [
            (1, 2, 3, (6, 5), 1),
            (2, 1, 2, (3, 3), 0),
            (1, 3, 1, (1, 7), 2),
            (2, 2, 2, (5, 4), 3),
            (1, 2, 3, (40, 3), 1),
        ];
        for (b, ci, co, (h, w), pad) in cases {
            let (xs, ws) = (Shape::from((b, ci, h, w)), Shape::from((co, ci, 3, 3)));
            let g = Geometry::new(&xs, &ws, pad, 1)?;
            assert!(!fits(&g), "{g:?} takes Winograd in conv_cpu too");
            let (x, k) = (values(xs)?, values(ws)?);
            let gy = values(Shape::from((b, co, g.oh, g.ow)))?;
            let (shared, per_image) = (values(Shape::from(co))?, values(Shape::from((b, co)))?);
            let tensor = |v: Vec<f32>| Tensor::new(v, &dev);
            let mut pairs = vec![(
                forward(&g, &x, &k, None),
                conv_cpu::forward(&g, &x, &k, None),
            )];
            for bias in [&shared, &per_image] {
                let bias = Some(Bias(bias));
                pairs.push((
                    forward(&g, &x, &k, bias),
                    conv_cpu::forward(&g, &x, &k, bias),
                ));
            }
            pairs.push((
                kernel_gradient(&g, &x, &gy),
                conv_cpu::backward(&g, &x, &k, &gy, false).1,
            ));
            for (i, (got, want)) in pairs.into_iter().enumerate() {
                let e = worst_relative(&[tensor(got)?], &[tensor(want)?])?;
                assert!(e < 1e-5, "{g:?}, result {i}: relative error {e}");
            }
        }
        Ok(())
    }

    /// The forward and the kernel gradient give the same bits on 1, 2 and 4 threads: images as
    /// tasks (3 images, 1 or 2 threads) and each image split over the threads (4).
    #[test]
    fn the_threads_do_not_change_the_bits() -> candle_core::Result<()> {
        let (xs, ws) = (Shape::from((3, 16, 16, 16)), Shape::from((16, 16, 3, 3)));
        let g = Geometry::new(&xs, &ws, 1, 1)?;
        assert!(fits(&g));
        let (x, k, gy) = (
            values(xs)?,
            values(ws)?,
            values(Shape::from((3, 16, 16, 16)))?,
        );
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| (forward(&g, &x, &k, None), kernel_gradient(&g, &x, &gy)))
        };
        let one = run(1);
        for threads in [2, 4] {
            assert!(run(threads) == one, "{threads} threads differ from one");
        }
        Ok(())
    }
}
