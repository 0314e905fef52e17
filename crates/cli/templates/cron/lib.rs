//! `{{name}}`: a function that runs on a schedule.
//!
//! The `schedule:` trigger in `mayfly.toml` fires it (every minute). Each
//! firing arrives as a CloudEvent: a `POST /` with the headers `ce-id`,
//! `ce-type: dev.mayfly.schedule` and `ce-time` (the scheduled time, UTC)
//! and a JSON body `{"schedule": …, "scheduled_time": …}`. A 2xx answer
//! acknowledges it; anything else (or a panic) is retried with backoff. What
//! the function prints is its log: `mayfly logs {{name}}`.
//!
//! The logic is plain Rust in [`handle`], so `cargo test` checks it on your
//! machine; `wasi_http.rs` connects it to wasi:http.

mod wasi_http;

pub use wasi_http::{Request, Response};

/// Handles one firing of the schedule.
pub fn handle(request: &Request) -> Response {
    println!("{}", describe(request));
    // The periodic work goes here. Answer 2xx once it is done.
    Response::empty(204)
}

/// One log line: the event's id, type and scheduled time, and its data.
fn describe(request: &Request) -> String {
    let header = |name| request.header(name).unwrap_or("-");
    format!(
        "tick id={} type={} time={} data={}",
        header("ce-id"),
        header("ce-type"),
        header("ce-time"),
        String::from_utf8_lossy(&request.body).trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A firing, as Mayfly delivers it.
    fn tick() -> Request {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", "0199a1b2"),
            ("ce-source", "/schedules/1"),
            ("ce-type", "dev.mayfly.schedule"),
            ("ce-time", "2025-01-01T12:00:00.000Z"),
        ];
        Request {
            method: "POST".into(),
            path: "/".into(),
            headers: headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                .collect(),
            body: br#"{"schedule":"@every 1m","scheduled_time":"2025-01-01T12:00:00.000Z"}"#
                .to_vec(),
        }
    }

    #[test]
    fn a_firing_is_acknowledged() {
        assert_eq!(handle(&tick()).status, 204);
    }

    #[test]
    fn the_log_line_names_the_firing() {
        let line = describe(&tick());
        assert!(
            line.starts_with("tick id=0199a1b2 type=dev.mayfly.schedule"),
            "{line}"
        );
        assert!(line.contains("time=2025-01-01T12:00:00.000Z"), "{line}");
        assert!(line.contains(r#""schedule":"@every 1m""#), "{line}");
    }
}
