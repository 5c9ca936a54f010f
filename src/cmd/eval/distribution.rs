//! FID and KID of the generated images against the real images of the split, with the
//! real-vs-real floor (two random halves of the real images), on the features of one network:
//! TF Inception's pool3, or the alignment classifier's pooled features (in-domain).

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::report::{progress_bar, unit};
use super::{Metric, Request};
use crate::data::cache::Cache;
use crate::eval::distribution::{
    frechet_distance, kernel_inception_distance, FeatureStats, Kid, KidConfig,
};
use crate::rng::Rng;

/// Below this many images FID's bias dominates (the FID literature's usual minimum).
const FID_MIN_RECOMMENDED: usize = 2048;

/// Images [B, 1, S, S] in [0, 1] → features [B, dim].
pub type Features<'a> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>;

/// The network whose features the two distances compare.
pub struct Extractor<'a> {
    /// The prefix of the metrics' names in eval.json (`""`: `fid`, `classifier_`:
    /// `classifier_fid`).
    pub key: &'static str,
    /// The heading of its table in eval.md.
    pub title: String,
    /// The number of features, for KID's kernel.
    pub dim: usize,
    /// What eval.json says of it: extractor, weights, SHA-256, resize recipe.
    pub about: Value,
    pub features: Features<'a>,
}

/// FID and KID against the real images, with the real-vs-real floor.
pub struct Distribution {
    key: &'static str,
    title: String,
    dim: usize,
    about: Value,
    fid: Option<(f64, f64)>,
    kid: Option<(Kid, Kid)>,
    generated: usize,
    real: usize,
    real_halves: (usize, usize),
    kid_config: KidConfig,
}

/// FID and KID (those of them in `asked`) of `generated` ([N, 1, S, S] in [0, 1]) against the
/// `real` images of the cache, on `extractor`'s features.
pub fn measure(
    req: &Request,
    asked: &[Metric],
    extractor: Extractor,
    generated: &Tensor,
    cache: &Cache,
    real: &[usize],
    seed: u64,
) -> Result<Distribution> {
    let n_gen = generated.dim(0)?;
    let bar = progress_bar(req, n_gen + real.len());
    let mut gen_feats = Vec::new();
    for start in (0..n_gen).step_by(req.batch_size) {
        let batch = generated.narrow(0, start, req.batch_size.min(n_gen - start))?;
        gen_feats.push((extractor.features)(&batch)?);
        bar.inc(batch.dim(0)? as u64);
    }
    let device = generated.device();
    let mut real_feats = Vec::new();
    for chunk in real.chunks(req.batch_size) {
        real_feats.push((extractor.features)(&unit(&cache.images(chunk, device)?)?)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let gen_feats = Tensor::cat(&gen_feats, 0)?;
    let real_feats = Tensor::cat(&real_feats, 0)?;
    // Two random halves of the real images.
    let mut order: Vec<u32> = (0..real.len() as u32).collect();
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let half = real.len() / 2;
    let pick = |idx: &[u32]| -> Result<Tensor> {
        let idx =
            Tensor::from_slice(idx, idx.len(), &Device::Cpu)?.to_device(real_feats.device())?;
        Ok(real_feats.index_select(&idx, 0)?)
    };
    let (half_a, half_b) = (pick(&order[..half])?, pick(&order[half..])?);
    let kid_config = KidConfig {
        seed,
        ..KidConfig::default()
    };
    let fid = if asked.contains(&Metric::Fid) {
        let fid = |a: &Tensor, b: &Tensor| -> Result<f64> {
            frechet_distance(
                &FeatureStats::from_features(a)?,
                &FeatureStats::from_features(b)?,
            )
        };
        Some((fid(&gen_feats, &real_feats)?, fid(&half_a, &half_b)?))
    } else {
        None
    };
    let kid = if asked.contains(&Metric::Kid) {
        Some((
            kernel_inception_distance(&gen_feats, &real_feats, &kid_config)?,
            kernel_inception_distance(&half_a, &half_b, &kid_config)?,
        ))
    } else {
        None
    };
    Ok(Distribution {
        key: extractor.key,
        title: extractor.title,
        dim: extractor.dim,
        about: extractor.about,
        fid,
        kid,
        generated: n_gen,
        real: real.len(),
        real_halves: (half, real.len() - half),
        kid_config,
    })
}

impl Distribution {
    /// `(name, entry)` for eval.json's metrics.
    pub fn json(&self) -> Vec<(String, Value)> {
        let mut common = self.about.clone();
        common["generated_images"] = self.generated.into();
        common["real_images"] = self.real.into();
        common["floor"] = "real vs real: two random halves of the real images".into();
        common["floor_images"] = json!([self.real_halves.0, self.real_halves.1]);
        let mut out = Vec::new();
        if let Some((fid, floor)) = self.fid {
            let mut v = common.clone();
            v["value"] = fid.into();
            v["floor_value"] = floor.into();
            v["recipe"] = "Fréchet distance of the Gaussian fits (covariances with n − 1), square roots by symmetric eigen-decompositions in F64".into();
            if self.biased() {
                v["warning"] = self.bias_note().into();
            }
            out.push((format!("{}fid", self.key), v));
        }
        if let Some((kid, floor)) = self.kid {
            let mut v = common;
            v["mean"] = kid.mean.into();
            v["std"] = kid.std.into();
            v["floor_mean"] = floor.mean.into();
            v["floor_std"] = floor.std.into();
            v["subsets"] = kid.subsets.into();
            v["subset_size"] = kid.subset_size.into();
            v["floor_subset_size"] = floor.subset_size.into();
            v["seed"] = self.kid_config.seed.into();
            v["recipe"] = format!("unbiased MMD² with the kernel (xᵀy/{} + 1)³ over random subsets drawn without replacement (Bińkowski et al. 2018); mean ± std over the subsets", self.dim).into();
            out.push((format!("{}kid", self.key), v));
        }
        out
    }

    /// Its table; `paper_fid` beside our FID.
    pub fn markdown(&self, paper_fid: &str) -> String {
        let mut md = format!(
            "\n## {}\n\n| metric | generated vs real | real vs real (floor) | images | paper (§4.2) |\n|---|---|---|---|---|\n",
            self.title
        );
        let images = format!(
            "{} generated / {} real; floor {} / {}",
            self.generated, self.real, self.real_halves.0, self.real_halves.1
        );
        if let Some((fid, floor)) = self.fid {
            md.push_str(&format!(
                "| FID | {fid:.2} | {floor:.2} | {images} | {paper_fid} |\n"
            ));
        }
        if let Some((kid, floor)) = self.kid {
            md.push_str(&format!(
                "| KID | {:.5} ± {:.5} | {:.5} ± {:.5} | {images} | – |\n",
                kid.mean, kid.std, floor.mean, floor.std
            ));
        }
        if self.fid.is_some() && self.biased() {
            md.push_str(&format!("\n{}.\n", self.bias_note()));
        }
        md
    }

    /// The warning for stderr, when FID was computed on too few images.
    pub fn warning(&self) -> Option<String> {
        (self.fid.is_some() && self.biased()).then(|| self.bias_note())
    }

    /// Whether a set is smaller than FID's usual minimum.
    fn biased(&self) -> bool {
        self.generated.min(self.real_halves.0) < FID_MIN_RECOMMENDED
    }

    fn bias_note(&self) -> String {
        format!(
            "FID on fewer than {FID_MIN_RECOMMENDED} images per set ({} generated, {} real, floor halves of {}) is biased upward, by roughly a constant over n: the real-vs-real floor shows how much of the number that is; KID is unbiased, read it first",
            self.generated, self.real, self.real_halves.0
        )
    }
}
