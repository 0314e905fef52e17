//! Everything that changes what the node serves: deploys and deletes
//! (`deploy.rs`), alias moves, rollbacks and automatic canaries' verdicts
//! (`aliases.rs`), and changes others made to the store (`follow.rs`).
//! [`Deployments`] keeps
//! the store and the catalog in step under one change lock, building each
//! function's [`Served`] entry from the store and swapping it into the
//! catalog that the invoker reads.

mod aliases;
pub(crate) mod deploy;
mod follow;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use mayfly_runtime::InvocationLimits;
use mayfly_store::{
    BlobStore, Digest, ForwardHandler, Forwarder, FunctionConfig, FunctionRecord, FunctionScaling,
    LIVE_ALIAS, Registry, placement_matches,
};

use crate::admission::{Admission, SlotLimits};
use crate::artifacts::Artifacts;
use crate::capabilities::{NodeServices, capabilities};
use crate::catalog::{
    Artifact, Canary, Catalog, Deployed, FORWARD_MARGIN, RemoteFunction, Served, Target,
};
use crate::config::{NodeConfig, ScalingConfig};
use crate::error::PlatformError;
use crate::events::EventHub;
use crate::events::workers::EventWorkers;
use crate::ledger::Ledger;
use crate::logs::LogHub;
use crate::metering::{FunctionMeter, Metrics};
use crate::rollout::Rollouts;
use crate::routes::Route;
use crate::tiers::{Activity, Tier};
use crate::validate::parse_routes;

/// The node's deployed functions as the store and the catalog hold them,
/// and every change to them.
pub(crate) struct Deployments {
    parts: DeploymentParts,
    /// Function activity by name, kept across versions (and deletes, so a
    /// redeploy keeps its history).
    activities: Mutex<HashMap<String, Arc<Activity>>>,
    /// Serialises changes to the catalog so two deploys cannot interleave
    /// their store writes and catalog swaps. Never held by requests.
    changes: tokio::sync::Mutex<()>,
    /// Functions whose change from the store failed to apply and is being
    /// retried in the background (one retry task per function), each with
    /// whether another failure came since its task last tried.
    retrying: Mutex<HashMap<String, bool>>,
}

/// The handles [`Deployments`] works with.
pub(crate) struct DeploymentParts {
    pub(crate) registry: Arc<dyn Registry>,
    /// Components, stored at deploy.
    pub(crate) blobs: Arc<dyn BlobStore>,
    pub(crate) artifacts: Arc<Artifacts>,
    /// What the invoker serves; written only by [`Deployments`], under its
    /// change lock.
    pub(crate) catalog: Arc<ArcSwap<Catalog>>,
    pub(crate) admission: Arc<Admission>,
    /// Automatic canaries being judged.
    pub(crate) rollouts: Rollouts,
    /// Triggers, attached at deploy and dropped with their function.
    pub(crate) events: Arc<EventHub>,
    /// The event workers, started and stopped as functions and triggers
    /// come and go.
    pub(crate) workers: Arc<EventWorkers>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) ledger: Arc<Ledger>,
    /// Where rollout verdicts are logged, in the function's log.
    pub(crate) logs: Arc<LogHub>,
    /// What each version's capabilities are built over.
    pub(crate) services: Arc<NodeServices>,
    pub(crate) config: NodeConfig,
    pub(crate) started: Instant,
    /// Carries requests for functions placed elsewhere; told which
    /// functions this node answers for after every change.
    pub(crate) forward: Arc<dyn Forwarder>,
    /// Runs the requests other nodes forward here.
    pub(crate) forward_handler: Arc<dyn ForwardHandler>,
    /// The fleet's leaf sites and live nodes, for the check of a trigger
    /// on a queue placed at a site (`None` on a node on its own).
    pub(crate) fleet: Option<Arc<dyn mayfly_store::FleetLink>>,
    pub(crate) members: Arc<dyn mayfly_store::Membership>,
}

impl Deployments {
    /// Deployments over `parts`, with an empty catalog until
    /// [`Deployments::restore_all`].
    pub(crate) fn new(parts: DeploymentParts) -> Self {
        Self {
            parts,
            activities: Mutex::default(),
            changes: tokio::sync::Mutex::new(()),
            retrying: Mutex::default(),
        }
    }

    /// Builds the catalog from the store at start-up, compiling only the
    /// artifacts that are missing, so requests never compile.
    pub(crate) async fn restore_all(&self) -> anyhow::Result<()> {
        let records = self.parts.registry.functions().await?;
        let mut served = Vec::with_capacity(records.len());
        let mut remote = Vec::new();
        for record in records {
            if self.runs_here(&record.live.config.placement) {
                served.push(self.restore(record, None).await?);
            } else {
                remote.push(remote_function(
                    &record.name,
                    record.live.version,
                    &record.live.config,
                )?);
            }
        }
        self.parts
            .catalog
            .store(Arc::new(Catalog::of(served, remote)));
        self.count_functions();
        self.answer_forwards();
        Ok(())
    }

    /// Rebuilds a function's catalog entry from the store (every version an
    /// alias points at), compiling only the artifacts that are missing;
    /// entries of `prior` still in service keep their tier.
    pub(super) async fn restore(
        &self,
        record: FunctionRecord,
        prior: Option<&Served>,
    ) -> anyhow::Result<Arc<Served>> {
        let name = record.name.clone();
        let aliases = self.parts.registry.aliases(&name).await?;
        let mut in_service: Vec<u64> = aliases
            .iter()
            .flat_map(|a| std::iter::once(a.version).chain(a.canary.map(|c| c.version)))
            .collect();
        in_service.sort_unstable();
        in_service.dedup();
        // Versions are immutable: one already served has its artifact.
        in_service.retain(|version| prior.is_none_or(|prior| prior.version(*version).is_none()));
        for version in in_service {
            let stored = if version == record.live.version {
                Some(record.live.clone())
            } else {
                self.parts.registry.version(&name, version).await?
            };
            let stored = stored.with_context(|| {
                format!("an alias of {name} points at version {version}, which is missing")
            })?;
            self.parts
                .artifacts
                .ensure(&stored)
                .await
                .with_context(|| format!("cannot recompile function {name} v{version}"))?;
        }
        let config = &record.live.config;
        if let Err(error) = self
            .parts
            .admission
            .configure(&name, slot_limits(config, &self.parts.config.scaling))
        {
            // The node was restarted with less capacity: serve the function
            // without its reservation rather than not at all.
            tracing::warn!(function = %name, "reservation dropped: {error}");
            let mut unreserved = config.clone();
            unreserved.scaling.reserved_concurrency = 0;
            self.parts
                .admission
                .configure(&name, slot_limits(&unreserved, &self.parts.config.scaling))
                .map_err(|e| anyhow::anyhow!(e))?;
        }
        Ok(self.build_served(&name, prior).await?)
    }

    /// The function `name` as the store has it now: a [`Served`] with a
    /// [`Deployed`] entry per version its aliases point at. Entries of
    /// `prior` (the function as served until now) are reused for the
    /// versions still in service, so they keep their tier (no reload).
    pub(super) async fn build_served(
        &self,
        name: &str,
        prior: Option<&Served>,
    ) -> Result<Arc<Served>, PlatformError> {
        let registry = &self.parts.registry;
        let aliases = registry.aliases(name).await?;
        let versions = registry.versions(name).await?;
        let function = registry.function(name).await?;
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
                            key: self.parts.artifacts.key(&digest),
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
                        self.parts.rollouts.rollout(
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
        self.parts.rollouts.retain(name, &judged);
        let (live, live_version) = live.ok_or_else(|| PlatformError::NotFound(name.to_string()))?;
        let live_config = versions
            .iter()
            .find(|v| v.version == live_version)
            .map(|v| &v.config);
        let stored_routes = |routes: &[String]| {
            parse_routes(routes).map_err(|e| {
                PlatformError::Internal(anyhow::anyhow!("stored routes of {name} are invalid: {e}"))
            })
        };
        let (routes, stripped) = match live_config {
            Some(config) => (
                stored_routes(&config.routes)?,
                stored_routes(&config.strip_prefix)?,
            ),
            None => Default::default(),
        };
        Ok(Arc::new(Served {
            name: name.to_string(),
            routes,
            stripped,
            live,
            aliases: named,
            placement: live_config
                .map(|config| config.placement.clone())
                .unwrap_or_default(),
        }))
    }

    /// Puts `served` in the catalog in place of `prior`, then sends the
    /// versions no longer in service cold (running requests keep theirs).
    /// A function whose placement this node does not match goes in as a
    /// forwarded one instead (see [`Deployments::swap_in_remote`]).
    pub(super) fn swap_in(&self, served: Arc<Served>, prior: Option<&Served>) {
        if !self.runs_here(&served.placement) {
            let live = &served.live.deployed;
            let remote = RemoteFunction {
                name: served.name.clone(),
                version: live.version,
                placement: served.placement.clone(),
                routes: served.routes.clone(),
                stripped: served.stripped.clone(),
                forward_timeout: live.limits.timeout + FORWARD_MARGIN,
                max_request_bytes: live.limits.max_request_bytes,
            };
            self.swap_in_remote(Arc::new(remote));
            return;
        }
        let next = self.parts.catalog.load().with(served.clone());
        self.parts.catalog.store(Arc::new(next));
        if let Some(prior) = prior {
            for old in prior.versions() {
                if served.version(old.version).is_none() {
                    old.tier.unload();
                }
            }
        }
        self.answer_forwards();
    }

    /// Puts `remote` in the catalog: this node stops running the function
    /// (if it did) and forwards its requests from now on.
    /// One swap, so a request never finds the function in neither part.
    pub(super) fn swap_in_remote(&self, remote: Arc<RemoteFunction>) {
        let name = remote.name.clone();
        let current = self.parts.catalog.load();
        let removed = current.by_name.get(&name).cloned();
        let next = current.with_remote(remote);
        self.parts.catalog.store(Arc::new(next));
        if removed.is_some() {
            tracing::info!(
                function = %name,
                "placed on other nodes now: this node stops running it and forwards its requests"
            );
        }
        self.release(&name, removed);
    }

    /// Whether this node runs a function placed at `placement`: a fleet
    /// node when its labels hold every pair; a node on its own always (it
    /// is the only node there is, so a placement cannot choose another).
    pub(super) fn runs_here(&self, placement: &BTreeMap<String, String>) -> bool {
        self.parts.forward.node().is_none()
            || placement_matches(&self.parts.config.labels, placement)
    }

    /// Tells the forwarder which functions this node answers for: those
    /// it runs.
    fn answer_forwards(&self) {
        let functions = self.parts.catalog.load().by_name.keys().cloned().collect();
        self.parts
            .forward
            .answer(functions, self.parts.forward_handler.clone());
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
            self.parts.metrics.function(&name),
            self.parts.ledger.clone(),
        );
        let activity = self
            .activities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(Activity::new(
                    self.parts.config.scaling.keep_alive.as_ref(),
                    self.parts.started,
                ))
            })
            .clone();
        let caps = capabilities(&self.parts.services, &name, generation, version, config)
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
            limits: invocation_limits(config),
            scaling: config.scaling.clone(),
            meter: Arc::new(meter),
            tier,
            activity,
        })
    }

    /// Stops serving `name`: out of the catalog, admission and rollouts,
    /// its versions sent cold (running requests keep theirs).
    pub(super) fn forget(&self, name: &str) {
        let removed = self.parts.catalog.load().by_name.get(name).cloned();
        let next = self.parts.catalog.load().without(name);
        self.parts.catalog.store(Arc::new(next));
        self.release(name, removed);
    }

    /// Lets go of what running `name` here held, once the catalog no
    /// longer has it as run here (`removed`: its entry until then).
    fn release(&self, name: &str, removed: Option<Arc<Served>>) {
        self.parts.admission.remove(name);
        self.parts.rollouts.retain(name, &[]);
        if let Some(removed) = removed {
            for version in removed.versions() {
                version.tier.unload();
            }
        }
        self.parts.metrics.remove_function(name);
        self.count_functions();
        self.answer_forwards();
    }

    /// Sets the gauge of deployed functions.
    pub(super) fn count_functions(&self) {
        let count = self.parts.catalog.load().by_name.len();
        self.parts.metrics.node.functions.set(count as i64);
    }

    /// The function `name` as it is served now.
    pub(super) fn served(&self, name: &str) -> Result<Arc<Served>, PlatformError> {
        self.parts
            .catalog
            .load()
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| PlatformError::NotFound(name.to_string()))
    }

    /// The first of `routes` another function serves now, and its owner: a
    /// cheap early check (the store re-checks inside its transaction).
    pub(super) fn route_taken(&self, name: &str, routes: &[Route]) -> Option<(Route, String)> {
        let catalog = self.parts.catalog.load();
        routes.iter().find_map(|route| {
            catalog
                .routes
                .get_exact(route)
                .filter(|served| served.function.name != name)
                .map(|served| (route.clone(), served.function.name.clone()))
        })
    }

    /// Puts back the admission limits of the live version of `prior` (or
    /// removes the function's when there was none) after a change failed.
    pub(super) fn restore_admission(&self, name: &str, prior: Option<&Served>) {
        match prior {
            Some(prior) => {
                let live = &prior.live.deployed;
                let _ = self.parts.admission.configure(
                    name,
                    slot_limits_of(&live.scaling, &live.limits, &self.parts.config.scaling),
                );
            }
            None => self.parts.admission.remove(name),
        }
    }
}

/// The catalog entry of a function this node forwards, from its `live`
/// version's config.
pub(super) fn remote_function(
    name: &str,
    version: u64,
    config: &FunctionConfig,
) -> anyhow::Result<Arc<RemoteFunction>> {
    let routes = parse_routes(&config.routes)
        .map_err(|e| anyhow::anyhow!("stored routes of {name} are invalid: {e}"))?;
    let stripped = parse_routes(&config.strip_prefix)
        .map_err(|e| anyhow::anyhow!("stored routes of {name} are invalid: {e}"))?;
    Ok(Arc::new(RemoteFunction {
        name: name.to_string(),
        version,
        placement: config.placement.clone(),
        routes,
        stripped,
        forward_timeout: Duration::from_millis(config.limits.timeout_ms) + FORWARD_MARGIN,
        max_request_bytes: config.limits.max_request_bytes,
    }))
}

/// Admission limits for a function's configuration on this node.
pub(super) fn slot_limits(config: &FunctionConfig, node: &ScalingConfig) -> SlotLimits {
    slot_limits_of(&config.scaling, &invocation_limits(config), node)
}

/// Admission limits for a function's scaling and runtime limits.
pub(super) fn slot_limits_of(
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
fn invocation_limits(config: &FunctionConfig) -> InvocationLimits {
    let limits = &config.limits;
    InvocationLimits {
        memory_bytes: (limits.memory_mb as usize) << 20,
        timeout: Duration::from_millis(limits.timeout_ms),
        max_log_bytes: usize::try_from(limits.max_log_bytes).unwrap_or(usize::MAX),
        max_request_bytes: limits.max_request_bytes,
        max_response_bytes: limits.max_response_bytes,
        streaming_request: config.streaming_request,
    }
}
