//! One training step of each stage on configs/tiny.yaml gives every trainable parameter of the
//! VAE, the U-Net and the text head a non-zero gradient. This catches candle ops that silently cut
//! the graph (fused LayerNorm, softmax_last_dim, ...), parameters that are built but never used,
//! and parameters whose gradient is zero by construction (a key-projection bias).

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use cxrgen::config::Config;
use cxrgen::diffusion::NoiseSchedule;
use cxrgen::model::{seeded_var_builder, TextEncoder, TextHead, UNet, Vae};
use cxrgen::rng::Rng;
use cxrgen::train::losses::{diffusion_loss, vae_loss};

/// Names of the Vars without a gradient, or with one that is zero up to rounding: a gradient that
/// is zero in exact arithmetic (a key bias, a bias cancelled by the GroupNorm after it) comes out
/// of float arithmetic as noise some 1e-8 below the others, so "zero" is judged against the
/// largest gradient of the network.
fn vars_without_gradient(varmap: &VarMap, grads: &candle_core::backprop::GradStore) -> Vec<String> {
    let data = varmap.data().lock().unwrap();
    let magnitude = |var: &Var| {
        grads.get(var.as_tensor()).map_or(0.0, |g| {
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
    };
    let largest = data.values().map(magnitude).fold(0.0f32, f32::max);
    assert!(largest > 0.0);
    let mut bad: Vec<String> = data
        .iter()
        .filter(|(_, var)| magnitude(var) <= 1e-5 * largest)
        .map(|(name, _)| name.clone())
        .collect();
    bad.sort();
    bad
}

#[test]
fn every_vae_parameter_gets_a_gradient() {
    let cfg = Config::load("tiny").unwrap();
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vae = Vae::new(&cfg.vae, seeded_var_builder(&varmap, 1, &dev)).unwrap();
    let mut rng = Rng::new(2);
    let s = cfg.data.image_size;
    let images = rng.rand_uniform(-1.0, 1.0, (2, 1, s, s), &dev).unwrap();
    let loss = vae_loss(&vae, &images, cfg.train_vae.kl_weight, &mut rng).unwrap();
    assert!(loss.total.to_scalar::<f32>().unwrap().is_finite());
    let grads = loss.total.backward().unwrap();
    let n = varmap.all_vars().len();
    assert!(n > 40, "{n} VAE parameters");
    let bad = vars_without_gradient(&varmap, &grads);
    assert!(bad.is_empty(), "no gradient for {bad:?}");
}

#[test]
fn every_unet_and_text_head_parameter_gets_a_gradient() {
    let cfg = Config::load("tiny").unwrap();
    let dev = Device::Cpu;
    let text = TextEncoder::load(&cfg.text, &dev).unwrap();
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 3, &dev);
    let unet = UNet::new(
        &cfg.unet,
        cfg.vae.latent_channels,
        cfg.text.context_dim,
        vb.pp("unet"),
    )
    .unwrap();
    let head = TextHead::new(text.hidden_size(), cfg.text.context_dim, vb.pp("text_head")).unwrap();
    // Reports of different lengths, so that the mask hides padding in one of them.
    let (hidden, mask) = text
        .encode(
            &[
                "No acute cardiopulmonary abnormality.",
                "Large right pleural effusion with blunting of the costophrenic angle.",
            ],
            &dev,
        )
        .unwrap();
    let mut rng = Rng::new(4);
    let z = cfg.latent_size();
    let latents: Tensor = rng.randn((2, cfg.vae.latent_channels, z, z), &dev).unwrap();
    let schedule = NoiseSchedule::new(&cfg.diffusion);
    let noise = rng.randn(latents.shape(), &dev).unwrap();
    let loss = diffusion_loss(
        &unet,
        &head,
        &schedule,
        &latents,
        &[10, 900],
        &noise,
        &hidden,
        &mask,
    )
    .unwrap();
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let grads = loss.backward().unwrap();
    let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    assert!(names.iter().any(|n| n.starts_with("text_head.")));
    assert!(names.iter().filter(|n| n.contains("attn2.to_k")).count() >= 3);
    let bad = vars_without_gradient(&varmap, &grads);
    assert!(bad.is_empty(), "no gradient for {bad:?}");
}
