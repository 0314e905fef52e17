//! Secrets encrypted at rest.
//!
//! A value is sealed with XChaCha20-Poly1305 under a key derived from the
//! node's 32-byte master key, with a fresh random 24-byte nonce per seal
//! (192 bits: random nonces never realistically repeat) and the secret's
//! name and version as associated data, so a row copied under another name,
//! or an old version put back, does not open. Only ciphertext reaches
//! `secrets.db`.
//!
//! The master key comes from `MAYFLY_MASTER_KEY` (64 hex characters or
//! base64 of 32 bytes) or else from `<data>/master.key`, created on first
//! start with mode 0600 and refused if group or others may read it. The file
//! holds the key as hex, the same form the environment variable takes.
//!
//! Rotation replaces a file key without a window where a crash loses
//! secrets: the new key goes to `master.key.next` (fsynced) first, every row
//! is resealed in one transaction, then the file is renamed over
//! `master.key`. Rows record which key sealed them, so a start that finds
//! `master.key.next` loads both keys and finishes the job. A key from the
//! environment is rotated by the operator instead: restart with the new key
//! in `MAYFLY_MASTER_KEY` and the old one in `MAYFLY_PREVIOUS_MASTER_KEY`,
//! and the start reseals every row under the new key.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac as _};
use mayfly_store::{Sealed, SealedSecret, SecretPut, SecretStore, StoreError};
use rand::RngCore as _;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::error::PlatformError;
use crate::validate::{MAX_SECRET_BYTES, check_secret_name};

/// Environment variable holding the master key (64 hex characters or base64
/// of 32 bytes); when set, `master.key` is not used.
pub const MASTER_KEY_ENV: &str = "MAYFLY_MASTER_KEY";
/// Environment variable holding the master key used before the current one,
/// during a rotation through the environment.
pub const PREVIOUS_MASTER_KEY_ENV: &str = "MAYFLY_PREVIOUS_MASTER_KEY";
/// The master key file in the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";
/// The new master key while a rotation runs.
const NEXT_KEY_FILE: &str = "master.key.next";
/// The secrets database in the data directory.
const SECRETS_DB: &str = "secrets.db";

const ROTATE_FROM_ENV: &str = "the master key comes from MAYFLY_MASTER_KEY, so the node cannot \
     replace it: to rotate, restart the node with the new key in MAYFLY_MASTER_KEY and the old \
     one in MAYFLY_PREVIOUS_MASTER_KEY; it reseals every secret under the new key as it starts";

const KEY_FORMAT: &str = "32 bytes as 64 hex characters or as base64 (e.g. the output of \
     `openssl rand -hex 32`)";

type HmacSha256 = Hmac<Sha256>;

/// A secret as listed: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    /// The secret's name.
    pub name: String,
    /// Its current version; a new value gets a higher one.
    pub version: u64,
    /// When the secret was created (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When its current value was set.
    pub updated_at_ms: i64,
}

/// The node's secrets: sealed in `secrets.db`, opened only for the guests
/// that read them.
pub struct Secrets {
    store: Arc<dyn SecretStore>,
    /// Sets and reveals share it; a rotation holds it alone, so no value is
    /// sealed under a key that is being replaced. An async lock: it is held
    /// across the store call that reads or writes the row.
    keys: tokio::sync::RwLock<Keyring>,
    /// The data directory when the key lives in `master.key` (and so may be
    /// rotated here); `None` when it was given (environment or
    /// [`Secrets::open_with_key`]).
    key_dir: Option<PathBuf>,
    /// The current master key, also outside the lock: checking a
    /// credential (its signing key) or naming the key never waits for a
    /// rotation's reseal.
    current: arc_swap::ArcSwap<MasterKey>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("key_id", &self.key_id())
            .field("key_dir", &self.key_dir)
            .finish_non_exhaustive()
    }
}

/// A master key, kept only as what is derived from it.
struct MasterKey {
    /// Names the key in rows and messages: a hash of a derivation, so it
    /// says nothing about the key.
    id: String,
    /// The AEAD key.
    sealing: Zeroizing<[u8; 32]>,
    /// The per-invocation credential signing key.
    signing: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// HMAC-SHA256(master, label): one independent key per purpose.
fn derive(master: &[u8; 32], label: &[u8]) -> anyhow::Result<Zeroizing<[u8; 32]>> {
    let mut mac = HmacSha256::new_from_slice(master).map_err(|_| anyhow!("HMAC refused a key"))?;
    mac.update(label);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&mac.finalize().into_bytes());
    Ok(out)
}

impl MasterKey {
    fn new(master: &[u8; 32]) -> anyhow::Result<Self> {
        let id_material = derive(master, b"mayfly key id v1")?;
        Ok(Self {
            id: hex::encode(&Sha256::digest(&id_material[..])[..8]),
            sealing: derive(master, b"mayfly secret sealing v1")?,
            signing: derive(master, b"mayfly credential signing v1")?,
        })
    }

    fn cipher(&self) -> anyhow::Result<XChaCha20Poly1305> {
        XChaCha20Poly1305::new_from_slice(&self.sealing[..])
            .map_err(|_| anyhow!("the sealing key has the wrong length"))
    }

    /// Seals `value` as version `version` of `name`.
    fn seal(&self, name: &str, version: u64, value: &[u8]) -> anyhow::Result<Sealed> {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let aad = associated_data(name, version);
        let ciphertext = self
            .cipher()?
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: value,
                    aad: &aad,
                },
            )
            .map_err(|_| anyhow!("cannot seal secret `{name}`"))?;
        Ok(Sealed {
            key_id: self.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Opens a row sealed under this key.
    fn open(&self, secret: &SealedSecret) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        let nonce = XNonce::try_from(&secret.sealed.nonce[..])
            .map_err(|_| anyhow!("secret `{}` has a malformed nonce", secret.name))?;
        let aad = associated_data(&secret.name, secret.version);
        let plaintext = self
            .cipher()?
            .decrypt(
                &nonce,
                Payload {
                    msg: &secret.sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| {
                anyhow!(
                    "secret `{}` (version {}) does not open: it was altered, or sealed for \
                     another name or version",
                    secret.name,
                    secret.version
                )
            })?;
        Ok(Zeroizing::new(plaintext))
    }
}

/// Separates the kind and id of the node's own sealed records; users'
/// secret names cannot hold it ([`check_secret_name`]).
const INTERNAL_SEPARATOR: char = '=';

fn internal_name(kind: &str, id: &str) -> String {
    format!("{kind}{INTERNAL_SEPARATOR}{id}")
}

fn is_internal(name: &str) -> bool {
    name.contains(INTERNAL_SEPARATOR)
}

/// Binds a ciphertext to its secret: a domain label, the name's length (so
/// no two (name, version) pairs encode alike), the name and the version.
fn associated_data(name: &str, version: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32 + name.len());
    aad.extend_from_slice(b"mayfly secret v1\0");
    aad.extend_from_slice(&(name.len() as u64).to_be_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// The keys that may open rows: the current one, which seals, and during
/// recovery the ones rows may still be sealed under. Shared (`Arc`), so a
/// sealing callback the store runs on its own thread can own a copy.
#[derive(Debug, Clone)]
struct Keyring {
    current: Arc<MasterKey>,
    others: Vec<Arc<MasterKey>>,
}

impl Keyring {
    fn find(&self, key_id: &str) -> Option<&MasterKey> {
        std::iter::once(&self.current)
            .chain(&self.others)
            .find(|key| key.id == key_id)
            .map(|key| &**key)
    }

    fn open(&self, secret: &SealedSecret) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        self.find(&secret.sealed.key_id)
            .ok_or_else(|| {
                anyhow!(
                    "secret `{}` is sealed under master key {}, which this node does not have",
                    secret.name,
                    secret.sealed.key_id
                )
            })?
            .open(secret)
    }
}

/// Reseals every row not yet under `target`, opening each with the key of
/// `keys` that sealed it, in one transaction.
async fn reseal(
    store: &dyn SecretStore,
    keys: &Keyring,
    target: &Arc<MasterKey>,
) -> Result<usize, StoreError> {
    let (keys, target) = (keys.clone(), target.clone());
    store
        .reseal_all(Box::new(move |secret| {
            if secret.sealed.key_id == target.id {
                return Ok(None);
            }
            let value = keys
                .open(secret)
                .and_then(|value| target.seal(&secret.name, secret.version, &value))
                .map_err(|e| StoreError::Corrupt(format!("{e:#}")))?;
            Ok(Some(value))
        }))
        .await
}

impl Secrets {
    /// Opens the secrets of the node in `data_dir`, with the master key from
    /// `MAYFLY_MASTER_KEY` (and `MAYFLY_PREVIOUS_MASTER_KEY`) or else from
    /// `master.key`, created if absent. Finishes a rotation that stopped
    /// half-way. Fails, saying what to do, on a malformed key, a key file
    /// others may read, or secrets sealed under a key it was not given.
    pub async fn open(store: Arc<dyn SecretStore>, data_dir: &Path) -> anyhow::Result<Self> {
        Self::open_keys(
            store,
            data_dir,
            env_key(MASTER_KEY_ENV)?,
            env_key(PREVIOUS_MASTER_KEY_ENV)?,
        )
        .await
    }

    /// Opens with a master key given by the caller, as with
    /// `MAYFLY_MASTER_KEY`: the environment and `master.key` are ignored and
    /// [`Secrets::rotate`] refuses.
    pub async fn open_with_key(
        store: Arc<dyn SecretStore>,
        data_dir: &Path,
        key: &[u8; 32],
    ) -> anyhow::Result<Self> {
        Self::open_keys(store, data_dir, Some(Zeroizing::new(*key)), None).await
    }

    async fn open_keys(
        store: Arc<dyn SecretStore>,
        data_dir: &Path,
        current: Option<Zeroizing<[u8; 32]>>,
        previous: Option<Zeroizing<[u8; 32]>>,
    ) -> anyhow::Result<Self> {
        match current {
            Some(current) => {
                let given_previous = previous.is_some();
                let keys = Keyring {
                    current: Arc::new(MasterKey::new(&current)?),
                    others: previous
                        .map(|key| MasterKey::new(&key).map(Arc::new))
                        .transpose()?
                        .into_iter()
                        .collect(),
                };
                let (secrets, resealed) = Self::start(store, keys, None).await?;
                if given_previous && resealed == 0 {
                    tracing::info!(
                        "every secret is sealed under the current master key: \
                         {PREVIOUS_MASTER_KEY_ENV} may be unset"
                    );
                }
                Ok(secrets)
            }
            None if previous.is_some() => bail!(
                "{PREVIOUS_MASTER_KEY_ENV} is set but {MASTER_KEY_ENV} is not: during a rotation \
                 give the new key in {MASTER_KEY_ENV} and the old one in {PREVIOUS_MASTER_KEY_ENV}"
            ),
            None => Self::open_key_file(store, data_dir).await,
        }
    }

    /// The file-key start: `master.key`, created if absent, and a
    /// `master.key.next` left by a rotation that stopped.
    async fn open_key_file(store: Arc<dyn SecretStore>, data_dir: &Path) -> anyhow::Result<Self> {
        let key_path = data_dir.join(MASTER_KEY_FILE);
        let next_path = data_dir.join(NEXT_KEY_FILE);
        let old = read_key_file(&key_path)?;
        let next = read_key_file(&next_path)?;
        let pending = next.is_some();
        let keys = match (old, next) {
            (old, Some(next)) => {
                tracing::warn!(
                    "found {}: finishing the master key rotation that stopped",
                    next_path.display()
                );
                Keyring {
                    current: Arc::new(MasterKey::new(&next)?),
                    others: old
                        .map(|key| MasterKey::new(&key).map(Arc::new))
                        .transpose()?
                        .into_iter()
                        .collect(),
                }
            }
            (Some(key), None) => Keyring {
                current: Arc::new(MasterKey::new(&key)?),
                others: Vec::new(),
            },
            (None, None) => {
                let stored = store.list().await?.len();
                if stored > 0 {
                    bail!(
                        "{} is missing but {} holds {stored} secret(s) sealed under it: restore \
                         the key file (mode 0600) or give the key in {MASTER_KEY_ENV}",
                        key_path.display(),
                        data_dir.join(SECRETS_DB).display()
                    );
                }
                let key = random_key();
                write_key_file(&key_path, &key)?;
                tracing::info!(
                    "created the master key {}: back it up, without it the node's secrets \
                     cannot be read",
                    key_path.display()
                );
                Keyring {
                    current: Arc::new(MasterKey::new(&key)?),
                    others: Vec::new(),
                }
            }
        };
        let (secrets, _) = Self::start(store, keys, Some(data_dir.to_path_buf())).await?;
        if pending {
            // Every row is under the new key now; only then may it replace
            // the old one.
            std::fs::rename(&next_path, &key_path).with_context(|| {
                format!(
                    "cannot rename {} over {}",
                    next_path.display(),
                    key_path.display()
                )
            })?;
            sync_dir(data_dir)?;
        }
        Ok(secrets)
    }

    /// Checks that every row has a key in `keys` and reseals those under an
    /// older key; returns the secrets and how many rows were resealed.
    async fn start(
        store: Arc<dyn SecretStore>,
        mut keys: Keyring,
        key_dir: Option<PathBuf>,
    ) -> anyhow::Result<(Self, usize)> {
        let stored = store.list().await?;
        let mut unknown: BTreeMap<&str, usize> = BTreeMap::new();
        for meta in &stored {
            if keys.find(&meta.key_id).is_none() {
                *unknown.entry(&meta.key_id).or_default() += 1;
            }
        }
        if !unknown.is_empty() {
            let count: usize = unknown.values().sum();
            let ids: Vec<&str> = unknown.keys().copied().collect();
            bail!(
                "{count} secret(s) are sealed under master key {}, but this node's key is {}: \
                 start it with the key they were sealed under ({MASTER_KEY_ENV} or {MASTER_KEY_FILE} \
                 in the data directory); after a rotation through the environment, give the old \
                 key in {PREVIOUS_MASTER_KEY_ENV}. If that key is lost, so are those secrets: \
                 move {SECRETS_DB} aside to start without them",
                ids.join(", "),
                keys.current.id
            );
        }
        let stale = stored
            .iter()
            .filter(|meta| meta.key_id != keys.current.id)
            .count();
        let mut resealed = 0;
        if stale > 0 {
            resealed = reseal(&*store, &keys, &keys.current)
                .await
                .context("cannot reseal the secrets under the current master key")?;
            tracing::info!(
                "resealed {resealed} secret(s) under master key {}",
                keys.current.id
            );
        }
        keys.others.clear();
        let secrets = Self {
            store,
            current: arc_swap::ArcSwap::new(keys.current.clone()),
            keys: tokio::sync::RwLock::new(keys),
            key_dir,
        };
        Ok((secrets, resealed))
    }

    /// Identifies the current master key (a hash of a derivation of it,
    /// safe to show).
    pub fn key_id(&self) -> String {
        self.current.load().id.clone()
    }

    /// The key that signs per-invocation credentials:
    /// HMAC-SHA256(master key, "mayfly credential signing v1"). It changes
    /// when the master key is rotated, so a leaked master key stops
    /// minting credentials; a caller that keeps a copy keeps the old one.
    pub fn signing_key(&self) -> [u8; 32] {
        *self.current.load().signing
    }

    /// Stores `value` as a new version of `name`. Values must be UTF-8
    /// (guests read them through wasi:config as strings) and at most
    /// [`MAX_SECRET_BYTES`].
    pub async fn set(&self, name: &str, value: &[u8]) -> Result<SecretPut, PlatformError> {
        check_secret_name(name)?;
        check_value(value)?;
        // Held until the row is written: a rotation cannot replace the key
        // between the seal and the write.
        let keys = self.keys.read().await;
        let current = keys.current.clone();
        let (bound, value) = (name.to_string(), Zeroizing::new(value.to_vec()));
        let put = self
            .store
            .put(
                name,
                Box::new(move |version| {
                    current
                        .seal(&bound, version, &value)
                        .map_err(|e| StoreError::Corrupt(format!("{e:#}")))
                }),
            )
            .await?;
        drop(keys);
        Ok(put)
    }

    /// Every secret's name, version and times, by name (the node's own
    /// sealed records, such as S3 access keys, are not users' secrets and
    /// are left out).
    pub async fn list(&self) -> Result<Vec<SecretInfo>, PlatformError> {
        Ok(self
            .store
            .list()
            .await?
            .into_iter()
            .filter(|meta| !is_internal(&meta.name))
            .map(|meta| SecretInfo {
                name: meta.name,
                version: meta.version,
                created_at_ms: meta.created_at_ms,
                updated_at_ms: meta.updated_at_ms,
            })
            .collect())
    }

    /// Deletes a secret; returns whether it existed.
    pub async fn delete(&self, name: &str) -> Result<bool, PlatformError> {
        check_secret_name(name)?;
        Ok(self.store.delete(name).await?)
    }

    /// Whether a secret named `name` exists (its value is not opened).
    pub async fn exists(&self, name: &str) -> Result<bool, PlatformError> {
        if check_secret_name(name).is_err() {
            return Ok(false);
        }
        Ok(self.store.get(name).await?.is_some())
    }

    /// The value of `name`, for a guest that reads it; `None` if there is no
    /// such secret.
    pub async fn reveal(&self, name: &str) -> Result<Option<Zeroizing<String>>, PlatformError> {
        if check_secret_name(name).is_err() {
            return Ok(None);
        }
        // Held while the row is read and opened: a rotation cannot reseal
        // it under a key this copy of the keyring lacks in between.
        let keys = self.keys.read().await;
        let Some(secret) = self.store.get(name).await? else {
            return Ok(None);
        };
        let mut value = keys.open(&secret).map_err(PlatformError::Internal)?;
        drop(keys);
        // Moves the buffer into the String: no copy is left behind.
        match String::from_utf8(std::mem::take(&mut *value)) {
            Ok(text) => Ok(Some(Zeroizing::new(text))),
            Err(error) => {
                drop(Zeroizing::new(error.into_bytes()));
                Err(PlatformError::Internal(anyhow!(
                    "secret `{name}` is not UTF-8 text"
                )))
            }
        }
    }

    // ---- the node's own sealed records ----
    //
    // S3 access keys need their secret itself (SigV4 signs with it), so it
    // is sealed like a user's secret, in the same store, under a name users
    // cannot give (`INTERNAL_SEPARATOR` is outside the name alphabet): a
    // master key rotation reseals them with the rest, and no function can be
    // granted one.

    /// Seals `value` under the internal name `kind=id`.
    pub(crate) async fn set_internal(
        &self,
        kind: &str,
        id: &str,
        value: &[u8],
    ) -> Result<(), PlatformError> {
        let name = internal_name(kind, id);
        let keys = self.keys.read().await;
        let current = keys.current.clone();
        let value = Zeroizing::new(value.to_vec());
        self.store
            .put(
                &name.clone(),
                Box::new(move |version| {
                    current
                        .seal(&name, version, &value)
                        .map_err(|e| StoreError::Corrupt(format!("{e:#}")))
                }),
            )
            .await?;
        drop(keys);
        Ok(())
    }

    /// The opened value of the internal record `kind=id`, if present.
    pub(crate) async fn get_internal(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, PlatformError> {
        let keys = self.keys.read().await;
        let Some(secret) = self.store.get(&internal_name(kind, id)).await? else {
            return Ok(None);
        };
        Ok(Some(keys.open(&secret).map_err(PlatformError::Internal)?))
    }

    /// The ids of the internal records of `kind`.
    pub(crate) async fn list_internal(&self, kind: &str) -> Result<Vec<String>, PlatformError> {
        let prefix = internal_name(kind, "");
        Ok(self
            .store
            .list()
            .await?
            .into_iter()
            .filter_map(|meta| meta.name.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// Deletes the internal record `kind=id`; returns whether it existed.
    pub(crate) async fn delete_internal(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<bool, PlatformError> {
        Ok(self.store.delete(&internal_name(kind, id)).await?)
    }

    /// Replaces the master key in `master.key` with a new random one and
    /// reseals every secret under it; returns how many. Refuses
    /// ([`PlatformError::Conflict`]) when the key came from the environment.
    pub async fn rotate(&self) -> Result<usize, PlatformError> {
        let Some(dir) = &self.key_dir else {
            return Err(PlatformError::Conflict(ROTATE_FROM_ENV.into()));
        };
        let mut keys = self.keys.write().await;
        let next_path = dir.join(NEXT_KEY_FILE);
        let raw = random_key();
        let next = Arc::new(MasterKey::new(&raw).map_err(PlatformError::Internal)?);
        let written = {
            let (path, raw) = (next_path.clone(), raw.clone());
            key_file_io(move || write_key_file(&path, &raw)).await
        };
        if let Err(error) = written {
            if next_path.exists() {
                return Err(PlatformError::Conflict(format!(
                    "{} exists: an earlier rotation did not finish; restart the node to finish it",
                    next_path.display()
                )));
            }
            return Err(PlatformError::Internal(error));
        }
        let resealed = match reseal(&*self.store, &keys, &next).await {
            Ok(resealed) => resealed,
            Err(error) => {
                // Almost surely rolled back; but should the commit have
                // reached the disk after all, rows are under the new key:
                // keep it, here and in master.key.next, so they still open
                // and the next start finishes the rotation.
                keys.others.push(next);
                return Err(error.into());
            }
        };
        keys.current = next;
        keys.others.clear();
        self.current.store(keys.current.clone());
        let key_path = dir.join(MASTER_KEY_FILE);
        let renamed = {
            let (from, to, dir) = (next_path.clone(), key_path.clone(), dir.clone());
            key_file_io(move || {
                std::fs::rename(&from, &to)?;
                sync_dir(&dir)
            })
            .await
        };
        renamed
            .with_context(|| {
                format!(
                    "resealed {resealed} secret(s) but cannot rename {} over {}; the next start \
                     finishes the rotation",
                    next_path.display(),
                    key_path.display()
                )
            })
            .map_err(PlatformError::Internal)?;
        tracing::info!(
            "rotated the master key to {}: resealed {resealed} secret(s)",
            keys.current.id
        );
        Ok(resealed)
    }
}

/// Runs key file work (writes, renames, directory syncs) off the async
/// workers: the node's own blocking I/O, not a store call.
async fn key_file_io<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await?
}

fn check_value(value: &[u8]) -> Result<(), PlatformError> {
    if value.len() > MAX_SECRET_BYTES {
        return Err(PlatformError::TooLarge(format!(
            "the secret is {} bytes, over the limit of {MAX_SECRET_BYTES}",
            value.len()
        )));
    }
    if std::str::from_utf8(value).is_err() {
        return Err(PlatformError::BadRequest(
            "a secret must be UTF-8 text, as functions read it through wasi:config as a \
             string: encode binary values, e.g. as base64"
                .into(),
        ));
    }
    Ok(())
}

fn random_key() -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(&mut *key);
    key
}

/// A master key written as 64 hex characters or as base64 of 32 bytes.
fn parse_key(text: &str) -> Option<Zeroizing<[u8; 32]>> {
    let text = text.trim();
    let mut key = Zeroizing::new([0u8; 32]);
    if text.len() == 64 && hex::decode_to_slice(text, &mut key[..]).is_ok() {
        return Some(key);
    }
    // Room for any base64 of 32 bytes; longer input fails to fit.
    let mut decoded = Zeroizing::new([0u8; 48]);
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        if engine.decode_slice(text, &mut decoded[..]).ok() == Some(32) {
            key.copy_from_slice(&decoded[..32]);
            return Some(key);
        }
    }
    None
}

/// The key in environment variable `name`, if set. The error never holds
/// the value.
fn env_key(name: &str) -> anyhow::Result<Option<Zeroizing<[u8; 32]>>> {
    match std::env::var(name) {
        Ok(text) => {
            let text = Zeroizing::new(text);
            parse_key(&text)
                .map(Some)
                .ok_or_else(|| anyhow!("{name} is not a master key: give {KEY_FORMAT}"))
        }
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("{name} is not a master key: give {KEY_FORMAT}")
        }
    }
}

/// Reads a key file, refusing one that group or others may use, as ssh
/// does with private keys. `None` if there is no such file.
fn read_key_file(path: &Path) -> anyhow::Result<Option<Zeroizing<[u8; 32]>>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("cannot open {}", path.display())),
    };
    // The open file's mode, not the path's: nothing can swap it in between.
    let mode = file
        .metadata()
        .with_context(|| format!("cannot read the mode of {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} holds the node's master key but group or others may access it (mode {:03o}); \
             the node will not use it: run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    // Sized up front so reading never reallocates and leaves copies behind.
    let mut text = Zeroizing::new(Vec::with_capacity(257));
    file.take(256)
        .read_to_end(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    std::str::from_utf8(&text)
        .ok()
        .and_then(parse_key)
        .map(Some)
        .ok_or_else(|| {
            anyhow!(
                "{} does not hold a master key: it must hold {KEY_FORMAT}",
                path.display()
            )
        })
}

/// Creates a key file (mode 0600, never over an existing file) holding the
/// key as hex, durably.
fn write_key_file(path: &Path, key: &[u8; 32]) -> anyhow::Result<()> {
    if path.exists() {
        bail!("{} already exists", path.display());
    }
    // Written under a temporary name and linked into place only once it is
    // whole and on disk: a crash never leaves a truncated key file that
    // would stop the next start.
    let temp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .with_context(|| format!("cannot create {}", temp.display()))?;
    let mut text = Zeroizing::new([0u8; 65]);
    hex::encode_to_slice(key, &mut text[..64]).map_err(|_| anyhow!("cannot encode the key"))?;
    text[64] = b'\n';
    let written = file.write_all(&text[..]).and_then(|()| file.sync_all());
    drop(file);
    // hard_link, unlike rename, refuses to replace an existing file.
    let linked = written.and_then(|()| std::fs::hard_link(&temp, path));
    let _ = std::fs::remove_file(&temp);
    linked.with_context(|| format!("cannot write {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    sync_dir(dir)
}

/// Makes a directory's entries (a created or renamed file) durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: [u8; 32] = [0xa1; 32];
    const KEY_B: [u8; 32] = [0xb2; 32];

    /// The secrets database in `dir`, opened anew.
    fn store(dir: &Path) -> Arc<dyn SecretStore> {
        mayfly_store::sqlite::open_secrets(dir).unwrap()
    }

    /// Opens with the key file, whatever the test process's environment.
    async fn open_file(dir: &Path) -> anyhow::Result<Arc<Secrets>> {
        Secrets::open_keys(store(dir), dir, None, None)
            .await
            .map(Arc::new)
    }

    async fn open_env(
        dir: &Path,
        key: [u8; 32],
        previous: Option<[u8; 32]>,
    ) -> anyhow::Result<Arc<Secrets>> {
        Secrets::open_keys(
            store(dir),
            dir,
            Some(Zeroizing::new(key)),
            previous.map(Zeroizing::new),
        )
        .await
        .map(Arc::new)
    }

    async fn reveal(secrets: &Arc<Secrets>, name: &str) -> Option<String> {
        secrets.reveal(name).await.unwrap().map(|v| v.to_string())
    }

    /// Whether `debug` shows either derived key, as Debug would print it.
    fn leaks(debug: &str, key: &MasterKey) -> bool {
        [&key.sealing, &key.signing].iter().any(|bytes| {
            let shown = format!("{:?}", &bytes[..4]);
            debug.contains(shown.trim_matches(['[', ']']))
                || debug.contains(&hex::encode(&bytes[..4]))
        })
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn secrets_round_trip_and_list_without_values() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open_file(dir.path()).await.unwrap();
        let first = secrets.set("db.password", b"hunter2").await.unwrap();
        assert!(first.created);
        let second = secrets.set("db.password", b"correct horse").await.unwrap();
        assert!(!second.created && second.version > first.version);
        secrets.set("empty", b"").await.unwrap();
        assert_eq!(
            reveal(&secrets, "db.password").await.as_deref(),
            Some("correct horse")
        );
        assert_eq!(reveal(&secrets, "empty").await.as_deref(), Some(""));
        assert_eq!(reveal(&secrets, "absent").await, None);
        assert_eq!(reveal(&secrets, "not/a name").await, None);

        let list = secrets.list().await.unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name, "db.password");
        assert_eq!(list[0].version, second.version);
        let json = serde_json::to_string(&list).unwrap();
        assert!(!json.contains("horse"));

        assert!(secrets.delete("empty").await.unwrap());
        assert!(!secrets.delete("empty").await.unwrap());
        let keys = secrets.keys.read().await;
        let debug = format!("{secrets:?} {:?}", *keys);
        assert!(!leaks(&debug, &keys.current), "{debug}");
        drop(keys);

        // Survives a restart with the same key file.
        drop(secrets);
        let secrets = open_file(dir.path()).await.unwrap();
        assert_eq!(
            reveal(&secrets, "db.password").await.as_deref(),
            Some("correct horse")
        );
    }

    #[tokio::test]
    async fn secrets_refuse_bad_names_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open_env(dir.path(), KEY_A, None).await.unwrap();
        for name in ["", "a/b", "a b", "é", ".", "..", &"x".repeat(129)] {
            let error = secrets.set(name, b"v").await.unwrap_err();
            assert!(
                matches!(error, PlatformError::BadRequest(_)),
                "{name}: {error}"
            );
        }
        secrets.set(&"x".repeat(128), b"v").await.unwrap();
        secrets.set("A-z_0.9", b"v").await.unwrap();
        secrets.set("...", b"v").await.unwrap();
        let error = secrets.set("bin", &[0xff, 0xfe]).await.unwrap_err();
        assert!(error.to_string().contains("UTF-8"), "{error}");
        let big = vec![b'a'; MAX_SECRET_BYTES + 1];
        let error = secrets.set("big", &big).await.unwrap_err();
        assert!(matches!(error, PlatformError::TooLarge(_)), "{error}");
        secrets.set("big", &big[..MAX_SECRET_BYTES]).await.unwrap();
    }

    #[tokio::test]
    async fn secrets_plaintext_never_reaches_the_database_files() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open_file(dir.path()).await.unwrap();
        let value = "plaintext-canary-5f0c2a9e";
        secrets.set("canary", value.as_bytes()).await.unwrap();
        secrets.set("canary", value.as_bytes()).await.unwrap();
        let mut searched = 0;
        for file in [SECRETS_DB, "secrets.db-wal"] {
            let Ok(bytes) = std::fs::read(dir.path().join(file)) else {
                continue;
            };
            searched += bytes.len();
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{file} holds the plaintext"
            );
        }
        assert!(searched > 0);
        assert_eq!(reveal(&secrets, "canary").await.as_deref(), Some(value));
    }

    #[tokio::test]
    async fn secrets_do_not_open_with_a_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open_env(dir.path(), KEY_A, None).await.unwrap();
        secrets.set("s", b"v").await.unwrap();
        let row = secrets.store.get("s").await.unwrap().unwrap();
        drop(secrets);

        assert!(MasterKey::new(&KEY_B).unwrap().open(&row).is_err());
        // Even when the row claims the other key's id.
        let wrong = MasterKey::new(&KEY_B).unwrap();
        let mut relabelled = row.clone();
        relabelled.sealed.key_id = wrong.id.clone();
        assert!(wrong.open(&relabelled).is_err());

        let error = open_env(dir.path(), KEY_B, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("sealed under master key"), "{error}");
        assert!(!error.contains(&hex::encode(KEY_A)), "{error}");
    }

    #[tokio::test]
    async fn secrets_tampered_or_moved_rows_do_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open_env(dir.path(), KEY_A, None).await.unwrap();
        secrets.set("a", b"value of a").await.unwrap();
        secrets.set("b", b"value of b").await.unwrap();
        let row_a = secrets.store.get("a").await.unwrap().unwrap();

        // a's sealed value copied under b (and under a's next version).
        let copied = row_a.sealed.clone();
        let copy = copied.clone();
        secrets
            .store
            .put("b", Box::new(move |_| Ok(copy)))
            .await
            .unwrap();
        assert!(secrets.reveal("b").await.is_err());
        secrets
            .store
            .put("a", Box::new(move |_| Ok(copied)))
            .await
            .unwrap();
        assert!(secrets.reveal("a").await.is_err());

        // One flipped ciphertext bit.
        secrets.set("c", b"value of c").await.unwrap();
        secrets
            .store
            .reseal_all(Box::new(|row| {
                let mut sealed = row.sealed.clone();
                sealed.ciphertext[0] ^= 1;
                Ok((row.name == "c").then_some(sealed))
            }))
            .await
            .unwrap();
        let error = secrets.reveal("c").await.unwrap_err().to_string();
        assert!(error.contains("does not open"), "{error}");
    }

    #[tokio::test]
    async fn secrets_key_file_is_created_private_and_refused_when_not() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open_file(dir.path()).await.unwrap();
        let key_path = dir.path().join(MASTER_KEY_FILE);
        assert_eq!(mode(&key_path), 0o600);
        let text = std::fs::read_to_string(&key_path).unwrap();
        assert_eq!(text.trim().len(), 64);
        let id = secrets.key_id();
        drop(secrets);
        assert_eq!(
            open_file(dir.path()).await.unwrap().key_id(),
            id,
            "the same key again"
        );

        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = open_file(dir.path()).await.unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
        assert!(!error.contains(text.trim()), "{error}");
    }

    #[tokio::test]
    async fn secrets_a_missing_key_file_is_not_silently_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open_file(dir.path()).await.unwrap();
        secrets.set("s", b"v").await.unwrap();
        drop(secrets);
        std::fs::remove_file(dir.path().join(MASTER_KEY_FILE)).unwrap();
        let error = open_file(dir.path()).await.unwrap_err().to_string();
        assert!(error.contains("is missing"), "{error}");
        assert!(!dir.path().join(MASTER_KEY_FILE).exists());
    }

    #[test]
    fn secrets_keys_parse_from_hex_or_base64_only() {
        let hex_key = hex::encode(KEY_A);
        assert_eq!(*parse_key(&hex_key).unwrap(), KEY_A);
        assert_eq!(
            *parse_key(&format!(" {}\n", hex_key.to_uppercase())).unwrap(),
            KEY_A
        );
        assert_eq!(*parse_key(&STANDARD.encode(KEY_B)).unwrap(), KEY_B);
        assert_eq!(*parse_key(&URL_SAFE_NO_PAD.encode(KEY_B)).unwrap(), KEY_B);
        for bad in [
            "",
            "abc",
            &hex_key[..62],
            &STANDARD.encode([1u8; 31]),
            &"z".repeat(64),
        ] {
            assert!(parse_key(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn secrets_derived_keys_are_independent_and_stable() {
        let a = MasterKey::new(&KEY_A).unwrap();
        let again = MasterKey::new(&KEY_A).unwrap();
        let b = MasterKey::new(&KEY_B).unwrap();
        assert_eq!(a.id, again.id);
        assert_eq!(a.id.len(), 16);
        assert_ne!(a.id, b.id);
        assert_ne!(*a.signing, *a.sealing);
        assert_ne!(*a.signing, KEY_A);
        assert_eq!(*a.signing, *again.signing);
        assert!(!leaks(&format!("{a:?}"), &a));
    }

    #[tokio::test]
    async fn secrets_rotation_reseals_and_retires_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open_file(dir.path()).await.unwrap();
        let key_path = dir.path().join(MASTER_KEY_FILE);
        let old_key = parse_key(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
        let a = secrets.set("a", b"alpha").await.unwrap();
        secrets.set("b", b"beta").await.unwrap();
        let old_row = secrets.store.get("a").await.unwrap().unwrap();
        let (old_id, old_signing) = (secrets.key_id(), secrets.signing_key());

        assert_eq!(secrets.rotate().await.unwrap(), 2);
        assert_ne!(secrets.key_id(), old_id);
        assert_ne!(secrets.signing_key(), old_signing);
        assert!(!dir.path().join(NEXT_KEY_FILE).exists());
        assert_eq!(mode(&key_path), 0o600);
        assert_eq!(reveal(&secrets, "a").await.as_deref(), Some("alpha"));
        let row = secrets.store.get("a").await.unwrap().unwrap();
        assert_eq!(row.version, a.version, "a reseal is not a new version");
        assert_eq!(row.sealed.key_id, secrets.key_id());
        assert_ne!(row.sealed.nonce, old_row.sealed.nonce);

        // The old key opens neither the new rows nor the node.
        assert!(MasterKey::new(&old_key).unwrap().open(&row).is_err());
        let id = secrets.key_id();
        drop(secrets);
        let error = open_env(dir.path(), *old_key, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("sealed under master key"), "{error}");
        let secrets = open_file(dir.path()).await.unwrap();
        assert_eq!(secrets.key_id(), id);
        assert_eq!(reveal(&secrets, "b").await.as_deref(), Some("beta"));
    }

    #[tokio::test]
    async fn secrets_a_rotation_that_stopped_is_finished_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join(MASTER_KEY_FILE);
        let next_path = dir.path().join(NEXT_KEY_FILE);
        let secrets = open_file(dir.path()).await.unwrap();
        secrets.set("a", b"alpha").await.unwrap();
        secrets.set("b", b"beta").await.unwrap();
        drop(secrets);

        // Stopped after writing master.key.next, before resealing.
        write_key_file(&next_path, &KEY_A).unwrap();
        let secrets = open_file(dir.path()).await.unwrap();
        assert_eq!(secrets.key_id(), MasterKey::new(&KEY_A).unwrap().id);
        assert!(!next_path.exists());
        assert_eq!(
            *parse_key(&std::fs::read_to_string(&key_path).unwrap()).unwrap(),
            KEY_A
        );
        assert_eq!(reveal(&secrets, "a").await.as_deref(), Some("alpha"));

        // Stopped after resealing, before the rename: rows under the new
        // key, master.key still the old one.
        write_key_file(&next_path, &KEY_B).unwrap();
        let keys = Keyring {
            current: Arc::new(MasterKey::new(&KEY_A).unwrap()),
            others: Vec::new(),
        };
        let next = Arc::new(MasterKey::new(&KEY_B).unwrap());
        assert_eq!(reseal(&*secrets.store, &keys, &next).await.unwrap(), 2);
        drop(secrets);
        let secrets = open_file(dir.path()).await.unwrap();
        assert_eq!(secrets.key_id(), next.id);
        assert!(!next_path.exists());
        assert_eq!(mode(&key_path), 0o600);
        assert_eq!(reveal(&secrets, "b").await.as_deref(), Some("beta"));
    }

    #[tokio::test]
    async fn secrets_an_environment_key_rotates_by_restart() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = open_env(dir.path(), KEY_A, None).await.unwrap();
        secrets.set("s", b"value").await.unwrap();
        let error = secrets.rotate().await.unwrap_err();
        assert!(matches!(error, PlatformError::Conflict(_)), "{error}");
        assert!(
            error.to_string().contains(PREVIOUS_MASTER_KEY_ENV),
            "{error}"
        );
        assert!(!dir.path().join(MASTER_KEY_FILE).exists());
        drop(secrets);

        let secrets = open_env(dir.path(), KEY_B, Some(KEY_A)).await.unwrap();
        assert_eq!(reveal(&secrets, "s").await.as_deref(), Some("value"));
        let row = secrets.store.get("s").await.unwrap().unwrap();
        assert_eq!(row.sealed.key_id, MasterKey::new(&KEY_B).unwrap().id);
        drop(secrets);
        let secrets = open_env(dir.path(), KEY_B, None).await.unwrap();
        assert_eq!(reveal(&secrets, "s").await.as_deref(), Some("value"));
        drop(secrets);

        let error = Secrets::open_keys(
            store(dir.path()),
            dir.path(),
            None,
            Some(Zeroizing::new(KEY_A)),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(error.contains(MASTER_KEY_ENV), "{error}");
    }
}
