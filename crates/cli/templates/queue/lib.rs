//! `{{name}}`: a function that processes queue messages.
//!
//! The `queue:` trigger in `mayfly.toml` delivers the messages sent to the
//! queue `{{name}}-jobs`, each as a CloudEvent: a `POST /` with the headers
//! `ce-type: dev.mayfly.queue.message`, `ce-subject` (the message id) and
//! `mayfly-attempt`, and the message as the body. A 2xx answer acknowledges
//! (removes) the message. Anything else (or a panic) is retried with
//! backoff, and after the trigger's last attempt (3 by default) the message
//! moves to the function's dead-letter queue: `mayfly dlq list {{name}}`.
//! What the function prints is its log: `mayfly logs {{name}}`.
//!
//! The logic is plain Rust in [`handle`], so `cargo test` checks it on your
//! machine; `wasi_http.rs` connects it to wasi:http.

mod wasi_http;

pub use wasi_http::{Request, Response};

/// Handles one message.
pub fn handle(request: &Request) -> Response {
    if request.header("ce-type") != Some("dev.mayfly.queue.message") {
        println!("ignored: not a queue message");
        return Response::text(
            400,
            "not a queue message (ce-type dev.mayfly.queue.message)\n",
        );
    }
    let header = |name| request.header(name).unwrap_or("-");
    println!(
        "message id={} attempt={} body={}",
        header("ce-subject"),
        header("mayfly-attempt"),
        String::from_utf8_lossy(&request.body)
    );
    match process(&request.body) {
        Ok(()) => Response::empty(204),
        Err(error) => {
            println!("failed: {error}");
            Response::text(500, format!("{error}\n"))
        }
    }
}

/// The work for one message. A body of `fail` fails, to show retries and
/// the dead-letter queue.
pub fn process(body: &[u8]) -> Result<(), String> {
    if body.trim_ascii() == b"fail" {
        return Err("asked to fail".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message, as Mayfly delivers it.
    fn message(body: &str) -> Request {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", "7"),
            ("ce-source", "/queues/{{name}}-jobs"),
            ("ce-type", "dev.mayfly.queue.message"),
            ("ce-subject", "7"),
            ("ce-time", "2025-01-01T12:00:00.000Z"),
            ("mayfly-attempt", "1"),
        ];
        Request {
            method: "POST".into(),
            path: "/".into(),
            headers: headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                .collect(),
            body: body.into(),
        }
    }

    #[test]
    fn a_message_is_processed_and_acknowledged() {
        assert_eq!(handle(&message(r#"{"id": 42}"#)).status, 204);
    }

    #[test]
    fn a_failing_message_answers_500_so_it_is_retried() {
        assert_eq!(handle(&message("fail")).status, 500);
    }

    #[test]
    fn other_events_are_refused() {
        let mut request = message("x");
        request.headers.retain(|(name, _)| name != "ce-type");
        assert_eq!(handle(&request).status, 400);
    }
}
