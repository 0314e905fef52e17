//! The [`LogStore`] contract.
#![allow(missing_docs)] // Each case's name says what it checks.

use super::*;

pub async fn logs_tail_and_follow<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.logs;
    let line = |n: u32| NewLogLine {
        ts_ms: 1,
        function: "f".into(),
        version: 1,
        request_id: "r".into(),
        stream: "stdout".into(),
        line: format!("line {n}"),
    };
    let last = store
        .append_logs(&(0..5).map(line).collect::<Vec<_>>())
        .await
        .unwrap();
    let tail = store.logs_tail("f", 2).await.unwrap();
    assert_eq!(tail[0].line.line, "line 3");
    assert_eq!(tail[1].id, last);
    assert!(store.logs_after("f", last, 10).await.unwrap().is_empty());
    // One append's ids are consecutive: the live feed numbers a batch's
    // lines from its last id.
    let batch = store.logs_after("f", last - 5, 10).await.unwrap();
    let ids: Vec<i64> = batch.iter().map(|record| record.id).collect();
    assert_eq!(ids, (last - 4..=last).collect::<Vec<_>>());
    assert_eq!(batch[0].line.line, "line 0");
    assert_eq!(store.prune_logs(1).await.unwrap(), 4);
}

pub async fn function_logs_are_pruned_per_function_by_lines_and_bytes<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let store = &stores.logs;
    let line = |function: &str, text: String| NewLogLine {
        ts_ms: 1,
        function: function.into(),
        version: 1,
        request_id: "r".into(),
        stream: "stdout".into(),
        line: text,
    };
    store
        .append_logs(&[line("quiet", "kept".into())])
        .await
        .unwrap();
    let flood: Vec<_> = (0..100).map(|n| line("loud", format!("{n:09}"))).collect();
    store.append_logs(&flood).await.unwrap();

    // 100 lines of 9 bytes; keep 10 lines.
    assert_eq!(
        store
            .prune_function_logs("loud", 10, 1 << 20)
            .await
            .unwrap(),
        90
    );
    let loud = store.logs_tail("loud", 1000).await.unwrap();
    assert_eq!(loud.len(), 10);
    assert_eq!(loud[0].line.line, "000000090");
    // 45 bytes keep the newest 5 lines.
    assert_eq!(store.prune_function_logs("loud", 10, 45).await.unwrap(), 5);
    let loud = store.logs_tail("loud", 1000).await.unwrap();
    assert_eq!(loud.len(), 5);
    assert_eq!(loud[0].line.line, "000000095");
    // Another function's lines are untouched.
    assert_eq!(store.logs_tail("quiet", 10).await.unwrap().len(), 1);
    assert_eq!(
        store
            .prune_function_logs("quiet", 10, 1 << 20)
            .await
            .unwrap(),
        0
    );
}
