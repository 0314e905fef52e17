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

use mayfly_store::{ChangeFeed, RegistryChange, TriggerChange};
use tokio_util::sync::CancellationToken;

use super::Deployments;
use crate::feeds::{self, Heard};

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
        feeds::follow("registry", feed, stop, move |heard| {
            let deployments = deployments.clone();
            async move {
                match heard {
                    Heard::Change(
                        RegistryChange::Changed { function } | RegistryChange::Deleted { function },
                    ) => deployments.converge_logged(&function).await,
                    Heard::Missed => deployments.converge_all().await,
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
        feeds::follow("trigger", feed, stop, move |heard| {
            let deployments = deployments.clone();
            async move {
                if matches!(heard, Heard::Change(TriggerChange::Fired { .. })) {
                    return;
                }
                match deployments.parts.events.refresh_triggers().await {
                    Ok(()) => deployments.parts.workers.sync(),
                    Err(error) => tracing::error!(
                        "cannot reload the triggers after a change in the store: {error}"
                    ),
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
            Some(record) => {
                let served = self.restore(record, prior.as_deref()).await?;
                self.swap_in(served, prior.as_deref());
            }
            None if prior.is_some() => self.forget(name),
            None => return Ok(()),
        }
        self.count_functions();
        self.parts.workers.sync();
        Ok(())
    }

    async fn converge_logged(&self, name: &str) {
        if let Err(error) = self.converge(name).await {
            // The store keeps the change: the next change to the function,
            // or a restart, brings it in.
            tracing::error!(
                function = name,
                "cannot apply a change from the store: {error:#}"
            );
        }
    }

    /// Converges every function the store or the catalog knows.
    async fn converge_all(&self) {
        let mut names: Vec<String> = self.parts.catalog.load().by_name.keys().cloned().collect();
        match self.parts.registry.functions().await {
            Ok(records) => names.extend(records.into_iter().map(|record| record.name)),
            Err(error) => tracing::error!("cannot list functions to re-read them: {error}"),
        }
        names.sort_unstable();
        names.dedup();
        for name in names {
            self.converge_logged(&name).await;
        }
    }
}
