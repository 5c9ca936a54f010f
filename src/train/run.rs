//! A training run's folder: a new one (its config.yaml written once everything the run needs has
//! loaded), or one resumed from its last checkpoint; and what the command line asks of it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_nn::VarMap;

use super::trainer::{Objective, TrainOptions, TrainSummary, Trainer};
use crate::checkpoint::{self, Checkpoint, Pick, CONFIG};
use crate::config::{Config, OptimizerConfig, Precision, RunConfig};
use crate::data::cache::Cache;
use crate::data::split::Split;

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

/// How a stage trains: its `run` and `optimizer` sections, its EMA and its compute precision.
pub struct StageSettings<'a> {
    pub run: &'a RunConfig,
    pub optimizer: &'a OptimizerConfig,
    pub ema_decay: Option<f64>,
    pub precision: Precision,
}

/// A run folder with its config, and the checkpoint it continues from, if any.
pub struct OpenedRun {
    pub dir: PathBuf,
    pub config: Config,
    /// `--resume`: the folder and its config.yaml exist already.
    pub resumed: bool,
    /// The last checkpoint of a resumed run; None for a new run, and for a resumed one that
    /// stopped before its first checkpoint (it starts again from step 0).
    pub checkpoint: Option<Checkpoint>,
}

impl OpenedRun {
    pub fn open(req: &RunRequest) -> Result<Self> {
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
                let checkpoint = if checkpoint::has_checkpoint(dir) {
                    Some(Checkpoint::resolve(dir, Pick::Last)?)
                } else {
                    eprintln!(
                        "{} has no checkpoint yet (it stopped before its first one): starting it again from step 0",
                        dir.display()
                    );
                    None
                };
                Ok(Self {
                    dir: dir.clone(),
                    config: saved,
                    resumed: true,
                    checkpoint,
                })
            }
            (None, Some(dir)) => {
                let cfg = Config::load(req.config.as_deref().unwrap_or("paper"))?;
                if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
                    bail!("{} already exists and is not empty; choose another --out, or continue it with --resume", dir.display());
                }
                Ok(Self {
                    dir: dir.clone(),
                    config: cfg,
                    resumed: false,
                    checkpoint: None,
                })
            }
        }
    }

    /// Trains `objective`'s parameters (`varmap`) on the cache's training split, validating on
    /// its validation split. A new run's folder and config.yaml are created only now, once
    /// everything it needs has loaded, so that a failed start leaves nothing behind.
    pub fn train(
        &self,
        objective: &dyn Objective,
        varmap: &VarMap,
        cache: &Cache,
        req: &RunRequest,
        stage: StageSettings,
    ) -> Result<TrainSummary> {
        if !self.resumed {
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("cannot create {}", self.dir.display()))?;
            crate::io::fs::write_synced(
                &self.dir.join(CONFIG),
                serde_yaml::to_string(&self.config)?.as_bytes(),
            )?;
        }
        let opts = TrainOptions {
            config: &self.config,
            run: stage.run,
            optimizer: stage.optimizer,
            ema_decay: stage.ema_decay,
            precision: stage.precision,
            out: &self.dir,
            max_steps: req.max_steps,
            progress: req.progress,
        };
        let (train, val) = (cache.indices(Split::Train), cache.indices(Split::Val));
        Trainer::new(
            objective,
            varmap,
            &train,
            &val,
            &opts,
            self.checkpoint.as_ref(),
        )?
        .run()
    }
}

/// The precision a stage computes in on `req.device` (master weights are always F32).
pub fn run_precision(req: &RunRequest, run: &RunConfig, stage: &str) -> Result<Precision> {
    if req.precision.is_none() && req.device.is_cpu() && run.precision != Precision::F32 {
        eprintln!(
            "{stage}.run.precision = {:?} applies on CUDA; the CPU trains in F32",
            run.precision
        );
    }
    crate::device::precision_on(&req.device, req.precision, run.precision)
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

/// The cache, opened and checked against the config's image size and text sections.
pub fn open_cache(req: &RunRequest, cfg: &Config) -> Result<Cache> {
    let cache = Cache::open(&req.data)?;
    if cache.meta.image_size != cfg.data.image_size {
        bail!(
            "the cache {} holds {}×{} images but data.image_size = {}; prepare it again with this config",
            cache.dir.display(),
            cache.meta.image_size,
            cache.meta.image_size,
            cfg.data.image_size
        );
    }
    if cache.meta.text != cfg.data.text {
        bail!(
            "the cache {} holds texts made from {} but data.text = {}; prepare it again with this config",
            cache.dir.display(),
            cache.meta.text,
            cfg.data.text
        );
    }
    Ok(cache)
}
