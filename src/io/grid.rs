//! Contact sheets: images tiled into one PNG (sample grids, phantoms beside real images).

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::GrayImage;

/// Tiles `images` row by row, `cols` per row, each resized to `tile`×`tile`, with a `gap`-pixel
/// black border between tiles.
pub fn tile(images: &[GrayImage], cols: usize, tile: u32, gap: u32) -> Result<GrayImage> {
    if images.is_empty() || cols == 0 {
        bail!("a grid needs at least one image and one column");
    }
    let rows = images.len().div_ceil(cols) as u32;
    let cols_u = cols.min(images.len()) as u32;
    let mut sheet = GrayImage::new(cols_u * (tile + gap) + gap, rows * (tile + gap) + gap);
    for (i, img) in images.iter().enumerate() {
        let resized = image::imageops::resize(img, tile, tile, FilterType::Triangle);
        let (c, r) = ((i % cols) as u32, (i / cols) as u32);
        image::imageops::replace(
            &mut sheet,
            &resized,
            (gap + c * (tile + gap)) as i64,
            (gap + r * (tile + gap)) as i64,
        );
    }
    Ok(sheet)
}

/// Reads `files` (any format the decoder knows), tiles them and writes a PNG to `out`.
pub fn write_grid(
    files: &[impl AsRef<Path>],
    cols: usize,
    tile_size: u32,
    out: &Path,
) -> Result<()> {
    let images = files
        .iter()
        .map(|f| {
            let f = f.as_ref();
            Ok(image::open(f)
                .with_context(|| format!("cannot read image {}", f.display()))?
                .to_luma8())
        })
        .collect::<Result<Vec<_>>>()?;
    crate::io::fs::replace_image(out, tile(&images, cols, tile_size, 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_land_in_row_major_order() {
        let imgs: Vec<GrayImage> = (0..5)
            .map(|i| GrayImage::from_pixel(4, 4, image::Luma([50 * i as u8])))
            .collect();
        let sheet = tile(&imgs, 3, 8, 2).unwrap();
        assert_eq!(sheet.dimensions(), (3 * 10 + 2, 2 * 10 + 2));
        assert_eq!(sheet.get_pixel(2 + 4, 2 + 4).0[0], 0);
        assert_eq!(sheet.get_pixel(12 + 4, 2 + 4).0[0], 50);
        assert_eq!(
            sheet.get_pixel(12 + 4, 12 + 4).0[0],
            200,
            "fifth image: row 2, column 2"
        );
        assert_eq!(
            sheet.get_pixel(22 + 4, 12 + 4).0[0],
            0,
            "empty cell stays black"
        );
    }
}
