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
    replace_all(&[(path, bytes)])
}

/// Replaces each `(path, bytes)` of `files` as [`replace`] does, all of them or none: every file
/// is written to its temporary name before the first is renamed into place, so a failed write
/// (a full disk) leaves every path untouched and no temporary file behind.
pub fn replace_all(files: &[(&Path, &[u8])]) -> Result<()> {
    let temps: Vec<PathBuf> = files.iter().map(|(path, _)| temp_beside(path)).collect();
    let remove = |temps: &[PathBuf]| {
        for tmp in temps {
            let _ = std::fs::remove_file(tmp);
        }
    };
    let written = files
        .iter()
        .zip(&temps)
        .try_for_each(|((_, bytes), tmp)| write_synced(tmp, bytes));
    if let Err(e) = written {
        remove(&temps);
        return Err(e);
    }
    for (i, ((path, _), tmp)) in files.iter().zip(&temps).enumerate() {
        if let Err(e) = std::fs::rename(tmp, path) {
            remove(&temps[i..]);
            return Err(e).with_context(|| format!("cannot replace {}", path.display()));
        }
    }
    let mut folders: Vec<&Path> = files.iter().map(|(path, _)| parent_of(path)).collect();
    folders.sort();
    folders.dedup();
    folders.into_iter().try_for_each(sync_dir)
}

/// `image` encoded in the format the extension of `path` names (`.png`, ...).
pub fn image_bytes(path: &Path, image: impl Into<image::DynamicImage>) -> Result<Vec<u8>> {
    let format = image::ImageFormat::from_path(path)
        .with_context(|| format!("{}: not an image file name", path.display()))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .into()
        .write_to(&mut bytes, format)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    Ok(bytes.into_inner())
}

/// Encodes `image` in the format the extension of `path` names and replaces `path` with it
/// atomically.
pub fn replace_image(path: &Path, image: impl Into<image::DynamicImage>) -> Result<()> {
    replace(path, &image_bytes(path, image)?)
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
    fn replace_all_writes_every_file_or_none() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a.json"), tmp.path().join("b.md"));
        replace(&a, b"old").unwrap();
        replace_all(&[(&a, b"new"), (&b, b"# b")]).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"new");
        assert_eq!(std::fs::read(&b).unwrap(), b"# b");
        // A file that cannot be written (its folder is missing): the other is not replaced.
        let missing = tmp.path().join("no-such-folder/c.png");
        let err = format!(
            "{:#}",
            replace_all(&[(&a, b"newer"), (&missing, b"c")]).unwrap_err()
        );
        assert!(err.contains("no-such-folder"), "{err}");
        assert_eq!(std::fs::read(&a).unwrap(), b"new");
        let mut names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.json", "b.md"]);
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
