//! A 2-D convolution that trains fast: on the CPU in F32 the blocked matrix products of
//! [`super::kernels::conv_cpu`]; elsewhere candle's convolution with the input gradient computed
//! as convolutions (below).
//!
//! candle differentiates `conv2d` with respect to its input through `conv_transpose2d`, a direct
//! loop on the CPU and a naive kernel on CUDA: the slowest part of a training step (a 3×3 conv of
//! 8 → 8 channels at 64×64, batch 8: 18 ms forward, 93 ms with its backward on the CPU). The same
//! gradient is a convolution of the padded output gradient with the kernel flipped and its
//! channel axes swapped, which candle computes as im2col + matrix product on the CPU and through
//! cuBLAS on CUDA. With stride s it splits into s² such convolutions, one per phase of the input
//! (input rows i ≡ a mod s only meet kernel taps t ≡ a + p mod s), each with a sub-kernel of the
//! taps of its phase: the same arithmetic as the forward pass, none of it on zeros. The kernel
//! gradient keeps candle's formula (already a convolution).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::affine::add_bias;
use super::kernels::conv_cpu::Conv2dCpu;
use super::kernels::on_cpu_f32;
use super::kernels::weighted::CpuOp;

use super::precomputed::Precomputed;

/// `x` [B, C_in, H, W] ⊛ `w` [C_out, C_in, k, k] + `bias` with symmetric `padding` and `stride`
/// (dilation 1, one group) → [B, C_out, H', W'].
///
/// On the CPU in F32 the bias is [C_out] or [B, C_out] (one row per image) and the products
/// accumulate onto it; elsewhere it is [C_out], added after the convolution with its gradient
/// summed in F32 ([`add_bias`]).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if on_cpu_f32(&[x, w]) {
        let op = || {
            CpuOp(Conv2dCpu {
                pad: padding,
                stride,
            })
        };
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        return match bias {
            Some(b) => x.apply_op3(&w, &b.to_dtype(DType::F32)?.contiguous()?, op()),
            None => x.apply_op2(&w, op()),
        };
    }
    let y = composite(x, w, padding, stride)?;
    match bias {
        Some(b) if b.rank() == 1 => add_bias(&y, b, 1),
        Some(b) => candle_core::bail!(
            "conv2d: a bias of shape {:?} (one per image) needs the CPU in F32",
            b.dims()
        ),
        None => Ok(y),
    }
}

/// candle's convolution, with the input gradient as convolutions (CUDA, and F16/BF16 on the CPU).
fn composite(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !x.track_op() && !w.track_op() {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    // The output is computed by candle outside the graph and handed to the op, which records x and
    // w for its backward pass; the op holds the output only until its forward has copied it.
    let y = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
    x.apply_op2(
        w,
        Conv2dGemmBackward {
            padding,
            stride,
            output: Precomputed::new("conv2d", y),
        },
    )
}

/// One phase of one spatial axis of a strided convolution's input gradient: the input positions
/// `s·q + a` for `q < len` receive the output gradient at `q + start + m` times kernel tap
/// `taps[m]`.
struct Phase {
    taps: Vec<u32>,
    /// Offset of the first output-gradient position read; negative reads are zeros (padding).
    start: isize,
    len: usize,
}

/// The `s` phases of an axis of `n_in` inputs, kernel `k`, padding `p`, stride `s`.
fn phases(n_in: usize, k: usize, p: usize, s: usize) -> Vec<Phase> {
    (0..s)
        .map(|a| {
            // Input a + s·q is read by output o through tap t when s·o + t = a + s·q + p.
            let t0 = (a + p) % s;
            let n_taps = if t0 < k { (k - t0).div_ceil(s) } else { 0 };
            let c = ((a + p - t0) / s) as isize;
            Phase {
                // Flipped: the correlation reads the output gradient forwards.
                taps: (0..n_taps).rev().map(|j| (t0 + s * j) as u32).collect(),
                start: c - n_taps as isize + 1,
                len: n_in.saturating_sub(a).div_ceil(s),
            }
        })
        .collect()
}

/// Gradient of `conv2d(x, w, p, s)` with respect to `x` [B, C_in, H, W], from the output gradient
/// `g` [B, C_out, H', W'].
fn input_gradient(
    g: &Tensor,
    w: &Tensor,
    (h, wd): (usize, usize),
    p: usize,
    s: usize,
) -> Result<Tensor> {
    let k = w.dim(2)?;
    let (b, c_in) = (g.dim(0)?, w.dim(1)?);
    if s == 1 && p < k {
        // One phase, padded symmetrically: candle pads inside its im2col, without a copy of g.
        let w_t = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        return g.conv2d(&w_t, k - 1 - p, 1, 1, 1);
    }
    // [C_in, C_out, k, k]: a convolution from the output's channels back to the input's.
    let w_t = w.transpose(0, 1)?.contiguous()?;
    let (rows, cols) = (phases(h, k, p, s), phases(wd, k, p, s));
    let (n_h, n_w) = (g.dim(2)? as isize, g.dim(3)? as isize);
    // One zero padding of g that serves every phase.
    let lo = |ph: &[Phase]| ph.iter().map(|f| (-f.start).max(0)).max().unwrap_or(0) as usize;
    let hi = |ph: &[Phase], n: isize| {
        ph.iter()
            .map(|f| f.start + (f.len + f.taps.len()) as isize - 1 - n)
            .max()
            .unwrap_or(0)
            .max(0) as usize
    };
    let (lo_h, lo_w) = (lo(&rows), lo(&cols));
    let g_pad =
        g.pad_with_zeros(2, lo_h, hi(&rows, n_h))?
            .pad_with_zeros(3, lo_w, hi(&cols, n_w))?;
    let (q_h, q_w) = (h.div_ceil(s), wd.div_ceil(s));
    let mut phase_rows = Vec::with_capacity(s);
    for r in &rows {
        let mut phase_cols = Vec::with_capacity(s);
        for c in &cols {
            let part = if r.taps.is_empty() || c.taps.is_empty() || r.len == 0 || c.len == 0 {
                Tensor::zeros((b, c_in, r.len, c.len), g.dtype(), g.device())?
            } else {
                let device = w.device();
                let sub = w_t
                    .index_select(&Tensor::new(r.taps.as_slice(), device)?, 2)?
                    .index_select(&Tensor::new(c.taps.as_slice(), device)?, 3)?;
                let window = g_pad
                    .narrow(
                        2,
                        (r.start + lo_h as isize) as usize,
                        r.len + r.taps.len() - 1,
                    )?
                    .narrow(
                        3,
                        (c.start + lo_w as isize) as usize,
                        c.len + c.taps.len() - 1,
                    )?;
                window.conv2d(&sub, 0, 1, 1, 1)?
            };
            if s == 1 {
                return Ok(part);
            }
            // Phases of a size not divisible by s are one short: pad to a common size.
            phase_cols.push(part.pad_with_zeros(2, 0, q_h - r.len)?.pad_with_zeros(
                3,
                0,
                q_w - c.len,
            )?);
        }
        // [B, C, q_h, q_w, s] → [B, C, q_h, q_w·s]: column phases interleaved.
        phase_rows.push(Tensor::stack(&phase_cols, 4)?.reshape((b, c_in, q_h, q_w * s))?);
    }
    // [B, C, q_h, s, q_w·s] → [B, C, q_h·s, q_w·s]: row phases interleaved.
    Tensor::stack(&phase_rows, 3)?
        .reshape((b, c_in, q_h * s, q_w * s))?
        .narrow(2, 0, h)?
        .narrow(3, 0, wd)
}

struct Conv2dGemmBackward {
    padding: usize,
    stride: usize,
    output: Precomputed,
}

impl CustomOp2 for Conv2dGemmBackward {
    fn name(&self) -> &'static str {
        "conv2d-gemm-backward"
    }

    fn cpu_fwd(
        &self,
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
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (p, s, k) = (self.padding, self.stride, w.dim(2)?);
        // Detached: a gradient computed from tracked inputs records them, and a parameter's
        // gradient (never detached by candle) would then keep this output gradient alive to the
        // end of the backward pass.
        let (x, w) = (x.detach(), w.detach());
        let grad_x = input_gradient(grad, &w, (x.dim(2)?, x.dim(3)?), p, s)?;
        // Kernel gradient: candle's formula (the stride becomes a dilation).
        let grad_w = x
            .transpose(0, 1)?
            .conv2d(&grad.transpose(0, 1)?, p, 1, s, 1)?
            .transpose(0, 1)?;
        let grad_w = grad_w.narrow(2, 0, k)?.narrow(3, 0, k)?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The convolution and both gradients of Σ y·r, by their definitions, in loops over every
    /// output, channel and tap: (y, dL/dx, dL/dw) as flat row-major vectors.
    fn by_definition(
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
        p: usize,
        s: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (b, ci, h, wd) = x.dims4()?;
        let (co, _, k, _) = w.dims4()?;
        let (_, _, oh, ow) = r.dims4()?;
        let (xv, wv, rv) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            w.flatten_all()?.to_vec1::<f32>()?,
            r.flatten_all()?.to_vec1::<f32>()?,
        );
        let (mut y, mut gx, mut gw) = (
            vec![0f32; rv.len()],
            vec![0f32; xv.len()],
            vec![0f32; wv.len()],
        );
        for n in 0..b {
            for o in 0..co {
                for (yi, yj) in (0..oh).flat_map(|i| (0..ow).map(move |j| (i, j))) {
                    let yo = ((n * co + o) * oh + yi) * ow + yj;
                    for c in 0..ci {
                        for (ti, tj) in (0..k).flat_map(|i| (0..k).map(move |j| (i, j))) {
                            let (xi, xj) = (
                                (yi * s + ti) as isize - p as isize,
                                (yj * s + tj) as isize - p as isize,
                            );
                            if xi < 0 || xj < 0 || xi >= h as isize || xj >= wd as isize {
                                continue;
                            }
                            let xo = ((n * ci + c) * h + xi as usize) * wd + xj as usize;
                            let wo = ((o * ci + c) * k + ti) * k + tj;
                            y[yo] += xv[xo] * wv[wo];
                            gx[xo] += rv[yo] * wv[wo];
                            gw[wo] += rv[yo] * xv[xo];
                        }
                    }
                }
            }
        }
        Ok((y, gx, gw))
    }

    /// A convolution case: batch, input and output channels, (H, W), kernel, padding, stride.
    type Case = (usize, usize, usize, (usize, usize), usize, usize, usize);

    /// [`conv2d`] without a bias.
    fn unbiased(x: &Tensor, w: &Tensor, p: usize, s: usize) -> Result<Tensor> {
        conv2d(x, w, None, p, s)
    }

    /// Both paths against [`by_definition`]: the CPU kernels and the composite (CUDA's).
    fn compare(
        b: usize,
        ci: usize,
        co: usize,
        hw: (usize, usize),
        k: usize,
        p: usize,
        s: usize,
    ) -> Result<()> {
        compare_with(unbiased, (b, ci, co, hw, k, p, s))?;
        compare_with(composite, (b, ci, co, hw, k, p, s))
    }

    /// `conv` against [`by_definition`].
    fn compare_with(
        conv: fn(&Tensor, &Tensor, usize, usize) -> Result<Tensor>,
        case: Case,
    ) -> Result<()> {
        let (b, ci, co, hw, k, p, s) = case;
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, ci, hw.0, hw.1), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (co, ci, k, k), &dev)?)?;
        let y = conv(&x, &w, p, s)?;
        let r = Tensor::randn(0f32, 1., y.shape(), &dev)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let (ey, egx, egw) = by_definition(&x, &w, &r, p, s)?;
        let pairs = [
            ("output", &y, ey),
            ("input gradient", grads.get(&x).unwrap(), egx),
            ("kernel gradient", grads.get(&w).unwrap(), egw),
        ];
        for (what, ours, expected) in pairs {
            let ours = ours.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(ours.len(), expected.len(), "{what}: size");
            let d = ours
                .iter()
                .zip(&expected)
                .map(|(a, e)| (a - e).abs())
                .fold(0f32, f32::max);
            let m = expected.iter().map(|e| e.abs()).fold(0f32, f32::max);
            assert!(
                d <= 1e-4 * m.max(1.0),
                "{what}: {d} (scale {m}) for k{k} p{p} s{s} {hw:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn output_and_gradients_equal_their_definitions() -> Result<()> {
        compare(2, 3, 5, (8, 8), 3, 1, 1)?;
        compare(1, 4, 2, (9, 7), 3, 1, 1)?;
        compare(2, 3, 4, (6, 6), 1, 0, 1)?;
        compare(1, 2, 3, (7, 7), 3, 0, 1)?;
        // Padding beyond the kernel.
        compare(1, 2, 3, (5, 5), 1, 2, 1)?;
        // 16 input channels or more: on the CPU the input gradient as a convolution.
        compare(2, 16, 3, (6, 5), 3, 1, 1)?;
        compare(1, 17, 2, (7, 7), 3, 0, 1)?;
        compare(1, 16, 2, (1, 1), 5, 2, 1)?;
        // 16 channels or more on both sides and 256 outputs or more: on the CPU Winograd's
        // F(2×2, 3×3), with even and odd output sizes, padding 0 to 3 (3: the input gradient by
        // patches), fewer tiles across than a group of eight, one output column.
        compare(2, 16, 17, (16, 16), 3, 1, 1)?;
        compare(1, 17, 16, (17, 19), 3, 1, 1)?;
        compare(1, 16, 16, (18, 19), 3, 0, 1)?;
        compare(1, 16, 18, (15, 15), 3, 2, 1)?;
        compare(1, 16, 16, (12, 12), 3, 3, 1)?;
        compare(1, 16, 16, (100, 5), 3, 1, 1)?;
        compare(1, 16, 16, (300, 1), 3, 1, 1)?;
        // Strided: every phase, sizes divisible by the stride or not, rows never read.
        compare(2, 3, 4, (8, 8), 3, 1, 2)?;
        compare(1, 2, 3, (9, 7), 3, 1, 2)?;
        compare(1, 2, 3, (10, 10), 3, 0, 2)?;
        // Height and width of different remainders: candle 0.11.1's own backward fails here (its
        // conv_transpose2d output padding is taken from the height for both axes).
        compare(1, 2, 3, (11, 10), 3, 0, 2)?;
        compare(2, 3, 2, (8, 9), 1, 0, 2)?; // half the phases meet no tap
        compare(1, 2, 2, (10, 11), 3, 1, 3)?;
        compare(1, 2, 2, (9, 9), 4, 2, 2)?;
        // Taps that read nothing but padding for every output (a 1×1 image, padding 2).
        compare(1, 2, 2, (1, 1), 5, 2, 1)?;
        compare(1, 2, 2, (2, 3), 5, 2, 2)
    }

    /// A bias shared by the images ([C_out]) and one per image ([B, C_out]), inside the CPU
    /// convolution: the output is the convolution plus the bias, the bias's gradient the sum of
    /// the output gradient over the pixels (and the images, when shared), and the other
    /// gradients those without a bias.
    #[test]
    fn a_bias_inside_the_convolution_equals_its_definition() -> Result<()> {
        let dev = Device::Cpu;
        for (b, ci, co, hw, k, p, s) in [
            (2, 3, 5, 8, 3, 1, 1),
            (3, 2, 4, 9, 3, 1, 2),
            (2, 4, 3, 6, 1, 0, 1),
            // One image: a per-image bias [1, C_out] has a shared one's length.
            (1, 2, 3, 6, 3, 1, 1),
            // Winograd's route on the CPU.
            (2, 16, 16, 16, 3, 1, 1),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, ci, hw, hw), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (co, ci, k, k), &dev)?)?;
            for shape in [vec![co], vec![b, co]] {
                let bias = Var::from_tensor(&Tensor::randn(0f32, 1., shape.as_slice(), &dev)?)?;
                let y = conv2d(&x, &w, Some(&bias), p, s)?;
                let r = Tensor::randn(0f32, 1., y.shape(), &dev)?;
                let grads = (&y * &r)?.sum_all()?.backward()?;
                let (ey, egx, egw) = by_definition(&x, &w, &r, p, s)?;
                let per_image = bias.broadcast_as((b, co))?.unsqueeze(2)?.unsqueeze(3)?;
                let ey = Tensor::from_vec(ey, y.shape(), &dev)?.broadcast_add(&per_image)?;
                let pixel_sums = r.sum((2, 3))?;
                let egb = if shape.len() == 1 {
                    pixel_sums.sum(0)?
                } else {
                    pixel_sums
                };
                let pairs = [
                    ("output", y.flatten_all()?, ey.flatten_all()?),
                    (
                        "input gradient",
                        grads.get(&x).unwrap().flatten_all()?,
                        Tensor::new(egx, &dev)?,
                    ),
                    (
                        "kernel gradient",
                        grads.get(&w).unwrap().flatten_all()?,
                        Tensor::new(egw, &dev)?,
                    ),
                    (
                        "bias gradient",
                        grads.get(&bias).unwrap().flatten_all()?,
                        egb.flatten_all()?,
                    ),
                ];
                for (what, ours, expected) in pairs {
                    let d = (&ours - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    let m = expected.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(
                        d <= 1e-4 * m.max(1.0),
                        "{what}: {d} for bias {shape:?}, k{k} s{s}"
                    );
                }
            }
        }
        // Elsewhere (the composite, CUDA's) a bias per image is refused by name.
        let x = Tensor::ones((2, 1, 4, 4), DType::F16, &dev)?;
        let w = Tensor::ones((3, 1, 3, 3), DType::F16, &dev)?;
        let err = conv2d(&x, &w, Some(&Tensor::ones((2, 3), DType::F16, &dev)?), 1, 1);
        assert!(err.unwrap_err().to_string().contains("one per image"));
        Ok(())
    }

    /// An image's output does not depend on the batch it is in (so the seeds give the same
    /// images at every batch size): each image convolved alone equals its row of the batch's
    /// output bit for bit, on the im2col and the Winograd routes.
    #[test]
    fn each_image_is_convolved_as_if_alone() -> Result<()> {
        let dev = Device::Cpu;
        for (ci, co, hw) in [(3, 4, 9), (16, 16, 16), (24, 16, 20), (16, 16, 17)] {
            let x = Tensor::randn(0f32, 1., (3, ci, hw, hw), &dev)?;
            let w = Tensor::randn(0f32, 0.3, (co, ci, 3, 3), &dev)?;
            let y = conv2d(&x, &w, None, 1, 1)?;
            for i in 0..3 {
                let alone = conv2d(&x.narrow(0, i, 1)?, &w, None, 1, 1)?;
                let row = y.narrow(0, i, 1)?;
                let (a, b) = (alone.flatten_all()?.to_vec1::<f32>()?, row.flatten_all()?);
                assert_eq!(a, b.to_vec1::<f32>()?, "image {i} of {ci} → {co} at {hw}²");
            }
        }
        Ok(())
    }

    #[test]
    fn blocks_of_rows_cover_large_images() -> Result<()> {
        // 1 × 3·3·64 × 1,000 columns: more patch elements than a block holds, so several blocks of
        // rows (the last one shorter), each gathered, multiplied and scattered back.
        compare_with(unbiased, (2, 64, 3, (1000, 10), 3, 1, 1))?;
        // The same with stride 2 (3 blocks), and a 1×1 convolution that reads its input as the
        // patch matrix (2 blocks).
        compare_with(unbiased, (1, 64, 3, (1000, 10), 3, 1, 2))?;
        compare_with(unbiased, (1, 64, 3, (1000, 10), 1, 0, 1))?;
        // Winograd's route: 500 × 10 tiles of 16 channels in three blocks of tile rows, and two
        // images of an odd height (the kernel gradient summed over both images' blocks).
        compare_with(unbiased, (1, 16, 16, (1000, 20), 3, 1, 1))?;
        compare_with(unbiased, (2, 16, 16, (999, 21), 3, 1, 1))
    }

    #[test]
    fn an_input_without_gradient_still_gives_the_kernel_its_own() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 7, 6), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (4, 3, 3, 3), &dev)?)?;
        let y = conv2d(&x, &w, None, 1, 1)?;
        let r = Tensor::randn(0f32, 1., y.shape(), &dev)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let (_, _, egw) = by_definition(&x, &w, &r, 1, 1)?;
        let gw = grads.get(&w).unwrap().flatten_all()?.to_vec1::<f32>()?;
        let d = gw
            .iter()
            .zip(&egw)
            .map(|(a, e)| (a - e).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "{d}");
        assert!(grads.get(&x).is_none());
        Ok(())
    }

    #[test]
    fn inference_records_no_backward() {
        let x = Tensor::ones((1, 1, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = conv2d(&x, &w, None, 1, 1).unwrap();
        assert!(!y.track_op());
        assert_eq!(
            y.get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .get(1)
                .unwrap()
                .get(1)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            9.0
        );
    }
}
