//! AdamW with state that can be saved and restored, the learning-rate schedule, and global-norm
//! gradient clipping. (candle's AdamW keeps its moments private, so a run could not resume.)

use std::collections::HashMap;

use candle_core::{DType, Result, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::config::OptimizerConfig;
use crate::model::kernels::{cpu_slice, vectorized};

/// Decoupled-weight-decay Adam (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
/// 2019), with bias-corrected moments as in Kingma & Ba 2015.
pub struct AdamW {
    cfg: OptimizerConfig,
    /// The parameters in a fixed order (sorted by name), with their names.
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken.
    pub steps: u64,
}

impl AdamW {
    pub fn new(mut params: Vec<(String, Var)>, cfg: &OptimizerConfig) -> Result<Self> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            cfg: cfg.clone(),
            params,
            m,
            v,
            steps: 0,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with `grads` (one per parameter, in [`Self::params`] order) at rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "AdamW: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.steps += 1;
        let k = Coefficients::new(&self.cfg, self.steps, lr);
        for (i, ((_, p), g)) in self.params.iter().zip(grads).enumerate() {
            let fused = [p.as_tensor(), g, &self.m[i], &self.v[i]]
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
            let update = if fused { update_cpu } else { update_tensors };
            let (m, v) = update(p, g, (&self.m[i], &self.v[i]), &k)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<param>`, `v.<param>`), for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores the moments saved by [`Self::state`] and the step count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks {key}"))
                })?;
                if t.shape() != p.shape() {
                    candle_core::bail!(
                        "optimizer state {key}: shape {:?}, parameter {:?}",
                        t.shape(),
                        p.shape()
                    );
                }
                *slot = t.to_device(p.device())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// The scalars of one AdamW step, each applied as candle applies a scalar to a tensor.
struct Coefficients {
    b1: f64,
    c1: f64,
    b2: f64,
    c2: f64,
    r1: f64,
    r2: f64,
    eps: f64,
    decay: f64,
    lr: f64,
}

impl Coefficients {
    /// Those of optimizer step `step` (from 1) at rate `lr`, the moments bias-corrected.
    fn new(cfg: &OptimizerConfig, step: u64, lr: f64) -> Self {
        let (b1, b2) = (cfg.beta1, cfg.beta2);
        Self {
            b1,
            c1: 1.0 - b1,
            b2,
            c2: 1.0 - b2,
            r1: 1.0 / (1.0 - b1.powi(step as i32)),
            r2: 1.0 / (1.0 - b2.powi(step as i32)),
            eps: cfg.eps,
            decay: 1.0 - lr * cfg.weight_decay,
            lr,
        }
    }
}

/// One AdamW update of `p` by tensor ops (any device and dtype): sets `p`, returns the new
/// moments.
fn update_tensors(
    p: &Var,
    g: &Tensor,
    (m, v): (&Tensor, &Tensor),
    k: &Coefficients,
) -> Result<(Tensor, Tensor)> {
    let m = ((m * k.b1)? + (g * k.c1)?)?;
    let v = ((v * k.b2)? + (g.sqr()? * k.c2)?)?;
    let update = ((&m * k.r1)? / ((&v * k.r2)?.sqrt()? + k.eps)?)?;
    let decayed = (p.as_tensor() * k.decay)?;
    p.set(&(decayed - (update * k.lr)?)?)?;
    Ok((m, v))
}

/// [`update_tensors`] for an F32 parameter on the CPU, in one pass over its elements instead of
/// twelve tensor ops (each a pass over memory and a new tensor). The same arithmetic in the same
/// order as the tensor ops, so the same bits (a test).
fn update_cpu(
    p: &Var,
    g: &Tensor,
    (m, v): (&Tensor, &Tensor),
    k: &Coefficients,
) -> Result<(Tensor, Tensor)> {
    const CHUNK: usize = 1 << 14;
    // candle's `tensor * s` and `tensor + s` compute x · s + a in the tensor's dtype.
    let f = |s: f64| s as f32;
    let (b1, c1, b2, c2, r1, r2) = (f(k.b1), f(k.c1), f(k.b2), f(k.c2), f(k.r1), f(k.r2));
    let (eps, decay, lr) = (f(k.eps), f(k.decay), f(k.lr));
    if g.shape() != p.shape() {
        candle_core::bail!(
            "AdamW: gradient {:?} for a parameter {:?}",
            g.shape(),
            p.shape()
        )
    }
    let g = g.contiguous()?;
    let n = p.elem_count();
    // Written element by element below, not zeroed first.
    let [mut new_p, mut new_m, mut new_v] = [(); 3].map(|_| Vec::<f32>::with_capacity(n));
    {
        let guards = [p.as_tensor(), &g, m, v].map(|t| t.storage_and_layout());
        let mut inputs = Vec::with_capacity(4);
        for ((storage, layout), what) in guards.iter().zip(["parameter", "gradient", "m", "v"]) {
            let Storage::Cpu(storage) = &**storage else {
                candle_core::bail!("AdamW: the {what} is not on the CPU")
            };
            let x = cpu_slice::<f32>(storage, layout, "AdamW")?;
            if x.len() != n {
                candle_core::bail!("AdamW: the {what} has {} elements, not {n}", x.len());
            }
            inputs.push(x);
        }
        let [p, g, m, v] = inputs[..] else {
            unreachable!("four inputs")
        };
        new_p.spare_capacity_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(new_m.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
            .zip(new_v.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(j, ((np, nm), nv))| {
                let at = j * CHUNK..j * CHUNK + np.len();
                let (p, g, m, v) = (&p[at.clone()], &g[at.clone()], &m[at.clone()], &v[at]);
                vectorized!(|| {
                    for e in 0..np.len() {
                        let (p, g, m, v) = (p[e], g[e], m[e], v[e]);
                        let m = (m * b1 + 0.0) + (g * c1 + 0.0);
                        let v = (v * b2 + 0.0) + ((g * g) * c2 + 0.0);
                        let update = (m * r1 + 0.0) / ((v * r2 + 0.0).sqrt() * 1.0 + eps);
                        np[e].write((p * decay + 0.0) - (update * lr + 0.0));
                        nm[e].write(m);
                        nv[e].write(v);
                    }
                })
            });
    }
    // SAFETY: the chunks cover the n elements of each, and every one was written.
    unsafe {
        for new in [&mut new_p, &mut new_m, &mut new_v] {
            new.set_len(n)
        }
    }
    let (shape, dev) = (p.shape(), p.device());
    p.set(&Tensor::from_vec(new_p, shape, dev)?)?;
    Ok((
        Tensor::from_vec(new_m, shape, dev)?,
        Tensor::from_vec(new_v, shape, dev)?,
    ))
}

/// Linear warm-up to `lr`, then a half cosine down to `lr_min` at `total_steps` (SGDR, Loshchilov
/// & Hutter 2017, without restarts). `step` counts optimizer steps from 0.
pub fn learning_rate(cfg: &OptimizerConfig, step: u64, total_steps: u64) -> f64 {
    let warmup = cfg.warmup_steps as u64;
    if step < warmup {
        return cfg.lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total_steps.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The L2 norm of all gradients together (NaN or infinite if any element is).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales `grads`, whose global norm is `norm`, down to `max_norm` if above it (0: no clipping).
pub fn clip_to(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    if max_norm > 0.0 && norm > max_norm {
        let k = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * k)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn cfg() -> OptimizerConfig {
        OptimizerConfig {
            lr: 1e-3,
            lr_min: 1e-4,
            warmup_steps: 10,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }

    #[test]
    fn adamw_matches_a_hand_computed_step() -> Result<()> {
        // Two steps on a scalar, values worked out from the update rule by hand (f64):
        // θ0 = 1, g = 0.5 then -0.25, lr = 0.1, wd = 0.01.
        let p = Var::new(&[1f32], &Device::Cpu)?;
        let mut opt = AdamW::new(
            vec![("p".into(), p.clone())],
            &OptimizerConfig { lr: 0.1, ..cfg() },
        )?;
        opt.step(&[Tensor::new(&[0.5f32], &Device::Cpu)?], 0.1)?;
        // m̂ = 0.5, v̂ = 0.25 → update 1 (minus eps); θ = 1·(1 − 0.001) − 0.1 = 0.899
        let after1 = p.as_tensor().to_vec1::<f32>()?[0];
        assert!((after1 - 0.899).abs() < 1e-6, "{after1}");
        opt.step(&[Tensor::new(&[-0.25f32], &Device::Cpu)?], 0.1)?;
        // m = 0.9·0.05 + 0.1·(−0.25) = 0.02, m̂ = 0.02/0.19; v = 0.999·0.00025 + 0.001·0.0625
        // = 0.00031225, v̂ = v/0.001999; θ = 0.899·0.999 − 0.1·m̂/√v̂
        let m_hat = 0.02 / 0.19;
        let v_hat = 0.000_312_25 / (1.0 - 0.999f64.powi(2));
        let want = 0.899 * 0.999 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        let after2 = p.as_tensor().to_vec1::<f32>()?[0] as f64;
        assert!((after2 - want).abs() < 1e-6, "{after2} vs {want}");
        Ok(())
    }

    /// The one-pass CPU update gives the tensor ops' bits, over several chunks and two steps.
    #[test]
    fn one_pass_update_equals_the_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(3);
        let n = 40_000;
        let start = rng.randn(n, &dev)?;
        let (a, b) = (Var::from_tensor(&start)?, Var::from_tensor(&start)?);
        let zeros = || start.zeros_like();
        let mut moments = [(zeros()?, zeros()?), (zeros()?, zeros()?)];
        for step in 1..=2 {
            let g = (rng.randn(n, &dev)? * 0.1)?;
            let k = Coefficients::new(&cfg(), step, 3e-4);
            let [(ma, va), (mb, vb)] = &moments;
            let next_a = update_cpu(&a, &g, (ma, va), &k)?;
            let next_b = update_tensors(&b, &g, (mb, vb), &k)?;
            moments = [next_a, next_b];
        }
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
        };
        assert_eq!(bits(a.as_tensor())?, bits(b.as_tensor())?);
        assert_eq!(bits(&moments[0].0)?, bits(&moments[1].0)?);
        assert_eq!(bits(&moments[0].1)?, bits(&moments[1].1)?);
        assert_ne!(bits(a.as_tensor())?, bits(&start)?);
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let p = Var::new(&[1f32, 2.], &Device::Cpu)?;
        let mut a = AdamW::new(vec![("p".into(), p.clone())], &cfg())?;
        a.step(&[Tensor::new(&[0.1f32, -0.2], &Device::Cpu)?], 1e-3)?;
        let q = Var::new(&[1f32, 2.], &Device::Cpu)?;
        let mut b = AdamW::new(vec![("p".into(), q)], &cfg())?;
        b.load_state(&a.state(), a.steps)?;
        assert_eq!(b.steps, 1);
        assert_eq!(
            b.state()["m.p"].to_vec1::<f32>()?,
            a.state()["m.p"].to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let c = cfg();
        assert!((learning_rate(&c, 0, 110) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(&c, 9, 110) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&c, 10, 110) - 1e-3).abs() < 1e-12);
        assert!(
            (learning_rate(&c, 60, 110) - 5.5e-4).abs() < 1e-12,
            "half way: the mean"
        );
        assert!((learning_rate(&c, 110, 110) - 1e-4).abs() < 1e-12);
        assert!(
            (learning_rate(&c, 500, 110) - 1e-4).abs() < 1e-12,
            "stays at the floor"
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm() -> Result<()> {
        let mut g = vec![
            Tensor::new(&[3f32], &Device::Cpu)?,
            Tensor::new(&[4f32], &Device::Cpu)?.to_dtype(DType::F32)?,
        ];
        let norm = global_norm(&g)?;
        assert!((norm - 5.0).abs() < 1e-9);
        clip_to(&mut g, norm, 1.0)?;
        let a = g[0].to_vec1::<f32>()?[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
        Ok(())
    }
}
