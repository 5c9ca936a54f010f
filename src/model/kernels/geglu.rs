//! GEGLU (Shazeer, "GLU Variants Improve Transformer", 2020): a · gelu(gate) for the two halves
//! of one projected tensor, forward and backward each one kernel. In candle ops it was a narrow
//! copy per half, the GELU and the product (and their backward passes).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{cpu_slice, fast_erf, fast_exp, float_dispatch, same_dtype, vectorized, Float};

/// `h` [..., 2H] = [a | gate] → a · gelu_erf(gate): [..., H], in h's dtype (arithmetic in F32).
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let width = h.dim(D::Minus1)?;
    if !width.is_multiple_of(2) {
        candle_core::bail!("geglu: the last dimension of {:?} is odd", h.dims());
    }
    h.contiguous()?.apply_op1(Geglu)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_erf(x * FRAC_1_SQRT_2))
}

/// d/dx gelu(x) = Φ(x) + x · φ(x).
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + fast_erf(x * FRAC_1_SQRT_2));
    let pdf = fast_exp(-0.5 * x * x) / (2.0 * std::f32::consts::PI).sqrt();
    cdf + x * pdf
}

/// Rows per rayon task: rows are short (a few hundred elements).
const MIN_ROWS_PER_TASK: usize = 64;

struct Geglu;

impl Geglu {
    /// H, the output's last dimension, and the output's shape.
    fn output_shape(layout: &Layout) -> (usize, Shape) {
        let mut dims = layout.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] /= 2;
        (dims[last], Shape::from(dims))
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, h: &CpuStorage, hl: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(h: &CpuStorage, hl: &Layout, half: usize) -> Result<CpuStorage> {
            let h = cpu_slice::<T>(h, hl, "geglu")?;
            let mut y = vec![T::zero(); h.len() / 2];
            if half > 0 {
                y.par_chunks_mut(half)
                    .zip(h.par_chunks(2 * half))
                    .with_min_len(MIN_ROWS_PER_TASK)
                    .for_each(|(y, h)| {
                        vectorized!(|| {
                            let (a, gate) = h.split_at(half);
                            for ((y, a), g) in y.iter_mut().zip(a).zip(gate) {
                                *y = T::from_f32(a.to_f32() * gelu(g.to_f32()));
                            }
                        })
                    });
            }
            Ok(T::to_cpu_storage_owned(y))
        }
        let (half, shape) = Self::output_shape(hl);
        let y = float_dispatch!(h.dtype(), self.name(), run(h, hl, half))?;
        Ok((y, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &candle_core::CudaStorage,
        hl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, CudaFloat};
        fn run<T: CudaFloat>(
            h: &candle_core::CudaStorage,
            hl: &Layout,
            half: usize,
        ) -> Result<candle_core::CudaStorage> {
            let dev = &h.device;
            let hs = cuda::view::<T>(h, hl, "geglu")?;
            let total = hl.shape().elem_count() / 2;
            let y = cuda::output::<T>(dev, total)?;
            let (total, half) = (total as u64, cuda::arg_u32(half, "geglu width")?);
            let cfg = cuda::elementwise(total)?;
            cuda::launch!(
                dev,
                &cuda::GEGLU,
                "geglu_fwd",
                T::DTYPE,
                cfg,
                [&hs, &y, &total, &half]
            );
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        let (half, shape) = Self::output_shape(hl);
        let y = float_dispatch!(h.dtype(), self.name(), run(h, hl, half))?;
        Ok((y, shape))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.detach().contiguous()?;
        Ok(Some(h.detach().apply_op2_no_bwd(&grad, &GegluBackward)?))
    }
}

/// (h [..., 2H], g [..., H]) → dh [..., 2H] = [g · gelu(gate) | g · a · gelu'(gate)].
struct GegluBackward;

impl CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "geglu-backward"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        hl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            (h, hl): (&CpuStorage, &Layout),
            (g, gl): (&CpuStorage, &Layout),
            half: usize,
        ) -> Result<CpuStorage> {
            let h = cpu_slice::<T>(h, hl, "geglu-backward")?;
            let g = cpu_slice::<T>(g, gl, "geglu-backward")?;
            let mut dh = vec![T::zero(); h.len()];
            if half > 0 {
                dh.par_chunks_mut(2 * half)
                    .zip(h.par_chunks(2 * half))
                    .zip(g.par_chunks(half))
                    .with_min_len(MIN_ROWS_PER_TASK)
                    .for_each(|((dh, h), g)| {
                        vectorized!(|| {
                            let (da, dgate) = dh.split_at_mut(half);
                            let (a, gate) = h.split_at(half);
                            for ((((da, dgate), a), gate), g) in
                                da.iter_mut().zip(dgate).zip(a).zip(gate).zip(g)
                            {
                                let (gate, g) = (gate.to_f32(), g.to_f32());
                                *da = T::from_f32(g * gelu(gate));
                                *dgate = T::from_f32(g * a.to_f32() * gelu_grad(gate));
                            }
                        })
                    });
            }
            Ok(T::to_cpu_storage_owned(dh))
        }
        same_dtype(self.name(), h.dtype(), &[g.dtype()])?;
        let half = hl.dims()[hl.dims().len() - 1] / 2;
        let dh = float_dispatch!(h.dtype(), self.name(), run((h, hl), (g, gl), half))?;
        Ok((dh, hl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &candle_core::CudaStorage,
        hl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, CudaFloat};
        fn run<T: CudaFloat>(
            (h, hl): (&candle_core::CudaStorage, &Layout),
            (g, gl): (&candle_core::CudaStorage, &Layout),
            half: usize,
        ) -> Result<candle_core::CudaStorage> {
            let dev = &h.device;
            let hs = cuda::view::<T>(h, hl, "geglu-backward")?;
            let gs = cuda::view::<T>(g, gl, "geglu-backward")?;
            let dh = cuda::output::<T>(dev, hl.shape().elem_count())?;
            let total = (hl.shape().elem_count() / 2) as u64;
            let half = cuda::arg_u32(half, "geglu width")?;
            let cfg = cuda::elementwise(total)?;
            cuda::launch!(
                dev,
                &cuda::GEGLU,
                "geglu_bwd",
                T::DTYPE,
                cfg,
                [&hs, &gs, &dh, &total, &half]
            );
            Ok(candle_core::CudaStorage::wrap_cuda_slice(dh, dev.clone()))
        }
        same_dtype(self.name(), h.dtype(), &[g.dtype()])?;
        let half = hl.dims()[hl.dims().len() - 1] / 2;
        let dh = float_dispatch!(h.dtype(), self.name(), run((h, hl), (g, gl), half))?;
        Ok((dh, hl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{outputs_and_gradients, worst_relative};
    use super::*;
    use crate::rng::Rng;
    use candle_core::{DType, Device};

    /// GEGLU in candle ops, as the feed-forward computed it before.
    fn composite(t: &[Tensor]) -> Result<Tensor> {
        let h = &t[0];
        let half = h.dim(D::Minus1)? / 2;
        h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?
    }

    #[test]
    fn geglu_equals_the_composite_ops() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(21);
        // Odd widths and a row count that is not a multiple of the rows per task.
        for dims in [(2, 7, 10), (1, 131, 6), (3, 1, 2)] {
            let h = (rng.randn(dims, &dev)? * 2.0)?;
            let r = rng.randn((dims.0, dims.1, dims.2 / 2), &dev)?;
            for (dtype, tol) in [
                (DType::F32, 1e-6),
                (DType::F16, 2e-3),
                (DType::BF16, 1.6e-2),
            ] {
                let h = h.to_dtype(dtype)?;
                let got = outputs_and_gradients(&|t| geglu(&t[0]), &[&h], &r)?;
                // Against the composite on the same rounded input.
                let want = outputs_and_gradients(&composite, &[&h.to_dtype(DType::F32)?], &r)?;
                let err = worst_relative(&got, &want)?;
                assert!(err < tol, "{dims:?} {dtype:?}: {err}");
            }
        }
        assert!(geglu(&Tensor::zeros((2, 3), DType::F32, &dev)?).is_err());
        Ok(())
    }
}
