//! Models for wasi:nn, by name, in their own SQLite file
//! (`<data>/models.db`). The bytes live in the blob store under
//! [`BlobKind::Model`](crate::BlobKind::Model); this maps each name to its
//! current digest and version.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;

use super::{LockedDb, now_ms, offload, to_i64, to_u64, write_tx};
use crate::Result;

const MIGRATIONS: &[&str] = &[r#"
    -- The current version of each model: a replaced one is not kept (its
    -- blob stays content-addressed, shared with any name that has it).
    CREATE TABLE models (
        name          TEXT PRIMARY KEY,
        version       INTEGER NOT NULL,
        digest        TEXT NOT NULL,
        size          INTEGER NOT NULL,
        inputs        TEXT NOT NULL,
        outputs       TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    -- One counter for every model's versions: a deleted and re-created
    -- model never reuses a version.
    CREATE TABLE model_version (only INTEGER PRIMARY KEY CHECK (only = 0), last INTEGER NOT NULL);
    INSERT INTO model_version VALUES (0, 0);
"#];

/// A named model: what `mayfly model list` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelRecord {
    /// The model's name, as functions load it and grants name it.
    pub name: String,
    /// Increases with every put, across all models.
    pub version: u64,
    /// The blob holding its ONNX bytes, `sha256:<hex>`.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its input names, in order.
    pub inputs: Vec<String>,
    /// Its output names, in order.
    pub outputs: Vec<String>,
    /// When it was first put (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When its current version was put.
    pub updated_at_ms: i64,
}

/// Model names in a SQLite file (WAL, synchronous=FULL); each call runs on
/// the blocking pool.
#[derive(Clone)]
pub struct EmbeddedModels {
    db: Arc<LockedDb>,
}

impl EmbeddedModels {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            db: Arc::new(LockedDb::open(path, MIGRATIONS)?),
        })
    }

    /// Points `record.name` at `record.digest`, as a new version; returns
    /// the record stored (version and times filled in).
    pub async fn put(&self, record: ModelRecord) -> Result<ModelRecord> {
        offload(&self.db, move |db| {
            let mut conn = db.lock();
            let tx = write_tx(&mut conn)?;
            let version: i64 = tx.query_row(
                "UPDATE model_version SET last = last + 1 RETURNING last",
                [],
                |r| r.get(0),
            )?;
            let now = now_ms();
            let created: Option<i64> = tx
                .query_row(
                    "SELECT created_at_ms FROM models WHERE name = ?1",
                    [&record.name],
                    |r| r.get(0),
                )
                .optional()?;
            let created = created.unwrap_or(now);
            tx.execute(
                "INSERT OR REPLACE INTO models (name, version, digest, size, inputs, outputs, \
                 created_at_ms, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    record.name,
                    version,
                    record.digest,
                    to_i64(record.size),
                    serde_json::to_string(&record.inputs).unwrap_or_default(),
                    serde_json::to_string(&record.outputs).unwrap_or_default(),
                    created,
                    now
                ],
            )?;
            tx.commit()?;
            Ok(ModelRecord {
                version: to_u64(version),
                created_at_ms: created,
                updated_at_ms: now,
                ..record
            })
        })
        .await
    }

    /// The model called `name`, if any.
    pub async fn get(&self, name: &str) -> Result<Option<ModelRecord>> {
        let name = name.to_owned();
        offload(&self.db, move |db| {
            Ok(db
                .lock()
                .query_row(
                    &format!("SELECT {COLUMNS} FROM models WHERE name = ?1"),
                    [&name],
                    model_row,
                )
                .optional()?)
        })
        .await
    }

    /// Every model, by name.
    pub async fn list(&self) -> Result<Vec<ModelRecord>> {
        offload(&self.db, move |db| {
            let conn = db.lock();
            let mut statement =
                conn.prepare(&format!("SELECT {COLUMNS} FROM models ORDER BY name"))?;
            let rows = statement
                .query_map([], model_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    /// Deletes the model called `name`; returns what it was.
    pub async fn delete(&self, name: &str) -> Result<Option<ModelRecord>> {
        let name = name.to_owned();
        offload(&self.db, move |db| {
            let mut conn = db.lock();
            let tx = write_tx(&mut conn)?;
            let record = tx
                .query_row(
                    &format!("SELECT {COLUMNS} FROM models WHERE name = ?1"),
                    [&name],
                    model_row,
                )
                .optional()?;
            tx.execute("DELETE FROM models WHERE name = ?1", [&name])?;
            tx.commit()?;
            Ok(record)
        })
        .await
    }
}

const COLUMNS: &str = "name, version, digest, size, inputs, outputs, created_at_ms, updated_at_ms";

fn model_row(row: &Row<'_>) -> rusqlite::Result<ModelRecord> {
    let names = |text: String| serde_json::from_str(&text).unwrap_or_default();
    Ok(ModelRecord {
        name: row.get(0)?,
        version: to_u64(row.get(1)?),
        digest: row.get(2)?,
        size: to_u64(row.get(3)?),
        inputs: names(row.get(4)?),
        outputs: names(row.get(5)?),
        created_at_ms: row.get(6)?,
        updated_at_ms: row.get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, digest: &str) -> ModelRecord {
        ModelRecord {
            name: name.into(),
            version: 0,
            digest: digest.into(),
            size: 3,
            inputs: vec!["x".into()],
            outputs: vec!["y".into()],
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[tokio::test]
    async fn put_versions_list_and_delete() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| crate::StoreError::Backend(Box::new(e)))?;
        let models = EmbeddedModels::open(&dir.path().join("models.db"))?;
        let first = models.put(record("m", "sha256:aa")).await?;
        let second = models.put(record("m", "sha256:bb")).await?;
        assert!(second.version > first.version);
        assert_eq!(second.created_at_ms, first.created_at_ms);
        let got = models.get("m").await?;
        assert_eq!(got.as_ref().map(|m| m.digest.as_str()), Some("sha256:bb"));
        assert_eq!(got.map(|m| m.inputs), Some(vec!["x".to_string()]));
        models.put(record("a", "sha256:aa")).await?;
        let names: Vec<_> = models.list().await?.into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["a", "m"]);
        assert!(models.delete("m").await?.is_some());
        assert!(models.delete("m").await?.is_none());
        assert!(models.get("m").await?.is_none());
        Ok(())
    }
}
