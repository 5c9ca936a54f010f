//! The VAE's training loss (the diffusion loss is the inferer's: `LatentDiffusion::loss`).

use candle_core::{Result, Tensor};

use crate::model::Vae;
use crate::rng::Rng;

/// The VAE loss and its parts (scalars).
#[derive(Debug, Clone)]
pub struct VaeLoss {
    pub total: Tensor,
    pub recon: Tensor,
    pub kl: Tensor,
}

/// Stage 1: mean squared reconstruction error + `kl_weight` · KL, with the latent sampled by the
/// reparameterisation trick. `images`: [B, 1, H, W] in [-1, 1].
pub fn vae_loss(vae: &Vae, images: &Tensor, kl_weight: f64, rng: &mut Rng) -> Result<VaeLoss> {
    let posterior = vae.encode(images)?;
    let noise = rng.randn(posterior.mean.shape(), images.device())?;
    let recon = vae.decode(&posterior.sample(&noise)?)?;
    let recon = (recon - images)?.sqr()?.mean_all()?;
    let kl = posterior.kl()?;
    let total = (&recon + (&kl * kl_weight)?)?;
    Ok(VaeLoss { total, recon, kl })
}
