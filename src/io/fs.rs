//! Writing files so that a process killed at any moment leaves either the old file or the new
//! one, never half of one: synced writes, atomic replacement, synced folders.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `bytes` to `path` and flushes them to the disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Flushes a folder's entries to the disk, so that a rename in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// A hidden temporary name beside `path`, unique to this process, so that the final rename
/// stays on one file system and no reader mistakes it for the real file.
pub fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Replaces `path` with `bytes` atomically: a temporary file beside it, synced, renamed over it,
/// and the folder synced. On failure the temporary file is removed and `path` is untouched.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path);
    let result = write_synced(&tmp, bytes).and_then(|_| {
        std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(parent_of(path))
}

/// Encodes `image` in the format the extension of `path` names (`.png`, ...) and replaces `path`
/// with it atomically.
pub fn replace_image(path: &Path, image: impl Into<image::DynamicImage>) -> Result<()> {
    let format = image::ImageFormat::from_path(path)
        .with_context(|| format!("{}: not an image file name", path.display()))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .into()
        .write_to(&mut bytes, format)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    replace(path, bytes.get_ref())
}

/// The folder `path` is in ("." for a bare file name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_leaves_the_new_bytes_and_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.json");
        replace(&path, b"old").unwrap();
        replace(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.json"]);
    }

    #[test]
    fn a_failed_replace_keeps_the_old_file() {
        let tmp = tempfile::tempdir().unwrap();
        // A folder cannot be renamed over by a file: the rename fails after the write.
        let path = tmp.path().join("dir");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"kept").unwrap();
        let err = format!("{:#}", replace(&path, b"new").unwrap_err());
        assert!(err.contains("cannot replace"), "{err}");
        assert_eq!(std::fs::read(path.join("inside")).unwrap(), b"kept");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
