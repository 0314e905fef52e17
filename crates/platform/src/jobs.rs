//! Batch jobs: a function run once per object under a prefix.
//!
//! A job is created whole (its items are the objects listed when it
//! starts) in the [`JobStore`], then one task per running job claims items
//! in batches under a lease, delivers each as a CloudEvent
//! (`dev.mayfly.job.item`) through the same path as event deliveries
//! (`dispatch::run_to_completion`: admission, the function's concurrency
//! limit, metering), and settles the results in batches. The ledger labels
//! each invocation with trigger `job` and correlation id `job-<ID>`, so
//! `mayfly usage --job ID` adds a job's cost up.
//!
//! A restarted node releases the leases its killed predecessor held and
//! resumes every running job; a finished item is never claimed again, and
//! a lease keeps an item from running twice at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mayfly_store::{
    ItemCounts, ItemLogEntry, ItemResult, ItemState, Job, JobItem, JobSpec, JobState, JobStore,
    MaxFailures, NewItem, PipelineStep,
};
use percent_encoding::utf8_percent_encode;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::error::PlatformError;
use crate::events::EventHub;
use crate::events::dispatch::{
    EventBody, EventOutcome, HEADER_ESCAPES, backoff, jitter, rfc3339_millis, run_to_completion,
};
use crate::invoker::Invoker;
use crate::validate::{check_key, check_name};

/// The CloudEvent type of a job item.
pub const JOB_ITEM_EVENT: &str = "dev.mayfly.job.item";
/// The ledger's trigger label of a job item's invocation.
pub const JOB_TRIGGER: &str = "job";
/// Most items a job may have.
pub const MAX_JOB_ITEMS: usize = 1_000_000;
/// Items running at once when the request names no parallelism.
pub const DEFAULT_PARALLELISM: u32 = 64;
/// Most items running at once for one job.
pub const MAX_PARALLELISM: u32 = 1024;
/// Attempts per item unless the request says otherwise.
const DEFAULT_ATTEMPTS: u32 = 3;
/// First retry delay unless the request says otherwise.
const DEFAULT_BACKOFF_MS: u64 = 200;
/// Items claimed at once.
const CLAIM_BATCH: usize = 128;
/// Wait before an item whose function was full is tried again.
const POSTPONE_MS: u64 = 200;
/// Added to the function's timeout and queue wait to lease an item.
const LEASE_MARGIN_MS: u64 = 30_000;
/// Wait before trying again after the store failed.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Objects listed per page when a job is created.
const LIST_PAGE: usize = 10_000;

/// The ledger correlation id of a job's invocations.
pub fn job_correlation_id(job: &str) -> String {
    format!("job-{job}")
}

/// What `POST /v1/jobs` asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The function to run over every object.
    pub function: String,
    /// `BUCKET/PREFIX` (or `BUCKET` for every object).
    pub input: String,
    /// `BUCKET/PREFIX` the function is asked to write its results under.
    #[serde(default)]
    pub output: Option<String>,
    /// Most items running at once.
    #[serde(default)]
    pub parallelism: Option<u32>,
    /// `N` or `P%`: stop when more items than that failed.
    #[serde(default)]
    pub max_failures: Option<String>,
    /// Attempts per item (1-10).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// First retry delay in milliseconds.
    #[serde(default)]
    pub backoff_ms: Option<u64>,
    /// Run once over the list of every object under the input prefix
    /// (a pipeline's reduce step) instead of once per object.
    #[serde(default)]
    pub reduce: bool,
    /// The pipeline run and step this job is.
    #[serde(default)]
    pub pipeline: Option<PipelineStep>,
    /// Leave out the objects (same key and ETag) that an earlier job of
    /// the same pipeline step finished: only new or changed ones run.
    #[serde(default)]
    pub incremental: bool,
}

/// The body of an item's CloudEvent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemEvent {
    /// The job.
    pub job: String,
    /// The item's bucket.
    pub bucket: String,
    /// The object key.
    pub key: String,
    /// Its size when the job started.
    pub size: u64,
    /// Its entity tag when the job started.
    pub etag: String,
    /// For a reduce: every object key under the input prefix (`key` is
    /// then the prefix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// Where to write the result, if the job has an output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_bucket: Option<String>,
    /// The key to write the result under: the output prefix plus the key
    /// without the input prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_key: Option<String>,
}

/// Splits `BUCKET/PREFIX`.
pub fn split_location(what: &str, text: &str) -> Result<(String, String), PlatformError> {
    let (bucket, prefix) = text.split_once('/').unwrap_or((text, ""));
    check_name("bucket", bucket)
        .map_err(|e| PlatformError::BadRequest(format!("{what} `{text}`: {e}")))?;
    if !prefix.is_empty() {
        check_key(prefix)
            .map_err(|e| PlatformError::BadRequest(format!("{what} `{text}`: {e}")))?;
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// The node's jobs: creates them, runs them, answers about them.
pub struct Jobs {
    store: Option<Arc<dyn JobStore>>,
    runner: Arc<Runner>,
    /// The task of each job running here, by id, with its number (so an
    /// ending task removes only itself).
    tasks: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// The number of the next task.
    next_task: std::sync::atomic::AtomicU64,
    background: CancellationToken,
    /// Told whenever a job's task ends, for those waiting on a job
    /// (a pipeline's steps).
    ended: tokio::sync::Notify,
}

/// What a job's task needs.
struct Runner {
    invoker: Arc<Invoker>,
    /// The object store, for a reduce's list of objects.
    events: Arc<EventHub>,
    /// Who holds this node's leases: unique per run of the node, so a
    /// restarted node never mistakes its predecessor's leases for its own.
    owner: String,
}

impl Jobs {
    /// The jobs over `store` (none: every job request is refused, saying
    /// why), run through `invoker`; tasks end when `background` does.
    pub(crate) fn new(
        store: Option<Arc<dyn JobStore>>,
        invoker: Arc<Invoker>,
        events: Arc<EventHub>,
        node_name: &str,
        background: CancellationToken,
    ) -> Self {
        Self {
            store,
            runner: Arc::new(Runner {
                invoker,
                events,
                owner: format!("{node_name}/{}", uuid::Uuid::now_v7().simple()),
            }),
            tasks: Mutex::new(HashMap::new()),
            next_task: std::sync::atomic::AtomicU64::new(0),
            background,
            ended: tokio::sync::Notify::new(),
        }
    }

    fn store(&self) -> Result<&Arc<dyn JobStore>, PlatformError> {
        self.store.as_ref().ok_or_else(|| {
            PlatformError::Conflict(
                "this node's store back-end has no job store: run jobs on a node with a local \
                 data directory"
                    .into(),
            )
        })
    }

    /// At start: gives back the leases a killed predecessor held (a node
    /// alone owns every lease of its data directory; in a fleet they
    /// expire instead) and resumes every running job.
    pub(crate) async fn start(self: &Arc<Self>, alone: bool) -> Result<(), PlatformError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        if alone {
            let released = store.release_leases(None).await?;
            if released > 0 {
                tracing::info!(items = released, "released job items a previous run held");
            }
        }
        for job in store.jobs(usize::MAX).await? {
            if job.state == JobState::Running {
                tracing::info!(job = %job.id, "resuming job");
                self.spawn(job.id);
            }
        }
        Ok(())
    }

    /// Starts a job: checks the request, lists the objects, stores the job
    /// with its items and starts running it. Nothing is stored when the
    /// request is wrong.
    pub async fn create(self: &Arc<Self>, request: JobRequest) -> Result<Job, PlatformError> {
        let store = self.store()?.clone();
        let events = &self.runner.events;
        let function = request.function.trim();
        if !self.runner.invoker.catalog().by_name.contains_key(function) {
            return Err(PlatformError::NotFound(function.to_string()));
        }
        let (input_bucket, input_prefix) = split_location("input", &request.input)?;
        let output = request
            .output
            .as_deref()
            .map(|o| split_location("output", o))
            .transpose()?;
        if let Some((bucket, prefix)) = &output
            && bucket == &input_bucket
            && (prefix.starts_with(&input_prefix) || input_prefix.starts_with(prefix.as_str()))
        {
            return Err(PlatformError::BadRequest(format!(
                "the output `{bucket}/{prefix}` overlaps the input `{input_bucket}/{input_prefix}`: \
                 results would become inputs; write them under another prefix"
            )));
        }
        let parallelism = request.parallelism.unwrap_or(DEFAULT_PARALLELISM);
        if !(1..=MAX_PARALLELISM).contains(&parallelism) {
            return Err(PlatformError::BadRequest(format!(
                "parallelism {parallelism} is out of range: use 1 to {MAX_PARALLELISM}"
            )));
        }
        let max_failures = request
            .max_failures
            .as_deref()
            .map(MaxFailures::parse)
            .transpose()
            .map_err(PlatformError::BadRequest)?;
        let max_attempts = request.max_attempts.unwrap_or(DEFAULT_ATTEMPTS);
        if !(1..=10).contains(&max_attempts) {
            return Err(PlatformError::BadRequest(format!(
                "max attempts {max_attempts} is out of range: use 1 to 10"
            )));
        }
        let backoff_ms = request.backoff_ms.unwrap_or(DEFAULT_BACKOFF_MS).min(60_000);
        let buckets = events.object_buckets().await?;
        if !buckets.iter().any(|b| b.bucket == input_bucket) {
            return Err(PlatformError::Missing(format!(
                "bucket `{input_bucket}` does not exist (no object was ever stored in it): \
                 check the name with `mayfly objects buckets`"
            )));
        }
        let skip = match &request.pipeline {
            Some(step) if request.incremental && !request.reduce => {
                finished_before(&store, step).await?
            }
            _ => std::collections::HashSet::new(),
        };
        let mut items = Vec::new();
        let mut listed = 0usize;
        let mut after = String::new();
        loop {
            let page = events
                .object_list(
                    &input_bucket,
                    input_prefix.clone(),
                    after.clone(),
                    LIST_PAGE,
                )
                .await?;
            let full = page.len() == LIST_PAGE;
            if let Some(last) = page.last() {
                after = last.key.clone();
            }
            listed += page.len();
            items.extend(
                page.into_iter()
                    .filter(|o| !skip.contains(&(o.key.clone(), o.etag.clone())))
                    .map(|o| NewItem {
                        key: o.key,
                        size: o.size,
                        etag: o.etag,
                    }),
            );
            if items.len() > MAX_JOB_ITEMS {
                return Err(PlatformError::BadRequest(format!(
                    "more than {MAX_JOB_ITEMS} objects under `{input_bucket}/{input_prefix}`: \
                     split the job by prefix"
                )));
            }
            if !full {
                break;
            }
        }
        if listed == 0 {
            return Err(PlatformError::BadRequest(format!(
                "no objects under `{input_bucket}/{input_prefix}`: check the prefix with \
                 `mayfly objects list {input_bucket} --prefix '{input_prefix}'`"
            )));
        }
        let spec = JobSpec {
            function: function.to_string(),
            input_bucket,
            input_prefix,
            output_bucket: output.as_ref().map(|(b, _)| b.clone()),
            output_prefix: output.map(|(_, p)| p),
            parallelism,
            max_failures,
            max_attempts,
            backoff_ms,
            reduce: request.reduce,
            pipeline: request.pipeline,
        };
        if spec.reduce {
            // One item: the whole listing, read again when it runs.
            items = vec![NewItem {
                key: spec.input_prefix.clone(),
                size: listed as u64,
                etag: String::new(),
            }];
        }
        let id = uuid::Uuid::now_v7().simple().to_string();
        let job = store.create_job(&id, &spec, &items).await?;
        if items.is_empty() {
            // Nothing new (an incremental run): done at once.
            store.set_state(&id, JobState::Succeeded, None).await?;
            return self.get(&id).await;
        }
        self.spawn(id);
        Ok(job)
    }

    /// Whether a function of that name is deployed.
    pub(crate) fn has_function(&self, name: &str) -> bool {
        self.runner.invoker.catalog().by_name.contains_key(name)
    }

    /// Whether a bucket exists (some object was stored in it once).
    pub(crate) async fn has_bucket(&self, bucket: &str) -> Result<bool, PlatformError> {
        let buckets = self.runner.events.object_buckets().await?;
        Ok(buckets.iter().any(|b| b.bucket == bucket))
    }

    /// Waits until job `id` is no longer running, and returns it.
    pub(crate) async fn wait_ended(&self, id: &str) -> Result<Job, PlatformError> {
        loop {
            let ended = self.ended.notified();
            let mut ended = std::pin::pin!(ended);
            // Registered before the read, so an end in between wakes it.
            ended.as_mut().enable();
            let job = self.get(id).await?;
            if job.state != JobState::Running {
                return Ok(job);
            }
            // The store is the truth; the wake-up only saves polling. A
            // job another process settles would not tell this one.
            let _ = tokio::time::timeout(Duration::from_secs(1), ended).await;
        }
    }

    /// A job with its counts.
    pub async fn get(&self, id: &str) -> Result<Job, PlatformError> {
        self.store()?.job(id).await?.ok_or_else(|| missing_job(id))
    }

    /// Jobs, newest first; only a pipeline's if `pipeline` names one.
    pub async fn list(
        &self,
        limit: usize,
        pipeline: Option<&str>,
    ) -> Result<Vec<Job>, PlatformError> {
        let Some(name) = pipeline else {
            return Ok(self.store()?.jobs(limit).await?);
        };
        let mut jobs = self.store()?.jobs(usize::MAX).await?;
        jobs.retain(|job| job.spec.pipeline.as_ref().is_some_and(|p| p.name == name));
        jobs.truncate(limit);
        Ok(jobs)
    }

    /// A job's items, by state.
    pub async fn items(
        &self,
        id: &str,
        state: Option<ItemState>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<JobItem>, PlatformError> {
        self.get(id).await?;
        Ok(self.store()?.items(id, state, after, limit).await?)
    }

    /// A job's item log.
    pub async fn log(
        &self,
        id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, ItemLogEntry)>, PlatformError> {
        self.get(id).await?;
        Ok(self.store()?.item_log(id, after, limit).await?)
    }

    /// Stops a running job: no new item starts, running ones finish.
    pub async fn cancel(&self, id: &str) -> Result<Job, PlatformError> {
        let job = self.get(id).await?;
        if job.state != JobState::Running {
            return Err(PlatformError::Conflict(format!(
                "job {id} is {}, not running: nothing to cancel",
                job.state.as_str()
            )));
        }
        self.store()?
            .set_state(id, JobState::Cancelled, Some("cancelled by a user"))
            .await?;
        if let Some((_, task)) = self.tasks().remove(id) {
            task.cancel();
        }
        self.get(id).await
    }

    /// Runs a job's failed items again (and a cancelled or stopped job's
    /// pending ones).
    pub async fn retry_failed(self: &Arc<Self>, id: &str) -> Result<(Job, u64), PlatformError> {
        let job = self.get(id).await?;
        if job.state == JobState::Running {
            return Err(PlatformError::Conflict(format!(
                "job {id} is still running: retry its failed items once it has finished"
            )));
        }
        if job.items.failed == 0 && job.items.pending == 0 {
            return Err(PlatformError::Conflict(format!(
                "job {id} has no failed or pending items to retry"
            )));
        }
        if !self
            .runner
            .invoker
            .catalog()
            .by_name
            .contains_key(&job.spec.function)
        {
            return Err(PlatformError::NotFound(job.spec.function.clone()));
        }
        let reset = self.store()?.retry_failed(id).await?;
        self.spawn(id.to_string());
        Ok((self.get(id).await?, reset))
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, CancellationToken)>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the task of job `id` unless it runs already.
    fn spawn(self: &Arc<Self>, id: String) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let stop = self.background.child_token();
        let number = self
            .next_task
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut tasks = self.tasks();
            if tasks.get(&id).is_some_and(|(_, t)| !t.is_cancelled()) {
                return;
            }
            tasks.insert(id.clone(), (number, stop.clone()));
        }
        let runner = self.runner.clone();
        let jobs = Arc::downgrade(self);
        tokio::spawn(async move {
            run_job(&runner, &store, &id, &stop).await;
            if let Some(jobs) = jobs.upgrade() {
                {
                    let mut tasks = jobs.tasks();
                    if tasks.get(&id).is_some_and(|(n, _)| *n == number) {
                        tasks.remove(&id);
                    }
                }
                jobs.ended.notify_waiters();
            }
        });
    }
}

/// The (key, ETag) pairs earlier jobs of a pipeline's step finished.
async fn finished_before(
    store: &Arc<dyn JobStore>,
    step: &PipelineStep,
) -> Result<std::collections::HashSet<(String, String)>, PlatformError> {
    let mut finished = std::collections::HashSet::new();
    for job in store.jobs(usize::MAX).await? {
        let same = job
            .spec
            .pipeline
            .as_ref()
            .is_some_and(|p| p.name == step.name && p.step == step.step);
        if !same {
            continue;
        }
        let mut after = 0;
        loop {
            let page = store
                .items(&job.id, Some(ItemState::Done), after, LIST_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            finished.extend(page.into_iter().map(|i| (i.key, i.etag)));
        }
    }
    Ok(finished)
}

/// Every object key under `prefix`.
async fn list_all(
    events: &EventHub,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<String>, PlatformError> {
    let mut keys: Vec<String> = Vec::new();
    loop {
        let after = keys.last().cloned().unwrap_or_default();
        let page = events
            .object_list(bucket, prefix.to_string(), after, LIST_PAGE)
            .await?;
        let full = page.len() == LIST_PAGE;
        keys.extend(page.into_iter().map(|o| o.key));
        if !full {
            return Ok(keys);
        }
    }
}

fn missing_job(id: &str) -> PlatformError {
    PlatformError::Missing(format!("no job `{id}`: see `mayfly job list`"))
}

/// Runs a job until every item ended, it failed too often, or `stop`.
async fn run_job(runner: &Runner, store: &Arc<dyn JobStore>, id: &str, stop: &CancellationToken) {
    let job = match store.job(id).await {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(error) => {
            tracing::error!(job = id, "cannot read the job: {error}");
            return;
        }
    };
    let spec = Arc::new(job.spec.clone());
    let total = job.items.total();
    let (done_tx, mut done) = mpsc::unbounded_channel::<ItemResult>();
    let mut results: Vec<ItemResult> = Vec::new();
    let mut running = 0usize;
    // Why the job ends early, once it must.
    let mut ending: Option<(JobState, String)> = None;
    let mut drained = false;
    let mut recheck_at: Option<tokio::time::Instant> = None;
    // Items in flight allowed now: the node's admission may take fewer
    // than --parallelism (a function's share of the node's slots), and a
    // refusal is a throttled invocation in the ledger. So, like TCP's
    // window, it starts small and grows by one per success until the first
    // refusal (slow start), then shrinks by a quarter at each refusal and
    // grows by one per window's worth of successes.
    let mut window = f64::from(spec.parallelism.clamp(1, 8));
    let mut slow_start = true;
    loop {
        let catalog = runner.invoker.catalog();
        let function = catalog.by_name.get(&spec.function).cloned();
        drop(catalog);
        if function.is_none() && ending.is_none() {
            ending = Some((
                JobState::Failed,
                format!("function `{}` was deleted", spec.function),
            ));
        }
        let stopping = stop.is_cancelled() || ending.is_some();
        if !results.is_empty() {
            match store.settle_items(id, &runner.owner, &results).await {
                Ok(counts) => {
                    results.clear();
                    if ending.is_none()
                        && let Some(max) = spec.max_failures
                        && max.exceeded(counts.failed, total)
                    {
                        ending = Some((
                            JobState::Failed,
                            format!(
                                "stopped: {} of {total} items failed, over --max-failures {max}",
                                counts.failed
                            ),
                        ));
                        continue;
                    }
                    if !stopping && counts.pending == 0 && counts.running == 0 {
                        finish(store, id, &counts).await;
                        return;
                    }
                }
                Err(error) => {
                    tracing::error!(job = id, "cannot record item results: {error}");
                    tokio::time::sleep(ERROR_BACKOFF).await;
                    continue;
                }
            }
        }
        if stopping {
            if running == 0 {
                if let Some((state, error)) = ending
                    && !stop.is_cancelled()
                    && let Err(e) = store.set_state(id, state, Some(&error)).await
                {
                    tracing::error!(job = id, "cannot record the job's end: {e}");
                }
                return;
            }
        } else if let Some(function) = &function {
            let live = &function.live;
            let limit = live
                .deployed
                .scaling
                .max_concurrency
                .map_or(usize::MAX, |m| m as usize);
            let concurrency = (spec.parallelism as usize)
                .min(limit)
                .min(window.ceil() as usize)
                .max(1);
            let free = concurrency.saturating_sub(running);
            let refill =
                free > 0 && !drained && (running == 0 || free >= CLAIM_BATCH.min(concurrency) / 2);
            if refill {
                let lease_ms = live
                    .versions()
                    .map(|v| v.limits.timeout.as_millis() as u64 + v.scaling.queue_timeout_ms)
                    .max()
                    .unwrap_or(0)
                    + LEASE_MARGIN_MS;
                let want = free.min(CLAIM_BATCH);
                match store.claim_items(id, &runner.owner, want, lease_ms).await {
                    Ok(items) => {
                        if items.len() < want {
                            drained = true;
                            recheck_at = next_due(store, id).await;
                        }
                        if items.is_empty() && running == 0 {
                            // Nothing claimable and nothing running: either
                            // finished (settled by someone else or before a
                            // restart), or retries wait for their time.
                            match store.job(id).await {
                                Ok(Some(job)) if job.state != JobState::Running => return,
                                Ok(Some(job))
                                    if job.items.pending == 0 && job.items.running == 0 =>
                                {
                                    finish(store, id, &job.items).await;
                                    return;
                                }
                                _ => {}
                            }
                        }
                        for item in items {
                            running += 1;
                            let done = done_tx.clone();
                            let invoker = runner.invoker.clone();
                            let events = runner.events.clone();
                            let spec = spec.clone();
                            let id = id.to_string();
                            tokio::spawn(async move {
                                let seq = item.seq;
                                let mut report = ItemReport {
                                    done,
                                    seq: Some(seq),
                                };
                                let result = deliver(&invoker, &events, &id, &spec, item).await;
                                report.send(result);
                            });
                        }
                    }
                    Err(error) => {
                        tracing::error!(job = id, "cannot claim job items: {error}");
                        drained = true;
                        recheck_at = Some(tokio::time::Instant::now() + ERROR_BACKOFF);
                    }
                }
            }
        }
        tokio::select! {
            Some(result) = done.recv() => {
                let mut next = Some(result);
                while let Some(result) = next {
                    running -= 1;
                    window = adjust_window(window, &result, spec.parallelism, &mut slow_start);
                    results.push(result);
                    next = done.try_recv().ok();
                }
                drained = false;
            }
            () = sleep_until(recheck_at), if drained && recheck_at.is_some() && !stopping => {
                drained = false;
            }
            () = stop.cancelled(), if !stopping => {}
        }
    }
}

/// The in-flight window after `result` (see `run_job`).
fn adjust_window(window: f64, result: &ItemResult, parallelism: u32, slow_start: &mut bool) -> f64 {
    let max = f64::from(parallelism.max(1));
    match result {
        ItemResult::Postpone { .. } => {
            *slow_start = false;
            (window * 0.75).max(1.0)
        }
        _ if *slow_start => (window + 1.0).min(max),
        _ => (window + 1.0 / window).min(max),
    }
}

/// Records a job's end once no item is pending or running.
async fn finish(store: &Arc<dyn JobStore>, id: &str, counts: &ItemCounts) {
    let (state, error) = if counts.failed == 0 {
        (JobState::Succeeded, None)
    } else {
        (
            JobState::Failed,
            Some(format!(
                "{} items failed: see `mayfly job logs {id}`, then `mayfly job retry-failed {id}`",
                counts.failed
            )),
        )
    };
    if let Err(error) = store.set_state(id, state, error.as_deref()).await {
        tracing::error!(job = id, "cannot record the job's end: {error}");
    }
}

/// When the next pending item is due (at most a minute away), or `None`.
async fn next_due(store: &Arc<dyn JobStore>, id: &str) -> Option<tokio::time::Instant> {
    let now = tokio::time::Instant::now();
    match store.next_due(id).await {
        Ok(None) => Some(now + Duration::from_secs(60)),
        Ok(Some(at)) => {
            let wait = u64::try_from(at - now_ms()).unwrap_or(0);
            Some(now + Duration::from_millis(wait).min(Duration::from_secs(60)))
        }
        Err(_) => Some(now + ERROR_BACKOFF),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Hands an item's result back to the job's task exactly once: a delivery
/// task that ends without one (a panic) postpones the item.
struct ItemReport {
    done: mpsc::UnboundedSender<ItemResult>,
    seq: Option<i64>,
}

impl ItemReport {
    fn send(&mut self, result: ItemResult) {
        self.seq = None;
        let _ = self.done.send(result);
    }
}

impl Drop for ItemReport {
    fn drop(&mut self) {
        if let Some(seq) = self.seq.take() {
            let _ = self.done.send(ItemResult::Postpone {
                seq,
                delay_ms: POSTPONE_MS,
            });
        }
    }
}

/// Runs one attempt of an item and decides what becomes of it.
async fn deliver(
    invoker: &Invoker,
    events: &EventHub,
    job: &str,
    spec: &JobSpec,
    item: JobItem,
) -> ItemResult {
    let seq = item.seq;
    let attempt = item.attempts;
    let catalog = invoker.catalog();
    let Some(function) = catalog.by_name.get(&spec.function).cloned() else {
        return ItemResult::Postpone {
            seq,
            delay_ms: POSTPONE_MS,
        };
    };
    drop(catalog);
    let keys = if spec.reduce {
        match list_all(events, &spec.input_bucket, &spec.input_prefix).await {
            Ok(keys) => Some(keys),
            Err(error) => {
                return ItemResult::Retry {
                    seq,
                    delay_ms: backoff(spec.backoff_ms, attempt),
                    error: format!("cannot list the reduce's objects: {error}"),
                };
            }
        }
    } else {
        None
    };
    let request = match item_request(job, spec, &item, keys) {
        Ok(request) => request,
        Err(error) => {
            return ItemResult::Failed {
                seq,
                error: format!("cannot build the request: {error}"),
            };
        }
    };
    let request_id = crate::invoker::new_request_id();
    let outcome = run_to_completion(
        invoker,
        &function.live,
        request,
        JOB_TRIGGER,
        Some(job_correlation_id(job)),
        request_id.clone(),
    )
    .await;
    match outcome {
        EventOutcome::Delivered => ItemResult::Done { seq, request_id },
        EventOutcome::Throttled | EventOutcome::NotRun(_) => ItemResult::Postpone {
            seq,
            delay_ms: jitter(POSTPONE_MS),
        },
        EventOutcome::Failed(error) if attempt >= spec.max_attempts => {
            ItemResult::Failed { seq, error }
        }
        EventOutcome::Failed(error) => ItemResult::Retry {
            seq,
            delay_ms: backoff(spec.backoff_ms, attempt),
            error,
        },
    }
}

/// An item's CloudEvent in binary content mode: the object's location in
/// the JSON body, its key as the subject.
fn item_request(
    job: &str,
    spec: &JobSpec,
    item: &JobItem,
    keys: Option<Vec<String>>,
) -> Result<http::Request<EventBody>, anyhow::Error> {
    let output_key = spec.output_bucket.as_ref().map(|_| {
        if spec.reduce {
            // A reduce writes one object: the output names its key.
            return spec.output_prefix.clone().unwrap_or_default();
        }
        let rest = item
            .key
            .strip_prefix(spec.input_prefix.as_str())
            .unwrap_or(&item.key);
        format!("{}{rest}", spec.output_prefix.as_deref().unwrap_or(""))
    });
    let body = serde_json::to_vec(&ItemEvent {
        job: job.to_string(),
        bucket: spec.input_bucket.clone(),
        key: item.key.clone(),
        size: item.size,
        etag: item.etag.clone(),
        output_bucket: spec.output_bucket.clone(),
        output_key,
        keys,
    })?;
    let escaped = |text: &str| utf8_percent_encode(text, HEADER_ESCAPES).to_string();
    Ok(http::Request::builder()
        .method(http::Method::POST)
        .uri("/")
        .header(http::header::HOST, "localhost")
        .header("ce-specversion", "1.0")
        // The same id on every attempt, so a function can deduplicate.
        .header("ce-id", format!("{job}-{}", item.seq))
        .header("ce-source", format!("/jobs/{job}"))
        .header("ce-type", JOB_ITEM_EVENT)
        .header("ce-subject", escaped(&item.key))
        .header("ce-time", rfc3339_millis(now_ms()))
        .header("mayfly-attempt", item.attempts.to_string())
        .header("mayfly-job", job)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_split_into_bucket_and_prefix() {
        assert_eq!(
            split_location("input", "data/in/").unwrap(),
            ("data".into(), "in/".into())
        );
        assert_eq!(
            split_location("input", "data").unwrap(),
            ("data".into(), String::new())
        );
        assert!(split_location("input", "/x").is_err());
    }
}
