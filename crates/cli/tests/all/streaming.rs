//! Streaming request bodies (`mayfly deploy --streaming-request`): a chunked
//! upload reaches the function as it arrives, so the node holds a bounded
//! part of it whatever its size, and a body over the limit is cut while it
//! flows instead of being read whole first.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::{Node, agent};

/// A body of `left` bytes made up as it is read, never held whole.
struct Generated {
    left: u64,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = usize::try_from(self.left).map_or(buf.len(), |left| left.min(buf.len()));
        buf[..n].fill(b'u');
        self.left -= n as u64;
        Ok(n)
    }
}

/// POSTs a body of `len` bytes to the gateway without a declared length
/// (ureq sends a reader chunked); returns (status, body).
fn post_chunked(node: &Node, path: &str, len: u64) -> (u16, String) {
    let mut response = agent()
        .post(format!("{}{path}", node.gateway))
        .send(ureq::SendBody::from_reader(&mut Generated { left: len }))
        .expect("the gateway answers");
    let body = response.body_mut().read_to_string().expect("a text answer");
    (response.status().as_u16(), body)
}

/// POSTs a chunked body of `len` bytes over a plain connection, writing on
/// one thread while reading the answer on this one: the node may answer,
/// and stop reading, before the body is all sent, and a client that only
/// reads after sending would see its writes fail instead of the answer.
/// Returns (status, whole answer as text).
fn post_chunked_reading_early(node: &Node, path: &str, len: u64) -> (u16, String) {
    let address = node.gateway.trim_start_matches("http://").to_string();
    let mut reader = TcpStream::connect(&address).expect("the gateway accepts");
    reader
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("a read timeout");
    let mut writer = reader.try_clone().expect("a second handle");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {address}\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n"
    );
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(head.as_bytes())?;
        let chunk = [b'u'; 16 * 1024];
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left).map_or(chunk.len(), |left| left.min(chunk.len()));
            write!(writer, "{n:x}\r\n")?;
            writer.write_all(&chunk[..n])?;
            writer.write_all(b"\r\n")?;
            left -= n as u64;
        }
        writer.write_all(b"0\r\n\r\n")
    });
    let mut answer = Vec::new();
    let mut buffer = [0u8; 8192];
    // Up to the node's close (or its reset, once it stops reading a body
    // still arriving): what arrived before it is the answer.
    while let Ok(n) = reader.read(&mut buffer) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    // Its writes may fail once the node stopped reading: that is expected.
    let _ = sender.join().expect("the sender thread ends");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
    (status, answer)
}

/// The node process's peak resident memory so far (VmHWM), in bytes.
fn peak_rss(node: &Node) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid()))
        .expect("the node's /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("a VmHWM line");
    kib * 1024
}

const MIB: u64 = 1 << 20;

#[test]
fn a_100_mb_chunked_upload_streams_to_the_function_in_bounded_memory() {
    let upload = 100 * MIB;
    let dir = tempfile::tempdir().unwrap();
    // A debug node on a busy machine may take a while over 100 MB: the
    // body and function timeouts are not what this test is about.
    let node = Node::start_with(dir.path(), &["--body-timeout", "10m"]);
    let max = (200 * MIB).to_string();
    let flags = ["--max-request-bytes", &max, "--timeout", "10m"];
    node.deploy_with(
        "streamed",
        "upload",
        &["/streamed"],
        &[&flags[..], &["--streaming-request"]].concat(),
    );
    node.deploy_with("buffered", "upload", &["/buffered"], &flags);

    // Warm up both paths on a small body, so the peak below is the upload's.
    assert_eq!(
        post_chunked(&node, "/streamed", MIB),
        (200, "1048576\n".into())
    );
    assert_eq!(
        post_chunked(&node, "/buffered", MIB),
        (200, "1048576\n".into())
    );

    let before = peak_rss(&node);
    let started = Instant::now();
    let answer = post_chunked(&node, "/streamed", upload);
    let took = started.elapsed();
    assert_eq!(answer, (200, format!("{upload}\n")));
    let streamed_growth = peak_rss(&node).saturating_sub(before);
    eprintln!(
        "streamed {} MiB chunked in {took:.2?} ({:.0} MiB/s); the node's peak RSS grew {} KiB",
        upload / MIB,
        (upload / MIB) as f64 / took.as_secs_f64(),
        streamed_growth / 1024
    );
    assert!(
        streamed_growth < 48 * MIB,
        "the node's peak memory grew {streamed_growth} bytes for a streamed {upload}-byte upload"
    );

    // The same upload to the function without the opt-in is read whole
    // before it runs: the measure above would have seen that.
    let before = peak_rss(&node);
    let answer = post_chunked(&node, "/buffered", upload);
    assert_eq!(answer, (200, format!("{upload}\n")));
    let buffered_growth = peak_rss(&node).saturating_sub(before);
    eprintln!(
        "buffered: the node's peak RSS grew {} KiB",
        buffered_growth / 1024
    );
    assert!(
        buffered_growth >= upload,
        "a buffered {upload}-byte upload grew the node's peak memory by only {buffered_growth} bytes"
    );
}

#[test]
fn a_streamed_body_over_the_limit_fails_in_the_function_and_gets_413() {
    let limit = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let max = limit.to_string();
    node.deploy_with(
        "streamed",
        "upload",
        &["/streamed"],
        &["--max-request-bytes", &max, "--streaming-request"],
    );
    node.deploy_with(
        "buffered",
        "upload",
        &["/buffered"],
        &["--max-request-bytes", &max],
    );

    // Exactly the limit passes.
    let (status, answer) = post_chunked_reading_early(&node, "/streamed", limit);
    assert_eq!(status, 200, "{answer}");
    // The count, in the one chunk of a chunked answer.
    assert!(
        answer.contains(&format!("\r\n{limit}\n\r\n0\r\n")),
        "{answer}"
    );

    // Over it: the function's read fails at the limit; it had not
    // answered, so the client gets the node's 413, not a 500.
    let (status, answer) = post_chunked_reading_early(&node, "/streamed", 4 * limit);
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer.contains(&format!("limit of {limit} bytes")),
        "{answer}"
    );
    let records = node.await_usage_records("streamed", 2);
    let mut ends: Vec<(&str, u64)> = records
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    // The client's body, not the function, ended it: not an error. (In
    // either order: a record is written when its invocation is over, and
    // the first one's guest may still be finishing.)
    ends.sort_unstable();
    assert_eq!(ends, [("ok", 200), ("ok", 413)], "{records:?}");
    let (ok, logs, _) = node.cli(&["logs", "streamed", "--tail", "1000"]);
    assert!(ok, "{logs}");
    assert!(
        logs.contains(&format!(
            "upload: the request body failed after {limit} bytes"
        )),
        "the function saw the error on its stream: {logs}"
    );
    assert!(
        logs.contains("the client got 413"),
        "the node said why: {logs}"
    );

    // A function that answered before reading (echo streams the body back)
    // has its answer cut short when its read fails: its client sees the
    // 200 head and a body without its last chunk. Still the client's doing.
    node.deploy_with(
        "echo",
        "echo",
        &["/echo"],
        &["--max-request-bytes", &max, "--streaming-request"],
    );
    let (status, answer) = post_chunked_reading_early(&node, "/echo", 4 * limit);
    assert_eq!(status, 200, "{}", &answer[..answer.len().min(500)]);
    assert!(
        !answer.ends_with("\r\n0\r\n\r\n"),
        "the body must not end as if complete"
    );
    let records = node.await_usage_records("echo", 1);
    assert_eq!(records[0]["outcome"], "ok", "{records:?}");
    assert_eq!(records[0]["status"], 200, "{records:?}");

    // Without the opt-in the same body is refused before the function runs.
    let (status, answer) = post_chunked_reading_early(&node, "/buffered", 4 * limit);
    assert_eq!(status, 413, "{answer}");
    assert!(
        node.usage_records(Some("buffered")).is_empty(),
        "no guest ran"
    );
    // Both refusals count as requests too large.
    let status = node.admin_json("/v1/status");
    assert_eq!(status["requests_too_large"], 2, "{status}");
}
