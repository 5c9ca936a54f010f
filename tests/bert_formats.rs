//! A BERT saved as a PyTorch zip `pytorch_model.bin` (with TensorFlow-era names, as BioBERT v1.1)
//! and as `model.safetensors` (modern names) loads to identical outputs.
//! The fixture is written by scripts/reference/make_tiny_bert.py.

mod common;

use candle_core::{DType, Device, Tensor};
use cxrgen::model::text::{BertConfig, BertFiles, FrozenBert};
use cxrgen::model::tokenizer::TextTokenizer;

fn files(weights: &str) -> BertFiles {
    BertFiles {
        config: common::fixture("tiny-bert/config.json"),
        vocab: common::fixture("tiny-bert/vocab.txt"),
        weights: common::fixture(&format!("tiny-bert/{weights}")),
    }
}

#[test]
fn pytorch_zip_and_safetensors_give_identical_outputs() {
    let dev = Device::Cpu;
    let from_pth = FrozenBert::load(&files("pytorch_model.bin"), &dev).unwrap();
    let from_st = FrozenBert::load(&files("model.safetensors"), &dev).unwrap();
    let tok =
        TextTokenizer::from_vocab_file(&common::fixture("tiny-bert/vocab.txt"), true, 32).unwrap();
    let batch = tok
        .encode_batch(
            &[
                "No acute disease.",
                "Large right pleural effusion, left lower lobe clear.",
            ],
            &dev,
        )
        .unwrap();
    let a = from_pth.forward(&batch).unwrap();
    let b = from_st.forward(&batch).unwrap();
    assert_eq!(a.dims(), &[2, batch.ids.dim(1).unwrap(), 16]);
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    // Not a degenerate output: the two reports' first tokens differ after the [CLS].
    let spread = a.narrow(1, 1, 1).unwrap().flatten_all().unwrap();
    let std = spread.var(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(std > 1e-3, "{std}");
}

#[test]
fn config_without_eps_uses_bert_defaults_and_counts_what_is_loaded() {
    let cfg = BertConfig::from_file(&common::fixture("tiny-bert/config.json")).unwrap();
    assert_eq!(cfg.layer_norm_eps, 1e-12);
    assert_eq!(cfg.pad_token_id, 0);
    // The count formula equals the elements of every tensor the encoder uses (all but the pooler).
    let tensors = candle_core::safetensors::load(
        common::fixture("tiny-bert/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let used: usize = tensors
        .iter()
        .filter(|(name, _)| !name.starts_with("pooler."))
        .map(|(_, t): (&String, &Tensor)| t.elem_count())
        .sum();
    assert_eq!(cfg.param_count(), used);
    assert!(tensors.values().all(|t| t.dtype() == DType::F32));
}

#[test]
fn a_folder_missing_files_is_named_in_the_error() {
    let dir = std::env::temp_dir().join(format!("cxrgen-bert-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        common::fixture("tiny-bert/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let err = BertFiles::locate(dir.to_str().unwrap())
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(err.contains("vocab.txt"), "{err}");
    assert!(err.contains("pytorch_model.bin"), "{err}");
}
