//! The admin REST API (JSON): deploy, list, inspect, invoke, logs, delete,
//! status. Every error is `{"error": {"code": …, "message": …}}` with a
//! message that says what to do.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::BodyExt;
use mayfly_store::{FeedLine, FunctionConfig, GroupBy, LogRecord, LogStore, UsageQuery, UsageRow};
use serde::Deserialize;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::error::{ApiError, ApiResult};
use self::openapi::ErrorBody;
use crate::clock::now_ms;
use crate::error::PlatformError;
use crate::platform::Platform;

mod auth;
mod dashboard;
mod error;
mod events;
#[cfg(test)]
mod fuzz_tests;
mod jobs;
mod openapi;
mod pipelines;
// S3 access keys (the S3 endpoint itself is `crate::s3`).
mod models;
mod s3;
mod secrets;
mod upload;
mod versions;

/// The admin API's routes over `platform`, and its OpenAPI description at
/// `GET /v1/openapi.json`.
pub fn router(platform: Arc<Platform>, max_upload_bytes: usize) -> Router {
    let deploy_route = {
        let (schemas, paths, method) = routes!(deploy);
        let method = method
            .layer::<_, Infallible>(axum::Extension(MaxUpload(max_upload_bytes)))
            .layer::<_, Infallible>(DefaultBodyLimit::max(
                max_upload_bytes.saturating_add(DEPLOY_CONFIG_ALLOWANCE),
            ));
        (schemas, paths, method)
    };
    let (api, described) = OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(nodes))
        .routes(routes!(sites))
        .routes(routes!(list_functions))
        .routes(routes!(get_function, delete_function))
        .routes(deploy_route)
        .routes(routes!(invoke))
        .routes(routes!(logs))
        .routes(routes!(usage))
        .routes(routes!(usage_records))
        .routes(routes!(metrics))
        .merge(events::routes())
        .merge(auth::routes())
        .merge(secrets::routes())
        .merge(s3::routes())
        .merge(models::routes())
        .merge(versions::routes())
        .merge(dashboard::api())
        .merge(jobs::routes())
        .merge(pipelines::routes())
        .split_for_parts();
    let (health, health_described) = health_routes().split_for_parts();
    let description = openapi::document(described.merge_from(health_described));
    api.route(openapi::PATH, get(openapi::handler(&description)))
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            platform.clone(),
            auth::gate,
        ))
        // Added after the gate's layer, so outside it: no token (the
        // dashboard's pages check their cookie themselves).
        .merge(health)
        .merge(dashboard::pages())
        // Again outside, for axum's own answers on those (a 405).
        .layer(axum::middleware::map_response(json_errors))
        .with_state(platform)
}

/// The node's component size limit, for the deploy handler.
#[derive(Debug, Clone, Copy)]
struct MaxUpload(usize);

/// The health checks, answered without a token.
fn health_routes() -> OpenApiRouter<Arc<Platform>> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// The metrics listener's routes (`serve --metrics-addr`): `/metrics` and
/// the health checks, without a token; anything else is 404.
pub fn metrics_router(platform: Arc<Platform>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .merge(Router::from(health_routes()))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "this listener serves /metrics, /healthz and /readyz only\n",
            )
        })
        .with_state(platform)
}

fn health_answer(report: &crate::health::HealthReport) -> Response {
    report.response().into_response()
}

/// `GET /healthz`: the process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "node",
    summary = "Liveness: the process is up (no token needed)",
    security(()),
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Object))
)]
async fn healthz() -> Response {
    health_answer(&crate::health::liveness())
}

/// `GET /readyz`: the node can take work (200), or why not (503).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "node",
    summary = "Readiness: stores open, ledger and log writers alive, not shutting down (no token needed)",
    security(()),
    responses(
        (status = 200, description = "`{\"status\": \"ready\"}`", body = Object),
        (status = 503, description = "`{\"status\": \"not_ready\", \"reasons\": [...]}`", body = Object)
    )
)]
async fn readyz(State(platform): State<Arc<Platform>>) -> Response {
    health_answer(&platform.health().readiness().await)
}

/// Gives the answers axum makes itself (a 405 without a body, a path
/// parameter that is not UTF-8, ...) the admin API's error envelope.
/// Found by the fuzz tests.
async fn json_errors(method: Method, uri: Uri, response: Response) -> Response {
    let status = response.status();
    // An invocation answers with the function's own response, whatever
    // its status.
    if method == Method::POST && uri.path().ends_with("/invoke") {
        return response;
    }
    // The dashboard's pages answer their errors as pages.
    let is_json_or_page = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes().starts_with(b"application/json") || v.as_bytes().starts_with(b"text/html")
        });
    if is_json_or_page || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let (code, message) = if status == StatusCode::METHOD_NOT_ALLOWED {
        let allowed = parts
            .headers
            .get(http::header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        (
            "method_not_allowed",
            format!("{method} is not allowed on {}: use {allowed}", uri.path()),
        )
    } else {
        let text = axum::body::to_bytes(body, 64 << 10)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&text).trim().to_string();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::NOT_FOUND => "not_found",
            s if s.is_server_error() => "internal",
            _ => "bad_request",
        };
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            // axum's own body-limit answer says only "length limit
            // exceeded".
            format!(
                "the request body is over this endpoint's size limit ({}): send a smaller one",
                if text.is_empty() {
                    "too large"
                } else {
                    text.as_str()
                }
            )
        } else if text.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("request failed")
                .to_string()
        } else {
            text
        };
        (code, message)
    };
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    let mut fixed = (status, axum::Json(body)).into_response();
    if let Some(allow) = parts.headers.get(http::header::ALLOW) {
        fixed
            .headers_mut()
            .insert(http::header::ALLOW, allow.clone());
    }
    fixed
}

/// Room for a deploy's `config` and `triggers` parts beside the component.
const DEPLOY_CONFIG_ALLOWANCE: usize = 64 * 1024;

/// The answer to an upload over the node's component limit: 413, naming
/// the limit and how its operator raises it.
fn upload_too_large(max_upload_bytes: usize) -> ApiError {
    ApiError::rejected(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the upload is over this node's limit: a component may be at most {} ({max_upload_bytes} \
             bytes), with {} KiB more for the other parts; make the component smaller (build with \
             --release, strip debug info), or raise the node's limit with `mayfly serve \
             --max-component-mb N` (or MAYFLY_MAX_COMPONENT_MB, or `[limits] max_component_mb` in \
             node.toml)",
            humansize_mib(max_upload_bytes),
            DEPLOY_CONFIG_ALLOWANCE / 1024
        ),
    )
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: format!(
            "no admin endpoint at {}: the API lives under /v1/",
            uri.path()
        ),
    }
}

#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "node",
    summary = "This node: functions served, tiers, memory, concurrency, fleet link",
    responses((status = 200, description = "the node's status", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn status(State(platform): State<Arc<Platform>>) -> ApiResult<impl IntoResponse> {
    let mut status = platform.status();
    status.fleet = platform.fleet_status().await?;
    Ok(Json(status))
}

#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "node",
    summary = "The nodes of the fleet, with labels and the versions they serve",
    responses((status = 200, description = "the nodes", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn nodes(State(platform): State<Arc<Platform>>) -> ApiResult<impl IntoResponse> {
    Ok(Json(platform.nodes().await?))
}

#[utoipa::path(
    get,
    path = "/v1/sites",
    tag = "node",
    operation_id = "list_sites",
    summary = "The fleet's edge nodes by leaf site: link to the hub, last contact, versions served, usage backlog",
    responses((status = 200, description = "the edge nodes, by site (none without leaf sites)", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn sites(State(platform): State<Arc<Platform>>) -> ApiResult<impl IntoResponse> {
    Ok(Json(platform.sites().await?))
}

#[utoipa::path(
    get,
    path = "/v1/functions",
    tag = "functions",
    summary = "Every function",
    responses((status = 200, description = "the functions", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn list_functions(State(platform): State<Arc<Platform>>) -> ApiResult<impl IntoResponse> {
    Ok(Json(platform.deployments().functions().await?))
}

/// Alias moves shown with a function, newest first.
const FUNCTION_HISTORY_SHOWN: usize = 50;

#[utoipa::path(
    get,
    path = "/v1/functions/{name}",
    tag = "functions",
    summary = "A function: versions, aliases, alias history",
    params(("name" = String, Path, description = "the function")),
    responses((status = 200, description = "the function", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn get_function(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let (function, versions) = platform.deployments().function(&name).await?;
    let aliases = platform.deployments().aliases(&name).await?;
    let history = platform
        .deployments()
        .alias_moves(&name, FUNCTION_HISTORY_SHOWN)
        .await?;
    Ok(Json(serde_json::json!({
        "name": function.name,
        "created_at_ms": function.created_at_ms,
        "live": function.live,
        "versions": versions,
        "aliases": aliases.iter().map(|a| versions::alias_json(&platform, a)).collect::<Vec<_>>(),
        "history": history.iter().map(versions::move_json).collect::<Vec<_>>(),
    })))
}

#[utoipa::path(
    delete,
    path = "/v1/functions/{name}",
    tag = "functions",
    summary = "Delete a function, its versions, aliases and triggers",
    params(("name" = String, Path, description = "the function")),
    responses((status = 204, description = "deleted"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn delete_function(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    platform.deployments().delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The parts of a deploy, as the OpenAPI description shows them.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // read from the multipart stream, never built
struct DeployForm {
    /// The component: a WebAssembly component exporting
    /// `wasi:http/incoming-handler` (0.2) or `wasi:http/handler` (0.3).
    #[schema(value_type = String, format = Binary)]
    component: Vec<u8>,
    /// The version's configuration: routes, limits, grants, env, ...
    #[schema(value_type = Option<Object>)]
    config: Option<serde_json::Value>,
    /// Triggers to attach, as a JSON array.
    #[schema(value_type = Option<Vec<Object>>)]
    triggers: Option<serde_json::Value>,
}

/// `POST /v1/functions/{name}/versions`, multipart/form-data with a
/// `component` part (the .wasm bytes) and an optional `config` part (JSON).
#[utoipa::path(
    post,
    path = "/v1/functions/{name}/versions",
    tag = "functions",
    summary = "Deploy a new immutable version (upload a component and its config)",
    params(("name" = String, Path, description = "the function")),
    request_body(content = DeployForm, content_type = "multipart/form-data", description = "a `component` part (the .wasm) and optional `config` and `triggers` parts (JSON)"),
    responses((status = 201, description = "the new version (200 when the same component and config were already the latest)", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn deploy(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    client_gone: Option<axum::Extension<auth::ClientGone>>,
    axum::Extension(MaxUpload(max_upload_bytes)): axum::Extension<MaxUpload>,
    headers: HeaderMap,
    request: axum::extract::Request,
) -> ApiResult<impl IntoResponse> {
    // Refused before a byte of the body is read: a client that sent
    // `Expect: 100-continue` (curl does for large bodies) never sends it.
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let allowed = max_upload_bytes.saturating_add(DEPLOY_CONFIG_ALLOWANCE) as u64;
    if declared.is_some_and(|length| length > allowed) {
        return Err(upload_too_large(max_upload_bytes));
    }
    let usage = "send multipart/form-data with a `component` part holding the .wasm file and an \
                 optional `config` part holding JSON like {\"routes\": [\"/hello\"], \
                 \"limits\": {\"memory_mb\": 128, \"timeout_ms\": 30000}}";
    // A body without a length (chunked) is cut off at the limit as it
    // streams in; multer and axum then say only "length limit exceeded":
    // answer the same 413 as above rather than a parse error.
    let upload_error = |error: axum::extract::multipart::MultipartError, what: String| {
        if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
            upload_too_large(max_upload_bytes)
        } else {
            // The error's own text is only "Error parsing
            // `multipart/form-data` request"; its body text says what.
            ApiError::bad_request(format!("{what}: {}", error.body_text()))
        }
    };
    let mut multipart = upload::multipart(request)
        .await
        .map_err(|e| ApiError::bad_request(format!("{e}: {usage}")))?;
    let mut component: Option<Bytes> = None;
    let mut config = FunctionConfig::default();
    let mut triggers = Vec::new();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| upload_error(e, "malformed upload".to_string()))?
    {
        let part = field.name().unwrap_or_default().to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| upload_error(e, format!("cannot read part `{part}`")))?;
        match part.as_str() {
            "component" => component = Some(bytes),
            "config" => {
                config = serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::bad_request(format!("the `config` part is not valid: {e}"))
                })?;
            }
            "triggers" => {
                triggers = serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::bad_request(format!(
                        "the `triggers` part is not valid: {e}; send a JSON array of trigger \
                         specs like [{{\"source\": {{\"kind\": \"queue\", \"queue\": \"orders\"}}}}]"
                    ))
                })?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unexpected part `{other}`: {usage}"
                )));
            }
        }
    }
    let component =
        component.ok_or_else(|| ApiError::bad_request(format!("no `component` part: {usage}")))?;
    // What the caller may grant depends on what is live, unless it may
    // grant anything.
    if !principal.is_admin() {
        let live = match platform.deployments().function(&name).await {
            Ok((function, _)) => Some(function.live.config),
            Err(PlatformError::NotFound(_)) => None,
            Err(error) => return Err(error.into()),
        };
        crate::auth::check_deploy(&principal, live.as_ref(), &config, !triggers.is_empty())?;
    }
    let gone = client_gone
        .map(|axum::Extension(gone)| gone.0)
        .unwrap_or_default();
    let outcome = platform
        .deployments()
        .deploy_unless_gone(&name, component, config.clone(), triggers, &gone)
        .await?;
    let mut outcome = outcome;
    if let Some(warning) = placement_warning(&platform, &config.placement).await {
        outcome.warnings.push(warning);
    }
    // Nothing was created when the live version was deployed again.
    let status = if outcome.unchanged {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(outcome)))
}

/// What a deploy with `placement` should warn about: on a node on its
/// own, that the placement does not apply; in a fleet, that no live node
/// matches it (the function is stored, and runs once one joins).
async fn placement_warning(
    platform: &Platform,
    placement: &std::collections::BTreeMap<String, String>,
) -> Option<String> {
    if placement.is_empty() {
        return None;
    }
    let labels = mayfly_store::labels_text(placement);
    if platform.fleet_node().is_none() {
        return Some(format!(
            "this node runs on its own (no --nats), so it runs the function although its placement is {labels}: a placement chooses among the nodes of a fleet"
        ));
    }
    match platform.nodes().await {
        Ok(nodes)
            if !nodes
                .iter()
                .any(|node| mayfly_store::placement_matches(&node.labels, placement)) =>
        {
            Some(format!(
                "no node with labels {labels} is live: the function is stored and runs once one joins (`mayfly serve --labels {labels}`); until then its requests answer 503"
            ))
        }
        _ => None,
    }
}

/// `bytes` as MiB for a message (`64 MiB`, `1.5 MiB`).
fn humansize_mib(bytes: usize) -> String {
    let mib = bytes as f64 / f64::from(1 << 20);
    if mib.fract() == 0.0 {
        format!("{mib} MiB")
    } else {
        format!("{mib:.1} MiB")
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct InvokeQuery {
    /// Path (and query) the function sees.
    #[serde(default = "root_path")]
    path: String,
    /// Method the function sees.
    #[serde(default = "post_method")]
    method: String,
    /// Queue the invocation as an event and answer 202 at once.
    #[serde(default, rename = "async")]
    asynchronous: bool,
    /// Asynchronous only: deliveries in all before the dead-letter queue.
    max_attempts: Option<u32>,
    /// Asynchronous only: wait before the second attempt, in ms.
    backoff_ms: Option<u64>,
    /// The alias to invoke (default `live`).
    alias: Option<String>,
}

fn root_path() -> String {
    "/".into()
}

fn post_method() -> String {
    "POST".into()
}

/// `POST /v1/functions/{name}/invoke?path=/x&method=GET&alias=live`: runs
/// the function's alias (default `live`, split by its canary like a routed
/// request) directly, whatever its routes, and answers with its response.
#[utoipa::path(
    post,
    path = "/v1/functions/{name}/invoke",
    tag = "functions",
    summary = "Invoke an alias directly, whatever its routes; with `async=true` queue it as an event",
    params(("name" = String, Path, description = "the function"), InvokeQuery),
    request_body(content = String, content_type = "application/octet-stream", description = "the request body the function sees"),
    responses((status = 200, description = "the function's own response, whatever its status"), (status = 202, description = "queued (`async=true`): `{\"event_id\"}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn invoke(
    State(platform): State<Arc<Platform>>,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<Query<InvokeQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    // Answered here, as JSON: `json_errors` leaves invoke answers alone (they
    // are the function's), so axum's own rejection would go out as text.
    let Path(name) = name.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let query = error::query(query)?;
    let (served, remote) = {
        let catalog = platform.catalog();
        (
            catalog.by_name.get(&name).cloned(),
            catalog.remote.get(&name).cloned(),
        )
    };
    let served = match (served, remote) {
        (Some(served), _) => served,
        (None, Some(remote)) => {
            return invoke_elsewhere(&platform, &remote, query, headers, body).await;
        }
        (None, None) => return Err(PlatformError::NotFound(name.clone()).into()),
    };
    let alias = query.alias.as_deref().unwrap_or(mayfly_store::LIVE_ALIAS);
    let Some(target) = served.alias(alias) else {
        crate::validate::validate_alias(alias)?;
        return Err(PlatformError::Missing(format!(
            "function `{name}` has no alias `{alias}`: see `mayfly alias list {name}`"
        ))
        .into());
    };
    if query.asynchronous {
        if alias != mayfly_store::LIVE_ALIAS {
            return Err(ApiError::bad_request(
                "an asynchronous invocation goes to the `live` alias: leave `alias` out",
            ));
        }
        let deployed = &target.deployed;
        let limit = deployed.limits.max_request_bytes;
        return invoke_async(&platform, &deployed.name, limit, query, &headers, body).await;
    }
    let request = invoke_request(&query, headers, body)?;
    let response = platform
        .invoker()
        .invoke(target, request, "invoke", crate::invoker::Caller::Operator)
        .await;
    Ok(response.map(Body::new))
}

/// The request an admin `invoke` runs: `query`'s method and path, the
/// caller's headers and body.
fn invoke_request(
    query: &InvokeQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<http::Request<InvokeBody>> {
    let method = Method::from_bytes(query.method.as_bytes())
        .map_err(|_| ApiError::bad_request(format!("invalid method `{}`", query.method)))?;
    if !query.path.starts_with('/') {
        return Err(ApiError::bad_request("`path` must start with `/`"));
    }
    let uri: Uri = query
        .path
        .parse()
        .map_err(|e| ApiError::bad_request(format!("invalid path `{}`: {e}", query.path)))?;
    let mut request = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(body.map_err(body_error as fn(axum::Error) -> wasmtime_wasi_http::Error))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    *request.headers_mut() = headers;
    // The caller's admin token is for the node, never for the function.
    request.headers_mut().remove(http::header::AUTHORIZATION);
    Ok(request)
}

/// The body of an admin `invoke`'s request, as the invoker takes it.
type InvokeBody =
    http_body_util::combinators::MapErr<Body, fn(axum::Error) -> wasmtime_wasi_http::Error>;

fn body_error(error: axum::Error) -> wasmtime_wasi_http::Error {
    wasmtime_wasi_http::Error::InternalError(Some(error.to_string()))
}

/// The admin `invoke` of a function placed on other nodes: forwarded to
/// one that runs it (its `live` alias), or stored for them when
/// asynchronous.
async fn invoke_elsewhere(
    platform: &Platform,
    remote: &crate::catalog::RemoteFunction,
    query: InvokeQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let alias = query.alias.as_deref().unwrap_or(mayfly_store::LIVE_ALIAS);
    if alias != mayfly_store::LIVE_ALIAS {
        return Err(ApiError::bad_request(format!(
            "function `{}` runs on other nodes (those with {}), and only its `live` alias is invoked through this one: leave `alias` out, or ask a node with those labels",
            remote.name,
            mayfly_store::labels_text(&remote.placement)
        )));
    }
    if query.asynchronous {
        let limit = crate::validate::MAX_ASYNC_BYTES as u64;
        return invoke_async(platform, &remote.name, limit, query, &headers, body).await;
    }
    let request = invoke_request(&query, headers, body)?;
    let response = platform
        .invoker()
        .forward(remote, request, "invoke", crate::invoker::Caller::Operator)
        .await;
    Ok(response.map(Body::new))
}

/// `POST /v1/functions/{name}/invoke?async=true`: stores the invocation as
/// a `dev.mayfly.invoke` event (delivered at least once, retried, then
/// dead-lettered) and answers 202 with its id once it is durable.
/// `max_request_bytes`: the function's request limit.
async fn invoke_async(
    platform: &Platform,
    function: &str,
    max_request_bytes: u64,
    query: InvokeQuery,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    if !query.path.starts_with('/') || query.path.parse::<Uri>().is_err() {
        return Err(ApiError::bad_request(format!(
            "invalid path `{}`: it must start with `/`",
            query.path
        )));
    }
    // The event is stored whole: cap it like a queue message batch rather
    // than at the function's (streamed) request limit.
    let limit = max_request_bytes.min(crate::validate::MAX_ASYNC_BYTES as u64);
    let data = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
        .map_err(|e| {
            PlatformError::TooLarge(format!(
                "cannot read the event data: {e} (the function takes at most {limit} bytes)"
            ))
        })?
        .to_bytes();
    let defaults = mayfly_store::RetryPolicy::default();
    let retry = mayfly_store::RetryPolicy {
        max_attempts: query.max_attempts.unwrap_or(defaults.max_attempts),
        backoff_ms: query.backoff_ms.unwrap_or(defaults.backoff_ms),
    };
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let event_id = platform
        .events()
        .invoke_async(function, query.path, content_type, data, retry)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"event_id": event_id})),
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    #[serde(default = "default_tail")]
    tail: usize,
    #[serde(default)]
    follow: bool,
}

fn default_tail() -> usize {
    100
}

/// `GET /v1/functions/{name}/logs?tail=100&follow=true`: the last lines as
/// a JSON array, or with `follow` as a never-ending stream of JSON lines.
///
/// In a fleet, the tail is every node's (each keeps its own log and answers
/// for it), and a follower then gets every node's new lines from the
/// back-end's feed; each line has the `node` that wrote it. Cut off from
/// the fleet, the tail is this node's own.
#[utoipa::path(
    get,
    path = "/v1/functions/{name}/logs",
    tag = "functions",
    summary = "The function's recent log lines; with `follow=true` a never-ending stream of JSON lines",
    params(("name" = String, Path, description = "the function"), LogsQuery),
    responses((status = 200, description = "the lines (JSON array, or JSON lines when following)", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn logs(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let query = error::query(query)?;
    let tail = query.tail.min(10_000);
    if !platform.catalog().knows(&name) {
        return Err(PlatformError::NotFound(name).into());
    }
    // Subscribe before reading so no line lands between the two.
    let feed = if query.follow {
        platform
            .log_feed()
            .subscribe(&name)
            .await
            .map_err(PlatformError::from)?
    } else {
        None
    };
    let newest = platform.log_hub().subscribe();
    let store = platform.log_store();
    let fleet_tail = platform.fleet_log_tail(&name, tail).await;
    let own_tail = || async {
        store
            .logs_tail(&name, tail)
            .await
            .map_err(PlatformError::from)
    };
    if let Some(feed) = feed {
        let tail = match fleet_tail {
            Some(lines) => lines,
            None => {
                let node = platform.node_name();
                own_tail()
                    .await?
                    .into_iter()
                    .map(|record| FeedLine {
                        node: node.to_string(),
                        id: record.id,
                        line: record.line,
                    })
                    .collect()
            }
        };
        return ndjson(fleet_follower(tail, feed));
    }
    if let Some(lines) = fleet_tail {
        return Ok(Json(lines).into_response());
    }
    let lines = own_tail().await?;
    if !query.follow {
        return Ok(Json(lines).into_response());
    }
    let follower = Follower {
        after_id: lines.last().map_or(0, |line| line.id),
        pending: lines.into(),
        newest,
        store,
        function: name,
    };
    ndjson(futures::stream::unfold(follower, Follower::next_chunk))
}

/// A streamed response of JSON lines.
fn ndjson<S>(stream: S) -> ApiResult<Response>
where
    S: futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| PlatformError::Internal(e.into()))?)
}

/// One JSON line of a follower's stream.
fn json_line(value: &impl serde::Serialize) -> Result<Bytes, Infallible> {
    let mut json = serde_json::to_vec(value).unwrap_or_default();
    json.push(b'\n');
    Ok(Bytes::from(json))
}

/// A fleet follower: the `tail`, then every node's new lines from the
/// feed. The feed was subscribed before the tail was read, so it may repeat
/// a node's last lines: those up to that node's last id in the tail are
/// skipped.
fn fleet_follower(
    tail: Vec<FeedLine>,
    feed: mayfly_store::LogSubscription,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    use futures::StreamExt as _;
    let mut served: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for line in &tail {
        let last = served.entry(line.node.clone()).or_default();
        *last = (*last).max(line.id);
    }
    let new = feed.filter(move |line| {
        let seen = served.get(&line.node).is_some_and(|last| line.id <= *last);
        futures::future::ready(!seen)
    });
    futures::stream::iter(tail)
        .chain(new)
        .map(|line| json_line(&line))
}

/// State of one `logs --follow` stream.
struct Follower {
    after_id: i64,
    pending: VecDeque<LogRecord>,
    newest: tokio::sync::watch::Receiver<i64>,
    store: Arc<dyn LogStore>,
    function: String,
}

impl Follower {
    async fn next_chunk(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some((json_line(&line), self));
            }
            self.newest.changed().await.ok()?;
            let lines = self
                .store
                .logs_after(&self.function, self.after_id, 1000)
                .await
                .ok()?;
            if let Some(last) = lines.last() {
                self.after_id = last.id;
            }
            self.pending.extend(lines);
        }
    }
}

/// `GET /metrics`: the node's metrics for Prometheus.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "node",
    summary = "The node's metrics in the OpenMetrics text format, for Prometheus",
    responses((status = 200, description = "the metrics", content_type = "application/openmetrics-text", body = String), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn metrics(State(platform): State<Arc<Platform>>) -> ApiResult<Response> {
    platform.refresh_event_depths().await;
    platform.refresh_fleet_link().await;
    let text = platform.metrics_text()?;
    Ok((
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    function: Option<String>,
    /// Only a batch job's invocations (the window then defaults to all
    /// time).
    job: Option<String>,
}

/// A point in time as the usage API accepts it: RFC 3339, milliseconds
/// since the Unix epoch, or a duration ago (`24h`).
fn parse_time(name: &str, text: &str, now_ms: i64) -> Result<i64, ApiError> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(time) = humantime::parse_rfc3339_weak(text) {
        let ms = time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        return Ok(ms);
    }
    if let Ok(ago) = humantime::parse_duration(text) {
        let ago = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
        return Ok(now_ms.saturating_sub(ago));
    }
    Err(ApiError::bad_request(format!(
        "`{name}` is `{text}`: give an RFC 3339 time (2026-11-23T00:00:00Z), milliseconds since \
         the Unix epoch, or a duration ago (24h)"
    )))
}

fn rfc3339(ms: i64) -> String {
    let time =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(time).to_string()
}

/// One usage row as JSON, with its cost and readable period.
fn usage_json(platform: &Platform, row: &UsageRow) -> serde_json::Value {
    let mut json = serde_json::to_value(row).unwrap_or_default();
    if let serde_json::Value::Object(fields) = &mut json {
        if let Some(start) = row.period_start_ms {
            fields.insert("period_start".into(), rfc3339(start).into());
        }
        fields.insert(
            "cost".into(),
            serde_json::to_value(platform.prices().cost(row)).unwrap_or_default(),
        );
    }
    json
}

/// `GET /v1/usage?from=24h&to=…&group_by=function|version|hour|day&function=…`:
/// invocations, errors, billed time, GB-seconds and cost, grouped.
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "usage",
    summary = "Invocations, errors, billed time, GB-seconds and cost, grouped",
    params(UsageParams),
    responses((status = 200, description = "the rows, the total and the prices used", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn usage(
    State(platform): State<Arc<Platform>>,
    query: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let params = error::query(query)?;
    let now = now_ms();
    let from = match &params.from {
        Some(text) => parse_time("from", text, now)?,
        None if params.job.is_some() => 0,
        None => now - 24 * 3600 * 1000,
    };
    // `to` is exclusive; by default it includes records started this very ms.
    let to = match &params.to {
        Some(text) => parse_time("to", text, now)?,
        None => now + 1,
    };
    if from >= to {
        return Err(ApiError::bad_request(format!(
            "the window is empty: `from` ({}) is not before `to` ({})",
            rfc3339(from),
            rfc3339(to)
        )));
    }
    let group_by = match params.group_by.as_deref() {
        None => GroupBy::Function,
        Some(text) => GroupBy::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "`group_by` is `{text}`: use function, version, hour or day"
            ))
        })?,
    };
    let rows = platform
        .usage(UsageQuery {
            from_ms: from,
            to_ms: to,
            group_by,
            function: params.function.clone(),
            client_request_id: params.job.as_deref().map(crate::jobs::job_correlation_id),
        })
        .await?;
    let total = rows.iter().fold(UsageRow::default(), |mut total, row| {
        total.add(row);
        total
    });
    Ok(Json(serde_json::json!({
        "from": rfc3339(from),
        "to": rfc3339(to),
        "from_ms": from,
        "to_ms": to,
        "group_by": group_by.as_str(),
        "prices": platform.prices(),
        "rows": rows.iter().map(|row| usage_json(&platform, row)).collect::<Vec<_>>(),
        "total": usage_json(&platform, &total),
    })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct RecordsParams {
    function: Option<String>,
    #[serde(default)]
    after: i64,
    #[serde(default = "default_tail")]
    limit: usize,
}

/// `GET /v1/usage/records?function=…&after=SEQ&limit=100`: the ledger's
/// records themselves, oldest first, for export and audit.
#[utoipa::path(
    get,
    path = "/v1/usage/records",
    tag = "usage",
    summary = "The ledger's records themselves, oldest first",
    params(RecordsParams),
    responses((status = 200, description = "the records", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn usage_records(
    State(platform): State<Arc<Platform>>,
    query: Result<Query<RecordsParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let params = error::query(query)?;
    let records = platform
        .usage_records(params.function, params.after, params.limit.min(10_000))
        .await?;
    let records: Vec<serde_json::Value> = records
        .iter()
        .map(|stored| {
            let mut json = serde_json::to_value(stored).unwrap_or_default();
            if let serde_json::Value::Object(fields) = &mut json {
                fields.insert("billed_gb_s".into(), stored.record.billed_gb_s().into());
                fields.insert("used_gb_s".into(), stored.record.used_gb_s().into());
            }
            json
        })
        .collect();
    Ok(Json(records))
}

#[cfg(test)]
mod follower_tests {
    use futures::StreamExt as _;
    use mayfly_store::NewLogLine;

    use super::*;

    fn line(node: &str, id: i64) -> FeedLine {
        FeedLine {
            node: node.into(),
            id,
            line: NewLogLine {
                ts_ms: id,
                function: "f".into(),
                version: 1,
                request_id: format!("r{id}"),
                stream: "stdout".into(),
                line: format!("{node} {id}"),
            },
        }
    }

    #[tokio::test]
    async fn a_fleet_follower_sends_the_tail_then_the_feed_without_repeating_a_nodes_lines() {
        // The fleet's tail: a/1..3 and b/7 (b's ids are b's own).
        let tail = vec![line("a", 1), line("a", 2), line("b", 7), line("a", 3)];
        // Subscribed before the tail was read: the feed repeats a/2, a/3
        // and b/7, then brings c's first line and new lines of a and b.
        let feed = futures::stream::iter([
            line("a", 2),
            line("a", 3),
            line("b", 7),
            line("c", 1),
            line("b", 8),
            line("a", 4),
        ]);
        let sent: Vec<serde_json::Value> = fleet_follower(tail, feed.boxed())
            .map(|chunk| serde_json::from_slice(&chunk.unwrap_or_default()).unwrap())
            .collect()
            .await;
        let sent: Vec<(String, i64)> = sent
            .iter()
            .map(|v| {
                (
                    v["node"].as_str().unwrap().to_string(),
                    v["id"].as_i64().unwrap(),
                )
            })
            .collect();
        let expected: Vec<(String, i64)> = [
            ("a", 1),
            ("a", 2),
            ("b", 7),
            ("a", 3),
            ("c", 1),
            ("b", 8),
            ("a", 4),
        ]
        .iter()
        .map(|(n, i)| (n.to_string(), *i))
        .collect();
        assert_eq!(sent, expected);
    }
}
