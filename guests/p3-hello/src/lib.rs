//! The smallest WASI 0.3 function: answers every request with a greeting
//! (exports `wasi:http/handler@0.3.0`) and logs one line to stdout.
//!
//! Two paths misbehave on purpose, to test the host's limits on 0.3 guests:
//! `…/oom` grows its memory without bound, `…/spin` never returns. And
//! `…/fetch/<authority>` GETs `http://<authority>/` through
//! `wasi:http/client` and answers `status=<n>`, or 502 with the error code.

use wasip3::http::client;
use wasip3::http::types::{ErrorCode, Fields, Method, Request, Response, Scheme};
use wasip3::{wit_future, wit_stream};

struct Hello;

impl wasip3::exports::http::handler::Guest for Hello {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        // Through the standard library (WASI 0.2 stdout): the same log.
        let path = request.get_path_with_query().unwrap_or_default();
        println!("p3-hello answering {path}");
        if path.ends_with("/oom") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(std::hint::black_box(vec![1; 1 << 20]));
            }
        }
        if path.ends_with("/spin") {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if let Some((_, authority)) = path.split_once("/fetch/") {
            return Ok(match fetch(authority).await {
                Ok(status) => reply(200, format!("status={status}\n")),
                Err(code) => reply(502, format!("{code:?}\n")),
            });
        }
        let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
            .unwrap_or_else(|_| Fields::new());
        let (mut body_tx, body_rx) = wit_stream::new();
        let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
        let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
        drop(trailers_tx);
        wasip3::spawn_local(async move {
            // Whatever is left unwritten, the client went away.
            let _unwritten = body_tx.write_all(b"Hello, world!\n".to_vec()).await;
        });
        Ok(response)
    }
}

/// An outbound GET of `http://<authority>/`: its status code.
async fn fetch(authority: &str) -> Result<u16, ErrorCode> {
    // No body and no trailers: dropping the writer sends the default.
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers_tx);
    let (request, _sent) = Request::new(Fields::new(), None, trailers_rx, None);
    let invalid = |_| ErrorCode::HttpRequestUriInvalid;
    request.set_method(&Method::Get).map_err(invalid)?;
    request.set_scheme(Some(&Scheme::Http)).map_err(invalid)?;
    request.set_authority(Some(authority)).map_err(invalid)?;
    request.set_path_with_query(Some("/")).map_err(invalid)?;
    let response = client::send(request).await?;
    Ok(response.get_status_code())
}

/// A plain-text response with `status`.
fn reply(status: u16, text: String) -> Response {
    let (mut body_tx, body_rx) = wit_stream::new();
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers_tx);
    let (response, _sent) = Response::new(Fields::new(), Some(body_rx), trailers_rx);
    let _ = response.set_status_code(status);
    wasip3::spawn_local(async move {
        let _unwritten = body_tx.write_all(text.into_bytes()).await;
    });
    response
}

wasip3::http::service::export!(Hello);
