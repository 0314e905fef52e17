//! Mayfly's state layer: the function registry, the log store, the usage
//! ledger and content-addressed blobs.
//!
//! The platform talks to state only through the traits defined here
//! ([`Registry`], [`LogStore`], [`UsageStore`], [`BlobStore`]), so the
//! cluster back-end can replace the embedded one without touching the request
//! path. The embedded back-end keeps everything in one data directory: a
//! SQLite database ([`EmbeddedStore`]), a separate SQLite ledger
//! ([`EmbeddedLedger`]) and blob files ([`BlobDir`]).

mod auth;
mod blobs;
mod data_dir;
mod embedded;
mod embedded_events;
mod events;
mod ledger;
mod model;
mod secrets;

pub use auth::{AuditEntry, AuthStore, EmbeddedAuth, TokenRecord};
pub use blobs::{BlobDir, BlobKind, BlobWriter, Digest, StagedBlob};
pub use data_dir::{DataDir, is_disk_full};
pub use embedded::EmbeddedStore;
pub use embedded_events::EmbeddedEvents;
pub use events::{
    AckOutcome, BucketStats, CloudEvent, DeadLetter, Delivery, EventQueue, InboxEvent, KvCondition,
    KvEntry, KvKey, KvStore, ObjectChange, ObjectMeta, ObjectStore, QueueRef, QueueStats,
    RetryPolicy, Settlement, Trigger, TriggerSource, TriggerSpec, TriggerStore,
};
pub use ledger::{
    EmbeddedLedger, GroupBy, Outcome, OutcomeCounts, StoredUsage, UsageQuery, UsageRecord,
    UsageRow, UsageStore, billed_ms,
};
pub use model::{
    AliasMove, AliasRecord, CanaryPolicy, CanaryRecord, FunctionConfig, FunctionLimits,
    FunctionRecord, FunctionScaling, Grants, LIVE_ALIAS, LogRecord, MoveCause, NewLogLine,
    VersionRecord, WEIGHT_SCALE_BP,
};
pub use secrets::{EmbeddedSecrets, Sealed, SealedSecret, SecretMeta, SecretPut, SecretStore};

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
    /// A compare-and-swap condition did not hold.
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// The database failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
}

impl StoreError {
    /// Whether this failed because the disk (or the user's quota) is full:
    /// a condition that ends by itself once space is freed.
    pub fn is_disk_full(&self) -> bool {
        is_disk_full(self)
    }
}

/// Result of state-layer operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Functions and their immutable versions.
///
/// Called from the admin path (deploy, list, delete) and at start-up, never
/// per request: the platform keeps what requests need in memory.
pub trait Registry: Send + Sync {
    /// Records a new version of `function` (creating the function on its first
    /// deploy) with the next version number, and makes it the function's live
    /// version: the `live` alias moves to it, its canary is cleared and the
    /// version it left is recorded as its previous one. Fails with [`StoreError::RouteTaken`] if another function
    /// serves one of the routes; then nothing changes.
    fn create_version(
        &self,
        function: &str,
        digest: &Digest,
        config: &FunctionConfig,
    ) -> Result<VersionRecord>;

    /// One function with its live version.
    fn function(&self, name: &str) -> Result<Option<FunctionRecord>>;

    /// Every function with its live version, by name.
    fn functions(&self) -> Result<Vec<FunctionRecord>>;

    /// Every version of a function, newest first.
    fn versions(&self, name: &str) -> Result<Vec<VersionRecord>>;

    /// Deletes a function with all its versions, aliases and routes.
    /// Returns whether it existed.
    fn delete_function(&self, name: &str) -> Result<bool>;

    /// One version of a function, if it exists.
    fn version(&self, function: &str, version: u64) -> Result<Option<VersionRecord>>;

    /// A function's aliases: `live` first, then the others by name. Empty
    /// when the function does not exist.
    fn aliases(&self, function: &str) -> Result<Vec<AliasRecord>>;

    /// Points `alias` of `function` at `version`, with `canary` (or none),
    /// creating the alias if needed. When the version changes, the one it
    /// left becomes `previous_version`. Moving `live` makes the version's
    /// routes the function's routes: [`StoreError::RouteTaken`] if another
    /// function serves one of them. Fails with
    /// [`StoreError::FunctionNotFound`] or [`StoreError::VersionNotFound`];
    /// on any error nothing changes.
    /// The move is added to the alias's history with `cause` and `detail`.
    fn set_alias(
        &self,
        function: &str,
        alias: &str,
        version: u64,
        canary: Option<CanaryRecord>,
        cause: MoveCause,
        detail: &str,
    ) -> Result<AliasRecord>;

    /// The last `limit` moves of `function`'s aliases (deploys, sets,
    /// rollbacks, automatic canary decisions), newest first.
    fn alias_moves(&self, function: &str, limit: usize) -> Result<Vec<AliasMove>>;

    /// Deletes a named alias; returns whether it existed. `live` cannot be
    /// deleted ([`StoreError::Conflict`]).
    fn delete_alias(&self, function: &str, alias: &str) -> Result<bool>;

    /// Deletes one version. Refused with [`StoreError::Conflict`], naming
    /// the aliases, while any alias or canary points at it.
    fn delete_version(&self, function: &str, version: u64) -> Result<()>;

    /// Deletes the versions beyond the `keep` newest that no alias (or
    /// canary) points at; returns their numbers. Blobs are left alone: they
    /// are content-addressed and may be shared.
    fn prune_versions(&self, function: &str, keep: usize) -> Result<Vec<u64>>;
}

/// Durable guest log lines.
///
/// Appends come in batches from a background writer, never from the guest's
/// own write path.
pub trait LogStore: Send + Sync {
    /// Appends lines in order; returns the id given to the last one.
    fn append_logs(&self, lines: &[NewLogLine]) -> Result<i64>;

    /// Lines of `function` with an id above `after_id`, oldest first, at most
    /// `limit`.
    fn logs_after(&self, function: &str, after_id: i64, limit: usize) -> Result<Vec<LogRecord>>;

    /// The last `limit` lines of `function`, oldest first.
    fn logs_tail(&self, function: &str, limit: usize) -> Result<Vec<LogRecord>>;

    /// Deletes the oldest lines so at most `keep` remain.
    fn prune_logs(&self, keep: usize) -> Result<usize>;

    /// Deletes `function`'s oldest lines so at most `keep_lines` of them
    /// remain, holding at most `keep_bytes` of text: one function's flood
    /// never erases another's lines.
    fn prune_function_logs(
        &self,
        function: &str,
        keep_lines: usize,
        keep_bytes: u64,
    ) -> Result<usize>;
}

/// Immutable content-addressed bytes: uploaded components and compiled
/// artifacts.
pub trait BlobStore: Send + Sync {
    /// Stores `bytes` under their digest (a no-op if already present) and
    /// returns it. Durable when it returns.
    fn put(&self, kind: BlobKind, bytes: &[u8]) -> Result<Digest>;

    /// Stores `bytes` under a key the caller derived (e.g. an artifact keyed
    /// by component digest and engine settings).
    fn put_keyed(&self, kind: BlobKind, key: &Digest, bytes: &[u8]) -> Result<()>;

    /// The bytes under `key`, if present.
    fn get(&self, kind: BlobKind, key: &Digest) -> Result<Option<Vec<u8>>>;

    /// A local file holding the blob, for memory-mapping; `None` if absent.
    fn local_path(&self, kind: BlobKind, key: &Digest) -> Option<std::path::PathBuf>;

    /// Stores `bytes` under a key the caller derived, with a checksum of
    /// them that [`BlobStore::verified_path`] checks, replacing whatever
    /// was stored under `key` (a damaged copy included). For blobs that
    /// are trusted when read back, such as compiled artifacts.
    fn put_checked(&self, kind: BlobKind, key: &Digest, bytes: &[u8]) -> Result<()>;

    /// Whether a blob stored with [`BlobStore::put_checked`] is present
    /// with its checksum. Cheap (no hashing): for start-up, where every
    /// function's artifact is looked at.
    fn has_checked(&self, kind: BlobKind, key: &Digest) -> bool;

    /// A local file holding a blob stored with [`BlobStore::put_checked`]
    /// whose bytes match their checksum; `None` if the blob or its
    /// checksum is absent, [`StoreError::Corrupt`] if they differ.
    /// Each state of a file is hashed once per process: later calls cost a
    /// `stat` until the file changes.
    fn verified_path(&self, kind: BlobKind, key: &Digest) -> Result<Option<std::path::PathBuf>>;
}
