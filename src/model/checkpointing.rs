//! Gradient checkpointing (Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016):
//! a segment's activations are freed right after its forward pass and recomputed during the
//! backward pass. candle has no such facility; this is built on a custom op.
//!
//! `apply(x, f)` runs `f` on a detached copy of `x` and keeps only the detached output, then ties
//! that output back into the graph through a custom op whose inputs are `x` and a one-element
//! "anchor" (so that the op is recorded even when nothing upstream tracks gradients). The op's
//! backward re-runs `f` on a tracked copy of `x`, back-propagates `sum(y · ∂L/∂y)`, returns
//! `∂L/∂x`, and puts the gradients of the model's parameters (those of the segment, and those that
//! reach it through captured tensors such as the time embedding or the text context) into a side
//! store. [`GradCheckpoint::merge_into`] adds them to the main gradient store after
//! `loss.backward()`. Gradients are detached as they are taken so that no recomputed segment
//! stays alive. Segments must be deterministic: recomputation must give the same values.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, TensorId, Var};

/// A segment: output from input, with whatever else it needs captured.
pub type Segment = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

type SideStore = Arc<Mutex<HashMap<TensorId, Tensor>>>;

/// Shared by all checkpointed segments of a model during one training step.
#[derive(Clone)]
pub struct GradCheckpoint {
    params: Arc<Vec<Var>>,
    side: SideStore,
    anchor: Var,
}

impl std::fmt::Debug for GradCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GradCheckpoint({} parameters)", self.params.len())
    }
}

impl GradCheckpoint {
    /// `params`: every trainable parameter whose gradient a segment's recomputation may reach.
    pub fn new(params: Vec<Var>) -> Result<Self> {
        let device = params
            .first()
            .map_or(candle_core::Device::Cpu, |p| p.device().clone());
        Ok(Self {
            params: Arc::new(params),
            side: Arc::new(Mutex::new(HashMap::new())),
            anchor: Var::zeros(1, candle_core::DType::F32, &device)?,
        })
    }

    /// `f(x)`, with the activations inside `f` recomputed in the backward pass instead of kept.
    pub fn apply(&self, x: &Tensor, f: Segment) -> Result<Tensor> {
        let y = f(&x.detach())?.detach().contiguous()?;
        y.apply_op3(
            x,
            self.anchor.as_tensor(),
            Recompute {
                f,
                params: self.params.clone(),
                side: self.side.clone(),
            },
        )
    }

    /// Adds the parameter gradients collected by recomputed segments to `grads` and empties the
    /// side store for the next step.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let mut side = self.side.lock().expect("side store lock");
        for p in self.params.iter() {
            if let Some(g) = side.remove(&p.id()) {
                let total = match grads.remove(p.as_tensor()) {
                    Some(main) => (main + g)?,
                    None => g,
                };
                grads.insert(p.as_tensor(), total);
            }
        }
        side.clear();
        Ok(())
    }
}

/// `f(x)`, through `ckpt` when there is one.
pub fn run(ckpt: Option<&GradCheckpoint>, x: &Tensor, f: Segment) -> Result<Tensor> {
    match ckpt {
        Some(c) => c.apply(x, f),
        None => f(x),
    }
}

struct Recompute {
    f: Segment,
    params: Arc<Vec<Var>>,
    side: SideStore,
}

/// The forward of the op is a copy of its first input (the segment's output, computed outside).
fn copy_output<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("checkpointed segment output must be contiguous");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "grad-checkpoint"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_output(s1, l1)
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_output(s1, l1)
    }

    fn bwd(
        &self,
        _output: &Tensor,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x_in = Var::from_tensor(&x.detach())?;
        let y = (self.f)(x_in.as_tensor())?;
        let surrogate = (y * grad_res.detach())?.sum_all()?;
        let grads = surrogate.backward()?;
        let grad_x = grads.get(x_in.as_tensor()).map(|g| g.detach());
        let mut side = self.side.lock().expect("side store lock");
        for p in self.params.iter() {
            if let Some(g) = grads.get(p.as_tensor()) {
                let g = g.detach();
                let total = match side.remove(&p.id()) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                side.insert(p.id(), total);
            }
        }
        Ok((None, grad_x, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};
    use candle_nn::{linear, VarBuilder, VarMap};

    #[test]
    fn checkpointed_chain_has_the_plain_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev);
        let l1 = linear(4, 4, vb.pp("l1"))?;
        let l2 = linear(4, 4, vb.pp("l2"))?;
        let side_input = Var::new(&[[0.5f32, -0.5, 1.0, 2.0]], &dev)?; // like a time embedding
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [0., 1., 0., 1.]], &dev)?;
        let run = |ckpt: Option<&GradCheckpoint>| -> Result<GradStore> {
            let seg = {
                let (l1, s) = (l1.clone(), side_input.as_tensor().clone());
                Arc::new(move |h: &Tensor| l1.forward(h)?.tanh()?.broadcast_add(&s)) as Segment
            };
            // The first segment's input tracks nothing: only the anchor records the op.
            let h = match ckpt {
                Some(c) => c.apply(&x, seg)?,
                None => seg(&x)?,
            };
            let loss = l2.forward(&h)?.sqr()?.sum_all()?;
            let mut g = loss.backward()?;
            if let Some(c) = ckpt {
                c.merge_into(&mut g)?;
            }
            Ok(g)
        };
        let plain = run(None)?;
        let mut params = vm.all_vars();
        params.push(side_input.clone());
        let ckpt = GradCheckpoint::new(params.clone())?;
        let checkpointed = run(Some(&ckpt))?;
        for p in &params {
            let a = plain.get(p.as_tensor()).expect("plain gradient");
            let b = checkpointed
                .get(p.as_tensor())
                .expect("checkpointed gradient");
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
        }
        Ok(())
    }
}
