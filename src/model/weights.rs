//! The trained weights as the networks see them: named parameters, F32 master weights cast to
//! the compute precision, weights read from safetensors bytes, fresh U-Net and text-head weights,
//! and gradient checkpointing over them.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::checkpointing::GradCheckpoint;
use super::{diffusion_networks, seeded_var_builder};
use crate::config::{Config, RunConfig};

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

/// Gradient checkpointing over all of `varmap`'s parameters when the run asks for it.
pub fn checkpointing_for(run: &RunConfig, varmap: &VarMap) -> Result<Option<GradCheckpoint>> {
    Ok(if run.grad_checkpointing {
        Some(GradCheckpoint::new(varmap.all_vars())?)
    } else {
        None
    })
}

/// `loss.backward()` plus the gradients gradient-checkpointed segments collected.
pub fn backward_with(loss: &Tensor, ckpt: Option<&GradCheckpoint>) -> Result<GradStore> {
    let mut grads = loss.backward()?;
    if let Some(c) = ckpt {
        c.merge_into(&mut grads)?;
    }
    Ok(grads)
}
