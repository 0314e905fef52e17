//! Deploys and deletes: validate and compile before anything is stored,
//! then store the version and switch the catalog under the change lock.

use bytes::Bytes;
use mayfly_runtime::HandlerKind;
use mayfly_store::{
    BlobKind, Digest, Expected, FunctionConfig, FunctionRecord, LIVE_ALIAS, StoreError, Trigger,
    TriggerSource, TriggerSpec, VersionRecord, check_label,
};
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Why a WASI 0.3 component cannot be deployed with `reuse`.
const P3_REUSE_REFUSAL: &str = "kept instances (`reuse`) are not supported for \
     wasi:http/handler@0.3 (WASI 0.3) components yet: deploy it without reuse (a fresh \
     instance per request), or build it for wasi:http/proxy 0.2 \
     (`cargo build --target wasm32-wasip2` with the wasip2 crate) to keep instances";

use super::{Deployments, slot_limits};
use crate::capabilities::check_grants;
use crate::catalog::Artifact;
use crate::error::PlatformError;
use crate::routes::Route;
use crate::validate::{
    PlacedNode, check_queue_site, check_trigger, parse_routes, validate_limits, validate_name,
    validate_routes, validate_scaling,
};

/// What a deploy did.
#[derive(Debug, Clone, Serialize)]
pub struct DeployOutcome {
    /// The new version.
    #[serde(flatten)]
    pub version: VersionRecord,
    /// Whether the component was compiled (false: its artifact was cached).
    pub compiled: bool,
    /// Milliseconds this deploy spent compiling the component and storing
    /// its artifact, a wait for a busy compile slot included; 0 when
    /// nothing was compiled. Long for large components (tens of seconds
    /// for a 20 MB one), so clients show it.
    pub compile_ms: u64,
    /// Whether the upload was the live version's component and config
    /// again, so no version was created: `version` is the live one.
    pub unchanged: bool,
    /// What the deployer should know although the deploy worked (a
    /// placement no live node matches).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Deployments {
    /// Deploys `wasm` as a new version of `name` with `config` (routes as
    /// the user wrote them, and limits).
    ///
    /// Validation and compilation happen before anything is stored, so a
    /// rejected upload leaves the node exactly as it was. The compile is
    /// given up (stopped, its worker killed) once `gone` is cancelled: the
    /// uploader hung up. Later steps run to the end, so the store and
    /// catalog stay in step.
    pub(crate) async fn deploy_unless_gone(
        &self,
        name: &str,
        wasm: Bytes,
        config: FunctionConfig,
        triggers: Vec<TriggerSpec>,
        gone: &CancellationToken,
    ) -> Result<DeployOutcome, PlatformError> {
        validate_name(name)?;
        for spec in &triggers {
            check_trigger(name, spec)?;
            self.check_trigger_alias(name, spec)?;
        }
        validate_limits(
            &config.limits,
            self.parts.config.runtime.max_instance_memory,
        )
        .map_err(PlatformError::BadRequest)?;
        validate_scaling(&config.scaling, self.parts.config.scaling.max_concurrency)
            .map_err(PlatformError::BadRequest)?;
        check_grants(&config)?;
        // A secret exposed as a variable must exist now: an instance started
        // without it would only say so in its logs.
        for (variable, secret) in &config.env_secrets {
            if !self.parts.services.secrets.exists(secret).await? {
                return Err(PlatformError::BadRequest(format!(
                    "environment variable `{variable}` reads secret `{secret}`, which does not \
                     exist: set it first with `mayfly secret set {secret}`"
                )));
            }
        }
        // A granted model must exist now: a load-by-name would only fail
        // at run time.
        for model in &config.grants.models {
            if !self.parts.services.models.exists(model).await? {
                return Err(PlatformError::BadRequest(format!(
                    "model `{model}` is granted but does not exist: upload it first with \
                     `mayfly model put {model} FILE.onnx` (see `mayfly model list`)"
                )));
            }
        }
        if wasm.len() > self.parts.config.max_component_bytes {
            return Err(PlatformError::TooLarge(format!(
                "the component is {} bytes, over this node's limit of {} bytes; raise it with \
                 `mayfly serve --max-component-mb N`",
                wasm.len(),
                self.parts.config.max_component_bytes
            )));
        }
        for (key, value) in &config.placement {
            check_label(key, value).map_err(|error| {
                PlatformError::BadRequest(format!(
                    "placement: {error}; write it as --place key=value, e.g. --place site=fra1"
                ))
            })?;
        }
        for spec in &triggers {
            self.check_trigger_site(name, spec, &config.placement)
                .await?;
        }
        validate_routes(&config.routes).map_err(PlatformError::BadRequest)?;
        let routes = parse_routes(&config.routes).map_err(PlatformError::BadRequest)?;
        // So a conflicting deploy does not compile.
        if let Some((route, owner)) = self.route_taken(name, &routes) {
            return Err(PlatformError::Conflict(format!(
                "route `{route}` is already served by function `{owner}`"
            )));
        }

        let mut stripped = parse_routes(&config.strip_prefix).map_err(PlatformError::BadRequest)?;
        if let Some(stray) = stripped.iter().find(|route| !routes.contains(route)) {
            let served: Vec<String> = routes.iter().map(Route::to_string).collect();
            return Err(PlatformError::BadRequest(format!(
                "strip_prefix names `{stray}`, which is not one of the function's routes ({}): \
                 name a route it serves",
                if served.is_empty() {
                    "it has none".to_string()
                } else {
                    served.join(", ")
                }
            )));
        }
        // In route order, so the same settings give the same config.
        stripped.sort_by_key(|route| routes.iter().position(|r| r == route));
        let config = FunctionConfig {
            routes: routes.iter().map(Route::to_string).collect(),
            strip_prefix: stripped.iter().map(Route::to_string).collect(),
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
                let key = self.parts.artifacts.key(&digest);
                let mut healed = None;
                if !self.parts.artifacts.verified(&key).await? {
                    let started = Instant::now();
                    self.parts
                        .artifacts
                        .compile_and_store(wasm.clone(), &key)
                        .await?;
                    healed = Some(started.elapsed());
                }
                return self.keep_live(name, live, triggers, healed).await;
            }
        }
        let artifact = Artifact {
            key: self.parts.artifacts.key(&digest),
            component: digest.clone(),
        };
        let compiled = !self.parts.artifacts.verified(&artifact.key).await?;
        let compile_started = Instant::now();
        if compiled {
            tokio::select! {
                stored = self.parts.artifacts.compile_and_store(wasm.clone(), &artifact.key) => stored?,
                () = gone.cancelled() => {
                    tracing::info!(function = name, "deploy abandoned while compiling: its client went away");
                    return Err(PlatformError::BadRequest(
                        "the deploy was abandoned: its client went away while it compiled".into(),
                    ));
                }
            }
        }
        let compile_ms = if compiled {
            millis(compile_started.elapsed())
        } else {
            0
        };
        // Load once to prove the artifact works on this engine, then let it
        // go: a deployed function stays cold (on disk) until its first
        // request, so thousands of idle functions cost no memory, and
        // loading takes well under a millisecond when it is called.
        let loaded = self
            .parts
            .artifacts
            .load_verified(&artifact.key, config.scaling.reuse)
            .await?;
        if config.scaling.reuse && loaded.handler_kind() == HandlerKind::P3 {
            return Err(PlatformError::BadRequest(P3_REUSE_REFUSAL.into()));
        }
        drop(loaded);

        let _change = self.changes.lock().await;
        // An identical deploy may have landed while this one compiled.
        if let Some(live) = self.unchanged_live(name, &digest, &config).await? {
            let compiled = compiled.then(|| compile_started.elapsed());
            return self.keep_live(name, live, triggers, compiled).await;
        }
        // Checked under the change lock, so no other deploy can take the
        // reservation between this check and the store write.
        let previous = self.parts.catalog.load().by_name.get(name).cloned();
        let slots = slot_limits(&config, &self.parts.config.scaling);
        self.parts
            .admission
            .configure(name, slots)
            .map_err(PlatformError::BadRequest)?;
        let version = match self.store_version(name, &wasm, &digest, &config).await {
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
            self.parts.events.add_trigger(name, spec).await?;
        }
        self.parts.workers.sync();
        tracing::info!(
            function = name,
            version = version.version,
            compiled,
            compile_ms,
            "deployed"
        );
        Ok(DeployOutcome {
            version,
            compiled,
            compile_ms,
            unchanged: false,
            warnings: Vec::new(),
        })
    }

    /// Stores the component and records it as the new live version of
    /// `name`. The store refuses the version if `live` moved since it was
    /// read here (another node deployed meanwhile).
    async fn store_version(
        &self,
        name: &str,
        wasm: &[u8],
        digest: &Digest,
        config: &FunctionConfig,
    ) -> Result<VersionRecord, StoreError> {
        self.parts.blobs.put(BlobKind::Component, wasm).await?;
        let registry = &self.parts.registry;
        let live = registry.function(name).await?.map(|f| f.live.version);
        registry
            .create_version(name, digest, config, Expected::seen(live))
            .await
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
        let catalog = self.parts.catalog.load();
        let serving = catalog
            .by_name
            .get(name)
            .map(|f| f.live.deployed.version)
            .or_else(|| catalog.remote.get(name).map(|f| f.version));
        drop(catalog);
        let Some(serving) = serving else {
            return Ok(None);
        };
        let record = self.parts.registry.function(name).await?;
        let digest = digest.to_string();
        Ok(record.map(|record| record.live).filter(|live| {
            live.version == serving && live.digest == digest && live.config == *config
        }))
    }

    /// Answers a deploy that changes nothing with the live version; its
    /// triggers are still attached (an identical one is not attached twice).
    /// `compiled`: how long this deploy compiled the component anyway (a
    /// damaged artifact healed, or a compile that raced an identical
    /// deploy). Called under the change lock.
    async fn keep_live(
        &self,
        name: &str,
        live: VersionRecord,
        triggers: Vec<TriggerSpec>,
        compiled: Option<Duration>,
    ) -> Result<DeployOutcome, PlatformError> {
        if !triggers.is_empty() {
            for spec in triggers {
                self.parts.events.add_trigger(name, spec).await?;
            }
            self.parts.workers.sync();
        }
        tracing::info!(function = name, version = live.version, "deploy unchanged");
        Ok(DeployOutcome {
            version: live,
            compiled: compiled.is_some(),
            compile_ms: compiled.map_or(0, millis),
            unchanged: true,
            warnings: Vec::new(),
        })
    }

    /// Deletes the versions of `name` beyond the node's retention that no
    /// alias points at. A failure is logged: the deploy itself succeeded.
    async fn retain_versions(&self, name: &str) {
        let keep = self.parts.config.keep_versions.max(1);
        match self.parts.registry.prune_versions(name, keep).await {
            Ok(pruned) if !pruned.is_empty() => {
                tracing::info!(function = name, ?pruned, "old versions deleted (retention)");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(function = name, "retention failed: {error}"),
        }
    }

    /// Deletes a function: its routes stop serving at once.
    pub(crate) async fn delete(&self, name: &str) -> Result<(), PlatformError> {
        let _change = self.changes.lock().await;
        let existed = self.parts.registry.delete_function(name).await?;
        if !existed {
            return Err(PlatformError::NotFound(name.to_string()));
        }
        self.forget(name);
        self.parts.events.remove_function(name).await?;
        self.parts.workers.sync();
        tracing::info!(function = name, "deleted");
        Ok(())
    }

    /// Every function with its live version.
    pub(crate) async fn functions(&self) -> Result<Vec<FunctionRecord>, PlatformError> {
        Ok(self.parts.registry.functions().await?)
    }

    /// One function and all its versions, newest first.
    pub(crate) async fn function(
        &self,
        name: &str,
    ) -> Result<(FunctionRecord, Vec<VersionRecord>), PlatformError> {
        let record = self.parts.registry.function(name).await?;
        let versions = self.parts.registry.versions(name).await?;
        let record = record.ok_or_else(|| PlatformError::NotFound(name.to_string()))?;
        Ok((record, versions))
    }

    /// Attaches a trigger to a deployed function.
    pub(crate) async fn add_trigger(
        &self,
        function: &str,
        spec: TriggerSpec,
    ) -> Result<(Trigger, bool), PlatformError> {
        // Under the change lock, so a delete cannot slip in between the
        // check and the write and leave a trigger without its function.
        let _change = self.changes.lock().await;
        // A function placed on other nodes gets its triggers too: they
        // fire there.
        if !self.parts.catalog.load().knows(function) {
            return Err(PlatformError::NotFound(function.to_string()));
        }
        self.check_trigger_alias(function, &spec)?;
        let placement = {
            let catalog = self.parts.catalog.load();
            catalog
                .by_name
                .get(function)
                .map(|served| served.placement.clone())
                .or_else(|| catalog.remote.get(function).map(|f| f.placement.clone()))
                .unwrap_or_default()
        };
        self.check_trigger_site(function, &spec, &placement).await?;
        let added = self.parts.events.add_trigger(function, spec).await?;
        self.parts.workers.sync();
        Ok(added)
    }

    /// Detaches trigger `id` and stops its worker, if it had one.
    pub(crate) async fn remove_trigger(&self, id: i64) -> Result<(), PlatformError> {
        self.parts.events.remove_trigger(id).await?;
        self.parts.workers.sync();
        Ok(())
    }

    /// Refuses a trigger on a queue placed at a leaf site (`<name>@<site>`)
    /// unless the function's `placement` keeps it within that site's live
    /// nodes ([`check_queue_site`]). A node on its own has one store and
    /// runs everything: nothing to check.
    async fn check_trigger_site(
        &self,
        name: &str,
        spec: &TriggerSpec,
        placement: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), PlatformError> {
        let TriggerSource::Queue { queue, .. } = &spec.source else {
            return Ok(());
        };
        let (Some((_, site)), Some(fleet)) = (queue.rsplit_once('@'), &self.parts.fleet) else {
            return Ok(());
        };
        let sites = fleet.sites().await?;
        let members = self.parts.members.members().await?;
        let nodes: Vec<PlacedNode<'_>> = members
            .iter()
            .map(|member| PlacedNode {
                name: &member.name,
                site: sites
                    .iter()
                    .find(|record| record.node.name == member.name)
                    .map(|record| record.site.as_str()),
                labels: &member.labels,
            })
            .collect();
        check_queue_site(name, placement, queue, site, &nodes)
    }

    /// Refuses a trigger aimed at an alias the function does not have.
    fn check_trigger_alias(&self, name: &str, spec: &TriggerSpec) -> Result<(), PlatformError> {
        let Some(alias) = spec.alias.as_deref().filter(|a| *a != LIVE_ALIAS) else {
            return Ok(());
        };
        let catalog = self.parts.catalog.load();
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
}

/// Whole milliseconds of `duration`, for an API field.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
