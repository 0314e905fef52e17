//! Scenario 5, queue-triggered events: the `events_bench` example against
//! a fresh Mayfly node per run (as bench/events.sh): events/s while a
//! preloaded queue drains into hello, then stored → acknowledged latency.

use anyhow::{Context as _, anyhow};

use super::mayfly::{Admin, Node, NodeOptions};
use super::process::{command, output};
use super::stats::{Runs, count, latency};
use super::{Bench, Outcome};

/// The scenario's figures.
#[derive(Default)]
pub struct Figures {
    /// Events per second while draining.
    pub rate: Runs,
    /// End-to-end latency percentiles over single sends, µs.
    pub p50: Runs,
    /// 99th percentile, µs.
    pub p99: Runs,
}

/// Measures Mayfly (the peers have no queue triggers to compare).
pub fn run(bench: &Bench) -> Outcome<Figures> {
    match bench.systems.first() {
        Some(system) => Outcome::of(system, || measure(bench)),
        None => Outcome::Skipped("no Mayfly binary".into()),
    }
}

fn measure(bench: &Bench) -> anyhow::Result<Figures> {
    let hello = std::fs::read(&bench.hello)
        .with_context(|| format!("cannot read {}", bench.hello.display()))?;
    let mut figures = Figures::default();
    // A fresh node per run: the driver always uses the queue `bench`, and a
    // second trigger on it would share the preloaded messages.
    for _ in 0..bench.profile.runs {
        let data = tempfile::tempdir().context("cannot create a data directory")?;
        let node = Node::start(
            bench.mayfly()?,
            data.path(),
            bench.log_dir.path(),
            &NodeOptions {
                port: 0,
                flags: &[],
            },
        )?;
        Admin::new(&node.admin, &node.token).deploy("sink", &hello, None)?;
        let text = output(
            command(&bench.events_bench)
                .env("MAYFLY_TOKEN", &node.token)
                .arg(&node.admin)
                .arg("sink")
                .arg(bench.profile.events.to_string())
                .arg(bench.profile.event_samples.to_string()),
        )?;
        let (rate, p50, p99) =
            parse(&text).with_context(|| format!("unexpected events_bench output:\n{text}"))?;
        figures.rate.push(rate);
        figures.p50.push(p50);
        figures.p99.push(p99);
    }
    Ok(figures)
}

/// Reads `… drained N events in X s: R events/s …` and
/// `end-to-end latency … p50 A ms, p99 B ms …`.
fn parse(text: &str) -> anyhow::Result<(f64, f64, f64)> {
    let rate = text
        .lines()
        .find(|line| line.contains(" drained "))
        .and_then(|line| number_before(line, " events/s"))
        .ok_or_else(|| anyhow!("no events/s line"))?;
    let latency_line = text
        .lines()
        .find(|line| line.starts_with("end-to-end latency"))
        .ok_or_else(|| anyhow!("no latency line"))?;
    let after = |key: &str| -> Option<f64> {
        let at = latency_line.find(key)? + key.len();
        latency_line[at..].split_whitespace().next()?.parse().ok()
    };
    let (p50, p99) = after("p50 ")
        .zip(after("p99 "))
        .ok_or_else(|| anyhow!("no p50/p99 in `{latency_line}`"))?;
    Ok((rate, p50 * 1e3, p99 * 1e3))
}

/// The number just before `suffix` in `line`.
fn number_before(line: &str, suffix: &str) -> Option<f64> {
    let end = line.find(suffix)?;
    line[..end].rsplit(' ').next()?.parse().ok()
}

/// The scenario's markdown.
pub fn markdown(outcome: &Outcome<Figures>, events: usize, samples: usize, runs: usize) -> String {
    let mut out = String::from("## 5. Queue-triggered events (Mayfly)\n\n");
    let Outcome::Measured(f) = outcome else {
        out.push_str(outcome.note().unwrap_or_default());
        out.push('\n');
        return out;
    };
    out.push_str(&format!(
        "`examples/events_bench <admin> sink {events} {samples}` on a fresh node per run (as \
         bench/events.sh): {} events preloaded into a queue, then a queue trigger (batch 128, \
         concurrency 128) drains them into hello; latency is stored → acknowledged over {} \
         single sends, read from the node's power-of-two histogram. The peers have no queue \
         triggers. Median (min–max) over {runs} runs.\n\n\
         | figure | Mayfly |\n|---|---|\n\
         | events/s while draining | {} |\n\
         | end-to-end latency p50 | {} |\n\
         | end-to-end latency p99 | {} |\n",
        count(events as f64),
        count(samples as f64),
        f.rate.show(count),
        f.p50.show(latency),
        f.p99.show(latency),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_driver_output() {
        let text = "preloaded 2000 messages in 0.10 s (20000 messages/s stored durably, batches of 5000)\n\
                    queue trigger drained 2000 events in 0.25 s: 8000 events/s (batch 128, concurrency 128)\n\
                    end-to-end latency (stored -> acknowledged) over 100 single sends: p50 1.5 ms, p99 3.0 ms (from power-of-two buckets, ms clock)\n";
        let (rate, p50, p99) = parse(text).unwrap();
        assert_eq!(rate, 8000.0);
        assert_eq!(p50, 1500.0);
        assert_eq!(p99, 3000.0);
    }
}
