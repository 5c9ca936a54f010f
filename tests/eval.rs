//! `cxrgen eval vae` and `cxrgen eval generation` on tiny models trained briefly on phantoms
//! (CPU): eval.json and eval.md with every metric and its recipe; longer training scores better;
//! a missing metric network is left out with a line naming the fetch script, or is an error when
//! asked for by name; bad input is a clear error and writes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::{cxrgen, ok};
use serde_json::Value;

struct Fixture {
    root: PathBuf,
    cache: PathBuf,
    /// A train-vae run of 2 optimizer steps.
    vae: PathBuf,
    /// A train-diffusion run of 2 optimizer steps on that VAE.
    ldm: PathBuf,
    /// Images in the cache's test split.
    test_images: usize,
}

/// 48 phantoms of 64×64 prepared with the tiny config, a VAE and a diffusion model trained for 2
/// steps each, shared by the tests of this file.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = common::shared_scratch("eval-model");
        common::tiny_models(&root, 8, 2, 2);
        let records = std::fs::read_to_string(root.join("cache/records.jsonl")).unwrap();
        let test_images = records
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).unwrap()["split"] == "test")
            .count();
        assert!(test_images > 0);
        Fixture {
            cache: root.join("cache"),
            vae: root.join("vae"),
            ldm: root.join("ldm"),
            root,
            test_images,
        }
    })
}

/// An empty folder of its own for one test (a weights folder without weights, a folder without
/// images).
fn empty_dir(name: &str) -> PathBuf {
    let dir = scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A folder of its own for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = fixture().root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn eval_vae(checkpoint: &Path, out: &Path, extra: &[&str]) -> Output {
    eval("vae", checkpoint, out, extra)
}

fn eval(task: &str, checkpoint: &Path, out: &Path, extra: &[&str]) -> Output {
    eval_of(task, "--checkpoint", checkpoint, out, extra)
}

/// `eval <task>` of what `flag` (--checkpoint, --images) names, on the fixture's cache.
fn eval_of(task: &str, flag: &str, what: &Path, out: &Path, extra: &[&str]) -> Output {
    eval_on(task, flag, what, &fixture().cache, out, extra)
}

/// The same on the cache `data`.
fn eval_on(task: &str, flag: &str, what: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "eval",
        task,
        flag,
        what.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cxrgen(&args)
}

/// `eval generation` of the fixture's model on another cache than the fixture's.
fn generation_on(cache: &Path, out: &Path, extra: &[&str]) -> Output {
    eval_on(
        "generation",
        "--checkpoint",
        &fixture().ldm,
        cache,
        out,
        extra,
    )
}

/// Whether the weights `file` is in the default folder; if not, says that the test is skipped.
fn weights_fetched(metric: &str, file: &str) -> bool {
    let dir = cxrgen::eval::weights::default_dir();
    let there = dir.join(file).is_file();
    if !there {
        let line = cxrgen::eval::weights::missing_line(metric, &dir, file);
        eprintln!("SKIPPED: {line}");
    }
    there
}

fn is_sha256(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn eval_vae_writes_every_metric_and_longer_training_scores_better() {
    let f = fixture();
    let no_weights = empty_dir("no-weights");
    let weights = ["--weights", no_weights.to_str().unwrap()];
    let early = scratch("early");
    ok(eval_vae(&f.vae, &early, &weights));
    let report = read_json(&early.join("eval.json"));
    assert_eq!(report["task"], "vae");
    assert_eq!(report["data"]["split"], "test");
    assert_eq!(report["data"]["images"], f.test_images);
    assert_eq!(report["checkpoint"]["step"], 2);
    assert!(is_sha256(&report["checkpoint"]["weights_sha256"]));
    let m = &report["metrics"];
    for name in ["ssim", "psnr", "mse"] {
        assert_eq!(m[name]["n"], f.test_images, "{name}");
        assert!(m[name]["recipe"].as_str().is_some(), "{name}");
        assert!(m[name]["std"].as_f64().unwrap() >= 0.0, "{name}");
    }
    let (ssim, psnr, mse) = (
        m["ssim"]["mean"].as_f64().unwrap(),
        m["psnr"]["mean"].as_f64().unwrap(),
        m["mse"]["mean"].as_f64().unwrap(),
    );
    assert!(
        (-1.0..=1.0).contains(&ssim) && (0.0..=1.0).contains(&mse),
        "{m}"
    );
    // The mean of −log MSE is at least −log of the mean MSE (Jensen).
    assert!(psnr >= -10.0 * mse.log10() - 1e-9, "{psnr} vs {mse}");
    assert_eq!(m["ssim"]["settings"]["window"], 11);
    assert_eq!(m["ssim"]["settings"]["sigma"], 1.5);
    // Without its weights LPIPS is left out, with a line naming the fetch script.
    assert!(m.get("lpips").is_none());
    let line = report["left_out"][0].as_str().unwrap();
    assert!(line.contains("scripts/fetch-eval-weights.sh"), "{line}");
    let md = std::fs::read_to_string(early.join("eval.md")).unwrap();
    assert!(
        md.contains("| SSIM |") && md.contains("0.89 (§3.2.1)"),
        "{md}"
    );
    assert!(md.contains("LPIPS left out"), "{md}");
    let names: Vec<String> = std::fs::read_dir(&early)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "only eval.json and eval.md: {names:?}");

    // The same run trained on to 30 steps reconstructs better by every measure.
    let run = scratch("trained-on");
    copy_dir(&f.vae, &run);
    ok(cxrgen(&[
        "train-vae",
        "--resume",
        run.to_str().unwrap(),
        "--data",
        f.cache.to_str().unwrap(),
        "--max-steps",
        "30",
    ]));
    let later = scratch("later");
    ok(eval_vae(&run, &later, &weights));
    let m2 = read_json(&later.join("eval.json"))["metrics"].clone();
    let mean = |m: &Value, k: &str| m[k]["mean"].as_f64().unwrap();
    assert!(
        mean(&m2, "ssim") > ssim,
        "SSIM {ssim} → {}",
        mean(&m2, "ssim")
    );
    assert!(
        mean(&m2, "psnr") > psnr,
        "PSNR {psnr} → {}",
        mean(&m2, "psnr")
    );
    assert!(mean(&m2, "mse") < mse, "MSE {mse} → {}", mean(&m2, "mse"));
}

#[test]
fn eval_vae_reports_lpips_with_its_weights() {
    if !weights_fetched("LPIPS", cxrgen::eval::weights::LPIPS_FILE) {
        return;
    }
    let out = scratch("lpips");
    ok(eval_vae(&fixture().vae, &out, &["--metrics", "lpips,ssim"]));
    let report = read_json(&out.join("eval.json"));
    let lpips = &report["metrics"]["lpips"];
    assert_eq!(lpips["n"], fixture().test_images);
    assert!(lpips["mean"].as_f64().unwrap() > 0.0, "{lpips}");
    assert!(is_sha256(&lpips["weights_sha256"]));
    assert!(
        report["metrics"].get("psnr").is_none(),
        "only the metrics asked for"
    );
    assert_eq!(report["left_out"].as_array().unwrap().len(), 0);
}

#[test]
fn eval_vae_input_errors_name_what_is_wrong_and_write_nothing() {
    let f = fixture();
    // A metric asked for by name whose weights are not fetched.
    let empty = empty_dir("empty-weights");
    fails_writing_nothing(
        &f.vae,
        &["--metrics", "lpips", "--weights", empty.to_str().unwrap()],
        &["--metrics lpips", "fetch-eval-weights.sh"],
    );

    // A checkpoint of the wrong stage.
    let ckpt = scratch("wrong-stage");
    let (dir, _) = last_checkpoint(&f.vae);
    copy_dir(&dir, &ckpt);
    let state_path = ckpt.join("state.json");
    let mut state = read_json(&state_path);
    state["stage"] = "diffusion".into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    fails_writing_nothing(&ckpt, &[], &["a diffusion checkpoint", "train-vae"]);

    // Not a run at all, not a cache, an unknown metric.
    let res = eval_vae(&f.cache, &scratch("not-a-run"), &[]);
    assert!(
        stderr(&res).contains("--checkpoint")
            && stderr(&res).contains("neither a run folder nor a checkpoint folder"),
        "{}",
        stderr(&res)
    );
    let res = cxrgen(&[
        "eval",
        "vae",
        "--checkpoint",
        f.vae.to_str().unwrap(),
        "--data",
        f.vae.to_str().unwrap(),
    ]);
    assert!(
        stderr(&res).contains("not a prepared cache"),
        "{}",
        stderr(&res)
    );
    let res = eval_vae(&f.vae, &scratch("bad-metric"), &["--metrics", "sharpness"]);
    assert_eq!(res.status.code(), Some(2));
    assert!(
        stderr(&res).contains("'sharpness' is not a metric"),
        "{}",
        stderr(&res)
    );
}

/// `eval vae` of `checkpoint` exits 1 with a message holding each of `needles`, and creates no
/// output folder.
fn fails_writing_nothing(checkpoint: &Path, extra: &[&str], needles: &[&str]) {
    generation_fails_writing_nothing("vae", checkpoint, extra, needles)
}

/// The same for `eval <task>`.
fn generation_fails_writing_nothing(
    task: &str,
    checkpoint: &Path,
    extra: &[&str],
    needles: &[&str],
) {
    let out = scratch(&format!("must-not-exist-{task}"));
    let res = eval(task, checkpoint, &out, extra);
    assert_eq!(res.status.code(), Some(1));
    let err = stderr(&res);
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    assert!(!out.exists(), "nothing written");
}

/// The folder and step the run's `last.json` points at.
fn last_checkpoint(run: &Path) -> (PathBuf, u64) {
    let pointer = read_json(&run.join("checkpoints/last.json"));
    (
        run.join("checkpoints")
            .join(pointer["dir"].as_str().unwrap()),
        pointer["step"].as_u64().unwrap(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn eval_generation_writes_paired_metrics_a_figure_and_says_what_it_left_out() {
    let f = fixture();
    let empty = empty_dir("gen-no-weights");
    let out = scratch("gen");
    let args = [
        "--steps",
        "4",
        "--n",
        "3",
        "--per-prompt",
        "2",
        "--weights",
        empty.to_str().unwrap(),
    ];
    ok(eval("generation", &f.ldm, &out, &args));
    let report = read_json(&out.join("eval.json"));
    assert_eq!(report["task"], "generation");
    assert_eq!(report["generation"]["images"], 6);
    assert_eq!(report["data"]["reports"], 3);
    assert_eq!(report["data"]["real_images"], f.test_images);
    assert!(is_sha256(&report["checkpoint"]["weights_sha256"]));
    let m = &report["metrics"];
    for name in ["ssim", "psnr", "mse"] {
        assert_eq!(m[name]["n"], 3, "one pair per report: {name}");
    }
    // Without weights: LPIPS, FID and KID left out naming the script; MS-SSIM cannot run at 64².
    let left_out: Vec<&str> = report["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(left_out.len(), 3, "{left_out:?}");
    assert!(left_out
        .iter()
        .any(|l| l.starts_with("LPIPS left out") && l.contains("fetch-eval-weights.sh")));
    assert!(left_out
        .iter()
        .any(|l| l.starts_with("FID and KID left out") && l.contains("fetch-eval-weights.sh")));
    assert!(left_out
        .iter()
        .any(|l| l.contains("MS-SSIM") && l.contains("97×97")));
    let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
    assert!(
        md.contains("0.82 ± 0.08") && md.contains("| SSIM |"),
        "{md}"
    );
    // One row per report: its real image and its two generated ones.
    let figure = image::open(out.join("real-vs-generated.png")).unwrap();
    assert_eq!((figure.width(), figure.height()), (3 * 64, 3 * 64));

    // The same seeds give the same images, so the same numbers.
    let again = scratch("gen-again");
    ok(eval("generation", &f.ldm, &again, &args));
    assert_eq!(
        read_json(&again.join("eval.json"))["metrics"],
        report["metrics"]
    );
}

#[test]
fn eval_generation_fid_and_kid_come_with_the_real_vs_real_floor() {
    if !weights_fetched("FID", cxrgen::eval::weights::INCEPTION_FILE) {
        return;
    }
    let f = fixture();
    let out = scratch("gen-fid");
    ok(eval(
        "generation",
        &f.ldm,
        &out,
        &[
            "--steps",
            "2",
            "--n",
            "2",
            "--per-prompt",
            "1",
            "--metrics",
            "fid,kid",
        ],
    ));
    let m = read_json(&out.join("eval.json"))["metrics"].clone();
    let (fid, floor) = (
        m["fid"]["value"].as_f64().unwrap(),
        m["fid"]["floor_value"].as_f64().unwrap(),
    );
    assert!(
        fid.is_finite() && fid > 0.0 && floor.is_finite() && floor > 0.0,
        "{m}"
    );
    assert_eq!(m["fid"]["generated_images"], 2);
    assert_eq!(m["fid"]["real_images"], f.test_images);
    assert!(m["fid"]["warning"].as_str().unwrap().contains("2048"));
    assert!(is_sha256(&m["fid"]["weights_sha256"]));
    assert!(m["fid"]["resize"].as_str().unwrap().contains("299"));
    assert!(m["kid"]["mean"].as_f64().unwrap().is_finite());
    assert!(m["kid"]["floor_mean"].as_f64().unwrap().is_finite());
    assert!(m.get("ssim").is_none(), "only the metrics asked for");
}

#[test]
fn eval_generation_input_errors_name_what_is_wrong_and_write_nothing() {
    let f = fixture();
    let n = f.test_images.to_string();
    let too_many = (f.test_images + 1).to_string();
    generation_fails_writing_nothing(
        "generation",
        &f.ldm,
        &["--n", &too_many],
        &[&format!("holds {n} reports")],
    );
    generation_fails_writing_nothing("generation", &f.ldm, &["--n", "0"], &["--n 0"]);
    generation_fails_writing_nothing(
        "generation",
        &f.ldm,
        &["--seed", &u64::MAX.to_string()],
        &["overflows"],
    );
    generation_fails_writing_nothing(
        "generation",
        &f.ldm,
        &["--metrics", "ms-ssim"],
        &["--metrics ms-ssim", "97×97"],
    );
    generation_fails_writing_nothing(
        "generation",
        &f.vae,
        &[],
        &["a vae checkpoint", "train-diffusion"],
    );
    fails_writing_nothing(
        &f.vae,
        &["--metrics", "fid"],
        &["--metrics fid: not a metric of `eval vae`"],
    );
}

#[test]
fn eval_generation_refuses_a_cache_of_other_texts_than_the_models() {
    // The fixture's cache as if prepared with `data.text: impression`; the model read both
    // sections, so the held-out reports would be prompts of a kind it never saw.
    let f = fixture();
    let cache = scratch("impression-cache");
    copy_dir(&f.cache, &cache);
    let meta = cache.join("cache.json");
    let mut m = read_json(&meta);
    m["text"] = "impression".into();
    std::fs::write(&meta, m.to_string()).unwrap();
    let out = scratch("must-not-exist-text");
    let res = generation_on(&cache, &out, &[]);
    assert_eq!(res.status.code(), Some(1));
    let err = stderr(&res);
    assert!(
        err.contains("texts are made from impression but the model was trained on data.text = findings_and_impression"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
}

/// An alignment classifier trained for one epoch on the fixture's cache, over the labels that
/// are in its train, validation and test splits alike.
fn classifier() -> &'static PathBuf {
    static CLASSIFIER: OnceLock<PathBuf> = OnceLock::new();
    CLASSIFIER.get_or_init(|| {
        let f = fixture();
        let records = std::fs::read_to_string(f.cache.join("records.jsonl")).unwrap();
        let mut by_split: std::collections::HashMap<String, Vec<String>> = Default::default();
        for line in records.lines() {
            let r: Value = serde_json::from_str(line).unwrap();
            by_split
                .entry(r["split"].as_str().unwrap().into())
                .or_default()
                .push(r["label"].as_str().unwrap().into());
        }
        let mut classes: Vec<&String> = by_split["test"]
            .iter()
            .filter(|l| by_split["train"].contains(l))
            .collect();
        classes.sort();
        classes.dedup();
        assert!(classes.len() >= 2, "{by_split:?}");
        assert!(by_split["val"].iter().any(|l| classes.contains(&l)));
        let classes: Vec<&str> = classes.iter().map(|s| s.as_str()).collect();
        let out = f.root.join("classifier");
        ok(cxrgen(&[
            "train-classifier",
            "--data",
            f.cache.to_str().unwrap(),
            "--classes",
            &classes.join(","),
            "--width",
            "4",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            out.to_str().unwrap(),
        ]));
        out
    })
}

fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn f64_of(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Judge 1's numbers recomputed from the per-image records: the confusion matrix, precision,
/// recall and F1 per class, the macro means, the Inception-Score-like score; judge 2's counts.
fn check_judges_against_records(report: &Value, images: usize) {
    let records = report["images"].as_array().unwrap();
    assert_eq!(records.len(), images);
    let m = &report["metrics"];
    let a = &m["alignment_classifier"];
    let classes: Vec<&str> = a["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let index = |name: &Value| {
        name.as_str()
            .and_then(|n| classes.iter().position(|c| *c == n))
    };
    let mut confusion = vec![vec![0usize; classes.len()]; classes.len()];
    let mut left_out = 0;
    for r in records {
        let c = &r["classifier"];
        let probs: Vec<f64> = c["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(f64_of)
            .collect();
        let argmax = (0..probs.len())
            .max_by(|&x, &y| probs[x].total_cmp(&probs[y]))
            .unwrap();
        assert_eq!(index(&c["predicted"]), Some(argmax));
        match index(&c["class"]) {
            Some(t) => confusion[t][argmax] += 1,
            None => left_out += 1,
        }
    }
    assert_eq!(a["confusion"], serde_json::json!(confusion));
    assert_eq!(a["images"], images);
    assert_eq!(a["images_judged"], images - left_out);
    let left: u64 = a["images_left_out"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v["images"].as_u64().unwrap())
        .sum();
    assert_eq!(left as usize, left_out);
    let (mut sums, mut prompted) = ([0.0; 3], 0);
    for (c, row) in a["per_class"].as_array().unwrap().iter().enumerate() {
        let support: usize = confusion[c].iter().sum();
        let predicted: usize = confusion.iter().map(|r| r[c]).sum();
        let ratio = |x: usize, y: usize| if y == 0 { 0.0 } else { x as f64 / y as f64 };
        let (p, r) = (
            ratio(confusion[c][c], predicted),
            ratio(confusion[c][c], support),
        );
        let f1 = if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        };
        assert_eq!(row["images"], support);
        for (key, v) in [("precision", p), ("recall", r), ("f1", f1)] {
            assert!((f64_of(&row[key]) - v).abs() < 1e-12, "{key}: {row}");
        }
        if support > 0 {
            prompted += 1;
            for (s, v) in sums.iter_mut().zip([p, r, f1]) {
                *s += v;
            }
        }
    }
    for (key, s) in ["precision", "recall", "f1"].iter().zip(sums) {
        assert!((f64_of(&a["overall"][key]) - s / prompted as f64).abs() < 1e-12);
    }
    // exp(E KL(p(y|x) || p(y))) from the records' probabilities.
    let probs: Vec<Vec<f64>> = records
        .iter()
        .map(|r| {
            r["classifier"]["probabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(f64_of)
                .collect()
        })
        .collect();
    let marginal: Vec<f64> = (0..classes.len())
        .map(|c| probs.iter().map(|p| p[c]).sum::<f64>() / images as f64)
        .collect();
    let kl: f64 = probs
        .iter()
        .map(|p| {
            (0..p.len())
                .map(|c| p[c] * (p[c] / marginal[c]).ln())
                .sum::<f64>()
        })
        .sum::<f64>()
        / images as f64;
    let is_like = &m["inception_score_like_on_classifier"];
    assert!(
        (f64_of(&is_like["value"]) - kl.exp()).abs() < 1e-9,
        "{is_like}"
    );
    assert_eq!(
        is_like["name"],
        "Inception-Score-like score on this classifier"
    );
    let v = f64_of(&is_like["value"]);
    assert!((1.0 - 1e-9..=classes.len() as f64 + 1e-9).contains(&v));

    // Judge 2: the counts per prompted kind and in all.
    let j = &m["alignment_phantom"]["generated"];
    let (mut agree, mut kind, mut n) = (0, 0, 0);
    for row in j
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "all")
        .map(|(_, v)| v)
    {
        n += row["images"].as_u64().unwrap();
        agree += row["agree"]["hits"].as_u64().unwrap();
        kind += row["kind_agrees"]["hits"].as_u64().unwrap();
    }
    let count = |key: &str| records.iter().filter(|r| r["phantom"][key] == true).count() as u64;
    assert_eq!(
        (n, agree, kind),
        (images as u64, count("agrees"), count("kind_agrees"))
    );
    assert_eq!(j["all"]["images"], images);
    assert_eq!(j["all"]["agree"]["hits"], agree);
    let all = &j["all"]["agree"];
    let (low, rate, high) = (
        f64_of(&all["low"]),
        f64_of(&all["rate"]),
        f64_of(&all["high"]),
    );
    assert!(low <= rate && rate <= high && (0.0..=1.0).contains(&low) && high <= 1.0);
    for r in records {
        assert!(r["phantom"]["prompted"].as_str().is_some(), "{r}");
        assert!(r["phantom"]["measured"].as_str().is_some(), "{r}");
    }
}

#[test]
fn eval_generation_judges_alignment_with_the_classifier_and_the_phantom_measurements() {
    let (f, clf) = (fixture(), classifier());
    let no_weights = empty_dir("judges-no-weights");
    let (clf_dir, weights) = (clf.to_str().unwrap(), no_weights.to_str().unwrap());
    let args = [
        "--classifier",
        clf_dir,
        "--judge",
        "phantom",
        "--weights",
        weights,
        "--steps",
        "2",
        "--per-prompt",
        "2",
    ];
    let out = scratch("judges");
    ok(eval("generation", &f.ldm, &out, &args));
    let report = read_json(&out.join("eval.json"));
    let images = 2 * f.test_images;
    check_judges_against_records(&report, images);
    let m = &report["metrics"];
    let a = &m["alignment_classifier"];
    assert_eq!(
        a["weights_sha256"],
        sha256_of(&clf.join("classifier.safetensors"))
    );
    assert_eq!(a["classifier"], clf.display().to_string());
    // In-domain FID and KID with their floor, though Inception's weights are absent.
    let fid = &m["classifier_fid"];
    assert!(
        f64_of(&fid["value"]) >= 0.0 && f64_of(&fid["floor_value"]) >= 0.0,
        "{fid}"
    );
    assert_eq!(fid["generated_images"], images);
    assert_eq!(fid["real_images"], f.test_images);
    assert!(fid["extractor"].as_str().unwrap().contains("classifier"));
    assert!(f64_of(&m["classifier_kid"]["floor_mean"]).is_finite());
    assert!(m.get("fid").is_none(), "Inception's FID needs its weights");
    // The ceiling: every held-out real phantom measured against its own report.
    let ceiling = &m["alignment_phantom"]["real_ceiling"]["all"];
    assert_eq!(ceiling["images"], f.test_images);
    assert_eq!(m["alignment_phantom"]["real_not_phantom_reports"], 0);
    let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
    for needle in [
        "Table 4",
        "| Overall (macro) |",
        "Inception-Score-like score on this classifier",
        "judge 2: the phantom measurements",
        "(in-domain",
    ] {
        assert!(md.contains(needle), "{needle}: {md}");
    }
    let figure = image::open(out.join("alignment-confusion.png")).unwrap();
    assert!(figure.width() > 0);

    // A classifier of another image size, or without its weights: errors naming the file.
    let other = scratch("classifier-32");
    copy_dir(clf, &other);
    let json_path = other.join("classifier.json");
    let mut saved = read_json(&json_path);
    saved["image_size"] = 32.into();
    std::fs::write(&json_path, saved.to_string()).unwrap();
    let mut bad = args;
    bad[1] = other.to_str().unwrap();
    generation_fails_writing_nothing(
        "generation",
        &f.ldm,
        &bad,
        &["trained on 32×32", "classifier.json"],
    );
    std::fs::remove_file(other.join("classifier.safetensors")).unwrap();
    generation_fails_writing_nothing("generation", &f.ldm, &bad, &["classifier.safetensors"]);

    // --judge phantom on a report that is not in the phantoms' wording names that report.
    let edited = scratch("edited-cache");
    copy_dir(&f.cache, &edited);
    let path = edited.join("records.jsonl");
    let mut lines: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = lines.iter_mut().find(|r| r["split"] == "test").unwrap();
    first["text"] = "The heart is normal in size. No acute disease.".into();
    let uid = first["uid"].as_str().unwrap().to_string();
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    let out = scratch("must-not-exist-judge");
    let res = generation_on(&edited, &out, &["--judge", "phantom"]);
    let err = stderr(&res);
    assert!(
        err.contains(&format!("report {uid} ")) && err.contains("not a phantom report"),
        "{err}"
    );
    assert!(!out.exists());
}

/// `cxrgen generate` of the first `n` test reports' texts, `per` images each, into `dir`.
fn generate_from_test_reports(dir: &Path, n: usize, per: usize) {
    let records = std::fs::read_to_string(fixture().cache.join("records.jsonl")).unwrap();
    let texts: Vec<String> = records
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["split"] == "test")
        .take(n)
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect();
    let prompts = dir.with_extension("prompts.txt");
    std::fs::write(&prompts, texts.join("\n") + "\n").unwrap();
    ok(cxrgen(&[
        "generate",
        "--checkpoint",
        fixture().ldm.to_str().unwrap(),
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--n",
        &per.to_string(),
        "--steps",
        "2",
        "--out",
        dir.to_str().unwrap(),
    ]));
}

fn eval_images(images: &Path, out: &Path, extra: &[&str]) -> Output {
    eval_of("generation", "--images", images, out, extra)
}

#[test]
fn eval_generation_reads_a_folder_of_generated_images() {
    let clf = classifier();
    let gen = scratch("generated");
    generate_from_test_reports(&gen, 4, 2);
    let empty = empty_dir("images-no-weights");
    let out = scratch("images-eval");
    let extra = [
        "--classifier",
        clf.to_str().unwrap(),
        "--judge",
        "phantom",
        "--weights",
        empty.to_str().unwrap(),
    ];
    ok(eval_images(&gen, &out, &extra));
    let report = read_json(&out.join("eval.json"));
    assert_eq!(report["generation"]["files"], 8);
    assert_eq!(report["generation"]["images"], 8);
    let shas = report["generation"]["checkpoint_sha256"]
        .as_array()
        .unwrap();
    assert!(shas.len() == 1 && is_sha256(&shas[0]), "{shas:?}");
    check_judges_against_records(&report, 8);
    for r in report["images"].as_array().unwrap() {
        assert!(
            Path::new(r["source"].as_str().unwrap()).starts_with(&gen),
            "{r}"
        );
    }
    // Prompts with the same text are one prompt; each is paired with its report's image.
    let prompts = report["data"]["reports"].as_u64().unwrap();
    assert!((1..=4).contains(&prompts));
    assert_eq!(report["metrics"]["ssim"]["n"], prompts);

    // Bad folders: each error names the file, and nothing is written.
    let fails = |dir: &Path, needles: &[&str]| {
        let out = scratch("must-not-exist-images");
        let res = eval_images(dir, &out, &["--weights", empty.to_str().unwrap()]);
        assert_eq!(res.status.code(), Some(1));
        let err = stderr(&res);
        for needle in needles {
            assert!(err.contains(needle), "{needle:?} not in: {err}");
        }
        assert!(!out.exists(), "nothing written");
    };
    let none = empty_dir("no-pngs");
    fails(&none, &["no PNG files"]);
    let first = gen.join("p00001-00000000.png");
    let prompt = cxrgen::io::png::read_text(&first).unwrap()["prompt"].clone();
    let bad = empty_dir("bad-pngs");
    std::fs::copy(&first, bad.join("a.png")).unwrap();
    // Another size.
    let small = bad.join("b-small.png");
    cxrgen::io::png::write(
        &small,
        cxrgen::io::png::Pixels::Eight(&[128; 32 * 32]),
        32,
        &[("prompt", prompt.clone())],
    )
    .unwrap();
    fails(&bad, &["b-small.png", "32×32", "64×64"]);
    std::fs::remove_file(&small).unwrap();
    // Three channels.
    let rgb = bad.join("c-rgb.png");
    {
        let file = std::fs::File::create(&rgb).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 64, 64);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_itxt_chunk("prompt".into(), prompt.clone()).unwrap();
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[100; 64 * 64 * 3]).unwrap();
    }
    fails(&bad, &["c-rgb.png", "1-channel"]);
    std::fs::remove_file(&rgb).unwrap();
    // No prompt, and a prompt that is no report of the split.
    std::fs::write(bad.join("d-plain.png"), common::tiny_png()).unwrap();
    fails(&bad, &["d-plain.png", "no `prompt` text chunk"]);
    std::fs::remove_file(bad.join("d-plain.png")).unwrap();
    cxrgen::io::png::write(
        &bad.join("e-other.png"),
        cxrgen::io::png::Pixels::Eight(&[128; 64 * 64]),
        64,
        &[("prompt", "Sunny weather.".into())],
    )
    .unwrap();
    fails(&bad, &["e-other.png", "not the text of any report"]);
    // --images replaces the generation flags.
    let res = eval_images(&gen, &scratch("images-and-n"), &["--n", "2"]);
    assert_eq!(res.status.code(), Some(2), "{}", stderr(&res));
}
