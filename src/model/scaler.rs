//! Dynamic loss scaling for F16 training (Micikevicius et al., "Mixed Precision Training", 2018):
//! the loss is multiplied by `scale` before the backward pass so that small gradients survive
//! F16, and the gradients divided by it afterwards. A step whose gradients overflowed is skipped
//! and the scale halved; after `GROWTH_INTERVAL` clean steps in a row it is doubled. The
//! constants are PyTorch's `GradScaler` defaults.

use serde::{Deserialize, Serialize};

pub const INITIAL_SCALE: f64 = 65536.0;
pub const GROWTH_INTERVAL: u64 = 2000;

/// The scaler's state; saved in checkpoints so that a resumed run scales as the original did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: INITIAL_SCALE,
            clean_steps: 0,
        }
    }
}

impl LossScaler {
    /// Records a step whose gradients were finite (`true`, the step is taken) or overflowed.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.clean_steps += 1;
            if self.clean_steps >= GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            self.scale /= 2.0;
            self.clean_steps = 0;
        }
    }

    /// Whether an overflow at this scale can still be a scaling artefact. Below 1 the loss is no
    /// longer amplified, so non-finite gradients there are the model's own.
    pub fn can_back_off(&self) -> bool {
        self.scale >= 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_and_doubles_after_a_clean_interval() {
        let mut s = LossScaler::default();
        s.update(false);
        assert_eq!(s.scale, INITIAL_SCALE / 2.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!(s.scale, INITIAL_SCALE / 2.0);
        s.update(true);
        assert_eq!((s.scale, s.clean_steps), (INITIAL_SCALE, 0));
        // An overflow restarts the count.
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.clean_steps), (INITIAL_SCALE / 2.0, 0));
        for _ in 0..17 {
            s.update(false);
        }
        assert!(!s.can_back_off(), "{}", s.scale);
    }
}
