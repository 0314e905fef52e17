//! The node: [`Platform`] opens the node's state, wires its parts
//! together and starts their background tasks, and is what the admin API
//! and the CLI hold. The parts do the work: the [`Invoker`] runs requests,
//! `Deployments` changes what is served, the [`EventHub`] holds the
//! event stores, and the autoscaler, the verdict task and the event
//! workers run on handles of their own, never on the node itself.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use mayfly_runtime::Runtime;
use mayfly_store::{
    FeedLine, FleetLink, FleetLinkStatus, LogFeed, LogStore, Membership, NodeInfo, StoredUsage,
    Stores, UsageQuery, UsageRow, UsageStore,
};
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::artifacts::Artifacts;
use crate::auth::{Auth, AuthError, Credential};
use crate::autoscale::Autoscaler;
use crate::capabilities::{NodeKeyValue, NodeServices};
use crate::catalog::Catalog;
use crate::config::{NodeConfig, PriceList};
use crate::deployments::{DeploymentParts, Deployments};
use crate::error::PlatformError;
use crate::events::EventHub;
use crate::events::workers::EventWorkers;
use crate::invoker::Invoker;
use crate::jobs::Jobs;
use crate::ledger::Ledger;
use crate::logs::LogHub;
use crate::membership::Heartbeat;
use crate::metering::Metrics;
use crate::pipelines::Pipelines;
use crate::rollout::Rollouts;
use crate::secrets::Secrets;
use crate::status::{Status, resident_memory, scaling_status};

/// The node: its state, runtime, catalog and background tasks.
pub struct Platform {
    runtime: Arc<Runtime>,
    /// Runs requests; also held by the gateway and the event workers.
    invoker: Arc<Invoker>,
    /// Deploys, aliases and rollouts; also held by the verdict task.
    deployments: Arc<Deployments>,
    events: Arc<EventHub>,
    workers: Arc<EventWorkers>,
    /// Batch jobs over the object store.
    jobs: Arc<Jobs>,
    /// Pipelines: chains of jobs, started by hand, on a schedule or by
    /// arriving objects.
    pipelines: Arc<Pipelines>,
    admission: Arc<Admission>,
    log_store: Arc<dyn LogStore>,
    logs: Arc<LogHub>,
    /// Every node's new log lines, for followers (none on a node alone).
    log_feed: Arc<dyn LogFeed>,
    /// The link to the fleet, for the status (none on a node alone).
    fleet: Option<Arc<dyn FleetLink>>,
    usage: Arc<dyn UsageStore>,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    /// The readiness check (also held by the gateway).
    health: Arc<crate::health::Health>,
    /// Secrets, sealed under the node's master key.
    secrets: Arc<Secrets>,
    /// Models for wasi:nn.
    models: Arc<crate::models::Models>,
    /// Admin API tokens, function credentials and the audit log.
    auth: Arc<Auth>,
    /// The admin API's URL, once it listens: functions read it through
    /// wasi:config to call back with their credential.
    api_url: Arc<OnceLock<String>>,
    /// The S3 endpoint's URL, once it listens: functions read it through
    /// wasi:config to presign URLs with their S3 key.
    s3_url: Arc<OnceLock<String>>,
    /// The gateway's address, once it listens: each heartbeat carries it.
    gateway_addr: Arc<OnceLock<String>>,
    /// The fleet's membership list (this node alone, embedded).
    members: Arc<dyn Membership>,
    config: NodeConfig,
    started: Instant,
    /// Ends the autoscaler and the verdict task when the node is dropped.
    background: CancellationToken,
    /// The stores, held for the node's life: for the embedded back-end
    /// this holds the data directory's lock, so a second node on the same
    /// directory refuses to start.
    _stores: Stores,
}

impl Platform {
    /// Starts the node over `stores` (e.g. `Stores::sqlite(&config.data_dir)`)
    /// and builds the catalog. Artifacts missing from the blob store (new
    /// data directory layout, changed engine) are compiled here, so
    /// requests never compile. The node's own files (master key, admin
    /// token) are kept in `config.data_dir`.
    pub async fn open(config: NodeConfig, stores: Stores) -> anyhow::Result<Arc<Self>> {
        Self::open_with(config, async { Ok(stores) }).await
    }

    /// [`Platform::open`] with the stores still to open: the engine is
    /// built on a blocking thread meanwhile (its pool's guard pages and the
    /// linker take ~4 ms of a node's start, opening the databases as long).
    pub async fn open_with(
        config: NodeConfig,
        open_stores: impl Future<Output = Result<Stores, mayfly_store::StoreError>>,
    ) -> anyhow::Result<Arc<Self>> {
        let runtime_config = config.runtime.clone();
        let runtime = tokio::task::spawn_blocking(move || Runtime::new(&runtime_config));
        let stores = open_stores.await?;
        let runtime = runtime
            .await
            .context("the engine's start-up thread failed")??;
        let data_dir = config.data_dir.clone();
        let store = stores.registry.clone();
        // Subscribed before anything is read, so no change falls between.
        let registry_changes = stores.registry.watch();
        let trigger_changes = stores.triggers.watch();
        let token_changes = stores.auth.watch();
        let blobs = stores.blobs.clone();
        let usage = stores.usage.clone();
        // The writer threads await their stores on this runtime.
        let node_runtime = tokio::runtime::Handle::current();
        let logs = LogHub::start(
            stores.logs.clone(),
            stores.log_feed.clone(),
            node_runtime.clone(),
        )
        .context("cannot start the log writer")?;
        let mut metrics = if stores.fleet.is_some() {
            Metrics::for_fleet()
        } else {
            Metrics::new()
        };
        metrics.function_histograms = config.function_histograms.clone();
        let metrics = Arc::new(metrics);
        let ledger = Arc::new(
            Ledger::start(usage.clone(), metrics.ledger.clone(), node_runtime)
                .context("cannot start the ledger writer")?,
        );

        let events = Arc::new(EventHub::open(&stores, metrics.events.clone()).await?);
        let secrets = Arc::new(Secrets::open(stores.secrets.clone(), &data_dir).await?);
        let models = crate::models::Models::open(
            &data_dir,
            blobs.clone(),
            mayfly_runtime::NnLimits::default(),
        )
        .context("cannot open the model store")?;
        let signing = secrets.clone();
        let auth = Arc::new(
            Auth::open(
                stores.auth.clone(),
                &data_dir,
                Box::new(move || signing.signing_key()),
                config.credential_ttl,
            )
            .await?,
        );
        // Every store is open, its files created: make them the node
        // user's alone (a directory of an older node was 0755/0644).
        stores.restrict_permissions().with_context(|| {
            format!("cannot restrict the permissions of {}", data_dir.display())
        })?;
        let (rollouts, verdicts) = Rollouts::new();
        let catalog = Arc::new(ArcSwap::from_pointee(Catalog::default()));
        let admission = Admission::new(
            config.scaling.max_concurrency,
            config.scaling.memory_budget_bytes,
        );
        let artifacts = Arc::new(Artifacts::new(
            runtime.clone(),
            blobs.clone(),
            config.compiler.clone(),
            metrics.node.clone(),
        ));
        let invoker = Arc::new(Invoker::new(
            catalog.clone(),
            admission.clone(),
            artifacts.clone(),
            logs.clone(),
            metrics.node.requests_too_large.clone(),
            stores.forward.clone(),
        ));
        let workers = Arc::new(EventWorkers::new(events.clone(), invoker.clone()));
        let background = CancellationToken::new();
        let jobs = Arc::new(Jobs::new(
            stores.jobs.clone(),
            invoker.clone(),
            events.clone(),
            &config.node_name,
            background.clone(),
        ));
        let pipelines = Arc::new(Pipelines::new(
            stores.pipelines.clone(),
            jobs.clone(),
            events.clone(),
            Arc::new(crate::clock::SystemClock),
            background.clone(),
        ));
        let alone = stores.fleet.is_none();
        let api_url = Arc::new(OnceLock::new());
        let s3_url = Arc::new(OnceLock::new());
        let services = Arc::new(NodeServices {
            keyvalue: Arc::new(NodeKeyValue::new(events.clone())),
            secrets: secrets.clone(),
            auth: auth.clone(),
            api_url: api_url.clone(),
            s3_url: s3_url.clone(),
            models: models.clone(),
        });
        let started = Instant::now();
        let deployments = Arc::new(Deployments::new(DeploymentParts {
            registry: store.clone(),
            blobs,
            artifacts: artifacts.clone(),
            catalog: catalog.clone(),
            admission: admission.clone(),
            rollouts,
            events: events.clone(),
            workers: workers.clone(),
            metrics: metrics.clone(),
            ledger: ledger.clone(),
            logs: logs.clone(),
            services,
            config: config.clone(),
            started,
            forward: stores.forward.clone(),
            forward_handler: invoker.clone(),
            fleet: stores.fleet.clone(),
            members: stores.members.clone(),
        }));
        let autoscaler = Arc::new(Autoscaler::new(
            catalog,
            artifacts,
            admission.clone(),
            models.nn().clone(),
            metrics.node.clone(),
        ));
        // Built before anything starts, so that a failure below drops it
        // and so stops whatever had started.
        let health = Arc::new(crate::health::Health::new(
            store.clone(),
            ledger.clone(),
            logs.clone(),
        ));
        let platform = Arc::new(Self {
            health,
            runtime,
            invoker,
            deployments,
            events,
            workers,
            jobs,
            pipelines,
            admission,
            log_store: stores.logs.clone(),
            logs,
            log_feed: stores.log_feed.clone(),
            fleet: stores.fleet.clone(),
            usage,
            ledger,
            metrics,
            secrets,
            models,
            auth,
            api_url,
            s3_url,
            gateway_addr: Arc::new(OnceLock::new()),
            members: stores.members.clone(),
            config,
            started,
            background,
            _stores: stores,
        });
        platform.deployments.restore_all().await?;
        platform
            .deployments
            .follow(registry_changes, platform.background.clone());
        platform
            .deployments
            .follow_triggers(trigger_changes, platform.background.clone());
        platform
            .auth
            .follow(token_changes, platform.background.clone());
        autoscaler.spawn(platform.config.scaling.tick, platform.background.clone());
        platform
            .metrics
            .series
            .clone()
            .spawn_roller(platform.background.clone());
        platform
            .deployments
            .clone()
            .judge(verdicts, platform.background.clone());
        Heartbeat {
            members: platform.members.clone(),
            invoker: platform.invoker.clone(),
            runtime: platform.runtime.clone(),
            admission: platform.admission.clone(),
            name: platform.config.node_name.clone(),
            labels: platform.config.labels.clone(),
            started_ms: crate::clock::now_ms(),
            gateway: platform.gateway_addr.clone(),
        }
        .spawn(platform.background.clone());
        platform.workers.start().await?;
        platform.jobs.start(alone).await?;
        platform.pipelines.start().await?;
        Ok(platform)
    }

    /// The request path: what the gateway, the admin API's `invoke` and
    /// the event workers run functions through.
    pub fn invoker(&self) -> &Arc<Invoker> {
        &self.invoker
    }

    /// The dashboard's time series.
    pub fn series(&self) -> &Arc<crate::series::SeriesStore> {
        &self.metrics.series
    }

    /// The node's health checks.
    pub fn health(&self) -> &Arc<crate::health::Health> {
        &self.health
    }

    /// The current catalog.
    pub fn catalog(&self) -> arc_swap::Guard<Arc<Catalog>> {
        self.invoker.catalog()
    }

    /// Deploys, deletes, aliases, rollouts and triggers: the one writer of
    /// the catalog, for the admin API.
    pub(crate) fn deployments(&self) -> &Deployments {
        &self.deployments
    }

    /// The node's counters.
    pub fn status(&self) -> Status {
        let catalog = self.invoker.catalog();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            functions: catalog.by_name.len(),
            compilations: self.metrics.node.compilations.get(),
            artifact_cache_hits: self.metrics.node.artifact_cache_hits.get(),
            invocations: self.metrics.node.invocations.get(),
            failed_invocations: self.metrics.node.failed_invocations.get(),
            requests_too_large: self.metrics.node.requests_too_large.get(),
            instances_in_flight: self.runtime.in_flight(),
            instances_kept: self.runtime.kept_instances(),
            throttled: self.metrics.node.throttled.get(),
            keep_alive_policy: self.config.scaling.keep_alive.name(),
            memory_in_use_mb: self.admission.memory_in_use() >> 20,
            memory_resident_mb: resident_memory(&catalog) >> 20,
            memory_budget_mb: self.admission.memory_budget() >> 20,
            log_lines_dropped: self.logs.dropped(),
            ledger_records: self.metrics.ledger.committed.get(),
            ledger_pending: self.ledger.pending(),
            data_dir: self.config.data_dir.display().to_string(),
            max_component_bytes: self.config.max_component_bytes,
            scaling: scaling_status(&catalog, &self.admission),
            fleet: None,
        }
    }

    /// The link to the fleet now (connection, usage backlog); `None` on a
    /// node on its own. `status().fleet` is left for the caller to fill
    /// with this, as it awaits the back-end.
    pub async fn fleet_status(&self) -> Result<Option<FleetLinkStatus>, PlatformError> {
        match &self.fleet {
            Some(link) => Ok(Some(link.status().await?)),
            None => Ok(None),
        }
    }

    /// This node's name when it is part of a fleet (requests may be
    /// forwarded to and from it); `None` on its own.
    pub fn fleet_node(&self) -> Option<&str> {
        self.invoker.forward.node()
    }

    /// This node's name in the fleet.
    pub fn node_name(&self) -> &str {
        &self.config.node_name
    }

    /// The durable log store, for reading logs back.
    pub fn log_store(&self) -> Arc<dyn LogStore> {
        self.log_store.clone()
    }

    /// The log hub, to follow new lines.
    pub fn log_hub(&self) -> &LogHub {
        &self.logs
    }

    /// Every node's new log lines (a node on its own has no feed: its
    /// followers read [`Platform::log_store`]).
    pub fn log_feed(&self) -> &Arc<dyn LogFeed> {
        &self.log_feed
    }

    /// The node's secrets.
    pub fn secrets(&self) -> &Arc<Secrets> {
        &self.secrets
    }

    /// Models for wasi:nn.
    pub fn models(&self) -> &Arc<crate::models::Models> {
        &self.models
    }

    /// Functions (and versions) of this node granted model `name`: a model
    /// in use cannot be deleted.
    pub fn model_users(&self, name: &str) -> Vec<String> {
        let catalog = self.catalog();
        let mut users: Vec<String> = catalog
            .by_name
            .values()
            .flat_map(|served| served.versions())
            .filter(|deployed| deployed.grants.models.iter().any(|m| m == name))
            .map(|deployed| format!("{} v{}", deployed.name, deployed.version))
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// Tokens, credentials and the audit log.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// What a function's credential (or its S3 key) reaches now rather
    /// than when it was minted: its version's grants while that version is
    /// in service (a canary's may differ from live's), else live's; and
    /// nothing of a function of the same name created after it (refused).
    pub fn credential_now(&self, credential: &Credential) -> Result<Credential, AuthError> {
        let catalog = self.catalog();
        let live = catalog.by_name.get(&credential.function).map(|served| {
            let deployed = served
                .version(credential.version)
                .unwrap_or(&served.live.deployed);
            (deployed.generation, &deployed.grants)
        });
        crate::auth::narrow_to_live(credential, live)
    }

    /// Records where the admin API listens (once; later calls are ignored).
    pub fn set_api_url(&self, url: String) {
        let _ = self.api_url.set(url);
    }

    /// Records where the S3 endpoint listens (once; later calls are
    /// ignored).
    pub fn set_s3_url(&self, url: String) {
        let _ = self.s3_url.set(url);
    }

    /// Records where the gateway listens, for the heartbeats.
    pub fn set_gateway_addr(&self, addr: std::net::SocketAddr) {
        let _ = self.gateway_addr.set(addr.to_string());
    }

    /// The nodes of the fleet (this node alone when it runs on its own),
    /// as their last heartbeats describe them.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, PlatformError> {
        Ok(self.members.members().await?)
    }

    /// The fleet's edge nodes by leaf site (none in a fleet without leaf
    /// sites, or on a node on its own).
    pub async fn sites(&self) -> Result<Vec<mayfly_store::SiteNode>, PlatformError> {
        match &self.fleet {
            Some(link) => Ok(link.sites().await?),
            None => Ok(Vec::new()),
        }
    }

    /// The admin API's URL, if the node serves one.
    pub fn api_url(&self) -> Option<&str> {
        self.api_url.get().map(String::as_str)
    }

    /// The node's batch jobs.
    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// The node's pipelines.
    pub fn pipelines(&self) -> &Arc<Pipelines> {
        &self.pipelines
    }

    /// The node's event stores, triggers and dead-letter queues.
    pub fn events(&self) -> &EventHub {
        &self.events
    }

    /// Counts the event queues for the depth gauges.
    pub async fn refresh_event_depths(&self) {
        match self.events.depths().await {
            Ok(depths) => self.metrics.events.set_depths(&depths),
            Err(error) => tracing::warn!("cannot count event queues: {error}"),
        }
    }

    /// Sets the fleet link's gauges from the link's state now (a node in a
    /// fleet only).
    pub async fn refresh_fleet_link(&self) {
        let (Some(link), Some(gauges)) = (&self.fleet, &self.metrics.fleet) else {
            return;
        };
        match link.status().await {
            Ok(status) => {
                gauges.connected.set(i64::from(status.connected));
                gauges
                    .usage_backlog
                    .set(i64::try_from(status.usage_backlog).unwrap_or(i64::MAX));
                gauges
                    .log_lines_unpublished
                    .set(status.log_lines_unpublished);
            }
            Err(error) => tracing::warn!("cannot read the fleet link's state: {error}"),
        }
    }

    /// The last `limit` lines of `function` from every node of the fleet;
    /// `None` on a node alone, or when the fleet is out of reach (the
    /// caller then shows this node's own lines).
    pub async fn fleet_log_tail(&self, function: &str, limit: usize) -> Option<Vec<FeedLine>> {
        self.fleet.as_ref()?;
        let nodes = match self.members.members().await {
            Ok(members) => members.len().max(1),
            Err(error) => {
                tracing::warn!(
                    function,
                    "cannot list the fleet's nodes for a log tail: {error}"
                );
                return None;
            }
        };
        match self.log_feed.fleet_tail(function, limit, nodes).await {
            Ok(lines) => lines,
            Err(error) => {
                tracing::warn!(function, "{error}; showing this node's log lines only");
                None
            }
        }
    }

    /// The node's metrics in the OpenMetrics text format.
    pub fn metrics_text(&self) -> Result<String, PlatformError> {
        self.metrics.node.log_lines_dropped.set(self.logs.dropped());
        self.metrics
            .node
            .instances_in_flight
            .set(i64::try_from(self.runtime.in_flight()).unwrap_or(i64::MAX));
        self.metrics
            .encode()
            .map_err(|e| PlatformError::Internal(anyhow::anyhow!("cannot encode metrics: {e}")))
    }

    /// The price list of this node.
    pub fn prices(&self) -> &PriceList {
        &self.config.prices
    }

    /// Usage in a time window, grouped.
    pub async fn usage(&self, query: UsageQuery) -> Result<Vec<UsageRow>, PlatformError> {
        Ok(self.usage.usage_summary(&query).await?)
    }

    /// Usage records after `after_seq`, oldest first.
    pub async fn usage_records(
        &self,
        function: Option<String>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredUsage>, PlatformError> {
        Ok(self
            .usage
            .usage_records(function.as_deref(), after_seq, limit)
            .await?)
    }

    /// The last step of a shutdown, once the servers stopped accepting:
    /// lets running invocations finish until `deadline`, ends the rest
    /// (outcome `killed`), then makes every usage record and log line
    /// durable and stops the writers.
    pub async fn close(&self, deadline: tokio::time::Instant) {
        self.health.set_closing();
        // Event workers stop claiming at once; the deliveries still running
        // end below (or at the kill) and the workers record their results.
        self.events.stop();
        if tokio::time::timeout_at(deadline, self.runtime.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                "{} invocations still running after the grace period: ending them",
                self.runtime.in_flight()
            );
            self.runtime.kill_all().await;
        }
        self.workers
            .join(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
        let ledger = self.ledger.clone();
        let logs = self.logs.clone();
        // Closing waits for the writer threads' last commits: blocking, so
        // off the async workers.
        let closed = tokio::task::spawn_blocking(move || {
            ledger.close();
            logs.close();
        })
        .await;
        if let Err(error) = closed {
            tracing::error!("flushing the ledger and logs failed: {error}");
        }
        // Gone from the fleet's list at once rather than after its
        // heartbeat expires.
        if let Err(error) = self.members.leave(&self.config.node_name).await {
            tracing::warn!("cannot remove this node from the fleet's list: {error}");
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        // The background tasks hold handles of the node's parts, not the
        // node: tell them that it is gone.
        self.background.cancel();
        self.events.stop();
    }
}
