//! An image classifier on wasi:nn: the example of model serving.
//!
//! `POST /` (any path) with a PNG or JPEG body answers JSON with the
//! model's scores and its top classes. The image is preprocessed here, in
//! the guest, the way the PP-LCNet orientation classifier was trained:
//! shorter side resized to 256 (Lanczos; skipped when it is 256 already),
//! centre crop 224x224, BGR, scaled to [0, 1] and normalised with ImageNet's
//! mean and deviation, laid out `[1, 3, 224, 224]`.
//!
//! An object-created CloudEvent (`ce-type: dev.mayfly.object.created`, a
//! trigger on a bucket) classifies that object instead: the guest reads it
//! through the admin API with its credential (wasi:config keys
//! `mayfly.credential` and `mayfly.api_url`) and writes the answer back as
//! `results/<key>.json` in the same bucket.
//!
//! Environment: `MODEL` (default `orientation`) names the model, `LABELS`
//! (comma-separated; default `0,90,180,270`) its classes.

use std::io::Read as _;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

mod nn {
    wit_bindgen::generate!({
        path: "../../crates/runtime/wit/nn",
        world: "wasi:nn/ml",
        generate_all,
    });
}

mod host {
    wit_bindgen::generate!({
        path: "../../crates/runtime/wit",
        world: "mayfly:host/capabilities",
        generate_all,
    });
}

use nn::wasi::nn::{graph, tensor};
use preprocess::{SIDE, preprocess};

mod preprocess;

struct Classify;

impl wasip2::exports::http::incoming_handler::Guest for Classify {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let (status, body) = match serve(request) {
            Ok(json) => (200, json),
            Err((status, message)) => (status, format!("{{\"error\":{}}}", quote(&message))),
        };
        respond(response_out, status, body.into_bytes());
    }
}

type Answer<T> = Result<T, (u16, String)>;

fn serve(request: IncomingRequest) -> Answer<String> {
    let headers = request.headers().entries();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let body = read_body(request)?;
    if header("ce-type").as_deref() == Some("dev.mayfly.object.created") {
        let bucket = header("ce-source")
            .and_then(|s| s.strip_prefix("/buckets/").map(str::to_string))
            .ok_or((400, "the event has no /buckets/ source".to_string()))?;
        let key = header("ce-subject").ok_or((400, "the event has no subject".to_string()))?;
        if key.starts_with("results/") {
            return Ok("{\"skipped\":\"a result\"}".into());
        }
        let image = api(Method::Get, &bucket, &key, None)?;
        let json = classify(&image)?;
        api(
            Method::Put,
            &bucket,
            &format!("results/{key}.json"),
            Some(json.as_bytes()),
        )?;
        return Ok(json);
    }
    classify(&body)
}

fn read_body(request: IncomingRequest) -> Answer<Vec<u8>> {
    let body = request
        .consume()
        .map_err(|()| (500, "no request body".to_string()))?;
    let mut bytes = Vec::new();
    {
        let mut stream = body
            .stream()
            .map_err(|()| (500, "no request body stream".to_string()))?;
        stream
            .read_to_end(&mut bytes)
            .map_err(|e| (400, format!("cannot read the request body: {e}")))?;
    }
    Ok(bytes)
}

/// Decodes, preprocesses and classifies `image`; the answer as JSON.
fn classify(image: &[u8]) -> Answer<String> {
    let input = preprocess(image).map_err(|e| (400, e))?;
    let model = std::env::var("MODEL").unwrap_or_else(|_| "orientation".into());
    let labels: Vec<String> = std::env::var("LABELS")
        .unwrap_or_else(|_| "0,90,180,270".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let nn_error = |what: &str, e: nn::wasi::nn::errors::Error| {
        (
            500,
            format!("wasi:nn {what} failed ({:?}): {}", e.code(), e.data()),
        )
    };
    let graph = graph::load_by_name(&model).map_err(|e| nn_error("load-by-name", e))?;
    let context = graph
        .init_execution_context()
        .map_err(|e| nn_error("init-execution-context", e))?;
    let tensor = tensor::Tensor::new(&[1, 3, SIDE, SIDE], tensor::TensorType::Fp32, &input);
    let outputs = context
        .compute(vec![("x".to_string(), tensor)])
        .map_err(|e| nn_error("compute", e))?;
    let (_, output) = outputs
        .into_iter()
        .next()
        .ok_or((500, "the model returned no output".to_string()))?;
    let scores: Vec<f32> = output
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    let top: Vec<String> = order
        .iter()
        .take(3)
        .map(|i| {
            let label = labels.get(*i).cloned().unwrap_or_else(|| i.to_string());
            format!(
                "{{\"class\":{i},\"label\":{},\"score\":{}}}",
                quote(&label),
                scores[*i]
            )
        })
        .collect();
    let all: Vec<String> = scores.iter().map(f32::to_string).collect();
    Ok(format!(
        "{{\"model\":{},\"top\":[{}],\"scores\":[{}]}}",
        quote(&model),
        top.join(","),
        all.join(",")
    ))
}

/// A call to the admin API's object endpoint with the function's
/// credential: the object's bytes (GET) or nothing (PUT).
fn api(method: Method, bucket: &str, key: &str, body: Option<&[u8]>) -> Answer<Vec<u8>> {
    use host::wasi::config::store as config;
    let get = |key: &str| {
        config::get(key)
            .ok()
            .flatten()
            .ok_or((500, format!("wasi:config has no `{key}`")))
    };
    let credential = get("mayfly.credential")?;
    let base = get("mayfly.api_url")?;
    let (scheme, authority) = match base.split_once("://") {
        Some(("https", rest)) => (Scheme::Https, rest.trim_end_matches('/').to_string()),
        Some((_, rest)) => (Scheme::Http, rest.trim_end_matches('/').to_string()),
        None => return Err((500, format!("bad api url `{base}`"))),
    };
    let headers = Fields::from_list(&[
        (
            "authorization".into(),
            format!("Bearer {credential}").into_bytes(),
        ),
        ("content-type".into(), b"application/octet-stream".to_vec()),
    ])
    .map_err(|e| (500, format!("{e:?}")))?;
    let request = OutgoingRequest::new(headers);
    let bad = |what: &str| (500, format!("cannot build the request: {what}"));
    request.set_method(&method).map_err(|()| bad("method"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| bad("scheme"))?;
    request
        .set_authority(Some(&authority))
        .map_err(|()| bad("authority"))?;
    let path = format!("/v1/buckets/{bucket}/objects/{}", encode_key(key));
    request
        .set_path_with_query(Some(&path))
        .map_err(|()| bad("path"))?;
    let outgoing = request.body().map_err(|()| bad("body"))?;
    let pending = outgoing_handler::handle(request, None)
        .map_err(|code| (502, format!("the admin API is unreachable: {code:?}")))?;
    if let Some(bytes) = body {
        let out = outgoing.write().map_err(|()| bad("body stream"))?;
        for chunk in bytes.chunks(4096) {
            out.blocking_write_and_flush(chunk)
                .map_err(|e| (502, format!("cannot send the body: {e:?}")))?;
        }
        drop(out);
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| (502, format!("{e:?}")))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(code))) => return Err((502, format!("{code:?}"))),
        Some(Err(())) | None => return Err((502, "no response".into())),
    };
    let status = response.status();
    let mut bytes = Vec::new();
    let incoming = response.consume().map_err(|()| (502, "no body".into()))?;
    {
        let mut stream = incoming
            .stream()
            .map_err(|()| (502, "no body stream".to_string()))?;
        stream
            .read_to_end(&mut bytes)
            .map_err(|e| (502, format!("{e}")))?;
    }
    if !(200..300).contains(&status) {
        return Err((
            502,
            format!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ),
        ));
    }
    Ok(bytes)
}

/// `key` as a URL path: each segment percent-encoded, `/` kept.
fn encode_key(key: &str) -> String {
    let mut out = String::new();
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `text` as a JSON string.
fn quote(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn respond(response_out: ResponseOutparam, status: u16, body: Vec<u8>) {
    let headers = Fields::from_list(&[("content-type".into(), b"application/json".to_vec())])
        .unwrap_or_else(|_| Fields::new());
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(out_body) = response.body() else {
        return;
    };
    ResponseOutparam::set(response_out, Ok(response));
    if let Ok(out) = out_body.write() {
        for chunk in body.chunks(4096) {
            if out.blocking_write_and_flush(chunk).is_err() {
                break;
            }
        }
    }
    let _ = OutgoingBody::finish(out_body, None);
}

wasip2::http::proxy::export!(Classify);
