//! The node's settings: [`NodeConfig`] (what `Platform::open` is given)
//! and the config file (`node.toml`) with the price list it carries.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mayfly_runtime::RuntimeConfig;
use mayfly_scaling::{HybridHistogram, KeepAlivePolicy};
use mayfly_store::UsageRow;
use serde::{Deserialize, Serialize};

/// The node's config file. Every section is optional; unknown keys are
/// errors that name the key and its line.
///
/// ```toml
/// [prices]
/// currency = "USD"
/// per_million_requests = 0.20
/// per_gb_second = 0.0000166667
/// per_cpu_second = 0.0
///
/// [scaling]
/// keep_alive = "hybrid"        # or a fixed time: "10m", "fixed:30s"
/// max_concurrency = 1000
/// memory_budget_mb = 16384
/// function_share_percent = 25  # of the shared slots and memory, per function
///
/// [limits]
/// max_component_mb = 64        # largest component a deploy may upload
///
/// [connections]
/// header_timeout = "10s"
/// idle_timeout = "60s"
/// body_timeout = "60s"
/// max_connections = 10000      # the gateway's
/// admin_max_connections = 256
///
/// [log]
/// format = "text"              # or "json": one JSON object per line
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeFile {
    /// Prices used to turn usage into cost.
    pub prices: PriceList,
    /// Node-wide scaling settings; `mayfly serve` flags override them.
    pub scaling: ScalingFile,
    /// Timeouts and caps of the listeners; `mayfly serve` flags override them.
    pub connections: ConnectionsFile,
    /// Node-wide limits; `mayfly serve` flags override them.
    pub limits: LimitsFile,
    /// How the node writes its own log; `--log-format` overrides it.
    pub log: LogFile,
}

/// The `[log]` table: what `mayfly serve --log-format` sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogFile {
    /// `text` (for people) or `json` (for log collectors).
    pub format: Option<LogFormat>,
}

/// How a node writes its log lines to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event for people: time, level, target, message and
    /// fields (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target` and the
    /// event's `fields`, its `message` among them), for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format `{other}`: give `text` or `json`"
            )),
        }
    }
}

/// Default largest component a deploy may upload, in MiB.
pub const DEFAULT_MAX_COMPONENT_MB: u64 = 64;

/// Largest `max_component_mb` accepted: an upload is held in memory whole
/// while it is checked and compiled.
pub const MAX_COMPONENT_MB_CEILING: u64 = 4096;

/// The `[limits]` table: what `mayfly serve --max-component-mb` sets.
/// Absent keys take the flag's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    /// Largest component a deploy may upload, in MiB (1 to 4096; default
    /// 64).
    pub max_component_mb: Option<u64>,
}

/// The `[scaling]` table: what `mayfly serve --keep-alive`,
/// `--max-concurrency` and `--memory-budget` set, for nodes configured by
/// file. Absent keys take the flag's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingFile {
    /// Keep-alive policy: `hybrid` or a fixed time.
    pub keep_alive: Option<String>,
    /// Invocations running at once over all functions.
    pub max_concurrency: Option<u32>,
    /// Memory the node may give functions, in MB.
    pub memory_budget_mb: Option<u64>,
    /// Most of the node's shared slots and memory one function may hold
    /// at once unless it sets its own `max_concurrency`, in percent (1 to
    /// 100; default 25).
    pub function_share_percent: Option<u32>,
}

impl NodeFile {
    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Parses and checks a config file's text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: NodeFile = toml::from_str(text)?;
        file.prices.check()?;
        file.connections.check()?;
        if let Some(policy) = &file.scaling.keep_alive {
            mayfly_scaling::parse_policy(policy)
                .map_err(|e| anyhow::anyhow!("[scaling] keep_alive: {e}"))?;
        }
        if let Some(mb) = file.limits.max_component_mb
            && !(1..=MAX_COMPONENT_MB_CEILING).contains(&mb)
        {
            anyhow::bail!(
                "[limits] max_component_mb is {mb}: give 1 to {MAX_COMPONENT_MB_CEILING} (MiB)"
            );
        }
        if file.scaling.max_concurrency == Some(0) {
            anyhow::bail!("[scaling] max_concurrency is 0: give at least 1");
        }
        if file.scaling.memory_budget_mb == Some(0) {
            anyhow::bail!("[scaling] memory_budget_mb is 0: give at least 1");
        }
        if let Some(percent) = file.scaling.function_share_percent
            && !(1..=100).contains(&percent)
        {
            anyhow::bail!(
                "[scaling] function_share_percent is {percent}: give 1 to 100 (the percent of the \
                 node's shared concurrency and memory one function may take)"
            );
        }
        Ok(file)
    }
}

/// What usage costs. The defaults are AWS Lambda's public x86 prices
/// (USD 0.20 per million requests, USD 0.0000166667 per GB-second of
/// configured memory); CPU time is not charged by default, because the
/// GB-second price already covers it on Lambda (set it to bill CPU the way
/// Workers does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriceList {
    /// Label of the currency the prices are in.
    pub currency: String,
    /// Price of one million invocations.
    pub per_million_requests: f64,
    /// Price of one GB-second of configured memory × billed duration.
    pub per_gb_second: f64,
    /// Price of one second of CPU time.
    pub per_cpu_second: f64,
}

impl Default for PriceList {
    fn default() -> Self {
        Self {
            currency: "USD".into(),
            per_million_requests: 0.20,
            per_gb_second: 0.000_016_666_7,
            per_cpu_second: 0.0,
        }
    }
}

/// The cost of some usage, by what it is charged for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// Charge for the number of invocations.
    pub requests: f64,
    /// Charge for billed GB-seconds.
    pub compute: f64,
    /// The part of `compute` that cold starts' initialisation cost.
    pub cold_starts: f64,
    /// Charge for CPU seconds.
    pub cpu: f64,
    /// The sum of the above.
    pub total: f64,
}

impl PriceList {
    fn check(&self) -> anyhow::Result<()> {
        for (name, price) in [
            ("per_million_requests", self.per_million_requests),
            ("per_gb_second", self.per_gb_second),
            ("per_cpu_second", self.per_cpu_second),
        ] {
            if !price.is_finite() || price < 0.0 {
                anyhow::bail!("prices.{name} must be a number of zero or more, not {price}");
            }
        }
        Ok(())
    }

    /// What `usage` costs under this price list.
    pub fn cost(&self, usage: &UsageRow) -> Cost {
        // Throttled requests never ran: like Lambda, they are not charged.
        let billable = usage.invocations.saturating_sub(usage.outcomes.throttled);
        let requests = billable as f64 / 1e6 * self.per_million_requests;
        let compute = usage.billed_gb_s * self.per_gb_second;
        let cpu = usage.cpu_us as f64 / 1e6 * self.per_cpu_second;
        Cost {
            requests,
            compute,
            cold_starts: usage.init_gb_s * self.per_gb_second,
            cpu,
            total: requests + compute + cpu,
        }
    }
}

/// The `[connections]` table: what `mayfly serve --header-timeout`,
/// `--idle-timeout`, `--body-timeout`, `--max-connections` and
/// `--admin-max-connections` set. Absent keys take the flag's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsFile {
    /// Time to send a whole request head once started, e.g. "10s".
    pub header_timeout: Option<String>,
    /// Time a connection may stay open with no request in flight.
    pub idle_timeout: Option<String>,
    /// Time from a request's head to the last byte of its body.
    pub body_timeout: Option<String>,
    /// Connections the gateway holds at once.
    pub max_connections: Option<usize>,
    /// Connections the admin API holds at once.
    pub admin_max_connections: Option<usize>,
}

impl ConnectionsFile {
    fn check(&self) -> anyhow::Result<()> {
        for (key, value) in [
            ("header_timeout", &self.header_timeout),
            ("idle_timeout", &self.idle_timeout),
            ("body_timeout", &self.body_timeout),
        ] {
            if let Some(value) = value {
                crate::connections::parse_timeout(value)
                    .map_err(|e| anyhow::anyhow!("[connections] {key} = \"{value}\": {e}"))?;
            }
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("admin_max_connections", self.admin_max_connections),
        ] {
            if value == Some(0) {
                anyhow::bail!("[connections] {key} is 0: give at least 1");
            }
        }
        Ok(())
    }
}

// ---- the node's settings ----

/// Share of the node's shared (unreserved) slots and memory that one
/// function may hold at once unless it sets its own `max_concurrency`, in
/// percent: a function flooded with slow requests leaves three quarters of
/// the node to the others. `[scaling] function_share_percent` changes it.
pub const DEFAULT_FUNCTION_SHARE_PERCENT: u32 = 25;

/// Default number of versions a function keeps (besides those an alias
/// points at).
pub const DEFAULT_KEEP_VERSIONS: usize = 10;

/// Settings of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Folder holding all of the node's state.
    pub data_dir: PathBuf,
    /// Runtime (engine and instance pool) settings.
    pub runtime: RuntimeConfig,
    /// Largest component accepted for deploy, in bytes.
    pub max_component_bytes: usize,
    /// Prices that turn usage into cost.
    pub prices: PriceList,
    /// Concurrency, memory budget and keep-alive.
    pub scaling: ScalingConfig,
    /// How long a function's per-invocation credential stays valid.
    pub credential_ttl: Duration,
    /// Versions each function keeps after a deploy: the newest ones, plus
    /// any an alias points at (at least 1).
    pub keep_versions: usize,
    /// Compiles uploads within the node's bounds (time, memory, how many
    /// at once): in-process by default, in a child process for `mayfly
    /// serve`.
    pub compiler: Arc<mayfly_runtime::Compiler>,
    /// The node's name in the fleet's membership list.
    pub node_name: String,
    /// The node's labels (`region=eu`, `site=fra1`), shown with it.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Which functions get latency histograms of their own in `/metrics`.
    pub function_histograms: FunctionHistograms,
}

/// How the node scales functions.
#[derive(Clone)]
pub struct ScalingConfig {
    /// Keep-alive and pre-warm policy of every function.
    pub keep_alive: Arc<dyn KeepAlivePolicy>,
    /// Invocations running at once on the node, over every function.
    pub max_concurrency: u32,
    /// Share of the node's shared slots and memory, in percent, that one
    /// function without a `max_concurrency` of its own may hold at once
    /// (see [`DEFAULT_FUNCTION_SHARE_PERCENT`]).
    pub function_share_percent: u32,
    /// Memory the node may promise to running invocations (each counts its
    /// configured limit) and keep in warm and hot functions, in bytes.
    pub memory_budget_bytes: u64,
    /// How often the autoscaler applies keep-alive windows and the budget.
    pub tick: Duration,
}

impl std::fmt::Debug for ScalingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScalingConfig")
            .field("keep_alive", &self.keep_alive.name())
            .field("max_concurrency", &self.max_concurrency)
            .field("function_share_percent", &self.function_share_percent)
            .field("memory_budget_bytes", &self.memory_budget_bytes)
            .field("tick", &self.tick)
            .finish()
    }
}

impl ScalingConfig {
    /// The defaults for a node of `max_instances`: the hybrid-histogram
    /// keep-alive (fewer cold starts than a fixed 10 minutes for less idle
    /// memory in `mayfly simulate`), every instance slot usable, a quarter
    /// of them (and of the memory) for any one function by default, and the
    /// machine's physical memory as the budget.
    pub fn new(max_instances: u32) -> Self {
        let policy: Arc<dyn KeepAlivePolicy> = Arc::new(HybridHistogram::default());
        Self {
            keep_alive: policy.clone(),
            max_concurrency: max_instances,
            function_share_percent: DEFAULT_FUNCTION_SHARE_PERCENT,
            memory_budget_bytes: physical_memory().unwrap_or(8 << 30),
            tick: Duration::from_secs(1),
        }
        .with_keep_alive(policy)
    }

    /// Uses `policy`, with the autoscaler ticking four times per step of
    /// the policy's windows (so a short keep-alive, as tests use, is not
    /// stretched by a whole tick), between 50 ms and once a second.
    pub fn with_keep_alive(mut self, policy: Arc<dyn KeepAlivePolicy>) -> Self {
        self.tick =
            (policy.resolution() / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        self.keep_alive = policy;
        self
    }
}

/// The machine's host name (`/proc/sys/kernel/hostname`), else `local`:
/// a node's name when none is given.
pub fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "local".to_string())
}

/// The machine's physical memory, from `/proc/meminfo` (Linux).
pub fn physical_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl NodeConfig {
    /// Defaults for a node keeping its state in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            runtime: RuntimeConfig::default(),
            max_component_bytes: (DEFAULT_MAX_COMPONENT_MB << 20) as usize,
            prices: PriceList::default(),
            scaling: ScalingConfig::new(RuntimeConfig::default().max_instances),
            credential_ttl: crate::auth::DEFAULT_CREDENTIAL_TTL,
            keep_versions: DEFAULT_KEEP_VERSIONS,
            compiler: Arc::new(mayfly_runtime::Compiler::in_process(
                mayfly_runtime::CompileLimits::default(),
            )),
            node_name: default_node_name(),
            labels: Default::default(),
            function_histograms: Default::default(),
        }
    }
}

/// Which functions get histograms of their own (`serve
/// --function-histograms`). Without one a function has 14 series (7
/// outcomes, cold starts, throttles, instances in flight, instances, and a
/// tier state set of 3); each of its two histograms adds 24 (21 buckets,
/// `+Inf`, sum, count). The node-wide histograms are always there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FunctionHistograms {
    /// No function has its own (the default: 10,000 functions stay 140,000
    /// series).
    #[default]
    None,
    /// Every function has its own (62 series per function).
    All,
    /// Only these functions.
    Only(BTreeSet<String>),
}

impl FunctionHistograms {
    /// `all`, `none`, or a comma-separated list of function names.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "all" | "*" => Ok(Self::All),
            "none" | "" => Ok(Self::None),
            list => {
                let names: BTreeSet<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|name| !name.is_empty())
                    .map(str::to_string)
                    .collect();
                if let Some(bad) = names
                    .iter()
                    .find(|name| crate::validate::validate_name(name).is_err())
                {
                    return Err(format!(
                        "`{}` is not a function name: give `all`, `none`, or function names \
                         separated by commas",
                        bad.escape_debug()
                    ));
                }
                Ok(Self::Only(names))
            }
        }
    }

    pub(crate) fn includes(&self, function: &str) -> bool {
        match self {
            Self::None => false,
            Self::All => true,
            Self::Only(names) => names.contains(function),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_default_prices() {
        assert_eq!(NodeFile::parse("").unwrap().prices, PriceList::default());
    }

    #[test]
    fn a_misspelled_key_is_named_with_its_line() {
        let error = NodeFile::parse("[prices]\ncurrency = \"EUR\"\nper_gb_secnd = 1.0\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("per_gb_secnd"), "{error}");
        assert!(error.contains("line 3"), "{error}");
    }

    #[test]
    fn negative_prices_are_refused() {
        let error = NodeFile::parse("[prices]\nper_million_requests = -1.0\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("per_million_requests"), "{error}");
    }

    #[test]
    fn the_log_table_names_a_format() {
        assert_eq!(NodeFile::parse("").unwrap().log.format, None);
        let file = NodeFile::parse("[log]\nformat = \"json\"\n").unwrap();
        assert_eq!(file.log.format, Some(LogFormat::Json));
        let error = NodeFile::parse("[log]\nformat = \"xml\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("xml") && error.contains("line 2"), "{error}");
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert!("JSON".parse::<LogFormat>().is_err());
    }

    #[test]
    fn the_scaling_table_is_read_and_checked() {
        let file = NodeFile::parse(
            "[scaling]\nkeep_alive = \"fixed:30s\"\nmax_concurrency = 50\nmemory_budget_mb = 2048\n",
        )
        .unwrap();
        assert_eq!(file.scaling.keep_alive.as_deref(), Some("fixed:30s"));
        assert_eq!(file.scaling.max_concurrency, Some(50));
        assert_eq!(file.scaling.memory_budget_mb, Some(2048));
        assert_eq!(file.scaling.function_share_percent, None);
        let file = NodeFile::parse("[scaling]\nfunction_share_percent = 50\n").unwrap();
        assert_eq!(file.scaling.function_share_percent, Some(50));
        for bad in [0, 101] {
            let error = NodeFile::parse(&format!("[scaling]\nfunction_share_percent = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains("function_share_percent"), "{error}");
        }
        let error = NodeFile::parse("[scaling]\nkeep_alive = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("keep_alive"), "{error}");
        let error = NodeFile::parse("[scaling]\nkeepalive = \"10m\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("keepalive") && error.contains("line 2"),
            "{error}"
        );
    }

    #[test]
    fn the_component_limit_is_read_and_bounded() {
        let file = NodeFile::parse("[limits]\nmax_component_mb = 200\n").unwrap();
        assert_eq!(file.limits.max_component_mb, Some(200));
        assert_eq!(NodeFile::parse("").unwrap().limits.max_component_mb, None);
        for bad in ["0", "4097"] {
            let error = NodeFile::parse(&format!("[limits]\nmax_component_mb = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains("give 1 to 4096"), "{error}");
        }
        let error = NodeFile::parse("[limits]\nmax_component = 1\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("max_component"), "{error}");
    }

    #[test]
    fn cost_adds_requests_compute_and_cpu() {
        let prices = PriceList {
            currency: "USD".into(),
            per_million_requests: 0.20,
            per_gb_second: 0.00001,
            per_cpu_second: 0.5,
        };
        let usage = UsageRow {
            function: None,
            version: None,
            period_start_ms: None,
            invocations: 2_000_000,
            errors: 0,
            outcomes: Default::default(),
            cold_starts: 0,
            billed_ms: 0,
            billed_gb_s: 1000.0,
            used_gb_s: 0.0,
            cpu_us: 4_000_000,
            wall_us: 0,
            init_us: 50_000_000,
            init_gb_s: 100.0,
        };
        let cost = prices.cost(&usage);
        assert!((cost.requests - 0.40).abs() < 1e-12);
        assert!((cost.compute - 0.01).abs() < 1e-12);
        // Cold starts are a part of compute, not charged twice.
        assert!((cost.cold_starts - 0.001).abs() < 1e-12);
        assert!((cost.cpu - 2.0).abs() < 1e-12);
        assert!((cost.total - 2.41).abs() < 1e-12);
    }

    #[test]
    fn the_connections_table_is_read_and_checked() {
        let file =
            NodeFile::parse("[connections]\nheader_timeout = \"5s\"\nmax_connections = 100\n")
                .unwrap();
        assert_eq!(file.connections.header_timeout.as_deref(), Some("5s"));
        assert_eq!(file.connections.max_connections, Some(100));
        let error = NodeFile::parse("[connections]\nidle_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("idle_timeout"), "{error}");
        let error = NodeFile::parse("[connections]\nadmin_max_connections = 0\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("admin_max_connections is 0"), "{error}");
    }
}
