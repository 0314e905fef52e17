//! Change feeds from a KV watch: what other nodes changed in a bucket,
//! as the contract's change type.
//!
//! A node tells its own feed about its own changes as soon as they commit
//! (a caller expects that), and the watch would tell them again: the
//! revisions this node committed are recorded in [`Watched::own`] while
//! the commit is in flight, and the watcher skips them.
//!
//! The KV watch skips revisions superseded before it saw them, which is
//! fine for a feed that only says "re-read this"; it must never be used as
//! an event source.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio::sync::{Mutex, broadcast, watch};

use crate::Fleet;

/// Changes a subscriber has not read yet before it lags (as the embedded
/// back-end's feeds).
const FEED_CAPACITY: usize = 1024;

/// How long the watcher waits for more entries of the same batch, so one
/// batch (one entry per key) becomes one change per name.
const COALESCE: Duration = Duration::from_millis(2);

/// How long the watcher waits before it re-creates a failed watch.
const REWATCH_PAUSE: Duration = Duration::from_millis(500);

/// A bucket whose changes feed subscribers.
pub(crate) struct Watched<C> {
    pub(crate) kv: kv::Store,
    feed: broadcast::Sender<C>,
    /// Revisions this node committed and already told its own feed about.
    /// Held across a commit, so the watcher cannot see a revision before
    /// it is recorded here.
    pub(crate) own: Mutex<BTreeSet<u64>>,
}

impl<C: Clone + PartialEq + Send + Sync + 'static> Watched<C> {
    /// Watches `kv` from now on: `change_of` says what an entry means, and
    /// `merge` adds a change to those of one batch. The watcher stops when
    /// the returned handle is aborted or the last `Arc` is dropped.
    pub(crate) async fn start(
        fleet: &Fleet,
        kv: kv::Store,
        change_of: fn(&kv::Entry) -> Option<C>,
        merge: fn(&mut Vec<C>, C),
    ) -> mayfly_store::Result<(Arc<Self>, tokio::task::JoinHandle<()>)> {
        Self::start_filtered(fleet, kv, None, change_of, merge).await
    }

    /// As [`Watched::start`], but only the keys matching `filter` (a KV key
    /// pattern such as `t.>`): a bucket holding more than the feed's state
    /// is not streamed to every node.
    pub(crate) async fn start_filtered(
        fleet: &Fleet,
        kv: kv::Store,
        filter: Option<String>,
        change_of: fn(&kv::Entry) -> Option<C>,
        merge: fn(&mut Vec<C>, C),
    ) -> mayfly_store::Result<(Arc<Self>, tokio::task::JoinHandle<()>)> {
        // The watch starts after everything already stored: those changes
        // are in the state this node reads at start-up.
        let mut stream = kv.stream.clone();
        let next = stream
            .info()
            .await
            .map_err(crate::backend)?
            .state
            .last_sequence
            + 1;
        let watched = Arc::new(Self {
            kv,
            feed: broadcast::channel(FEED_CAPACITY).0,
            own: Mutex::new(BTreeSet::new()),
        });
        let task = tokio::spawn(run(
            Arc::downgrade(&watched),
            next,
            filter,
            fleet.hub_returns(),
            change_of,
            merge,
        ));
        Ok((watched, task))
    }

    /// Tells subscribers about a change this node made.
    pub(crate) fn emit(&self, change: C) {
        // No subscriber is not an error: nobody caches this state.
        let _ = self.feed.send(change);
    }

    /// A new subscription: the changes from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<C> {
        self.feed.subscribe()
    }
}

/// Adds `change` unless the batch already has it.
pub(crate) fn dedup<C: PartialEq>(changes: &mut Vec<C>, change: C) {
    if !changes.contains(&change) {
        changes.push(change);
    }
}

/// Returns when an edge node's hub is reachable again after a loss;
/// never on a hub node, or once the fleet's connection is gone.
async fn hub_back(returns: &mut Option<watch::Receiver<u64>>) {
    if let Some(receiver) = returns.as_mut()
        && receiver.changed().await.is_ok()
    {
        return;
    }
    *returns = None;
    std::future::pending::<()>().await;
}

async fn run<C: Clone + PartialEq + Send + Sync + 'static>(
    watched: Weak<Watched<C>>,
    mut next: u64,
    filter: Option<String>,
    returns: watch::Receiver<u64>,
    change_of: fn(&kv::Entry) -> Option<C>,
    merge: fn(&mut Vec<C>, C),
) {
    let mut returns = Some(returns);
    loop {
        let watch = match watched.upgrade() {
            Some(watched) => match &filter {
                Some(filter) => watched.kv.watch_from_revision(filter, next).await,
                None => watched.kv.watch_all_from_revision(next).await,
            },
            None => return,
        };
        let mut watch = match watch {
            Ok(watch) => watch,
            Err(error) => {
                tracing::warn!(%error, "KV watch failed; retrying");
                tokio::time::sleep(REWATCH_PAUSE).await;
                continue;
            }
        };
        // At an edge node the watch's consumer lives at the hub, across
        // the leaf link. After a short cut it resumes by itself (measured:
        // a deploy made during a ~4 s cut was served 0.4-0.9 s after the
        // heal either way), but one lost at the hub during a longer cut is
        // only noticed after missed idle heartbeats (5 s; seen on the
        // token watch after a heal). So when the hub is back, the watch
        // starts again from `next` at once: nothing is skipped.
        let mut back = false;
        loop {
            let first = tokio::select! {
                first = watch.next() => first,
                () = hub_back(&mut returns) => {
                    back = true;
                    break;
                }
            };
            let Some(first) = first else {
                break;
            };
            let mut entries = vec![first];
            while let Ok(Some(more)) = tokio::time::timeout(COALESCE, watch.next()).await {
                entries.push(more);
            }
            let Some(watched) = watched.upgrade() else {
                return;
            };
            let mut changes = Vec::new();
            let mut failed = false;
            {
                let mut own = watched.own.lock().await;
                for entry in entries {
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(error) => {
                            tracing::warn!(%error, "KV watch broke; re-creating it");
                            failed = true;
                            break;
                        }
                    };
                    next = entry.revision + 1;
                    // Revisions below this one were this one's or were
                    // superseded before the watch saw them.
                    let mine = own.remove(&entry.revision);
                    *own = own.split_off(&next);
                    if mine {
                        continue;
                    }
                    if let Some(change) = change_of(&entry) {
                        merge(&mut changes, change);
                    }
                }
            }
            for change in changes {
                watched.emit(change);
            }
            if failed {
                break;
            }
        }
        // The watch ended: start again from the next revision. Tombstones
        // stay in the bucket as each key's last message, so a deletion
        // made meanwhile is still seen.
        if !back {
            tokio::time::sleep(REWATCH_PAUSE).await;
        }
    }
}
