//! Issue 15, findings 3 and 4: request ids are the node's, a client's id is
//! only a correlation field (it neither deduplicates the ledger nor steers an
//! automatic canary), and one function cannot take every slot of the node.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{Node, agent, eventually};

/// GETs `path` tagged with the client id `id`: (status, serving version,
/// the node's request id, the echoed client id).
fn get_tagged(node: &Node, path: &str, id: &str) -> (u16, u64, String, String) {
    let mut response = agent()
        .get(format!("{}{path}", node.gateway))
        .header("x-mayfly-request-id", id)
        .call()
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let answer = (
        response.status().as_u16(),
        header("x-mayfly-version").parse().unwrap_or(0),
        header("x-mayfly-request-id"),
        header("x-mayfly-client-request-id"),
    );
    // Read to the end: a client that drops an answer before its body is
    // done is recorded `client_closed`, and the tests count `ok` records.
    response.body_mut().read_to_string().unwrap();
    answer
}

#[test]
fn fifty_requests_with_one_client_id_are_fifty_ledger_records() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("f", "hello", &["/f"]);
    let answers: Vec<_> = (0..50)
        .map(|_| get_tagged(&node, "/f", "retry-1"))
        .collect();
    // Fifty invocations, fifty records, however the client tagged them.
    let records = node.await_usage_records("f", 50);
    assert!(
        records.iter().all(|r| r["client_request_id"] == "retry-1"),
        "{records:?}"
    );
    let recorded: HashSet<&str> = records
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    // The node's id is fresh every time and names the record; the client's
    // comes back beside it.
    let mut node_ids = HashSet::new();
    for (status, _, request_id, client_id) in &answers {
        assert_eq!(*status, 200);
        assert_eq!(request_id.len(), 32, "{request_id}");
        assert_eq!(client_id, "retry-1");
        assert!(recorded.contains(request_id.as_str()), "{request_id}");
        node_ids.insert(request_id.clone());
    }
    assert_eq!(node_ids.len(), 50);
}

#[test]
fn the_same_client_id_on_two_functions_gives_records_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("a", "hello", &["/a"]);
    node.deploy("b", "hello", &["/b"]);
    assert_eq!(get_tagged(&node, "/a", "shared-id").0, 200);
    assert_eq!(get_tagged(&node, "/b", "shared-id").0, 200);
    let a = node.await_usage_records("a", 1);
    let b = node.await_usage_records("b", 1);
    assert_eq!(a[0]["client_request_id"], "shared-id");
    assert_eq!(b[0]["client_request_id"], "shared-id");
    // The newer header works too, and wins over the older one.
    let response = agent()
        .get(format!("{}/b", node.gateway))
        .header("x-mayfly-client-request-id", "other-id")
        .header("x-mayfly-request-id", "ignored")
        .call()
        .unwrap();
    assert_eq!(response.headers()["x-mayfly-client-request-id"], "other-id");
    let b = node.await_usage_records("b", 2);
    assert_eq!(b[1]["client_request_id"], "other-id");
}

/// The `live` alias of `function`: (version, canary version, canary
/// invocations judged so far).
fn live_of(node: &Node, function: &str) -> (u64, Option<u64>, u64) {
    let aliases = node.admin_json(&format!("/v1/functions/{function}/aliases"));
    let live = &aliases[0];
    assert_eq!(live["alias"], "live");
    (
        live["version"].as_u64().unwrap(),
        live["canary"]["version"].as_u64(),
        live["canary"]["progress"]["requests"].as_u64().unwrap_or(0),
    )
}

/// A client id that the split sends to version `want`.
fn id_for(node: &Node, want: u64, tag: &str) -> String {
    (0..1000)
        .map(|i| format!("{tag}-{i}"))
        .find(|id| get_tagged(node, "/sleep?ms=0", id).1 == want)
        .expect("an id for the version")
}

#[test]
fn replaying_one_canary_bound_id_cannot_promote_or_roll_back_a_canary() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("c", "hostile", &["/sleep"]);
    // The same guest with another memory limit: a second version.
    node.deploy_with("c", "hostile", &["/sleep"], &["--memory", "64"]);
    let (ok, stdout, stderr) = node.cli(&[
        "alias",
        "set",
        "c",
        "live",
        "1",
        "--canary",
        "2=50%",
        "--auto",
        "--auto-requests",
        "5",
        "--max-p99",
        "1s",
    ]);
    assert!(ok, "{stdout}{stderr}");

    // Eight slow replays of one canary-bound id: one sample, no rollback.
    let slow = id_for(&node, 2, "slow");
    for _ in 0..8 {
        assert_eq!(get_tagged(&node, "/sleep?ms=1500", &slow).1, 2);
    }
    let (version, canary, judged) = live_of(&node, "c");
    assert_eq!(
        (version, canary),
        (1, Some(2)),
        "replays rolled the canary back"
    );
    assert_eq!(judged, 1);

    // Fifty fast replays of another: one more sample, no promotion.
    let fast = id_for(&node, 2, "fast");
    for _ in 0..50 {
        assert_eq!(get_tagged(&node, "/sleep?ms=0", &fast).1, 2);
    }
    let (version, canary, judged) = live_of(&node, "c");
    assert_eq!(
        (version, canary),
        (1, Some(2)),
        "replays promoted the canary"
    );
    assert_eq!(judged, 2);
    // Every replay ran and is billed all the same (the probe, then 50).
    let records = eventually(Duration::from_secs(30), "the replays' records", || {
        let records = node.usage_records(Some("c"));
        let replays = records
            .iter()
            .filter(|r| r["client_request_id"] == fast.as_str())
            .count();
        (replays == 51).then_some(records)
    });
    let not_ok: Vec<&serde_json::Value> = records.iter().filter(|r| r["outcome"] != "ok").collect();
    assert!(not_ok.is_empty(), "{not_ok:?}");

    // Distinct invocations still get the canary judged: promoted.
    let mut i = 0;
    eventually(Duration::from_secs(60), "the verdict", || {
        get_tagged(&node, "/sleep?ms=0", &format!("distinct-{i}"));
        i += 1;
        (live_of(&node, "c").1.is_none()).then_some(())
    });
    assert_eq!(live_of(&node, "c").0, 2);
}

/// The machine's memory in MB (the node's default memory budget).
fn physical_mb() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024
}

#[test]
fn with_default_settings_one_flooded_function_cannot_make_another_answer_429() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    // 1 GiB per invocation (the largest instance): with the default budget
    // (the machine's memory) a few dozen sleeping requests would take all
    // of the node's memory, as 1,100 took all its slots in the finding.
    node.deploy_with(
        "flood",
        "hostile",
        &["/sleep"],
        &["--memory", "1024", "--max-queued", "0"],
    );
    // The neighbour is as large: whatever memory the flood leaves over is
    // less than one of its invocations unless the flood is held back.
    node.deploy_with("other", "hello", &["/other"], &["--memory", "1024"]);
    let flood = (physical_mb() / 1024 + 8).min(400) as usize;
    let gateway = node.gateway.clone();
    let holders: Vec<_> = (0..flood)
        .map(|_| {
            let url = format!("{gateway}/sleep?ms=10000");
            thread::spawn(move || agent().get(&url).call().unwrap().status().as_u16())
        })
        .collect();
    // Every flood request is either running or already refused.
    eventually(Duration::from_secs(30), "the flood in place", || {
        let row = node.scaling_status("flood");
        let settled = row["running"].as_u64().unwrap() + row["throttled"].as_u64().unwrap();
        (settled == flood as u64).then_some(())
    });
    for _ in 0..20 {
        let (status, body) = node.get("/other");
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(node.scaling_status("other")["throttled"], 0);
    for holder in holders {
        assert!([200, 429].contains(&holder.join().unwrap()));
    }
}

/// Opens a POST to `path` with a chunked body and sends its first byte.
fn start_trickle(node: &Node, path: &str) -> TcpStream {
    let address = node.gateway.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n"
    )
    .unwrap();
    stream.flush().unwrap();
    stream
}

fn trickle_byte(stream: &mut TcpStream) {
    stream.write_all(b"1\r\nx\r\n").unwrap();
    stream.flush().unwrap();
}

/// Ends the body and reads the status of the answer.
fn finish_trickle(mut stream: TcpStream) -> u16 {
    let _ = stream.write_all(b"0\r\n\r\n");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

#[test]
fn a_trickling_body_holds_no_slot_and_times_out_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    // Two slots, no queue: two trickling bodies would take them all.
    node.deploy_with(
        "up",
        "echo",
        &["/up"],
        &["--max-concurrency", "2", "--max-queued", "0"],
    );
    let mut trickles = vec![start_trickle(&node, "/up"), start_trickle(&node, "/up")];
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for stream in &mut trickles {
            trickle_byte(stream);
        }
        let (status, _, _) = node.request("POST", "/up", b"whole");
        assert_eq!(status, 200, "a trickling body holds a slot");
        // The whole request's own slot is given back just after its
        // answer is sent; the trickles, holding none, let it reach 0.
        eventually(Duration::from_secs(10), "no running instance", || {
            (node.scaling_status("up")["running"] == 0).then_some(())
        });
    }
    // Once their bodies end, they are served.
    for stream in trickles {
        assert_eq!(finish_trickle(stream), 200);
    }

    // A body still trickling at the function's timeout ends in 408,
    // without having taken a slot or made a usage record.
    node.deploy_with("slow", "echo", &["/slow"], &["--timeout", "1s"]);
    let mut stream = start_trickle(&node, "/slow");
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut head = [0u8; 12];
    let status = eventually(Duration::from_secs(30), "the 408", || {
        let _ = stream.write_all(b"1\r\nx\r\n");
        match stream.read(&mut head) {
            Ok(12) => Some(std::str::from_utf8(&head[9..12]).unwrap().to_string()),
            _ => None,
        }
    });
    assert_eq!(status, "408");
    assert!(node.usage_records(Some("slow")).is_empty());
}
