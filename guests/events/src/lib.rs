//! A trivial event handler, for the event-trigger tests and benchmarks. Every
//! request (a CloudEvent in binary content mode, or a plain request) logs one
//! line to stdout:
//!
//! `event id=… type=… source=… subject=… time=… specversion=… attempt=…
//! content-type=… path=… body=…` (`-` for a missing header; the body lossy
//! UTF-8, newlines escaped, at most 200 characters).
//!
//! The body then picks the answer:
//! - `fail:N` (N a number): 500 while the `mayfly-attempt` header is at most
//!   N (a missing header counts as attempt 1), then 200;
//! - `fail:always`: always 500;
//! - `sleep:MS`: waits MS milliseconds on a monotonic-clock pollable, then 200;
//! - anything else: 200 `ok`.

use std::fmt::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// Body bytes kept for the log line and the decision: enough for 200
/// characters of up to 4 UTF-8 bytes each, so the cut never splits one of them.
const KEPT_BYTES: usize = 1024;

/// Most body characters in the log line.
const LOGGED_CHARS: usize = 200;

struct Events;

impl wasip2::exports::http::incoming_handler::Guest for Events {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let mut buffer = [0u8; KEPT_BYTES];
        let kept = read_body(&request, &mut buffer);
        let body = &buffer[..kept];
        let headers = request.headers();
        let header = |name: &str| headers.get(name).into_iter().next();
        let attempt = header("mayfly-attempt");
        log_line(&request, body, &header);
        let attempt = attempt
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(1);
        let (status, text) = decide(body, attempt);
        respond(response_out, status, text);
    }
}

/// Reads the first `buffer.len()` bytes of the body into `buffer` and drains
/// the rest; returns how many bytes were kept.
fn read_body(request: &IncomingRequest, buffer: &mut [u8]) -> usize {
    let Ok(incoming) = request.consume() else {
        return 0;
    };
    let Ok(mut stream) = incoming.stream() else {
        return 0;
    };
    let mut kept = 0;
    while kept < buffer.len() {
        match std::io::Read::read(&mut stream, &mut buffer[kept..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => kept += n,
        }
    }
    let _ = std::io::copy(&mut stream, &mut std::io::sink());
    kept
}

/// Prints the one log line describing the request.
fn log_line(request: &IncomingRequest, body: &[u8], header: &dyn Fn(&str) -> Option<Vec<u8>>) {
    let mut line = String::with_capacity(512);
    line.push_str("event");
    for (label, name) in [
        ("id", "ce-id"),
        ("type", "ce-type"),
        ("source", "ce-source"),
        ("subject", "ce-subject"),
        ("time", "ce-time"),
        ("specversion", "ce-specversion"),
        ("attempt", "mayfly-attempt"),
        ("content-type", "content-type"),
    ] {
        let value = header(name);
        let value = value.as_deref().map(String::from_utf8_lossy);
        let _ = write!(line, " {label}={}", value.as_deref().unwrap_or("-"));
    }
    let path = request.path_with_query().unwrap_or_default();
    let _ = write!(line, " path={path} body=");
    for c in String::from_utf8_lossy(body).chars().take(LOGGED_CHARS) {
        match c {
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            c => line.push(c),
        }
    }
    println!("{line}");
}

/// The status and body to answer with, from the request body and the attempt.
fn decide(body: &[u8], attempt: u64) -> (u16, &'static str) {
    if let Some(rest) = body.strip_prefix(b"fail:") {
        if rest.starts_with(b"always") {
            return (500, "failing always\n");
        }
        if let Some(n) = leading_number(rest) {
            return if attempt <= n {
                (500, "failing this attempt\n")
            } else {
                (200, "ok")
            };
        }
    }
    if let Some(ms) = body.strip_prefix(b"sleep:").and_then(leading_number) {
        let ns = ms.saturating_mul(1_000_000);
        wasip2::clocks::monotonic_clock::subscribe_duration(ns).block();
    }
    (200, "ok")
}

/// The decimal number at the start of `bytes`, if it starts with a digit.
fn leading_number(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&bytes[..digits]).ok()?.parse().ok()
}

/// Answers with `status` and a plain-text body, ignoring a caller that went away.
fn respond(response_out: ResponseOutparam, status: u16, text: &str) {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .unwrap_or_else(|_| Fields::new());
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(response_out, Ok(response));
    if let Ok(out) = body.write() {
        let _ = out.blocking_write_and_flush(text.as_bytes());
    }
    let _ = OutgoingBody::finish(body, None);
}

wasip2::http::proxy::export!(Events);
