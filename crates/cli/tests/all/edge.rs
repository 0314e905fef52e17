//! Edge nodes at NATS leaf sites (issue 18, docs/edge-design.md): a hub
//! and two sites, each site server's leaf link through a proxy that can
//! cut it; one node at each site reaches the fleet's state through the
//! hub's JetStream domain.

use std::time::Duration;

use mayfly_nats::testing::{EdgeServers, NatsServers};

use serde_json::Value;

use crate::common::{Node, eventually, guest};
use crate::placement::{Answer, deploy_pinned_echo, send, share_admin_token};

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

/// `node`'s record of edge node `name` in `mayfly status --fleet --json`,
/// once `check` holds for it.
fn site_record(node: &Node, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(30), what, || {
        let (_, stdout, _) = node.cli(&["status", "--fleet", "--json"]);
        let status: Value = serde_json::from_str(&stdout).ok()?;
        let record = status["sites"]
            .as_array()?
            .iter()
            .find(|r| r["node"]["name"] == name)?
            .clone();
        check(&record).then_some(record)
    })
}

/// Requests to the pinned function, counting those answered 200: only
/// node `a` runs it, so each is one invocation at `a`.
struct Served(std::cell::Cell<u64>);

impl Served {
    fn send(&self, node: &Node, method: &str, path: &str, body: &[u8]) -> Answer {
        let answer = send(node, method, path, body);
        if answer.status == 200 {
            self.0.set(self.0.get() + 1);
        }
        answer
    }
}

/// Invocations of `function` in `node`'s view of the fleet's ledger.
fn invocations(node: &Node, function: &str) -> Option<u64> {
    node.admin_json(&format!("/v1/usage?function={function}"))["total"]["invocations"].as_u64()
}

/// Queue messages `node` delivered to `function` (its own metrics).
fn delivered(node: &Node, function: &str) -> u64 {
    let line =
        format!("mayfly_event_deliveries_total{{function=\"{function}\",result=\"delivered\"}} ");
    node.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str())?.trim().parse().ok())
        .unwrap_or(0)
}

/// Sends `body` to `queue` through `node`'s admin API: status and answer.
fn queue_send(node: &Node, queue: &str, body: &str) -> (u16, Value) {
    crate::events::admin(
        node,
        "POST",
        &format!("/v1/queues/{queue}/messages"),
        &[],
        body.as_bytes(),
    )
}

/// Whether the hub link in `node`'s status is `up`.
fn hub_link_up(node: &Node) -> Option<bool> {
    node.admin_json("/v1/status")["fleet"]["hub"]["up"].as_bool()
}

#[test]
fn a_function_pinned_to_site_a_runs_there_site_b_forwards_to_it_and_the_fleet_status_follows_the_link()
 {
    let servers = NatsServers::hub_with_sites(&["site-a", "site-b"]);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = edge_node(dir_a.path(), &servers, "site-a", "a", "site=a");
    let mut b = edge_node(dir_b.path(), &servers, "site-b", "b", "site=b");
    // Whichever started first made the fleet's admin token (at the hub).
    share_admin_token(&mut a, &mut b);
    eventually(Duration::from_secs(30), "both edge nodes listed", || {
        let nodes = b.admin_json("/v1/nodes");
        (nodes.as_array().map_or(0, Vec::len) == 2).then_some(())
    });

    // Deployed at site b, which does not run it; only a loads it.
    deploy_pinned_echo(&b);
    assert_eq!(a.admin_json("/v1/status")["functions"], 1);
    assert_eq!(b.admin_json("/v1/status")["functions"], 0);

    let served = Served(std::cell::Cell::new(0));
    // At a it is served locally; at b it is forwarded through the hub to
    // a, which names itself.
    let local = served.send(&a, "POST", "/pinned/x", b"here");
    assert_eq!(
        (local.status, local.header("x-mayfly-node")),
        (200, Some("a")),
        "{}",
        local.body
    );
    let forwarded = served.send(&b, "POST", "/pinned/x?q=1", b"from b");
    assert_eq!(forwarded.status, 200, "{}", forwarded.body);
    assert_eq!(forwarded.header("x-mayfly-node"), Some("a"));
    assert!(forwarded.body.contains("from b"), "{}", forwarded.body);

    // Status: every edge node by site, connected, with the versions it
    // serves.
    let record = site_record(&b, "a", "site a in b's status", |r| {
        r["node"]["functions"]["pinned"] == 1
    });
    assert_eq!(
        (record["site"].as_str(), record["stale"].as_bool()),
        (Some("site-a"), Some(false)),
        "{record}"
    );
    assert_eq!(record["link"]["up"], true, "{record}");
    site_record(&a, "b", "site b in a's status", |r| r["site"] == "site-b");
    assert_eq!(hub_link_up(&a), Some(true));

    // A queue placed at site a (`jobs@site-a`), consumed by a function
    // pinned there: a message sent at b goes into site a's own store
    // and is delivered at a.
    let echo = guest("echo");
    let (ok, stdout, stderr) = b.cli(&[
        "deploy",
        "worker",
        echo.to_str().unwrap(),
        "--trigger",
        "queue:jobs@site-a",
        "--place",
        "site=a",
        "--wait",
        "60s",
    ]);
    assert!(ok, "{stdout}{stderr}");
    // A trigger on another site's queue is refused, naming both places.
    let (ok, _, stderr) = b.cli(&["trigger", "add", "worker", "--queue", "jobs@site-b"]);
    assert!(
        !ok && stderr.contains("queue `jobs@site-b` lives at site `site-b`")
            && stderr.contains("placed at `site=a`, which node `a` at site `site-a` matches"),
        "{stderr}"
    );
    let (status, sent) = queue_send(&b, "jobs@site-a", "before the cut");
    assert_eq!(status, 201, "{sent}");
    eventually(Duration::from_secs(30), "a delivers b's message", || {
        (delivered(&a, "worker") == 1).then_some(())
    });

    // Cut site a off: a keeps serving what it runs, sees the hub down;
    // b's status shows site a stale, and b cannot reach the function.
    servers.link("site-a").cut();
    eventually(Duration::from_secs(30), "a sees the hub link down", || {
        (hub_link_up(&a) == Some(false)).then_some(())
    });
    let local = served.send(&a, "GET", "/pinned", b"");
    assert_eq!(
        (local.status, local.header("x-mayfly-node")),
        (200, Some("a"))
    );
    // An admin change at a needs the hub: refused, saying so.
    let hello = guest("hello");
    let (ok, _, stderr) = a.cli(&[
        "deploy",
        "other",
        hello.to_str().unwrap(),
        "--route",
        "/other",
    ]);
    assert!(
        !ok && stderr.contains("unreachable from site `site-a`"),
        "{stderr}"
    );
    // A queue message sent at a during the cut is delivered at a: the
    // queue is in the site's own store. A queue at the hub is out of
    // reach (503, naming the hub), and so is a's queue from b.
    let sent_at = std::time::Instant::now();
    let (status, sent) = queue_send(&a, "jobs@site-a", "during the cut");
    assert_eq!(status, 201, "{sent}");
    eventually(
        Duration::from_secs(30),
        "a delivers its message while cut",
        || (delivered(&a, "worker") == 2).then_some(()),
    );
    eprintln!(
        "edge: a message sent at site a during the cut was delivered there within {:?}",
        sent_at.elapsed()
    );
    let (status, refused) = queue_send(&a, "jobs", "to the hub");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(
        status == 503
            && message.contains("the hub (JetStream domain `hub`)")
            && message.contains("unreachable from site `site-a`"),
        "{status} {refused}"
    );
    let (status, refused) = queue_send(&b, "jobs@site-a", "from b");
    assert_eq!(status, 503, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("site `site-a`")),
        "{refused}"
    );
    // A steady stream of requests at a during the cut: no errors.
    for _ in 0..20 {
        let answer = served.send(&a, "GET", "/pinned", b"");
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    // Its usage records wait on a's disk for the hub.
    eventually(Duration::from_secs(30), "a's usage backlog", || {
        let backlog = a.admin_json("/v1/status")["fleet"]["usage_backlog"].as_u64()?;
        (backlog >= 1).then_some(())
    });
    let record = site_record(&b, "a", "site a stale in b's status", |r| {
        r["stale"] == true
    });
    let cut_seen = record["node"]["at_ms"].as_i64().unwrap();
    let (ok, text, stderr) = b.cli(&["status", "--fleet"]);
    assert!(ok, "{stderr}");
    let row = text
        .lines()
        .find(|l| l.starts_with("site-a"))
        .unwrap_or_default();
    assert!(row.contains("stale") && row.contains("pinned@1"), "{text}");
    // a's own view while cut: its hub link down, its own site live.
    let (_, text, _) = a.cli(&["status", "--fleet"]);
    assert!(
        text.contains("hub link") && text.contains("down since"),
        "{text}"
    );
    let own = site_record(&a, "a", "a's own record while cut", |r| {
        r["link"]["up"] == false
    });
    assert_eq!(own["stale"], false, "{own}");
    eventually(
        Duration::from_secs(30),
        "b answers 503 for the cut site's function",
        || {
            let answer = served.send(&b, "GET", "/pinned", b"");
            (answer.status == 503).then_some(())
        },
    );
    // A deploy made at the hub's side during the cut (another component:
    // the same one again would be no new version): a keeps serving
    // version 1 until it hears of version 2.
    let (ok, stdout, stderr) = b.cli(&[
        "deploy",
        "pinned",
        hello.to_str().unwrap(),
        "--route",
        "/pinned",
        "--place",
        "site=a",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let local = served.send(&a, "GET", "/pinned", b"");
    assert_eq!(local.header("x-mayfly-version"), Some("1"));

    // Heal: a serves version 2 (the time it took is printed: the issue
    // asks for 2 s, not asserted on a shared machine); b sees site a
    // connected again, with a link up since after the cut; forwarding
    // works again.
    servers.link("site-a").heal();
    let healed = std::time::Instant::now();
    eventually(
        Duration::from_secs(30),
        "a serves the version deployed during the cut",
        || {
            let answer = served.send(&a, "GET", "/pinned", b"");
            (answer.header("x-mayfly-version") == Some("2")).then_some(())
        },
    );
    eprintln!(
        "edge: a deploy made during the cut was served at site a {:?} after the heal",
        healed.elapsed()
    );
    let record = site_record(&b, "a", "site a connected again", |r| {
        r["stale"] == false && r["link"]["up"] == true
    });
    assert!(
        record["link"]["since_ms"].as_i64().unwrap() >= cut_seen,
        "{record}"
    );
    eventually(Duration::from_secs(30), "a's usage backlog drained", || {
        let backlog = a.admin_json("/v1/status")["fleet"]["usage_backlog"].as_u64()?;
        (backlog == 0).then_some(())
    });
    eventually(Duration::from_secs(30), "b forwards to a again", || {
        let answer = served.send(&b, "GET", "/pinned", b"");
        (answer.status == 200 && answer.header("x-mayfly-node") == Some("a")).then_some(())
    });
    // Every request a served during the whole test is in the fleet's
    // ledger exactly once, as both sites see it: none lost in the cut,
    // none counted twice after it.
    for node in [&a, &b] {
        eventually(Duration::from_secs(30), "the fleet's usage total", || {
            let total = invocations(node, "pinned")?;
            assert!(
                total <= served.0.get(),
                "{total} invocations > {} served",
                served.0.get()
            );
            (total == served.0.get()).then_some(())
        });
    }
}

#[test]
fn the_deploy_folders_nats_configs_are_valid() {
    // nats-server checks a config file without starting (`-t`); the
    // store directories are moved to a temporary one.
    let dir = tempfile::tempdir().unwrap();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    for name in ["hub.conf", "site.conf"] {
        let text = std::fs::read_to_string(deploy.join(name)).unwrap();
        let config = dir.path().join(name);
        std::fs::write(
            &config,
            text.replace("/var/lib/nats", &dir.path().display().to_string()),
        )
        .unwrap();
        let out = std::process::Command::new(mayfly_nats::testing::nats_server_binary())
            .arg("-c")
            .arg(&config)
            .arg("-t")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "deploy/{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
