//! Admin API tokens and the audit log, in their own SQLite file
//! (`<data>/auth.db`), so security records never share a write lock with
//! the request path's stores.

use std::path::Path;
use std::sync::{Arc, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use super::{LockedDb, now_ms, offload};
use crate::changes::Feed;
use crate::{AuditEntry, AuthStore, ChangeFeed, Result, TokenChange, TokenRecord};

const MIGRATIONS: &[&str] = &[r#"
    CREATE TABLE tokens (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        -- SHA-256 of the token: the token itself is shown once and never stored.
        hash        TEXT NOT NULL UNIQUE,
        scopes      TEXT NOT NULL,
        functions   TEXT NOT NULL,
        created_ms  INTEGER NOT NULL,
        revoked_ms  INTEGER
    );

    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms   INTEGER NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        status  INTEGER NOT NULL,
        detail  TEXT
    );
"#];

/// [`AuthStore`] in a SQLite file. Each call runs on the blocking pool
/// (`sqlite::offload`).
pub struct EmbeddedAuth {
    db: Arc<AuthDb>,
}

/// The connection and the token feed, with the synchronous code of every
/// call.
struct AuthDb {
    conn: LockedDb,
    changes: Feed<TokenChange>,
}

impl EmbeddedAuth {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            db: Arc::new(AuthDb {
                conn: LockedDb::open(path, MIGRATIONS)?,
                changes: Feed::new(),
            }),
        })
    }

    /// The token with `id`, if any.
    pub async fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        let id = id.to_owned();
        offload(&self.db, move |db| db.token(&id)).await
    }
}

impl AuthDb {
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock()
    }
}

fn token_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let list = |text: String| -> Vec<String> {
        text.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    Ok(TokenRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        hash: row.get(2)?,
        scopes: list(row.get(3)?),
        functions: list(row.get(4)?),
        created_at_ms: row.get(5)?,
        revoked_at_ms: row.get(6)?,
    })
}

/// Tokens and the audit log, synchronously.
impl AuthDb {
    fn create_token(&self, token: &TokenRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO tokens (id, name, hash, scopes, functions, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                token.id,
                token.name,
                token.hash,
                token.scopes.join(","),
                token.functions.join(","),
                token.created_at_ms
            ],
        )?;
        self.changes.emit(TokenChange::Created {
            id: token.id.clone(),
        });
        Ok(())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let conn = self.conn();
        let mut statement = conn.prepare_cached(
            "SELECT id, name, hash, scopes, functions, created_ms, revoked_ms
             FROM tokens ORDER BY created_ms, id",
        )?;
        let tokens = statement
            .query_map([], token_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(tokens)
    }

    fn revoke_token(&self, id: &str) -> Result<bool> {
        let changed = self.conn().execute(
            "UPDATE tokens SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![id, now_ms()],
        )?;
        if changed > 0 {
            self.changes
                .emit(TokenChange::Revoked { id: id.to_string() });
        }
        Ok(changed > 0)
    }

    fn append_audit(
        &self,
        actor: &str,
        action: &str,
        status: u16,
        detail: Option<&str>,
    ) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO audit (ts_ms, actor, action, status, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![now_ms(), actor, action, status, detail],
        )?;
        Ok(conn.last_insert_rowid())
    }

    fn audit(&self, after: i64, limit: usize, latest: bool) -> Result<Vec<AuditEntry>> {
        let conn = self.conn();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = if latest {
            "SELECT * FROM (SELECT id, ts_ms, actor, action, status, detail FROM audit
              WHERE id > ?1 ORDER BY id DESC LIMIT ?2) ORDER BY id"
        } else {
            "SELECT id, ts_ms, actor, action, status, detail FROM audit
             WHERE id > ?1 ORDER BY id LIMIT ?2"
        };
        let mut statement = conn.prepare_cached(sql)?;
        let entries = statement
            .query_map(params![after, limit], |row| {
                Ok(AuditEntry {
                    id: row.get(0)?,
                    ts_ms: row.get(1)?,
                    actor: row.get(2)?,
                    action: row.get(3)?,
                    status: row.get(4)?,
                    detail: row.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(entries)
    }

    fn prune_audit(&self, before_ms: i64, keep_rows: u64) -> Result<usize> {
        // Ids only grow, so "beyond the newest N" is an id bound.
        let removed = self.conn().execute(
            "DELETE FROM audit WHERE ts_ms < ?1 OR id <= (SELECT MAX(id) FROM audit) - ?2",
            params![before_ms, i64::try_from(keep_rows).unwrap_or(i64::MAX)],
        )?;
        Ok(removed)
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, name, hash, scopes, functions, created_ms, revoked_ms
                 FROM tokens WHERE id = ?1",
                [id],
                token_row,
            )
            .optional()?)
    }
}

#[async_trait::async_trait]
impl AuthStore for EmbeddedAuth {
    async fn create_token(&self, token: &TokenRecord) -> Result<()> {
        let token = token.clone();
        offload(&self.db, move |db| db.create_token(&token)).await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        offload(&self.db, |db| db.tokens()).await
    }

    async fn revoke_token(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        offload(&self.db, move |db| db.revoke_token(&id)).await
    }

    async fn append_audit(
        &self,
        actor: &str,
        action: &str,
        status: u16,
        detail: Option<&str>,
    ) -> Result<i64> {
        let (actor, action) = (actor.to_owned(), action.to_owned());
        let detail = detail.map(str::to_owned);
        offload(&self.db, move |db| {
            db.append_audit(&actor, &action, status, detail.as_deref())
        })
        .await
    }

    async fn audit(&self, after: i64, limit: usize, latest: bool) -> Result<Vec<AuditEntry>> {
        offload(&self.db, move |db| db.audit(after, limit, latest)).await
    }

    async fn prune_audit(&self, before_ms: i64, keep_rows: u64) -> Result<usize> {
        offload(&self.db, move |db| db.prune_audit(before_ms, keep_rows)).await
    }

    fn watch(&self) -> ChangeFeed<TokenChange> {
        self.db.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    fn token(id: &str, hash: &str) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            name: "ci".into(),
            hash: hash.into(),
            scopes: vec!["deploy".into(), "read".into()],
            functions: vec!["a".into()],
            created_at_ms: 1,
            revoked_at_ms: None,
        }
    }

    #[tokio::test]
    async fn tokens_round_trip_and_revoke_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedAuth::open(&dir.path().join("auth.db")).unwrap();
        store.create_token(&token("tok_1", "h1")).await.unwrap();
        assert!(
            store.create_token(&token("tok_2", "h1")).await.is_err(),
            "hashes are unique"
        );
        let tokens = store.tokens().await.unwrap();
        assert_eq!(tokens, vec![token("tok_1", "h1")]);
        assert!(store.revoke_token("tok_1").await.unwrap());
        assert!(
            !store.revoke_token("tok_1").await.unwrap(),
            "already revoked"
        );
        assert!(
            store
                .token("tok_1")
                .await
                .unwrap()
                .unwrap()
                .revoked_at_ms
                .is_some()
        );
    }

    #[tokio::test]
    async fn audit_pages_forward_and_shows_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.db");
        let store = EmbeddedAuth::open(&path).unwrap();
        for status in [200, 403, 201] {
            store
                .append_audit("tok_1 (ci)", "POST /v1/x", status, None)
                .await
                .unwrap();
        }
        drop(store);
        let store = EmbeddedAuth::open(&path).unwrap();
        let all = store.audit(0, 10, false).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.status).collect::<Vec<_>>(),
            [200, 403, 201]
        );
        let latest = store.audit(0, 2, true).await.unwrap();
        assert_eq!(
            latest.iter().map(|e| e.status).collect::<Vec<_>>(),
            [403, 201]
        );
        assert_eq!(store.audit(all[1].id, 10, false).await.unwrap().len(), 1);
    }
}
