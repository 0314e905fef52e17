//! Compiled artifacts: each version's component compiled for this engine,
//! kept on disk under its digest and the engine's fingerprint, verified
//! before it is loaded, and compiled again from the stored component when
//! it is missing or damaged.

use std::sync::Arc;

use bytes::Bytes;
use mayfly_runtime::{Compiler, Function, Runtime};
use mayfly_store::{BlobKind, BlobStore, Digest, VersionRecord};

use crate::catalog::Artifact;
use crate::error::{PlatformError, blocking};
use crate::metering::NodeMetrics;

/// Compiles, verifies and loads artifacts.
pub(crate) struct Artifacts {
    runtime: Arc<Runtime>,
    blobs: Arc<dyn BlobStore>,
    compiler: Arc<Compiler>,
    metrics: NodeMetrics,
}

impl Artifacts {
    /// Artifacts of `runtime`'s engine in `blobs`, compiled by `compiler`.
    pub(crate) fn new(
        runtime: Arc<Runtime>,
        blobs: Arc<dyn BlobStore>,
        compiler: Arc<Compiler>,
        metrics: NodeMetrics,
    ) -> Self {
        Self {
            runtime,
            blobs,
            compiler,
            metrics,
        }
    }

    pub(crate) fn key(&self, digest: &Digest) -> Digest {
        Digest::derive(&[digest.hex(), self.runtime.fingerprint()])
    }

    /// Whether the artifact is on disk with its checksum (not hashed:
    /// see [`Artifacts::verified`]); counts a cache hit when it is.
    pub(crate) async fn cached(&self, artifact: &Digest) -> bool {
        let cached = self.blobs.has_checked(BlobKind::Artifact, artifact).await;
        if cached {
            self.metrics.artifact_cache_hits.inc();
        }
        cached
    }

    /// Whether the artifact under `key` is on disk and its bytes match its
    /// checksum (hashed once per file state, see
    /// [`BlobStore::verified_path`]); counts a cache hit when it is. A
    /// damaged one is reported and counted, for the caller to recompile.
    pub(crate) async fn verified(&self, key: &Digest) -> Result<bool, PlatformError> {
        match self
            .blobs
            .verified_path(BlobKind::Artifact, key)
            .await
            .map_err(PlatformError::from)
        {
            Ok(Some(_)) => {
                self.metrics.artifact_cache_hits.inc();
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(PlatformError::Internal(error)) => {
                tracing::error!(
                    artifact = %key,
                    "compiled artifact damaged, compiling it again from its component: {error:#}"
                );
                self.metrics.artifact_recompiles.inc();
                Ok(false)
            }
            Err(other) => Err(other),
        }
    }

    /// Makes sure the compiled artifact of `version` is on disk with its
    /// checksum, compiling its stored component if not (a changed engine,
    /// a lost file, an artifact of a node that wrote no checksums). Cheap
    /// when it is there: its bytes are verified when it is loaded.
    pub(crate) async fn ensure(&self, version: &VersionRecord) -> Result<(), PlatformError> {
        let digest = Digest::parse(&version.digest)?;
        let artifact = self.key(&digest);
        if self.cached(&artifact).await {
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
        let wasm = self
            .blobs
            .get(BlobKind::Component, &artifact.component)
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

    /// Compiles `wasm` off the async runtime and stores its artifact.
    pub(crate) async fn compile_and_store(
        &self,
        wasm: Bytes,
        artifact: &Digest,
    ) -> Result<(), PlatformError> {
        let compiled = self.compiler.compile(&self.runtime, wasm).await?;
        self.metrics.compilations.inc();
        self.blobs
            .put_checked(BlobKind::Artifact, artifact, &compiled.artifact)
            .await?;
        Ok(())
    }

    /// Loads a function's artifact. One that is missing, damaged (its
    /// bytes do not match their checksum) or that the engine refuses is
    /// compiled again from the stored component, once, and loaded: damaged
    /// code is never run (it could crash the whole node), and the function
    /// serves again without an operator.
    pub(crate) async fn load(
        &self,
        artifact: &Artifact,
        reuse: bool,
    ) -> Result<Function, PlatformError> {
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
                self.metrics.artifact_recompiles.inc();
            }
        }
        self.recompile(artifact).await?;
        self.load_verified(&artifact.key, reuse).await
    }

    /// Loads the artifact under `key` if its bytes match their checksum;
    /// fails (without loading anything) if it is missing or damaged.
    pub(crate) async fn load_verified(
        &self,
        key: &Digest,
        reuse: bool,
    ) -> Result<Function, PlatformError> {
        let path = self
            .blobs
            .verified_path(BlobKind::Artifact, key)
            .await?
            .ok_or_else(|| PlatformError::Internal(anyhow::anyhow!("artifact {key} is missing")))?;
        // Loading maps the file and checks the code: the node's own
        // blocking work, off the async workers.
        let runtime = self.runtime.clone();
        blocking(move || runtime.load_artifact(&path, reuse)).await
    }
}
