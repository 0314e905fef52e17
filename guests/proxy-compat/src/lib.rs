//! A function written the way `wasmtime serve` examples write them, with the
//! `wasi` crate's bindings of WASI 0.2.4 rather than this repository's usual
//! `wasip2` crate (0.2.12): it checks that components built for other
//! wasi:http hosts and other WASI 0.2 patch versions run unchanged.

use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Compat;

impl wasi::exports::http::incoming_handler::Guest for Compat {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().expect("a new response has a body");
        ResponseOutparam::set(response_out, Ok(response));
        let out = body.write().expect("the body has one output stream");
        out.blocking_write_and_flush(format!("compat guest saw {path}\n").as_bytes())
            .expect("client went away");
        drop(out);
        OutgoingBody::finish(body, None).expect("body finished once");
    }
}

wasi::http::proxy::export!(Compat);
