//! `cxrgen prepare`: loads a dataset, decodes and resizes every image once, cleans the reports,
//! assigns the patient-level split and writes the cache that training reads.
//!
//! Nothing disappears silently: images excluded by the data policy are counted by reason and listed
//! in `excluded.csv`; images that cannot be used (missing, empty, corrupt, no report) are named in
//! the summary. The cache is written to a temporary folder beside the destination and renamed into
//! place only when complete, so a failed or `--strict` run leaves no cache behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;

use super::cache::{
    self, CacheMeta, CacheRecord, EXCLUDED_FILE, META_FILE, RECORDS_FILE, SPLIT_FILE, SUMMARY_FILE,
};
use super::clean::clean_report;
use super::decode::load_gray;
use super::record::{Collection, Dropped, Record};
use super::split::{self, Split};
use super::{iu, manifest};
use crate::config::{Config, TextRequirement, TextSections};
use crate::io::fs::write_synced;

/// Images per safetensors shard (64 MiB at 256×256).
const SHARD_SIZE: usize = 1024;

#[derive(Debug, Clone)]
pub enum Source {
    /// An IU-CXR folder, Kaggle or Open-i layout.
    Iu(PathBuf),
    /// A CSV manifest.
    Manifest(PathBuf),
}

impl Source {
    pub fn load(&self) -> Result<Collection> {
        match self {
            Source::Iu(dir) => iu::load(dir),
            Source::Manifest(path) => manifest::load(path),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Iu(dir) => format!("IU-CXR {}", dir.display()),
            Source::Manifest(path) => format!("manifest {}", path.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub source: Source,
    pub out: PathBuf,
    /// Reuse this split file instead of drawing a new split.
    pub split_file: Option<PathBuf>,
    /// Any dropped image is an error, and no cache is written.
    pub strict: bool,
    /// Replace an existing cache at `out`.
    pub force: bool,
    pub progress: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SplitSummary {
    pub images: usize,
    pub patients: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub source: String,
    pub out: String,
    pub image_size: usize,
    /// Reports (studies) read.
    pub reports: usize,
    /// Image records read, before any selection.
    pub image_records: usize,
    /// Images left out by the data policy, counted by reason (each one is in excluded.csv).
    pub excluded: BTreeMap<String, usize>,
    /// Images that could not be used, each named with its reason.
    pub dropped: Vec<Dropped>,
    /// Images in the cache.
    pub prepared: usize,
    pub splits: BTreeMap<Split, SplitSummary>,
    /// Mean words of the cleaned text.
    pub mean_words: f64,
}

impl Summary {
    /// A few lines for people.
    pub fn human(&self) -> String {
        let mut s = format!(
            "{}: {} reports, {} image records → {} images prepared at {}×{} in {}\n",
            self.source,
            self.reports,
            self.image_records,
            self.prepared,
            self.image_size,
            self.image_size,
            self.out
        );
        for (split, n) in &self.splits {
            s.push_str(&format!(
                "  {split:<5} {:>7} images {:>7} patients\n",
                n.images, n.patients
            ));
        }
        s.push_str(&format!(
            "  mean report length {:.1} words\n",
            self.mean_words
        ));
        for (reason, n) in &self.excluded {
            s.push_str(&format!("  excluded {n:>6}: {reason}\n"));
        }
        s.push_str(&format!("  dropped  {:>6}\n", self.dropped.len()));
        for d in &self.dropped {
            s.push_str(&format!("    {}: {}\n", d.item, d.reason));
        }
        s
    }
}

/// Removes a temporary folder unless disarmed (set to None): a failed run leaves nothing behind.
pub struct TempDir(pub Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

pub fn prepare(cfg: &Config, opts: &PrepareOptions) -> Result<Summary> {
    let out = &opts.out;
    if out.exists() && !opts.force {
        bail!(
            "{} already exists; choose another --out or pass --force to replace it",
            out.display()
        );
    }
    let size = cfg.data.image_size;
    let loaded = opts.source.load()?;
    let image_records = loaded.records.len() + loaded.dropped.len();
    let mut collection = loaded.select(&cfg.data);
    let assignment_from_file = match &opts.split_file {
        Some(p) => Some(split::read(p)?),
        None => None,
    };

    // Reports that cleaning empties count as excluded when the policy asks for text.
    let mut texts = Vec::with_capacity(collection.records.len());
    let mut records = Vec::with_capacity(collection.records.len());
    for r in std::mem::take(&mut collection.records) {
        let text = clean_report(&r.findings, &r.impression, cfg.data.text);
        if text.is_empty() && cfg.data.require != TextRequirement::Any {
            collection.excluded.push(Dropped {
                item: r.image.display().to_string(),
                reason: match cfg.data.text {
                    TextSections::FindingsAndImpression => "report is empty after cleaning".into(),
                    one => format!("{one} (data.text) is empty after cleaning"),
                },
            });
        } else {
            records.push(r);
            texts.push(text);
        }
    }

    let tmp_path = temp_path(out)?;
    std::fs::create_dir_all(&tmp_path)
        .with_context(|| format!("cannot create {}", tmp_path.display()))?;
    let mut tmp = TempDir(Some(tmp_path.clone()));

    let bar = progress_bar(records.len() as u64, opts.progress);
    let mut kept: Vec<(Record, String)> = Vec::with_capacity(records.len());
    let mut dropped = collection.dropped;
    let mut shards = Vec::new();
    let mut pairs = records.into_iter().zip(texts).peekable();
    while pairs.peek().is_some() {
        if crate::interrupt::requested() {
            // The temporary folder is removed on the way out: no half-written cache.
            return Err(crate::interrupt::Interrupted.into());
        }
        let chunk: Vec<(Record, String)> = pairs.by_ref().take(SHARD_SIZE).collect();
        let decoded: Vec<Result<Vec<u8>, String>> = chunk
            .par_iter()
            .map(|(r, _)| {
                let px = load_gray(&r.image, size as u32);
                bar.inc(1);
                px
            })
            .collect();
        let mut pixels = Vec::with_capacity(chunk.len() * size * size);
        let mut n = 0;
        for ((record, text), px) in chunk.into_iter().zip(decoded) {
            match px {
                Ok(px) => {
                    pixels.extend_from_slice(&px);
                    kept.push((record, text));
                    n += 1;
                }
                Err(reason) => dropped.push(Dropped {
                    item: record.image.display().to_string(),
                    reason,
                }),
            }
        }
        if n > 0 {
            let name = cache::shard_name(shards.len());
            cache::write_shard(&tmp_path.join(&name), pixels, n, size)?;
            shards.push((name, n));
        }
    }
    bar.finish_and_clear();

    let kept_records: Vec<Record> = kept.iter().map(|(r, _)| r.clone()).collect();
    let (assignment, origin) = match assignment_from_file {
        Some(a) => (a, opts.split_file.as_ref().unwrap().display().to_string()),
        None => (split::assign(&kept_records, &cfg.data.split), String::new()),
    };
    let splits = split::of_records(&kept_records, &assignment, &origin)?;

    let summary = summarise(
        opts,
        size,
        collection.reports,
        image_records,
        &collection.excluded,
        &dropped,
        &kept,
        &splits,
    );
    if opts.strict && !summary.dropped.is_empty() {
        bail!(
            "--strict: {} image(s) could not be used, no cache written:\n{}",
            summary.dropped.len(),
            summary
                .dropped
                .iter()
                .map(|d| format!("  {}: {}", d.item, d.reason))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    write_records(&tmp_path.join(RECORDS_FILE), &kept, &splits)?;
    // The split file lists the patients of this cache only, so that `eval` and later stages
    // see exactly its sides.
    let used: split::Assignment = kept_records
        .iter()
        .zip(&splits)
        .map(|(r, s)| (r.patient_id.clone(), *s))
        .collect();
    split::write(&tmp_path.join(SPLIT_FILE), &used)?;
    write_excluded(&tmp_path.join(EXCLUDED_FILE), &collection.excluded)?;
    write_synced(
        &tmp_path.join(SUMMARY_FILE),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let meta = CacheMeta {
        version: cache::FORMAT_VERSION,
        image_size: size,
        text: cfg.data.text,
        shards,
    };
    write_synced(
        &tmp_path.join(META_FILE),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;

    commit(&tmp_path, out)?;
    tmp.0 = None;
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    opts: &PrepareOptions,
    size: usize,
    reports: usize,
    image_records: usize,
    excluded: &[Dropped],
    dropped: &[Dropped],
    kept: &[(Record, String)],
    splits: &[Split],
) -> Summary {
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for e in excluded {
        *by_reason.entry(e.reason.clone()).or_default() += 1;
    }
    let mut per_split: BTreeMap<Split, (usize, std::collections::BTreeSet<&str>)> = BTreeMap::new();
    for ((r, _), s) in kept.iter().zip(splits) {
        let e = per_split.entry(*s).or_default();
        e.0 += 1;
        e.1.insert(&r.patient_id);
    }
    let words: usize = kept.iter().map(|(_, t)| t.split_whitespace().count()).sum();
    Summary {
        source: opts.source.describe(),
        out: opts.out.display().to_string(),
        image_size: size,
        reports,
        image_records,
        excluded: by_reason,
        dropped: dropped.to_vec(),
        prepared: kept.len(),
        splits: Split::ALL
            .iter()
            .map(|s| {
                let (images, patients) = per_split.get(s).map_or((0, 0), |(n, p)| (*n, p.len()));
                (*s, SplitSummary { images, patients })
            })
            .collect(),
        mean_words: if kept.is_empty() {
            0.0
        } else {
            words as f64 / kept.len() as f64
        },
    }
}

fn write_records(path: &Path, kept: &[(Record, String)], splits: &[Split]) -> Result<()> {
    let mut text = String::new();
    for ((r, t), s) in kept.iter().zip(splits) {
        let rec = CacheRecord {
            split: *s,
            dataset: r.dataset.clone(),
            uid: r.uid.clone(),
            patient_id: r.patient_id.clone(),
            projection: r.projection,
            label: r.label.clone(),
            source: r.image.clone(),
            findings: r.findings.clone(),
            impression: r.impression.clone(),
            text: t.clone(),
        };
        text.push_str(&serde_json::to_string(&rec)?);
        text.push('\n');
    }
    write_synced(path, text.as_bytes())
}

fn write_excluded(path: &Path, excluded: &[Dropped]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["item", "reason"])?;
    for e in excluded {
        w.write_record([&e.item, &e.reason])?;
    }
    write_synced(path, &w.into_inner()?)
}

/// A hidden sibling of `out`, so that the final rename stays on one file system.
fn temp_path(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("--out {} has no folder name", out.display()))?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!(
            "the parent folder of --out {} does not exist",
            out.display()
        );
    }
    Ok(parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Moves the finished cache into place; an existing one (with --force) is replaced only then.
fn commit(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        let old = tmp.with_extension("old");
        std::fs::rename(out, &old)
            .with_context(|| format!("cannot move the old {} aside", out.display()))?;
        std::fs::rename(tmp, out)
            .with_context(|| format!("cannot move the new cache to {}", out.display()))?;
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove {}", old.display()))?;
    } else {
        std::fs::rename(tmp, out)
            .with_context(|| format!("cannot move the new cache to {}", out.display()))?;
    }
    Ok(())
}

fn progress_bar(n: u64, visible: bool) -> ProgressBar {
    crate::io::progress::bar(
        n,
        visible,
        Some("decoding {bar:40} {pos}/{len} images, {per_sec}, eta {eta}"),
    )
}
