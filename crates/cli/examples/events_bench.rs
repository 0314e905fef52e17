//! Queue-trigger benchmark driver (run by `bench/events.sh`): preloads a
//! queue, attaches a trigger to a deployed function, and measures how fast
//! the node drains it (events/s); then sends messages one at a time and
//! reads the node's end-to-end latency histogram (stored → acknowledged).
//!
//! Usage: `MAYFLY_TOKEN=<token> events_bench <admin url> <function> <messages> <latency samples>`

#![allow(missing_docs)]

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};

/// `Bearer $MAYFLY_TOKEN`: the admin API wants a token.
fn bearer() -> String {
    format!(
        "Bearer {}",
        std::env::var("MAYFLY_TOKEN").unwrap_or_default()
    )
}

fn post_json(agent: &ureq::Agent, url: &str, body: &Value) -> anyhow::Result<Value> {
    let mut response = agent
        .post(url)
        .header("authorization", bearer())
        .header("content-type", "application/json")
        .send(body.to_string())
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response.body_mut().read_to_string()?;
    if !status.is_success() {
        bail!("POST {url}: {status} {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn metrics(agent: &ureq::Agent, admin: &str) -> anyhow::Result<String> {
    Ok(agent
        .get(format!("{admin}/metrics"))
        .header("authorization", bearer())
        .call()?
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()?)
}

/// The value of the sample line starting with `prefix`, 0 if absent.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Cumulative (upper bound in seconds, count) of the latency histogram.
fn latency_buckets(text: &str, function: &str) -> Vec<(f64, f64)> {
    let suffix = format!(",function=\"{function}\"}}");
    text.lines()
        .filter_map(|line| line.strip_prefix("mayfly_event_latency_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (le, rest) = rest.split_once('"')?;
            let (labels, count) = rest.rsplit_once(' ')?;
            if labels != suffix {
                return None;
            }
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of the difference of two cumulative histograms,
/// interpolated linearly inside its bucket.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let old = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - old)
        })
        .collect();
    let total = counts.last().map_or(0.0, |(_, n)| *n);
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for (le, n) in counts {
        if n >= rank {
            if le.is_infinite() {
                return lower;
            }
            let share = if n > below {
                (rank - below) / (n - below)
            } else {
                1.0
            };
            return lower + (le - lower) * share;
        }
        lower = le;
        below = n;
    }
    lower
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, admin, function, messages, samples] = args.as_slice() else {
        bail!("usage: events_bench <admin url> <function> <messages> <latency samples>");
    };
    let messages: usize = messages.parse().context("messages")?;
    let samples: usize = samples.parse().context("latency samples")?;
    let agent = support::agent(Duration::from_secs(120));
    let delivered_line =
        format!("mayfly_event_deliveries_total{{function=\"{function}\",result=\"delivered\"}}");

    // Preload the queue before anything consumes it, in batches.
    let started = Instant::now();
    let mut sent = 0;
    while sent < messages {
        let batch = (messages - sent).min(5000);
        let body = json!({"messages": (0..batch).map(|n| json!(sent + n)).collect::<Vec<_>>()});
        post_json(&agent, &format!("{admin}/v1/queues/bench/batch"), &body)?;
        sent += batch;
    }
    let preload = started.elapsed();
    println!(
        "preloaded {messages} messages in {:.2} s ({:.0} messages/s stored durably, batches of 5000)",
        preload.as_secs_f64(),
        messages as f64 / preload.as_secs_f64()
    );

    // Drain: attach the trigger and wait until every message is delivered.
    let trigger = json!({"source": {"kind": "queue", "queue": "bench", "batch_size": 128, "max_concurrency": 128}});
    let before = sample(&metrics(&agent, admin)?, &delivered_line);
    let started = Instant::now();
    post_json(
        &agent,
        &format!("{admin}/v1/functions/{function}/triggers"),
        &trigger,
    )?;
    let deadline = started + Duration::from_secs(600);
    loop {
        let delivered = sample(&metrics(&agent, admin)?, &delivered_line) - before;
        if delivered >= messages as f64 {
            break;
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "only {delivered} of {messages} delivered after 600 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let drain = started.elapsed();
    println!(
        "queue trigger drained {messages} events in {:.2} s: {:.0} events/s (batch 128, concurrency 128)",
        drain.as_secs_f64(),
        messages as f64 / drain.as_secs_f64()
    );

    // Latency: one message at a time, each sent after the previous answer.
    let before_buckets = latency_buckets(&metrics(&agent, admin)?, function);
    let before = sample(&metrics(&agent, admin)?, &delivered_line);
    for n in 0..samples {
        let mut response = agent
            .post(format!("{admin}/v1/queues/bench/messages"))
            .header("authorization", bearer())
            .send(n.to_string())?;
        if !response.status().is_success() {
            bail!(
                "send: {} {}",
                response.status(),
                response.body_mut().read_to_string()?
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while sample(&metrics(&agent, admin)?, &delivered_line) - before < samples as f64 {
        if Instant::now() > deadline {
            bail!("latency samples were not all delivered");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let after_buckets = latency_buckets(&metrics(&agent, admin)?, function);
    println!(
        "end-to-end latency (stored -> acknowledged) over {samples} single sends: p50 {:.1} ms, p99 {:.1} ms (from power-of-two buckets, ms clock)",
        quantile(&before_buckets, &after_buckets, 0.50) * 1000.0,
        quantile(&before_buckets, &after_buckets, 0.99) * 1000.0
    );
    Ok(())
}
