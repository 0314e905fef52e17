//! `mayfly dev`: the local loop. A node runs in this process with its state
//! in `.mayfly-dev/` next to the manifest; the manifest is applied (built
//! and deployed) at start and again whenever a source file changes; each
//! function's log lines are printed as they arrive.
//!
//! The node runs in-process (`RunningNode`, as `mayfly serve` starts it)
//! rather than as a child `mayfly serve`: one process to stop, one exit
//! code, and no ports or token to fish out of another process's output.
//! Everything else goes through the node's admin API like any client:
//! deploys through the manifest code `mayfly deploy` uses, logs through
//! the same stream `mayfly logs --follow` reads. Those are blocking
//! (ureq), so they run on plain threads beside the node's async runtime.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use mayfly_platform::{NodeConfig, RunningNode, ServeConfig};
use mayfly_store::{LogRecord, Stores};

use crate::client::{AdminClient, segment};
use crate::manifest::{self, Manifest};

/// The data directory's name, next to the manifest, unless --data-dir.
const DATA_DIR: &str = ".mayfly-dev";
/// The file in the data directory holding the node's admin token.
const ADMIN_TOKEN_FILE: &str = "admin.token";
/// How often the sources are scanned for changes.
const POLL: Duration = Duration::from_millis(500);
/// How long the sources must stay still after a change before a rebuild,
/// so a save that touches several files (or an editor's write-and-rename)
/// gives one rebuild.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// How often the sources are scanned while waiting for them to settle.
const SETTLE_POLL: Duration = Duration::from_millis(100);
/// In-flight requests get this long to finish on Ctrl-C.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Wait before following a function's logs again (not deployed yet, or
/// the stream broke).
const FOLLOW_RETRY: Duration = Duration::from_secs(1);

/// `mayfly dev`'s flags.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The manifest to run; the sources watched are those in its folder.
    #[arg(long, value_name = "PATH", default_value = manifest::DEFAULT_PATH)]
    manifest: PathBuf,
    /// Address of the public HTTP gateway.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address of the admin API (loopback only; 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    admin_listen: SocketAddr,
    /// Folder holding the dev node's state [default: .mayfly-dev next to
    /// the manifest].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

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
    crate::serve::init_tracing("warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mayfly-worker")
        .build()
        .context("cannot start the async runtime")?;
    let watcher = Watcher::new(root, manifest.clone(), data_dir.clone());
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
    };
    let running = RunningNode::start(config, async { Stores::sqlite(&data_dir) }).await?;
    let gateway = format!("http://{}", running.gateway_addr);
    {
        // The same two lines as `mayfly serve`; scripts and tests read them.
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "gateway listening on {gateway}")?;
        writeln!(stdout, "admin API listening on {}", running.admin_url())?;
        stdout.flush()?;
    }
    let token_file = data_dir.join(ADMIN_TOKEN_FILE);
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
}

impl Session {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Applies the manifest, then again after every change to the sources.
    fn run(self: Arc<Self>, mut watcher: Watcher) {
        println!(
            "mayfly dev: watching {} for changes (Ctrl-C to stop)",
            watcher.root.display()
        );
        self.apply();
        while let Some(changed) = watcher.wait_for_change(&self.stopping) {
            println!(
                "mayfly dev: {} changed; rebuilding",
                describe(&watcher.root, &changed)
            );
            self.apply();
        }
    }

    /// Reads, builds and deploys the manifest; on any failure says why and
    /// leaves the node serving what it served.
    fn apply(self: &Arc<Self>) {
        let manifest = match Manifest::load(&self.manifest) {
            Ok(manifest) => manifest,
            Err(error) => {
                self.report(&error, "the manifest was not applied");
                return;
            }
        };
        let result = manifest::apply_manifest(&self.client, false, &manifest, Some(&self.builds));
        // Follow even after a failure: a function deployed earlier, or in a
        // later round, is found by its follower's retries.
        for function in &manifest.functions {
            self.follow(&function.deploy.name);
        }
        match result {
            Ok(()) => {
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

/// What is known of a file without reading it; a change to any of these is
/// a change to the file (the inode catches an editor's write-and-rename
/// that keeps the size within the clock's granularity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// Every watched file with its stamp.
type Snapshot = BTreeMap<PathBuf, Stamp>;

/// Watches a project's sources by polling their metadata.
///
/// Polling rather than the `notify` crate (inotify), on purpose: a
/// recursive inotify watch cannot leave subtrees out, so it would put a
/// watch on every folder of `target/` (thousands after one cargo build, and
/// here `target/` may be a symlink to a shared build folder), counting
/// against the per-user inotify limit and waking on every file the build
/// writes; and inotify stays silent on some mounts (network file systems,
/// some container and VM shares). A function project is a handful of
/// files, so a scan that skips `target/` costs microseconds every 500 ms,
/// sees every kind of save (in place, or write-and-rename), and needs no
/// dependency.
struct Watcher {
    /// The manifest's folder, scanned recursively.
    root: PathBuf,
    /// The manifest: scanned whatever its name.
    manifest: PathBuf,
    /// The node's data directory: skipped whatever its name.
    data_dir: PathBuf,
    /// The sources as last seen.
    last: Snapshot,
}

impl Watcher {
    /// Watches `root`, taking the sources as they are now as the baseline.
    fn new(root: PathBuf, manifest: PathBuf, data_dir: PathBuf) -> Self {
        let mut watcher = Self {
            root,
            manifest,
            data_dir,
            last: Snapshot::new(),
        };
        watcher.last = watcher.scan();
        watcher
    }

    /// The watched files now. Files that vanish mid-scan are left out;
    /// symlinked folders are not followed (no cycles, no shared build
    /// folders), symlinked files are.
    fn scan(&self) -> Snapshot {
        let mut files = Snapshot::new();
        if let Some(stamp) = stamp(&self.manifest) {
            files.insert(self.manifest.clone(), stamp);
        }
        let mut folders = vec![self.root.clone()];
        while let Some(folder) = folders.pop() {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if kind.is_dir() {
                    if !ignored_folder(&name) && path != self.data_dir {
                        folders.push(path);
                    }
                } else if !ignored_file(&name)
                    && let Some(stamp) = stamp(&path).filter(|_| path.is_file())
                {
                    files.insert(path, stamp);
                }
            }
        }
        files
    }

    /// Blocks until the sources change and then stay still for
    /// [`DEBOUNCE`]; returns the files that changed (added, edited or
    /// removed), or `None` once `stopping` is set.
    fn wait_for_change(&mut self, stopping: &AtomicBool) -> Option<Vec<PathBuf>> {
        loop {
            std::thread::sleep(POLL);
            if stopping.load(Ordering::SeqCst) {
                return None;
            }
            let mut latest = self.scan();
            if latest == self.last {
                continue;
            }
            let mut still_since = Instant::now();
            while still_since.elapsed() < DEBOUNCE {
                std::thread::sleep(SETTLE_POLL);
                if stopping.load(Ordering::SeqCst) {
                    return None;
                }
                let now = self.scan();
                if now != latest {
                    latest = now;
                    still_since = Instant::now();
                }
            }
            let changed = changes(&self.last, &latest);
            self.last = latest;
            if !changed.is_empty() {
                return Some(changed);
            }
        }
    }
}

/// A file's stamp, following a symlink.
fn stamp(path: &Path) -> Option<Stamp> {
    let metadata = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
        inode: metadata.ino(),
    })
}

/// Folders never scanned: hidden ones (`.git`, `.mayfly-dev`, `.idea`)
/// and build output.
fn ignored_folder(name: &str) -> bool {
    name.starts_with('.') || name == "target"
}

/// Files whose changes are not source changes: hidden files (including
/// Emacs' `.#lock` files and Vim's `.x.swp`), editor backups and swap files,
/// and the file Vim writes to test a folder.
fn ignored_file(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || (name.starts_with('#') && name.ends_with('#'))
        || [".swp", ".swo", ".swx", ".swn"]
            .iter()
            .any(|suffix| name.ends_with(suffix))
        || name == "4913"
}

/// Files added, changed or removed between two snapshots, sorted.
fn changes(before: &Snapshot, after: &Snapshot) -> Vec<PathBuf> {
    let mut changed: Vec<PathBuf> = after
        .iter()
        .filter(|(path, stamp)| before.get(*path) != Some(stamp))
        .map(|(path, _)| path.clone())
        .chain(
            before
                .keys()
                .filter(|path| !after.contains_key(*path))
                .cloned(),
        )
        .collect();
    changed.sort();
    changed
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
        assert_eq!(args.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(args.admin_listen.port(), 0);
        assert_eq!(args.data_dir, None);
        let args = dev_args(&[
            "--manifest",
            "app/mayfly.toml",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/tmp/x",
        ]);
        assert_eq!(args.manifest, Path::new("app/mayfly.toml"));
        assert_eq!(args.listen.port(), 0);
        assert_eq!(args.data_dir.as_deref(), Some(Path::new("/tmp/x")));
    }

    #[test]
    fn what_is_not_a_source() {
        for folder in [".git", ".mayfly-dev", "target", ".idea"] {
            assert!(ignored_folder(folder), "{folder}");
        }
        for folder in ["src", "targets", "assets"] {
            assert!(!ignored_folder(folder), "{folder}");
        }
        for file in [
            ".lib.rs.swp",
            "lib.rs.swo",
            "lib.rs~",
            "#lib.rs#",
            ".#lib.rs",
            "4913",
            ".DS_Store",
        ] {
            assert!(ignored_file(file), "{file}");
        }
        for file in ["lib.rs", "Cargo.toml", "mayfly.toml", "Cargo.lock", "a#b"] {
            assert!(!ignored_file(file), "{file}");
        }
    }

    #[test]
    fn the_scan_skips_build_output_hidden_files_and_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        for folder in ["src/nested", "target/debug", ".git", "state", "other"] {
            std::fs::create_dir_all(root.join(folder)).unwrap();
        }
        for file in [
            "mayfly.toml",
            "Cargo.toml",
            "src/lib.rs",
            "src/nested/mod.rs",
            "src/.lib.rs.swp",
            "src/lib.rs~",
            "target/debug/out",
            ".git/HEAD",
            "state/db",
        ] {
            std::fs::write(root.join(file), "x").unwrap();
        }
        std::os::unix::fs::symlink(root.join("src"), root.join("other/link")).unwrap();
        let watcher = Watcher::new(root.clone(), root.join("mayfly.toml"), root.join("state"));
        let mut seen: Vec<String> = watcher
            .last
            .keys()
            .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                "Cargo.toml",
                "mayfly.toml",
                "src/lib.rs",
                "src/nested/mod.rs"
            ]
        );
    }

    #[test]
    fn a_change_is_reported_once_the_sources_settle() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join("src")).unwrap();
        std::fs::write(root.join("mayfly.toml"), "a").unwrap();
        std::fs::write(root.join("src/lib.rs"), "one").unwrap();
        std::fs::write(root.join("src/old.rs"), "old").unwrap();
        let mut watcher = Watcher::new(root.clone(), root.join("mayfly.toml"), root.join(DATA_DIR));
        std::fs::write(root.join("src/lib.rs"), "two!").unwrap();
        std::fs::write(root.join("src/new.rs"), "new").unwrap();
        std::fs::remove_file(root.join("src/old.rs")).unwrap();
        std::fs::write(root.join("src/.lib.rs.swp"), "swap").unwrap();
        let stopping = AtomicBool::new(false);
        let changed = watcher.wait_for_change(&stopping).unwrap();
        let expected: Vec<PathBuf> = ["src/lib.rs", "src/new.rs", "src/old.rs"]
            .iter()
            .map(|f| root.join(f))
            .collect();
        assert_eq!(changed, expected);
        assert_eq!(
            describe(&root, &changed),
            "src/lib.rs and 2 more".to_string()
        );
        // Editor-style save: write a new file and rename it over the old.
        std::fs::write(root.join("src/lib.rs.tmp~"), "two?").unwrap();
        std::fs::rename(root.join("src/lib.rs.tmp~"), root.join("src/lib.rs")).unwrap();
        let changed = watcher.wait_for_change(&stopping).unwrap();
        assert_eq!(changed, [root.join("src/lib.rs")]);
        assert_eq!(describe(&root, &changed), "src/lib.rs");
        stopping.store(true, Ordering::SeqCst);
        assert_eq!(watcher.wait_for_change(&stopping), None);
    }
}
