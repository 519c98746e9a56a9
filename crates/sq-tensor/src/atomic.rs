//! Outputs that appear whole or not at all.
//!
//! Files are written to a temporary sibling in the same directory, flushed to disk with
//! `fsync`, then renamed over the target; the directory entry is synced too. A write that fails
//! or is interrupted midway leaves the previous target (if any) untouched and no partial file.
//!
//! Interruption: every temporary output in progress is registered in this process, and
//! [`abort_in_progress`] (called by the command line on SIGINT / SIGTERM) removes them, waiting
//! for a commit that is already renaming to finish first. Temporaries are named
//! `.NAME.tmp-PID-XXXXXX`; ones left by a process that no longer exists (killed with SIGKILL,
//! power loss) are removed the next time the same target is written. A directory replaces its
//! previous version in one atomic exchange on Linux (`renameat2(RENAME_EXCHANGE)`), so the
//! target is never missing; elsewhere the previous version is moved aside first.

use crate::{Result, TensorError};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Test hook: milliseconds to wait right before a commit renames (lets tests interrupt a run
/// whose output is complete but not yet in place).
const COMMIT_DELAY_ENV: &str = "SQ_TEST_COMMIT_DELAY_MS";

/// Temporary outputs of this process that are not committed yet, and whether the process is
/// being interrupted (then no new output may start).
struct Registry {
    paths: BTreeSet<PathBuf>,
    aborted: bool,
}

static IN_PROGRESS: Mutex<Registry> = Mutex::new(Registry {
    paths: BTreeSet::new(),
    aborted: false,
});

fn registry() -> MutexGuard<'static, Registry> {
    IN_PROGRESS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Unregisters a temporary path when dropped (after a commit or an abandoned write).
struct Registered(PathBuf);

impl Registered {
    fn new(path: PathBuf) -> Result<Self> {
        let mut reg = registry();
        if reg.aborted {
            return Err(TensorError::io(
                &path,
                "starting an output",
                std::io::Error::new(std::io::ErrorKind::Interrupted, "the process is stopping"),
            ));
        }
        reg.paths.insert(path.clone());
        Ok(Registered(path))
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        registry().paths.remove(&self.0);
    }
}

/// Remove every temporary output this process has in progress and refuse new ones; returns
/// how many were removed. A commit that is renaming when this is called finishes first (its
/// output is then complete and in place). Meant for signal handlers, right before exiting.
pub fn abort_in_progress() -> usize {
    let mut reg = registry();
    reg.aborted = true;
    let paths = std::mem::take(&mut reg.paths);
    // Nested temporaries (a file inside a temporary directory) go with their parent.
    let mut removed = 0;
    for p in &paths {
        if remove_any(p) {
            removed += 1;
        }
    }
    removed
}

fn remove_any(p: &Path) -> bool {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).is_ok(),
        Ok(_) => std::fs::remove_file(p).is_ok(),
        Err(_) => false,
    }
}

fn parent_dir(target: &Path) -> PathBuf {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn target_name(target: &Path) -> String {
    target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into())
}

fn temp_prefix(target: &Path) -> String {
    format!(".{}.tmp-{}-", target_name(target), std::process::id())
}

fn backup_path(target: &Path) -> PathBuf {
    parent_dir(target).join(format!(
        ".{}.old-{}",
        target_name(target),
        std::process::id()
    ))
}

/// Whether process `pid` may still be running (unknown counts as running).
fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Remove temporaries of `target` left by processes that no longer run, and put back a
/// previous version that such a process had moved aside without replacing it.
fn clean_stale(target: &Path) {
    let dir = parent_dir(target);
    let name = target_name(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let tmp = format!(".{name}.tmp-");
    let old = format!(".{name}.old-");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(f) = file_name.to_str() else {
            continue;
        };
        let (rest, is_backup) = if let Some(r) = f.strip_prefix(&tmp) {
            (r, false)
        } else if let Some(r) = f.strip_prefix(&old) {
            (r, true)
        } else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_none_or(pid_alive) {
            continue;
        }
        let path = entry.path();
        if is_backup && !target.exists() {
            let _ = std::fs::rename(&path, target);
        } else {
            remove_any(&path);
        }
    }
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the rename durable; not every filesystem allows it, and the
    // rename has already happened, so a failure here is not an error.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn commit_delay() {
    if let Some(ms) = std::env::var(COMMIT_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// A file being written atomically. Write through [`AtomicFile::writer`], then
/// [`AtomicFile::commit`]; dropping it uncommitted deletes the temporary file.
pub struct AtomicFile {
    target: PathBuf,
    writer: BufWriter<tempfile::NamedTempFile>,
    registered: Registered,
}

impl AtomicFile {
    /// Start writing `target` (which is not touched until `commit`).
    pub fn create(target: impl AsRef<Path>) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let dir = parent_dir(&target);
        clean_stale(&target);
        let temp = tempfile::Builder::new()
            .prefix(&temp_prefix(&target))
            .tempfile_in(&dir)
            .map_err(|e| TensorError::io(&dir, "creating a temporary file", e))?;
        let registered = Registered::new(temp.path().to_path_buf())?;
        Ok(AtomicFile {
            target,
            writer: BufWriter::with_capacity(1 << 20, temp),
            registered,
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
        let AtomicFile {
            target,
            writer,
            registered,
        } = self;
        let temp = writer
            .into_inner()
            .map_err(|e| TensorError::io(&target, "flushing", e.into_error()))?;
        temp.as_file()
            .sync_all()
            .map_err(|e| TensorError::io(&target, "syncing to disk", e))?;
        commit_delay();
        {
            let mut reg = registry();
            if reg.aborted {
                return Err(TensorError::io(
                    &target,
                    "renaming into place",
                    std::io::Error::new(std::io::ErrorKind::Interrupted, "the process is stopping"),
                ));
            }
            temp.persist(&target)
                .map_err(|e| TensorError::io(&target, "renaming into place", e.error))?;
            reg.paths.remove(&registered.0);
        }
        drop(registered);
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
    registered: Registered,
}

impl AtomicDir {
    /// Start writing the directory `target`. Fails if `target` exists, is not empty and
    /// `overwrite` is false.
    pub fn create(target: impl AsRef<Path>, overwrite: bool) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        clean_stale(&target);
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
        let registered = Registered::new(temp.path().to_path_buf())?;
        Ok(AtomicDir {
            target,
            temp,
            registered,
        })
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
        let AtomicDir {
            target,
            temp,
            registered,
        } = self;
        for entry in std::fs::read_dir(temp.path())
            .map_err(|e| TensorError::io(temp.path(), "listing", e))?
        {
            let entry = entry.map_err(|e| TensorError::io(temp.path(), "listing", e))?;
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                if let Ok(f) = File::open(entry.path()) {
                    let _ = f.sync_all();
                }
            }
        }
        commit_delay();
        // The registry lock is held through the renames: an interruption waits for them.
        let mut reg = registry();
        if reg.aborted {
            return Err(TensorError::io(
                &target,
                "renaming into place",
                std::io::Error::new(std::io::ErrorKind::Interrupted, "the process is stopping"),
            ));
        }
        let temp_path = temp.keep();
        let result = replace_dir(&temp_path, &target);
        // Whatever is left at the temporary path (the previous version after an exchange, or
        // the new one after a failure) goes.
        remove_any(&temp_path);
        reg.paths.remove(&registered.0);
        drop(reg);
        drop(registered);
        result?;
        sync_dir(&parent_dir(&target));
        Ok(())
    }
}

/// Put directory `new` at `target`. On success `new` no longer holds the new output (it holds
/// the previous version after an exchange, or nothing).
fn replace_dir(new: &Path, target: &Path) -> Result<()> {
    if std::fs::symlink_metadata(target).is_err() {
        return std::fs::rename(new, target)
            .map_err(|e| TensorError::io(target, "renaming into place", e));
    }
    #[cfg(target_os = "linux")]
    if exchange(new, target).is_ok() {
        return Ok(());
    }
    // No atomic exchange (other systems, some filesystems): move the previous version aside,
    // then rename; a failure puts it back.
    let backup = backup_path(target);
    std::fs::rename(target, &backup)
        .map_err(|e| TensorError::io(target, "moving the previous output aside", e))?;
    if let Err(e) = std::fs::rename(new, target) {
        let _ = std::fs::rename(&backup, target);
        return Err(TensorError::io(target, "renaming into place", e));
    }
    remove_any(&backup);
    Ok(())
}

/// Atomically swap two paths (Linux `renameat2` with `RENAME_EXCHANGE`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn dir_has_entries(path: &Path) -> bool {
    match std::fs::read_dir(path) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => path.exists(),
    }
}
