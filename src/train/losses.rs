//! The training objectives of the two stages.

use candle_core::{Module, Result, Tensor};

use crate::diffusion::NoiseSchedule;
use crate::model::attention::padding_bias;
use crate::model::{TextHead, UNet, Vae};
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

/// Stage 2: epsilon-prediction MSE, each sample at its own timestep.
///
/// `latents`: scaled VAE latents [B, C, h, w]; `t`: B timesteps; `noise`: [B, C, h, w];
/// `text_hidden`: frozen encoder states [B, T, H]; `text_mask`: [B, T] (1 = token, 0 = padding).
#[allow(clippy::too_many_arguments)]
pub fn diffusion_loss(
    unet: &UNet,
    head: &TextHead,
    schedule: &NoiseSchedule,
    latents: &Tensor,
    t: &[usize],
    noise: &Tensor,
    text_hidden: &Tensor,
    text_mask: &Tensor,
) -> Result<Tensor> {
    let noisy = schedule.add_noise(latents, noise, t)?;
    let t_tensor = Tensor::from_vec(
        t.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        t.len(),
        latents.device(),
    )?;
    let context = head.forward(text_hidden)?;
    let bias = padding_bias(text_mask)?;
    let eps = unet.forward(&noisy, &t_tensor, &context, Some(&bias))?;
    (eps - noise)?.sqr()?.mean_all()
}
