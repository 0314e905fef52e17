//! Group commit into the usage ledger: one `append_usage` transaction per
//! batch of realistic records, on a real file with synchronous=FULL. The
//! call is awaited as the node awaits it, so the figure includes the hop to
//! tokio's blocking pool.
//!
//! `cargo bench -p mayfly-store --bench ledger` measures it (criterion
//! reports records/s); `cargo test --benches` runs it once as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use mayfly_store::sqlite::EmbeddedLedger;
use mayfly_store::{Outcome, UsageRecord, UsageStore, billed_ms};

/// Makes records the way the platform will: time-ordered UUID v7 request
/// ids, a few dozen functions with a skewed mix, mostly successful HTTP
/// invocations of a few milliseconds.
struct Records {
    next: u64,
    rng: u64,
    start_ms: i64,
}

impl Records {
    fn new() -> Self {
        let start_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        Self {
            next: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            start_ms,
        }
    }

    /// xorshift64*: enough randomness for ids and durations, no dependency.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn record(&mut self) -> UsageRecord {
        self.next += 1;
        // About 10 invocations per millisecond of wall clock.
        if self.next.is_multiple_of(10) {
            self.start_ms += 1;
        }
        let random = self.random();
        // UUID v7 layout: 48-bit ms timestamp, version 7, then random bits;
        // the counter in the low bits keeps ids unique within a millisecond.
        let request_id = format!(
            "{:012x}7{:03x}{:04x}{:012x}",
            self.start_ms as u64 & 0xffff_ffff_ffff,
            random & 0xfff,
            0x8000 | (random >> 12) & 0x3fff,
            self.next & 0xffff_ffff_ffff,
        );
        // Skewed: function 0 gets about half the traffic.
        let function = (random >> 32).trailing_zeros().min(40);
        let wall_us = 200 + (random >> 20) % 20_000;
        let outcome = match (random >> 40) % 100 {
            0..=94 => Outcome::Ok,
            95..=97 => Outcome::Error,
            98 => Outcome::Timeout,
            _ => Outcome::Throttled,
        };
        UsageRecord {
            request_id,
            client_request_id: None,
            function: format!("function-{function:02}"),
            version: 1 + (random >> 50) % 3,
            trigger: if random & 1 == 0 { "http" } else { "invoke" }.into(),
            start_ms: self.start_ms,
            wall_us,
            cpu_us: wall_us / 3,
            peak_memory_bytes: (1 + (random >> 44) % 64) << 20,
            memory_limit_mb: 128,
            billed_ms: billed_ms(wall_us),
            outcome,
            cold: (random >> 56).is_multiple_of(200),
            init_us: 0,
            status: match outcome {
                Outcome::Ok => Some(200),
                Outcome::Error => Some(500),
                Outcome::Timeout => Some(504),
                _ => Some(503),
            },
        }
    }

    fn batch(&mut self, size: usize) -> Vec<UsageRecord> {
        (0..size).map(|_| self.record()).collect()
    }
}

fn append(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("append_usage");
    for batch in [256usize, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let ledger = EmbeddedLedger::open(&dir.path().join("ledger.db")).unwrap();
        let mut records = Records::new();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("batch {batch}"), |b| {
            b.iter_batched(
                || records.batch(batch),
                |batch| {
                    let appended = runtime.block_on(ledger.append_usage(&batch)).unwrap();
                    assert_eq!(appended, batch.len());
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
