//! Scenario 2, cold starts: for every system, process start to the first
//! successful response; for Mayfly also a deploy call to the first 200 of
//! the new function, and the first request to a function whose compiled
//! artifact is on disk but no longer in memory.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::mayfly::{Admin, Node, NodeOptions, variant};
use super::process::{free_port, get, wait_for_200};
use super::stats::{Runs, latency, micros};
use super::systems::{Kind, System};
use super::{Bench, Outcome};

/// The scenario's results.
#[derive(Default)]
pub struct Results {
    /// Process start to first 200, per system (µs).
    pub process_start: Vec<(Kind, Outcome<Runs>)>,
    /// Mayfly only: deploy call to first 200, and the cold-tier request.
    pub mayfly: Outcome<MayflyFigures>,
}

/// Mayfly's own cold-start figures, in µs.
#[derive(Default)]
pub struct MayflyFigures {
    /// From the start of the deploy call to the first 200 at its route.
    pub deploy_to_200: Runs,
    /// Whether every one of those deploys compiled the component.
    pub all_compiled: bool,
    /// Client-side latency of the first request to a cold-tier function.
    pub cold_request: Runs,
    /// The node's own `init_us + wall_us` for that request: what it
    /// recorded of the request's time.
    pub cold_wall: Runs,
    /// Whether the ledger marked every one of them `cold`.
    pub all_marked_cold: bool,
}

/// Measures every system.
pub fn run(bench: &Bench) -> Results {
    let process_start = bench
        .systems
        .iter()
        .map(|system| {
            let outcome = Outcome::of(system, || process_start(bench, system));
            (system.kind, outcome)
        })
        .collect();
    let mayfly = match bench.systems.iter().find(|s| s.kind == Kind::Mayfly) {
        Some(system) => Outcome::of(system, || mayfly_cold(bench)),
        None => Outcome::Skipped("no Mayfly binary".into()),
    };
    Results {
        process_start,
        mayfly,
    }
}

/// Runs 1 + runs starts of `system` and times the last `runs`. The first
/// start is not timed: it fills what each system caches on disk (wasmtime's
/// compile cache; for Mayfly the artifact is compiled at deploy), so every
/// timed start is a restart of an already installed function.
fn process_start(bench: &Bench, system: &System) -> anyhow::Result<Runs> {
    let files = bench.hello_files();
    let binary = system
        .binary
        .as_deref()
        .map_err(|why| anyhow::anyhow!("{why}"))?;
    let data = tempfile::tempdir().context("cannot create a data directory")?;
    if system.kind == Kind::Mayfly {
        deploy_hello_once(bench, binary, data.path())?;
    }
    let mut runs = Runs::default();
    for run in 0..=bench.profile.cold_runs {
        let port = free_port()?;
        let started = Instant::now();
        let (mut process, url) = if system.kind == Kind::Mayfly {
            let node = Node::start(
                binary,
                data.path(),
                files.log_dir,
                &NodeOptions { port, flags: &[] },
            )?;
            (node.process, format!("{}/hello", node.gateway))
        } else {
            let process = system.spawn_peer(binary, &files, port)?;
            (process, format!("http://127.0.0.1:{port}/"))
        };
        let elapsed = wait_for_200(&url, started, &mut process, Duration::from_secs(120))?;
        if run > 0 {
            runs.push(micros(elapsed));
        }
        process.stop();
    }
    Ok(runs)
}

/// Deploys hello into the node data directory `data` and stops the node.
fn deploy_hello_once(bench: &Bench, binary: &Path, data: &Path) -> anyhow::Result<()> {
    let node = Node::start(
        binary,
        data,
        bench.log_dir.path(),
        &NodeOptions {
            port: 0,
            flags: &[],
        },
    )?;
    let component = read(&bench.hello)?;
    Admin::new(&node.admin, &node.token).deploy("hello", &component, Some("/hello"))?;
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Deploy to first 200, then keep-alive expiry and a cold-tier request,
/// for `runs` distinct functions on one node with a 1 s keep-alive.
fn mayfly_cold(bench: &Bench) -> anyhow::Result<MayflyFigures> {
    let data = tempfile::tempdir().context("cannot create a data directory")?;
    let mut node = Node::start(
        bench.mayfly()?,
        data.path(),
        bench.log_dir.path(),
        &NodeOptions {
            port: 0,
            flags: &["--keep-alive", "1s"],
        },
    )?;
    let admin = Admin::new(&node.admin, &node.token);
    let hello = read(&bench.hello)?;
    let names: Vec<String> = (0..bench.profile.cold_runs)
        .map(|i| format!("cold{i}"))
        .collect();
    let mut figures = MayflyFigures {
        all_compiled: true,
        all_marked_cold: true,
        ..MayflyFigures::default()
    };

    for name in &names {
        // A distinct component each time, so every deploy compiles.
        let component = variant(&hello, name);
        let url = format!("{}/{name}", node.gateway);
        let started = Instant::now();
        let deployed = admin.deploy(name, &component, Some(&format!("/{name}")))?;
        let elapsed = wait_for_200(&url, started, &mut node.process, Duration::from_secs(60))?;
        figures.deploy_to_200.push(micros(elapsed));
        figures.all_compiled &= deployed.compiled;
    }

    wait_until_cold(&admin, &names)?;
    for name in &names {
        let url = format!("{}/{name}", node.gateway);
        let started = Instant::now();
        let (status, _) = get(&url, Duration::from_secs(60))?;
        let elapsed = started.elapsed();
        if status != 200 {
            bail!("cold request to {url} answered {status}");
        }
        figures.cold_request.push(micros(elapsed));
        let (wall_us, cold) = last_record(&admin, name, 2)?;
        figures.cold_wall.push(wall_us);
        figures.all_marked_cold &= cold;
    }
    Ok(figures)
}

/// Waits until every function in `names` is in the cold tier (artifact on
/// disk, nothing loaded), as `GET /v1/status` reports it.
pub fn wait_until_cold(admin: &Admin, names: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let tiers = admin.tiers()?;
        let all_cold = names.iter().all(|name| {
            tiers
                .iter()
                .any(|(function, tier)| function == name && tier == "cold")
        });
        if all_cold {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "functions still loaded 120 s after their last request with --keep-alive 1s: {tiers:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `init_us + wall_us` and `cold` flag of `function`'s last usage record, once it
/// has `count` records. The ledger commits in batches, so wait for it.
pub fn last_record(admin: &Admin, function: &str, count: usize) -> anyhow::Result<(f64, bool)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = admin.usage_records(function)?;
        if records.len() >= count
            && let Some(last) = records.last()
        {
            // init_us: the cold start's load and instantiation (0 from
            // nodes that did not record it apart).
            let wall =
                last["wall_us"].as_f64().unwrap_or(0.0) + last["init_us"].as_f64().unwrap_or(0.0);
            let cold = last["cold"]
                .as_bool()
                .or_else(|| last["cold_start"].as_bool())
                .unwrap_or(false);
            return Ok((wall, cold));
        }
        if Instant::now() > deadline {
            bail!(
                "{function} has {} usage record(s) after 30 s, expected {count}",
                records.len()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Results {
    /// The scenario's markdown.
    pub fn markdown(&self, runs: usize) -> String {
        let mut out = format!(
            "## 2. Cold start\n\n\
             Process start to first 200 for hello: the server is spawned on a free port and \
             polled every 0.5 ms until it answers 200. One untimed start first, so each timed \
             start finds what the system caches on disk (Mayfly's compiled artifact in its data \
             directory, wasmtime's compile cache); workerd compiles its JavaScript at each \
             start. Median (min–max) over {runs} starts.\n\n\
             | system | process start → first 200 |\n|---|---|\n"
        );
        for (kind, outcome) in &self.process_start {
            let cell = match outcome {
                Outcome::Measured(runs) => runs.show(latency),
                other => other.note().unwrap_or_default().to_string(),
            };
            out.push_str(&format!("| {} | {cell} |\n", kind.label()));
        }
        out.push_str(&format!(
            "\nMayfly only, on a node started with `--keep-alive 1s`, {runs} distinct functions \
             (distinct components, so each deploy compiles):\n\n\
             | Mayfly | median (min–max) |\n|---|---|\n"
        ));
        match &self.mayfly {
            Outcome::Measured(f) => {
                let compiled = if f.all_compiled {
                    ""
                } else {
                    " (not every deploy compiled: artifact reused)"
                };
                let marked = if f.all_marked_cold {
                    ""
                } else {
                    " (not every record is marked `cold`)"
                };
                out.push_str(&format!(
                    "| deploy call → first 200 of the new function{compiled} | {} |\n\
                     | first request to a cold-tier function (artifact on disk, not in memory), client side | {} |\n\
                     | the same request's `init_us + wall_us` in the node's usage record{marked} | {} |\n",
                    f.deploy_to_200.show(latency),
                    f.cold_request.show(latency),
                    f.cold_wall.show(latency),
                ));
            }
            other => out.push_str(&format!("| all | {} |\n", other.note().unwrap_or_default())),
        }
        out
    }
}
