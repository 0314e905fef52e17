//! The admin API's error answers: each kind of [`PlatformError`] as an HTTP
//! status and a stable `code`, in the `{"error": {"code", "message"}}`
//! envelope. The only place where domain errors become HTTP statuses.

use axum::Json;
use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::PlatformError;

/// An error answer of the admin API.
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }

    /// An extractor's rejection with `status`: 413 when the body went over
    /// the route's limit (`DefaultBodyLimit`), saying `too_large` so that
    /// the client learns that a smaller body would pass; anything else is
    /// the client's malformed request (400).
    pub(super) fn rejected(status: StatusCode, message: impl Into<String>) -> Self {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Self {
                status,
                code: "too_large",
                message: message.into(),
            }
        } else {
            Self::bad_request(message)
        }
    }
}

/// A query string's parameters, or a 400 saying what was wrong with it
/// (for handlers that take `Result<Query<T>, _>` to keep the error envelope).
pub(super) fn query<T>(query: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

impl From<PlatformError> for ApiError {
    fn from(error: PlatformError) -> Self {
        let (status, code) = match &error {
            PlatformError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            PlatformError::Deploy(mayfly_runtime::DeployError::Internal(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
            PlatformError::Deploy(mayfly_runtime::DeployError::Busy { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "busy")
            }
            PlatformError::Deploy(_) => (StatusCode::BAD_REQUEST, "invalid_component"),
            PlatformError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            PlatformError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            PlatformError::Missing(_) => (StatusCode::NOT_FOUND, "not_found"),
            PlatformError::PreconditionFailed(_) => {
                (StatusCode::PRECONDITION_FAILED, "precondition_failed")
            }
            PlatformError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            PlatformError::InsufficientStorage(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            PlatformError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!("admin API: {error}");
        }
        Self {
            status,
            code,
            message: error.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// What an admin handler returns.
pub(super) type ApiResult<T> = Result<T, ApiError>;
