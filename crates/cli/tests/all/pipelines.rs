//! Pipelines end to end: `mayfly deploy` stores a manifest's
//! `[pipelines.*]` on a real node, which runs them by hand, on a schedule
//! and when objects arrive, each step a job of the `jobs` guest (`MODE`
//! `sum` parses a CSV into per-name totals, `reduce` adds every file's
//! totals up, `report` writes them as text).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::{Node, eventually, guest};
use crate::jobs::{admin, get_object, put_object};

/// The three functions, each the `jobs` guest in its mode, granted the
/// buckets and the admin API it writes results through.
fn functions() -> String {
    let component = guest("jobs");
    let mut text = String::new();
    for (name, mode) in [
        ("parse", "sum"),
        ("aggregate", "reduce"),
        ("report", "report"),
    ] {
        text += &format!(
            "[functions.{name}]\ncomponent = {component:?}\nenv = {{ MODE = \"{mode}\" }}\n\
             [functions.{name}.grants]\nobjects = [\"in\", \"out\"]\n\
             outbound = [\"http://127.0.0.1:*\"]\n\n"
        );
    }
    text
}

/// parse CSV → aggregate per name (a reduce) → report, with `starts`
/// (extra keys of the pipeline's table).
fn pipeline(starts: &str) -> String {
    format!(
        r#"
[pipelines.sales]
input = "in/sales/"
{starts}
[[pipelines.sales.steps]]
name = "parse"
function = "parse"
output = "out/parsed/"
[[pipelines.sales.steps]]
name = "aggregate"
function = "aggregate"
reduce = true
output = "out/totals.csv"
[[pipelines.sales.steps]]
name = "report"
function = "report"
output = "out/report.txt"
"#
    )
}

/// Writes `mayfly.toml` in `project` and deploys it: (ok, stdout, stderr).
fn deploy(node: &Node, project: &Path, manifest: &str) -> (bool, String, String) {
    std::fs::write(project.join("mayfly.toml"), manifest).unwrap();
    cli(node, project, &["deploy"])
}

fn cli(node: &Node, project: &Path, args: &[&str]) -> (bool, String, String) {
    let output = node.cli_in(project, args);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Uploads sales files `from..to`: file i has `apple,i`, `pear,2i` and
/// `fig,1` lines; returns the totals they add.
fn upload_sales(node: &Node, from: i64, to: i64) -> (i64, i64, i64) {
    let (mut apple, mut pear, mut fig) = (0, 0, 0);
    for i in from..to {
        let csv = format!("apple,{i}\npear,{}\nfig,1\napple,1\n", 2 * i);
        put_object(node, "in", &format!("sales/{i:04}.csv"), csv.as_bytes());
        apple += i + 1;
        pear += 2 * i;
        fig += 1;
    }
    (apple, pear, fig)
}

fn report((apple, pear, fig): (i64, i64, i64)) -> String {
    format!(
        "apple: {apple}\nfig: {fig}\npear: {pear}\nTOTAL: {}\n",
        apple + pear + fig
    )
}

fn add(a: (i64, i64, i64), b: (i64, i64, i64)) -> (i64, i64, i64) {
    (a.0 + b.0, a.1 + b.1, a.2 + b.2)
}

/// The pipeline's runs, newest first, each with its jobs.
fn runs_of(node: &Node) -> Vec<Value> {
    let runs = node.admin_json("/v1/pipelines/sales/runs?limit=1000");
    runs.as_array().cloned().unwrap_or_default()
}

/// Items the `parse` step finished over every run: with incremental runs,
/// each input object once.
fn parsed_items(runs: &[Value]) -> u64 {
    runs.iter()
        .flat_map(|run| run["jobs"].as_array().cloned().unwrap_or_default())
        .filter(|job| job["spec"]["pipeline"]["step"] == "parse")
        .map(|job| job["items"]["done"].as_u64().unwrap())
        .sum()
}

/// No two runs were under way at once.
fn assert_no_overlap(runs: &[Value]) {
    let mut spans: Vec<(i64, i64)> = runs
        .iter()
        .map(|run| {
            (
                run["created_ms"].as_i64().unwrap(),
                run["finished_ms"].as_i64().unwrap_or(i64::MAX),
            )
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "runs overlap: {runs:?}");
    }
}

#[test]
fn a_three_step_pipeline_totals_and_reruns_incrementally() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let project = tempfile::tempdir().unwrap();
    let manifest = functions() + &pipeline("");
    let (ok, stdout, stderr) = deploy(&node, project.path(), &manifest);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("pipeline sales: stored"), "{stdout}");
    // Nothing under the input yet: refused before any step runs.
    let (ok, _, stderr) = cli(&node, project.path(), &["pipeline", "run", "sales"]);
    assert!(
        !ok && stderr.contains("bucket `in` does not exist"),
        "{stderr}"
    );
    put_object(&node, "in", "elsewhere/x", b"x");
    let (ok, _, stderr) = cli(&node, project.path(), &["pipeline", "run", "sales"]);
    assert!(
        !ok && stderr.contains("no objects under `in/sales/`"),
        "{stderr}"
    );

    let mut totals = upload_sales(&node, 0, 30);
    let (ok, stdout, stderr) = cli(&node, project.path(), &["pipeline", "run", "sales"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("pipeline sales run 1 succeeded"),
        "{stdout}"
    );
    assert!(
        stderr.contains("step parse (parse) over 30 objects"),
        "{stderr}"
    );
    assert_eq!(
        get_object(&node, "out", "report.txt"),
        (200, report(totals))
    );

    // New objects: the map step runs over them only, the totals cover all.
    totals = add(totals, upload_sales(&node, 30, 35));
    let (ok, stdout, stderr) = cli(
        &node,
        project.path(),
        &["pipeline", "run", "sales", "--json"],
    );
    assert!(ok, "{stdout}{stderr}");
    let run: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(run["run"], 2);
    assert_eq!(run["cause"], "manual");
    assert_eq!(run["jobs"][0]["spec"]["pipeline"]["step"], "parse");
    assert_eq!(run["jobs"][0]["items"]["done"], 5, "{run}");
    assert_eq!(run["jobs"].as_array().unwrap().len(), 3, "{run}");
    assert_eq!(
        get_object(&node, "out", "report.txt"),
        (200, report(totals))
    );
    let (ok, stdout, _) = cli(&node, project.path(), &["pipeline", "history", "sales"]);
    assert!(ok, "{stdout}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    let (ok, stdout, _) = cli(&node, project.path(), &["pipeline", "status", "sales"]);
    assert!(ok && stdout.contains("run 2: succeeded"), "{stdout}");
    let (ok, stdout, _) = cli(&node, project.path(), &["pipeline", "list"]);
    assert!(ok && stdout.contains("2 succeeded"), "{stdout}");

    // Bad definitions are refused when deployed, before anything runs.
    let jobs_before = node.admin_json("/v1/jobs").as_array().unwrap().len();
    let refused = |manifest: String, wanted: &str| {
        let (ok, stdout, stderr) = deploy(&node, project.path(), &manifest);
        assert!(!ok, "deployed: {stdout}");
        assert!(stderr.contains(wanted), "{stderr}");
    };
    refused(
        functions() + &pipeline("").replace("function = \"report\"", "function = \"nope\""),
        "function `nope` is not deployed",
    );
    refused(
        functions()
            + &pipeline("").replace(
                "name = \"parse\"\nfunction = \"parse\"",
                "name = \"parse\"\nfunction = \"parse\"\nafter = \"report\"",
            ),
        "cycle",
    );
    refused(
        functions()
            + &pipeline("").replace(
                "function = \"report\"",
                "function = \"report\"\nafter = \"summary\"",
            ),
        "comes after `summary`, which is not a step",
    );
    refused(
        functions() + &pipeline("onobjects = true"),
        "unknown field `onobjects`",
    );
    refused(
        functions() + &pipeline("schedule = \"61 * * * *\""),
        "not a valid minute",
    );
    refused(
        functions() + &pipeline("").replace("input = \"in/sales/\"", "input = \"\""),
        "`input` is empty",
    );
    refused(
        functions() + &pipeline("").replace("out/parsed/", "in/sales/parsed/"),
        "overlaps the pipeline's input",
    );
    // The stored definition is still the good one.
    let stored = node.admin_json("/v1/pipelines/sales");
    assert_eq!(stored["spec"]["steps"][2]["function"], "report", "{stored}");
    assert_eq!(
        node.admin_json("/v1/jobs").as_array().unwrap().len(),
        jobs_before
    );
    let (status, answer) = admin(&node, "POST", "/v1/pipelines/nope/runs", b"");
    assert_eq!(status, 404, "{answer}");

    // A bad input object fails its step, which fails the run; the steps
    // after it never start, and the report stays as it was.
    put_object(&node, "in", "sales/bad.csv", b"bad,1\n");
    let (ok, stdout, stderr) = cli(&node, project.path(), &["pipeline", "run", "sales"]);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("pipeline sales run 3 failed"), "{stdout}");
    assert!(
        stderr.contains("step `parse`") && stderr.contains("retry-failed"),
        "{stderr}"
    );
    let failed = node.admin_json("/v1/pipelines/sales/runs/3");
    assert_eq!(failed["jobs"].as_array().unwrap().len(), 1, "{failed}");
    assert_eq!(
        get_object(&node, "out", "report.txt"),
        (200, report(totals))
    );
    // Once it is gone, the next run has nothing new to parse and reports
    // the same totals.
    let (status, _) = admin(&node, "DELETE", "/v1/buckets/in/objects/sales/bad.csv", b"");
    assert_eq!(status, 204);
    let (ok, stdout, stderr) = cli(&node, project.path(), &["pipeline", "run", "sales"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("step parse (parse) over 0 objects"),
        "{stderr}"
    );
    assert_eq!(
        get_object(&node, "out", "report.txt"),
        (200, report(totals))
    );
}

#[test]
fn a_pipeline_runs_by_itself_when_objects_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let project = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = deploy(
        &node,
        project.path(),
        &(functions() + &pipeline("on_objects = true")),
    );
    assert!(ok, "{stdout}{stderr}");
    // The bucket comes with the first upload.
    assert!(
        stderr.contains("bucket `in` does not exist yet"),
        "{stderr}"
    );

    // A burst of uploads: one run, or a few, never at once.
    let n = 300;
    let mut totals = upload_sales(&node, 0, n);
    let expected = report(totals);
    let runs = eventually(Duration::from_secs(120), "runs over every upload", || {
        let runs = runs_of(&node);
        let settled = runs.iter().all(|r| r["state"] != "running");
        (settled && parsed_items(&runs) == n as u64).then_some(runs)
    });
    assert!(runs.iter().all(|r| r["state"] == "succeeded"), "{runs:?}");
    assert!(runs.iter().all(|r| r["cause"] == "objects"), "{runs:?}");
    eprintln!("{n} uploads started {} run(s)", runs.len());
    assert!(runs.len() <= 5, "{} runs for one burst", runs.len());
    assert_no_overlap(&runs);
    assert_eq!(get_object(&node, "out", "report.txt"), (200, expected));

    // More objects later: a new run processes only those.
    let before = runs.len();
    totals = add(totals, upload_sales(&node, n, n + 7));
    let runs = eventually(
        Duration::from_secs(60),
        "a run over the new objects",
        || {
            let runs = runs_of(&node);
            let settled = runs.iter().all(|r| r["state"] != "running");
            (settled && parsed_items(&runs) == n as u64 + 7).then_some(runs)
        },
    );
    assert!(runs.len() > before);
    let newest = &runs[0];
    assert_eq!(newest["jobs"][0]["items"]["done"], 7, "{newest}");
    assert_no_overlap(&runs);
    assert_eq!(
        get_object(&node, "out", "report.txt"),
        (200, report(totals))
    );
    // Writes elsewhere start nothing.
    put_object(&node, "in", "other/x.csv", b"apple,1\n");
    put_object(&node, "out", "sales/x.csv", b"apple,1\n");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(runs_of(&node).len(), runs.len());

    // Objects stored just before the node is killed (before their run
    // could start) are remembered: the restarted node runs over them.
    totals = add(totals, upload_sales(&node, n + 7, n + 10));
    let before_kill = runs_of(&node).len();
    node.kill();
    let node = Node::start(dir.path());
    eventually(Duration::from_secs(60), "a run after the restart", || {
        let runs = runs_of(&node);
        let settled = runs.iter().all(|r| r["state"] != "running");
        (settled && parsed_items(&runs) == n as u64 + 10).then_some(())
    });
    eprintln!(
        "runs before the kill: {before_kill}, after the restart: {}",
        runs_of(&node).len()
    );
    assert_eq!(
        get_object(&node, "out", "report.txt"),
        (200, report(totals))
    );
}

#[test]
fn a_scheduled_pipeline_fires_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let project = tempfile::tempdir().unwrap();
    let totals = upload_sales(&node, 0, 20);
    let (ok, stdout, stderr) = deploy(
        &node,
        project.path(),
        &(functions() + &pipeline("schedule = \"@every 1s\"")),
    );
    assert!(ok, "{stdout}{stderr}");
    let runs = eventually(Duration::from_secs(60), "a scheduled run", || {
        let runs = runs_of(&node);
        runs.iter()
            .any(|r| r["state"] == "succeeded" && parsed_items(&runs) == 20)
            .then_some(runs)
    });
    assert!(runs.iter().all(|r| r["cause"] == "schedule"), "{runs:?}");
    assert_eq!(
        get_object(&node, "out", "report.txt"),
        (200, report(totals))
    );
    // Later slots find nothing new: their runs skip the steps after parse.
    let quiet = eventually(Duration::from_secs(60), "a run with nothing new", || {
        runs_of(&node).into_iter().find(|r| {
            r["state"] == "succeeded"
                && r["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("nothing new"))
        })
    });
    assert_eq!(quiet["jobs"].as_array().unwrap().len(), 1, "{quiet}");
    // Without its schedule it stops.
    let (ok, stdout, stderr) = deploy(&node, project.path(), &(functions() + &pipeline("")));
    assert!(ok, "{stdout}{stderr}");
    let settled = eventually(Duration::from_secs(30), "the last run to end", || {
        let runs = runs_of(&node);
        runs.iter()
            .all(|r| r["state"] != "running")
            .then_some(runs.len())
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(runs_of(&node).len(), settled);
    assert_no_overlap(&runs_of(&node));
}

#[test]
fn a_killed_node_resumes_its_pipeline_run() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let project = tempfile::tempdir().unwrap();
    // One item at a time: the run is still at its first step when killed.
    let manifest = (functions() + &pipeline("")).replace(
        "output = \"out/parsed/\"",
        "output = \"out/parsed/\"\nparallelism = 1",
    );
    let (ok, stdout, stderr) = deploy(&node, project.path(), &manifest);
    assert!(ok, "{stdout}{stderr}");
    let n = 200;
    let totals = upload_sales(&node, 0, n);
    let (ok, stdout, stderr) = cli(
        &node,
        project.path(),
        &["pipeline", "run", "sales", "--detach"],
    );
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "1");
    let done = eventually(Duration::from_secs(60), "a part of the first step", || {
        let runs = runs_of(&node);
        let done = runs[0]["jobs"][0]["items"]["done"].as_u64().unwrap_or(0);
        (done >= 20).then_some(done)
    });
    node.kill();
    eprintln!("killed with {done} of {n} items of the first step done");
    let node = Node::start(dir.path());
    let run = eventually(Duration::from_secs(120), "the run to end", || {
        let runs = runs_of(&node);
        (runs[0]["state"] != "running").then(|| runs[0].clone())
    });
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_eq!(run["run"], 1);
    // One job per step: the resumed run went on with the job it had.
    assert_eq!(run["jobs"].as_array().unwrap().len(), 3, "{run}");
    assert_eq!(run["jobs"][0]["items"]["done"], n, "{run}");
    assert_eq!(
        get_object(&node, "out", "report.txt"),
        (200, report(totals))
    );
}
