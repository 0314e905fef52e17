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
    /// At an edge node (its server is a leaf site's): the link from its
    /// site to the hub, as this node's own probe sees it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubLink>,
}

/// An edge node's link to the hub, from a probe of the hub's JetStream
/// every second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubLink {
    /// The site: its server's JetStream domain.
    pub site: String,
    /// The hub's JetStream domain.
    pub hub_domain: String,
    /// Whether the hub answered the last probe.
    pub up: bool,
    /// Since when it is up (or down), in ms since the Unix epoch.
    pub since_ms: i64,
}

/// One edge node as the fleet status shows it: its site, its last
/// heartbeat and its link to the hub as it reported them. The record
/// outlives a cut (unlike the membership list's), so a site cut off
/// from the hub is shown as stale since its last contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteNode {
    /// The site: its server's JetStream domain.
    pub site: String,
    /// The node's last heartbeat reaching the hub (`at_ms`: when).
    pub node: crate::NodeInfo,
    /// The node's link to the hub when it sent the heartbeat.
    pub link: HubLink,
    /// Usage records the node had not yet handed to the fleet's ledger.
    pub usage_backlog: u64,
    /// Whether the heartbeat is too old to be current: the site is cut
    /// off (or the node stopped) since `node.at_ms`. Set by the reader.
    #[serde(default)]
    pub stale: bool,
}

/// A back-end's link to the fleet.
#[async_trait::async_trait]
pub trait FleetLink: Send + Sync {
    /// The link's state now.
    async fn status(&self) -> Result<FleetLinkStatus>;

    /// Every edge node of the fleet with its site, last heartbeat and
    /// link, sorted by site then node; none in a fleet without leaf
    /// sites.
    async fn sites(&self) -> Result<Vec<SiteNode>> {
        Ok(Vec::new())
    }
}
