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

pub async fn registry_changes_name_the_function<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.registry;
    let mut feed = store.watch();
    let digest = Digest::of(b"x");
    let config = FunctionConfig::default();
    for _ in 0..3 {
        store
            .create_version("f", &digest, &config, Expected::Any)
            .await
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
            .await
            .is_err()
    );
    assert!(drain(&mut feed).is_empty());
    store
        .set_alias("f", "beta", 1, None, Expected::Absent, MoveCause::Set, "")
        .await
        .unwrap();
    assert!(store.delete_alias("f", "beta").await.unwrap());
    assert_eq!(store.prune_versions("f", 1).await.unwrap(), [1, 2]);
    assert_eq!(drain(&mut feed), [changed("f"), changed("f"), changed("f")]);
    assert!(store.delete_function("f").await.unwrap());
    assert!(!store.delete_function("f").await.unwrap());
    assert_eq!(
        drain(&mut feed),
        [RegistryChange::Deleted {
            function: "f".into()
        }]
    );
}

pub async fn trigger_changes_name_the_trigger<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.triggers;
    let mut feed = store.watch();
    let spec = TriggerSpec {
        source: TriggerSource::Schedule {
            schedule: "@every 1s".into(),
        },
        retry: RetryPolicy::default(),
        alias: None,
    };
    let (trigger, created) = store.add_trigger("f", &spec).await.unwrap();
    assert!(created);
    // The same trigger again changes nothing.
    store.add_trigger("f", &spec).await.unwrap();
    let event = CloudEvent::schedule(&trigger, "@every 1s", 5, "1970-01-01T00:00:00.005Z");
    let fired_ms = trigger.last_fired_ms.unwrap_or(0) + 1_000;
    assert!(
        store
            .fire_schedule(&trigger, &event, fired_ms)
            .await
            .unwrap()
    );
    assert!(store.remove_trigger(trigger.id).await.unwrap());
    assert!(!store.remove_trigger(trigger.id).await.unwrap());
    store.remove_function("f").await.unwrap();
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

pub async fn token_changes_name_the_token<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
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
    store.create_token(&token).await.unwrap();
    assert!(store.revoke_token("tok_1").await.unwrap());
    assert!(!store.revoke_token("tok_1").await.unwrap());
    assert_eq!(
        drain(&mut feed),
        [
            TokenChange::Created { id: "tok_1".into() },
            TokenChange::Revoked { id: "tok_1".into() },
        ]
    );
}

pub async fn secret_changes_name_the_secret<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.secrets;
    let mut feed = store.watch();
    let sealed = |key_id: &str| Sealed {
        key_id: key_id.into(),
        nonce: vec![1; 24],
        ciphertext: vec![2; 16],
    };
    let put = store
        .put("db", Box::new(move |_| Ok(sealed("k1"))))
        .await
        .unwrap();
    // A seal that fails stores nothing and tells nothing.
    assert!(
        store
            .put(
                "db",
                Box::new(move |_| Err(StoreError::Corrupt("no".into())))
            )
            .await
            .is_err()
    );
    let resealed = store
        .reseal_all(Box::new(move |secret| {
            Ok((secret.sealed.key_id == "k1").then(|| sealed("k2")))
        }))
        .await
        .unwrap();
    assert_eq!(resealed, 1);
    assert!(store.delete("db").await.unwrap());
    assert!(!store.delete("db").await.unwrap());
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
