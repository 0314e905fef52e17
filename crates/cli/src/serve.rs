//! `mayfly serve`: run a node until SIGTERM or Ctrl-C.

use std::io::Write;

use anyhow::Context as _;
use mayfly_platform::config::{NodeFile, ScalingFile};
use std::sync::Arc;

use mayfly_platform::{NodeConfig, RunningNode, ScalingConfig, ServeConfig};
use tracing_subscriber::EnvFilter;

use crate::ServeArgs;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mayfly-worker")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut node = NodeConfig::new(&args.data_dir);
    node.runtime.max_instances = args.max_instances;
    let default_file = args.data_dir.join("node.toml");
    let file = match &args.config {
        Some(path) => NodeFile::load(path)?,
        None if default_file.exists() => NodeFile::load(&default_file)?,
        None => NodeFile::default(),
    };
    node.scaling = scaling_config(&args, &file.scaling)?;
    node.prices = file.prices;
    let config = ServeConfig {
        node,
        gateway_addr: args.listen,
        admin_addr: args.admin_listen,
        shutdown_grace: args.shutdown_grace,
    };
    // Listen for SIGTERM before telling anyone the node is up: a signal
    // that arrives between the "listening" lines and the handler would
    // otherwise kill the process unclean (seen in a test under CPU load).
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let running = RunningNode::start(config).await?;

    // Scripts and tests read these two lines to find the ports.
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "gateway listening on http://{}",
        running.gateway_addr
    )?;
    writeln!(
        stdout,
        "admin API listening on http://{}",
        running.admin_addr
    )?;
    stdout.flush()?;
    drop(stdout);
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
    if let Some(mb) = args.memory_budget.or(file.memory_budget_mb) {
        scaling.memory_budget_bytes = mb.saturating_mul(1 << 20);
    }
    Ok(scaling)
}

async fn wait_for_signal(mut terminate: tokio::signal::unix::Signal) -> anyhow::Result<()> {
    tokio::select! {
        _ = terminate.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("cannot listen for Ctrl-C")?,
    }
    Ok(())
}
