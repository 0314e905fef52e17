//! What `mayfly status` shows: the node's counters and each function's
//! place in the tiers.

use mayfly_store::FleetLinkStatus;
use serde::Serialize;

use crate::admission::Admission;
use crate::catalog::Catalog;
use crate::tiers::TierName;

/// A snapshot of the node's state for `mayfly status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Mayfly version.
    pub version: &'static str,
    /// Seconds since the node started.
    pub uptime_seconds: u64,
    /// Deployed functions.
    pub functions: usize,
    /// Components compiled by this process.
    pub compilations: u64,
    /// Times a compiled artifact was found on disk instead of compiling.
    pub artifact_cache_hits: u64,
    /// Invocations served since start.
    pub invocations: u64,
    /// Invocations that ended without a response from the guest.
    pub failed_invocations: u64,
    /// Requests refused with 413 because their body was over the function's
    /// limit (before their guest ran, or while a streaming one read it).
    pub requests_too_large: u64,
    /// Instances running now.
    pub instances_in_flight: usize,
    /// Idle instances kept by hot functions.
    pub instances_kept: usize,
    /// Requests refused with 429 since start.
    pub throttled: u64,
    /// Keep-alive policy.
    pub keep_alive_policy: String,
    /// Memory promised to running invocations, in MB.
    pub memory_in_use_mb: u64,
    /// Memory held by warm and hot functions (code and kept instances), in MB.
    pub memory_resident_mb: u64,
    /// The node's memory budget, in MB.
    pub memory_budget_mb: u64,
    /// Guest log lines dropped because the log writer fell behind.
    pub log_lines_dropped: u64,
    /// Usage records committed to the ledger since start.
    pub ledger_records: u64,
    /// Usage records waiting to be committed.
    pub ledger_pending: i64,
    /// The node's data directory.
    pub data_dir: String,
    /// Largest component this node accepts for deploy, in bytes (`mayfly
    /// serve --max-component-mb`), so a client can check before uploading.
    pub max_component_bytes: usize,
    /// Each function's tier and instances.
    pub scaling: Vec<FunctionScalingStatus>,
    /// In a fleet: the link to it (NATS connection, usage not yet
    /// published). Absent on a node on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetLinkStatus>,
}

/// One function's place in the tiers, for `mayfly status`.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionScalingStatus {
    /// Function name.
    pub function: String,
    /// Cold, warm or hot.
    pub tier: TierName,
    /// Invocations running.
    pub running: u32,
    /// Idle kept instances (hot functions).
    pub kept: usize,
    /// Requests waiting for a slot.
    pub queued: u32,
    /// Seconds since the function's last invocation ended (absent while
    /// running).
    pub idle_seconds: Option<f64>,
    /// Requests that had to load the function first, since the node started.
    pub cold_starts: u64,
    /// Requests refused with 429, since the node started.
    pub throttled: u64,
}

/// Each function's tier, instances and queue.
pub(crate) fn scaling_status(
    catalog: &Catalog,
    admission: &Admission,
) -> Vec<FunctionScalingStatus> {
    let mut functions: Vec<FunctionScalingStatus> = catalog
        .by_name
        .values()
        .map(|served| {
            let deployed = &served.live.deployed;
            let usage = admission.usage(&deployed.name);
            let (cold_starts, throttled) = deployed.meter.counts();
            FunctionScalingStatus {
                function: deployed.name.clone(),
                tier: deployed.tier.name(),
                running: usage.running,
                kept: deployed.tier.get().map_or(0, |f| f.kept_instances()),
                queued: usage.queued,
                idle_seconds: deployed.activity.idle_for().map(|d| d.as_secs_f64()),
                cold_starts,
                throttled,
            }
        })
        .collect();
    functions.sort_by(|a, b| a.function.cmp(&b.function));
    functions
}

/// Memory held by loaded functions: their mapped code and the linear
/// memory of their kept instances.
pub(crate) fn resident_memory(catalog: &Catalog) -> u64 {
    catalog
        .by_name
        .values()
        .flat_map(|served| served.versions())
        .filter_map(|deployed| deployed.tier.get())
        .map(|function| function.resident_bytes())
        .sum()
}
