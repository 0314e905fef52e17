//! The pipeline contract: named chains of batch jobs (`[pipelines.NAME]`
//! in `mayfly.toml`) that the node stores and runs, and each run's record.
//!
//! A run keeps a copy of the definition it started with, so a redeploy
//! mid-run never changes the steps of a run under way; its steps are jobs
//! ([`crate::JobStore`]) labelled with the pipeline, run and step, which is
//! how a restarted node finds where a run had got to.
//!
//! The embedded back-end is `sqlite/pipelines.rs`, in `jobs.db` beside the
//! jobs its runs are made of.

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::jobs::JobState;

/// A pipeline as written in `[pipelines.NAME]` (and sent as JSON to
/// `PUT /v1/pipelines/NAME`). The node checks it before storing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// `BUCKET/PREFIX` the first step(s) read.
    pub input: String,
    /// Start a run on this schedule (`*/5 * * * *`, `@every 30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Start a run when objects arrive under `input`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_objects: bool,
    /// The steps, in file order.
    #[serde(default)]
    pub steps: Vec<StepSpec>,
}

/// One step of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Its name within the pipeline.
    pub name: String,
    /// The function it runs.
    pub function: String,
    /// The step whose output it reads; by default the one before it (the
    /// first reads the pipeline's input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// `BUCKET/PREFIX` (a reduce: `BUCKET/KEY`) it writes its results to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// One item listing every object, instead of one per object.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reduce: bool,
    /// Most items running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    /// `N` or `P%`: stop the step (and the run) past that many failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<String>,
    /// Attempts per item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// A stored pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    /// Its name.
    pub name: String,
    /// Its definition.
    pub spec: PipelineSpec,
    /// When it was first stored (ms since the Unix epoch).
    pub created_ms: i64,
    /// When its definition last changed: a schedule's grid starts here.
    pub updated_ms: i64,
    /// The last schedule slot it fired, since its definition changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_slot_ms: Option<i64>,
    /// Since when objects have arrived under its input that no run has
    /// started for (an `on_objects` pipeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_since_ms: Option<i64>,
}

/// Why a run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunCause {
    /// `mayfly pipeline run`.
    Manual,
    /// Its schedule.
    Schedule,
    /// Objects arrived under its input.
    Objects,
}

impl RunCause {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Schedule => "schedule",
            Self::Objects => "objects",
        }
    }

    /// The cause named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Manual, Self::Schedule, Self::Objects]
            .into_iter()
            .find(|c| c.as_str() == text)
    }
}

/// One run of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRun {
    /// The pipeline.
    pub pipeline: String,
    /// Its number (1, 2, …).
    pub run: u64,
    /// The definition it runs (as it was when it started).
    pub spec: PipelineSpec,
    /// Why it started.
    pub cause: RunCause,
    /// Whether its map steps run over every object, not only new ones.
    pub full: bool,
    /// Running, succeeded or failed.
    pub state: JobState,
    /// Why it failed, or a note on how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it started (ms since the Unix epoch).
    pub created_ms: i64,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
}

/// What [`PipelineStore::start_run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStart {
    /// A new run, stored as running.
    Started(PipelineRun),
    /// Nothing: this run of the pipeline is still running.
    Busy(PipelineRun),
    /// Nothing: no pipeline has that name.
    NoPipeline,
}

/// Stored pipelines and their runs.
#[async_trait::async_trait]
pub trait PipelineStore: Send + Sync {
    /// Stores a pipeline's definition; `true` if it is new or changed. A
    /// change restarts its schedule's grid (`updated_ms`, no last slot).
    async fn put_pipeline(&self, name: &str, spec: &PipelineSpec) -> Result<(Pipeline, bool)>;

    /// A pipeline, if stored.
    async fn pipeline(&self, name: &str) -> Result<Option<Pipeline>>;

    /// Every pipeline, by name.
    async fn pipelines(&self) -> Result<Vec<Pipeline>>;

    /// Forgets a pipeline's definition (its runs stay, as history, and
    /// the next run of the same name continues their numbering). `false`
    /// if there was none.
    async fn delete_pipeline(&self, name: &str) -> Result<bool>;

    /// Notes that objects arrived for the pipeline at `at_ms`, unless
    /// some are noted already.
    async fn mark_pending(&self, name: &str, at_ms: i64) -> Result<()>;

    /// Records `slot` as the last schedule slot fired if the last one is
    /// still `last` (compare-and-swap); `false` if it was not.
    async fn fire_slot(&self, name: &str, last: Option<i64>, slot: i64) -> Result<bool>;

    /// Starts a run of the current definition, numbered after every
    /// earlier run, unless one is running: one step, so two runs of a
    /// pipeline never overlap. A run that objects started clears the
    /// pipeline's pending mark in the same step.
    async fn start_run(&self, name: &str, cause: RunCause, full: bool) -> Result<RunStart>;

    /// Records a run's end.
    async fn finish_run(
        &self,
        name: &str,
        run: u64,
        state: JobState,
        error: Option<&str>,
    ) -> Result<()>;

    /// A pipeline's runs, newest first, at most `limit`.
    async fn runs(&self, name: &str, limit: usize) -> Result<Vec<PipelineRun>>;

    /// One run.
    async fn run(&self, name: &str, run: u64) -> Result<Option<PipelineRun>>;

    /// Every run still running, of any pipeline.
    async fn running_runs(&self) -> Result<Vec<PipelineRun>>;
}
