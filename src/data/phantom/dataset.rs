//! A dataset of phantoms in the Kaggle IU-CXR layout, with truth columns, so that it runs
//! through the real loaders.

use super::{render, Finding};
use crate::rng::Rng;

/// The truth columns `write_dataset` adds to `indiana_reports.csv`.
pub const TRUTH_COLUMNS: [&str; 4] = ["finding", "side", "lobe", "ctr"];

/// Writes `n` phantoms in the Kaggle IU-CXR layout (`indiana_reports.csv` with the truth columns
/// [`TRUTH_COLUMNS`], `indiana_projections.csv`, `images/images_normalized/<uid>_IM-….dcm.png`),
/// so that they run through the real loaders. Image `i` depends only on `seed` and `i`.
pub fn write_dataset(
    dir: &std::path::Path,
    n: usize,
    size: usize,
    seed: u64,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use rayon::prelude::*;
    let images = dir.join("images/images_normalized");
    std::fs::create_dir_all(&images)
        .with_context(|| format!("cannot create {}", images.display()))?;
    let rows: Vec<anyhow::Result<(Vec<String>, [String; 3])>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let finding = Finding::random(&mut rng);
            let p = render(size, finding, &mut rng);
            let uid = (i + 1).to_string();
            let file = format!("{uid}_IM-{:04}-1001.dcm.png", i % 10_000);
            let path = images.join(&file);
            image::GrayImage::from_raw(size as u32, size as u32, p.to_u8())
                .expect("size×size pixels")
                .save(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            progress.inc(1);
            let problems = match finding {
                Finding::Normal => "normal".to_string(),
                Finding::Cardiomegaly => "Cardiomegaly".to_string(),
                Finding::Effusion(s) => format!("Pleural Effusion/{}", s.name()),
                Finding::Pneumothorax(s) => format!("Pneumothorax/{}", s.name()),
                Finding::Consolidation(l) => format!("Pneumonia/{}", l.name()),
            };
            let report = vec![
                uid.clone(),
                problems.clone(),
                problems,
                "Xray Chest PA".to_string(),
                "Phantom.".to_string(),
                "None.".to_string(),
                p.findings_text,
                p.impression_text,
                finding.kind().to_string(),
                finding
                    .side()
                    .map_or(String::new(), |s| s.name().to_string()),
                finding
                    .lobe()
                    .map_or(String::new(), |l| l.name().to_string()),
                format!("{:.4}", p.ctr),
            ];
            Ok((report, [uid, file, "Frontal".to_string()]))
        })
        .collect();
    let mut reports = csv::Writer::from_path(dir.join("indiana_reports.csv"))?;
    let mut projections = csv::Writer::from_path(dir.join("indiana_projections.csv"))?;
    let mut header = vec![
        "uid",
        "MeSH",
        "Problems",
        "image",
        "indication",
        "comparison",
        "findings",
        "impression",
    ];
    header.extend(TRUTH_COLUMNS);
    reports.write_record(&header)?;
    projections.write_record(["uid", "filename", "projection"])?;
    for row in rows {
        let (report, projection) = row?;
        reports.write_record(&report)?;
        projections.write_record(&projection)?;
    }
    reports.flush()?;
    projections.flush()?;
    Ok(())
}
