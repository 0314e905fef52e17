//! The autoscaler: once per tick it applies every function's keep-alive
//! windows (unload what expired, pre-warm what the policy expects soon,
//! shrink hot pools), then the memory budget (evict the least valuable
//! idle versions and parsed models), and refreshes the tier metrics.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mayfly_runtime::NnHost;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::artifacts::Artifacts;
use crate::catalog::{Catalog, Deployed};
use crate::metering::NodeMetrics;
use crate::tiers::eviction_order;

/// Scales the catalog's functions between the tiers.
pub(crate) struct Autoscaler {
    catalog: Arc<ArcSwap<Catalog>>,
    /// Loads what is pre-warmed.
    artifacts: Arc<Artifacts>,
    /// The memory budget and what running invocations hold of it.
    admission: Arc<Admission>,
    /// Parsed wasi:nn models, which share the memory budget with warm
    /// functions.
    nn: Arc<NnHost>,
    metrics: NodeMetrics,
}

/// Something idle in memory the budget can take back.
enum Evictable {
    Version(Arc<Deployed>),
    /// A parsed model no instance holds, by digest.
    Model(String),
}

impl Autoscaler {
    /// An autoscaler over `catalog` and the parsed models of `nn`.
    pub(crate) fn new(
        catalog: Arc<ArcSwap<Catalog>>,
        artifacts: Arc<Artifacts>,
        admission: Arc<Admission>,
        nn: Arc<NnHost>,
        metrics: NodeMetrics,
    ) -> Self {
        Self {
            catalog,
            artifacts,
            admission,
            nn,
            metrics,
        }
    }

    /// Runs one pass per `tick` until `stop` is cancelled.
    pub(crate) fn spawn(self: Arc<Self>, tick: Duration, stop: CancellationToken) {
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    () = stop.cancelled() => return,
                }
                // Dropping kept instances and unmapping code are syscalls that
                // add up for a large pool: keep them off the async workers.
                let autoscaler = self.clone();
                let _ = tokio::task::spawn_blocking(move || autoscaler.pass()).await;
            }
        });
    }

    /// One pass of the autoscaler: applies every function's keep-alive
    /// windows (unload, pre-warm, shrink hot pools), then the memory
    /// budget, and refreshes the tier metrics.
    pub(crate) fn pass(self: &Arc<Self>) {
        let catalog = self.catalog.load_full();
        let mut resident = 0u64;
        let mut evictable = Vec::new();
        for (served, deployed) in catalog
            .by_name
            .values()
            .flat_map(|served| served.versions().into_iter().map(move |d| (served, d)))
        {
            let activity = &deployed.activity;
            // One snapshot of the activity for every decision below.
            let windows = activity.windows();
            let idle = activity.idle_for();
            let warm_now = idle.is_none_or(|idle| windows.is_warm_after(idle));
            let loaded = deployed.tier.get();
            // Only what live serves is pre-warmed: a named alias's version
            // loads on its first request.
            let serves_live = served
                .live
                .versions()
                .any(|v| v.version == deployed.version);
            if !warm_now {
                if deployed.tier.unload() {
                    self.metrics.unloads_keep_alive.inc();
                }
            } else if windows.prewarm > Duration::ZERO && loaded.is_none() && serves_live {
                // The policy expects the next call soon: load it before.
                self.prewarm(deployed.clone());
            }
            let mut kept = 0;
            if let Some(function) = loaded.filter(|_| warm_now) {
                function.reap_kept(windows.prewarm.saturating_add(windows.keep_alive));
                kept = function.kept_instances();
                let bytes = function.resident_bytes();
                resident += bytes;
                if let Some(idle) = idle {
                    evictable.push((
                        eviction_order(idle, bytes),
                        bytes,
                        Evictable::Version(deployed.clone()),
                    ));
                }
            }
            if Arc::ptr_eq(deployed, &served.live.deployed) {
                deployed.meter.set_tiers(
                    deployed.tier.name().gauge(),
                    i64::from(activity.running()) + kept as i64,
                );
            }
        }

        // Parsed models are weighed like warm versions: a model no instance
        // holds is idle since its last load.
        let (models_resident, idle_models) = self.nn.resident_models();
        resident += models_resident;
        let mut models_left = models_resident;
        evictable.extend(idle_models.into_iter().map(|model| {
            (
                eviction_order(model.idle, model.bytes),
                model.bytes,
                Evictable::Model(model.digest),
            )
        }));

        // Under memory pressure, the least valuable idle entries go first.
        let budget = self.admission.memory_budget();
        let mut used = resident + self.admission.memory_in_use();
        if used > budget {
            evictable.sort_by_key(|(order, _, _)| *order);
            for (_, bytes, entry) in evictable {
                if used <= budget {
                    break;
                }
                let freed = match entry {
                    Evictable::Version(deployed) => deployed.tier.unload(),
                    Evictable::Model(digest) => {
                        tracing::info!(model = %digest, bytes, "parsed model evicted: memory budget");
                        self.nn.evict(&digest);
                        models_left = models_left.saturating_sub(bytes);
                        true
                    }
                };
                if freed {
                    self.metrics.unloads_memory.inc();
                    used = used.saturating_sub(bytes);
                }
            }
        }
        self.metrics
            .resident_memory
            .set(i64::try_from(resident - models_resident).unwrap_or(i64::MAX));
        self.metrics
            .models_resident
            .set(i64::try_from(models_left).unwrap_or(i64::MAX));
    }

    /// Loads a cold function ahead of its predicted next invocation.
    fn prewarm(self: &Arc<Self>, deployed: Arc<Deployed>) {
        let autoscaler = self.clone();
        tokio::spawn(async move {
            let loaded = deployed
                .tier
                .get_or_load(async || {
                    autoscaler
                        .artifacts
                        .load(&deployed.artifact, deployed.scaling.reuse)
                        .await
                })
                .await;
            match loaded {
                Ok((_, true)) => {
                    autoscaler.metrics.prewarms.inc();
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(function = %deployed.name, "pre-warm failed: {error}");
                }
            }
        });
    }
}
