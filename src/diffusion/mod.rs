//! The diffusion process: noise schedules, samplers, classifier-free guidance, and the latent
//! diffusion inferer that trains and samples through them.

pub mod guidance;
pub mod inferer;
pub mod samplers;
pub mod schedule;

pub use guidance::{guided_step, CapturedGuided, Conditioning};
pub use inferer::{LatentDiffusion, Networks};
pub use samplers::{sample, ClampX0, Denoiser, ImageNoise, SamplerKind, SamplerOptions};
pub use schedule::NoiseSchedule;
