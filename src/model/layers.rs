//! Small layers that candle either lacks or provides only in a form that cuts the gradient.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// LayerNorm written with differentiable primitives.
///
/// `candle_nn::LayerNorm` dispatches to a fused kernel without a backward pass on contiguous input
/// (see CANDLE-NOTES.md), so a trainable LayerNorm must not use it.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    /// `xs`: [..., dim] → [..., dim], normalised over the last dimension.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// [B, C, H, W] → [B, H·W, C]: image features as a token sequence.
pub fn to_tokens(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    xs.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// [B, H·W, C] → [B, C, H, W], the inverse of [`to_tokens`].
pub fn from_tokens(xs: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = xs.dims3()?;
    xs.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn layer_norm_matches_candle_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let ln = LayerNorm::new(6, 1e-5, vb)?;
        let x = Var::from_tensor(&Tensor::arange(0f32, 12., &dev)?.sqr()?.reshape((2, 6))?)?;
        let y = ln.forward(&x)?;
        let reference = candle_nn::LayerNorm::new(
            Tensor::ones(6, DType::F32, &dev)?,
            Tensor::zeros(6, DType::F32, &dev)?,
            1e-5,
        )
        .forward(&x)?;
        let diff = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let grads = (y.sqr()?.sum_all()? + y.sum_all()?)?.backward()?;
        for v in vm.all_vars() {
            let g = grads
                .get(&v)
                .expect("gradient for every LayerNorm parameter");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        assert!(grads.get(&x).is_some());
        Ok(())
    }

    #[test]
    fn tokens_round_trip() -> Result<()> {
        let x = Tensor::arange(0f32, 2. * 3. * 4. * 5., &Device::Cpu)?.reshape((2, 3, 4, 5))?;
        let t = to_tokens(&x)?;
        assert_eq!(t.dims(), &[2, 20, 3]);
        let back = from_tokens(&t, 4, 5)?;
        let diff = (back - x)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
