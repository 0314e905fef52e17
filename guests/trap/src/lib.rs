//! A function that always fails: it logs a line, then panics, which with
//! `panic = "abort"` is a WebAssembly trap. The host must answer 500 and keep
//! serving every other function.

use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Trap;

impl wasip2::exports::http::incoming_handler::Guest for Trap {
    fn handle(_request: IncomingRequest, _response_out: ResponseOutparam) {
        eprintln!("about to trap on purpose");
        panic!("this guest traps on every request");
    }
}

wasip2::http::proxy::export!(Trap);
