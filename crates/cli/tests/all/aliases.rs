//! Versions and aliases end to end: a weighted canary split that sticks to
//! a request id, a rollback under a request stream, alias-protected
//! versions and retention.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::common::{Node, agent, eventually};

/// GETs `path` with request id `id`; returns (status, serving version).
fn get_as(node: &Node, path: &str, id: &str) -> (u16, u64) {
    let response = agent()
        .get(format!("{}{path}", node.gateway))
        .header("x-mayfly-request-id", id)
        .call()
        .unwrap();
    let version = response
        .headers()
        .get("x-mayfly-version")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (response.status().as_u16(), version)
}

/// Deploys `guest_name` as a new version of `function` at `route`.
fn deploy(node: &Node, function: &str, guest_name: &str, route: &str) {
    node.deploy(function, guest_name, &[route]);
}

fn versions(node: &Node, function: &str) -> Vec<u64> {
    let mut numbers: Vec<u64> = node.admin_json(&format!("/v1/functions/{function}"))["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    numbers.sort_unstable();
    numbers
}

#[test]
fn a_canary_gets_its_share_and_a_request_id_sticks_to_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    deploy(&node, "f", "hello", "/f");
    deploy(&node, "f", "echo", "/f");
    let (ok, stdout, stderr) = node.cli(&["alias", "set", "f", "live", "1", "--canary", "2=10%"]);
    assert!(ok, "{stdout}{stderr}");

    let total = 1000;
    let mut canary = 0;
    for i in 0..total {
        let (status, version) = get_as(&node, "/f", &format!("split-{i}"));
        assert_eq!(status, 200);
        assert!(version == 1 || version == 2, "served by version {version}");
        canary += usize::from(version == 2);
    }
    // Binomial(1000, 0.1): mean 100, sd 9.5; ±5 sd is a one-in-millions
    // false alarm for a fair split and still catches a wrong weight.
    assert!(
        (52..=148).contains(&canary),
        "{canary} of {total} went to the canary"
    );

    // The same request id always lands on the same version.
    for i in 0..10 {
        let id = format!("sticky-{i}");
        let first = get_as(&node, "/f", &id).1;
        for _ in 0..10 {
            assert_eq!(get_as(&node, "/f", &id).1, first, "request id {id} moved");
        }
    }

    let (ok, list, stderr) = node.cli(&["alias", "list", "f"]);
    assert!(ok, "{stderr}");
    assert!(list.contains("live") && list.contains("10"), "{list}");
    let aliases = node.admin_json("/v1/functions/f/aliases");
    let live = aliases
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alias"] == "live")
        .cloned()
        .unwrap();
    assert_eq!(live["version"], 1);
    assert_eq!(live["canary"]["version"], 2);

    // Bad input is refused with a message, and changes nothing.
    let (ok, _, stderr) = node.cli(&["alias", "set", "f", "live", "9"]);
    assert!(!ok && stderr.contains('9'), "{stderr}");
    let (ok, _, stderr) = node.cli(&["alias", "set", "f", "live", "1", "--canary", "2=150%"]);
    assert!(!ok, "{stderr}");
    assert_eq!(node.admin_json("/v1/functions/f/aliases"), aliases);
}

#[test]
fn a_rollback_under_a_request_stream_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let node = Arc::new(Node::start(dir.path()));
    deploy(&node, "r", "hello", "/r");
    deploy(&node, "r", "echo", "/r");
    let compilations = node.admin_json("/v1/status")["compilations"].clone();

    let stop = Arc::new(AtomicBool::new(false));
    let rolled_back = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..4)
        .map(|t| {
            let (node, stop, rolled_back) = (node.clone(), stop.clone(), rolled_back.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Acquire) {
                    // Whether this request started after the rollback answered.
                    let after = rolled_back.load(Ordering::Acquire);
                    let (status, version) = get_as(&node, "/r", &format!("stream-{t}-{i}"));
                    seen.push((after, status, version));
                    i += 1;
                }
                seen
            })
        })
        .collect();

    eventually(Duration::from_secs(30), "traffic on version 2", || {
        (node.usage_records(Some("r")).len() >= 50).then_some(())
    });
    let (ok, stdout, stderr) = node.cli(&["rollback", "r"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("2 -> 1"), "{stdout}");
    rolled_back.store(true, Ordering::Release);
    // The switch is in place before the rollback answers.
    assert_eq!(get_as(&node, "/r", "right-after").1, 1);
    let served_before = node.usage_records(Some("r")).len();
    eventually(
        Duration::from_secs(30),
        "traffic after the rollback",
        || (node.usage_records(Some("r")).len() >= served_before + 50).then_some(()),
    );
    stop.store(true, Ordering::Release);

    let seen: Vec<(bool, u16, u64)> = streams
        .into_iter()
        .flat_map(|stream| stream.join().unwrap())
        .collect();
    assert!(
        seen.iter().all(|(_, status, _)| *status == 200),
        "a request failed during the rollback"
    );
    assert!(seen.iter().any(|(after, _, v)| !after && *v == 2));
    assert!(seen.iter().any(|(after, _, _)| *after));
    assert!(
        seen.iter()
            .filter(|(after, ..)| *after)
            .all(|(_, _, v)| *v == 1),
        "a request sent after the rollback was served by version 2"
    );
    // Nothing was recompiled to switch.
    assert_eq!(node.admin_json("/v1/status")["compilations"], compilations);
}

#[test]
fn aliased_versions_are_kept_and_the_rest_retained_up_to_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--keep-versions", "2"]);
    deploy(&node, "k", "hello", "/k");
    deploy(&node, "k", "echo", "/k");
    let (ok, _, stderr) = node.cli(&["alias", "set", "k", "beta", "1"]);
    assert!(ok, "{stderr}");
    deploy(&node, "k", "logs", "/k");
    // Two newest, plus the one an alias holds.
    assert_eq!(versions(&node, "k"), [1, 2, 3]);

    // An alias is reachable through the admin invoke.
    let response = agent()
        .post(format!(
            "{}/v1/functions/k/invoke?alias=beta&method=GET",
            node.admin
        ))
        .header("authorization", node.bearer())
        .send_empty()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-mayfly-version"], "1");

    // An aliased version cannot be deleted; the message names the alias.
    let (ok, _, stderr) = node.cli(&["versions", "k", "--delete", "1"]);
    assert!(!ok && stderr.contains("beta"), "{stderr}");
    let (ok, _, stderr) = node.cli(&["versions", "k", "--delete", "3"]);
    assert!(!ok && stderr.contains("live"), "{stderr}");

    let (ok, _, stderr) = node.cli(&["alias", "delete", "k", "beta"]);
    assert!(ok, "{stderr}");
    deploy(&node, "k", "hello", "/k");
    // hello again is a new version (4): its config and digest differ from
    // the live one's. 1 and 2 are beyond the two newest and unaliased now.
    assert_eq!(versions(&node, "k"), [3, 4]);
    let (ok, _, stderr) = node.cli(&["versions", "k", "--delete", "3"]);
    assert!(ok, "{stderr}");
    assert_eq!(versions(&node, "k"), [4]);
    let listing: Value = node.admin_json("/v1/functions/k");
    assert_eq!(listing["live"]["version"], 4);
}

/// The `live` alias of `function`: (version, canary version if any).
fn live_of(node: &Node, function: &str) -> (u64, Option<u64>) {
    let aliases = node.admin_json(&format!("/v1/functions/{function}/aliases"));
    let live = &aliases[0];
    assert_eq!(live["alias"], "live");
    (
        live["version"].as_u64().unwrap(),
        live["canary"]["version"].as_u64(),
    )
}

/// Sends requests to `route` until `live` has no canary left; returns the
/// statuses seen per version.
fn drive_until_judged(node: &Node, function: &str, route: &str, tag: &str) -> Vec<(u16, u64)> {
    let mut seen = Vec::new();
    let mut i = 0;
    eventually(Duration::from_secs(60), "the canary's verdict", || {
        for _ in 0..10 {
            seen.push(get_as(node, route, &format!("{tag}-{i}")));
            i += 1;
        }
        live_of(node, function).1.is_none().then_some(())
    });
    seen
}

#[test]
fn an_automatic_canary_rolls_back_a_failing_version_and_promotes_a_healthy_one() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    deploy(&node, "c", "hello", "/c");
    deploy(&node, "c", "trap", "/c");
    deploy(&node, "c", "echo", "/c");

    // Version 2 traps on every request: 1 error is all 5% of 20 allows, so
    // the second one rolls it back, long before its 20 requests.
    let (ok, stdout, stderr) = node.cli(&[
        "alias",
        "set",
        "c",
        "live",
        "1",
        "--canary",
        "2=50%",
        "--auto",
        "--auto-requests",
        "20",
        "--max-error-rate",
        "5%",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("auto"), "{stdout}");
    let seen = drive_until_judged(&node, "c", "/c", "failing");
    assert_eq!(live_of(&node, "c"), (1, None));
    let failed = seen.iter().filter(|(status, _)| *status == 500).count();
    // The verdict came at the second error; a request or two may reach the
    // canary while the move is being stored.
    assert!(
        (2..20).contains(&failed),
        "errors served by the canary: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|&(status, version)| (status == 500) == (version == 2))
    );
    // Every new request is served by version 1 at once.
    for i in 0..20 {
        assert_eq!(
            get_as(&node, "/c", &format!("after-rollback-{i}")),
            (200, 1)
        );
    }

    // Version 3 answers every request: after 30 of them within the
    // thresholds it takes all the traffic.
    let (ok, stdout, stderr) = node.cli(&[
        "alias",
        "set",
        "c",
        "live",
        "1",
        "--canary",
        "3=50%",
        "--auto",
        "--auto-requests",
        "30",
        "--max-p99",
        "5s",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let seen = drive_until_judged(&node, "c", "/c", "healthy");
    assert!(seen.iter().all(|(status, _)| *status == 200), "{seen:?}");
    assert_eq!(live_of(&node, "c"), (3, None));
    for i in 0..20 {
        assert_eq!(get_as(&node, "/c", &format!("after-promote-{i}")), (200, 3));
    }
    // The old version is one rollback away, as after a deploy.
    let aliases = node.admin_json("/v1/functions/c/aliases");
    assert_eq!(aliases[0]["previous_version"], 1);

    // Both automatic moves are in the history, with their figures, and in
    // the function's log.
    let history = node.admin_json("/v1/functions/c")["history"].clone();
    let causes: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["cause"].as_str().unwrap())
        .collect();
    assert_eq!(
        causes,
        [
            "auto-promote",
            "set",
            "auto-rollback",
            "set",
            "deploy",
            "deploy",
            "deploy"
        ]
    );
    assert!(
        history[2]["detail"]
            .as_str()
            .unwrap()
            .contains("2 errors in"),
        "{history}"
    );
    assert!(
        history[0]["detail"]
            .as_str()
            .unwrap()
            .contains("0 errors in 30 requests"),
        "{history}"
    );
    let (ok, listing, stderr) = node.cli(&["versions", "c"]);
    assert!(ok, "{stderr}");
    assert!(
        listing.contains("auto-rollback") && listing.contains("auto-promote"),
        "{listing}"
    );
    // The log writer commits in batches: poll.
    eventually(
        Duration::from_secs(10),
        "the canary lines in the log",
        || {
            let (ok, logs, _) = node.cli(&["logs", "c"]);
            (ok && logs.contains("canary version 2 on `live` rolled back")
                && logs.contains("canary version 3 on `live` promoted"))
            .then_some(())
        },
    );

    // Thresholds are checked before anything changes.
    let (ok, _, stderr) = node.cli(&[
        "alias",
        "set",
        "c",
        "live",
        "3",
        "--canary",
        "1=10%",
        "--auto",
        "--auto-requests",
        "0",
    ]);
    // The API's `auto.requests`, named as the flag that set it.
    assert!(!ok && stderr.contains("`--auto-requests` is 0"), "{stderr}");
    assert_eq!(live_of(&node, "c"), (3, None));
}
