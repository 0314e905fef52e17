//! Admin endpoints of pipelines (`/v1/pipelines`): reads need `read`, the
//! rest `deploy`, like the jobs a pipeline's steps are.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mayfly_store::PipelineSpec;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult, query};
use super::openapi::ErrorBody;
use crate::platform::Platform;

/// The pipeline routes.
pub(super) fn routes() -> OpenApiRouter<Arc<Platform>> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show, put, delete))
        .routes(routes!(runs, start_run))
        .routes(routes!(show_run))
}

/// `GET /v1/pipelines`: every pipeline with its latest run.
#[utoipa::path(
    get,
    operation_id = "list_pipelines", path = "/v1/pipelines", tag = "pipelines", summary = "Pipelines, each with its latest run", responses((status = 200, description = "the pipelines", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn list(State(platform): State<Arc<Platform>>) -> ApiResult<Response> {
    Ok(Json(platform.pipelines().list().await?).into_response())
}

/// `GET /v1/pipelines/{name}`.
#[utoipa::path(
    get,
    operation_id = "get_pipeline", path = "/v1/pipelines/{name}", tag = "pipelines", summary = "A pipeline's definition and its latest run", params(("name" = String, Path, description = "the pipeline")), responses((status = 200, description = "the pipeline", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn show(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(platform.pipelines().get(&name).await?).into_response())
}

/// `PUT /v1/pipelines/{name}` with the `[pipelines.NAME]` table as JSON:
/// `{"pipeline", "changed", "warnings"}`.
#[utoipa::path(
    put,
    operation_id = "put_pipeline", path = "/v1/pipelines/{name}", tag = "pipelines", summary = "Store a pipeline (checked first: steps, cycles, functions, schedule)", params(("name" = String, Path, description = "the pipeline")), request_body(content = Object, content_type = "application/json", description = "`{\"input\": \"BUCKET/PREFIX\", \"schedule\", \"on_objects\", \"steps\": [{\"name\", \"function\", \"after\", \"output\", \"reduce\", …}]}`"), responses((status = 200, description = "`{\"pipeline\", \"changed\", \"warnings\"}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn put(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    body: Result<Json<PipelineSpec>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(spec) = body.map_err(|e| {
        ApiError::bad_request(format!(
            "pipeline `{name}` is not a valid definition: {}; a pipeline has `input`, \
             `schedule`, `on_objects` and `steps`, each step `name`, `function`, `after`, \
             `output`, `reduce`, `parallelism`, `max_failures` and `max_attempts`",
            e.body_text()
        ))
    })?;
    let (pipeline, changed, warnings) = platform.pipelines().put(&name, spec).await?;
    Ok(Json(serde_json::json!({
        "pipeline": pipeline,
        "changed": changed,
        "warnings": warnings,
    }))
    .into_response())
}

/// `DELETE /v1/pipelines/{name}`: its runs stay as history.
#[utoipa::path(
    delete,
    operation_id = "delete_pipeline", path = "/v1/pipelines/{name}", tag = "pipelines", summary = "Forget a pipeline (not while it runs; its runs stay)", params(("name" = String, Path, description = "the pipeline")), responses((status = 204, description = "deleted"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn delete(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    platform.pipelines().delete(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    /// Every object again, not only the new ones.
    #[serde(default)]
    full: bool,
}

/// `POST /v1/pipelines/{name}/runs` (`{"full": true}` optional): 201 and
/// the run, whose steps then start one after the other.
#[utoipa::path(
    post,
    operation_id = "start_pipeline_run", path = "/v1/pipelines/{name}/runs", tag = "pipelines", summary = "Start a run by hand", params(("name" = String, Path, description = "the pipeline")), request_body(content = Object, content_type = "application/json", description = "`{\"full\": false}`: `true` processes every object again"), responses((status = 201, description = "the run", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn start_run(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let request: RunRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RunRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body must be empty or JSON {{\"full\": true|false}}: {e}"
            ))
        })?
    };
    let run = platform.pipelines().run(&name, request.full).await?;
    Ok((StatusCode::CREATED, Json(run)).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct RunsParams {
    /// Most runs to return (default 20).
    limit: Option<usize>,
}

/// `GET /v1/pipelines/{name}/runs?limit=20`: runs newest first, each with
/// its jobs.
#[utoipa::path(
    get,
    operation_id = "list_pipeline_runs", path = "/v1/pipelines/{name}/runs", tag = "pipelines", summary = "A pipeline's runs, newest first, with their steps' jobs", params(("name" = String, Path, description = "the pipeline"), RunsParams), responses((status = 200, description = "the runs", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn runs(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    params: Result<Query<RunsParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let params = query(params)?;
    let limit = params.limit.unwrap_or(20).clamp(1, 1000);
    Ok(Json(platform.pipelines().runs(&name, limit).await?).into_response())
}

/// `GET /v1/pipelines/{name}/runs/{run}`.
#[utoipa::path(
    get,
    operation_id = "get_pipeline_run", path = "/v1/pipelines/{name}/runs/{run}", tag = "pipelines", summary = "One run with its steps' jobs", params(("name" = String, Path, description = "the pipeline"), ("run" = u64, Path, description = "the run's number")), responses((status = 200, description = "the run", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody)))]
async fn show_run(
    State(platform): State<Arc<Platform>>,
    Path((name, run)): Path<(String, String)>,
) -> ApiResult<Response> {
    let run: u64 = run.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "`{run}` is not a run number: see `mayfly pipeline history {name}`"
        ))
    })?;
    Ok(Json(platform.pipelines().run_view(&name, run).await?).into_response())
}
