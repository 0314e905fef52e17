//! Synthetic invocation traces with the published statistics of the Azure
//! Functions traces (Shahrad et al., "Serverless in the Wild", USENIX ATC
//! 2020), for simulating more functions and longer than a real sample holds.
//!
//! Every function gets, independently:
//!
//! - **A mean rate** λ (invocations per second) from a log-normal
//!   distribution fitted to the two published quantiles: 45% of functions
//!   are invoked at most once an hour on average, 81% at most once a minute.
//!   With z(0.45) = −0.1257 and z(0.81) = 0.8779, solving
//!   `μ + z·σ = ln λ` at λ = 1/3600 and 1/60 gives `ln λ ~ N(−7.676,
//!   4.080²)`: a median of one invocation every 36 minutes. Rates are capped
//!   at one per second, which touches about 3% of functions: above that
//!   keep-alive hardly matters (the function is always warm) and the
//!   invocations would dominate the simulation's run time.
//! - **An arrival pattern**, so that inter-arrival times are as varied as in
//!   Azure, where 40% of functions have an inter-arrival coefficient of
//!   variation (CV) above 1:
//!   - 30% are *timers*: a fixed period `1/λ` from a random phase, each
//!     firing off by a normal jitter of 1% of the period (at most 30 s).
//!     CV ≈ 0.
//!   - 20% are *steady*: log-normal inter-arrival times with mean `1/λ` and
//!     shape σ uniform in [0.3, 0.8], so CV from 0.3 to 0.95.
//!   - 20% are *Poisson*: exponential inter-arrival times. CV = 1, so about
//!     half of them measure above 1 over a finite trace.
//!   - 30% are *bursty*: log-normal inter-arrival times with mean `1/λ` and
//!     σ uniform in [1, 2], so CV from 1.3 to 7.3: bursts of calls with
//!     long pauses between.
//!
//!   That makes 30% + about 10% of functions with a CV above 1 (37–38%
//!   measured over a day: short bursty traces can measure below 1).
//! - **Durations**: a mean duration from the published log-normal fit of
//!   mean execution times (log-mean −0.38, σ 2.36 in seconds: median 0.68 s,
//!   1% above 2.8 minutes), and per invocation that mean times a log-normal
//!   factor of σ 0.5; capped at 15 minutes, the longest timeout a function
//!   may have.
//!
//! Traces are generated one function at a time (see
//! [`SyntheticConfig::traces`]), so a long run never holds more than one
//! function's invocations, and are the same for the same configuration.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Exp1, StandardNormal};

use crate::trace::{FunctionTrace, Invocation};

/// Log-normal fit of per-function mean rates (per second): the log-mean.
const RATE_LOG_MEAN: f64 = -7.676;
/// Log-normal fit of per-function mean rates: the log-standard deviation.
const RATE_LOG_SIGMA: f64 = 4.080;
/// Highest mean rate generated, per second.
const MAX_RATE: f64 = 1.0;
/// Share of timer functions.
const TIMER_SHARE: f64 = 0.30;
/// Share of steady functions.
const STEADY_SHARE: f64 = 0.20;
/// Range of the log-normal shape of steady inter-arrival times.
const STEADY_SIGMA: std::ops::Range<f64> = 0.3..0.8;
/// Share of Poisson functions (the rest are bursty).
const POISSON_SHARE: f64 = 0.20;
/// Timer jitter: standard deviation as a share of the period…
const TIMER_JITTER: f64 = 0.01;
/// …and at most this many seconds.
const MAX_TIMER_JITTER: f64 = 30.0;
/// Range of the log-normal shape of bursty inter-arrival times.
const BURSTY_SIGMA: std::ops::Range<f64> = 1.0..2.0;
/// Log-normal fit of mean durations in seconds (Shahrad et al.).
const DURATION_LOG_MEAN: f64 = -0.38;
/// Log-normal fit of mean durations: the log-standard deviation.
const DURATION_LOG_SIGMA: f64 = 2.36;
/// Spread of one function's durations around its mean (log-normal σ).
const DURATION_SPREAD: f64 = 0.5;
/// Longest duration generated, in seconds.
const MAX_DURATION: f64 = 15.0 * 60.0;

/// What to generate: how many functions, over how long, from which seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// How many functions. Rarely-invoked ones may have no invocation
    /// within `duration` and are still generated (with none).
    pub functions: usize,
    /// The length of the trace: invocations start before it.
    pub duration: Duration,
    /// The same seed gives the same traces.
    pub seed: u64,
}

impl SyntheticConfig {
    /// The traces, one function at a time, with ids `f<index>-<pattern>`
    /// (`timer`, `steady`, `poisson` or `bursty`).
    pub fn traces(&self) -> SyntheticTraces {
        SyntheticTraces {
            config: *self,
            rng: StdRng::seed_from_u64(self.seed),
            next: 0,
        }
    }
}

/// Iterator over the functions of a synthetic trace; see
/// [`SyntheticConfig::traces`].
#[derive(Debug, Clone)]
pub struct SyntheticTraces {
    config: SyntheticConfig,
    rng: StdRng,
    next: usize,
}

impl Iterator for SyntheticTraces {
    type Item = FunctionTrace;

    fn next(&mut self) -> Option<FunctionTrace> {
        if self.next >= self.config.functions {
            return None;
        }
        let index = self.next;
        self.next += 1;
        Some(generate_function(
            &mut self.rng,
            index,
            self.config.duration.as_secs_f64(),
        ))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.config.functions - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for SyntheticTraces {}

fn generate_function(rng: &mut StdRng, index: usize, horizon: f64) -> FunctionTrace {
    let rate = lognormal(rng, RATE_LOG_MEAN, RATE_LOG_SIGMA).min(MAX_RATE);
    let mean_interval = 1.0 / rate;
    let pattern = rng.random::<f64>();
    let mean_duration = lognormal(rng, DURATION_LOG_MEAN, DURATION_LOG_SIGMA);
    let (kind, starts) = if pattern < TIMER_SHARE {
        let jitter = (TIMER_JITTER * mean_interval).min(MAX_TIMER_JITTER);
        let phase = rng.random::<f64>() * mean_interval;
        let mut fired = Vec::new();
        let mut tick = 0.0;
        while phase + tick * mean_interval < horizon {
            let noise: f64 = rng.sample(StandardNormal);
            let time = phase + tick * mean_interval + jitter * noise;
            // Jitter may push a firing next to an edge out of the trace.
            if (0.0..horizon).contains(&time) {
                fired.push(time);
            }
            tick += 1.0;
        }
        // Jitter can swap two firings only if it exceeds half a period; it
        // cannot (1%), but sorting keeps the trace's invariant regardless.
        fired.sort_by(f64::total_cmp);
        ("timer", fired)
    } else {
        let (kind, sigma) = if pattern < TIMER_SHARE + STEADY_SHARE {
            ("steady", Some(rng.random_range(STEADY_SIGMA)))
        } else if pattern < TIMER_SHARE + STEADY_SHARE + POISSON_SHARE {
            ("poisson", None)
        } else {
            ("bursty", Some(rng.random_range(BURSTY_SIGMA)))
        };
        let interval = |rng: &mut StdRng| match sigma {
            None => mean_interval * rng.sample::<f64, _>(Exp1),
            // A log-normal with mean 1/λ has log-mean ln(1/λ) − σ²/2.
            Some(sigma) => lognormal(rng, mean_interval.ln() - sigma * sigma / 2.0, sigma),
        };
        // Start somewhere inside a gap, as if the process ran before the
        // trace began (an approximation: the gap that holds the origin is
        // longer than a typical one).
        let mut time = rng.random::<f64>() * interval(rng);
        let mut arrived = Vec::new();
        while time < horizon {
            arrived.push(time);
            time += interval(rng);
        }
        (kind, arrived)
    };
    let invocations = starts
        .into_iter()
        .map(|start| {
            let duration =
                (mean_duration * lognormal(rng, 0.0, DURATION_SPREAD)).clamp(0.0, MAX_DURATION);
            Invocation {
                start: Duration::from_secs_f64(start),
                end: Duration::from_secs_f64(start + duration),
            }
        })
        .collect();
    FunctionTrace {
        id: format!("f{index:05}-{kind}"),
        invocations,
    }
}

/// A sample of `exp(N(mu, sigma²))`.
fn lognormal(rng: &mut StdRng, mu: f64, sigma: f64) -> f64 {
    let z: f64 = rng.sample(StandardNormal);
    (mu + sigma * z).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_traces() {
        let config = SyntheticConfig {
            functions: 200,
            duration: Duration::from_secs(6 * 3600),
            seed: 7,
        };
        let first: Vec<FunctionTrace> = config.traces().collect();
        let second: Vec<FunctionTrace> = config.traces().collect();
        assert_eq!(first, second);
        let other: Vec<FunctionTrace> = SyntheticConfig { seed: 8, ..config }.traces().collect();
        assert_ne!(first, other);
        assert_eq!(config.traces().len(), 200);
    }

    #[test]
    fn traces_are_sorted_and_within_the_duration() {
        let config = SyntheticConfig {
            functions: 300,
            duration: Duration::from_secs(6 * 3600),
            seed: 3,
        };
        for trace in config.traces() {
            assert!(
                trace.invocations.is_sorted_by_key(|i| i.start),
                "{}",
                trace.id
            );
            for invocation in &trace.invocations {
                assert!(invocation.start < config.duration, "{}", trace.id);
                assert!(invocation.start <= invocation.end, "{}", trace.id);
                assert!(invocation.end - invocation.start <= Duration::from_secs(900));
            }
        }
    }

    #[test]
    fn the_population_has_the_published_rates() {
        // Over 6 hours, "at most once an hour on average" is at most 6
        // invocations, "at most once a minute" at most 360. (A day would
        // do as well, but takes four times as long in a debug build.)
        let config = SyntheticConfig {
            functions: 2000,
            duration: Duration::from_secs(6 * 3600),
            seed: 1,
        };
        let mut hourly_or_less = 0;
        let mut minutely_or_less = 0;
        for trace in config.traces() {
            let count = trace.invocations.len();
            hourly_or_less += usize::from(count <= 6);
            minutely_or_less += usize::from(count <= 360);
        }
        let share = |count: usize| count as f64 / config.functions as f64;
        // 2000 functions: a standard error of about 1.1 percentage points.
        assert!(
            (share(hourly_or_less) - 0.45).abs() < 0.04,
            "{}",
            share(hourly_or_less)
        );
        assert!(
            (share(minutely_or_less) - 0.81).abs() < 0.04,
            "{}",
            share(minutely_or_less)
        );
    }

    #[test]
    fn arrival_patterns_have_the_intended_variability() {
        // Share of functions (with enough invocations to tell) whose
        // inter-arrival CV is above 1: the bursty 30% and about half of the
        // Poisson 20%; Azure has 40%.
        let config = SyntheticConfig {
            functions: 2000,
            duration: Duration::from_secs(6 * 3600),
            seed: 2,
        };
        let (mut measured, mut above) = (0, 0);
        for trace in config.traces() {
            if trace.invocations.len() < 50 || trace.invocations.len() > 5000 {
                continue;
            }
            let gaps: Vec<f64> = trace
                .invocations
                .windows(2)
                .map(|pair| (pair[1].start - pair[0].start).as_secs_f64())
                .collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let variance =
                gaps.iter().map(|gap| (gap - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
            measured += 1;
            above += usize::from(variance.sqrt() / mean > 1.0);
        }
        let share = above as f64 / measured as f64;
        assert!(measured > 200, "{measured}");
        assert!((0.34..0.46).contains(&share), "{share}");
    }
}
