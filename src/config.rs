//! The YAML configuration: model sizes, data settings and training settings in one file.
//!
//! A config is read with unknown keys rejected, then every value is checked by [`Config::validate`],
//! whose errors name the key (`vae.norm_groups`, `unet.channel_mult[2]`, ...). Two presets are built
//! into the binary so that it runs with no file at all: `paper` (configs/paper.yaml) and `tiny`
//! (configs/tiny.yaml).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The presets compiled into the binary, by name.
pub const PRESETS: [(&str, &str); 3] = [
    ("paper", include_str!("../configs/paper.yaml")),
    ("tiny", include_str!("../configs/tiny.yaml")),
    ("demo", include_str!("../configs/demo.yaml")),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub data: DataConfig,
    pub vae: VaeConfig,
    pub unet: UnetConfig,
    pub text: TextConfig,
    pub diffusion: DiffusionConfig,
    pub train_vae: VaeTrainConfig,
    pub train_diffusion: DiffusionTrainConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Square side of the training images in pixels.
    pub image_size: usize,
    /// Which projections to keep.
    pub views: Vec<Projection>,
    /// Which report sections an image's report must have to be kept.
    pub require: TextRequirement,
    /// Which report sections make the text the model is conditioned on (and prompted with).
    #[serde(default)]
    pub text: TextSections,
    pub split: SplitConfig,
}

/// The view of a radiograph (`data.views` keeps some).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    Frontal,
    Lateral,
    Unknown,
}

impl Projection {
    /// Reads the spellings the datasets use: Frontal/PA/AP, Lateral/LL/LAT; anything else (empty
    /// included) is Unknown.
    pub fn parse(s: &str) -> Self {
        match s.trim().to_ascii_lowercase().as_str() {
            "frontal" | "pa" | "ap" | "ap supine" | "posteroanterior" | "anteroposterior" => {
                Self::Frontal
            }
            "lateral" | "lat" | "ll" | "rl" => Self::Lateral,
            _ => Self::Unknown,
        }
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Frontal => "frontal",
            Self::Lateral => "lateral",
            Self::Unknown => "unknown",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextRequirement {
    FindingsAndImpression,
    FindingsOrImpression,
    Any,
}

/// The report sections whose cleaned text conditions the model. The paper uses both; the
/// impression alone is a short statement of the findings, in which a word such as the side of a
/// finding weighs more (configs/demo.yaml).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextSections {
    #[default]
    FindingsAndImpression,
    Findings,
    Impression,
}

impl fmt::Display for TextSections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FindingsAndImpression => "findings_and_impression",
            Self::Findings => "findings",
            Self::Impression => "impression",
        })
    }
}

/// Patient-level split fractions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    pub train: f64,
    pub val: f64,
    pub test: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    pub image_channels: usize,
    pub latent_channels: usize,
    pub norm_groups: usize,
    pub encoder: VaeEncoderConfig,
    pub decoder: VaeDecoderConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeEncoderConfig {
    /// Channels of the first 3×3 convolution.
    pub stem_channels: usize,
    pub blocks: Vec<VaeEncoderBlock>,
}

/// One encoder ResBlock; `down` makes its first convolution stride 2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeEncoderBlock {
    pub channels: usize,
    #[serde(default)]
    pub down: bool,
    #[serde(default)]
    pub attention: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeDecoderConfig {
    pub blocks: Vec<VaeDecoderBlock>,
}

/// One decoder ResBlock; `up` doubles the resolution (nearest) before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeDecoderBlock {
    pub channels: usize,
    #[serde(default)]
    pub up: bool,
    #[serde(default)]
    pub attention: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetConfig {
    pub base_channels: usize,
    pub channel_mult: Vec<usize>,
    /// ResBlocks per level on the way down (the way up has one more, as in DDPM/LDM).
    pub res_blocks: usize,
    /// Levels (0 = full latent resolution) with a self- plus cross-attention transformer block.
    pub attention_levels: Vec<usize>,
    pub mid_attention: bool,
    pub head_dim: usize,
    /// Hidden width of the GEGLU feed-forward, as a multiple of the channels.
    pub ff_mult: usize,
    pub norm_groups: usize,
    /// Width of the time embedding MLP, as a multiple of `base_channels`.
    pub time_embed_mult: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub encoder: TextEncoderSource,
    /// Lower-case (and strip accents) before WordPiece: false for cased models such as BioBERT.
    pub lowercase: bool,
    /// Reports are truncated to this many tokens, [CLS] and [SEP] included.
    pub max_tokens: usize,
    /// Width of the trainable head's output, which the U-Net's cross-attention reads.
    pub context_dim: usize,
    /// The encoder's hidden size, when known in advance; checked against its config.json on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
}

/// Where the frozen BERT comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TextEncoderSource {
    /// A local folder (config.json, vocab.txt, model.safetensors or pytorch_model.bin) or a
    /// Hugging Face hub id such as `dmis-lab/biobert-base-cased-v1.1`.
    Pretrained(String),
    /// A randomly initialised BERT with the built-in vocabulary: needs no download (smoke tests).
    Random(RandomBertConfig),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomBertConfig {
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate_size: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    pub timesteps: usize,
    pub schedule: BetaSchedule,
    /// Used by `linear` and `scaled_linear`; ignored by `cosine`.
    pub beta_start: f64,
    pub beta_end: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// The dtype the networks compute in (master weights stay F32).
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }

    /// Whether the loss needs dynamic scaling: F16's 5-bit exponent flushes small gradients.
    pub fn needs_loss_scaling(self) -> bool {
        self == Self::F16
    }
}

/// How a training stage runs, shared by both stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Micro-batches per optimizer step; one "step" everywhere means one optimizer step.
    pub grad_accumulation: usize,
    /// Compute precision on CUDA; master weights stay F32, and CPU always runs F32.
    pub precision: Precision,
    pub grad_checkpointing: bool,
    pub seed: u64,
    /// Optimizer steps between checkpoints (one is also written at the end of every epoch).
    pub checkpoint_every: usize,
    /// Step checkpoints kept besides `best`.
    pub keep_last: usize,
    /// Non-finite losses in a row that stop the run (each one skips its step).
    pub max_nonfinite: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub lr: f64,
    /// The cosine schedule ends here.
    pub lr_min: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeTrainConfig {
    pub run: RunConfig,
    pub optimizer: OptimizerConfig,
    pub kl_weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionTrainConfig {
    pub run: RunConfig,
    pub optimizer: OptimizerConfig,
    /// Probability, per sample, of replacing the report by the empty text (classifier-free guidance).
    pub null_text_prob: f64,
    pub ema_decay: f64,
    /// Min-SNR-γ loss weighting (Hang et al. 2023; diffusers' `--snr_gamma`): each sample's
    /// squared error times min(SNR_t, γ) / SNR_t, so that the nearly clean timesteps, whose
    /// noise is hardest to see and least worth learning, stop dominating the gradient. Absent:
    /// the plain mean squared error of the paper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snr_gamma: Option<f64>,
    pub samples: SampleGridConfig,
}

/// A PNG grid sampled from fixed prompts and seeds with the EMA weights during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleGridConfig {
    /// Every this many epochs; 0: never.
    pub every: usize,
    pub prompts: Vec<String>,
    /// Images per prompt (seeds 0, 1, ...).
    pub per_prompt: usize,
    pub steps: usize,
    pub guidance_scale: f64,
}

impl Config {
    /// Loads a preset by name (`paper`, `tiny`) or a YAML file by path, and validates it.
    ///
    /// A file may start from another config with `base: NAME_OR_PATH` (a path relative to the
    /// file) and give only the keys it changes; mappings merge key by key, lists are replaced.
    pub fn load(name_or_path: &str) -> Result<Self> {
        let (text, dir, origin) = read_source(name_or_path, None)?;
        Self::from_yaml_in(&text, dir.as_deref()).with_context(|| origin)
    }

    /// Parses and validates YAML text; a `base:` key is resolved against the presets and the
    /// current directory.
    pub fn from_yaml(text: &str) -> Result<Self> {
        Self::from_yaml_in(text, None)
    }

    fn from_yaml_in(text: &str, dir: Option<&Path>) -> Result<Self> {
        let value: serde_yaml::Value = serde_yaml::from_str(text)?;
        let cfg: Config = if has_base(&value) {
            serde_yaml::from_value(resolve_base(value, dir, 0)?)?
        } else {
            // Parsing the text itself keeps line and column in error messages.
            serde_yaml::from_str(text)?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Number of 2× downsamplings between image and latent.
    pub fn vae_downsamplings(&self) -> usize {
        self.vae.encoder.blocks.iter().filter(|b| b.down).count()
    }

    /// Side of the square latent the U-Net sees.
    pub fn latent_size(&self) -> usize {
        self.data.image_size >> self.vae_downsamplings()
    }

    /// Checks every value; the error names the offending key and value.
    pub fn validate(&self) -> Result<()> {
        let d = &self.data;
        positive("data.image_size", d.image_size)?;
        if d.views.is_empty() {
            bail!("data.views is empty: keep at least one projection (frontal, lateral, unknown)");
        }
        for (key, v) in [
            ("data.split.train", d.split.train),
            ("data.split.val", d.split.val),
            ("data.split.test", d.split.test),
        ] {
            in_range(key, v, 0.0, 1.0)?;
        }
        let total = d.split.train + d.split.val + d.split.test;
        if (total - 1.0).abs() > 1e-9 {
            bail!("data.split: train + val + test must be 1, got {total}");
        }

        let v = &self.vae;
        if v.image_channels != 1 {
            bail!(
                "vae.image_channels = {}: only grayscale (1) is supported",
                v.image_channels
            );
        }
        positive("vae.latent_channels", v.latent_channels)?;
        positive("vae.norm_groups", v.norm_groups)?;
        divisible_by_groups(
            "vae.encoder.stem_channels",
            v.encoder.stem_channels,
            v.norm_groups,
            "vae.norm_groups",
        )?;
        if v.encoder.blocks.is_empty() {
            bail!("vae.encoder.blocks: at least one block is needed");
        }
        if v.decoder.blocks.is_empty() {
            bail!("vae.decoder.blocks: at least one block is needed");
        }
        for (i, b) in v.encoder.blocks.iter().enumerate() {
            divisible_by_groups(
                &format!("vae.encoder.blocks[{i}].channels"),
                b.channels,
                v.norm_groups,
                "vae.norm_groups",
            )?;
        }
        for (i, b) in v.decoder.blocks.iter().enumerate() {
            divisible_by_groups(
                &format!("vae.decoder.blocks[{i}].channels"),
                b.channels,
                v.norm_groups,
                "vae.norm_groups",
            )?;
        }
        let downs = self.vae_downsamplings();
        let ups = v.decoder.blocks.iter().filter(|b| b.up).count();
        if downs != ups {
            bail!("vae: the encoder halves the resolution {downs} times (blocks with `down: true`) but the decoder doubles it {ups} times (`up: true`); they must match");
        }
        if !d.image_size.is_multiple_of(1 << downs) {
            bail!(
                "data.image_size = {} is not divisible by 2^{downs}, the VAE's total downsampling",
                d.image_size
            );
        }

        let u = &self.unet;
        positive("unet.base_channels", u.base_channels)?;
        positive("unet.res_blocks", u.res_blocks)?;
        positive("unet.head_dim", u.head_dim)?;
        positive("unet.ff_mult", u.ff_mult)?;
        positive("unet.norm_groups", u.norm_groups)?;
        positive("unet.time_embed_mult", u.time_embed_mult)?;
        if !u.base_channels.is_multiple_of(2) {
            bail!(
                "unet.base_channels = {} must be even (sinusoidal time embedding)",
                u.base_channels
            );
        }
        if u.channel_mult.is_empty() {
            bail!("unet.channel_mult: at least one level is needed");
        }
        for (i, &m) in u.channel_mult.iter().enumerate() {
            positive(&format!("unet.channel_mult[{i}]"), m)?;
            let ch = u.base_channels * m;
            divisible_by_groups(
                &format!("unet.channel_mult[{i}] (channels {ch})"),
                ch,
                u.norm_groups,
                "unet.norm_groups",
            )?;
            let attends = u.attention_levels.contains(&i)
                || (u.mid_attention && i + 1 == u.channel_mult.len());
            if attends && !ch.is_multiple_of(u.head_dim) {
                bail!(
                    "unet.head_dim = {} does not divide the {ch} channels of level {i}",
                    u.head_dim
                );
            }
        }
        for (i, &l) in u.attention_levels.iter().enumerate() {
            if l >= u.channel_mult.len() {
                bail!(
                    "unet.attention_levels[{i}] = {l}: there are only {} levels (0..{})",
                    u.channel_mult.len(),
                    u.channel_mult.len() - 1
                );
            }
        }
        let levels_down = u.channel_mult.len() - 1;
        if !self.latent_size().is_multiple_of(1 << levels_down) {
            bail!(
                "unet.channel_mult: {} levels halve the {}×{} latent {levels_down} times, which does not divide it",
                u.channel_mult.len(),
                self.latent_size(),
                self.latent_size()
            );
        }

        let t = &self.text;
        positive("text.context_dim", t.context_dim)?;
        if t.max_tokens < 3 {
            bail!(
                "text.max_tokens = {} must leave room for [CLS], [SEP] and a word",
                t.max_tokens
            );
        }
        if let Some(h) = t.hidden_size {
            positive("text.hidden_size", h)?;
        }
        match &t.encoder {
            TextEncoderSource::Pretrained(s) => {
                if s.trim().is_empty() {
                    bail!("text.encoder.pretrained is empty: give a folder or a hub id");
                }
            }
            TextEncoderSource::Random(r) => {
                positive("text.encoder.random.hidden_size", r.hidden_size)?;
                positive("text.encoder.random.layers", r.layers)?;
                positive("text.encoder.random.heads", r.heads)?;
                positive("text.encoder.random.intermediate_size", r.intermediate_size)?;
                if r.hidden_size % r.heads != 0 {
                    bail!(
                        "text.encoder.random.heads = {} does not divide hidden_size = {}",
                        r.heads,
                        r.hidden_size
                    );
                }
                if let Some(h) = t.hidden_size {
                    if h != r.hidden_size {
                        bail!("text.hidden_size = {h} differs from text.encoder.random.hidden_size = {}", r.hidden_size);
                    }
                }
            }
        }

        let f = &self.diffusion;
        positive("diffusion.timesteps", f.timesteps)?;
        if f.schedule != BetaSchedule::Cosine {
            in_range("diffusion.beta_start", f.beta_start, f64::MIN_POSITIVE, 1.0)?;
            in_range("diffusion.beta_end", f.beta_end, f64::MIN_POSITIVE, 1.0)?;
            if f.beta_end < f.beta_start {
                bail!(
                    "diffusion.beta_end = {} is below diffusion.beta_start = {}",
                    f.beta_end,
                    f.beta_start
                );
            }
        }

        validate_run("train_vae.run", &self.train_vae.run)?;
        validate_optimizer("train_vae.optimizer", &self.train_vae.optimizer)?;
        non_negative("train_vae.kl_weight", self.train_vae.kl_weight)?;
        validate_run("train_diffusion.run", &self.train_diffusion.run)?;
        validate_optimizer("train_diffusion.optimizer", &self.train_diffusion.optimizer)?;
        in_range(
            "train_diffusion.null_text_prob",
            self.train_diffusion.null_text_prob,
            0.0,
            1.0,
        )?;
        if let Some(gamma) = self.train_diffusion.snr_gamma {
            if !(gamma.is_finite() && gamma > 0.0) {
                bail!("train_diffusion.snr_gamma = {gamma} must be a positive number (5 is usual), or absent for the plain loss");
            }
        }
        let g = &self.train_diffusion.samples;
        if g.every > 0 {
            if g.prompts.is_empty() {
                bail!("train_diffusion.samples.prompts is empty: give prompts, or set samples.every to 0");
            }
            positive("train_diffusion.samples.per_prompt", g.per_prompt)?;
            positive("train_diffusion.samples.steps", g.steps)?;
            if g.steps > self.diffusion.timesteps {
                bail!(
                    "train_diffusion.samples.steps = {} exceeds diffusion.timesteps = {}",
                    g.steps,
                    self.diffusion.timesteps
                );
            }
            non_negative("train_diffusion.samples.guidance_scale", g.guidance_scale)?;
        }
        let ema = self.train_diffusion.ema_decay;
        if !(0.0..1.0).contains(&ema) {
            bail!("train_diffusion.ema_decay = {ema} must be in [0, 1)");
        }
        Ok(())
    }
}

/// A preset's text, or a file's text with its folder; `relative_to` anchors relative paths. Also
/// returns a description of the source for error messages.
fn read_source(
    name_or_path: &str,
    relative_to: Option<&Path>,
) -> Result<(String, Option<PathBuf>, String)> {
    if let Some((_, text)) = PRESETS.iter().find(|(name, _)| *name == name_or_path) {
        return Ok((
            text.to_string(),
            None,
            format!("built-in config `{name_or_path}`"),
        ));
    }
    let path = match relative_to {
        Some(dir) => dir.join(name_or_path),
        None => PathBuf::from(name_or_path),
    };
    let text = std::fs::read_to_string(&path).with_context(|| {
        let presets: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        format!(
            "cannot read config file {} (built-in presets: {})",
            path.display(),
            presets.join(", ")
        )
    })?;
    let dir = path.parent().map(Path::to_path_buf);
    Ok((text, dir, format!("config file {}", path.display())))
}

fn has_base(value: &serde_yaml::Value) -> bool {
    value.as_mapping().is_some_and(|m| m.contains_key("base"))
}

/// Replaces `base: X` by the contents of X with this mapping merged over it.
fn resolve_base(
    mut value: serde_yaml::Value,
    dir: Option<&Path>,
    depth: usize,
) -> Result<serde_yaml::Value> {
    let Some(base) = value.as_mapping_mut().and_then(|m| m.remove("base")) else {
        return Ok(value);
    };
    if depth >= 8 {
        bail!("base: more than 8 nested bases (a cycle?)");
    }
    let name = base
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("base: must be a preset name or a file path"))?;
    let (text, base_dir, origin) = read_source(name, dir)?;
    let parsed: serde_yaml::Value = serde_yaml::from_str(&text).with_context(|| origin.clone())?;
    let mut merged =
        resolve_base(parsed, base_dir.as_deref(), depth + 1).with_context(|| origin)?;
    merge(&mut merged, value, "");
    Ok(merged)
}

/// The keys whose value is an enum, written as a mapping with one key that names the variant
/// (`encoder: {random: {...}}`).
const VARIANT_KEYS: [&str; 1] = ["text.encoder"];

/// Deep merge of YAML mappings: `over` wins; anything but a mapping is replaced whole, and so is
/// an enum (`path` one of [`VARIANT_KEYS`]) whose variant `over` changes.
fn merge(base: &mut serde_yaml::Value, over: serde_yaml::Value, path: &str) {
    match (base, over) {
        (serde_yaml::Value::Mapping(b), serde_yaml::Value::Mapping(o))
            if !(VARIANT_KEYS.contains(&path) && o.keys().any(|k| !b.contains_key(k))) =>
        {
            for (k, v) in o {
                let key_path = match k.as_str() {
                    Some(name) if path.is_empty() => name.to_string(),
                    Some(name) => format!("{path}.{name}"),
                    None => String::new(),
                };
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v, &key_path),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn validate_run(key: &str, r: &RunConfig) -> Result<()> {
    positive(&format!("{key}.epochs"), r.epochs)?;
    positive(&format!("{key}.checkpoint_every"), r.checkpoint_every)?;
    positive(&format!("{key}.keep_last"), r.keep_last)?;
    positive(&format!("{key}.max_nonfinite"), r.max_nonfinite)?;
    positive(&format!("{key}.batch_size"), r.batch_size)?;
    positive(&format!("{key}.grad_accumulation"), r.grad_accumulation)?;
    Ok(())
}

fn validate_optimizer(key: &str, o: &OptimizerConfig) -> Result<()> {
    in_range(&format!("{key}.lr"), o.lr, f64::MIN_POSITIVE, 1.0)?;
    in_range(&format!("{key}.lr_min"), o.lr_min, 0.0, o.lr)?;
    non_negative(&format!("{key}.weight_decay"), o.weight_decay)?;
    in_range(&format!("{key}.beta1"), o.beta1, 0.0, 0.999_999)?;
    in_range(&format!("{key}.beta2"), o.beta2, 0.0, 0.999_999_999)?;
    in_range(&format!("{key}.eps"), o.eps, f64::MIN_POSITIVE, 1.0)?;
    non_negative(&format!("{key}.grad_clip"), o.grad_clip)?;
    Ok(())
}

fn positive(key: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("{key} = 0: must be positive");
    }
    Ok(())
}

fn non_negative(key: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{key} = {v}: must be a finite number ≥ 0");
    }
    Ok(())
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if !(v.is_finite() && v >= lo && v <= hi) {
        bail!("{key} = {v}: must be in [{lo}, {hi}]");
    }
    Ok(())
}

fn divisible_by_groups(key: &str, channels: usize, groups: usize, groups_key: &str) -> Result<()> {
    positive(key, channels)?;
    if !channels.is_multiple_of(groups) {
        bail!("{key} = {channels} is not divisible by {groups_key} = {groups}");
    }
    if channels == groups {
        // One channel per group normalises each channel alone and cancels the bias of the
        // convolution before it: that bias would never learn.
        bail!("{groups_key} = {groups} leaves one channel per group at {key} = {channels}; use fewer groups (at least 2 channels each)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_load_and_validate() {
        for (name, _) in PRESETS {
            Config::load(name).unwrap();
        }
    }

    #[test]
    fn every_config_file_loads_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                Config::load(path.to_str().unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                files += 1;
            }
        }
        assert!(files >= 7, "{files} config files in {}", dir.display());
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let text = PRESETS[1].1.replace("  mid_attention:", "  mid_atention:");
        let err = format!("{:#}", Config::from_yaml(&text).unwrap_err());
        assert!(err.contains("mid_atention"), "{err}");
    }

    #[test]
    fn bad_value_error_names_the_key() {
        let mut cfg = Config::load("paper").unwrap();
        cfg.unet.norm_groups = 7;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("unet.norm_groups = 7"), "{err}");
        let mut cfg = Config::load("paper").unwrap();
        cfg.train_diffusion.null_text_prob = 1.5;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("train_diffusion.null_text_prob = 1.5"),
            "{err}"
        );
        let mut cfg = Config::load("paper").unwrap();
        cfg.train_diffusion.snr_gamma = Some(0.0);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("train_diffusion.snr_gamma = 0"), "{err}");
        let mut cfg = Config::load("paper").unwrap();
        cfg.vae.decoder.blocks[1].up = false;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("up: true"), "{err}");
    }

    #[test]
    fn a_base_config_is_merged_under_the_file() {
        let cfg =
            Config::from_yaml("base: tiny\nunet:\n  channel_mult: [1, 2]\n  base_channels: 32\n")
                .unwrap();
        let tiny = Config::load("tiny").unwrap();
        assert_eq!(cfg.unet.base_channels, 32);
        assert_eq!(
            cfg.unet.head_dim, tiny.unet.head_dim,
            "untouched keys come from the base"
        );
        assert_eq!(cfg.vae, tiny.vae);
        let err = format!(
            "{:#}",
            Config::from_yaml("base: tiny\nunet:\n  colour: 3\n").unwrap_err()
        );
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn a_child_config_can_switch_the_text_encoders_kind() {
        // The base's `encoder: {pretrained: ...}` is replaced, not merged with `random`.
        let cfg = Config::from_yaml(
            "base: paper\ntext:\n  encoder:\n    random:\n      hidden_size: 768\n      layers: 1\n      heads: 12\n      intermediate_size: 3072\n      seed: 0\n",
        )
        .unwrap();
        let TextEncoderSource::Random(r) = &cfg.text.encoder else {
            panic!("{:?}", cfg.text.encoder)
        };
        assert_eq!((r.hidden_size, r.layers), (768, 1));
        assert_eq!(
            cfg.text.context_dim, 768,
            "the rest of `text` comes from the base"
        );
        // The same variant still merges key by key.
        let cfg =
            Config::from_yaml("base: tiny\ntext:\n  encoder:\n    random:\n      layers: 3\n")
                .unwrap();
        let TextEncoderSource::Random(r) = &cfg.text.encoder else {
            panic!("{:?}", cfg.text.encoder)
        };
        assert_eq!((r.layers, r.hidden_size), (3, 32));
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let err = format!("{:#}", Config::load("no/such/config.yaml").unwrap_err());
        assert!(err.contains("no/such/config.yaml"), "{err}");
    }
}
