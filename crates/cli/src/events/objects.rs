//! `mayfly object …`: the node's object store.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::{Value, json};
use ureq::http::Response;

use super::buckets::{all_pages, print_deleted, with_prefix};
use crate::body::{read_file, set_body};
use crate::client::{AdminClient, ApiError, check, key_path, segment};
use crate::output::{Table, print_fields, text, time};

/// `mayfly object …`: the node's object store.
#[derive(Debug, Subcommand)]
pub enum ObjectCommand {
    /// Store an object, replacing any under the same key.
    Put {
        /// Bucket name (created on first use).
        bucket: String,
        /// Object key (may contain `/`).
        key: String,
        /// The object's bytes: a file, or `-` for stdin.
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
        /// Content type stored with the object (default application/octet-stream).
        #[arg(long, value_name = "TYPE")]
        content_type: Option<String>,
    },
    /// Print an object's bytes (or write them to a file).
    Get {
        /// Bucket name.
        bucket: String,
        /// Object key.
        key: String,
        /// Write the bytes to this file instead of stdout.
        #[arg(long, short = 'o', value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// Show an object's size, content type and etag.
    Head {
        /// Bucket name.
        bucket: String,
        /// Object key.
        key: String,
    },
    /// Delete an object.
    Delete {
        /// Bucket name.
        bucket: String,
        /// Object key.
        key: String,
    },
    /// List buckets, or the objects of one bucket.
    List {
        /// List this bucket's objects (default: list the buckets).
        bucket: Option<String>,
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
    },
}

/// Runs a `mayfly object` verb.
pub fn run(client: &AdminClient, json: bool, command: ObjectCommand) -> anyhow::Result<()> {
    match command {
        ObjectCommand::Put {
            bucket,
            key,
            file,
            content_type,
        } => object_put(client, json, &bucket, &key, &file, content_type),
        ObjectCommand::Get {
            bucket,
            key,
            output,
        } => object_get(client, json, &bucket, &key, output.as_deref()),
        ObjectCommand::Head { bucket, key } => object_head(client, json, &bucket, &key),
        ObjectCommand::Delete { bucket, key } => {
            client.delete(&object_path(&bucket, &key))?;
            print_deleted(json, &bucket, &key)
        }
        ObjectCommand::List { bucket, prefix } => match bucket {
            Some(bucket) => object_list(client, json, &bucket, prefix.as_deref()),
            None => bucket_list(client, json, prefix.is_some()),
        },
    }
}

fn object_path(bucket: &str, key: &str) -> String {
    format!("/v1/buckets/{}/objects/{}", segment(bucket), key_path(key))
}

fn object_put(
    client: &AdminClient,
    json: bool,
    bucket: &str,
    key: &str,
    file: &Path,
    content_type: Option<String>,
) -> anyhow::Result<()> {
    let body = read_file(file)?;
    let headers: Vec<_> = content_type
        .map(|t| ("content-type".to_string(), t))
        .into_iter()
        .collect();
    let meta: Value = client.send_json("PUT", &object_path(bucket, key), &headers, Some(&body))?;
    if json {
        println!("{meta}");
    } else {
        println!(
            "stored {bucket}/{key} ({} bytes, {}, etag {})",
            text(&meta["size"]),
            text(&meta["content_type"]),
            text(&meta["etag"])
        );
    }
    Ok(())
}

fn object_get(
    client: &AdminClient,
    json: bool,
    bucket: &str,
    key: &str,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let response = client.send_checked("GET", &object_path(bucket, key), &[], None)?;
    let mut meta = header_meta(bucket, key, &response);
    let mut reader = response.into_body().into_reader();
    match output {
        Some(path) => {
            let mut file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let written = std::io::copy(&mut reader, &mut file)
                .with_context(|| format!("cannot write {}", path.display()))?;
            if json {
                meta["output"] = Value::from(path.display().to_string());
                println!("{meta}");
            } else {
                println!(
                    "wrote {written} bytes of {bucket}/{key} to {}",
                    path.display()
                );
            }
        }
        None if json => {
            let mut bytes = Vec::new();
            reader
                .read_to_end(&mut bytes)
                .context("cannot read the object")?;
            set_body(&mut meta, "body", &bytes);
            println!("{meta}");
        }
        None => {
            let mut out = std::io::stdout().lock();
            std::io::copy(&mut reader, &mut out).context("cannot copy the object to stdout")?;
            out.flush()?;
        }
    }
    Ok(())
}

fn object_head(client: &AdminClient, json: bool, bucket: &str, key: &str) -> anyhow::Result<()> {
    let response = client.send_raw("HEAD", &object_path(bucket, key), &[], None)?;
    if response.status() == 404 {
        let message = format!("no object `{key}` in bucket `{bucket}`");
        return Err(ApiError::from_response(response).saying(message).into());
    }
    let response = check(response)?;
    let meta = header_meta(bucket, key, &response);
    if json {
        println!("{meta}");
    } else {
        print_fields(&meta);
    }
    Ok(())
}

/// An object's metadata from the headers of a GET or HEAD answer.
fn header_meta(bucket: &str, key: &str, response: &Response<ureq::Body>) -> Value {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    json!({
        "bucket": bucket,
        "key": key,
        "size": header("content-length").and_then(|v| v.parse::<u64>().ok()),
        "etag": header("etag"),
        "content_type": header("content-type"),
    })
}

fn bucket_list(client: &AdminClient, json: bool, prefix_given: bool) -> anyhow::Result<()> {
    if prefix_given {
        bail!(
            "--prefix filters the keys of one bucket: give the bucket, as `mayfly object list <bucket> --prefix P`"
        );
    }
    let buckets: Vec<Value> = client.get_json("/v1/buckets")?;
    if json {
        println!("{}", Value::from(buckets));
        return Ok(());
    }
    if buckets.is_empty() {
        println!("no buckets: store an object with `mayfly object put <bucket> <key> --file PATH`");
        return Ok(());
    }
    let mut table = Table::new(["BUCKET", "OBJECTS", "BYTES"]).right(&["OBJECTS", "BYTES"]);
    for bucket in &buckets {
        table.row([
            text(&bucket["bucket"]),
            text(&bucket["objects"]),
            text(&bucket["bytes"]),
        ]);
    }
    table.print();
    Ok(())
}

fn object_list(
    client: &AdminClient,
    json: bool,
    bucket: &str,
    prefix: Option<&str>,
) -> anyhow::Result<()> {
    let path = format!("/v1/buckets/{}/objects", segment(bucket));
    let objects = all_pages(client, &path, "objects", prefix)?;
    if json {
        println!("{}", Value::from(objects));
        return Ok(());
    }
    if objects.is_empty() {
        println!("no objects in {bucket}{}", with_prefix(prefix));
        return Ok(());
    }
    let mut table = Table::new(["KEY", "SIZE", "MODIFIED", "CONTENT-TYPE"]).right(&["SIZE"]);
    for object in &objects {
        table.row([
            text(&object["key"]),
            text(&object["size"]),
            time(&object["modified_ms"]),
            text(&object["content_type"]),
        ]);
    }
    table.print();
    Ok(())
}
