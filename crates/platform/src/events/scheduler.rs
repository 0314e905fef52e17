//! The scheduler: fires schedule triggers into their functions' inboxes.
//!
//! A firing and the trigger's new "last fired" time are one transaction,
//! so a crash never fires a slot twice nor loses one; after downtime a
//! missed run fires once (the slot that was missed first), not once per
//! missed slot.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mayfly_store::{CloudEvent, TriggerSource};

use super::dispatch::rfc3339_millis;
use super::{EventHub, WorkerKey};
use crate::clock::now_ms;
use crate::schedule::Schedule;

/// Longest the scheduler sleeps; schedule changes wake it earlier.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Runs until the node shuts down.
pub(super) async fn run(hub: Arc<EventHub>) {
    // Parsed once per expression rather than on every pass.
    let mut parsed: HashMap<String, Option<Schedule>> = HashMap::new();
    loop {
        if hub.shutdown.is_cancelled() {
            return;
        }
        let now = now_ms();
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
            let mut last = trigger.last_fired_ms.unwrap_or(trigger.created_ms);
            if let Some(slot) = schedule.due(last, now) {
                let event =
                    CloudEvent::schedule(trigger, schedule.as_str(), slot, &rfc3339_millis(slot));
                let result = hub
                    .trigger_store()
                    .fire_schedule(trigger, &event, now)
                    .await;
                match result {
                    Ok(true) => {
                        fired = true;
                        last = now;
                        hub.wake(WorkerKey::Inbox(&trigger.function));
                    }
                    // Removed, or fired since this copy was read: reload.
                    Ok(false) => fired = true,
                    Err(error) => {
                        tracing::error!(trigger = trigger.id, "cannot fire schedule: {error}")
                    }
                }
            }
            if let Some(next) = schedule.next_after(last.max(now)) {
                next_wake = next_wake.min(next);
            }
        }
        if fired {
            // Pick up the new "last fired" times.
            if let Err(error) = hub.refresh_triggers().await {
                tracing::error!("cannot reload triggers: {error}");
                // The stale copy cannot fire twice (each firing checks the
                // last one), but do not spin on it.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            continue;
        }
        let wait = Duration::from_millis(u64::try_from(next_wake - now_ms()).unwrap_or(0));
        let shutdown = hub.shutdown.clone();
        let changed = hub.schedules_changed.clone();
        tokio::select! {
            () = tokio::time::sleep(wait.min(MAX_SLEEP)) => {}
            () = changed.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}
