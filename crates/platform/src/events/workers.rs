//! Which event workers run: the scheduler, and one dispatch worker per
//! deployed function's inbox and per queue trigger, started and stopped as
//! functions and triggers come and go.

use std::sync::Arc;

use mayfly_store::TriggerSource;
use tokio::sync::Notify;

use super::dispatch::{self, Consumer, Dispatcher};
use super::{EventHub, Worker, scheduler};
use crate::feeds::Heard;
use crate::invoker::Invoker;

/// Starts, stops and joins the event workers of a node.
pub(crate) struct EventWorkers {
    hub: Arc<EventHub>,
    dispatcher: Arc<Dispatcher>,
}

impl EventWorkers {
    /// Workers that consume `hub`'s queues and deliver through `invoker`.
    pub(crate) fn new(hub: Arc<EventHub>, invoker: Arc<Invoker>) -> Self {
        let dispatcher = Arc::new(Dispatcher {
            hub: hub.clone(),
            invoker,
        });
        Self { hub, dispatcher }
    }

    /// Starts delivering: deliveries a previous run left leased are released
    /// (it crashed or was stopped mid-delivery), then the scheduler and one
    /// worker per inbox and queue trigger start.
    pub(crate) async fn start(&self) -> anyhow::Result<()> {
        let released = self.hub.queue_store().release_leases().await?;
        if released > 0 {
            tracing::info!("{released} events in flight at the last stop will be delivered again");
        }
        if let Some(hints) = self.hub.take_work_hints() {
            // Another node stored work (or made some due again): wake its
            // consumers here too, so the fleet shares it at once rather
            // than at the next idle poll. A hint due later still wakes now:
            // the worker then reads when to look again from the store.
            let hub = self.hub.clone();
            crate::feeds::follow("work hint", hints, hub.shutdown.clone(), move |heard| {
                match heard {
                    Heard::Change(hint) => hub.wake_consumers(&hint.queue),
                    Heard::Missed => hub.wake_all(),
                }
                std::future::ready(())
            });
        }
        let task = tokio::spawn(scheduler::run(
            self.hub.clone(),
            Arc::new(crate::clock::SystemClock),
        ));
        *self.hub.scheduler.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        self.sync();
        Ok(())
    }

    /// Starts the workers that should run and stops those that should not:
    /// one per deployed function (its inbox) and one per queue trigger.
    pub(crate) fn sync(&self) {
        // Under the lock, so two calls cannot undo each other with older
        // snapshots.
        let mut workers = self.hub.workers.lock().unwrap_or_else(|p| p.into_inner());
        let catalog = self.dispatcher.invoker.catalog();
        let triggers = self.hub.triggers.load();
        let queue_triggers = || {
            triggers
                .iter()
                .filter_map(|trigger| match &trigger.spec.source {
                    TriggerSource::Queue {
                        queue,
                        batch_size,
                        max_concurrency,
                    } if catalog.by_name.contains_key(&trigger.function) => {
                        Some((trigger, queue, *batch_size, *max_concurrency))
                    }
                    _ => None,
                })
        };
        let keep = |worker: &Worker, wanted: bool| {
            let keep = wanted && !worker.task.is_finished();
            if !keep {
                worker.stop.cancel();
            }
            keep
        };
        workers
            .inboxes
            .retain(|name, worker| keep(worker, catalog.by_name.contains_key(name)));
        let wanted: std::collections::HashSet<i64> =
            queue_triggers().map(|(trigger, ..)| trigger.id).collect();
        workers
            .triggers
            .retain(|id, worker| keep(worker, wanted.contains(id)));
        for name in catalog.by_name.keys() {
            if !workers.inboxes.contains_key(name) {
                let worker = self.spawn_worker(Consumer::inbox(name));
                workers.inboxes.insert(name.clone(), worker);
            }
        }
        for (trigger, queue, batch_size, max_concurrency) in queue_triggers() {
            if let std::collections::hash_map::Entry::Vacant(slot) =
                workers.triggers.entry(trigger.id)
            {
                let consumer = Consumer::queue(trigger, queue, batch_size, max_concurrency);
                slot.insert(self.spawn_worker(consumer));
            }
        }
    }

    fn spawn_worker(&self, consumer: Consumer) -> Worker {
        let wake = Arc::new(Notify::new());
        let stop = self.hub.shutdown.child_token();
        let task = tokio::spawn(dispatch::run(
            self.dispatcher.clone(),
            consumer,
            wake.clone(),
            stop.clone(),
        ));
        Worker { wake, stop, task }
    }

    /// Waits for the workers and the scheduler to finish, until `deadline`
    /// at most (events whose results were not recorded are delivered again
    /// at the next start).
    pub(crate) async fn join(&self, deadline: tokio::time::Instant) {
        let mut tasks: Vec<_> = {
            let mut workers = self.hub.workers.lock().unwrap_or_else(|p| p.into_inner());
            let inboxes = std::mem::take(&mut workers.inboxes).into_values();
            let triggers = std::mem::take(&mut workers.triggers).into_values();
            inboxes.chain(triggers).map(|worker| worker.task).collect()
        };
        if let Some(task) = self
            .hub
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            tasks.push(task);
        }
        if tokio::time::timeout_at(deadline, futures::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!(
                "event workers still busy at shutdown: their events will be redelivered"
            );
        }
    }
}
