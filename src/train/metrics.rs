//! A run's metrics: `metrics.jsonl` (one JSON object per optimizer step, skipped step and epoch)
//! and `loss.png` drawn from it.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use crate::checkpoint::{LOSS_PLOT, METRICS};
use crate::io::plot::{plot, Series};

/// The metrics log of a run, open for appending.
pub struct MetricsLog {
    file: File,
}

impl MetricsLog {
    /// The log in `run_dir`, keeping the lines up to `resumed_at` (a resumed run continues the log
    /// where its checkpoint was) or none (a run that starts from step 0).
    pub fn open(run_dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        let path = run_dir.join(METRICS);
        if path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| resumed_at.is_some_and(|r| s <= r))
                })
                .map(|l| format!("{l}\n"))
                .collect();
            crate::io::fs::replace(&path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { file })
    }

    /// Appends one line.
    pub fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        Ok(writeln!(self.file, "{line}")?)
    }

    pub fn flush(&mut self) -> Result<()> {
        Ok(self.file.flush()?)
    }
}

/// Draws `loss.png` in `run_dir` from its metrics: the training loss of every step and the
/// validation loss of every epoch. Replaced atomically.
pub fn write_loss_plot(run_dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(run_dir.join(METRICS)).unwrap_or_default();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let step = v["step"].as_f64().unwrap_or(0.0);
        match v["kind"].as_str() {
            Some("step") => train.extend(v["loss"].as_f64().map(|l| (step, l))),
            Some("epoch") => val.extend(v["val_loss"].as_f64().map(|l| (step, l))),
            _ => {}
        }
    }
    let series = [
        Series {
            name: "train",
            points: train,
            color: [70, 110, 200],
            markers: false,
        },
        Series {
            name: "val",
            points: val,
            color: [230, 120, 20],
            markers: true,
        },
    ];
    let img = plot(&series, 800, 480, "step", "loss");
    crate::io::fs::replace_image(&run_dir.join(LOSS_PLOT), img)
}
