//! Echoes a request back: the body byte-for-byte as the response body, and the
//! method, path and request headers as response headers (`x-echo-method`,
//! `x-echo-path`, `x-echo-header-<name>`).

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Echo;

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(other) => other.clone(),
    }
}

impl wasip2::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let mut reflected = vec![
            (
                "x-echo-method".to_string(),
                method_name(&request.method()).into_bytes(),
            ),
            (
                "x-echo-path".to_string(),
                request.path_with_query().unwrap_or_default().into_bytes(),
            ),
        ];
        for (name, value) in request.headers().entries() {
            reflected.push((format!("x-echo-header-{name}"), value));
        }
        let headers = Fields::from_list(&reflected).expect("reflected headers are valid");
        let response = OutgoingResponse::new(headers);
        let out_body = response.body().expect("a new response has a body");
        ResponseOutparam::set(response_out, Ok(response));

        let in_body = request.consume().expect("the body is consumed once");
        let mut input = in_body.stream().expect("the body has one input stream");
        let mut output = out_body.write().expect("the body has one output stream");
        std::io::copy(&mut input, &mut output).expect("copy the body");
        drop(input);
        drop(output);
        IncomingBody::finish(in_body);
        OutgoingBody::finish(out_body, None).expect("body finished once");
    }
}

wasip2::http::proxy::export!(Echo);
