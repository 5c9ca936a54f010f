//! What `eval vae` and `eval generation` share: the held-out images, progress, and outputs
//! (eval.json, eval.md, figures) written so that none is ever half-written.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Tensor;
use indicatif::ProgressBar;

use super::{Metric, Request};
use crate::data::cache::Cache;
use crate::eval::summary::MeanStd;

/// The output folder of one evaluation: created up front (so that an unwritable `--out` fails
/// before any work), and removed again on failure if this evaluation created it and left it
/// empty.
pub struct OutDir {
    pub path: PathBuf,
    created: bool,
    finished: bool,
}

impl OutDir {
    pub fn prepare(path: &Path) -> Result<Self> {
        let created = !path.exists();
        crate::cmd::prepare_out(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            created,
            finished: false,
        })
    }

    /// Writes every file (name in the folder, bytes), all of them or none
    /// ([`crate::io::fs::replace_all`]).
    pub fn write(mut self, files: &[(&str, &[u8])]) -> Result<()> {
        let paths: Vec<PathBuf> = files.iter().map(|(name, _)| self.path.join(name)).collect();
        let files: Vec<(&Path, &[u8])> = paths
            .iter()
            .zip(files)
            .map(|(path, (_, bytes))| (path.as_path(), *bytes))
            .collect();
        crate::io::fs::replace_all(&files)?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if self.created && !self.finished {
            // Only an empty folder goes: remove_dir refuses anything else.
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// `mean ± std` with `digits` decimals.
pub fn mean_std(s: &MeanStd, digits: usize) -> String {
    format!("{:.digits$} ± {:.digits$}", s.mean, s.std)
}

/// The indices of the `--split` images of `cache`, which must hold images of `size` pixels.
pub fn held_out(req: &Request, cache: &Cache, size: usize) -> Result<Vec<usize>> {
    if cache.meta.image_size != size {
        bail!(
            "--data {}: its images are {s}×{s} but the model was trained on {size}×{size}",
            req.data.display(),
            s = cache.meta.image_size
        )
    }
    let indices = cache.indices(req.split);
    if indices.is_empty() {
        bail!(
            "--data {}: the {} split holds no images",
            req.data.display(),
            req.split
        )
    }
    Ok(indices)
}

/// A progress bar over `n` steps, hidden when stderr is not a terminal.
pub fn progress_bar(req: &Request, n: usize) -> ProgressBar {
    crate::io::progress::bar(n as u64, req.progress, None)
}

/// [−1, 1] → [0, 1].
pub fn unit(t: &Tensor) -> candle_core::Result<Tensor> {
    (t + 1.0)? * 0.5
}

/// Pretty JSON with a final newline.
pub fn json_bytes(value: &serde_json::Value) -> Result<Vec<u8>> {
    Ok((serde_json::to_string_pretty(value)? + "\n").into_bytes())
}

/// The closing lines on stderr: what was left out, the paired metrics, where the files went.
pub fn finish(req: &Request, left_out: &[String], summaries: &[(Metric, MeanStd)]) {
    for line in left_out {
        eprintln!("{line}");
    }
    let line: Vec<String> = summaries
        .iter()
        .map(|(m, s)| format!("{} {}", m.name().to_uppercase(), mean_std(s, 4)))
        .collect();
    if !line.is_empty() {
        eprintln!("{}", line.join(", "));
    }
    eprintln!("wrote eval.json and eval.md to {}", req.out_dir().display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_all_files_or_leaves_no_trace() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("new");
        // Dropped without writing: the folder it created goes again.
        drop(OutDir::prepare(&out).unwrap());
        assert!(!out.exists());
        OutDir::prepare(&out)
            .unwrap()
            .write(&[("a.json", b"{}"), ("a.md", b"# a")])
            .unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.json", "a.md"]);
        // An existing folder is kept on failure, with its files.
        drop(OutDir::prepare(&out).unwrap());
        assert!(out.join("a.json").is_file());
        // A file in the way of the folder is an error naming --out.
        let file = root.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = OutDir::prepare(&file.join("sub"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--out"), "{err}");
    }
}
