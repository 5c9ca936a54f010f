//! A built-in 3×5 pixel font for the words PNGs carry (plot axes, report captions): no font
//! files, no drawing dependency. Upper-case letters are drawn as lower-case ones.

use image::{Pixel, Rgb, RgbImage};

/// Glyph rows, top first; bit 4 is the left column, 1 the right.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'a' => [0, 6, 3, 5, 7],
        'b' => [4, 6, 5, 5, 6],
        'c' => [0, 7, 4, 4, 7],
        'd' => [1, 3, 5, 5, 3],
        'e' => [0, 7, 7, 4, 7],
        'f' => [3, 4, 6, 4, 4],
        'g' => [0, 3, 5, 3, 6],
        'h' => [4, 4, 6, 5, 5],
        'i' => [2, 0, 2, 2, 2],
        'j' => [1, 0, 1, 5, 2],
        'k' => [4, 5, 6, 5, 5],
        'l' => [6, 2, 2, 2, 7],
        'm' => [0, 5, 7, 5, 5],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 7, 5, 5, 7],
        'p' => [0, 7, 5, 7, 4],
        'q' => [0, 7, 5, 7, 1],
        'r' => [0, 6, 5, 4, 4],
        's' => [0, 7, 6, 3, 7],
        't' => [2, 7, 2, 2, 3],
        'u' => [0, 5, 5, 5, 7],
        'v' => [0, 5, 5, 5, 2],
        'w' => [0, 5, 5, 7, 5],
        'x' => [0, 5, 2, 2, 5],
        'y' => [0, 5, 7, 1, 6],
        'z' => [0, 7, 3, 6, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        '+' => [0, 2, 7, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        '/' => [1, 1, 2, 4, 4],
        '%' => [5, 1, 2, 4, 5],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '<' => [1, 2, 4, 2, 1],
        '>' => [4, 2, 1, 2, 4],
        _ => [0; 5],
    }
}

/// The width in pixels of `s` written at `scale` pixels per font pixel (a glyph and its space
/// are 4 font pixels wide).
pub fn text_width(s: &str, scale: u32) -> i64 {
    s.chars().count() as i64 * 4 * scale as i64
}

/// The height in pixels of a line written at `scale`.
pub fn text_height(scale: u32) -> i64 {
    5 * scale as i64
}

/// Writes `s` with its top-left corner at (x, y), `scale` pixels per font pixel; what falls
/// outside the image is cut off.
pub fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: u32, c: Rgb<u8>) {
    let scale = scale as i64;
    for (k, ch) in s.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let px = x + (k as i64 * 4 + col) * scale + dx;
                        let py = y + row as i64 * scale + dy;
                        if px >= 0 && py >= 0 && px < img.width() as i64 && py < img.height() as i64
                        {
                            img.put_pixel(px as u32, py as u32, c.to_rgb());
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_letter_and_digit_has_a_distinct_glyph() {
        let chars: Vec<char> = ('a'..='z').chain('0'..='9').collect();
        for (i, a) in chars.iter().enumerate() {
            assert_ne!(glyph(*a), [0; 5], "{a} has no glyph");
            for b in &chars[i + 1..] {
                assert_ne!(glyph(*a), glyph(*b), "{a} and {b} look the same");
            }
        }
        assert_eq!(glyph('A'), glyph('a'));
    }

    #[test]
    fn text_lands_at_its_corner_and_is_cut_at_the_border() {
        let mut img = RgbImage::new(10, 10);
        let ink = Rgb([255, 0, 0]);
        text(&mut img, 0, 0, "1", 1, ink);
        // '1': the middle column of the top row, the whole bottom row.
        assert_eq!(*img.get_pixel(1, 0), ink);
        assert_eq!(*img.get_pixel(0, 0), Rgb([0, 0, 0]));
        assert_eq!(*img.get_pixel(0, 4), ink);
        text(&mut img, 8, 8, "8", 2, ink); // mostly outside: must not panic
        assert_eq!(text_width("ab", 2), 16);
        assert_eq!(text_height(3), 15);
    }
}
