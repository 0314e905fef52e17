//! Content-addressed blob files.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::{BlobStore, Result, StoreError};

/// A SHA-256 digest, shown as `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(bytes)))
    }

    /// A key derived from several parts (e.g. a component digest and the
    /// engine fingerprint). Parts are length-prefixed so that no two
    /// different lists collide.
    pub fn derive(parts: &[&str]) -> Self {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        Self(hex::encode(hasher.finalize()))
    }

    /// Parses `sha256:<64 hex>` or bare hex.
    pub fn parse(text: &str) -> Result<Self> {
        let hex = text.strip_prefix("sha256:").unwrap_or(text);
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(hex.to_string()))
        } else {
            Err(StoreError::Corrupt(format!(
                "`{text}` is not a sha256 digest"
            )))
        }
    }

    /// The bare lowercase hex.
    pub fn hex(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// What a blob is; each kind lives in its own folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// An uploaded component, as uploaded.
    Component,
    /// A compiled artifact for one engine configuration.
    Artifact,
    /// The bytes of a stored object (object buckets).
    Object,
}

impl BlobKind {
    fn folder(self) -> &'static str {
        match self {
            BlobKind::Component => "components",
            BlobKind::Artifact => "artifacts",
            BlobKind::Object => "objects",
        }
    }
}

/// Blobs as files under `<data dir>/blobs/<kind>/<hex>`.
#[derive(Debug, Clone)]
pub struct BlobDir {
    root: PathBuf,
}

impl BlobDir {
    /// Opens (creating if needed) the blob folders under `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for kind in [BlobKind::Component, BlobKind::Artifact, BlobKind::Object] {
            fs::create_dir_all(root.join(kind.folder()))?;
        }
        Ok(Self { root })
    }

    fn path(&self, kind: BlobKind, key: &Digest) -> PathBuf {
        self.root.join(kind.folder()).join(key.hex())
    }

    /// Removes a blob; absent is not an error. The caller makes sure nothing
    /// refers to it any more.
    pub fn remove(&self, kind: BlobKind, key: &Digest) -> Result<()> {
        match fs::remove_file(self.path(kind, key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

impl BlobStore for BlobDir {
    fn put(&self, kind: BlobKind, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        self.put_keyed(kind, &digest, bytes)?;
        Ok(digest)
    }

    fn put_keyed(&self, kind: BlobKind, key: &Digest, bytes: &[u8]) -> Result<()> {
        let path = self.path(kind, key);
        if path.exists() {
            return Ok(());
        }
        write_atomically(&path, bytes)?;
        Ok(())
    }

    fn get(&self, kind: BlobKind, key: &Digest) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(kind, key)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn local_path(&self, kind: BlobKind, key: &Digest) -> Option<PathBuf> {
        let path = self.path(kind, key);
        path.exists().then_some(path)
    }
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
        ".tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_is_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::open(dir.path()).unwrap();
        let a = blobs.put(BlobKind::Component, b"hello").unwrap();
        let b = blobs.put(BlobKind::Component, b"hello").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(
            blobs.get(BlobKind::Component, &a).unwrap().as_deref(),
            Some(&b"hello"[..])
        );
        assert!(blobs.get(BlobKind::Artifact, &a).unwrap().is_none());
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
