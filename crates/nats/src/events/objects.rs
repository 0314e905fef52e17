//! Object buckets: metadata in the event bucket, `o.b<bucket>.k<key>`
//! (written in one batch with the events it causes), bytes in the
//! JetStream object store `<ns>_objects` under `object/<sha256>`
//! (content-addressed, so a put of bytes already there uploads nothing),
//! and this node's copies in a local [`mayfly_store::BlobDir`].
//!
//! Bytes no object refers to any more stay in the object store: a
//! collector that is safe across nodes is left to do.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use std::io::Write as _;

use tokio::io::AsyncReadExt;

use mayfly_store::{
    BlobKind, BlobStore, BlobWriter, BucketChange, BucketStats, Digest, ObjectChange, ObjectMeta,
    ObjectStore, Result, StagedBlob, StoreError,
};

use super::kv::{bucket_and_key, listed};
use super::{Found, MAX_CONFLICTS, NatsEvents, json, now_ms, parse, token, too_busy};
use crate::batch::Write;

/// An object's metadata, `o.b<bucket>.k<key>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// SHA-256, hex.
    digest: String,
    size: u64,
    content_type: String,
    modified_ms: i64,
}

impl Record {
    fn meta(&self, bucket: &str, key: &str) -> ObjectMeta {
        ObjectMeta {
            bucket: bucket.to_string(),
            key: key.to_string(),
            size: self.size,
            etag: format!("\"{}\"", self.digest),
            content_type: self.content_type.clone(),
            modified_ms: self.modified_ms,
        }
    }
}

fn object_prefix(bucket: &str) -> String {
    format!("o.b{}", token(bucket))
}

fn object_key(bucket: &str, key: &str) -> String {
    format!("{}.k{}", object_prefix(bucket), token(key))
}

/// Bytes read from the object store at a time.
const DOWNLOAD_CHUNK: usize = 256 * 1024;

/// Runs file I/O off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(crate::backend)?
}

/// The bytes' name in the object store.
fn blob_name(digest: &Digest) -> String {
    format!("object/{}", digest.hex())
}

impl NatsEvents {
    /// Uploads the bytes of `digest` (already in the local copy) unless
    /// the object store has them.
    async fn upload(&self, digest: &Digest) -> Result<()> {
        let name = blob_name(digest);
        if let Ok(info) = self.objects.info(&name).await
            && !info.deleted
        {
            return Ok(());
        }
        let path = self
            .blobs
            .local_path(BlobKind::Object, digest)
            .await
            .ok_or_else(|| StoreError::Corrupt(format!("staged object {digest} is missing")))?;
        let mut file = tokio::fs::File::open(&path).await?;
        self.objects
            .put(name.as_str(), &mut file)
            .await
            .map_err(crate::backend)?;
        Ok(())
    }

    /// A local file of the bytes of `digest`, downloaded on a miss and
    /// checked against the digest.
    async fn local_copy(&self, digest: &Digest) -> Result<PathBuf> {
        if let Some(path) = self.blobs.local_path(BlobKind::Object, digest).await {
            return Ok(path);
        }
        let mut object = self
            .objects
            .get(blob_name(digest))
            .await
            .map_err(crate::backend)?;
        // Streamed to a staged file, never whole in memory; the writer's
        // own digest checks the bytes.
        let mut writer = self.blobs.writer(BlobKind::Object)?;
        let mut chunk = vec![0; DOWNLOAD_CHUNK];
        loop {
            let read = object.read(&mut chunk).await?;
            if read == 0 {
                break;
            }
            let bytes = chunk[..read].to_vec();
            writer = blocking(move || {
                writer.write_all(&bytes)?;
                Ok(writer)
            })
            .await?;
        }
        let mut staged = blocking(move || writer.finish()).await?;
        if staged.digest() != digest {
            return Err(StoreError::Corrupt(format!(
                "object bytes {digest} do not match their digest"
            )));
        }
        let blobs = self.blobs.clone();
        blocking(move || blobs.commit(&mut staged)).await?;
        self.blobs
            .local_path(BlobKind::Object, digest)
            .await
            .ok_or_else(|| StoreError::Corrupt(format!("object bytes {digest} vanished")))
    }

    /// Records `key` as the (uploaded) bytes of `digest`, with its events.
    async fn record_object(
        &self,
        bucket: &str,
        key: &str,
        digest: &Digest,
        size: u64,
        content_type: &str,
    ) -> Result<ObjectMeta> {
        self.upload(digest).await?;
        let stored = object_key(bucket, key);
        let watching = self.watchers("object", bucket).await?;
        for _ in 0..MAX_CONFLICTS {
            let now = now_ms();
            let record = Record {
                digest: digest.hex().to_string(),
                size,
                content_type: content_type.to_string(),
                modified_ms: now,
            };
            let meta = record.meta(bucket, key);
            let change = BucketChange::Object {
                meta: &meta,
                change: ObjectChange::Created,
            };
            let write = Write::put(stored.clone(), json(&record)?);
            if self
                .commit_change(vec![write], change, &watching, now)
                .await?
                .is_some()
            {
                return Ok(meta);
            }
        }
        Err(too_busy("writing an object"))
    }

    async fn object_record(&self, bucket: &str, key: &str) -> Result<Option<(Record, Found)>> {
        let (found, _) = self.hub.read(&object_key(bucket, key)).await?;
        match found {
            None => Ok(None),
            Some(found) => Ok(Some((parse(&found)?, found))),
        }
    }

    async fn listing(&self, pattern: &str) -> Result<Vec<ObjectMeta>> {
        let mut objects = Vec::new();
        for found in self.hub.scan(pattern).await? {
            let (bucket, key) = bucket_and_key(&found.key)?;
            objects.push(parse::<Record>(&found)?.meta(&bucket, &key));
        }
        Ok(objects)
    }
}

#[async_trait::async_trait]
impl ObjectStore for NatsEvents {
    async fn object_put(
        &self,
        bucket: &str,
        key: &str,
        bytes: &[u8],
        content_type: &str,
    ) -> Result<ObjectMeta> {
        let digest = self.blobs.put(BlobKind::Object, bytes).await?;
        self.record_object(bucket, key, &digest, bytes.len() as u64, content_type)
            .await
    }

    async fn object_writer(&self) -> Result<BlobWriter> {
        self.blobs.writer(BlobKind::Object)
    }

    async fn object_put_staged(
        &self,
        bucket: &str,
        key: &str,
        mut staged: StagedBlob,
        content_type: &str,
    ) -> Result<ObjectMeta> {
        let digest = staged.digest().clone();
        let size = staged.size();
        let blobs = self.blobs.clone();
        blocking(move || blobs.commit(&mut staged)).await?;
        self.record_object(bucket, key, &digest, size, content_type)
            .await
    }

    async fn object_get(&self, bucket: &str, key: &str) -> Result<Option<(ObjectMeta, PathBuf)>> {
        let Some((record, _)) = self.object_record(bucket, key).await? else {
            return Ok(None);
        };
        let path = self.local_copy(&Digest::parse(&record.digest)?).await?;
        Ok(Some((record.meta(bucket, key), path)))
    }

    async fn object_delete(&self, bucket: &str, key: &str) -> Result<bool> {
        let stored = object_key(bucket, key);
        let watching = self.watchers("object", bucket).await?;
        for _ in 0..MAX_CONFLICTS {
            let Some((record, found)) = self.object_record(bucket, key).await? else {
                return Ok(false);
            };
            let now = now_ms();
            let mut meta = record.meta(bucket, key);
            meta.modified_ms = now;
            let change = BucketChange::Object {
                meta: &meta,
                change: ObjectChange::Deleted,
            };
            let write = Write::delete(stored.clone()).expect(found.revision);
            if self
                .commit_change(vec![write], change, &watching, now)
                .await?
                .is_some()
            {
                return Ok(true);
            }
        }
        Err(too_busy("deleting an object"))
    }

    async fn object_list(
        &self,
        bucket: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<ObjectMeta>> {
        let mut objects = self
            .listing(&format!("{}.>", object_prefix(bucket)))
            .await?;
        objects.retain(|o| listed(&o.key, prefix, after));
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        objects.truncate(limit);
        Ok(objects)
    }

    async fn object_buckets(&self) -> Result<Vec<BucketStats>> {
        let mut buckets: BTreeMap<String, BucketStats> = BTreeMap::new();
        for object in self.listing("o.>").await? {
            let stats = buckets.entry(object.bucket.clone()).or_insert(BucketStats {
                bucket: object.bucket.clone(),
                entries: 0,
                bytes: 0,
            });
            stats.entries += 1;
            stats.bytes += object.size;
        }
        Ok(buckets.into_values().collect())
    }
}
