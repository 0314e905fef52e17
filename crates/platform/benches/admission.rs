//! Admission on the request path: one permit taken and given back, with no
//! contention (the common case) and with four tasks of the same function
//! competing on a two-thread runtime.
//!
//! `cargo bench -p mayfly-platform --bench admission`; `cargo test --benches`
//! runs it once.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mayfly_platform::admission::{Admission, SlotLimits};

fn admission() -> (Arc<Admission>, Arc<str>) {
    let admission = Admission::new(1000, 1 << 40);
    // A few neighbours, so the map lookup is not a one-entry special case.
    for i in 0..16 {
        let limits = SlotLimits {
            max_concurrency: 1000,
            reserved: 0,
            memory_bytes: 128 << 20,
            max_queued: 100,
            // The default share, so its check is measured.
            burst_percent: mayfly_platform::DEFAULT_FUNCTION_SHARE_PERCENT,
        };
        admission
            .configure(&format!("function-{i:02}"), limits)
            .unwrap();
    }
    (admission, Arc::from("function-07"))
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let (admission, function) = admission();
    let mut group = c.benchmark_group("admission");
    group.throughput(Throughput::Elements(1));
    group.bench_function("acquire+release", |b| {
        // Timed inside one block_on: entering the runtime per iteration
        // would cost more than what is measured.
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iterations {
                    let permit = admission
                        .acquire(&function, Duration::from_secs(1))
                        .await
                        .unwrap();
                    drop(permit);
                }
                start.elapsed()
            })
        });
    });

    const TASKS: u64 = 4;
    const EACH: u64 = 1000;
    group.throughput(Throughput::Elements(TASKS * EACH));
    group.bench_function("4 tasks x 1000 acquire+release", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let tasks: Vec<_> = (0..TASKS)
                    .map(|_| {
                        let (admission, function) = (admission.clone(), function.clone());
                        tokio::spawn(async move {
                            for _ in 0..EACH {
                                let permit = admission
                                    .acquire(&function, Duration::from_secs(1))
                                    .await
                                    .unwrap();
                                drop(permit);
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            })
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
