//! Host resources a guest spends count against its invocation: wasi:http
//! `fields` against its memory limit, wasi:keyvalue batches against their
//! caps and its memory limit, outbound connections against a per-invocation
//! cap; and no outbound grant reaches the node through `0.0.0.0`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::{Node, agent};

const MIB: u64 = 1 << 20;

/// The node may grow by this much while a guest tries to make it hold
/// gigabytes (allocator slack, instance pages, caches).
const RSS_SLACK: u64 = 256 * MIB;

/// Per-invocation outbound cap (`mayfly_runtime::MAX_OUTBOUND_IN_FLIGHT`).
const MAX_OUTBOUND_IN_FLIGHT: usize = 16;

/// The ledger record of the invocation `id` of `function`.
fn record(node: &Node, function: &str, id: &str) -> serde_json::Value {
    crate::common::eventually(Duration::from_secs(30), "the usage record", || {
        node.usage_records(Some(function))
            .into_iter()
            .find(|r| r["request_id"] == id)
    })
}

#[test]
fn a_flood_of_http_fields_ends_oom_and_the_node_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy_with(
        "hostile",
        "hostile",
        &["/"],
        &["--memory", "16", "--timeout", "60s"],
    );

    // Within the limit: 50 fields of 120 KiB (~6 MiB on the host) are
    // served, and the ledger's peak shows them although the guest's own
    // memory stays near 1 MiB.
    let (status, body, id) = node.request("GET", "/fields?n=50&kib=120", b"");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("holding 50 fields"), "{body}");
    let within = record(&node, "hostile", &id);
    assert_eq!(within["outcome"], "ok", "{within}");
    let peak = within["peak_memory_bytes"].as_u64().unwrap();
    assert!(
        peak > 6 * MIB,
        "the peak counts the host's header bytes: {within}"
    );

    // 20,000 fields of 120 KiB would be 2.3 GiB of node memory for a
    // 16 MiB function: it ends `oom` at its limit instead.
    let before = node.rss_bytes();
    let (status, body, id) = node.request("GET", "/fields?n=20000&kib=120", b"");
    let after = node.rss_bytes();
    eprintln!(
        "fields flood: node RSS {} -> {} MiB, status {status}",
        before / MIB,
        after / MIB
    );
    assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
    assert!(
        after.saturating_sub(before) < RSS_SLACK,
        "node RSS grew from {} to {} MiB",
        before / MIB,
        after / MIB
    );
    let flood = record(&node, "hostile", &id);
    assert_eq!(flood["outcome"], "oom", "{flood}");
    let peak = flood["peak_memory_bytes"].as_u64().unwrap();
    assert!(
        (12 * MIB..=16 * MIB).contains(&peak),
        "the peak is the real one, host bytes included, up to the limit: {flood}"
    );

    // Its author is told why.
    let logs = crate::common::eventually(Duration::from_secs(30), "the refusal", || {
        let (ok, logs, _) = node.cli(&["logs", "hostile", "--tail", "100"]);
        (ok && logs.contains("memory limit of 16 MiB")).then_some(logs)
    });
    assert!(logs.contains("wasi:http fields"), "{logs}");

    // Small handles are bounded by count: the store's resource table is
    // full long before 20,000 empty fields (each a table entry).
    let (status, _, id) = node.request("GET", "/fields?n=20000&kib=0", b"");
    assert_eq!(status, 500);
    assert_eq!(record(&node, "hostile", &id)["outcome"], "error");

    // The node is fine, and so is the function.
    let (status, body, _) = node.request("GET", "/fields?n=10&kib=1", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn keyvalue_batches_are_capped_and_their_results_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy_with(
        "kv",
        "caps",
        &["/"],
        &["--memory", "16", "--kv", "big", "--timeout", "60s"],
    );
    let value = vec![b'v'; MIB as usize];
    let status = agent()
        .put(format!("{}/v1/kv/big/k", node.admin))
        .header("authorization", node.bearer())
        .send(&value[..])
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 200);

    // A few values fit.
    let (status, body) = node.get("/kv/get-many?bucket=big&key=k&n=4");
    assert_eq!((status, body.trim()), (200, "values=4 bytes=4194304"));

    let before = node.rss_bytes();
    // 1,500 keys in one call: over the per-call cap.
    let (status, body) = node.get("/kv/get-many?bucket=big&key=k&n=1500");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("1500 keys"), "{body}");
    assert!(body.contains("smaller batches"), "{body}");
    // 1,000 keys of 1 MiB: within the cap, but a 1,000 MiB result does not
    // fit a 16 MiB function; refused before the host builds it.
    let (status, body) = node.get("/kv/get-many?bucket=big&key=k&n=1000");
    let after = node.rss_bytes();
    eprintln!(
        "get-many: node RSS {} -> {} MiB, status {status}",
        before / MIB,
        after / MIB
    );
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("memory limit of 16 MiB"), "{body}");
    assert!(
        after.saturating_sub(before) < RSS_SLACK,
        "node RSS grew from {} to {} MiB",
        before / MIB,
        after / MIB
    );
}

/// A loopback HTTP server that answers each request after a short hold and
/// closes; returns its port and the most requests it held at once, and how
/// many it served.
fn counting_server() -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (held, most, served) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (most_seen, served_count) = (most.clone(), served.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (held, most, served) = (held.clone(), most.clone(), served.clone());
            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
                // Counted out before answering, so the client's next
                // connection never overlaps this one in the count.
                held.fetch_sub(1, Ordering::SeqCst);
                served.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            });
        }
    });
    (port, most_seen, served_count)
}

/// The hostile guest's `/fanout` of 64 GETs to a counting server (each
/// answered after 50 ms), `order` being `""` or `"&order=reverse"`; asserts
/// all 64 succeeded and were served; returns the most connections the
/// server saw at once.
fn fan_out_64(order: &str) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let (port, most, served) = counting_server();
    node.deploy_with(
        "fanout",
        "hostile",
        &["/"],
        &[
            "--outbound",
            &format!("http://127.0.0.1:{port}"),
            "--timeout",
            "60s",
        ],
    );
    let (status, body) = node.get(&format!("/fanout?n=64&authority=127.0.0.1:{port}{order}"));
    assert_eq!((status, body.trim()), (200, "ok=64 failed=0"));
    assert_eq!(served.load(Ordering::SeqCst), 64);
    most.load(Ordering::SeqCst)
}

#[test]
fn one_invocation_cannot_open_unbounded_outbound_connections() {
    let most = fan_out_64("");
    eprintln!("fan-out of 64: at most {most} connections at once");
    assert!(
        (2..=MAX_OUTBOUND_IN_FLIGHT).contains(&most),
        "{most} connections at once"
    );
}

/// Awaited last-started first, 64 requests left every slot holding a
/// response the guest had not reached while the one it awaited waited for a
/// slot: the invocation hung until its timeout. The slots now close the
/// least recently used unread response instead, as Workers does.
#[test]
fn a_guest_holding_every_outbound_slot_with_unread_responses_is_not_stuck() {
    let most = fan_out_64("&order=reverse");
    assert!(most <= MAX_OUTBOUND_IN_FLIGHT, "{most} connections at once");
}

#[test]
fn outbound_grants_of_the_unspecified_address_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let wasm = crate::common::guest("hostile");
    for grant in [
        "http://0.0.0.0:8080",
        "http://0.0.0.0/8:*",
        "http://[::]:8080",
    ] {
        let (ok, stdout, stderr) = node.cli(&[
            "deploy",
            "zero",
            wasm.to_str().unwrap(),
            "--outbound",
            grant,
        ]);
        assert!(!ok, "{grant} was accepted: {stdout}");
        assert!(stderr.contains(grant), "{grant}: {stderr}");
        assert!(stderr.contains("unspecified address"), "{grant}: {stderr}");
        assert!(stderr.contains("loopback"), "{grant}: {stderr}");
    }
}
