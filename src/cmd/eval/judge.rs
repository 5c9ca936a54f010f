//! Prompt alignment, judge 2 (`--judge phantom`), on models trained on phantoms: every generated
//! image measured with the phantom measurements ([`crate::data::phantom::measure`]: the
//! cardiothoracic ratio, the side of an effusion or a pneumothorax, the lobe of a consolidation)
//! and compared with the finding its prompt states ([`crate::data::phantom::read_finding`]);
//! per finding the share that agrees, with a 95 % Wilson interval, beside the same measurement on
//! the held-out real phantoms of the cache (the ceiling: how often the judge reads a real phantom
//! right).

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde_json::{json, Map, Value};

use super::report::progress_bar;
use super::{Prompt, Request};
use crate::data::cache::Cache;
use crate::data::phantom::{measure, read_finding, Finding, Measurement};
use crate::eval::summary::Proportion;

/// The judges `--judge` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    /// The phantom measurements against the finding of a phantom report.
    Phantom,
}

/// Below this the phantom measurements' runs and margins lose their meaning (`cxrgen phantom`
/// draws at 32 pixels or more).
const MIN_SIDE: usize = 32;

/// The finding each prompt states; an error names the first prompt that is not a phantom
/// report, and images too small to measure.
pub fn prompted_findings(prompts: &[Prompt], cache: &Cache, size: usize) -> Result<Vec<Finding>> {
    if size < MIN_SIDE {
        bail!("--judge phantom: the images are {size}×{size}; the phantom measurements need {MIN_SIDE}×{MIN_SIDE} or more")
    }
    prompts
        .iter()
        .map(|p| {
            read_finding(&p.text).ok_or_else(|| {
                let r = &cache.records[p.reports[0]];
                anyhow::anyhow!(
                    "--judge phantom: the prompt of report {} ({}) is not a phantom report as `cxrgen phantom` writes them: \"{}\"; the judge reads the finding from that wording",
                    r.uid,
                    p.sources[0],
                    p.text
                )
            })
        })
        .collect()
}

/// Judge 2 on every image (`images`: each prompt's, [k, 1, S, S] in [0, 1]; `findings`: each
/// prompt's); each image's record receives what was prompted and measured.
pub fn judge(
    req: &Request,
    prompts: &[Prompt],
    findings: &[Finding],
    images: &[Tensor],
    records: &mut [Map<String, Value>],
) -> Result<Tally> {
    let bar = progress_bar(req, records.len());
    let mut tally = Tally::default();
    let mut records = records.iter_mut();
    for ((p, imgs), &f) in prompts.iter().zip(images).zip(findings) {
        for j in 0..p.sources.len() {
            let image = imgs.get(j)?;
            let m = measure(&image.flatten_all()?.to_vec1::<f32>()?, image.dim(2)?);
            tally.add(f, &m);
            let (agrees, kind_agrees) = agreement(f, &m);
            records.next().expect("one record per image").insert(
                "phantom".into(),
                json!({
                    "prompted": f.name(),
                    "measured": m.label(),
                    "ctr": m.ctr,
                    "agrees": agrees,
                    "kind_agrees": kind_agrees,
                }),
            );
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(tally)
}

/// Per kind of prompted finding: images, exact agreement, agreement on the kind alone,
/// unreadable images.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    rows: [Counts; 5],
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    images: usize,
    agree: usize,
    kind_agree: usize,
    unreadable: usize,
}

impl Counts {
    fn json(&self) -> Value {
        json!({
            "images": self.images,
            "agree": Proportion::wilson(self.agree, self.images),
            "kind_agrees": Proportion::wilson(self.kind_agree, self.images),
            "unreadable": self.unreadable,
        })
    }
}

/// Whether the measured finding is the prompted one (side and lobe included), and whether its
/// kind is.
fn agreement(prompted: Finding, m: &Measurement) -> (bool, bool) {
    let found = m.finding();
    (
        found == Some(prompted),
        found.is_some_and(|f| f.kind() == prompted.kind()),
    )
}

impl Tally {
    fn add(&mut self, prompted: Finding, m: &Measurement) {
        let k = Finding::KINDS
            .iter()
            .position(|&k| k == prompted.kind())
            .expect("every kind has a row");
        let (agree, kind_agree) = agreement(prompted, m);
        let c = &mut self.rows[k];
        c.images += 1;
        c.agree += usize::from(agree);
        c.kind_agree += usize::from(kind_agree);
        c.unreadable += usize::from(m.ctr.is_none());
    }

    fn all(&self) -> Counts {
        self.rows.iter().fold(Counts::default(), |a, c| Counts {
            images: a.images + c.images,
            agree: a.agree + c.agree,
            kind_agree: a.kind_agree + c.kind_agree,
            unreadable: a.unreadable + c.unreadable,
        })
    }

    fn json(&self) -> Value {
        let mut rows: serde_json::Map<String, Value> = Finding::KINDS
            .iter()
            .zip(&self.rows)
            .filter(|(_, c)| c.images > 0)
            .map(|(k, c)| (k.to_string(), c.json()))
            .collect();
        rows.insert("all".into(), self.all().json());
        Value::Object(rows)
    }
}

/// The held-out real phantoms measured against their reports' findings: the ceiling. Reports
/// that are not phantom reports are counted, not measured.
pub fn ceiling(cache: &Cache, real: &[usize]) -> Result<(Tally, usize)> {
    let mut tally = Tally::default();
    let mut not_phantom = 0;
    for &i in real {
        match read_finding(&cache.records[i].text) {
            Some(f) => {
                let pixels: Vec<f32> = cache.pixels(i)?.iter().map(|&v| v as f32 / 255.0).collect();
                tally.add(f, &measure(&pixels, cache.meta.image_size));
            }
            None => not_phantom += 1,
        }
    }
    Ok((tally, not_phantom))
}

const RECIPE: &str = "each image measured with the phantom measurements (cardiothoracic ratio > 0.5 for cardiomegaly, a blunted costophrenic angle's side, a pneumothorax's air rim's side, a consolidation's lobe; one finding read, or normal) and compared with the finding its prompt states (read back from the phantom report's wording); `agree`: the same finding with its side or lobe, `kind_agrees`: the same kind; an unreadable image (no lung fields or no heart found) counts as disagreeing. Rates with 95 % Wilson score intervals";

pub fn json(generated: &Tally, real: &Tally, not_phantom: usize) -> Value {
    json!({
        "recipe": RECIPE,
        "generated": generated.json(),
        "real_ceiling": real.json(),
        "real_not_phantom_reports": not_phantom,
    })
}

fn rate(p: Option<Proportion>) -> String {
    p.map_or("–".into(), |p| {
        format!(
            "{}/{} = {:.3} [{:.3}, {:.3}]",
            p.hits, p.n, p.rate, p.low, p.high
        )
    })
}

pub fn markdown(generated: &Tally, real: &Tally, not_phantom: usize) -> String {
    let mut md = String::from(
        "\n## Prompt alignment, judge 2: the phantom measurements\n\nEach image measured (cardiothoracic ratio, effusion side, pneumothorax side, consolidation lobe) against the finding its prompt states; the held-out real phantoms of the cache, measured against their own reports, are the ceiling. Rates with 95 % Wilson intervals; an unreadable image counts as disagreeing.\n\n| prompted finding | generated: agree (with side/lobe) | kind agrees | unreadable | real phantoms (ceiling): agree | kind agrees |\n|---|---|---|---:|---|---|\n",
    );
    let rows = Finding::KINDS
        .iter()
        .zip(generated.rows.iter().zip(&real.rows))
        .map(|(k, (g, r))| (k.to_string(), *g, *r))
        .chain(std::iter::once((
            "all".to_string(),
            generated.all(),
            real.all(),
        )));
    for (kind, g, r) in rows {
        if g.images == 0 && r.images == 0 {
            continue;
        }
        md.push_str(&format!(
            "| {kind} | {} | {} | {} | {} | {} |\n",
            rate(Proportion::wilson(g.agree, g.images)),
            rate(Proportion::wilson(g.kind_agree, g.images)),
            g.unreadable,
            rate(Proportion::wilson(r.agree, r.images)),
            rate(Proportion::wilson(r.kind_agree, r.images)),
        ));
    }
    if not_phantom > 0 {
        md.push_str(&format!(
            "\n{not_phantom} held-out real image(s) whose report is not a phantom report were not measured.\n"
        ));
    }
    md
}
