//! The [`UsageStore`] contract.
#![allow(missing_docs)] // Each case's name says what it checks.

use super::*;

pub(crate) const HOUR: i64 = 3_600_000;
pub(crate) const DAY: i64 = 86_400_000;
/// 2025-01-01T00:00:00Z.
pub(crate) const T0: i64 = 1_735_689_600_000;

pub(crate) fn record(id: u32, function: &str, version: u64, start_ms: i64) -> UsageRecord {
    UsageRecord {
        request_id: format!("{id:032x}"),
        client_request_id: None,
        function: function.into(),
        version,
        trigger: "http".into(),
        start_ms,
        wall_us: 1_500,
        cpu_us: 700,
        peak_memory_bytes: 1 << 20,
        memory_limit_mb: 128,
        billed_ms: billed_ms(1_500),
        outcome: Outcome::Ok,
        cold: false,
        init_us: 0,
        status: Some(200),
    }
}

pub(crate) fn query(group_by: GroupBy, from_ms: i64, to_ms: i64) -> UsageQuery {
    UsageQuery {
        from_ms,
        to_ms,
        group_by,
        function: None,
        client_request_id: None,
    }
}

/// Five records over two functions, two versions, two hours and two days.
pub(crate) fn fixture() -> Vec<UsageRecord> {
    let mut a1 = record(1, "a", 1, T0);
    a1.cold = true;
    a1.init_us = 2_600;
    a1.billed_ms = billed_ms(a1.wall_us + a1.init_us);
    let mut a2 = record(2, "a", 2, T0 + HOUR - 1);
    a2.outcome = Outcome::Timeout;
    a2.status = Some(504);
    a2.wall_us = 10_000_000;
    a2.billed_ms = billed_ms(a2.wall_us);
    let a3 = record(3, "a", 2, T0 + HOUR);
    let mut b1 = record(4, "b", 1, T0 + 2 * HOUR);
    b1.outcome = Outcome::Error;
    b1.status = None;
    b1.memory_limit_mb = 1024;
    b1.cold = true;
    b1.init_us = 40_000;
    b1.billed_ms = billed_ms(b1.wall_us + b1.init_us);
    let b2 = record(5, "b", 1, T0 + DAY);
    vec![a1, a2, a3, b1, b2]
}

/// Sums of `records` as a summary row with the given key.
pub(crate) fn expected(records: &[&UsageRecord]) -> UsageRow {
    let mut outcomes = OutcomeCounts::default();
    for r in records {
        *outcomes.slot(r.outcome) += 1;
    }
    UsageRow {
        function: None,
        version: None,
        period_start_ms: None,
        invocations: records.len() as u64,
        errors: records.iter().filter(|r| r.outcome.is_error()).count() as u64,
        outcomes,
        cold_starts: records.iter().filter(|r| r.cold).count() as u64,
        billed_ms: records.iter().map(|r| r.billed_ms).sum(),
        billed_gb_s: records.iter().map(|r| r.billed_gb_s()).sum(),
        used_gb_s: records.iter().map(|r| r.used_gb_s()).sum(),
        cpu_us: records.iter().map(|r| r.cpu_us).sum(),
        wall_us: records.iter().map(|r| r.wall_us).sum(),
        init_us: records.iter().map(|r| r.init_us).sum(),
        init_gb_s: records.iter().map(|r| r.init_gb_s()).sum(),
    }
}

/// Compares rows, allowing floating-point rounding in the GB-s sums.
fn assert_rows(actual: &[UsageRow], expected: &[UsageRow]) {
    assert_eq!(actual.len(), expected.len(), "{actual:#?}");
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            (a.billed_gb_s - e.billed_gb_s).abs() < 1e-12,
            "{a:?} vs {e:?}"
        );
        assert!((a.used_gb_s - e.used_gb_s).abs() < 1e-12, "{a:?} vs {e:?}");
        assert!((a.init_gb_s - e.init_gb_s).abs() < 1e-12, "{a:?} vs {e:?}");
        let strip = |r: &UsageRow| UsageRow {
            billed_gb_s: 0.0,
            used_gb_s: 0.0,
            init_gb_s: 0.0,
            ..r.clone()
        };
        assert_eq!(strip(a), strip(e));
    }
}
async fn fixture_ledger<B: Backend>(backend: &B) -> (B::Place, Stores, Vec<UsageRecord>) {
    let (place, stores) = fresh(backend).await;
    let records = fixture();
    assert_eq!(
        stores.usage.append_usage(&records).await.unwrap(),
        records.len()
    );
    (place, stores, records)
}

pub async fn appending_a_batch_twice_counts_it_once<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let ledger = &stores.usage;
    assert_eq!(ledger.append_usage(&[]).await.unwrap(), 0);
    let batch = fixture();
    assert_eq!(ledger.append_usage(&batch).await.unwrap(), 5);
    assert_eq!(ledger.append_usage(&batch).await.unwrap(), 0);
    assert_eq!(ledger.usage_count().await.unwrap(), 5);

    // A batch mixing known and new ids keeps only the new ones, and a
    // duplicate inside one batch counts once; the first copy wins.
    let mut changed = batch[0].clone();
    changed.wall_us = 99;
    let new = record(6, "c", 1, T0);
    let inserted = ledger
        .append_usage(&[changed, new.clone(), new.clone()])
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    assert_eq!(ledger.usage_count().await.unwrap(), 6);
    let stored = ledger.usage_records(None, 0, 10).await.unwrap();
    assert_eq!(stored[0].record, batch[0]);
    assert_eq!(stored[5].record, new);
}

pub async fn the_same_request_id_on_two_functions_is_two_records<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let ledger = &stores.usage;
    let a = record(1, "a", 1, T0);
    let b = record(1, "b", 1, T0);
    assert_eq!(
        ledger.append_usage(&[a.clone(), b.clone()]).await.unwrap(),
        2
    );
    // The writer's retry of the same batch still adds nothing.
    assert_eq!(ledger.append_usage(&[a, b]).await.unwrap(), 0);
    assert_eq!(ledger.usage_count().await.unwrap(), 2);
}

pub async fn a_client_id_is_kept_and_never_deduplicates<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let ledger = &stores.usage;
    let batch: Vec<UsageRecord> = (1..=50)
        .map(|i| UsageRecord {
            client_request_id: Some("retry-1".into()),
            ..record(i, "f", 1, T0)
        })
        .collect();
    assert_eq!(ledger.append_usage(&batch).await.unwrap(), 50);
    let stored = ledger.usage_records(None, 0, 100).await.unwrap();
    assert_eq!(stored.len(), 50);
    assert!(
        stored
            .iter()
            .all(|s| s.record.client_request_id.as_deref() == Some("retry-1"))
    );
    let json = serde_json::to_value(&stored[0]).unwrap();
    assert_eq!(json["client_request_id"], "retry-1");
}

pub async fn summary_by_function<B: Backend>(backend: &B) {
    let (_place, stores, r) = fixture_ledger(backend).await;
    let ledger = &stores.usage;
    let rows = ledger
        .usage_summary(&query(GroupBy::Function, T0, T0 + 2 * DAY))
        .await
        .unwrap();
    let with = |function: &str, row: UsageRow| UsageRow {
        function: Some(function.into()),
        ..row
    };
    assert_rows(
        &rows,
        &[
            with("a", expected(&[&r[0], &r[1], &r[2]])),
            with("b", expected(&[&r[3], &r[4]])),
        ],
    );
    // Spot-check the expectation itself, not just the two sums.
    let a = &rows[0];
    assert_eq!(a.invocations, 3);
    assert_eq!(a.errors, 1);
    assert_eq!(a.outcomes.timeout, 1);
    assert_eq!(a.outcomes.ok, 2);
    assert_eq!(a.cold_starts, 1);
    // a1's cold start: 1.5 ms handler + 2.6 ms init, billed as 5 ms.
    assert_eq!(a.billed_ms, 5 + 10_000 + 2);
    assert_eq!(a.wall_us, 1_500 + 10_000_000 + 1_500);
    assert_eq!(a.init_us, 2_600);
    assert!((a.init_gb_s - 128.0 * 2.6 / 1_024_000.0).abs() < 1e-12);
    assert_eq!(a.cpu_us, 2_100);
    assert!((a.billed_gb_s - 128.0 * 10_007.0 / 1_024_000.0).abs() < 1e-12);
    let b = &rows[1];
    assert_eq!(b.outcomes.error, 1);
    assert_eq!(b.errors, 1);
    // b1: 1.5 ms handler + 40 ms init at 1024 MB, billed as 42 ms.
    assert!((b.billed_gb_s - (1024.0 * 42.0 + 128.0 * 2.0) / 1_024_000.0).abs() < 1e-12);
}

pub async fn summary_by_version<B: Backend>(backend: &B) {
    let (_place, stores, r) = fixture_ledger(backend).await;
    let ledger = &stores.usage;
    let rows = ledger
        .usage_summary(&query(GroupBy::Version, T0, T0 + 2 * DAY))
        .await
        .unwrap();
    let with = |function: &str, version: u64, row: UsageRow| UsageRow {
        function: Some(function.into()),
        version: Some(version),
        ..row
    };
    assert_rows(
        &rows,
        &[
            with("a", 1, expected(&[&r[0]])),
            with("a", 2, expected(&[&r[1], &r[2]])),
            with("b", 1, expected(&[&r[3], &r[4]])),
        ],
    );
}

pub async fn summary_by_hour_and_day<B: Backend>(backend: &B) {
    let (_place, stores, r) = fixture_ledger(backend).await;
    let ledger = &stores.usage;
    let at = |period: i64, row: UsageRow| UsageRow {
        period_start_ms: Some(period),
        ..row
    };
    let rows = ledger
        .usage_summary(&query(GroupBy::Hour, T0, T0 + 2 * DAY))
        .await
        .unwrap();
    assert_rows(
        &rows,
        &[
            at(T0, expected(&[&r[0], &r[1]])),
            at(T0 + HOUR, expected(&[&r[2]])),
            at(T0 + 2 * HOUR, expected(&[&r[3]])),
            at(T0 + DAY, expected(&[&r[4]])),
        ],
    );
    let rows = ledger
        .usage_summary(&query(GroupBy::Day, T0, T0 + 2 * DAY))
        .await
        .unwrap();
    assert_rows(
        &rows,
        &[
            at(T0, expected(&[&r[0], &r[1], &r[2], &r[3]])),
            at(T0 + DAY, expected(&[&r[4]])),
        ],
    );
}

pub async fn summary_window_is_from_inclusive_to_exclusive<B: Backend>(backend: &B) {
    let (_place, stores, r) = fixture_ledger(backend).await;
    let ledger = &stores.usage;
    // [T0 + HOUR - 1, T0 + DAY) holds a2, a3 and b1, not a1 (before) nor
    // b2 (exactly at the end).
    let rows = ledger
        .usage_summary(&query(GroupBy::Day, T0 + HOUR - 1, T0 + DAY))
        .await
        .unwrap();
    assert_rows(
        &rows,
        &[UsageRow {
            period_start_ms: Some(T0),
            ..expected(&[&r[1], &r[2], &r[3]])
        }],
    );
    let empty = query(GroupBy::Function, T0 + 3 * HOUR, T0 + DAY);
    assert!(ledger.usage_summary(&empty).await.unwrap().is_empty());
    let inverted = query(GroupBy::Function, T0 + DAY, T0);
    assert!(ledger.usage_summary(&inverted).await.unwrap().is_empty());
}

pub async fn summary_for_one_function<B: Backend>(backend: &B) {
    let (_place, stores, r) = fixture_ledger(backend).await;
    let ledger = &stores.usage;
    for group_by in [GroupBy::Function, GroupBy::Day] {
        let rows = ledger
            .usage_summary(&UsageQuery {
                function: Some("b".into()),
                ..query(group_by, T0, T0 + DAY)
            })
            .await
            .unwrap();
        let row = expected(&[&r[3]]);
        let row = match group_by {
            GroupBy::Function => UsageRow {
                function: Some("b".into()),
                ..row
            },
            _ => UsageRow {
                period_start_ms: Some(T0),
                ..row
            },
        };
        assert_rows(&rows, &[row]);
    }
}

pub async fn periods_before_1970_round_down<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let ledger = &stores.usage;
    ledger
        .append_usage(&[record(1, "f", 1, -1), record(2, "f", 1, 0)])
        .await
        .unwrap();
    let rows = ledger
        .usage_summary(&query(GroupBy::Hour, -DAY, DAY))
        .await
        .unwrap();
    let periods: Vec<_> = rows.iter().map(|r| r.period_start_ms).collect();
    assert_eq!(periods, [Some(-HOUR), Some(0)]);
}

pub async fn records_page_by_seq_and_filter_by_function<B: Backend>(backend: &B) {
    let (_place, stores, r) = fixture_ledger(backend).await;
    let ledger = &stores.usage;
    let first = ledger.usage_records(None, 0, 2).await.unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].record, r[0]);
    assert_eq!(first[1].record, r[1]);
    assert!(first[0].seq < first[1].seq);
    let rest = ledger.usage_records(None, first[1].seq, 10).await.unwrap();
    let rest: Vec<_> = rest.into_iter().map(|s| s.record).collect();
    assert_eq!(rest, r[2..]);
    assert!(ledger.usage_records(None, 0, 0).await.unwrap().is_empty());

    let b = ledger.usage_records(Some("b"), 0, 1).await.unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].record, r[3]);
    let b = ledger.usage_records(Some("b"), b[0].seq, 10).await.unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].record, r[4]);
    assert!(
        ledger
            .usage_records(Some("b"), b[0].seq, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        ledger
            .usage_records(Some("zzz"), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn huge_values_are_clamped_not_fatal<B: Backend>(backend: &B) {
    let (_place, stores) = fresh(backend).await;
    let ledger = &stores.usage;
    let mut big = record(1, "f", u64::MAX, T0);
    big.wall_us = u64::MAX;
    big.cpu_us = u64::MAX;
    big.peak_memory_bytes = u64::MAX;
    big.billed_ms = billed_ms(u64::MAX);
    big.memory_limit_mb = u32::MAX;
    let mut big2 = big.clone();
    big2.request_id = format!("{:032x}", 2);
    assert_eq!(ledger.append_usage(&[big, big2]).await.unwrap(), 2);

    let stored = ledger.usage_records(None, 0, 10).await.unwrap();
    assert_eq!(stored[0].record.wall_us, i64::MAX as u64);
    assert_eq!(stored[0].record.version, i64::MAX as u64);
    assert_eq!(stored[0].record.memory_limit_mb, u32::MAX);
    // Sums of two i64::MAX values would overflow an integer SUM.
    let rows = ledger
        .usage_summary(&query(GroupBy::Function, T0, T0 + 1))
        .await
        .unwrap();
    assert_eq!(rows[0].invocations, 2);
    assert!(rows[0].wall_us >= i64::MAX as u64);
    assert!(rows[0].used_gb_s.is_finite());
}
