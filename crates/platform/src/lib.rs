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
pub mod invoker;
pub mod ledger;
pub mod logs;
mod membership;
pub mod metering;
pub mod models;
mod platform;
mod preread;
pub mod rollout;
pub mod routes;
pub mod schedule;
pub mod secrets;
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
    shutdown: tokio_util::sync::CancellationToken,
    shutdown_grace: Duration,
    gateway: JoinHandle<()>,
    admin: JoinHandle<()>,
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
        let max_upload = config.node.max_component_bytes;
        let platform = Platform::open(config.node, open_stores.await?).await?;
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
            shutdown,
            shutdown_grace: config.shutdown_grace,
            gateway,
            admin,
        })
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
        self.shutdown.cancel();
        let _ = self.gateway.await;
        // The admin API may hold `logs --follow` streams open forever.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.admin).await;
        self.platform.close(deadline).await;
    }
}
