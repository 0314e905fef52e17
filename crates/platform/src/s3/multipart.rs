//! Multipart uploads: parts are streamed to files of their own under
//! `<data>/s3-uploads/<upload id>/`, recorded in `s3.db`, and on
//! completion streamed in order into one object (so the object's trigger
//! fires once, on completion). Memory holds a few chunks whatever the
//! sizes.

use std::path::PathBuf;

use bytes::Bytes;
use futures::StreamExt as _;
use s3s::dto::{
    AbortMultipartUploadInput, AbortMultipartUploadOutput, CompleteMultipartUploadInput,
    CompleteMultipartUploadOutput, CreateMultipartUploadInput, CreateMultipartUploadOutput,
    ListPartsInput, ListPartsOutput, Part, StreamingBlob, UploadPartInput, UploadPartOutput,
};
use s3s::{S3Error, S3Request, S3Response, S3Result, s3_error};
use tokio::io::AsyncWriteExt as _;
use tokio_util::io::ReaderStream;

use super::meta::{ObjectExtra, PartRow, Upload};
use super::service::{
    DEFAULT_CONTENT_TYPE, MayflyS3, READ_CHUNK, Sums, internal, strong_etag, timestamp,
};
use crate::clock::now_ms;

/// Part numbers S3 allows.
const PARTS: std::ops::RangeInclusive<i32> = 1..=10_000;
/// The smallest part but the last, S3's own minimum: it keeps an upload of
/// a large object to a bounded number of parts, files and rows.
pub(super) const MIN_PART_BYTES: u64 = 5 << 20;
/// Abandoned uploads removed per sweep (the rest wait for the next).
const SWEEP_BATCH: usize = 1000;

fn no_such_upload(id: &str) -> S3Error {
    s3_error!(
        NoSuchUpload,
        "no multipart upload `{id}` in progress: it was completed or aborted, or never created"
    )
}

impl MayflyS3 {
    /// The folder of upload `id`'s parts; ids are ours (32 hex digits), so
    /// anything else is no upload (and never reaches the file system).
    fn upload_dir(&self, id: &str) -> S3Result<PathBuf> {
        if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(self.uploads_dir.join(id))
        } else {
            Err(no_such_upload(id))
        }
    }

    /// Upload `id`, checked to be for `bucket/key`.
    async fn upload(&self, id: &str, bucket: &str, key: &str) -> S3Result<(Upload, PathBuf)> {
        let dir = self.upload_dir(id)?;
        let upload = self
            .meta
            .upload(id)
            .await
            .map_err(internal)?
            .filter(|u| u.bucket == bucket && u.key == key)
            .ok_or_else(|| no_such_upload(id))?;
        Ok((upload, dir))
    }

    pub(super) async fn create_multipart(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = req.input;
        self.require_bucket(&input.bucket).await?;
        crate::validate::check_key(&input.key).map_err(|e| s3_error!(InvalidArgument, "{e}"))?;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let upload = Upload {
            bucket: input.bucket.clone(),
            key: input.key.clone(),
            content_type: input
                .content_type
                .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string()),
            metadata: input.metadata.unwrap_or_default().into_iter().collect(),
        };
        tokio::fs::create_dir_all(self.upload_dir(&id)?)
            .await
            .map_err(|e| internal(e.into()))?;
        self.meta
            .create_upload(&id, &upload, now_ms())
            .await
            .map_err(internal)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(id),
            ..CreateMultipartUploadOutput::default()
        }))
    }

    pub(super) async fn upload_part_to_disk(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let mut sums = Sums::new(&req.headers, req.trailing_headers.clone());
        let input = req.input;
        if !PARTS.contains(&input.part_number) {
            return Err(s3_error!(
                InvalidArgument,
                "part number {} is outside 1 to 10000",
                input.part_number
            ));
        }
        let (_, dir) = self
            .upload(&input.upload_id, &input.bucket, &input.key)
            .await?;
        let max = self.max_object_bytes;
        // Written under a temporary name and renamed: a part sent again
        // replaces the earlier one whole, and a broken one leaves nothing.
        let path = dir.join(input.part_number.to_string());
        let temp = dir.join(format!(
            "{}.{}.tmp",
            input.part_number,
            uuid::Uuid::now_v7().simple()
        ));
        let written = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            let mut body = input.body.unwrap_or_else(|| {
                StreamingBlob::wrap(futures::stream::empty::<Result<Bytes, std::io::Error>>())
            });
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}"))
                })?;
                size += chunk.len() as u64;
                if size > max {
                    return Ok(None);
                }
                sums.update(&chunk);
                file.write_all(&chunk).await?;
            }
            file.sync_all().await?;
            std::io::Result::Ok(Some(size))
        }
        .await;
        let size = match written {
            Ok(Some(size)) => size,
            Ok(None) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(s3_error!(
                    EntityTooLarge,
                    "the part is larger than {max} bytes, the most one object may hold"
                ));
            }
            Err(error) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(s3_error!(
                    IncompleteBody,
                    "the part broke off: {error}; send it again"
                ));
            }
        };
        let hashed = match sums.finish() {
            Ok(hashed) => hashed,
            Err(mismatch) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(s3_error!(BadDigest, "{mismatch}"));
            }
        };
        tokio::fs::rename(&temp, &path)
            .await
            .map_err(|e| internal(e.into()))?;
        let row = PartRow {
            part: input.part_number,
            size,
            etag: hashed.etag,
            checksums: hashed.checksums,
            modified_ms: now_ms(),
        };
        self.meta
            .put_part(&input.upload_id, &row)
            .await
            .map_err(internal)?;
        let mut output = UploadPartOutput {
            e_tag: Some(strong_etag(&row.etag)),
            ..UploadPartOutput::default()
        };
        output.checksum_crc32 = row.checksums.get("crc32").cloned();
        output.checksum_crc32c = row.checksums.get("crc32c").cloned();
        output.checksum_crc64nvme = row.checksums.get("crc64nvme").cloned();
        output.checksum_sha1 = row.checksums.get("sha1").cloned();
        output.checksum_sha256 = row.checksums.get("sha256").cloned();
        Ok(S3Response::new(output))
    }

    pub(super) async fn complete_multipart(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let input = req.input;
        let (upload, dir) = self
            .upload(&input.upload_id, &input.bucket, &input.key)
            .await?;
        let stored: std::collections::BTreeMap<i32, PartRow> = self
            .meta
            .parts(&input.upload_id)
            .await
            .map_err(internal)?
            .into_iter()
            .map(|row| (row.part, row))
            .collect();
        let asked = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default();
        if asked.is_empty() {
            return Err(s3_error!(
                MalformedXML,
                "name the parts to join (at least one) in the CompleteMultipartUpload body"
            ));
        }
        let mut paths = Vec::with_capacity(asked.len());
        let mut md5s = Vec::with_capacity(asked.len() * 16);
        let mut total = 0u64;
        let mut previous = 0;
        for part in &asked {
            let number = part.part_number.unwrap_or(0);
            if number <= previous {
                return Err(s3_error!(
                    InvalidPartOrder,
                    "list the parts in ascending order of part number"
                ));
            }
            previous = number;
            let row = stored
                .get(&number)
                .filter(|row| {
                    part.e_tag
                        .as_ref()
                        .is_none_or(|etag| etag.value() == row.etag.trim_matches('"'))
                })
                .ok_or_else(|| {
                    s3_error!(
                        InvalidPart,
                        "part {number} was not uploaded, or its ETag is not the one given"
                    )
                })?;
            md5s.extend(hex::decode(row.etag.trim_matches('"')).map_err(|e| internal(e.into()))?);
            total += row.size;
            paths.push(dir.join(number.to_string()));
        }
        // Checked once every part is known to exist, so that a wrong list
        // is reported as such first.
        for part in &asked[..asked.len() - 1] {
            let number = part.part_number.unwrap_or(0);
            let size = stored.get(&number).map_or(0, |row| row.size);
            if size < MIN_PART_BYTES {
                return Err(s3_error!(
                    EntityTooSmall,
                    "part {number} is {size} bytes: every part but the last must be at least \
                     {MIN_PART_BYTES} bytes (5 MiB); upload it again larger"
                ));
            }
        }
        if total > self.max_object_bytes {
            return Err(s3_error!(
                EntityTooLarge,
                "the parts add up to {total} bytes, more than the {} one object may hold",
                self.max_object_bytes
            ));
        }
        // The parts, read one after the other, a chunk at a time.
        let joined = futures::stream::unfold(
            (paths.into_iter(), None::<ReaderStream<tokio::fs::File>>),
            |(mut paths, mut current)| async move {
                loop {
                    if let Some(reader) = current.as_mut()
                        && let Some(item) = reader.next().await
                    {
                        return Some((item, (paths, current)));
                    }
                    // The current part is done (or none was open): the next.
                    let path = paths.next()?;
                    current = match tokio::fs::File::open(&path).await {
                        Ok(file) => Some(ReaderStream::with_capacity(file, READ_CHUNK)),
                        Err(error) => return Some((Err(error), (paths, None))),
                    };
                }
            },
        );
        let (stored_object, _) = self
            .store(
                &upload.bucket,
                &upload.key,
                Box::pin(joined),
                upload.content_type.clone(),
                Sums::md5_only(),
            )
            .await?;
        // S3's multipart form: the MD5 of the parts' MD5s, and their count.
        let etag = format!(
            "\"{}-{}\"",
            hex::encode(<s3s::crypto::Md5 as s3s::crypto::Checksum>::checksum(&md5s)),
            asked.len()
        );
        let extra = ObjectExtra {
            etag,
            metadata: upload.metadata.clone(),
            checksums: Default::default(),
        };
        self.meta
            .put_object(
                &upload.bucket,
                &upload.key,
                stored_object.etag.trim_matches('"'),
                &extra,
            )
            .await
            .map_err(internal)?;
        self.forget_upload(&input.upload_id, &dir).await?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(upload.bucket.clone()),
            key: Some(upload.key.clone()),
            e_tag: Some(strong_etag(&extra.etag)),
            location: Some(format!("/{}/{}", upload.bucket, upload.key)),
            ..CompleteMultipartUploadOutput::default()
        }))
    }

    async fn forget_upload(&self, id: &str, dir: &std::path::Path) -> S3Result<bool> {
        let existed = self.meta.delete_upload(id).await.map_err(internal)?;
        match tokio::fs::remove_dir_all(dir).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!("cannot remove {}: {error}", dir.display()),
        }
        Ok(existed)
    }

    /// Removes the uploads created more than `max_age` ago that were
    /// neither completed nor aborted, with their parts; returns how many.
    pub(super) async fn sweep_abandoned(&self, max_age: std::time::Duration) -> usize {
        let age_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        let before = now_ms().saturating_sub(age_ms);
        let ids = match self.meta.uploads_before(before, SWEEP_BATCH).await {
            Ok(ids) => ids,
            Err(error) => {
                tracing::warn!("cannot list abandoned multipart uploads: {error:#}");
                return 0;
            }
        };
        let mut removed = 0;
        for id in ids {
            let Ok(dir) = self.upload_dir(&id) else {
                continue;
            };
            match self.forget_upload(&id, &dir).await {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(error) => tracing::warn!("cannot remove multipart upload {id}: {error}"),
            }
        }
        removed
    }

    pub(super) async fn abort_multipart(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let input = req.input;
        let (_, dir) = self
            .upload(&input.upload_id, &input.bucket, &input.key)
            .await?;
        self.forget_upload(&input.upload_id, &dir).await?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    pub(super) async fn list_upload_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        self.upload(&input.upload_id, &input.bucket, &input.key)
            .await?;
        let marker = input.part_number_marker.unwrap_or(0);
        let max = usize::try_from(input.max_parts.unwrap_or(1000).clamp(1, 1000)).unwrap_or(1000);
        let rows: Vec<PartRow> = self
            .meta
            .parts(&input.upload_id)
            .await
            .map_err(internal)?
            .into_iter()
            .filter(|row| row.part > marker)
            .collect();
        let truncated = rows.len() > max;
        let parts: Vec<Part> = rows
            .into_iter()
            .take(max)
            .map(|row| Part {
                e_tag: Some(strong_etag(&row.etag)),
                last_modified: Some(timestamp(row.modified_ms)),
                part_number: Some(row.part),
                size: Some(i64::try_from(row.size).unwrap_or(i64::MAX)),
                ..Part::default()
            })
            .collect();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            max_parts: i32::try_from(max).ok(),
            is_truncated: Some(truncated),
            next_part_number_marker: if truncated {
                parts.last().and_then(|p| p.part_number)
            } else {
                None
            },
            part_number_marker: input.part_number_marker,
            parts: Some(parts),
            ..ListPartsOutput::default()
        }))
    }
}
