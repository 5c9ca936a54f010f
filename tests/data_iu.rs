//! IU-CXR loaders on the real reports in ../shared/data/iu-reports (text only: the test writes
//! small stand-in PNGs under the images' names).

mod common;

use std::path::Path;
use std::process::Command;

use cxrgen::config::Config;
use cxrgen::data::{iu, Projection};

#[test]
fn openi_layout_counts() {
    let Some(dir) = common::shared_file("data/iu-reports") else {
        return;
    };
    let cfg = Config::load("paper").unwrap();
    let c = iu::load_openi(
        &dir.join("NLMCXR_reports.tgz"),
        Path::new("NLMCXR_png"),
        Some(&dir.join("indiana_projections.csv")),
    )
    .unwrap();
    assert_eq!(c.reports, 3955);
    assert_eq!(c.records.len(), 7470);
    // 104 reports have no image at all.
    assert_eq!(c.excluded.len(), 104);
    let unknown: Vec<_> = c
        .records
        .iter()
        .filter(|r| r.projection == Projection::Unknown)
        .collect();
    assert_eq!(
        unknown.len(),
        4,
        "images absent from indiana_projections.csv"
    );
    let kept = c.select(&cfg.data);
    // Frontal, with findings and impression: the paper's 3,301; the 4 images without a
    // projection record are excluded as "unknown view" (docs/data.md).
    assert_eq!(kept.records.len(), 3301);
    assert!(kept
        .records
        .iter()
        .all(|r| r.projection == Projection::Frontal));
}

#[test]
fn kaggle_layout_counts() {
    let Some(dir) = common::shared_file("data/iu-reports") else {
        return;
    };
    let cfg = Config::load("paper").unwrap();
    let c = iu::load_kaggle(
        &dir.join("indiana_reports.csv"),
        &dir.join("indiana_projections.csv"),
        Path::new("images/images_normalized"),
    )
    .unwrap();
    assert_eq!(c.reports, 3851);
    assert_eq!(c.records.len(), 7466);
    assert!(c.dropped.is_empty());
    assert_eq!(c.select(&cfg.data).records.len(), 3301);
}

#[test]
fn prepare_runs_through_the_openi_layout() {
    let Some(src) = common::shared_file("data/iu-reports") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("cxrgen-openi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("NLMCXR_png")).unwrap();
    std::fs::copy(
        src.join("NLMCXR_reports.tgz"),
        dir.join("NLMCXR_reports.tgz"),
    )
    .unwrap();
    std::fs::copy(
        src.join("indiana_projections.csv"),
        dir.join("indiana_projections.csv"),
    )
    .unwrap();
    let c = iu::load(&dir).unwrap();
    let stand_in = common::tiny_png();
    for r in &c.records {
        std::fs::write(
            dir.join("NLMCXR_png").join(r.image.file_name().unwrap()),
            &stand_in,
        )
        .unwrap();
    }
    let out = dir.join("cache");
    let run = Command::new(env!("CARGO_BIN_EXE_cxrgen"))
        .args(["prepare", "--config", "tiny", "--json", "--iu"])
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(s["reports"], 3955);
    assert_eq!(s["image_records"], 7470);
    assert_eq!(s["prepared"], 3301);
    assert_eq!(s["excluded"]["unknown view"], 4);
    assert_eq!(s["dropped"].as_array().unwrap().len(), 0);
    let splits = &s["splits"];
    let total: u64 = ["train", "val", "test"]
        .iter()
        .map(|k| splits[k]["images"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 3301);
    let cache = cxrgen::data::cache::Cache::open(&out).unwrap();
    assert_eq!(cache.len(), 3301);
    assert!(cache.records.iter().all(|r| !r.text.contains("XXXX")));
    std::fs::remove_dir_all(&dir).unwrap();
}
