//! S3 access keys: `/v1/tokens/s3` (under `/v1/tokens`, so only admin
//! tokens reach them, like API tokens).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use crate::platform::Platform;
use crate::s3::keys;

pub(super) fn routes() -> Router<Arc<Platform>> {
    Router::new()
        .route("/v1/tokens/s3", get(list_keys).post(create_key))
        .route("/v1/tokens/s3/{id}", delete(revoke_key))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    buckets: Vec<String>,
}

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

async fn list_keys(State(platform): State<Arc<Platform>>) -> ApiResult<impl IntoResponse> {
    Ok(Json(keys::list(platform.secrets()).await?))
}

async fn revoke_key(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    keys::revoke(platform.secrets(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
