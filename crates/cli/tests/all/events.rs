//! Event triggers, asynchronous invocation, retries, dead letters and the
//! stores behind them, end to end with the `events` guest (it logs one
//! `event id=… type=… … body=…` line per delivery; `fail:N` bodies fail
//! attempts up to N, `sleep:MS` bodies take MS ms).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Node, agent, eventually};

/// One delivery as the guest logged it.
#[derive(Debug, Clone)]
pub(crate) struct Logged {
    fields: HashMap<String, String>,
    pub(crate) body: String,
}

impl Logged {
    pub(crate) fn get(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }
}

/// Every delivery `function` logged, oldest first.
pub(crate) fn deliveries(node: &Node, function: &str) -> Vec<Logged> {
    try_deliveries(node, function).unwrap_or_else(|answer| panic!("log lines: {answer}"))
}

/// Every delivery `function` logged, oldest first, or the node's answer
/// when it is not a list of lines (a fleet node that has not followed a
/// deploy yet answers 404).
/// In a fleet a node's log tail is every node's: only the lines `node`
/// itself wrote are taken.
pub(crate) fn try_deliveries(node: &Node, function: &str) -> Result<Vec<Logged>, Value> {
    let lines = node.admin_json(&format!("/v1/functions/{function}/logs?tail=100000"));
    let Some(lines) = lines.as_array() else {
        return Err(lines);
    };
    Ok(lines
        .iter()
        .filter(|line| {
            line["node"]
                .as_str()
                .is_none_or(|writer| writer == node.name)
        })
        .filter_map(|line| line["line"].as_str())
        .filter_map(|line| line.strip_prefix("event "))
        .map(|line| {
            let (head, body) = line.split_once(" body=").unwrap_or((line, ""));
            let fields = head
                .split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Logged {
                fields,
                body: body.to_string(),
            }
        })
        .collect())
}

/// Waits until `function` logged a delivery matching `wanted`.
fn await_delivery(node: &Node, function: &str, wanted: impl Fn(&Logged) -> bool) -> Logged {
    eventually(Duration::from_secs(30), "an event delivery", || {
        deliveries(node, function).into_iter().find(&wanted)
    })
}

/// Sends an admin API request; returns (status, JSON answer or Null).
pub(crate) fn admin(
    node: &Node,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    let mut request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", node.admin))
        .header("authorization", node.bearer());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(body.to_vec()).expect("valid request");
    let mut response = agent().run(request).expect("admin API answers");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn add_trigger(node: &Node, function: &str, spec: Value) -> Value {
    let (status, trigger) = admin(
        node,
        "POST",
        &format!("/v1/functions/{function}/triggers"),
        &[("content-type", "application/json")],
        spec.to_string().as_bytes(),
    );
    assert_eq!(status, 201, "trigger refused: {trigger}");
    trigger
}

pub(crate) fn send(node: &Node, queue: &str, body: &str) -> String {
    let (status, sent) = admin(
        node,
        "POST",
        &format!("/v1/queues/{queue}/messages"),
        &[],
        body.as_bytes(),
    );
    assert_eq!(status, 201, "{sent}");
    sent["id"].as_str().expect("message id").to_string()
}

pub(crate) fn invoke_async(node: &Node, function: &str, query: &str, body: &str) -> String {
    let (status, accepted) = admin(
        node,
        "POST",
        &format!("/v1/functions/{function}/invoke?async=true{query}"),
        &[("content-type", "text/plain")],
        body.as_bytes(),
    );
    assert_eq!(status, 202, "{accepted}");
    accepted["event_id"].as_str().expect("event id").to_string()
}

pub(crate) fn dead_letters(node: &Node, function: &str) -> Vec<Value> {
    node.admin_json(&format!("/v1/functions/{function}/dlq"))
        .as_array()
        .expect("dead letters")
        .clone()
}

fn assert_cloud_event(event: &Logged, ty: &str, source: &str) {
    assert_eq!(event.get("type"), ty, "{event:?}");
    assert_eq!(event.get("source"), source, "{event:?}");
    assert_eq!(event.get("specversion"), "1.0", "{event:?}");
    assert_eq!(event.get("id").len(), 32, "{event:?}");
    assert!(
        humantime::parse_rfc3339(event.get("time")).is_ok(),
        "ce-time is not RFC 3339: {event:?}"
    );
}

#[test]
fn every_trigger_kind_delivers_a_cloud_event_in_binary_mode() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("ev", "events", &[]);
    add_trigger(
        &node,
        "ev",
        json!({"source": {"kind": "queue", "queue": "orders"}}),
    );
    add_trigger(
        &node,
        "ev",
        json!({"source": {"kind": "kv", "bucket": "cfg", "prefix": "app/"}}),
    );
    add_trigger(
        &node,
        "ev",
        json!({"source": {"kind": "object", "bucket": "uploads", "prefix": "in/", "suffix": ".csv"}}),
    );

    // Queue: the message body is the data; the subject is the message id.
    let id = send(&node, "orders", "order 42");
    let queued = await_delivery(&node, "ev", |e| e.get("type") == "dev.mayfly.queue.message");
    assert_cloud_event(&queued, "dev.mayfly.queue.message", "/queues/orders");
    assert_eq!(queued.get("subject"), id);
    assert_eq!(queued.get("attempt"), "1");
    assert_eq!(queued.body, "order 42");

    // KV: puts and deletes under the prefix, nothing for other keys.
    let (status, _) = admin(&node, "PUT", "/v1/kv/cfg/other/x", &[], b"ignored");
    assert_eq!(status, 200);
    let (status, put) = admin(&node, "PUT", "/v1/kv/cfg/app/colour", &[], b"blue");
    assert_eq!(status, 200, "{put}");
    let kv = await_delivery(&node, "ev", |e| e.get("type") == "dev.mayfly.kv.put");
    assert_cloud_event(&kv, "dev.mayfly.kv.put", "/kv/cfg");
    assert_eq!(kv.get("subject"), "app/colour");
    assert_eq!(kv.body, "blue");
    let (status, _) = admin(&node, "DELETE", "/v1/kv/cfg/app/colour", &[], b"");
    assert_eq!(status, 204);
    let deleted = await_delivery(&node, "ev", |e| e.get("type") == "dev.mayfly.kv.delete");
    assert_eq!(deleted.get("subject"), "app/colour");

    // Objects: prefix and suffix filter; the data is the object's metadata.
    let (status, _) = admin(
        &node,
        "PUT",
        "/v1/buckets/uploads/objects/in/notes.txt",
        &[],
        b"x",
    );
    assert_eq!(status, 200);
    let (status, meta) = admin(
        &node,
        "PUT",
        "/v1/buckets/uploads/objects/in/day%201.csv",
        &[("content-type", "text/csv")],
        b"a,b\n1,2\n",
    );
    assert_eq!(status, 200, "{meta}");
    let created = await_delivery(&node, "ev", |e| {
        e.get("type") == "dev.mayfly.object.created"
    });
    assert_cloud_event(&created, "dev.mayfly.object.created", "/buckets/uploads");
    // Header values are percent-encoded, as the binary mode asks.
    assert_eq!(created.get("subject"), "in/day%201.csv");
    assert_eq!(created.get("content-type"), "application/json");
    let data: Value = serde_json::from_str(&created.body).unwrap();
    assert_eq!(data["key"], "in/day 1.csv");
    assert_eq!(data["size"], 8);
    assert_eq!(data["etag"], meta["etag"]);
    assert_eq!(data["event"], "created");
    let (status, _) = admin(
        &node,
        "DELETE",
        "/v1/buckets/uploads/objects/in/day%201.csv",
        &[],
        b"",
    );
    assert_eq!(status, 204);
    await_delivery(&node, "ev", |e| {
        e.get("type") == "dev.mayfly.object.deleted"
    });

    // Asynchronous invocation: 202 with the id the function then sees.
    let event_id = invoke_async(&node, "ev", "&path=/jobs?x=1", "do it");
    let invoked = await_delivery(&node, "ev", |e| e.get("id") == event_id);
    assert_cloud_event(&invoked, "dev.mayfly.invoke", "/functions/ev");
    assert_eq!(invoked.get("path"), "/jobs?x=1");
    assert_eq!(invoked.get("content-type"), "text/plain");
    assert_eq!(invoked.body, "do it");

    // Nothing for the filtered-out writes, and one ledger record per
    // delivery, labelled with its trigger.
    let all = deliveries(&node, "ev");
    assert_eq!(all.len(), 6, "{all:?}");
    let records = node.await_usage_records("ev", 6);
    let mut triggers: Vec<&str> = records
        .iter()
        .map(|r| r["trigger"].as_str().unwrap())
        .collect();
    triggers.sort_unstable();
    assert_eq!(triggers, ["async", "kv", "kv", "object", "object", "queue"]);
}

#[test]
fn a_schedule_fires_on_its_interval_and_stops_when_removed() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("tick", "events", &[]);
    let (ok, _, stderr) = node.cli(&["trigger", "add", "tick", "--schedule", "61 * * * *"]);
    assert!(!ok && stderr.contains("minute"), "{stderr}");
    let (ok, stdout, stderr) = node.cli(&[
        "--json",
        "trigger",
        "add",
        "tick",
        "--schedule",
        "@every 1s",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let trigger: Value = serde_json::from_str(&stdout).unwrap();

    let ticks = eventually(Duration::from_secs(30), "three scheduled runs", || {
        let ticks = deliveries(&node, "tick");
        (ticks.len() >= 3).then_some(ticks)
    });
    let mut scheduled = Vec::new();
    for tick in &ticks {
        assert_cloud_event(
            tick,
            "dev.mayfly.schedule",
            &format!("/schedules/{}", trigger["id"]),
        );
        let data: Value = serde_json::from_str(&tick.body).unwrap();
        assert_eq!(data["schedule"], "@every 1s");
        scheduled.push(humantime::parse_rfc3339(data["scheduled_time"].as_str().unwrap()).unwrap());
    }
    assert!(scheduled.windows(2).all(|w| w[0] < w[1]), "{scheduled:?}");
    let ids: HashSet<&str> = ticks.iter().map(|t| t.get("id")).collect();
    assert_eq!(ids.len(), ticks.len(), "each run is its own event");

    let (ok, _, stderr) = node.cli(&["trigger", "remove", &trigger["id"].to_string()]);
    assert!(ok, "{stderr}");
    let (_, listed, _) = node.cli(&["--json", "trigger", "list", "tick"]);
    assert_eq!(serde_json::from_str::<Value>(&listed).unwrap(), json!([]));
}

#[test]
fn failed_deliveries_are_retried_then_dead_lettered_and_redrive_delivers_them() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("flaky", "events", &[]);

    // Fails twice, then succeeds: three attempts of one event id.
    let id = invoke_async(&node, "flaky", "&max_attempts=5&backoff_ms=50", "fail:2");
    await_delivery(&node, "flaky", |e| {
        e.get("id") == id && e.get("attempt") == "3"
    });
    let attempts: Vec<String> = deliveries(&node, "flaky")
        .iter()
        .filter(|e| e.get("id") == id)
        .map(|e| e.get("attempt").to_string())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);

    // A queue trigger allowing 2 attempts: an always-failing message ends in
    // the dead-letter queue with its last error.
    let (ok, _, stderr) = node.cli(&[
        "trigger",
        "add",
        "flaky",
        "--queue",
        "jobs",
        "--max-attempts",
        "2",
        "--backoff",
        "50ms",
    ]);
    assert!(ok, "{stderr}");
    let message = send(&node, "jobs", "fail:always");
    let dead = eventually(Duration::from_secs(30), "a dead letter", || {
        dead_letters(&node, "flaky").into_iter().next()
    });
    assert_eq!(dead["subject"], message);
    assert_eq!(dead["attempts"], 2);
    assert_eq!(dead["type"], "dev.mayfly.queue.message");
    assert!(
        dead["last_error"].as_str().unwrap().contains("500"),
        "{dead}"
    );
    let (ok, shown, _) = node.cli(&["dlq", "show", "flaky", &dead["id"].to_string()]);
    assert!(ok && shown.contains("fail:always"), "{shown}");
    let (_, queues) = admin(&node, "GET", "/v1/queues", &[], b"");
    assert_eq!(queues, json!([]), "a dead message leaves its queue");

    // The bug is fixed (a new version that accepts everything); redrive
    // delivers the same event again and the dead-letter queue empties.
    node.deploy("flaky", "echo", &[]);
    let (ok, stdout, stderr) = node.cli(&["dlq", "redrive", "flaky"]);
    assert!(ok, "{stdout}{stderr}");
    eventually(Duration::from_secs(30), "the redriven event", || {
        node.usage_records(Some("flaky"))
            .iter()
            .any(|r| r["version"] == 2 && r["trigger"] == "queue" && r["outcome"] == "ok")
            .then_some(())
    });
    assert!(dead_letters(&node, "flaky").is_empty());
    assert!(
        node.metrics()
            .contains("mayfly_event_deliveries_total{function=\"flaky\",result=\"dead\"} 1")
    );
}

#[test]
fn changes_to_one_key_are_delivered_in_commit_order_even_across_retries() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("ordered", "events", &[]);
    add_trigger(
        &node,
        "ordered",
        json!({"source": {"kind": "kv", "bucket": "b"}, "retry": {"max_attempts": 5, "backoff_ms": 100}}),
    );
    // The first change fails twice: the 19 after it must wait for it.
    let mut written = vec!["fail:2".to_string()];
    written.extend((1..20).map(|n| format!("v{n}")));
    for value in &written {
        let (status, _) = admin(&node, "PUT", "/v1/kv/b/counter", &[], value.as_bytes());
        assert_eq!(status, 200);
    }
    let delivered = eventually(Duration::from_secs(30), "20 changes", || {
        let ok: Vec<String> = deliveries(&node, "ordered")
            .into_iter()
            .filter(|e| e.body != "fail:2" || e.get("attempt") == "3")
            .map(|e| e.body)
            .collect();
        (ok.len() == written.len()).then_some(ok)
    });
    assert_eq!(delivered, written);
}

#[test]
fn a_slow_function_does_not_delay_another_functions_events() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("slow", "events", &[]);
    node.deploy("fast", "events", &[]);
    add_trigger(
        &node,
        "slow",
        json!({"source": {"kind": "queue", "queue": "slow-q", "max_concurrency": 1, "batch_size": 1}}),
    );
    add_trigger(
        &node,
        "fast",
        json!({"source": {"kind": "queue", "queue": "fast-q"}}),
    );
    for _ in 0..5 {
        send(&node, "slow-q", "sleep:1500");
    }
    await_delivery(&node, "slow", |_| true);
    send(&node, "fast-q", "quick");
    await_delivery(&node, "fast", |e| e.body == "quick");
    // The slow function's backlog is still there: the fast one's event did
    // not wait behind it.
    let (_, queues) = admin(&node, "GET", "/v1/queues", &[], b"");
    let slow = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "slow-q")
        .cloned()
        .unwrap_or_else(|| panic!("slow-q drained already: {queues}"));
    assert!(slow["messages"].as_u64().unwrap() >= 2, "{slow}");
}

#[test]
fn after_a_sigkill_every_accepted_event_is_still_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy_with("work", "events", &[], &["--max-concurrency", "4"]);
    add_trigger(
        &node,
        "work",
        json!({"source": {"kind": "queue", "queue": "work", "max_concurrency": 4, "batch_size": 4}}),
    );
    // 60 messages taking 50 ms each with 4 at a time: ~0.75 s of work, so
    // the kill lands with messages queued and in flight.
    let messages: Vec<Value> = (0..60).map(|_| json!("sleep:50")).collect();
    let (status, sent) = admin(
        &node,
        "POST",
        "/v1/queues/work/batch",
        &[("content-type", "application/json")],
        json!({"messages": messages}).to_string().as_bytes(),
    );
    assert_eq!(status, 201, "{sent}");
    assert_eq!(sent["ids"].as_array().unwrap().len(), 60);
    // And asynchronous invocations, through the function's inbox.
    let mut async_ids: Vec<String> = Vec::new();
    for _ in 0..10 {
        async_ids.push(invoke_async(&node, "work", "", "sleep:50"));
    }
    await_delivery(&node, "work", |_| true);
    node.kill();

    // What the killed node had not acknowledged is exactly what is left in
    // its database: an event is deleted only after its 2xx.
    let db = rusqlite::Connection::open(dir.path().join("events.db")).unwrap();
    let left = |sql: &str| -> Vec<(String, String, i64)> {
        let mut statement = db.prepare(sql).unwrap();
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let pending = left("SELECT CAST(id AS TEXT), event_id, leased FROM messages");
    let dead = left("SELECT CAST(id AS TEXT), event_id, 0 FROM dead_letters");
    drop(db);
    assert!(dead.is_empty(), "nothing failed: {dead:?}");
    assert!(
        !pending.is_empty(),
        "the kill came too late to test anything"
    );
    assert!(
        pending.iter().any(|(_, _, leased)| *leased == 1),
        "no delivery was in flight at the kill: {pending:?}"
    );
    let pending_events: HashSet<&str> =
        pending.iter().map(|(_, event, _)| event.as_str()).collect();
    assert!(
        async_ids.iter().all(|id| id.len() == 32),
        "every asynchronous invocation was accepted: {async_ids:?}"
    );

    // After a restart, every one of them is delivered.
    let node = Node::start(dir.path());
    eventually(
        Duration::from_secs(60),
        "every pending event delivered",
        || {
            let seen: HashSet<String> = deliveries(&node, "work")
                .into_iter()
                .map(|e| e.get("id").to_string())
                .collect();
            pending_events
                .iter()
                .all(|id| seen.contains(*id))
                .then_some(())
        },
    );
    eventually(Duration::from_secs(30), "empty queues", || {
        let (_, queues) = admin(&node, "GET", "/v1/queues", &[], b"");
        let backlog = node
            .metrics()
            .lines()
            .any(|l| l.starts_with("mayfly_event_queue_depth{") && !l.ends_with(" 0"));
        (queues == json!([]) && !backlog).then_some(())
    });
    assert!(dead_letters(&node, "work").is_empty());
}

#[test]
fn the_stores_answer_and_refuse_like_their_contract_says() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());

    // KV compare-and-swap.
    let (status, first) = admin(&node, "PUT", "/v1/kv/b/k", &[("if-none-match", "*")], b"1");
    assert_eq!(status, 200, "{first}");
    let (status, _) = admin(&node, "PUT", "/v1/kv/b/k", &[("if-none-match", "*")], b"2");
    assert_eq!(status, 412);
    let revision = first["revision"].to_string();
    let (status, second) = admin(&node, "PUT", "/v1/kv/b/k", &[("if-match", &revision)], b"2");
    assert_eq!(status, 200);
    assert!(second["revision"].as_u64() > first["revision"].as_u64());
    let (status, stale) = admin(&node, "PUT", "/v1/kv/b/k", &[("if-match", &revision)], b"3");
    assert_eq!(status, 412, "{stale}");
    assert!(
        stale["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revision")
    );
    let (ok, value, _) = node.cli(&["kv", "get", "b", "k"]);
    assert!(ok);
    assert_eq!(value.trim(), "2");

    // Objects round-trip with their type and etag.
    let (ok, _, stderr) = node.cli(&[
        "object",
        "put",
        "docs",
        "a/b.txt",
        "--file",
        "-",
        "--content-type",
        "text/plain",
    ]);
    assert!(!ok || stderr.is_empty());
    let (status, meta) = admin(
        &node,
        "PUT",
        "/v1/buckets/docs/objects/a/b.txt",
        &[("content-type", "text/plain")],
        b"hello",
    );
    assert_eq!(status, 200);
    let response = agent()
        .get(format!("{}/v1/buckets/docs/objects/a/b.txt", node.admin))
        .header("authorization", node.bearer())
        .call()
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/plain");
    assert_eq!(
        response.headers()["etag"].to_str().unwrap(),
        meta["etag"].as_str().unwrap()
    );
    let (ok, listed, _) = node.cli(&["--json", "object", "list", "docs", "--prefix", "a/"]);
    assert!(ok && listed.contains("a/b.txt"), "{listed}");

    // Queues: receive hides a message until acknowledged; a stale receipt
    // is refused.
    send(&node, "q", "one");
    let (_, received) = admin(
        &node,
        "POST",
        "/v1/queues/q/receive?visibility=100ms",
        &[],
        b"",
    );
    let first = received["messages"][0].clone();
    assert_eq!(first["body"], "one");
    let again = eventually(Duration::from_secs(10), "the message back", || {
        let (_, received) = admin(
            &node,
            "POST",
            "/v1/queues/q/receive?visibility=1m",
            &[],
            b"",
        );
        received["messages"].as_array().unwrap().first().cloned()
    });
    assert_eq!(again["attempts"], 2);
    let (status, _) = admin(
        &node,
        "DELETE",
        &format!(
            "/v1/queues/q/messages/{}",
            first["receipt"].as_str().unwrap()
        ),
        &[],
        b"",
    );
    assert_eq!(status, 409);
    let (status, _) = admin(
        &node,
        "DELETE",
        &format!(
            "/v1/queues/q/messages/{}",
            again["receipt"].as_str().unwrap()
        ),
        &[],
        b"",
    );
    assert_eq!(status, 204);

    // Bad input gets a 4xx that says what to do.
    for (method, path, body, expected) in [
        ("PUT", "/v1/kv/Bad%20Bucket/k", &b"x"[..], 400),
        ("POST", "/v1/queues/q/receive?max=0", b"", 400),
        ("POST", "/v1/queues/q/receive?visibility=forever", b"", 400),
        ("DELETE", "/v1/queues/q/messages/nonsense", b"", 400),
        (
            "POST",
            "/v1/functions/nobody/triggers",
            br#"{"source":{"kind":"queue","queue":"q"}}"#,
            404,
        ),
        ("POST", "/v1/functions/nobody/invoke?async=true", b"", 404),
        ("GET", "/v1/kv/b/missing", b"", 404),
    ] {
        let (status, answer) = admin(
            &node,
            method,
            path,
            &[("content-type", "application/json")],
            body,
        );
        assert_eq!(status, expected, "{method} {path}: {answer}");
        if status != 404 || path.contains("triggers") {
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{answer}"
            );
        }
    }
    node.deploy("f", "events", &[]);
    let (status, answer) = admin(
        &node,
        "POST",
        "/v1/functions/f/triggers",
        &[("content-type", "application/json")],
        br#"{"source":{"kind":"kv","bucket":"b","prefx":"a"}}"#,
    );
    assert_eq!(status, 400);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prefx"),
        "{answer}"
    );
    let oversized = format!("{{\"messages\": [1, \"{}\"]}}", "x".repeat(300 << 10));
    let (status, answer) = admin(
        &node,
        "POST",
        "/v1/queues/q/batch",
        &[("content-type", "application/json")],
        oversized.as_bytes(),
    );
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("message 1"),
        "{answer}"
    );
    let (status, _) = admin(
        &node,
        "POST",
        "/v1/functions/f/dlq/redrive",
        &[],
        br#"{"ids": []}"#,
    );
    assert_eq!(status, 400);
    let big = vec![b'x'; (1 << 20) + 1];
    let (status, _) = admin(&node, "PUT", "/v1/kv/b/big", &[], &big);
    assert_eq!(status, 413);
}

#[test]
fn an_event_cut_off_by_shutdown_is_not_an_attempt_and_runs_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--shutdown-grace", "200ms"]);
    node.deploy("long", "events", &[]);
    // One attempt allowed: if the kill at shutdown counted, it would die.
    let id = invoke_async(&node, "long", "&max_attempts=1", "sleep:3000");
    await_delivery(&node, "long", |e| e.get("id") == id);
    node.stop();

    let node = Node::start(dir.path());
    eventually(
        Duration::from_secs(30),
        "the event delivered after restart",
        || {
            node.usage_records(Some("long"))
                .iter()
                .any(|r| r["trigger"] == "async" && r["outcome"] == "ok")
                .then_some(())
        },
    );
    assert!(dead_letters(&node, "long").is_empty());
    let attempts: Vec<String> = deliveries(&node, "long")
        .iter()
        .map(|e| e.get("attempt").to_string())
        .collect();
    assert_eq!(attempts, ["1", "1"], "the cut-off run was given back");
}

/// The version that logged the delivery whose body is `body`, once it did.
fn delivered_by(node: &Node, function: &str, body: &str) -> u64 {
    eventually(Duration::from_secs(30), "the delivery", || {
        let lines = node.admin_json(&format!("/v1/functions/{function}/logs?tail=1000"));
        lines.as_array()?.iter().find_map(|line| {
            let text = line["line"].as_str()?;
            (text.starts_with("event ") && text.ends_with(&format!("body={body}")))
                .then(|| line["version"].as_u64())
                .flatten()
        })
    })
}

#[test]
fn a_trigger_delivers_to_the_alias_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("t", "events", &[]);
    node.deploy_with("t", "events", &[], &["--var", "edition=2"]);

    // An alias that does not exist is refused, saying how to make it.
    let (ok, _, stderr) = node.cli(&["trigger", "add", "t", "--queue", "jobs", "--alias", "beta"]);
    assert!(
        !ok && stderr.contains("mayfly alias set t beta"),
        "{stderr}"
    );

    let (ok, _, stderr) = node.cli(&["alias", "set", "t", "beta", "1"]);
    assert!(ok, "{stderr}");
    for source in [["--queue", "jobs"], ["--kv", "settings"]] {
        let (ok, stdout, stderr) = node.cli(&[
            "trigger", "add", "t", source[0], source[1], "--alias", "beta",
        ]);
        assert!(ok && stdout.contains("-> beta"), "{stdout}{stderr}");
    }
    // A queue trigger and an inbox (KV) trigger reach version 1 through
    // `beta`; an asynchronous invoke still reaches `live` (version 2).
    send(&node, "jobs", "for-beta");
    let (ok, _, stderr) = node.cli(&["kv", "set", "settings", "k", "kv-for-beta"]);
    assert!(ok, "{stderr}");
    invoke_async(&node, "t", "", "for-live");
    assert_eq!(delivered_by(&node, "t", "for-beta"), 1);
    assert_eq!(delivered_by(&node, "t", "kv-for-beta"), 1);
    assert_eq!(delivered_by(&node, "t", "for-live"), 2);

    // Moving the alias moves the trigger's deliveries.
    let (ok, _, stderr) = node.cli(&["alias", "set", "t", "beta", "2"]);
    assert!(ok, "{stderr}");
    send(&node, "jobs", "after-move");
    assert_eq!(delivered_by(&node, "t", "after-move"), 2);

    // The alias cannot go while a trigger delivers to it.
    let (ok, _, stderr) = node.cli(&["alias", "delete", "t", "beta"]);
    assert!(!ok && stderr.contains("trigger remove"), "{stderr}");
    let (ok, listing, _) = node.cli(&["trigger", "list", "t"]);
    assert!(ok && listing.matches("-> beta").count() == 2, "{listing}");
}
