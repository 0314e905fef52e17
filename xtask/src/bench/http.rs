//! Scenario 1, hello-world HTTP: wrk -t2 -c64 against each system after a
//! warm-up; requests/s, latency percentiles, server CPU per request and
//! peak RSS (measured as bench/http-load.sh does).

use anyhow::{Context as _, anyhow, bail};

use super::process::{Process, command, output};
use super::stats::{Runs, count, latency, mib, ratio};
use super::systems::Kind;
use super::{Bench, Outcome};

/// wrk's threads and connections, the same for every system.
const THREADS: u32 = 2;
const CONNECTIONS: u32 = 64;

/// One system's figures.
#[derive(Default)]
pub struct Figures {
    /// Requests per second.
    pub rps: Runs,
    /// Latency percentiles, in µs.
    pub p50: Runs,
    /// 99th percentile, µs.
    pub p99: Runs,
    /// 99.9th percentile, µs.
    pub p999: Runs,
    /// Server CPU time (user + system) per request, µs.
    pub cpu_us: Runs,
    /// The server's peak resident memory over all runs, bytes.
    pub peak_rss: f64,
    /// Socket errors and non-2xx answers over all measured runs.
    pub errors: u64,
}

/// The scenario's results, one row per system.
#[derive(Default)]
pub struct Results {
    /// (system, figures).
    pub rows: Vec<(Kind, Outcome<Figures>)>,
}

/// Measures every system.
pub fn run(bench: &Bench) -> Results {
    let rows = bench
        .systems
        .iter()
        .map(|system| (system.kind, Outcome::of(system, || measure(bench, system))))
        .collect();
    Results { rows }
}

fn measure(bench: &Bench, system: &super::System) -> anyhow::Result<Figures> {
    let mut server = system.serve_hello(&bench.hello_files(), &[])?;
    load(bench, &mut server.process, &server.url)
}

/// The profile's warm-up and runs of wrk against `url`, served by
/// `process` (whose CPU time and peak memory are the server's figures).
pub fn load(bench: &Bench, process: &mut Process, url: &str) -> anyhow::Result<Figures> {
    load_with(bench, process, url, None)
}

/// As [`load`], with every request a POST of `body`.
pub fn load_posting(
    bench: &Bench,
    process: &mut Process,
    url: &str,
    body: &str,
) -> anyhow::Result<Figures> {
    load_with(bench, process, url, Some(body))
}

fn load_with(
    bench: &Bench,
    process: &mut Process,
    url: &str,
    body: Option<&str>,
) -> anyhow::Result<Figures> {
    let profile = &bench.profile;
    wrk(bench, url, profile.warmup, body)?;
    let mut figures = Figures::default();
    for _ in 0..profile.runs {
        let before = process.cpu_seconds()?;
        let report = wrk(bench, url, profile.run, body)?;
        let cpu = process.cpu_seconds()? - before;
        process.check_running()?;
        if report.requests == 0 {
            bail!("wrk completed no request against {url}");
        }
        let requests = report.requests as f64;
        figures.rps.push(requests / (report.duration_us / 1e6));
        figures.p50.push(report.p50);
        figures.p99.push(report.p99);
        figures.p999.push(report.p999);
        figures.cpu_us.push(cpu / requests * 1e6);
        figures.errors += report.errors;
    }
    figures.peak_rss = process.memory_bytes("VmHWM")? as f64;
    Ok(figures)
}

/// What the `done` hook of bench/wrk-percentiles.lua prints.
struct WrkReport {
    /// Requests completed.
    pub requests: u64,
    /// The run's length, µs.
    pub duration_us: f64,
    /// Socket errors and non-2xx answers.
    pub errors: u64,
    /// Latency percentiles, µs.
    pub p50: f64,
    /// 99th percentile, µs.
    pub p99: f64,
    /// 99.9th percentile, µs.
    pub p999: f64,
}

/// Runs wrk (the scenario's threads and connections) against `url`; with
/// `body`, every request POSTs it (bench/wrk-percentiles.lua reads it from
/// the environment).
fn wrk(
    bench: &Bench,
    url: &str,
    duration: std::time::Duration,
    body: Option<&str>,
) -> anyhow::Result<WrkReport> {
    let text = output(
        command("wrk")
            .env("MAYFLY_BENCH_POST_BODY", body.unwrap_or_default())
            .arg(format!("-t{THREADS}"))
            .arg(format!("-c{CONNECTIONS}"))
            .arg(format!("-d{}s", duration.as_secs().max(1)))
            .arg("-s")
            .arg(&bench.wrk_script)
            .arg(url),
    )?;
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> anyhow::Result<WrkReport> {
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("mayfly-bench "))
        .ok_or_else(|| anyhow!("no `mayfly-bench` line (is bench/wrk-percentiles.lua used?)"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        line.split_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| anyhow!("no `{name}` in `{line}`"))
    };
    let errors = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|name| field(name))
        .sum::<anyhow::Result<f64>>()?;
    Ok(WrkReport {
        requests: field("requests")? as u64,
        duration_us: field("duration_us")?,
        errors: errors as u64,
        p50: field("p50")?,
        p99: field("p99")?,
        p999: field("p999")?,
    })
}

impl Results {
    /// The scenario's markdown: the figures, then Mayfly ÷ each peer.
    pub fn markdown(&self, runs: usize, run_secs: u64, warmup_secs: u64) -> String {
        let mut out = format!(
            "## 1. Hello-world HTTP\n\n\
             `wrk -t{THREADS} -c{CONNECTIONS} -d{run_secs}s` on loopback after a {warmup_secs} s \
             warm-up, {runs} runs; wrk shares the cores with the server. Latency percentiles \
             from wrk's histogram (bench/wrk-percentiles.lua). Server CPU per request is the \
             server process's user + system time over the run ÷ requests; peak RSS is its \
             VmHWM after the runs. Cells: median (min–max) over the runs.\n\n\
             | system | req/s | p50 | p99 | p99.9 | server CPU / request | peak RSS | errors |\n\
             |---|---|---|---|---|---|---|---|\n"
        );
        for (kind, outcome) in &self.rows {
            match outcome.measured() {
                Some(f) => out.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    kind.label(),
                    f.rps.show(count),
                    f.p50.show(latency),
                    f.p99.show(latency),
                    f.p999.show(latency),
                    f.cpu_us.show(latency),
                    mib(f.peak_rss),
                    f.errors
                )),
                None => out.push_str(&format!(
                    "| {} | {} |||||||\n",
                    kind.label(),
                    outcome.note().unwrap_or_default()
                )),
            }
        }
        out.push_str(&self.ratios());
        out
    }

    /// Mayfly ÷ peer for throughput (higher is better for Mayfly) and for
    /// CPU per request (lower is better), from the medians.
    fn ratios(&self) -> String {
        let Some(mayfly) = self.figures(Kind::Mayfly) else {
            return String::new();
        };
        let mut out = String::from(
            "\n| Mayfly ÷ peer | req/s (higher: Mayfly serves more) | server CPU / request (lower: Mayfly spends less) |\n|---|---|---|\n",
        );
        let mut any = false;
        for (kind, _) in self.rows.iter().filter(|(kind, _)| *kind != Kind::Mayfly) {
            let Some(peer) = self.figures(*kind) else {
                continue;
            };
            let quotient = |a: &Runs, b: &Runs| match (a.median(), b.median()) {
                (Some(a), Some(b)) if b > 0.0 => ratio(a / b),
                _ => "–".into(),
            };
            out.push_str(&format!(
                "| Mayfly ÷ {} | {} | {} |\n",
                kind.label(),
                quotient(&mayfly.rps, &peer.rps),
                quotient(&mayfly.cpu_us, &peer.cpu_us)
            ));
            any = true;
        }
        if any { out } else { String::new() }
    }

    /// A system's figures, if measured.
    pub fn figures(&self, kind: Kind) -> Option<&Figures> {
        self.rows
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, outcome)| outcome.measured())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_lua_hook_line() {
        let text = "Running 1s test\nmayfly-bench requests=13596 duration_us=1008184 connect=0 \
                    read=1 write=0 status=2 timeout=0 p50=3979 p99=26048 p999=36248 max=39064\n";
        let report = parse_wrk(text).unwrap();
        assert_eq!(report.requests, 13596);
        assert_eq!(report.errors, 3);
        assert_eq!(report.p999, 36248.0);
    }
}
