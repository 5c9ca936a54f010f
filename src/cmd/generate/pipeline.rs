//! A trained latent diffusion model read from a `train-diffusion` checkpoint, ready to sample.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, Pick, Stage, TrainedVae, EMA, MODEL};
use crate::config::{Config, Precision};
use crate::diffusion::{LatentDiffusion, Networks};
use crate::model::{weights, TextEncoder};

/// A trained latent diffusion model: its config, text encoder, networks and schedule.
pub struct Pipeline {
    pub config: Config,
    pub text: TextEncoder,
    pub networks: Networks,
    pub diffusion: LatentDiffusion,
    /// SHA-256 of the weights file sampled from (for the images' metadata).
    pub weights_sha256: String,
    /// The checkpoint folder it was read from.
    pub source: PathBuf,
}

impl Pipeline {
    /// From a `train-diffusion` run folder (its best checkpoint, else its last) or a checkpoint
    /// folder; `ema`: sample with the EMA weights (the default) rather than the raw ones;
    /// `precision`: what the U-Net, the text head and (with an F32 fallback) the VAE compute in.
    pub fn load(path: &Path, ema: bool, device: &Device, precision: Precision) -> Result<Self> {
        let ckpt = Checkpoint::resolve(path, Pick::BestElseLast)
            .and_then(|c| c.of_stage(Stage::Diffusion))
            .with_context(|| format!("--checkpoint {}", path.display()))?;
        let config = ckpt.state.config.clone();
        let weights_path = ckpt.dir.join(if ema { EMA } else { MODEL });
        let bytes = std::fs::read(&weights_path)
            .with_context(|| format!("cannot read {}", weights_path.display()))?;
        let weights_sha256 = format!("{:x}", Sha256::digest(&bytes));
        let vb = weights::from_bytes(&bytes, precision.dtype(), device)
            .with_context(|| format!("{} is not a safetensors file", weights_path.display()))?;
        let text = TextEncoder::load(&config.text, device)?;
        let vae = TrainedVae::carried_by(&ckpt, &config.vae, device)?;
        let vae_half = match precision {
            Precision::F32 => None,
            p => Some(vae.in_dtype(&config.vae, p.dtype(), device)?),
        };
        let networks = Networks::new(&config, text.hidden_size(), vb, vae.vae, vae_half)
            .with_context(|| {
                format!(
                    "{} does not match the U-Net and text head of its config (text.context_dim = {}, encoder hidden size {})",
                    weights_path.display(),
                    config.text.context_dim,
                    text.hidden_size()
                )
            })?;
        let diffusion = LatentDiffusion::new(&config, vae.latents);
        Ok(Self {
            config,
            text,
            networks,
            diffusion,
            weights_sha256,
            source: ckpt.dir,
        })
    }
}
