//! The scheduler: fires schedule triggers into their functions' inboxes.
//!
//! A firing and the trigger's new "last fired" slot are one transaction,
//! so a crash never fires a slot twice nor loses one. What is recorded is
//! the slot's scheduled time, not the time the firing happened: `@every`
//! slots stay on their grid (the trigger's creation + k × interval) however
//! late a firing runs, and every node of a fleet computes the same slot
//! times, so the store's compare-and-swap on the last slot lets exactly one
//! of them fire each. After downtime only the latest missed slot fires (see
//! [`Schedule::due`]).
//!
//! The next wake-up is the earliest pending slot of any trigger, computed
//! from each trigger's own last slot: adding or removing another trigger
//! wakes the scheduler early but never pushes a pending slot later.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mayfly_store::{CloudEvent, TriggerSource};

use super::dispatch::rfc3339_millis;
use super::{EventHub, WorkerKey};
use crate::clock::Clock;
use crate::schedule::Schedule;

/// Longest the scheduler sleeps; schedule changes wake it earlier.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// How long to wait before trying again a slot whose firing failed.
const RETRY_FAILED: Duration = Duration::from_secs(1);

/// Runs until the node shuts down, reading time from `clock`.
pub(super) async fn run(hub: Arc<EventHub>, clock: Arc<dyn Clock>) {
    // Parsed once per expression rather than on every pass.
    let mut parsed: HashMap<String, Option<Schedule>> = HashMap::new();
    loop {
        if hub.shutdown.is_cancelled() {
            return;
        }
        let now = clock.now_ms();
        let mut next_wake = now.saturating_add(MAX_SLEEP.as_millis() as i64);
        let mut fired = false;
        for trigger in hub.triggers.load().iter() {
            let TriggerSource::Schedule { schedule } = &trigger.spec.source else {
                continue;
            };
            let Some(schedule) = parsed
                .entry(schedule.clone())
                .or_insert_with(|| Schedule::parse(schedule).ok())
            else {
                continue;
            };
            let anchor = trigger.created_ms;
            let mut last = trigger.last_fired_ms.unwrap_or(anchor);
            if let Some(slot) = schedule.due(anchor, last, now) {
                let event =
                    CloudEvent::schedule(trigger, schedule.as_str(), slot, &rfc3339_millis(slot));
                let result = hub
                    .trigger_store()
                    .fire_schedule(trigger, &event, slot)
                    .await;
                match result {
                    Ok(true) => {
                        fired = true;
                        last = slot;
                        hub.wake(WorkerKey::Inbox(&trigger.function));
                    }
                    // Removed, or fired since this copy was read (here or
                    // on another node): reload.
                    Ok(false) => fired = true,
                    Err(error) => {
                        tracing::error!(trigger = trigger.id, "cannot fire schedule: {error}")
                    }
                }
            }
            if let Some(next) = schedule.next_after(anchor, last) {
                // A slot still due here is one whose firing failed just now.
                let next = if next <= now {
                    now.saturating_add(RETRY_FAILED.as_millis() as i64)
                } else {
                    next
                };
                next_wake = next_wake.min(next);
            }
        }
        if fired {
            // Pick up the new "last fired" slots.
            if let Err(error) = hub.refresh_triggers().await {
                tracing::error!("cannot reload triggers: {error}");
                // The stale copy cannot fire twice (each firing checks the
                // last one), but do not spin on it.
                tokio::time::sleep(RETRY_FAILED).await;
            }
            continue;
        }
        let shutdown = hub.shutdown.clone();
        let changed = hub.schedules_changed.clone();
        tokio::select! {
            () = clock.sleep_until(next_wake) => {}
            () = changed.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use mayfly_store::{QueueRef, Stores, TriggerSpec};

    use super::*;
    use crate::clock::ManualClock;
    use crate::event_metrics::EventMetrics;

    /// Longest a test waits (in real time) for the scheduler to act.
    const PATIENCE: Duration = Duration::from_secs(20);

    fn spec(schedule: &str) -> TriggerSpec {
        serde_json::from_value(serde_json::json!({
            "source": {"kind": "schedule", "schedule": schedule}
        }))
        .unwrap()
    }

    /// The scheduler over a real SQLite event store, on a clock the test sets.
    struct Harness {
        hub: Arc<EventHub>,
        clock: Arc<ManualClock>,
        task: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        /// The last slot trigger `id` fired, as the store has it.
        async fn last_fired(&self, id: i64) -> Option<i64> {
            let triggers = self.hub.trigger_store().triggers(None).await.unwrap();
            triggers.iter().find(|t| t.id == id).unwrap().last_fired_ms
        }

        /// Events waiting in `function`'s inbox.
        async fn inbox(&self, function: &str) -> u64 {
            let depths = self.hub.queue_store().depths().await.unwrap();
            depths
                .iter()
                .find(|(queue, _)| *queue == QueueRef::Inbox(function.to_string()))
                .map_or(0, |(_, depth)| *depth)
        }

        /// Sets the clock to `now`, then waits until trigger `id` has fired
        /// exactly `slot` (polling the store, with a deadline).
        async fn fires_at(&self, now: i64, id: i64, slot: i64) {
            self.clock.set(now);
            let deadline = Instant::now() + PATIENCE;
            loop {
                let last = self.last_fired(id).await;
                if last == Some(slot) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "at {now} trigger {id} should have fired slot {slot}; its last is {last:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_fires_on_its_grid_whatever_else_changes() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::sqlite(dir.path()).unwrap();
        let metrics = EventMetrics::register(&mut prometheus_client::registry::Registry::default());
        let hub = Arc::new(EventHub::open(&stores, metrics).await.unwrap());
        let (every, _) = hub.add_trigger("tick", spec("@every 30s")).await.unwrap();
        let created = every.created_ms;
        let clock = Arc::new(ManualClock::new(created + 10_000));
        let task = tokio::spawn(run(hub.clone(), clock.clone()));
        let h = Harness {
            hub,
            clock,
            task,
            _dir: dir,
        };
        let id = every.id;

        // The first slot is a whole interval after the creation.
        h.fires_at(created + 30_000, id, created + 30_000).await;
        assert_eq!(h.inbox("tick").await, 1);

        // Another trigger attached mid-interval wakes the scheduler, which
        // must still wake for the pending slot at +60 s, not 30 s from now.
        h.clock.set(created + 45_000);
        let (other, _) = h.hub.add_trigger("other", spec("@every 1h")).await.unwrap();
        h.fires_at(created + 60_000, id, created + 60_000).await;

        // A firing 5 s late keeps the grid: the next slot is +120 s, not +125 s.
        h.fires_at(created + 95_000, id, created + 90_000).await;
        h.fires_at(created + 120_000, id, created + 120_000).await;
        assert_eq!(h.inbox("tick").await, 4, "one event per slot");

        // Removing the other trigger does not delay the next slot either.
        h.clock.set(created + 130_000);
        h.hub.remove_trigger(other.id).await.unwrap();
        h.fires_at(created + 150_000, id, created + 150_000).await;

        // Downtime over six slots: one catch-up, for the latest missed slot.
        h.fires_at(created + 330_400, id, created + 330_000).await;
        assert_eq!(h.inbox("tick").await, 6, "missed slots fire once in all");
        h.fires_at(created + 360_000, id, created + 360_000).await;
        assert_eq!(h.inbox("tick").await, 7);
        assert_eq!(h.inbox("other").await, 0);

        h.hub.stop();
        tokio::time::timeout(PATIENCE, h.task)
            .await
            .expect("the scheduler stops")
            .unwrap();
    }
}
