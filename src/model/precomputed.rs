//! The forward half of custom ops with a hand-written backward pass: the output is computed
//! beforehand by ordinary tensor ops on detached inputs, and the op's forward only hands it over,
//! so that the graph records the op (and its inputs) instead of every intermediate.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, Result, Shape, Storage, Tensor};

/// An output waiting for its op's forward; taken once.
pub struct Precomputed {
    op: &'static str,
    output: Mutex<Option<Tensor>>,
}

impl Precomputed {
    /// `y`, for the op named `op` (named in errors).
    pub fn new(op: &'static str, y: Tensor) -> Self {
        Self {
            op,
            output: Mutex::new(Some(y)),
        }
    }

    /// A copy of the output's storage, of the backend `pick` selects.
    fn take<S: BackendStorage>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let y = self
            .output
            .lock()
            .expect("precomputed output lock")
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{} op applied twice", self.op)))?;
        let (storage, layout) = y.storage_and_layout();
        match pick(&storage) {
            Some(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            None => candle_core::bail!(
                "{} op: the output is on another device than the inputs",
                self.op
            ),
        }
    }

    /// For `cpu_fwd`.
    pub fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        self.take(|s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    /// For `cuda_fwd`.
    pub fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        self.take(|s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }
}
