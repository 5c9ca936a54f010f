//! `cxrgen eval`: a trained model judged by the metrics of [`crate::eval`].
//!
//! - `vae.rs`, [`generation`]: `cxrgen eval vae` and `cxrgen eval generation`.
//! - `paired.rs`: the paired metrics both compute (SSIM, PSNR, MSE, LPIPS), accumulated image by
//!   image; `report.rs`: the held-out images, progress, and the outputs (eval.json, eval.md, the
//!   figures), written all at once or not at all.
//! - For `eval generation`: `distribution.rs` (FID and KID with the real-vs-real floor, on
//!   Inception's or the classifier's features), `alignment.rs` (judge 1: the alignment
//!   classifier), [`judge`] (judge 2: the phantom measurements), `images.rs` (`--images DIR`).
//!
//! docs/evaluation.md gives each metric's recipe and the reference it is checked against.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_nn::VarBuilder;

use crate::data::split::Split;
use crate::device::DeviceChoice;
use crate::eval::weights;

mod alignment;
mod distribution;
pub mod generation;
mod images;
pub mod judge;
mod paired;
mod report;
mod vae;

/// What `cxrgen eval` evaluates.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// A train-vae run: its reconstructions of held-out images.
    Vae,
    /// A train-diffusion run: images it generates from held-out reports.
    Generation(generation::Options),
}

impl Task {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Vae => "vae",
            Self::Generation(_) => "generation",
        }
    }

    /// The metrics it computes.
    pub fn metrics(&self) -> &'static [Metric] {
        match self {
            Self::Vae => &paired::PAIRED,
            Self::Generation(_) => &Metric::ALL,
        }
    }
}

/// A metric that `--metrics` can ask for by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Ssim,
    Psnr,
    Mse,
    Lpips,
    Fid,
    Kid,
    MsSsim,
}

impl Metric {
    pub const ALL: [Metric; 7] = [
        Self::Ssim,
        Self::Psnr,
        Self::Mse,
        Self::Lpips,
        Self::Fid,
        Self::Kid,
        Self::MsSsim,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ssim => "ssim",
            Self::Psnr => "psnr",
            Self::Mse => "mse",
            Self::Lpips => "lpips",
            Self::Fid => "fid",
            Self::Kid => "kid",
            Self::MsSsim => "ms-ssim",
        }
    }
}

impl FromStr for Metric {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
                format!("'{s}' is not a metric: use {}", names.join(", "))
            })
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One prompt of `eval generation` and where its images come from.
pub struct Prompt {
    /// The text the images were generated from.
    pub text: String,
    /// The cache indices of the split's reports with this text (generating: the one report it
    /// is); the first one's real image is paired with the prompt's first image.
    pub reports: Vec<usize>,
    /// Per image, where it came from: `seed N`, or its file.
    pub sources: Vec<String>,
}

pub struct Request {
    pub task: Task,
    /// A run folder (its best checkpoint, else its last) or a checkpoint folder; None only for
    /// `eval generation --images`.
    pub checkpoint: Option<PathBuf>,
    /// The prepared cache holding the held-out images.
    pub data: PathBuf,
    pub split: Split,
    /// None: `eval-<task>-<split>` inside the run folder given as `checkpoint` (with `--images`,
    /// inside that folder).
    pub out: Option<PathBuf>,
    /// None: every metric of the task, those whose weights are not fetched left out with a
    /// line saying so; Some: exactly these, a missing weights file being an error.
    pub metrics: Option<Vec<Metric>>,
    /// The folder of the metric networks' weights (None: [`weights::default_dir`]).
    pub weights: Option<PathBuf>,
    pub batch_size: usize,
    pub device: DeviceChoice,
    pub progress: bool,
}

impl Request {
    /// The output folder.
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let images = match &self.task {
                Task::Generation(o) => o.images.as_ref(),
                Task::Vae => None,
            };
            self.checkpoint
                .as_ref()
                .or(images)
                .map_or_else(PathBuf::new, PathBuf::clone)
                .join(format!("eval-{}-{}", self.task.name(), self.split))
        })
    }

    pub fn weights_dir(&self) -> PathBuf {
        self.weights.clone().unwrap_or_else(weights::default_dir)
    }

    /// The metrics to compute: `--metrics`, each one the task's, or all of the task's.
    fn asked_metrics(&self) -> Result<Vec<Metric>> {
        let own = self.task.metrics();
        match &self.metrics {
            None => Ok(own.to_vec()),
            Some(named) => {
                if let Some(m) = named.iter().find(|m| !own.contains(m)) {
                    bail!("--metrics {m}: not a metric of `eval {}`", self.task.name())
                }
                Ok(named.clone())
            }
        }
    }

    /// Whether `metric` was named in `--metrics` (so that what it needs must be there).
    fn named(&self, metric: Metric) -> bool {
        self.metrics.as_ref().is_some_and(|m| m.contains(&metric))
    }
}

/// A metric network with the weights file it was built from.
pub struct Network<T> {
    pub net: T,
    pub weights: weights::Weights,
}

/// The network that `users` (metrics) need, from `file` in the weights folder, when one of them
/// is asked for. A missing file leaves them out with a line in `left_out`, or is an error when
/// one of them was named in `--metrics`.
fn network<T>(
    req: &Request,
    asked: &[Metric],
    users: &[Metric],
    file: &str,
    device: &Device,
    left_out: &mut Vec<String>,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<Option<Network<T>>> {
    let wanted: Vec<&Metric> = users.iter().filter(|m| asked.contains(m)).collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    let names: Vec<String> = wanted.iter().map(|m| m.name().to_uppercase()).collect();
    let dir = req.weights_dir();
    match weights::load(&dir, file, device)? {
        Some(w) => {
            let net = build(w.vb.clone()).with_context(|| {
                format!("{} does not hold the expected network", w.path.display())
            })?;
            Ok(Some(Network { net, weights: w }))
        }
        None => {
            let line = weights::missing_line(&names.join(" and "), &dir, file);
            if let Some(m) = wanted.iter().find(|m| req.named(***m)) {
                bail!("--metrics {m}: {line}")
            }
            left_out.push(line);
            Ok(None)
        }
    }
}

/// `cxrgen eval`.
pub fn run(req: &Request) -> Result<ExitCode> {
    if req.batch_size == 0 {
        bail!("--batch-size 0: must be at least 1");
    }
    match &req.task {
        Task::Vae => vae::run(req),
        Task::Generation(opts) => generation::run(req, opts),
    }
}
