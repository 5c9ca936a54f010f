//! `cxrgen generate` on a briefly trained tiny model: same seed and settings give byte-identical
//! PNGs whatever the batch size; the PNGs carry their prompt, seed and the synthetic notice; bad
//! input is a clear error.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{cxrgen, ok};
use std::sync::OnceLock;

fn dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cxrgen-generate-{}-{name}", std::process::id()))
}

/// A tiny diffusion run (8 VAE steps, 8 diffusion steps on 64×64 phantoms), shared by the tests.
fn model() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let root = dir("model");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let p = |s: &str| root.join(s).display().to_string();
        ok(cxrgen(&[
            "phantom",
            "--n",
            "48",
            "--size",
            "64",
            "--seed",
            "5",
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
            "4",
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
            "4",
        ]));
        root.join("ldm")
    })
}

/// Four images (seeds 10 to 13) unless `extra` gives `--n`.
fn generate(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--checkpoint",
        model().to_str().unwrap(),
        "--prompt",
        "Left pleural effusion.",
        "--seed",
        "10",
        "--steps",
        "8",
        "--out",
        out.to_str().unwrap(),
    ];
    if !extra.contains(&"--n") {
        args.extend_from_slice(&["--n", "4"]);
    }
    args.extend_from_slice(extra);
    cxrgen(&args)
}

#[test]
fn same_seed_same_bytes_whatever_the_batch() {
    let (a, b, c) = (dir("b1"), dir("b4"), dir("again"));
    ok(generate(&a, &["--batch-size", "1"]));
    ok(generate(&b, &["--batch-size", "4"]));
    ok(generate(
        &c,
        &["--batch-size", "3", "--sampler", "dpmpp-2m"],
    ));
    for seed in 10..14 {
        let name = format!("cxr-{seed:08}.png");
        let x = std::fs::read(a.join(&name)).unwrap();
        let y = std::fs::read(b.join(&name)).unwrap();
        assert!(x == y, "{name} differs between batch sizes 1 and 4");
    }
    // Different seeds give different images; another sampler, other images.
    assert_ne!(
        std::fs::read(a.join("cxr-00000010.png")).unwrap(),
        std::fs::read(a.join("cxr-00000011.png")).unwrap()
    );
    assert_ne!(
        std::fs::read(a.join("cxr-00000010.png")).unwrap(),
        std::fs::read(c.join("cxr-00000010.png")).unwrap()
    );
    for d in [a, b, c] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn pngs_say_what_they_are() {
    let out = dir("meta");
    let run = ok(generate(&out, &["--json", "--n", "1", "--bits", "16"]));
    let line: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(line["seed"], 10);
    let path = PathBuf::from(line["path"].as_str().unwrap());
    let text = cxrgen::io::png::read_text(&path).unwrap();
    assert_eq!(text["prompt"], "Left pleural effusion.");
    assert_eq!(text["seed"], "10");
    assert_eq!(text["sampler"], "ddim");
    assert_eq!(
        text["Disclaimer"],
        "SYNTHETIC IMAGE - NOT FOR DIAGNOSTIC USE"
    );
    assert_eq!(text["checkpoint_sha256"].len(), 64);
    let img = image::open(&path).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    assert!(matches!(img, image::DynamicImage::ImageLuma16(_)));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = dir("bad");
    let err = |o: Output| {
        assert_eq!(o.status.code(), Some(1));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = err(cxrgen(&[
        "generate",
        "--checkpoint",
        model().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("--unconditional"), "{e}");
    let e = err(cxrgen(&[
        "generate",
        "--checkpoint",
        "no-such-run",
        "--prompt",
        "x",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("no-such-run"), "{e}");
    let e = err(generate(&out, &["--bits", "12"]));
    assert!(e.contains("--bits 12"), "{e}");
    let e = err(generate(Path::new("/proc/cxrgen-cannot-write"), &[]));
    assert!(e.contains("--out /proc/cxrgen-cannot-write"), "{e}");
    let long = "effusion ".repeat(200);
    let run = ok(cxrgen(&[
        "generate",
        "--checkpoint",
        model().to_str().unwrap(),
        "--prompt",
        &long,
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]));
    let e = String::from_utf8_lossy(&run.stderr);
    assert!(e.contains("truncated") && e.contains("64 tokens"), "{e}");
    std::fs::remove_dir_all(&out).unwrap();
}
