//! A minimal DICOM writer for generated images: Secondary Capture Image Storage, explicit VR
//! little endian, marked synthetic (Synthetic Data (0008,001C) = YES, Conversion Type = SYN) so
//! that no archive mistakes it for a patient's radiograph.
//!
//! Written from the standard (PS3.3 A.8.1 Secondary Capture Image IOD, PS3.5 7.1.2 data element
//! encoding, PS3.10 7.1 file meta information); only the attributes that IOD needs are written.

use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::png::Pixels;

/// Secondary Capture Image Storage.
pub const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// This implementation: a UUID-derived UID (PS3.5 B.2), a random UUID fixed for cxrgen.
const IMPLEMENTATION_CLASS: &str = "2.25.187342201893614563410772307536412339101";

/// What a DICOM file says about its image, besides the pixels.
pub struct DicomMeta<'a> {
    pub sop_instance_uid: &'a str,
    pub study_uid: &'a str,
    pub series_uid: &'a str,
    pub instance_number: u32,
    /// Study date `YYYYMMDD` and time `HHMMSS`.
    pub date: &'a str,
    pub time: &'a str,
    pub series_description: &'a str,
    /// The generation settings, in Image Comments (0020,4000).
    pub comments: &'a str,
}

/// A new UID under the 2.25 arc (a UUID as a decimal number, PS3.5 B.2), unique to this call:
/// the hash of the clock, the process, a counter and `salt`.
pub fn new_uid(salt: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = Sha256::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(now.as_nanos().to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(
        COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    h.update(salt.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // RFC 4122 version 4 / variant bits, as a random UUID has them.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    format!("2.25.{}", u128::from_be_bytes(bytes))
}

/// The current UTC date and time as DICOM DA (`YYYYMMDD`) and TM (`HHMMSS`).
pub fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}{m:02}{d:02}"),
        format!("{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60),
    )
}

/// One data element: tag, VR and value bytes (unpadded).
struct Element {
    tag: (u16, u16),
    vr: &'static [u8; 2],
    value: Vec<u8>,
}

fn text(tag: (u16, u16), vr: &'static [u8; 2], v: &str) -> Element {
    Element {
        tag,
        vr,
        value: v.as_bytes().to_vec(),
    }
}

fn us(tag: (u16, u16), v: u16) -> Element {
    Element {
        tag,
        vr: b"US",
        value: v.to_le_bytes().to_vec(),
    }
}

/// Encodes elements in tag order, explicit VR little endian, values padded to even length.
fn encode(mut elements: Vec<Element>, out: &mut Vec<u8>) -> Result<()> {
    elements.sort_by_key(|e| e.tag);
    for e in elements {
        let mut value = e.value;
        if value.len() % 2 == 1 {
            // UIDs and binary values pad with NUL, text with a space (PS3.5 6.2).
            value.push(if matches!(e.vr, b"UI" | b"OB" | b"OW") {
                0
            } else {
                b' '
            });
        }
        out.extend_from_slice(&e.tag.0.to_le_bytes());
        out.extend_from_slice(&e.tag.1.to_le_bytes());
        out.extend_from_slice(e.vr);
        if matches!(e.vr, b"OB" | b"OW" | b"UT" | b"UN") {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&u32::try_from(value.len())?.to_le_bytes());
        } else {
            let len = u16::try_from(value.len()).with_context(|| {
                format!("DICOM element {:04X},{:04X} is too long", e.tag.0, e.tag.1)
            })?;
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(&value);
    }
    Ok(())
}

/// The file's bytes: preamble, file meta information, data set.
pub fn encode_file(pixels: Pixels, size: u32, meta: &DicomMeta) -> Result<Vec<u8>> {
    let (bits, data): (u16, Vec<u8>) = match pixels {
        Pixels::Eight(p) => (8, p.to_vec()),
        Pixels::Sixteen(p) => (16, p.iter().flat_map(|v| v.to_le_bytes()).collect()),
    };
    if data.len() != (size as usize).pow(2) * usize::from(bits / 8) {
        bail!("{} bytes for a {size}×{size} image", data.len());
    }
    if meta.comments.len() > 10240 {
        bail!("image comments longer than DICOM's 10,240 characters (LT)");
    }
    let size16 = u16::try_from(size).context("image side over 65,535 pixels")?;
    let version = format!("cxrgen {}", env!("CARGO_PKG_VERSION"));

    let mut group2 = Vec::new();
    encode(
        vec![
            Element {
                tag: (0x0002, 0x0001),
                vr: b"OB",
                value: vec![0, 1],
            },
            text((0x0002, 0x0002), b"UI", SECONDARY_CAPTURE),
            text((0x0002, 0x0003), b"UI", meta.sop_instance_uid),
            text((0x0002, 0x0010), b"UI", EXPLICIT_VR_LE),
            text((0x0002, 0x0012), b"UI", IMPLEMENTATION_CLASS),
            text(
                (0x0002, 0x0013),
                b"SH",
                &format!("CXRGEN_{}", env!("CARGO_PKG_VERSION")),
            ),
        ],
        &mut group2,
    )?;

    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    encode(
        vec![Element {
            tag: (0x0002, 0x0000),
            vr: b"UL",
            value: u32::try_from(group2.len())?.to_le_bytes().to_vec(),
        }],
        &mut out,
    )?;
    out.extend_from_slice(&group2);

    let pixel_vr: &'static [u8; 2] = if bits == 8 { b"OB" } else { b"OW" };
    encode(
        vec![
            text((0x0008, 0x0005), b"CS", "ISO_IR 192"),
            text((0x0008, 0x0008), b"CS", "DERIVED\\SECONDARY"),
            text((0x0008, 0x0016), b"UI", SECONDARY_CAPTURE),
            text((0x0008, 0x0018), b"UI", meta.sop_instance_uid),
            text((0x0008, 0x001C), b"CS", "YES"),
            text((0x0008, 0x0020), b"DA", meta.date),
            text((0x0008, 0x0030), b"TM", meta.time),
            text((0x0008, 0x0050), b"SH", ""),
            text((0x0008, 0x0060), b"CS", "OT"),
            text((0x0008, 0x0064), b"CS", "SYN"),
            text((0x0008, 0x0070), b"LO", "cxrgen"),
            text((0x0008, 0x0090), b"PN", ""),
            text((0x0008, 0x103E), b"LO", meta.series_description),
            text((0x0010, 0x0010), b"PN", "SYNTHETIC^IMAGE"),
            text((0x0010, 0x0020), b"LO", "SYNTHETIC"),
            text((0x0010, 0x0030), b"DA", ""),
            text((0x0010, 0x0040), b"CS", ""),
            text((0x0018, 0x1016), b"LO", "cxrgen"),
            text((0x0018, 0x1018), b"LO", "cxrgen latent diffusion"),
            text((0x0018, 0x1019), b"LO", &version),
            text((0x0020, 0x000D), b"UI", meta.study_uid),
            text((0x0020, 0x000E), b"UI", meta.series_uid),
            text((0x0020, 0x0010), b"SH", "1"),
            text((0x0020, 0x0011), b"IS", "1"),
            text((0x0020, 0x0013), b"IS", &meta.instance_number.to_string()),
            text((0x0020, 0x0020), b"CS", ""),
            text((0x0020, 0x4000), b"LT", meta.comments),
            us((0x0028, 0x0002), 1),
            text((0x0028, 0x0004), b"CS", "MONOCHROME2"),
            us((0x0028, 0x0010), size16),
            us((0x0028, 0x0011), size16),
            us((0x0028, 0x0100), bits),
            us((0x0028, 0x0101), bits),
            us((0x0028, 0x0102), bits - 1),
            us((0x0028, 0x0103), 0),
            text((0x0028, 0x0301), b"CS", "NO"),
            Element {
                tag: (0x7FE0, 0x0010),
                vr: pixel_vr,
                value: data,
            },
        ],
        &mut out,
    )?;
    Ok(out)
}

/// Writes `path` atomically (a temporary file, then a rename): a file that exists is complete.
pub fn write(path: &Path, pixels: Pixels, size: u32, meta: &DicomMeta) -> Result<()> {
    let bytes = encode_file(pixels, size, meta)?;
    super::fs::replace(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_new_valid_and_under_64_characters() {
        let (a, b) = (new_uid("x"), new_uid("x"));
        assert_ne!(a, b);
        for u in [a, b] {
            assert!(u.len() <= 64 && u.starts_with("2.25."), "{u}");
            assert!(u.chars().all(|c| c.is_ascii_digit() || c == '.'));
            assert!(!u[5..].starts_with('0'), "no leading zero: {u}");
        }
    }

    #[test]
    fn utc_dates_are_civil_dates() {
        let (d, t) = utc_now();
        assert_eq!((d.len(), t.len()), (8, 6));
        let year: u32 = d[..4].parse().unwrap();
        assert!((2024..2200).contains(&year));
        let (m, day): (u32, u32) = (d[4..6].parse().unwrap(), d[6..].parse().unwrap());
        assert!((1..=12).contains(&m) && (1..=31).contains(&day));
    }
}
