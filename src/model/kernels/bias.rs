//! A layer's bias and the residual connection after it in one op: y = x + b + r. As tensor ops
//! these were two launches (two passes) and, in training, two graph nodes.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, float_dispatch, same_dtype, vectorized, Float};
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
    apply(
        x,
        bias,
        residual,
        BiasResidual {
            axis,
            tokens: false,
        },
    )
}

/// A token layer's output `x` [B, H·W, C] back as a feature map, plus `bias` [C] and the feature
/// map `residual` [B, C, H, W] → [B, C, H, W] (one op instead of the bias, a transposing copy and
/// the residual).
pub fn add_bias_residual_from_tokens(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    let (b, s, c) = x.dims3()?;
    let dims = residual.dims();
    let inner: usize = dims.get(2..).map_or(0, |d| d.iter().product());
    if dims.len() < 3 || dims[0] != b || dims[1] != c || inner != s || bias.dims() != [c] {
        candle_core::bail!(
            "add_bias_residual_from_tokens: tokens {:?}, bias {:?}, feature map {dims:?}",
            x.dims(),
            bias.dims()
        );
    }
    apply(
        x,
        bias,
        residual,
        BiasResidual {
            axis: 1,
            tokens: true,
        },
    )
}

fn apply(x: &Tensor, bias: &Tensor, residual: &Tensor, op: BiasResidual) -> Result<Tensor> {
    let dtype = x.dtype();
    x.contiguous()?.apply_op3(
        &bias.to_dtype(dtype)?.contiguous()?,
        &residual.to_dtype(dtype)?.contiguous()?,
        op,
    )
}

struct BiasResidual {
    axis: usize,
    /// x holds the output's feature map [B, C, inner] as tokens [B, inner, C].
    tokens: bool,
}

impl BiasResidual {
    /// (channels, elements per channel run) of the output, whose layout `residual` has.
    fn geometry(&self, residual: &Layout) -> (usize, usize) {
        let dims = residual.dims();
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
            tokens: bool,
        ) -> Result<CpuStorage> {
            let name = "bias-residual";
            let (x, b, r) = (
                cpu_slice::<T>(x, xl, name)?,
                cpu_slice::<T>(b, bl, name)?,
                cpu_slice::<T>(r, rl, name)?,
            );
            let mut y = vec![T::zero(); r.len()];
            // One slab (every channel once) per item, a few thousand elements per task.
            let slab = channels * inner;
            if slab > 0 {
                y.par_chunks_mut(slab)
                    .zip(x.par_chunks(slab).zip(r.par_chunks(slab)))
                    .with_min_len((4096 / slab).max(1))
                    .for_each(|(y, (x, r))| {
                        vectorized!(|| {
                            for (c, (y, r)) in y.chunks_mut(inner).zip(r.chunks(inner)).enumerate()
                            {
                                let b = b[c].to_f32();
                                for (s, (y, r)) in y.iter_mut().zip(r).enumerate() {
                                    let x = if tokens {
                                        x[s * channels + c]
                                    } else {
                                        x[c * inner + s]
                                    };
                                    *y = T::from_f32(x.to_f32() + b + r.to_f32());
                                }
                            }
                        })
                    });
            }
            Ok(T::to_cpu_storage_owned(y))
        }
        same_dtype(self.name(), x.dtype(), &[b.dtype(), r.dtype()])?;
        let geometry = self.geometry(rl);
        let y = float_dispatch!(
            x.dtype(),
            self.name(),
            run((x, xl), (b, bl), (r, rl), geometry, self.tokens)
        )?;
        Ok((y, rl.shape().clone()))
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
            tokens: bool,
        ) -> Result<candle_core::CudaStorage> {
            let name = "bias-residual";
            let dev = &x.device;
            let (xs, bs, rs) = (
                cuda::view::<T>(x, xl, name)?,
                cuda::view::<T>(b, bl, name)?,
                cuda::view::<T>(r, rl, name)?,
            );
            let total = rl.shape().elem_count();
            let y = cuda::output::<T>(dev, total)?;
            let (total, inner, tokens) = (total as u64, inner as u64, tokens as u32);
            let channels = cuda::arg_u32(channels, "channels")?;
            let cfg = cuda::elementwise(total)?;
            cuda::launch!(
                dev,
                &cuda::BIAS,
                "bias_residual",
                T::DTYPE,
                cfg,
                [&xs, &bs, &rs, &y, &total, &channels, &inner, &tokens]
            );
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        same_dtype(self.name(), x.dtype(), &[b.dtype(), r.dtype()])?;
        let geometry = self.geometry(rl);
        let y = float_dispatch!(
            x.dtype(),
            self.name(),
            run((x, xl), (b, bl), (r, rl), geometry, self.tokens)
        )?;
        Ok((y, rl.shape().clone()))
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
        let grad_x = if self.tokens {
            let (batch, c) = (grad.dim(0)?, grad.dim(1)?);
            grad.reshape((batch, c, ()))?
                .transpose(1, 2)?
                .contiguous()?
        } else {
            grad.clone()
        };
        Ok((Some(grad_x), Some(grad_b), Some(grad)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::against_reference;
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
            for (dtype, tol) in [
                (DType::F32, 1e-6),
                (DType::F16, 2e-3),
                (DType::BF16, 1.6e-2),
            ] {
                let (_, errs) = against_reference(
                    dtype,
                    &|t| add_bias_residual(&t[0], &t[1], axis, &t[2]),
                    &composite,
                    &[&x, &b, &r],
                    &w,
                )?;
                let err = errs.into_iter().fold(0.0, f64::max);
                assert!(err < tol, "{dims:?} along {axis}, {dtype:?}: {err}");
            }
        }
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        assert!(add_bias_residual(&x, &Tensor::zeros(2, DType::F32, &dev)?, 1, &x).is_err());
        Ok(())
    }

    #[test]
    fn tokens_back_to_a_feature_map_equal_the_composite_ops() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(24);
        let (b, c, h, w) = (2, 5, 3, 7);
        let x = rng.randn((b, h * w, c), &dev)?;
        let bias = rng.randn(c, &dev)?;
        let r = rng.randn((b, c, h, w), &dev)?;
        let weights = rng.randn((b, c, h, w), &dev)?;
        let composite = |t: &[Tensor]| {
            t[0].broadcast_add(&t[1])?
                .transpose(1, 2)?
                .reshape((b, c, h, w))?
                + &t[2]
        };
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::F16, 2e-3)] {
            let (_, errs) = against_reference(
                dtype,
                &|t| add_bias_residual_from_tokens(&t[0], &t[1], &t[2]),
                &composite,
                &[&x, &bias, &r],
                &weights,
            )?;
            let err = errs.into_iter().fold(0.0, f64::max);
            assert!(err < tol, "{dtype:?}: {err}");
        }
        assert!(add_bias_residual_from_tokens(&x, &bias, &x).is_err());
        Ok(())
    }
}
