//! Scaling: concurrency limits and throttling, the queue, bursts, the hot
//! tier's instance reuse, and keep-alive taking functions back to cold.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use crate::common::{Node, agent, eventually};

/// Sends `count` GETs of `path` at once (threads released together) and
/// returns each (status, Retry-After, body).
fn burst(node: &Node, path: &str, count: usize) -> Vec<(u16, Option<String>, String)> {
    let barrier = Arc::new(Barrier::new(count));
    let threads: Vec<_> = (0..count)
        .map(|_| {
            let url = format!("{}{path}", node.gateway);
            let barrier = barrier.clone();
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let agent = agent();
                    barrier.wait();
                    let mut response = agent.get(&url).call().expect("gateway answers");
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap_or("").to_string());
                    let body = response.body_mut().read_to_string().unwrap_or_default();
                    (response.status().as_u16(), retry_after, body)
                })
                .expect("thread starts")
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Starts `count` GETs of `path` in the background.
fn start_requests(node: &Node, path: &str, count: usize) -> Vec<thread::JoinHandle<u16>> {
    (0..count)
        .map(|_| {
            let url = format!("{}{path}", node.gateway);
            thread::spawn(move || agent().get(&url).call().unwrap().status().as_u16())
        })
        .collect()
}

fn running(node: &Node, function: &str) -> u64 {
    node.scaling_status(function)["running"].as_u64().unwrap()
}

#[test]
fn a_burst_of_1000_concurrent_requests_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        dir.path(),
        &["--max-instances", "1000", "--memory-budget", "1000000"],
    );
    // The whole node for one function: by default it may take only its
    // share (a quarter), so it asks for the node's concurrency.
    node.deploy_with(
        "sleepy",
        "hostile",
        &["/sleep"],
        &["--memory", "16", "--max-concurrency", "1000"],
    );
    let answers = burst(&node, "/sleep?ms=50", 1000);
    let failed: Vec<_> = answers
        .iter()
        .filter(|(status, ..)| *status != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let records = node.await_usage_records("sleepy", 1000);
    assert!(records.iter().all(|r| r["outcome"] == "ok"));
}

#[test]
fn over_max_concurrency_without_a_queue_exactly_the_excess_gets_429() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.deploy_with(
        "limited",
        "hostile",
        &["/sleep"],
        &["--max-concurrency", "10", "--max-queued", "0"],
    );
    // Ten long requests take every slot (long enough to outlast the rest of
    // the test on a loaded machine)...
    let holders = start_requests(&node, "/sleep?ms=6000", 10);
    eventually(Duration::from_secs(30), "10 running", || {
        (running(&node, "limited") == 10).then_some(())
    });
    // ...so each of twenty more is refused at once, with Retry-After.
    let answers = burst(&node, "/sleep?ms=1", 20);
    for (status, retry_after, body) in &answers {
        assert_eq!(*status, 429, "{body}");
        assert_eq!(retry_after.as_deref(), Some("1"));
        assert!(body.contains("concurrency limit"), "{body}");
    }
    for holder in holders {
        assert_eq!(holder.join().unwrap(), 200);
    }
    // Throttled requests are in the ledger, billed nothing, and counted.
    let records = node.await_usage_records("limited", 30);
    let throttled: Vec<_> = records
        .iter()
        .filter(|r| r["outcome"] == "throttled")
        .collect();
    assert_eq!(throttled.len(), 20);
    assert!(
        throttled
            .iter()
            .all(|r| r["billed_ms"] == 0 && r["status"] == 429)
    );
    assert_eq!(node.scaling_status("limited")["throttled"], 20);
    let (ok, status, _) = node.cli(&["status"]);
    assert!(ok && status.contains("THROTTLED"), "{status}");
    let metrics = node.metrics();
    assert!(
        metrics.contains("mayfly_throttles_total{function=\"limited\"} 20"),
        "{metrics}"
    );
    // A node on its own has no fleet link to report.
    assert!(!metrics.contains("mayfly_fleet_"), "{metrics}");
    // Free again: the next request is served.
    assert_eq!(node.get("/sleep?ms=1").0, 200);
}

#[test]
fn queued_requests_are_served_when_slots_free_up_or_refused_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--function-histograms", "queued"]);
    node.deploy_with(
        "queued",
        "hostile",
        &["/sleep"],
        &[
            "--max-concurrency",
            "2",
            "--max-queued",
            "10",
            "--queue-timeout",
            "30s",
        ],
    );
    let holders = start_requests(&node, "/sleep?ms=3000", 2);
    eventually(Duration::from_secs(30), "2 running", || {
        (running(&node, "queued") == 2).then_some(())
    });
    let waiters = start_requests(&node, "/sleep?ms=10", 5);
    eventually(Duration::from_secs(30), "5 queued", || {
        (node.scaling_status("queued")["queued"] == 5).then_some(())
    });
    for request in holders.into_iter().chain(waiters) {
        assert_eq!(request.join().unwrap(), 200);
    }
    let metrics = node.metrics();
    assert!(
        metrics.contains("mayfly_queue_wait_seconds_count{function=\"queued\"} 5"),
        "{metrics}"
    );

    // A queue wait shorter than the running requests ends in 429.
    node.deploy_with(
        "queued",
        "hostile",
        &["/sleep"],
        &[
            "--max-concurrency",
            "1",
            "--max-queued",
            "10",
            "--queue-timeout",
            "200ms",
        ],
    );
    let holder = start_requests(&node, "/sleep?ms=4000", 1);
    eventually(Duration::from_secs(30), "1 running", || {
        (running(&node, "queued") == 1).then_some(())
    });
    let (status, body) = node.get("/sleep?ms=1");
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("queue timeout"), "{body}");
    assert_eq!(holder.into_iter().next().unwrap().join().unwrap(), 200);
}

/// `instance=<id> served=<n>` from the stateful guest.
fn instance_of(body: &str) -> (String, u64) {
    let mut instance = String::new();
    let mut served = 0;
    for field in body.split_whitespace() {
        if let Some(id) = field.strip_prefix("instance=") {
            instance = id.to_string();
        } else if let Some(n) = field.strip_prefix("served=") {
            served = n.parse().unwrap();
        }
    }
    (instance, served)
}

fn init_lines(node: &Node, function: &str) -> usize {
    let lines = node.admin_json(&format!("/v1/functions/{function}/logs?tail=1000"));
    lines
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["line"] == "init")
        .count()
}

#[test]
fn a_reused_function_initialises_once_per_instance_and_its_pool_shrinks_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--keep-alive", "2s"]);
    node.deploy_with("hot", "stateful", &["/hot"], &["--reuse", "--memory", "64"]);
    node.deploy_with("fresh", "stateful", &["/fresh"], &[]);

    // One request at a time: one instance serves them all, initialised once.
    let mut seen = HashSet::new();
    for expected in 1..=10 {
        // One at a time: the last instance is back in the pool (it goes
        // back just after its answer is sent).
        eventually(Duration::from_secs(10), "the instance back", || {
            (node.scaling_status("hot")["running"] == 0).then_some(())
        });
        let (status, body) = node.get("/hot");
        assert_eq!(status, 200, "{body}");
        let (instance, served) = instance_of(&body);
        assert_eq!(served, expected, "{body}");
        seen.insert(instance);
    }
    assert_eq!(seen.len(), 1);
    eventually(Duration::from_secs(10), "one init line", || {
        (init_lines(&node, "hot") == 1).then_some(())
    });

    // Concurrent requests need more instances: the pool grows, and each new
    // instance initialises once.
    let rss_before_burst = node.rss_bytes();
    for (status, _, body) in burst(&node, "/hot?ms=500", 4) {
        assert_eq!(status, 200, "{body}");
        seen.insert(instance_of(&body).0);
    }
    assert!(seen.len() >= 2, "4 concurrent requests ran on {seen:?}");
    eventually(Duration::from_secs(10), "one init per instance", || {
        (init_lines(&node, "hot") == seen.len()).then_some(())
    });
    // An instance goes back to the pool just after its answer is sent.
    let hot = eventually(Duration::from_secs(10), "every instance kept", || {
        let hot = node.scaling_status("hot");
        (hot["running"] == 0).then_some(hot)
    });
    assert_eq!(hot["tier"], "hot", "{hot}");
    let kept = hot["kept"].as_u64().unwrap();
    assert_eq!(kept as usize, seen.len(), "{hot}");
    // Each kept instance holds the 16 MiB its initialisation touched.
    let rss_hot = node.rss_bytes();
    assert!(
        rss_hot >= rss_before_burst + (kept - 1) * (12 << 20),
        "RSS {rss_before_burst} -> {rss_hot} with {kept} kept instances"
    );

    // Idle past the 2 s keep-alive: the pool is empty and the function cold,
    // and the instances' memory is given back to the OS.
    eventually(Duration::from_secs(30), "hot back to cold", || {
        let hot = node.scaling_status("hot");
        (hot["tier"] == "cold" && hot["kept"] == 0).then_some(())
    });
    // Status says cold as soon as the function is swapped out; the autoscaler
    // thread then drops the instances, so the memory follows shortly after.
    let mut rss_cold = rss_hot;
    let released = std::time::Instant::now() + Duration::from_secs(30);
    while rss_cold + kept * (12 << 20) > rss_hot && std::time::Instant::now() < released {
        thread::sleep(Duration::from_millis(20));
        rss_cold = node.rss_bytes();
    }
    assert!(
        rss_cold + kept * (12 << 20) <= rss_hot,
        "RSS {rss_hot} -> {rss_cold} after dropping {kept} instances of 16 MiB"
    );
    // The next request starts a new instance (cold, initialised again).
    let (_, body) = node.get("/hot");
    assert_eq!(instance_of(&body).1, 1, "{body}");

    // Without reuse, every request pays the initialisation. (Run last: the
    // pool slots these touch could be reused by the hot instances above and
    // blur their memory figures.)
    for _ in 0..3 {
        let (_, body) = node.get("/fresh");
        assert_eq!(instance_of(&body).1, 1, "{body}");
    }
    eventually(Duration::from_secs(10), "three init lines", || {
        (init_lines(&node, "fresh") == 3).then_some(())
    });
}

#[test]
fn after_the_keep_alive_a_function_is_cold_and_its_code_unmapped() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &["--keep-alive", "1s"]);
    node.deploy("hello", "hello", &["/hello"]);
    let artifacts = dir.path().join("blobs/artifacts");
    let artifact = std::fs::read_dir(&artifacts)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();
    assert_eq!(node.get("/hello").0, 200);
    assert_eq!(node.scaling_status("hello")["tier"], "warm");
    assert!(
        node.mapped_files().contains(&artifact),
        "the artifact is mapped while warm"
    );

    eventually(Duration::from_secs(30), "hello back to cold", || {
        (node.scaling_status("hello")["tier"] == "cold").then_some(())
    });
    assert!(
        !node.mapped_files().contains(&artifact),
        "the artifact is unmapped once cold"
    );
    // The next request loads it again: a cold start, in the ledger too.
    assert_eq!(node.get("/hello").0, 200);
    let records = node.await_usage_records("hello", 2);
    assert_eq!(
        records[0]["cold"], true,
        "a deploy leaves the function cold"
    );
    assert_eq!(records[1]["cold"], true, "{:?}", records[1]);
}

#[test]
fn under_memory_pressure_idle_functions_are_evicted() {
    let dir = tempfile::tempdir().unwrap();
    // 200 MB of budget and a keep-alive far longer than the test: only
    // memory pressure can take a function back to cold here.
    let node = Node::start_with(
        dir.path(),
        &["--memory-budget", "200", "--keep-alive", "1h"],
    );
    node.deploy_with("hot", "stateful", &["/hot"], &["--reuse", "--memory", "32"]);
    node.deploy_with("big", "hostile", &["/sleep"], &["--memory", "190"]);
    assert_eq!(node.get("/hot").0, 200);
    assert_eq!(node.scaling_status("hot")["tier"], "hot");

    // A 190 MB invocation plus the hot function's kept 16 MiB instance is
    // over the budget: the idle hot function goes.
    let big = start_requests(&node, "/sleep?ms=6000", 1);
    eventually(Duration::from_secs(30), "hot evicted", || {
        (node.scaling_status("hot")["tier"] == "cold").then_some(())
    });
    assert!(
        node.metrics().contains("mayfly_unloads_memory_total 1"),
        "{}",
        node.metrics()
    );
    // The running function is never evicted under its request.
    assert_eq!(big.into_iter().next().unwrap().join().unwrap(), 200);
    // A second 190 MB invocation while one runs would break the budget: it
    // waits out its 1 s queue timeout and gets 429.
    let big = start_requests(&node, "/sleep?ms=5000", 1);
    eventually(Duration::from_secs(30), "big running", || {
        (running(&node, "big") == 1).then_some(())
    });
    let (status, body) = node.get("/sleep?ms=1");
    assert_eq!(status, 429, "{body}");
    assert_eq!(big.into_iter().next().unwrap().join().unwrap(), 200);
}

fn simulate(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .arg("simulate")
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_simulator_compares_policies_on_a_trace_and_names_bad_lines() {
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scaling/data/Azure2021_200.csv"
    );
    let (ok, stdout, stderr) = simulate(&["--trace", sample, "--json"]);
    assert!(ok, "{stderr}");
    let results: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(results["invocations"], 199, "{stdout}");
    let rows = results["results"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "{stdout}");
    assert!(rows.iter().all(|r| r["invocations"] == 199), "{stdout}");

    let (ok, stdout, stderr) = simulate(&[
        "--synthetic",
        "--functions",
        "300",
        "--duration",
        "6h",
        "--policy",
        "10m",
        "--policy",
        "hybrid",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("| fixed-10m |") && stdout.contains("| hybrid |"),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "app,func,end_timestamp,duration\na,f,1.5,0.5\na,f,soon,0.5\n",
    )
    .unwrap();
    let (ok, _, stderr) = simulate(&["--trace", bad.to_str().unwrap()]);
    assert!(!ok && stderr.contains("line 3"), "{stderr}");
}

#[test]
fn the_config_file_sets_the_node_scaling_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("node.toml"),
        "[scaling]\nkeep_alive = \"fixed:1s\"\nmax_concurrency = 7\n",
    )
    .unwrap();
    let node = Node::start(dir.path());
    let status = node.admin_json("/v1/status");
    assert_eq!(status["keep_alive_policy"], "fixed-1s", "{status}");
    let (ok, _, stderr) = node.cli(&[
        "deploy",
        "hello",
        crate::common::guest("hello").to_str().unwrap(),
        "--max-concurrency",
        "8",
    ]);
    assert!(!ok && stderr.contains("give 1 to 7"), "{stderr}");
    node.stop();

    let node = Node::start_with(dir.path(), &["--keep-alive", "hybrid"]);
    assert_eq!(node.admin_json("/v1/status")["keep_alive_policy"], "hybrid");
    node.stop();

    std::fs::write(
        dir.path().join("node.toml"),
        "[scaling]\nkeep_alive = \"soon\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mayfly"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("keep_alive"),
        "{stderr}"
    );
}

#[test]
fn the_hybrid_policy_learns_a_period_unloads_between_calls_and_prewarms_ahead() {
    let dir = tempfile::tempdir().unwrap();
    // One-second bins: the policy of the paper, in seconds instead of minutes.
    let node = Node::start_with(dir.path(), &["--keep-alive", "hybrid:1s"]);
    node.deploy("periodic", "hello", &["/periodic"]);
    // A call every 2.5 s: idle times of ~2.5 s fall in the 2 s bin, so once
    // 10 are recorded the function is unloaded after each call, pre-warmed
    // 1.8 s later (the bin's start less 10%) and kept until 3.3 s (its end
    // plus 10%): the next call finds it loaded, with 0.7 s of margin.
    let period = Duration::from_millis(2500);
    let start = std::time::Instant::now();
    for i in 0..14 {
        let next = start + period * i;
        thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
        assert_eq!(node.get("/periodic").0, 200);
    }
    let metrics = node.metrics();
    let count = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    assert!(count("mayfly_unloads_keep_alive_total ") >= 2, "{metrics}");
    assert!(count("mayfly_prewarms_total ") >= 2, "{metrics}");
    // Unloaded between calls, yet the calls after the pattern was learned
    // were served warm.
    let records = node.await_usage_records("periodic", 14);
    for record in &records[11..] {
        assert_eq!(record["cold"], false, "{record}");
    }
}
