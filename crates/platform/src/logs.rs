//! Guest log lines: from the guest's write to the durable log store.
//!
//! The guest's write only queues the line (a bounded channel: a flood is
//! counted and dropped, never allowed to stall the guest or grow memory). One
//! writer thread stores lines in batches, one transaction per batch, and
//! announces the newest id so `logs --follow` readers wake up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mayfly_runtime::{LogSink, LogStream, RequestLabels};
use mayfly_store::{LogStore, NewLogLine};

/// Lines waiting for the writer before new ones are dropped.
const QUEUE_LINES: usize = 65_536;
/// Lines written per transaction at most.
const BATCH_LINES: usize = 4_096;
/// Lines kept in the store; older ones are pruned.
const KEEP_LINES: usize = 200_000;

/// The node's [`LogSink`]: queues lines for the writer thread.
pub struct LogHub {
    queue: mpsc::SyncSender<NewLogLine>,
    dropped: AtomicU64,
    newest: tokio::sync::watch::Receiver<i64>,
}

impl LogHub {
    /// Starts the writer thread over `store`.
    pub fn start(store: Arc<dyn LogStore>) -> std::io::Result<Arc<Self>> {
        let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
        let (newest_tx, newest) = tokio::sync::watch::channel(0);
        std::thread::Builder::new()
            .name("mayfly-logs".into())
            .spawn(move || write_batches(lines, store.as_ref(), newest_tx))?;
        Ok(Arc::new(Self {
            queue,
            dropped: AtomicU64::new(0),
            newest,
        }))
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A receiver that changes whenever new lines are stored.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> {
        self.newest.clone()
    }
}

impl LogSink for LogHub {
    fn line(&self, labels: &RequestLabels, stream: LogStream, line: &str) {
        tracing::debug!(
            target: "guest",
            function = %labels.function,
            version = labels.version,
            request_id = %labels.request_id,
            stream = stream.as_str(),
            "{line}"
        );
        let record = NewLogLine {
            ts_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            function: labels.function.clone(),
            version: labels.version,
            request_id: labels.request_id.clone(),
            stream: stream.as_str().to_string(),
            line: line.to_string(),
        };
        if self.queue.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn write_batches(
    lines: mpsc::Receiver<NewLogLine>,
    store: &dyn LogStore,
    newest: tokio::sync::watch::Sender<i64>,
) {
    let mut batch = Vec::with_capacity(BATCH_LINES);
    let mut since_prune = 0usize;
    loop {
        match lines.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => batch.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        while batch.len() < BATCH_LINES {
            match lines.try_recv() {
                Ok(line) => batch.push(line),
                Err(_) => break,
            }
        }
        match store.append_logs(&batch) {
            Ok(last) => {
                newest.send_replace(last);
            }
            Err(error) => tracing::error!("failed to store {} log lines: {error}", batch.len()),
        }
        since_prune += batch.len();
        batch.clear();
        if since_prune >= KEEP_LINES / 10 {
            since_prune = 0;
            if let Err(error) = store.prune_logs(KEEP_LINES) {
                tracing::warn!("failed to prune old log lines: {error}");
            }
        }
    }
}
