//! Admin endpoints of secrets: set, list, delete and rotate the master key.
//! No endpoint ever answers with a value: guests read them through
//! wasi:config, people only write them.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult};
use super::openapi::ErrorBody;
use crate::error::PlatformError;
use crate::platform::Platform;
use crate::validate::MAX_SECRET_BYTES;

/// The secrets' routes.
pub(super) fn routes() -> OpenApiRouter<Arc<Platform>> {
    let (schemas, paths, secret) = routes!(set, remove, rotate, no_values);
    OpenApiRouter::new().routes(routes!(list)).routes((
        schemas,
        paths,
        // `rotate` is matched as a method of the secret's own path rather
        // than as its own route, so a PUT or DELETE of a secret named
        // `rotate` still reaches its handler. One byte over the limit, so
        // an oversized value gets the platform's message rather than the
        // extractor's.
        secret.layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(MAX_SECRET_BYTES + 1)),
    ))
}

#[utoipa::path(
    get,
    operation_id = "list_secrets",
    path = "/v1/secrets",
    tag = "secrets",
    summary = "Secret names and versions (never values)",
    responses((status = 200, description = "the secrets", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn list(State(platform): State<Arc<Platform>>) -> ApiResult<Response> {
    Ok(Json(platform.secrets().list().await?).into_response())
}

/// `PUT /v1/secrets/{name}` with the raw value as the body: 201 when new,
/// 200 when it replaced a value.
#[utoipa::path(
    put,
    operation_id = "set_secret",
    path = "/v1/secrets/{name}",
    tag = "secrets",
    summary = "Set a secret (the raw value is the body)",
    params(("name" = String, Path, description = "the secret")),
    request_body(content = String, content_type = "application/octet-stream", description = "the value"),
    responses((status = 201, description = "created", body = Object), (status = 200, description = "replaced", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn set(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|e| {
        ApiError::rejected(
            e.status(),
            format!("cannot read the secret's value: {}", e.body_text()),
        )
    })?;
    let put = platform.secrets().set(&name, &body).await?;
    let status = if put.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let answer = serde_json::json!({"name": name, "version": put.version});
    Ok((status, Json(answer)).into_response())
}

#[utoipa::path(
    delete,
    operation_id = "delete_secret",
    path = "/v1/secrets/{name}",
    tag = "secrets",
    summary = "Delete a secret",
    params(("name" = String, Path, description = "the secret")),
    responses((status = 204, description = "deleted"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn remove(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    if platform.secrets().delete(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(PlatformError::Missing(format!(
            "no secret named `{name}`: see `mayfly secret list`"
        ))
        .into())
    }
}

/// `POST /v1/secrets/rotate`: a new master key, every secret resealed.
#[utoipa::path(
    post,
    operation_id = "rotate_secret",
    path = "/v1/secrets/{name}",
    tag = "secrets",
    summary = "`POST /v1/secrets/rotate`: a new master key, every secret resealed",
    params(("name" = String, Path, description = "`rotate`; any other name is refused (405)")),
    responses((status = 200, description = "`{\"resealed\": n}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn rotate(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    if name != "rotate" {
        return Err(method_not_allowed(
            "set a secret with PUT /v1/secrets/{name}; POST is only for /v1/secrets/rotate",
        ));
    }
    let resealed = platform.secrets().rotate().await?;
    Ok(Json(serde_json::json!({"resealed": resealed})).into_response())
}

#[utoipa::path(
    get,
    operation_id = "get_secret",
    path = "/v1/secrets/{name}",
    tag = "secrets",
    summary = "Always refused: secret values are never returned",
    params(("name" = String, Path, description = "the secret")),
    responses((status = 405, description = "always: secret values are never returned"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn no_values() -> ApiError {
    method_not_allowed(
        "secret values are never returned: functions read them through wasi:config; \
         list names and versions with GET /v1/secrets",
    )
}

fn method_not_allowed(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::http::{Method, Request};
    use serde_json::Value;
    use tower::ServiceExt as _;

    use super::*;
    use crate::NodeConfig;

    async fn send(router: &Router, method: Method, path: &str, body: Vec<u8>) -> (u16, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::from(body))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn secrets_api_sets_lists_deletes_and_never_returns_values() {
        let dir = tempfile::tempdir().unwrap();
        let stores = mayfly_store::Stores::sqlite(dir.path()).unwrap();
        let platform = Platform::open(NodeConfig::new(dir.path()), stores)
            .await
            .unwrap();
        let router = Router::from(routes()).with_state(platform);
        let put = |name: &str, value: &str| {
            let (router, path, value) = (router.clone(), format!("/v1/secrets/{name}"), value);
            let body = value.as_bytes().to_vec();
            async move { send(&router, Method::PUT, &path, body).await }
        };

        let (status, first) = put("db", "s3cret-canary").await;
        assert_eq!(status, 201, "{first}");
        assert_eq!(first["name"], "db");
        let (status, second) = put("db", "s3cret-canary-2").await;
        assert_eq!(status, 200, "{second}");
        assert!(second["version"].as_u64() > first["version"].as_u64());
        // `rotate` is an ordinary name for PUT.
        assert_eq!(put("rotate", "x").await.0, 201);

        let (status, list) = send(&router, Method::GET, "/v1/secrets", vec![]).await;
        assert_eq!(status, 200);
        assert_eq!(list.as_array().unwrap().len(), 2);
        assert!(!list.to_string().contains("canary"), "{list}");
        let (status, answer) = send(&router, Method::GET, "/v1/secrets/db", vec![]).await;
        assert_eq!(status, 405);
        assert!(!answer.to_string().contains("canary"), "{answer}");

        let (status, error) = put("bad%20name", "x").await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (400, Some("bad_request"))
        );
        let big = "a".repeat(MAX_SECRET_BYTES + 1);
        assert_eq!(put("big", &big).await.0, 413);
        let huge = "a".repeat(MAX_SECRET_BYTES * 2);
        let (status, error) = put("huge", &huge).await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (413, Some("too_large"))
        );
        let (status, error) = send(&router, Method::PUT, "/v1/secrets/bin", vec![0xff, 0xfe]).await;
        assert_eq!(status, 400, "{error}");

        let (status, rotated) = send(&router, Method::POST, "/v1/secrets/rotate", vec![]).await;
        assert_eq!((status, rotated["resealed"].as_u64()), (200, Some(2)));
        assert_eq!(
            send(&router, Method::POST, "/v1/secrets/db", vec![])
                .await
                .0,
            405
        );

        assert_eq!(
            send(&router, Method::DELETE, "/v1/secrets/db", vec![])
                .await
                .0,
            204
        );
        let (status, error) = send(&router, Method::DELETE, "/v1/secrets/db", vec![]).await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
    }
}
