//! Exponential moving average of the trained weights; sampling uses it by default.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

pub struct Ema {
    decay: f64,
    /// Shadow copies, in the order of the parameters given to [`Ema::new`].
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    pub fn new(params: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = params
            .iter()
            .map(|(n, p)| Ok((n.clone(), p.as_tensor().detach().copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { decay, shadow })
    }

    /// shadow ← d·shadow + (1 − d)·param, with d = min(decay, (1 + step)/(10 + step)) so that the
    /// average is not dominated by the initial weights early on (as in TensorFlow's EMA with
    /// num_updates).
    pub fn update(&mut self, params: &[(String, Var)], step: u64) -> Result<()> {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for ((_, s), (_, p)) in self.shadow.iter_mut().zip(params) {
            *s = ((&*s * d)? + (p.as_tensor().detach() * (1.0 - d))?)?;
        }
        Ok(())
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.shadow.iter().cloned().collect()
    }

    pub fn load(&mut self, saved: &HashMap<String, Tensor>) -> Result<()> {
        for (name, s) in self.shadow.iter_mut() {
            let t = saved
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("EMA state lacks {name}")))?;
            *s = t.to_device(s.device())?;
        }
        Ok(())
    }
}
