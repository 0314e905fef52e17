//! The wasi:http glue: reads the incoming request into a [`Request`], calls
//! [`crate::handle`] and writes its [`Response`] back. The function itself is
//! in `lib.rs`; this file rarely needs changes.
//!
//! The glue is compiled for WebAssembly only (`target_arch = "wasm32"`), so
//! that `cargo test` runs the function's tests on your machine.
//!
//! It uses the plain `wasip2` bindings rather than an async layer such as
//! `wstd`: with this project's release profile the greeting component is
//! ~70 KB here against ~260 KB with wstd 0.6.8, and a crate on wstd's
//! server macro does not link for the host, so `cargo test` could not run.
//! For streaming bodies or outbound HTTP, `wstd` (standard `http` types,
//! async) is a good choice.

/// A request, body included (Mayfly caps its size at the function's
/// `max_request_bytes`, 16 MiB by default).
#[derive(Debug, Default)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path and query, e.g. `/hello/world?lang=en`.
    pub path: String,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of the header `name`, if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }
}

/// The answer to a request.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The `content-type` header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A plain-text answer.
    pub fn text(status: u16, text: impl Into<String>) -> Response {
        Response {
            status,
            content_type: Some("text/plain; charset=utf-8".into()),
            body: text.into().into_bytes(),
        }
    }

    /// An answer without a body, e.g. 204 No Content.
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            content_type: None,
            body: Vec::new(),
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod export {
    use std::io::{Read as _, Write as _};

    use wasip2::http::types::{
        Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
    };

    use super::{Request, Response};

    struct Component;

    impl wasip2::exports::http::incoming_handler::Guest for Component {
        fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
            let request = Request {
                method: method_name(request.method()),
                path: request.path_with_query().unwrap_or_default(),
                headers: request.headers().entries(),
                body: read_body(&request),
            };
            respond(response_out, crate::handle(&request));
        }
    }

    wasip2::http::proxy::export!(Component);

    fn method_name(method: Method) -> String {
        let name = match method {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Connect => "CONNECT",
            Method::Options => "OPTIONS",
            Method::Trace => "TRACE",
            Method::Patch => "PATCH",
            Method::Other(other) => return other,
        };
        name.to_string()
    }

    /// Reads the whole request body (empty if there is none or it cannot be read).
    fn read_body(request: &IncomingRequest) -> Vec<u8> {
        let mut body = Vec::new();
        let Ok(incoming) = request.consume() else {
            return body;
        };
        let Ok(mut stream) = incoming.stream() else {
            return body;
        };
        if let Err(error) = stream.read_to_end(&mut body) {
            eprintln!("reading the request body failed: {error}");
        }
        // A stream must go before the body it belongs to.
        drop(stream);
        body
    }

    /// Sends `response`; a client that went away is not an error here.
    fn respond(response_out: ResponseOutparam, response: Response) {
        let entries: Vec<(String, Vec<u8>)> = response
            .content_type
            .map(|value| ("content-type".to_string(), value.into_bytes()))
            .into_iter()
            .collect();
        let headers = Fields::from_list(&entries).unwrap_or_else(|_| Fields::new());
        let outgoing = OutgoingResponse::new(headers);
        let _ = outgoing.set_status_code(response.status);
        let Ok(body) = outgoing.body() else { return };
        ResponseOutparam::set(response_out, Ok(outgoing));
        if let Ok(mut stream) = body.write() {
            let _ = stream
                .write_all(&response.body)
                .and_then(|()| std::io::Write::flush(&mut stream));
        }
        let _ = OutgoingBody::finish(body, None);
    }
}
