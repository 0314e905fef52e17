//! The [`AuthStore`] contract.
#![allow(missing_docs)] // Each case's name says what it checks.

use super::*;

pub async fn audit_is_pruned_by_age_and_by_count<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.auth;
    for _ in 0..10 {
        store
            .append_audit("anonymous", "GET /v1/x", 401, None)
            .await
            .unwrap();
    }
    assert_eq!(store.prune_audit(0, 4).await.unwrap(), 6);
    let left = store.audit(0, 100, false).await.unwrap();
    assert_eq!(left.len(), 4);
    assert_eq!(left[0].id, 7);
    // Everything is older than "after the epoch's end".
    assert_eq!(store.prune_audit(i64::MAX, 100).await.unwrap(), 4);
    assert!(store.audit(0, 100, false).await.unwrap().is_empty());
}
