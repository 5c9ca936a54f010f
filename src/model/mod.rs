//! The three networks: the VAE, the U-Net and the text encoder, the layers they share, and what
//! training them in mixed precision needs (weights.rs, scaler.rs, checkpointing.rs); and the
//! alignment classifier that `eval` judges generated images with (classifier.rs).

pub mod affine;
pub mod attention;
pub mod checkpointing;
pub mod classifier;
pub mod conv;
pub mod init;
pub mod kernels;
pub mod latents;
pub mod layers;
pub mod precomputed;
pub mod resnet;
pub mod scaler;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use init::{count_params, seeded_var_builder};
pub use text::{TextEncoder, TextHead};
pub use unet::UNet;
pub use vae::Vae;

use anyhow::Result;
use candle_core::Device;
use candle_nn::VarMap;
use serde::Serialize;

use crate::config::{Config, TextEncoderSource};
use text::{BertConfig, BertFiles};

/// The U-Net (`unet.`) and the text head (`text_head.`) of a config, from `vb`; `text_hidden` is
/// the frozen encoder's width.
pub fn diffusion_networks(
    cfg: &Config,
    text_hidden: usize,
    vb: candle_nn::VarBuilder,
) -> candle_core::Result<(UNet, TextHead)> {
    let unet = UNet::new(
        &cfg.unet,
        cfg.vae.latent_channels,
        cfg.text.context_dim,
        vb.pp("unet"),
    )?;
    let head = TextHead::new(text_hidden, cfg.text.context_dim, vb.pp("text_head"))?;
    Ok((unet, head))
}

/// Parameter counts of the networks a config describes.
#[derive(Debug, Clone, Serialize)]
pub struct ParamCounts {
    pub vae_params: usize,
    pub unet_params: usize,
    /// The trainable text head; None when the encoder's hidden size is unknown here (give
    /// `text.hidden_size` or make its config.json available).
    pub text_trainable_params: Option<usize>,
    /// The frozen BERT (embeddings and layers, no pooler); None when its config.json is not on
    /// this machine.
    pub text_frozen_params: Option<usize>,
}

/// Builds each trainable network on the CPU and counts its parameters; reads only the text
/// encoder's config.json, and only when it is already on this machine.
pub fn param_counts(cfg: &Config) -> Result<ParamCounts> {
    let dev = Device::Cpu;
    let count = |build: &dyn Fn(candle_nn::VarBuilder) -> candle_core::Result<()>| {
        let vm = VarMap::new();
        build(seeded_var_builder(&vm, 0, &dev)).map(|_| count_params(&vm))
    };
    let vae_params = count(&|vb| Vae::new(&cfg.vae, vb).map(drop))?;
    let unet_params = count(&|vb| {
        UNet::new(&cfg.unet, cfg.vae.latent_channels, cfg.text.context_dim, vb).map(drop)
    })?;
    let bert = match &cfg.text.encoder {
        TextEncoderSource::Random(r) => {
            let vocab = tokenizer::BUILTIN_VOCAB.lines().count();
            Some(BertConfig::random(r, vocab))
        }
        TextEncoderSource::Pretrained(source) => BertFiles::local_config(source)
            .map(|p| BertConfig::from_file(&p))
            .transpose()?,
    };
    let hidden = cfg
        .text
        .hidden_size
        .or(bert.as_ref().map(|b| b.hidden_size));
    let text_trainable_params = match hidden {
        Some(h) => Some(count(&|vb| {
            TextHead::new(h, cfg.text.context_dim, vb).map(drop)
        })?),
        None => None,
    };
    Ok(ParamCounts {
        vae_params,
        unet_params,
        text_trainable_params,
        text_frozen_params: bert.map(|b| b.param_count()),
    })
}
