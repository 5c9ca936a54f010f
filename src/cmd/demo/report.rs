//! What the demo's images show: each image's findings measured back, the rates a reader checks
//! (did "cardiomegaly" enlarge the heart, did "right effusion" blunt the right angle), the
//! judge's own accuracy on phantoms whose truth is known, and the report files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::imageops::FilterType;
use image::{Rgb, RgbImage};
use serde::Serialize;

use super::PROMPTS;
use crate::data::phantom::{measure, render, Finding, Measurement, Side};
use crate::io::font;
use crate::rng::Rng;

/// One generated image and what was measured on it.
#[derive(Debug, Clone, Serialize)]
pub struct Judged {
    pub seed: u64,
    pub file: PathBuf,
    pub ctr: Option<f64>,
    /// What the measurements read ([`Measurement::label`]).
    pub measured: String,
    /// The measured finding is the prompted one.
    pub agrees: bool,
    #[serde(skip)]
    pub measurement: Measurement,
}

/// Measures every image; `images[p][s]` is prompt p's image of seed s.
pub fn judge_images(images: &[Vec<PathBuf>]) -> Result<Vec<Vec<Judged>>> {
    images
        .iter()
        .zip(&PROMPTS)
        .map(|(files, prompt)| {
            files
                .iter()
                .enumerate()
                .map(|(seed, file)| {
                    let img = image::open(file)
                        .with_context(|| format!("cannot read {}", file.display()))?
                        .to_luma8();
                    let pixels: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
                    let m = measure(&pixels, img.width() as usize);
                    Ok(Judged {
                        seed: seed as u64,
                        file: file.clone(),
                        ctr: m.ctr,
                        measured: m.label(),
                        agrees: m.finding() == Some(prompt.finding),
                        measurement: m,
                    })
                })
                .collect()
        })
        .collect()
}

/// The judge on phantoms whose truth is known: per kind of finding, how often the measured
/// finding is the drawn one.
#[derive(Debug, Clone, Serialize)]
pub struct JudgeRow {
    pub kind: &'static str,
    pub images: usize,
    pub agree: usize,
}

/// Renders `n` phantoms at `size` (seeds apart from the training set's) and measures them.
pub fn judge_phantoms(n: usize, size: usize) -> Vec<JudgeRow> {
    let mut rows: Vec<JudgeRow> = Finding::KINDS
        .iter()
        .map(|&kind| JudgeRow {
            kind,
            images: 0,
            agree: 0,
        })
        .collect();
    for i in 0..n {
        let mut rng = Rng::new(0x5EED_0000 + i as u64);
        let finding = Finding::random(&mut rng);
        let p = render(size, finding, &mut rng);
        let row = rows
            .iter_mut()
            .find(|r| r.kind == finding.kind())
            .expect("every kind has a row");
        row.images += 1;
        row.agree += usize::from(measure(&p.pixels, size).finding() == Some(finding));
    }
    rows
}

/// A rate the report checks: `hits` of `of`, and the demo's target for it.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub what: &'static str,
    pub hits: usize,
    pub of: usize,
    /// Of `of`, those the judge could not read (an image without lung fields; for the heart, a
    /// pair without both hearts measured): they count as misses.
    pub unreadable: usize,
    /// None: reported, no target.
    pub target: Option<f64>,
}

impl Rate {
    fn fraction(&self) -> f64 {
        self.hits as f64 / self.of.max(1) as f64
    }

    fn met(&self) -> Option<bool> {
        self.target.map(|t| self.of > 0 && self.fraction() >= t)
    }

    fn text(&self) -> String {
        let unreadable = match self.unreadable {
            0 => String::new(),
            n => format!("; {n} unreadable, counted as misses"),
        };
        format!(
            "{} of {} ({:.0} %{unreadable})",
            self.hits,
            self.of,
            100.0 * self.fraction()
        )
    }
}

/// The rates: the heart of "cardiomegaly" against "normal" seed by seed, and the side of each
/// lateral finding.
fn rates(judged: &[Vec<Judged>]) -> Vec<Rate> {
    let of = |name: &str| {
        let i = PROMPTS
            .iter()
            .position(|p| p.name == name)
            .expect("a demo prompt");
        &judged[i]
    };
    let (normal, cardio) = (of("normal"), of("cardiomegaly"));
    let pairs: Vec<(f64, f64)> = normal
        .iter()
        .zip(cardio)
        .filter_map(|(n, c)| Some((n.ctr?, c.ctr?)))
        .collect();
    let side = |what: &'static str, names: &[&str], read: fn(&Measurement) -> Option<Side>| {
        let mut r = Rate {
            what,
            hits: 0,
            of: 0,
            unreadable: 0,
            target: None,
        };
        for &name in names {
            let want = PROMPTS
                .iter()
                .find(|p| p.name == name)
                .and_then(|p| p.finding.side());
            for j in of(name) {
                r.of += 1;
                r.unreadable += usize::from(!j.measurement.lung_fields);
                r.hits += usize::from(read(&j.measurement) == want);
            }
        }
        r
    };
    vec![
        Rate {
            what: "\"cardiomegaly\" heart wider than \"normal\" (same seed, cardiothoracic ratio)",
            hits: pairs.iter().filter(|(n, c)| c > n).count(),
            of: normal.len(),
            unreadable: normal.len() - pairs.len(),
            target: Some(0.9),
        },
        Rate {
            target: Some(0.8),
            ..side(
                "effusion on the prompted side",
                &["effusion right", "effusion left"],
                |m| m.effusion,
            )
        },
        side(
            "pneumothorax on the prompted side",
            &["pneumothorax right", "pneumothorax left"],
            |m| m.pneumothorax,
        ),
        side(
            "consolidation on the prompted side",
            &["consolidation rll"],
            |m| {
                m.consolidation
                    .and_then(|l| Finding::Consolidation(l).side())
            },
        ),
    ]
}

/// The two models' names in the report.
pub const OWN: &str = "this run's";
pub const SHIPPED: &str = "the shipped";

/// One model's images and rates.
#[derive(Debug, Serialize)]
pub struct ModelResults {
    /// Which model: "this run's" or "the shipped".
    pub model: &'static str,
    /// Its diffusion training steps.
    pub diffusion_steps: u64,
    /// The sheet of its images, in the demo folder.
    pub sheet: &'static str,
    pub prompts: Vec<PromptResult>,
    pub rates: Vec<Rate>,
}

#[derive(Debug, Serialize)]
pub struct PromptResult {
    pub name: &'static str,
    pub text: &'static str,
    pub images: Vec<Judged>,
}

impl ModelResults {
    pub fn new(
        model: &'static str,
        diffusion_steps: u64,
        sheet: &'static str,
        judged: Vec<Vec<Judged>>,
    ) -> Self {
        Self {
            model,
            diffusion_steps,
            sheet,
            rates: rates(&judged),
            prompts: PROMPTS
                .iter()
                .zip(judged)
                .map(|(p, images)| PromptResult {
                    name: p.name,
                    text: p.text,
                    images,
                })
                .collect(),
        }
    }

    /// The rates, one line each.
    fn headline(&self) -> String {
        self.rates
            .iter()
            .map(|r| {
                let verdict = match r.met() {
                    Some(true) => " (target met)",
                    Some(false) => " (target missed)",
                    None => "",
                };
                format!("{} model: {}: {}{verdict}", self.model, r.what, r.text())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn markdown(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "![one row per prompt, each image captioned with what was measured]({})\n",
            self.sheet
        );
        let _ = writeln!(s, "| what | measured | target |\n|---|---|---|");
        for r in &self.rates {
            let target = match (r.target, r.met()) {
                (Some(t), Some(met)) => {
                    format!(
                        "≥ {:.0} %: {}",
                        100.0 * t,
                        if met { "met" } else { "missed" }
                    )
                }
                _ => "–".into(),
            };
            let _ = writeln!(s, "| {} | {} | {target} |", r.what, r.text());
        }
        let _ = writeln!(
            s,
            "\n| prompt | measured finding = prompted | cardiothoracic ratio (mean) |\n|---|---|---|"
        );
        for p in &self.prompts {
            let ctrs: Vec<f64> = p.images.iter().filter_map(|j| j.ctr).collect();
            let mean = if ctrs.is_empty() {
                "–".into()
            } else {
                format!("{:.3}", ctrs.iter().sum::<f64>() / ctrs.len() as f64)
            };
            let agree = p.images.iter().filter(|j| j.agrees).count();
            let _ = writeln!(
                s,
                "| {}: \"{}\" | {agree} of {} | {mean} |",
                p.name,
                p.text,
                p.images.len()
            );
        }
    }

    /// The sheet: one row per prompt (its name on the left), one column per seed, each image
    /// captioned with its cardiothoracic ratio and the finding read, green where that is the
    /// prompted finding, red where not.
    fn sheet(&self) -> Result<RgbImage> {
        let cols = self
            .prompts
            .iter()
            .map(|p| p.images.len())
            .max()
            .unwrap_or(0) as u32;
        let rows = self.prompts.len() as u32;
        let (cell_w, cell_h) = (TILE + GAP, TILE + CAPTION + GAP);
        let mut img = RgbImage::from_pixel(
            LABEL + cols * cell_w + GAP,
            HEADER + rows * cell_h + GAP,
            Rgb([255, 255, 255]),
        );
        let ink = Rgb([30, 30, 30]);
        for c in 0..cols {
            let x = (LABEL + c * cell_w) as i64;
            font::text(&mut img, x, 4, &format!("seed {c}"), 2, ink);
        }
        for (r, p) in self.prompts.iter().enumerate() {
            let y0 = HEADER + r as u32 * cell_h;
            font::text(&mut img, 4, (y0 + TILE / 2) as i64 - 5, p.name, 2, ink);
            for (c, j) in p.images.iter().enumerate() {
                let x0 = LABEL + c as u32 * cell_w;
                let tile = image::open(&j.file)
                    .with_context(|| format!("cannot read {}", j.file.display()))?
                    .to_luma8();
                let tile = image::imageops::resize(&tile, TILE, TILE, FilterType::Triangle);
                for (x, y, v) in tile.enumerate_pixels() {
                    img.put_pixel(x0 + x, y0 + y, Rgb([v.0[0]; 3]));
                }
                let color = if j.agrees {
                    Rgb([0, 130, 0])
                } else {
                    Rgb([190, 0, 0])
                };
                let ctr = j.ctr.map_or("ctr -".into(), |v| format!("ctr {v:.2}"));
                let (x, y) = (x0 as i64, (y0 + TILE + 2) as i64);
                font::text(&mut img, x, y, &ctr, 1, color);
                font::text(&mut img, x, y + 7, &j.measured, 1, color);
            }
        }
        Ok(img)
    }
}

// The sheet's layout, in pixels: tiles, the gaps between them, the caption under each, the
// prompt names on the left, the seeds on top.
pub const TILE: u32 = 128;
pub const GAP: u32 = 4;
pub const CAPTION: u32 = 18;
pub const LABEL: u32 = 160;
pub const HEADER: u32 = 20;

/// Everything the report says, also written as `report.json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub phantoms: usize,
    pub image_size: usize,
    pub seeds: usize,
    /// The sampler's name (`cxrgen generate --sampler`) and its η.
    pub sampler: &'static str,
    pub eta: f64,
    pub sampling_steps: usize,
    pub guidance_scale: f64,
    pub vae_steps: u64,
    /// Seconds per stage.
    pub timings: Vec<(&'static str, f64)>,
    /// This run's model, then the shipped one.
    pub models: Vec<ModelResults>,
    pub judge_on_phantoms: Vec<JudgeRow>,
}

impl Summary {
    /// The rates of every model, one line each.
    pub fn headline(&self) -> String {
        self.models
            .iter()
            .map(ModelResults::headline)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Writes `report.md`, `report.json` and each model's sheet into `out`, all of them or
    /// none (a report written earlier stays whole until the new one replaces it).
    pub fn write(&self, out: &Path) -> Result<()> {
        let mut files = vec![
            (out.join("report.md"), self.markdown().into_bytes()),
            (
                out.join("report.json"),
                serde_json::to_string_pretty(self)?.into_bytes(),
            ),
        ];
        for m in &self.models {
            let path = out.join(m.sheet);
            let bytes = crate::io::fs::image_bytes(&path, m.sheet()?)?;
            files.push((path, bytes));
        }
        let files: Vec<(&Path, &[u8])> = files
            .iter()
            .map(|(p, b)| (p.as_path(), b.as_slice()))
            .collect();
        crate::io::fs::replace_all(&files)
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let training: f64 = self
            .timings
            .iter()
            .filter(|(stage, _)| stage.ends_with("training"))
            .map(|(_, t)| t)
            .sum();
        let _ = writeln!(s, "# cxrgen demo\n");
        let sampling = format!(
            "{} images per prompt (seeds 0–{}, {} η = {}, {} steps, guidance {}), each \
             measured back with the phantom measurements",
            self.seeds,
            self.seeds.saturating_sub(1),
            self.sampler,
            self.eta,
            self.sampling_steps,
            self.guidance_scale
        );
        match self.models.iter().find(|m| m.model == OWN) {
            Some(own) => {
                let _ = writeln!(
                    s,
                    "{} phantom radiographs of {}×{} (known findings), a VAE trained for {} \
                     steps and a latent diffusion model for {} steps ({:.1} min of training), \
                     then {sampling}. The same prompts and seeds went to the model shipped in \
                     the binary, trained on the same kind of phantoms for longer \
                     (docs/demo.md). The config is `config.yaml` beside this file.\n",
                    self.phantoms,
                    self.image_size,
                    self.image_size,
                    self.vae_steps,
                    own.diffusion_steps,
                    training / 60.0
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "The model shipped in the binary (docs/demo.md): {sampling}. This run's own \
                     model is training; this report is replaced when it is done.\n"
                );
            }
        }
        for m in &self.models {
            let _ = writeln!(
                s,
                "## Were the prompts followed? {} model ({} diffusion steps)\n",
                m.model, m.diffusion_steps
            );
            m.markdown(&mut s);
            let _ = writeln!(s);
        }
        let _ = writeln!(s, "## How far the judge can be trusted\n");
        let _ = writeln!(
            s,
            "The same measurements on phantoms rendered afresh at {}×{}, whose findings are \
             known: how often they read the drawn finding. A rate above is only as good as \
             these.\n",
            self.image_size, self.image_size
        );
        let _ = writeln!(s, "| drawn | images | read correctly |\n|---|---|---|");
        for r in &self.judge_on_phantoms {
            let _ = writeln!(
                s,
                "| {} | {} | {} ({:.0} %) |",
                r.kind,
                r.images,
                r.agree,
                100.0 * r.agree as f64 / r.images.max(1) as f64
            );
        }
        if !self.models.iter().any(|m| m.model == OWN) {
            return s;
        }
        let _ = writeln!(s, "\n## Training\n");
        let _ = writeln!(
            s,
            "![VAE loss](vae/loss.png) ![diffusion loss](ldm/loss.png)\n"
        );
        let _ = writeln!(s, "| stage | seconds |\n|---|---|");
        for (stage, t) in &self.timings {
            let _ = writeln!(s, "| {stage} | {t:.0} |");
        }
        s
    }
}
