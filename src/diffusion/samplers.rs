//! Samplers: DDPM, DDIM (η ≥ 0) and DPM-Solver++(2M), one function each with one signature
//! ([`Sampler`], as in k-diffusion): a new sampler is a new function and a [`SamplerKind`].
//!
//! All randomness comes from one generator per image (`seed + i` for image i), so that an image
//! depends only on its own seed and settings, not on the batch it was generated in.

use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::schedule::NoiseSchedule;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Ancestral sampling with the DDPM posterior variance (Ho et al. 2020): DDIM with η = 1.
    Ddpm,
    /// Song et al., "Denoising Diffusion Implicit Models", 2021.
    Ddim,
    /// Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    /// Models", 2022: second-order multistep, data prediction.
    DpmPp2m,
}

impl SamplerKind {
    /// The name `--sampler` takes and the images' metadata records.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim => "ddim",
            SamplerKind::DpmPp2m => "dpmpp-2m",
        }
    }

    /// The function that samples this way.
    pub fn sampler(self) -> Sampler {
        match self {
            SamplerKind::Ddpm => ddpm,
            SamplerKind::Ddim => ddim,
            SamplerKind::DpmPp2m => dpmpp_2m,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerOptions {
    pub kind: SamplerKind,
    pub steps: usize,
    /// DDIM's η (0: deterministic); ignored by the other samplers.
    pub eta: f64,
}

/// `steps` timesteps of `t_max` in descending order, evenly spaced and ending at the noisiest one
/// ("trailing" spacing, Lin et al., "Common Diffusion Noise Schedules and Sample Steps Are
/// Flawed", 2024): 1000 steps in 10 → 999, 899, …, 99.
pub fn timesteps(t_max: usize, steps: usize) -> Vec<usize> {
    let steps = steps.clamp(1, t_max);
    (0..steps)
        .map(|i| {
            let t = (t_max as f64 - i as f64 * t_max as f64 / steps as f64).round() as usize;
            t.saturating_sub(1)
        })
        .collect()
}

/// One DDIM step: x_prev = c_x · x_t + c_eps · ε + σ · z.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimStep {
    pub c_x: f64,
    pub c_eps: f64,
    pub sigma: f64,
}

/// DDIM's step from ᾱ_t to ᾱ_prev (1 for the final step to the data), Song et al. eq. 12 with
/// σ_t = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev).
pub fn ddim_step(alpha_t: f64, alpha_prev: f64, eta: f64) -> DdimStep {
    let sigma =
        eta * ((1.0 - alpha_prev) / (1.0 - alpha_t)).sqrt() * (1.0 - alpha_t / alpha_prev).sqrt();
    let c_x = (alpha_prev / alpha_t).sqrt();
    let c_eps = (1.0 - alpha_prev - sigma * sigma).max(0.0).sqrt()
        - (alpha_prev * (1.0 - alpha_t) / alpha_t).sqrt();
    DdimStep { c_x, c_eps, sigma }
}

/// One DPM-Solver++(2M) step from s to t: x_t = c_x · x_s + c_d · (w_cur · x0_s + w_prev · x0_prev).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpmStep {
    pub c_x: f64,
    pub c_d: f64,
    pub w_cur: f64,
    pub w_prev: f64,
}

fn lambda(alpha_bar: f64) -> f64 {
    0.5 * (alpha_bar / (1.0 - alpha_bar)).ln()
}

/// The step from ᾱ_s to ᾱ_t, second order when the previous step's ᾱ is given (Lu et al. 2022,
/// Algorithm 2): h = λ_t − λ_s, r = h_prev / h, D = (1 + 1/2r) x0_s − (1/2r) x0_prev.
pub fn dpmpp_2m_step(alpha_s: f64, alpha_t: f64, alpha_prev: Option<f64>) -> DpmStep {
    let h = lambda(alpha_t) - lambda(alpha_s);
    let c_x = ((1.0 - alpha_t) / (1.0 - alpha_s)).sqrt();
    let c_d = -alpha_t.sqrt() * ((-h).exp() - 1.0);
    match alpha_prev {
        None => DpmStep {
            c_x,
            c_d,
            w_cur: 1.0,
            w_prev: 0.0,
        },
        Some(ap) => {
            let r = (lambda(alpha_s) - lambda(ap)) / h;
            DpmStep {
                c_x,
                c_d,
                w_cur: 1.0 + 1.0 / (2.0 * r),
                w_prev: -1.0 / (2.0 * r),
            }
        }
    }
}

/// A noise predictor: ε̂(x_t, t) for a batch at one timestep.
pub trait Denoiser {
    /// `x`: [B, C, h, w] → ε̂ [B, C, h, w]
    fn eps(&mut self, x: &Tensor, t: usize) -> Result<Tensor>;
}

/// Clips the clean sample a denoiser implies to a range and returns the noise that matches the
/// clipped sample: x̂0 = clamp((x − √(1−ᾱ) ε̂)/√ᾱ), ε' = (x − √ᾱ x̂0)/√(1−ᾱ). DDPM clips x̂0 to
/// the data range [−1, 1] (Ho et al. 2020); for latents the range is that of the training latents.
/// At high noise levels an imperfect ε̂ implies a wildly wrong x̂0, and deterministic samplers
/// then drift far off the data; the clip keeps them on it.
pub struct ClampX0<'a, D: Denoiser> {
    pub inner: D,
    pub alphas_cumprod: &'a [f64],
    pub range: (f32, f32),
}

impl<D: Denoiser> Denoiser for ClampX0<'_, D> {
    fn eps(&mut self, x: &Tensor, t: usize) -> Result<Tensor> {
        let eps = self.inner.eps(x, t)?;
        let a = self.alphas_cumprod[t];
        let x0 =
            ((x - (eps * (1.0 - a).sqrt())?)? / a.sqrt())?.clamp(self.range.0, self.range.1)?;
        (x - (x0 * a.sqrt())?)? / (1.0 - a).sqrt()
    }
}

/// Gaussian noise for a batch, image i drawn from its own generator.
pub struct ImageNoise {
    rngs: Vec<Rng>,
    /// Per-image shape (C, h, w).
    shape: (usize, usize, usize),
    device: Device,
}

impl ImageNoise {
    /// Image i's generator is seeded with `seeds[i]`.
    pub fn new(seeds: &[u64], shape: (usize, usize, usize), device: &Device) -> Self {
        Self {
            rngs: seeds.iter().map(|&s| Rng::new(s)).collect(),
            shape,
            device: device.clone(),
        }
    }

    /// [B, C, h, w]
    pub fn draw(&mut self) -> Result<Tensor> {
        let (c, h, w) = self.shape;
        let parts = self
            .rngs
            .iter_mut()
            .map(|r| r.randn((1, c, h, w), &self.device))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

/// A sampler: from pure noise to a clean latent, calling `on_step(i)` after step i. Every
/// sampler has this signature (as in k-diffusion), so that adding one is adding a function.
pub type Sampler = fn(
    &mut dyn Denoiser,
    &NoiseSchedule,
    &SamplerOptions,
    &mut ImageNoise,
    &mut dyn FnMut(usize),
) -> Result<Tensor>;

/// Runs the sampler `opts` names.
pub fn sample(
    denoiser: &mut dyn Denoiser,
    schedule: &NoiseSchedule,
    opts: &SamplerOptions,
    noise: &mut ImageNoise,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    (opts.kind.sampler())(denoiser, schedule, opts, noise, on_step)
}

/// DDIM with `opts.eta`.
pub fn ddim(
    denoiser: &mut dyn Denoiser,
    schedule: &NoiseSchedule,
    opts: &SamplerOptions,
    noise: &mut ImageNoise,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    ddim_with_eta(denoiser, schedule, opts.steps, opts.eta, noise, on_step)
}

/// DDPM's ancestral sampling: DDIM with η = 1.
pub fn ddpm(
    denoiser: &mut dyn Denoiser,
    schedule: &NoiseSchedule,
    opts: &SamplerOptions,
    noise: &mut ImageNoise,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    ddim_with_eta(denoiser, schedule, opts.steps, 1.0, noise, on_step)
}

fn ddim_with_eta(
    denoiser: &mut dyn Denoiser,
    schedule: &NoiseSchedule,
    steps: usize,
    eta: f64,
    noise: &mut ImageNoise,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    let ac = &schedule.alphas_cumprod;
    let ts = timesteps(schedule.timesteps(), steps);
    let mut x = noise.draw()?;
    for (i, &t) in ts.iter().enumerate() {
        let alpha_next = ts.get(i + 1).map_or(1.0, |&n| ac[n]);
        let eps = denoiser.eps(&x, t)?;
        let c = ddim_step(ac[t], alpha_next, eta);
        x = ((&x * c.c_x)? + (eps * c.c_eps)?)?;
        if c.sigma > 0.0 {
            x = (x + (noise.draw()? * c.sigma)?)?;
        }
        on_step(i);
    }
    Ok(x)
}

/// DPM-Solver++(2M): each step's clean estimate and the previous one's, second order after the
/// first step.
pub fn dpmpp_2m(
    denoiser: &mut dyn Denoiser,
    schedule: &NoiseSchedule,
    opts: &SamplerOptions,
    noise: &mut ImageNoise,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    let ac = &schedule.alphas_cumprod;
    let ts = timesteps(schedule.timesteps(), opts.steps);
    let mut x = noise.draw()?;
    let mut x0_prev: Option<Tensor> = None;
    for (i, &t) in ts.iter().enumerate() {
        let eps = denoiser.eps(&x, t)?;
        let x0 = ((&x - (eps * (1.0 - ac[t]).sqrt())?)? / ac[t].sqrt())?;
        x = match ts.get(i + 1) {
            // The last step lands on the data: σ = 0, so x = x0 (first order).
            None => x0.clone(),
            Some(&n) => {
                let prev = if i > 0 { Some(ac[ts[i - 1]]) } else { None };
                let c = dpmpp_2m_step(ac[t], ac[n], prev.filter(|_| x0_prev.is_some()));
                let d = match &x0_prev {
                    Some(p) if c.w_prev != 0.0 => ((&x0 * c.w_cur)? + (p * c.w_prev)?)?,
                    _ => x0.clone(),
                };
                ((&x * c.c_x)? + (d * c.c_d)?)?
            }
        };
        x0_prev = Some(x0);
        on_step(i);
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BetaSchedule, DiffusionConfig};

    fn paper_schedule() -> NoiseSchedule {
        NoiseSchedule::new(&DiffusionConfig {
            timesteps: 1000,
            schedule: BetaSchedule::Linear,
            beta_start: 1e-4,
            beta_end: 0.02,
        })
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9 * (1.0 + b.abs()), "{a} vs {b}");
    }

    #[test]
    fn trailing_timesteps() {
        assert_eq!(
            timesteps(1000, 10),
            [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        let t = timesteps(1000, 50);
        assert_eq!((t[0], t[1], t[48], t[49]), (999, 979, 39, 19));
        assert_eq!(timesteps(1000, 1000).last(), Some(&0));
    }

    // Reference values: an independent plain-Python computation of the papers' formulas on the
    // paper's schedule (linear 1e-4 → 0.02, T = 1000; ᾱ by a running product), double precision:
    // DDIM c_x = √(ᾱ_prev/ᾱ_t), c_eps = √(1 − ᾱ_prev − σ²) − √ᾱ_prev √(1 − ᾱ_t)/√ᾱ_t,
    // σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev); DPM-Solver++ with λ = log(√ᾱ/√(1 − ᾱ)).
    #[test]
    fn ddim_coefficients_match_reference() {
        let ac = paper_schedule().alphas_cumprod;
        let c = ddim_step(ac[999], ac[899], 0.0);
        close(c.c_x, 2.6113342203163783);
        close(c.c_eps, -1.611419137707375);
        assert_eq!(c.sigma, 0.0);
        let c = ddim_step(ac[999], ac[899], 1.0);
        close(c.c_eps, -2.228433186484965);
        close(c.sigma, 0.9236622453948246);
        let c = ddim_step(ac[99], 1.0, 0.0);
        close(c.c_x, 1.0558430991747256);
        close(c.c_eps, -0.33882834898350744);
        let c = ddim_step(ac[499], ac[479], 0.5);
        close(c.c_x, 1.1040624096696638);
        close(c.c_eps, -0.13235582890900277);
        close(c.sigma, 0.20992258126674487);
    }

    #[test]
    fn dpmpp_2m_coefficients_match_reference() {
        let ac = paper_schedule().alphas_cumprod;
        let c = dpmpp_2m_step(ac[999], ac[899], None);
        close(c.c_x, 0.9998825645581174);
        close(c.c_d, 0.010237259225945731);
        assert_eq!((c.w_cur, c.w_prev), (1.0, 0.0));
        let c = dpmpp_2m_step(ac[899], ac[799], Some(ac[999]));
        close(c.c_x, 0.9993711874800212);
        close(c.c_d, 0.022563015819842807);
        close(c.w_cur, 1.447438620979036);
        close(c.w_prev, -0.4474386209790359);
    }

    /// A denoiser that knows the answer: for data that is always `target`, the ideal ε̂ is
    /// (x_t − √ᾱ_t · target)/√(1 − ᾱ_t). Every sampler must then land on the target.
    struct Oracle {
        target: Tensor,
        ac: Vec<f64>,
    }

    impl Denoiser for Oracle {
        fn eps(&mut self, x: &Tensor, t: usize) -> Result<Tensor> {
            let a = self.ac[t];
            (x - (&self.target * a.sqrt())?)? / (1.0 - a).sqrt()
        }
    }

    #[test]
    fn every_sampler_recovers_the_data_from_an_ideal_denoiser() -> Result<()> {
        let schedule = paper_schedule();
        let dev = Device::Cpu;
        let target = Tensor::new(&[0.5f32, -1.0, 0.25, 0.0], &dev)?.reshape((1, 1, 2, 2))?;
        for kind in [SamplerKind::Ddim, SamplerKind::Ddpm, SamplerKind::DpmPp2m] {
            let mut oracle = Oracle {
                target: target.clone(),
                ac: schedule.alphas_cumprod.clone(),
            };
            let mut noise = ImageNoise::new(&[7], (1, 2, 2), &dev);
            let opts = SamplerOptions {
                kind,
                steps: 20,
                eta: 0.0,
            };
            let x = sample(&mut oracle, &schedule, &opts, &mut noise, &mut |_| {})?;
            let err = (x - &target)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-3, "{}: {err}", kind.name());
        }
        Ok(())
    }

    #[test]
    fn clamp_x0_returns_the_noise_of_the_clipped_sample() -> Result<()> {
        let schedule = paper_schedule();
        let dev = Device::Cpu;
        // The oracle for data 3.0 implies x̂0 = 3; clipped to [−1, 1] it must imply x̂0 = 1.
        let target = Tensor::new(&[3f32], &dev)?.reshape((1, 1, 1, 1))?;
        let mut clamped = ClampX0 {
            inner: Oracle {
                target: target.clone(),
                ac: schedule.alphas_cumprod.clone(),
            },
            alphas_cumprod: &schedule.alphas_cumprod,
            range: (-1.0, 1.0),
        };
        let x = Tensor::new(&[0.7f32], &dev)?.reshape((1, 1, 1, 1))?;
        let t = 300;
        let eps = clamped.eps(&x, t)?;
        let a = schedule.alphas_cumprod[t];
        let x0 = ((&x - (eps * (1.0 - a).sqrt())?)? / a.sqrt())?;
        let v = x0.flatten_all()?.to_vec1::<f32>()?[0];
        assert!((v - 1.0).abs() < 1e-4, "{v}");
        Ok(())
    }

    #[test]
    fn image_noise_does_not_depend_on_the_batch() -> Result<()> {
        let dev = Device::Cpu;
        let batch = ImageNoise::new(&[10, 11, 12], (2, 3, 3), &dev).draw()?;
        let alone = ImageNoise::new(&[11], (2, 3, 3), &dev).draw()?;
        let diff = (batch.narrow(0, 1, 1)? - alone)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}

#[cfg(test)]
mod convergence {
    //! Against an exact solution: for Gaussian data the ideal denoiser is linear and the
    //! probability-flow ODE maps x_T to x_0 = μ + s (x_T − √ᾱ_T μ)/√(ᾱ_T s² + 1 − ᾱ_T).
    use super::*;
    use crate::config::{BetaSchedule, DiffusionConfig};

    /// The ideal denoiser for data N(μ, s²) per element: E[x0 | x_t] is linear in x_t.
    struct Gaussian {
        mu: f64,
        s: f64,
        ac: Vec<f64>,
    }

    impl Denoiser for Gaussian {
        fn eps(&mut self, x: &Tensor, t: usize) -> Result<Tensor> {
            let (a, var) = (self.ac[t].sqrt(), 1.0 - self.ac[t]);
            let gain = a * self.s * self.s / (a * a * self.s * self.s + var);
            let x0 = (((x - a * self.mu)? * gain)? + self.mu)?;
            (x - (x0 * a)?)? / var.sqrt()
        }
    }

    /// Largest error of `kind` at `steps` against the exact ODE solution.
    fn error(kind: SamplerKind, steps: usize) -> Result<f32> {
        let schedule = NoiseSchedule::new(&DiffusionConfig {
            timesteps: 1000,
            schedule: BetaSchedule::Linear,
            beta_start: 1e-4,
            beta_end: 0.02,
        });
        let ac = schedule.alphas_cumprod.clone();
        let (mu, s) = (0.3, 0.5);
        let dev = Device::Cpu;
        let x_t = ImageNoise::new(&[1], (1, 4, 4), &dev).draw()?;
        let t0 = timesteps(1000, steps)[0];
        let (a, var) = (ac[t0].sqrt(), 1.0 - ac[t0]);
        let exact = (((&x_t - a * mu)? * (s / (a * a * s * s + var).sqrt()))? + mu)?;
        let mut ideal = Gaussian { mu, s, ac };
        let opts = SamplerOptions {
            kind,
            steps,
            eta: 0.0,
        };
        let mut noise = ImageNoise::new(&[1], (1, 4, 4), &dev);
        let x = sample(&mut ideal, &schedule, &opts, &mut noise, &mut |_| {})?;
        (x - exact)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    #[test]
    fn dpm_solver_20_beats_ddim_50_on_a_smooth_problem() -> Result<()> {
        let ddim: Vec<f32> = [20, 50, 100, 200]
            .iter()
            .map(|&n| error(SamplerKind::Ddim, n))
            .collect::<Result<_>>()?;
        let dpm: Vec<f32> = [10, 20, 40]
            .iter()
            .map(|&n| error(SamplerKind::DpmPp2m, n))
            .collect::<Result<_>>()?;
        // DDIM is first order: halving the step halves the error.
        assert!((1.7..2.3).contains(&(ddim[2] / ddim[3])), "{ddim:?}");
        // DPM-Solver++(2M) converges faster: 20 steps beat DDIM's 50, 40 beat DDIM's 200.
        assert!(dpm[1] < ddim[1], "DPM 20 {} vs DDIM 50 {}", dpm[1], ddim[1]);
        assert!(
            dpm[2] < ddim[3] / 4.0,
            "DPM 40 {} vs DDIM 200 {}",
            dpm[2],
            ddim[3]
        );
        assert!(dpm[0] / dpm[1] > 3.0, "{dpm:?}");
        Ok(())
    }
}
