//! The embedded usage ledger. It is its own SQLite database so that
//! billing writes never queue behind log writes in `mayfly.db`.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, TransactionBehavior, params};

use super::{migrate, offload, open_connection};
use crate::usage::{BYTE_US_PER_GB_S, MB_MS_PER_GB_S};
use crate::{
    GroupBy, Outcome, OutcomeCounts, Result, StoreError, StoredUsage, UsageQuery, UsageRecord,
    UsageRow, UsageStore,
};

/// Ledger schema migrations, applied in order; `PRAGMA user_version` of
/// `ledger.db` counts them. Append only: never edit a migration that has
/// shipped.
const LEDGER_MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE usage (
        seq               INTEGER PRIMARY KEY,
        request_id        TEXT NOT NULL UNIQUE,
        function          TEXT NOT NULL,
        version           INTEGER NOT NULL,
        trigger           TEXT NOT NULL,
        start_ms          INTEGER NOT NULL,
        wall_us           INTEGER NOT NULL,
        cpu_us            INTEGER NOT NULL,
        peak_memory_bytes INTEGER NOT NULL,
        memory_limit_mb   INTEGER NOT NULL,
        billed_ms         INTEGER NOT NULL,
        outcome           TEXT NOT NULL,
        cold              INTEGER NOT NULL,
        status            INTEGER
    ) STRICT;
    -- Summaries scan a time window; listings page one function by seq.
    CREATE INDEX usage_by_start ON usage (start_ms);
    CREATE INDEX usage_by_function ON usage (function, seq);
"#,
    // 2: the client's correlation id gets its own column, and the ledger's
    // identity is (request id, function): request ids are minted by the
    // node now, and an old client-chosen id still in the data can no longer
    // swallow another function's record. The request id leads the key so
    // time-ordered ids (UUIDv7) still append at the end of the index, as
    // before, rather than into one spot per function. SQLite cannot drop a
    // column's UNIQUE constraint in place, so the table is rebuilt (seq
    // kept).
    r#"
    CREATE TABLE usage_v2 (
        seq               INTEGER PRIMARY KEY,
        request_id        TEXT NOT NULL,
        client_request_id TEXT,
        function          TEXT NOT NULL,
        version           INTEGER NOT NULL,
        trigger           TEXT NOT NULL,
        start_ms          INTEGER NOT NULL,
        wall_us           INTEGER NOT NULL,
        cpu_us            INTEGER NOT NULL,
        peak_memory_bytes INTEGER NOT NULL,
        memory_limit_mb   INTEGER NOT NULL,
        billed_ms         INTEGER NOT NULL,
        outcome           TEXT NOT NULL,
        cold              INTEGER NOT NULL,
        status            INTEGER,
        UNIQUE (request_id, function)
    ) STRICT;
    INSERT INTO usage_v2 (seq, request_id, client_request_id, function, version, trigger,
        start_ms, wall_us, cpu_us, peak_memory_bytes, memory_limit_mb, billed_ms, outcome,
        cold, status)
    SELECT seq, request_id, NULL, function, version, trigger, start_ms, wall_us, cpu_us,
        peak_memory_bytes, memory_limit_mb, billed_ms, outcome, cold, status
    FROM usage;
    DROP TABLE usage;
    ALTER TABLE usage_v2 RENAME TO usage;
    CREATE INDEX usage_by_start ON usage (start_ms);
    CREATE INDEX usage_by_function ON usage (function, seq);
"#,
    // Cold starts' initialisation time, apart from the handler's.
    r#"
    ALTER TABLE usage ADD COLUMN init_us INTEGER NOT NULL DEFAULT 0;
"#,
];

/// The embedded ledger: its own SQLite database file (e.g.
/// `<data dir>/ledger.db`), separate from the metadata and log database so
/// billing writes never queue behind log writes. Each call runs on the
/// blocking pool (`sqlite::offload`).
pub struct EmbeddedLedger {
    db: Arc<LedgerDb>,
}

/// The ledger's connection, with the synchronous code of every call.
struct LedgerDb {
    conn: Mutex<Connection>,
}

impl EmbeddedLedger {
    /// Opens or creates the ledger at `path` and brings its schema up to
    /// date.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = open_connection(path)?;
        migrate(&conn, LEDGER_MIGRATIONS)?;
        Ok(Self {
            db: Arc::new(LedgerDb {
                conn: Mutex::new(conn),
            }),
        })
    }
}

impl EmbeddedLedger {
    /// The highest `seq` in the ledger, 0 when it is empty. A fleet node's
    /// publisher checks its stored cursor against it: a cursor past the end
    /// means the ledger file was replaced, and its records must be sent
    /// from the start again.
    pub async fn last_seq(&self) -> Result<i64> {
        offload(&self.db, |db| {
            let conn = db.conn();
            let last: Option<i64> = conn
                .prepare_cached("SELECT MAX(seq) FROM usage")?
                .query_row([], |row| row.get(0))?;
            Ok(last.unwrap_or(0))
        })
        .await
    }
}

impl LedgerDb {
    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done append: it
        // runs in a transaction that rolls back on drop.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// SQLite integers are i64; the rare u64 above `i64::MAX` is stored as
/// `i64::MAX` rather than failing the whole batch.
fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Reads back an integer column, clamping values outside `T` (possible only
/// if the file was edited) instead of failing or panicking.
fn saturate<T: TryFrom<i64> + Default>(value: i64, max: T) -> T {
    T::try_from(value).unwrap_or(if value < 0 { T::default() } else { max })
}

/// `TOTAL()` sums are floating point so they cannot overflow; they are exact
/// below 2^53 (285 years of wall time in microseconds, per group). The cast
/// saturates, and a NaN (impossible from integer sums) would read as 0.
fn total_to_u64(total: f64) -> u64 {
    total as u64
}

const RECORD_COLUMNS: &str = "seq, request_id, function, version, trigger, start_ms, wall_us, \
     cpu_us, peak_memory_bytes, memory_limit_mb, billed_ms, outcome, cold, status, \
     client_request_id, init_us";

fn read_records(mut rows: rusqlite::Rows<'_>) -> Result<Vec<StoredUsage>> {
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        let outcome: String = row.get(11)?;
        let outcome = Outcome::parse(&outcome).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "usage record {seq} has unknown outcome `{outcome}`"
            ))
        })?;
        records.push(StoredUsage {
            seq,
            record: UsageRecord {
                request_id: row.get(1)?,
                function: row.get(2)?,
                version: saturate(row.get(3)?, u64::MAX),
                trigger: row.get(4)?,
                start_ms: row.get(5)?,
                wall_us: saturate(row.get(6)?, u64::MAX),
                cpu_us: saturate(row.get(7)?, u64::MAX),
                peak_memory_bytes: saturate(row.get(8)?, u64::MAX),
                memory_limit_mb: saturate(row.get(9)?, u32::MAX),
                billed_ms: saturate(row.get(10)?, u64::MAX),
                outcome,
                cold: row.get(12)?,
                status: row
                    .get::<_, Option<i64>>(13)?
                    .map(|s| saturate(s, u16::MAX)),
                client_request_id: row.get(14)?,
                init_us: saturate(row.get(15)?, u64::MAX),
            },
        });
    }
    Ok(records)
}

/// Start of the period of length `ms` holding `start_ms`, rounded towards
/// minus infinity so times before 1970 land in the right period too.
fn period_sql(ms: i64) -> String {
    format!("start_ms - ((start_ms % {ms}) + {ms}) % {ms}")
}

/// The summary query for `group_by`, optionally filtered by function (as
/// `?3`). Columns: function, version, period, invocations, cold starts,
/// billed ms, billed GB-s, used GB-s, cpu µs, wall µs, init µs, init GB-s,
/// then one count per outcome in [`Outcome::ALL`] order.
fn summary_sql(group_by: GroupBy) -> String {
    let (keys, group) = match group_by {
        GroupBy::Function => ("function, NULL, NULL".to_string(), "function"),
        GroupBy::Version => ("function, version, NULL".to_string(), "function, version"),
        GroupBy::Hour => (
            format!("NULL, NULL, {} AS period", period_sql(3_600_000)),
            "period",
        ),
        GroupBy::Day => (
            format!("NULL, NULL, {} AS period", period_sql(86_400_000)),
            "period",
        ),
    };
    let outcomes: String = Outcome::ALL
        .iter()
        .map(|o| format!(", SUM(outcome = '{}')", o.as_str()))
        .collect();
    // A NULL parameter is no filter.
    let filter = " AND (?3 IS NULL OR function = ?3) \
                  AND (?4 IS NULL OR client_request_id = ?4)";
    format!(
        "SELECT {keys}, COUNT(*), SUM(cold), TOTAL(billed_ms), \
             TOTAL(CAST(memory_limit_mb AS REAL) * billed_ms) / {MB_MS_PER_GB_S:.1}, \
             TOTAL(CAST(peak_memory_bytes AS REAL) * wall_us) / {BYTE_US_PER_GB_S:.1}, \
             TOTAL(cpu_us), TOTAL(wall_us), TOTAL(init_us), \
             TOTAL(CAST(memory_limit_mb AS REAL) * init_us / 1000.0) / {MB_MS_PER_GB_S:.1}{outcomes} \
         FROM usage WHERE start_ms >= ?1 AND start_ms < ?2{filter} \
         GROUP BY {group} ORDER BY {group}"
    )
}

fn summary_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UsageRow> {
    let mut outcomes = OutcomeCounts::default();
    for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
        *outcomes.slot(outcome) = saturate(row.get(12 + i)?, u64::MAX);
    }
    let invocations: u64 = saturate(row.get(3)?, u64::MAX);
    Ok(UsageRow {
        function: row.get(0)?,
        version: row.get::<_, Option<i64>>(1)?.map(|v| saturate(v, u64::MAX)),
        period_start_ms: row.get(2)?,
        invocations,
        errors: invocations
            .saturating_sub(outcomes.ok)
            .saturating_sub(outcomes.client_closed),
        outcomes,
        cold_starts: saturate(row.get(4)?, u64::MAX),
        billed_ms: total_to_u64(row.get(5)?),
        billed_gb_s: row.get(6)?,
        used_gb_s: row.get(7)?,
        cpu_us: total_to_u64(row.get(8)?),
        wall_us: total_to_u64(row.get(9)?),
        init_us: total_to_u64(row.get(10)?),
        init_gb_s: row.get(11)?,
    })
}

/// The ledger, synchronously.
impl LedgerDb {
    fn append_usage(&self, records: &[UsageRecord]) -> Result<usize> {
        if records.is_empty() {
            // Nothing to commit: skip the transaction and its fsync.
            return Ok(0);
        }
        let mut conn = self.conn();
        // IMMEDIATE takes the write lock up front, so a concurrent writer
        // (another process) waits on busy_timeout instead of failing the
        // upgrade from a read transaction.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut inserted = 0;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO usage (request_id, function, version, trigger, start_ms, wall_us, \
                     cpu_us, peak_memory_bytes, memory_limit_mb, billed_ms, outcome, cold, status, \
                     client_request_id, init_us) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
                 ON CONFLICT (request_id, function) DO NOTHING",
            )?;
            for r in records {
                inserted += stmt.execute(params![
                    r.request_id,
                    r.function,
                    to_sql(r.version),
                    r.trigger,
                    r.start_ms,
                    to_sql(r.wall_us),
                    to_sql(r.cpu_us),
                    to_sql(r.peak_memory_bytes),
                    r.memory_limit_mb,
                    to_sql(r.billed_ms),
                    r.outcome.as_str(),
                    r.cold,
                    r.status,
                    r.client_request_id,
                    to_sql(r.init_us),
                ])?;
            }
        }
        tx.commit()?;
        Ok(inserted)
    }

    fn usage_summary(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        let conn = self.conn();
        let sql = summary_sql(query.group_by);
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows: Vec<UsageRow> = stmt
            .query_map(
                params![
                    query.from_ms,
                    query.to_ms,
                    query.function,
                    query.client_request_id
                ],
                summary_row,
            )?
            .collect::<rusqlite::Result<_>>()?;
        // Every record counts towards exactly one outcome unless its stored
        // outcome is not one this binary knows.
        for row in &rows {
            let counted: u64 = Outcome::ALL.iter().map(|&o| row.outcomes.get(o)).sum();
            if counted != row.invocations {
                return Err(StoreError::Corrupt(format!(
                    "{} usage record(s) in the window have an unknown outcome",
                    row.invocations.saturating_sub(counted)
                )));
            }
        }
        Ok(rows)
    }

    fn usage_records(
        &self,
        function: Option<&str>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredUsage>> {
        let conn = self.conn();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match function {
            Some(function) => {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {RECORD_COLUMNS} FROM usage WHERE function = ?1 AND seq > ?2 \
                     ORDER BY seq LIMIT ?3"
                ))?;
                read_records(stmt.query(params![function, after_seq, limit])?)
            }
            None => {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {RECORD_COLUMNS} FROM usage WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                ))?;
                read_records(stmt.query(params![after_seq, limit])?)
            }
        }
    }

    fn usage_count(&self) -> Result<u64> {
        let conn = self.conn();
        let count: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM usage")?
            .query_row([], |row| row.get(0))?;
        Ok(saturate(count, u64::MAX))
    }
}

#[async_trait::async_trait]
impl UsageStore for EmbeddedLedger {
    async fn append_usage(&self, records: &[UsageRecord]) -> Result<usize> {
        if records.is_empty() {
            // Nothing to commit: not even a trip to the blocking pool.
            return Ok(0);
        }
        let records = records.to_vec();
        offload(&self.db, move |db| db.append_usage(&records)).await
    }

    async fn usage_summary(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        let query = query.clone();
        offload(&self.db, move |db| db.usage_summary(&query)).await
    }

    async fn usage_records(
        &self,
        function: Option<&str>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredUsage>> {
        let function = function.map(str::to_owned);
        offload(&self.db, move |db| {
            db.usage_records(function.as_deref(), after_seq, limit)
        })
        .await
    }

    async fn usage_count(&self) -> Result<u64> {
        offload(&self.db, |db| db.usage_count()).await
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn billed_ms_rounds_up_to_whole_milliseconds_at_least_one() {
        assert_eq!(billed_ms(0), 1);
        assert_eq!(billed_ms(1), 1);
        assert_eq!(billed_ms(999), 1);
        assert_eq!(billed_ms(1_000), 1);
        assert_eq!(billed_ms(1_001), 2);
        assert_eq!(billed_ms(1_999), 2);
        assert_eq!(billed_ms(2_000), 2);
        assert_eq!(billed_ms(900_000_000), 900_000);
        assert_eq!(billed_ms(u64::MAX), u64::MAX / 1000 + 1);
    }

    #[test]
    fn gb_seconds_use_binary_gigabytes() {
        let mut r = record(1, "f", 1, T0);
        r.memory_limit_mb = 128;
        r.billed_ms = 1;
        assert_eq!(r.billed_gb_s(), 0.000125);
        r.memory_limit_mb = 1024;
        r.billed_ms = 1_000;
        assert_eq!(r.billed_gb_s(), 1.0);
        r.peak_memory_bytes = 1 << 30;
        r.wall_us = 1_000_000;
        assert_eq!(r.used_gb_s(), 1.0);
        r.peak_memory_bytes = 64 << 20;
        r.wall_us = 500_000;
        assert_eq!(r.used_gb_s(), 1.0 / 32.0);
        r.peak_memory_bytes = 0;
        assert_eq!(r.used_gb_s(), 0.0);
    }

    #[test]
    fn names_round_trip() {
        for outcome in Outcome::ALL {
            assert_eq!(Outcome::parse(outcome.as_str()), Some(outcome));
            assert_eq!(
                serde_json::to_string(&outcome).unwrap(),
                format!("\"{}\"", outcome.as_str())
            );
        }
        assert_eq!(Outcome::parse("OK"), None);
        for group in [
            GroupBy::Function,
            GroupBy::Version,
            GroupBy::Hour,
            GroupBy::Day,
        ] {
            assert_eq!(GroupBy::parse(group.as_str()), Some(group));
            assert_eq!(
                serde_json::to_string(&group).unwrap(),
                format!("\"{}\"", group.as_str())
            );
        }
        assert_eq!(GroupBy::parse("week"), None);
    }

    #[test]
    fn json_shape() {
        let row = expected(&[&record(1, "f", 1, T0)]);
        let json = serde_json::to_value(UsageRow {
            function: Some("f".into()),
            ..row
        })
        .unwrap();
        assert_eq!(json["function"], "f");
        assert!(json.get("version").is_none());
        assert!(json.get("period_start_ms").is_none());
        let outcomes = json["outcomes"].as_object().unwrap();
        assert_eq!(outcomes.len(), 7);
        assert_eq!(outcomes["client_closed"], 0);
        assert_eq!(outcomes["ok"], 1);
        assert_eq!(outcomes["throttled"], 0);

        let stored = StoredUsage {
            seq: 7,
            record: record(1, "f", 1, T0),
        };
        let json = serde_json::to_value(&stored).unwrap();
        assert_eq!(json["seq"], 7);
        assert_eq!(json["function"], "f");
        assert_eq!(json["outcome"], "ok");
        let back: StoredUsage = serde_json::from_value(json).unwrap();
        assert_eq!(back, stored);
    }
    use super::*;
    use crate::conformance::usage::{DAY, T0, expected, fixture, query, record};
    use crate::*;

    fn ledger() -> (tempfile::TempDir, EmbeddedLedger) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = EmbeddedLedger::open(&dir.path().join("ledger.db")).unwrap();
        (dir, ledger)
    }

    /// Five records over two functions, two versions, two hours and two days.
    async fn fixture_ledger() -> (tempfile::TempDir, EmbeddedLedger, Vec<UsageRecord>) {
        let (dir, ledger) = ledger();
        let records = fixture();
        assert_eq!(ledger.append_usage(&records).await.unwrap(), records.len());
        (dir, ledger, records)
    }

    #[tokio::test]
    async fn a_version_1_ledger_is_migrated_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        {
            // The ledger as the first schema left it.
            let raw = Connection::open(&path).unwrap();
            migrate(&raw, &LEDGER_MIGRATIONS[..1]).unwrap();
            raw.execute(
                "INSERT INTO usage (request_id, function, version, trigger, start_ms, wall_us, \
                     cpu_us, peak_memory_bytes, memory_limit_mb, billed_ms, outcome, cold, \
                     status) VALUES ('shared', 'a', 1, 'http', ?1, 1500, 700, 1048576, 128, 2, \
                     'ok', 0, 200)",
                [T0],
            )
            .unwrap();
        }
        let ledger = EmbeddedLedger::open(&path).unwrap();
        let stored = ledger.usage_records(None, 0, 10).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].record.request_id, "shared");
        assert_eq!(stored[0].record.client_request_id, None);
        // The old id no longer blocks another function's record...
        let mut other = record(9, "b", 1, T0);
        other.request_id = "shared".into();
        assert_eq!(ledger.append_usage(&[other]).await.unwrap(), 1);
        // ...and new records keep counting after the old seq.
        assert_eq!(
            ledger
                .append_usage(&[record(10, "a", 1, T0)])
                .await
                .unwrap(),
            1
        );
        let seqs: Vec<i64> = ledger
            .usage_records(None, 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|s| s.seq)
            .collect();
        assert_eq!(seqs.len(), 3);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, LEDGER_MIGRATIONS.len() as i64);
    }

    #[tokio::test]
    async fn last_seq_is_the_highest_seq_or_zero() {
        let (_dir, ledger) = ledger();
        assert_eq!(ledger.last_seq().await.unwrap(), 0);
        ledger.append_usage(&fixture()).await.unwrap();
        let stored = ledger.usage_records(None, 0, 10).await.unwrap();
        assert_eq!(ledger.last_seq().await.unwrap(), stored[4].seq);
    }

    #[tokio::test]
    async fn reopening_keeps_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let records = fixture();
        {
            let ledger = EmbeddedLedger::open(&path).unwrap();
            ledger.append_usage(&records).await.unwrap();
        }
        let ledger = EmbeddedLedger::open(&path).unwrap();
        assert_eq!(ledger.usage_count().await.unwrap(), 5);
        // The unique request id survives too.
        assert_eq!(ledger.append_usage(&records).await.unwrap(), 0);
        let stored: Vec<_> = ledger
            .usage_records(None, 0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.record)
            .collect();
        assert_eq!(stored, records);
    }

    #[tokio::test]
    async fn an_unknown_outcome_is_corrupt() {
        let (dir, ledger, _) = fixture_ledger().await;
        let raw = Connection::open(dir.path().join("ledger.db")).unwrap();
        raw.execute(
            "UPDATE usage SET outcome = 'vanished' WHERE function = 'b'",
            [],
        )
        .unwrap();
        let err = ledger.usage_records(Some("b"), 0, 10).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt(ref m) if m.contains("vanished")),
            "{err}"
        );
        let err = ledger
            .usage_summary(&query(GroupBy::Function, T0, T0 + 2 * DAY))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        // Records with known outcomes still read.
        assert_eq!(
            ledger.usage_records(Some("a"), 0, 10).await.unwrap().len(),
            3
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        drop(EmbeddedLedger::open(&path).unwrap());
        let raw = Connection::open(&path).unwrap();
        raw.pragma_update(None, "user_version", 99).unwrap();
        drop(raw);
        assert!(matches!(
            EmbeddedLedger::open(&path),
            Err(StoreError::Corrupt(_))
        ));
    }
}
