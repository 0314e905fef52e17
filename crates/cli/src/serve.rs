//! `mayfly serve`: run a node until SIGTERM or Ctrl-C.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use mayfly_platform::config::{NodeFile, ScalingFile};
use std::sync::Arc;

use mayfly_platform::tls::TlsFiles;
use mayfly_platform::{NodeConfig, RunningNode, ScalingConfig, ServeConfig};
use tracing_subscriber::EnvFilter;

use crate::ServeArgs;

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

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing("info");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mayfly-worker")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let admin_tls = args.tls.admin_tls(args.admin_listen)?;
    let mut node = NodeConfig::new(&args.data_dir);
    node.credential_ttl = args.credential_ttl;
    node.keep_versions = args.keep_versions;
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
        admin_tls,
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
    writeln!(stdout, "admin API listening on {}", running.admin_url())?;
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
    if let Some(percent) = file.function_share_percent {
        scaling.function_share_percent = percent;
    }
    if let Some(mb) = args.memory_budget.or(file.memory_budget_mb) {
        scaling.memory_budget_bytes = mb.saturating_mul(1 << 20);
    }
    Ok(scaling)
}

/// The node's own logs go to stderr, filtered by `RUST_LOG` or else
/// `default_filter` (`mayfly serve`: info; `mayfly dev`: warn).
pub(crate) fn init_tracing(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
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

    use clap::Parser as _;

    use crate::{Cli, Command};

    /// The admin TLS decision for `mayfly serve <flags>`.
    fn admin_tls(flags: &[&str]) -> anyhow::Result<Option<super::TlsFiles>> {
        let cli = Cli::try_parse_from(["mayfly", "serve"].iter().chain(flags)).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
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
    fn tls_flags_come_in_pairs() {
        assert!(Cli::try_parse_from(["mayfly", "serve", "--tls-cert", "c.pem"]).is_err());
        assert!(Cli::try_parse_from(["mayfly", "serve", "--tls-key", "k.pem"]).is_err());
        let both = ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--insecure"];
        assert!(Cli::try_parse_from(["mayfly", "serve"].iter().chain(&both)).is_err());
    }
}
