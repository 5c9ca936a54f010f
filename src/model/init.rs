//! Seeded parameter creation: a `VarBuilder` backend that creates every new `Var` from our own
//! [`Rng`], following candle's initialisation hints, so that the same config and seed always give
//! the same initial weights (candle's CPU generator cannot be seeded).

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::rng::Rng;

struct SeededVarMap {
    varmap: VarMap,
    rng: Mutex<Rng>,
}

impl SeededVarMap {
    fn init_tensor(&self, shape: &Shape, init: Init, device: &Device) -> Result<Tensor> {
        let mut rng = self.rng.lock().expect("rng lock poisoned");
        match init {
            Init::Const(c) => Tensor::full(c as f32, shape, device),
            Init::Uniform { lo, up } => rng.rand_uniform(lo, up, shape, device),
            Init::Randn { mean, stdev } => rng.randn(shape, device)?.affine(stdev, mean),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        rng.rand_uniform(-bound, bound, shape, device)
                    }
                    NormalOrUniform::Normal => rng.randn(shape, device)?.affine(std, 0.),
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(var) = self.varmap.data().lock().expect("varmap lock").get(name) {
            if var.shape() != &s {
                candle_core::bail!("shape mismatch for {name}: {s:?} <> {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let var = Var::from_tensor(&self.init_tensor(&s, h, dev)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        self.varmap
            .data()
            .lock()
            .expect("varmap lock")
            .insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: a trainable parameter needs a shape and an initialisation")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("varmap lock")
            .contains_key(name)
    }
}

/// A `VarBuilder` that adds new trainable F32 parameters to `varmap`, initialised from `seed`.
/// Parameters already in `varmap` (loaded from a checkpoint) are returned as they are.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        rng: Mutex::new(Rng::new(seed)),
    };
    VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
}

/// Total number of scalar parameters held by `varmap`.
pub fn count_params(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}
