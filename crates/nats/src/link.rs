//! This node's link to the fleet as `mayfly status` shows it: the NATS
//! connection, what waits to be published, and at an edge node the link
//! from its site to the hub; and the fleet's leaf sites.

use std::sync::Arc;

use mayfly_store::{FleetLink, FleetLinkStatus, LogFeed as _, Result, SiteNode};

use crate::sites::Sites;
use crate::{Fleet, NatsLogFeed, NatsUsage};

/// The [`FleetLink`] of a node on NATS.
pub struct NatsLink {
    fleet: Fleet,
    usage: Arc<NatsUsage>,
    logs: Arc<NatsLogFeed>,
    sites: Arc<Sites>,
}

impl NatsLink {
    /// The link of the node connected through `fleet`, whose usage ledger
    /// and log feed are `usage` and `logs`, reading the fleet's `sites`.
    pub(crate) fn new(
        fleet: Fleet,
        usage: Arc<NatsUsage>,
        logs: Arc<NatsLogFeed>,
        sites: Arc<Sites>,
    ) -> Self {
        Self {
            fleet,
            usage,
            logs,
            sites,
        }
    }
}

#[async_trait::async_trait]
impl FleetLink for NatsLink {
    async fn status(&self) -> Result<FleetLinkStatus> {
        Ok(FleetLinkStatus {
            connected: self.fleet.is_connected(),
            disconnected_since_ms: self.fleet.disconnected_since_ms(),
            servers: self.fleet.urls().to_string(),
            usage_backlog: self.usage.backlog().await?,
            log_lines_unpublished: self.logs.dropped(),
            hub: self.sites.hub_link(),
        })
    }

    async fn sites(&self) -> Result<Vec<SiteNode>> {
        self.sites.list().await
    }
}
