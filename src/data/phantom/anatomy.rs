//! The geometry of one phantom chest: lung fields, diaphragm, mediastinum, heart, and where a
//! finding's air or fluid lies.

use std::f64::consts::PI;

/// The geometry of one phantom, in normalised coordinates. Index 0 is the image's left (the
/// patient's right), 1 the image's right.
pub(super) struct Anatomy {
    pub(super) xm: f64,
    pub(super) apex: f64,
    /// Where the costophrenic angles are (the lowest lung points).
    pub(super) cp: f64,
    /// Fraction of apex→cp at which the lung fields are widest.
    pub(super) widest: f64,
    pub(super) half_width: [f64; 2],
    pub(super) dome_top: [f64; 2],
    pub(super) body_half_width: f64,
    pub(super) heart_center: (f64, f64),
    pub(super) heart_axes: (f64, f64),
    /// Tilt of the heart's long axis (down towards the apex, on the image's right).
    pub(super) heart_tilt: f64,
    /// Pneumothorax: side and the width of the air rim.
    pub(super) rim: Option<(usize, f64)>,
    /// Effusion: side, fluid level medially, meniscus rise at the wall.
    pub(super) fluid: Option<(usize, f64, f64)>,
}

impl Anatomy {
    pub(super) fn lung_half_width(&self, s: usize, y: f64) -> f64 {
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
    pub(super) fn diaphragm(&self, s: usize, u: f64) -> f64 {
        let dome_u = 0.45;
        let top = self.dome_top[s];
        if u >= dome_u {
            top + (self.cp - top) * ((u - dome_u) / (1.0 - dome_u)).powi(2)
        } else {
            top + 0.25 * (self.cp - top) * ((dome_u - u) / dome_u).powi(2)
        }
    }

    pub(super) fn mediastinum_half_width(&self, s: usize, y: f64) -> f64 {
        if s == 0 {
            // The superior vena cava border, on the patient's right.
            0.058 + 0.01 * ((y - 0.2) / 0.3).clamp(0.0, 1.0)
        } else {
            // The aortic knob, on the patient's left.
            0.054 + 0.03 * (-((y - 0.34) / 0.035).powi(2)).exp()
        }
    }

    pub(super) fn in_heart(&self, x: f64, y: f64) -> bool {
        let (cx, cy) = self.heart_center;
        let (a, b) = self.heart_axes;
        let (sin, cos) = self.heart_tilt.sin_cos();
        let (dx, dy) = (x - cx, y - cy);
        let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
        (u / a).powi(2) + (v / b).powi(2) <= 1.0
    }

    /// Leftmost and rightmost x of the heart's visible outline (above the diaphragm).
    pub(super) fn heart_extent(&self) -> (f64, f64) {
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
    pub(super) fn side_of(&self, x: f64) -> (usize, f64) {
        if x < self.xm {
            (0, self.xm - x)
        } else {
            (1, x - self.xm)
        }
    }

    /// Inside the rib cage of either side (lung, or what fills the pleural space).
    pub(super) fn in_thorax(&self, x: f64, y: f64) -> bool {
        let (s, d) = self.side_of(x);
        d <= self.lung_half_width(s, y)
            && y <= self.diaphragm(s, d / self.half_width[s])
            && d >= self.mediastinum_half_width(s, y)
            && !self.in_heart(x, y)
    }

    pub(super) fn in_fluid(&self, x: f64, y: f64) -> bool {
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
    pub(super) fn in_rim(&self, x: f64, y: f64) -> bool {
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

    pub(super) fn body_half_width(&self, y: f64) -> f64 {
        // Neck, then the shoulders widening to the trunk.
        let neck = 0.10;
        let t = ((y - 0.04) / 0.14).clamp(0.0, 1.0);
        neck + (self.body_half_width - neck) * (t * PI / 2.0).sin()
    }
}
