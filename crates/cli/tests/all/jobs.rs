//! Batch jobs end to end: `mayfly job …` against a real node running the
//! `jobs` guest, which reads each item's object and writes `done:<bytes>`
//! under the output prefix through its own credential (an object starting
//! with `bad` fails).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Node, agent, eventually};

/// Sends an admin request with the node's token: (status, JSON answer).
pub(crate) fn admin(node: &Node, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", node.admin))
        .header("authorization", node.bearer())
        .body(body.to_vec())
        .unwrap();
    let mut response = agent().run(request).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub(crate) fn put_object(node: &Node, bucket: &str, key: &str, bytes: &[u8]) {
    let (status, answer) = admin(
        node,
        "PUT",
        &format!("/v1/buckets/{bucket}/objects/{key}"),
        bytes,
    );
    assert_eq!(status, 200, "{answer}");
}

pub(crate) fn get_object(node: &Node, bucket: &str, key: &str) -> (u16, String) {
    let mut response = agent()
        .get(format!("{}/v1/buckets/{bucket}/objects/{key}", node.admin))
        .header("authorization", node.bearer())
        .call()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().unwrap())
}

/// Every object key under `prefix` in `bucket`.
pub(crate) fn list_keys(node: &Node, bucket: &str, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    loop {
        let after = keys.last().cloned().unwrap_or_default();
        let page = node.admin_json(&format!(
            "/v1/buckets/{bucket}/objects?prefix={prefix}&after={after}&limit=10000"
        ));
        let objects = page["objects"].as_array().cloned().unwrap_or_default();
        if objects.is_empty() {
            return keys;
        }
        keys.extend(
            objects
                .iter()
                .map(|o| o["key"].as_str().unwrap().to_string()),
        );
    }
}

/// Deploys the `jobs` guest as `name`, granted buckets `in` and `out` and
/// the node's admin API (where it calls back with its credential), with
/// `flags`.
fn deploy_processor(node: &Node, name: &str, flags: &[&str]) {
    let mut all = vec![
        "--object-bucket",
        "in",
        "--object-bucket",
        "out",
        // Any port: a restarted node's API listens on a new one.
        "--outbound",
        "http://127.0.0.1:*",
    ];
    all.extend_from_slice(flags);
    node.deploy_with(name, "jobs", &[], &all);
}

fn job(node: &Node, id: &str) -> Value {
    node.admin_json(&format!("/v1/jobs/{id}"))
}

fn item_log(node: &Node, id: &str) -> Vec<Value> {
    let log = node.admin_json(&format!("/v1/jobs/{id}/log?limit=10000"));
    log["entries"].as_array().cloned().unwrap()
}

/// The most invocations of a job the ledger shows running at one moment.
/// A record's start is known to the millisecond: each is counted from the
/// end of its start's millisecond, so the count never exceeds the truth.
fn peak_concurrency(records: &[Value]) -> usize {
    let mut edges: Vec<(i64, i32)> = Vec::new();
    for record in records {
        let start = record["start_ms"].as_i64().unwrap() * 1000 + 999;
        let end = record["start_ms"].as_i64().unwrap() * 1000 + record["wall_us"].as_i64().unwrap();
        if end > start {
            edges.push((start, 1));
            edges.push((end, -1));
        }
    }
    // Ends before starts at the same instant.
    edges.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        peak = peak.max(now);
    }
    peak as usize
}

/// The ledger's records of a job, once there are `count`.
fn job_records(node: &Node, function: &str, id: &str, count: usize) -> Vec<Value> {
    let tag = format!("job-{id}");
    eventually(Duration::from_secs(30), "the job's usage records", || {
        let records: Vec<Value> = node
            .usage_records(Some(function))
            .into_iter()
            .filter(|r| r["client_request_id"] == tag.as_str())
            .collect();
        (records.len() >= count).then_some(records)
    })
}

fn job_id_of(stdout: &str) -> String {
    stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no job id in {stdout:?}"))
        .to_string()
}

#[test]
fn a_job_processes_every_object_once_within_the_concurrency_limit() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    deploy_processor(&node, "proc", &["--max-concurrency", "6"]);
    // 1,000 in the suite; `MAYFLY_JOBS_N=10000` runs the full size
    // (about three minutes on the debug build: the uploads are half of it).
    let n: usize = std::env::var("MAYFLY_JOBS_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| (1..=10_000).contains(n))
        .unwrap_or(1000);
    let upload = std::time::Instant::now();
    for i in 0..n {
        put_object(
            &node,
            "in",
            &format!("data/{i:04}"),
            format!("item-{i}").as_bytes(),
        );
    }
    // Not an input: outside the prefix.
    put_object(&node, "in", "other/x", b"x");

    let upload = upload.elapsed();
    let running = std::time::Instant::now();
    let (ok, stdout, stderr) = node.cli(&[
        "job",
        "run",
        "proc",
        "--input",
        "in/data/",
        "--output",
        "out/results/",
        "--parallelism",
        "16",
    ]);
    eprintln!(
        "{n} objects: upload {:.1}s, job {:.1}s",
        upload.as_secs_f64(),
        running.elapsed().as_secs_f64()
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("succeeded: {n} done, 0 failed")),
        "{stdout}"
    );
    // Off a terminal, progress comes as plain lines, then the summary.
    assert!(stderr.contains(&format!("over {n} objects")), "{stderr}");
    let id = job_id_of(&stdout);

    // Every output, each with the right content.
    let keys = list_keys(&node, "out", "results/");
    assert_eq!(keys.len(), n);
    for i in (0..n).step_by(37) {
        let (status, body) = get_object(&node, "out", &format!("results/{i:04}"));
        assert_eq!(
            (status, body.as_str()),
            (200, format!("done:item-{i}").as_str())
        );
    }
    // Each item finished exactly once.
    let log = item_log(&node, &id);
    let mut finished: HashMap<i64, usize> = HashMap::new();
    for entry in log.iter().filter(|e| e["outcome"] == "done") {
        *finished.entry(entry["seq"].as_i64().unwrap()).or_default() += 1;
    }
    assert_eq!(finished.len(), n);
    assert!(finished.values().all(|&count| count == 1));
    let status = job(&node, &id);
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["items"]["done"], n);

    // The ledger: one record per item, labelled with the job, never more
    // than the function's limit at once.
    let records = job_records(&node, "proc", &id, n);
    assert_eq!(records.len(), n);
    assert!(records.iter().all(|r| r["trigger"] == "job"));
    let peak = peak_concurrency(&records);
    eprintln!("peak concurrency measured from the ledger: {peak} (limit 6)");
    assert!(peak <= 6, "{peak} invocations at once over a limit of 6");
    assert!(peak >= 2, "the items ran one at a time ({peak})");
    // `usage --job` adds the job's cost up.
    let (ok, stdout, stderr) = node.cli(&["usage", "--job", &id, "--json"]);
    assert!(ok, "{stderr}");
    let usage: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(usage["total"]["invocations"], n);
    // `job list` shows it.
    let (ok, stdout, _) = node.cli(&["job", "list"]);
    assert!(
        ok && stdout.contains(&id) && stdout.contains("succeeded"),
        "{stdout}"
    );
}

#[test]
fn a_killed_node_resumes_its_job_without_running_finished_items_again() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    deploy_processor(&node, "proc", &["--max-concurrency", "4"]);
    let n = 1000;
    for i in 0..n {
        put_object(
            &node,
            "in",
            &format!("k/{i:04}"),
            format!("v{i}").as_bytes(),
        );
    }
    let (ok, stdout, stderr) = node.cli(&[
        "job", "run", "proc", "--input", "in/k/", "--output", "out/r/", "--detach",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let id = stdout.trim().to_string();
    eventually(Duration::from_secs(60), "a part of the job done", || {
        let done = job(&node, &id)["items"]["done"].as_u64().unwrap();
        (done >= 100).then_some(())
    });
    node.kill();
    // The same data directory: the job resumes by itself.
    let node = Node::start(dir.path());
    {
        let finished = eventually(Duration::from_secs(120), "the job to finish", || {
            let status = job(&node, &id);
            (status["state"] != "running").then_some(status)
        });
        assert_eq!(finished["state"], "succeeded", "{finished}");
        assert_eq!(finished["items"]["done"], n);
        let log = item_log(&node, &id);
        let mut finished: BTreeMap<i64, usize> = BTreeMap::new();
        for entry in log.iter().filter(|e| e["outcome"] == "done") {
            *finished.entry(entry["seq"].as_i64().unwrap()).or_default() += 1;
        }
        assert_eq!(finished.len(), n, "an item was lost");
        assert!(finished.values().all(|&c| c == 1), "an item finished twice");
        assert_eq!(list_keys(&node, "out", "r/").len(), n);
    }
}

#[test]
fn a_failing_item_is_retried_reported_and_retried_again_after_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    deploy_processor(&node, "proc", &[]);
    for i in 0..20 {
        let body = if i % 10 == 3 {
            format!("bad-{i}")
        } else {
            format!("good-{i}")
        };
        put_object(&node, "in", &format!("p/{i:02}"), body.as_bytes());
    }
    let (ok, stdout, stderr) = node.cli(&[
        "job",
        "run",
        "proc",
        "--input",
        "in/p/",
        "--output",
        "out/p/",
        "--max-attempts",
        "2",
    ]);
    assert!(!ok, "a job with failed items must fail: {stdout}");
    assert!(stdout.contains("18 done, 2 failed"), "{stdout}");
    assert!(
        stdout.contains("p/03") && stdout.contains("p/13"),
        "{stdout}"
    );
    assert!(stderr.contains("retry-failed"), "{stderr}");
    let id = job_id_of(&stdout);
    // Each bad item: a retry, then the failure, with the guest's error.
    let log = item_log(&node, &id);
    let bad: Vec<&Value> = log.iter().filter(|e| e["key"] == "p/03").collect();
    let outcomes: Vec<&str> = bad.iter().map(|e| e["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["retry", "failed"], "{log:?}");
    assert!(bad[1]["detail"].as_str().unwrap().contains("bad input"));
    let (ok, stdout, _) = node.cli(&["job", "logs", &id]);
    assert!(
        ok && stdout.contains("p/13") && stdout.contains("bad input"),
        "{stdout}"
    );

    // Fixed inputs: retry-failed completes the job.
    put_object(&node, "in", "p/03", b"good-3");
    put_object(&node, "in", "p/13", b"good-13");
    let (ok, stdout, stderr) = node.cli(&["job", "retry-failed", &id]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("succeeded: 20 done, 0 failed"), "{stdout}");
    assert_eq!(list_keys(&node, "out", "p/").len(), 20);
    // Billed: 18 + 2×2 failed attempts + 2 retried.
    let records = job_records(&node, "proc", &id, 24);
    assert_eq!(records.len(), 24);
}

#[test]
fn too_many_failures_stop_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    deploy_processor(&node, "proc", &[]);
    for i in 0..40 {
        put_object(&node, "in", &format!("b/{i:02}"), b"bad");
    }
    let (ok, stdout, stderr) = node.cli(&[
        "job",
        "run",
        "proc",
        "--input",
        "in/b/",
        "--parallelism",
        "1",
        "--max-attempts",
        "1",
        "--max-failures",
        "10%",
    ]);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("over --max-failures 10%"), "{stderr}");
    let id = job_id_of(&stdout);
    let status = job(&node, &id);
    assert_eq!(status["state"], "failed");
    assert_eq!(status["items"]["failed"], 5);
    assert_eq!(status["items"]["pending"], 35);
}

#[test]
fn bad_job_requests_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    deploy_processor(&node, "proc", &[]);
    put_object(&node, "in", "a/1", b"x");
    let refused = |args: &[&str], wanted: &str| {
        let mut all = vec!["job", "run"];
        all.extend_from_slice(args);
        let (ok, stdout, stderr) = node.cli(&all);
        assert!(!ok, "{args:?} ran: {stdout}");
        assert!(stderr.contains(wanted), "{args:?}: {stderr}");
    };
    refused(&["nope", "--input", "in/a/"], "no function named `nope`");
    refused(
        &["proc", "--input", "missing/a/"],
        "bucket `missing` does not exist",
    );
    refused(
        &["proc", "--input", "in/zzz/"],
        "no objects under `in/zzz/`",
    );
    refused(
        &["proc", "--input", "in/a/", "--max-failures", "lots"],
        "not a count",
    );
    refused(
        &["proc", "--input", "in/a/", "--output", "in/a/out/"],
        "overlaps the input",
    );
    let (status, jobs) = admin(&node, "GET", "/v1/jobs", b"");
    assert_eq!((status, jobs), (200, json!([])));
    let (status, answer) = admin(&node, "GET", "/v1/jobs/nope", b"");
    assert_eq!(status, 404, "{answer}");
}
