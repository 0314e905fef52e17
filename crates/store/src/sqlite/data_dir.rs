//! The data directory itself: one node at a time, private to its user.

use std::fs;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::{Result, StoreError};

/// Name of the lock file in the data directory.
const LOCK_FILE: &str = "LOCK";

/// A data directory held by this process: an exclusive `flock` on
/// `<dir>/LOCK` (holding this process's pid) for as long as the value
/// lives. Two nodes on one directory would each cache state the other
/// changes (a token revoked on one would still work on the other), so the
/// second one refuses to start.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// Holds the lock; the kernel releases it when the process ends,
    /// however it ends.
    _lock: fs::File,
}

impl DataDir {
    /// Creates `path` if needed, makes it private to this user (0700) and
    /// locks it. Fails with [`StoreError::InUse`], naming the holder's pid,
    /// when another process holds it.
    pub fn open(path: &Path) -> Result<Self> {
        fs::create_dir_all(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
        let lock_path = path.join(LOCK_FILE);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("another mayfly process (pid {pid})"),
                };
                return Err(StoreError::InUse(format!(
                    "the data directory {} is in use by {holder}: stop that node first, or \
                     give this one another data directory (--data-dir)",
                    path.display()
                )));
            }
            Err(fs::TryLockError::Error(error)) => return Err(error.into()),
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(Self {
            path: path.to_path_buf(),
            _lock: file,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes every folder under the directory 0700 and every file 0600, for
    /// directories written by an older node (or under a loose umask).
    /// SQLite creates its `-wal` and `-shm` files with the mode of their
    /// database, so they stay private once the databases are.
    pub fn restrict_permissions(&self) -> Result<()> {
        let mut pending = vec![self.path.clone()];
        while let Some(folder) = pending.pop() {
            for entry in fs::read_dir(&folder)? {
                let entry = entry?;
                let kind = entry.file_type()?;
                let wanted = if kind.is_dir() {
                    pending.push(entry.path());
                    0o700
                } else if kind.is_file() {
                    0o600
                } else {
                    continue;
                };
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    // Removed since it was listed (a temp file renamed).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                if meta.permissions().mode() & 0o777 != wanted {
                    match fs::set_permissions(entry.path(), fs::Permissions::from_mode(wanted)) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether `error`, or an error it was caused by, says the disk (or the
/// user's quota) is full: `ENOSPC`/`EDQUOT` from a file, `SQLITE_FULL` from
/// a database.
pub fn is_disk_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(io) = error.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            )
        {
            return true;
        }
        if let Some(rusqlite::Error::SqliteFailure(failure, _)) =
            error.downcast_ref::<rusqlite::Error>()
            && failure.code == rusqlite::ErrorCode::DiskFull
        {
            return true;
        }
        next = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path()).unwrap();
        let error = DataDir::open(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains(&format!("pid {}", std::process::id())) && error.contains("in use"),
            "{error}"
        );
        drop(first);
        DataDir::open(dir.path()).unwrap();
    }

    #[test]
    fn the_directory_and_its_files_become_private() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir_all(data.join("blobs/objects")).unwrap();
        fs::write(data.join("mayfly.db"), b"").unwrap();
        fs::write(data.join("blobs/objects/abc"), b"").unwrap();
        for (path, mode) in [(&data, 0o755), (&data.join("blobs"), 0o755)] {
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::set_permissions(data.join("mayfly.db"), fs::Permissions::from_mode(0o644)).unwrap();
        let held = DataDir::open(&data).unwrap();
        held.restrict_permissions().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("blobs")), 0o700);
        assert_eq!(mode(&data.join("blobs/objects")), 0o700);
        assert_eq!(mode(&data.join("mayfly.db")), 0o600);
        assert_eq!(mode(&data.join("blobs/objects/abc")), 0o600);
        assert_eq!(mode(&data.join(LOCK_FILE)), 0o600);
    }

    #[test]
    fn disk_full_is_recognised_in_files_and_databases() {
        let io = io::Error::from_raw_os_error(28);
        assert!(StoreError::from(io).is_disk_full());
        let sqlite = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(13), None);
        assert!(StoreError::from(sqlite).is_disk_full());
        assert!(!StoreError::Corrupt("x".into()).is_disk_full());
        assert!(!StoreError::from(io::Error::from_raw_os_error(13)).is_disk_full());
    }
}
