//! The bundle of every store a node needs, as trait objects: what the
//! platform is handed, whichever back-end holds the state.

use std::path::Path;
use std::sync::Arc;

use crate::{
    AuthStore, BlobStore, EventQueue, FleetLink, Forwarder, KvStore, LocalLogs, LogFeed, LogStore,
    Membership, NoForwarding, ObjectStore, Registry, Result, SecretStore, SingleNode, TriggerStore,
    UsageStore,
};

/// One handle per contract. The embedded back-end ([`Stores::sqlite`]) keeps
/// them in one data directory; a cluster back-end builds the same bundle
/// from its own connections. The event handles (`kv`, `objects`, `queues`,
/// `triggers`) are one store seen through four contracts: a write to a
/// bucket stores the events it causes in the inboxes `queues` hands out.
#[derive(Clone)]
pub struct Stores {
    /// Functions, versions, aliases.
    pub registry: Arc<dyn Registry>,
    /// Guest log lines.
    pub logs: Arc<dyn LogStore>,
    /// Components and compiled artifacts.
    pub blobs: Arc<dyn BlobStore>,
    /// The usage ledger.
    pub usage: Arc<dyn UsageStore>,
    /// KV buckets.
    pub kv: Arc<dyn KvStore>,
    /// Object buckets.
    pub objects: Arc<dyn ObjectStore>,
    /// Named queues, function inboxes and dead letters.
    pub queues: Arc<dyn EventQueue>,
    /// Triggers.
    pub triggers: Arc<dyn TriggerStore>,
    /// Admin API tokens and the audit log.
    pub auth: Arc<dyn AuthStore>,
    /// Sealed secrets.
    pub secrets: Arc<dyn SecretStore>,
    /// The nodes serving (a node on its own lists itself; a fleet
    /// back-end replaces it).
    pub members: Arc<dyn Membership>,
    /// New guest log lines of every node, for followers (a node on its own
    /// has no feed: [`LocalLogs`]; a fleet back-end replaces it).
    pub log_feed: Arc<dyn LogFeed>,
    /// Carries requests for functions placed on other nodes to a node
    /// that runs them (a node on its own runs every function:
    /// [`NoForwarding`]; a fleet back-end replaces it).
    pub forward: Arc<dyn Forwarder>,
    /// The link to the fleet, for `mayfly status`: `None` for a node on
    /// its own.
    pub fleet: Option<Arc<dyn FleetLink>>,
    /// Batch jobs and their items: `None` for a back-end without a job
    /// store (the node then refuses job requests, saying so).
    pub jobs: Option<Arc<dyn crate::JobStore>>,
    /// Pipelines and their runs: `None` beside no job store.
    pub pipelines: Option<Arc<dyn crate::PipelineStore>>,
    /// The data directory this node holds, for a back-end kept on local
    /// disk: its lock lives as long as any copy of the bundle.
    local: Option<Arc<dyn LocalDir>>,
}

/// A data directory a back-end keeps on this machine and holds (locks)
/// while its stores are open.
pub trait LocalDir: Send + Sync {
    /// The directory.
    fn path(&self) -> &Path;
    /// Makes everything in it private to the node's user.
    fn restrict_permissions(&self) -> Result<()>;
}

impl Stores {
    /// A bundle of the given handles; `local` is the data directory the
    /// back-end holds, if it keeps its state on this machine.
    /// This is how a back-end outside this crate (a cluster one) hands the
    /// platform its stores.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        registry: Arc<dyn Registry>,
        logs: Arc<dyn LogStore>,
        blobs: Arc<dyn BlobStore>,
        usage: Arc<dyn UsageStore>,
        events: EventHandles,
        auth: Arc<dyn AuthStore>,
        secrets: Arc<dyn SecretStore>,
        local: Option<Arc<dyn LocalDir>>,
    ) -> Self {
        Self {
            registry,
            logs,
            blobs,
            usage,
            kv: events.kv,
            objects: events.objects,
            queues: events.queues,
            triggers: events.triggers,
            auth,
            secrets,
            members: Arc::new(SingleNode::default()),
            log_feed: Arc::new(LocalLogs),
            forward: Arc::new(NoForwarding),
            fleet: None,
            jobs: None,
            pipelines: None,
            local,
        }
    }

    /// The local data directory the stores live in, if any.
    pub fn data_dir(&self) -> Option<&Path> {
        self.local.as_deref().map(LocalDir::path)
    }

    /// Makes every file and folder of the local data directory private to
    /// the node's user (see [`crate::DataDir::restrict_permissions`]); nothing for
    /// a back-end without one. Called once the node has written its own
    /// files there too (keys, the admin token).
    pub fn restrict_permissions(&self) -> Result<()> {
        match &self.local {
            Some(dir) => dir.restrict_permissions(),
            None => Ok(()),
        }
    }
}

/// The four faces of one event store.
pub struct EventHandles {
    /// KV buckets.
    pub kv: Arc<dyn KvStore>,
    /// Object buckets.
    pub objects: Arc<dyn ObjectStore>,
    /// Queues, inboxes and dead letters.
    pub queues: Arc<dyn EventQueue>,
    /// Triggers.
    pub triggers: Arc<dyn TriggerStore>,
}

impl EventHandles {
    /// The four handles of one store implementing every event contract.
    pub fn of<T>(store: Arc<T>) -> Self
    where
        T: KvStore + ObjectStore + EventQueue + TriggerStore + 'static,
    {
        Self {
            kv: store.clone(),
            objects: store.clone(),
            queues: store.clone(),
            triggers: store,
        }
    }
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("data_dir", &self.data_dir())
            .finish_non_exhaustive()
    }
}
