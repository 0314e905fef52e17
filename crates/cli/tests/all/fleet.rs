//! Fleet mode: `mayfly serve --nats` nodes over real nats-server processes
//! on loopback (started by `mayfly_nats::testing`).

use std::process::Command;
use std::time::Duration;

use mayfly_nats::testing::{NatsServers, free_port};
use serde_json::Value;

use crate::common::{Node, eventually};

/// Starts a fleet node named `name` with `labels` on `servers`.
fn fleet_node(dir: &std::path::Path, servers: &NatsServers, name: &str, labels: &str) -> Node {
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
    let b = fleet_node(dir_b.path(), &servers, "node-b", "region=us");

    eventually(Duration::from_secs(20), "both nodes listed", || {
        (listed(&a) == ["node-a", "node-b"]).then_some(())
    });
    let nodes = a.admin_json("/v1/nodes");
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
