//! The public HTTP gateway: routes each request to a function.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use mayfly_runtime::HyperOutgoingBody;
use tokio::net::TcpListener;

use crate::platform::{Platform, text_response};

/// Serves `listener` until `shutdown` fires, then lets open requests finish
/// for up to `grace`.
pub async fn serve(
    platform: Arc<Platform>,
    listener: TcpListener,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors and the like: back off
                        // instead of spinning on the same error.
                        tracing::warn!("gateway accept failed: {error}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let platform = platform.clone();
                let service = service_fn(move |request| {
                    let platform = platform.clone();
                    async move { Ok::<_, Infallible>(route(&platform, request).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!("gateway connection ended: {error}");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("gateway: requests still open after the {grace:?} grace period");
    }
}

async fn route(
    platform: &Platform,
    request: http::Request<Incoming>,
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
