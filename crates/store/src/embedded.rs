//! The embedded back-end: one SQLite database in the data directory.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    Digest, FunctionConfig, FunctionRecord, LogRecord, LogStore, NewLogLine, Registry, Result,
    StoreError, VersionRecord,
};

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many have run. Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

/// Registry and log store in `<data dir>/mayfly.db`.
///
/// Metadata and logs use separate connections so that a burst of log writes
/// never queues behind (or in front of) a deploy; SQLite's WAL mode lets
/// them proceed side by side.
pub struct EmbeddedStore {
    meta: Mutex<Connection>,
    logs: Mutex<Connection>,
}

impl EmbeddedStore {
    /// Opens or creates the database at `path` and brings its schema up to
    /// date.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = open_connection(path)?;
        migrate(&meta, MIGRATIONS)?;
        let logs = open_connection(path)?;
        Ok(Self {
            meta: Mutex::new(meta),
            logs: Mutex::new(logs),
        })
    }

    fn meta(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done change:
        // every change runs in a transaction that rolls back on drop.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn logs(&self) -> MutexGuard<'_, Connection> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens a connection with the settings every Mayfly database uses.
pub(crate) fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL: readers never block the writer. synchronous=FULL: a deploy that
    // returned is on disk even after a power loss.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Applies the `migrations` this database has not run yet, each in its own
/// transaction; `PRAGMA user_version` counts those applied.
pub(crate) fn migrate(conn: &Connection, migrations: &[&str]) -> Result<()> {
    let applied: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied > migrations.len() {
        return Err(StoreError::Corrupt(format!(
            "the database schema is version {applied}, newer than this binary knows \
             ({}): use a newer mayfly",
            migrations.len()
        )));
    }
    for (index, migration) in migrations.iter().enumerate().skip(applied) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, the store's clock.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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
    FROM functions f JOIN versions v ON v.function = f.name AND v.version = f.live_version";

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

impl Registry for EmbeddedStore {
    fn create_version(
        &self,
        function: &str,
        digest: &Digest,
        config: &FunctionConfig,
    ) -> Result<VersionRecord> {
        let config_json =
            serde_json::to_string(config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let now = now_ms();
        let mut conn = self.meta();
        let tx = conn.transaction()?;

        for route in &config.routes {
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

        let previous: Option<i64> = tx
            .query_row(
                "SELECT MAX(version) FROM versions WHERE function = ?1",
                params![function],
                |row| row.get(0),
            )
            .optional()?
            .flatten();
        let version = previous.unwrap_or(0) + 1;
        tx.execute(
            "INSERT INTO versions (function, version, digest, config, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![function, version, digest.to_string(), config_json, now],
        )?;
        tx.execute(
            "INSERT INTO functions (name, live_version, created_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET live_version = excluded.live_version",
            params![function, version, now],
        )?;
        tx.execute("DELETE FROM routes WHERE function = ?1", params![function])?;
        for route in &config.routes {
            tx.execute(
                "INSERT INTO routes (route, function) VALUES (?1, ?2)",
                params![route, function],
            )?;
        }
        tx.commit()?;

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
        let rows = stmt.query_map(params![name], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })?;
        rows.map(|row| {
            let (function, version, digest, config, created) = row?;
            read_version(function, version, digest, config, created)
        })
        .collect()
    }

    fn delete_function(&self, name: &str) -> Result<bool> {
        let mut conn = self.meta();
        let tx = conn.transaction()?;
        let deleted = tx.execute("DELETE FROM functions WHERE name = ?1", params![name])?;
        tx.execute("DELETE FROM versions WHERE function = ?1", params![name])?;
        tx.execute("DELETE FROM routes WHERE function = ?1", params![name])?;
        tx.commit()?;
        Ok(deleted > 0)
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

impl LogStore for EmbeddedStore {
    fn append_logs(&self, lines: &[NewLogLine]) -> Result<i64> {
        let mut conn = self.logs();
        let tx = conn.transaction()?;
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
        let removed = conn.execute(
            "DELETE FROM logs WHERE id <= (SELECT MAX(id) FROM logs) - ?1",
            params![keep as i64],
        )?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("mayfly.db")).unwrap();
        (dir, store)
    }

    fn config(routes: &[&str]) -> FunctionConfig {
        FunctionConfig {
            routes: routes.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn versions_increase_and_the_newest_is_live() {
        let (_dir, store) = store();
        let d = Digest::of(b"x");
        assert_eq!(
            store
                .create_version("f", &d, &config(&["/a"]))
                .unwrap()
                .version,
            1
        );
        assert_eq!(
            store
                .create_version("f", &d, &config(&["/b"]))
                .unwrap()
                .version,
            2
        );
        let f = store.function("f").unwrap().unwrap();
        assert_eq!(f.live.version, 2);
        assert_eq!(f.live.config.routes, ["/b"]);
        assert_eq!(store.versions("f").unwrap().len(), 2);
        // The old route was released with the new version.
        store.create_version("g", &d, &config(&["/a"])).unwrap();
    }

    #[test]
    fn a_taken_route_changes_nothing() {
        let (_dir, store) = store();
        let d = Digest::of(b"x");
        store.create_version("f", &d, &config(&["/a"])).unwrap();
        let err = store.create_version("g", &d, &config(&["/a"])).unwrap_err();
        assert!(matches!(err, StoreError::RouteTaken { ref owner, .. } if owner == "f"));
        assert!(store.function("g").unwrap().is_none());
    }

    #[test]
    fn delete_removes_versions_and_routes() {
        let (_dir, store) = store();
        let d = Digest::of(b"x");
        store.create_version("f", &d, &config(&["/a"])).unwrap();
        assert!(store.delete_function("f").unwrap());
        assert!(!store.delete_function("f").unwrap());
        assert!(store.functions().unwrap().is_empty());
        assert_eq!(
            store
                .create_version("g", &d, &config(&["/a"]))
                .unwrap()
                .version,
            1
        );
    }

    #[test]
    fn logs_tail_and_follow() {
        let (_dir, store) = store();
        let line = |n: u32| NewLogLine {
            ts_ms: 1,
            function: "f".into(),
            version: 1,
            request_id: "r".into(),
            stream: "stdout".into(),
            line: format!("line {n}"),
        };
        let last = store
            .append_logs(&(0..5).map(line).collect::<Vec<_>>())
            .unwrap();
        let tail = store.logs_tail("f", 2).unwrap();
        assert_eq!(tail[0].line.line, "line 3");
        assert_eq!(tail[1].id, last);
        assert!(store.logs_after("f", last, 10).unwrap().is_empty());
        assert_eq!(store.prune_logs(1).unwrap(), 4);
    }
}
