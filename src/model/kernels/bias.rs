//! A layer's bias and the residual connection after it in one op: y = x + b + r. As tensor ops
//! these were two launches (two passes) and, in training, two graph nodes.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, float_dispatch, same_dtype, Float};
use crate::model::affine::sum_except;

/// `x + bias + residual`: `bias` [C] broadcast along dimension `axis` of `x`, `residual` of x's
/// shape → x's shape and dtype (one rounding, arithmetic in F32). The bias's gradient is summed in
/// F32, as [`crate::model::affine::add_bias`]'s.
pub fn add_bias_residual(
    x: &Tensor,
    bias: &Tensor,
    axis: usize,
    residual: &Tensor,
) -> Result<Tensor> {
    let dims = x.dims();
    if axis >= dims.len() || bias.dims() != [dims[axis]] || residual.dims() != dims {
        candle_core::bail!(
            "add_bias_residual: bias {:?} along dimension {axis} of {dims:?} and residual {:?}",
            bias.dims(),
            residual.dims()
        );
    }
    let dtype = x.dtype();
    x.contiguous()?.apply_op3(
        &bias.to_dtype(dtype)?.contiguous()?,
        &residual.to_dtype(dtype)?.contiguous()?,
        BiasResidual { axis },
    )
}

struct BiasResidual {
    axis: usize,
}

impl BiasResidual {
    /// (channels, elements per channel run) of a layout.
    fn geometry(&self, layout: &Layout) -> (usize, usize) {
        let dims = layout.dims();
        (dims[self.axis], dims[self.axis + 1..].iter().product())
    }
}

impl CustomOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "bias-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            (x, xl): (&CpuStorage, &Layout),
            (b, bl): (&CpuStorage, &Layout),
            (r, rl): (&CpuStorage, &Layout),
            (channels, inner): (usize, usize),
        ) -> Result<CpuStorage> {
            let name = "bias-residual";
            let (x, b, r) = (
                cpu_slice::<T>(x, xl, name)?,
                cpu_slice::<T>(b, bl, name)?,
                cpu_slice::<T>(r, rl, name)?,
            );
            let mut y = vec![T::zero(); x.len()];
            // One slab (every channel once) per item, a few thousand elements per task.
            let slab = channels * inner;
            if slab > 0 {
                y.par_chunks_mut(slab)
                    .zip(x.par_chunks(slab).zip(r.par_chunks(slab)))
                    .with_min_len((4096 / slab).max(1))
                    .for_each(|(y, (x, r))| {
                        let runs = y
                            .chunks_mut(inner)
                            .zip(x.chunks(inner).zip(r.chunks(inner)));
                        for ((y, (x, r)), b) in runs.zip(b) {
                            let b = b.to_f32();
                            for ((y, x), r) in y.iter_mut().zip(x).zip(r) {
                                *y = T::from_f32(x.to_f32() + b + r.to_f32());
                            }
                        }
                    });
            }
            Ok(T::to_cpu_storage_owned(y))
        }
        same_dtype(self.name(), x.dtype(), &[b.dtype(), r.dtype()])?;
        let geometry = self.geometry(xl);
        let y = float_dispatch!(
            x.dtype(),
            self.name(),
            run((x, xl), (b, bl), (r, rl), geometry)
        )?;
        Ok((y, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, CudaFloat};
        fn run<T: CudaFloat>(
            (x, xl): (&candle_core::CudaStorage, &Layout),
            (b, bl): (&candle_core::CudaStorage, &Layout),
            (r, rl): (&candle_core::CudaStorage, &Layout),
            (channels, inner): (usize, usize),
        ) -> Result<candle_core::CudaStorage> {
            let name = "bias-residual";
            let dev = &x.device;
            let (xs, bs, rs) = (
                cuda::view::<T>(x, xl, name)?,
                cuda::view::<T>(b, bl, name)?,
                cuda::view::<T>(r, rl, name)?,
            );
            let total = xl.shape().elem_count();
            let y = cuda::output::<T>(dev, total)?;
            let (total, inner) = (total as u64, inner as u64);
            let channels = cuda::arg_u32(channels, "channels")?;
            let cfg = cuda::elementwise(total)?;
            cuda::launch!(
                dev,
                &cuda::BIAS,
                "bias_residual",
                T::DTYPE,
                cfg,
                [&xs, &bs, &rs, &y, &total, &channels, &inner]
            );
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        same_dtype(self.name(), x.dtype(), &[b.dtype(), r.dtype()])?;
        let geometry = self.geometry(xl);
        let y = float_dispatch!(
            x.dtype(),
            self.name(),
            run((x, xl), (b, bl), (r, rl), geometry)
        )?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach();
        let grad_b = sum_except(&grad, self.axis, b.dtype())?;
        Ok((Some(grad.clone()), Some(grad_b), Some(grad)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{outputs_and_gradients, worst_relative};
    use super::*;
    use crate::rng::Rng;
    use candle_core::{DType, Device};

    #[test]
    fn bias_and_residual_equal_the_composite_ops() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(23);
        // A convolution's output (channels along dimension 1), a linear layer's (the last), odd sizes.
        for (dims, axis) in [(vec![2, 5, 3, 7], 1), (vec![3, 11, 6], 2), (vec![1, 1], 0)] {
            let x = rng.randn(dims.as_slice(), &dev)?;
            let b = rng.randn(dims[axis], &dev)?;
            let r = rng.randn(dims.as_slice(), &dev)?;
            let w = rng.randn(dims.as_slice(), &dev)?;
            let composite = |t: &[Tensor]| {
                let mut shape = vec![1; t[0].rank()];
                shape[axis] = t[1].dim(0)?;
                t[0].broadcast_add(&t[1].reshape(shape)?)? + &t[2]
            };
            let want = outputs_and_gradients(&composite, &[&x, &b, &r], &w)?;
            for (dtype, tol) in [
                (DType::F32, 1e-6),
                (DType::F16, 2e-3),
                (DType::BF16, 1.6e-2),
            ] {
                let cast = |t: &Tensor| t.to_dtype(dtype);
                let got = outputs_and_gradients(
                    &|t| add_bias_residual(&t[0], &t[1], axis, &t[2]),
                    &[&cast(&x)?, &cast(&b)?, &cast(&r)?],
                    &w,
                )?;
                let up = |t: &Tensor| cast(t)?.to_dtype(DType::F32);
                let want = if dtype == DType::F32 {
                    want.clone()
                } else {
                    outputs_and_gradients(&composite, &[&up(&x)?, &up(&b)?, &up(&r)?], &w)?
                };
                let err = worst_relative(&got, &want)?;
                assert!(err < tol, "{dims:?} along {axis}, {dtype:?}: {err}");
            }
        }
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        assert!(add_bias_residual(&x, &Tensor::zeros(2, DType::F32, &dev)?, 1, &x).is_err());
        Ok(())
    }
}
