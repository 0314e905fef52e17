//! The admin API's OpenAPI 3.1 description. Each handler carries its own
//! `#[utoipa::path]`, and the routers register handlers only through
//! `utoipa_axum::routes!`, so a route cannot be served without being
//! described; this module adds what is common to all of them and serves
//! the document at `GET /v1/openapi.json`.

use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi, SecurityRequirement};
use utoipa::{Modify, ToSchema};

/// Where the description is served.
pub(super) const PATH: &str = "/v1/openapi.json";

/// The error envelope every admin error answer has.
#[derive(Serialize, ToSchema)]
pub(super) struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong and what to do about it.
#[derive(Serialize, ToSchema)]
struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `unauthorized`,
    /// `forbidden`, `not_found`, `conflict`, `too_large`, `internal`, ...
    code: String,
    /// For people: what was wrong and what to do.
    message: String,
}

/// The document's frame: title, security scheme, tags and shared schemas.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Mayfly admin API",
        description = "Deploy, inspect, invoke and operate serverless WebAssembly functions. \
                       Every request needs `Authorization: Bearer <token>` (a token's scopes: \
                       read, invoke, deploy, admin); every error answer is \
                       `{\"error\": {\"code\", \"message\"}}`."
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth),
    tags(
        (name = "node", description = "the node and the fleet"),
        (name = "functions", description = "functions, versions, invocations and logs"),
        (name = "aliases", description = "aliases, canaries and rollbacks"),
        (name = "usage", description = "the usage ledger and its aggregation"),
        (name = "objects", description = "object buckets"),
        (name = "kv", description = "key-value buckets"),
        (name = "queues", description = "queues"),
        (name = "triggers", description = "event triggers and dead-letter queues"),
        (name = "secrets", description = "secrets (values are never returned)"),
        (name = "auth", description = "tokens and the audit log"),
        (name = "models", description = "ONNX models for wasi:nn"),
        (name = "jobs", description = "batch jobs: a function over every object under a prefix"),
        (name = "pipelines", description = "chains of jobs, started by hand, on a schedule or when objects arrive"),
    )
)]
pub(super) struct Frame;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "token",
            Vec::<String>::new(),
        )]);
    }
}

/// The finished document for the routes collected in `collected`.
pub(super) fn document(collected: OpenApi) -> OpenApi {
    let mut doc = <Frame as utoipa::OpenApi>::openapi().merge_from(collected);
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    // axum's catch-all `{*key}` is `{key}` in OpenAPI (the parameter's
    // description says that it may hold `/`).
    doc.paths.paths = std::mem::take(&mut doc.paths.paths)
        .into_iter()
        .map(|(path, item)| (path.replace("{*", "{"), item))
        .collect();
    doc
}

/// `GET /v1/openapi.json`: the document, serialised once at start.
pub(super) fn handler(
    doc: &OpenApi,
) -> impl Fn() -> std::future::Ready<axum::response::Response> + Clone + Send + Sync + 'static {
    let json = bytes::Bytes::from(doc.to_pretty_json().unwrap_or_default());
    move || {
        std::future::ready(
            ([(header::CONTENT_TYPE, "application/json")], json.clone()).into_response(),
        )
    }
}
