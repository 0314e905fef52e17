//! `mayfly dev`: the local loop. A node runs in this process with its state
//! in `.mayfly-dev/` next to the manifest; the manifest is applied (built
//! and deployed) at start and again whenever a source file changes; each
//! function's log lines are printed as they arrive.
//!
//! The node runs in-process (`RunningNode`, as `mayfly serve` starts it)
//! rather than as a child `mayfly serve`: one process to stop, one exit
//! code, and no ports or token to fish out of another process's output.
//! Everything else goes through the node's admin API like any client:
//! deploys through the code `mayfly deploy` uses, logs through the same
//! stream `mayfly logs --follow` reads. Those are blocking (ureq), so they
//! run on plain threads beside the node's async runtime.
//!
//! Which files are sources, and how changes are noticed: [`watch`].

mod watch;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead as _, BufReader, IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use mayfly_platform::{NodeConfig, RunningNode, ServeConfig};
use mayfly_store::{LogRecord, Stores};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::client::{AdminClient, segment};
use crate::deploy::{FunctionDeploy, config_json, send_deploy};
use crate::manifest::{self, Manifest};
use watch::Watcher;

/// The data directory's name, next to the manifest, unless --data-dir.
const DATA_DIR: &str = ".mayfly-dev";
/// The file in the data directory holding the node's admin token.
const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The gateway's default address: beside `mayfly serve`'s 8080, so a dev
/// loop and a node started from the README run side by side.
const DEFAULT_LISTEN: &str = "127.0.0.1:8090";
/// The admin API's default address, beside `mayfly serve`'s 8081. A fixed
/// port rather than a free one, so `MAYFLY_ADMIN_URL` stays right across
/// restarts of the loop.
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8091";
/// In-flight requests get this long to finish on Ctrl-C.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Wait before following a function's logs again (not deployed yet, or
/// the stream broke).
const FOLLOW_RETRY: Duration = Duration::from_secs(1);
/// The file in the data directory written before and after each build:
/// its modification times bound the build in the file system's own clock.
const BUILD_CLOCK_FILE: &str = "build-clock";

/// `mayfly dev`'s flags.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The manifest to run; the sources watched are those in its folder.
    #[arg(long, value_name = "PATH", default_value = manifest::DEFAULT_PATH)]
    manifest: PathBuf,
    /// Address of the public HTTP gateway (`mayfly serve` defaults to
    /// 8080; 0 picks a free port).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Address of the admin API (loopback only; `mayfly serve` defaults
    /// to 8081; 0 picks a free port).
    #[arg(long, default_value = DEFAULT_ADMIN_LISTEN)]
    admin_listen: SocketAddr,
    /// Folder holding the dev node's state [default: .mayfly-dev next to
    /// the manifest].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Notice changes by scanning the sources (times and contents) every
    /// 500 ms instead of through inotify: for folders on file systems that do not report
    /// changes (network mounts, some VM and container shares).
    #[arg(long)]
    poll: bool,
    /// How the dev node writes its own warnings and errors to stderr:
    /// `text` or `json` (one object per line) [default: text]
    #[arg(long, env = "MAYFLY_LOG_FORMAT", value_name = "FORMAT",
          value_parser = crate::serve::log_format_parser())]
    log_format: Option<mayfly_platform::config::LogFormat>,
}

/// Runs `mayfly dev` until Ctrl-C or SIGTERM.
pub fn run(args: DevArgs) -> anyhow::Result<()> {
    if !args.manifest.is_file() {
        bail!(
            "no manifest at {}: run `mayfly dev` in a project made by `mayfly new <name>`, or \
             give --manifest PATH",
            args.manifest.display()
        );
    }
    if !args.admin_listen.ip().to_canonical().is_loopback() {
        bail!(
            "--admin-listen {} is not a loopback address: the dev node's admin API is plain \
             HTTP; use `mayfly serve` with TLS to reach a node from elsewhere",
            args.admin_listen
        );
    }
    let manifest = std::path::absolute(&args.manifest)
        .with_context(|| format!("cannot resolve {}", args.manifest.display()))?;
    let root = manifest
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let data_dir = match args.data_dir {
        Some(dir) => std::path::absolute(&dir)
            .with_context(|| format!("cannot resolve {}", dir.display()))?,
        None => root.join(DATA_DIR),
    };
    crate::serve::init_tracing("warn", args.log_format.unwrap_or_default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mayfly-worker")
        .build()
        .context("cannot start the async runtime")?;
    let watcher = Watcher::new(root, manifest.clone(), data_dir.clone(), args.poll)?;
    runtime.block_on(dev(
        args.listen,
        args.admin_listen,
        data_dir,
        manifest,
        watcher,
    ))
}

async fn dev(
    listen: SocketAddr,
    admin_listen: SocketAddr,
    data_dir: PathBuf,
    manifest: PathBuf,
    watcher: Watcher,
) -> anyhow::Result<()> {
    // As in `mayfly serve`: subscribe before anyone learns the node is up.
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let config = ServeConfig {
        node: NodeConfig::new(&data_dir),
        gateway_addr: listen,
        admin_addr: admin_listen,
        shutdown_grace: SHUTDOWN_GRACE,
        admin_tls: None,
        connections: Default::default(),
        metrics_addr: None,
    };
    let running = RunningNode::start(config, async { Stores::sqlite(&data_dir) })
        .await
        .map_err(|error| explain_port_in_use(error, listen, admin_listen))?;
    let gateway = format!("http://{}", running.gateway_addr);
    let token_file = data_dir.join(ADMIN_TOKEN_FILE);
    {
        let mut stdout = std::io::stdout().lock();
        // The same two lines as `mayfly serve`; scripts and tests read them.
        writeln!(stdout, "gateway listening on {gateway}")?;
        writeln!(stdout, "admin API listening on {}", running.admin_url())?;
        write!(stdout, "{}", cli_hint(&running.admin_url(), &token_file))?;
        stdout.flush()?;
    }
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("cannot read the node's token {}", token_file.display()))?;
    let session = Arc::new(Session {
        client: AdminClient::new(&running.admin_url(), Some(token.trim().to_string()), None)?,
        gateway,
        manifest,
        started_ms: now_ms(),
        stopping: AtomicBool::new(false),
        followed: Mutex::new(HashSet::new()),
        builds: manifest::Builds::default(),
        build_clock: data_dir.join(BUILD_CLOCK_FILE),
    });
    let looping = Arc::clone(&session);
    std::thread::Builder::new()
        .name("mayfly-dev".to_string())
        .spawn(move || looping.run(watcher))
        .context("cannot start the watcher thread")?;

    let signal = crate::serve::wait_for_signal(terminate).await;
    session.stopping.store(true, Ordering::SeqCst);
    // A build in its own process group hears no terminal Ctrl-C, and
    // nothing hears a SIGTERM sent to `mayfly dev` alone: end it here.
    session.builds.terminate();
    eprintln!("mayfly dev: stopping the node");
    running.shutdown().await;
    signal
}

/// How to point the CLI at the dev node, as shell lines to paste into
/// another terminal. The token is read from its file there rather than
/// printed, so it stays out of terminal scrollback and CI logs.
fn cli_hint(admin_url: &str, token_file: &Path) -> String {
    let file = token_file.display().to_string();
    // A path with a NUL byte cannot be quoted; no path has one.
    let file = shlex::try_quote(&file).map_or(file.clone(), |quoted| quoted.into_owned());
    format!(
        "mayfly dev: to use the CLI with this node, in another terminal:\n  \
         export MAYFLY_ADMIN_URL={admin_url}\n  \
         export MAYFLY_TOKEN=\"$(cat {file})\"\n"
    )
}

/// A failed start whose cause is a port in use, said in the user's terms:
/// which port, the likely culprit, and the flag that picks another. Which
/// of the two addresses is busy is found by trying each again (the node
/// released both when it gave up); other errors pass unchanged.
fn explain_port_in_use(
    error: anyhow::Error,
    listen: SocketAddr,
    admin_listen: SocketAddr,
) -> anyhow::Error {
    let in_use = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    });
    if !in_use {
        return error;
    }
    let busy = [
        (listen, "gateway", "--listen"),
        (admin_listen, "admin API", "--admin-listen"),
    ]
    .into_iter()
    .find(|(addr, _, _)| std::net::TcpListener::bind(addr).is_err());
    let hint = match busy {
        Some((addr, what, flag)) => format!(
            "port {} is already in use, so the dev node's {what} cannot listen on {addr}: \
             is `mayfly serve` or another `mayfly dev` running? Stop it, or pick another port \
             with {flag} {}:PORT",
            addr.port(),
            addr.ip()
        ),
        None => format!(
            "a port was in use when the dev node started (gateway {listen}, admin API \
             {admin_listen}): is `mayfly serve` or another `mayfly dev` running? Stop it, or \
             pick other ports with --listen and --admin-listen"
        ),
    };
    error.context(hint)
}

/// What the dev loop's threads share.
struct Session {
    /// The in-process node's admin API.
    client: AdminClient,
    /// `http://<gateway address>`.
    gateway: String,
    /// The manifest, absolute.
    manifest: PathBuf,
    /// When `mayfly dev` started (ms since the epoch): older log lines, from
    /// an earlier session in the same data directory, are not printed.
    started_ms: i64,
    /// Set on Ctrl-C / SIGTERM: the threads stop quietly.
    stopping: AtomicBool,
    /// Functions whose logs are being followed.
    followed: Mutex<HashSet<String>>,
    /// The build running now, ended when the session stops.
    builds: manifest::Builds,
    /// [`BUILD_CLOCK_FILE`] in the data directory.
    build_clock: PathBuf,
}

/// One round of the loop: when its build ran, and how it ended.
struct Round {
    /// From just before the build commands to just after, in the file
    /// system's clock; `None` when the round ended before building (or
    /// that clock could not be read).
    build: Option<RangeInclusive<SystemTime>>,
    outcome: Outcome,
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// At least one function was deployed.
    Deployed,
    /// Every function was as last deployed: nothing was sent.
    Unchanged,
    /// The manifest, a build or a deploy failed.
    Failed,
}

impl Round {
    /// Whether `path` was last written while this round's build ran, by
    /// its modification time: exact however late the file's event arrives,
    /// and in the same clock as the build's bounds (see [`fs_clock`]). A
    /// save in the clock tick (a few ms) the build ended in counts as the
    /// build's: a build's last write often shares that tick, and a user's
    /// save rarely does (and a skipped round is always said). A file that
    /// is gone was not written.
    fn wrote(&self, path: &Path) -> bool {
        let Some(build) = &self.build else {
            return false;
        };
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|modified| build.contains(&modified))
    }
}

/// The file system's clock now, read as the modification time of a write
/// to `marker`. Not `SystemTime::now`: file times come from the kernel's
/// coarse clock, a tick (a few ms) behind it, so a write just after a
/// `now` could be stamped before it. `None` if the file cannot be written.
fn fs_clock(marker: &Path) -> Option<SystemTime> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // 0600 as every file of a data directory.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(marker)
        .ok()?;
    file.write_all(b"build\n").ok()?;
    file.metadata().and_then(|m| m.modified()).ok()
}

/// What a function's deploy sent: its component's SHA-256 and its settings
/// (the config and triggers as sent). The same again is not redeployed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    digest: String,
    settings: String,
}

impl Sent {
    /// Reads `deploy`'s component and describes what deploying it sends.
    fn of(deploy: &FunctionDeploy) -> anyhow::Result<(Self, u64)> {
        let wasm = std::fs::read(&deploy.component)?;
        let settings = serde_json::to_string(&(config_json(deploy), &deploy.triggers))?;
        let sent = Self {
            digest: hex::encode(Sha256::digest(&wasm)),
            settings,
        };
        Ok((sent, u64::try_from(wasm.len()).unwrap_or(u64::MAX)))
    }

    /// The digest's first 12 hex digits, as a user can compare them.
    fn short(&self) -> &str {
        self.digest.get(..12).unwrap_or(&self.digest)
    }
}

impl Session {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Applies the manifest, then again after every change to the sources.
    ///
    /// A build may write files no rule names (a toolchain's cache beside
    /// the sources): each would start the next round, whose build writes it
    /// again, forever. Such a file shows itself: it changed only while the
    /// last build ran, and the round it caused changed no component. From
    /// then on a change to it during a build starts no round; the user is
    /// told, and told how to say so for good (.gitignore or .ignore). A change to it
    /// outside a build is a user's edit, and makes it a source again.
    fn run(self: Arc<Self>, mut watcher: Watcher) {
        println!(
            "mayfly dev: watching {} for changes (Ctrl-C to stop)",
            watcher.root().display()
        );
        // What each function's last successful deploy sent, this session.
        let mut sent = HashMap::new();
        // Files the builds seem to write.
        let mut rewritten = BTreeSet::new();
        let mut last = self.apply(&mut watcher, &mut sent);
        while let Some(paths) = watcher.wait_for_change(&self.stopping) {
            let names = describe(watcher.root(), &paths);
            let mut by_build = true;
            for path in &paths {
                if !last.wrote(path) {
                    by_build = false;
                    rewritten.remove(path);
                }
            }
            if by_build && paths.iter().all(|path| rewritten.contains(path)) {
                // Said every time: should a user's save land in a build
                // and be taken for the build's, they see it was not built.
                println!("mayfly dev: {names} rewritten by the last build; not rebuilding");
                continue;
            }
            println!("mayfly dev: {names} changed; rebuilding");
            last = self.apply(&mut watcher, &mut sent);
            if by_build && last.outcome == Outcome::Unchanged {
                println!(
                    "mayfly dev: {names} changed only while the build ran, and changed no \
                     component: the build seems to write it, so its changes during builds \
                     are ignored from now on (add it to .gitignore or .ignore to say so)"
                );
                rewritten.extend(paths);
            }
        }
    }

    /// Reads, builds and deploys the manifest; on any failure says why and
    /// leaves the node serving what it served.
    fn apply(self: &Arc<Self>, watcher: &mut Watcher, sent: &mut HashMap<String, Sent>) -> Round {
        let mut round = Round {
            build: None,
            outcome: Outcome::Failed,
        };
        let manifest = match Manifest::load(&self.manifest) {
            Ok(manifest) => manifest,
            Err(error) => {
                self.report(&error, "the manifest was not applied");
                return round;
            }
        };
        // Before the build writes them: its outputs are not sources.
        watcher.set_outputs(
            manifest
                .functions
                .iter()
                .filter(|function| function.build.is_some())
                .map(|function| function.deploy.component.clone()),
        );
        let result = self.build_and_deploy(&manifest, sent, &mut round);
        // Follow even after a failure: a function deployed earlier, or in a
        // later round, is found by its follower's retries.
        for function in &manifest.functions {
            self.follow(&function.deploy.name);
        }
        match result {
            Ok(outcome) => {
                round.outcome = outcome;
                let urls: Vec<String> = manifest
                    .functions
                    .iter()
                    .flat_map(|function| &function.deploy.routes)
                    .filter(|route| route.starts_with('/'))
                    .map(|route| format!("{}{route}", self.gateway))
                    .collect();
                if urls.is_empty() {
                    println!("mayfly dev: ready");
                } else {
                    println!("mayfly dev: ready at {}", urls.join(" "));
                }
            }
            Err(error) => self.report(&error, "still serving the last good version"),
        }
        round
    }

    /// Runs the build commands (noting when in `round`), then deploys each
    /// function whose component or settings differ from what this session
    /// last deployed. Every component is read before any is deployed, so a
    /// missing one deploys nothing.
    fn build_and_deploy(
        &self,
        manifest: &Manifest,
        sent: &mut HashMap<String, Sent>,
        round: &mut Round,
    ) -> anyhow::Result<Outcome> {
        if manifest.functions.iter().any(|f| f.build.is_some()) {
            let started = Instant::now();
            let from = fs_clock(&self.build_clock);
            let built = manifest::build(manifest, Some(&self.builds));
            let to = fs_clock(&self.build_clock);
            round.build = from.zip(to).map(|(from, to)| from..=to);
            built?;
            println!("mayfly dev: built in {}", seconds(started.elapsed()));
        }
        let mut planned = Vec::new();
        for function in &manifest.functions {
            let FunctionDeploy {
                name, component, ..
            } = &function.deploy;
            let (now, bytes) = Sent::of(&function.deploy).with_context(|| {
                format!(
                    "function `{name}`: cannot read the component {}{}",
                    component.display(),
                    if function.build.is_some() {
                        " after its build: check `component` in the manifest"
                    } else {
                        ": build it first, or give the function a `build` command"
                    }
                )
            })?;
            planned.push((&function.deploy, now, bytes));
        }
        let mut outcome = Outcome::Unchanged;
        for (deploy, now, bytes) in planned {
            let name = &deploy.name;
            match sent.get(name) {
                Some(last) if *last == now => {
                    println!(
                        "{name}: component unchanged (sha256 {}), not redeployed",
                        now.short()
                    );
                    continue;
                }
                Some(last) if last.digest == now.digest => {
                    println!("{name}: settings changed; deploying");
                }
                _ => {}
            }
            self.deploy(deploy, bytes)?;
            sent.insert(name.clone(), now);
            outcome = Outcome::Deployed;
        }
        Ok(outcome)
    }

    /// Deploys one function, showing the upload-and-compile phase while it
    /// runs (a spinner on a terminal, a plain line otherwise) and its
    /// duration in the result line.
    fn deploy(&self, deploy: &FunctionDeploy, bytes: u64) -> anyhow::Result<()> {
        let name = &deploy.name;
        let phase = format!(
            "{name}: uploading {} and compiling",
            indicatif::HumanBytes(bytes)
        );
        let spinner = if std::io::stderr().is_terminal() {
            Some(crate::progress::spinner(phase))
        } else {
            println!("{phase}");
            None
        };
        let started = Instant::now();
        let outcome = send_deploy(&self.client, deploy, false);
        let took = started.elapsed();
        if let Some(spinner) = spinner {
            spinner.finish_and_clear();
        }
        let outcome = outcome.with_context(|| format!("deploying `{name}` failed"))?;
        println!(
            "{} ({})",
            manifest::summary(name, &outcome),
            phase_result(&outcome, took)
        );
        Ok(())
    }

    /// Prints a failed round's error (unless stopping, when a build killed
    /// by Ctrl-C is no news).
    fn report(&self, error: &anyhow::Error, outcome: &str) {
        if !self.stopping() {
            eprintln!("mayfly dev: error: {error:#}");
            eprintln!("mayfly dev: {outcome}; save a fix to try again");
        }
    }

    /// Starts printing `name`'s log lines, once per function.
    fn follow(self: &Arc<Self>, name: &str) {
        let Ok(mut followed) = self.followed.lock() else {
            return;
        };
        if !followed.insert(name.to_string()) {
            return;
        }
        let session = Arc::clone(self);
        let name = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("logs-{name}"))
            .spawn(move || session.follow_logs(&name));
        if let Err(error) = spawned {
            eprintln!("mayfly dev: cannot follow the logs: {error}");
        }
    }

    /// Prints `name`'s lines from the admin API's log stream, reconnecting
    /// until the session stops: the function may not be deployed yet (404),
    /// and a stream can break. Lines are printed once each (by id) and only
    /// those written since `mayfly dev` started.
    fn follow_logs(&self, name: &str) {
        let path = format!("/v1/functions/{}/logs?tail=100&follow=true", segment(name));
        let mut last_id = 0;
        while !self.stopping() {
            if let Ok(response) = self.client.send_raw("GET", &path, &[], None)
                && response.status().is_success()
            {
                let reader = BufReader::new(response.into_body().into_reader());
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    if self.stopping() {
                        return;
                    }
                    let Ok(record) = serde_json::from_str::<LogRecord>(&line) else {
                        continue;
                    };
                    if record.id <= last_id || record.line.ts_ms < self.started_ms {
                        continue;
                    }
                    last_id = record.id;
                    print_log(&record);
                }
            }
            std::thread::sleep(FOLLOW_RETRY);
        }
    }
}

/// One log line, prefixed with its function and version:
/// `[hello v2] GET /hello -> 200`.
fn print_log(record: &LogRecord) {
    let line = &record.line;
    let stream = if line.stream == "stdout" {
        String::new()
    } else {
        format!(" {}", line.stream)
    };
    let mut stdout = std::io::stdout().lock();
    // A closed stdout is no reason to stop serving.
    let _ = writeln!(
        stdout,
        "[{} v{}{stream}] {}",
        line.function, line.version, line.line
    );
    let _ = stdout.flush();
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// How a deploy request went: the node's own compile time, or (from a
/// node before `compile_ms`) the request's time measured here, which on
/// loopback is the compile time to within milliseconds.
fn phase_result(outcome: &Value, took: Duration) -> String {
    if outcome["compiled"] == Value::Bool(true) {
        let took = outcome["compile_ms"]
            .as_u64()
            .map_or(took, Duration::from_millis);
        format!("compiled in {}", seconds(took))
    } else {
        format!("already compiled; took {}", seconds(took))
    }
}

/// `1.23 s`.
fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

/// `src/lib.rs`, or `src/lib.rs and 2 more`.
fn describe(root: &Path, changed: &[PathBuf]) -> String {
    let Some(first) = changed.first() else {
        return "nothing".to_string();
    };
    let first = first.strip_prefix(root).unwrap_or(first).display();
    match changed.len() {
        1 => first.to_string(),
        n => format!("{first} and {} more", n - 1),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser as _;

    use super::*;

    /// `mayfly dev <flags>` parsed as the CLI parses them.
    fn dev_args(flags: &[&str]) -> DevArgs {
        #[derive(clap::Parser)]
        struct Dev {
            #[command(flatten)]
            args: DevArgs,
        }
        Dev::try_parse_from(["mayfly dev"].iter().chain(flags))
            .unwrap()
            .args
    }

    #[test]
    fn flags_and_defaults() {
        let args = dev_args(&[]);
        assert_eq!(args.manifest, Path::new("mayfly.toml"));
        assert_eq!(args.listen.to_string(), "127.0.0.1:8090");
        assert_eq!(args.admin_listen.to_string(), "127.0.0.1:8091");
        assert_eq!(args.data_dir, None);
        assert!(!args.poll);
        let args = dev_args(&[
            "--poll",
            "--manifest",
            "app/mayfly.toml",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:9001",
            "--data-dir",
            "/tmp/x",
            "--log-format",
            "json",
        ]);
        assert_eq!(
            args.log_format,
            Some(mayfly_platform::config::LogFormat::Json)
        );
        assert_eq!(args.manifest, Path::new("app/mayfly.toml"));
        assert_eq!(args.listen.port(), 0);
        assert_eq!(args.admin_listen.port(), 9001);
        assert_eq!(args.data_dir.as_deref(), Some(Path::new("/tmp/x")));
        assert!(args.poll);
    }

    #[test]
    fn the_default_ports_are_not_serves() {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: crate::serve::ServeArgs,
        }
        let serve = Serve::try_parse_from(["mayfly serve"]).unwrap().args;
        let dev = dev_args(&[]);
        let serve_ports = [serve.listen.port(), serve.admin_listen.port()];
        for port in [dev.listen.port(), dev.admin_listen.port()] {
            assert!(!serve_ports.contains(&port), "{port} is also serve's");
        }
        assert_ne!(dev.listen.port(), dev.admin_listen.port());
    }

    #[test]
    fn the_cli_hint_quotes_the_token_path() {
        let hint = cli_hint(
            "http://127.0.0.1:8091",
            Path::new("/home/me/my project/.mayfly-dev/admin.token"),
        );
        assert!(
            hint.contains("export MAYFLY_ADMIN_URL=http://127.0.0.1:8091\n"),
            "{hint}"
        );
        assert!(
            hint.contains(
                "export MAYFLY_TOKEN=\"$(cat '/home/me/my project/.mayfly-dev/admin.token')\"\n"
            ),
            "{hint}"
        );
    }

    #[test]
    fn a_port_in_use_is_named_with_its_flag() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap();
        let free: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let cause = || {
            anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::AddrInUse))
                .context("cannot listen")
        };
        let message = format!("{:#}", explain_port_in_use(cause(), busy, free));
        assert!(
            message.contains(&format!("port {} is already in use", busy.port())),
            "{message}"
        );
        assert!(message.contains("mayfly serve"), "{message}");
        assert!(message.contains("--listen 127.0.0.1:PORT"), "{message}");
        let message = format!("{:#}", explain_port_in_use(cause(), free, busy));
        assert!(
            message.contains("--admin-listen 127.0.0.1:PORT"),
            "{message}"
        );
        // Other failures pass unchanged.
        let other = anyhow::anyhow!("disk full");
        assert_eq!(
            format!("{:#}", explain_port_in_use(other, busy, free)),
            "disk full"
        );
    }

    #[test]
    fn what_a_deploy_sends_is_compared_by_digest_and_settings() {
        let dir = tempfile::tempdir().unwrap();
        let component = dir.path().join("app.wasm");
        std::fs::write(&component, b"one").unwrap();
        let manifest = Manifest::parse(
            &dir.path().join("mayfly.toml"),
            "[functions.app]\ncomponent = \"app.wasm\"\nroutes = [\"/app\"]\n",
        )
        .unwrap();
        let deploy = &manifest.functions[0].deploy;
        let (first, bytes) = Sent::of(deploy).unwrap();
        assert_eq!(bytes, 3);
        // sha256("one")
        assert_eq!(first.short(), "7692c3ad3540");
        assert_eq!(Sent::of(deploy).unwrap().0, first);
        std::fs::write(&component, b"two").unwrap();
        let (second, _) = Sent::of(deploy).unwrap();
        assert_ne!(second.digest, first.digest);
        assert_eq!(second.settings, first.settings);
    }

    #[test]
    fn describe_names_the_first_change() {
        let root = Path::new("/p");
        assert_eq!(describe(root, &[root.join("src/lib.rs")]), "src/lib.rs");
        assert_eq!(
            describe(root, &[root.join("a.py"), root.join("b.py")]),
            "a.py and 1 more"
        );
    }

    #[test]
    fn the_deploy_phase_reports_the_compile() {
        let took = Duration::from_millis(1234);
        assert_eq!(
            phase_result(&serde_json::json!({"compiled": true}), took),
            "compiled in 1.23 s"
        );
        assert_eq!(
            phase_result(&serde_json::json!({"compiled": false}), took),
            "already compiled; took 1.23 s"
        );
        let measured = serde_json::json!({"compiled": true, "compile_ms": 987});
        assert_eq!(
            phase_result(&measured, took),
            "compiled in 0.99 s",
            "the node's own time"
        );
    }
}
