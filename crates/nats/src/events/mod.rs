//! The event store on JetStream: KV buckets, object buckets, named queues,
//! function inboxes, triggers and dead letters, shared by every node of
//! the fleet ([`NatsEvents`]).
//!
//! Deviation from docs/fleet-design.md §4: everything lives in one KV
//! bucket with atomic batches on (`<ns>_events`), rather than in work-queue
//! streams with durable consumers and a relay. The contracts need per-event
//! state NATS consumers cannot express (an exact attempt count that a
//! postpone gives back, `Stale`/`Gone` receipts, per-key order that a
//! retried event keeps blocking, `next_visible`, leases a node releases,
//! per-receive visibility). So each stored event is a record holding its
//! attempts, visibility and lease, changed by compare-and-swap on its
//! revision; a user's write and the events it causes are one atomic batch
//! (the transactional outbox without a relay); a schedule's run is a
//! compare-and-swap of its trigger record in the same batch as its event,
//! so a slot fires once across the fleet. A node that dies leaves its
//! claims leased: they become visible to every node when the lease ends.
//!
//! Keys (names and keys of users become lowercase hex tokens, so any UTF-8
//! fits the KV key alphabet):
//! - `ctr`: the last id given to a message, dead letter or trigger (one
//!   counter: ids increase in commit order across the fleet);
//! - `m.<n|i><hex queue>.<id:020>`: a named queue's message or a function
//!   inbox's event ([`queue`]);
//! - `d.f<hex function>.<id:020>`: a dead letter;
//! - `t.<id:020>`: a trigger; `t.rm.f<hex function>`: a function's
//!   removal, for the change feed; `s.f<hex function>.<sha256 spec>`: the
//!   id of a function's trigger with that spec;
//! - `kv.b<hex bucket>.k<hex key>`: a user's KV value;
//! - `o.b<hex bucket>.k<hex key>`: an object's metadata, its bytes in the
//!   object store `<ns>_objects` under `object/<sha256>`.
//!
//! Listings read the last message of every key under a prefix through one
//! ordered consumer ([`NatsEvents::scan`]): O(keys under the prefix) per
//! claim, which is what the server offers without secondary indexes.

mod hints;
mod kv;
mod objects;
mod queue;
mod sites;
mod triggers;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
use async_nats::jetstream::kv::{Operation, Store};
use async_nats::jetstream::object_store;
use async_nats::jetstream::stream::DeleteMessageErrorKind;
use bytes::Bytes;
use futures::StreamExt;

use mayfly_store::{BlobDir, Result, StoreError, TriggerChange};

use crate::Fleet;
use crate::batch::{self, BatchError, Committed, Write};
use crate::watch::Watched;
use sites::Place;

/// Attempts of a write that keeps losing compare-and-swaps to other
/// writers before it gives up.
const MAX_CONFLICTS: usize = 64;

/// Longest wait for the next entry of a listing: entries come at once,
/// so a longer silence means the listing stalled.
const SCAN_TIMEOUT: Duration = Duration::from_secs(1);

/// Listings tried before giving up.
const SCAN_ATTEMPTS: usize = 3;

const COUNTER: &str = "ctr";

/// The event store of a node in the fleet: one store seen through the
/// four event contracts (`KvStore`, `ObjectStore`, `EventQueue`,
/// `TriggerStore`). Its change-feed task stops when it is dropped.
///
/// Everything lives in the hub's bucket but the queues placed at a leaf
/// site (`<name>@<site>`, [`sites`]), which live in that site's own bucket
/// of the same name; KV and object buckets, triggers and inboxes are in
/// the hub's.
pub struct NatsEvents {
    /// The fleet's bucket, at the hub (through its domain at an edge).
    hub: Arc<Bucket>,
    /// At an edge node: its site's own bucket, reached while cut off.
    local: Option<Arc<Bucket>>,
    /// Other sites' buckets, opened through their domains when first used.
    sites: std::sync::Mutex<std::collections::HashMap<String, Arc<Bucket>>>,
    fleet: Fleet,
    objects: object_store::ObjectStore,
    /// Object bytes on this node: staged uploads and downloaded copies.
    blobs: BlobDir,
    /// Whose dispatcher leases a claim ([`mayfly_store::EventQueue::release_leases`]).
    node: String,
    triggers: Arc<Watched<TriggerChange>>,
    watcher: tokio::task::JoinHandle<()>,
    /// Work hints to and from the other nodes ([`hints`]).
    hints: hints::Hints,
}

/// One event bucket, in one JetStream domain.
pub(super) struct Bucket {
    client: async_nats::Client,
    kv: Store,
    /// `$KV.<bucket>.`: the subject prefix of its keys.
    prefix: String,
    /// Where atomic batches publish: `$KV.<bucket>.` in this node's own
    /// domain, `$JS.<domain>.API.$KV.<bucket>.` in another.
    write_prefix: String,
    /// Where it is from this node.
    place: Place,
    /// Its JetStream domain, named in hints and errors.
    domain: String,
    /// Ids it gives start above this: a site's dead letters and messages
    /// never share an id with the hub's ([`sites::SITE_ID_BASE`]).
    id_base: i64,
}

impl Drop for NatsEvents {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// The last value of a key.
#[derive(Debug, Clone)]
struct Found {
    key: String,
    value: Bytes,
    revision: u64,
    /// When it was written (server time, ms since the Unix epoch).
    time_ms: i64,
}

impl NatsEvents {
    /// Opens (or creates) the fleet's event bucket and object store, and
    /// at an edge node its site's event bucket; `cache_dir` holds this
    /// node's copies of object bytes.
    pub async fn open(fleet: &Fleet, cache_dir: &Path) -> Result<Self> {
        let replicas = fleet.replicas();
        let name = fleet.name("events");
        let kv = open_bucket(fleet.jetstream(), &name, replicas).await?;
        let hub = Arc::new(Bucket {
            client: fleet.client().clone(),
            prefix: format!("$KV.{}.", kv.name),
            write_prefix: fleet.write_prefix(&kv),
            kv: kv.clone(),
            place: Place::Hub,
            domain: fleet.hub_domain().to_string(),
            id_base: 0,
        });
        // A site's bucket has the same name in its own domain
        // (docs/edge-design.md §4.1); one copy, like the site's server.
        let local = match fleet.site() {
            Some(site) => {
                let kv = open_bucket(fleet.local_jetstream(), &name, 1).await?;
                Some(Arc::new(Bucket {
                    client: fleet.client().clone(),
                    prefix: format!("$KV.{}.", kv.name),
                    write_prefix: kv.prefix.clone(),
                    kv,
                    place: Place::Local,
                    domain: site.to_string(),
                    id_base: sites::SITE_ID_BASE,
                }))
            }
            None => None,
        };
        let objects = open_objects(fleet, replicas).await?;
        let blobs = BlobDir::open(cache_dir)?;
        // Downloads and uploads this node never finished (a crash): the
        // directory is this node's alone.
        blobs.sweep_temp_files()?;
        // Subscribed before the first request below, which the server
        // answers only after it registered the subscription: a write
        // another node makes after this store opened is hinted to it.
        // Only the hints of the buckets this node reads: a site's own
        // hints do not cross its leaf link to nodes that have no use
        // for them.
        let mut domains = vec![hub.domain.clone()];
        domains.extend(local.iter().map(|local| local.domain.clone()));
        let hints = hints::Hints::start(
            fleet.client().clone(),
            fleet.subject("events.wake"),
            domains,
            fleet.node_name().to_string(),
        )
        .await?;
        let (triggers, watcher) = Watched::start_filtered(
            fleet,
            kv,
            Some("t.>".into()),
            triggers::change_of,
            |changes, change| changes.push(change),
        )
        .await?;
        Ok(Self {
            hub,
            local,
            sites: Default::default(),
            fleet: fleet.clone(),
            objects,
            blobs,
            node: fleet.node_name().to_string(),
            triggers,
            watcher,
            hints,
        })
    }
}

impl Bucket {
    /// Every key under `pattern` (a KV key pattern such as `m.>`) with its
    /// last value; deleted keys left out.
    async fn scan(&self, pattern: &str) -> Result<Vec<Found>> {
        for _ in 0..SCAN_ATTEMPTS {
            if let Some(found) = self.scan_once(pattern).await? {
                return Ok(found);
            }
        }
        Err(StoreError::Backend(
            format!("listing `{pattern}` timed out").into(),
        ))
    }

    /// One listing; `None` if it stalled (a message it was to deliver was
    /// removed meanwhile, and its count of pending messages never reached
    /// zero).
    async fn scan_once(&self, pattern: &str) -> Result<Option<Vec<Found>>> {
        let consumer = self
            .kv
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: format!("{}{pattern}", self.prefix),
                replay_policy: ReplayPolicy::Instant,
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(crate::backend)?;
        // Deleted once read rather than left to the server's inactivity
        // threshold (30 s): a dispatcher lists its inboxes many times a
        // second.
        let name = consumer.cached_info().name.clone();
        let listed = self.read_listing(consumer).await;
        let stream = self.kv.stream.clone();
        tokio::spawn(async move {
            if let Err(error) = stream.delete_consumer(&name).await {
                tracing::debug!(%error, "could not delete a listing's consumer");
            }
        });
        if matches!(listed, Ok(None)) {
            tracing::debug!(pattern, "a listing stalled; listing again");
        }
        listed
    }

    /// The entries an ordered consumer delivers, until it has delivered
    /// what was pending when it was created; `None` if it stalled.
    async fn read_listing(
        &self,
        consumer: async_nats::jetstream::consumer::Consumer<push::OrderedConfig>,
    ) -> Result<Option<Vec<Found>>> {
        let mut found = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(Some(found));
        }
        let mut messages = consumer.messages().await.map_err(crate::backend)?;
        loop {
            let message = match tokio::time::timeout(SCAN_TIMEOUT, messages.next()).await {
                Ok(Some(message)) => message.map_err(crate::backend)?,
                Ok(None) => break,
                Err(_) => return Ok(None),
            };
            let info = message.info().map_err(|e| {
                StoreError::Backend(format!("unreadable message metadata: {e}").into())
            })?;
            let (revision, pending) = (info.stream_sequence, info.pending);
            let time_ms = ms(info.published);
            if is_put(&message.message)
                && let Some(key) = message.subject.strip_prefix(self.prefix.as_str())
            {
                found.push(Found {
                    key: key.to_string(),
                    value: message.payload.clone(),
                    revision,
                    time_ms,
                });
            }
            if pending == 0 {
                break;
            }
        }
        Ok(Some(found))
    }

    /// `key`'s value, if it exists, and the revision a write that expects
    /// it unchanged must name (a tombstone's; 0 for a key never written).
    async fn read(&self, key: &str) -> Result<(Option<Found>, u64)> {
        let entry = self.kv.entry(key).await.map_err(crate::backend)?;
        Ok(match entry {
            None => (None, 0),
            Some(entry) if entry.operation != Operation::Put => (None, entry.revision),
            Some(entry) => (
                Some(Found {
                    key: entry.key,
                    value: entry.value,
                    revision: entry.revision,
                    time_ms: ms(entry.created),
                }),
                entry.revision,
            ),
        })
    }

    /// The id counter's value and revision.
    async fn counter(&self) -> Result<(i64, u64)> {
        let (found, revision) = self.read(COUNTER).await?;
        let value = match found {
            None => 0,
            Some(found) => std::str::from_utf8(&found.value)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| StoreError::Corrupt("the event id counter is unreadable".into()))?,
        };
        Ok((value.max(self.id_base), revision))
    }

    /// Commits `writes`; `None` when a compare-and-swap failed (nothing was
    /// written: re-read and decide).
    async fn commit(&self, writes: &[Write]) -> Result<Option<Committed>> {
        match batch::commit(&self.client, &self.write_prefix, writes).await {
            Ok(done) => Ok(Some(done)),
            Err(BatchError::WrongLastSequence) => Ok(None),
            Err(BatchError::Failed(error) | BatchError::Unknown(error)) => Err(error),
        }
    }

    /// Removes every message of the keys under `pattern` from the stream,
    /// tombstones included. Only for keys never written again (ids are
    /// never reused): a later compare-and-swap on them then fails.
    async fn erase(&self, pattern: &str) -> Result<()> {
        self.kv
            .stream
            .purge()
            .filter(format!("{}{pattern}", self.prefix))
            .await
            .map_err(crate::backend)?;
        Ok(())
    }

    /// Removes the message at `revision` from the stream: a delete by
    /// compare-and-swap that leaves no tombstone (false: it is not there,
    /// the key moved on). Only for keys never written again (message and
    /// dead-letter ids are never reused), which need no tombstone.
    async fn remove_revision(&self, revision: u64) -> Result<bool> {
        match self.kv.stream.delete_message(revision).await {
            Ok(deleted) => Ok(deleted),
            // Not there (any more): the key moved on, or it was removed.
            Err(e)
                if matches!(
                    e.kind(),
                    DeleteMessageErrorKind::JetStream(ref error)
                        if error.error_code() == ErrorCode::STREAM_MESSAGE_DELETE_FAILED
                            || error.error_code() == ErrorCode::SEQUENCE_NOT_FOUND
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(crate::backend(e)),
        }
    }
}

/// Opens (or creates) the event bucket. Its stream is configured by hand
/// as a KV bucket's (so it opens as one) with atomic batches on and
/// single-message deletes allowed: acknowledged messages are removed by
/// sequence ([`NatsEvents::remove_revision`]), not left as tombstones. A
/// KV bucket is created with `deny_delete`, which an update cannot lift
/// (measured on 2.15.1: error 10052).
async fn open_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<Store> {
    use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
    let created = js
        .create_stream(Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            // The latest value (or tombstone) of each key is all that is
            // read; compare-and-swap needs no more.
            max_messages_per_subject: 1,
            discard: DiscardPolicy::New,
            allow_rollup: true,
            allow_direct: true,
            deny_delete: false,
            allow_atomic_publish: true,
            storage: StorageType::File,
            num_replicas: replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await;
    if let Err(error) = created {
        // It exists (created by another node, maybe just now), or it
        // cannot be created: opened below, or that error.
        if js.get_stream(format!("KV_{bucket}")).await.is_err() {
            return Err(crate::backend(error));
        }
    }
    let store = js.get_key_value(bucket).await.map_err(crate::backend)?;
    let config = &store.stream.cached_info().config;
    if config.deny_delete || !config.allow_atomic_publish {
        return Err(StoreError::Backend(
            format!(
                "the stream of bucket {bucket} must allow atomic batches and message deletes; \
                 it was created otherwise (not by this version of Mayfly?)"
            )
            .into(),
        ));
    }
    Ok(store)
}

async fn open_objects(fleet: &Fleet, replicas: usize) -> Result<object_store::ObjectStore> {
    let js = fleet.jetstream();
    let bucket = fleet.name("objects");
    if let Ok(store) = js.get_object_store(&bucket).await {
        return Ok(store);
    }
    let created = js
        .create_object_store(object_store::Config {
            bucket: bucket.clone(),
            num_replicas: replicas,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another node created it meanwhile.
        Err(error) => js
            .get_object_store(&bucket)
            .await
            .map_err(|_| crate::backend(error)),
    }
}

/// Whether a KV message is a value (not a delete or purge marker).
fn is_put(message: &async_nats::Message) -> bool {
    let Some(headers) = message.headers.as_ref() else {
        return true;
    };
    headers.get("KV-Operation").is_none() && headers.get("Nats-Marker-Reason").is_none()
}

/// Whether `error` is a failed compare-and-swap. A clustered stream
/// answers with error 10164 ("wrong last sequence", without the number;
/// measured on 2.15.1 with 3 servers), which async-nats 0.51 reports as
/// `UpdateErrorKind::Other`, not `WrongLastRevision`: so the JetStream
/// error is looked for in the chain of sources.
fn is_wrong_last_sequence(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(js) = error.downcast_ref::<async_nats::jetstream::Error>() {
            let code = js.error_code();
            return code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                || code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT;
        }
        current = error.source();
    }
    false
}

/// A server timestamp in ms since the Unix epoch.
fn ms(time: async_nats::datetime::DateTime) -> i64 {
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// A user's name or key as a KV key token: lowercase hex keeps any UTF-8
/// within the key alphabet.
fn token(text: &str) -> String {
    hex::encode(text.as_bytes())
}

fn untoken(token: &str) -> Result<String> {
    hex::decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("unreadable key token `{token}`")))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn json<T: serde::Serialize>(value: &T) -> Result<Bytes> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode a record: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(found: &Found) -> Result<T> {
    serde_json::from_slice(&found.value)
        .map_err(|e| StoreError::Corrupt(format!("`{}` is unreadable: {e}", found.key)))
}

fn too_busy(what: &str) -> StoreError {
    StoreError::Backend(format!("{what}: too many concurrent writers, try again").into())
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
