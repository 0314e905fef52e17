//! Admin endpoints of batch jobs (`/v1/jobs`): reads need `read`, the
//! rest `deploy`, like every admin route that is not about one function.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mayfly_store::ItemState;
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use crate::jobs::JobRequest;
use crate::platform::Platform;

/// The job routes.
pub(super) fn routes() -> Router<Arc<Platform>> {
    Router::new()
        .route("/v1/jobs", get(list).post(create))
        .route("/v1/jobs/{id}", get(show))
        .route("/v1/jobs/{id}/items", get(items))
        .route("/v1/jobs/{id}/log", get(log))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/retry-failed", post(retry_failed))
}

fn query<T>(query: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> ApiResult<T> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

/// `POST /v1/jobs` with a [`JobRequest`]: 201 and the job.
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<usize>,
    /// Only this pipeline's jobs.
    pipeline: Option<String>,
}

/// `GET /v1/jobs?limit=100&pipeline=NAME`: jobs, newest first.
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
async fn show(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(platform.jobs().get(&id).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageParams {
    state: Option<String>,
    #[serde(default)]
    after: i64,
    limit: Option<usize>,
}

/// `GET /v1/jobs/{id}/items?state=failed&after=SEQ&limit=1000`.
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
async fn cancel(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(platform.jobs().cancel(&id).await?).into_response())
}

/// `POST /v1/jobs/{id}/retry-failed`: `{"job": …, "reset": N}`.
async fn retry_failed(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (job, reset) = platform.jobs().retry_failed(&id).await?;
    Ok(Json(serde_json::json!({"job": job, "reset": reset})).into_response())
}
