//! `cxrgen check-device`: does a device compute what the CPU computes? The same weights and
//! inputs through the VAE, the U-Net, one training step's gradients and a 10-step guided DDIM
//! sample, on the CPU and on `--device`, in F32; then each fused kernel forward and backward in
//! F32 and F16; each difference against a tolerance. And on the device alone: the guided step
//! replayed from a CUDA graph against the same step run eagerly.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::json;

use crate::config::Config;
use crate::cuda_graph::CapturedStep;
use crate::device::DeviceChoice;
use crate::diffusion::{guided_step, LatentDiffusion, Networks, SamplerKind, SamplerOptions};
use crate::io::stdout::Stdout;
use crate::model::attention::padding_bias;
use crate::model::latents::LatentStats;
use crate::model::weights::{
    compute_weights, frozen_weights, init_diffusion_weights, named_params,
};
use crate::model::{diffusion_networks, seeded_var_builder, TextEncoder, Vae};
use crate::rng::Rng;

pub struct Request {
    pub config: String,
    pub device: DeviceChoice,
    pub json: bool,
}

/// Largest absolute difference and relative L2 difference ‖a − b‖ / ‖a‖ of two tensors.
fn difference(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let to = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let (a, b) = (to(a)?, to(b)?);
    let (mut max, mut err, mut norm) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        max = max.max((x - y).abs());
        err += (x - y).powi(2);
        norm += x * x;
    }
    Ok((max, (err / norm.max(f64::MIN_POSITIVE)).sqrt()))
}

/// What one device computes from the shared weights and inputs.
struct Outputs {
    reconstruction: Tensor,
    eps: Tensor,
    /// Every trainable parameter's gradient, flattened and concatenated (on the CPU).
    gradients: Tensor,
    images: Tensor,
    /// Only where asked for (the tested device): see [`graph_replay`].
    replay: Option<Result<Replay>>,
}

/// The guided step's outputs for the same inputs, run eagerly and replayed from a CUDA graph.
struct Replay {
    eager: Tensor,
    replayed: Tensor,
    /// Whether a graph was replayed (on the CPU both are the eager step).
    graph: bool,
}

struct Inputs {
    images: Tensor,
    latents: Tensor,
    noise: Tensor,
    t: Vec<usize>,
    texts: Vec<&'static str>,
}

fn compute(
    cfg: &Config,
    device: &Device,
    ldm: &VarMap,
    vae_weights: &VarMap,
    inputs: &Inputs,
    replay: bool,
) -> Result<Outputs> {
    let text = TextEncoder::load(&cfg.text, device)?;
    // Nothing here trains the VAE: detached weights, which record no graph.
    let vae = Vae::new(&cfg.vae, frozen_weights(vae_weights, DType::F32, device))?;
    let post = vae.encode(&inputs.images.to_device(device)?)?;
    let reconstruction = vae.decode(&post.mean)?;

    // The weights move to the device through a tracked copy: gradients come back to the CPU Vars.
    let (unet, head) = diffusion_networks(
        cfg,
        text.hidden_size(),
        compute_weights(ldm, DType::F32, device),
    )?;
    let (unet, head) = (&unet, &head);
    let (hidden, mask) = text.encode(&inputs.texts, device)?;
    let latents = inputs.latents.to_device(device)?;
    let t: Vec<f32> = inputs.t.iter().map(|&t| t as f32).collect();
    let context = candle_core::Module::forward(head, &hidden)?;
    let eps = unet
        .forward(
            &latents,
            &Tensor::new(t.as_slice(), device)?,
            &context,
            Some(&padding_bias(&mask)?),
        )?
        .detach();
    let diffusion = LatentDiffusion::new(cfg, LatentStats::UNTRAINED);
    let (loss, _) = diffusion.loss(
        unet,
        head,
        &latents,
        &inputs.t,
        &inputs.noise.to_device(device)?,
        &hidden,
        &mask,
        None,
    )?;
    let grads = loss.backward()?;
    let gradients = named_params(ldm)
        .iter()
        .map(|(name, v)| {
            grads
                .get(v.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?
                .flatten_all()
                .map_err(Into::into)
        })
        .collect::<Result<Vec<_>>>()?;
    let gradients = Tensor::cat(&gradients, 0)?;

    // Sampling from detached weights, as `generate` does: from the tracked ones every step's
    // latents would carry the graph of all the steps before it.
    let nets = Networks::new(
        cfg,
        text.hidden_size(),
        frozen_weights(ldm, DType::F32, device),
        vae,
        None,
    )?;
    let opts = SamplerOptions {
        kind: SamplerKind::Ddim,
        steps: 10,
        eta: 0.0,
    };
    let images = diffusion.generate(
        &text,
        &nets,
        inputs.texts[0],
        "",
        &[0, 1],
        &opts,
        3.0,
        &mut |_| {},
    )?;
    let images = Tensor::new(images.concat(), &Device::Cpu)?;
    // Last, so that a capture that fails cannot disturb the other rows.
    let replay = replay.then(|| graph_replay(cfg, &text, &nets, &diffusion, inputs.texts[0]));
    Ok(Outputs {
        reconstruction,
        eps,
        gradients,
        images,
        replay,
    })
}

/// The guided step (2 images, guidance 3) replayed from a CUDA graph and run eagerly, for three
/// inputs at three timesteps, each side's outputs concatenated.
fn graph_replay(
    cfg: &Config,
    text: &TextEncoder,
    nets: &Networks,
    diffusion: &LatentDiffusion,
    prompt: &str,
) -> Result<Replay> {
    let device = &nets.device;
    let cond = diffusion.condition(text, nets, prompt, "")?;
    let step = guided_step(&nets.unet, 3.0);
    let (c, z) = (cfg.vae.latent_channels, cfg.latent_size());
    let mut rng = Rng::new(14);
    let inputs = [10, 500, 990]
        .into_iter()
        .map(|t| Ok(cond.step_inputs(&rng.randn((2, c, z, z), device)?, t)?))
        .collect::<Result<Vec<_>>>()?;
    let captured = CapturedStep::new(&step, &inputs[0])?;
    let (mut eager, mut replayed) = (Vec::new(), Vec::new());
    for x in &inputs {
        replayed.push(captured.run(x)?);
        eager.push(step(x)?);
    }
    Ok(Replay {
        eager: Tensor::cat(&eager, 0)?,
        replayed: Tensor::cat(&replayed, 0)?,
        graph: captured.is_graph(),
    })
}

/// A row of the table: `b` against the reference `a`, relative difference within `tol`.
fn row(name: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<serde_json::Value> {
    let (max, rel) = difference(a, b)?;
    Ok(json!({
        "check": name, "max_abs": max, "relative": rel, "tolerance": tol, "ok": rel <= tol,
    }))
}

/// The row of [`graph_replay`]: the same kernels run on both sides, so the tolerance is tight. A
/// capture that fails is a failed row that says why.
fn graph_row(replay: Result<Replay>) -> Result<serde_json::Value> {
    const NAME: &str = "CUDA graph vs eager";
    const TOLERANCE: f64 = 1e-5;
    Ok(match replay {
        Ok(r) => {
            let mut checked = row(NAME, &r.eager, &r.replayed, TOLERANCE)?;
            checked["graph"] = r.graph.into();
            checked
        }
        Err(e) => json!({
            "check": NAME, "max_abs": null, "relative": null, "tolerance": TOLERANCE,
            "ok": false, "error": format!("{e:#}"),
        }),
    })
}

/// The fused kernels (`crate::model::kernels`) on the device against the CPU, each op forward and
/// backward in F32 and F16, as rows of the table.
fn kernel_rows(device: &Device) -> Result<Vec<serde_json::Value>> {
    crate::model::kernels::device_check::comparisons(device)?
        .into_iter()
        .map(|c| row(&c.name, &c.reference, &c.tested, c.tolerance))
        .collect()
}

pub fn run(req: &Request) -> Result<ExitCode> {
    let mut cfg = Config::load(&req.config)?;
    super::use_random_text_encoder(&mut cfg);
    let device = crate::device::open(req.device)?;
    let cpu = Device::Cpu;

    let (ldm, vae_weights) = (VarMap::new(), VarMap::new());
    let text_hidden = TextEncoder::load(&cfg.text, &cpu)?.hidden_size();
    init_diffusion_weights(&cfg, text_hidden, &ldm, 11, &cpu)?;
    Vae::new(&cfg.vae, seeded_var_builder(&vae_weights, 12, &cpu))?;
    let mut rng = Rng::new(13);
    let (s, c, z) = (
        cfg.data.image_size,
        cfg.vae.latent_channels,
        cfg.latent_size(),
    );
    let inputs = Inputs {
        images: (rng.randn((2, 1, s, s), &cpu)? * 0.5)?.clamp(-1f32, 1f32)?,
        latents: rng.randn((2, c, z, z), &cpu)?,
        noise: rng.randn((2, c, z, z), &cpu)?,
        t: vec![10, 700],
        texts: vec![
            "Large right pleural effusion.",
            "No acute cardiopulmonary abnormality.",
        ],
    };
    let reference = compute(&cfg, &cpu, &ldm, &vae_weights, &inputs, false)?;
    let tested = compute(&cfg, &device, &ldm, &vae_weights, &inputs, true)?;

    // F32 on both sides: differences come from summation order only. Ten sampling steps with
    // guidance amplify them, hence the looser image tolerance (intensities in [0, 1]).
    let rows = [
        (
            "VAE reconstruction",
            &reference.reconstruction,
            &tested.reconstruction,
            1e-4,
        ),
        ("U-Net epsilon", &reference.eps, &tested.eps, 1e-4),
        (
            "training gradients",
            &reference.gradients,
            &tested.gradients,
            1e-3,
        ),
        (
            "10-step DDIM images",
            &reference.images,
            &tested.images,
            1e-2,
        ),
    ];
    let mut results = Vec::new();
    for (name, a, b, tol) in rows {
        results.push(row(name, a, b, tol)?);
    }
    if let Some(replay) = tested.replay {
        results.push(graph_row(replay)?);
    }
    results.extend(kernel_rows(&device)?);
    let all_ok = results.iter().all(|r| r["ok"] == true);
    let name = crate::device::name(&device);
    let mut out = Stdout::lock();
    if req.json {
        writeln!(
            out,
            "{}",
            json!({"config": req.config, "device": name, "checks": results, "ok": all_ok})
        )?;
    } else {
        writeln!(
            out,
            "# {name} against the CPU, config {}, F32 (fused kernels: F32 and F16)",
            req.config
        )?;
        writeln!(
            out,
            "{:<22} {:>12} {:>12} {:>10}  ok",
            "check", "max |diff|", "relative", "tolerance"
        )?;
        for r in &results {
            if let Some(e) = r["error"].as_str() {
                eprintln!("{}: {e}", r["check"].as_str().unwrap_or(""));
            }
            writeln!(
                out,
                "{:<22} {:>12.3e} {:>12.3e} {:>10.0e}  {}",
                r["check"].as_str().unwrap_or(""),
                r["max_abs"].as_f64().unwrap_or(f64::NAN),
                r["relative"].as_f64().unwrap_or(f64::NAN),
                r["tolerance"].as_f64().unwrap_or(f64::NAN),
                if r["ok"] == true { "yes" } else { "NO" }
            )?;
        }
    }
    if !all_ok {
        eprintln!("{name} disagrees with the CPU beyond tolerance (see the table)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
