//! The embedded job store: `jobs.db`, its own file so a job's thousands of
//! item updates never queue behind the event store or the registry.
//!
//! Each job row keeps its items' counts per state, updated in the same
//! transaction as the items, so progress is one row read. A running item's
//! `due_ms` is its lease's end, so one index range (`state IN (pending,
//! running) AND due_ms <= now`) finds both due items and expired leases.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use super::{migrate, now_ms, offload, open_connection, to_u64, write_tx};
use crate::jobs::{
    ItemCounts, ItemLogEntry, ItemResult, ItemState, Job, JobItem, JobSpec, JobState, JobStore,
    NewItem,
};
use crate::{Result, StoreError};

/// Schema migrations of `jobs.db`, applied in order. Append only.
const JOB_MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE jobs (
        id          TEXT PRIMARY KEY,
        spec        TEXT NOT NULL,
        state       TEXT NOT NULL,
        error       TEXT,
        created_ms  INTEGER NOT NULL,
        finished_ms INTEGER,
        pending     INTEGER NOT NULL,
        running     INTEGER NOT NULL,
        done        INTEGER NOT NULL,
        failed      INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE job_items (
        job         TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        seq         INTEGER NOT NULL,
        key         TEXT NOT NULL,
        size        INTEGER NOT NULL,
        etag        TEXT NOT NULL,
        state       TEXT NOT NULL,
        attempts    INTEGER NOT NULL,
        last_error  TEXT,
        lease_owner TEXT,
        due_ms      INTEGER NOT NULL,
        PRIMARY KEY (job, seq)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX job_items_due ON job_items (job, state, due_ms);
    CREATE TABLE job_item_log (
        pos     INTEGER PRIMARY KEY,
        job     TEXT NOT NULL,
        at_ms   INTEGER NOT NULL,
        seq     INTEGER NOT NULL,
        key     TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        detail  TEXT NOT NULL
    ) STRICT;
    CREATE INDEX job_item_log_by_job ON job_item_log (job, pos);
"#,
    PIPELINE_TABLES,
];

/// The second migration of `jobs.db`. A run's `spec` is the definition it
/// started with.
const PIPELINE_TABLES: &str = r#"
    CREATE TABLE pipelines (
        name             TEXT PRIMARY KEY,
        spec             TEXT NOT NULL,
        created_ms       INTEGER NOT NULL,
        updated_ms       INTEGER NOT NULL,
        last_slot_ms     INTEGER,
        pending_since_ms INTEGER
    ) STRICT;
    CREATE TABLE pipeline_runs (
        pipeline    TEXT NOT NULL,
        run         INTEGER NOT NULL,
        spec        TEXT NOT NULL,
        cause       TEXT NOT NULL,
        full        INTEGER NOT NULL,
        state       TEXT NOT NULL,
        error       TEXT,
        created_ms  INTEGER NOT NULL,
        finished_ms INTEGER,
        PRIMARY KEY (pipeline, run)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX pipeline_runs_running ON pipeline_runs (state);
"#;

/// Jobs in `jobs.db`.
#[derive(Clone)]
pub struct EmbeddedJobs {
    pub(super) db: Arc<JobsDb>,
}

pub(super) struct JobsDb {
    conn: Mutex<Connection>,
}

impl JobsDb {
    pub(super) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl EmbeddedJobs {
    /// Opens or creates the job store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = open_connection(path)?;
        // Item updates come by the thousand per second. In WAL mode NORMAL
        // survives a killed process (the case that matters: a SIGKILL'd
        // node resumes); a power loss may forget the last updates, which
        // at worst runs those items again (outputs are idempotent by key).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&conn, JOB_MIGRATIONS)?;
        Ok(Self {
            db: Arc::new(JobsDb {
                conn: Mutex::new(conn),
            }),
        })
    }
}

/// Opens `<data_dir>/jobs.db`, which holds jobs and pipelines.
pub fn open_jobs(data_dir: &Path) -> Result<EmbeddedJobs> {
    EmbeddedJobs::open(&data_dir.join("jobs.db"))
        .map_err(|e| e.context("cannot open the job database"))
}

const JOB_COLUMNS: &str =
    "id, spec, state, error, created_ms, finished_ms, pending, running, done, failed";
const ITEM_COLUMNS: &str = "seq, key, size, etag, state, attempts, last_error, lease_owner, due_ms";

fn read_job(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Job, String, String)> {
    let spec: String = row.get(1)?;
    let state: String = row.get(2)?;
    Ok((
        Job {
            id: row.get(0)?,
            // Filled in by `decode_job`, which can fail with our error.
            spec: JobSpec {
                function: String::new(),
                input_bucket: String::new(),
                input_prefix: String::new(),
                output_bucket: None,
                output_prefix: None,
                parallelism: 0,
                max_failures: None,
                max_attempts: 0,
                backoff_ms: 0,
                reduce: false,
                pipeline: None,
            },
            state: JobState::Running,
            error: row.get(3)?,
            created_ms: row.get(4)?,
            finished_ms: row.get(5)?,
            items: ItemCounts {
                pending: to_u64(row.get(6)?),
                running: to_u64(row.get(7)?),
                done: to_u64(row.get(8)?),
                failed: to_u64(row.get(9)?),
            },
        },
        spec,
        state,
    ))
}

fn decode_job((mut job, spec, state): (Job, String, String)) -> Result<Job> {
    job.spec = serde_json::from_str(&spec)
        .map_err(|e| StoreError::Corrupt(format!("job {}: its spec: {e}", job.id)))?;
    job.state = JobState::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("job {}: unknown state `{state}`", job.id)))?;
    Ok(job)
}

fn read_item(row: &rusqlite::Row<'_>) -> rusqlite::Result<(JobItem, String)> {
    let state: String = row.get(4)?;
    let owner: Option<String> = row.get(7)?;
    let due: i64 = row.get(8)?;
    Ok((
        JobItem {
            seq: row.get(0)?,
            key: row.get(1)?,
            size: to_u64(row.get(2)?),
            etag: row.get(3)?,
            state: ItemState::Pending,
            attempts: u32::try_from(row.get::<_, i64>(5)?).unwrap_or(0),
            last_error: row.get(6)?,
            lease_until_ms: owner.is_some().then_some(due),
            lease_owner: owner,
        },
        state,
    ))
}

fn decode_item((mut item, state): (JobItem, String)) -> Result<JobItem> {
    item.state = ItemState::parse(&state).ok_or_else(|| {
        StoreError::Corrupt(format!("job item {}: unknown state `{state}`", item.seq))
    })?;
    Ok(item)
}

fn job_in(conn: &Connection, id: &str) -> Result<Option<Job>> {
    let raw = conn
        .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([id], read_job)
        .optional()?;
    raw.map(decode_job).transpose()
}

/// Adds signed deltas to a job's counts.
fn add_counts(conn: &Connection, job: &str, delta: [i64; 4]) -> Result<()> {
    if delta == [0; 4] {
        return Ok(());
    }
    conn.prepare_cached(
        "UPDATE jobs SET pending = pending + ?2, running = running + ?3, done = done + ?4, \
         failed = failed + ?5 WHERE id = ?1",
    )?
    .execute(params![job, delta[0], delta[1], delta[2], delta[3]])?;
    Ok(())
}

fn counts_of(conn: &Connection, job: &str) -> Result<ItemCounts> {
    let counts = conn
        .prepare_cached("SELECT pending, running, done, failed FROM jobs WHERE id = ?1")?
        .query_row([job], |row| {
            Ok(ItemCounts {
                pending: to_u64(row.get(0)?),
                running: to_u64(row.get(1)?),
                done: to_u64(row.get(2)?),
                failed: to_u64(row.get(3)?),
            })
        })
        .optional()?;
    counts.ok_or_else(|| StoreError::Conflict(format!("no job `{job}`")))
}

impl JobsDb {
    fn create_job(&self, id: &str, spec: &JobSpec, items: &[NewItem]) -> Result<Job> {
        let spec_json =
            serde_json::to_string(spec).map_err(|e| StoreError::Backend(Box::new(e)))?;
        let mut conn = self.conn();
        let tx = write_tx(&mut conn)?;
        let now = now_ms();
        let total = i64::try_from(items.len()).unwrap_or(i64::MAX);
        let inserted = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO jobs (id, spec, state, created_ms, pending, running, done, \
                 failed) VALUES (?1, ?2, 'running', ?3, ?4, 0, 0, 0)",
            )?
            .execute(params![id, spec_json, now, total])?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!("job `{id}` already exists")));
        }
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO job_items (job, seq, key, size, etag, state, attempts, due_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, 0)",
            )?;
            for (index, item) in items.iter().enumerate() {
                let size = i64::try_from(item.size).unwrap_or(i64::MAX);
                insert.execute(params![id, index as i64 + 1, item.key, size, item.etag])?;
            }
        }
        let job = job_in(&tx, id)?;
        tx.commit()?;
        job.ok_or_else(|| StoreError::Conflict(format!("job `{id}` vanished")))
    }

    fn jobs(&self, limit: usize) -> Result<Vec<Job>> {
        let conn = self.conn();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_ms DESC, id DESC LIMIT ?1"
            ))?
            .query_map([limit], read_job)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raw.into_iter().map(decode_job).collect()
    }

    fn claim_items(
        &self,
        job: &str,
        owner: &str,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<JobItem>> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn)?;
        let running: Option<String> = tx
            .prepare_cached("SELECT state FROM jobs WHERE id = ?1")?
            .query_row([job], |row| row.get(0))
            .optional()?;
        if running.as_deref() != Some(JobState::Running.as_str()) {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let until = now.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let candidates: Vec<(i64, String)> = tx
            .prepare_cached(
                "SELECT seq, state FROM job_items WHERE job = ?1 \
                 AND state IN ('pending', 'running') AND due_ms <= ?2 LIMIT ?3",
            )?
            .query_map(params![job, now, limit], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut claimed = Vec::with_capacity(candidates.len());
        let mut from_pending = 0i64;
        {
            let mut update = tx.prepare_cached(&format!(
                "UPDATE job_items SET state = 'running', attempts = attempts + 1, \
                 lease_owner = ?3, due_ms = ?4 WHERE job = ?1 AND seq = ?2 \
                 RETURNING {ITEM_COLUMNS}"
            ))?;
            for (seq, state) in candidates {
                if state == ItemState::Pending.as_str() {
                    from_pending += 1;
                }
                let raw = update.query_row(params![job, seq, owner, until], read_item)?;
                claimed.push(decode_item(raw)?);
            }
        }
        add_counts(&tx, job, [-from_pending, from_pending, 0, 0])?;
        tx.commit()?;
        Ok(claimed)
    }

    fn settle_items(&self, job: &str, owner: &str, results: &[ItemResult]) -> Result<ItemCounts> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn)?;
        let now = now_ms();
        // pending, running, done, failed
        let mut delta = [0i64; 4];
        {
            let mut log = tx.prepare_cached(
                "INSERT INTO job_item_log (job, at_ms, seq, key, attempt, outcome, detail) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut done = tx.prepare_cached(
                "UPDATE job_items SET state = 'done', lease_owner = NULL \
                 WHERE job = ?1 AND seq = ?2 AND state = 'running' AND lease_owner = ?3 \
                 RETURNING key, attempts",
            )?;
            let mut retry = tx.prepare_cached(
                "UPDATE job_items SET state = 'pending', lease_owner = NULL, due_ms = ?4, \
                 last_error = ?5 \
                 WHERE job = ?1 AND seq = ?2 AND state = 'running' AND lease_owner = ?3 \
                 RETURNING key, attempts",
            )?;
            let mut failed = tx.prepare_cached(
                "UPDATE job_items SET state = 'failed', lease_owner = NULL, last_error = ?4 \
                 WHERE job = ?1 AND seq = ?2 AND state = 'running' AND lease_owner = ?3 \
                 RETURNING key, attempts",
            )?;
            let mut postpone = tx.prepare_cached(
                "UPDATE job_items SET state = 'pending', lease_owner = NULL, due_ms = ?4, \
                 attempts = MAX(attempts - 1, 0) \
                 WHERE job = ?1 AND seq = ?2 AND state = 'running' AND lease_owner = ?3",
            )?;
            let key_attempt =
                |row: &rusqlite::Row<'_>| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?));
            for result in results {
                match result {
                    ItemResult::Done { seq, request_id } => {
                        let row = done
                            .query_row(params![job, seq, owner], key_attempt)
                            .optional()?;
                        if let Some((key, attempt)) = row {
                            delta[1] -= 1;
                            delta[2] += 1;
                            log.execute(params![job, now, seq, key, attempt, "done", request_id])?;
                        }
                    }
                    ItemResult::Retry {
                        seq,
                        delay_ms,
                        error,
                    } => {
                        let due = now.saturating_add(i64::try_from(*delay_ms).unwrap_or(0));
                        let row = retry
                            .query_row(params![job, seq, owner, due, error], key_attempt)
                            .optional()?;
                        if let Some((key, attempt)) = row {
                            delta[1] -= 1;
                            delta[0] += 1;
                            log.execute(params![job, now, seq, key, attempt, "retry", error])?;
                        }
                    }
                    ItemResult::Failed { seq, error } => {
                        let row = failed
                            .query_row(params![job, seq, owner, error], key_attempt)
                            .optional()?;
                        if let Some((key, attempt)) = row {
                            delta[1] -= 1;
                            delta[3] += 1;
                            log.execute(params![job, now, seq, key, attempt, "failed", error])?;
                        }
                    }
                    ItemResult::Postpone { seq, delay_ms } => {
                        let due = now.saturating_add(i64::try_from(*delay_ms).unwrap_or(0));
                        if postpone.execute(params![job, seq, owner, due])? == 1 {
                            delta[1] -= 1;
                            delta[0] += 1;
                        }
                    }
                }
            }
        }
        add_counts(&tx, job, delta)?;
        let counts = counts_of(&tx, job)?;
        tx.commit()?;
        Ok(counts)
    }

    fn next_due(&self, job: &str) -> Result<Option<i64>> {
        let conn = self.conn();
        Ok(conn
            .prepare_cached(
                "SELECT MIN(due_ms) FROM job_items WHERE job = ?1 AND state = 'pending'",
            )?
            .query_row([job], |row| row.get(0))?)
    }

    fn set_state(&self, job: &str, state: JobState, error: Option<&str>) -> Result<()> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn)?;
        let finished = (state != JobState::Running).then(now_ms);
        let changed = tx
            .prepare_cached(
                "UPDATE jobs SET state = ?2, error = ?3, finished_ms = ?4 WHERE id = ?1",
            )?
            .execute(params![job, state.as_str(), error, finished])?;
        if changed == 0 {
            return Err(StoreError::Conflict(format!("no job `{job}`")));
        }
        tx.commit()?;
        Ok(())
    }

    fn retry_failed(&self, job: &str) -> Result<u64> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn)?;
        if job_in(&tx, job)?.is_none() {
            return Err(StoreError::Conflict(format!("no job `{job}`")));
        }
        let now = now_ms();
        tx.prepare_cached(
            "INSERT INTO job_item_log (job, at_ms, seq, key, attempt, outcome, detail) \
             SELECT job, ?2, seq, key, attempts, 'reset', 'retry-failed' FROM job_items \
             WHERE job = ?1 AND state = 'failed'",
        )?
        .execute(params![job, now])?;
        let reset = tx
            .prepare_cached(
                "UPDATE job_items SET state = 'pending', attempts = 0, due_ms = 0 \
                 WHERE job = ?1 AND state = 'failed'",
            )?
            .execute([job])?;
        let reset = reset as i64;
        add_counts(&tx, job, [reset, 0, 0, -reset])?;
        tx.prepare_cached(
            "UPDATE jobs SET state = 'running', error = NULL, finished_ms = NULL WHERE id = ?1",
        )?
        .execute([job])?;
        tx.commit()?;
        Ok(to_u64(reset))
    }

    fn release_leases(&self, owner: Option<&str>) -> Result<u64> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn)?;
        // The attempt a lost lease counted was never finished: give it back.
        let released: Vec<(String, i64)> = tx
            .prepare_cached(
                "UPDATE job_items SET state = 'pending', lease_owner = NULL, due_ms = 0, \
                 attempts = MAX(attempts - 1, 0) \
                 WHERE state = 'running' AND (?1 IS NULL OR lease_owner = ?1) \
                 RETURNING job, seq",
            )?
            .query_map(params![owner], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut per_job: std::collections::BTreeMap<String, i64> = Default::default();
        for (job, _) in &released {
            *per_job.entry(job.clone()).or_default() += 1;
        }
        for (job, n) in per_job {
            add_counts(&tx, &job, [n, -n, 0, 0])?;
        }
        tx.commit()?;
        Ok(released.len() as u64)
    }

    fn items(
        &self,
        job: &str,
        state: Option<ItemState>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<JobItem>> {
        let conn = self.conn();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {ITEM_COLUMNS} FROM job_items WHERE job = ?1 AND seq > ?2 \
                 AND (?3 IS NULL OR state = ?3) ORDER BY seq LIMIT ?4"
            ))?
            .query_map(
                params![job, after_seq, state.map(ItemState::as_str), limit],
                read_item,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raw.into_iter().map(decode_item).collect()
    }

    fn item_log(&self, job: &str, after: i64, limit: usize) -> Result<Vec<(i64, ItemLogEntry)>> {
        let conn = self.conn();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(conn
            .prepare_cached(
                "SELECT pos, at_ms, seq, key, attempt, outcome, detail FROM job_item_log \
                 WHERE job = ?1 AND pos > ?2 ORDER BY pos LIMIT ?3",
            )?
            .query_map(params![job, after, limit], |row| {
                Ok((
                    row.get(0)?,
                    ItemLogEntry {
                        at_ms: row.get(1)?,
                        seq: row.get(2)?,
                        key: row.get(3)?,
                        attempt: u32::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
                        outcome: row.get(5)?,
                        detail: row.get(6)?,
                    },
                ))
            })?
            .collect::<rusqlite::Result<_>>()?)
    }
}

#[async_trait::async_trait]
impl JobStore for EmbeddedJobs {
    async fn create_job(&self, id: &str, spec: &JobSpec, items: &[NewItem]) -> Result<Job> {
        let (id, spec, items) = (id.to_owned(), spec.clone(), items.to_vec());
        offload(&self.db, move |db| db.create_job(&id, &spec, &items)).await
    }

    async fn job(&self, id: &str) -> Result<Option<Job>> {
        let id = id.to_owned();
        offload(&self.db, move |db| job_in(&db.conn(), &id)).await
    }

    async fn jobs(&self, limit: usize) -> Result<Vec<Job>> {
        offload(&self.db, move |db| db.jobs(limit)).await
    }

    async fn claim_items(
        &self,
        job: &str,
        owner: &str,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<JobItem>> {
        let (job, owner) = (job.to_owned(), owner.to_owned());
        offload(&self.db, move |db| {
            db.claim_items(&job, &owner, limit, lease_ms)
        })
        .await
    }

    async fn settle_items(
        &self,
        job: &str,
        owner: &str,
        results: &[ItemResult],
    ) -> Result<ItemCounts> {
        let (job, owner, results) = (job.to_owned(), owner.to_owned(), results.to_vec());
        offload(&self.db, move |db| db.settle_items(&job, &owner, &results)).await
    }

    async fn next_due(&self, job: &str) -> Result<Option<i64>> {
        let job = job.to_owned();
        offload(&self.db, move |db| db.next_due(&job)).await
    }

    async fn set_state(&self, job: &str, state: JobState, error: Option<&str>) -> Result<()> {
        let (job, error) = (job.to_owned(), error.map(str::to_owned));
        offload(&self.db, move |db| {
            db.set_state(&job, state, error.as_deref())
        })
        .await
    }

    async fn retry_failed(&self, job: &str) -> Result<u64> {
        let job = job.to_owned();
        offload(&self.db, move |db| db.retry_failed(&job)).await
    }

    async fn release_leases(&self, owner: Option<&str>) -> Result<u64> {
        let owner = owner.map(str::to_owned);
        offload(&self.db, move |db| db.release_leases(owner.as_deref())).await
    }

    async fn items(
        &self,
        job: &str,
        state: Option<ItemState>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<JobItem>> {
        let job = job.to_owned();
        offload(&self.db, move |db| db.items(&job, state, after_seq, limit)).await
    }

    async fn item_log(
        &self,
        job: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, ItemLogEntry)>> {
        let job = job.to_owned();
        offload(&self.db, move |db| db.item_log(&job, after, limit)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::MaxFailures;

    fn spec() -> JobSpec {
        JobSpec {
            function: "f".into(),
            input_bucket: "in".into(),
            input_prefix: "p/".into(),
            output_bucket: None,
            output_prefix: None,
            parallelism: 4,
            max_failures: Some(MaxFailures::Count(1)),
            max_attempts: 2,
            backoff_ms: 0,
            reduce: false,
            pipeline: None,
        }
    }

    fn items(n: usize) -> Vec<NewItem> {
        (0..n)
            .map(|i| NewItem {
                key: format!("p/{i:04}"),
                size: 1,
                etag: "\"x\"".into(),
            })
            .collect()
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn items_are_leased_once_settled_by_their_owner_and_released_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        block_on(async {
            let store: Arc<dyn JobStore> = Arc::new(open_jobs(dir.path()).unwrap());
            let job = store.create_job("j1", &spec(), &items(10)).await.unwrap();
            assert_eq!(job.items.pending, 10);
            let a = store.claim_items("j1", "a", 6, 60_000).await.unwrap();
            let b = store.claim_items("j1", "b", 6, 60_000).await.unwrap();
            assert_eq!((a.len(), b.len()), (6, 4));
            assert!(a.iter().all(|i| b.iter().all(|j| i.seq != j.seq)));
            assert!(
                store
                    .claim_items("j1", "c", 6, 60_000)
                    .await
                    .unwrap()
                    .is_empty()
            );
            // b's result for a's item is ignored.
            let stolen = ItemResult::Done {
                seq: a[0].seq,
                request_id: "r".into(),
            };
            let counts = store.settle_items("j1", "b", &[stolen]).await.unwrap();
            assert_eq!(counts.done, 0);
            let results: Vec<_> = a
                .iter()
                .map(|i| ItemResult::Done {
                    seq: i.seq,
                    request_id: format!("r{}", i.seq),
                })
                .collect();
            let counts = store.settle_items("j1", "a", &results).await.unwrap();
            assert_eq!((counts.done, counts.running), (6, 4));
            // b dies: its leases go back, its attempts are not spent.
            assert_eq!(store.release_leases(None).await.unwrap(), 4);
            let job = store.job("j1").await.unwrap().unwrap();
            assert_eq!((job.items.pending, job.items.running), (4, 0));
            let again = store.claim_items("j1", "c", 10, 60_000).await.unwrap();
            assert_eq!(again.len(), 4);
            assert!(again.iter().all(|i| i.attempts == 1));
            let results: Vec<_> = again
                .iter()
                .map(|i| ItemResult::Failed {
                    seq: i.seq,
                    error: "bad".into(),
                })
                .collect();
            let counts = store.settle_items("j1", "c", &results).await.unwrap();
            assert_eq!((counts.done, counts.failed), (6, 4));
            let failed = store
                .items("j1", Some(ItemState::Failed), 0, 100)
                .await
                .unwrap();
            assert_eq!(failed.len(), 4);
            assert_eq!(failed[0].last_error.as_deref(), Some("bad"));
            store
                .set_state("j1", JobState::Failed, Some("too many"))
                .await
                .unwrap();
            assert!(
                store
                    .claim_items("j1", "c", 10, 0)
                    .await
                    .unwrap()
                    .is_empty()
            );
            assert_eq!(store.retry_failed("j1").await.unwrap(), 4);
            let job = store.job("j1").await.unwrap().unwrap();
            assert_eq!(job.state, JobState::Running);
            assert_eq!((job.items.pending, job.items.failed), (4, 0));
            let log = store.item_log("j1", 0, 100).await.unwrap();
            assert_eq!(log.iter().filter(|(_, e)| e.outcome == "done").count(), 6);
        });
    }

    #[test]
    fn an_expired_lease_is_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        block_on(async {
            let store: Arc<dyn JobStore> = Arc::new(open_jobs(dir.path()).unwrap());
            store.create_job("j", &spec(), &items(2)).await.unwrap();
            let first = store.claim_items("j", "a", 2, 0).await.unwrap();
            let second = store.claim_items("j", "b", 2, 60_000).await.unwrap();
            assert_eq!((first.len(), second.len()), (2, 2));
            assert!(second.iter().all(|i| i.attempts == 2));
            let job = store.job("j").await.unwrap().unwrap();
            assert_eq!((job.items.pending, job.items.running), (0, 2));
        });
    }
}
