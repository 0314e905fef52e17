//! The dispatcher's Prometheus metrics: deliveries by result, event
//! latency, and queue depths.

use mayfly_store::QueueRef;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    function: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabel {
    function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    /// A named queue, or `@<function>` for a function's inbox.
    queue: String,
}

/// Delivery metrics.
#[derive(Clone)]
pub(crate) struct EventMetrics {
    deliveries: Family<DeliveryLabels, Counter>,
    latency: Family<FunctionLabel, Histogram, fn() -> Histogram>,
    depth: Family<QueueLabel, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~4.6 h in powers of two: from an idle queue to a long
    // backlog or a retry schedule.
    Histogram::new(exponential_buckets(0.0005, 2.0, 25))
}

impl EventMetrics {
    /// Registers the metrics in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            deliveries: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            depth: Family::default(),
        };
        registry.register(
            "event_queue_depth",
            "Events and messages stored per queue (`@<function>`: a function's inbox)",
            metrics.depth.clone(),
        );
        registry.register(
            "event_deliveries",
            "Event delivery attempts by result (delivered, retried, dead, throttled, postponed)",
            metrics.deliveries.clone(),
        );
        registry.register(
            "event_latency_seconds",
            "From an event being stored to its delivery being acknowledged",
            metrics.latency.clone(),
        );
        metrics
    }

    /// Sets the depth gauges from a fresh count (queues now empty drop out).
    pub(crate) fn set_depths(&self, depths: &[(QueueRef, u64)]) {
        self.depth.clear();
        for (queue, depth) in depths {
            let queue = match queue {
                QueueRef::Named(name) => name.clone(),
                QueueRef::Inbox(function) => format!("@{function}"),
            };
            self.depth
                .get_or_create(&QueueLabel { queue })
                .set(i64::try_from(*depth).unwrap_or(i64::MAX));
        }
    }

    /// Counts one delivery attempt of `function` by its result.
    pub(crate) fn count(&self, function: &str, result: &'static str) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                function: function.to_string(),
                result,
            })
            .inc();
    }

    /// Records how long an acknowledged event of `function` waited.
    pub(crate) fn observe_latency(&self, function: &str, seconds: f64) {
        self.latency
            .get_or_create(&FunctionLabel {
                function: function.to_string(),
            })
            .observe(seconds);
    }
}
