//! Text → image: encode the prompt once, run a sampler with classifier-free guidance on the
//! U-Net, decode the latent with the VAE.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use sha2::{Digest, Sha256};

use super::samplers::{sample, ClampX0, Denoiser, ImageNoise, SamplerOptions};
use super::schedule::NoiseSchedule;
use crate::checkpoint::{Checkpoint, Pick, Stage, TrainedVae, EMA, MODEL};
use crate::config::{Config, Precision};
use crate::model::attention::padding_bias;
use crate::model::{weights, TextEncoder, TextHead, UNet, Vae};

/// A trained latent diffusion model, ready to sample.
pub struct Pipeline {
    pub config: Config,
    unet: UNet,
    head: TextHead,
    text: TextEncoder,
    vae: Vae,
    vae_half: Option<Vae>,
    latent_scale: f64,
    latent_range: Option<(f64, f64)>,
    device: Device,
    /// SHA-256 of the weights file sampled from (for the images' metadata).
    pub weights_sha256: String,
    /// The checkpoint folder.
    pub source: PathBuf,
}

/// The modules that sample, borrowed: from a checkpoint ([`Pipeline`]) or from a training run
/// (sample grids).
pub struct Parts<'a> {
    pub config: &'a Config,
    pub unet: &'a UNet,
    pub head: &'a TextHead,
    pub text: &'a TextEncoder,
    /// The VAE in F32.
    pub vae: &'a Vae,
    /// The VAE in half precision, tried first when present; an image it decodes to NaN or
    /// infinity (F16 overflows in the decoder's activations) is decoded again by `vae`.
    pub vae_half: Option<&'a Vae>,
    pub latent_scale: f64,
    /// Clean estimates are clipped to this range during sampling (None: no clipping).
    pub latent_range: Option<(f64, f64)>,
    pub device: &'a Device,
}

/// A prompt encoded for guidance: the text head's context and the padding bias of the prompt
/// and of the negative (or empty) prompt, [2, T, D] and [2, 1, T].
pub struct Conditioning {
    context: Tensor,
    bias: Tensor,
}

impl Parts<'_> {
    /// Encodes `prompt` and `negative` (which replaces the empty prompt of the unconditional
    /// branch) once, for any number of [`Parts::sample`] calls.
    pub fn condition(&self, prompt: &str, negative: &str) -> Result<Conditioning> {
        let (hidden, mask) = self.text.encode(&[prompt, negative], self.device)?;
        Ok(Conditioning {
            context: self.head.forward(&hidden)?,
            bias: padding_bias(&mask)?,
        })
    }

    /// Images for one prompt, one per seed: `image_size`² intensities in [0, 1] each.
    /// `on_step` is called after every sampling step.
    pub fn sample(
        &self,
        cond: &Conditioning,
        seeds: &[u64],
        opts: &SamplerOptions,
        guidance: f64,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let latents = self.denoise(cond, seeds, opts, guidance, on_step)?;
        // A NaN or infinity anywhere would decode to a flat or garbage image: refuse instead.
        let total = latents
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if !total.is_finite() {
            bail!(
                "sampling produced non-finite latents (seeds {seeds:?}); in F16 the U-Net can overflow: try --precision bf16 or f32"
            );
        }
        self.decode_images(&latents)
    }

    /// The sampled latents, one per seed: [B, C, h, w] in the diffusion model's scale.
    pub fn denoise(
        &self,
        cond: &Conditioning,
        seeds: &[u64],
        opts: &SamplerOptions,
        guidance: f64,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        let mut guided = Guided::new(self.unet, cond, guidance, self.device.is_cpu(), seeds.len())?;
        let c = self.config.vae.latent_channels;
        let z = self.config.latent_size();
        let mut noise = ImageNoise::new(seeds, (c, z, z), self.device);
        let schedule = NoiseSchedule::new(&self.config.diffusion);
        Ok(match self.latent_range {
            Some((lo, hi)) => {
                let mut clamped = ClampX0 {
                    inner: guided,
                    alphas_cumprod: &schedule.alphas_cumprod,
                    range: (lo as f32, hi as f32),
                };
                sample(&mut clamped, &schedule, opts, &mut noise, on_step)?
            }
            None => sample(&mut guided, &schedule, opts, &mut noise, on_step)?,
        })
    }

    /// Latents from [`Parts::denoise`] → images: `image_size`² intensities in [0, 1] each.
    pub fn decode_images(&self, latents: &Tensor) -> Result<Vec<Vec<f32>>> {
        let n = latents.dim(0)?;
        // One image at a time, for the same reason as the denoiser.
        let latents = (latents / self.latent_scale)?;
        let decoded = (0..n)
            .map(|i| self.decode(&latents.narrow(0, i, 1)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let images = Tensor::cat(&decoded, 0)?;
        let images = ((images.clamp(-1f32, 1f32)? + 1.0)? * 0.5)?.to_dtype(DType::F32)?;
        (0..n)
            .map(|i| Ok(images.get(i)?.flatten_all()?.to_vec1::<f32>()?))
            .collect()
    }

    /// [`Parts::condition`] then [`Parts::sample`].
    pub fn generate(
        &self,
        prompt: &str,
        negative: &str,
        seeds: &[u64],
        opts: &SamplerOptions,
        guidance: f64,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let cond = self.condition(prompt, negative)?;
        self.sample(&cond, seeds, opts, guidance, on_step)
    }
}

impl Parts<'_> {
    /// [1, C, h, w] unscaled latent → [1, 1, H, W] in F32.
    fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(half) = self.vae_half {
            let image = half.decode(z)?;
            let total = image.sum_all()?.to_scalar::<f32>()?;
            if total.is_finite() {
                return Ok(image);
            }
        }
        self.vae.decode(z)
    }
}

/// Classifier-free guidance (Ho & Salimans 2022): ε̂ = ε_u + g (ε_c − ε_u), both in one batched
/// forward pass.
struct Guided<'a> {
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
    fn new(
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
        if self.guidance == 1.0 {
            let ts = Tensor::full(t as f32, 1, x.device())?;
            let (ctx, bias) = (self.context.narrow(0, 0, 1)?, self.bias.narrow(0, 0, 1)?);
            return self.unet.forward(x, &ts, &ctx, Some(&bias));
        }
        let ts = Tensor::full(t as f32, 2, x.device())?;
        let eps = self.unet.forward(
            &Tensor::cat(&[x, x], 0)?,
            &ts,
            &self.context,
            Some(&self.bias),
        )?;
        let (c, u) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
        &u + ((c - &u)? * self.guidance)?
    }
}

impl Guided<'_> {
    /// ε̂ for a batch `x` [B, C, h, w] in one forward pass of 2B (conditional, then
    /// unconditional), with the contexts laid out by [`Guided::new`].
    fn eps_batch(&self, x: &Tensor, t: usize) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let Some((ctx, bias)) = self.batched.as_ref().filter(|(c, _)| c.dims()[0] == 2 * b) else {
            return self.eps_one(x, t);
        };
        if self.guidance == 1.0 {
            let ts = Tensor::full(t as f32, b, x.device())?;
            return self
                .unet
                .forward(x, &ts, &ctx.narrow(0, 0, b)?, Some(&bias.narrow(0, 0, b)?));
        }
        let ts = Tensor::full(t as f32, 2 * b, x.device())?;
        let eps = self
            .unet
            .forward(&Tensor::cat(&[x, x], 0)?, &ts, ctx, Some(bias))?;
        let (c, u) = (eps.narrow(0, 0, b)?, eps.narrow(0, b, b)?);
        &u + ((c - &u)? * self.guidance)?
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

impl Pipeline {
    /// From a `train-diffusion` run folder (its best checkpoint, else its last) or a checkpoint
    /// folder; `ema`: sample with the EMA weights (the default) rather than the raw ones;
    /// `precision`: what the U-Net, the text head and (with an F32 fallback) the VAE compute in.
    pub fn load(path: &Path, ema: bool, device: &Device, precision: Precision) -> Result<Self> {
        let ckpt = Checkpoint::resolve(path, Pick::BestElseLast)
            .and_then(|c| c.of_stage(Stage::Diffusion))
            .with_context(|| format!("--checkpoint {}", path.display()))?;
        let cfg = ckpt.state.config.clone();
        let weights_path = ckpt.dir.join(if ema { EMA } else { MODEL });
        let bytes = std::fs::read(&weights_path)
            .with_context(|| format!("cannot read {}", weights_path.display()))?;
        let weights_sha256 = format!("{:x}", Sha256::digest(&bytes));
        let vb = weights::from_bytes(&bytes, precision.dtype(), device)
            .with_context(|| format!("{} is not a safetensors file", weights_path.display()))?;
        let text = TextEncoder::load(&cfg.text, device)?;
        let unet = UNet::new(
            &cfg.unet,
            cfg.vae.latent_channels,
            cfg.text.context_dim,
            vb.pp("unet"),
        )
        .with_context(|| {
            format!(
                "{} does not match the U-Net of its config ({})",
                weights_path.display(),
                "unet section"
            )
        })?;
        let head = TextHead::new(text.hidden_size(), cfg.text.context_dim, vb.pp("text_head"))
            .with_context(|| format!("{} does not match the text head of its config (text.context_dim = {}, encoder hidden size {})", weights_path.display(), cfg.text.context_dim, text.hidden_size()))?;
        let vae = TrainedVae::carried_by(&ckpt, &cfg.vae, device)?;
        let vae_half = match precision {
            Precision::F32 => None,
            p => Some(vae.in_dtype(&cfg.vae, p.dtype(), device)?),
        };
        Ok(Self {
            config: cfg,
            unet,
            head,
            text,
            vae: vae.vae,
            vae_half,
            latent_scale: vae.latents.scale,
            latent_range: vae.latents.range,
            device: device.clone(),
            weights_sha256,
            source: ckpt.dir,
        })
    }

    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text
    }

    /// The modules, for [`Parts::generate`].
    pub fn parts(&self) -> Parts<'_> {
        Parts {
            config: &self.config,
            unet: &self.unet,
            head: &self.head,
            text: &self.text,
            vae: &self.vae,
            vae_half: self.vae_half.as_ref(),
            latent_scale: self.latent_scale,
            latent_range: self.latent_range,
            device: &self.device,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{diffusion_networks, seeded_var_builder};
    use candle_nn::VarMap;

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
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "guidance {guidance}: {d}");
        }
        Ok(())
    }

    #[test]
    fn non_finite_latents_are_an_error_not_an_image() -> Result<()> {
        let cfg = Config::load("tiny")?;
        let dev = Device::Cpu;
        let text = TextEncoder::load(&cfg.text, &dev)?;
        let weights = VarMap::new();
        let (unet, head) = diffusion_networks(
            &cfg,
            text.hidden_size(),
            seeded_var_builder(&weights, 4, &dev),
        )?;
        let vae = Vae::new(&cfg.vae, seeded_var_builder(&VarMap::new(), 5, &dev))?;
        // An overflowed output layer, as F16 can produce.
        let bias = weights.data().lock().unwrap()["unet.conv_out.bias"].clone();
        bias.set(&Tensor::full(f32::NAN, bias.shape(), &dev)?)?;
        let parts = Parts {
            config: &cfg,
            unet: &unet,
            head: &head,
            text: &text,
            vae: &vae,
            vae_half: None,
            latent_scale: 1.0,
            latent_range: None,
            device: &dev,
        };
        let opts = SamplerOptions {
            kind: super::super::SamplerKind::Ddim,
            steps: 2,
            eta: 0.0,
        };
        let e = parts
            .generate("Cardiomegaly.", "", &[0], &opts, 3.0, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("non-finite latents") && e.contains("--precision"),
            "{e}"
        );
        Ok(())
    }
}
