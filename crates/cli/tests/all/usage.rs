//! The usage ledger with the real binary: one record per invocation, durable
//! across SIGTERM, never doubled across SIGKILL; aggregation, CLI and metrics.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::common::{Node, eventually};

fn outcomes(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect()
}

fn count(records: &[Value], outcome: &str) -> usize {
    outcomes(records).iter().filter(|o| *o == outcome).count()
}

#[test]
fn every_invocation_leaves_exactly_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--function-histograms", "hello"]);
    node.deploy("hello", "hello", &["/hello"]);
    node.deploy("trap", "trap", &["/trap"]);
    node.deploy_with("slow", "hostile", &["/"], &["--timeout", "300ms"]);

    let mut ids = Vec::new();
    for i in 0..30 {
        let (path, want) = match i % 10 {
            3 | 7 => ("/trap", 500),
            5 => ("/loop", 504),
            _ => ("/hello", 200),
        };
        let (status, _, id) = node.request("GET", path, b"");
        assert_eq!(status, want, "{path}");
        ids.push(id);
    }
    for _ in 0..3 {
        let (ok, _, stderr) = node.cli(&["invoke", "hello"]);
        assert!(ok, "{stderr}");
    }

    let hello = node.await_usage_records("hello", 24);
    let trap = node.await_usage_records("trap", 6);
    let slow = node.await_usage_records("slow", 3);
    assert_eq!(count(&hello, "ok"), 24);
    assert_eq!(count(&trap, "error"), 6);
    assert_eq!(count(&slow, "timeout"), 3);
    let all: Vec<Value> = [hello.clone(), trap, slow].concat();
    let recorded: HashSet<&str> = all
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(recorded.len(), 33, "request ids are unique");
    for id in &ids {
        assert!(recorded.contains(id.as_str()), "no record for {id}");
    }
    assert_eq!(hello.iter().filter(|r| r["trigger"] == "invoke").count(), 3);
    for record in &all {
        let wall = record["wall_us"].as_u64().unwrap();
        let init = record["init_us"].as_u64().unwrap();
        // Only a cold start has an init time, and it is billed with the
        // handler's.
        assert_eq!(record["cold"] == true, init > 0, "{record}");
        let billed = record["billed_ms"].as_u64().unwrap();
        assert_eq!(billed, (wall + init).div_ceil(1000).max(1), "{record}");
        assert_eq!(record["memory_limit_mb"], 128);
        assert!(record["peak_memory_bytes"].as_u64().unwrap() > 0);
        let gb_s = record["billed_gb_s"].as_f64().unwrap();
        assert!((gb_s - 128.0 / 1024.0 * billed as f64 / 1000.0).abs() < 1e-12);
    }
    // The timeouts were billed for their full run.
    let slow_billed: Vec<u64> = all
        .iter()
        .filter(|r| r["outcome"] == "timeout")
        .map(|r| r["billed_ms"].as_u64().unwrap())
        .collect();
    assert!(slow_billed.iter().all(|&ms| ms >= 300), "{slow_billed:?}");

    // Aggregation over the API, the CLI table and CSV.
    let usage = node.admin_json("/v1/usage?group_by=function");
    assert_eq!(usage["total"]["invocations"], 33, "{usage}");
    assert_eq!(usage["total"]["errors"], 9);
    assert_eq!(usage["total"]["outcomes"]["timeout"], 3);
    let hello_row = usage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["function"] == "hello")
        .unwrap();
    assert_eq!(hello_row["invocations"], 24);
    // Each function started cold once here: its init time and what it cost.
    assert_eq!(hello_row["cold_starts"], 1, "{hello_row}");
    let init_us: u64 = hello.iter().map(|r| r["init_us"].as_u64().unwrap()).sum();
    assert!(init_us > 0);
    assert_eq!(hello_row["init_us"], init_us, "{hello_row}");
    let cold_cost = hello_row["cost"]["cold_starts"].as_f64().unwrap();
    let expected =
        128.0 / 1024.0 * init_us as f64 / 1e6 * usage["prices"]["per_gb_second"].as_f64().unwrap();
    assert!((cold_cost - expected).abs() < 1e-15, "{hello_row}");
    let cost = hello_row["cost"]["requests"].as_f64().unwrap();
    assert!((cost - 24.0 * 0.20 / 1e6).abs() < 1e-15, "{hello_row}");
    let by_hour = node.admin_json("/v1/usage?group_by=hour&from=1h");
    assert_eq!(by_hour["total"]["invocations"], 33);

    let (ok, table, stderr) = node.cli(&["usage", "--since", "1h"]);
    assert!(ok, "{stderr}");
    let hello_line = table
        .lines()
        .find(|l| l.starts_with("hello "))
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(hello_line.split_whitespace().nth(1), Some("24"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("TOTAL")), "{table}");
    let (ok, csv, _) = node.cli(&["usage", "--csv", "--by", "version"]);
    assert!(ok);
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert!(
        header.starts_with(&[
            "version",
            "invocations",
            "errors",
            "timeouts",
            "oom",
            "client_closed"
        ]),
        "{csv}"
    );
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|line| line.split(',').collect()).collect();
    assert_eq!(rows.len(), 3, "{csv}");
    // Costs at full precision: each reads back as exactly the API's number
    // (hello's 24 requests cost 4.8e-6 of requests alone; rounding to six
    // decimals would lose most of it).
    let by_version = node.admin_json("/v1/usage?group_by=version");
    for row in &rows {
        let api = by_version["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| format!("{} v{}", r["function"].as_str().unwrap(), r["version"]) == row[0])
            .unwrap_or_else(|| panic!("{csv}"));
        let cost: f64 = row[column("cost")].parse().unwrap();
        assert_eq!(cost, api["cost"]["total"].as_f64().unwrap(), "{csv}");
        assert_eq!(row[column("client_closed")], "0", "{csv}");
    }
    // A grouping the API does not know is refused by the CLI, naming its flag.
    let (ok, _, stderr) = node.cli(&["usage", "--by", "week"]);
    assert!(
        !ok && stderr.contains("'--by <BY>'")
            && stderr.contains("[possible values: function, version, hour, day]"),
        "{stderr}"
    );

    // Prometheus metrics on the admin port.
    let metrics = node.metrics();
    for needle in [
        "mayfly_invocations_total{function=\"hello\",outcome=\"ok\"} 24",
        "mayfly_invocations_total{function=\"trap\",outcome=\"error\"} 6",
        "mayfly_invocations_total{function=\"slow\",outcome=\"timeout\"} 3",
        "mayfly_invocation_duration_seconds_count{function=\"hello\"} 24",
        "mayfly_ledger_records_total 33",
        "mayfly_ledger_pending_records 0",
        "mayfly_instances_in_flight 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }

    // SIGTERM, restart: every record is still there, once.
    node.stop();
    let node = Node::start(dir.path());
    assert_eq!(node.usage_records(None).len(), 33);
}

#[test]
fn a_client_that_leaves_mid_request_is_client_closed_not_an_error() {
    use std::io::Write as _;

    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("sleepy", "hostile", &["/"]);
    let address = node.gateway.strip_prefix("http://").unwrap();
    let mut client = std::net::TcpStream::connect(address).unwrap();
    client
        .write_all(b"GET /sleep?ms=1500 HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    eventually(Duration::from_secs(10), "the invocation to start", || {
        (node.admin_json("/v1/status")["instances_in_flight"] == 1).then_some(())
    });
    // The client gives up before the function answers.
    drop(client);

    let records = node.await_usage_records("sleepy", 1);
    let record = &records[0];
    assert_eq!(record["outcome"], "client_closed", "{record}");
    assert!(record["status"].is_null(), "nothing reached it: {record}");
    assert!(
        record["billed_ms"].as_u64().unwrap() >= 1500,
        "it ran: {record}"
    );

    // Counted, billed, but not an error.
    let usage = node.admin_json("/v1/usage?function=sleepy");
    assert_eq!(usage["total"]["invocations"], 1, "{usage}");
    assert_eq!(usage["total"]["errors"], 0, "{usage}");
    assert_eq!(usage["total"]["outcomes"]["client_closed"], 1, "{usage}");
    // `mayfly usage` shows it in a column of its own, apart from errors.
    let (ok, table, stderr) = node.cli(&["usage", "--function", "sleepy"]);
    assert!(ok, "{stderr}");
    let mut lines = table.lines().skip(1);
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let sleepy: Vec<&str> = lines
        .find(|line| line.starts_with("sleepy "))
        .unwrap_or_else(|| panic!("{table}"))
        .split_whitespace()
        .collect();
    let cell = |name: &str| sleepy[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(
        (cell("ERRORS"), cell("CLIENT_CLOSED")),
        ("0", "1"),
        "{table}"
    );
    assert_eq!(node.admin_json("/v1/status")["failed_invocations"], 0);
    assert!(
        node.metrics()
            .contains("mayfly_invocations_total{function=\"sleepy\",outcome=\"client_closed\"} 1")
    );
    // The function's author can see what happened.
    eventually(Duration::from_secs(20), "the log line", || {
        let lines = node.admin_json("/v1/functions/sleepy/logs");
        lines.as_array()?.iter().find(|line| {
            line["line"] == "mayfly: the client went away before the response was done"
        })?;
        Some(())
    });
}

#[test]
fn sigterm_lets_running_invocations_finish_and_records_them() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--shutdown-grace", "20s"]);
    node.deploy("sleepy", "hostile", &["/"]);
    let gateway = node.gateway.clone();
    let slow = std::thread::spawn(move || {
        crate::common::agent()
            .get(format!("{gateway}/sleep?ms=1500"))
            .call()
            .map(|mut r| (r.status().as_u16(), r.body_mut().read_to_string().unwrap()))
    });
    eventually(Duration::from_secs(10), "the invocation to start", || {
        (node.admin_json("/v1/status")["instances_in_flight"] == 1).then_some(())
    });
    node.terminate();
    let answer = slow
        .join()
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(answer, (200, "slept 1500 ms\n".to_string()));
    node.wait_exit();

    let node = Node::start(dir.path());
    let records = node.usage_records(Some("sleepy"));
    assert_eq!(outcomes(&records), ["ok"]);
    assert!(records[0]["wall_us"].as_u64().unwrap() >= 1_500_000);
}

#[test]
fn invocations_past_the_grace_period_are_killed_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--shutdown-grace", "200ms"]);
    node.deploy("sleepy", "hostile", &["/"]);
    let gateway = node.gateway.clone();
    let slow = std::thread::spawn(move || {
        crate::common::agent()
            .get(format!("{gateway}/sleep?ms=30000"))
            .call()
            .map(|r| r.status().as_u16())
    });
    eventually(Duration::from_secs(10), "the invocation to start", || {
        (node.admin_json("/v1/status")["instances_in_flight"] == 1).then_some(())
    });
    node.stop();
    assert_eq!(slow.join().unwrap().ok(), Some(503));

    let node = Node::start(dir.path());
    assert_eq!(outcomes(&node.usage_records(Some("sleepy"))), ["killed"]);
}

#[test]
fn sigkill_never_doubles_a_record_and_loses_only_the_uncommitted_window() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    for _ in 0..40 {
        assert_eq!(node.get("/hello").0, 200);
    }
    // Once the ledger says it committed them, a SIGKILL cannot lose them.
    eventually(Duration::from_secs(10), "the ledger to commit", || {
        let status = node.admin_json("/v1/status");
        (status["ledger_records"] == 40 && status["ledger_pending"] == 0).then_some(())
    });
    node.kill();

    let node = Node::start(dir.path());
    assert_eq!(node.usage_records(Some("hello")).len(), 40);
    // Killed right after answering: the newest records may be lost (they
    // were within the commit window), but none is ever doubled.
    for _ in 0..40 {
        assert_eq!(node.get("/hello").0, 200);
    }
    node.kill();
    let node = Node::start(dir.path());
    let records = node.usage_records(Some("hello"));
    let distinct: HashSet<&str> = records
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert!((40..=80).contains(&records.len()), "{}", records.len());
    assert_eq!(distinct.len(), records.len(), "a record was doubled");
}
