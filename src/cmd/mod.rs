//! The subcommands, one file or folder each: what `cxrgen <command>` does with the request the
//! command line (`cli.rs`) made of its arguments.
//!
//! `prepare` prepare.rs · `phantom` phantom.rs · `grid` grid.rs · `train-vae`, `train-diffusion`
//! train.rs · `train-classifier` train_classifier.rs · `generate` generate/ (the command, the pipeline it samples with, prompts files) ·
//! `eval vae`, `eval generation` eval/ (the two tasks, their paired metrics, their outputs) ·
//! `export` export.rs · `info` info.rs · `bench` bench.rs · `check-device` check_device.rs · `demo` demo/ (the
//! pipeline on phantoms and its report).

pub mod bench;
pub mod check_device;
pub mod demo;
pub mod eval;
pub mod export;
pub mod generate;
pub mod grid;
pub mod info;
pub mod phantom;
pub mod prepare;
pub mod train;
pub mod train_classifier;

use std::path::Path;

use anyhow::{Context, Result};

use crate::config::{Config, RandomBertConfig, TextEncoderSource};

/// Replaces a pretrained text encoder by a one-layer random BERT of the same width (768 when the
/// config does not say): speed and device checks need no download.
pub fn use_random_text_encoder(cfg: &mut Config) {
    let hidden = cfg.text.hidden_size.unwrap_or(768);
    if let TextEncoderSource::Pretrained(_) = cfg.text.encoder {
        cfg.text.encoder = TextEncoderSource::Random(RandomBertConfig {
            hidden_size: hidden,
            layers: 1,
            heads: (hidden / 64).max(1),
            intermediate_size: 4 * hidden,
            seed: 0,
        });
        cfg.text.hidden_size = Some(hidden);
    }
}

/// Creates the output folder `out` and checks that it can be written, before any work is done.
pub fn prepare_out(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the folder", out.display()))?;
    let probe = out.join(format!(".cxrgen-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("--out {}: the folder cannot be written", out.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}
