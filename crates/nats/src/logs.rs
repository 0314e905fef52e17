//! The fleet's live log feed: every node publishes each new guest log line
//! on a core NATS subject per function, `<ns>.logs.<function>`, and a
//! `logs --follow` on any node subscribes to it.
//!
//! Core NATS, not JetStream: a follower wants what happens from now on,
//! and each node keeps its own durable log (the embedded [`LogStore`]
//! under it), so nothing here needs storing or acknowledging. A line
//! published while no one follows, or while the node is cut off from
//! NATS, is simply not seen live.
//!
//! [`LogStore`]: mayfly_store::LogStore

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::RequestErrorKind;
use bytes::Bytes;
use futures::StreamExt as _;
use mayfly_store::{FeedLine, LogFeed, LogSubscription, NewLogLine, Result, StoreError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::registry::token;
use crate::{Fleet, backend};

/// Lines waiting to be published before new ones are dropped: a few
/// seconds of a busy node's logging, while NATS is slow or away.
const QUEUE_LINES: usize = 16_384;

/// How long a new subscription may take to be queued, and then to reach
/// the server before the follower starts anyway (it then may miss the
/// first lines, no more).
const SUBSCRIBE_CONFIRM: Duration = Duration::from_secs(2);

/// The fleet's [`LogFeed`] on core NATS (see the module docs).
pub struct NatsLogFeed {
    client: async_nats::Client,
    /// `<ns>.logs`, the prefix of every function's subject.
    subjects: String,
    node: String,
    queue: mpsc::Sender<FeedLine>,
    dropped: Arc<AtomicU64>,
    publisher: JoinHandle<()>,
}

impl Drop for NatsLogFeed {
    fn drop(&mut self) {
        // Live lines only: losing the queued ones at shutdown loses
        // nothing the node's own log does not keep.
        self.publisher.abort();
    }
}

impl NatsLogFeed {
    /// Starts the publisher of this node's lines (a task on the current
    /// runtime, until the feed is dropped).
    pub fn open(fleet: &Fleet) -> Self {
        let (queue, lines) = mpsc::channel(QUEUE_LINES);
        let subjects = fleet.subject("logs");
        let dropped = Arc::new(AtomicU64::new(0));
        let publisher = tokio::spawn(publish(
            fleet.client().clone(),
            subjects.clone(),
            lines,
            dropped.clone(),
        ));
        Self {
            client: fleet.client().clone(),
            subjects,
            node: fleet.node_name().to_string(),
            queue,
            dropped,
            publisher,
        }
    }

    /// The subject `function`'s lines travel on.
    fn subject(&self, function: &str) -> String {
        format!("{}.{}", self.subjects, token(function))
    }
}

/// Publishes queued lines until the queue closes. A publish waits only
/// while the client's own buffer is full (NATS away): meanwhile the queue
/// fills and [`LogFeed::publish`] drops lines, so nobody else waits.
async fn publish(
    client: async_nats::Client,
    subjects: String,
    mut lines: mpsc::Receiver<FeedLine>,
    dropped: Arc<AtomicU64>,
) {
    while let Some(line) = lines.recv().await {
        let subject = format!("{subjects}.{}", token(&line.line.function));
        let payload = match serde_json::to_vec(&line) {
            Ok(payload) => payload,
            Err(_) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        if client.publish(subject, payload.into()).await.is_err() {
            // The client is closed (the node is shutting down) or the line
            // is over the server's payload limit.
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[async_trait::async_trait]
impl LogFeed for NatsLogFeed {
    fn publish(&self, first_id: i64, lines: &[NewLogLine]) {
        for (id, line) in (first_id..).zip(lines) {
            let line = FeedLine {
                node: self.node.clone(),
                id,
                line: line.clone(),
            };
            if self.queue.try_send(line).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn subscribe(&self, function: &str) -> Result<Option<LogSubscription>> {
        // Cut off from NATS with the client's buffer full (of this node's
        // lines), even queueing the subscription would wait for the
        // reconnect: say so instead of hanging the follower.
        let subscriber = tokio::time::timeout(
            SUBSCRIBE_CONFIRM,
            self.client.subscribe(self.subject(function)),
        )
        .await
        .map_err(|_| {
            StoreError::Backend(
                "cannot follow the fleet's logs: NATS is out of reach; try again".into(),
            )
        })?
        .map_err(backend)?;
        // The server has the subscription once it answered a request sent
        // after it on the same connection (a flush only empties the
        // client's buffer): the caller reads the store's tail next and
        // must miss no line in between. `<ns>.logs` itself has no
        // subscriber (followers subscribe below it), so the answer is an
        // immediate "no responders". Cut off from NATS, it would wait for
        // the reconnect; the follower starts anyway and gets lines once the
        // client is back (it re-subscribes by itself).
        let confirm = self.client.request(self.subjects.clone(), Bytes::new());
        match tokio::time::timeout(SUBSCRIBE_CONFIRM, confirm).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) if error.kind() == RequestErrorKind::NoResponders => {}
            Ok(Err(error)) => {
                tracing::debug!(function, "log subscription not confirmed by NATS: {error}")
            }
            Err(_) => tracing::debug!(function, "log subscription not confirmed by NATS yet"),
        }
        let lines = subscriber.filter_map(|message| async move {
            serde_json::from_slice::<FeedLine>(&message.payload).ok()
        });
        Ok(Some(lines.boxed()))
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::testing::NatsServers;

    fn new_line(function: &str, text: &str) -> NewLogLine {
        NewLogLine {
            ts_ms: 1,
            function: function.into(),
            version: 1,
            request_id: "r".into(),
            stream: "stdout".into(),
            line: text.into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_line_one_node_publishes_reaches_a_follower_on_another_tagged_with_its_node() {
        let servers = NatsServers::single();
        let a = Fleet::connect(&servers.options("node-a", "l1"))
            .await
            .unwrap();
        let b = Fleet::connect(&servers.options("node-b", "l1"))
            .await
            .unwrap();
        let (feed_a, feed_b) = (NatsLogFeed::open(&a), NatsLogFeed::open(&b));
        // A name that is no plain token travels under its hex form.
        let mut followed = feed_b.subscribe("f.x").await.unwrap().unwrap();
        let mut other = feed_b.subscribe("g").await.unwrap().unwrap();

        feed_a.publish(
            41,
            &[new_line("g", "not followed"), new_line("f.x", "hello")],
        );
        let got = tokio::time::timeout(Duration::from_secs(30), followed.next())
            .await
            .unwrap_or_else(|_| panic!("nothing; dropped {}", feed_a.dropped()))
            .unwrap();
        assert_eq!((got.node.as_str(), got.id), ("node-a", 42));
        assert_eq!(got.line, new_line("f.x", "hello"));
        let got = tokio::time::timeout(Duration::from_secs(30), other.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((got.node.as_str(), got.id), ("node-a", 41));
        assert_eq!(feed_a.dropped(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishing_never_waits_on_nats_and_counts_what_it_drops() {
        let mut servers = NatsServers::single();
        let a = Fleet::connect(&servers.options("node-a", "l2"))
            .await
            .unwrap();
        let feed = NatsLogFeed::open(&a);
        servers.kill(0);
        // Far more than the queue and the client's buffer hold: the
        // surplus is dropped and counted, and the caller never waits.
        let lines: Vec<_> = (0..1000).map(|i| new_line("f", &i.to_string())).collect();
        let started = Instant::now();
        for round in 0..(4 * QUEUE_LINES / lines.len()) {
            feed.publish((round * lines.len()) as i64 + 1, &lines);
        }
        let took = started.elapsed();
        assert!(feed.dropped() > 0, "nothing dropped");
        eprintln!(
            "published {} lines with NATS down in {took:?}",
            4 * QUEUE_LINES
        );
    }
}
