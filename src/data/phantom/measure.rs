//! Reading the truth back from a phantom's pixels: the cardiothoracic ratio, the side of an
//! effusion, the side of a pneumothorax and the lobe of a consolidation.

use serde::Serialize;

use super::{Finding, Lobe, Side};

// Thresholds of the measurements, on the intensity scale render.rs draws with.
const LUNG_BELOW: f32 = 0.45;
const HEART_ABOVE: f32 = 0.75;
/// Mediastinum and heart: a lung row ends medially at the first pixel this dense.
const DENSE_ABOVE: f32 = 0.70;
/// Abdomen and pleural fluid, smoothed: denser than any consolidated lung.
const SOLID_ABOVE: f32 = 0.555;

/// What [`measure`] reads from a frontal image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Measurement {
    /// Whether the image shows lung fields at all (one tall, dark block on both sides); when
    /// not, nothing else is read.
    pub lung_fields: bool,
    /// Widest run of heart-dense pixels through the midline over the inner thoracic width;
    /// None when the lung fields or the heart cannot be found.
    pub ctr: Option<f64>,
    /// The side whose costophrenic angle is blunted, if one is.
    pub effusion: Option<Side>,
    /// The side with an air rim along the lateral chest wall, if one has.
    pub pneumothorax: Option<Side>,
    /// The lobe of a patch of airspace opacity, if there is one.
    pub consolidation: Option<Lobe>,
}

impl Measurement {
    /// The one finding the measurements read: a single abnormality, or normal when there is
    /// none and the heart is not enlarged. None when the lung fields or the heart were not found, or more than
    /// one abnormality was read.
    pub fn finding(&self) -> Option<Finding> {
        let ctr = self.ctr?;
        let mut found = [
            (ctr > 0.5).then_some(Finding::Cardiomegaly),
            self.effusion.map(Finding::Effusion),
            self.pneumothorax.map(Finding::Pneumothorax),
            self.consolidation.map(Finding::Consolidation),
        ]
        .into_iter()
        .flatten();
        match (found.next(), found.next()) {
            (None, _) => Some(Finding::Normal),
            (Some(f), None) => Some(f),
            (Some(_), Some(_)) => None,
        }
    }

    /// What the measurements read, in words: a finding ([`Finding::name`]), `several
    /// findings`, `no heart found` or `no lung fields`.
    pub fn label(&self) -> String {
        match (self.lung_fields, self.ctr, self.finding()) {
            (false, _, _) => "no lung fields".into(),
            (true, None, _) => "no heart found".into(),
            (true, Some(_), None) => "several findings".into(),
            (true, Some(_), Some(f)) => f.name(),
        }
    }
}

/// Measures the cardiothoracic ratio, a blunted costophrenic angle, a pneumothorax's air rim
/// and a consolidation from a frontal image (`size`×`size`, intensities in [0, 1] on the
/// phantom's scale: a min-max-stretched radiograph).
pub fn measure(pixels: &[f32], size: usize) -> Measurement {
    let img = Image { pixels, size };
    match Thorax::find(&img) {
        Some(t) => Measurement {
            lung_fields: true,
            ctr: t.ctr(&img),
            effusion: t.effusion(&img),
            pneumothorax: t.pneumothorax(&img),
            consolidation: t.consolidation(&img),
        },
        None => Measurement::default(),
    }
}

struct Image<'a> {
    pixels: &'a [f32],
    size: usize,
}

impl Image<'_> {
    fn at(&self, x: usize, y: usize) -> f32 {
        self.pixels[y * self.size + x]
    }
}

/// The lung fields as found in an image. Side 0 is the image's left (the patient's right).
struct Thorax {
    /// Per side and row, the lateral lung edge (the first lung pixel inside the body).
    outer: [Vec<Option<usize>>; 2],
    /// The first and last rows with lung on both sides.
    top: usize,
    bottom: usize,
    /// The outermost lung edges: the inner thoracic width spans them.
    left: usize,
    right: usize,
}

impl Thorax {
    fn find(img: &Image) -> Option<Self> {
        let size = img.size;
        let mid = size / 2;
        // Lung pixels: dark, inside the body. Per row, the lateral lung edge on each side is the
        // first dark pixel after the body's edge, scanning inwards from the image border.
        // Runs shorter than these are noise at the skin or the trachea, not body or lung.
        let (min_body, min_lung) = ((size / 50).max(2), (size / 25).max(3));
        let inwards: [Vec<usize>; 2] = [(0..mid).collect(), (mid..size).rev().collect()];
        let lung_edge = |cols: &[usize], y: usize| {
            let mut body_run = 0;
            for (k, &x) in cols.iter().enumerate() {
                if img.at(x, y) >= LUNG_BELOW {
                    body_run += 1;
                } else if body_run >= min_body
                    && cols.len() - k >= min_lung
                    && cols[k..k + min_lung]
                        .iter()
                        .all(|&x2| img.at(x2, y) < LUNG_BELOW)
                {
                    return Some(x);
                } else if body_run < min_body {
                    body_run = 0;
                }
            }
            None
        };
        let outer: [Vec<Option<usize>>; 2] =
            [0, 1].map(|s| (0..size).map(|y| lung_edge(&inwards[s], y)).collect());
        // The thorax spans the rows where both sides have a lung edge.
        let rows: Vec<usize> = (0..size)
            .filter(|&y| outer[0][y].is_some() && outer[1][y].is_some())
            .collect();
        // Lungs are one tall block of such rows; noise or a texture gives scattered ones.
        let (top, bottom) = (*rows.first()?, *rows.last()?);
        let span = bottom - top + 1;
        if span < size / 4 || rows.len() * 10 < span * 7 {
            return None;
        }
        // And dark: most pixels a little way in from each lateral edge are lung.
        let (mut dark, mut all) = (0usize, 0usize);
        for &y in &rows {
            for (s, cols) in inwards.iter().enumerate() {
                let Some(edge) = outer[s][y] else { continue };
                let from = cols.iter().position(|&x| x == edge).unwrap_or(cols.len());
                for &x in cols[from..].iter().take(size / 8) {
                    dark += usize::from(img.at(x, y) < LUNG_BELOW);
                    all += 1;
                }
            }
        }
        if dark * 10 < all * 8 {
            return None;
        }
        let left = rows.iter().filter_map(|&y| outer[0][y]).min()?;
        let right = rows.iter().filter_map(|&y| outer[1][y]).max()?;
        Some(Self {
            outer,
            top,
            bottom,
            left,
            right,
        })
    }

    fn centre(&self) -> usize {
        (self.left + self.right) / 2
    }

    fn height(&self) -> f64 {
        (self.bottom - self.top).max(1) as f64
    }

    /// The cardiothoracic ratio: in the lower half of the thorax, the run of dense pixels through
    /// the centre on each row (the mediastinum above is narrower, the spine below narrower
    /// still), between the outermost points of the two heart borders.
    fn ctr(&self, img: &Image) -> Option<f64> {
        let size = img.size;
        let thoracic = (self.right - self.left + 1) as f64;
        let centre = self.centre();
        let (mut heart_lo, mut heart_hi) = (usize::MAX, 0usize);
        // Down to the lowest lung row of either side: fluid on one side must not hide the apex.
        let lowest = (0..size)
            .rev()
            .find(|&y| self.outer[0][y].is_some() || self.outer[1][y].is_some())
            .unwrap_or(self.bottom);
        for y in (self.top + (self.bottom - self.top) * 45 / 100)..=lowest {
            // Start from the densest pixel near the centre (the heart straddles the midline).
            let start = (centre.saturating_sub(size / 32)..=(centre + size / 32).min(size - 1))
                .max_by(|&a, &b| img.at(a, y).total_cmp(&img.at(b, y)))?;
            if img.at(start, y) < HEART_ABOVE {
                continue;
            }
            let mut l = start;
            while l > 0 && img.at(l - 1, y) >= HEART_ABOVE {
                l -= 1;
            }
            let mut r = start;
            while r + 1 < size && img.at(r + 1, y) >= HEART_ABOVE {
                r += 1;
            }
            heart_lo = heart_lo.min(l);
            heart_hi = heart_hi.max(r);
        }
        // The outermost points of the two heart borders lie on different rows (the apex is
        // lower): the radiologist's MRD + MLD.
        (heart_hi >= heart_lo).then(|| (heart_hi - heart_lo + 1) as f64 / thoracic)
    }

    /// Costophrenic angles: on each side, the lowest lung row near the lateral wall. Normally
    /// the angle is the deepest point of the lung on both sides; fluid fills it, so on that side
    /// the lateral lung ends well above the other side's.
    fn effusion(&self, img: &Image) -> Option<Side> {
        let centre = self.centre();
        let mut angle = [None; 2];
        for (s, slot) in angle.iter_mut().enumerate() {
            let cols = if s == 0 {
                self.left..=self.left + (centre - self.left) * 12 / 100
            } else {
                self.right - (self.right - centre) * 12 / 100..=self.right
            };
            // Over every row where this side has lung: the other side's fluid must not cut it
            // short.
            *slot = (self.top..img.size).rev().find(|&y| {
                self.outer[s][y].is_some() && cols.clone().any(|x| img.at(x, y) < LUNG_BELOW)
            });
        }
        let [Some(r), Some(l)] = angle else {
            return None;
        };
        // > 0: the right angle is higher. Beyond the anatomy's own asymmetry, and beyond two
        // rows of quantisation at small sizes.
        let raised = (l as f64 - r as f64) / self.height();
        side_of(raised, 0.06_f64.max(2.5 / self.height()))
    }

    /// A pneumothorax's air rim: along the lateral wall of the upper lung, the band just inside
    /// the lung edge is darker than the other side's (air without markings against lung with
    /// the chest wall overlapping it).
    fn pneumothorax(&self, img: &Image) -> Option<Side> {
        let band = ((img.size as f64 * 0.02).round() as usize).max(2);
        let rows = self.top..self.top + (self.bottom - self.top) / 2;
        let mut mean = [0f64; 2];
        for (s, m) in mean.iter_mut().enumerate() {
            let (mut sum, mut n) = (0f64, 0usize);
            for y in rows.clone() {
                let Some(edge) = self.outer[s][y] else {
                    continue;
                };
                for k in 1..=band {
                    let x = if s == 0 { edge + k } else { edge - k };
                    sum += img.at(x, y) as f64;
                    n += 1;
                }
            }
            *m = sum / n.max(1) as f64;
        }
        // > 0: the right (image-left) band is darker.
        side_of(mean[1] - mean[0], PNEUMOTHORAX_DARKER)
    }

    /// A consolidation: where the lung, smoothed so that ribs and vessels fade, is much denser
    /// than the lung's median; its side has most such pixels, its lobe follows from where their
    /// centroid lies.
    fn consolidation(&self, img: &Image) -> Option<Lobe> {
        let size = img.size;
        let r = ((size as f64 * 0.025).round() as usize).max(1);
        let centre = self.centre();
        let smooth = box_mean(img.pixels, size, r);
        // Per side and row, the lung's extent: from the lateral edge towards the centre up to the
        // heart, the mediastinum or, below the dome, the abdomen; then only what lies a
        // smoothing radius inside it, so that no wall, heart or diaphragm leaks in.
        let mut extent = vec![0f32; size * size];
        for s in 0..2 {
            for y in self.top..=self.bottom {
                let Some(edge) = self.outer[s][y] else {
                    continue;
                };
                let cols: Vec<usize> = if s == 0 {
                    (edge..centre).collect()
                } else {
                    (centre + 1..=edge).rev().collect()
                };
                let lung =
                    |x: usize| img.at(x, y) < DENSE_ABOVE && smooth[y * size + x] < SOLID_ABOVE;
                for &x in cols.iter().take_while(|&&x| lung(x)) {
                    extent[y * size + x] = 1.0;
                }
            }
        }
        let inside = box_mean(&extent, size, r);
        let lung: Vec<bool> = inside.iter().map(|&v| v > 0.999).collect();
        let mut values: Vec<f32> = (0..size * size)
            .filter(|&i| lung[i])
            .map(|i| smooth[i])
            .collect();
        if values.len() < 16 {
            return None;
        }
        let k = values.len() / 2;
        let median = *values.select_nth_unstable_by(k, f32::total_cmp).1;
        // Per side: count and centroid of the dense pixels.
        let mut stats = [(0usize, 0f64, 0f64); 2];
        for y in 0..size {
            for x in 0..size {
                let i = y * size + x;
                // Against the mirror image across the centre where that is lung too (the hila
                // cancel), else against the lung's median.
                let m = (2 * centre)
                    .checked_sub(x)
                    .filter(|&m| m < size && lung[y * size + m]);
                let baseline = m.map_or(median, |m| smooth[y * size + m]);
                let (half, d) = if x <= centre {
                    ((centre - self.left) as f64, (centre - x) as f64)
                } else {
                    ((self.right - centre) as f64, (x - centre) as f64)
                };
                if lung[i] && d >= HILA_WITHIN * half && smooth[i] - baseline > CONSOLIDATION_DENSER
                {
                    let s = usize::from(x > centre);
                    stats[s].0 += 1;
                    stats[s].1 += x as f64;
                    stats[s].2 += y as f64;
                }
            }
        }
        let s = if stats[0].0 >= stats[1].0 { 0 } else { 1 };
        let (n, sx, sy) = stats[s];
        if (n as f64) < CONSOLIDATION_AREA * (size * size) as f64 {
            return None;
        }
        // Centroid: u, the fraction of the half width from the centre; t, of the height.
        let half = if s == 0 {
            (centre - self.left) as f64
        } else {
            (self.right - centre) as f64
        };
        let u = (sx / n as f64 - centre as f64).abs() / half;
        let t = (sy / n as f64 - self.top as f64) / self.height();
        Some(match (s, t < UPPER_ABOVE, u < MIDDLE_INSIDE) {
            (0, true, _) => Lobe::RightUpper,
            (0, false, true) => Lobe::RightMiddle,
            (0, false, false) => Lobe::RightLower,
            (_, true, _) => Lobe::LeftUpper,
            (_, false, _) => Lobe::LeftLower,
        })
    }
}

/// The side a difference (right side's reading minus left side's) points to: right above
/// `threshold`, left below `-threshold`, neither in between.
fn side_of(difference: f64, threshold: f64) -> Option<Side> {
    if difference > threshold {
        Some(Side::Right)
    } else if difference < -threshold {
        Some(Side::Left)
    } else {
        None
    }
}

const HILA_WITHIN: f64 = 0.3;
const PNEUMOTHORAX_DARKER: f64 = 0.05;
const CONSOLIDATION_DENSER: f32 = 0.08;
/// The smallest consolidation, as a fraction of the image's pixels.
const CONSOLIDATION_AREA: f64 = 0.004;
/// Lobe boundaries on the centroid: upper lobes above this fraction of the height, the right
/// middle lobe medial of this fraction of the half width.
const UPPER_ABOVE: f64 = 0.45;
const MIDDLE_INSIDE: f64 = 0.53;

/// The mean of `values` (`n`×`n`) over a (2r+1)² box around each pixel (clipped at the border),
/// by summed-area table.
fn box_mean(values: &[f32], n: usize, r: usize) -> Vec<f32> {
    let w = n + 1;
    let mut sat = vec![0f64; w * w];
    for y in 0..n {
        for x in 0..n {
            sat[(y + 1) * w + x + 1] =
                values[y * n + x] as f64 + sat[y * w + x + 1] + sat[(y + 1) * w + x]
                    - sat[y * w + x];
        }
    }
    let mut out = vec![0f32; n * n];
    for y in 0..n {
        for x in 0..n {
            let (x0, y0) = (x.saturating_sub(r), y.saturating_sub(r));
            let (x1, y1) = ((x + r + 1).min(n), (y + r + 1).min(n));
            let sum = sat[y1 * w + x1] - sat[y0 * w + x1] - sat[y1 * w + x0] + sat[y0 * w + x0];
            out[y * n + x] = (sum / ((x1 - x0) * (y1 - y0)) as f64) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_finding_is_read_and_two_are_not() {
        let m = |ctr: f64| Measurement {
            lung_fields: true,
            ctr: Some(ctr),
            ..Default::default()
        };
        assert_eq!(m(0.45).finding(), Some(Finding::Normal));
        assert_eq!(m(0.55).finding(), Some(Finding::Cardiomegaly));
        let effusion = Measurement {
            effusion: Some(Side::Left),
            ..m(0.45)
        };
        assert_eq!(effusion.finding(), Some(Finding::Effusion(Side::Left)));
        let two = Measurement {
            pneumothorax: Some(Side::Right),
            ..effusion
        };
        assert_eq!(two.finding(), None);
        assert_eq!(Measurement::default().finding(), None, "no lung fields");
    }

    #[test]
    fn a_flat_or_noisy_image_has_no_lung_fields() {
        let size = 64;
        assert_eq!(
            measure(&vec![0.5; size * size], size),
            Measurement::default()
        );
        let mut rng = crate::rng::Rng::new(3);
        let noise: Vec<f32> = (0..size * size).map(|_| rng.uniform() as f32).collect();
        assert_eq!(measure(&noise, size).ctr, None);
    }
}
