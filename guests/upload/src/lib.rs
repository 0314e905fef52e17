//! Counts a request body's bytes as they stream in, holding one read's
//! worth at a time, and answers the count (`<n>\n`): an upload consumed the
//! way a function that hashes or forwards one would.
//!
//! A body that fails part way (cut at the function's `max_request_bytes`,
//! or its client gone) is reported on stderr with the bytes read so far,
//! and answered with a wasi:http error code, as a function that cannot
//! finish its request should.

use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse,
    ResponseOutparam, http_error_code,
};
use wasip2::io::streams::StreamError;

/// The most one read asks for.
const READ_BYTES: u64 = 64 * 1024;

struct Upload;

impl wasip2::exports::http::incoming_handler::Guest for Upload {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let body = request.consume().expect("the body is consumed once");
        let stream = body.stream().expect("the body has one input stream");
        let mut count = 0u64;
        loop {
            match stream.blocking_read(READ_BYTES) {
                Ok(bytes) => count += bytes.len() as u64,
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(error)) => {
                    // Its first line: a host may append a backtrace.
                    let reason = error.to_debug_string();
                    let reason = reason.lines().next().unwrap_or_default().to_string();
                    eprintln!("upload: the request body failed after {count} bytes: {reason}");
                    let code = http_error_code(&error)
                        .unwrap_or_else(|| ErrorCode::InternalError(Some(reason)));
                    ResponseOutparam::set(response_out, Err(code));
                    return;
                }
            }
        }
        drop(stream);
        drop(IncomingBody::finish(body));
        println!("upload: {count} bytes");

        let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
            .expect("a valid header");
        let response = OutgoingResponse::new(headers);
        let out_body = response.body().expect("a new response has a body");
        ResponseOutparam::set(response_out, Ok(response));
        let out = out_body.write().expect("the body has one output stream");
        // A client gone by now reads nothing either way.
        let _ = out.blocking_write_and_flush(format!("{count}\n").as_bytes());
        drop(out);
        let _ = OutgoingBody::finish(out_body, None);
    }
}

wasip2::http::proxy::export!(Upload);
