//! The records the state layer keeps.

use serde::{Deserialize, Serialize};

/// A function's deploy-time configuration, stored with each version and
/// immutable once deployed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// Normalised routes: `/prefix` or `host/prefix`.
    #[serde(default)]
    pub routes: Vec<String>,
}

/// One immutable version of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Function name.
    pub function: String,
    /// Version number, from 1, increasing per function.
    pub version: u64,
    /// Digest of the uploaded component.
    pub digest: String,
    /// Configuration deployed with this version.
    pub config: FunctionConfig,
    /// When it was deployed, in milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// A function and the version it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// Function name.
    pub name: String,
    /// When the function was first deployed (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// The version that serves requests.
    pub live: VersionRecord,
}

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
