//! `cxrgen bench`: how fast a config samples and trains on this machine, with freshly initialised
//! weights (speed does not depend on training). Sampling goes through the same code as
//! `cxrgen generate`; a training step through the same loss, gradient checkpointing, precision
//! and optimizer as `cxrgen train-diffusion` (`--train`) or `cxrgen train-vae` (`--train-vae`, on
//! random images).
//!
//! The frozen text encoder is replaced by a one-layer random BERT of the same width: it runs once
//! per prompt (sampling) or per micro-batch (training), not per denoising step, and the paper's
//! BioBERT may not be on the machine.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::json;

use crate::config::{
    Config, OptimizerConfig, Precision, RandomBertConfig, RunConfig, TextEncoderSource,
};
use crate::device::DeviceChoice;
use crate::diffusion::pipeline::{Conditioning, Parts};
use crate::diffusion::{NoiseSchedule, SamplerKind, SamplerOptions};
use crate::model::checkpointing::GradCheckpoint;
use crate::model::{diffusion_networks, seeded_var_builder, TextEncoder, Vae};
use crate::rng::Rng;
use crate::train::losses::diffusion_loss;
use crate::train::optim::{clip_to, global_norm, AdamW};
use crate::train::scaler::INITIAL_SCALE;
use crate::train::stages::{
    backward_with, checkpointing_for, compute_weights, init_diffusion_weights, ImageSource,
    VaeObjective,
};
use crate::train::trainer::{accumulate, named_params, CheckpointExtras, Loss, Objective};

/// A report-like prompt of about 20 tokens.
const PROMPT: &str = "Moderate cardiomegaly. Small left pleural effusion. No pneumothorax.";

pub struct Request {
    pub config: String,
    pub device: DeviceChoice,
    /// Sampling precision (None: F16 on CUDA, F32 on the CPU); training uses the config's on
    /// CUDA and F32 on the CPU unless this is given.
    pub precision: Option<Precision>,
    pub batch_sizes: Vec<usize>,
    /// The sampling steps the per-image figure assumes.
    pub steps: usize,
    /// Denoising steps timed per batch size.
    pub repeats: usize,
    /// Also time training steps of the diffusion stage.
    pub train: bool,
    /// Also time training steps of the VAE stage.
    pub train_vae: bool,
    /// Also time convolution forward + backward: candle's own against ours.
    pub kernels: bool,
    pub json: bool,
}

/// Replaces a pretrained text encoder by a one-layer random BERT of the same width (768 when the
/// config does not say): speed and device checks need no download.
pub fn use_random_text_encoder(cfg: &mut Config) {
    let hidden = cfg.text.hidden_size.unwrap_or(768);
    if let TextEncoderSource::Pretrained(_) = cfg.text.encoder {
        cfg.text.encoder = TextEncoderSource::Random(RandomBertConfig {
            hidden_size: hidden,
            layers: 1,
            heads: (hidden / 64).max(1),
            intermediate_size: 4 * hidden,
            seed: 0,
        });
        cfg.text.hidden_size = Some(hidden);
    }
}

/// Milliseconds `f` takes, up to the moment `device` has finished its work.
fn time<T>(device: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    device.synchronize()?;
    let t0 = Instant::now();
    let out = f()?;
    device.synchronize()?;
    Ok((out, t0.elapsed().as_secs_f64() * 1e3))
}

pub fn run(req: &Request) -> Result<ExitCode> {
    if req.batch_sizes.is_empty()
        || req.batch_sizes.contains(&0)
        || req.repeats == 0
        || req.steps == 0
    {
        anyhow::bail!("--batch-sizes must each be ≥ 1, --repeats and --steps ≥ 1");
    }
    let mut cfg = Config::load(&req.config)?;
    use_random_text_encoder(&mut cfg);
    let device = crate::device::open(req.device)?;
    let precision = crate::device::precision_on(&device, req.precision, Precision::F16)?;

    let text = TextEncoder::load(&cfg.text, &device)?;
    let (ldm, vae_weights) = (VarMap::new(), VarMap::new());
    init_diffusion_weights(&cfg, &text, &ldm, 1, &device)?;
    Vae::new(&cfg.vae, seeded_var_builder(&vae_weights, 2, &device))?;

    let header = format!(
        "config {}, device {}, precision {} ({} U-Net and text-head parameters)",
        req.config,
        crate::device::name(&device),
        format!("{precision:?}").to_lowercase(),
        crate::model::count_params(&ldm)
    );
    let sampling = sampling_rows(req, &cfg, &device, precision, &ldm, &vae_weights, &text)?;
    let training = if req.train {
        Some(diffusion_training_row(req, &cfg, &device, &ldm, &text)?)
    } else {
        None
    };
    let training_vae = if req.train_vae {
        Some(vae_training_row(req, &cfg, &device)?)
    } else {
        None
    };
    let kernels = if req.kernels {
        Some(kernel_rows(&device, precision)?)
    } else {
        None
    };
    let mut out = std::io::stdout().lock();
    if req.json {
        writeln!(
            out,
            "{}",
            json!({
                "config": req.config, "device": crate::device::name(&device),
                "precision": format!("{precision:?}").to_lowercase(),
                "image_size": cfg.data.image_size, "sampling_steps": req.steps,
                "sampling": sampling, "training": training, "training_vae": training_vae,
                "kernels": kernels,
            })
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "# cxrgen bench: {header}")?;
    writeln!(
        out,
        "sampling: DDIM, guidance (2 U-Net passes per image and step), {}×{} images",
        cfg.data.image_size, cfg.data.image_size
    )?;
    writeln!(
        out,
        "{:>6} {:>10} {:>14} {:>12} {:>10} {:>12} {:>10}",
        "batch",
        "ms/step",
        "decode ms/img",
        format!("ms/img@{}", req.steps),
        "img/s",
        "peak MiB",
        "ops/step"
    )?;
    for r in &sampling {
        writeln!(
            out,
            "{:>6} {:>10.1} {:>14.1} {:>12.1} {:>10.2} {:>12} {:>10}",
            r["batch"].as_u64().unwrap_or(0),
            r["ms_per_step"].as_f64().unwrap_or(f64::NAN),
            r["decode_ms_per_image"].as_f64().unwrap_or(f64::NAN),
            r["ms_per_image"].as_f64().unwrap_or(f64::NAN),
            r["images_per_s"].as_f64().unwrap_or(f64::NAN),
            r["peak_mib"]
                .as_f64()
                .map_or("n/a".into(), |m| format!("{m:.0}")),
            ops_text(&r["ops_per_step"]),
        )?;
    }
    for t in training.iter().chain(&training_vae) {
        writeln!(
            out,
            "training ({}): batch {} × accumulation {}, checkpointing {}, {}: {:.1} ms per micro-batch, {:.1} ms per optimizer step, peak {} MiB, {} tensor ops per micro-batch",
            t["stage"].as_str().unwrap_or("?"), t["batch"], t["accumulation"], t["checkpointing"], t["precision"].as_str().unwrap_or("?"),
            t["ms_per_micro_batch"].as_f64().unwrap_or(f64::NAN),
            t["ms_per_optimizer_step"].as_f64().unwrap_or(f64::NAN),
            t["peak_mib"].as_f64().map_or("n/a".into(), |m| format!("{m:.0}")),
            ops_text(&t["ops_per_micro_batch"]),
        )?;
    }
    if let Some(rows) = kernels {
        writeln!(out, "conv2d forward + backward, ms (candle's input gradient is conv_transpose2d, ours convolutions):")?;
        writeln!(
            out,
            "{:<34} {:>10} {:>10} {:>8}",
            "shape", "candle", "cxrgen", "speed-up"
        )?;
        for r in rows {
            writeln!(
                out,
                "{:<34} {:>10.2} {:>10.2} {:>7.2}×",
                r["shape"].as_str().unwrap_or(""),
                r["candle_ms"].as_f64().unwrap_or(f64::NAN),
                r["cxrgen_ms"].as_f64().unwrap_or(f64::NAN),
                r["speedup"].as_f64().unwrap_or(f64::NAN),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An op count for the table: "n/a" when it was not counted.
fn ops_text(ops: &serde_json::Value) -> String {
    ops.as_u64().map_or("n/a".into(), |n| n.to_string())
}

/// 3×3 convolutions of the U-Net's and the VAE's sizes, forward and backward, through candle's
/// `conv2d` and through [`crate::model::conv::conv2d`], alternately, in `precision`.
fn kernel_rows(device: &Device, precision: Precision) -> Result<Vec<serde_json::Value>> {
    let cases = [
        (8, 48, 48, 32, 1),
        (8, 96, 96, 16, 1),
        (8, 192, 192, 8, 1),
        (4, 64, 64, 128, 1),
        (8, 48, 48, 32, 2),
        (4, 64, 128, 128, 2),
    ];
    let mut rows = Vec::new();
    let mut rng = Rng::new(3);
    for (b, ci, co, hw, s) in cases {
        let x = candle_core::Var::from_tensor(
            &rng.randn((b, ci, hw, hw), device)?
                .to_dtype(precision.dtype())?,
        )?;
        let w = candle_core::Var::from_tensor(
            &(rng.randn((co, ci, 3, 3), device)? * 0.05)?.to_dtype(precision.dtype())?,
        )?;
        let run = |ours: bool| -> Result<()> {
            let y = if ours {
                crate::model::conv::conv2d(&x, &w, 1, s)?
            } else {
                x.conv2d(&w, 1, s, 1, 1)?
            };
            let grads = y.sqr()?.sum_all()?.backward()?;
            drop(grads);
            Ok(())
        };
        run(false)?;
        run(true)?;
        let (mut candle_ms, mut ours_ms) = (0.0, 0.0);
        for _ in 0..3 {
            candle_ms += time(device, || run(false))?.1 / 3.0;
            ours_ms += time(device, || run(true))?.1 / 3.0;
        }
        rows.push(json!({
            "shape": format!("{b}×{ci}×{hw}×{hw} → {co}, stride {s}"),
            "candle_ms": candle_ms, "cxrgen_ms": ours_ms, "speedup": candle_ms / ours_ms,
        }));
    }
    Ok(rows)
}

/// Per batch size: the time of `repeats` denoising steps, and of decoding their latents.
fn sampling_rows(
    req: &Request,
    cfg: &Config,
    device: &Device,
    precision: Precision,
    ldm: &VarMap,
    vae_weights: &VarMap,
    text: &TextEncoder,
) -> Result<Vec<serde_json::Value>> {
    let (unet, head) = diffusion_networks(
        cfg,
        text.hidden_size(),
        compute_weights(ldm, precision.dtype(), device),
    )?;
    let vae = Vae::new(&cfg.vae, compute_weights(vae_weights, DType::F32, device))?;
    let vae_half = match precision {
        Precision::F32 => None,
        p => Some(Vae::new(
            &cfg.vae,
            compute_weights(vae_weights, p.dtype(), device),
        )?),
    };
    let parts = Parts {
        config: cfg,
        unet: &unet,
        head: &head,
        text,
        vae: &vae,
        vae_half: vae_half.as_ref(),
        latent_scale: 1.0,
        latent_range: Some((-4.0, 4.0)),
        device,
    };
    let cond = parts.condition(PROMPT, "")?;
    let opts = |steps| SamplerOptions {
        kind: SamplerKind::Ddim,
        steps,
        eta: 0.0,
    };
    let mut rows = Vec::new();
    for &b in &req.batch_sizes {
        let seeds: Vec<u64> = (0..b as u64).collect();
        // Warm-up: kernels compiled, memory pools filled.
        parts.sample(&cond, &seeds, &opts(1), 3.0, &mut |_| {})?;
        let ops = step_ops(&parts, &cond, &seeds)?;
        crate::device::reset_peak(device);
        let (latents, denoise) = time(device, || {
            parts.denoise(&cond, &seeds, &opts(req.repeats), 3.0, &mut |_| {})
        })?;
        let (_, decode) = time(device, || parts.decode_images(&latents))?;
        let step = denoise / req.repeats as f64;
        let decode = decode / b as f64;
        let per_image = (req.steps as f64 * step) / b as f64 + decode;
        rows.push(json!({
            "batch": b, "ms_per_step": step, "decode_ms_per_image": decode,
            "ms_per_image": per_image, "images_per_s": 1e3 / per_image,
            "peak_mib": crate::device::peak_memory_mib(device),
            "ops_per_step": ops,
        }));
    }
    Ok(rows)
}

/// Tensor operations (≈ kernel launches on CUDA, see [`crate::opcount`]) of one guided DDIM
/// step for `seeds`, counting the sampler's setup (the initial noise: one op per image); None
/// when the counting allocator is not installed.
fn step_ops(parts: &Parts, cond: &Conditioning, seeds: &[u64]) -> Result<Option<usize>> {
    let opts = SamplerOptions {
        kind: SamplerKind::Ddim,
        steps: 1,
        eta: 0.0,
    };
    let (_, ops) = crate::opcount::count(|| parts.denoise(cond, seeds, &opts, 3.0, &mut |_| {}))?;
    Ok(ops)
}

/// Tensor operations of one micro-batch's loss and backward pass (see [`step_ops`]).
fn micro_batch_ops(
    objective: &dyn Objective,
    batch: &[usize],
    rng: &mut Rng,
    loss_scale: f64,
) -> Result<Option<usize>> {
    let (_, ops) = crate::opcount::count(|| -> Result<()> {
        let loss = objective.loss(batch, rng)?.total;
        let loss = if loss_scale == 1.0 {
            loss
        } else {
            (loss * loss_scale)?
        };
        drop(objective.backward(&loss)?);
        Ok(())
    })?;
    Ok(ops)
}

/// train-diffusion's loss on random latents and timesteps: the trainer's path without a dataset.
struct RandomLatents<'a> {
    cfg: &'a Config,
    text: &'a TextEncoder,
    ldm: &'a VarMap,
    device: &'a Device,
    precision: Precision,
    checkpoint: Option<GradCheckpoint>,
    schedule: NoiseSchedule,
}

impl Objective for RandomLatents<'_> {
    fn stage(&self) -> &'static str {
        "diffusion"
    }

    fn loss(&self, indices: &[usize], rng: &mut Rng) -> Result<Loss> {
        let (b, c, z) = (
            indices.len(),
            self.cfg.vae.latent_channels,
            self.cfg.latent_size(),
        );
        let vb = compute_weights(self.ldm, self.precision.dtype(), self.device);
        let (mut unet, head) = diffusion_networks(self.cfg, self.text.hidden_size(), vb)?;
        unet.set_checkpointing(self.checkpoint.clone());
        let latents = rng.randn((b, c, z, z), self.device)?;
        let noise = rng.randn((b, c, z, z), self.device)?;
        let t: Vec<usize> = (0..b)
            .map(|_| rng.below(self.schedule.timesteps()))
            .collect();
        let (hidden, mask) = self.text.encode(&vec![PROMPT; b], self.device)?;
        let total = diffusion_loss(
            &unet,
            &head,
            &self.schedule,
            &latents,
            &t,
            &noise,
            &hidden,
            &mask,
        )?;
        Ok(Loss {
            total,
            parts: vec![],
        })
    }

    fn checkpoint_extras(&self) -> Result<CheckpointExtras> {
        Ok(CheckpointExtras {
            files: vec![],
            meta: serde_json::Value::Null,
        })
    }

    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        backward_with(loss, self.checkpoint.as_ref())
    }
}

/// Random pixels in [−1, 1] for train-vae's loss: speed and memory do not depend on the images.
struct RandomImages {
    size: usize,
    channels: usize,
}

impl ImageSource for RandomImages {
    fn images(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let shape = (indices.len(), self.channels, self.size, self.size);
        Ok(Tensor::rand(-1f32, 1f32, shape, device)?)
    }
}

/// Optimizer steps of train-diffusion at the config's batch size, accumulation, gradient
/// checkpointing and precision, on random latents.
fn diffusion_training_row(
    req: &Request,
    cfg: &Config,
    device: &Device,
    ldm: &VarMap,
    text: &TextEncoder,
) -> Result<serde_json::Value> {
    let t = &cfg.train_diffusion;
    let precision = crate::device::precision_on(device, req.precision, t.run.precision)?;
    let objective = RandomLatents {
        cfg,
        text,
        ldm,
        device,
        precision,
        checkpoint: checkpointing_for(&t.run, ldm)?,
        schedule: NoiseSchedule::new(&cfg.diffusion),
    };
    time_training(
        req,
        device,
        precision,
        &objective,
        ldm,
        (&t.run, &t.optimizer),
    )
}

/// Optimizer steps of train-vae at the config's batch size, accumulation, gradient checkpointing
/// and precision, on random images.
fn vae_training_row(req: &Request, cfg: &Config, device: &Device) -> Result<serde_json::Value> {
    let t = &cfg.train_vae;
    let precision = crate::device::precision_on(device, req.precision, t.run.precision)?;
    let weights = VarMap::new();
    Vae::new(&cfg.vae, seeded_var_builder(&weights, 3, device))?;
    let images = RandomImages {
        size: cfg.data.image_size,
        channels: cfg.vae.image_channels,
    };
    let objective = VaeObjective::new(
        &cfg.vae,
        &weights,
        &images,
        t.kl_weight,
        device.clone(),
        vec![],
    )
    .with_precision(precision)
    .with_checkpointing(checkpointing_for(&t.run, &weights)?);
    time_training(
        req,
        device,
        precision,
        &objective,
        &weights,
        (&t.run, &t.optimizer),
    )
}

/// `objective`'s optimizer steps through the trainer's accumulation, clipping and AdamW: one
/// warm-up, then `repeats` timed, with the peak memory of the timed ones.
fn time_training(
    req: &Request,
    device: &Device,
    precision: Precision,
    objective: &dyn Objective,
    weights: &VarMap,
    (run, opt): (&RunConfig, &OptimizerConfig),
) -> Result<serde_json::Value> {
    let params = named_params(weights);
    let mut optimizer = AdamW::new(params.clone(), opt)?;
    let batches = vec![(0..run.batch_size).collect::<Vec<usize>>(); run.grad_accumulation];
    let loss_scale = if precision.needs_loss_scaling() {
        INITIAL_SCALE
    } else {
        1.0
    };
    let mut rng = Rng::new(7);
    let mut step = |optimizer: &mut AdamW| -> Result<()> {
        let (mut grads, _) = accumulate(objective, &params, &batches, &mut rng, loss_scale)?
            .with_context(|| format!("a non-finite {} loss on random inputs", objective.stage()))?;
        let norm = global_norm(&grads)?;
        clip_to(&mut grads, norm, opt.grad_clip)?;
        optimizer.step(&grads, opt.lr)?;
        Ok(())
    };
    step(&mut optimizer)?;
    let ops = micro_batch_ops(objective, &batches[0], &mut Rng::new(8), loss_scale)?;
    crate::device::reset_peak(device);
    let (_, ms) = time(device, || {
        for _ in 0..req.repeats {
            step(&mut optimizer)?;
        }
        Ok(())
    })?;
    let per_step = ms / req.repeats as f64;
    Ok(json!({
        "stage": objective.stage(),
        "batch": run.batch_size, "accumulation": run.grad_accumulation,
        "checkpointing": run.grad_checkpointing,
        "precision": format!("{precision:?}").to_lowercase(),
        "ms_per_optimizer_step": per_step,
        "ms_per_micro_batch": per_step / run.grad_accumulation as f64,
        "peak_mib": crate::device::peak_memory_mib(device),
        "ops_per_micro_batch": ops,
    }))
}
