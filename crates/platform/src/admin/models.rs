//! Admin endpoints of models (wasi:nn): upload, list and delete.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use bytes::Bytes;

use super::error::{ApiError, ApiResult};
use crate::error::PlatformError;
use crate::models::MAX_MODEL_BYTES;
use crate::platform::Platform;

/// The models' routes.
pub(super) fn routes() -> Router<Arc<Platform>> {
    Router::new().route("/v1/models", get(list)).route(
        "/v1/models/{name}",
        put(upload)
            .delete(remove)
            // One byte over the limit, so an oversized model gets the
            // platform's message rather than the extractor's.
            .layer(DefaultBodyLimit::max(MAX_MODEL_BYTES + 1)),
    )
}

async fn list(State(platform): State<Arc<Platform>>) -> ApiResult<Response> {
    Ok(Json(platform.models().list().await?).into_response())
}

/// `PUT /v1/models/{name}` with the .onnx bytes as the body: the stored
/// model (name, version, digest, inputs, outputs).
async fn upload(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|e| ApiError {
        status: e.status(),
        code: if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        },
        message: format!("cannot read the model: {}", e.body_text()),
    })?;
    let record = platform.models().put(&name, body).await?;
    Ok((StatusCode::OK, Json(record)).into_response())
}

/// `DELETE /v1/models/{name}`: refused while a deployed function is granted
/// it.
async fn remove(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let users = platform.model_users(&name);
    if !users.is_empty() {
        return Err(PlatformError::Conflict(format!(
            "model `{name}` is granted to {}: deploy them without it (or delete them) first",
            users.join(", ")
        ))
        .into());
    }
    match platform.models().delete(&name).await? {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(PlatformError::Missing(format!(
            "no model named `{name}`: see `mayfly model list`"
        ))
        .into()),
    }
}
