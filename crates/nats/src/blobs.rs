//! [`BlobStore`] for the fleet: uploaded components shared by every node
//! through the JetStream object store `<ns>_blobs`, in front of which each
//! node keeps its own [`BlobDir`] as a cache; everything else stays on the
//! node.

use std::io::Write as _;
use std::path::PathBuf;

use async_nats::jetstream::object_store::{self, GetErrorKind, InfoErrorKind, ObjectStore};
use async_nats::jetstream::{self, stream::StorageType};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use mayfly_store::{BlobDir, BlobKind, BlobStore, Digest, Result, StoreError};
use tokio::io::AsyncReadExt as _;

use crate::{Fleet, backend};

/// Bytes read from the object store per write to the cache file: the
/// object store's own chunk size, so one chunk is in memory at a time.
const DOWNLOAD_PIECE: usize = 128 * 1024;

/// Components in the fleet's object store, cached in the node's
/// [`BlobDir`]; artifacts and object bytes in the [`BlobDir`] alone.
///
/// Which kinds are shared, and why:
/// - [`BlobKind::Component`]: shared. A component is what a deploy
///   uploaded, the same bytes on every node, so any node can load any
///   function. It is content-addressed (`component/<sha256 hex>`) and never
///   changes, so a cached copy never goes stale.
/// - [`BlobKind::Artifact`]: local. Compiled code is per node: its key
///   includes the engine's fingerprint, and loading it from the bus would
///   make each node run native code that any writer of the bucket produced
///   (docs/fleet-design.md §4, "BlobStore").
/// - [`BlobKind::Object`]: local. Object bytes belong to the event store,
///   which in this back-end is still the node's own (SQLite beside this
///   same [`BlobDir`]); they move to `object/<sha256>` with it.
#[derive(Clone)]
pub struct NatsBlobs {
    local: BlobDir,
    objects: ObjectStore,
}

impl NatsBlobs {
    /// Opens (creating if needed) the fleet's object store, with `replicas`
    /// copies on creation, in front of the node's blob cache `local`.
    pub async fn open(fleet: &Fleet, local: BlobDir, replicas: usize) -> Result<Self> {
        let bucket = fleet.name("blobs");
        let js = fleet.jetstream();
        let objects = match js.get_object_store(&bucket).await {
            Ok(objects) => objects,
            Err(_) => create_object_store(js, &bucket, replicas).await?,
        };
        Ok(Self { local, objects })
    }

    /// The object holding the component `key`.
    fn object_name(key: &Digest) -> String {
        format!("component/{}", key.hex())
    }

    /// The digest the object store records for component `key`'s bytes
    /// (`SHA-256=<base64url>`, computed by the uploader as it sends them).
    fn object_digest(key: &Digest) -> Result<String> {
        let raw = hex::decode(key.hex())
            .map_err(|e| StoreError::Corrupt(format!("{key} is not hex: {e}")))?;
        Ok(format!("SHA-256={}", URL_SAFE.encode(raw)))
    }

    /// Uploads component `key`, whose bytes are `bytes`, unless the fleet
    /// has it.
    async fn upload(&self, key: &Digest, bytes: &[u8]) -> Result<()> {
        let name = Self::object_name(key);
        let digest = Self::object_digest(key)?;
        match self.objects.info(&name).await {
            // A deleted object keeps its info, flagged: upload it again.
            Ok(info) if info.deleted => {}
            Ok(info) if info.digest.as_ref() == Some(&digest) => return Ok(()),
            Ok(_) => {
                // Someone stored other bytes under this name: this put
                // heals the fleet's copy.
                tracing::warn!(component = %key, "the fleet's copy is damaged; uploading it again");
            }
            Err(e) if e.kind() == InfoErrorKind::NotFound => {}
            Err(e) => return Err(backend(e)),
        }
        // From the caller's bytes, not the cached file: those were just
        // hashed into `key`, while a damaged cached copy (`put` keeps an
        // existing file) would poison every node. Read a chunk at a time
        // (the slice is an `AsyncRead`), so no second copy is made.
        let mut reader = bytes;
        let info = self
            .objects
            .put(name.as_str(), &mut reader)
            .await
            .map_err(backend)?;
        if info.digest.as_ref() != Some(&digest) {
            return Err(StoreError::Corrupt(format!(
                "uploaded {key}, but the object store recorded digest {:?}",
                info.digest
            )));
        }
        Ok(())
    }

    /// Downloads component `key` into the cache; false if the fleet does
    /// not have it. The bytes are written to a temporary file as they
    /// arrive and only committed under `key` once their SHA-256 is `key`.
    async fn download(&self, key: &Digest) -> Result<bool> {
        let name = Self::object_name(key);
        let mut object = match self.objects.get(&name).await {
            Ok(object) => object,
            Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(backend(e)),
        };
        // The uploader's digest tells before any byte is fetched; the
        // bytes are checked against `key` anyway (the digest is only what
        // the uploader claimed).
        if object.info().digest != Some(Self::object_digest(key)?) {
            return Err(StoreError::Corrupt(format!(
                "object {name} in the fleet has digest {:?}, not {key}",
                object.info().digest
            )));
        }
        let mut writer = Some(self.local.writer(BlobKind::Component)?);
        let mut piece = Vec::with_capacity(DOWNLOAD_PIECE);
        loop {
            piece.clear();
            let read = (&mut object)
                .take(DOWNLOAD_PIECE as u64)
                .read_to_end(&mut piece)
                .await
                .map_err(|e| match e.kind() {
                    // The object store's own digest check at the end.
                    std::io::ErrorKind::InvalidData => {
                        StoreError::Corrupt(format!("object {name} in the fleet: {e}"))
                    }
                    _ => backend(e),
                })?;
            if read == 0 {
                break;
            }
            let bytes = std::mem::take(&mut piece);
            let mut w = writer
                .take()
                .ok_or_else(|| StoreError::Backend("the download's cache file is gone".into()))?;
            // File writes block: off the async workers.
            let (w, bytes) = blocking(move || {
                w.write_all(&bytes)?;
                Ok((w, bytes))
            })
            .await?;
            writer = Some(w);
            piece = bytes;
        }
        let writer = writer
            .ok_or_else(|| StoreError::Backend("the download's cache file is gone".into()))?;
        let local = self.local.clone();
        let key = key.clone();
        blocking(move || {
            let mut staged = writer.finish()?;
            if staged.digest() != &key {
                // Dropped uncommitted: the temporary file goes.
                return Err(StoreError::Corrupt(format!(
                    "object {name} in the fleet holds bytes with digest {}, not {key}",
                    staged.digest()
                )));
            }
            local.commit(&mut staged)
        })
        .await?;
        Ok(true)
    }

    /// The cached bytes of component `key`, downloading them on a miss. A
    /// cached copy whose digest is not `key` (damaged on disk) is dropped
    /// and fetched again.
    async fn component(&self, key: &Digest) -> Result<Option<Vec<u8>>> {
        if let Some(bytes) = self.local.get(BlobKind::Component, key).await? {
            if &Digest::of(&bytes) == key {
                return Ok(Some(bytes));
            }
            tracing::warn!(component = %key, "the cached copy is damaged; fetching it again");
            let (local, key) = (self.local.clone(), key.clone());
            blocking(move || local.remove(BlobKind::Component, &key)).await?;
        }
        if !self.download(key).await? {
            return Ok(None);
        }
        self.local.get(BlobKind::Component, key).await
    }
}

/// Creates the object store; another node creating it at the same moment
/// is not an error (its store is used).
async fn create_object_store(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<ObjectStore> {
    let created = js
        .create_object_store(object_store::Config {
            bucket: bucket.to_string(),
            description: Some("Mayfly: uploaded components, content-addressed".into()),
            storage: StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(objects) => Ok(objects),
        Err(error) => js
            .get_object_store(bucket)
            .await
            .map_err(|_| backend(error)),
    }
}

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(backend)?
}

#[async_trait::async_trait]
impl BlobStore for NatsBlobs {
    async fn put(&self, kind: BlobKind, bytes: &[u8]) -> Result<Digest> {
        let digest = self.local.put(kind, bytes).await?;
        if kind == BlobKind::Component {
            // Durable means in the fleet: a deploy must not return before
            // every node can load what it deployed.
            self.upload(&digest, bytes).await?;
        }
        Ok(digest)
    }

    async fn put_keyed(&self, kind: BlobKind, key: &Digest, bytes: &[u8]) -> Result<()> {
        // A caller-derived key is not the bytes' digest, so it has no place
        // in the content-addressed fleet store: node-local.
        self.local.put_keyed(kind, key, bytes).await
    }

    async fn get(&self, kind: BlobKind, key: &Digest) -> Result<Option<Vec<u8>>> {
        match kind {
            BlobKind::Component => self.component(key).await,
            BlobKind::Artifact | BlobKind::Object | BlobKind::Model => {
                self.local.get(kind, key).await
            }
        }
    }

    async fn local_path(&self, kind: BlobKind, key: &Digest) -> Option<PathBuf> {
        if let Some(path) = self.local.local_path(kind, key).await {
            return Some(path);
        }
        if kind != BlobKind::Component {
            return None;
        }
        match self.download(key).await {
            Ok(true) => self.local.local_path(kind, key).await,
            Ok(false) => None,
            Err(error) => {
                // The contract has no error here: absent, and why in the log.
                tracing::warn!(component = %key, "cannot fetch the component: {error}");
                None
            }
        }
    }

    // Checked blobs are compiled artifacts: per node (see [`NatsBlobs`]).

    async fn put_checked(&self, kind: BlobKind, key: &Digest, bytes: &[u8]) -> Result<()> {
        self.local.put_checked(kind, key, bytes).await
    }

    async fn has_checked(&self, kind: BlobKind, key: &Digest) -> bool {
        self.local.has_checked(kind, key).await
    }

    async fn verified_path(&self, kind: BlobKind, key: &Digest) -> Result<Option<PathBuf>> {
        self.local.verified_path(kind, key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::NatsServers;

    /// One node: its own connection and data directory.
    struct Node {
        fleet: Fleet,
        blobs: NatsBlobs,
        dir: tempfile::TempDir,
    }

    async fn node(servers: &NatsServers, name: &str, namespace: &str) -> Node {
        let fleet = Fleet::connect(&servers.options(name, namespace))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let local = BlobDir::open(dir.path().join("blobs")).unwrap();
        let blobs = NatsBlobs::open(&fleet, local, fleet.replicas())
            .await
            .unwrap();
        Node { fleet, blobs, dir }
    }

    /// Bytes larger than one object-store chunk and one download piece,
    /// not all alike.
    fn component_bytes() -> Vec<u8> {
        (0..3 * DOWNLOAD_PIECE + 17)
            .map(|i| (i % 251) as u8)
            .collect()
    }

    #[tokio::test]
    async fn a_component_put_on_one_node_is_read_on_another() {
        let servers = NatsServers::single();
        let a = node(&servers, "a", "blobs1").await;
        let b = node(&servers, "b", "blobs1").await;
        let wasm = component_bytes();
        let digest = a.blobs.put(BlobKind::Component, &wasm).await.unwrap();
        assert_eq!(digest, Digest::of(&wasm));
        // Again: already in the fleet, nothing uploaded twice.
        assert_eq!(
            a.blobs.put(BlobKind::Component, &wasm).await.unwrap(),
            digest
        );

        assert_eq!(
            b.blobs.get(BlobKind::Component, &digest).await.unwrap(),
            Some(wasm.clone())
        );
        // Cached by the read: B's own folder holds it now.
        let cached = b.dir.path().join("blobs/components").join(digest.hex());
        assert_eq!(std::fs::read(&cached).unwrap(), wasm);

        // `local_path` downloads on a miss too (node C, empty cache).
        let c = node(&servers, "c", "blobs1").await;
        let path = c
            .blobs
            .local_path(BlobKind::Component, &digest)
            .await
            .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), wasm);

        // Unknown to the fleet: absent, not an error.
        let unknown = Digest::of(b"never uploaded");
        assert_eq!(
            b.blobs.get(BlobKind::Component, &unknown).await.unwrap(),
            None
        );
        assert_eq!(
            b.blobs.local_path(BlobKind::Component, &unknown).await,
            None
        );
        drop(a.fleet);
    }

    #[tokio::test]
    async fn a_deleted_object_is_uploaded_again() {
        let servers = NatsServers::single();
        let a = node(&servers, "a", "blobs2").await;
        let b = node(&servers, "b", "blobs2").await;
        let digest = a.blobs.put(BlobKind::Component, b"wasm").await.unwrap();
        let name = NatsBlobs::object_name(&digest);
        a.blobs.objects.delete(&name).await.unwrap();
        // Measured: `info` still answers, with `deleted` set.
        assert!(a.blobs.objects.info(&name).await.unwrap().deleted);
        assert_eq!(
            b.blobs.get(BlobKind::Component, &digest).await.unwrap(),
            None
        );
        a.blobs.put(BlobKind::Component, b"wasm").await.unwrap();
        assert_eq!(
            b.blobs.get(BlobKind::Component, &digest).await.unwrap(),
            Some(b"wasm".to_vec())
        );
    }

    #[tokio::test]
    async fn damage_is_detected_in_the_cache_and_in_the_fleet() {
        let servers = NatsServers::single();
        let a = node(&servers, "a", "blobs3").await;
        let b = node(&servers, "b", "blobs3").await;
        let wasm = component_bytes();
        let digest = a.blobs.put(BlobKind::Component, &wasm).await.unwrap();

        // A damaged cached copy is dropped and fetched again.
        let cached = a.dir.path().join("blobs/components").join(digest.hex());
        std::fs::write(&cached, b"damaged").unwrap();
        assert_eq!(
            a.blobs.get(BlobKind::Component, &digest).await.unwrap(),
            Some(wasm.clone())
        );
        assert_eq!(std::fs::read(&cached).unwrap(), wasm);

        // An object in the fleet whose bytes are not its name's digest is
        // refused, and nothing is cached.
        let claimed = Digest::of(b"what the name says");
        a.blobs
            .objects
            .put(
                NatsBlobs::object_name(&claimed).as_str(),
                &mut &b"other bytes"[..],
            )
            .await
            .unwrap();
        let error = b
            .blobs
            .get(BlobKind::Component, &claimed)
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::Corrupt(_)), "{error}");
        assert_eq!(
            b.blobs.local_path(BlobKind::Component, &claimed).await,
            None
        );
        let folder = b.dir.path().join("blobs/components");
        assert_eq!(
            std::fs::read_dir(&folder).unwrap().count(),
            0,
            "no temp file left"
        );

        // A damaged cached copy never reaches the fleet: the upload is of
        // the bytes put.
        let fresh = a
            .blobs
            .local
            .put(BlobKind::Component, b"fresh")
            .await
            .unwrap();
        let cached = a.dir.path().join("blobs/components").join(fresh.hex());
        std::fs::write(&cached, b"frash").unwrap();
        a.blobs.put(BlobKind::Component, b"fresh").await.unwrap();
        assert_eq!(
            b.blobs.get(BlobKind::Component, &fresh).await.unwrap(),
            Some(b"fresh".to_vec())
        );

        // Putting the real bytes heals the fleet's copy.
        let healed = a
            .blobs
            .put(BlobKind::Component, b"what the name says")
            .await
            .unwrap();
        assert_eq!(healed, claimed);
        assert_eq!(
            b.blobs.get(BlobKind::Component, &claimed).await.unwrap(),
            Some(b"what the name says".to_vec())
        );
    }

    #[tokio::test]
    async fn artifacts_and_objects_stay_on_their_node() {
        let servers = NatsServers::single();
        let a = node(&servers, "a", "blobs4").await;
        let b = node(&servers, "b", "blobs4").await;
        let key = Digest::derive(&["component", "engine fingerprint"]);
        a.blobs
            .put_checked(BlobKind::Artifact, &key, b"native code")
            .await
            .unwrap();
        assert!(a.blobs.has_checked(BlobKind::Artifact, &key).await);
        assert!(
            a.blobs
                .verified_path(BlobKind::Artifact, &key)
                .await
                .unwrap()
                .is_some()
        );
        assert!(!b.blobs.has_checked(BlobKind::Artifact, &key).await);
        assert!(
            b.blobs
                .verified_path(BlobKind::Artifact, &key)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(b.blobs.get(BlobKind::Artifact, &key).await.unwrap(), None);
        assert_eq!(b.blobs.local_path(BlobKind::Artifact, &key).await, None);

        let object = a
            .blobs
            .put(BlobKind::Object, b"object bytes")
            .await
            .unwrap();
        assert!(
            a.blobs
                .get(BlobKind::Object, &object)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(b.blobs.get(BlobKind::Object, &object).await.unwrap(), None);
        // Nothing but the component folder's objects went to the fleet.
        let name = format!("component/{}", object.hex());
        assert!(a.blobs.objects.info(&name).await.is_err());
        drop(b.fleet);
    }
}
