//! Scenario 4, burst: the `burst` example (N clients connect and send one
//! request each at the same instant, several rounds) against each
//! system's hello URL.

use anyhow::{Context as _, bail};

use super::process::command;
use super::stats::{Runs, count, latency};
use super::systems::Kind;
use super::{Bench, Outcome};

/// Mayfly's flags for the burst, as in bench/burst.sh: room for every
/// client at once. The budget is a promise per running invocation, not an
/// allocation.
const MAYFLY_FLAGS: &[&str] = &["--max-instances", "1000", "--memory-budget", "1000000"];

/// One system's figures, in µs per round.
#[derive(Default)]
pub struct Figures {
    /// Median latency of each round.
    pub p50: Runs,
    /// 99th percentile of each round.
    pub p99: Runs,
    /// Slowest request of each round.
    pub max: Runs,
    /// Failed requests over all rounds.
    pub errors: u64,
    /// Rounds completed (the driver stops after a round with errors).
    pub rounds: usize,
}

/// The scenario's results.
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
        .map(|system| {
            let outcome = Outcome::of(system, || {
                let flags = if system.kind == Kind::Mayfly {
                    MAYFLY_FLAGS
                } else {
                    &[]
                };
                let server = system.serve_hello(&bench.hello_files(), flags)?;
                burst(bench, &server.url)
            });
            (system.kind, outcome)
        })
        .collect();
    Results { rows }
}

fn burst(bench: &Bench, url: &str) -> anyhow::Result<Figures> {
    let profile = &bench.profile;
    // Not `output()`: the driver exits with an error after a round with
    // failures, and that round's line is still a result to report.
    let out = command(&bench.burst)
        .arg(url)
        .arg(profile.burst_clients.to_string())
        .arg(profile.burst_rounds.to_string())
        .output()
        .with_context(|| format!("cannot run {}", bench.burst.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figures = parse(&text);
    if figures.rounds == 0 {
        bail!(
            "burst printed no round: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(figures)
}

/// Reads the driver's lines like
/// `round 2: 1000 clients, 0 errors, p50 12.3 ms, p99 40.1 ms, max 41.0 ms`.
fn parse(text: &str) -> Figures {
    let mut figures = Figures::default();
    for line in text.lines().filter(|line| line.starts_with("round ")) {
        let number = |key: &str| -> Option<f64> {
            let at = line.find(key)? + key.len();
            line[at..]
                .trim_start()
                .split([' ', ','])
                .next()?
                .parse()
                .ok()
        };
        let errors = line
            .split(", ")
            .find_map(|part| part.strip_suffix(" errors"))
            .and_then(|n| n.trim().parse::<u64>().ok());
        if let (Some(p50), Some(p99), Some(max), Some(errors)) =
            (number("p50"), number("p99"), number("max"), errors)
        {
            figures.p50.push(p50 * 1e3);
            figures.p99.push(p99 * 1e3);
            figures.max.push(max * 1e3);
            figures.errors += errors;
            figures.rounds += 1;
        }
    }
    figures
}

impl Results {
    /// The scenario's markdown.
    pub fn markdown(&self, clients: usize, rounds: usize) -> String {
        let mut out = format!(
            "## 4. Burst\n\n\
             `examples/burst <hello url> {clients} {rounds}`: {} clients each open a \
             connection and send one request at the same instant, {rounds} rounds; latency from \
             the common start to the end of each response. Mayfly runs with `{}` (as \
             bench/burst.sh). Median (min–max) over the rounds.\n\n\
             | system | p50 | p99 | max | errors |\n|---|---|---|---|---|\n",
            count(clients as f64),
            MAYFLY_FLAGS.join(" ")
        );
        for (kind, outcome) in &self.rows {
            match outcome.measured() {
                Some(f) => {
                    let stopped = if f.rounds < rounds {
                        format!(" (stopped after round {})", f.rounds)
                    } else {
                        String::new()
                    };
                    out.push_str(&format!(
                        "| {} | {} | {} | {} | {}{stopped} |\n",
                        kind.label(),
                        f.p50.show(latency),
                        f.p99.show(latency),
                        f.max.show(latency),
                        f.errors
                    ));
                }
                None => out.push_str(&format!(
                    "| {} | {} ||||\n",
                    kind.label(),
                    outcome.note().unwrap_or_default()
                )),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_round_lines() {
        let text = "round 1: 100 clients, 0 errors, p50 12.3 ms, p99 40.1 ms, max 41.0 ms\n\
                    round 2: 100 clients, 3 errors, p50 10.0 ms, p99 20.0 ms, max 30.5 ms\n\
                    all rounds: p50 11.0 ms, p99 40.1 ms, max 41.0 ms\n";
        let figures = parse(text);
        assert_eq!(figures.rounds, 2);
        assert_eq!(figures.errors, 3);
        assert_eq!(figures.max.range(), Some((30_500.0, 41_000.0)));
    }
}
