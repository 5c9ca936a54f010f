//! `cxrgen export`: a trained model's sampling weights as a small checkpoint folder to share
//! (the work is [`crate::checkpoint::Checkpoint::export`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::checkpoint::{Checkpoint, Pick};
use crate::config::Precision;

pub struct Request {
    /// A train-diffusion run folder (its best checkpoint, else its last) or checkpoint folder.
    pub checkpoint: PathBuf,
    pub out: PathBuf,
    pub precision: Precision,
}

pub fn run(req: &Request) -> Result<ExitCode> {
    let ckpt = Checkpoint::resolve(&req.checkpoint, Pick::BestElseLast)
        .with_context(|| format!("--checkpoint {}", req.checkpoint.display()))?;
    ckpt.export(&req.out, req.precision.dtype())
        .with_context(|| format!("--out {}", req.out.display()))?;
    let bytes: u64 = std::fs::read_dir(&req.out)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "wrote step {} of {} to {} ({:.1} MB); generate --checkpoint {} reads it",
        ckpt.state.step,
        ckpt.dir.display(),
        req.out.display(),
        bytes as f64 / 1e6,
        req.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
