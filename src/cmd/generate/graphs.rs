//! `generate`'s guided step replayed from CUDA graphs ([`crate::cuda_graph`]): one graph per
//! shape of the step's inputs (a batch size and a prompt's token count), captured when a batch
//! first needs it. The replayed step runs the eager step's kernels, so the images are the same.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::cuda_graph::CapturedStep;
use crate::diffusion::{guided_step, Conditioning};
use crate::model::UNet;

/// Graphs kept at once, the least recently used dropped first: a prompt's full batches and its
/// last, smaller batch each have one, and the next prompt with as many tokens reuses both.
pub const KEPT: usize = 2;

pub struct StepGraphs<'a> {
    unet: &'a UNet,
    guidance: f64,
    /// The least recently used first.
    kept: Vec<CapturedStep<'a>>,
    /// A capture failed: every batch after it is sampled eagerly.
    failed: bool,
}

impl<'a> StepGraphs<'a> {
    pub fn new(unet: &'a UNet, guidance: f64) -> Self {
        Self {
            unet,
            guidance,
            kept: Vec::new(),
            failed: false,
        }
    }

    /// The captured guided step for a batch of `batch` latents of shape `latent` (C, h, w) on
    /// `device` under `cond`, captured now if no graph kept has these shapes. None when a capture
    /// has failed: the caller samples eagerly, and the failure is said once on stderr.
    pub fn step_for(
        &mut self,
        cond: &Conditioning,
        batch: usize,
        (c, h, w): (usize, usize, usize),
        device: &Device,
    ) -> Result<Option<&CapturedStep<'a>>> {
        if self.failed {
            return Ok(None);
        }
        let x = Tensor::zeros((batch, c, h, w), DType::F32, device)?;
        let inputs = cond.step_inputs(&x, 0)?;
        if let Some(i) = self.kept.iter().position(|g| g.accepts(&inputs)) {
            let used = self.kept.remove(i);
            self.kept.push(used);
            return Ok(self.kept.last());
        }
        if self.kept.len() == KEPT {
            // Before the capture, so that the dropped graph's memory can serve the new one.
            self.kept.remove(0);
        }
        match CapturedStep::new(guided_step(self.unet, self.guidance), &inputs) {
            Ok(step) => {
                self.kept.push(step);
                Ok(self.kept.last())
            }
            Err(e) => {
                let why = e.to_string().replace('\n', " ");
                eprintln!("warning: the sampling step could not be captured as a CUDA graph ({why}); sampling without graphs (the same images, slower; --no-cuda-graph skips the attempt)");
                self.failed = true;
                self.kept.clear();
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    use crate::config::Config;
    use crate::diffusion::{CapturedGuided, Denoiser, LatentDiffusion, Networks};
    use crate::model::latents::LatentStats;
    use crate::model::{seeded_var_builder, TextEncoder, Vae};

    #[test]
    fn one_step_per_shape_the_least_recently_used_dropped() -> Result<()> {
        let cfg = Config::load("tiny")?;
        let dev = Device::Cpu;
        let text = TextEncoder::load(&cfg.text, &dev)?;
        let vae = Vae::new(&cfg.vae, seeded_var_builder(&VarMap::new(), 5, &dev))?;
        let nets = Networks::new(
            &cfg,
            text.hidden_size(),
            seeded_var_builder(&VarMap::new(), 4, &dev),
            vae,
            None,
        )?;
        let diffusion = LatentDiffusion::new(&cfg, LatentStats::UNTRAINED);
        let short = diffusion.condition(&text, &nets, "Cardiomegaly.", "")?;
        let long = diffusion.condition(&text, &nets, "Large right pleural effusion.", "")?;
        let z = cfg.latent_size();
        let shape = (cfg.vae.latent_channels, z, z);
        let mut graphs = StepGraphs::new(&nets.unet, 3.0);
        // The shapes of the steps kept, least recently used first.
        let kept = |graphs: &StepGraphs| -> Result<Vec<(usize, bool)>> {
            let mut found = Vec::new();
            for g in &graphs.kept {
                for (cond, is_long) in [(&short, false), (&long, true)] {
                    for b in [1, 3] {
                        let x = Tensor::zeros((b, shape.0, z, z), DType::F32, &dev)?;
                        if g.accepts(&cond.step_inputs(&x, 0)?) {
                            found.push((b, is_long));
                        }
                    }
                }
            }
            Ok(found)
        };
        graphs.step_for(&short, 3, shape, &dev)?.unwrap();
        graphs.step_for(&short, 1, shape, &dev)?.unwrap();
        assert_eq!(kept(&graphs)?, [(3, false), (1, false)]);
        // Used again: kept (not captured again, which would have dropped the other).
        graphs.step_for(&short, 3, shape, &dev)?.unwrap();
        assert_eq!(kept(&graphs)?, [(1, false), (3, false)]);
        // A third shape (another token count) drops the least recently used.
        graphs.step_for(&long, 3, shape, &dev)?.unwrap();
        assert_eq!(kept(&graphs)?, [(3, false), (3, true)]);
        // What a kept step computes for one prompt's batch is the eager guided ε̂.
        let x = Tensor::randn(0f32, 1., (3, shape.0, z, z), &dev)?;
        let step = graphs.step_for(&long, 3, shape, &dev)?.unwrap();
        let replayed = CapturedGuided { step, cond: &long }.eps(&x, 700)?;
        let eager = guided_step(&nets.unet, 3.0)(&long.step_inputs(&x, 700)?)?;
        let d = (replayed - eager)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }
}
