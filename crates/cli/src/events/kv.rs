//! `mayfly kv …`: the node's key-value store.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::buckets::{all_pages, print_deleted, with_prefix};
use crate::body::{read_body, set_body};
use crate::client::{AdminClient, ApiError, check, key_path, read_json, segment};
use crate::output::{Table, text, time};

/// `mayfly kv …`: the node's key-value store.
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Print a key's value.
    Get {
        /// Bucket name.
        bucket: String,
        /// Key (may contain `/`).
        key: String,
    },
    /// Set a key's value, optionally only at a given revision or if absent.
    Set {
        /// Bucket name (created on first use).
        bucket: String,
        /// Key (may contain `/`).
        key: String,
        /// The value.
        #[arg(conflicts_with = "file")]
        value: Option<String>,
        /// Read the value from a file (`-` for stdin).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Only if the key is at this revision (compare-and-swap).
        #[arg(long, value_name = "N", conflicts_with = "if_absent")]
        if_revision: Option<u64>,
        /// Only if the key does not exist yet.
        #[arg(long)]
        if_absent: bool,
    },
    /// Delete a key.
    Delete {
        /// Bucket name.
        bucket: String,
        /// Key.
        key: String,
        /// Only if the key is at this revision.
        #[arg(long, value_name = "N")]
        if_revision: Option<u64>,
    },
    /// List KV buckets, or the keys of one bucket.
    List {
        /// List this bucket's keys (default: list the buckets).
        bucket: Option<String>,
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
    },
}

/// Runs a `mayfly kv` verb.
pub fn run(client: &AdminClient, json: bool, command: KvCommand) -> anyhow::Result<()> {
    match command {
        KvCommand::Get { bucket, key } => kv_get(client, json, &bucket, &key),
        KvCommand::Set {
            bucket,
            key,
            value,
            file,
            if_revision,
            if_absent,
        } => {
            let value = read_body(value, file.as_deref(), "value")?;
            let condition = match (if_revision, if_absent) {
                (Some(revision), _) => Condition::Revision(revision),
                (None, true) => Condition::Absent,
                (None, false) => Condition::None,
            };
            kv_set(client, json, &bucket, &key, &value, condition)
        }
        KvCommand::Delete {
            bucket,
            key,
            if_revision,
        } => kv_delete(client, json, &bucket, &key, if_revision),
        KvCommand::List { bucket, prefix } => match bucket {
            Some(bucket) => kv_list(client, json, &bucket, prefix.as_deref()),
            None => kv_buckets(client, json, prefix.is_some()),
        },
    }
}

/// A compare-and-swap condition on a KV write.
#[derive(Debug, Clone, Copy)]
enum Condition {
    None,
    Revision(u64),
    Absent,
}

fn kv_path(bucket: &str, key: &str) -> String {
    format!("/v1/kv/{}/{}", segment(bucket), key_path(key))
}

fn kv_get(client: &AdminClient, json: bool, bucket: &str, key: &str) -> anyhow::Result<()> {
    let mut response = client.send_checked("GET", &kv_path(bucket, key), &[], None)?;
    let revision = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_revision);
    let bytes = response
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .context("cannot read the value")?;
    if json {
        let mut out = json!({"key": key, "revision": revision});
        set_body(&mut out, "value", &bytes);
        println!("{out}");
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(&bytes)?;
        out.flush()?;
    }
    Ok(())
}

/// The revision in an `ETag: "<revision>"` header.
fn parse_revision(etag: &str) -> Option<u64> {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .ok()
}

fn kv_set(
    client: &AdminClient,
    json: bool,
    bucket: &str,
    key: &str,
    value: &[u8],
    condition: Condition,
) -> anyhow::Result<()> {
    let headers: Vec<(String, String)> = match condition {
        Condition::None => Vec::new(),
        Condition::Revision(revision) => vec![("if-match".to_string(), revision.to_string())],
        Condition::Absent => vec![("if-none-match".to_string(), "*".to_string())],
    };
    let response = client.send_raw("PUT", &kv_path(bucket, key), &headers, Some(value))?;
    if response.status() == 412 {
        let message = match condition {
            Condition::Absent => format!("not set: `{key}` already exists in `{bucket}`"),
            _ => format!(
                "not set: `{key}` in `{bucket}` is not at the revision given to --if-revision; \
                 read it again with `mayfly kv get --json`"
            ),
        };
        return Err(ApiError::from_response(response).saying(message).into());
    }
    let outcome: Value = read_json(response)?;
    if json {
        println!("{outcome}");
    } else {
        println!(
            "set {bucket}/{key} (revision {})",
            text(&outcome["revision"])
        );
    }
    Ok(())
}

fn kv_delete(
    client: &AdminClient,
    json: bool,
    bucket: &str,
    key: &str,
    if_revision: Option<u64>,
) -> anyhow::Result<()> {
    let headers: Vec<(String, String)> = if_revision
        .map(|revision| ("if-match".to_string(), revision.to_string()))
        .into_iter()
        .collect();
    let response = client.send_raw("DELETE", &kv_path(bucket, key), &headers, None)?;
    if response.status() == 412 {
        let message = format!(
            "not deleted: `{key}` in `{bucket}` is not at the revision given to --if-revision"
        );
        return Err(ApiError::from_response(response).saying(message).into());
    }
    check(response)?;
    print_deleted(json, bucket, key)
}

fn kv_buckets(client: &AdminClient, json: bool, prefix_given: bool) -> anyhow::Result<()> {
    if prefix_given {
        bail!(
            "--prefix filters the keys of one bucket: give the bucket, as `mayfly kv list <bucket> --prefix P`"
        );
    }
    let buckets: Vec<Value> = client.get_json("/v1/kv")?;
    if json {
        println!("{}", Value::from(buckets));
        return Ok(());
    }
    if buckets.is_empty() {
        println!("no KV buckets: set a key with `mayfly kv set <bucket> <key> <value>`");
        return Ok(());
    }
    let mut table = Table::new(["BUCKET", "KEYS"]).right(&["KEYS"]);
    for bucket in &buckets {
        table.row([text(&bucket["bucket"]), text(&bucket["keys"])]);
    }
    table.print();
    Ok(())
}

fn kv_list(
    client: &AdminClient,
    json: bool,
    bucket: &str,
    prefix: Option<&str>,
) -> anyhow::Result<()> {
    let path = format!("/v1/kv/{}", segment(bucket));
    let keys = all_pages(client, &path, "keys", prefix)?;
    if json {
        println!("{}", Value::from(keys));
        return Ok(());
    }
    if keys.is_empty() {
        println!("no keys in {bucket}{}", with_prefix(prefix));
        return Ok(());
    }
    let mut table = Table::new(["KEY", "REVISION", "SIZE", "UPDATED"]).right(&["REVISION", "SIZE"]);
    for key in &keys {
        table.row([
            text(&key["key"]),
            text(&key["revision"]),
            text(&key["size"]),
            time(&key["updated_ms"]),
        ]);
    }
    table.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_come_from_etags() {
        assert_eq!(parse_revision("\"42\""), Some(42));
        assert_eq!(parse_revision("W/\"7\""), Some(7));
        assert_eq!(parse_revision("7"), Some(7));
        assert_eq!(parse_revision("\"x\""), None);
    }
}
