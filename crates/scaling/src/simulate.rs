//! Trace replay: drives keep-alive policies with a simulated clock and
//! counts cold starts and the memory kept warm for nothing.
//!
//! Each function is replayed on its own, once per policy, in start order:
//!
//! - its first invocation is cold;
//! - an invocation that starts before the latest end so far overlaps a
//!   running one and is warm (the function is loaded while it runs);
//! - otherwise it starts `idle` after that end and is warm iff the windows
//!   the policy gave at that end say so; the loaded part of `idle` is
//!   wasted memory-time; the policy then records `idle`;
//! - after the last invocation, the loaded part of the time up to the
//!   horizon is wasted too.

use std::borrow::Borrow;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::policy::{FunctionKeepAlive, KeepAlivePolicy, Windows};
use crate::trace::FunctionTrace;

/// Memory given to each function when the trace has none: 128 MB, the
/// node's default limit (the Azure 2021 trace has no memory column).
pub const DEFAULT_MEMORY_MB: u32 = 128;

/// How one policy did over a whole trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyResult {
    /// The policy's name.
    pub policy: String,
    /// Functions with at least one invocation.
    pub functions: u64,
    /// Invocations replayed.
    pub invocations: u64,
    /// Invocations that found their function unloaded.
    pub cold_starts: u64,
    /// `cold_starts` as a percentage of `invocations`.
    pub cold_start_pct: f64,
    /// The median over functions of each function's cold-start percentage.
    /// Shown beside the 75th percentile because in a short trace more than
    /// a quarter of the functions are called too rarely to ever be warm,
    /// which pins the 75th percentile at 100%.
    pub p50_function_cold_start_pct: f64,
    /// The 75th percentile over functions of each function's cold-start
    /// percentage: the headline metric of Shahrad et al., less dominated
    /// by the few functions with most invocations.
    pub p75_function_cold_start_pct: f64,
    /// Memory-time loaded while no invocation ran, in GB-seconds (1 GB =
    /// 1024 MB).
    pub wasted_gb_s: f64,
    /// `wasted_gb_s` over that of the first policy simulated (the
    /// baseline); 1 for the baseline itself, NaN if the baseline wasted
    /// nothing.
    pub waste_vs_baseline: f64,
}

/// Replays `traces` (one pass, every policy on each function in turn)
/// against `policies`, with `memory_mb` per function, up to `horizon`.
/// The first policy is the baseline for [`PolicyResult::waste_vs_baseline`].
///
/// `traces` can be borrowed ([`FunctionTrace`]s in a slice) or owned and
/// generated on the fly ([`crate::synthetic`]); each must be sorted by
/// start, as the readers and generator make them. Functions without
/// invocations are skipped.
pub fn simulate<T>(
    traces: impl IntoIterator<Item = T>,
    policies: &[Box<dyn KeepAlivePolicy>],
    memory_mb: u32,
    horizon: Duration,
) -> Vec<PolicyResult>
where
    T: Borrow<FunctionTrace>,
{
    let mut totals: Vec<Totals> = policies.iter().map(|_| Totals::default()).collect();
    for trace in traces {
        let trace = trace.borrow();
        if trace.invocations.is_empty() {
            continue;
        }
        for (policy, totals) in policies.iter().zip(&mut totals) {
            let replayed = replay(policy.new_function(), trace, horizon);
            totals.add(&replayed, trace.invocations.len() as u64);
        }
    }
    let gb = f64::from(memory_mb) / 1024.0;
    let baseline = totals.first().map(|t| t.wasted.as_secs_f64() * gb);
    policies
        .iter()
        .zip(totals)
        .map(|(policy, mut totals)| {
            let wasted_gb_s = totals.wasted.as_secs_f64() * gb;
            PolicyResult {
                policy: policy.name(),
                functions: totals.functions,
                invocations: totals.invocations,
                cold_starts: totals.cold_starts,
                cold_start_pct: percentage(totals.cold_starts, totals.invocations),
                p50_function_cold_start_pct: percentile(&mut totals.function_cold_pct, 50.0),
                p75_function_cold_start_pct: percentile(&mut totals.function_cold_pct, 75.0),
                wasted_gb_s,
                waste_vs_baseline: match baseline {
                    Some(baseline) if baseline > 0.0 => wasted_gb_s / baseline,
                    _ => f64::NAN,
                },
            }
        })
        .collect()
}

/// One function under one policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Replayed {
    cold_starts: u64,
    wasted: Duration,
}

fn replay(
    mut state: Box<dyn FunctionKeepAlive>,
    trace: &FunctionTrace,
    horizon: Duration,
) -> Replayed {
    let mut cold_starts = 0;
    let mut wasted = Duration::ZERO;
    // The latest end so far and the windows the policy gave then.
    let mut loaded: Option<(Duration, Windows)> = None;
    for invocation in &trace.invocations {
        match loaded {
            None => cold_starts += 1,
            // Overlaps a running invocation: warm, nothing idle to record.
            Some((end, _)) if invocation.start <= end => {}
            Some((end, windows)) => {
                let idle = invocation.start - end;
                if !windows.is_warm_after(idle) {
                    cold_starts += 1;
                }
                wasted += windows.loaded_within(idle);
                state.record_idle(idle);
            }
        }
        let end = loaded.map_or(invocation.end, |(end, _)| end.max(invocation.end));
        loaded = Some((end, state.windows()));
    }
    if let Some((end, windows)) = loaded {
        wasted += windows.loaded_within(horizon.saturating_sub(end));
    }
    Replayed {
        cold_starts,
        wasted,
    }
}

/// Running totals of one policy.
#[derive(Debug, Default)]
struct Totals {
    functions: u64,
    invocations: u64,
    cold_starts: u64,
    wasted: Duration,
    /// Each function's cold-start percentage, for the percentile: one
    /// number per function, never per invocation.
    function_cold_pct: Vec<f64>,
}

impl Totals {
    fn add(&mut self, replayed: &Replayed, invocations: u64) {
        self.functions += 1;
        self.invocations += invocations;
        self.cold_starts += replayed.cold_starts;
        self.wasted = self.wasted.saturating_add(replayed.wasted);
        self.function_cold_pct
            .push(percentage(replayed.cold_starts, invocations));
    }
}

fn percentage(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// Nearest-rank percentile (0 for no values).
fn percentile(values: &mut [f64], percentile: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (percentile / 100.0 * values.len() as f64).ceil().max(1.0) as usize;
    values[rank.min(values.len()) - 1]
}

/// The results as a markdown table, one row per policy.
pub fn render_table(results: &[PolicyResult]) -> String {
    let mut table = String::from(
        "| policy | functions | invocations | cold starts | cold % | p50 function cold % | p75 function cold % | wasted GB-s | waste vs baseline |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        // Writing to a String cannot fail.
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.3} |",
            r.policy,
            r.functions,
            r.invocations,
            r.cold_starts,
            r.cold_start_pct,
            r.p50_function_cold_start_pct,
            r.p75_function_cold_start_pct,
            r.wasted_gb_s,
            r.waste_vs_baseline,
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hybrid::HybridHistogram;
    use crate::policy::FixedKeepAlive;
    use crate::trace::Invocation;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn invocation(start: u64, end: u64) -> Invocation {
        Invocation {
            start: secs(start),
            end: secs(end),
        }
    }

    fn policies() -> Vec<Box<dyn KeepAlivePolicy>> {
        vec![
            Box::new(FixedKeepAlive::default()),
            Box::new(HybridHistogram::default()),
        ]
    }

    #[test]
    fn fixed_keep_alive_on_a_hand_made_trace() {
        let trace = FunctionTrace {
            id: "f".into(),
            invocations: vec![
                invocation(0, 10),      // first: cold
                invocation(70, 100),    // idle 60 s: warm, 60 s wasted
                invocation(90, 95),     // overlaps: warm, nothing wasted
                invocation(1000, 1010), // idle 900 s > 10 min: cold, 600 s wasted
            ],
        };
        // Then 200 s loaded until the horizon.
        let results = simulate([&trace], &policies()[..1], 128, secs(1210));
        let fixed = &results[0];
        assert_eq!(fixed.policy, "fixed-10m");
        assert_eq!(fixed.functions, 1);
        assert_eq!(fixed.invocations, 4);
        assert_eq!(fixed.cold_starts, 2);
        assert_eq!(fixed.cold_start_pct, 50.0);
        assert_eq!(fixed.p75_function_cold_start_pct, 50.0);
        // (60 + 600 + 200) s × 1/8 GB
        assert_eq!(fixed.wasted_gb_s, 107.5);
        assert_eq!(fixed.waste_vs_baseline, 1.0);
    }

    #[test]
    fn hybrid_and_fixed_on_a_periodic_function() {
        // Every 5 minutes (instantly done) 13 times, then once 8 minutes
        // later, then quiet for 1000 s.
        let mut invocations: Vec<Invocation> =
            (0..13).map(|i| invocation(300 * i, 300 * i)).collect();
        invocations.push(invocation(3600 + 480, 3600 + 480));
        let trace = FunctionTrace {
            id: "timer".into(),
            invocations,
        };
        let results = simulate([&trace], &policies(), 1024, secs(4080 + 1000));
        let (fixed, hybrid) = (&results[0], &results[1]);

        // Fixed: only the first is cold; loaded through every gap (12 ×
        // 300 + 480 s) and 600 s after the last.
        assert_eq!(fixed.cold_starts, 1);
        assert_eq!(fixed.wasted_gb_s, 4680.0);

        // Hybrid: gaps 1–10 follow the fallback (loaded 300 s each, warm).
        // After 10 idle times of 5 minutes the windows are [270 s, 396 s):
        // gaps 11 and 12 are warm with 30 s loaded each; the 480 s gap is
        // cold with the whole 126 s window loaded. Bin 8 then stretches the
        // window to [270 s, 594 s): 324 s loaded before the horizon.
        assert_eq!(hybrid.cold_starts, 2);
        assert_eq!(hybrid.wasted_gb_s, 3000.0 + 60.0 + 126.0 + 324.0);
        assert_eq!(hybrid.waste_vs_baseline, 3510.0 / 4680.0);
        assert_eq!(hybrid.p75_function_cold_start_pct, 100.0 * 2.0 / 14.0);
    }

    #[test]
    fn totals_over_functions_and_the_75th_percentile() {
        let busy = FunctionTrace {
            id: "busy".into(),
            invocations: (0..10).map(|i| invocation(60 * i, 60 * i + 1)).collect(),
        };
        let once = |id: &str| FunctionTrace {
            id: id.into(),
            invocations: vec![invocation(0, 1)],
        };
        let empty = FunctionTrace {
            id: "never".into(),
            invocations: vec![],
        };
        let traces = [busy, once("a"), once("b"), once("c"), empty];
        let results = simulate(&traces, &policies()[..1], 128, secs(601));
        let fixed = &results[0];
        assert_eq!(fixed.functions, 4);
        assert_eq!(fixed.invocations, 13);
        assert_eq!(fixed.cold_starts, 4);
        // Per function: 10%, 100%, 100%, 100%.
        assert_eq!(fixed.p50_function_cold_start_pct, 100.0);
        assert_eq!(fixed.p75_function_cold_start_pct, 100.0);
        // busy: 9 × 59 s, then 60 s from its last end (541 s) to the
        // horizon; the others 600 s each.
        assert_eq!(fixed.wasted_gb_s, (9.0 * 59.0 + 60.0 + 3.0 * 600.0) / 8.0);
    }

    #[test]
    fn renders_a_markdown_table() {
        let trace = FunctionTrace {
            id: "f".into(),
            invocations: vec![invocation(0, 1), invocation(61, 62)],
        };
        // Fixed: 60 s idle and 48 s to the horizon loaded: 108 s × 1/8 GB.
        let table = render_table(&simulate([trace], &policies(), 128, secs(110)));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("| policy |"), "{table}");
        assert_eq!(
            lines[2],
            "| fixed-10m | 1 | 2 | 1 | 50.00 | 50.00 | 50.00 | 13.5 | 1.000 |"
        );
        assert!(lines[3].starts_with("| hybrid | 1 | 2 | 1 |"), "{table}");
    }

    #[test]
    fn results_serialize_to_json() {
        let trace = FunctionTrace {
            id: "f".into(),
            invocations: vec![invocation(0, 1)],
        };
        let results = simulate([trace], &policies(), 128, secs(100));
        let json = serde_json::to_value(&results).unwrap();
        assert_eq!(json[1]["policy"], "hybrid");
        assert_eq!(json[1]["cold_starts"], 1);
    }
}
