//! Event sources and durable delivery: KV buckets, object buckets, queues,
//! triggers and dead letters.
//!
//! Everything a trigger reacts to is written in the same transaction as the
//! events it produces (a transactional outbox), so a change that was
//! acknowledged always has its events stored, and an event that was stored
//! is delivered at least once: it leaves the store only when a delivery is
//! acknowledged or when it moves to the dead-letter queue.

mod kind;
mod kv;
mod objects;
mod queue;
mod triggers;

pub use kind::{BucketChange, EventKind, new_event_id};
pub use kv::{KvCondition, KvEntry, KvKey, KvStore};
pub use objects::{ObjectChange, ObjectMeta, ObjectStore};
pub use queue::{
    AckOutcome, DeadLetter, Delivery, EventQueue, InboxEvent, QueueRef, QueueStats, Settlement,
    WorkHint,
};
pub use triggers::{RetryPolicy, Trigger, TriggerSource, TriggerSpec, TriggerStore};

use serde::{Deserialize, Serialize};

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
