//! The prepared cache that training reads, so that no image is decoded twice.
//!
//! A folder with `cache.json` (format version, image size, shards), `records.jsonl` (one line per
//! image, in shard order: ids, split, label, raw and cleaned text), the images as uint8 tensors
//! `[n, 1, S, S]` in safetensors shards `images-00000.safetensors`, ..., the split file
//! `split.csv`, and the preparation's `summary.json` and `excluded.csv`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::record::Projection;
use super::split::Split;
use crate::config::TextSections;
use crate::io::fs::write_synced;

pub const FORMAT_VERSION: u32 = 1;
pub const META_FILE: &str = "cache.json";
pub const RECORDS_FILE: &str = "records.jsonl";
pub const SPLIT_FILE: &str = "split.csv";
pub const SUMMARY_FILE: &str = "summary.json";
pub const EXCLUDED_FILE: &str = "excluded.csv";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    pub version: u32,
    pub image_size: usize,
    /// The report sections the records' `text` was made from (caches older than the setting
    /// were made from both).
    #[serde(default)]
    pub text: TextSections,
    /// Shard files in order, with the number of images in each.
    pub shards: Vec<(String, usize)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheRecord {
    pub split: Split,
    pub dataset: String,
    pub uid: String,
    pub patient_id: String,
    pub projection: Projection,
    pub label: String,
    /// The image it was made from.
    pub source: PathBuf,
    pub findings: String,
    pub impression: String,
    /// The cleaned text the model is conditioned on.
    pub text: String,
}

pub fn shard_name(i: usize) -> String {
    format!("images-{i:05}.safetensors")
}

/// Writes one shard of `n` images of `size`×`size` pixels (`pixels`: n·size² bytes).
pub fn write_shard(path: &Path, pixels: Vec<u8>, n: usize, size: usize) -> Result<()> {
    let t = Tensor::from_vec(pixels, (n, 1, size, size), &Device::Cpu)?;
    let data = safetensors::serialize([("images", &t)], None)
        .with_context(|| format!("cannot serialise {}", path.display()))?;
    write_synced(path, &data)
}

/// A prepared cache, opened for reading.
pub struct Cache {
    pub dir: PathBuf,
    pub meta: CacheMeta,
    pub records: Vec<CacheRecord>,
    /// All shards concatenated: [N, 1, S, S] u8.
    images: Tensor,
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "{} is not a prepared cache (no {META_FILE}; run `cxrgen prepare`)",
                dir.display()
            )
        })?;
        let meta: CacheMeta = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", meta_path.display()))?;
        if meta.version != FORMAT_VERSION {
            bail!(
                "{}: cache format {} but this cxrgen reads format {FORMAT_VERSION}; prepare it again",
                dir.display(),
                meta.version
            );
        }
        let records_path = dir.join(RECORDS_FILE);
        let file = File::open(&records_path)
            .with_context(|| format!("cannot open {}", records_path.display()))?;
        let records = BufReader::new(file)
            .lines()
            .enumerate()
            .map(|(i, line)| {
                let line = line?;
                serde_json::from_str(&line)
                    .with_context(|| format!("{} line {}", records_path.display(), i + 1))
            })
            .collect::<Result<Vec<CacheRecord>>>()?;
        let mut parts = Vec::with_capacity(meta.shards.len());
        for (name, n) in &meta.shards {
            let path = dir.join(name);
            let mut tensors: HashMap<String, Tensor> =
                candle_core::safetensors::load(&path, &Device::Cpu)
                    .with_context(|| format!("cannot read shard {}", path.display()))?;
            let t = tensors
                .remove("images")
                .with_context(|| format!("{} has no `images` tensor", path.display()))?;
            if t.dims() != [*n, 1, meta.image_size, meta.image_size] || t.dtype() != DType::U8 {
                let s = meta.image_size;
                bail!(
                    "{}: expected {n} images of {s}×{s} u8, found {:?} {:?}",
                    path.display(),
                    t.dims(),
                    t.dtype()
                );
            }
            parts.push(t);
        }
        let images = Tensor::cat(&parts, 0)?;
        if images.dim(0)? != records.len() {
            bail!(
                "{}: {} images but {} records",
                dir.display(),
                images.dim(0)?,
                records.len()
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            records,
            images,
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Indices of the images in `split`.
    pub fn indices(&self, split: Split) -> Vec<usize> {
        (0..self.records.len())
            .filter(|&i| self.records[i].split == split)
            .collect()
    }

    /// The images at `indices` as F32 in [−1, 1]: [n, 1, S, S] on `device`.
    pub fn images(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, indices.len(), &Device::Cpu)?;
        let t = self.images.index_select(&idx, 0)?.to_dtype(DType::F32)?;
        Ok(t.affine(2.0 / 255.0, -1.0)?.to_device(device)?)
    }

    /// The raw 8-bit pixels of one image, row-major.
    pub fn pixels(&self, index: usize) -> Result<Vec<u8>> {
        Ok(self.images.get(index)?.flatten_all()?.to_vec1::<u8>()?)
    }
}
