//! Checkpoints that survive any interruption.
//!
//! A run folder holds `config.yaml`, `metrics.jsonl` and `checkpoints/`. Each checkpoint is a
//! folder `checkpoints/step-NNNNNNNN/` (`model.safetensors`, `optimizer.safetensors`, optionally
//! `ema.safetensors` and stage files such as `vae.safetensors`, and `state.json`), written under a
//! temporary name, synced, then renamed into place. `last.json` and `best.json` point at
//! checkpoints and are replaced by an atomic rename, so a process killed at any moment leaves the
//! previous `last` complete and loadable. Old step checkpoints beyond `keep_last` are removed,
//! never the one `best` points at.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::io::fs::{replace, sync_dir, write_synced};
use crate::rng::Rng;

pub const CHECKPOINTS: &str = "checkpoints";
pub const LAST: &str = "last.json";
pub const BEST: &str = "best.json";
pub const STATE: &str = "state.json";
pub const MODEL: &str = "model.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const EMA: &str = "ema.safetensors";

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub cxrgen_version: String,
    /// `vae` or `diffusion`.
    pub stage: String,
    /// Optimizer steps taken.
    pub step: u64,
    pub total_steps: u64,
    pub epoch: usize,
    /// Batch groups (grad_accumulation micro-batches each) already used in `epoch`: optimizer
    /// steps plus any skipped for a non-finite loss.
    pub step_in_epoch: usize,
    /// The data-order generator as it was at the start of `epoch` (the epoch's shuffle is drawn
    /// from it again on resume).
    pub epoch_rng: Rng,
    /// The generator of noise, timesteps and null conditioning, now.
    pub rng: Rng,
    pub best_val_loss: Option<f64>,
    pub nonfinite_skipped: u64,
    /// The F16 loss scaler; None when the run computes in F32 or BF16.
    #[serde(default)]
    pub loss_scaler: Option<crate::model::scaler::LossScaler>,
    /// Stage data: the VAE's latent scale, the diffusion run's VAE source, ...
    pub extra: serde_json::Value,
    pub config: Config,
}

/// Where a checkpoint pointer leads.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pointer {
    dir: String,
    step: u64,
}

/// Serialises tensors to safetensors bytes.
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let items: Vec<(&str, &Tensor)> = names.iter().map(|n| (n.as_str(), &tensors[*n])).collect();
    Ok(safetensors::serialize(items, None)?)
}

pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read {}", path.display()))
}

pub struct Checkpointer {
    dir: PathBuf,
    keep_last: usize,
}

impl Checkpointer {
    /// The checkpoints of the run in `run_dir` (created if needed).
    pub fn new(run_dir: &Path, keep_last: usize) -> Result<Self> {
        let dir = run_dir.join(CHECKPOINTS);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { dir, keep_last })
    }

    /// Writes a checkpoint of `files` (name → bytes) and `state`, points `last` at it (and `best`
    /// when `is_best`), and prunes old ones. Returns its folder.
    pub fn save(
        &self,
        files: &[(String, Vec<u8>)],
        state: &TrainState,
        is_best: bool,
    ) -> Result<PathBuf> {
        let name = format!("step-{:08}", state.step);
        let final_dir = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let result = (|| {
            for (file, bytes) in files {
                write_synced(&tmp.join(file), bytes)?;
            }
            write_synced(
                &tmp.join(STATE),
                serde_json::to_string_pretty(state)?.as_bytes(),
            )?;
            sync_dir(&tmp)?;
            if final_dir.exists() {
                // The same step saved again (end of epoch right after a periodic save).
                std::fs::remove_dir_all(&final_dir)
                    .with_context(|| format!("cannot replace {}", final_dir.display()))?;
            }
            std::fs::rename(&tmp, &final_dir).with_context(|| {
                format!("cannot move the checkpoint to {}", final_dir.display())
            })?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(
                e.context("writing a checkpoint failed; the previous checkpoints are intact")
            );
        }
        let pointer = serde_json::to_vec(&Pointer {
            dir: name,
            step: state.step,
        })?;
        replace(&self.dir.join(LAST), &pointer)?;
        if is_best {
            replace(&self.dir.join(BEST), &pointer)?;
        }
        self.prune()?;
        Ok(final_dir)
    }

    fn pointed(&self, file: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join(file)).ok()?;
        serde_json::from_str::<Pointer>(&text).ok().map(|p| p.dir)
    }

    fn prune(&self) -> Result<()> {
        let keep: Vec<String> = [self.pointed(LAST), self.pointed(BEST)]
            .into_iter()
            .flatten()
            .collect();
        let mut steps: Vec<String> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-"))
            .collect();
        steps.sort();
        let excess = steps.len().saturating_sub(self.keep_last);
        for old in steps.into_iter().take(excess) {
            if !keep.contains(&old) {
                std::fs::remove_dir_all(self.dir.join(&old))
                    .with_context(|| format!("cannot remove old checkpoint {old}"))?;
            }
        }
        Ok(())
    }
}

/// The state of the checkpoint in `dir`.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
}

/// The folder `last` (or `best`) points at in a run, with its state.
pub fn resolve(run_dir: &Path, which: &str) -> Result<(PathBuf, TrainState)> {
    let dir = run_dir.join(CHECKPOINTS);
    let pointer_path = dir.join(which);
    let text = std::fs::read_to_string(&pointer_path).with_context(|| {
        format!(
            "{} has no checkpoint ({} is missing)",
            run_dir.display(),
            pointer_path.display()
        )
    })?;
    let pointer: Pointer = serde_json::from_str(&text)
        .with_context(|| format!("{} is damaged", pointer_path.display()))?;
    let ckpt = dir.join(&pointer.dir);
    let state = read_state(&ckpt)?;
    if state.step != pointer.step {
        bail!(
            "{}: step {} but {} says {}",
            ckpt.display(),
            state.step,
            which,
            pointer.step
        );
    }
    Ok((ckpt, state))
}
