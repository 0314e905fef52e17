//! A rolling, in-process store of per-function time series for the
//! dashboard: requests by outcome, cold starts, latency percentiles,
//! instances, billed GB-s and CPU time, at two resolutions (10 s points for
//! the last hour, 5 min points for the last day).
//!
//! The request path only adds to atomics ([`FunctionSeries::record`]: a few
//! relaxed `fetch_add`s, no lock, no allocation). A roller task
//! ([`SeriesStore::roll`], every [`FINE_STEP_MS`]) drains them into a point
//! under the store's mutex, which requests never take. Idle periods store
//! nothing, so an idle function costs its accumulator (~1.1 KB) alone; a
//! busy one at most 360 + 288 points of 128 bytes (~81 KB) plus one latency
//! histogram per 5 min slot of the last hour and the slot being filled
//! (13 × 1 KB): under 100 KB.
//!
//! Latency is kept as a log-linear histogram of microseconds (8 sub-buckets
//! per power of two: a percentile is within 6.25% of the true value), so
//! percentiles over any window merge exactly.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::PriceList;

/// The fine resolution's step.
pub const FINE_STEP_MS: i64 = 10_000;
/// Fine points kept: one hour.
pub const FINE_POINTS: usize = 360;
/// The coarse resolution's step.
pub const COARSE_STEP_MS: i64 = 300_000;
/// Coarse points kept: one day.
pub const COARSE_POINTS: usize = 288;
/// Coarse slots whose latency histograms are kept, for the last hour's
/// percentiles.
const HOUR_SLOTS: usize = 12;

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 3;
/// Latency buckets: microseconds up to 2^32 (~72 minutes, past any timeout).
const BUCKETS: usize = (32 << SUB_BITS) as usize;

/// Outcomes counted, in this order: those of the ledger.
pub const OUTCOMES: [&str; 7] = [
    "ok",
    "error",
    "timeout",
    "oom",
    "killed",
    "client_closed",
    "throttled",
];
/// Index of `throttled` in [`OUTCOMES`].
pub const THROTTLED: usize = 6;

fn bucket_of(us: u64) -> usize {
    let us = us.clamp(1, (1 << 32) - 1);
    let log = 63 - us.leading_zeros();
    let index = if log < SUB_BITS {
        // Below 8 µs every value has a bucket of its own.
        us as u32
    } else {
        let sub = ((us >> (log - SUB_BITS)) as u32) & ((1 << SUB_BITS) - 1);
        ((log - SUB_BITS + 1) << SUB_BITS) + sub
    };
    (index as usize).min(BUCKETS - 1)
}

/// The middle of a bucket, in microseconds.
fn bucket_value(index: usize) -> u64 {
    let index = index as u32;
    let octave = index >> SUB_BITS;
    if octave == 0 {
        return u64::from(index);
    }
    let log = octave + SUB_BITS - 1;
    let sub = u64::from(index & ((1 << SUB_BITS) - 1));
    let width = 1u64 << (log - SUB_BITS);
    (1u64 << log) + sub * width + width / 2
}

/// What one function's requests added since the last roll. Only atomics,
/// written by requests and drained by the roller.
struct Accumulator {
    outcomes: [AtomicU64; OUTCOMES.len()],
    cold_starts: AtomicU64,
    billed_ms: AtomicU64,
    /// Configured memory (MB) × billed ms: GB-s × 1024 × 1000.
    mb_ms: AtomicU64,
    cpu_us: AtomicU64,
    latency: [AtomicU32; BUCKETS],
}

impl Accumulator {
    fn new() -> Self {
        Self {
            outcomes: std::array::from_fn(|_| AtomicU64::new(0)),
            cold_starts: AtomicU64::new(0),
            billed_ms: AtomicU64::new(0),
            mb_ms: AtomicU64::new(0),
            cpu_us: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    /// Reads (and with `drain`, resets) the counts.
    fn take(&self, drain: bool, into: &mut Totals) {
        let read = |a: &AtomicU64| {
            if drain {
                a.swap(0, Ordering::Relaxed)
            } else {
                a.load(Ordering::Relaxed)
            }
        };
        for (total, count) in into.outcomes.iter_mut().zip(&self.outcomes) {
            *total += read(count);
        }
        into.cold_starts += read(&self.cold_starts);
        into.billed_ms += read(&self.billed_ms);
        into.mb_ms += read(&self.mb_ms);
        into.cpu_us += read(&self.cpu_us);
        for (total, count) in into.latency.iter_mut().zip(&self.latency) {
            // Most buckets are empty: a load is cheaper than a swap.
            if count.load(Ordering::Relaxed) != 0 {
                *total += if drain {
                    count.swap(0, Ordering::Relaxed)
                } else {
                    count.load(Ordering::Relaxed)
                };
            }
        }
    }
}

/// Counts over a period, with its latency histogram.
#[derive(Clone)]
struct Totals {
    outcomes: [u64; OUTCOMES.len()],
    cold_starts: u64,
    billed_ms: u64,
    mb_ms: u64,
    cpu_us: u64,
    latency: Box<[u32; BUCKETS]>,
}

impl Totals {
    fn new() -> Self {
        Self {
            outcomes: [0; OUTCOMES.len()],
            cold_starts: 0,
            billed_ms: 0,
            mb_ms: 0,
            cpu_us: 0,
            latency: Box::new([0; BUCKETS]),
        }
    }

    fn is_empty(&self) -> bool {
        self.outcomes.iter().all(|&n| n == 0)
    }

    fn add(&mut self, other: &Totals) {
        for (a, b) in self.outcomes.iter_mut().zip(other.outcomes) {
            *a += b;
        }
        self.cold_starts += other.cold_starts;
        self.billed_ms += other.billed_ms;
        self.mb_ms += other.mb_ms;
        self.cpu_us += other.cpu_us;
        for (a, b) in self.latency.iter_mut().zip(other.latency.iter()) {
            *a += b;
        }
    }

    fn percentile(&self, q: f64) -> u64 {
        let total: u64 = self.latency.iter().map(|&n| u64::from(n)).sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (index, &count) in self.latency.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                return bucket_value(index);
            }
        }
        bucket_value(BUCKETS - 1)
    }

    fn point(&self, t_ms: i64, instances: i64) -> Point {
        Point {
            t_ms,
            outcomes: self.outcomes,
            cold_starts: self.cold_starts,
            p50_us: self.percentile(0.50),
            p95_us: self.percentile(0.95),
            p99_us: self.percentile(0.99),
            instances: instances.max(0) as u64,
            billed_ms: self.billed_ms,
            mb_ms: self.mb_ms,
            cpu_us: self.cpu_us,
        }
    }
}

/// One point of a series: what happened in `[t_ms, t_ms + step)`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Point {
    /// Start of the period, ms since the Unix epoch.
    pub t_ms: i64,
    /// Requests by outcome, in the order of [`OUTCOMES`].
    pub outcomes: [u64; OUTCOMES.len()],
    /// Invocations that loaded their function first.
    pub cold_starts: u64,
    /// Latency percentiles (wall time), µs.
    pub p50_us: u64,
    /// 95th percentile, µs.
    pub p95_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Instances (running and kept) when the period ended.
    pub instances: u64,
    /// Billed milliseconds.
    pub billed_ms: u64,
    /// Configured MB × billed ms.
    pub mb_ms: u64,
    /// CPU time, µs.
    pub cpu_us: u64,
}

impl Point {
    /// Requests of every outcome.
    pub fn requests(&self) -> u64 {
        self.outcomes.iter().sum()
    }

    /// Requests that did not end `ok` (nor `client_closed`, which is the
    /// client leaving), throttles included.
    pub fn errors(&self) -> u64 {
        self.requests() - self.outcomes[0] - self.outcomes[5]
    }

    /// Billed GB-seconds.
    pub fn billed_gb_s(&self) -> f64 {
        self.mb_ms as f64 / 1024.0 / 1000.0
    }

    /// The cost of the period under `prices` (as the usage API computes
    /// it: throttled requests are free).
    pub fn cost(&self, prices: &PriceList) -> f64 {
        let billable = self.requests() - self.outcomes[THROTTLED];
        billable as f64 / 1e6 * prices.per_million_requests
            + self.billed_gb_s() * prices.per_gb_second
            + self.cpu_us as f64 / 1e6 * prices.per_cpu_second
    }
}

/// One function's series: its accumulator and the points rolled so far.
pub struct FunctionSeries {
    live: Accumulator,
    /// Instances now (the `function_instances` gauge's value).
    instances: prometheus_client::metrics::gauge::Gauge,
    rolled: Mutex<Rolled>,
}

struct Rolled {
    fine: VecDeque<Point>,
    coarse: VecDeque<Point>,
    /// The coarse slot being filled: its start and totals so far.
    pending: Option<(i64, Totals)>,
    /// Latency histograms of the last coarse slots (start, totals).
    hour: VecDeque<(i64, Totals)>,
}

impl std::fmt::Debug for FunctionSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionSeries").finish_non_exhaustive()
    }
}

impl FunctionSeries {
    fn new(instances: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            live: Accumulator::new(),
            instances,
            rolled: Mutex::new(Rolled {
                fine: VecDeque::new(),
                coarse: VecDeque::new(),
                pending: None,
                hour: VecDeque::new(),
            }),
        }
    }

    /// Counts one finished invocation. `outcome` indexes [`OUTCOMES`].
    /// Lock-free: the request path calls it.
    pub fn record(
        &self,
        outcome: usize,
        wall_us: u64,
        billed_ms: u64,
        memory_mb: u32,
        cpu_us: u64,
    ) {
        let live = &self.live;
        if let Some(count) = live.outcomes.get(outcome) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        if outcome != THROTTLED {
            live.latency[bucket_of(wall_us)].fetch_add(1, Ordering::Relaxed);
            if billed_ms > 0 {
                live.billed_ms.fetch_add(billed_ms, Ordering::Relaxed);
                live.mb_ms
                    .fetch_add(billed_ms * u64::from(memory_mb), Ordering::Relaxed);
            }
            if cpu_us > 0 {
                live.cpu_us.fetch_add(cpu_us, Ordering::Relaxed);
            }
        }
    }

    /// Counts a cold start.
    pub fn cold_start(&self) {
        self.live.cold_starts.fetch_add(1, Ordering::Relaxed);
    }

    fn rolled(&self) -> std::sync::MutexGuard<'_, Rolled> {
        self.rolled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the fine point that started at `t_ms`.
    fn roll(&self, t_ms: i64) {
        let mut totals = Totals::new();
        self.live.take(true, &mut totals);
        let instances = self.instances.get();
        let mut rolled = self.rolled();
        let slot = t_ms - t_ms.rem_euclid(COARSE_STEP_MS);
        // A coarse slot ends when a point of a later one arrives.
        if rolled
            .pending
            .as_ref()
            .is_some_and(|(start, _)| *start != slot)
            && let Some((start, done)) = rolled.pending.take()
            && !done.is_empty()
        {
            rolled.coarse.push_back(done.point(start, instances));
            if rolled.coarse.len() > COARSE_POINTS {
                rolled.coarse.pop_front();
            }
            rolled.hour.push_back((start, done));
            if rolled.hour.len() > HOUR_SLOTS {
                rolled.hour.pop_front();
            }
        }
        if totals.is_empty() && instances == 0 {
            return;
        }
        rolled.fine.push_back(totals.point(t_ms, instances));
        if rolled.fine.len() > FINE_POINTS {
            rolled.fine.pop_front();
        }
        match &mut rolled.pending {
            Some((_, pending)) => pending.add(&totals),
            None => rolled.pending = Some((slot, totals)),
        }
    }

    /// The points at `resolution` since `since_ms`, the period being filled
    /// last (counted so far, not drained).
    pub fn points(&self, resolution: Resolution, since_ms: i64, now_ms: i64) -> Vec<Point> {
        let mut current = Totals::new();
        self.live.take(false, &mut current);
        let instances = self.instances.get();
        let rolled = self.rolled();
        let mut points: Vec<Point> = match resolution {
            Resolution::Fine => rolled.fine.iter().copied().collect(),
            Resolution::Coarse => rolled.coarse.iter().copied().collect(),
        };
        let start = match resolution {
            Resolution::Fine => now_ms - now_ms.rem_euclid(FINE_STEP_MS),
            Resolution::Coarse => {
                if let Some((_, pending)) = &rolled.pending {
                    current.add(pending);
                }
                now_ms - now_ms.rem_euclid(COARSE_STEP_MS)
            }
        };
        points.push(current.point(start, instances));
        points.retain(|p| p.t_ms >= since_ms);
        points
    }

    /// Totals over the last hour (fine points) with the hour's latency
    /// percentiles (from the coarse slots' histograms: the hour rounded
    /// out to 5 minutes).
    pub fn last_hour(&self, now_ms: i64) -> Point {
        let mut latency = Totals::new();
        self.live.take(false, &mut latency);
        let instances = self.instances.get();
        let rolled = self.rolled();
        let mut sum = latency.point(now_ms, instances);
        for point in rolled.fine.iter().filter(|p| p.t_ms >= now_ms - 3_600_000) {
            for (a, b) in sum.outcomes.iter_mut().zip(point.outcomes) {
                *a += b;
            }
            sum.cold_starts += point.cold_starts;
            sum.billed_ms += point.billed_ms;
            sum.mb_ms += point.mb_ms;
            sum.cpu_us += point.cpu_us;
        }
        if let Some((_, pending)) = &rolled.pending {
            latency.add(pending);
        }
        for (start, totals) in &rolled.hour {
            if *start >= now_ms - 3_600_000 - COARSE_STEP_MS {
                latency.add(totals);
            }
        }
        sum.p50_us = latency.percentile(0.50);
        sum.p95_us = latency.percentile(0.95);
        sum.p99_us = latency.percentile(0.99);
        sum
    }
}

/// Which series to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// 10 s points, the last hour.
    Fine,
    /// 5 min points, the last day.
    Coarse,
}

impl Resolution {
    /// `10s` or `5m`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "10s" => Ok(Self::Fine),
            "5m" => Ok(Self::Coarse),
            other => Err(format!(
                "resolution `{}` is not kept: use `10s` (the last hour) or `5m` (the last day)",
                other.escape_debug()
            )),
        }
    }

    /// The step in ms.
    pub fn step_ms(self) -> i64 {
        match self {
            Self::Fine => FINE_STEP_MS,
            Self::Coarse => COARSE_STEP_MS,
        }
    }
}

/// Every function's series.
#[derive(Default)]
pub struct SeriesStore {
    functions: Mutex<BTreeMap<String, Arc<FunctionSeries>>>,
}

impl SeriesStore {
    /// The series of `function` (created on first use, at deploy).
    pub fn function(
        &self,
        function: &str,
        instances: prometheus_client::metrics::gauge::Gauge,
    ) -> Arc<FunctionSeries> {
        self.map()
            .entry(function.to_string())
            .or_insert_with(|| Arc::new(FunctionSeries::new(instances)))
            .clone()
    }

    /// Forgets a deleted function.
    pub fn remove(&self, function: &str) {
        self.map().remove(function);
    }

    /// The series of `function`, if it is deployed.
    pub fn get(&self, function: &str) -> Option<Arc<FunctionSeries>> {
        self.map().get(function).cloned()
    }

    /// Every function's series, by name.
    pub fn all(&self) -> Vec<(String, Arc<FunctionSeries>)> {
        self.map()
            .iter()
            .map(|(name, series)| (name.clone(), series.clone()))
            .collect()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<FunctionSeries>>> {
        self.functions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the fine point that started at `t_ms` for every function.
    pub fn roll(&self, t_ms: i64) {
        // Rolled outside the map's lock: a deploy never waits for the roll.
        for (_, series) in self.all() {
            series.roll(t_ms);
        }
    }

    /// Rolls every [`FINE_STEP_MS`] on the wall clock until `stop`.
    pub fn spawn_roller(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        tokio::spawn(async move {
            loop {
                let now = crate::clock::now_ms();
                let next = now - now.rem_euclid(FINE_STEP_MS) + FINE_STEP_MS;
                let wait = std::time::Duration::from_millis((next - now).max(1) as u64);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                self.roll(next - FINE_STEP_MS);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_sizes_hold() {
        assert_eq!(std::mem::size_of::<Point>(), 128);
        assert_eq!(BUCKETS * 4, 1024);
    }

    #[test]
    fn buckets_are_ordered_and_close() {
        let mut last = 0;
        for us in [
            1u64, 2, 7, 8, 9, 15, 16, 100, 1_000, 12_345, 1_000_000, 60_000_000,
        ] {
            let bucket = bucket_of(us);
            assert!(bucket >= last, "{us}");
            last = bucket;
            let value = bucket_value(bucket) as f64;
            assert!(
                (value - us as f64).abs() / us as f64 <= 0.0625,
                "{us} -> {value}"
            );
        }
    }

    #[test]
    fn a_roll_keeps_counts_and_percentiles() {
        let store = SeriesStore::default();
        let series = store.function("f", Default::default());
        for i in 1..=100u64 {
            series.record(0, i * 1_000, i, 128, 10);
        }
        series.record(1, 50_000, 50, 128, 10);
        series.record(THROTTLED, 0, 0, 128, 0);
        series.cold_start();
        let now = 1_000_000_000_000i64;
        let live = series.points(Resolution::Fine, 0, now);
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].requests(), 102);
        assert_eq!(live[0].errors(), 2);
        store.roll(now - now.rem_euclid(FINE_STEP_MS));
        let points = series.points(Resolution::Fine, 0, now + FINE_STEP_MS);
        assert_eq!(points.len(), 2);
        let p = points[0];
        assert_eq!(p.outcomes[0], 100);
        assert_eq!(p.cold_starts, 1);
        assert_eq!(p.billed_ms, 5050 + 50);
        assert!(
            (p.p50_us as f64 - 50_000.0).abs() < 50_000.0 * 0.07,
            "{}",
            p.p50_us
        );
        assert!(
            (p.p99_us as f64 - 99_000.0).abs() < 99_000.0 * 0.07,
            "{}",
            p.p99_us
        );
        assert_eq!(points[1].requests(), 0);
        let hour = series.last_hour(now + FINE_STEP_MS);
        assert_eq!(hour.requests(), 102);
        assert_eq!(hour.p50_us, p.p50_us);
        // The coarse view holds the slot being filled.
        let coarse = series.points(Resolution::Coarse, 0, now + FINE_STEP_MS);
        assert_eq!(coarse.last().map(Point::requests), Some(102));
        let prices = PriceList::default();
        assert!(p.cost(&prices) > 0.0);
    }
}
