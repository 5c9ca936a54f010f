//! A CSV manifest, so that any dataset can be brought as one file: one row per image with
//! `image` (relative to the manifest's folder, or absolute), `patient_id`, `findings`,
//! `impression`, and optionally `dataset`, `uid`, `projection` (Frontal/Lateral/PA/AP/empty) and
//! `label`. Other columns (source, license, ...) are allowed and ignored. The format is that of
//! `../shared/data/cxr-real/manifest.csv`.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::record::{Collection, Projection, Record};

const REQUIRED: [&str; 4] = ["image", "patient_id", "findings", "impression"];

pub fn load(path: &Path) -> Result<Collection> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut reader = csv::Reader::from_path(path)
        .with_context(|| format!("cannot open manifest {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{}: cannot read the header row", path.display()))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|c| col(c).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "manifest {} lacks the column(s) {} (required: {})",
            path.display(),
            missing.join(", "),
            REQUIRED.join(", ")
        );
    }
    let [image, patient, findings, impression] = REQUIRED.map(|c| col(c).unwrap());
    let (dataset, uid, projection, label) =
        (col("dataset"), col("uid"), col("projection"), col("label"));

    let mut out = Collection::default();
    let mut uids = std::collections::HashSet::new();
    for (i, row) in reader.records().enumerate() {
        let line = i + 2;
        let row = row.with_context(|| format!("{} line {line}", path.display()))?;
        let get = |c: Option<usize>| c.and_then(|c| row.get(c)).unwrap_or("").trim().to_string();
        let image_rel = get(Some(image));
        if image_rel.is_empty() {
            bail!("{} line {line}: empty `image`", path.display());
        }
        let patient_id = get(Some(patient));
        if patient_id.is_empty() {
            bail!(
                "{} line {line}: empty `patient_id` (needed for a patient-level split)",
                path.display()
            );
        }
        let image_path = base.join(&image_rel);
        let uid_value = Some(get(uid)).filter(|u| !u.is_empty()).unwrap_or_else(|| {
            Path::new(&image_rel)
                .file_stem()
                .map_or(image_rel.clone(), |s| s.to_string_lossy().into_owned())
        });
        uids.insert(uid_value.clone());
        out.records.push(Record {
            dataset: Some(get(dataset))
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "manifest".into()),
            uid: uid_value,
            patient_id,
            image: image_path,
            projection: Projection::parse(&get(projection)),
            label: get(label),
            findings: get(Some(findings)),
            impression: get(Some(impression)),
        });
    }
    out.reports = uids.len();
    Ok(out)
}
