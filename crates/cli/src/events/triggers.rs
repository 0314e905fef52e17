//! `mayfly trigger …`: event sources that invoke functions; and the
//! compact `--trigger` specs of `mayfly deploy`.

use std::time::Duration;

use anyhow::bail;
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::{Value, json};

use mayfly_store::RetryPolicy;

use crate::client::{AdminClient, millis, read_json, segment};
use crate::flags::{DELIVERY_FLAGS, duration_in, ms, naming_flags, number_in};
use crate::output::{Table, text};

/// The valid `--trigger` forms, for error messages.
const TRIGGER_FORMS: &str =
    "schedule:<expr>, object:<bucket>[/<prefix>], kv:<bucket>[/<prefix>] or queue:<name>";

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
    /// Run for the messages of this queue. A queue placed at a leaf site
    /// (`NAME@SITE`) needs a function placed (--place) on that site's nodes
    /// only: its messages are delivered from the site's own store, also
    /// while the site is cut off from the hub.
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
    #[arg(long, value_name = "N", value_parser = number_in(1, Some(RetryPolicy::MAX_ATTEMPTS)))]
    max_attempts: Option<u32>,
    /// Wait before retrying a failed delivery, e.g. 1s (node default 1s).
    #[arg(long, value_parser = duration_in(ms(0), ms(RetryPolicy::MAX_BACKOFF_MS)))]
    backoff: Option<Duration>,
    /// The function's alias that gets the events (default `live`); it must
    /// exist, and cannot be deleted while the trigger is attached.
    #[arg(long)]
    alias: Option<String>,
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

/// Runs a `mayfly trigger` verb.
pub fn run(client: &AdminClient, json: bool, command: TriggerCommand) -> anyhow::Result<()> {
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
    let trigger: Value = read_json(response).map_err(|e| naming_flags(e, DELIVERY_FLAGS))?;
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
    let mut table = Table::new(["ID", "FUNCTION", "KIND", "WHAT", "RETRY"]);
    for trigger in &triggers {
        let (kind, mut what) = describe_source(&trigger["source"]);
        if let Some(alias) = trigger["alias"].as_str() {
            what.push_str(&format!(" -> {alias}"));
        }
        table.row([
            text(&trigger["id"]),
            text(&trigger["function"]),
            kind,
            what,
            describe_retry(&trigger["retry"]),
        ]);
    }
    table.print();
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
}
