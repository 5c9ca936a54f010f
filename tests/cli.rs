//! The `cxrgen` binary: `info` counts, config errors, `bench` figures, and honest refusals of
//! unfinished commands.

use std::process::{Command, Output};

fn cxrgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cxrgen"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

/// The JSON object a successful command printed.
fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn within(value: f64, target: f64, tolerance: f64) -> bool {
    (value / target - 1.0).abs() <= tolerance
}

#[test]
fn paper_config_has_the_papers_parameter_counts() {
    let out = cxrgen(&["info", "--config", "configs/paper.yaml", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vae = v["vae_params"].as_f64().unwrap();
    let unet = v["unet_params"].as_f64().unwrap();
    let head = v["text_trainable_params"].as_f64().unwrap();
    assert!(within(vae, 3.25e6, 0.03), "VAE {vae}");
    assert!(within(unet, 39.66e6, 0.01), "U-Net {unet}");
    assert!(within(head, 593e3, 0.01), "text head {head}");
    assert!(v.get("text_frozen_params").is_some());
    assert_eq!(v["latent_shape"], serde_json::json!([8, 32, 32]));
    assert_eq!(
        v["config"]["unet"]["attention_levels"],
        serde_json::json!([0, 1, 2])
    );
}

#[test]
fn tiny_preset_reports_all_four_counts() {
    let out = cxrgen(&["info", "--config", "tiny", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "vae_params",
        "unet_params",
        "text_trainable_params",
        "text_frozen_params",
    ] {
        assert!(v[key].as_u64().unwrap() > 0, "{key}");
    }
}

#[test]
fn config_errors_name_the_file_and_the_key() {
    let dir = std::env::temp_dir().join(format!("cxrgen-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tiny =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.yaml")).unwrap();

    let unknown = dir.join("unknown.yaml");
    std::fs::write(&unknown, tiny.replace("  head_dim:", "  head_dims:")).unwrap();
    let out = cxrgen(&["info", "--config", unknown.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("unknown.yaml") && err.contains("head_dims"),
        "{err}"
    );

    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, tiny.replace("  head_dim: 8", "  head_dim: 7")).unwrap();
    let out = cxrgen(&["info", "--config", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("unet.head_dim = 7"), "{err}");

    let out = cxrgen(&["info", "--config", "no-such-file.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("no-such-file.yaml"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_config_based_on_paper_can_use_a_random_text_encoder() {
    // The base's `encoder: {pretrained: ...}` is replaced by the child's variant, not merged
    // with it (which serde refused as a map with two keys).
    let dir = std::env::temp_dir().join(format!("cxrgen-cli-variant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("paper-random.yaml");
    std::fs::write(
        &cfg,
        "base: paper\ntext:\n  encoder:\n    random:\n      hidden_size: 768\n      layers: 1\n      heads: 12\n      intermediate_size: 3072\n      seed: 0\n",
    )
    .unwrap();
    let v = json_of(&cxrgen(&[
        "info",
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["config"]["text"]["encoder"]["random"]["layers"], 1, "{v}");
    assert!(
        v["config"]["text"]["encoder"].get("pretrained").is_none(),
        "{v}"
    );
    // The random BERT's parameters are known without any download: embeddings and one layer.
    let frozen = v["text_frozen_params"].as_u64().unwrap();
    assert!((7_000_000..40_000_000).contains(&frozen), "{frozen}");
    // And it is the encoder that runs: 768-wide states, with no download.
    let loaded = cxrgen::config::Config::load(cfg.to_str().unwrap()).unwrap();
    let text = cxrgen::model::TextEncoder::load(&loaded.text, &candle_core::Device::Cpu).unwrap();
    let (hidden, _) = text
        .encode(&["Small left pleural effusion."], &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(hidden.dims()[2], 768);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_reader_that_goes_away_is_not_an_error() {
    // `cxrgen info | head -0`: stdout is closed before anything is written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_cxrgen"))
        .args(["info", "--config", "tiny"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn grid_refuses_tiles_and_rows_of_nothing() {
    let dir = std::env::temp_dir().join(format!("cxrgen-cli-grid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("a.png");
    image::GrayImage::from_pixel(8, 8, image::Luma([100]))
        .save(&img)
        .unwrap();
    let sheet = dir.join("sheet.png");
    let grid = |flag: &str, value: &str| {
        cxrgen(&[
            "grid",
            "--out",
            sheet.to_str().unwrap(),
            flag,
            value,
            img.to_str().unwrap(),
        ])
    };
    for flag in ["--tile", "--cols"] {
        let out = grid(flag, "0");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("{flag} 0")), "{err}");
        assert!(!sheet.exists(), "{flag} 0 wrote a sheet");
    }
    // One pixel is a tile: 1 + 2 × 2 gap pixels.
    assert!(grid("--tile", "1").status.success());
    assert_eq!(image::open(&sheet).unwrap().width(), 5);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn training_input_errors_name_what_is_wrong() {
    let out = cxrgen(&[
        "train-vae",
        "--config",
        "tiny",
        "--data",
        "no-such-cache",
        "--out",
        "/tmp/cxrgen-never-created",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("no-such-cache") && err.contains("cxrgen prepare"),
        "{err}"
    );
    assert!(
        !std::path::Path::new("/tmp/cxrgen-never-created").exists(),
        "a failed start leaves nothing"
    );
    let out = cxrgen(&["train-vae", "--config", "tiny", "--data", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--out"));
    let out = cxrgen(&["train-vae", "--data", "x", "--resume", "no-such-run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-run") && err.contains("not a run folder"),
        "{err}"
    );
}

#[test]
fn bench_reports_each_batch_size_and_a_training_step_of_each_stage() {
    let out = cxrgen(&[
        "bench",
        "--config",
        "tiny",
        "--device",
        "cpu",
        "--batch-sizes",
        "1,2",
        "--repeats",
        "2",
        "--steps",
        "20",
        "--train",
        "--train-vae",
        "--cuda-graph",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(v["device"], "cpu");
    let rows = v["sampling"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, b) in rows.iter().zip([1, 2]) {
        assert_eq!(row["batch"], b);
        let (step, decode, image) = (
            row["ms_per_step"].as_f64().unwrap(),
            row["decode_ms_per_image"].as_f64().unwrap(),
            row["ms_per_image"].as_f64().unwrap(),
        );
        assert!(step > 0.0 && decode > 0.0, "{row}");
        // Counted by the binary's allocator: the CPU runs one U-Net pass per image.
        let ops = row["ops_per_step"].as_u64().unwrap();
        assert!(ops > 100 * b, "{row}");
        // Per image: 20 steps of the batch shared by its images, plus decoding.
        assert!(
            (image - (20.0 * step / b as f64 + decode)).abs() < 1e-6 * image,
            "{row}"
        );
        // --cuda-graph on the CPU: the same guided step, run eagerly through CapturedStep.
        let g = &row["cuda_graph"];
        assert_eq!(g["graph"], false, "{g}");
        assert_eq!(g["max_abs_vs_eager"], 0.0, "{g}");
        assert!(g["ms_per_step"].as_f64().unwrap() > 0.0, "{g}");
    }
    for (key, stage, batch) in [("training", "diffusion", 8), ("training_vae", "vae", 8)] {
        let t = &v[key];
        assert_eq!(t["stage"], stage, "{t}");
        // The tiny config's batch sizes, trained in F32 on the CPU.
        assert_eq!(t["batch"], batch, "{t}");
        assert_eq!(t["precision"], "f32", "{t}");
        assert!(t["ms_per_optimizer_step"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["peak_mib"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["ops_per_micro_batch"].as_u64().unwrap() > 100, "{t}");
    }
}

#[test]
fn check_device_compares_with_the_cpu() {
    // On the CPU against itself every difference is zero: the check is deterministic. On a GPU,
    // scripts/gpu-check.sh runs the same command with --device cuda.
    let out = cxrgen(&[
        "check-device",
        "--config",
        "tiny",
        "--device",
        "cpu",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(v["ok"], true);
    let checks = v["checks"].as_array().unwrap();
    // The four model rows, the CUDA-graph row, then nine fused kernels × (F32, F16) × (output,
    // gradients).
    assert_eq!(checks.len(), 5 + 9 * 2 * 2);
    for c in checks {
        assert_eq!(c["max_abs"], 0.0, "{c}");
    }
    // The last row replays a CUDA graph on a GPU; on the CPU it runs the step eagerly.
    assert_eq!(checks[4]["check"], "CUDA graph vs eager");
    assert_eq!(checks[4]["graph"], false);
}
