//! The registry and the log store in `<data dir>/mayfly.db`.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use super::{migrate, now_ms, offload, open_connection, to_i64, to_u64, write_tx};
use crate::changes::Feed;
use crate::registry::ALIAS_MOVES_KEPT;
use crate::{ChangeFeed, RegistryChange};

use crate::{
    AliasMove, AliasRecord, CanaryPolicy, CanaryRecord, Digest, Expected, FunctionConfig,
    FunctionRecord, LIVE_ALIAS, LogRecord, LogStore, MoveCause, NewLogLine, Registry, Result,
    StoreError, VersionRecord,
};

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many have run. Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE functions (
        name          TEXT PRIMARY KEY,
        live_version  INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE versions (
        function      TEXT NOT NULL,
        version       INTEGER NOT NULL,
        digest        TEXT NOT NULL,
        config        TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (function, version)
    );
    CREATE TABLE routes (
        route    TEXT PRIMARY KEY,
        function TEXT NOT NULL
    );
    CREATE INDEX routes_by_function ON routes (function);
    CREATE TABLE logs (
        id         INTEGER PRIMARY KEY,
        ts_ms      INTEGER NOT NULL,
        function   TEXT NOT NULL,
        version    INTEGER NOT NULL,
        request_id TEXT NOT NULL,
        stream     TEXT NOT NULL,
        line       TEXT NOT NULL
    );
    CREATE INDEX logs_by_function ON logs (function, id);
"#,
    // Aliases: names pointing at versions, with an optional weighted canary.
    // The `live` row replaces `functions.live_version` as the one record of
    // what serves a function's routes.
    r#"
    CREATE TABLE aliases (
        function         TEXT NOT NULL,
        alias            TEXT NOT NULL,
        version          INTEGER NOT NULL,
        canary_version   INTEGER NULL,
        canary_weight_bp INTEGER NOT NULL DEFAULT 0,
        previous_version INTEGER NULL,
        updated_ms       INTEGER NOT NULL,
        PRIMARY KEY (function, alias)
    );
    INSERT INTO aliases (function, alias, version, updated_ms)
        SELECT name, 'live', live_version, created_at_ms FROM functions;
    ALTER TABLE functions DROP COLUMN live_version;
"#,
    // Progressive delivery: a canary's policy, and every alias move with
    // its cause (the history `mayfly versions` shows).
    r#"
    ALTER TABLE aliases ADD COLUMN canary_auto TEXT NULL;
    CREATE TABLE alias_moves (
        id               INTEGER PRIMARY KEY,
        function         TEXT NOT NULL,
        alias            TEXT NOT NULL,
        at_ms            INTEGER NOT NULL,
        from_version     INTEGER NULL,
        version          INTEGER NOT NULL,
        canary           TEXT NULL,
        cause            TEXT NOT NULL,
        detail           TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX alias_moves_by_function ON alias_moves (function, id);
"#,
];

/// Registry and log store in `<data dir>/mayfly.db`.
///
/// Metadata and logs use separate connections so that a burst of log writes
/// never queues behind (or in front of) a deploy; SQLite's WAL mode lets
/// them proceed side by side. Each call runs on the blocking pool
/// (`sqlite::offload`).
pub struct EmbeddedStore {
    db: Arc<StoreDb>,
}

/// The connections and the change feed, with the synchronous code of every
/// call: what [`EmbeddedStore`]'s async methods run on the blocking pool.
struct StoreDb {
    meta: Mutex<Connection>,
    logs: Mutex<Connection>,
    changes: Feed<RegistryChange>,
}

impl EmbeddedStore {
    /// Opens or creates the database at `path` and brings its schema up to
    /// date.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = open_connection(path)?;
        migrate(&meta, MIGRATIONS)?;
        let logs = open_connection(path)?;
        Ok(Self {
            db: Arc::new(StoreDb {
                meta: Mutex::new(meta),
                logs: Mutex::new(logs),
                changes: Feed::new(),
            }),
        })
    }
}

impl StoreDb {
    fn meta(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done change:
        // every change runs in a transaction that rolls back on drop.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn logs(&self) -> MutexGuard<'_, Connection> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The columns `function, version, digest, config, created_at_ms` of a
/// `versions` row, for [`read_version`].
type VersionColumns = (String, i64, String, String, i64);

fn version_columns(row: &rusqlite::Row<'_>) -> rusqlite::Result<VersionColumns> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn read_version(
    function: String,
    version: i64,
    digest: String,
    config: String,
    created_at_ms: i64,
) -> Result<VersionRecord> {
    let config: FunctionConfig = serde_json::from_str(&config)
        .map_err(|e| StoreError::Corrupt(format!("config of {function} v{version}: {e}")))?;
    Ok(VersionRecord {
        function,
        version: version as u64,
        digest,
        config,
        created_at_ms,
    })
}

const FUNCTION_QUERY: &str = "
    SELECT f.name, f.created_at_ms, v.version, v.digest, v.config, v.created_at_ms
    FROM functions f
    JOIN aliases a ON a.function = f.name AND a.alias = 'live'
    JOIN versions v ON v.function = f.name AND v.version = a.version";

const ALIAS_COLUMNS: &str = "function, alias, version, canary_version, canary_weight_bp, \
                             previous_version, updated_ms, canary_auto";

fn alias_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AliasRecord> {
    let canary: Option<i64> = row.get(3)?;
    let weight: i64 = row.get(4)?;
    let previous: Option<i64> = row.get(5)?;
    let auto: Option<String> = row.get(7)?;
    // A policy this binary cannot read leaves a plain canary: it still
    // serves its share, and nothing moves by itself.
    let auto = auto.and_then(|json| serde_json::from_str::<CanaryPolicy>(&json).ok());
    Ok(AliasRecord {
        function: row.get(0)?,
        alias: row.get(1)?,
        version: to_u64(row.get(2)?),
        canary: canary.map(|version| CanaryRecord {
            version: to_u64(version),
            weight_bp: u32::try_from(weight).unwrap_or(0),
            auto,
        }),
        previous_version: previous.map(to_u64),
        updated_at_ms: row.get(6)?,
    })
}

fn alias_move_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AliasMove> {
    let from: Option<i64> = row.get(3)?;
    let canary: Option<String> = row.get(5)?;
    let cause: String = row.get(6)?;
    Ok(AliasMove {
        function: row.get(0)?,
        alias: row.get(1)?,
        at_ms: row.get(2)?,
        from_version: from.map(to_u64),
        version: to_u64(row.get(4)?),
        canary: canary.and_then(|json| serde_json::from_str(&json).ok()),
        // Written by this code only; an unknown name reads as a manual set.
        cause: MoveCause::parse(&cause).unwrap_or(MoveCause::Set),
        detail: row.get(7)?,
    })
}

fn read_alias(
    tx: &rusqlite::Connection,
    function: &str,
    alias: &str,
) -> Result<Option<AliasRecord>> {
    Ok(tx
        .query_row(
            &format!("SELECT {ALIAS_COLUMNS} FROM aliases WHERE function = ?1 AND alias = ?2"),
            params![function, alias],
            alias_row,
        )
        .optional()?)
}

/// Fails with [`StoreError::Stale`] unless `alias` of `function` is where
/// `expected` says, read in the writing transaction.
fn check_expected(
    tx: &rusqlite::Connection,
    function: &str,
    alias: &str,
    expected: Expected,
) -> Result<()> {
    let current = match expected {
        Expected::Any => return Ok(()),
        _ => read_alias(tx, function, alias)?.map(|record| record.version),
    };
    if Expected::seen(current) == expected {
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

fn read_aliases(conn: &rusqlite::Connection, function: &str) -> Result<Vec<AliasRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ALIAS_COLUMNS} FROM aliases WHERE function = ?1
         ORDER BY alias != 'live', alias"
    ))?;
    let rows = stmt.query_map(params![function], alias_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn function_exists(tx: &rusqlite::Connection, function: &str) -> Result<bool> {
    Ok(tx
        .query_row(
            "SELECT 1 FROM functions WHERE name = ?1",
            params![function],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn version_exists(tx: &rusqlite::Connection, function: &str, version: u64) -> Result<bool> {
    Ok(tx
        .query_row(
            "SELECT 1 FROM versions WHERE function = ?1 AND version = ?2",
            params![function, version as i64],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Makes `routes` the routes of `function`, refusing any another function
/// serves. Runs inside the caller's transaction.
fn replace_routes(tx: &rusqlite::Connection, function: &str, routes: &[String]) -> Result<()> {
    for route in routes {
        let owner: Option<String> = tx
            .query_row(
                "SELECT function FROM routes WHERE route = ?1 AND function != ?2",
                params![route, function],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(owner) = owner {
            return Err(StoreError::RouteTaken {
                route: route.clone(),
                owner,
            });
        }
    }
    tx.execute("DELETE FROM routes WHERE function = ?1", params![function])?;
    for route in routes {
        tx.execute(
            "INSERT INTO routes (route, function) VALUES (?1, ?2)",
            params![route, function],
        )?;
    }
    Ok(())
}

/// JSON of a plain struct of numbers (whose serialisation cannot fail).
fn plain_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// How an alias moves, for [`write_alias`].
struct AliasWrite<'a> {
    function: &'a str,
    alias: &'a str,
    version: u64,
    canary: Option<CanaryRecord>,
    cause: MoveCause,
    detail: &'a str,
}

/// Points an alias at a version inside the caller's transaction and adds
/// the move to its history; when the version changes, the one it left
/// becomes its previous version.
fn write_alias(tx: &rusqlite::Connection, write: AliasWrite<'_>, now: i64) -> Result<AliasRecord> {
    let AliasWrite {
        function,
        alias,
        version,
        canary,
        cause,
        detail,
    } = write;
    let current = read_alias(tx, function, alias)?;
    let previous_version = match &current {
        Some(current) if current.version != version => Some(current.version),
        Some(current) => current.previous_version,
        None => None,
    };
    let auto = canary.and_then(|c| c.auto).map(|auto| plain_json(&auto));
    tx.execute(
        "INSERT INTO aliases
             (function, alias, version, canary_version, canary_weight_bp, previous_version,
              updated_ms, canary_auto)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (function, alias) DO UPDATE SET
             version = excluded.version,
             canary_version = excluded.canary_version,
             canary_weight_bp = excluded.canary_weight_bp,
             previous_version = excluded.previous_version,
             updated_ms = excluded.updated_ms,
             canary_auto = excluded.canary_auto",
        params![
            function,
            alias,
            to_i64(version),
            canary.map(|c| to_i64(c.version)),
            canary.map_or(0, |c| i64::from(c.weight_bp)),
            previous_version.map(to_i64),
            now,
            auto,
        ],
    )?;
    tx.execute(
        "INSERT INTO alias_moves
             (function, alias, at_ms, from_version, version, canary, cause, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            function,
            alias,
            now,
            current.map(|c| to_i64(c.version)),
            to_i64(version),
            canary.map(|c| plain_json(&c)),
            cause.as_str(),
            detail,
        ],
    )?;
    tx.execute(
        "DELETE FROM alias_moves WHERE function = ?1 AND id <= (
             SELECT id FROM alias_moves WHERE function = ?1
             ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        params![function, ALIAS_MOVES_KEPT],
    )?;
    Ok(AliasRecord {
        function: function.to_string(),
        alias: alias.to_string(),
        version,
        canary,
        previous_version,
        updated_at_ms: now,
    })
}

type FunctionRow = (String, i64, i64, String, String, i64);

fn function_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<FunctionRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    ))
}

fn function_from_row(
    (name, created_at_ms, version, digest, config, v_created): FunctionRow,
) -> Result<FunctionRecord> {
    Ok(FunctionRecord {
        live: read_version(name.clone(), version, digest, config, v_created)?,
        name,
        created_at_ms,
    })
}

/// The registry, synchronously.
impl StoreDb {
    fn create_version(
        &self,
        function: &str,
        digest: &Digest,
        config: &FunctionConfig,
        expected_live: Expected,
    ) -> Result<VersionRecord> {
        let config_json =
            serde_json::to_string(config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let now = now_ms();
        let mut conn = self.meta();
        let tx = write_tx(&mut conn)?;
        check_expected(&tx, function, LIVE_ALIAS, expected_live)?;

        let previous: Option<i64> = tx
            .query_row(
                "SELECT MAX(version) FROM versions WHERE function = ?1",
                params![function],
                |row| row.get(0),
            )
            .optional()?
            .flatten();
        let version = previous.unwrap_or(0) + 1;
        replace_routes(&tx, function, &config.routes)?;
        tx.execute(
            "INSERT INTO versions (function, version, digest, config, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![function, version, digest.to_string(), config_json, now],
        )?;
        tx.execute(
            "INSERT INTO functions (name, created_at_ms) VALUES (?1, ?2)
             ON CONFLICT (name) DO NOTHING",
            params![function, now],
        )?;
        let write = AliasWrite {
            function,
            alias: LIVE_ALIAS,
            version: to_u64(version),
            canary: None,
            cause: MoveCause::Deploy,
            detail: "",
        };
        write_alias(&tx, write, now)?;
        tx.commit()?;
        self.changes.emit(RegistryChange::Changed {
            function: function.to_string(),
        });

        Ok(VersionRecord {
            function: function.to_string(),
            version: version as u64,
            digest: digest.to_string(),
            config: config.clone(),
            created_at_ms: now,
        })
    }

    fn function(&self, name: &str) -> Result<Option<FunctionRecord>> {
        let conn = self.meta();
        let row = conn
            .query_row(
                &format!("{FUNCTION_QUERY} WHERE f.name = ?1"),
                params![name],
                function_row,
            )
            .optional()?;
        row.map(function_from_row).transpose()
    }

    fn functions(&self) -> Result<Vec<FunctionRecord>> {
        let conn = self.meta();
        let mut stmt = conn.prepare(&format!("{FUNCTION_QUERY} ORDER BY f.name"))?;
        let rows = stmt.query_map([], function_row)?;
        rows.map(|row| function_from_row(row?)).collect()
    }

    fn versions(&self, name: &str) -> Result<Vec<VersionRecord>> {
        let conn = self.meta();
        let mut stmt = conn.prepare(
            "SELECT function, version, digest, config, created_at_ms FROM versions
             WHERE function = ?1 ORDER BY version DESC",
        )?;
        let rows = stmt.query_map(params![name], version_columns)?;
        rows.map(|row| {
            let (function, version, digest, config, created) = row?;
            read_version(function, version, digest, config, created)
        })
        .collect()
    }

    fn delete_function(&self, name: &str) -> Result<bool> {
        let mut conn = self.meta();
        let tx = write_tx(&mut conn)?;
        let deleted = tx.execute("DELETE FROM functions WHERE name = ?1", params![name])?;
        tx.execute("DELETE FROM versions WHERE function = ?1", params![name])?;
        tx.execute("DELETE FROM routes WHERE function = ?1", params![name])?;
        tx.execute("DELETE FROM aliases WHERE function = ?1", params![name])?;
        tx.execute("DELETE FROM alias_moves WHERE function = ?1", params![name])?;
        tx.commit()?;
        if deleted > 0 {
            self.changes.emit(RegistryChange::Deleted {
                function: name.to_string(),
            });
        }
        Ok(deleted > 0)
    }

    fn version(&self, function: &str, version: u64) -> Result<Option<VersionRecord>> {
        let conn = self.meta();
        let row = conn
            .query_row(
                "SELECT function, version, digest, config, created_at_ms FROM versions
                 WHERE function = ?1 AND version = ?2",
                params![function, version as i64],
                version_columns,
            )
            .optional()?;
        row.map(|(function, version, digest, config, created)| {
            read_version(function, version, digest, config, created)
        })
        .transpose()
    }

    fn aliases(&self, function: &str) -> Result<Vec<AliasRecord>> {
        read_aliases(&self.meta(), function)
    }

    #[allow(clippy::too_many_arguments)] // The contract's own arguments.
    fn set_alias(
        &self,
        function: &str,
        alias: &str,
        version: u64,
        canary: Option<CanaryRecord>,
        expected: Expected,
        cause: MoveCause,
        detail: &str,
    ) -> Result<AliasRecord> {
        let now = now_ms();
        let mut conn = self.meta();
        let tx = write_tx(&mut conn)?;
        if !function_exists(&tx, function)? {
            return Err(StoreError::FunctionNotFound(function.to_string()));
        }
        check_expected(&tx, function, alias, expected)?;
        for wanted in std::iter::once(version).chain(canary.map(|c| c.version)) {
            if !version_exists(&tx, function, wanted)? {
                return Err(StoreError::VersionNotFound {
                    function: function.to_string(),
                    version: wanted,
                });
            }
        }
        if alias == LIVE_ALIAS {
            let config: String = tx.query_row(
                "SELECT config FROM versions WHERE function = ?1 AND version = ?2",
                params![function, version as i64],
                |row| row.get(0),
            )?;
            let config: FunctionConfig = serde_json::from_str(&config).map_err(|e| {
                StoreError::Corrupt(format!("config of {function} v{version}: {e}"))
            })?;
            replace_routes(&tx, function, &config.routes)?;
        }
        let write = AliasWrite {
            function,
            alias,
            version,
            canary,
            cause,
            detail,
        };
        let record = write_alias(&tx, write, now)?;
        tx.commit()?;
        self.changes.emit(RegistryChange::Changed {
            function: function.to_string(),
        });
        Ok(record)
    }

    fn alias_moves(&self, function: &str, limit: usize) -> Result<Vec<AliasMove>> {
        let conn = self.meta();
        let mut stmt = conn.prepare_cached(
            "SELECT function, alias, at_ms, from_version, version, canary, cause, detail
             FROM alias_moves WHERE function = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            params![function, i64::try_from(limit).unwrap_or(i64::MAX)],
            alias_move_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn delete_alias(&self, function: &str, alias: &str) -> Result<bool> {
        if alias == LIVE_ALIAS {
            return Err(StoreError::Conflict(format!(
                "the `{LIVE_ALIAS}` alias of `{function}` cannot be deleted: it is what the \
                 function's routes serve; delete the function instead"
            )));
        }
        let conn = self.meta();
        let deleted = conn.execute(
            "DELETE FROM aliases WHERE function = ?1 AND alias = ?2",
            params![function, alias],
        )?;
        if deleted > 0 {
            self.changes.emit(RegistryChange::Changed {
                function: function.to_string(),
            });
        }
        Ok(deleted > 0)
    }

    fn delete_version(&self, function: &str, version: u64) -> Result<()> {
        let mut conn = self.meta();
        let tx = write_tx(&mut conn)?;
        if !version_exists(&tx, function, version)? {
            return Err(if function_exists(&tx, function)? {
                StoreError::VersionNotFound {
                    function: function.to_string(),
                    version,
                }
            } else {
                StoreError::FunctionNotFound(function.to_string())
            });
        }
        crate::registry::refuse_if_aliased(function, version, read_aliases(&tx, function)?)?;
        tx.execute(
            "DELETE FROM versions WHERE function = ?1 AND version = ?2",
            params![function, version as i64],
        )?;
        tx.commit()?;
        self.changes.emit(RegistryChange::Changed {
            function: function.to_string(),
        });
        Ok(())
    }

    fn prune_versions(&self, function: &str, keep: usize) -> Result<Vec<u64>> {
        let mut conn = self.meta();
        let tx = write_tx(&mut conn)?;
        let aliases = read_aliases(&tx, function)?;
        let old: Vec<u64> = {
            let mut stmt = tx.prepare(
                "SELECT version FROM versions WHERE function = ?1
                 ORDER BY version DESC LIMIT -1 OFFSET ?2",
            )?;
            let rows = stmt.query_map(
                params![function, i64::try_from(keep).unwrap_or(i64::MAX)],
                |row| row.get::<_, i64>(0),
            )?;
            rows.map(|row| row.map(|v| v as u64))
                .collect::<rusqlite::Result<_>>()?
        };
        let mut pruned = Vec::new();
        for version in old {
            if aliases.iter().any(|alias| alias.points_at(version)) {
                continue;
            }
            tx.execute(
                "DELETE FROM versions WHERE function = ?1 AND version = ?2",
                params![function, version as i64],
            )?;
            pruned.push(version);
        }
        tx.commit()?;
        if !pruned.is_empty() {
            self.changes.emit(RegistryChange::Changed {
                function: function.to_string(),
            });
        }
        pruned.sort_unstable();
        Ok(pruned)
    }
}

fn log_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<LogRecord> {
    Ok(LogRecord {
        id: row.get(0)?,
        line: NewLogLine {
            ts_ms: row.get(1)?,
            function: row.get(2)?,
            version: row.get::<_, i64>(3)? as u64,
            request_id: row.get(4)?,
            stream: row.get(5)?,
            line: row.get(6)?,
        },
    })
}

const LOG_COLUMNS: &str = "id, ts_ms, function, version, request_id, stream, line";

/// The log store, synchronously.
impl StoreDb {
    fn append_logs(&self, lines: &[NewLogLine]) -> Result<i64> {
        let mut conn = self.logs();
        let tx = write_tx(&mut conn)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO logs (ts_ms, function, version, request_id, stream, line)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for line in lines {
                stmt.execute(params![
                    line.ts_ms,
                    line.function,
                    line.version as i64,
                    line.request_id,
                    line.stream,
                    line.line
                ])?;
            }
        }
        let last = tx.last_insert_rowid();
        tx.commit()?;
        Ok(last)
    }

    fn logs_after(&self, function: &str, after_id: i64, limit: usize) -> Result<Vec<LogRecord>> {
        let conn = self.logs();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {LOG_COLUMNS} FROM logs WHERE function = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![function, after_id, limit as i64], log_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn logs_tail(&self, function: &str, limit: usize) -> Result<Vec<LogRecord>> {
        let conn = self.logs();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {LOG_COLUMNS} FROM logs WHERE function = ?1 ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![function, limit as i64], log_row)?;
        let mut lines: Vec<LogRecord> = rows.collect::<rusqlite::Result<_>>()?;
        lines.reverse();
        Ok(lines)
    }

    fn prune_logs(&self, keep: usize) -> Result<usize> {
        let conn = self.logs();
        // By count, not by id: ids are global, so "newest id minus keep"
        // would let one function's flood push out every other's lines even
        // when per-function retention keeps the table small.
        let removed = conn.execute(
            "DELETE FROM logs WHERE id <= (SELECT id FROM logs ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            params![keep as i64],
        )?;
        Ok(removed)
    }

    fn prune_function_logs(
        &self,
        function: &str,
        keep_lines: usize,
        keep_bytes: u64,
    ) -> Result<usize> {
        let conn = self.logs();
        // Both walk the function's newest lines by (function, id), the
        // index's order: the first at most `keep_lines` of them.
        let by_lines = conn.execute(
            "DELETE FROM logs WHERE function = ?1 AND id <= (
                SELECT id FROM logs WHERE function = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            params![function, to_i64(keep_lines as u64)],
        )?;
        let by_bytes = conn.execute(
            "DELETE FROM logs WHERE function = ?1 AND id <= (
                SELECT id FROM (
                    SELECT id, SUM(length(CAST(line AS BLOB))) OVER (ORDER BY id DESC) AS kept
                    FROM logs WHERE function = ?1)
                WHERE kept > ?2 ORDER BY id DESC LIMIT 1)",
            params![function, to_i64(keep_bytes)],
        )?;
        Ok(by_lines + by_bytes)
    }
}

#[async_trait::async_trait]
impl Registry for EmbeddedStore {
    async fn create_version(
        &self,
        function: &str,
        digest: &Digest,
        config: &FunctionConfig,
        expected_live: Expected,
    ) -> Result<VersionRecord> {
        let (function, digest, config) = (function.to_owned(), digest.clone(), config.clone());
        offload(&self.db, move |db| {
            db.create_version(&function, &digest, &config, expected_live)
        })
        .await
    }

    async fn function(&self, name: &str) -> Result<Option<FunctionRecord>> {
        let name = name.to_owned();
        offload(&self.db, move |db| db.function(&name)).await
    }

    async fn functions(&self) -> Result<Vec<FunctionRecord>> {
        offload(&self.db, |db| db.functions()).await
    }

    async fn versions(&self, name: &str) -> Result<Vec<VersionRecord>> {
        let name = name.to_owned();
        offload(&self.db, move |db| db.versions(&name)).await
    }

    async fn delete_function(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        offload(&self.db, move |db| db.delete_function(&name)).await
    }

    async fn version(&self, function: &str, version: u64) -> Result<Option<VersionRecord>> {
        let function = function.to_owned();
        offload(&self.db, move |db| db.version(&function, version)).await
    }

    async fn aliases(&self, function: &str) -> Result<Vec<AliasRecord>> {
        let function = function.to_owned();
        offload(&self.db, move |db| db.aliases(&function)).await
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
        let (function, alias, detail) = (function.to_owned(), alias.to_owned(), detail.to_owned());
        offload(&self.db, move |db| {
            db.set_alias(&function, &alias, version, canary, expected, cause, &detail)
        })
        .await
    }

    async fn alias_moves(&self, function: &str, limit: usize) -> Result<Vec<AliasMove>> {
        let function = function.to_owned();
        offload(&self.db, move |db| db.alias_moves(&function, limit)).await
    }

    async fn delete_alias(&self, function: &str, alias: &str) -> Result<bool> {
        let (function, alias) = (function.to_owned(), alias.to_owned());
        offload(&self.db, move |db| db.delete_alias(&function, &alias)).await
    }

    async fn delete_version(&self, function: &str, version: u64) -> Result<()> {
        let function = function.to_owned();
        offload(&self.db, move |db| db.delete_version(&function, version)).await
    }

    async fn prune_versions(&self, function: &str, keep: usize) -> Result<Vec<u64>> {
        let function = function.to_owned();
        offload(&self.db, move |db| db.prune_versions(&function, keep)).await
    }

    fn watch(&self) -> ChangeFeed<RegistryChange> {
        self.db.changes.subscribe()
    }
}

#[async_trait::async_trait]
impl LogStore for EmbeddedStore {
    async fn append_logs(&self, lines: &[NewLogLine]) -> Result<i64> {
        let lines = lines.to_vec();
        offload(&self.db, move |db| db.append_logs(&lines)).await
    }

    async fn logs_after(
        &self,
        function: &str,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<LogRecord>> {
        let function = function.to_owned();
        offload(&self.db, move |db| {
            db.logs_after(&function, after_id, limit)
        })
        .await
    }

    async fn logs_tail(&self, function: &str, limit: usize) -> Result<Vec<LogRecord>> {
        let function = function.to_owned();
        offload(&self.db, move |db| db.logs_tail(&function, limit)).await
    }

    async fn prune_logs(&self, keep: usize) -> Result<usize> {
        offload(&self.db, move |db| db.prune_logs(keep)).await
    }

    async fn prune_function_logs(
        &self,
        function: &str,
        keep_lines: usize,
        keep_bytes: u64,
    ) -> Result<usize> {
        let function = function.to_owned();
        offload(&self.db, move |db| {
            db.prune_function_logs(&function, keep_lines, keep_bytes)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    #[tokio::test]
    async fn the_live_version_survives_the_alias_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mayfly.db");
        {
            let conn = open_connection(&path).unwrap();
            migrate(&conn, &MIGRATIONS[..1]).unwrap();
            conn.execute_batch(
                "INSERT INTO functions VALUES ('f', 2, 5);
                 INSERT INTO versions VALUES ('f', 1, 'd', '{}', 1), ('f', 2, 'd', '{}', 2);",
            )
            .unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let f = store.function("f").await.unwrap().unwrap();
        assert_eq!((f.live.version, f.created_at_ms), (2, 5));
        assert_eq!(store.aliases("f").await.unwrap()[0].alias, "live");
    }
}
