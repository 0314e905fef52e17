//! Tests of what only the embedded event store has: its file layout.
//! Its behaviour is checked by the conformance suite (`crate::conformance`).
use super::*;
use crate::*;

use sha2::{Digest as _, Sha256};

fn open(dir: &Path) -> EmbeddedEvents {
    EmbeddedEvents::open(
        &dir.join("events.db"),
        BlobDir::open(dir.join("blobs")).unwrap(),
    )
    .unwrap()
}

fn store() -> (tempfile::TempDir, EmbeddedEvents) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    (dir, store)
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

fn now() -> i64 {
    now_ms()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Blob files in `<dir>/blobs/objects`, temporary files left out.
fn object_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("blobs").join("objects"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with(".tmp"))
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------- objects

#[tokio::test]
async fn object_put_and_get() {
    let (dir, store) = store();
    let before = now();
    let meta = store
        .object_put("pics", "cat.png", b"meow", "image/png")
        .await
        .unwrap();
    let hex = sha256_hex(b"meow");
    assert_eq!(meta.bucket, "pics");
    assert_eq!(meta.key, "cat.png");
    assert_eq!(meta.size, 4);
    assert_eq!(meta.etag, format!("\"{hex}\""));
    assert_eq!(meta.content_type, "image/png");
    assert!(meta.modified_ms >= before && meta.modified_ms <= now());

    let (got, path) = store.object_get("pics", "cat.png").await.unwrap().unwrap();
    assert_eq!(got, meta);
    assert_eq!(std::fs::read(&path).unwrap(), b"meow");
    assert_eq!(path, dir.path().join("blobs").join("objects").join(&hex));

    assert!(store.object_get("pics", "dog.png").await.unwrap().is_none());
    assert!(
        store
            .object_get("other", "cat.png")
            .await
            .unwrap()
            .is_none()
    );
    assert!(!store.object_delete("pics", "dog.png").await.unwrap());

    // Empty objects are objects too.
    let empty = store
        .object_put("pics", "empty", b"", "text/plain")
        .await
        .unwrap();
    assert_eq!(empty.size, 0);
    let (_, path) = store.object_get("pics", "empty").await.unwrap().unwrap();
    assert!(std::fs::read(path).unwrap().is_empty());
}

#[tokio::test]
async fn objects_with_the_same_bytes_share_a_blob() {
    let (dir, store) = store();
    let hex = sha256_hex(b"same bytes");
    store
        .object_put("a", "one", b"same bytes", "text/plain")
        .await
        .unwrap();
    store
        .object_put("b", "two", b"same bytes", "application/json")
        .await
        .unwrap();
    assert_eq!(object_files(dir.path()), std::slice::from_ref(&hex));
    let (_, p1) = store.object_get("a", "one").await.unwrap().unwrap();
    let (m2, p2) = store.object_get("b", "two").await.unwrap().unwrap();
    assert_eq!(p1, p2);
    assert_eq!(m2.content_type, "application/json");

    assert!(store.object_delete("a", "one").await.unwrap());
    assert_eq!(object_files(dir.path()), std::slice::from_ref(&hex));
    assert!(store.object_get("a", "one").await.unwrap().is_none());
    let (_, path) = store.object_get("b", "two").await.unwrap().unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"same bytes");

    assert!(store.object_delete("b", "two").await.unwrap());
    assert!(object_files(dir.path()).is_empty());
    assert!(!store.object_delete("b", "two").await.unwrap());
}

#[tokio::test]
async fn overwriting_an_object_collects_its_old_blob_when_unused() {
    let (dir, store) = store();
    let (old, new) = (sha256_hex(b"old"), sha256_hex(b"new"));
    store
        .object_put("b", "k", b"old", "text/plain")
        .await
        .unwrap();
    let meta = store
        .object_put("b", "k", b"new", "text/html")
        .await
        .unwrap();
    assert_eq!(meta.etag, format!("\"{new}\""));
    assert_eq!(object_files(dir.path()), std::slice::from_ref(&new));
    let (got, path) = store.object_get("b", "k").await.unwrap().unwrap();
    assert_eq!(got.size, 3);
    assert_eq!(got.content_type, "text/html");
    assert_eq!(std::fs::read(path).unwrap(), b"new");

    // Rewriting the same bytes keeps the blob.
    store
        .object_put("b", "k", b"new", "text/plain")
        .await
        .unwrap();
    assert_eq!(object_files(dir.path()), std::slice::from_ref(&new));

    // An old blob another key still uses stays.
    store
        .object_put("b", "k2", b"new", "text/plain")
        .await
        .unwrap();
    store
        .object_put("b", "k", b"old", "text/plain")
        .await
        .unwrap();
    let mut both = vec![old.clone(), new.clone()];
    both.sort();
    assert_eq!(object_files(dir.path()), both);
    let (_, path) = store.object_get("b", "k2").await.unwrap().unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"new");

    store
        .object_put("b", "k2", b"old", "text/plain")
        .await
        .unwrap();
    assert_eq!(object_files(dir.path()), [old]);
}

// ---------------------------------------------------------------- queues

#[test]
fn trigger_spec_json_defaults() {
    let spec: TriggerSpec =
        serde_json::from_str(r#"{"source":{"kind":"queue","queue":"q"}}"#).unwrap();
    assert_eq!(
        spec,
        TriggerSpec {
            source: TriggerSource::Queue {
                queue: "q".into(),
                batch_size: 10,
                max_concurrency: 16,
            },
            retry: RetryPolicy {
                max_attempts: 3,
                backoff_ms: 1000,
            },
            alias: None,
        }
    );
    assert_eq!(spec.source.kind(), "queue");
    assert_eq!(spec.source.target(), "q");

    let spec: TriggerSpec = serde_json::from_str(
        r#"{"source":{"kind":"object","bucket":"b"},"retry":{"max_attempts":5}}"#,
    )
    .unwrap();
    assert_eq!(
        spec,
        TriggerSpec {
            source: TriggerSource::Object {
                bucket: "b".into(),
                prefix: String::new(),
                suffix: String::new(),
                events: vec![ObjectChange::Created, ObjectChange::Deleted],
            },
            retry: RetryPolicy {
                max_attempts: 5,
                backoff_ms: 1000,
            },
            alias: None,
        }
    );
    let spec: TriggerSpec =
        serde_json::from_str(r#"{"source":{"kind":"schedule","schedule":"@daily"}}"#).unwrap();
    assert_eq!(spec.source.kind(), "schedule");
    assert_eq!(spec.source.target(), "");
    let spec: TriggerSpec =
        serde_json::from_str(r#"{"source":{"kind":"kv","bucket":"b"}}"#).unwrap();
    assert_eq!(spec, kv_spec("b", ""));
    assert_eq!(spec.source.target(), "b");
}

#[test]
fn trigger_spec_json_rejects_unknown_fields() {
    for text in [
        r#"{"source":{"kind":"kv","bucket":"b","prefx":"x"}}"#,
        r#"{"source":{"kind":"kv","bucket":"b"},"retyr":{}}"#,
        r#"{"source":{"kind":"kv","bucket":"b"},"retry":{"max_attempt":5}}"#,
        r#"{"source":{"kind":"queue","queue":"q","batchsize":1}}"#,
        r#"{"source":{"kind":"object","bucket":"b","events":["updated"]}}"#,
        r#"{"source":{"kind":"cron","schedule":"@daily"}}"#,
        r#"{"source":{"bucket":"b"}}"#,
        r#"{"retry":{}}"#,
    ] {
        assert!(
            serde_json::from_str::<TriggerSpec>(text).is_err(),
            "accepted {text}"
        );
    }
}
