//! `cxrgen demo`: the whole pipeline on phantoms, with nothing to download, ending in a report
//! that says whether the prompts were followed.
//!
//! Phantom radiographs (their truth known) → the prepared cache → the VAE → the latent diffusion
//! model → images for one prompt per finding → each image's findings measured back with the
//! phantom measurements ([`crate::data::phantom::measure`]) → `report.md`, `report.png` (one
//! row per prompt, each image captioned with what was measured), `report.json`. The recipe is
//! the built-in `demo` config (configs/demo.yaml); `--quick` trains for seconds instead of
//! minutes, to check that everything runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::checkpoint::{Checkpoint, Pick, EMA, STATE, VAE_FILE};
use crate::config::Config;
use crate::data::phantom::{Finding, Lobe, Side};
use crate::data::prepare::{PrepareOptions, Source};
use crate::device::DeviceChoice;
use crate::diffusion::{SamplerKind, SamplerOptions};
use crate::train::RunRequest;

mod report;

use report::{ModelResults, Summary};

/// One prompt of the demo and the finding it asks for. The texts are impressions in the
/// phantoms' own wording: the demo config conditions on the impression alone.
pub struct DemoPrompt {
    /// A short name for tables and captions.
    pub name: &'static str,
    pub finding: Finding,
    pub text: &'static str,
}

pub const PROMPTS: [DemoPrompt; 7] = [
    DemoPrompt {
        name: "normal",
        finding: Finding::Normal,
        text: "No acute cardiopulmonary abnormality.",
    },
    DemoPrompt {
        name: "cardiomegaly",
        finding: Finding::Cardiomegaly,
        text: "Cardiomegaly.",
    },
    DemoPrompt {
        name: "effusion right",
        finding: Finding::Effusion(Side::Right),
        text: "Right pleural effusion.",
    },
    DemoPrompt {
        name: "effusion left",
        finding: Finding::Effusion(Side::Left),
        text: "Left pleural effusion.",
    },
    DemoPrompt {
        name: "pneumothorax right",
        finding: Finding::Pneumothorax(Side::Right),
        text: "Right pneumothorax.",
    },
    DemoPrompt {
        name: "pneumothorax left",
        finding: Finding::Pneumothorax(Side::Left),
        text: "Left pneumothorax.",
    },
    DemoPrompt {
        name: "consolidation rll",
        finding: Finding::Consolidation(Lobe::RightLower),
        text: "Right lower lobe pneumonia.",
    },
];

pub struct Request {
    pub out: PathBuf,
    /// Train for seconds, not minutes: checks that every step runs (the test suite's demo).
    pub quick: bool,
    pub device: DeviceChoice,
    pub progress: bool,
}

/// How much the demo does: the full run or `--quick`.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub phantoms: usize,
    /// None: the config's own epochs.
    pub vae_epochs: Option<usize>,
    pub diffusion_epochs: Option<usize>,
    /// Images per prompt; image i of every prompt uses seed i, so that prompts compare per seed.
    pub seeds: usize,
    pub sampling_steps: usize,
    /// Phantoms rendered afresh to measure the judge itself.
    pub judge_phantoms: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                phantoms: 160,
                vae_epochs: Some(2),
                diffusion_epochs: Some(2),
                seeds: 2,
                sampling_steps: 10,
                judge_phantoms: 40,
            }
        } else {
            Self {
                phantoms: 1000,
                vae_epochs: None,
                diffusion_epochs: None,
                seeds: 10,
                sampling_steps: SAMPLER.steps,
                judge_phantoms: 400,
            }
        }
    }
}

/// The phantoms' seed: the demo is the same on every machine.
const SEED: u64 = 0;
/// Classifier-free guidance: enough that the prompt shows in a briefly trained model; at 5 and
/// more its images fall apart more often (docs/demo.md).
pub const GUIDANCE: f64 = 3.0;
/// The sampler: DDIM with η = 1, whose fresh noise at every step corrects the errors of a
/// briefly trained model that the deterministic samplers (DDIM η = 0, DPM-Solver++) carry along
/// until half of the seeds end in noise (docs/demo.md).
pub const SAMPLER: SamplerOptions = SamplerOptions {
    kind: SamplerKind::Ddim,
    steps: 50,
    eta: 1.0,
};

pub fn run(req: &Request) -> Result<ExitCode> {
    let out = &req.out;
    if out.exists()
        && std::fs::read_dir(out)
            .with_context(|| format!("--out {}: cannot read the folder", out.display()))?
            .next()
            .is_some()
    {
        bail!(
            "--out {}: the folder exists and is not empty; choose another, or remove it",
            out.display()
        );
    }
    super::prepare_out(out)?;
    let plan = Plan::new(req.quick);
    let device = crate::device::open(req.device)?;
    let mut timings = Vec::new();
    let mut timed = |stage: &'static str, t: Instant| {
        let s = t.elapsed().as_secs_f64();
        eprintln!("demo: {stage} took {s:.0} s");
        timings.push((stage, s));
    };

    let (config_path, cfg) = write_config(out, &plan)?;

    // The shipped model first: its report is there within a minute.
    let t = Instant::now();
    let shipped = out.join("shipped-model");
    write_shipped(&shipped)?;
    let shipped_steps = Checkpoint::resolve(&shipped, Pick::BestElseLast)?
        .state
        .step;
    let images = generate(req, &plan, &shipped, &out.join("shipped-images"))?;
    let shipped = ModelResults::new(
        report::SHIPPED,
        shipped_steps,
        "shipped.png",
        report::judge_images(&images)?,
    );
    timed("generation (shipped model)", t);
    let t = Instant::now();
    let judge_on_phantoms = report::judge_phantoms(plan.judge_phantoms, cfg.data.image_size);
    timed("the judge on phantoms", t);
    let mut summary = Summary {
        phantoms: plan.phantoms,
        image_size: cfg.data.image_size,
        seeds: plan.seeds,
        sampler: SAMPLER.kind.name(),
        eta: SAMPLER.eta,
        sampling_steps: plan.sampling_steps,
        guidance_scale: GUIDANCE,
        vae_steps: 0,
        timings: Vec::new(),
        models: vec![shipped],
        judge_on_phantoms,
    };
    summary.write(out)?;
    eprintln!(
        "demo: the shipped model's images are in {} (report.md); now training this run's own",
        out.join("shipped.png").display()
    );

    let t = Instant::now();
    let phantoms = out.join("phantoms");
    let bar = crate::io::progress::bar(plan.phantoms as u64, req.progress, None);
    crate::data::phantom::write_dataset(&phantoms, plan.phantoms, cfg.data.image_size, SEED, &bar)?;
    bar.finish_and_clear();
    crate::data::prepare::prepare(
        &cfg,
        &PrepareOptions {
            source: Source::Iu(phantoms),
            out: out.join("cache"),
            split_file: None,
            strict: true,
            force: false,
            progress: req.progress,
        },
    )?;
    timed("phantoms and cache", t);

    let stage = |dir: &str| RunRequest {
        config: Some(config_path.clone()),
        data: out.join("cache"),
        out: Some(out.join(dir)),
        resume: None,
        max_steps: None,
        device: device.clone(),
        precision: None,
        progress: req.progress,
    };
    let interrupted = || {
        eprintln!(
            "demo: interrupted; the runs so far are in {}",
            out.display()
        );
        Ok(ExitCode::from(crate::interrupt::EXIT_CODE))
    };
    let t = Instant::now();
    let vae = crate::train::train_vae(&stage("vae"))?;
    timed("VAE training", t);
    if vae.interrupted {
        return interrupted();
    }
    let t = Instant::now();
    let ldm = crate::train::train_diffusion(&stage("ldm"), Some(&out.join("vae")))?;
    timed("diffusion training", t);
    if ldm.interrupted {
        return interrupted();
    }

    let t = Instant::now();
    let images = generate(req, &plan, &out.join("ldm"), &out.join("images"))?;
    let own = ModelResults::new(
        report::OWN,
        ldm.steps,
        "report.png",
        report::judge_images(&images)?,
    );
    timed("generation (this run's model)", t);
    summary.vae_steps = vae.steps;
    summary.timings = timings;
    summary.models.insert(0, own);
    summary.write(out)?;
    println!("{}", summary.headline());
    println!("report: {}", out.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}

/// The model shipped in the binary (assets/demo-model: `cxrgen export` of a run of the
/// `demo` recipe trained for longer, docs/demo.md), written out as a checkpoint folder.
fn write_shipped(dir: &Path) -> Result<()> {
    // state.json last: until it is there, the folder is not a checkpoint.
    const FILES: [(&str, &[u8]); 3] = [
        (
            EMA,
            include_bytes!("../../../assets/demo-model/ema.safetensors"),
        ),
        (
            VAE_FILE,
            include_bytes!("../../../assets/demo-model/vae.safetensors"),
        ),
        (
            STATE,
            include_bytes!("../../../assets/demo-model/state.json"),
        ),
    ];
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, bytes) in FILES {
        crate::io::fs::write_synced(&dir.join(name), bytes)?;
    }
    Ok(())
}

/// The built-in `demo` config with the plan's epochs, written to `DIR/config.yaml` so that the
/// run can be repeated stage by stage with the ordinary commands.
fn write_config(out: &Path, plan: &Plan) -> Result<(String, Config)> {
    let mut cfg = Config::load("demo")?;
    if let Some(e) = plan.vae_epochs {
        cfg.train_vae.run.epochs = e;
    }
    if let Some(e) = plan.diffusion_epochs {
        cfg.train_diffusion.run.epochs = e;
    }
    let path = out.join("config.yaml");
    crate::io::fs::write_synced(&path, serde_yaml::to_string(&cfg)?.as_bytes())?;
    let path = path
        .to_str()
        .with_context(|| format!("--out {}: the path is not UTF-8", out.display()))?
        .to_string();
    Ok((path, cfg))
}

/// `plan.seeds` images of every prompt (seeds 0, 1, …) from `checkpoint` into `images`, as
/// `generate --prompts-file` writes them (the prompts file beside the folder); returns each
/// prompt's image files in seed order.
fn generate(
    req: &Request,
    plan: &Plan,
    checkpoint: &Path,
    images: &Path,
) -> Result<Vec<Vec<PathBuf>>> {
    let prompts = images.with_extension("prompts.txt");
    let text: String = PROMPTS.iter().map(|p| format!("{}\n", p.text)).collect();
    crate::io::fs::write_synced(&prompts, text.as_bytes())?;
    super::generate::run(&super::generate::Request {
        checkpoint: checkpoint.to_path_buf(),
        prompts: super::generate::Prompts::File(prompts),
        negative_prompt: String::new(),
        unconditional: false,
        n: plan.seeds,
        seed: 0,
        sampler: SamplerOptions {
            steps: plan.sampling_steps,
            ..SAMPLER
        },
        guidance: GUIDANCE,
        batch_size: None,
        out: images.to_path_buf(),
        bits: 8,
        format: super::generate::Format::Png,
        ema: true,
        json: false,
        progress: req.progress,
        device: req.device,
        precision: None,
        clip: true,
        cuda_graph: true,
    })?;
    Ok((1..=PROMPTS.len())
        .map(|line| {
            (0..plan.seeds as u64)
                .map(|seed| images.join(super::generate::prompts_file_image(line, seed, "png")))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::clean::clean_report;
    use crate::data::phantom::render;
    use crate::rng::Rng;

    #[test]
    fn every_prompt_is_a_text_the_demo_model_is_trained_on() {
        // The phantom writer's reports for each finding, over many draws of its wording, made
        // into conditioning text as the demo config says.
        let sections = Config::load("demo").unwrap().data.text;
        for p in &PROMPTS {
            let found = (0..500).any(|seed| {
                let ph = render(32, p.finding, &mut Rng::new(seed));
                clean_report(&ph.findings_text, &ph.impression_text, sections) == p.text
            });
            assert!(found, "{}: not a phantom report: {}", p.name, p.text);
        }
    }
}
