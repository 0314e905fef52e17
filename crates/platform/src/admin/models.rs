//! Admin endpoints of models (wasi:nn): upload, list and delete.

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
use crate::models::MAX_MODEL_BYTES;
use crate::platform::Platform;

/// The models' routes.
pub(super) fn routes() -> OpenApiRouter<Arc<Platform>> {
    let (schemas, paths, model) = routes!(upload, remove);
    OpenApiRouter::new().routes(routes!(list)).routes((
        schemas,
        paths,
        // One byte over the limit, so an oversized model gets the
        // platform's message rather than the extractor's.
        model.layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(MAX_MODEL_BYTES + 1)),
    ))
}

#[utoipa::path(
    get,
    operation_id = "list_models", path = "/v1/models", tag = "models", summary = "The models: name, version, size, inputs and outputs", responses((status = 200, description = "the models", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn list(State(platform): State<Arc<Platform>>) -> ApiResult<Response> {
    Ok(Json(platform.models().list().await?).into_response())
}

/// `PUT /v1/models/{name}` with the .onnx bytes as the body: the stored
/// model (name, version, digest, inputs, outputs).
#[utoipa::path(
    put,
    operation_id = "upload_model", path = "/v1/models/{name}", tag = "models", summary = "Upload an ONNX model (a new version of the name); anything else is refused", params(("name" = String, Path, description = "the model")), request_body(content = String, content_type = "application/octet-stream", description = "the .onnx file"), responses((status = 200, description = "the stored model", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn upload(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|e| {
        ApiError::rejected(
            e.status(),
            format!("cannot read the model: {}", e.body_text()),
        )
    })?;
    let record = platform.models().put(&name, body).await?;
    Ok((StatusCode::OK, Json(record)).into_response())
}

/// `DELETE /v1/models/{name}`: refused while a deployed function is granted
/// it.
#[utoipa::path(
    delete,
    operation_id = "delete_model", path = "/v1/models/{name}", tag = "models", summary = "Delete a model no function is granted", params(("name" = String, Path, description = "the model")), responses((status = 204, description = "deleted"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
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
