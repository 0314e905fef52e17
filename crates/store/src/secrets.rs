//! The secrets contract: sealed values only.
//!
//! The store only ever sees ciphertext: `mayfly-platform` holds the master
//! key and seals a value before it reaches [`SecretStore::put`]. Each row
//! records which master key sealed it (`key_id`), so a key rotation that
//! stopped half-way can be finished on the next start.

use std::fmt;

use serde::Serialize;

use crate::Result;

/// A value as sealed by the platform: which key, the nonce and the
/// ciphertext (with its tag).
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Identifies the master key that sealed it (never the key itself).
    pub key_id: String,
    /// The AEAD nonce, unique per seal.
    pub nonce: Vec<u8>,
    /// The ciphertext followed by its authentication tag.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ciphertext is harmless, but noise in logs.
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// A stored secret: its latest version, sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSecret {
    /// The secret's name.
    pub name: String,
    /// Its version: increases with every put, across all secrets.
    pub version: u64,
    /// The sealed value.
    pub sealed: Sealed,
    /// When the secret was created (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When its current version was put.
    pub updated_at_ms: i64,
}

/// What a listing shows of a secret: everything but the sealed value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretMeta {
    /// The secret's name.
    pub name: String,
    /// Its current version.
    pub version: u64,
    /// The master key that sealed it.
    pub key_id: String,
    /// When the secret was created (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When its current version was put.
    pub updated_at_ms: i64,
}

/// The outcome of a [`SecretStore::put`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SecretPut {
    /// The version given to the value.
    pub version: u64,
    /// Whether the secret did not exist before.
    pub created: bool,
}

/// Seals the value of a [`SecretStore::put`] for the version the store
/// gives it. Owned (`'static`) and `Send`, because a back-end may run it
/// on another thread, inside the transaction that writes the row.
pub type SealFn = Box<dyn FnOnce(u64) -> Result<Sealed> + Send>;

/// Reseals one row for [`SecretStore::reseal_all`]: `None` leaves it as it
/// is. Owned and `Send` for the same reason as [`SealFn`].
pub type ResealFn = Box<dyn FnMut(&SealedSecret) -> Result<Option<Sealed>> + Send>;

/// Sealed secrets. Every change is durable when it returns.
#[async_trait::async_trait]
pub trait SecretStore: Send + Sync {
    /// Stores a new version of `name`. In one transaction: takes the next
    /// version, calls `seal` with it (so the ciphertext can be bound to its
    /// version) and writes the row; if `seal` fails nothing changes.
    async fn put(&self, name: &str, seal: SealFn) -> Result<SecretPut>;

    /// The latest version of `name`.
    async fn get(&self, name: &str) -> Result<Option<SealedSecret>>;

    /// Every secret, by name, without its value.
    async fn list(&self) -> Result<Vec<SecretMeta>>;

    /// Deletes a secret; returns whether it existed.
    async fn delete(&self, name: &str) -> Result<bool>;

    /// Passes every secret to `reseal` and writes back the values it
    /// returns (`None` leaves a row as it is), all in ONE transaction: if
    /// any call fails, no row changes, so a key rotation never leaves
    /// secrets sealed under a mix of keys it did not record. Versions and
    /// times stay: the values did not change. Returns the rows rewritten.
    async fn reseal_all(&self, reseal: ResealFn) -> Result<usize>;

    /// Secret changes from now on, whoever made them: a node subscribes and
    /// drops what it derived from a changed secret (the wasi:config values
    /// of the functions granted it). Synchronous: subscribing is in
    /// memory, no I/O.
    fn watch(&self) -> crate::ChangeFeed<crate::SecretChange>;
}
