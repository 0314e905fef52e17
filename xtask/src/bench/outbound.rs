//! Scenario 6, outbound HTTP (Mayfly): the caps guest's `/fetch` makes one
//! outbound GET per request to a local upstream (the bare hyper server),
//! under the same wrk load as scenario 1. It measures what a function
//! calling an API pays per request: with pooled connections the upstream
//! call reuses a kept-alive connection instead of a new TCP handshake.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::http::{Figures, load};
use super::mayfly::{Admin, Node, NodeOptions};
use super::process::{Process, command, free_port, wait_for_200};
use super::stats::{count, latency, mib};
use super::systems::Kind;
use super::{Bench, Outcome};

/// Measures Mayfly calling the bare hyper upstream.
pub fn run(bench: &Bench, caps: &std::path::Path) -> Outcome<Figures> {
    let Some(upstream) = bench.systems.iter().find(|s| s.kind == Kind::BareHyper) else {
        return Outcome::Skipped("no upstream (bare hyper) system".into());
    };
    let Some(mayfly) = bench.systems.iter().find(|s| s.kind == Kind::Mayfly) else {
        return Outcome::Skipped("no Mayfly binary".into());
    };
    Outcome::of(mayfly, || {
        let upstream = upstream
            .binary
            .as_ref()
            .map_err(|why| anyhow::anyhow!("the upstream: {why}"))?;
        measure(bench, upstream, caps)
    })
}

fn measure(
    bench: &Bench,
    upstream: &std::path::Path,
    caps: &std::path::Path,
) -> anyhow::Result<Figures> {
    let log_dir = bench.log_dir.path();
    let port = free_port()?;
    let upstream_url = format!("http://127.0.0.1:{port}/");
    let mut upstream = Process::spawn(
        "upstream",
        command(upstream)
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null()),
        log_dir,
    )?;
    wait_for_200(
        &upstream_url,
        Instant::now(),
        &mut upstream,
        Duration::from_secs(30),
    )?;

    let data = tempfile::tempdir().context("cannot create a data directory")?;
    let node = Node::start(
        bench.mayfly()?,
        data.path(),
        log_dir,
        &NodeOptions {
            port: 0,
            flags: &[],
        },
    )?;
    let component =
        std::fs::read(caps).with_context(|| format!("cannot read {}", caps.display()))?;
    // The upstream is on loopback, which a function reaches only when the
    // address itself is granted.
    let config = serde_json::json!({
        "routes": ["/fetch"],
        "grants": { "outbound": [format!("http://127.0.0.1:{port}")] },
    });
    Admin::new(&node.admin, &node.token).deploy_with("fetch", &component, Some(config))?;
    let url = format!("{}/fetch?url={upstream_url}", node.gateway);
    let mut process = node.process;
    wait_for_200(&url, Instant::now(), &mut process, Duration::from_secs(60))?;

    let figures = load(bench, &mut process, &url)?;
    upstream.check_running()?;
    Ok(figures)
}

/// The scenario's markdown.
pub fn markdown(outcome: &Outcome<Figures>, runs: usize, run_secs: u64) -> String {
    let mut out = String::from("## 6. Outbound HTTP (Mayfly)\n\n");
    let Outcome::Measured(f) = outcome else {
        out.push_str(outcome.note().unwrap_or_default());
        out.push('\n');
        return out;
    };
    out.push_str(&format!(
        "The caps guest's `/fetch?url=…` makes one outbound GET per request to the bare hyper \
         server on loopback (granted by address), under `wrk -t2 -c64 -d{run_secs}s`, {runs} \
         runs; server CPU is the node's alone (the upstream's is not counted). Median \
         (min–max).\n\n\
         | req/s | p50 | p99 | p99.9 | node CPU / request | peak RSS | errors |\n\
         |---|---|---|---|---|---|---|\n\
         | {} | {} | {} | {} | {} | {} | {} |\n",
        f.rps.show(count),
        f.p50.show(latency),
        f.p99.show(latency),
        f.p999.show(latency),
        f.cpu_us.show(latency),
        mib(f.peak_rss),
        f.errors
    ));
    out
}
