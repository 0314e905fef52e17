//! What S3 needs beyond Mayfly's object store, in `s3.db` of the data
//! directory: buckets created empty (`CreateBucket`; Mayfly's buckets
//! otherwise exist while they hold objects) and, per object written through
//! S3, its S3 ETag (MD5 or the multipart form), user metadata and
//! checksums. Those are tied to the object's SHA-256: an object rewritten
//! through the REST API or by a function no longer matches, and S3 then
//! shows its SHA-256 as the ETag and no metadata.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rusqlite::{Connection, OptionalExtension as _, params};

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS buckets (
        name       TEXT PRIMARY KEY,
        created_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS objects (
        bucket    TEXT NOT NULL,
        key       TEXT NOT NULL,
        sha256    TEXT NOT NULL,
        etag      TEXT NOT NULL,
        metadata  TEXT NOT NULL,
        checksums TEXT NOT NULL,
        PRIMARY KEY (bucket, key)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS uploads (
        id           TEXT PRIMARY KEY,
        bucket       TEXT NOT NULL,
        key          TEXT NOT NULL,
        content_type TEXT NOT NULL,
        metadata     TEXT NOT NULL,
        created_ms   INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS parts (
        upload_id   TEXT NOT NULL,
        part        INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        etag        TEXT NOT NULL,
        checksums   TEXT NOT NULL,
        modified_ms INTEGER NOT NULL,
        PRIMARY KEY (upload_id, part)
    ) WITHOUT ROWID;
";

/// A multipart upload in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upload {
    pub(crate) bucket: String,
    pub(crate) key: String,
    pub(crate) content_type: String,
    pub(crate) metadata: BTreeMap<String, String>,
}

/// One uploaded part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartRow {
    pub(crate) part: i32,
    pub(crate) size: u64,
    /// Quoted MD5 of the part.
    pub(crate) etag: String,
    pub(crate) checksums: BTreeMap<String, String>,
    pub(crate) modified_ms: i64,
}

/// S3's extra facts about one object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ObjectExtra {
    /// The S3 ETag, quoted.
    pub(crate) etag: String,
    /// User metadata (`x-amz-meta-*`).
    pub(crate) metadata: BTreeMap<String, String>,
    /// Checksums sent with the upload, by algorithm (`crc32`, …), base64.
    pub(crate) checksums: BTreeMap<String, String>,
}

/// The S3 side tables; cheap to clone.
#[derive(Clone)]
pub(crate) struct S3Meta {
    conn: Arc<Mutex<Connection>>,
}

impl S3Meta {
    /// Opens (or creates) `s3.db` in `data_dir`.
    pub(crate) fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("s3.db");
        let conn = Connection::open(&path)
            .with_context(|| format!("cannot open the S3 tables in {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("cannot create the S3 tables in {}", path.display()))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&conn)
        })
        .await
        .context("the S3 table task failed")?
        .context("S3 table error")
    }

    /// Records `bucket` as created; false if it already was.
    pub(crate) async fn create_bucket(&self, bucket: &str, now_ms: i64) -> anyhow::Result<bool> {
        let bucket = bucket.to_string();
        self.with(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO buckets (name, created_ms) VALUES (?1, ?2)",
                params![bucket, now_ms],
            )
            .map(|n| n == 1)
        })
        .await
    }

    /// Forgets `bucket`; returns whether it was recorded.
    pub(crate) async fn delete_bucket(&self, bucket: &str) -> anyhow::Result<bool> {
        let bucket = bucket.to_string();
        self.with(move |conn| {
            conn.execute("DELETE FROM objects WHERE bucket = ?1", [&bucket])?;
            conn.execute("DELETE FROM buckets WHERE name = ?1", [&bucket])
                .map(|n| n == 1)
        })
        .await
    }

    /// When `bucket` was created through S3, if it was.
    pub(crate) async fn bucket_created(&self, bucket: &str) -> anyhow::Result<Option<i64>> {
        let bucket = bucket.to_string();
        self.with(move |conn| {
            conn.query_row(
                "SELECT created_ms FROM buckets WHERE name = ?1",
                [&bucket],
                |row| row.get(0),
            )
            .optional()
        })
        .await
    }

    /// Every bucket created through S3, with its creation time.
    pub(crate) async fn buckets(&self) -> anyhow::Result<Vec<(String, i64)>> {
        self.with(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT name, created_ms FROM buckets ORDER BY name")?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// Records the S3 facts of `bucket/key`, whose bytes hash to `sha256`.
    pub(crate) async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        sha256: &str,
        extra: &ObjectExtra,
    ) -> anyhow::Result<()> {
        let (bucket, key, sha256) = (bucket.to_string(), key.to_string(), sha256.to_string());
        let etag = extra.etag.clone();
        let metadata = serde_json::to_string(&extra.metadata)?;
        let checksums = serde_json::to_string(&extra.checksums)?;
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO objects (bucket, key, sha256, etag, metadata, checksums) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (bucket, key) DO UPDATE SET \
                 sha256 = excluded.sha256, etag = excluded.etag, \
                 metadata = excluded.metadata, checksums = excluded.checksums",
                params![bucket, key, sha256, etag, metadata, checksums],
            )
            .map(drop)
        })
        .await
    }

    /// The S3 facts of `bucket/key` if they are those of the bytes hashing
    /// to `sha256` (the object was not rewritten another way since).
    pub(crate) async fn object(
        &self,
        bucket: &str,
        key: &str,
        sha256: &str,
    ) -> anyhow::Result<Option<ObjectExtra>> {
        let (bucket, key, sha256) = (bucket.to_string(), key.to_string(), sha256.to_string());
        let row: Option<(String, String, String)> = self
            .with(move |conn| {
                conn.query_row(
                    "SELECT etag, metadata, checksums FROM objects \
                     WHERE bucket = ?1 AND key = ?2 AND sha256 = ?3",
                    params![bucket, key, sha256],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()
            })
            .await?;
        row.map(|(etag, metadata, checksums)| {
            Ok(ObjectExtra {
                etag,
                metadata: serde_json::from_str(&metadata)?,
                checksums: serde_json::from_str(&checksums)?,
            })
        })
        .transpose()
    }

    /// The S3 ETags of the objects of `bucket` among `keys` whose SHA-256 is
    /// still the recorded one, by key (for listings).
    pub(crate) async fn etags(
        &self,
        bucket: &str,
        keys: Vec<(String, String)>,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let bucket = bucket.to_string();
        self.with(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT etag FROM objects WHERE bucket = ?1 AND key = ?2 AND sha256 = ?3",
            )?;
            let mut found = BTreeMap::new();
            for (key, sha256) in keys {
                if let Some(etag) = statement
                    .query_row(params![bucket, key, sha256], |row| row.get::<_, String>(0))
                    .optional()?
                {
                    found.insert(key, etag);
                }
            }
            Ok(found)
        })
        .await
    }

    /// Forgets the S3 facts of `bucket/key`.
    pub(crate) async fn delete_object(&self, bucket: &str, key: &str) -> anyhow::Result<()> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.with(move |conn| {
            conn.execute(
                "DELETE FROM objects WHERE bucket = ?1 AND key = ?2",
                params![bucket, key],
            )
            .map(drop)
        })
        .await
    }

    /// Records a new multipart upload.
    pub(crate) async fn create_upload(
        &self,
        id: &str,
        upload: &Upload,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        let (id, bucket, key) = (id.to_string(), upload.bucket.clone(), upload.key.clone());
        let content_type = upload.content_type.clone();
        let metadata = serde_json::to_string(&upload.metadata)?;
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO uploads (id, bucket, key, content_type, metadata, created_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, bucket, key, content_type, metadata, now_ms],
            )
            .map(drop)
        })
        .await
    }

    /// The multipart upload `id`, if it is in progress.
    pub(crate) async fn upload(&self, id: &str) -> anyhow::Result<Option<Upload>> {
        let id = id.to_string();
        let row: Option<(String, String, String, String)> = self
            .with(move |conn| {
                conn.query_row(
                    "SELECT bucket, key, content_type, metadata FROM uploads WHERE id = ?1",
                    [&id],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
                )
                .optional()
            })
            .await?;
        row.map(|(bucket, key, content_type, metadata)| {
            Ok(Upload {
                bucket,
                key,
                content_type,
                metadata: serde_json::from_str(&metadata)?,
            })
        })
        .transpose()
    }

    /// Records part `part` of upload `id` (replacing an earlier upload of
    /// the same part).
    pub(crate) async fn put_part(&self, id: &str, row: &PartRow) -> anyhow::Result<()> {
        let id = id.to_string();
        let row = row.clone();
        let checksums = serde_json::to_string(&row.checksums)?;
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO parts (upload_id, part, size, etag, checksums, modified_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (upload_id, part) DO UPDATE SET \
                 size = excluded.size, etag = excluded.etag, checksums = excluded.checksums, \
                 modified_ms = excluded.modified_ms",
                params![
                    id,
                    row.part,
                    i64::try_from(row.size).unwrap_or(i64::MAX),
                    row.etag,
                    checksums,
                    row.modified_ms
                ],
            )
            .map(drop)
        })
        .await
    }

    /// The parts of upload `id`, by number.
    pub(crate) async fn parts(&self, id: &str) -> anyhow::Result<Vec<PartRow>> {
        let id = id.to_string();
        let rows: Vec<(i32, i64, String, String, i64)> = self
            .with(move |conn| {
                let mut statement = conn.prepare_cached(
                    "SELECT part, size, etag, checksums, modified_ms FROM parts \
                     WHERE upload_id = ?1 ORDER BY part",
                )?;
                let rows = statement.query_map([&id], |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                    ))
                })?;
                rows.collect()
            })
            .await?;
        rows.into_iter()
            .map(|(part, size, etag, checksums, modified_ms)| {
                Ok(PartRow {
                    part,
                    size: u64::try_from(size).unwrap_or(0),
                    etag,
                    checksums: serde_json::from_str(&checksums)?,
                    modified_ms,
                })
            })
            .collect()
    }

    /// The ids of uploads created before `before_ms` (ms since the Unix
    /// epoch), oldest first, at most `limit`.
    pub(crate) async fn uploads_before(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<String>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |conn| {
            let mut statement = conn.prepare(
                "SELECT id FROM uploads WHERE created_ms < ?1 ORDER BY created_ms LIMIT ?2",
            )?;
            statement
                .query_map(params![before_ms, limit], |row| row.get(0))?
                .collect()
        })
        .await
    }

    /// Forgets upload `id` and its parts; returns whether it existed.
    pub(crate) async fn delete_upload(&self, id: &str) -> anyhow::Result<bool> {
        let id = id.to_string();
        self.with(move |conn| {
            conn.execute("DELETE FROM parts WHERE upload_id = ?1", [&id])?;
            conn.execute("DELETE FROM uploads WHERE id = ?1", [&id])
                .map(|n| n == 1)
        })
        .await
    }
}
