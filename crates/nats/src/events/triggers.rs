//! Triggers, `t.<id>`, and schedules that fire once per slot across the
//! fleet.
//!
//! Deviation from docs/fleet-design.md §4 ("Schedules fire once per
//! slot"): no `Nats-Msg-Id` dedup window. A schedule's last run is kept in
//! its trigger record, and `fire_schedule` commits the record (expecting
//! the revision it read) together with the event in one batch: of two
//! nodes firing the same slot, one batch lands, the other fails and finds
//! the run recorded. This holds however far apart the nodes fire.

use async_nats::jetstream::kv::{Entry, Operation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use mayfly_store::{
    ChangeFeed, CloudEvent, InboxEvent, QueueRef, Result, StoreError, Trigger, TriggerChange,
    TriggerSource, TriggerSpec, TriggerStore,
};

use super::queue::{Message, dead_prefix, message_key, queue_pattern};
use super::{COUNTER, MAX_CONFLICTS, NatsEvents, json, now_ms, parse, token, too_busy, untoken};
use crate::batch::Write;

/// A stored trigger and the change its last write made, for the feed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    trigger: Trigger,
    /// Written by a schedule's run (not by attaching it).
    #[serde(default)]
    fired: bool,
}

fn trigger_key(id: i64) -> String {
    format!("t.{id:020}")
}

fn spec_prefix(function: &str) -> String {
    format!("s.f{}", token(function))
}

/// `s.f<function>.<sha256 of the spec's canonical JSON>`: the same spec
/// however it was spelled (parsed, then written in field order).
fn spec_key(function: &str, spec: &TriggerSpec) -> Result<String> {
    let text = serde_json::to_string(spec)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode trigger: {e}")))?;
    Ok(format!(
        "{}.{}",
        spec_prefix(function),
        hex::encode(Sha256::digest(text.as_bytes()))
    ))
}

const REMOVED_PREFIX: &str = "t.rm.";

/// What another node's write to `t.>` means to this node's feed.
pub(super) fn change_of(entry: &Entry) -> Option<TriggerChange> {
    if let Some(function) = entry.key.strip_prefix(REMOVED_PREFIX) {
        let function = function.strip_prefix('f').and_then(|t| untoken(t).ok())?;
        return (entry.operation == Operation::Put)
            .then_some(TriggerChange::FunctionRemoved { function });
    }
    let id: i64 = entry.key.strip_prefix("t.")?.parse().ok()?;
    if entry.operation != Operation::Put {
        return Some(TriggerChange::Removed { id });
    }
    let record: Record = serde_json::from_slice(&entry.value).ok()?;
    Some(match (record.fired, record.trigger.last_fired_ms) {
        (true, Some(fired_ms)) => TriggerChange::Fired { id, fired_ms },
        _ => TriggerChange::Added {
            id,
            function: record.trigger.function,
        },
    })
}

impl NatsEvents {
    /// A trigger by id, with its revision.
    async fn trigger(&self, id: i64) -> Result<Option<(Trigger, u64)>> {
        let (found, _) = self.hub.read(&trigger_key(id)).await?;
        match found {
            None => Ok(None),
            Some(found) => Ok(Some((parse::<Record>(&found)?.trigger, found.revision))),
        }
    }

    /// Every trigger, in id order. Read at each write: a trigger attached
    /// on any node a moment ago is seen (SQLite reads them in the writing
    /// transaction; here one attached during the write may miss it).
    pub(super) async fn all_triggers(&self) -> Result<Vec<Trigger>> {
        let mut triggers = Vec::new();
        for found in self.hub.scan("t.>").await? {
            if found.key.starts_with(REMOVED_PREFIX) {
                continue;
            }
            triggers.push(parse::<Record>(&found)?.trigger);
        }
        triggers.sort_by_key(|t| t.id);
        Ok(triggers)
    }

    /// Commits a batch touching triggers: its revisions are recorded as
    /// this node's while it is in flight, so the feed's watcher does not
    /// tell them twice; `change` is told at once.
    async fn commit_told(&self, writes: &[Write], change: TriggerChange) -> Result<bool> {
        let mut own = self.triggers.own.lock().await;
        match self.hub.commit(writes).await? {
            Some(done) => {
                own.extend(done.first..=done.last);
                drop(own);
                self.triggers.emit(change);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[async_trait::async_trait]
impl TriggerStore for NatsEvents {
    async fn add_trigger(&self, function: &str, spec: &TriggerSpec) -> Result<(Trigger, bool)> {
        let spec_key = spec_key(function, spec)?;
        for _ in 0..MAX_CONFLICTS {
            let (existing, spec_revision) = self.hub.read(&spec_key).await?;
            if let Some(existing) = existing {
                let id = std::str::from_utf8(&existing.value)
                    .ok()
                    .and_then(|id| id.parse().ok())
                    .ok_or_else(|| StoreError::Corrupt(format!("`{spec_key}` is unreadable")))?;
                if let Some((trigger, _)) = self.trigger(id).await? {
                    return Ok((trigger, false));
                }
            }
            let (last, counter) = self.hub.counter().await?;
            let now = now_ms();
            let trigger = Trigger {
                id: last + 1,
                function: function.to_string(),
                spec: spec.clone(),
                created_ms: now,
                last_fired_ms: matches!(spec.source, TriggerSource::Schedule { .. }).then_some(now),
            };
            let record = Record {
                trigger: trigger.clone(),
                fired: false,
            };
            let writes = [
                Write::put(COUNTER, trigger.id.to_string()).expect(counter),
                Write::put(spec_key.clone(), trigger.id.to_string()).expect(spec_revision),
                Write::put(trigger_key(trigger.id), json(&record)?).expect(0),
            ];
            let added = TriggerChange::Added {
                id: trigger.id,
                function: function.to_string(),
            };
            if self.commit_told(&writes, added).await? {
                return Ok((trigger, true));
            }
        }
        Err(too_busy("attaching a trigger"))
    }

    async fn triggers(&self, function: Option<&str>) -> Result<Vec<Trigger>> {
        let mut triggers = self.all_triggers().await?;
        if let Some(function) = function {
            triggers.retain(|t| t.function == function);
        }
        Ok(triggers)
    }

    async fn remove_trigger(&self, id: i64) -> Result<bool> {
        for _ in 0..MAX_CONFLICTS {
            let Some((trigger, revision)) = self.trigger(id).await? else {
                return Ok(false);
            };
            let spec_key = spec_key(&trigger.function, &trigger.spec)?;
            let (spec, spec_revision) = self.hub.read(&spec_key).await?;
            let mut writes = vec![Write::delete(trigger_key(id)).expect(revision)];
            if spec.is_some() {
                writes.push(Write::delete(spec_key).expect(spec_revision));
            }
            if self
                .commit_told(&writes, TriggerChange::Removed { id })
                .await?
            {
                return Ok(true);
            }
        }
        Err(too_busy("detaching a trigger"))
    }

    async fn remove_function(&self, function: &str) -> Result<()> {
        // Triggers first, so no new event reaches the inbox being emptied
        // (a write that read them just before may still land one).
        for trigger in self.triggers(Some(function)).await? {
            self.hub.erase(&trigger_key(trigger.id)).await?;
        }
        self.hub
            .erase(&format!("{}.>", spec_prefix(function)))
            .await?;
        self.hub
            .erase(&queue_pattern(&QueueRef::Inbox(function.to_string())))
            .await?;
        self.hub
            .erase(&format!("{}.>", dead_prefix(function)))
            .await?;
        let marker = Write::put(format!("{REMOVED_PREFIX}f{}", token(function)), "");
        let removed = TriggerChange::FunctionRemoved {
            function: function.to_string(),
        };
        self.commit_told(&[marker], removed).await?;
        Ok(())
    }

    async fn fire_schedule(
        &self,
        trigger: &Trigger,
        event: &CloudEvent,
        fired_ms: i64,
    ) -> Result<bool> {
        let inbox_event = InboxEvent {
            event: event.clone(),
            path: None,
            trigger_id: Some(trigger.id),
            retry: trigger.spec.retry,
        };
        let inbox = QueueRef::Inbox(trigger.function.clone());
        for _ in 0..MAX_CONFLICTS {
            let Some((mut stored, revision)) = self.trigger(trigger.id).await? else {
                return Ok(false);
            };
            // Fired since the caller read it (here or on another node).
            if stored.last_fired_ms != trigger.last_fired_ms {
                return Ok(false);
            }
            stored.last_fired_ms = Some(fired_ms);
            let record = Record {
                trigger: stored,
                fired: true,
            };
            let (last, counter) = self.hub.counter().await?;
            let message = Message::inbox(&inbox_event, None, fired_ms);
            let writes = [
                Write::put(trigger_key(trigger.id), json(&record)?).expect(revision),
                Write::put(message_key(&inbox, last + 1), json(&message)?).expect(0),
                Write::put(COUNTER, (last + 1).to_string()).expect(counter),
            ];
            let fired = TriggerChange::Fired {
                id: trigger.id,
                fired_ms,
            };
            if self.commit_told(&writes, fired).await? {
                self.hints
                    .publish(&self.hub.domain, [(inbox.clone(), message.visible_at_ms)])
                    .await;
                return Ok(true);
            }
        }
        Err(too_busy("firing a schedule"))
    }

    fn watch(&self) -> ChangeFeed<TriggerChange> {
        self.triggers.subscribe()
    }
}
