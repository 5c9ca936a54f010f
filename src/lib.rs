//! cxrgen: a resource-efficient text-conditional chest X-ray latent diffusion model on candle.
//!
//! Layout, lowest layer first; a module imports only modules of lower layers (`tests/layout.rs`,
//! docs/architecture.md "How the code is laid out"):
//!
//! 0. [`config`] (YAML configs), [`io`] (files written safely, stdout, PNG, DICOM, grids, plots),
//!    [`rng`] (seeded randomness), [`interrupt`] (Ctrl-C), [`opcount`] (tensor operations counted
//!    by a counting allocator, for `cxrgen bench`)
//! 1. [`device`] (`--device`, compute precision, peak and free memory), [`cuda_graph`] (a
//!    fixed-shape step recorded once as a CUDA graph and replayed)
//! 2. [`data`] (loaders, cleaning, splits, the cache, phantoms), [`model`] (VAE, U-Net, text
//!    encoder, and the weights helpers training needs), [`eval`] (metrics and the networks they
//!    need)
//! 3. [`checkpoint`] (the run-folder format), [`diffusion`] (schedules, samplers, guidance, the
//!    latent diffusion inferer)
//! 4. [`train`] (the run folder, the two stages, the `Trainer`)
//! 5. [`cmd`] (one room per subcommand)
//! 6. [`cli`] (the `cxrgen` command line)

pub mod checkpoint;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod cuda_graph;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod eval;
pub mod interrupt;
pub mod io;
pub mod model;
pub mod opcount;
pub mod rng;
pub mod train;
