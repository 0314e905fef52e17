//! Writes to stdout and stderr, then answers 200. The host turns each line
//! into a log line of the invocation.

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Logs;

impl wasip2::exports::http::incoming_handler::Guest for Logs {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        println!("stdout line one for {path}");
        println!("stdout line two");
        eprintln!("stderr line");
        // A partial line without a newline must still reach the log.
        print!("no trailing newline");
        let _ = std::io::Write::flush(&mut std::io::stdout());

        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().expect("a new response has a body");
        ResponseOutparam::set(response_out, Ok(response));
        let out = body.write().expect("the body has one output stream");
        out.blocking_write_and_flush(b"logged\n")
            .expect("client went away");
        drop(out);
        OutgoingBody::finish(body, None).expect("body finished once");
    }
}

wasip2::http::proxy::export!(Logs);
