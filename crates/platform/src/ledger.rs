//! The usage ledger's writer: invocation records reach the durable store in
//! batches (group commit), off the request path.
//!
//! An invocation's task only queues its record. One writer thread gathers
//! what arrives within a short commit interval (10 ms), commits it in one
//! transaction, and repeats, so under load each commit (and its fsync)
//! carries many records, and a record is durable at most one interval plus
//! one commit after it was queued. The queue is unbounded
//! on purpose: a billing record is never dropped, and the writer ingests
//! records far faster than the gateway can serve requests
//! (`mayfly_ledger_pending_records` shows any backlog).
//!
//! The store is async; the thread awaits each commit on the node's runtime
//! (`Handle::block_on`), so its batching, backoff and close stay plain
//! blocking code, and the request path never spawns anything.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mayfly_store::{UsageRecord, UsageStore};
use tokio::runtime::Handle;

use crate::logs::{Batch, WriterMessage, run_writer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// Records committed per transaction at most.
const BATCH_RECORDS: usize = 4_096;
/// How long the first record of a batch waits for others to share its
/// commit. This bounds what a SIGKILL can lose (this long plus one
/// commit); without it, every few records paid a commit and an fsync, which
/// cost the hello load run over 20% of its throughput.
const COMMIT_INTERVAL: Duration = Duration::from_millis(10);
/// How long a shutdown keeps retrying a failing commit before giving up.
const CLOSE_RETRY_LIMIT: Duration = Duration::from_secs(5);

/// The ledger's own metrics.
#[derive(Clone, Debug)]
pub struct LedgerMetrics {
    /// Records queued but not yet committed.
    pub pending: Gauge,
    /// Records committed.
    pub committed: Counter,
    /// Time from an invocation's end to its record being committed, for
    /// the oldest record of each batch: the window a crash could lose.
    pub commit_delay: Histogram,
    /// Commits that failed (and were retried).
    pub failed_commits: Counter,
}

/// The node's queue of usage records and its writer thread.
pub struct Ledger {
    queue: mpsc::Sender<WriterMessage<(UsageRecord, Instant)>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    metrics: LedgerMetrics,
}

impl Ledger {
    /// Starts the writer thread over `store`, whose calls it awaits on
    /// `runtime` (the node's).
    pub fn start(
        store: Arc<dyn UsageStore>,
        metrics: LedgerMetrics,
        runtime: Handle,
    ) -> std::io::Result<Self> {
        let (queue, records) = mpsc::channel();
        let writer_metrics = metrics.clone();
        let writer = std::thread::Builder::new()
            .name("mayfly-ledger".into())
            .spawn(move || write_batches(records, store.as_ref(), &runtime, &writer_metrics))?;
        Ok(Self {
            queue,
            writer: Mutex::new(Some(writer)),
            metrics,
        })
    }

    /// Queues one invocation's record. Never blocks.
    pub fn record(&self, record: UsageRecord) {
        self.metrics.pending.inc();
        if let Err(mpsc::SendError(message)) = self
            .queue
            .send(WriterMessage::Item((record, Instant::now())))
        {
            self.metrics.pending.dec();
            if let WriterMessage::Item((record, _)) = message {
                tracing::error!(
                    request_id = %record.request_id,
                    function = %record.function,
                    "usage record arrived after the ledger closed; it is not stored"
                );
            }
        }
    }

    /// Whether the writer thread still runs (false once it ended, by a
    /// close or a panic): the readiness check reads it.
    pub fn writer_alive(&self) -> bool {
        crate::logs::writer_alive(&self.writer)
    }

    /// Records queued and not yet committed.
    pub fn pending(&self) -> i64 {
        self.metrics.pending.get()
    }

    /// Commits everything queued and stops the writer. Blocks until done:
    /// call it off the async runtime, after the last invocation ended.
    pub fn close(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.queue.send(WriterMessage::Close(done)).is_ok() {
            let _ = wait.recv();
        }
        crate::logs::join_writer(&self.writer, "ledger");
    }
}

/// The ledger writer's batch: records committed in one transaction, and
/// when the oldest of them was queued.
struct LedgerBatch<'a> {
    records: Vec<UsageRecord>,
    oldest: Option<Instant>,
    store: &'a dyn UsageStore,
    runtime: &'a Handle,
    metrics: &'a LedgerMetrics,
}

impl Batch<(UsageRecord, Instant)> for LedgerBatch<'_> {
    fn add(&mut self, (record, queued_at): (UsageRecord, Instant)) {
        self.oldest.get_or_insert(queued_at);
        self.records.push(record);
    }

    fn store(&mut self, closing: bool) {
        if self.records.is_empty() {
            return;
        }
        commit(
            self.store,
            self.runtime,
            &self.records,
            closing,
            self.metrics,
        );
        if let Some(oldest) = self.oldest.take() {
            self.metrics
                .commit_delay
                .observe(oldest.elapsed().as_secs_f64());
        }
        self.metrics.pending.dec_by(self.records.len() as i64);
        self.records.clear();
    }
}

fn write_batches(
    queue: mpsc::Receiver<WriterMessage<(UsageRecord, Instant)>>,
    store: &dyn UsageStore,
    runtime: &Handle,
    metrics: &LedgerMetrics,
) {
    // One commit (and its fsync) carries everything that arrives within the
    // commit interval.
    let mut batch = LedgerBatch {
        records: Vec::with_capacity(BATCH_RECORDS),
        oldest: None,
        store,
        runtime,
        metrics,
    };
    run_writer(&queue, COMMIT_INTERVAL, BATCH_RECORDS, &mut batch);
}

/// Commits one batch, retrying while the store fails: billing records are
/// not dropped for a transient error (disk full, a locked database). Runs
/// on the writer thread, which waits for each call (`block_on`: legal
/// there, as it is no runtime thread).
fn commit(
    store: &dyn UsageStore,
    runtime: &Handle,
    batch: &[UsageRecord],
    closing: bool,
    metrics: &LedgerMetrics,
) {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(10);
    loop {
        match runtime.block_on(store.append_usage(batch)) {
            Ok(new) => {
                // Records already in the ledger (a retried commit that had
                // in fact landed) are skipped by the store, never doubled.
                metrics.committed.inc_by(new as u64);
                return;
            }
            Err(error) => {
                metrics.failed_commits.inc();
                if closing && started.elapsed() > CLOSE_RETRY_LIMIT {
                    tracing::error!(
                        "giving up on {} usage records at shutdown: {error}",
                        batch.len()
                    );
                    return;
                }
                tracing::error!(
                    "cannot store {} usage records, retrying in {backoff:?}: {error}",
                    batch.len()
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
