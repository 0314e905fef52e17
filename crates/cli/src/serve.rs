//! `mayfly serve`: run a node until SIGTERM or Ctrl-C.

use std::io::{IsTerminal as _, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use mayfly_platform::config::{ConnectionsFile, LogFormat, NodeFile, ScalingFile};
use std::sync::Arc;

use std::time::Duration;

use mayfly_nats::{Credentials, Fleet, NatsOptions};
use mayfly_platform::connections::{self, ConnectionLimits, ListenerLimits};
use mayfly_platform::tls::TlsFiles;
use mayfly_platform::{NodeConfig, RunningNode, ScalingConfig, ServeConfig};
use mayfly_runtime::{CompileLimits, Compiler};
use mayfly_store::Stores;
use tracing_subscriber::EnvFilter;

/// `mayfly serve`: where the node keeps its state, what it listens on and
/// its node-wide limits.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Folder holding all of the node's state (database and blobs).
    #[arg(long, env = "MAYFLY_DATA_DIR", default_value = ".mayfly")]
    pub data_dir: PathBuf,
    /// Address of the public HTTP gateway.
    #[arg(long, env = "MAYFLY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of the admin API; off loopback it needs --tls-cert and --tls-key, or --insecure.
    #[arg(long, env = "MAYFLY_ADMIN_LISTEN", default_value = "127.0.0.1:8081")]
    pub admin_listen: SocketAddr,
    #[command(flatten)]
    pub tls: AdminTlsArgs,
    /// Also serve /metrics (and /healthz, /readyz) on this address, without a
    /// token, for Prometheus (the admin API's /metrics needs a read token).
    #[arg(long, env = "MAYFLY_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Functions whose latency and queue-wait histograms /metrics shows on
    /// their own (48 series each): `all`, `none`, or names separated by
    /// commas. Node-wide histograms are always shown.
    #[arg(long, env = "MAYFLY_FUNCTION_HISTOGRAMS", value_name = "NAMES",
          default_value = "none",
          value_parser = mayfly_platform::config::FunctionHistograms::parse)]
    pub function_histograms: mayfly_platform::config::FunctionHistograms,
    #[command(flatten)]
    pub s3: S3Args,
    /// Most function instances alive at once (running and kept).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_instances: u32,
    /// Most invocations running at once over all functions (default: --max-instances).
    /// Flags override the config file's `[scaling]` table.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrency: Option<u32>,
    /// Memory the node may give functions, in MB: running invocations count
    /// their configured memory, warm and hot functions what they hold
    /// (default: the machine's physical memory).
    #[arg(long, value_name = "MB", value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_budget: Option<u64>,
    /// Keep-alive policy: `hybrid` (histogram of idle times, after "Serverless
    /// in the Wild") or a fixed time such as `10m` or `fixed:30s`.
    /// [default: hybrid, or `[scaling] keep_alive` in the config file]
    #[arg(long, env = "MAYFLY_KEEP_ALIVE")]
    pub keep_alive: Option<String>,
    /// How long in-flight requests may finish after SIGTERM (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// How long a function's per-invocation credential (wasi:config key
    /// `mayfly.credential`) stays valid, from 1s to 12h.
    #[arg(long, default_value = "5m", value_parser = parse_credential_ttl)]
    pub credential_ttl: Duration,
    /// The node's config file (TOML, e.g. a `[prices]` table); default
    /// `<data-dir>/node.toml` when it exists.
    #[arg(long, env = "MAYFLY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Versions each function keeps: after a deploy, older ones no alias
    /// points at are deleted.
    #[arg(long, default_value_t = mayfly_platform::DEFAULT_KEEP_VERSIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub keep_versions: usize,
    #[command(flatten)]
    pub connections: ConnectionArgs,
    /// Longest a deploy's compile may take (e.g. 60s, 2m); longer ones are
    /// refused as too large or pathological. The default leaves room for
    /// Python and JavaScript components (12-20 MB), which take from ~10 s
    /// on an idle machine to over a minute on a small, busy one.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub compile_timeout: Duration,
    /// Most memory a deploy's compile may use, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 2048,
          value_parser = clap::value_parser!(u64).range(64..))]
    pub compile_memory: u64,
    /// Compiles running at once; more deploys wait (up to --compile-timeout).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub compile_concurrency: u32,
    /// Largest component a deploy may upload, in MiB; larger uploads get 413
    /// before their body is read [default: 64, or `[limits] max_component_mb`
    /// in the config file]
    #[arg(long, value_name = "MB", env = "MAYFLY_MAX_COMPONENT_MB",
          value_parser = clap::value_parser!(u64)
              .range(1..=mayfly_platform::config::MAX_COMPONENT_MB_CEILING))]
    pub max_component_mb: Option<u64>,
    /// How the node writes its log to stderr: `text` for people, `json`
    /// for log collectors (one object per line) [default: text, or `[log]
    /// format` in the config file]
    #[arg(long, env = "MAYFLY_LOG_FORMAT", value_name = "FORMAT",
          value_parser = log_format_parser())]
    pub log_format: Option<LogFormat>,
    #[command(flatten)]
    pub fleet: FleetArgs,
}

/// `--log-format`'s values, listed in help and shell completions.
pub(crate) fn log_format_parser() -> impl clap::builder::TypedValueParser<Value = LogFormat> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(["text", "json"]).try_map(|text| text.parse())
}

/// How a node joins a fleet (`--nats`); without it, it runs on its own.
#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// Join a fleet through these NATS servers (nats://HOST:PORT[,…];
    /// nats-server 2.12 or newer, with JetStream). Without it the node
    /// runs on its own, all state in --data-dir.
    #[arg(long, env = "MAYFLY_NATS", value_name = "URLS")]
    pub nats: Option<String>,
    /// This node's name in the fleet [default: the host name].
    #[arg(long, env = "MAYFLY_NODE_NAME", value_parser = parse_node_name)]
    pub node_name: Option<String>,
    /// The node's labels, e.g. region=eu,site=fra1.
    #[arg(long, env = "MAYFLY_LABELS", value_parser = parse_labels)]
    pub labels: Option<Labels>,
    /// NATS user (with --nats-password; prefer the environment variables).
    #[arg(
        long,
        env = "MAYFLY_NATS_USER",
        requires = "nats_password",
        requires = "nats"
    )]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(
        long,
        env = "MAYFLY_NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "MAYFLY_NATS_TOKEN", hide_env_values = true,
          conflicts_with_all = ["nats_user", "nats_creds", "nats_nkey"], requires = "nats")]
    pub nats_token: Option<String>,
    /// NATS credentials file (JWT and seed, as `nsc` writes it).
    #[arg(long, env = "MAYFLY_NATS_CREDS", value_name = "FILE",
          conflicts_with_all = ["nats_user", "nats_nkey"], requires = "nats")]
    pub nats_creds: Option<PathBuf>,
    /// File holding the node's NATS NKey seed (SU…).
    #[arg(
        long,
        env = "MAYFLY_NATS_NKEY",
        value_name = "FILE",
        conflicts_with = "nats_user",
        requires = "nats"
    )]
    pub nats_nkey: Option<PathBuf>,
    /// Prefix of the fleet's buckets and streams, so fleets can share a
    /// NATS account.
    #[arg(long, env = "MAYFLY_NATS_NAMESPACE", default_value = "mf", value_parser = parse_node_name)]
    pub nats_namespace: String,
    /// The JetStream domain of the fleet's hub. A node whose NATS server
    /// runs another domain (a leaf site's) is an edge node: it reaches
    /// the fleet's state through this domain.
    #[arg(long, env = "MAYFLY_NATS_HUB_DOMAIN", default_value = mayfly_nats::DEFAULT_HUB_DOMAIN,
          value_parser = parse_node_name)]
    pub nats_hub_domain: String,
}

/// `--labels`: `key=value` pairs.
#[derive(Debug, Clone, Default)]
pub struct Labels(pub std::collections::BTreeMap<String, String>);

fn parse_labels(text: &str) -> Result<Labels, String> {
    let mut labels = std::collections::BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!(
                "`{pair}` is not key=value (e.g. region=eu,site=fra1)"
            ));
        };
        mayfly_store::check_label(key, value)?;
        labels.insert(key.to_string(), value.to_string());
    }
    Ok(Labels(labels))
}

/// A node name (or namespace): a NATS KV key and subject token.
fn parse_node_name(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(text.to_string())
    } else {
        Err(format!("`{text}`: use 1-63 letters, digits, `-` or `_`"))
    }
}

impl FleetArgs {
    /// The NATS connection options, if the node joins a fleet.
    fn options(&self, node_name: &str) -> anyhow::Result<Option<NatsOptions>> {
        let Some(list) = &self.nats else {
            return Ok(None);
        };
        let credentials =
            if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
                Credentials::UserPassword {
                    user: user.clone(),
                    password: password.clone(),
                }
            } else if let Some(token) = &self.nats_token {
                Credentials::Token(token.clone())
            } else if let Some(path) = &self.nats_creds {
                Credentials::CredsFile(path.clone())
            } else if let Some(path) = &self.nats_nkey {
                let seed = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read the NATS NKey seed file {}", path.display())
                })?;
                Credentials::NKeySeed(seed.trim().to_string())
            } else {
                Credentials::None
            };
        let (urls, credentials) = NatsOptions::parse_urls(list, credentials)?;
        Ok(Some(NatsOptions {
            urls,
            credentials,
            namespace: self.nats_namespace.clone(),
            node_name: node_name.to_string(),
            replicas: None,
            hub_domain: self.nats_hub_domain.clone(),
        }))
    }
}

fn parse_credential_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(12 * 3600) {
        return Err(format!("{text} is outside 1s to 12h"));
    }
    Ok(ttl)
}

/// How the admin API may be reached from off the machine.
#[derive(Debug, clap::Args)]
pub struct AdminTlsArgs {
    /// Serve the admin API over HTTPS with this certificate chain (PEM, leaf first).
    #[arg(
        long,
        env = "MAYFLY_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "MAYFLY_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Serve the admin API in plain HTTP on a non-loopback --admin-listen
    /// (only on a network you trust: tokens would cross it in the clear).
    #[arg(long, conflicts_with = "tls_cert")]
    insecure: bool,
}

impl AdminTlsArgs {
    /// The admin API's TLS identity, or `None` for plain HTTP, which only
    /// loopback or an explicit --insecure allows.
    fn admin_tls(&self, addr: SocketAddr) -> anyhow::Result<Option<TlsFiles>> {
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            return Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }));
        }
        // `to_canonical`: an IPv4-mapped `::ffff:127.0.0.1` is loopback too.
        if addr.ip().to_canonical().is_loopback() {
            return Ok(None);
        }
        if !self.insecure {
            anyhow::bail!(
                "the admin API would listen on {addr} without TLS: give --tls-cert and --tls-key \
                 (PEM), or --insecure to serve it in plain HTTP on a trusted network"
            );
        }
        // Printed whatever RUST_LOG says: this is a choice to revisit.
        eprintln!(
            "warning: --insecure: the admin API serves plain HTTP on {addr}; its tokens and \
             uploads cross the network unencrypted"
        );
        Ok(None)
    }
}

/// The S3-compatible endpoint (off unless --s3-listen is given).
#[derive(Debug, clap::Args)]
pub struct S3Args {
    /// Serve Mayfly's object buckets over the S3 API on this address (AWS
    /// CLI, boto3, SDKs); off loopback it needs --tls-cert and --tls-key
    /// (the admin API's), or --insecure. [default: off]
    #[arg(long, env = "MAYFLY_S3_LISTEN", value_name = "ADDR")]
    pub s3_listen: Option<SocketAddr>,
    /// Largest object the S3 endpoint stores, in MB (one PUT or a completed
    /// multipart upload).
    #[arg(long, value_name = "MB", default_value_t = mayfly_platform::s3::DEFAULT_MAX_OBJECT_BYTES >> 20,
          value_parser = clap::value_parser!(u64).range(1..=(1 << 24)))]
    pub s3_max_object_mb: u64,
    /// How long a multipart upload may stay neither completed nor aborted
    /// before the node removes it with its parts (1s to 365d).
    #[arg(long, value_name = "AGE", default_value = "7d", value_parser = parse_upload_max_age)]
    pub s3_upload_max_age: Duration,
}

fn parse_upload_max_age(text: &str) -> Result<Duration, String> {
    let age = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if age < Duration::from_secs(1) || age > Duration::from_secs(365 * 24 * 3600) {
        return Err(format!("{text} is outside 1s to 365d"));
    }
    Ok(age)
}

impl AdminTlsArgs {
    /// The S3 endpoint's TLS identity (the admin API's), or `None` for
    /// plain HTTP, which only loopback or an explicit --insecure allows.
    fn s3_tls(&self, addr: SocketAddr) -> anyhow::Result<Option<TlsFiles>> {
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            return Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }));
        }
        if addr.ip().to_canonical().is_loopback() {
            return Ok(None);
        }
        if !self.insecure {
            anyhow::bail!(
                "the S3 endpoint would listen on {addr} without TLS: give --tls-cert and \
                 --tls-key (PEM), or --insecure to serve it in plain HTTP on a trusted network"
            );
        }
        eprintln!(
            "warning: --insecure: the S3 endpoint serves plain HTTP on {addr}; object bytes \
             cross the network unencrypted (requests stay signed)"
        );
        Ok(None)
    }
}

/// Timeouts and caps of the node's connections (both listeners). Flags
/// override the config file's `[connections]` table.
#[derive(Debug, clap::Args)]
pub struct ConnectionArgs {
    /// Time a client has to send a whole request head (or TLS handshake)
    /// once it starts; slower clients are disconnected. [default: 10s]
    #[arg(long, value_parser = connections::parse_timeout)]
    header_timeout: Option<Duration>,
    /// Time a connection may stay open with no request in flight (new, or
    /// kept alive between requests). [default: 60s]
    #[arg(long, value_parser = connections::parse_timeout)]
    idle_timeout: Option<Duration>,
    /// Time from a request's head to the last byte of its body, separate
    /// from the function's timeout; past it the body read fails. [default: 60s]
    #[arg(long, value_parser = connections::parse_timeout)]
    body_timeout: Option<Duration>,
    /// Most connections the gateway holds; at the cap the oldest idle one is
    /// closed for a new one, which is refused (503) if all are busy. [default: 10000]
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    max_connections: Option<usize>,
    /// Most connections the admin API holds, apart from the gateway's. [default: 256]
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    admin_max_connections: Option<usize>,
}

impl ConnectionArgs {
    /// Both listeners' limits (flags, then `file`, then the defaults), the
    /// caps lowered to fit `open_files`.
    fn limits(&self, file: &ConnectionsFile, open_files: u64) -> anyhow::Result<ListenerLimits> {
        let timeout = |flag: Option<Duration>, key: &Option<String>, default: Duration| {
            match (flag, key) {
                (Some(flag), _) => Ok(flag),
                // Checked when the file was read; the message is for safety.
                (None, Some(text)) => connections::parse_timeout(text)
                    .map_err(|e| anyhow::anyhow!("[connections] `{text}`: {e}")),
                (None, None) => Ok(default),
            }
        };
        let gateway = ConnectionLimits {
            header_timeout: timeout(
                self.header_timeout,
                &file.header_timeout,
                connections::DEFAULT_HEADER_TIMEOUT,
            )?,
            idle_timeout: timeout(
                self.idle_timeout,
                &file.idle_timeout,
                connections::DEFAULT_IDLE_TIMEOUT,
            )?,
            body_timeout: timeout(
                self.body_timeout,
                &file.body_timeout,
                connections::DEFAULT_BODY_TIMEOUT,
            )?,
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(connections::DEFAULT_GATEWAY_MAX_CONNECTIONS),
        };
        let mut limits = ListenerLimits {
            gateway,
            admin: ConnectionLimits {
                max_connections: self
                    .admin_max_connections
                    .or(file.admin_max_connections)
                    .unwrap_or(connections::DEFAULT_ADMIN_MAX_CONNECTIONS),
                ..gateway
            },
        };
        if let Some(note) = limits.fit_open_files(open_files) {
            tracing::warn!("{note}");
        }
        Ok(limits)
    }
}

/// Raises this process's soft open-file limit to its hard limit (each
/// connection is a file descriptor, and the usual soft limit of 1024 is
/// far below the connection caps) and returns the limit now in force.
fn raise_open_files() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            let soft = rlimit::Resource::NOFILE
                .get()
                .map_or(1024, |(soft, _)| soft);
            tracing::warn!("cannot raise the open-file limit above {soft}: {error}");
            soft
        }
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Read before logging starts: it may say how to log. A broken file is
    // reported by `main` on stderr like any other refusal to start.
    let default_file = args.data_dir.join("node.toml");
    let file = match &args.config {
        Some(path) => NodeFile::load(path)?,
        None if default_file.exists() => NodeFile::load(&default_file)?,
        None => NodeFile::default(),
    };
    // s3s logs every refused S3 request (a bad signature, a missing key)
    // at ERROR; the S3 endpoint logs its own failures, so its are off.
    init_tracing(
        "info,s3s=off",
        args.log_format.or(file.log.format).unwrap_or_default(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mayfly-worker")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args, file))
}

async fn serve(args: ServeArgs, file: NodeFile) -> anyhow::Result<()> {
    let admin_tls = args.tls.admin_tls(args.admin_listen)?;
    // The S3 listener is bound before the node opens its state, like the
    // others: a bad address opens nothing.
    let s3 = match args.s3.s3_listen {
        Some(addr) => {
            let tls = args.tls.s3_tls(addr)?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for the S3 endpoint on {addr}"))?;
            Some((listener, tls))
        }
        None => None,
    };
    let admin_cert = admin_tls.as_ref().map(|tls| tls.cert.clone());
    let mut node = NodeConfig::new(&args.data_dir);
    node.credential_ttl = args.credential_ttl;
    node.keep_versions = args.keep_versions;
    node.runtime.max_instances = args.max_instances;
    node.compiler = Arc::new(compiler(&args, &node)?);
    if let Some(name) = &args.fleet.node_name {
        node.node_name = name.clone();
    }
    node.labels = args.fleet.labels.clone().unwrap_or_default().0;
    node.function_histograms = args.function_histograms.clone();
    let fleet = args.fleet.options(&node.node_name)?;
    node.scaling = scaling_config(&args, &file.scaling)?;
    let max_component_mb = args
        .max_component_mb
        .or(file.limits.max_component_mb)
        .unwrap_or(mayfly_platform::config::DEFAULT_MAX_COMPONENT_MB);
    node.max_component_bytes = usize::try_from(max_component_mb << 20)
        .context("--max-component-mb does not fit this machine's address space")?;
    node.prices = file.prices;
    let connections = args
        .connections
        .limits(&file.connections, raise_open_files())?;
    let config = ServeConfig {
        node,
        gateway_addr: args.listen,
        admin_addr: args.admin_listen,
        shutdown_grace: args.shutdown_grace,
        admin_tls,
        connections,
        metrics_addr: args.metrics_addr,
    };
    // Listen for SIGTERM before telling anyone the node is up: a signal
    // that arrives between the "listening" lines and the handler would
    // otherwise kill the process unclean (seen in a test under CPU load).
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    // Joined first: an unreachable fleet is the error a user needs to see,
    // not a half-started node.
    let fleet = match fleet {
        Some(options) => {
            let fleet = Fleet::connect(&options).await?;
            tracing::info!(
                nats = fleet.urls(),
                server = %fleet.server_version(),
                node = fleet.node_name(),
                "joined the fleet"
            );
            Some(fleet)
        }
        None => None,
    };
    let data_dir = args.data_dir.clone();
    let mut running = RunningNode::start(config, async move {
        match fleet {
            None => Stores::sqlite(&data_dir),
            Some(fleet) => mayfly_nats::open_stores(&fleet, &data_dir).await,
        }
    })
    .await?;

    let s3_url = match s3 {
        Some((listener, tls)) => {
            let config = mayfly_platform::s3::S3Config {
                data_dir: args.data_dir.clone(),
                max_object_bytes: args.s3.s3_max_object_mb << 20,
                upload_max_age: args.s3.s3_upload_max_age,
            };
            let scheme = if tls.is_some() { "https" } else { "http" };
            let addr = running.serve_s3(listener, &config, tls.as_ref()).await?;
            Some(format!("{scheme}://{addr}"))
        }
        None => None,
    };
    // Scripts and tests read these two lines to find the ports.
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "gateway listening on http://{}",
        running.gateway_addr
    )?;
    writeln!(stdout, "admin API listening on {}", running.admin_url())?;
    if let Some(metrics) = running.metrics_addr {
        writeln!(stdout, "metrics listening on http://{metrics}/metrics")?;
    }
    if let Some(url) = &s3_url {
        writeln!(stdout, "S3 endpoint listening on {url}")?;
    }
    stdout.flush()?;
    drop(stdout);
    crate::profiles::announce_node(
        &running.admin_url(),
        args.admin_listen.port(),
        &args.data_dir,
        admin_cert.as_deref(),
    );
    let status = running.platform.status();
    tracing::info!(
        data_dir = %args.data_dir.display(),
        functions = status.functions,
        compilations = status.compilations,
        artifact_cache_hits = status.artifact_cache_hits,
        "node ready"
    );

    wait_for_signal(terminate).await?;
    tracing::info!("shutting down: finishing in-flight requests");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Compiles in child processes of this very binary (`/proc/self/exe`,
/// which stays the running binary even if the file is replaced by an
/// upgrade), each bounded by the `--compile-*` flags.
fn compiler(args: &ServeArgs, node: &NodeConfig) -> anyhow::Result<Compiler> {
    let program = if std::path::Path::new("/proc/self/exe").exists() {
        PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().context("cannot find the mayfly binary for compile workers")?
    };
    let limits = CompileLimits {
        concurrency: args.compile_concurrency as usize,
        timeout: args.compile_timeout,
        memory_bytes: args.compile_memory << 20,
    };
    Ok(Compiler::worker(
        program,
        vec![COMPILE_WORKER.into()],
        node.runtime.clone(),
        limits,
    ))
}

/// The first argument that makes `mayfly` a compile worker. It is not a
/// verb of [`crate::args::Cli`]: a hidden clap subcommand still showed in
/// bash completions and in "a similar subcommand exists" hints, and no
/// person should ever type it.
pub const COMPILE_WORKER: &str = "compile-worker";

/// `mayfly compile-worker`: compiles one component from stdin within
/// resource limits, as the node's own child process (not for people).
#[derive(Debug, clap::Parser)]
#[command(name = "mayfly compile-worker")]
pub struct CompileWorkerCli {
    #[command(flatten)]
    args: CompileWorkerArgs,
}

impl CompileWorkerCli {
    /// The worker's flags when the process was started as a compile worker
    /// (`mayfly compile-worker --cpu-seconds …`); `None` otherwise.
    pub fn from_args() -> Option<CompileWorkerArgs> {
        use clap::Parser as _;
        let mut args = std::env::args_os().skip(1);
        if args.next()? != COMPILE_WORKER {
            return None;
        }
        Some(Self::parse_from(std::env::args_os().skip(1)).args)
    }
}

/// `mayfly compile-worker`'s flags, as [`Compiler::worker`] passes them.
#[derive(Debug, clap::Args)]
pub struct CompileWorkerArgs {
    /// This process's RLIMIT_CPU.
    #[arg(long)]
    cpu_seconds: u64,
    /// The node's largest instance memory (part of the engine's settings).
    #[arg(long)]
    max_instance_memory: usize,
}

/// `mayfly compile-worker`: limits its CPU time, then compiles the
/// component on stdin and writes the answer to stdout. The node spawns it,
/// and kills it at its deadline, over its memory budget, or when the
/// deploy is abandoned.
pub fn compile_worker(args: &CompileWorkerArgs) -> anyhow::Result<()> {
    mayfly_runtime::run_worker(
        args.max_instance_memory,
        || limit_compile_worker(args),
        std::io::stdin().lock(),
        std::io::BufWriter::new(std::io::stdout().lock()),
    )
}

/// Sets the compile worker's CPU time limit: a backstop, as the node kills
/// it at its deadline (and when its resident memory passes the budget,
/// which the node watches: see `mayfly_runtime::Compiler`).
fn limit_compile_worker(args: &CompileWorkerArgs) -> anyhow::Result<()> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    // SIGXCPU at the soft limit, SIGKILL a second later.
    setrlimit(
        Resource::Cpu,
        Rlimit {
            current: Some(args.cpu_seconds),
            maximum: Some(args.cpu_seconds.saturating_add(1)),
        },
    )
    .context("cannot limit the compile worker's CPU time")?;
    Ok(())
}

/// The node's scaling settings: flags first, then the config file's
/// `[scaling]` table, then the defaults.
fn scaling_config(args: &ServeArgs, file: &ScalingFile) -> anyhow::Result<ScalingConfig> {
    let keep_alive = args
        .keep_alive
        .as_deref()
        .or(file.keep_alive.as_deref())
        .unwrap_or("hybrid");
    let policy = mayfly_scaling::parse_policy(keep_alive)
        .with_context(|| format!("keep-alive policy `{keep_alive}`"))?;
    let mut scaling = ScalingConfig::new(args.max_instances).with_keep_alive(Arc::from(policy));
    if let Some(max) = args.max_concurrency.or(file.max_concurrency) {
        if max > args.max_instances {
            anyhow::bail!(
                "max concurrency {max} is over --max-instances {}: every running invocation needs an instance slot",
                args.max_instances
            );
        }
        scaling.max_concurrency = max;
    }
    if let Some(percent) = file.function_share_percent {
        scaling.function_share_percent = percent;
    }
    if let Some(mb) = args.memory_budget.or(file.memory_budget_mb) {
        scaling.memory_budget_bytes = mb.saturating_mul(1 << 20);
    }
    Ok(scaling)
}

/// The node's own logs go to stderr, filtered by `RUST_LOG` or else
/// `default_filter` (`mayfly serve`: info; `mayfly dev`: warn), as text
/// or as JSON lines.
pub(crate) fn init_tracing(default_filter: &str, format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
}

/// Whether log lines may carry ANSI colour codes: only on a terminal
/// (escape codes garble a log file or a pipe to a collector), and not when
/// `NO_COLOR` is set to anything (<https://no-color.org>). tracing-subscriber
/// checks neither once colours are asked for, so both are decided here.
fn colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Waits for SIGTERM (`terminate`, subscribed before the node starts) or Ctrl-C.
pub(crate) async fn wait_for_signal(
    mut terminate: tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    tokio::select! {
        _ = terminate.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("cannot listen for Ctrl-C")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use clap::Parser as _;

    use super::ServeArgs;

    /// `mayfly serve <flags>` parsed as the CLI parses them (the flags are
    /// all `ServeArgs`'s; the tests need not know the other verbs).
    fn serve_args(flags: &[&str]) -> Result<ServeArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServeArgs,
        }
        Serve::try_parse_from(["mayfly serve"].iter().chain(flags)).map(|serve| serve.args)
    }

    /// The admin TLS decision for `mayfly serve <flags>`.
    fn admin_tls(flags: &[&str]) -> anyhow::Result<Option<super::TlsFiles>> {
        let args = serve_args(flags).unwrap();
        args.tls.admin_tls(args.admin_listen)
    }

    #[test]
    fn plain_http_off_loopback_needs_insecure() {
        for loopback in [
            "127.0.0.1:8081",
            "127.3.2.1:0",
            "[::1]:8081",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(admin_tls(&["--admin-listen", loopback]).unwrap().is_none());
        }
        let error = admin_tls(&["--admin-listen", "0.0.0.0:8081"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("would listen on 0.0.0.0:8081 without TLS")
                && error.contains("--insecure"),
            "{error}"
        );
        assert!(admin_tls(&["--admin-listen", "[::]:8081"]).is_err());
        let insecure = admin_tls(&["--admin-listen", "10.0.0.1:8081", "--insecure"]);
        assert!(insecure.unwrap().is_none());
        let tls = [
            "--admin-listen",
            "0.0.0.0:1",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ];
        let files = admin_tls(&tls).unwrap().unwrap();
        assert_eq!(files.cert.to_str(), Some("c.pem"));
        assert_eq!(files.key.to_str(), Some("k.pem"));
    }

    #[test]
    fn connection_flags_override_the_file_which_overrides_the_defaults() {
        let args = serve_args(&["--header-timeout", "1s"]).unwrap();
        let file = super::ConnectionsFile {
            header_timeout: Some("3s".into()),
            idle_timeout: Some("5s".into()),
            admin_max_connections: Some(7),
            ..Default::default()
        };
        let limits = args.connections.limits(&file, 1 << 20).unwrap();
        assert_eq!(limits.gateway.header_timeout, Duration::from_secs(1));
        assert_eq!(limits.admin.idle_timeout, Duration::from_secs(5));
        assert_eq!(limits.gateway.body_timeout, Duration::from_secs(60));
        assert_eq!(limits.gateway.max_connections, 10_000);
        assert_eq!(limits.admin.max_connections, 7);
        assert!(serve_args(&["--idle-timeout", "0s"]).is_err());
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use super::colour;
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())), "an empty NO_COLOR is unset");
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn the_log_format_is_text_or_json() {
        use super::LogFormat;
        let json = serve_args(&["--log-format", "json"]).unwrap();
        assert_eq!(json.log_format, Some(LogFormat::Json));
        let error = serve_args(&["--log-format", "xml"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("text") && error.contains("json"), "{error}");
    }

    #[test]
    fn tls_flags_come_in_pairs() {
        assert!(serve_args(&["--tls-cert", "c.pem"]).is_err());
        assert!(serve_args(&["--tls-key", "k.pem"]).is_err());
        let both = ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--insecure"];
        assert!(serve_args(&both).is_err());
    }
}
