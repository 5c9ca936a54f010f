//! GroupNorm and LayerNorm, each one kernel: statistics, standardisation, the per-channel scale
//! and shift and an optional SiLU (GroupNorm → SiLU opens every ResBlock), reading F16/BF16
//! directly with the statistics in F32. Composed of candle ops the same forward pass took about
//! 13 launches on CUDA (casts, two reductions, subtract, square, square root, reciprocal,
//! multiplies, adds) and as many passes over memory on the CPU.
//!
//! The backward pass keeps only the op's inputs: it recomputes each row's statistics (one
//! kernel) and takes the rest in tensor ops, in F32 (dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂))
//! per row, with x̂ the standardised x, r = 1/√(var + eps) and g the gradient reaching x̂; the
//! parameter gradients summed over the batch in F32).
//!
//! Layout: x is viewed as [rows, n], n = channels_per_group · inner, and element j of row r
//! belongs to channel (r mod groups) · channels_per_group + ⌊j / inner⌋. GroupNorm of
//! [B, C, H, W]: rows = B·G, channels_per_group = C/G, inner = H·W; LayerNorm over the last
//! dimension D: groups = 1, channels_per_group = D, inner = 1.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, float_dispatch, same_dtype, Float};

/// How a norm groups the elements of its input.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    groups: usize,
    channels_per_group: usize,
    inner: usize,
}

impl Geometry {
    /// Elements per row.
    fn n(&self) -> usize {
        self.channels_per_group * self.inner
    }

    fn channels(&self) -> usize {
        self.groups * self.channels_per_group
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
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group_norm: {groups} groups do not divide the channels of {dims:?}");
    }
    let geometry = Geometry {
        groups,
        channels_per_group: dims[1] / groups,
        inner: dims[2..].iter().product(),
    };
    apply(x, weight, bias, geometry, eps, silu)
}

/// LayerNorm of `x` [..., D] over its last dimension, scaled by `weight` [D] and shifted by
/// `bias` [D] → [..., D] in x's dtype.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let geometry = Geometry {
        groups: 1,
        channels_per_group: x.dim(candle_core::D::Minus1)?,
        inner: 1,
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

struct Norm {
    geometry: Geometry,
    eps: f32,
    silu: bool,
}

/// Mean and 1/√(var + eps) of a row, summed in f64 (deterministic: one thread per row).
fn row_stats<T: Float>(x: &[T], eps: f32) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|v| v.to_f32() as f64).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|v| {
            let d = v.to_f32() as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

#[inline(always)]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

fn forward_cpu<T: Float>(
    (x, w, b): (&[T], &[T], &[T]),
    g: Geometry,
    eps: f32,
    act: bool,
) -> Vec<T> {
    let n = g.n();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .enumerate()
        .for_each(|(row, (y, x))| {
            let (mean, rstd) = row_stats(x, eps);
            let c0 = (row % g.groups) * g.channels_per_group;
            let (w, b) = (
                &w[c0..c0 + g.channels_per_group],
                &b[c0..c0 + g.channels_per_group],
            );
            let out = |v: f32, scale: f32, shift: f32| {
                let v = (v - mean) * scale + shift;
                T::from_f32(if act { silu(v) } else { v })
            };
            if g.inner == 1 {
                for (((o, v), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *o = out(v.to_f32(), w.to_f32() * rstd, b.to_f32());
                }
            } else {
                for (((ys, xs), w), b) in y.chunks_mut(g.inner).zip(x.chunks(g.inner)).zip(w).zip(b)
                {
                    let (scale, shift) = (w.to_f32() * rstd, b.to_f32());
                    for (o, v) in ys.iter_mut().zip(xs) {
                        *o = out(v.to_f32(), scale, shift);
                    }
                }
            }
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
        Ok((y, xl.shape().clone()))
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
            let silu = op.silu as u32;
            let cfg = cuda::blocks(xl.shape().elem_count() / g.n(), cuda::row_threads(g.n()))?;
            cuda::launch!(
                dev,
                &cuda::NORM,
                "norm_fwd",
                T::DTYPE,
                cfg,
                [&xs, &ws, &bs, &y, &groups, &cpg, &inner, &op.eps, &silu]
            );
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        same_dtype(self.name(), x.dtype(), &[w.dtype(), b.dtype()])?;
        let y = float_dispatch!(x.dtype(), self.name(), run(self, (x, xl), (w, wl), (b, bl)))?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry;
        let (x, w, b, grad) = (x.detach(), w.detach(), b.detach(), grad.detach());
        let (n, rows) = (g.n(), x.elem_count() / g.n());
        let stats = x.apply_op1_no_bwd(&Stats { n, eps: self.eps })?;
        let (mean, rstd) = (stats.narrow(1, 0, 1)?, stats.narrow(1, 1, 1)?);
        // [batch, groups, channels per group, inner], parameters broadcast as [1, G, C/G, 1].
        let dims = (rows / g.groups, g.groups, g.channels_per_group, g.inner);
        let param = |p: &Tensor| {
            p.to_dtype(DType::F32)?
                .reshape((1, g.groups, g.channels_per_group, 1))
        };
        let w32 = param(&w)?;
        let x_hat = x
            .to_dtype(DType::F32)?
            .reshape((rows, n))?
            .broadcast_sub(&mean)?
            .broadcast_mul(&rstd)?
            .reshape(dims)?;
        let mut g_z = grad.to_dtype(DType::F32)?.reshape(dims)?;
        if self.silu {
            // silu'(z) = s · (1 + z · (1 − s)), s = sigmoid(z), z the pre-activation.
            let z = x_hat.broadcast_mul(&w32)?.broadcast_add(&param(&b)?)?;
            let s = candle_nn::ops::sigmoid(&z)?;
            g_z = (g_z * (&s * ((z * (1.0 - &s)?)? + 1.0)?)?)?;
        }
        // Parameter gradients: sums over the batch and the inner positions (the trailing
        // dimension first, the fast reduction on the CPU), in F32.
        let channel_sum = |t: &Tensor| t.sum(3)?.sum(0)?.flatten_all()?.to_dtype(w.dtype());
        let grad_w = channel_sum(&(&g_z * &x_hat)?)?;
        let grad_b = channel_sum(&g_z)?;
        let g_hat = g_z.broadcast_mul(&w32)?.reshape((rows, n))?;
        let x_hat = x_hat.reshape((rows, n))?;
        let grad_x = g_hat
            .broadcast_sub(&g_hat.mean_keepdim(1)?)?
            .sub(&x_hat.broadcast_mul(&(&g_hat * &x_hat)?.mean_keepdim(1)?)?)?
            .broadcast_mul(&rstd)?
            .reshape(x.shape())?
            .to_dtype(x.dtype())?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

/// Each row's mean and 1/√(var + eps) of x viewed as [rows, n]: [rows, 2] in F32.
struct Stats {
    n: usize,
    eps: f32,
}

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "norm-stats"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(op: &Stats, x: &CpuStorage, xl: &Layout) -> Result<Vec<f32>> {
            let x = cpu_slice::<T>(x, xl, op.name())?;
            Ok(x.par_chunks(op.n)
                .flat_map_iter(|row| {
                    let (mean, rstd) = row_stats(row, op.eps);
                    [mean, rstd]
                })
                .collect())
        }
        let stats = float_dispatch!(x.dtype(), self.name(), run(self, x, xl))?;
        let rows = stats.len() / 2;
        Ok((CpuStorage::F32(stats), Shape::from((rows, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, CudaFloat};
        fn run<T: CudaFloat>(
            op: &Stats,
            x: &candle_core::CudaStorage,
            xl: &Layout,
        ) -> Result<candle_core::CudaStorage> {
            let dev = &x.device;
            let xs = cuda::view::<T>(x, xl, op.name())?;
            let rows = xl.shape().elem_count() / op.n;
            let stats = cuda::output::<f32>(dev, 2 * rows)?;
            let n = cuda::arg_u32(op.n, "elements per row")?;
            let cfg = cuda::blocks(rows, cuda::row_threads(op.n))?;
            cuda::launch!(
                dev,
                &cuda::NORM,
                "norm_stats",
                T::DTYPE,
                cfg,
                [&xs, &stats, &n, &op.eps]
            );
            Ok(candle_core::CudaStorage::wrap_cuda_slice(
                stats,
                dev.clone(),
            ))
        }
        let stats = float_dispatch!(x.dtype(), self.name(), run(self, x, xl))?;
        let rows = xl.shape().elem_count() / self.n;
        Ok((stats, Shape::from((rows, 2))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{outputs_and_gradients, relative_errors};
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, D};

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
            let cast = |t: &Tensor| t.to_dtype(dtype);
            let got = outputs_and_gradients(fused, &[&cast(x)?, &cast(w)?, &cast(b)?], r)?;
            // Against the reference on the same rounded inputs.
            let up = |t: &Tensor| cast(t)?.to_dtype(DType::F32);
            let want = outputs_and_gradients(reference, &[&up(x)?, &up(w)?, &up(b)?], r)?;
            let errs = relative_errors(&got, &want)?;
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
    fn layer_norm_equals_the_composite_ops() -> Result<()> {
        for dims in [vec![2, 5, 7], vec![3, 33], vec![1, 1, 130]] {
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
