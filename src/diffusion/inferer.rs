//! The latent diffusion model as one object, after MONAI's `LatentDiffusionInferer`: it holds the
//! noise schedule and the latents' scale and range, and owns the training loss (noise a latent,
//! predict the noise) and sampling (denoise with guidance, then decode with the VAE). Training,
//! `generate`, `bench` and `check-device` all go through it.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::guidance::{Conditioning, Guided};
use super::samplers::{sample, ClampX0, Denoiser, ImageNoise, SamplerOptions};
use super::schedule::NoiseSchedule;
use crate::config::Config;
use crate::model::attention::padding_bias;
use crate::model::latents::LatentStats;
use crate::model::{diffusion_networks, TextEncoder, TextHead, UNet, Vae};

/// The networks a latent diffusion model samples with (the frozen text encoder aside).
pub struct Networks {
    pub unet: UNet,
    pub head: TextHead,
    /// The VAE in F32.
    pub vae: Vae,
    /// The VAE in half precision, tried first when present; an image it decodes to NaN or
    /// infinity (F16 overflows in the decoder's activations) is decoded again by `vae`.
    pub vae_half: Option<Vae>,
    pub device: Device,
}

impl Networks {
    /// The U-Net (`unet.`) and the text head (`text_head.`) of `cfg` from `weights`, for a text
    /// encoder `text_hidden` wide, with a trained VAE.
    pub fn new(
        cfg: &Config,
        text_hidden: usize,
        weights: VarBuilder,
        vae: Vae,
        vae_half: Option<Vae>,
    ) -> candle_core::Result<Self> {
        let device = weights.device().clone();
        let (unet, head) = diffusion_networks(cfg, text_hidden, weights)?;
        Ok(Self {
            unet,
            head,
            vae,
            vae_half,
            device,
        })
    }

    /// [1, C, h, w] unscaled latent → [1, 1, H, W] in F32.
    fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(half) = &self.vae_half {
            let image = half.decode(z)?;
            let total = image.sum_all()?.to_scalar::<f32>()?;
            if total.is_finite() {
                return Ok(image);
            }
        }
        self.vae.decode(z)
    }
}

/// The schedule and the latent statistics of a latent diffusion model.
pub struct LatentDiffusion {
    schedule: NoiseSchedule,
    latents: LatentStats,
    /// (C, h, w) of one latent.
    latent_shape: (usize, usize, usize),
}

impl LatentDiffusion {
    /// The model `cfg` describes, on latents with the statistics `latents`.
    pub fn new(cfg: &Config, latents: LatentStats) -> Self {
        let z = cfg.latent_size();
        Self {
            schedule: NoiseSchedule::new(&cfg.diffusion),
            latents,
            latent_shape: (cfg.vae.latent_channels, z, z),
        }
    }

    /// Samples without clipping the clean-latent estimates (`generate --no-clip`).
    pub fn without_clip(mut self) -> Self {
        self.latents.range = None;
        self
    }

    /// The number of diffusion timesteps.
    pub fn timesteps(&self) -> usize {
        self.schedule.timesteps()
    }

    /// VAE latents [B, C, h, w] → the diffusion model's latents (unit variance).
    pub fn scale(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        z * self.latents.scale
    }

    /// The training loss: epsilon-prediction squared error, each sample at its own timestep,
    /// averaged over the batch, each sample weighted by min(SNR_t, γ) / SNR_t when `snr_gamma`
    /// is given (Min-SNR-γ), else equally. Returns (the loss, the unweighted MSE).
    ///
    /// `latents`: scaled VAE latents [B, C, h, w]; `t`: B timesteps; `noise`: [B, C, h, w];
    /// `text_hidden`: frozen encoder states [B, T, H]; `text_mask`: [B, T] (1 = token, 0 =
    /// padding).
    #[allow(clippy::too_many_arguments)]
    pub fn loss(
        &self,
        unet: &UNet,
        head: &TextHead,
        latents: &Tensor,
        t: &[usize],
        noise: &Tensor,
        text_hidden: &Tensor,
        text_mask: &Tensor,
        snr_gamma: Option<f64>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let noisy = self.schedule.add_noise(latents, noise, t)?;
        let t_tensor = Tensor::from_vec(
            t.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            t.len(),
            latents.device(),
        )?;
        let context = head.forward(text_hidden)?;
        let bias = padding_bias(text_mask)?;
        let eps = unet.forward(&noisy, &t_tensor, &context, Some(&bias))?;
        let per_sample = (eps - noise)?.sqr()?.flatten_from(1)?.mean(1)?;
        let mse = per_sample.mean_all()?;
        let loss = match snr_gamma {
            None => mse.clone(),
            Some(gamma) => {
                let w: Vec<f32> = t
                    .iter()
                    .map(|&i| {
                        let snr = self.schedule.snr(i);
                        (snr.min(gamma) / snr) as f32
                    })
                    .collect();
                let w =
                    Tensor::from_vec(w, t.len(), latents.device())?.to_dtype(per_sample.dtype())?;
                (per_sample * w)?.mean_all()?
            }
        };
        Ok((loss, mse))
    }

    /// Encodes `prompt` and `negative` (which replaces the empty prompt of the unconditional
    /// branch) once, for any number of [`LatentDiffusion::sample`] calls.
    pub fn condition(
        &self,
        text: &TextEncoder,
        nets: &Networks,
        prompt: &str,
        negative: &str,
    ) -> Result<Conditioning> {
        let (hidden, mask) = text.encode(&[prompt, negative], &nets.device)?;
        Ok(Conditioning {
            context: nets.head.forward(&hidden)?,
            bias: padding_bias(&mask)?,
        })
    }

    /// Images for one prompt, one per seed: `image_size`² intensities in [0, 1] each.
    /// `on_step` is called after every sampling step.
    pub fn sample(
        &self,
        nets: &Networks,
        cond: &Conditioning,
        seeds: &[u64],
        opts: &SamplerOptions,
        guidance: f64,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let guided = Self::guided(nets, cond, guidance, seeds.len())?;
        self.sample_with(nets, guided, seeds, opts, on_step)
    }

    /// [`LatentDiffusion::sample`] with another noise predictor, e.g. a
    /// [`super::CapturedGuided`] step replayed from a CUDA graph.
    pub fn sample_with(
        &self,
        nets: &Networks,
        denoiser: impl Denoiser,
        seeds: &[u64],
        opts: &SamplerOptions,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let latents = self.denoise_with(&nets.device, denoiser, seeds, opts, on_step)?;
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
        self.decode(nets, &latents)
    }

    /// The sampled latents, one per seed: [B, C, h, w] in the diffusion model's scale.
    pub fn denoise(
        &self,
        nets: &Networks,
        cond: &Conditioning,
        seeds: &[u64],
        opts: &SamplerOptions,
        guidance: f64,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        let guided = Self::guided(nets, cond, guidance, seeds.len())?;
        self.denoise_with(&nets.device, guided, seeds, opts, on_step)
    }

    /// The U-Net's guided noise prediction for batches of `batch` images: image by image on the
    /// CPU, the whole batch in one pass elsewhere.
    fn guided<'a>(
        nets: &'a Networks,
        cond: &Conditioning,
        guidance: f64,
        batch: usize,
    ) -> candle_core::Result<Guided<'a>> {
        Guided::new(&nets.unet, cond, guidance, nets.device.is_cpu(), batch)
    }

    /// [`LatentDiffusion::denoise`] with any noise predictor, on `device`.
    pub fn denoise_with(
        &self,
        device: &Device,
        mut denoiser: impl Denoiser,
        seeds: &[u64],
        opts: &SamplerOptions,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        let mut noise = ImageNoise::new(seeds, self.latent_shape, device);
        let schedule = &self.schedule;
        Ok(match self.latents.range {
            Some((lo, hi)) => {
                let mut clamped = ClampX0 {
                    inner: denoiser,
                    alphas_cumprod: &schedule.alphas_cumprod,
                    range: (lo as f32, hi as f32),
                };
                sample(&mut clamped, schedule, opts, &mut noise, on_step)?
            }
            None => sample(&mut denoiser, schedule, opts, &mut noise, on_step)?,
        })
    }

    /// Latents from [`LatentDiffusion::denoise`] → images: `image_size`² intensities in [0, 1]
    /// each.
    pub fn decode(&self, nets: &Networks, latents: &Tensor) -> Result<Vec<Vec<f32>>> {
        let n = latents.dim(0)?;
        // One image at a time, for the same reason as the denoiser.
        let latents = (latents / self.latents.scale)?;
        let decoded = (0..n)
            .map(|i| nets.decode(&latents.narrow(0, i, 1)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let images = Tensor::cat(&decoded, 0)?;
        let images = ((images.clamp(-1f32, 1f32)? + 1.0)? * 0.5)?.to_dtype(DType::F32)?;
        (0..n)
            .map(|i| Ok(images.get(i)?.flatten_all()?.to_vec1::<f32>()?))
            .collect()
    }

    /// [`LatentDiffusion::condition`] then [`LatentDiffusion::sample`].
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        text: &TextEncoder,
        nets: &Networks,
        prompt: &str,
        negative: &str,
        seeds: &[u64],
        opts: &SamplerOptions,
        guidance: f64,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let cond = self.condition(text, nets, prompt, negative)?;
        self.sample(nets, &cond, seeds, opts, guidance, on_step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::SamplerKind;
    use crate::model::seeded_var_builder;
    use candle_nn::VarMap;

    #[test]
    fn non_finite_latents_are_an_error_not_an_image() -> Result<()> {
        let cfg = Config::load("tiny")?;
        let dev = Device::Cpu;
        let text = TextEncoder::load(&cfg.text, &dev)?;
        let weights = VarMap::new();
        let vae = Vae::new(&cfg.vae, seeded_var_builder(&VarMap::new(), 5, &dev))?;
        let nets = Networks::new(
            &cfg,
            text.hidden_size(),
            seeded_var_builder(&weights, 4, &dev),
            vae,
            None,
        )?;
        // An overflowed output layer, as F16 can produce.
        let bias = weights.data().lock().unwrap()["unet.conv_out.bias"].clone();
        bias.set(&Tensor::full(f32::NAN, bias.shape(), &dev)?)?;
        let diffusion = LatentDiffusion::new(
            &cfg,
            LatentStats {
                scale: 1.0,
                range: None,
            },
        );
        let opts = SamplerOptions {
            kind: SamplerKind::Ddim,
            steps: 2,
            eta: 0.0,
        };
        let e = diffusion
            .generate(
                &text,
                &nets,
                "Cardiomegaly.",
                "",
                &[0],
                &opts,
                3.0,
                &mut |_| {},
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("non-finite latents") && e.contains("--precision"),
            "{e}"
        );
        Ok(())
    }
}
