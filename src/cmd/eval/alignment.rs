//! Prompt alignment, judge 1: the alignment classifier of `cxrgen train-classifier` names the
//! class of each generated image, and the class its prompt asks for is the label of the
//! prompt's held-out report. Precision, recall and F1 per class and overall in the paper's
//! Table 4 layout, the confusion matrix, and the Inception Score's formula on the classifier's
//! softmax ("Inception-Score-like score on this classifier").

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::distribution::Extractor;
use super::Prompt;
use crate::data::cache::Cache;
use crate::eval::classification::{inception_score_like, Confusion};
use crate::model::classifier::{TrainedClassifier, REPORT_FILE};

/// The confusion matrix figure.
pub const CONFUSION_FIGURE: &str = "alignment-confusion.png";

/// The paper's Table 4 (§4.2.2): finding, precision, recall, F1.
const PAPER: [(&str, f64, f64, f64); 5] = [
    ("Normal", 0.89, 0.92, 0.90),
    ("Pneumonia", 0.76, 0.71, 0.73),
    ("Effusion", 0.81, 0.78, 0.79),
    ("Cardiomegaly", 0.84, 0.86, 0.85),
    ("Pneumothorax", 0.72, 0.68, 0.70),
];
const PAPER_OVERALL: (f64, f64, f64) = (0.80, 0.79, 0.79);
/// The paper's Inception Score (Table 3), from ImageNet Inception: not comparable.
const PAPER_IS: &str = "3.84 ± 0.21";

const MAPPING: &str = "an image's class is the label of its prompt's held-out report (as the cache holds it: a manifest's label column, a phantom's finding, IU-CXR's Problems), when that label is one of the classifier's classes; other images are left out of precision, recall and F1";
const IS_NAME: &str = "Inception-Score-like score on this classifier";
const IS_RECIPE: &str = "exp(E_x KL(p(y|x) || p(y))) on the alignment classifier's softmax, p(y) the mean over all generated images, one split; between 1 and the number of classes";

/// The classifier's class of each prompt, or why it has none.
pub fn prompt_classes(
    clf: &TrainedClassifier,
    cache: &Cache,
    prompts: &[Prompt],
) -> Result<Vec<std::result::Result<usize, String>>> {
    let classes: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut labels: Vec<&str> = p
                .reports
                .iter()
                .map(|&i| cache.records[i].label.trim())
                .collect();
            labels.sort_unstable();
            labels.dedup();
            match labels[..] {
                [""] => Err("its report has no label".to_string()),
                [label] => clf.classes.iter().position(|c| c == label).ok_or_else(|| {
                    format!("label '{label}' is not one of the classifier's classes")
                }),
                _ => Err(format!(
                    "its text is that of reports with different labels ({})",
                    labels.join(", ")
                )),
            }
        })
        .collect::<Vec<_>>();
    if classes.iter().all(|c| c.is_err()) {
        let mut labels: BTreeMap<&str, usize> = BTreeMap::new();
        for p in prompts {
            for &i in &p.reports {
                *labels.entry(cache.records[i].label.trim()).or_default() += 1;
            }
        }
        let labels: Vec<String> = labels.iter().map(|(l, n)| format!("'{l}' ({n})")).collect();
        bail!(
            "--classifier {}: no prompt's report has a label that is one of its classes ({}); the reports' labels are {}",
            clf.dir.join(REPORT_FILE).display(),
            clf.classes.join(", "),
            labels.join(", ")
        )
    }
    Ok(classes)
}

/// The classifier's pooled features as the in-domain extractor of FID and KID.
pub fn extractor(clf: &TrainedClassifier) -> Extractor<'_> {
    Extractor {
        key: "classifier_",
        title: format!(
            "Distribution: the alignment classifier's pooled features (in-domain, {} features)",
            clf.net.feature_dim()
        ),
        dim: clf.net.feature_dim(),
        about: json!({
            "extractor": format!("the alignment classifier's pooled features (global mean and max of its last stage, {} values)", clf.net.feature_dim()),
            "classifier": clf.dir.display().to_string(),
            "weights_sha256": clf.weights_sha256,
            "resize": "none: the classifier was trained at the images' size",
        }),
        features: Box::new(|x: &Tensor| Ok(clf.net.features(&((x * 2.0)? - 1.0)?)?)),
    }
}

/// The classifier's softmax probabilities of every image of every prompt (`images`: each
/// prompt's [k, 1, S, S] in [0, 1]), in order.
fn classify(
    clf: &TrainedClassifier,
    images: &[Tensor],
    batch_size: usize,
) -> Result<Vec<Vec<f64>>> {
    let mut probs = Vec::new();
    for imgs in images {
        let n = imgs.dim(0)?;
        for start in (0..n).step_by(batch_size) {
            let x = imgs.narrow(0, start, batch_size.min(n - start))?;
            let logits = clf.net.logits(&clf.net.features(&((x * 2.0)? - 1.0)?)?)?;
            probs.extend(
                candle_nn::ops::softmax(&logits, D::Minus1)?
                    .to_dtype(DType::F64)?
                    .to_vec2::<f64>()?,
            );
        }
    }
    Ok(probs)
}

/// Judge 1 on every image (`images`: each prompt's, in [0, 1]); each image's record receives
/// its class, the predicted one and the probabilities.
pub fn judge(
    clf: &TrainedClassifier,
    cache: &Cache,
    prompts: &[Prompt],
    classes: &[std::result::Result<usize, String>],
    images: &[Tensor],
    records: &mut [Map<String, Value>],
    batch_size: usize,
) -> Result<Scores> {
    let probs = classify(clf, images, batch_size)?;
    let truth = prompts
        .iter()
        .zip(classes)
        .flat_map(|(p, class)| p.sources.iter().map(move |_| class.as_ref().ok()));
    for ((record, row), class) in records.iter_mut().zip(&probs).zip(truth) {
        record.insert(
            "classifier".into(),
            json!({
                "class": class.map(|&c| &clf.classes[c]),
                "predicted": clf.classes[predicted(row)],
                "probabilities": row,
            }),
        );
    }
    Scores::new(clf, cache, prompts, classes, &probs)
}

/// The predicted class: the most probable.
fn predicted(probs: &[f64]) -> usize {
    (0..probs.len())
        .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
        .expect("2+ classes")
}

/// Images left out of judge 1 for one reason.
#[derive(Debug, Default, Serialize)]
struct LeftOut {
    images: usize,
    /// The ids of their prompts' reports.
    reports: Vec<String>,
}

/// The scores of judge 1.
pub struct Scores {
    classes: Vec<String>,
    confusion: Confusion,
    /// Images left out of precision/recall/F1, by reason.
    left_out: BTreeMap<String, LeftOut>,
    is_like: f64,
    images: usize,
}

impl Scores {
    /// `probs`: one row per image, prompt by prompt; `classes`: each prompt's class.
    fn new(
        clf: &TrainedClassifier,
        cache: &Cache,
        prompts: &[Prompt],
        classes: &[std::result::Result<usize, String>],
        probs: &[Vec<f64>],
    ) -> Result<Self> {
        let mut confusion = Confusion::new(clf.classes.len());
        let mut left_out = BTreeMap::new();
        let mut rows = probs.iter();
        for (p, class) in prompts.iter().zip(classes) {
            for _ in &p.sources {
                let row = rows.next().expect("one row per image");
                match class {
                    Ok(c) => confusion.add(*c, predicted(row)),
                    Err(why) => {
                        let l: &mut LeftOut = left_out.entry(why.clone()).or_default();
                        l.images += 1;
                        let uid = &cache.records[p.reports[0]].uid;
                        if !l.reports.contains(uid) {
                            l.reports.push(uid.clone());
                        }
                    }
                }
            }
        }
        Ok(Self {
            classes: clf.classes.clone(),
            confusion,
            left_out,
            is_like: inception_score_like(probs).expect("at least one image"),
            images: probs.len(),
        })
    }

    /// The classes some prompt asked for: the overall figures average over these.
    fn prompted(&self) -> Vec<usize> {
        (0..self.classes.len())
            .filter(|&c| self.confusion.support(c) > 0)
            .collect()
    }

    /// Macro precision, recall and F1 over the prompted classes.
    fn overall(&self) -> (f64, f64, f64) {
        let cs = self.prompted();
        let mean =
            |f: &dyn Fn(usize) -> f64| cs.iter().map(|&c| f(c)).sum::<f64>() / cs.len() as f64;
        (
            mean(&|c| self.confusion.precision(c)),
            mean(&|c| self.confusion.recall(c)),
            mean(&|c| self.confusion.f1(c)),
        )
    }

    fn paper(class: &str) -> Option<(f64, f64, f64)> {
        PAPER
            .iter()
            .find(|(name, ..)| name.eq_ignore_ascii_case(class))
            .map(|&(_, p, r, f)| (p, r, f))
    }

    /// The confusion matrix figure: rows the prompted class, columns the predicted one.
    pub fn figure(&self) -> image::RgbImage {
        crate::io::plot::confusion_matrix(&self.classes, &self.confusion.counts)
    }

    /// `(name, entry)` pairs for eval.json's metrics.
    pub fn json(&self, clf: &TrainedClassifier) -> Vec<(String, Value)> {
        let per_class: Vec<Value> = (0..self.classes.len())
            .map(|c| {
                let paper = Self::paper(&self.classes[c])
                    .map(|(p, r, f)| json!({"precision": p, "recall": r, "f1": f}));
                json!({
                    "class": self.classes[c],
                    "images": self.confusion.support(c),
                    "predicted": self.confusion.counts.iter().map(|row| row[c]).sum::<usize>(),
                    "precision": self.confusion.precision(c),
                    "recall": self.confusion.recall(c),
                    "f1": self.confusion.f1(c),
                    "paper": paper,
                })
            })
            .collect();
        let (p, r, f) = self.overall();
        let prompted: Vec<&String> = self.prompted().iter().map(|&c| &self.classes[c]).collect();
        let about = json!({
            "classifier": clf.dir.display().to_string(),
            "weights_sha256": clf.weights_sha256,
            "classes": clf.classes,
            "image_size": clf.image_size,
        });
        let mut alignment = about.clone();
        alignment["mapping"] = MAPPING.into();
        alignment["images"] = self.images.into();
        alignment["images_judged"] = self.confusion.total().into();
        alignment["images_left_out"] = json!(self.left_out);
        alignment["per_class"] = per_class.into();
        alignment["overall"] = json!({
            "precision": p, "recall": r, "f1": f,
            "average": "macro: the unweighted mean over the classes some prompt asked for",
            "classes": prompted,
        });
        alignment["accuracy"] = self.confusion.accuracy().into();
        alignment["confusion"] = json!(self.confusion.counts);
        alignment["confusion_rows"] = "the prompt's class (rows) against the predicted class (columns), classes in the order of `classes`".into();
        alignment["paper"] = json!({"overall": {"precision": PAPER_OVERALL.0, "recall": PAPER_OVERALL.1, "f1": PAPER_OVERALL.2}, "where": "Table 4, §4.2.2"});
        let mut is_like = about;
        is_like["name"] = IS_NAME.into();
        is_like["value"] = self.is_like.into();
        is_like["images"] = self.images.into();
        is_like["recipe"] = IS_RECIPE.into();
        is_like["paper_inception_score"] =
            format!("{PAPER_IS} (Table 3: ImageNet Inception, not comparable)").into();
        vec![
            ("alignment_classifier".into(), alignment),
            ("inception_score_like_on_classifier".into(), is_like),
        ]
    }

    pub fn markdown(&self, clf: &TrainedClassifier) -> String {
        let mut md = format!(
            "\n## Prompt alignment, judge 1: the classifier (the paper's Table 4)\n\nClassifier `{}` (weights sha256 `{}`; classes {}; trained at {s}×{s}). Each image's class is the label of its prompt's held-out report; the classifier's most probable class is its prediction. {} of {} images judged.\n",
            clf.dir.display(),
            &clf.weights_sha256[..16],
            clf.classes.join(", "),
            self.confusion.total(),
            self.images,
            s = clf.image_size,
        );
        for (why, l) in &self.left_out {
            md.push_str(&format!(
                "\nLeft out: {} image(s) of report(s) {}: {why}.\n",
                l.images,
                l.reports.join(", ")
            ));
        }
        md.push_str("\n| finding | images | precision | recall | F1 | paper precision | paper recall | paper F1 |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for c in self.prompted() {
            let paper = Self::paper(&self.classes[c])
                .map_or("– | – | –".to_string(), |(p, r, f)| {
                    format!("{p:.2} | {r:.2} | {f:.2}")
                });
            md.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {:.3} | {paper} |\n",
                self.classes[c],
                self.confusion.support(c),
                self.confusion.precision(c),
                self.confusion.recall(c),
                self.confusion.f1(c)
            ));
        }
        let (p, r, f) = self.overall();
        md.push_str(&format!(
            "| Overall (macro) | {} | {p:.3} | {r:.3} | {f:.3} | {:.2} | {:.2} | {:.2} |\n",
            self.confusion.total(),
            PAPER_OVERALL.0,
            PAPER_OVERALL.1,
            PAPER_OVERALL.2
        ));
        md.push_str(&format!(
            "\nAccuracy {:.3}. Rows are the classes some prompt asked for; the overall figures are their unweighted means. The paper's values stand beside the classes of the same name. Confusion matrix: {CONFUSION_FIGURE}.\n\n{IS_NAME}: {:.3} over {} images (between 1 and {}, the number of classes). The paper's Inception Score, {PAPER_IS}, is ImageNet Inception's and not comparable.\n",
            self.confusion.accuracy(),
            self.is_like,
            self.images,
            self.classes.len()
        ));
        md
    }
}
