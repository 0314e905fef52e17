//! Pipelines: chains of batch jobs the node stores and runs.
//!
//! A pipeline (`[pipelines.NAME]` in `mayfly.toml`, stored by `mayfly
//! deploy` through `PUT /v1/pipelines/NAME`) is a list of steps, each a job
//! ([`crate::jobs`]) over the output of the step it comes `after` (the
//! first over the pipeline's `input`). A run starts by hand (`POST
//! /v1/pipelines/NAME/runs`), on the pipeline's `schedule` (the schedule
//! triggers' [`Schedule`] arithmetic), or when objects arrive under its
//! input (`on_objects`). Runs are incremental: a map step leaves out the
//! objects (same key and ETag) that the step's earlier runs finished; a
//! reduce always sees every object.
//!
//! Durability rests on the job store: a run's record holds the definition
//! it started with, and its steps are jobs labelled with the pipeline, run
//! and step. A restarted node resumes every running run: a step whose job
//! exists is waited for (the job itself resumes), the next ones start as
//! they would have. Two runs of a pipeline never overlap: the store starts
//! one only when none is running.
//!
//! Object arrival: every object stored through this node is announced by
//! the event hub (where object triggers are woken); a write under an
//! `on_objects` pipeline's input marks it pending (in the store too, so a
//! restart does not forget it), and a run starts once writes have been
//! quiet for [`QUIET`], or [`MAX_WAIT`] after the first, and no run is
//! under way: a burst of uploads makes one run, or a few.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mayfly_store::{
    Job, JobState, MaxFailures, Pipeline, PipelineRun, PipelineSpec, PipelineStep, PipelineStore,
    RunCause, RunStart, StepSpec,
};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::error::PlatformError;
use crate::events::EventHub;
use crate::jobs::{JobRequest, Jobs, MAX_PARALLELISM, split_location};
use crate::schedule::Schedule;

/// How long object writes must pause before a run starts for them.
pub const QUIET: Duration = Duration::from_millis(500);
/// Longest a run waits for writes to pause once objects arrived.
pub const MAX_WAIT: Duration = Duration::from_secs(10);
/// Longest the watcher sleeps; changes wake it earlier.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Wait before looking again after the store failed.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// A step in the order it runs, with what it reads.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    /// The step.
    pub step: StepSpec,
    /// The step it reads the output of (`None`: the pipeline's input).
    pub parent: Option<String>,
    /// `BUCKET/PREFIX` it reads.
    pub input: String,
}

/// Checks a pipeline's shape (steps named once, `after` naming a step, no
/// cycle, an output on every step another reads, locations, schedule,
/// limits) and returns its steps in dependency order. Functions are
/// checked apart ([`Pipelines::put`]), as they may come and go.
pub fn plan(name: &str, spec: &PipelineSpec) -> Result<Vec<PlannedStep>, PlatformError> {
    let here = format!("pipeline `{name}`");
    let bad = |message: String| PlatformError::BadRequest(format!("{here}: {message}"));
    if spec.input.trim().is_empty() {
        return Err(bad(
            "`input` is empty: give the BUCKET/PREFIX its first step reads".into(),
        ));
    }
    let (in_bucket, in_prefix) =
        split_location("input", &spec.input).map_err(|e| bad(e.to_string()))?;
    if let Some(schedule) = &spec.schedule {
        Schedule::parse(schedule).map_err(|e| bad(format!("`schedule`: {e}")))?;
    }
    if spec.steps.is_empty() {
        return Err(bad(format!(
            "it has no steps: add `[[pipelines.{name}.steps]]` tables"
        )));
    }
    let mut parent: HashMap<&str, Option<&str>> = HashMap::new();
    for (i, step) in spec.steps.iter().enumerate() {
        if step.name.trim().is_empty() || step.function.trim().is_empty() {
            return Err(bad(format!(
                "step {} needs a `name` and a `function`",
                i + 1
            )));
        }
        let after = match &step.after {
            Some(after) => Some(after.as_str()),
            None => i.checked_sub(1).map(|p| spec.steps[p].name.as_str()),
        };
        if parent.insert(step.name.as_str(), after).is_some() {
            return Err(bad(format!(
                "two steps are named `{}`: rename one",
                step.name
            )));
        }
        check_step(step).map_err(|e| bad(format!("step `{}`: {e}", step.name)))?;
        if let Some(output) = &step.output {
            let (bucket, prefix) = split_location("output", output)
                .map_err(|e| bad(format!("step `{}`: {e}", step.name)))?;
            if bucket == in_bucket
                && (prefix.starts_with(&in_prefix) || in_prefix.starts_with(prefix.as_str()))
            {
                return Err(bad(format!(
                    "step `{}` writes to `{output}`, which overlaps the pipeline's input `{}`: \
                     its results would count as new input; write them under another prefix",
                    step.name, spec.input
                )));
            }
        }
    }
    let names = || {
        spec.steps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for step in &spec.steps {
        if let Some(Some(after)) = parent.get(step.name.as_str())
            && !parent.contains_key(after)
        {
            return Err(bad(format!(
                "step `{}` comes after `{after}`, which is not a step of it (steps: {})",
                step.name,
                names()
            )));
        }
    }
    // Each step has one parent: following parents from any step must end
    // at the input, else the steps form a cycle.
    for step in &spec.steps {
        let mut seen = HashSet::new();
        let mut at = step.name.as_str();
        while let Some(Some(next)) = parent.get(at) {
            if !seen.insert(at) {
                let mut cycle: Vec<&str> = seen.into_iter().collect();
                cycle.sort_unstable();
                return Err(bad(format!(
                    "steps {} depend on each other in a cycle: make one of them start from the \
                     input (drop its `after`) or from another step",
                    cycle.join(", ")
                )));
            }
            at = next;
        }
    }
    // Dependency order: a step after its parent; ties in file order.
    let mut order: Vec<PlannedStep> = Vec::new();
    let mut placed: HashSet<&str> = HashSet::new();
    while order.len() < spec.steps.len() {
        let before = order.len();
        for step in &spec.steps {
            if placed.contains(step.name.as_str()) {
                continue;
            }
            let after = parent.get(step.name.as_str()).copied().flatten();
            let input = match after {
                None => spec.input.clone(),
                Some(after) if placed.contains(after) => {
                    let from = spec
                        .steps
                        .iter()
                        .find(|s| s.name == after)
                        .and_then(|s| s.output.clone());
                    let Some(from) = from else {
                        return Err(bad(format!(
                            "step `{}` reads the output of `{after}`, which has no `output`: \
                             give `{after}` one",
                            step.name
                        )));
                    };
                    from
                }
                Some(_) => continue,
            };
            placed.insert(step.name.as_str());
            order.push(PlannedStep {
                step: step.clone(),
                parent: after.map(str::to_string),
                input,
            });
        }
        if order.len() == before {
            return Err(bad(
                "its steps cannot be ordered: check their `after`".into()
            ));
        }
    }
    Ok(order)
}

/// The limits a step's job would refuse, refused when the pipeline is
/// stored rather than when the step starts.
fn check_step(step: &StepSpec) -> Result<(), String> {
    if let Some(p) = step.parallelism
        && !(1..=MAX_PARALLELISM).contains(&p)
    {
        return Err(format!(
            "parallelism {p} is out of range: use 1 to {MAX_PARALLELISM}"
        ));
    }
    if let Some(a) = step.max_attempts
        && !(1..=10).contains(&a)
    {
        return Err(format!("max_attempts {a} is out of range: use 1 to 10"));
    }
    if let Some(m) = &step.max_failures {
        MaxFailures::parse(m)?;
    }
    Ok(())
}

/// A run with the jobs of its steps, in the order they started.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    /// The run.
    #[serde(flatten)]
    pub run: PipelineRun,
    /// Its steps' jobs so far.
    pub jobs: Vec<Job>,
}

/// A pipeline with its latest run.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineView {
    /// The pipeline.
    #[serde(flatten)]
    pub pipeline: Pipeline,
    /// Its latest run, if it ran.
    pub last_run: Option<PipelineRun>,
}

/// The node's pipelines: stores them, starts and drives their runs.
pub struct Pipelines {
    store: Option<Arc<dyn PipelineStore>>,
    jobs: Arc<Jobs>,
    events: Arc<EventHub>,
    clock: Arc<dyn Clock>,
    /// The runs (pipeline, number) a task here drives. By run, not by
    /// pipeline: a run may start while the task of the one before it is
    /// still winding down.
    driving: Mutex<HashSet<(String, u64)>>,
    /// Wakes the watcher: a definition changed or a run ended.
    changed: Notify,
    background: CancellationToken,
}

/// How a run's steps ended.
enum Outcome {
    /// Every step ran (or was skipped: the note says which).
    Succeeded(Option<String>),
    /// A step failed or could not start.
    Failed(String),
    /// The node is stopping: the run resumes when it starts again.
    Stopped,
}

impl Pipelines {
    /// The pipelines over `store` (none: every request is refused, saying
    /// why), their steps run as `jobs`.
    pub(crate) fn new(
        store: Option<Arc<dyn PipelineStore>>,
        jobs: Arc<Jobs>,
        events: Arc<EventHub>,
        clock: Arc<dyn Clock>,
        background: CancellationToken,
    ) -> Self {
        Self {
            store,
            jobs,
            events,
            clock,
            driving: Mutex::new(HashSet::new()),
            changed: Notify::new(),
            background,
        }
    }

    fn store(&self) -> Result<&Arc<dyn PipelineStore>, PlatformError> {
        self.store.as_ref().ok_or_else(|| {
            PlatformError::Conflict(
                "this node's store back-end has no pipeline store: run pipelines on a node with \
                 a local data directory"
                    .into(),
            )
        })
    }

    /// At start (after the jobs resumed): resumes every running run and
    /// starts watching schedules and object writes.
    pub(crate) async fn start(self: &Arc<Self>) -> Result<(), PlatformError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        for run in store.running_runs().await? {
            tracing::info!(pipeline = %run.pipeline, run = run.run, "resuming pipeline run");
            self.drive(run);
        }
        // Subscribed before returning, so no write after start is missed.
        let writes = self.events.object_writes();
        tokio::spawn(self.clone().watch(writes));
        Ok(())
    }

    /// Stores a pipeline after checking it and that its functions are
    /// deployed; returns it, whether it changed, and warnings.
    pub async fn put(
        &self,
        name: &str,
        spec: PipelineSpec,
    ) -> Result<(Pipeline, bool, Vec<String>), PlatformError> {
        crate::validate::check_name("pipeline", name)?;
        plan(name, &spec)?;
        self.check_functions(name, &spec)?;
        let (bucket, prefix) = split_location("input", &spec.input)?;
        let mut warnings = Vec::new();
        if !self.jobs.has_bucket(&bucket).await? {
            warnings.push(format!(
                "pipeline `{name}`: bucket `{bucket}` does not exist yet: runs start once objects \
                 are stored under `{bucket}/{prefix}`"
            ));
        }
        let (pipeline, changed) = self.store()?.put_pipeline(name, &spec).await?;
        self.changed.notify_one();
        Ok((pipeline, changed, warnings))
    }

    fn check_functions(&self, name: &str, spec: &PipelineSpec) -> Result<(), PlatformError> {
        for step in &spec.steps {
            if !self.jobs.has_function(&step.function) {
                return Err(PlatformError::BadRequest(format!(
                    "pipeline `{name}`, step `{}`: function `{}` is not deployed: deploy it \
                     first (`mayfly deploy` deploys a manifest's functions before its pipelines)",
                    step.name, step.function
                )));
            }
        }
        Ok(())
    }

    /// A pipeline with its latest run.
    pub async fn get(&self, name: &str) -> Result<PipelineView, PlatformError> {
        let store = self.store()?;
        let pipeline = store
            .pipeline(name)
            .await?
            .ok_or_else(|| missing_pipeline(name))?;
        let last_run = store.runs(name, 1).await?.into_iter().next();
        Ok(PipelineView { pipeline, last_run })
    }

    /// Every pipeline with its latest run.
    pub async fn list(&self) -> Result<Vec<PipelineView>, PlatformError> {
        let store = self.store()?;
        let mut views = Vec::new();
        for pipeline in store.pipelines().await? {
            let last_run = store.runs(&pipeline.name, 1).await?.into_iter().next();
            views.push(PipelineView { pipeline, last_run });
        }
        Ok(views)
    }

    /// Forgets a pipeline (its runs stay as history); refused while it runs.
    pub async fn delete(&self, name: &str) -> Result<(), PlatformError> {
        let store = self.store()?;
        if let Some(run) = store.runs(name, 1).await?.into_iter().next()
            && run.state == JobState::Running
        {
            return Err(PlatformError::Conflict(format!(
                "pipeline `{name}` is running (run {}): delete it once the run has ended \
                 (`mayfly pipeline status {name}`)",
                run.run
            )));
        }
        if !store.delete_pipeline(name).await? {
            return Err(missing_pipeline(name));
        }
        self.changed.notify_one();
        Ok(())
    }

    /// Starts a run by hand, after checking everything that can be checked
    /// before a step runs: the pipeline, its functions, its input.
    pub async fn run(self: &Arc<Self>, name: &str, full: bool) -> Result<RunView, PlatformError> {
        let store = self.store()?;
        let pipeline = store
            .pipeline(name)
            .await?
            .ok_or_else(|| missing_pipeline(name))?;
        plan(name, &pipeline.spec)?;
        self.check_functions(name, &pipeline.spec)?;
        self.check_input(name, &pipeline.spec).await?;
        match store.start_run(name, RunCause::Manual, full).await? {
            RunStart::Started(run) => {
                self.drive(run.clone());
                Ok(RunView {
                    run,
                    jobs: Vec::new(),
                })
            }
            RunStart::Busy(run) => Err(busy(&run)),
            RunStart::NoPipeline => Err(missing_pipeline(name)),
        }
    }

    /// The input bucket exists and has objects under the prefix.
    async fn check_input(&self, name: &str, spec: &PipelineSpec) -> Result<(), PlatformError> {
        let (bucket, prefix) = split_location("input", &spec.input)?;
        if !self.jobs.has_bucket(&bucket).await? {
            return Err(PlatformError::Missing(format!(
                "pipeline `{name}`: bucket `{bucket}` does not exist (no object was ever stored \
                 in it): check `input` in [pipelines.{name}], or store objects first"
            )));
        }
        let some = self
            .events
            .object_list(&bucket, prefix.clone(), String::new(), 1);
        if some.await?.is_empty() {
            return Err(PlatformError::BadRequest(format!(
                "pipeline `{name}`: no objects under `{bucket}/{prefix}`: check the prefix with \
                 `mayfly objects list {bucket} --prefix '{prefix}'`"
            )));
        }
        Ok(())
    }

    /// A pipeline's runs, newest first, with their jobs.
    pub async fn runs(&self, name: &str, limit: usize) -> Result<Vec<RunView>, PlatformError> {
        let store = self.store()?;
        let runs = store.runs(name, limit).await?;
        if runs.is_empty() && store.pipeline(name).await?.is_none() {
            return Err(missing_pipeline(name));
        }
        let jobs = self.jobs.list(usize::MAX, Some(name)).await?;
        Ok(runs
            .into_iter()
            .map(|run| RunView {
                jobs: jobs_of(&jobs, run.run),
                run,
            })
            .collect())
    }

    /// One run with its jobs.
    pub async fn run_view(&self, name: &str, run: u64) -> Result<RunView, PlatformError> {
        let found = self.store()?.run(name, run).await?.ok_or_else(|| {
            PlatformError::Missing(format!(
                "pipeline `{name}` has no run {run}: see `mayfly pipeline history {name}`"
            ))
        })?;
        let jobs = self.jobs.list(usize::MAX, Some(name)).await?;
        Ok(RunView {
            jobs: jobs_of(&jobs, run),
            run: found,
        })
    }

    fn driving(&self) -> std::sync::MutexGuard<'_, HashSet<(String, u64)>> {
        self.driving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a task here drives a run of `name`.
    fn drives(&self, name: &str) -> bool {
        self.driving().iter().any(|(pipeline, _)| pipeline == name)
    }

    /// Starts the task that runs `run`'s steps, unless one drives it.
    fn drive(self: &Arc<Self>, run: PipelineRun) {
        if !self.driving().insert((run.pipeline.clone(), run.run)) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let name = run.pipeline.clone();
            let outcome = this.steps(&run).await;
            let end = match outcome {
                Outcome::Succeeded(note) => Some((JobState::Succeeded, note)),
                Outcome::Failed(error) => Some((JobState::Failed, Some(error))),
                Outcome::Stopped => None,
            };
            if let (Some((state, note)), Ok(store)) = (end, this.store()) {
                // Retried: a run left running would block the pipeline
                // until the node restarts.
                while let Err(error) = store
                    .finish_run(&name, run.run, state, note.as_deref())
                    .await
                {
                    tracing::error!(pipeline = %name, "cannot record the run's end: {error}");
                    if this.background.is_cancelled() {
                        break;
                    }
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
            }
            this.driving().remove(&(name, run.run));
            this.changed.notify_one();
        });
    }

    /// Runs (or resumes) a run's steps in order.
    async fn steps(&self, run: &PipelineRun) -> Outcome {
        let name = &run.pipeline;
        let order = match plan(name, &run.spec) {
            Ok(order) => order,
            Err(error) => return Outcome::Failed(error.to_string()),
        };
        let mut skipped: Vec<String> = Vec::new();
        for planned in order {
            let step = &planned.step;
            if planned.parent.as_ref().is_some_and(|p| skipped.contains(p)) {
                skipped.push(step.name.clone());
                continue;
            }
            // A job of this run and step exists if the node stopped after
            // starting it: wait for it rather than start another.
            let existing = match self.jobs.list(usize::MAX, Some(name)).await {
                Ok(jobs) => jobs.into_iter().find(|job| {
                    job.spec
                        .pipeline
                        .as_ref()
                        .is_some_and(|p| p.run == run.run && p.step == step.name)
                }),
                Err(error) => return Outcome::Failed(format!("cannot read its jobs: {error}")),
            };
            let job = match existing {
                Some(job) => job,
                None => {
                    if self.background.is_cancelled() {
                        return Outcome::Stopped;
                    }
                    let request = JobRequest {
                        function: step.function.clone(),
                        input: planned.input.clone(),
                        output: step.output.clone(),
                        parallelism: step.parallelism,
                        max_failures: step.max_failures.clone(),
                        max_attempts: step.max_attempts,
                        backoff_ms: None,
                        reduce: step.reduce,
                        pipeline: Some(PipelineStep {
                            name: name.clone(),
                            run: run.run,
                            step: step.name.clone(),
                        }),
                        incremental: !run.full,
                    };
                    match self.jobs.create(request).await {
                        Ok(job) => job,
                        Err(error) => {
                            return Outcome::Failed(format!(
                                "step `{}` could not start: {error}",
                                step.name
                            ));
                        }
                    }
                }
            };
            let ended = tokio::select! {
                ended = self.jobs.wait_ended(&job.id) => ended,
                () = self.background.cancelled() => return Outcome::Stopped,
            };
            let job = match ended {
                Ok(job) => job,
                Err(error) => {
                    return Outcome::Failed(format!("step `{}`: {error}", step.name));
                }
            };
            if job.state != JobState::Succeeded {
                return Outcome::Failed(format!(
                    "step `{}` (job {}) {}: {}",
                    step.name,
                    job.id,
                    job.state.as_str(),
                    job.error.as_deref().unwrap_or("see `mayfly job status`")
                ));
            }
            // A run the schedule or new objects started, whose map step
            // found nothing new, has nothing to pass on.
            if !step.reduce && job.items.total() == 0 && run.cause != RunCause::Manual {
                skipped.push(step.name.clone());
            }
        }
        if skipped.is_empty() {
            Outcome::Succeeded(None)
        } else {
            Outcome::Succeeded(Some(format!(
                "nothing new to process: skipped {}",
                skipped.join(", ")
            )))
        }
    }

    /// Starts a run the schedule or new objects asked for; `false` if one
    /// is running (then a later run picks the objects up).
    async fn start_by_itself(self: &Arc<Self>, pipeline: &Pipeline, cause: RunCause) -> bool {
        let name = &pipeline.name;
        let Ok(store) = self.store() else {
            return true;
        };
        // Nothing to run over: no run, rather than one failed run per slot.
        if let Err(error) = self.check_input(name, &pipeline.spec).await {
            tracing::debug!(pipeline = %name, "no {} run: {error}", cause.as_str());
            return true;
        }
        match store.start_run(name, cause, false).await {
            Ok(RunStart::Started(run)) => {
                tracing::info!(pipeline = %name, run = run.run, cause = cause.as_str(), "pipeline run started");
                self.drive(run);
                true
            }
            Ok(RunStart::Busy(_)) => false,
            Ok(RunStart::NoPipeline) => true,
            Err(error) => {
                tracing::error!(pipeline = %name, "cannot start a run: {error}");
                false
            }
        }
    }

    /// Fires schedules and starts runs for arrived objects until the node
    /// stops.
    async fn watch(
        self: Arc<Self>,
        mut writes: tokio::sync::broadcast::Receiver<crate::events::ObjectWrite>,
    ) {
        let Ok(store) = self.store().cloned() else {
            return;
        };
        // Parsed once per expression rather than on every pass.
        let mut parsed: HashMap<String, Option<Schedule>> = HashMap::new();
        // Pipelines with objects waiting for a run: (first, last) write.
        let mut pending: HashMap<String, (i64, i64)> = HashMap::new();
        let mut pipelines: Vec<Pipeline> = Vec::new();
        let mut reload = true;
        // The store's pending marks matter once: they are what a previous
        // run of the node had noted and not yet run.
        let mut first = true;
        loop {
            if reload {
                match store.pipelines().await {
                    Ok(all) => {
                        for p in all.iter().filter(|_| first) {
                            if let Some(since) = p.pending_since_ms {
                                pending.insert(p.name.clone(), (since, since));
                            }
                        }
                        first = false;
                        pipelines = all;
                        reload = false;
                    }
                    Err(error) => {
                        tracing::error!("cannot read the pipelines: {error}");
                        tokio::select! {
                            () = tokio::time::sleep(ERROR_BACKOFF) => continue,
                            () = self.background.cancelled() => return,
                        }
                    }
                }
            }
            let now = self.clock.now_ms();
            let mut next_wake = now.saturating_add(MAX_SLEEP.as_millis() as i64);
            for pipeline in &pipelines {
                let Some(text) = &pipeline.spec.schedule else {
                    continue;
                };
                let Some(schedule) = parsed
                    .entry(text.clone())
                    .or_insert_with(|| Schedule::parse(text).ok())
                else {
                    continue;
                };
                let anchor = pipeline.updated_ms;
                let mut last = pipeline.last_slot_ms.unwrap_or(anchor);
                if let Some(slot) = schedule.due(anchor, last, now) {
                    reload = true;
                    match store
                        .fire_slot(&pipeline.name, pipeline.last_slot_ms, slot)
                        .await
                    {
                        Ok(true) => {
                            last = slot;
                            if !self.start_by_itself(pipeline, RunCause::Schedule).await {
                                tracing::info!(
                                    pipeline = %pipeline.name,
                                    "schedule slot skipped: the previous run is still running"
                                );
                            }
                        }
                        Ok(false) => {}
                        Err(error) => {
                            tracing::error!(pipeline = %pipeline.name, "cannot fire schedule: {error}");
                            // Not at once again: the reload below would.
                            tokio::time::sleep(ERROR_BACKOFF).await;
                        }
                    }
                }
                if let Some(next) = schedule.next_after(anchor, last) {
                    next_wake = next_wake.min(next.max(now + ERROR_BACKOFF.as_millis() as i64));
                }
            }
            let quiet = QUIET.as_millis() as i64;
            let max_wait = MAX_WAIT.as_millis() as i64;
            let mut started = Vec::new();
            for (name, (first, last)) in &pending {
                let Some(pipeline) = pipelines
                    .iter()
                    .find(|p| &p.name == name && p.spec.on_objects)
                else {
                    started.push(name.clone());
                    continue;
                };
                if self.drives(name) {
                    // Its run's end wakes this loop.
                    continue;
                }
                let due = (last + quiet).min(first + max_wait);
                if now >= due {
                    if self.start_by_itself(pipeline, RunCause::Objects).await {
                        started.push(name.clone());
                    } else {
                        next_wake = next_wake.min(now + ERROR_BACKOFF.as_millis() as i64);
                    }
                } else {
                    next_wake = next_wake.min(due);
                }
            }
            for name in started {
                pending.remove(&name);
            }
            if reload {
                continue;
            }
            tokio::select! {
                write = writes.recv() => {
                    // `now` may be from before a long sleep.
                    let now = self.clock.now_ms();
                    let mut next = Some(write);
                    while let Some(write) = next {
                        match write {
                            Ok(write) => {
                                for p in pipelines.iter().filter(|p| p.spec.on_objects) {
                                    let under = split_location("input", &p.spec.input)
                                        .is_ok_and(|(b, prefix)| {
                                            b == write.bucket && write.key.starts_with(&prefix)
                                        });
                                    if under {
                                        note_pending(&store, &mut pending, &p.name, now).await;
                                    }
                                }
                            }
                            // Some writes went unseen: any prefix may have new objects.
                            Err(RecvError::Lagged(_)) => {
                                for p in pipelines.iter().filter(|p| p.spec.on_objects) {
                                    note_pending(&store, &mut pending, &p.name, now).await;
                                }
                            }
                            Err(RecvError::Closed) => return,
                        }
                        next = match writes.try_recv() {
                            Ok(write) => Some(Ok(write)),
                            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                                Some(Err(RecvError::Lagged(n)))
                            }
                            Err(_) => None,
                        };
                    }
                }
                () = self.clock.sleep_until(next_wake) => {}
                () = self.changed.notified() => reload = true,
                () = self.background.cancelled() => return,
            }
        }
    }
}

/// Marks a pipeline as having new objects: in memory (the last write's
/// time, for the pause) and, on the first, in the store (so a restart
/// remembers it).
async fn note_pending(
    store: &Arc<dyn PipelineStore>,
    pending: &mut HashMap<String, (i64, i64)>,
    name: &str,
    now: i64,
) {
    match pending.get_mut(name) {
        Some((_, last)) => *last = now,
        None => {
            pending.insert(name.to_string(), (now, now));
            if let Err(error) = store.mark_pending(name, now).await {
                tracing::error!(pipeline = name, "cannot note new objects: {error}");
            }
        }
    }
}

/// The jobs of run `run`, oldest first.
fn jobs_of(jobs: &[Job], run: u64) -> Vec<Job> {
    let mut of: Vec<Job> = jobs
        .iter()
        .filter(|job| job.spec.pipeline.as_ref().is_some_and(|p| p.run == run))
        .cloned()
        .collect();
    of.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    of
}

fn missing_pipeline(name: &str) -> PlatformError {
    PlatformError::Missing(format!(
        "no pipeline `{name}`: describe it in a `[pipelines.{name}]` table of mayfly.toml and \
         `mayfly deploy`; `mayfly pipeline list` shows the node's pipelines"
    ))
}

fn busy(run: &PipelineRun) -> PlatformError {
    PlatformError::Conflict(format!(
        "pipeline `{}` is already running (run {}, started by {}): runs of a pipeline never \
         overlap; wait for it with `mayfly pipeline status {}`",
        run.pipeline,
        run.run,
        run.cause.as_str(),
        run.pipeline
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_steps: serde_json::Value) -> PipelineSpec {
        serde_json::from_value(serde_json::json!({"input": "raw/in/", "steps": toml_steps}))
            .unwrap()
    }

    #[test]
    fn steps_run_in_dependency_order_over_their_parents_output() {
        let order = plan(
            "p",
            &spec(serde_json::json!([
                {"name": "parse", "function": "f", "output": "w/parsed/"},
                {"name": "report", "function": "r", "after": "sum"},
                {"name": "sum", "function": "s", "after": "parse", "reduce": true, "output": "w/total"},
            ])),
        )
        .unwrap();
        let order: Vec<(&str, &str)> = order
            .iter()
            .map(|s| (s.step.name.as_str(), s.input.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("parse", "raw/in/"),
                ("sum", "w/parsed/"),
                ("report", "w/total")
            ]
        );
        // `report` first in the file, after `sum`; `parse` second follows
        // `report` by default: a cycle.
        let cycle = plan(
            "p",
            &spec(serde_json::json!([
                {"name": "report", "function": "r", "after": "sum", "output": "w/r/"},
                {"name": "parse", "function": "f", "output": "w/parsed/"},
                {"name": "sum", "function": "s", "after": "parse", "output": "w/total"},
            ])),
        );
        assert!(cycle.unwrap_err().to_string().contains("cycle"));
    }

    #[test]
    fn bad_definitions_are_refused() {
        let refused = |steps: serde_json::Value, wanted: &str| {
            let error = plan("p", &spec(steps)).unwrap_err().to_string();
            assert!(error.contains(wanted), "{error}");
        };
        refused(
            serde_json::json!([{"name": "a", "function": "f", "after": "nope"}]),
            "`nope`, which is not a step",
        );
        refused(
            serde_json::json!([
                {"name": "a", "function": "f", "output": "x/a/"},
                {"name": "a", "function": "g"},
            ]),
            "two steps",
        );
        refused(
            serde_json::json!([{"name": "a", "function": "f"}, {"name": "b", "function": "g"}]),
            "has no `output`",
        );
        refused(
            serde_json::json!([{"name": "a", "function": "f", "output": "raw/in/out/"}]),
            "overlaps the pipeline's input",
        );
        refused(
            serde_json::json!([{"name": "a", "function": "f", "max_failures": "lots"}]),
            "not a count",
        );
        refused(serde_json::json!([]), "no steps");
        let mut bad_cron = spec(serde_json::json!([{"name": "a", "function": "f"}]));
        bad_cron.schedule = Some("61 * * * *".into());
        let error = plan("p", &bad_cron).unwrap_err().to_string();
        assert!(error.contains("not a valid minute"), "{error}");
        let mut empty = spec(serde_json::json!([{"name": "a", "function": "f"}]));
        empty.input = " ".into();
        let error = plan("p", &empty).unwrap_err().to_string();
        assert!(error.contains("`input` is empty"), "{error}");
    }
}
