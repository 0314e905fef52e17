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
    /// Appends lines in order; returns the id given to the last one.
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
