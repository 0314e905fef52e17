//! WASI 0.3 requests: one call of a fresh instance's `wasi:http/handler`.
//!
//! `invoke.rs` runs the call in the same task, under the same deadline, kill
//! switch, memory meter, CPU metering and body limits as a WASI 0.2 call;
//! only the call itself differs. A 0.3 guest answers by returning a response
//! whose body is a stream it may still be writing, and that stream is fed by
//! this store's event loop, so the call keeps the loop running until the
//! response body is done (read to its end, or dropped by the caller).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p3::Request;
use wasmtime_wasi_http::p3::bindings::ServicePre;
use wasmtime_wasi_http::{WasiBody, WasiHttpView};

use crate::state::{InvocationError, InvocationState, classify_guest_error};

/// Where the response head goes: the same channel a 0.2 guest's
/// `response-outparam` sends on, so both are handed over alike.
pub(crate) type ResponseSender =
    oneshot::Sender<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;

/// Instantiates `pre` in `store`, calls its handler with `request`, sends
/// the response head on `response_tx` and returns once the response body is
/// done. A guest's error code goes on `response_tx` as the answer, as a 0.2
/// guest's would.
pub(crate) async fn serve(
    store: &mut Store<InvocationState>,
    pre: &ServicePre<InvocationState>,
    request: http::Request<WasiBody>,
    response_tx: ResponseSender,
) -> Result<(), InvocationError> {
    let service = pre
        .instantiate_async(&mut *store)
        .await
        .map_err(|e| InvocationError::Unavailable(format!("{e:#}")))?;
    let (request, request_io) =
        Request::from_http(store.data_mut().http().hooks, with_origin(request));
    store
        .run_concurrent(async move |accessor| {
            let answer = service
                .handle(accessor, request)
                .await
                .map_err(classify_guest_error)?;
            let response = match answer {
                Ok(response) => response,
                Err(code) => {
                    // The caller's side says what the function did wrong.
                    let _ = response_tx.send(Err(ErrorCode::InternalError(Some(format!(
                        "wasi:http/handler returned {code:?}"
                    )))));
                    return Ok(());
                }
            };
            let response = accessor
                .with(|mut store| {
                    response.into_http_with_getter(
                        &mut store,
                        request_io,
                        <InvocationState as WasiHttpView>::http,
                    )
                })
                .map_err(classify_guest_error)?;
            let (done_tx, done_rx) = oneshot::channel();
            let response = response.map(|body| {
                WatchedBody {
                    inner: body,
                    done: Some(done_tx),
                }
                .boxed_unsync()
            });
            if response_tx.send(Ok(response)).is_err() {
                // Nobody wants the body: the guest has nothing left to do.
                return Ok(());
            }
            // Ends with `Err` when the body is dropped, whether read to its
            // end or abandoned; the deadline bounds a body nobody reads.
            let _ = done_rx.await;
            Ok(())
        })
        .await
        .map_err(classify_guest_error)?
}

/// The request with an absolute URI (`http`, authority from `Host`), so the
/// guest's `get-scheme` and `get-authority` answer as a 0.2 guest's
/// incoming request does; unchanged when it has no usable `Host`.
fn with_origin(request: http::Request<WasiBody>) -> http::Request<WasiBody> {
    if request.uri().scheme().is_some() {
        return request;
    }
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|host| http::uri::Authority::try_from(host.as_bytes()).ok());
    if let Some(authority) = authority {
        let mut uri = parts.uri.clone().into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(authority);
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(absolute) = http::Uri::from_parts(uri) {
            parts.uri = absolute;
        }
    }
    http::Request::from_parts(parts, body)
}

/// A response body that tells the guest's call when it is done with: at its
/// end or when dropped, `done` is dropped.
struct WatchedBody {
    inner: WasiBody,
    done: Option<oneshot::Sender<()>>,
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.done = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, host: Option<&str>) -> http::Request<WasiBody> {
        let mut builder = http::Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(http::header::HOST, host);
        }
        let body = http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        builder.body(body).unwrap()
    }

    #[test]
    fn origin_form_requests_get_scheme_and_authority_from_host() {
        let request = with_origin(request("/echo?x=1", Some("example.com:8080")));
        assert_eq!(
            request.uri().to_string(),
            "http://example.com:8080/echo?x=1"
        );
    }

    #[test]
    fn requests_without_a_usable_host_are_left_alone() {
        assert_eq!(
            with_origin(request("/echo", None)).uri().to_string(),
            "/echo"
        );
        assert_eq!(
            with_origin(request("/echo", Some("bad host")))
                .uri()
                .to_string(),
            "/echo"
        );
    }
}
