//! Mayfly's state layer: the contracts the node keeps its state behind, and
//! the embedded back-end that implements them.
//!
//! One file per contract, each with its records: [`Registry`]
//! (`registry.rs`), [`LogStore`] (`logs.rs`), [`BlobStore`] (`blobs.rs`),
//! [`UsageStore`] (`usage.rs`), the event stores [`KvStore`],
//! [`ObjectStore`], [`EventQueue`] and [`TriggerStore`] (`events/`, with the
//! event semantics every back-end shares: [`EventKind`], CloudEvent
//! building and trigger matching), [`AuthStore`] (`auth.rs`) and
//! [`SecretStore`] (`secrets.rs`), and the fleet's [`Membership`]
//! (`members.rs`), with the live log feed ([`LogFeed`]) and the link
//! to the fleet ([`FleetLink`], `link.rs`). [`Stores`] bundles one handle of each;
//! the platform receives it and names no back-end.
//!
//! The contracts are async traits (`async-trait`, so they stay usable as
//! `Arc<dyn …>`): a caller awaits a store and never blocks its thread, and
//! a network back-end needs no thread per call. Every method that may do
//! I/O is `async`; only the `watch()` methods, which subscribe to an
//! in-memory feed, are not.
//!
//! The embedded back-end (`sqlite/`, built by [`Stores::sqlite`]) keeps
//! everything in one data directory: SQLite databases and blob files. Its
//! code is synchronous and offloads itself: each call runs on tokio's
//! blocking pool, so it must be awaited inside a tokio runtime. A cluster
//! back-end implements the same traits and passes the same [`conformance`]
//! suite.

mod auth;
mod blobs;
mod changes;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod events;
mod forward;
mod jobs;
mod link;
mod logs;
mod members;
mod pipelines;
mod registry;
mod secrets;
pub mod sqlite;
mod stores;
mod usage;

pub use auth::{AuditEntry, AuthStore, TokenRecord};
pub use blobs::{BlobKind, BlobStore, Digest};
pub use changes::{ChangeFeed, RegistryChange, SecretChange, TokenChange, TriggerChange};
pub use events::{
    AckOutcome, BucketChange, BucketStats, CloudEvent, DeadLetter, Delivery, EventKind, EventQueue,
    InboxEvent, KvCondition, KvEntry, KvKey, KvStore, ObjectChange, ObjectMeta, ObjectStore,
    QueueRef, QueueStats, RetryPolicy, Settlement, Trigger, TriggerSource, TriggerSpec,
    TriggerStore, WorkHint, new_event_id,
};
pub use forward::{
    ForwardError, ForwardHandler, ForwardedRequest, ForwardedResponse, Forwarder, NoForwarding,
    check_label, labels_text, placement_matches,
};
pub use jobs::{
    ItemCounts, ItemLogEntry, ItemResult, ItemState, Job, JobItem, JobSpec, JobState, JobStore,
    MaxFailures, NewItem, PipelineStep,
};
pub use link::{FleetLink, FleetLinkStatus, HubLink, SiteNode};
pub use logs::{FeedLine, LocalLogs, LogFeed, LogRecord, LogStore, LogSubscription, NewLogLine};
pub use members::{Membership, NodeInfo, SingleNode};
pub use pipelines::{
    Pipeline, PipelineRun, PipelineSpec, PipelineStore, RunCause, RunStart, StepSpec,
};
pub use registry::{
    ALIAS_MOVES_KEPT, AliasMove, AliasRecord, CanaryPolicy, CanaryRecord, Expected, FunctionConfig,
    FunctionLimits, FunctionRecord, FunctionScaling, Grants, LIVE_ALIAS, MoveCause, Registry,
    VersionRecord, WEIGHT_SCALE_BP, refuse_if_aliased,
};
pub use secrets::{ResealFn, SealFn, Sealed, SealedSecret, SecretMeta, SecretPut, SecretStore};
pub use sqlite::{BlobDir, BlobWriter, DataDir, StagedBlob, is_disk_full};
pub use sqlite::{EmbeddedModels, ModelRecord};
pub use stores::{EventHandles, LocalDir, Stores};
pub use usage::{
    GroupBy, Outcome, OutcomeCounts, StoredUsage, UsageQuery, UsageRecord, UsageRow, UsageStore,
    billed_ms,
};

/// What can go wrong in the state layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The named function does not exist.
    #[error("no function named `{0}`")]
    FunctionNotFound(String),
    /// A route is already served by another function.
    #[error("route `{route}` is already served by function `{owner}`")]
    RouteTaken {
        /// The contested route.
        route: String,
        /// The function that serves it now.
        owner: String,
    },
    /// The named version of a function does not exist.
    #[error("function `{function}` has no version {version}: see `mayfly versions {function}`")]
    VersionNotFound {
        /// Function name.
        function: String,
        /// The missing version.
        version: u64,
    },
    /// The change is refused because of the state it would change (an
    /// aliased version, nothing to roll back to); the message says why.
    #[error("{0}")]
    Conflict(String),
    /// A compare-and-swap write of the registry was refused: what it
    /// expected changed since the caller read it (another deploy or alias
    /// move landed first). Read again and retry.
    #[error("{0}")]
    Stale(String),
    /// A compare-and-swap condition did not hold.
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// The back-end's database failed (its own error is the source, so
    /// [`StoreError::is_disk_full`] can look into it), or a back-end's
    /// call did not finish (its task panicked or its runtime shut down).
    #[error("database error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store that holds the data is out of reach for now (an edge
    /// node's hub, or another leaf site, behind a link that is down); the
    /// message names it. Trying again later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A file operation failed.
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The data directory is held by another process; the message names it
    /// and says what to do.
    #[error("{0}")]
    InUse(String),
    /// A store could not be opened: `context` says which, `source` why.
    #[error("{context}")]
    Open {
        /// Which store, e.g. `cannot open the usage ledger in /var/lib/mayfly`.
        context: String,
        /// What failed.
        #[source]
        source: Box<StoreError>,
    },
}

impl StoreError {
    /// This error with `context` saying what was being done.
    pub fn context(self, context: impl Into<String>) -> Self {
        Self::Open {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// Whether this failed because the disk (or the user's quota) is full:
    /// a condition that ends by itself once space is freed.
    pub fn is_disk_full(&self) -> bool {
        is_disk_full(self)
    }
}

/// Result of state-layer operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
