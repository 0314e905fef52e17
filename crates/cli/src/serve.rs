//! `mayfly serve`: run a node until SIGTERM or Ctrl-C.

use std::io::Write;

use anyhow::Context as _;
use mayfly_platform::config::NodeFile;
use mayfly_platform::{NodeConfig, RunningNode, ServeConfig};
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
        Some(path) => Some(NodeFile::load(path)?),
        None if default_file.exists() => Some(NodeFile::load(&default_file)?),
        None => None,
    };
    if let Some(file) = file {
        node.prices = file.prices;
    }
    let config = ServeConfig {
        node,
        gateway_addr: args.listen,
        admin_addr: args.admin_listen,
        shutdown_grace: args.shutdown_grace,
    };
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

    wait_for_signal().await?;
    tracing::info!("shutting down: finishing in-flight requests");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        _ = terminate.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("cannot listen for Ctrl-C")?,
    }
    Ok(())
}
