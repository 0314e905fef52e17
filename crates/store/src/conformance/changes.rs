//! Change feeds: every change a node caches is told to subscribers, after
//! it is stored, and a refused change tells nothing.
#![allow(missing_docs)] // Each case's name says what it checks.

use super::*;

/// Everything received so far.
fn drain<T: Clone>(feed: &mut ChangeFeed<T>) -> Vec<T> {
    std::iter::from_fn(|| feed.try_recv().ok()).collect()
}

fn changed(function: &str) -> RegistryChange {
    RegistryChange::Changed {
        function: function.into(),
    }
}

pub fn registry_changes_name_the_function<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend);
    let store = &stores.registry;
    let mut feed = store.watch();
    let digest = Digest::of(b"x");
    let config = FunctionConfig::default();
    for _ in 0..3 {
        store
            .create_version("f", &digest, &config, Expected::Any)
            .unwrap();
    }
    assert_eq!(drain(&mut feed), [changed("f"), changed("f"), changed("f")]);
    // Refused: nothing to tell.
    assert!(
        store
            .set_alias(
                "f",
                "beta",
                1,
                None,
                Expected::Version(9),
                MoveCause::Set,
                ""
            )
            .is_err()
    );
    assert!(drain(&mut feed).is_empty());
    store
        .set_alias("f", "beta", 1, None, Expected::Absent, MoveCause::Set, "")
        .unwrap();
    assert!(store.delete_alias("f", "beta").unwrap());
    assert_eq!(store.prune_versions("f", 1).unwrap(), [1, 2]);
    assert_eq!(drain(&mut feed), [changed("f"), changed("f"), changed("f")]);
    assert!(store.delete_function("f").unwrap());
    assert!(!store.delete_function("f").unwrap());
    assert_eq!(
        drain(&mut feed),
        [RegistryChange::Deleted {
            function: "f".into()
        }]
    );
}

pub fn trigger_changes_name_the_trigger<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend);
    let store = &stores.triggers;
    let mut feed = store.watch();
    let spec = TriggerSpec {
        source: TriggerSource::Schedule {
            schedule: "@every 1s".into(),
        },
        retry: RetryPolicy::default(),
        alias: None,
    };
    let (trigger, created) = store.add_trigger("f", &spec).unwrap();
    assert!(created);
    // The same trigger again changes nothing.
    store.add_trigger("f", &spec).unwrap();
    let event = CloudEvent::schedule(&trigger, "@every 1s", 5, "1970-01-01T00:00:00.005Z");
    let fired_ms = trigger.last_fired_ms.unwrap_or(0) + 1_000;
    assert!(store.fire_schedule(&trigger, &event, fired_ms).unwrap());
    assert!(store.remove_trigger(trigger.id).unwrap());
    assert!(!store.remove_trigger(trigger.id).unwrap());
    store.remove_function("f").unwrap();
    assert_eq!(
        drain(&mut feed),
        [
            TriggerChange::Added {
                id: trigger.id,
                function: "f".into()
            },
            TriggerChange::Fired {
                id: trigger.id,
                fired_ms
            },
            TriggerChange::Removed { id: trigger.id },
            TriggerChange::FunctionRemoved {
                function: "f".into()
            },
        ]
    );
}

pub fn token_changes_name_the_token<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend);
    let store = &stores.auth;
    let mut feed = store.watch();
    let token = TokenRecord {
        id: "tok_1".into(),
        name: "ci".into(),
        hash: "h1".into(),
        scopes: vec!["read".into()],
        functions: Vec::new(),
        created_at_ms: 1,
        revoked_at_ms: None,
    };
    store.create_token(&token).unwrap();
    assert!(store.revoke_token("tok_1").unwrap());
    assert!(!store.revoke_token("tok_1").unwrap());
    assert_eq!(
        drain(&mut feed),
        [
            TokenChange::Created { id: "tok_1".into() },
            TokenChange::Revoked { id: "tok_1".into() },
        ]
    );
}

pub fn secret_changes_name_the_secret<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend);
    let store = &stores.secrets;
    let mut feed = store.watch();
    let sealed = |key_id: &str| Sealed {
        key_id: key_id.into(),
        nonce: vec![1; 24],
        ciphertext: vec![2; 16],
    };
    let put = store.put("db", &mut |_| Ok(sealed("k1"))).unwrap();
    // A seal that fails stores nothing and tells nothing.
    assert!(
        store
            .put("db", &mut |_| Err(StoreError::Corrupt("no".into())))
            .is_err()
    );
    let resealed = store
        .reseal_all(&mut |secret| Ok((secret.sealed.key_id == "k1").then(|| sealed("k2"))))
        .unwrap();
    assert_eq!(resealed, 1);
    assert!(store.delete("db").unwrap());
    assert!(!store.delete("db").unwrap());
    assert_eq!(
        drain(&mut feed),
        [
            SecretChange::Put {
                name: "db".into(),
                version: put.version
            },
            SecretChange::Resealed,
            SecretChange::Deleted { name: "db".into() },
        ]
    );
}
