//! The smallest WASI 0.3 function: answers every request with a greeting
//! (exports `wasi:http/handler@0.3.0`) and logs one line to stdout.
//!
//! Two paths misbehave on purpose, to test the host's limits on 0.3 guests:
//! `…/oom` grows its memory without bound, `…/spin` never returns.

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
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

wasip3::http::service::export!(Hello);
