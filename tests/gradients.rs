//! One training step of each stage on configs/tiny.yaml gives every trainable parameter of the
//! VAE, the U-Net and the text head a non-zero gradient, and gradient checkpointing gives the same
//! gradients as plain backprop. The first catches candle ops that silently cut the graph (fused
//! LayerNorm, softmax_last_dim, ...), parameters that are built but never used, and parameters
//! whose gradient is zero by construction (a key-projection bias).

mod common;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use cxrgen::config::Config;
use cxrgen::diffusion::LatentDiffusion;
use cxrgen::model::checkpointing::GradCheckpoint;
use cxrgen::model::latents::LatentStats;
use cxrgen::model::{seeded_var_builder, TextEncoder, TextHead, UNet, Vae};
use cxrgen::rng::Rng;
use cxrgen::train::losses::vae_loss;

/// Names of the Vars without a gradient, or with one that is zero up to rounding: a gradient that
/// is zero in exact arithmetic (a key bias, a bias cancelled by the GroupNorm after it) comes out
/// of float arithmetic as noise some 1e-8 below the others, so "zero" is judged against the
/// largest gradient of the network.
fn vars_without_gradient(varmap: &VarMap, grads: &GradStore) -> Vec<String> {
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

/// The tiny VAE and a batch of two images.
struct VaeCase {
    cfg: Config,
    varmap: VarMap,
    vae: Vae,
    images: Tensor,
}

impl VaeCase {
    fn new() -> Self {
        let cfg = Config::load("tiny").unwrap();
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vae = Vae::new(&cfg.vae, seeded_var_builder(&varmap, 1, &dev)).unwrap();
        let s = cfg.data.image_size;
        let images = Rng::new(2)
            .rand_uniform(-1.0, 1.0, (2, 1, s, s), &dev)
            .unwrap();
        Self {
            cfg,
            varmap,
            vae,
            images,
        }
    }

    fn loss(&self) -> Tensor {
        vae_loss(
            &self.vae,
            &self.images,
            self.cfg.train_vae.kl_weight,
            &mut Rng::new(3),
        )
        .unwrap()
        .total
    }
}

/// The tiny U-Net with its text head, two reports of different lengths (so that the mask hides
/// padding in one), latents, noise and timesteps.
struct UnetCase {
    varmap: VarMap,
    unet: UNet,
    head: TextHead,
    diffusion: LatentDiffusion,
    hidden: Tensor,
    mask: Tensor,
    latents: Tensor,
    noise: Tensor,
}

impl UnetCase {
    fn new() -> Self {
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
        let head =
            TextHead::new(text.hidden_size(), cfg.text.context_dim, vb.pp("text_head")).unwrap();
        let reports = [
            "No acute cardiopulmonary abnormality.",
            "Large right pleural effusion with blunting of the costophrenic angle.",
        ];
        let (hidden, mask) = text.encode(&reports, &dev).unwrap();
        let mut rng = Rng::new(4);
        let z = cfg.latent_size();
        let latents = rng.randn((2, cfg.vae.latent_channels, z, z), &dev).unwrap();
        let noise = rng.randn(latents.shape(), &dev).unwrap();
        let diffusion = LatentDiffusion::new(&cfg, LatentStats::UNTRAINED);
        Self {
            varmap,
            unet,
            head,
            diffusion,
            hidden,
            mask,
            latents,
            noise,
        }
    }

    fn loss(&self) -> Tensor {
        self.weighted_loss(&[10, 900], None, 0..2).0
    }

    /// The loss of the samples `rows` at timesteps `t`, and their unweighted MSE.
    fn weighted_loss(
        &self,
        t: &[usize],
        snr_gamma: Option<f64>,
        rows: std::ops::Range<usize>,
    ) -> (Tensor, Tensor) {
        let rows_of = |x: &Tensor| x.narrow(0, rows.start, rows.len()).unwrap();
        self.diffusion
            .loss(
                &self.unet,
                &self.head,
                &rows_of(&self.latents),
                t,
                &rows_of(&self.noise),
                &rows_of(&self.hidden),
                &rows_of(&self.mask),
                snr_gamma,
            )
            .unwrap()
    }
}

#[test]
fn every_vae_parameter_gets_a_gradient() {
    let case = VaeCase::new();
    let loss = case.loss();
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let grads = loss.backward().unwrap();
    let n = case.varmap.all_vars().len();
    assert!(n > 40, "{n} VAE parameters");
    let bad = vars_without_gradient(&case.varmap, &grads);
    assert!(bad.is_empty(), "no gradient for {bad:?}");
}

#[test]
fn min_snr_weighting_scales_each_samples_error_by_its_own_weight() {
    let case = UnetCase::new();
    let value = |t: &Tensor| f64::from(t.to_scalar::<f32>().unwrap());
    // Each sample's own squared error, from a batch of one (the U-Net treats samples apart).
    let e0 = value(&case.weighted_loss(&[10], None, 0..1).1);
    let e1 = value(&case.weighted_loss(&[900], None, 1..2).1);
    let gamma = 5.0;
    let (loss, mse) = case.weighted_loss(&[10, 900], Some(gamma), 0..2);
    // tiny.yaml's linear schedule (β from 1e-4 to 0.02 over 1000 steps): SNR ≈ 455 at t = 10
    // (weight γ / SNR), ≈ 3e-4 at 900 (weight 1).
    let snr10 = {
        let a: f64 = (0..=10)
            .map(|i| 1.0 - (1e-4 + i as f64 / 999.0 * (0.02 - 1e-4)))
            .product();
        a / (1.0 - a)
    };
    let want = (gamma / snr10 * e0 + e1) / 2.0;
    assert!(
        (value(&loss) - want).abs() < 1e-5 * want.max(1.0),
        "{} vs {want}",
        value(&loss)
    );
    assert!(
        (value(&mse) - (e0 + e1) / 2.0).abs() < 1e-5,
        "the MSE stays unweighted"
    );
    // Without γ the loss is the plain MSE.
    let (plain, mse) = case.weighted_loss(&[10, 900], None, 0..2);
    assert_eq!(value(&plain), value(&mse));
    assert!(value(&loss) < value(&plain));
}

#[test]
fn every_unet_and_text_head_parameter_gets_a_gradient() {
    let case = UnetCase::new();
    let loss = case.loss();
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let grads = loss.backward().unwrap();
    let names: Vec<String> = case.varmap.data().lock().unwrap().keys().cloned().collect();
    assert!(names.iter().any(|n| n.starts_with("text_head.")));
    assert!(names.iter().filter(|n| n.contains("attn2.to_k")).count() >= 3);
    let bad = vars_without_gradient(&case.varmap, &grads);
    assert!(bad.is_empty(), "no gradient for {bad:?}");
}

/// Plain and checkpointed gradients of every parameter agree to 1e-6.
fn assert_same_gradients(varmap: &VarMap, plain: &GradStore, checkpointed: &GradStore) {
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let a = plain
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no plain gradient"));
        let b = checkpointed
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no checkpointed gradient"));
        let diff = common::max_abs_diff(a, b);
        assert!(diff <= 1e-6, "{name}: gradients differ by {diff}");
    }
}

#[test]
fn checkpointed_gradients_equal_plain_gradients() {
    let mut vae = VaeCase::new();
    let plain = vae.loss().backward().unwrap();
    let ckpt = GradCheckpoint::new(vae.varmap.all_vars()).unwrap();
    vae.vae.set_checkpointing(Some(ckpt.clone()));
    let mut checkpointed = vae.loss().backward().unwrap();
    ckpt.merge_into(&mut checkpointed).unwrap();
    assert_same_gradients(&vae.varmap, &plain, &checkpointed);

    // The text head's gradients reach it only through checkpointed cross-attention blocks.
    let mut unet = UnetCase::new();
    let plain = unet.loss().backward().unwrap();
    let ckpt = GradCheckpoint::new(unet.varmap.all_vars()).unwrap();
    unet.unet.set_checkpointing(Some(ckpt.clone()));
    let mut checkpointed = unet.loss().backward().unwrap();
    ckpt.merge_into(&mut checkpointed).unwrap();
    assert_same_gradients(&unet.varmap, &plain, &checkpointed);
}
