//! The command line: `mayfly` and its verbs, with the flags that no single
//! verb's module owns.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::deploy::DeployArgs;
use crate::{access, completions, dev, events, jobs, login, new, secrets, serve, simulate};

/// The help heading of the flags that say which node the client verbs
/// talk to, so `serve --help` keeps them apart from the node's own flags.
const CLIENT: &str = "Client options (which node the CLI talks to)";

/// Mayfly: serverless WebAssembly functions on your own machines.
#[derive(Debug, Parser)]
#[command(name = "mayfly", version, about, propagate_version = true)]
pub struct Cli {
    /// Admin API of the node to talk to [default: the profile's, else
    /// http://127.0.0.1:8081].
    #[arg(long, global = true, env = "MAYFLY_ADMIN_URL", help_heading = CLIENT)]
    pub admin_url: Option<String>,

    /// Bearer token for the admin API [default: the profile's, else a local
    /// node's first admin token from `<MAYFLY_DATA_DIR or .mayfly>/admin.token`].
    #[arg(
        long,
        global = true,
        env = "MAYFLY_TOKEN",
        hide_env_values = true,
        help_heading = CLIENT
    )]
    pub token: Option<String>,

    /// The CLI profile to use (`mayfly profile list`) [default: the default
    /// profile]. --admin-url, --token and their variables override its values.
    #[arg(
        long,
        global = true,
        env = "MAYFLY_PROFILE",
        value_name = "NAME",
        help_heading = CLIENT
    )]
    pub profile: Option<String>,

    /// PEM certificate(s) to trust for an https:// admin URL besides
    /// Mozilla's roots: a private CA or the node's self-signed certificate.
    #[arg(
        long,
        global = true,
        env = "MAYFLY_CA_CERT",
        value_name = "PEM",
        help_heading = CLIENT
    )]
    pub ca_cert: Option<PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: the HTTP gateway and the admin API.
    Serve(Box<serve::ServeArgs>),
    /// Run a local node with ./mayfly.toml's functions, rebuild and redeploy
    /// them when their sources change, and print their logs as they arrive.
    Dev(dev::DevArgs),
    /// Deploy a component as a new version of a function; with no NAME and
    /// COMPONENT, build and deploy every function in ./mayfly.toml.
    Deploy(Box<DeployArgs>),
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
        #[arg(long, value_name = "VERSION", conflicts_with = "fleet")]
        delete: Option<u64>,
        /// Show which version each node of the fleet serves instead (a
        /// rollout in progress shows as nodes on different versions).
        #[arg(long)]
        fleet: bool,
    },
    /// Point a function's aliases (`live`, or names of your own) at
    /// versions, optionally splitting traffic with a canary.
    Alias {
        #[command(subcommand)]
        command: AliasCommand,
    },
    /// Move a function's `live` alias back to the version it pointed at
    /// before its last move, at once and without recompiling.
    ///
    /// Running it again returns to the version it left: two rollbacks
    /// toggle between two versions. To go further back, point `live` at a
    /// version with `mayfly alias set NAME live VERSION` (`mayfly versions
    /// NAME` lists them).
    Rollback {
        /// Function name.
        name: String,
    },
    /// Delete a function and stop serving its routes.
    Delete {
        /// Function name.
        name: String,
    },
    /// Show the node's state and counters (in a fleet, also its NATS
    /// connection and the usage records not yet published).
    Status {
        /// Show the fleet instead: this node's link to it, then every node
        /// with its labels, load and the versions it serves.
        #[arg(long)]
        fleet: bool,
    },
    /// The nodes of the fleet (a node on its own lists itself).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Show usage and cost from the node's ledger.
    Usage(UsageArgs),
    /// Create a function project (Rust, wasm32-wasip2) with a mayfly.toml,
    /// ready to build, test and deploy.
    New(new::NewArgs),
    /// Replay an invocation trace (Azure 2021 CSV or synthetic) against
    /// keep-alive policies: cold starts against memory kept warm for nothing.
    Simulate(simulate::SimulateArgs),
    /// Batch jobs: run a function once per object under a prefix, with
    /// progress, retries and a summary.
    Job {
        #[command(subcommand)]
        command: jobs::JobCommand,
    },
    /// Pipelines (`[pipelines.NAME]` in mayfly.toml, stored by `mayfly
    /// deploy`): chains of batch jobs, each step over the output of the one
    /// before, run incrementally by hand, on a schedule or as objects arrive.
    Pipeline {
        #[command(subcommand)]
        command: crate::pipelines::PipelineCommand,
    },
    /// Store, fetch and list objects in the node's buckets.
    Object {
        #[command(subcommand)]
        command: events::objects::ObjectCommand,
    },
    /// Get, set and list keys in the node's key-value store.
    Kv {
        #[command(subcommand)]
        command: events::kv::KvCommand,
    },
    /// Send, receive and acknowledge messages in the node's queues.
    ///
    /// In a fleet with leaf sites, a queue named `NAME@SITE` is placed at
    /// site SITE (its server's JetStream domain, as `mayfly status --fleet`
    /// shows): it is stored in that site's own event store, so the site's
    /// nodes send and deliver its messages while the site is cut off from
    /// the hub. Other nodes reach it through the hub while the links are up
    /// (503 "unreachable" otherwise). A queue without `@` is stored at the
    /// hub.
    Queue {
        #[command(subcommand)]
        command: events::queues::QueueCommand,
    },
    /// Attach event sources (schedules, objects, KV, queues) to functions.
    Trigger {
        #[command(subcommand)]
        command: events::triggers::TriggerCommand,
    },
    /// Inspect, redrive and purge a function's dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: events::dlq::DlqCommand,
    },
    /// Set, list and delete secrets (encrypted at rest, never shown again;
    /// functions read them through wasi:config) and rotate the master key.
    Secret {
        #[command(subcommand)]
        command: secrets::SecretCommand,
    },
    /// Upload, list and delete ONNX models that functions run through
    /// wasi:nn (`--model NAME` grants one).
    Model {
        #[command(subcommand)]
        command: crate::models::ModelCommand,
    },
    /// Save a node's admin URL, token and CA as a CLI profile, so every
    /// verb reaches it from any folder.
    Login(login::LoginArgs),
    /// Forget a CLI profile (the active one, or --profile NAME).
    Logout,
    /// List the CLI's profiles or choose the default one.
    Profile {
        #[command(subcommand)]
        command: login::ProfileCommand,
    },
    /// Create, list and revoke admin API tokens.
    Token {
        #[command(subcommand)]
        command: access::TokenCommand,
    },
    /// Show the audit log: who did what to the node, and when.
    Audit(access::AuditArgs),
    /// Print a shell completion script, e.g. `mayfly completions bash >
    /// ~/.local/share/bash-completion/completions/mayfly`.
    Completions(completions::CompletionsArgs),
    /// Print mayfly's man page (roff: `mayfly man | man -l -`), or write one
    /// page per verb with --dir.
    Man(completions::ManArgs),
}

/// `mayfly node`: the fleet's members.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List the live nodes: labels, load, and the version each serves.
    List,
}

/// `mayfly alias`: a function's named pointers to versions.
#[derive(Debug, Subcommand)]
pub enum AliasCommand {
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
pub struct AutoCanaryArgs {
    /// Let the canary promote or roll back itself.
    #[arg(long, requires = "canary")]
    pub auto: bool,
    /// Requests of the canary to judge it over [default: 100].
    #[arg(long, value_name = "N", requires = "auto")]
    pub auto_requests: Option<u32>,
    /// Highest share of the canary's requests that may fail (trap, timeout,
    /// out of memory or 5xx), e.g. `1%` [default: 1%].
    #[arg(long, value_name = "PERCENT%", requires = "auto", value_parser = parse_percent)]
    pub max_error_rate: Option<f64>,
    /// Highest p99 wall time of the canary, e.g. `250ms` [default: twice
    /// the alias's own version's p99 meanwhile, plus 10 ms].
    #[arg(long, value_name = "DURATION", requires = "auto", value_parser = humantime::parse_duration)]
    pub max_p99: Option<std::time::Duration>,
}

impl AutoCanaryArgs {
    /// The `auto` object of the alias API, if `--auto` was given.
    pub fn to_json(&self) -> Option<serde_json::Value> {
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

/// `mayfly invoke`: the request to send.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// Function name.
    pub name: String,
    /// Request body.
    #[arg(long, short = 'd', conflicts_with = "data_file")]
    pub data: Option<String>,
    /// Read the request body from a file (`-` for stdin).
    #[arg(long)]
    pub data_file: Option<PathBuf>,
    /// Path (and query) the function sees.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// HTTP method (default: POST with a body, GET without; --async always POSTs).
    #[arg(long, short = 'X', conflicts_with = "async_invoke")]
    pub method: Option<String>,
    /// Request header as `Name: value`; repeat for more.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// The alias to invoke [default: live].
    #[arg(long, conflicts_with = "async_invoke")]
    pub alias: Option<String>,
    #[command(flatten)]
    pub delivery: events::invoke_async::AsyncArgs,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Start of the window: a duration ago (24h, 7d), an RFC 3339 time, or ms since the epoch
    /// [default: 24h; with --job: the job's whole life].
    #[arg(long)]
    pub since: Option<String>,
    /// End of the window (exclusive), in the same forms; default now.
    #[arg(long)]
    pub until: Option<String>,
    /// Group by function, version, hour or day.
    #[arg(long, default_value = "function", value_parser = ["function", "version", "hour", "day"])]
    pub by: String,
    /// Only this function.
    #[arg(long)]
    pub function: Option<String>,
    /// Only the invocations of this batch job (`mayfly job list`).
    #[arg(long, value_name = "ID")]
    pub job: Option<String>,
    /// Print CSV (for spreadsheets and billing exports).
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
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

    #[test]
    fn every_shell_gets_a_script_naming_the_verbs_but_not_the_hidden_ones() {
        use clap_complete::Shell;
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let script = crate::completions::completion_script(shell, Cli::command());
            let script = String::from_utf8_lossy(&script).into_owned();
            for verb in ["deploy", "logs", "rollback", "completions"] {
                assert!(script.contains(verb), "{shell}: no `{verb}`");
            }
            assert!(
                !script.contains("compile-worker"),
                "{shell}: the internal compile-worker shows"
            );
        }
    }
}
