//! Secrets, sealed, in their own SQLite file (`<data>/secrets.db`).

use std::path::Path;
use std::sync::Arc;

use rusqlite::{OptionalExtension, Row, params};

use super::{LockedDb, now_ms, offload, to_i64, to_u64, write_tx};
use crate::changes::Feed;
use crate::{
    ChangeFeed, ResealFn, Result, SealFn, Sealed, SealedSecret, SecretChange, SecretMeta,
    SecretPut, SecretStore,
};

const MIGRATIONS: &[&str] = &[r#"
    -- The latest version of each secret only: a replaced value is not kept.
    CREATE TABLE secrets (
        name          TEXT PRIMARY KEY,
        version       INTEGER NOT NULL,
        key_id        TEXT NOT NULL,
        nonce         BLOB NOT NULL,
        ciphertext    BLOB NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    -- One counter for every secret's versions: a deleted and re-created
    -- secret never reuses a version, so a ciphertext bound to an old
    -- (name, version) can never pass for the new one.
    CREATE TABLE secret_version (only INTEGER PRIMARY KEY CHECK (only = 0), last INTEGER NOT NULL);
    INSERT INTO secret_version VALUES (0, 0);
"#];

/// [`SecretStore`] in a SQLite file (WAL, synchronous=FULL). Each call runs
/// on the blocking pool (`sqlite::offload`), sealing callbacks included: they run
/// inside the call's transaction.
pub struct EmbeddedSecrets {
    db: Arc<SecretsDb>,
}

/// The connection and the secret feed, with the synchronous code of every
/// call.
struct SecretsDb {
    conn: LockedDb,
    changes: Feed<SecretChange>,
}

impl EmbeddedSecrets {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            db: Arc::new(SecretsDb {
                conn: LockedDb::open(path, MIGRATIONS)?,
                changes: Feed::new(),
            }),
        })
    }
}

impl SecretsDb {
    fn conn(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.conn.lock()
    }
}

const SECRET_COLUMNS: &str =
    "name, version, key_id, nonce, ciphertext, created_at_ms, updated_at_ms";

fn secret_row(row: &Row<'_>) -> rusqlite::Result<SealedSecret> {
    Ok(SealedSecret {
        name: row.get(0)?,
        version: to_u64(row.get(1)?),
        sealed: Sealed {
            key_id: row.get(2)?,
            nonce: row.get(3)?,
            ciphertext: row.get(4)?,
        },
        created_at_ms: row.get(5)?,
        updated_at_ms: row.get(6)?,
    })
}

/// The secrets, synchronously.
impl SecretsDb {
    fn put(&self, name: &str, seal: SealFn) -> Result<SecretPut> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn)?;
        let version: i64 = tx.query_row(
            "UPDATE secret_version SET last = last + 1 RETURNING last",
            [],
            |row| row.get(0),
        )?;
        let sealed = seal(to_u64(version))?;
        let now = now_ms();
        let created_at_ms: Option<i64> = tx
            .query_row(
                "SELECT created_at_ms FROM secrets WHERE name = ?1",
                [name],
                |row| row.get(0),
            )
            .optional()?;
        tx.execute(
            "INSERT OR REPLACE INTO secrets
                 (name, version, key_id, nonce, ciphertext, created_at_ms, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                name,
                version,
                sealed.key_id,
                sealed.nonce,
                sealed.ciphertext,
                created_at_ms.unwrap_or(now),
                now
            ],
        )?;
        tx.commit()?;
        self.changes.emit(SecretChange::Put {
            name: name.to_string(),
            version: to_u64(version),
        });
        Ok(SecretPut {
            version: to_u64(version),
            created: created_at_ms.is_none(),
        })
    }

    fn get(&self, name: &str) -> Result<Option<SealedSecret>> {
        let conn = self.conn();
        let mut statement = conn.prepare_cached(&format!(
            "SELECT {SECRET_COLUMNS} FROM secrets WHERE name = ?1"
        ))?;
        Ok(statement.query_row([name], secret_row).optional()?)
    }

    fn list(&self) -> Result<Vec<SecretMeta>> {
        let conn = self.conn();
        let mut statement = conn.prepare_cached(
            "SELECT name, version, key_id, created_at_ms, updated_at_ms
             FROM secrets ORDER BY name",
        )?;
        let metas = statement
            .query_map([], |row| {
                Ok(SecretMeta {
                    name: row.get(0)?,
                    version: to_u64(row.get(1)?),
                    key_id: row.get(2)?,
                    created_at_ms: row.get(3)?,
                    updated_at_ms: row.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(metas)
    }

    fn delete(&self, name: &str) -> Result<bool> {
        let deleted = self
            .conn()
            .execute("DELETE FROM secrets WHERE name = ?1", [name])?;
        if deleted > 0 {
            self.changes.emit(SecretChange::Deleted {
                name: name.to_string(),
            });
        }
        Ok(deleted > 0)
    }

    fn reseal_all(&self, mut reseal: ResealFn) -> Result<usize> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn)?;
        let secrets = {
            let mut statement = tx.prepare(&format!(
                "SELECT {SECRET_COLUMNS} FROM secrets ORDER BY name"
            ))?;
            statement
                .query_map([], secret_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        let mut rewritten = 0;
        for secret in &secrets {
            let Some(sealed) = reseal(secret)? else {
                continue;
            };
            tx.execute(
                "UPDATE secrets SET key_id = ?1, nonce = ?2, ciphertext = ?3
                 WHERE name = ?4 AND version = ?5",
                params![
                    sealed.key_id,
                    sealed.nonce,
                    sealed.ciphertext,
                    secret.name,
                    to_i64(secret.version)
                ],
            )?;
            rewritten += 1;
        }
        tx.commit()?;
        if rewritten > 0 {
            self.changes.emit(SecretChange::Resealed);
        }
        Ok(rewritten)
    }
}

#[async_trait::async_trait]
impl SecretStore for EmbeddedSecrets {
    async fn put(&self, name: &str, seal: SealFn) -> Result<SecretPut> {
        let name = name.to_owned();
        offload(&self.db, move |db| db.put(&name, seal)).await
    }

    async fn get(&self, name: &str) -> Result<Option<SealedSecret>> {
        let name = name.to_owned();
        offload(&self.db, move |db| db.get(&name)).await
    }

    async fn list(&self) -> Result<Vec<SecretMeta>> {
        offload(&self.db, |db| db.list()).await
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        offload(&self.db, move |db| db.delete(&name)).await
    }

    async fn reseal_all(&self, reseal: ResealFn) -> Result<usize> {
        offload(&self.db, move |db| db.reseal_all(reseal)).await
    }

    fn watch(&self) -> ChangeFeed<SecretChange> {
        self.db.changes.subscribe()
    }
}
