//! The hot path, without HTTP: instantiate a pre-linked hello component from
//! the pool, run its handler, and drain the response body; for the WASI 0.2
//! hello and the WASI 0.3 one (p3-hello).
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

/// Builds the guest package `package` and reads its component, `file`.
fn guest_component(package: &str, file: &str) -> Vec<u8> {
    let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests");
    let status = Command::new(env!("CARGO"))
        .current_dir(&guests)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            package,
        ])
        .arg("--target-dir")
        .arg(guests.join("target"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the {package} guest failed");
    std::fs::read(guests.join("target/wasm32-wasip2/release").join(file)).unwrap()
}

fn invoke(c: &mut Criterion) {
    let runtime = Runtime::new(&RuntimeConfig::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("mayfly-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |package: &str, file: &str| {
        let compiled = runtime.compile(&guest_component(package, file)).unwrap();
        let artifact = dir.join(format!("{package}.cwasm"));
        std::fs::write(&artifact, &compiled.artifact).unwrap();
        let function = runtime.load_artifact(&artifact, false).unwrap();
        (artifact, function)
    };
    let (artifact, hello) = load("hello", "hello.wasm");
    let (_, p3_hello) = load("p3-hello", "p3_hello.wasm");

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
        load: std::time::Duration::ZERO,
    });
    let limits = InvocationLimits::default();
    let logs: Arc<dyn LogSink> = Arc::new(Discard);
    let reports: Arc<dyn ReportSink> = Arc::new(Discard);
    let caps = Capabilities::none();

    for (name, function) in [
        ("instantiate+handle hello", &hello),
        ("instantiate+handle p3-hello", &p3_hello),
    ] {
        c.bench_function(name, |b| {
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
    }

    c.bench_function("load artifact (cold to warm)", |b| {
        b.iter(|| runtime.load_artifact(&artifact, false).unwrap())
    });
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, invoke);
criterion_main!(benches);
