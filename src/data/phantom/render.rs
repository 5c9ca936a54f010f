//! Drawing a phantom: the anatomy as intensities, then vessels, ribs, clavicles, spine and the
//! finding, supersampled, blurred and noised as a detector would.

use std::f64::consts::PI;

use super::anatomy::Anatomy;
use super::report::report;
use super::{Finding, Lobe, Phantom};
use crate::rng::Rng;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::phantom::Side;

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
