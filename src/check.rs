//! `cxrgen check-device`: does a device compute what the CPU computes? The same weights and
//! inputs through the VAE, the U-Net, one training step's gradients and a 10-step guided DDIM
//! sample, on the CPU and on `--device`, in F32; then each fused kernel forward and backward in
//! F32 and F16; each difference against a tolerance.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::json;

use crate::config::Config;
use crate::device::DeviceChoice;
use crate::diffusion::pipeline::Parts;
use crate::diffusion::{NoiseSchedule, SamplerKind, SamplerOptions};
use crate::model::attention::padding_bias;
use crate::model::{diffusion_networks, seeded_var_builder, TextEncoder, Vae};
use crate::rng::Rng;
use crate::train::losses::diffusion_loss;
use crate::train::stages::{compute_weights, init_diffusion_weights};
use crate::train::trainer::named_params;

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
) -> Result<Outputs> {
    let text = TextEncoder::load(&cfg.text, device)?;
    let vae = Vae::new(&cfg.vae, compute_weights(vae_weights, DType::F32, device))?;
    let post = vae.encode(&inputs.images.to_device(device)?)?;
    let reconstruction = vae.decode(&post.mean)?.detach();

    // The weights move to the device through a tracked copy: gradients come back to the CPU Vars.
    let (unet, head) = diffusion_networks(
        cfg,
        text.hidden_size(),
        compute_weights(ldm, DType::F32, device),
    )?;
    let (hidden, mask) = text.encode(&inputs.texts, device)?;
    let latents = inputs.latents.to_device(device)?;
    let t: Vec<f32> = inputs.t.iter().map(|&t| t as f32).collect();
    let context = candle_core::Module::forward(&head, &hidden)?;
    let eps = unet
        .forward(
            &latents,
            &Tensor::new(t.as_slice(), device)?,
            &context,
            Some(&padding_bias(&mask)?),
        )?
        .detach();
    let schedule = NoiseSchedule::new(&cfg.diffusion);
    let loss = diffusion_loss(
        &unet,
        &head,
        &schedule,
        &latents,
        &inputs.t,
        &inputs.noise.to_device(device)?,
        &hidden,
        &mask,
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

    let parts = Parts {
        config: cfg,
        unet: &unet,
        head: &head,
        text: &text,
        vae: &vae,
        vae_half: None,
        latent_scale: 1.0,
        latent_range: Some((-4.0, 4.0)),
        device,
    };
    let opts = SamplerOptions {
        kind: SamplerKind::Ddim,
        steps: 10,
        eta: 0.0,
    };
    let images = parts.generate(inputs.texts[0], "", &[0, 1], &opts, 3.0, &mut |_| {})?;
    let images = Tensor::new(images.concat(), &Device::Cpu)?;
    Ok(Outputs {
        reconstruction,
        eps,
        gradients,
        images,
    })
}

/// The fused kernels (`crate::model::kernels`) on the device against the CPU, each op forward and
/// backward in F32 and F16, as rows of the table.
fn kernel_rows(device: &Device) -> Result<Vec<serde_json::Value>> {
    crate::model::kernels::device_check::comparisons(device)?
        .into_iter()
        .map(|c| {
            let (max, rel) = difference(&c.reference, &c.tested)?;
            Ok(json!({
                "check": c.name, "max_abs": max, "relative": rel, "tolerance": c.tolerance,
                "ok": rel <= c.tolerance,
            }))
        })
        .collect()
}

pub fn run(req: &Request) -> Result<ExitCode> {
    let mut cfg = Config::load(&req.config)?;
    crate::bench::use_random_text_encoder(&mut cfg);
    let device = crate::device::open(req.device)?;
    let cpu = Device::Cpu;

    let (ldm, vae_weights) = (VarMap::new(), VarMap::new());
    init_diffusion_weights(&cfg, &TextEncoder::load(&cfg.text, &cpu)?, &ldm, 11, &cpu)?;
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
    let reference = compute(&cfg, &cpu, &ldm, &vae_weights, &inputs)?;
    let tested = compute(&cfg, &device, &ldm, &vae_weights, &inputs)?;

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
        let (max, rel) = difference(a, b)?;
        results.push(json!({
            "check": name, "max_abs": max, "relative": rel, "tolerance": tol, "ok": rel <= tol,
        }));
    }
    results.extend(kernel_rows(&device)?);
    let all_ok = results.iter().all(|r| r["ok"] == true);
    let name = crate::device::name(&device);
    let mut out = std::io::stdout().lock();
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
