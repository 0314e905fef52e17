//! Versions and aliases: `GET/PUT/DELETE /v1/functions/{f}/aliases/…`,
//! `POST /v1/functions/{f}/rollback` and
//! `DELETE /v1/functions/{f}/versions/{v}`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use mayfly_store::{AliasRecord, CanaryRecord, WEIGHT_SCALE_BP};
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, ApiResult};
use crate::auth::Principal;
use crate::platform::Platform;

pub(super) fn routes() -> Router<Arc<Platform>> {
    Router::new()
        .route("/v1/functions/{name}/aliases", get(list))
        .route(
            "/v1/functions/{name}/aliases/{alias}",
            put(set).delete(remove),
        )
        .route("/v1/functions/{name}/rollback", post(rollback))
        .route(
            "/v1/functions/{name}/versions/{version}",
            delete(delete_version),
        )
}

/// An alias as the API shows it: the weight in percent.
pub(super) fn alias_json(alias: &AliasRecord) -> Value {
    serde_json::json!({
        "alias": alias.alias,
        "version": alias.version,
        "canary": alias.canary.map(|canary| serde_json::json!({
            "version": canary.version,
            "weight_percent": f64::from(canary.weight_bp) / 100.0,
        })),
        "previous_version": alias.previous_version,
        "updated_at_ms": alias.updated_at_ms,
    })
}

/// `GET /v1/functions/{name}/aliases`: `live` first, then by name.
async fn list(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let aliases = platform.aliases(&name).await?;
    Ok(Json(aliases.iter().map(alias_json).collect::<Vec<_>>()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetAlias {
    version: u64,
    #[serde(default)]
    canary: Option<CanarySpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CanarySpec {
    version: u64,
    weight_percent: f64,
}

const SET_USAGE: &str = "send JSON like {\"version\": 7} or {\"version\": 7, \"canary\": \
                         {\"version\": 8, \"weight_percent\": 10}}";

/// A weight in percent (more than 0, less than 100, at most two decimals)
/// in basis points.
fn weight_bp(percent: f64) -> Result<u32, ApiError> {
    let scaled = percent * 100.0;
    let bp = scaled.round();
    let valid = percent.is_finite()
        && bp >= 1.0
        && bp < f64::from(WEIGHT_SCALE_BP)
        && percent > 0.0
        && percent < 100.0
        && (scaled - bp).abs() < 1e-6;
    if valid {
        Ok(bp as u32)
    } else {
        Err(ApiError::bad_request(format!(
            "the canary weight is {percent}%: give more than 0 and less than 100, with at most \
             two decimals (e.g. 10 or 0.5)"
        )))
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
    let (function, stored) = platform.function(name).await?;
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
async fn set(
    State(platform): State<Arc<Platform>>,
    Path((name, alias)): Path<(String, String)>,
    axum::Extension(principal): axum::Extension<Principal>,
    body: Result<Json<SetAlias>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(body) =
        body.map_err(|e| ApiError::bad_request(format!("{}: {SET_USAGE}", e.body_text())))?;
    let canary = match &body.canary {
        Some(canary) => Some(CanaryRecord {
            version: canary.version,
            weight_bp: weight_bp(canary.weight_percent)?,
        }),
        None => None,
    };
    crate::platform::validate_alias(&alias)?;
    let mut versions = vec![body.version];
    versions.extend(canary.map(|c| c.version));
    check_versions(&platform, &principal, &name, &versions).await?;
    let record = platform
        .set_alias(&name, &alias, body.version, canary)
        .await?;
    Ok(Json(alias_json(&record)))
}

/// `DELETE /v1/functions/{name}/aliases/{alias}`; `live` cannot go.
async fn remove(
    State(platform): State<Arc<Platform>>,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    platform.delete_alias(&name, &alias).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/functions/{name}/rollback`: `live` back to its previous
/// version.
async fn rollback(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    axum::Extension(principal): axum::Extension<Principal>,
) -> ApiResult<impl IntoResponse> {
    let aliases = platform.aliases(&name).await?;
    if let Some(previous) = aliases.first().and_then(|live| live.previous_version) {
        check_versions(&platform, &principal, &name, &[previous]).await?;
    }
    let (record, from) = platform.rollback(&name).await?;
    Ok(Json(serde_json::json!({
        "alias": record.alias,
        "version": record.version,
        "from": from,
    })))
}

/// `DELETE /v1/functions/{name}/versions/{version}`: refused while an
/// alias points at it.
async fn delete_version(
    State(platform): State<Arc<Platform>>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let version: u64 = version
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{version}` is not a version number")))?;
    platform.delete_version(&name, version).await?;
    Ok(StatusCode::NO_CONTENT)
}
