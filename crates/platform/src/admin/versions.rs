//! Versions and aliases: `GET/PUT/DELETE /v1/functions/{f}/aliases/…`,
//! `POST /v1/functions/{f}/rollback` and
//! `DELETE /v1/functions/{f}/versions/{v}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use mayfly_store::{AliasMove, AliasRecord, CanaryPolicy, CanaryRecord, WEIGHT_SCALE_BP};
use serde::Deserialize;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult};
use super::openapi::ErrorBody;
use crate::auth::Principal;
use crate::platform::Platform;

pub(super) fn routes() -> OpenApiRouter<Arc<Platform>> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(set, remove))
        .routes(routes!(rollback))
        .routes(routes!(delete_version))
}

/// A canary as the API shows it: the weight (and the error budget) in
/// percent.
fn canary_json(canary: &CanaryRecord) -> Value {
    serde_json::json!({
        "version": canary.version,
        "weight_percent": f64::from(canary.weight_bp) / 100.0,
        "auto": canary.auto.map(|auto| serde_json::json!({
            "requests": auto.requests,
            "max_error_percent": f64::from(auto.max_error_bp) / 100.0,
            "max_p99_ms": auto.max_p99_ms,
        })),
    })
}

/// An alias as the API shows it; an automatic canary also shows how far
/// this node has judged it.
pub(super) fn alias_json(platform: &Platform, alias: &AliasRecord) -> Value {
    let mut canary = alias.canary.as_ref().map(canary_json);
    if let Some(canary) = &mut canary
        && let Some(progress) = platform
            .deployments()
            .rollout_progress(&alias.function, &alias.alias)
    {
        canary["progress"] = serde_json::json!(progress);
    }
    serde_json::json!({
        "alias": alias.alias,
        "version": alias.version,
        "canary": canary,
        "previous_version": alias.previous_version,
        "updated_at_ms": alias.updated_at_ms,
    })
}

/// One alias move as the API shows it.
pub(super) fn move_json(moved: &AliasMove) -> Value {
    serde_json::json!({
        "alias": moved.alias,
        "at_ms": moved.at_ms,
        "from_version": moved.from_version,
        "version": moved.version,
        "canary": moved.canary.as_ref().map(canary_json),
        "cause": moved.cause.as_str(),
        "detail": moved.detail,
    })
}

/// `GET /v1/functions/{name}/aliases`: `live` first, then by name.
#[utoipa::path(
    get,
    operation_id = "list_aliases",
    path = "/v1/functions/{name}/aliases",
    tag = "aliases",
    summary = "The function's aliases, `live` first",
    params(("name" = String, Path, description = "the function")),
    responses((status = 200, description = "the aliases", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn list(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let aliases = platform.deployments().aliases(&name).await?;
    let shown: Vec<Value> = aliases.iter().map(|a| alias_json(&platform, a)).collect();
    Ok(Json(shown))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SetAlias {
    version: u64,
    #[serde(default)]
    canary: Option<CanarySpec>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CanarySpec {
    version: u64,
    weight_percent: f64,
    #[serde(default)]
    auto: Option<AutoSpec>,
}

/// An automatic canary's thresholds; every field has a default.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AutoSpec {
    #[serde(default = "default_auto_requests")]
    requests: u32,
    #[serde(default = "default_max_error_percent")]
    max_error_percent: f64,
    #[serde(default)]
    max_p99_ms: Option<u32>,
}

fn default_auto_requests() -> u32 {
    100
}

fn default_max_error_percent() -> f64 {
    1.0
}

/// Most invocations an automatic canary may be judged over: its window is
/// kept in memory.
const MAX_AUTO_REQUESTS: u32 = 100_000;

/// Highest p99 limit accepted: one hour, the longest timeout.
const MAX_P99_LIMIT_MS: u32 = 3_600_000;

const SET_USAGE: &str = "send JSON like {\"version\": 7} or {\"version\": 7, \"canary\": \
                         {\"version\": 8, \"weight_percent\": 10, \"auto\": {\"requests\": \
                         100, \"max_error_percent\": 1, \"max_p99_ms\": 250}}}";

/// A percentage with at most two decimals in basis points, if it is one
/// (`0..=100`).
fn percent_bp(percent: f64) -> Option<u32> {
    let scaled = percent * 100.0;
    let bp = scaled.round();
    let valid = percent.is_finite()
        && (0.0..=f64::from(WEIGHT_SCALE_BP)).contains(&bp)
        && (scaled - bp).abs() < 1e-6;
    valid.then_some(bp as u32)
}

impl AutoSpec {
    fn policy(&self) -> Result<CanaryPolicy, ApiError> {
        if !(1..=MAX_AUTO_REQUESTS).contains(&self.requests) {
            return Err(ApiError::bad_request(format!(
                "`auto.requests` is {}: judge the canary over 1 to {MAX_AUTO_REQUESTS} requests",
                self.requests
            )));
        }
        let max_error_bp = percent_bp(self.max_error_percent).ok_or_else(|| {
            ApiError::bad_request(format!(
                "`auto.max_error_percent` is {}: give 0 to 100, with at most two decimals",
                self.max_error_percent
            ))
        })?;
        if let Some(limit) = self.max_p99_ms
            && !(1..=MAX_P99_LIMIT_MS).contains(&limit)
        {
            return Err(ApiError::bad_request(format!(
                "`auto.max_p99_ms` is {limit}: give 1 to {MAX_P99_LIMIT_MS} milliseconds, or \
                 leave it out to compare with the alias's own version"
            )));
        }
        Ok(CanaryPolicy {
            requests: self.requests,
            max_error_bp,
            max_p99_ms: self.max_p99_ms,
        })
    }
}

/// A weight in percent (more than 0, less than 100, at most two decimals)
/// in basis points.
fn weight_bp(percent: f64) -> Result<u32, ApiError> {
    match percent_bp(percent) {
        Some(bp) if bp > 0 && bp < WEIGHT_SCALE_BP => Ok(bp),
        _ => Err(ApiError::bad_request(format!(
            "the canary weight is {percent}%: give more than 0 and less than 100, with at most \
             two decimals (e.g. 10 or 0.5)"
        ))),
    }
}

/// A token limited to functions may point an alias only at versions
/// within what `live` has now (routes and grants), as for a deploy; a
/// secret grant needs an admin.
async fn check_versions(
    platform: &Platform,
    principal: &Principal,
    name: &str,
    versions: &[u64],
) -> ApiResult<()> {
    if principal.is_admin() {
        return Ok(());
    }
    let (function, stored) = platform.deployments().function(name).await?;
    for wanted in versions {
        if let Some(version) = stored.iter().find(|v| v.version == *wanted) {
            crate::auth::check_deploy(
                principal,
                Some(&function.live.config),
                &version.config,
                false,
            )
            .map_err(ApiError::from)?;
        }
    }
    Ok(())
}

/// `PUT /v1/functions/{name}/aliases/{alias}` with
/// `{"version": 7, "canary": {"version": 8, "weight_percent": 10.0}}`.
#[utoipa::path(
    put,
    operation_id = "set_alias",
    path = "/v1/functions/{name}/aliases/{alias}",
    tag = "aliases",
    summary = "Point an alias at a version, optionally with a canary",
    params(("name" = String, Path, description = "the function"), ("alias" = String, Path, description = "the alias (`live`, `canary`, ...)")),
    request_body(content = SetAlias, content_type = "application/json"),
    responses((status = 200, description = "the alias", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn set(
    State(platform): State<Arc<Platform>>,
    Path((name, alias)): Path<(String, String)>,
    axum::Extension(principal): axum::Extension<Principal>,
    body: Result<Json<SetAlias>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(body) = body
        .map_err(|e| ApiError::rejected(e.status(), format!("{}: {SET_USAGE}", e.body_text())))?;
    let canary = match &body.canary {
        Some(canary) => Some(CanaryRecord {
            version: canary.version,
            weight_bp: weight_bp(canary.weight_percent)?,
            auto: canary.auto.as_ref().map(AutoSpec::policy).transpose()?,
        }),
        None => None,
    };
    crate::validate::validate_alias(&alias)?;
    let mut versions = vec![body.version];
    versions.extend(canary.map(|c| c.version));
    check_versions(&platform, &principal, &name, &versions).await?;
    let record = platform
        .deployments()
        .set_alias(&name, &alias, body.version, canary)
        .await?;
    Ok(Json(alias_json(&platform, &record)))
}

/// `DELETE /v1/functions/{name}/aliases/{alias}`; `live` cannot go.
#[utoipa::path(
    delete,
    operation_id = "delete_alias",
    path = "/v1/functions/{name}/aliases/{alias}",
    tag = "aliases",
    summary = "Delete an alias (not `live`)",
    params(("name" = String, Path, description = "the function"), ("alias" = String, Path, description = "the alias (`live`, `canary`, ...)")),
    responses((status = 204, description = "deleted"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn remove(
    State(platform): State<Arc<Platform>>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    platform.deployments().delete_alias(&name, &alias).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/functions/{name}/rollback`: `live` back to its previous
/// version.
#[utoipa::path(
    post,
    path = "/v1/functions/{name}/rollback",
    tag = "aliases",
    summary = "Move `live` back to the version it pointed at before",
    params(("name" = String, Path, description = "the function")),
    responses((status = 200, description = "the alias after the move", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn rollback(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    axum::Extension(principal): axum::Extension<Principal>,
) -> ApiResult<impl IntoResponse> {
    let aliases = platform.deployments().aliases(&name).await?;
    if let Some(previous) = aliases.first().and_then(|live| live.previous_version) {
        check_versions(&platform, &principal, &name, &[previous]).await?;
    }
    let (record, from) = platform.deployments().rollback(&name).await?;
    Ok(Json(serde_json::json!({
        "alias": record.alias,
        "version": record.version,
        "from": from,
    })))
}

/// `DELETE /v1/functions/{name}/versions/{version}`: refused while an
/// alias points at it.
#[utoipa::path(
    delete,
    path = "/v1/functions/{name}/versions/{version}",
    tag = "functions",
    summary = "Delete a version no alias points at",
    params(("name" = String, Path, description = "the function"), ("version" = u64, Path, description = "the version number")),
    responses((status = 204, description = "deleted"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn delete_version(
    State(platform): State<Arc<Platform>>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let version: u64 = version
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{version}` is not a version number")))?;
    platform
        .deployments()
        .delete_version(&name, version)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
