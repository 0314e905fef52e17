//! The event verbs: the object, KV and queue stores, event triggers,
//! dead-letter queues and asynchronous invocation; and the compact
//! `--trigger` specs of `mayfly deploy`.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::{Value, json};
use ureq::http::Response;

use crate::client::{AdminClient, check, read_json};
use crate::commands::{format_time, percent_encode, segment};

/// Items asked for per page when listing objects, keys and dead letters.
const PAGE: usize = 1000;

/// Longest last error shown in the dead-letter table.
const ERROR_COLUMN: usize = 60;

/// The valid `--trigger` forms, for error messages.
const TRIGGER_FORMS: &str =
    "schedule:<expr>, object:<bucket>[/<prefix>], kv:<bucket>[/<prefix>] or queue:<name>";

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

/// `mayfly queue …`: the node's durable queues.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Send a message.
    Send {
        /// Queue name (created on first use).
        queue: String,
        /// The message body.
        #[arg(conflicts_with = "file")]
        body: Option<String>,
        /// Read the body from a file (`-` for stdin).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Content type stored with the message.
        #[arg(long, value_name = "TYPE")]
        content_type: Option<String>,
    },
    /// Receive messages; they stay invisible for the visibility timeout and
    /// come back unless acknowledged with `mayfly queue ack`.
    Receive {
        /// Queue name.
        queue: String,
        /// Most messages to receive (node default 10).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max: Option<u32>,
        /// How long received messages stay invisible, e.g. 30s (node default 30s).
        #[arg(long, value_name = "DURATION", value_parser = duration_text)]
        visibility: Option<String>,
    },
    /// Acknowledge (delete) a received message by its receipt.
    Ack {
        /// Queue name.
        queue: String,
        /// The receipt printed by `mayfly queue receive`.
        receipt: String,
    },
    /// List queues with their waiting and in-flight messages.
    List,
}

/// `mayfly trigger …`: event sources that invoke functions.
#[derive(Debug, Subcommand)]
pub enum TriggerCommand {
    /// Attach a trigger to a function.
    Add(Box<TriggerAddArgs>),
    /// List triggers (of one function, or all).
    List {
        /// Only this function's triggers.
        function: Option<String>,
    },
    /// Remove a trigger by id.
    Remove {
        /// Trigger id (see `mayfly trigger list`).
        id: String,
    },
}

/// `mayfly trigger add`: exactly one source and its options.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["schedule", "object", "kv", "queue"])))]
pub struct TriggerAddArgs {
    /// Function to invoke.
    function: String,
    /// Run on a schedule: a 5-field cron expression (`*/5 * * * *`) or `@every 30s`.
    #[arg(long, value_name = "EXPR")]
    schedule: Option<String>,
    /// Run when objects of this bucket are created or deleted.
    #[arg(long, value_name = "BUCKET")]
    object: Option<String>,
    /// Run when keys of this KV bucket are set or deleted.
    #[arg(long, value_name = "BUCKET")]
    kv: Option<String>,
    /// Run for the messages of this queue.
    #[arg(long, value_name = "NAME")]
    queue: Option<String>,
    /// Only keys starting with this (object and kv triggers).
    #[arg(long)]
    prefix: Option<String>,
    /// Only keys ending with this (object triggers).
    #[arg(long)]
    suffix: Option<String>,
    /// Object events to run on (default both).
    #[arg(long, value_delimiter = ',', value_name = "EVENTS")]
    events: Vec<ObjectEvent>,
    /// Messages per delivery (queue triggers; node default 10).
    #[arg(long, value_name = "N")]
    batch_size: Option<u32>,
    /// Most deliveries running at once (queue triggers; node default 16).
    #[arg(long, value_name = "N")]
    max_concurrency: Option<u32>,
    /// Deliveries before an event goes to the dead-letter queue (node default 3).
    #[arg(long, value_name = "N")]
    max_attempts: Option<u32>,
    /// Wait before retrying a failed delivery, e.g. 1s (node default 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    backoff: Option<Duration>,
    /// The function's alias that gets the events (default `live`); it must
    /// exist, and cannot be deleted while the trigger is attached.
    #[arg(long)]
    alias: Option<String>,
}

/// `mayfly dlq …`: events that failed every delivery.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List a function's dead letters.
    List {
        /// Function name.
        function: String,
    },
    /// Show one dead letter: its metadata, then its body.
    Show {
        /// Function name.
        function: String,
        /// Dead-letter id (see `mayfly dlq list`).
        id: u64,
    },
    /// Deliver dead letters again (all of them when no id is given).
    Redrive {
        /// Function name.
        function: String,
        /// Dead-letter ids.
        ids: Vec<u64>,
    },
    /// Delete dead letters (all of them unless --id is given).
    Purge {
        /// Function name.
        function: String,
        /// Only this dead letter.
        #[arg(long, value_name = "N")]
        id: Option<u64>,
    },
}

/// `mayfly invoke --async` and its retry settings.
#[derive(Debug, Args)]
pub struct AsyncArgs {
    /// Queue the invocation and return its event id at once; the node
    /// delivers it as a CloudEvent, retrying failures.
    #[arg(long = "async")]
    pub async_invoke: bool,
    /// Deliveries before the event goes to the dead-letter queue (node default 3).
    #[arg(long, value_name = "N", requires = "async_invoke")]
    pub max_attempts: Option<u32>,
    /// Wait before retrying a failed delivery, e.g. 1s (node default 1s).
    #[arg(long, value_parser = humantime::parse_duration, requires = "async_invoke")]
    pub backoff: Option<Duration>,
}

/// An object event a trigger runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectEvent {
    /// An object was stored.
    Created,
    /// An object was deleted.
    Deleted,
}

/// Where a trigger's events come from, as the admin API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// A cron expression or `@every <duration>`.
    Schedule {
        /// The expression.
        schedule: String,
    },
    /// Changes to the objects of a bucket.
    Object {
        /// Bucket name.
        bucket: String,
        /// Only keys starting with this.
        #[serde(skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
        /// Only keys ending with this.
        #[serde(skip_serializing_if = "Option::is_none")]
        suffix: Option<String>,
        /// Events to run on (empty: the node's default, both).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        events: Vec<ObjectEvent>,
    },
    /// Changes to the keys of a KV bucket.
    Kv {
        /// Bucket name.
        bucket: String,
        /// Only keys starting with this.
        #[serde(skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
    /// The messages of a queue.
    Queue {
        /// Queue name.
        queue: String,
        /// Messages per delivery.
        #[serde(skip_serializing_if = "Option::is_none")]
        batch_size: Option<u32>,
        /// Most deliveries at once.
        #[serde(skip_serializing_if = "Option::is_none")]
        max_concurrency: Option<u32>,
    },
}

impl Source {
    fn kind(&self) -> &'static str {
        match self {
            Source::Schedule { .. } => "schedule",
            Source::Object { .. } => "object",
            Source::Kv { .. } => "kv",
            Source::Queue { .. } => "queue",
        }
    }
}

/// Retry settings of a trigger; those left out take the node's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retry {
    /// Deliveries before the dead-letter queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    /// Wait before a retry, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    backoff_ms: Option<u64>,
}

/// A trigger spec as POSTed to the admin API (and sent at deploy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TriggerSpec {
    /// The event source.
    source: Source,
    /// Retry settings, when any were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry: Option<Retry>,
    /// The alias it delivers to, when not `live`.
    #[serde(skip_serializing_if = "Option::is_none")]
    alias: Option<String>,
}

/// Parses the compact `--trigger` form of `mayfly deploy`:
/// `schedule:<expr>`, `object:<bucket>[/<prefix>]`, `kv:<bucket>[/<prefix>]`
/// or `queue:<name>`.
pub fn parse_trigger_spec(text: &str) -> Result<TriggerSpec, String> {
    let Some((kind, rest)) = text.split_once(':') else {
        return Err(format!("`{text}` is not KIND:VALUE; use {TRIGGER_FORMS}"));
    };
    let source = match kind.trim() {
        "schedule" => {
            let schedule = rest.trim();
            if schedule.is_empty() {
                return Err(
                    "schedule: needs an expression, e.g. `schedule:@every 30s` or \
                            `schedule:*/5 * * * *`"
                        .to_string(),
                );
            }
            Source::Schedule {
                schedule: schedule.to_string(),
            }
        }
        "object" => {
            let (bucket, prefix) = bucket_and_prefix("object", rest)?;
            Source::Object {
                bucket,
                prefix,
                suffix: None,
                events: Vec::new(),
            }
        }
        "kv" => {
            let (bucket, prefix) = bucket_and_prefix("kv", rest)?;
            Source::Kv { bucket, prefix }
        }
        "queue" => Source::Queue {
            queue: queue_name(rest)?,
            batch_size: None,
            max_concurrency: None,
        },
        other => {
            return Err(format!(
                "unknown trigger kind `{other}`; use {TRIGGER_FORMS}"
            ));
        }
    };
    Ok(TriggerSpec {
        source,
        retry: None,
        alias: None,
    })
}

/// Splits `<bucket>[/<prefix>]`.
fn bucket_and_prefix(kind: &str, text: &str) -> Result<(String, Option<String>), String> {
    let (bucket, prefix) = text.split_once('/').unwrap_or((text, ""));
    if bucket.is_empty() {
        return Err(format!(
            "{kind}: needs a bucket, as {kind}:<bucket> or {kind}:<bucket>/<prefix>"
        ));
    }
    let prefix = (!prefix.is_empty()).then(|| prefix.to_string());
    Ok((bucket.to_string(), prefix))
}

/// The `<name>` of `queue:<name>`.
fn queue_name(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("queue: needs a queue name, as queue:<name>".to_string());
    }
    if text.contains('/') {
        return Err(format!(
            "queue names have no `/` (got `{text}`); use queue:<name>"
        ));
    }
    Ok(text.to_string())
}

/// Checks a duration such as `30s` and keeps its text for the query string.
fn duration_text(text: &str) -> Result<String, String> {
    humantime::parse_duration(text)
        .map(|_| text.to_string())
        .map_err(|e| format!("{e} (use e.g. 30s, 500ms or 2m)"))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------- objects

/// Runs a `mayfly object` verb.
pub fn object(client: &AdminClient, json: bool, command: ObjectCommand) -> anyhow::Result<()> {
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
        bail!("no object `{key}` in bucket `{bucket}` (HTTP 404)");
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
    println!("{:<32} {:>9} {:>14}", "BUCKET", "OBJECTS", "BYTES");
    for bucket in &buckets {
        println!(
            "{:<32} {:>9} {:>14}",
            text(&bucket["bucket"]),
            text(&bucket["objects"]),
            text(&bucket["bytes"])
        );
    }
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
    println!(
        "{:<40} {:>12}  {:<24}  CONTENT-TYPE",
        "KEY", "SIZE", "MODIFIED"
    );
    for object in &objects {
        println!(
            "{:<40} {:>12}  {:<24}  {}",
            text(&object["key"]),
            text(&object["size"]),
            time(&object["modified_ms"]),
            text(&object["content_type"])
        );
    }
    Ok(())
}

/// Every item of a paged listing (`{"<field>": […], "next": …}`), following
/// `next` until the last page.
fn all_pages(
    client: &AdminClient,
    path: &str,
    field: &str,
    prefix: Option<&str>,
) -> anyhow::Result<Vec<Value>> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let url = format!(
            "{path}{}",
            query(&[
                ("prefix", prefix.map(str::to_string)),
                ("after", after.clone()),
                ("limit", Some(PAGE.to_string())),
            ])
        );
        let mut page: Value = client.get_json(&url)?;
        match page[field].take() {
            Value::Array(batch) => items.extend(batch),
            _ => bail!("the admin API answered without a `{field}` list"),
        }
        match page["next"].as_str() {
            Some(next) if !next.is_empty() && after.as_deref() != Some(next) => {
                after = Some(next.to_string());
            }
            _ => return Ok(items),
        }
    }
}

// ---------------------------------------------------------------- kv

/// Runs a `mayfly kv` verb.
pub fn kv(client: &AdminClient, json: bool, command: KvCommand) -> anyhow::Result<()> {
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
        match condition {
            Condition::Absent => bail!("not set: `{key}` already exists in `{bucket}` (HTTP 412)"),
            _ => bail!(
                "not set: `{key}` in `{bucket}` is not at the revision given to --if-revision; \
                 read it again with `mayfly kv get --json` (HTTP 412)"
            ),
        }
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
        bail!(
            "not deleted: `{key}` in `{bucket}` is not at the revision given to --if-revision \
             (HTTP 412)"
        );
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
    println!("{:<32} {:>9}", "BUCKET", "KEYS");
    for bucket in &buckets {
        println!(
            "{:<32} {:>9}",
            text(&bucket["bucket"]),
            text(&bucket["keys"])
        );
    }
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
    println!("{:<40} {:>9} {:>10}  UPDATED", "KEY", "REVISION", "SIZE");
    for key in &keys {
        println!(
            "{:<40} {:>9} {:>10}  {}",
            text(&key["key"]),
            text(&key["revision"]),
            text(&key["size"]),
            time(&key["updated_ms"])
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- queues

/// Runs a `mayfly queue` verb.
pub fn queue(client: &AdminClient, json: bool, command: QueueCommand) -> anyhow::Result<()> {
    match command {
        QueueCommand::Send {
            queue,
            body,
            file,
            content_type,
        } => {
            let body = read_body(body, file.as_deref(), "message body")?;
            queue_send(client, json, &queue, &body, content_type)
        }
        QueueCommand::Receive {
            queue,
            max,
            visibility,
        } => queue_receive(client, json, &queue, max, visibility),
        QueueCommand::Ack { queue, receipt } => queue_ack(client, json, &queue, &receipt),
        QueueCommand::List => queue_list(client, json),
    }
}

fn queue_send(
    client: &AdminClient,
    json: bool,
    queue: &str,
    body: &[u8],
    content_type: Option<String>,
) -> anyhow::Result<()> {
    let headers: Vec<_> = content_type
        .map(|t| ("content-type".to_string(), t))
        .into_iter()
        .collect();
    let path = format!("/v1/queues/{}/messages", segment(queue));
    let sent: Value = client.send_json("POST", &path, &headers, Some(body))?;
    if json {
        println!("{sent}");
    } else {
        println!("sent message {} to {queue}", text(&sent["id"]));
    }
    Ok(())
}

fn queue_receive(
    client: &AdminClient,
    json: bool,
    queue: &str,
    max: Option<u32>,
    visibility: Option<String>,
) -> anyhow::Result<()> {
    let path = format!(
        "/v1/queues/{}/receive{}",
        segment(queue),
        query(&[
            ("max", max.map(|n| n.to_string())),
            ("visibility", visibility)
        ])
    );
    let received: Value = client.send_json("POST", &path, &[], None)?;
    if json {
        println!("{received}");
        return Ok(());
    }
    let messages = received["messages"].as_array().cloned().unwrap_or_default();
    if messages.is_empty() {
        println!("no messages waiting in {queue}");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for (n, message) in messages.iter().enumerate() {
        if n > 0 {
            writeln!(out)?;
        }
        writeln!(
            out,
            "message {} (attempt {}, {}, sent {})\nreceipt {}",
            text(&message["id"]),
            text(&message["attempts"]),
            text(&message["content_type"]),
            time(&message["sent_ms"]),
            text(&message["receipt"])
        )?;
        let body = body_bytes(message)?;
        if message["body"].is_string() {
            out.write_all(&body)?;
        } else {
            write!(out, "<{} bytes of binary data>", body.len())?;
        }
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}

fn queue_ack(client: &AdminClient, json: bool, queue: &str, receipt: &str) -> anyhow::Result<()> {
    let path = format!(
        "/v1/queues/{}/messages/{}",
        segment(queue),
        segment(receipt)
    );
    let response = client.send_raw("DELETE", &path, &[], None)?;
    if response.status() == 409 {
        bail!(
            "stale receipt: the visibility timeout ran out and the message was received again; \
             acknowledge it with its newer receipt (HTTP 409)"
        );
    }
    check(response)?;
    if json {
        println!("{}", json!({"queue": queue, "acknowledged": receipt}));
    } else {
        println!("acknowledged {receipt}");
    }
    Ok(())
}

fn queue_list(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let queues: Vec<Value> = client.get_json("/v1/queues")?;
    if json {
        println!("{}", Value::from(queues));
        return Ok(());
    }
    if queues.is_empty() {
        println!("no queues: send a message with `mayfly queue send <queue> <body>`");
        return Ok(());
    }
    println!("{:<32} {:>9} {:>9}", "QUEUE", "MESSAGES", "IN_FLIGHT");
    for queue in &queues {
        println!(
            "{:<32} {:>9} {:>9}",
            text(&queue["queue"]),
            text(&queue["messages"]),
            text(&queue["in_flight"])
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- triggers

/// Runs a `mayfly trigger` verb.
pub fn trigger(client: &AdminClient, json: bool, command: TriggerCommand) -> anyhow::Result<()> {
    match command {
        TriggerCommand::Add(args) => trigger_add(client, json, *args),
        TriggerCommand::List { function } => trigger_list(client, json, function.as_deref()),
        TriggerCommand::Remove { id } => {
            client.delete(&format!("/v1/triggers/{}", segment(&id)))?;
            if json {
                println!("{}", json!({"removed": id}));
            } else {
                println!("removed trigger {id}");
            }
            Ok(())
        }
    }
}

impl TriggerAddArgs {
    /// The spec these flags describe, refusing flags of other kinds.
    fn spec(self) -> anyhow::Result<TriggerSpec> {
        let options: [(&str, bool, &[&str]); 5] = [
            ("--prefix", self.prefix.is_some(), &["object", "kv"]),
            ("--suffix", self.suffix.is_some(), &["object"]),
            ("--events", !self.events.is_empty(), &["object"]),
            ("--batch-size", self.batch_size.is_some(), &["queue"]),
            (
                "--max-concurrency",
                self.max_concurrency.is_some(),
                &["queue"],
            ),
        ];
        let retry = (self.max_attempts.is_some() || self.backoff.is_some()).then(|| Retry {
            max_attempts: self.max_attempts,
            backoff_ms: self.backoff.map(millis),
        });
        let source = match (self.schedule, self.object, self.kv, self.queue) {
            (Some(schedule), ..) => Source::Schedule { schedule },
            (_, Some(bucket), ..) => Source::Object {
                bucket,
                prefix: self.prefix,
                suffix: self.suffix,
                events: self.events,
            },
            (_, _, Some(bucket), _) => Source::Kv {
                bucket,
                prefix: self.prefix,
            },
            (.., Some(queue)) => Source::Queue {
                queue,
                batch_size: self.batch_size,
                max_concurrency: self.max_concurrency,
            },
            _ => bail!("give one source: --schedule, --object, --kv or --queue"),
        };
        let kind = source.kind();
        for (flag, given, kinds) in options {
            if given && !kinds.contains(&kind) {
                bail!(
                    "{flag} does not apply to {kind} triggers (only to {} triggers)",
                    kinds.join(" and ")
                );
            }
        }
        Ok(TriggerSpec {
            source,
            retry,
            alias: self.alias,
        })
    }
}

fn trigger_add(client: &AdminClient, json: bool, args: TriggerAddArgs) -> anyhow::Result<()> {
    let function = args.function.clone();
    let spec = serde_json::to_value(args.spec()?)?;
    let path = format!("/v1/functions/{}/triggers", segment(&function));
    let body = serde_json::to_vec(&spec)?;
    let headers = [("content-type".to_string(), "application/json".to_string())];
    let response = client.send_raw("POST", &path, &headers, Some(&body))?;
    let created = response.status() == 201;
    let trigger: Value = read_json(response)?;
    if json {
        println!("{trigger}");
        return Ok(());
    }
    let (kind, mut what) = describe_source(&trigger["source"]);
    if let Some(alias) = trigger["alias"].as_str() {
        what.push_str(&format!(" -> {alias}"));
    }
    if created {
        println!(
            "added trigger {} to {function}: {kind} {what}",
            text(&trigger["id"])
        );
    } else {
        println!(
            "{function} already has this trigger: {} ({kind} {what})",
            text(&trigger["id"])
        );
    }
    Ok(())
}

fn trigger_list(client: &AdminClient, json: bool, function: Option<&str>) -> anyhow::Result<()> {
    let path = match function {
        Some(function) => format!("/v1/functions/{}/triggers", segment(function)),
        None => "/v1/triggers".to_string(),
    };
    let triggers: Vec<Value> = client.get_json(&path)?;
    if json {
        println!("{}", Value::from(triggers));
        return Ok(());
    }
    if triggers.is_empty() {
        println!(
            "no triggers: attach one with `mayfly trigger add <function> --schedule '@every 1m'`"
        );
        return Ok(());
    }
    println!(
        "{:<8} {:<24} {:<9} {:<40} RETRY",
        "ID", "FUNCTION", "KIND", "WHAT"
    );
    for trigger in &triggers {
        let (kind, mut what) = describe_source(&trigger["source"]);
        if let Some(alias) = trigger["alias"].as_str() {
            what.push_str(&format!(" -> {alias}"));
        }
        println!(
            "{:<8} {:<24} {:<9} {:<40} {}",
            text(&trigger["id"]),
            text(&trigger["function"]),
            kind,
            what,
            describe_retry(&trigger["retry"])
        );
    }
    Ok(())
}

/// A trigger source's kind and a short description of what it watches.
fn describe_source(source: &Value) -> (String, String) {
    let field = |name: &str| source[name].as_str().unwrap_or("");
    let kind = field("kind").to_string();
    let what = match kind.as_str() {
        "schedule" => field("schedule").to_string(),
        "object" => {
            let mut what = format!(
                "{}/{}*{}",
                field("bucket"),
                field("prefix"),
                field("suffix")
            );
            let events: Vec<&str> = source["events"]
                .as_array()
                .map(|events| events.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if events.len() == 1 {
                what.push_str(&format!(" ({})", events.join(",")));
            }
            what
        }
        "kv" => format!("{}/{}*", field("bucket"), field("prefix")),
        "queue" => {
            let mut what = field("queue").to_string();
            for (name, label) in [("batch_size", "batch"), ("max_concurrency", "concurrency")] {
                if let Some(n) = source[name].as_u64() {
                    what.push_str(&format!(" {label} {n}"));
                }
            }
            what
        }
        _ => source.to_string(),
    };
    (kind, what)
}

/// A retry policy as `3 attempts, backoff 1s`.
fn describe_retry(retry: &Value) -> String {
    let attempts = retry["max_attempts"]
        .as_u64()
        .map(|n| format!("{n} attempts"));
    let backoff = retry["backoff_ms"].as_u64().map(|ms| {
        format!(
            "backoff {}",
            humantime::format_duration(Duration::from_millis(ms))
        )
    });
    let parts: Vec<String> = attempts.into_iter().chain(backoff).collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(", ")
    }
}

/// Describes the triggers a deploy attached (or, if the node did not say,
/// the ones asked for).
pub fn print_deployed_triggers(outcome: &Value, specs: &[TriggerSpec]) -> anyhow::Result<()> {
    if let Some(triggers) = outcome["triggers"].as_array() {
        for trigger in triggers {
            let (kind, what) = describe_source(&trigger["source"]);
            println!("trigger {}: {kind} {what}", text(&trigger["id"]));
        }
        return Ok(());
    }
    for spec in specs {
        let (kind, what) = describe_source(&serde_json::to_value(&spec.source)?);
        println!("trigger: {kind} {what}");
    }
    Ok(())
}

// ---------------------------------------------------------------- dead letters

/// Runs a `mayfly dlq` verb.
pub fn dlq(client: &AdminClient, json: bool, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { function } => dlq_list(client, json, &function),
        DlqCommand::Show { function, id } => dlq_show(client, json, &function, id),
        DlqCommand::Redrive { function, ids } => {
            let body = if ids.is_empty() {
                json!({})
            } else {
                json!({ "ids": ids })
            };
            let path = format!("/v1/functions/{}/dlq/redrive", segment(&function));
            let outcome: Value = client.post_json(&path, &body)?;
            print_count(json, &outcome, "redriven", "redelivering")
        }
        DlqCommand::Purge { function, id } => {
            let path = format!(
                "/v1/functions/{}/dlq{}",
                segment(&function),
                query(&[("id", id.map(|id| id.to_string()))])
            );
            let outcome: Value = client.send_json("DELETE", &path, &[], None)?;
            print_count(json, &outcome, "purged", "purged")
        }
    }
}

fn print_count(json: bool, outcome: &Value, field: &str, verb: &str) -> anyhow::Result<()> {
    if json {
        println!("{outcome}");
    } else {
        let n = outcome[field].as_u64().unwrap_or(0);
        println!("{verb} {n} dead letter{}", if n == 1 { "" } else { "s" });
    }
    Ok(())
}

fn dlq_list(client: &AdminClient, json: bool, function: &str) -> anyhow::Result<()> {
    let path = format!("/v1/functions/{}/dlq", segment(function));
    let mut letters: Vec<Value> = Vec::new();
    loop {
        let after = letters.last().map(|letter| text(&letter["id"]));
        let url = format!(
            "{path}{}",
            query(&[("after", after), ("limit", Some(PAGE.to_string()))])
        );
        let page: Vec<Value> = client.get_json(&url)?;
        let full = page.len() >= PAGE;
        letters.extend(page);
        if !full {
            break;
        }
    }
    if json {
        println!("{}", Value::from(letters));
        return Ok(());
    }
    if letters.is_empty() {
        println!("no dead letters for {function}");
        return Ok(());
    }
    println!(
        "{:<8} {:<28} {:>8}  {:<24}  LAST ERROR",
        "ID", "TYPE", "ATTEMPTS", "DIED"
    );
    for letter in &letters {
        println!(
            "{:<8} {:<28} {:>8}  {:<24}  {}",
            text(&letter["id"]),
            text(&letter["type"]),
            text(&letter["attempts"]),
            time(&letter["died_ms"]),
            one_line(&text(&letter["last_error"]), ERROR_COLUMN)
        );
    }
    Ok(())
}

fn dlq_show(client: &AdminClient, json: bool, function: &str, id: u64) -> anyhow::Result<()> {
    let path = format!("/v1/functions/{}/dlq/{id}", segment(function));
    let letter: Value = client.get_json(&path)?;
    if json {
        println!("{letter}");
        return Ok(());
    }
    let mut fields = letter.clone();
    if let Some(map) = fields.as_object_mut() {
        map.remove("body");
        map.remove("body_base64");
    }
    print_fields(&fields);
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    let body = body_bytes(&letter)?;
    out.write_all(&body)?;
    // End the terminal line; the data itself is printed as stored.
    if !body.ends_with(b"\n") {
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}

// ---------------------------------------------------------------- async invoke

/// `mayfly invoke --async`: queues the invocation and prints its event id.
pub fn invoke_async(
    client: &AdminClient,
    json: bool,
    name: &str,
    body: Option<&[u8]>,
    path: &str,
    headers: &[(String, String)],
    delivery: &AsyncArgs,
) -> anyhow::Result<()> {
    let url = format!(
        "/v1/functions/{}/invoke{}",
        segment(name),
        query(&[
            ("async", Some("true".to_string())),
            ("path", Some(path.to_string())),
            ("max_attempts", delivery.max_attempts.map(|n| n.to_string())),
            (
                "backoff_ms",
                delivery.backoff.map(|d| millis(d).to_string())
            ),
        ])
    );
    let queued: Value = client.send_json("POST", &url, headers, body)?;
    if json {
        println!("{queued}");
    } else {
        println!("{}", text(&queued["event_id"]));
    }
    Ok(())
}

// ---------------------------------------------------------------- helpers

/// A body given inline, in a file, or on stdin (`-`).
fn read_body(inline: Option<String>, file: Option<&Path>, what: &str) -> anyhow::Result<Vec<u8>> {
    match (inline, file) {
        (Some(text), _) => Ok(text.into_bytes()),
        (None, Some(file)) => read_file(file),
        (None, None) => {
            bail!("give the {what} as an argument, or with --file PATH (`-` for stdin)")
        }
    }
}

/// The bytes of a file, or of stdin for `-`.
pub fn read_file(file: &Path) -> anyhow::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read stdin")?;
        return Ok(bytes);
    }
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

/// A key as URL path segments: `/` stays a separator, everything else that
/// is not unreserved is percent-encoded, and `.`/`..` segments are encoded
/// so that nothing on the way normalises them away.
fn key_path(key: &str) -> String {
    key.split('/')
        .map(|part| match part {
            "." => "%2E".to_string(),
            ".." => "%2E%2E".to_string(),
            part => percent_encode(part, b""),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A query string (`?a=1&b=2`) of the given parameters, or nothing.
fn query(params: &[(&str, Option<String>)]) -> String {
    let pairs: Vec<String> = params
        .iter()
        .filter_map(|(name, value)| {
            let value = value.as_deref()?;
            Some(format!("{name}={}", percent_encode(value, b"/")))
        })
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    }
}

fn print_deleted(json: bool, bucket: &str, key: &str) -> anyhow::Result<()> {
    if json {
        println!("{}", json!({"bucket": bucket, "key": key, "deleted": true}));
    } else {
        println!("deleted {bucket}/{key}");
    }
    Ok(())
}

fn with_prefix(prefix: Option<&str>) -> String {
    prefix.map_or_else(String::new, |p| format!(" with prefix `{p}`"))
}

/// A JSON value as text: strings without quotes, `-` for null.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// A time in ms since the epoch as RFC 3339, `-` when absent.
fn time(value: &Value) -> String {
    value.as_i64().map_or_else(|| "-".to_string(), format_time)
}

/// Text on one line, cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let line = text.replace(['\n', '\r'], " ");
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Prints an object's fields as aligned `name: value` lines; `*_ms` fields
/// are times (ms since the epoch), shown as RFC 3339.
fn print_fields(fields: &Value) {
    let Some(map) = fields.as_object() else {
        println!("{fields}");
        return;
    };
    for (name, value) in map {
        let (label, value) = match name.strip_suffix("_ms") {
            Some(label) => (label, time(value)),
            None => (name.as_str(), text(value)),
        };
        println!("{:<14} {value}", format!("{}:", label.replace('_', " ")));
    }
}

/// Puts `bytes` in `out` as `<field>` (UTF-8) or `<field>_base64`.
fn set_body(out: &mut Value, field: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => out[field] = Value::from(text),
        Err(_) => out[format!("{field}_base64")] = Value::from(base64_encode(bytes)),
    }
}

/// The bytes of a message or dead letter: `body`, or `body_base64` decoded.
fn body_bytes(item: &Value) -> anyhow::Result<Vec<u8>> {
    if let Some(body) = item["body"].as_str() {
        return Ok(body.as_bytes().to_vec());
    }
    match item["body_base64"].as_str() {
        Some(encoded) => base64_decode(encoded),
        None => Ok(Vec::new()),
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding and whitespace ignored).
fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let value = BASE64
            .iter()
            .position(|&a| a == c)
            .context("the admin API sent invalid base64")?;
        acc = (acc << 6 | value as u32) & 0xFFFF;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Value {
        serde_json::to_value(parse_trigger_spec(text).unwrap()).unwrap()
    }

    #[test]
    fn trigger_specs_parse_to_the_api_form() {
        assert_eq!(
            spec("schedule:@every 30s"),
            json!({"source": {"kind": "schedule", "schedule": "@every 30s"}})
        );
        assert_eq!(
            spec("schedule:*/5 * * * *"),
            json!({"source": {"kind": "schedule", "schedule": "*/5 * * * *"}})
        );
        assert_eq!(
            spec("object:uploads"),
            json!({"source": {"kind": "object", "bucket": "uploads"}})
        );
        assert_eq!(
            spec("object:uploads/in/2024/"),
            json!({"source": {"kind": "object", "bucket": "uploads", "prefix": "in/2024/"}})
        );
        assert_eq!(
            spec("kv:settings/app/"),
            json!({"source": {"kind": "kv", "bucket": "settings", "prefix": "app/"}})
        );
        assert_eq!(
            spec("kv:settings/"),
            json!({"source": {"kind": "kv", "bucket": "settings"}})
        );
        assert_eq!(
            spec("queue:orders"),
            json!({"source": {"kind": "queue", "queue": "orders"}})
        );
    }

    #[test]
    fn bad_trigger_specs_say_what_is_valid() {
        for bad in ["cron:* * * * *", "uploads", "Object:x"] {
            let error = parse_trigger_spec(bad).unwrap_err();
            assert!(error.contains("schedule:<expr>"), "{bad}: {error}");
            assert!(error.contains("queue:<name>"), "{bad}: {error}");
        }
        for bad in [
            "schedule:",
            "schedule:  ",
            "object:",
            "object:/in",
            "kv:",
            "queue:",
            "queue:a/b",
        ] {
            assert!(parse_trigger_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trigger_add_refuses_options_of_other_kinds() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: TriggerAddArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("add").chain(args.iter().copied()))
                .map(|cli| cli.args.spec())
        };
        let spec = parse(&[
            "f",
            "--queue",
            "q",
            "--batch-size",
            "5",
            "--max-attempts",
            "7",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            serde_json::to_value(spec).unwrap(),
            json!({"source": {"kind": "queue", "queue": "q", "batch_size": 5},
                   "retry": {"max_attempts": 7}})
        );
        let spec = parse(&[
            "f",
            "--object",
            "b",
            "--suffix",
            ".csv",
            "--events",
            "created",
            "--backoff",
            "2s",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            serde_json::to_value(spec).unwrap(),
            json!({"source": {"kind": "object", "bucket": "b", "suffix": ".csv", "events": ["created"]},
                   "retry": {"backoff_ms": 2000}})
        );
        let error = parse(&["f", "--kv", "b", "--suffix", ".x"])
            .unwrap()
            .unwrap_err();
        assert!(
            error.to_string().contains("--suffix does not apply to kv"),
            "{error}"
        );
        let error = parse(&["f", "--schedule", "@every 1s", "--prefix", "a"])
            .unwrap()
            .unwrap_err();
        assert!(error.to_string().contains("--prefix"), "{error}");
        assert!(parse(&["f"]).is_err(), "a source is required");
        assert!(
            parse(&["f", "--kv", "a", "--queue", "b"]).is_err(),
            "one source only"
        );
        assert!(parse(&["f", "--object", "b", "--events", "changed"]).is_err());
    }

    #[test]
    fn keys_keep_slashes_and_encode_the_rest() {
        assert_eq!(key_path("a/b c/d.txt"), "a/b%20c/d.txt");
        assert_eq!(key_path("x?y#z%"), "x%3Fy%23z%25");
        assert_eq!(key_path("é/+&="), "%C3%A9/%2B%26%3D");
        assert_eq!(key_path("a/../b/./c"), "a/%2E%2E/b/%2E/c");
        assert_eq!(key_path("..."), "...");
    }

    #[test]
    fn queries_skip_missing_values_and_encode_the_rest() {
        assert_eq!(query(&[("a", None)]), "");
        assert_eq!(
            query(&[
                ("prefix", Some("in/a b&".into())),
                ("after", None),
                ("limit", Some("10".into()))
            ]),
            "?prefix=in/a%20b%26&limit=10"
        );
    }

    #[test]
    fn base64_round_trips() {
        for bytes in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0, 255, 128, 7],
        ] {
            let encoded = base64_encode(bytes);
            assert_eq!(base64_decode(&encoded).unwrap(), bytes, "{encoded}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert!(base64_decode("Z!==").is_err());
    }

    #[test]
    fn revisions_come_from_etags() {
        assert_eq!(parse_revision("\"42\""), Some(42));
        assert_eq!(parse_revision("W/\"7\""), Some(7));
        assert_eq!(parse_revision("7"), Some(7));
        assert_eq!(parse_revision("\"x\""), None);
    }

    #[test]
    fn sources_and_retries_are_described() {
        let (kind, what) = describe_source(
            &json!({"kind": "object", "bucket": "b", "prefix": "in/", "suffix": ".csv", "events": ["deleted"]}),
        );
        assert_eq!(
            (kind.as_str(), what.as_str()),
            ("object", "b/in/*.csv (deleted)")
        );
        let (_, what) = describe_source(
            &json!({"kind": "queue", "queue": "q", "batch_size": 10, "max_concurrency": 16}),
        );
        assert_eq!(what, "q batch 10 concurrency 16");
        assert_eq!(
            describe_retry(&json!({"max_attempts": 3, "backoff_ms": 1500})),
            "3 attempts, backoff 1s 500ms"
        );
        assert_eq!(describe_retry(&Value::Null), "-");
    }

    #[test]
    fn long_errors_are_cut_to_one_line() {
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }
}
