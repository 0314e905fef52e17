//! Exercises the host capabilities over HTTP, for the capability tests:
//! wasi:keyvalue, wasi:config and outbound wasi:http. Query values are
//! URL-decoded; a missing parameter is a 400, an unknown path a 404.
//!
//! - `GET /kv/get?bucket=B&key=K`: 200 with the value, 404 if it is not set;
//! - `PUT|POST /kv/set?bucket=B&key=K`: sets the key to the request body, 204;
//! - `GET /kv/incr?bucket=B&key=K&by=N`: 200 with the new value (`by`
//!   defaults to 1);
//! - `GET /kv/list?bucket=B`: every key, one a line, following the cursors;
//! - `POST /kv/batch?bucket=B`: sets the body's `k=v` lines with one set-many,
//!   reads them back with one get-many and answers the `k=v` lines it got;
//! - `GET /kv/get-many?bucket=B&key=K&n=N`: one get-many naming key K N
//!   times; 200 with `values=<n> bytes=<n>`;
//! - `GET /config/get?key=K`: 200 with the value, 404 if it is not set;
//! - `GET /config/all`: every value as sorted `k=v` lines;
//! - `GET /fetch?url=U`: an outbound GET of U; 200 with `status=<n>\n<body>`,
//!   or 502 with the wasi:http error code's debug text;
//! - `GET /env`: the environment variables as sorted `NAME=value` lines.
//!
//! A key-value error is a 403 with its text when it is `access-denied` (at
//! open or later) and a 500 otherwise; a wasi:config error is a 403 with its
//! message.

use std::io::Read as _;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

wit_bindgen::generate!({
    path: "../../crates/runtime/wit",
    world: "mayfly:host/capabilities",
    // The interfaces are the WASI drafts' own packages: generate them here.
    generate_all,
});

use wasi::config::store as config;
use wasi::keyvalue::store::{self as kv, Bucket};
use wasi::keyvalue::{atomics, batch};

struct Caps;

impl wasip2::exports::http::incoming_handler::Guest for Caps {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let reply = route(&request).unwrap_or_else(|error| error);
        respond(response_out, reply);
    }
}

/// A status and a body to answer with. Handlers return `Err(reply)` to
/// answer early with an error.
struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl Reply {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            body: body.into(),
        }
    }
}

impl From<kv::Error> for Reply {
    fn from(error: kv::Error) -> Self {
        match error {
            kv::Error::AccessDenied => Reply::new(403, "access-denied"),
            kv::Error::NoSuchStore => Reply::new(500, "no-such-store"),
            kv::Error::Other(message) => Reply::new(500, format!("other: {message}")),
        }
    }
}

impl From<config::Error> for Reply {
    fn from(error: config::Error) -> Self {
        match error {
            config::Error::Upstream(message) | config::Error::Io(message) => {
                Reply::new(403, message)
            }
        }
    }
}

type Answer = Result<Reply, Reply>;

fn route(request: &IncomingRequest) -> Answer {
    let target = request.path_with_query().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = Query::parse(query);
    let method = request.method();
    let (get, write) = (
        matches!(method, Method::Get),
        matches!(method, Method::Put | Method::Post),
    );
    match path {
        "/kv/get" if get => kv_get(&query),
        "/kv/set" if write => kv_set(&query, read_body(request)?),
        "/kv/incr" if get => kv_incr(&query),
        "/kv/list" if get => kv_list(&query),
        "/kv/batch" if matches!(method, Method::Post) => kv_batch(&query, &read_body(request)?),
        "/kv/get-many" if get => kv_get_many(&query),
        "/config/get" if get => config_get(&query),
        "/config/all" if get => config_all(),
        "/fetch" if get => fetch(query.require("url")?),
        "/env" if get => Ok(environment()),
        "/kv/get" | "/kv/set" | "/kv/incr" | "/kv/list" | "/kv/batch" | "/config/get"
        | "/config/all" | "/fetch" | "/env" => Err(Reply::new(405, "method not allowed\n")),
        _ => Err(Reply::new(404, format!("no route for {path}\n"))),
    }
}

fn open(query: &Query) -> Result<Bucket, Reply> {
    Ok(kv::open(query.require("bucket")?)?)
}

fn kv_get(query: &Query) -> Answer {
    let bucket = open(query)?;
    match bucket.get(query.require("key")?)? {
        Some(value) => Ok(Reply::new(200, value)),
        None => Err(Reply::new(404, "not set\n")),
    }
}

fn kv_set(query: &Query, value: Vec<u8>) -> Answer {
    let bucket = open(query)?;
    bucket.set(query.require("key")?, &value)?;
    Ok(Reply::new(204, ""))
}

fn kv_incr(query: &Query) -> Answer {
    let bucket = open(query)?;
    let by = match query.get("by") {
        Some(by) => by
            .parse()
            .map_err(|_| Reply::new(400, format!("`by` is not a number: {by}\n")))?,
        None => 1,
    };
    let value = atomics::increment(&bucket, query.require("key")?, by)?;
    Ok(Reply::new(200, value.to_string()))
}

fn kv_list(query: &Query) -> Answer {
    let bucket = open(query)?;
    let mut lines = String::new();
    let mut cursor = None;
    loop {
        let page = bucket.list_keys(cursor)?;
        for key in page.keys {
            lines.push_str(&key);
            lines.push('\n');
        }
        match page.cursor {
            // A cursor that does not move would loop until the timeout.
            Some(next) if Some(next) != cursor => cursor = Some(next),
            _ => break,
        }
    }
    Ok(Reply::new(200, lines))
}

fn kv_batch(query: &Query, body: &[u8]) -> Answer {
    let bucket = open(query)?;
    let body = String::from_utf8_lossy(body);
    let pairs = body
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| match line.split_once('=') {
            Some((key, value)) => Ok((key.to_string(), value.as_bytes().to_vec())),
            None => Err(Reply::new(400, format!("not a k=v line: {line}\n"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    batch::set_many(&bucket, &pairs)?;
    let keys: Vec<String> = pairs.into_iter().map(|(key, _)| key).collect();
    let mut lines = Vec::new();
    for (key, value) in batch::get_many(&bucket, &keys)?.into_iter().flatten() {
        lines.extend_from_slice(key.as_bytes());
        lines.push(b'=');
        lines.extend_from_slice(&value);
        lines.push(b'\n');
    }
    Ok(Reply::new(200, lines))
}

fn kv_get_many(query: &Query) -> Answer {
    let bucket = open(query)?;
    let n = query
        .require("n")?
        .parse()
        .map_err(|_| Reply::new(400, "`n` is not a number\n"))?;
    let keys = vec![query.require("key")?.to_string(); n];
    let values = batch::get_many(&bucket, &keys)?;
    let bytes: usize = values.iter().flatten().map(|(_, value)| value.len()).sum();
    Ok(Reply::new(
        200,
        format!("values={} bytes={bytes}\n", values.len()),
    ))
}

fn config_get(query: &Query) -> Answer {
    match config::get(query.require("key")?)? {
        Some(value) => Ok(Reply::new(200, value)),
        None => Err(Reply::new(404, "not set\n")),
    }
}

fn config_all() -> Answer {
    let mut pairs = config::get_all()?;
    pairs.sort();
    let lines: String = pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    Ok(Reply::new(200, lines))
}

/// The environment the instance started with (wasi:cli/environment, read
/// the way ported code reads it), one `NAME=value` line each, sorted.
fn environment() -> Reply {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    vars.sort();
    let lines: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    Reply::new(200, lines)
}

/// GETs `url` through wasi:http/outgoing-handler.
fn fetch(url: &str) -> Answer {
    let bad_url = || Reply::new(400, format!("not an absolute http(s) URL: {url}\n"));
    let (scheme, rest) = url.split_once("://").ok_or_else(bad_url)?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return Err(bad_url()),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let path = match path {
        "" => "/".to_string(),
        query if query.starts_with('?') => format!("/{query}"),
        path => path.to_string(),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&scheme)).map_err(|()| bad_url())?;
    request
        .set_authority(Some(authority))
        .map_err(|()| bad_url())?;
    request
        .set_path_with_query(Some(&path))
        .map_err(|()| bad_url())?;

    let failed = |code: &dyn std::fmt::Debug| Reply::new(502, format!("{code:?}"));
    let pending = outgoing_handler::handle(request, None).map_err(|code| failed(&code))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(failed(&code)),
        Some(Err(())) | None => return Err(Reply::new(502, "no response")),
    };
    let mut body = format!("status={}\n", response.status()).into_bytes();
    let incoming = response.consume().map_err(|()| failed(&"no body"))?;
    let mut stream = incoming.stream().map_err(|()| failed(&"no body stream"))?;
    stream
        .read_to_end(&mut body)
        .map_err(|error| failed(&error))?;
    Ok(Reply::new(200, body))
}

/// The query string's parameters, URL-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Self {
        let pairs = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (url_decode(name), url_decode(value))
            })
            .collect();
        Self(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value.as_str())
    }

    fn require(&self, name: &str) -> Result<&str, Reply> {
        self.get(name)
            .ok_or_else(|| Reply::new(400, format!("missing query parameter `{name}`\n")))
    }
}

/// Decodes `%XX` escapes and `+` (a space); a malformed escape stays as is.
fn url_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) => {
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The whole request body (the host bounds its size).
fn read_body(request: &IncomingRequest) -> Result<Vec<u8>, Reply> {
    let unreadable = || Reply::new(400, "the request body cannot be read\n");
    let incoming = request.consume().map_err(|()| unreadable())?;
    let mut stream = incoming.stream().map_err(|()| unreadable())?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).map_err(|_| unreadable())?;
    Ok(body)
}

/// Answers with the reply as plain text, ignoring a caller that went away.
fn respond(response_out: ResponseOutparam, reply: Reply) {
    let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
        .unwrap_or_else(|_| Fields::new());
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(reply.status);
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(response_out, Ok(response));
    if let Ok(out) = body.write() {
        for chunk in reply.body.chunks(4096) {
            if out.blocking_write_and_flush(chunk).is_err() {
                break;
            }
        }
    }
    let _ = OutgoingBody::finish(body, None);
}

wasip2::http::proxy::export!(Caps);
