//! The log contract: durable guest log lines.

use serde::{Deserialize, Serialize};

use crate::Result;

/// A guest log line on its way to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewLogLine {
    /// When the line was written (ms since the Unix epoch).
    pub ts_ms: i64,
    /// Function name.
    pub function: String,
    /// Function version.
    pub version: u64,
    /// The invocation's request id.
    pub request_id: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The line, without its newline.
    pub line: String,
}

/// A stored guest log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Position in the node's log, increasing.
    pub id: i64,
    /// The line and its labels.
    #[serde(flatten)]
    pub line: NewLogLine,
}

/// Durable guest log lines.
///
/// Appends come in batches from a background writer, never from the guest's
/// own write path.
#[async_trait::async_trait]
pub trait LogStore: Send + Sync {
    /// Appends lines in order; returns the id given to the last one. The
    /// lines of one append get consecutive ids (so the first one's is the
    /// last one's minus the count, plus one): the live feed
    /// ([`LogFeed::publish`]) relies on it.
    async fn append_logs(&self, lines: &[NewLogLine]) -> Result<i64>;

    /// Lines of `function` with an id above `after_id`, oldest first, at most
    /// `limit`.
    async fn logs_after(
        &self,
        function: &str,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<LogRecord>>;

    /// The last `limit` lines of `function`, oldest first.
    async fn logs_tail(&self, function: &str, limit: usize) -> Result<Vec<LogRecord>>;

    /// Deletes the oldest lines so at most `keep` remain.
    async fn prune_logs(&self, keep: usize) -> Result<usize>;

    /// Deletes `function`'s oldest lines so at most `keep_lines` of them
    /// remain, holding at most `keep_bytes` of text: one function's flood
    /// never erases another's lines.
    async fn prune_function_logs(
        &self,
        function: &str,
        keep_lines: usize,
        keep_bytes: u64,
    ) -> Result<usize>;
}

/// A guest log line on the fleet's live feed: the line, the node that
/// served the invocation, and its id in that node's [`LogStore`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedLine {
    /// The node that wrote the line.
    pub node: String,
    /// The line's id in that node's log store. A follower serving its own
    /// node's tail skips the feed's copies of lines it already sent.
    pub id: i64,
    /// The line and its labels.
    #[serde(flatten)]
    pub line: NewLogLine,
}

/// New log lines of one function, from every node of the fleet.
pub type LogSubscription = futures::stream::BoxStream<'static, FeedLine>;

/// Live guest log lines across nodes, for `mayfly logs --follow`.
///
/// A node on its own needs none ([`LocalLogs`]): a follower reads new lines
/// from the node's own [`LogStore`]. A fleet back-end carries every node's
/// new lines to every follower, whichever node it asked.
#[async_trait::async_trait]
pub trait LogFeed: Send + Sync {
    /// Hands lines this node has just stored (ids `first_id`,
    /// `first_id + 1`, …) to the feed. Called from the log writer: it must
    /// not block or wait on the network (queue, and drop what does not fit).
    fn publish(&self, first_id: i64, lines: &[NewLogLine]);

    /// From now on, the new lines of `function` from every node, this one
    /// included; `None` when there is no feed (a follower then reads the
    /// node's own store). The subscription is in place when this returns,
    /// so a follower reading the store's tail afterwards misses nothing.
    async fn subscribe(&self, function: &str) -> Result<Option<LogSubscription>>;

    /// Lines the feed dropped since the node started (its queue was full).
    fn dropped(&self) -> u64;

    /// The last `limit` lines of `function` across the fleet, oldest
    /// first, each tagged with the node that wrote it (every node keeps its
    /// own log, and answers for it); `None` when there is no fleet (the
    /// caller reads its own [`LogStore`]). `nodes` is how many answers to
    /// expect (the fleet's live members): the lines come once that many
    /// nodes answered, or after a short wait for the missing ones. An error
    /// when no node answered at all (NATS out of reach).
    async fn fleet_tail(
        &self,
        function: &str,
        limit: usize,
        nodes: usize,
    ) -> Result<Option<Vec<FeedLine>>>;
}

/// The feed of a node on its own: nothing to publish, nothing to
/// subscribe to (its followers read its store).
#[derive(Debug, Default)]
pub struct LocalLogs;

#[async_trait::async_trait]
impl LogFeed for LocalLogs {
    fn publish(&self, _first_id: i64, _lines: &[NewLogLine]) {}

    async fn subscribe(&self, _function: &str) -> Result<Option<LogSubscription>> {
        Ok(None)
    }

    fn dropped(&self) -> u64 {
        0
    }

    async fn fleet_tail(
        &self,
        _function: &str,
        _limit: usize,
        _nodes: usize,
    ) -> Result<Option<Vec<FeedLine>>> {
        Ok(None)
    }
}
