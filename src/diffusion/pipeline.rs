//! Text → image: encode the prompt once, run a sampler with classifier-free guidance on the
//! U-Net, decode the latent with the VAE.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

use super::samplers::{sample, Denoiser, ImageNoise, SamplerOptions};
use super::schedule::NoiseSchedule;
use crate::config::Config;
use crate::model::attention::padding_bias;
use crate::model::{TextEncoder, TextHead, UNet, Vae};
use crate::train::checkpoint::{self, TrainState, EMA, MODEL};
use crate::train::stages::{TrainedVae, VAE_FILE};

/// A trained latent diffusion model, ready to sample.
pub struct Pipeline {
    pub config: Config,
    unet: UNet,
    head: TextHead,
    text: TextEncoder,
    vae: Vae,
    latent_scale: f64,
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
    pub vae: &'a Vae,
    pub latent_scale: f64,
    pub device: &'a Device,
}

impl Parts<'_> {
    /// Images for one prompt, one per seed: `image_size`² intensities in [0, 1] each. `negative`
    /// replaces the empty prompt of the unconditional branch. `on_step` is called after every
    /// sampling step.
    pub fn generate(
        &self,
        prompt: &str,
        negative: &str,
        seeds: &[u64],
        opts: &SamplerOptions,
        guidance: f64,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let (hidden, mask) = self.text.encode(&[prompt, negative], self.device)?;
        let context = self.head.forward(&hidden)?;
        let bias = padding_bias(&mask)?;
        let mut denoiser = Guided {
            unet: self.unet,
            context,
            bias,
            guidance,
        };
        let c = self.config.vae.latent_channels;
        let z = self.config.latent_size();
        let mut noise = ImageNoise::new(seeds, (c, z, z), self.device);
        let schedule = NoiseSchedule::new(&self.config.diffusion);
        let latents = sample(&mut denoiser, &schedule, opts, &mut noise, on_step)?;
        let images = self.vae.decode(&(latents / self.latent_scale)?)?;
        let images = ((images.clamp(-1f32, 1f32)? + 1.0)? * 0.5)?.to_dtype(DType::F32)?;
        (0..seeds.len())
            .map(|i| Ok(images.get(i)?.flatten_all()?.to_vec1::<f32>()?))
            .collect()
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
}

impl Guided<'_> {
    /// Row `k` of `t` repeated `b` times.
    fn rows(t: &Tensor, k: usize, b: usize) -> candle_core::Result<Tensor> {
        let row = t.narrow(0, k, 1)?;
        let mut dims = row.dims().to_vec();
        dims[0] = b;
        row.broadcast_as(dims)?.contiguous()
    }
}

impl Denoiser for Guided<'_> {
    fn eps(&mut self, x: &Tensor, t: usize) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let cond = (
            Self::rows(&self.context, 0, b)?,
            Self::rows(&self.bias, 0, b)?,
        );
        if self.guidance == 1.0 {
            let ts = Tensor::full(t as f32, b, x.device())?;
            return self.unet.forward(x, &ts, &cond.0, Some(&cond.1));
        }
        let uncond = (
            Self::rows(&self.context, 1, b)?,
            Self::rows(&self.bias, 1, b)?,
        );
        let x2 = Tensor::cat(&[x, x], 0)?;
        let ts = Tensor::full(t as f32, 2 * b, x.device())?;
        let ctx = Tensor::cat(&[&cond.0, &uncond.0], 0)?;
        let bias = Tensor::cat(&[&cond.1, &uncond.1], 0)?;
        let eps = self.unet.forward(&x2, &ts, &ctx, Some(&bias))?;
        let (c, u) = (eps.narrow(0, 0, b)?, eps.narrow(0, b, b)?);
        &u + ((c - &u)? * self.guidance)?
    }
}

impl Pipeline {
    /// From a `train-diffusion` run folder (its best checkpoint, else its last) or a checkpoint
    /// folder; `ema`: sample with the EMA weights (the default) rather than the raw ones.
    pub fn load(path: &Path, ema: bool, device: &Device) -> Result<Self> {
        let (dir, state): (PathBuf, TrainState) = if path.join(checkpoint::STATE).is_file() {
            (path.to_path_buf(), checkpoint::read_state(path)?)
        } else if path.join(checkpoint::CHECKPOINTS).is_dir() {
            checkpoint::resolve(path, checkpoint::BEST)
                .or_else(|_| checkpoint::resolve(path, checkpoint::LAST))?
        } else {
            bail!("--checkpoint {}: not a train-diffusion run folder nor a checkpoint folder (no checkpoints/ or state.json)", path.display());
        };
        if state.stage != "diffusion" {
            bail!(
                "--checkpoint {}: a {} checkpoint; generation needs a train-diffusion checkpoint",
                dir.display(),
                state.stage
            );
        }
        let cfg = state.config.clone();
        let weights_path = dir.join(if ema { EMA } else { MODEL });
        let bytes = std::fs::read(&weights_path)
            .with_context(|| format!("cannot read {}", weights_path.display()))?;
        let weights_sha256 = format!("{:x}", Sha256::digest(&bytes));
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .with_context(|| format!("{} is not a safetensors file", weights_path.display()))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
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
        let vae = TrainedVae::carried_by(&dir, &cfg, device)
            .with_context(|| format!("the checkpoint's {VAE_FILE}"))?;
        Ok(Self {
            config: cfg,
            unet,
            head,
            text,
            vae: vae.vae,
            latent_scale: vae.latent_scale,
            device: device.clone(),
            weights_sha256,
            source: dir,
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
            latent_scale: self.latent_scale,
            device: &self.device,
        }
    }
}
