//! The job contract: batch jobs that run a function once per object under
//! a prefix, with each item's state stored so a restarted node (even one
//! that was killed) resumes a job without running a finished item again,
//! and a lease on every running item so no item runs twice at once.
//!
//! The embedded back-end is `sqlite/jobs.rs` (`jobs.db`). A fleet back-end
//! implements the same trait (a JetStream work queue of items, leases as
//! message acknowledgement deadlines); the runner only needs
//! [`JobStore::claim_items`] to hand an item to one owner at a time and
//! [`JobStore::settle_items`] to accept results only from that owner.

use serde::{Deserialize, Serialize};

use crate::Result;

/// When a job stops early because too many items failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxFailures {
    /// Stop when more than this many items have failed.
    Count(u64),
    /// Stop when more than this percentage (0-100) of the items failed.
    Percent(u8),
}

impl MaxFailures {
    /// Parses `N` or `P%`, saying what is expected when `text` is neither.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        let bad = || format!("max failures `{text}` is not a count (`10`) or a percentage (`5%`)");
        if let Some(percent) = text.strip_suffix('%') {
            let percent: u8 = percent.trim().parse().map_err(|_| bad())?;
            if percent > 100 {
                return Err(format!(
                    "max failures `{text}` is over 100%: use a percentage from 0% to 100%"
                ));
            }
            return Ok(Self::Percent(percent));
        }
        text.parse().map(Self::Count).map_err(|_| bad())
    }

    /// Whether `failed` failures out of `total` items exceed the limit.
    pub fn exceeded(self, failed: u64, total: u64) -> bool {
        match self {
            Self::Count(max) => failed > max,
            // failed / total > percent / 100, in integers.
            Self::Percent(percent) => failed.saturating_mul(100) > u64::from(percent) * total,
        }
    }
}

impl std::fmt::Display for MaxFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What a job runs and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The function run once per item (its `live` alias).
    pub function: String,
    /// The bucket the items are objects of.
    pub input_bucket: String,
    /// The key prefix the items were listed under.
    pub input_prefix: String,
    /// Where the function is asked to write its results, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bucket: Option<String>,
    /// The key prefix of the results in `output_bucket`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_prefix: Option<String>,
    /// Most items running at once (the function's own concurrency limit
    /// also applies).
    pub parallelism: u32,
    /// When to stop early; `None` runs every item whatever fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<MaxFailures>,
    /// Attempts per item before it counts as failed.
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles with each attempt.
    pub backoff_ms: u64,
    /// A reduce: one item whose event lists every object under the input
    /// prefix, instead of one item per object.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reduce: bool,
    /// The pipeline run this job is a step of, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineStep>,
}

/// Which pipeline run and step a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStep {
    /// The pipeline's name (`[pipelines.NAME]`).
    pub name: String,
    /// The run's number (1, 2, …).
    pub run: u64,
    /// The step's name.
    pub step: String,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Items are pending or running.
    Running,
    /// Every item finished and none failed.
    Succeeded,
    /// Every item ended and some failed, or it stopped at its failure
    /// limit; `retry-failed` runs the failed ones again.
    Failed,
    /// Stopped by a user; `retry-failed` resumes it.
    Cancelled,
}

impl JobState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// Where an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    /// Waiting for its (next) attempt.
    Pending,
    /// Leased to a runner.
    Running,
    /// Its function answered 2xx.
    Done,
    /// Its last attempt failed.
    Failed,
}

impl ItemState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    /// The state named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Pending, Self::Running, Self::Done, Self::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// Items per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemCounts {
    /// Waiting.
    pub pending: u64,
    /// Leased.
    pub running: u64,
    /// Finished.
    pub done: u64,
    /// Failed.
    pub failed: u64,
}

impl ItemCounts {
    /// Every item of the job.
    pub fn total(&self) -> u64 {
        self.pending + self.running + self.done + self.failed
    }
}

/// A job with its progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Its id (time-ordered).
    pub id: String,
    /// What it runs.
    pub spec: JobSpec,
    /// Where it is.
    pub state: JobState,
    /// Why it stopped, for a job that stopped early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it was created (ms since the Unix epoch).
    pub created_ms: i64,
    /// When it last finished, if it is not running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
    /// Items per state.
    pub items: ItemCounts,
}

/// An object to run the job's function over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewItem {
    /// Object key.
    pub key: String,
    /// Size in bytes when the job was created.
    pub size: u64,
    /// Entity tag when the job was created.
    pub etag: String,
}

/// One item of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobItem {
    /// Its number within the job (1, 2, … in key order).
    pub seq: i64,
    /// Object key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Entity tag.
    pub etag: String,
    /// Where it is.
    pub state: ItemState,
    /// Attempts made (the current one included while running).
    pub attempts: u32,
    /// Why the last failed attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Who holds its lease while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_owner: Option<String>,
    /// When the lease runs out (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until_ms: Option<i64>,
}

/// What became of one attempt of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemResult {
    /// Finished: the function answered 2xx. `request_id` is the
    /// invocation's, for the item log.
    Done {
        /// The item.
        seq: i64,
        /// The invocation that did it.
        request_id: String,
    },
    /// Failed; try again after `delay_ms`.
    Retry {
        /// The item.
        seq: i64,
        /// Wait before the next attempt.
        delay_ms: u64,
        /// Why it failed.
        error: String,
    },
    /// Failed its last attempt.
    Failed {
        /// The item.
        seq: i64,
        /// Why it failed.
        error: String,
    },
    /// Not run (the function was at its limit, the node shutting down):
    /// back to pending after `delay_ms` without spending the attempt.
    Postpone {
        /// The item.
        seq: i64,
        /// Wait before the next attempt.
        delay_ms: u64,
    },
}

impl ItemResult {
    /// The item it is about.
    pub fn seq(&self) -> i64 {
        match self {
            Self::Done { seq, .. }
            | Self::Retry { seq, .. }
            | Self::Failed { seq, .. }
            | Self::Postpone { seq, .. } => *seq,
        }
    }
}

/// One line of a job's item log: an attempt's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemLogEntry {
    /// When it was recorded (ms since the Unix epoch).
    pub at_ms: i64,
    /// The item.
    pub seq: i64,
    /// Its object key.
    pub key: String,
    /// The attempt.
    pub attempt: u32,
    /// `done`, `retry`, `failed` (or `reset` by retry-failed).
    pub outcome: String,
    /// The invocation's id (finished) or the error (failed).
    pub detail: String,
}

/// Durable jobs and their items.
#[async_trait::async_trait]
pub trait JobStore: Send + Sync {
    /// Stores a job and its items (all pending) in one step.
    async fn create_job(&self, id: &str, spec: &JobSpec, items: &[NewItem]) -> Result<Job>;

    /// A job with its counts, if it exists.
    async fn job(&self, id: &str) -> Result<Option<Job>>;

    /// Jobs, newest first, at most `limit`.
    async fn jobs(&self, limit: usize) -> Result<Vec<Job>>;

    /// Leases up to `limit` items of a running job to `owner` until
    /// `now_ms + lease_ms`: pending items that are due and running items
    /// whose lease ran out (their owner died). Each claimed item's attempt
    /// count goes up by one. An item is never leased to two owners at once.
    async fn claim_items(
        &self,
        job: &str,
        owner: &str,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<JobItem>>;

    /// Records results of `owner`'s attempts in one step, each logged in
    /// the item log; a result for an item `owner` no longer leases (its
    /// lease ran out and another took it) is ignored. Returns the job's
    /// counts after.
    async fn settle_items(
        &self,
        job: &str,
        owner: &str,
        results: &[ItemResult],
    ) -> Result<ItemCounts>;

    /// When the next pending item of the job becomes due (ms since the
    /// Unix epoch), if any is pending.
    async fn next_due(&self, job: &str) -> Result<Option<i64>>;

    /// Sets a job's state (and why, for an early stop). Leaving `running`
    /// sets its finish time; a cancel or early stop leaves pending items
    /// pending, for `retry-failed`.
    async fn set_state(&self, job: &str, state: JobState, error: Option<&str>) -> Result<()>;

    /// Makes every failed item of a job pending again with no attempts and
    /// the job running. Returns how many items were reset.
    async fn retry_failed(&self, job: &str) -> Result<u64>;

    /// Gives back every lease `owner` holds, unless it is `None`: then
    /// every lease of every job (a node alone, starting, owns all of them:
    /// its previous run was killed). Returns how many were released.
    async fn release_leases(&self, owner: Option<&str>) -> Result<u64>;

    /// A job's items in `state` (all if `None`) after item `after_seq`,
    /// in order, at most `limit`.
    async fn items(
        &self,
        job: &str,
        state: Option<ItemState>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<JobItem>>;

    /// A job's item log after entry `after` (its position), oldest first,
    /// at most `limit`; each entry comes with its position.
    async fn item_log(
        &self,
        job: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, ItemLogEntry)>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_failures_parses_counts_and_percentages() {
        assert_eq!(MaxFailures::parse("3"), Ok(MaxFailures::Count(3)));
        assert_eq!(MaxFailures::parse("5%"), Ok(MaxFailures::Percent(5)));
        assert!(
            MaxFailures::parse("101%")
                .unwrap_err()
                .contains("over 100%")
        );
        assert!(MaxFailures::parse("many").unwrap_err().contains("count"));
        assert!(MaxFailures::Count(2).exceeded(3, 10));
        assert!(!MaxFailures::Count(2).exceeded(2, 10));
        assert!(MaxFailures::Percent(10).exceeded(2, 10));
        assert!(!MaxFailures::Percent(10).exceeded(1, 10));
    }
}
