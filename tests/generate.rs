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
        let root = common::shared_scratch("generate-model");
        common::tiny_models(&root, 5, 4, 4);
        root.join("ldm")
    })
}

/// Four images (seeds 10 to 13) in 8 steps unless `extra` gives `--n`, `--seed` or `--steps`.
fn generate(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--checkpoint",
        model().to_str().unwrap(),
        "--prompt",
        "Left pleural effusion.",
        "--out",
        out.to_str().unwrap(),
    ];
    for (flag, default) in [("--n", "4"), ("--seed", "10"), ("--steps", "8")] {
        if !extra.contains(&flag) {
            args.extend_from_slice(&[flag, default]);
        }
    }
    args.extend_from_slice(extra);
    cxrgen(&args)
}

#[test]
fn same_seed_same_bytes_whatever_the_batch() {
    let (a, b, c, d) = (dir("b1"), dir("b4"), dir("again"), dir("chosen"));
    ok(generate(&a, &["--batch-size", "1"]));
    ok(generate(&b, &["--batch-size", "4"]));
    ok(generate(
        &c,
        &["--batch-size", "3", "--sampler", "dpmpp-2m"],
    ));
    // No --batch-size: the CPU's default, said on stderr (--no-cuda-graph changes nothing here).
    let chosen = ok(generate(&d, &["--no-cuda-graph"]));
    let e = String::from_utf8_lossy(&chosen.stderr);
    assert!(e.contains("batch size 4 (the default on the CPU"), "{e}");
    for seed in 10..14 {
        let name = format!("cxr-{seed:08}.png");
        let x = std::fs::read(a.join(&name)).unwrap();
        let y = std::fs::read(b.join(&name)).unwrap();
        assert!(x == y, "{name} differs between batch sizes 1 and 4");
        assert!(x == std::fs::read(d.join(&name)).unwrap(), "{name}");
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
    for d in [a, b, c, d] {
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
    assert_eq!(text["clip_x0"], "true");
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
    let e = err(generate(&out, &["--batch-size", "0"]));
    assert!(e.contains("--batch-size 0"), "{e}");
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

#[test]
fn the_largest_seed_makes_one_image_and_no_more() {
    let (out, again) = (dir("max-seed"), dir("max-seed-2"));
    let max = u64::MAX.to_string();
    let run_with = |out: &Path, n: &str| generate(out, &["--seed", &max, "--n", n, "--steps", "2"]);
    let run = ok(run_with(&out, "1"));
    let e = String::from_utf8_lossy(&run.stderr);
    assert!(e.contains("wrote 1 image"), "{e}");
    assert!(out.join(format!("cxr-{max}.png")).is_file());
    // Two images would need a seed past the largest: an error, and nothing is written.
    let o = run_with(&again, "2");
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains(&format!("--seed {max} + --n 2 overflows")),
        "{e}"
    );
    assert!(!again.exists());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_prompts_file_finishes_what_an_earlier_run_left() {
    let out = dir("prompts");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let csv = out.join("prompts.csv");
    std::fs::write(
        &csv,
        "prompt,n,seed\nLeft pleural effusion.,2,10\n\"Cardiomegaly, no effusion.\",1,3\n",
    )
    .unwrap();
    let images = out.join("images");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--checkpoint",
            model().to_str().unwrap(),
            "--prompts-file",
            csv.to_str().unwrap(),
            "--steps",
            "8",
            "--out",
            images.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ok(cxrgen(&args))
    };
    let first = run(&["--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&first.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["prompt"], "Cardiomegaly, no effusion.");
    let names = [
        "p00002-00000010.png",
        "p00002-00000011.png",
        "p00003-00000003.png",
    ];
    for name in names {
        assert!(images.join(name).is_file(), "{name}");
    }
    // A prompt and seed from a file give the image --prompt gives them.
    let single = dir("prompts-single");
    ok(generate(&single, &["--n", "1"]));
    assert!(
        std::fs::read(single.join("cxr-00000010.png")).unwrap()
            == std::fs::read(images.join(names[0])).unwrap()
    );
    // As if the first run had stopped before its second image: only that one is made again.
    let kept = std::fs::read(images.join(names[1])).unwrap();
    std::fs::remove_file(images.join(names[1])).unwrap();
    let again = run(&[]);
    let msg = String::from_utf8_lossy(&again.stderr);
    assert!(msg.contains("2 of 3 images are already"), "{msg}");
    assert!(msg.contains("wrote 1 image"), "{msg}");
    assert!(std::fs::read(images.join(names[1])).unwrap() == kept);

    // Not UTF-8: the error names the line.
    let bad = out.join("bad.txt");
    std::fs::write(&bad, b"Normal chest.\nEffusion \xe9\n").unwrap();
    let o = cxrgen(&[
        "generate",
        "--checkpoint",
        model().to_str().unwrap(),
        "--prompts-file",
        bad.to_str().unwrap(),
        "--out",
        images.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.txt line 2: not UTF-8"), "{e}");
    for d in [out, single] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// The data elements of an explicit-VR little-endian DICOM file (no sequences), by tag.
fn dicom_elements(bytes: &[u8]) -> std::collections::HashMap<(u16, u16), Vec<u8>> {
    assert_eq!(&bytes[128..132], b"DICM", "DICOM preamble");
    let (mut at, mut out) = (132, std::collections::HashMap::new());
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    while at < bytes.len() {
        let tag = (u16_at(at), u16_at(at + 2));
        let vr = &bytes[at + 4..at + 6];
        let (len, head) = if [b"OB", b"OW", b"UT", b"UN", b"SQ"].iter().any(|v| vr == *v) {
            let l = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            (l as usize, 12)
        } else {
            (u16_at(at + 6) as usize, 8)
        };
        out.insert(tag, bytes[at + head..at + head + len].to_vec());
        at += head + len;
    }
    out
}

#[test]
fn dicom_output_is_marked_synthetic_and_holds_the_png_pixels() {
    let (d, p) = (dir("dicom"), dir("dicom-png"));
    ok(generate(
        &d,
        &["--n", "2", "--bits", "16", "--format", "dicom"],
    ));
    ok(generate(&p, &["--n", "1", "--bits", "16"]));
    let a = dicom_elements(&std::fs::read(d.join("cxr-00000010.dcm")).unwrap());
    let b = dicom_elements(&std::fs::read(d.join("cxr-00000011.dcm")).unwrap());
    let text = |e: &std::collections::HashMap<(u16, u16), Vec<u8>>, tag| {
        String::from_utf8(e[&tag].clone())
            .unwrap()
            .trim_end_matches(['\0', ' '])
            .to_string()
    };
    assert_eq!(text(&a, (0x0008, 0x0016)), "1.2.840.10008.5.1.4.1.1.7");
    assert_eq!(text(&a, (0x0008, 0x001C)), "YES");
    assert_eq!(text(&a, (0x0008, 0x0064)), "SYN");
    assert_eq!(text(&a, (0x0028, 0x0301)), "NO");
    assert_eq!(text(&a, (0x0002, 0x0003)), text(&a, (0x0008, 0x0018)));
    assert_ne!(
        text(&a, (0x0008, 0x0018)),
        text(&b, (0x0008, 0x0018)),
        "one UID per image"
    );
    assert_eq!(
        text(&a, (0x0020, 0x000E)),
        text(&b, (0x0020, 0x000E)),
        "one series per run"
    );
    let comments = text(&a, (0x0020, 0x4000));
    for want in [
        "prompt: Left pleural effusion.",
        "seed: 10",
        "SYNTHETIC IMAGE - NOT FOR DIAGNOSTIC USE",
    ] {
        assert!(comments.contains(want), "{comments}");
    }
    assert_eq!(a[&(0x0028, 0x0010)], 64u16.to_le_bytes());
    let png = image::open(p.join("cxr-00000010.png"))
        .unwrap()
        .into_luma16();
    let pixels: Vec<u16> = a[&(0x7FE0, 0x0010)]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert!(pixels == png.into_raw(), "DICOM and PNG pixels differ");

    // An independent reader, where the machine has one.
    let check = "import pydicom,sys; d=pydicom.dcmread(sys.argv[1]); \
                 assert d.SyntheticData=='YES' and d.Rows==64 and d.BitsStored==16, d; \
                 assert len(d.PixelData)==64*64*2 and 'seed: 10' in d.ImageComments, d; \
                 assert d.file_meta.MediaStorageSOPClassUID==d.SOPClassUID, d; print('ok')";
    match std::process::Command::new("python3")
        .args(["-c", check, d.join("cxr-00000010.dcm").to_str().unwrap()])
        .output()
    {
        Ok(o) if o.status.success() => assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "ok"),
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named") => {
            eprintln!(
                "SKIPPED the pydicom cross-check: pydicom is not installed (pip install pydicom)"
            )
        }
        Ok(o) => panic!(
            "pydicom rejects the file: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) => eprintln!("SKIPPED the pydicom cross-check: no python3"),
    }
    for x in [d, p] {
        std::fs::remove_dir_all(x).unwrap();
    }
}

/// The mean absolute difference per pixel (0–255) of the image `name` in two folders.
fn png_diff(a: &Path, b: &Path, name: &str) -> f64 {
    let read = |d: &Path| image::open(d.join(name)).unwrap().to_luma8().into_raw();
    let (x, y) = (read(a), read(b));
    x.iter()
        .zip(&y)
        .map(|(&p, &q)| (p as f64 - q as f64).abs())
        .sum::<f64>()
        / x.len() as f64
}

#[test]
fn an_exported_model_is_smaller_and_generates_the_same_images() {
    let exported = dir("exported");
    let _ = std::fs::remove_dir_all(&exported);
    let run = ok(cxrgen(&[
        "export",
        "--checkpoint",
        model().to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]));
    assert!(String::from_utf8_lossy(&run.stderr).contains("MB"));
    // What sampling needs, in F16: no optimizer state, no raw weights.
    let mut files: Vec<String> = std::fs::read_dir(&exported)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["ema.safetensors", "state.json", "vae.safetensors"]);
    for f in ["ema.safetensors", "vae.safetensors"] {
        let t =
            candle_core::safetensors::load(exported.join(f), &candle_core::Device::Cpu).unwrap();
        assert!(
            t.values().all(|t| t.dtype() == candle_core::DType::F16),
            "{f}"
        );
    }
    // The same images within F16 rounding of the weights.
    let (full, half) = (dir("export-f32"), dir("export-f16"));
    ok(generate(&full, &["--n", "1"]));
    let mut args = vec!["generate", "--checkpoint", exported.to_str().unwrap()];
    args.extend_from_slice(&[
        "--prompt",
        "Left pleural effusion.",
        "--n",
        "1",
        "--seed",
        "10",
        "--steps",
        "8",
        "--out",
        half.to_str().unwrap(),
    ]);
    ok(cxrgen(&args));
    let d = png_diff(&full, &half, "cxr-00000010.png");
    assert!(d < 2.0, "mean |difference| {d} of 255");

    // An existing folder is refused and kept.
    let again = cxrgen(&[
        "export",
        "--checkpoint",
        model().to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("--out") && err.contains("already exists"),
        "{err}"
    );
    assert!(exported.join("state.json").is_file());
}
