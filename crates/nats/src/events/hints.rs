//! Work hints across the fleet: after a write that stores new events or
//! makes some due later, the writing node publishes a hint on core NATS,
//! `<ns>.events.wake.<domain>.<queue token>`, and every other node's
//! subscription turns it into a [`WorkHint`] for its idle workers. The
//! domain is the JetStream domain of the bucket written (the hub's, or a
//! leaf site's): core subjects cross leaf links, so each node subscribes
//! only to the domains whose buckets it reads, and a site's own hints
//! stay at the site (docs/edge-design.md §4.2).
//!
//! Why core publish rather than a KV watch of the event bucket: a watch
//! would stream every record write to every node, claims and settlements
//! included (each is a compare-and-swap of the record), with the events'
//! data, and each node would have to decode records to tell new work
//! from a claim. A hint is one small message per write that matters,
//! sent only when work became ready, and costs the server nothing to
//! store. It is fire-and-forget: a hint lost in a reconnect only delays
//! a node until its idle poll, and the writer's own node has its
//! workers woken locally anyway.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use mayfly_store::{QueueRef, Result, WorkHint};

use super::queue::{queue_of, queue_token};

/// Hints a node's subscriber has not read yet before it lags (and then
/// wakes every worker).
const HINT_CAPACITY: usize = 1024;

/// Longest a writer waits to hand a hint to the client: only a client
/// that cannot reach the server makes it wait, and then the hint is
/// dropped rather than the write's answer held back.
const PUBLISH_WAIT: Duration = Duration::from_millis(100);

/// What a hint carries besides its subject.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    /// The writing node: it does not hint itself (its writes woke its
    /// workers already).
    node: String,
    /// When the work becomes visible (ms since the Unix epoch).
    due_ms: i64,
}

/// This node's end of the fleet's hints: publishes its own and feeds
/// subscribers the others'. The subscription task stops when it is
/// dropped.
pub(super) struct Hints {
    client: async_nats::Client,
    /// `<ns>.events.wake`.
    subject: String,
    node: String,
    feed: broadcast::Sender<WorkHint>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hints {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hints {
    /// Subscribes to the fleet's hints under `subject` for the buckets of
    /// `domains`, as `node`.
    pub(super) async fn start(
        client: async_nats::Client,
        subject: String,
        domains: Vec<String>,
        node: String,
    ) -> Result<Self> {
        let mut subscribers = Vec::with_capacity(domains.len());
        for domain in &domains {
            subscribers.push(
                client
                    .subscribe(format!("{subject}.{domain}.>"))
                    .await
                    .map_err(crate::backend)?,
            );
        }
        let feed = broadcast::channel(HINT_CAPACITY).0;
        let task = tokio::spawn(forward(
            futures::stream::select_all(subscribers),
            format!("{subject}."),
            node.clone(),
            feed.clone(),
        ));
        Ok(Self {
            client,
            subject,
            node,
            feed,
            task,
        })
    }

    /// A new subscription: other nodes' hints from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<WorkHint> {
        self.feed.subscribe()
    }

    /// Tells the other nodes that `ready` queues, in the bucket of JetStream
    /// domain `domain`, have work due at the given times; one hint per
    /// queue, the earliest time. Call after the write committed. Never
    /// fails: a lost hint is covered by the idle poll.
    pub(super) async fn publish(
        &self,
        domain: &str,
        ready: impl IntoIterator<Item = (QueueRef, i64)>,
    ) {
        let mut earliest: BTreeMap<String, i64> = BTreeMap::new();
        for (queue, due_ms) in ready {
            let due = earliest.entry(queue_token(&queue)).or_insert(due_ms);
            *due = (*due).min(due_ms);
        }
        for (token, due_ms) in earliest {
            let payload = Payload {
                node: self.node.clone(),
                due_ms,
            };
            let Ok(payload) = serde_json::to_vec(&payload) else {
                continue;
            };
            let subject = format!("{}.{domain}.{token}", self.subject);
            match tokio::time::timeout(PUBLISH_WAIT, self.client.publish(subject, payload.into()))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, "could not publish a work hint"),
                Err(_) => tracing::debug!("NATS client busy: a work hint was dropped"),
            }
        }
    }
}

/// Feeds other nodes' hints from `subscriber` to `feed` until the
/// subscription ends.
async fn forward(
    mut subscriber: impl futures::Stream<Item = async_nats::Message> + Unpin,
    prefix: String,
    node: String,
    feed: broadcast::Sender<WorkHint>,
) {
    while let Some(message) = subscriber.next().await {
        let Some(hint) = hint_of(&message, &prefix, &node) else {
            continue;
        };
        // No subscriber yet (the node is starting) is not an error.
        let _ = feed.send(hint);
    }
}

/// The hint a message carries; `None` for this node's own or an
/// unreadable one.
fn hint_of(message: &async_nats::Message, prefix: &str, node: &str) -> Option<WorkHint> {
    let payload: Payload = serde_json::from_slice(&message.payload).ok()?;
    if payload.node == node {
        return None;
    }
    // `<domain>.<token>`: the queue's name says where it lives.
    let (_domain, token) = message.subject.strip_prefix(prefix)?.split_once('.')?;
    Some(WorkHint {
        queue: queue_of(token).ok()?,
        due_ms: payload.due_ms,
    })
}
