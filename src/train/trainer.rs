//! The training loop shared by both stages: shuffled micro-batches, gradient accumulation (one
//! "step" is one optimizer step everywhere), global-norm clipping, AdamW with a warm-up + cosine
//! schedule, EMA, validation every epoch, checkpoints, exact resume, and non-finite losses skipped
//! and counted.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::ema::Ema;
use super::optim::{clip_to, global_norm, learning_rate, AdamW};
use crate::checkpoint::{
    self, Checkpoint, Checkpointer, Extras, Pick, Stage, TrainState, EMA, FORMAT, LOSS_PLOT,
    METRICS, MODEL, OPTIMIZER,
};
use crate::config::{Config, OptimizerConfig, Precision, RunConfig};
use crate::model::scaler::LossScaler;
use crate::rng::Rng;

const NONFINITE_GRADIENTS: &str = "non-finite gradients";

/// A micro-batch's loss: the scalar to minimise and named parts to log.
pub struct Loss {
    pub total: Tensor,
    pub parts: Vec<(&'static str, Tensor)>,
}

/// What a stage trains.
pub trait Objective {
    fn stage(&self) -> Stage;
    /// The loss of the training images `indices` (cache indices), drawing all randomness from
    /// `rng`, sample by sample, so that a batch gives what its samples give one at a time.
    fn loss(&self, indices: &[usize], rng: &mut Rng) -> Result<Loss>;
    /// What a checkpoint of this stage carries besides the weights.
    fn checkpoint_extras(&self) -> Result<CheckpointExtras> {
        Ok(CheckpointExtras::default())
    }
    /// Gradients of `loss`, including those of gradient-checkpointed segments.
    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(loss.backward()?)
    }
    /// Called after each epoch (numbered from 1) with the weights to show: the EMA ones if the
    /// run keeps an EMA. Sample grids are drawn here.
    fn after_epoch(
        &self,
        _epoch: usize,
        _weights: &HashMap<String, Tensor>,
        _run_dir: &Path,
    ) -> Result<()> {
        Ok(())
    }
}

/// Stage files (name, bytes) and the extras stored in state.json.
#[derive(Default)]
pub struct CheckpointExtras {
    pub files: Vec<(String, Vec<u8>)>,
    pub extras: Option<Extras>,
}

pub struct TrainOptions {
    pub config: Config,
    pub run: RunConfig,
    pub optimizer: OptimizerConfig,
    /// EMA of the weights (diffusion); None for none.
    pub ema_decay: Option<f64>,
    /// What the objective computes in (it builds its networks in this precision); F16 turns on
    /// dynamic loss scaling.
    pub precision: Precision,
    pub out: PathBuf,
    /// Stop after this many optimizer steps in all (smoke tests, benchmarks).
    pub max_steps: Option<u64>,
    pub progress: bool,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Stopped early by Ctrl-C (after saving a checkpoint).
    pub interrupted: bool,
    pub steps: u64,
    pub last_checkpoint: PathBuf,
    pub best_val_loss: Option<f64>,
    pub nonfinite_skipped: u64,
}

fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Keeps the metric lines up to `step`: a resumed run continues the log where its checkpoint was.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::fs::replace(path, kept.as_bytes())
}

/// Draws `loss.png` in `run_dir` from its metrics: the training loss of every step and the
/// validation loss of every epoch. Replaced atomically.
pub fn write_loss_plot(run_dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(run_dir.join(METRICS)).unwrap_or_default();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let step = v["step"].as_f64().unwrap_or(0.0);
        match v["kind"].as_str() {
            Some("step") => train.extend(v["loss"].as_f64().map(|l| (step, l))),
            Some("epoch") => val.extend(v["val_loss"].as_f64().map(|l| (step, l))),
            _ => {}
        }
    }
    let series = [
        crate::io::plot::Series {
            name: "train",
            points: train,
            color: [70, 110, 200],
            markers: false,
        },
        crate::io::plot::Series {
            name: "val",
            points: val,
            color: [230, 120, 20],
            markers: true,
        },
    ];
    let img = crate::io::plot::plot(&series, 800, 480, "step", "loss");
    crate::io::fs::replace_image(&run_dir.join(LOSS_PLOT), img)
}

/// A line for the person watching: above the progress bar, or on stderr when there is none.
fn say(bar: &ProgressBar, line: &str) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// The mean loss over `indices` with a fixed noise seed, so that epochs compare like with like.
pub fn validate(
    objective: &dyn Objective,
    indices: &[usize],
    batch: usize,
    seed: u64,
) -> Result<Option<f64>> {
    if indices.is_empty() {
        return Ok(None);
    }
    let mut rng = Rng::new(seed ^ 0x7661_6c69_6461_7465);
    let mut sum = 0.0;
    for chunk in indices.chunks(batch) {
        let loss = objective.loss(chunk, &mut rng)?;
        sum += scalar(&loss.total)? * chunk.len() as f64;
    }
    Ok(Some(sum / indices.len() as f64))
}

/// Gradients of the mean loss over `batches` (the mean of the micro-batch gradients) and the mean
/// of the logged loss parts; None when a loss is not finite.
///
/// The backward pass runs on `loss · loss_scale` (1 unless F16 loss scaling is on) and the
/// gradients are divided by it again. Each micro-batch's gradients are detached as they are taken
/// and its gradient store dropped before the next one, so that memory stays flat however many
/// micro-batches are accumulated.
#[allow(clippy::type_complexity)]
pub fn accumulate(
    objective: &dyn Objective,
    params: &[(String, Var)],
    batches: &[Vec<usize>],
    rng: &mut Rng,
    loss_scale: f64,
) -> Result<Option<(Vec<Tensor>, Vec<(&'static str, f64)>)>> {
    let k = batches.len() as f64;
    let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut logged: Vec<(&'static str, f64)> = Vec::new();
    for idx in batches {
        let loss = objective.loss(idx, rng)?;
        let value = scalar(&loss.total)?;
        if !value.is_finite() {
            return Ok(None);
        }
        let grads = if loss_scale == 1.0 {
            objective.backward(&loss.total)?
        } else {
            objective.backward(&(&loss.total * loss_scale)?)?
        };
        for (slot, (_, var)) in acc.iter_mut().zip(params) {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.detach(),
                None => var.as_tensor().zeros_like()?,
            };
            *slot = Some(match slot.take() {
                Some(a) => (a + g)?,
                None => g,
            });
        }
        drop(grads);
        let mut parts = vec![("loss", value)];
        for (name, t) in &loss.parts {
            parts.push((name, scalar(t)?));
        }
        for (name, v) in parts {
            match logged.iter_mut().find(|(n, _)| *n == name) {
                Some((_, s)) => *s += v / k,
                None => logged.push((name, v / k)),
            }
        }
    }
    let grads = acc
        .into_iter()
        .map(|g| Ok((g.expect("one gradient per parameter") / (k * loss_scale))?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((grads, logged)))
}

pub fn train(
    objective: &dyn Objective,
    varmap: &VarMap,
    train_indices: &[usize],
    val_indices: &[usize],
    opts: &TrainOptions,
    resume: Option<Checkpoint>,
) -> Result<TrainSummary> {
    let run = &opts.run;
    let micro = run.batch_size;
    let per_step = micro * run.grad_accumulation;
    let steps_per_epoch = train_indices.len() / per_step;
    if steps_per_epoch == 0 {
        bail!(
            "{} training images are fewer than one optimizer step needs (batch_size {} × grad_accumulation {})",
            train_indices.len(),
            micro,
            run.grad_accumulation
        );
    }
    let total_steps = (run.epochs * steps_per_epoch) as u64;
    let stop_at = opts.max_steps.map_or(total_steps, |m| m.min(total_steps));

    let params = crate::model::weights::named_params(varmap);
    let mut optimizer = AdamW::new(params.clone(), &opts.optimizer)?;
    let mut ema = match opts.ema_decay {
        Some(d) => Some(Ema::new(optimizer.params(), d)?),
        None => None,
    };
    let checkpointer = Checkpointer::new(&opts.out, run.keep_last)?;
    let metrics_path = opts.out.join(METRICS);

    let device = params
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let mut state = match resume {
        Some(ckpt) => {
            let model = ckpt.tensors(MODEL, &device)?;
            for (name, var) in &params {
                let t = model
                    .get(name)
                    .with_context(|| format!("{} lacks {name}", ckpt.dir.join(MODEL).display()))?;
                var.set(t)?;
            }
            optimizer.load_state(&ckpt.tensors(OPTIMIZER, &device)?, ckpt.state.step)?;
            if let Some(ema) = ema.as_mut() {
                ema.load(&ckpt.tensors(EMA, &device)?)?;
            }
            truncate_metrics(&metrics_path, ckpt.state.step)?;
            ckpt.state
        }
        None => TrainState {
            format: FORMAT,
            cxrgen_version: env!("CARGO_PKG_VERSION").to_string(),
            stage: objective.stage(),
            step: 0,
            total_steps,
            epoch: 0,
            step_in_epoch: 0,
            epoch_rng: Rng::new(run.seed),
            rng: Rng::new(run.seed ^ 0x6e6f_6973_6521),
            best_val_loss: None,
            nonfinite_skipped: 0,
            loss_scaler: opts
                .precision
                .needs_loss_scaling()
                .then(LossScaler::default),
            extra: None,
            config: opts.config.clone(),
        },
    };
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("cannot open {}", metrics_path.display()))?;

    let bar = if opts.progress {
        let b = ProgressBar::new(stop_at);
        b.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} steps {msg} eta {eta}")
                .expect("valid template"),
        );
        b.set_prefix(objective.stage().name());
        b.set_position(state.step);
        b
    } else {
        ProgressBar::hidden()
    };

    let save = |state: &mut TrainState,
                optimizer: &AdamW,
                ema: &Option<Ema>,
                is_best: bool|
     -> Result<PathBuf> {
        let mut files = vec![
            (
                MODEL.to_string(),
                checkpoint::safetensors_bytes(
                    &params
                        .iter()
                        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                        .collect(),
                )?,
            ),
            (
                OPTIMIZER.to_string(),
                checkpoint::safetensors_bytes(&optimizer.state())?,
            ),
        ];
        if let Some(ema) = ema {
            files.push((
                EMA.to_string(),
                checkpoint::safetensors_bytes(&ema.tensors())?,
            ));
        }
        let extras = objective.checkpoint_extras()?;
        files.extend(extras.files);
        state.extra = extras.extras;
        checkpointer.save(&files, state, is_best)
    };

    let mut last_checkpoint = None;
    let mut consecutive_bad = 0usize;
    let mut interrupted = false;
    'epochs: while state.step < stop_at {
        // Each epoch's order comes from the data generator as it stood at the epoch's start.
        let mut epoch_rng = state.epoch_rng.clone();
        let order = permutation(train_indices.len(), &mut epoch_rng);
        let epoch_start = Instant::now();
        crate::device::reset_peak(&device);
        let mut epoch_loss = (0.0, 0usize);
        while state.step_in_epoch < steps_per_epoch && state.step < stop_at {
            if crate::interrupt::requested() {
                say(
                    &bar,
                    &format!("saving a checkpoint at step {} before stopping", state.step),
                );
                last_checkpoint = Some(save(&mut state, &optimizer, &ema, false)?);
                interrupted = true;
                break 'epochs;
            }
            let t0 = Instant::now();
            let batches: Vec<Vec<usize>> = (0..run.grad_accumulation)
                .map(|k| {
                    let start = (state.step_in_epoch * run.grad_accumulation + k) * micro;
                    order[start..start + micro]
                        .iter()
                        .map(|&i| train_indices[i])
                        .collect()
                })
                .collect();
            let loss_scale = state.loss_scaler.map_or(1.0, |s| s.scale);
            let accumulated = accumulate(objective, &params, &batches, &mut state.rng, loss_scale)?;
            let checked = match accumulated {
                None => Err("non-finite loss"),
                Some((grads, logged)) => {
                    let norm = global_norm(&grads)?;
                    if norm.is_finite() {
                        Ok((grads, logged, norm))
                    } else {
                        Err(NONFINITE_GRADIENTS)
                    }
                }
            };
            if let Some(scaler) = state.loss_scaler.as_mut() {
                match &checked {
                    Ok(_) => scaler.update(true),
                    Err(reason) if *reason == NONFINITE_GRADIENTS && scaler.can_back_off() => {
                        // F16 overflow at this scale: halve it and move on; not a fault.
                        scaler.update(false);
                        writeln!(
                            metrics,
                            "{}",
                            json!({"kind": "skip", "step": state.step, "reason": "F16 gradient overflow", "loss_scale": scaler.scale})
                        )?;
                        state.step_in_epoch += 1;
                        continue;
                    }
                    Err(_) => {}
                }
            }
            if let Err(reason) = checked {
                state.nonfinite_skipped += 1;
                consecutive_bad += 1;
                writeln!(
                    metrics,
                    "{}",
                    json!({"kind": "skip", "step": state.step, "reason": reason})
                )?;
                say(
                    &bar,
                    &format!(
                        "step {}: {reason}, step skipped ({} in a row)",
                        state.step, consecutive_bad
                    ),
                );
                if consecutive_bad >= run.max_nonfinite {
                    let last = Checkpoint::resolve(&opts.out, Pick::Last)
                        .map(|c| format!("{} (step {})", c.dir.display(), c.state.step))
                        .unwrap_or_else(|_| "none was written yet".into());
                    bail!(
                        "{consecutive_bad} non-finite losses in a row at step {}: stopping (max_nonfinite = {}). Last good checkpoint: {last}",
                        state.step,
                        run.max_nonfinite
                    );
                }
                // Move on to the next micro-batches rather than retrying the same ones.
                state.step_in_epoch += 1;
                continue;
            }
            consecutive_bad = 0;
            let (mut grads, logged, grad_norm) = checked.expect("finite");
            clip_to(&mut grads, grad_norm, opts.optimizer.grad_clip)?;
            let lr = learning_rate(&opts.optimizer, state.step, total_steps);
            optimizer.step(&grads, lr)?;
            if let Some(ema) = ema.as_mut() {
                ema.update(optimizer.params(), state.step)?;
            }
            state.step += 1;
            state.step_in_epoch += 1;
            let seconds = t0.elapsed().as_secs_f64();
            let loss = logged[0].1;
            epoch_loss = (epoch_loss.0 + loss, epoch_loss.1 + 1);
            let mut line = json!({
                "kind": "step", "step": state.step, "epoch": state.epoch, "lr": lr,
                "grad_norm": grad_norm, "images_per_s": per_step as f64 / seconds,
            });
            for (name, v) in &logged {
                line[*name] = json!(v);
            }
            if let Some(s) = &state.loss_scaler {
                line["loss_scale"] = json!(s.scale);
            }
            writeln!(metrics, "{line}")?;
            bar.set_position(state.step);
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {:.1} img/s",
                per_step as f64 / seconds
            ));
            if state.step % run.checkpoint_every as u64 == 0
                && state.step_in_epoch < steps_per_epoch
            {
                last_checkpoint = Some(save(&mut state, &optimizer, &ema, false)?);
            }
        }
        let epoch_done = state.step_in_epoch >= steps_per_epoch;
        if epoch_done {
            let val = validate(objective, val_indices, micro, run.seed)?;
            let is_best = val.is_some_and(|v| state.best_val_loss.is_none_or(|b| v < b));
            if is_best {
                state.best_val_loss = val;
            }
            // The next epoch starts from here: its shuffle comes from the generator as it is now.
            state.epoch += 1;
            state.step_in_epoch = 0;
            state.epoch_rng = epoch_rng;
            let peak = crate::device::peak_memory_mib(&device);
            writeln!(
                metrics,
                "{}",
                json!({
                    "kind": "epoch", "epoch": state.epoch, "step": state.step,
                    "train_loss": epoch_loss.0 / epoch_loss.1.max(1) as f64, "val_loss": val,
                    "seconds": epoch_start.elapsed().as_secs_f64(), "peak_rss_mib": crate::device::peak_rss_mib(),
                    "peak_device_mib": if device.is_cuda() { peak } else { None },
                })
            )?;
            say(
                &bar,
                &format!(
                    "epoch {}: train {:.5}, val {}, {} {}",
                    state.epoch,
                    epoch_loss.0 / epoch_loss.1.max(1) as f64,
                    val.map_or("n/a".into(), |v| format!("{v:.5}")),
                    crate::device::peak_memory_label(&device),
                    peak.map_or("n/a".into(), |m| format!("{m:.0} MiB"))
                ),
            );
            last_checkpoint = Some(save(&mut state, &optimizer, &ema, is_best)?);
            metrics.flush()?;
            write_loss_plot(&opts.out)?;
            let shown = match &ema {
                Some(e) => e.tensors(),
                None => params
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                    .collect(),
            };
            objective.after_epoch(state.epoch, &shown, &opts.out)?;
        } else if state.step >= stop_at {
            last_checkpoint = Some(save(&mut state, &optimizer, &ema, false)?);
        }
    }
    bar.finish_and_clear();
    metrics.flush()?;
    write_loss_plot(&opts.out)?;
    let last_checkpoint = match last_checkpoint {
        Some(p) => p,
        None => Checkpoint::resolve(&opts.out, Pick::Last)?.dir,
    };
    Ok(TrainSummary {
        interrupted,
        steps: state.step,
        last_checkpoint,
        best_val_loss: state.best_val_loss,
        nonfinite_skipped: state.nonfinite_skipped,
    })
}
