//! Changes made to the registry and the triggers by someone else (another
//! node of a fleet sharing the store) reach this node: a task follows the
//! registry's change feed and rebuilds the function each change names from
//! the store, as a deploy or an alias move here does after its own write;
//! another follows the trigger feed and reloads the trigger cache and the
//! event workers.
//!
//! A change this node made comes back on the feed too; rebuilding it again
//! is harmless (entries still in service are reused with their tier) and
//! cheap (three store reads), which keeps one path for every change.

use std::sync::Arc;
use std::time::Duration;

use mayfly_store::{ChangeFeed, RegistryChange, TriggerChange};
use tokio_util::sync::CancellationToken;

use super::Deployments;
use crate::feeds::{self, Heard};

/// The first wait before applying a failed change again; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl Deployments {
    /// Follows the registry's `feed` until `stop`: each change rebuilds (or
    /// drops) the function it names; a feed that fell behind rebuilds every
    /// function.
    pub(crate) fn follow(
        self: &Arc<Self>,
        feed: ChangeFeed<RegistryChange>,
        stop: CancellationToken,
    ) {
        let deployments = self.clone();
        let retries = stop.clone();
        feeds::follow("registry", feed, stop, move |heard| {
            let deployments = deployments.clone();
            let stop = retries.clone();
            async move {
                match heard {
                    Heard::Change(
                        RegistryChange::Changed { function } | RegistryChange::Deleted { function },
                    ) => deployments.converge_or_retry(&function, &stop).await,
                    Heard::Missed => deployments.converge_all(&stop).await,
                }
            }
        });
    }

    /// Follows the trigger feed until `stop`: an attached or detached
    /// trigger (or a function's triggers removed) reloads the trigger cache
    /// and starts or stops event workers to match. A schedule firing needs
    /// nothing: the store decides which node fires a slot.
    pub(crate) fn follow_triggers(
        self: &Arc<Self>,
        feed: ChangeFeed<TriggerChange>,
        stop: CancellationToken,
    ) {
        let deployments = self.clone();
        let retries = stop.clone();
        feeds::follow("trigger", feed, stop, move |heard| {
            let deployments = deployments.clone();
            let stop = retries.clone();
            async move {
                if matches!(heard, Heard::Change(TriggerChange::Fired { .. })) {
                    return;
                }
                // Retried here, in the feed's task: later trigger changes
                // wait, and the first reload that works brings them all.
                let mut backoff = RETRY_FIRST;
                loop {
                    match deployments.parts.events.refresh_triggers().await {
                        Ok(()) => break deployments.parts.workers.sync(),
                        Err(error) => tracing::warn!(
                            "cannot reload the triggers after a change in the store, \
                             retrying in {backoff:?}: {error}"
                        ),
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        });
    }

    /// Makes the catalog serve `name` as the store has it now: rebuilt if
    /// it exists (compiling only missing artifacts), dropped if it is gone.
    async fn converge(&self, name: &str) -> anyhow::Result<()> {
        let _change = self.changes.lock().await;
        let prior = self.parts.catalog.load().by_name.get(name).cloned();
        match self.parts.registry.function(name).await? {
            // Placed elsewhere: nothing to compile or load here.
            Some(record) if !self.runs_here(&record.live.config.placement) => {
                let remote =
                    super::remote_function(&record.name, record.live.version, &record.live.config)?;
                self.swap_in_remote(remote);
            }
            Some(record) => {
                let served = self.restore(record, prior.as_deref()).await?;
                self.swap_in(served, prior.as_deref());
            }
            None if prior.is_some() || self.parts.catalog.load().remote.contains_key(name) => {
                self.forget(name)
            }
            None => return Ok(()),
        }
        self.count_functions();
        self.parts.workers.sync();
        Ok(())
    }

    /// Converges `name`; if that fails (the store out of reach for a
    /// moment, a download cut by a server's failover), a background task
    /// tries again with backoff until it works or `stop`: nothing else
    /// would bring the change here before the function's next one, and
    /// the follower must not stall other functions' changes meanwhile.
    async fn converge_or_retry(self: &Arc<Self>, name: &str, stop: &CancellationToken) {
        let Err(error) = self.converge(name).await else {
            return;
        };
        tracing::warn!(
            function = name,
            "cannot apply a change from the store, retrying: {error:#}"
        );
        {
            let mut retrying = self.retrying.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(failed_again) = retrying.get_mut(name) {
                // Its task tries again, reading the store afresh.
                *failed_again = true;
                return;
            }
            retrying.insert(name.to_string(), false);
        }
        let (deployments, name, stop) = (self.clone(), name.to_string(), stop.clone());
        tokio::spawn(async move {
            let mut backoff = RETRY_FIRST;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                let result = deployments.converge(&name).await;
                let mut retrying = deployments
                    .retrying
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let failed_again = retrying.get(&name).copied().unwrap_or(false);
                match result {
                    // Done, unless the follower failed on a newer change
                    // meanwhile: checked under the lock it sets that under.
                    Ok(()) if !failed_again => {
                        retrying.remove(&name);
                        tracing::info!(function = %name, "applied the store's change after retrying");
                        return;
                    }
                    Ok(()) => {}
                    Err(error) => tracing::warn!(
                        function = %name,
                        "cannot apply a change from the store, retrying in {backoff:?}: {error:#}"
                    ),
                }
                retrying.insert(name.clone(), false);
                drop(retrying);
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            deployments
                .retrying
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
        });
    }

    /// Converges every function the store or the catalog knows.
    async fn converge_all(self: &Arc<Self>, stop: &CancellationToken) {
        let mut names: Vec<String> = {
            let catalog = self.parts.catalog.load();
            catalog
                .by_name
                .keys()
                .chain(catalog.remote.keys())
                .cloned()
                .collect()
        };
        match self.parts.registry.functions().await {
            Ok(records) => names.extend(records.into_iter().map(|record| record.name)),
            Err(error) => tracing::error!("cannot list functions to re-read them: {error}"),
        }
        names.sort_unstable();
        names.dedup();
        for name in names {
            self.converge_or_retry(&name, stop).await;
        }
    }
}
