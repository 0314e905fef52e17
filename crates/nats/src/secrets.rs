//! The [`SecretStore`] on a JetStream KV bucket (`<ns>_secrets`): only
//! ciphertext travels and is stored; the master key stays on each node.
//!
//! Keys: `ctr` (the last version given, one counter for every secret) and
//! `sec.<name>` (a [`Record`]; names that are not plain become hex tokens).
//!
//! Deviation from docs/fleet-design.md §4: `put` cannot "seal again and
//! retry" on a conflict, because its seal callback is `FnOnce`. So it
//! first takes a version from `ctr` by compare-and-swap (retried freely,
//! nothing sealed yet), then seals for that version, then writes the
//! record expecting the revision it read. A version taken for a seal that
//! fails is never used: versions increase, with gaps. A reseal marks the
//! records it rewrites, so a watcher tells `Resealed` instead of puts.

use std::sync::Arc;

use async_nats::jetstream::kv::{self, Operation};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use mayfly_store::{
    ChangeFeed, ResealFn, Result, SealFn, Sealed, SealedSecret, SecretChange, SecretMeta,
    SecretPut, SecretStore, StoreError,
};

use crate::Fleet;
use crate::batch::{self, BatchError, MAX_BATCH, Write};
use crate::registry::{token, untoken};
use crate::watch::{self, Watched};

/// Attempts of a write that keeps losing to other writers.
const MAX_ATTEMPTS: usize = 16;

const COUNTER: &str = "ctr";

/// A stored secret, `sec.<name>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    name: String,
    version: u64,
    key_id: String,
    /// Hex, as the ciphertext.
    nonce: String,
    ciphertext: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    /// Rewritten by a reseal (the value did not change), not put.
    #[serde(default)]
    resealed: bool,
}

impl Record {
    fn secret(&self) -> Result<SealedSecret> {
        let bytes = |hex_text: &str| {
            hex::decode(hex_text)
                .map_err(|e| StoreError::Corrupt(format!("secret {}: {e}", self.name)))
        };
        Ok(SealedSecret {
            name: self.name.clone(),
            version: self.version,
            sealed: Sealed {
                key_id: self.key_id.clone(),
                nonce: bytes(&self.nonce)?,
                ciphertext: bytes(&self.ciphertext)?,
            },
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        })
    }

    fn seal(&mut self, sealed: &Sealed) {
        self.key_id = sealed.key_id.clone();
        self.nonce = hex::encode(&sealed.nonce);
        self.ciphertext = hex::encode(&sealed.ciphertext);
    }
}

fn sec_key(name: &str) -> String {
    format!("sec.{}", token(name))
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn change_of(entry: &kv::Entry) -> Option<SecretChange> {
    let name = untoken(entry.key.strip_prefix("sec.")?)?;
    if entry.operation != Operation::Put {
        return Some(SecretChange::Deleted { name });
    }
    let record: Record = serde_json::from_slice(&entry.value).ok()?;
    Some(if record.resealed {
        SecretChange::Resealed
    } else {
        SecretChange::Put {
            name,
            version: record.version,
        }
    })
}

/// The secret store on JetStream KV.
pub struct NatsSecrets {
    client: async_nats::Client,
    /// Where atomic batches publish ([`Fleet::write_prefix`]).
    write_prefix: String,
    watched: Arc<Watched<SecretChange>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for NatsSecrets {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl NatsSecrets {
    /// Opens (creating if needed) the fleet's secrets bucket with
    /// `num_replicas` replicas, and starts the watch that tells of other
    /// nodes' changes.
    pub async fn open(fleet: &Fleet, num_replicas: usize) -> Result<Self> {
        let kv =
            batch::atomic_bucket(fleet.jetstream(), &fleet.name("secrets"), num_replicas).await?;
        let write_prefix = fleet.write_prefix(&kv);
        let (watched, watcher) = Watched::start(fleet, kv, change_of, watch::dedup).await?;
        Ok(Self {
            client: fleet.client().clone(),
            write_prefix,
            watched,
            watcher,
        })
    }

    async fn read<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<(Option<T>, u64)> {
        let entry = self.watched.kv.entry(key).await.map_err(crate::backend)?;
        let Some(entry) = entry else {
            return Ok((None, 0));
        };
        if entry.operation != Operation::Put {
            return Ok((None, entry.revision));
        }
        let value = serde_json::from_slice(&entry.value)
            .map_err(|e| StoreError::Corrupt(format!("secrets key {key}: {e}")))?;
        Ok((Some(value), entry.revision))
    }

    /// Commits `writes`; `Ok(false)` when an expectation failed. A commit
    /// whose answer never came is reported as an error: the caller cannot
    /// tell whether it landed without a re-read it is better placed to do.
    async fn commit(&self, writes: &[Write]) -> Result<bool> {
        let mut own = self.watched.own.lock().await;
        match batch::commit(&self.client, &self.write_prefix, writes).await {
            Ok(done) => {
                own.extend(done.first..=done.last);
                Ok(true)
            }
            Err(BatchError::WrongLastSequence) => Ok(false),
            Err(BatchError::Failed(error) | BatchError::Unknown(error)) => Err(error),
        }
    }

    /// Takes the next version from the counter.
    async fn next_version(&self) -> Result<u64> {
        for _ in 0..MAX_ATTEMPTS {
            let (last, revision) = self.read::<u64>(COUNTER).await?;
            let version = last.unwrap_or(0) + 1;
            if self
                .commit(&[Write::put(COUNTER, json(&version)?).expect(revision)])
                .await?
            {
                return Ok(version);
            }
        }
        Err(StoreError::Stale(
            "the secrets' version counter kept changing; retry".into(),
        ))
    }

    /// Every stored secret with its revision, by name.
    async fn records(&self) -> Result<Vec<(Record, u64)>> {
        let prefix = &self.watched.kv.prefix;
        let subjects: Vec<(String, usize)> = self
            .watched
            .kv
            .stream
            .info_with_subjects(format!("{prefix}sec.*"))
            .await
            .map_err(crate::backend)?
            .try_collect()
            .await
            .map_err(crate::backend)?;
        let keys: Vec<String> = subjects
            .into_iter()
            .filter_map(|(subject, _)| subject.strip_prefix(prefix.as_str()).map(str::to_string))
            .collect();
        let read =
            futures::future::try_join_all(keys.iter().map(|key| self.read::<Record>(key))).await?;
        let mut records: Vec<(Record, u64)> = read
            .into_iter()
            .filter_map(|(record, revision)| record.map(|r| (r, revision)))
            .collect();
        records.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(records)
    }
}

#[async_trait::async_trait]
impl SecretStore for NatsSecrets {
    async fn put(&self, name: &str, seal: SealFn) -> Result<SecretPut> {
        let version = self.next_version().await?;
        let sealed = seal(version)?;
        let key = sec_key(name);
        for _ in 0..MAX_ATTEMPTS {
            let (current, revision) = self.read::<Record>(&key).await?;
            if let Some(current) = &current
                && current.version > version
            {
                // A later put of the same secret landed first: this one
                // would undo it.
                return Err(StoreError::Stale(format!(
                    "secret `{name}` was changed (version {}) while this version was sealed; \
                     retry",
                    current.version
                )));
            }
            let now = now_ms();
            let mut record = Record {
                name: name.to_string(),
                version,
                key_id: String::new(),
                nonce: String::new(),
                ciphertext: String::new(),
                created_at_ms: current.as_ref().map_or(now, |c| c.created_at_ms),
                updated_at_ms: now,
                resealed: false,
            };
            record.seal(&sealed);
            if self
                .commit(&[Write::put(key.clone(), json(&record)?).expect(revision)])
                .await?
            {
                self.watched.emit(SecretChange::Put {
                    name: name.to_string(),
                    version,
                });
                return Ok(SecretPut {
                    version,
                    created: current.is_none(),
                });
            }
        }
        Err(StoreError::Stale(format!(
            "secret `{name}` kept changing; retry"
        )))
    }

    async fn get(&self, name: &str) -> Result<Option<SealedSecret>> {
        self.read::<Record>(&sec_key(name))
            .await?
            .0
            .map(|record| record.secret())
            .transpose()
    }

    async fn list(&self) -> Result<Vec<SecretMeta>> {
        Ok(self
            .records()
            .await?
            .into_iter()
            .map(|(record, _)| SecretMeta {
                name: record.name,
                version: record.version,
                key_id: record.key_id,
                created_at_ms: record.created_at_ms,
                updated_at_ms: record.updated_at_ms,
            })
            .collect())
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let key = sec_key(name);
        for _ in 0..MAX_ATTEMPTS {
            let (current, revision) = self.read::<Record>(&key).await?;
            if current.is_none() {
                return Ok(false);
            }
            if self
                .commit(&[Write::delete(key.clone()).expect(revision)])
                .await?
            {
                self.watched.emit(SecretChange::Deleted {
                    name: name.to_string(),
                });
                return Ok(true);
            }
        }
        Err(StoreError::Stale(format!(
            "secret `{name}` kept changing; retry"
        )))
    }

    async fn reseal_all(&self, mut reseal: ResealFn) -> Result<usize> {
        for _ in 0..MAX_ATTEMPTS {
            let mut writes = Vec::new();
            for (mut record, revision) in self.records().await? {
                let Some(sealed) = reseal(&record.secret()?)? else {
                    continue;
                };
                record.seal(&sealed);
                record.resealed = true;
                writes.push(Write::put(sec_key(&record.name), json(&record)?).expect(revision));
            }
            if writes.is_empty() {
                return Ok(0);
            }
            if writes.len() > MAX_BATCH {
                return Err(StoreError::Conflict(format!(
                    "{} secrets cannot be resealed in one atomic batch (at most {MAX_BATCH})",
                    writes.len()
                )));
            }
            // All or nothing: a secret changed meanwhile fails the batch,
            // and the next round reseals what is there now.
            if self.commit(&writes).await? {
                self.watched.emit(SecretChange::Resealed);
                return Ok(writes.len());
            }
        }
        Err(StoreError::Stale(
            "secrets kept changing during the reseal; retry".into(),
        ))
    }

    fn watch(&self) -> ChangeFeed<SecretChange> {
        self.watched.subscribe()
    }
}
