//! Admin endpoints of the event stores: object buckets, KV buckets,
//! queues, triggers and dead-letter queues.

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use mayfly_store::{DeadLetter, Delivery, KvCondition, TriggerSpec};
use serde::Deserialize;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult, query};
use super::openapi::ErrorBody;
use crate::error::PlatformError;
use crate::platform::Platform;
use crate::validate::{MAX_MESSAGE_BYTES, MAX_OBJECT_BYTES, MAX_VALUE_BYTES};

/// Largest batch request body.
const MAX_BATCH_BYTES: usize = 32 << 20;

/// The event stores' routes.
pub(super) fn routes() -> OpenApiRouter<Arc<Platform>> {
    let limited = |(schemas, paths, method): UtoipaMethodRouter<Arc<Platform>>, max: usize| {
        (
            schemas,
            paths,
            method.layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(max)),
        )
    };
    OpenApiRouter::new()
        .routes(routes!(object_buckets))
        .routes(routes!(object_list))
        .routes(limited(
            routes!(object_get, object_put, object_delete),
            MAX_OBJECT_BYTES,
        ))
        .routes(routes!(kv_buckets))
        .routes(routes!(kv_list))
        .routes(limited(routes!(kv_get, kv_put, kv_delete), MAX_VALUE_BYTES))
        .routes(routes!(queues))
        .routes(limited(routes!(send), MAX_MESSAGE_BYTES))
        .routes(limited(routes!(send_batch), MAX_BATCH_BYTES))
        .routes(routes!(receive))
        .routes(routes!(ack))
        .routes(routes!(all_triggers))
        .routes(routes!(remove_trigger))
        .routes(routes!(function_triggers, add_trigger))
        .routes(routes!(dlq_list, dlq_purge))
        .routes(routes!(dlq_redrive))
        .routes(routes!(dlq_show))
}

/// `?prefix=&after=&limit=` of listings.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    after: String,
    limit: Option<usize>,
}

impl ListQuery {
    /// The page size: 1000 by default, at most 10,000.
    fn limit(&self) -> usize {
        self.limit.unwrap_or(1000).clamp(1, 10_000)
    }
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The key after the last one of a full page, for the next request.
fn next_after<T>(items: &[T], limit: usize, key: impl Fn(&T) -> &str) -> Option<String> {
    (items.len() == limit)
        .then(|| items.last().map(|item| key(item).to_string()))
        .flatten()
}

/// One page of a listing: `{"<name>": [...], "next": <key> | null}`.
fn page<T: serde::Serialize>(name: &str, items: Vec<T>, next: Option<String>) -> Response {
    let mut body = serde_json::Map::new();
    body.insert(name.into(), serde_json::json!(items));
    body.insert("next".into(), serde_json::json!(next));
    Json(body).into_response()
}

/// Buckets with their sizes; `entries` names what they hold.
fn bucket_rows(buckets: Vec<mayfly_store::BucketStats>, entries: &str) -> Response {
    let rows: Vec<_> = buckets
        .into_iter()
        .map(|b| serde_json::json!({"bucket": b.bucket, entries: b.entries, "bytes": b.bytes}))
        .collect();
    Json(rows).into_response()
}

// ---- objects ----

#[utoipa::path(
    get,
    path = "/v1/buckets",
    tag = "objects",
    summary = "Object buckets with their sizes",
    responses((status = 200, description = "the buckets", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn object_buckets(State(platform): State<Arc<Platform>>) -> ApiResult<Response> {
    Ok(bucket_rows(
        platform.events().object_buckets().await?,
        "objects",
    ))
}

#[utoipa::path(
    get,
    path = "/v1/buckets/{bucket}/objects",
    tag = "objects",
    summary = "One page of a bucket's objects",
    params(("bucket" = String, Path, description = "the bucket"), ListQuery),
    responses((status = 200, description = "`{\"objects\": [...], \"next\"}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn object_list(
    State(platform): State<Arc<Platform>>,
    Path(bucket): Path<String>,
    list: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let list = query(list)?;
    let limit = list.limit();
    let objects = platform
        .events()
        .object_list(&bucket, list.prefix, list.after, limit)
        .await?;
    let next = next_after(&objects, limit, |o| &o.key);
    Ok(page("objects", objects, next))
}

#[utoipa::path(
    put,
    path = "/v1/buckets/{bucket}/objects/{*key}",
    tag = "objects",
    summary = "Write an object (fires the bucket's object triggers)",
    params(("bucket" = String, Path, description = "the bucket"), ("key" = String, Path, description = "the key (may contain `/`)")),
    request_body(content = String, content_type = "application/octet-stream", description = "the object's bytes"),
    responses((status = 201, description = "written", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn object_put(
    State(platform): State<Arc<Platform>>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let content_type =
        content_type(&headers).unwrap_or_else(|| "application/octet-stream".to_string());
    let max = MAX_OBJECT_BYTES as u64;
    // A declared length over the limit is refused before reading a byte.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max) {
        return Err(PlatformError::TooLarge(format!(
            "the object is larger than {max} bytes, the most one object may hold: split it \
             into several objects"
        ))
        .into());
    }
    let meta = platform
        .events()
        .object_put_stream(&bucket, &key, body.into_data_stream(), max, content_type)
        .await?;
    Ok(Json(meta).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/buckets/{bucket}/objects/{*key}",
    tag = "objects",
    summary = "An object's bytes (HEAD: its metadata only)",
    params(("bucket" = String, Path, description = "the bucket"), ("key" = String, Path, description = "the key (may contain `/`)")),
    responses((status = 200, description = "the object", content_type = "application/octet-stream", body = String), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn object_get(
    State(platform): State<Arc<Platform>>,
    Path((bucket, key)): Path<(String, String)>,
    method: Method,
) -> ApiResult<Response> {
    let (meta, path) = platform.events().object_get(&bucket, &key).await?;
    let body = if method == Method::HEAD {
        axum::body::Body::empty()
    } else {
        // A delete racing this open removed the file: the object is gone.
        // Once open, the file stays readable whatever happens to its name.
        let file = tokio::fs::File::open(&path).await.map_err(|_| {
            PlatformError::Missing(format!("no object `{key}` in bucket `{bucket}`"))
        })?;
        // Streamed: a reader holds one chunk in memory, however slow it
        // reads (whole-object reads let 12 slow readers take 650 MB).
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024))
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&meta.content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Ok(value) = HeaderValue::from_str(&meta.etag) {
        headers.insert(header::ETAG, value);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    Ok(response)
}

#[utoipa::path(
    delete,
    path = "/v1/buckets/{bucket}/objects/{*key}",
    tag = "objects",
    summary = "Delete an object",
    params(("bucket" = String, Path, description = "the bucket"), ("key" = String, Path, description = "the key (may contain `/`)")),
    responses((status = 204, description = "deleted"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn object_delete(
    State(platform): State<Arc<Platform>>,
    Path((bucket, key)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    platform.events().object_delete(&bucket, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- KV ----

#[utoipa::path(
    get,
    path = "/v1/kv",
    tag = "kv",
    summary = "Key-value buckets with their sizes",
    responses((status = 200, description = "the buckets", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn kv_buckets(State(platform): State<Arc<Platform>>) -> ApiResult<Response> {
    Ok(bucket_rows(platform.events().kv_buckets().await?, "keys"))
}

#[utoipa::path(
    get,
    path = "/v1/kv/{bucket}",
    tag = "kv",
    summary = "One page of a bucket's keys",
    params(("bucket" = String, Path, description = "the bucket"), ListQuery),
    responses((status = 200, description = "`{\"keys\": [...], \"next\"}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn kv_list(
    State(platform): State<Arc<Platform>>,
    Path(bucket): Path<String>,
    list: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let list = query(list)?;
    let limit = list.limit();
    let keys = platform
        .events()
        .kv_list(&bucket, list.prefix, list.after, limit)
        .await?;
    let next = next_after(&keys, limit, |k| &k.key);
    Ok(page("keys", keys, next))
}

/// The compare-and-swap condition of `If-Match: <revision>` or
/// `If-None-Match: *`.
fn kv_condition(headers: &HeaderMap) -> ApiResult<KvCondition> {
    let text = |name| {
        headers
            .get(name)
            .map(|v| v.to_str().map(|s| s.trim().trim_matches('"').to_string()))
    };
    match (text(header::IF_MATCH), text(header::IF_NONE_MATCH)) {
        (None, None) => Ok(KvCondition::Any),
        (None, Some(Ok(star))) if star == "*" => Ok(KvCondition::Absent),
        (Some(Ok(revision)), None) => revision.parse().map(KvCondition::Revision).map_err(|_| {
            ApiError::bad_request(format!(
                "If-Match is `{revision}`: give the revision number the write expects"
            ))
        }),
        _ => Err(ApiError::bad_request(
            "use `If-Match: <revision>` (write only that revision) or `If-None-Match: *` \
             (create only), not both",
        )),
    }
}

#[utoipa::path(
    get,
    path = "/v1/kv/{bucket}/{*key}",
    tag = "kv",
    summary = "A value (its revision in `x-mayfly-revision`)",
    params(("bucket" = String, Path, description = "the bucket"), ("key" = String, Path, description = "the key (may contain `/`)")),
    responses((status = 200, description = "the value", content_type = "application/octet-stream", body = String), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn kv_get(
    State(platform): State<Arc<Platform>>,
    Path((bucket, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    let entry = platform.events().kv_get(&bucket, &key).await?;
    let mut response = Bytes::from(entry.value).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", entry.revision)) {
        headers.insert(header::ETAG, etag);
    }
    Ok(response)
}

#[utoipa::path(
    put,
    path = "/v1/kv/{bucket}/{*key}",
    tag = "kv",
    summary = "Write a value; `If-Match: <revision>` or `If-None-Match: *` make it conditional",
    params(("bucket" = String, Path, description = "the bucket"), ("key" = String, Path, description = "the key (may contain `/`)")),
    request_body(content = String, content_type = "application/octet-stream", description = "the value"),
    responses((status = 200, description = "written, with its revision", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn kv_put(
    State(platform): State<Arc<Platform>>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let condition = kv_condition(&headers)?;
    let revision = platform
        .events()
        .kv_put(&bucket, &key, body, condition)
        .await?;
    Ok(
        Json(serde_json::json!({"bucket": bucket, "key": key, "revision": revision}))
            .into_response(),
    )
}

#[utoipa::path(
    delete,
    path = "/v1/kv/{bucket}/{*key}",
    tag = "kv",
    summary = "Delete a key (conditional like a put)",
    params(("bucket" = String, Path, description = "the bucket"), ("key" = String, Path, description = "the key (may contain `/`)")),
    responses((status = 204, description = "deleted"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn kv_delete(
    State(platform): State<Arc<Platform>>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let condition = kv_condition(&headers)?;
    platform
        .events()
        .kv_delete(&bucket, &key, condition)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- queues ----

#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    summary = "Queues with their depth",
    responses((status = 200, description = "the queues", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn queues(State(platform): State<Arc<Platform>>) -> ApiResult<Response> {
    Ok(Json(platform.events().queues().await?).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/messages",
    tag = "queues",
    summary = "Send one message (the body)",
    params(("queue" = String, Path, description = "the queue")),
    request_body(content = String, content_type = "application/octet-stream", description = "the message"),
    responses((status = 201, description = "`{\"ids\": [...]}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn send(
    State(platform): State<Arc<Platform>>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let ids = platform
        .events()
        .send(&queue, vec![(content_type(&headers), body.to_vec())])
        .await?;
    let id = ids.first().map(i64::to_string);
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"queue": queue, "id": id})),
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Batch {
    /// Kept as the JSON text sent: no tree to build and serialise again.
    #[schema(value_type = Vec<Object>)]
    messages: Vec<Box<serde_json::value::RawValue>>,
}

#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/batch",
    tag = "queues",
    summary = "Send many messages at once",
    params(("queue" = String, Path, description = "the queue")),
    request_body(content = Batch, content_type = "application/json"),
    responses((status = 201, description = "`{\"ids\": [...]}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn send_batch(
    State(platform): State<Arc<Platform>>,
    Path(queue): Path<String>,
    batch: Result<Json<Batch>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(batch) = batch.map_err(|e| {
        ApiError::rejected(
            e.status(),
            format!(
                "{}: send JSON like {{\"messages\": [{{\"order\": 1}}, \"text\"]}}",
                e.body_text()
            ),
        )
    })?;
    if let Some((index, big)) = batch
        .messages
        .iter()
        .enumerate()
        .find(|(_, m)| m.get().len() > MAX_MESSAGE_BYTES)
    {
        return Err(PlatformError::TooLarge(format!(
            "message {index} of the batch is {} bytes: a message holds at most {MAX_MESSAGE_BYTES}",
            big.get().len()
        ))
        .into());
    }
    let messages = batch
        .messages
        .iter()
        .map(|m| {
            (
                Some("application/json".to_string()),
                m.get().as_bytes().to_vec(),
            )
        })
        .collect();
    let ids = platform.events().send(&queue, messages).await?;
    let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"queue": queue, "ids": ids})),
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ReceiveQuery {
    max: Option<usize>,
    visibility: Option<String>,
}

/// Longest visibility timeout: 12 hours, as SQS allows.
const MAX_VISIBILITY_MS: u64 = 12 * 3600 * 1000;

#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/receive",
    tag = "queues",
    summary = "Receive messages, hidden for the visibility timeout until acknowledged",
    params(("queue" = String, Path, description = "the queue"), ReceiveQuery),
    responses((status = 200, description = "the messages with their receipts", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn receive(
    State(platform): State<Arc<Platform>>,
    Path(queue): Path<String>,
    receive: Result<Query<ReceiveQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let receive = query(receive)?;
    let max = receive.max.unwrap_or(10);
    if !(1..=1000).contains(&max) {
        return Err(ApiError::bad_request(format!(
            "`max` is {max}: receive 1 to 1000 messages at a time"
        )));
    }
    let visibility_ms = match &receive.visibility {
        None => 30_000,
        Some(text) => humantime::parse_duration(text)
            .ok()
            .map(|d| d.as_millis() as u64)
            .filter(|ms| (1..=MAX_VISIBILITY_MS).contains(ms))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`visibility` is `{text}`: give a duration like 30s or 5m, at most 12h"
                ))
            })?,
    };
    let messages = platform
        .events()
        .receive(&queue, max, visibility_ms)
        .await?;
    let messages: Vec<_> = messages.iter().map(message_json).collect();
    Ok(Json(serde_json::json!({"messages": messages})).into_response())
}

/// A received message: its body as text when it is UTF-8, else base64.
fn message_json(delivery: &Delivery) -> serde_json::Value {
    let mut json = serde_json::json!({
        "id": delivery.id.to_string(),
        "receipt": delivery.receipt(),
        "event_id": delivery.event.id,
        "content_type": delivery.event.content_type,
        "attempts": delivery.attempt,
        "sent_ms": delivery.enqueued_ms,
    });
    add_body(&mut json, &delivery.event.data);
    json
}

fn add_body(json: &mut serde_json::Value, data: &[u8]) {
    if let Some(fields) = json.as_object_mut() {
        match std::str::from_utf8(data) {
            Ok(text) => fields.insert("body".into(), text.into()),
            Err(_) => fields.insert(
                "body_base64".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(data)
                    .into(),
            ),
        };
    }
}

#[utoipa::path(
    delete,
    path = "/v1/queues/{queue}/messages/{receipt}",
    tag = "queues",
    summary = "Acknowledge (delete) a received message",
    params(("queue" = String, Path, description = "the queue"), ("receipt" = String, Path, description = "the receipt `receive` gave")),
    responses((status = 204, description = "acknowledged"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn ack(
    State(platform): State<Arc<Platform>>,
    Path((queue, receipt)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    platform.events().ack(&queue, &receipt).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- triggers ----

#[utoipa::path(
    get,
    path = "/v1/triggers",
    tag = "triggers",
    summary = "Every trigger",
    responses((status = 200, description = "the triggers", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn all_triggers(State(platform): State<Arc<Platform>>) -> Response {
    Json(platform.events().triggers(None)).into_response()
}

#[utoipa::path(
    get,
    path = "/v1/functions/{name}/triggers",
    tag = "triggers",
    summary = "A function's triggers",
    params(("name" = String, Path, description = "the function")),
    responses((status = 200, description = "the triggers", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn function_triggers(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    if !platform.catalog().knows(&name) {
        return Err(PlatformError::NotFound(name).into());
    }
    Ok(Json(platform.events().triggers(Some(&name))).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/functions/{name}/triggers",
    tag = "triggers",
    summary = "Attach a trigger (schedule, object, kv or queue)",
    params(("name" = String, Path, description = "the function")),
    request_body(content = Object, content_type = "application/json", description = "`{\"source\": {\"kind\": \"schedule\", \"schedule\": \"*/5 * * * *\"}, \"retry\": {...}, \"alias\": ...}`"),
    responses((status = 201, description = "attached", body = Object), (status = 200, description = "the same trigger was already attached", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn add_trigger(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    spec: Result<Json<TriggerSpec>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(spec) = spec.map_err(|e| {
        ApiError::rejected(
            e.status(),
            format!(
                "{}: send a trigger like {{\"source\": {{\"kind\": \"schedule\", \"schedule\": \
             \"*/5 * * * *\"}}}}; kinds are schedule, object, kv and queue",
                e.body_text()
            ),
        )
    })?;
    crate::auth::check_add_trigger(&principal)?;
    let (trigger, created) = platform.deployments().add_trigger(&name, spec).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(trigger)).into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/triggers/{id}",
    tag = "triggers",
    summary = "Remove a trigger",
    params(("id" = String, Path, description = "the id")),
    responses((status = 204, description = "removed"), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn remove_trigger(
    State(platform): State<Arc<Platform>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{id}` is not a trigger id")))?;
    platform.deployments().remove_trigger(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- dead letters ----

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DlqQuery {
    #[serde(default)]
    after: i64,
    limit: Option<usize>,
    id: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/v1/functions/{name}/dlq",
    tag = "triggers",
    summary = "The function's dead letters",
    params(("name" = String, Path, description = "the function"), DlqQuery),
    responses((status = 200, description = "the dead letters", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn dlq_list(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    dlq: Result<Query<DlqQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let dlq = query(dlq)?;
    let limit = dlq.limit.unwrap_or(100).clamp(1, 10_000);
    let letters = platform
        .events()
        .dead_letters(&name, dlq.after, limit)
        .await?;
    Ok(Json(letters).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/functions/{name}/dlq/{id}",
    tag = "triggers",
    summary = "One dead letter with its body",
    params(("name" = String, Path, description = "the function"), ("id" = String, Path, description = "the id")),
    responses((status = 200, description = "the dead letter", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn dlq_show(
    State(platform): State<Arc<Platform>>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let id = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{id}` is not a dead-letter id")))?;
    let letter: DeadLetter = platform.events().dead_letter(&name, id).await?;
    let mut json = serde_json::to_value(&letter)
        .map_err(|e| PlatformError::Internal(anyhow::anyhow!("cannot encode: {e}")))?;
    add_body(&mut json, letter.data.as_deref().unwrap_or_default());
    Ok(Json(json).into_response())
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Redrive {
    #[serde(default)]
    ids: Option<Vec<i64>>,
}

#[utoipa::path(
    post,
    path = "/v1/functions/{name}/dlq/redrive",
    tag = "triggers",
    summary = "Deliver dead letters again (all, or `{\"ids\": [...]}`)",
    params(("name" = String, Path, description = "the function")),
    request_body(content = Option<Redrive>, content_type = "application/json"),
    responses((status = 200, description = "`{\"redriven\": n}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn dlq_redrive(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let redrive: Redrive = if body.iter().all(u8::is_ascii_whitespace) {
        Redrive::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "{e}: send {{\"ids\": [1, 2]}}, or nothing to redrive every dead letter"
            ))
        })?
    };
    if redrive.ids.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::bad_request(
            "`ids` is empty: list the dead letters to redrive, or send no body to redrive all",
        ));
    }
    let ids = redrive.ids;
    let moved = platform.events().redrive(&name, ids).await?;
    Ok(Json(serde_json::json!({"redriven": moved})).into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/functions/{name}/dlq",
    tag = "triggers",
    summary = "Purge dead letters (all, or `?id=`)",
    params(("name" = String, Path, description = "the function"), DlqQuery),
    responses((status = 200, description = "`{\"purged\": n}`", body = Object), (status = "default", description = "an error: `code` and what to do in `message`", body = ErrorBody))
)]
async fn dlq_purge(
    State(platform): State<Arc<Platform>>,
    Path(name): Path<String>,
    dlq: Result<Query<DlqQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let dlq = query(dlq)?;
    let purged = platform
        .events()
        .purge_dead(&name, dlq.id.map(|id| vec![id]))
        .await?;
    Ok(Json(serde_json::json!({"purged": purged})).into_response())
}
