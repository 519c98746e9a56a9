//! Outputs that appear whole or not at all.
//!
//! Files are written to a temporary sibling in the same directory, flushed to disk with
//! `fsync`, then renamed over the target; the directory entry is synced too. A write that fails
//! or is interrupted midway leaves the previous target (if any) untouched and no partial file.

use crate::{Result, TensorError};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn temp_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    format!(".{name}.tmp-")
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the rename durable; not every filesystem allows it, and the
    // rename has already happened, so a failure here is not an error.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A file being written atomically. Write through [`AtomicFile::writer`], then
/// [`AtomicFile::commit`]; dropping it uncommitted deletes the temporary file.
pub struct AtomicFile {
    target: PathBuf,
    writer: BufWriter<tempfile::NamedTempFile>,
}

impl AtomicFile {
    /// Start writing `target` (which is not touched until `commit`).
    pub fn create(target: impl AsRef<Path>) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let dir = parent_dir(&target);
        let temp = tempfile::Builder::new()
            .prefix(&temp_prefix(&target))
            .tempfile_in(&dir)
            .map_err(|e| TensorError::io(&dir, "creating a temporary file", e))?;
        Ok(AtomicFile {
            target,
            writer: BufWriter::with_capacity(1 << 20, temp),
        })
    }

    /// The path this file will have once committed.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The buffered writer for the contents.
    pub fn writer(&mut self) -> &mut impl Write {
        &mut self.writer
    }

    /// Flush, fsync and rename into place.
    pub fn commit(self) -> Result<()> {
        let target = self.target;
        let temp = self
            .writer
            .into_inner()
            .map_err(|e| TensorError::io(&target, "flushing", e.into_error()))?;
        temp.as_file()
            .sync_all()
            .map_err(|e| TensorError::io(&target, "syncing to disk", e))?;
        temp.persist(&target)
            .map_err(|e| TensorError::io(&target, "renaming into place", e.error))?;
        sync_dir(&parent_dir(&target));
        Ok(())
    }
}

/// Write `target` atomically with `write`; if `write` fails, nothing appears at `target`.
pub fn write_atomic<F>(target: impl AsRef<Path>, write: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> Result<()>,
{
    let mut file = AtomicFile::create(target)?;
    write(file.writer())?;
    file.commit()
}

/// A directory being written atomically: fill [`AtomicDir::path`], then
/// [`AtomicDir::commit`]. Dropping it uncommitted deletes the temporary directory.
pub struct AtomicDir {
    target: PathBuf,
    temp: tempfile::TempDir,
}

impl AtomicDir {
    /// Start writing the directory `target`. Fails if `target` exists, is not empty and
    /// `overwrite` is false.
    pub fn create(target: impl AsRef<Path>, overwrite: bool) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        if !overwrite && dir_has_entries(&target) {
            return Err(TensorError::io(
                &target,
                "refusing to overwrite a non-empty directory",
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        let parent = parent_dir(&target);
        std::fs::create_dir_all(&parent)
            .map_err(|e| TensorError::io(&parent, "creating the parent directory", e))?;
        let temp = tempfile::Builder::new()
            .prefix(&temp_prefix(&target))
            .tempdir_in(&parent)
            .map_err(|e| TensorError::io(&parent, "creating a temporary directory", e))?;
        Ok(AtomicDir { target, temp })
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        self.temp.path()
    }

    /// The path the directory will have once committed.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Move the finished directory into place, replacing any previous one.
    pub fn commit(self) -> Result<()> {
        let target = self.target;
        let temp_path = self.temp.keep();
        let cleanup = |e: std::io::Error, action| {
            let _ = std::fs::remove_dir_all(&temp_path);
            TensorError::io(&target, action, e)
        };
        for entry in std::fs::read_dir(&temp_path).map_err(|e| cleanup(e, "listing"))? {
            let entry = entry.map_err(|e| cleanup(e, "listing"))?;
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                if let Ok(f) = File::open(entry.path()) {
                    let _ = f.sync_all();
                }
            }
        }
        let backup = if target.exists() {
            let mut name = target.as_os_str().to_owned();
            name.push(format!(".old-{}", std::process::id()));
            let backup = PathBuf::from(name);
            std::fs::rename(&target, &backup)
                .map_err(|e| cleanup(e, "moving the previous output aside"))?;
            Some(backup)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&temp_path, &target) {
            if let Some(b) = &backup {
                let _ = std::fs::rename(b, &target);
            }
            return Err(cleanup(e, "renaming into place"));
        }
        if let Some(b) = backup {
            let _ = std::fs::remove_dir_all(b);
        }
        sync_dir(&parent_dir(&target));
        Ok(())
    }
}

fn dir_has_entries(path: &Path) -> bool {
    match std::fs::read_dir(path) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => path.exists(),
    }
}
