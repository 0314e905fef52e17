//! The S3 operations, over the node's object store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures::StreamExt as _;
use mayfly_store::ObjectMeta;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::checksum::ChecksumHasher;
use s3s::crypto::Checksum as _;
use s3s::dto::{
    Bucket, CommonPrefix, CopyObjectInput, CopyObjectOutput, CopyObjectResult, CopySource,
    CreateBucketInput, CreateBucketOutput, DeleteBucketInput, DeleteBucketOutput,
    DeleteObjectInput, DeleteObjectOutput, DeleteObjectsInput, DeleteObjectsOutput, DeletedObject,
    ETag, GetBucketLocationInput, GetBucketLocationOutput, GetObjectInput, GetObjectOutput,
    HeadBucketInput, HeadBucketOutput, HeadObjectInput, HeadObjectOutput, ListBucketsInput,
    ListBucketsOutput, ListObjectsV2Input, ListObjectsV2Output, Object, Owner, PutObjectInput,
    PutObjectOutput, StreamingBlob, Timestamp,
};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::keys;
use super::meta::{ObjectExtra, S3Meta};
use crate::auth::Credential;
use crate::clock::now_ms;
use crate::error::PlatformError;
use crate::platform::Platform;

/// Default largest object: 5 GiB, S3's own limit for one PUT.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 5 << 30;
/// Most keys one listing page returns (S3's own cap).
const MAX_KEYS: usize = 1000;
/// Bytes read from disk at a time when serving an object.
pub(super) const READ_CHUNK: usize = 64 * 1024;
/// The media type of an object uploaded without one.
pub(super) const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";
/// Checksum algorithms S3 clients send, as they name them in headers.
const CHECKSUMS: [&str; 5] = ["crc32", "crc32c", "crc64nvme", "sha1", "sha256"];

/// The S3 service over `platform`'s buckets, with access keys as auth.
pub(super) fn build(
    platform: Arc<Platform>,
    meta: S3Meta,
    max_object_bytes: u64,
    uploads_dir: std::path::PathBuf,
) -> S3Service {
    let mut builder = S3ServiceBuilder::new(MayflyS3 {
        platform: platform.clone(),
        meta,
        max_object_bytes,
        uploads_dir,
    });
    builder.set_auth(KeyAuth {
        platform: platform.clone(),
    });
    builder.set_access(KeyAccess { platform });
    builder.build()
}

// ---- auth ----

/// Finds the secret of an access key, for s3s to check the signature.
struct KeyAuth {
    platform: Arc<Platform>,
}

fn unknown_key() -> S3Error {
    s3_error!(
        InvalidAccessKeyId,
        "the access key id is not one this node issued, or it was revoked: create one with \
         `mayfly token create --s3 --name NAME --bucket BUCKET`"
    )
}

/// A function's S3 key past its expiry: `ExpiredToken`, as S3 answers for
/// expired temporary credentials.
fn expired_key(credential: &Credential) -> S3Error {
    s3_error!(
        ExpiredToken,
        "the S3 key of function `{}` expired {} ms ago (it lives as long as the node's function \
         credentials, `--credential-ttl`): read a fresh one from wasi:config key \
         `mayfly.s3_key`",
        credential.function,
        now_ms().saturating_sub(credential.expires_ms)
    )
}

#[async_trait::async_trait]
impl S3Auth for KeyAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        if crate::auth::is_function_s3_key(access_key) {
            let (credential, secret) = self
                .platform
                .auth()
                .function_s3_key(access_key)
                .ok_or_else(unknown_key)?;
            if credential.expires_ms <= now_ms() {
                return Err(expired_key(&credential));
            }
            return Ok(SecretKey::from(secret.as_str()));
        }
        match keys::lookup(self.platform.secrets(), access_key).await {
            Ok(Some(key)) => Ok(SecretKey::from(key.secret.as_str())),
            Ok(None) => Err(unknown_key()),
            Err(error) => Err(platform_error(error)),
        }
    }
}

/// The buckets the request's key reaches, for operations that name more
/// than the request path's bucket (ListBuckets, CopyObject's source).
#[derive(Clone)]
struct Grant(Arc<Vec<String>>);

/// Lets a signed request through when its key has a grant for the bucket
/// it names.
struct KeyAccess {
    platform: Arc<Platform>,
}

#[async_trait::async_trait]
impl S3Access for KeyAccess {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let Some(access_key) = cx.credentials().map(|c| c.access_key.clone()) else {
            return Err(s3_error!(
                AccessDenied,
                "anonymous requests are refused: sign requests with an S3 access key \
                 (`mayfly token create --s3`)"
            ));
        };
        if crate::auth::is_function_s3_key(&access_key) {
            return self.check_function(cx, &access_key);
        }
        let key = keys::lookup(self.platform.secrets(), &access_key)
            .await
            .map_err(platform_error)?
            .ok_or_else(unknown_key)?;
        if let Some(bucket) = cx.s3_path().get_bucket_name()
            && !key.grants(bucket)
        {
            return Err(s3_error!(
                AccessDenied,
                "access key {access_key} ({}) has no grant for bucket `{bucket}`: create a key \
                 with `--bucket {bucket}`",
                key.name
            ));
        }
        cx.extensions_mut()
            .insert(Grant(Arc::new(key.buckets.clone())));
        Ok(())
    }
}

impl KeyAccess {
    /// A function's S3 key (its signature already checked) reaches the
    /// object buckets its function is granted now, as its credential does.
    fn check_function(&self, cx: &mut S3AccessContext<'_>, access_key: &str) -> S3Result<()> {
        let (claims, _) = self
            .platform
            .auth()
            .function_s3_key(access_key)
            .ok_or_else(unknown_key)?;
        if claims.expires_ms <= now_ms() {
            return Err(expired_key(&claims));
        }
        let credential = self
            .platform
            .credential_now(&claims)
            .map_err(|error| s3_error!(InvalidAccessKeyId, "{error}"))?;
        if let Some(bucket) = cx.s3_path().get_bucket_name()
            && !keys::bucket_granted(&credential.objects, bucket)
        {
            return Err(s3_error!(
                AccessDenied,
                "the S3 key of function `{}` reaches only the object buckets granted to it, \
                 not `{bucket}`: deploy it with `--object-bucket {bucket}`",
                credential.function
            ));
        }
        cx.extensions_mut()
            .insert(Grant(Arc::new(credential.objects)));
        Ok(())
    }
}

fn granted<T>(req: &S3Request<T>, bucket: &str) -> bool {
    req.extensions
        .get::<Grant>()
        .is_some_and(|grant| keys::bucket_granted(&grant.0, bucket))
}

// ---- errors and conversions ----

/// The S3 error for a platform error.
fn platform_error(error: PlatformError) -> S3Error {
    let (code, message) = match error {
        PlatformError::Missing(m) | PlatformError::NotFound(m) => (S3ErrorCode::NoSuchKey, m),
        PlatformError::BadRequest(m) => (S3ErrorCode::InvalidArgument, m),
        PlatformError::TooLarge(m) => (S3ErrorCode::EntityTooLarge, m),
        PlatformError::PreconditionFailed(m) => (S3ErrorCode::PreconditionFailed, m),
        PlatformError::Conflict(m) => (S3ErrorCode::OperationAborted, m),
        PlatformError::InsufficientStorage(m) => {
            let mut error = S3Error::with_message(S3ErrorCode::ServiceUnavailable, m);
            error.set_status_code(http::StatusCode::INSUFFICIENT_STORAGE);
            return error;
        }
        other => {
            tracing::error!("S3 request failed: {other:#}");
            (S3ErrorCode::InternalError, other.to_string())
        }
    };
    S3Error::with_message(code, message)
}

pub(super) fn internal(error: anyhow::Error) -> S3Error {
    tracing::error!("S3 request failed: {error:#}");
    S3Error::with_message(S3ErrorCode::InternalError, format!("{error:#}"))
}

pub(super) fn timestamp(ms: i64) -> Timestamp {
    let ms = u64::try_from(ms).unwrap_or(0);
    Timestamp::from(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// The object's SHA-256 hex, from its Mayfly entity tag.
fn sha256_of(meta: &ObjectMeta) -> &str {
    meta.etag.trim_matches('"')
}

pub(super) fn strong_etag(quoted: &str) -> ETag {
    ETag::Strong(quoted.trim_matches('"').to_string())
}

fn no_such_bucket(bucket: &str) -> S3Error {
    s3_error!(
        NoSuchBucket,
        "no bucket `{bucket}`: create it with `aws s3 mb s3://{bucket}` (or write an object to \
         it)"
    )
}

fn no_such_key(bucket: &str, key: &str) -> S3Error {
    s3_error!(NoSuchKey, "no object `{key}` in bucket `{bucket}`")
}

// ---- hashing uploads ----

/// What is known of an upload's integrity before and after its bytes:
/// the MD5 (the ETag) always, and the checksums the client asked for.
pub(super) struct Sums {
    md5: s3s::crypto::Md5,
    checksums: ChecksumHasher,
    /// Algorithms computed, with the value the client sent up front (a
    /// header) if it did; trailer values are read at the end.
    expected: BTreeMap<&'static str, Option<String>>,
    content_md5: Option<String>,
    trailers: Option<s3s::TrailingHeaders>,
}

/// The outcome of a hashed upload.
#[derive(Default)]
pub(super) struct Hashed {
    pub(super) etag: String,
    pub(super) checksums: BTreeMap<String, String>,
}

impl Sums {
    /// The sums `headers` ask for (`x-amz-checksum-*`,
    /// `x-amz-sdk-checksum-algorithm`, `x-amz-trailer`, `content-md5`).
    pub(super) fn new(headers: &http::HeaderMap, trailers: Option<s3s::TrailingHeaders>) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_string())
        };
        let algorithm = text("x-amz-sdk-checksum-algorithm").map(|a| a.to_ascii_lowercase());
        let trailer = text("x-amz-trailer").map(|t| t.to_ascii_lowercase());
        let mut expected = BTreeMap::new();
        let mut checksums = ChecksumHasher::default();
        for name in CHECKSUMS {
            let header = format!("x-amz-checksum-{name}");
            let sent = text(&header);
            let asked = sent.is_some()
                || algorithm.as_deref() == Some(name)
                || trailer.as_deref() == Some(header.as_str());
            if !asked {
                continue;
            }
            expected.insert(name, sent);
            match name {
                "crc32" => checksums.crc32 = Some(Default::default()),
                "crc32c" => checksums.crc32c = Some(Default::default()),
                "crc64nvme" => checksums.crc64nvme = Some(Default::default()),
                "sha1" => checksums.sha1 = Some(Default::default()),
                _ => checksums.sha256 = Some(Default::default()),
            }
        }
        Self {
            md5: s3s::crypto::Md5::new(),
            checksums,
            expected,
            content_md5: text("content-md5"),
            trailers,
        }
    }

    /// Sums for a copy: the MD5 only.
    pub(super) fn md5_only() -> Self {
        Self::new(&http::HeaderMap::new(), None)
    }

    pub(super) fn update(&mut self, bytes: &[u8]) {
        self.md5.update(bytes);
        self.checksums.update(bytes);
    }

    /// The sums of everything seen, or why they do not match what the
    /// client sent.
    pub(super) fn finish(self) -> Result<Hashed, String> {
        let md5 = self.md5.finalize();
        if let Some(sent) = &self.content_md5
            && *sent != STANDARD.encode(md5)
        {
            return Err(format!(
                "the body's MD5 is not the Content-MD5 sent ({sent}): it was damaged on the way; \
                 send it again"
            ));
        }
        let computed = self.checksums.finalize();
        let mut checksums = BTreeMap::new();
        for (name, sent) in self.expected {
            let value = match name {
                "crc32" => computed.checksum_crc32.clone(),
                "crc32c" => computed.checksum_crc32c.clone(),
                "crc64nvme" => computed.checksum_crc64nvme.clone(),
                "sha1" => computed.checksum_sha1.clone(),
                _ => computed.checksum_sha256.clone(),
            }
            .unwrap_or_default();
            let header = format!("x-amz-checksum-{name}");
            let sent = sent.or_else(|| {
                self.trailers.as_ref().and_then(|trailers| {
                    trailers
                        .read(|h| {
                            h.get(&header)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        })
                        .flatten()
                })
            });
            if let Some(sent) = sent
                && sent.trim() != value
            {
                return Err(format!(
                    "the body's {name} checksum is {value}, not the {sent} sent: it was damaged \
                     on the way; send it again"
                ));
            }
            checksums.insert(name.to_string(), value);
        }
        Ok(Hashed {
            etag: format!("\"{}\"", hex::encode(md5)),
            checksums,
        })
    }
}

/// The checksum fields of an S3 output, from stored checksums.
macro_rules! set_checksums {
    ($output:expr, $checksums:expr) => {{
        let checksums = $checksums;
        $output.checksum_crc32 = checksums.get("crc32").cloned();
        $output.checksum_crc32c = checksums.get("crc32c").cloned();
        $output.checksum_crc64nvme = checksums.get("crc64nvme").cloned();
        $output.checksum_sha1 = checksums.get("sha1").cloned();
        $output.checksum_sha256 = checksums.get("sha256").cloned();
    }};
}

// ---- the service ----

pub(super) struct MayflyS3 {
    pub(super) platform: Arc<Platform>,
    pub(super) meta: S3Meta,
    pub(super) max_object_bytes: u64,
    /// Where multipart uploads keep their parts until completed.
    pub(super) uploads_dir: std::path::PathBuf,
}

impl MayflyS3 {
    /// Whether `bucket` exists: created through S3, or holding objects.
    async fn bucket_exists(&self, bucket: &str) -> S3Result<bool> {
        if self
            .meta
            .bucket_created(bucket)
            .await
            .map_err(internal)?
            .is_some()
        {
            return Ok(true);
        }
        let any = self
            .platform
            .events()
            .object_list(bucket, String::new(), String::new(), 1)
            .await
            .map_err(platform_error)?;
        Ok(!any.is_empty())
    }

    pub(super) async fn require_bucket(&self, bucket: &str) -> S3Result<()> {
        if self.bucket_exists(bucket).await? {
            Ok(())
        } else {
            Err(no_such_bucket(bucket))
        }
    }

    /// An object's metadata, file and S3 facts.
    async fn object(
        &self,
        bucket: &str,
        key: &str,
    ) -> S3Result<(ObjectMeta, std::path::PathBuf, ObjectExtra)> {
        let (meta, path) = match self.platform.events().object_get(bucket, key).await {
            Ok(found) => found,
            Err(PlatformError::Missing(_)) => {
                return Err(if self.bucket_exists(bucket).await? {
                    no_such_key(bucket, key)
                } else {
                    no_such_bucket(bucket)
                });
            }
            Err(error) => return Err(platform_error(error)),
        };
        let extra = self
            .meta
            .object(bucket, key, sha256_of(&meta))
            .await
            .map_err(internal)?
            .unwrap_or_else(|| ObjectExtra {
                // Written another way (REST API, a function): its SHA-256
                // stands in for the MD5, which was never computed.
                etag: meta.etag.clone(),
                ..ObjectExtra::default()
            });
        Ok((meta, path, extra))
    }

    /// Streams `body` into `bucket/key`, hashing it on the way; nothing is
    /// stored if the sums do not match what the client sent.
    pub(super) async fn store<S, E>(
        &self,
        bucket: &str,
        key: &str,
        body: S,
        content_type: String,
        sums: Sums,
    ) -> S3Result<(ObjectMeta, Hashed)>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display,
    {
        /// Set once the body ends: its sums, or why they do not match.
        type Outcome = Arc<Mutex<Option<Result<Hashed, String>>>>;
        let outcome: Outcome = Arc::default();
        let slot = outcome.clone();
        let hashed = futures::stream::unfold(
            (body, Some(sums), slot),
            |(mut body, mut sums, slot)| async move {
                let current = sums.as_mut()?;
                match body.next().await {
                    Some(Ok(chunk)) => {
                        current.update(&chunk);
                        Some((Ok(chunk), (body, sums, slot)))
                    }
                    Some(Err(error)) => Some((Err(error.to_string()), (body, None, slot))),
                    None => {
                        let finished = sums.take()?.finish();
                        let failed = finished.as_ref().err().cloned();
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(finished);
                        // An error as the last item makes the store drop
                        // the staged bytes: a damaged body is never stored.
                        failed.map(|message| (Err(message), (body, None, slot)))
                    }
                }
            },
        );
        let stored = self
            .platform
            .events()
            .object_put_stream(
                bucket,
                key,
                Box::pin(hashed),
                self.max_object_bytes,
                content_type,
            )
            .await;
        let finished = outcome.lock().unwrap_or_else(|p| p.into_inner()).take();
        let meta = match (stored, finished) {
            (Err(_), Some(Err(mismatch))) => return Err(s3_error!(BadDigest, "{mismatch}")),
            (Err(error), _) => return Err(platform_error(error)),
            (Ok(meta), Some(Ok(hashed))) => return Ok((meta, hashed)),
            (Ok(meta), _) => meta,
        };
        Err(internal(anyhow::anyhow!(
            "object {}/{} was stored but its sums were not computed",
            meta.bucket,
            meta.key
        )))
    }
}

/// Percent-encodes a key for listings asked with `encoding-type=url`.
fn url_encode(text: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    percent_encoding::utf8_percent_encode(text, KEEP).to_string()
}

/// The character that sorts after every other: `p + LAST` is after every
/// key starting with `p` (keys are compared as UTF-8 bytes).
const LAST: char = '\u{10FFFF}';

#[async_trait::async_trait]
impl S3 for MayflyS3 {
    async fn create_multipart_upload(
        &self,
        req: S3Request<s3s::dto::CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<s3s::dto::CreateMultipartUploadOutput>> {
        self.create_multipart(req).await
    }

    async fn upload_part(
        &self,
        req: S3Request<s3s::dto::UploadPartInput>,
    ) -> S3Result<S3Response<s3s::dto::UploadPartOutput>> {
        self.upload_part_to_disk(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<s3s::dto::CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<s3s::dto::CompleteMultipartUploadOutput>> {
        self.complete_multipart(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<s3s::dto::AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<s3s::dto::AbortMultipartUploadOutput>> {
        self.abort_multipart(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<s3s::dto::ListPartsInput>,
    ) -> S3Result<S3Response<s3s::dto::ListPartsOutput>> {
        self.list_upload_parts(req).await
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let mut buckets: BTreeMap<String, i64> = self
            .meta
            .buckets()
            .await
            .map_err(internal)?
            .into_iter()
            .collect();
        for stats in self
            .platform
            .events()
            .object_buckets()
            .await
            .map_err(platform_error)?
        {
            buckets.entry(stats.bucket).or_insert(0);
        }
        let prefix = req.input.prefix.clone().unwrap_or_default();
        let list = buckets
            .into_iter()
            .filter(|(name, _)| name.starts_with(&prefix) && granted(&req, name))
            .map(|(name, created)| Bucket {
                name: Some(name),
                creation_date: Some(timestamp(created)),
                ..Bucket::default()
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(list),
            owner: Some(Owner {
                display_name: Some("mayfly".into()),
                id: Some("mayfly".into()),
            }),
            ..ListBucketsOutput::default()
        }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let bucket = &req.input.bucket;
        crate::validate::check_name("bucket", bucket)
            .map_err(|e| S3Error::with_message(S3ErrorCode::InvalidBucketName, e.to_string()))?;
        if self.bucket_exists(bucket).await?
            || !self
                .meta
                .create_bucket(bucket, now_ms())
                .await
                .map_err(internal)?
        {
            return Err(s3_error!(
                BucketAlreadyOwnedByYou,
                "bucket `{bucket}` exists already"
            ));
        }
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{bucket}")),
        }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let bucket = &req.input.bucket;
        let any = self
            .platform
            .events()
            .object_list(bucket, String::new(), String::new(), 1)
            .await
            .map_err(platform_error)?;
        if !any.is_empty() {
            return Err(s3_error!(
                BucketNotEmpty,
                "bucket `{bucket}` holds objects: delete them first (`aws s3 rm --recursive \
                 s3://{bucket}`)"
            ));
        }
        if !self.meta.delete_bucket(bucket).await.map_err(internal)? {
            return Err(no_such_bucket(bucket));
        }
        Ok(S3Response::new(DeleteBucketOutput::default()))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.require_bucket(&req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.require_bucket(&req.input.bucket).await?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let bucket = input.bucket.clone();
        self.require_bucket(&bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let max_keys = input
            .max_keys
            .map_or(MAX_KEYS, |m| usize::try_from(m).unwrap_or(0).min(MAX_KEYS));
        // The continuation token is the key to list after, base64: opaque
        // to clients, and stateless here.
        let mut after = match &input.continuation_token {
            Some(token) => STANDARD
                .decode(token)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| {
                    s3_error!(
                        InvalidArgument,
                        "the continuation token is not one this endpoint gave: start the \
                         listing again without it"
                    )
                })?,
            None => input.start_after.clone().unwrap_or_default(),
        };
        let mut contents = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        let mut truncated = false;
        // The key (or common prefix + LAST) after the last entry returned.
        let mut last_after = after.clone();
        'pages: loop {
            let page = self
                .platform
                .events()
                .object_list(&bucket, prefix.clone(), after.clone(), MAX_KEYS)
                .await
                .map_err(platform_error)?;
            let full = page.len() == MAX_KEYS;
            for object in page {
                after.clone_from(&object.key);
                if contents.len() + prefixes.len() == max_keys {
                    truncated = true;
                    break 'pages;
                }
                let rest = &object.key[prefix.len()..];
                if let Some(delimiter) = &delimiter
                    && let Some(at) = rest.find(delimiter.as_str())
                {
                    let common = format!("{prefix}{}", &rest[..at + delimiter.len()]);
                    // Everything under it is skipped in one step.
                    after = format!("{common}{LAST}");
                    last_after.clone_from(&after);
                    prefixes.push(common);
                    continue 'pages;
                }
                last_after.clone_from(&object.key);
                contents.push(object);
            }
            if !full {
                break;
            }
        }
        let sha256s = contents
            .iter()
            .map(|o| (o.key.clone(), sha256_of(o).to_string()))
            .collect();
        let etags = self.meta.etags(&bucket, sha256s).await.map_err(internal)?;
        let encode = input
            .encoding_type
            .as_ref()
            .is_some_and(|e| e.as_str() == "url");
        let shown = |text: &str| {
            if encode {
                url_encode(text)
            } else {
                text.to_string()
            }
        };
        let key_count = contents.len() + prefixes.len();
        let objects = contents
            .into_iter()
            .map(|object| Object {
                e_tag: Some(strong_etag(etags.get(&object.key).unwrap_or(&object.etag))),
                key: Some(shown(&object.key)),
                last_modified: Some(timestamp(object.modified_ms)),
                size: Some(i64::try_from(object.size).unwrap_or(i64::MAX)),
                storage_class: Some(s3s::dto::ObjectStorageClass::from_static(
                    s3s::dto::ObjectStorageClass::STANDARD,
                )),
                ..Object::default()
            })
            .collect();
        let common_prefixes = prefixes
            .into_iter()
            .map(|p| CommonPrefix {
                prefix: Some(shown(&p)),
            })
            .collect();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(bucket),
            prefix: Some(shown(&prefix)),
            delimiter: delimiter.as_deref().map(shown),
            max_keys: Some(i32::try_from(max_keys).unwrap_or(i32::MAX)),
            key_count: Some(i32::try_from(key_count).unwrap_or(i32::MAX)),
            continuation_token: input.continuation_token,
            start_after: input.start_after.as_deref().map(shown),
            is_truncated: Some(truncated),
            next_continuation_token: truncated.then(|| STANDARD.encode(&last_after)),
            contents: Some(objects),
            common_prefixes: Some(common_prefixes),
            encoding_type: input.encoding_type,
            ..ListObjectsV2Output::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let sums = Sums::new(&req.headers, req.trailing_headers.clone());
        let input = req.input;
        let (bucket, key) = (input.bucket, input.key);
        self.require_bucket(&bucket).await?;
        if input
            .content_length
            .is_some_and(|length| u64::try_from(length).unwrap_or(0) > self.max_object_bytes)
        {
            return Err(s3_error!(
                EntityTooLarge,
                "the object is larger than {} bytes, the most this endpoint stores \
                 (`--s3-max-object-size`)",
                self.max_object_bytes
            ));
        }
        let content_type = input
            .content_type
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string());
        let body = match input.body {
            Some(body) => body,
            None => StreamingBlob::wrap(futures::stream::empty::<Result<Bytes, std::io::Error>>()),
        };
        let (stored, hashed) = self.store(&bucket, &key, body, content_type, sums).await?;
        let extra = ObjectExtra {
            etag: hashed.etag,
            metadata: input.metadata.unwrap_or_default().into_iter().collect(),
            checksums: hashed.checksums,
        };
        self.meta
            .put_object(&bucket, &key, sha256_of(&stored), &extra)
            .await
            .map_err(internal)?;
        let mut output = PutObjectOutput {
            e_tag: Some(strong_etag(&extra.etag)),
            ..PutObjectOutput::default()
        };
        set_checksums!(output, &extra.checksums);
        Ok(S3Response::new(output))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let (meta, path, extra) = self.object(&input.bucket, &input.key).await?;
        let range = match &input.range {
            Some(range) => Some(range.check(meta.size)?),
            None => None,
        };
        let (start, end) = range
            .as_ref()
            .map_or((0, meta.size), |range| (range.start, range.end));
        // A delete racing this open removed the file: the object is gone.
        // Once open, the file stays readable whatever happens to its name.
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| no_such_key(&input.bucket, &input.key))?;
        if start > 0 {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| internal(e.into()))?;
        }
        // Streamed a chunk at a time: memory stays flat however large the
        // object and however slow the reader.
        let body = tokio_util::io::ReaderStream::with_capacity(file.take(end - start), READ_CHUNK);
        let mut output = GetObjectOutput {
            body: Some(StreamingBlob::wrap(body)),
            accept_ranges: Some("bytes".into()),
            content_length: Some(i64::try_from(end - start).unwrap_or(i64::MAX)),
            content_range: range.as_ref().map(|r| {
                format!(
                    "bytes {}-{}/{}",
                    r.start,
                    r.end.saturating_sub(1),
                    meta.size
                )
            }),
            content_type: Some(meta.content_type.clone()),
            e_tag: Some(strong_etag(&extra.etag)),
            last_modified: Some(timestamp(meta.modified_ms)),
            metadata: (!extra.metadata.is_empty())
                .then(|| extra.metadata.clone().into_iter().collect()),
            ..GetObjectOutput::default()
        };
        let whole = range.is_none();
        let asked = input
            .checksum_mode
            .as_ref()
            .is_some_and(|m| m.as_str() == s3s::dto::ChecksumMode::ENABLED);
        if whole && asked {
            set_checksums!(output, &extra.checksums);
        }
        Ok(S3Response::new(output))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let input = req.input;
        let (meta, _, extra) = self.object(&input.bucket, &input.key).await?;
        let mut output = HeadObjectOutput {
            accept_ranges: Some("bytes".into()),
            content_length: Some(i64::try_from(meta.size).unwrap_or(i64::MAX)),
            content_type: Some(meta.content_type.clone()),
            e_tag: Some(strong_etag(&extra.etag)),
            last_modified: Some(timestamp(meta.modified_ms)),
            metadata: (!extra.metadata.is_empty())
                .then(|| extra.metadata.clone().into_iter().collect()),
            ..HeadObjectOutput::default()
        };
        if input
            .checksum_mode
            .as_ref()
            .is_some_and(|m| m.as_str() == s3s::dto::ChecksumMode::ENABLED)
        {
            set_checksums!(output, &extra.checksums);
        }
        Ok(S3Response::new(output))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let (bucket, key) = (&req.input.bucket, &req.input.key);
        self.require_bucket(bucket).await?;
        self.delete(bucket, key).await?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        self.require_bucket(&input.bucket).await?;
        let quiet = input.delete.quiet.unwrap_or(false);
        let (mut deleted, mut errors) = (Vec::new(), Vec::new());
        for object in input.delete.objects {
            match self.delete(&input.bucket, &object.key).await {
                Ok(()) if quiet => {}
                Ok(()) => deleted.push(DeletedObject {
                    key: Some(object.key),
                    ..DeletedObject::default()
                }),
                Err(error) => errors.push(s3s::dto::Error {
                    code: Some(error.code().as_str().to_string()),
                    key: Some(object.key),
                    message: error.message().map(str::to_string),
                    version_id: None,
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..DeleteObjectsOutput::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let CopySource::Bucket {
            bucket: source_bucket,
            key: source_key,
            ..
        } = &req.input.copy_source
        else {
            return Err(s3_error!(
                NotImplemented,
                "copy from an access point is not supported: name the source as BUCKET/KEY"
            ));
        };
        if !granted(&req, source_bucket) {
            return Err(s3_error!(
                AccessDenied,
                "the access key has no grant for the source bucket `{source_bucket}`"
            ));
        }
        let input = &req.input;
        self.require_bucket(&input.bucket).await?;
        let (meta, path, extra) = self.object(source_bucket, source_key).await?;
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == s3s::dto::MetadataDirective::REPLACE);
        let (content_type, metadata) = if replace {
            (
                input
                    .content_type
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string()),
                input
                    .metadata
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            )
        } else {
            (meta.content_type.clone(), extra.metadata.clone())
        };
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| no_such_key(source_bucket, source_key))?;
        let body = tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK);
        let (stored, hashed) = self
            .store(
                &input.bucket,
                &input.key,
                body,
                content_type,
                Sums::md5_only(),
            )
            .await?;
        let copied = ObjectExtra {
            etag: hashed.etag,
            metadata,
            checksums: extra.checksums,
        };
        self.meta
            .put_object(&input.bucket, &input.key, sha256_of(&stored), &copied)
            .await
            .map_err(internal)?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(strong_etag(&copied.etag)),
                last_modified: Some(timestamp(stored.modified_ms)),
                ..CopyObjectResult::default()
            }),
            ..CopyObjectOutput::default()
        }))
    }
}

impl MayflyS3 {
    /// Deletes an object; deleting one that is not there succeeds, as in S3.
    async fn delete(&self, bucket: &str, key: &str) -> S3Result<()> {
        match self.platform.events().object_delete(bucket, key).await {
            Ok(()) | Err(PlatformError::Missing(_)) => {}
            Err(error) => return Err(platform_error(error)),
        }
        self.meta.delete_object(bucket, key).await.map_err(internal)
    }
}
