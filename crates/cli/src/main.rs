//! The `mayfly` command: runs a node (`serve`) and drives one through its
//! admin API (every other verb).

mod access;
mod client;
mod commands;
mod dev;
mod events;
mod manifest;
mod new;
mod secrets;
mod serve;
mod simulate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the request path allocates and frees
/// many small objects across threads, where glibc's arenas spent ~14% of the
/// node's CPU under load (perf, hello at wrk -c64).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Mayfly: serverless WebAssembly functions on your own machines.
#[derive(Debug, Parser)]
#[command(name = "mayfly", version, about, propagate_version = true)]
struct Cli {
    /// Admin API of the node to talk to.
    #[arg(
        long,
        global = true,
        env = "MAYFLY_ADMIN_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    admin_url: String,

    /// Bearer token for the admin API [default: the node's first admin
    /// token, read from `<MAYFLY_DATA_DIR or .mayfly>/admin.token`].
    #[arg(long, global = true, env = "MAYFLY_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// PEM certificate(s) to trust for an https:// admin URL besides
    /// Mozilla's roots: a private CA or the node's self-signed certificate.
    #[arg(long, global = true, env = "MAYFLY_CA_CERT", value_name = "PEM")]
    ca_cert: Option<PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: the HTTP gateway and the admin API.
    Serve(ServeArgs),
    /// Compiles one component from stdin within resource limits (the
    /// node's own child process; not for people).
    #[command(hide = true)]
    CompileWorker(serve::CompileWorkerArgs),
    /// Run a local node with ./mayfly.toml's functions, rebuild and redeploy
    /// them when their sources change, and print their logs as they arrive.
    Dev(dev::DevArgs),
    /// Deploy a component as a new version of a function; with no NAME and
    /// COMPONENT, build and deploy every function in ./mayfly.toml.
    Deploy(DeployArgs),
    /// List deployed functions.
    List,
    /// Invoke a function directly and print its response body (or, with
    /// --async, queue the invocation and print its event id).
    Invoke(InvokeArgs),
    /// Print a function's log lines.
    Logs {
        /// Function name.
        name: String,
        /// Keep printing new lines as they arrive.
        #[arg(long, short = 'f')]
        follow: bool,
        /// How many of the latest lines to print first.
        #[arg(long, default_value_t = 100)]
        tail: usize,
    },
    /// List a function's versions: number, digest, when, and the aliases
    /// that point at each (`*live` marks the live one); or delete one.
    Versions {
        /// Function name.
        name: String,
        /// Delete this version instead (refused while an alias points at it).
        #[arg(long, value_name = "VERSION")]
        delete: Option<u64>,
    },
    /// Point a function's aliases (`live`, or names of your own) at
    /// versions, optionally splitting traffic with a canary.
    Alias {
        #[command(subcommand)]
        command: AliasCommand,
    },
    /// Move a function's `live` alias back to its previous version, at once
    /// and without recompiling.
    Rollback {
        /// Function name.
        name: String,
    },
    /// Delete a function and stop serving its routes.
    Delete {
        /// Function name.
        name: String,
    },
    /// Show the node's state and counters.
    Status,
    /// Show usage and cost from the node's ledger.
    Usage(UsageArgs),
    /// Create a function project (Rust, wasm32-wasip2) with a mayfly.toml,
    /// ready to build, test and deploy.
    New(new::NewArgs),
    /// Replay an invocation trace (Azure 2021 CSV or synthetic) against
    /// keep-alive policies: cold starts against memory kept warm for nothing.
    Simulate(simulate::SimulateArgs),
    /// Store, fetch and list objects in the node's buckets.
    Object {
        #[command(subcommand)]
        command: events::ObjectCommand,
    },
    /// Get, set and list keys in the node's key-value store.
    Kv {
        #[command(subcommand)]
        command: events::KvCommand,
    },
    /// Send, receive and acknowledge messages in the node's queues.
    Queue {
        #[command(subcommand)]
        command: events::QueueCommand,
    },
    /// Attach event sources (schedules, objects, KV, queues) to functions.
    Trigger {
        #[command(subcommand)]
        command: events::TriggerCommand,
    },
    /// Inspect, redrive and purge a function's dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: events::DlqCommand,
    },
    /// Set, list and delete secrets (encrypted at rest, never shown again;
    /// functions read them through wasi:config) and rotate the master key.
    Secret {
        #[command(subcommand)]
        command: secrets::SecretCommand,
    },
    /// Create, list and revoke admin API tokens.
    Token {
        #[command(subcommand)]
        command: access::TokenCommand,
    },
    /// Show the audit log: who did what to the node, and when.
    Audit(access::AuditArgs),
}

/// `mayfly alias`: a function's named pointers to versions.
#[derive(Debug, Subcommand)]
enum AliasCommand {
    /// Point ALIAS at VERSION (moving `live` moves the function's routes,
    /// triggers and invokes); `--canary 8=10%` sends 10% of its requests,
    /// chosen by request id, to version 8. With `--auto` the canary
    /// promotes itself once it has served `--auto-requests` requests within
    /// `--max-error-rate` and `--max-p99`, and rolls itself back as soon as
    /// it cannot; `mayfly versions` shows each automatic move.
    Set {
        /// Function name.
        name: String,
        /// Alias name: `live` or 1 to 32 of `a-z`, `0-9`, `-`, `_`.
        alias: String,
        /// The version it points at.
        #[arg(value_name = "VERSION")]
        to: u64,
        /// A canary taking a share of the alias's traffic, as
        /// `<version>=<percent>%` (more than 0, less than 100).
        #[arg(long, value_name = "VERSION=PERCENT%", value_parser = parse_canary)]
        canary: Option<(u64, f64)>,
        #[command(flatten)]
        auto: AutoCanaryArgs,
    },
    /// List a function's aliases, their versions and canaries.
    List {
        /// Function name.
        name: String,
    },
    /// Delete an alias (not `live`).
    Delete {
        /// Function name.
        name: String,
        /// Alias name.
        alias: String,
    },
}

/// Thresholds of an automatic canary (`mayfly alias set --canary … --auto`).
#[derive(Debug, Args)]
struct AutoCanaryArgs {
    /// Let the canary promote or roll back itself.
    #[arg(long, requires = "canary")]
    auto: bool,
    /// Requests of the canary to judge it over [default: 100].
    #[arg(long, value_name = "N", requires = "auto")]
    auto_requests: Option<u32>,
    /// Highest share of the canary's requests that may fail (trap, timeout,
    /// out of memory or 5xx), e.g. `1%` [default: 1%].
    #[arg(long, value_name = "PERCENT%", requires = "auto", value_parser = parse_percent)]
    max_error_rate: Option<f64>,
    /// Highest p99 wall time of the canary, e.g. `250ms` [default: twice
    /// the alias's own version's p99 meanwhile, plus 10 ms].
    #[arg(long, value_name = "DURATION", requires = "auto", value_parser = humantime::parse_duration)]
    max_p99: Option<std::time::Duration>,
}

impl AutoCanaryArgs {
    /// The `auto` object of the alias API, if `--auto` was given.
    fn to_json(&self) -> Option<serde_json::Value> {
        if !self.auto {
            return None;
        }
        let mut auto = serde_json::json!({});
        if let Some(requests) = self.auto_requests {
            auto["requests"] = requests.into();
        }
        if let Some(percent) = self.max_error_rate {
            auto["max_error_percent"] = percent.into();
        }
        if let Some(p99) = self.max_p99 {
            auto["max_p99_ms"] = u64::try_from(p99.as_millis()).unwrap_or(u64::MAX).into();
        }
        Some(auto)
    }
}

/// `1%` (or `1`): a percentage.
fn parse_percent(text: &str) -> Result<f64, String> {
    let trimmed = text.trim();
    trimmed
        .strip_suffix('%')
        .unwrap_or(trimmed)
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|percent| percent.is_finite())
        .ok_or_else(|| format!("`{text}` is not a percentage, e.g. 1% or 0.5%"))
}

/// `8=10%` (or `8=10`): a canary version and its weight in percent.
fn parse_canary(text: &str) -> Result<(u64, f64), String> {
    let usage = || format!("`{text}` is not <version>=<percent>%, e.g. 8=10%");
    let (version, percent) = text.split_once('=').ok_or_else(usage)?;
    let version = version.trim().parse().map_err(|_| usage())?;
    let percent = parse_percent(percent).map_err(|_| usage())?;
    Ok((version, percent))
}

/// `mayfly deploy`: the component and its configuration, or a manifest.
#[derive(Debug, Args)]
struct DeployArgs {
    /// Function name (lower-case letters, digits, `-`, `_`). Leave NAME and
    /// COMPONENT out to build and deploy every function in ./mayfly.toml;
    /// an unchanged function gets no new version.
    name: Option<String>,
    /// The component: a .wasm built for wasm32-wasip2 exporting wasi:http/incoming-handler.
    component: Option<PathBuf>,
    /// The manifest to apply when NAME and COMPONENT are left out
    /// [default: mayfly.toml in this folder].
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    manifest: Option<PathBuf>,
    /// Route to serve, as `/prefix` or `host/prefix`; repeat for more.
    #[arg(long = "route", short = 'r')]
    routes: Vec<String>,
    /// Event trigger to attach: `schedule:<expr>` (`schedule:@every 30s`,
    /// `schedule:*/5 * * * *`), `object:<bucket>[/<prefix>]`,
    /// `kv:<bucket>[/<prefix>]` or `queue:<name>`; repeat for more.
    #[arg(long = "trigger", value_name = "SPEC", value_parser = events::parse_trigger_spec)]
    triggers: Vec<events::TriggerSpec>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    scaling: ScalingArgs,
    #[command(flatten)]
    grants: GrantArgs,
}

/// What the function may reach beyond its sandbox; nothing unless granted.
#[derive(Debug, Args)]
struct GrantArgs {
    /// KV bucket it may open through wasi:keyvalue; repeat for more.
    #[arg(long = "kv", value_name = "BUCKET")]
    kv: Vec<String>,
    /// Object bucket its per-invocation credential may use; repeat for more.
    #[arg(long = "object-bucket", value_name = "BUCKET")]
    objects: Vec<String>,
    /// Queue its per-invocation credential may send to; repeat for more.
    #[arg(long = "send-queue", value_name = "QUEUE")]
    queues: Vec<String>,
    /// Outbound HTTP origin it may call: `https://api.example.com`,
    /// `https://*.example.com`, `http://10.0.0.5:8080` or a CIDR such as
    /// `http://10.0.0.0/8` (private addresses only when listed); repeat for more.
    #[arg(long = "outbound", value_name = "ORIGIN")]
    outbound: Vec<String>,
    /// Secret it may read through wasi:config (`mayfly secret set` first); repeat for more.
    #[arg(long = "secret", value_name = "NAME")]
    secrets: Vec<String>,
    /// Variable it reads through wasi:config, as KEY=VALUE; repeat for more.
    #[arg(long = "var", value_name = "KEY=VALUE", value_parser = parse_variable)]
    variables: Vec<(String, String)>,
}

fn parse_credential_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(12 * 3600) {
        return Err(format!("{text} is outside 1s to 12h"));
    }
    Ok(ttl)
}

fn parse_variable(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

/// `mayfly invoke`: the request to send.
#[derive(Debug, Args)]
struct InvokeArgs {
    /// Function name.
    name: String,
    /// Request body.
    #[arg(long, short = 'd', conflicts_with = "data_file")]
    data: Option<String>,
    /// Read the request body from a file (`-` for stdin).
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// Path (and query) the function sees.
    #[arg(long, default_value = "/")]
    path: String,
    /// HTTP method (default: POST with a body, GET without; --async always POSTs).
    #[arg(long, short = 'X', conflicts_with = "async_invoke")]
    method: Option<String>,
    /// Request header as `Name: value`; repeat for more.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// The alias to invoke [default: live].
    #[arg(long, conflicts_with = "async_invoke")]
    alias: Option<String>,
    #[command(flatten)]
    delivery: events::AsyncArgs,
}

/// Per-function limits given at deploy; the node's defaults apply to those
/// left out.
#[derive(Debug, Args)]
struct LimitArgs {
    /// Memory limit in MB (default 128); also the memory billed.
    #[arg(long, value_name = "MB")]
    memory: Option<u32>,
    /// Longest an invocation may run, e.g. 30s or 500ms (default 30s, at most 15m).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Largest request body in bytes (default 16 MiB); larger requests get 413.
    #[arg(long, value_name = "BYTES")]
    max_request_bytes: Option<u64>,
    /// Largest response body in bytes (default 16 MiB).
    #[arg(long, value_name = "BYTES")]
    max_response_bytes: Option<u64>,
    /// Bytes of stdout and of stderr kept per invocation (default 1 MiB).
    #[arg(long, value_name = "BYTES")]
    max_log_bytes: Option<u64>,
}

/// Per-function scaling settings given at deploy.
#[derive(Debug, Args)]
struct ScalingArgs {
    /// Most invocations running at once. Default: up to a quarter of the
    /// node's shared (unreserved) concurrency and memory, so one flooded
    /// function leaves room for the rest (`[scaling] function_share_percent`
    /// in node.toml); set it to let this function burst up to the value.
    #[arg(long, value_name = "N")]
    max_concurrency: Option<u32>,
    /// Invocations kept for this function alone, out of the node's capacity.
    #[arg(long, value_name = "N")]
    reserved_concurrency: Option<u32>,
    /// Requests that may wait when the function is at its limit (default 100; 0: refuse at once with 429).
    #[arg(long, value_name = "N")]
    max_queued: Option<u32>,
    /// Longest a request waits in the queue before 429, e.g. 1s (default 1s, at most 1m).
    #[arg(long, value_parser = humantime::parse_duration)]
    queue_timeout: Option<Duration>,
    /// Keep instances and reuse them one request at a time (hot tier): the
    /// function's initialisation runs once per instance, not per request.
    #[arg(long)]
    reuse: bool,
}

#[derive(Debug, Args)]
struct UsageArgs {
    /// Start of the window: a duration ago (24h, 7d), an RFC 3339 time, or ms since the epoch.
    #[arg(long, default_value = "24h")]
    since: String,
    /// End of the window (exclusive), in the same forms; default now.
    #[arg(long)]
    until: Option<String>,
    /// Group by function, version, hour or day.
    #[arg(long, default_value = "function")]
    by: String,
    /// Only this function.
    #[arg(long)]
    function: Option<String>,
    /// Print CSV (for spreadsheets and billing exports).
    #[arg(long, conflicts_with = "json")]
    csv: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Folder holding all of the node's state (database and blobs).
    #[arg(long, env = "MAYFLY_DATA_DIR", default_value = ".mayfly")]
    data_dir: PathBuf,
    /// Address of the public HTTP gateway.
    #[arg(long, env = "MAYFLY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address of the admin API; off loopback it needs --tls-cert and --tls-key, or --insecure.
    #[arg(long, env = "MAYFLY_ADMIN_LISTEN", default_value = "127.0.0.1:8081")]
    admin_listen: SocketAddr,
    #[command(flatten)]
    tls: serve::AdminTlsArgs,
    /// Most function instances alive at once (running and kept).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_instances: u32,
    /// Most invocations running at once over all functions (default: --max-instances).
    /// Flags override the config file's `[scaling]` table.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_concurrency: Option<u32>,
    /// Memory the node may give functions, in MB: running invocations count
    /// their configured memory, warm and hot functions what they hold
    /// (default: the machine's physical memory).
    #[arg(long, value_name = "MB", value_parser = clap::value_parser!(u64).range(1..))]
    memory_budget: Option<u64>,
    /// Keep-alive policy: `hybrid` (histogram of idle times, after "Serverless
    /// in the Wild") or a fixed time such as `10m` or `fixed:30s`.
    /// [default: hybrid, or `[scaling] keep_alive` in the config file]
    #[arg(long, env = "MAYFLY_KEEP_ALIVE")]
    keep_alive: Option<String>,
    /// How long in-flight requests may finish after SIGTERM (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// How long a function's per-invocation credential (wasi:config key
    /// `mayfly.credential`) stays valid, from 1s to 12h.
    #[arg(long, default_value = "5m", value_parser = parse_credential_ttl)]
    credential_ttl: Duration,
    /// The node's config file (TOML, e.g. a `[prices]` table); default
    /// `<data-dir>/node.toml` when it exists.
    #[arg(long, env = "MAYFLY_CONFIG")]
    config: Option<PathBuf>,
    /// Versions each function keeps: after a deploy, older ones no alias
    /// points at are deleted.
    #[arg(long, default_value_t = mayfly_platform::DEFAULT_KEEP_VERSIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    keep_versions: usize,
    #[command(flatten)]
    connections: serve::ConnectionArgs,
    /// Longest a deploy's compile may take (e.g. 60s, 2m); longer ones are
    /// refused as too large or pathological.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    compile_timeout: Duration,
    /// Most memory a deploy's compile may use, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 2048,
          value_parser = clap::value_parser!(u64).range(64..))]
    compile_memory: u64,
    /// Compiles running at once; more deploys wait (up to --compile-timeout).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    compile_concurrency: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::CompileWorker(args) => serve::compile_worker(&args),
        Command::Dev(args) => dev::run(args),
        Command::Simulate(args) => simulate::run(args, cli.json),
        Command::New(args) => new::run(&args, cli.json),
        command => commands::run(
            &cli.admin_url,
            access::resolve_token(cli.token, &cli.admin_url),
            cli.ca_cert.as_deref(),
            cli.json,
            command,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`mayfly logs -f | head`): not an error.
        Err(error)
            if error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Command};

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn deploy_takes_trigger_specs() {
        let cli = Cli::try_parse_from([
            "mayfly",
            "deploy",
            "f",
            "f.wasm",
            "--trigger",
            "schedule:@every 30s",
            "--trigger",
            "queue:orders",
        ])
        .unwrap();
        let Command::Deploy(args) = cli.command else {
            panic!("not deploy")
        };
        assert_eq!(args.triggers.len(), 2);
        let error = Cli::try_parse_from(["mayfly", "deploy", "f", "f.wasm", "--trigger", "x:y"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown trigger kind `x`"), "{error}");
    }

    #[test]
    fn alias_set_takes_a_canary() {
        let cli = Cli::try_parse_from([
            "mayfly", "alias", "set", "f", "live", "7", "--canary", "8=12.5%",
        ])
        .unwrap();
        let Command::Alias {
            command: super::AliasCommand::Set { to, canary, .. },
        } = cli.command
        else {
            panic!("not alias set")
        };
        assert_eq!((to, canary), (7, Some((8, 12.5))));
        assert!(super::parse_canary("8").is_err());
        assert!(super::parse_canary("x=1%").is_err());
        assert_eq!(super::parse_canary("8=10"), Ok((8, 10.0)));
        // Thresholds need --auto, which needs a canary.
        let auto = |extra: &[&str]| {
            let mut args = vec!["mayfly", "alias", "set", "f", "live", "7"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        assert!(auto(&["--auto"]).is_err());
        assert!(auto(&["--canary", "8=10%", "--max-p99", "250ms"]).is_err());
        let cli = auto(&[
            "--canary",
            "8=10%",
            "--auto",
            "--max-p99",
            "250ms",
            "--max-error-rate",
            "0.5%",
        ])
        .unwrap();
        let Command::Alias {
            command: super::AliasCommand::Set { auto, .. },
        } = cli.command
        else {
            panic!("not alias set")
        };
        assert_eq!(
            auto.to_json(),
            Some(serde_json::json!({"max_error_percent": 0.5, "max_p99_ms": 250}))
        );
    }

    #[test]
    fn async_options_need_async() {
        assert!(Cli::try_parse_from(["mayfly", "invoke", "f", "--max-attempts", "2"]).is_err());
        assert!(Cli::try_parse_from(["mayfly", "invoke", "f", "--async", "-X", "GET"]).is_err());
        let cli = Cli::try_parse_from(["mayfly", "invoke", "f", "--async", "--max-attempts", "2"])
            .unwrap();
        let Command::Invoke(args) = cli.command else {
            panic!("not invoke")
        };
        assert!(args.delivery.async_invoke);
        assert_eq!(args.delivery.max_attempts, Some(2));
    }
}
