//! Training: the objectives, the shared loop (accumulation, clipping, AdamW, EMA, validation),
//! checkpoints that survive interruption and resume exactly, and the two stages.

pub mod diffusion;
pub mod ema;
pub mod losses;
pub mod optim;
pub mod trainer;
