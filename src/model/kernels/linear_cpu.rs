//! A linear layer on the CPU in F32 as one op: y = x · Wᵀ (+ b) for x [..., K], W [N, K],
//! b [N], forward and backward by matrix products (on CUDA and in other precisions,
//! [`crate::model::layers::Linear`] uses candle's matmul and a bias op).
//!
//! As candle ops the layer was a reshape of x to rows, a transposed view of W, the product, a
//! reshape back and the bias: five graph nodes, and in the backward pass candle starts each
//! node's input gradient as a zero tensor and adds into it (an activation-sized pass for each
//! reshape and for the bias). Here the bias is where each output row starts (the product
//! accumulates onto it) and the backward pass is three products and a column sum:
//!
//! - dx [rows, K] = dy [rows, N] · W
//! - dW [N, K] = dyᵀ · x
//! - db [N] = Σ_rows dy

use candle_core::{bail, Result, Shape, Tensor};

use super::weighted::{CpuOp, Gradients, Operand, Weighted};
use super::{matmul_par, overwritten};
use crate::model::affine::sum_outer;

/// `x` [..., K] · `w` [N, K]ᵀ + `bias` [N] → [..., N]; every tensor on the CPU in F32 (see
/// [`super::on_cpu_f32`]).
pub(crate) fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    if k == 0 || dims.last() != Some(&k) || bias.is_some_and(|b| b.dims() != [n]) {
        bail!(
            "linear: input {dims:?}, weight {:?} and bias {:?} do not fit",
            w.dims(),
            bias.map(|b| b.dims().to_vec())
        );
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, CpuOp(LinearCpu)),
        None => x.apply_op2(&w, CpuOp(LinearCpu)),
    }
}

/// The sizes of one call: rows of x, K inputs, N outputs.
#[derive(Clone, Copy)]
struct Dims {
    rows: usize,
    k: usize,
    n: usize,
}

impl Dims {
    fn of(x: &Shape, w: &Shape) -> Result<Self> {
        let (n, k) = w.dims2()?;
        // linear() refuses K = 0, for which the rows could not be counted from the elements.
        let rows = x.elem_count() / k;
        Ok(Self { rows, k, n })
    }

    /// x's shape with its last dimension N.
    fn output_shape(&self, x: &Shape) -> Shape {
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("checked by linear") = self.n;
        Shape::from(dims)
    }
}

/// y [rows, N] = x [rows, K] · wᵀ (+ bias).
fn forward(d: Dims, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    // Each output row starts at the bias and the product adds onto it; without a bias the
    // product writes it.
    let len = d.rows * d.n;
    let mut y = Vec::with_capacity(len);
    if let Some(b) = bias {
        for _ in 0..d.rows {
            y.extend_from_slice(b);
        }
    }
    if len > 0 {
        // SAFETY: x is [rows, K] and w [N, K] (wᵀ [K, N]: rows of w are its columns), y's
        // capacity [rows, N].
        unsafe {
            matmul_par(
                (d.rows, d.n, d.k),
                y.as_mut_ptr(),
                d.n,
                bias.is_some(),
                (x.as_ptr(), d.k, 1),
                (w.as_ptr(), 1, d.k),
            )
        };
    }
    // SAFETY: every element was written, by the bias or by the product (K > 0: linear() refuses
    // 0).
    unsafe { y.set_len(len) };
    y
}

/// (dx if `want_x`, dW) from dy [rows, N].
fn backward(
    d: Dims,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    want_x: bool,
) -> (Option<Vec<f32>>, Vec<f32>) {
    // A product over no rows or no outputs is zeros; the others write every element.
    let empty = d.rows * d.n == 0;
    let gx = want_x.then(|| {
        if empty {
            return vec![0f32; d.rows * d.k];
        }
        // SAFETY: gy [rows, N], w [N, K], gx [rows, K], all of it written.
        unsafe {
            overwritten(d.rows * d.k, |gx| {
                let (lhs, rhs) = ((gy.as_ptr(), d.n, 1), (w.as_ptr(), d.k, 1));
                matmul_par((d.rows, d.k, d.n), gx, d.k, false, lhs, rhs)
            })
        }
    });
    let gw = if empty {
        vec![0f32; d.n * d.k]
    } else {
        // SAFETY: gyᵀ [N, rows] (columns of gy are its rows), x [rows, K], gw [N, K], all of
        // it written.
        unsafe {
            overwritten(d.n * d.k, |gw| {
                let (lhs, rhs) = ((gy.as_ptr(), 1, d.n), (x.as_ptr(), d.k, 1));
                matmul_par((d.n, d.k, d.rows), gw, d.k, false, lhs, rhs)
            })
        }
    };
    (gx, gw)
}

/// The layer's arithmetic for [`CpuOp`]: [`forward`], [`backward`] and the bias's column sums.
struct LinearCpu;

impl Weighted for LinearCpu {
    const NAMES: [&'static str; 2] = ["linear-cpu", "linear-bias-cpu"];

    fn forward(
        &self,
        (x, xs): Operand,
        (w, ws): Operand,
        bias: Option<Operand>,
    ) -> Result<(Vec<f32>, Shape)> {
        let d = Dims::of(xs, ws)?;
        let y = forward(d, x, w, bias.map(|(b, _)| b));
        Ok((y, d.output_shape(xs)))
    }

    fn backward(
        &self,
        (x, xs): Operand,
        (w, ws): Operand,
        bias: Option<&Shape>,
        gy: &[f32],
        want_x: bool,
    ) -> Result<Gradients> {
        let d = Dims::of(xs, ws)?;
        let (gx, gw) = backward(d, x, w, gy, want_x);
        let gb = bias.map(|_| sum_outer(gy, (d.rows, d.n, 1)));
        Ok((gx, gw, gb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The op against candle's matmul and broadcast add, values and gradients, with and
    /// without a bias, for inputs of rank 2 and 3.
    #[test]
    fn equals_candles_product_and_bias() -> Result<()> {
        let dev = Device::Cpu;
        for shape in [vec![5usize, 7], vec![2, 9, 7], vec![3, 1, 7]] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., shape.as_slice(), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (4, 7), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1., 4, &dev)?)?;
            for with_bias in [false, true] {
                let bias = with_bias.then_some(b.as_tensor());
                let ours = linear(&x, &w, bias)?;
                let mut theirs = x.broadcast_matmul(&w.t()?)?;
                if with_bias {
                    theirs = theirs.broadcast_add(&b)?;
                }
                assert_eq!(ours.dims(), theirs.dims());
                let r = Tensor::randn(0f32, 1., ours.shape(), &dev)?;
                let g_ours = (&ours * &r)?.sum_all()?.backward()?;
                let g_theirs = (&theirs * &r)?.sum_all()?.backward()?;
                let mut pairs = vec![
                    ("output", ours.clone(), theirs.clone()),
                    (
                        "x",
                        g_ours.get(&x).unwrap().clone(),
                        g_theirs.get(&x).unwrap().clone(),
                    ),
                    (
                        "w",
                        g_ours.get(&w).unwrap().clone(),
                        g_theirs.get(&w).unwrap().clone(),
                    ),
                ];
                if with_bias {
                    pairs.push((
                        "b",
                        g_ours.get(&b).unwrap().clone(),
                        g_theirs.get(&b).unwrap().clone(),
                    ));
                } else {
                    assert!(g_ours.get(&b).is_none());
                }
                for (what, a, e) in pairs {
                    let d = (a - &e)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(d < 1e-5, "{what} for {shape:?}, bias {with_bias}: {d}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn an_input_without_gradient_gets_none_and_a_misfit_is_named() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 5), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 5), &dev)?)?;
        let grads = linear(&x, &w, None)?.sum_all()?.backward()?;
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&w).is_some());
        let err = linear(
            &x,
            &Tensor::ones((2, 4), candle_core::DType::F32, &dev)?,
            None,
        );
        assert!(err.unwrap_err().to_string().contains("do not fit"));
        // No inputs (K = 0): refused, not an output shorter than its shape.
        let empty = |dims: (usize, usize)| Tensor::zeros(dims, candle_core::DType::F32, &dev);
        assert!(linear(&empty((3, 0))?, &empty((2, 0))?, None).is_err());
        Ok(())
    }
}
