//! `mayfly simulate`: replays an invocation trace against keep-alive
//! policies and compares their cold starts and wasted memory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use mayfly_scaling::simulate::DEFAULT_MEMORY_MB;
use mayfly_scaling::trace::read_azure2021_file;
use mayfly_scaling::{
    FunctionTrace, PolicyResult, SyntheticConfig, parse_policy, render_table, simulate,
};

/// The policies compared when none is given; the first is the baseline.
const DEFAULT_POLICIES: [&str; 5] = ["fixed:10m", "fixed:5m", "fixed:20m", "fixed:1h", "hybrid"];

/// What to replay and which policies to compare.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// An Azure Functions 2021 invocation trace (CSV: app,func,end_timestamp,duration).
    #[arg(long, value_name = "FILE", required_unless_present = "synthetic")]
    trace: Option<PathBuf>,
    /// Replay a synthetic trace with the published Azure statistics instead.
    #[arg(long, conflicts_with = "trace")]
    synthetic: bool,
    /// Functions in the synthetic trace.
    #[arg(long, default_value_t = 10_000, conflicts_with = "trace")]
    functions: usize,
    /// Length of the synthetic trace, e.g. 1d or 6h.
    #[arg(long, default_value = "1d", value_parser = humantime::parse_duration, conflicts_with = "trace")]
    duration: Duration,
    /// Seed of the synthetic trace: the same seed gives the same trace.
    #[arg(long, default_value_t = 1, conflicts_with = "trace")]
    seed: u64,
    /// A keep-alive policy: `hybrid`, `fixed` (10 minutes), `fixed:<duration>`
    /// or a duration such as `10m`; repeat to compare several, the first
    /// being the baseline [default: 10m, 5m, 20m, 1h, hybrid].
    #[arg(long = "policy", value_name = "POLICY")]
    policies: Vec<String>,
    /// Memory of every function, in MB (the trace has none).
    #[arg(long, value_name = "MB", default_value_t = DEFAULT_MEMORY_MB)]
    memory_mb: u32,
}

/// Runs the simulation and prints the table (or JSON).
pub fn run(args: SimulateArgs, json: bool) -> anyhow::Result<()> {
    let texts: Vec<&str> = if args.policies.is_empty() {
        DEFAULT_POLICIES.to_vec()
    } else {
        args.policies.iter().map(String::as_str).collect()
    };
    let policies = texts
        .into_iter()
        .map(parse_policy)
        .collect::<Result<Vec<_>, _>>()?;
    let (source, horizon, results) = match &args.trace {
        Some(path) => {
            let traces = read_azure2021_file(path)
                .with_context(|| format!("reading the trace {}", path.display()))?;
            // The trace ends when its last invocation does.
            let horizon = traces
                .iter()
                .map(FunctionTrace::last_end)
                .max()
                .unwrap_or_default();
            let results = simulate(&traces, &policies, args.memory_mb, horizon);
            (path.display().to_string(), horizon, results)
        }
        None => {
            let config = SyntheticConfig {
                functions: args.functions,
                duration: args.duration,
                seed: args.seed,
            };
            let results = simulate(config.traces(), &policies, args.memory_mb, config.duration);
            (
                format!("synthetic (seed {})", args.seed),
                config.duration,
                results,
            )
        }
    };
    print(&source, horizon, args.memory_mb, &results, json)
}

fn print(
    source: &str,
    horizon: Duration,
    memory_mb: u32,
    results: &[PolicyResult],
    json: bool,
) -> anyhow::Result<()> {
    // Every policy sees the same functions and invocations.
    let (functions, invocations) = results
        .first()
        .map_or((0, 0), |r| (r.functions, r.invocations));
    if json {
        let output = serde_json::json!({
            "trace": source,
            "functions": functions,
            "invocations": invocations,
            "horizon_secs": horizon.as_secs_f64(),
            "memory_mb": memory_mb,
            "baseline": results.first().map(|r| &r.policy),
            "results": results,
        });
        println!("{}", serde_json::to_string(&output)?);
        return Ok(());
    }
    // Whole seconds: the trace's sub-second end is noise in a header.
    let horizon = Duration::from_secs(horizon.as_secs());
    println!(
        "trace: {source}, {functions} functions, {invocations} invocations, horizon {}, {memory_mb} MB per function",
        humantime::format_duration(horizon),
    );
    println!();
    print!("{}", render_table(results));
    Ok(())
}
