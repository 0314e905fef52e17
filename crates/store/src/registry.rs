//! The registry contract: functions, their immutable versions, aliases
//! with their canaries, and the history of alias moves.

use serde::{Deserialize, Serialize};

#[cfg(doc)]
use crate::StoreError;
use crate::{ChangeFeed, Digest, RegistryChange, Result};

/// A function's deploy-time configuration, stored with each version and
/// immutable once deployed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// Normalised routes: `/prefix` or `host/prefix`.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Resource limits of each invocation.
    #[serde(default)]
    pub limits: FunctionLimits,
    /// Concurrency, queueing and instance reuse.
    #[serde(default)]
    pub scaling: FunctionScaling,
    /// What the function may reach beyond its sandbox.
    #[serde(default)]
    pub grants: Grants,
    /// Variables the function reads through wasi:config.
    #[serde(default)]
    pub variables: std::collections::BTreeMap<String, String>,
    /// Environment variables every instance starts with
    /// (wasi:cli/environment, `std::env` in the guest). Plain text, shown by
    /// the API like Lambda's: secrets belong in `env_secrets`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Environment variables whose values are secrets: variable name →
    /// secret name. Exposing a secret this way is its grant; the value is
    /// read as each instance starts and never shown.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env_secrets: std::collections::BTreeMap<String, String>,
    /// Routes (normalised, each one of `routes`) whose prefix is taken off
    /// the path the guest sees: `/api/users` reaches a function routed at
    /// `/api` as `/users`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub strip_prefix: Vec<String>,
    /// Hand request bodies of unknown length (chunked) to the function as
    /// they arrive, checked against `limits.max_request_bytes` on the way,
    /// instead of reading them whole before it runs: for uploads larger
    /// than the node should hold in memory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streaming_request: bool,
    /// Labels a node of a fleet must have (every pair) to run the
    /// function; the others forward its requests to one that does. Empty:
    /// every node runs it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub placement: std::collections::BTreeMap<String, String>,
}

/// What a function may reach beyond its sandbox. Deny by default: a
/// function gets exactly what is listed here. Versions deployed before
/// grants existed read back with none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grants {
    /// KV buckets it may open through wasi:keyvalue (and reach with its
    /// per-invocation credential).
    pub kv: Vec<String>,
    /// Object buckets its credential may read and write.
    pub objects: Vec<String>,
    /// Queues its credential may send to.
    pub queues: Vec<String>,
    /// Outbound HTTP allow-list: `https://api.example.com`,
    /// `https://*.example.com`, `http://10.0.0.5:8080`, `http://10.0.0.0/8`.
    pub outbound: Vec<String>,
    /// Secrets it may read through wasi:config, by name.
    pub secrets: Vec<String>,
    /// Models it may load by name through wasi:nn.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

impl Grants {
    /// Whether nothing is granted.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// How a function scales: its concurrency limits, the queue in front of
/// them, and whether instances are reused. Versions deployed before scaling
/// settings existed read back with the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionScaling {
    /// Most invocations running at once; `None`: as many as the node allows.
    pub max_concurrency: Option<u32>,
    /// Invocations always available to this function, carved out of the
    /// node's capacity (and its memory budget) so other functions cannot
    /// take them.
    pub reserved_concurrency: u32,
    /// Requests that may wait for a free slot when the function is at its
    /// limit; 0 refuses the excess at once with 429.
    pub max_queued: u32,
    /// Longest a queued request waits before it gets 429, in milliseconds.
    pub queue_timeout_ms: u64,
    /// Keep instances and reuse them, one request at a time (the hot tier),
    /// so an expensive initialisation is paid once per instance instead of
    /// once per request. State then survives between requests: only for
    /// functions written for it.
    pub reuse: bool,
}

impl FunctionScaling {
    /// Default queue length: absorbs a short burst without piling up.
    pub const DEFAULT_MAX_QUEUED: u32 = 100;
    /// Default queue wait: 1 s, short enough that a client retrying after
    /// `Retry-After` does better than waiting longer.
    pub const DEFAULT_QUEUE_TIMEOUT_MS: u64 = 1000;
    /// Longest queue wait a function may ask for.
    pub const MAX_QUEUE_TIMEOUT_MS: u64 = 60_000;
}

impl Default for FunctionScaling {
    fn default() -> Self {
        Self {
            max_concurrency: None,
            reserved_concurrency: 0,
            max_queued: Self::DEFAULT_MAX_QUEUED,
            queue_timeout_ms: Self::DEFAULT_QUEUE_TIMEOUT_MS,
            reuse: false,
        }
    }
}

/// Resource limits of one function's invocations. Versions deployed before
/// limits existed read back with the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionLimits {
    /// Linear memory, all of an instance's memories together, in MB
    /// (mebibytes, as Lambda counts them). Also the memory billed.
    pub memory_mb: u32,
    /// Wall-clock limit of one invocation, in milliseconds.
    pub timeout_ms: u64,
    /// Largest request body handed to the function, in bytes.
    pub max_request_bytes: u64,
    /// Largest response body sent on from the function, in bytes.
    pub max_response_bytes: u64,
    /// Bytes of stdout and of stderr kept per invocation.
    pub max_log_bytes: u64,
}

impl FunctionLimits {
    /// Default memory: 128 MB.
    pub const DEFAULT_MEMORY_MB: u32 = 128;
    /// Default timeout: 30 s.
    pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
    /// Longest timeout a function may ask for: 15 minutes, as Lambda allows.
    pub const MAX_TIMEOUT_MS: u64 = 15 * 60 * 1000;
}

impl Default for FunctionLimits {
    fn default() -> Self {
        Self {
            memory_mb: Self::DEFAULT_MEMORY_MB,
            timeout_ms: Self::DEFAULT_TIMEOUT_MS,
            max_request_bytes: 16 << 20,
            max_response_bytes: 16 << 20,
            max_log_bytes: 1 << 20,
        }
    }
}

/// One immutable version of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Function name.
    pub function: String,
    /// Version number, from 1, increasing per function.
    pub version: u64,
    /// Digest of the uploaded component.
    pub digest: String,
    /// Configuration deployed with this version.
    pub config: FunctionConfig,
    /// When it was deployed, in milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// A function and the version it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// Function name.
    pub name: String,
    /// When the function was first deployed (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// The version that serves requests.
    pub live: VersionRecord,
}

/// What a compare-and-swap write of an alias expects it to point at now.
/// The store checks it in the write's own transaction and refuses the
/// write with [`crate::StoreError::Stale`] when it does not hold, so two
/// nodes (or two requests) that read the same state cannot both move it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// No check: write whatever is there.
    Any,
    /// The alias does not exist (for `live`: the function does not).
    Absent,
    /// The alias points at this version.
    Version(u64),
}

impl Expected {
    /// What a reader saw: the version an alias pointed at, if it existed.
    pub fn seen(version: Option<u64>) -> Self {
        version.map_or(Self::Absent, Self::Version)
    }
}

/// Alias moves kept per function; older ones are dropped as new ones come.
pub const ALIAS_MOVES_KEPT: i64 = 200;

/// The alias every deployed function has: what its routes, triggers and
/// the admin invoke reach. A deploy moves it to the new version.
pub const LIVE_ALIAS: &str = "live";

/// Basis points in one whole: a canary weight is `0..=10_000`.
pub const WEIGHT_SCALE_BP: u32 = 10_000;

/// A canary on an alias: a share of the alias's traffic goes to another
/// version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryRecord {
    /// The version that gets the share.
    pub version: u64,
    /// The share, in basis points (1/100 of a percent), `1..10_000`.
    pub weight_bp: u32,
    /// Progressive delivery: when set, the canary promotes itself or rolls
    /// itself back once it has been judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<CanaryPolicy>,
}

/// How an automatic canary is judged: over its first `requests`
/// invocations, its error rate and p99 latency must stay within bounds for
/// it to be promoted; as soon as they cannot, it is rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryPolicy {
    /// Invocations of the canary to judge it over (`1..=100_000`).
    pub requests: u32,
    /// Most errors allowed, in basis points of `requests`: an error is a
    /// trap, timeout, out-of-memory or a 5xx answer.
    pub max_error_bp: u32,
    /// Highest p99 wall time allowed, in milliseconds. `None`: at most
    /// twice the alias's own version's p99 over the same time, plus 10 ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ms: Option<u32>,
}

/// Why an alias moved: the user's doing or the node's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveCause {
    /// A deploy made the new version `live`.
    Deploy,
    /// `mayfly alias set`.
    Set,
    /// `mayfly rollback`.
    Rollback,
    /// An automatic canary met its thresholds and took all the traffic.
    AutoPromote,
    /// An automatic canary broke a threshold and was taken out.
    AutoRollback,
}

impl MoveCause {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deploy => "deploy",
            Self::Set => "set",
            Self::Rollback => "rollback",
            Self::AutoPromote => "auto-promote",
            Self::AutoRollback => "auto-rollback",
        }
    }

    /// The cause named `name`, as [`MoveCause::as_str`] writes it.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Deploy,
            Self::Set,
            Self::Rollback,
            Self::AutoPromote,
            Self::AutoRollback,
        ]
        .into_iter()
        .find(|cause| cause.as_str() == name)
    }
}

/// One move of an alias: where it pointed afterwards and why it moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasMove {
    /// Function name.
    pub function: String,
    /// Alias name.
    pub alias: String,
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
    /// The version it pointed at before, if it existed.
    pub from_version: Option<u64>,
    /// The version it points at after the move.
    pub version: u64,
    /// Its canary after the move.
    pub canary: Option<CanaryRecord>,
    /// Who moved it.
    pub cause: MoveCause,
    /// For automatic moves, the figures that decided it.
    pub detail: String,
}

/// A name pointing at one version of a function, optionally with a canary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasRecord {
    /// Function name.
    pub function: String,
    /// Alias name: 1 to 32 of `[a-z0-9-_]`; `live` always exists.
    pub alias: String,
    /// The version it points at.
    pub version: u64,
    /// A share of its traffic that goes to another version.
    pub canary: Option<CanaryRecord>,
    /// The version it pointed at before its last move, if any.
    pub previous_version: Option<u64>,
    /// When it last changed (ms since the Unix epoch).
    pub updated_at_ms: i64,
}

impl AliasRecord {
    /// Whether this alias (its version or its canary) points at `version`.
    pub fn points_at(&self, version: u64) -> bool {
        self.version == version || self.canary.is_some_and(|c| c.version == version)
    }
}

/// Refuses deleting `version` of `function` while any of its `aliases`
/// points at it (as its version or its canary), naming them: the same
/// answer from every back-end.
pub fn refuse_if_aliased(function: &str, version: u64, aliases: Vec<AliasRecord>) -> Result<()> {
    let holders: Vec<String> = aliases
        .into_iter()
        .filter(|alias| alias.points_at(version))
        .map(|alias| {
            if alias.version == version {
                alias.alias
            } else {
                format!("{} (canary)", alias.alias)
            }
        })
        .collect();
    if holders.is_empty() {
        return Ok(());
    }
    Err(crate::StoreError::Conflict(format!(
        "version {version} of `{function}` is in use by alias(es) {}: point them at \
         another version first (`mayfly alias set`)",
        holders.join(", ")
    )))
}

/// Functions and their immutable versions.
///
/// Called from the admin path (deploy, list, delete) and at start-up, never
/// per request: the platform keeps what requests need in memory.
#[async_trait::async_trait]
pub trait Registry: Send + Sync {
    /// Records a new version of `function` (creating the function on its first
    /// deploy) with the next version number, and makes it the function's live
    /// version: the `live` alias moves to it, its canary is cleared and the
    /// version it left is recorded as its previous one. Fails with [`StoreError::RouteTaken`] if another function
    /// serves one of the routes, and with [`StoreError::Stale`] if `live`
    /// is not where `expected_live` says (another deploy or move landed
    /// since the caller looked); then nothing changes.
    async fn create_version(
        &self,
        function: &str,
        digest: &Digest,
        config: &FunctionConfig,
        expected_live: Expected,
    ) -> Result<VersionRecord>;

    /// One function with its live version.
    async fn function(&self, name: &str) -> Result<Option<FunctionRecord>>;

    /// Every function with its live version, by name.
    async fn functions(&self) -> Result<Vec<FunctionRecord>>;

    /// Every version of a function, newest first.
    async fn versions(&self, name: &str) -> Result<Vec<VersionRecord>>;

    /// Deletes a function with all its versions, aliases and routes.
    /// Returns whether it existed.
    async fn delete_function(&self, name: &str) -> Result<bool>;

    /// One version of a function, if it exists.
    async fn version(&self, function: &str, version: u64) -> Result<Option<VersionRecord>>;

    /// A function's aliases: `live` first, then the others by name. Empty
    /// when the function does not exist.
    async fn aliases(&self, function: &str) -> Result<Vec<AliasRecord>>;

    /// Points `alias` of `function` at `version`, with `canary` (or none),
    /// creating the alias if needed. When the version changes, the one it
    /// left becomes `previous_version`. Moving `live` makes the version's
    /// routes the function's routes: [`StoreError::RouteTaken`] if another
    /// function serves one of them. Fails with
    /// [`StoreError::FunctionNotFound`] or [`StoreError::VersionNotFound`],
    /// and with [`StoreError::Stale`] if the alias is not where `expected`
    /// says; on any error nothing changes.
    /// The move is added to the alias's history with `cause` and `detail`.
    #[allow(clippy::too_many_arguments)]
    async fn set_alias(
        &self,
        function: &str,
        alias: &str,
        version: u64,
        canary: Option<CanaryRecord>,
        expected: Expected,
        cause: MoveCause,
        detail: &str,
    ) -> Result<AliasRecord>;

    /// The last `limit` moves of `function`'s aliases (deploys, sets,
    /// rollbacks, automatic canary decisions), newest first.
    async fn alias_moves(&self, function: &str, limit: usize) -> Result<Vec<AliasMove>>;

    /// Deletes a named alias; returns whether it existed. `live` cannot be
    /// deleted ([`StoreError::Conflict`]).
    async fn delete_alias(&self, function: &str, alias: &str) -> Result<bool>;

    /// Deletes one version. Refused with [`StoreError::Conflict`], naming
    /// the aliases, while any alias or canary points at it.
    async fn delete_version(&self, function: &str, version: u64) -> Result<()>;

    /// Deletes the versions beyond the `keep` newest that no alias (or
    /// canary) points at; returns their numbers. Blobs are left alone: they
    /// are content-addressed and may be shared.
    async fn prune_versions(&self, function: &str, keep: usize) -> Result<Vec<u64>>;

    /// Changes to functions from now on, whoever made them (see
    /// [`ChangeFeed`]): a node subscribes at start-up and rebuilds a
    /// function's catalog entry on each, so a deploy or alias move on
    /// another node reaches it. Synchronous: subscribing is in memory, no
    /// I/O.
    fn watch(&self) -> ChangeFeed<RegistryChange>;
}
