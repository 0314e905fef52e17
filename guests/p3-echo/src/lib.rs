//! A WASI 0.3 echo that streams: the request body goes back as the response
//! body chunk by chunk, as it arrives, never held whole.

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::wit_bindgen::StreamResult;
use wasip3::{wit_future, wit_stream};

/// Bytes read from the request per chunk.
const CHUNK: usize = 64 * 1024;

struct Echo;

impl wasip3::exports::http::handler::Guest for Echo {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let (request_done_tx, request_done_rx) = wit_future::new(|| Ok(()));
        let (mut input, _request_trailers) = Request::consume_body(request, request_done_rx);
        let (mut output, body_rx) = wit_stream::new();
        let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
        let (response, _sent) = Response::new(Fields::new(), Some(body_rx), trailers_rx);
        wasip3::spawn_local(async move {
            loop {
                let (status, chunk) = input.read(Vec::with_capacity(CHUNK)).await;
                match status {
                    StreamResult::Complete(_) => {
                        if !output.write_all(chunk).await.is_empty() {
                            // The client went away.
                            return;
                        }
                    }
                    StreamResult::Dropped | StreamResult::Cancelled => break,
                }
            }
            // The body ends when its stream closes and its trailers resolve.
            drop(output);
            let _ = trailers_tx.write(Ok(None)).await;
            let _ = request_done_tx.write(Ok(())).await;
        });
        Ok(response)
    }
}

wasip3::http::service::export!(Echo);
