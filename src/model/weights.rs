//! The trained weights as the networks see them: named parameters, F32 master weights cast to
//! the compute precision (tracked for training, detached for sampling), weights read from
//! safetensors bytes, fresh U-Net and text-head weights, and the weights being trained
//! ([`Trainable`]: precision and gradient checkpointing).

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
    weights_of(varmap, dtype, device, |v| v.as_tensor().clone())
}

/// `varmap`'s weights for inference: detached, so that nothing computed from them records a
/// graph. (Sampled from [`compute_weights`], every denoising step's latents carried the graphs of
/// all the steps before it, and sampling memory grew with the number of steps: issue 13's
/// "batch 8 takes 10 GB".)
pub fn frozen_weights(varmap: &VarMap, dtype: DType, device: &Device) -> VarBuilder<'static> {
    weights_of(varmap, dtype, device, |v| v.as_tensor().detach())
}

fn weights_of(
    varmap: &VarMap,
    dtype: DType,
    device: &Device,
    take: impl Fn(&Var) -> Tensor,
) -> VarBuilder<'static> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), take(v)))
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
        compute_weights(&self.varmap, self.dtype, &self.device)
    }

    /// The weights cast to `dtype` and detached ([`frozen_weights`]), for what only runs the
    /// networks forward: nothing computed from them keeps its activations for a backward pass.
    pub fn frozen(&self, dtype: DType) -> VarBuilder<'static> {
        frozen_weights(&self.varmap, dtype, &self.device)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_weights_record_no_graph() -> Result<()> {
        let (varmap, dev) = (VarMap::new(), Device::Cpu);
        varmap.get((2, 3), "w", candle_nn::Init::Const(0.5), DType::F32, &dev)?;
        let x = Tensor::ones((4, 2), DType::F32, &dev)?;
        let tracked = compute_weights(&varmap, DType::F32, &dev).get((2, 3), "w")?;
        let frozen = frozen_weights(&varmap, DType::F32, &dev).get((2, 3), "w")?;
        // Training needs the graph back to the Var; sampling must not build one, or each step's
        // output holds on to every step before it.
        assert!(x.matmul(&tracked)?.track_op());
        assert!(!x.matmul(&frozen)?.track_op());
        assert_eq!(frozen.to_vec2::<f32>()?, tracked.to_vec2::<f32>()?);
        Ok(())
    }
}
