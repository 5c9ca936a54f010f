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
    let mut args = vec![
        "eval",
        task,
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--data",
        fixture().cache.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cxrgen(&args)
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
    let no_weights = scratch("no-weights");
    std::fs::create_dir_all(&no_weights).unwrap();
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
    let empty = scratch("empty-weights");
    std::fs::create_dir_all(&empty).unwrap();
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
    let empty = scratch("gen-no-weights");
    std::fs::create_dir_all(&empty).unwrap();
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
        .any(|l| l.contains("MS-SSIM") && l.contains("161×161")));
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
        &["--metrics ms-ssim", "161×161"],
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
