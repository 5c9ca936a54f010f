//! F16 training of the paper VAE on random images, on the CPU's emulated F16: the overflow that
//! made `cxrgen bench --train-vae --precision f16` fail on the GPU ("a non-finite vae loss on
//! random inputs"), and the loss-scale back-off that fixes it (docs/training.md).
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

#[test]
fn f16_vae_gradients_overflow_at_the_initial_loss_scale_not_its_loss() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::load(&config_file(&dir)).unwrap();
    let dev = Device::Cpu;
    let weights = VarMap::new();
    // The weights `cxrgen bench --train-vae` draws.
    Vae::new(&cfg.vae, seeded_var_builder(&weights, 3, &dev)).unwrap();
    let params = named_params(&weights);
    let batch = vec![vec![0, 1]];
    let grads = |precision, scale| {
        let trainable = Trainable::new(&weights, &dev).with_precision(precision);
        let objective = VaeObjective::new(&cfg.vae, trainable, &RandomImages, 1e-4, vec![]);
        let (grads, logged) = accumulate(&objective, &params, &batch, &mut Rng::new(7), scale)
            .unwrap()
            .expect("the F16 loss itself is finite");
        (grads, logged[0].1)
    };
    let largest = |grads: &[Tensor]| -> Vec<(f32, &str)> {
        let mut v: Vec<(f32, &str)> = params
            .iter()
            .zip(grads)
            .map(|((name, _), g)| {
                let m = g
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                (m, name.as_str())
            })
            .collect();
        v.sort_by(|a, b| b.0.total_cmp(&a.0));
        v
    };

    // In F32 the largest gradient is above 65,504 / 65,536: scaled by the initial loss scale it
    // cannot be an F16 number. It is the decoder output's bias, 2 · mean(reconstruction − image):
    // the freshly initialised decoder's output is offset from the images by about one.
    let (g32, loss32) = grads(Precision::F32, 1.0);
    let top = largest(&g32);
    eprintln!("largest F32 gradients: {:?}", &top[..3]);
    assert_eq!(top[0].1, "decoder.conv_out.bias");
    assert!(top[0].0 as f64 * INITIAL_SCALE > 65504.0, "{top:?}");

    // F16 at the initial scale: the loss is finite, its gradients are not.
    let (g16, loss16) = grads(Precision::F16, INITIAL_SCALE);
    assert!(
        (loss16 - loss32).abs() < 0.01 * loss32,
        "{loss16} vs {loss32}"
    );
    assert!(!global_norm(&g16).unwrap().is_finite());
    let overflowed: Vec<&str> = largest(&g16)
        .into_iter()
        .filter(|(m, _)| !m.is_finite())
        .map(|(_, n)| n)
        .collect();
    eprintln!("F16 gradients that overflow at scale {INITIAL_SCALE}: {overflowed:?}");
    assert!(
        overflowed.contains(&"decoder.conv_out.bias"),
        "{overflowed:?}"
    );

    // A quarter of the scale fits them, and then F16 agrees with F32.
    let (g16, _) = grads(Precision::F16, INITIAL_SCALE / 4.0);
    let norm16 = global_norm(&g16).unwrap();
    let norm32 = global_norm(&g32).unwrap();
    assert!(
        (norm16 - norm32).abs() < 0.05 * norm32,
        "{norm16} vs {norm32}"
    );
    assert!(g16.iter().all(|g| g.dtype() == DType::F32));
}

#[test]
fn bench_trains_the_vae_in_f16_by_backing_off_the_loss_scale() {
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
    let scale = row["loss_scale"].as_f64().unwrap();
    assert!((1.0..INITIAL_SCALE).contains(&scale), "{row}");
}
