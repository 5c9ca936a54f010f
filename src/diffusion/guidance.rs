//! Classifier-free guidance (Ho & Salimans 2022): the U-Net's conditional and unconditional
//! noise predictions, mixed.

use candle_core::Tensor;

use super::samplers::Denoiser;
use crate::cuda_graph::CapturedStep;
use crate::model::UNet;

/// A prompt encoded for guidance: the text head's context and the padding bias of the prompt
/// and of the negative (or empty) prompt, [2, T, D] and [2, 1, T].
pub struct Conditioning {
    pub(super) context: Tensor,
    pub(super) bias: Tensor,
}

/// Classifier-free guidance (Ho & Salimans 2022): ε̂ = ε_u + g (ε_c − ε_u), both in one batched
/// forward pass.
pub(super) struct Guided<'a> {
    unet: &'a UNet,
    /// [2, T, D]: the prompt's context, then the negative (or empty) prompt's.
    context: Tensor,
    /// [2, 1, T]
    bias: Tensor,
    guidance: f64,
    /// One forward pass per image (the CPU, where images must not depend on the batch), or one
    /// for the whole batch (CUDA, where batching is the speed).
    per_image: bool,
    /// For whole-batch passes: the context and bias repeated for the batch, [2B, T, D] and
    /// [2B, 1, T], laid out once rather than at every step.
    batched: Option<(Tensor, Tensor)>,
}

impl<'a> Guided<'a> {
    /// `batch`: the images each [`Denoiser::eps`] call gets.
    pub(super) fn new(
        unet: &'a UNet,
        cond: &Conditioning,
        guidance: f64,
        per_image: bool,
        batch: usize,
    ) -> candle_core::Result<Self> {
        let batched = if per_image || batch == 1 {
            None
        } else {
            Some((
                repeat_rows(&cond.context, batch)?,
                repeat_rows(&cond.bias, batch)?,
            ))
        };
        Ok(Self {
            unet,
            context: cond.context.clone(),
            bias: cond.bias.clone(),
            guidance,
            per_image,
            batched,
        })
    }
}

impl Guided<'_> {
    /// ε̂ for one image `x` [1, C, h, w]: its conditional and unconditional passes as a batch of 2.
    fn eps_one(&self, x: &Tensor, t: usize) -> candle_core::Result<Tensor> {
        let ts = Tensor::full(t as f32, 2, x.device())?;
        guide(self.unet, x, &ts, &self.context, &self.bias, self.guidance)
    }

    /// ε̂ for a batch `x` [B, C, h, w] in one forward pass of 2B (conditional, then
    /// unconditional), with the contexts laid out by [`Guided::new`].
    fn eps_batch(&self, x: &Tensor, t: usize) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let Some((ctx, bias)) = self.batched.as_ref().filter(|(c, _)| c.dims()[0] == 2 * b) else {
            return self.eps_one(x, t);
        };
        let ts = Tensor::full(t as f32, 2 * b, x.device())?;
        guide(self.unet, x, &ts, ctx, bias, self.guidance)
    }
}

/// ε̂ = ε_u + g (ε_c − ε_u) for `x` [B, C, h, w] from one forward pass of 2B (conditional rows,
/// then unconditional): timesteps `ts` [2B], context [2B, T, D], padding bias [2B, 1, T]. At
/// guidance 1 ε̂ is ε_c: one pass of the B conditional rows.
fn guide(
    unet: &UNet,
    x: &Tensor,
    ts: &Tensor,
    context: &Tensor,
    bias: &Tensor,
    guidance: f64,
) -> candle_core::Result<Tensor> {
    let b = x.dim(0)?;
    if guidance == 1.0 {
        let rows = |t: &Tensor| t.narrow(0, 0, b);
        return unet.forward(x, &rows(ts)?, &rows(context)?, Some(&rows(bias)?));
    }
    let eps = unet.forward(&Tensor::cat(&[x, x], 0)?, ts, context, Some(bias))?;
    let (c, u) = (eps.narrow(0, 0, b)?, eps.narrow(0, b, b)?);
    &u + ((c - &u)? * guidance)?
}

/// The guided ε̂ as a function of fixed-shape inputs, for a
/// [`CapturedStep`]: `[x [B, C, h, w], ts [2B] F32, context [2, T, D], bias [2, 1, T]]` → ε̂
/// [B, C, h, w], with `ts` the timestep of each row of the doubled batch (conditional rows, then
/// unconditional) and the conditioning of [`Conditioning::step_inputs`]. The timesteps and the
/// conditioning are inputs, not constants, so that one captured graph serves every step and
/// every prompt of its shapes. The same kernels as the eager guidance on CUDA.
pub fn guided_step(
    unet: &UNet,
    guidance: f64,
) -> impl Fn(&[Tensor]) -> candle_core::Result<Tensor> + '_ {
    move |inputs: &[Tensor]| match inputs {
        [x, ts, context, bias] => {
            let b = x.dim(0)?;
            let (context, bias) = (repeat_rows(context, b)?, repeat_rows(bias, b)?);
            guide(unet, x, ts, &context, &bias, guidance)
        }
        _ => candle_core::bail!(
            "the guided step takes [x, timesteps, context, bias], got {} inputs",
            inputs.len()
        ),
    }
}

impl Conditioning {
    /// The inputs of [`guided_step`] for the latents `x` [B, C, h, w] at timestep `t`.
    pub fn step_inputs(&self, x: &Tensor, t: usize) -> candle_core::Result<[Tensor; 4]> {
        Ok([
            x.clone(),
            Tensor::full(t as f32, 2 * x.dim(0)?, x.device())?,
            self.context.clone(),
            self.bias.clone(),
        ])
    }
}

/// ε̂ of a [`guided_step`] replayed by a [`CapturedStep`] (from a CUDA graph on CUDA) for one
/// prompt's conditioning.
pub struct CapturedGuided<'s, 'a> {
    pub step: &'s CapturedStep<'a>,
    pub cond: &'s Conditioning,
}

impl Denoiser for CapturedGuided<'_, '_> {
    fn eps(&mut self, x: &Tensor, t: usize) -> candle_core::Result<Tensor> {
        self.step.run(&self.cond.step_inputs(x, t)?)
    }
}

/// [2, ...] → [2b, ...]: b copies of the first row, then b of the second.
fn repeat_rows(t: &Tensor, b: usize) -> candle_core::Result<Tensor> {
    let mut shape = t.dims().to_vec();
    shape[0] = b;
    Tensor::cat(
        &[
            t.narrow(0, 0, 1)?.broadcast_as(shape.clone())?,
            t.narrow(0, 1, 1)?.broadcast_as(shape)?,
        ],
        0,
    )?
    .contiguous()
}

impl Denoiser for Guided<'_> {
    /// On the CPU each image gets its own forward pass: matrix products there round differently
    /// when more rows share them, and an image must not depend on the batch it is in.
    fn eps(&mut self, x: &Tensor, t: usize) -> candle_core::Result<Tensor> {
        if !self.per_image {
            return self.eps_batch(x, t);
        }
        let parts = (0..x.dim(0)?)
            .map(|i| self.eps_one(&x.narrow(0, i, 1)?, t))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Result;
    use candle_core::{Device, Module};
    use candle_nn::VarMap;

    use crate::config::Config;
    use crate::model::attention::padding_bias;
    use crate::model::{diffusion_networks, seeded_var_builder, TextEncoder};

    #[test]
    fn batched_guidance_equals_one_pass_per_image() -> Result<()> {
        // CUDA samples a batch in one U-Net pass, the CPU image by image: same ε̂ up to rounding.
        let cfg = Config::load("tiny")?;
        let dev = Device::Cpu;
        let text = TextEncoder::load(&cfg.text, &dev)?;
        let (unet, head) = diffusion_networks(
            &cfg,
            text.hidden_size(),
            seeded_var_builder(&VarMap::new(), 4, &dev),
        )?;
        let (hidden, mask) = text.encode(&["Cardiomegaly.", ""], &dev)?;
        let z = cfg.latent_size();
        let x = Tensor::randn(0f32, 1., (3, cfg.vae.latent_channels, z, z), &dev)?;
        for guidance in [1.0, 3.0] {
            let cond = Conditioning {
                context: head.forward(&hidden)?,
                bias: padding_bias(&mask)?,
            };
            let eps = |per_image| Guided::new(&unet, &cond, guidance, per_image, 3)?.eps(&x, 500);
            let (a, b) = (eps(true)?, eps(false)?);
            let d = (a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "guidance {guidance}: {d}");
            // What a CUDA graph replays (the timesteps and the conditioning inputs, not
            // constants) is the batched guidance exactly, and CapturedStep's CPU path is the
            // step itself.
            let step = guided_step(&unet, guidance);
            let inputs = cond.step_inputs(&x, 500)?;
            let captured = CapturedStep::new(&step, &inputs)?;
            assert!(!captured.is_graph());
            let mut replayed = CapturedGuided {
                step: &captured,
                cond: &cond,
            };
            for got in [
                step(&inputs)?,
                captured.run(&inputs)?,
                replayed.eps(&x, 500)?,
            ] {
                let d = (got - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert_eq!(d, 0.0, "guidance {guidance}");
            }
        }
        Ok(())
    }
}
