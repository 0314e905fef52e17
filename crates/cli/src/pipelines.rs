//! `mayfly pipeline …`: chains of batch jobs described in `mayfly.toml`.
//!
//! ```toml
//! [pipelines.sales]
//! input = "raw/sales/"                  # BUCKET/PREFIX of the first step
//! [[pipelines.sales.steps]]
//! name = "parse"                        # a map step: one item per object
//! function = "parse"
//! output = "work/parsed/"
//! [[pipelines.sales.steps]]
//! name = "aggregate"
//! function = "aggregate"
//! reduce = true                         # one item listing every object
//! output = "work/totals.csv"            # a reduce's output is one key
//! [[pipelines.sales.steps]]
//! name = "report"
//! function = "report"
//! after = "aggregate"                   # default: the step before
//! output = "reports/sales/"
//! ```
//!
//! Each step is a job over the output of the step it comes `after` (the
//! first over the pipeline's `input`), run in dependency order, each once
//! the one before it has succeeded. Runs are incremental: a map step leaves
//! out the objects (same key and ETag) that its earlier runs finished, so
//! re-running after new objects arrive processes only those; a reduce
//! always sees every object. The node keeps each step's job labelled with
//! the pipeline, run and step, which `status` and `history` read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::{AdminClient, query, segment};
use crate::output::{Table, text, time};

/// `mayfly pipeline …`.
#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Run a pipeline of ./mayfly.toml: each step as a job, in order,
    /// processing only the objects new since its last run.
    Run {
        /// The pipeline (`[pipelines.NAME]`).
        name: String,
        /// The manifest to read.
        #[arg(long, default_value = crate::manifest::DEFAULT_PATH)]
        manifest: PathBuf,
        /// Process every object again, not only the new ones.
        #[arg(long)]
        full: bool,
    },
    /// Show the steps of a pipeline's latest run.
    Status {
        /// The pipeline.
        name: String,
    },
    /// List a pipeline's runs, newest first.
    History {
        /// The pipeline.
        name: String,
    },
}

/// The manifest as far as pipelines go (functions are `manifest.rs`'s).
#[derive(Debug, Deserialize)]
struct File {
    #[serde(default)]
    pipelines: BTreeMap<String, PipelineEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineEntry {
    input: String,
    #[serde(default)]
    steps: Vec<StepEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepEntry {
    name: String,
    function: String,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    reduce: bool,
    #[serde(default)]
    parallelism: Option<u32>,
    #[serde(default)]
    max_failures: Option<String>,
    #[serde(default)]
    max_attempts: Option<u32>,
}

/// A checked pipeline: its steps in the order they run, each with its
/// input location.
#[derive(Debug)]
struct Plan {
    steps: Vec<(StepEntry, String)>,
}

/// Reads `[pipelines.NAME]` from `path` and checks it: steps named once,
/// `after` naming a step, no cycle, an output on every step another reads.
fn plan(path: &Path, name: &str) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the manifest {}", path.display()))?;
    let file: File = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message().trim_end()))?;
    let Some(pipeline) = file.pipelines.get(name) else {
        let known: Vec<&str> = file.pipelines.keys().map(String::as_str).collect();
        bail!(
            "{}: no pipeline `{name}` (it has {}): describe it in a `[pipelines.{name}]` table",
            path.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    check(name, pipeline)
}

fn check(name: &str, pipeline: &PipelineEntry) -> anyhow::Result<Plan> {
    let here = format!("pipeline `{name}`");
    if pipeline.steps.is_empty() {
        bail!("{here} has no steps: add `[[pipelines.{name}.steps]]` tables");
    }
    if !pipeline.input.contains('/') && pipeline.input.is_empty() {
        bail!("{here}: `input` must be BUCKET/PREFIX");
    }
    let mut parent: HashMap<&str, Option<&str>> = HashMap::new();
    for (i, step) in pipeline.steps.iter().enumerate() {
        if step.name.is_empty() || step.function.is_empty() {
            bail!("{here}: step {} needs a `name` and a `function`", i + 1);
        }
        let after = match &step.after {
            Some(after) => Some(after.as_str()),
            None => i.checked_sub(1).map(|p| pipeline.steps[p].name.as_str()),
        };
        if parent.insert(step.name.as_str(), after).is_some() {
            bail!("{here}: two steps are named `{}`: rename one", step.name);
        }
    }
    for step in &pipeline.steps {
        if let Some(Some(after)) = parent.get(step.name.as_str())
            && !parent.contains_key(after)
        {
            bail!(
                "{here}: step `{}` comes after `{after}`, which is not a step of it (steps: {})",
                step.name,
                pipeline
                    .steps
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    // Each step has one parent: following parents from any step must end at
    // the input, else the steps form a cycle.
    for step in &pipeline.steps {
        let mut seen = HashSet::new();
        let mut at = step.name.as_str();
        while let Some(Some(next)) = parent.get(at) {
            if !seen.insert(at) {
                let mut cycle: Vec<&str> = seen.into_iter().collect();
                cycle.sort_unstable();
                bail!(
                    "{here}: steps {} depend on each other in a cycle: make one of them start \
                     from the input (drop its `after`) or from another step",
                    cycle.join(", ")
                );
            }
            at = next;
        }
    }
    // Dependency order: a step after its parent; ties in file order.
    let mut order: Vec<(StepEntry, String)> = Vec::new();
    let mut placed: HashSet<&str> = HashSet::new();
    while order.len() < pipeline.steps.len() {
        let before = order.len();
        for step in &pipeline.steps {
            if placed.contains(step.name.as_str()) {
                continue;
            }
            let input = match parent.get(step.name.as_str()).copied().flatten() {
                None => Some(pipeline.input.clone()),
                Some(after) if placed.contains(after) => {
                    let from = pipeline
                        .steps
                        .iter()
                        .find(|s| s.name == after)
                        .and_then(|s| s.output.clone());
                    let Some(from) = from else {
                        bail!(
                            "{here}: step `{}` reads the output of `{after}`, which has no \
                             `output`: give `{after}` one",
                            step.name
                        );
                    };
                    Some(from)
                }
                Some(_) => None,
            };
            if let Some(input) = input {
                placed.insert(step.name.as_str());
                order.push((step.clone(), input));
            }
        }
        if order.len() == before {
            bail!("{here}: its steps cannot be ordered: check their `after`");
        }
    }
    Ok(Plan { steps: order })
}

/// Runs a `mayfly pipeline` verb.
pub fn run(client: &AdminClient, json: bool, command: PipelineCommand) -> anyhow::Result<()> {
    match command {
        PipelineCommand::Run {
            name,
            manifest,
            full,
        } => run_pipeline(client, json, &name, &manifest, full),
        PipelineCommand::Status { name } => status(client, json, &name),
        PipelineCommand::History { name } => history(client, json, &name),
    }
}

fn pipeline_jobs(client: &AdminClient, name: &str) -> anyhow::Result<Vec<Value>> {
    client.get_json(&format!(
        "/v1/jobs{}",
        query(&[
            ("pipeline", Some(name.to_string())),
            ("limit", Some("10000".into()))
        ])
    ))
}

fn run_pipeline(
    client: &AdminClient,
    json: bool,
    name: &str,
    manifest: &Path,
    full: bool,
) -> anyhow::Result<()> {
    let plan = plan(manifest, name)?;
    // Everything that can be checked is, before the first step starts.
    for (step, _) in &plan.steps {
        let path = format!("/v1/functions/{}", segment(&step.function));
        client.get_json::<Value>(&path).with_context(|| {
            format!(
                "pipeline `{name}`, step `{}`: function `{}` is not deployed",
                step.name, step.function
            )
        })?;
    }
    let run = pipeline_jobs(client, name)?
        .iter()
        .filter_map(|job| job["spec"]["pipeline"]["run"].as_u64())
        .max()
        .unwrap_or(0)
        + 1;
    let mut results = Vec::new();
    for (step, input) in &plan.steps {
        let body = json!({
            "function": step.function,
            "input": input,
            "output": step.output,
            "reduce": step.reduce,
            "parallelism": step.parallelism,
            "max_failures": step.max_failures,
            "max_attempts": step.max_attempts,
            "pipeline": {"name": name, "run": run, "step": step.name},
            "incremental": !full,
        });
        let job: Value = client.post_json("/v1/jobs", &body).with_context(|| {
            format!(
                "pipeline `{name}` run {run}: step `{}` cannot start",
                step.name
            )
        })?;
        let id = text(&job["id"]);
        if !json {
            eprintln!(
                "pipeline {name} run {run}: step {} ({}) over {} objects: job {id}",
                step.name,
                step.function,
                job["items"]["pending"].as_u64().unwrap_or(0)
                    + job["items"]["done"].as_u64().unwrap_or(0)
            );
        }
        crate::jobs::wait_quietly(client, &id).with_context(|| {
            format!(
                "pipeline `{name}` run {run} stopped at step `{}`",
                step.name
            )
        })?;
        let job: Value = client.get_json(&format!("/v1/jobs/{}", segment(&id)))?;
        results.push(job);
    }
    if json {
        println!("{}", json!({"pipeline": name, "run": run, "jobs": results}));
    } else {
        println!("pipeline {name} run {run} succeeded");
        print_steps(&results);
    }
    Ok(())
}

fn print_steps(jobs: &[Value]) {
    let mut table = Table::new([
        "STEP", "FUNCTION", "JOB", "STATE", "DONE", "FAILED", "ITEMS",
    ])
    .right(&["DONE", "FAILED", "ITEMS"]);
    for job in jobs {
        let items = &job["items"];
        let total: u64 = ["pending", "running", "done", "failed"]
            .iter()
            .map(|s| items[s].as_u64().unwrap_or(0))
            .sum();
        table.row([
            text(&job["spec"]["pipeline"]["step"]),
            text(&job["spec"]["function"]),
            text(&job["id"]),
            text(&job["state"]),
            text(&items["done"]),
            text(&items["failed"]),
            total.to_string(),
        ]);
    }
    table.print();
}

/// The jobs of each run, runs newest first, steps in the order they ran.
fn runs(jobs: Vec<Value>) -> Vec<(u64, Vec<Value>)> {
    let mut runs: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
    for job in jobs {
        if let Some(run) = job["spec"]["pipeline"]["run"].as_u64() {
            runs.entry(run).or_default().push(job);
        }
    }
    runs.into_iter()
        .rev()
        .map(|(run, mut jobs)| {
            jobs.sort_by_key(|job| job["created_ms"].as_i64().unwrap_or(0));
            (run, jobs)
        })
        .collect()
}

fn status(client: &AdminClient, json: bool, name: &str) -> anyhow::Result<()> {
    let Some((run, jobs)) = runs(pipeline_jobs(client, name)?).into_iter().next() else {
        bail!(
            "pipeline `{name}` has not run on this node: start it with `mayfly pipeline run {name}`"
        );
    };
    if json {
        println!("{}", json!({"pipeline": name, "run": run, "jobs": jobs}));
    } else {
        println!("pipeline {name} run {run}: {}", run_state(&jobs));
        print_steps(&jobs);
    }
    Ok(())
}

/// A run's state: the first step that did not succeed decides.
fn run_state(jobs: &[Value]) -> String {
    jobs.iter()
        .map(|job| text(&job["state"]))
        .find(|state| state != "succeeded")
        .unwrap_or_else(|| "succeeded".into())
}

fn history(client: &AdminClient, json: bool, name: &str) -> anyhow::Result<()> {
    let runs = runs(pipeline_jobs(client, name)?);
    if json {
        let runs: Vec<Value> = runs
            .iter()
            .map(|(run, jobs)| json!({"run": run, "state": run_state(jobs), "jobs": jobs}))
            .collect();
        println!("{}", Value::from(runs));
        return Ok(());
    }
    if runs.is_empty() {
        println!("pipeline {name} has not run on this node");
        return Ok(());
    }
    let mut table = Table::new(["RUN", "STARTED", "STATE", "STEPS", "ITEMS DONE", "FAILED"])
        .right(&["RUN", "STEPS", "ITEMS DONE", "FAILED"]);
    for (run, jobs) in &runs {
        let sum = |field: &str| -> u64 {
            jobs.iter()
                .map(|job| job["items"][field].as_u64().unwrap_or(0))
                .sum()
        };
        table.row([
            run.to_string(),
            time(&jobs[0]["created_ms"]),
            run_state(jobs),
            jobs.len().to_string(),
            sum("done").to_string(),
            sum("failed").to_string(),
        ]);
    }
    table.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Plan> {
        let file: File = toml::from_str(text).unwrap();
        check("p", &file.pipelines["p"])
    }

    #[test]
    fn steps_run_in_dependency_order_over_their_parents_output() {
        let plan = parse(
            r#"
            [pipelines.p]
            input = "raw/in/"
            [[pipelines.p.steps]]
            name = "report"
            function = "r"
            after = "sum"
            [[pipelines.p.steps]]
            name = "parse"
            function = "f"
            output = "w/parsed/"
            [[pipelines.p.steps]]
            name = "sum"
            function = "s"
            after = "parse"
            reduce = true
            output = "w/total"
            "#,
        );
        // `report` is first in the file but after `sum`; `parse`, second,
        // would follow `report` by default: it says nothing, so it does.
        assert!(plan.unwrap_err().to_string().contains("cycle"));
        let plan = parse(
            r#"
            [pipelines.p]
            input = "raw/in/"
            [[pipelines.p.steps]]
            name = "parse"
            function = "f"
            output = "w/parsed/"
            [[pipelines.p.steps]]
            name = "report"
            function = "r"
            after = "sum"
            [[pipelines.p.steps]]
            name = "sum"
            function = "s"
            after = "parse"
            reduce = true
            output = "w/total"
            "#,
        )
        .unwrap();
        let order: Vec<(&str, &str)> = plan
            .steps
            .iter()
            .map(|(s, input)| (s.name.as_str(), input.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("parse", "raw/in/"),
                ("sum", "w/parsed/"),
                ("report", "w/total")
            ]
        );
    }

    #[test]
    fn bad_definitions_are_refused() {
        let unknown = parse(
            r#"
            [pipelines.p]
            input = "raw/in/"
            [[pipelines.p.steps]]
            name = "a"
            function = "f"
            after = "nope"
            "#,
        );
        assert!(
            unknown
                .unwrap_err()
                .to_string()
                .contains("`nope`, which is not a step")
        );
        let cycle = parse(
            r#"
            [pipelines.p]
            input = "raw/in/"
            [[pipelines.p.steps]]
            name = "a"
            function = "f"
            after = "b"
            output = "x/a/"
            [[pipelines.p.steps]]
            name = "b"
            function = "f"
            after = "a"
            output = "x/b/"
            "#,
        );
        assert!(cycle.unwrap_err().to_string().contains("cycle"));
        let twice = parse(
            r#"
            [pipelines.p]
            input = "raw/in/"
            [[pipelines.p.steps]]
            name = "a"
            function = "f"
            output = "x/a/"
            [[pipelines.p.steps]]
            name = "a"
            function = "g"
            "#,
        );
        assert!(twice.unwrap_err().to_string().contains("two steps"));
        let no_output = parse(
            r#"
            [pipelines.p]
            input = "raw/in/"
            [[pipelines.p.steps]]
            name = "a"
            function = "f"
            [[pipelines.p.steps]]
            name = "b"
            function = "g"
            "#,
        );
        assert!(
            no_output
                .unwrap_err()
                .to_string()
                .contains("has no `output`")
        );
    }
}
