//! Burst load: N clients open their connections and send one request each
//! at the same instant, and the latency of every request is recorded (from
//! the common start to the end of its response). Repeated for a few rounds.
//!
//!   cargo run --release -p mayfly --example burst -- <url> [clients] [rounds]
//!
//! wrk measures steady load over a fixed set of connections; a burst of new
//! connections against one function (the product's "1,000 concurrent
//! requests, 0 errors") needs every client released together, which this
//! small driver does with threads and a barrier. `bench/burst.sh` runs it.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: burst <url> [clients] [rounds]"))?;
    let clients: usize = args.next().map_or(Ok(1000), |n| n.parse())?;
    let rounds: usize = args.next().map_or(Ok(3), |n| n.parse())?;

    let mut all = Vec::with_capacity(clients * rounds);
    for round in 1..=rounds {
        let (latencies, errors) = run_round(&url, clients)?;
        println!(
            "round {round}: {clients} clients, {errors} errors, {}",
            summary(&latencies)
        );
        if errors > 0 {
            anyhow::bail!("{errors} requests of round {round} failed");
        }
        all.extend(latencies);
    }
    println!("all rounds: {}", summary(&all));
    Ok(())
}

/// One burst: returns the latency of each successful request and the count
/// of failures (connection errors or non-200 answers).
fn run_round(url: &str, clients: usize) -> anyhow::Result<(Vec<Duration>, usize)> {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let start = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut threads = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (url, barrier, start) = (url.to_string(), barrier.clone(), start.clone());
        threads.push(
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(60)))
                        .build()
                        .new_agent();
                    barrier.wait();
                    let result = agent
                        .get(&url)
                        .call()
                        .and_then(|mut r| r.body_mut().read_to_vec().map(|_| r.status()));
                    let started = *start.get_or_init(Instant::now);
                    match result {
                        Ok(status) if status == 200 => Some(started.elapsed()),
                        _ => None,
                    }
                })?,
        );
    }
    barrier.wait();
    let _ = start.set(Instant::now());
    let mut latencies = Vec::with_capacity(clients);
    let mut errors = 0;
    for thread in threads {
        match thread.join() {
            Ok(Some(latency)) => latencies.push(latency),
            _ => errors += 1,
        }
    }
    Ok((latencies, errors))
}

fn summary(latencies: &[Duration]) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let at = |q: f64| {
        sorted
            .get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(0.50),
        at(0.99),
        at(1.0)
    )
}
