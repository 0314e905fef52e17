//! Bounded node resources against floods and hostile uploads: one
//! function's log flood keeps others' logs, anonymous refusals cannot grow
//! the audit log without bound, large objects stream (no whole-object
//! buffers per reader or upload), and compiling an upload is bounded in
//! time, memory and concurrency and stops when its client goes away.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::common::{Node, agent, eventually};

/// Lines of the function's log tail, as JSON text.
fn log_tail(node: &Node, function: &str, tail: usize) -> String {
    node.admin_json(&format!("/v1/functions/{function}/logs?tail={tail}"))
        .to_string()
}

/// The ids of a function's last `tail` log lines.
fn log_ids(node: &Node, function: &str, tail: usize) -> Vec<i64> {
    node.admin_json(&format!("/v1/functions/{function}/logs?tail={tail}"))
        .as_array()
        .expect("a JSON array of lines")
        .iter()
        .filter_map(|line| line["id"].as_i64())
        .collect()
}

/// Runs `function` with a GET of `path` through the admin API (its routes
/// aside); returns (status, body).
fn invoke(node: &Node, function: &str, path: &str) -> (u16, String) {
    let path = path.replace('?', "%3F").replace('=', "%3D");
    let mut response = agent()
        .post(format!(
            "{}/v1/functions/{function}/invoke?method=GET&path={path}",
            node.admin
        ))
        .header("authorization", node.bearer())
        .send_empty()
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_to_string().unwrap_or_default(),
    )
}

#[test]
fn a_log_flood_leaves_other_functions_logs_readable() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("victim", "hostile", &["/victim"]);
    node.deploy_with(
        "flooder",
        "hostile",
        &["/flooder"],
        &["--max-log-bytes", "16777216", "--timeout", "60s"],
    );

    // The victim writes one line: "flood line 0 …".
    assert_eq!(invoke(&node, "victim", "/flood?lines=1").0, 200);
    eventually(Duration::from_secs(10), "the victim's line", || {
        log_tail(&node, "victim", 10)
            .contains("flood line")
            .then_some(())
    });

    // 250,000 lines from the flooder, more than the node kept in all
    // before per-function retention (200,000). Each batch is stored before
    // the next starts, so the queue never overflows and drops them.
    const BATCH: i64 = 50_000;
    let first = log_ids(&node, "victim", 1)[0];
    let mut newest = first;
    for _ in 0..20 {
        if newest - first >= 5 * BATCH {
            break;
        }
        let (status, body) = invoke(&node, "flooder", &format!("/flood?lines={BATCH}"));
        assert_eq!(status, 200, "{body}");
        // Stored once the newest id stops moving.
        let mut last_seen = -1;
        newest = eventually(Duration::from_secs(60), "the flood stored", || {
            std::thread::sleep(Duration::from_millis(200));
            let last = log_ids(&node, "flooder", 1).last().copied().unwrap_or(0);
            let settled = last == last_seen;
            last_seen = last;
            settled.then_some(last)
        });
    }
    eprintln!(
        "the flooder wrote {} lines; a 10,000-line tail of it shows {}",
        newest - first,
        log_ids(&node, "flooder", 10_000).len()
    );
    let victim = log_tail(&node, "victim", 10);
    assert!(
        victim.contains("flood line"),
        "the flooder's lines erased the victim's log: {victim}"
    );
}

/// The id of the newest audit entry (0 if none).
fn last_audit_id(node: &Node) -> i64 {
    node.admin_json("/v1/audit?limit=1")
        .as_array()
        .and_then(|entries| entries.last())
        .and_then(|entry| entry["id"].as_i64())
        .unwrap_or(0)
}

/// Every audit entry after `after`.
fn audit_after(node: &Node, mut after: i64) -> Vec<Value> {
    let mut all = Vec::new();
    loop {
        let page = node.admin_json(&format!("/v1/audit?after={after}&limit=10000"));
        let page = page.as_array().expect("a JSON array").clone();
        let Some(last) = page.last().and_then(|e| e["id"].as_i64()) else {
            return all;
        };
        after = last;
        all.extend(page);
    }
}

#[test]
fn an_anonymous_flood_grows_the_audit_log_by_a_bounded_number_of_rows() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let before = last_audit_id(&node);

    const REQUESTS: usize = 2_000;
    let agent = agent();
    for i in 0..REQUESTS {
        let mut request = agent.get(format!("{}/v1/functions", node.admin));
        if i % 2 == 1 {
            // A wrong token is refused as anonymous too.
            request = request.header("authorization", "Bearer mf_wrong");
        }
        let status = request.call().unwrap().status().as_u16();
        assert_eq!(status, 401);
    }

    let rows = audit_after(&node, before);
    let anonymous = rows.iter().filter(|r| r["actor"] == "anonymous").count();
    assert!(
        anonymous >= 1,
        "the refusals are not in the audit log at all: {rows:?}"
    );
    assert!(
        rows.len() <= 100,
        "{REQUESTS} anonymous refusals wrote {} audit rows (one each before the fix)",
        rows.len()
    );
    eprintln!(
        "{REQUESTS} anonymous refusals wrote {} audit rows",
        rows.len()
    );
}

/// Peak of the node's RSS while `during` runs, sampled every 10 ms.
fn peak_rss_during<T>(node: &Node, during: impl FnOnce() -> T) -> (u64, T) {
    let pid = node.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let result = during();
    peak.fetch_max(rss_of(pid), Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    (peak.load(Ordering::Relaxed), result)
}

/// A process's resident memory in bytes (0 once it is gone).
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

const MIB: u64 = 1 << 20;

#[test]
fn a_large_object_upload_streams_to_disk() {
    const SIZE: usize = 48 << 20;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let url = format!("{}/v1/buckets/big/objects/blob", node.admin);
    let object: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();

    // The upload: a whole-object buffer would show as ≥ SIZE more RSS.
    let before_put = node.rss_bytes();
    let (peak, status) = peak_rss_during(&node, || {
        agent()
            .put(&url)
            .header("authorization", node.bearer())
            .send(&object[..])
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(status, 200);
    let put_growth = peak.saturating_sub(before_put);
    eprintln!(
        "PUT of {} MiB: node RSS {} → peak {} MiB (+{} MiB)",
        SIZE as u64 / MIB,
        before_put / MIB,
        peak / MIB,
        put_growth / MIB
    );
    assert!(
        put_growth < SIZE as u64 / 2,
        "a {} MiB upload grew the node by {} MiB: it is buffered whole",
        SIZE as u64 / MIB,
        put_growth / MIB
    );
}

#[test]
fn slow_readers_of_a_large_object_keep_node_memory_bounded() {
    const SIZE: usize = 48 << 20;
    const READERS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let url = format!("{}/v1/buckets/big/objects/blob", node.admin);
    let object: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let status = agent()
        .put(&url)
        .header("authorization", node.bearer())
        .send(&object[..])
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 200);

    // Slow readers: each reads the head and a little body, then stalls.
    let before_get = node.rss_bytes();
    let address = node.admin.trim_start_matches("http://").to_string();
    let (peak, readers) = peak_rss_during(&node, || {
        let readers: Vec<TcpStream> = (0..READERS)
            .map(|_| {
                let mut stream = TcpStream::connect(&address).unwrap();
                write!(
                    stream,
                    "GET /v1/buckets/big/objects/blob HTTP/1.1\r\nhost: node\r\n\
                     authorization: {}\r\n\r\n",
                    node.bearer()
                )
                .unwrap();
                let mut head = [0u8; 4096];
                let read = stream.read(&mut head).unwrap();
                assert!(
                    head[..read].starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(&head[..read])
                );
                stream
            })
            .collect();
        // Let each response fill what it can (socket buffers) and stall.
        std::thread::sleep(Duration::from_millis(500));
        readers
    });
    let get_growth = peak.saturating_sub(before_get);
    eprintln!(
        "{READERS} slow readers of {} MiB: node RSS {} → peak {} MiB (+{} MiB)",
        SIZE as u64 / MIB,
        before_get / MIB,
        peak / MIB,
        get_growth / MIB
    );
    assert!(
        get_growth < SIZE as u64,
        "{READERS} slow readers grew the node by {} MiB: each buffers the object",
        get_growth / MIB
    );

    // A full read still returns the whole object, intact.
    drop(readers);
    let mut response = agent()
        .get(&url)
        .header("authorization", node.bearer())
        .call()
        .unwrap();
    let body = response
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .unwrap();
    assert!(body == object, "the object came back changed");
}

#[test]
fn an_oversized_object_upload_is_refused_without_storing_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    // Declared over the limit: refused before the body is read.
    let address = node.admin.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "PUT /v1/buckets/big/objects/huge HTTP/1.1\r\nhost: node\r\n\
         authorization: {}\r\ncontent-length: {}\r\n\r\n",
        node.bearer(),
        (64 << 20) + 1
    )
    .unwrap();
    let mut answer = [0u8; 1024];
    let read = stream.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    drop(stream);

    // Streamed without a length: refused once it passes the limit.
    let object = vec![7u8; (64 << 20) + 1];
    let mut reader = &object[..];
    let url = format!("{}/v1/buckets/big/objects/huge", node.admin);
    let sent = agent()
        .put(&url)
        .header("authorization", node.bearer())
        .send(ureq::SendBody::from_reader(&mut reader));
    if let Ok(mut response) = sent {
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap_or_default();
        assert_eq!(status, 413, "{body}");
    }
    let status = agent()
        .get(&url)
        .header("authorization", node.bearer())
        .call()
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 404);
    let left = || {
        std::fs::read_dir(dir.path().join("blobs/objects"))
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(10), "no file left", || {
        (left() == 0).then_some(())
    });
}

// ---- compilation ----

fn leb128(mut value: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    leb128(body.len(), out);
    out.extend_from_slice(body);
}

/// A component of one core module with `functions` functions of
/// `branches` chained `if`s over 8 locals each: valid WebAssembly that
/// takes Cranelift a long time and much memory (~12 bytes of wasm per
/// branch). It exports nothing, so were it ever compiled it would be
/// refused for lacking the HTTP handler.
fn pathological_component(functions: usize, branches: usize) -> Vec<u8> {
    let mut body = vec![1, 8, 0x7f]; // one group of 8 i32 locals
    for i in 0..branches {
        let local = (i % 8) as u8;
        let other = ((i + 1) % 8) as u8;
        // local.get l; if; local.get o; i32.const 1; i32.add; local.set l; end
        body.extend_from_slice(&[
            0x20, local, 0x04, 0x40, 0x20, other, 0x41, 0x01, 0x6a, 0x21, local, 0x0b,
        ]);
    }
    body.push(0x0b);
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut module);
    let mut funcs = Vec::new();
    leb128(functions, &mut funcs);
    funcs.extend(std::iter::repeat_n(0u8, functions));
    section(3, &funcs, &mut module);
    let mut code = Vec::new();
    leb128(functions, &mut code);
    for _ in 0..functions {
        leb128(body.len(), &mut code);
        code.extend_from_slice(&body);
    }
    section(10, &code, &mut module);
    let mut component = b"\0asm\x0d\0\x01\0".to_vec();
    section(1, &module, &mut component);
    component
}

/// A component of `functions` functions of `adds` straight-line additions
/// over 8 locals each (7 bytes each): fast to compile, but Cranelift holds
/// each function whole (~150 MB resident for a million adds).
fn huge_function_component(adds: usize, functions: u8) -> Vec<u8> {
    let mut body = vec![1, 8, 0x7f];
    for i in 0..adds {
        let local = (i % 8) as u8;
        // local.get a; local.get b; i32.add; local.set c
        body.extend_from_slice(&[
            0x20,
            local,
            0x20,
            (local + 3) % 8,
            0x6a,
            0x21,
            (local + 1) % 8,
        ]);
    }
    body.push(0x0b);
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut module);
    let mut funcs = vec![functions];
    funcs.extend(std::iter::repeat_n(0u8, functions.into()));
    section(3, &funcs, &mut module);
    let mut code = vec![functions];
    for _ in 0..functions {
        leb128(body.len(), &mut code);
        code.extend_from_slice(&body);
    }
    section(10, &code, &mut module);
    let mut component = b"\0asm\x0d\0\x01\0".to_vec();
    section(1, &module, &mut component);
    component
}

/// Writes the pathological component (4 functions of 10,000 branches:
/// ~10 s of Cranelift each, quadratic in the branches) to `dir`.
fn write_pathological(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("pathological.wasm");
    std::fs::write(&path, pathological_component(4, 10_000)).unwrap();
    path
}

/// Pids of the node's compile workers running now.
fn compile_workers(node: &Node) -> Vec<u32> {
    let node_pid = node.pid().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent pid is the 2nd field after the parenthesised name.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            parent == node_pid
                && String::from_utf8_lossy(&cmdline).contains("compile-worker")
                && !stat.contains(") Z ")
        })
        .collect()
}

/// `mayfly deploy` of `wasm` as `name`; returns (success, output).
fn deploy(node: &Node, name: &str, wasm: &Path) -> (bool, String) {
    let (ok, stdout, stderr) = node.cli(&["deploy", name, wasm.to_str().unwrap()]);
    (ok, format!("{stdout}{stderr}"))
}

#[test]
fn a_pathological_compile_is_bounded_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--compile-timeout", "2s"]);
    let wasm = write_pathological(dir.path());
    let (ok, output) = deploy(&node, "slow", &wasm);
    assert!(!ok, "{output}");
    assert!(
        output.contains("more than 2s") && output.contains("too large or pathological"),
        "{output}"
    );
    eventually(Duration::from_secs(10), "the worker gone", || {
        compile_workers(&node).is_empty().then_some(())
    });
    // The node still deploys and serves.
    node.deploy("hello", "hello", &["/hello"]);
    assert_eq!(node.get("/hello").0, 200);
}

#[test]
fn a_pathological_compile_is_bounded_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        dir.path(),
        &["--compile-memory", "160", "--compile-timeout", "120s"],
    );
    let wasm = dir.path().join("huge.wasm");
    std::fs::write(&wasm, huge_function_component(1_000_000, 2)).unwrap();
    let (ok, output) = deploy(&node, "big", &wasm);
    assert!(!ok, "{output}");
    assert!(
        output.contains("more than 160 MiB") && output.contains("too large or pathological"),
        "{output}"
    );
    eventually(Duration::from_secs(10), "the worker gone", || {
        compile_workers(&node).is_empty().then_some(())
    });
    node.deploy("hello", "hello", &["/hello"]);
    assert_eq!(node.get("/hello").0, 200);
}

/// Starts a deploy of `wasm` over a raw connection and returns it once the
/// whole upload is sent (the answer not yet read).
fn start_raw_deploy(node: &Node, name: &str, wasm: &[u8]) -> TcpStream {
    let boundary = "mayflyboundary7";
    let mut body = Vec::new();
    write!(
        body,
        "--{boundary}\r\ncontent-disposition: form-data; name=\"component\"; \
         filename=\"c.wasm\"\r\ncontent-type: application/wasm\r\n\r\n"
    )
    .unwrap();
    body.extend_from_slice(wasm);
    write!(body, "\r\n--{boundary}--\r\n").unwrap();
    let address = node.admin.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST /v1/functions/{name}/versions HTTP/1.1\r\nhost: node\r\n\
         authorization: {}\r\ncontent-type: multipart/form-data; boundary={boundary}\r\n\
         content-length: {}\r\n\r\n",
        node.bearer(),
        body.len()
    )
    .unwrap();
    stream.write_all(&body).unwrap();
    stream
}

#[test]
fn a_deploy_whose_client_goes_away_stops_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--compile-timeout", "600s"]);
    let wasm = pathological_component(4, 10_000);
    let client = start_raw_deploy(&node, "abandoned", &wasm);
    let worker = eventually(Duration::from_secs(30), "a compile worker", || {
        compile_workers(&node).first().copied()
    });
    drop(client);
    eventually(
        Duration::from_secs(10),
        "the worker killed after its client left",
        || {
            (!Path::new(&format!("/proc/{worker}/cmdline")).exists()
                || compile_workers(&node).is_empty())
            .then_some(())
        },
    );
    let functions = node.admin_json("/v1/functions").to_string();
    assert!(!functions.contains("abandoned"), "{functions}");
}

#[test]
fn concurrent_compiles_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let node = Arc::new(Node::start_with(
        dir.path(),
        &["--compile-concurrency", "1", "--compile-timeout", "3s"],
    ));
    let wasm = write_pathological(dir.path());
    let deploys: Vec<_> = (0..3)
        .map(|i| {
            let (node, wasm) = (node.clone(), wasm.clone());
            std::thread::spawn(move || deploy(&node, &format!("slow{i}"), &wasm))
        })
        .collect();
    let mut most = 0;
    while !deploys.iter().all(|d| d.is_finished()) {
        most = most.max(compile_workers(&node).len());
        std::thread::sleep(Duration::from_millis(10));
    }
    for deploy in deploys {
        let (ok, output) = deploy.join().unwrap();
        assert!(!ok, "{output}");
        assert!(
            output.contains("more than 3s") || output.contains("compilations are running"),
            "{output}"
        );
    }
    assert_eq!(most, 1, "compile workers at once: {most}");
}
