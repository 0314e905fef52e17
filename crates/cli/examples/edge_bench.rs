//! Edge sites benchmark driver (issue 18, docs/edge-design.md §8 step 11):
//! a hub and two leaf sites (real nats-servers from the test harness,
//! `NatsServers::hub_with_sites`, each leaf link through a `LinkProxy`) and
//! two `mayfly serve` nodes, `a` at site-a (`site=a`) and `b` at site-b
//! (`site=b`), with the echo guest deployed as `pinned`, placed on `site=a`.
//!
//!   cargo run -p mayfly --example edge_bench -- <mayfly binary> <echo.wasm>
//!       <requests per row> <buffered records> <catch-up runs> [long cut seconds]
//!
//! 1. Latency of 1 KiB POSTs, one at a time: served locally at `a`, and
//!    sent to `b`, which forwards them through the hub to `a`; with the
//!    proxies of both leaf links delaying each byte by 0, 10 and 25 ms one
//!    way. p50, p90 and p99 per row.
//! 2. Catch-up: cut site a's link, serve `buffered records` requests at `a`
//!    (its usage records wait in site a's JetStream), heal, and time until
//!    the leaf link is up at both ends, then until the hub's usage stream
//!    holds, and the fleet usage total (as `b` reads it from that stream)
//!    counts, every request `a` ever served: exactly, never more. The
//!    cut lasts as long as serving takes; with `long cut seconds`, the same
//!    runs again with the link held cut that long.
//!
//! It prints Markdown tables; `bench/edge.sh` runs it and keeps them in
//! `bench/results/edge.md`. A failed expectation ends it with an error
//! and the tail of each node's log.

mod support;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use mayfly_nats::testing::{EdgeServers, NatsServers};
use serde_json::Value;

/// One-way delays added on each leaf link, in ms.
const DELAYS_MS: [u64; 3] = [0, 10, 25];
/// Requests sent before each measured row (connections, caches, interest).
const WARM_UP: usize = 10;
/// Clients serving the buffered requests at `a` during the cut.
const CUT_CLIENTS: usize = 4;
/// How long any one wait may take before the bench gives up.
const DEADLINE: Duration = Duration::from_secs(180);
/// Namespace of the bench fleet's subjects, streams and buckets.
const NAMESPACE: &str = "bench";
/// The hub's name (and JetStream domain) in the harness.
const HUB: &str = "hub";

fn main() -> anyhow::Result<()> {
    let usage = "usage: edge_bench <mayfly> <echo.wasm> <requests per row> <records> <runs>";
    let mut args = std::env::args().skip(1);
    let mut next = || args.next().context(usage);
    let binary = PathBuf::from(next()?);
    let echo = PathBuf::from(next()?);
    let per_row: usize = next()?.parse().context(usage)?;
    let records: usize = next()?.parse().context(usage)?;
    let runs: usize = next()?.parse().context(usage)?;
    let long_cut = match args.next() {
        Some(seconds) => Duration::from_secs(seconds.parse().context(usage)?),
        None => Duration::ZERO,
    };

    let started = Instant::now();
    let servers = NatsServers::hub_with_sites(&["site-a", "site-b"]);
    let dir = tempfile::tempdir()?;
    // `a` first: the first node of a fleet makes its admin token (stored at
    // the hub); `b` joins with it.
    let a = NodeProcess::start(&binary, dir.path(), &servers, "site-a", "a", "site=a")?;
    let b = NodeProcess::start(&binary, dir.path(), &servers, "site-b", "b", "site=b")?;
    let token = std::fs::read_to_string(dir.path().join("a/admin.token"))
        .context("a's admin token")?
        .trim()
        .to_string();
    let bench = Bench {
        servers,
        a,
        b,
        token,
        agent: support::agent(Duration::from_secs(60)),
        served: AtomicU64::new(0),
    };
    let result = bench.run(&binary, &echo, per_row, records, runs, long_cut);
    if result.is_err() {
        for node in [&bench.a, &bench.b] {
            eprintln!("--- node {}'s log (tail):\n{}", node.name, node.log_tail());
        }
    }
    result?;
    println!(
        "\nwhole run: {:.0} s (servers, nodes, deploy and every step)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The topology and what the bench counted.
struct Bench {
    servers: EdgeServers,
    a: NodeProcess,
    b: NodeProcess,
    token: String,
    agent: ureq::Agent,
    /// Requests to `pinned` answered 200: each is one invocation at `a`,
    /// so one usage record in the fleet ledger.
    served: AtomicU64,
}

impl Bench {
    fn run(
        &self,
        binary: &Path,
        echo: &Path,
        per_row: usize,
        records: usize,
        runs: usize,
        long_cut: Duration,
    ) -> anyhow::Result<()> {
        until("both nodes in the membership list", || {
            Ok(self
                .admin(&self.b, "/v1/nodes")?
                .as_array()
                .map_or(0, Vec::len)
                == 2)
        })?;
        // Deployed at `b`, which does not run it; only `a` loads it.
        let deployed = Command::new(binary)
            .args(["deploy", "pinned"])
            .arg(echo)
            .args(["--route", "/pinned", "--place", "site=a", "--wait", "120s"])
            .env("MAYFLY_ADMIN_URL", &self.b.admin)
            .env("MAYFLY_TOKEN", &self.token)
            .output()?;
        ensure!(
            deployed.status.success(),
            "deploy: {}{}",
            String::from_utf8_lossy(&deployed.stdout),
            String::from_utf8_lossy(&deployed.stderr)
        );

        self.latency(per_row)?;
        self.catch_up(records, runs, long_cut)
    }

    fn latency(&self, per_row: usize) -> anyhow::Result<()> {
        let body = vec![b'x'; 1024];
        println!(
            "\n### Latency, 1 KiB POST to `pinned` (echo), {per_row} requests per row, one at a time\n"
        );
        println!(
            "| one-way delay per leaf link | local at a: p50 / p90 / p99 | forwarded b → hub → a: p50 / p90 / p99 |"
        );
        println!("|---|---|---|");
        for delay in DELAYS_MS {
            for site in ["site-a", "site-b"] {
                self.servers.link(site).delay(Duration::from_millis(delay));
            }
            let mut row = Vec::new();
            for node in [&self.a, &self.b] {
                let url = format!("{}/pinned/x", node.gateway);
                for _ in 0..WARM_UP {
                    self.post(&url, &body)?;
                }
                let mut times = Vec::with_capacity(per_row);
                for _ in 0..per_row {
                    let sent = Instant::now();
                    self.post(&url, &body)?;
                    times.push(support::ms(sent.elapsed()));
                }
                times.sort_by(f64::total_cmp);
                row.push(format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    percentile(&times, 0.50),
                    percentile(&times, 0.90),
                    percentile(&times, 0.99)
                ));
            }
            println!("| {delay} ms | {} | {} |", row[0], row[1]);
        }
        for site in ["site-a", "site-b"] {
            self.servers.link(site).delay(Duration::ZERO);
        }
        Ok(())
    }

    /// One POST to `pinned`; it must be answered 200 by node `a`.
    fn post(&self, url: &str, body: &[u8]) -> anyhow::Result<()> {
        let mut response = self.agent.post(url).send(body)?;
        let status = response.status().as_u16();
        let node = response
            .headers()
            .get("x-mayfly-node")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = response.body_mut().read_to_vec()?;
        ensure!(
            status == 200,
            "{url}: {status}: {}",
            String::from_utf8_lossy(&text)
        );
        self.served.fetch_add(1, Ordering::Relaxed);
        ensure!(
            node.as_deref() == Some("a") && text.len() == body.len(),
            "{url}: answered by {node:?} with {} bytes",
            text.len()
        );
        Ok(())
    }

    fn catch_up(&self, records: usize, runs: usize, long_cut: Duration) -> anyhow::Result<()> {
        println!("\n### Catch-up of {records} usage records buffered at site a during a cut\n");
        println!(
            "| run | cut lasted (serving {records} at a took) | heal → leaf link up | leaf up → all in the hub's stream | leaf up → fleet total exact | heal → fleet total exact |"
        );
        println!("|---|---|---|---|---|---|");
        // Short cuts (as long as serving takes), then long ones if asked.
        let holds = if long_cut.is_zero() {
            vec![Duration::ZERO]
        } else {
            vec![Duration::ZERO, long_cut]
        };
        let runs = holds
            .into_iter()
            .flat_map(|hold| (1..=runs).map(move |run| (run, hold)));
        for (run, hold) in runs {
            // A steady state first: everything served so far is counted at
            // the hub and nothing waits at the site.
            self.wait_counted()?;
            until("a's usage backlog empty", || Ok(self.backlog()? == 0))?;

            self.servers.link("site-a").cut();
            let cut = Instant::now();
            self.servers.wait_unlinked("site-a");
            let serving = Instant::now();
            self.serve_at_a(records)?;
            let serve_time = serving.elapsed();
            // All of them handed to site a's own JetStream (its usage
            // stream), none left in a's local ledger.
            until("every record in site a's usage stream", || {
                let name = format!("{NAMESPACE}_usage_site-a");
                Ok(self.stream_messages("site-a", &name)? == records as u64)
            })?;
            ensure!(
                self.counted()? < self.served(),
                "the fleet total already counts the cut's requests"
            );

            if let Some(left) = hold.checked_sub(cut.elapsed()) {
                std::thread::sleep(left);
            }
            let cut_lasted = cut.elapsed();
            self.servers.link("site-a").heal();
            let healed = Instant::now();
            until("site a's leaf link up at both ends", || {
                Ok(self.servers.linked("site-a"))
            })?;
            let linked = healed.elapsed();
            // Two arrivals, polled together: every record in the hub's
            // usage stream, and every one in the fleet ledger `b` reads
            // from it (its materialiser pulls in batches).
            let (mut in_stream, mut counted) = (None, None);
            until("every record at the hub", || {
                let served = self.served();
                if in_stream.is_none() {
                    let messages = self.stream_messages(HUB, &format!("{NAMESPACE}_usage"))?;
                    ensure!(
                        messages <= served,
                        "the hub's usage stream holds {messages} records, {served} served"
                    );
                    in_stream = (messages == served).then(|| healed.elapsed());
                }
                if counted.is_none() {
                    let total = self.counted()?;
                    ensure!(
                        total <= served,
                        "double count: the fleet ledger has {total} invocations, {served} served"
                    );
                    counted = (total == served).then(|| healed.elapsed());
                }
                Ok(in_stream.is_some() && counted.is_some())
            })?;
            let (in_stream, counted) = (in_stream.unwrap_or_default(), counted.unwrap_or_default());
            println!(
                "| {run} | {:.1} s ({:.1} s) | {:.2} s | {:.2} s | {:.2} s | {:.2} s |",
                cut_lasted.as_secs_f64(),
                serve_time.as_secs_f64(),
                linked.as_secs_f64(),
                in_stream.saturating_sub(linked).as_secs_f64(),
                counted.saturating_sub(linked).as_secs_f64(),
                counted.as_secs_f64()
            );
        }
        // No double count once everything settled: the site drained, and
        // the total still equals the requests served.
        until("a's usage backlog empty", || Ok(self.backlog()? == 0))?;
        self.wait_counted()?;
        println!(
            "\nfleet usage total at the end: {} invocations of `pinned` = {} requests answered 200 (no loss, no double count)",
            self.counted()?,
            self.served()
        );
        Ok(())
    }

    /// Serves `records` requests at `a` from a few clients at once; every
    /// one must be answered 200 by `a`.
    fn serve_at_a(&self, records: usize) -> anyhow::Result<()> {
        let left = Mutex::new(records);
        let url = format!("{}/pinned/x", self.a.gateway);
        let body = vec![b'x'; 1024];
        let failures = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|scope| {
            for _ in 0..CUT_CLIENTS {
                scope.spawn(|| {
                    loop {
                        {
                            let Ok(mut left) = left.lock() else { return };
                            if *left == 0 {
                                return;
                            }
                            *left -= 1;
                        }
                        if let Err(e) = self.post(&url, &body)
                            && let Ok(mut failures) = failures.lock()
                        {
                            failures.push(e.to_string());
                        }
                    }
                });
            }
        });
        let failures = failures.lock().map_or(0, |f| f.len());
        ensure!(
            failures == 0,
            "{failures} requests at a failed during the cut"
        );
        Ok(())
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until the fleet usage total equals the requests served; a
    /// total above it is a double count and ends the bench.
    fn wait_counted(&self) -> anyhow::Result<()> {
        until("the fleet usage total", || {
            let counted = self.counted()?;
            let served = self.served();
            if counted > served {
                bail!("double count: the fleet ledger has {counted} invocations, {served} served");
            }
            Ok(counted == served)
        })
    }

    /// Invocations of `pinned` in the fleet ledger as `b` (at site-b, which
    /// reads the hub's usage stream) sees it.
    fn counted(&self) -> anyhow::Result<u64> {
        self.admin(&self.b, "/v1/usage?function=pinned")?["total"]["invocations"]
            .as_u64()
            .context("usage total")
    }

    /// `a`'s usage backlog: its local ledger's unpublished records plus
    /// what site a's stream has not handed to the hub.
    fn backlog(&self) -> anyhow::Result<u64> {
        self.admin(&self.a, "/v1/status")?["fleet"]["usage_backlog"]
            .as_u64()
            .context("usage backlog")
    }

    /// Messages in stream `name` at server `server` (the hub or a site),
    /// from its `/jsz`.
    fn stream_messages(&self, server: &str, name: &str) -> anyhow::Result<u64> {
        let url = format!("{}/jsz?streams=true", self.servers.monitor_url(server));
        let jsz: Value = self.agent.get(&url).call()?.body_mut().read_json()?;
        jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
            .find(|stream| stream["name"] == name)
            .and_then(|stream| stream["state"]["messages"].as_u64())
            .with_context(|| format!("stream {name} at {server}"))
    }

    fn admin(&self, node: &NodeProcess, path: &str) -> anyhow::Result<Value> {
        let mut response = self
            .agent
            .get(format!("{}{path}", node.admin))
            .header("authorization", format!("Bearer {}", self.token))
            .call()?;
        let status = response.status().as_u16();
        let value: Value = response.body_mut().read_json()?;
        ensure!(status == 200, "{path} at {}: {status} {value}", node.name);
        Ok(value)
    }
}

/// A `mayfly serve` process at a leaf site; killed on drop.
struct NodeProcess {
    name: String,
    child: Child,
    gateway: String,
    admin: String,
    log: PathBuf,
}

impl NodeProcess {
    fn start(
        binary: &Path,
        dir: &Path,
        servers: &EdgeServers,
        site: &str,
        name: &str,
        labels: &str,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.join(name))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--nats", &servers.site_url(site), "--node-name", name])
            .args(["--labels", labels, "--nats-namespace", NAMESPACE])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let stdout = child.stdout.take().context("node's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut address = |prefix: &str| -> anyhow::Result<String> {
            let line = lines.next().context("the node printed its addresses")??;
            line.strip_prefix(prefix)
                .map(str::to_string)
                .with_context(|| format!("unexpected line {line:?}"))
        };
        let (gateway, admin) = match (
            address("gateway listening on "),
            address("admin API listening on "),
        ) {
            (Ok(gateway), Ok(admin)) => (gateway, admin),
            (Err(e), _) | (_, Err(e)) => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("node {name} did not start: {e}\n{tail}");
            }
        };
        Ok(Self {
            name: name.to_string(),
            child,
            gateway,
            admin,
            log,
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 10 ms until it holds; an error from it ends the
/// wait, and so does [`DEADLINE`].
fn until(what: &str, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    while !check()? {
        ensure!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The nearest-rank percentile `q` of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).max(1);
    sorted.get(rank - 1).copied().unwrap_or(0.0)
}
