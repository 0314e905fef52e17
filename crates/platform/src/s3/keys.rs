//! S3 access keys: an access key id and a secret, limited to named buckets.
//!
//! SigV4 signs with the secret itself, so it cannot be stored as a hash
//! like an API token: each key is a JSON record sealed with the node's
//! master key in the secret store ([`Secrets::set_internal`]), under a name
//! users' secrets cannot take. A master key rotation reseals keys with the
//! rest, and `mayfly secret list` does not show them.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::clock::now_ms;
use crate::error::PlatformError;
use crate::secrets::Secrets;

/// The kind of the sealed records holding S3 keys.
const KIND: &str = "s3-key";
/// The grant that reaches every bucket.
pub const ALL_BUCKETS: &str = "*";
/// Most buckets one key may name.
const MAX_BUCKETS: usize = 100;

/// A key as stored (sealed).
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredKey {
    pub(crate) name: String,
    pub(crate) secret: String,
    pub(crate) buckets: Vec<String>,
    pub(crate) created_at_ms: i64,
}

impl StoredKey {
    /// Whether the key may use `bucket`.
    pub(crate) fn grants(&self, bucket: &str) -> bool {
        bucket_granted(&self.buckets, bucket)
    }
}

/// Whether a key granted `buckets` may use `bucket`.
pub(crate) fn bucket_granted(buckets: &[String], bucket: &str) -> bool {
    buckets
        .iter()
        .any(|granted| granted == ALL_BUCKETS || granted == bucket)
}

impl Drop for StoredKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

/// An S3 access key as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct S3KeyInfo {
    /// The access key id (`MF…`), public.
    pub access_key_id: String,
    /// What the key is for.
    pub name: String,
    /// The buckets it reaches (`*`: all).
    pub buckets: Vec<String>,
    /// When it was created (ms since the Unix epoch).
    pub created_at_ms: i64,
}

/// A new access key id: `MF` and 18 upper-case letters and digits, the
/// shape of an AWS one (20 characters), so tools that check it accept it.
fn new_key_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bytes = [0u8; 18];
    rand::rng().fill_bytes(&mut bytes);
    let tail: String = bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    format!("MF{tail}")
}

/// A new secret: 240 random bits as 40 characters, the length of an AWS one.
fn new_secret() -> String {
    let mut bytes = [0u8; 30];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn check_key_id(id: &str) -> Result<(), PlatformError> {
    if id.len() == 20 && id.starts_with("MF") && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(PlatformError::NotFound(format!(
            "`{}` is not an S3 access key id (`MF` and 18 letters or digits): list them with \
             `mayfly token list --s3`",
            id.escape_debug()
        )))
    }
}

/// Creates an S3 key for `buckets` (`*` for all); returns it and its secret
/// (shown once).
pub async fn create(
    secrets: &Arc<Secrets>,
    name: &str,
    buckets: Vec<String>,
) -> Result<(S3KeyInfo, Zeroizing<String>), PlatformError> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(PlatformError::BadRequest(
            "a key name is 1 to 128 printable characters".into(),
        ));
    }
    if buckets.is_empty() || buckets.len() > MAX_BUCKETS {
        return Err(PlatformError::BadRequest(format!(
            "give 1 to {MAX_BUCKETS} buckets the key may use (`--bucket NAME`, repeated), or \
             `--bucket '*'` for all"
        )));
    }
    for bucket in &buckets {
        if bucket != ALL_BUCKETS {
            crate::validate::check_name("bucket", bucket)?;
        }
    }
    let stored = StoredKey {
        name: name.to_string(),
        secret: new_secret(),
        buckets,
        created_at_ms: now_ms(),
    };
    let id = new_key_id();
    let json =
        Zeroizing::new(serde_json::to_vec(&stored).map_err(|e| PlatformError::Internal(e.into()))?);
    secrets.set_internal(KIND, &id, &json).await?;
    let info = S3KeyInfo {
        access_key_id: id,
        name: stored.name.clone(),
        buckets: stored.buckets.clone(),
        created_at_ms: stored.created_at_ms,
    };
    Ok((info, Zeroizing::new(stored.secret.clone())))
}

/// The key `id`, if it exists.
pub(crate) async fn lookup(
    secrets: &Secrets,
    id: &str,
) -> Result<Option<StoredKey>, PlatformError> {
    if check_key_id(id).is_err() {
        return Ok(None);
    }
    let Some(json) = secrets.get_internal(KIND, id).await? else {
        return Ok(None);
    };
    let stored = serde_json::from_slice(&json).map_err(|e| {
        PlatformError::Internal(anyhow::anyhow!("S3 key {id} is stored malformed: {e}"))
    })?;
    Ok(Some(stored))
}

/// Every S3 key, by id.
pub async fn list(secrets: &Arc<Secrets>) -> Result<Vec<S3KeyInfo>, PlatformError> {
    let mut keys = Vec::new();
    for id in secrets.list_internal(KIND).await? {
        // Deleted between the listing and the read: skipped.
        if let Some(stored) = lookup(secrets, &id).await? {
            keys.push(S3KeyInfo {
                access_key_id: id,
                name: stored.name.clone(),
                buckets: stored.buckets.clone(),
                created_at_ms: stored.created_at_ms,
            });
        }
    }
    keys.sort_by(|a, b| a.access_key_id.cmp(&b.access_key_id));
    Ok(keys)
}

/// Deletes the key `id`: requests signed with it are refused from then on.
pub async fn revoke(secrets: &Arc<Secrets>, id: &str) -> Result<(), PlatformError> {
    check_key_id(id)?;
    if secrets.delete_internal(KIND, id).await? {
        Ok(())
    } else {
        Err(PlatformError::NotFound(format!(
            "no S3 key `{id}`: list them with `mayfly token list --s3`"
        )))
    }
}
