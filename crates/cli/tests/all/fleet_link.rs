//! A fleet node's link to NATS: it keeps serving through an outage, says
//! so in `mayfly status`, buffers usage and catches up exactly; and
//! `logs --follow` on one node shows the lines every node writes.

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mayfly_nats::testing::NatsServers;
use serde_json::Value;

use crate::common::{Node, eventually};
use crate::fleet::{fleet_node, served};

/// How long anything may take to converge on a busy machine (a reconnect
/// waits up to 4 s between attempts).
const CONVERGE: Duration = Duration::from_secs(60);

/// The `fleet` part of `node`'s status.
fn link(node: &Node) -> Value {
    let status = node.admin_json("/v1/status");
    assert!(status["fleet"].is_object(), "no fleet link: {status}");
    status["fleet"].clone()
}

/// Invocations of `function` in `node`'s view of the fleet's ledger.
fn invocations(node: &Node, function: &str) -> u64 {
    let usage = node.admin_json(&format!("/v1/usage?function={function}"));
    usage["total"]["invocations"]
        .as_u64()
        .unwrap_or_else(|| panic!("no total: {usage}"))
}

/// GETs `path` `count` times; each must answer 200.
fn request(node: &Node, path: &str, count: u64) {
    for _ in 0..count {
        let (status, body) = node.get(path);
        assert_eq!(status, 200, "{body}");
    }
}

#[test]
fn a_node_cut_off_from_nats_serves_buffers_its_usage_and_catches_up_exactly() {
    let mut servers = NatsServers::single();
    let dir = tempfile::tempdir().unwrap();
    let node = fleet_node(dir.path(), &servers, "edge-1", "region=eu");
    node.deploy("hello", "hello", &["/hello"]);

    const BEFORE: u64 = 3;
    request(&node, "/hello", BEFORE);
    eventually(CONVERGE, "the first records published", || {
        let link = link(&node);
        (link["connected"] == true
            && link["usage_backlog"] == 0
            && invocations(&node, "hello") == BEFORE)
            .then_some(())
    });
    let (ok, text, stderr) = node.cli(&["status"]);
    assert!(ok, "{stderr}");
    assert!(text.contains("connected to nats://127.0.0.1:"), "{text}");
    // `status --fleet`: the link, then the nodes as `node list` shows them
    // (the version served appears with the heartbeat after the deploy).
    eventually(CONVERGE, "status --fleet to list the node", || {
        let (ok, text, stderr) = node.cli(&["status", "--fleet"]);
        assert!(ok, "{stderr}");
        (text.contains("connected to nats://")
            && text.lines().any(|line| {
                line.starts_with("edge-1 ")
                    && line.contains("region=eu")
                    && line.contains("hello@1")
            }))
        .then_some(())
    });
    let (ok, json, stderr) = node.cli(&["status", "--fleet", "--json"]);
    assert!(ok, "{stderr}");
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["link"]["connected"], true, "{json}");
    assert_eq!(json["nodes"][0]["name"], "edge-1", "{json}");

    // A crash of the only server: the node keeps serving what it has.
    servers.kill(0);
    // The state is the client's at once; the time comes from its event
    // callback, a moment later.
    eventually(CONVERGE, "the node to notice the outage", || {
        let link = link(&node);
        (link["connected"] == false && link["disconnected_since_ms"].is_i64()).then_some(())
    });
    const DURING: u64 = 5;
    request(&node, "/hello", DURING);
    let link_now = eventually(CONVERGE, "the outage's records in the backlog", || {
        let link = link(&node);
        (link["usage_backlog"] == DURING).then_some(link)
    });
    assert_eq!(link_now["connected"], false, "{link_now}");
    // The node reads its own usage while cut off.
    assert_eq!(invocations(&node, "hello"), BEFORE + DURING);
    let (ok, text, stderr) = node.cli(&["status"]);
    assert!(ok, "{stderr}");
    assert!(text.contains("disconnected"), "{text}");
    assert!(
        text.contains(&format!("{DURING} usage records not yet published")),
        "{text}"
    );
    assert!(text.contains("disconnected since 20"), "{text}");
    // The fleet's node list is out of reach; the link still shows.
    let (_, text, _) = node.cli(&["status", "--fleet"]);
    assert!(text.contains("disconnected"), "{text}");
    // And Prometheus sees it.
    let metrics = node.metrics();
    assert!(metrics.contains("mayfly_fleet_connected 0"), "{metrics}");
    assert!(
        metrics.contains(&format!("mayfly_fleet_usage_backlog_records {DURING}")),
        "{metrics}"
    );

    // The same server back, on the same port with the same store.
    servers.restart(0);
    servers.wait_ready();
    eventually(
        CONVERGE,
        "the node to reconnect and publish its backlog",
        || {
            let link = link(&node);
            (link["connected"] == true && link["usage_backlog"] == 0).then_some(())
        },
    );
    let (ok, text, stderr) = node.cli(&["status"]);
    assert!(ok, "{stderr}");
    assert!(text.contains("connected to nats://"), "{text}");
    assert!(!text.contains("disconnected"), "{text}");
    assert!(node.metrics().contains("mayfly_fleet_connected 1"));
    // The membership bucket (kept in memory) went with the server; the
    // node makes it again and is listed.
    eventually(CONVERGE, "the node listed again after the restart", || {
        let (ok, text, _) = node.cli(&["node", "list"]);
        (ok && text.lines().any(|line| line.starts_with("edge-1 "))).then_some(())
    });
    // Every request counted once: the stream's copies of the node's own
    // records (some maybe sent twice across the outage) are not counted
    // again.
    request(&node, "/hello", 1);
    eventually(CONVERGE, "the last record published", || {
        (link(&node)["usage_backlog"] == 0 && invocations(&node, "hello") == BEFORE + DURING + 1)
            .then_some(())
    });
    assert_eq!(
        node.usage_records(Some("hello")).len() as u64,
        BEFORE + DURING + 1
    );
    // A node joining now reads the fleet's ledger from the stream alone:
    // every record reached it, the outage's too.
    let dir_2 = tempfile::tempdir().unwrap();
    let mut joined = fleet_node(dir_2.path(), &servers, "edge-2", "region=eu");
    joined.token = node.token.clone();
    eventually(CONVERGE, "the new node to read every record", || {
        (invocations(&joined, "hello") == BEFORE + DURING + 1).then_some(())
    });
}

/// Starts `mayfly logs NAME --follow` against `node` (with `extra` flags);
/// its stdout lines arrive on the returned channel.
fn follow(
    node: &Node,
    name: &str,
    extra: &[&str],
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut follower = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["logs", name, "--follow", "--tail", "0"])
        .args(extra)
        .env("MAYFLY_ADMIN_URL", &node.admin)
        .env("MAYFLY_TOKEN", &node.token)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (follower, received)
}

#[test]
fn following_logs_on_one_node_shows_lines_another_node_wrote_tagged_with_it() {
    let servers = NatsServers::single();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = fleet_node(dir_a.path(), &servers, "node-a", "region=eu");
    let mut b = fleet_node(dir_b.path(), &servers, "node-b", "region=us");
    b.token = a.token.clone();
    a.deploy("logs", "logs", &["/logs"]);
    served(&b, "/logs", "logged");

    let (mut text_follower, text_lines) = follow(&a, "logs", &[]);
    let (mut json_follower, json_lines) = follow(&a, "logs", &["--json"]);
    // A follower may subscribe after a request: keep requesting on b until
    // both followers on a have printed one of b's lines.
    let (mut text_seen, mut json_seen) = (None, None);
    eventually(CONVERGE, "a's followers to print b's line", || {
        b.get("/logs/from-b");
        while let Ok(line) = text_lines.try_recv() {
            if line.contains("stdout line one for /logs/from-b") {
                text_seen.get_or_insert(line);
            }
        }
        while let Ok(line) = json_lines.try_recv() {
            if line.contains("stdout line one for /logs/from-b") {
                json_seen.get_or_insert(line);
            }
        }
        (text_seen.is_some() && json_seen.is_some()).then_some(())
    });
    for follower in [&mut text_follower, &mut json_follower] {
        let _ = follower.kill();
        let _ = follower.wait();
    }
    let text = text_seen.unwrap();
    assert!(text.starts_with("[node-b] "), "{text}");
    let json: Value = serde_json::from_str(&json_seen.unwrap()).unwrap();
    assert_eq!(json["node"], "node-b", "{json}");
    assert_eq!(json["function"], "logs", "{json}");
    assert_eq!(json["stream"], "stdout", "{json}");

    // The node's own lines come through the same feed, tagged too.
    let (mut own_follower, own_lines) = follow(&a, "logs", &[]);
    let mut own = None;
    eventually(CONVERGE, "a's follower to print a's line", || {
        a.get("/logs/from-a");
        while let Ok(line) = own_lines.try_recv() {
            if line.contains("stdout line one for /logs/from-a") {
                own.get_or_insert(line);
            }
        }
        own.is_some().then_some(())
    });
    let _ = own_follower.kill();
    let _ = own_follower.wait();
    assert!(own.unwrap().starts_with("[node-a] "));

    // `mayfly logs` without --follow: the last lines of every node, oldest
    // first, each tagged, asked through either node.
    for node in [&a, &b] {
        let (ok, text, stderr) = node.cli(&["logs", "logs", "--tail", "1000"]);
        assert!(ok, "{stderr}");
        let from = |writer: &str, path: &str| {
            text.lines().position(|line| {
                line.starts_with(&format!("[{writer}] "))
                    && line.contains(&format!("stdout line one for {path}"))
            })
        };
        let (Some(from_b), Some(from_a)) = (
            from("node-b", "/logs/from-b"),
            from("node-a", "/logs/from-a"),
        ) else {
            panic!("lines of both nodes expected from {}:\n{text}", node.admin);
        };
        // b's requests all came before a's.
        assert!(from_b < from_a, "{text}");
    }
    let (ok, json, stderr) = a.cli(&["logs", "logs", "--json"]);
    assert!(ok, "{stderr}");
    let first: Value = serde_json::from_str(json.lines().next().unwrap_or_default()).unwrap();
    assert!(first["node"].is_string(), "{first}");
}
