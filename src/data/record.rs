//! One image with its report: what every loader produces and every later stage reads.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::config::Projection;
use crate::config::{DataConfig, TextRequirement};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Which collection it came from (`iu`, `nih`, ...).
    pub dataset: String,
    /// The report or study id.
    pub uid: String,
    /// Splits keep each patient on one side. IU-CXR has no patient ids: one report is one patient.
    pub patient_id: String,
    pub image: PathBuf,
    pub projection: Projection,
    /// A class label where the source has one (empty otherwise).
    pub label: String,
    pub findings: String,
    pub impression: String,
}

/// Something a loader or a stage did not keep, and why. Nothing is dropped silently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dropped {
    /// The image path, or the report id where there is no image.
    pub item: String,
    pub reason: String,
}

/// What a loader read: the records kept, those excluded by the data policy (views, report
/// sections, reports without images) and those dropped because the data is inconsistent.
#[derive(Debug, Clone, Default)]
pub struct Collection {
    /// Reports (studies) read, with or without images.
    pub reports: usize,
    pub records: Vec<Record>,
    pub excluded: Vec<Dropped>,
    pub dropped: Vec<Dropped>,
}

impl Collection {
    /// Keeps the records the data policy accepts (views, report sections); the others move to
    /// `excluded` with the reason.
    pub fn select(self, cfg: &DataConfig) -> Self {
        let mut out = Collection {
            records: Vec::with_capacity(self.records.len()),
            ..self
        };
        for r in self.records {
            match rejection(&r, cfg) {
                None => out.records.push(r),
                Some(reason) => out.excluded.push(Dropped {
                    item: r.image.display().to_string(),
                    reason,
                }),
            }
        }
        out
    }
}

fn rejection(r: &Record, cfg: &DataConfig) -> Option<String> {
    if !cfg.views.contains(&r.projection) {
        return Some(format!("{} view", r.projection));
    }
    let (f, i) = (
        !r.findings.trim().is_empty(),
        !r.impression.trim().is_empty(),
    );
    let ok = match cfg.require {
        TextRequirement::FindingsAndImpression => f && i,
        TextRequirement::FindingsOrImpression => f || i,
        TextRequirement::Any => true,
    };
    if ok {
        return None;
    }
    Some(
        match (f, i) {
            (false, false) => "report has neither findings nor impression",
            (false, true) => "report has no findings",
            _ => "report has no impression",
        }
        .to_string(),
    )
}
