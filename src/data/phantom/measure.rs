//! Reading the truth back from a phantom's pixels: the cardiothoracic ratio and the side of an
//! effusion.

use serde::Serialize;

use super::Side;

// Thresholds of the measurements, on the intensity scale render.rs draws with.
const LUNG_BELOW: f32 = 0.45;
const HEART_ABOVE: f32 = 0.75;

/// What [`measure`] reads from a frontal image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Measurement {
    /// Widest run of heart-dense pixels through the midline over the inner thoracic width;
    /// None when the lung fields cannot be found.
    pub ctr: Option<f64>,
    /// The side whose costophrenic angle is blunted, if one is.
    pub effusion: Option<Side>,
}

/// Measures the cardiothoracic ratio and a blunted costophrenic angle from a frontal image
/// (`size`×`size`, intensities in [0, 1] on the phantom's scale: a min-max-stretched radiograph).
pub fn measure(pixels: &[f32], size: usize) -> Measurement {
    let at = |x: usize, y: usize| pixels[y * size + x];
    let mid = size / 2;
    // Lung pixels: dark, inside the body. Per row, the lateral lung edge on each side is the first
    // dark pixel after the body's edge, scanning inwards from the image border.
    // Runs shorter than these are noise at the skin or the trachea, not body or lung.
    let (min_body, min_lung) = ((size / 50).max(2), (size / 25).max(3));
    let inwards: [Vec<usize>; 2] = [(0..mid).collect(), (mid..size).rev().collect()];
    let lung_edge = |cols: &[usize], y: usize| {
        let mut body_run = 0;
        for (k, &x) in cols.iter().enumerate() {
            if at(x, y) >= LUNG_BELOW {
                body_run += 1;
            } else if body_run >= min_body
                && cols.len() - k >= min_lung
                && cols[k..k + min_lung]
                    .iter()
                    .all(|&x2| at(x2, y) < LUNG_BELOW)
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
    // A lung row needs a lung edge on that side; the thorax spans the rows where both sides have one.
    let rows: Vec<usize> = (0..size)
        .filter(|&y| outer[0][y].is_some() && outer[1][y].is_some())
        .collect();
    if rows.len() < size / 8 {
        return Measurement {
            ctr: None,
            effusion: None,
        };
    }
    let (top, bottom) = (rows[0], *rows.last().unwrap());
    let left = rows.iter().filter_map(|&y| outer[0][y]).min().unwrap();
    let right = rows.iter().filter_map(|&y| outer[1][y]).max().unwrap();
    let thoracic = (right - left + 1) as f64;

    // Heart: in the lower half of the thorax, the run of dense pixels through the centre on each
    // row (the mediastinum above is narrower, the spine below narrower still).
    let heart_centre = (left + right) / 2;
    let (mut heart_lo, mut heart_hi) = (usize::MAX, 0usize);
    // Down to the lowest lung row of either side: fluid on one side must not hide the apex.
    let lowest = (0..size)
        .rev()
        .find(|&y| outer[0][y].is_some() || outer[1][y].is_some())
        .unwrap_or(bottom);
    for y in (top + (bottom - top) * 45 / 100)..=lowest {
        // Start from the densest pixel near the centre (the heart straddles the midline).
        let start = (heart_centre.saturating_sub(size / 32)
            ..=(heart_centre + size / 32).min(size - 1))
            .max_by(|&a, &b| at(a, y).total_cmp(&at(b, y)))
            .unwrap();
        if at(start, y) < HEART_ABOVE {
            continue;
        }
        let mut l = start;
        while l > 0 && at(l - 1, y) >= HEART_ABOVE {
            l -= 1;
        }
        let mut r = start;
        while r + 1 < size && at(r + 1, y) >= HEART_ABOVE {
            r += 1;
        }
        heart_lo = heart_lo.min(l);
        heart_hi = heart_hi.max(r);
    }
    // The cardiac width is taken between the outermost points of the two heart borders, which
    // lie on different rows (the apex is lower): the radiologist's MRD + MLD.
    let ctr = (heart_hi >= heart_lo).then(|| (heart_hi - heart_lo + 1) as f64 / thoracic);

    // Costophrenic angles: on each side, the lowest lung row near the lateral wall. Normally the
    // angle is the deepest point of the lung on both sides; fluid fills it, so on that side the
    // lateral lung ends well above the other side's.
    let height = (bottom - top) as f64;
    let mut angle = [None; 2];
    for (s, slot) in angle.iter_mut().enumerate() {
        let (wall, band) = if s == 0 {
            (left, (heart_centre - left) * 18 / 100)
        } else {
            (right, (right - heart_centre) * 18 / 100)
        };
        let cols = if s == 0 {
            wall..=wall + band
        } else {
            wall - band..=wall
        };
        // Over every row where this side has lung: the other side's fluid must not cut it short.
        *slot = (top..size)
            .rev()
            .find(|&y| outer[s][y].is_some() && cols.clone().any(|x| at(x, y) < LUNG_BELOW));
    }
    let effusion = match angle {
        [Some(r), Some(l)] => {
            let raised = (l as f64 - r as f64) / height; // > 0: the right angle is higher
            if raised > 0.06 {
                Some(Side::Right)
            } else if raised < -0.06 {
                Some(Side::Left)
            } else {
                None
            }
        }
        _ => None,
    };
    Measurement { ctr, effusion }
}
