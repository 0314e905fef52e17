//! The embedded event store: `<data dir>/events.db` (SQLite) for KV, object
//! metadata, queues, inboxes, triggers and dead letters, and blob files for
//! object bytes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

use super::BlobDir;
use super::{migrate, now_ms, offload, open_connection, to_i64, to_u64, write_tx};
use crate::changes::Feed;
use crate::events::*;
use crate::{BlobKind, Digest, Result, StoreError};
use crate::{BucketChange, ChangeFeed, TriggerChange};

const MIGRATIONS: &[&str] = &[r#"
    CREATE TABLE triggers (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        function      TEXT NOT NULL,
        kind          TEXT NOT NULL,
        target        TEXT NOT NULL,
        spec          TEXT NOT NULL,
        created_ms    INTEGER NOT NULL,
        last_fired_ms INTEGER
    );
    CREATE INDEX triggers_by_target ON triggers (kind, target);
    CREATE INDEX triggers_by_function ON triggers (function);

    CREATE TABLE kv (
        bucket     TEXT NOT NULL,
        key        TEXT NOT NULL,
        value      BLOB NOT NULL,
        revision   INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (bucket, key)
    ) WITHOUT ROWID;
    -- One counter for every KV revision: a re-created key never reuses one.
    CREATE TABLE kv_revision (only INTEGER PRIMARY KEY CHECK (only = 0), last INTEGER NOT NULL);
    INSERT INTO kv_revision VALUES (0, 0);

    CREATE TABLE objects (
        bucket       TEXT NOT NULL,
        key          TEXT NOT NULL,
        digest       TEXT NOT NULL,
        size         INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        modified_ms  INTEGER NOT NULL,
        PRIMARY KEY (bucket, key)
    ) WITHOUT ROWID;
    CREATE INDEX objects_by_digest ON objects (digest);

    -- Named queues' messages and functions' inboxes ('@' || function).
    -- AUTOINCREMENT: ids never go back, so id order is commit order.
    CREATE TABLE messages (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        queue         TEXT NOT NULL,
        event_id      TEXT NOT NULL,
        type          TEXT NOT NULL,
        source        TEXT NOT NULL,
        subject       TEXT,
        time_ms       INTEGER NOT NULL,
        content_type  TEXT,
        data          BLOB NOT NULL,
        path          TEXT,
        order_key     TEXT,
        trigger_id    INTEGER,
        max_attempts  INTEGER,
        backoff_ms    INTEGER,
        attempts      INTEGER NOT NULL DEFAULT 0,
        visible_at_ms INTEGER NOT NULL,
        leased        INTEGER NOT NULL DEFAULT 0,
        last_error    TEXT,
        enqueued_ms   INTEGER NOT NULL
    );
    CREATE INDEX messages_visible ON messages (queue, visible_at_ms, id);
    CREATE INDEX messages_ordered ON messages (queue, order_key, id) WHERE order_key IS NOT NULL;
    CREATE INDEX messages_leased ON messages (leased) WHERE leased = 1;

    CREATE TABLE dead_letters (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        function     TEXT NOT NULL,
        event_id     TEXT NOT NULL,
        type         TEXT NOT NULL,
        source       TEXT NOT NULL,
        subject      TEXT,
        time_ms      INTEGER NOT NULL,
        content_type TEXT,
        data         BLOB NOT NULL,
        path         TEXT,
        order_key    TEXT,
        trigger_id   INTEGER,
        max_attempts INTEGER NOT NULL,
        backoff_ms   INTEGER NOT NULL,
        attempts     INTEGER NOT NULL,
        last_error   TEXT NOT NULL,
        died_ms      INTEGER NOT NULL
    );
    CREATE INDEX dead_by_function ON dead_letters (function, id);
"#];

/// Columns of `messages` read into a [`Delivery`], in [`delivery`]'s order.
const DELIVERY_COLUMNS: &str = "id, attempts, event_id, type, source, \
     COALESCE(subject, CASE WHEN substr(queue, 1, 1) = '@' THEN NULL ELSE CAST(id AS TEXT) END), \
     time_ms, content_type, data, path, trigger_id, max_attempts, backoff_ms, enqueued_ms";

const DEAD_COLUMNS: &str = "id, event_id, type, source, subject, time_ms, content_type, \
     length(data), attempts, last_error, died_ms, trigger_id";

/// KV, objects, queues, inboxes, triggers and dead letters on SQLite.
///
/// Two connections: `writes` (synchronous=FULL) for everything acknowledged
/// to a user, which must survive a power loss once answered; `dispatch`
/// (synchronous=NORMAL) for the dispatcher's claims and settlements, which
/// a crash may only roll back into a redelivery. WAL lets them interleave.
/// Each call runs on the blocking pool (`sqlite::offload`).
pub struct EmbeddedEvents {
    db: Arc<EventsDb>,
}

/// The connections, the object files and the trigger feed, with the
/// synchronous code of every call.
struct EventsDb {
    writes: Mutex<Connection>,
    dispatch: Mutex<Connection>,
    objects: BlobDir,
    trigger_changes: Feed<TriggerChange>,
}

impl EmbeddedEvents {
    /// Opens or creates the database at `path`, with object bytes in
    /// `objects`.
    pub fn open(path: &Path, objects: BlobDir) -> Result<Self> {
        let writes = open_connection(path)?;
        migrate(&writes, MIGRATIONS)?;
        let dispatch = open_connection(path)?;
        dispatch.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Self {
            db: Arc::new(EventsDb {
                writes: Mutex::new(writes),
                dispatch: Mutex::new(dispatch),
                objects,
                trigger_changes: Feed::new(),
            }),
        })
    }
}

impl EventsDb {
    fn writes(&self) -> MutexGuard<'_, Connection> {
        // Every change runs in a transaction that rolls back on drop, so a
        // panic under the lock leaves nothing half done.
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dispatch(&self) -> MutexGuard<'_, Connection> {
        self.dispatch.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn to_u32(value: i64) -> u32 {
    u32::try_from(value).unwrap_or(if value < 0 { 0 } else { u32::MAX })
}

fn inbox(function: &str) -> String {
    format!("@{function}")
}

fn queue_name(queue: &QueueRef) -> String {
    match queue {
        QueueRef::Named(name) => name.clone(),
        QueueRef::Inbox(function) => inbox(function),
    }
}

/// `key >= prefix` bounds the index scan; `substr` keeps only the prefix's
/// keys (a LIKE pattern would need escaping of `%` and `_`).
const PREFIX_FILTER: &str = "key >= ?2 AND substr(key, 1, length(?2)) = ?2 AND key > ?3";

/// Runs a (cached) statement and maps every row.
fn rows<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut statement = conn.prepare_cached(sql)?;
    let found = statement
        .query_map(params, map)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(found)
}

fn delivery(row: &Row<'_>) -> rusqlite::Result<Delivery> {
    let max_attempts: Option<i64> = row.get(11)?;
    let backoff_ms: Option<i64> = row.get(12)?;
    Ok(Delivery {
        id: row.get(0)?,
        attempt: to_u32(row.get(1)?),
        event: CloudEvent {
            id: row.get(2)?,
            ty: row.get(3)?,
            source: row.get(4)?,
            subject: row.get(5)?,
            time_ms: row.get(6)?,
            content_type: row.get(7)?,
            data: row.get(8)?,
        },
        path: row.get(9)?,
        trigger_id: row.get(10)?,
        retry: max_attempts.map(|max| RetryPolicy {
            max_attempts: to_u32(max),
            backoff_ms: to_u64(backoff_ms.unwrap_or(0)),
        }),
        enqueued_ms: row.get(13)?,
    })
}

fn dead_letter(row: &Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: row.get(0)?,
        event_id: row.get(1)?,
        ty: row.get(2)?,
        source: row.get(3)?,
        subject: row.get(4)?,
        time_ms: row.get(5)?,
        content_type: row.get(6)?,
        size: to_u64(row.get(7)?),
        attempts: to_u32(row.get(8)?),
        last_error: row.get(9)?,
        died_ms: row.get(10)?,
        trigger_id: row.get(11)?,
        data: None,
    })
}

fn trigger(row: &Row<'_>) -> rusqlite::Result<(i64, String, String, i64, Option<i64>)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn decode_trigger(
    (id, function, spec, created_ms, last_fired_ms): (i64, String, String, i64, Option<i64>),
) -> Result<Trigger> {
    let spec = serde_json::from_str(&spec)
        .map_err(|e| StoreError::Corrupt(format!("trigger {id} has an unreadable spec: {e}")))?;
    Ok(Trigger {
        id,
        function,
        spec,
        created_ms,
        last_fired_ms,
    })
}

/// Triggers of `kind` watching `target`, read inside the writing
/// transaction so the events match the triggers at commit time.
fn watchers(tx: &Transaction<'_>, kind: &str, target: &str) -> Result<Vec<Trigger>> {
    let found = rows(
        tx,
        "SELECT id, function, spec, created_ms, last_fired_ms FROM triggers \
         WHERE kind = ?1 AND target = ?2",
        params![kind, target],
        trigger,
    )?;
    found.into_iter().map(decode_trigger).collect()
}

fn insert_inbox(
    tx: &Transaction<'_>,
    function: &str,
    event: &InboxEvent,
    order_key: Option<&str>,
    now: i64,
) -> Result<i64> {
    let e = &event.event;
    tx.prepare_cached(
        "INSERT INTO messages (queue, event_id, type, source, subject, time_ms, content_type, \
         data, path, order_key, trigger_id, max_attempts, backoff_ms, visible_at_ms, enqueued_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14)",
    )?
    .execute(params![
        inbox(function),
        e.id,
        e.ty,
        e.source,
        e.subject,
        e.time_ms,
        e.content_type,
        e.data,
        event.path,
        order_key,
        event.trigger_id,
        event.retry.max_attempts,
        to_i64(event.retry.backoff_ms),
        now,
    ])?;
    Ok(tx.last_insert_rowid())
}

/// Stores the events `change` produces in the inboxes of the triggers
/// watching it, read inside the caller's (writing) transaction so the
/// events match the triggers at commit time.
fn emit(tx: &Transaction<'_>, change: BucketChange<'_>, now: i64) -> Result<()> {
    let watching = watchers(tx, change.trigger_kind(), change.bucket())?;
    let order_key = change.order_key();
    for (trigger, event) in change.fan_out(&watching, now)? {
        insert_inbox(tx, &trigger.function, &event, order_key.as_deref(), now)?;
    }
    Ok(())
}

fn check_kv_condition(
    tx: &Transaction<'_>,
    bucket: &str,
    key: &str,
    condition: KvCondition,
) -> Result<Option<u64>> {
    let current: Option<i64> = tx
        .prepare_cached("SELECT revision FROM kv WHERE bucket = ?1 AND key = ?2")?
        .query_row(params![bucket, key], |row| row.get(0))
        .optional()?;
    let current = current.map(to_u64);
    match (condition, current) {
        (KvCondition::Any, _) => Ok(current),
        (KvCondition::Absent, None) => Ok(None),
        (KvCondition::Absent, Some(revision)) => Err(StoreError::PreconditionFailed(format!(
            "`{key}` exists (revision {revision})"
        ))),
        (KvCondition::Revision(wanted), Some(revision)) if wanted == revision => Ok(current),
        (KvCondition::Revision(wanted), Some(revision)) => Err(StoreError::PreconditionFailed(
            format!("`{key}` is at revision {revision}, not {wanted}"),
        )),
        (KvCondition::Revision(wanted), None) => Err(StoreError::PreconditionFailed(format!(
            "`{key}` does not exist (expected revision {wanted})"
        ))),
    }
}

/// KV buckets, synchronously.
impl EventsDb {
    fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<KvEntry>> {
        let conn = self.writes();
        let entry = conn
            .prepare_cached(
                "SELECT value, revision, updated_ms FROM kv WHERE bucket = ?1 AND key = ?2",
            )?
            .query_row(params![bucket, key], |row| {
                Ok(KvEntry {
                    value: row.get(0)?,
                    revision: to_u64(row.get(1)?),
                    updated_ms: row.get(2)?,
                })
            })
            .optional()?;
        Ok(entry)
    }

    fn kv_put(&self, bucket: &str, key: &str, value: &[u8], condition: KvCondition) -> Result<u64> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        check_kv_condition(&tx, bucket, key, condition)?;
        let now = now_ms();
        let revision: i64 = tx.query_row(
            "UPDATE kv_revision SET last = last + 1 RETURNING last",
            [],
            |row| row.get(0),
        )?;
        tx.prepare_cached(
            "INSERT INTO kv (bucket, key, value, revision, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (bucket, key) DO UPDATE SET value = excluded.value, \
             revision = excluded.revision, updated_ms = excluded.updated_ms",
        )?
        .execute(params![bucket, key, value, revision, now])?;
        emit(
            &tx,
            BucketChange::Kv {
                bucket,
                key,
                value: Some(value),
            },
            now,
        )?;
        tx.commit()?;
        Ok(to_u64(revision))
    }

    fn kv_delete(&self, bucket: &str, key: &str, condition: KvCondition) -> Result<bool> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        if check_kv_condition(&tx, bucket, key, condition)?.is_none() {
            return Ok(false);
        }
        let now = now_ms();
        tx.prepare_cached("DELETE FROM kv WHERE bucket = ?1 AND key = ?2")?
            .execute(params![bucket, key])?;
        emit(
            &tx,
            BucketChange::Kv {
                bucket,
                key,
                value: None,
            },
            now,
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn kv_list(&self, bucket: &str, prefix: &str, after: &str, limit: usize) -> Result<Vec<KvKey>> {
        let conn = self.writes();
        let keys = rows(
            &conn,
            &format!(
                "SELECT key, revision, length(value), updated_ms FROM kv \
             WHERE bucket = ?1 AND {PREFIX_FILTER} ORDER BY key LIMIT ?4"
            ),
            params![bucket, prefix, after, to_i64(limit as u64)],
            |row| {
                Ok(KvKey {
                    key: row.get(0)?,
                    revision: to_u64(row.get(1)?),
                    size: to_u64(row.get(2)?),
                    updated_ms: row.get(3)?,
                })
            },
        )?;
        Ok(keys)
    }

    fn kv_buckets(&self) -> Result<Vec<BucketStats>> {
        let conn = self.writes();
        let buckets = rows(
            &conn,
            "SELECT bucket, COUNT(*), TOTAL(length(value)) FROM kv GROUP BY bucket ORDER BY bucket",
            [],
            bucket_stats,
        )?;
        Ok(buckets)
    }
}

fn bucket_stats(row: &Row<'_>) -> rusqlite::Result<BucketStats> {
    let bytes: f64 = row.get(2)?;
    Ok(BucketStats {
        bucket: row.get(0)?,
        entries: to_u64(row.get(1)?),
        bytes: bytes as u64,
    })
}

fn object_meta(bucket: &str, key: &str, row: &Row<'_>) -> rusqlite::Result<(ObjectMeta, String)> {
    let digest: String = row.get(0)?;
    Ok((
        ObjectMeta {
            bucket: bucket.to_string(),
            key: key.to_string(),
            size: to_u64(row.get(1)?),
            etag: etag(&digest),
            content_type: row.get(2)?,
            modified_ms: row.get(3)?,
        },
        digest,
    ))
}

/// An object's HTTP entity tag: its quoted SHA-256.
fn etag(digest_hex: &str) -> String {
    format!("\"{digest_hex}\"")
}

impl EventsDb {
    /// Records `key` as the object of `digest` (its bytes put in place by
    /// `place`, under the write lock) and emits its change event.
    fn record_object(
        &self,
        bucket: &str,
        key: &str,
        digest: &Digest,
        size: u64,
        content_type: &str,
        place: impl FnOnce() -> Result<()>,
    ) -> Result<ObjectMeta> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        place()?;
        let previous: Option<String> = tx
            .prepare_cached("SELECT digest FROM objects WHERE bucket = ?1 AND key = ?2")?
            .query_row(params![bucket, key], |row| row.get(0))
            .optional()?;
        let now = now_ms();
        tx.prepare_cached(
            "INSERT INTO objects (bucket, key, digest, size, content_type, modified_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (bucket, key) DO UPDATE SET \
             digest = excluded.digest, size = excluded.size, \
             content_type = excluded.content_type, modified_ms = excluded.modified_ms",
        )?
        .execute(params![
            bucket,
            key,
            digest.hex(),
            to_i64(size),
            content_type,
            now
        ])?;
        let meta = ObjectMeta {
            bucket: bucket.to_string(),
            key: key.to_string(),
            size,
            etag: etag(digest.hex()),
            content_type: content_type.to_string(),
            modified_ms: now,
        };
        emit(
            &tx,
            BucketChange::Object {
                meta: &meta,
                change: ObjectChange::Created,
            },
            now,
        )?;
        tx.commit()?;
        if let Some(previous) = previous.filter(|p| p != digest.hex()) {
            self.collect_blob(&conn, &previous)?;
        }
        Ok(meta)
    }

    /// Removes the blob of `digest` if no object refers to it any more.
    /// Called under the write lock after the change committed (a rolled
    /// back change still needs its file), so a concurrent put of the same
    /// bytes either sees the file or writes it again.
    fn collect_blob(&self, conn: &Connection, digest: &str) -> Result<()> {
        let used: bool = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM objects WHERE digest = ?1)")?
            .query_row([digest], |row| row.get(0))?;
        if !used {
            self.objects
                .remove(BlobKind::Object, &Digest::parse(digest)?)?;
        }
        Ok(())
    }
}

/// Object buckets, synchronously.
impl EventsDb {
    fn object_put(
        &self,
        bucket: &str,
        key: &str,
        bytes: &[u8],
        content_type: &str,
    ) -> Result<ObjectMeta> {
        // The bytes are written (and synced) before the lock: large uploads
        // do not hold up other writers.
        let digest = self.objects.put_blocking(BlobKind::Object, bytes)?;
        self.record_object(
            bucket,
            key,
            &digest,
            bytes.len() as u64,
            content_type,
            || {
                // A delete of another object with the same bytes may have
                // removed the file between the write above and the lock.
                self.objects
                    .put_keyed_blocking(BlobKind::Object, &digest, bytes)
            },
        )
    }

    fn object_writer(&self) -> Result<crate::BlobWriter> {
        self.objects.writer(BlobKind::Object)
    }

    fn object_put_staged(
        &self,
        bucket: &str,
        key: &str,
        mut staged: crate::StagedBlob,
        content_type: &str,
    ) -> Result<ObjectMeta> {
        let digest = staged.digest().clone();
        let size = staged.size();
        // Moved into place under the lock, so a delete of another object
        // with the same bytes cannot remove the file in between.
        self.record_object(bucket, key, &digest, size, content_type, || {
            self.objects.commit(&mut staged)
        })
    }

    fn object_get(&self, bucket: &str, key: &str) -> Result<Option<(ObjectMeta, PathBuf)>> {
        let found = {
            let conn = self.writes();
            conn.prepare_cached(
                "SELECT digest, size, content_type, modified_ms FROM objects \
                 WHERE bucket = ?1 AND key = ?2",
            )?
            .query_row(params![bucket, key], |row| object_meta(bucket, key, row))
            .optional()?
        };
        let Some((meta, digest)) = found else {
            return Ok(None);
        };
        let path = self
            .objects
            .local_path_blocking(BlobKind::Object, &Digest::parse(&digest)?)
            .ok_or_else(|| {
                StoreError::Corrupt(format!("the bytes of object {bucket}/{key} are missing"))
            })?;
        Ok(Some((meta, path)))
    }

    fn object_delete(&self, bucket: &str, key: &str) -> Result<bool> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        let found = tx
            .prepare_cached(
                "DELETE FROM objects WHERE bucket = ?1 AND key = ?2 \
                 RETURNING digest, size, content_type, modified_ms",
            )?
            .query_row(params![bucket, key], |row| object_meta(bucket, key, row))
            .optional()?;
        let Some((mut meta, digest)) = found else {
            return Ok(false);
        };
        let now = now_ms();
        meta.modified_ms = now;
        emit(
            &tx,
            BucketChange::Object {
                meta: &meta,
                change: ObjectChange::Deleted,
            },
            now,
        )?;
        tx.commit()?;
        self.collect_blob(&conn, &digest)?;
        Ok(true)
    }

    fn object_list(
        &self,
        bucket: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<ObjectMeta>> {
        let conn = self.writes();
        let objects = rows(
            &conn,
            &format!(
                "SELECT digest, size, content_type, modified_ms, key FROM objects \
             WHERE bucket = ?1 AND {PREFIX_FILTER} ORDER BY key LIMIT ?4"
            ),
            params![bucket, prefix, after, to_i64(limit as u64)],
            |row| {
                let key: String = row.get(4)?;
                object_meta(bucket, &key, row).map(|(meta, _)| meta)
            },
        )?;
        Ok(objects)
    }

    fn object_buckets(&self) -> Result<Vec<BucketStats>> {
        let conn = self.writes();
        let buckets = rows(
            &conn,
            "SELECT bucket, COUNT(*), TOTAL(size) FROM objects GROUP BY bucket ORDER BY bucket",
            [],
            bucket_stats,
        )?;
        Ok(buckets)
    }
}

/// A message (`m`) that no older message with its ordering key waits
/// before: only those may be handed out.
const FIRST_OF_ITS_KEY: &str = "(order_key IS NULL OR NOT EXISTS (SELECT 1 FROM messages AS p \
     WHERE p.queue = m.queue AND p.order_key = m.order_key AND p.id < m.id))";

/// Claims up to `max` visible messages of `queue`, leased until
/// `now + lease_ms`. `node` marks the lease as the dispatcher's (released
/// at start-up) rather than a user's `receive`.
fn claim(
    tx: &Transaction<'_>,
    queue: &str,
    max: usize,
    lease_ms: u64,
    node: bool,
    now: i64,
) -> Result<Vec<Delivery>> {
    if max == 0 {
        return Ok(Vec::new());
    }
    // A message whose ordering key has an older message still stored waits
    // for it: per-key commit order survives retries and concurrency.
    let lease_until = now.saturating_add(to_i64(lease_ms));
    let mut claimed = rows(
        tx,
        &format!(
            "UPDATE messages SET attempts = attempts + 1, visible_at_ms = ?3, leased = ?4 \
             WHERE id IN (SELECT id FROM messages AS m WHERE queue = ?1 AND visible_at_ms <= ?2 \
               AND {FIRST_OF_ITS_KEY} ORDER BY visible_at_ms, id LIMIT ?5) \
             RETURNING {DELIVERY_COLUMNS}"
        ),
        params![queue, now, lease_until, node, to_i64(max as u64)],
        delivery,
    )?;
    claimed.sort_by_key(|d| d.id);
    Ok(claimed)
}

fn settle(tx: &Transaction<'_>, settlement: &Settlement, now: i64) -> Result<()> {
    match settlement {
        Settlement::Ack { id, attempt } => {
            tx.prepare_cached("DELETE FROM messages WHERE id = ?1 AND attempts = ?2")?
                .execute(params![id, attempt])?;
        }
        Settlement::Retry {
            id,
            attempt,
            delay_ms,
            error,
        } => {
            tx.prepare_cached(
                "UPDATE messages SET visible_at_ms = ?3, leased = 0, last_error = ?4 \
                 WHERE id = ?1 AND attempts = ?2",
            )?
            .execute(params![
                id,
                attempt,
                now.saturating_add(to_i64(*delay_ms)),
                error
            ])?;
        }
        Settlement::Postpone {
            id,
            attempt,
            delay_ms,
        } => {
            tx.prepare_cached(
                "UPDATE messages SET visible_at_ms = ?3, leased = 0, attempts = attempts - 1 \
                 WHERE id = ?1 AND attempts = ?2",
            )?
            .execute(params![id, attempt, now.saturating_add(to_i64(*delay_ms))])?;
        }
        Settlement::Dead {
            id,
            attempt,
            function,
            retry,
            trigger_id,
            error,
        } => {
            let moved = tx
                .prepare_cached(
                    "INSERT INTO dead_letters (function, event_id, type, source, subject, \
                     time_ms, content_type, data, path, order_key, trigger_id, max_attempts, \
                     backoff_ms, attempts, last_error, died_ms) \
                     SELECT ?3, event_id, type, source, \
                       COALESCE(subject, CASE WHEN substr(queue, 1, 1) = '@' THEN NULL \
                                         ELSE CAST(id AS TEXT) END), \
                       time_ms, content_type, data, path, order_key, COALESCE(trigger_id, ?8), \
                       ?4, ?5, attempts, ?6, ?7 \
                     FROM messages WHERE id = ?1 AND attempts = ?2",
                )?
                .execute(params![
                    id,
                    attempt,
                    function,
                    retry.max_attempts,
                    to_i64(retry.backoff_ms),
                    error,
                    now,
                    trigger_id
                ])?;
            if moved > 0 {
                tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?
                    .execute([id])?;
            }
        }
    }
    Ok(())
}

/// Queues, inboxes and dead letters, synchronously.
impl EventsDb {
    fn send(&self, queue: &str, messages: &[(Option<String>, Vec<u8>)]) -> Result<Vec<i64>> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        let now = now_ms();
        let mut ids = Vec::with_capacity(messages.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (queue, event_id, type, source, time_ms, content_type, \
                 data, visible_at_ms, enqueued_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?5, ?5)",
            )?;
            for (content_type, data) in messages {
                let event = CloudEvent::queue_message(queue, content_type.clone(), Vec::new(), now);
                insert.execute(params![
                    queue,
                    event.id,
                    event.ty,
                    event.source,
                    event.time_ms,
                    event.content_type,
                    data
                ])?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit()?;
        Ok(ids)
    }

    fn receive(&self, queue: &str, max: usize, visibility_ms: u64) -> Result<Vec<Delivery>> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        let claimed = claim(&tx, queue, max, visibility_ms, false, now_ms())?;
        tx.commit()?;
        Ok(claimed)
    }

    fn ack(&self, queue: &str, id: i64, attempt: u32) -> Result<AckOutcome> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        let current: Option<i64> = tx
            .prepare_cached("SELECT attempts FROM messages WHERE id = ?1 AND queue = ?2")?
            .query_row(params![id, queue], |row| row.get(0))
            .optional()?;
        let outcome = match current {
            None => AckOutcome::Gone,
            Some(current) if to_u32(current) != attempt => AckOutcome::Stale,
            Some(_) => {
                tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?
                    .execute([id])?;
                AckOutcome::Acked
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    fn queues(&self) -> Result<Vec<QueueStats>> {
        let conn = self.writes();
        let now = now_ms();
        let queues = rows(
            &conn,
            "SELECT queue, COUNT(*), TOTAL(visible_at_ms > ?1 AND attempts > 0) FROM messages \
             WHERE substr(queue, 1, 1) != '@' GROUP BY queue ORDER BY queue",
            [now],
            |row| {
                let in_flight: f64 = row.get(2)?;
                Ok(QueueStats {
                    queue: row.get(0)?,
                    messages: to_u64(row.get(1)?),
                    in_flight: in_flight as u64,
                })
            },
        )?;
        Ok(queues)
    }

    fn enqueue(&self, function: &str, event: &InboxEvent) -> Result<i64> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        let id = insert_inbox(&tx, function, event, None, now_ms())?;
        tx.commit()?;
        Ok(id)
    }

    fn settle_and_claim(
        &self,
        settled: &[Settlement],
        queue: &QueueRef,
        max: usize,
        lease_ms: u64,
    ) -> Result<Vec<Delivery>> {
        let mut conn = self.dispatch();
        let tx = write_tx(&mut conn)?;
        let now = now_ms();
        for settlement in settled {
            settle(&tx, settlement, now)?;
        }
        let claimed = claim(&tx, &queue_name(queue), max, lease_ms, true, now)?;
        tx.commit()?;
        Ok(claimed)
    }

    fn next_visible(&self, queue: &QueueRef) -> Result<Option<i64>> {
        let conn = self.dispatch();
        let next = conn
            .prepare_cached(&format!(
                "SELECT MIN(visible_at_ms) FROM messages AS m WHERE queue = ?1 \
                 AND {FIRST_OF_ITS_KEY}"
            ))?
            .query_row([queue_name(queue)], |row| row.get(0))?;
        Ok(next)
    }

    fn release_leases(&self) -> Result<usize> {
        let mut conn = self.dispatch();
        let tx = write_tx(&mut conn)?;
        let released = tx.execute(
            "UPDATE messages SET leased = 0, visible_at_ms = ?1 WHERE leased = 1",
            [now_ms()],
        )?;
        tx.commit()?;
        Ok(released)
    }

    fn depths(&self) -> Result<Vec<(QueueRef, u64)>> {
        let conn = self.dispatch();
        rows(
            &conn,
            "SELECT queue, COUNT(*) FROM messages GROUP BY queue",
            [],
            |row| {
                let queue: String = row.get(0)?;
                let queue = match queue.strip_prefix('@') {
                    Some(function) => QueueRef::Inbox(function.to_string()),
                    None => QueueRef::Named(queue),
                };
                Ok((queue, to_u64(row.get(1)?)))
            },
        )
    }

    fn dead_letters(&self, function: &str, after: i64, limit: usize) -> Result<Vec<DeadLetter>> {
        let conn = self.writes();
        let letters = rows(
            &conn,
            &format!(
                "SELECT {DEAD_COLUMNS} FROM dead_letters WHERE function = ?1 AND id > ?2 \
             ORDER BY id LIMIT ?3"
            ),
            params![function, after, to_i64(limit as u64)],
            dead_letter,
        )?;
        Ok(letters)
    }

    fn dead_letter(&self, function: &str, id: i64) -> Result<Option<DeadLetter>> {
        let conn = self.writes();
        let letter = conn
            .prepare_cached(&format!(
                "SELECT {DEAD_COLUMNS}, data FROM dead_letters WHERE function = ?1 AND id = ?2"
            ))?
            .query_row(params![function, id], |row| {
                let mut letter = dead_letter(row)?;
                letter.data = Some(row.get(12)?);
                Ok(letter)
            })
            .optional()?;
        Ok(letter)
    }

    fn redrive(&self, function: &str, ids: Option<&[i64]>) -> Result<usize> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        let now = now_ms();
        let mut moved = 0;
        for id in selected_dead(&tx, function, ids)? {
            moved += tx
                .prepare_cached(
                    "INSERT INTO messages (queue, event_id, type, source, subject, time_ms, \
                     content_type, data, path, order_key, trigger_id, max_attempts, backoff_ms, \
                     visible_at_ms, enqueued_ms) \
                     SELECT ?2, event_id, type, source, subject, time_ms, content_type, data, \
                       path, order_key, trigger_id, max_attempts, backoff_ms, ?3, ?3 \
                     FROM dead_letters WHERE id = ?1",
                )?
                .execute(params![id, inbox(function), now])?;
            tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?
                .execute([id])?;
        }
        tx.commit()?;
        Ok(moved)
    }

    fn purge_dead(&self, function: &str, ids: Option<&[i64]>) -> Result<usize> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        let mut purged = 0;
        for id in selected_dead(&tx, function, ids)? {
            purged += tx
                .prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?
                .execute([id])?;
        }
        tx.commit()?;
        Ok(purged)
    }
}

/// The ids of `function`'s dead letters among `ids` (all when `None`), so a
/// caller can never reach another function's letters by id.
fn selected_dead(tx: &Transaction<'_>, function: &str, ids: Option<&[i64]>) -> Result<Vec<i64>> {
    let mut all = rows(
        tx,
        "SELECT id FROM dead_letters WHERE function = ?1 ORDER BY id",
        [function],
        |row| row.get::<_, i64>(0),
    )?;
    if let Some(ids) = ids {
        let wanted: std::collections::HashSet<&i64> = ids.iter().collect();
        all.retain(|id| wanted.contains(id));
    }
    Ok(all)
}

/// Triggers, synchronously.
impl EventsDb {
    fn add_trigger(&self, function: &str, spec: &TriggerSpec) -> Result<(Trigger, bool)> {
        let text = serde_json::to_string(spec)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode trigger: {e}")))?;
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        let existing = tx
            .prepare_cached(
                "SELECT id, function, spec, created_ms, last_fired_ms FROM triggers \
                 WHERE function = ?1 AND spec = ?2",
            )?
            .query_row(params![function, text], trigger)
            .optional()?;
        if let Some(existing) = existing {
            return Ok((decode_trigger(existing)?, false));
        }
        let now = now_ms();
        let last_fired = matches!(spec.source, TriggerSource::Schedule { .. }).then_some(now);
        tx.prepare_cached(
            "INSERT INTO triggers (function, kind, target, spec, created_ms, last_fired_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            function,
            spec.source.kind(),
            spec.source.target(),
            text,
            now,
            last_fired
        ])?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        self.trigger_changes.emit(TriggerChange::Added {
            id,
            function: function.to_string(),
        });
        Ok((
            Trigger {
                id,
                function: function.to_string(),
                spec: spec.clone(),
                created_ms: now,
                last_fired_ms: last_fired,
            },
            true,
        ))
    }

    fn triggers(&self, function: Option<&str>) -> Result<Vec<Trigger>> {
        let conn = self.writes();
        let found = rows(
            &conn,
            "SELECT id, function, spec, created_ms, last_fired_ms FROM triggers \
             WHERE ?1 IS NULL OR function = ?1 ORDER BY id",
            [function],
            trigger,
        )?;
        found.into_iter().map(decode_trigger).collect()
    }

    fn remove_trigger(&self, id: i64) -> Result<bool> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        let removed = tx.execute("DELETE FROM triggers WHERE id = ?1", [id])? > 0;
        tx.commit()?;
        if removed {
            self.trigger_changes.emit(TriggerChange::Removed { id });
        }
        Ok(removed)
    }

    fn remove_function(&self, function: &str) -> Result<()> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        tx.execute("DELETE FROM triggers WHERE function = ?1", [function])?;
        tx.execute("DELETE FROM messages WHERE queue = ?1", [inbox(function)])?;
        tx.execute("DELETE FROM dead_letters WHERE function = ?1", [function])?;
        tx.commit()?;
        self.trigger_changes.emit(TriggerChange::FunctionRemoved {
            function: function.to_string(),
        });
        Ok(())
    }

    fn fire_schedule(&self, trigger: &Trigger, event: &CloudEvent, fired_ms: i64) -> Result<bool> {
        let mut conn = self.writes();
        let tx = write_tx(&mut conn)?;
        let updated = tx
            .prepare_cached(
                "UPDATE triggers SET last_fired_ms = ?2 WHERE id = ?1 AND last_fired_ms IS ?3",
            )?
            .execute(params![trigger.id, fired_ms, trigger.last_fired_ms])?;
        if updated == 0 {
            return Ok(false);
        }
        let inbox_event = InboxEvent {
            event: event.clone(),
            path: None,
            trigger_id: Some(trigger.id),
            retry: trigger.spec.retry,
        };
        insert_inbox(&tx, &trigger.function, &inbox_event, None, fired_ms)?;
        tx.commit()?;
        self.trigger_changes.emit(TriggerChange::Fired {
            id: trigger.id,
            fired_ms,
        });
        Ok(true)
    }
}

#[async_trait::async_trait]
impl KvStore for EmbeddedEvents {
    async fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<KvEntry>> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        offload(&self.db, move |db| db.kv_get(&bucket, &key)).await
    }

    async fn kv_put(
        &self,
        bucket: &str,
        key: &str,
        value: &[u8],
        condition: KvCondition,
    ) -> Result<u64> {
        let (bucket, key, value) = (bucket.to_owned(), key.to_owned(), value.to_vec());
        offload(&self.db, move |db| {
            db.kv_put(&bucket, &key, &value, condition)
        })
        .await
    }

    async fn kv_delete(&self, bucket: &str, key: &str, condition: KvCondition) -> Result<bool> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        offload(&self.db, move |db| db.kv_delete(&bucket, &key, condition)).await
    }

    async fn kv_list(
        &self,
        bucket: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KvKey>> {
        let (bucket, prefix, after) = (bucket.to_owned(), prefix.to_owned(), after.to_owned());
        offload(&self.db, move |db| {
            db.kv_list(&bucket, &prefix, &after, limit)
        })
        .await
    }

    async fn kv_buckets(&self) -> Result<Vec<BucketStats>> {
        offload(&self.db, |db| db.kv_buckets()).await
    }
}

#[async_trait::async_trait]
impl ObjectStore for EmbeddedEvents {
    async fn object_put(
        &self,
        bucket: &str,
        key: &str,
        bytes: &[u8],
        content_type: &str,
    ) -> Result<ObjectMeta> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        let (bytes, content_type) = (bytes.to_vec(), content_type.to_owned());
        offload(&self.db, move |db| {
            db.object_put(&bucket, &key, &bytes, &content_type)
        })
        .await
    }

    async fn object_writer(&self) -> Result<crate::BlobWriter> {
        offload(&self.db, |db| db.object_writer()).await
    }

    async fn object_put_staged(
        &self,
        bucket: &str,
        key: &str,
        staged: crate::StagedBlob,
        content_type: &str,
    ) -> Result<ObjectMeta> {
        let (bucket, key, content_type) =
            (bucket.to_owned(), key.to_owned(), content_type.to_owned());
        offload(&self.db, move |db| {
            db.object_put_staged(&bucket, &key, staged, &content_type)
        })
        .await
    }

    async fn object_get(&self, bucket: &str, key: &str) -> Result<Option<(ObjectMeta, PathBuf)>> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        offload(&self.db, move |db| db.object_get(&bucket, &key)).await
    }

    async fn object_delete(&self, bucket: &str, key: &str) -> Result<bool> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        offload(&self.db, move |db| db.object_delete(&bucket, &key)).await
    }

    async fn object_list(
        &self,
        bucket: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<ObjectMeta>> {
        let (bucket, prefix, after) = (bucket.to_owned(), prefix.to_owned(), after.to_owned());
        offload(&self.db, move |db| {
            db.object_list(&bucket, &prefix, &after, limit)
        })
        .await
    }

    async fn object_buckets(&self) -> Result<Vec<BucketStats>> {
        offload(&self.db, |db| db.object_buckets()).await
    }
}

#[async_trait::async_trait]
impl EventQueue for EmbeddedEvents {
    async fn send(&self, queue: &str, messages: &[(Option<String>, Vec<u8>)]) -> Result<Vec<i64>> {
        let (queue, messages) = (queue.to_owned(), messages.to_vec());
        offload(&self.db, move |db| db.send(&queue, &messages)).await
    }

    async fn receive(&self, queue: &str, max: usize, visibility_ms: u64) -> Result<Vec<Delivery>> {
        let queue = queue.to_owned();
        offload(&self.db, move |db| db.receive(&queue, max, visibility_ms)).await
    }

    async fn ack(&self, queue: &str, id: i64, attempt: u32) -> Result<AckOutcome> {
        let queue = queue.to_owned();
        offload(&self.db, move |db| db.ack(&queue, id, attempt)).await
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        offload(&self.db, |db| db.queues()).await
    }

    async fn enqueue(&self, function: &str, event: &InboxEvent) -> Result<i64> {
        let (function, event) = (function.to_owned(), event.clone());
        offload(&self.db, move |db| db.enqueue(&function, &event)).await
    }

    async fn settle_and_claim(
        &self,
        settled: &[Settlement],
        queue: &QueueRef,
        max: usize,
        lease_ms: u64,
    ) -> Result<Vec<Delivery>> {
        let (settled, queue) = (settled.to_vec(), queue.clone());
        offload(&self.db, move |db| {
            db.settle_and_claim(&settled, &queue, max, lease_ms)
        })
        .await
    }

    async fn next_visible(&self, queue: &QueueRef) -> Result<Option<i64>> {
        let queue = queue.clone();
        offload(&self.db, move |db| db.next_visible(&queue)).await
    }

    async fn release_leases(&self) -> Result<usize> {
        offload(&self.db, |db| db.release_leases()).await
    }

    async fn depths(&self) -> Result<Vec<(QueueRef, u64)>> {
        offload(&self.db, |db| db.depths()).await
    }

    async fn dead_letters(
        &self,
        function: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let function = function.to_owned();
        offload(&self.db, move |db| db.dead_letters(&function, after, limit)).await
    }

    async fn dead_letter(&self, function: &str, id: i64) -> Result<Option<DeadLetter>> {
        let function = function.to_owned();
        offload(&self.db, move |db| db.dead_letter(&function, id)).await
    }

    async fn redrive(&self, function: &str, ids: Option<&[i64]>) -> Result<usize> {
        let (function, ids) = (function.to_owned(), ids.map(<[i64]>::to_vec));
        offload(&self.db, move |db| db.redrive(&function, ids.as_deref())).await
    }

    async fn purge_dead(&self, function: &str, ids: Option<&[i64]>) -> Result<usize> {
        let (function, ids) = (function.to_owned(), ids.map(<[i64]>::to_vec));
        offload(&self.db, move |db| db.purge_dead(&function, ids.as_deref())).await
    }

    fn work_hints(&self) -> Option<ChangeFeed<WorkHint>> {
        // The data directory is locked by this process: every write is the
        // node's own, and it wakes its workers after each one.
        None
    }
}

#[async_trait::async_trait]
impl TriggerStore for EmbeddedEvents {
    async fn add_trigger(&self, function: &str, spec: &TriggerSpec) -> Result<(Trigger, bool)> {
        let (function, spec) = (function.to_owned(), spec.clone());
        offload(&self.db, move |db| db.add_trigger(&function, &spec)).await
    }

    async fn triggers(&self, function: Option<&str>) -> Result<Vec<Trigger>> {
        let function = function.map(str::to_owned);
        offload(&self.db, move |db| db.triggers(function.as_deref())).await
    }

    async fn remove_trigger(&self, id: i64) -> Result<bool> {
        offload(&self.db, move |db| db.remove_trigger(id)).await
    }

    async fn remove_function(&self, function: &str) -> Result<()> {
        let function = function.to_owned();
        offload(&self.db, move |db| db.remove_function(&function)).await
    }

    async fn fire_schedule(
        &self,
        trigger: &Trigger,
        event: &CloudEvent,
        fired_ms: i64,
    ) -> Result<bool> {
        let (trigger, event) = (trigger.clone(), event.clone());
        offload(&self.db, move |db| {
            db.fire_schedule(&trigger, &event, fired_ms)
        })
        .await
    }

    fn watch(&self) -> ChangeFeed<TriggerChange> {
        self.db.trigger_changes.subscribe()
    }
}

#[cfg(test)]
mod tests;
