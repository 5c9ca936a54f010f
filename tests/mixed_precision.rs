//! F16 training of the paper VAE on the CPU's emulated F16: the overflow that made `cxrgen bench
//! --train-vae --precision f16` fail on the GPU ("a non-finite vae loss on random inputs"), gone
//! on random images since the layers start as PyTorch's do, and still there on an all-white image,
//! where the loss-scale back-off handles it (docs/training.md).
//!
//! The paper VAE at 64×64 instead of 256×256: the same layers and weights, a sixteenth of the
//! arithmetic; its output layers' gradients (means over the pixels) are the same size.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{cxrgen, ok};
use cxrgen::config::{Config, Precision};
use cxrgen::model::scaler::INITIAL_SCALE;
use cxrgen::model::weights::{named_params, Trainable};
use cxrgen::model::{seeded_var_builder, Vae};
use cxrgen::rng::Rng;
use cxrgen::train::optim::global_norm;
use cxrgen::train::trainer::accumulate;
use cxrgen::train::{ImageSource, VaeObjective};

const CONFIG: &str = "base: paper
data:
  image_size: 64
train_vae:
  run:
    batch_size: 2
    grad_accumulation: 1
    grad_checkpointing: false
";

/// Pixels uniform in [-1, 1], as `cxrgen bench` feeds the VAE.
struct RandomImages;

impl ImageSource for RandomImages {
    fn images(&self, indices: &[usize], device: &Device) -> anyhow::Result<Tensor> {
        let mut rng = Rng::new(indices.len() as u64);
        Ok(rng.rand_uniform(-1.0, 1.0, (indices.len(), 1, 64, 64), device)?)
    }
}

fn config_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("vae64.yaml");
    std::fs::write(&path, CONFIG).unwrap();
    path.to_str().unwrap().to_string()
}

/// One step of the paper VAE (at 64×64, the weights `bench` draws) on a batch of two images.
struct VaeStep {
    cfg: Config,
    weights: VarMap,
}

impl VaeStep {
    fn new(dir: &tempfile::TempDir) -> Self {
        let cfg = Config::load(&config_file(dir)).unwrap();
        let weights = VarMap::new();
        // The weights `cxrgen bench --train-vae` draws.
        Vae::new(&cfg.vae, seeded_var_builder(&weights, 3, &Device::Cpu)).unwrap();
        Self { cfg, weights }
    }

    /// Gradients and the loss.
    fn grads(
        &self,
        images: &dyn ImageSource,
        precision: Precision,
        scale: f64,
    ) -> (Vec<Tensor>, f64) {
        let dev = Device::Cpu;
        let params = named_params(&self.weights);
        let trainable = Trainable::new(&self.weights, &dev).with_precision(precision);
        let objective = VaeObjective::new(&self.cfg.vae, trainable, images, 1e-4, vec![]);
        let (grads, logged) =
            accumulate(&objective, &params, &[vec![0, 1]], &mut Rng::new(7), scale)
                .unwrap()
                .expect("the loss itself is finite");
        (grads, logged[0].1)
    }

    /// (largest |gradient|, parameter) for every parameter, largest first.
    fn largest(&self, grads: &[Tensor]) -> Vec<(f32, String)> {
        let mut v: Vec<(f32, String)> = named_params(&self.weights)
            .into_iter()
            .zip(grads)
            .map(|((name, _), g)| {
                let m = g
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                (m, name)
            })
            .collect();
        v.sort_by(|a, b| b.0.total_cmp(&a.0));
        v
    }
}

fn close_norms(a: &[Tensor], b: &[Tensor]) {
    let (na, nb) = (global_norm(a).unwrap(), global_norm(b).unwrap());
    assert!((na - nb).abs() < 0.05 * nb, "{na} vs {nb}");
}

#[test]
fn f16_vae_gradients_fit_the_initial_loss_scale_on_random_images() {
    let dir = tempfile::tempdir().unwrap();
    let step = VaeStep::new(&dir);
    // Every F32 gradient times the initial scale is an F16 number. With candle-nn's
    // initialisation the decoder's output sat about one above the images, its bias's gradient
    // was about 2, and 2 · 65,536 is past F16's 65,504: the GPU's failure.
    let (g32, loss32) = step.grads(&RandomImages, Precision::F32, 1.0);
    let top = step.largest(&g32);
    eprintln!("largest F32 gradients: {:?}", &top[..3]);
    assert!(top[0].0 as f64 * INITIAL_SCALE < 65504.0, "{top:?}");
    let (g16, loss16) = step.grads(&RandomImages, Precision::F16, INITIAL_SCALE);
    assert!(
        (loss16 - loss32).abs() < 0.01 * loss32,
        "{loss16} vs {loss32}"
    );
    close_norms(&g16, &g32);
    assert!(g16.iter().all(|g| g.dtype() == DType::F32));
}

#[test]
fn f16_vae_gradients_overflow_at_the_initial_loss_scale_on_a_white_image_not_its_loss() {
    let dir = tempfile::tempdir().unwrap();
    let step = VaeStep::new(&dir);
    // The output bias's gradient is 2 · mean(reconstruction − image): about −2 against an
    // all-white image when the output starts near zero, as PyTorch's initialisation gives, and
    // past F16 at the initial scale.
    // Every pixel white (1): the extreme of a radiograph with large burnt-out areas.
    let white = Tensor::ones((2, 1, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let (g32, loss32) = step.grads(&white, Precision::F32, 1.0);
    let top = step.largest(&g32);
    eprintln!("largest F32 gradients: {:?}", &top[..3]);
    assert_eq!(top[0].1, "decoder.conv_out.bias");
    assert!(top[0].0 as f64 * INITIAL_SCALE > 65504.0, "{top:?}");

    // F16 at the initial scale: the loss is finite, its gradients are not.
    let (g16, loss16) = step.grads(&white, Precision::F16, INITIAL_SCALE);
    assert!(
        (loss16 - loss32).abs() < 0.01 * loss32,
        "{loss16} vs {loss32}"
    );
    assert!(!global_norm(&g16).unwrap().is_finite());
    let overflowed: Vec<String> = step
        .largest(&g16)
        .into_iter()
        .filter(|(m, _)| !m.is_finite())
        .map(|(_, n)| n)
        .collect();
    eprintln!("F16 gradients that overflow at scale {INITIAL_SCALE}: {overflowed:?}");
    assert!(
        overflowed.iter().any(|n| n == "decoder.conv_out.bias"),
        "{overflowed:?}"
    );

    // A quarter of the scale fits them, and then F16 agrees with F32.
    let (g16, _) = step.grads(&white, Precision::F16, INITIAL_SCALE / 4.0);
    close_norms(&g16, &g32);
}

#[test]
fn bench_trains_the_vae_in_f16_at_the_initial_loss_scale() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir);
    let out = ok(cxrgen(&[
        "bench",
        "--config",
        &config,
        "--device",
        "cpu",
        "--precision",
        "f16",
        "--batch-sizes",
        "1",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--train-vae",
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &report["training_vae"];
    assert!(
        row["ms_per_optimizer_step"].as_f64().unwrap().is_finite(),
        "{row}"
    );
    // It failed with the GPU's error before the loss-scale back-off, and needed 32,768 before
    // the layers started as PyTorch's do.
    assert_eq!(row["loss_scale"].as_f64().unwrap(), INITIAL_SCALE, "{row}");
}
