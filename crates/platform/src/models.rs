//! Models for wasi:nn as first-class objects: uploaded once by name
//! (`mayfly model put NAME FILE.onnx`), checked by parsing them at upload,
//! stored content-addressed in the blob store, versioned, and granted to
//! functions by name. The runtime's [`NnHost`] loads them through
//! [`Models`]'s [`ModelSource`] and caches them parsed, per digest.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use mayfly_runtime::{ModelSource, NnHost, NnLimits, OnnxModel};
use mayfly_store::{BlobKind, BlobStore, Digest, EmbeddedModels, ModelRecord};

use crate::error::PlatformError;
use crate::validate::check_name;

/// Largest model accepted by `model put`, in bytes.
pub const MAX_MODEL_BYTES: usize = 256 << 20;

/// The node's models: the name table, their blobs, and the wasi:nn host
/// that runs them.
pub struct Models {
    /// The name table and the blobs, shared with the wasi:nn host.
    source: Arc<Source>,
    nn: Arc<NnHost>,
}

impl Models {
    /// Opens `<data_dir>/models.db` over the node's blob store.
    pub(crate) fn open(
        data_dir: &Path,
        blobs: Arc<dyn BlobStore>,
        limits: NnLimits,
    ) -> anyhow::Result<Arc<Self>> {
        let db = EmbeddedModels::open(&data_dir.join("models.db"))?;
        let source = Arc::new(Source {
            db,
            blobs,
            names: Mutex::default(),
        });
        Ok(Arc::new(Self {
            nn: NnHost::new(source.clone(), limits),
            source,
        }))
    }

    /// The wasi:nn host every function's capabilities share.
    pub fn nn(&self) -> &Arc<NnHost> {
        &self.nn
    }

    /// Stores `bytes` as the next version of model `name`, once they parse
    /// as an ONNX model tract can run.
    pub async fn put(&self, name: &str, bytes: bytes::Bytes) -> Result<ModelRecord, PlatformError> {
        check_name("model", name)?;
        if bytes.is_empty() {
            return Err(PlatformError::BadRequest(
                "the upload is empty: send the .onnx file's bytes".into(),
            ));
        }
        if bytes.len() > MAX_MODEL_BYTES {
            return Err(PlatformError::TooLarge(format!(
                "the model is {} bytes, over the limit of {MAX_MODEL_BYTES} bytes",
                bytes.len()
            )));
        }
        let parse = bytes.clone();
        // Planned for any shape too, so that a model tract parses but cannot
        // run is refused here rather than at a function's first inference.
        let parsed = tokio::task::spawn_blocking(move || {
            OnnxModel::parse(&parse).and_then(|model| model.check().map(|()| model))
        })
        .await
        .map_err(|e| PlatformError::Internal(anyhow::anyhow!("the model check failed: {e}")))?
        .map_err(|e| {
            PlatformError::BadRequest(format!(
                "model `{name}` is refused: {e}; upload an ONNX file (.onnx) whose \
                     operators tract supports"
            ))
        })?;
        let digest = self.source.blobs.put(BlobKind::Model, &bytes).await?;
        let stored = self
            .source
            .db
            .put(ModelRecord {
                name: name.to_string(),
                version: 0,
                digest: digest.to_string(),
                size: bytes.len() as u64,
                inputs: parsed.inputs().to_vec(),
                outputs: parsed.outputs().to_vec(),
                created_at_ms: 0,
                updated_at_ms: 0,
            })
            .await;
        // Forgotten even when the write failed: it may have landed.
        self.source.forget(name);
        Ok(stored?)
    }

    /// Every model, by name.
    pub async fn list(&self) -> Result<Vec<ModelRecord>, PlatformError> {
        Ok(self.source.db.list().await?)
    }

    /// Whether model `name` exists.
    pub async fn exists(&self, name: &str) -> Result<bool, PlatformError> {
        Ok(self.source.db.get(name).await?.is_some())
    }

    /// Deletes model `name` (the caller checked that no function is
    /// granted it); its parsed graph leaves the cache.
    pub async fn delete(&self, name: &str) -> Result<Option<ModelRecord>, PlatformError> {
        let deleted = self.source.db.delete(name).await;
        self.source.forget(name);
        let deleted = deleted?;
        if let Some(record) = &deleted
            && let Ok(digest) = Digest::parse(&record.digest)
        {
            self.nn.evict(digest.hex());
        }
        Ok(deleted)
    }
}

/// What the wasi:nn host loads models through.
struct Source {
    db: EmbeddedModels,
    blobs: Arc<dyn BlobStore>,
    /// Digests of the names looked up, so a `load-by-name` per request
    /// costs no database read. Only [`Models`] writes the table, and it
    /// forgets a name as it writes it.
    names: Mutex<NameCache>,
}

#[derive(Default)]
struct NameCache {
    digests: HashMap<String, String>,
    /// Bumped by every [`Source::forget`]: a lookup that started before
    /// one may have read the old record, and must not cache it.
    generation: u64,
}

impl Source {
    fn names(&self) -> std::sync::MutexGuard<'_, NameCache> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops what is cached for `name`, which is being written.
    fn forget(&self, name: &str) {
        let mut names = self.names();
        names.generation += 1;
        names.digests.remove(name);
    }
}

#[async_trait::async_trait]
impl ModelSource for Source {
    async fn digest(&self, name: &str) -> Result<Option<String>, String> {
        let generation = {
            let names = self.names();
            if let Some(digest) = names.digests.get(name) {
                return Ok(Some(digest.clone()));
            }
            names.generation
        };
        let record = self.db.get(name).await.map_err(|e| e.to_string())?;
        let Some(record) = record else {
            return Ok(None);
        };
        let digest = Digest::parse(&record.digest)
            .map(|d| d.hex().to_string())
            .map_err(|e| e.to_string())?;
        let mut names = self.names();
        if names.generation == generation {
            names.digests.insert(name.to_string(), digest.clone());
        }
        Ok(Some(digest))
    }

    async fn bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, String> {
        let digest = Digest::parse(digest).map_err(|e| e.to_string())?;
        self.blobs
            .get(BlobKind::Model, &digest)
            .await
            .map_err(|e| e.to_string())
    }
}
