//! Mayfly's node: the HTTP gateway, the admin API, the catalog of deployed
//! functions and the deploy pipeline, wired over the runtime
//! (`mayfly-runtime`) and state (`mayfly-store`) layers.
//!
//! A request enters [`gateway`], is matched against the [`catalog::Catalog`]
//! (an immutable snapshot swapped on every deploy, read without locks) and
//! runs in a fresh instance through [`Invoker::invoke`].

pub mod admin;
pub mod admission;
mod artifacts;
pub mod auth;
mod autoscale;
mod capabilities;
pub mod catalog;
mod clock;
pub mod config;
pub mod connections;
mod deployments;
pub mod error;
pub mod event_metrics;
pub mod events;
mod feeds;
pub mod forward;
pub mod gateway;
pub mod health;
pub mod invoker;
pub mod jobs;
pub mod ledger;
pub mod logs;
mod membership;
pub mod metering;
pub mod models;
pub mod pipelines;
mod platform;
mod preread;
pub mod rollout;
pub mod routes;
pub mod s3;
pub mod schedule;
pub mod secrets;
pub mod series;
mod status;
pub mod tiers;
pub mod tls;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use mayfly_store::{StoreError, Stores};
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::{
    DEFAULT_FUNCTION_SHARE_PERCENT, DEFAULT_KEEP_VERSIONS, NodeConfig, ScalingConfig,
    physical_memory,
};
pub use deployments::deploy::DeployOutcome;
pub use error::PlatformError;
pub use invoker::{
    CLIENT_REQUEST_ID_HEADER, Caller, Invoker, REQUEST_ID_HEADER, VERSION_HEADER, text_response,
};
pub use platform::Platform;
pub use status::{FunctionScalingStatus, Status};

/// Where a node listens and how it stops.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// State and limits of the node.
    pub node: NodeConfig,
    /// Address of the public gateway.
    pub gateway_addr: SocketAddr,
    /// Address of the admin API.
    pub admin_addr: SocketAddr,
    /// How long in-flight requests may run on after shutdown begins.
    pub shutdown_grace: Duration,
    /// Serve the admin API over HTTPS with this identity (plain HTTP if `None`).
    pub admin_tls: Option<tls::TlsFiles>,
    /// Timeouts and connection caps of the gateway and the admin API.
    pub connections: connections::ListenerLimits,
    /// Serve `/metrics` (and the health checks) without a token on this
    /// address too, for Prometheus; `None`: only the admin API's
    /// `/metrics`, which needs a read token.
    pub metrics_addr: Option<SocketAddr>,
}

/// A node serving its gateway and admin API.
pub struct RunningNode {
    /// The node's core.
    pub platform: Arc<Platform>,
    /// Where the gateway listens (the real port when 0 was asked).
    pub gateway_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// Whether the admin API speaks HTTPS.
    pub admin_tls: bool,
    /// Where the metrics listener listens, if the node has one.
    pub metrics_addr: Option<SocketAddr>,
    metrics: Option<JoinHandle<()>>,
    shutdown: tokio_util::sync::CancellationToken,
    shutdown_grace: Duration,
    gateway: JoinHandle<()>,
    admin: JoinHandle<()>,
    /// The S3 endpoint, when [`RunningNode::serve_s3`] started one.
    s3: Option<JoinHandle<()>>,
}

impl RunningNode {
    /// Binds the listeners, opens the node's state with `open_stores`
    /// (e.g. `async { Stores::sqlite(&data_dir) }`; awaited once the
    /// listeners are bound, so a bad address opens nothing; a future so a
    /// network back-end can connect) and starts serving.
    pub async fn start(
        config: ServeConfig,
        open_stores: impl Future<Output = Result<Stores, StoreError>> + Send,
    ) -> anyhow::Result<Self> {
        // Bad certificate files fail before anything is bound or opened.
        let admin_tls = config
            .admin_tls
            .as_ref()
            .map(tls::TlsFiles::server_config)
            .transpose()?;
        let gateway_listener = TcpListener::bind(config.gateway_addr)
            .await
            .with_context(|| format!("cannot listen for the gateway on {}", config.gateway_addr))?;
        let admin_listener = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot listen for the admin API on {}", config.admin_addr))?;
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen for metrics on {addr} (--metrics-addr)")
            })?),
            None => None,
        };
        let max_upload = config.node.max_component_bytes;
        let platform = Platform::open_with(config.node, open_stores).await?;
        let shutdown = tokio_util::sync::CancellationToken::new();

        let gateway_addr = gateway_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        // Where a function calls back with its credential: this machine's
        // address when the API listens on every interface.
        let mut callback = admin_addr;
        if callback.ip().is_unspecified() {
            callback.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let scheme = if admin_tls.is_some() { "https" } else { "http" };
        platform.set_api_url(format!("{scheme}://{callback}"));
        platform.set_gateway_addr(gateway_addr);
        let limits = config.connections;
        let gateway = tokio::spawn(gateway::serve(
            platform.invoker().clone(),
            platform.health().clone(),
            gateway_listener,
            limits.gateway,
            shutdown.clone(),
            config.shutdown_grace,
        ));
        // The admin API is served like the gateway (not by `axum::serve`,
        // which has no header timeout or cap), on its own listener with its
        // own cap so that a flooded gateway leaves it reachable. It waits
        // for its connections without a grace of its own: `shutdown` below
        // gives it a second (`logs --follow` streams never end by themselves).
        // Prometheus scrapes without a token here: the listener serves only
        // the metrics and the health checks, and has the admin API's cap.
        let metrics_addr = metrics_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let metrics = metrics_listener.map(|listener| {
            let service = TowerToHyperService::new(admin::metrics_router(platform.clone()));
            tokio::spawn(connections::serve(
                "metrics",
                listener,
                limits.admin,
                connections::Plain,
                service,
                shutdown.clone(),
                None,
            ))
        });
        let service = TowerToHyperService::new(admin::router(platform.clone(), max_upload));
        let admin_shutdown = shutdown.clone();
        let admin = tokio::spawn(async move {
            let (name, listener, limits) = ("admin API", admin_listener, limits.admin);
            match admin_tls {
                Some(tls) => {
                    let tls = tls::Tls::new(tls);
                    connections::serve(name, listener, limits, tls, service, admin_shutdown, None)
                        .await;
                }
                None => {
                    let plain = connections::Plain;
                    connections::serve(
                        name,
                        listener,
                        limits,
                        plain,
                        service,
                        admin_shutdown,
                        None,
                    )
                    .await;
                }
            }
        });
        Ok(Self {
            platform,
            gateway_addr,
            admin_addr,
            admin_tls: config.admin_tls.is_some(),
            metrics_addr,
            metrics,
            shutdown,
            shutdown_grace: config.shutdown_grace,
            gateway,
            admin,
            s3: None,
        })
    }

    /// Serves the S3-compatible endpoint on `listener` (bound by the
    /// caller before [`RunningNode::start`], so a bad address opens
    /// nothing), over TLS with `tls` when given; returns its address.
    pub async fn serve_s3(
        &mut self,
        listener: TcpListener,
        config: &s3::S3Config,
        tls: Option<&tls::TlsFiles>,
    ) -> anyhow::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let tls = tls.map(tls::TlsFiles::server_config).transpose()?;
        // Where functions presign for: this machine's address when the
        // endpoint listens on every interface.
        let mut reachable = addr;
        if reachable.ip().is_unspecified() {
            reachable.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        self.platform.set_s3_url(format!("{scheme}://{reachable}"));
        let served = s3::serve(
            self.platform.clone(),
            &config.data_dir,
            listener,
            tls,
            config.max_object_bytes,
            config.upload_max_age,
            self.shutdown.clone(),
        )?;
        self.s3 = Some(tokio::spawn(served));
        Ok(addr)
    }

    /// The admin API's base URL, `https://` when it serves TLS.
    pub fn admin_url(&self) -> String {
        let scheme = if self.admin_tls { "https" } else { "http" };
        format!("{scheme}://{}", self.admin_addr)
    }

    /// Stops accepting, lets in-flight invocations finish within the grace
    /// period, ends those still running, and returns once every usage
    /// record and log line is durable.
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.shutdown_grace;
        self.platform.health().set_closing();
        self.shutdown.cancel();
        if let Some(metrics) = self.metrics {
            let _ = tokio::time::timeout(Duration::from_secs(1), metrics).await;
        }
        let _ = self.gateway.await;
        // The admin API may hold `logs --follow` streams open forever.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.admin).await;
        if let Some(s3) = self.s3 {
            let _ = tokio::time::timeout(Duration::from_secs(1), s3).await;
        }
        self.platform.close(deadline).await;
    }
}
