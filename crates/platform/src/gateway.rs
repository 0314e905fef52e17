//! The public HTTP gateway: routes each request to a function.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use mayfly_runtime::HyperOutgoingBody;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::connections::{self, ConnectionLimits, Plain, TimedBody};
use crate::platform::{Platform, text_response};

/// Serves `listener` until `shutdown` is cancelled, then lets open requests
/// finish for up to `grace`. Connections are held to `limits` (timeouts and
/// a cap, see [`connections`]).
pub async fn serve(
    platform: Arc<Platform>,
    listener: TcpListener,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let service = service_fn(move |request| {
        let platform = platform.clone();
        async move { Ok::<_, Infallible>(route(&platform, request).await) }
    });
    connections::serve(
        "gateway",
        listener,
        limits,
        Plain,
        service,
        shutdown,
        Some(grace),
    )
    .await;
}

async fn route(
    platform: &Platform,
    request: http::Request<TimedBody>,
) -> http::Response<HyperOutgoingBody> {
    let host = request_host(&request);
    let function = platform
        .catalog()
        .routes
        .lookup(host, request.uri().path())
        .cloned();
    match function {
        Some(function) => platform.invoke(&function.live, request, "http").await,
        None => text_response(
            http::StatusCode::NOT_FOUND,
            "no function serves this path: deploy one with `mayfly deploy <name> <file.wasm> --route <prefix>`\n",
        ),
    }
}

/// The request's host name without port: from the URI (HTTP/2, absolute
/// form) or the Host header.
fn request_host<B>(request: &http::Request<B>) -> Option<&str> {
    if let Some(host) = request.uri().host() {
        return Some(host);
    }
    let host = request.headers().get(http::header::HOST)?.to_str().ok()?;
    if host.starts_with('[') {
        // An IPv6 literal: `[::1]:8080`.
        return host.split_once(']').map(|(literal, _)| &literal[1..]);
    }
    Some(host.split_once(':').map_or(host, |(name, _)| name))
}
