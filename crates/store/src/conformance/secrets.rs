//! The [`SecretStore`] contract.
#![allow(missing_docs)] // Each case's name says what it checks.

use super::*;

fn sealed(key_id: &str, byte: u8) -> Sealed {
    Sealed {
        key_id: key_id.into(),
        nonce: vec![byte; 24],
        ciphertext: vec![byte; 20],
    }
}

pub async fn secrets_versions_increase_and_survive_reopen<B: Backend>(backend: &B) {
    let (place, stores) = fresh(backend).await;
    let store = &stores.secrets;
    let first = store
        .put("db", Box::new(move |_| Ok(sealed("k1", 1))))
        .await
        .unwrap();
    assert!(first.created);
    let second = store
        .put("db", Box::new(move |_| Ok(sealed("k1", 2))))
        .await
        .unwrap();
    assert!(!second.created);
    assert!(second.version > first.version);
    let other = store
        .put("api", Box::new(move |_| Ok(sealed("k1", 3))))
        .await
        .unwrap();
    assert!(other.version > second.version, "one counter for all names");
    drop(stores);

    let stores = backend.open(&place).await;
    let store = &stores.secrets;
    let got = store.get("db").await.unwrap().unwrap();
    assert_eq!(got.version, second.version);
    assert_eq!(got.sealed, sealed("k1", 2));
    assert!(got.created_at_ms <= got.updated_at_ms);
    let names: Vec<_> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["api", "db"]);
    assert!(store.get("nope").await.unwrap().is_none());
}

pub async fn secrets_seal_sees_its_version_and_a_failed_seal_changes_nothing<B: Backend>(
    backend: &B,
) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.secrets;
    // The callback is owned by the store, so it reports through a shared cell.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reported = seen.clone();
    let put = store
        .put(
            "db",
            Box::new(move |version| {
                reported.store(version, std::sync::atomic::Ordering::Relaxed);
                Ok(sealed("k1", 1))
            }),
        )
        .await
        .unwrap();
    assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), put.version);
    let failed = store
        .put(
            "db",
            Box::new(move |_| Err(StoreError::Corrupt("no".into()))),
        )
        .await;
    assert!(failed.is_err());
    assert_eq!(store.get("db").await.unwrap().unwrap().version, put.version);
}

pub async fn secrets_delete_and_recreate_never_reuse_a_version<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.secrets;
    let first = store
        .put("db", Box::new(move |_| Ok(sealed("k1", 1))))
        .await
        .unwrap();
    assert!(store.delete("db").await.unwrap());
    assert!(!store.delete("db").await.unwrap());
    assert!(store.get("db").await.unwrap().is_none());
    let again = store
        .put("db", Box::new(move |_| Ok(sealed("k1", 1))))
        .await
        .unwrap();
    assert!(again.created);
    assert!(again.version > first.version);
}

pub async fn secrets_reseal_all_is_one_transaction<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.secrets;
    for name in ["a", "b", "c"] {
        store
            .put(name, Box::new(move |_| Ok(sealed("old", 1))))
            .await
            .unwrap();
    }
    let before = store.list().await.unwrap();

    // Fails on the second row: the first must not stay rewritten.
    let mut calls = 0;
    let failed = store
        .reseal_all(Box::new(move |_| {
            calls += 1;
            if calls == 2 {
                return Err(StoreError::Corrupt("cannot open".into()));
            }
            Ok(Some(sealed("new", 9)))
        }))
        .await;
    assert!(failed.is_err());
    assert_eq!(store.list().await.unwrap(), before);
    assert_eq!(
        store.get("a").await.unwrap().unwrap().sealed,
        sealed("old", 1)
    );

    // `None` leaves a row alone.
    let rewritten = store
        .reseal_all(Box::new(move |secret| {
            Ok((secret.name != "b").then(|| sealed("new", 9)))
        }))
        .await
        .unwrap();
    assert_eq!(rewritten, 2);
    let after = store.list().await.unwrap();
    let keys: Vec<_> = after.iter().map(|m| m.key_id.as_str()).collect();
    assert_eq!(keys, ["new", "old", "new"]);
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(
            (old.version, old.updated_at_ms),
            (new.version, new.updated_at_ms)
        );
    }
}
