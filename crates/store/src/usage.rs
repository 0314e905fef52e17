//! The usage contract: one record per invocation, the source of truth for
//! billing, and its aggregation.

use serde::{Deserialize, Serialize};

use crate::Result;

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The handler returned.
    Ok,
    /// The guest trapped or failed.
    Error,
    /// The invocation ran past its time limit.
    Timeout,
    /// The guest ran out of its memory limit.
    Oom,
    /// The invocation was refused for lack of capacity or quota.
    Throttled,
    /// The platform ended the invocation (shutdown, operator).
    Killed,
    /// The client went away before the response was done. Billed (the
    /// function ran), but not an error of the function.
    ClientClosed,
}

impl Outcome {
    /// Every outcome, in declaration order.
    pub const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::Error,
        Outcome::Timeout,
        Outcome::Oom,
        Outcome::Throttled,
        Outcome::Killed,
        Outcome::ClientClosed,
    ];

    /// The stored and serialized name: `ok`, `error`, `timeout`, `oom`,
    /// `throttled`, `killed` or `client_closed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Oom => "oom",
            Outcome::Throttled => "throttled",
            Outcome::Killed => "killed",
            Outcome::ClientClosed => "client_closed",
        }
    }

    /// The outcome named `text` (as [`Outcome::as_str`] spells it).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == text)
    }

    /// Whether it counts as an error in usage totals: every outcome but
    /// `ok` and `client_closed` (the client leaving is not the function's
    /// failure).
    pub fn is_error(self) -> bool {
        !matches!(self, Outcome::Ok | Outcome::ClientClosed)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One invocation's usage: one row of the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Unique per invocation (32 hex chars, a time-ordered UUID v7), always
    /// minted by the node: the ledger's identity for the record, together
    /// with the function.
    pub request_id: String,
    /// The correlation id the client sent (`x-mayfly-client-request-id`),
    /// if any. Kept for the client's own bookkeeping only: many records
    /// may share one, and it never deduplicates anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    /// Function name.
    pub function: String,
    /// Version that ran.
    pub version: u64,
    /// What started the invocation: `http`, `invoke`, later `schedule`,
    /// `queue`, ...
    pub trigger: String,
    /// When it started, wall clock, in milliseconds since the Unix epoch.
    pub start_ms: i64,
    /// Wall-clock duration of the handler in microseconds: from its
    /// instance's start (after `init_us`) to its end.
    pub wall_us: u64,
    /// Time a cold start spent before the handler ran, in microseconds:
    /// loading the compiled artifact and instantiating the first instance
    /// (Lambda's Init Duration). 0 for a warm invocation, and in records of
    /// nodes that predate it.
    #[serde(default)]
    pub init_us: u64,
    /// CPU time in microseconds.
    pub cpu_us: u64,
    /// Peak linear memory of the instance, in bytes.
    pub peak_memory_bytes: u64,
    /// Configured memory of the function, in MB.
    pub memory_limit_mb: u32,
    /// Billed duration in milliseconds: [`billed_ms`] of `init_us +
    /// wall_us`, so a cold start pays for its initialisation as on Lambda.
    pub billed_ms: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Whether it paid for loading the function (first request after a
    /// deploy or restart).
    pub cold: bool,
    /// HTTP status sent to the client, if any.
    pub status: Option<u16>,
}

/// Billed duration: time (init and handler) rounded up to the next whole
/// millisecond, at least 1 ms per invocation (as Lambda bills).
pub fn billed_ms(wall_us: u64) -> u64 {
    wall_us.div_ceil(1000).max(1)
}

/// MB-milliseconds in a GB-second, with binary gigabytes (1 GB = 1024 MB, as
/// AWS counts GB-s).
pub(crate) const MB_MS_PER_GB_S: f64 = 1024.0 * 1000.0;
/// Byte-microseconds in a GB-second (1 GB = 2^30 bytes).
pub(crate) const BYTE_US_PER_GB_S: f64 = 1_073_741_824.0 * 1_000_000.0;

impl UsageRecord {
    /// Configured memory × billed duration, in GB-seconds (1 GB = 1024 MB).
    pub fn billed_gb_s(&self) -> f64 {
        // The same expression as the ledger's SQL sum, so a summary of one
        // record equals this exactly.
        f64::from(self.memory_limit_mb) * self.billed_ms as f64 / MB_MS_PER_GB_S
    }

    /// Configured memory × initialisation time, in GB-seconds: what the cold
    /// start added to [`Self::billed_gb_s`] (before rounding).
    pub fn init_gb_s(&self) -> f64 {
        f64::from(self.memory_limit_mb) * self.init_us as f64 / 1000.0 / MB_MS_PER_GB_S
    }

    /// Peak memory × wall duration, in GB-seconds (1 GB = 2^30 bytes).
    pub fn used_gb_s(&self) -> f64 {
        self.peak_memory_bytes as f64 * self.wall_us as f64 / BYTE_US_PER_GB_S
    }
}

/// How usage is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// One row per function.
    Function,
    /// One row per function version.
    Version,
    /// One row per UTC hour.
    Hour,
    /// One row per UTC day.
    Day,
}

impl GroupBy {
    /// The grouping named `text`: `function`, `version`, `hour` or `day`.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Function, Self::Version, Self::Hour, Self::Day]
            .into_iter()
            .find(|g| g.as_str() == text)
    }

    /// The name [`GroupBy::parse`] accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Function => "function",
            GroupBy::Version => "version",
            GroupBy::Hour => "hour",
            GroupBy::Day => "day",
        }
    }
}

/// A usage query: records whose `start_ms` is in `[from_ms, to_ms)`.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    /// Start of the window, inclusive, in ms since the Unix epoch.
    pub from_ms: i64,
    /// End of the window, exclusive, in ms since the Unix epoch.
    pub to_ms: i64,
    /// How rows are grouped.
    pub group_by: GroupBy,
    /// Only this function's records, if set.
    pub function: Option<String>,
    /// Only records with this correlation id (`client_request_id`), if
    /// set: a batch job's invocations carry `job-<ID>`.
    pub client_request_id: Option<String>,
}

/// Counts per outcome (serialized as a JSON object with all seven keys).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeCounts {
    /// Invocations that returned.
    pub ok: u64,
    /// Invocations that failed.
    pub error: u64,
    /// Invocations that timed out.
    pub timeout: u64,
    /// Invocations that ran out of memory.
    pub oom: u64,
    /// Invocations refused for capacity or quota.
    pub throttled: u64,
    /// Invocations the platform ended.
    pub killed: u64,
    /// Invocations whose client went away before the response was done.
    /// Defaults to 0 in JSON from nodes that predate it.
    #[serde(default)]
    pub client_closed: u64,
}

impl OutcomeCounts {
    /// The count for `outcome`.
    pub fn get(&self, outcome: Outcome) -> u64 {
        match outcome {
            Outcome::Ok => self.ok,
            Outcome::Error => self.error,
            Outcome::Timeout => self.timeout,
            Outcome::Oom => self.oom,
            Outcome::Throttled => self.throttled,
            Outcome::Killed => self.killed,
            Outcome::ClientClosed => self.client_closed,
        }
    }

    pub(crate) fn slot(&mut self, outcome: Outcome) -> &mut u64 {
        match outcome {
            Outcome::Ok => &mut self.ok,
            Outcome::Error => &mut self.error,
            Outcome::Timeout => &mut self.timeout,
            Outcome::Oom => &mut self.oom,
            Outcome::Throttled => &mut self.throttled,
            Outcome::Killed => &mut self.killed,
            Outcome::ClientClosed => &mut self.client_closed,
        }
    }
}

/// Usage of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The function, for [`GroupBy::Function`] and [`GroupBy::Version`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// The version, for [`GroupBy::Version`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Start of the UTC hour or day, for [`GroupBy::Hour`] and
    /// [`GroupBy::Day`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start_ms: Option<i64>,
    /// Number of invocations.
    pub invocations: u64,
    /// Invocations that count as errors ([`Outcome::is_error`]): all but
    /// `ok` and `client_closed`.
    pub errors: u64,
    /// Invocations per outcome.
    pub outcomes: OutcomeCounts,
    /// Invocations that started cold.
    pub cold_starts: u64,
    /// Sum of billed milliseconds.
    pub billed_ms: u64,
    /// Sum of [`UsageRecord::billed_gb_s`].
    pub billed_gb_s: f64,
    /// Sum of [`UsageRecord::used_gb_s`].
    pub used_gb_s: f64,
    /// Sum of CPU microseconds.
    pub cpu_us: u64,
    /// Sum of wall-clock microseconds.
    pub wall_us: u64,
    /// Sum of [`UsageRecord::init_us`]: time cold starts spent before their
    /// handlers ran. 0 from nodes that predate it.
    #[serde(default)]
    pub init_us: u64,
    /// Sum of [`UsageRecord::init_gb_s`]: the part of `billed_gb_s` that
    /// cold starts cost.
    #[serde(default)]
    pub init_gb_s: f64,
}

impl UsageRow {
    /// Adds `other`'s counts and sums into this row (for totals); the group
    /// keys are left as they are.
    pub fn add(&mut self, other: &UsageRow) {
        self.invocations += other.invocations;
        self.errors += other.errors;
        for outcome in Outcome::ALL {
            *self.outcomes.slot(outcome) += other.outcomes.get(outcome);
        }
        self.cold_starts += other.cold_starts;
        self.billed_ms = self.billed_ms.saturating_add(other.billed_ms);
        self.billed_gb_s += other.billed_gb_s;
        self.used_gb_s += other.used_gb_s;
        self.cpu_us = self.cpu_us.saturating_add(other.cpu_us);
        self.wall_us = self.wall_us.saturating_add(other.wall_us);
        self.init_us = self.init_us.saturating_add(other.init_us);
        self.init_gb_s += other.init_gb_s;
    }
}

/// A stored record with its position in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredUsage {
    /// Position in the ledger: increases with every record appended.
    pub seq: i64,
    /// The record.
    #[serde(flatten)]
    pub record: UsageRecord,
}

/// The usage ledger: the source of truth for billing.
///
/// Appended in batches by one background writer (group commit), never per
/// request.
#[async_trait::async_trait]
pub trait UsageStore: Send + Sync {
    /// Appends records in one transaction. A record whose function and
    /// (node-minted) request id are already in the ledger is skipped, so the
    /// writer retrying a commit that had in fact landed can never count a
    /// record twice. Returns how many were new.
    async fn append_usage(&self, records: &[UsageRecord]) -> Result<usize>;

    /// Usage in the query's window, grouped; rows ordered by group key
    /// (function, version, or period).
    async fn usage_summary(&self, query: &UsageQuery) -> Result<Vec<UsageRow>>;

    /// Records with `seq > after_seq`, oldest first, at most `limit`,
    /// optionally for one function.
    async fn usage_records(
        &self,
        function: Option<&str>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredUsage>>;

    /// How many records the ledger holds.
    async fn usage_count(&self) -> Result<u64>;
}
