//! S3 access keys: `/v1/tokens/s3` (under `/v1/tokens`, so only admin
//! tokens reach them, like API tokens).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult};
use super::openapi::ErrorBody;
use crate::platform::Platform;
use crate::s3::keys;

pub(super) fn routes() -> OpenApiRouter<Arc<Platform>> {
    OpenApiRouter::new()
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    buckets: Vec<String>,
}

#[utoipa::path(
    post,
    operation_id = "create_s3_key", path = "/v1/tokens/s3", tag = "auth", summary = "Create an S3 access key pair for some buckets (the secret is shown once)", request_body(content = NewKey, content_type = "application/json"), responses((status = 201, description = "the key, with its secret", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn create_key(
    State(platform): State<Arc<Platform>>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let new: NewKey = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be JSON {{\"name\": …, \"buckets\": [\"photos\", …] or [\"*\"]}}: {e}"
        ))
    })?;
    let (info, secret) = keys::create(platform.secrets(), &new.name, new.buckets).await?;
    let body = serde_json::json!({
        "access_key_id": info.access_key_id,
        "secret_access_key": secret.as_str(),
        "name": info.name,
        "buckets": info.buckets,
        "created_at_ms": info.created_at_ms,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[utoipa::path(
    get,
    operation_id = "list_s3_keys", path = "/v1/tokens/s3", tag = "auth", summary = "The S3 access keys (no secrets)", responses((status = 200, description = "the keys", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn list_keys(State(platform): State<Arc<Platform>>) -> ApiResult<impl IntoResponse> {
    Ok(Json(keys::list(platform.secrets()).await?))
}

#[utoipa::path(
    delete,
    operation_id = "revoke_s3_key", path = "/v1/tokens/s3/{id}", tag = "auth", summary = "Revoke an S3 access key", params(("id" = String, Path, description = "the access key id")), responses((status = 204, description = "revoked"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn revoke_key(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    keys::revoke(platform.secrets(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
