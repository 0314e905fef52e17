//! `mayfly pipeline …`: the node's pipelines, chains of batch jobs
//! described in `mayfly.toml` and stored on the node by `mayfly deploy`.
//!
//! ```toml
//! [pipelines.sales]
//! input = "raw/sales/"                  # BUCKET/PREFIX of the first step
//! on_objects = true                     # run when objects arrive there
//! schedule = "0 * * * *"                # and/or on a schedule
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
//! The node checks a pipeline when it is stored and runs it (see the
//! platform's `pipelines.rs`): each step a job over the output of the step
//! it comes `after`, incremental (a map step leaves out the objects its
//! earlier runs finished). These verbs start runs and read them through
//! `/v1/pipelines`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::{AdminClient, query, segment};
use crate::output::{Table, text, time};

/// How often `pipeline run` looks at its run.
const POLL: Duration = Duration::from_millis(200);

/// `mayfly pipeline …`.
#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Start a run of a pipeline the node has (`mayfly deploy` stores a
    /// manifest's `[pipelines.NAME]`): each step as a job, in order,
    /// processing only the objects new since its last run; waits for it.
    Run {
        /// The pipeline.
        name: String,
        /// Process every object again, not only the new ones.
        #[arg(long)]
        full: bool,
        /// Print the run's number and return at once.
        #[arg(long)]
        detach: bool,
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
        /// Most runs to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// List the node's pipelines.
    List,
    /// Forget a pipeline (its runs stay in its history).
    Delete {
        /// The pipeline.
        name: String,
    },
}

/// Runs a `mayfly pipeline` verb.
pub fn run(client: &AdminClient, json: bool, command: PipelineCommand) -> anyhow::Result<()> {
    match command {
        PipelineCommand::Run { name, full, detach } => {
            run_pipeline(client, json, &name, full, detach)
        }
        PipelineCommand::Status { name } => status(client, json, &name),
        PipelineCommand::History { name, limit } => history(client, json, &name, limit),
        PipelineCommand::List => list(client, json),
        PipelineCommand::Delete { name } => {
            client.delete(&format!("/v1/pipelines/{}", segment(&name)))?;
            if !json {
                println!("pipeline {name} deleted");
            }
            Ok(())
        }
    }
}

fn run_path(name: &str, run: &Value) -> String {
    format!("/v1/pipelines/{}/runs/{}", segment(name), text(run))
}

fn run_pipeline(
    client: &AdminClient,
    json: bool,
    name: &str,
    full: bool,
    detach: bool,
) -> anyhow::Result<()> {
    let started: Value = client.post_json(
        &format!("/v1/pipelines/{}/runs", segment(name)),
        &json!({"full": full}),
    )?;
    let number = started["run"].clone();
    if detach {
        if json {
            println!("{started}");
        } else {
            println!("{}", text(&number));
        }
        return Ok(());
    }
    // Each step's line once its job exists.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let run = loop {
        let run: Value = client.get_json(&run_path(name, &number))?;
        for job in run["jobs"].as_array().into_iter().flatten() {
            let id = text(&job["id"]);
            if !json && seen.insert(id.clone()) {
                eprintln!(
                    "pipeline {name} run {}: step {} ({}) over {} objects: job {id}",
                    text(&number),
                    text(&job["spec"]["pipeline"]["step"]),
                    text(&job["spec"]["function"]),
                    total(job)
                );
            }
        }
        if run["state"] != "running" {
            break run;
        }
        std::thread::sleep(POLL);
    };
    if json {
        println!("{run}");
    } else {
        println!(
            "pipeline {name} run {} {}",
            text(&number),
            text(&run["state"])
        );
        print_steps(&run);
    }
    if run["state"] != "succeeded" {
        bail!(
            "pipeline `{name}` run {} {}: {}",
            text(&number),
            text(&run["state"]),
            text(&run["error"])
        );
    }
    Ok(())
}

fn total(job: &Value) -> u64 {
    ["pending", "running", "done", "failed"]
        .iter()
        .map(|s| job["items"][s].as_u64().unwrap_or(0))
        .sum()
}

fn print_steps(run: &Value) {
    let mut table = Table::new([
        "STEP", "FUNCTION", "JOB", "STATE", "DONE", "FAILED", "ITEMS",
    ])
    .right(&["DONE", "FAILED", "ITEMS"]);
    for job in run["jobs"].as_array().into_iter().flatten() {
        let items = &job["items"];
        table.row([
            text(&job["spec"]["pipeline"]["step"]),
            text(&job["spec"]["function"]),
            text(&job["id"]),
            text(&job["state"]),
            text(&items["done"]),
            text(&items["failed"]),
            total(job).to_string(),
        ]);
    }
    table.print();
    if let Some(note) = run["error"].as_str() {
        println!("{note}");
    }
}

/// How a pipeline starts besides by hand.
fn starts(spec: &Value) -> String {
    let mut starts = vec!["by hand".to_string()];
    if let Some(schedule) = spec["schedule"].as_str() {
        starts.push(format!("schedule {schedule}"));
    }
    if spec["on_objects"] == true {
        starts.push(format!("objects under {}", text(&spec["input"])));
    }
    starts.join(", ")
}

fn status(client: &AdminClient, json: bool, name: &str) -> anyhow::Result<()> {
    let pipeline: Value = client.get_json(&format!("/v1/pipelines/{}", segment(name)))?;
    let Some(last) = pipeline["last_run"].as_object() else {
        if json {
            println!("{pipeline}");
            return Ok(());
        }
        bail!(
            "pipeline `{name}` has not run yet: start it with `mayfly pipeline run {name}` \
             (it starts {})",
            starts(&pipeline["spec"])
        );
    };
    let run: Value = client.get_json(&run_path(name, &last["run"]))?;
    if json {
        println!("{run}");
    } else {
        println!(
            "pipeline {name} run {}: {} (started {}, {})",
            text(&run["run"]),
            text(&run["state"]),
            text(&run["cause"]),
            time(&run["created_ms"])
        );
        print_steps(&run);
    }
    Ok(())
}

fn history(client: &AdminClient, json: bool, name: &str, limit: usize) -> anyhow::Result<()> {
    let runs: Vec<Value> = client.get_json(&format!(
        "/v1/pipelines/{}/runs{}",
        segment(name),
        query(&[("limit", Some(limit.to_string()))])
    ))?;
    if json {
        println!("{}", Value::from(runs));
        return Ok(());
    }
    if runs.is_empty() {
        println!("pipeline {name} has not run yet");
        return Ok(());
    }
    let mut table = Table::new([
        "RUN",
        "STARTED",
        "CAUSE",
        "STATE",
        "STEPS",
        "ITEMS DONE",
        "FAILED",
    ])
    .right(&["RUN", "STEPS", "ITEMS DONE", "FAILED"]);
    for run in &runs {
        let jobs = run["jobs"].as_array().cloned().unwrap_or_default();
        let sum = |field: &str| -> u64 {
            jobs.iter()
                .map(|job| job["items"][field].as_u64().unwrap_or(0))
                .sum()
        };
        table.row([
            text(&run["run"]),
            time(&run["created_ms"]),
            text(&run["cause"]),
            text(&run["state"]),
            jobs.len().to_string(),
            sum("done").to_string(),
            sum("failed").to_string(),
        ]);
    }
    table.print();
    Ok(())
}

fn list(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let pipelines: Vec<Value> = client.get_json("/v1/pipelines")?;
    if json {
        println!("{}", Value::from(pipelines));
        return Ok(());
    }
    let mut table = Table::new(["NAME", "INPUT", "STEPS", "STARTS", "LAST RUN"]).right(&["STEPS"]);
    for pipeline in &pipelines {
        let last = &pipeline["last_run"];
        table.row([
            text(&pipeline["name"]),
            text(&pipeline["spec"]["input"]),
            pipeline["spec"]["steps"]
                .as_array()
                .map_or(0, Vec::len)
                .to_string(),
            starts(&pipeline["spec"]),
            if last.is_null() {
                "-".to_string()
            } else {
                format!("{} {}", text(&last["run"]), text(&last["state"]))
            },
        ]);
    }
    table.print();
    Ok(())
}
