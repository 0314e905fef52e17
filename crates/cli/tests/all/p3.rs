//! WASI 0.3 (`wasi:http/handler`) components served beside WASI 0.2 ones on
//! one node: answered, streamed, metered, logged and held to their limits.

use std::time::Duration;

use crate::common::{Node, eventually};

#[test]
fn p3_and_p2_functions_are_served_side_by_side_and_metered() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    node.deploy("p3-hello", "p3_hello", &["/p3/hello"]);
    node.deploy("p3-echo", "p3_echo", &["/p3/echo"]);

    assert_eq!(node.get("/hello"), (200, "Hello, world!\n".to_string()));
    assert_eq!(node.get("/p3/hello"), (200, "Hello, world!\n".to_string()));

    // Several MB, each byte distinct by position, so a lost, repeated or
    // reordered chunk shows.
    let body: Vec<u8> = (0..6_000_000u32).map(|i| (i % 251) as u8).collect();
    let (status, echoed, _) = node.request("POST", "/p3/echo", &body);
    assert_eq!(status, 200);
    assert_eq!(echoed.len(), body.len());
    assert!(echoed == body, "the echoed body differs from the request's");

    for function in ["hello", "p3-hello", "p3-echo"] {
        let records = node.await_usage_records(function, 1);
        let record = &records[0];
        assert_eq!(record["outcome"], "ok", "{function}: {record}");
        assert_eq!(record["status"], 200, "{function}: {record}");
        assert!(
            record["peak_memory_bytes"].as_u64().unwrap() > 0,
            "{function}: {record}"
        );
    }

    eventually(Duration::from_secs(10), "the p3 guest's log line", || {
        let (ok, logs, _) = node.cli(&["logs", "p3-hello"]);
        (ok && logs.contains("p3-hello answering /p3/hello")).then_some(())
    });
}

#[test]
fn p3_guests_over_their_limits_end_with_the_right_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy_with(
        "p3-hostile",
        "p3_hello",
        &["/p3"],
        &["--memory", "32", "--timeout", "2s"],
    );

    let (status, _) = node.get("/p3/oom");
    assert_eq!(status, 500);
    let (status, _) = node.get("/p3/spin");
    assert_eq!(status, 504);
    // And the function still answers after both.
    assert_eq!(node.get("/p3/hello"), (200, "Hello, world!\n".to_string()));

    let records = node.await_usage_records("p3-hostile", 3);
    let mut outcomes: Vec<&str> = records
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["ok", "oom", "timeout"]);
}

#[test]
fn p3_components_are_refused_what_is_not_supported_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let wasm = crate::common::guest("p3_hello");
    let (ok, stdout, stderr) = node.cli(&[
        "deploy",
        "kept",
        wasm.to_str().unwrap(),
        "--route",
        "/kept",
        "--reuse",
    ]);
    let output = format!("{stdout}{stderr}");
    assert!(!ok, "{output}");
    assert!(
        output.contains("`reuse`") && output.contains("deploy it without reuse"),
        "{output}"
    );
}

#[test]
fn p3_outbound_http_passes_the_same_grants_as_p2() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    // The node's own gateway is the upstream: a loopback address, reachable
    // only when named in a grant.
    let upstream = node.gateway.trim_start_matches("http://").to_string();
    node.deploy("bare", "p3_hello", &["/bare"]);
    node.deploy_with(
        "granted",
        "p3_hello",
        &["/granted"],
        &["--outbound", &node.gateway],
    );

    let (status, body) = node.get(&format!("/bare/fetch/{upstream}"));
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("HttpRequestDenied"), "{body}");
    eventually(Duration::from_secs(10), "the refusal in the log", || {
        let (ok, logs, _) = node.cli(&["logs", "bare"]);
        (ok && logs.contains("mayfly:") && logs.contains("outbound")).then_some(())
    });

    // Through the gateway to a route of no function: 404, but it got there.
    let (status, body) = node.get(&format!("/granted/fetch/{upstream}"));
    assert_eq!((status, body.as_str()), (200, "status=404\n"));
}
