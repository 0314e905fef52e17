//! Content-addressed blob files: the embedded [`BlobStore`].

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use super::offload;
use crate::{BlobKind, BlobStore, Digest, Result, StoreError};

const KINDS: [BlobKind; 4] = [
    BlobKind::Component,
    BlobKind::Artifact,
    BlobKind::Object,
    BlobKind::Model,
];

/// Prefix of the temporary files a write renames into place.
const TEMP_PREFIX: &str = ".tmp-";

/// Folder (beside the kinds' folders) of the files holding the SHA-256 of
/// checked blobs' bytes (see [`BlobStore::put_checked`]), one folder per
/// kind, so a kind's folder holds nothing but its blobs.
const CHECKSUMS: &str = "checksums";

/// What identifies one state of a file on disk: any write, truncation or
/// replacement changes at least one of these (the change time cannot be set
/// by a writer), so a checksum verified against it stays valid until then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// Blobs as files under `<data dir>/blobs/<kind>/<hex>`. [`BlobStore`]
/// calls run on the blocking pool (`sqlite::offload`); the inherent methods
/// block, for callers already off the async workers.
#[derive(Debug, Clone)]
pub struct BlobDir {
    root: PathBuf,
    /// Checked blobs whose bytes matched their checksum in this process,
    /// with the state of the file then: hashing a multi-megabyte artifact
    /// on every cold load would cost more than the load itself, so each
    /// file state is hashed once and a `stat` tells whether it changed.
    verified: Arc<Mutex<HashMap<PathBuf, FileStamp>>>,
    /// Serialises [`BlobStore::put_checked`] so that a blob and its
    /// checksum file are always written as a pair.
    checked_writes: Arc<Mutex<()>>,
}

impl BlobDir {
    /// Opens (creating if needed) the blob folders under `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for kind in KINDS {
            fs::create_dir_all(root.join(kind.folder()))?;
            fs::create_dir_all(root.join(CHECKSUMS).join(kind.folder()))?;
        }
        Ok(Self {
            root,
            verified: Arc::default(),
            checked_writes: Arc::default(),
        })
    }

    fn path(&self, kind: BlobKind, key: &Digest) -> PathBuf {
        self.root.join(kind.folder()).join(key.hex())
    }

    fn checksum_path(&self, kind: BlobKind, key: &Digest) -> PathBuf {
        self.root
            .join(CHECKSUMS)
            .join(kind.folder())
            .join(key.hex())
    }

    /// Removes a blob; absent is not an error. The caller makes sure nothing
    /// refers to it any more.
    pub fn remove(&self, kind: BlobKind, key: &Digest) -> Result<()> {
        let path = self.path(kind, key);
        self.forget(&path);
        for file in [path, self.checksum_path(kind, key)] {
            match fs::remove_file(file) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Deletes the temporary files of writes that never finished (a crash,
    /// or a failure before this process removed them); returns how many.
    /// Only call it while holding the data directory's lock: another
    /// process's write in progress would lose its file.
    pub fn sweep_temp_files(&self) -> Result<usize> {
        let mut removed = 0;
        let folders = KINDS.iter().flat_map(|kind| {
            [
                self.root.join(kind.folder()),
                self.root.join(CHECKSUMS).join(kind.folder()),
            ]
        });
        for folder in folders {
            for entry in fs::read_dir(folder)? {
                let entry = entry?;
                let temporary = entry
                    .file_name()
                    .to_str()
                    .is_some_and(|name| name.starts_with(TEMP_PREFIX));
                if temporary {
                    match fs::remove_file(entry.path()) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(removed)
    }

    fn forget(&self, path: &Path) {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(path);
    }

    /// Whether `path` is in the state it was last verified in.
    fn still_verified(&self, path: &Path, stamp: FileStamp) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .is_some_and(|known| *known == stamp)
    }

    fn mark_verified(&self, path: &Path, stamp: FileStamp) {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_path_buf(), stamp);
    }
}

/// The [`BlobStore`] calls, synchronously: what its async methods run on
/// the blocking pool, and what the event store (itself on the blocking
/// pool) calls for object bytes.
impl BlobDir {
    pub(crate) fn put_blocking(&self, kind: BlobKind, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        self.put_keyed_blocking(kind, &digest, bytes)?;
        Ok(digest)
    }

    pub(crate) fn put_keyed_blocking(
        &self,
        kind: BlobKind,
        key: &Digest,
        bytes: &[u8],
    ) -> Result<()> {
        let path = self.path(kind, key);
        if path.exists() {
            return Ok(());
        }
        write_atomically(&path, bytes)?;
        Ok(())
    }

    pub(crate) fn get_blocking(&self, kind: BlobKind, key: &Digest) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(kind, key)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn local_path_blocking(&self, kind: BlobKind, key: &Digest) -> Option<PathBuf> {
        let path = self.path(kind, key);
        path.exists().then_some(path)
    }

    pub(crate) fn put_checked_blocking(
        &self,
        kind: BlobKind,
        key: &Digest,
        bytes: &[u8],
    ) -> Result<()> {
        let path = self.path(kind, key);
        let checksum = Digest::of(bytes);
        let _pair = self
            .checked_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.forget(&path);
        // The blob first: a crash between the two writes leaves a blob
        // whose old (or missing) checksum does not match, which reads as
        // absent or damaged and is written again, never as trusted.
        write_atomically(&path, bytes)?;
        write_atomically(&self.checksum_path(kind, key), checksum.hex().as_bytes())?;
        // These are the bytes just hashed: no need to read them back.
        self.mark_verified(&path, FileStamp::of(&fs::metadata(&path)?));
        Ok(())
    }

    pub(crate) fn has_checked_blocking(&self, kind: BlobKind, key: &Digest) -> bool {
        self.path(kind, key).exists() && self.checksum_path(kind, key).exists()
    }

    pub(crate) fn verified_path_blocking(
        &self,
        kind: BlobKind,
        key: &Digest,
    ) -> Result<Option<PathBuf>> {
        let path = self.path(kind, key);
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let stamp = FileStamp::of(&meta);
        if self.still_verified(&path, stamp) {
            return Ok(Some(path));
        }
        let expected = match fs::read_to_string(self.checksum_path(kind, key)) {
            Ok(text) => Digest::parse(text.trim())?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut file = fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        io::copy(&mut file, &mut hasher)?;
        let actual = Digest(hex::encode(hasher.finalize()));
        // Stamp the file as read: a change during the read shows up as a
        // different stamp on the next call.
        let read_stamp = FileStamp::of(&file.metadata()?);
        if actual != expected {
            return Err(StoreError::Corrupt(format!(
                "{} holds bytes with checksum {actual}, but {expected} was written",
                path.display()
            )));
        }
        if read_stamp == stamp {
            self.mark_verified(&path, stamp);
        }
        Ok(Some(path))
    }
}

#[async_trait::async_trait]
impl BlobStore for BlobDir {
    async fn put(&self, kind: BlobKind, bytes: &[u8]) -> Result<Digest> {
        let bytes = bytes.to_vec();
        offload(self, move |dir| dir.put_blocking(kind, &bytes)).await
    }

    async fn put_keyed(&self, kind: BlobKind, key: &Digest, bytes: &[u8]) -> Result<()> {
        let (key, bytes) = (key.clone(), bytes.to_vec());
        offload(self, move |dir| dir.put_keyed_blocking(kind, &key, &bytes)).await
    }

    async fn get(&self, kind: BlobKind, key: &Digest) -> Result<Option<Vec<u8>>> {
        let key = key.clone();
        offload(self, move |dir| dir.get_blocking(kind, &key)).await
    }

    async fn local_path(&self, kind: BlobKind, key: &Digest) -> Option<PathBuf> {
        let key = key.clone();
        // A call that did not finish found nothing to hand out.
        offload(self, move |dir| Ok(dir.local_path_blocking(kind, &key)))
            .await
            .ok()
            .flatten()
    }

    async fn put_checked(&self, kind: BlobKind, key: &Digest, bytes: &[u8]) -> Result<()> {
        let (key, bytes) = (key.clone(), bytes.to_vec());
        offload(self, move |dir| {
            dir.put_checked_blocking(kind, &key, &bytes)
        })
        .await
    }

    async fn has_checked(&self, kind: BlobKind, key: &Digest) -> bool {
        let key = key.clone();
        // A call that did not finish counts as absent: the caller writes
        // the blob again, never trusts one it could not check.
        offload(self, move |dir| Ok(dir.has_checked_blocking(kind, &key)))
            .await
            .unwrap_or(false)
    }

    async fn verified_path(&self, kind: BlobKind, key: &Digest) -> Result<Option<PathBuf>> {
        let key = key.clone();
        offload(self, move |dir| dir.verified_path_blocking(kind, &key)).await
    }
}

impl BlobDir {
    /// A writer for a blob of `kind` whose bytes arrive in pieces (an
    /// upload streamed from the network): they go to a temporary file in
    /// the kind's folder, hashed on the way, so no more than a piece is
    /// ever in memory. [`BlobWriter::finish`] and then [`BlobDir::commit`]
    /// put the file in place under its digest.
    pub fn writer(&self, kind: BlobKind) -> Result<BlobWriter> {
        let dir = self.root.join(kind.folder());
        let tmp = stream_temp_path(&dir);
        // 0600 like every blob: the node's alone.
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        Ok(BlobWriter {
            file: Some(file),
            tmp: Temp(Some(tmp)),
            dir,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Moves a finished blob into place under its digest (replacing an
    /// identical file is harmless), durably.
    pub fn commit(&self, staged: &mut StagedBlob) -> Result<()> {
        let Some(tmp) = staged.tmp.0.take() else {
            return Ok(());
        };
        let path = staged.dir.join(staged.digest.hex());
        if let Err(error) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(error.into());
        }
        fs::File::open(&staged.dir)?.sync_all()?;
        Ok(())
    }
}

/// A temporary file's path, removed on drop unless taken.
#[derive(Debug)]
struct Temp(Option<PathBuf>);

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// A blob being written piece by piece: see [`BlobDir::writer`]. Dropped
/// unfinished, it removes its temporary file.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<fs::File>,
    tmp: Temp,
    dir: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Syncs the bytes to disk and returns the blob, ready for
    /// [`BlobDir::commit`].
    pub fn finish(mut self) -> Result<StagedBlob> {
        if let Some(file) = self.file.take() {
            file.sync_all()?;
        }
        Ok(StagedBlob {
            digest: Digest(hex::encode(std::mem::take(&mut self.hasher).finalize())),
            size: self.size,
            tmp: Temp(self.tmp.0.take()),
            dir: std::mem::take(&mut self.dir),
        })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("the blob is finished"))?;
        let written = file.write(bytes)?;
        self.hasher.update(&bytes[..written]);
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), Write::flush)
    }
}

/// A blob written to disk but not yet in place: see [`BlobDir::commit`].
/// Dropped uncommitted, it removes its temporary file.
#[derive(Debug)]
pub struct StagedBlob {
    digest: Digest,
    size: u64,
    tmp: Temp,
    dir: PathBuf,
}

impl StagedBlob {
    /// The digest of its bytes.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// How many bytes it holds.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// A fresh temporary file path in `dir` for a streamed blob. The `.tmp-`
/// prefix is the one every temporary blob file has (so a sweep at start
/// finds those a crash left); `stream-` keeps them apart from
/// [`write_atomically`]'s.
fn stream_temp_path(dir: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        ".tmp-stream-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes to a temporary file, syncs it, and renames it into place, so a
/// crash leaves either no file or the whole file, never a torn one.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("blob path has no parent folder"))?;
    // Unique per process and write, so concurrent writers never share one.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        "{TEMP_PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        // 0600: blobs are the node's alone (the folder is 0700 as well).
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(error) = written {
        // A failed write must not keep its space: on a nearly full disk
        // the partial file would make every later write fail too.
        let _ = fs::remove_file(&tmp);
        return Err(error);
    }
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    #[tokio::test]
    async fn put_is_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::open(dir.path()).unwrap();
        let a = blobs.put(BlobKind::Component, b"hello").await.unwrap();
        let b = blobs.put(BlobKind::Component, b"hello").await.unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(
            blobs.get(BlobKind::Component, &a).await.unwrap().as_deref(),
            Some(&b"hello"[..])
        );
        assert!(blobs.get(BlobKind::Artifact, &a).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn checked_blobs_are_verified_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::open(dir.path()).unwrap();
        let key = Digest::derive(&["component", "engine"]);
        assert!(
            blobs
                .verified_path(BlobKind::Artifact, &key)
                .await
                .unwrap()
                .is_none()
        );
        blobs
            .put_checked(BlobKind::Artifact, &key, b"compiled code")
            .await
            .unwrap();
        assert!(blobs.has_checked(BlobKind::Artifact, &key).await);
        let path = blobs
            .verified_path(BlobKind::Artifact, &key)
            .await
            .unwrap()
            .unwrap();
        // A fresh handle (a restart) hashes the file again.
        let reopened = BlobDir::open(dir.path()).unwrap();
        assert!(
            reopened
                .verified_path(BlobKind::Artifact, &key)
                .await
                .unwrap()
                .is_some()
        );

        // A flipped byte, in place, is seen by both.
        fs::write(&path, b"compiled cOde").unwrap();
        for blobs in [&blobs, &reopened] {
            let error = blobs
                .verified_path(BlobKind::Artifact, &key)
                .await
                .unwrap_err();
            assert!(matches!(error, StoreError::Corrupt(_)), "{error}");
        }
        // Writing it again heals it; a truncation is seen too.
        blobs
            .put_checked(BlobKind::Artifact, &key, b"compiled code")
            .await
            .unwrap();
        assert!(
            blobs
                .verified_path(BlobKind::Artifact, &key)
                .await
                .unwrap()
                .is_some()
        );
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4)
            .unwrap();
        assert!(blobs.verified_path(BlobKind::Artifact, &key).await.is_err());
        // Without its checksum a blob cannot be trusted: absent.
        blobs
            .put_checked(BlobKind::Artifact, &key, b"compiled code")
            .await
            .unwrap();
        fs::remove_file(blobs.checksum_path(BlobKind::Artifact, &key)).unwrap();
        assert!(!blobs.has_checked(BlobKind::Artifact, &key).await);
        assert!(
            reopened
                .verified_path(BlobKind::Artifact, &key)
                .await
                .unwrap()
                .is_none()
        );
        blobs.remove(BlobKind::Artifact, &key).unwrap();
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_failed_write_leaves_no_temporary_file_and_old_ones_are_swept() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::open(dir.path()).unwrap();
        let folder = dir.path().join("objects");
        // The rename fails: a folder stands where the blob would go.
        let digest = Digest::of(b"bytes");
        fs::create_dir(folder.join(digest.hex())).unwrap();
        fs::write(folder.join(digest.hex()).join("x"), b"").unwrap();
        assert!(
            blobs
                .put_keyed(BlobKind::Object, &digest, b"bytes")
                .await
                .is_ok()
        );
        let other = Digest::of(b"other");
        fs::create_dir(folder.join(other.hex())).unwrap();
        fs::write(folder.join(other.hex()).join("x"), b"").unwrap();
        let error = write_atomically(&folder.join(other.hex()), b"other");
        assert!(error.is_err());
        let names = |folder: &Path| -> Vec<String> {
            fs::read_dir(folder)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(TEMP_PREFIX))
                .collect()
        };
        assert_eq!(names(&folder), Vec::<String>::new());

        // Left by a crash: swept at start.
        fs::write(folder.join(".tmp-1-1"), b"partial").unwrap();
        fs::write(dir.path().join("artifacts/.tmp-1-2"), b"partial").unwrap();
        assert_eq!(blobs.sweep_temp_files().unwrap(), 2);
        assert_eq!(names(&folder), Vec::<String>::new());

        // Blobs are the node's alone.
        let digest = blobs.put(BlobKind::Component, b"wasm").await.unwrap();
        let mode = fs::metadata(blobs.path(BlobKind::Component, &digest))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_streamed_blob_lands_under_its_digest_and_leaves_no_temp_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::open(dir.path()).unwrap();
        let mut writer = blobs.writer(BlobKind::Object).unwrap();
        writer.write_all(b"hel").unwrap();
        writer.write_all(b"lo").unwrap();
        assert_eq!(writer.size(), 5);
        let mut staged = writer.finish().unwrap();
        assert_eq!(staged.digest(), &Digest::of(b"hello"));
        assert_eq!(staged.size(), 5);
        blobs.commit(&mut staged).unwrap();
        assert_eq!(
            blobs
                .get(BlobKind::Object, &Digest::of(b"hello"))
                .await
                .unwrap()
                .as_deref(),
            Some(&b"hello"[..])
        );
        let names = || -> Vec<String> {
            fs::read_dir(dir.path().join("objects"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(), [Digest::of(b"hello").hex()]);
        let mode = fs::metadata(blobs.path(BlobKind::Object, &Digest::of(b"hello")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "a streamed blob is private");

        // Abandoned before or after finishing: the temp file goes.
        let mut writer = blobs.writer(BlobKind::Object).unwrap();
        writer.write_all(b"partial").unwrap();
        drop(writer);
        let staged = blobs.writer(BlobKind::Object).unwrap().finish().unwrap();
        drop(staged);
        assert_eq!(names(), [Digest::of(b"hello").hex()]);
    }

    #[test]
    fn derived_keys_do_not_collide_on_concatenation() {
        assert_ne!(Digest::derive(&["ab", "c"]), Digest::derive(&["a", "bc"]));
    }

    #[test]
    fn parse_accepts_only_sha256() {
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(Digest::parse("sha256:xyz").is_err());
        assert!(Digest::parse(&"A".repeat(64)).is_err());
    }
}
