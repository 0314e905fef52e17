//! The public HTTP gateway: routes each request to a function.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use mayfly_runtime::HyperOutgoingBody;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::catalog::{RemoteFunction, RouteMatch, Served};
use crate::connections::{self, ClientAddr, ConnectionLimits, Plain, TimedBody};
use crate::forward::{Forwarded, NODE_HEADER};
use crate::health::{HEALTHZ, Health, READYZ, liveness};
use crate::invoker::{Caller, Invoker, text_response, whole_body};
use crate::routes::{normalize_host, normalize_path};

/// Serves `listener` until `shutdown` is cancelled, then lets open requests
/// finish for up to `grace`. Connections are held to `limits` (timeouts and
/// a cap, see [`connections`]).
pub async fn serve(
    invoker: Arc<Invoker>,
    health: Arc<Health>,
    listener: TcpListener,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let service = service_fn(move |request| {
        let invoker = invoker.clone();
        let health = health.clone();
        async move {
            // The node's own two paths, before any function route (see
            // `health`): one comparison per request.
            let path = request.uri().path();
            if path == HEALTHZ || path == READYZ {
                return Ok::<_, Infallible>(health_response(&health, path == READYZ).await);
            }
            let mut response = route(&invoker, request).await;
            // A forwarded response already names the node that served it;
            // any other is this node's (a guest's own value is replaced).
            if let Some(node) = &invoker.node_header
                && response.extensions().get::<Forwarded>().is_none()
            {
                response.headers_mut().insert(NODE_HEADER, node.clone());
            }
            Ok::<_, Infallible>(response)
        }
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

/// The answer to `/healthz` or (`ready`) `/readyz`, as JSON.
async fn health_response(health: &Health, ready: bool) -> http::Response<HyperOutgoingBody> {
    let report = if ready {
        health.readiness().await
    } else {
        liveness()
    };
    report.response().map(whole_body)
}

/// Routes a request by its normalised host and path (see
/// [`normalize_host`] and [`normalize_path`]); a request whose host is
/// ambiguous or whose path is malformed is answered 400.
///
/// The guest sees the normalised path (the query, method, headers and body
/// are passed on untouched): it must see the path the request was routed
/// by, or a guest that checks its own prefixes (`/public/...` is open) could
/// be sent `/public/../admin` by a route for `/admin` and misjudge it. This
/// is what users of Workers (whose URL parser resolves dot segments) and
/// Spin expect. An already normal path (nearly every request) is neither
/// copied nor rebuilt, unless its route strips its prefix.
///
/// The node tells the guest how the request reached it in the
/// [`ROUTE_HEADERS`], replacing whatever the client sent under those names.
async fn route(
    invoker: &Invoker,
    mut request: http::Request<TimedBody>,
) -> http::Response<HyperOutgoingBody> {
    let bad_request =
        |message: String| text_response(http::StatusCode::BAD_REQUEST, format!("{message}\n"));
    let (matched, normalised) = {
        let host = match request_host(&request) {
            Ok(host) => host,
            Err(message) => return bad_request(message),
        };
        let path = match normalize_path(request.uri().path()) {
            Ok(path) => path,
            Err(message) => {
                return bad_request(format!("the request path is not valid: {message}"));
            }
        };
        let catalog = invoker.catalog();
        let matched = match catalog.routes.lookup(host.as_deref(), &path) {
            Some(RouteMatch { function, route }) => {
                Some((Runs::Here(function.clone()), route.clone()))
            }
            // Only a request this node has no function for pays for the
            // second lookup.
            None => catalog
                .remote_routes
                .lookup(host.as_deref(), &path)
                .map(|remote| {
                    (
                        Runs::Elsewhere(remote.function.clone()),
                        remote.route.clone(),
                    )
                }),
        };
        drop(catalog);
        let normalised = match path {
            Cow::Owned(path) => Some(path),
            Cow::Borrowed(_) => None,
        };
        (matched, normalised)
    };
    let Some((function, route)) = matched else {
        return text_response(
            http::StatusCode::NOT_FOUND,
            "no function serves this path: deploy one with `mayfly deploy <name> <file.wasm> --route <prefix>`\n",
        );
    };
    let path = normalised.as_deref().unwrap_or(request.uri().path());
    let path_info = path_info(path, &route.prefix);
    let guest_path = if route.strip {
        Some(if path_info.is_empty() { "/" } else { path_info }.to_string())
    } else {
        normalised.clone()
    };
    let headers = RouteHeaders {
        route: route.header.clone(),
        path_info: http::HeaderValue::from_str(path_info).ok(),
        full_url: full_url(&request, path),
        client_addr: request
            .extensions()
            .get::<ClientAddr>()
            .and_then(|ClientAddr(addr)| http::HeaderValue::from_str(&addr.to_string()).ok()),
    };
    headers.set(request.headers_mut());
    if let Some(path) = guest_path {
        let uri = request.uri();
        let path_and_query = match uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        let mut parts = uri.clone().into_parts();
        match path_and_query.parse() {
            Ok(path_and_query) => parts.path_and_query = Some(path_and_query),
            Err(error) => return bad_request(format!("the request path is not valid: {error}")),
        }
        match http::Uri::from_parts(parts) {
            Ok(uri) => *request.uri_mut() = uri,
            Err(error) => return bad_request(format!("the request path is not valid: {error}")),
        }
    }
    match function {
        Runs::Here(function) => {
            invoker
                .invoke(&function.live, request, "http", Caller::Public)
                .await
        }
        Runs::Elsewhere(function) => {
            invoker
                .forward(&function, request, "http", Caller::Public)
                .await
        }
    }
}

/// Where the function a request is routed to runs.
enum Runs {
    /// On this node.
    Here(Arc<Served>),
    /// On other nodes (its placement): the request is forwarded.
    Elsewhere(Arc<RemoteFunction>),
}

/// The route the request matched, as users write it (`/api`,
/// `example.com/api`).
pub const ROUTE_HEADER: &str = "x-mayfly-route";
/// The request path below the route's prefix (`/users/7` for `/api/users/7`
/// on `/api`; empty for `/api` itself), without the query.
pub const PATH_INFO_HEADER: &str = "x-mayfly-path-info";
/// The URL the client asked for, as the node received it:
/// `http://host[:port]/path?query`, with the path before any prefix was
/// stripped.
pub const FULL_URL_HEADER: &str = "x-mayfly-full-url";
/// The client's address as the node sees it (`ip:port`): the peer of the
/// TCP connection, so a proxy's address when one is in front.
pub const CLIENT_ADDR_HEADER: &str = "x-mayfly-client-addr";

/// Every header the gateway sets on a routed request: Mayfly's, and the
/// ones Spin sets with the same meaning, so Spin components run unchanged.
/// A client's own copies are always replaced or removed.
pub const ROUTE_HEADERS: [&str; 7] = [
    ROUTE_HEADER,
    PATH_INFO_HEADER,
    FULL_URL_HEADER,
    CLIENT_ADDR_HEADER,
    "spin-path-info",
    "spin-full-url",
    "spin-client-addr",
];

/// The values of [`ROUTE_HEADERS`] for one request (`None`: unknown).
struct RouteHeaders {
    route: http::HeaderValue,
    path_info: Option<http::HeaderValue>,
    full_url: Option<http::HeaderValue>,
    client_addr: Option<http::HeaderValue>,
}

impl RouteHeaders {
    /// Puts the values in `headers`, each replacing any value the client
    /// sent, and removes the client's copies of those it has none for.
    fn set(self, headers: &mut http::HeaderMap) {
        let mut put = |names: &[&'static str], value: Option<http::HeaderValue>| {
            for name in names {
                match &value {
                    Some(value) => {
                        headers.insert(*name, value.clone());
                    }
                    None => {
                        headers.remove(*name);
                    }
                }
            }
        };
        put(&[ROUTE_HEADER], Some(self.route));
        put(&[PATH_INFO_HEADER, "spin-path-info"], self.path_info);
        put(&[FULL_URL_HEADER, "spin-full-url"], self.full_url);
        put(&[CLIENT_ADDR_HEADER, "spin-client-addr"], self.client_addr);
    }
}

/// The part of `path` below the route prefix `prefix` (which matched it):
/// `/users/7` for `/api/users/7` on `/api`, empty for `/api`, and the whole
/// path on `/`.
fn path_info<'a>(path: &'a str, prefix: &str) -> &'a str {
    if prefix == "/" {
        return path;
    }
    // Matching compares whole segments, case and all, so the prefix is the
    // path's start; `get` keeps a mismatch (which cannot happen) harmless.
    path.get(prefix.len()..).unwrap_or(path)
}

/// `http://authority/path?query` as the client asked for it: the authority
/// from the URI (HTTP/2, absolute form) or the Host header; `None` when the
/// request names no host.
fn full_url<B>(request: &http::Request<B>, path: &str) -> Option<http::HeaderValue> {
    let authority = match request.uri().authority() {
        Some(authority) => authority.as_str(),
        None => request.headers().get(http::header::HOST)?.to_str().ok()?,
    };
    let url = match request.uri().query() {
        Some(query) => format!("http://{authority}{path}?{query}"),
        None => format!("http://{authority}{path}"),
    };
    http::HeaderValue::from_str(&url).ok()
}

/// The request's host name, normalised (lower case, no port, no trailing
/// dot), from the URI (HTTP/2, absolute form) or the Host header; `None`
/// when the request names none. Two Host headers, or a Host header naming
/// another host than the URI, are an error: which one routes would depend
/// on who reads the request (a proxy in front may have used the other).
fn request_host<B>(request: &http::Request<B>) -> Result<Option<Cow<'_, str>>, String> {
    let mut headers = request.headers().get_all(http::header::HOST).iter();
    let header = headers.next();
    if headers.next().is_some() {
        return Err("the request has more than one Host header: send exactly one".to_string());
    }
    let header = match header.map(|value| value.to_str()) {
        None => None,
        Some(Ok(value)) => Some(host_of_authority(value)),
        Some(Err(_)) => {
            return Err("the Host header is not valid: send an ASCII host name".to_string());
        }
    };
    let Some(uri_host) = request.uri().host() else {
        return Ok(header.map(normalize_host));
    };
    // `Uri::host` keeps an IPv6 literal's brackets; the header's host does not.
    let uri_host = uri_host
        .strip_prefix('[')
        .and_then(|literal| literal.strip_suffix(']'))
        .unwrap_or(uri_host);
    let uri_host = normalize_host(uri_host);
    if let Some(header) = header
        && normalize_host(header) != uri_host
    {
        return Err(format!(
            "the Host header names `{}` but the request's URI names `{uri_host}`: send one host",
            header.escape_debug()
        ));
    }
    Ok(Some(uri_host))
}

/// The host name of an authority (`name:port`, `[v6]:port`), without port.
fn host_of_authority(authority: &str) -> &str {
    if let Some(literal) = authority.strip_prefix('[') {
        // An IPv6 literal: `[::1]:8080`.
        return literal
            .split_once(']')
            .map_or(literal, |(literal, _)| literal);
    }
    authority
        .split_once(':')
        .map_or(authority, |(name, _)| name)
}
