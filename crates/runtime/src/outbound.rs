//! Outbound HTTP policy. Least privilege: a function reaches no host unless
//! it was granted one, and no grants exist yet, so every request is denied
//! with wasi:http's own `HTTP-request-denied` error.

use std::future::Future;

use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// Hooks that refuse every outgoing request.
#[derive(Debug, Default)]
pub(crate) struct DenyAllOutbound;

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for DenyAllOutbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _io: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> ResponseFuture {
        tracing::warn!(uri = %request.uri(), "outbound HTTP denied: the function has no outbound grant");
        Box::new(async { Err(Error::HttpRequestDenied) })
    }
}
