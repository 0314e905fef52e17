//! Fair sharing: CPU-bound guests of one function cannot starve another
//! function's requests (issue 15, finding 5).
//!
//! Before the guest pool, 2 spinning invocations raised a neighbour's hello
//! p50 114× and 64 raised it 330×: every guest ran on the main runtime in
//! 5 ms slices, and the neighbour's request waited behind all of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{Node, agent, eventually};

/// The 99th percentile of `samples` hello round trips on one keep-alive
/// connection.
fn hello_p99(node: &Node, samples: usize) -> Duration {
    let agent = agent();
    let url = format!("{}/hello", node.gateway);
    let mut times: Vec<Duration> = (0..samples)
        .map(|_| {
            let start = Instant::now();
            let mut response = agent.get(&url).call().unwrap();
            assert_eq!(response.status(), 200);
            response.body_mut().read_to_string().unwrap();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[samples * 99 / 100]
}

#[test]
fn spinning_guests_of_one_function_do_not_starve_another() {
    let dir = tempfile::tempdir().unwrap();
    let node = Arc::new(Node::start(dir.path()));
    node.deploy("hello", "hello", &["/hello"]);
    node.deploy_with(
        "spinner",
        "hostile",
        &["/loop"],
        &["--timeout", "120s", "--max-concurrency", "64"],
    );
    // Warm both up (the first request of each loads its artifact).
    assert_eq!(node.get("/hello").0, 200);

    let baseline = hello_p99(&node, 300);
    let mut report = vec![format!("baseline hello p99 {baseline:?}")];
    let mut spinners = Vec::new();
    for load in [2usize, 8, 64] {
        while spinners.len() < load {
            let node = node.clone();
            // Each spins until its timeout or the node stops.
            spinners.push(std::thread::spawn(move || {
                let _ = agent().get(format!("{}/loop", node.gateway)).call();
            }));
        }
        eventually(Duration::from_secs(60), "the spinners to run", || {
            let running = node.scaling_status("spinner")["running"].as_u64()?;
            (running as usize >= load).then_some(())
        });
        let loaded = hello_p99(&node, 300);
        let ratio = loaded.as_secs_f64() / baseline.as_secs_f64();
        report.push(format!(
            "{load} spinners: hello p99 {loaded:?} ({ratio:.1}x)"
        ));
        eprintln!("fairness: {}", report.join("; "));
        // The figure to beat is 3x on a release build (see the closing
        // notes and bench/); this bound only catches the starvation itself
        // (100x and more) without asserting speed on a noisy debug run.
        assert!(
            loaded <= baseline * 20 + Duration::from_millis(100),
            "hello starved by {load} spinning guests: {}",
            report.join("; ")
        );
    }
    node.terminate();
    drop(spinners);
}

#[test]
fn guests_flooding_stdout_do_not_starve_another_function() {
    let dir = tempfile::tempdir().unwrap();
    let node = Arc::new(Node::start(dir.path()));
    node.deploy("hello", "hello", &["/hello"]);
    node.deploy_with(
        "flooder",
        "hostile",
        &["/flood"],
        &["--timeout", "120s", "--max-concurrency", "8"],
    );
    assert_eq!(node.get("/hello").0, 200);
    let baseline = hello_p99(&node, 300);
    // Each writes lines as fast as it can, far past its log byte limit.
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let node = node.clone();
            std::thread::spawn(move || {
                let _ = agent()
                    .get(format!("{}/flood?lines=100000000000", node.gateway))
                    .call();
            })
        })
        .collect();
    eventually(Duration::from_secs(60), "the flooders to run", || {
        let running = node.scaling_status("flooder")["running"].as_u64()?;
        (running >= 4).then_some(())
    });
    let loaded = hello_p99(&node, 300);
    let ratio = loaded.as_secs_f64() / baseline.as_secs_f64();
    eprintln!(
        "fairness: hello p99 {baseline:?} alone, {loaded:?} ({ratio:.1}x) beside 4 stdout floods"
    );
    assert!(
        loaded <= baseline * 20 + Duration::from_millis(100),
        "hello starved by 4 stdout floods: p99 {baseline:?} alone, {loaded:?} beside them"
    );
    node.terminate();
    drop(flooders);
}
