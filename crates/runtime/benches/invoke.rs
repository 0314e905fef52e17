//! The hot path, without HTTP: instantiate a pre-linked hello component from
//! the pool, run its handler, and drain the response body.
//!
//! `cargo bench -p mayfly-runtime --bench invoke` measures it;
//! `cargo test --benches` runs it once as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use mayfly_runtime::{
    Capabilities, InvocationLimits, InvocationReport, LogSink, LogStream, ReportSink,
    RequestLabels, Runtime, RuntimeConfig,
};

struct Discard;

impl LogSink for Discard {
    fn line(&self, _: &RequestLabels, _: LogStream, _: &str) {}
}

impl ReportSink for Discard {
    fn finished(&self, _: &RequestLabels, _: InvocationReport) {}
}

fn hello_component() -> Vec<u8> {
    let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests");
    let status = Command::new(env!("CARGO"))
        .current_dir(&guests)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "hello",
        ])
        .arg("--target-dir")
        .arg(guests.join("target"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the hello guest failed");
    std::fs::read(guests.join("target/wasm32-wasip2/release/hello.wasm")).unwrap()
}

fn invoke(c: &mut Criterion) {
    let runtime = Runtime::new(&RuntimeConfig::default()).unwrap();
    let compiled = runtime.compile(&hello_component()).unwrap();
    let dir = std::env::temp_dir().join(format!("mayfly-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let artifact = dir.join("hello.cwasm");
    std::fs::write(&artifact, &compiled.artifact).unwrap();
    let function = runtime.load_artifact(&artifact, false).unwrap();

    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let labels = Arc::new(RequestLabels {
        function: "hello".into(),
        version: 1,
        request_id: "bench".into(),
        trigger: "http",
        cold_start: false,
    });
    let limits = InvocationLimits::default();
    let logs: Arc<dyn LogSink> = Arc::new(Discard);
    let reports: Arc<dyn ReportSink> = Arc::new(Discard);
    let caps = Capabilities::none();

    c.bench_function("instantiate+handle hello", |b| {
        b.iter(|| {
            tokio.block_on(async {
                let request = http::Request::builder()
                    .uri("http://bench.local/hello")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let response = function
                    .handle(
                        request,
                        labels.clone(),
                        caps.clone(),
                        &limits,
                        logs.clone(),
                        reports.clone(),
                    )
                    .await
                    .unwrap();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], b"Hello, world!\n");
            })
        })
    });

    c.bench_function("load artifact (cold to warm)", |b| {
        b.iter(|| runtime.load_artifact(&artifact, false).unwrap())
    });
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, invoke);
criterion_main!(benches);
