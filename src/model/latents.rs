//! What a trained VAE's latents look like: the scale that gives the diffusion model
//! unit-variance inputs, and the range of the scaled latents.

use serde::{Deserialize, Serialize};

/// Statistics of latents sampled from a trained VAE's posteriors (Rombach et al. 2022, §4.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatentStats {
    /// 1 / std of the latents: VAE latent × scale = the diffusion model's latent.
    #[serde(rename = "latent_scale")]
    pub scale: f64,
    /// The range of the scaled latents, to which samplers clip their clean estimates (None: no
    /// clipping).
    #[serde(rename = "latent_range", default)]
    pub range: Option<(f64, f64)>,
}

impl LatentStats {
    /// For networks that were never trained (`cxrgen bench`, `cxrgen check-device`): latents
    /// taken as they are, clean estimates clipped to ±4 as a trained VAE's range would.
    pub const UNTRAINED: Self = Self {
        scale: 1.0,
        range: Some((-4.0, 4.0)),
    };
}
