//! The trained VAE that a diffusion run learns the latents of, and that its checkpoints carry.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use super::{Checkpoint, Extras, Pick, Stage, MODEL, VAE_FILE};
use crate::config::VaeConfig;
use crate::model::latents::LatentStats;
use crate::model::{weights, Vae};

/// A trained VAE, in F32, with the statistics of its latents.
pub struct TrainedVae {
    pub vae: Vae,
    pub latents: LatentStats,
    /// The weights file as bytes, to be carried by diffusion checkpoints.
    pub bytes: Vec<u8>,
    /// The VAE checkpoint it came from.
    pub source: PathBuf,
}

impl TrainedVae {
    /// From a `train-vae` run folder (its best checkpoint, else its last) or checkpoint folder;
    /// it must have been trained with the `vae:` config section `cfg`.
    pub fn load(path: &Path, cfg: &VaeConfig, device: &Device) -> Result<Self> {
        let ckpt = Checkpoint::resolve(path, Pick::BestElseLast)?.of_stage(Stage::Vae)?;
        if ckpt.state.config.vae != *cfg {
            bail!(
                "the VAE in {} was trained with another `vae:` config section than this run's",
                ckpt.dir.display()
            );
        }
        Self::trained_in(&ckpt, device)
    }

    /// The VAE that the `train-vae` checkpoint `ckpt` holds (see [`Checkpoint::of_stage`]),
    /// built with the checkpoint's own `vae:` config section.
    pub fn trained_in(ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        let cfg = &ckpt.state.config.vae;
        Self::from_file(ckpt, MODEL, ckpt.dir.clone(), cfg, device)
    }

    /// The VAE a diffusion checkpoint carries (vae.safetensors, with its latent statistics in
    /// the checkpoint's state).
    pub fn carried_by(ckpt: &Checkpoint, cfg: &VaeConfig, device: &Device) -> Result<Self> {
        let source = ckpt
            .state
            .extra
            .as_ref()
            .and_then(|e| e.vae_source.clone())
            .unwrap_or_default();
        Self::from_file(ckpt, VAE_FILE, source, cfg, device)
            .with_context(|| format!("the checkpoint's {VAE_FILE}"))
    }

    fn from_file(
        ckpt: &Checkpoint,
        file: &str,
        source: PathBuf,
        cfg: &VaeConfig,
        device: &Device,
    ) -> Result<Self> {
        let path = ckpt.dir.join(file);
        let latents = ckpt
            .state
            .extra
            .as_ref()
            .map(|e| e.latents)
            .with_context(|| {
                format!("the checkpoint {} has no latent_scale", ckpt.dir.display())
            })?;
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let vae = vae_from(&bytes, cfg, DType::F32, device)
            .with_context(|| format!("{} does not hold this config's VAE", path.display()))?;
        Ok(Self {
            vae,
            latents,
            bytes,
            source,
        })
    }

    /// The same VAE computing in `dtype`.
    pub fn in_dtype(&self, cfg: &VaeConfig, dtype: DType, device: &Device) -> Result<Vae> {
        vae_from(&self.bytes, cfg, dtype, device)
    }

    /// What a diffusion checkpoint records to carry this VAE: its weights file and the extras
    /// that say where it came from.
    pub fn carried(&self) -> ((String, Vec<u8>), Extras) {
        (
            (VAE_FILE.to_string(), self.bytes.clone()),
            Extras {
                latents: self.latents,
                vae_source: Some(self.source.clone()),
            },
        )
    }
}

/// A VAE from safetensors bytes, computing in `dtype`.
fn vae_from(bytes: &[u8], cfg: &VaeConfig, dtype: DType, device: &Device) -> Result<Vae> {
    Ok(Vae::new(cfg, weights::from_bytes(bytes, dtype, device)?)?)
}
