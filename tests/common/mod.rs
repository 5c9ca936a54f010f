//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

/// A file under `../shared` (beside the project root), or None with a message saying the test is
/// skipped: a user's machine has no `../shared`.
pub fn shared_file(rel: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(rel);
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} is absent (tests on ../shared data run only where it is checked out beside the project)",
            path.display()
        );
        None
    }
}

/// A file under tests/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// An 8×8 gray PNG with a gradient, as bytes: a stand-in for a radiograph under a real file name.
pub fn tiny_png() -> Vec<u8> {
    let img = image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(x * 16 + y * 8) as u8]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs the cxrgen binary of this build.
pub fn cxrgen(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cxrgen"))
        .args(args)
        .output()
        .unwrap()
}

/// `out`, after checking that the command succeeded (its stderr otherwise).
pub fn ok(out: std::process::Output) -> std::process::Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A folder for a fixture that the tests of one binary share (a prepared cache, a trained model):
/// under cargo's `target/tmp`, emptied by each run, so that runs leave one copy in all instead of
/// one per process in the system's temporary folder (a shared fixture is never dropped).
pub fn shared_scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// In `root`: 48 phantoms of 64×64 (`ph`, drawn from `seed`) prepared with the tiny config
/// (`cache`), a train-vae run of `vae_steps` optimizer steps on them (`vae`) and a
/// train-diffusion run of `ldm_steps` on that VAE (`ldm`).
pub fn tiny_models(root: &std::path::Path, seed: u64, vae_steps: u64, ldm_steps: u64) {
    let p = |s: &str| root.join(s).display().to_string();
    ok(cxrgen(&[
        "phantom",
        "--n",
        "48",
        "--size",
        "64",
        "--seed",
        &seed.to_string(),
        "--out",
        &p("ph"),
    ]));
    ok(cxrgen(&[
        "prepare",
        "--config",
        "tiny",
        "--iu",
        &p("ph"),
        "--out",
        &p("cache"),
    ]));
    ok(cxrgen(&[
        "train-vae",
        "--config",
        "tiny",
        "--data",
        &p("cache"),
        "--out",
        &p("vae"),
        "--max-steps",
        &vae_steps.to_string(),
    ]));
    ok(cxrgen(&[
        "train-diffusion",
        "--config",
        "tiny",
        "--data",
        &p("cache"),
        "--vae",
        &p("vae"),
        "--out",
        &p("ldm"),
        "--max-steps",
        &ldm_steps.to_string(),
    ]));
}
