//! `cxrgen generate`: images from a prompt, written as PNGs that say what they are.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::diffusion::pipeline::Pipeline;
use crate::diffusion::SamplerOptions;
use crate::io::png::{self, Pixels};

/// The notice every generated image carries (paper §5.4: mark synthetic images).
pub const SYNTHETIC_NOTICE: &str = "SYNTHETIC IMAGE - NOT FOR DIAGNOSTIC USE";

pub struct Request {
    pub checkpoint: PathBuf,
    pub prompt: String,
    pub negative_prompt: String,
    pub unconditional: bool,
    pub n: usize,
    pub seed: u64,
    pub sampler: SamplerOptions,
    pub guidance: f64,
    pub batch_size: usize,
    pub out: PathBuf,
    /// 8 or 16 bits per pixel.
    pub bits: u8,
    pub ema: bool,
    pub json: bool,
    pub progress: bool,
    pub device: crate::device::DeviceChoice,
}

fn validate(req: &Request) -> Result<()> {
    if req.prompt.trim().is_empty() && !req.unconditional {
        bail!("--prompt is empty: give a prompt, or pass --unconditional to sample without one");
    }
    if req.bits != 8 && req.bits != 16 {
        bail!("--bits {}: must be 8 or 16", req.bits);
    }
    if req.n == 0 {
        bail!("--n 0: nothing to generate");
    }
    if req.batch_size == 0 {
        bail!("--batch-size 0: must be at least 1");
    }
    if req.sampler.steps == 0 {
        bail!("--steps 0: must be at least 1");
    }
    if !(req.guidance.is_finite() && req.guidance >= 0.0) {
        bail!(
            "--guidance-scale {}: must be a finite number ≥ 0",
            req.guidance
        );
    }
    if !(req.sampler.eta.is_finite() && req.sampler.eta >= 0.0) {
        bail!("--eta {}: must be a finite number ≥ 0", req.sampler.eta);
    }
    if req.seed.checked_add(req.n as u64 - 1).is_none() {
        bail!("--seed {} + --n {} overflows", req.seed, req.n);
    }
    Ok(())
}

/// Creates the output folder and checks that it can be written, before any work is done.
fn prepare_out(req: &Request) -> Result<()> {
    std::fs::create_dir_all(&req.out)
        .with_context(|| format!("--out {}: cannot create the folder", req.out.display()))?;
    let probe = req
        .out
        .join(format!(".cxrgen-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("--out {}: the folder cannot be written", req.out.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

pub fn run(req: &Request) -> Result<ExitCode> {
    validate(req)?;
    let device = crate::device::open(req.device)?;
    let pipeline = Pipeline::load(&req.checkpoint, req.ema, &device)?;
    let t_max = pipeline.config.diffusion.timesteps;
    if req.sampler.steps > t_max {
        bail!(
            "--steps {}: the model has {t_max} diffusion timesteps",
            req.sampler.steps
        );
    }
    let tokenizer = &pipeline.text_encoder().tokenizer;
    for (flag, text) in [
        ("--prompt", &req.prompt),
        ("--negative-prompt", &req.negative_prompt),
    ] {
        if tokenizer.encode(text)?.1 {
            eprintln!(
                "warning: {flag} is longer than the model's limit of {} tokens (text.max_tokens) and was truncated",
                tokenizer.max_tokens()
            );
        }
    }
    prepare_out(req)?;

    let size = pipeline.config.data.image_size as u32;
    let seeds: Vec<u64> = (0..req.n as u64).map(|i| req.seed + i).collect();
    let bar = if req.progress {
        indicatif::ProgressBar::new((req.n * req.sampler.steps) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut stdout = std::io::stdout().lock();
    for batch in seeds.chunks(req.batch_size) {
        if crate::interrupt::requested() {
            return Err(crate::interrupt::Interrupted.into());
        }
        let images = pipeline.parts().generate(
            &req.prompt,
            &req.negative_prompt,
            batch,
            &req.sampler,
            req.guidance,
            &mut |_| bar.inc(batch.len() as u64),
        )?;
        for (seed, img) in batch.iter().zip(images) {
            let path = req.out.join(format!("cxr-{seed:08}.png"));
            let meta = [
                ("prompt", req.prompt.clone()),
                ("negative_prompt", req.negative_prompt.clone()),
                ("seed", seed.to_string()),
                ("sampler", req.sampler.kind.name().to_string()),
                ("steps", req.sampler.steps.to_string()),
                ("eta", req.sampler.eta.to_string()),
                ("guidance_scale", req.guidance.to_string()),
                ("checkpoint_sha256", pipeline.weights_sha256.clone()),
                ("weights", if req.ema { "ema" } else { "raw" }.to_string()),
                ("software", format!("cxrgen {}", env!("CARGO_PKG_VERSION"))),
                ("Disclaimer", SYNTHETIC_NOTICE.to_string()),
            ];
            if req.bits == 16 {
                let px: Vec<u16> = img.iter().map(|v| (v * 65535.0).round() as u16).collect();
                png::write(&path, Pixels::Sixteen(&px), size, &meta)?;
            } else {
                let px: Vec<u8> = img.iter().map(|v| (v * 255.0).round() as u8).collect();
                png::write(&path, Pixels::Eight(&px), size, &meta)?;
            }
            if req.json {
                let line = json!({
                    "path": path.display().to_string(), "prompt": req.prompt, "seed": seed,
                    "sampler": req.sampler.kind.name(), "steps": req.sampler.steps, "guidance": req.guidance,
                });
                if writeln!(stdout, "{line}").is_err() {
                    // A closed pipe: the reader has gone; stop quietly.
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
    }
    bar.finish_and_clear();
    if !req.json {
        eprintln!("wrote {} image(s) to {}", req.n, req.out.display());
    }
    Ok(ExitCode::SUCCESS)
}
