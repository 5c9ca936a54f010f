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

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::json;

use crate::config::{Config, OptimizerConfig, Precision, RunConfig};
use crate::cuda_graph::CapturedStep;
use crate::device::DeviceChoice;
use crate::diffusion::{
    guided_step, CapturedGuided, Conditioning, LatentDiffusion, Networks, SamplerKind,
    SamplerOptions,
};
use crate::io::stdout::Stdout;
use crate::model::latents::LatentStats;
use crate::model::scaler::LossScaler;
use crate::model::weights::{frozen_weights, init_diffusion_weights, Trainable};
use crate::model::{seeded_var_builder, TextEncoder, Vae};
use crate::rng::Rng;
use crate::train::optim::global_norm;
use crate::train::trainer::{Objective, Stepper};
use crate::train::{DiffusionObjective, ImageSource, Posteriors, VaeObjective};

/// A report-like prompt of about 20 tokens.
const PROMPT: &str = "Moderate cardiomegaly. Small left pleural effusion. No pneumothorax.";

/// The classifier-free guidance scale sampling is timed with.
const GUIDANCE: f64 = 3.0;

pub struct Request {
    pub config: String,
    pub device: DeviceChoice,
    /// Sampling precision (None: F16 on CUDA, F32 on the CPU); training uses the config's on
    /// CUDA and F32 on the CPU unless this is given.
    pub precision: Option<Precision>,
    pub batch_sizes: Vec<usize>,
    /// The sampling steps the per-image figure assumes.
    pub steps: usize,
    /// Denoising steps and decodes timed per batch size (the decode's figure is their median).
    pub repeats: usize,
    /// Also time training steps of the diffusion stage.
    pub train: bool,
    /// Also time training steps of the VAE stage.
    pub train_vae: bool,
    /// Also time convolution forward + backward: candle's own against ours.
    pub kernels: bool,
    /// Also time sampling with the guided step replayed from a CUDA graph.
    pub cuda_graph: bool,
    pub json: bool,
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
    super::use_random_text_encoder(&mut cfg);
    let device = crate::device::open(req.device)?;
    let precision = crate::device::precision_on(&device, req.precision, Precision::F16)?;

    let text = TextEncoder::load(&cfg.text, &device)?;
    let (ldm, vae_weights) = (VarMap::new(), VarMap::new());
    init_diffusion_weights(&cfg, text.hidden_size(), &ldm, 1, &device)?;
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
    let mut out = Stdout::lock();
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
    for r in sampling.iter().filter(|r| r.get("cuda_graph").is_some()) {
        write_graph_row(&mut out, r)?;
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
        writeln!(out, "conv2d forward + backward, ms (candle's: its input gradient is conv_transpose2d; cxrgen's: blocked matrix products on the CPU in F32, the input gradient as convolutions elsewhere):")?;
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

/// The text line of a sampling row's `cuda_graph` figures.
fn write_graph_row(out: &mut impl Write, row: &serde_json::Value) -> Result<()> {
    let (b, g) = (&row["batch"], &row["cuda_graph"]);
    if let Some(e) = g["error"].as_str() {
        writeln!(out, "CUDA graph, batch {b}: not captured ({e})")?;
        return Ok(());
    }
    let what = if g["graph"] == true {
        format!(
            "{} kernels, captured in {:.0} ms, graph memory {} MiB",
            g["kernels"],
            g["capture_ms"].as_f64().unwrap_or(f64::NAN),
            g["graph_memory_mib"]
                .as_f64()
                .map_or("n/a".into(), |m| format!("{m:.0}"))
        )
    } else {
        "no graph on this device: the step ran eagerly".into()
    };
    writeln!(
        out,
        "CUDA graph, batch {b}: {:.2} ms/step ({:.2}× the eager step), max |ε̂ − eager ε̂| {:.1e}; {what}",
        g["ms_per_step"].as_f64().unwrap_or(f64::NAN),
        g["speedup"].as_f64().unwrap_or(f64::NAN),
        g["max_abs_vs_eager"].as_f64().unwrap_or(f64::NAN),
    )?;
    Ok(())
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
                crate::model::conv::conv2d(&x, &w, None, 1, s)?
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

/// Per batch size: the time of `repeats` denoising steps, and the median of `repeats` decodes of
/// their latents.
fn sampling_rows(
    req: &Request,
    cfg: &Config,
    device: &Device,
    precision: Precision,
    ldm: &VarMap,
    vae_weights: &VarMap,
    text: &TextEncoder,
) -> Result<Vec<serde_json::Value>> {
    // Detached: sampled from tracked weights, each step's latents would hold every step before.
    let vae = Vae::new(&cfg.vae, frozen_weights(vae_weights, DType::F32, device))?;
    let vae_half = match precision {
        Precision::F32 => None,
        p => Some(Vae::new(
            &cfg.vae,
            frozen_weights(vae_weights, p.dtype(), device),
        )?),
    };
    let nets = Networks::new(
        cfg,
        text.hidden_size(),
        frozen_weights(ldm, precision.dtype(), device),
        vae,
        vae_half,
    )?;
    let diffusion = LatentDiffusion::new(cfg, LatentStats::UNTRAINED);
    let cond = diffusion.condition(text, &nets, PROMPT, "")?;
    let opts = |steps| SamplerOptions {
        kind: SamplerKind::Ddim,
        steps,
        eta: 0.0,
    };
    let mut rows = Vec::new();
    for &b in &req.batch_sizes {
        let seeds: Vec<u64> = (0..b as u64).collect();
        // Warm-up: kernels compiled, memory pools filled.
        diffusion.sample(&nets, &cond, &seeds, &opts(1), GUIDANCE, &mut |_| {})?;
        let ops = step_ops(&diffusion, &nets, &cond, &seeds)?;
        crate::device::reset_peak(device);
        let (latents, denoise) = time(device, || {
            diffusion.denoise(
                &nets,
                &cond,
                &seeds,
                &opts(req.repeats),
                GUIDANCE,
                &mut |_| {},
            )
        })?;
        // The median of `repeats` decodes (one decode is a single sample of a noisy machine).
        let mut decodes = (0..req.repeats)
            .map(|_| Ok(time(device, || diffusion.decode(&nets, &latents))?.1))
            .collect::<Result<Vec<f64>>>()?;
        decodes.sort_by(f64::total_cmp);
        let mid = decodes.len() / 2;
        // As Python's statistics.median (torch-peer.py's): an even count takes the middle two.
        let decode = if decodes.len() % 2 == 1 {
            decodes[mid]
        } else {
            (decodes[mid - 1] + decodes[mid]) / 2.0
        };
        let step = denoise / req.repeats as f64;
        let decode = decode / b as f64;
        let per_image = (req.steps as f64 * step) / b as f64 + decode;
        let mut row = json!({
            "batch": b, "ms_per_step": step, "decode_ms_per_image": decode,
            "ms_per_image": per_image, "images_per_s": 1e3 / per_image,
            "peak_mib": crate::device::peak_memory_mib(device),
            "ops_per_step": ops,
        });
        if req.cuda_graph {
            let opts = opts(req.repeats);
            row["cuda_graph"] = graph_sampling(cfg, &diffusion, &nets, &cond, &seeds, &opts, step)?;
        }
        rows.push(row);
    }
    Ok(rows)
}

/// `--cuda-graph`: the denoising steps of `opts` for `seeds` with the guided U-Net step replayed
/// from a CUDA graph, through the same sampler as the eager figure `eager_ms` (ms per step); the
/// graph's size and memory, and its largest difference from the eager step on the same inputs.
/// A capture that fails is reported in the row, not fatal.
fn graph_sampling(
    cfg: &Config,
    diffusion: &LatentDiffusion,
    nets: &Networks,
    cond: &Conditioning,
    seeds: &[u64],
    opts: &SamplerOptions,
    eager_ms: f64,
) -> Result<serde_json::Value> {
    let (device, b) = (&nets.device, seeds.len());
    let (c, z) = (cfg.vae.latent_channels, cfg.latent_size());
    let step = guided_step(&nets.unet, GUIDANCE);
    let inputs = cond.step_inputs(&Rng::new(5).randn((b, c, z, z), device)?, 500)?;
    let (captured, capture_ms) = time(device, || Ok(CapturedStep::new(&step, &inputs)))?;
    let captured = match captured {
        Ok(captured) => captured,
        Err(e) => return Ok(json!({ "error": e.to_string() })),
    };
    // The same kernels on the same inputs: the difference should be zero or rounding.
    let diff = (captured.run(&inputs)? - step(&inputs)?)?
        .abs()?
        .max_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let replayed = CapturedGuided {
        step: &captured,
        cond,
    };
    let (_, ms) = time(device, || {
        diffusion.denoise_with(device, replayed, seeds, opts, &mut |_| {})
    })?;
    let ms = ms / opts.steps as f64;
    let stats = captured.stats();
    Ok(json!({
        "graph": captured.is_graph(), "ms_per_step": ms, "speedup": eager_ms / ms,
        "capture_ms": capture_ms, "max_abs_vs_eager": diff,
        "nodes": stats.map(|s| s.nodes), "kernels": stats.map(|s| s.kernels),
        "allocations": stats.map(|s| s.allocations),
        "graph_memory_mib": crate::cuda_graph::graph_memory_mib(device),
    }))
}

/// Tensor operations (≈ kernel launches on CUDA, see [`crate::opcount`]) of one guided DDIM
/// step for `seeds`, counting the sampler's setup (the initial noise: one op per image); None
/// when the counting allocator is not installed.
fn step_ops(
    diffusion: &LatentDiffusion,
    nets: &Networks,
    cond: &Conditioning,
    seeds: &[u64],
) -> Result<Option<usize>> {
    let opts = SamplerOptions {
        kind: SamplerKind::Ddim,
        steps: 1,
        eta: 0.0,
    };
    let (_, ops) = crate::opcount::count(|| {
        diffusion.denoise(nets, cond, seeds, &opts, GUIDANCE, &mut |_| {})
    })?;
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
    let diffusion = LatentDiffusion::new(cfg, LatentStats::UNTRAINED);
    // Unit-variance latents stand in for a cache's posteriors: speed does not depend on them.
    let (b, c, z) = (t.run.batch_size, cfg.vae.latent_channels, cfg.latent_size());
    let posteriors = Posteriors {
        mean: Tensor::zeros((b, c, z, z), DType::F32, device)?,
        logvar: Tensor::zeros((b, c, z, z), DType::F32, device)?,
    };
    let weights = Trainable::new(ldm, device)
        .with_precision(precision)
        .with_checkpointing(&t.run)?;
    let objective = DiffusionObjective::new(
        cfg,
        weights,
        text,
        &diffusion,
        posteriors,
        vec![PROMPT.to_string(); b],
    );
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
    let varmap = VarMap::new();
    Vae::new(&cfg.vae, seeded_var_builder(&varmap, 3, device))?;
    let images = RandomImages {
        size: cfg.data.image_size,
        channels: cfg.vae.image_channels,
    };
    let weights = Trainable::new(&varmap, device)
        .with_precision(precision)
        .with_checkpointing(&t.run)?;
    let objective = VaeObjective::new(&cfg.vae, weights, &images, t.kl_weight, vec![]);
    time_training(
        req,
        device,
        precision,
        &objective,
        &varmap,
        (&t.run, &t.optimizer),
    )
}

/// `objective`'s optimizer steps through the trainer's accumulation, loss scaling, clipping and
/// AdamW: one warm-up, then `repeats` timed, with the peak memory of the timed ones.
fn time_training(
    req: &Request,
    device: &Device,
    precision: Precision,
    objective: &dyn Objective,
    weights: &VarMap,
    (run, opt): (&RunConfig, &OptimizerConfig),
) -> Result<serde_json::Value> {
    let mut stepper = Stepper::new(weights, opt, None)?;
    let batches = vec![(0..run.batch_size).collect::<Vec<usize>>(); run.grad_accumulation];
    let mut scaler = precision.needs_loss_scaling().then(LossScaler::default);
    let ops = micro_batch_ops(
        objective,
        &batches[0],
        &mut Rng::new(8),
        scaler.map_or(1.0, |s| s.scale),
    )?;
    let mut rng = Rng::new(7);
    let mut step = |stepper: &mut Stepper| -> Result<()> {
        loop {
            let scale = scaler.map_or(1.0, |s| s.scale);
            let stage = objective.stage().name();
            let (grads, _) = stepper
                .gradients(objective, &batches, &mut rng, scale)?
                .with_context(|| format!("a non-finite {stage} loss on random inputs"))?;
            let norm = global_norm(&grads)?;
            if !norm.is_finite() {
                // F16 gradients that overflowed at this loss scale (docs/training.md): the
                // trainer skips such a step and halves the scale; here the step is retried.
                // Stepping on them would turn the clip's 0 · inf into NaN weights.
                match scaler.as_mut() {
                    Some(s) if s.can_back_off() => {
                        s.update(false);
                        continue;
                    }
                    _ => bail!("non-finite {stage} gradients on random inputs"),
                }
            }
            if let Some(s) = scaler.as_mut() {
                s.update(true);
            }
            return stepper.apply(grads, norm, opt.lr, 0);
        }
    };
    step(&mut stepper)?;
    crate::device::reset_peak(device);
    let (_, ms) = time(device, || {
        for _ in 0..req.repeats {
            step(&mut stepper)?;
        }
        Ok(())
    })?;
    let per_step = ms / req.repeats as f64;
    Ok(json!({
        "stage": objective.stage().name(),
        "batch": run.batch_size, "accumulation": run.grad_accumulation,
        "checkpointing": run.grad_checkpointing,
        "precision": format!("{precision:?}").to_lowercase(),
        "ms_per_optimizer_step": per_step,
        "ms_per_micro_batch": per_step / run.grad_accumulation as f64,
        "peak_mib": crate::device::peak_memory_mib(device),
        "loss_scale": scaler.map(|s| s.scale),
        "ops_per_micro_batch": ops,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::scaler::INITIAL_SCALE;

    #[test]
    fn an_f16_training_step_that_overflows_is_retried_at_a_lower_loss_scale() {
        let cfg = Config::load("tiny").unwrap();
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        Vae::new(&cfg.vae, seeded_var_builder(&varmap, 3, &dev)).unwrap();
        let weights = Trainable::new(&varmap, &dev).with_precision(Precision::F16);
        // Every pixel white: F16 gradients of the decoder's output bias overflow at the initial
        // loss scale (tests/mixed_precision.rs), which random images no longer do.
        let white = Tensor::ones((2, 1, 64, 64), DType::F32, &dev).unwrap();
        let objective = VaeObjective::new(&cfg.vae, weights, &white, 1e-4, vec![]);
        let req = Request {
            config: "tiny".into(),
            device: DeviceChoice::Cpu,
            precision: Some(Precision::F16),
            batch_sizes: vec![1],
            steps: 1,
            repeats: 1,
            train: false,
            train_vae: true,
            kernels: false,
            cuda_graph: false,
            json: true,
        };
        let mut run = cfg.train_vae.run.clone();
        run.batch_size = 2;
        run.grad_accumulation = 1;
        let row = time_training(
            &req,
            &dev,
            Precision::F16,
            &objective,
            &varmap,
            (&run, &cfg.train_vae.optimizer),
        )
        .unwrap();
        let scale = row["loss_scale"].as_f64().unwrap();
        assert!((1.0..INITIAL_SCALE).contains(&scale), "{row}");
        assert!(row["ms_per_optimizer_step"].as_f64().unwrap().is_finite());
        // The weights took finite steps: nothing NaN was written.
        for var in varmap.all_vars() {
            let m = var.as_tensor().abs().unwrap().max_all().unwrap();
            assert!(m.to_scalar::<f32>().unwrap().is_finite());
        }
    }
}
