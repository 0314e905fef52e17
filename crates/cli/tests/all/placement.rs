//! Placement by labels and request forwarding in fleet mode: a function
//! deployed with `--place site=a` runs only on nodes labelled `site=a`;
//! the others forward its requests to one of them over NATS.

use std::time::Duration;

use mayfly_nats::testing::NatsServers;
use serde_json::Value;

use crate::common::{Node, agent, eventually, guest};
use crate::fleet::{fleet_node, served};

/// A gateway answer: status, headers (lower-case names), body.
pub(crate) struct Answer {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `method path` with `body` to `node`'s gateway.
pub(crate) fn send(node: &Node, method: &str, path: &str, body: &[u8]) -> Answer {
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", node.gateway))
        .body(body.to_vec())
        .expect("valid request");
    let mut response = agent().run(request).expect("gateway answers");
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    Answer {
        status: response.status().as_u16(),
        headers,
        body: response.body_mut().read_to_string().unwrap_or_default(),
    }
}

/// Sends only the head of a POST to `path` declaring `length` bytes of
/// body, and reads the node's whole answer.
fn head_only(node: &Node, path: &str, length: usize) -> String {
    use std::io::{Read, Write};
    let address = node.gateway.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).expect("gateway listens");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nhost: {address}\r\ncontent-length: {length}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// The functions `node` lists as served in the fleet's membership list
/// for node `name`, once its heartbeat lists `expected`.
fn heartbeat_functions(from: &Node, name: &str, expected: &str) -> Value {
    eventually(Duration::from_secs(30), "the heartbeat", || {
        let nodes = from.admin_json("/v1/nodes");
        let node = nodes
            .as_array()?
            .iter()
            .find(|node| node["name"] == name)?
            .clone();
        node["functions"]
            .get(expected)
            .is_some()
            .then(|| node["functions"].clone())
    })
}

#[test]
fn a_function_placed_at_site_a_runs_only_there_and_site_b_forwards_to_it() {
    let servers = NatsServers::single();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = fleet_node(dir_a.path(), &servers, "a", "site=a");
    let mut b = fleet_node(dir_b.path(), &servers, "b", "site=b");
    share_admin_token(&mut a, &mut b);
    eventually(Duration::from_secs(30), "both nodes listed", || {
        let nodes = a.admin_json("/v1/nodes");
        (nodes.as_array().map_or(0, Vec::len) == 2).then_some(())
    });

    // Deployed through b, which does not run it: --wait waits for a only.
    deploy_pinned_echo(&b);
    b.deploy("open", "hello", &["/open"]);
    served(&a, "/open", "Hello");
    served(&b, "/open", "Hello");

    // Only a loads it: b's heartbeat and status leave it out.
    let on_a = heartbeat_functions(&b, "a", "pinned");
    assert_eq!(on_a["pinned"], 1, "{on_a}");
    let on_b = heartbeat_functions(&a, "b", "open");
    assert!(on_b.get("pinned").is_none(), "b serves pinned: {on_b}");
    assert_eq!(b.admin_json("/v1/status")["functions"], 1);
    assert_eq!(a.admin_json("/v1/status")["functions"], 2);
    let (ok, rows, stderr) = b.cli(&["versions", "pinned", "--fleet", "--json"]);
    assert!(ok, "{stderr}");
    let rows: Value = serde_json::from_str(&rows).unwrap();
    let version_on = |node: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|row| row["node"] == node)
            .map(|row| row["version"].clone())
    };
    assert_eq!(version_on("a"), Some(Value::from(1)), "{rows}");
    assert_eq!(version_on("b"), Some(Value::Null), "{rows}");
    let (ok, table, _) = a.cli(&["versions", "pinned", "--fleet"]);
    assert!(ok && table.contains("- (placed on site=a)"), "{table}");

    // A request for it at b is answered by a, routed as b saw it.
    let answer = send(&b, "POST", "/pinned/x?q=1", b"ping");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("x-mayfly-node"), Some("a"));
    assert_eq!(answer.body, "ping");
    assert_eq!(answer.header("x-echo-path"), Some("/pinned/x?q=1"));
    assert_eq!(
        answer.header("x-echo-header-x-mayfly-route"),
        Some("/pinned")
    );
    let client = answer
        .header("x-echo-header-x-mayfly-client-addr")
        .unwrap_or_default();
    assert!(
        client.starts_with("127.0.0.1:"),
        "client address {client:?}"
    );
    let full_url = answer
        .header("x-echo-header-x-mayfly-full-url")
        .unwrap_or_default();
    assert_eq!(
        full_url,
        format!("{}/pinned/x?q=1", b.gateway),
        "the URL the client asked b for"
    );
    // Metered once, by the node that ran it.
    let request_id = answer
        .header("x-mayfly-request-id")
        .expect("a request id")
        .to_string();
    let records = a.await_usage_records("pinned", 1);
    assert_eq!(records[0]["request_id"], request_id.as_str(), "{records:?}");
    assert_eq!(records[0]["trigger"], "http");

    // At a, and for an unplaced function, the node that served says so.
    let answer = send(&a, "GET", "/pinned", b"");
    assert_eq!(answer.header("x-mayfly-node"), Some("a"));
    let answer = send(&b, "GET", "/open", b"");
    assert_eq!(
        (answer.status, answer.header("x-mayfly-node")),
        (200, Some("b"))
    );
    // A new version placed elsewhere moves the function: a lets go of it.
    let hello = guest("hello");
    let (ok, stdout, stderr) = b.cli(&[
        "deploy",
        "open",
        hello.to_str().unwrap(),
        "--route",
        "/open",
        "--place",
        "site=b",
        "--wait",
        "60s",
    ]);
    assert!(ok, "{stdout}{stderr}");
    eventually(Duration::from_secs(30), "a forwarding /open to b", || {
        let answer = send(&a, "GET", "/open", b"");
        (answer.status == 200 && answer.header("x-mayfly-node") == Some("b")).then_some(())
    });
    assert_eq!(a.admin_json("/v1/status")["functions"], 1);

    // Bodies over one message (256 KiB on these 1 MiB servers) go in chunks,
    // both ways: echo answers with what it was sent.
    let large: Vec<u8> = (0..10 * 1024 * 1024 + 17)
        .map(|i| (i % 251) as u8)
        .collect();
    let request = ureq::http::Request::builder()
        .method("POST")
        .uri(format!("{}/pinned/large", b.gateway))
        .body(large.clone())
        .expect("valid request");
    let mut response = agent().run(request).expect("gateway answers");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-mayfly-node")
            .map(|v| v.as_bytes()),
        Some(&b"a"[..])
    );
    let echoed = response
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .expect("body");
    assert!(
        echoed == large,
        "the echoed body differs ({} bytes)",
        echoed.len()
    );

    // Over the function's own limit: 413 as at a. Only the head is sent:
    // a client writing the whole body would race the node closing on it.
    let refused = head_only(&b, "/pinned", 20 << 20);
    assert!(refused.starts_with("HTTP/1.1 413"), "{refused}");
    assert!(
        refused.contains("the most function `pinned` takes"),
        "{refused}"
    );
    // The admin invoke through b is forwarded too.
    let (status, body) = b.invoke_get("pinned", "/via-admin");
    assert_eq!(status, 200, "{body}");

    // A queue trigger of a pinned function is delivered by a alone: b
    // runs nothing of it.
    let echo = guest("echo");
    let (ok, stdout, stderr) = b.cli(&[
        "deploy",
        "worker",
        echo.to_str().unwrap(),
        "--trigger",
        "queue:jobs",
        "--place",
        "site=a",
        "--wait",
        "60s",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let ran_on_b = b.admin_json("/v1/status")["invocations"].clone();
    for job in ["one", "two", "three"] {
        crate::events::send(&b, "jobs", job);
    }
    let records = a.await_usage_records("worker", 3);
    assert!(
        records.iter().all(|r| r["trigger"] == "queue"),
        "{records:?}"
    );
    assert_eq!(b.admin_json("/v1/status")["invocations"], ran_on_b);

    // A restarted a answers forwarded requests again.
    let token = a.token.clone();
    a.stop();
    let mut a = fleet_node(dir_a.path(), &servers, "a", "site=a");
    a.token = token;
    eventually(Duration::from_secs(60), "b forwarding to the new a", || {
        let answer = send(&b, "GET", "/pinned", b"");
        (answer.status == 200 && answer.header("x-mayfly-node") == Some("a")).then_some(())
    });

    // With a gone, b answers 503 at once, naming the placement.
    a.stop();
    let answer = eventually(Duration::from_secs(30), "503 from b", || {
        let answer = send(&b, "GET", "/pinned", b"");
        (answer.status == 503).then_some(answer)
    });
    assert!(
        answer
            .body
            .contains("function `pinned` runs only on nodes with site=a; none is reachable"),
        "{}",
        answer.body
    );
    assert!(answer.header("retry-after").is_some());
    assert_eq!(answer.header("x-mayfly-node"), Some("b"));

    // A deploy no live node matches is stored, with a warning, and --wait
    // says why it cannot finish.
    eventually(Duration::from_secs(30), "a gone from the list", || {
        (b.admin_json("/v1/nodes").as_array().map_or(0, Vec::len) == 1).then_some(())
    });
    let (ok, stdout, stderr) = b.cli(&[
        "deploy",
        "pinned",
        hello.to_str().unwrap(),
        "--route",
        "/pinned",
        "--place",
        "site=a",
        "--wait",
        "1s",
    ]);
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("warning: no node with labels site=a is live"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "no live node has labels site=a: start one with `mayfly serve --labels site=a`"
        ),
        "{stderr}"
    );
    assert_eq!(send(&b, "GET", "/pinned", b"").status, 503);
}

#[test]
fn a_node_on_its_own_runs_a_placed_function_and_says_the_placement_does_not_apply() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let hello = guest("hello");
    let (ok, stdout, stderr) = node.cli(&[
        "deploy",
        "f",
        hello.to_str().unwrap(),
        "--route",
        "/f",
        "--place",
        "site=a",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("warning: this node runs on its own (no --nats)"),
        "{stderr}"
    );
    let answer = send(&node, "GET", "/f", b"");
    assert_eq!(answer.status, 200, "{}", answer.body);
    // A node on its own does not name itself.
    assert_eq!(answer.header("x-mayfly-node"), None);
    let described = node.admin_json("/v1/functions/f");
    assert_eq!(
        described["live"]["config"]["placement"]["site"], "a",
        "{described}"
    );

    // A malformed placement is refused before anything is sent.
    let (ok, _, stderr) = node.cli(&["deploy", "f", hello.to_str().unwrap(), "--place", "site"]);
    assert!(!ok && stderr.contains("is not KEY=VALUE"), "{stderr}");
    let (ok, _, stderr) = node.cli(&[
        "deploy",
        "f",
        hello.to_str().unwrap(),
        "--place",
        "site=a b",
    ]);
    assert!(!ok && stderr.contains("1-63 letters"), "{stderr}");
}

/// Gives both nodes the fleet's admin token, which whichever started first
/// made (the other read none).
pub(crate) fn share_admin_token(a: &mut Node, b: &mut Node) {
    let token = if a.token.is_empty() {
        b.token.clone()
    } else {
        a.token.clone()
    };
    a.token = token.clone();
    b.token = token;
}

/// Deploys the echo guest as `pinned` on `/pinned`, placed on `site=a`,
/// through `via`, waiting until the one matching node serves it.
pub(crate) fn deploy_pinned_echo(via: &Node) {
    let echo = guest("echo");
    let (ok, stdout, stderr) = via.cli(&[
        "deploy",
        "pinned",
        echo.to_str().unwrap(),
        "--route",
        "/pinned",
        "--place",
        "site=a",
        "--wait",
        "60s",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("live on 1 of 1 nodes with site=a"),
        "{stdout}{stderr}"
    );
}
