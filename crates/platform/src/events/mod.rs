//! Events: the KV, object and queue stores users write to, the triggers
//! that watch them, and the dispatcher that delivers their events to
//! functions as CloudEvents.
//!
//! Every event is stored before anyone is told it was accepted (the stores
//! write a change and its events in one transaction), and leaves the store
//! only when a delivery is acknowledged (2xx) or after its last attempt, into
//! the function's dead-letter queue: delivery is at least once, across
//! crashes.

pub(crate) mod dispatch;
mod scheduler;
pub(crate) mod workers;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use mayfly_store::{
    AckOutcome, BucketStats, CloudEvent, DeadLetter, Delivery, EventQueue, InboxEvent, KvCondition,
    KvEntry, KvKey, KvStore, ObjectMeta, ObjectStore, QueueRef, QueueStats, RetryPolicy,
    StoreError, Stores, Trigger, TriggerSpec, TriggerStore, WorkHint,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::error::PlatformError;
use crate::validate::{
    MAX_BATCH, check_key, check_name, check_queue_name, check_retry, check_trigger,
};

use crate::event_metrics::EventMetrics;

/// Who consumes a queue: a function's inbox, or a queue trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerKey<'a> {
    Inbox(&'a str),
    Trigger(i64),
}

/// The running workers, by what they consume. Kept in two maps so that
/// checking a function's inbox worker needs no allocation: with thousands
/// of functions, every deploy walks them all.
#[derive(Default)]
struct Workers {
    inboxes: HashMap<String, Worker>,
    triggers: HashMap<i64, Worker>,
}

impl Workers {
    fn get(&self, key: WorkerKey<'_>) -> Option<&Worker> {
        match key {
            WorkerKey::Inbox(function) => self.inboxes.get(function),
            WorkerKey::Trigger(id) => self.triggers.get(&id),
        }
    }
}

/// A running consumer: its wake-up signal, and how to stop it.
struct Worker {
    wake: Arc<Notify>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The node's event stores, triggers and dispatcher.
pub struct EventHub {
    kv: Arc<dyn KvStore>,
    objects: Arc<dyn ObjectStore>,
    queues: Arc<dyn EventQueue>,
    triggers_store: Arc<dyn TriggerStore>,
    /// Every trigger, refreshed after each change: which workers should run
    /// and whom a write wakes are read from here without touching the store.
    triggers: ArcSwap<Vec<Trigger>>,
    workers: Mutex<Workers>,
    /// Serialises reloading the trigger cache, so an older read never
    /// replaces a newer one.
    reload: tokio::sync::Mutex<()>,
    /// Wakes the scheduler when schedules change.
    schedules_changed: Arc<Notify>,
    shutdown: CancellationToken,
    scheduler: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Other nodes' hints of new work, until the workers start following
    /// them; `None` when no other process writes to the queues.
    work_hints: Mutex<Option<mayfly_store::ChangeFeed<WorkHint>>>,
    /// Whether other processes write to the queues (fleet mode): a worker
    /// whose queue is empty then still looks again now and then, as a
    /// lost hint must not strand work.
    pub(crate) shared_queues: bool,
    /// Delivery counters and latency.
    pub(crate) metrics: EventMetrics,
    /// Every object stored through this node, for pipelines that start
    /// when objects arrive (`pipelines.rs`).
    object_writes: tokio::sync::broadcast::Sender<ObjectWrite>,
}

/// An object stored: its bucket and key.
#[derive(Debug, Clone)]
pub(crate) struct ObjectWrite {
    /// The bucket.
    pub(crate) bucket: String,
    /// The key.
    pub(crate) key: String,
}

/// Object writes buffered per listener; one that falls further behind is
/// told it missed some (and then assumes every prefix changed).
const OBJECT_WRITES_BUFFER: usize = 4096;

impl EventHub {
    /// The hub over the event stores of `stores`, with their triggers read.
    pub(crate) async fn open(stores: &Stores, metrics: EventMetrics) -> anyhow::Result<Self> {
        let triggers = stores.triggers.triggers(None).await?;
        let work_hints = stores.queues.work_hints();
        Ok(Self {
            shared_queues: work_hints.is_some(),
            work_hints: Mutex::new(work_hints),
            kv: stores.kv.clone(),
            objects: stores.objects.clone(),
            queues: stores.queues.clone(),
            triggers_store: stores.triggers.clone(),
            triggers: ArcSwap::from_pointee(triggers),
            workers: Mutex::default(),
            reload: tokio::sync::Mutex::new(()),
            schedules_changed: Arc::new(Notify::new()),
            shutdown: CancellationToken::new(),
            scheduler: Mutex::new(None),
            metrics,
            object_writes: tokio::sync::broadcast::channel(OBJECT_WRITES_BUFFER).0,
        })
    }

    /// The queue store, for the dispatcher's claims and settlements.
    pub(crate) fn queue_store(&self) -> Arc<dyn EventQueue> {
        self.queues.clone()
    }

    /// The trigger store, for the scheduler's firings.
    pub(crate) fn trigger_store(&self) -> Arc<dyn TriggerStore> {
        self.triggers_store.clone()
    }

    fn wake(&self, key: WorkerKey<'_>) {
        if let Some(worker) = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            worker.wake.notify_one();
        }
    }

    /// Wakes whoever consumes `queue`: the function of an inbox, or the
    /// queue triggers of a named queue.
    pub(crate) fn wake_consumers(&self, queue: &QueueRef) {
        match queue {
            QueueRef::Inbox(function) => self.wake(WorkerKey::Inbox(function)),
            QueueRef::Named(name) => self.wake_watchers("queue", name),
        }
    }

    /// Wakes every worker (after hints were missed).
    pub(crate) fn wake_all(&self) {
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        for worker in workers.inboxes.values().chain(workers.triggers.values()) {
            worker.wake.notify_one();
        }
    }

    /// Takes the feed of other nodes' work hints (once).
    pub(crate) fn take_work_hints(&self) -> Option<mayfly_store::ChangeFeed<WorkHint>> {
        self.work_hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Wakes the inboxes of functions whose `kind` triggers watch `target`.
    fn wake_watchers(&self, kind: &str, target: &str) {
        let triggers = self.triggers.load();
        for trigger in triggers.iter() {
            if trigger.spec.source.kind() == kind && trigger.spec.source.target() == target {
                self.wake(match kind {
                    "queue" => WorkerKey::Trigger(trigger.id),
                    _ => WorkerKey::Inbox(&trigger.function),
                });
            }
        }
    }

    /// Re-reads every trigger into the cache.
    pub(crate) async fn refresh_triggers(&self) -> Result<(), PlatformError> {
        let _reload = self.reload.lock().await;
        let triggers = self.triggers_store.triggers(None).await?;
        self.triggers.store(Arc::new(triggers));
        self.schedules_changed.notify_one();
        Ok(())
    }

    /// Object writes from now on.
    pub(crate) fn object_writes(&self) -> tokio::sync::broadcast::Receiver<ObjectWrite> {
        self.object_writes.subscribe()
    }

    fn object_written(&self, bucket: &str, key: &str) {
        self.wake_watchers("object", bucket);
        if self.object_writes.receiver_count() > 0 {
            // An error only says no one listens.
            let _ = self.object_writes.send(ObjectWrite {
                bucket: bucket.to_string(),
                key: key.to_string(),
            });
        }
    }

    /// Stops the scheduler and tells every worker to stop claiming; each
    /// lets its running deliveries end and records their results.
    pub(crate) fn stop(&self) {
        self.shutdown.cancel();
    }

    // ---- triggers ----

    /// Attaches a trigger to `function` (which the caller checked exists);
    /// an identical one is returned instead, with `false`.
    pub async fn add_trigger(
        &self,
        function: &str,
        mut spec: TriggerSpec,
    ) -> Result<(Trigger, bool), PlatformError> {
        check_trigger(function, &spec)?;
        // `live` is the default: stored as none, so the two forms are one
        // trigger.
        spec.alias = spec.alias.filter(|alias| alias != mayfly_store::LIVE_ALIAS);
        let added = self.triggers_store.add_trigger(function, &spec).await?;
        self.refresh_triggers().await?;
        Ok(added)
    }

    /// `read` of attached trigger `id`, if it is attached: a binary search,
    /// as the cache is in id order (it is read per delivery).
    fn with_trigger<T>(&self, id: i64, read: impl FnOnce(&Trigger) -> T) -> Option<T> {
        let triggers = self.triggers.load();
        let at = triggers.binary_search_by_key(&id, |t| t.id).ok()?;
        Some(read(&triggers[at]))
    }

    /// The alias trigger `id` delivers to, if not `live` (and it is still
    /// attached).
    pub(crate) fn trigger_alias(&self, id: i64) -> Option<String> {
        self.with_trigger(id, |t| t.spec.alias.clone()).flatten()
    }

    /// Whether trigger `id` is still attached.
    pub(crate) fn has_trigger(&self, id: i64) -> bool {
        self.with_trigger(id, |_| ()).is_some()
    }

    /// Triggers of one function, or all.
    pub fn triggers(&self, function: Option<&str>) -> Vec<Trigger> {
        self.triggers
            .load()
            .iter()
            .filter(|t| function.is_none_or(|f| t.function == f))
            .cloned()
            .collect()
    }

    /// Detaches a trigger.
    pub async fn remove_trigger(&self, id: i64) -> Result<(), PlatformError> {
        if !self.triggers_store.remove_trigger(id).await? {
            return Err(PlatformError::Missing(format!(
                "no trigger {id}: see `mayfly trigger list`"
            )));
        }
        self.refresh_triggers().await
    }

    /// Forgets a deleted function's triggers, pending events and dead
    /// letters.
    pub(crate) async fn remove_function(&self, function: &str) -> Result<(), PlatformError> {
        self.triggers_store.remove_function(function).await?;
        self.refresh_triggers().await
    }

    // ---- KV ----

    /// The value under `key`.
    pub async fn kv_get(&self, bucket: &str, key: &str) -> Result<KvEntry, PlatformError> {
        check_name("bucket", bucket)?;
        check_key(key)?;
        self.kv_entry(bucket, key)
            .await?
            .ok_or_else(|| PlatformError::Missing(format!("no key `{key}` in bucket `{bucket}`")))
    }

    /// The entry under `key` of a checked bucket and key, if there is one,
    /// with the store's own error: for callers that tell absence and
    /// failure apart themselves (wasi:keyvalue).
    pub(crate) async fn kv_entry(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<KvEntry>, StoreError> {
        self.kv.kv_get(bucket, key).await
    }

    /// Writes a value if `condition` holds; returns its revision.
    pub async fn kv_put(
        &self,
        bucket: &str,
        key: &str,
        value: Bytes,
        condition: KvCondition,
    ) -> Result<u64, PlatformError> {
        check_name("bucket", bucket)?;
        check_key(key)?;
        Ok(self.kv_write(bucket, key, value, condition).await?)
    }

    /// Writes a value under a checked bucket and key if `condition` holds
    /// (else [`StoreError::PreconditionFailed`]), wakes the bucket's
    /// watchers, and returns the new revision.
    pub(crate) async fn kv_write(
        &self,
        bucket: &str,
        key: &str,
        value: Bytes,
        condition: KvCondition,
    ) -> Result<u64, StoreError> {
        let revision = self.kv.kv_put(bucket, key, &value, condition).await?;
        self.wake_watchers("kv", bucket);
        Ok(revision)
    }

    /// Deletes a key if `condition` holds.
    pub async fn kv_delete(
        &self,
        bucket: &str,
        key: &str,
        condition: KvCondition,
    ) -> Result<(), PlatformError> {
        check_name("bucket", bucket)?;
        check_key(key)?;
        if !self.kv_remove(bucket, key, condition).await? {
            return Err(PlatformError::Missing(format!(
                "no key `{key}` in bucket `{bucket}`"
            )));
        }
        Ok(())
    }

    /// Deletes a key of a checked bucket if `condition` holds, waking the
    /// bucket's watchers; `false` when there was no such key.
    pub(crate) async fn kv_remove(
        &self,
        bucket: &str,
        key: &str,
        condition: KvCondition,
    ) -> Result<bool, StoreError> {
        let removed = self.kv.kv_delete(bucket, key, condition).await?;
        if removed {
            self.wake_watchers("kv", bucket);
        }
        Ok(removed)
    }

    /// Keys of a bucket by prefix, paged.
    pub async fn kv_list(
        &self,
        bucket: &str,
        prefix: String,
        after: String,
        limit: usize,
    ) -> Result<Vec<KvKey>, PlatformError> {
        check_name("bucket", bucket)?;
        Ok(self.kv.kv_list(bucket, &prefix, &after, limit).await?)
    }

    /// KV buckets and their sizes.
    pub async fn kv_buckets(&self) -> Result<Vec<BucketStats>, PlatformError> {
        Ok(self.kv.kv_buckets().await?)
    }

    // ---- objects ----

    /// Stores an object.
    pub async fn object_put(
        &self,
        bucket: &str,
        key: &str,
        bytes: Bytes,
        content_type: String,
    ) -> Result<ObjectMeta, PlatformError> {
        check_name("bucket", bucket)?;
        check_key(key)?;
        let meta = self
            .objects
            .object_put(bucket, key, &bytes, &content_type)
            .await?;
        self.object_written(bucket, key);
        Ok(meta)
    }

    /// Stores an object whose bytes arrive as `body` (an upload): they are
    /// streamed to a temporary file, hashed on the way, and moved into
    /// place once complete, so memory holds a few chunks, never the whole
    /// object. More than `max_bytes` is refused (413) and nothing is
    /// stored; so is a body that fails midway.
    pub async fn object_put_stream<E: std::fmt::Display>(
        &self,
        bucket: &str,
        key: &str,
        mut body: impl futures::Stream<Item = Result<Bytes, E>> + Unpin,
        max_bytes: u64,
        content_type: String,
    ) -> Result<ObjectMeta, PlatformError> {
        use futures::StreamExt as _;
        use std::io::Write as _;
        check_name("bucket", bucket)?;
        check_key(key)?;
        // One blocking task writes what the request's task reads (the
        // store's writer is a plain `std::io::Write` over a local file, and
        // its writes and final sync block); the small channel makes a slow
        // disk slow the upload down rather than pile chunks up in memory.
        let (chunks, mut incoming) = tokio::sync::mpsc::channel::<Bytes>(4);
        let mut writer = self.objects.object_writer().await?;
        let writer = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = incoming.blocking_recv() {
                writer.write_all(&chunk)?;
            }
            anyhow::Ok(writer.finish()?)
        });
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            // Returning early drops `chunks`: the writer stops, and its
            // unfinished or uncommitted file is removed.
            let chunk = chunk.map_err(|e| {
                PlatformError::BadRequest(format!("the upload broke off: {e}; send it again"))
            })?;
            size += chunk.len() as u64;
            if size > max_bytes {
                return Err(PlatformError::TooLarge(format!(
                    "the object is larger than {max_bytes} bytes, the most one object may \
                     hold: split it into several objects"
                )));
            }
            if chunks.send(chunk).await.is_err() {
                break; // the writer failed: its error is below
            }
        }
        drop(chunks);
        let staged = writer
            .await
            .map_err(|e| PlatformError::Internal(e.into()))??;
        let meta = self
            .objects
            .object_put_staged(bucket, key, staged, &content_type)
            .await?;
        self.object_written(bucket, key);
        Ok(meta)
    }

    /// An object's metadata and the file holding its bytes.
    pub async fn object_get(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<(ObjectMeta, PathBuf), PlatformError> {
        check_name("bucket", bucket)?;
        check_key(key)?;
        self.objects.object_get(bucket, key).await?.ok_or_else(|| {
            PlatformError::Missing(format!("no object `{key}` in bucket `{bucket}`"))
        })
    }

    /// Deletes an object.
    pub async fn object_delete(&self, bucket: &str, key: &str) -> Result<(), PlatformError> {
        check_name("bucket", bucket)?;
        check_key(key)?;
        if !self.objects.object_delete(bucket, key).await? {
            return Err(PlatformError::Missing(format!(
                "no object `{key}` in bucket `{bucket}`"
            )));
        }
        self.wake_watchers("object", bucket);
        Ok(())
    }

    /// Objects of a bucket by prefix, paged.
    pub async fn object_list(
        &self,
        bucket: &str,
        prefix: String,
        after: String,
        limit: usize,
    ) -> Result<Vec<ObjectMeta>, PlatformError> {
        check_name("bucket", bucket)?;
        Ok(self
            .objects
            .object_list(bucket, &prefix, &after, limit)
            .await?)
    }

    /// Object buckets and their sizes.
    pub async fn object_buckets(&self) -> Result<Vec<BucketStats>, PlatformError> {
        Ok(self.objects.object_buckets().await?)
    }

    // ---- queues ----

    /// Stores messages on a queue, durably, in one write.
    pub async fn send(
        &self,
        queue: &str,
        messages: Vec<(Option<String>, Vec<u8>)>,
    ) -> Result<Vec<i64>, PlatformError> {
        check_queue_name(queue)?;
        if messages.len() > MAX_BATCH {
            return Err(PlatformError::BadRequest(format!(
                "{} messages in one batch: send at most {MAX_BATCH} at a time",
                messages.len()
            )));
        }
        let ids = self.queues.send(queue, &messages).await?;
        self.wake_watchers("queue", queue);
        Ok(ids)
    }

    /// Hands out messages to a user's consumer.
    pub async fn receive(
        &self,
        queue: &str,
        max: usize,
        visibility_ms: u64,
    ) -> Result<Vec<Delivery>, PlatformError> {
        check_queue_name(queue)?;
        Ok(self.queues.receive(queue, max, visibility_ms).await?)
    }

    /// Acknowledges a received message by its receipt (`<id>.<attempt>`).
    pub async fn ack(&self, queue: &str, receipt: &str) -> Result<(), PlatformError> {
        check_queue_name(queue)?;
        let parsed = receipt
            .split_once('.')
            .and_then(|(id, attempt)| Some((id.parse().ok()?, attempt.parse().ok()?)));
        let Some((id, attempt)) = parsed else {
            return Err(PlatformError::BadRequest(format!(
                "`{}` is not a receipt: pass the `receipt` field of a received message",
                receipt.escape_debug()
            )));
        };
        match self.queues.ack(queue, id, attempt).await? {
            AckOutcome::Acked => Ok(()),
            AckOutcome::Stale => Err(PlatformError::Conflict(format!(
                "receipt {receipt} is stale: the message became visible again and was received \
                 anew; process it under its new receipt"
            ))),
            AckOutcome::Gone => Err(PlatformError::Missing(format!(
                "no message {id} on queue `{queue}` (already acknowledged?)"
            ))),
        }
    }

    /// Named queues and their counts.
    pub async fn queues(&self) -> Result<Vec<QueueStats>, PlatformError> {
        Ok(self.queues.queues().await?)
    }

    /// Events and messages stored, by queue (inboxes included).
    pub(crate) async fn depths(&self) -> Result<Vec<(QueueRef, u64)>, PlatformError> {
        Ok(self.queues.depths().await?)
    }

    // ---- asynchronous invocation ----

    /// Stores an asynchronous invocation of `function` in its inbox and
    /// returns the event id.
    pub async fn invoke_async(
        &self,
        function: &str,
        path: String,
        content_type: Option<String>,
        data: Bytes,
        retry: RetryPolicy,
    ) -> Result<String, PlatformError> {
        check_retry(&retry)?;
        let event = InboxEvent {
            event: CloudEvent::async_invoke(function, content_type, data.to_vec(), now_ms()),
            path: Some(path),
            trigger_id: None,
            retry,
        };
        let id = event.event.id.clone();
        self.queues.enqueue(function, &event).await?;
        self.wake(WorkerKey::Inbox(function));
        Ok(id)
    }

    // ---- dead letters ----

    /// A function's dead letters, paged.
    pub async fn dead_letters(
        &self,
        function: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, PlatformError> {
        Ok(self.queues.dead_letters(function, after, limit).await?)
    }

    /// One dead letter with its data.
    pub async fn dead_letter(&self, function: &str, id: i64) -> Result<DeadLetter, PlatformError> {
        self.queues.dead_letter(function, id).await?.ok_or_else(|| {
            PlatformError::Missing(format!(
                "no dead letter {id} for `{function}`: see `mayfly dlq list {function}`"
            ))
        })
    }

    /// Sends dead letters back to the function's inbox.
    pub async fn redrive(
        &self,
        function: &str,
        ids: Option<Vec<i64>>,
    ) -> Result<usize, PlatformError> {
        let moved = self.queues.redrive(function, ids.as_deref()).await?;
        self.wake(WorkerKey::Inbox(function));
        Ok(moved)
    }

    /// Deletes dead letters.
    pub async fn purge_dead(
        &self,
        function: &str,
        ids: Option<Vec<i64>>,
    ) -> Result<usize, PlatformError> {
        Ok(self.queues.purge_dead(function, ids.as_deref()).await?)
    }
}
