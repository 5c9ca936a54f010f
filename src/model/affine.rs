//! Per-channel bias and scale-and-shift whose parameter gradients are summed in F32.
//!
//! The gradient of a bias is a sum over every position of a batch (for a convolution: B·H·W
//! terms). candle sums in the tensor's own dtype (its CUDA reduction accumulates F16 in F16), so
//! under mixed precision these gradients came out wrong: on the tiny VAE in F16 the output
//! layer's bias gradient was off by 28 % (tests/train.rs, f16_gradients_*). These ops compute
//! the forward pass in the input's dtype, as candle's broadcast ops do, and take the parameter
//! gradients from an F32 copy of the output gradient.

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};

use crate::model::kernels::{cpu_slice, sum_lanes, vectorized};

/// `x + b`, with `b` [C] broadcast along dimension `axis` of `x`.
pub fn add_bias(x: &Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
    x.apply_op2(&bias.to_dtype(x.dtype())?, BiasAdd { axis })
}

/// The layout that reads a [C] parameter as if it had `x`'s shape: stride 0 except along `axis`.
fn broadcast(param: &Layout, x: &Layout, axis: usize) -> Result<Layout> {
    let dims = x.dims();
    if param.dims().len() != 1 || axis >= dims.len() || param.dims()[0] != dims[axis] {
        candle_core::bail!(
            "per-channel parameter of shape {:?} does not match dimension {axis} of {:?}",
            param.dims(),
            dims
        );
    }
    let mut stride = vec![0; dims.len()];
    stride[axis] = param.stride()[0];
    Ok(Layout::new(x.shape().clone(), stride, param.start_offset()))
}

/// Sum of `g` over every dimension but `axis`, in F32, as [C] in `dtype`.
pub(crate) fn sum_except(g: &Tensor, axis: usize, dtype: DType) -> Result<Tensor> {
    let dims = g.dims();
    let before: usize = dims[..axis].iter().product();
    let after: usize = dims[axis + 1..].iter().product();
    let g = g.to_dtype(DType::F32)?;
    if g.device().is_cpu() {
        // candle sums a leading dimension one strided output element at a time.
        let g = g.contiguous()?;
        let sums = {
            let (storage, layout) = g.storage_and_layout();
            let Storage::Cpu(storage) = &*storage else {
                candle_core::bail!("sum_except: a CPU tensor without CPU storage")
            };
            let g = cpu_slice::<f32>(storage, layout, "bias gradient")?;
            sum_outer(g, (before, dims[axis], after))
        };
        return Tensor::from_vec(sums, dims[axis], g.device())?.to_dtype(dtype);
    }
    // Summing the trailing dimension first is the fast reduction on CUDA.
    g.reshape((before, dims[axis], after))?
        .sum(2)?
        .sum(0)?
        .to_dtype(dtype)
}

/// The sums over the first and last dimensions of `g` [before, C, after]: [C].
pub(crate) fn sum_outer(g: &[f32], (before, c, after): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; c];
    if c == 0 || after == 0 {
        return out;
    }
    vectorized!(|| {
        for slab in g.chunks_exact(c * after).take(before) {
            if after == 1 {
                for (o, v) in out.iter_mut().zip(slab) {
                    *o += v;
                }
            } else {
                for (o, run) in out.iter_mut().zip(slab.chunks_exact(after)) {
                    *o += sum_lanes(run);
                }
            }
        }
    });
    out
}

struct BiasAdd {
    axis: usize,
}

fn bias_fwd<S: BackendStorage>(
    axis: usize,
    x: &S,
    xl: &Layout,
    b: &S,
    bl: &Layout,
) -> Result<(S, Shape)> {
    let out = x.binary_impl::<Add>(b, xl, &broadcast(bl, xl, axis)?)?;
    Ok((out, xl.shape().clone()))
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add-f32-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bias_fwd(self.axis, x, xl, b, bl)
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        bias_fwd(self.axis, x, xl, b, bl)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(grad.clone()),
            Some(sum_except(grad, self.axis, b.dtype())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::Device;

    /// The CPU sums equal candle's reductions, for every axis of a 4-D gradient (a channel of a
    /// feature map: after > 1; a channel of tokens: after = 1) and for a 1-D one.
    #[test]
    fn sum_except_equals_candles_sums() -> Result<()> {
        let g = Rng::new(3).randn((3, 5, 7, 9), &Device::Cpu)?;
        for axis in 0..4 {
            let got = sum_except(&g, axis, DType::F32)?;
            let mut want = g.clone();
            for d in (0..4).rev().filter(|&d| d != axis) {
                want = want.sum(d)?;
            }
            let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "axis {axis}: {err}");
        }
        let v = Tensor::new(&[1f32, -2.0, 3.5], &Device::Cpu)?;
        assert_eq!(
            sum_except(&v, 0, DType::F32)?.to_vec1::<f32>()?,
            [1.0, -2.0, 3.5]
        );
        Ok(())
    }
}
