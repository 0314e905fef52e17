//! A batch-job item handler, for the job and pipeline tests and benchmarks.
//!
//! Each request is a `dev.mayfly.job.item` CloudEvent whose JSON body names
//! the object (`bucket`, `key`) and, when the job has an output, where to
//! write the result (`output_bucket`, `output_key`). The function reads the
//! object and writes its result through the admin API with its own
//! credential (`mayfly.api_url`, `mayfly.credential` from wasi:config), so
//! it needs the object buckets and the API's origin granted.
//!
//! The environment variable `MODE` picks the work:
//! - `copy` (default): the result is `done:` + the object's bytes;
//! - `sum`: the object is CSV lines `name,amount`; the result is one
//!   `name,total` line per name, sorted (a map step);
//! - `reduce`: the event lists `keys` (every object under the input
//!   prefix); each is read as `name,amount` lines and the result is the
//!   totals per name over all of them, sorted;
//! - `report`: the object holds `name,total` lines; the result is a report,
//!   one `name: total` line each, then `TOTAL: <sum>`;
//! - `noop`: nothing is read or written: 200 at once (the benchmark's
//!   trivial function).
//!
//! An object whose bytes start with `bad` fails the item: 500 every attempt.
//! `sum` also fails on a line that is not `name,integer`.

use std::collections::BTreeMap;
use std::io::Read as _;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

wit_bindgen::generate!({
    path: "../../crates/runtime/wit",
    world: "mayfly:host/capabilities",
    generate_all,
});

use wasi::config::store as config;

struct Jobs;

impl wasip2::exports::http::incoming_handler::Guest for Jobs {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let (status, text) = match handle(&request) {
            Ok(text) => (200, text),
            Err(text) => (500, text),
        };
        respond(response_out, status, &text);
    }
}

fn handle(request: &IncomingRequest) -> Result<String, String> {
    let body = read_body(request)?;
    let mode = std::env::var("MODE").unwrap_or_else(|_| "copy".into());
    if mode == "noop" {
        return Ok("ok".into());
    }
    let event = std::str::from_utf8(&body).map_err(|_| "the event is not UTF-8".to_string())?;
    let field = |name: &str| json_string(event, name);
    let bucket = field("bucket").ok_or("the event has no `bucket`")?;
    let key = field("key").ok_or("the event has no `key`")?;
    let api = config_value("mayfly.api_url")?;
    let credential = config_value("mayfly.credential")?;
    let read = |key: &str| -> Result<Vec<u8>, String> {
        let object = format!("{api}/v1/buckets/{bucket}/objects/{}", escape_path(key));
        let (status, bytes) = call(Method::Get, &object, &credential, None)?;
        if status != 200 {
            return Err(format!("reading {bucket}/{key}: status {status}"));
        }
        if bytes.starts_with(b"bad") {
            return Err(format!("bad input in {bucket}/{key}"));
        }
        Ok(bytes)
    };
    let result = match mode.as_str() {
        "copy" => [b"done:".as_slice(), &read(&key)?].concat(),
        "sum" => sum(&read(&key)?).map_err(|e| format!("{bucket}/{key}: {e}"))?,
        "reduce" => {
            let mut all = Vec::new();
            for key in json_strings(event, "keys").ok_or("the event has no `keys`")? {
                all.extend_from_slice(&read(&key)?);
                all.push(b'\n');
            }
            sum(&all)?
        }
        "report" => report(&read(&key)?)?,
        other => {
            return Err(format!(
                "unknown MODE `{other}`: use copy, sum, reduce, report or noop"
            ));
        }
    };
    if let (Some(out_bucket), Some(out_key)) = (field("output_bucket"), field("output_key")) {
        let target = format!(
            "{api}/v1/buckets/{out_bucket}/objects/{}",
            escape_path(&out_key)
        );
        let (status, answer) = call(Method::Put, &target, &credential, Some(&result))?;
        if !(200..300).contains(&status) {
            return Err(format!(
                "writing {out_bucket}/{out_key}: status {status}: {}",
                String::from_utf8_lossy(&answer)
            ));
        }
    }
    Ok("ok".into())
}

/// Totals per name of `name,amount` lines, as sorted `name,total` lines.
fn sum(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    let mut totals: BTreeMap<&str, i64> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (name, amount) = line
            .split_once(',')
            .ok_or_else(|| format!("line {}: not `name,amount`", n + 1))?;
        let amount: i64 = amount
            .trim()
            .parse()
            .map_err(|_| format!("line {}: `{amount}` is not an integer", n + 1))?;
        *totals.entry(name.trim()).or_default() += amount;
    }
    Ok(totals
        .iter()
        .map(|(name, total)| format!("{name},{total}\n"))
        .collect::<String>()
        .into_bytes())
}

/// `name,total` lines as a report: `name: total` lines, then the sum.
fn report(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let totals = sum(bytes)?;
    let text = String::from_utf8_lossy(&totals);
    let mut out = String::new();
    let mut grand = 0i64;
    for line in text.lines() {
        if let Some((name, total)) = line.split_once(',') {
            grand += total.parse::<i64>().unwrap_or(0);
            out.push_str(&format!("{name}: {total}\n"));
        }
    }
    out.push_str(&format!("TOTAL: {grand}\n"));
    Ok(out.into_bytes())
}

fn config_value(key: &str) -> Result<String, String> {
    match config::get(key) {
        Ok(Some(value)) => Ok(value),
        Ok(None) => Err(format!("`{key}` is not set")),
        Err(error) => Err(format!("cannot read `{key}`: {error:?}")),
    }
}

/// A string field of a flat JSON object (the event's body), unescaped.
fn json_string(json: &str, name: &str) -> Option<String> {
    let needle = format!("\"{name}\":");
    let start = json.find(&needle)? + needle.len();
    let rest = json[start..].trim_start().strip_prefix('"')?;
    read_string(rest).map(|(value, _)| value)
}

/// A field of the JSON object that is an array of strings.
fn json_strings(json: &str, name: &str) -> Option<Vec<String>> {
    let needle = format!("\"{name}\":");
    let start = json.find(&needle)? + needle.len();
    let mut rest = json[start..].trim_start().strip_prefix('[')?;
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        if rest.starts_with(']') {
            return Some(out);
        }
        let (value, used) = read_string(rest.strip_prefix('"')?)?;
        out.push(value);
        rest = &rest[1 + used..];
    }
}

/// The JSON string that `text` starts with (after its opening quote),
/// unescaped, and the bytes it took up to and including the closing quote.
fn read_string(text: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, i + 1)),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).map(|(_, c)| c).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// Percent-encodes a key for a URL path, keeping `/`.
fn escape_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// One outbound request with the credential; the status and whole body.
fn call(
    method: Method,
    url: &str,
    credential: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), String> {
    let (scheme, rest) = url.split_once("://").ok_or("the API URL has no scheme")?;
    let scheme = if scheme == "https" {
        Scheme::Https
    } else {
        Scheme::Http
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let headers = Fields::from_list(&[(
        "authorization".into(),
        format!("Bearer {credential}").into_bytes(),
    )])
    .map_err(|e| format!("{e:?}"))?;
    let request = OutgoingRequest::new(headers);
    let bad = |()| "bad request parts".to_string();
    request.set_method(&method).map_err(bad)?;
    request.set_scheme(Some(&scheme)).map_err(bad)?;
    request.set_authority(Some(authority)).map_err(bad)?;
    request.set_path_with_query(Some(path)).map_err(bad)?;
    let outgoing = request.body().map_err(|()| "no request body")?;
    let pending = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    {
        let stream = outgoing.write().map_err(|()| "no request stream")?;
        for chunk in body.unwrap_or_default().chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| format!("{e:?}"))?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err(format!("{url}: {code:?}")),
        Some(Err(())) | None => return Err(format!("{url}: no response")),
    };
    let status = response.status();
    let incoming = response.consume().map_err(|()| "no response body")?;
    let mut stream = incoming.stream().map_err(|()| "no response stream")?;
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{e:?}"))?;
    drop(stream);
    Ok((status, bytes))
}

fn read_body(request: &IncomingRequest) -> Result<Vec<u8>, String> {
    let incoming = request.consume().map_err(|()| "no request body")?;
    let mut stream = incoming.stream().map_err(|()| "no request stream")?;
    let mut body = Vec::new();
    stream
        .read_to_end(&mut body)
        .map_err(|_| "the request body cannot be read")?;
    Ok(body)
}

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

wasip2::http::proxy::export!(Jobs);
