//! `eval generation --images DIR`: a folder of already generated PNGs instead of generating.
//!
//! Each image's prompt is the `prompt` text chunk that `cxrgen generate` writes into every PNG
//! (with its seed, sampler and checkpoint SHA-256), so that an image carries its own mapping
//! wherever it is copied. A prompt must be the text of a report of the split (the cleaned text
//! the model is conditioned on, whitespace runs counting as one space); the images of one prompt
//! are grouped, and the first report with that text (in cache order) is the real image paired
//! with the prompt's first image.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::Prompt;
use crate::data::cache::Cache;
use crate::data::split::Split;

/// What was read from the folder, for eval.json.
pub struct Folder {
    pub dir: PathBuf,
    pub files: usize,
    /// The distinct `checkpoint_sha256` chunks of the images (empty when none has one).
    pub checkpoints: BTreeSet<String>,
}

impl Folder {
    pub fn json(&self) -> Value {
        json!({
            "images_folder": self.dir.display().to_string(),
            "files": self.files,
            "checkpoint_sha256": self.checkpoints,
            "prompts": "each PNG's `prompt` text chunk (written by cxrgen generate), matched to the text of a report of the split",
        })
    }
}

fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every PNG of `dir` (sorted by name), grouped by prompt, each group with the reports of
/// `split` whose text is its prompt. The images must be 1-channel, `size`×`size`.
pub fn load(
    dir: &Path,
    cache: &Cache,
    split: Split,
    size: usize,
    device: &Device,
) -> Result<(Vec<Prompt>, Vec<Tensor>, Folder)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("--images {}: cannot read the folder", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("--images {}: cannot read the folder", dir.display()))?;
    files.retain(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")));
    files.sort();
    if files.is_empty() {
        bail!("--images {}: no PNG files in it", dir.display())
    }
    let mut reports: HashMap<String, Vec<usize>> = HashMap::new();
    for i in cache.indices(split) {
        reports
            .entry(squash(&cache.records[i].text))
            .or_default()
            .push(i);
    }
    let mut checkpoints = BTreeSet::new();
    // Prompt text → position in `groups`, in the order first seen.
    let mut position: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<(String, Vec<Tensor>, Vec<String>)> = Vec::new();
    for file in &files {
        let text = crate::io::png::read_text(file)?;
        let Some(prompt) = text.get("prompt") else {
            bail!(
                "{}: no `prompt` text chunk; --images reads each image's prompt from the chunk `cxrgen generate` writes",
                file.display()
            )
        };
        let prompt = squash(prompt);
        if !reports.contains_key(&prompt) {
            bail!(
                "{}: its prompt is not the text of any report of the {split} split of {} (whose \
                 texts are made from {}: data.text): \"{prompt}\"",
                file.display(),
                cache.dir.display(),
                cache.meta.text
            )
        }
        if let Some(sha) = text.get("checkpoint_sha256") {
            checkpoints.insert(sha.clone());
        }
        let image = read_gray(file, size, device)?;
        let k = *position.entry(prompt.clone()).or_insert_with(|| {
            groups.push((prompt, Vec::new(), Vec::new()));
            groups.len() - 1
        });
        groups[k].1.push(image);
        groups[k].2.push(file.display().to_string());
    }
    let mut prompts = Vec::with_capacity(groups.len());
    let mut tensors = Vec::with_capacity(groups.len());
    for (text, images, sources) in groups {
        tensors.push(Tensor::cat(&images, 0)?);
        prompts.push(Prompt {
            reports: reports[&text].clone(),
            text,
            sources,
        });
    }
    Ok((
        prompts,
        tensors,
        Folder {
            dir: dir.to_path_buf(),
            files: files.len(),
            checkpoints,
        },
    ))
}

/// A 1-channel PNG of `size`×`size` pixels (8 or 16 bits) as [1, 1, S, S] in [0, 1].
fn read_gray(file: &Path, size: usize, device: &Device) -> Result<Tensor> {
    let img = image::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if (w, h) != (size, size) {
        bail!(
            "{}: {w}×{h} pixels, but the images of the model and --data are {size}×{size}",
            file.display()
        )
    }
    let pixels: Vec<f32> = match img {
        image::DynamicImage::ImageLuma8(i) => {
            i.as_raw().iter().map(|&v| v as f32 / 255.0).collect()
        }
        image::DynamicImage::ImageLuma16(i) => {
            i.as_raw().iter().map(|&v| v as f32 / 65535.0).collect()
        }
        other => bail!(
            "{}: {:?} pixels; cxrgen generates 1-channel grayscale PNGs (8 or 16 bits)",
            file.display(),
            other.color()
        ),
    };
    Ok(Tensor::from_vec(pixels, (1, 1, size, size), device)?)
}
