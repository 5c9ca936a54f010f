//! How many images `generate` samples together when `--batch-size` is not given
//! (docs/generation.md, "Batch size"). On the CPU each image gets its own U-Net pass, so the batch
//! only says how many images advance together: [`CPU_DEFAULT`]. On CUDA a batch is one pass, and
//! it is as large as the free device memory allows, measured, not guessed.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::device::peak_above_current;
use crate::diffusion::{guided_step, Conditioning, Networks};

/// `--batch-size` on the CPU when it is not given.
pub const CPU_DEFAULT: usize = 4;

/// The largest batch chosen from memory: a batch's images are written when it ends, so a stop
/// (Ctrl-C) loses the whole batch, and beyond a few dozen latents the GPU gains little more.
pub const MAX_BATCH: usize = 64;

/// The share of the free memory left out of the plan: the allocator's rounding and
/// fragmentation, each batch's latents and images, prompts longer than the one measured.
const HEADROOM: f64 = 0.1;

/// What sampling needs on top of the memory in use before it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplingMemory {
    /// One guided step of a batch of B needs `step_fixed + step_per_image × B`.
    pub step_fixed: u64,
    pub step_per_image: u64,
    /// Decoding one image (images are decoded one at a time, whatever the batch).
    pub decode: u64,
}

impl SamplingMemory {
    /// From the peaks of one guided step at batch 1 and at batch 2, and of one decode. Every
    /// activation of the step has the batch as its first dimension, so the step's memory grows
    /// linearly with it and the two peaks' difference is the memory of one image. Where it is
    /// not positive (the allocator's rounding), the whole batch-1 peak counts per image: more
    /// than the truth, never less.
    pub fn from_peaks(one: u64, two: u64, decode: u64) -> Self {
        let per_image = if two > one { two - one } else { one };
        Self {
            step_fixed: one - per_image.min(one),
            step_per_image: per_image,
            decode,
        }
    }
}

/// The batch size for `n` images (the most of one prompt) with `available` bytes free, when
/// `copies` of a step's memory are live at once (see [`copies`]): the largest batch whose step
/// memory, times `copies`, plus a decode fits in all but a tenth (`HEADROOM`) of them, at most
/// `n` and [`MAX_BATCH`]; then evened out to as many batches of equal size as that takes (10 images of which 8
/// fit: two batches of 5, not 8 and 2), so that no batch has an odd shape of its own (a CUDA
/// graph of its own). At least 1: a single image that does not fit fails as it always would.
pub fn batch_size(available: u64, memory: &SamplingMemory, copies: u64, n: usize) -> usize {
    let n = n.max(1);
    let budget = (available as f64 * (1.0 - HEADROOM)) as u64;
    let fixed = copies * memory.step_fixed + memory.decode;
    let per_image = (copies * memory.step_per_image).max(1);
    let most = n.min(MAX_BATCH) as u64;
    let fits = (budget.saturating_sub(fixed) / per_image).clamp(1, most) as usize;
    n.div_ceil(n.div_ceil(fits))
}

/// Copies of a guided step's memory live at once: the step; with CUDA graphs, also each graph
/// kept (a graph holds the memory of the step it recorded, in a pool of its own, and the eager
/// run that precedes a capture can coincide with the graphs already kept).
pub fn copies(cuda_graphs: bool) -> u64 {
    if cuda_graphs {
        1 + super::graphs::KEPT as u64
    } else {
        1
    }
}

/// Measures on `nets.device` (CUDA) what sampling `cond` with `guidance` needs: a guided step of
/// latents of shape `latent` (C, h, w) at batch 1 and at batch 2 (after one unmeasured step that
/// loads the kernels and initialises cuBLAS), and a decode by the F32 VAE (the F16 one, where
/// there is one, needs less; F32 is its fallback). None where the device reports no memory.
pub fn measure(
    nets: &Networks,
    cond: &Conditioning,
    guidance: f64,
    (c, h, w): (usize, usize, usize),
) -> Result<Option<SamplingMemory>> {
    let device = &nets.device;
    let step = guided_step(&nets.unet, guidance);
    let latents = |b: usize| Tensor::zeros((b, c, h, w), DType::F32, device);
    let peak_of_step = |b: usize| -> Result<Option<u64>> {
        let inputs = cond.step_inputs(&latents(b)?, 500)?;
        Ok(peak_above_current(device, || Ok(step(&inputs)?))?.1)
    };
    peak_of_step(1)?;
    let (one, two) = (peak_of_step(1)?, peak_of_step(2)?);
    let z = latents(1)?;
    let decode = peak_above_current(device, || Ok(nets.vae.decode(&z)?))?.1;
    Ok(match (one, two, decode) {
        (Some(one), Some(two), Some(decode)) => Some(SamplingMemory::from_peaks(one, two, decode)),
        _ => None,
    })
}

/// `generate`'s batch size when `--batch-size` is not given, said on stderr: on CUDA from the
/// free memory and [`measure`] (the conditioning from `cond`, made only there), on the CPU
/// [`CPU_DEFAULT`]. `n`: the most images of one prompt.
pub fn choose(
    nets: &Networks,
    cond: impl FnOnce() -> Result<Conditioning>,
    guidance: f64,
    latent: (usize, usize, usize),
    cuda_graphs: bool,
    n: usize,
) -> Result<usize> {
    let device = &nets.device;
    let name = crate::device::name(device);
    if !device.is_cuda() {
        eprintln!("batch size {CPU_DEFAULT} (the default on the CPU; --batch-size sets it)");
        return Ok(CPU_DEFAULT);
    }
    let measured =
        measure(nets, &cond()?, guidance, latent)?.zip(crate::device::free_memory_bytes(device));
    let Some((memory, free)) = measured else {
        eprintln!("batch size {CPU_DEFAULT} ({name} reports no memory figures to size it by; --batch-size sets it)");
        return Ok(CPU_DEFAULT);
    };
    let copies = copies(cuda_graphs);
    let b = batch_size(free, &memory, copies, n);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "batch size {b} for up to {n} images a prompt: a guided step takes {:.0} MiB + {:.1} MiB per image{}, a decode {:.0} MiB, and {:.0} MiB are free on {name} (--batch-size sets it)",
        mib(memory.step_fixed),
        mib(memory.step_per_image),
        if copies > 1 {
            format!(" (counted {copies} times: the step and the CUDA graphs kept)")
        } else {
            String::new()
        },
        mib(memory.decode),
        mib(free),
    );
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_largest_batch_that_fits_capped_by_n() {
        let m = SamplingMemory {
            step_fixed: 40 * MIB,
            step_per_image: 10 * MIB,
            decode: 100 * MIB,
        };
        // 700 MiB free, 630 planned: 630 − 40 − 100 = 490 MiB for images, 49 of them.
        assert_eq!(batch_size(700 * MIB, &m, 1, 49), 49);
        assert_eq!(batch_size(700 * MIB, &m, 1, 50), 25, "50 in two batches");
        assert_eq!(batch_size(700 * MIB, &m, 1, 8), 8, "capped by n");
        // Three copies of the step: 630 − 120 − 100 = 410 MiB at 30 MiB an image: 13.
        assert_eq!(batch_size(700 * MIB, &m, 3, 1000), 13);
        // Nothing fits: one image at a time.
        assert_eq!(batch_size(100 * MIB, &m, 1, 8), 1);
        assert_eq!(batch_size(0, &m, 3, 8), 1);
        // Plenty of memory: at most MAX_BATCH.
        assert_eq!(batch_size(1 << 40, &m, 3, 10 * MAX_BATCH), MAX_BATCH);
    }

    #[test]
    fn batches_are_evened_out() {
        let m = SamplingMemory {
            step_fixed: 0,
            step_per_image: MIB,
            decode: 0,
        };
        let free = 50 * MIB; // 45 fit
        assert_eq!(batch_size(free, &m, 1, 45), 45);
        assert_eq!(batch_size(free, &m, 1, 46), 23, "46 = 23 + 23, not 45 + 1");
        assert_eq!(batch_size(free, &m, 1, 91), 31, "three batches");
        for n in 1..300 {
            let b = batch_size(free, &m, 1, n);
            assert!((1..=45).contains(&b), "{n}: {b}");
            // No more batches than the largest batch that fits would take.
            assert_eq!(n.div_ceil(b), n.div_ceil(45), "{n}: {b}");
        }
    }

    #[test]
    fn per_image_memory_from_two_peaks() {
        let m = SamplingMemory::from_peaks(50 * MIB, 62 * MIB, 7);
        assert_eq!((m.step_fixed, m.step_per_image), (38 * MIB, 12 * MIB));
        assert_eq!(m.decode, 7);
        // Peaks that do not grow say nothing about an image: all of batch 1's counts.
        for two in [50 * MIB, 49 * MIB] {
            let m = SamplingMemory::from_peaks(50 * MIB, two, 0);
            assert_eq!((m.step_fixed, m.step_per_image), (0, 50 * MIB));
        }
        assert_eq!(copies(false), 1);
        assert_eq!(copies(true), 3);
    }
}
