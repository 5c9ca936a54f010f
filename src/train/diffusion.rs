//! The two training stages (`cxrgen train-vae`, `cxrgen train-diffusion`): what each trains, what
//! its checkpoints carry, and how a run folder is started or resumed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use super::losses::vae_loss;
use super::trainer::{self, CheckpointExtras, Loss, Objective, TrainOptions, TrainSummary};
use crate::checkpoint::{Checkpoint, Extras, Pick, Stage, TrainedVae, CONFIG};
use crate::config::{Config, OptimizerConfig, Precision, RunConfig, VaeConfig};
use crate::data::cache::Cache;
use crate::data::split::Split;
use crate::diffusion::{LatentDiffusion, Networks, SamplerKind, SamplerOptions};
use crate::model::checkpointing::GradCheckpoint;
use crate::model::latents::LatentStats;
use crate::model::weights::{
    backward_with, checkpointing_for, compute_weights, init_diffusion_weights,
};
use crate::model::{diffusion_networks, seeded_var_builder, TextEncoder, TextHead, UNet, Vae};
use crate::rng::Rng;

/// Images used to estimate the latent scale.
const SCALE_IMAGES: usize = 256;

/// What the command line asks of a training run.
pub struct RunRequest {
    /// A config file or preset; with `resume`, optional and checked against the run's own.
    pub config: Option<String>,
    pub data: PathBuf,
    /// A new run folder.
    pub out: Option<PathBuf>,
    /// A run folder to continue.
    pub resume: Option<PathBuf>,
    pub max_steps: Option<u64>,
    pub device: Device,
    /// Overrides the config's compute precision on any device (tests run F16 on the CPU with
    /// it). None: the config's on CUDA, F32 on the CPU.
    pub precision: Option<Precision>,
    pub progress: bool,
}

/// The precision a stage computes in on `req.device` (master weights are always F32).
fn run_precision(req: &RunRequest, run: &RunConfig, stage: &str) -> Result<Precision> {
    if req.precision.is_none() && req.device.is_cpu() && run.precision != Precision::F32 {
        eprintln!(
            "{stage}.run.precision = {:?} applies on CUDA; the CPU trains in F32",
            run.precision
        );
    }
    crate::device::precision_on(&req.device, req.precision, run.precision)
}

/// A run folder, its config and the checkpoint to resume from, if any.
struct OpenedRun {
    dir: PathBuf,
    config: Config,
    resume: Option<Checkpoint>,
}

fn open_run(req: &RunRequest) -> Result<OpenedRun> {
    match (&req.resume, &req.out) {
        (Some(_), Some(_)) => {
            bail!("give either --out (a new run) or --resume (an existing one), not both")
        }
        (None, None) => bail!("--out is needed: the folder of the new run"),
        (Some(dir), None) => {
            let saved = Config::load(
                dir.join(CONFIG)
                    .to_str()
                    .context("run folder path is not UTF-8")?,
            )
            .with_context(|| format!("{} is not a run folder", dir.display()))?;
            if let Some(c) = &req.config {
                let given = Config::load(c)?;
                if given != saved {
                    bail!("--config {c} differs from the config of the run in {} ({}); resume without --config, or start a new run", dir.display(), first_difference(&given, &saved));
                }
            }
            let ckpt = Checkpoint::resolve(dir, Pick::Last)?;
            Ok(OpenedRun {
                dir: dir.clone(),
                config: saved,
                resume: Some(ckpt),
            })
        }
        (None, Some(dir)) => {
            let cfg = Config::load(req.config.as_deref().unwrap_or("paper"))?;
            if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
                bail!("{} already exists and is not empty; choose another --out, or continue it with --resume", dir.display());
            }
            Ok(OpenedRun {
                dir: dir.clone(),
                config: cfg,
                resume: None,
            })
        }
    }
}

impl OpenedRun {
    /// Creates a new run's folder and its config.yaml: only once everything it needs has loaded,
    /// so that a failed start leaves nothing behind.
    fn start(&self) -> Result<()> {
        if self.resume.is_none() {
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("cannot create {}", self.dir.display()))?;
            crate::io::fs::write_synced(
                &self.dir.join(CONFIG),
                serde_yaml::to_string(&self.config)?.as_bytes(),
            )?;
        }
        Ok(())
    }
}

/// The first top-level config section that differs, for error messages.
pub fn first_difference(a: &Config, b: &Config) -> String {
    let (va, vb) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    for key in [
        "data",
        "vae",
        "unet",
        "text",
        "diffusion",
        "train_vae",
        "train_diffusion",
    ] {
        if va[key] != vb[key] {
            return format!("section `{key}` differs");
        }
    }
    "no difference".into()
}

fn check_cache(cache: &Cache, cfg: &Config) -> Result<()> {
    if cache.meta.image_size != cfg.data.image_size {
        bail!(
            "the cache {} holds {}×{} images but data.image_size = {}; prepare it again with this config",
            cache.dir.display(),
            cache.meta.image_size,
            cache.meta.image_size,
            cfg.data.image_size
        );
    }
    Ok(())
}

/// Where a VAE objective's training images come from: the prepared cache, or (`cxrgen bench`)
/// random pixels.
pub trait ImageSource {
    /// The images at `indices` as F32 in [−1, 1]: [n, 1, S, S] on `device`.
    fn images(&self, indices: &[usize], device: &Device) -> Result<Tensor>;
}

impl ImageSource for Cache {
    fn images(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        Cache::images(self, indices, device)
    }
}

/// Stage 1: reconstruction + KL on cached images.
pub struct VaeObjective<'a> {
    config: VaeConfig,
    /// The F32 master weights.
    varmap: VarMap,
    dtype: DType,
    images: &'a dyn ImageSource,
    kl_weight: f64,
    device: Device,
    scale_indices: Vec<usize>,
    checkpoint: Option<GradCheckpoint>,
}

impl<'a> VaeObjective<'a> {
    /// Trains the VAE whose weights `varmap` holds, in F32 without gradient checkpointing.
    /// `scale_indices`: the images the latent scale is estimated on (training images).
    pub fn new(
        config: &VaeConfig,
        varmap: &VarMap,
        images: &'a dyn ImageSource,
        kl_weight: f64,
        device: Device,
        scale_indices: Vec<usize>,
    ) -> Self {
        Self {
            config: config.clone(),
            varmap: varmap.clone(),
            dtype: DType::F32,
            images,
            kl_weight,
            device,
            scale_indices,
            checkpoint: None,
        }
    }

    /// Computes in `precision` (the master weights stay F32).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.dtype = precision.dtype();
        self
    }

    /// Gradient checkpointing over the VAE's parameters (None: none).
    pub fn with_checkpointing(mut self, checkpoint: Option<GradCheckpoint>) -> Self {
        self.checkpoint = checkpoint;
        self
    }

    /// The VAE on the current weights, computing in `dtype`.
    fn vae(&self, dtype: DType) -> Result<Vae> {
        Ok(Vae::new(
            &self.config,
            compute_weights(&self.varmap, dtype, &self.device),
        )?)
    }

    /// Statistics of latents sampled from the posteriors of up to 256 training images: the scale
    /// 1 / std that gives the diffusion model unit-variance inputs (Rombach et al. 2022, §4.3.2),
    /// and the range of the scaled latents, to which samplers clip their clean estimates.
    fn latent_stats(&self) -> Result<LatentStats> {
        let mut rng = Rng::new(0x5ca1e);
        let (mut sum, mut sq, mut n) = (0f64, 0f64, 0f64);
        let (mut lo, mut hi) = (f64::MAX, f64::MIN);
        let f64_of = |t: Tensor| -> Result<f64> {
            Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
        };
        let vae = self.vae(DType::F32)?;
        for chunk in self.scale_indices.chunks(16) {
            let post = vae.encode(&self.images.images(chunk, &self.device)?)?;
            let z = post
                .sample(&rng.randn(post.mean.shape(), &self.device)?)?
                .detach();
            sum += f64_of(z.sum_all()?)?;
            sq += f64_of(z.sqr()?.sum_all()?)?;
            lo = lo.min(f64_of(z.min_all()?)?);
            hi = hi.max(f64_of(z.max_all()?)?);
            n += z.elem_count() as f64;
        }
        let scale = 1.0 / (sq / n - (sum / n).powi(2)).max(1e-12).sqrt();
        Ok(LatentStats {
            scale,
            range: Some((lo * scale, hi * scale)),
        })
    }
}

impl Objective for VaeObjective<'_> {
    fn stage(&self) -> Stage {
        Stage::Vae
    }

    fn loss(&self, indices: &[usize], rng: &mut Rng) -> Result<Loss> {
        let images = self.images.images(indices, &self.device)?;
        let mut vae = self.vae(self.dtype)?;
        vae.set_checkpointing(self.checkpoint.clone());
        let l = vae_loss(&vae, &images, self.kl_weight, rng)?;
        Ok(Loss {
            total: l.total,
            parts: vec![("recon", l.recon), ("kl", l.kl)],
        })
    }

    fn checkpoint_extras(&self) -> Result<CheckpointExtras> {
        Ok(CheckpointExtras {
            files: vec![],
            extras: Some(Extras {
                latents: self.latent_stats()?,
                vae_source: None,
            }),
        })
    }

    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        backward_with(loss, self.checkpoint.as_ref())
    }
}

pub fn train_vae(req: &RunRequest) -> Result<TrainSummary> {
    let run = open_run(req)?;
    let cfg = run.config.clone();
    let cache = Cache::open(&req.data)?;
    check_cache(&cache, &cfg)?;
    let precision = run_precision(req, &cfg.train_vae.run, "train_vae")?;
    let varmap = VarMap::new();
    Vae::new(
        &cfg.vae,
        seeded_var_builder(&varmap, cfg.train_vae.run.seed, &req.device),
    )?;
    let scale_images = cache
        .indices(Split::Train)
        .into_iter()
        .take(SCALE_IMAGES)
        .collect();
    let objective = VaeObjective::new(
        &cfg.vae,
        &varmap,
        &cache,
        cfg.train_vae.kl_weight,
        req.device.clone(),
        scale_images,
    )
    .with_precision(precision)
    .with_checkpointing(checkpointing_for(&cfg.train_vae.run, &varmap)?);
    let t = &cfg.train_vae;
    fit(
        &objective,
        &varmap,
        &cache,
        run,
        req,
        (&t.run, &t.optimizer, None, precision),
    )
}

/// Trains `objective`'s parameters (`varmap`) on the cache's training split, validating on its
/// validation split.
fn fit(
    objective: &dyn Objective,
    varmap: &VarMap,
    cache: &Cache,
    run: OpenedRun,
    req: &RunRequest,
    (run_cfg, optimizer, ema_decay, precision): (
        &RunConfig,
        &OptimizerConfig,
        Option<f64>,
        Precision,
    ),
) -> Result<TrainSummary> {
    run.start()?;
    let opts = TrainOptions {
        config: run.config.clone(),
        run: run_cfg.clone(),
        optimizer: optimizer.clone(),
        ema_decay,
        precision,
        out: run.dir,
        max_steps: req.max_steps,
        progress: req.progress,
    };
    trainer::train(
        objective,
        varmap,
        &cache.indices(Split::Train),
        &cache.indices(Split::Val),
        &opts,
        run.resume,
    )
}

struct DiffusionObjective {
    config: Config,
    vae: Vae,
    /// The F32 master weights of the U-Net (`unet.`) and the text head (`text_head.`).
    varmap: VarMap,
    dtype: DType,
    text: TextEncoder,
    diffusion: LatentDiffusion,
    /// Posterior of every cached image under the frozen VAE: [N, C, h, w] each.
    mean: Tensor,
    logvar: Tensor,
    texts: Vec<String>,
    null_text_prob: f64,
    device: Device,
    /// The VAE's weights file and the extras that carry it in every checkpoint.
    carried: ((String, Vec<u8>), Extras),
    checkpoint: Option<GradCheckpoint>,
}

impl DiffusionObjective {
    /// The U-Net and the text head on the current weights, in the run's precision.
    fn networks(&self) -> Result<(UNet, TextHead)> {
        let vb = compute_weights(&self.varmap, self.dtype, &self.device);
        let (mut unet, head) = diffusion_networks(&self.config, self.text.hidden_size(), vb)?;
        unet.set_checkpointing(self.checkpoint.clone());
        Ok((unet, head))
    }
}

impl Objective for DiffusionObjective {
    fn stage(&self) -> Stage {
        Stage::Diffusion
    }

    fn loss(&self, indices: &[usize], rng: &mut Rng) -> Result<Loss> {
        let (_, c, h, w) = self.mean.dims4()?;
        let mut texts = Vec::with_capacity(indices.len());
        let mut t = Vec::with_capacity(indices.len());
        let (mut eps_z, mut noise) = (Vec::new(), Vec::new());
        // Per sample, in order: null-text draw, timestep, latent sample, noise.
        for &i in indices {
            let null = rng.uniform() < self.null_text_prob;
            texts.push(if null { "" } else { self.texts[i].as_str() });
            t.push(rng.below(self.diffusion.timesteps()));
            eps_z.push(rng.randn((1, c, h, w), &self.device)?);
            noise.push(rng.randn((1, c, h, w), &self.device)?);
        }
        let idx = Tensor::from_vec(
            indices.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            indices.len(),
            &self.device,
        )?;
        let mean = self.mean.index_select(&idx, 0)?;
        let std = (self.logvar.index_select(&idx, 0)? * 0.5)?.exp()?;
        let z = self
            .diffusion
            .scale(&(mean + (std * Tensor::cat(&eps_z, 0)?)?)?)?;
        let (hidden, mask) = self.text.encode(&texts, &self.device)?;
        let (unet, head) = self.networks()?;
        let total = self.diffusion.loss(
            &unet,
            &head,
            &z,
            &t,
            &Tensor::cat(&noise, 0)?,
            &hidden,
            &mask,
        )?;
        Ok(Loss {
            total,
            parts: vec![],
        })
    }

    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        backward_with(loss, self.checkpoint.as_ref())
    }

    fn after_epoch(
        &self,
        epoch: usize,
        weights: &HashMap<String, Tensor>,
        run_dir: &Path,
    ) -> Result<()> {
        let g = &self.config.train_diffusion.samples;
        if g.every == 0 || !epoch.is_multiple_of(g.every) {
            return Ok(());
        }
        let vb = candle_nn::VarBuilder::from_tensors(
            weights.clone(),
            candle_core::DType::F32,
            &self.device,
        );
        let cfg = &self.config;
        let nets = Networks::new(cfg, self.text.hidden_size(), vb, self.vae.clone(), None)?;
        let opts = SamplerOptions {
            kind: SamplerKind::Ddim,
            steps: g.steps,
            eta: 0.0,
        };
        let seeds: Vec<u64> = (0..g.per_prompt as u64).collect();
        let size = cfg.data.image_size as u32;
        let mut tiles = Vec::new();
        for prompt in &g.prompts {
            let images = self.diffusion.generate(
                &self.text,
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
        let path = dir.join(format!("epoch-{epoch:04}.png"));
        let sheet = crate::io::grid::tile(&tiles, g.per_prompt, size.max(64), 2)?;
        crate::io::fs::replace_image(&path, sheet)
    }

    fn checkpoint_extras(&self) -> Result<CheckpointExtras> {
        let (file, extras) = self.carried.clone();
        Ok(CheckpointExtras {
            files: vec![file],
            extras: Some(extras),
        })
    }
}

/// The posterior moments of every cached image under `vae`, in batches.
fn encode_all(
    vae: &Vae,
    cache: &Cache,
    device: &Device,
    progress: bool,
) -> Result<(Tensor, Tensor)> {
    let bar = if progress {
        indicatif::ProgressBar::new(cache.len() as u64).with_prefix("encoding latents")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let (mut means, mut logvars) = (Vec::new(), Vec::new());
    let all: Vec<usize> = (0..cache.len()).collect();
    for chunk in all.chunks(16) {
        let post = vae.encode(&cache.images(chunk, device)?)?;
        means.push(post.mean.detach());
        logvars.push(post.logvar.detach());
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok((Tensor::cat(&means, 0)?, Tensor::cat(&logvars, 0)?))
}

pub fn train_diffusion(req: &RunRequest, vae_run: Option<&Path>) -> Result<TrainSummary> {
    let run = open_run(req)?;
    let cfg = run.config.clone();
    let cache = Cache::open(&req.data)?;
    check_cache(&cache, &cfg)?;
    // A resumed run uses the VAE its checkpoints carry; a new one the VAE run given.
    let vae = match (&run.resume, vae_run) {
        (Some(ckpt), None) => TrainedVae::carried_by(ckpt, &cfg.vae, &req.device)?,
        (Some(_), Some(_)) => {
            bail!("--vae is not used with --resume: the run's checkpoints carry their VAE")
        }
        (None, Some(path)) => TrainedVae::load(path, &cfg.vae, &req.device)?,
        (None, None) => {
            bail!("--vae is needed: the train-vae run (or checkpoint) whose latents to learn")
        }
    };
    let precision = run_precision(req, &cfg.train_diffusion.run, "train_diffusion")?;
    let text = TextEncoder::load(&cfg.text, &req.device)?;
    let varmap = VarMap::new();
    init_diffusion_weights(
        &cfg,
        text.hidden_size(),
        &varmap,
        cfg.train_diffusion.run.seed,
        &req.device,
    )?;
    let checkpoint = checkpointing_for(&cfg.train_diffusion.run, &varmap)?;
    let (mean, logvar) = encode_all(&vae.vae, &cache, &req.device, req.progress)?;
    let carried = vae.carried();
    let objective = DiffusionObjective {
        config: cfg.clone(),
        vae: vae.vae,
        varmap: varmap.clone(),
        dtype: precision.dtype(),
        text,
        diffusion: LatentDiffusion::new(&cfg, vae.latents),
        mean,
        logvar,
        texts: cache.records.iter().map(|r| r.text.clone()).collect(),
        null_text_prob: cfg.train_diffusion.null_text_prob,
        device: req.device.clone(),
        carried,
        checkpoint,
    };
    let t = &cfg.train_diffusion;
    fit(
        &objective,
        &varmap,
        &cache,
        run,
        req,
        (&t.run, &t.optimizer, Some(t.ema_decay), precision),
    )
}
