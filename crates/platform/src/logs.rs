//! Guest log lines: from the guest's write to the durable log store.
//!
//! The guest's write only queues the line (a bounded channel: a flood is
//! counted and dropped, never allowed to stall the guest or grow memory). One
//! writer thread stores lines in batches, one transaction per batch (awaiting
//! the async store on the node's runtime, from the thread:
//! `Handle::block_on`), and announces the newest id so `logs --follow`
//! readers wake up. In a fleet it then hands the stored lines to the
//! back-end's [`LogFeed`], which carries them to followers on every node;
//! the feed only queues them (it drops, and counts, what does not fit), so
//! neither the guest nor the writer ever waits on the network.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mayfly_runtime::{LogSink, LogStream, RequestLabels};
use mayfly_store::{LogFeed, LogStore, NewLogLine};
use tokio::runtime::Handle;

/// Lines waiting for the writer before new ones are dropped. Counted rather
/// than a bounded channel's capacity: `sync_channel` allocates and stamps
/// every slot up front, ~10 MB resident and ~3.5 ms of every node's start.
const QUEUE_LINES: usize = 65_536;
/// Lines written per transaction at most.
const BATCH_LINES: usize = 4_096;
/// How long the first line of a batch waits for others to share its
/// transaction (and how late `logs --follow` may see it).
const GATHER_INTERVAL: Duration = Duration::from_millis(10);
/// Lines kept in the store over all functions; older ones are pruned.
const KEEP_LINES: usize = 200_000;
/// Lines kept per function, so one function's flood cannot erase the
/// others' logs (with these, it takes 10 functions flooding at once to
/// reach [`KEEP_LINES`]).
const KEEP_FUNCTION_LINES: usize = 20_000;
/// Bytes of log text kept per function (lines are up to 16 KiB each).
const KEEP_FUNCTION_BYTES: u64 = 8 << 20;

/// What a writer thread (logs, ledger) receives: an item to store, or the
/// order to store everything queued before it and stop.
pub(crate) enum WriterMessage<T> {
    Item(T),
    Close(mpsc::SyncSender<()>),
}

/// The node's [`LogSink`]: queues lines for the writer thread.
pub struct LogHub {
    queue: mpsc::Sender<WriterMessage<NewLogLine>>,
    /// Lines sent and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dropped: AtomicU64,
    newest: tokio::sync::watch::Receiver<i64>,
}

impl LogHub {
    /// Starts the writer thread over `store`, whose calls it awaits on
    /// `runtime` (the node's); stored lines go on to `feed`.
    pub fn start(
        store: Arc<dyn LogStore>,
        feed: Arc<dyn LogFeed>,
        runtime: Handle,
    ) -> std::io::Result<Arc<Self>> {
        let (queue, lines) = mpsc::channel();
        let (newest_tx, newest) = tokio::sync::watch::channel(0);
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        let writer = std::thread::Builder::new()
            .name("mayfly-logs".into())
            .spawn(move || {
                write_batches(
                    lines,
                    &taken,
                    store.as_ref(),
                    feed.as_ref(),
                    &runtime,
                    newest_tx,
                );
            })?;
        Ok(Arc::new(Self {
            queue,
            queued,
            writer: Mutex::new(Some(writer)),
            dropped: AtomicU64::new(0),
            newest,
        }))
    }

    /// Stores every queued line and stops the writer. Blocks until done:
    /// call it off the async runtime, after the last invocation ended.
    pub fn close(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.queue.send(WriterMessage::Close(done)).is_ok() {
            let _ = wait.recv();
        }
        join_writer(&self.writer, "log");
    }

    /// Whether the writer thread still runs: the readiness check reads it.
    pub fn writer_alive(&self) -> bool {
        writer_alive(&self.writer)
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
        if self.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE_LINES
            || self.queue.send(WriterMessage::Item(record)).is_err()
        {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Blocks for a first message, then sleeps out `interval` and takes what
/// arrived meanwhile, `max` items in all, handing each item to `take`.
/// Returns whether the queue is still open, and the close order if one came
/// (it ends the gathering: everything before it was taken).
///
/// Sleeping rather than waiting on the queue is the point: a receiver
/// blocked on the queue is woken by every send, which costs the sending
/// request a context switch per message (over 20% of the hello load run's
/// throughput when the ledger writer did it).
fn gather<T>(
    queue: &mpsc::Receiver<WriterMessage<T>>,
    interval: Duration,
    max: usize,
    mut take: impl FnMut(T),
) -> (bool, Option<mpsc::SyncSender<()>>) {
    let mut next = match queue.recv() {
        Ok(message) => message,
        Err(_) => return (false, None),
    };
    let deadline = Instant::now() + interval;
    let mut taken = 0;
    let mut slept = false;
    loop {
        match next {
            WriterMessage::Item(item) => take(item),
            WriterMessage::Close(done) => return (true, Some(done)),
        }
        taken += 1;
        if taken >= max {
            return (true, None);
        }
        next = loop {
            match queue.try_recv() {
                Ok(message) => break message,
                Err(mpsc::TryRecvError::Empty) if !slept => {
                    slept = true;
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                }
                Err(mpsc::TryRecvError::Empty) => return (true, None),
                Err(mpsc::TryRecvError::Disconnected) => return (false, None),
            }
        };
    }
}

/// Waits for a writer thread that was told to stop; a second call finds
/// nothing to wait for.
/// Whether a writer thread is running: not yet joined, and not ended.
pub(crate) fn writer_alive(writer: &Mutex<Option<JoinHandle<()>>>) -> bool {
    writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .as_ref()
        .is_some_and(|handle| !handle.is_finished())
}

pub(crate) fn join_writer(writer: &Mutex<Option<JoinHandle<()>>>, what: &str) {
    let writer = writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    if let Some(writer) = writer
        && writer.join().is_err()
    {
        tracing::error!("the {what} writer panicked");
    }
}

/// The log writer's batch: lines stored in one transaction, and the count
/// since the last prune (over all functions, and per function). Store calls
/// are awaited on `runtime` from the writer thread (`block_on`: legal there,
/// as it is no runtime thread).
struct LogBatch<'a> {
    lines: Vec<NewLogLine>,
    /// The hub's count of lines not yet taken.
    queued: &'a AtomicUsize,
    store: &'a dyn LogStore,
    feed: &'a dyn LogFeed,
    runtime: &'a Handle,
    newest: tokio::sync::watch::Sender<i64>,
    since_prune: usize,
    /// Lines and bytes each function logged since its last prune.
    since_function_prune: std::collections::HashMap<String, (usize, u64)>,
}

impl LogBatch<'_> {
    /// Prunes the functions that logged a tenth of their retention since
    /// they were last pruned (so pruning costs little per line).
    fn prune_functions(&mut self) {
        let (store, runtime) = (self.store, self.runtime);
        self.since_function_prune
            .retain(|function, &mut (lines, bytes)| {
                if lines < KEEP_FUNCTION_LINES / 10 && bytes < KEEP_FUNCTION_BYTES / 10 {
                    return true;
                }
                if let Err(error) = runtime.block_on(store.prune_function_logs(
                    function,
                    KEEP_FUNCTION_LINES,
                    KEEP_FUNCTION_BYTES,
                )) {
                    tracing::warn!(function, "failed to prune old log lines: {error}");
                }
                false
            });
    }
}

impl Batch<NewLogLine> for LogBatch<'_> {
    fn add(&mut self, line: NewLogLine) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.lines.push(line);
    }

    fn store(&mut self, closing: bool) {
        if !self.lines.is_empty() {
            for line in &self.lines {
                let (lines, bytes) = match self.since_function_prune.get_mut(&line.function) {
                    Some(counts) => counts,
                    None => self
                        .since_function_prune
                        .entry(line.function.clone())
                        .or_default(),
                };
                *lines += 1;
                *bytes += line.line.len() as u64;
            }
            match self.runtime.block_on(self.store.append_logs(&self.lines)) {
                Ok(last) => {
                    self.newest.send_replace(last);
                    // One append's ids are consecutive (the contract).
                    let first = last - (self.lines.len() as i64 - 1);
                    self.feed.publish(first, &self.lines);
                }
                Err(error) => {
                    tracing::error!("failed to store {} log lines: {error}", self.lines.len())
                }
            }
            self.since_prune += self.lines.len();
            self.lines.clear();
            if !closing {
                self.prune_functions();
            }
        }
        if !closing && self.since_prune >= KEEP_LINES / 10 {
            self.since_prune = 0;
            if let Err(error) = self.runtime.block_on(self.store.prune_logs(KEEP_LINES)) {
                tracing::warn!("failed to prune old log lines: {error}");
            }
        }
    }
}

fn write_batches(
    queue: mpsc::Receiver<WriterMessage<NewLogLine>>,
    queued: &AtomicUsize,
    store: &dyn LogStore,
    feed: &dyn LogFeed,
    runtime: &Handle,
    newest: tokio::sync::watch::Sender<i64>,
) {
    let mut batch = LogBatch {
        lines: Vec::with_capacity(BATCH_LINES),
        queued,
        store,
        feed,
        runtime,
        newest,
        since_prune: 0,
        since_function_prune: std::collections::HashMap::new(),
    };
    run_writer(&queue, GATHER_INTERVAL, BATCH_LINES, &mut batch);
}

/// What a writer thread accumulates between stores.
pub(crate) trait Batch<T> {
    /// Adds one queued item.
    fn add(&mut self, item: T);
    /// Stores what was added, if anything, and empties the batch; `closing`
    /// says this is the last store before the writer stops.
    fn store(&mut self, closing: bool);
}

/// The loop of a writer thread (logs, ledger): gathers what is queued,
/// stores it as one batch, and stops on a close order (answering it once
/// everything before it is stored) or when the queue is closed and empty.
pub(crate) fn run_writer<T>(
    queue: &mpsc::Receiver<WriterMessage<T>>,
    interval: Duration,
    max: usize,
    batch: &mut impl Batch<T>,
) {
    loop {
        let (open, close) = gather(queue, interval, max, |item| batch.add(item));
        batch.store(close.is_some());
        if let Some(done) = close {
            let _ = done.send(());
            return;
        }
        if !open {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_takes_what_is_queued_up_to_a_close() {
        let (tx, rx) = mpsc::channel();
        for item in 0..3 {
            tx.send(WriterMessage::Item(item)).unwrap();
        }
        let (done, _wait) = mpsc::sync_channel(1);
        tx.send(WriterMessage::Close(done)).unwrap();
        tx.send(WriterMessage::Item(9)).unwrap();

        let mut taken = Vec::new();
        let (open, close) = gather(&rx, Duration::from_millis(1), 100, |i| taken.push(i));
        assert_eq!(taken, [0, 1, 2]);
        assert!(open && close.is_some());

        drop(tx);
        let mut rest = Vec::new();
        let (open, close) = gather(&rx, Duration::from_millis(1), 100, |i| rest.push(i));
        assert_eq!(rest, [9]);
        assert!(!open && close.is_none());
        let (open, close) = gather(&rx, Duration::ZERO, 100, |_: i32| {});
        assert!(!open && close.is_none());
    }

    #[test]
    fn gather_stops_at_the_batch_size() {
        let (tx, rx) = mpsc::channel();
        for item in 0..5 {
            tx.send(WriterMessage::Item(item)).unwrap();
        }
        let mut taken = Vec::new();
        let (open, close) = gather(&rx, Duration::from_millis(1), 2, |i| taken.push(i));
        assert_eq!(taken, [0, 1]);
        assert!(open && close.is_none());
    }
}
