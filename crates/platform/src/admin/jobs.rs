//! Admin endpoints of batch jobs (`/v1/jobs`): reads need `read`, the
//! rest `deploy`, like every admin route that is not about one function.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mayfly_store::ItemState;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult, query};
use super::openapi::ErrorBody;
use crate::jobs::JobRequest;
use crate::platform::Platform;

/// The job routes.
pub(super) fn routes() -> OpenApiRouter<Arc<Platform>> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show))
        .routes(routes!(items))
        .routes(routes!(log))
        .routes(routes!(cancel))
        .routes(routes!(retry_failed))
}

/// `POST /v1/jobs` with a [`JobRequest`]: 201 and the job.
#[utoipa::path(
    post,
    operation_id = "create_job", path = "/v1/jobs", tag = "jobs", summary = "Run a function once per object under a prefix", request_body(content = Object, content_type = "application/json", description = "`{\"function\", \"input\": \"BUCKET/PREFIX\", \"output\", \"parallelism\", \"max_failures\", \"max_attempts\"}`"), responses((status = 201, description = "the job", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn create(
    State(platform): State<Arc<Platform>>,
    body: Result<Json<JobRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(request) = body.map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be JSON {{\"function\": …, \"input\": \"BUCKET/PREFIX\", …}}: {}",
            e.body_text()
        ))
    })?;
    let job = platform.jobs().create(request).await?;
    Ok((StatusCode::CREATED, Json(job)).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<usize>,
    /// Only this pipeline's jobs.
    pipeline: Option<String>,
}

/// `GET /v1/jobs?limit=100&pipeline=NAME`: jobs, newest first.
#[utoipa::path(
    get,
    operation_id = "list_jobs", path = "/v1/jobs", tag = "jobs", summary = "Jobs, newest first", params(ListParams), responses((status = 200, description = "the jobs", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn list(
    State(platform): State<Arc<Platform>>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let params = query(params)?;
    let jobs = platform
        .jobs()
        .list(
            params.limit.unwrap_or(100).clamp(1, 10_000),
            params.pipeline.as_deref(),
        )
        .await?;
    Ok(Json(jobs).into_response())
}

/// `GET /v1/jobs/{id}`: the job with its counts.
#[utoipa::path(
    get,
    operation_id = "get_job", path = "/v1/jobs/{id}", tag = "jobs", summary = "A job with its item counts", params(("id" = String, Path, description = "the job")), responses((status = 200, description = "the job", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn show(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(platform.jobs().get(&id).await?).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct PageParams {
    state: Option<String>,
    #[serde(default)]
    after: i64,
    limit: Option<usize>,
}

/// `GET /v1/jobs/{id}/items?state=failed&after=SEQ&limit=1000`.
#[utoipa::path(
    get,
    operation_id = "list_job_items", path = "/v1/jobs/{id}/items", tag = "jobs", summary = "A page of the job's items, optionally of one state", params(("id" = String, Path, description = "the job"), PageParams), responses((status = 200, description = "the items", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn items(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let params = query(params)?;
    let state = match params.state.as_deref() {
        None | Some("") | Some("all") => None,
        Some(text) => Some(ItemState::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "`state` is `{text}`: use pending, running, done, failed or all"
            ))
        })?),
    };
    let limit = params.limit.unwrap_or(1000).clamp(1, 10_000);
    let items = platform
        .jobs()
        .items(&id, state, params.after, limit)
        .await?;
    let next = (items.len() == limit)
        .then(|| items.last().map(|i| i.seq))
        .flatten();
    Ok(Json(serde_json::json!({"items": items, "next": next})).into_response())
}

/// `GET /v1/jobs/{id}/log?after=POS&limit=1000`: each attempt's end.
#[utoipa::path(
    get,
    operation_id = "get_job_log", path = "/v1/jobs/{id}/log", tag = "jobs", summary = "The end of each attempt of the job's items", params(("id" = String, Path, description = "the job"), PageParams), responses((status = 200, description = "the log", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn log(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let params = query(params)?;
    if params.state.is_some() {
        return Err(ApiError::bad_request(
            "the item log has no `state` filter: use /items?state=…",
        ));
    }
    let limit = params.limit.unwrap_or(1000).clamp(1, 10_000);
    let entries = platform.jobs().log(&id, params.after, limit).await?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|(pos, _)| *pos))
        .flatten();
    let entries: Vec<_> = entries
        .into_iter()
        .map(|(pos, entry)| {
            let mut json = serde_json::to_value(entry).unwrap_or_default();
            if let serde_json::Value::Object(fields) = &mut json {
                fields.insert("pos".into(), pos.into());
            }
            json
        })
        .collect();
    Ok(Json(serde_json::json!({"entries": entries, "next": next})).into_response())
}

/// `POST /v1/jobs/{id}/cancel`.
#[utoipa::path(
    post,
    operation_id = "cancel_job", path = "/v1/jobs/{id}/cancel", tag = "jobs", summary = "Cancel a job (running items finish)", params(("id" = String, Path, description = "the job")), responses((status = 200, description = "the job", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn cancel(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(platform.jobs().cancel(&id).await?).into_response())
}

/// `POST /v1/jobs/{id}/retry-failed`: `{"job": …, "reset": N}`.
#[utoipa::path(
    post,
    operation_id = "retry_failed_job_items", path = "/v1/jobs/{id}/retry-failed", tag = "jobs", summary = "Run the job's failed items again", params(("id" = String, Path, description = "the job")), responses((status = 200, description = "`{\"job\", \"reset\": n}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn retry_failed(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (job, reset) = platform.jobs().retry_failed(&id).await?;
    Ok(Json(serde_json::json!({"job": job, "reset": reset})).into_response())
}
