//! Object buckets: bytes with metadata, listed by prefix.

use serde::{Deserialize, Serialize};

use super::BucketStats;
use crate::Result;

/// A change to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectChange {
    /// Written (created or replaced).
    Created,
    /// Deleted.
    Deleted,
}

impl ObjectChange {
    pub(crate) fn both() -> Vec<Self> {
        vec![Self::Created, Self::Deleted]
    }
}

/// An object's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Bucket name.
    pub bucket: String,
    /// Object key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Quoted SHA-256 of the bytes, as an HTTP entity tag.
    pub etag: String,
    /// Media type given when it was written.
    pub content_type: String,
    /// When it was written (ms since the Unix epoch).
    pub modified_ms: i64,
}

/// Object buckets: content-addressed bytes with metadata. Writes emit
/// `dev.mayfly.object.*` events to the triggers watching them.
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync {
    /// Stores `bytes` under `key`, replacing what was there.
    async fn object_put(
        &self,
        bucket: &str,
        key: &str,
        bytes: &[u8],
        content_type: &str,
    ) -> Result<ObjectMeta>;
    /// A writer for an object's bytes as they arrive (an upload streamed
    /// to disk, never whole in memory); store them with
    /// [`ObjectStore::object_put_staged`]. Asynchronous like the rest: it
    /// creates a file (and a cluster back-end might open an upload). The
    /// writer itself is a plain [`std::io::Write`] over a local file, so
    /// its writes block: make them off the async workers.
    async fn object_writer(&self) -> Result<crate::BlobWriter>;
    /// Stores the bytes `staged` under `key`, replacing what was there.
    async fn object_put_staged(
        &self,
        bucket: &str,
        key: &str,
        staged: crate::StagedBlob,
        content_type: &str,
    ) -> Result<ObjectMeta>;
    /// An object's metadata and a file holding its bytes.
    async fn object_get(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<(ObjectMeta, std::path::PathBuf)>>;
    /// Deletes an object; returns whether it existed.
    async fn object_delete(&self, bucket: &str, key: &str) -> Result<bool>;
    /// Objects whose key starts with `prefix` and sorts after `after`.
    async fn object_list(
        &self,
        bucket: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<ObjectMeta>>;
    /// Every bucket holding objects.
    async fn object_buckets(&self) -> Result<Vec<BucketStats>>;
}
