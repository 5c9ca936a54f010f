//! cxrgen: a resource-efficient text-conditional chest X-ray latent diffusion model on candle.
//!
//! Layout: [`config`] (YAML configs), [`model`] (VAE, U-Net, text encoder), [`diffusion`] (noise
//! schedules), [`train`] (objectives), [`cli`] (the `cxrgen` command), [`rng`] (seeded randomness).

pub mod bench;
pub mod check;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod generate;
pub mod interrupt;
pub mod io;
pub mod model;
pub mod opcount;
pub mod rng;
pub mod train;
