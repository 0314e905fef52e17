//! Following a store's change feed: one task per feed, ended with the node.

use std::future::Future;

use mayfly_store::ChangeFeed;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

/// What a follower hears: a change, or that it fell behind and missed some
/// (so it must re-read everything, as after a reconnect).
pub(crate) enum Heard<T> {
    Change(T),
    Missed,
}

/// Spawns a task that hands every change of `feed` to `on`, one at a time,
/// until `stop` is cancelled or the feed closes.
pub(crate) fn follow<T, F, Fut>(
    what: &'static str,
    mut feed: ChangeFeed<T>,
    stop: CancellationToken,
    mut on: F,
) where
    T: Clone + Send + 'static,
    F: FnMut(Heard<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                () = stop.cancelled() => return,
                change = feed.recv() => change,
            };
            let heard = match change {
                Ok(change) => Heard::Change(change),
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "the {what} feed fell behind: re-reading everything");
                    Heard::Missed
                }
                Err(RecvError::Closed) => return,
            };
            on(heard).await;
        }
    });
}
