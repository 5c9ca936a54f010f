//! Noise schedules: β_t and ᾱ_t = Π(1 − β_s), and the forward (noising) process.

use candle_core::{Result, Tensor};

use crate::config::{BetaSchedule, DiffusionConfig};

#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    pub fn new(cfg: &DiffusionConfig) -> Self {
        let t = cfg.timesteps;
        let linspace = |a: f64, b: f64| -> Vec<f64> {
            if t == 1 {
                return vec![a];
            }
            (0..t)
                .map(|i| a + (b - a) * i as f64 / (t - 1) as f64)
                .collect()
        };
        let betas = match cfg.schedule {
            // DDPM (Ho et al. 2020): the paper's 1e-4 → 0.02.
            BetaSchedule::Linear => linspace(cfg.beta_start, cfg.beta_end),
            // Stable Diffusion's: linear in sqrt(β).
            BetaSchedule::ScaledLinear => linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt())
                .into_iter()
                .map(|b| b * b)
                .collect(),
            // Nichol & Dhariwal 2021, s = 0.008, β capped at 0.999. Float division throughout:
            // candle's and diffusers-rs's versions divide integers and are wrong.
            BetaSchedule::Cosine => {
                let f = |i: usize| {
                    let x = (i as f64 / t as f64 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2;
                    x.cos().powi(2)
                };
                (0..t).map(|i| (1.0 - f(i + 1) / f(i)).min(0.999)).collect()
            }
        };
        let alphas_cumprod = betas
            .iter()
            .scan(1.0, |acc, b| {
                *acc *= 1.0 - b;
                Some(*acc)
            })
            .collect();
        Self {
            betas,
            alphas_cumprod,
        }
    }

    pub fn timesteps(&self) -> usize {
        self.betas.len()
    }

    /// The signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of timestep `t`.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε with one timestep per sample.
    /// `x0`, `noise`: [B, ...]; `t`: B timesteps → [B, ...]
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        let b = x0.dim(0)?;
        if t.len() != b {
            candle_core::bail!("add_noise: {} timesteps for a batch of {b}", t.len());
        }
        let mut shape = vec![b];
        shape.resize(x0.rank(), 1);
        let coef = |f: fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = t
                .iter()
                .map(|&i| f(self.alphas_cumprod[i]) as f32)
                .collect();
            Tensor::from_vec(v, shape.as_slice(), x0.device())?.to_dtype(x0.dtype())
        };
        let signal = coef(f64::sqrt)?;
        let sigma = coef(|a| (1.0 - a).sqrt())?;
        x0.broadcast_mul(&signal)? + noise.broadcast_mul(&sigma)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: BetaSchedule, start: f64, end: f64) -> NoiseSchedule {
        NoiseSchedule::new(&DiffusionConfig {
            timesteps: 1000,
            schedule: kind,
            beta_start: start,
            beta_end: end,
        })
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12 + 1e-9 * b.abs(), "{a} vs {b}");
    }

    // Reference values from a plain-Python computation written from the papers' formulas
    // (linspace by a + (b − a)·i/(n − 1); ᾱ by a running product of 1 − β; cosine by
    // f(t) = cos²((t/T + 0.008)/1.008 · π/2), β_t = min(1 − f(t+1)/f(t), 0.999)), double precision.
    // They agree with known figures: DDPM-linear ᾱ_999 ≈ 4.04e-5, SD's scaled-linear ᾱ_999 ≈ 0.00466.
    #[test]
    fn linear_schedule_matches_reference() {
        let s = schedule(BetaSchedule::Linear, 1e-4, 0.02);
        close(s.betas[1], 0.00011991991991991993);
        close(s.betas[499], 0.01004004004004004);
        close(s.alphas_cumprod[0], 0.9999);
        close(s.alphas_cumprod[499], 0.07858724288177821);
        close(s.alphas_cumprod[999], 4.0358297653756754e-05);
    }

    #[test]
    fn scaled_linear_schedule_matches_reference() {
        let s = schedule(BetaSchedule::ScaledLinear, 0.00085, 0.012);
        close(s.betas[1], 0.0008546986554056862);
        close(s.alphas_cumprod[499], 0.27766965045646763);
        close(s.alphas_cumprod[999], 0.004660098513077234);
    }

    #[test]
    fn cosine_schedule_matches_reference() {
        let s = schedule(BetaSchedule::Cosine, 0.0, 0.0);
        close(s.betas[0], 4.128422482196914e-05);
        close(s.alphas_cumprod[1], 0.9999125759273678);
        close(s.alphas_cumprod[499], 0.4938435904406382);
        close(s.betas[999], 0.999);
        close(s.alphas_cumprod[999], 2.4287669070348567e-09);
    }

    #[test]
    fn add_noise_uses_each_samples_timestep() -> Result<()> {
        let s = schedule(BetaSchedule::Linear, 1e-4, 0.02);
        let dev = candle_core::Device::Cpu;
        let x0 = Tensor::ones((2, 1, 2, 2), candle_core::DType::F32, &dev)?;
        let noise = Tensor::zeros((2, 1, 2, 2), candle_core::DType::F32, &dev)?;
        let xt = s
            .add_noise(&x0, &noise, &[0, 999])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!((xt[0] as f64 - 0.9999f64.sqrt()).abs() < 1e-6);
        assert!((xt[7] as f64 - 4.0358297653756754e-05f64.sqrt()).abs() < 1e-6);
        Ok(())
    }
}
