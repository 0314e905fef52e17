//! Event sources and durable delivery: KV buckets, object buckets, queues,
//! triggers and dead letters.
//!
//! Everything a trigger reacts to is written in the same transaction as the
//! events it produces (a transactional outbox), so a change that was
//! acknowledged always has its events stored, and an event that was stored
//! is delivered at least once: it leaves the store only when a delivery is
//! acknowledged or when it moves to the dead-letter queue.

use serde::{Deserialize, Serialize};

use crate::Result;

/// What makes a trigger fire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TriggerSource {
    /// A 5-field cron expression in UTC, a nickname (`@daily`) or
    /// `@every <duration>`.
    Schedule {
        /// The expression as the user wrote it.
        schedule: String,
    },
    /// Objects created or deleted in a bucket.
    Object {
        /// The bucket watched.
        bucket: String,
        /// Only keys starting with this.
        #[serde(default)]
        prefix: String,
        /// Only keys ending with this.
        #[serde(default)]
        suffix: String,
        /// Which changes; both when left out.
        #[serde(default = "ObjectChange::both")]
        events: Vec<ObjectChange>,
    },
    /// Keys put or deleted in a KV bucket, in commit order per key.
    Kv {
        /// The bucket watched.
        bucket: String,
        /// Only keys starting with this.
        #[serde(default)]
        prefix: String,
    },
    /// Messages of a queue.
    Queue {
        /// The queue consumed.
        queue: String,
        /// Messages taken from the queue at once.
        #[serde(default = "default_batch_size")]
        batch_size: u32,
        /// Deliveries of this trigger running at once.
        #[serde(default = "default_max_concurrency")]
        max_concurrency: u32,
    },
}

fn default_batch_size() -> u32 {
    10
}

fn default_max_concurrency() -> u32 {
    16
}

impl TriggerSource {
    /// `schedule`, `object`, `kv` or `queue`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Schedule { .. } => "schedule",
            Self::Object { .. } => "object",
            Self::Kv { .. } => "kv",
            Self::Queue { .. } => "queue",
        }
    }

    /// The bucket or queue watched; empty for schedules.
    pub fn target(&self) -> &str {
        match self {
            Self::Schedule { .. } => "",
            Self::Object { bucket, .. } | Self::Kv { bucket, .. } => bucket,
            Self::Queue { queue, .. } => queue,
        }
    }
}

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
    fn both() -> Vec<Self> {
        vec![Self::Created, Self::Deleted]
    }
}

/// How often a failed delivery is tried again, and how long apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Deliveries in all, the first included; then the dead-letter queue.
    pub max_attempts: u32,
    /// Wait before the second attempt; it doubles with each further one.
    pub backoff_ms: u64,
}

impl RetryPolicy {
    /// Three attempts, as Lambda gives asynchronous invocations.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// Most attempts a trigger may ask for.
    pub const MAX_ATTEMPTS: u32 = 100;
    /// Longest wait between two attempts.
    pub const MAX_BACKOFF_MS: u64 = 15 * 60 * 1000;
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            backoff_ms: 1000,
        }
    }
}

/// A trigger as the user asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSpec {
    /// What fires it.
    pub source: TriggerSource,
    /// What happens when a delivery fails.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The alias of the function it delivers to; `live` when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
}

/// A trigger attached to a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    /// Its id, unique on the node.
    pub id: i64,
    /// The function it delivers to.
    pub function: String,
    /// What fires it and how failures are retried.
    #[serde(flatten)]
    pub spec: TriggerSpec,
    /// When it was attached (ms since the Unix epoch).
    pub created_ms: i64,
    /// Schedules: when it last fired (its creation before the first run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_fired_ms: Option<i64>,
}

/// A CloudEvent's attributes and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvent {
    /// `ce-id`: stable across retries, so a function can deduplicate.
    pub id: String,
    /// `ce-type`, e.g. `dev.mayfly.kv.put`.
    pub ty: String,
    /// `ce-source`, e.g. `/kv/settings`.
    pub source: String,
    /// `ce-subject`: the key or message id it is about, if any.
    pub subject: Option<String>,
    /// `ce-time`: when it happened (ms since the Unix epoch).
    pub time_ms: i64,
    /// The data's media type.
    pub content_type: Option<String>,
    /// The data, delivered as the request body.
    pub data: Vec<u8>,
}

/// An event addressed to one function's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEvent {
    /// The event.
    pub event: CloudEvent,
    /// Request path it is delivered to; `/` when `None`.
    pub path: Option<String>,
    /// The trigger that produced it (none for asynchronous invocations).
    pub trigger_id: Option<i64>,
    /// How failures are retried.
    pub retry: RetryPolicy,
}

/// Where deliveries are claimed from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QueueRef {
    /// A user's named queue.
    Named(String),
    /// A function's inbox: events of its triggers and asynchronous
    /// invocations.
    Inbox(String),
}

/// A message or event handed out for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Row id; with `attempt`, the receipt that settles it.
    pub id: i64,
    /// This delivery's attempt number, from 1.
    pub attempt: u32,
    /// The event.
    pub event: CloudEvent,
    /// Request path (inbox events).
    pub path: Option<String>,
    /// The trigger that produced it (inbox events).
    pub trigger_id: Option<i64>,
    /// Retry policy carried by the event (inbox events).
    pub retry: Option<RetryPolicy>,
    /// When it was stored (ms since the Unix epoch).
    pub enqueued_ms: i64,
}

impl Delivery {
    /// The receipt a consumer acknowledges with: `<id>.<attempt>`. A receipt
    /// from an earlier attempt no longer settles the message.
    pub fn receipt(&self) -> String {
        format!("{}.{}", self.id, self.attempt)
    }
}

/// What became of one delivery. Each applies only if the message is still
/// at the same attempt (a lease that ran out and was handed to another
/// consumer is not settled twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Delivered: remove it.
    Ack {
        /// Row id.
        id: i64,
        /// The attempt acknowledged.
        attempt: u32,
    },
    /// Failed: deliver again after `delay_ms`.
    Retry {
        /// Row id.
        id: i64,
        /// The attempt that failed.
        attempt: u32,
        /// Backoff before the next attempt.
        delay_ms: u64,
        /// Why it failed.
        error: String,
    },
    /// Not run at all (the function was at its limit): try again after
    /// `delay_ms` without counting the attempt.
    Postpone {
        /// Row id.
        id: i64,
        /// The attempt given back.
        attempt: u32,
        /// Wait before trying again.
        delay_ms: u64,
    },
    /// Failed for the last time: move it to `function`'s dead-letter queue.
    Dead {
        /// Row id.
        id: i64,
        /// The last attempt.
        attempt: u32,
        /// Whose dead-letter queue.
        function: String,
        /// Retry policy a redrive gives it.
        retry: RetryPolicy,
        /// The trigger that delivered it (a queue trigger, for a named
        /// queue's message).
        trigger_id: Option<i64>,
        /// Why the last attempt failed.
        error: String,
    },
}

/// How an acknowledgement by receipt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The message is gone for good.
    Acked,
    /// The receipt is from an earlier attempt: the message was handed out
    /// again.
    Stale,
    /// No such message.
    Gone,
}

/// A queue's counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Queue name.
    pub queue: String,
    /// Messages stored, in flight included.
    pub messages: u64,
    /// Messages handed out and not yet settled.
    pub in_flight: u64,
}

/// A delivery that failed its last attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its id in the function's dead-letter queue.
    pub id: i64,
    /// The event's id (`ce-id`).
    pub event_id: String,
    /// `ce-type`.
    #[serde(rename = "type")]
    pub ty: String,
    /// `ce-source`.
    pub source: String,
    /// `ce-subject`.
    pub subject: Option<String>,
    /// `ce-time` (ms since the Unix epoch).
    pub time_ms: i64,
    /// The data's media type.
    pub content_type: Option<String>,
    /// Size of the data in bytes.
    pub size: u64,
    /// Attempts made.
    pub attempts: u32,
    /// Why the last one failed.
    pub last_error: String,
    /// When it was given up (ms since the Unix epoch).
    pub died_ms: i64,
    /// The trigger that produced it, if any.
    pub trigger_id: Option<i64>,
    /// The data (only when one dead letter is read).
    #[serde(skip)]
    pub data: Option<Vec<u8>>,
}

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

/// A bucket and how much it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketStats {
    /// Bucket name.
    pub bucket: String,
    /// Keys or objects in it.
    pub entries: u64,
    /// Bytes of values or objects.
    pub bytes: u64,
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

/// KV buckets: keys with revisions, compare-and-swap, listing by prefix.
/// Writes emit `dev.mayfly.kv.*` events to the triggers watching them.
pub trait KvStore: Send + Sync {
    /// The value under `key`.
    fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<KvEntry>>;
    /// Writes `value` if `condition` holds; returns the new revision, or
    /// [`crate::StoreError::PreconditionFailed`].
    fn kv_put(&self, bucket: &str, key: &str, value: &[u8], condition: KvCondition) -> Result<u64>;
    /// Deletes `key` if `condition` holds; returns whether it existed.
    fn kv_delete(&self, bucket: &str, key: &str, condition: KvCondition) -> Result<bool>;
    /// Keys starting with `prefix` and after `after`, in order, at most
    /// `limit`.
    fn kv_list(&self, bucket: &str, prefix: &str, after: &str, limit: usize) -> Result<Vec<KvKey>>;
    /// Every bucket holding keys.
    fn kv_buckets(&self) -> Result<Vec<BucketStats>>;
}

/// Object buckets: content-addressed bytes with metadata. Writes emit
/// `dev.mayfly.object.*` events to the triggers watching them.
pub trait ObjectStore: Send + Sync {
    /// Stores `bytes` under `key`, replacing what was there.
    fn object_put(
        &self,
        bucket: &str,
        key: &str,
        bytes: &[u8],
        content_type: &str,
    ) -> Result<ObjectMeta>;
    /// A writer for an object's bytes as they arrive (an upload streamed
    /// to disk, never whole in memory); store them with
    /// [`ObjectStore::object_put_staged`].
    fn object_writer(&self) -> Result<crate::BlobWriter>;
    /// Stores the bytes `staged` under `key`, replacing what was there.
    fn object_put_staged(
        &self,
        bucket: &str,
        key: &str,
        staged: crate::StagedBlob,
        content_type: &str,
    ) -> Result<ObjectMeta>;
    /// An object's metadata and a file holding its bytes.
    fn object_get(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<(ObjectMeta, std::path::PathBuf)>>;
    /// Deletes an object; returns whether it existed.
    fn object_delete(&self, bucket: &str, key: &str) -> Result<bool>;
    /// Objects whose key starts with `prefix` and sorts after `after`.
    fn object_list(
        &self,
        bucket: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<ObjectMeta>>;
    /// Every bucket holding objects.
    fn object_buckets(&self) -> Result<Vec<BucketStats>>;
}

/// Durable queues, function inboxes, and the dead-letter queues behind
/// them.
pub trait EventQueue: Send + Sync {
    /// Stores messages on a named queue in one durable write; returns their
    /// ids. Each is given an event id once, kept across redeliveries.
    fn send(&self, queue: &str, messages: &[(Option<String>, Vec<u8>)]) -> Result<Vec<i64>>;
    /// Hands out up to `max` visible messages of a named queue, invisible to
    /// others for `visibility_ms`.
    fn receive(&self, queue: &str, max: usize, visibility_ms: u64) -> Result<Vec<Delivery>>;
    /// Acknowledges a received message by its receipt.
    fn ack(&self, queue: &str, id: i64, attempt: u32) -> Result<AckOutcome>;
    /// Named queues and their counts.
    fn queues(&self) -> Result<Vec<QueueStats>>;
    /// Stores an event in a function's inbox; returns its row id.
    fn enqueue(&self, function: &str, event: &InboxEvent) -> Result<i64>;
    /// Applies `settled` and then claims up to `max` deliveries from
    /// `queue` for the node's dispatcher, leased for `lease_ms`, in one
    /// transaction. Events with the same ordering key (a KV key) are handed
    /// out one at a time, in commit order.
    fn settle_and_claim(
        &self,
        settled: &[Settlement],
        queue: &QueueRef,
        max: usize,
        lease_ms: u64,
    ) -> Result<Vec<Delivery>>;
    /// When the next message of `queue` becomes visible, if any is stored.
    fn next_visible(&self, queue: &QueueRef) -> Result<Option<i64>>;
    /// Makes every delivery leased by a previous run of this node's
    /// dispatcher visible again (after a crash or restart); returns how
    /// many.
    fn release_leases(&self) -> Result<usize>;
    /// Stored events and messages by queue, for metrics.
    fn depths(&self) -> Result<Vec<(QueueRef, u64)>>;
    /// A function's dead letters after `after`, oldest first.
    fn dead_letters(&self, function: &str, after: i64, limit: usize) -> Result<Vec<DeadLetter>>;
    /// One dead letter with its data.
    fn dead_letter(&self, function: &str, id: i64) -> Result<Option<DeadLetter>>;
    /// Moves dead letters (all when `ids` is `None`) back to the function's
    /// inbox with their event ids and a fresh attempt count.
    fn redrive(&self, function: &str, ids: Option<&[i64]>) -> Result<usize>;
    /// Deletes dead letters (all when `ids` is `None`).
    fn purge_dead(&self, function: &str, ids: Option<&[i64]>) -> Result<usize>;
}

/// Triggers attached to functions.
pub trait TriggerStore: Send + Sync {
    /// Attaches a trigger; an identical one already attached to the function
    /// is returned instead, with `false`.
    fn add_trigger(&self, function: &str, spec: &TriggerSpec) -> Result<(Trigger, bool)>;
    /// Triggers of one function, or of all, in id order.
    fn triggers(&self, function: Option<&str>) -> Result<Vec<Trigger>>;
    /// Detaches a trigger; returns whether it existed.
    fn remove_trigger(&self, id: i64) -> Result<bool>;
    /// Removes a function's triggers, inbox and dead letters.
    fn remove_function(&self, function: &str) -> Result<()>;
    /// Stores a schedule's event in its function's inbox and records
    /// `fired_ms` as its last run, in one transaction; `false` if the
    /// trigger is gone or fired since `trigger` was read (its
    /// `last_fired_ms` changed), so a slot never fires twice.
    fn fire_schedule(&self, trigger: &Trigger, event: &CloudEvent, fired_ms: i64) -> Result<bool>;
}
