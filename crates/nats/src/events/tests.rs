//! Fleet behaviour: several nodes (connections) on one event store.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mayfly_store::{
    CloudEvent, EventQueue, InboxEvent, KvCondition, KvStore, QueueRef, RetryPolicy, Settlement,
    TriggerChange, TriggerSource, TriggerSpec, TriggerStore,
};

use super::NatsEvents;
use crate::Fleet;
use crate::testing::NatsServers;

/// A node: its own connection and its own local directory.
async fn node(servers: &NatsServers, name: &str, dir: &tempfile::TempDir) -> NatsEvents {
    let fleet = Fleet::connect(&servers.options(name, "t")).await.unwrap();
    NatsEvents::open(&fleet, &dir.path().join(name))
        .await
        .unwrap()
}

fn inbox() -> QueueRef {
    QueueRef::Inbox("f".into())
}

fn event(id: &str) -> InboxEvent {
    InboxEvent {
        event: CloudEvent {
            id: id.into(),
            ty: "dev.mayfly.test".into(),
            source: "/test".into(),
            subject: None,
            time_ms: 1,
            content_type: None,
            data: id.as_bytes().to_vec(),
        },
        path: None,
        trigger_id: None,
        retry: RetryPolicy::default(),
    }
}

/// Claims and acknowledges until `total` events were seen by the fleet
/// (`seen` counts every node's), returning this node's.
async fn drain(
    store: &NatsEvents,
    total: usize,
    seen: &std::sync::atomic::AtomicUsize,
) -> Vec<String> {
    use std::sync::atomic::Ordering;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut mine = Vec::new();
    let mut settled = Vec::new();
    while seen.load(Ordering::SeqCst) < total {
        assert!(
            Instant::now() < deadline,
            "the fleet got only {seen:?} of {total}"
        );
        // As the dispatcher does, a failed call (a JetStream API call that
        // timed out while a young cluster settles) keeps its settlements
        // for the next one.
        let got = match store.settle_and_claim(&settled, &inbox(), 3, 60_000).await {
            Ok(got) => got,
            Err(error) => {
                eprintln!("claim failed, trying again: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        settled = got
            .iter()
            .map(|d| Settlement::Ack {
                id: d.id,
                attempt: d.attempt,
            })
            .collect();
        seen.fetch_add(got.len(), Ordering::SeqCst);
        mine.extend(got.into_iter().map(|d| d.event.id));
        tokio::task::yield_now().await;
    }
    store
        .settle_and_claim(&settled, &inbox(), 0, 60_000)
        .await
        .unwrap();
    mine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_claiming_one_inbox_never_get_the_same_event() {
    let servers = NatsServers::single();
    let dir = tempfile::tempdir().unwrap();
    let a = node(&servers, "a", &dir).await;
    let b = node(&servers, "b", &dir).await;
    const TOTAL: usize = 60;
    for i in 0..TOTAL {
        let by = if i % 2 == 0 { &a } else { &b };
        by.enqueue("f", &event(&format!("e{i}"))).await.unwrap();
    }
    let seen = std::sync::atomic::AtomicUsize::new(0);
    let (from_a, from_b) = tokio::join!(drain(&a, TOTAL, &seen), drain(&b, TOTAL, &seen));
    let a_ids: HashSet<&String> = from_a.iter().collect();
    let b_ids: HashSet<&String> = from_b.iter().collect();
    assert_eq!(a_ids.len(), from_a.len(), "a got an event twice");
    assert_eq!(b_ids.len(), from_b.len(), "b got an event twice");
    assert!(
        a_ids.is_disjoint(&b_ids),
        "both nodes got {:?}",
        a_ids.intersection(&b_ids)
    );
    assert_eq!(a_ids.len() + b_ids.len(), TOTAL);
    assert!(a.depths().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_dead_nodes_claim_is_redelivered_to_another_after_its_lease() {
    let servers = NatsServers::single();
    let dir = tempfile::tempdir().unwrap();
    let a = node(&servers, "a", &dir).await;
    let b = node(&servers, "b", &dir).await;
    a.enqueue("f", &event("e1")).await.unwrap();
    let claimed = a.settle_and_claim(&[], &inbox(), 10, 1_000).await.unwrap();
    assert_eq!(claimed.len(), 1);
    // Node a disappears without settling; its leases are its own, so b's
    // restart does not release them.
    drop(a);
    assert_eq!(b.release_leases().await.unwrap(), 0);
    assert!(
        b.settle_and_claim(&[], &inbox(), 10, 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    let next = b.next_visible(&inbox()).await.unwrap().unwrap();
    assert!(next >= claimed[0].enqueued_ms + 1_000);

    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        let got = b.settle_and_claim(&[], &inbox(), 10, 60_000).await.unwrap();
        if !got.is_empty() {
            break got;
        }
        assert!(Instant::now() < deadline, "never redelivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, claimed[0].id);
    assert_eq!(again[0].event.id, "e1");
    assert_eq!(again[0].attempt, 2);
    // The dead node's receipt no longer settles it.
    let stale = Settlement::Ack {
        id: claimed[0].id,
        attempt: 1,
    };
    b.settle_and_claim(&[stale], &inbox(), 0, 0).await.unwrap();
    assert_eq!(b.depths().await.unwrap(), [(inbox(), 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_slot_fired_by_two_nodes_yields_one_event() {
    let servers = NatsServers::single();
    let dir = tempfile::tempdir().unwrap();
    let a = node(&servers, "a", &dir).await;
    let b = node(&servers, "b", &dir).await;
    let spec = TriggerSpec {
        source: TriggerSource::Schedule {
            schedule: "@every 1m".into(),
        },
        retry: RetryPolicy::default(),
        alias: None,
    };
    let (trigger, _) = a.add_trigger("f", &spec).await.unwrap();
    let seen_by_b = b.triggers(Some("f")).await.unwrap();
    assert_eq!(seen_by_b, std::slice::from_ref(&trigger));
    for slot in 1..=5 {
        // Slots a few ms apart, so their events are due by the claim below.
        let fired_ms = trigger.created_ms + slot;
        // Each node read the trigger as it was after the last slot.
        let current = a.triggers(Some("f")).await.unwrap().remove(0);
        let on_a = CloudEvent::schedule(&current, "@every 1m", fired_ms, "t");
        let on_b = CloudEvent::schedule(&current, "@every 1m", fired_ms, "t");
        let (x, y) = tokio::join!(
            a.fire_schedule(&current, &on_a, fired_ms),
            b.fire_schedule(&current, &on_b, fired_ms),
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(x != y, "slot {slot}: exactly one node fires it ({x}, {y})");
        // A node that comes back later with the old read fires nothing.
        assert!(!b.fire_schedule(&current, &on_b, fired_ms).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let got = b
        .settle_and_claim(&[], &inbox(), 100, 60_000)
        .await
        .unwrap();
    assert_eq!(got.len(), 5, "{got:?}");
    let slots: Vec<i64> = got.iter().map(|d| d.event.time_ms).collect();
    let expected: Vec<i64> = (1..=5).map(|s| trigger.created_ms + s).collect();
    assert_eq!(slots, expected);
}

#[tokio::test]
async fn a_trigger_attached_on_one_node_is_heard_and_used_by_another() {
    let servers = NatsServers::single();
    let dir = tempfile::tempdir().unwrap();
    let a = node(&servers, "a", &dir).await;
    let b = node(&servers, "b", &dir).await;
    let mut feed = b.watch();
    let spec = TriggerSpec {
        source: TriggerSource::Kv {
            bucket: "b".into(),
            prefix: String::new(),
        },
        retry: RetryPolicy::default(),
        alias: None,
    };
    let (trigger, _) = a.add_trigger("f", &spec).await.unwrap();
    let change = tokio::time::timeout(Duration::from_secs(5), feed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        change,
        TriggerChange::Added {
            id: trigger.id,
            function: "f".into()
        }
    );
    // b's write reaches the trigger a attached, and a delivers it.
    b.kv_put("b", "k", b"v", KvCondition::Any).await.unwrap();
    let got = a.settle_and_claim(&[], &inbox(), 10, 60_000).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].trigger_id, Some(trigger.id));
    assert!(a.remove_trigger(trigger.id).await.unwrap());
    let change = tokio::time::timeout(Duration::from_secs(5), feed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(change, TriggerChange::Removed { id: trigger.id });
}

#[tokio::test]
async fn an_object_written_on_one_node_is_read_on_another() {
    use mayfly_store::ObjectStore;
    let servers = NatsServers::single();
    let dir = tempfile::tempdir().unwrap();
    let a = node(&servers, "a", &dir).await;
    let b = node(&servers, "b", &dir).await;
    // Several chunks of the object store and of the download.
    let bytes: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    let meta = a
        .object_put("pics", "cat.png", &bytes, "image/png")
        .await
        .unwrap();
    // b has no copy of its own: it downloads the bytes.
    let (seen, path) = b.object_get("pics", "cat.png").await.unwrap().unwrap();
    assert_eq!(seen, meta);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(path.starts_with(dir.path().join("b")));
    assert!(b.object_delete("pics", "cat.png").await.unwrap());
    assert!(a.object_get("pics", "cat.png").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_three_server_cluster_nodes_share_an_inbox_and_a_slot_fires_once() {
    let servers = NatsServers::cluster(3);
    let dir = tempfile::tempdir().unwrap();
    let a = node(&servers, "a", &dir).await;
    let b = node(&servers, "b", &dir).await;
    // A stale expectation in a batch is a conflict on a cluster too.
    let stale = [crate::batch::Write::put("x", "1").expect(12_345)];
    let stale = a.hub.commit(&stale).await;
    assert!(matches!(stale, Ok(None)), "{stale:?}");
    const TOTAL: usize = 20;
    for i in 0..TOTAL {
        a.enqueue("f", &event(&format!("e{i}"))).await.unwrap();
    }
    let seen = std::sync::atomic::AtomicUsize::new(0);
    let (from_a, from_b) = tokio::join!(drain(&a, TOTAL, &seen), drain(&b, TOTAL, &seen));
    let all: HashSet<&String> = from_a.iter().chain(&from_b).collect();
    assert_eq!(all.len(), TOTAL);
    assert_eq!(from_a.len() + from_b.len(), TOTAL);

    let spec = TriggerSpec {
        source: TriggerSource::Schedule {
            schedule: "@every 1m".into(),
        },
        retry: RetryPolicy::default(),
        alias: None,
    };
    let (trigger, _) = b.add_trigger("f", &spec).await.unwrap();
    let fired_ms = trigger.created_ms + 1;
    let tick = CloudEvent::schedule(&trigger, "@every 1m", fired_ms, "t");
    let (x, y) = tokio::join!(
        a.fire_schedule(&trigger, &tick, fired_ms),
        b.fire_schedule(&trigger, &tick, fired_ms),
    );
    assert!(x.unwrap() != y.unwrap());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        a.settle_and_claim(&[], &inbox(), 10, 60_000)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn work_stored_on_one_node_is_hinted_to_the_others_not_to_itself() {
    let servers = NatsServers::single();
    let dir = tempfile::tempdir().unwrap();
    let a = node(&servers, "a", &dir).await;
    let b = node(&servers, "b", &dir).await;
    let mut heard_by_a = a.work_hints().expect("a fleet store hints");
    let mut heard_by_b = b.work_hints().expect("a fleet store hints");

    a.send("jobs", &[(None, b"one".to_vec())]).await.unwrap();
    let hint = tokio::time::timeout(Duration::from_secs(10), heard_by_b.recv())
        .await
        .expect("b hears of a's message")
        .unwrap();
    assert_eq!(hint.queue, QueueRef::Named("jobs".into()));

    // A retry is hinted with when it becomes due.
    let claimed = b
        .settle_and_claim(&[], &QueueRef::Named("jobs".into()), 1, 60_000)
        .await
        .unwrap();
    let retry = Settlement::Retry {
        id: claimed[0].id,
        attempt: claimed[0].attempt,
        delay_ms: 5_000,
        error: "try later".into(),
    };
    b.settle_and_claim(&[retry], &QueueRef::Named("jobs".into()), 0, 0)
        .await
        .unwrap();
    let hint = tokio::time::timeout(Duration::from_secs(10), heard_by_a.recv())
        .await
        .expect("a hears of b's retry")
        .unwrap();
    assert!(hint.due_ms > claimed[0].event.time_ms, "{hint:?}");

    // Neither heard its own writes: a's only hint was b's retry.
    assert!(heard_by_a.try_recv().is_err());
    assert!(heard_by_b.try_recv().is_err());
}

#[tokio::test]
async fn a_queue_placed_at_a_site_works_there_while_cut_off_and_a_hub_queue_names_the_hub() {
    use mayfly_store::StoreError;

    use super::sites::SITE_ID_BASE;

    let servers = NatsServers::hub_with_sites(&["site-a"]);
    let dir = tempfile::tempdir().unwrap();
    let hub_fleet = Fleet::connect(&servers.hub_options("h", "t"))
        .await
        .unwrap();
    let hub = NatsEvents::open(&hub_fleet, &dir.path().join("h"))
        .await
        .unwrap();
    let edge_fleet = Fleet::connect(&servers.site_options("site-a", "e", "t"))
        .await
        .unwrap();
    let edge = NatsEvents::open(&edge_fleet, &dir.path().join("e"))
        .await
        .unwrap();
    let mut hints = edge.work_hints().unwrap();
    let queue = "orders@site-a";
    let named = QueueRef::Named(queue.into());

    // Sent at the hub, stored at the site (its ids are the site's),
    // hinted to the site's node and claimed there.
    let ids = hub
        .send(queue, &[(None, b"from the hub".to_vec())])
        .await
        .unwrap();
    assert!(ids[0] > SITE_ID_BASE, "{ids:?}");
    let hint = tokio::time::timeout(Duration::from_secs(10), hints.recv())
        .await
        .expect("no hint reached the site")
        .unwrap();
    assert_eq!(hint.queue, named);
    let got = edge.receive(queue, 10, 30_000).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event.data, b"from the hub");
    // The hub node reads the site's queue through its domain too.
    hub.send(queue, &[(None, b"for the hub".to_vec())])
        .await
        .unwrap();
    let theirs = hub.receive(queue, 10, 30_000).await.unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].event.data, b"for the hub");
    assert_eq!(
        hub.ack(queue, theirs[0].id, theirs[0].attempt)
            .await
            .unwrap(),
        mayfly_store::AckOutcome::Acked
    );
    assert_eq!(
        edge.ack(queue, got[0].id, got[0].attempt).await.unwrap(),
        mayfly_store::AckOutcome::Acked
    );

    // Cut off: the site's queue works end to end, its last failure
    // included (a dead letter in the site's bucket).
    servers.link("site-a").cut();
    servers.wait_unlinked("site-a");
    edge.send(queue, &[(None, b"during the cut".to_vec())])
        .await
        .unwrap();
    let got = edge
        .settle_and_claim(&[], &named, 10, 30_000)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event.data, b"during the cut");
    let dead = Settlement::Dead {
        id: got[0].id,
        attempt: got[0].attempt,
        function: "f".into(),
        retry: RetryPolicy::default(),
        trigger_id: None,
        error: "boom".into(),
    };
    assert!(
        edge.settle_and_claim(&[dead], &named, 10, 30_000)
            .await
            .unwrap()
            .is_empty()
    );
    // The hub's queues are out of reach, and the error says so; so is
    // the site's queue from the hub.
    let err = edge
        .send("orders", &[(None, b"x".to_vec())])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("the hub (JetStream domain `hub`)")
            && text.contains("unreachable from site `site-a`")
            && text.contains("`orders@site-a`"),
        "{text}"
    );
    let err = hub.send(queue, &[(None, b"x".to_vec())]).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("site `site-a`") && m.contains("from the hub")),
        "{err:?}"
    );

    // Healed: the site's dead letter is listed with the hub's, and a
    // redrive puts it in the function's inbox at the hub.
    servers.link("site-a").heal();
    servers.wait_linked("site-a");
    let letters = eventually_ok(|| edge.dead_letters("f", 0, 10)).await;
    assert_eq!(letters.len(), 1);
    assert!(letters[0].id > SITE_ID_BASE);
    let letter = edge.dead_letter("f", letters[0].id).await.unwrap().unwrap();
    assert_eq!(letter.data.as_deref(), Some(&b"during the cut"[..]));
    assert_eq!(edge.redrive("f", None).await.unwrap(), 1);
    assert!(edge.dead_letters("f", 0, 10).await.unwrap().is_empty());
    let got = hub
        .settle_and_claim(&[], &inbox(), 10, 30_000)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event.data, b"during the cut");
}

/// `call`'s result once it succeeds (a link that just healed may still
/// refuse a call or two), within 10 s.
async fn eventually_ok<T, F: std::future::Future<Output = mayfly_store::Result<T>>>(
    call: impl Fn() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call().await {
            Ok(value) => return value,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "not yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("{error}"),
        }
    }
}
