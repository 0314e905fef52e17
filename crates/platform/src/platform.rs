//! The node's core: deploys, the catalog, and running a request through a
//! function. The gateway and the admin API are thin layers over this.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mayfly_runtime::{
    Function, HyperOutgoingBody, InvocationError, InvocationLimits, RequestLabels, Runtime,
};
use mayfly_store::{
    AliasRecord, BlobDir, BlobKind, BlobStore, CanaryRecord, Digest, EmbeddedLedger, EmbeddedStore,
    FunctionConfig, FunctionLimits, FunctionRecord, FunctionScaling, LIVE_ALIAS, LogStore,
    MoveCause, Registry, StoreError, StoredUsage, Trigger, TriggerSpec, UsageQuery, UsageRow,
    UsageStore, VersionRecord, WEIGHT_SCALE_BP,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, Permit, SlotLimits, Throttled};
use crate::catalog::{Artifact, Canary, Catalog, Deployed, Served, Target};
use crate::config::{NodeConfig, PriceList, ScalingConfig};
use crate::error::{PlatformError, blocking};
use crate::events::{EVENT_ERROR_EXCERPT, EventBody, EventHub, EventOutcome};
use crate::ledger::Ledger;
use crate::logs::LogHub;
use crate::metering::{FunctionMeter, Metrics};
use crate::routes::Route;
use crate::tiers::{Activity, Running, Tier, TierName, eviction_order};
use crate::validate::{
    parse_routes, valid_request_id, validate_alias, validate_limits, validate_name,
    validate_routes, validate_scaling,
};

/// Header carrying the invocation's request id back to the client: always
/// minted by the node (a UUIDv7 in hex), unique per invocation, the id of
/// its usage record and log lines, like Lambda's `x-amzn-RequestId`.
pub const REQUEST_ID_HEADER: &str = "x-mayfly-request-id";

/// Header of the client's own correlation id (1 to 64 of
/// `[A-Za-z0-9._-]`). A request may bring one (here, or in
/// [`REQUEST_ID_HEADER`] as older clients do); it is echoed back in this
/// header, kept in the usage record as `client_request_id`, and pins the
/// version of a split alias so a retry lands where the first try did. It is
/// never the invocation's identity: replays are separate invocations.
pub const CLIENT_REQUEST_ID_HEADER: &str = "x-mayfly-client-request-id";

/// Header telling the client which version served its request.
pub const VERSION_HEADER: &str = "x-mayfly-version";

/// A snapshot of the node's state for `mayfly status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Mayfly version.
    pub version: &'static str,
    /// Seconds since the node started.
    pub uptime_seconds: u64,
    /// Deployed functions.
    pub functions: usize,
    /// Components compiled by this process.
    pub compilations: u64,
    /// Times a compiled artifact was found on disk instead of compiling.
    pub artifact_cache_hits: u64,
    /// Invocations served since start.
    pub invocations: u64,
    /// Invocations that ended without a response from the guest.
    pub failed_invocations: u64,
    /// Requests refused with 413 before their guest ran.
    pub requests_too_large: u64,
    /// Instances running now.
    pub instances_in_flight: usize,
    /// Idle instances kept by hot functions.
    pub instances_kept: usize,
    /// Requests refused with 429 since start.
    pub throttled: u64,
    /// Keep-alive policy.
    pub keep_alive_policy: String,
    /// Memory promised to running invocations, in MB.
    pub memory_in_use_mb: u64,
    /// Memory held by warm and hot functions (code and kept instances), in MB.
    pub memory_resident_mb: u64,
    /// The node's memory budget, in MB.
    pub memory_budget_mb: u64,
    /// Guest log lines dropped because the log writer fell behind.
    pub log_lines_dropped: u64,
    /// Usage records committed to the ledger since start.
    pub ledger_records: u64,
    /// Usage records waiting to be committed.
    pub ledger_pending: i64,
    /// The node's data directory.
    pub data_dir: String,
    /// Each function's tier and instances.
    pub scaling: Vec<FunctionScalingStatus>,
}

/// One function's place in the tiers, for `mayfly status`.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionScalingStatus {
    /// Function name.
    pub function: String,
    /// Cold, warm or hot.
    pub tier: TierName,
    /// Invocations running.
    pub running: u32,
    /// Idle kept instances (hot functions).
    pub kept: usize,
    /// Requests waiting for a slot.
    pub queued: u32,
    /// Seconds since the function's last invocation ended (absent while
    /// running).
    pub idle_seconds: Option<f64>,
    /// Requests that had to load the function first, since the node started.
    pub cold_starts: u64,
    /// Requests refused with 429, since the node started.
    pub throttled: u64,
}

/// What a deploy did.
#[derive(Debug, Clone, Serialize)]
pub struct DeployOutcome {
    /// The new version.
    #[serde(flatten)]
    pub version: VersionRecord,
    /// Whether the component was compiled (false: its artifact was cached).
    pub compiled: bool,
    /// Whether the upload was the live version's component and config
    /// again, so no version was created: `version` is the live one.
    pub unchanged: bool,
}

/// The node: its state, runtime and catalog.
pub struct Platform {
    runtime: Arc<Runtime>,
    registry: Arc<dyn Registry>,
    blobs: Arc<dyn BlobStore>,
    log_store: Arc<dyn LogStore>,
    logs: Arc<LogHub>,
    usage: Arc<dyn UsageStore>,
    ledger: Arc<Ledger>,
    metrics: Metrics,
    catalog: ArcSwap<Catalog>,
    admission: Arc<Admission>,
    /// Function activity by name, kept across versions (and deletes, so a
    /// redeploy keeps its history).
    activities: std::sync::Mutex<std::collections::HashMap<String, Arc<Activity>>>,
    /// Serialises changes to the catalog so two deploys cannot interleave
    /// their store writes and catalog swaps. Never held by requests.
    changes: tokio::sync::Mutex<()>,
    /// Automatic canaries being judged.
    rollouts: crate::rollout::Rollouts,
    events: EventHub,
    /// This node, for the capabilities its functions hold.
    me: std::sync::Weak<Self>,
    /// wasi:keyvalue over the node's KV store, shared by every function.
    keyvalue: Arc<dyn mayfly_runtime::KeyValueBackend>,
    /// Secrets, sealed under the node's master key.
    secrets: Arc<crate::secrets::Secrets>,
    /// Admin API tokens, function credentials and the audit log.
    auth: Arc<crate::auth::Auth>,
    /// The admin API's URL, once it listens: functions read it through
    /// wasi:config to call back with their credential.
    api_url: std::sync::OnceLock<String>,
    config: NodeConfig,
    started: Instant,
    /// The data directory's lock, held for the node's life: a second node
    /// on the same directory refuses to start.
    _data_dir: mayfly_store::DataDir,
}

impl Platform {
    /// Opens the node's state in `config.data_dir` and builds the catalog.
    /// Artifacts missing from disk (new data directory layout, changed
    /// engine) are compiled here, so requests never compile.
    pub async fn open(config: NodeConfig) -> anyhow::Result<Arc<Self>> {
        let data_dir = config.data_dir.clone();
        // Locked before anything in it is opened or swept.
        let held = mayfly_store::DataDir::open(&data_dir).map_err(|error| match error {
            StoreError::InUse(message) => anyhow::anyhow!(message),
            other => anyhow::Error::new(other)
                .context(format!("cannot open data directory {}", data_dir.display())),
        })?;
        let store = Arc::new(
            EmbeddedStore::open(&data_dir.join("mayfly.db"))
                .with_context(|| format!("cannot open the database in {}", data_dir.display()))?,
        );
        let blob_dir = BlobDir::open(data_dir.join("blobs"))?;
        // Writes this node never finished (a crash): nobody else can be
        // writing them, the directory is locked.
        let swept = blob_dir
            .sweep_temp_files()
            .context("cannot remove unfinished blob writes")?;
        if swept > 0 {
            tracing::info!(files = swept, "removed unfinished blob writes");
        }
        let blobs: Arc<dyn BlobStore> = Arc::new(blob_dir);
        let usage: Arc<dyn UsageStore> = Arc::new(
            EmbeddedLedger::open(&data_dir.join("ledger.db")).with_context(|| {
                format!("cannot open the usage ledger in {}", data_dir.display())
            })?,
        );
        let runtime = Runtime::new(&config.runtime)?;
        let logs = LogHub::start(store.clone()).context("cannot start the log writer")?;
        let metrics = Metrics::new();
        let ledger = Arc::new(
            Ledger::start(usage.clone(), metrics.ledger.clone())
                .context("cannot start the ledger writer")?,
        );

        let events = EventHub::open(&data_dir, metrics.events.clone())
            .with_context(|| format!("cannot open the event store in {}", data_dir.display()))?;
        let secrets = Arc::new(crate::secrets::Secrets::open(&data_dir)?);
        let signing = secrets.clone();
        let auth = Arc::new(crate::auth::Auth::open(
            &data_dir,
            Box::new(move || signing.signing_key()),
            config.credential_ttl,
        )?);
        // Every store is open, its files created: make them the node
        // user's alone (a directory of an older node was 0755/0644).
        held.restrict_permissions().with_context(|| {
            format!("cannot restrict the permissions of {}", data_dir.display())
        })?;
        let (rollouts, verdicts) = crate::rollout::Rollouts::new();
        let platform = Arc::new_cyclic(|me: &std::sync::Weak<Self>| Self {
            me: me.clone(),
            keyvalue: Arc::new(crate::capabilities::NodeKeyValue {
                platform: me.clone(),
            }),
            events,
            secrets,
            auth,
            api_url: std::sync::OnceLock::new(),
            runtime,
            registry: store.clone(),
            blobs,
            log_store: store,
            logs,
            usage,
            ledger,
            metrics,
            catalog: ArcSwap::from_pointee(Catalog::default()),
            admission: Admission::new(
                config.scaling.max_concurrency,
                config.scaling.memory_budget_bytes,
            ),
            activities: std::sync::Mutex::default(),
            changes: tokio::sync::Mutex::new(()),
            rollouts,
            config,
            started: Instant::now(),
            _data_dir: held,
        });

        let registry = platform.registry.clone();
        let records = tokio::task::spawn_blocking(move || registry.functions()).await??;
        let mut served = Vec::with_capacity(records.len());
        for record in records {
            served.push(platform.restore(record).await?);
        }
        platform.catalog.store(Arc::new(Catalog::new(served)));
        platform.count_functions();
        spawn_autoscaler(&platform);
        spawn_verdicts(&platform, verdicts);
        platform.events.start(&platform).await?;
        Ok(platform)
    }

    /// Rebuilds a function's catalog entry at start-up (every version an
    /// alias points at), compiling only the artifacts that are missing.
    async fn restore(self: &Arc<Self>, record: FunctionRecord) -> anyhow::Result<Arc<Served>> {
        let name = record.name.clone();
        let registry = self.registry.clone();
        let owned = name.clone();
        let aliases = tokio::task::spawn_blocking(move || registry.aliases(&owned)).await??;
        let mut in_service: Vec<u64> = aliases
            .iter()
            .flat_map(|a| std::iter::once(a.version).chain(a.canary.map(|c| c.version)))
            .collect();
        in_service.sort_unstable();
        in_service.dedup();
        for version in in_service {
            let stored = if version == record.live.version {
                Some(record.live.clone())
            } else {
                let registry = self.registry.clone();
                let owned = name.clone();
                tokio::task::spawn_blocking(move || registry.version(&owned, version)).await??
            };
            let stored = stored.with_context(|| {
                format!("an alias of {name} points at version {version}, which is missing")
            })?;
            self.ensure_artifact(&stored)
                .await
                .with_context(|| format!("cannot recompile function {name} v{version}"))?;
        }
        let config = &record.live.config;
        if let Err(error) = self
            .admission
            .configure(&name, slot_limits(config, &self.config.scaling))
        {
            // The node was restarted with less capacity: serve the function
            // without its reservation rather than not at all.
            tracing::warn!(function = %name, "reservation dropped: {error}");
            let mut unreserved = config.clone();
            unreserved.scaling.reserved_concurrency = 0;
            self.admission
                .configure(&name, slot_limits(&unreserved, &self.config.scaling))
                .map_err(|e| anyhow::anyhow!(e))?;
        }
        Ok(self.build_served(&name, None).await?)
    }

    /// Makes sure the compiled artifact of `version` is on disk with its
    /// checksum, compiling its stored component if not (a changed engine,
    /// a lost file, an artifact of a node that wrote no checksums). Cheap
    /// when it is there: its bytes are verified when it is loaded.
    async fn ensure_artifact(&self, version: &VersionRecord) -> Result<(), PlatformError> {
        let digest = Digest::parse(&version.digest)?;
        let artifact = self.artifact_key(&digest);
        if self.artifact_cached(&artifact) {
            return Ok(());
        }
        self.recompile(&Artifact {
            key: artifact,
            component: digest,
        })
        .await
    }

    /// Compiles an artifact again from its stored component and stores it
    /// in place of whatever was there.
    async fn recompile(&self, artifact: &Artifact) -> Result<(), PlatformError> {
        let blobs = self.blobs.clone();
        let key = artifact.component.clone();
        let wasm = blocking(move || blobs.get(BlobKind::Component, &key))
            .await?
            .ok_or_else(|| {
                PlatformError::Internal(anyhow::anyhow!(
                    "component {} of artifact {} is missing from the data directory",
                    artifact.component,
                    artifact.key
                ))
            })?;
        // Components are stored under their digest: one whose bytes do not
        // match it is damaged too, and compiling it would store wrong code
        // under a trusted checksum.
        if Digest::of(&wasm) != artifact.component {
            return Err(PlatformError::Internal(anyhow::anyhow!(
                "component {} is damaged on disk (its bytes no longer match their digest): \
                 deploy the function again",
                artifact.component
            )));
        }
        self.compile_and_store(Bytes::from(wasm), &artifact.key)
            .await
    }

    /// Whether the artifact under `key` is on disk and its bytes match its
    /// checksum (hashed once per file state, see
    /// [`BlobStore::verified_path`]); counts a cache hit when it is. A
    /// damaged one is reported and counted, for the caller to recompile.
    async fn artifact_verified(&self, key: &Digest) -> Result<bool, PlatformError> {
        let blobs = self.blobs.clone();
        let owned = key.clone();
        match blocking(move || blobs.verified_path(BlobKind::Artifact, &owned)).await {
            Ok(Some(_)) => {
                self.metrics.node.artifact_cache_hits.inc();
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(PlatformError::Internal(error)) => {
                tracing::error!(
                    artifact = %key,
                    "compiled artifact damaged, compiling it again from its component: {error:#}"
                );
                self.metrics.node.artifact_recompiles.inc();
                Ok(false)
            }
            Err(other) => Err(other),
        }
    }

    /// The function `name` as the store has it now: a [`Served`] with a
    /// [`Deployed`] entry per version its aliases point at. Entries of
    /// `prior` (the function as served until now) are reused for the
    /// versions still in service, so they keep their tier (no reload).
    async fn build_served(
        &self,
        name: &str,
        prior: Option<&Served>,
    ) -> Result<Arc<Served>, PlatformError> {
        let registry = self.registry.clone();
        let owned = name.to_string();
        let (aliases, versions, function) = blocking(move || {
            Ok::<_, StoreError>((
                registry.aliases(&owned)?,
                registry.versions(&owned)?,
                registry.function(&owned)?,
            ))
        })
        .await?;
        let generation = function
            .ok_or_else(|| PlatformError::NotFound(name.to_string()))?
            .created_at_ms;
        let mut made: std::collections::HashMap<u64, Arc<Deployed>> =
            std::collections::HashMap::new();
        let mut entry = |version: u64| -> Result<Arc<Deployed>, PlatformError> {
            if let Some(deployed) = made.get(&version) {
                return Ok(deployed.clone());
            }
            let deployed = match prior.and_then(|prior| prior.version(version)) {
                Some(deployed) => deployed.clone(),
                None => {
                    let record = versions.iter().find(|v| v.version == version).ok_or_else(
                        || {
                            PlatformError::Internal(anyhow::anyhow!(
                                "an alias of {name} points at version {version}, which is missing"
                            ))
                        },
                    )?;
                    let digest = Digest::parse(&record.digest)?;
                    self.deployed(
                        name.to_string(),
                        generation,
                        version,
                        Artifact {
                            key: self.artifact_key(&digest),
                            component: digest,
                        },
                        &record.config,
                        Tier::default(),
                    )
                }
            };
            made.insert(version, deployed.clone());
            Ok(deployed)
        };
        let mut live = None;
        let mut named = std::collections::HashMap::new();
        let judged: Vec<String> = aliases
            .iter()
            .filter(|a| a.canary.is_some_and(|c| c.auto.is_some()))
            .map(|a| a.alias.clone())
            .collect();
        for alias in aliases {
            let canary = match alias.canary {
                Some(canary) => Some(Canary {
                    deployed: entry(canary.version)?,
                    weight_bp: canary.weight_bp,
                    rollout: canary.auto.map(|policy| {
                        self.rollouts.rollout(
                            name,
                            &alias.alias,
                            alias.version,
                            canary.version,
                            policy,
                        )
                    }),
                }),
                None => None,
            };
            let target = Target {
                deployed: entry(alias.version)?,
                canary,
            };
            if alias.alias == LIVE_ALIAS {
                live = Some((target, alias.version));
            } else {
                named.insert(alias.alias, target);
            }
        }
        let judged: Vec<&str> = judged.iter().map(String::as_str).collect();
        self.rollouts.retain(name, &judged);
        let (live, live_version) = live.ok_or_else(|| PlatformError::NotFound(name.to_string()))?;
        let routes = versions
            .iter()
            .find(|v| v.version == live_version)
            .map(|v| parse_routes(&v.config.routes))
            .transpose()
            .map_err(|e| {
                PlatformError::Internal(anyhow::anyhow!("stored routes of {name} are invalid: {e}"))
            })?
            .unwrap_or_default();
        Ok(Arc::new(Served {
            name: name.to_string(),
            routes,
            live,
            aliases: named,
        }))
    }

    /// Puts `served` in the catalog in place of `prior`, then sends the
    /// versions no longer in service cold (running requests keep theirs).
    fn swap_in(&self, served: Arc<Served>, prior: Option<&Served>) {
        let next = self.catalog.load().with(served.clone());
        self.catalog.store(Arc::new(next));
        if let Some(prior) = prior {
            for old in prior.versions() {
                if served.version(old.version).is_none() {
                    old.tier.unload();
                }
            }
        }
    }

    /// A catalog entry, with its meter and the function's activity.
    fn deployed(
        &self,
        name: String,
        generation: i64,
        version: u64,
        artifact: Artifact,
        config: &FunctionConfig,
        tier: Tier,
    ) -> Arc<Deployed> {
        let meter = FunctionMeter::new(
            name.clone(),
            config.limits.memory_mb,
            self.metrics.function(&name),
            self.ledger.clone(),
        );
        let activity = self
            .activities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(Activity::new(
                    self.config.scaling.keep_alive.as_ref(),
                    self.started,
                ))
            })
            .clone();
        let caps = crate::capabilities::capabilities(
            &self.me,
            &self.keyvalue,
            &name,
            generation,
            version,
            config,
        )
        .unwrap_or_else(|error| {
            // Grants are checked at deploy; a stored one that no longer
            // parses (an older binary's syntax) grants nothing.
            tracing::warn!(function = %name, "outbound grants ignored: {error}");
            mayfly_runtime::Capabilities::none()
        });
        Arc::new(Deployed {
            caps,
            grants: config.grants.clone(),
            key: Arc::from(name.as_str()),
            name,
            version,
            generation,
            version_header: http::HeaderValue::from(version),
            artifact,
            limits: invocation_limits(&config.limits),
            scaling: config.scaling.clone(),
            meter: Arc::new(meter),
            tier,
            activity,
        })
    }

    fn count_functions(&self) {
        let count = self.catalog.load().by_name.len();
        self.metrics.node.functions.set(count as i64);
    }

    /// Whether the artifact is on disk with its checksum (not hashed:
    /// see [`Platform::artifact_verified`]); counts a cache hit when it is.
    fn artifact_cached(&self, artifact: &Digest) -> bool {
        let cached = self.blobs.has_checked(BlobKind::Artifact, artifact);
        if cached {
            self.metrics.node.artifact_cache_hits.inc();
        }
        cached
    }

    fn artifact_key(&self, digest: &Digest) -> Digest {
        Digest::derive(&[digest.hex(), self.runtime.fingerprint()])
    }

    /// The function `name` as it is served now.
    fn served(&self, name: &str) -> Result<Arc<Served>, PlatformError> {
        self.catalog
            .load()
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| PlatformError::NotFound(name.to_string()))
    }

    /// The first of `routes` another function serves now, and its owner: a
    /// cheap early check (the store re-checks inside its transaction).
    fn route_taken(&self, name: &str, routes: &[Route]) -> Option<(Route, String)> {
        let catalog = self.catalog.load();
        routes.iter().find_map(|route| {
            catalog
                .routes
                .get_exact(route)
                .filter(|served| served.name != name)
                .map(|served| (route.clone(), served.name.clone()))
        })
    }

    /// Compiles `wasm` off the async runtime and stores its artifact.
    async fn compile_and_store(&self, wasm: Bytes, artifact: &Digest) -> Result<(), PlatformError> {
        let compiled = self.config.compiler.compile(&self.runtime, wasm).await?;
        self.metrics.node.compilations.inc();
        let blobs = self.blobs.clone();
        let key = artifact.clone();
        blocking(move || blobs.put_checked(BlobKind::Artifact, &key, &compiled.artifact)).await?;
        Ok(())
    }

    /// Deploys `wasm` as a new version of `name` with `config` (routes as
    /// the user wrote them, and limits).
    ///
    /// Validation and compilation happen before anything is stored, so a
    /// rejected upload leaves the node exactly as it was.
    pub async fn deploy(
        &self,
        name: &str,
        wasm: Bytes,
        config: FunctionConfig,
        triggers: Vec<TriggerSpec>,
    ) -> Result<DeployOutcome, PlatformError> {
        self.deploy_unless_gone(name, wasm, config, triggers, &CancellationToken::new())
            .await
    }

    /// [`Platform::deploy`], given up while compiling (the compile stopped,
    /// its worker killed) once `gone` is cancelled: the uploader hung up.
    /// Later steps run to the end, so the store and catalog stay in step.
    pub async fn deploy_unless_gone(
        &self,
        name: &str,
        wasm: Bytes,
        config: FunctionConfig,
        triggers: Vec<TriggerSpec>,
        gone: &CancellationToken,
    ) -> Result<DeployOutcome, PlatformError> {
        validate_name(name)?;
        for spec in &triggers {
            crate::validate::check_trigger(spec)?;
            self.check_trigger_alias(name, spec)?;
        }
        validate_limits(&config.limits, self.config.runtime.max_instance_memory)
            .map_err(PlatformError::BadRequest)?;
        validate_scaling(&config.scaling, self.config.scaling.max_concurrency)
            .map_err(PlatformError::BadRequest)?;
        crate::capabilities::check_grants(&config)?;
        if wasm.len() > self.config.max_component_bytes {
            return Err(PlatformError::BadRequest(format!(
                "the component is {} bytes, over this node's limit of {} bytes",
                wasm.len(),
                self.config.max_component_bytes
            )));
        }
        validate_routes(&config.routes).map_err(PlatformError::BadRequest)?;
        let routes = parse_routes(&config.routes).map_err(PlatformError::BadRequest)?;
        // So a conflicting deploy does not compile.
        if let Some((route, owner)) = self.route_taken(name, &routes) {
            return Err(PlatformError::Conflict(format!(
                "route `{route}` is already served by function `{owner}`"
            )));
        }

        let config = FunctionConfig {
            routes: routes.iter().map(Route::to_string).collect(),
            ..config
        };
        let digest = Digest::of(&wasm);
        // Re-applying what is live (a manifest deployed again) changes
        // nothing: answered before compiling or loading anything.
        {
            let _change = self.changes.lock().await;
            if let Some(live) = self.unchanged_live(name, &digest, &config).await? {
                // Nothing to change, but the artifact it runs must be
                // sound: a redeploy is how an operator heals a function.
                let key = self.artifact_key(&digest);
                if !self.artifact_verified(&key).await? {
                    self.compile_and_store(wasm.clone(), &key).await?;
                }
                return self.keep_live(name, live, triggers).await;
            }
        }
        let artifact = Artifact {
            key: self.artifact_key(&digest),
            component: digest.clone(),
        };
        let compiled = !self.artifact_verified(&artifact.key).await?;
        if compiled {
            tokio::select! {
                stored = self.compile_and_store(wasm.clone(), &artifact.key) => stored?,
                () = gone.cancelled() => {
                    tracing::info!(function = name, "deploy abandoned while compiling: its client went away");
                    return Err(PlatformError::BadRequest(
                        "the deploy was abandoned: its client went away while it compiled".into(),
                    ));
                }
            }
        }
        // Load once to prove the artifact works on this engine, then let it
        // go: a deployed function stays cold (on disk) until its first
        // request, so thousands of idle functions cost no memory, and
        // loading takes well under a millisecond when it is called.
        drop(
            self.load_verified(&artifact.key, config.scaling.reuse)
                .await?,
        );

        let _change = self.changes.lock().await;
        // An identical deploy may have landed while this one compiled.
        if let Some(live) = self.unchanged_live(name, &digest, &config).await? {
            return self.keep_live(name, live, triggers).await;
        }
        // Checked under the change lock, so no other deploy can take the
        // reservation between this check and the store write.
        let previous = self.catalog.load().by_name.get(name).cloned();
        let slots = slot_limits(&config, &self.config.scaling);
        self.admission
            .configure(name, slots)
            .map_err(PlatformError::BadRequest)?;
        let blobs = self.blobs.clone();
        let registry = self.registry.clone();
        let stored_config = config.clone();
        let function_name = name.to_string();
        let stored = tokio::task::spawn_blocking(move || {
            blobs.put(BlobKind::Component, &wasm)?;
            registry.create_version(&function_name, &digest, &stored_config)
        })
        .await
        .map_err(|e| PlatformError::Internal(e.into()))?;
        let version = match stored {
            Ok(version) => version,
            Err(error) => {
                // Nothing changed: the previous version's limits apply again.
                self.restore_admission(name, previous.as_deref());
                return Err(error.into());
            }
        };

        // The old live version goes cold now (unless an alias still
        // serves it): running requests keep their copy.
        let served = self.build_served(name, previous.as_deref()).await?;
        self.swap_in(served, previous.as_deref());
        self.count_functions();
        self.retain_versions(name).await;
        for spec in triggers {
            self.events.add_trigger(name, spec).await?;
        }
        self.events.sync_workers();
        tracing::info!(
            function = name,
            version = version.version,
            compiled,
            "deployed"
        );
        Ok(DeployOutcome {
            version,
            compiled,
            unchanged: false,
        })
    }

    /// Puts back the admission limits of the live version of `prior` (or
    /// removes the function's when there was none) after a change failed.
    fn restore_admission(&self, name: &str, prior: Option<&Served>) {
        match prior {
            Some(prior) => {
                let live = &prior.live.deployed;
                let _ = self.admission.configure(
                    name,
                    slot_limits_of(&live.scaling, &live.limits, &self.config.scaling),
                );
            }
            None => self.admission.remove(name),
        }
    }

    /// Deletes the versions of `name` beyond the node's retention that no
    /// alias points at. A failure is logged: the deploy itself succeeded.
    async fn retain_versions(&self, name: &str) {
        let registry = self.registry.clone();
        let owned = name.to_string();
        let keep = self.config.keep_versions.max(1);
        match tokio::task::spawn_blocking(move || registry.prune_versions(&owned, keep)).await {
            Ok(Ok(pruned)) if !pruned.is_empty() => {
                tracing::info!(function = name, ?pruned, "old versions deleted (retention)");
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(function = name, "retention failed: {error}"),
            Err(error) => tracing::warn!(function = name, "retention failed: {error}"),
        }
    }

    /// The live version of `name` when it already is `digest` with `config`
    /// (routes normalised), so deploying them again would change nothing.
    /// Called under the change lock.
    async fn unchanged_live(
        &self,
        name: &str,
        digest: &Digest,
        config: &FunctionConfig,
    ) -> Result<Option<VersionRecord>, PlatformError> {
        // Only a function the catalog serves: one that failed to load at
        // start is deployed afresh.
        let Some(serving) = self
            .catalog
            .load()
            .by_name
            .get(name)
            .map(|f| f.live.deployed.version)
        else {
            return Ok(None);
        };
        let registry = self.registry.clone();
        let owned = name.to_string();
        let record = blocking(move || registry.function(&owned)).await?;
        let digest = digest.to_string();
        Ok(record.map(|record| record.live).filter(|live| {
            live.version == serving && live.digest == digest && live.config == *config
        }))
    }

    /// Answers a deploy that changes nothing with the live version; its
    /// triggers are still attached (an identical one is not attached twice).
    /// Called under the change lock.
    async fn keep_live(
        &self,
        name: &str,
        live: VersionRecord,
        triggers: Vec<TriggerSpec>,
    ) -> Result<DeployOutcome, PlatformError> {
        if !triggers.is_empty() {
            for spec in triggers {
                self.events.add_trigger(name, spec).await?;
            }
            self.events.sync_workers();
        }
        tracing::info!(function = name, version = live.version, "deploy unchanged");
        Ok(DeployOutcome {
            version: live,
            compiled: false,
            unchanged: true,
        })
    }

    /// Deletes a function: its routes stop serving at once.
    pub async fn delete(&self, name: &str) -> Result<(), PlatformError> {
        let _change = self.changes.lock().await;
        let registry = self.registry.clone();
        let owned = name.to_string();
        let existed = blocking(move || registry.delete_function(&owned)).await?;
        if !existed {
            return Err(PlatformError::NotFound(name.to_string()));
        }
        let removed = self.catalog.load().by_name.get(name).cloned();
        let next = self.catalog.load().without(name);
        self.catalog.store(Arc::new(next));
        self.admission.remove(name);
        self.rollouts.retain(name, &[]);
        if let Some(removed) = removed {
            for version in removed.versions() {
                version.tier.unload();
            }
        }
        self.metrics.remove_function(name);
        self.count_functions();
        self.events.remove_function(name).await?;
        tracing::info!(function = name, "deleted");
        Ok(())
    }

    /// Every function with its live version.
    pub async fn functions(&self) -> Result<Vec<FunctionRecord>, PlatformError> {
        let registry = self.registry.clone();
        blocking(move || registry.functions()).await
    }

    /// One function and all its versions, newest first.
    pub async fn function(
        &self,
        name: &str,
    ) -> Result<(FunctionRecord, Vec<VersionRecord>), PlatformError> {
        let registry = self.registry.clone();
        let owned = name.to_string();
        let (record, versions) = blocking(move || {
            Ok::<_, StoreError>((registry.function(&owned)?, registry.versions(&owned)?))
        })
        .await?;
        let record = record.ok_or_else(|| PlatformError::NotFound(name.to_string()))?;
        Ok((record, versions))
    }

    /// A function's aliases, `live` first.
    pub async fn aliases(&self, name: &str) -> Result<Vec<AliasRecord>, PlatformError> {
        let registry = self.registry.clone();
        let owned = name.to_string();
        let aliases = blocking(move || registry.aliases(&owned)).await?;
        if aliases.is_empty() {
            return Err(PlatformError::NotFound(name.to_string()));
        }
        Ok(aliases)
    }

    /// Points `alias` of `name` at `version`, with an optional canary taking
    /// `weight_bp` basis points of its traffic. Moving `live` makes the
    /// version's routes the function's (409 on a conflict, changing
    /// nothing) and records the version it left. The catalog is switched
    /// before this returns; nothing is recompiled unless the version's
    /// artifact is missing from disk.
    pub async fn set_alias(
        &self,
        name: &str,
        alias: &str,
        version: u64,
        canary: Option<CanaryRecord>,
    ) -> Result<AliasRecord, PlatformError> {
        validate_alias(alias)?;
        if let Some(canary) = canary {
            if canary.weight_bp == 0 || canary.weight_bp >= WEIGHT_SCALE_BP {
                return Err(PlatformError::BadRequest(format!(
                    "the canary weight is {}%: give more than 0% and less than 100%",
                    f64::from(canary.weight_bp) / 100.0
                )));
            }
            if canary.version == version {
                return Err(PlatformError::BadRequest(format!(
                    "the canary is version {version}, the alias's own version: give another one"
                )));
            }
        }
        let _change = self.changes.lock().await;
        self.switch_alias(name, alias, version, canary, MoveCause::Set, "")
            .await
    }

    /// Moves `live` of `name` back to its previous version (or, if it has
    /// none left, the newest one below it), clearing any canary. Returns
    /// the new `live` and the version it left.
    pub async fn rollback(&self, name: &str) -> Result<(AliasRecord, u64), PlatformError> {
        let _change = self.changes.lock().await;
        let registry = self.registry.clone();
        let owned = name.to_string();
        let (aliases, versions) = blocking(move || {
            Ok::<_, StoreError>((registry.aliases(&owned)?, registry.versions(&owned)?))
        })
        .await?;
        let live = aliases
            .into_iter()
            .find(|a| a.alias == LIVE_ALIAS)
            .ok_or_else(|| PlatformError::NotFound(name.to_string()))?;
        let numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
        let Some(target) = rollback_target(&live, &numbers) else {
            return Err(PlatformError::Conflict(format!(
                "nothing to roll back to: `{name}` is live at version {} and has no earlier \
                 version (see `mayfly versions {name}`)",
                live.version
            )));
        };
        let record = self
            .switch_alias(name, LIVE_ALIAS, target, None, MoveCause::Rollback, "")
            .await?;
        tracing::info!(
            function = name,
            from = live.version,
            to = target,
            "rolled back"
        );
        Ok((record, live.version))
    }

    /// Moves an alias, under the change lock: checks the versions and
    /// their artifacts before anything is stored, then stores the move and
    /// swaps the catalog.
    async fn switch_alias(
        &self,
        name: &str,
        alias: &str,
        version: u64,
        canary: Option<CanaryRecord>,
        cause: MoveCause,
        detail: &str,
    ) -> Result<AliasRecord, PlatformError> {
        let prior = self.served(name)?;
        let mut live_config = None;
        for wanted in std::iter::once(version).chain(canary.map(|c| c.version)) {
            let registry = self.registry.clone();
            let owned = name.to_string();
            let record = blocking(move || registry.version(&owned, wanted))
                .await?
                .ok_or_else(|| StoreError::VersionNotFound {
                    function: name.to_string(),
                    version: wanted,
                })?;
            // A version already in service has its artifact loaded or on disk.
            if prior.version(wanted).is_none() {
                self.ensure_artifact(&record).await?;
            }
            if wanted == version && alias == LIVE_ALIAS {
                live_config = Some(record.config);
            }
        }
        if let Some(config) = &live_config {
            // The routes are checked (again) by the store, in its transaction.
            let routes = parse_routes(&config.routes).map_err(|e| {
                PlatformError::Internal(anyhow::anyhow!("stored routes of {name} are invalid: {e}"))
            })?;
            if let Some((route, owner)) = self.route_taken(name, &routes) {
                return Err(PlatformError::Conflict(format!(
                    "route `{route}` of version {version} is already served by function \
                     `{owner}`"
                )));
            }
            self.admission
                .configure(name, slot_limits(config, &self.config.scaling))
                .map_err(PlatformError::BadRequest)?;
        }
        let registry = self.registry.clone();
        let (owned, alias_name, detail_text) =
            (name.to_string(), alias.to_string(), detail.to_string());
        let stored = tokio::task::spawn_blocking(move || {
            registry.set_alias(&owned, &alias_name, version, canary, cause, &detail_text)
        })
        .await
        .map_err(|e| PlatformError::Internal(e.into()));
        let record = match stored {
            Ok(Ok(record)) => record,
            Ok(Err(error)) => {
                if live_config.is_some() {
                    self.restore_admission(name, Some(&prior));
                }
                return Err(error.into());
            }
            Err(error) => {
                if live_config.is_some() {
                    self.restore_admission(name, Some(&prior));
                }
                return Err(error);
            }
        };
        let served = self.build_served(name, Some(&prior)).await?;
        self.swap_in(served, Some(&prior));
        tracing::info!(
            function = name,
            alias,
            version,
            canary = ?canary,
            cause = cause.as_str(),
            "alias set"
        );
        Ok(record)
    }

    /// Applies an automatic canary's verdict, if the rollout that reached
    /// it still judges the alias (a user may have moved or re-set it
    /// meanwhile): promotion points the alias at the canary, rollback takes
    /// the canary out. The move is recorded with its figures and written to
    /// the function's log. Every catalog rebuild, under the change lock
    /// held here, keeps a rollout only while its alias has that canary and
    /// policy, so "current" needs no store read.
    async fn apply_verdict(&self, verdict: crate::rollout::Verdict) {
        let crate::rollout::Verdict {
            rollout_id,
            function: name,
            alias,
            stable_version,
            canary_version,
            promote,
            detail,
        } = verdict;
        let _change = self.changes.lock().await;
        if !self.rollouts.is_current(&name, &alias, rollout_id) {
            return;
        }
        let (version, cause, verb) = if promote {
            (canary_version, MoveCause::AutoPromote, "promoted")
        } else {
            (stable_version, MoveCause::AutoRollback, "rolled back")
        };
        let line = match self
            .switch_alias(&name, &alias, version, None, cause, &detail)
            .await
        {
            Ok(_) => {
                tracing::info!(function = %name, alias, canary_version, %detail, "canary {verb}");
                format!("mayfly: canary version {canary_version} on `{alias}` {verb}: {detail}")
            }
            Err(error) => {
                // A passing failure (a busy database) is judged again on the
                // next invocation, so it does not strand the canary; a
                // refusal (a route another function took) waits for the user.
                if matches!(error, PlatformError::Internal(_)) {
                    self.reopen_rollout_later(&name, &alias, rollout_id);
                }
                tracing::warn!(function = %name, alias, canary_version, "canary not {verb}: {error}");
                format!(
                    "mayfly: canary version {canary_version} on `{alias}` should be {verb} \
                     ({detail}) but the move failed: {error}"
                )
            }
        };
        let labels = RequestLabels {
            function: name,
            version: canary_version,
            request_id: "-".to_string(),
            trigger: "rollout",
            cold_start: false,
        };
        mayfly_runtime::LogSink::line(
            self.logs.as_ref(),
            &labels,
            mayfly_runtime::LogStream::Stderr,
            &line,
        );
    }

    /// Lets rollout `id` reach its verdict again after a second, so a
    /// failure that persists is retried once a second, not per request.
    fn reopen_rollout_later(&self, name: &str, alias: &str, id: u64) {
        let (me, name, alias) = (self.me.clone(), name.to_string(), alias.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(platform) = me.upgrade() {
                platform.rollouts.reopen(&name, &alias, id);
            }
        });
    }

    /// Where the automatic canary on `alias` of `name` stands, if it has one.
    pub fn rollout_progress(&self, name: &str, alias: &str) -> Option<crate::rollout::Progress> {
        self.rollouts.progress(name, alias)
    }

    /// The last `limit` moves of `name`'s aliases, newest first.
    pub async fn alias_moves(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<Vec<mayfly_store::AliasMove>, PlatformError> {
        let registry = self.registry.clone();
        let owned = name.to_string();
        blocking(move || registry.alias_moves(&owned, limit)).await
    }

    /// Deletes a named alias of `name` (`live` cannot be deleted).
    pub async fn delete_alias(&self, name: &str, alias: &str) -> Result<(), PlatformError> {
        validate_alias(alias)?;
        if alias == LIVE_ALIAS {
            return Err(PlatformError::BadRequest(format!(
                "the `{LIVE_ALIAS}` alias cannot be deleted: it is what `{name}`'s routes serve; \
                 move it with `mayfly alias set` or delete the function"
            )));
        }
        let _change = self.changes.lock().await;
        let prior = self.served(name)?;
        let aimed: Vec<String> = self
            .events
            .triggers(Some(name))
            .iter()
            .filter(|t| t.spec.alias.as_deref() == Some(alias))
            .map(|t| t.id.to_string())
            .collect();
        if !aimed.is_empty() {
            return Err(PlatformError::Conflict(format!(
                "alias `{alias}` of `{name}` receives the events of trigger(s) {}: remove them \
                 first (`mayfly trigger remove <id>`)",
                aimed.join(", ")
            )));
        }
        let registry = self.registry.clone();
        let (owned, alias_name) = (name.to_string(), alias.to_string());
        let existed = blocking(move || registry.delete_alias(&owned, &alias_name)).await?;
        if !existed {
            return Err(PlatformError::Missing(format!(
                "function `{name}` has no alias `{alias}`: see `mayfly alias list {name}`"
            )));
        }
        let served = self.build_served(name, Some(&prior)).await?;
        self.swap_in(served, Some(&prior));
        tracing::info!(function = name, alias, "alias deleted");
        Ok(())
    }

    /// Deletes one version of `name`; refused (409, naming them) while an
    /// alias or canary points at it.
    pub async fn delete_version(&self, name: &str, version: u64) -> Result<(), PlatformError> {
        let _change = self.changes.lock().await;
        let registry = self.registry.clone();
        let owned = name.to_string();
        blocking(move || registry.delete_version(&owned, version)).await?;
        tracing::info!(function = name, version, "version deleted");
        Ok(())
    }

    /// The node's counters.
    pub fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            functions: self.catalog.load().by_name.len(),
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
            memory_resident_mb: self.resident_memory() >> 20,
            memory_budget_mb: self.admission.memory_budget() >> 20,
            log_lines_dropped: self.logs.dropped(),
            ledger_records: self.metrics.ledger.committed.get(),
            ledger_pending: self.ledger.pending(),
            data_dir: self.config.data_dir.display().to_string(),
            scaling: self.scaling_status(),
        }
    }

    /// Each function's tier, instances and queue.
    pub fn scaling_status(&self) -> Vec<FunctionScalingStatus> {
        let catalog = self.catalog.load();
        let mut functions: Vec<FunctionScalingStatus> = catalog
            .by_name
            .values()
            .map(|served| {
                let deployed = &served.live.deployed;
                let usage = self.admission.usage(&deployed.name);
                let (cold_starts, throttled) = deployed.meter.counts();
                FunctionScalingStatus {
                    function: deployed.name.clone(),
                    tier: deployed.tier.name(),
                    running: usage.running,
                    kept: deployed.tier.get().map_or(0, |f| f.kept_instances()),
                    queued: usage.queued,
                    idle_seconds: deployed.activity.idle_for().map(|d| d.as_secs_f64()),
                    cold_starts,
                    throttled,
                }
            })
            .collect();
        functions.sort_by(|a, b| a.function.cmp(&b.function));
        functions
    }

    /// Memory held by loaded functions: their mapped code and the linear
    /// memory of their kept instances.
    fn resident_memory(&self) -> u64 {
        self.catalog
            .load()
            .by_name
            .values()
            .flat_map(|served| served.versions())
            .filter_map(|deployed| deployed.tier.get())
            .map(|function| function.resident_bytes())
            .sum()
    }

    /// One pass of the autoscaler: applies every function's keep-alive
    /// windows (unload, pre-warm, shrink hot pools), then the memory
    /// budget, and refreshes the tier metrics.
    pub fn autoscale(self: &Arc<Self>) {
        let catalog = self.catalog.load_full();
        let mut resident = 0u64;
        let mut evictable = Vec::new();
        for (served, deployed) in catalog
            .by_name
            .values()
            .flat_map(|served| served.versions().into_iter().map(move |d| (served, d)))
        {
            let activity = &deployed.activity;
            // One snapshot of the activity for every decision below.
            let windows = activity.windows();
            let idle = activity.idle_for();
            let warm_now = idle.is_none_or(|idle| windows.is_warm_after(idle));
            let loaded = deployed.tier.get();
            // Only what live serves is pre-warmed: a named alias's version
            // loads on its first request.
            let serves_live = served
                .live
                .versions()
                .any(|v| v.version == deployed.version);
            if !warm_now {
                if deployed.tier.unload() {
                    self.metrics.node.unloads_keep_alive.inc();
                }
            } else if windows.prewarm > Duration::ZERO && loaded.is_none() && serves_live {
                // The policy expects the next call soon: load it before.
                self.prewarm(deployed.clone());
            }
            let mut kept = 0;
            if let Some(function) = loaded.filter(|_| warm_now) {
                function.reap_kept(windows.prewarm.saturating_add(windows.keep_alive));
                kept = function.kept_instances();
                let bytes = function.resident_bytes();
                resident += bytes;
                if let Some(idle) = idle {
                    evictable.push((eviction_order(idle, bytes), bytes, deployed.clone()));
                }
            }
            if Arc::ptr_eq(deployed, &served.live.deployed) {
                deployed.meter.set_tiers(
                    deployed.tier.name().gauge(),
                    i64::from(activity.running()) + kept as i64,
                );
            }
        }

        // Under memory pressure, the least valuable idle entries go first.
        let budget = self.admission.memory_budget();
        let mut used = resident + self.admission.memory_in_use();
        if used > budget {
            evictable.sort_by_key(|(order, _, _)| *order);
            for (_, bytes, deployed) in evictable {
                if used <= budget {
                    break;
                }
                if deployed.tier.unload() {
                    self.metrics.node.unloads_memory.inc();
                    used = used.saturating_sub(bytes);
                }
            }
        }
        self.metrics
            .node
            .resident_memory
            .set(i64::try_from(resident).unwrap_or(i64::MAX));
    }

    /// Loads a cold function ahead of its predicted next invocation.
    fn prewarm(self: &Arc<Self>, deployed: Arc<Deployed>) {
        let platform = self.clone();
        tokio::spawn(async move {
            let loaded = deployed
                .tier
                .get_or_load(async || {
                    platform
                        .load(&deployed.artifact, deployed.scaling.reuse)
                        .await
                })
                .await;
            match loaded {
                Ok((_, true)) => {
                    platform.metrics.node.prewarms.inc();
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(function = %deployed.name, "pre-warm failed: {error}");
                }
            }
        });
    }

    /// The current catalog.
    pub fn catalog(&self) -> arc_swap::Guard<Arc<Catalog>> {
        self.catalog.load()
    }

    /// The durable log store, for reading logs back.
    pub fn log_store(&self) -> Arc<dyn LogStore> {
        self.log_store.clone()
    }

    /// The log hub, to follow new lines.
    pub fn log_hub(&self) -> &LogHub {
        &self.logs
    }

    /// Loads a function's artifact. One that is missing, damaged (its
    /// bytes do not match their checksum) or that the engine refuses is
    /// compiled again from the stored component, once, and loaded: damaged
    /// code is never run (it could crash the whole node), and the function
    /// serves again without an operator.
    async fn load(&self, artifact: &Artifact, reuse: bool) -> Result<Function, PlatformError> {
        match self.load_verified(&artifact.key, reuse).await {
            Ok(function) => return Ok(function),
            Err(PlatformError::InsufficientStorage(message)) => {
                return Err(PlatformError::InsufficientStorage(message));
            }
            Err(error) => {
                tracing::error!(
                    artifact = %artifact.key,
                    component = %artifact.component,
                    "compiled artifact unusable, compiling it again from its component: {error}"
                );
                self.metrics.node.artifact_recompiles.inc();
            }
        }
        self.recompile(artifact).await?;
        self.load_verified(&artifact.key, reuse).await
    }

    /// Loads the artifact under `key` if its bytes match their checksum;
    /// fails (without loading anything) if it is missing or damaged.
    async fn load_verified(&self, key: &Digest, reuse: bool) -> Result<Function, PlatformError> {
        let blobs = self.blobs.clone();
        let runtime = self.runtime.clone();
        let owned = key.clone();
        blocking(move || {
            let path = blobs
                .verified_path(BlobKind::Artifact, &owned)?
                .ok_or_else(|| anyhow::anyhow!("artifact {owned} is missing"))?;
            runtime.load_artifact(&path, reuse)
        })
        .await
    }

    /// Runs `request` through the version of `target` (an alias) that its
    /// client id (else its fresh request id) picks, and always produces a
    /// response: the guest's, or an error response with a short body.
    /// `trigger` says what started it (`http`, `invoke`, …) for the usage
    /// record. The response carries the node's request id, the client's id
    /// if it sent one, and the version that served it.
    pub async fn invoke<B>(
        &self,
        target: &Target,
        request: http::Request<B>,
        trigger: &'static str,
    ) -> http::Response<HyperOutgoingBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let request_id = new_request_id();
        let client_id = client_request_id(request.headers());
        let (function, observed) = target.pick(client_id.as_deref().unwrap_or(&request_id));
        // A replayed client id runs and is billed, but only its first
        // invocation is judged by an automatic canary.
        let observed = match (observed, client_id.as_deref()) {
            (Some(observed), Some(id)) if !observed.first_sight(id) => None,
            (observed, _) => observed,
        };
        let function: &Deployed = function;
        // The start of the body arrives before a slot is taken, so a client
        // trickling its body holds no slot meanwhile (see `preread`).
        let request = match crate::preread::preread(request, function.limits.timeout).await {
            Ok(request) => request,
            Err(error) => {
                let (status, message) = error.response();
                let mut response = text_response(status, format!("{message}\n"));
                if let Ok(value) = http::HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert(REQUEST_ID_HEADER, value);
                }
                return response;
            }
        };
        let result = match self
            .admit(function, &request_id, client_id.as_deref(), trigger)
            .await
        {
            Ok(permit) => {
                self.run(
                    function,
                    request,
                    Invocation {
                        request_id: request_id.clone(),
                        client_id: client_id.clone(),
                        trigger,
                        permit,
                        observed,
                    },
                )
                .await
            }
            Err(throttled) => {
                let mut response = text_response(
                    http::StatusCode::TOO_MANY_REQUESTS,
                    format!("{}: {throttled}; retry later\n", function.name),
                );
                if throttled != Throttled::Gone {
                    // Slots free up as invocations end; one second is the
                    // header's smallest unit.
                    response.headers_mut().insert(
                        http::header::RETRY_AFTER,
                        http::HeaderValue::from_static("1"),
                    );
                }
                Ok(response)
            }
        };
        let mut response = match result {
            Ok(response) => response,
            Err((status, message)) => text_response(status, format!("{message}\n")),
        };
        if let Ok(value) = http::HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        if let Some(value) = client_id.and_then(|id| http::HeaderValue::from_str(&id).ok()) {
            response
                .headers_mut()
                .insert(CLIENT_REQUEST_ID_HEADER, value);
        }
        response
            .headers_mut()
            .insert(VERSION_HEADER, function.version_header.clone());
        response
    }

    /// Takes an admission slot for one invocation, waiting in the
    /// function's queue if it is full; a refusal is metered as throttled.
    async fn admit(
        &self,
        function: &Deployed,
        request_id: &str,
        client_id: Option<&str>,
        trigger: &'static str,
    ) -> Result<Permit, Throttled> {
        let queue_timeout = Duration::from_millis(function.scaling.queue_timeout_ms);
        let admitted = Instant::now();
        match self.admission.acquire(&function.key, queue_timeout).await {
            Ok(permit) => {
                if !permit.waited.is_zero() {
                    function.meter.queued(permit.waited);
                }
                Ok(permit)
            }
            Err(throttled) => {
                function.meter.throttled(
                    request_id,
                    client_id,
                    function.version,
                    trigger,
                    admitted.elapsed(),
                );
                Err(throttled)
            }
        }
    }

    /// Delivers one event: runs `request` like [`Platform::invoke`] and
    /// reads the whole response, so the event counts as delivered only when
    /// the guest answered 2xx and finished its body cleanly.
    pub(crate) async fn deliver_event(
        &self,
        target: &Target,
        request: http::Request<EventBody>,
        trigger: &'static str,
    ) -> EventOutcome {
        let request_id = new_request_id();
        let (function, observed) = target.pick(&request_id);
        let function: &Deployed = function;
        let Ok(permit) = self.admit(function, &request_id, None, trigger).await else {
            return EventOutcome::Throttled;
        };
        let invocation = Invocation {
            request_id,
            client_id: None,
            trigger,
            permit,
            observed,
        };
        let response = match self.run(function, request, invocation).await {
            Ok(response) => response,
            // 503 is the node's doing (no free instance slot, or the kill at
            // shutdown), not the event's: it is not an attempt.
            Err((status, message)) if status == http::StatusCode::SERVICE_UNAVAILABLE => {
                return EventOutcome::NotRun(message);
            }
            Err((status, message)) => return EventOutcome::Failed(format!("{status}: {message}")),
        };
        let status = response.status();
        let mut body = response.into_body();
        // Only the start of a failure's body is kept, for the dead letter.
        let mut excerpt = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        let room = EVENT_ERROR_EXCERPT.saturating_sub(excerpt.len());
                        excerpt.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Err(error) => {
                    return EventOutcome::Failed(format!(
                        "{status}, then the response body failed: {error}"
                    ));
                }
            }
        }
        if status.is_success() {
            EventOutcome::Delivered
        } else {
            let text = String::from_utf8_lossy(&excerpt);
            EventOutcome::Failed(format!("{status}: {}", text.trim()))
        }
    }

    /// Runs an admitted request: loads the function if it is cold, then
    /// hands the request to an instance. The permit and the activity count
    /// are held until the guest is done, not just until its response head.
    async fn run<B>(
        &self,
        function: &Deployed,
        request: http::Request<B>,
        invocation: Invocation,
    ) -> Result<http::Response<HyperOutgoingBody>, (http::StatusCode, String)>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let Invocation {
            request_id,
            client_id,
            trigger,
            permit,
            observed,
        } = invocation;
        let running = Running::start(&function.activity);
        let loaded = function
            .tier
            .get_or_load(async || self.load(&function.artifact, function.scaling.reuse).await)
            .await;
        let (loaded, cold_start) = loaded.map_err(|error| {
            tracing::error!(function = %function.name, "cannot load function: {error}");
            (
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "the function could not be loaded".to_string(),
            )
        })?;
        let labels = Arc::new(RequestLabels {
            function: function.name.clone(),
            version: function.version,
            request_id,
            trigger,
            cold_start,
        });
        let logs: Arc<dyn mayfly_runtime::LogSink> = self.logs.clone();
        let reports: Arc<dyn mayfly_runtime::ReportSink> = Arc::new(Admitted {
            meter: function.meter.clone(),
            client_id,
            observed,
            held: std::sync::Mutex::new(Some((permit, running))),
        });
        loaded
            .handle(
                request,
                labels,
                function.caps.clone(),
                &function.limits,
                logs,
                reports,
            )
            .await
            .map_err(|error| {
                if matches!(error, InvocationError::RequestTooLarge(_)) {
                    self.metrics.node.requests_too_large.inc();
                }
                (error.status(), error.to_string())
            })
    }

    /// The node's secrets.
    pub fn secrets(&self) -> &Arc<crate::secrets::Secrets> {
        &self.secrets
    }

    /// Tokens, credentials and the audit log.
    pub fn auth(&self) -> &Arc<crate::auth::Auth> {
        &self.auth
    }

    /// Records where the admin API listens (once; later calls are ignored).
    pub fn set_api_url(&self, url: String) {
        let _ = self.api_url.set(url);
    }

    /// The admin API's URL, if the node serves one.
    pub fn api_url(&self) -> Option<&str> {
        self.api_url.get().map(String::as_str)
    }

    /// The node's event stores, triggers and dead-letter queues.
    pub fn events(&self) -> &EventHub {
        &self.events
    }

    /// Attaches a trigger to a deployed function.
    pub async fn add_trigger(
        &self,
        function: &str,
        spec: TriggerSpec,
    ) -> Result<(Trigger, bool), PlatformError> {
        // Under the change lock, so a delete cannot slip in between the
        // check and the write and leave a trigger without its function.
        let _change = self.changes.lock().await;
        if !self.catalog.load().by_name.contains_key(function) {
            return Err(PlatformError::NotFound(function.to_string()));
        }
        self.check_trigger_alias(function, &spec)?;
        self.events.add_trigger(function, spec).await
    }

    /// Refuses a trigger aimed at an alias the function does not have.
    fn check_trigger_alias(&self, name: &str, spec: &TriggerSpec) -> Result<(), PlatformError> {
        let Some(alias) = spec.alias.as_deref().filter(|a| *a != LIVE_ALIAS) else {
            return Ok(());
        };
        let catalog = self.catalog.load();
        if catalog
            .by_name
            .get(name)
            .is_some_and(|served| served.alias(alias).is_some())
        {
            return Ok(());
        }
        Err(PlatformError::BadRequest(format!(
            "function `{name}` has no alias `{alias}`: create it first with `mayfly alias set \
             {name} {alias} <version>`, or leave the alias out to deliver to `live`"
        )))
    }

    /// Counts the event queues for the depth gauges, off the async workers
    /// (a SQLite query that may wait for a claim to commit).
    pub async fn refresh_event_depths(&self) {
        match self.events.depths().await {
            Ok(depths) => self.metrics.events.set_depths(&depths),
            Err(error) => tracing::warn!("cannot count event queues: {error}"),
        }
    }

    /// The node's metrics in the OpenMetrics text format.
    pub fn metrics_text(&self) -> Result<String, PlatformError> {
        self.metrics
            .node
            .log_lines_dropped
            .set(i64::try_from(self.logs.dropped()).unwrap_or(i64::MAX));
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
        let usage = self.usage.clone();
        blocking(move || usage.usage_summary(&query)).await
    }

    /// Usage records after `after_seq`, oldest first.
    pub async fn usage_records(
        &self,
        function: Option<String>,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<StoredUsage>, PlatformError> {
        let usage = self.usage.clone();
        blocking(move || usage.usage_records(function.as_deref(), after_seq, limit)).await
    }

    /// The last step of a shutdown, once the servers stopped accepting:
    /// lets running invocations finish until `deadline`, ends the rest
    /// (outcome `killed`), then makes every usage record and log line
    /// durable and stops the writers.
    pub async fn close(&self, deadline: tokio::time::Instant) {
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
        self.events
            .join(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
        let ledger = self.ledger.clone();
        let logs = self.logs.clone();
        let closed = tokio::task::spawn_blocking(move || {
            ledger.close();
            logs.close();
        })
        .await;
        if let Err(error) = closed {
            tracing::error!("flushing the ledger and logs failed: {error}");
        }
    }
}

/// One admitted invocation's report sink: forwards to the function's meter
/// (and to the rollout judging its version, if any) and gives back the
/// admission slot and activity count when the guest is done (or when the
/// request is refused before a guest runs).
struct Admitted {
    meter: Arc<FunctionMeter>,
    /// The client's correlation id, for the usage record.
    client_id: Option<String>,
    observed: Option<crate::rollout::Observed>,
    held: std::sync::Mutex<Option<(Permit, Running)>>,
}

impl mayfly_runtime::ReportSink for Admitted {
    fn started(&self, labels: &RequestLabels) {
        if let Some(observed) = &self.observed {
            observed.started();
        }
        self.meter.started(labels);
    }

    fn finished(&self, labels: &RequestLabels, report: mayfly_runtime::InvocationReport) {
        if let Some(observed) = &self.observed {
            observed.record(&report);
        }
        self.meter
            .finished_for(labels, report, self.client_id.as_deref());
        // Free the slot now: the sink itself may outlive the guest a little.
        drop(self.held.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// Applies automatic canaries' verdicts, one at a time, while the node
/// lives.
fn spawn_verdicts(
    platform: &Arc<Platform>,
    mut verdicts: tokio::sync::mpsc::UnboundedReceiver<crate::rollout::Verdict>,
) {
    let weak = Arc::downgrade(platform);
    tokio::spawn(async move {
        while let Some(verdict) = verdicts.recv().await {
            let Some(platform) = weak.upgrade() else {
                return;
            };
            platform.apply_verdict(verdict).await;
        }
    });
}

/// Starts the autoscaler: one pass per tick while the node lives.
fn spawn_autoscaler(platform: &Arc<Platform>) {
    let weak = Arc::downgrade(platform);
    let tick = platform.config.scaling.tick;
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(platform) = weak.upgrade() else {
                return;
            };
            // Dropping kept instances and unmapping code are syscalls that
            // add up for a large pool: keep them off the async workers.
            let _ = tokio::task::spawn_blocking(move || platform.autoscale()).await;
        }
    });
}

/// Admission limits for a function's configuration on this node.
fn slot_limits(config: &FunctionConfig, node: &ScalingConfig) -> SlotLimits {
    slot_limits_of(&config.scaling, &invocation_limits(&config.limits), node)
}

fn slot_limits_of(
    scaling: &FunctionScaling,
    limits: &InvocationLimits,
    node: &ScalingConfig,
) -> SlotLimits {
    SlotLimits {
        max_concurrency: scaling.max_concurrency.unwrap_or(node.max_concurrency),
        reserved: scaling.reserved_concurrency,
        memory_bytes: limits.memory_bytes as u64,
        max_queued: scaling.max_queued,
        // A function that asked for its concurrency gets it; one that did
        // not bursts up to the node's default share.
        burst_percent: if scaling.max_concurrency.is_some() {
            100
        } else {
            node.function_share_percent
        },
    }
}

/// The runtime's limits for a function's configured ones.
fn invocation_limits(limits: &FunctionLimits) -> InvocationLimits {
    InvocationLimits {
        memory_bytes: (limits.memory_mb as usize) << 20,
        timeout: Duration::from_millis(limits.timeout_ms),
        max_log_bytes: usize::try_from(limits.max_log_bytes).unwrap_or(usize::MAX),
        max_request_bytes: limits.max_request_bytes,
        max_response_bytes: limits.max_response_bytes,
    }
}

/// A plain-text response in the gateway's body type.
pub fn text_response(
    status: http::StatusCode,
    body: impl Into<Bytes>,
) -> http::Response<HyperOutgoingBody> {
    let mut response = http::Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// One admitted invocation on its way to [`Platform::run`]: its ids, what
/// started it, its admission slot and the rollout judging it, if any.
struct Invocation {
    request_id: String,
    client_id: Option<String>,
    trigger: &'static str,
    permit: Permit,
    observed: Option<crate::rollout::Observed>,
}

/// The client's correlation id, if the request brings a valid one: from
/// [`CLIENT_REQUEST_ID_HEADER`], else from [`REQUEST_ID_HEADER`] (where
/// clients sent it before the node minted every id). An invalid one is
/// ignored, as before.
fn client_request_id(headers: &http::HeaderMap) -> Option<String> {
    [CLIENT_REQUEST_ID_HEADER, REQUEST_ID_HEADER]
        .into_iter()
        .find_map(|name| headers.get(name))
        .and_then(|value| value.to_str().ok())
        .filter(|id| valid_request_id(id))
        .map(str::to_string)
}

/// A new request id: a UUIDv7 in hex, so ids sort by time.
fn new_request_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Where a rollback of `live` goes: its previous version if that still
/// exists, else the newest version below it.
fn rollback_target(live: &AliasRecord, versions: &[u64]) -> Option<u64> {
    live.previous_version
        .filter(|previous| *previous != live.version && versions.contains(previous))
        .or_else(|| versions.iter().copied().filter(|v| *v < live.version).max())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(version: u64, previous: Option<u64>) -> AliasRecord {
        AliasRecord {
            function: "f".into(),
            alias: LIVE_ALIAS.into(),
            version,
            canary: None,
            previous_version: previous,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn a_rollback_goes_to_the_previous_version_or_the_newest_below() {
        assert_eq!(rollback_target(&live(7, Some(6)), &[5, 6, 7]), Some(6));
        // After a rollback the previous one is the version left: back again.
        assert_eq!(rollback_target(&live(6, Some(7)), &[5, 6, 7]), Some(7));
        // The previous version is gone (retention, delete): the newest below.
        assert_eq!(rollback_target(&live(7, Some(3)), &[5, 6, 7]), Some(6));
        assert_eq!(rollback_target(&live(7, None), &[2, 7, 9]), Some(2));
        assert_eq!(rollback_target(&live(1, None), &[1, 2]), None);
        assert_eq!(rollback_target(&live(1, Some(1)), &[1]), None);
    }
}
