//! Stage 1, `cxrgen train-vae`: the VAE learns to reconstruct the cached images; its checkpoints
//! record the scale and range of its latents.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use super::losses::vae_loss;
use super::run::{open_cache, run_precision, OpenedRun, RunRequest, StageSettings};
use super::trainer::{CheckpointExtras, Loss, Objective, TrainSummary};
use crate::checkpoint::{Extras, Stage};
use crate::config::VaeConfig;
use crate::data::cache::Cache;
use crate::data::split::Split;
use crate::model::latents::LatentStats;
use crate::model::weights::Trainable;
use crate::model::{seeded_var_builder, Vae};
use crate::rng::Rng;

/// Images used to estimate the latent scale.
const SCALE_IMAGES: usize = 256;

/// Where a VAE objective's training images come from: the prepared cache, or (`cxrgen bench`,
/// tests) images held in memory.
pub trait ImageSource {
    /// The images at `indices` as F32 in [−1, 1]: [n, 1, S, S] on `device`.
    fn images(&self, indices: &[usize], device: &Device) -> Result<Tensor>;
}

impl ImageSource for Cache {
    fn images(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        Cache::images(self, indices, device)
    }
}

/// A batch in memory, [N, 1, S, S]: image i is row i.
impl ImageSource for Tensor {
    fn images(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let rows: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let rows = Tensor::new(rows.as_slice(), self.device())?;
        Ok(self.index_select(&rows, 0)?.to_device(device)?)
    }
}

/// Stage 1: reconstruction + KL on cached images.
pub struct VaeObjective<'a> {
    config: &'a VaeConfig,
    weights: Trainable,
    images: &'a dyn ImageSource,
    kl_weight: f64,
    scale_indices: Vec<usize>,
}

impl<'a> VaeObjective<'a> {
    /// Trains the VAE of `config` whose weights are `weights`. `scale_indices`: the images the
    /// latent scale is estimated on (training images).
    pub fn new(
        config: &'a VaeConfig,
        weights: Trainable,
        images: &'a dyn ImageSource,
        kl_weight: f64,
        scale_indices: Vec<usize>,
    ) -> Self {
        Self {
            config,
            weights,
            images,
            kl_weight,
            scale_indices,
        }
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
        let device = self.weights.device();
        // Detached weights: a tracked encode of 16 images would keep all its activations.
        let vae = Vae::new(self.config, self.weights.frozen(DType::F32))?;
        for chunk in self.scale_indices.chunks(16) {
            let post = vae.encode(&self.images.images(chunk, device)?)?;
            let z = post.sample(&rng.randn(post.mean.shape(), device)?)?;
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
        let images = self.images.images(indices, self.weights.device())?;
        let mut vae = Vae::new(self.config, self.weights.compute())?;
        vae.set_checkpointing(self.weights.checkpoint());
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
        self.weights.backward(loss)
    }
}

/// `cxrgen train-vae`.
pub fn train_vae(req: &RunRequest) -> Result<TrainSummary> {
    let run = OpenedRun::open(req)?;
    let cfg = &run.config;
    let cache = open_cache(req, cfg)?;
    let t = &cfg.train_vae;
    let precision = run_precision(req, &t.run, "train_vae")?;
    let varmap = VarMap::new();
    Vae::new(
        &cfg.vae,
        seeded_var_builder(&varmap, t.run.seed, &req.device),
    )?;
    let scale_images = cache
        .indices(Split::Train)
        .into_iter()
        .take(SCALE_IMAGES)
        .collect();
    let weights = Trainable::new(&varmap, &req.device)
        .with_precision(precision)
        .with_checkpointing(&t.run)?;
    let objective = VaeObjective::new(&cfg.vae, weights, &cache, t.kl_weight, scale_images);
    let stage = StageSettings {
        run: &t.run,
        optimizer: &t.optimizer,
        ema_decay: None,
        precision,
    };
    run.train(&objective, &varmap, &cache, req, stage)
}
