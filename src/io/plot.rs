//! Loss curves and confusion matrices as PNG: a small line plot with a log-scale y axis, and a
//! table of shaded cells; ticks and labels drawn with the built-in 3×5 pixel font of font.rs (no font
//! files, no plotting dependency).

use image::{Rgb, RgbImage};

use super::font;

/// One curve.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
    pub color: [u8; 3],
    /// Mark each point (for sparse series such as validation losses).
    pub markers: bool,
}

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const SCALE: u32 = 2; // font pixel size

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Writes `s` with its top-left corner at (x, y) in the plot's font size.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    font::text(img, x, y, s, SCALE, c);
}

fn text_width(s: &str) -> i64 {
    font::text_width(s, SCALE)
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
    for i in 0..=n {
        let t = i as f64 / n as f64;
        put(
            img,
            (x0 + (x1 - x0) * t).round() as i64,
            (y0 + (y1 - y0) * t).round() as i64,
            c,
        );
    }
}

/// A short label for an axis value.
fn label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if (1e-3..1e5).contains(&a) {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        format!("{v:.0e}")
    }
}

/// "Nice" tick positions covering [lo, hi], about `n` of them.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + 1e-9 * span {
        out.push(t);
        t += step;
    }
    out
}

/// Round values (1, 2, 5 × 10^k) between 10^lo and 10^hi; only powers of ten when that gives
/// enough of them.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut all = Vec::new();
    for k in (lo.floor() as i32)..=(hi.ceil() as i32) {
        for m in [1.0, 2.0, 5.0] {
            let v: f64 = m * 10f64.powi(k);
            let l = v.log10();
            if l >= lo - 1e-9 && l <= hi + 1e-9 {
                all.push(v);
            }
        }
    }
    let decades: Vec<f64> = all
        .iter()
        .copied()
        .filter(|v| (v.log10() - v.log10().round()).abs() < 1e-9)
        .collect();
    if decades.len() >= 3 {
        decades
    } else {
        all
    }
}

/// Plots `series` against x (steps) with a log10 y axis, `width`×`height` pixels, with a legend
/// and the axis titles `x_title`, `y_title`. Non-positive or non-finite y values are skipped.
pub fn plot(series: &[Series], width: u32, height: u32, x_title: &str, y_title: &str) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, WHITE);
    let (left, right, top, bottom) = (70.0, width as f64 - 20.0, 30.0, height as f64 - 40.0);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(_, y)| y.is_finite() && *y > 0.0)
        .collect();
    if pts.is_empty() {
        text(&mut img, left as i64, top as i64, "no data", INK);
        return img;
    }
    let (xmin, xmax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(p.1.log10()), b.max(p.1.log10()))
    });
    let (ymin, ymax) = if ymax - ymin < 0.1 {
        (ymin - 0.05, ymax + 0.05)
    } else {
        (ymin, ymax)
    };
    let xmax = if xmax > xmin { xmax } else { xmin + 1.0 };
    let sx = |x: f64| left + (x - xmin) / (xmax - xmin) * (right - left);
    let sy = |ly: f64| bottom - (ly - ymin) / (ymax - ymin) * (bottom - top);

    for t in ticks(xmin, xmax, 6) {
        let x = sx(t);
        line(&mut img, (x, top), (x, bottom), GRID);
        let l = label(t);
        text(
            &mut img,
            x as i64 - text_width(&l) / 2,
            bottom as i64 + 6,
            &l,
            INK,
        );
    }
    for v in log_ticks(ymin, ymax) {
        let y = sy(v.log10());
        line(&mut img, (left, y), (right, y), GRID);
        let l = label(v);
        text(
            &mut img,
            left as i64 - 6 - text_width(&l),
            y as i64 - 5,
            &l,
            INK,
        );
    }
    line(&mut img, (left, top), (left, bottom), INK);
    line(&mut img, (left, bottom), (right, bottom), INK);
    text(
        &mut img,
        ((left + right) / 2.0) as i64 - text_width(x_title) / 2,
        height as i64 - 14,
        x_title,
        INK,
    );
    text(&mut img, 6, 8, y_title, INK);

    for (k, s) in series.iter().enumerate() {
        let c = Rgb(s.color);
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in &s.points {
            if !(y.is_finite() && y > 0.0) {
                prev = None;
                continue;
            }
            let p = (sx(x), sy(y.log10()));
            if let Some(q) = prev {
                line(&mut img, q, p, c);
            }
            if s.markers {
                for dy in -2..=2 {
                    for dx in -2..=2 {
                        put(&mut img, p.0 as i64 + dx, p.1 as i64 + dy, c);
                    }
                }
            }
            prev = Some(p);
        }
        // Legend, top right.
        let lx = right as i64 - 90;
        let ly = top as i64 + 4 + k as i64 * 14;
        for dx in 0..16 {
            for dy in 0..3 {
                put(&mut img, lx + dx, ly + 4 + dy, c);
            }
        }
        text(&mut img, lx + 22, ly, s.name, INK);
    }
    img
}

/// A confusion matrix (`counts[truth][predicted]`) as a table: rows are the true classes, named
/// on the left with their index; columns the predicted ones, headed by the same index. Each cell
/// holds its count, shaded by its share of its row (the class's recall on the diagonal).
pub fn confusion_matrix(names: &[String], counts: &[Vec<usize>]) -> RgbImage {
    const CELL: i64 = 56;
    let labels: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i} {n}"))
        .collect();
    let left = 12 + labels.iter().map(|l| text_width(l)).max().unwrap_or(0) + 10;
    let top = 70;
    let k = counts.len() as i64;
    let width = (left + k * CELL + 12).max(12 + text_width(TITLE) + 12);
    let mut img = RgbImage::from_pixel(width as u32, (top + k * CELL + 12) as u32, WHITE);
    text(&mut img, 12, 10, TITLE, INK);
    text(&mut img, left, 38, "predicted", INK);
    for (i, row) in counts.iter().enumerate() {
        let y = top + i as i64 * CELL;
        text(&mut img, 12, y + CELL / 2 - 5, &labels[i], INK);
        let total: usize = row.iter().sum();
        for (j, &n) in row.iter().enumerate() {
            let x = left + j as i64 * CELL;
            if i == 0 {
                let head = j.to_string();
                text(
                    &mut img,
                    x + CELL / 2 - text_width(&head) / 2,
                    top - 12,
                    &head,
                    INK,
                );
            }
            let share = if total == 0 {
                0.0
            } else {
                n as f64 / total as f64
            };
            // White to a dark blue; the count in white on the darker half.
            let shade = |full: f64, dark: f64| (full + (dark - full) * share).round() as u8;
            let fill = Rgb([shade(255.0, 20.0), shade(255.0, 60.0), shade(255.0, 140.0)]);
            for dy in 1..CELL {
                for dx in 1..CELL {
                    put(&mut img, x + dx, y + dy, fill);
                }
            }
            let ink = if share > 0.5 { WHITE } else { INK };
            let s = n.to_string();
            text(
                &mut img,
                x + CELL / 2 - text_width(&s) / 2,
                y + CELL / 2 - 5,
                &s,
                ink,
            );
        }
    }
    img
}

const TITLE: &str = "rows: true class, columns: predicted";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(0.0, 100.0, 5),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        let t = ticks(-2.3, -0.4, 5);
        assert!(t.first().unwrap() >= &-2.3 && t.last().unwrap() <= &-0.4 && t.len() >= 3);
    }

    #[test]
    fn log_ticks_are_round() {
        assert_eq!(log_ticks(-2.0, 0.0), vec![0.01, 0.1, 1.0]);
        let t = log_ticks(-1.4, -0.5);
        assert_eq!(t.len(), 3);
        assert!(
            (t[0] - 0.05).abs() < 1e-12 && (t[1] - 0.1).abs() < 1e-12 && (t[2] - 0.2).abs() < 1e-12
        );
    }

    #[test]
    fn curves_land_where_their_values_say() {
        let s = [Series {
            name: "train",
            points: vec![(0.0, 1.0), (10.0, 0.01)],
            color: [255, 0, 0],
            markers: true,
        }];
        let img = plot(&s, 300, 200, "step", "loss");
        // The first point is at the top left of the plot area, the last at the bottom right.
        let red = |x: u32, y: u32| img.get_pixel(x, y).0 == [255, 0, 0];
        assert!(red(70, 30), "first point at (left, top)");
        assert!(red(280, 160), "last point at (right, bottom)");
        assert!(!red(150, 40), "nothing where the line is not");
    }

    #[test]
    fn confusion_cells_are_shaded_by_their_row_share() {
        let names = ["normal".to_string(), "Effusion".to_string()];
        let img = confusion_matrix(&names, &[vec![3, 1], vec![0, 4]]);
        let left = 12 + text_width("1 effusion") + 10;
        // A cell's corner pixel (inside its 1-pixel border, away from the count).
        let corner = |i: i64, j: i64| {
            img.get_pixel((left + j * 56 + 2) as u32, (70 + i * 56 + 2) as u32)
                .0
        };
        assert_eq!(corner(1, 0), [255, 255, 255], "an empty cell stays white");
        assert_eq!(corner(1, 1), [20, 60, 140], "a full row's cell is darkest");
        let (a, b) = (corner(0, 0), corner(0, 1));
        assert!(
            a[0] < b[0] && b[0] < 255,
            "3 of 4 darker than 1 of 4: {a:?} {b:?}"
        );
    }
}
