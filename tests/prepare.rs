//! `cxrgen prepare` on a manifest with broken images: each is named and counted, the rest is
//! prepared; with --strict the run fails and leaves no cache behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn prepare(args: &[&str], manifest: &Path, out: &Path) -> Output {
    prepare_with("tiny", args, manifest, out)
}

fn prepare_with(config: &str, args: &[&str], manifest: &Path, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cxrgen"))
        .args(["prepare", "--config", config, "--json"])
        .args(args)
        .arg("--manifest")
        .arg(manifest)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// A folder with a manifest of 5 good images, a truncated PNG, an empty file and a missing file.
fn broken_dataset(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("cxrgen-prepare-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let png = common::tiny_png();
    let mut rows = String::from("image,patient_id,projection,findings,impression\n");
    for i in 0..5 {
        std::fs::write(dir.join(format!("img/good{i}.png")), &png).unwrap();
        rows.push_str(&format!(
            "img/good{i}.png,p{i},PA,Heart size normal.,No acute disease.\n"
        ));
    }
    std::fs::write(dir.join("img/truncated.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(dir.join("img/empty.png"), b"").unwrap();
    for (f, p) in [("truncated", "p5"), ("empty", "p6"), ("missing", "p7")] {
        rows.push_str(&format!("img/{f}.png,{p},PA,Clear lungs.,Normal.\n"));
    }
    let manifest = dir.join("manifest.csv");
    std::fs::write(&manifest, rows).unwrap();
    (dir, manifest)
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("cache"))
        .collect()
}

#[test]
fn broken_images_are_named_and_the_rest_prepared() {
    let (dir, manifest) = broken_dataset("lenient");
    let out = dir.join("cache");
    let run = prepare(&[], &manifest, &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(s["prepared"], 5);
    let dropped = s["dropped"].as_array().unwrap();
    let reason = |file: &str| {
        dropped
            .iter()
            .find(|d| d["item"].as_str().unwrap().ends_with(file))
            .map(|d| d["reason"].as_str().unwrap().to_string())
    };
    assert_eq!(dropped.len(), 3);
    assert!(reason("truncated.png")
        .unwrap()
        .starts_with("cannot decode image"));
    assert_eq!(reason("empty.png").unwrap(), "empty file");
    assert_eq!(reason("missing.png").unwrap(), "missing file");
    let cache = cxrgen::data::cache::Cache::open(&out).unwrap();
    assert_eq!(cache.len(), 5);
    let imgs = cache.images(&[0, 4], &candle_core::Device::Cpu).unwrap();
    assert_eq!(imgs.dims(), &[2, 1, 64, 64]);
    let (lo, hi) = (
        imgs.min_all().unwrap().to_scalar::<f32>().unwrap(),
        imgs.max_all().unwrap().to_scalar::<f32>().unwrap(),
    );
    assert_eq!((lo, hi), (-1.0, 1.0), "scaled to [-1, 1]");
    // The summary is also in the cache.
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(on_disk["dropped"].as_array().unwrap().len(), 3);

    // An existing cache is not overwritten without --force, and is replaced with it.
    let again = prepare(&[], &manifest, &out);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(prepare(&["--force"], &manifest, &out).status.success());
    assert_eq!(leftovers(&dir), ["cache"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_text_is_made_of_the_sections_the_config_names_and_training_checks_it() {
    let (dir, manifest) = broken_dataset("sections");
    // tiny conditions on findings and impression; this one on the impression alone.
    let config = dir.join("impression.yaml");
    std::fs::write(&config, "base: tiny\ndata:\n  text: impression\n").unwrap();
    let out = dir.join("cache");
    assert!(prepare_with(config.to_str().unwrap(), &[], &manifest, &out)
        .status
        .success());
    let cache = cxrgen::data::cache::Cache::open(&out).unwrap();
    assert_eq!(cache.meta.text, cxrgen::config::TextSections::Impression);
    assert!(cache.records.iter().all(|r| r.text == "No acute disease."));
    let both = dir.join("both");
    assert!(prepare(&[], &manifest, &both).status.success());
    let cache = cxrgen::data::cache::Cache::open(&both).unwrap();
    assert!(cache
        .records
        .iter()
        .all(|r| r.text == "Heart size normal. No acute disease."));

    // A model trained on one kind of text refuses a cache of the other.
    let run = Command::new(env!("CARGO_BIN_EXE_cxrgen"))
        .args(["train-vae", "--config", "tiny", "--data"])
        .arg(&out)
        .arg("--out")
        .arg(dir.join("vae"))
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("texts made from impression but data.text = findings_and_impression"),
        "{err}"
    );
    assert!(!dir.join("vae").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn strict_fails_and_leaves_no_cache() {
    let (dir, manifest) = broken_dataset("strict");
    let out = dir.join("cache");
    let run = prepare(&["--strict"], &manifest, &out);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    for f in ["truncated.png", "empty.png", "missing.png"] {
        assert!(err.contains(f), "{f} named: {err}");
    }
    assert!(
        leftovers(&dir).is_empty(),
        "no cache, no partial folder: {:?}",
        leftovers(&dir)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn real_manifest_split_is_patient_disjoint_and_proportional() {
    let Some(manifest) = common::shared_file("data/cxr-real/manifest.csv") else {
        return;
    };
    let cfg = cxrgen::config::Config::load("paper").unwrap();
    let c = cxrgen::data::manifest::load(&manifest).unwrap();
    assert_eq!(c.records.len(), 6830);
    let split = cxrgen::data::split::assign(&c.records, &cfg.data.split);
    let sides = cxrgen::data::split::of_records(&c.records, &split, "test").unwrap();
    let mut side_of = std::collections::HashMap::new();
    for (r, s) in c.records.iter().zip(&sides) {
        assert_eq!(
            *side_of.entry(&r.patient_id).or_insert(*s),
            *s,
            "patient {} on two sides",
            r.patient_id
        );
    }
    for (k, target) in cxrgen::data::split::Split::ALL.iter().zip([0.7, 0.1, 0.2]) {
        let share = sides.iter().filter(|s| *s == k).count() as f64 / sides.len() as f64;
        assert!((share - target).abs() <= 0.02, "{k}: {share:.4}");
    }
}
