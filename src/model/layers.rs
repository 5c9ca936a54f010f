//! Layers with candle-nn's parameter names and PyTorch's initialisation (or Kaiming's, by
//! [`InitScheme`]), written so that they train correctly: gradients that candle's fused kernels
//! would cut are kept, and under mixed precision normalisation statistics and parameter-gradient
//! sums stay in F32 ([`super::affine`]).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Init, VarBuilder};

use super::affine::add_bias;
use super::conv;
use super::kernels::bias::{add_bias_residual, add_bias_residual_from_tokens};
use super::kernels::{linear_cpu, norm, on_cpu_f32};

/// A 2-D convolution; the weight and the bias are cast to the input's dtype.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

/// How a layer's parameters start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitScheme {
    /// PyTorch's default for `nn.Conv2d` and `nn.Linear` (`kaiming_uniform_` with a = √5 for
    /// the weight, the bias alike): uniform in ±1/√fan_in. diffusers, whose U-Net the paper
    /// trained, keeps it. candle-nn's is √6 times wider, which makes every attention logit six
    /// times larger at the start and stalled the diffusion model's training (docs/training.md).
    Torch,
    /// candle-nn's: Kaiming-normal with the ReLU gain (He et al. 2015), the bias uniform in
    /// ±1/√(input channels). The usual start for a plain CNN, such as the alignment classifier.
    Kaiming,
}

impl InitScheme {
    /// (weight, bias) for a layer of `inputs` input channels and `fan_in` inputs per output.
    fn hints(self, inputs: usize, fan_in: usize) -> (Init, Init) {
        let uniform = |n: usize| {
            let bound = 1. / (n as f64).sqrt();
            Init::Uniform {
                lo: -bound,
                up: bound,
            }
        };
        match self {
            InitScheme::Torch => (uniform(fan_in), uniform(fan_in)),
            InitScheme::Kaiming => (candle_nn::init::DEFAULT_KAIMING_NORMAL, uniform(inputs)),
        }
    }
}

/// A convolution with candle-nn's parameter names (`weight` [C_out, C_in, k, k], `bias`) and
/// PyTorch's initialisation.
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    conv2d_init(in_c, out_c, kernel, config, InitScheme::Torch, vb)
}

/// [`conv2d`] with the initialisation `init`.
pub fn conv2d_init(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    config: Conv2dConfig,
    init: InitScheme,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let per_group = in_c / config.groups;
    let (w, b) = init.hints(in_c, per_group * kernel * kernel);
    Ok(Conv2d {
        weight: vb.get_with_hints((out_c, per_group, kernel, kernel), "weight", w)?,
        bias: Some(vb.get_with_hints(out_c, "bias", b)?),
        config,
    })
}

impl Conv2d {
    /// The convolution plus `bias` ([C_out], or [B, C_out] on the CPU in F32):
    /// [B, C_in, H, W] → [B, C_out, H', W'].
    fn convolve(&self, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let c = &self.config;
        if c.dilation != 1 || c.groups != 1 {
            candle_core::bail!("Conv2d supports dilation 1 and one group, not {c:?}");
        }
        let bias = bias.map(|b| b.to_dtype(xs.dtype())).transpose()?;
        let w = self.weight.to_dtype(xs.dtype())?;
        conv::conv2d(xs, &w, bias.as_ref(), c.padding, c.stride)
    }

    /// `forward(xs) + residual` ([B, C_out, H', W']), the bias and the residual added in one op.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let y = self.convolve(xs, None)?;
        match &self.bias {
            Some(b) => add_bias_residual(&y, b, 1, residual),
            None => y + residual,
        }
    }

    /// `forward(xs)` plus `shift` [B, C_out], one value per image and channel (a ResBlock's time
    /// embedding) → [B, C_out, H', W']. On the CPU in F32 the shift joins the bias inside the
    /// convolution; elsewhere it is added after it.
    pub fn forward_shifted(&self, xs: &Tensor, shift: &Tensor) -> Result<Tensor> {
        let shift = shift.to_dtype(xs.dtype())?;
        // The weight is cast to the input's dtype: the input decides where the bias goes.
        if on_cpu_f32(&[xs]) {
            let per_image = match &self.bias {
                Some(b) => shift.broadcast_add(&b.to_dtype(xs.dtype())?.unsqueeze(0)?)?,
                None => shift,
            };
            return self.convolve(xs, Some(&per_image));
        }
        let (n, c) = shift.dims2()?;
        self.forward(xs)?
            .broadcast_add(&shift.reshape((n, c, 1, 1))?)
    }
}

impl Module for Conv2d {
    /// [B, C_in, H, W] → [B, C_out, H', W'] in the input's dtype.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.convolve(xs, self.bias.as_ref())
    }
}

/// A linear layer; the weight and the bias are cast to the input's dtype.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// A linear layer with candle-nn's parameter names (`weight` [out, in], `bias`) and PyTorch's
/// initialisation.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_init(in_dim, out_dim, InitScheme::Torch, vb)
}

/// [`linear`] with the initialisation `init`.
pub fn linear_init(
    in_dim: usize,
    out_dim: usize,
    init: InitScheme,
    vb: VarBuilder,
) -> Result<Linear> {
    let (w, b) = init.hints(in_dim, in_dim);
    Ok(Linear {
        weight: vb.get_with_hints((out_dim, in_dim), "weight", w)?,
        bias: Some(vb.get_with_hints(out_dim, "bias", b)?),
    })
}

/// [`linear`] without a bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let (w, _) = InitScheme::Torch.hints(in_dim, in_dim);
    Ok(Linear {
        weight: vb.get_with_hints((out_dim, in_dim), "weight", w)?,
        bias: None,
    })
}

impl Linear {
    /// The product plus `bias` [out]: [..., in] → [..., out]. On the CPU in F32 one op with the
    /// bias inside ([`linear_cpu`]); elsewhere candle's matmul and [`add_bias`].
    fn apply(&self, xs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let w = self.weight.to_dtype(xs.dtype())?;
        let bias = bias.map(|b| b.to_dtype(xs.dtype())).transpose()?;
        if on_cpu_f32(&[xs, &w]) {
            return linear_cpu::linear(xs, &w, bias.as_ref());
        }
        let dims = xs.dims();
        let (rows, k) = (xs.elem_count() / dims[dims.len() - 1], dims[dims.len() - 1]);
        let mut out_shape = dims.to_vec();
        *out_shape.last_mut().expect("rank ≥ 1") = w.dim(0)?;
        // One 2-D matmul: a broadcast batched matmul is much slower on CPU and CUDA.
        let y = xs
            .contiguous()?
            .reshape((rows, k))?
            .matmul(&w.t()?)?
            .reshape(out_shape)?;
        match bias {
            Some(b) => add_bias(&y, &b, y.rank() - 1),
            None => Ok(y),
        }
    }

    /// `forward(xs)` plus `residual`, the bias and the residual added in one op: [..., out], or
    /// for [`Residual::Map`] the feature map [B, C, H, W] of token outputs [B, H·W, C].
    pub fn forward_add(&self, xs: &Tensor, residual: Residual) -> Result<Tensor> {
        let y = self.apply(xs, None)?;
        match (&self.bias, residual) {
            (Some(b), Residual::Same(r)) => add_bias_residual(&y, b, y.rank() - 1, r),
            (Some(b), Residual::Map(r)) => add_bias_residual_from_tokens(&y, b, r),
            (None, Residual::Same(r)) => y + r,
            (None, Residual::Map(r)) => y.transpose(1, 2)?.reshape(r.shape())? + r,
        }
    }
}

/// A residual added to a layer's output together with its bias.
#[derive(Debug, Clone, Copy)]
pub enum Residual<'a> {
    /// Of the output's shape.
    Same(&'a Tensor),
    /// A feature map [B, C, H, W] for an output of tokens [B, H·W, C]: the sum is a feature map.
    Map(&'a Tensor),
}

impl Module for Linear {
    /// [..., in] → [..., out] in the input's dtype.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, self.bias.as_ref())
    }
}

/// Group normalisation over [B, C, ...]; statistics in F32 whatever the input's dtype.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// candle-nn's `group_norm`: weight 1, bias 0.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", Init::Const(1.))?,
        bias: vb.get_with_hints(channels, "bias", Init::Const(0.))?,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// [B, C, ...] → [B, C, ...] in the input's dtype: the norm followed by SiLU, in one kernel.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        norm::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, true)
    }

    /// [B, C, H, W] → [B, H·W, C]: the norm of a feature map as tokens, in one kernel.
    pub fn forward_to_tokens(&self, xs: &Tensor) -> Result<Tensor> {
        norm::group_norm_to_tokens(xs, &self.weight, &self.bias, self.groups, self.eps)
    }
}

/// LayerNorm, one fused kernel with a backward pass ([`norm`]), its statistics in F32 whatever
/// the input's precision.
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
        norm::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    use crate::model::seeded_var_builder;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    #[test]
    fn kaiming_draws_what_candle_nn_draws_and_torch_stays_within_its_bound() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        // The same seed through candle-nn's constructors and ours: the same numbers.
        let (ours, theirs) = (VarMap::new(), VarMap::new());
        let c = conv2d_init(
            6,
            10,
            3,
            cfg,
            InitScheme::Kaiming,
            seeded_var_builder(&ours, 5, &dev).pp("c"),
        )?;
        let l = linear_init(
            12,
            7,
            InitScheme::Kaiming,
            seeded_var_builder(&ours, 6, &dev).pp("l"),
        )?;
        let cc = candle_nn::conv2d(6, 10, 3, cfg, seeded_var_builder(&theirs, 5, &dev).pp("c"))?;
        let cl = candle_nn::linear(12, 7, seeded_var_builder(&theirs, 6, &dev).pp("l"))?;
        let same = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) == 0.0;
        assert!(same(&c.weight, cc.weight()));
        assert!(same(c.bias.as_ref().unwrap(), cc.bias().unwrap()));
        assert!(same(&l.weight, cl.weight()));
        assert!(same(l.bias.as_ref().unwrap(), cl.bias().unwrap()));

        // PyTorch's: weight and bias within ±1/√fan_in, and spread over most of it.
        let vm = VarMap::new();
        let c = conv2d(6, 10, 3, cfg, seeded_var_builder(&vm, 5, &dev).pp("c"))?;
        let bound = 1.0 / (6.0f32 * 9.0).sqrt();
        for t in [&c.weight, c.bias.as_ref().unwrap()] {
            assert!(
                max_abs(t) <= bound && max_abs(t) > 0.8 * bound,
                "{}",
                max_abs(t)
            );
        }
        let l = linear_no_bias(12, 7, seeded_var_builder(&vm, 6, &dev).pp("l"))?;
        let bound = 1.0 / 12f32.sqrt();
        assert!(max_abs(&l.weight) <= bound && max_abs(&l.weight) > 0.8 * bound);
        Ok(())
    }

    /// A ResBlock's time embedding, one value per image and channel: inside the CPU
    /// convolution's bias, it gives what candle's convolution, bias and broadcast add give, and
    /// the same gradients for the input, the shift, the weight and the bias.
    #[test]
    fn a_shift_per_image_joins_the_bias_inside_the_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let c = conv2d(3, 4, 3, cfg, seeded_var_builder(&vm, 7, &dev).pp("c"))?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 5, 5), &dev)?)?;
        let shift = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 4), &dev)?)?;
        let bias = c.bias.as_ref().unwrap();
        let ours = c.forward_shifted(&x, &shift)?;
        let theirs = x
            .conv2d(&c.weight, 1, 1, 1, 1)?
            .broadcast_add(&bias.reshape((1, 4, 1, 1))?)?
            .broadcast_add(&shift.reshape((2, 4, 1, 1))?)?;
        let r = Tensor::randn(0f32, 1., ours.shape(), &dev)?;
        let (g_ours, g_theirs) = (
            (&ours * &r)?.sum_all()?.backward()?,
            (&theirs * &r)?.sum_all()?.backward()?,
        );
        assert!(max_abs(&(&ours - &theirs)?) < 1e-5);
        for (what, t) in [
            ("x", x.as_tensor()),
            ("shift", shift.as_tensor()),
            ("weight", &c.weight),
            ("bias", bias),
        ] {
            let d = max_abs(&(g_ours.get(t).unwrap() - g_theirs.get(t).unwrap())?);
            assert!(d < 1e-4, "{what}: {d}");
        }
        Ok(())
    }

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
}
