//! Serving requests: routing, bodies, failures, logs, restarts.

use std::time::Duration;

use crate::common::{Node, eventually};

#[test]
fn deployed_function_answers_over_http_and_cli() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);

    assert_eq!(node.get("/hello"), (200, "Hello, world!\n".to_string()));
    assert_eq!(node.get("/hello/sub/path?q=1").0, 200);

    let (ok, stdout, stderr) = node.cli(&["invoke", "hello"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "Hello, world!\n");

    let (ok, stdout, _) = node.cli(&["list"]);
    assert!(ok);
    assert!(
        stdout.contains("hello") && stdout.contains("/hello"),
        "{stdout}"
    );
    let (ok, stdout, _) = node.cli(&["--json", "list"]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(list[0]["name"], "hello");
}

#[test]
fn echo_round_trips_a_mebibyte_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("echo", "echo", &["/echo"]);

    // Every byte value, in a pattern that would show a shifted or lost chunk.
    let body: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (status, echoed, id) = node.request("PUT", "/echo/a/b?x=y", &body);
    assert_eq!(status, 200);
    assert_eq!(echoed.len(), body.len());
    assert!(
        echoed == body,
        "the echoed body differs from the request body"
    );
    assert_eq!(id.len(), 32, "each response carries a request id");

    let mut response = crate::common::agent()
        .post(format!("{}/echo/path?q=1", node.gateway))
        .header("x-custom", "value")
        .send("hi")
        .unwrap();
    let headers = response.headers().clone();
    assert_eq!(headers["x-echo-method"], "POST");
    assert_eq!(headers["x-echo-path"], "/echo/path?q=1");
    assert_eq!(headers["x-echo-header-x-custom"], "value");
    assert_eq!(response.body_mut().read_to_string().unwrap(), "hi");
}

#[test]
fn unknown_route_is_404() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    assert_eq!(node.get("/").0, 404);
    node.deploy("hello", "hello", &["/hello"]);
    assert_eq!(node.get("/nothing/here").0, 404);
    assert_eq!(
        node.get("/hellothere").0,
        404,
        "prefixes match whole segments"
    );
}

#[test]
fn host_routes_win_over_path_routes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/"]);
    node.deploy("echo", "echo", &["shop.example/"]);
    let mut response = crate::common::agent()
        .get(format!("{}/anything", node.gateway))
        .header("host", "shop.example:8080")
        .call()
        .unwrap();
    assert_eq!(response.headers()["x-echo-path"], "/anything");
    drop(response.body_mut().read_to_string());
    assert_eq!(node.get("/anything").1, "Hello, world!\n");
}

#[test]
fn trapping_guest_gets_500_while_others_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    node.deploy("trap", "trap", &["/trap"]);

    std::thread::scope(|scope| {
        let traps: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| (0..10).map(|_| node.get("/trap").0).collect::<Vec<_>>()))
            .collect();
        let hellos: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| (0..10).map(|_| node.get("/hello")).collect::<Vec<_>>()))
            .collect();
        for trap in traps {
            assert!(trap.join().unwrap().iter().all(|&status| status == 500));
        }
        for hello in hellos {
            for (status, body) in hello.join().unwrap() {
                assert_eq!((status, body.as_str()), (200, "Hello, world!\n"));
            }
        }
    });
    let status = node.admin_json("/v1/status");
    assert_eq!(status["failed_invocations"], 40);
}

#[test]
fn guest_output_becomes_log_lines_tagged_with_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("logs", "logs", &["/logs"]);
    let (status, _, request_id) = node.request("GET", "/logs/first", b"");
    assert_eq!(status, 200);

    let lines = eventually(Duration::from_secs(20), "log lines", || {
        let lines = node.admin_json("/v1/functions/logs/logs");
        let lines = lines.as_array()?.clone();
        (lines.len() >= 4).then_some(lines)
    });
    let text: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["stream"].as_str().unwrap(), l["line"].as_str().unwrap()))
        .collect();
    assert!(
        text.contains(&("stdout", "stdout line one for /logs/first")),
        "{text:?}"
    );
    assert!(text.contains(&("stdout", "stdout line two")));
    assert!(text.contains(&("stderr", "stderr line")));
    assert!(text.contains(&("stdout", "no trailing newline")));
    for line in &lines {
        assert_eq!(line["request_id"], request_id.as_str());
        assert_eq!(line["version"], 1);
    }

    let (ok, stdout, _) = node.cli(&["logs", "logs"]);
    assert!(ok);
    assert!(
        stdout.contains(&request_id) && stdout.contains("stderr line"),
        "{stdout}"
    );
}

#[test]
fn logs_follow_streams_new_lines() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("logs", "logs", &["/logs"]);
    let mut follower = std::process::Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["logs", "logs", "--follow"])
        .env("MAYFLY_ADMIN_URL", &node.admin)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("stdout line one for /logs/followed"))
    });
    // The follower may connect after the first request: keep requesting
    // until it has seen one.
    eventually(Duration::from_secs(20), "the follower to print", || {
        node.get("/logs/followed");
        reader.is_finished().then_some(())
    });
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(reader.join().unwrap().is_some());
}

#[test]
fn restart_serves_again_without_recompiling() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("hello", "hello", &["/hello"]);
    node.deploy("echo", "echo", &["/echo"]);
    assert_eq!(node.admin_json("/v1/status")["compilations"], 2);
    node.stop();

    let node = Node::start(dir.path());
    let status = node.admin_json("/v1/status");
    assert_eq!(status["compilations"], 0, "{status}");
    assert_eq!(status["artifact_cache_hits"], 2, "{status}");
    assert_eq!(node.get("/hello"), (200, "Hello, world!\n".to_string()));
    assert_eq!(node.request("POST", "/echo", b"again").1, b"again");
    assert_eq!(node.admin_json("/v1/status")["compilations"], 0);
}

#[test]
fn component_written_for_other_wasi_http_hosts_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("compat", "proxy_compat", &["/compat"]);
    assert_eq!(
        node.get("/compat/x"),
        (200, "compat guest saw /compat/x\n".to_string())
    );
}
