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

/// The judge `cxrgen demo` uses (docs/demo.md): on 200 fresh 128×128 phantoms it reads the drawn
/// finding, side included, for nearly every normal, cardiomegaly, effusion and pneumothorax image;
/// for a consolidation at least the side.
#[test]
fn the_judge_reads_each_kind_of_finding_from_phantoms() {
    use cxrgen::data::phantom::{render, Finding};
    use cxrgen::rng::Rng;
    let size = 128;
    let mut per_kind: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for i in 0..200 {
        let mut rng = Rng::new(0x5EED_0000 + i);
        let finding = Finding::random(&mut rng);
        let p = render(size, finding, &mut rng);
        let m = measure(&p.pixels, size);
        let read = match finding {
            // The lobe is often the neighbouring one (docs/demo.md); the side is what counts here.
            Finding::Consolidation(_) => {
                m.consolidation.map(|l| Finding::Consolidation(l).side()) == Some(finding.side())
            }
            _ => m.finding() == Some(finding),
        };
        let e = per_kind.entry(finding.kind()).or_default();
        e.0 += 1;
        e.1 += usize::from(read);
    }
    for (kind, (n, read)) in &per_kind {
        let least = if *kind == "consolidation" { 0.8 } else { 0.9 };
        assert!(
            *read as f64 >= least * *n as f64,
            "{kind}: read {read} of {n} ({per_kind:?})"
        );
    }
}
