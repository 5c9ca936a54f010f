//! A procedural chest radiograph with known ground truth, and the measurements that read the
//! truth back from an image.
//!
//! Each phantom is a frontal (PA) view: trunk and shoulders, two lung fields with vessel markings,
//! posterior and anterior ribs, clavicles, spine, mediastinum with the aortic knob and hila, heart,
//! diaphragm domes with a gastric bubble, and one finding: normal, cardiomegaly (cardiothoracic
//! ratio above 0.5), pleural effusion (blunted costophrenic angle with a meniscus), pneumothorax (a
//! visceral pleural line with no markings beyond it) or consolidation in a named lobe. As on a real
//! PA film, the patient's right is on the image's left.
//!
//! Everything is drawn in normalised coordinates (x to the image's right, y down, both in [0, 1])
//! and rendered at any size. Intensities follow a radiograph: air dark, soft tissue grey, bone
//! bright; the darkest air and the densest bone saturate, so a min-max stretch leaves the image as
//! it is. The thresholds of [`measure`] rely on that scale.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Right,
    Left,
}

impl Side {
    fn image_index(self) -> usize {
        match self {
            Side::Right => 0, // the patient's right is the image's left
            Side::Left => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Side::Right => "right",
            Side::Left => "left",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lobe {
    RightUpper,
    RightMiddle,
    RightLower,
    LeftUpper,
    LeftLower,
}

impl Lobe {
    pub const ALL: [Lobe; 5] = [
        Lobe::RightUpper,
        Lobe::RightMiddle,
        Lobe::RightLower,
        Lobe::LeftUpper,
        Lobe::LeftLower,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Lobe::RightUpper => "right upper lobe",
            Lobe::RightMiddle => "right middle lobe",
            Lobe::RightLower => "right lower lobe",
            Lobe::LeftUpper => "left upper lobe",
            Lobe::LeftLower => "left lower lobe",
        }
    }

    fn side(self) -> Side {
        match self {
            Lobe::RightUpper | Lobe::RightMiddle | Lobe::RightLower => Side::Right,
            Lobe::LeftUpper | Lobe::LeftLower => Side::Left,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finding {
    Normal,
    Cardiomegaly,
    Effusion(Side),
    Pneumothorax(Side),
    Consolidation(Lobe),
}

impl Finding {
    /// A finding drawn at random: 30 % normal, the rest evenly over the four abnormal kinds.
    pub fn random(rng: &mut Rng) -> Self {
        let side = |rng: &mut Rng| {
            if rng.uniform() < 0.5 {
                Side::Right
            } else {
                Side::Left
            }
        };
        let u = rng.uniform();
        if u < 0.3 {
            Finding::Normal
        } else if u < 0.475 {
            Finding::Cardiomegaly
        } else if u < 0.65 {
            Finding::Effusion(side(rng))
        } else if u < 0.825 {
            Finding::Pneumothorax(side(rng))
        } else {
            Finding::Consolidation(Lobe::ALL[rng.below(5)])
        }
    }

    /// A short label: `normal`, `cardiomegaly`, `effusion`, `pneumothorax`, `consolidation`.
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::Normal => "normal",
            Finding::Cardiomegaly => "cardiomegaly",
            Finding::Effusion(_) => "effusion",
            Finding::Pneumothorax(_) => "pneumothorax",
            Finding::Consolidation(_) => "consolidation",
        }
    }

    pub fn side(&self) -> Option<Side> {
        match self {
            Finding::Effusion(s) | Finding::Pneumothorax(s) => Some(*s),
            Finding::Consolidation(l) => Some(l.side()),
            _ => None,
        }
    }

    pub fn lobe(&self) -> Option<Lobe> {
        match self {
            Finding::Consolidation(l) => Some(*l),
            _ => None,
        }
    }
}

/// One rendered phantom and its truth.
#[derive(Debug, Clone)]
pub struct Phantom {
    pub finding: Finding,
    /// The drawn cardiothoracic ratio: heart width / inner thoracic width.
    pub ctr: f64,
    /// `size`×`size` intensities in [0, 1], row-major.
    pub pixels: Vec<f32>,
    pub size: usize,
    pub findings_text: String,
    pub impression_text: String,
}

impl Phantom {
    pub fn to_u8(&self) -> Vec<u8> {
        self.pixels
            .iter()
            .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }
}

// Intensities (before the final blur and noise). Air outside the body and the densest bone are
// beyond [0, 1] so that they saturate.
const AIR: f64 = -0.15;
const SOFT_TISSUE: f64 = 0.60;
const ABDOMEN: f64 = 0.61;
const LIVER: f64 = 0.62;
const LUNG: f64 = 0.20;
const PNEUMOTHORAX_AIR: f64 = 0.10;
const MEDIASTINUM: f64 = 0.80;
const HEART: f64 = 0.87;
const FLUID: f64 = 0.62;
const NOISE: f64 = 0.012;

// Thresholds of the measurements, on the same scale.
const LUNG_BELOW: f32 = 0.45;
const HEART_ABOVE: f32 = 0.75;

/// The geometry of one phantom, in normalised coordinates. Index 0 is the image's left (the
/// patient's right), 1 the image's right.
struct Anatomy {
    xm: f64,
    apex: f64,
    /// Where the costophrenic angles are (the lowest lung points).
    cp: f64,
    /// Fraction of apex→cp at which the lung fields are widest.
    widest: f64,
    half_width: [f64; 2],
    dome_top: [f64; 2],
    body_half_width: f64,
    heart_center: (f64, f64),
    heart_axes: (f64, f64),
    /// Tilt of the heart's long axis (down towards the apex, on the image's right).
    heart_tilt: f64,
    /// Pneumothorax: side and the width of the air rim.
    rim: Option<(usize, f64)>,
    /// Effusion: side, fluid level medially, meniscus rise at the wall.
    fluid: Option<(usize, f64, f64)>,
}

impl Anatomy {
    fn lung_half_width(&self, s: usize, y: f64) -> f64 {
        let t = (y - self.apex) / (self.cp - self.apex);
        if !(0.0..=1.0).contains(&t) {
            return 0.0;
        }
        let p = if t < self.widest {
            (t / self.widest * PI / 2.0).sin().powf(0.55)
        } else {
            1.0 - 0.05 * ((t - self.widest) / (1.0 - self.widest)).powi(2)
        };
        self.half_width[s] * p
    }

    /// The top of the diaphragm under the lung at horizontal offset `u` = |x − xm| / half width.
    fn diaphragm(&self, s: usize, u: f64) -> f64 {
        let dome_u = 0.45;
        let top = self.dome_top[s];
        if u >= dome_u {
            top + (self.cp - top) * ((u - dome_u) / (1.0 - dome_u)).powi(2)
        } else {
            top + 0.25 * (self.cp - top) * ((dome_u - u) / dome_u).powi(2)
        }
    }

    fn mediastinum_half_width(&self, s: usize, y: f64) -> f64 {
        if s == 0 {
            // The superior vena cava border, on the patient's right.
            0.058 + 0.01 * ((y - 0.2) / 0.3).clamp(0.0, 1.0)
        } else {
            // The aortic knob, on the patient's left.
            0.054 + 0.03 * (-((y - 0.34) / 0.035).powi(2)).exp()
        }
    }

    fn in_heart(&self, x: f64, y: f64) -> bool {
        let (cx, cy) = self.heart_center;
        let (a, b) = self.heart_axes;
        let (sin, cos) = self.heart_tilt.sin_cos();
        let (dx, dy) = (x - cx, y - cy);
        let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
        (u / a).powi(2) + (v / b).powi(2) <= 1.0
    }

    /// Leftmost and rightmost x of the heart's visible outline (above the diaphragm).
    fn heart_extent(&self) -> (f64, f64) {
        let (cx, cy) = self.heart_center;
        let (a, b) = self.heart_axes;
        let (sin, cos) = self.heart_tilt.sin_cos();
        let (mut lo, mut hi) = (f64::MAX, f64::MIN);
        for k in 0..1440 {
            let phi = k as f64 / 1440.0 * 2.0 * PI;
            let (u, v) = (a * phi.cos(), b * phi.sin());
            let (x, y) = (cx + u * cos - v * sin, cy + u * sin + v * cos);
            let (s, d) = self.side_of(x);
            if y <= self.diaphragm(s, (d / self.half_width[s]).min(1.0)) + 0.01 {
                lo = lo.min(x);
                hi = hi.max(x);
            }
        }
        (lo, hi)
    }

    /// Which hemithorax `x` is in, and its offset from the midline.
    fn side_of(&self, x: f64) -> (usize, f64) {
        if x < self.xm {
            (0, self.xm - x)
        } else {
            (1, x - self.xm)
        }
    }

    /// Inside the rib cage of either side (lung, or what fills the pleural space).
    fn in_thorax(&self, x: f64, y: f64) -> bool {
        let (s, d) = self.side_of(x);
        d <= self.lung_half_width(s, y)
            && y <= self.diaphragm(s, d / self.half_width[s])
            && d >= self.mediastinum_half_width(s, y)
            && !self.in_heart(x, y)
    }

    fn in_fluid(&self, x: f64, y: f64) -> bool {
        match self.fluid {
            Some((fs, level, rise)) => {
                let (s, d) = self.side_of(x);
                let u = d / self.half_width[s];
                s == fs && y >= level - rise * u * u
            }
            None => false,
        }
    }

    /// In the air rim of a pneumothorax: between the chest wall and the collapsed lung's edge.
    fn in_rim(&self, x: f64, y: f64) -> bool {
        match self.rim {
            Some((rs, width)) => {
                let (s, d) = self.side_of(x);
                // The rim narrows towards the base, where the lung stays against the wall.
                let t = ((y - self.apex) / (self.cp - self.apex)).clamp(0.0, 1.0);
                let w = width * (1.0 - t.powf(1.5)).max(0.0);
                s == rs && (d > self.lung_half_width(s, y) - w || y < self.apex + w)
            }
            None => false,
        }
    }

    fn body_half_width(&self, y: f64) -> f64 {
        // Neck, then the shoulders widening to the trunk.
        let neck = 0.10;
        let t = ((y - 0.04) / 0.14).clamp(0.0, 1.0);
        neck + (self.body_half_width - neck) * (t * PI / 2.0).sin()
    }
}

/// A canvas of f64 intensities.
struct Canvas {
    w: usize,
    data: Vec<f64>,
}

impl Canvas {
    /// Adds a stroke along a polyline (normalised points): a Gaussian cross-section of full width
    /// `width` and peak `amount`, only where `mask` allows. Overlapping parts of the stroke do not
    /// add up (the profile is composited by maximum before it is added).
    fn stroke(
        &mut self,
        pts: &[(f64, f64)],
        width: f64,
        amount: f64,
        mask: &dyn Fn(f64, f64) -> bool,
    ) {
        if pts.len() < 2 {
            return;
        }
        let n = self.w as f64;
        let sigma = (width * n / 2.0).max(0.5);
        let reach = 3.0 * sigma;
        let (mut x0, mut y0, mut x1, mut y1) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x * n);
            y0 = y0.min(y * n);
            x1 = x1.max(x * n);
            y1 = y1.max(y * n);
        }
        let clampi = |v: f64| v.clamp(0.0, n - 1.0) as usize;
        let (bx0, by0, bx1, by1) = (
            clampi(x0 - reach),
            clampi(y0 - reach),
            clampi(x1 + reach),
            clampi(y1 + reach),
        );
        let bw = bx1 - bx0 + 1;
        let mut cover = vec![0f64; bw * (by1 - by0 + 1)];
        for seg in pts.windows(2) {
            let ((ax, ay), (cx, cy)) = ((seg[0].0 * n, seg[0].1 * n), (seg[1].0 * n, seg[1].1 * n));
            let (sx0, sy0) = (clampi(ax.min(cx) - reach), clampi(ay.min(cy) - reach));
            let (sx1, sy1) = (clampi(ax.max(cx) + reach), clampi(ay.max(cy) + reach));
            let (dx, dy) = (cx - ax, cy - ay);
            let len2 = (dx * dx + dy * dy).max(1e-12);
            for py in sy0..=sy1 {
                for px in sx0..=sx1 {
                    let (fx, fy) = (px as f64 + 0.5, py as f64 + 0.5);
                    // Distance to the segment.
                    let t = (((fx - ax) * dx + (fy - ay) * dy) / len2).clamp(0.0, 1.0);
                    let d2 = (fx - ax - t * dx).powi(2) + (fy - ay - t * dy).powi(2);
                    let c = (-d2 / (2.0 * sigma * sigma)).exp();
                    let k = (py - by0) * bw + (px - bx0);
                    cover[k] = cover[k].max(c);
                }
            }
        }
        for py in by0..=by1 {
            for px in bx0..=bx1 {
                let c = cover[(py - by0) * bw + (px - bx0)];
                if c > 1e-3 && mask((px as f64 + 0.5) / n, (py as f64 + 0.5) / n) {
                    self.data[py * self.w + px] += amount * c;
                }
            }
        }
    }
}

/// Renders one phantom of `size`×`size` pixels.
pub fn render(size: usize, finding: Finding, rng: &mut Rng) -> Phantom {
    let j = |rng: &mut Rng, lo: f64, hi: f64| lo + (hi - lo) * rng.uniform();
    let xm = 0.5 + j(rng, -0.015, 0.015);
    let hw = j(rng, 0.34, 0.38);
    let half_width = [hw * j(rng, 0.97, 1.03), hw * j(rng, 0.97, 1.03)];
    let thoracic = half_width[0] + half_width[1];
    let target_ctr = match finding {
        Finding::Cardiomegaly => j(rng, 0.55, 0.66),
        _ => j(rng, 0.38, 0.47),
    };
    let heart_w = target_ctr * thoracic;
    let dome_right = j(rng, 0.66, 0.69);
    let dome_top = [dome_right, dome_right + j(rng, 0.01, 0.03)];
    let a = heart_w / 2.0;
    let b = a * j(rng, 0.68, 0.78);
    let apex = j(rng, 0.15, 0.18);
    let cp = j(rng, 0.80, 0.83);
    let widest = j(rng, 0.58, 0.64);
    let mut anatomy = Anatomy {
        xm,
        apex,
        cp,
        widest,
        half_width,
        dome_top,
        body_half_width: j(rng, 0.50, 0.55),
        // A third of the heart right of the midline, two thirds left; its widest row a little
        // above the left dome.
        heart_center: (xm + heart_w / 6.0, dome_top[1] - 0.2 * b),
        heart_axes: (a, b),
        heart_tilt: j(rng, 0.35, 0.55),
        rim: None,
        fluid: None,
    };
    // Size and place the tilted heart so that its visible outline spans the target width, a third
    // of it right of the midline (the patient's right, the image's left).
    for _ in 0..4 {
        let (lo, hi) = anatomy.heart_extent();
        let k = heart_w / (hi - lo);
        anatomy.heart_axes = (anatomy.heart_axes.0 * k, anatomy.heart_axes.1 * k);
        let (lo, _) = anatomy.heart_extent();
        anatomy.heart_center.0 += (xm - heart_w / 3.0) - lo;
    }
    let (lo, hi) = anatomy.heart_extent();
    let ctr = (hi - lo) / thoracic;
    let widest_y = apex + widest * (cp - apex);
    match finding {
        Finding::Pneumothorax(s) => anatomy.rim = Some((s.image_index(), j(rng, 0.035, 0.07))),
        Finding::Effusion(s) => {
            // The meniscus climbs the lateral wall but stays below the widest level, so that the
            // inner thoracic width remains measurable.
            let level = j(rng, dome_top[s.image_index()] - 0.01, cp - 0.03);
            let rise = j(rng, 0.07, (level - widest_y - 0.05).max(0.071));
            anatomy.fluid = Some((s.image_index(), level, rise));
        }
        _ => {}
    }

    // Low-frequency mottle of the lung parenchyma.
    let ripples: Vec<(f64, f64, f64, f64)> = (0..6)
        .map(|_| {
            (
                j(rng, 8.0, 22.0),
                j(rng, 8.0, 22.0),
                j(rng, 0.0, 2.0 * PI),
                j(rng, 0.004, 0.008),
            )
        })
        .collect();
    // Supersample ×2, then average down.
    let n = 2 * size;
    let nf = n as f64;
    let mut base = vec![0f64; n * n];
    let mut lung_mask = vec![false; n * n];
    for py in 0..n {
        let y = (py as f64 + 0.5) / nf;
        for px in 0..n {
            let x = (px as f64 + 0.5) / nf;
            let (s, d) = anatomy.side_of(x);
            let body = anatomy.body_half_width(y);
            // Thinner tissue towards the skin: darker.
            let mut v = if d <= body {
                SOFT_TISSUE - 0.08 * (d / body).powi(6)
            } else {
                AIR
            };
            if v > AIR {
                let below = y > anatomy.diaphragm(s, (d / half_width[s]).min(1.0))
                    && y > anatomy.apex + 0.3
                    && d <= half_width[s] * 1.02;
                if below {
                    v = if s == 0 { LIVER } else { ABDOMEN } - 0.08 * (d / body).powi(6);
                    // Gastric bubble under the left dome.
                    let (gx, gy) = (xm + 0.55 * half_width[1], dome_top[1] + 0.06);
                    if s == 1 && ((x - gx) / 0.06).powi(2) + ((y - gy) / 0.03).powi(2) < 1.0 {
                        v = 0.50;
                    }
                }
                let mediastinum_top = 0.08;
                if y > mediastinum_top
                    && y < anatomy.heart_center.1
                    && d < anatomy.mediastinum_half_width(s, y)
                {
                    v = MEDIASTINUM;
                }
                if anatomy.in_heart(x, y)
                    && y <= anatomy.diaphragm(s, (d / half_width[s]).min(1.0)) + 0.01
                {
                    v = HEART;
                }
                // The trachea: an air column in the neck and upper mediastinum, down to the carina.
                if y < 0.37 && (x - xm - 0.004).abs() < 0.016 {
                    v -= 0.26 * (1.0 - ((y - 0.33) / 0.04).clamp(0.0, 1.0));
                }
                // Humeral heads at the shoulders.
                for hx in [xm - 0.43, xm + 0.43] {
                    let r2 = ((x - hx) / 0.065).powi(2) + ((y - 0.17) / 0.075).powi(2);
                    if r2 < 1.0 && d <= body {
                        v += 0.2 * (1.0 - r2).sqrt();
                    }
                }
                if anatomy.in_thorax(x, y) {
                    if anatomy.in_fluid(x, y) {
                        v = FLUID;
                    } else if anatomy.in_rim(x, y) {
                        v = PNEUMOTHORAX_AIR;
                    } else {
                        // Overlapping chest wall laterally and soft tissue at the bases.
                        let u = d / anatomy.lung_half_width(s, y).max(1e-6);
                        let t = ((y - anatomy.apex) / (anatomy.cp - anatomy.apex)).clamp(0.0, 1.0);
                        v = LUNG + 0.05 * u.powi(4) + 0.03 * t * t + texture(x, y, &ripples);
                        lung_mask[py * n + px] = true;
                    }
                }
            }
            base[py * n + px] = v;
        }
    }

    let mut canvas = Canvas { w: n, data: base };
    let inside_body = |x: f64, y: f64| (x - xm).abs() <= anatomy.body_half_width(y);
    let lung_at = |x: f64, y: f64| {
        let (px, py) = ((x * nf) as usize, (y * nf) as usize);
        px < n && py < n && lung_mask[py * n + px]
    };

    draw_hila_and_markings(&mut canvas, &anatomy, rng, &lung_at);
    draw_pleural_line(&mut canvas, &anatomy);
    if let Finding::Consolidation(lobe) = finding {
        draw_consolidation(&mut canvas, &anatomy, lobe, rng, &lung_at);
    }
    draw_spine(&mut canvas, &anatomy);
    draw_ribs(&mut canvas, &anatomy, rng, &inside_body);
    draw_clavicles(&mut canvas, &anatomy, rng);

    // Down-sample, blur lightly, add noise, saturate.
    let mut pixels = vec![0f64; size * size];
    for y in 0..size {
        for x in 0..size {
            let mut acc = 0.0;
            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                acc += canvas.data[(2 * y + dy) * n + 2 * x + dx];
            }
            pixels[y * size + x] = acc / 4.0;
        }
    }
    let pixels = blur3(&blur3(&pixels, size), size);
    let pixels: Vec<f32> = pixels
        .iter()
        .map(|&v| (v + NOISE * rng.normal()).clamp(0.0, 1.0) as f32)
        .collect();
    let (findings_text, impression_text) = report(finding, rng);
    Phantom {
        finding,
        ctr,
        pixels,
        size,
        findings_text,
        impression_text,
    }
}

/// A sum of plane waves: soft texture of a few thousandths.
fn texture(x: f64, y: f64, ripples: &[(f64, f64, f64, f64)]) -> f64 {
    ripples
        .iter()
        .map(|&(fx, fy, ph, amp)| amp * (fx * x + fy * y + ph).sin())
        .sum()
}

/// A 3×3 binomial blur (the detector's point spread).
fn blur3(src: &[f64], size: usize) -> Vec<f64> {
    let k = [1.0, 2.0, 1.0];
    let at = |x: i64, y: i64| {
        src[(y.clamp(0, size as i64 - 1) as usize) * size + x.clamp(0, size as i64 - 1) as usize]
    };
    let mut out = vec![0f64; size * size];
    for y in 0..size as i64 {
        for x in 0..size as i64 {
            let mut acc = 0.0;
            for (j, ky) in k.iter().enumerate() {
                for (i, kx) in k.iter().enumerate() {
                    acc += ky * kx * at(x + i as i64 - 1, y + j as i64 - 1);
                }
            }
            out[y as usize * size + x as usize] = acc / 16.0;
        }
    }
    out
}

fn draw_hila_and_markings(
    canvas: &mut Canvas,
    a: &Anatomy,
    rng: &mut Rng,
    lung_at: &dyn Fn(f64, f64) -> bool,
) {
    for s in 0..2 {
        let sign = if s == 0 { -1.0 } else { 1.0 };
        let hilum = (
            a.xm + sign * (a.mediastinum_half_width(s, 0.45) + 0.03),
            0.45 + 0.01 * s as f64,
        );
        // The hilum itself: pulmonary arteries, denser than lung.
        canvas.stroke(
            &[
                (hilum.0, hilum.1 - 0.05),
                (hilum.0 + sign * 0.01, hilum.1 + 0.06),
            ],
            0.035,
            0.20,
            &|x, y| lung_at(x, y),
        );
        // Vessels: branching random walks out of the hilum, thinner and fainter outwards.
        let mut stack: Vec<((f64, f64), f64, f64, usize)> = Vec::new();
        for k in 0..7 {
            let angle = -PI / 2.0 + (k as f64 + 0.5) / 7.0 * PI * 1.05 - 0.05;
            stack.push((hilum, angle, 0.012, 0));
        }
        while let Some((p, angle, width, depth)) = stack.pop() {
            let len = 0.05 * (0.85f64).powi(depth as i32) * (0.7 + 0.6 * rng.uniform());
            let dir_x = sign * angle.cos();
            let dir_y = angle.sin();
            let q = (p.0 + dir_x * len, p.1 + dir_y * len);
            canvas.stroke(&[p, q], width, 0.09 * (width / 0.012), &|x, y| {
                lung_at(x, y)
            });
            if depth < 5 && lung_at(q.0, q.1) {
                let spread = 0.25 + 0.2 * rng.uniform();
                stack.push((q, angle - spread, width * 0.75, depth + 1));
                stack.push((q, angle + spread, width * 0.75, depth + 1));
            }
        }
    }
}

/// The visceral pleural line of a pneumothorax: a thin white line along the collapsed lung edge.
fn draw_pleural_line(canvas: &mut Canvas, a: &Anatomy) {
    let Some((s, width)) = a.rim else { return };
    let sign = if s == 0 { -1.0 } else { 1.0 };
    let mut pts = Vec::new();
    let steps = 60;
    for k in 0..=steps {
        let y = a.apex + width + (a.cp - a.apex - width) * k as f64 / steps as f64;
        let t = ((y - a.apex) / (a.cp - a.apex)).clamp(0.0, 1.0);
        let w = width * (1.0 - t.powf(1.5)).max(0.0);
        let d = a.lung_half_width(s, y) - w;
        if d > a.mediastinum_half_width(s, y) + 0.02 && w > 0.004 {
            pts.push((a.xm + sign * d, y));
        }
    }
    canvas.stroke(&pts, 0.004, 0.16, &|_, _| true);
}

fn draw_consolidation(
    canvas: &mut Canvas,
    a: &Anatomy,
    lobe: Lobe,
    rng: &mut Rng,
    lung_at: &dyn Fn(f64, f64) -> bool,
) {
    let s = lobe.side().image_index();
    let sign = if s == 0 { -1.0 } else { 1.0 };
    let height = a.cp - a.apex;
    // Centre of the opacity: (fraction of the half width from the midline, fraction of the height).
    let (u, t) = match lobe {
        Lobe::RightUpper | Lobe::LeftUpper => (0.55, 0.25),
        Lobe::RightMiddle => (0.42, 0.62),
        Lobe::RightLower | Lobe::LeftLower => (0.62, 0.72),
    };
    let (cx, cy) = (a.xm + sign * u * a.half_width[s], a.apex + t * height);
    let n = canvas.w as f64;
    let radius = 0.06 + 0.02 * rng.uniform();
    // A cluster of soft blobs: patchy airspace opacity.
    let blobs: Vec<(f64, f64, f64)> = (0..9)
        .map(|_| {
            let r = radius * (0.35 + 0.35 * rng.uniform());
            let ang = rng.uniform() * 2.0 * PI;
            let dist = radius * 0.6 * rng.uniform();
            (cx + dist * ang.cos(), cy + dist * ang.sin(), r)
        })
        .collect();
    for py in 0..canvas.w {
        for px in 0..canvas.w {
            let (x, y) = ((px as f64 + 0.5) / n, (py as f64 + 0.5) / n);
            if (x - cx).abs() > 2.0 * radius || (y - cy).abs() > 2.0 * radius || !lung_at(x, y) {
                continue;
            }
            let density: f64 = blobs
                .iter()
                .map(|(bx, by, r)| (-((x - bx).powi(2) + (y - by).powi(2)) / (2.0 * r * r)).exp())
                .sum::<f64>()
                .min(1.0);
            canvas.data[py * canvas.w + px] += 0.26 * density;
        }
    }
}

fn draw_spine(canvas: &mut Canvas, a: &Anatomy) {
    let n = canvas.w as f64;
    let half = 0.034;
    for py in 0..canvas.w {
        let y = (py as f64 + 0.5) / n;
        if y < 0.05 {
            continue;
        }
        // Vertebral bodies with darker disc spaces.
        let phase = ((y - 0.05) / 0.047).fract();
        let body = if (0.12..0.88).contains(&phase) {
            1.0
        } else {
            0.55
        };
        for px in 0..canvas.w {
            let x = (px as f64 + 0.5) / n;
            let d = (x - a.xm).abs();
            if d > half {
                continue;
            }
            let edge = (1.0 - (d / half).powi(6)).max(0.0);
            let i = py * canvas.w + px;
            // Behind the mediastinum and heart the spine shows faintly; below, fully.
            let over = if canvas.data[i] >= MEDIASTINUM - 0.01 {
                0.03
            } else {
                0.10
            };
            canvas.data[i] += over * body * edge;
        }
    }
}

fn draw_ribs(
    canvas: &mut Canvas,
    a: &Anatomy,
    rng: &mut Rng,
    inside_body: &dyn Fn(f64, f64) -> bool,
) {
    for s in 0..2 {
        let sign = if s == 0 { -1.0 } else { 1.0 };
        for i in 0..11 {
            let y0 = a.apex - 0.035 + i as f64 * 0.053 + 0.004 * rng.normal();
            // Posterior rib: from the spine, rising a little, then sweeping down laterally.
            let post: Vec<(f64, f64)> = (0..=24)
                .map(|k| {
                    let t = k as f64 / 24.0;
                    let x = a.xm + sign * (0.035 + t * (a.half_width[s] + 0.02));
                    (x, y0 - 0.035 * t + 0.15 * t * t)
                })
                .collect();
            let within = |x: f64, y: f64| inside_body(x, y) && y < a.cp + 0.04;
            canvas.stroke(&post, 0.017, 0.07, &within);
            // Anterior rib: fainter, from the lateral wall down towards the sternum.
            if i < 6 {
                let ant: Vec<(f64, f64)> = (0..=16)
                    .map(|k| {
                        let t = k as f64 / 16.0;
                        let x = a.xm + sign * (a.half_width[s] * (1.0 - 0.8 * t));
                        (x, y0 + 0.07 + 0.12 * t - 0.03 * t * t)
                    })
                    .collect();
                canvas.stroke(&ant, 0.013, 0.035, &within);
            }
        }
    }
}

fn draw_clavicles(canvas: &mut Canvas, a: &Anatomy, rng: &mut Rng) {
    for s in 0..2 {
        let sign = if s == 0 { -1.0 } else { 1.0 };
        let y0 = 0.19 + 0.01 * rng.normal();
        let pts: Vec<(f64, f64)> = (0..=20)
            .map(|k| {
                let t = k as f64 / 20.0;
                let x = a.xm + sign * (0.035 + t * 0.30);
                // A gentle S: down from the sternum, then up to the shoulder.
                (x, y0 - 0.07 * t + 0.02 * (t * PI * 2.0).sin() * (1.0 - t))
            })
            .collect();
        canvas.stroke(&pts, 0.024, 0.42, &|_, _| true);
    }
}

/// Report text describing exactly what was drawn, in the style of IU-CXR reports.
fn report(finding: Finding, rng: &mut Rng) -> (String, String) {
    let pick = |rng: &mut Rng, xs: &[&str]| xs[rng.below(xs.len())].to_string();
    let heart_normal = pick(
        rng,
        &[
            "The heart size is normal.",
            "Heart size is within normal limits.",
            "Normal cardiac silhouette.",
        ],
    );
    let lungs_clear = pick(
        rng,
        &[
            "The lungs are clear.",
            "Lungs are clear bilaterally.",
            "No focal airspace consolidation.",
        ],
    );
    let no_pleural = pick(
        rng,
        &[
            "No pleural effusion or pneumothorax.",
            "There is no pleural effusion or pneumothorax.",
        ],
    );
    match finding {
        Finding::Normal => (
            format!("{heart_normal} {lungs_clear} {no_pleural}"),
            pick(
                rng,
                &[
                    "No acute cardiopulmonary abnormality.",
                    "Normal chest.",
                    "No acute disease.",
                ],
            ),
        ),
        Finding::Cardiomegaly => (
            format!(
                "{} {lungs_clear} {no_pleural}",
                pick(
                    rng,
                    &[
                        "The heart is enlarged.",
                        "The cardiac silhouette is enlarged.",
                        "Cardiac enlargement."
                    ]
                )
            ),
            pick(
                rng,
                &[
                    "Cardiomegaly.",
                    "Cardiomegaly without acute pulmonary disease.",
                ],
            ),
        ),
        Finding::Effusion(side) => {
            let s = side.name();
            (
                format!(
                    "{heart_normal} Blunting of the {s} costophrenic angle with a meniscus. No pneumothorax."
                ),
                format!("{} pleural effusion.", capitalise(s)),
            )
        }
        Finding::Pneumothorax(side) => {
            let s = side.name();
            (
                format!(
                    "{heart_normal} A {s} pleural line is seen with no lung markings beyond it. No pleural effusion."
                ),
                format!("{} pneumothorax.", capitalise(s)),
            )
        }
        Finding::Consolidation(lobe) => {
            let l = lobe.name();
            (
                format!("{heart_normal} Focal airspace consolidation in the {l}. {no_pleural}"),
                format!("{} pneumonia.", capitalise(l)),
            )
        }
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map_or(String::new(), |f| f.to_uppercase().chain(c).collect())
}

/// The truth columns `write_dataset` adds to `indiana_reports.csv`.
pub const TRUTH_COLUMNS: [&str; 4] = ["finding", "side", "lobe", "ctr"];

/// Writes `n` phantoms in the Kaggle IU-CXR layout (`indiana_reports.csv` with the truth columns
/// [`TRUTH_COLUMNS`], `indiana_projections.csv`, `images/images_normalized/<uid>_IM-….dcm.png`),
/// so that they run through the real loaders. Image `i` depends only on `seed` and `i`.
pub fn write_dataset(
    dir: &std::path::Path,
    n: usize,
    size: usize,
    seed: u64,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use rayon::prelude::*;
    let images = dir.join("images/images_normalized");
    std::fs::create_dir_all(&images)
        .with_context(|| format!("cannot create {}", images.display()))?;
    let rows: Vec<anyhow::Result<(Vec<String>, [String; 3])>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let finding = Finding::random(&mut rng);
            let p = render(size, finding, &mut rng);
            let uid = (i + 1).to_string();
            let file = format!("{uid}_IM-{:04}-1001.dcm.png", i % 10_000);
            let path = images.join(&file);
            image::GrayImage::from_raw(size as u32, size as u32, p.to_u8())
                .expect("size×size pixels")
                .save(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            progress.inc(1);
            let problems = match finding {
                Finding::Normal => "normal".to_string(),
                Finding::Cardiomegaly => "Cardiomegaly".to_string(),
                Finding::Effusion(s) => format!("Pleural Effusion/{}", s.name()),
                Finding::Pneumothorax(s) => format!("Pneumothorax/{}", s.name()),
                Finding::Consolidation(l) => format!("Pneumonia/{}", l.name()),
            };
            let report = vec![
                uid.clone(),
                problems.clone(),
                problems,
                "Xray Chest PA".to_string(),
                "Phantom.".to_string(),
                "None.".to_string(),
                p.findings_text,
                p.impression_text,
                finding.kind().to_string(),
                finding
                    .side()
                    .map_or(String::new(), |s| s.name().to_string()),
                finding
                    .lobe()
                    .map_or(String::new(), |l| l.name().to_string()),
                format!("{:.4}", p.ctr),
            ];
            Ok((report, [uid, file, "Frontal".to_string()]))
        })
        .collect();
    let mut reports = csv::Writer::from_path(dir.join("indiana_reports.csv"))?;
    let mut projections = csv::Writer::from_path(dir.join("indiana_projections.csv"))?;
    let mut header = vec![
        "uid",
        "MeSH",
        "Problems",
        "image",
        "indication",
        "comparison",
        "findings",
        "impression",
    ];
    header.extend(TRUTH_COLUMNS);
    reports.write_record(&header)?;
    projections.write_record(["uid", "filename", "projection"])?;
    for row in rows {
        let (report, projection) = row?;
        reports.write_record(&report)?;
        projections.write_record(&projection)?;
    }
    reports.flush()?;
    projections.flush()?;
    Ok(())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_phantom() {
        let a = render(64, Finding::Cardiomegaly, &mut Rng::new(5));
        let b = render(64, Finding::Cardiomegaly, &mut Rng::new(5));
        assert_eq!(a.pixels, b.pixels);
        assert_eq!(a.findings_text, b.findings_text);
    }

    #[test]
    fn reports_name_the_finding_and_side() {
        let p = render(32, Finding::Effusion(Side::Left), &mut Rng::new(1));
        assert!(p.findings_text.contains("left costophrenic angle"));
        assert_eq!(p.impression_text, "Left pleural effusion.");
        let p = render(
            32,
            Finding::Consolidation(Lobe::RightMiddle),
            &mut Rng::new(1),
        );
        assert_eq!(p.impression_text, "Right middle lobe pneumonia.");
    }
}
