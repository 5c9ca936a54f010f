//! Training, by purpose: the run folder (run.rs), the two stages (vae.rs, diffusion.rs), the loop
//! shared by both (trainer.rs: accumulation, clipping, AdamW, EMA, validation, checkpoints,
//! exact resume), the metrics log and its plot (metrics.rs), and the optimizer's parts (optim.rs,
//! ema.rs, losses.rs).

pub mod diffusion;
pub mod ema;
pub mod losses;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod trainer;
pub mod vae;

pub use diffusion::{train_diffusion, DiffusionObjective, Posteriors};
pub use run::RunRequest;
pub use vae::{train_vae, ImageSource, VaeObjective};
