//! The state of a node's link to the rest of its fleet, for `mayfly status`.
//!
//! Only a back-end that reaches other nodes over a network has one; a node
//! on its own has none ([`crate::Stores::fleet`] is `None`), and its status
//! shows nothing of the kind.

use serde::{Deserialize, Serialize};

use crate::Result;

/// How this node's link to the fleet is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetLinkStatus {
    /// Whether the node is connected to one of the fleet's servers now.
    pub connected: bool,
    /// While disconnected: since when, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnected_since_ms: Option<i64>,
    /// The servers the node connects through, credentials removed.
    pub servers: String,
    /// Usage records stored on this node and not yet published to the
    /// fleet's ledger (they are published once the link is back).
    pub usage_backlog: u64,
    /// Log lines the live feed dropped since the node started.
    pub log_lines_unpublished: u64,
}

/// A back-end's link to the fleet.
#[async_trait::async_trait]
pub trait FleetLink: Send + Sync {
    /// The link's state now.
    async fn status(&self) -> Result<FleetLinkStatus>;
}
