//! An S3-compatible endpoint over Mayfly's object buckets.
//!
//! The S3 REST protocol (routing, XML, SigV4 headers and presigned URLs,
//! aws-chunked bodies) is the `s3s` crate's; this module maps its
//! operations onto the node's object store ([`crate::events::EventHub`]),
//! so an S3 write is an ordinary object write: streamed to disk, stored
//! content-addressed, and firing the bucket's object triggers once. What S3
//! needs beyond that (empty buckets, MD5 ETags, user metadata, checksums)
//! lives in `s3.db` ([`meta`]); who may call is decided by S3 access keys
//! ([`keys`]), each limited to named buckets, or by a function's
//! per-invocation S3 key (wasi:config `mayfly.s3_key`, see
//! [`crate::auth`]), limited to its granted object buckets and as
//! short-lived as its credential, so a function can hand out presigned URLs.
//! Multipart uploads abandoned past an age are removed with their parts.
//!
//! It listens on its own address (`mayfly serve --s3-listen`), like the
//! admin API plain HTTP only on loopback unless TLS or `--insecure` is given.

pub mod keys;
mod meta;
mod multipart;
mod service;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::connections::{self, ConnectionLimits};
use crate::platform::Platform;

pub use service::DEFAULT_MAX_OBJECT_BYTES;

/// How the S3 endpoint is served.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// The node's data directory (`s3.db` lives there).
    pub data_dir: std::path::PathBuf,
    /// The largest object one PutObject (or a completed multipart upload)
    /// may store.
    pub max_object_bytes: u64,
    /// How old a multipart upload that was neither completed nor aborted
    /// may grow before it is removed with its parts.
    pub upload_max_age: Duration,
}

/// Default age past which an abandoned multipart upload is removed: a
/// week, time enough to resume an interrupted upload of any size.
pub const DEFAULT_UPLOAD_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The S3 listener's connection limits: an upload of several GB takes
/// minutes, so a request body may take an hour (the other listeners allow a
/// minute); the header and idle timeouts are the admin API's.
fn limits() -> ConnectionLimits {
    ConnectionLimits {
        body_timeout: Duration::from_secs(3600),
        max_connections: 1024,
        ..ConnectionLimits::admin()
    }
}

/// Serves S3 on `listener` until `shutdown`, over TLS when `tls` is given.
pub(crate) fn serve(
    platform: Arc<Platform>,
    data_dir: &std::path::Path,
    listener: TcpListener,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    max_object_bytes: u64,
    upload_max_age: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()> + use<>> {
    let meta = meta::S3Meta::open(data_dir)?;
    let sweeper = service::MayflyS3 {
        platform: platform.clone(),
        meta: meta.clone(),
        max_object_bytes,
        uploads_dir: data_dir.join("s3-uploads"),
    };
    tokio::spawn(sweep_abandoned_uploads(
        sweeper,
        upload_max_age,
        shutdown.clone(),
    ));
    let s3 = service::build(
        platform,
        meta,
        max_object_bytes,
        data_dir.join("s3-uploads"),
    );
    let service = CloseAfterUnsentContinue(TowerToHyperService::new(s3));
    Ok(async move {
        let name = "S3 endpoint";
        match tls {
            Some(tls) => {
                let tls = crate::tls::Tls::new(tls);
                connections::serve(name, listener, limits(), tls, service, shutdown, None).await;
            }
            None => {
                let plain = connections::Plain;
                connections::serve(name, listener, limits(), plain, service, shutdown, None).await;
            }
        }
    })
}

/// Removes abandoned multipart uploads until `shutdown`, checking a few
/// times per `max_age` (at most hourly, at least every second), so an
/// upload goes at most a quarter of its age late.
async fn sweep_abandoned_uploads(
    s3: service::MayflyS3,
    max_age: Duration,
    shutdown: CancellationToken,
) {
    let every = (max_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let removed = s3.sweep_abandoned(max_age).await;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed multipart uploads abandoned for over {}",
                humantime::format_duration(max_age)
            );
        }
    }
}

/// Closes the connection after answering a request that asked for
/// `100 Continue` and was answered without one: an empty body (hyper sends
/// the interim answer only when a body is read) or a refusal. The AWS CLI
/// (botocore) keeps the final status it got in place of the 100 as the
/// status of every later answer on that connection, so its next request
/// there would hang until its read timeout (measured: `aws s3 sync` of a
/// folder holding an empty file stalled 60 s). S3 itself always sends the
/// 100; a new connection is the cheap way to the same effect.
#[derive(Clone)]
struct CloseAfterUnsentContinue<S>(S);

impl<S, B, R> hyper::service::Service<http::Request<B>> for CloseAfterUnsentContinue<S>
where
    S: hyper::service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn call(&self, request: http::Request<B>) -> Self::Future {
        let headers = request.headers();
        let expects = headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let empty = headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
        let answer = self.0.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if expects && (empty || !response.status().is_success()) {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok(response)
        })
    }
}
