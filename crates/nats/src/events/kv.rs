//! KV buckets, `kv.b<bucket>.k<key>`: the value is the message itself, its
//! revision the stream sequence (unique across the whole store, so a
//! re-created key never reuses one). A write and the events it causes are
//! one atomic batch, the write first.

use std::collections::BTreeMap;

use mayfly_store::{
    BucketChange, BucketStats, KvCondition, KvEntry, KvKey, KvStore, QueueRef, Result, StoreError,
    Trigger,
};

use super::queue::Message;
use super::{Found, MAX_CONFLICTS, NatsEvents, now_ms, token, too_busy, untoken};
use crate::batch::{Committed, Write};

fn kv_prefix(bucket: &str) -> String {
    format!("kv.b{}", token(bucket))
}

fn kv_key(bucket: &str, key: &str) -> String {
    format!("{}.k{}", kv_prefix(bucket), token(key))
}

/// The bucket and key of a stored key `<kind>.b<bucket>.k<key>`.
pub(super) fn bucket_and_key(stored: &str) -> Result<(String, String)> {
    let mut parts = stored.split('.').skip(1);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(bucket), Some(key), None) => {
            match (bucket.strip_prefix('b'), key.strip_prefix('k')) {
                (Some(bucket), Some(key)) => Ok((untoken(bucket)?, untoken(key)?)),
                _ => Err(StoreError::Corrupt(format!("unreadable key `{stored}`"))),
            }
        }
        _ => Err(StoreError::Corrupt(format!("unreadable key `{stored}`"))),
    }
}

/// Whether `key` is listed for `prefix` after `after`.
pub(super) fn listed(key: &str, prefix: &str, after: &str) -> bool {
    key.starts_with(prefix) && key > after
}

impl NatsEvents {
    /// The triggers that may watch a change of `kind` to `bucket`.
    pub(super) async fn watchers(&self, kind: &str, bucket: &str) -> Result<Vec<Trigger>> {
        let mut triggers = self.all_triggers().await?;
        triggers.retain(|t| t.spec.source.kind() == kind && t.spec.source.target() == bucket);
        Ok(triggers)
    }

    /// Commits `writes` (a user's change) with the events `change` causes
    /// among `watching`, in one batch; `None` when a compare-and-swap
    /// failed. The change's writes come first in the batch.
    pub(super) async fn commit_change(
        &self,
        writes: Vec<Write>,
        change: BucketChange<'_>,
        watching: &[Trigger],
        now: i64,
    ) -> Result<Option<Committed>> {
        let order_key = change.order_key();
        let records: Vec<(QueueRef, Message)> = change
            .fan_out(watching, now)?
            .into_iter()
            .map(|(trigger, event)| {
                (
                    QueueRef::Inbox(trigger.function.clone()),
                    Message::inbox(&event, order_key.clone(), now),
                )
            })
            .collect();
        Ok(self
            .insert(&self.hub, &records, writes)
            .await?
            .map(|(_, committed)| committed))
    }
}

/// The revision a write under `condition` expects (`None`: no check), or
/// why it may not be made.
fn expectation(
    key: &str,
    current: Option<&Found>,
    last_revision: u64,
    condition: KvCondition,
) -> Result<Option<u64>> {
    match (condition, current) {
        (KvCondition::Any, _) => Ok(None),
        (KvCondition::Absent, None) => Ok(Some(last_revision)),
        (KvCondition::Absent, Some(found)) => Err(StoreError::PreconditionFailed(format!(
            "`{key}` exists (revision {})",
            found.revision
        ))),
        (KvCondition::Revision(wanted), Some(found)) if found.revision == wanted => {
            Ok(Some(wanted))
        }
        (KvCondition::Revision(wanted), Some(found)) => Err(StoreError::PreconditionFailed(
            format!("`{key}` is at revision {}, not {wanted}", found.revision),
        )),
        (KvCondition::Revision(wanted), None) => Err(StoreError::PreconditionFailed(format!(
            "`{key}` does not exist (expected revision {wanted})"
        ))),
    }
}

#[async_trait::async_trait]
impl KvStore for NatsEvents {
    async fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<KvEntry>> {
        let (found, _) = self.hub.read(&kv_key(bucket, key)).await?;
        Ok(found.map(|found| KvEntry {
            value: found.value.to_vec(),
            revision: found.revision,
            updated_ms: found.time_ms,
        }))
    }

    async fn kv_put(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
        condition: KvCondition,
    ) -> Result<u64> {
        let stored = kv_key(bucket, key);
        let watching = self.watchers("kv", bucket).await?;
        for _ in 0..MAX_CONFLICTS {
            let (current, last_revision) = self.hub.read(&stored).await?;
            let expect = expectation(key, current.as_ref(), last_revision, condition)?;
            let mut write = Write::put(stored.clone(), value.to_vec());
            if let Some(revision) = expect {
                write = write.expect(revision);
            }
            let change = BucketChange::Kv {
                bucket,
                key,
                value: Some(value),
            };
            if let Some(done) = self
                .commit_change(vec![write], change, &watching, now_ms())
                .await?
            {
                return Ok(done.first);
            }
        }
        Err(too_busy("writing a KV key"))
    }

    async fn kv_delete(&self, bucket: &str, key: &str, condition: KvCondition) -> Result<bool> {
        let stored = kv_key(bucket, key);
        let watching = self.watchers("kv", bucket).await?;
        for _ in 0..MAX_CONFLICTS {
            let (current, last_revision) = self.hub.read(&stored).await?;
            expectation(key, current.as_ref(), last_revision, condition)?;
            let Some(current) = current else {
                return Ok(false);
            };
            // Expects what it read, so "existed" is true of what it deleted.
            let write = Write::delete(stored.clone()).expect(current.revision);
            let change = BucketChange::Kv {
                bucket,
                key,
                value: None,
            };
            if self
                .commit_change(vec![write], change, &watching, now_ms())
                .await?
                .is_some()
            {
                return Ok(true);
            }
        }
        Err(too_busy("deleting a KV key"))
    }

    async fn kv_list(
        &self,
        bucket: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KvKey>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut keys = Vec::new();
        for found in self.hub.scan(&format!("{}.>", kv_prefix(bucket))).await? {
            let (_, key) = bucket_and_key(&found.key)?;
            if listed(&key, prefix, after) {
                keys.push(KvKey {
                    key,
                    revision: found.revision,
                    size: found.value.len() as u64,
                    updated_ms: found.time_ms,
                });
            }
        }
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        keys.truncate(limit);
        Ok(keys)
    }

    async fn kv_buckets(&self) -> Result<Vec<BucketStats>> {
        let mut buckets: BTreeMap<String, BucketStats> = BTreeMap::new();
        for found in self.hub.scan("kv.>").await? {
            let (bucket, _) = bucket_and_key(&found.key)?;
            let stats = buckets.entry(bucket.clone()).or_insert(BucketStats {
                bucket,
                entries: 0,
                bytes: 0,
            });
            stats.entries += 1;
            stats.bytes += found.value.len() as u64;
        }
        Ok(buckets.into_values().collect())
    }
}
