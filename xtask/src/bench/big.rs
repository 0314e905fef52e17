//! Scenario 7, big components (Mayfly): the Python and JavaScript
//! functions that `mayfly new --template python-http|js-http` creates,
//! built with the templates' own toolchains (xtask/src/toolchains.rs).
//! Tens of MB each, with a memory image of megabytes that every fresh
//! instance starts from: what a deploy compiles, what a warm request costs
//! under the hello scenario's load, and what the first request after the
//! function was unloaded costs.
//!
//! The components are built once into the bench cache, in a folder keyed
//! by the template's content, so a changed template is rebuilt.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::cold::{last_record, wait_until_cold};
use super::http::{Figures as Load, load_posting};
use super::mayfly::{Admin, Node, NodeOptions};
use super::process::{get, wait_for_200};
use super::stats::{Runs, count, latency, mib, micros};
use super::{Bench, Outcome};

/// The body each load request posts, for the handlers to echo.
const ECHO_BODY: &str = "echo me: a short request body";

/// One of the templates measured.
#[derive(Clone, Copy)]
pub struct Template {
    /// The name in the report.
    pub label: &'static str,
    /// The `mayfly new --template` name (a folder of crates/cli/templates).
    pub template: &'static str,
    /// The function's name, which is also the component's file name.
    name: &'static str,
}

/// The templates measured, in report order.
pub const TEMPLATES: [Template; 2] = [
    Template {
        label: "Python (componentize-py)",
        template: "python-http",
        name: "bigpy",
    },
    Template {
        label: "JavaScript (componentize-js)",
        template: "js-http",
        name: "bigjs",
    },
];

/// A built component, or why there is none.
pub type Built = Result<PathBuf, String>;

/// Builds what is missing of each template's component into `cache`.
/// Toolchains are installed if missing. A smoke run skips them (saying so):
/// an install, a build and a compile by the debug node take minutes.
pub fn prepare(mayfly: &Path, cache: &Path, smoke: bool) -> Vec<(Template, Built)> {
    TEMPLATES
        .iter()
        .map(|template| {
            let built = build(mayfly, cache, template, smoke).map_err(|error| {
                if error.is::<Skip>() {
                    format!("skipped: {error}")
                } else {
                    format!("failed: {error:#}")
                }
            });
            match &built {
                Ok(path) => println!("{}: {}", template.label, path.display()),
                Err(why) => println!("{}: {why}", template.label),
            }
            (*template, built)
        })
        .collect()
}

/// Why a component is not built, when that is not a failure.
#[derive(Debug)]
struct Skip(String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

fn build(mayfly: &Path, cache: &Path, template: &Template, smoke: bool) -> anyhow::Result<PathBuf> {
    let key = template_key(template.template)?;
    let dir = cache
        .join("big")
        .join(format!("{}-{key:016x}", template.template));
    let component = dir.join(format!("{}.wasm", template.name));
    if component.exists() {
        return Ok(component);
    }
    if smoke {
        // The debug node compiles a 20 MB component for minutes (the release
        // one takes 5-11 s): too long for CI's smoke run.
        return Err(Skip(
            "a smoke run skips the big components (the debug node takes minutes to compile them); \
             `cargo xtask bench` measures them"
                .into(),
        )
        .into());
    }
    let toolchains = crate::toolchains::ensure()?;
    println!(
        "building the {} template's component into {}",
        template.template,
        dir.display()
    );
    remove_stale(cache, template.template)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let work = tempfile::tempdir_in(&dir).context("cannot create a build folder")?;
    let (ok, out) = run_output(
        Command::new(mayfly)
            .args(["new", template.name, "--template", template.template])
            .current_dir(work.path()),
    )?;
    if !ok {
        bail!("`mayfly new` failed: {out}");
    }
    let project = work.path().join(template.name);
    let mut build = Command::new("sh");
    build
        .arg("-c")
        .arg(build_line(&project)?)
        .current_dir(&project);
    // As the template's README sets up: the toolchain on the PATH (Python)
    // or in node_modules (JavaScript).
    if template.template == "js-http" {
        std::os::unix::fs::symlink(
            toolchains.join("js/node_modules"),
            project.join("node_modules"),
        )
        .context("cannot link node_modules")?;
    } else {
        let mut path = std::ffi::OsString::from(toolchains.join("py/bin"));
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        build.env("PATH", path);
    }
    let started = Instant::now();
    let (ok, out) = run_output(&mut build)?;
    if !ok {
        bail!("the {} build failed: {out}", template.template);
    }
    let built = project.join(format!("{}.wasm", template.name));
    std::fs::rename(&built, &component)
        .with_context(|| format!("the build wrote no {}", built.display()))?;
    println!(
        "built {} in {:.0} s",
        component.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(component)
}

/// FNV-1a over the template's files (names and contents, in name order):
/// stable across Rust releases, unlike the std hasher, so the cache is not
/// rebuilt by a toolchain update.
fn template_key(template: &str) -> anyhow::Result<u64> {
    let dir = crate::workspace_root()
        .join("crates/cli/templates")
        .join(template);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for file in files {
        feed(file.file_name().unwrap_or_default().as_encoded_bytes());
        feed(&[0]);
        feed(&std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?);
        feed(&[0]);
    }
    Ok(hash)
}

/// Removes the builds of older versions of `template`.
fn remove_stale(cache: &Path, template: &str) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(cache.join("big")) else {
        return Ok(());
    };
    let prefix = format!("{template}-");
    for entry in entries {
        let path = entry?.path();
        let stale = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(&prefix));
        if stale {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// The project's `build = "…"` command from its mayfly.toml: the bench
/// builds exactly as `mayfly deploy` in the project would.
fn build_line(project: &Path) -> anyhow::Result<String> {
    let manifest = project.join("mayfly.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    text.lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("build")?.trim_start();
            let value = value.strip_prefix('=')?.trim();
            Some(value.strip_prefix('"')?.strip_suffix('"')?.to_string())
        })
        .with_context(|| format!("no `build = \"…\"` line in {}", manifest.display()))
}

/// Runs `command`; its success and its stdout and stderr together.
fn run_output(command: &mut Command) -> anyhow::Result<(bool, String)> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

/// One component's figures.
pub struct Figures {
    /// The component's size, bytes.
    pub bytes: u64,
    /// The node's compile time at deploy (`compile_ms` of the deploy's
    /// answer), ms.
    pub compile_ms: f64,
    /// The deploy call, client side, µs.
    pub deploy_us: f64,
    /// Warm load (fresh instance per request), POST echo.
    pub load: Load,
    /// The node's VmRSS right after the load, bytes.
    pub rss_after: f64,
    /// Client-side latency of the first request to the function in the
    /// cold tier (artifact on disk, not in memory), µs.
    pub cold_request: Runs,
    /// The node's `init_us + wall_us` for that request, µs.
    pub cold_recorded: Runs,
    /// Whether the ledger marked every one of them `cold`.
    pub all_marked_cold: bool,
}

/// The scenario's results, one row per template.
#[derive(Default)]
pub struct Results {
    /// (template, figures).
    pub rows: Vec<(Template, Outcome<Figures>)>,
}

impl Results {
    /// Whether any measurement failed.
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|(_, o)| o.failed()).count()
    }
}

/// Measures each built component on a fresh node.
pub fn run(bench: &Bench, built: &[(Template, Built)]) -> Results {
    let Some(mayfly) = bench
        .systems
        .iter()
        .find(|s| s.kind == super::systems::Kind::Mayfly)
    else {
        return Results { rows: Vec::new() };
    };
    let rows = built
        .iter()
        .map(|(template, component)| {
            let outcome = match component {
                Err(why) if why.starts_with("failed") => Outcome::Failed(why.clone()),
                Err(why) => Outcome::Skipped(why.clone()),
                Ok(component) => {
                    println!("  {}", template.label);
                    Outcome::of(mayfly, || measure(bench, template, component))
                }
            };
            (*template, outcome)
        })
        .collect();
    Results { rows }
}

fn measure(bench: &Bench, template: &Template, component: &Path) -> anyhow::Result<Figures> {
    let wasm =
        std::fs::read(component).with_context(|| format!("cannot read {}", component.display()))?;
    let data = tempfile::tempdir().context("cannot create a data directory")?;
    // A 1 s keep-alive, so the cold requests below need not wait long for
    // the function to be unloaded; it changes nothing under load. Compiles
    // of these components take tens of seconds on a busy machine.
    let node = Node::start(
        bench.mayfly()?,
        data.path(),
        bench.log_dir.path(),
        &NodeOptions {
            port: 0,
            flags: &["--keep-alive", "1s", "--compile-timeout", "600s"],
        },
    )?;
    let admin = Admin::new(&node.admin, &node.token);
    let name = template.name;
    let started = Instant::now();
    let deployed = admin.deploy(name, &wasm, Some(&format!("/{name}")))?;
    let deploy_us = micros(started.elapsed());
    let compile_ms = deployed
        .compile_ms
        .filter(|_| deployed.compiled)
        .context("the deploy did not compile (or said no compile_ms)")?;
    let url = format!("{}/{name}", node.gateway);
    let mut process = node.process;
    wait_for_200(&url, Instant::now(), &mut process, Duration::from_secs(60))?;
    let load = load_posting(bench, &mut process, &url, ECHO_BODY)?;
    let rss_after = process.memory_bytes("VmRSS")? as f64;

    // The same component under another name (no compile: its artifact is
    // cached), whose records are then only the ones below.
    let cold = format!("{name}-cold");
    admin.deploy(&cold, &wasm, Some(&format!("/{cold}")))?;
    let cold_url = format!("{}/{cold}", node.gateway);
    wait_for_200(
        &cold_url,
        Instant::now(),
        &mut process,
        Duration::from_secs(60),
    )?;
    let mut figures = Figures {
        bytes: wasm.len() as u64,
        compile_ms,
        deploy_us,
        load,
        rss_after,
        cold_request: Runs::default(),
        cold_recorded: Runs::default(),
        all_marked_cold: true,
    };
    let names = [cold.clone()];
    for run in 0..bench.profile.cold_runs {
        wait_until_cold(&admin, &names)?;
        let started = Instant::now();
        let (status, _) = get(&cold_url, Duration::from_secs(60))?;
        let elapsed = started.elapsed();
        if status != 200 {
            bail!("cold request to {cold_url} answered {status}");
        }
        figures.cold_request.push(micros(elapsed));
        let (recorded, marked) = last_record(&admin, &cold, run + 2)?;
        figures.cold_recorded.push(recorded);
        figures.all_marked_cold &= marked;
    }
    process.check_running()?;
    Ok(figures)
}

impl Results {
    /// The scenario's markdown.
    pub fn markdown(&self, runs: usize, run_secs: u64, cold_runs: usize) -> String {
        let mut out = format!(
            "## 7. Big components (Mayfly)\n\n\
             The functions `mayfly new --template python-http` and `--template js-http` create, \
             built with the templates' pinned toolchains (componentize-py, componentize-js) \
             into the bench cache, each deployed to a fresh node started with `--keep-alive \
             1s`. Warm: `wrk -t2 -c64 -d{run_secs}s` POSTing a {}-byte body that the handler \
             echoes, a fresh instance per request, {runs} runs, measured as in scenario 1. \
             Cold: the same component under a second name, first request after it was unloaded \
             (artifact on disk, not in memory), {cold_runs} times. Median (min–max).\n\n\
             | component | size | compile at deploy | deploy call | req/s | p50 | p99 | node CPU / request | node peak RSS | node RSS after | errors |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
            ECHO_BODY.len()
        );
        for (template, outcome) in &self.rows {
            match outcome.measured() {
                Some(f) => out.push_str(&format!(
                    "| {} | {:.1} MB | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    template.label,
                    f.bytes as f64 / 1e6,
                    latency(f.compile_ms * 1e3),
                    latency(f.deploy_us),
                    f.load.rps.show(count),
                    f.load.p50.show(latency),
                    f.load.p99.show(latency),
                    f.load.cpu_us.show(latency),
                    mib(f.load.peak_rss),
                    mib(f.rss_after),
                    f.load.errors,
                )),
                None => out.push_str(&format!(
                    "| {} | {} ||||||||||\n",
                    template.label,
                    outcome.note().unwrap_or_default()
                )),
            }
        }
        out.push_str(
            "\n| component | first request to a cold-tier function, client side | its \
             `init_us + wall_us` in the node's usage record | goal: < 5 ms in the node |\n\
             |---|---|---|---|\n",
        );
        for (template, outcome) in &self.rows {
            match outcome.measured() {
                Some(f) => {
                    let marked = if f.all_marked_cold {
                        ""
                    } else {
                        " (not every record is marked `cold`)"
                    };
                    let met = match f.cold_recorded.median() {
                        Some(us) if us < 5_000.0 => "met",
                        Some(_) => "not met",
                        None => "–",
                    };
                    out.push_str(&format!(
                        "| {} | {} | {}{marked} | {met} |\n",
                        template.label,
                        f.cold_request.show(latency),
                        f.cold_recorded.show(latency),
                    ));
                }
                None => out.push_str(&format!(
                    "| {} | {} |||\n",
                    template.label,
                    outcome.note().unwrap_or_default()
                )),
            }
        }
        out
    }
}
