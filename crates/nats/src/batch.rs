//! Atomic batch publish (nats-server 2.12+, ADR-50): several KV writes to
//! one stream that land together or not at all, each with its own
//! compare-and-swap.
//!
//! Written by hand: async-nats 0.51 has only the header names, and the
//! `jetstream-extra` crate that implements the protocol pins async-nats
//! 0.48, which cannot share a connection with the 0.51 client. The
//! protocol is small: every message carries a batch id and its position;
//! messages before the last are plain core publishes, the last also
//! carries the commit header and is a request, answered with one PubAck
//! for the whole batch (or an error, in which case nothing was stored).

use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use serde::Deserialize;

use mayfly_store::StoreError;

/// Most messages in one batch: the server's limit (measured on 2.15.1:
/// 1001 is refused with error 10199, "atomic publish batch is too large").
pub(crate) const MAX_BATCH: usize = 1000;

/// How long the commit may take before its outcome is unknown; as short as
/// the JetStream context's own timeout (docs/fleet-design.md §0).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a commit keeps trying while nobody answers it on the fleet's
/// own servers. A clustered stream has no responder for a moment after it
/// is created and while it elects a new leader (a failover); the commit
/// was then never seen, so sending it again cannot write twice.
const NO_RESPONDER_PATIENCE: Duration = Duration::from_secs(3);

/// The server's error code for a failed `Nats-Expected-Last-Subject-Sequence`.
const WRONG_LAST_SEQUENCE: u64 = 10071;

/// The same, as a clustered stream answers it (without the sequence;
/// measured on 2.15.1 with 3 servers).
const WRONG_LAST_SEQUENCE_CONSTANT: u64 = 10164;

/// One write of a batch: a KV key put or deleted.
#[derive(Debug, Clone)]
pub(crate) struct Write {
    key: String,
    /// `None`: a delete marker.
    value: Option<Bytes>,
    /// The key's revision the write expects (0: the key was never
    /// written, or its history was purged); `None`: no check.
    expect: Option<u64>,
}

impl Write {
    /// Puts `value` under `key`.
    pub(crate) fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            value: Some(value.into()),
            expect: None,
        }
    }

    /// Deletes `key` (a KV delete marker).
    pub(crate) fn delete(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: None,
            expect: None,
        }
    }

    /// Only if `key`'s last message (a tombstone counts) is revision
    /// `revision`; 0 for a key with no message at all.
    pub(crate) fn expect(mut self, revision: u64) -> Self {
        self.expect = Some(revision);
        self
    }
}

/// Where a committed batch landed: its writes have revisions
/// `first..=last`, in the order they were given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Committed {
    pub(crate) first: u64,
    pub(crate) last: u64,
}

/// Why a batch did not commit.
#[derive(Debug)]
pub(crate) enum BatchError {
    /// A compare-and-swap failed: nothing was written. Re-read and decide.
    WrongLastSequence,
    /// The commit's answer never came: the batch may or may not have
    /// landed. Re-read before reporting anything.
    Unknown(StoreError),
    /// Refused or not sent: nothing was written.
    Failed(StoreError),
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: u64,
    error: Option<ReplyError>,
}

#[derive(Deserialize)]
struct ReplyError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// The server refused a batch for a reason other than a compare-and-swap.
#[derive(Debug, thiserror::Error)]
#[error("JetStream refused an atomic batch: {description} (error {code})")]
struct Refused {
    code: u64,
    description: String,
}

/// The hub's domain in a write prefix that reaches it from a leaf site
/// (`$JS.<hub>.API.$KV.<bucket>.`).
fn hub_of(prefix: &str) -> Option<&str> {
    prefix
        .strip_prefix("$JS.")?
        .split_once(".API.")
        .map(|(hub, _)| hub)
}

/// Commits `writes` to the KV bucket whose subjects start with `prefix`
/// (`$KV.<bucket>.`, or `$JS.<hub>.API.$KV.<bucket>.` from an edge node:
/// [`crate::Fleet::write_prefix`]), all or nothing.
pub(crate) async fn commit(
    client: &async_nats::Client,
    prefix: &str,
    writes: &[Write],
) -> Result<Committed, BatchError> {
    let count = writes.len();
    if count == 0 || count > MAX_BATCH {
        return Err(BatchError::Failed(StoreError::Backend(
            format!("an atomic batch holds 1 to {MAX_BATCH} writes, not {count}").into(),
        )));
    }
    let hub = hub_of(prefix);
    let deadline = tokio::time::Instant::now() + NO_RESPONDER_PATIENCE;
    let mut pause = Duration::from_millis(10);
    loop {
        match attempt(client, prefix, writes).await {
            Err(Attempt::NoResponders(_))
                if hub.is_none() && tokio::time::Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(250));
            }
            Err(Attempt::NoResponders(error)) => {
                // Nobody took the commit: the stream is not there, or (at
                // an edge) the hub is out of reach.
                return Err(BatchError::Failed(match hub {
                    Some(hub) => StoreError::Backend(
                        format!(
                            "the hub (JetStream domain `{hub}`) is unreachable from this site: \
                             its leaf link is down; retry once it is back"
                        )
                        .into(),
                    ),
                    None => crate::backend(error),
                }));
            }
            Err(Attempt::Other(error)) => return Err(error),
            Ok(committed) => return Ok(committed),
        }
    }
}

/// How one attempt at a batch failed.
enum Attempt {
    /// Nothing was listening for the commit: it was not stored.
    NoResponders(async_nats::RequestError),
    Other(BatchError),
}

impl From<BatchError> for Attempt {
    fn from(error: BatchError) -> Self {
        Self::Other(error)
    }
}

/// Sends `writes` once, under a batch id of its own: an attempt nobody
/// answered leaves at most an unfinished batch, which the server drops.
async fn attempt(
    client: &async_nats::Client,
    prefix: &str,
    writes: &[Write],
) -> Result<Committed, Attempt> {
    let count = writes.len();
    // At most 64 characters; a v7 UUID is unique enough across nodes.
    let id = uuid::Uuid::now_v7().simple().to_string();
    for (index, write) in writes.iter().enumerate() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Batch-Id", id.as_str());
        headers.insert("Nats-Batch-Sequence", (index + 1).to_string());
        if let Some(expect) = write.expect {
            headers.insert("Nats-Expected-Last-Subject-Sequence", expect.to_string());
        }
        if write.value.is_none() {
            headers.insert("KV-Operation", "DEL");
        }
        let subject = format!("{prefix}{}", write.key);
        let payload = write.value.clone().unwrap_or_default();
        if index + 1 < count {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| BatchError::Failed(crate::backend(e)))?;
            continue;
        }
        headers.insert(
            "Nats-Batch-Commit",
            async_nats::header::NATS_BATCH_COMMIT_FINAL,
        );
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(COMMIT_TIMEOUT));
        let reply = client
            .send_request(subject, request)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => Attempt::NoResponders(e),
                _ => Attempt::Other(BatchError::Unknown(crate::backend(e))),
            })?;
        let reply: Reply = serde_json::from_slice(&reply.payload).map_err(|e| {
            BatchError::Unknown(StoreError::Backend(
                format!("unreadable answer to an atomic batch: {e}").into(),
            ))
        })?;
        if let Some(error) = reply.error {
            if error.err_code == WRONG_LAST_SEQUENCE
                || error.err_code == WRONG_LAST_SEQUENCE_CONSTANT
            {
                return Err(BatchError::WrongLastSequence.into());
            }
            return Err(BatchError::Failed(crate::backend(Refused {
                code: error.err_code,
                description: error.description,
            }))
            .into());
        }
        if reply.count != count as u64 || reply.seq < reply.count {
            return Err(BatchError::Unknown(StoreError::Backend(
                format!(
                    "an atomic batch of {count} writes was acknowledged as {} ending at {}",
                    reply.count, reply.seq
                )
                .into(),
            ))
            .into());
        }
        return Ok(Committed {
            first: reply.seq + 1 - reply.count,
            last: reply.seq,
        });
    }
    // The loop returns on its last write, and `count` is not 0.
    Err(BatchError::Failed(StoreError::Backend("empty atomic batch".into())).into())
}

/// Creates the KV bucket `bucket` (or opens it) with atomic batches on.
/// `create_key_value` has no field for it, so the bucket's stream is
/// updated afterwards.
pub(crate) async fn atomic_bucket(
    jetstream: &async_nats::jetstream::Context,
    bucket: &str,
    num_replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, StoreError> {
    use async_nats::jetstream::{kv, stream::StorageType};
    // Opened first: once its stream allows atomic batches, its
    // configuration no longer matches what `create_key_value` would ask
    // for, and the server refuses that as a different configuration.
    let store = match jetstream.get_key_value(bucket).await {
        Ok(store) => store,
        Err(_) => {
            let created = jetstream
                .create_key_value(kv::Config {
                    bucket: bucket.to_string(),
                    // The latest value (or tombstone) of each key is all
                    // Mayfly reads; compare-and-swap needs no more.
                    history: 1,
                    storage: StorageType::File,
                    num_replicas,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(store) => store,
                // Another node created it meanwhile.
                Err(error) => jetstream
                    .get_key_value(bucket)
                    .await
                    .map_err(|_| crate::backend(error))?,
            }
        }
    };
    let mut stream = jetstream
        .get_stream(&store.stream_name)
        .await
        .map_err(crate::backend)?;
    let info = stream.info().await.map_err(crate::backend)?;
    if !info.config.allow_atomic_publish {
        let mut config = info.config.clone();
        config.allow_atomic_publish = true;
        jetstream
            .update_stream(config)
            .await
            .map_err(crate::backend)?;
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fleet;
    use crate::testing::NatsServers;

    #[tokio::test]
    async fn a_failed_expectation_writes_nothing_and_a_good_batch_writes_all() {
        let servers = NatsServers::single();
        let fleet = Fleet::connect(&servers.options("batch", "b"))
            .await
            .unwrap();
        let kv = atomic_bucket(fleet.jetstream(), "b_batch", 1)
            .await
            .unwrap();
        let first = kv.put("a", "1".into()).await.unwrap();

        // `b` must not exist (it does not), `a` must be at a revision it is
        // not at: neither is written.
        let writes = [
            Write::put("b", "new").expect(0),
            Write::put("a", "2").expect(first + 7),
        ];
        let err = commit(fleet.client(), &kv.prefix, &writes)
            .await
            .unwrap_err();
        assert!(matches!(err, BatchError::WrongLastSequence), "{err:?}");
        assert!(kv.entry("b").await.unwrap().is_none());
        assert_eq!(kv.get("a").await.unwrap().unwrap(), "1");

        // Right expectations: all land, contiguously, in order.
        let writes = [
            Write::put("b", "new").expect(0),
            Write::put("a", "2").expect(first),
            Write::delete("c"),
        ];
        let done = commit(fleet.client(), &kv.prefix, &writes).await.unwrap();
        assert_eq!(done.last - done.first, 2);
        let b = kv.entry("b").await.unwrap().unwrap();
        assert_eq!((b.revision, &b.value[..]), (done.first, &b"new"[..]));
        assert_eq!(
            kv.entry("a").await.unwrap().unwrap().revision,
            done.first + 1
        );
        let c = kv.entry("c").await.unwrap().unwrap();
        assert_eq!(c.revision, done.last);
        assert_eq!(c.operation, async_nats::jetstream::kv::Operation::Delete);

        // A tombstone is a message: "absent" after a delete expects its
        // revision, and 0 fails.
        let err = commit(
            fleet.client(),
            &kv.prefix,
            &[Write::put("c", "x").expect(0)],
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BatchError::WrongLastSequence), "{err:?}");
        commit(
            fleet.client(),
            &kv.prefix,
            &[Write::put("c", "x").expect(done.last)],
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn the_batch_limit_is_the_servers() {
        let servers = NatsServers::single();
        let fleet = Fleet::connect(&servers.options("batch", "b"))
            .await
            .unwrap();
        let kv = atomic_bucket(fleet.jetstream(), "b_batch", 1)
            .await
            .unwrap();
        let writes: Vec<Write> = (0..MAX_BATCH)
            .map(|i| Write::put(format!("k{i}"), "v").expect(0))
            .collect();
        let done = commit(fleet.client(), &kv.prefix, &writes).await.unwrap();
        assert_eq!(done.last - done.first + 1, MAX_BATCH as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_edge_node_commits_at_the_hub_and_names_the_hub_while_cut_off() {
        let servers = NatsServers::hub_with_sites(&["site-a"]);
        let hub = Fleet::connect(&servers.hub_options("hub-node", "e"))
            .await
            .unwrap();
        let edge = Fleet::connect(&servers.site_options("site-a", "edge-node", "e"))
            .await
            .unwrap();
        assert_eq!(hub.site(), None);
        assert_eq!(edge.site(), Some("site-a"));

        // The edge opens the hub's bucket (not one of its site's) and
        // commits through the hub's domain.
        let at_hub = atomic_bucket(hub.jetstream(), "e_batch", 1).await.unwrap();
        let at_edge = atomic_bucket(edge.jetstream(), "e_batch", 1).await.unwrap();
        assert!(
            edge.local_jetstream()
                .get_stream("KV_e_batch")
                .await
                .is_err(),
            "the bucket was made at the site"
        );
        let prefix = edge.write_prefix(&at_edge);
        assert_eq!(prefix, "$JS.hub.API.$KV.e_batch.");
        let done = commit(edge.client(), &prefix, &[Write::put("k", "1").expect(0)])
            .await
            .unwrap();
        assert_eq!(at_hub.get("k").await.unwrap().unwrap(), "1");
        let stale = commit(edge.client(), &prefix, &[Write::put("k", "2").expect(0)])
            .await
            .unwrap_err();
        assert!(matches!(stale, BatchError::WrongLastSequence), "{stale:?}");

        servers.link("site-a").cut();
        servers.wait_unlinked("site-a");
        let write = [Write::put("k", "3").expect(done.last)];
        let err = commit(edge.client(), &prefix, &write).await.unwrap_err();
        let BatchError::Failed(err) = err else {
            panic!("not refused: {err:?}")
        };
        assert!(
            err.to_string()
                .contains("the hub (JetStream domain `hub`) is unreachable"),
            "{err}"
        );
        assert!(edge.probe_hub(Duration::from_secs(1)).await.is_err());

        servers.link("site-a").heal();
        servers.wait_linked("site-a");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while commit(edge.client(), &prefix, &write).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "no commit after the heal"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(at_hub.get("k").await.unwrap().unwrap(), "3");
    }
}
