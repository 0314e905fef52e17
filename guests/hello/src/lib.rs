//! The smallest useful function: answers every request with a greeting.

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let headers = Fields::from_list(&[("content-type".into(), b"text/plain".to_vec())])
            .unwrap_or_else(|_| Fields::new());
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("a new response has a body");
        ResponseOutparam::set(response_out, Ok(response));
        let out = body.write().expect("the body has one output stream");
        out.blocking_write_and_flush(b"Hello, world!\n")
            .expect("client went away");
        drop(out);
        OutgoingBody::finish(body, None).expect("body finished once");
    }
}

wasip2::http::proxy::export!(Hello);
