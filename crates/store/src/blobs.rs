//! The blob contract: immutable content-addressed bytes (uploaded
//! components, compiled artifacts, object bytes) and their digests.

use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::{Result, StoreError};

/// A SHA-256 digest, shown as `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub(crate) String);

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
    /// An uploaded ONNX model (wasi:nn), as uploaded.
    Model,
}

impl BlobKind {
    pub(crate) fn folder(self) -> &'static str {
        match self {
            BlobKind::Component => "components",
            BlobKind::Artifact => "artifacts",
            BlobKind::Object => "objects",
            BlobKind::Model => "models",
        }
    }
}

/// Immutable content-addressed bytes: uploaded components and compiled
/// artifacts.
///
/// Every method is asynchronous, the cheap checks included
/// ([`BlobStore::has_checked`], [`BlobStore::local_path`]): each may touch
/// the disk (a `stat` on a slow or network filesystem) or, for a cluster
/// back-end, the network, and none is on the request path.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under their digest (a no-op if already present) and
    /// returns it. Durable when it returns.
    async fn put(&self, kind: BlobKind, bytes: &[u8]) -> Result<Digest>;

    /// Stores `bytes` under a key the caller derived (e.g. an artifact keyed
    /// by component digest and engine settings).
    async fn put_keyed(&self, kind: BlobKind, key: &Digest, bytes: &[u8]) -> Result<()>;

    /// The bytes under `key`, if present.
    async fn get(&self, kind: BlobKind, key: &Digest) -> Result<Option<Vec<u8>>>;

    /// A local file holding the blob, for memory-mapping; `None` if absent
    /// (or, for a back-end without local files, always).
    async fn local_path(&self, kind: BlobKind, key: &Digest) -> Option<std::path::PathBuf>;

    /// Stores `bytes` under a key the caller derived, with a checksum of
    /// them that [`BlobStore::verified_path`] checks, replacing whatever
    /// was stored under `key` (a damaged copy included). For blobs that
    /// are trusted when read back, such as compiled artifacts.
    async fn put_checked(&self, kind: BlobKind, key: &Digest, bytes: &[u8]) -> Result<()>;

    /// Whether a blob stored with [`BlobStore::put_checked`] is present
    /// with its checksum. Cheap (no hashing): for start-up, where every
    /// function's artifact is looked at.
    async fn has_checked(&self, kind: BlobKind, key: &Digest) -> bool;

    /// A local file holding a blob stored with [`BlobStore::put_checked`]
    /// whose bytes match their checksum; `None` if the blob or its
    /// checksum is absent, [`StoreError::Corrupt`] if they differ.
    /// Each state of a file is hashed once per process: later calls cost a
    /// `stat` until the file changes.
    async fn verified_path(
        &self,
        kind: BlobKind,
        key: &Digest,
    ) -> Result<Option<std::path::PathBuf>>;
}
