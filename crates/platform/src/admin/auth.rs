//! The admin API's gate (bearer tokens, scopes, audit) and the token and
//! audit endpoints.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult};
use super::openapi::ErrorBody;
use crate::auth::{AuthError, Principal, Scope, authorize, is_admin_action};
use crate::error::PlatformError;
use crate::platform::Platform;

pub(super) fn routes() -> OpenApiRouter<Arc<Platform>> {
    OpenApiRouter::new()
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(audit))
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        let (status, code) = match error {
            AuthError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AuthError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        };
        ApiError {
            status,
            code,
            message: error.to_string(),
        }
    }
}

/// Authenticates and authorizes every admin request, and audits refused
/// requests and admin actions. The audit record is written before the
/// answer leaves, so an acknowledged action is always in the log; when it
/// cannot be written (a full disk) the request is answered with that error
/// instead (fail closed), never as if it had been recorded.
pub(super) async fn gate(
    State(platform): State<Arc<Platform>>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let action = format!("{method} {}", truncated(&path));
    let auth = platform.auth();
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // The dashboard's session cookie stands in for a missing bearer token;
    // an action on the cookie alone must come from the dashboard's own
    // script (its header), which no other site's form or link can send.
    let from_cookie = match authorization {
        Some(_) => None,
        None => super::dashboard::session_token(request.headers()).map(|t| format!("Bearer {t}")),
    };
    if from_cookie.is_some()
        && !(method == axum::http::Method::GET || method == axum::http::Method::HEAD)
        && !request
            .headers()
            .contains_key(super::dashboard::DASHBOARD_HEADER)
    {
        let error = AuthError::Forbidden(format!(
            "{method} {path} with the dashboard's session cookie must come from the dashboard \
             (header {}); other clients send `authorization: Bearer <token>`",
            super::dashboard::DASHBOARD_HEADER
        ));
        return refuse(&platform, "anonymous".into(), action, error).await;
    }
    let authorization = from_cookie.as_deref().or(authorization);
    let principal = match auth
        .authenticate(authorization)
        .and_then(|principal| current_grants(&platform, principal))
    {
        Ok(principal) => principal,
        Err(error) => return refuse(&platform, "anonymous".into(), action, error).await,
    };
    if let Err(error) = authorize(&principal, &method, &path) {
        return refuse(&platform, principal.actor(), action, error).await;
    }
    let actor = principal.actor();
    request.extensions_mut().insert(principal);
    // Cancelled when this future ends or is dropped (the client hung up),
    // for the work worth stopping then (a deploy's compile).
    let gone = ClientGone::default();
    let _gone_on_drop = gone.0.clone().drop_guard();
    request.extensions_mut().insert(gone);
    // Run the action and its audit record in their own task: a client that
    // hangs up mid-request drops this future, but an action that goes on
    // (a store call once made may still land) is still recorded.
    let audited = is_admin_action(&method, &path);
    let task = tokio::spawn(async move {
        let response = next.run(request).await;
        if audited
            && let Err(error) = record(&platform, actor, action, response.status(), None).await
        {
            // The action ran, but no record of it exists: not acknowledged.
            return unrecorded(error);
        }
        response
    });
    match task.await {
        Ok(response) => response,
        Err(error) => ApiError::from(PlatformError::Internal(anyhow::anyhow!(
            "the admin request failed: {error}"
        )))
        .into_response(),
    }
}

/// Cancelled once the client of an admin request is gone (or its answer
/// left): the action itself runs on in its own task, so the handler learns
/// of a hang-up only through this.
#[derive(Debug, Clone, Default)]
pub(super) struct ClientGone(pub(super) tokio_util::sync::CancellationToken);

/// A function's credential narrowed to what it is granted now
/// ([`Platform::credential_now`]); tokens pass unchanged.
fn current_grants(platform: &Platform, principal: Principal) -> Result<Principal, AuthError> {
    let Principal::Function(credential) = principal else {
        return Ok(principal);
    };
    Ok(Principal::Function(Arc::new(
        platform.credential_now(&credential)?,
    )))
}

/// Answers a refused request, after recording the refusal.
async fn refuse(
    platform: &Arc<Platform>,
    actor: String,
    action: String,
    error: AuthError,
) -> Response {
    let error = ApiError::from(error);
    if let Err(unrecorded_error) = record(
        platform,
        actor,
        action,
        error.status,
        Some(error.message.clone()),
    )
    .await
    {
        return unrecorded(unrecorded_error);
    }
    error.into_response()
}

/// The answer to a request whose audit record could not be written: 507
/// when the disk is full, else 503, saying so.
fn unrecorded(error: PlatformError) -> Response {
    let (status, code) = match error {
        PlatformError::InsufficientStorage(_) => {
            (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
        }
        _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    ApiError {
        status,
        code,
        message: format!(
            "the node cannot write its audit log, so it answers no admin request: {error}"
        ),
    }
    .into_response()
}

/// A path as the audit log keeps it: at most 512 bytes, so refused requests
/// with huge paths cannot balloon the log.
fn truncated(path: &str) -> &str {
    let mut end = path.len().min(512);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

async fn record(
    platform: &Arc<Platform>,
    actor: String,
    action: String,
    status: StatusCode,
    detail: Option<String>,
) -> Result<(), PlatformError> {
    let recorded = platform
        .auth()
        .record(actor, action, status.as_u16(), detail)
        .await;
    if let Err(error) = &recorded {
        tracing::error!("cannot write the audit log: {error}");
    }
    recorded
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    scopes: Vec<String>,
    #[serde(default)]
    functions: Vec<String>,
}

#[utoipa::path(
    post,
    path = "/v1/tokens",
    tag = "auth",
    summary = "Create a token (its secret is shown once)",
    request_body(content = NewToken, content_type = "application/json"),
    responses((status = 201, description = "the token, with `token` (the secret)", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn create_token(
    State(platform): State<Arc<Platform>>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let new: NewToken = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be JSON {{\"name\": …, \"scopes\": [\"read\", …], \"functions\": \
             [optional]}}: {e}"
        ))
    })?;
    let scopes = new
        .scopes
        .iter()
        .map(|s| Scope::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::bad_request)?;
    let (record, token) = platform
        .auth()
        .create_token(&new.name, scopes, new.functions)
        .await?;
    let mut body = serde_json::to_value(&record).map_err(|e| PlatformError::Internal(e.into()))?;
    body["token"] = serde_json::Value::String(token);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/tokens",
    tag = "auth",
    summary = "Every token (no secrets)",
    responses((status = 200, description = "the tokens", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn list_tokens(State(platform): State<Arc<Platform>>) -> ApiResult<impl IntoResponse> {
    Ok(Json(platform.auth().tokens().await?))
}

#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    tag = "auth",
    summary = "Revoke a token",
    params(("id" = String, Path, description = "the id")),
    responses((status = 204, description = "revoked"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn revoke_token(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    platform.auth().revoke_token(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    after: i64,
    limit: Option<usize>,
}

async fn audit_list(
    platform: &Arc<Platform>,
    query: AuditQuery,
) -> Result<Vec<mayfly_store::AuditEntry>, PlatformError> {
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    // Without `after`, the latest entries; with it, the ones that follow.
    platform
        .auth()
        .audit(query.after, limit, query.after == 0)
        .await
}

#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "auth",
    summary = "The audit log: admin actions and refused requests",
    params(AuditQuery),
    responses((status = 200, description = "the entries", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn audit(
    State(platform): State<Arc<Platform>>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(query) = query.map_err(|e| {
        ApiError::bad_request(format!("bad query: {e} (use ?after=<id>&limit=<n>)"))
    })?;
    Ok(Json(audit_list(&platform, query).await?))
}
