//! The [`Registry`] on a JetStream KV bucket (`<ns>_registry`), shared by
//! every node of the fleet.
//!
//! Keys (NATS KV keys allow only `[-/_=.a-zA-Z0-9]`; see [`token`]):
//! - `fn.<f>`: [`FnState`], the function's own record: when it was
//!   created, its last version number and alias-move number, and the id of
//!   the write that last touched it.
//! - `ver.<f>.<n:020>`: a [`VersionRecord`].
//! - `alias.<f>.<a>`: an [`AliasRecord`].
//! - `move.<f>.<n:020>`: an [`AliasMove`], numbered per function.
//! - `route.<hex(route)>`: the function serving the route.
//!
//! Every change to a function is one atomic batch ([`crate::batch`]) that
//! rewrites (or deletes) `fn.<f>` expecting the revision read at the
//! start: `fn.<f>` serialises the writers of one function, so what the
//! write read of that function cannot have changed when it commits. Routes
//! are shared between functions, so each route key taken or released is
//! compare-and-swapped too. A refused batch is re-read from the start,
//! which turns into [`StoreError::Stale`] or [`StoreError::RouteTaken`]
//! when the new state says so, or into a retry when an unrelated change of
//! the same function landed first.
//!
//! This deviates from docs/fleet-design.md §4 in one way: the version
//! counter lives in `fn.<f>` instead of a separate `ctr.<f>` key, so that
//! one key guards everything a function's writes read (aliases, versions,
//! the move history) and ends the moves' numbering problem too (a
//! millisecond timestamp does not order two moves of one millisecond).

use std::sync::Arc;

use async_nats::jetstream::kv::{self, Operation};
use futures::TryStreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use mayfly_store::{
    ALIAS_MOVES_KEPT, AliasMove, AliasRecord, CanaryRecord, ChangeFeed, Digest, Expected,
    FunctionConfig, FunctionRecord, LIVE_ALIAS, MoveCause, Registry, RegistryChange, Result,
    StoreError, VersionRecord,
};

use crate::Fleet;
use crate::batch::{self, BatchError, MAX_BATCH, Write};
use crate::watch::{self, Watched};

/// Attempts of a write that keeps losing to unrelated writes of the same
/// function before it gives up with [`StoreError::Stale`].
const MAX_ATTEMPTS: usize = 16;

/// A function's own record, `fn.<f>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FnState {
    name: String,
    created_at_ms: i64,
    /// The highest version number ever given (versions are never reused,
    /// even after a delete or prune).
    last_version: u64,
    /// The number of the last alias move.
    moves: u64,
    /// Unique per write: after a commit whose answer never came, it tells
    /// whether the commit landed.
    write: String,
}

/// A name as one KV key token: names the platform validated
/// (`[a-z0-9_-]`) stand for themselves; anything else becomes `=` and its
/// hex, which no valid name starts with.
pub(crate) fn token(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        name.to_string()
    } else {
        format!("={}", hex::encode(name))
    }
}

/// The name a [`token`] stands for.
pub(crate) fn untoken(token: &str) -> Option<String> {
    match token.strip_prefix('=') {
        Some(hex) => String::from_utf8(hex::decode(hex).ok()?).ok(),
        None => Some(token.to_string()),
    }
}

fn fn_key(function: &str) -> String {
    format!("fn.{}", token(function))
}

fn ver_key(function: &str, version: u64) -> String {
    format!("ver.{}.{version:020}", token(function))
}

fn alias_key(function: &str, alias: &str) -> String {
    format!("alias.{}.{}", token(function), token(alias))
}

fn move_key(function: &str, number: u64) -> String {
    format!("move.{}.{number:020}", token(function))
}

fn route_key(route: &str) -> String {
    format!("route.{}", hex::encode(route))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Fails with [`StoreError::Stale`] unless the alias is where `expected`
/// says (`current`: where it points now).
fn check_expected(
    function: &str,
    alias: &str,
    expected: Expected,
    current: Option<u64>,
) -> Result<()> {
    if expected == Expected::Any || Expected::seen(current) == expected {
        return Ok(());
    }
    let now = match current {
        Some(version) => format!("points at version {version}"),
        None => "does not exist".to_string(),
    };
    let then = match expected {
        Expected::Version(version) => format!("version {version}"),
        _ => "nothing".to_string(),
    };
    Err(StoreError::Stale(format!(
        "alias `{alias}` of `{function}` changed while this change was prepared: it {now}, not \
         {then}; look again (`mayfly versions {function}`) and retry"
    )))
}

fn contended(function: &str) -> StoreError {
    StoreError::Stale(format!(
        "`{function}` kept changing while this change was prepared; look again and retry"
    ))
}

/// The registry on JetStream KV.
pub struct NatsRegistry {
    inner: Inner,
    watcher: tokio::task::JoinHandle<()>,
}

struct Inner {
    client: async_nats::Client,
    /// Where atomic batches publish ([`Fleet::write_prefix`]).
    write_prefix: String,
    /// The bucket, and the feed its watch (and this node) tells.
    watched: Arc<Watched<RegistryChange>>,
}

impl Drop for NatsRegistry {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// How a compare-and-swap commit ended.
enum Commit {
    Done,
    /// An expectation failed: nothing was written; re-read and retry.
    Conflict,
}

impl NatsRegistry {
    /// Opens (creating if needed) the fleet's registry bucket with
    /// `num_replicas` replicas, and starts the task that turns other
    /// nodes' changes into [`RegistryChange`]s.
    pub async fn open(fleet: &Fleet, num_replicas: usize) -> Result<Self> {
        let kv =
            batch::atomic_bucket(fleet.jetstream(), &fleet.name("registry"), num_replicas).await?;
        let write_prefix = fleet.write_prefix(&kv);
        let (watched, watcher) = Watched::start(fleet, kv, change_of, merge).await?;
        let inner = Inner {
            client: fleet.client().clone(),
            write_prefix,
            watched,
        };
        Ok(Self { inner, watcher })
    }
}

/// Adds `change` to those of one batch: a deletion replaces the
/// function's earlier changes.
fn merge(changes: &mut Vec<RegistryChange>, change: RegistryChange) {
    if let RegistryChange::Deleted { function } = &change {
        changes.retain(|c| !matches!(c, RegistryChange::Changed { function: f } if f == function));
    }
    watch::dedup(changes, change);
}

/// The change a KV entry means, if any: routes always change with their
/// function's record, so they tell nothing of their own.
fn change_of(entry: &kv::Entry) -> Option<RegistryChange> {
    let mut parts = entry.key.splitn(3, '.');
    let kind = parts.next()?;
    if !matches!(kind, "fn" | "ver" | "alias" | "move") {
        return None;
    }
    let function = untoken(parts.next()?)?;
    let deleted = matches!(entry.operation, Operation::Delete | Operation::Purge);
    Some(if kind == "fn" && deleted {
        RegistryChange::Deleted { function }
    } else {
        RegistryChange::Changed { function }
    })
}

impl Inner {
    /// A key's value and the revision a compare-and-swap of it expects
    /// (a tombstone's, or 0 when it never existed).
    async fn read<T: DeserializeOwned>(&self, key: &str) -> Result<(Option<T>, u64)> {
        // From the stream's leader, not `kv.entry`'s direct get: on a
        // cluster a direct get may be answered by a replica that has not
        // applied this node's own last write yet, and a read-modify-write
        // then misses what it just wrote (seen in CI: a deploy's alias move
        // found no function right after creating its version).
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("{}{key}", self.watched.kv.prefix);
        let message = match self
            .watched
            .kv
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(message) => message,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok((None, 0));
            }
            Err(error) => return Err(crate::backend(error)),
        };
        // A delete or purge is a marker with a `KV-Operation` header.
        if message.headers.get("KV-Operation").is_some() {
            return Ok((None, message.sequence));
        }
        let value = serde_json::from_slice(&message.payload)
            .map_err(|e| StoreError::Corrupt(format!("registry key {key}: {e}")))?;
        Ok((Some(value), message.sequence))
    }

    async fn value<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        Ok(self.read(key).await?.0)
    }

    /// The keys matching `pattern` (a subject wildcard after the bucket's
    /// prefix), deleted ones included: the server lists subjects, and a
    /// tombstone is a key's last message.
    async fn keys(&self, pattern: &str) -> Result<Vec<String>> {
        let subjects = self
            .watched
            .kv
            .stream
            .info_with_subjects(format!("{}{pattern}", self.watched.kv.prefix))
            .await
            .map_err(crate::backend)?;
        let subjects: Vec<(String, usize)> =
            subjects.try_collect().await.map_err(crate::backend)?;
        let mut keys: Vec<String> = subjects
            .into_iter()
            .filter_map(|(subject, _)| {
                subject
                    .strip_prefix(&self.watched.kv.prefix)
                    .map(str::to_string)
            })
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// The values of the keys matching `pattern`, deleted ones left out.
    async fn values<T: DeserializeOwned>(&self, pattern: &str) -> Result<Vec<T>> {
        let keys = self.keys(pattern).await?;
        let values =
            futures::future::try_join_all(keys.iter().map(|key| self.value::<T>(key))).await?;
        Ok(values.into_iter().flatten().collect())
    }

    /// Commits `writes`; `f`'s record (rewritten with id `write`, or
    /// deleted when `write` is `None`) tells whether a commit whose answer
    /// never came landed.
    async fn commit(
        &self,
        function: &str,
        write: Option<&str>,
        writes: &[Write],
    ) -> Result<Commit> {
        let mut own = self.watched.own.lock().await;
        let error = match batch::commit(&self.client, &self.write_prefix, writes).await {
            Ok(done) => {
                own.extend(done.first..=done.last);
                return Ok(Commit::Done);
            }
            Err(BatchError::WrongLastSequence) => return Ok(Commit::Conflict),
            Err(BatchError::Failed(error)) => return Err(error),
            Err(BatchError::Unknown(error)) => error,
        };
        drop(own);
        // The answer was lost (a timeout, a failover): every batch rewrites
        // or deletes `fn.<f>`, so its record says whether this one landed.
        // If it did not, report the error rather than retry: a batch still
        // in flight could land after a retry and write twice. The watcher
        // tells the feed about a batch that landed unseen.
        let (state, _) = self.read::<FnState>(&fn_key(function)).await?;
        let landed = match (write, state) {
            (Some(id), Some(state)) => state.write == id,
            (None, None) => true,
            _ => false,
        };
        if landed { Ok(Commit::Done) } else { Err(error) }
    }

    fn emit(&self, change: RegistryChange) {
        self.watched.emit(change);
    }

    /// [`Self::commit`]s a change of `function` and, when it landed, tells
    /// this node's watchers at once (other nodes hear it from the watch);
    /// false on a conflict, for the caller to read again and retry.
    async fn commit_changed(&self, function: &str, write: &str, writes: &[Write]) -> Result<bool> {
        let landed = matches!(
            self.commit(function, Some(write), writes).await?,
            Commit::Done
        );
        if landed {
            self.emit(RegistryChange::Changed {
                function: function.to_string(),
            });
        }
        Ok(landed)
    }

    /// The routes `function` serves at `version`.
    async fn routes_of(&self, function: &str, version: u64) -> Result<Vec<String>> {
        Ok(self
            .value::<VersionRecord>(&ver_key(function, version))
            .await?
            .map(|v| v.config.routes)
            .unwrap_or_default())
    }

    /// The writes that make `new` the routes of `function` instead of
    /// `old`: refused with [`StoreError::RouteTaken`] if another function
    /// serves one of them.
    async fn route_writes(
        &self,
        function: &str,
        old: &[String],
        new: &[String],
    ) -> Result<Vec<Write>> {
        let mut writes = Vec::new();
        for route in new {
            let key = route_key(route);
            let (owner, revision) = self.read::<String>(&key).await?;
            match owner {
                Some(owner) if owner == function => {}
                Some(owner) => {
                    return Err(StoreError::RouteTaken {
                        route: route.clone(),
                        owner,
                    });
                }
                None => writes.push(Write::put(key, json(&function)?).expect(revision)),
            }
        }
        for route in old.iter().filter(|r| !new.contains(r)) {
            let key = route_key(route);
            if let (Some(owner), revision) = self.read::<String>(&key).await?
                && owner == function
            {
                writes.push(Write::delete(key).expect(revision));
            }
        }
        Ok(writes)
    }

    /// The aliases of `function`, `live` first, then by name.
    async fn aliases(&self, function: &str) -> Result<Vec<AliasRecord>> {
        let mut aliases: Vec<AliasRecord> =
            self.values(&format!("alias.{}.*", token(function))).await?;
        aliases.sort_by(|a, b| {
            (a.alias != LIVE_ALIAS, &a.alias).cmp(&(b.alias != LIVE_ALIAS, &b.alias))
        });
        Ok(aliases)
    }

    /// The writes that add move number `number` to `function`'s history
    /// and drop the one that falls out of it.
    fn move_writes(&self, number: u64, record: &AliasMove) -> Result<Vec<Write>> {
        let mut writes = vec![Write::put(
            move_key(&record.function, number),
            json(record)?,
        )];
        let kept = u64::try_from(ALIAS_MOVES_KEPT).unwrap_or(u64::MAX);
        if number > kept {
            writes.push(Write::delete(move_key(&record.function, number - kept)));
        }
        Ok(writes)
    }

    async fn create_version(
        &self,
        function: &str,
        digest: &Digest,
        config: &FunctionConfig,
        expected_live: Expected,
    ) -> Result<VersionRecord> {
        for _ in 0..MAX_ATTEMPTS {
            let (state, fn_revision) = self.read::<FnState>(&fn_key(function)).await?;
            let live = match &state {
                Some(_) => {
                    self.value::<AliasRecord>(&alias_key(function, LIVE_ALIAS))
                        .await?
                }
                None => None,
            };
            check_expected(
                function,
                LIVE_ALIAS,
                expected_live,
                live.as_ref().map(|a| a.version),
            )?;
            let old_routes = match &live {
                Some(live) => self.routes_of(function, live.version).await?,
                None => Vec::new(),
            };
            let route_writes = self
                .route_writes(function, &old_routes, &config.routes)
                .await?;

            let now = now_ms();
            let write = uuid::Uuid::now_v7().simple().to_string();
            let state = match state {
                Some(state) => FnState {
                    last_version: state.last_version + 1,
                    moves: state.moves + 1,
                    write: write.clone(),
                    ..state
                },
                None => FnState {
                    name: function.to_string(),
                    created_at_ms: now,
                    last_version: 1,
                    moves: 1,
                    write: write.clone(),
                },
            };
            let version = VersionRecord {
                function: function.to_string(),
                version: state.last_version,
                digest: digest.to_string(),
                config: config.clone(),
                created_at_ms: now,
            };
            let alias = AliasRecord {
                function: function.to_string(),
                alias: LIVE_ALIAS.to_string(),
                version: version.version,
                canary: None,
                previous_version: live.as_ref().map(|live| live.version),
                updated_at_ms: now,
            };
            let moved = AliasMove {
                function: function.to_string(),
                alias: LIVE_ALIAS.to_string(),
                at_ms: now,
                from_version: live.as_ref().map(|live| live.version),
                version: version.version,
                canary: None,
                cause: MoveCause::Deploy,
                detail: String::new(),
            };
            let mut writes = vec![
                Write::put(fn_key(function), json(&state)?).expect(fn_revision),
                Write::put(ver_key(function, version.version), json(&version)?),
                Write::put(alias_key(function, LIVE_ALIAS), json(&alias)?),
            ];
            writes.extend(self.move_writes(state.moves, &moved)?);
            writes.extend(route_writes);
            if self.commit_changed(function, &write, &writes).await? {
                return Ok(version);
            }
        }
        Err(contended(function))
    }

    async fn function(&self, name: &str) -> Result<Option<FunctionRecord>> {
        let Some(state) = self.value::<FnState>(&fn_key(name)).await? else {
            return Ok(None);
        };
        self.function_of(state).await
    }

    async fn function_of(&self, state: FnState) -> Result<Option<FunctionRecord>> {
        let name = state.name;
        let Some(live) = self
            .value::<AliasRecord>(&alias_key(&name, LIVE_ALIAS))
            .await?
        else {
            // `fn.<f>` and `live` are written and deleted in the same
            // batches: one without the other is corrupt.
            return Err(StoreError::Corrupt(format!(
                "function {name} has no live alias"
            )));
        };
        let Some(version) = self
            .value::<VersionRecord>(&ver_key(&name, live.version))
            .await?
        else {
            return Err(StoreError::Corrupt(format!(
                "function {name} is live at version {}, which is missing",
                live.version
            )));
        };
        Ok(Some(FunctionRecord {
            name,
            created_at_ms: state.created_at_ms,
            live: version,
        }))
    }

    async fn functions(&self) -> Result<Vec<FunctionRecord>> {
        let states: Vec<FnState> = self.values("fn.*").await?;
        let records =
            futures::future::try_join_all(states.into_iter().map(|s| self.function_of(s))).await?;
        let mut records: Vec<FunctionRecord> = records.into_iter().flatten().collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    async fn versions(&self, name: &str) -> Result<Vec<VersionRecord>> {
        let mut versions: Vec<VersionRecord> =
            self.values(&format!("ver.{}.*", token(name))).await?;
        versions.sort_by_key(|v| std::cmp::Reverse(v.version));
        Ok(versions)
    }

    async fn delete_function(&self, name: &str) -> Result<bool> {
        for _ in 0..MAX_ATTEMPTS {
            let (state, fn_revision) = self.read::<FnState>(&fn_key(name)).await?;
            if state.is_none() {
                return Ok(false);
            }
            let f = token(name);
            let live = self
                .value::<AliasRecord>(&alias_key(name, LIVE_ALIAS))
                .await?;
            let routes = match &live {
                Some(live) => self.routes_of(name, live.version).await?,
                None => Vec::new(),
            };
            // The record, the aliases and the routes go in the first batch:
            // once it lands the function is gone and its routes are free.
            // Versions and moves nobody reads any more follow in as many
            // batches as they need (a function re-created meanwhile
            // overwrites them without looking).
            let mut first = self.route_writes(name, &routes, &[]).await?;
            first.extend(
                self.keys(&format!("alias.{f}.*"))
                    .await?
                    .into_iter()
                    .map(Write::delete),
            );
            let mut rest: Vec<Write> = self
                .keys(&format!("ver.{f}.*"))
                .await?
                .into_iter()
                .map(Write::delete)
                .collect();
            rest.extend(
                self.keys(&format!("move.{f}.*"))
                    .await?
                    .into_iter()
                    .map(Write::delete),
            );
            let room = MAX_BATCH.saturating_sub(first.len() + 1);
            let later = rest.split_off(rest.len().min(room));
            first.extend(rest);
            // The record last: a watcher sees the other keys go first, so
            // the function's last change it hears of is its deletion.
            first.push(Write::delete(fn_key(name)).expect(fn_revision));
            match self.commit(name, None, &first).await? {
                Commit::Conflict => continue,
                Commit::Done => {}
            }
            self.emit(RegistryChange::Deleted {
                function: name.to_string(),
            });
            for chunk in later.chunks(MAX_BATCH) {
                if let Err(error) = batch::commit(&self.client, &self.write_prefix, chunk).await {
                    // The function is gone already; what is left is
                    // unreachable and overwritten by a re-deploy.
                    tracing::warn!(
                        function = name,
                        ?error,
                        "leftover registry keys not deleted"
                    );
                }
            }
            return Ok(true);
        }
        Err(contended(name))
    }

    #[allow(clippy::too_many_arguments)] // The contract's own arguments.
    async fn set_alias(
        &self,
        function: &str,
        alias: &str,
        version: u64,
        canary: Option<CanaryRecord>,
        expected: Expected,
        cause: MoveCause,
        detail: &str,
    ) -> Result<AliasRecord> {
        for _ in 0..MAX_ATTEMPTS {
            let (state, fn_revision) = self.read::<FnState>(&fn_key(function)).await?;
            let Some(state) = state else {
                return Err(StoreError::FunctionNotFound(function.to_string()));
            };
            let current = self
                .value::<AliasRecord>(&alias_key(function, alias))
                .await?;
            check_expected(
                function,
                alias,
                expected,
                current.as_ref().map(|a| a.version),
            )?;
            let mut target = None;
            for wanted in std::iter::once(version).chain(canary.map(|c| c.version)) {
                let found = self
                    .value::<VersionRecord>(&ver_key(function, wanted))
                    .await?;
                match found {
                    Some(found) => {
                        if wanted == version {
                            target = Some(found);
                        }
                    }
                    None => {
                        return Err(StoreError::VersionNotFound {
                            function: function.to_string(),
                            version: wanted,
                        });
                    }
                }
            }
            let route_writes = match (alias == LIVE_ALIAS, &target) {
                (true, Some(target)) => {
                    let old = match &current {
                        Some(current) => self.routes_of(function, current.version).await?,
                        None => Vec::new(),
                    };
                    self.route_writes(function, &old, &target.config.routes)
                        .await?
                }
                _ => Vec::new(),
            };
            let now = now_ms();
            let previous_version = match &current {
                Some(current) if current.version != version => Some(current.version),
                Some(current) => current.previous_version,
                None => None,
            };
            let record = AliasRecord {
                function: function.to_string(),
                alias: alias.to_string(),
                version,
                canary,
                previous_version,
                updated_at_ms: now,
            };
            let moved = AliasMove {
                function: function.to_string(),
                alias: alias.to_string(),
                at_ms: now,
                from_version: current.as_ref().map(|c| c.version),
                version,
                canary,
                cause,
                detail: detail.to_string(),
            };
            let write = uuid::Uuid::now_v7().simple().to_string();
            let state = FnState {
                moves: state.moves + 1,
                write: write.clone(),
                ..state
            };
            let mut writes = vec![
                Write::put(fn_key(function), json(&state)?).expect(fn_revision),
                Write::put(alias_key(function, alias), json(&record)?),
            ];
            writes.extend(self.move_writes(state.moves, &moved)?);
            writes.extend(route_writes);
            if self.commit_changed(function, &write, &writes).await? {
                return Ok(record);
            }
        }
        Err(contended(function))
    }

    async fn alias_moves(&self, function: &str, limit: usize) -> Result<Vec<AliasMove>> {
        let Some(state) = self.value::<FnState>(&fn_key(function)).await? else {
            return Ok(Vec::new());
        };
        let kept = u64::try_from(ALIAS_MOVES_KEPT).unwrap_or(u64::MAX);
        let oldest = state.moves.saturating_sub(kept) + 1;
        let numbers: Vec<u64> = (oldest..=state.moves).rev().take(limit).collect();
        let moves = futures::future::try_join_all(
            numbers
                .iter()
                .map(|n| async move { self.value::<AliasMove>(&move_key(function, *n)).await }),
        )
        .await?;
        Ok(moves.into_iter().flatten().collect())
    }

    /// Rewrites `fn.<f>` as the guard of a change that does not otherwise
    /// touch it, expecting `revision`.
    fn touch(&self, state: FnState, revision: u64) -> Result<(Write, String)> {
        let write = uuid::Uuid::now_v7().simple().to_string();
        let key = fn_key(&state.name);
        let state = FnState {
            write: write.clone(),
            ..state
        };
        Ok((Write::put(key, json(&state)?).expect(revision), write))
    }

    async fn delete_alias(&self, function: &str, alias: &str) -> Result<bool> {
        if alias == LIVE_ALIAS {
            return Err(StoreError::Conflict(format!(
                "the `{LIVE_ALIAS}` alias of `{function}` cannot be deleted: it is what the \
                 function's routes serve; delete the function instead"
            )));
        }
        for _ in 0..MAX_ATTEMPTS {
            let (state, fn_revision) = self.read::<FnState>(&fn_key(function)).await?;
            let Some(state) = state else {
                return Ok(false);
            };
            if self
                .value::<AliasRecord>(&alias_key(function, alias))
                .await?
                .is_none()
            {
                return Ok(false);
            }
            let (guard, write) = self.touch(state, fn_revision)?;
            let writes = [guard, Write::delete(alias_key(function, alias))];
            if self.commit_changed(function, &write, &writes).await? {
                return Ok(true);
            }
        }
        Err(contended(function))
    }

    async fn delete_version(&self, function: &str, version: u64) -> Result<()> {
        for _ in 0..MAX_ATTEMPTS {
            let (state, fn_revision) = self.read::<FnState>(&fn_key(function)).await?;
            let Some(state) = state else {
                return Err(StoreError::FunctionNotFound(function.to_string()));
            };
            if self
                .value::<VersionRecord>(&ver_key(function, version))
                .await?
                .is_none()
            {
                return Err(StoreError::VersionNotFound {
                    function: function.to_string(),
                    version,
                });
            }
            mayfly_store::refuse_if_aliased(function, version, self.aliases(function).await?)?;
            let (guard, write) = self.touch(state, fn_revision)?;
            let writes = [guard, Write::delete(ver_key(function, version))];
            if self.commit_changed(function, &write, &writes).await? {
                return Ok(());
            }
        }
        Err(contended(function))
    }

    async fn prune_versions(&self, function: &str, keep: usize) -> Result<Vec<u64>> {
        let mut pruned = Vec::new();
        let mut attempts = 0;
        loop {
            let (state, fn_revision) = self.read::<FnState>(&fn_key(function)).await?;
            let Some(state) = state else {
                break;
            };
            let aliases = self.aliases(function).await?;
            let mut doomed: Vec<u64> = self
                .versions(function)
                .await?
                .into_iter()
                .skip(keep)
                .map(|v| v.version)
                .filter(|v| !aliases.iter().any(|a| a.points_at(*v)))
                .collect();
            if doomed.is_empty() {
                break;
            }
            // One batch at a time, the guard included; a long list takes
            // several rounds.
            doomed.truncate(MAX_BATCH - 1);
            let (guard, write) = self.touch(state, fn_revision)?;
            let mut writes = vec![guard];
            writes.extend(doomed.iter().map(|v| Write::delete(ver_key(function, *v))));
            match self.commit(function, Some(&write), &writes).await? {
                Commit::Done => pruned.extend(doomed),
                Commit::Conflict => {
                    attempts += 1;
                    if attempts >= MAX_ATTEMPTS {
                        return Err(contended(function));
                    }
                }
            }
        }
        if !pruned.is_empty() {
            self.emit(RegistryChange::Changed {
                function: function.to_string(),
            });
        }
        pruned.sort_unstable();
        Ok(pruned)
    }
}

#[async_trait::async_trait]
impl Registry for NatsRegistry {
    async fn create_version(
        &self,
        function: &str,
        digest: &Digest,
        config: &FunctionConfig,
        expected_live: Expected,
    ) -> Result<VersionRecord> {
        self.inner
            .create_version(function, digest, config, expected_live)
            .await
    }

    async fn function(&self, name: &str) -> Result<Option<FunctionRecord>> {
        self.inner.function(name).await
    }

    async fn functions(&self) -> Result<Vec<FunctionRecord>> {
        self.inner.functions().await
    }

    async fn versions(&self, name: &str) -> Result<Vec<VersionRecord>> {
        self.inner.versions(name).await
    }

    async fn delete_function(&self, name: &str) -> Result<bool> {
        self.inner.delete_function(name).await
    }

    async fn version(&self, function: &str, version: u64) -> Result<Option<VersionRecord>> {
        self.inner.value(&ver_key(function, version)).await
    }

    async fn aliases(&self, function: &str) -> Result<Vec<AliasRecord>> {
        self.inner.aliases(function).await
    }

    async fn set_alias(
        &self,
        function: &str,
        alias: &str,
        version: u64,
        canary: Option<CanaryRecord>,
        expected: Expected,
        cause: MoveCause,
        detail: &str,
    ) -> Result<AliasRecord> {
        self.inner
            .set_alias(function, alias, version, canary, expected, cause, detail)
            .await
    }

    async fn alias_moves(&self, function: &str, limit: usize) -> Result<Vec<AliasMove>> {
        self.inner.alias_moves(function, limit).await
    }

    async fn delete_alias(&self, function: &str, alias: &str) -> Result<bool> {
        self.inner.delete_alias(function, alias).await
    }

    async fn delete_version(&self, function: &str, version: u64) -> Result<()> {
        self.inner.delete_version(function, version).await
    }

    async fn prune_versions(&self, function: &str, keep: usize) -> Result<Vec<u64>> {
        self.inner.prune_versions(function, keep).await
    }

    fn watch(&self) -> ChangeFeed<RegistryChange> {
        self.inner.watched.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::NatsServers;
    use std::time::Duration;

    async fn node(servers: &NatsServers, name: &str) -> NatsRegistry {
        let fleet = Fleet::connect(&servers.options(name, "t")).await.unwrap();
        NatsRegistry::open(&fleet, fleet.replicas()).await.unwrap()
    }

    #[tokio::test]
    async fn concurrent_deploys_from_two_nodes_lose_nothing() {
        let servers = NatsServers::single();
        let a = node(&servers, "a").await;
        let b = node(&servers, "b").await;
        let digest = Digest::of(b"x");
        let config = FunctionConfig::default();
        a.create_version("f", &digest, &config, Expected::Any)
            .await
            .unwrap();

        // Both saw version 1: exactly one lands.
        let (x, y) = tokio::join!(
            a.create_version("f", &digest, &config, Expected::Version(1)),
            b.create_version("f", &digest, &config, Expected::Version(1)),
        );
        assert!(x.is_ok() != y.is_ok(), "exactly one wins: {x:?} / {y:?}");
        let loser = if x.is_err() { x } else { y };
        assert!(matches!(loser, Err(StoreError::Stale(_))), "{loser:?}");

        // Neither checks: both land, one after the other, with distinct
        // versions, and the history has every move.
        let (x, y) = tokio::join!(
            a.create_version("f", &digest, &config, Expected::Any),
            b.create_version("f", &digest, &config, Expected::Any),
        );
        let mut got = [x.unwrap().version, y.unwrap().version];
        got.sort_unstable();
        assert_eq!(got, [3, 4]);
        let versions: Vec<u64> = a
            .versions("f")
            .await
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(versions, [4, 3, 2, 1]);
        assert_eq!(b.function("f").await.unwrap().unwrap().live.version, 4);
        assert_eq!(a.alias_moves("f", 100).await.unwrap().len(), 4);
    }

    async fn next(feed: &mut ChangeFeed<RegistryChange>) -> RegistryChange {
        tokio::time::timeout(Duration::from_secs(5), feed.recv())
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn a_node_hears_of_another_nodes_changes_once_per_change() {
        let servers = NatsServers::single();
        let a = node(&servers, "a").await;
        let b = node(&servers, "b").await;
        let mut heard = b.watch();
        let digest = Digest::of(b"x");
        a.create_version("f", &digest, &FunctionConfig::default(), Expected::Any)
            .await
            .unwrap();
        let changed = RegistryChange::Changed {
            function: "f".into(),
        };
        assert_eq!(next(&mut heard).await, changed);
        assert!(a.delete_function("f").await.unwrap());
        let deleted = RegistryChange::Deleted {
            function: "f".into(),
        };
        assert_eq!(next(&mut heard).await, deleted);
        // One batch, one change each: nothing else arrives.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(heard.try_recv().is_err());
    }

    #[test]
    fn names_that_are_not_plain_become_hex_tokens() {
        assert_eq!(token("my-fn_1"), "my-fn_1");
        assert_eq!(token("a.b"), "=612e62");
        assert_eq!(untoken(&token("a.b c")).unwrap(), "a.b c");
        assert_eq!(untoken("plain").unwrap(), "plain");
    }
}
