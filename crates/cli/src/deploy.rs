//! What a deploy is: the flags of `mayfly deploy`, and one function's
//! component, routes, triggers, limits and grants as the admin API takes
//! them, whether given as flags or by a manifest.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use mayfly_platform::validate::{MAX_BODY_LIMIT, MAX_LOG_LIMIT, MAX_QUEUED};
use mayfly_store::{FunctionLimits, FunctionScaling};

use crate::client::{AdminClient, FormPart, PartBody, segment};
use crate::events::triggers::{TriggerSpec, parse_trigger_spec};
use crate::flags::{duration_in, ms, number_in};
use crate::progress::DeployProgress;

/// `mayfly deploy`: the component and its configuration, or a manifest.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Function name (lower-case letters, digits, `-`, `_`). Leave NAME and
    /// COMPONENT out to build and deploy every function in ./mayfly.toml;
    /// an unchanged function gets no new version.
    pub name: Option<String>,
    /// The component: a .wasm built for wasm32-wasip2 exporting wasi:http/incoming-handler.
    pub component: Option<PathBuf>,
    /// The manifest to apply when NAME and COMPONENT are left out
    /// [default: mayfly.toml in this folder].
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    pub manifest: Option<PathBuf>,
    /// Route to serve, as `/prefix` or `host/prefix`; repeat for more.
    #[arg(long = "route", short = 'r', value_parser = parse_route)]
    pub routes: Vec<String>,
    /// Take the route's prefix off the path the function sees: on route
    /// `/api`, `/api/users` reaches it as `/users` (it always gets the
    /// rest in `x-mayfly-path-info`). Applies to every --route given; in
    /// mayfly.toml, `strip_prefix` can name some of them.
    #[arg(long)]
    pub strip_prefix: bool,
    /// Event trigger to attach: `schedule:<expr>` (`schedule:@every 30s`,
    /// `schedule:*/5 * * * *`), `object:<bucket>[/<prefix>]`,
    /// `kv:<bucket>[/<prefix>]` or `queue:<name>`; repeat for more.
    #[arg(long = "trigger", value_name = "SPEC", value_parser = parse_trigger_spec)]
    pub triggers: Vec<TriggerSpec>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub scaling: ScalingArgs,
    #[command(flatten)]
    pub grants: GrantArgs,
    /// Run the function only on fleet nodes with this label (KEY=VALUE,
    /// as in their `mayfly serve --labels`); repeat for more, all must
    /// match. Other nodes forward its requests to one that runs it.
    #[arg(long = "place", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub place: Vec<(String, String)>,
    /// After the deploy, wait until every live node of the fleet that runs
    /// the function (all, or those its --place matches) serves the new
    /// version (at most this long, e.g. 30s; `--wait` alone: 60s).
    #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, default_missing_value = "60s",
          value_parser = humantime::parse_duration)]
    pub wait: Option<std::time::Duration>,
}

/// What the function may reach beyond its sandbox; nothing unless granted.
#[derive(Debug, Args)]
pub struct GrantArgs {
    /// KV bucket it may open through wasi:keyvalue; repeat for more.
    #[arg(long = "kv", value_name = "BUCKET")]
    pub kv: Vec<String>,
    /// Object bucket its per-invocation credential may use; repeat for more.
    #[arg(long = "object-bucket", value_name = "BUCKET")]
    pub objects: Vec<String>,
    /// Queue its per-invocation credential may send to; repeat for more.
    #[arg(long = "send-queue", value_name = "QUEUE")]
    pub queues: Vec<String>,
    /// Outbound HTTP origin it may call: `https://api.example.com`,
    /// `https://*.example.com`, `http://10.0.0.5:8080` or a CIDR such as
    /// `http://10.0.0.0/8` (private addresses only when listed); repeat for more.
    #[arg(long = "outbound", value_name = "ORIGIN")]
    pub outbound: Vec<String>,
    /// Secret it may read through wasi:config (`mayfly secret set` first); repeat for more.
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
    /// ONNX model it may load by name through wasi:nn (`mayfly model put`
    /// first); repeat for more.
    #[arg(long = "model", value_name = "NAME")]
    pub models: Vec<String>,
    /// Variable it reads through wasi:config, as KEY=VALUE; repeat for more.
    #[arg(long = "var", value_name = "KEY=VALUE", value_parser = parse_variable)]
    pub variables: Vec<(String, String)>,
    /// Environment variable every instance starts with, as NAME=VALUE
    /// (plain text, shown by `mayfly describe`); repeat for more.
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Environment variable set from a secret, as NAME=SECRET (`mayfly
    /// secret set SECRET` first): this exposes the secret to the function;
    /// its value is never shown. Repeat for more.
    #[arg(long = "env-secret", value_name = "NAME=SECRET", value_parser = parse_env)]
    pub env_secrets: Vec<(String, String)>,
}

/// A route as the node accepts it, checked before anything is uploaded.
fn parse_route(text: &str) -> Result<String, String> {
    mayfly_platform::validate::check_route(text).map(|()| text.to_string())
}

/// A placement label, `key=value`, checked as node labels are.
fn parse_label(text: &str) -> Result<(String, String), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(format!(
            "`{text}` is not KEY=VALUE (e.g. --place site=fra1)"
        ));
    };
    mayfly_store::check_label(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

/// NAME=VALUE with a name the node accepts, checked before uploading.
fn parse_env(text: &str) -> Result<(String, String), String> {
    let (name, value) = parse_variable(text)?;
    mayfly_platform::validate::check_env_name(&name)?;
    Ok((name, value))
}

fn parse_variable(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

/// Per-function limits given at deploy; the node's defaults apply to those
/// left out.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Memory limit in MB (default 128); also the memory billed.
    #[arg(long, value_name = "MB", value_parser = number_in(1u32, None))]
    pub memory: Option<u32>,
    /// Longest an invocation may run, e.g. 30s or 500ms (default 30s, at most 15m).
    #[arg(long, value_parser = duration_in(ms(1), ms(FunctionLimits::MAX_TIMEOUT_MS)))]
    pub timeout: Option<Duration>,
    /// Largest request body in bytes (default 16 MiB); larger requests get 413.
    #[arg(long, value_name = "BYTES", value_parser = number_in(0, Some(MAX_BODY_LIMIT)))]
    pub max_request_bytes: Option<u64>,
    /// Largest response body in bytes (default 16 MiB).
    #[arg(long, value_name = "BYTES", value_parser = number_in(0, Some(MAX_BODY_LIMIT)))]
    pub max_response_bytes: Option<u64>,
    /// Bytes of stdout and of stderr kept per invocation (default 1 MiB).
    #[arg(long, value_name = "BYTES", value_parser = number_in(0, Some(MAX_LOG_LIMIT)))]
    pub max_log_bytes: Option<u64>,
    /// Hand chunked request bodies to the function as they arrive instead
    /// of reading them whole first (large uploads): past
    /// --max-request-bytes its read fails, and the client gets 413 unless
    /// the function already answered.
    #[arg(long)]
    pub streaming_request: bool,
}

/// Per-function scaling settings given at deploy.
#[derive(Debug, Args)]
pub struct ScalingArgs {
    /// Most invocations running at once. Default: up to a quarter of the
    /// node's shared (unreserved) concurrency and memory, so one flooded
    /// function leaves room for the rest (`[scaling] function_share_percent`
    /// in node.toml); set it to let this function burst up to the value.
    #[arg(long, value_name = "N", value_parser = number_in(1u32, None))]
    pub max_concurrency: Option<u32>,
    /// Invocations kept for this function alone, out of the node's capacity.
    #[arg(long, value_name = "N")]
    pub reserved_concurrency: Option<u32>,
    /// Requests that may wait when the function is at its limit (default 100; 0: refuse at once with 429).
    #[arg(long, value_name = "N", value_parser = number_in(0, Some(MAX_QUEUED)))]
    pub max_queued: Option<u32>,
    /// Longest a request waits in the queue before 429, e.g. 1s (default 1s, at most 1m).
    #[arg(long, value_parser = duration_in(ms(0), ms(FunctionScaling::MAX_QUEUE_TIMEOUT_MS)))]
    pub queue_timeout: Option<Duration>,
    /// Keep instances and reuse them one request at a time (hot tier): the
    /// function's initialisation runs once per instance, not per request.
    #[arg(long)]
    pub reuse: bool,
}

/// The settings given on the command line; those left out take the node's
/// defaults.
fn given<const N: usize>(settings: [(&str, Option<Value>); N]) -> serde_json::Map<String, Value> {
    settings
        .into_iter()
        .filter_map(|(key, value)| Some((key.to_string(), value?)))
        .collect()
}

/// Prints on stderr the warnings of a deploy's answer (a placement no live
/// node matches).
pub fn print_warnings(outcome: &Value) {
    for warning in outcome["warnings"].as_array().into_iter().flatten() {
        if let Some(warning) = warning.as_str() {
            eprintln!("warning: {warning}");
        }
    }
}

/// One function's deploy, from `mayfly deploy NAME COMPONENT --flags` or
/// from a manifest: both send it with [`send_deploy`].
#[derive(Debug)]
pub struct FunctionDeploy {
    /// Function name.
    pub name: String,
    /// The component file.
    pub component: PathBuf,
    /// Routes as the user wrote them.
    pub routes: Vec<String>,
    /// Those of `routes` whose prefix the function does not see.
    pub strip_prefix: Vec<String>,
    /// Triggers to attach (an identical one is not attached twice).
    pub triggers: Vec<TriggerSpec>,
    /// Limits; those left out take the node's defaults.
    pub limits: LimitArgs,
    /// Scaling settings; likewise.
    pub scaling: ScalingArgs,
    /// Grants and variables.
    pub grants: GrantArgs,
    /// Labels a fleet node needs to run the function (empty: every node).
    pub placement: std::collections::BTreeMap<String, String>,
}

/// The `config` part of a deploy: what was given; the node fills in the rest.
pub fn config_json(deploy: &FunctionDeploy) -> Value {
    let FunctionDeploy {
        routes,
        strip_prefix,
        limits,
        scaling,
        grants,
        placement,
        ..
    } = deploy;
    let ms = |d: Duration| Value::from(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let streaming_request = limits.streaming_request;
    let limits = given([
        ("memory_mb", limits.memory.map(Value::from)),
        ("timeout_ms", limits.timeout.map(ms)),
        (
            "max_request_bytes",
            limits.max_request_bytes.map(Value::from),
        ),
        (
            "max_response_bytes",
            limits.max_response_bytes.map(Value::from),
        ),
        ("max_log_bytes", limits.max_log_bytes.map(Value::from)),
    ]);
    let scale = given([
        ("max_concurrency", scaling.max_concurrency.map(Value::from)),
        (
            "reserved_concurrency",
            scaling.reserved_concurrency.map(Value::from),
        ),
        ("max_queued", scaling.max_queued.map(Value::from)),
        ("queue_timeout_ms", scaling.queue_timeout.map(ms)),
        ("reuse", scaling.reuse.then_some(Value::Bool(true))),
    ]);
    let map = |pairs: &[(String, String)]| -> serde_json::Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect()
    };
    let mut config = serde_json::json!({
        "routes": routes,
        "limits": limits,
        "scaling": scale,
        "grants": {
            "kv": grants.kv,
            "objects": grants.objects,
            "queues": grants.queues,
            "outbound": grants.outbound,
            "secrets": grants.secrets,
        },
        "variables": map(&grants.variables),
    });
    // Sent only when given, so a node older than these settings still
    // takes a deploy that does not use them.
    for (key, value) in [
        ("strip_prefix", serde_json::json!(strip_prefix)),
        ("env", Value::Object(map(&grants.env))),
        ("env_secrets", Value::Object(map(&grants.env_secrets))),
        ("streaming_request", Value::Bool(streaming_request)),
        ("placement", serde_json::json!(placement)),
    ] {
        let given = match &value {
            Value::Array(items) => !items.is_empty(),
            Value::Object(items) => !items.is_empty(),
            Value::Bool(set) => *set,
            _ => true,
        };
        if given {
            config[key] = value;
        }
    }
    if !grants.models.is_empty() {
        config["grants"]["models"] = serde_json::json!(grants.models);
    }
    config
}

/// Refuses, before uploading it, a component over the node's limit (from
/// `/v1/status`). The node checks again, so a status the client cannot read
/// (an older node, a token without the read scope) only skips this.
fn check_size(client: &AdminClient, component: &std::path::Path) -> anyhow::Result<()> {
    let Ok(size) = std::fs::metadata(component).map(|m| m.len()) else {
        // Reading it says why, with the path.
        return Ok(());
    };
    let Ok(status) = client.get_json::<Value>("/v1/status") else {
        return Ok(());
    };
    let Some(max) = status["max_component_bytes"].as_u64() else {
        return Ok(());
    };
    if size > max {
        let mib = |bytes: u64| {
            let mib = bytes as f64 / f64::from(1 << 20);
            if mib.fract() == 0.0 {
                format!("{mib}")
            } else {
                format!("{mib:.1}")
            }
        };
        anyhow::bail!(
            "{} is {} MiB, over the node's limit of {} MiB for a component: make it \
             smaller (build with --release, strip debug info), or raise the node's limit with \
             `mayfly serve --max-component-mb N`",
            component.display(),
            mib(size),
            mib(max)
        );
    }
    Ok(())
}

/// Uploads the component with its config and triggers; returns the node's
/// answer (the version, `compiled` and `compile_ms`, and `unchanged` when
/// the live version was the same component and config, so none was
/// created). `show`: show the upload and compile on stderr while they
/// run (see [`DeployProgress`]); off for `--json` and for `mayfly dev`,
/// which shows its own.
pub fn send_deploy(
    client: &AdminClient,
    deploy: &FunctionDeploy,
    show: bool,
) -> anyhow::Result<Value> {
    let FunctionDeploy {
        name,
        component,
        triggers,
        ..
    } = deploy;
    check_size(client, component)?;
    let config = serde_json::to_vec(&config_json(deploy))?;
    let triggers_json = serde_json::to_vec(triggers)?;
    let mut parts = vec![
        FormPart {
            name: "component",
            content_type: "application/wasm",
            body: PartBody::File(component),
        },
        FormPart {
            name: "config",
            content_type: "application/json",
            body: PartBody::Bytes(&config),
        },
    ];
    if !triggers.is_empty() {
        parts.push(FormPart {
            name: "triggers",
            content_type: "application/json",
            body: PartBody::Bytes(&triggers_json),
        });
    }
    let size = std::fs::metadata(component).map_or(0, |m| m.len());
    let mut progress = show.then(|| DeployProgress::start(name, component, size));
    let mut report = |sent: u64, total: u64| {
        if let Some(progress) = &mut progress {
            progress.sent(sent, total);
        }
    };
    let outcome = client.post_multipart(
        &format!("/v1/functions/{}/versions", segment(name)),
        parts,
        show.then_some(&mut report as &mut dyn FnMut(u64, u64)),
    );
    // Cleared before the caller prints the result.
    drop(progress);
    outcome
}
