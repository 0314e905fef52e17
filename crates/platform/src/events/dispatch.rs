//! The dispatcher: one worker per function inbox and per queue trigger,
//! each claiming events in batches, delivering them concurrently as
//! CloudEvents, and settling the results in the same transaction as its
//! next claim.
//!
//! Workers are independent: a slow or failing function fills only its own
//! worker's slots and retry schedule, never another's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mayfly_store::{Delivery, QueueRef, RetryPolicy, Settlement, Trigger};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use rand::Rng as _;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::EventHub;
use crate::catalog::{Deployed, Target};
use crate::clock::now_ms;
use crate::invoker::{AdmittedInvocation, Invoker, new_request_id};

/// Inbox deliveries running at once per function, unless its
/// `max_concurrency` is lower.
const INBOX_CONCURRENCY: usize = 32;
/// Events an inbox worker claims at once.
const INBOX_BATCH: usize = 32;
/// Wait before retrying an event whose function was at its limit.
const THROTTLED_DELAY_MS: u64 = 1000;
/// Longest a worker with messages waiting (a retry's backoff, a received
/// message's visibility) sleeps before it looks again, in case the clock
/// jumped. A worker with an empty queue sleeps until a write wakes it: every
/// way a message arrives is in this process, and thousands of idle
/// functions must not poll the database.
const IDLE_POLL: Duration = Duration::from_secs(60);
/// Wait before trying again after the store failed.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Added to a function's timeout and queue wait to lease an event: a
/// delivery that outlives its lease may be handed out twice, so the lease
/// outlasts any invocation. A crash releases leases at the next start.
const LEASE_MARGIN_MS: u64 = 30_000;

/// Characters CloudEvents' binary mode percent-encodes in header values:
/// outside printable ASCII, plus space, `"` and `%`.
pub(crate) const HEADER_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// Request body of an event delivery.
pub(crate) type EventBody = http_body_util::combinators::BoxBody<Bytes, wasmtime_wasi_http::Error>;

/// Bytes of a failed delivery's response kept as its error.
const EVENT_ERROR_EXCERPT: usize = 256;

/// How one delivery attempt went.
#[derive(Debug)]
pub(crate) enum EventOutcome {
    /// The function answered 2xx: acknowledged.
    Delivered,
    /// The function failed, with why.
    Failed(String),
    /// The function was at its concurrency limit: nothing ran.
    Throttled,
    /// The node could not run it (no free instance slot, or it is shutting
    /// down): not the event's fault, so not an attempt.
    NotRun(String),
}

/// What every worker delivers through: the event stores and the invoker.
pub(super) struct Dispatcher {
    pub(super) hub: Arc<EventHub>,
    pub(super) invoker: Arc<Invoker>,
}

/// What a worker consumes and how.
#[derive(Debug, Clone)]
pub(crate) struct Consumer {
    queue: QueueRef,
    function: String,
    batch: usize,
    concurrency: Option<usize>,
    /// The trigger's retry policy; inbox events carry their own.
    retry: RetryPolicy,
    /// The queue trigger consuming (none for an inbox).
    trigger_id: Option<i64>,
}

impl Consumer {
    /// A function's inbox.
    pub(crate) fn inbox(function: &str) -> Self {
        Self {
            queue: QueueRef::Inbox(function.to_string()),
            function: function.to_string(),
            batch: INBOX_BATCH,
            concurrency: None,
            retry: RetryPolicy::default(),
            trigger_id: None,
        }
    }

    /// A queue trigger.
    pub(crate) fn queue(trigger: &Trigger, queue: &str, batch: u32, concurrency: u32) -> Self {
        Self {
            queue: QueueRef::Named(queue.to_string()),
            function: trigger.function.clone(),
            batch: batch as usize,
            concurrency: Some(concurrency as usize),
            retry: trigger.spec.retry,
            trigger_id: Some(trigger.id),
        }
    }
}

/// A worker: claims, delivers and settles until stopped, then lets its
/// running deliveries finish and records their results.
pub(super) async fn run(
    node: Arc<Dispatcher>,
    consumer: Consumer,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let (done_tx, mut done) = mpsc::unbounded_channel::<Settlement>();
    let mut settled: Vec<Settlement> = Vec::new();
    let mut running = 0usize;
    // After a claim came back short, the worker claims again only when
    // something changed: a delivery ended (it may unblock an ordered
    // event), a write woke it, or the next stored message became visible.
    let mut drained = false;
    let mut recheck_at: Option<tokio::time::Instant> = None;
    loop {
        let stopping = stop.is_cancelled();
        let function = node
            .invoker
            .catalog()
            .by_name
            .get(&consumer.function)
            .cloned();
        let trigger_gone = consumer
            .trigger_id
            .is_some_and(|id| !node.hub.has_trigger(id));
        let Some(function) = function.filter(|_| !trigger_gone) else {
            // Deleted: let running deliveries end, record what finished (a
            // named queue's acks must not be lost to a redelivery), stop.
            if running > 0 {
                if let Some(settlement) = done.recv().await {
                    running -= 1;
                    settled.push(settlement);
                }
                continue;
            }
            if !settled.is_empty() {
                let _ = node
                    .hub
                    .queue_store()
                    .settle_and_claim(&settled, &consumer.queue, 0, 0)
                    .await;
            }
            return;
        };
        // Never more than the function itself may run: the excess would
        // only wait in admission and be postponed.
        let live = &function.live;
        let function_limit = live
            .deployed
            .scaling
            .max_concurrency
            .map(|max| max as usize);
        let concurrency = consumer
            .concurrency
            .unwrap_or(INBOX_CONCURRENCY)
            .min(function_limit.unwrap_or(usize::MAX))
            .max(1);
        let free = concurrency.saturating_sub(running);
        // Claim in batches: when nothing runs, or a batch's worth of slots
        // is free.
        let refill =
            free > 0 && !drained && (running == 0 || free >= consumer.batch.min(concurrency));
        let want = if stopping || !refill {
            0
        } else {
            free.min(consumer.batch)
        };
        if want > 0 || !settled.is_empty() {
            // Long enough for whichever version of a split alias runs it.
            let lease_ms = live
                .versions()
                .map(|v| v.limits.timeout.as_millis() as u64 + v.scaling.queue_timeout_ms)
                .max()
                .unwrap_or(0)
                + LEASE_MARGIN_MS;
            let claimed = node
                .hub
                .queue_store()
                .settle_and_claim(&settled, &consumer.queue, want, lease_ms)
                .await;
            match claimed {
                Ok(claimed) => {
                    settled.clear();
                    if claimed.len() < want {
                        drained = true;
                        recheck_at = next_due(&node, &consumer.queue).await;
                    }
                    for delivery in claimed {
                        running += 1;
                        let mut report = Report {
                            done: done_tx.clone(),
                            unsettled: Some((delivery.id, delivery.attempt)),
                        };
                        let node = node.clone();
                        let consumer = consumer.clone();
                        tokio::spawn(async move {
                            let settlement = deliver(&node, &consumer, delivery).await;
                            report.send(settlement);
                        });
                    }
                }
                Err(error) if stopping => {
                    // Leases are released at the next start; nothing to wait for.
                    tracing::warn!(queue = ?consumer.queue, "cannot record results at shutdown: {error}");
                    return;
                }
                Err(error) => {
                    // The settlements stay, to be applied with the next claim.
                    tracing::error!(queue = ?consumer.queue, "cannot claim events: {error}");
                    drained = true;
                    recheck_at = Some(tokio::time::Instant::now() + ERROR_BACKOFF);
                }
            }
        }
        if stopping && running == 0 && settled.is_empty() {
            return;
        }
        tokio::select! {
            Some(settlement) = done.recv() => {
                running -= 1;
                settled.push(settlement);
                while let Ok(settlement) = done.try_recv() {
                    running -= 1;
                    settled.push(settlement);
                }
                drained = false;
            }
            () = wake.notified(), if !stopping => drained = false,
            () = sleep_until(recheck_at), if drained && recheck_at.is_some() && !stopping => {
                drained = false;
            }
            () = stop.cancelled(), if !stopping => {}
        }
    }
}

/// Hands a delivery's settlement back to its worker, exactly once: if the
/// delivery task ends without one (a panic), the event is postponed, so
/// the worker's count of running deliveries stays right.
struct Report {
    done: mpsc::UnboundedSender<Settlement>,
    unsettled: Option<(i64, u32)>,
}

impl Report {
    fn send(&mut self, settlement: Settlement) {
        self.unsettled = None;
        let _ = self.done.send(settlement);
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if let Some((id, attempt)) = self.unsettled.take() {
            let _ = self.done.send(Settlement::Postpone {
                id,
                attempt,
                delay_ms: THROTTLED_DELAY_MS,
            });
        }
    }
}

/// When the worker should look again after draining its queue: when the
/// next stored message becomes visible (at most [`IDLE_POLL`] from now), or
/// `None` when the queue is empty and only a wake-up can bring work. In a
/// fleet an empty queue is looked at every [`IDLE_POLL`] too: other nodes'
/// hints wake the worker, but a hint may be lost.
async fn next_due(node: &Dispatcher, queue: &QueueRef) -> Option<tokio::time::Instant> {
    let next = node.hub.queue_store().next_visible(queue).await;
    let now = tokio::time::Instant::now();
    match next {
        Ok(None) => node.hub.shared_queues.then(|| now + IDLE_POLL),
        Ok(Some(at_ms)) => {
            let wait = u64::try_from(at_ms - now_ms()).unwrap_or(0);
            Some(now + Duration::from_millis(wait).min(IDLE_POLL))
        }
        _ => Some(now + ERROR_BACKOFF),
    }
}

/// Sleeps until `at`; forever for `None` (the caller guards the branch).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Delivers one event and decides what becomes of it.
async fn deliver(node: &Dispatcher, consumer: &Consumer, mut delivery: Delivery) -> Settlement {
    let metrics = &node.hub.metrics;
    let function_name = &consumer.function;
    let Some(function) = node.invoker.catalog().by_name.get(function_name).cloned() else {
        // Deleted meanwhile; its inbox goes with it, a queue's message
        // waits for another consumer.
        return Settlement::Postpone {
            id: delivery.id,
            attempt: delivery.attempt,
            delay_ms: THROTTLED_DELAY_MS,
        };
    };
    let retry = delivery.retry.unwrap_or(consumer.retry);
    // The data moves into the request; a dead letter is copied from the
    // stored row, not from here.
    let data = std::mem::take(&mut delivery.event.data);
    // The alias of the trigger behind the delivery: the queue trigger
    // consuming, or the one that produced an inbox event (`live` if none).
    let alias = consumer
        .trigger_id
        .or(delivery.trigger_id)
        .and_then(|trigger| node.hub.trigger_alias(trigger));
    let target = match alias.as_deref() {
        None => Some(&function.live),
        Some(alias) => function.alias(alias),
    };
    let outcome = match (target, cloud_event_request(&delivery, data)) {
        (Some(target), Ok(request)) => {
            run_to_completion(
                &node.invoker,
                target,
                request,
                trigger_label(&delivery.event.ty),
                None,
                new_request_id(),
            )
            .await
        }
        (None, _) => EventOutcome::Failed(format!(
            "function `{function_name}` has no alias `{}` any more",
            alias.unwrap_or_default()
        )),
        (_, Err(error)) => EventOutcome::Failed(format!("cannot build the request: {error}")),
    };
    match outcome {
        EventOutcome::Delivered => {
            metrics.count(function_name, "delivered");
            let waited_ms = now_ms().saturating_sub(delivery.enqueued_ms).max(0);
            metrics.observe_latency(function_name, waited_ms as f64 / 1000.0);
            Settlement::Ack {
                id: delivery.id,
                attempt: delivery.attempt,
            }
        }
        EventOutcome::Throttled => {
            metrics.count(function_name, "throttled");
            Settlement::Postpone {
                id: delivery.id,
                attempt: delivery.attempt,
                delay_ms: jitter(THROTTLED_DELAY_MS),
            }
        }
        EventOutcome::NotRun(reason) => {
            metrics.count(function_name, "postponed");
            tracing::debug!(function = %function_name, "event postponed: {reason}");
            Settlement::Postpone {
                id: delivery.id,
                attempt: delivery.attempt,
                delay_ms: jitter(THROTTLED_DELAY_MS),
            }
        }
        EventOutcome::Failed(error) if delivery.attempt >= retry.max_attempts => {
            metrics.count(function_name, "dead");
            tracing::warn!(
                function = %function_name,
                event = %delivery.event.id,
                "event failed its last attempt ({}), moved to the dead-letter queue: {error}",
                delivery.attempt
            );
            Settlement::Dead {
                id: delivery.id,
                attempt: delivery.attempt,
                function: function_name.clone(),
                retry,
                trigger_id: delivery.trigger_id.or(consumer.trigger_id),
                error,
            }
        }
        EventOutcome::Failed(error) => {
            metrics.count(function_name, "retried");
            Settlement::Retry {
                id: delivery.id,
                attempt: delivery.attempt,
                delay_ms: backoff(retry.backoff_ms, delivery.attempt),
                error,
            }
        }
    }
}

/// Delivers one event: runs `request` through `invoker` like
/// [`Invoker::invoke`] and reads the whole response, so the event counts as
/// delivered only when the guest answered 2xx and finished its body cleanly.
pub(crate) async fn run_to_completion(
    invoker: &Invoker,
    target: &Target,
    request: http::Request<EventBody>,
    trigger: &'static str,
    client_id: Option<String>,
    request_id: String,
) -> EventOutcome {
    let (function, observed) = target.pick(&request_id);
    let function: &Deployed = function;
    let Ok(permit) = invoker
        .admit(function, &request_id, client_id.as_deref(), trigger)
        .await
    else {
        return EventOutcome::Throttled;
    };
    let invocation = AdmittedInvocation {
        request_id,
        client_id,
        trigger,
        permit,
        observed,
    };
    let response = match invoker.run(function, request, invocation).await {
        Ok(response) => response,
        // 503 is the node's doing (no free instance slot, or the kill at
        // shutdown), not the event's: it is not an attempt.
        Err((status, message)) if status == http::StatusCode::SERVICE_UNAVAILABLE => {
            return EventOutcome::NotRun(message);
        }
        Err((status, message)) => return EventOutcome::Failed(format!("{status}: {message}")),
    };
    let status = response.status();
    let mut body = response.into_body();
    // Only the start of a failure's body is kept, for the dead letter.
    let mut excerpt = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    let room = EVENT_ERROR_EXCERPT.saturating_sub(excerpt.len());
                    excerpt.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Err(error) => {
                return EventOutcome::Failed(format!(
                    "{status}, then the response body failed: {error}"
                ));
            }
        }
    }
    if status.is_success() {
        EventOutcome::Delivered
    } else {
        let text = String::from_utf8_lossy(&excerpt);
        EventOutcome::Failed(format!("{status}: {}", text.trim()))
    }
}

/// Exponential backoff after `attempt` failed: `base`, then doubling, at
/// most [`RetryPolicy::MAX_BACKOFF_MS`], with jitter so that events that
/// failed together do not all come back together.
pub(crate) fn backoff(base_ms: u64, attempt: u32) -> u64 {
    let doublings = attempt.saturating_sub(1).min(30);
    jitter(
        base_ms
            .saturating_mul(1u64 << doublings)
            .min(RetryPolicy::MAX_BACKOFF_MS),
    )
}

/// A random wait between half of `ms` and `ms` ("equal jitter": spread
/// out, yet never much shorter than asked).
pub(crate) fn jitter(ms: u64) -> u64 {
    if ms < 2 {
        return ms;
    }
    rand::rng().random_range(ms / 2..=ms)
}

/// The ledger's trigger label of an event type.
fn trigger_label(ty: &str) -> &'static str {
    mayfly_store::EventKind::ledger_label_of(ty)
}

/// The event as an HTTP request in CloudEvents binary content mode.
fn cloud_event_request(
    delivery: &Delivery,
    data: Vec<u8>,
) -> Result<http::Request<EventBody>, http::Error> {
    let event = &delivery.event;
    let escaped = |text: &str| utf8_percent_encode(text, HEADER_ESCAPES).to_string();
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(delivery.path.as_deref().unwrap_or("/"))
        // wasi:http hands guests an authority; events have no client, so
        // they come from the node itself.
        .header(http::header::HOST, "localhost")
        .header("ce-specversion", "1.0")
        .header("ce-id", escaped(&event.id))
        .header("ce-source", escaped(&event.source))
        .header("ce-type", escaped(&event.ty))
        .header("ce-time", rfc3339_millis(event.time_ms))
        .header("mayfly-attempt", delivery.attempt.to_string());
    if let Some(subject) = &event.subject {
        request = request.header("ce-subject", escaped(subject));
    }
    if let Some(content_type) = &event.content_type {
        request = request.header(http::header::CONTENT_TYPE, content_type.as_str());
    }
    request.body(
        Full::new(Bytes::from(data))
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// RFC 3339 with milliseconds, in UTC.
pub(crate) fn rfc3339_millis(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        for attempt in 1..=5u32 {
            let full = 100u64 << (attempt - 1);
            let delay = backoff(100, attempt);
            assert!(
                (full / 2..=full).contains(&delay),
                "attempt {attempt}: {delay}"
            );
        }
        assert!(backoff(60_000, 40) <= RetryPolicy::MAX_BACKOFF_MS);
    }

    #[test]
    fn headers_follow_the_binary_content_mode() {
        let delivery = Delivery {
            id: 7,
            attempt: 2,
            event: mayfly_store::CloudEvent {
                id: "e1".into(),
                ty: "dev.mayfly.kv.put".into(),
                source: "/kv/b".into(),
                subject: Some("dir/naïve key".into()),
                time_ms: 1_700_000_000_123,
                content_type: Some("text/plain".into()),
                data: b"v".to_vec(),
            },
            path: None,
            trigger_id: Some(1),
            retry: None,
            enqueued_ms: 0,
        };
        let request = cloud_event_request(&delivery, b"v".to_vec()).unwrap();
        let header = |name: &str| request.headers()[name].to_str().unwrap().to_string();
        assert_eq!(header("ce-specversion"), "1.0");
        assert_eq!(header("ce-subject"), "dir/na%C3%AFve%20key");
        assert_eq!(header("ce-time"), "2023-11-14T22:13:20.123Z");
        assert_eq!(header("mayfly-attempt"), "2");
        assert_eq!(header("content-type"), "text/plain");
        assert_eq!(request.uri(), "/");
        assert_eq!(trigger_label("dev.mayfly.object.deleted"), "object");
    }
}
