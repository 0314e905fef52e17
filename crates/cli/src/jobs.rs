//! `mayfly job …`: batch jobs that run a function once per object under a
//! prefix, with a progress bar while they run.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::client::{AdminClient, PAGE, query, segment};
use crate::output::{Table, one_line, print_fields, text, time};

/// How often a waiting client asks for the job's counts.
const POLL: Duration = Duration::from_millis(250);
/// How often a plain progress line is printed off a terminal.
const LINE_EVERY: Duration = Duration::from_secs(2);
/// Failed items listed after a job ends.
const FAILED_SHOWN: usize = 10;
/// Longest error shown in a table.
const ERROR_COLUMN: usize = 80;

/// `mayfly job …`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Run a function once per object under BUCKET/PREFIX (each object
    /// arrives as a `dev.mayfly.job.item` CloudEvent naming its key, size
    /// and ETag) and show its progress until it ends.
    Run(RunArgs),
    /// List jobs, newest first.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show a job's state and counts.
    Status {
        /// Job id.
        id: String,
        /// Wait for it to end, showing its progress.
        #[arg(long)]
        wait: bool,
    },
    /// Show a job's failed items with their errors, or with --all every
    /// attempt's end (the item log).
    Logs {
        /// Job id.
        id: String,
        /// Every attempt's end, not only the failed items.
        #[arg(long)]
        all: bool,
    },
    /// Stop a running job: no new item starts; `retry-failed` resumes it.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Run a finished job's failed items again (and a cancelled job's
    /// pending ones), then wait for it like `job run`.
    RetryFailed {
        /// Job id.
        id: String,
        /// Print the job id and return at once.
        #[arg(long)]
        detach: bool,
    },
}

/// `mayfly job run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The function to run (its `live` alias).
    pub function: String,
    /// The objects: BUCKET/PREFIX (BUCKET alone: every object in it).
    #[arg(long, value_name = "BUCKET/PREFIX")]
    pub input: String,
    /// Where the function should write its results: each item's event names
    /// an output key, this prefix plus the key without the input prefix.
    #[arg(long, value_name = "BUCKET/PREFIX")]
    pub output: Option<String>,
    /// Most items running at once (the function's --max-concurrency also
    /// applies) [default: 64].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub parallelism: Option<u32>,
    /// Stop the job once more items than this failed: a count (10) or a
    /// percentage of the items (5%) [default: never].
    #[arg(long, value_name = "N|P%")]
    pub max_failures: Option<String>,
    /// Attempts per item before it counts as failed [default: 3].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10))]
    pub max_attempts: Option<u32>,
    /// Wait for the job to end, showing its progress (the default).
    #[arg(long, conflicts_with = "detach")]
    pub wait: bool,
    /// Print the job id and return at once.
    #[arg(long)]
    pub detach: bool,
}

/// Runs a `mayfly job` verb.
pub fn run(client: &AdminClient, json: bool, command: JobCommand) -> anyhow::Result<()> {
    match command {
        JobCommand::Run(args) => {
            let body = json!({
                "function": args.function,
                "input": args.input,
                "output": args.output,
                "parallelism": args.parallelism,
                "max_failures": args.max_failures,
                "max_attempts": args.max_attempts,
            });
            let job: Value = client.post_json("/v1/jobs", &body)?;
            let id = text(&job["id"]);
            if args.detach {
                if json {
                    println!("{job}");
                } else {
                    println!("{id}");
                }
                return Ok(());
            }
            if !json {
                eprintln!(
                    "job {id}: {} over {} objects",
                    text(&job["spec"]["function"]),
                    total(&job)
                );
            }
            wait(client, json, &id)
        }
        JobCommand::List { limit } => list(client, json, limit),
        JobCommand::Status { id, wait: true } => wait(client, json, &id),
        JobCommand::Status { id, wait: false } => {
            let job: Value = client.get_json(&job_path(&id))?;
            if json {
                println!("{job}");
            } else {
                print_job(&job);
            }
            Ok(())
        }
        JobCommand::Logs { id, all } => logs(client, json, &id, all),
        JobCommand::Cancel { id } => {
            let job: Value = client.post_json(&format!("{}/cancel", job_path(&id)), &json!({}))?;
            if json {
                println!("{job}");
            } else {
                println!(
                    "cancelled job {id}: {} done, {} not run (`mayfly job retry-failed {id}` \
                     resumes it)",
                    job["items"]["done"],
                    remaining(&job)
                );
            }
            Ok(())
        }
        JobCommand::RetryFailed { id, detach } => {
            let answer: Value =
                client.post_json(&format!("{}/retry-failed", job_path(&id)), &json!({}))?;
            if detach {
                if json {
                    println!("{answer}");
                } else {
                    println!("retrying {} items of job {id}", answer["reset"]);
                }
                return Ok(());
            }
            if !json {
                eprintln!("job {id}: retrying {} failed items", answer["reset"]);
            }
            wait(client, json, &id)
        }
    }
}

fn job_path(id: &str) -> String {
    format!("/v1/jobs/{}", segment(id))
}

fn total(job: &Value) -> u64 {
    ["pending", "running", "done", "failed"]
        .iter()
        .map(|s| job["items"][s].as_u64().unwrap_or(0))
        .sum()
}

fn remaining(job: &Value) -> u64 {
    job["items"]["pending"].as_u64().unwrap_or(0) + job["items"]["running"].as_u64().unwrap_or(0)
}

/// Polls the job until it is no longer running, showing its progress on
/// stderr (a bar on a terminal, a line every few seconds elsewhere), then
/// prints a summary; an error when it did not succeed.
fn wait(client: &AdminClient, json: bool, id: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut job: Value = client.get_json(&job_path(id))?;
    let first_done =
        job["items"]["done"].as_u64().unwrap_or(0) + job["items"]["failed"].as_u64().unwrap_or(0);
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(total(&job));
        bar.set_style(
            ProgressStyle::with_template("[{bar:30}] {pos}/{len} {msg} {elapsed}")
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let mut last_line = Instant::now();
    loop {
        let done = job["items"]["done"].as_u64().unwrap_or(0);
        let failed = job["items"]["failed"].as_u64().unwrap_or(0);
        let left = remaining(&job);
        let seconds = started.elapsed().as_secs_f64();
        let rate = (done + failed).saturating_sub(first_done) as f64 / seconds.max(0.001);
        let eta = if rate > 0.0 {
            format!("{:.0}s", left as f64 / rate)
        } else {
            "-".to_string()
        };
        let line =
            format!("done {done}, failed {failed}, remaining {left}, {rate:.0}/s, ETA {eta}");
        match &bar {
            Some(bar) => {
                bar.set_length(total(&job));
                bar.set_position(done + failed);
                bar.set_message(line);
            }
            None if !json && last_line.elapsed() >= LINE_EVERY => {
                eprintln!("job {id}: {line}");
                last_line = Instant::now();
            }
            None => {}
        }
        if job["state"] != "running" {
            break;
        }
        std::thread::sleep(POLL);
        job = client.get_json(&job_path(id))?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let done = job["items"]["done"].as_u64().unwrap_or(0);
    let failed = job["items"]["failed"].as_u64().unwrap_or(0);
    let ran = (done + failed).saturating_sub(first_done);
    if json {
        println!("{job}");
    } else {
        println!(
            "job {id} {}: {done} done, {failed} failed, {} not run, of {} items in {elapsed:.1}s \
             ({:.0} items/s)",
            text(&job["state"]),
            remaining(&job),
            total(&job),
            ran as f64 / elapsed.max(0.001)
        );
        if failed > 0 {
            let items = failed_items(client, id, FAILED_SHOWN)?;
            print_items(&items);
            if failed as usize > items.len() {
                println!("… see `mayfly job logs {id}` for all {failed}");
            }
        }
    }
    match job["state"].as_str() {
        Some("succeeded") => Ok(()),
        _ => bail!(
            "job {id} {}{}",
            text(&job["state"]),
            job["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
    }
}

fn failed_items(client: &AdminClient, id: &str, limit: usize) -> anyhow::Result<Vec<Value>> {
    let path = format!(
        "{}/items{}",
        job_path(id),
        query(&[
            ("state", Some("failed".into())),
            ("limit", Some(limit.to_string()))
        ])
    );
    let page: Value = client.get_json(&path)?;
    Ok(page["items"].as_array().cloned().unwrap_or_default())
}

fn print_items(items: &[Value]) {
    let mut table = Table::new(["KEY", "ATTEMPTS", "LAST ERROR"]).right(&["ATTEMPTS"]);
    for item in items {
        table.row([
            text(&item["key"]),
            text(&item["attempts"]),
            one_line(&text(&item["last_error"]), ERROR_COLUMN),
        ]);
    }
    table.print();
}

fn print_job(job: &Value) {
    let spec = &job["spec"];
    let output = match (
        spec["output_bucket"].as_str(),
        spec["output_prefix"].as_str(),
    ) {
        (Some(bucket), prefix) => format!("{bucket}/{}", prefix.unwrap_or("")),
        _ => "-".into(),
    };
    print_fields(&json!({
        "id": job["id"],
        "state": job["state"],
        "error": job["error"],
        "function": spec["function"],
        "input": format!("{}/{}", text(&spec["input_bucket"]), spec["input_prefix"].as_str().unwrap_or("")),
        "output": output,
        "parallelism": spec["parallelism"],
        "max_failures": spec["max_failures"],
        "items": total(job),
        "done": job["items"]["done"],
        "failed": job["items"]["failed"],
        "pending": job["items"]["pending"],
        "running": job["items"]["running"],
        "created": time(&job["created_ms"]),
        "finished": time(&job["finished_ms"]),
    }));
}

fn list(client: &AdminClient, json: bool, limit: usize) -> anyhow::Result<()> {
    let jobs: Vec<Value> = client.get_json(&format!(
        "/v1/jobs{}",
        query(&[("limit", Some(limit.to_string()))])
    ))?;
    if json {
        println!("{}", Value::from(jobs));
        return Ok(());
    }
    if jobs.is_empty() {
        println!("no jobs");
        return Ok(());
    }
    let mut table = Table::new([
        "ID", "FUNCTION", "STATE", "DONE", "FAILED", "ITEMS", "CREATED",
    ])
    .right(&["DONE", "FAILED", "ITEMS"]);
    for job in &jobs {
        table.row([
            text(&job["id"]),
            text(&job["spec"]["function"]),
            text(&job["state"]),
            text(&job["items"]["done"]),
            text(&job["items"]["failed"]),
            total(job).to_string(),
            time(&job["created_ms"]),
        ]);
    }
    table.print();
    Ok(())
}

fn logs(client: &AdminClient, json: bool, id: &str, all: bool) -> anyhow::Result<()> {
    if !all {
        let mut items: Vec<Value> = Vec::new();
        loop {
            let after = items.last().map(|i| text(&i["seq"]));
            let path = format!(
                "{}/items{}",
                job_path(id),
                query(&[
                    ("state", Some("failed".into())),
                    ("after", after),
                    ("limit", Some(PAGE.to_string()))
                ])
            );
            let page: Value = client.get_json(&path)?;
            let got = page["items"].as_array().cloned().unwrap_or_default();
            let full = got.len() >= PAGE;
            items.extend(got);
            if !full {
                break;
            }
        }
        if json {
            println!("{}", Value::from(items));
        } else if items.is_empty() {
            println!("job {id} has no failed items");
        } else {
            print_items(&items);
        }
        return Ok(());
    }
    let mut entries: Vec<Value> = Vec::new();
    loop {
        let after = entries.last().map(|e| text(&e["pos"]));
        let path = format!(
            "{}/log{}",
            job_path(id),
            query(&[("after", after), ("limit", Some(PAGE.to_string()))])
        );
        let page: Value = client.get_json(&path)?;
        let got = page["entries"].as_array().cloned().unwrap_or_default();
        let full = got.len() >= PAGE;
        entries.extend(got);
        if !full {
            break;
        }
    }
    if json {
        println!("{}", Value::from(entries));
        return Ok(());
    }
    let mut table = Table::new(["TIME", "KEY", "ATTEMPT", "OUTCOME", "DETAIL"]).right(&["ATTEMPT"]);
    for entry in &entries {
        table.row([
            time(&entry["at_ms"]),
            text(&entry["key"]),
            text(&entry["attempt"]),
            text(&entry["outcome"]),
            one_line(&text(&entry["detail"]), ERROR_COLUMN),
        ]);
    }
    table.print();
    Ok(())
}
