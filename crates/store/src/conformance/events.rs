//! The event contracts: [`KvStore`], [`ObjectStore`], [`EventQueue`] and
//! [`TriggerStore`], and the events a change causes.
#![allow(missing_docs)] // Each case's name says what it checks.

use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::*;

/// Puts `value` unconditionally and returns its revision.
async fn put(store: &Stores, bucket: &str, key: &str, value: &[u8]) -> u64 {
    store
        .kv
        .kv_put(bucket, key, value, KvCondition::Any)
        .await
        .unwrap()
}

/// Attaches `spec` to `function`: the trigger, and whether it is new.
async fn attach(store: &Stores, function: &str, spec: &TriggerSpec) -> (Trigger, bool) {
    store.triggers.add_trigger(function, spec).await.unwrap()
}

fn inbox_of(function: &str) -> QueueRef {
    QueueRef::Inbox(function.to_string())
}

/// Claims up to 10 events of `function`'s inbox for a minute, settling
/// `settled` first.
async fn claim_inbox(store: &Stores, settled: &[Settlement], function: &str) -> Vec<Delivery> {
    store
        .queues
        .settle_and_claim(settled, &inbox_of(function), 10, 60_000)
        .await
        .unwrap()
}

fn ack(d: &Delivery) -> Settlement {
    Settlement::Ack {
        id: d.id,
        attempt: d.attempt,
    }
}

fn retry(d: &Delivery, delay_ms: u64) -> Settlement {
    Settlement::Retry {
        id: d.id,
        attempt: d.attempt,
        delay_ms,
        error: "boom".into(),
    }
}

fn postpone(d: &Delivery, delay_ms: u64) -> Settlement {
    Settlement::Postpone {
        id: d.id,
        attempt: d.attempt,
        delay_ms,
    }
}

fn dead(d: &Delivery, function: &str, error: &str) -> Settlement {
    Settlement::Dead {
        id: d.id,
        attempt: d.attempt,
        function: function.into(),
        retry: RetryPolicy {
            max_attempts: 4,
            backoff_ms: 250,
        },
        trigger_id: d.trigger_id,
        error: error.into(),
    }
}

fn kv_spec(bucket: &str, prefix: &str) -> TriggerSpec {
    TriggerSpec {
        source: TriggerSource::Kv {
            bucket: bucket.into(),
            prefix: prefix.into(),
        },
        retry: RetryPolicy::default(),
        alias: None,
    }
}

fn schedule_spec(schedule: &str) -> TriggerSpec {
    TriggerSpec {
        source: TriggerSource::Schedule {
            schedule: schedule.into(),
        },
        retry: RetryPolicy::default(),
        alias: None,
    }
}

fn event(id: &str, data: &[u8]) -> CloudEvent {
    CloudEvent {
        id: id.into(),
        ty: "dev.mayfly.test".into(),
        source: "/test".into(),
        subject: Some(format!("subject-{id}")),
        time_ms: 1_700_000_000_000,
        content_type: Some("text/plain".into()),
        data: data.to_vec(),
    }
}

fn inbox_event(id: &str, data: &[u8]) -> InboxEvent {
    InboxEvent {
        event: event(id, data),
        path: Some("/hook".into()),
        trigger_id: None,
        retry: RetryPolicy {
            max_attempts: 5,
            backoff_ms: 200,
        },
    }
}

fn now() -> i64 {
    now_ms()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn is_precondition_failed<T: std::fmt::Debug>(result: Result<T>) -> bool {
    matches!(result, Err(StoreError::PreconditionFailed(_)))
}

fn keys(list: &[KvKey]) -> Vec<&str> {
    list.iter().map(|k| k.key.as_str()).collect()
}

fn object_keys(list: &[ObjectMeta]) -> Vec<&str> {
    list.iter().map(|o| o.key.as_str()).collect()
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

// ---------------------------------------------------------------- queues

fn messages(texts: &[&str]) -> Vec<(Option<String>, Vec<u8>)> {
    texts
        .iter()
        .map(|t| (Some("text/plain".to_string()), t.as_bytes().to_vec()))
        .collect()
}

/// Receives from `queue` until something comes, for up to five seconds.
async fn receive_within(store: &Stores, queue: &str) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = store.queues.receive(queue, 10, 60_000).await.unwrap();
        if !got.is_empty() || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------- KV

pub async fn kv_put_and_get_round_trip<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let before = now();
    let revision = put(&store, "b", "k", b"value").await;
    let entry = store.kv.kv_get("b", "k").await.unwrap().unwrap();
    assert_eq!(entry.value, b"value");
    assert_eq!(entry.revision, revision);
    assert!(entry.updated_ms >= before && entry.updated_ms <= now());
    assert!(store.kv.kv_get("b", "missing").await.unwrap().is_none());
    assert!(store.kv.kv_get("other", "k").await.unwrap().is_none());

    // Overwrite, and an empty value.
    let second = put(&store, "b", "k", b"").await;
    let entry = store.kv.kv_get("b", "k").await.unwrap().unwrap();
    assert!(entry.value.is_empty());
    assert_eq!(entry.revision, second);
}

pub async fn kv_revisions_increase_across_keys_and_are_never_reused<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let mut seen = vec![
        put(&store, "b", "a", b"1").await,
        put(&store, "b", "b", b"1").await,
        put(&store, "c", "a", b"1").await,
        put(&store, "b", "a", b"2").await,
    ];
    assert!(
        store
            .kv
            .kv_delete("b", "a", KvCondition::Any)
            .await
            .unwrap()
    );
    assert!(store.kv.kv_get("b", "a").await.unwrap().is_none());
    let recreated = store
        .kv
        .kv_put("b", "a", b"3", KvCondition::Absent)
        .await
        .unwrap();
    seen.push(recreated);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "revisions must strictly increase: {seen:?}"
    );
    assert!(seen[0] >= 1);
    // A compare-and-swap with the revision from before the delete fails.
    assert!(is_precondition_failed(
        store
            .kv
            .kv_put("b", "a", b"4", KvCondition::Revision(seen[3]))
            .await
    ));
    assert_eq!(
        store.kv.kv_get("b", "a").await.unwrap().unwrap().value,
        b"3"
    );
}

pub async fn kv_compare_and_swap_by_revision<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let r1 = put(&store, "b", "k", b"one").await;
    let r2 = store
        .kv
        .kv_put("b", "k", b"two", KvCondition::Revision(r1))
        .await
        .unwrap();
    assert!(r2 > r1);

    // The old revision no longer matches: nothing changes.
    let err = store
        .kv
        .kv_put("b", "k", b"three", KvCondition::Revision(r1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::PreconditionFailed(_)), "{err:?}");
    let entry = store.kv.kv_get("b", "k").await.unwrap().unwrap();
    assert_eq!(entry.value, b"two");
    assert_eq!(entry.revision, r2);

    // A revision for a key that does not exist fails too.
    assert!(is_precondition_failed(
        store
            .kv
            .kv_put("b", "new", b"x", KvCondition::Revision(r2))
            .await
    ));
    assert!(store.kv.kv_get("b", "new").await.unwrap().is_none());

    // The following write still gets a larger revision.
    let r3 = store
        .kv
        .kv_put("b", "k", b"three", KvCondition::Revision(r2))
        .await
        .unwrap();
    assert!(r3 > r2);
}

pub async fn kv_put_if_absent<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let r1 = store
        .kv
        .kv_put("b", "k", b"first", KvCondition::Absent)
        .await
        .unwrap();
    assert!(is_precondition_failed(
        store
            .kv
            .kv_put("b", "k", b"second", KvCondition::Absent)
            .await
    ));
    let entry = store.kv.kv_get("b", "k").await.unwrap().unwrap();
    assert_eq!(entry.value, b"first");
    assert_eq!(entry.revision, r1);
    // Same key in another bucket is absent there.
    store
        .kv
        .kv_put("c", "k", b"other", KvCondition::Absent)
        .await
        .unwrap();
}

pub async fn kv_delete_with_conditions<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let r1 = put(&store, "b", "k", b"v").await;

    assert!(is_precondition_failed(
        store
            .kv
            .kv_delete("b", "k", KvCondition::Revision(r1 + 100))
            .await
    ));
    assert!(store.kv.kv_get("b", "k").await.unwrap().is_some());
    assert!(is_precondition_failed(
        store.kv.kv_delete("b", "k", KvCondition::Absent).await
    ));
    assert!(store.kv.kv_get("b", "k").await.unwrap().is_some());

    assert!(
        store
            .kv
            .kv_delete("b", "k", KvCondition::Revision(r1))
            .await
            .unwrap()
    );
    assert!(store.kv.kv_get("b", "k").await.unwrap().is_none());
    assert!(
        !store
            .kv
            .kv_delete("b", "k", KvCondition::Any)
            .await
            .unwrap()
    );
    assert!(is_precondition_failed(
        store
            .kv
            .kv_delete("b", "k", KvCondition::Revision(r1))
            .await
    ));
}

pub async fn kv_list_by_prefix_with_paging<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    for key in ["a/1", "a/2", "a/3", "a/30", "ab", "b/1", "a", "é/1"] {
        store
            .kv
            .kv_put("b", key, key.as_bytes(), KvCondition::Any)
            .await
            .unwrap();
    }
    put(&store, "other", "a/9", b"x").await;

    let all = store.kv.kv_list("b", "", "", 100).await.unwrap();
    assert_eq!(
        keys(&all),
        ["a", "a/1", "a/2", "a/3", "a/30", "ab", "b/1", "é/1"]
    );

    let first = store.kv.kv_list("b", "a/", "", 2).await.unwrap();
    assert_eq!(keys(&first), ["a/1", "a/2"]);
    let second = store.kv.kv_list("b", "a/", &first[1].key, 2).await.unwrap();
    assert_eq!(keys(&second), ["a/3", "a/30"]);
    let third = store
        .kv
        .kv_list("b", "a/", &second[1].key, 2)
        .await
        .unwrap();
    assert!(third.is_empty());

    // Size and revision of each key.
    let entry = store.kv.kv_get("b", "a/30").await.unwrap().unwrap();
    let listed = &second[1];
    assert_eq!(listed.size, 4);
    assert_eq!(listed.revision, entry.revision);
    assert_eq!(listed.updated_ms, entry.updated_ms);

    assert_eq!(
        keys(&store.kv.kv_list("b", "é", "", 10).await.unwrap()),
        ["é/1"]
    );
    assert!(store.kv.kv_list("b", "a/", "", 0).await.unwrap().is_empty());
    assert!(
        store
            .kv
            .kv_list("b", "zz", "", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .kv
            .kv_list("none", "", "", 10)
            .await
            .unwrap()
            .is_empty()
    );
    // `after` before the prefix's range changes nothing.
    assert_eq!(
        keys(&store.kv.kv_list("b", "a/3", "0", 10).await.unwrap()),
        ["a/3", "a/30"]
    );
}

pub async fn kv_list_prefix_is_literal<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    for key in ["a%b", "a%c", "axb", "a_b", "aXb", "a/b", "a\\b", "abc"] {
        put(&store, "b", key, b"1").await;
    }
    // As LIKE patterns, `a%` would match everything and `a_` most keys.
    assert_eq!(
        keys(&store.kv.kv_list("b", "a%", "", 10).await.unwrap()),
        ["a%b", "a%c"]
    );
    assert_eq!(
        keys(&store.kv.kv_list("b", "a_", "", 10).await.unwrap()),
        ["a_b"]
    );
    assert_eq!(
        keys(&store.kv.kv_list("b", "a/", "", 10).await.unwrap()),
        ["a/b"]
    );
    assert_eq!(
        keys(&store.kv.kv_list("b", "a\\", "", 10).await.unwrap()),
        ["a\\b"]
    );
    assert_eq!(
        keys(&store.kv.kv_list("b", "a%", "a%b", 10).await.unwrap()),
        ["a%c"]
    );
    assert!(store.kv.kv_list("b", "%", "", 10).await.unwrap().is_empty());
    assert!(store.kv.kv_list("b", "_", "", 10).await.unwrap().is_empty());
}

pub async fn kv_buckets_count_keys_and_bytes<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    assert!(store.kv.kv_buckets().await.unwrap().is_empty());
    put(&store, "b", "x", b"12345").await;
    put(&store, "b", "y", b"123").await;
    put(&store, "a", "x", b"").await;
    put(&store, "b", "x", b"1").await;
    assert_eq!(
        store.kv.kv_buckets().await.unwrap(),
        [
            BucketStats {
                bucket: "a".into(),
                entries: 1,
                bytes: 0
            },
            BucketStats {
                bucket: "b".into(),
                entries: 2,
                bytes: 4
            },
        ]
    );
    store
        .kv
        .kv_delete("a", "x", KvCondition::Any)
        .await
        .unwrap();
    store
        .kv
        .kv_delete("b", "y", KvCondition::Any)
        .await
        .unwrap();
    assert_eq!(
        store.kv.kv_buckets().await.unwrap(),
        [BucketStats {
            bucket: "b".into(),
            entries: 1,
            bytes: 1
        }]
    );
}

// ---------------------------------------------------------------- KV triggers

pub async fn kv_trigger_delivers_puts_and_deletes_under_its_prefix<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let spec = TriggerSpec {
        source: TriggerSource::Kv {
            bucket: "b".into(),
            prefix: "p/".into(),
        },
        retry: RetryPolicy {
            max_attempts: 7,
            backoff_ms: 50,
        },
        alias: None,
    };
    let (trigger, created) = attach(&store, "f", &spec).await;
    assert!(created);

    let before = now();
    put(&store, "b", "p/x", b"hello").await;
    put(&store, "b", "q/x", b"outside").await;
    put(&store, "b", "p", b"prefix only").await;
    put(&store, "c", "p/x", b"other bucket").await;
    // A failed write emits nothing, nor does deleting a missing key.
    assert!(is_precondition_failed(
        store
            .kv
            .kv_put("b", "p/x", b"nope", KvCondition::Absent)
            .await
    ));
    assert!(
        !store
            .kv
            .kv_delete("b", "p/missing", KvCondition::Any)
            .await
            .unwrap()
    );
    put(&store, "b", "p/y", b"y").await;
    assert!(
        store
            .kv
            .kv_delete("b", "p/x", KvCondition::Any)
            .await
            .unwrap()
    );

    // p/x's put and p/y's put first (p/x's delete waits for its put).
    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got.len(), 2, "{got:?}");
    let put = &got[0];
    assert_eq!(put.attempt, 1);
    assert_eq!(put.event.ty, "dev.mayfly.kv.put");
    assert_eq!(put.event.subject.as_deref(), Some("p/x"));
    assert_eq!(put.event.source, "/kv/b");
    assert_eq!(put.event.data, b"hello");
    assert!(put.event.time_ms >= before && put.event.time_ms <= now());
    assert!(!put.event.id.is_empty());
    assert_eq!(put.trigger_id, Some(trigger.id));
    assert_eq!(put.retry, Some(spec.retry));
    assert_eq!(put.path, None);
    assert_eq!(got[1].event.subject.as_deref(), Some("p/y"));
    assert_eq!(got[1].event.data, b"y");
    assert_ne!(got[0].event.id, got[1].event.id);

    let got = claim_inbox(&store, &[ack(&got[0]), ack(&got[1])], "f").await;
    assert_eq!(got.len(), 1, "{got:?}");
    let delete = &got[0];
    assert_eq!(delete.event.ty, "dev.mayfly.kv.delete");
    assert_eq!(delete.event.subject.as_deref(), Some("p/x"));
    assert_eq!(delete.event.source, "/kv/b");
    assert!(delete.event.data.is_empty());

    assert!(claim_inbox(&store, &[ack(delete)], "f").await.is_empty());
    assert_eq!(
        store.queues.next_visible(&inbox_of("f")).await.unwrap(),
        None
    );
    // Nobody else got anything.
    assert!(claim_inbox(&store, &[], "g").await.is_empty());
}

pub async fn kv_trigger_prefix_is_literal<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    attach(&store, "f", &kv_spec("b", "a_")).await;
    put(&store, "b", "ab", b"1").await;
    put(&store, "b", "a%", b"1").await;
    put(&store, "b", "a_1", b"1").await;
    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].event.subject.as_deref(), Some("a_1"));
}

pub async fn kv_events_are_delivered_one_at_a_time_per_key<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    attach(&store, "f", &kv_spec("b", "")).await;
    put(&store, "b", "k", b"1").await;
    put(&store, "b", "k", b"2").await;
    put(&store, "b", "other", b"1").await;

    let got = claim_inbox(&store, &[], "f").await;
    let seen: Vec<(Option<&str>, &[u8])> = got
        .iter()
        .map(|d| (d.event.subject.as_deref(), d.event.data.as_slice()))
        .collect();
    assert_eq!(seen, [(Some("k"), &b"1"[..]), (Some("other"), &b"1"[..])]);
    let (first_k, other) = (&got[0], &got[1]);

    // Still blocked while the first is leased.
    assert!(claim_inbox(&store, &[], "f").await.is_empty());

    let got = claim_inbox(&store, &[ack(first_k)], "f").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].event.subject.as_deref(), Some("k"));
    assert_eq!(got[0].event.data, b"2");
    assert_eq!(got[0].attempt, 1);
    assert!(
        claim_inbox(&store, &[ack(&got[0]), ack(other)], "f")
            .await
            .is_empty()
    );
    assert!(store.queues.depths().await.unwrap().is_empty());
}

pub async fn a_retried_kv_event_still_blocks_later_ones_of_its_key<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    attach(&store, "f", &kv_spec("b", "")).await;
    put(&store, "b", "k", b"1").await;
    put(&store, "b", "k", b"2").await;

    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got.len(), 1, "{got:?}");
    let first = got[0].clone();
    assert_eq!(first.event.data, b"1");

    // Retried at once: the first comes back, the second still waits.
    let got = claim_inbox(&store, &[retry(&first, 0)], "f").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].id, first.id);
    assert_eq!(got[0].event.id, first.event.id);
    assert_eq!(got[0].attempt, 2);
    let first = got[0].clone();

    // Retried later: nothing at all, not even the second.
    assert!(
        claim_inbox(&store, &[retry(&first, 60_000)], "f")
            .await
            .is_empty()
    );

    // A retry is not a lease: restarting the dispatcher does not hand it out.
    store.queues.release_leases().await.unwrap();
    let got = claim_inbox(&store, &[], "f").await;
    assert!(got.is_empty(), "{got:?}");

    // Retried again with no delay (same attempt: it was never re-claimed).
    let got = claim_inbox(
        &store,
        &[Settlement::Retry {
            id: first.id,
            attempt: first.attempt,
            delay_ms: 0,
            error: "again".into(),
        }],
        "f",
    )
    .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, first.id);
    // Once it goes to the dead-letter queue, the second is handed out.
    let got = claim_inbox(&store, &[dead(&got[0], "f", "gave up")], "f").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].event.data, b"2");
    assert_eq!(
        store.queues.dead_letters("f", 0, 10).await.unwrap().len(),
        1
    );
}

pub async fn next_visible_ignores_events_waiting_behind_their_key<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    attach(&store, "f", &kv_spec("b", "")).await;
    put(&store, "b", "k", b"1").await;
    put(&store, "b", "k", b"2").await;
    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got.len(), 1);
    let before = now();
    assert!(
        claim_inbox(&store, &[retry(&got[0], 60_000)], "f")
            .await
            .is_empty()
    );
    // Nothing can be claimed before the retried head of `k` is due, so the
    // dispatcher should sleep until then rather than poll at once (or at
    // its idle interval, which delays a short backoff).
    let next = store
        .queues
        .next_visible(&inbox_of("f"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        next >= before + 60_000,
        "next visible at {next}, before {before}"
    );
}

pub async fn every_watching_function_gets_its_own_copy<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    attach(&store, "f", &kv_spec("b", "")).await;
    attach(&store, "g", &kv_spec("b", "k")).await;
    put(&store, "b", "k", b"v").await;
    let f = claim_inbox(&store, &[], "f").await;
    let g = claim_inbox(&store, &[], "g").await;
    assert_eq!((f.len(), g.len()), (1, 1));
    assert_ne!(f[0].event.id, g[0].event.id);
    assert_eq!(f[0].event.data, g[0].event.data);
    assert_ne!(f[0].trigger_id, g[0].trigger_id);
}

pub async fn a_removed_kv_trigger_emits_nothing<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let (trigger, _) = attach(&store, "f", &kv_spec("b", "")).await;
    assert!(store.triggers.remove_trigger(trigger.id).await.unwrap());
    put(&store, "b", "k", b"v").await;
    assert!(claim_inbox(&store, &[], "f").await.is_empty());
}

pub async fn object_list_by_prefix_with_paging<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    for key in [
        "img/a.png",
        "img/b.png",
        "img/c.jpg",
        "img%x",
        "img_y",
        "imgz",
        "doc/a",
    ] {
        store
            .objects
            .object_put("b", key, key.as_bytes(), "text/plain")
            .await
            .unwrap();
    }
    store
        .objects
        .object_put("other", "img/z.png", b"z", "text/plain")
        .await
        .unwrap();

    let page = store.objects.object_list("b", "img/", "", 2).await.unwrap();
    assert_eq!(object_keys(&page), ["img/a.png", "img/b.png"]);
    assert_eq!(page[0].size, 9);
    assert_eq!(page[0].etag, format!("\"{}\"", sha256_hex(b"img/a.png")));
    assert_eq!(page[0].bucket, "b");
    assert_eq!(page[0].content_type, "text/plain");
    let page = store
        .objects
        .object_list("b", "img/", "img/b.png", 2)
        .await
        .unwrap();
    assert_eq!(object_keys(&page), ["img/c.jpg"]);
    assert_eq!(
        object_keys(
            &store
                .objects
                .object_list("b", "img%", "", 10)
                .await
                .unwrap()
        ),
        ["img%x"]
    );
    assert_eq!(
        object_keys(
            &store
                .objects
                .object_list("b", "img_", "", 10)
                .await
                .unwrap()
        ),
        ["img_y"]
    );
    assert_eq!(
        store
            .objects
            .object_list("b", "", "", 100)
            .await
            .unwrap()
            .len(),
        7
    );
    assert!(
        store
            .objects
            .object_list("none", "", "", 100)
            .await
            .unwrap()
            .is_empty()
    );

    let buckets = store.objects.object_buckets().await.unwrap();
    let total: u64 = [
        "img/a.png",
        "img/b.png",
        "img/c.jpg",
        "img%x",
        "img_y",
        "imgz",
        "doc/a",
    ]
    .iter()
    .map(|k| k.len() as u64)
    .sum();
    assert_eq!(
        buckets,
        [
            BucketStats {
                bucket: "b".into(),
                entries: 7,
                bytes: total
            },
            BucketStats {
                bucket: "other".into(),
                entries: 1,
                bytes: 1
            },
        ]
    );
}

pub async fn object_triggers_filter_by_prefix_suffix_and_change<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let deletes = TriggerSpec {
        source: TriggerSource::Object {
            bucket: "b".into(),
            prefix: "img/".into(),
            suffix: ".png".into(),
            events: vec![ObjectChange::Deleted],
        },
        retry: RetryPolicy::default(),
        alias: None,
    };
    let everything: TriggerSpec =
        serde_json::from_str(r#"{"source":{"kind":"object","bucket":"b"}}"#).unwrap();
    let (deletes_trigger, _) = attach(&store, "f", &deletes).await;
    let (everything_trigger, _) = attach(&store, "g", &everything).await;

    store
        .objects
        .object_put("b", "img/a.png", b"png!", "image/png")
        .await
        .unwrap();
    store
        .objects
        .object_put("b", "img/a.jpg", b"jpg", "image/jpeg")
        .await
        .unwrap();
    store
        .objects
        .object_put("b", "doc/a.png", b"doc", "image/png")
        .await
        .unwrap();
    store
        .objects
        .object_put("c", "img/a.png", b"c", "image/png")
        .await
        .unwrap();
    assert!(claim_inbox(&store, &[], "f").await.is_empty());

    let created = claim_inbox(&store, &[], "g").await;
    assert_eq!(created.len(), 3, "{created:?}");
    let first = &created[0];
    assert_eq!(first.event.ty, "dev.mayfly.object.created");
    assert_eq!(first.event.subject.as_deref(), Some("img/a.png"));
    assert_eq!(
        first.event.content_type.as_deref(),
        Some("application/json")
    );
    assert_eq!(first.trigger_id, Some(everything_trigger.id));
    let data = json(&first.event.data);
    assert_eq!(data["bucket"], "b");
    assert_eq!(data["key"], "img/a.png");
    assert_eq!(data["size"], 4);
    assert_eq!(data["etag"], format!("\"{}\"", sha256_hex(b"png!")));
    assert_eq!(data["event"], "created");

    assert!(store.objects.object_delete("b", "img/a.jpg").await.unwrap());
    assert!(store.objects.object_delete("b", "doc/a.png").await.unwrap());
    assert!(claim_inbox(&store, &[], "f").await.is_empty());
    assert!(store.objects.object_delete("b", "img/a.png").await.unwrap());

    let deleted = claim_inbox(&store, &[], "f").await;
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    let d = &deleted[0];
    assert_eq!(d.event.ty, "dev.mayfly.object.deleted");
    assert_eq!(d.event.subject.as_deref(), Some("img/a.png"));
    assert_eq!(d.trigger_id, Some(deletes_trigger.id));
    let data = json(&d.event.data);
    assert_eq!(data["bucket"], "b");
    assert_eq!(data["key"], "img/a.png");
    assert_eq!(data["size"], 4);
    assert_eq!(data["etag"], format!("\"{}\"", sha256_hex(b"png!")));
    assert_eq!(data["event"], "deleted");

    let g = claim_inbox(&store, &created.iter().map(ack).collect::<Vec<_>>(), "g").await;
    let types: Vec<&str> = g.iter().map(|d| d.event.ty.as_str()).collect();
    assert_eq!(types, ["dev.mayfly.object.deleted"; 3]);
}

pub async fn queue_send_receive_ack<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let ids = store
        .queues
        .send("q", &messages(&["one", "two", "three"]))
        .await
        .unwrap();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let got = store.queues.receive("q", 2, 60_000).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].id, ids[0]);
    assert_eq!(got[0].attempt, 1);
    assert_eq!(got[0].event.data, b"one");
    assert_eq!(got[1].event.data, b"two");
    assert_eq!(got[0].event.ty, "dev.mayfly.queue.message");
    assert_eq!(got[0].event.source, "/queues/q");
    assert_eq!(got[0].event.content_type.as_deref(), Some("text/plain"));
    assert_eq!(got[0].event.subject, Some(ids[0].to_string()));
    assert_eq!(got[0].receipt(), format!("{}.1", ids[0]));
    assert_eq!(got[0].retry, None);
    assert_eq!(got[0].trigger_id, None);
    assert_ne!(got[0].event.id, got[1].event.id);

    let rest = store.queues.receive("q", 10, 60_000).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].id, ids[2]);
    assert!(
        store
            .queues
            .receive("q", 10, 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .queues
            .receive("other", 10, 60_000)
            .await
            .unwrap()
            .is_empty()
    );

    assert_eq!(
        store.queues.ack("q", ids[0], 1).await.unwrap(),
        AckOutcome::Acked
    );
    assert_eq!(
        store.queues.ack("q", ids[0], 1).await.unwrap(),
        AckOutcome::Gone
    );
    // A receipt is only good on its own queue.
    assert_eq!(
        store.queues.ack("other", ids[1], 1).await.unwrap(),
        AckOutcome::Gone
    );
    assert_eq!(
        store.queues.ack("q", ids[1], 2).await.unwrap(),
        AckOutcome::Stale
    );
    assert_eq!(
        store.queues.ack("q", ids[1], 1).await.unwrap(),
        AckOutcome::Acked
    );
    assert_eq!(
        store.queues.queues().await.unwrap(),
        [QueueStats {
            queue: "q".into(),
            messages: 1,
            in_flight: 1
        }]
    );
}

pub async fn an_expired_visibility_redelivers_with_the_next_attempt<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let ids = store
        .queues
        .send("q", &[(None, b"m".to_vec())])
        .await
        .unwrap();
    let first = store.queues.receive("q", 10, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    assert_eq!(first[0].event.content_type, None);

    let again = receive_within(&store, "q").await;
    assert_eq!(again.len(), 1, "the message never came back");
    assert_eq!(again[0].id, ids[0]);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(again[0].receipt(), format!("{}.2", ids[0]));
    // The event id and subject stay the same across redeliveries.
    assert_eq!(again[0].event.id, first[0].event.id);
    assert_eq!(again[0].event.subject, Some(ids[0].to_string()));
    assert_eq!(again[0].event.data, b"m");

    assert_eq!(
        store.queues.ack("q", ids[0], 1).await.unwrap(),
        AckOutcome::Stale
    );
    assert_eq!(store.queues.queues().await.unwrap()[0].messages, 1);
    assert_eq!(
        store.queues.ack("q", ids[0], 2).await.unwrap(),
        AckOutcome::Acked
    );
    assert!(store.queues.queues().await.unwrap().is_empty());
}

pub async fn queue_stats_count_messages_and_in_flight_but_not_inboxes<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    assert!(store.queues.queues().await.unwrap().is_empty());
    store
        .queues
        .send("b", &messages(&["1", "2", "3"]))
        .await
        .unwrap();
    store.queues.send("a", &messages(&["1"])).await.unwrap();
    store
        .queues
        .enqueue("f", &inbox_event("e1", b"x"))
        .await
        .unwrap();
    attach(&store, "g", &kv_spec("kv", "")).await;
    put(&store, "kv", "k", b"v").await;
    store.queues.receive("b", 2, 60_000).await.unwrap();
    // A dispatcher's claim of a named queue counts as in flight too.
    store
        .queues
        .settle_and_claim(&[], &QueueRef::Named("a".into()), 10, 60_000)
        .await
        .unwrap();

    assert_eq!(
        store.queues.queues().await.unwrap(),
        [
            QueueStats {
                queue: "a".into(),
                messages: 1,
                in_flight: 1
            },
            QueueStats {
                queue: "b".into(),
                messages: 3,
                in_flight: 2
            },
        ]
    );

    let mut depths = store.queues.depths().await.unwrap();
    depths.sort_by_key(|(q, _)| format!("{q:?}"));
    assert_eq!(
        depths,
        [
            (inbox_of("f"), 1),
            (inbox_of("g"), 1),
            (QueueRef::Named("a".into()), 1),
            (QueueRef::Named("b".into()), 3),
        ]
    );
}

pub async fn receive_does_not_reach_inboxes<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    store
        .queues
        .enqueue("f", &inbox_event("e1", b"x"))
        .await
        .unwrap();
    assert!(
        store
            .queues
            .receive("f", 10, 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    // And the dispatcher's inbox claim does not take named queue messages.
    store.queues.send("f", &messages(&["m"])).await.unwrap();
    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event.id, "e1");
    let named = store
        .queues
        .settle_and_claim(&[], &QueueRef::Named("f".into()), 10, 60_000)
        .await
        .unwrap();
    assert_eq!(named.len(), 1);
    assert_eq!(named[0].event.data, b"m");
}

// ---------------------------------------------------------------- dispatcher

pub async fn enqueued_events_keep_their_attributes<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let id = store
        .queues
        .enqueue("f", &inbox_event("e1", b"payload"))
        .await
        .unwrap();
    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.id, id);
    assert_eq!(d.attempt, 1);
    assert_eq!(d.event, event("e1", b"payload"));
    assert_eq!(d.path.as_deref(), Some("/hook"));
    assert_eq!(d.trigger_id, None);
    assert_eq!(
        d.retry,
        Some(RetryPolicy {
            max_attempts: 5,
            backoff_ms: 200
        })
    );
    assert!(d.enqueued_ms <= now());
    // max is honoured.
    store
        .queues
        .enqueue("f", &inbox_event("e2", b""))
        .await
        .unwrap();
    store
        .queues
        .enqueue("f", &inbox_event("e3", b""))
        .await
        .unwrap();
    let got = store
        .queues
        .settle_and_claim(&[ack(d)], &inbox_of("f"), 1, 60_000)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event.id, "e2");
    assert!(
        store
            .queues
            .settle_and_claim(&[], &inbox_of("f"), 0, 60_000)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn a_retry_hides_the_event_until_its_delay<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    assert_eq!(
        store.queues.next_visible(&inbox_of("f")).await.unwrap(),
        None
    );
    store
        .queues
        .enqueue("f", &inbox_event("e1", b"x"))
        .await
        .unwrap();
    let next = store
        .queues
        .next_visible(&inbox_of("f"))
        .await
        .unwrap()
        .unwrap();
    assert!(next <= now());

    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got.len(), 1);
    let before = now();
    assert!(
        claim_inbox(&store, &[retry(&got[0], 60_000)], "f")
            .await
            .is_empty()
    );
    let next = store
        .queues
        .next_visible(&inbox_of("f"))
        .await
        .unwrap()
        .unwrap();
    assert!(next >= before + 60_000, "{next} vs {before}");
    // Still stored.
    assert_eq!(store.queues.depths().await.unwrap(), [(inbox_of("f"), 1)]);

    // With no delay it comes back at once, as attempt 2.
    store
        .queues
        .enqueue("g", &inbox_event("e2", b"y"))
        .await
        .unwrap();
    let got = claim_inbox(&store, &[], "g").await;
    let again = claim_inbox(&store, &[retry(&got[0], 0)], "g").await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(again[0].event.id, "e2");
}

pub async fn a_postpone_does_not_count_the_attempt<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    store
        .queues
        .enqueue("f", &inbox_event("e1", b"x"))
        .await
        .unwrap();
    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got[0].attempt, 1);
    let again = claim_inbox(&store, &[postpone(&got[0], 0)], "f").await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 1);
    let third = claim_inbox(&store, &[retry(&again[0], 0)], "f").await;
    assert_eq!(third[0].attempt, 2);
    let fourth = claim_inbox(&store, &[postpone(&third[0], 0)], "f").await;
    assert_eq!(fourth[0].attempt, 2);

    // A postpone with a delay hides it.
    assert!(
        claim_inbox(&store, &[postpone(&fourth[0], 60_000)], "f")
            .await
            .is_empty()
    );
    assert!(
        store
            .queues
            .next_visible(&inbox_of("f"))
            .await
            .unwrap()
            .unwrap()
            > now() + 30_000
    );
}

pub async fn dead_letters_can_be_read_redriven_and_purged<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let (trigger, _) = attach(&store, "f", &kv_spec("b", "")).await;
    put(&store, "b", "k", b"the value").await;
    let got = claim_inbox(&store, &[], "f").await;
    let got = claim_inbox(&store, &[retry(&got[0], 0)], "f").await;
    assert_eq!(got[0].attempt, 2);
    let original = got[0].clone();

    let before = now();
    assert!(
        claim_inbox(&store, &[dead(&original, "f", "it broke")], "f")
            .await
            .is_empty()
    );
    assert!(store.queues.depths().await.unwrap().is_empty());

    let letters = store.queues.dead_letters("f", 0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.event_id, original.event.id);
    assert_eq!(letter.ty, "dev.mayfly.kv.put");
    assert_eq!(letter.source, "/kv/b");
    assert_eq!(letter.subject.as_deref(), Some("k"));
    assert_eq!(letter.time_ms, original.event.time_ms);
    assert_eq!(letter.size, 9);
    assert_eq!(letter.attempts, 2);
    assert_eq!(letter.last_error, "it broke");
    assert!(letter.died_ms >= before && letter.died_ms <= now());
    assert_eq!(letter.trigger_id, Some(trigger.id));
    assert_eq!(letter.data, None);

    let full = store
        .queues
        .dead_letter("f", letter.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(full.data.as_deref(), Some(&b"the value"[..]));
    assert_eq!(DeadLetter { data: None, ..full }, *letter);
    assert!(
        store
            .queues
            .dead_letter("g", letter.id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .queues
            .dead_letters("g", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .queues
            .dead_letters("f", letter.id, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Another function cannot redrive or purge it.
    assert_eq!(
        store.queues.redrive("g", Some(&[letter.id])).await.unwrap(),
        0
    );
    assert_eq!(store.queues.purge_dead("g", None).await.unwrap(), 0);
    assert_eq!(
        store.queues.dead_letters("f", 0, 10).await.unwrap().len(),
        1
    );

    // Redrive: back in the inbox with the same event id, attempt 1, and
    // the retry policy the dead settlement gave it.
    assert_eq!(
        store.queues.redrive("f", Some(&[letter.id])).await.unwrap(),
        1
    );
    assert!(
        store
            .queues
            .dead_letters("f", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got.len(), 1);
    let redriven = &got[0];
    assert_eq!(redriven.event.id, original.event.id);
    assert_eq!(redriven.attempt, 1);
    assert_eq!(redriven.event.data, b"the value");
    assert_eq!(redriven.event.subject.as_deref(), Some("k"));
    assert_eq!(redriven.trigger_id, Some(trigger.id));
    assert_eq!(
        redriven.retry,
        Some(RetryPolicy {
            max_attempts: 4,
            backoff_ms: 250
        })
    );

    // Dead again, then purged.
    assert!(
        claim_inbox(&store, &[dead(redriven, "f", "again")], "f")
            .await
            .is_empty()
    );
    let letters = store.queues.dead_letters("f", 0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(letters[0].last_error, "again");
    assert_eq!(
        store
            .queues
            .purge_dead("f", Some(&[letters[0].id + 1000]))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .queues
            .purge_dead("f", Some(&[letters[0].id]))
            .await
            .unwrap(),
        1
    );
    assert!(
        store
            .queues
            .dead_letters("f", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .queues
            .dead_letter("f", letters[0].id)
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn redrive_and_purge_all_and_paging<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    for i in 0..3 {
        store
            .queues
            .enqueue("f", &inbox_event(&format!("e{i}"), b"x"))
            .await
            .unwrap();
    }
    let got = claim_inbox(&store, &[], "f").await;
    let dead_all: Vec<Settlement> = got.iter().map(|d| dead(d, "f", "x")).collect();
    claim_inbox(&store, &dead_all, "f").await;
    let page = store.queues.dead_letters("f", 0, 2).await.unwrap();
    assert_eq!(page.len(), 2);
    let rest = store.queues.dead_letters("f", page[1].id, 2).await.unwrap();
    assert_eq!(rest.len(), 1);
    let order: Vec<&str> = page
        .iter()
        .chain(&rest)
        .map(|l| l.event_id.as_str())
        .collect();
    assert_eq!(order, ["e0", "e1", "e2"]);

    assert_eq!(store.queues.redrive("f", None).await.unwrap(), 3);
    let got = claim_inbox(&store, &[], "f").await;
    let ids: Vec<&str> = got.iter().map(|d| d.event.id.as_str()).collect();
    assert_eq!(ids, ["e0", "e1", "e2"]);
    let dead_all: Vec<Settlement> = got.iter().map(|d| dead(d, "f", "x")).collect();
    claim_inbox(&store, &dead_all, "f").await;
    assert_eq!(store.queues.purge_dead("f", None).await.unwrap(), 3);
    assert!(
        store
            .queues
            .dead_letters("f", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn a_dead_named_queue_message_keeps_its_subject<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let queue_spec: TriggerSpec =
        serde_json::from_str(r#"{"source":{"kind":"queue","queue":"q"}}"#).unwrap();
    let (trigger, _) = attach(&store, "f", &queue_spec).await;
    let ids = store.queues.send("q", &messages(&["m"])).await.unwrap();
    let got = store
        .queues
        .settle_and_claim(&[], &QueueRef::Named("q".into()), 10, 60_000)
        .await
        .unwrap();
    assert_eq!(got[0].trigger_id, None);
    // The dispatcher names the queue trigger that delivered it.
    let settlement = Settlement::Dead {
        id: got[0].id,
        attempt: got[0].attempt,
        function: "f".into(),
        retry: RetryPolicy::default(),
        trigger_id: Some(trigger.id),
        error: "no".into(),
    };
    store
        .queues
        .settle_and_claim(&[settlement], &QueueRef::Named("q".into()), 10, 60_000)
        .await
        .unwrap();
    assert!(store.queues.queues().await.unwrap().is_empty());
    let letters = store.queues.dead_letters("f", 0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].subject, Some(ids[0].to_string()));
    assert_eq!(letters[0].event_id, got[0].event.id);
    assert_eq!(letters[0].source, "/queues/q");
    assert_eq!(letters[0].trigger_id, Some(trigger.id));

    // Redriven, it goes to the function's inbox, subject and all.
    assert_eq!(store.queues.redrive("f", None).await.unwrap(), 1);
    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event.id, letters[0].event_id);
    assert_eq!(got[0].event.subject, Some(ids[0].to_string()));
    assert_eq!(got[0].event.data, b"m");
    assert_eq!(got[0].trigger_id, Some(trigger.id));
    assert_eq!(got[0].retry, Some(RetryPolicy::default()));
    assert!(store.queues.queues().await.unwrap().is_empty());
}

pub async fn a_dead_inbox_event_keeps_its_own_trigger<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let (trigger, _) = attach(&store, "f", &kv_spec("b", "")).await;
    put(&store, "b", "k", b"v").await;
    let got = claim_inbox(&store, &[], "f").await;
    let settlement = Settlement::Dead {
        id: got[0].id,
        attempt: got[0].attempt,
        function: "f".into(),
        retry: RetryPolicy::default(),
        trigger_id: Some(trigger.id + 100),
        error: "no".into(),
    };
    claim_inbox(&store, &[settlement], "f").await;
    let letters = store.queues.dead_letters("f", 0, 10).await.unwrap();
    assert_eq!(letters[0].trigger_id, Some(trigger.id));
}

pub async fn a_stale_settlement_does_nothing<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    store
        .queues
        .enqueue("f", &inbox_event("e1", b"x"))
        .await
        .unwrap();
    let got = claim_inbox(&store, &[], "f").await;
    let d = got[0].clone();
    assert_eq!(d.attempt, 1);
    let stale = Delivery {
        attempt: 2,
        ..d.clone()
    };
    let older = Delivery {
        attempt: 0,
        ..d.clone()
    };

    // None of these apply: the event stays leased and stored.
    let settled = [
        ack(&stale),
        ack(&older),
        retry(&stale, 0),
        postpone(&stale, 0),
        dead(&stale, "f", "x"),
        dead(&older, "f", "x"),
    ];
    assert!(claim_inbox(&store, &settled, "f").await.is_empty());
    assert!(
        store
            .queues
            .dead_letters("f", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.queues.depths().await.unwrap(), [(inbox_of("f"), 1)]);

    // The current attempt still settles it.
    let again = claim_inbox(&store, &[retry(&d, 0)], "f").await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    // And the old receipt no longer does.
    assert!(claim_inbox(&store, &[ack(&d)], "f").await.is_empty());
    assert_eq!(store.queues.depths().await.unwrap(), [(inbox_of("f"), 1)]);
    assert!(claim_inbox(&store, &[ack(&again[0])], "f").await.is_empty());
    assert!(store.queues.depths().await.unwrap().is_empty());
}

// ---------------------------------------------------------------- leases

pub async fn release_leases_frees_the_dispatchers_claims_only<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    store
        .queues
        .enqueue("f", &inbox_event("e1", b"x"))
        .await
        .unwrap();
    store
        .queues
        .enqueue("f", &inbox_event("e2", b"y"))
        .await
        .unwrap();
    store.queues.send("q", &messages(&["user"])).await.unwrap();
    store
        .queues
        .send("t", &messages(&["triggered"]))
        .await
        .unwrap();
    store
        .queues
        .enqueue("g", &inbox_event("e3", b"z"))
        .await
        .unwrap();

    let hour = 3_600_000;
    assert_eq!(
        store
            .queues
            .settle_and_claim(&[], &inbox_of("f"), 10, hour)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        store
            .queues
            .settle_and_claim(&[], &QueueRef::Named("t".into()), 10, hour)
            .await
            .unwrap()
            .len(),
        1
    );
    let got = store
        .queues
        .settle_and_claim(&[], &inbox_of("g"), 10, hour)
        .await
        .unwrap();
    // g's event was retried with a backoff: not a lease.
    assert!(
        store
            .queues
            .settle_and_claim(&[retry(&got[0], hour)], &inbox_of("g"), 10, hour)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.queues.receive("q", 10, hour).await.unwrap().len(), 1);
    assert!(claim_inbox(&store, &[], "f").await.is_empty());

    assert_eq!(store.queues.release_leases().await.unwrap(), 3);

    let again = claim_inbox(&store, &[], "f").await;
    let ids: Vec<&str> = again.iter().map(|d| d.event.id.as_str()).collect();
    assert_eq!(ids, ["e1", "e2"]);
    assert!(again.iter().all(|d| d.attempt == 2));
    assert_eq!(
        store
            .queues
            .settle_and_claim(&[], &QueueRef::Named("t".into()), 10, hour)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(claim_inbox(&store, &[], "g").await.is_empty());
    assert!(
        store
            .queues
            .receive("q", 10, 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.queues.queues().await.unwrap()[0],
        QueueStats {
            queue: "q".into(),
            messages: 1,
            in_flight: 1
        }
    );
}

// ---------------------------------------------------------------- durability

pub async fn everything_survives_a_reopen<B: Backend>(backend: &B) {
    let place = backend.place();
    let (revision, trigger, message_ids) = {
        let store = backend.open(&place).await;
        let (trigger, _) = attach(&store, "f", &kv_spec("b", "")).await;
        let revision = put(&store, "b", "k", b"v").await;
        store
            .objects
            .object_put("o", "obj", b"bytes", "text/plain")
            .await
            .unwrap();
        store
            .queues
            .enqueue("g", &inbox_event("e1", b"x"))
            .await
            .unwrap();
        let message_ids = store
            .queues
            .send("q", &messages(&["1", "2"]))
            .await
            .unwrap();
        // One received (in flight) and one dead letter.
        store.queues.receive("q", 1, 3_600_000).await.unwrap();
        store
            .queues
            .enqueue("h", &inbox_event("dead", b"d"))
            .await
            .unwrap();
        let got = claim_inbox(&store, &[], "h").await;
        claim_inbox(&store, &[dead(&got[0], "h", "x")], "h").await;
        (revision, trigger, message_ids)
    };

    let store = backend.open(&place).await;
    let entry = store.kv.kv_get("b", "k").await.unwrap().unwrap();
    assert_eq!(
        (entry.value.as_slice(), entry.revision),
        (&b"v"[..], revision)
    );
    assert!(put(&store, "b", "k2", b"").await > revision);
    let (meta, path) = store.objects.object_get("o", "obj").await.unwrap().unwrap();
    assert_eq!(meta.size, 5);
    assert_eq!(std::fs::read(path).unwrap(), b"bytes");
    assert_eq!(store.triggers.triggers(None).await.unwrap(), [trigger]);

    let f = claim_inbox(&store, &[], "f").await;
    let subjects: Vec<Option<&str>> = f.iter().map(|d| d.event.subject.as_deref()).collect();
    assert_eq!(subjects, [Some("k"), Some("k2")]);
    let g = claim_inbox(&store, &[], "g").await;
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].event, event("e1", b"x"));

    assert_eq!(
        store.queues.queues().await.unwrap(),
        [QueueStats {
            queue: "q".into(),
            messages: 2,
            in_flight: 1
        }]
    );
    let q = store.queues.receive("q", 10, 60_000).await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].id, message_ids[1]);
    assert_eq!(
        store.queues.ack("q", message_ids[0], 1).await.unwrap(),
        AckOutcome::Acked
    );

    let letters = store.queues.dead_letters("h", 0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].event_id, "dead");
}

// ---------------------------------------------------------------- triggers

pub async fn add_trigger_returns_an_identical_one<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let before = now();
    let (first, created) = attach(&store, "f", &kv_spec("b", "p")).await;
    assert!(created);
    assert_eq!(first.function, "f");
    assert_eq!(first.spec, kv_spec("b", "p"));
    assert!(first.created_ms >= before);
    assert_eq!(first.last_fired_ms, None);

    let (same, created) = attach(&store, "f", &kv_spec("b", "p")).await;
    assert!(!created);
    assert_eq!(same, first);

    // The same spec written differently is still the same trigger.
    let spelled: TriggerSpec = serde_json::from_str(
        r#"{"retry":{"backoff_ms":1000},"source":{"prefix":"p","bucket":"b","kind":"kv"}}"#,
    )
    .unwrap();
    let (same, created) = attach(&store, "f", &spelled).await;
    assert!(!created);
    assert_eq!(same.id, first.id);

    let (other_prefix, created) = attach(&store, "f", &kv_spec("b", "q")).await;
    assert!(created);
    assert_ne!(other_prefix.id, first.id);
    let (other_function, created) = attach(&store, "g", &kv_spec("b", "p")).await;
    assert!(created);
    let mut other_retry = kv_spec("b", "p");
    other_retry.retry.max_attempts = 9;
    let (_, created) = attach(&store, "f", &other_retry).await;
    assert!(created);

    assert_eq!(store.triggers.triggers(Some("f")).await.unwrap().len(), 3);
    assert_eq!(
        store.triggers.triggers(Some("g")).await.unwrap(),
        std::slice::from_ref(&other_function)
    );
    assert_eq!(store.triggers.triggers(Some("nobody")).await.unwrap(), []);
    let all = store.triggers.triggers(None).await.unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[0], first);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));

    assert!(store.triggers.remove_trigger(first.id).await.unwrap());
    assert!(!store.triggers.remove_trigger(first.id).await.unwrap());
    assert_eq!(store.triggers.triggers(None).await.unwrap().len(), 3);
    assert!(
        !store
            .triggers
            .triggers(Some("f"))
            .await
            .unwrap()
            .contains(&first)
    );
    // Re-adding after removal creates a new one.
    let (again, created) = attach(&store, "f", &kv_spec("b", "p")).await;
    assert!(created);
    assert!(again.id > first.id);
}

pub async fn remove_function_removes_only_its_own_state<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    attach(&store, "f", &kv_spec("b", "")).await;
    let (g_trigger, _) = attach(&store, "g", &kv_spec("b", "")).await;
    for function in ["f", "g"] {
        store
            .queues
            .enqueue(function, &inbox_event("dead", b"d"))
            .await
            .unwrap();
        let got = store
            .queues
            .settle_and_claim(&[], &inbox_of(function), 1, 60_000)
            .await
            .unwrap();
        assert_eq!(got[0].event.id, "dead", "{got:?}");
        store
            .queues
            .settle_and_claim(&[dead(&got[0], function, "x")], &inbox_of(function), 0, 0)
            .await
            .unwrap();
    }
    put(&store, "b", "k", b"v").await;
    store
        .queues
        .send("f", &messages(&["named queue called f"]))
        .await
        .unwrap();

    store.triggers.remove_function("f").await.unwrap();
    assert!(store.triggers.triggers(Some("f")).await.unwrap().is_empty());
    assert!(
        store
            .queues
            .dead_letters("f", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(claim_inbox(&store, &[], "f").await.is_empty());
    assert_eq!(
        store.queues.next_visible(&inbox_of("f")).await.unwrap(),
        None
    );

    assert_eq!(
        store.triggers.triggers(Some("g")).await.unwrap(),
        [g_trigger]
    );
    assert_eq!(
        store.queues.dead_letters("g", 0, 10).await.unwrap().len(),
        1
    );
    assert_eq!(claim_inbox(&store, &[], "g").await.len(), 1);
    // A named queue that happens to share the name is not an inbox.
    assert_eq!(store.queues.queues().await.unwrap()[0].messages, 1);

    // No more events for f.
    put(&store, "b", "k", b"v2").await;
    assert!(claim_inbox(&store, &[], "f").await.is_empty());
}

pub async fn fire_schedule_stores_the_event_and_the_run<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let before = now();
    let (trigger, created) = attach(&store, "f", &schedule_spec("@every 1m")).await;
    assert!(created);
    let created_at = trigger.last_fired_ms.unwrap();
    assert!(created_at >= before && created_at <= now());
    assert_eq!(trigger.last_fired_ms, Some(trigger.created_ms));

    let fired = now();
    let tick = event("tick-1", b"");
    assert!(
        store
            .triggers
            .fire_schedule(&trigger, &tick, fired)
            .await
            .unwrap()
    );
    assert_eq!(
        store.triggers.triggers(Some("f")).await.unwrap()[0].last_fired_ms,
        Some(fired)
    );
    let got = claim_inbox(&store, &[], "f").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event, tick);
    assert_eq!(got[0].trigger_id, Some(trigger.id));
    assert_eq!(got[0].retry, Some(RetryPolicy::default()));
    assert_eq!(got[0].enqueued_ms, fired);

    assert!(store.triggers.remove_trigger(trigger.id).await.unwrap());
    assert!(
        !store
            .triggers
            .fire_schedule(&trigger, &event("tick-2", b""), fired + 1)
            .await
            .unwrap()
    );
    assert!(claim_inbox(&store, &[ack(&got[0])], "f").await.is_empty());
    assert!(store.queues.depths().await.unwrap().is_empty());
}

pub async fn trigger_json_round_trips<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let (trigger, _) = attach(&store, "f", &kv_spec("b", "p")).await;
    let text = serde_json::to_string(&trigger).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["source"]["kind"], "kv");
    assert_eq!(value["retry"]["max_attempts"], 3);
    assert_eq!(value["function"], "f");
    assert!(value.get("last_fired_ms").is_none());
    let back: Trigger = serde_json::from_str(&text).unwrap();
    assert_eq!(back, trigger);
}

// ---------------------------------------------------------------- concurrency

pub async fn concurrent_writes_and_claims_keep_per_key_order<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    attach(&store, "f", &kv_spec("b", "")).await;
    const PER_KEY: usize = 40;
    const KEYS: [&str; 3] = ["x", "y", "z"];
    let mut seen: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    // The writer and the claimer are joined: their calls are in flight at
    // the same time.
    let writer = async {
        for i in 0..PER_KEY {
            for key in KEYS {
                store
                    .kv
                    .kv_put("b", key, i.to_string().as_bytes(), KvCondition::Any)
                    .await
                    .unwrap();
            }
        }
    };
    let claimer = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut settled = Vec::new();
        let mut total = 0;
        while total < PER_KEY * KEYS.len() {
            assert!(Instant::now() < deadline, "only {total} events arrived");
            let got = store
                .queues
                .settle_and_claim(&settled, &inbox_of("f"), 4, 60_000)
                .await
                .unwrap();
            if got.is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Never two events of one key out at once.
            let mut subjects: Vec<&str> = got
                .iter()
                .filter_map(|d| d.event.subject.as_deref())
                .collect();
            subjects.sort_unstable();
            subjects.dedup();
            assert_eq!(subjects.len(), got.len(), "{got:?}");
            settled = got.iter().map(ack).collect();
            for d in &got {
                let value = String::from_utf8(d.event.data.clone()).unwrap();
                seen.entry(d.event.subject.clone().unwrap())
                    .or_default()
                    .push(value.parse().unwrap());
                total += 1;
            }
        }
        store
            .queues
            .settle_and_claim(&settled, &inbox_of("f"), 0, 60_000)
            .await
            .unwrap();
    };
    tokio::join!(writer, claimer);
    let expected: Vec<usize> = (0..PER_KEY).collect();
    for key in KEYS {
        assert_eq!(seen[key], expected, "order of {key}");
    }
    assert!(store.queues.depths().await.unwrap().is_empty());
}

pub async fn concurrent_receivers_never_share_a_message<B: Backend>(backend: &B) {
    let (_place, store) = fresh(backend).await;
    let texts: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut sent = store.queues.send("q", &messages(&refs)).await.unwrap();
    // Four receivers as tasks: their calls are in flight at the same time.
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = store.clone();
        workers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store.queues.receive("q", 7, 60_000).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.iter().map(|d| d.id));
            }
        });
    }
    let mut received: Vec<i64> = workers.join_all().await.into_iter().flatten().collect();
    received.sort_unstable();
    sent.sort_unstable();
    assert_eq!(received, sent);
}
