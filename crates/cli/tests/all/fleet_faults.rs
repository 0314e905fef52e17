//! Fleet mode under load and faults: exact usage totals, schedules that
//! fire once per slot, a NATS server killed during load, a Mayfly node
//! killed with events in flight. Real nats-server processes and real
//! `mayfly serve --nats` nodes on loopback.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mayfly_nats::testing::NatsServers;
use serde_json::Value;

use crate::common::{Node, agent, eventually};
use crate::events::{Logged, admin, dead_letters, invoke_async, send, try_deliveries};
use crate::fleet::fleet_node;

/// Starts `size` nodes on `servers`, all holding the fleet's admin token
/// (the first node's).
fn start_fleet(servers: &NatsServers, size: usize) -> (Vec<tempfile::TempDir>, Vec<Node>) {
    let dirs: Vec<_> = (0..size).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Node> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| fleet_node(dir.path(), servers, &format!("n{i}"), "region=eu"))
        .collect();
    let token = nodes[0].token.clone();
    for node in &mut nodes[1..] {
        node.token = token.clone();
    }
    (dirs, nodes)
}

/// Invocations of `function` in `node`'s view of the fleet ledger.
fn fleet_invocations(node: &Node, function: &str) -> u64 {
    let usage = node.admin_json(&format!("/v1/usage?function={function}"));
    usage["total"]["invocations"]
        .as_u64()
        .unwrap_or_else(|| panic!("a usage total: {usage}"))
}

/// Waits until every node's fleet ledger counts exactly `served`
/// invocations of `function`, failing at once on more.
fn await_exact_usage(nodes: &[&Node], function: &str, served: u64) {
    for node in nodes {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let counted = fleet_invocations(node, function);
            assert!(counted <= served, "{counted} records for {served} requests");
            if counted == served {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} counts {counted} invocations of {function}, {served} were served",
                node.admin
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What one load thread saw.
#[derive(Default)]
struct Load {
    /// Requests answered 200.
    served: u64,
    /// Bodies of queue messages the node accepted (201).
    accepted: Vec<String>,
    /// When a request or a send failed, and when one next succeeded.
    failures: Vec<Instant>,
    successes: Vec<Instant>,
}

/// Runs GETs of `path` and queue sends to `queue` against `node` until
/// `stop` is set. Failures are recorded, never fatal: they are what the
/// caller judges.
fn run_load(node: &Node, thread: usize, path: &str, queue: &str, stop: &AtomicBool) -> Load {
    let mut load = Load::default();
    let agent = agent();
    let mut k = 0;
    while !stop.load(Ordering::Acquire) {
        let ok = agent
            .get(format!("{}{path}", node.gateway))
            .call()
            .is_ok_and(|r| r.status() == 200);
        if ok {
            load.served += 1;
        }
        let body = format!("m-{thread}-{k}");
        k += 1;
        let sent = agent
            .post(format!("{}/v1/queues/{queue}/messages", node.admin))
            .header("authorization", node.bearer())
            .send(body.as_bytes())
            .is_ok_and(|r| r.status() == 201);
        if sent {
            load.accepted.push(body);
        }
        let now = Instant::now();
        if ok && sent {
            load.successes.push(now);
        } else {
            load.failures.push(now);
        }
    }
    load
}

/// Loads every node from its own thread while `during` runs, then returns
/// what each thread saw.
fn under_load(nodes: &[Node], during: impl FnOnce()) -> Vec<Load> {
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let threads: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let stop = &stop;
                scope.spawn(move || run_load(node, i, "/h", "jobs", stop))
            })
            .collect();
        during();
        stop.store(true, Ordering::Release);
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// Every delivery `function` logged on `node`: none while the node has
/// not followed the function's deploy yet (its logs answer 404).
fn deliveries(node: &Node, function: &str) -> Vec<Logged> {
    match try_deliveries(node, function) {
        Ok(deliveries) => deliveries,
        Err(answer) if answer["error"]["code"] == "not_found" => Vec::new(),
        Err(answer) => panic!("logs of {function} on {}: {answer}", node.admin),
    }
}

/// Every body the `events` guest logged on `nodes`, with how often.
fn delivered_bodies(nodes: &[&Node], function: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for node in nodes {
        for delivery in deliveries(node, function) {
            *seen.entry(delivery.body).or_insert(0) += 1;
        }
    }
    seen
}

/// Waits until every node serves /h; returns how many requests that took
/// (one 200 per node: the 404s before a deploy arrives are not invocations).
fn await_serving(nodes: &[Node]) -> u64 {
    for node in nodes {
        eventually(Duration::from_secs(30), "hello on every node", || {
            (node.get("/h").0 == 200).then_some(())
        });
    }
    nodes.len() as u64
}

/// Waits until every node has a trigger of `function`.
fn await_trigger(nodes: &[Node], function: &str) {
    let path = format!("/v1/functions/{function}/triggers");
    for node in nodes {
        eventually(Duration::from_secs(30), "the trigger on every node", || {
            let (_, triggers) = admin(node, "GET", &path, &[], b"");
            triggers
                .as_array()
                .is_some_and(|t| !t.is_empty())
                .then_some(())
        });
    }
}

/// Deploys `hello` at /h and the `events` guest `ev` on queue `jobs`.
fn deploy_load_functions(node: &Node) {
    node.deploy("hello", "hello", &["/h"]);
    node.deploy("ev", "events", &[]);
    let (ok, _, stderr) = node.cli(&["trigger", "add", "ev", "--queue", "jobs"]);
    assert!(ok, "{stderr}");
}

#[test]
fn after_load_on_three_nodes_fleet_usage_equals_requests_served_and_each_message_is_delivered_once()
{
    let servers = NatsServers::single();
    let (_dirs, nodes) = start_fleet(&servers, 3);
    deploy_load_functions(&nodes[0]);
    let probes = await_serving(&nodes);
    let started = Instant::now();
    let loads = under_load(&nodes, || {
        while started.elapsed() < Duration::from_secs(4) {
            thread::sleep(Duration::from_millis(50));
        }
    });
    let requests: u64 = loads.iter().map(|l| l.served).sum();
    let accepted: Vec<&String> = loads.iter().flat_map(|l| &l.accepted).collect();
    assert!(requests > 0 && !accepted.is_empty());

    // Every node's view of the fleet ledger counts every request served.
    let node_refs: Vec<&Node> = nodes.iter().collect();
    await_exact_usage(&node_refs, "hello", requests + probes);

    // Every accepted message is delivered, once.
    let delivered = eventually(Duration::from_secs(60), "every message delivered", || {
        let delivered = delivered_bodies(&node_refs, "ev");
        accepted
            .iter()
            .all(|body| delivered.contains_key(*body))
            .then_some(delivered)
    });
    let twice: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(delivered.len(), accepted.len());
    // The load is shared: more than one node delivered.
    let delivering = node_refs
        .iter()
        .filter(|node| !deliveries(node, "ev").is_empty())
        .count();
    assert!(delivering >= 2, "only {delivering} node delivered events");
}

#[test]
fn a_schedule_fires_once_per_slot_with_three_nodes_running() {
    let servers = NatsServers::single();
    let (_dirs, nodes) = start_fleet(&servers, 3);
    nodes[0].deploy("tick", "events", &[]);
    let (ok, _, stderr) = nodes[1].cli(&["trigger", "add", "tick", "--schedule", "@every 1s"]);
    assert!(ok, "{stderr}");
    let node_refs: Vec<&Node> = nodes.iter().collect();
    let slots = |nodes: &[&Node]| -> Vec<String> {
        let mut slots = Vec::new();
        for node in nodes {
            for tick in deliveries(node, "tick") {
                let data: Value = serde_json::from_str(&tick.body).unwrap_or_default();
                slots.push(data["scheduled_time"].as_str().unwrap_or("?").to_string());
            }
        }
        slots
    };
    let fired = eventually(Duration::from_secs(60), "six scheduled runs", || {
        let fired = slots(&node_refs);
        (fired.len() >= 6).then_some(fired)
    });
    let unique: HashSet<&String> = fired.iter().collect();
    assert_eq!(unique.len(), fired.len(), "a slot fired twice: {fired:?}");
}

#[test]
fn killing_a_nats_server_during_load_loses_no_acknowledged_event_or_usage_record() {
    let mut servers = NatsServers::cluster(3);
    let (_dirs, nodes) = start_fleet(&servers, 3);
    deploy_load_functions(&nodes[0]);
    let probes = await_serving(&nodes);

    let mut killed_at = None;
    let loads = under_load(&nodes, || {
        thread::sleep(Duration::from_secs(2));
        servers.kill(0);
        killed_at = Some(Instant::now());
        // Past the 10 s the fleet has to recover in, plus time to see it.
        thread::sleep(Duration::from_secs(14));
    });
    let killed_at = killed_at.unwrap();

    // Service resumed: every node served and accepted again within 10 s of
    // the kill, and nothing failed after that.
    for (i, load) in loads.iter().enumerate() {
        let last_failure = load.failures.iter().max().copied();
        if let Some(last) = last_failure {
            let outage = last.saturating_duration_since(killed_at);
            assert!(
                outage < Duration::from_secs(10),
                "node n{i} still failing {outage:?} after the kill"
            );
        }
        assert!(
            load.successes
                .iter()
                .any(|t| *t > killed_at + Duration::from_secs(10)),
            "node n{i} served nothing after the outage"
        );
    }

    // No acknowledged usage record lost, none counted twice: the fleet
    // ledger (on the surviving servers) counts every 200.
    let requests: u64 = loads.iter().map(|l| l.served).sum();
    let node_refs: Vec<&Node> = nodes.iter().collect();
    await_exact_usage(&node_refs, "hello", requests + probes);

    // No accepted message lost.
    let accepted: Vec<&String> = loads.iter().flat_map(|l| &l.accepted).collect();
    eventually(
        Duration::from_secs(90),
        "every accepted message delivered",
        || {
            let delivered = delivered_bodies(&node_refs, "ev");
            accepted
                .iter()
                .all(|body| delivered.contains_key(*body))
                .then_some(())
        },
    );
}

#[test]
fn a_killed_nodes_in_flight_events_are_delivered_by_the_others() {
    let servers = NatsServers::single();
    let (dirs, mut nodes) = start_fleet(&servers, 3);
    // A short timeout keeps the lease (timeout + a margin) short.
    nodes[0].deploy_with("slow", "events", &[], &["--timeout", "5s"]);
    nodes[0].deploy("hello", "hello", &["/h"]);
    // Two at a time per node: nine messages are more than the survivors
    // can take at once, so the victim surely runs some.
    let (ok, _, stderr) = nodes[0].cli(&[
        "trigger",
        "add",
        "slow",
        "--queue",
        "work",
        "--max-concurrency",
        "2",
    ]);
    assert!(ok, "{stderr}");
    await_trigger(&nodes, "slow");

    // The victim serves requests, and its usage records reach the fleet
    // ledger (they are acknowledged by NATS) before it dies.
    let victim = nodes.pop().unwrap();
    let served = 20;
    for _ in 0..served {
        eventually(Duration::from_secs(30), "hello on the victim", || {
            (victim.get("/h").0 == 200).then_some(())
        });
    }
    let survivors: Vec<&Node> = nodes.iter().collect();
    await_exact_usage(&survivors, "hello", served);

    // Sent through the node that will die (woken at once by its own
    // write, the others by its hint).
    let bodies: Vec<String> = (0..9).map(|i| format!("sleep:3000 #{i}")).collect();
    for body in &bodies {
        let (status, _) = admin(
            &victim,
            "POST",
            "/v1/queues/work/messages",
            &[],
            body.as_bytes(),
        );
        assert_eq!(status, 201);
    }
    eventually(
        Duration::from_secs(30),
        "the victim to be running one",
        || {
            victim
                .metrics()
                .lines()
                .any(|l| {
                    l.starts_with("mayfly_function_instances_in_flight{function=\"slow\"")
                        && !l.ends_with(" 0")
                })
                .then_some(())
        },
    );
    victim.kill();

    // Every message ends up delivered by a survivor, the victim's claims
    // after their lease ran out.
    let delivered = eventually(Duration::from_secs(120), "every message delivered", || {
        let delivered = delivered_bodies(&survivors, "slow");
        bodies
            .iter()
            .all(|body| delivered.contains_key(body))
            .then_some(delivered)
    });
    assert_eq!(delivered.len(), bodies.len(), "{delivered:?}");

    // The victim's acknowledged usage is all in the fleet ledger, and
    // coming back on its own disk (which may not have recorded how far it
    // published) it counts nothing twice.
    await_exact_usage(&survivors, "hello", served);
    let mut back = fleet_node(dirs[2].path(), &servers, "n2", "region=eu");
    back.token = nodes[0].token.clone();
    eventually(Duration::from_secs(30), "the victim back", || {
        (back.get("/h").0 == 200).then_some(())
    });
    await_exact_usage(&[&back, survivors[0]], "hello", served + 1);
}

#[test]
fn messages_sent_through_one_node_are_shared_with_idle_nodes_at_once() {
    let servers = NatsServers::single();
    let (_dirs, nodes) = start_fleet(&servers, 3);
    nodes[0].deploy("slow", "events", &[]);
    // One at a time per node: the sending node cannot take them all.
    let (ok, _, stderr) = nodes[0].cli(&[
        "trigger",
        "add",
        "slow",
        "--queue",
        "work",
        "--batch-size",
        "1",
        "--max-concurrency",
        "1",
    ]);
    assert!(ok, "{stderr}");
    await_trigger(&nodes, "slow");
    let bodies: Vec<String> = (0..9).map(|i| format!("sleep:1000 #{i}")).collect();
    for body in &bodies {
        let (status, _) = admin(
            &nodes[0],
            "POST",
            "/v1/queues/work/messages",
            &[],
            body.as_bytes(),
        );
        assert_eq!(status, 201);
    }
    // The idle nodes were woken by the sender's hint: the fleet delivers
    // all nine well before an idle node's 60 s look at its queue (one
    // node alone would need 9 s).
    let node_refs: Vec<&Node> = nodes.iter().collect();
    eventually(Duration::from_secs(30), "every message delivered", || {
        let delivered = delivered_bodies(&node_refs, "slow");
        bodies
            .iter()
            .all(|body| delivered.contains_key(body))
            .then_some(())
    });
    let delivering = node_refs
        .iter()
        .filter(|node| !deliveries(node, "slow").is_empty())
        .count();
    assert!(delivering >= 2, "only {delivering} node delivered");
}

#[test]
fn retries_and_dead_letters_work_across_the_fleet() {
    let servers = NatsServers::single();
    let (_dirs, nodes) = start_fleet(&servers, 3);
    nodes[0].deploy_with("flaky", "events", &[], &["--wait"]);

    // Each fails twice, then succeeds: attempts 1, 2 and 3 of every event,
    // once each, whichever nodes ran them.
    let ids: Vec<String> = (0..6)
        .map(|i| {
            let through = &nodes[i % nodes.len()];
            invoke_async(through, "flaky", "&max_attempts=5&backoff_ms=50", "fail:2")
        })
        .collect();
    let node_refs: Vec<&Node> = nodes.iter().collect();
    let attempts_of = |id: &str| -> Vec<String> {
        let mut attempts: Vec<String> = node_refs
            .iter()
            .flat_map(|node| deliveries(node, "flaky"))
            .filter(|e| e.get("id") == id)
            .map(|e| e.get("attempt").to_string())
            .collect();
        attempts.sort();
        attempts
    };
    for id in &ids {
        let attempts = eventually(Duration::from_secs(60), "three attempts", || {
            let attempts = attempts_of(id);
            (attempts.len() >= 3).then_some(attempts)
        });
        assert_eq!(attempts, ["1", "2", "3"], "event {id}");
    }

    // A queue trigger allowing 2 attempts: the message sent through one
    // node is a dead letter that every node lists.
    let (ok, _, stderr) = nodes[0].cli(&[
        "trigger",
        "add",
        "flaky",
        "--queue",
        "jobs",
        "--max-attempts",
        "2",
        "--backoff",
        "50ms",
    ]);
    assert!(ok, "{stderr}");
    await_trigger(&nodes, "flaky");
    let message = send(&nodes[1], "jobs", "fail:always");
    for node in &nodes {
        let dead = eventually(Duration::from_secs(60), "a dead letter", || {
            dead_letters(node, "flaky").into_iter().next()
        });
        assert_eq!(dead["subject"], message);
        assert_eq!(dead["attempts"], 2);
    }

    // Fixed and redriven through another node: delivered, and gone from
    // every node's dead-letter list.
    nodes[2].deploy_with("flaky", "echo", &[], &["--wait"]);
    let (ok, stdout, stderr) = nodes[2].cli(&["dlq", "redrive", "flaky"]);
    assert!(ok, "{stdout}{stderr}");
    eventually(Duration::from_secs(60), "the redriven event", || {
        node_refs
            .iter()
            .flat_map(|node| node.usage_records(Some("flaky")))
            .any(|r| r["version"] == 2 && r["trigger"] == "queue" && r["outcome"] == "ok")
            .then_some(())
    });
    for node in &nodes {
        assert!(dead_letters(node, "flaky").is_empty());
    }
}
