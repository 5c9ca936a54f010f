//! `cxrgen demo --quick`: the whole pipeline on phantoms runs end to end and writes a report
//! whose numbers agree with its images; a folder in the way is refused and left as it was.

mod common;

use common::{cxrgen, ok};

#[test]
fn quick_demo_writes_a_report_that_matches_its_images() {
    let out = common::shared_scratch("demo-quick").join("demo");
    let run = ok(cxrgen(&["demo", "--quick", "--out", out.to_str().unwrap()]));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("effusion on the prompted side"), "{stdout}");

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for section in [
        "## Were the prompts followed? this run's model",
        "## Were the prompts followed? the shipped model",
        "## How far the judge can be trusted",
        "![VAE loss](vae/loss.png)",
    ] {
        assert!(md.contains(section), "report.md lacks {section}:\n{md}");
    }
    for f in [
        "vae/loss.png",
        "ldm/loss.png",
        "config.yaml",
        "shipped-model/state.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let seeds = json["seeds"].as_u64().unwrap() as usize;
    let models = json["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "this run's model and the shipped one");
    for model in models {
        check_model(&out, model, seeds);
    }
    // The judge was itself checked on fresh phantoms, every kind of finding among them.
    let judge = json["judge_on_phantoms"].as_array().unwrap();
    let judged: u64 = judge.iter().map(|r| r["images"].as_u64().unwrap()).sum();
    assert!(judged > 0 && judge.len() == 5, "{judge:?}");
}

/// One model's rows: a file per prompt and seed whose measurement is the one reported, rates
/// counted from those measurements, and a sheet with a row per prompt and a column per seed.
fn check_model(out: &std::path::Path, model: &serde_json::Value, seeds: usize) {
    let prompts = model["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 7, "one row per finding");
    let mut effusion_hits = 0;
    let mut ctrs = std::collections::BTreeMap::new();
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let images = p["images"].as_array().unwrap();
        assert_eq!(images.len(), seeds, "{}", p["name"]);
        for (s, img) in images.iter().enumerate() {
            assert_eq!(img["seed"].as_u64(), Some(s as u64));
            // What the report says was measured is what the measurement reads from the file.
            let file = img["file"].as_str().unwrap();
            let gray = image::open(file).unwrap().to_luma8();
            let px: Vec<f32> = gray.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
            let m = cxrgen::data::phantom::measure(&px, gray.width() as usize);
            // (JSON keeps a float to within its last bit.)
            match (img["ctr"].as_f64(), m.ctr) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-12, "{file}: {a} vs {b}"),
                (a, b) => assert_eq!(a, b, "{file}"),
            }
            ctrs.insert((name.to_string(), s), m.ctr);
            let side = m.effusion.map(|s| s.name());
            effusion_hits += usize::from(
                name.starts_with("effusion ") && side == name.strip_prefix("effusion "),
            );
        }
    }
    // The rates are counted from those measurements.
    let rates = model["rates"].as_array().unwrap();
    let wider = (0..seeds)
        .filter(|&s| {
            match (
                &ctrs[&("normal".into(), s)],
                &ctrs[&("cardiomegaly".into(), s)],
            ) {
                (Some(n), Some(c)) => c > n,
                _ => false,
            }
        })
        .count();
    assert_eq!(rates[0]["hits"].as_u64(), Some(wider as u64), "{rates:?}");
    assert_eq!(rates[0]["of"].as_u64(), Some(seeds as u64));
    assert_eq!(
        rates[1]["hits"].as_u64(),
        Some(effusion_hits as u64),
        "{rates:?}"
    );
    assert_eq!(rates[1]["of"].as_u64(), Some(2 * seeds as u64));
    // The sheet: a row per prompt, a column per seed (the layout of report.rs).
    let sheet = image::open(out.join(model["sheet"].as_str().unwrap())).unwrap();
    assert_eq!(sheet.width(), 160 + seeds as u32 * 132 + 4);
    assert_eq!(sheet.height(), 20 + 7 * (128 + 18 + 4) + 4);
}

#[test]
fn a_folder_in_the_way_is_refused_and_kept() {
    let out = common::shared_scratch("demo-in-the-way");
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let run = cxrgen(&["demo", "--quick", "--out", out.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("--out") && err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}
