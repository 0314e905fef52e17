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
use mayfly_store::{FeedLine, LogFeed, LogStore, LogSubscription, NewLogLine, Result, StoreError};
use serde::{Deserialize, Serialize};
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

/// How long a fleet-wide tail waits for nodes that have not answered (a
/// node that died a moment ago is still listed until its heartbeat
/// expires); live nodes answer within milliseconds.
const TAIL_WAIT: Duration = Duration::from_secs(1);

/// Room kept under the server's payload limit for a tail answer's framing.
const PAYLOAD_MARGIN: usize = 4096;

/// A request for one node's tail of a function's log.
#[derive(Debug, Serialize, Deserialize)]
struct TailRequest {
    function: String,
    limit: usize,
}

/// The fleet's [`LogFeed`] on core NATS (see the module docs).
pub struct NatsLogFeed {
    client: async_nats::Client,
    /// `<ns>.logs`, the prefix of every function's subject.
    subjects: String,
    /// `<ns>.logtail`, the prefix of every function's tail requests.
    tail_subjects: String,
    node: String,
    queue: mpsc::Sender<FeedLine>,
    dropped: Arc<AtomicU64>,
    publisher: JoinHandle<()>,
    /// Answers other nodes' tail requests from this node's own log.
    tail_answerer: JoinHandle<()>,
}

impl Drop for NatsLogFeed {
    fn drop(&mut self) {
        // Live lines only: losing the queued ones at shutdown loses
        // nothing the node's own log does not keep.
        self.publisher.abort();
        self.tail_answerer.abort();
    }
}

impl NatsLogFeed {
    /// Starts the publisher of this node's lines and the answerer of tail
    /// requests from its `local` log (tasks on the current runtime, until
    /// the feed is dropped).
    pub fn open(fleet: &Fleet, local: Arc<dyn LogStore>) -> Self {
        let (queue, lines) = mpsc::channel(QUEUE_LINES);
        let subjects = fleet.subject("logs");
        let dropped = Arc::new(AtomicU64::new(0));
        let publisher = tokio::spawn(publish(
            fleet.client().clone(),
            subjects.clone(),
            lines,
            dropped.clone(),
        ));
        let tail_subjects = fleet.subject("logtail");
        let tail_answerer = tokio::spawn(answer_tails(
            fleet.client().clone(),
            tail_subjects.clone(),
            fleet.node_name().to_string(),
            local,
        ));
        Self {
            client: fleet.client().clone(),
            subjects,
            tail_subjects,
            node: fleet.node_name().to_string(),
            queue,
            dropped,
            publisher,
            tail_answerer,
        }
    }

    /// The subject `function`'s lines travel on.
    fn subject(&self, function: &str) -> String {
        format!("{}.{}", self.subjects, token(function))
    }
}

/// Answers every tail request with this node's last lines of the
/// function (as many as fit in one NATS message), until the feed is
/// dropped. The client re-subscribes by itself after a reconnect.
async fn answer_tails(
    client: async_nats::Client,
    subjects: String,
    node: String,
    local: Arc<dyn LogStore>,
) {
    let mut requests = match client.subscribe(format!("{subjects}.*")).await {
        Ok(requests) => requests,
        Err(error) => {
            tracing::warn!("this node's logs cannot be read from other nodes: {error}");
            return;
        }
    };
    while let Some(request) = requests.next().await {
        let Some(reply) = request.reply else { continue };
        let Ok(ask) = serde_json::from_slice::<TailRequest>(&request.payload) else {
            continue;
        };
        let lines = match local.logs_tail(&ask.function, ask.limit.min(10_000)).await {
            Ok(lines) => lines,
            Err(error) => {
                tracing::warn!(function = %ask.function, "cannot read the log for a tail request: {error}");
                Vec::new()
            }
        };
        let mut lines: Vec<FeedLine> = lines
            .into_iter()
            .map(|record| FeedLine {
                node: node.clone(),
                id: record.id,
                line: record.line,
            })
            .collect();
        let limit = client
            .server_info()
            .max_payload
            .saturating_sub(PAYLOAD_MARGIN);
        let payload = loop {
            let Ok(payload) = serde_json::to_vec(&lines) else {
                break b"[]".to_vec();
            };
            if payload.len() <= limit || lines.is_empty() {
                break payload;
            }
            // Over the server's limit: keep the newest lines that fit.
            let cut = (lines.len() / 4).max(1);
            lines.drain(..cut);
        };
        if let Err(error) = client.publish(reply, payload.into()).await {
            tracing::debug!("cannot answer a tail request: {error}");
        }
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

    async fn fleet_tail(
        &self,
        function: &str,
        limit: usize,
        nodes: usize,
    ) -> Result<Option<Vec<FeedLine>>> {
        let unreachable =
            || StoreError::Backend("cannot read the fleet's logs: NATS is out of reach".into());
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(unreachable());
        }
        let inbox = self.client.new_inbox();
        let mut answers =
            tokio::time::timeout(SUBSCRIBE_CONFIRM, self.client.subscribe(inbox.clone()))
                .await
                .map_err(|_| unreachable())?
                .map_err(backend)?;
        let request = serde_json::to_vec(&TailRequest {
            function: function.to_string(),
            limit,
        })
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let subject = format!("{}.{}", self.tail_subjects, token(function));
        self.client
            .publish_with_reply(subject, inbox, request.into())
            .await
            .map_err(backend)?;
        let deadline = tokio::time::Instant::now() + TAIL_WAIT;
        let (mut answered, mut lines) = (0, Vec::new());
        while answered < nodes {
            match tokio::time::timeout_at(deadline, answers.next()).await {
                Ok(Some(answer)) => {
                    answered += 1;
                    match serde_json::from_slice::<Vec<FeedLine>>(&answer.payload) {
                        Ok(mut got) => lines.append(&mut got),
                        Err(error) => tracing::debug!("unreadable tail answer: {error}"),
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        if answered == 0 {
            return Err(unreachable());
        }
        lines.sort_by(|a, b| (a.line.ts_ms, &a.node, a.id).cmp(&(b.line.ts_ms, &b.node, b.id)));
        let surplus = lines.len().saturating_sub(limit);
        lines.drain(..surplus);
        Ok(Some(lines))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::testing::NatsServers;

    /// A node's own log, in a data directory of its own.
    fn local_log() -> (tempfile::TempDir, Arc<dyn LogStore>) {
        let dir = tempfile::tempdir().unwrap();
        let logs = mayfly_store::Stores::sqlite(dir.path()).unwrap().logs;
        (dir, logs)
    }

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
        let ((_dir_a, log_a), (_dir_b, log_b)) = (local_log(), local_log());
        let (feed_a, feed_b) = (NatsLogFeed::open(&a, log_a), NatsLogFeed::open(&b, log_b));
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
        let (_dir, log) = local_log();
        let feed = NatsLogFeed::open(&a, log);
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_gathers_every_nodes_last_lines_oldest_first_tagged_with_their_node() {
        let servers = NatsServers::single();
        let a = Fleet::connect(&servers.options("node-a", "l3"))
            .await
            .unwrap();
        let b = Fleet::connect(&servers.options("node-b", "l3"))
            .await
            .unwrap();
        let ((_dir_a, log_a), (_dir_b, log_b)) = (local_log(), local_log());
        let at = |ts_ms, function: &str, text: &str| NewLogLine {
            ts_ms,
            ..new_line(function, text)
        };
        log_a
            .append_logs(&[at(10, "f", "a1"), at(30, "f", "a2"), at(35, "g", "other")])
            .await
            .unwrap();
        log_b
            .append_logs(&[at(20, "f", "b1"), at(40, "f", "b2")])
            .await
            .unwrap();
        let feed_a = NatsLogFeed::open(&a, log_a);
        let _feed_b = NatsLogFeed::open(&b, log_b);
        let texts = |lines: &[FeedLine]| -> Vec<(String, String)> {
            lines
                .iter()
                .map(|l| (l.node.clone(), l.line.line.clone()))
                .collect()
        };
        // Each node subscribes to tail requests as it opens: poll until
        // both answer.
        let deadline = Instant::now() + Duration::from_secs(30);
        let lines = loop {
            let lines = feed_a.fleet_tail("f", 3, 2).await.unwrap().unwrap();
            if lines.len() == 3 || Instant::now() > deadline {
                break lines;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let pair = |node: &str, text: &str| (node.to_string(), text.to_string());
        assert_eq!(
            texts(&lines),
            [
                pair("node-b", "b1"),
                pair("node-a", "a2"),
                pair("node-b", "b2")
            ]
        );
        // A listed node that does not answer (died a moment ago) costs a
        // short wait, not the answer.
        let started = Instant::now();
        let lines = feed_a.fleet_tail("f", 10, 3).await.unwrap().unwrap();
        assert_eq!(lines.len(), 4, "{:?}", texts(&lines));
        assert!(started.elapsed() >= TAIL_WAIT);
    }
}
