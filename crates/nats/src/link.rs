//! This node's link to the fleet as `mayfly status` shows it: the NATS
//! connection and what waits to be published.

use std::sync::Arc;

use mayfly_store::{FleetLink, FleetLinkStatus, LogFeed as _, Result};

use crate::{Fleet, NatsLogFeed, NatsUsage};

/// The [`FleetLink`] of a node on NATS.
pub struct NatsLink {
    fleet: Fleet,
    usage: Arc<NatsUsage>,
    logs: Arc<NatsLogFeed>,
}

impl NatsLink {
    /// The link of the node connected through `fleet`, whose usage ledger
    /// and log feed are `usage` and `logs`.
    pub fn new(fleet: Fleet, usage: Arc<NatsUsage>, logs: Arc<NatsLogFeed>) -> Self {
        Self { fleet, usage, logs }
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
        })
    }
}
