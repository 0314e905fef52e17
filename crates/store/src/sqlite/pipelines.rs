//! The embedded pipeline store: two tables of `jobs.db` (see `jobs.rs`),
//! so a run's record and the jobs of its steps live in one file.

use rusqlite::{Connection, OptionalExtension, params};

use super::jobs::{EmbeddedJobs, JobsDb};
use super::{now_ms, offload, to_u64, write_tx};
use crate::jobs::JobState;
use crate::pipelines::{Pipeline, PipelineRun, PipelineSpec, PipelineStore, RunCause, RunStart};
use crate::{Result, StoreError};

const PIPELINE_COLUMNS: &str = "name, spec, created_ms, updated_ms, last_slot_ms, pending_since_ms";
const RUN_COLUMNS: &str = "pipeline, run, spec, cause, full, state, error, created_ms, finished_ms";

fn spec_of(name: &str, text: &str) -> Result<PipelineSpec> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("pipeline {name}: its spec: {e}")))
}

fn read_pipeline(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, [Option<i64>; 4])> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        [row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?],
    ))
}

fn decode_pipeline((name, spec, times): (String, String, [Option<i64>; 4])) -> Result<Pipeline> {
    Ok(Pipeline {
        spec: spec_of(&name, &spec)?,
        name,
        created_ms: times[0].unwrap_or(0),
        updated_ms: times[1].unwrap_or(0),
        last_slot_ms: times[2],
        pending_since_ms: times[3],
    })
}

type RawRun = (
    String,
    i64,
    String,
    String,
    bool,
    String,
    Option<String>,
    i64,
    Option<i64>,
);

fn read_run(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
    ))
}

fn decode_run(raw: RawRun) -> Result<PipelineRun> {
    let (pipeline, run, spec, cause, full, state, error, created_ms, finished_ms) = raw;
    let bad = |what: &str| StoreError::Corrupt(format!("pipeline {pipeline} run {run}: {what}"));
    Ok(PipelineRun {
        spec: spec_of(&pipeline, &spec)?,
        cause: RunCause::parse(&cause).ok_or_else(|| bad(&format!("unknown cause `{cause}`")))?,
        state: JobState::parse(&state).ok_or_else(|| bad(&format!("unknown state `{state}`")))?,
        run: to_u64(run),
        pipeline,
        full,
        error,
        created_ms,
        finished_ms,
    })
}

fn pipeline_in(conn: &Connection, name: &str) -> Result<Option<Pipeline>> {
    conn.prepare_cached(&format!(
        "SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE name = ?1"
    ))?
    .query_row([name], read_pipeline)
    .optional()?
    .map(decode_pipeline)
    .transpose()
}

fn run_in(conn: &Connection, name: &str, run: i64) -> Result<Option<PipelineRun>> {
    conn.prepare_cached(&format!(
        "SELECT {RUN_COLUMNS} FROM pipeline_runs WHERE pipeline = ?1 AND run = ?2"
    ))?
    .query_row(params![name, run], read_run)
    .optional()?
    .map(decode_run)
    .transpose()
}

impl JobsDb {
    fn put_pipeline(&self, name: &str, spec: &PipelineSpec) -> Result<(Pipeline, bool)> {
        let text = serde_json::to_string(spec).map_err(|e| StoreError::Backend(Box::new(e)))?;
        let mut conn = self.conn();
        let tx = write_tx(&mut conn)?;
        let old = pipeline_in(&tx, name)?;
        let changed = old.as_ref().is_none_or(|old| &old.spec != spec);
        if changed {
            let now = now_ms();
            tx.prepare_cached(
                "INSERT INTO pipelines (name, spec, created_ms, updated_ms) \
                 VALUES (?1, ?2, ?3, ?3) ON CONFLICT (name) DO UPDATE SET \
                 spec = excluded.spec, updated_ms = excluded.updated_ms, last_slot_ms = NULL",
            )?
            .execute(params![name, text, now])?;
        }
        let pipeline = pipeline_in(&tx, name)?
            .ok_or_else(|| StoreError::Conflict(format!("pipeline `{name}` vanished")))?;
        tx.commit()?;
        Ok((pipeline, changed))
    }

    fn pipelines(&self) -> Result<Vec<Pipeline>> {
        let conn = self.conn();
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {PIPELINE_COLUMNS} FROM pipelines ORDER BY name"
            ))?
            .query_map([], read_pipeline)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raw.into_iter().map(decode_pipeline).collect()
    }

    fn start_run(&self, name: &str, cause: RunCause, full: bool) -> Result<RunStart> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn)?;
        let Some(pipeline) = pipeline_in(&tx, name)? else {
            return Ok(RunStart::NoPipeline);
        };
        let running: Option<i64> = tx
            .prepare_cached(
                "SELECT run FROM pipeline_runs WHERE pipeline = ?1 AND state = 'running' \
                 ORDER BY run LIMIT 1",
            )?
            .query_row([name], |row| row.get(0))
            .optional()?;
        if let Some(run) = running {
            let run = run_in(&tx, name, run)?
                .ok_or_else(|| StoreError::Conflict(format!("run {run} vanished")))?;
            return Ok(RunStart::Busy(run));
        }
        let last: Option<i64> = tx
            .prepare_cached("SELECT MAX(run) FROM pipeline_runs WHERE pipeline = ?1")?
            .query_row([name], |row| row.get(0))?;
        let run = last.unwrap_or(0) + 1;
        let spec =
            serde_json::to_string(&pipeline.spec).map_err(|e| StoreError::Backend(Box::new(e)))?;
        tx.prepare_cached(
            "INSERT INTO pipeline_runs (pipeline, run, spec, cause, full, state, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6)",
        )?
        .execute(params![name, run, spec, cause.as_str(), full, now_ms()])?;
        if cause == RunCause::Objects {
            tx.prepare_cached("UPDATE pipelines SET pending_since_ms = NULL WHERE name = ?1")?
                .execute([name])?;
        }
        let started = run_in(&tx, name, run)?
            .ok_or_else(|| StoreError::Conflict(format!("run {run} vanished")))?;
        tx.commit()?;
        Ok(RunStart::Started(started))
    }

    fn runs(&self, name: &str, limit: usize) -> Result<Vec<PipelineRun>> {
        let conn = self.conn();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM pipeline_runs WHERE pipeline = ?1 \
                 ORDER BY run DESC LIMIT ?2"
            ))?
            .query_map(params![name, limit], read_run)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raw.into_iter().map(decode_run).collect()
    }

    fn running_runs(&self) -> Result<Vec<PipelineRun>> {
        let conn = self.conn();
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM pipeline_runs WHERE state = 'running' \
                 ORDER BY pipeline, run"
            ))?
            .query_map([], read_run)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raw.into_iter().map(decode_run).collect()
    }
}

#[async_trait::async_trait]
impl PipelineStore for EmbeddedJobs {
    async fn put_pipeline(&self, name: &str, spec: &PipelineSpec) -> Result<(Pipeline, bool)> {
        let (name, spec) = (name.to_owned(), spec.clone());
        offload(&self.db, move |db| db.put_pipeline(&name, &spec)).await
    }

    async fn pipeline(&self, name: &str) -> Result<Option<Pipeline>> {
        let name = name.to_owned();
        offload(&self.db, move |db| pipeline_in(&db.conn(), &name)).await
    }

    async fn pipelines(&self) -> Result<Vec<Pipeline>> {
        offload(&self.db, |db| db.pipelines()).await
    }

    async fn delete_pipeline(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        offload(&self.db, move |db| {
            let deleted = db
                .conn()
                .prepare_cached("DELETE FROM pipelines WHERE name = ?1")?
                .execute([&name])?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn mark_pending(&self, name: &str, at_ms: i64) -> Result<()> {
        let name = name.to_owned();
        offload(&self.db, move |db| {
            db.conn()
                .prepare_cached(
                    "UPDATE pipelines SET pending_since_ms = ?2 \
                     WHERE name = ?1 AND pending_since_ms IS NULL",
                )?
                .execute(params![name, at_ms])?;
            Ok(())
        })
        .await
    }

    async fn fire_slot(&self, name: &str, last: Option<i64>, slot: i64) -> Result<bool> {
        let name = name.to_owned();
        offload(&self.db, move |db| {
            let changed = db
                .conn()
                .prepare_cached(
                    "UPDATE pipelines SET last_slot_ms = ?3 \
                     WHERE name = ?1 AND last_slot_ms IS ?2",
                )?
                .execute(params![name, last, slot])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn start_run(&self, name: &str, cause: RunCause, full: bool) -> Result<RunStart> {
        let name = name.to_owned();
        offload(&self.db, move |db| db.start_run(&name, cause, full)).await
    }

    async fn finish_run(
        &self,
        name: &str,
        run: u64,
        state: JobState,
        error: Option<&str>,
    ) -> Result<()> {
        let (name, error) = (name.to_owned(), error.map(str::to_owned));
        let run = i64::try_from(run).unwrap_or(i64::MAX);
        offload(&self.db, move |db| {
            db.conn()
                .prepare_cached(
                    "UPDATE pipeline_runs SET state = ?3, error = ?4, finished_ms = ?5 \
                     WHERE pipeline = ?1 AND run = ?2",
                )?
                .execute(params![name, run, state.as_str(), error, now_ms()])?;
            Ok(())
        })
        .await
    }

    async fn runs(&self, name: &str, limit: usize) -> Result<Vec<PipelineRun>> {
        let name = name.to_owned();
        offload(&self.db, move |db| db.runs(&name, limit)).await
    }

    async fn run(&self, name: &str, run: u64) -> Result<Option<PipelineRun>> {
        let name = name.to_owned();
        let run = i64::try_from(run).unwrap_or(i64::MAX);
        offload(&self.db, move |db| run_in(&db.conn(), &name, run)).await
    }

    async fn running_runs(&self) -> Result<Vec<PipelineRun>> {
        offload(&self.db, |db| db.running_runs()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::StepSpec;

    fn spec(input: &str) -> PipelineSpec {
        PipelineSpec {
            input: input.into(),
            schedule: None,
            on_objects: true,
            steps: vec![StepSpec {
                name: "a".into(),
                function: "f".into(),
                after: None,
                output: Some("out/a/".into()),
                reduce: false,
                parallelism: None,
                max_failures: None,
                max_attempts: None,
            }],
        }
    }

    #[tokio::test]
    async fn runs_never_overlap_and_keep_their_definition() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn PipelineStore> =
            std::sync::Arc::new(super::super::open_jobs(dir.path()).unwrap());
        assert_eq!(
            store.start_run("p", RunCause::Manual, false).await.unwrap(),
            RunStart::NoPipeline
        );
        let (_, changed) = store.put_pipeline("p", &spec("in/x/")).await.unwrap();
        assert!(changed);
        let (_, changed) = store.put_pipeline("p", &spec("in/x/")).await.unwrap();
        assert!(!changed, "the same definition again is no change");
        store.mark_pending("p", 5).await.unwrap();
        store.mark_pending("p", 9).await.unwrap();
        assert_eq!(
            store.pipeline("p").await.unwrap().unwrap().pending_since_ms,
            Some(5)
        );
        let RunStart::Started(first) = store
            .start_run("p", RunCause::Objects, false)
            .await
            .unwrap()
        else {
            panic!("no run started");
        };
        assert_eq!((first.run, first.state), (1, JobState::Running));
        assert_eq!(
            store.pipeline("p").await.unwrap().unwrap().pending_since_ms,
            None
        );
        // A second start while the first runs starts nothing.
        assert!(matches!(
            store.start_run("p", RunCause::Manual, false).await.unwrap(),
            RunStart::Busy(run) if run.run == 1
        ));
        // A redeploy does not change the running run's steps.
        store.put_pipeline("p", &spec("in/y/")).await.unwrap();
        assert_eq!(
            store.run("p", 1).await.unwrap().unwrap().spec.input,
            "in/x/"
        );
        assert_eq!(store.running_runs().await.unwrap().len(), 1);
        store
            .finish_run("p", 1, JobState::Succeeded, None)
            .await
            .unwrap();
        let RunStart::Started(second) = store.start_run("p", RunCause::Manual, true).await.unwrap()
        else {
            panic!("no second run");
        };
        assert_eq!((second.run, second.spec.input.as_str()), (2, "in/y/"));
        // Deleting keeps the history and the numbering.
        assert!(store.delete_pipeline("p").await.unwrap());
        assert_eq!(store.runs("p", 10).await.unwrap().len(), 2);
        // The schedule's last slot is a compare-and-swap.
        store.put_pipeline("p", &spec("in/x/")).await.unwrap();
        assert!(store.fire_slot("p", None, 100).await.unwrap());
        assert!(!store.fire_slot("p", None, 200).await.unwrap());
        assert!(store.fire_slot("p", Some(100), 200).await.unwrap());
    }
}
