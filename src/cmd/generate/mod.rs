//! `cxrgen generate`: images from a prompt or a prompts file, written as PNGs or DICOMs that say
//! what they are.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use serde_json::json;

use crate::config::Precision;
use crate::diffusion::{CapturedGuided, SamplerOptions};
use crate::io::dicom;
use crate::io::png::{self, Pixels};
use crate::io::stdout::Stdout;

pub mod batch;
pub mod graphs;
pub mod pipeline;
pub mod prompts;

use graphs::StepGraphs;
use pipeline::Pipeline;

/// The notice every generated image carries (paper §5.4: mark synthetic images).
pub const SYNTHETIC_NOTICE: &str = "SYNTHETIC IMAGE - NOT FOR DIAGNOSTIC USE";

/// Where the prompts come from.
pub enum Prompts {
    /// `--prompt`: images named `cxr-<seed>`, replaced if they exist.
    One(String),
    /// `--prompts-file`: images named `p<line>-<seed>`; those already written are kept, so that
    /// a run that stopped can be started again and finishes the rest.
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    /// Secondary Capture DICOM, marked synthetic.
    Dicom,
}

impl Format {
    fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Dicom => "dcm",
        }
    }
}

pub struct Request {
    pub checkpoint: PathBuf,
    pub prompts: Prompts,
    pub negative_prompt: String,
    pub unconditional: bool,
    /// Images per prompt (a prompts file's CSV may set its own).
    pub n: usize,
    pub seed: u64,
    pub sampler: SamplerOptions,
    pub guidance: f64,
    /// None: chosen ([`batch::choose`]).
    pub batch_size: Option<usize>,
    pub out: PathBuf,
    /// 8 or 16 bits per pixel.
    pub bits: u8,
    pub format: Format,
    pub ema: bool,
    pub json: bool,
    pub progress: bool,
    pub device: crate::device::DeviceChoice,
    /// None: F16 on CUDA, F32 on the CPU.
    pub precision: Option<Precision>,
    /// Clip the clean-latent estimates to the training latents' range (the default).
    pub clip: bool,
    /// On CUDA, replay the guided step from CUDA graphs (the default).
    pub cuda_graph: bool,
}

/// The sampling flags that `generate` and `eval generation` share: --steps, --eta,
/// --guidance-scale.
pub fn check_sampling(sampler: &SamplerOptions, guidance: f64) -> Result<()> {
    if sampler.steps == 0 {
        bail!("--steps 0: must be at least 1");
    }
    if !(guidance.is_finite() && guidance >= 0.0) {
        bail!("--guidance-scale {guidance}: must be a finite number ≥ 0");
    }
    if !(sampler.eta.is_finite() && sampler.eta >= 0.0) {
        bail!("--eta {}: must be a finite number ≥ 0", sampler.eta);
    }
    Ok(())
}

fn validate(req: &Request) -> Result<()> {
    if let Prompts::One(p) = &req.prompts {
        if p.trim().is_empty() && !req.unconditional {
            bail!(
                "--prompt is empty: give a prompt, or pass --unconditional to sample without one"
            );
        }
    }
    if req.bits != 8 && req.bits != 16 {
        bail!("--bits {}: must be 8 or 16", req.bits);
    }
    if req.n == 0 {
        bail!("--n 0: nothing to generate");
    }
    if req.batch_size == Some(0) {
        bail!("--batch-size 0: must be at least 1");
    }
    check_sampling(&req.sampler, req.guidance)?;
    if req.seed.checked_add(req.n as u64 - 1).is_none() {
        bail!(
            "--seed {} + --n {} overflows: image i uses seed + i, and the largest seed is {}",
            req.seed,
            req.n,
            u64::MAX
        );
    }
    Ok(())
}

/// The file name of the image of a prompts file's `line` (1-based) with `seed`.
pub fn prompts_file_image(line: usize, seed: u64, ext: &str) -> String {
    format!("p{line:05}-{seed:08}.{ext}")
}

/// One image to write: its prompt, seed and file.
struct Target<'a> {
    job: &'a prompts::Job,
    seed: u64,
    path: PathBuf,
}

pub fn run(req: &Request) -> Result<ExitCode> {
    validate(req)?;
    let jobs = match &req.prompts {
        Prompts::One(p) => vec![prompts::Job {
            prompt: p.clone(),
            n: req.n,
            seed: req.seed,
            line: 0,
        }],
        Prompts::File(path) => prompts::read(path, req.n, req.seed, req.unconditional)?,
    };
    let device = crate::device::open(req.device)?;
    let precision = crate::device::precision_on(&device, req.precision, Precision::F16)?;
    let Pipeline {
        config,
        text,
        networks,
        diffusion,
        weights_sha256,
        ..
    } = Pipeline::load(&req.checkpoint, req.ema, &device, precision)?;
    let diffusion = if req.clip {
        diffusion
    } else {
        diffusion.without_clip()
    };
    let t_max = diffusion.timesteps();
    if req.sampler.steps > t_max {
        bail!(
            "--steps {}: the model has {t_max} diffusion timesteps",
            req.sampler.steps
        );
    }
    let tokenizer = &text.tokenizer;
    let where_ = |job: &prompts::Job| match &req.prompts {
        Prompts::One(_) => "--prompt".to_string(),
        Prompts::File(p) => format!("--prompts-file {} line {}", p.display(), job.line),
    };
    for (what, text) in jobs
        .iter()
        .map(|j| (where_(j), j.prompt.as_str()))
        .chain(std::iter::once((
            "--negative-prompt".to_string(),
            req.negative_prompt.as_str(),
        )))
    {
        if tokenizer.encode(text)?.1 {
            eprintln!(
                "warning: {what} is longer than the model's limit of {} tokens (text.max_tokens) and was truncated",
                tokenizer.max_tokens()
            );
        }
    }
    super::prepare_out(&req.out)?;

    // Every image and its file; with a prompts file, those already written are kept.
    let ext = req.format.extension();
    let mut targets = Vec::new();
    for job in &jobs {
        // Seed by seed: `seed..seed + n` would wrap past u64::MAX to an empty range.
        for seed in (0..job.n as u64).map(|i| job.seed + i) {
            let name = match req.prompts {
                Prompts::One(_) => format!("cxr-{seed:08}.{ext}"),
                Prompts::File(_) => prompts_file_image(job.line, seed, ext),
            };
            targets.push(Target {
                job,
                seed,
                path: req.out.join(name),
            });
        }
    }
    let total = targets.len();
    if matches!(req.prompts, Prompts::File(_)) {
        targets.retain(|t| !t.path.exists());
        if targets.len() < total {
            eprintln!(
                "{} of {total} images are already in {}; generating the other {}",
                total - targets.len(),
                req.out.display(),
                targets.len()
            );
        }
    }

    let z = config.latent_size();
    let latent = (config.vae.latent_channels, z, z);
    let graphs_on = device.is_cuda() && req.cuda_graph;
    let batch_size = match (req.batch_size, targets.first()) {
        (Some(b), _) => b,
        (None, Some(first)) => {
            let cond =
                || diffusion.condition(&text, &networks, &first.job.prompt, &req.negative_prompt);
            let n = targets
                .chunk_by(|a, b| std::ptr::eq(a.job, b.job))
                .map(<[Target]>::len)
                .max()
                .unwrap_or(1);
            batch::choose(&networks, cond, req.guidance, latent, graphs_on, n)?
        }
        // Nothing left to generate.
        (None, None) => batch::CPU_DEFAULT,
    };
    let mut graphs = graphs_on.then(|| StepGraphs::new(&networks.unet, req.guidance));

    let size = config.data.image_size as u32;
    let bar = crate::io::progress::bar(
        (targets.len() * req.sampler.steps) as u64,
        req.progress,
        None,
    );
    let (date, time) = dicom::utc_now();
    let (study_uid, series_uid) = (dicom::new_uid("study"), dicom::new_uid("series"));
    let mut stdout = Stdout::lock();
    let mut written = 0usize;
    // Targets of one prompt are consecutive: encode each prompt once, sample its images in batches.
    for group in targets.chunk_by(|a, b| std::ptr::eq(a.job, b.job)) {
        let job = group[0].job;
        let cond = diffusion.condition(&text, &networks, &job.prompt, &req.negative_prompt)?;
        for batch in group.chunks(batch_size) {
            if crate::interrupt::requested() {
                return Err(crate::interrupt::Interrupted.into());
            }
            let seeds: Vec<u64> = batch.iter().map(|t| t.seed).collect();
            let mut on_step = |_| bar.inc(batch.len() as u64);
            let captured = match graphs.as_mut() {
                Some(g) => g.step_for(&cond, batch.len(), latent, &device)?,
                None => None,
            };
            let images = match captured {
                // The eager step's kernels, replayed: the same images.
                Some(step) => diffusion.sample_with(
                    &networks,
                    CapturedGuided { step, cond: &cond },
                    &seeds,
                    &req.sampler,
                    &mut on_step,
                )?,
                None => diffusion.sample(
                    &networks,
                    &cond,
                    &seeds,
                    &req.sampler,
                    req.guidance,
                    &mut on_step,
                )?,
            };
            for (target, img) in batch.iter().zip(images) {
                let meta = [
                    ("prompt", job.prompt.clone()),
                    ("negative_prompt", req.negative_prompt.clone()),
                    ("seed", target.seed.to_string()),
                    ("sampler", req.sampler.kind.name().to_string()),
                    ("steps", req.sampler.steps.to_string()),
                    ("eta", req.sampler.eta.to_string()),
                    ("guidance_scale", req.guidance.to_string()),
                    ("checkpoint_sha256", weights_sha256.clone()),
                    ("weights", if req.ema { "ema" } else { "raw" }.to_string()),
                    ("precision", format!("{precision:?}").to_lowercase()),
                    ("clip_x0", req.clip.to_string()),
                    ("software", format!("cxrgen {}", env!("CARGO_PKG_VERSION"))),
                    ("Disclaimer", SYNTHETIC_NOTICE.to_string()),
                ];
                let px16: Vec<u16>;
                let px8: Vec<u8>;
                let pixels = if req.bits == 16 {
                    px16 = img.iter().map(|v| (v * 65535.0).round() as u16).collect();
                    Pixels::Sixteen(&px16)
                } else {
                    px8 = img.iter().map(|v| (v * 255.0).round() as u8).collect();
                    Pixels::Eight(&px8)
                };
                match req.format {
                    Format::Png => png::write(&target.path, pixels, size, &meta)?,
                    Format::Dicom => {
                        let comments = meta
                            .iter()
                            .map(|(k, v)| format!("{k}: {v}"))
                            .collect::<Vec<_>>()
                            .join("\n");
                        let uid = dicom::new_uid(&target.path.display().to_string());
                        dicom::write(
                            &target.path,
                            pixels,
                            size,
                            &dicom::DicomMeta {
                                sop_instance_uid: &uid,
                                study_uid: &study_uid,
                                series_uid: &series_uid,
                                instance_number: written as u32 + 1,
                                date: &date,
                                time: &time,
                                series_description: SYNTHETIC_NOTICE,
                                comments: &comments,
                            },
                        )?
                    }
                }
                written += 1;
                if req.json {
                    let line = json!({
                        "path": target.path.display().to_string(), "prompt": job.prompt,
                        "seed": target.seed, "sampler": req.sampler.kind.name(),
                        "steps": req.sampler.steps, "guidance": req.guidance,
                    });
                    writeln!(stdout, "{line}")?;
                    if stdout.is_closed() {
                        // A closed pipe: the reader has gone; stop quietly.
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
        }
    }
    bar.finish_and_clear();
    if !req.json {
        eprintln!("wrote {written} image(s) to {}", req.out.display());
    }
    Ok(ExitCode::SUCCESS)
}
