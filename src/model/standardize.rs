//! Standardisation, the shared core of GroupNorm and LayerNorm: (x − mean) / √(var + eps) over
//! each row of a [rows, n] view of x, statistics in F32 whatever x's dtype, with a hand-written
//! backward pass.
//!
//! Written with autograd primitives it kept an F32 copy of x, the centred values and the quotient
//! for the backward pass: three full-size F32 tensors per normalisation, six times an F16
//! activation. This op keeps only its input and recomputes the statistics in the backward pass:
//! dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂)) per row, with x̂ the standardised x and r = 1/√(var + eps).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

use super::precomputed::Precomputed;

/// `xs` standardised over each row of its [rows, elem_count / rows] view, in its own dtype and
/// shape.
pub fn standardize(xs: &Tensor, rows: usize, eps: f64) -> Result<Tensor> {
    let y = Rows::of(&xs.detach(), rows, eps)?
        .standardized
        .reshape(xs.shape())?
        .to_dtype(xs.dtype())?;
    if !xs.track_op() {
        return Ok(y);
    }
    xs.apply_op1(Standardize {
        rows,
        eps,
        output: Precomputed::new("standardize", y),
    })
}

/// x viewed as [rows, n] in F32, standardised, with 1/√(var + eps) of each row: [rows, 1].
struct Rows {
    standardized: Tensor,
    inv_std: Tensor,
}

impl Rows {
    fn of(xs: &Tensor, rows: usize, eps: f64) -> Result<Self> {
        let x = xs
            .to_dtype(DType::F32)?
            .reshape((rows, xs.elem_count() / rows))?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let inv_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        Ok(Self {
            standardized: centred.broadcast_mul(&inv_std)?,
            inv_std,
        })
    }
}

struct Standardize {
    rows: usize,
    eps: f64,
    output: Precomputed,
}

impl CustomOp1 for Standardize {
    fn name(&self) -> &'static str {
        "standardize"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Rows {
            standardized: xh,
            inv_std,
        } = Rows::of(&arg.detach(), self.rows, self.eps)?;
        let g = grad.to_dtype(DType::F32)?.reshape(xh.shape())?;
        let g_mean = g.mean_keepdim(D::Minus1)?;
        let gx_mean = (&g * &xh)?.mean_keepdim(D::Minus1)?;
        let dx = g
            .broadcast_sub(&g_mean)?
            .sub(&xh.broadcast_mul(&gx_mean)?)?
            .broadcast_mul(&inv_std)?;
        Ok(Some(dx.reshape(arg.shape())?.to_dtype(arg.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    /// The formula in autograd primitives, as the norms were written before this op.
    fn by_autograd(xs: &Tensor, rows: usize, eps: f64) -> Result<Tensor> {
        let x = xs.reshape((rows, xs.elem_count() / rows))?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .reshape(xs.shape())
    }

    #[test]
    fn output_and_gradient_equal_autograds() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(9);
        // Shifted and scaled so that the statistics matter.
        let x = ((rng.randn((2, 6, 5, 3), &dev)? * 3.0)? + 1.5)?;
        let r = rng.randn((2, 6, 5, 3), &dev)?;
        let grad_of =
            |f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor| -> Result<(Tensor, Tensor)> {
                let v = Var::from_tensor(x)?;
                let y = f(v.as_tensor())?;
                let g = (y.to_dtype(DType::F32)? * &r)?.sum_all()?.backward()?;
                Ok((
                    y.to_dtype(DType::F32)?,
                    g.get(v.as_tensor()).unwrap().to_dtype(DType::F32)?,
                ))
            };
        let max = |t: Tensor| t.abs()?.max_all()?.to_scalar::<f32>();
        for rows in [2, 6, 60] {
            let (want_y, want_g) = grad_of(&|x| by_autograd(x, rows, 1e-5), &x)?;
            let (y, g) = grad_of(&|x| standardize(x, rows, 1e-5), &x)?;
            assert!(max((y - &want_y)?)? < 1e-5, "output, {rows} rows");
            let err = max((g - &want_g)?)? / max(want_g.clone())?;
            assert!(err < 1e-5, "gradient, {rows} rows: {err}");
            // F16 input: within half-precision rounding of the F32 result.
            let (y16, g16) = grad_of(&|x| standardize(x, rows, 1e-5), &x.to_dtype(DType::F16)?)?;
            assert!(max((y16 - want_y)?)? < 1e-2, "f16 output, {rows} rows");
            let err = max((g16 - &want_g)?)? / max(want_g)?;
            assert!(err < 1e-2, "f16 gradient, {rows} rows: {err}");
        }
        Ok(())
    }
}
