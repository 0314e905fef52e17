//! `cargo xtask bench`: Mayfly and its peers (`wasmtime serve` and
//! workerd) measured side by side on this machine in one run, so that the
//! report's ratios compare like with like.
//!
//! - `cargo xtask bench`: full run (minutes); installs missing peers into
//!   the cache folder (`$MAYFLY_BENCH_CACHE`, else `~/.cache/mayfly-bench`)
//!   and writes `bench/results/latest.md` and `latest.svg`;
//! - `--no-install`: the same, skipping peers that are not installed;
//! - `--smoke`: seconds-long runs on the debug build, peers only if already
//!   installed; writes `bench/results/smoke.md` and `smoke.svg`;
//! - `--only NAME[,NAME…]`: only those scenarios (the module names below:
//!   `http`, `cold`, `density`, `burst`, `events`, `outbound`, `big`), to
//!   re-measure one after a change; the report goes to
//!   `target/bench-partial.md`, never over a full run's.
//!
//! Scenarios (one module each): hello-world HTTP load (`http`), cold starts
//! (`cold`), many functions on one node (`density`), a burst of new
//! connections (`burst`), queue-triggered events (`events`) and a function
//! calling an upstream over outbound HTTP (`outbound`), and the Python and
//! JavaScript templates' big components (`big`).

mod big;
mod burst;
mod cold;
mod density;
mod events;
mod http;
mod mayfly;
mod outbound;
mod process;
mod report;
mod stats;
mod systems;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use process::command;
use systems::{HelloFiles, System};

/// The scenarios, by module name, in the order they run.
const SCENARIOS: [&str; 7] = [
    "http", "cold", "density", "burst", "events", "outbound", "big",
];

/// Command-line options of `cargo xtask bench`.
struct Options {
    smoke: bool,
    no_install: bool,
    /// Scenarios to run; empty: all of them.
    only: Vec<String>,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut options = Options {
            smoke: false,
            no_install: false,
            only: Vec::new(),
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--smoke" => options.smoke = true,
                "--no-install" => options.no_install = true,
                "--only" => {
                    let names = args.next().map(String::as_str).unwrap_or_default();
                    for name in names.split(',').filter(|n| !n.is_empty()) {
                        if !SCENARIOS.contains(&name) {
                            bail!(
                                "unknown scenario `{name}` after --only: use one or more of {}, \
                                 comma-separated",
                                SCENARIOS.join(", ")
                            );
                        }
                        options.only.push(name.to_string());
                    }
                    if options.only.is_empty() {
                        bail!("--only needs scenario names: {}", SCENARIOS.join(", "));
                    }
                }
                other => bail!(
                    "unknown bench option `{other}`: use --smoke, --no-install and/or \
                     --only NAME[,NAME…]"
                ),
            }
        }
        Ok(options)
    }

    /// Whether scenario `name` runs.
    fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|n| n == name)
    }

    /// Scenario `name`'s results: measured (announced as `label`), or the
    /// empty results (`Default`) of a scenario `--only` left out.
    fn scenario<T: Default>(&self, name: &str, label: &str, measure: impl FnOnce() -> T) -> T {
        if self.runs(name) {
            println!("{label}");
            measure()
        } else {
            T::default()
        }
    }
}

/// Sizes and durations of one bench run.
pub struct Profile {
    /// Smoke run: seconds-long, debug build.
    pub smoke: bool,
    /// wrk warm-up before the measured runs.
    pub warmup: Duration,
    /// Length of one measured wrk run.
    pub run: Duration,
    /// Measured runs of each figure.
    pub runs: usize,
    /// Timed starts in the cold-start scenario (cheap, and noisier than
    /// the load figures, so more of them in a full run).
    pub cold_runs: usize,
    /// Functions deployed in the density scenario.
    pub density_functions: usize,
    /// Functions whose first request is timed in the density scenario.
    pub density_sample: usize,
    /// Clients of each burst.
    pub burst_clients: usize,
    /// Bursts (each one is a run).
    pub burst_rounds: usize,
    /// Events drained in the queue-trigger scenario.
    pub events: usize,
    /// Events sent one at a time for the latency figures.
    pub event_samples: usize,
}

impl Profile {
    fn new(smoke: bool) -> Self {
        if smoke {
            Profile {
                smoke,
                warmup: Duration::from_secs(1),
                run: Duration::from_secs(1),
                runs: 3,
                cold_runs: 3,
                density_functions: 50,
                density_sample: 100,
                burst_clients: 100,
                burst_rounds: 3,
                events: 2_000,
                event_samples: 100,
            }
        } else {
            Profile {
                smoke,
                warmup: Duration::from_secs(5),
                run: Duration::from_secs(15),
                runs: 3,
                cold_runs: 5,
                density_functions: 10_000,
                density_sample: 100,
                burst_clients: 1_000,
                burst_rounds: 5,
                events: 100_000,
                event_samples: 2_000,
            }
        }
    }
}

/// Everything the scenarios share.
pub struct Bench {
    /// Durations and sizes.
    pub profile: Profile,
    /// Mayfly and the peers.
    pub systems: Vec<System>,
    /// The hello component.
    pub hello: PathBuf,
    /// The workerd config serving the JavaScript hello.
    pub workerd_config: PathBuf,
    /// The wrk script printing percentiles.
    pub wrk_script: PathBuf,
    /// The `burst` example.
    pub burst: PathBuf,
    /// The `events_bench` example.
    pub events_bench: PathBuf,
    /// Where child processes write their stderr.
    pub log_dir: tempfile::TempDir,
}

impl Bench {
    /// The files every system needs to serve hello.
    pub fn hello_files(&self) -> HelloFiles<'_> {
        HelloFiles {
            component: &self.hello,
            workerd_config: &self.workerd_config,
            log_dir: self.log_dir.path(),
        }
    }

    /// The Mayfly system (always first).
    pub fn mayfly(&self) -> anyhow::Result<&Path> {
        self.systems
            .iter()
            .find(|system| system.kind == systems::Kind::Mayfly)
            .and_then(|system| system.binary.as_deref().ok())
            .context("no Mayfly binary")
    }
}

/// A measurement of one system: its figures, or why there are none.
pub enum Outcome<T> {
    /// Measured.
    Measured(T),
    /// Not run, for the reason given (such as a peer not installed).
    Skipped(String),
    /// Run and failed.
    Failed(String),
}

/// What a scenario left out by `--only` reports for a system.
impl<T> Default for Outcome<T> {
    fn default() -> Self {
        Outcome::Skipped("not run (--only)".into())
    }
}

impl<T> Outcome<T> {
    /// Runs `measure` for `system` unless it is unavailable; an error
    /// becomes a failed row so the other systems are still measured.
    pub fn of(system: &System, measure: impl FnOnce() -> anyhow::Result<T>) -> Self {
        match &system.binary {
            Err(why) if why.starts_with("failed") => Outcome::Failed(why.clone()),
            Err(why) => Outcome::Skipped(why.clone()),
            Ok(_) => {
                println!("  {}", system.kind.label());
                match measure() {
                    Ok(figures) => Outcome::Measured(figures),
                    Err(error) => {
                        eprintln!("  {} failed: {error:#}", system.kind.label());
                        Outcome::Failed(format!("failed: {error:#}"))
                    }
                }
            }
        }
    }

    /// The figures, if measured.
    pub fn measured(&self) -> Option<&T> {
        match self {
            Outcome::Measured(figures) => Some(figures),
            _ => None,
        }
    }

    /// Whether the measurement failed.
    pub fn failed(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }

    /// The row text of a system without figures.
    pub fn note(&self) -> Option<&str> {
        match self {
            Outcome::Measured(_) => None,
            Outcome::Skipped(why) | Outcome::Failed(why) => Some(why),
        }
    }
}

/// Runs `cargo xtask bench [--smoke] [--no-install]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let options = Options::parse(args)?;
    let profile = Profile::new(options.smoke);
    let root = crate::workspace_root();
    require_wrk()?;

    println!("building the guests and Mayfly");
    let guests = crate::build_guests()?;
    let hello = guests.join("hello.wasm");
    let caps = guests.join("caps.wasm");
    let target = build_mayfly(&root, profile.smoke)?;
    let cache = systems::cache_dir()?;
    // Smoke runs never install: they must stay about a minute long.
    let install = !options.smoke && !options.no_install;
    let systems = systems::prepare(&target.join("mayfly"), &cache, install);
    // Built once per template version into the cache; a smoke run builds
    // only with the toolchains already installed, and says so otherwise.
    let big_components = if options.runs("big") {
        big::prepare(&target.join("mayfly"), &cache, profile.smoke)
    } else {
        Vec::new()
    };
    let bench = Bench {
        profile,
        systems,
        hello,
        workerd_config: root.join("bench/peers/workerd.capnp"),
        wrk_script: root.join("bench/wrk-percentiles.lua"),
        burst: target.join("examples/burst"),
        events_bench: target.join("examples/events_bench"),
        log_dir: tempfile::tempdir().context("cannot create a log directory")?,
    };
    for system in &bench.systems {
        let state = system
            .binary
            .as_ref()
            .map_or_else(String::as_str, |_| &system.version);
        println!("{}: {state}", system.kind.label());
    }

    let http = options.scenario("http", "hello-world HTTP load", || http::run(&bench));
    let cold = options.scenario("cold", "cold starts", || cold::run(&bench));
    let density = options.scenario("density", "density", || density::run(&bench));
    let burst = options.scenario("burst", "burst", || burst::run(&bench));
    let events = options.scenario("events", "queue-triggered events", || events::run(&bench));
    let outbound = options.scenario("outbound", "outbound HTTP", || outbound::run(&bench, &caps));
    let big = options.scenario("big", "big components", || {
        big::run(&bench, &big_components)
    });

    let results = report::Results {
        http,
        cold,
        density,
        burst,
        events,
        outbound,
        big,
    };
    let (name, out_dir) = if !options.only.is_empty() {
        ("bench-partial", crate::target_dir(&root))
    } else if bench.profile.smoke {
        ("smoke", root.join("bench/results"))
    } else {
        ("latest", root.join("bench/results"))
    };
    let failures = report::write(&bench, &results, &out_dir, name)?;
    println!(
        "wrote {} and {name}.svg",
        out_dir.join(format!("{name}.md")).display()
    );
    if failures > 0 {
        bail!("{failures} measurement(s) failed: see the `failed` rows in the report");
    }
    Ok(())
}

fn require_wrk() -> anyhow::Result<()> {
    match command("wrk").arg("-v").output() {
        Ok(_) => Ok(()),
        Err(_) => bail!("wrk not found: apt-get install wrk"),
    }
}

/// Builds the `mayfly` binary and the driver examples, in release (or debug
/// for a smoke run) and returns the target folder holding them. A smoke run
/// builds what `cargo test --workspace --all-targets` builds, as
/// `bench/build.sh` explains, so after the test suite it compiles nothing.
fn build_mayfly(root: &Path, smoke: bool) -> anyhow::Result<PathBuf> {
    let mut cargo = command(env!("CARGO"));
    cargo.current_dir(root);
    if smoke {
        cargo.args(["build", "--workspace", "--all-targets"]);
    } else {
        cargo
            .args(["build", "--release", "-p", "mayfly", "--bins"])
            .args(["--example", "burst", "--example", "events_bench"])
            .args(["--example", "bare_hyper"]);
    }
    crate::run(&mut cargo)?;
    Ok(crate::target_dir(root).join(if smoke { "debug" } else { "release" }))
}
