//! Durable queues, function inboxes, the dispatcher's claims and
//! settlements, and dead letters.

use serde::{Deserialize, Serialize};

use super::{CloudEvent, RetryPolicy};
use crate::{ChangeFeed, Result};

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

/// A hint that a queue may have work for its consumers: another process
/// stored new events or messages in it, or made some visible again (a
/// retry's backoff, a postponement, released leases).
///
/// Only a hint: a consumer woken by it claims as usual and may find
/// nothing (another node was quicker), and a hint may be lost, so
/// consumers still look at the store now and then. Hints name new or
/// newly due work only, never claims or acknowledgements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkHint {
    /// The queue or inbox that may have work.
    pub queue: QueueRef,
    /// When the work becomes visible (ms since the Unix epoch, the
    /// writer's clock): now or earlier for new events, later for a retry
    /// waiting out its backoff.
    pub due_ms: i64,
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

/// Durable queues, function inboxes, and the dead-letter queues behind
/// them.
#[async_trait::async_trait]
pub trait EventQueue: Send + Sync {
    /// Stores messages on a named queue in one durable write; returns their
    /// ids. Each is given an event id once, kept across redeliveries.
    async fn send(&self, queue: &str, messages: &[(Option<String>, Vec<u8>)]) -> Result<Vec<i64>>;
    /// Hands out up to `max` visible messages of a named queue, invisible to
    /// others for `visibility_ms`.
    async fn receive(&self, queue: &str, max: usize, visibility_ms: u64) -> Result<Vec<Delivery>>;
    /// Acknowledges a received message by its receipt.
    async fn ack(&self, queue: &str, id: i64, attempt: u32) -> Result<AckOutcome>;
    /// Named queues and their counts.
    async fn queues(&self) -> Result<Vec<QueueStats>>;
    /// Stores an event in a function's inbox; returns its row id.
    async fn enqueue(&self, function: &str, event: &InboxEvent) -> Result<i64>;
    /// Applies `settled` and then claims up to `max` deliveries from
    /// `queue` for the node's dispatcher, leased for `lease_ms`, in one
    /// transaction. Events with the same ordering key (a KV key) are handed
    /// out one at a time, in commit order.
    async fn settle_and_claim(
        &self,
        settled: &[Settlement],
        queue: &QueueRef,
        max: usize,
        lease_ms: u64,
    ) -> Result<Vec<Delivery>>;
    /// When the next message of `queue` becomes visible, if any is stored.
    async fn next_visible(&self, queue: &QueueRef) -> Result<Option<i64>>;
    /// Makes every delivery leased by a previous run of this node's
    /// dispatcher visible again (after a crash or restart); returns how
    /// many.
    async fn release_leases(&self) -> Result<usize>;
    /// Stored events and messages by queue, for metrics.
    async fn depths(&self) -> Result<Vec<(QueueRef, u64)>>;
    /// A function's dead letters after `after`, oldest first.
    async fn dead_letters(
        &self,
        function: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>>;
    /// One dead letter with its data.
    async fn dead_letter(&self, function: &str, id: i64) -> Result<Option<DeadLetter>>;
    /// Moves dead letters (all when `ids` is `None`) back to the function's
    /// inbox with their event ids and a fresh attempt count.
    async fn redrive(&self, function: &str, ids: Option<&[i64]>) -> Result<usize>;
    /// Deletes dead letters (all when `ids` is `None`).
    async fn purge_dead(&self, function: &str, ids: Option<&[i64]>) -> Result<usize>;
    /// Hints of work that *other processes* wrote to the store (this
    /// process's own writes are not told: their writer wakes its consumers
    /// itself), from now on; a subscriber that lags must assume every
    /// queue may have work.
    ///
    /// `None` when no other process writes to the store (the embedded
    /// back-end): the node's own wake-ups then see every write, and an
    /// empty queue needs no polling. With `Some`, hints are best effort,
    /// so a consumer of an empty queue still looks again now and then.
    /// Like `watch()`, subscribing is in memory: it must not do I/O.
    fn work_hints(&self) -> Option<ChangeFeed<WorkHint>> {
        None
    }
}
