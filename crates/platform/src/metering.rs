//! Metering: each finished invocation becomes one usage record for the
//! ledger and updates the node's Prometheus metrics.
//!
//! Per-function metric handles are created once at deploy and kept with the
//! catalog entry, so the request path only touches atomics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mayfly_runtime::{InvocationReport, Outcome, ReportSink, RequestLabels};
use mayfly_store::{UsageRecord, billed_ms};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::FunctionHistograms;
use crate::ledger::{Ledger, LedgerMetrics};
use crate::series::{FunctionSeries, SeriesStore};

/// A counter whose total is read from elsewhere (a running count kept by
/// another part), typed as a counter in the exposition.
#[derive(Debug, Clone, Default)]
pub struct CounterView(Arc<AtomicU64>);

impl CounterView {
    /// Sets the total (it only ever grows at its source).
    pub fn set(&self, total: u64) {
        self.0.store(total, Ordering::Relaxed);
    }

    /// The total.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl prometheus_client::encoding::EncodeMetric for CounterView {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

/// Every outcome, in the order of [`outcome_index`].
const OUTCOMES: [Outcome; 6] = [
    Outcome::Ok,
    Outcome::Error,
    Outcome::Timeout,
    Outcome::Oom,
    Outcome::Killed,
    Outcome::ClientClosed,
];

fn outcome_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Ok => 0,
        Outcome::Error => 1,
        Outcome::Timeout => 2,
        Outcome::Oom => 3,
        Outcome::Killed => 4,
        Outcome::ClientClosed => 5,
    }
}

/// The ledger's name for a runtime outcome.
pub fn ledger_outcome(outcome: Outcome) -> mayfly_store::Outcome {
    match outcome {
        Outcome::Ok => mayfly_store::Outcome::Ok,
        Outcome::Error => mayfly_store::Outcome::Error,
        Outcome::Timeout => mayfly_store::Outcome::Timeout,
        Outcome::Oom => mayfly_store::Outcome::Oom,
        Outcome::Killed => mayfly_store::Outcome::Killed,
        Outcome::ClientClosed => mayfly_store::Outcome::ClientClosed,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabel {
    function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    function: String,
    outcome: String,
}

fn duration_histogram() -> Histogram {
    // 100 µs to ~105 s in powers of two: covers a hello (sub-millisecond)
    // to a long timeout.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// The node's metrics, served at `GET /metrics`.
pub struct Metrics {
    registry: Registry,
    invocations: Family<OutcomeLabels, Counter>,
    duration: Family<FunctionLabel, Histogram, fn() -> Histogram>,
    node_duration: Histogram,
    node_queue_wait: Histogram,
    /// Per function, its tier (0 cold, 1 warm, 2 hot), encoded as an
    /// OpenMetrics state set.
    tiers: Mutex<BTreeMap<String, Arc<AtomicI64>>>,
    /// Which functions have histograms of their own.
    pub function_histograms: FunctionHistograms,
    /// The dashboard's time series.
    pub series: Arc<SeriesStore>,
    cold_starts: Family<FunctionLabel, Counter>,
    in_flight: Family<FunctionLabel, Gauge>,
    throttles: Family<FunctionLabel, Counter>,
    queue_wait: Family<FunctionLabel, Histogram, fn() -> Histogram>,
    instances: Family<FunctionLabel, Gauge>,
    /// Node-wide counters, also shown by `mayfly status`.
    pub node: NodeMetrics,
    /// The ledger writer's metrics.
    pub ledger: LedgerMetrics,
    /// Event delivery metrics.
    pub(crate) events: crate::event_metrics::EventMetrics,
    /// The link to the fleet; only registered on a node in a fleet, so a
    /// node on its own never reports itself disconnected.
    pub fleet: Option<FleetMetrics>,
}

/// The state of a fleet node's link to NATS, set when metrics are read.
#[derive(Clone, Debug, Default)]
pub struct FleetMetrics {
    /// 1 while the node is connected to one of the fleet's servers.
    pub connected: Gauge,
    /// Usage records stored here and not yet published to the fleet.
    pub usage_backlog: Gauge,
    /// Log lines the live feed dropped since the node started.
    pub log_lines_unpublished: CounterView,
}

/// Node-wide counters.
#[derive(Clone, Debug, Default)]
pub struct NodeMetrics {
    /// Components compiled by this process.
    pub compilations: Counter,
    /// Deploys and restarts that found the compiled artifact on disk.
    pub artifact_cache_hits: Counter,
    /// Compiled artifacts found damaged or unloadable and compiled again
    /// from their component.
    pub artifact_recompiles: Counter,
    /// Invocations started.
    pub invocations: Counter,
    /// Invocations that did not end `ok` (nor `client_closed`).
    pub failed_invocations: Counter,
    /// Requests refused with 413 because their body was over the function's
    /// limit: before a guest ran, or (a streaming function) while it read
    /// the body, before it answered.
    pub requests_too_large: Counter,
    /// Instances running now: the runtime counts them; this gauge is set
    /// from that count when metrics are read.
    pub instances_in_flight: Gauge,
    /// Guest log lines dropped because the log writer fell behind.
    pub log_lines_dropped: CounterView,
    /// Functions deployed.
    pub functions: Gauge,
    /// Requests refused with 429.
    pub throttled: Counter,
    /// Functions unloaded because their keep-alive ran out.
    pub unloads_keep_alive: Counter,
    /// Functions and parsed models unloaded to stay within the memory budget.
    pub unloads_memory: Counter,
    /// Functions loaded ahead of a predicted invocation.
    pub prewarms: Counter,
    /// Memory held by loaded functions (code and kept instances), in bytes.
    pub resident_memory: Gauge,
    /// Memory held by parsed wasi:nn models (estimated), in bytes.
    pub models_resident: Gauge,
}

impl Metrics {
    /// Registers every metric of a node in a fleet: those of [`Metrics::new`]
    /// and the link's.
    pub fn for_fleet() -> Self {
        let mut metrics = Self::new();
        let fleet = FleetMetrics::default();
        metrics.registry.register(
            "fleet_connected",
            "1 while this node is connected to one of the fleet's NATS servers, else 0",
            fleet.connected.clone(),
        );
        metrics.registry.register(
            "fleet_usage_backlog_records",
            "Usage records stored on this node and not yet published to the fleet's ledger",
            fleet.usage_backlog.clone(),
        );
        metrics.registry.register(
            "fleet_log_lines_unpublished",
            "Guest log lines the fleet's live log feed dropped since the node started",
            fleet.log_lines_unpublished.clone(),
        );
        metrics.fleet = Some(fleet);
        metrics
    }

    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mayfly");
        let invocations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "invocations",
            "Invocations by function and outcome (ok, error, timeout, oom, killed, \
             client_closed, throttled)",
            invocations.clone(),
        );
        let duration: Family<FunctionLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "invocation_duration_seconds",
            "Wall time of invocations, from start to the end of the response body, for the \
             functions given to `serve --function-histograms`",
            duration.clone(),
        );
        let node_duration = duration_histogram();
        registry.register(
            "node_invocation_duration_seconds",
            "Wall time of every function's invocations on this node",
            node_duration.clone(),
        );
        let node_queue_wait = duration_histogram();
        registry.register(
            "node_queue_wait_seconds",
            "Time admitted requests of every function waited in their queue (only those that \
             waited)",
            node_queue_wait.clone(),
        );
        let cold_starts = Family::<FunctionLabel, Counter>::default();
        registry.register(
            "cold_starts",
            "Invocations that loaded their function from disk first",
            cold_starts.clone(),
        );
        let in_flight = Family::<FunctionLabel, Gauge>::default();
        registry.register(
            "function_instances_in_flight",
            "Instances of each function running now",
            in_flight.clone(),
        );

        let throttles = Family::<FunctionLabel, Counter>::default();
        registry.register(
            "throttles",
            "Requests refused with 429: over the function's or node's concurrency, queue full or waited too long",
            throttles.clone(),
        );
        let queue_wait: Family<FunctionLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "queue_wait_seconds",
            "Time admitted requests waited in the function's queue (only those that waited), for \
             the functions given to `serve --function-histograms`",
            queue_wait.clone(),
        );
        let instances = Family::<FunctionLabel, Gauge>::default();
        registry.register(
            "function_instances",
            "Instances of each function: running plus kept idle (hot)",
            instances.clone(),
        );

        let node = NodeMetrics::default();
        registry.register(
            "node_throttles",
            "Requests refused with 429 on this node",
            node.throttled.clone(),
        );
        registry.register(
            "unloads_keep_alive",
            "Functions unloaded because their keep-alive window ran out",
            node.unloads_keep_alive.clone(),
        );
        registry.register(
            "unloads_memory",
            "Warm or hot functions, and idle parsed models, unloaded to stay within the memory budget",
            node.unloads_memory.clone(),
        );
        registry.register(
            "prewarms",
            "Functions loaded ahead of a predicted invocation",
            node.prewarms.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "Memory held by loaded functions: mapped code and kept instances",
            node.resident_memory.clone(),
        );
        registry.register(
            "models_resident_bytes",
            "Memory held by parsed wasi:nn models, estimated as their ONNX size",
            node.models_resident.clone(),
        );
        registry.register(
            "compilations",
            "Components compiled by this process",
            node.compilations.clone(),
        );
        registry.register(
            "artifact_cache_hits",
            "Compiled artifacts found on disk instead of compiling",
            node.artifact_cache_hits.clone(),
        );
        registry.register(
            "artifact_recompiles",
            "Compiled artifacts found damaged (checksum mismatch) or unloadable, compiled again",
            node.artifact_recompiles.clone(),
        );
        registry.register(
            "node_invocations",
            "Invocations started on this node",
            node.invocations.clone(),
        );
        registry.register(
            "node_failed_invocations",
            "Invocations on this node that did not end ok",
            node.failed_invocations.clone(),
        );
        registry.register(
            "requests_too_large",
            "Requests refused with 413: a body over the function's limit",
            node.requests_too_large.clone(),
        );
        registry.register(
            "instances_in_flight",
            "Instances running now on this node",
            node.instances_in_flight.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Guest log lines dropped because the log writer fell behind",
            node.log_lines_dropped.clone(),
        );
        registry.register("functions", "Functions deployed", node.functions.clone());

        let ledger = LedgerMetrics {
            pending: Gauge::default(),
            committed: Counter::default(),
            commit_delay: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            failed_commits: Counter::default(),
        };
        registry.register(
            "ledger_pending_records",
            "Usage records waiting to be committed (the ledger's lag)",
            ledger.pending.clone(),
        );
        registry.register(
            "ledger_records",
            "Usage records committed to the ledger",
            ledger.committed.clone(),
        );
        registry.register(
            "ledger_commit_delay_seconds",
            "Time from an invocation's end to its record being durable (oldest record per commit)",
            ledger.commit_delay.clone(),
        );
        registry.register(
            "ledger_failed_commits",
            "Ledger commits that failed and were retried",
            ledger.failed_commits.clone(),
        );

        let events = crate::event_metrics::EventMetrics::register(&mut registry);
        Self {
            events,
            registry,
            invocations,
            duration,
            node_duration,
            node_queue_wait,
            tiers: Mutex::new(BTreeMap::new()),
            function_histograms: FunctionHistograms::None,
            series: Arc::new(SeriesStore::default()),
            cold_starts,
            in_flight,
            throttles,
            queue_wait,
            instances,
            node,
            ledger,
            fleet: None,
        }
    }

    /// The metric handles of one function, created once per deploy.
    pub fn function(&self, name: &str) -> FunctionMetrics {
        let label = FunctionLabel {
            function: name.to_string(),
        };
        let own = self.function_histograms.includes(name);
        let instances = self.instances.get_or_create_owned(&label);
        FunctionMetrics {
            invocations: OUTCOMES.map(|outcome| {
                self.invocations.get_or_create_owned(&OutcomeLabels {
                    function: name.to_string(),
                    outcome: ledger_outcome(outcome).as_str().to_string(),
                })
            }),
            duration: own.then(|| self.duration.get_or_create_owned(&label)),
            node_duration: self.node_duration.clone(),
            node_queue_wait: self.node_queue_wait.clone(),
            series: self.series.function(name, instances.clone()),
            cold_starts: self.cold_starts.get_or_create_owned(&label),
            in_flight: self.in_flight.get_or_create_owned(&label),
            throttled: self.invocations.get_or_create_owned(&OutcomeLabels {
                function: name.to_string(),
                outcome: mayfly_store::Outcome::Throttled.as_str().to_string(),
            }),
            throttles: self.throttles.get_or_create_owned(&label),
            queue_wait: own.then(|| self.queue_wait.get_or_create_owned(&label)),
            tier: self
                .tiers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(name.to_string())
                .or_default()
                .clone(),
            instances,
            node: self.node.clone(),
        }
    }

    /// Stops reporting a deleted function.
    pub fn remove_function(&self, name: &str) {
        let label = FunctionLabel {
            function: name.to_string(),
        };
        for outcome in OUTCOMES {
            self.invocations.remove(&OutcomeLabels {
                function: name.to_string(),
                outcome: ledger_outcome(outcome).as_str().to_string(),
            });
        }
        self.duration.remove(&label);
        self.invocations.remove(&OutcomeLabels {
            function: name.to_string(),
            outcome: mayfly_store::Outcome::Throttled.as_str().to_string(),
        });
        self.cold_starts.remove(&label);
        self.in_flight.remove(&label);
        self.throttles.remove(&label);
        self.queue_wait.remove(&label);
        self.tiers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.instances.remove(&label);
        self.series.remove(name);
    }

    /// Every metric in the OpenMetrics text format (which Prometheus reads).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        // prometheus-client has no state set: written here, before the end.
        let end = text.rfind("# EOF").unwrap_or(text.len());
        let tail = text.split_off(end);
        self.encode_tiers(&mut text)?;
        text.push_str(&tail);
        Ok(text)
    }

    /// `mayfly_function_tier` as an OpenMetrics state set: per function one
    /// series per tier, 1 for the one it is in.
    fn encode_tiers(&self, text: &mut String) -> std::fmt::Result {
        use std::fmt::Write as _;
        let tiers = self.tiers.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(
            text,
            "# HELP mayfly_function_tier Each function's tier: cold (on disk), warm (loaded), hot \
             (loaded, instances kept)."
        )?;
        writeln!(text, "# TYPE mayfly_function_tier stateset")?;
        for (function, tier) in tiers.iter() {
            let tier = tier.load(Ordering::Relaxed);
            for (value, state) in ["cold", "warm", "hot"].into_iter().enumerate() {
                // Function names are validated (letters, digits, `-`, `_`):
                // nothing to escape.
                writeln!(
                    text,
                    "mayfly_function_tier{{function=\"{function}\",mayfly_function_tier=\"{state}\"}} {}",
                    u8::from(tier == value as i64)
                )?;
            }
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One function's metric handles.
#[derive(Clone, Debug)]
pub struct FunctionMetrics {
    invocations: [Counter; OUTCOMES.len()],
    duration: Option<Histogram>,
    node_duration: Histogram,
    node_queue_wait: Histogram,
    series: Arc<FunctionSeries>,
    cold_starts: Counter,
    in_flight: Gauge,
    throttled: Counter,
    throttles: Counter,
    queue_wait: Option<Histogram>,
    tier: Arc<AtomicI64>,
    instances: Gauge,
    node: NodeMetrics,
}

/// Turns one function's invocation reports into usage records and metrics.
pub struct FunctionMeter {
    function: String,
    memory_mb: u32,
    metrics: FunctionMetrics,
    ledger: Arc<Ledger>,
}

impl FunctionMeter {
    /// A meter for a function deployed with `memory_mb` of memory.
    pub fn new(
        function: String,
        memory_mb: u32,
        metrics: FunctionMetrics,
        ledger: Arc<Ledger>,
    ) -> Self {
        Self {
            function,
            memory_mb,
            metrics,
            ledger,
        }
    }
}

impl FunctionMeter {
    /// A request waited `waited` in the queue before it was admitted.
    pub fn queued(&self, waited: Duration) {
        let metrics = &self.metrics;
        metrics.node_queue_wait.observe(waited.as_secs_f64());
        if let Some(own) = &metrics.queue_wait {
            own.observe(waited.as_secs_f64());
        }
    }

    /// A request was refused with 429 after `waited`: it gets a usage
    /// record (outcome `throttled`, nothing billed) and counts in metrics.
    /// `client_request_id` is the correlation id the client sent, if any.
    pub fn throttled(
        &self,
        request_id: &str,
        client_request_id: Option<&str>,
        version: u64,
        trigger: &str,
        waited: Duration,
    ) {
        let metrics = &self.metrics;
        metrics.throttled.inc();
        metrics.throttles.inc();
        metrics.node.throttled.inc();
        metrics
            .series
            .record(crate::series::THROTTLED, 0, 0, self.memory_mb, 0);
        let started_at = SystemTime::now().checked_sub(waited).unwrap_or(UNIX_EPOCH);
        self.ledger.record(UsageRecord {
            request_id: request_id.to_string(),
            client_request_id: client_request_id.map(str::to_string),
            function: self.function.clone(),
            version,
            trigger: trigger.to_string(),
            start_ms: epoch_ms(started_at),
            wall_us: u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
            cpu_us: 0,
            peak_memory_bytes: 0,
            memory_limit_mb: self.memory_mb,
            billed_ms: 0,
            outcome: mayfly_store::Outcome::Throttled,
            cold: false,
            init_us: 0,
            status: Some(429),
        });
    }

    /// Cold starts and throttled requests of the function since start.
    pub fn counts(&self) -> (u64, u64) {
        (self.metrics.cold_starts.get(), self.metrics.throttles.get())
    }

    /// Sets the function's tier gauge and its instance count.
    pub fn set_tiers(&self, tier: i64, instances: i64) {
        self.metrics.tier.store(tier, Ordering::Relaxed);
        self.metrics.instances.set(instances);
    }
}

fn epoch_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl ReportSink for FunctionMeter {
    fn started(&self, labels: &RequestLabels) {
        let metrics = &self.metrics;
        metrics.node.invocations.inc();
        metrics.in_flight.inc();
        if labels.cold_start {
            metrics.cold_starts.inc();
            metrics.series.cold_start();
        }
    }

    fn finished(&self, labels: &RequestLabels, report: InvocationReport) {
        self.finished_for(labels, report, None);
    }
}

impl FunctionMeter {
    /// Meters a finished invocation whose client sent the correlation id
    /// `client_request_id` (kept in the usage record beside the node's id).
    pub fn finished_for(
        &self,
        labels: &RequestLabels,
        report: InvocationReport,
        client_request_id: Option<&str>,
    ) {
        let metrics = &self.metrics;
        metrics.in_flight.dec();
        metrics.invocations[outcome_index(report.outcome)].inc();
        // A client that left is not the function failing.
        if !matches!(report.outcome, Outcome::Ok | Outcome::ClientClosed) {
            metrics.node.failed_invocations.inc();
        }
        let seconds = report.wall.as_secs_f64();
        metrics.node_duration.observe(seconds);
        if let Some(own) = &metrics.duration {
            own.observe(seconds);
        }

        // A cold start's load and first instantiation are its init time,
        // apart from the handler's, as Lambda's Init Duration is.
        let handler = report.wall.saturating_sub(report.instantiate);
        let init = labels.load + report.instantiate;
        let wall_us = u64::try_from(handler.as_micros()).unwrap_or(u64::MAX);
        let init_us = u64::try_from(init.as_micros()).unwrap_or(u64::MAX);
        let billed = billed_ms(wall_us.saturating_add(init_us));
        let cpu_us = u64::try_from(report.cpu.as_micros()).unwrap_or(u64::MAX);
        metrics.series.record(
            outcome_index(report.outcome),
            wall_us.saturating_add(init_us),
            billed,
            self.memory_mb,
            cpu_us,
        );
        self.ledger.record(UsageRecord {
            request_id: labels.request_id.clone(),
            client_request_id: client_request_id.map(str::to_string),
            function: labels.function.clone(),
            version: labels.version,
            trigger: labels.trigger.to_string(),
            start_ms: epoch_ms(report.started_at),
            wall_us,
            cpu_us,
            peak_memory_bytes: report.peak_memory_bytes,
            memory_limit_mb: self.memory_mb,
            billed_ms: billed,
            outcome: ledger_outcome(report.outcome),
            cold: labels.cold_start,
            init_us,
            status: report.status,
        });
    }
}
