//! The web dashboard: a login page that turns a token into a session
//! cookie, the single-page app and its assets (built into the binary), and
//! the two read endpoints only it needs (time series). Every figure the
//! pages show comes from the admin API itself, through the gate, with the
//! cookie standing in for the bearer token: read scope to look, deploy or
//! admin to act.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult};
use super::openapi::ErrorBody;
use crate::auth::Principal;
use crate::clock::now_ms;
use crate::platform::Platform;
use crate::series::{OUTCOMES, Point, Resolution};

/// The session cookie's name.
pub(super) const COOKIE: &str = "mayfly_session";
/// The header the dashboard's own requests carry: an action authenticated
/// by the cookie alone must have it, so no other site's form can act (the
/// cookie is SameSite=Strict as well).
pub(super) const DASHBOARD_HEADER: &str = "x-mayfly-dashboard";
/// How long a session cookie lives: a working day.
const SESSION_SECONDS: u64 = 12 * 3600;

const LOGIN_HTML: &str = include_str!("../../dashboard/login.html");
const APP_HTML: &str = include_str!("../../dashboard/app.html");
const APP_JS: &str = include_str!("../../dashboard/app.js");
const APP_CSS: &str = include_str!("../../dashboard/app.css");
const UPLOT_JS: &str = include_str!("../../dashboard/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../dashboard/vendor/uPlot.min.css");

/// The pages and assets, outside the gate (the pages check the cookie
/// themselves and show the login page without one).
pub(super) fn pages() -> Router<Arc<Platform>> {
    Router::new()
        .route("/dashboard", get(to_dashboard))
        .route("/dashboard/", get(app))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/assets/{file}", get(asset))
        .route("/dashboard/{*page}", get(app))
}

/// The dashboard's data endpoints, behind the gate.
pub(super) fn api() -> OpenApiRouter<Arc<Platform>> {
    OpenApiRouter::new()
        .routes(routes!(summary))
        .routes(routes!(series))
}

/// The session token a request carries in its cookie, if any.
pub(super) fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

async fn to_dashboard() -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard/")]).into_response()
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Only our own scripts and styles; no framing.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                 frame-ancestors 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
        .into_response()
}

fn login_page(status: StatusCode, message: &str) -> Response {
    let message = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    html(status, LOGIN_HTML.replace("{{message}}", &message))
}

/// A valid token in the cookie: the app; else the login page.
async fn app(State(platform): State<Arc<Platform>>, headers: HeaderMap) -> Response {
    let Some(token) = session_token(&headers) else {
        return login_page(StatusCode::OK, "");
    };
    match platform
        .auth()
        .authenticate(Some(&format!("Bearer {token}")))
    {
        Ok(Principal::Token(_)) => html(StatusCode::OK, APP_HTML.to_string()),
        _ => login_page(
            StatusCode::UNAUTHORIZED,
            "Your session's token is no longer valid (revoked?): log in again.",
        ),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

fn cookie(platform: &Platform, value: &str, max_age: u64) -> HeaderValue {
    let secure = if platform
        .api_url()
        .is_some_and(|url| url.starts_with("https://"))
    {
        "; Secure"
    } else {
        ""
    };
    // A token is URL-safe text; anything else was refused before.
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("mayfly_session=; Path=/; Max-Age=0"))
}

/// `POST /dashboard/login` (a form with `token`): checks the token and
/// keeps it in an HttpOnly, SameSite=Strict (and, over TLS, Secure) cookie.
async fn login(State(platform): State<Arc<Platform>>, body: axum::body::Bytes) -> Response {
    let Ok(form) = serde_urlencoded::from_bytes::<LoginForm>(&body) else {
        return login_page(
            StatusCode::BAD_REQUEST,
            "Send the form with a token (the admin.token file in the node's data directory, or \
             one from `mayfly token create`).",
        );
    };
    let token = form.token.trim();
    let well_formed = !token.is_empty()
        && token.len() <= 512
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b));
    let valid = well_formed
        && matches!(
            platform
                .auth()
                .authenticate(Some(&format!("Bearer {token}"))),
            Ok(Principal::Token(_))
        );
    if !valid {
        // Refused logins are audited like any refused request.
        if let Err(error) = platform
            .auth()
            .record(
                "anonymous".into(),
                "POST /dashboard/login".into(),
                401,
                Some("the token is not valid".into()),
            )
            .await
        {
            tracing::error!("cannot write the audit log: {error}");
        }
        return login_page(
            StatusCode::UNAUTHORIZED,
            "That token is not valid (unknown or revoked): use the admin.token file in the \
             node's data directory, or ask an admin for one (`mayfly token create --scope read`).",
        );
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, HeaderValue::from_static("/dashboard/")),
            (
                header::SET_COOKIE,
                cookie(&platform, token, SESSION_SECONDS),
            ),
        ],
    )
        .into_response()
}

/// `POST /dashboard/logout`: forgets the cookie.
async fn logout(State(platform): State<Arc<Platform>>) -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, HeaderValue::from_static("/dashboard/")),
            (header::SET_COOKIE, cookie(&platform, "", 0)),
        ],
    )
        .into_response()
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "uPlot.iife.min.js" => (UPLOT_JS, "text/javascript; charset=utf-8"),
        "uPlot.min.css" => (UPLOT_CSS, "text/css; charset=utf-8"),
        _ => {
            return (StatusCode::NOT_FOUND, "no such dashboard asset\n").into_response();
        }
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn point_json(point: &Point, prices: &crate::config::PriceList) -> serde_json::Value {
    let outcomes: serde_json::Map<String, serde_json::Value> = OUTCOMES
        .iter()
        .zip(point.outcomes)
        .map(|(name, count)| ((*name).to_string(), count.into()))
        .collect();
    serde_json::json!({
        "t_ms": point.t_ms,
        "requests": point.requests(),
        "errors": point.errors(),
        "outcomes": outcomes,
        "cold_starts": point.cold_starts,
        "p50_ms": point.p50_us as f64 / 1000.0,
        "p95_ms": point.p95_us as f64 / 1000.0,
        "p99_ms": point.p99_us as f64 / 1000.0,
        "instances": point.instances,
        "billed_gb_s": point.billed_gb_s(),
        "cost": point.cost(prices),
    })
}

/// `GET /v1/dashboard/summary`: per function, the last hour on this node
/// (requests, errors, p50/p99, cold starts, cost) from the in-process
/// series, and the node's memory and concurrency.
#[utoipa::path(
    get,
    path = "/v1/dashboard/summary",
    tag = "node",
    summary = "The last hour per function on this node, and the node's memory and concurrency",
    responses((status = 200, description = "`{\"window_seconds\", \"currency\", \"functions\": [...], \"node\": {...}}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn summary(
    State(platform): State<Arc<Platform>>,
    axum::Extension(principal): axum::Extension<Principal>,
) -> ApiResult<impl IntoResponse> {
    let now = now_ms();
    let prices = platform.prices();
    let visible = |name: &str| match &principal {
        Principal::Token(token) => {
            token.functions.is_empty() || token.functions.iter().any(|f| f == name)
        }
        Principal::Function(_) => false,
    };
    let functions: Vec<serde_json::Value> = platform
        .series()
        .all()
        .into_iter()
        .filter(|(name, _)| visible(name))
        .map(|(name, series)| {
            let mut json = point_json(&series.last_hour(now), prices);
            json["function"] = name.into();
            json
        })
        .collect();
    let status = platform.status();
    Ok(axum::Json(serde_json::json!({
        "window_seconds": 3600,
        "currency": prices.currency,
        "functions": functions,
        "node": {
            "memory_in_use_mb": status.memory_in_use_mb,
            "memory_resident_mb": status.memory_resident_mb,
            "memory_budget_mb": status.memory_budget_mb,
            "instances_in_flight": status.instances_in_flight,
            "instances_kept": status.instances_kept,
            "throttled": status.throttled,
            "invocations": status.invocations,
        },
    })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SeriesQuery {
    /// `10s` (the last hour, the default) or `5m` (the last day).
    resolution: Option<String>,
}

/// `GET /v1/functions/{name}/series?resolution=10s|5m`: the function's
/// points on this node (10 s over the last hour, or 5 min over the last
/// day), the period being filled last.
#[utoipa::path(
    get,
    path = "/v1/functions/{name}/series",
    tag = "functions",
    summary = "The function's time series on this node: requests, errors, latency, cold starts, cost",
    params(("name" = String, Path, description = "the function"), SeriesQuery),
    responses((status = 200, description = "the points, oldest first", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn series(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    query: Result<Query<SeriesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(query) = query.map_err(|e| {
        ApiError::bad_request(format!("bad query: {e} (use ?resolution=10s or 5m)"))
    })?;
    let resolution = Resolution::parse(query.resolution.as_deref().unwrap_or("10s"))
        .map_err(ApiError::bad_request)?;
    let series = platform.series().get(&name).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: format!(
            "no function `{name}` is deployed on this node: `mayfly list` shows the functions"
        ),
    })?;
    let now = now_ms();
    let window = match resolution {
        Resolution::Fine => 3_600_000,
        Resolution::Coarse => 86_400_000,
    };
    let prices = platform.prices();
    let points: Vec<serde_json::Value> = series
        .points(resolution, now - window, now)
        .iter()
        .map(|point| point_json(point, prices))
        .collect();
    Ok(axum::Json(serde_json::json!({
        "function": name,
        "step_ms": resolution.step_ms(),
        "currency": prices.currency,
        "points": points,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_token_comes_from_its_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; mayfly_session=tok_123 ; c=d"),
        );
        assert_eq!(session_token(&headers), Some("tok_123"));
        let mut empty = HeaderMap::new();
        empty.insert(header::COOKIE, HeaderValue::from_static("mayfly_session="));
        assert_eq!(session_token(&empty), None);
    }
}
