//! What events mean, independent of where they are stored: the kinds of
//! event Mayfly produces, their CloudEvent attributes, and which triggers a
//! change reaches. Every back-end builds its events here, so a KV put reads
//! the same to a function whichever store took it.

use super::{CloudEvent, InboxEvent, ObjectChange, ObjectMeta, Trigger, TriggerSource};
use crate::{Result, StoreError};

/// Every kind of event Mayfly delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A schedule trigger fired.
    Schedule,
    /// An object was written (created or replaced).
    ObjectCreated,
    /// An object was deleted.
    ObjectDeleted,
    /// A KV key was put.
    KvPut,
    /// A KV key was deleted.
    KvDelete,
    /// A message of a named queue.
    QueueMessage,
    /// An asynchronous invocation through the admin API.
    AsyncInvoke,
}

impl EventKind {
    /// Every kind, for lookups by type.
    pub const ALL: [Self; 7] = [
        Self::Schedule,
        Self::ObjectCreated,
        Self::ObjectDeleted,
        Self::KvPut,
        Self::KvDelete,
        Self::QueueMessage,
        Self::AsyncInvoke,
    ];

    /// Its CloudEvent `type` (`ce-type`), e.g. `dev.mayfly.kv.put`.
    pub fn cloud_event_type(self) -> &'static str {
        match self {
            Self::Schedule => "dev.mayfly.schedule",
            Self::ObjectCreated => "dev.mayfly.object.created",
            Self::ObjectDeleted => "dev.mayfly.object.deleted",
            Self::KvPut => "dev.mayfly.kv.put",
            Self::KvDelete => "dev.mayfly.kv.delete",
            Self::QueueMessage => "dev.mayfly.queue.message",
            Self::AsyncInvoke => "dev.mayfly.invoke",
        }
    }

    /// What the usage ledger records as the invocation's trigger.
    pub fn ledger_label(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::ObjectCreated | Self::ObjectDeleted => "object",
            Self::KvPut | Self::KvDelete => "kv",
            Self::QueueMessage => "queue",
            Self::AsyncInvoke => "async",
        }
    }

    /// The kind whose CloudEvent type is `ty`.
    pub fn from_cloud_event_type(ty: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.cloud_event_type() == ty)
    }

    /// The ledger label of an event of type `ty`; `event` for a type this
    /// node does not produce.
    pub fn ledger_label_of(ty: &str) -> &'static str {
        Self::from_cloud_event_type(ty).map_or("event", Self::ledger_label)
    }
}

/// A fresh event id: a UUIDv7 without dashes, so ids sort by creation.
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

impl CloudEvent {
    /// A named queue's message, as it is stored by `send` (the subject, the
    /// message id, is given when it is read).
    pub fn queue_message(
        queue: &str,
        content_type: Option<String>,
        data: Vec<u8>,
        now_ms: i64,
    ) -> Self {
        Self::fresh(
            EventKind::QueueMessage,
            format!("/queues/{queue}"),
            content_type,
            data,
            now_ms,
        )
    }

    /// A schedule trigger's firing for the slot `slot_ms`; `scheduled_time`
    /// is that slot as RFC 3339.
    pub fn schedule(trigger: &Trigger, schedule: &str, slot_ms: i64, scheduled_time: &str) -> Self {
        Self {
            id: new_event_id(),
            ty: EventKind::Schedule.cloud_event_type().into(),
            source: format!("/schedules/{}", trigger.id),
            subject: None,
            time_ms: slot_ms,
            content_type: Some("application/json".into()),
            data: serde_json::json!({
                "schedule": schedule,
                "scheduled_time": scheduled_time,
            })
            .to_string()
            .into_bytes(),
        }
    }

    /// An asynchronous invocation of `function`.
    pub fn async_invoke(
        function: &str,
        content_type: Option<String>,
        data: Vec<u8>,
        now_ms: i64,
    ) -> Self {
        let source = format!("/functions/{function}");
        Self::fresh(EventKind::AsyncInvoke, source, content_type, data, now_ms)
    }

    /// A new event of `kind` with a fresh id and no subject.
    fn fresh(
        kind: EventKind,
        source: String,
        content_type: Option<String>,
        data: Vec<u8>,
        now_ms: i64,
    ) -> Self {
        Self {
            id: new_event_id(),
            ty: kind.cloud_event_type().into(),
            source,
            subject: None,
            time_ms: now_ms,
            content_type,
            data,
        }
    }
}

/// A change to a bucket that triggers may watch. A store writes the change
/// and the events [`BucketChange::fan_out`] gives in one atomic step, so
/// no acknowledged change loses its events.
#[derive(Debug, Clone, Copy)]
pub enum BucketChange<'a> {
    /// A KV key was put (`value`) or deleted (`None`).
    Kv {
        /// The bucket.
        bucket: &'a str,
        /// The key.
        key: &'a str,
        /// The new value; `None` for a delete.
        value: Option<&'a [u8]>,
    },
    /// An object was created or deleted; `meta` describes it.
    Object {
        /// The object (for a delete, as it was, with the time of the delete).
        meta: &'a ObjectMeta,
        /// Which change.
        change: ObjectChange,
    },
}

impl BucketChange<'_> {
    /// The event kind it produces.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Kv { value: Some(_), .. } => EventKind::KvPut,
            Self::Kv { value: None, .. } => EventKind::KvDelete,
            Self::Object {
                change: ObjectChange::Created,
                ..
            } => EventKind::ObjectCreated,
            Self::Object {
                change: ObjectChange::Deleted,
                ..
            } => EventKind::ObjectDeleted,
        }
    }

    /// The [`TriggerSource::kind`] of the triggers that may watch it.
    pub fn trigger_kind(&self) -> &'static str {
        match self {
            Self::Kv { .. } => "kv",
            Self::Object { .. } => "object",
        }
    }

    /// The bucket changed: the [`TriggerSource::target`] of its watchers.
    pub fn bucket(&self) -> &str {
        match self {
            Self::Kv { bucket, .. } => bucket,
            Self::Object { meta, .. } => &meta.bucket,
        }
    }

    /// Events of one KV key are delivered one at a time, in commit order;
    /// this is the key they are ordered by (`None`: no order).
    pub fn order_key(&self) -> Option<String> {
        match self {
            Self::Kv { bucket, key, .. } => Some(format!("{bucket}\0{key}")),
            Self::Object { .. } => None,
        }
    }

    /// Whether a trigger with `source` reacts to this change: its bucket,
    /// its prefix (and suffix), and for objects the changes it asked for.
    pub fn matches(&self, source: &TriggerSource) -> bool {
        match (self, source) {
            (
                Self::Kv { bucket, key, .. },
                TriggerSource::Kv {
                    bucket: watched,
                    prefix,
                },
            ) => watched == bucket && key.starts_with(prefix.as_str()),
            (
                Self::Object { meta, change },
                TriggerSource::Object {
                    bucket,
                    prefix,
                    suffix,
                    events,
                },
            ) => {
                *bucket == meta.bucket
                    && meta.key.starts_with(prefix.as_str())
                    && meta.key.ends_with(suffix.as_str())
                    && events.contains(change)
            }
            _ => false,
        }
    }

    /// The CloudEvent of this change at `now_ms`, without an id (each
    /// trigger's copy gets its own).
    pub fn event(&self, now_ms: i64) -> Result<CloudEvent> {
        let ty = self.kind().cloud_event_type().to_string();
        Ok(match self {
            Self::Kv { bucket, key, value } => CloudEvent {
                id: String::new(),
                ty,
                source: format!("/kv/{bucket}"),
                subject: Some(key.to_string()),
                time_ms: now_ms,
                content_type: value.map(|_| "application/octet-stream".to_string()),
                data: value.unwrap_or_default().to_vec(),
            },
            Self::Object { meta, change } => {
                let name = match change {
                    ObjectChange::Created => "created",
                    ObjectChange::Deleted => "deleted",
                };
                let mut data = serde_json::to_value(meta).map_err(|e| {
                    StoreError::Corrupt(format!("cannot encode object metadata: {e}"))
                })?;
                if let Some(fields) = data.as_object_mut() {
                    fields.insert("event".into(), name.into());
                }
                CloudEvent {
                    id: String::new(),
                    ty,
                    source: format!("/buckets/{}", meta.bucket),
                    subject: Some(meta.key.clone()),
                    time_ms: now_ms,
                    content_type: Some("application/json".into()),
                    data: data.to_string().into_bytes(),
                }
            }
        })
    }

    /// The inbox events this change produces at `now_ms`: one per trigger
    /// among `triggers` that it matches, for that trigger's function, with
    /// the trigger's retry policy.
    pub fn fan_out<'t>(
        &self,
        triggers: &'t [Trigger],
        now_ms: i64,
    ) -> Result<Vec<(&'t Trigger, InboxEvent)>> {
        let event = self.event(now_ms)?;
        Ok(triggers
            .iter()
            .filter(|trigger| self.matches(&trigger.spec.source))
            .map(|trigger| {
                let inbox_event = InboxEvent {
                    // Each function gets its own copy with its own id, so
                    // retries of one never look like duplicates of another.
                    event: CloudEvent {
                        id: new_event_id(),
                        ..event.clone()
                    },
                    path: None,
                    trigger_id: Some(trigger.id),
                    retry: trigger.spec.retry,
                };
                (trigger, inbox_event)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RetryPolicy, TriggerSpec};

    fn trigger(id: i64, source: TriggerSource) -> Trigger {
        Trigger {
            id,
            function: format!("f{id}"),
            spec: TriggerSpec {
                source,
                retry: RetryPolicy::default(),
                alias: None,
            },
            created_ms: 0,
            last_fired_ms: None,
        }
    }

    #[test]
    fn kinds_round_trip_through_their_types_and_label_the_ledger() {
        for kind in EventKind::ALL {
            assert_eq!(
                EventKind::from_cloud_event_type(kind.cloud_event_type()),
                Some(kind)
            );
        }
        assert_eq!(
            EventKind::ledger_label_of("dev.mayfly.object.deleted"),
            "object"
        );
        assert_eq!(EventKind::ledger_label_of("dev.mayfly.invoke"), "async");
        assert_eq!(EventKind::ledger_label_of("com.example.other"), "event");
    }

    #[test]
    fn object_changes_match_bucket_prefix_suffix_and_change() {
        let meta = ObjectMeta {
            bucket: "in".into(),
            key: "day/1.csv".into(),
            size: 3,
            etag: "\"x\"".into(),
            content_type: "text/csv".into(),
            modified_ms: 5,
        };
        let watching =
            |prefix: &str, suffix: &str, events: Vec<ObjectChange>| TriggerSource::Object {
                bucket: "in".into(),
                prefix: prefix.into(),
                suffix: suffix.into(),
                events,
            };
        let created = BucketChange::Object {
            meta: &meta,
            change: ObjectChange::Created,
        };
        assert!(created.matches(&watching("day/", ".csv", ObjectChange::both())));
        assert!(!created.matches(&watching("night/", "", ObjectChange::both())));
        assert!(!created.matches(&watching("", ".json", ObjectChange::both())));
        assert!(!created.matches(&watching("", "", vec![ObjectChange::Deleted])));
        let triggers = [
            trigger(1, watching("", "", ObjectChange::both())),
            trigger(2, watching("x", "", ObjectChange::both())),
            trigger(
                3,
                TriggerSource::Kv {
                    bucket: "in".into(),
                    prefix: String::new(),
                },
            ),
        ];
        let events = created.fan_out(&triggers, 9).unwrap();
        assert_eq!(events.len(), 1);
        let (to, event) = &events[0];
        assert_eq!(to.id, 1);
        assert_eq!(event.event.ty, "dev.mayfly.object.created");
        assert_eq!(event.event.source, "/buckets/in");
        let data: serde_json::Value = serde_json::from_slice(&event.event.data).unwrap();
        assert_eq!(data["event"], "created");
        assert_eq!(data["key"], "day/1.csv");
    }

    #[test]
    fn every_kv_watcher_gets_its_own_copy_ordered_by_key() {
        let watching = |prefix: &str| TriggerSource::Kv {
            bucket: "b".into(),
            prefix: prefix.into(),
        };
        let triggers = [trigger(1, watching("a")), trigger(2, watching(""))];
        let put = BucketChange::Kv {
            bucket: "b",
            key: "a%",
            value: Some(b"v"),
        };
        assert_eq!(put.order_key().as_deref(), Some("b\0a%"));
        let events = put.fan_out(&triggers, 1).unwrap();
        assert_eq!(events.len(), 2);
        assert_ne!(events[0].1.event.id, events[1].1.event.id);
        assert_eq!(events[0].1.event.ty, "dev.mayfly.kv.put");
        let delete = BucketChange::Kv {
            bucket: "b",
            key: "z",
            value: None,
        };
        let events = delete.fan_out(&triggers, 1).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1.event.ty, "dev.mayfly.kv.delete");
        assert_eq!(events[0].1.event.content_type, None);
    }
}
