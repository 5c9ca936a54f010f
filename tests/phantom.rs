//! The phantom's ground truth can be read back from its images: the cardiothoracic ratio within
//! 0.03 and the side of an effusion, on 100 images written through `cxrgen phantom` and read back
//! from their PNG files.

use std::process::Command;

use cxrgen::data::phantom::{measure, Side};

#[test]
fn measured_truth_matches_drawn_truth_on_100_images() {
    let dir = std::env::temp_dir().join(format!("cxrgen-phantom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = Command::new(env!("CARGO_BIN_EXE_cxrgen"))
        .args([
            "phantom", "--n", "100", "--size", "256", "--seed", "11", "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mut reports = csv::Reader::from_path(dir.join("indiana_reports.csv")).unwrap();
    let headers = reports.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (uid, finding, side, ctr) = (col("uid"), col("finding"), col("side"), col("ctr"));
    let mut kinds = std::collections::BTreeMap::new();
    let mut worst: f64 = 0.0;
    let mut effusions = 0;
    for row in reports.records() {
        let row = row.unwrap();
        let id = &row[uid];
        let file = std::fs::read_dir(dir.join("images/images_normalized"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{id}_"))
            })
            .unwrap();
        let img = image::open(&file).unwrap().to_luma8();
        let size = img.width() as usize;
        let px: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
        let m = measure(&px, size);
        let drawn: f64 = row[ctr].parse().unwrap();
        let measured = m.ctr.expect("lung fields found");
        worst = worst.max((measured - drawn).abs());
        assert!(
            (measured - drawn).abs() <= 0.03,
            "image {id} ({}): CTR drawn {drawn:.3}, measured {measured:.3}",
            &row[finding]
        );
        let want = match (&row[finding], &row[side]) {
            ("effusion", "right") => Some(Side::Right),
            ("effusion", "left") => Some(Side::Left),
            _ => None,
        };
        effusions += want.is_some() as usize;
        assert_eq!(
            m.effusion, want,
            "image {id} ({} {}): effusion side",
            &row[finding], &row[side]
        );
        *kinds.entry(row[finding].to_string()).or_insert(0) += 1;
        if &row[finding] == "cardiomegaly" {
            assert!(drawn > 0.5, "cardiomegaly has CTR > 0.5");
        } else {
            assert!(drawn < 0.5);
        }
    }
    assert_eq!(kinds.values().sum::<usize>(), 100);
    assert_eq!(kinds.len(), 5, "every finding drawn: {kinds:?}");
    assert!(effusions >= 8, "{effusions} effusions");
    eprintln!("worst CTR error {worst:.4}; findings {kinds:?}");
    // The dataset runs through the real IU-CXR loader: every image frontal, every report with
    // findings and impression.
    let cfg = cxrgen::config::Config::load("tiny").unwrap();
    let loaded = cxrgen::data::iu::load(&dir).unwrap().select(&cfg.data);
    assert_eq!((loaded.reports, loaded.records.len()), (100, 100));
    assert!(loaded.records.iter().all(|r| r.image.exists()));
    std::fs::remove_dir_all(&dir).unwrap();
}
