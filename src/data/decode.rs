//! Decoding radiographs: any PNG (8- or 16-bit, gray or colour) or JPEG to a square grayscale
//! image, resized bilinearly and stretched to the full 8-bit range.

use std::path::Path;

use image::imageops::FilterType;
use image::{ImageBuffer, Luma};

/// Reads `path` and returns `size`×`size` 8-bit grayscale pixels, row-major.
///
/// Colour is converted to luma (Rec. 709 weights, the `image` crate's), the image is resized to
/// the square with bilinear filtering ("Triangle"; it widens its support when shrinking, so it does
/// not alias), and its values are stretched to [0, 255] by its own minimum and maximum: the
/// paper's x' = (x − min) / (max − min) before the final scaling to [−1, 1] at training time.
/// Errors are one-line reasons fit for a summary: missing file, empty file, undecodable data.
pub fn load_gray(path: &Path, size: u32) -> Result<Vec<u8>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("missing file".into()),
        Err(e) => return Err(format!("unreadable file: {e}")),
    };
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let img = image::load_from_memory(&bytes).map_err(|e| format!("cannot decode image: {e}"))?;
    let gray: ImageBuffer<Luma<f32>, Vec<f32>> = img.to_luma32f();
    let resized = image::imageops::resize(&gray, size, size, FilterType::Triangle);
    let (lo, hi) = resized
        .as_raw()
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = hi - lo;
    Ok(resized
        .as_raw()
        .iter()
        .map(|&v| {
            if range > 0.0 {
                ((v - lo) / range * 255.0).round() as u8
            } else {
                0
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
        dir.path().join(name)
    }

    #[test]
    fn reads_8_and_16_bit_png_and_jpeg_alike() {
        let dir = tempfile::tempdir().unwrap();
        // A horizontal ramp, saved three ways.
        let ramp8 = ImageBuffer::from_fn(32, 16, |x, _| Luma([(x * 8) as u8]));
        let ramp16: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_fn(32, 16, |x, _| Luma([(x * 8 * 257) as u16]));
        let (p8, p16, jpg) = (
            tmp(&dir, "r8.png"),
            tmp(&dir, "r16.png"),
            tmp(&dir, "r.jpg"),
        );
        ramp8.save(&p8).unwrap();
        ramp16.save(&p16).unwrap();
        image::DynamicImage::ImageLuma8(ramp8)
            .to_rgb8()
            .save(&jpg)
            .unwrap();
        let a = load_gray(&p8, 16).unwrap();
        let b = load_gray(&p16, 16).unwrap();
        let c = load_gray(&jpg, 16).unwrap();
        assert_eq!(a.len(), 256);
        assert_eq!(a, b, "16-bit and 8-bit sources give the same pixels");
        assert_eq!((a[0], a[15]), (0, 255), "stretched to the full range");
        let max_diff = a.iter().zip(&c).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(
            max_diff <= 12,
            "JPEG within its compression error: {max_diff}"
        );
    }

    #[test]
    fn failures_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load_gray(&tmp(&dir, "absent.png"), 8).unwrap_err(),
            "missing file"
        );
        let empty = tmp(&dir, "empty.png");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(load_gray(&empty, 8).unwrap_err(), "empty file");
        let good = tmp(&dir, "good.png");
        ImageBuffer::from_fn(64, 64, |x, y| Luma([(x ^ y) as u8]))
            .save(&good)
            .unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let cut = tmp(&dir, "cut.png");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(load_gray(&cut, 8)
            .unwrap_err()
            .starts_with("cannot decode image"));
    }
}
