//! The dashboard's time series on the request path: what one finished
//! invocation costs (`FunctionSeries::record`), alone and with two threads
//! recording for the same function (the atomics' cache line contended).
//!
//! `cargo bench -p mayfly-platform --bench series`; `cargo test --benches`
//! runs it once.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mayfly_platform::series::SeriesStore;

fn bench(c: &mut Criterion) {
    let store = SeriesStore::default();
    let series = store.function("hello", Default::default());
    let mut group = c.benchmark_group("series");
    group.throughput(Throughput::Elements(1));
    let mut wall = 0u64;
    group.bench_function("record", |b| {
        b.iter(|| {
            wall = (wall + 37) % 50_000;
            series.record(0, std::hint::black_box(wall + 200), 1, 128, 150);
        });
    });
    group.bench_function("record, 2 threads", |b| {
        b.iter_custom(|iterations| {
            let start = Instant::now();
            std::thread::scope(|scope| {
                for thread in 0..2u64 {
                    let series = &series;
                    scope.spawn(move || {
                        for i in 0..iterations {
                            series.record(0, std::hint::black_box(i % 9_000 + thread), 1, 128, 150);
                        }
                    });
                }
            });
            start.elapsed()
        });
    });
    group.bench_function("roll (1 function)", |b| {
        let mut t = 0i64;
        b.iter(|| {
            series.record(0, 900, 1, 128, 150);
            t += 10_000;
            store.roll(t);
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
