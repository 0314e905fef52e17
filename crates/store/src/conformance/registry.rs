//! The [`Registry`] contract.
#![allow(missing_docs)] // Each case's name says what it checks.

use super::*;

fn config(routes: &[&str]) -> FunctionConfig {
    FunctionConfig {
        routes: routes.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    }
}

fn canary(version: u64, weight_bp: u32) -> Option<CanaryRecord> {
    Some(CanaryRecord {
        version,
        weight_bp,
        auto: None,
    })
}

pub async fn versions_increase_and_the_newest_is_live<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.registry;
    let d = Digest::of(b"x");
    assert_eq!(
        store
            .create_version("f", &d, &config(&["/a"]), Expected::Any)
            .await
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        store
            .create_version("f", &d, &config(&["/b"]), Expected::Any)
            .await
            .unwrap()
            .version,
        2
    );
    let f = store.function("f").await.unwrap().unwrap();
    assert_eq!(f.live.version, 2);
    assert_eq!(f.live.config.routes, ["/b"]);
    assert_eq!(store.versions("f").await.unwrap().len(), 2);
    // The old route was released with the new version.
    store
        .create_version("g", &d, &config(&["/a"]), Expected::Any)
        .await
        .unwrap();
}

pub async fn a_taken_route_changes_nothing<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.registry;
    let d = Digest::of(b"x");
    store
        .create_version("f", &d, &config(&["/a"]), Expected::Any)
        .await
        .unwrap();
    let err = store
        .create_version("g", &d, &config(&["/a"]), Expected::Any)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::RouteTaken { ref owner, .. } if owner == "f"));
    assert!(store.function("g").await.unwrap().is_none());
}

pub async fn delete_removes_versions_and_routes<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.registry;
    let d = Digest::of(b"x");
    store
        .create_version("f", &d, &config(&["/a"]), Expected::Any)
        .await
        .unwrap();
    assert!(store.delete_function("f").await.unwrap());
    assert!(!store.delete_function("f").await.unwrap());
    assert!(store.functions().await.unwrap().is_empty());
    assert_eq!(
        store
            .create_version("g", &d, &config(&["/a"]), Expected::Any)
            .await
            .unwrap()
            .version,
        1
    );
}

pub async fn aliases_round_trip_and_record_the_previous_version<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.registry;
    let d = Digest::of(b"x");
    store
        .create_version("f", &d, &config(&["/a"]), Expected::Any)
        .await
        .unwrap();
    let live = &store.aliases("f").await.unwrap()[0];
    assert_eq!((live.alias.as_str(), live.version), ("live", 1));
    assert_eq!(live.previous_version, None);
    store
        .create_version("f", &d, &config(&["/b"]), Expected::Any)
        .await
        .unwrap();
    store
        .create_version("f", &d, &config(&["/c"]), Expected::Any)
        .await
        .unwrap();
    let live = &store.aliases("f").await.unwrap()[0];
    assert_eq!((live.version, live.previous_version), (3, Some(2)));

    // A canary on live; the version stays, so does previous_version.
    let set = store
        .set_alias(
            "f",
            "live",
            3,
            canary(2, 1000),
            Expected::Any,
            MoveCause::Set,
            "",
        )
        .await
        .unwrap();
    assert_eq!(set.canary, canary(2, 1000));
    assert_eq!(set.previous_version, Some(2));
    // A named alias, then live moved back: routes follow live.
    store
        .set_alias("f", "beta", 1, None, Expected::Any, MoveCause::Set, "")
        .await
        .unwrap();
    let moved = store
        .set_alias("f", "live", 1, None, Expected::Any, MoveCause::Set, "")
        .await
        .unwrap();
    assert_eq!((moved.version, moved.previous_version), (1, Some(3)));
    assert_eq!(moved.canary, None);
    let f = store.function("f").await.unwrap().unwrap();
    assert_eq!(f.live.version, 1);
    assert_eq!(f.live.config.routes, ["/a"]);
    store
        .create_version("g", &d, &config(&["/c"]), Expected::Any)
        .await
        .unwrap();

    let aliases = store.aliases("f").await.unwrap();
    let names: Vec<&str> = aliases.iter().map(|a| a.alias.as_str()).collect();
    assert_eq!(names, ["live", "beta"]);
    assert_eq!(aliases, store.aliases("f").await.unwrap());

    // Unknown versions and functions change nothing.
    let err = store
        .set_alias("f", "live", 9, None, Expected::Any, MoveCause::Set, "")
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::VersionNotFound { version: 9, .. }
    ));
    let err = store
        .set_alias(
            "f",
            "beta",
            1,
            canary(9, 10),
            Expected::Any,
            MoveCause::Set,
            "",
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::VersionNotFound { version: 9, .. }
    ));
    let err = store
        .set_alias("nope", "live", 1, None, Expected::Any, MoveCause::Set, "")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::FunctionNotFound(_)));
    // Live to a version whose route another function took: refused.
    let err = store
        .set_alias("f", "live", 3, None, Expected::Any, MoveCause::Set, "")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::RouteTaken { ref owner, .. } if owner == "g"));
    assert_eq!(store.aliases("f").await.unwrap(), aliases);
    assert_eq!(store.function("f").await.unwrap().unwrap().live.version, 1);

    assert!(matches!(
        store.delete_alias("f", "live").await,
        Err(StoreError::Conflict(_))
    ));
    assert!(store.delete_alias("f", "beta").await.unwrap());
    assert!(!store.delete_alias("f", "beta").await.unwrap());
    // A deploy moves live and clears its canary.
    store
        .set_alias(
            "f",
            "live",
            1,
            canary(2, 5000),
            Expected::Any,
            MoveCause::Set,
            "",
        )
        .await
        .unwrap();
    store
        .create_version("f", &d, &config(&["/a"]), Expected::Any)
        .await
        .unwrap();
    let live = &store.aliases("f").await.unwrap()[0];
    assert_eq!((live.version, live.previous_version), (4, Some(1)));
    assert_eq!(live.canary, None);
    assert!(store.delete_function("f").await.unwrap());
    assert!(store.aliases("f").await.unwrap().is_empty());
    assert!(store.alias_moves("f", 10).await.unwrap().is_empty());
}

pub async fn every_alias_move_is_kept_with_its_cause_and_policy<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.registry;
    let d = Digest::of(b"x");
    store
        .create_version("f", &d, &config(&[]), Expected::Any)
        .await
        .unwrap();
    store
        .create_version("f", &d, &config(&[]), Expected::Any)
        .await
        .unwrap();
    let policy = CanaryPolicy {
        requests: 200,
        max_error_bp: 100,
        max_p99_ms: Some(250),
    };
    let auto = Some(CanaryRecord {
        version: 2,
        weight_bp: 1000,
        auto: Some(policy),
    });
    store
        .set_alias("f", "live", 1, auto, Expected::Any, MoveCause::Set, "")
        .await
        .unwrap();
    // The policy survives a read back.
    assert_eq!(store.aliases("f").await.unwrap()[0].canary, auto);
    store
        .set_alias(
            "f",
            "live",
            2,
            None,
            Expected::Any,
            MoveCause::AutoPromote,
            "200 requests, 0 errors",
        )
        .await
        .unwrap();
    let moves = store.alias_moves("f", 10).await.unwrap();
    let summary: Vec<(MoveCause, Option<u64>, u64)> = moves
        .iter()
        .map(|m| (m.cause, m.from_version, m.version))
        .collect();
    assert_eq!(
        summary,
        [
            (MoveCause::AutoPromote, Some(1), 2),
            (MoveCause::Set, Some(2), 1),
            (MoveCause::Deploy, Some(1), 2),
            (MoveCause::Deploy, None, 1),
        ]
    );
    assert_eq!(moves[0].detail, "200 requests, 0 errors");
    assert_eq!(moves[1].canary, auto);
    assert_eq!(store.alias_moves("f", 1).await.unwrap().len(), 1);
    // The history is bounded per function.
    for _ in 0..ALIAS_MOVES_KEPT + 5 {
        store
            .set_alias("f", "live", 1, None, Expected::Any, MoveCause::Set, "")
            .await
            .unwrap();
    }
    let kept = store.alias_moves("f", 1000).await.unwrap().len() as i64;
    assert_eq!(kept, ALIAS_MOVES_KEPT);
}

pub async fn an_aliased_version_cannot_be_deleted<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.registry;
    let d = Digest::of(b"x");
    for _ in 0..4 {
        store
            .create_version("f", &d, &config(&[]), Expected::Any)
            .await
            .unwrap();
    }
    store
        .set_alias(
            "f",
            "beta",
            1,
            canary(2, 100),
            Expected::Any,
            MoveCause::Set,
            "",
        )
        .await
        .unwrap();
    let message = |err: StoreError| match err {
        StoreError::Conflict(message) => message,
        other => panic!("{other}"),
    };
    assert!(message(store.delete_version("f", 4).await.unwrap_err()).contains("live"));
    assert!(message(store.delete_version("f", 1).await.unwrap_err()).contains("beta"));
    assert!(message(store.delete_version("f", 2).await.unwrap_err()).contains("beta (canary)"));
    store.delete_version("f", 3).await.unwrap();
    assert!(matches!(
        store.delete_version("f", 3).await,
        Err(StoreError::VersionNotFound { version: 3, .. })
    ));
    assert!(matches!(
        store.delete_version("g", 1).await,
        Err(StoreError::FunctionNotFound(_))
    ));
    let left: Vec<u64> = store
        .versions("f")
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(left, [4, 2, 1]);
}

pub async fn retention_keeps_the_newest_and_every_aliased_version<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.registry;
    let d = Digest::of(b"x");
    for _ in 0..3 {
        store
            .create_version("f", &d, &config(&[]), Expected::Any)
            .await
            .unwrap();
    }
    store
        .set_alias("f", "beta", 1, None, Expected::Any, MoveCause::Set, "")
        .await
        .unwrap();
    for _ in 0..3 {
        store
            .create_version("f", &d, &config(&[]), Expected::Any)
            .await
            .unwrap();
    }
    store
        .set_alias(
            "f",
            "live",
            6,
            canary(2, 500),
            Expected::Any,
            MoveCause::Set,
            "",
        )
        .await
        .unwrap();
    assert_eq!(store.prune_versions("f", 2).await.unwrap(), [3, 4]);
    let left: Vec<u64> = store
        .versions("f")
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(left, [6, 5, 2, 1]);
    assert!(store.prune_versions("f", 2).await.unwrap().is_empty());
    // Version numbers are never reused.
    assert_eq!(
        store
            .create_version("f", &d, &config(&[]), Expected::Any)
            .await
            .unwrap()
            .version,
        7
    );
    assert!(store.prune_versions("nope", 1).await.unwrap().is_empty());
}

pub async fn a_deploy_over_a_live_version_it_did_not_see_is_refused<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.registry;
    let digest = Digest::of(b"x");
    let stale = |result: Result<VersionRecord>| matches!(result, Err(StoreError::Stale(_)));
    // The first deploy expects no function; a second first deploy is late.
    store
        .create_version("f", &digest, &config(&["/f"]), Expected::Absent)
        .await
        .unwrap();
    assert!(stale(
        store
            .create_version("f", &digest, &config(&["/f"]), Expected::Absent)
            .await
    ));
    store
        .create_version("f", &digest, &config(&["/f"]), Expected::Version(1))
        .await
        .unwrap();
    // Two deploys that both saw version 2: only the first lands.
    store
        .create_version("f", &digest, &config(&["/f"]), Expected::Version(2))
        .await
        .unwrap();
    assert!(stale(
        store
            .create_version("f", &digest, &config(&["/f"]), Expected::Version(2))
            .await
    ));
    let versions = store.versions("f").await.unwrap();
    assert_eq!(versions.len(), 3);
    assert_eq!(store.function("f").await.unwrap().unwrap().live.version, 3);
}

pub async fn an_alias_move_from_a_stale_read_is_refused_and_changes_nothing<B: Backend>(
    backend: &B,
) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.registry;
    let digest = Digest::of(b"x");
    for _ in 0..3 {
        store
            .create_version("f", &digest, &config(&["/f"]), Expected::Any)
            .await
            .unwrap();
    }
    let set = |alias: &'static str, version: u64, expected: Expected| {
        store.set_alias("f", alias, version, None, expected, MoveCause::Set, "")
    };
    // A new alias expects none; a second creation from the same read fails.
    set("beta", 1, Expected::Absent).await.unwrap();
    assert!(matches!(
        set("beta", 2, Expected::Absent).await,
        Err(StoreError::Stale(_))
    ));
    // Two movers that both read `beta` at 1: the second is refused.
    set("beta", 2, Expected::Version(1)).await.unwrap();
    let error = set("beta", 3, Expected::Version(1)).await.unwrap_err();
    assert!(matches!(error, StoreError::Stale(_)), "{error}");
    assert!(error.to_string().contains("version 2"), "{error}");
    // `live` likewise (a rollback that read an older live).
    assert!(matches!(
        set(LIVE_ALIAS, 1, Expected::Version(2)).await,
        Err(StoreError::Stale(_))
    ));
    let aliases = store.aliases("f").await.unwrap();
    let points: Vec<(&str, u64)> = aliases
        .iter()
        .map(|a| (a.alias.as_str(), a.version))
        .collect();
    assert_eq!(points, [("live", 3), ("beta", 2)]);
    let moves = store.alias_moves("f", 100).await.unwrap();
    assert_eq!(moves.len(), 3 + 2, "refused moves leave no history");
}
