//! Who may use the admin API, and what they did.
//!
//! Two kinds of caller present a bearer token:
//! - people and tools, with an **API token** (`mf_…`, 256 random bits)
//!   carrying scopes — `admin`, `deploy`, `invoke`, `read` — optionally
//!   limited to named functions. Tokens are shown once and stored as
//!   SHA-256 hashes; the live ones are kept in memory, so checking one costs
//!   a hash and a map lookup.
//! - functions, with a **per-invocation credential** (`mfc1.…`): minted by
//!   the node when a guest reads `mayfly.credential` through wasi:config,
//!   signed with HMAC-SHA256 under a key derived from the node's master key,
//!   valid for a few minutes, and good only for the KV buckets, object
//!   buckets and queues granted to that function. The same claims (object
//!   buckets only) also come as an **S3 key pair** (`mayfly.s3_key`):
//!   the access key id (`MFFN…`) carries them, and its secret is a MAC of
//!   the id under the same key, so any node can check a signature made
//!   with it and none stores it.
//!
//! Every admin action and every refused request is written to the audit
//! log before the answer leaves, except that anonymous refusals (no or an
//! unknown token) are rate-limited: the first [`ANONYMOUS_ROWS_PER_WINDOW`]
//! of each [`ANONYMOUS_WINDOW`] get a row each, the rest one row with
//! their count (so a flood of unauthenticated requests cannot grow
//! `auth.db` without bound). The log keeps [`AUDIT_KEEP_DAYS`] days and at
//! most [`AUDIT_KEEP_ROWS`] rows.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use http::Method;
use mayfly_store::{AuditEntry, AuthStore, FunctionConfig, Grants, TokenRecord};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::clock::now_ms;
use crate::error::PlatformError;

/// Name of the file in the data directory holding the first admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// How long a per-invocation credential is valid unless the node says
/// otherwise: long enough for any invocation (at most 15 minutes run time
/// is allowed, but almost all finish in seconds), short enough that a
/// leaked one soon stops working.
pub const DEFAULT_CREDENTIAL_TTL: Duration = Duration::from_secs(5 * 60);

/// How the audit log names a caller without a valid token.
pub const ANONYMOUS: &str = "anonymous";
/// Anonymous refusals recorded one row each per window; more are counted.
pub const ANONYMOUS_ROWS_PER_WINDOW: u64 = 20;
/// The window of [`ANONYMOUS_ROWS_PER_WINDOW`].
pub const ANONYMOUS_WINDOW: Duration = Duration::from_secs(60);
/// Audit rows older than this many days are deleted.
pub const AUDIT_KEEP_DAYS: i64 = 90;
/// At most this many audit rows are kept (the oldest go first).
pub const AUDIT_KEEP_ROWS: u64 = 1_000_000;
/// Audit rows written between two prunes.
const AUDIT_PRUNE_EVERY: u64 = 1_000;

const TOKEN_PREFIX: &str = "mf_";
const CREDENTIAL_PREFIX: &str = "mfc1.";
/// How a function's S3 access key id starts. Keys created with `mayfly
/// token create --s3` are exactly 20 characters; a function's is longer
/// (it carries its claims), which is what tells the two apart.
const S3_KEY_PREFIX: &str = "MFFN";
/// Domain separation of the secrets of functions' S3 keys from the
/// credentials' signatures, which are MACs under the same key.
const S3_SECRET_CONTEXT: &[u8] = b"mayfly function s3 secret v1\0";

/// What a token may do. `admin` may do everything; the others are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Everything, including tokens, secrets and the audit log.
    Admin,
    /// Deploy and delete functions, attach triggers, manage dead letters.
    Deploy,
    /// Invoke functions and write the data that triggers them (queues, KV,
    /// objects).
    Invoke,
    /// Read state: functions, logs, usage, metrics, stores.
    Read,
}

impl Scope {
    /// Every scope, in the order they are listed.
    pub const ALL: [Scope; 4] = [Scope::Admin, Scope::Deploy, Scope::Invoke, Scope::Read];

    /// The scope's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Deploy => "deploy",
            Scope::Invoke => "invoke",
            Scope::Read => "read",
        }
    }

    /// Parses a scope name.
    pub fn parse(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.as_str() == name)
            .ok_or_else(|| format!("unknown scope `{name}`: use admin, deploy, invoke or read"))
    }
}

/// A live API token, as the node checks it.
#[derive(Debug)]
pub struct TokenGrant {
    /// Public id (`tok_…`).
    pub id: String,
    /// Its name.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Functions it is limited to; empty: all.
    pub functions: Vec<String>,
}

/// The claims of a per-invocation credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// The function it was minted for.
    #[serde(rename = "fn")]
    pub function: String,
    /// Its version.
    #[serde(rename = "ver")]
    pub version: u64,
    /// Which function of that name: its creation time (ms since the Unix
    /// epoch, as the store records it). A function deleted and deployed
    /// again under the same name is another function, and the credentials
    /// of the old one must not reach the new one's data. Credentials minted
    /// before this claim existed read 0 and match no function.
    #[serde(rename = "gen", default)]
    pub generation: i64,
    /// Expiry, in ms since the Unix epoch.
    #[serde(rename = "exp")]
    pub expires_ms: i64,
    /// KV buckets it reaches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kv: Vec<String>,
    /// Object buckets it reaches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<String>,
    /// Queues it may send to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<String>,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A person or tool with an API token.
    Token(Arc<TokenGrant>),
    /// A function, with its per-invocation credential.
    Function(Arc<Credential>),
}

impl Principal {
    /// Whether the caller may do everything (an `admin` token).
    pub fn is_admin(&self) -> bool {
        matches!(self, Principal::Token(token) if token.scopes.contains(&Scope::Admin))
    }

    /// How the audit log names the caller.
    pub fn actor(&self) -> String {
        match self {
            Principal::Token(token) => format!("{} ({})", token.id, token.name),
            Principal::Function(credential) => format!(
                "function {} v{} (credential)",
                credential.function, credential.version
            ),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No usable token: 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token without the right: 403.
    #[error("{0}")]
    Forbidden(String),
}

/// What a request needs, from its method and path.
#[derive(Debug, PartialEq, Eq)]
struct Need<'a> {
    scope: Scope,
    /// The function the request acts on, if any.
    function: Option<&'a str>,
    /// A store a function's credential may reach, if the request is one.
    data: Option<Data<'a>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Data<'a> {
    Kv(&'a str),
    Object(&'a str),
    QueueSend(&'a str),
}

/// Classifies an admin API request. Unknown paths need `read` for reads and
/// `deploy` for writes, so a route added later is never open by mistake.
fn need<'a>(method: &Method, path: &'a str) -> Need<'a> {
    let reading = method == Method::GET || method == Method::HEAD;
    let default = if reading { Scope::Read } else { Scope::Deploy };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (scope, function, data) = match segments.as_slice() {
        ["v1", "tokens" | "secrets" | "audit", ..] => (Scope::Admin, None, None),
        ["v1", "functions", name, "invoke"] => (Scope::Invoke, Some(*name), None),
        ["v1", "functions", name, ..] => (default, Some(*name), None),
        ["v1", "kv", bucket, ..] => (
            if reading { Scope::Read } else { Scope::Invoke },
            None,
            Some(Data::Kv(bucket)),
        ),
        ["v1", "buckets", bucket, ..] => (
            if reading { Scope::Read } else { Scope::Invoke },
            None,
            Some(Data::Object(bucket)),
        ),
        ["v1", "queues", queue, "messages" | "batch"] if method == Method::POST => {
            (Scope::Invoke, None, Some(Data::QueueSend(queue)))
        }
        ["v1", "queues", _, ..] if !reading => (Scope::Invoke, None, None),
        _ => (default, None, None),
    };
    Need {
        scope,
        function,
        data,
    }
}

/// Whether an admin request is an action worth auditing when it succeeds:
/// every change to the node's configuration. Data-plane traffic (invokes,
/// queue, KV and object writes) is metered and logged elsewhere and would
/// drown the log; refused requests are always audited.
pub fn is_admin_action(method: &Method, path: &str) -> bool {
    if method == Method::GET || method == Method::HEAD {
        return false;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    !matches!(
        segments.as_slice(),
        ["v1", "functions", _, "invoke"] | ["v1", "kv" | "buckets" | "queues", ..]
    )
}

/// Checks that `principal` may make this request.
pub fn authorize(principal: &Principal, method: &Method, path: &str) -> Result<(), AuthError> {
    let need = need(method, path);
    match principal {
        Principal::Token(token) => {
            if token.scopes.contains(&Scope::Admin) {
                return Ok(());
            }
            if !token.scopes.contains(&need.scope) {
                return Err(AuthError::Forbidden(format!(
                    "token {} has scope {} but {method} {path} needs `{}`: create a token with \
                     `mayfly token create --scope {}`",
                    token.id,
                    scope_list(&token.scopes),
                    need.scope.as_str(),
                    need.scope.as_str()
                )));
            }
            if token.functions.is_empty() {
                return Ok(());
            }
            match need.function {
                Some(function) if token.functions.iter().any(|f| f == function) => Ok(()),
                Some(function) => Err(AuthError::Forbidden(format!(
                    "token {} is limited to function(s) {} and cannot act on `{function}`",
                    token.id,
                    token.functions.join(", ")
                ))),
                None => Err(AuthError::Forbidden(format!(
                    "token {} is limited to function(s) {}; {method} {path} is not about one \
                     function",
                    token.id,
                    token.functions.join(", ")
                ))),
            }
        }
        Principal::Function(credential) => {
            let granted = match need.data {
                Some(Data::Kv(bucket)) => credential.kv.iter().any(|b| b == bucket),
                Some(Data::Object(bucket)) => credential.objects.iter().any(|b| b == bucket),
                Some(Data::QueueSend(queue)) => credential.queues.iter().any(|q| q == queue),
                None => false,
            };
            if granted {
                Ok(())
            } else {
                Err(AuthError::Forbidden(format!(
                    "the credential of function `{}` cannot {method} {path}: a function's \
                     credential reaches only the KV buckets, object buckets and queues granted \
                     to it",
                    credential.function
                )))
            }
        }
    }
}

/// Checks what a deploy would grant against who deploys. Granting a
/// secret is an admin's decision (a deploy token could otherwise deploy a
/// function that hands out every secret); a token limited to functions
/// may only redeploy within what the live version already has — grants and
/// routes — and may not attach triggers (another source's events).
pub fn check_deploy(
    principal: &Principal,
    live: Option<&FunctionConfig>,
    new: &FunctionConfig,
    adds_triggers: bool,
) -> Result<(), AuthError> {
    let token = match principal {
        Principal::Token(token) => token,
        Principal::Function(credential) => {
            return Err(AuthError::Forbidden(format!(
                "the credential of function `{}` cannot deploy",
                credential.function
            )));
        }
    };
    if principal.is_admin() {
        return Ok(());
    }
    let empty = FunctionConfig::default();
    let live = live.unwrap_or(&empty);
    let widened = |name: &str, new: &[String], live: &[String]| {
        new.iter()
            .find(|item| !live.contains(item))
            .map(|item| format!("{name} `{item}`"))
    };
    if let Some(what) = widened("secret", &new.grants.secrets, &live.grants.secrets) {
        return Err(AuthError::Forbidden(format!(
            "granting {what} needs an admin token (token {} has scope {}); once an admin has \
             deployed it, later deploys may keep it",
            token.id,
            scope_list(&token.scopes)
        )));
    }
    if token.functions.is_empty() {
        return Ok(());
    }
    let widening = [
        widened("KV bucket", &new.grants.kv, &live.grants.kv),
        widened("object bucket", &new.grants.objects, &live.grants.objects),
        widened("queue", &new.grants.queues, &live.grants.queues),
        widened("model", &new.grants.models, &live.grants.models),
        widened(
            "outbound origin",
            &new.grants.outbound,
            &live.grants.outbound,
        ),
        widened("route", &new.routes, &live.routes),
    ];
    if let Some(what) = widening.into_iter().flatten().next() {
        return Err(AuthError::Forbidden(format!(
            "token {} is limited to function(s) {} and may not add {what}: deploy that with a \
             token not limited to functions",
            token.id,
            token.functions.join(", ")
        )));
    }
    if adds_triggers {
        return check_add_trigger(principal);
    }
    Ok(())
}

/// Whether `principal` may attach a trigger: a trigger routes another
/// source's events to the function, so tokens limited to functions may not.
pub fn check_add_trigger(principal: &Principal) -> Result<(), AuthError> {
    match principal {
        Principal::Token(token) if token.functions.is_empty() => Ok(()),
        Principal::Token(token) => Err(AuthError::Forbidden(format!(
            "token {} is limited to function(s) {} and may not attach triggers",
            token.id,
            token.functions.join(", ")
        ))),
        Principal::Function(credential) => Err(AuthError::Forbidden(format!(
            "the credential of function `{}` cannot attach triggers",
            credential.function
        ))),
    }
}

/// Narrows a credential to what its function is granted now: a redeploy
/// that drops a grant, or deleting the function, takes effect at once
/// rather than when the credential expires. `live` is the function of that
/// name now, if any: its generation (creation time) and grants. A
/// credential minted for an earlier function of the same name (deleted,
/// then deployed again) is refused.
pub fn narrow_to_live(
    credential: &Credential,
    live: Option<(i64, &Grants)>,
) -> Result<Credential, AuthError> {
    if let Some((generation, _)) = live
        && generation != credential.generation
    {
        return Err(AuthError::Unauthenticated(format!(
            "the credential was minted for an earlier function `{}` that has since been deleted; \
             the function of that name now is another one: read a fresh credential from \
             wasi:config key `mayfly.credential` inside it",
            credential.function
        )));
    }
    let live = live.map(|(_, grants)| grants);
    let keep = |claimed: &[String], live: Option<&Vec<String>>| -> Vec<String> {
        claimed
            .iter()
            .filter(|item| live.is_some_and(|live| live.contains(item)))
            .cloned()
            .collect()
    };
    Ok(Credential {
        kv: keep(&credential.kv, live.map(|g| &g.kv)),
        objects: keep(&credential.objects, live.map(|g| &g.objects)),
        queues: keep(&credential.queues, live.map(|g| &g.queues)),
        ..credential.clone()
    })
}

fn scope_list(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A new token and the record that stores it (hashed).
fn new_token(name: &str, scopes: &[Scope], functions: &[String]) -> (TokenRecord, String) {
    let token = format!(
        "{TOKEN_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(random_bytes::<32>())
    );
    let record = TokenRecord {
        id: format!("tok_{}", hex::encode(random_bytes::<8>())),
        name: name.to_string(),
        hash: hash_token(&token),
        scopes: scopes.iter().map(|s| s.as_str().to_string()).collect(),
        functions: functions.to_vec(),
        created_at_ms: now_ms(),
        revoked_at_ms: None,
    };
    (record, token)
}

fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// Where the credential signing key comes from (the node's secrets).
pub type SigningKey = Box<dyn Fn() -> [u8; 32] + Send + Sync>;

/// Tokens, credentials and the audit log of one node.
pub struct Auth {
    store: Arc<dyn AuthStore>,
    /// Live tokens by hash.
    tokens: ArcSwap<HashMap<String, Arc<TokenGrant>>>,
    /// The node's credential signing key, read at each use so a master key
    /// rotation takes effect at once (credentials signed before it stop
    /// verifying, which their short life makes harmless).
    signing_key: SigningKey,
    credential_ttl: Duration,
    /// Anonymous refusals in the current window.
    anonymous: std::sync::Mutex<AnonymousRefusals>,
    /// Rows written since the last prune.
    since_prune: std::sync::atomic::AtomicU64,
}

/// Anonymous refusals of the current window: how many got a row, and how
/// many were only counted.
#[derive(Debug)]
struct AnonymousRefusals {
    window: Duration,
    started: std::time::Instant,
    started_ms: i64,
    written: u64,
    counted: u64,
}

/// What to write for one anonymous refusal.
#[derive(Debug, PartialEq, Eq)]
enum Anonymous {
    /// Its own row, after a summary of the last window's counted ones.
    Write { summary: Option<String> },
    /// Nothing now: it is counted into the window's summary.
    Count,
}

impl AnonymousRefusals {
    fn new(window: Duration) -> Self {
        Self {
            window,
            started: std::time::Instant::now(),
            started_ms: now_ms(),
            written: 0,
            counted: 0,
        }
    }

    /// Starts a new window if the current one is over, returning the
    /// summary of the refusals it only counted.
    fn roll(&mut self, now: std::time::Instant, now_ms: i64) -> Option<String> {
        if now.duration_since(self.started) < self.window {
            return None;
        }
        let summary = (self.counted > 0).then(|| {
            format!(
                "{} more unauthenticated requests were refused from {} to {} (ms since the \
                 epoch) and not recorded one by one: the first {ANONYMOUS_ROWS_PER_WINDOW} of \
                 each {}s are",
                self.counted,
                self.started_ms,
                now_ms,
                self.window.as_secs()
            )
        });
        self.started = now;
        self.started_ms = now_ms;
        self.written = 0;
        self.counted = 0;
        summary
    }

    fn admit(&mut self, now: std::time::Instant, now_ms: i64) -> Anonymous {
        let summary = self.roll(now, now_ms);
        if self.written < ANONYMOUS_ROWS_PER_WINDOW {
            self.written += 1;
            Anonymous::Write { summary }
        } else {
            self.counted += 1;
            Anonymous::Count
        }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.load().len())
            .field("credential_ttl", &self.credential_ttl)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Opens the token store `store` of the node in `data_dir`. On first start (no token exists yet) it
    /// creates an admin token and writes it to `<data_dir>/admin.token`,
    /// readable by the node's user only, where the CLI finds it.
    pub async fn open(
        store: Arc<dyn AuthStore>,
        data_dir: &Path,
        signing_key: SigningKey,
        credential_ttl: Duration,
    ) -> anyhow::Result<Self> {
        let auth = Self {
            store,
            tokens: ArcSwap::default(),
            signing_key,
            credential_ttl,
            anonymous: std::sync::Mutex::new(AnonymousRefusals::new(ANONYMOUS_WINDOW)),
            since_prune: std::sync::atomic::AtomicU64::new(0),
        };
        auth.prune_audit().await;
        if auth.store.tokens().await?.is_empty() {
            // The file first: a crash between the two steps then leaves a
            // token file nobody honours (rewritten on the next start), never
            // a stored token nobody holds (which would lock everyone out).
            let (record, token) = new_token("admin (first start)", &[Scope::Admin], &[]);
            write_private_file(&data_dir.join(ADMIN_TOKEN_FILE), token.as_bytes())?;
            auth.store.create_token(&record).await?;
            tracing::info!(token = %record.id, "created the admin token in {ADMIN_TOKEN_FILE}");
        }
        auth.reload().await?;
        Ok(auth)
    }

    /// Follows the token feed until `stop`: a token created or revoked
    /// elsewhere (another node sharing the store) is honoured or refused
    /// here too, as after this node's own changes.
    pub(crate) fn follow(
        self: &Arc<Self>,
        feed: mayfly_store::ChangeFeed<mayfly_store::TokenChange>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let auth = self.clone();
        crate::feeds::follow("token", feed, stop, move |_| {
            let auth = auth.clone();
            async move {
                if let Err(error) = auth.reload().await {
                    tracing::error!(
                        "cannot reload the tokens after a change in the store: {error:#}"
                    );
                }
            }
        });
    }

    async fn reload(&self) -> anyhow::Result<()> {
        let live = self
            .store
            .tokens()
            .await?
            .into_iter()
            .filter(|token| token.revoked_at_ms.is_none())
            .map(|token| {
                let scopes = token
                    .scopes
                    .iter()
                    .filter_map(|s| Scope::parse(s).ok())
                    .collect();
                let grant = TokenGrant {
                    id: token.id,
                    name: token.name,
                    scopes,
                    functions: token.functions,
                };
                (token.hash, Arc::new(grant))
            })
            .collect();
        self.tokens.store(Arc::new(live));
        Ok(())
    }

    /// Who presents `authorization` (the header's value).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let Some(header) = authorization else {
            return Err(AuthError::Unauthenticated(
                "this endpoint needs a bearer token (`authorization: Bearer <token>`); the node \
                 wrote its first admin token to admin.token in its data directory"
                    .into(),
            ));
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                AuthError::Unauthenticated(
                    "the authorization header must be `Bearer <token>`".into(),
                )
            })?;
        if token.starts_with(CREDENTIAL_PREFIX) {
            return self
                .verify_credential(token, now_ms())
                .map(|c| Principal::Function(Arc::new(c)));
        }
        self.tokens
            .load()
            .get(&hash_token(token))
            .map(|grant| Principal::Token(grant.clone()))
            .ok_or_else(|| {
                AuthError::Unauthenticated(
                    // Not "run `mayfly token create`": that needs a valid
                    // token already, so it would send the caller in a circle.
                    "the token is not valid (unknown or revoked): use the admin.token the node \
                     wrote in its data directory at first start, or ask an admin for a token \
                     (`mayfly token create`)"
                        .into(),
                )
            })
    }

    /// Creates a token and returns its record and the token itself (shown
    /// once, never stored).
    pub async fn create_token(
        self: &Arc<Self>,
        name: &str,
        scopes: Vec<Scope>,
        functions: Vec<String>,
    ) -> Result<(TokenRecord, String), PlatformError> {
        if scopes.is_empty() {
            return Err(PlatformError::BadRequest(
                "give at least one scope: admin, deploy, invoke or read".into(),
            ));
        }
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(PlatformError::BadRequest(
                "a token name is 1 to 128 printable characters".into(),
            ));
        }
        for function in &functions {
            crate::validate::validate_name(function)?;
        }
        let (record, token) = new_token(name, &scopes, &functions);
        self.store.create_token(&record).await?;
        self.reload().await?;
        Ok((record, token))
    }

    /// Revokes the token `id`; it is refused from the next request on.
    pub async fn revoke_token(self: &Arc<Self>, id: &str) -> Result<(), PlatformError> {
        let revoked = self.store.revoke_token(id).await?;
        self.reload().await?;
        if revoked {
            Ok(())
        } else {
            Err(PlatformError::NotFound(format!(
                "no live token `{id}`: list them with `mayfly token list`"
            )))
        }
    }

    /// Every token (revoked ones too), without the tokens themselves.
    pub async fn tokens(self: &Arc<Self>) -> Result<Vec<TokenRecord>, PlatformError> {
        Ok(self.store.tokens().await?)
    }

    /// Records an admin action durably. Anonymous refusals beyond
    /// [`ANONYMOUS_ROWS_PER_WINDOW`] a window are only counted (and
    /// written as one row with the count when the window is over).
    pub async fn record(
        self: &Arc<Self>,
        actor: String,
        action: String,
        status: u16,
        detail: Option<String>,
    ) -> Result<(), PlatformError> {
        let (now, now_ms) = (std::time::Instant::now(), now_ms());
        let summary = {
            let mut anonymous = self
                .anonymous
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if actor == ANONYMOUS {
                match anonymous.admit(now, now_ms) {
                    Anonymous::Write { summary } => summary,
                    Anonymous::Count => return Ok(()),
                }
            } else {
                anonymous.roll(now, now_ms)
            }
        };
        if let Some(summary) = summary {
            self.store
                .append_audit(ANONYMOUS, "refused requests (counted)", 401, Some(&summary))
                .await?;
        }
        self.store
            .append_audit(&actor, &action, status, detail.as_deref())
            .await?;
        let written = self
            .since_prune
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if written + 1 >= AUDIT_PRUNE_EVERY {
            self.since_prune
                .store(0, std::sync::atomic::Ordering::Relaxed);
            self.prune_audit().await;
        }
        Ok(())
    }

    /// Deletes audit rows past retention (age and count); a failure is
    /// logged and retried at the next prune.
    async fn prune_audit(&self) {
        let before = now_ms().saturating_sub(AUDIT_KEEP_DAYS * 24 * 3600 * 1000);
        match self.store.prune_audit(before, AUDIT_KEEP_ROWS).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "pruned audit rows past retention"),
            Err(error) => tracing::warn!("cannot prune the audit log: {error}"),
        }
    }

    /// Audit entries after `after` (or the latest `limit` with `latest`).
    pub async fn audit(
        self: &Arc<Self>,
        after: i64,
        limit: usize,
        latest: bool,
    ) -> Result<Vec<AuditEntry>, PlatformError> {
        Ok(self.store.audit(after, limit, latest).await?)
    }

    /// A credential for one invocation of `function` at `version`, good for
    /// its granted buckets and queues until the node's credential lifetime
    /// runs out, and only while the function created at `generation` (ms
    /// since the Unix epoch) is the one of that name.
    pub fn mint_credential(
        &self,
        function: &str,
        generation: i64,
        version: u64,
        grants: &Grants,
    ) -> Result<String, AuthError> {
        let ttl_ms = i64::try_from(self.credential_ttl.as_millis()).unwrap_or(i64::MAX);
        let claims = Credential {
            function: function.to_string(),
            version,
            generation,
            expires_ms: now_ms().saturating_add(ttl_ms),
            kv: grants.kv.clone(),
            objects: grants.objects.clone(),
            queues: grants.queues.clone(),
        };
        self.sign(&claims)
    }

    fn mac(&self) -> Result<Hmac<Sha256>, AuthError> {
        Hmac::<Sha256>::new_from_slice(&(self.signing_key)()).map_err(|e| {
            AuthError::Unauthenticated(format!("the node cannot check credentials: {e}"))
        })
    }

    fn sign(&self, claims: &Credential) -> Result<String, AuthError> {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let signed = format!("{CREDENTIAL_PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
        let mut mac = self.mac()?;
        mac.update(signed.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Ok(format!("{signed}.{tag}"))
    }

    fn verify_credential(&self, token: &str, now_ms: i64) -> Result<Credential, AuthError> {
        let invalid = || {
            AuthError::Unauthenticated(
                "the function credential is not valid: it was altered or not issued by this node"
                    .into(),
            )
        };
        let (signed, tag) = token.rsplit_once('.').ok_or_else(invalid)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| invalid())?;
        let mut mac = self.mac()?;
        mac.update(signed.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&tag).map_err(|_| invalid())?;
        let payload = signed.strip_prefix(CREDENTIAL_PREFIX).ok_or_else(invalid)?;
        let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| invalid())?;
        let claims: Credential = serde_json::from_slice(&json).map_err(|_| invalid())?;
        if claims.expires_ms <= now_ms {
            return Err(AuthError::Unauthenticated(format!(
                "the credential of function `{}` expired {} ms ago: credentials live {}; read a \
                 fresh one from wasi:config key `mayfly.credential`",
                claims.function,
                now_ms - claims.expires_ms,
                humantime::format_duration(self.credential_ttl)
            )));
        }
        Ok(claims)
    }

    /// An S3 key pair for one invocation of `function`, good for its
    /// granted object buckets as long as a credential minted now (the
    /// caller also narrows it to the live grants, as for credentials).
    /// The access key id carries the claims, so it is long (a hundred
    /// characters and more); S3 clients accept that.
    pub fn mint_s3_key(
        &self,
        function: &str,
        generation: i64,
        version: u64,
        grants: &Grants,
    ) -> Result<(String, Zeroizing<String>), AuthError> {
        let ttl_ms = i64::try_from(self.credential_ttl.as_millis()).unwrap_or(i64::MAX);
        let claims = Credential {
            function: function.to_string(),
            version,
            generation,
            expires_ms: now_ms().saturating_add(ttl_ms),
            kv: Vec::new(),
            objects: grants.objects.clone(),
            queues: Vec::new(),
        };
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&claims).unwrap_or_default();
        let id = format!("{S3_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
        let secret = self.s3_secret(&id)?;
        Ok((id, secret))
    }

    /// The claims of a function's S3 access key id and the secret that
    /// signs with it; None if `access_key_id` is not one this node's key
    /// can have made. The claims are only as good as the request's
    /// signature, which the caller checks with the secret; so is expiry,
    /// which S3 reports with an error of its own.
    pub fn function_s3_key(&self, access_key_id: &str) -> Option<(Credential, Zeroizing<String>)> {
        if !is_function_s3_key(access_key_id) {
            return None;
        }
        let payload = &access_key_id[S3_KEY_PREFIX.len()..];
        let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let claims: Credential = serde_json::from_slice(&json).ok()?;
        let secret = self.s3_secret(access_key_id).ok()?;
        Some((claims, secret))
    }

    /// HMAC-SHA256(signing key, context ‖ id), as 43 characters.
    fn s3_secret(&self, access_key_id: &str) -> Result<Zeroizing<String>, AuthError> {
        let mut mac = self.mac()?;
        mac.update(S3_SECRET_CONTEXT);
        mac.update(access_key_id.as_bytes());
        Ok(Zeroizing::new(
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()),
        ))
    }
}

/// Whether `access_key_id` is one of a function's S3 keys (rather than one
/// created with `mayfly token create --s3`).
pub fn is_function_s3_key(access_key_id: &str) -> bool {
    access_key_id.len() > 20 && access_key_id.starts_with(S3_KEY_PREFIX)
}

/// Writes `bytes` to a new file readable and writable by its owner only
/// (0600), durably. An existing file is replaced.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let temp: PathBuf = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .with_context(|| format!("cannot create {}", temp.display()))?;
    file.write_all(bytes)?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&temp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(scopes: &[Scope], functions: &[&str]) -> Principal {
        Principal::Token(Arc::new(TokenGrant {
            id: "tok_1".into(),
            name: "t".into(),
            scopes: scopes.to_vec(),
            functions: functions.iter().map(|f| f.to_string()).collect(),
        }))
    }

    #[test]
    fn anonymous_refusals_past_the_window_quota_are_counted() {
        let start = std::time::Instant::now();
        let mut refusals = AnonymousRefusals::new(Duration::from_secs(60));
        refusals.started = start;
        for _ in 0..ANONYMOUS_ROWS_PER_WINDOW {
            assert_eq!(refusals.admit(start, 0), Anonymous::Write { summary: None });
        }
        for _ in 0..500 {
            assert_eq!(refusals.admit(start, 0), Anonymous::Count);
        }
        // The next window starts with a summary of the counted ones.
        let later = start + Duration::from_secs(61);
        let Anonymous::Write {
            summary: Some(summary),
        } = refusals.admit(later, 61_000)
        else {
            panic!("no summary");
        };
        assert!(summary.starts_with("500 more unauthenticated"), "{summary}");
        assert_eq!(refusals.roll(later, 61_000), None);
        // Nothing counted: no summary.
        let much_later = later + Duration::from_secs(61);
        assert_eq!(
            refusals.admit(much_later, 122_000),
            Anonymous::Write { summary: None }
        );
    }

    #[tokio::test]
    async fn an_anonymous_flood_writes_a_bounded_number_of_rows() {
        let (_dir, auth) = auth(Duration::from_secs(60)).await;
        let auth = Arc::new(auth);
        let before = auth.audit(0, 10_000, false).await.unwrap().len();
        for _ in 0..1_000 {
            auth.record(ANONYMOUS.into(), "GET /v1/functions".into(), 401, None)
                .await
                .unwrap();
        }
        // Authenticated actions are all written.
        for _ in 0..5 {
            auth.record("tok_1 (ci)".into(), "POST /v1/x".into(), 200, None)
                .await
                .unwrap();
        }
        let rows = auth.audit(0, 10_000, false).await.unwrap().len() - before;
        assert_eq!(rows as u64, ANONYMOUS_ROWS_PER_WINDOW + 5);
    }

    #[test]
    fn scopes_guard_the_routes_they_name() {
        let read = token(&[Scope::Read], &[]);
        assert!(authorize(&read, &Method::GET, "/v1/functions").is_ok());
        assert!(authorize(&read, &Method::GET, "/metrics").is_ok());
        let error = authorize(&read, &Method::POST, "/v1/functions/a/versions").unwrap_err();
        assert!(error.to_string().contains("needs `deploy`"), "{error}");
        assert!(authorize(&read, &Method::GET, "/v1/tokens").is_err());
        assert!(authorize(&read, &Method::GET, "/v1/audit").is_err());
        let invoke = token(&[Scope::Invoke], &[]);
        assert!(authorize(&invoke, &Method::POST, "/v1/functions/a/invoke").is_ok());
        assert!(authorize(&invoke, &Method::POST, "/v1/queues/q/messages").is_ok());
        assert!(authorize(&invoke, &Method::DELETE, "/v1/functions/a").is_err());
        let deploy = token(&[Scope::Deploy], &[]);
        assert!(authorize(&deploy, &Method::DELETE, "/v1/triggers/3").is_ok());
        assert!(authorize(&deploy, &Method::PUT, "/v1/secrets/x").is_err());
        let admin = token(&[Scope::Admin], &[]);
        assert!(authorize(&admin, &Method::PUT, "/v1/secrets/x").is_ok());
        // Unknown routes still need a scope.
        assert!(authorize(&invoke, &Method::POST, "/v2/anything").is_err());
    }

    #[test]
    fn a_function_limited_token_acts_on_its_functions_only() {
        let limited = token(&[Scope::Deploy, Scope::Read], &["a"]);
        assert!(authorize(&limited, &Method::POST, "/v1/functions/a/versions").is_ok());
        assert!(authorize(&limited, &Method::GET, "/v1/functions/a/logs").is_ok());
        let error = authorize(&limited, &Method::POST, "/v1/functions/b/versions").unwrap_err();
        assert!(error.to_string().contains("cannot act on `b`"), "{error}");
        assert!(authorize(&limited, &Method::GET, "/v1/kv/orders").is_err());
    }

    async fn auth(ttl: Duration) -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::open(
            mayfly_store::sqlite::open_auth(dir.path()).unwrap(),
            dir.path(),
            Box::new(|| [7; 32]),
            ttl,
        )
        .await
        .unwrap();
        (dir, auth)
    }

    #[tokio::test]
    async fn first_start_writes_a_private_admin_token_that_authenticates() {
        use std::os::unix::fs::PermissionsExt as _;
        let (dir, auth) = auth(DEFAULT_CREDENTIAL_TTL).await;
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = std::fs::read_to_string(&path).unwrap();
        let principal = auth
            .authenticate(Some(&format!("Bearer {}", token.trim())))
            .unwrap();
        assert!(matches!(principal, Principal::Token(t) if t.scopes == [Scope::Admin]));
        // The token itself is nowhere in the database.
        let db = std::fs::read(dir.path().join("auth.db")).unwrap();
        let wal = std::fs::read(dir.path().join("auth.db-wal")).unwrap_or_default();
        let needle = token.trim().as_bytes();
        for bytes in [db, wal] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
        // A second start keeps the first token and writes no new one.
        drop(auth);
        let again = Auth::open(
            mayfly_store::sqlite::open_auth(dir.path()).unwrap(),
            dir.path(),
            Box::new(|| [7; 32]),
            DEFAULT_CREDENTIAL_TTL,
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), token);
        assert!(
            again
                .authenticate(Some(&format!("Bearer {}", token.trim())))
                .is_ok()
        );
        assert!(again.authenticate(None).is_err());
        assert!(again.authenticate(Some("Bearer mf_nope")).is_err());
        assert!(again.authenticate(Some("Basic abc")).is_err());
    }

    #[tokio::test]
    async fn credentials_are_scoped_signed_and_expire() {
        let (_dir, auth) = auth(Duration::from_secs(60)).await;
        let grants = Grants {
            kv: vec!["orders".into()],
            queues: vec!["out".into()],
            ..Grants::default()
        };
        let credential = auth.mint_credential("a", 1_000, 3, &grants).unwrap();
        let principal = auth
            .authenticate(Some(&format!("Bearer {credential}")))
            .unwrap();
        assert!(authorize(&principal, &Method::PUT, "/v1/kv/orders/k1").is_ok());
        assert!(authorize(&principal, &Method::POST, "/v1/queues/out/messages").is_ok());
        assert!(authorize(&principal, &Method::GET, "/v1/kv/other/k1").is_err());
        assert!(authorize(&principal, &Method::POST, "/v1/functions/a/invoke").is_err());
        assert!(authorize(&principal, &Method::POST, "/v1/queues/out/receive").is_err());

        // Any change to the claims breaks the signature.
        let (signed, tag) = credential.rsplit_once('.').unwrap();
        let payload = signed.strip_prefix(CREDENTIAL_PREFIX).unwrap();
        let mut claims: Credential =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims.function = "b".into();
        let forged = format!(
            "{CREDENTIAL_PREFIX}{}.{tag}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert!(
            auth.authenticate(Some(&format!("Bearer {forged}")))
                .is_err()
        );
        // Another node's key does not verify it.
        let (_other_dir, other) = {
            let dir = tempfile::tempdir().unwrap();
            let other = Auth::open(
                mayfly_store::sqlite::open_auth(dir.path()).unwrap(),
                dir.path(),
                Box::new(|| [8; 32]),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
            (dir, other)
        };
        assert!(
            other
                .authenticate(Some(&format!("Bearer {credential}")))
                .is_err()
        );
        // Expiry.
        let error = auth
            .verify_credential(&credential, now_ms() + 61_000)
            .unwrap_err();
        assert!(error.to_string().contains("expired"), "{error}");
    }

    #[tokio::test]
    async fn a_functions_s3_key_carries_its_claims_under_a_secret_only_the_node_derives() {
        let (_dir, auth) = auth(Duration::from_secs(60)).await;
        let grants = Grants {
            kv: vec!["orders".into()],
            objects: vec!["media".into()],
            ..Grants::default()
        };
        let (id, secret) = auth.mint_s3_key("a", 1_000, 3, &grants).unwrap();
        assert!(is_function_s3_key(&id), "{id}");
        assert_eq!(secret.len(), 43);
        let (claims, derived) = auth.function_s3_key(&id).unwrap();
        assert_eq!(derived.as_str(), secret.as_str());
        assert_eq!((claims.function.as_str(), claims.version), ("a", 3));
        // Object buckets only: the S3 endpoint reaches nothing else.
        assert_eq!(claims.objects, ["media"]);
        assert!(claims.kv.is_empty() && claims.queues.is_empty());
        assert!(claims.expires_ms > now_ms() + 50_000);
        // Another id (a changed claim) has another secret, and so has the
        // same id on a node with another key.
        let mut wider = claims.clone();
        wider.objects.push("private".into());
        let widened = format!(
            "{S3_KEY_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wider).unwrap())
        );
        let (_, widened_secret) = auth.function_s3_key(&widened).unwrap();
        assert_ne!(widened_secret.as_str(), secret.as_str());
        let dir = tempfile::tempdir().unwrap();
        let other = Auth::open(
            mayfly_store::sqlite::open_auth(dir.path()).unwrap(),
            dir.path(),
            Box::new(|| [8; 32]),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert_ne!(
            other.function_s3_key(&id).unwrap().1.as_str(),
            secret.as_str()
        );
        // Created keys (20 characters) and garbage are not function keys.
        assert!(!is_function_s3_key("MFFNABCDEFGHIJKLMNOP"));
        assert!(auth.function_s3_key("MFFNnot-base64-json!!!!").is_none());
    }

    #[tokio::test]
    async fn a_credential_does_not_reach_a_recreated_function_of_the_same_name() {
        let (_dir, auth) = auth(Duration::from_secs(60)).await;
        let grants = Grants {
            kv: vec!["orders".into()],
            ..Grants::default()
        };
        let credential = auth.mint_credential("a", 1_000, 1, &grants).unwrap();
        let Principal::Function(claims) = auth
            .authenticate(Some(&format!("Bearer {credential}")))
            .unwrap()
        else {
            panic!("a credential authenticates as a function");
        };
        assert_eq!(claims.generation, 1_000);
        // The function it was minted for: its grants, narrowed to live's.
        let narrowed = narrow_to_live(&claims, Some((1_000, &grants))).unwrap();
        assert_eq!(narrowed.kv, ["orders"]);
        // Deleted: reaches nothing.
        assert!(narrow_to_live(&claims, None).unwrap().kv.is_empty());
        // Deleted and deployed again with the same name and grants: refused.
        let error = narrow_to_live(&claims, Some((2_000, &grants))).unwrap_err();
        assert!(matches!(error, AuthError::Unauthenticated(_)), "{error}");
        assert!(
            error.to_string().contains("earlier function `a`"),
            "{error}"
        );
        // The generation is signed: changing it breaks the signature.
        let (signed, tag) = credential.rsplit_once('.').unwrap();
        let payload = signed.strip_prefix(CREDENTIAL_PREFIX).unwrap();
        let mut forged: Credential =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        forged.generation = 2_000;
        let forged = format!(
            "{CREDENTIAL_PREFIX}{}.{tag}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap())
        );
        assert!(
            auth.authenticate(Some(&format!("Bearer {forged}")))
                .is_err()
        );
    }
}
