//! KV buckets: keys with revisions, compare-and-swap, listing by prefix.

use serde::{Deserialize, Serialize};

use super::BucketStats;
use crate::Result;

/// A precondition for a KV write (compare-and-swap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCondition {
    /// Write whatever is there.
    Any,
    /// Only if the key's current revision is this one.
    Revision(u64),
    /// Only if the key does not exist.
    Absent,
}

/// A stored KV value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The value.
    pub value: Vec<u8>,
    /// Its revision: increasing over the whole store, so a deleted and
    /// re-created key never reuses one (no ABA for compare-and-swap).
    pub revision: u64,
    /// When it was written (ms since the Unix epoch).
    pub updated_ms: i64,
}

/// A key in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvKey {
    /// The key.
    pub key: String,
    /// Its revision.
    pub revision: u64,
    /// Size of its value in bytes.
    pub size: u64,
    /// When it was written (ms since the Unix epoch).
    pub updated_ms: i64,
}

/// KV buckets: keys with revisions, compare-and-swap, listing by prefix.
/// Writes emit `dev.mayfly.kv.*` events to the triggers watching them.
#[async_trait::async_trait]
pub trait KvStore: Send + Sync {
    /// The value under `key`.
    async fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<KvEntry>>;
    /// Writes `value` if `condition` holds; returns the new revision, or
    /// [`crate::StoreError::PreconditionFailed`].
    async fn kv_put(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
        condition: KvCondition,
    ) -> Result<u64>;
    /// Deletes `key` if `condition` holds; returns whether it existed.
    async fn kv_delete(&self, bucket: &str, key: &str, condition: KvCondition) -> Result<bool>;
    /// Keys starting with `prefix` and after `after`, in order, at most
    /// `limit`.
    async fn kv_list(
        &self,
        bucket: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KvKey>>;
    /// Every bucket holding keys.
    async fn kv_buckets(&self) -> Result<Vec<BucketStats>>;
}
