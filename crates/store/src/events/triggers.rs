//! Triggers: what fires them, how their deliveries are retried, and the
//! store that keeps them.

use serde::{Deserialize, Serialize};

use super::{CloudEvent, ObjectChange};
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
    /// Schedules: the scheduled time of the last slot fired (not when the
    /// firing ran, so `@every` slots keep their grid); `None` before the
    /// first run, when the creation time stands in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_fired_ms: Option<i64>,
}

/// Triggers attached to functions.
#[async_trait::async_trait]
pub trait TriggerStore: Send + Sync {
    /// Attaches a trigger; an identical one already attached to the function
    /// is returned instead, with `false`.
    async fn add_trigger(&self, function: &str, spec: &TriggerSpec) -> Result<(Trigger, bool)>;
    /// Triggers of one function, or of all, in id order.
    async fn triggers(&self, function: Option<&str>) -> Result<Vec<Trigger>>;
    /// Detaches a trigger; returns whether it existed.
    async fn remove_trigger(&self, id: i64) -> Result<bool>;
    /// Removes a function's triggers, inbox and dead letters.
    async fn remove_function(&self, function: &str) -> Result<()>;
    /// Stores a schedule's event in its function's inbox and records
    /// `fired_ms`, the scheduled time of the slot it fires, as its last
    /// run (and as the event's enqueue time), in one transaction; `false`
    /// if the trigger is gone or fired since `trigger` was read (its
    /// `last_fired_ms` changed), so a slot never fires twice, whichever
    /// node fires it.
    async fn fire_schedule(
        &self,
        trigger: &Trigger,
        event: &CloudEvent,
        fired_ms: i64,
    ) -> Result<bool>;

    /// Changes to triggers from now on, whoever made them: a node
    /// subscribes and reloads its trigger cache (which workers run, which
    /// schedules it fires) on each. Synchronous: subscribing is in memory,
    /// no I/O.
    fn watch(&self) -> crate::ChangeFeed<crate::TriggerChange>;
}
