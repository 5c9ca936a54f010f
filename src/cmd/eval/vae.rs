//! `cxrgen eval vae`: how well a trained VAE reconstructs held-out images. Each image is encoded
//! to its posterior mean (no sampling, so the numbers do not depend on a seed), decoded, clamped
//! to [−1, 1] and mapped to [0, 1], then compared with the original: SSIM, PSNR, MSE and LPIPS,
//! each as mean ± standard deviation over the images.

use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::paired::{md_rows, Paired};
use super::report::{finish, held_out, json_bytes, progress_bar, unit, OutDir};
use super::{Metric, Request};
use crate::checkpoint::{Checkpoint, Pick, Stage, TrainedVae};
use crate::data::cache::Cache;

/// The paper's reconstruction SSIM (§3.2.1), shown beside ours.
const PAPER_SSIM: f64 = 0.89;

const RECONSTRUCTION: &str = "the encoder's posterior mean (no sampling), decoded in F32, clamped to [-1, 1] and mapped to [0, 1]; compared with the cached 8-bit original mapped to [0, 1]";

pub fn run(req: &Request) -> Result<ExitCode> {
    let asked = req.asked_metrics()?;
    let device = crate::device::open(req.device)?;
    // A train-vae run folder (its best checkpoint, else its last) or checkpoint folder.
    let checkpoint = req
        .checkpoint
        .as_ref()
        .context("eval vae needs --checkpoint")?;
    let ckpt = Checkpoint::resolve(checkpoint, Pick::BestElseLast)
        .and_then(|c| c.of_stage(Stage::Vae))
        .with_context(|| format!("--checkpoint {}", checkpoint.display()))?;
    let trained = TrainedVae::trained_in(&ckpt, &device)?;
    let cache = Cache::open(&req.data).with_context(|| format!("--data {}", req.data.display()))?;
    let size = ckpt.state.config.data.image_size;
    let indices = held_out(req, &cache, size)?;
    let mut left_out = Vec::new();
    let mut paired = Paired::for_request(req, &asked, size, &device, &mut left_out)?;
    let out = OutDir::prepare(&req.out_dir())?;

    let bar = progress_bar(req, indices.len());
    for chunk in indices.chunks(req.batch_size) {
        if crate::interrupt::requested() {
            return Err(crate::interrupt::Interrupted.into());
        }
        let real = cache.images(chunk, &device)?;
        let latent = trained.vae.encode(&real)?.mean;
        let recon = trained.vae.decode(&latent)?.clamp(-1f32, 1f32)?;
        paired.add(&unit(&recon)?, &unit(&real)?)?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();

    let summaries = paired.summaries()?;
    let vae_sha256 = format!("{:x}", Sha256::digest(&trained.bytes));
    let report = json!({
        "cxrgen_version": env!("CARGO_PKG_VERSION"),
        "task": "vae",
        "checkpoint": {
            "path": ckpt.dir.display().to_string(),
            "stage": ckpt.state.stage.name(),
            "step": ckpt.state.step,
            "weights_sha256": vae_sha256,
        },
        "data": {
            "cache": req.data.display().to_string(),
            "split": req.split.name(),
            "images": indices.len(),
            "image_size": size,
            "resize": "none: every metric sees the images at their cached size",
        },
        "device": crate::device::name(&device),
        "reconstruction": RECONSTRUCTION,
        "metrics": paired.json(&summaries)?,
        "left_out": left_out,
        "paper": {"ssim": PAPER_SSIM, "where": "§3.2.1, VAE reconstruction SSIM"},
    });

    let mut md = format!(
        "# cxrgen eval vae\n\nVAE `{}` (step {}, weights sha256 `{}`) on the {} split of `{}`: {} images of {size}×{size}, on {}.\n\nReconstruction: {RECONSTRUCTION}.\n\n| metric | mean ± std | images | paper |\n|---|---|---|---|\n",
        ckpt.dir.display(),
        ckpt.state.step,
        &vae_sha256[..16],
        req.split,
        req.data.display(),
        indices.len(),
        crate::device::name(&device),
    );
    md.push_str(&md_rows(&summaries, |m| match m {
        Metric::Ssim => format!("{PAPER_SSIM} (§3.2.1)"),
        _ => "–".into(),
    }));
    md.push_str("\nRecipes, weights and their SHA-256 are in eval.json; docs/evaluation.md explains each metric.\n");
    for line in &left_out {
        md.push_str(&format!("\n{line}.\n"));
    }

    out.write(&[
        ("eval.json", &json_bytes(&report)?[..]),
        ("eval.md", md.as_bytes()),
    ])?;
    finish(req, &left_out, &summaries);
    Ok(ExitCode::SUCCESS)
}
