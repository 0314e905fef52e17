//! [`AuthStore`] for the fleet: admin API tokens in the KV bucket
//! `<ns>_auth` (`tok.<id>`), the audit log in the stream `<ns>_audit`, and
//! a watch of the bucket that tells each node of tokens created or revoked
//! elsewhere.

use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::stream::{
    self, DiscardPolicy, LastRawMessageErrorKind, RetentionPolicy, StorageType,
};
use bytes::Bytes;
use futures::StreamExt as _;
use mayfly_store::{
    AuditEntry, AuthStore, ChangeFeed, Result, StoreError, TokenChange, TokenRecord,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::{Fleet, backend};

/// Prefix of a token's key: `tok.<id>`.
const TOKEN_PREFIX: &str = "tok.";

/// Every token key, for the watch.
const TOKEN_KEYS: &str = "tok.>";

/// Changes a subscriber has not read yet before it lags (as the embedded
/// back-end's feeds).
const FEED_CAPACITY: usize = 1024;

/// How long a page of the audit log waits for its next entry before the
/// read fails (the server sends what it has at once; this is a stall).
const AUDIT_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the watcher waits before trying again after the server
/// refused or did not answer.
const WATCH_RETRY: Duration = Duration::from_secs(1);

/// A token as stored: [`TokenRecord`] does not serialise its hash (it is
/// never shown), but the store must keep it; and which store instance
/// wrote this state, so its own watcher does not tell its own changes a
/// second time.
#[derive(Debug, Serialize, Deserialize)]
struct StoredToken {
    id: String,
    name: String,
    hash: String,
    scopes: Vec<String>,
    functions: Vec<String>,
    created_at_ms: i64,
    revoked_at_ms: Option<i64>,
    writer: String,
}

impl StoredToken {
    fn new(token: &TokenRecord, writer: &str) -> Self {
        Self {
            id: token.id.clone(),
            name: token.name.clone(),
            hash: token.hash.clone(),
            scopes: token.scopes.clone(),
            functions: token.functions.clone(),
            created_at_ms: token.created_at_ms,
            revoked_at_ms: token.revoked_at_ms,
            writer: writer.to_string(),
        }
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt(format!("token {key} in the fleet: {e}")))
    }

    fn encode(&self) -> Result<Bytes> {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode token {}: {e}", self.id)))
    }

    fn record(self) -> TokenRecord {
        TokenRecord {
            id: self.id,
            name: self.name,
            hash: self.hash,
            scopes: self.scopes,
            functions: self.functions,
            created_at_ms: self.created_at_ms,
            revoked_at_ms: self.revoked_at_ms,
        }
    }

    /// What a subscriber is told about this state.
    fn change(&self) -> TokenChange {
        match self.revoked_at_ms {
            Some(_) => TokenChange::Revoked {
                id: self.id.clone(),
            },
            None => TokenChange::Created {
                id: self.id.clone(),
            },
        }
    }
}

/// An audit entry as stored: its id is the stream sequence, not stored.
#[derive(Debug, Serialize, Deserialize)]
struct StoredAudit {
    ts_ms: i64,
    actor: String,
    action: String,
    status: u16,
    detail: Option<String>,
}

/// Stops the watcher with the store.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tokens and the audit log on JetStream, shared by every node.
pub struct NatsAuth {
    tokens: kv::Store,
    client: async_nats::Client,
    jetstream: Context,
    audit: stream::Stream,
    /// The subject audit entries are published on (the stream's only one).
    audit_subject: String,
    /// At an edge node: its site and the hub's domain, to say where the
    /// audit log is when the hub is out of reach.
    edge: Option<(String, String)>,
    /// This instance's id, written into every token state it stores.
    writer: String,
    changes: broadcast::Sender<TokenChange>,
    _watcher: AbortOnDrop,
}

impl NatsAuth {
    /// An audit publish's error; at an edge node whose hub has no stream
    /// answering (its leaf link is down), one that says so.
    fn publish_error(&self, error: async_nats::jetstream::context::PublishError) -> StoreError {
        use async_nats::jetstream::context::PublishErrorKind;
        match &self.edge {
            Some((site, hub)) if error.kind() == PublishErrorKind::StreamNotFound => {
                StoreError::Backend(
                    format!(
                        "the audit log is at the hub (JetStream domain `{hub}`), which is \
                         unreachable from site `{site}`: admin changes wait until its leaf link \
                         is back"
                    )
                    .into(),
                )
            }
            _ => backend(error),
        }
    }

    /// Opens (creating if needed, with `replicas` copies) the token bucket
    /// and the audit stream, and starts watching the tokens: changes made
    /// from now on by any node reach [`AuthStore::watch`].
    pub async fn open(fleet: &Fleet, replicas: usize) -> Result<Self> {
        let js = fleet.jetstream();
        let tokens = open_bucket(js, &fleet.name("auth"), replicas).await?;
        let audit_subject = fleet.name("audit");
        let audit = js
            .get_or_create_stream(stream::Config {
                name: fleet.name("audit"),
                description: Some("Mayfly: the admin audit log".into()),
                subjects: vec![audit_subject.clone()],
                retention: RetentionPolicy::Limits,
                // Pruned by `prune_audit` with the node's configured
                // retention; a limit here would be a second, different one.
                discard: DiscardPolicy::Old,
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(backend)?;
        let (changes, _) = broadcast::channel(FEED_CAPACITY);
        let writer = uuid::Uuid::now_v7().to_string();
        // Watching before `open` returns: no change after it is missed.
        let watch = tokens.watch(TOKEN_KEYS).await.map_err(backend)?;
        let watcher = tokio::spawn(follow_tokens(
            tokens.clone(),
            watch,
            writer.clone(),
            changes.clone(),
        ));
        Ok(Self {
            tokens,
            client: fleet.client().clone(),
            jetstream: js.clone(),
            audit,
            audit_subject,
            edge: fleet
                .site()
                .map(|site| (site.to_string(), fleet.hub_domain().to_string())),
            writer,
            changes,
            _watcher: AbortOnDrop(watcher),
        })
    }

    fn emit(&self, change: TokenChange) {
        // No subscriber is not an error: nobody caches tokens.
        let _ = self.changes.send(change);
    }

    /// The audit entry at sequence `seq` or the first one after it.
    async fn audit_from(&self, seq: u64) -> Result<Option<AuditEntry>> {
        let message = match self
            .audit
            .get_first_raw_message_by_subject(&self.audit_subject, seq)
            .await
        {
            Ok(message) => message,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(backend(e)),
        };
        audit_entry(message.sequence, &message.payload).map(Some)
    }

    /// At most `limit` entries from sequence `from` on, read through one
    /// ordered consumer (the server pushes them back to back: one round
    /// trip per page, not per entry). `last` is the stream's last sequence
    /// when the caller looked: the page ends there.
    async fn audit_page(&self, from: u64, last: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let consumer = self
            .audit
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                description: Some("Mayfly: an audit page".into()),
                filter_subject: self.audit_subject.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                replay_policy: ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(backend)?;
        let mut messages = consumer.messages().await.map_err(backend)?;
        let mut entries = Vec::new();
        while entries.len() < limit {
            let message = tokio::time::timeout(AUDIT_READ_TIMEOUT, messages.next())
                .await
                .map_err(backend)?;
            let Some(message) = message else {
                break;
            };
            let message = message.map_err(backend)?;
            let info = message
                .info()
                .map_err(|e| StoreError::Backend(e.to_string().into()))?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            entries.push(audit_entry(sequence, &message.payload)?);
            if pending == 0 || sequence >= last {
                break;
            }
        }
        Ok(entries)
    }
}

/// The audit entry stored at `sequence`.
fn audit_entry(sequence: u64, payload: &[u8]) -> Result<AuditEntry> {
    let stored: StoredAudit = serde_json::from_slice(payload)
        .map_err(|e| StoreError::Corrupt(format!("audit entry {sequence} in the fleet: {e}")))?;
    Ok(AuditEntry {
        id: i64::try_from(sequence).unwrap_or(i64::MAX),
        ts_ms: stored.ts_ms,
        actor: stored.actor,
        action: stored.action,
        status: stored.status,
        detail: stored.detail,
    })
}

/// Opens the token bucket, creating it if no node has yet (a node creating
/// it at the same moment is not an error: its bucket is used).
async fn open_bucket(js: &Context, bucket: &str, replicas: usize) -> Result<kv::Store> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: bucket.to_string(),
            description: "Mayfly: admin API tokens".into(),
            // A token's value is its whole state: no history needed.
            history: 1,
            storage: StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        Err(error) => js.get_key_value(bucket).await.map_err(|_| backend(error)),
    }
}

/// Whether `id` can be a KV key's last part (NATS allows `[-/_=.a-zA-Z0-9]`
/// and `.` separates tokens).
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && !id.ends_with('.')
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.'))
}

/// Every token, live or revoked, oldest first.
async fn read_tokens(tokens: &kv::Store) -> Result<Vec<TokenRecord>> {
    let mut keys = tokens.keys().await.map_err(backend)?;
    let mut names = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(backend)?;
        if key.starts_with(TOKEN_PREFIX) {
            names.push(key);
        }
    }
    let mut records = Vec::with_capacity(names.len());
    for key in names {
        // `entry()` returns tombstones: a key deleted since the listing.
        match tokens.entry(key.as_str()).await.map_err(backend)? {
            Some(entry) if entry.operation == Operation::Put => {
                records.push(StoredToken::decode(&key, &entry.value)?.record());
            }
            _ => {}
        }
    }
    records.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    Ok(records)
}

/// The watcher: tells `changes` of every token change another store
/// instance (another node) made, for as long as the store is open.
///
/// A watch that fails or ends is re-created; changes in the gap are lost
/// to it, so once it watches again every token is re-announced (created or
/// revoked, as it stands): a subscriber re-reads on any change, which is
/// what a broadcast channel's `Lagged` asks for and cannot be sent.
async fn follow_tokens(
    tokens: kv::Store,
    mut watch: kv::Watch,
    writer: String,
    changes: broadcast::Sender<TokenChange>,
) {
    loop {
        while let Some(entry) = watch.next().await {
            match entry {
                Ok(entry) => {
                    if let Some(change) = foreign_change(&entry, &writer) {
                        let _ = changes.send(change);
                    }
                }
                Err(error) => {
                    tracing::warn!("the token watch failed: {error}; watching again");
                    break;
                }
            }
        }
        watch = loop {
            match tokens.watch(TOKEN_KEYS).await {
                Ok(watch) => break watch,
                Err(error) => {
                    tracing::warn!("cannot watch the tokens: {error}; retrying");
                    tokio::time::sleep(WATCH_RETRY).await;
                }
            }
        };
        // Read after the new watch exists, so nothing falls between.
        let all = loop {
            match read_tokens(&tokens).await {
                Ok(all) => break all,
                Err(error) => {
                    tracing::warn!("cannot re-read the tokens: {error}; retrying");
                    tokio::time::sleep(WATCH_RETRY).await;
                }
            }
        };
        for token in all {
            let id = token.id;
            let _ = changes.send(match token.revoked_at_ms {
                Some(_) => TokenChange::Revoked { id },
                None => TokenChange::Created { id },
            });
        }
    }
}

/// The change a watched entry tells, unless this instance (`writer`) made
/// it: the writer told its own change when its call returned.
fn foreign_change(entry: &kv::Entry, writer: &str) -> Option<TokenChange> {
    let id = entry.key.strip_prefix(TOKEN_PREFIX)?;
    match entry.operation {
        Operation::Put => match StoredToken::decode(&entry.key, &entry.value) {
            Ok(stored) if stored.writer == writer => None,
            Ok(stored) => Some(stored.change()),
            Err(error) => {
                // Still a change: the subscriber's re-read reports it.
                tracing::warn!("{error}");
                Some(TokenChange::Created { id: id.to_string() })
            }
        },
        // Nothing deletes tokens; a token removed by hand no longer
        // authenticates, which is what a revocation tells.
        Operation::Delete | Operation::Purge => Some(TokenChange::Revoked { id: id.to_string() }),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl AuthStore for NatsAuth {
    async fn create_token(&self, token: &TokenRecord) -> Result<()> {
        if !valid_id(&token.id) {
            return Err(StoreError::Conflict(format!(
                "`{}` cannot be a token id: use letters, digits, `-`, `_`, `=`, `/` and `.`",
                token.id
            )));
        }
        let key = format!("{TOKEN_PREFIX}{}", token.id);
        let value = StoredToken::new(token, &self.writer).encode()?;
        // `create`: ids never collide across the fleet.
        match self.tokens.create(&key, value).await {
            Ok(_) => {
                self.emit(TokenChange::Created {
                    id: token.id.clone(),
                });
                Ok(())
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Err(StoreError::Conflict(
                format!("a token with id `{}` already exists", token.id),
            )),
            Err(e) => {
                // A publish that timed out may have landed; this node's
                // watcher skips its own writes, so tell it now (a
                // subscriber only re-reads).
                self.emit(TokenChange::Created {
                    id: token.id.clone(),
                });
                Err(backend(e))
            }
        }
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        read_tokens(&self.tokens).await
    }

    async fn revoke_token(&self, id: &str) -> Result<bool> {
        if !valid_id(id) {
            return Ok(false);
        }
        let key = format!("{TOKEN_PREFIX}{id}");
        loop {
            let Some(entry) = self.tokens.entry(key.as_str()).await.map_err(backend)? else {
                return Ok(false);
            };
            if entry.operation != Operation::Put {
                return Ok(false);
            }
            let mut stored = StoredToken::decode(&key, &entry.value)?;
            if stored.revoked_at_ms.is_some() {
                return Ok(false);
            }
            stored.revoked_at_ms = Some(now_ms());
            stored.writer.clone_from(&self.writer);
            // Compare-and-swap on the revision read: a concurrent
            // revocation elsewhere is seen on the next read.
            match self
                .tokens
                .update(&key, stored.encode()?, entry.revision)
                .await
            {
                Ok(_) => {
                    self.emit(TokenChange::Revoked { id: id.to_string() });
                    return Ok(true);
                }
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => {
                    // May have landed: see `create_token`.
                    self.emit(TokenChange::Revoked { id: id.to_string() });
                    return Err(backend(e));
                }
            }
        }
    }

    async fn append_audit(
        &self,
        actor: &str,
        action: &str,
        status: u16,
        detail: Option<&str>,
    ) -> Result<i64> {
        let entry = StoredAudit {
            ts_ms: now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            status,
            detail: detail.map(str::to_string),
        };
        let payload = serde_json::to_vec(&entry)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode an audit entry: {e}")))?;
        // Durable once the stream acknowledged it.
        let ack = self
            .jetstream
            .publish(self.audit_subject.clone(), payload.into())
            .await
            .map_err(|e| self.publish_error(e))?
            .await
            .map_err(|e| self.publish_error(e))?;
        i64::try_from(ack.sequence).map_err(|_| {
            StoreError::Corrupt(format!("audit sequence {} is too large", ack.sequence))
        })
    }

    async fn audit(&self, after: i64, limit: usize, latest: bool) -> Result<Vec<AuditEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut next = u64::try_from(after).unwrap_or(0).saturating_add(1);
        let wanted = u64::try_from(limit).unwrap_or(u64::MAX);
        let state = self.audit.get_info().await.map_err(backend)?.state;
        if state.messages == 0 || next > state.last_sequence {
            // Nothing to read: an ordered consumer would wait for entries
            // yet to come.
            return Ok(Vec::new());
        }
        if latest {
            // Only the oldest entries are ever removed (`prune_audit`), so
            // the newest `limit` are the last `limit` sequences.
            next = next.max(state.last_sequence.saturating_sub(wanted - 1));
        }
        // An entry removed since (pruned) is skipped: the consumer starts
        // at the first one at or after `next`.
        self.audit_page(next, state.last_sequence, limit).await
    }

    async fn prune_audit(&self, before_ms: i64, keep_rows: u64) -> Result<usize> {
        let state = self.audit.get_info().await.map_err(backend)?.state;
        if state.messages == 0 {
            return Ok(0);
        }
        let (first, last) = (state.first_sequence, state.last_sequence);
        // Everything below `cut` goes. By count: the newest `keep_rows`
        // sequences stay.
        let mut cut = first.max(last.saturating_sub(keep_rows).saturating_add(1));
        // By age: entries are in sequence order and their times follow it
        // (up to the clock skew between nodes), so the first entry at or
        // after `before_ms` is found by bisection, O(log n) reads.
        let (mut low, mut high) = (cut, last.saturating_add(1));
        while low < high {
            let middle = low + (high - low) / 2;
            match self.audit_from(middle).await? {
                Some(entry) if entry.ts_ms < before_ms => {
                    low = u64::try_from(entry.id)
                        .unwrap_or(u64::MAX)
                        .saturating_add(1);
                }
                _ => high = middle,
            }
        }
        cut = low;
        if cut <= first {
            return Ok(0);
        }
        // Purges the sequences below `cut` only: entries appended
        // meanwhile are after it.
        let purged = self
            .audit
            .purge()
            .sequence(cut)
            .await
            .map_err(backend)?
            .purged;
        Ok(usize::try_from(purged).unwrap_or(usize::MAX))
    }

    fn watch(&self) -> ChangeFeed<TokenChange> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_must_fit_a_key() {
        assert!(valid_id("tok_3f9a"));
        for id in ["", ".a", "a.", "a..b", "a b", "a:b", "a*", "a>"] {
            assert!(!valid_id(id), "{id}");
        }
    }

    #[test]
    fn the_stored_token_keeps_its_hash() {
        let record = TokenRecord {
            id: "tok_1".into(),
            name: "ci".into(),
            hash: "h1".into(),
            scopes: vec!["read".into()],
            functions: Vec::new(),
            created_at_ms: 1,
            revoked_at_ms: None,
        };
        let bytes = StoredToken::new(&record, "w").encode().unwrap();
        let back = StoredToken::decode("tok.tok_1", &bytes).unwrap();
        assert_eq!(back.writer, "w");
        assert_eq!(back.record(), record);
        assert!(matches!(
            StoredToken::decode("tok.x", b"{"),
            Err(StoreError::Corrupt(_))
        ));
    }

    async fn open(servers: &crate::testing::NatsServers, node: &str, namespace: &str) -> NatsAuth {
        let fleet = Fleet::connect(&servers.options(node, namespace))
            .await
            .unwrap();
        NatsAuth::open(&fleet, fleet.replicas()).await.unwrap()
    }

    fn token(id: &str, created_at_ms: i64) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            name: "ci".into(),
            hash: format!("hash of {id}"),
            scopes: vec!["deploy".into()],
            functions: vec!["f".into()],
            created_at_ms,
            revoked_at_ms: None,
        }
    }

    async fn next(feed: &mut ChangeFeed<TokenChange>) -> TokenChange {
        tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("no token change within 10 s")
            .unwrap()
    }

    #[tokio::test]
    async fn tokens_and_their_changes_reach_every_node() {
        let servers = crate::testing::NatsServers::single();
        let a = open(&servers, "a", "auth1").await;
        let b = open(&servers, "b", "auth1").await;
        let mut feed_b = b.watch();
        a.create_token(&token("tok_2", 2)).await.unwrap();
        a.create_token(&token("tok_1", 1)).await.unwrap();
        assert_eq!(
            next(&mut feed_b).await,
            TokenChange::Created { id: "tok_2".into() }
        );
        assert_eq!(
            next(&mut feed_b).await,
            TokenChange::Created { id: "tok_1".into() }
        );
        // Oldest first, hash kept.
        assert_eq!(
            b.tokens().await.unwrap(),
            [token("tok_1", 1), token("tok_2", 2)]
        );

        // Ids are unique across the fleet.
        let error = b.create_token(&token("tok_1", 3)).await.unwrap_err();
        assert!(matches!(error, StoreError::Conflict(_)), "{error}");

        assert!(b.revoke_token("tok_1").await.unwrap());
        assert!(!a.revoke_token("tok_1").await.unwrap(), "already revoked");
        assert!(!a.revoke_token("tok_none").await.unwrap());
        assert!(!a.revoke_token("not a key").await.unwrap());
        let mut feed_a = a.watch();
        b.revoke_token("tok_2").await.unwrap();
        assert_eq!(
            next(&mut feed_a).await,
            TokenChange::Revoked { id: "tok_2".into() }
        );
        let revoked = a.tokens().await.unwrap();
        assert!(
            revoked.iter().all(|t| t.revoked_at_ms.is_some()),
            "{revoked:?}"
        );
        // B told its own revocations once, when it made them.
        let mut own = Vec::new();
        while let Ok(change) = feed_b.try_recv() {
            own.push(change);
        }
        assert_eq!(
            own,
            [
                TokenChange::Revoked { id: "tok_1".into() },
                TokenChange::Revoked { id: "tok_2".into() }
            ]
        );
    }

    #[tokio::test]
    async fn the_audit_log_is_shared_and_pages_by_sequence() {
        let servers = crate::testing::NatsServers::single();
        let a = open(&servers, "a", "audit1").await;
        let b = open(&servers, "b", "audit1").await;
        assert!(a.audit(0, 10, false).await.unwrap().is_empty());
        assert!(a.audit(0, 10, true).await.unwrap().is_empty());
        assert_eq!(a.prune_audit(i64::MAX, 0).await.unwrap(), 0);
        for status in [200, 403, 201] {
            a.append_audit("tok_1 (ci)", "POST /v1/x", status, None)
                .await
                .unwrap();
        }
        let id = b
            .append_audit("anonymous", "GET /v1/y", 401, Some("no token"))
            .await
            .unwrap();
        assert_eq!(id, 4);
        let all = a.audit(0, 10, false).await.unwrap();
        assert_eq!(
            all.iter().map(|e| (e.id, e.status)).collect::<Vec<_>>(),
            [(1, 200), (2, 403), (3, 201), (4, 401)]
        );
        assert_eq!(all[3].detail.as_deref(), Some("no token"));
        assert_eq!(all[3].actor, "anonymous");
        assert_eq!(
            b.audit(1, 2, false)
                .await
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(
            b.audit(0, 2, true)
                .await
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(b.audit(3, 10, true).await.unwrap().len(), 1);
        assert!(b.audit(4, 10, false).await.unwrap().is_empty());
        // By age: entries before the third one's time go (and no more).
        let cut_ms = all[2].ts_ms;
        let older = all.iter().filter(|e| e.ts_ms < cut_ms).count();
        assert_eq!(a.prune_audit(cut_ms, 100).await.unwrap(), older);
        assert_eq!(b.audit(0, 10, false).await.unwrap().len(), 4 - older);
        assert_eq!(b.audit(0, 10, true).await.unwrap().last().unwrap().id, 4);

        // A page of many entries (one consumer, not a read per entry).
        for _ in 0..300 {
            a.append_audit("anonymous", "GET /v1/z", 401, None)
                .await
                .unwrap();
        }
        let all = b.audit(0, 10_000, false).await.unwrap();
        assert_eq!(all.len(), 304 - older);
        assert!(all.windows(2).all(|w| w[0].id + 1 == w[1].id));
        let latest = b.audit(0, 100, true).await.unwrap();
        assert_eq!(latest.len(), 100);
        assert_eq!((latest[0].id, latest[99].id), (205, 304));
        assert_eq!(b.audit(250, 20, false).await.unwrap()[0].id, 251);
    }

    #[tokio::test]
    async fn token_changes_still_arrive_after_the_server_restarts() {
        let mut servers = crate::testing::NatsServers::single();
        let a = open(&servers, "a", "auth2").await;
        let b = open(&servers, "b", "auth2").await;
        let mut feed_b = b.watch();
        servers.restart(0);
        servers.wait_ready();
        // The clients reconnect by themselves; writes fail until then.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match a.create_token(&token("tok_after", 5)).await {
                // A try that timed out may have landed.
                Ok(()) | Err(StoreError::Conflict(_)) => break,
                Err(error) => assert!(tokio::time::Instant::now() < deadline, "{error}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Re-announcements may come first; the new token must come.
        let wanted = TokenChange::Created {
            id: "tok_after".into(),
        };
        let arrived = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match feed_b.recv().await {
                    Ok(change) if change == wanted => break,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => panic!("feed closed"),
                }
            }
        })
        .await;
        assert!(arrived.is_ok(), "B never heard of the token created on A");
    }
}
