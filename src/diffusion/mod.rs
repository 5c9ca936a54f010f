//! The diffusion process: noise schedules, samplers, and classifier-free guidance.

pub mod inferer;
pub mod samplers;
pub mod schedule;

pub use samplers::{sample, ClampX0, Denoiser, ImageNoise, SamplerKind, SamplerOptions};
pub use schedule::NoiseSchedule;
