//! Scenario 3, density: N distinct functions deployed to one Mayfly node,
//! each on its own route; deploy time, the idle node's memory, and the
//! first-request latency of a sample of them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use super::mayfly::{Admin, Node, NodeOptions, variant};
use super::process::get;
use super::stats::{Runs, count, latency, mib, micros, quantile};
use super::{Bench, Outcome};

/// Deploys in flight at once: a few, as a deploy pipeline would send.
const DEPLOY_THREADS: usize = 4;
/// When one run takes longer than this, the scenario stops after it (and
/// says so) rather than spending the better part of an hour on repeats.
const REPEAT_BUDGET: Duration = Duration::from_secs(180);
/// The sample's seed, fixed so every run times the same functions.
const SEED: u64 = 0x6d61_7966_6c79;

/// The scenario's figures.
#[derive(Default)]
pub struct Figures {
    /// Functions deployed per run.
    pub functions: usize,
    /// Functions in the first-request sample.
    pub sampled: usize,
    /// Total deploy wall time ÷ N, µs.
    pub per_function: Runs,
    /// Median and 99th percentile of single deploy calls, µs.
    pub deploy_p50: Runs,
    /// 99th percentile of single deploy calls, µs.
    pub deploy_p99: Runs,
    /// Node VmRSS once all are deployed and the node is idle, bytes.
    pub rss: Runs,
    /// First-request latency over the sample, µs.
    pub first_p50: Runs,
    /// 99th percentile of the same.
    pub first_p99: Runs,
    /// Tier counts when the RSS was read, last run (such as "50 warm").
    pub tiers: String,
    /// Why fewer runs than planned were made, if so.
    pub short: Option<String>,
}

/// Measures Mayfly (the peers run one function per process: no density
/// figure to compare).
pub fn run(bench: &Bench) -> Outcome<Figures> {
    match bench.systems.first() {
        Some(system) => Outcome::of(system, || measure(bench)),
        None => Outcome::Skipped("no Mayfly binary".into()),
    }
}

fn measure(bench: &Bench) -> anyhow::Result<Figures> {
    let profile = &bench.profile;
    let hello = std::fs::read(&bench.hello)
        .with_context(|| format!("cannot read {}", bench.hello.display()))?;
    let mut figures = Figures {
        functions: profile.density_functions,
        ..Figures::default()
    };
    for run in 0..profile.runs {
        let started = Instant::now();
        one_run(bench, &hello, &mut figures)?;
        let took = started.elapsed();
        println!(
            "    run {}: {} functions in {:.0} s",
            run + 1,
            profile.density_functions,
            took.as_secs_f64()
        );
        if run + 1 < profile.runs && took > REPEAT_BUDGET {
            figures.short = Some(format!(
                "Single run: one run of {} functions took {:.0} s on this machine, too long to repeat",
                count(profile.density_functions as f64),
                took.as_secs_f64()
            ));
            break;
        }
    }
    Ok(figures)
}

fn one_run(bench: &Bench, hello: &[u8], figures: &mut Figures) -> anyhow::Result<()> {
    let n = bench.profile.density_functions;
    let data = tempfile::tempdir().context("cannot create a data directory")?;
    let mut node = Node::start(
        bench.mayfly()?,
        data.path(),
        bench.log_dir.path(),
        &NodeOptions {
            port: 0,
            flags: &[],
        },
    )?;
    let started = Instant::now();
    let deploys = deploy_all(&node.admin, &node.token, hello, n)?;
    let wall = started.elapsed();
    figures.per_function.push(micros(wall) / n as f64);
    figures.deploy_p50.push(quantile(&deploys, 0.50));
    figures.deploy_p99.push(quantile(&deploys, 0.99));

    // Idle: let deploy-time work (the ledger, the database) settle before
    // reading the node's memory.
    std::thread::sleep(if bench.profile.smoke {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    });
    node.process.check_running()?;
    figures.rss.push(node.process.memory_bytes("VmRSS")? as f64);
    figures.tiers = tier_counts(&Admin::new(&node.admin, &node.token))?;

    let sample = sample(n, bench.profile.density_sample, SEED);
    figures.sampled = sample.len();
    let mut first = Vec::with_capacity(sample.len());
    for i in sample {
        let url = format!("{}/f{i}", node.gateway);
        let started = Instant::now();
        let (status, _) = get(&url, Duration::from_secs(60))?;
        let elapsed = started.elapsed();
        if status != 200 {
            bail!("first request to {url} answered {status}");
        }
        first.push(micros(elapsed));
    }
    figures.first_p50.push(quantile(&first, 0.50));
    figures.first_p99.push(quantile(&first, 0.99));
    Ok(())
}

/// Deploys f0..f{n-1}, each a distinct variant of hello routed at `/f<i>`,
/// from a few threads; returns each deploy call's latency in µs.
fn deploy_all(admin_url: &str, token: &str, hello: &[u8], n: usize) -> anyhow::Result<Vec<f64>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    let latencies = Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|scope| {
        for _ in 0..DEPLOY_THREADS {
            scope.spawn(|| {
                let admin = Admin::new(admin_url, token);
                let mut mine = Vec::new();
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let name = format!("f{i}");
                    let component = variant(hello, &name);
                    let started = Instant::now();
                    match admin.deploy(&name, &component, Some(&format!("/{name}"))) {
                        Ok(_) => mine.push(micros(started.elapsed())),
                        Err(error) => {
                            failed.store(true, Ordering::Relaxed);
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(error);
                            }
                        }
                    }
                    if (i + 1).is_multiple_of(1000) {
                        println!("    {} deployed", i + 1);
                    }
                }
                if let Ok(mut all) = latencies.lock() {
                    all.extend(mine);
                }
            });
        }
    });
    if let Some(error) = first_error.into_inner().ok().flatten() {
        return Err(error);
    }
    latencies
        .into_inner()
        .map_err(|_| anyhow!("a deploy thread panicked"))
}

/// "N cold, M warm" from the node's status.
fn tier_counts(admin: &Admin) -> anyhow::Result<String> {
    let mut counts = BTreeMap::new();
    for (_, tier) in admin.tiers()? {
        *counts.entry(tier).or_insert(0usize) += 1;
    }
    Ok(counts
        .iter()
        .map(|(tier, n)| format!("{} {tier}", count(*n as f64)))
        .collect::<Vec<_>>()
        .join(", "))
}

/// `size` distinct indices below `n` (all of them if `size >= n`), chosen
/// by a seeded xorshift64* generator and a partial Fisher–Yates shuffle, so
/// that every run and every machine times the same functions.
fn sample(n: usize, size: usize, seed: u64) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..n).collect();
    let mut state = seed.max(1);
    let size = size.min(n);
    for i in 0..size {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let random = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let j = i + (random % (n - i) as u64) as usize;
        indices.swap(i, j);
    }
    indices.truncate(size);
    indices
}

/// The scenario's markdown.
pub fn markdown(outcome: &Outcome<Figures>, runs: usize) -> String {
    let mut out = String::from("## 3. Density (Mayfly)\n\n");
    let Outcome::Measured(f) = outcome else {
        out.push_str(outcome.note().unwrap_or_default());
        out.push('\n');
        return out;
    };
    let (runs_note, column) = match &f.short {
        Some(why) => (format!("{why}."), "Mayfly (single run)"),
        None => (format!("Median (min–max) over {runs} runs."), "Mayfly"),
    };
    out.push_str(&format!(
        "{} distinct functions (hello plus a custom section each, so each has its own digest \
         and is compiled at deploy), each on its own route `/f<i>`, deployed through the admin \
         API by {DEPLOY_THREADS} concurrent clients to one fresh node. Memory is the node's \
         VmRSS once all are deployed and it has been idle a few seconds (tiers then: {}). \
         First requests: {} functions chosen with a fixed seed, one request each, fresh \
         connection. The peers run one function per process, so they have no row here. \
         {runs_note}\n\n\
         | figure | {column} |\n|---|---|\n\
         | deploy wall time ÷ N | {} |\n\
         | single deploy call p50 | {} |\n\
         | single deploy call p99 | {} |\n\
         | node RSS with all deployed, idle | {} |\n\
         | node RSS ÷ N | {} |\n\
         | first request p50 | {} |\n\
         | first request p99 | {} |\n",
        count(f.functions as f64),
        f.tiers,
        f.sampled,
        f.per_function.show(latency),
        f.deploy_p50.show(latency),
        f.deploy_p99.show(latency),
        f.rss.show(mib),
        f.rss.median().map_or_else(
            || "–".into(),
            |rss| format!("{:.0} KiB", rss / f.functions.max(1) as f64 / 1024.0)
        ),
        f.first_p50.show(latency),
        f.first_p99.show(latency),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_distinct_seeded_and_bounded() {
        let a = sample(10_000, 100, SEED);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 100);
        assert!(a.iter().all(|&i| i < 10_000));
        assert_eq!(a, sample(10_000, 100, SEED));
        assert_eq!(sample(50, 100, SEED).len(), 50);
    }
}
