//! This node's heartbeat in the fleet's membership list: every interval
//! it reports its labels, load and the `live` version it serves of each
//! function, so `mayfly node list` shows the fleet and a deploy can wait
//! until every node serves the new version.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use mayfly_runtime::Runtime;
use mayfly_store::{Membership, NodeInfo};
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::clock::now_ms;
use crate::invoker::Invoker;

/// What the heartbeat reads, each a narrow handle of the node's parts.
pub(crate) struct Heartbeat {
    pub(crate) members: Arc<dyn Membership>,
    pub(crate) invoker: Arc<Invoker>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) started_ms: i64,
    /// The gateway's address, once it listens.
    pub(crate) gateway: Arc<OnceLock<String>>,
}

impl Heartbeat {
    /// This node as it is now.
    pub(crate) fn report(&self) -> NodeInfo {
        let catalog = self.invoker.catalog();
        let functions = catalog
            .by_name
            .values()
            .map(|served| (served.name.clone(), served.live.deployed.version))
            .collect();
        let used = self.admission.memory_in_use() + crate::status::resident_memory(&catalog);
        NodeInfo {
            name: self.name.clone(),
            labels: self.labels.clone(),
            mayfly_version: env!("CARGO_PKG_VERSION").to_string(),
            started_ms: self.started_ms,
            at_ms: now_ms(),
            in_flight: self.runtime.in_flight() as u64,
            memory_used_mb: used >> 20,
            memory_budget_mb: self.admission.memory_budget() >> 20,
            functions,
            gateway: self.gateway.get().cloned().unwrap_or_default(),
        }
    }

    /// Sends a heartbeat every interval until `stop`. A failed one is
    /// logged when the state changes (not every second while the fleet is
    /// unreachable); the next interval tries again.
    pub(crate) fn spawn(self, stop: CancellationToken) {
        tokio::spawn(async move {
            // `Platform::start` records the gateway's address only once the
            // node is open (its event workers started, which on a fleet
            // back-end takes a few round trips): the first heartbeat waits
            // for it, up to one interval, so the node is not listed
            // without an address other nodes can reach.
            let deadline = tokio::time::Instant::now() + self.members.interval();
            while self.gateway.get().is_none() && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
                }
            }
            let mut ticker = tokio::time::interval(self.members.interval());
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                match self.members.heartbeat(&self.report()).await {
                    Ok(()) if failing => {
                        tracing::info!("heartbeats reach the fleet again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(error) if !failing => {
                        tracing::warn!("cannot send this node's heartbeat: {error}");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        });
    }
}
