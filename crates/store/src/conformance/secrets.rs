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

pub fn secrets_versions_increase_and_survive_reopen<B: Backend>(backend: &B) {
    let (place, stores) = fresh(backend);
    let store = &stores.secrets;
    let first = store.put("db", &mut |_| Ok(sealed("k1", 1))).unwrap();
    assert!(first.created);
    let second = store.put("db", &mut |_| Ok(sealed("k1", 2))).unwrap();
    assert!(!second.created);
    assert!(second.version > first.version);
    let other = store.put("api", &mut |_| Ok(sealed("k1", 3))).unwrap();
    assert!(other.version > second.version, "one counter for all names");
    drop(stores);

    let stores = backend.open(&place);
    let store = &stores.secrets;
    let got = store.get("db").unwrap().unwrap();
    assert_eq!(got.version, second.version);
    assert_eq!(got.sealed, sealed("k1", 2));
    assert!(got.created_at_ms <= got.updated_at_ms);
    let names: Vec<_> = store.list().unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["api", "db"]);
    assert!(store.get("nope").unwrap().is_none());
}

pub fn secrets_seal_sees_its_version_and_a_failed_seal_changes_nothing<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend);
    let store = &stores.secrets;
    let mut seen = 0;
    let put = store
        .put("db", &mut |version| {
            seen = version;
            Ok(sealed("k1", 1))
        })
        .unwrap();
    assert_eq!(seen, put.version);
    let failed = store.put("db", &mut |_| Err(StoreError::Corrupt("no".into())));
    assert!(failed.is_err());
    assert_eq!(store.get("db").unwrap().unwrap().version, put.version);
}

pub fn secrets_delete_and_recreate_never_reuse_a_version<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend);
    let store = &stores.secrets;
    let first = store.put("db", &mut |_| Ok(sealed("k1", 1))).unwrap();
    assert!(store.delete("db").unwrap());
    assert!(!store.delete("db").unwrap());
    assert!(store.get("db").unwrap().is_none());
    let again = store.put("db", &mut |_| Ok(sealed("k1", 1))).unwrap();
    assert!(again.created);
    assert!(again.version > first.version);
}

pub fn secrets_reseal_all_is_one_transaction<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend);
    let store = &stores.secrets;
    for name in ["a", "b", "c"] {
        store.put(name, &mut |_| Ok(sealed("old", 1))).unwrap();
    }
    let before = store.list().unwrap();

    // Fails on the second row: the first must not stay rewritten.
    let mut calls = 0;
    let failed = store.reseal_all(&mut |_| {
        calls += 1;
        if calls == 2 {
            return Err(StoreError::Corrupt("cannot open".into()));
        }
        Ok(Some(sealed("new", 9)))
    });
    assert!(failed.is_err());
    assert_eq!(store.list().unwrap(), before);
    assert_eq!(store.get("a").unwrap().unwrap().sealed, sealed("old", 1));

    // `None` leaves a row alone.
    let rewritten = store
        .reseal_all(&mut |secret| Ok((secret.name != "b").then(|| sealed("new", 9))))
        .unwrap();
    assert_eq!(rewritten, 2);
    let after = store.list().unwrap();
    let keys: Vec<_> = after.iter().map(|m| m.key_id.as_str()).collect();
    assert_eq!(keys, ["new", "old", "new"]);
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(
            (old.version, old.updated_at_ms),
            (new.version, new.updated_at_ms)
        );
    }
}
