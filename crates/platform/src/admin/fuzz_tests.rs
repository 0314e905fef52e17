//! Bounded property tests of the admin API's request handling, run against
//! the real router in process: arbitrary methods, paths, queries, headers
//! and bodies never panic it, never get a 5xx other than 503, and every
//! error is the `{"error": {"code", "message"}}` envelope; deploy uploads
//! that are not a valid component are refused with a 4xx and deploy nothing.
//!
//! The seed is fixed so CI sees the same cases on every run (set
//! `PROPTEST_RNG_SEED` to explore others, `PROPTEST_CASES` for more cases);
//! each property also stops drawing new cases after a wall-time budget, so a
//! slow machine runs fewer cases rather than a longer suite.

#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestCaseError, TestRunner};
use tower::ServiceExt as _;

use crate::{NodeConfig, Platform};

/// Same cases on every run unless `PROPTEST_RNG_SEED` says otherwise.
const SEED: u64 = 0x6d61_7966_6c79;
/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 1024;
/// Wall time after which a property draws no new case (a debug build on
/// a 2-core CI machine runs the default cases in a few seconds).
const BUDGET: Duration = Duration::from_secs(8);
/// Uploads over this are refused as too large: small, so the tests can
/// cross it without allocating the default 64 MiB.
const MAX_UPLOAD: usize = 256 << 10;

fn config() -> Config {
    let defaults = Config::default();
    Config {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            defaults.cases
        } else {
            CASES
        },
        // Failures are reported with their shrunk case; a regressions file
        // next to the sources would only be noise in the repository.
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: match defaults.rng_seed {
            RngSeed::Random => RngSeed::Fixed(SEED),
            fixed => fixed,
        },
        max_shrink_time: 20_000,
        ..defaults
    }
}

/// A node's admin router over a fresh data directory.
struct Harness {
    runtime: tokio::runtime::Runtime,
    router: Router,
    platform: Arc<Platform>,
    /// The first admin token, once the node writes one.
    token: Option<String>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        // Multi-threaded: the node's background tasks (writers, autoscaler,
        // event workers) must run while the test thread is between cases.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut node = NodeConfig::new(dir.path());
        node.max_component_bytes = MAX_UPLOAD;
        let stores = mayfly_store::Stores::sqlite(dir.path()).unwrap();
        let platform = runtime.block_on(Platform::open(node, stores)).unwrap();
        let router = super::router(platform.clone(), MAX_UPLOAD);
        let token = std::fs::read_to_string(dir.path().join("admin.token"))
            .ok()
            .map(|text| text.trim().to_string());
        Self {
            runtime,
            router,
            platform,
            token,
            _dir: dir,
        }
    }

    /// Sends `request` and returns its status, content type and body (the
    /// body read for at most a few seconds: a stream may never end).
    fn send(&self, request: Request<Body>) -> (StatusCode, String, Option<Vec<u8>>) {
        self.runtime.block_on(async {
            let response = self.router.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let content_type = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body = tokio::time::timeout(
                Duration::from_secs(5),
                axum::body::to_bytes(response.into_body(), usize::MAX),
            )
            .await
            .ok()
            .map(|body| body.map(|bytes| bytes.to_vec()).unwrap_or_default());
            (status, content_type, body)
        })
    }

    fn authorize(&self, request: &mut Request<Body>) {
        if let Some(token) = &self.token {
            let value = HeaderValue::try_from(format!("Bearer {token}")).unwrap();
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value);
        }
    }

    /// Asserts that nothing is deployed.
    fn assert_nothing_deployed(&self) {
        let mut request = Request::get("/v1/functions").body(Body::empty()).unwrap();
        self.authorize(&mut request);
        let (status, _, body) = self.send(request);
        assert_eq!(status, StatusCode::OK);
        let functions: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
        assert_eq!(functions, serde_json::json!([]), "something was deployed");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        self.runtime.block_on(self.platform.close(deadline));
    }
}

/// Runs `check` on cases of `strategy` until the cases or the time budget
/// run out; once a case fails, shrinking goes on regardless of time.
fn run<S: Strategy>(strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let deadline = Instant::now() + BUDGET;
    let failed = Cell::new(false);
    let ran = Cell::new(0u32);
    let config = config();
    let wanted = config.cases.min(32);
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |case| {
        if !failed.get() && Instant::now() > deadline {
            return Ok(());
        }
        ran.set(ran.get() + 1);
        check(case).inspect_err(|_| failed.set(true))
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    // Far fewer cases than asked means the budget is too tight to test much.
    assert!(
        ran.get() >= wanted,
        "only {} cases ran in {BUDGET:?}",
        ran.get()
    );
}

/// The answer must be a non-5xx (bar 503) and, if an error, the JSON
/// envelope with a message.
fn check_answer(
    method: &Method,
    status: StatusCode,
    content_type: &str,
    body: Option<Vec<u8>>,
) -> Result<(), TestCaseError> {
    prop_assert!(
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "server error {status}: {}",
        String::from_utf8_lossy(body.as_deref().unwrap_or_default())
    );
    if status.is_success() || status.is_redirection() || status.is_informational() {
        return Ok(());
    }
    let Some(body) = body else {
        return Err(TestCaseError::fail(format!(
            "the {status} error body did not end within 5 s"
        )));
    };
    // A HEAD answer carries the head of the GET one, without its body.
    if method == Method::HEAD && body.is_empty() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body);
    prop_assert!(
        content_type.starts_with("application/json"),
        "{status} error with content type {content_type:?}: {text}"
    );
    let json: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| TestCaseError::fail(format!("{status} error is not JSON ({e}): {text}")))?;
    let code = json["error"]["code"].as_str().unwrap_or_default();
    let message = json["error"]["message"].as_str().unwrap_or_default();
    prop_assert!(
        !code.is_empty() && !message.trim().is_empty(),
        "{status} error without a code and message: {text}"
    );
    Ok(())
}

// ---- requests ----

/// The admin API's routes (and a few it may grow) with their methods;
/// `{}` is one segment, `{*}` one or more.
const ROUTES: &[(&str, &str)] = &[
    ("/", "GET"),
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/v1/dashboard/summary", "GET"),
    ("/v1/functions/{}/series", "GET"),
    ("/metrics", "GET"),
    ("/v1/status", "GET"),
    ("/v1/nodes", "GET"),
    ("/v1/sites", "GET"),
    ("/v1/audit", "GET"),
    ("/v1/tokens", "GET POST"),
    ("/v1/tokens/{}", "DELETE"),
    ("/v1/tokens/s3", "GET POST"),
    ("/v1/tokens/s3/{}", "DELETE"),
    ("/v1/secrets", "GET"),
    ("/v1/secrets/{}", "GET PUT POST DELETE"),
    ("/v1/models", "GET"),
    ("/v1/models/{}", "PUT DELETE"),
    ("/v1/functions", "GET"),
    ("/v1/functions/{}", "GET DELETE"),
    ("/v1/functions/{}/versions", "POST"),
    ("/v1/functions/{}/invoke", "POST"),
    ("/v1/functions/{}/logs", "GET"),
    ("/v1/functions/{}/triggers", "GET POST"),
    ("/v1/functions/{}/dlq", "GET DELETE"),
    ("/v1/functions/{}/dlq/redrive", "POST"),
    ("/v1/functions/{}/dlq/{}", "GET"),
    ("/v1/usage", "GET"),
    ("/v1/usage/records", "GET"),
    ("/v1/buckets", "GET"),
    ("/v1/buckets/{}/objects", "GET"),
    ("/v1/buckets/{}/objects/{*}", "GET PUT DELETE"),
    ("/v1/kv", "GET"),
    ("/v1/kv/{}", "GET"),
    ("/v1/kv/{}/{*}", "GET PUT DELETE"),
    ("/v1/queues", "GET"),
    ("/v1/queues/{}/messages", "POST"),
    ("/v1/queues/{}/batch", "POST"),
    ("/v1/queues/{}/receive", "POST"),
    ("/v1/queues/{}/messages/{}", "DELETE"),
    ("/v1/triggers", "GET"),
    ("/v1/triggers/{}", "DELETE"),
];

/// Query keys the endpoints read, and one they do not.
const QUERY_KEYS: &[&str] = &[
    "tail",
    "follow",
    "limit",
    "after",
    "prefix",
    "from",
    "to",
    "group_by",
    "function",
    "path",
    "method",
    "async",
    "max_attempts",
    "backoff_ms",
    "max",
    "wait_ms",
    "visibility_ms",
    "if_match",
    "if_none_match",
    "unknown",
];

/// Header names the endpoints read, and some they do not.
const HEADER_NAMES: &[&str] = &[
    "content-type",
    "content-length",
    "if-match",
    "if-none-match",
    "x-mayfly-content-type",
    "accept",
    "host",
    "transfer-encoding",
    "x-forwarded-for",
    "ce-type",
];

/// JSON object keys the endpoints read.
const JSON_KEYS: &[&str] = &[
    "name",
    "scopes",
    "functions",
    "source",
    "kind",
    "queue",
    "bucket",
    "schedule",
    "prefix",
    "routes",
    "limits",
    "memory_mb",
    "timeout_ms",
    "messages",
    "body",
    "data",
    "max",
    "wait_ms",
    "visibility_ms",
    "retry",
    "max_attempts",
    "backoff_ms",
    "key",
    "value",
    "outbound",
];

/// Percent-encodes every byte.
fn encode_all(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

/// Percent-encodes what a URI path or query may not hold raw.
fn encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// One path segment or query value: plausible names, odd and broken
/// escapes, dot segments, arbitrary bytes and Unicode, and huge strings.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        5 => "[a-z][a-z0-9-]{0,20}",
        2 => vec(any::<u8>(), 0..40).prop_map(|bytes| encode_all(&bytes)),
        2 => "[-%.~!$&'()*+,;=:@a-zA-Z0-9_]{0,30}",
        2 => select(&[
            "", ".", "..", "%", "%2", "%zz", "%00", "%2F", "%2e%2e", "%ff%fe", "%C0%AF",
            "a%20b", "tok_", "-", "_", "%0A", "%0D%0A", "999999999999999999999999", "-1",
        ][..])
        .prop_map(String::from),
        1 => any::<String>().prop_map(|text| encode(&text)),
        1 => (1usize..8192).prop_map(|n| "x".repeat(n)),
    ]
}

/// `route` with its `{}` and `{*}` holes filled from `segments`.
fn fill(route: &str, segments: Vec<String>) -> String {
    let mut segments = segments.into_iter();
    let mut next = move || segments.next().unwrap_or_default();
    let route = route.replace("{*}", &format!("{}/{}", next(), next()));
    let mut pieces = route.split("{}");
    let mut path = pieces.next().unwrap_or_default().to_string();
    for piece in pieces {
        path.push_str(&next());
        path.push_str(piece);
    }
    path
}

/// A method and path: mostly a route with one of its own methods, else
/// any method on a route or on a path of arbitrary segments.
fn target() -> impl Strategy<Value = (Method, String)> {
    let route = (
        select(ROUTES),
        vec(segment(), 4),
        any::<prop::sample::Index>(),
        proptest::option::weighted(0.2, method()),
    )
        .prop_map(|((route, methods), segments, pick, other)| {
            let own = || {
                let methods: Vec<&str> = methods.split(' ').collect();
                Method::from_bytes(pick.get(&methods).as_bytes()).unwrap()
            };
            (other.unwrap_or_else(own), fill(route, segments))
        });
    prop_oneof![
        6 => route,
        1 => (method(), vec(segment(), 0..6))
            .prop_map(|(method, segments)| (method, format!("/{}", segments.join("/")))),
        1 => (method(), "/[ -~]{0,40}"),
    ]
}

fn query() -> impl Strategy<Value = Option<String>> {
    let value = prop_oneof![
        "-?[0-9]{1,25}",
        select(
            &[
                "true",
                "false",
                "1",
                "yes",
                "",
                "24h",
                "1h30m",
                "2026-11-23T00:00:00Z"
            ][..]
        )
        .prop_map(String::from),
        select(&["function", "version", "hour", "day", "GET", "/", "/x?y=z"][..])
            .prop_map(String::from),
        segment(),
    ];
    let pair = (select(QUERY_KEYS), value).prop_map(|(key, value)| format!("{key}={value}"));
    proptest::option::weighted(0.6, vec(pair, 0..5).prop_map(|pairs| pairs.join("&")))
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        8 => select(vec![
            Method::GET, Method::POST, Method::PUT, Method::DELETE,
            Method::PATCH, Method::HEAD, Method::OPTIONS,
        ]),
        1 => "[A-Z]{1,10}".prop_map(|name| Method::from_bytes(name.as_bytes()).unwrap()),
    ]
}

/// Header values: plausible ones, and any bytes HTTP allows in a value.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        select(
            &[
                "application/json",
                "multipart/form-data; boundary=x",
                "multipart/form-data",
                "text/plain",
                "*",
                "0",
                "18446744073709551615",
                "-1",
                "chunked",
                "\"etag\"",
            ][..]
        )
        .prop_map(|v| v.as_bytes().to_vec()),
        vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..64),
    ]
}

#[derive(Debug, Clone)]
enum Auth {
    Token,
    Missing,
    Raw(Vec<u8>),
}

fn auth() -> impl Strategy<Value = Auth> {
    prop_oneof![
        8 => Just(Auth::Token),
        1 => Just(Auth::Missing),
        1 => prop_oneof![
            "Bearer [ -~]{0,60}".prop_map(String::into_bytes),
            select(&["Bearer", "Bearer ", "bearer mf_x", "Basic YWRtaW46YWRtaW4=", "mf_"][..])
                .prop_map(|v| v.as_bytes().to_vec()),
            header_value(),
        ]
        .prop_map(Auth::Raw),
    ]
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        segment().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![3 => select(JSON_KEYS).prop_map(String::from), 1 => any::<String>()];
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::from),
            vec((key, inner), 0..6).prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        3 => json().prop_map(|value| serde_json::to_vec(&value).unwrap()),
        1 => (json(), any::<prop::sample::Index>()).prop_map(|(value, cut)| {
            let mut bytes = serde_json::to_vec(&value).unwrap();
            bytes.truncate(cut.index(bytes.len() + 1));
            bytes
        }),
        2 => vec(any::<u8>(), 0..2048),
    ]
}

#[derive(Debug)]
struct ArbitraryRequest {
    method: Method,
    path: String,
    query: Option<String>,
    headers: Vec<(&'static str, Vec<u8>)>,
    auth: Auth,
    body: Vec<u8>,
}

fn request() -> impl Strategy<Value = ArbitraryRequest> {
    (
        target(),
        query(),
        vec((select(HEADER_NAMES), header_value()), 0..4),
        auth(),
        body(),
    )
        .prop_map(
            |((method, path), query, headers, auth, body)| ArbitraryRequest {
                method,
                path,
                query,
                headers,
                auth,
                body,
            },
        )
}

impl ArbitraryRequest {
    /// The request as the router would get it. Parts hyper would refuse
    /// before the router (an invalid URI or header) are replaced or left out.
    fn build(self, token: Option<&str>) -> Request<Body> {
        let target = match &self.query {
            Some(query) => format!("{}?{query}", self.path),
            None => self.path.clone(),
        };
        let uri = Uri::try_from(target).unwrap_or_else(|_| Uri::from_static("/v1/status"));
        let mut request = Request::builder()
            .method(self.method)
            .uri(uri)
            .body(Body::from(self.body))
            .unwrap();
        let headers = request.headers_mut();
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                headers.append(HeaderName::from_static(name), value);
            }
        }
        let authorization = match self.auth {
            Auth::Token => token.and_then(|t| HeaderValue::try_from(format!("Bearer {t}")).ok()),
            Auth::Missing => None,
            Auth::Raw(value) => HeaderValue::from_bytes(&value).ok(),
        };
        if let Some(value) = authorization {
            headers.insert(http::header::AUTHORIZATION, value);
        }
        request
    }
}

#[test]
fn arbitrary_requests_never_panic_or_fail_and_errors_are_json() {
    let harness = Harness::new();
    run(request(), |case| {
        let method = case.method.clone();
        let (status, content_type, body) = harness.send(case.build(harness.token.as_deref()));
        check_answer(&method, status, &content_type, body)
    });
    harness.assert_nothing_deployed();
}

// ---- deploy uploads ----

fn leb128(mut value: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            bytes.push(byte);
            return bytes;
        }
        bytes.push(byte | 0x80);
    }
}

/// Something that starts like a wasm binary: the magic, a core or
/// component version (or junk), then sections whose declared sizes may lie
/// (up to a huge u64), truncated and with bytes flipped.
fn wasm_like() -> impl Strategy<Value = Vec<u8>> {
    let preamble = prop_oneof![
        Just(b"\0asm\x01\0\0\0".to_vec()),
        Just(b"\0asm\x0d\0\x01\0".to_vec()),
        vec(any::<u8>(), 0..8).prop_map(|version| [b"\0asm".as_slice(), &version].concat()),
    ];
    let section = (
        any::<u8>(),
        vec(any::<u8>(), 0..96),
        prop_oneof![3 => Just(None), 1 => any::<u64>().prop_map(Some)],
    )
        .prop_map(|(id, content, declared)| {
            let size = declared.unwrap_or(content.len() as u64);
            [vec![id], leb128(size), content].concat()
        });
    (
        preamble,
        vec(section, 0..6),
        proptest::option::weighted(0.3, any::<prop::sample::Index>()),
        vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    )
        .prop_map(|(preamble, sections, cut, flips)| {
            let mut bytes = [preamble, sections.concat()].concat();
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            for (at, byte) in flips {
                if !bytes.is_empty() {
                    let at = at.index(bytes.len());
                    bytes[at] ^= byte;
                }
            }
            bytes
        })
}

fn component_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => wasm_like(),
        2 => vec(any::<u8>(), 0..512),
        1 => Just(Vec::new()),
        // Over the upload limit.
        1 => (MAX_UPLOAD..MAX_UPLOAD + (128 << 10)).prop_map(|len| {
            let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
            bytes.resize(len, 0);
            bytes
        }),
    ]
}

#[derive(Debug)]
struct Part {
    name: Option<String>,
    filename: Option<String>,
    content_type: Option<String>,
    /// A `Content-Length` the part declares, true or not.
    declared_length: Option<u64>,
    bytes: Vec<u8>,
}

/// The `component` part, mostly well named and holding wasm-like bytes.
fn component_part() -> impl Strategy<Value = Part> {
    let name = prop_oneof![
        8 => Just(Some("component".to_string())),
        1 => Just(None),
        1 => select(&["Component", "", "wasm", "component\"", "component "][..])
            .prop_map(|n| Some(n.to_string())),
    ];
    part(name, prop_oneof![6 => component_bytes(), 1 => body()])
}

/// Another part: mostly a `config` or `triggers` part holding JSON of
/// roughly the right shape.
fn extra_part() -> impl Strategy<Value = Part> {
    let named = |name: &str| Just(Some(name.to_string()));
    let json_bytes = |json: BoxedStrategy<serde_json::Value>| {
        prop_oneof![
            3 => json.prop_map(|value| serde_json::to_vec(&value).unwrap()),
            1 => body(),
        ]
    };
    prop_oneof![
        4 => part(named("config"), json_bytes(config_json().boxed())),
        2 => part(named("triggers"), json_bytes(triggers_json().boxed())),
        1 => part(named("component"), component_bytes()),
        1 => part("[ -~]{0,20}".prop_map(Some), body()),
    ]
}

/// Odd numbers for limits: out of range, negative, huge, not numbers.
fn number() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    prop_oneof![
        any::<u32>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        select(vec![0u64, 1, u64::MAX]).prop_map(Value::from),
        json(),
    ]
}

/// An object of `keys` with values from `value`.
fn object(
    keys: &'static [&'static str],
    value: impl Strategy<Value = serde_json::Value>,
) -> impl Strategy<Value = serde_json::Value> {
    vec((select(keys).prop_map(String::from), value), 0..4)
        .prop_map(|fields| serde_json::Value::Object(fields.into_iter().collect()))
}

/// A deploy `config` part: routes, limits, scaling, grants and variables
/// with plausible and odd values.
fn config_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let route = prop_oneof![
        segment().prop_map(|s| format!("/{s}")),
        segment(),
        "[a-z.]{1,12}(:[0-9]{1,5})?/[a-z/]{0,8}",
    ];
    let names = vec(segment(), 0..3).prop_map(Value::from);
    let fields = vec(
        prop_oneof![
            vec(route, 0..3).prop_map(|routes| ("routes", Value::from(routes))),
            object(
                &[
                    "memory_mb",
                    "timeout_ms",
                    "max_request_bytes",
                    "max_response_bytes",
                    "max_log_bytes"
                ],
                number(),
            )
            .prop_map(|limits| ("limits", limits)),
            object(
                &[
                    "max_concurrency",
                    "reserved_concurrency",
                    "max_queue",
                    "reuse"
                ],
                number()
            )
            .prop_map(|scaling| ("scaling", scaling)),
            object(&["kv", "objects", "queues", "outbound"], names)
                .prop_map(|grants| ("grants", grants)),
            vec((segment(), segment()), 0..3).prop_map(|variables| {
                (
                    "variables",
                    Value::Object(variables.into_iter().map(|(k, v)| (k, v.into())).collect()),
                )
            }),
            (select(JSON_KEYS), json()).prop_map(|(key, value)| (key, value)),
        ],
        0..5,
    );
    fields.prop_map(|fields| {
        Value::Object(
            fields
                .into_iter()
                .map(|(key, value)| (key.to_string(), value))
                .collect(),
        )
    })
}

/// A deploy `triggers` part: trigger specs of each kind, right or not.
fn triggers_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let source = (
        select(&["queue", "schedule", "object", "kv", "bogus"][..]),
        object(
            &["queue", "schedule", "bucket", "prefix", "events"],
            segment().prop_map(Value::from),
        ),
    )
        .prop_map(|(kind, mut source)| {
            source["kind"] = kind.into();
            source
        });
    let trigger = (
        source,
        object(&["max_attempts", "backoff_ms", "batch", "id"], number()),
    )
        .prop_map(|(source, mut trigger)| {
            trigger["source"] = source;
            trigger
        });
    vec(trigger, 0..3).prop_map(Value::from)
}

fn part(
    name: impl Strategy<Value = Option<String>>,
    bytes: impl Strategy<Value = Vec<u8>>,
) -> impl Strategy<Value = Part> {
    (
        name,
        proptest::option::of("[a-z]{1,8}\\.wasm"),
        proptest::option::weighted(
            0.3,
            select(
                &[
                    "application/wasm",
                    "application/json",
                    "text/plain",
                    "x/y; q=1",
                ][..],
            )
            .prop_map(String::from),
        ),
        proptest::option::weighted(
            0.2,
            prop_oneof![
                Just(u64::MAX),
                Just(1u64 << 40),
                any::<u32>().prop_map(u64::from)
            ],
        ),
        bytes,
    )
        .prop_map(
            |(name, filename, content_type, declared_length, bytes)| Part {
                name,
                filename,
                content_type,
                declared_length,
                bytes,
            },
        )
}

/// How the multipart body is framed, rightly or not.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Proper,
    /// No closing `--boundary--`.
    Unterminated,
    /// LF instead of CRLF.
    BareNewlines,
    /// Cut at some byte.
    Truncated(prop::sample::Index),
    /// The content type names another boundary.
    WrongBoundary,
    /// No `boundary=` in the content type.
    NoBoundary,
    /// Not multipart at all by content type.
    NotMultipart,
    /// Junk before the first boundary and between parts.
    Junk,
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        10 => Just(Framing::Proper),
        1 => Just(Framing::Unterminated),
        1 => Just(Framing::BareNewlines),
        1 => any::<prop::sample::Index>().prop_map(Framing::Truncated),
        1 => Just(Framing::WrongBoundary),
        1 => Just(Framing::NoBoundary),
        1 => Just(Framing::NotMultipart),
        1 => Just(Framing::Junk),
    ]
}

#[derive(Debug)]
struct Upload {
    function: String,
    boundary: String,
    framing: Framing,
    parts: Vec<Part>,
    /// A request `Content-Length`, true or not.
    declared_length: Option<u64>,
}

fn upload() -> impl Strategy<Value = Upload> {
    (
        prop_oneof![4 => "[a-z][a-z0-9-]{0,10}", 1 => segment()],
        prop_oneof![8 => "[A-Za-z0-9-]{1,40}", 1 => "[A-Za-z0-9'()+_,./:=?-]{1,70}"],
        framing(),
        (
            proptest::option::weighted(0.9, component_part()),
            vec(extra_part(), 0..3),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(component, mut parts, at)| {
                if let Some(component) = component {
                    parts.insert(at.index(parts.len() + 1), component);
                }
                parts
            }),
        proptest::option::weighted(
            0.2,
            prop_oneof![Just(u64::MAX), any::<u32>().prop_map(u64::from)],
        ),
    )
        .prop_map(
            |(function, boundary, framing, parts, declared_length)| Upload {
                function,
                boundary,
                framing,
                parts,
                declared_length,
            },
        )
}

impl Upload {
    fn body(&self) -> Vec<u8> {
        let newline: &[u8] = match self.framing {
            Framing::BareNewlines => b"\n",
            _ => b"\r\n",
        };
        let junk = matches!(self.framing, Framing::Junk);
        let mut body = Vec::new();
        if junk {
            body.extend_from_slice(b"preamble junk --not-it\r\n");
        }
        for part in &self.parts {
            body.extend_from_slice(format!("--{}", self.boundary).as_bytes());
            body.extend_from_slice(newline);
            let mut disposition = "Content-Disposition: form-data".to_string();
            if let Some(name) = &part.name {
                disposition.push_str(&format!("; name=\"{name}\""));
            }
            if let Some(filename) = &part.filename {
                disposition.push_str(&format!("; filename=\"{filename}\""));
            }
            body.extend_from_slice(disposition.as_bytes());
            body.extend_from_slice(newline);
            if let Some(content_type) = &part.content_type {
                body.extend_from_slice(format!("Content-Type: {content_type}").as_bytes());
                body.extend_from_slice(newline);
            }
            if let Some(length) = part.declared_length {
                body.extend_from_slice(format!("Content-Length: {length}").as_bytes());
                body.extend_from_slice(newline);
            }
            body.extend_from_slice(newline);
            body.extend_from_slice(&part.bytes);
            body.extend_from_slice(newline);
            if junk {
                body.extend_from_slice(b"junk between parts");
                body.extend_from_slice(newline);
            }
        }
        if !matches!(self.framing, Framing::Unterminated) {
            body.extend_from_slice(format!("--{}--", self.boundary).as_bytes());
            body.extend_from_slice(newline);
        }
        if let Framing::Truncated(cut) = self.framing {
            body.truncate(cut.index(body.len() + 1));
        }
        body
    }

    fn content_type(&self) -> String {
        match self.framing {
            Framing::WrongBoundary => "multipart/form-data; boundary=another".into(),
            Framing::NoBoundary => "multipart/form-data".into(),
            Framing::NotMultipart => "application/wasm".into(),
            _ => format!("multipart/form-data; boundary=\"{}\"", self.boundary),
        }
    }

    fn build(&self, token: Option<&str>) -> Request<Body> {
        let path = format!("/v1/functions/{}/versions", self.function);
        let uri =
            Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/v1/functions/f/versions"));
        let mut request = Request::post(uri)
            .header(http::header::CONTENT_TYPE, self.content_type())
            .body(Body::from(self.body()))
            .unwrap();
        if let Some(length) = self.declared_length {
            request
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        if let Some(token) = token {
            let value = HeaderValue::try_from(format!("Bearer {token}")).unwrap();
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value);
        }
        request
    }
}

#[test]
fn broken_deploy_uploads_are_refused_with_a_4xx_and_deploy_nothing() {
    let harness = Harness::new();
    run(upload(), |upload| {
        let (status, content_type, body) = harness.send(upload.build(harness.token.as_deref()));
        prop_assert!(
            status.is_client_error(),
            "upload answered {status}: {}",
            String::from_utf8_lossy(body.as_deref().unwrap_or_default())
        );
        check_answer(&Method::POST, status, &content_type, body)
    });
    harness.assert_nothing_deployed();
}

#[test]
fn the_harness_gets_past_the_gate() {
    // The properties above send the node's token on most requests; were it
    // missing, they would test little but the gate: fail loudly instead.
    let harness = Harness::new();
    let mut request = Request::get("/v1/status").body(Body::empty()).unwrap();
    harness.authorize(&mut request);
    assert_eq!(harness.send(request).0, StatusCode::OK);
    if harness.token.is_some() {
        let request = Request::get("/v1/status").body(Body::empty()).unwrap();
        let (status, content_type, body) = harness.send(request);
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        check_answer(&Method::GET, status, &content_type, body).unwrap();
    }
}
