//! The systems compared: Mayfly and its two peers, where their binaries
//! come from (the peers are installed into a cache folder on first use) and
//! how each one is started serving the hello function.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::mayfly::{Admin, Node, NodeOptions};
use super::process::{Process, command, output, wait_for_200};

/// The wasmtime-cli release compared against: 48.0.8 is the newest that
/// builds with Rust 1.95 (see shared/BASELINES.md).
const WASMTIME_VERSION: &str = "48.0.8";
/// The npm `workerd` package compared against.
const WORKERD_VERSION: &str = "1.20261117.1";
/// What a skipped peer's row says.
pub const NOT_INSTALLED: &str = "skipped: not installed (run `cargo xtask bench` once to install)";

/// Which system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Mayfly, built from this workspace.
    Mayfly,
    /// `wasmtime serve`, running the same hello component.
    Wasmtime,
    /// Cloudflare's workerd, running bench/peers/hello-worker.js.
    Workerd,
    /// The ceiling: hyper alone answering hello, no WebAssembly
    /// (crates/cli/examples/bare_hyper.rs).
    BareHyper,
}

impl Kind {
    /// The name used in the report.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Mayfly => "Mayfly",
            Kind::Wasmtime => "wasmtime serve",
            Kind::Workerd => "workerd",
            Kind::BareHyper => "bare hyper (no Wasm)",
        }
    }
}

/// One system and whether it can be run.
pub struct System {
    /// Which system.
    pub kind: Kind,
    /// Its binary, or why it is not run (a sentence for the report).
    pub binary: Result<PathBuf, String>,
    /// What `--version` said.
    pub version: String,
}

/// Where the peers are installed: `$MAYFLY_BENCH_CACHE`, else
/// `$HOME/.cache/mayfly-bench`.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MAYFLY_BENCH_CACHE").filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .context("neither MAYFLY_BENCH_CACHE nor HOME is set: set MAYFLY_BENCH_CACHE to a folder for the peer runtimes")?;
    Ok(PathBuf::from(home).join(".cache/mayfly-bench"))
}

/// The systems; the peers are installed first if `install` and they are
/// missing. A peer that cannot be installed is reported, not fatal. The
/// bare hyper ceiling is built with Mayfly, beside it.
pub fn prepare(mayfly: &Path, cache: &Path, install: bool) -> Vec<System> {
    let wasmtime = cache.join(format!("wasmtime-{WASMTIME_VERSION}/bin/wasmtime"));
    let workerd = cache.join("workerd/node_modules/.bin/workerd");
    vec![
        system(Kind::Mayfly, Ok(mayfly.to_path_buf())),
        system(
            Kind::Wasmtime,
            ensure(&wasmtime, install, || install_wasmtime(cache)),
        ),
        system(
            Kind::Workerd,
            ensure(&workerd, install, || install_workerd(cache)),
        ),
        system(Kind::BareHyper, bare_hyper(mayfly)),
    ]
}

/// `examples/bare_hyper` in the target folder of the `mayfly` binary.
fn bare_hyper(mayfly: &Path) -> Result<PathBuf, String> {
    let binary = mayfly.with_file_name("examples").join("bare_hyper");
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!("failed: {} was not built", binary.display()))
    }
}

fn system(kind: Kind, binary: Result<PathBuf, String>) -> System {
    if kind == Kind::BareHyper {
        // It has no --version: it is this workspace's hyper.
        return System {
            kind,
            binary,
            version: "hyper 1 (this workspace's)".into(),
        };
    }
    let version = match &binary {
        Ok(path) => output(command(path).arg("--version")).map_or_else(
            |error| format!("unknown ({error})"),
            |text| text.lines().next().unwrap_or_default().trim().to_string(),
        ),
        Err(_) => "not installed".into(),
    };
    System {
        kind,
        binary,
        version,
    }
}

fn ensure(
    binary: &Path,
    install: bool,
    installer: impl FnOnce() -> anyhow::Result<()>,
) -> Result<PathBuf, String> {
    if binary.is_file() {
        return Ok(binary.to_path_buf());
    }
    if !install {
        return Err(NOT_INSTALLED.into());
    }
    match installer() {
        Ok(()) if binary.is_file() => Ok(binary.to_path_buf()),
        Ok(()) => Err(format!(
            "failed: the install did not create {}",
            binary.display()
        )),
        Err(error) => Err(format!("failed: {error:#}")),
    }
}

fn install_wasmtime(cache: &Path) -> anyhow::Result<()> {
    println!(
        "installing wasmtime-cli {WASMTIME_VERSION} into {} (cargo install takes ~20 minutes on 2 cores, once)",
        cache.display()
    );
    crate::run(
        command(env!("CARGO"))
            .args(["install", "--locked", "wasmtime-cli", "--version"])
            .arg(WASMTIME_VERSION)
            .arg("--root")
            .arg(cache.join(format!("wasmtime-{WASMTIME_VERSION}"))),
    )
}

fn install_workerd(cache: &Path) -> anyhow::Result<()> {
    println!(
        "installing workerd {WORKERD_VERSION} (npm) into {}",
        cache.display()
    );
    let prefix = cache.join("workerd");
    std::fs::create_dir_all(&prefix)
        .with_context(|| format!("cannot create {}", prefix.display()))?;
    crate::run(
        command("npm")
            .arg("install")
            .arg("--prefix")
            .arg(&prefix)
            .arg(format!("workerd@{WORKERD_VERSION}")),
    )
    .context("npm is needed to install workerd: apt-get install npm")
}

/// A system serving the hello function.
pub struct HelloServer {
    /// The server process.
    pub process: Process,
    /// The URL answering "Hello, world!".
    pub url: String,
    /// A Mayfly node's data directory, removed with the server.
    _data: Option<tempfile::TempDir>,
}

/// What every system needs to serve hello.
pub struct HelloFiles<'a> {
    /// guests/…/hello.wasm.
    pub component: &'a Path,
    /// bench/peers/workerd.capnp.
    pub workerd_config: &'a Path,
    /// Where child processes write their stderr.
    pub log_dir: &'a Path,
}

impl System {
    /// Starts the system serving hello on a free port and waits until it
    /// answers; `mayfly_flags` are extra `mayfly serve` flags.
    pub fn serve_hello(
        &self,
        files: &HelloFiles<'_>,
        mayfly_flags: &[&str],
    ) -> anyhow::Result<HelloServer> {
        let binary = self
            .binary
            .as_ref()
            .map_err(|why| anyhow::anyhow!("{why}"))?;
        if self.kind == Kind::Mayfly {
            let data = tempfile::tempdir().context("cannot create a data directory")?;
            let node = Node::start(
                binary,
                data.path(),
                files.log_dir,
                &NodeOptions {
                    port: 0,
                    flags: mayfly_flags,
                },
            )?;
            let bytes = std::fs::read(files.component)
                .with_context(|| format!("cannot read {}", files.component.display()))?;
            Admin::new(&node.admin, &node.token).deploy("hello", &bytes, Some("/hello"))?;
            let url = format!("{}/hello", node.gateway);
            let mut process = node.process;
            wait_for_200(&url, Instant::now(), &mut process, Duration::from_secs(60))?;
            return Ok(HelloServer {
                process,
                url,
                _data: Some(data),
            });
        }
        let port = super::process::free_port()?;
        let mut process = self.spawn_peer(binary, files, port)?;
        let url = format!("http://127.0.0.1:{port}/");
        // The first start may compile the component (wasmtime's cache is
        // cold), which takes a while on a loaded machine.
        wait_for_200(&url, Instant::now(), &mut process, Duration::from_secs(120))?;
        Ok(HelloServer {
            process,
            url,
            _data: None,
        })
    }

    /// Starts a peer serving hello on `port`, without waiting for it.
    pub fn spawn_peer(
        &self,
        binary: &Path,
        files: &HelloFiles<'_>,
        port: u16,
    ) -> anyhow::Result<Process> {
        let address = format!("127.0.0.1:{port}");
        match self.kind {
            // The component imports wasi:cli (Rust std), which `wasmtime
            // serve` only links with `-S cli`. Everything else is the
            // default: pooling allocator, a fresh instance per request.
            Kind::Wasmtime => Process::spawn(
                "wasmtime",
                command(binary)
                    .args(["serve", "-S", "cli", "--addr", &address])
                    .arg(files.component)
                    .stdout(std::process::Stdio::null()),
                files.log_dir,
            ),
            Kind::Workerd => Process::spawn(
                "workerd",
                command(binary)
                    .arg("serve")
                    .arg(files.workerd_config)
                    .arg("--socket-addr")
                    .arg(format!("http={address}"))
                    .stdout(std::process::Stdio::null()),
                files.log_dir,
            ),
            Kind::BareHyper => Process::spawn(
                "bare-hyper",
                command(binary)
                    .args(["--addr", &address])
                    .stdout(std::process::Stdio::null()),
                files.log_dir,
            ),
            Kind::Mayfly => bail!("Mayfly nodes are started with Node::start"),
        }
    }
}
