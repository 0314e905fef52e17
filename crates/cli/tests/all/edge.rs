//! Edge nodes at NATS leaf sites (issue 18, docs/edge-design.md): a hub
//! and two sites, each site server's leaf link through a proxy that can
//! cut it; one node at each site reaches the fleet's state through the
//! hub's JetStream domain.

use std::time::Duration;

use mayfly_nats::testing::{EdgeServers, NatsServers};

use crate::common::{Node, eventually, guest};
use crate::placement::send;

/// A node at leaf site `site` named `name`, labelled `labels`.
fn edge_node(
    dir: &std::path::Path,
    servers: &EdgeServers,
    site: &str,
    name: &str,
    labels: &str,
) -> Node {
    Node::start_with(
        dir,
        &[
            "--nats",
            &servers.site_url(site),
            "--node-name",
            name,
            "--labels",
            labels,
            "--nats-namespace",
            "edge",
        ],
    )
}

#[test]
fn a_function_pinned_to_site_a_runs_there_and_site_b_forwards_to_it_over_the_leaf_links() {
    let servers = NatsServers::hub_with_sites(&["site-a", "site-b"]);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = edge_node(dir_a.path(), &servers, "site-a", "a", "site=a");
    let mut b = edge_node(dir_b.path(), &servers, "site-b", "b", "site=b");
    // Whichever started first made the fleet's admin token (at the hub).
    let token = if a.token.is_empty() {
        b.token.clone()
    } else {
        a.token.clone()
    };
    a.token = token.clone();
    b.token = token;
    eventually(Duration::from_secs(30), "both edge nodes listed", || {
        let nodes = b.admin_json("/v1/nodes");
        (nodes.as_array().map_or(0, Vec::len) == 2).then_some(())
    });

    // Deployed at site b, which does not run it; only a loads it.
    let echo = guest("echo");
    let (ok, stdout, stderr) = b.cli(&[
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
    assert_eq!(a.admin_json("/v1/status")["functions"], 1);
    assert_eq!(b.admin_json("/v1/status")["functions"], 0);

    // At a it is served locally; at b it is forwarded through the hub to
    // a, which names itself.
    let local = send(&a, "POST", "/pinned/x", b"here");
    assert_eq!(
        (local.status, local.header("x-mayfly-node")),
        (200, Some("a")),
        "{}",
        local.body
    );
    let forwarded = send(&b, "POST", "/pinned/x?q=1", b"from b");
    assert_eq!(forwarded.status, 200, "{}", forwarded.body);
    assert_eq!(forwarded.header("x-mayfly-node"), Some("a"));
    assert!(forwarded.body.contains("from b"), "{}", forwarded.body);
}
