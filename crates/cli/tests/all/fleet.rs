//! Fleet mode: `mayfly serve --nats` nodes over real nats-server processes
//! on loopback (started by `mayfly_nats::testing`).

use std::process::Command;
use std::time::Duration;

use mayfly_nats::testing::{NatsServers, free_port};
use serde_json::Value;

use crate::common::{Node, eventually};

/// Starts a fleet node named `name` with `labels` on `servers`.
pub(crate) fn fleet_node(
    dir: &std::path::Path,
    servers: &NatsServers,
    name: &str,
    labels: &str,
) -> Node {
    let urls = servers.urls();
    Node::start_with(
        dir,
        &[
            "--nats",
            &urls,
            "--node-name",
            name,
            "--labels",
            labels,
            "--nats-namespace",
            "fleet",
        ],
    )
}

/// The node names `node` lists, sorted.
fn listed(node: &Node) -> Vec<String> {
    let (ok, stdout, stderr) = node.cli(&["node", "list", "--json"]);
    assert!(ok, "node list failed: {stderr}");
    let nodes: Vec<Value> = serde_json::from_str(&stdout).expect("JSON list");
    nodes
        .iter()
        .map(|n| n["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn nodes_list_each_other_with_their_labels_and_a_stopped_node_leaves() {
    let servers = NatsServers::single();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = fleet_node(dir_a.path(), &servers, "node-a", "region=eu,site=fra1");
    let mut b = fleet_node(dir_b.path(), &servers, "node-b", "region=us");
    // Only the fleet's first node creates an admin token; it works on all.
    assert!(
        b.token.is_empty(),
        "a joining node made a second admin token"
    );
    b.token = a.token.clone();

    // A node's first heartbeat may go out before its gateway listens: wait
    // for one that carries the address.
    let nodes = eventually(Duration::from_secs(20), "both nodes listed", || {
        let nodes = a.admin_json("/v1/nodes");
        let ready = listed(&a) == ["node-a", "node-b"]
            && nodes
                .as_array()
                .is_some_and(|n| n.iter().all(|n| n["gateway"] != ""));
        ready.then_some(nodes)
    });
    assert_eq!(nodes[0]["labels"]["site"], "fra1", "{nodes}");
    assert_eq!(nodes[1]["labels"]["region"], "us", "{nodes}");
    assert_eq!(nodes[1]["gateway"], b.gateway.trim_start_matches("http://"));
    let (ok, table, _) = a.cli(&["node", "list"]);
    assert!(ok && table.contains("region=eu,site=fra1"), "{table}");

    // A clean stop leaves the list at once; no heartbeat expiry needed.
    b.stop();
    eventually(Duration::from_secs(20), "node-b gone", || {
        (listed(&a) == ["node-a"]).then_some(())
    });
}

#[test]
fn a_node_alone_lists_itself() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        dir.path(),
        &["--node-name", "solo", "--labels", "site=home"],
    );
    let nodes = eventually(
        Duration::from_secs(10),
        "the node's first heartbeat",
        || {
            let nodes = node.admin_json("/v1/nodes");
            (nodes.as_array().is_some_and(|n| !n.is_empty())).then_some(nodes)
        },
    );
    assert_eq!(nodes[0]["name"], "solo", "{nodes}");
    assert_eq!(nodes[0]["labels"]["site"], "home", "{nodes}");
}

#[test]
fn an_unreachable_fleet_is_a_clear_error_naming_the_server_but_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let output = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--nats")
        .arg(format!("nats://mayfly:hunter2@127.0.0.1:{port}"))
        .output()
        .expect("mayfly runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("NATS unreachable at nats://127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// Polls `node`'s gateway until `path` answers 200 with a body
/// containing `expected`; returns how long that took.
pub(crate) fn served(node: &Node, path: &str, expected: &str) -> Duration {
    let started = std::time::Instant::now();
    // Generous: on a loaded 2-core machine three servers, three nodes and
    // their compiles share the cores with other tests.
    let deadline = started + Duration::from_secs(60);
    loop {
        let (status, body) = node.get(path);
        if status == 200 && body.contains(expected) {
            return started.elapsed();
        }
        if std::time::Instant::now() > deadline {
            // What the node knows, for whoever reads the failure.
            panic!(
                "{path} on {} still answers {status} {body:?} after {:?}; its status: {}; \
                 the fleet's nodes: {}",
                node.gateway,
                started.elapsed(),
                node.admin_json("/v1/status"),
                node.admin_json("/v1/nodes")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_deploy_through_one_node_serves_on_all_and_a_rollback_reaches_every_node() {
    // Three JetStream servers with three copies of everything, and a node
    // per server.
    let servers = NatsServers::cluster(3);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Node> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| fleet_node(dir.path(), &servers, &format!("n{i}"), "region=eu"))
        .collect();
    // The first node made the fleet's admin token; it works on every node.
    let token = nodes[0].token.clone();
    for node in &mut nodes[1..] {
        node.token = token.clone();
    }

    nodes[0].deploy("f", "hello", &["/f"]);
    let slowest = nodes
        .iter()
        .map(|node| served(node, "/f", "Hello"))
        .max()
        .unwrap_or_default();
    eprintln!("deploy to first 200 on the last of 3 nodes: {slowest:?}");

    // A second version through another node, waiting for the rollout.
    let echo = crate::common::guest("echo");
    let (ok, stdout, stderr) = nodes[1].cli(&[
        "deploy",
        "f",
        echo.to_str().unwrap(),
        "--route",
        "/f",
        "--wait",
        "30s",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("live on 3 of 3 nodes"), "{stdout}");
    for node in &nodes {
        let (status, _, _) = node.request("GET", "/f", b"");
        assert_eq!(status, 200);
        let (_, body) = node.get("/f");
        assert!(
            !body.contains("Hello"),
            "{} still serves version 1",
            node.gateway
        );
    }
    let (ok, table, _) = nodes[2].cli(&["versions", "f", "--fleet"]);
    assert!(ok && table.matches(" 2\n").count() == 3, "{table}");

    // A rollback through the third node reaches every node.
    let (ok, stdout, stderr) = nodes[2].cli(&["rollback", "f"]);
    assert!(ok, "{stdout}{stderr}");
    for node in &nodes {
        served(node, "/f", "Hello");
    }
    // Every node's token works on every node: tokens are the fleet's.
    let (ok, _, stderr) = Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["list"])
        .env("MAYFLY_ADMIN_URL", &nodes[1].admin)
        .env("MAYFLY_TOKEN", &nodes[0].token)
        .output()
        .map(|o| {
            (
                o.status.success(),
                o.stdout,
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(ok, "{stderr}");
}
