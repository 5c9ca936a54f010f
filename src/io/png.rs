//! Grayscale PNG files with text metadata (prompt, seed, sampler, the synthetic-image notice), and
//! reading that metadata back.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Pixel data of a square grayscale image.
pub enum Pixels<'a> {
    Eight(&'a [u8]),
    Sixteen(&'a [u16]),
}

/// Writes a `size`×`size` grayscale PNG with UTF-8 text chunks (iTXt), atomically: to a temporary
/// file first, then renamed, so that a stopped run never leaves a half-written image.
pub fn write(path: &Path, pixels: Pixels, size: u32, text: &[(&str, String)]) -> Result<()> {
    let bytes =
        encode(pixels, size, text).with_context(|| format!("cannot write {}", path.display()))?;
    super::fs::replace(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// The PNG file [`write`] writes, as bytes.
fn encode(pixels: Pixels, size: u32, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, size, size);
        enc.set_color(png::ColorType::Grayscale);
        for (k, v) in text {
            enc.add_itxt_chunk(k.to_string(), v.clone())?;
        }
        let (data, bytes_per_pixel): (Vec<u8>, usize) = match pixels {
            Pixels::Eight(p) => {
                enc.set_depth(png::BitDepth::Eight);
                (p.to_vec(), 1)
            }
            Pixels::Sixteen(p) => {
                enc.set_depth(png::BitDepth::Sixteen);
                (p.iter().flat_map(|v| v.to_be_bytes()).collect(), 2)
            }
        };
        if data.len() != (size as usize).pow(2) * bytes_per_pixel {
            bail!("{} bytes for a {size}×{size} image", data.len());
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(&data)?;
        writer.finish()?;
    }
    Ok(bytes)
}

/// The text chunks (tEXt, zTXt, iTXt) of a PNG file.
pub fn read_text(path: &Path) -> Result<BTreeMap<String, String>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{} is not a PNG", path.display()))?;
    let info = reader.info();
    let mut out = BTreeMap::new();
    for t in &info.uncompressed_latin1_text {
        out.insert(t.keyword.clone(), t.text.clone());
    }
    for t in &info.utf8_text {
        out.insert(t.keyword.clone(), t.get_text().unwrap_or_default());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chunks_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("a.png");
        let px: Vec<u8> = (0..16).map(|i| i * 16).collect();
        let meta = [
            ("prompt", "Right pleural effusion — small".to_string()),
            ("seed", "42".to_string()),
        ];
        write(&path, Pixels::Eight(&px), 4, &meta).unwrap();
        let text = read_text(&path).unwrap();
        assert_eq!(text["prompt"], "Right pleural effusion — small");
        assert_eq!(text["seed"], "42");
        let img = image::open(&path).unwrap().to_luma8();
        assert_eq!(img.as_raw(), &px);
        let px16: Vec<u16> = (0..16).map(|i| i * 4096).collect();
        write(&path, Pixels::Sixteen(&px16), 4, &[]).unwrap();
        assert_eq!(image::open(&path).unwrap().to_luma16().as_raw(), &px16);
        assert!(!dir.join("a.png.tmp").exists());
    }
}
