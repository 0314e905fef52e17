//! The auth contract: admin API tokens (hashed) and the audit log.

use serde::{Deserialize, Serialize};

use crate::Result;

/// A stored admin API token: everything but the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public identifier, e.g. `tok_3f9a…`; safe to show and log.
    pub id: String,
    /// What the token is for, as its creator named it.
    pub name: String,
    /// Hex SHA-256 of the token.
    #[serde(skip_serializing)]
    pub hash: String,
    /// Scopes granted: `admin`, `deploy`, `invoke`, `read`.
    pub scopes: Vec<String>,
    /// Functions the token may act on; empty means every function.
    pub functions: Vec<String>,
    /// When it was created (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
}

/// One recorded admin action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, increasing.
    pub id: i64,
    /// When it happened (ms since the Unix epoch).
    pub ts_ms: i64,
    /// Who: a token id and name, a function's credential, or `anonymous`.
    pub actor: String,
    /// What: method and path, e.g. `POST /v1/functions/hello/versions`.
    pub action: String,
    /// The HTTP status answered.
    pub status: u16,
    /// More about the result (an error message), if any.
    pub detail: Option<String>,
}

/// Tokens and the audit log.
///
/// Asynchronous, like every contract (see the crate's documentation): a
/// back-end does its own I/O without holding up the caller's thread.
#[async_trait::async_trait]
pub trait AuthStore: Send + Sync {
    /// Stores a new token.
    async fn create_token(&self, token: &TokenRecord) -> Result<()>;
    /// Every token, revoked ones included, oldest first.
    async fn tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Revokes a token; false if there is no live token with that id.
    async fn revoke_token(&self, id: &str) -> Result<bool>;
    /// Appends an entry to the audit log, durably, and returns its id.
    async fn append_audit(
        &self,
        actor: &str,
        action: &str,
        status: u16,
        detail: Option<&str>,
    ) -> Result<i64>;
    /// Entries newer than `after`, oldest first, at most `limit`; with
    /// `latest`, the last `limit` entries instead.
    async fn audit(&self, after: i64, limit: usize, latest: bool) -> Result<Vec<AuditEntry>>;
    /// Deletes entries written before `before_ms` and the oldest beyond
    /// the newest `keep_rows`; returns how many went.
    async fn prune_audit(&self, before_ms: i64, keep_rows: u64) -> Result<usize>;

    /// Token changes from now on, whoever made them: a node subscribes and
    /// reloads its live tokens on each, so a revocation elsewhere takes
    /// effect here. Synchronous: subscribing to a feed is in memory, no
    /// I/O (the changes themselves arrive asynchronously on the feed).
    fn watch(&self) -> crate::ChangeFeed<crate::TokenChange>;
}
