//! Requests for functions placed on other nodes: the gateway or the admin
//! `invoke` hands them to [`Invoker::forward`], which sends them through
//! the fleet's [`mayfly_store::Forwarder`] to a node that runs the
//! function; that node runs them through [`Invoker`]'s
//! [`ForwardHandler`], as if they had reached its own gateway.
//!
//! The first node routes the request (normalised path, prefix stripped,
//! route headers set from its own view, the client's address included)
//! and the serving node keeps all of that as it is. Bodies travel whole
//! (read into memory at both ends), so they are capped at
//! [`mayfly_store::Forwarder::max_body`] besides the function's own
//! limits: a larger request gets 413, a larger response 502, each saying
//! so.

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use mayfly_runtime::HyperOutgoingBody;
use mayfly_store::{
    ForwardError, ForwardHandler, ForwardedRequest, ForwardedResponse, labels_text,
};

use crate::catalog::RemoteFunction;
use crate::invoker::{Caller, Invoker, text_response};

/// The response header naming the node that ran the function: set on every
/// gateway response of a fleet node, run there or forwarded.
pub const NODE_HEADER: &str = "x-mayfly-node";

/// Marks a response that came from another node (which set its own
/// [`NODE_HEADER`]), so the gateway does not name itself over it.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded;

/// How long a client is asked to wait before retrying when no node runs
/// the function, in seconds.
const RETRY_AFTER_SECONDS: &str = "5";

impl Invoker {
    /// Sends `request` (already routed: the path and route headers as the
    /// guest is to see them) to a node that runs `remote`, and answers with
    /// that node's response, or with an error response saying why none
    /// answered. `trigger` and `caller` are as for [`Invoker::invoke`].
    pub async fn forward<B>(
        &self,
        remote: &RemoteFunction,
        request: http::Request<B>,
        trigger: &'static str,
        caller: Caller,
    ) -> http::Response<HyperOutgoingBody>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let name = &remote.name;
        // Only the error answers name it.
        let placement = || labels_text(&remote.placement);
        let carried = self.forward.max_body();
        let own = usize::try_from(remote.max_request_bytes).unwrap_or(usize::MAX);
        let limit = own.min(carried);
        let too_large = || {
            self.requests_too_large.inc();
            let message = if own <= carried {
                format!(
                    "the request body is over {limit} bytes, the most function `{name}` takes \
                     (`mayfly deploy --max-request-bytes`)\n"
                )
            } else {
                let placement = placement();
                format!(
                    "function `{name}` runs on other nodes (those with {placement}), and a request \
                     forwarded to them carries at most {limit} bytes of body: send larger ones to \
                     a node with {placement} directly\n"
                )
            };
            text_response(http::StatusCode::PAYLOAD_TOO_LARGE, message)
        };
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            return too_large();
        }
        let (parts, body) = request.into_parts();
        let body = match collect_limited(body, limit).await {
            Ok(body) => body,
            Err(None) => return too_large(),
            Err(Some(error)) => {
                return text_response(http::StatusCode::BAD_REQUEST, format!("{error}\n"));
            }
        };
        let forwarded = ForwardedRequest {
            trigger: trigger.to_string(),
            operator: caller == Caller::Operator,
            method: parts.method.to_string(),
            uri: parts
                .uri
                .path_and_query()
                .map_or("/", |path| path.as_str())
                .to_string(),
            headers: header_pairs(&parts.headers),
            body,
        };
        match self
            .forward
            .forward(name, forwarded, remote.forward_timeout)
            .await
        {
            Ok(answer) => response_of(answer),
            Err(ForwardError::NoNode) => {
                let placement = placement();
                let mut response = text_response(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "function `{name}` runs only on nodes with {placement}; none is reachable: \
                         try again later, or start one with `mayfly serve --labels {placement}`\n"
                    ),
                );
                response.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static(RETRY_AFTER_SECONDS),
                );
                response
            }
            Err(ForwardError::Timeout(waited)) => text_response(
                http::StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "function `{name}` runs on another node (one with {}), which did not \
                     answer within {:.1}s\n",
                    placement(),
                    waited.as_secs_f64()
                ),
            ),
            Err(ForwardError::TooLarge { .. }) => too_large(),
            Err(ForwardError::Failed(error)) => text_response(
                http::StatusCode::BAD_GATEWAY,
                format!(
                    "cannot forward the request for function `{name}` to a node with \
                     {}: {error}\n",
                    placement()
                ),
            ),
        }
    }
}

#[async_trait::async_trait]
impl ForwardHandler for Invoker {
    async fn handle(&self, function: &str, request: ForwardedRequest) -> ForwardedResponse {
        let node = self.node_header.clone();
        let mut answer = self.run_forwarded(function, request).await;
        if let Some(node) = node {
            // The node, not the guest, says who served.
            answer.headers.retain(|(name, _)| name != NODE_HEADER);
            answer.headers.push((
                NODE_HEADER.to_string(),
                Bytes::copy_from_slice(node.as_bytes()),
            ));
        }
        answer
    }
}

impl Invoker {
    /// Runs a request another node forwarded through `function`'s `live`
    /// alias, and reads its whole response.
    async fn run_forwarded(
        &self,
        function: &str,
        forwarded: ForwardedRequest,
    ) -> ForwardedResponse {
        let Some(served) = self.catalog().by_name.get(function).cloned() else {
            // Its placement moved away from this node meanwhile.
            return ForwardedResponse::text(
                http::StatusCode::SERVICE_UNAVAILABLE.as_u16(),
                format!("this node no longer runs function `{function}`: try again\n"),
            );
        };
        let request = match request_of(
            forwarded.method,
            &forwarded.uri,
            forwarded.headers,
            forwarded.body,
        ) {
            Ok(request) => request,
            Err(error) => {
                return ForwardedResponse::text(
                    http::StatusCode::BAD_REQUEST.as_u16(),
                    format!("the forwarded request is not valid: {error}\n"),
                );
            }
        };
        let trigger = if forwarded.trigger == "invoke" {
            "invoke"
        } else {
            "http"
        };
        let caller = if forwarded.operator {
            Caller::Operator
        } else {
            Caller::Public
        };
        let response = self.invoke(&served.live, request, trigger, caller).await;
        let (parts, body) = response.into_parts();
        let limit = self.forward.max_body();
        let body = match collect_limited(body, limit).await {
            Ok(body) => body,
            Err(None) => {
                return ForwardedResponse::text(
                    http::StatusCode::BAD_GATEWAY.as_u16(),
                    format!(
                        "the response of function `{function}` is over the {limit} bytes a \
                         forwarded response carries: call a node that runs it directly\n"
                    ),
                );
            }
            Err(Some(error)) => {
                return ForwardedResponse::text(
                    http::StatusCode::BAD_GATEWAY.as_u16(),
                    format!("the response of function `{function}` failed: {error:?}\n"),
                );
            }
        };
        ForwardedResponse {
            status: parts.status.as_u16(),
            headers: header_pairs(&parts.headers),
            body,
        }
    }
}

type ForwardedBody = http_body_util::combinators::BoxBody<Bytes, wasmtime_wasi_http::Error>;

/// The request a forwarded one describes, for the invoker.
fn request_of(
    method: String,
    uri: &str,
    headers: Vec<(String, Bytes)>,
    body: Bytes,
) -> Result<http::Request<ForwardedBody>, http::Error> {
    let mut request = http::Request::builder().method(method.as_str()).uri(uri);
    for (name, value) in headers {
        request = request.header(name, value.as_ref());
    }
    request.body(Full::new(body).map_err(|never| match never {}).boxed())
}

/// The response a forwarded answer describes, for the client.
fn response_of(answer: ForwardedResponse) -> http::Response<HyperOutgoingBody> {
    let mut response = http::Response::new(
        Full::new(answer.body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    match http::StatusCode::from_u16(answer.status) {
        Ok(status) => *response.status_mut() = status,
        Err(_) => {
            return text_response(
                http::StatusCode::BAD_GATEWAY,
                format!(
                    "the node running the function answered status {}, which is not valid\n",
                    answer.status
                ),
            );
        }
    }
    let headers = response.headers_mut();
    for (name, value) in answer.headers {
        // The serving node's own response headers are valid; a pair that
        // somehow is not is left out rather than failing the answer.
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_maybe_shared(value),
        ) {
            headers.append(name, value);
        }
    }
    response.extensions_mut().insert(Forwarded);
    response
}

/// The whole of `body`, or `Err(None)` once it is over `limit` bytes, or
/// `Err(Some(error))` when it fails.
async fn collect_limited<B>(mut body: B, limit: usize) -> Result<Bytes, Option<B::Error>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Some)?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                return Err(None);
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(collected.freeze())
}

/// A header map as the forwarded messages carry it: (name, value) pairs in
/// order, repeated names kept.
fn header_pairs(headers: &http::HeaderMap) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}
