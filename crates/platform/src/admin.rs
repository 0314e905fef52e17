//! The admin REST API (JSON): deploy, list, inspect, invoke, logs, delete,
//! status. Every error is `{"error": {"code": …, "message": …}}` with a
//! message that says what to do.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::BodyExt;
use mayfly_store::{LogRecord, LogStore};
use serde::Deserialize;

use crate::platform::{Platform, PlatformError};

/// The admin API's routes over `platform`.
pub fn router(platform: Arc<Platform>, max_upload_bytes: usize) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/functions", get(list_functions))
        .route(
            "/v1/functions/{name}",
            get(get_function).delete(delete_function),
        )
        .route(
            "/v1/functions/{name}/versions",
            post(deploy).layer(DefaultBodyLimit::max(
                max_upload_bytes.saturating_add(64 * 1024),
            )),
        )
        .route("/v1/functions/{name}/invoke", post(invoke))
        .route("/v1/functions/{name}/logs", get(logs))
        .fallback(not_found)
        .with_state(platform)
}

/// An error answer of the admin API.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }
}

impl From<PlatformError> for ApiError {
    fn from(error: PlatformError) -> Self {
        let (status, code) = match &error {
            PlatformError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            PlatformError::Deploy(mayfly_runtime::DeployError::Internal(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
            PlatformError::Deploy(_) => (StatusCode::BAD_REQUEST, "invalid_component"),
            PlatformError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            PlatformError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!("admin API: {error}");
        }
        Self {
            status,
            code,
            message: error.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

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

async fn status(State(platform): State<Arc<Platform>>) -> impl IntoResponse {
    Json(platform.status())
}

async fn list_functions(State(platform): State<Arc<Platform>>) -> ApiResult<impl IntoResponse> {
    Ok(Json(platform.functions().await?))
}

async fn get_function(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let (function, versions) = platform.function(&name).await?;
    Ok(Json(serde_json::json!({
        "name": function.name,
        "created_at_ms": function.created_at_ms,
        "live": function.live,
        "versions": versions,
    })))
}

async fn delete_function(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    platform.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The `config` part of a deploy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployConfig {
    #[serde(default)]
    routes: Vec<String>,
}

/// `POST /v1/functions/{name}/versions`, multipart/form-data with a
/// `component` part (the .wasm bytes) and an optional `config` part (JSON).
async fn deploy(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<impl IntoResponse> {
    let usage = "send multipart/form-data with a `component` part holding the .wasm file and an \
                 optional `config` part holding JSON like {\"routes\": [\"/hello\"]}";
    let mut multipart = multipart.map_err(|e| ApiError::bad_request(format!("{e}: {usage}")))?;
    let mut component: Option<Bytes> = None;
    let mut config = DeployConfig::default();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("malformed upload: {e}")))?
    {
        let part = field.name().unwrap_or_default().to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError::bad_request(format!("cannot read part `{part}`: {e}")))?;
        match part.as_str() {
            "component" => component = Some(bytes),
            "config" => {
                config = serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::bad_request(format!("the `config` part is not valid: {e}"))
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
    let outcome = platform.deploy(&name, component, &config.routes).await?;
    Ok((StatusCode::CREATED, Json(outcome)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvokeQuery {
    /// Path (and query) the function sees.
    #[serde(default = "root_path")]
    path: String,
    /// Method the function sees.
    #[serde(default = "post_method")]
    method: String,
}

fn root_path() -> String {
    "/".into()
}

fn post_method() -> String {
    "POST".into()
}

/// `POST /v1/functions/{name}/invoke?path=/x&method=GET`: runs the function
/// directly, whatever its routes, and answers with its response.
async fn invoke(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    query: Result<Query<InvokeQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let function = platform
        .catalog()
        .by_name
        .get(&name)
        .cloned()
        .ok_or(PlatformError::NotFound(name))?;
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
        .body(body.map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string()))))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    *request.headers_mut() = headers;
    let response = platform.invoke(&function, request).await;
    Ok(response.map(Body::new))
}

#[derive(Debug, Deserialize)]
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
async fn logs(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let tail = query.tail.min(10_000);
    if !platform.catalog().by_name.contains_key(&name) {
        return Err(PlatformError::NotFound(name).into());
    }
    // Subscribe before reading so no line lands between the two.
    let newest = platform.log_hub().subscribe();
    let store = platform.log_store();
    let lines = {
        let store = store.clone();
        let name = name.clone();
        tokio::task::spawn_blocking(move || store.logs_tail(&name, tail))
            .await
            .map_err(|e| PlatformError::Internal(e.into()))?
            .map_err(PlatformError::from)?
    };
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
    let stream = futures::stream::unfold(follower, Follower::next_chunk);
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| PlatformError::Internal(e.into()))?)
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
                let mut json = serde_json::to_vec(&line).unwrap_or_default();
                json.push(b'\n');
                return Some((Ok(Bytes::from(json)), self));
            }
            self.newest.changed().await.ok()?;
            let store = self.store.clone();
            let function = self.function.clone();
            let after = self.after_id;
            let lines =
                tokio::task::spawn_blocking(move || store.logs_after(&function, after, 1000))
                    .await
                    .ok()?
                    .ok()?;
            if let Some(last) = lines.last() {
                self.after_id = last.id;
            }
            self.pending.extend(lines);
        }
    }
}
