//! Node membership: which nodes serve, what they carry, what they run.
//!
//! Every node publishes a heartbeat ([`NodeInfo`]) every
//! [`Membership::interval`]; a node whose heartbeats stop drops out of
//! [`Membership::members`] within three intervals. A single node (the
//! embedded back-end, [`SingleNode`]) is a fleet of one: it lists itself.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Result;

/// One node as its last heartbeat described it: what `mayfly node list`
/// and a rollout check read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's name in the fleet (`--node-name`).
    pub name: String,
    /// Its labels (`--labels region=eu,site=fra1`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The Mayfly version it runs.
    #[serde(default)]
    pub mayfly_version: String,
    /// When it started, in ms since the Unix epoch.
    #[serde(default)]
    pub started_ms: i64,
    /// When it sent this heartbeat, in ms since the Unix epoch.
    pub at_ms: i64,
    /// Invocations running on it.
    #[serde(default)]
    pub in_flight: u64,
    /// Memory promised to running invocations and held by warm functions, MB.
    #[serde(default)]
    pub memory_used_mb: u64,
    /// Its memory budget, MB.
    #[serde(default)]
    pub memory_budget_mb: u64,
    /// The version of each function it serves on the `live` alias.
    #[serde(default)]
    pub functions: BTreeMap<String, u64>,
    /// Where its public gateway listens, as it sees it.
    #[serde(default)]
    pub gateway: String,
}

/// The fleet's membership list.
#[async_trait::async_trait]
pub trait Membership: Send + Sync {
    /// Publishes this node's heartbeat (replacing its previous one).
    async fn heartbeat(&self, node: &NodeInfo) -> Result<()>;

    /// Every node whose heartbeat is recent, sorted by name.
    async fn members(&self) -> Result<Vec<NodeInfo>>;

    /// Removes this node from the list at once (a clean shutdown), instead
    /// of letting its heartbeat expire.
    async fn leave(&self, name: &str) -> Result<()>;

    /// How often a node sends its heartbeat.
    fn interval(&self) -> Duration;
}

/// The membership of a node on its own: itself, as last reported.
#[derive(Debug, Default)]
pub struct SingleNode {
    last: Mutex<Option<NodeInfo>>,
}

#[async_trait::async_trait]
impl Membership for SingleNode {
    async fn heartbeat(&self, node: &NodeInfo) -> Result<()> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(node.clone());
        Ok(())
    }

    async fn members(&self) -> Result<Vec<NodeInfo>> {
        Ok(self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect())
    }

    async fn leave(&self, name: &str) -> Result<()> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref().is_some_and(|node| node.name == name) {
            *last = None;
        }
        Ok(())
    }

    fn interval(&self) -> Duration {
        // Nothing expires in a fleet of one; this only paces the status.
        Duration::from_secs(1)
    }
}
