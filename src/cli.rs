//! The `cxrgen` command line: the clap types, turned into the requests of the commands in
//! [`crate::cmd`].
//!
//! Exit codes: 0 success; 1 error (the message says what and where); 2 bad arguments (from clap);
//! 130 stopped by Ctrl-C (training saves a checkpoint first).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::cmd;
use crate::config::Precision;
use crate::data::prepare::Source;
use crate::data::split::Split;
use crate::device::DeviceChoice;
use crate::diffusion::{SamplerKind, SamplerOptions};
use crate::train::RunRequest;

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
    /// The whole pipeline on phantoms in minutes, with nothing to download: trains, generates one
    /// row per finding and measures whether each prompt was followed (DIR/report.md).
    Demo(DemoArgs),
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
    /// Train the alignment classifier on labelled radiographs; held-out accuracy, AUROC, F1 and
    /// a confusion matrix.
    TrainClassifier(TrainClassifierArgs),
    /// Generate synthetic radiographs from a text prompt.
    Generate(GenerateArgs),
    /// Evaluate a trained model on held-out images (docs/evaluation.md).
    Eval(EvalArgs),
    /// Write what sampling needs of a trained model (EMA weights and VAE, F16 by default) as a
    /// small checkpoint folder that generate reads.
    Export(ExportArgs),
    /// Print the resolved config and the parameter count of each network.
    Info(InfoArgs),
    /// Time sampling (ms per step and per image) and, with --train or --train-vae, training steps.
    Bench(BenchArgs),
    /// Compare a device's outputs with the CPU's: VAE, U-Net, gradients, a 10-step sample.
    CheckDevice(CheckDeviceArgs),
}

/// `--config` of the commands that read a config (train-vae and train-diffusion have their own:
/// with --resume it is optional).
#[derive(Args)]
struct ConfigArg {
    /// A config file, or a built-in preset: paper, tiny.
    #[arg(long, default_value = "paper")]
    config: String,
}

/// `--device` of every command that runs a network.
#[derive(Args)]
struct DeviceArg {
    /// Where the networks run: cpu, cuda, cuda:N, or auto (CUDA when this binary has it and a
    /// GPU answers, else the CPU).
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    device: DeviceChoice,
}

#[derive(Args)]
#[command(mut_arg("config", |a| a.default_value("tiny")))]
#[command(mut_arg("device", |a| a.help("The device to check: cpu, cuda, cuda:N, or auto")))]
struct CheckDeviceArgs {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    device: DeviceArg,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    device: DeviceArg,
    /// Compute precision (default: f16 on CUDA, f32 on the CPU; training: the config's on CUDA).
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch_sizes: Vec<usize>,
    /// Sampling steps the per-image figure is for.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Denoising steps and decodes timed per batch size (the decode's figure is their median),
    /// and optimizer steps timed with --train and --train-vae.
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
    /// Also time the sampling steps with the guided U-Net step replayed from a CUDA graph (on
    /// the CPU: the same step run eagerly).
    #[arg(long)]
    cuda_graph: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// One JSON object on stdout: {config, vae_params, unet_params, text_trainable_params,
    /// text_frozen_params, latent_shape, device}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["iu", "manifest"])))]
#[command(mut_arg("config", |a| a.help("A config file, or a built-in preset: paper, tiny (its `data:` section is used)")))]
struct PrepareArgs {
    #[command(flatten)]
    config: ConfigArg,
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
struct DemoArgs {
    /// The folder to write: the phantoms, the runs, the images and report.md (must not exist, or
    /// be empty).
    #[arg(long, value_name = "DIR", default_value = "demo")]
    out: PathBuf,
    /// Train for seconds instead of minutes: checks that every step runs, shows nothing learnt.
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["iu", "manifest", "data"])))]
struct TrainClassifierArgs {
    /// A CSV manifest with a `label` column (e.g. ../shared/data/cxr-real/manifest.csv).
    #[arg(long, value_name = "CSV")]
    manifest: Option<PathBuf>,
    /// An IU-CXR folder; phantoms (`cxrgen phantom`) are labelled by their `finding` column.
    #[arg(long, value_name = "DIR")]
    iu: Option<PathBuf>,
    /// A prepared cache (`cxrgen prepare`): its labels, image size and split as they are.
    #[arg(long, value_name = "DIR", conflicts_with = "image_size")]
    data: Option<PathBuf>,
    /// The folder to write (new or empty): classifier.safetensors, classifier.json,
    /// confusion.png, classifier.md.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The labels to tell apart, comma-separated (default: every label in the data); images with
    /// other labels are left out.
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Side of the square images the classifier sees, in pixels.
    #[arg(long, default_value_t = 128)]
    image_size: usize,
    /// Channels of the network's stem; each of its three stages doubles them.
    #[arg(long, default_value_t = 16)]
    width: usize,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate (AdamW, cosine schedule down to 1/100 of it).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Seeds the split (with --manifest or --iu), the weights and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct ExportArgs {
    /// A train-diffusion run folder (its best checkpoint, else its last) or checkpoint folder.
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// The new checkpoint folder (must not exist).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// What the weights are stored in.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F16)]
    precision: PrecisionArg,
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
    #[command(flatten)]
    device: DeviceArg,
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
    #[command(flatten)]
    device: DeviceArg,
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
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Images sampled together (no effect on the images themselves). Default: on CUDA as many as
    /// the free device memory holds (at most --n and 64), on the CPU 4.
    #[arg(long)]
    batch_size: Option<usize>,
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
    /// On CUDA, run every kernel of each sampling step from the host instead of replaying the
    /// step from a CUDA graph (the same images, slower).
    #[arg(long)]
    no_cuda_graph: bool,
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

impl From<PrecisionArg> for Precision {
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

impl From<SamplerArg> for SamplerKind {
    fn from(s: SamplerArg) -> Self {
        match s {
            SamplerArg::Ddim => Self::Ddim,
            SamplerArg::DpmPp2m => Self::DpmPp2m,
            SamplerArg::Ddpm => Self::Ddpm,
        }
    }
}

/// How `generate` and `eval generation` sample.
#[derive(Args)]
struct SamplingArgs {
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
}

impl SamplingArgs {
    fn options(&self) -> SamplerOptions {
        SamplerOptions {
            kind: self.sampler.into(),
            steps: self.steps,
            eta: self.eta,
        }
    }
}

#[derive(Args)]
struct EvalArgs {
    #[command(subcommand)]
    task: EvalTask,
}

#[derive(Subcommand)]
enum EvalTask {
    /// A train-vae run's reconstructions of held-out images: SSIM, PSNR, MSE, LPIPS.
    Vae(EvalVaeArgs),
    /// Images a train-diffusion run generates from held-out reports (or a folder of them): FID
    /// and KID with the real-vs-real floor, SSIM/PSNR/MSE/LPIPS against each report's image,
    /// MS-SSIM diversity, and prompt alignment (--classifier, --judge phantom).
    Generation(EvalGenerationArgs),
}

#[derive(Args)]
struct EvalVaeArgs {
    /// A train-vae run folder (its best checkpoint, else its last) or checkpoint folder.
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    #[command(flatten)]
    common: EvalCommonArgs,
}

#[derive(Args)]
struct EvalCommonArgs {
    /// The prepared cache (`cxrgen prepare`) holding the held-out images.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The split whose images are evaluated.
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    split: SplitArg,
    /// Where the outputs go (default: eval-<task>-<split> in the --checkpoint folder, or in the
    /// --images folder).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Only these metrics, comma-separated (ssim, psnr, mse, lpips; for generation also fid,
    /// kid, ms-ssim); a named metric that cannot be computed is an error instead of being left
    /// out.
    #[arg(long, value_delimiter = ',')]
    metrics: Option<Vec<cmd::eval::Metric>>,
    /// The folder of the metric networks' weights (default: $CXRGEN_EVAL_WEIGHTS, else
    /// ~/.cache/cxrgen/eval; scripts/fetch-eval-weights.sh fills it).
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Images per forward pass of the metric networks.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct EvalGenerationArgs {
    /// A train-diffusion run folder (its best checkpoint, else its last) or checkpoint folder.
    #[arg(long, value_name = "DIR", required_unless_present = "images")]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    common: EvalCommonArgs,
    /// Evaluate the PNGs of this folder (as `cxrgen generate` writes them: each with its prompt
    /// in a text chunk, the text of a report of the split) instead of generating.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["checkpoint", "n", "per_prompt", "steps", "sampler", "eta", "guidance_scale", "precision"])]
    images: Option<PathBuf>,
    /// A `cxrgen train-classifier` output folder: prompt alignment by the classifier
    /// (precision, recall, F1 per class, the paper's Table 4), an Inception-Score-like score and
    /// FID/KID on its features.
    #[arg(long, value_name = "DIR")]
    classifier: Option<PathBuf>,
    /// Prompt alignment by measurement: `phantom` measures each image with the phantom
    /// measurements against the finding its phantom report states.
    #[arg(long, value_enum)]
    judge: Option<JudgeArg>,
    /// Reports of the split to generate from (default: all).
    #[arg(long)]
    n: Option<usize>,
    /// Images per report (MS-SSIM diversity needs 2 or more); image j of report i uses
    /// seed + i · per-prompt + j.
    #[arg(long, default_value_t = 2)]
    per_prompt: usize,
    /// The first image's seed; also the seed of the real-vs-real halves and KID's subsets.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// What the networks compute in (default: f16 on CUDA, f32 on the CPU).
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum JudgeArg {
    Phantom,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SplitArg {
    Train,
    Val,
    Test,
}

impl From<SplitArg> for Split {
    fn from(s: SplitArg) -> Self {
        match s {
            SplitArg::Train => Self::Train,
            SplitArg::Val => Self::Val,
            SplitArg::Test => Self::Test,
        }
    }
}

pub fn run() -> Result<ExitCode> {
    let progress = std::io::stderr().is_terminal();
    match Cli::parse().command {
        Command::Info(a) => cmd::info::run(&cmd::info::Request {
            config: a.config.config,
            device: a.device.device,
            json: a.json,
        }),
        Command::Prepare(a) => cmd::prepare::run(cmd::prepare::Request {
            config: a.config.config,
            source: match (a.iu, a.manifest) {
                (Some(dir), _) => Source::Iu(dir),
                (None, Some(csv)) => Source::Manifest(csv),
                (None, None) => unreachable!("clap requires --iu or --manifest"),
            },
            out: a.out,
            split: a.split,
            strict: a.strict,
            force: a.force,
            json: a.json,
            progress,
        }),
        Command::Demo(a) => cmd::demo::run(&cmd::demo::Request {
            out: a.out,
            quick: a.quick,
            device: a.device.device,
            progress,
        }),
        Command::Phantom(a) => cmd::phantom::run(&cmd::phantom::Request {
            out: a.out,
            n: a.n,
            size: a.size,
            seed: a.seed,
            progress,
        }),
        Command::Grid(a) => cmd::grid::run(&cmd::grid::Request {
            images: a.images,
            cols: a.cols,
            tile: a.tile,
            out: a.out,
        }),
        Command::TrainVae(a) => cmd::train::vae(&a.request(progress)?),
        Command::TrainDiffusion(a) => {
            cmd::train::diffusion(&a.common.request(progress)?, a.vae.as_deref())
        }
        Command::TrainClassifier(a) => {
            use cmd::train_classifier::{Input, Request};
            cmd::train_classifier::run(&Request {
                input: match (a.manifest, a.iu, a.data) {
                    (Some(csv), _, _) => Input::Dataset(Source::Manifest(csv)),
                    (None, Some(dir), _) => Input::Dataset(Source::Iu(dir)),
                    (None, None, Some(dir)) => Input::Cache(dir),
                    (None, None, None) => unreachable!("clap requires a source"),
                },
                out: a.out,
                classes: a.classes,
                image_size: a.image_size,
                width: a.width,
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                seed: a.seed,
                device: a.device.device,
                progress,
            })
        }
        Command::Generate(a) => cmd::generate::run(&a.request(progress)),
        Command::Eval(EvalArgs { task }) => cmd::eval::run(&match task {
            EvalTask::Vae(a) => {
                a.common
                    .request(cmd::eval::Task::Vae, Some(a.checkpoint), progress)
            }
            EvalTask::Generation(a) => {
                let opts = cmd::eval::generation::Options {
                    n: a.n,
                    per_prompt: a.per_prompt,
                    seed: a.seed,
                    sampler: a.sampling.options(),
                    guidance: a.sampling.guidance_scale,
                    precision: a.precision.map(Into::into),
                    classifier: a.classifier,
                    judge: a.judge.map(|j| match j {
                        JudgeArg::Phantom => cmd::eval::judge::Judge::Phantom,
                    }),
                    images: a.images,
                };
                a.common
                    .request(cmd::eval::Task::Generation(opts), a.checkpoint, progress)
            }
        }),
        Command::Export(a) => cmd::export::run(&cmd::export::Request {
            checkpoint: a.checkpoint,
            out: a.out,
            precision: a.precision.into(),
        }),
        Command::CheckDevice(a) => cmd::check_device::run(&cmd::check_device::Request {
            config: a.config.config,
            device: a.device.device,
            json: a.json,
        }),
        Command::Bench(a) => cmd::bench::run(&cmd::bench::Request {
            config: a.config.config,
            device: a.device.device,
            precision: a.precision.map(Into::into),
            batch_sizes: a.batch_sizes,
            steps: a.steps,
            repeats: a.repeats,
            train: a.train,
            train_vae: a.train_vae,
            kernels: a.kernels,
            cuda_graph: a.cuda_graph,
            json: a.json,
        }),
    }
}

impl GenerateArgs {
    fn request(self, progress: bool) -> cmd::generate::Request {
        use cmd::generate::{Format, Prompts, Request};
        Request {
            checkpoint: self.checkpoint,
            prompts: match self.prompts_file {
                Some(f) => Prompts::File(f),
                None => Prompts::One(self.prompt),
            },
            negative_prompt: self.negative_prompt,
            unconditional: self.unconditional,
            n: self.n,
            seed: self.seed,
            sampler: self.sampling.options(),
            guidance: self.sampling.guidance_scale,
            batch_size: self.batch_size,
            out: self.out,
            bits: self.bits,
            format: match self.format {
                FormatArg::Png => Format::Png,
                FormatArg::Dicom => Format::Dicom,
            },
            precision: self.precision.map(Into::into),
            ema: !self.no_ema,
            clip: !self.no_clip,
            cuda_graph: !self.no_cuda_graph,
            json: self.json,
            progress,
            device: self.device.device,
        }
    }
}

impl EvalCommonArgs {
    fn request(
        self,
        task: cmd::eval::Task,
        checkpoint: Option<PathBuf>,
        progress: bool,
    ) -> cmd::eval::Request {
        cmd::eval::Request {
            task,
            checkpoint,
            data: self.data,
            split: self.split.into(),
            out: self.out,
            metrics: self.metrics,
            weights: self.weights,
            batch_size: self.batch_size,
            device: self.device.device,
            progress,
        }
    }
}

impl TrainArgs {
    fn request(&self, progress: bool) -> Result<RunRequest> {
        Ok(RunRequest {
            config: self.config.clone(),
            data: self.data.clone(),
            out: self.out.clone(),
            resume: self.resume.clone(),
            max_steps: self.max_steps,
            device: crate::device::open(self.device.device)?,
            precision: None,
            progress,
        })
    }
}
