//! Named queues, function inboxes, the dispatcher's claims and
//! settlements, and dead letters: one record per message, changed by
//! compare-and-swap on its revision.
//!
//! A claim re-reads the queue, picks what is visible (and first of its
//! ordering key) and takes each message with its own compare-and-swap, so
//! two nodes never hold one message: the loser's swap fails and it moves
//! on to the next. A lease is a visibility time: when a node dies holding
//! it, the message is visible again to every node once it ends.

use std::collections::{BTreeMap, HashSet};

use async_nats::jetstream::kv::UpdateErrorKind;
use serde::{Deserialize, Serialize};

use mayfly_store::{
    AckOutcome, CloudEvent, DeadLetter, Delivery, EventQueue, InboxEvent, QueueRef, QueueStats,
    Result, RetryPolicy, Settlement, StoreError, WorkHint,
};

use super::sites::Place;
use super::{
    Bucket, COUNTER, Found, MAX_CONFLICTS, NatsEvents, is_wrong_last_sequence, json, now_ms, parse,
    to_i64, token, too_busy, untoken,
};
use crate::batch::{MAX_BATCH, Write};

/// A stored message or event, `m.<queue>.<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Message {
    pub(super) event_id: String,
    pub(super) ty: String,
    pub(super) source: String,
    /// `None` for a named queue's message: its subject is its id.
    pub(super) subject: Option<String>,
    pub(super) time_ms: i64,
    pub(super) content_type: Option<String>,
    /// Hex.
    pub(super) data: String,
    pub(super) path: Option<String>,
    /// Events with the same key are handed out one at a time, in id order.
    pub(super) order_key: Option<String>,
    pub(super) trigger_id: Option<i64>,
    /// Inbox events only.
    pub(super) retry: Option<RetryPolicy>,
    /// Deliveries so far (the current one included).
    pub(super) attempts: u32,
    pub(super) visible_at_ms: i64,
    /// The node whose dispatcher holds the lease (a user's `receive` is
    /// nobody's).
    pub(super) leased_by: Option<String>,
    pub(super) last_error: Option<String>,
    pub(super) enqueued_ms: i64,
}

impl Message {
    /// An inbox event, visible at `now`.
    pub(super) fn inbox(event: &InboxEvent, order_key: Option<String>, now: i64) -> Self {
        let e = &event.event;
        Self {
            event_id: e.id.clone(),
            ty: e.ty.clone(),
            source: e.source.clone(),
            subject: e.subject.clone(),
            time_ms: e.time_ms,
            content_type: e.content_type.clone(),
            data: hex::encode(&e.data),
            path: event.path.clone(),
            order_key,
            trigger_id: event.trigger_id,
            retry: Some(event.retry),
            attempts: 0,
            visible_at_ms: now,
            leased_by: None,
            last_error: None,
            enqueued_ms: now,
        }
    }

    fn delivery(&self, id: i64) -> Result<Delivery> {
        Ok(Delivery {
            id,
            attempt: self.attempts,
            event: CloudEvent {
                id: self.event_id.clone(),
                ty: self.ty.clone(),
                source: self.source.clone(),
                subject: self.subject.clone().or_else(|| Some(id.to_string())),
                time_ms: self.time_ms,
                content_type: self.content_type.clone(),
                data: unhex(&self.data)?,
            },
            path: self.path.clone(),
            trigger_id: self.trigger_id,
            retry: self.retry,
            enqueued_ms: self.enqueued_ms,
        })
    }
}

/// A dead letter, `d.f<function>.<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Dead {
    event_id: String,
    ty: String,
    source: String,
    subject: Option<String>,
    time_ms: i64,
    content_type: Option<String>,
    /// Hex.
    data: String,
    path: Option<String>,
    order_key: Option<String>,
    trigger_id: Option<i64>,
    retry: RetryPolicy,
    attempts: u32,
    last_error: String,
    died_ms: i64,
}

impl Dead {
    /// The message a redrive puts back in the function's inbox: its
    /// event, a fresh attempt count, visible at `now`.
    fn redriven(&self, now: i64) -> Message {
        Message {
            event_id: self.event_id.clone(),
            ty: self.ty.clone(),
            source: self.source.clone(),
            subject: self.subject.clone(),
            time_ms: self.time_ms,
            content_type: self.content_type.clone(),
            data: self.data.clone(),
            path: self.path.clone(),
            order_key: self.order_key.clone(),
            trigger_id: self.trigger_id,
            retry: Some(self.retry),
            attempts: 0,
            visible_at_ms: now,
            leased_by: None,
            last_error: None,
            enqueued_ms: now,
        }
    }

    fn letter(&self, id: i64, with_data: bool) -> Result<DeadLetter> {
        let data = unhex(&self.data)?;
        Ok(DeadLetter {
            id,
            event_id: self.event_id.clone(),
            ty: self.ty.clone(),
            source: self.source.clone(),
            subject: self.subject.clone(),
            time_ms: self.time_ms,
            content_type: self.content_type.clone(),
            size: data.len() as u64,
            attempts: self.attempts,
            last_error: self.last_error.clone(),
            died_ms: self.died_ms,
            trigger_id: self.trigger_id,
            data: with_data.then_some(data),
        })
    }
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    hex::decode(text).map_err(|e| StoreError::Corrupt(format!("unreadable event data: {e}")))
}

/// The key token of a queue: `n<hex>` for a named queue, `i<hex>` for a
/// function's inbox (a queue and a function may share a name).
pub(super) fn queue_token(queue: &QueueRef) -> String {
    match queue {
        QueueRef::Named(name) => format!("n{}", token(name)),
        QueueRef::Inbox(function) => format!("i{}", token(function)),
    }
}

pub(super) fn queue_of(token: &str) -> Result<QueueRef> {
    match token.split_at_checked(1) {
        Some(("n", name)) => Ok(QueueRef::Named(untoken(name)?)),
        Some(("i", function)) => Ok(QueueRef::Inbox(untoken(function)?)),
        _ => Err(StoreError::Corrupt(format!(
            "unreadable queue token `{token}`"
        ))),
    }
}

pub(super) fn message_key(queue: &QueueRef, id: i64) -> String {
    format!("m.{}.{id:020}", queue_token(queue))
}

/// The pattern of every message key of `queue`.
pub(super) fn queue_pattern(queue: &QueueRef) -> String {
    format!("m.{}.>", queue_token(queue))
}

pub(super) fn dead_prefix(function: &str) -> String {
    format!("d.f{}", token(function))
}

fn dead_key(function: &str, id: i64) -> String {
    format!("{}.{id:020}", dead_prefix(function))
}

/// The id at the end of a key.
fn id_of(key: &str) -> Result<i64> {
    key.rsplit('.')
        .next()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("unreadable key `{key}`")))
}

/// A message read from a listing.
struct Stored {
    queue: QueueRef,
    id: i64,
    revision: u64,
    message: Message,
}

fn stored(found: &Found) -> Result<Stored> {
    let mut parts = found.key.split('.');
    let (Some("m"), Some(queue), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(StoreError::Corrupt(format!(
            "unreadable key `{}`",
            found.key
        )));
    };
    Ok(Stored {
        queue: queue_of(queue)?,
        id: id
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("unreadable key `{}`", found.key)))?,
        revision: found.revision,
        message: parse(found)?,
    })
}

/// The messages of one queue that may be handed out, the ordering rule
/// applied: a message waits while an older one of its key is stored.
fn heads(mut messages: Vec<Stored>) -> Vec<Stored> {
    messages.sort_by_key(|m| m.id);
    let mut keys_seen = HashSet::new();
    messages.retain(|m| match &m.message.order_key {
        None => true,
        Some(key) => keys_seen.insert(key.clone()),
    });
    messages
}

impl Bucket {
    /// Every stored message of `queue` (all queues when `None`).
    async fn messages(&self, queue: Option<&QueueRef>) -> Result<Vec<Stored>> {
        let pattern = match queue {
            Some(queue) => queue_pattern(queue),
            None => "m.>".to_string(),
        };
        self.scan(&pattern).await?.iter().map(stored).collect()
    }

    /// A message by id, with its revision.
    async fn message(&self, queue: &QueueRef, id: i64) -> Result<Option<(Message, u64)>> {
        let (found, _) = self.read(&message_key(queue, id)).await?;
        match found {
            None => Ok(None),
            Some(found) => Ok(Some((parse(&found)?, found.revision))),
        }
    }

    /// Replaces a message if it is still at `revision`; false if it moved.
    async fn swap(&self, key: &str, message: &Message, revision: u64) -> Result<bool> {
        match self.kv.update(key, json(message)?, revision).await {
            Ok(_) => Ok(true),
            Err(e)
                if e.kind() == UpdateErrorKind::WrongLastRevision || is_wrong_last_sequence(&e) =>
            {
                Ok(false)
            }
            Err(e) => Err(crate::backend(e)),
        }
    }

    /// Deletes a message if it is still at `revision`; false if it moved.
    async fn remove(&self, revision: u64) -> Result<bool> {
        self.remove_revision(revision).await
    }
}

impl NatsEvents {
    /// Stores new messages in bucket `at` in one batch with `extra`
    /// writes, their ids taken from its counter; returns the ids and the
    /// batch.
    pub(super) async fn insert(
        &self,
        at: &Bucket,
        records: &[(QueueRef, Message)],
        extra: Vec<Write>,
    ) -> Result<Option<(Vec<i64>, crate::batch::Committed)>> {
        let (last, revision) = at.counter().await?;
        let mut writes = extra;
        let mut ids = Vec::with_capacity(records.len());
        for (index, (queue, message)) in records.iter().enumerate() {
            let id = last + 1 + index as i64;
            ids.push(id);
            writes.push(Write::put(message_key(queue, id), json(message)?).expect(0));
        }
        let next = last + records.len() as i64;
        if !records.is_empty() {
            writes.push(Write::put(COUNTER, next.to_string()).expect(revision));
        }
        if writes.is_empty() {
            return Ok(Some((ids, crate::batch::Committed { first: 0, last: 0 })));
        }
        let Some(done) = at.commit(&writes).await? else {
            return Ok(None);
        };
        self.hints
            .publish(
                &at.domain,
                records
                    .iter()
                    .map(|(queue, message)| (queue.clone(), message.visible_at_ms)),
            )
            .await;
        Ok(Some((ids, done)))
    }

    /// Claims up to `max` visible messages of `queue`, in bucket `at`,
    /// until `now + lease`; `node` marks the dispatcher's leases.
    async fn claim(
        &self,
        at: &Bucket,
        queue: &QueueRef,
        max: usize,
        lease_ms: u64,
        node: bool,
    ) -> Result<Vec<Delivery>> {
        let mut claimed = Vec::new();
        if max == 0 {
            return Ok(claimed);
        }
        for _ in 0..MAX_CONFLICTS {
            let now = now_ms();
            let mut candidates: Vec<Stored> = heads(at.messages(Some(queue)).await?)
                .into_iter()
                .filter(|m| m.message.visible_at_ms <= now)
                .collect();
            candidates.sort_by_key(|m| (m.message.visible_at_ms, m.id));
            let mut lost = false;
            for mut candidate in candidates {
                if claimed.len() >= max {
                    break;
                }
                let message = &mut candidate.message;
                message.attempts += 1;
                message.visible_at_ms = now.saturating_add(to_i64(lease_ms));
                message.leased_by = node.then(|| self.node.clone());
                let key = message_key(queue, candidate.id);
                if at.swap(&key, message, candidate.revision).await? {
                    claimed.push(message.delivery(candidate.id)?);
                } else {
                    lost = true;
                }
            }
            // Another node took some: what it left may still be claimable.
            if !lost || !claimed.is_empty() {
                break;
            }
        }
        claimed.sort_by_key(|d| d.id);
        Ok(claimed)
    }

    /// Applies one settlement in bucket `at` (a dead letter stays there
    /// too); returns when the message becomes visible again if it stays
    /// (a retry or a postponement), for the fleet's hint.
    async fn settle(
        &self,
        at: &Bucket,
        queue: &QueueRef,
        settlement: &Settlement,
    ) -> Result<Option<i64>> {
        let (id, attempt) = match settlement {
            Settlement::Ack { id, attempt }
            | Settlement::Retry { id, attempt, .. }
            | Settlement::Postpone { id, attempt, .. }
            | Settlement::Dead { id, attempt, .. } => (*id, *attempt),
        };
        let key = message_key(queue, id);
        for _ in 0..MAX_CONFLICTS {
            let Some((mut message, revision)) = at.message(queue, id).await? else {
                return Ok(None);
            };
            // Settled only at the attempt it was handed out with: a lease
            // that ran out and went to another consumer is theirs now.
            if message.attempts != attempt {
                return Ok(None);
            }
            let now = now_ms();
            let done = match settlement {
                Settlement::Ack { .. } => at.remove(revision).await?,
                Settlement::Retry {
                    delay_ms, error, ..
                } => {
                    message.visible_at_ms = now.saturating_add(to_i64(*delay_ms));
                    message.leased_by = None;
                    message.last_error = Some(error.clone());
                    at.swap(&key, &message, revision).await?
                }
                Settlement::Postpone { delay_ms, .. } => {
                    message.visible_at_ms = now.saturating_add(to_i64(*delay_ms));
                    message.leased_by = None;
                    message.attempts = message.attempts.saturating_sub(1);
                    at.swap(&key, &message, revision).await?
                }
                Settlement::Dead {
                    function,
                    retry,
                    trigger_id,
                    error,
                    ..
                } => {
                    let dead = Dead {
                        subject: message.subject.clone().or_else(|| Some(id.to_string())),
                        event_id: message.event_id,
                        ty: message.ty,
                        source: message.source,
                        time_ms: message.time_ms,
                        content_type: message.content_type,
                        data: message.data,
                        path: message.path,
                        order_key: message.order_key,
                        trigger_id: message.trigger_id.or(*trigger_id),
                        retry: *retry,
                        attempts: message.attempts,
                        last_error: error.clone(),
                        died_ms: now,
                    };
                    let (last, counter) = at.counter().await?;
                    let writes = [
                        Write::delete(key.clone()).expect(revision),
                        Write::put(dead_key(function, last + 1), json(&dead)?).expect(0),
                        Write::put(COUNTER, (last + 1).to_string()).expect(counter),
                    ];
                    match at.commit(&writes).await? {
                        Some(done) => {
                            // The tombstone (the batch's first write) is
                            // no use: the id is never written again.
                            at.remove_revision(done.first).await?;
                            true
                        }
                        None => false,
                    }
                }
            };
            if done {
                let stays = matches!(
                    settlement,
                    Settlement::Retry { .. } | Settlement::Postpone { .. }
                );
                return Ok(stays.then_some(message.visible_at_ms));
            }
        }
        Err(too_busy("settling a delivery"))
    }

    /// `function`'s dead letters in bucket `at` among `ids` (all when
    /// `None`), in id order, with their revisions.
    async fn selected_dead(
        &self,
        at: &Bucket,
        function: &str,
        ids: Option<&[i64]>,
    ) -> Result<Vec<(i64, u64, Dead)>> {
        let wanted: Option<HashSet<i64>> = ids.map(|ids| ids.iter().copied().collect());
        let mut letters = Vec::new();
        for found in at.scan(&format!("{}.>", dead_prefix(function))).await? {
            let id = id_of(&found.key)?;
            if wanted.as_ref().is_none_or(|w| w.contains(&id)) {
                letters.push((id, found.revision, parse(&found)?));
            }
        }
        letters.sort_by_key(|(id, _, _)| *id);
        Ok(letters)
    }
}

#[async_trait::async_trait]
impl EventQueue for NatsEvents {
    async fn send(&self, queue: &str, messages: &[(Option<String>, Vec<u8>)]) -> Result<Vec<i64>> {
        let now = now_ms();
        let queue_ref = QueueRef::Named(queue.to_string());
        let records: Vec<(QueueRef, Message)> = messages
            .iter()
            .map(|(content_type, data)| {
                let event = CloudEvent::queue_message(queue, content_type.clone(), Vec::new(), now);
                let message = Message {
                    event_id: event.id,
                    ty: event.ty,
                    source: event.source,
                    subject: None,
                    time_ms: event.time_ms,
                    content_type: event.content_type,
                    data: hex::encode(data),
                    path: None,
                    order_key: None,
                    trigger_id: None,
                    retry: None,
                    attempts: 0,
                    visible_at_ms: now,
                    leased_by: None,
                    last_error: None,
                    enqueued_ms: now,
                };
                (queue_ref.clone(), message)
            })
            .collect();
        // One batch holds the counter too; a larger send is several
        // batches, each all or nothing.
        let at = self.bucket_of(&queue_ref).await?;
        let mut ids = Vec::with_capacity(records.len());
        for chunk in records.chunks(MAX_BATCH - 1) {
            let mut done = None;
            for _ in 0..MAX_CONFLICTS {
                let inserted = self.insert(&at, chunk, Vec::new()).await;
                if let Some((chunk_ids, _)) =
                    self.explained(&queue_ref, &at.place, inserted).await?
                {
                    done = Some(chunk_ids);
                    break;
                }
            }
            ids.extend(done.ok_or_else(|| too_busy("sending to a queue"))?);
        }
        Ok(ids)
    }

    async fn receive(&self, queue: &str, max: usize, visibility_ms: u64) -> Result<Vec<Delivery>> {
        let queue_ref = QueueRef::Named(queue.to_string());
        let at = self.bucket_of(&queue_ref).await?;
        let claimed = self.claim(&at, &queue_ref, max, visibility_ms, false).await;
        self.explained(&queue_ref, &at.place, claimed).await
    }

    async fn ack(&self, queue: &str, id: i64, attempt: u32) -> Result<AckOutcome> {
        let queue_ref = QueueRef::Named(queue.to_string());
        let at = self.bucket_of(&queue_ref).await?;
        let acked = async {
            for _ in 0..MAX_CONFLICTS {
                let Some((message, revision)) = at.message(&queue_ref, id).await? else {
                    return Ok(AckOutcome::Gone);
                };
                if message.attempts != attempt {
                    return Ok(AckOutcome::Stale);
                }
                if at.remove(revision).await? {
                    return Ok(AckOutcome::Acked);
                }
            }
            Err(too_busy("acknowledging a message"))
        }
        .await;
        self.explained(&queue_ref, &at.place, acked).await
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        let now = now_ms();
        let mut stats: BTreeMap<String, QueueStats> = BTreeMap::new();
        for at in self.own_buckets() {
            for stored in at.messages(None).await? {
                let QueueRef::Named(name) = stored.queue else {
                    continue;
                };
                let entry = stats.entry(name.clone()).or_insert(QueueStats {
                    queue: name,
                    messages: 0,
                    in_flight: 0,
                });
                entry.messages += 1;
                if stored.message.visible_at_ms > now && stored.message.attempts > 0 {
                    entry.in_flight += 1;
                }
            }
        }
        Ok(stats.into_values().collect())
    }

    async fn enqueue(&self, function: &str, event: &InboxEvent) -> Result<i64> {
        let record = (
            QueueRef::Inbox(function.to_string()),
            Message::inbox(event, None, now_ms()),
        );
        for _ in 0..MAX_CONFLICTS {
            if let Some((ids, _)) = self
                .insert(&self.hub, std::slice::from_ref(&record), Vec::new())
                .await?
            {
                return ids
                    .first()
                    .copied()
                    .ok_or_else(|| StoreError::Backend("no id was given".into()));
            }
        }
        Err(too_busy("enqueueing an event"))
    }

    async fn settle_and_claim(
        &self,
        settled: &[Settlement],
        queue: &QueueRef,
        max: usize,
        lease_ms: u64,
    ) -> Result<Vec<Delivery>> {
        let at = self.bucket_of(queue).await?;
        // Not one transaction as in SQLite, and it need not be: each
        // settlement and each claim is a compare-and-swap of its own.
        let mut due = None;
        for settlement in settled {
            if let Some(when) = self.settle(&at, queue, settlement).await? {
                due = Some(due.map_or(when, |due: i64| due.min(when)));
            }
        }
        // A retry or a postponement may be taken by any node when it is
        // due (this node's worker finds it itself); acks need no hint.
        if let Some(due) = due {
            self.hints.publish(&at.domain, [(queue.clone(), due)]).await;
        }
        self.claim(&at, queue, max, lease_ms, true).await
    }

    async fn next_visible(&self, queue: &QueueRef) -> Result<Option<i64>> {
        let at = self.bucket_of(queue).await?;
        Ok(heads(at.messages(Some(queue)).await?)
            .iter()
            .map(|m| m.message.visible_at_ms)
            .min())
    }

    async fn release_leases(&self) -> Result<usize> {
        let now = now_ms();
        let mut released = 0;
        for at in self.own_buckets() {
            let mut freed = Vec::new();
            for mut stored in at.messages(None).await? {
                if stored.message.leased_by.as_deref() != Some(self.node.as_str()) {
                    continue;
                }
                stored.message.leased_by = None;
                stored.message.visible_at_ms = now;
                let key = message_key(&stored.queue, stored.id);
                // A message that moved meanwhile was settled by this
                // node's last writes or taken by another after its lease:
                // not ours.
                if at.swap(&key, &stored.message, stored.revision).await? {
                    released += 1;
                    freed.push((stored.queue, now));
                }
            }
            // Visible again to every node, not only to this one's workers.
            self.hints.publish(&at.domain, freed).await;
        }
        Ok(released)
    }

    async fn depths(&self) -> Result<Vec<(QueueRef, u64)>> {
        let mut depths: Vec<(QueueRef, u64)> = Vec::new();
        for at in self.own_buckets() {
            for stored in at.messages(None).await? {
                match depths.iter_mut().find(|(queue, _)| *queue == stored.queue) {
                    Some((_, count)) => *count += 1,
                    None => depths.push((stored.queue, 1)),
                }
            }
        }
        Ok(depths)
    }

    async fn dead_letters(
        &self,
        function: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        // The hub's ids are all below the site's (SITE_ID_BASE): in id
        // order, the hub's letters come first.
        let mut letters = Vec::new();
        for at in self.own_buckets() {
            letters.extend(self.selected_dead(&at, function, None).await?);
        }
        letters
            .into_iter()
            .filter(|(id, _, _)| *id > after)
            .take(limit)
            .map(|(id, _, dead)| dead.letter(id, false))
            .collect()
    }

    async fn dead_letter(&self, function: &str, id: i64) -> Result<Option<DeadLetter>> {
        let (found, _) = self.bucket_of_id(id).read(&dead_key(function, id)).await?;
        match found {
            None => Ok(None),
            Some(found) => Ok(Some(parse::<Dead>(&found)?.letter(id, true)?)),
        }
    }

    async fn redrive(&self, function: &str, ids: Option<&[i64]>) -> Result<usize> {
        let now = now_ms();
        let inbox = QueueRef::Inbox(function.to_string());
        let hub = &self.hub;
        let mut moved = 0;
        // Each batch holds the counter, and per letter its deletion and
        // its new message.
        let letters = self.selected_dead(hub, function, ids).await?;
        for chunk in letters.chunks((MAX_BATCH - 1) / 2) {
            let mut done = false;
            for _ in 0..MAX_CONFLICTS {
                let mut records = Vec::with_capacity(chunk.len());
                let mut deletes = Vec::with_capacity(chunk.len());
                for (id, revision, dead) in chunk {
                    deletes.push(Write::delete(dead_key(function, *id)).expect(*revision));
                    records.push((inbox.clone(), dead.redriven(now)));
                }
                if let Some((_, committed)) = self.insert(hub, &records, deletes).await? {
                    // The tombstones (the batch's first writes) are no use.
                    for offset in 0..chunk.len() as u64 {
                        hub.remove_revision(committed.first + offset).await?;
                    }
                    done = true;
                    break;
                }
                // A letter redriven or purged meanwhile fails the batch;
                // the counter moving does too. Either way, try again with
                // what is still there.
                let still: HashSet<i64> = self
                    .selected_dead(
                        hub,
                        function,
                        Some(&chunk.iter().map(|c| c.0).collect::<Vec<_>>()),
                    )
                    .await?
                    .into_iter()
                    .map(|(id, _, _)| id)
                    .collect();
                if still.len() != chunk.len() {
                    return Err(StoreError::Backend(
                        "dead letters changed during a redrive; try again".into(),
                    ));
                }
            }
            if !done {
                return Err(too_busy("redriving dead letters"));
            }
            moved += chunk.len();
        }
        // This site's letters (of its queues) go to the function's inbox
        // at the hub: two buckets, so not one batch. Stored first, then
        // removed: a failure in between redrives a letter twice, never
        // loses it (at-least-once, as every delivery).
        if let Some(local) = &self.local {
            let letters = self.selected_dead(local, function, ids).await?;
            for chunk in letters.chunks(MAX_BATCH - 1) {
                let records: Vec<_> = chunk
                    .iter()
                    .map(|(_, _, dead)| (inbox.clone(), dead.redriven(now)))
                    .collect();
                let mut done = false;
                for _ in 0..MAX_CONFLICTS {
                    let inserted = self.insert(hub, &records, Vec::new()).await;
                    if self
                        .explained(&inbox, &Place::Hub, inserted)
                        .await?
                        .is_some()
                    {
                        done = true;
                        break;
                    }
                }
                if !done {
                    return Err(too_busy("redriving dead letters"));
                }
                for (_, revision, _) in chunk {
                    local.remove(*revision).await?;
                }
                moved += chunk.len();
            }
        }
        Ok(moved)
    }

    async fn purge_dead(&self, function: &str, ids: Option<&[i64]>) -> Result<usize> {
        let mut purged = 0;
        for at in self.own_buckets() {
            for (_, revision, _) in self.selected_dead(&at, function, ids).await? {
                if at.remove(revision).await? {
                    purged += 1;
                }
            }
        }
        Ok(purged)
    }

    fn work_hints(&self) -> Option<mayfly_store::ChangeFeed<WorkHint>> {
        Some(self.hints.subscribe())
    }
}
