//! Stage 2, `cxrgen train-diffusion`: the U-Net and the text head learn to denoise the latents of
//! a frozen, trained VAE. Its checkpoints carry that VAE, and every few epochs a grid of samples
//! shows how far it has come.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::run::{open_cache, run_precision, OpenedRun, RunRequest, StageSettings};
use super::trainer::{CheckpointExtras, Loss, Objective, TrainSummary};
use crate::checkpoint::{Stage, TrainedVae};
use crate::config::Config;
use crate::data::cache::Cache;
use crate::diffusion::{LatentDiffusion, Networks, SamplerKind, SamplerOptions};
use crate::model::weights::{init_diffusion_weights, Trainable};
use crate::model::{diffusion_networks, TextEncoder, TextHead, UNet, Vae};
use crate::rng::Rng;

/// The posterior of every training image under the frozen VAE: [N, C, h, w] each.
pub struct Posteriors {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl Posteriors {
    /// The posterior moments of every cached image under `vae`, in batches.
    pub fn encode(vae: &Vae, cache: &Cache, device: &Device, progress: bool) -> Result<Self> {
        let bar = crate::io::progress::bar(cache.len() as u64, progress, None)
            .with_prefix("encoding latents");
        let (mut means, mut logvars) = (Vec::new(), Vec::new());
        let all: Vec<usize> = (0..cache.len()).collect();
        for chunk in all.chunks(16) {
            let post = vae.encode(&cache.images(chunk, device)?)?;
            means.push(post.mean.detach());
            logvars.push(post.logvar.detach());
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(Self {
            mean: Tensor::cat(&means, 0)?,
            logvar: Tensor::cat(&logvars, 0)?,
        })
    }
}

/// Stage 2's loss: the latent diffusion model's, on latents sampled from the posteriors, each
/// report replaced by the empty text with the config's `null_text_prob`.
pub struct DiffusionObjective<'a> {
    config: &'a Config,
    /// The U-Net's (`unet.`) and the text head's (`text_head.`).
    weights: Trainable,
    text: &'a TextEncoder,
    diffusion: &'a LatentDiffusion,
    posteriors: Posteriors,
    /// The report of each posterior.
    texts: Vec<String>,
}

impl<'a> DiffusionObjective<'a> {
    /// Trains the U-Net and the text head of `config` whose weights are `weights`, on latents
    /// drawn from `posteriors`, conditioned on `texts` (one per posterior).
    pub fn new(
        config: &'a Config,
        weights: Trainable,
        text: &'a TextEncoder,
        diffusion: &'a LatentDiffusion,
        posteriors: Posteriors,
        texts: Vec<String>,
    ) -> Self {
        Self {
            config,
            weights,
            text,
            diffusion,
            posteriors,
            texts,
        }
    }

    /// The U-Net and the text head on the current weights, in the run's precision.
    fn networks(&self) -> Result<(UNet, TextHead)> {
        let vb = self.weights.compute();
        let (mut unet, head) = diffusion_networks(self.config, self.text.hidden_size(), vb)?;
        unet.set_checkpointing(self.weights.checkpoint());
        Ok((unet, head))
    }
}

impl Objective for DiffusionObjective<'_> {
    fn stage(&self) -> Stage {
        Stage::Diffusion
    }

    fn loss(&self, indices: &[usize], rng: &mut Rng) -> Result<Loss> {
        let (_, c, h, w) = self.posteriors.mean.dims4()?;
        let device = self.weights.device();
        let null_text_prob = self.config.train_diffusion.null_text_prob;
        let mut texts = Vec::with_capacity(indices.len());
        let mut t = Vec::with_capacity(indices.len());
        let (mut eps_z, mut noise) = (Vec::new(), Vec::new());
        // Per sample, in order: null-text draw, timestep, latent sample, noise.
        for &i in indices {
            let null = rng.uniform() < null_text_prob;
            texts.push(if null { "" } else { self.texts[i].as_str() });
            t.push(rng.below(self.diffusion.timesteps()));
            eps_z.push(rng.randn((1, c, h, w), device)?);
            noise.push(rng.randn((1, c, h, w), device)?);
        }
        let idx = Tensor::from_vec(
            indices.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            indices.len(),
            device,
        )?;
        let mean = self.posteriors.mean.index_select(&idx, 0)?;
        let std = (self.posteriors.logvar.index_select(&idx, 0)? * 0.5)?.exp()?;
        let z = self
            .diffusion
            .scale(&(mean + (std * Tensor::cat(&eps_z, 0)?)?)?)?;
        let (hidden, mask) = self.text.encode(&texts, device)?;
        let (unet, head) = self.networks()?;
        let snr_gamma = self.config.train_diffusion.snr_gamma;
        let (total, mse) = self.diffusion.loss(
            &unet,
            &head,
            &z,
            &t,
            &Tensor::cat(&noise, 0)?,
            &hidden,
            &mask,
            snr_gamma,
        )?;
        // Under Min-SNR weighting the plain MSE is logged beside it, comparable across runs.
        let parts = match snr_gamma {
            Some(_) => vec![("mse", mse)],
            None => vec![],
        };
        Ok(Loss { total, parts })
    }

    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.weights.backward(loss)
    }
}

/// The diffusion stage of a run: its objective, the VAE its checkpoints carry, and the sample
/// grids its epochs draw.
struct DiffusionStage<'a> {
    objective: DiffusionObjective<'a>,
    vae: TrainedVae,
}

impl Objective for DiffusionStage<'_> {
    fn stage(&self) -> Stage {
        self.objective.stage()
    }

    fn loss(&self, indices: &[usize], rng: &mut Rng) -> Result<Loss> {
        self.objective.loss(indices, rng)
    }

    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.objective.backward(loss)
    }

    fn checkpoint_extras(&self) -> Result<CheckpointExtras> {
        let (file, extras) = self.vae.carried();
        Ok(CheckpointExtras {
            files: vec![file],
            extras: Some(extras),
        })
    }

    fn after_epoch(
        &self,
        epoch: usize,
        weights: &HashMap<String, Tensor>,
        run_dir: &Path,
    ) -> Result<()> {
        let o = &self.objective;
        let g = &o.config.train_diffusion.samples;
        if g.every == 0 || !epoch.is_multiple_of(g.every) {
            return Ok(());
        }
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, o.weights.device());
        let nets = Networks::new(
            o.config,
            o.text.hidden_size(),
            vb,
            self.vae.vae.clone(),
            None,
        )?;
        let opts = SamplerOptions {
            kind: SamplerKind::Ddim,
            steps: g.steps,
            eta: 0.0,
        };
        let seeds: Vec<u64> = (0..g.per_prompt as u64).collect();
        let size = o.config.data.image_size as u32;
        let mut tiles = Vec::new();
        for prompt in &g.prompts {
            let images = o.diffusion.generate(
                o.text,
                &nets,
                prompt,
                "",
                &seeds,
                &opts,
                g.guidance_scale,
                &mut |_| {},
            )?;
            for img in images {
                let px = img.iter().map(|v| (v * 255.0).round() as u8).collect();
                tiles.push(image::GrayImage::from_raw(size, size, px).expect("size² pixels"));
            }
        }
        let dir = run_dir.join("samples");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let sheet = crate::io::grid::tile(&tiles, g.per_prompt, size.max(64), 2)?;
        crate::io::fs::replace_image(&dir.join(format!("epoch-{epoch:04}.png")), sheet)
    }
}

/// `cxrgen train-diffusion`; `vae_run`: `--vae`, the VAE a new run learns the latents of.
pub fn train_diffusion(req: &RunRequest, vae_run: Option<&Path>) -> Result<TrainSummary> {
    let run = OpenedRun::open(req)?;
    let cfg = &run.config;
    let cache = open_cache(req, cfg)?;
    // A resumed run uses the VAE its checkpoints carry; a new one the VAE run given.
    let vae = match (&run.checkpoint, vae_run) {
        (Some(ckpt), None) => TrainedVae::carried_by(ckpt, &cfg.vae, &req.device)?,
        (Some(_), Some(_)) => {
            bail!("--vae is not used with --resume: the run's checkpoints carry their VAE")
        }
        (None, Some(path)) => TrainedVae::load(path, &cfg.vae, &req.device)?,
        (None, None) if run.resumed => bail!(
            "--vae is needed: {} has no checkpoint yet to carry its VAE",
            run.dir.display()
        ),
        (None, None) => {
            bail!("--vae is needed: the train-vae run (or checkpoint) whose latents to learn")
        }
    };
    let t = &cfg.train_diffusion;
    let precision = run_precision(req, &t.run, "train_diffusion")?;
    let text = TextEncoder::load(&cfg.text, &req.device)?;
    let varmap = VarMap::new();
    init_diffusion_weights(cfg, text.hidden_size(), &varmap, t.run.seed, &req.device)?;
    let posteriors = Posteriors::encode(&vae.vae, &cache, &req.device, req.progress)?;
    let diffusion = LatentDiffusion::new(cfg, vae.latents);
    let texts = cache.records.iter().map(|r| r.text.clone()).collect();
    let weights = Trainable::new(&varmap, &req.device)
        .with_precision(precision)
        .with_checkpointing(&t.run)?;
    let objective = DiffusionObjective::new(cfg, weights, &text, &diffusion, posteriors, texts);
    let stage = StageSettings {
        run: &t.run,
        optimizer: &t.optimizer,
        ema_decay: Some(t.ema_decay),
        precision,
    };
    run.train(
        &DiffusionStage { objective, vae },
        &varmap,
        &cache,
        req,
        stage,
    )
}
