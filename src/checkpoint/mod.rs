//! The run folder and its checkpoints: what `train-vae` and `train-diffusion` write, and what a
//! resumed run, `train-diffusion --vae` and `generate` read.
//!
//! A run folder holds `config.yaml`, `metrics.jsonl`, `loss.png` and `checkpoints/`. Each
//! checkpoint is a folder `checkpoints/step-NNNNNNNN/` (`model.safetensors`,
//! `optimizer.safetensors`, optionally `ema.safetensors` and `vae.safetensors`, and `state.json`),
//! written under a temporary name, synced, then renamed into place. `last.json` and `best.json`
//! point at checkpoints and are replaced by an atomic rename, so a process killed at any moment
//! leaves the previous `last` complete and loadable. Old step checkpoints beyond `keep_last` are
//! removed, never the one `best` points at.
//!
//! `state.json` records its format ([`FORMAT`]); a checkpoint of another format is refused with
//! an error that says so, before anything else is read from it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::io::fs::{replace, sync_dir, write_synced};
use crate::model::latents::LatentStats;
use crate::model::scaler::LossScaler;
use crate::rng::Rng;

mod vae;

pub use vae::TrainedVae;

pub const CONFIG: &str = "config.yaml";
pub const METRICS: &str = "metrics.jsonl";
pub const LOSS_PLOT: &str = "loss.png";
pub const CHECKPOINTS: &str = "checkpoints";
pub const LAST: &str = "last.json";
pub const BEST: &str = "best.json";
pub const STATE: &str = "state.json";
pub const MODEL: &str = "model.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const EMA: &str = "ema.safetensors";
/// The frozen VAE weights a diffusion checkpoint carries, so that it is complete on its own.
pub const VAE_FILE: &str = "vae.safetensors";

/// The format of `state.json` and the files beside it that this cxrgen writes and reads.
/// Checkpoints written before the field existed have the same layout: format 1.
pub const FORMAT: u32 = 1;

/// Which training stage wrote a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Vae,
    Diffusion,
}

impl Stage {
    /// `vae` or `diffusion`, as in state.json.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vae => "vae",
            Self::Diffusion => "diffusion",
        }
    }

    /// The command that trains it.
    pub fn command(self) -> &'static str {
        match self {
            Self::Vae => "train-vae",
            Self::Diffusion => "train-diffusion",
        }
    }
}

/// What a stage's checkpoints record besides the training state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extras {
    /// The latent scale and range of the VAE (trained by a VAE checkpoint, carried by a
    /// diffusion checkpoint).
    #[serde(flatten)]
    pub latents: LatentStats,
    /// Diffusion checkpoints: the VAE checkpoint their `vae.safetensors` was copied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae_source: Option<PathBuf>,
}

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// [`FORMAT`] when written by this cxrgen.
    #[serde(default = "first_format")]
    pub format: u32,
    pub cxrgen_version: String,
    pub stage: Stage,
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
    pub loss_scaler: Option<LossScaler>,
    /// The stage's extras; None until the first checkpoint is written.
    pub extra: Option<Extras>,
    pub config: Config,
}

fn first_format() -> u32 {
    1
}

/// A checkpoint folder and its state.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
}

/// Which checkpoint of a run folder to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The latest (`last.json`): what a resumed run continues from.
    Last,
    /// The one with the lowest validation loss (`best.json`), else the latest: what a trained
    /// model is used as.
    BestElseLast,
}

impl Checkpoint {
    /// The checkpoint `path` names: a checkpoint folder (it holds state.json), or the checkpoint
    /// `pick` chooses in a run folder (it holds checkpoints/).
    pub fn resolve(path: &Path, pick: Pick) -> Result<Self> {
        if path.join(STATE).is_file() {
            return Ok(Self {
                dir: path.to_path_buf(),
                state: read_state(path)?,
            });
        }
        if !path.join(CHECKPOINTS).is_dir() {
            bail!(
                "{} is neither a run folder nor a checkpoint folder (it has no {CHECKPOINTS}/ and no {STATE})",
                path.display()
            );
        }
        match pick {
            Pick::Last => Self::pointed(path, LAST),
            Pick::BestElseLast => Self::pointed(path, BEST).or_else(|_| Self::pointed(path, LAST)),
        }
    }

    /// The checkpoint the pointer file `which` (last.json, best.json) of a run leads to.
    fn pointed(run_dir: &Path, which: &str) -> Result<Self> {
        let pointer_path = run_dir.join(CHECKPOINTS).join(which);
        let text = std::fs::read_to_string(&pointer_path).with_context(|| {
            format!(
                "{} has no checkpoint ({} is missing)",
                run_dir.display(),
                pointer_path.display()
            )
        })?;
        let pointer: Pointer = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", pointer_path.display()))?;
        let dir = run_dir.join(CHECKPOINTS).join(&pointer.dir);
        let state = read_state(&dir)?;
        if state.step != pointer.step {
            bail!(
                "{}: step {} but {} says {}",
                dir.display(),
                state.step,
                which,
                pointer.step
            );
        }
        Ok(Self { dir, state })
    }

    /// This checkpoint if `stage` wrote it; an error naming both stages otherwise.
    pub fn of_stage(self, stage: Stage) -> Result<Self> {
        if self.state.stage != stage {
            bail!(
                "{} is a {} checkpoint (cxrgen {}), not a {} one (cxrgen {})",
                self.dir.display(),
                self.state.stage.name(),
                self.state.stage.command(),
                stage.name(),
                stage.command()
            );
        }
        Ok(self)
    }

    /// The tensors of one of its files.
    pub fn tensors(&self, file: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
        load_tensors(&self.dir.join(file), device)
    }

    /// Writes what sampling needs of this diffusion checkpoint into the new checkpoint folder
    /// `out`: its state.json, its EMA weights and the VAE it carries, stored in `dtype` (F16
    /// halves them; they are read back in any precision). No optimizer state and no raw weights:
    /// the copy generates (`generate --checkpoint`), it does not resume.
    pub fn export(&self, out: &Path, dtype: DType) -> Result<()> {
        if self.state.stage != Stage::Diffusion {
            bail!(
                "{} is a {} checkpoint; only a diffusion checkpoint generates",
                self.dir.display(),
                self.state.stage.name()
            );
        }
        let files = [EMA, VAE_FILE]
            .into_iter()
            .map(|file| {
                let tensors = self
                    .tensors(file, &Device::Cpu)?
                    .into_iter()
                    .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
                    .collect::<Result<Vec<(String, Tensor)>>>()?;
                let bytes =
                    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
                        .with_context(|| format!("cannot serialise {file}"))?;
                Ok((file.to_string(), bytes))
            })
            .collect::<Result<Vec<_>>>()?;
        write_folder(out, &files, &self.state, false)
    }
}

/// Writes a checkpoint folder `dir` holding `files` (name → bytes) and `state`: under a
/// temporary name beside it, synced, then renamed into place, so that `dir` is whole or absent.
/// An existing `dir` is replaced when `replace_existing`, else an error.
fn write_folder(
    dir: &Path,
    files: &[(String, Vec<u8>)],
    state: &TrainState,
    replace_existing: bool,
) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .with_context(|| format!("{}: not a folder name", dir.display()))?
        .to_string_lossy();
    if dir.exists() && !replace_existing {
        bail!("{} already exists; choose another", dir.display());
    }
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| {
        for (file, bytes) in files {
            write_synced(&tmp.join(file), bytes)?;
        }
        write_synced(
            &tmp.join(STATE),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )?;
        sync_dir(&tmp)?;
        if replace_existing && dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot replace {}", dir.display()))?;
        }
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("cannot move the checkpoint to {}", dir.display()))?;
        sync_dir(parent)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Whether the run in `run_dir` has written a checkpoint yet.
pub fn has_checkpoint(run_dir: &Path) -> bool {
    run_dir.join(CHECKPOINTS).join(LAST).is_file()
}

/// The state of the checkpoint in `dir`, after checking its format.
fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    let format = value
        .get("format")
        .map_or(Some(1), serde_json::Value::as_u64);
    if format != Some(FORMAT as u64) {
        let written_by = value["cxrgen_version"].as_str().unwrap_or("unknown");
        let found = format.map_or("an unreadable".into(), |f| format!("format {f}"));
        let age = match format {
            Some(f) if f > FORMAT as u64 => "a newer cxrgen",
            _ => "an older cxrgen",
        };
        bail!(
            "{}: checkpoint {found} (written by cxrgen {written_by}), but this cxrgen {} reads format {FORMAT} only; use {age}, or train again",
            path.display(),
            env!("CARGO_PKG_VERSION")
        );
    }
    serde_json::from_value(value).with_context(|| format!("{} is damaged", path.display()))
}

/// Where a checkpoint pointer leads.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pointer {
    dir: String,
    step: u64,
}

/// Writes the checkpoints of a run.
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
        // The same step may be saved again (end of epoch right after a periodic save).
        write_folder(&final_dir, files, state, true)
            .context("writing a checkpoint failed; the previous checkpoints are intact")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TrainState {
        TrainState {
            format: FORMAT,
            cxrgen_version: "0.1.0".into(),
            stage: Stage::Vae,
            step: 3,
            total_steps: 10,
            epoch: 0,
            step_in_epoch: 3,
            epoch_rng: Rng::new(1),
            rng: Rng::new(2),
            best_val_loss: None,
            nonfinite_skipped: 0,
            loss_scaler: None,
            extra: Some(Extras {
                latents: LatentStats {
                    scale: 0.5,
                    range: Some((-2.0, 3.0)),
                },
                vae_source: None,
            }),
            config: Config::load("tiny").unwrap(),
        }
    }

    /// A checkpoint folder whose state.json is `state` as JSON, changed by `edit`.
    fn folder(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut value = serde_json::to_value(state()).unwrap();
        edit(&mut value);
        std::fs::write(dir.path().join(STATE), value.to_string()).unwrap();
        dir
    }

    #[test]
    fn state_json_keeps_its_layout() {
        let dir = folder(|_| {});
        let ckpt = Checkpoint::resolve(dir.path(), Pick::Last).unwrap();
        assert_eq!(ckpt.state.extra, state().extra);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(STATE)).unwrap())
                .unwrap();
        assert_eq!(v["stage"], "vae");
        assert_eq!(v["extra"]["latent_scale"], 0.5);
        assert_eq!(v["extra"]["latent_range"], serde_json::json!([-2.0, 3.0]));
        assert!(v["extra"].get("vae_source").is_none());
    }

    #[test]
    fn checkpoints_from_before_the_format_field_are_format_1() {
        let dir = folder(|v| {
            v.as_object_mut().unwrap().remove("format");
        });
        let ckpt = Checkpoint::resolve(dir.path(), Pick::BestElseLast).unwrap();
        assert_eq!((ckpt.state.format, ckpt.state.step), (1, 3));
    }

    #[test]
    fn another_format_is_a_clear_error() {
        for (format, says) in [(2, "a newer cxrgen"), (0, "an older cxrgen")] {
            let dir = folder(|v| {
                v["format"] = format.into();
                // A newer format may lay out anything differently: it is refused before parsing.
                v["stage"] = "upscaler".into();
            });
            let err = format!(
                "{:#}",
                Checkpoint::resolve(dir.path(), Pick::Last).unwrap_err()
            );
            assert!(
                err.contains(&format!(
                    "checkpoint format {format} (written by cxrgen 0.1.0)"
                )) && err.contains("reads format 1")
                    && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn a_checkpoint_of_another_stage_is_named_as_such() {
        let dir = folder(|_| {});
        let err = Checkpoint::resolve(dir.path(), Pick::Last)
            .unwrap()
            .of_stage(Stage::Diffusion)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a vae checkpoint (cxrgen train-vae), not a diffusion one"),
            "{err}"
        );
    }

    #[test]
    fn a_folder_that_is_neither_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = Checkpoint::resolve(dir.path(), Pick::Last)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("neither a run folder nor a checkpoint folder"),
            "{err}"
        );
    }
}
