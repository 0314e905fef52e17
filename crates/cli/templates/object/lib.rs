//! `{{name}}`: a function that runs when objects change in a bucket.
//!
//! The `object:` trigger in `mayfly.toml` watches the bucket
//! `{{name}}-uploads`. Each change arrives as a CloudEvent: a `POST /` with
//! the headers `ce-type: dev.mayfly.object.created` (or `.deleted`),
//! `ce-subject` (the object's key, percent-encoded) and `ce-id`, and the
//! object's metadata as a JSON body (`bucket`, `key`, `size`, `etag`,
//! `content_type`, `modified_ms`). A 2xx answer acknowledges it; anything
//! else (or a panic) is retried with backoff. What the function prints is its
//! log: `mayfly logs {{name}}`.
//!
//! The logic is plain Rust in [`handle`], so `cargo test` checks it on your
//! machine; `wasi_http.rs` connects it to wasi:http.

mod wasi_http;

pub use wasi_http::{Request, Response};

/// What happened to an object.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Created,
    Deleted,
}

/// One change of one object.
#[derive(Debug, PartialEq, Eq)]
pub struct ObjectEvent {
    pub change: Change,
    /// The object's key, e.g. `in/day1.csv`.
    pub key: String,
}

/// Handles one object event.
pub fn handle(request: &Request) -> Response {
    let event = match parse(request) {
        Ok(event) => event,
        Err(error) => {
            println!("ignored: {error}");
            return Response::text(400, format!("{error}\n"));
        }
    };
    match event.change {
        // The work goes here: the bytes are `mayfly object get` away.
        Change::Created => println!(
            "created {} {}",
            event.key,
            String::from_utf8_lossy(&request.body)
        ),
        Change::Deleted => println!("deleted {}", event.key),
    }
    Response::empty(204)
}

/// Reads the change and the key from the CloudEvent headers.
pub fn parse(request: &Request) -> Result<ObjectEvent, String> {
    let change = match request.header("ce-type") {
        Some("dev.mayfly.object.created") => Change::Created,
        Some("dev.mayfly.object.deleted") => Change::Deleted,
        Some(other) => return Err(format!("not an object event: ce-type {other}")),
        None => return Err("not an object event: no ce-type header".into()),
    };
    let key = request
        .header("ce-subject")
        .map(percent_decode)
        .ok_or("an object event without a ce-subject (the key)")?;
    Ok(ObjectEvent { change, key })
}

/// Undoes the percent-encoding of header values (Mayfly encodes spaces,
/// `"`, `%`, control characters and non-ASCII characters).
fn percent_decode(text: &str) -> String {
    let hex = |byte: u8| {
        char::from(byte)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(high), Some(low)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            decoded.push(high * 16 + low);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object event, as Mayfly delivers it.
    fn event(ty: &str, key: &str) -> Request {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", "42"),
            ("ce-source", "/buckets/{{name}}-uploads"),
            ("ce-type", ty),
            ("ce-subject", key),
            ("ce-time", "2025-01-01T12:00:00.000Z"),
            ("content-type", "application/json"),
        ];
        Request {
            method: "POST".into(),
            path: "/".into(),
            headers: headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                .collect(),
            body: br#"{"bucket":"{{name}}-uploads","size":5}"#.to_vec(),
        }
    }

    #[test]
    fn created_and_deleted_events_are_read_and_acknowledged() {
        let created = event("dev.mayfly.object.created", "in/day1.csv");
        assert_eq!(
            parse(&created),
            Ok(ObjectEvent {
                change: Change::Created,
                key: "in/day1.csv".into()
            })
        );
        assert_eq!(handle(&created).status, 204);
        let deleted = event("dev.mayfly.object.deleted", "in/day1.csv");
        assert_eq!(parse(&deleted).map(|e| e.change), Ok(Change::Deleted));
        assert_eq!(handle(&deleted).status, 204);
    }

    #[test]
    fn keys_are_percent_decoded() {
        let request = event("dev.mayfly.object.created", "in/na%C3%AFve%20file%.csv");
        assert_eq!(
            parse(&request).map(|e| e.key),
            Ok("in/naïve file%.csv".into())
        );
    }

    #[test]
    fn other_events_are_refused() {
        let request = event("dev.mayfly.kv.put", "k");
        assert!(parse(&request).is_err());
        assert_eq!(handle(&request).status, 400);
    }
}
