//! The ledger as the request path sees it: records queued one at a time
//! from many invocations, committed by the writer thread in group commits,
//! until `close` has made every one durable.
//!
//! `cargo bench -p mayfly-platform --bench ledger_pipeline` reports
//! records/s end to end; `cargo test --benches` runs it once.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use mayfly_platform::ledger::Ledger;
use mayfly_platform::metering::Metrics;
use mayfly_store::{Outcome, Stores, UsageRecord, UsageStore, billed_ms};

const RECORDS: usize = 50_000;

fn records() -> Vec<UsageRecord> {
    (0..RECORDS)
        .map(|i| {
            let wall_us = 300 + (i as u64 * 7919) % 5_000;
            UsageRecord {
                request_id: uuid::Uuid::now_v7().simple().to_string(),
                client_request_id: None,
                function: format!("function-{:02}", i % 16),
                version: 1,
                trigger: "http".into(),
                start_ms: 1_790_000_000_000 + i as i64 / 10,
                wall_us,
                cpu_us: wall_us / 4,
                peak_memory_bytes: 2 << 20,
                memory_limit_mb: 128,
                billed_ms: billed_ms(wall_us),
                outcome: Outcome::Ok,
                cold: false,
                init_us: 0,
                status: Some(200),
            }
        })
        .collect()
}

fn pipeline(c: &mut Criterion) {
    // The node's runtime: the writer thread awaits the store on it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let mut group = c.benchmark_group("ledger pipeline");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(10);
    group.bench_function("queue + group commit + close", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let store: Arc<dyn UsageStore> = Stores::sqlite(dir.path()).unwrap().usage;
                let ledger = Ledger::start(
                    store.clone(),
                    Metrics::new().ledger.clone(),
                    runtime.handle().clone(),
                )
                .unwrap();
                (dir, store, ledger, records())
            },
            |(dir, store, ledger, records)| {
                for record in records {
                    ledger.record(record);
                }
                ledger.close();
                let stored = runtime.block_on(store.usage_count()).unwrap();
                assert_eq!(stored, RECORDS as u64);
                drop(dir);
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
