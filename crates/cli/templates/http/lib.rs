//! `{{name}}`: an HTTP function.
//!
//! `GET /{{name}}/Ada` answers `Hello, Ada!`, `POST` echoes the body back,
//! and every request logs one line (what a function prints is its log:
//! `mayfly logs {{name}}`). The logic is plain Rust in [`handle`], so
//! `cargo test` checks it on your machine; `wasi_http.rs` connects it to
//! wasi:http.

mod wasi_http;

pub use wasi_http::{Request, Response};

/// The route in `mayfly.toml`; the rest of the path is who to greet.
const ROUTE: &str = "/{{name}}";

/// Answers one request.
pub fn handle(request: &Request) -> Response {
    let response = match request.method.as_str() {
        "GET" => Response::text(200, format!("Hello, {}!\n", who(&request.path))),
        "POST" => Response {
            status: 200,
            content_type: request.header("content-type").map(str::to_string),
            body: request.body.clone(),
        },
        _ => Response::text(405, "use GET or POST\n"),
    };
    println!(
        "{} {} -> {} ({} bytes in, {} out)",
        request.method,
        request.path,
        response.status,
        request.body.len(),
        response.body.len()
    );
    response
}

/// Who to greet: the path after the route, or the world.
fn who(path: &str) -> &str {
    let path = path.split('?').next().unwrap_or_default();
    let rest = path.strip_prefix(ROUTE).unwrap_or(path).trim_matches('/');
    if rest.is_empty() { "world" } else { rest }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            headers: vec![("content-type".into(), b"text/plain".to_vec())],
            body: body.into(),
        }
    }

    #[test]
    fn get_greets_whoever_the_path_names() {
        let response = handle(&request("GET", "/{{name}}/Ada?lang=en", ""));
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"Hello, Ada!\n");
        let response = handle(&request("GET", "/{{name}}", ""));
        assert_eq!(response.body, b"Hello, world!\n");
    }

    #[test]
    fn post_echoes_the_body() {
        let response = handle(&request("POST", "/{{name}}", "ping"));
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"ping");
        assert_eq!(response.content_type.as_deref(), Some("text/plain"));
    }

    #[test]
    fn other_methods_are_refused() {
        assert_eq!(handle(&request("DELETE", "/{{name}}", "")).status, 405);
    }
}
