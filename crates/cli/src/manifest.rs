//! `mayfly.toml`: a declarative description of one or more functions, which
//! `mayfly deploy` (with no NAME and COMPONENT) builds and applies.
//!
//! ```toml
//! [functions.hello]                  # the table key is the function name
//! component = "target/wasm32-wasip2/release/hello.wasm"   # relative to this file
//! build = "cargo build --release --target wasm32-wasip2"  # optional
//! routes = ["/hello"]
//! strip_prefix = true                # the guest sees /x for /hello/x
//! triggers = ["schedule:@every 1m"]
//! [functions.hello.grants]
//! kv = ["cache"]
//! [functions.hello.variables]        # read through wasi:config
//! greeting = "hi"
//! [functions.hello.env]              # environment variables (std::env)
//! LOG_LEVEL = "debug"
//! [functions.hello.env_secrets]      # variable = secret name
//! API_KEY = "api-key"
//! [functions.hello.placement]        # only fleet nodes with these labels run it
//! site = "fra1"
//! ```
//!
//! Each function becomes exactly the deploy request `mayfly deploy NAME
//! COMPONENT --flags` sends (`commands::send_deploy`), so the node cannot
//! tell them apart; deploying an unchanged function again creates no
//! version.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use mayfly_store::{FunctionLimits, FunctionScaling};
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use crate::client::AdminClient;
use crate::deploy::{FunctionDeploy, GrantArgs, LimitArgs, ScalingArgs, send_deploy};
use crate::events::triggers::parse_trigger_spec;
use crate::flags::{duration_in, ms};

/// The manifest `mayfly deploy` reads when given no NAME and COMPONENT.
pub const DEFAULT_PATH: &str = "mayfly.toml";

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    /// Functions by name.
    #[serde(default)]
    functions: BTreeMap<String, Spanned<FunctionEntry>>,
    /// Pipelines by name, sent to the node as they are written (it checks
    /// them; see `pipelines.rs`).
    #[serde(default)]
    pipelines: toml::Table,
}

/// One `[functions.<name>]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionEntry {
    component: Spanned<String>,
    build: Option<String>,
    #[serde(default)]
    routes: Vec<String>,
    strip_prefix: Option<StripPrefix>,
    memory_mb: Option<u32>,
    timeout: Option<Spanned<String>>,
    max_request_bytes: Option<u64>,
    max_response_bytes: Option<u64>,
    max_log_bytes: Option<u64>,
    #[serde(default)]
    streaming_request: bool,
    max_concurrency: Option<u32>,
    reserved_concurrency: Option<u32>,
    max_queued: Option<u32>,
    queue_timeout: Option<Spanned<String>>,
    #[serde(default)]
    reuse: bool,
    #[serde(default)]
    triggers: Vec<Spanned<String>>,
    #[serde(default)]
    grants: GrantsEntry,
    #[serde(default)]
    variables: BTreeMap<String, String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    env_secrets: BTreeMap<String, String>,
    #[serde(default)]
    placement: BTreeMap<String, String>,
}

/// `strip_prefix = true` (every route), `"/api"` or `["/api"]` (those).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StripPrefix {
    All(bool),
    Route(String),
    Routes(Vec<String>),
}

/// `[functions.<name>.grants]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantsEntry {
    #[serde(default)]
    kv: Vec<String>,
    #[serde(default)]
    objects: Vec<String>,
    #[serde(default)]
    queues: Vec<String>,
    #[serde(default)]
    outbound: Vec<String>,
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    models: Vec<String>,
}

/// A parsed manifest: its functions in the order the file lists them.
#[derive(Debug)]
pub struct Manifest {
    /// The folder the manifest's paths are relative to (and builds run in).
    pub dir: PathBuf,
    /// Its functions.
    pub functions: Vec<ManifestFunction>,
    /// Its pipelines, by name, as JSON (`PUT /v1/pipelines/NAME`'s body).
    pub pipelines: Vec<(String, Value)>,
}

/// One function of a manifest, its paths resolved.
#[derive(Debug)]
pub struct ManifestFunction {
    /// Shell command run in the manifest's folder before deploying.
    pub build: Option<String>,
    /// The deploy, as `mayfly deploy NAME COMPONENT --flags` would send it.
    pub deploy: FunctionDeploy,
}

/// A manifest error located in the file: `mayfly.toml line 3, column 1: …`
/// and the offending line.
#[derive(Debug)]
struct Located {
    file: String,
    line: usize,
    column: usize,
    source_line: String,
    message: String,
}

impl Located {
    fn new(file: &Path, text: &str, span: Range<usize>, message: String) -> Self {
        let start = span.start.min(text.len());
        let before = text.get(..start).unwrap_or("");
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_end = text
            .get(start..)
            .and_then(|rest| rest.find('\n'))
            .map_or(text.len(), |i| start + i);
        Self {
            file: file.display().to_string(),
            line: before.matches('\n').count() + 1,
            column: text.get(line_start..start).unwrap_or("").chars().count() + 1,
            source_line: text
                .get(line_start..line_end)
                .unwrap_or("")
                .trim_end()
                .to_string(),
            message,
        }
    }
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} line {}, column {}: {}\n{:>5} | {}",
            self.file, self.line, self.column, self.message, self.line, self.source_line
        )
    }
}

impl std::error::Error for Located {}

impl Manifest {
    /// Reads and parses the manifest at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            if path == Path::new(DEFAULT_PATH) {
                format!(
                    "cannot read {DEFAULT_PATH} in this folder: deploy with \
                     `mayfly deploy NAME COMPONENT`, give `--manifest PATH`, or start a \
                     project with `mayfly new`"
                )
            } else {
                format!("cannot read the manifest {}", path.display())
            }
        })?;
        Self::parse(path, &text)
    }

    /// Parses manifest `text`, read from `path` (named in errors; its
    /// folder is where relative paths start).
    pub fn parse(path: &Path, text: &str) -> anyhow::Result<Self> {
        let file: ManifestFile = toml::from_str(text).map_err(|error| match error.span() {
            Some(span) => anyhow::Error::new(Located::new(
                path,
                text,
                span,
                error.message().trim_end().to_string(),
            )),
            None => anyhow::anyhow!("{}: {}", path.display(), error.message().trim_end()),
        })?;
        if file.functions.is_empty() && file.pipelines.is_empty() {
            bail!(
                "{}: no functions: describe one in a `[functions.<name>]` table with at least \
                 `component = \"path/to/fn.wasm\"`",
                path.display()
            );
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut entries: Vec<(String, Spanned<FunctionEntry>)> =
            file.functions.into_iter().collect();
        entries.sort_by_key(|(_, entry)| entry.span().start);
        let functions = entries
            .into_iter()
            .map(|(name, entry)| function(path, text, &dir, name, entry.into_inner()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let pipelines = file
            .pipelines
            .into_iter()
            .map(|(name, table)| {
                let spec = serde_json::to_value(&table).with_context(|| {
                    format!("{}: pipeline `{name}` cannot be read", path.display())
                })?;
                Ok((name, spec))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            dir,
            functions,
            pipelines,
        })
    }
}

/// Turns one table into the deploy it describes.
fn function(
    path: &Path,
    text: &str,
    dir: &Path,
    name: String,
    entry: FunctionEntry,
) -> anyhow::Result<ManifestFunction> {
    let located = |span: Range<usize>, message: String| {
        anyhow::Error::new(Located::new(path, text, span, message))
    };
    // The same bounds as the flags (`mayfly deploy --timeout`), so a manifest
    // names its own key and line rather than the node's `timeout_ms`.
    let duration = |value: Option<Spanned<String>>, key: &str, min_ms: u64, max_ms: u64| {
        let parse = duration_in(ms(min_ms), ms(max_ms));
        value
            .map(|value| {
                parse(value.get_ref()).map_err(|error| {
                    located(
                        value.span(),
                        format!(
                            "function `{name}`: `{key}` is `{}`: {error}",
                            value.get_ref()
                        ),
                    )
                })
            })
            .transpose()
    };
    let timeout = duration(entry.timeout, "timeout", 1, FunctionLimits::MAX_TIMEOUT_MS)?;
    let queue_timeout = duration(
        entry.queue_timeout,
        "queue_timeout",
        0,
        FunctionScaling::MAX_QUEUE_TIMEOUT_MS,
    )?;
    let triggers = entry
        .triggers
        .into_iter()
        .map(|spec| {
            parse_trigger_spec(spec.get_ref()).map_err(|error| {
                located(
                    spec.span(),
                    format!(
                        "function `{name}`: trigger `{}` is not valid: {error}",
                        spec.get_ref()
                    ),
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (key, value) in &entry.placement {
        mayfly_store::check_label(key, value).map_err(|error| {
            anyhow::anyhow!("function `{name}`: [functions.{name}.placement]: {error}")
        })?;
    }
    if entry.component.get_ref().trim().is_empty() {
        return Err(located(
            entry.component.span(),
            format!("function `{name}`: `component` is empty; give the path of its .wasm"),
        ));
    }
    let component = dir.join(entry.component.into_inner());
    let build = entry.build.filter(|command| !command.trim().is_empty());
    Ok(ManifestFunction {
        build,
        deploy: FunctionDeploy {
            name,
            component,
            strip_prefix: match entry.strip_prefix {
                Some(StripPrefix::All(true)) => entry.routes.clone(),
                Some(StripPrefix::Route(route)) => vec![route],
                Some(StripPrefix::Routes(routes)) => routes,
                Some(StripPrefix::All(false)) | None => Vec::new(),
            },
            routes: entry.routes,
            triggers,
            limits: LimitArgs {
                memory: entry.memory_mb,
                timeout,
                max_request_bytes: entry.max_request_bytes,
                max_response_bytes: entry.max_response_bytes,
                max_log_bytes: entry.max_log_bytes,
                streaming_request: entry.streaming_request,
            },
            scaling: ScalingArgs {
                max_concurrency: entry.max_concurrency,
                reserved_concurrency: entry.reserved_concurrency,
                max_queued: entry.max_queued,
                queue_timeout,
                reuse: entry.reuse,
            },
            grants: GrantArgs {
                kv: entry.grants.kv,
                objects: entry.grants.objects,
                queues: entry.grants.queues,
                outbound: entry.grants.outbound,
                secrets: entry.grants.secrets,
                models: entry.grants.models,
                variables: entry.variables.into_iter().collect(),
                env: entry.env.into_iter().collect(),
                env_secrets: entry.env_secrets.into_iter().collect(),
            },
            placement: entry.placement,
        },
    })
}

/// `mayfly deploy` with no NAME and COMPONENT: builds what the manifest at
/// `path` asks to, then deploys each of its functions, one line each.
pub fn apply(client: &AdminClient, json: bool, path: &Path) -> anyhow::Result<()> {
    apply_manifest(client, json, &Manifest::load(path)?, None)
}

/// Builds and deploys a loaded manifest through `client` (`mayfly deploy`
/// and `mayfly dev`); a failed build deploys nothing.
/// `builds`: run build commands in their own process group, recorded
/// there so a stopping `mayfly dev` can end them (`None`: the caller's
/// group, so a terminal's Ctrl-C reaches them as it reaches `mayfly`).
pub fn apply_manifest(
    client: &AdminClient,
    json: bool,
    manifest: &Manifest,
    builds: Option<&Builds>,
) -> anyhow::Result<()> {
    build(manifest, builds)?;
    // Every component must exist before anything is deployed.
    for function in &manifest.functions {
        let FunctionDeploy {
            name, component, ..
        } = &function.deploy;
        if !component.is_file() {
            bail!(
                "function `{name}`: the component {} does not exist{}",
                component.display(),
                if function.build.is_some() {
                    " after its build: check `component` in the manifest"
                } else {
                    ": build it first, or give the function a `build` command"
                }
            );
        }
    }
    for function in &manifest.functions {
        let name = &function.deploy.name;
        let outcome = send_deploy(client, &function.deploy, !json)
            .with_context(|| format!("deploying `{name}` failed"))?;
        if json {
            println!("{outcome}");
            continue;
        }
        crate::deploy::print_warnings(&outcome);
        if outcome["unchanged"] == Value::Bool(true) {
            println!("{}", summary(name, &outcome));
        } else {
            println!(
                "{} ({})",
                summary(name, &outcome),
                crate::progress::compile_note(&outcome)
            );
        }
    }
    // After the functions: the node refuses a pipeline whose steps name a
    // function it does not have.
    for (name, spec) in &manifest.pipelines {
        let body = serde_json::to_vec(spec)?;
        let headers = [("content-type".to_string(), "application/json".to_string())];
        let path = format!("/v1/pipelines/{}", crate::client::segment(name));
        let outcome: Value = client
            .send_json("PUT", &path, &headers, Some(&body))
            .with_context(|| format!("deploying pipeline `{name}` failed"))?;
        if json {
            println!("{outcome}");
            continue;
        }
        for warning in outcome["warnings"].as_array().into_iter().flatten() {
            eprintln!("warning: {}", crate::output::text(warning));
        }
        println!(
            "pipeline {name}: {}",
            if outcome["changed"] == Value::Bool(true) {
                "stored"
            } else {
                "unchanged"
            }
        );
    }
    Ok(())
}

/// Runs each function's build command (an identical command once) in the
/// manifest's folder, its output streaming to stderr so stdout stays the
/// deploy's answer.
/// The build command running for a `mayfly dev` session, if any.
#[derive(Default)]
pub struct Builds {
    state: std::sync::Mutex<BuildState>,
}

#[derive(Default)]
struct BuildState {
    /// Process group of the running build (its shell's pid).
    running: Option<u32>,
    /// Set by [`Builds::terminate`]: no build starts after it.
    stopped: bool,
}

impl Builds {
    /// Ends the running build, and refuses any later one: sends SIGTERM,
    /// then SIGCONT (a background job stopped by the terminal only sees a
    /// signal once continued), to the build's process group (the shell and
    /// the cargo it started). `kill(1)` rather than a libc binding: the
    /// CLI has no other use for one, and it runs once per session.
    pub fn terminate(&self) {
        let mut state = self.lock();
        state.stopped = true;
        if let Some(group) = state.running {
            for signal in ["-TERM", "-CONT"] {
                let _ = Command::new("kill")
                    .args([signal, "--", &format!("-{group}")])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BuildState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) fn build(manifest: &Manifest, builds: Option<&Builds>) -> anyhow::Result<()> {
    let mut done = HashSet::new();
    for function in &manifest.functions {
        let Some(command) = &function.build else {
            continue;
        };
        let name = &function.deploy.name;
        if !done.insert(command.as_str()) {
            continue;
        }
        eprintln!("{name}: building with `{command}`");
        let mut shell = Command::new("sh");
        shell
            .arg("-c")
            .arg(command)
            .current_dir(&manifest.dir)
            .stdout(std::io::stderr());
        let mut child = match builds {
            None => shell.spawn(),
            Some(builds) => {
                // Its own group (the group id is the shell's pid), without the
                // terminal's stdin, which a background group may not read.
                std::os::unix::process::CommandExt::process_group(&mut shell, 0);
                shell.stdin(std::process::Stdio::null());
                // Spawned under the lock, so a stop either sees this build or
                // is seen by it.
                let mut state = builds.lock();
                if state.stopped {
                    bail!("stopping: the build of `{name}` was not started");
                }
                let child = shell.spawn();
                state.running = child.as_ref().ok().map(std::process::Child::id);
                child
            }
        }
        .with_context(|| format!("cannot run the build of `{name}` (`{command}`)"))?;
        let status = child.wait();
        if let Some(builds) = builds {
            builds.lock().running = None;
        }
        let status = status
            .with_context(|| format!("cannot wait for the build of `{name}` (`{command}`)"))?;
        if !status.success() {
            bail!("the build of `{name}` (`{command}`) failed: {status}; nothing was deployed");
        }
    }
    Ok(())
}

/// One line per function: `hello: version 3 (unchanged)` or
/// `hello: version 4 deployed, routes /hello`.
pub(crate) fn summary(name: &str, outcome: &Value) -> String {
    let version = &outcome["version"];
    if outcome["unchanged"] == Value::Bool(true) {
        return format!("{name}: version {version} (unchanged)");
    }
    let routes: Vec<&str> = outcome["config"]["routes"]
        .as_array()
        .map(|routes| routes.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if routes.is_empty() {
        format!("{name}: version {version} deployed, no routes")
    } else {
        format!(
            "{name}: version {version} deployed, routes {}",
            routes.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    const FULL: &str = r#"
# mayfly.toml — paths are relative to this file's directory
[functions.hello]
component = "target/wasm32-wasip2/release/hello.wasm"
build = "cargo build --release --target wasm32-wasip2"
routes = ["/hello"]
memory_mb = 128
timeout = "30s"
max_request_bytes = 16777216
max_response_bytes = 16777216
max_log_bytes = 1048576
streaming_request = true
max_concurrency = 100
reserved_concurrency = 0
max_queued = 100
queue_timeout = "1s"
reuse = false
triggers = ["schedule:@every 1m", "queue:orders"]
[functions.hello.grants]
kv = ["cache"]
objects = []
queues = []
outbound = ["https://api.example.com"]
secrets = ["db_password"]
[functions.hello.variables]
greeting = "hi"

[functions.another]
component = "/abs/another.wasm"
"#;

    fn parse(text: &str) -> anyhow::Result<Manifest> {
        Manifest::parse(Path::new("project/mayfly.toml"), text)
    }

    fn error(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    #[test]
    fn the_full_example_parses() {
        let manifest = parse(FULL).unwrap();
        assert_eq!(manifest.dir, Path::new("project"));
        let names: Vec<&str> = manifest
            .functions
            .iter()
            .map(|f| f.deploy.name.as_str())
            .collect();
        assert_eq!(names, ["hello", "another"], "in the file's order");
        let hello = &manifest.functions[0];
        assert_eq!(
            hello.build.as_deref(),
            Some("cargo build --release --target wasm32-wasip2")
        );
        let deploy = &hello.deploy;
        assert_eq!(
            deploy.component,
            Path::new("project/target/wasm32-wasip2/release/hello.wasm")
        );
        assert_eq!(deploy.routes, ["/hello"]);
        assert_eq!(
            deploy.triggers,
            [
                parse_trigger_spec("schedule:@every 1m").unwrap(),
                parse_trigger_spec("queue:orders").unwrap(),
            ]
        );
        let limits = &deploy.limits;
        assert_eq!(limits.memory, Some(128));
        assert_eq!(limits.timeout, secs(30));
        assert_eq!(limits.max_request_bytes, Some(16_777_216));
        assert_eq!(limits.max_response_bytes, Some(16_777_216));
        assert_eq!(limits.max_log_bytes, Some(1_048_576));
        assert!(limits.streaming_request);
        let scaling = &deploy.scaling;
        assert_eq!(scaling.max_concurrency, Some(100));
        assert_eq!(scaling.reserved_concurrency, Some(0));
        assert_eq!(scaling.max_queued, Some(100));
        assert_eq!(scaling.queue_timeout, secs(1));
        assert!(!scaling.reuse);
        let grants = &deploy.grants;
        assert_eq!(grants.kv, ["cache"]);
        assert!(grants.objects.is_empty() && grants.queues.is_empty());
        assert_eq!(grants.outbound, ["https://api.example.com"]);
        assert_eq!(grants.secrets, ["db_password"]);
        assert_eq!(
            grants.variables,
            [("greeting".to_string(), "hi".to_string())]
        );

        let another = &manifest.functions[1];
        assert_eq!(another.build, None);
        assert_eq!(another.deploy.component, Path::new("/abs/another.wasm"));
        assert!(another.deploy.routes.is_empty() && another.deploy.triggers.is_empty());
        assert_eq!(another.deploy.limits.memory, None);
        assert!(!another.deploy.limits.streaming_request);
        assert_eq!(another.deploy.scaling.queue_timeout, None);
    }

    #[test]
    fn the_same_config_as_the_flags() {
        // The manifest and `mayfly deploy NAME COMPONENT --flags` send the
        // same config part.
        let manifest = parse(FULL).unwrap();
        let config = crate::deploy::config_json(&manifest.functions[0].deploy);
        assert_eq!(
            config,
            serde_json::json!({
                "routes": ["/hello"],
                "limits": {
                    "memory_mb": 128,
                    "timeout_ms": 30000,
                    "max_request_bytes": 16777216,
                    "max_response_bytes": 16777216,
                    "max_log_bytes": 1048576,
                },
                "scaling": {
                    "max_concurrency": 100,
                    "reserved_concurrency": 0,
                    "max_queued": 100,
                    "queue_timeout_ms": 1000,
                },
                "grants": {
                    "kv": ["cache"],
                    "objects": [],
                    "queues": [],
                    "outbound": ["https://api.example.com"],
                    "secrets": ["db_password"],
                },
                "variables": {"greeting": "hi"},
                "streaming_request": true,
            })
        );
    }

    #[test]
    fn environment_and_stripped_routes_reach_the_config() {
        let config = |extra: &str| {
            let manifest = parse(&format!(
                "[functions.f]\ncomponent = \"f.wasm\"\nroutes = [\"/a\", \"/b\"]\n{extra}"
            ))
            .unwrap();
            crate::deploy::config_json(&manifest.functions[0].deploy)
        };
        assert_eq!(
            config("strip_prefix = true\n")["strip_prefix"],
            serde_json::json!(["/a", "/b"])
        );
        assert_eq!(
            config("strip_prefix = \"/b\"\n")["strip_prefix"],
            serde_json::json!(["/b"])
        );
        assert_eq!(
            config("strip_prefix = [\"/a\"]\n")["strip_prefix"],
            serde_json::json!(["/a"])
        );
        assert!(
            config("strip_prefix = false\n")
                .get("strip_prefix")
                .is_none()
        );
        let with_env = config(
            "[functions.f.env]\nLEVEL = \"debug\"\n[functions.f.env_secrets]\nKEY = \"api-key\"\n",
        );
        assert_eq!(with_env["env"], serde_json::json!({"LEVEL": "debug"}));
        assert_eq!(
            with_env["env_secrets"],
            serde_json::json!({"KEY": "api-key"})
        );
        assert!(config("").get("env").is_none());
    }

    #[test]
    fn a_placement_reaches_the_config_and_a_malformed_one_is_refused() {
        let manifest = parse(
            "[functions.f]\ncomponent = \"f.wasm\"\n[functions.f.placement]\nsite = \"fra1\"\nregion = \"eu\"\n",
        )
        .unwrap();
        let config = crate::deploy::config_json(&manifest.functions[0].deploy);
        assert_eq!(
            config["placement"],
            serde_json::json!({"region": "eu", "site": "fra1"})
        );
        let unplaced = parse("[functions.f]\ncomponent = \"f.wasm\"\n").unwrap();
        assert!(
            crate::deploy::config_json(&unplaced.functions[0].deploy)
                .get("placement")
                .is_none()
        );
        let message = error(
            "[functions.f]\ncomponent = \"f.wasm\"\n[functions.f.placement]\nsite = \"fra 1\"\n",
        );
        assert!(
            message.contains("[functions.f.placement]") && message.contains("1-63 letters"),
            "{message}"
        );
    }

    #[test]
    fn a_misspelled_key_is_named_with_its_line() {
        let message =
            error("[functions.hello]\ncomponent = \"hello.wasm\"\nrotues = [\"/hello\"]\n");
        assert!(message.contains("rotues"), "{message}");
        assert!(message.contains("line 3"), "{message}");
        assert!(message.contains("project/mayfly.toml"), "{message}");
        assert!(message.contains("routes"), "the valid keys: {message}");
    }

    #[test]
    fn an_unknown_grant_is_named_with_its_line() {
        let message = error(
            "[functions.hello]\ncomponent = \"hello.wasm\"\n\n[functions.hello.grants]\n\
             kv = [\"cache\"]\nbuckets = [\"b\"]\n",
        );
        assert!(message.contains("buckets"), "{message}");
        assert!(message.contains("line 6"), "{message}");
        let message = error("[function.hello]\ncomponent = \"hello.wasm\"\n");
        assert!(message.contains("function"), "{message}");
        assert!(message.contains("line 1"), "{message}");
        let message = error(
            "[functions.hello]\ncomponent = \"hello.wasm\"\n[functions.hello.variables]\n\
             port = 8080\n",
        );
        assert!(message.contains("line 4"), "{message}");
    }

    #[test]
    fn a_bad_trigger_spec_is_named_with_its_line() {
        let message = error(
            "[functions.hello]\ncomponent = \"hello.wasm\"\n\
             triggers = [\"queue:orders\",\n  \"cron:*/5 * * * *\"]\n",
        );
        assert!(message.contains("cron:*/5 * * * *"), "{message}");
        assert!(message.contains("unknown trigger kind `cron`"), "{message}");
        assert!(message.contains("function `hello`"), "{message}");
        assert!(message.contains("line 4"), "{message}");
    }

    #[test]
    fn a_bad_duration_is_named_with_its_line() {
        let message =
            error("[functions.hello]\ncomponent = \"hello.wasm\"\ntimeout = \"thirty\"\n");
        assert!(message.contains("`timeout`"), "{message}");
        assert!(message.contains("line 3"), "{message}");
        // Out of the node's range: the manifest's key, not the API's
        // `timeout_ms`.
        let message =
            error("[functions.hello]\ncomponent = \"hello.wasm\"\nqueue_timeout = \"2m\"\n");
        assert!(
            message.contains("`queue_timeout` is `2m`: give 0s to 1m"),
            "{message}"
        );
        assert!(message.contains("line 3"), "{message}");
    }

    #[test]
    fn missing_pieces_are_explained() {
        let message = error("");
        assert!(message.contains("no functions"), "{message}");
        let message = error("[functions.hello]\nroutes = [\"/hello\"]\n");
        assert!(message.contains("component"), "{message}");
    }

    #[test]
    fn relative_paths_start_at_the_manifest() {
        let text = "[functions.a]\ncomponent = \"a.wasm\"\n\
                    [functions.b]\ncomponent = \"../b/b.wasm\"\n";
        let here = Manifest::parse(Path::new("mayfly.toml"), text).unwrap();
        assert_eq!(here.dir, Path::new("."));
        assert_eq!(here.functions[0].deploy.component, Path::new("./a.wasm"));
        let there = Manifest::parse(Path::new("/srv/app/mayfly.toml"), text).unwrap();
        assert_eq!(there.dir, Path::new("/srv/app"));
        assert_eq!(
            there.functions[0].deploy.component,
            Path::new("/srv/app/a.wasm")
        );
        assert_eq!(
            there.functions[1].deploy.component,
            Path::new("/srv/app/../b/b.wasm")
        );
    }

    #[test]
    fn summaries() {
        let unchanged = serde_json::json!({"version": 3, "unchanged": true});
        assert_eq!(summary("hello", &unchanged), "hello: version 3 (unchanged)");
        let deployed = serde_json::json!({
            "version": 4, "unchanged": false, "config": {"routes": ["/hello", "/hi"]}
        });
        assert_eq!(
            summary("hello", &deployed),
            "hello: version 4 deployed, routes /hello, /hi"
        );
    }
}
