//! The training loop shared by both stages, as a [`Trainer`]: shuffled micro-batches, gradient
//! accumulation (one "step" is one optimizer step everywhere), global-norm clipping, AdamW with a
//! warm-up + cosine schedule, EMA, validation every epoch, checkpoints, exact resume, and
//! non-finite losses skipped and counted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use indicatif::ProgressBar;
use serde_json::json;

use super::ema::Ema;
use super::metrics::{write_loss_plot, MetricsLog};
use super::optim::{clip_to, global_norm, learning_rate, AdamW};
use crate::checkpoint::{
    safetensors_bytes, Checkpoint, Checkpointer, Extras, Pick, Stage, TrainState, EMA, FORMAT,
    MODEL, OPTIMIZER,
};
use crate::config::{Config, OptimizerConfig, Precision, RunConfig};
use crate::model::scaler::LossScaler;
use crate::model::weights::named_params;
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
    /// Gradients of `loss`, including those of gradient-checkpointed segments.
    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(loss.backward()?)
    }
    /// What a checkpoint of this stage carries besides the weights.
    fn checkpoint_extras(&self) -> Result<CheckpointExtras> {
        Ok(CheckpointExtras::default())
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

pub struct TrainOptions<'a> {
    pub config: &'a Config,
    pub run: &'a RunConfig,
    pub optimizer: &'a OptimizerConfig,
    /// EMA of the weights (diffusion); None for none.
    pub ema_decay: Option<f64>,
    /// What the objective computes in (it builds its networks in this precision); F16 turns on
    /// dynamic loss scaling.
    pub precision: Precision,
    pub out: &'a Path,
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

/// A line for the person watching: above the progress bar, or on stderr when there is none.
fn say(bar: &ProgressBar, line: &str) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// The mean loss over `indices` with a fixed noise seed, so that epochs compare like with like,
/// and the mean of each of its logged parts.
#[allow(clippy::type_complexity)]
fn validate(
    objective: &dyn Objective,
    indices: &[usize],
    batch: usize,
    seed: u64,
) -> Result<Option<(f64, Vec<(&'static str, f64)>)>> {
    if indices.is_empty() {
        return Ok(None);
    }
    let mut rng = Rng::new(seed ^ 0x7661_6c69_6461_7465);
    let mut sum = 0.0;
    let mut parts: Vec<(&'static str, f64)> = Vec::new();
    for chunk in indices.chunks(batch) {
        let loss = objective.loss(chunk, &mut rng)?;
        let w = chunk.len() as f64;
        sum += scalar(&loss.total)? * w;
        for (name, t) in &loss.parts {
            let v = scalar(t)? * w;
            match parts.iter_mut().find(|(n, _)| n == name) {
                Some((_, s)) => *s += v,
                None => parts.push((name, v)),
            }
        }
    }
    let n = indices.len() as f64;
    Ok(Some((
        sum / n,
        parts.into_iter().map(|(name, v)| (name, v / n)).collect(),
    )))
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

/// The weights being trained and what updates them: AdamW and, optionally, their EMA. The
/// trainer's own path from gradients to new weights, which `cxrgen bench` times too.
pub struct Stepper {
    params: Vec<(String, Var)>,
    optimizer: AdamW,
    /// The global gradient-norm clip (0: none).
    clip: f64,
    ema: Option<Ema>,
}

impl Stepper {
    /// Trains the parameters of `varmap` with `optimizer`, keeping an EMA when `ema_decay` is
    /// given.
    pub fn new(varmap: &VarMap, cfg: &OptimizerConfig, ema_decay: Option<f64>) -> Result<Self> {
        let params = named_params(varmap);
        let optimizer = AdamW::new(params.clone(), cfg)?;
        let ema = match ema_decay {
            Some(d) => Some(Ema::new(optimizer.params(), d)?),
            None => None,
        };
        Ok(Self {
            params,
            optimizer,
            clip: cfg.grad_clip,
            ema,
        })
    }

    /// [`accumulate`] over these parameters.
    #[allow(clippy::type_complexity)]
    pub fn gradients(
        &self,
        objective: &dyn Objective,
        batches: &[Vec<usize>],
        rng: &mut Rng,
        loss_scale: f64,
    ) -> Result<Option<(Vec<Tensor>, Vec<(&'static str, f64)>)>> {
        accumulate(objective, &self.params, batches, rng, loss_scale)
    }

    /// Clips `grads` (whose global norm is `norm`) to the optimizer's `grad_clip`, takes an AdamW
    /// step at learning rate `lr`, and moves the EMA after it (`step`: steps taken before this
    /// one).
    pub fn apply(&mut self, mut grads: Vec<Tensor>, norm: f64, lr: f64, step: u64) -> Result<()> {
        clip_to(&mut grads, norm, self.clip)?;
        self.optimizer.step(&grads, lr)?;
        if let Some(ema) = self.ema.as_mut() {
            ema.update(self.optimizer.params(), step)?;
        }
        Ok(())
    }

    /// The weights as they are, detached: the sample grids draw from them, and sampled from the
    /// Vars themselves every denoising step would record a graph holding all the steps before.
    fn weights(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// The weights to show: the EMA's when there is one.
    fn shown(&self) -> HashMap<String, Tensor> {
        match &self.ema {
            Some(e) => e.tensors(),
            None => self.weights(),
        }
    }

    /// The files of a checkpoint: the weights, the optimizer state and the EMA.
    fn files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = vec![
            (MODEL.to_string(), safetensors_bytes(&self.weights())?),
            (
                OPTIMIZER.to_string(),
                safetensors_bytes(&self.optimizer.state())?,
            ),
        ];
        if let Some(ema) = &self.ema {
            files.push((EMA.to_string(), safetensors_bytes(&ema.tensors())?));
        }
        Ok(files)
    }

    /// Everything [`Stepper::files`] wrote, from `ckpt`.
    fn load(&mut self, ckpt: &Checkpoint, device: &Device) -> Result<()> {
        let model = ckpt.tensors(MODEL, device)?;
        for (name, var) in &self.params {
            let t = model
                .get(name)
                .with_context(|| format!("{} lacks {name}", ckpt.dir.join(MODEL).display()))?;
            var.set(t)?;
        }
        self.optimizer
            .load_state(&ckpt.tensors(OPTIMIZER, device)?, ckpt.state.step)?;
        if let Some(ema) = self.ema.as_mut() {
            ema.load(&ckpt.tensors(EMA, device)?)?;
        }
        Ok(())
    }
}

/// One epoch as the trainer walks it.
struct Epoch {
    /// The data-order generator after drawing this epoch's shuffle: the next epoch's start.
    rng: Rng,
    order: Vec<usize>,
    started: Instant,
    /// Sum and count of the training losses of its steps.
    loss: (f64, usize),
}

/// The training loop of one run: `step` takes an optimizer step, `end_epoch` validates and
/// checkpoints, `save` writes a checkpoint; [`Trainer::run`] drives them until the run's last
/// step or Ctrl-C.
pub struct Trainer<'a> {
    objective: &'a dyn Objective,
    opts: &'a TrainOptions<'a>,
    train: &'a [usize],
    val: &'a [usize],
    steps_per_epoch: usize,
    total_steps: u64,
    /// The step this invocation stops at (`--max-steps`, else the end of the schedule).
    stop_at: u64,
    stepper: Stepper,
    state: TrainState,
    checkpointer: Checkpointer,
    metrics: MetricsLog,
    bar: ProgressBar,
    device: Device,
    consecutive_bad: usize,
    last_checkpoint: Option<PathBuf>,
}

impl<'a> Trainer<'a> {
    /// Trains `objective`'s parameters (`varmap`) on the images `train`, validating on `val`;
    /// from `resume` when given, else from the start.
    pub fn new(
        objective: &'a dyn Objective,
        varmap: &VarMap,
        train: &'a [usize],
        val: &'a [usize],
        opts: &'a TrainOptions<'a>,
        resume: Option<&Checkpoint>,
    ) -> Result<Self> {
        let run = opts.run;
        let per_step = run.batch_size * run.grad_accumulation;
        let steps_per_epoch = train.len() / per_step;
        if steps_per_epoch == 0 {
            bail!(
                "{} training images are fewer than one optimizer step needs (batch_size {} × grad_accumulation {})",
                train.len(),
                run.batch_size,
                run.grad_accumulation
            );
        }
        let total_steps = (run.epochs * steps_per_epoch) as u64;
        let stop_at = opts.max_steps.map_or(total_steps, |m| m.min(total_steps));
        let mut stepper = Stepper::new(varmap, opts.optimizer, opts.ema_decay)?;
        let checkpointer = Checkpointer::new(opts.out, run.keep_last)?;
        let device = stepper
            .params
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu);
        let state = match resume {
            Some(ckpt) => {
                stepper.load(ckpt, &device)?;
                ckpt.state.clone()
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
        // A resumed run continues the log where its checkpoint was (a run stopped before its
        // first checkpoint, from the start).
        let metrics = MetricsLog::open(opts.out, resume.map(|c| c.state.step))?;
        let bar = crate::io::progress::bar(
            stop_at,
            opts.progress,
            Some("{prefix} {bar:30} {pos}/{len} steps {msg} eta {eta}"),
        );
        bar.set_prefix(objective.stage().name());
        bar.set_position(state.step);
        Ok(Self {
            objective,
            opts,
            train,
            val,
            steps_per_epoch,
            total_steps,
            stop_at,
            stepper,
            state,
            checkpointer,
            metrics,
            bar,
            device,
            consecutive_bad: 0,
            last_checkpoint: None,
        })
    }

    /// Trains up to the stop step, an epoch at a time; on Ctrl-C, saves a checkpoint first.
    pub fn run(mut self) -> Result<TrainSummary> {
        let mut interrupted = false;
        'epochs: while self.state.step < self.stop_at {
            // Each epoch's order comes from the data generator as it stood at the epoch's start.
            let mut rng = self.state.epoch_rng.clone();
            let order = permutation(self.train.len(), &mut rng);
            let mut epoch = Epoch {
                rng,
                order,
                started: Instant::now(),
                loss: (0.0, 0),
            };
            crate::device::reset_peak(&self.device);
            while self.state.step_in_epoch < self.steps_per_epoch && self.state.step < self.stop_at
            {
                if crate::interrupt::requested() {
                    let line = format!(
                        "saving a checkpoint at step {} before stopping",
                        self.state.step
                    );
                    say(&self.bar, &line);
                    self.save(false)?;
                    interrupted = true;
                    break 'epochs;
                }
                if let Some(loss) = self.step(&epoch.order)? {
                    epoch.loss = (epoch.loss.0 + loss, epoch.loss.1 + 1);
                }
            }
            if self.state.step_in_epoch >= self.steps_per_epoch {
                self.end_epoch(epoch)?;
            } else if self.state.step >= self.stop_at {
                self.save(false)?;
            }
        }
        self.bar.finish_and_clear();
        self.metrics.flush()?;
        write_loss_plot(self.opts.out)?;
        let last_checkpoint = match self.last_checkpoint {
            Some(p) => p,
            None => Checkpoint::resolve(self.opts.out, Pick::Last)?.dir,
        };
        Ok(TrainSummary {
            interrupted,
            steps: self.state.step,
            last_checkpoint,
            best_val_loss: self.state.best_val_loss,
            nonfinite_skipped: self.state.nonfinite_skipped,
        })
    }

    /// One optimizer step over the next micro-batches of `order`, or a step skipped for a
    /// non-finite loss or non-finite gradients. Returns the step's training loss when taken.
    fn step(&mut self, order: &[usize]) -> Result<Option<f64>> {
        let run = self.opts.run;
        let (micro, per_step) = (run.batch_size, run.batch_size * run.grad_accumulation);
        let t0 = Instant::now();
        let batches: Vec<Vec<usize>> = (0..run.grad_accumulation)
            .map(|k| {
                let start = (self.state.step_in_epoch * run.grad_accumulation + k) * micro;
                order[start..start + micro]
                    .iter()
                    .map(|&i| self.train[i])
                    .collect()
            })
            .collect();
        let loss_scale = self.state.loss_scaler.map_or(1.0, |s| s.scale);
        let accumulated =
            self.stepper
                .gradients(self.objective, &batches, &mut self.state.rng, loss_scale)?;
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
        if let Some(scaler) = self.state.loss_scaler.as_mut() {
            match &checked {
                Ok(_) => scaler.update(true),
                Err(reason) if *reason == NONFINITE_GRADIENTS && scaler.can_back_off() => {
                    // F16 overflow at this scale: halve it and move on; not a fault.
                    scaler.update(false);
                    let line = json!({"kind": "skip", "step": self.state.step, "reason": "F16 gradient overflow", "loss_scale": scaler.scale});
                    self.metrics.write(&line)?;
                    self.state.step_in_epoch += 1;
                    return Ok(None);
                }
                Err(_) => {}
            }
        }
        let (grads, logged, grad_norm) = match checked {
            Ok(taken) => taken,
            Err(reason) => {
                self.skip(reason)?;
                return Ok(None);
            }
        };
        self.consecutive_bad = 0;
        let lr = learning_rate(self.opts.optimizer, self.state.step, self.total_steps);
        self.stepper.apply(grads, grad_norm, lr, self.state.step)?;
        self.state.step += 1;
        self.state.step_in_epoch += 1;
        let seconds = t0.elapsed().as_secs_f64();
        let loss = logged[0].1;
        let mut line = json!({
            "kind": "step", "step": self.state.step, "epoch": self.state.epoch, "lr": lr,
            "grad_norm": grad_norm, "images_per_s": per_step as f64 / seconds,
        });
        for (name, v) in &logged {
            line[*name] = json!(v);
        }
        if let Some(s) = &self.state.loss_scaler {
            line["loss_scale"] = json!(s.scale);
        }
        self.metrics.write(&line)?;
        self.bar.set_position(self.state.step);
        self.bar.set_message(format!(
            "loss {loss:.4} lr {lr:.2e} {:.1} img/s",
            per_step as f64 / seconds
        ));
        if self.state.step.is_multiple_of(run.checkpoint_every as u64)
            && self.state.step_in_epoch < self.steps_per_epoch
        {
            self.save(false)?;
        }
        Ok(Some(loss))
    }

    /// Counts and logs a step skipped for `reason`; too many in a row stop the run.
    fn skip(&mut self, reason: &str) -> Result<()> {
        let run = self.opts.run;
        self.state.nonfinite_skipped += 1;
        self.consecutive_bad += 1;
        self.metrics
            .write(&json!({"kind": "skip", "step": self.state.step, "reason": reason}))?;
        say(
            &self.bar,
            &format!(
                "step {}: {reason}, step skipped ({} in a row)",
                self.state.step, self.consecutive_bad
            ),
        );
        if self.consecutive_bad >= run.max_nonfinite {
            let last = Checkpoint::resolve(self.opts.out, Pick::Last)
                .map(|c| format!("{} (step {})", c.dir.display(), c.state.step))
                .unwrap_or_else(|_| "none was written yet".into());
            bail!(
                "{} non-finite losses in a row at step {}: stopping (max_nonfinite = {}). Last good checkpoint: {last}",
                self.consecutive_bad,
                self.state.step,
                run.max_nonfinite
            );
        }
        // Move on to the next micro-batches rather than retrying the same ones.
        self.state.step_in_epoch += 1;
        Ok(())
    }

    /// The end of an epoch: validation, the epoch's line in the metrics, a checkpoint (`best`
    /// when validation improved), the loss plot and the stage's own end-of-epoch work.
    fn end_epoch(&mut self, epoch: Epoch) -> Result<()> {
        let run = self.opts.run;
        let validated = validate(self.objective, self.val, run.batch_size, run.seed)?;
        let val = validated.as_ref().map(|(v, _)| *v);
        let is_best = val.is_some_and(|v| self.state.best_val_loss.is_none_or(|b| v < b));
        if is_best {
            self.state.best_val_loss = val;
        }
        // The next epoch starts from here: its shuffle comes from the generator as it is now.
        self.state.epoch += 1;
        self.state.step_in_epoch = 0;
        self.state.epoch_rng = epoch.rng;
        let peak = crate::device::peak_memory_mib(&self.device);
        let train_loss = epoch.loss.0 / epoch.loss.1.max(1) as f64;
        let mut line = json!({
            "kind": "epoch", "epoch": self.state.epoch, "step": self.state.step,
            "train_loss": train_loss, "val_loss": val,
            "seconds": epoch.started.elapsed().as_secs_f64(), "peak_rss_mib": crate::device::peak_rss_mib(),
            "peak_device_mib": if self.device.is_cuda() { peak } else { None },
        });
        // The loss's parts on the validation split too (the VAE's MSE and KL, the diffusion
        // model's unweighted MSE under Min-SNR weighting): `val_<part>`.
        for (name, v) in validated.iter().flat_map(|(_, parts)| parts) {
            line[format!("val_{name}")] = (*v).into();
        }
        self.metrics.write(&line)?;
        say(
            &self.bar,
            &format!(
                "epoch {}: train {:.5}, val {}, {} {}",
                self.state.epoch,
                train_loss,
                val.map_or("n/a".into(), |v| format!("{v:.5}")),
                crate::device::peak_memory_label(&self.device),
                peak.map_or("n/a".into(), |m| format!("{m:.0} MiB"))
            ),
        );
        self.save(is_best)?;
        self.metrics.flush()?;
        write_loss_plot(self.opts.out)?;
        self.objective
            .after_epoch(self.state.epoch, &self.stepper.shown(), self.opts.out)
    }

    /// Writes a checkpoint of the weights, the optimizer, the EMA, the state and the stage's
    /// extras; `is_best` points `best` at it too.
    fn save(&mut self, is_best: bool) -> Result<PathBuf> {
        let mut files = self.stepper.files()?;
        let extras = self.objective.checkpoint_extras()?;
        files.extend(extras.files);
        self.state.extra = extras.extras;
        let dir = self.checkpointer.save(&files, &self.state, is_best)?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }
}
