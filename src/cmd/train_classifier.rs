//! `cxrgen train-classifier`: the alignment classifier ([`crate::model::classifier`]) trained on
//! labelled radiographs, with its held-out scores.
//!
//! The images come through `cxrgen prepare`'s pipeline (loaders, decoding, the patient-level
//! split; a manifest's `label` column, a phantom's `finding`), prepared into a temporary cache
//! beside `--out` and removed afterwards, or from an already prepared cache (`--data`, its split
//! as it is). Training mirrors a random half of each batch left to right and keeps the epoch with
//! the lowest validation loss; the test split, whose
//! patients training never saw, gives the scores. `--out` receives `classifier.safetensors`,
//! `classifier.json`, `confusion.png` and `classifier.md`, all at once or none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarMap;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::config::{
    Config, DataConfig, OptimizerConfig, Projection, SplitConfig, TextRequirement, TextSections,
};
use crate::data::cache::Cache;
use crate::data::prepare::{prepare, PrepareOptions, Source, TempDir};
use crate::data::split::Split;
use crate::device::DeviceChoice;
use crate::eval::classification::{auroc, Confusion};
use crate::io::fs::{image_bytes, replace_all};
use crate::model::classifier::{Classifier, ClassifierConfig, REPORT_FILE, WEIGHTS_FILE};
use crate::model::{count_params, seeded_var_builder};
use crate::rng::Rng;
use crate::train::optim::{learning_rate, AdamW};

pub const CONFUSION_FILE: &str = "confusion.png";
pub const SUMMARY_FILE: &str = "classifier.md";

/// Where the labelled images come from.
pub enum Input {
    /// A dataset, prepared here at `--image-size` with a split drawn from `--seed`.
    Dataset(Source),
    /// A prepared cache (`--data`): its image size and split as they are.
    Cache(PathBuf),
}

pub struct Request {
    pub input: Input,
    pub out: PathBuf,
    /// The labels to tell apart (default: every label in the data).
    pub classes: Option<Vec<String>>,
    pub image_size: usize,
    /// Channels of the network's stem; each of its three stages doubles them.
    pub width: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    pub device: DeviceChoice,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassScore {
    pub class: String,
    /// Held-out images of the class.
    pub images: usize,
    /// One class against the rest, on the softmax probability of the class; None when the
    /// held-out split lacks positives or negatives.
    pub auroc: Option<f64>,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Epoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
}

/// `classifier.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub source: String,
    pub classes: Vec<String>,
    pub image_size: usize,
    pub network: ClassifierConfig,
    pub params: usize,
    pub seed: u64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// The epoch (from 1) whose weights were kept: the lowest validation loss.
    pub best_epoch: usize,
    /// Images per split and class.
    pub splits: BTreeMap<Split, BTreeMap<String, usize>>,
    /// Images with a label not among `classes`, by label (not used).
    pub other_labels: BTreeMap<String, usize>,
    /// Images the preparation could not use, with the reason.
    pub dropped: Vec<String>,
    /// The held-out split the scores below are on.
    pub held_out: Split,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassScore>,
    /// `confusion[true][predicted]`, classes in the order of `classes`.
    pub confusion: Vec<Vec<usize>>,
    pub history: Vec<Epoch>,
}

pub fn run(req: &Request) -> Result<ExitCode> {
    let report = train(req)?;
    eprintln!(
        "held-out ({} images): accuracy {:.3}, macro F1 {:.3}; wrote {}",
        report.confusion.iter().flatten().sum::<usize>(),
        report.accuracy,
        report.macro_f1,
        req.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Trains, scores and writes `--out`; the report is returned as written.
pub fn train(req: &Request) -> Result<Report> {
    check_out(&req.out)?;
    if req.epochs == 0 || req.batch_size == 0 || req.width == 0 {
        bail!("--epochs, --batch-size and --width must be at least 1");
    }
    if !(req.lr.is_finite() && req.lr > 0.0) {
        bail!("--lr {}: must be a finite number above 0", req.lr);
    }
    let device = crate::device::open(req.device)?;
    let (cache, source, dropped) = open_images(req)?;
    let data = Labelled::new(&cache, req.classes.as_deref(), &source)?;
    let cfg = ClassifierConfig::with_width(data.classes.len(), req.width);
    let varmap = VarMap::new();
    let net = Classifier::new(&cfg, seeded_var_builder(&varmap, req.seed, &device))?;
    let params: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let opt_cfg = OptimizerConfig {
        lr: req.lr,
        lr_min: req.lr / 100.0,
        warmup_steps: 0,
        weight_decay: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        grad_clip: 0.0,
    };
    let mut opt = AdamW::new(params, &opt_cfg)?;

    let train_idx = data.split(Split::Train);
    let val_idx = data.split(Split::Val);
    let steps_per_epoch = train_idx.len().div_ceil(req.batch_size);
    let total = (steps_per_epoch * req.epochs) as u64;
    let bar = progress_bar(total, req.progress);
    let mut rng = Rng::new(req.seed ^ 0x5EED);
    let mut history = Vec::with_capacity(req.epochs);
    let mut best: Option<(f64, usize, Vec<Tensor>)> = None;
    for epoch in 1..=req.epochs {
        let mut order = train_idx.clone();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut loss_sum = 0.0;
        for batch in order.chunks(req.batch_size) {
            if crate::interrupt::requested() {
                return Err(crate::interrupt::Interrupted.into());
            }
            let (x, y) = data.batch(batch, &device)?;
            let x = random_flips(&x, &mut rng)?;
            let loss = candle_nn::loss::cross_entropy(&net.forward(&x)?, &y)?;
            let grads = loss.backward()?;
            let g = opt
                .params()
                .iter()
                .map(|(_, v)| match grads.get(v) {
                    Some(g) => Ok(g.clone()),
                    None => v.as_tensor().zeros_like(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            opt.step(&g, learning_rate(&opt_cfg, opt.steps, total))?;
            let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            loss_sum += l * batch.len() as f64;
            bar.set_message(format!("epoch {epoch}/{} loss {l:.3}", req.epochs));
            bar.inc(1);
        }
        let val = data.predict(&net, &val_idx, req.batch_size, &device)?;
        let e = Epoch {
            epoch,
            train_loss: loss_sum / train_idx.len() as f64,
            val_loss: val.loss,
            val_accuracy: val.confusion.accuracy(),
        };
        if best.as_ref().is_none_or(|(l, _, _)| e.val_loss < *l) {
            let weights = opt
                .params()
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<Vec<_>>>()?;
            best = Some((e.val_loss, epoch, weights));
        }
        // On stderr with or without a terminal (a hidden bar's println prints nothing).
        bar.suspend(|| {
            eprintln!(
                "epoch {epoch}: train loss {:.4}, val loss {:.4}, val accuracy {:.3}",
                e.train_loss, e.val_loss, e.val_accuracy
            )
        });
        history.push(e);
    }
    bar.finish_and_clear();
    let (_, best_epoch, weights) = best.expect("at least one epoch");
    for ((_, v), w) in opt.params().iter().zip(&weights) {
        v.set(w)?;
    }

    let test = data.predict(&net, &data.split(Split::Test), req.batch_size, &device)?;
    let per_class = data
        .classes
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let scores: Vec<f64> = test.probs.iter().map(|p| p[c]).collect();
            let positive: Vec<bool> = test.truth.iter().map(|&t| t == c).collect();
            ClassScore {
                class: name.clone(),
                images: test.confusion.support(c),
                auroc: auroc(&scores, &positive),
                precision: test.confusion.precision(c),
                recall: test.confusion.recall(c),
                f1: test.confusion.f1(c),
            }
        })
        .collect();
    let report = Report {
        source,
        classes: data.classes.clone(),
        image_size: cache.meta.image_size,
        params: count_params(&varmap),
        network: cfg,
        seed: req.seed,
        epochs: req.epochs,
        batch_size: req.batch_size,
        lr: req.lr,
        best_epoch,
        splits: data.counts(),
        other_labels: data.other_labels.clone(),
        dropped,
        held_out: Split::Test,
        accuracy: test.confusion.accuracy(),
        macro_f1: test.confusion.macro_f1(),
        per_class,
        confusion: test.confusion.counts.clone(),
        history,
    };
    write_outputs(&req.out, &varmap, &report)?;
    Ok(report)
}

/// `--out` must be new or an empty folder, and its parent must exist: checked before any work.
fn check_out(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .with_context(|| format!("--out {}: cannot read the folder", out.display()))?
                .next()
                .is_none();
        if !empty {
            bail!(
                "--out {} already exists and is not an empty folder; choose another",
                out.display()
            );
        }
    }
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) if !p.is_dir() => bail!(
            "--out {}: the parent folder {} does not exist",
            out.display(),
            p.display()
        ),
        _ => Ok(()),
    }
}

/// The cache of labelled images, a description of where it came from, and the images the
/// preparation could not use.
fn open_images(req: &Request) -> Result<(Cache, String, Vec<String>)> {
    let source = match &req.input {
        Input::Cache(dir) => {
            let cache = Cache::open(dir)?;
            return Ok((cache, format!("cache {}", dir.display()), Vec::new()));
        }
        Input::Dataset(source) => source,
    };
    if let Source::Manifest(csv) = source {
        require_label_column(csv)?;
    }
    if !(16..=1024).contains(&req.image_size) {
        bail!(
            "--image-size {}: must be between 16 and 1024 pixels",
            req.image_size
        );
    }
    let mut cfg = Config::load("tiny")?;
    // The generator makes frontal views; images of unknown view are kept, lateral ones are not.
    // Reports are not needed, only labels.
    cfg.data = DataConfig {
        image_size: req.image_size,
        views: vec![Projection::Frontal, Projection::Unknown],
        require: TextRequirement::Any,
        text: TextSections::default(),
        split: SplitConfig {
            train: 0.7,
            val: 0.1,
            test: 0.2,
            seed: req.seed,
        },
    };
    let name = req.out.file_name().map_or_else(
        || "classifier".to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let tmp_path = req
        .out
        .with_file_name(format!(".{name}.images-{}", std::process::id()));
    let _tmp = TempDir(Some(tmp_path.clone()));
    let summary = prepare(
        &cfg,
        &PrepareOptions {
            source: source.clone(),
            out: tmp_path.clone(),
            split_file: None,
            strict: false,
            force: false,
            progress: req.progress,
        },
    )?;
    let cache = Cache::open(&tmp_path)?;
    let dropped = summary
        .dropped
        .iter()
        .map(|d| format!("{}: {}", d.item, d.reason))
        .collect();
    Ok((cache, summary.source, dropped))
}

fn require_label_column(csv_path: &Path) -> Result<()> {
    let mut r = csv::Reader::from_path(csv_path)
        .with_context(|| format!("cannot open manifest {}", csv_path.display()))?;
    let headers = r
        .headers()
        .with_context(|| format!("{}: cannot read the header row", csv_path.display()))?;
    if !headers.iter().any(|h| h.trim() == "label") {
        bail!(
            "manifest {} has no `label` column: train-classifier needs each image's class",
            csv_path.display()
        );
    }
    Ok(())
}

/// The cache's images whose label is one of the classes, with the class index of each.
struct Labelled<'a> {
    cache: &'a Cache,
    classes: Vec<String>,
    /// (cache index, class index).
    items: Vec<(usize, usize)>,
    other_labels: BTreeMap<String, usize>,
}

/// What the network says about some images.
struct Predictions {
    /// Mean cross-entropy.
    loss: f64,
    /// Softmax probabilities, one row per image.
    probs: Vec<Vec<f64>>,
    truth: Vec<usize>,
    confusion: Confusion,
}

impl<'a> Labelled<'a> {
    fn new(cache: &'a Cache, classes: Option<&[String]>, source: &str) -> Result<Self> {
        let mut by_label: BTreeMap<String, usize> = BTreeMap::new();
        for r in &cache.records {
            let l = r.label.trim();
            if !l.is_empty() {
                *by_label.entry(l.to_string()).or_default() += 1;
            }
        }
        if by_label.is_empty() {
            bail!("{source}: no image has a label (a manifest's `label` column, a phantom's `finding`)");
        }
        let available = || {
            by_label
                .iter()
                .map(|(l, n)| format!("{l} ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let classes: Vec<String> = match classes {
            Some(c) => c.iter().map(|c| c.trim().to_string()).collect(),
            None => by_label.keys().cloned().collect(),
        };
        for (i, c) in classes.iter().enumerate() {
            if !by_label.contains_key(c) {
                bail!(
                    "--classes {c}: no image of {source} has this label; the labels are: {}",
                    available()
                );
            }
            if classes[..i].contains(c) {
                bail!("--classes {c}: named twice");
            }
        }
        if classes.len() < 2 {
            bail!(
                "{source}: a classifier needs 2 or more classes, found {}; the labels are: {}",
                classes.len(),
                available()
            );
        }
        let mut items = Vec::new();
        let mut other_labels = BTreeMap::new();
        for (i, r) in cache.records.iter().enumerate() {
            match classes.iter().position(|c| c == r.label.trim()) {
                Some(c) => items.push((i, c)),
                None => *other_labels.entry(r.label.trim().to_string()).or_default() += 1,
            }
        }
        let out = Self {
            cache,
            classes,
            items,
            other_labels,
        };
        let counts = out.counts();
        for split in [Split::Train, Split::Test] {
            for (c, n) in &counts[&split] {
                if *n == 0 {
                    bail!(
                        "class {c} has no images in the {split} split of {source} ({} in all); give it more images or leave it out with --classes",
                        by_label[c]
                    );
                }
            }
        }
        if counts[&Split::Val].values().sum::<usize>() == 0 {
            bail!("{source}: the validation split is empty; more images (patients) are needed");
        }
        Ok(out)
    }

    /// Images per split and class.
    fn counts(&self) -> BTreeMap<Split, BTreeMap<String, usize>> {
        Split::ALL
            .into_iter()
            .map(|s| {
                let per_class = self
                    .classes
                    .iter()
                    .enumerate()
                    .map(|(c, name)| {
                        let n = self
                            .items
                            .iter()
                            .filter(|&&(i, k)| k == c && self.cache.records[i].split == s)
                            .count();
                        (name.clone(), n)
                    })
                    .collect();
                (s, per_class)
            })
            .collect()
    }

    /// Positions in `items` of the images of `split`.
    fn split(&self, split: Split) -> Vec<usize> {
        (0..self.items.len())
            .filter(|&k| self.cache.records[self.items[k].0].split == split)
            .collect()
    }

    /// Images [n, 1, S, S] in [−1, 1] and their classes [n] (u32) for positions in `items`.
    fn batch(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let idx: Vec<usize> = positions.iter().map(|&k| self.items[k].0).collect();
        let y: Vec<u32> = positions.iter().map(|&k| self.items[k].1 as u32).collect();
        let n = y.len();
        Ok((
            self.cache.images(&idx, device)?,
            Tensor::from_vec(y, n, device)?,
        ))
    }

    fn predict(
        &self,
        net: &Classifier,
        positions: &[usize],
        batch_size: usize,
        device: &Device,
    ) -> Result<Predictions> {
        let mut out = Predictions {
            loss: 0.0,
            probs: Vec::with_capacity(positions.len()),
            truth: Vec::with_capacity(positions.len()),
            confusion: Confusion::new(self.classes.len()),
        };
        for chunk in positions.chunks(batch_size) {
            let (x, y) = self.batch(chunk, device)?;
            let logits = net.forward(&x)?.detach();
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            out.loss += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * chunk.len() as f64;
            let probs = candle_nn::ops::softmax(&logits, D::Minus1)?
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?;
            for (p, &k) in probs.into_iter().zip(chunk) {
                let truth = self.items[k].1;
                let predicted = (0..p.len())
                    .max_by(|&a, &b| p[a].total_cmp(&p[b]))
                    .expect("2+ classes");
                out.confusion.add(truth, predicted);
                out.truth.push(truth);
                out.probs.push(p);
            }
        }
        out.loss /= positions.len().max(1) as f64;
        Ok(out)
    }
}

/// Mirrors a random half of the images left to right, so that a few hundred images teach more:
/// none of the classes depends on the side ([B, 1, S, S] → [B, 1, S, S]).
fn random_flips(x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
    let (b, _, _, s) = x.dims4()?;
    let reversed: Vec<u32> = (0..s as u32).rev().collect();
    let flipped = x.index_select(&Tensor::from_vec(reversed, s, x.device())?, 3)?;
    let pick: Vec<u8> = (0..b).map(|_| rng.below(2) as u8).collect();
    let pick = Tensor::from_vec(pick, (b, 1, 1, 1), x.device())?.broadcast_as(x.shape())?;
    Ok(pick.where_cond(&flipped, x)?)
}

fn progress_bar(n: u64, visible: bool) -> ProgressBar {
    crate::io::progress::bar(
        n,
        visible,
        Some("classifier {bar:30} {pos}/{len} steps {msg} eta {eta}"),
    )
}

/// Writes the four files into `out` together: all of them or none.
fn write_outputs(out: &Path, varmap: &VarMap, report: &Report) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = {
        let data = varmap.data().lock().expect("varmap lock");
        let mut t: Vec<(String, Tensor)> = data
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let weights = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .context("cannot serialise the classifier's weights")?;
    let json = serde_json::to_string_pretty(report)?;
    let png_path = out.join(CONFUSION_FILE);
    let png = image_bytes(
        &png_path,
        crate::io::plot::confusion_matrix(&report.classes, &report.confusion),
    )?;
    let md = summary_markdown(report);
    let created = !out.exists();
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the folder", out.display()))?;
    let (w, j, m) = (
        out.join(WEIGHTS_FILE),
        out.join(REPORT_FILE),
        out.join(SUMMARY_FILE),
    );
    let written = replace_all(&[
        (&w, &weights),
        (&j, json.as_bytes()),
        (&png_path, &png),
        (&m, md.as_bytes()),
    ]);
    if written.is_err() && created {
        let _ = std::fs::remove_dir(out);
    }
    written
}

fn summary_markdown(r: &Report) -> String {
    let held_out: usize = r.confusion.iter().flatten().sum();
    let mut s = format!(
        "# Alignment classifier\n\n\
         Trained with `cxrgen train-classifier` on {} at {}×{} ({} parameters, {} epochs, the \
         weights of epoch {}: lowest validation loss; seed {}). The scores are on the {} split \
         ({} images), whose patients training never saw.\n\n\
         Accuracy {:.3}, macro F1 {:.3}.\n\n\
         | class | images | AUROC (one vs rest) | precision | recall | F1 |\n\
         |---|---:|---:|---:|---:|---:|\n",
        r.source,
        r.image_size,
        r.image_size,
        r.params,
        r.epochs,
        r.best_epoch,
        r.seed,
        r.held_out,
        held_out,
        r.accuracy,
        r.macro_f1
    );
    for c in &r.per_class {
        let auc = c.auroc.map_or("–".to_string(), |a| format!("{a:.3}"));
        s.push_str(&format!(
            "| {} | {} | {auc} | {:.3} | {:.3} | {:.3} |\n",
            c.class, c.images, c.precision, c.recall, c.f1
        ));
    }
    s.push_str(&format!(
        "\nThe confusion matrix is in {CONFUSION_FILE}; every number in {REPORT_FILE}.\n"
    ));
    s
}
