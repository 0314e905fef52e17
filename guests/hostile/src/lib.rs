//! A deliberately misbehaving function for the resource-limit tests. The
//! request path picks the misbehaviour (the query string tunes it), so one
//! component can show that runaway CPU, memory, stack, log and body usage
//! each end with the right outcome while other functions keep serving:
//!
//! - `/loop` spins forever, `/oom` allocates until it aborts, `/recurse`
//!   overflows the stack, `/endless` streams a body that never ends;
//! - `/trap-mid-body`, `/spin-mid-body` and `/oom-mid-body` send a head
//!   and part of a body, then trap, spin until the timeout or run out of
//!   memory: the client must see the body cut, not a complete answer;
//! - `/flood?lines=N`, `/sleep?ms=N` and `/alloc?mb=N` misbehave within a
//!   bound and then answer 200, so limits just above them can be tested too;
//! - `/fields` and `/fanout` spend host memory and connections (see
//!   `host_limits.rs`).

mod host_limits;

use std::fmt::Write as _;
use std::hint::black_box;
use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

const MIB: usize = 1024 * 1024;

struct Hostile;

impl wasip2::exports::http::incoming_handler::Guest for Hostile {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path_with_query = request.path_with_query().unwrap_or_default();
        let (path, query) = path_with_query
            .split_once('?')
            .unwrap_or((&path_with_query, ""));
        match path {
            "/loop" => spin(),
            "/oom" => exhaust_memory(),
            "/recurse" => {
                recurse(0);
            }
            "/flood" => {
                let lines = param(query, "lines", 100_000);
                flood(lines);
                respond(response_out, &format!("flooded {lines} lines\n"));
            }
            "/endless" => endless(response_out),
            "/trap-mid-body" => {
                let _body = start_body(response_out);
                panic!("this guest traps after sending part of its body");
            }
            "/spin-mid-body" => {
                let _body = start_body(response_out);
                spin();
            }
            "/oom-mid-body" => {
                let _body = start_body(response_out);
                exhaust_memory();
            }
            // `/no-answer`: drops the response slot unset, then keeps running
            // a while before returning.
            "/no-answer" => {
                drop(response_out);
                wasip2::clocks::monotonic_clock::subscribe_duration(50_000_000).block();
            }
            // `/sleep`: waits on a monotonic-clock pollable, burning no CPU.
            "/sleep" => {
                let ms = param(query, "ms", 100);
                let ns = ms.saturating_mul(1_000_000);
                wasip2::clocks::monotonic_clock::subscribe_duration(ns).block();
                respond(response_out, &format!("slept {ms} ms\n"));
            }
            // `/alloc`: touches N MiB and keeps it alive until the answer is sent.
            "/alloc" => {
                let mb = param(query, "mb", 1);
                let chunks: Vec<Vec<u8>> = (0..mb).map(|_| vec![1u8; MIB]).collect();
                respond(response_out, &format!("allocated {mb} MiB\n"));
                black_box(&chunks);
            }
            "/fields" => host_limits::fields(query, response_out),
            "/fanout" => host_limits::fanout(query, response_out),
            // Anything else: a short usage line.
            _ => respond(
                response_out,
                "hostile guest: try /loop /oom /recurse /flood /endless /no-answer /sleep?ms= /alloc?mb=\n",
            ),
        }
    }
}

/// The number in `key=N` of a query string, or `default` if absent or invalid.
fn param(query: &str, key: &str, default: u64) -> u64 {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

/// Answers 200 with a plain-text body, ignoring a client that went away.
fn respond(response_out: ResponseOutparam, text: &str) {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .unwrap_or_else(|_| Fields::new());
    let response = OutgoingResponse::new(headers);
    let body = response.body().expect("a new response has a body");
    ResponseOutparam::set(response_out, Ok(response));
    if let Ok(out) = body.write() {
        let _ = out.blocking_write_and_flush(text.as_bytes());
    }
    let _ = OutgoingBody::finish(body, None);
}

/// `/loop`: burns CPU forever without yielding; black_box keeps the loop alive.
fn spin() -> ! {
    let mut counter = 0u64;
    loop {
        counter = black_box(counter).wrapping_add(1);
    }
}

/// `/oom`: keeps 1 MiB chunks (written, so really used) until allocation aborts.
fn exhaust_memory() -> ! {
    let mut chunks = Vec::new();
    loop {
        chunks.push(vec![1u8; MIB]);
        black_box(&chunks);
    }
}

/// `/recurse`: non-tail recursion with a stack frame per call until overflow.
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth; 32]);
    if black_box(false) {
        return depth;
    }
    recurse(black_box(depth + 1)) + frame[depth as usize % 32]
}

/// `/flood`: writes `lines` lines of 100 bytes to stdout in ~64 KiB writes.
fn flood(lines: u64) {
    let pad = "x".repeat(77);
    let mut stdout = std::io::stdout().lock();
    let mut batch = String::with_capacity(64 * 1024 + 128);
    for i in 0..lines {
        let _ = writeln!(batch, "flood line {i:>10} {pad}");
        if batch.len() >= 64 * 1024 {
            let _ = stdout.write_all(batch.as_bytes());
            batch.clear();
        }
    }
    let _ = stdout.write_all(batch.as_bytes());
    let _ = stdout.flush();
}

/// `/endless`: answers 200, then streams 64 KiB chunks forever, ignoring errors.
/// Sends a 200 head and 1 KiB of its body, flushed, and keeps the body
/// open (unfinished) for the caller's misbehaviour.
fn start_body(response_out: ResponseOutparam) -> OutgoingBody {
    let response = OutgoingResponse::new(Fields::new());
    let body = response.body().expect("a new response has a body");
    ResponseOutparam::set(response_out, Ok(response));
    {
        let mut out = body.write().expect("the body has one output stream");
        let _ = out.write_all(&[b'p'; 1024]);
        let _ = std::io::Write::flush(&mut out);
    }
    body
}

fn endless(response_out: ResponseOutparam) -> ! {
    let headers =
        Fields::from_list(&[("content-type".into(), b"application/octet-stream".to_vec())])
            .unwrap_or_else(|_| Fields::new());
    let response = OutgoingResponse::new(headers);
    let body = response.body().expect("a new response has a body");
    ResponseOutparam::set(response_out, Ok(response));
    let mut out = body.write().expect("the body has one output stream");
    let chunk = vec![b'z'; 64 * 1024];
    loop {
        let _ = out.write_all(&chunk);
    }
}

wasip2::http::proxy::export!(Hostile);
