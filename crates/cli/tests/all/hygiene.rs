//! Input hygiene at the edges (issue 15, finding 13): hosts and paths are
//! normalised before routing, a function's credential dies with the
//! function, `.`/`..` are not names, oversized uploads get 413, and a
//! function's routes are bounded.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use crate::common::{Node, agent, guest};

/// The `host:port` of a node URL (`http://127.0.0.1:1234`).
fn address(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// A raw HTTP/1.1 response: status, lower-cased header lines, body.
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    /// The value of header `name` (lower case), if present.
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim().eq_ignore_ascii_case(name)).then(|| value.trim())
        })
    }
}

/// Sends `head` (request line and headers, without the blank line) and
/// `body` over a new connection, reading the answer while the body is
/// still being written (a server may answer before reading it all).
fn raw(addr: &str, head: &str, body: Vec<u8>) -> Raw {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let request = format!("{head}\r\nConnection: close\r\n\r\n");
    let sending = std::thread::spawn(move || {
        // The server may close before the whole body is in: not an error
        // of the test.
        let _ = writer.write_all(request.as_bytes());
        let _ = writer.write_all(&body);
    });
    let mut answer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            // A reset after the answer arrived (unread body left behind).
            Err(_) if !answer.is_empty() => break,
            Err(error) => panic!("no answer: {error}"),
        }
    }
    let _ = sending.join();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    Raw {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// A GET to the gateway with exactly these header lines.
fn get(node: &Node, target: &str, headers: &[&str]) -> Raw {
    let mut head = format!("GET {target} HTTP/1.1");
    for header in headers {
        head.push_str("\r\n");
        head.push_str(header);
    }
    raw(address(&node.gateway), &head, Vec::new())
}

/// Whether the answer came from the `echo` function (and what path it saw),
/// not from the catch-all `hello`.
fn echoed(answer: &Raw) -> Option<&str> {
    answer.header("x-echo-path")
}

#[test]
fn hosts_and_paths_are_normalised_before_routing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy("shop", "echo", &["shop.test/api"]);
    node.deploy("any", "hello", &["/"]);

    // The plain case routes to the host route.
    let answer = get(&node, "/api/x", &["Host: shop.test"]);
    assert_eq!((answer.status, echoed(&answer)), (200, Some("/api/x")));
    // A trailing dot (a fully qualified name) and upper case: the same host.
    for host in [
        "Host: shop.test.",
        "Host: SHOP.Test.:8080",
        "Host: shop.TEST",
    ] {
        let answer = get(&node, "/api/x", &[host]);
        assert_eq!(
            (answer.status, echoed(&answer)),
            (200, Some("/api/x")),
            "{host}: {}{}",
            answer.head,
            answer.body
        );
    }
    // Two Host headers, or a Host naming another host than the URI: 400.
    let answer = get(&node, "/api/x", &["Host: other.test", "Host: shop.test"]);
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(
        answer.body.contains("more than one Host"),
        "{}",
        answer.body
    );
    let answer = get(&node, "/api/x", &["Host: shop.test", "Host: shop.test"]);
    assert_eq!(answer.status, 400, "{}", answer.body);
    let answer = get(&node, "http://shop.test/api/x", &["Host: other.test"]);
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(answer.body.contains("`other.test`"), "{}", answer.body);
    let answer = get(&node, "http://shop.test./api/x", &["Host: Shop.Test"]);
    assert_eq!((answer.status, echoed(&answer)), (200, Some("/api/x")));

    // Dot segments and escapes of unreserved characters are resolved before
    // routing, and the guest sees the path it was routed by (query kept).
    for (target, seen) in [
        ("/x/../api/y", "/api/y"),
        ("/x/%2e%2e/api/y", "/api/y"),
        ("/x/%2E%2E/api/./y?q=%2e", "/api/y?q=%2e"),
        ("/%61pi/%41", "/api/A"),
        ("/api/a%2fb", "/api/a%2Fb"),
    ] {
        let answer = get(&node, target, &["Host: shop.test"]);
        assert_eq!(
            (answer.status, echoed(&answer)),
            (200, Some(seen)),
            "{target}: {}{}",
            answer.head,
            answer.body
        );
    }
    // ... and out of a host route's prefix as well.
    let answer = get(&node, "/api/../other", &["Host: shop.test"]);
    assert_eq!((answer.status, echoed(&answer)), (200, None));
    assert!(answer.body.contains("Hello"), "{}", answer.body);
    // A `..` above the root, or a broken escape: 400 saying why.
    for target in ["/..", "/%2e%2e/api", "/api/%2E%2E/%2e%2e/x", "/api/%zz"] {
        let answer = get(&node, target, &["Host: shop.test"]);
        assert_eq!(answer.status, 400, "{target}: {}", answer.body);
        assert!(
            answer.body.contains("path is not valid"),
            "{target}: {}",
            answer.body
        );
    }
}

/// An admin API request with `token` as bearer; returns (status, JSON).
fn admin(node: &Node, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, Value) {
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", node.admin))
        .header("authorization", format!("Bearer {token}"))
        .body(body.to_vec())
        .unwrap();
    let mut response = agent().run(request).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn a_deleted_functions_credential_does_not_reach_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy_with("alpha", "caps", &[], &["--kv", "alpha-data"]);
    let (status, old) = node.invoke_get("alpha", "/config/get?key=mayfly.credential");
    assert_eq!(status, 200, "{old}");
    let old = old.trim().to_string();
    assert_eq!(
        admin(&node, "PUT", "/v1/kv/alpha-data/k", &old, b"x").0,
        200
    );

    let (ok, stdout, stderr) = node.cli(&["delete", "alpha"]);
    assert!(ok, "{stdout}{stderr}");
    // Deleted: its credential reaches nothing.
    assert_eq!(admin(&node, "GET", "/v1/kv/alpha-data/k", &old, b"").0, 403);

    // Another function of the same name, with the same grants: the old
    // credential is refused, saying why; the new function's works.
    node.deploy_with("alpha", "caps", &[], &["--kv", "alpha-data"]);
    let (status, answer) = admin(&node, "GET", "/v1/kv/alpha-data/k", &old, b"");
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer.to_string().contains("earlier function `alpha`"),
        "{answer}"
    );
    let (status, new) = node.invoke_get("alpha", "/config/get?key=mayfly.credential");
    assert_eq!(status, 200, "{new}");
    assert_eq!(
        admin(&node, "GET", "/v1/kv/alpha-data/k", new.trim(), b"").0,
        200
    );
    // A restart keeps both verdicts (the creation time is stored).
    node.stop();
    let node = Node::start(dir.path());
    assert_eq!(admin(&node, "GET", "/v1/kv/alpha-data/k", &old, b"").0, 401);
    assert_eq!(
        admin(&node, "GET", "/v1/kv/alpha-data/k", new.trim(), b"").0,
        200
    );
}

#[test]
fn dot_segments_are_not_names() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let token = node.token.clone();
    for name in ["%2E", "%2E%2E"] {
        for (method, path) in [
            ("PUT", format!("/v1/kv/{name}/k")),
            ("PUT", format!("/v1/buckets/{name}/objects/k")),
            ("POST", format!("/v1/queues/{name}/messages")),
            ("PUT", format!("/v1/secrets/{name}")),
        ] {
            let (status, answer) = admin(&node, method, &path, &token, b"x");
            assert_eq!(status, 400, "{method} {path}: {answer}");
            assert!(
                answer.to_string().contains("path segments, not names"),
                "{method} {path}: {answer}"
            );
        }
    }
    // Nor may a deploy grant them.
    for flag in ["--kv", "--object-bucket", "--send-queue"] {
        let wasm = guest("hello");
        let (ok, stdout, stderr) =
            node.cli(&["deploy", "dots", wasm.to_str().unwrap(), flag, ".."]);
        assert!(!ok, "{flag}: {stdout}");
        assert!(
            stderr.contains("path segments, not names"),
            "{flag}: {stderr}"
        );
    }
    // Names with dots that are not dot segments stay valid.
    assert_eq!(admin(&node, "PUT", "/v1/kv/a.b/k", &token, b"x").0, 200);
    assert_eq!(admin(&node, "PUT", "/v1/kv/.../k", &token, b"x").0, 200);
}

/// A multipart deploy body: the component and an optional config part.
fn deploy_body(boundary: &str, wasm: &[u8], config: Option<&str>) -> Vec<u8> {
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"component\"; filename=\"c.wasm\"\r\n\
         Content-Type: application/wasm\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(wasm);
    if let Some(config) = config {
        body.extend_from_slice(
            format!(
                "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"config\"\r\n\
                 Content-Type: application/json\r\n\r\n{config}"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

#[test]
fn an_upload_over_the_limit_answers_413_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let boundary = "hygiene-boundary-1";
    let body = deploy_body(boundary, &vec![0u8; 70 << 20], None);
    let head = format!(
        "POST /v1/functions/big/versions HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}",
        address(&node.admin),
        node.bearer(),
        body.len()
    );
    let answer = raw(address(&node.admin), &head, body);
    assert_eq!(answer.status, 413, "{}", answer.body);
    let json: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(json["error"]["code"], "too_large", "{json}");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("64 MiB"), "{message}");
    // Nothing was deployed.
    assert_eq!(node.admin_json("/v1/functions"), serde_json::json!([]));
}

#[test]
fn the_upload_limit_is_set_on_the_node_and_checked_before_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--max-component-mb", "1"]);
    assert_eq!(
        node.admin_json("/v1/status")["max_component_bytes"],
        1 << 20
    );
    let body = deploy_body("limit-boundary", &vec![0u8; 2 << 20], None);
    let head = |framing: &str| {
        format!(
            "POST /v1/functions/big/versions HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\n\
             Content-Type: multipart/form-data; boundary=limit-boundary\r\n{framing}",
            address(&node.admin),
            node.bearer(),
        )
    };
    let refused = |answer: &Raw| {
        assert_eq!(answer.status, 413, "{}", answer.body);
        let json: Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(json["error"]["code"], "too_large", "{json}");
        let message = json["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("at most 1 MiB"), "{message}");
        assert!(message.contains("--max-component-mb"), "{message}");
        assert!(!message.contains("multipart"), "{message}");
    };

    // A declared length over the limit is answered without the body: a
    // client expecting `100 Continue` sends none, and gets the 413 at once.
    let answer = raw(
        address(&node.admin),
        &head(&format!(
            "Content-Length: {}\r\nExpect: 100-continue",
            body.len()
        )),
        Vec::new(),
    );
    refused(&answer);

    // A chunked body is cut off at the limit with the same answer.
    let mut chunked = Vec::new();
    for chunk in body.chunks(64 << 10) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    refused(&raw(
        address(&node.admin),
        &head("Transfer-Encoding: chunked"),
        chunked,
    ));

    // The CLI checks the file against the node's limit before uploading.
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, vec![0u8; 3 << 19]).unwrap();
    let (ok, _, stderr) = node.cli(&["deploy", "big", big.to_str().unwrap(), "--route", "/big"]);
    assert!(!ok);
    assert!(
        stderr.contains("is 1.5 MiB, over the node's limit of 1 MiB")
            && stderr.contains("--max-component-mb"),
        "{stderr}"
    );

    // Within the limit, deploys work as ever.
    node.deploy("hello", "hello", &["/hello"]);
    assert_eq!(
        node.admin_json("/v1/functions").as_array().unwrap().len(),
        1
    );
}

#[test]
fn a_deploy_with_too_many_routes_is_refused_naming_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let wasm = std::fs::read(guest("hello")).unwrap();
    let deploy = |routes: Vec<String>| {
        let config = serde_json::json!({ "routes": routes }).to_string();
        let boundary = "hygiene-boundary-2";
        let mut response = agent()
            .post(format!("{}/v1/functions/many/versions", node.admin))
            .header("authorization", node.bearer())
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .send(&deploy_body(boundary, &wasm, Some(&config))[..])
            .unwrap();
        let status = response.status().as_u16();
        let json: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        (status, json)
    };
    let (status, json) = deploy((0..100_000).map(|i| format!("/r{i}")).collect());
    assert_eq!(status, 400, "{json}");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("100000 routes") && message.contains("at most 64"),
        "{message}"
    );
    // One route too long.
    let (status, json) = deploy(vec![format!("/{}", "a".repeat(2000))]);
    assert_eq!(status, 400, "{json}");
    assert!(json.to_string().contains("at most 1024 bytes"), "{json}");
    assert_eq!(node.admin_json("/v1/functions"), serde_json::json!([]));
    // The bound itself is allowed.
    let (status, json) = deploy((0..64).map(|i| format!("/r{i}")).collect());
    assert_eq!(status, 201, "{json}");
}
