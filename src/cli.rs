//! The `cxrgen` command line: arguments → validated config → work.
//!
//! Exit codes: 0 success; 1 error (the message says what and where); 2 bad arguments (from clap);
//! 3 the subcommand is not implemented yet; 130 stopped by Ctrl-C (training saves a checkpoint
//! first).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::data::{
    self,
    prepare::{PrepareOptions, Source},
};
use crate::device::DeviceChoice;
use crate::model::param_counts;

pub const EXIT_NOT_IMPLEMENTED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "cxrgen",
    version,
    about = "Train and run a resource-efficient text-conditional chest X-ray latent diffusion model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode, resize and clean a dataset once into the cache training reads.
    Prepare(PrepareArgs),
    /// Write procedural chest radiographs with known findings, in the Kaggle IU-CXR layout.
    Phantom(PhantomArgs),
    /// Tile images into one PNG contact sheet.
    Grid(GridArgs),
    /// Stage 1: train the VAE on a prepared cache.
    TrainVae(TrainArgs),
    /// Stage 2: train the U-Net and the text head on the latents of a trained VAE.
    TrainDiffusion(TrainDiffusionArgs),
    /// Generate synthetic radiographs from a text prompt.
    Generate(GenerateArgs),
    /// Evaluate generated images against the test split (not yet filed).
    Eval(PendingArgs),
    /// Print the resolved config and the parameter count of each network.
    Info(InfoArgs),
    /// Time sampling (ms per step and per image) and, with --train or --train-vae, training steps.
    Bench(BenchArgs),
    /// Compare a device's outputs with the CPU's: VAE, U-Net, gradients, a 10-step sample.
    CheckDevice(CheckDeviceArgs),
}

#[derive(Args)]
struct CheckDeviceArgs {
    /// A config file, or a built-in preset: paper, tiny.
    #[arg(long, default_value = "tiny")]
    config: String,
    /// The device to check: cpu, cuda, cuda:N, or auto.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    device: DeviceChoice,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// A config file, or a built-in preset: paper, tiny.
    #[arg(long, default_value = "paper")]
    config: String,
    /// Where the networks run: cpu, cuda, cuda:N, or auto.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    device: DeviceChoice,
    /// Compute precision (default: f16 on CUDA, f32 on the CPU; training: the config's on CUDA).
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch_sizes: Vec<usize>,
    /// Sampling steps the per-image figure is for.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Denoising steps timed per batch size, and optimizer steps timed with --train and --train-vae.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Also time optimizer steps of train-diffusion (the config's batch, accumulation,
    /// checkpointing and precision) and their peak memory.
    #[arg(long)]
    train: bool,
    /// Also time optimizer steps of train-vae (the config's batch, accumulation, checkpointing
    /// and precision, on random images) and their peak memory.
    #[arg(long)]
    train_vae: bool,
    /// Also time 3×3 convolutions forward + backward, candle's own against cxrgen's.
    #[arg(long)]
    kernels: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// A config file, or a built-in preset: paper, tiny.
    #[arg(long, default_value = "paper")]
    config: String,
    /// One JSON object on stdout: {config, vae_params, unet_params, text_trainable_params,
    /// text_frozen_params, latent_shape, device}.
    #[arg(long)]
    json: bool,
    /// Where the networks run: cpu, cuda, cuda:N, or auto (CUDA when this binary has it and a
    /// GPU answers, else the CPU).
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    device: DeviceChoice,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["iu", "manifest"])))]
struct PrepareArgs {
    /// A config file, or a built-in preset (its `data:` section is used).
    #[arg(long, default_value = "paper")]
    config: String,
    /// An IU-CXR folder: Kaggle layout (indiana_reports.csv, indiana_projections.csv,
    /// images/images_normalized/) or Open-i (ecgen-radiology/ or NLMCXR_reports.tgz, NLMCXR_png/).
    #[arg(long, value_name = "DIR")]
    iu: Option<PathBuf>,
    /// A CSV manifest: image, patient_id, findings, impression [, dataset, uid, projection, label].
    #[arg(long, value_name = "CSV")]
    manifest: Option<PathBuf>,
    /// The cache folder to create.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Reuse the patient split of this split.csv instead of drawing one.
    #[arg(long, value_name = "CSV")]
    split: Option<PathBuf>,
    /// Any image that cannot be used is an error, and no cache is written.
    #[arg(long)]
    strict: bool,
    /// Replace an existing cache at --out (only once the new one is complete).
    #[arg(long)]
    force: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PhantomArgs {
    /// The folder to write (indiana_reports.csv, indiana_projections.csv, images/images_normalized/).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Image i depends only on the seed and i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct GridArgs {
    /// The PNG to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Images per row.
    #[arg(long, default_value_t = 6)]
    cols: usize,
    /// Side of each tile in pixels.
    #[arg(long, default_value_t = 128)]
    tile: u32,
    /// The images, row by row.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Args)]
struct TrainArgs {
    /// A config file or preset. With --resume, optional: it must then equal the run's own.
    #[arg(long)]
    config: Option<String>,
    /// The prepared cache (`cxrgen prepare`).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The folder of a new run (config.yaml, metrics.jsonl, checkpoints/).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint: weights, optimizer moments,
    /// EMA, step, schedule and random state.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Stop after this many optimizer steps in all (the schedule still spans the configured epochs).
    #[arg(long, value_name = "N")]
    max_steps: Option<u64>,
    /// Where the networks run: cpu, cuda, cuda:N, or auto (CUDA when this binary has it and a
    /// GPU answers, else the CPU).
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    device: DeviceChoice,
}

#[derive(Args)]
struct TrainDiffusionArgs {
    #[command(flatten)]
    common: TrainArgs,
    /// The train-vae run (its best checkpoint) or checkpoint folder to take the frozen VAE from.
    #[arg(long, value_name = "DIR")]
    vae: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    /// Where the networks run: cpu, cuda, cuda:N, or auto (CUDA when this binary has it and a
    /// GPU answers, else the CPU).
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    device: DeviceChoice,
    /// A train-diffusion run folder (its best checkpoint, else its last) or checkpoint folder.
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// What to generate, e.g. "Large right pleural effusion."
    #[arg(long, default_value = "", conflicts_with = "prompts_file")]
    prompt: String,
    /// Prompts to generate, one a line, or a .csv with a header naming `prompt` and optionally
    /// `n` and `seed` columns. Images are named p<line>-<seed>; those already in --out are kept,
    /// so a run that stopped finishes when started again.
    #[arg(long, value_name = "FILE")]
    prompts_file: Option<PathBuf>,
    /// Steer away from this text (it replaces the empty prompt of the unconditional branch).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Allow an empty --prompt: sample from the unconditional model.
    #[arg(long)]
    unconditional: bool,
    /// Images per prompt; image i uses seed + i.
    #[arg(long, default_value_t = 1)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, value_enum, default_value_t = SamplerArg::Ddim)]
    sampler: SamplerArg,
    /// DDIM's η: 0 is deterministic.
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Classifier-free guidance scale; 1 is no guidance.
    #[arg(long, default_value_t = 3.0)]
    guidance_scale: f64,
    /// Images sampled together (no effect on the images themselves).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// The folder to write the images to.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Bits per pixel.
    #[arg(long, default_value_t = 8)]
    bits: u8,
    /// png, or dicom (Secondary Capture, Synthetic Data = YES, new UIDs per image).
    #[arg(long, value_enum, default_value_t = FormatArg::Png)]
    format: FormatArg,
    /// What the networks compute in: f32, f16 or bf16 (default: f16 on CUDA, f32 on the CPU).
    /// The VAE decodes again in F32 any image that F16 overflows.
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
    /// Sample with the raw weights instead of their EMA.
    #[arg(long)]
    no_ema: bool,
    /// Do not clip each step's clean-latent estimate to the training latents' range (clipping
    /// keeps under-trained models from drifting, but makes the trajectory non-smooth, which
    /// costs DPM-Solver++ its higher order; docs/generation.md).
    #[arg(long)]
    no_clip: bool,
    /// One JSON object per image on stdout (path, prompt, seed, sampler, steps, guidance).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Png,
    Dicom,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PrecisionArg {
    F32,
    F16,
    Bf16,
}

impl From<PrecisionArg> for crate::config::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Self::F32,
            PrecisionArg::F16 => Self::F16,
            PrecisionArg::Bf16 => Self::Bf16,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SamplerArg {
    Ddim,
    #[value(name = "dpmpp-2m")]
    DpmPp2m,
    Ddpm,
}

#[derive(Args)]
struct PendingArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info(args) => info(&args),
        Command::Prepare(args) => prepare(&args),
        Command::Phantom(args) => phantom(&args),
        Command::Grid(args) => {
            crate::io::grid::write_grid(&args.images, args.cols, args.tile, &args.out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::TrainVae(args) => {
            let summary = crate::train::train_vae(&train_request(&args)?)?;
            report_training(&summary)
        }
        Command::TrainDiffusion(args) => {
            let summary =
                crate::train::train_diffusion(&train_request(&args.common)?, args.vae.as_deref())?;
            report_training(&summary)
        }
        Command::Generate(args) => crate::cmd::generate::run(&generate_request(args)),
        Command::Eval(_) => not_implemented("eval", "a later issue"),
        Command::CheckDevice(a) => {
            crate::cmd::check_device::run(&crate::cmd::check_device::Request {
                config: a.config,
                device: a.device,
                json: a.json,
            })
        }
        Command::Bench(a) => crate::cmd::bench::run(&crate::cmd::bench::Request {
            config: a.config,
            device: a.device,
            precision: a.precision.map(Into::into),
            batch_sizes: a.batch_sizes,
            steps: a.steps,
            repeats: a.repeats,
            train: a.train,
            train_vae: a.train_vae,
            kernels: a.kernels,
            json: a.json,
        }),
    }
}

fn generate_request(a: GenerateArgs) -> crate::cmd::generate::Request {
    use crate::diffusion::SamplerKind;
    crate::cmd::generate::Request {
        checkpoint: a.checkpoint,
        prompts: match a.prompts_file {
            Some(f) => crate::cmd::generate::Prompts::File(f),
            None => crate::cmd::generate::Prompts::One(a.prompt),
        },
        negative_prompt: a.negative_prompt,
        unconditional: a.unconditional,
        n: a.n,
        seed: a.seed,
        sampler: crate::diffusion::SamplerOptions {
            kind: match a.sampler {
                SamplerArg::Ddim => SamplerKind::Ddim,
                SamplerArg::DpmPp2m => SamplerKind::DpmPp2m,
                SamplerArg::Ddpm => SamplerKind::Ddpm,
            },
            steps: a.steps,
            eta: a.eta,
        },
        guidance: a.guidance_scale,
        batch_size: a.batch_size,
        out: a.out,
        bits: a.bits,
        format: match a.format {
            FormatArg::Png => crate::cmd::generate::Format::Png,
            FormatArg::Dicom => crate::cmd::generate::Format::Dicom,
        },
        precision: a.precision.map(Into::into),
        ema: !a.no_ema,
        clip: !a.no_clip,
        json: a.json,
        progress: std::io::stderr().is_terminal(),
        device: a.device,
    }
}

fn train_request(args: &TrainArgs) -> Result<crate::train::RunRequest> {
    Ok(crate::train::RunRequest {
        config: args.config.clone(),
        data: args.data.clone(),
        out: args.out.clone(),
        resume: args.resume.clone(),
        max_steps: args.max_steps,
        device: crate::device::open(args.device)?,
        precision: None,
        progress: std::io::stderr().is_terminal(),
    })
}

fn report_training(s: &crate::train::trainer::TrainSummary) -> Result<ExitCode> {
    eprintln!(
        "{} at step {}; last checkpoint {}; best validation loss {}; non-finite steps skipped {}",
        if s.interrupted {
            "interrupted"
        } else {
            "trained"
        },
        s.steps,
        s.last_checkpoint.display(),
        s.best_val_loss.map_or("n/a".into(), |v| format!("{v:.5}")),
        s.nonfinite_skipped
    );
    Ok(if s.interrupted {
        ExitCode::from(crate::interrupt::EXIT_CODE)
    } else {
        ExitCode::SUCCESS
    })
}

fn not_implemented(name: &str, issue: &str) -> Result<ExitCode> {
    eprintln!("cxrgen {name} is not implemented yet (tracked in {issue}); nothing was done.");
    Ok(ExitCode::from(EXIT_NOT_IMPLEMENTED))
}

fn prepare(args: &PrepareArgs) -> Result<ExitCode> {
    let cfg = Config::load(&args.config)?;
    let source = match (&args.iu, &args.manifest) {
        (Some(dir), _) => Source::Iu(dir.clone()),
        (None, Some(csv)) => Source::Manifest(csv.clone()),
        (None, None) => unreachable!("clap requires --iu or --manifest"),
    };
    let opts = PrepareOptions {
        source,
        out: args.out.clone(),
        split_file: args.split.clone(),
        strict: args.strict,
        force: args.force,
        progress: std::io::stderr().is_terminal(),
    };
    let summary = data::prepare::prepare(&cfg, &opts)?;
    if args.json {
        write_stdout(&format!("{}\n", serde_json::to_string(&summary)?))?;
    } else {
        write_stdout(&summary.human())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn phantom(args: &PhantomArgs) -> Result<ExitCode> {
    if args.n == 0 {
        anyhow::bail!("--n 0: nothing to write");
    }
    if !(32..=2048).contains(&args.size) {
        anyhow::bail!("--size {}: must be between 32 and 2048 pixels", args.size);
    }
    if args.out.join("indiana_reports.csv").exists() {
        anyhow::bail!(
            "{} already holds a dataset (indiana_reports.csv); choose another --out",
            args.out.display()
        );
    }
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(args.n as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    data::phantom::write_dataset(&args.out, args.n, args.size, args.seed, &bar)?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} phantom radiographs of {}×{} to {}",
        args.n,
        args.size,
        args.size,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn info(args: &InfoArgs) -> Result<ExitCode> {
    let cfg = Config::load(&args.config)?;
    let device = crate::device::name(&crate::device::open(args.device)?);
    let counts = param_counts(&cfg)?;
    let latent = [
        cfg.vae.latent_channels,
        cfg.latent_size(),
        cfg.latent_size(),
    ];
    if args.json {
        let mut obj = serde_json::to_value(&counts)?;
        obj["config"] = serde_json::to_value(&cfg)?;
        obj["latent_shape"] = serde_json::to_value(latent)?;
        obj["device"] = device.into();
        write_stdout(&format!("{obj}\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let fmt = |n: Option<usize>, why: &str| match n {
        Some(n) => format!("{n:>12}  ({:.2} M)", n as f64 / 1e6),
        None => format!("{:>12}  ({why})", "unknown"),
    };
    let mut text = serde_yaml::to_string(&cfg)?;
    text.push_str(&format!(
        "\ndevice: {device}\nlatent: {}×{}×{} (channels × height × width)\nparameters:\n  vae           {}\n  unet          {}\n  text head     {}\n  text frozen   {}\n",
        latent[0],
        latent[1],
        latent[2],
        fmt(Some(counts.vae_params), ""),
        fmt(Some(counts.unet_params), ""),
        fmt(counts.text_trainable_params, "hidden size unknown: set text.hidden_size"),
        fmt(counts.text_frozen_params, "the encoder's config.json is not on this machine"),
    ));
    write_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout; a closed pipe (`cxrgen info | head`) is not an error.
fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
