//! The trained weights as the networks see them: named parameters, F32 master weights cast to
//! the compute precision, weights read from safetensors bytes, fresh U-Net and text-head weights,
//! and the weights being trained ([`Trainable`]: precision and gradient checkpointing).

use std::collections::HashMap;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::checkpointing::GradCheckpoint;
use super::{diffusion_networks, seeded_var_builder};
use crate::config::{Config, Precision, RunConfig};

/// The trainable parameters of `varmap`, sorted by name.
pub fn named_params(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The master weights in `varmap` cast to `dtype`, as the VarBuilder a micro-batch builds its
/// networks from. The casts are part of the graph, so their backward pass hands F32 gradients
/// to the master weights; in F32 the "casts" are the Vars themselves.
pub fn compute_weights(varmap: &VarMap, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    VarBuilder::from_tensors(tensors, dtype, device)
}

/// Weights from the bytes of a safetensors file, computing in `dtype`.
pub fn from_bytes(bytes: &[u8], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let tensors = candle_core::safetensors::load_buffer(bytes, device)?;
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// Fills `varmap` with freshly initialised U-Net (`unet.`) and text-head (`text_head.`) weights;
/// `text_hidden` is the frozen encoder's width.
pub fn init_diffusion_weights(
    cfg: &Config,
    text_hidden: usize,
    varmap: &VarMap,
    seed: u64,
    device: &Device,
) -> Result<()> {
    diffusion_networks(cfg, text_hidden, seeded_var_builder(varmap, seed, device))?;
    Ok(())
}

/// The F32 master weights being trained, and how the networks compute with them: in a
/// precision (the master weights stay F32), with or without gradient checkpointing over them.
pub struct Trainable {
    varmap: VarMap,
    device: Device,
    dtype: DType,
    checkpoint: Option<GradCheckpoint>,
}

impl Trainable {
    /// The weights in `varmap`, computing in F32 without gradient checkpointing.
    pub fn new(varmap: &VarMap, device: &Device) -> Self {
        Self {
            varmap: varmap.clone(),
            device: device.clone(),
            dtype: DType::F32,
            checkpoint: None,
        }
    }

    /// Computes in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.dtype = precision.dtype();
        self
    }

    /// Gradient checkpointing over all the weights when `run` asks for it.
    pub fn with_checkpointing(mut self, run: &RunConfig) -> Result<Self> {
        if run.grad_checkpointing {
            self.checkpoint = Some(GradCheckpoint::new(self.varmap.all_vars())?);
        }
        Ok(self)
    }

    /// The weights as the networks read them, in the compute precision ([`compute_weights`]).
    pub fn compute(&self) -> VarBuilder<'static> {
        self.in_dtype(self.dtype)
    }

    /// The weights cast to `dtype`.
    pub fn in_dtype(&self, dtype: DType) -> VarBuilder<'static> {
        compute_weights(&self.varmap, dtype, &self.device)
    }

    /// The gradient checkpointing the networks are to use.
    pub fn checkpoint(&self) -> Option<GradCheckpoint> {
        self.checkpoint.clone()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `loss.backward()` plus the gradients gradient-checkpointed segments collected.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        if let Some(c) = &self.checkpoint {
            c.merge_into(&mut grads)?;
        }
        Ok(grads)
    }
}
