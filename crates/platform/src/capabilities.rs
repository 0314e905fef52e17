//! What a deployed function may reach beyond its sandbox, built from its
//! grants: the runtime's [`Capabilities`] backed by the node's stores.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use mayfly_runtime::{Capabilities, ConfigSource, KeyValueBackend, OutboundPolicy};
use mayfly_store::{FunctionConfig, Grants, KvCondition, KvEntry, StoreError};

use crate::auth::Auth;
use crate::error::PlatformError;
use crate::events::EventHub;
use crate::secrets::Secrets;
use crate::validate::{
    MAX_VALUE_BYTES, check_env_name, check_key, check_name, check_queue_name, check_secret_name,
    default_bucket, default_bucket_owner,
};

/// wasi:config key under which a function reads its per-invocation
/// credential (minted on read, so functions that never ask pay nothing).
pub const CREDENTIAL_KEY: &str = "mayfly.credential";
/// wasi:config key holding the admin API's URL, where the credential works.
pub const API_URL_KEY: &str = "mayfly.api_url";
/// wasi:config key under which a function reads a per-invocation S3 key
/// pair, `ACCESS_KEY_ID:SECRET_ACCESS_KEY` (one value, so that both halves
/// come from one minting): good on the S3 endpoint for the function's
/// object buckets, as long as a credential; for presigned URLs it hands out.
pub const S3_KEY_KEY: &str = "mayfly.s3_key";
/// wasi:config key holding the S3 endpoint's URL (unset when the node
/// serves no S3), where the S3 key works.
pub const S3_URL_KEY: &str = "mayfly.s3_url";

/// Keys listed per page of wasi:keyvalue `list-keys`.
const LIST_PAGE: usize = 1000;
/// Attempts of an `increment` that keeps losing its compare-and-swap.
const INCREMENT_ATTEMPTS: usize = 64;

/// What the node lends its functions' capabilities.
pub(crate) struct NodeServices {
    /// wasi:keyvalue over the node's KV store, shared by every function.
    pub(crate) keyvalue: Arc<dyn KeyValueBackend>,
    /// Secrets that functions are granted.
    pub(crate) secrets: Arc<Secrets>,
    /// Mints the functions' credentials.
    pub(crate) auth: Arc<Auth>,
    /// The admin API's URL, once it listens.
    pub(crate) api_url: Arc<OnceLock<String>>,
    /// The S3 endpoint's URL, once it listens.
    pub(crate) s3_url: Arc<OnceLock<String>>,
    /// Models for wasi:nn, and the host that runs them.
    pub(crate) models: Arc<crate::models::Models>,
}

/// Builds the capabilities of `function` at `version` from its config.
/// Fails (with a message for the deployer) if its outbound allow-list does
/// not parse.
pub(crate) fn capabilities(
    services: &Arc<NodeServices>,
    function: &str,
    generation: i64,
    version: u64,
    config: &FunctionConfig,
) -> Result<Arc<Capabilities>, String> {
    let outbound = OutboundPolicy::parse(&config.grants.outbound)?;
    Ok(Arc::new(Capabilities {
        kv_buckets: config.grants.kv.iter().cloned().collect(),
        default_kv_bucket: Some(default_bucket(function)),
        keyvalue: services.keyvalue.clone(),
        config: Arc::new(FunctionConfigSource {
            services: services.clone(),
            function: function.to_string(),
            generation,
            version,
            grants: config.grants.clone(),
            variables: config.variables.clone(),
            env_secrets: config.env_secrets.values().cloned().collect(),
        }),
        outbound: Arc::new(outbound),
        env: config
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        env_secrets: config
            .env_secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        models: config.grants.models.iter().cloned().collect(),
        // Only functions granted a model hold the host; the others' wasi:nn
        // calls fail without touching it.
        nn: (!config.grants.models.is_empty()).then(|| services.models.nn().clone()),
    }))
}

/// Checks a function's grants and variables at deploy, before anything is
/// stored.
pub(crate) fn check_grants(config: &FunctionConfig) -> Result<(), PlatformError> {
    let bad = PlatformError::BadRequest;
    OutboundPolicy::parse(&config.grants.outbound).map_err(bad)?;
    for (kind, names) in [
        ("bucket", &config.grants.kv),
        ("bucket", &config.grants.objects),
        ("queue", &config.grants.queues),
        ("model", &config.grants.models),
    ] {
        for name in names {
            if kind == "queue" {
                check_queue_name(name)?;
            } else {
                check_name(kind, name)?;
            }
            if let Some(owner) = default_bucket_owner(name) {
                return Err(bad(format!(
                    "`{name}` is function `{owner}`'s default KV store (what its wasi:keyvalue \
                     open(\"\") opens): only `{owner}` reaches it; grant a bucket of its own"
                )));
            }
        }
    }
    for name in &config.grants.secrets {
        check_secret_name(name)
            .map_err(|e| PlatformError::BadRequest(format!("secret grant: {e}")))?;
    }
    for (key, value) in &config.variables {
        if key.is_empty() || key.len() > 128 || key.chars().any(char::is_control) {
            return Err(bad(format!(
                "variable name `{key}` must be 1 to 128 printable characters"
            )));
        }
        if key.starts_with("mayfly.") {
            return Err(bad(format!(
                "variable `{key}`: names starting with `mayfly.` are the node's \
                 (`{CREDENTIAL_KEY}`, `{API_URL_KEY}`, `{S3_KEY_KEY}`, `{S3_URL_KEY}`): rename \
                 it"
            )));
        }
        if config.grants.secrets.contains(key) {
            return Err(bad(format!(
                "variable `{key}` would hide the granted secret `{key}`: rename it"
            )));
        }
        if value.len() > 64 * 1024 {
            return Err(bad(format!("variable `{key}` is over 64 KiB")));
        }
    }
    check_env(config)
}

/// Most environment variables a function may have, plain and secret.
pub const MAX_ENV_VARS: usize = 256;
/// Most bytes of environment (names and plain values) a function may have:
/// every instance starts with a copy.
pub const MAX_ENV_BYTES: usize = 64 * 1024;

/// Checks a function's environment variables: portable names (what shells
/// and `std::env` accept everywhere), values a C string can hold, and a
/// bounded size.
fn check_env(config: &FunctionConfig) -> Result<(), PlatformError> {
    let bad = |message: String| PlatformError::BadRequest(message);
    let count = config.env.len() + config.env_secrets.len();
    if count > MAX_ENV_VARS {
        return Err(bad(format!(
            "{count} environment variables, over the limit of {MAX_ENV_VARS}: \
             put the rest in wasi:config variables (--var)"
        )));
    }
    for name in config.env.keys().chain(config.env_secrets.keys()) {
        check_env_name(name).map_err(bad)?;
    }
    let mut bytes = 0;
    for (name, value) in &config.env {
        if config.env_secrets.contains_key(name) {
            return Err(bad(format!(
                "environment variable `{name}` is given both a value and a secret: keep one"
            )));
        }
        if value.contains('\0') {
            return Err(bad(format!(
                "environment variable `{name}` contains a NUL character, which no \
                 environment can hold"
            )));
        }
        bytes += name.len() + value.len();
    }
    if bytes > MAX_ENV_BYTES {
        return Err(bad(format!(
            "the environment variables take {bytes} bytes, over the limit of {MAX_ENV_BYTES}: \
             put large values in wasi:config variables (--var) or a KV bucket"
        )));
    }
    for (name, secret) in &config.env_secrets {
        check_secret_name(secret).map_err(|e| {
            PlatformError::BadRequest(format!("environment variable `{name}`: {e}"))
        })?;
    }
    Ok(())
}

/// wasi:keyvalue over the node's KV store. Buckets a function was not
/// granted never get here: the runtime refuses to open them. Absence and a
/// lost compare-and-swap are told apart from the store's answers; other
/// failures reach the guest as the node words them.
pub(crate) struct NodeKeyValue {
    hub: Arc<EventHub>,
}

impl NodeKeyValue {
    /// wasi:keyvalue over `hub`'s KV store (whose writes fire KV triggers).
    pub(crate) fn new(hub: Arc<EventHub>) -> Self {
        Self { hub }
    }

    /// The entry under `key`, if any, after checking the names.
    async fn entry(&self, bucket: &str, key: &str) -> anyhow::Result<Option<KvEntry>> {
        check_name("bucket", bucket)?;
        check_key(key)?;
        self.hub.kv_entry(bucket, key).await.map_err(failure)
    }

    /// Writes `value` if `condition` holds: `false` when another writer
    /// got there first.
    async fn write(
        &self,
        bucket: &str,
        key: &str,
        value: Bytes,
        condition: KvCondition,
    ) -> anyhow::Result<bool> {
        check_name("bucket", bucket)?;
        check_key(key)?;
        match self.hub.kv_write(bucket, key, value, condition).await {
            Ok(_) => Ok(true),
            Err(StoreError::PreconditionFailed(_)) => Ok(false),
            Err(error) => Err(failure(error)),
        }
    }
}

/// A store failure as the guest sees it: in the node's words.
fn failure(error: StoreError) -> anyhow::Error {
    PlatformError::from(error).into()
}

#[async_trait::async_trait]
impl KeyValueBackend for NodeKeyValue {
    async fn get(&self, bucket: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.entry(bucket, key).await?.map(|entry| entry.value))
    }

    async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> anyhow::Result<()> {
        check_value_size(&value)?;
        self.write(bucket, key, Bytes::from(value), KvCondition::Any)
            .await?;
        Ok(())
    }

    async fn delete(&self, bucket: &str, key: &str) -> anyhow::Result<()> {
        check_name("bucket", bucket)?;
        check_key(key)?;
        // Deleting a missing key is not an error in wasi:keyvalue.
        self.hub
            .kv_remove(bucket, key, KvCondition::Any)
            .await
            .map_err(failure)?;
        Ok(())
    }

    async fn exists(&self, bucket: &str, key: &str) -> anyhow::Result<bool> {
        Ok(self.get(bucket, key).await?.is_some())
    }

    async fn list_keys(
        &self,
        bucket: &str,
        cursor: u64,
    ) -> anyhow::Result<(Vec<String>, Option<u64>)> {
        // The interface's cursor is a number, so it counts the keys already
        // returned; each page lists from the start of the bucket. Fine for
        // the bucket sizes functions walk; large scans belong to the admin
        // API's key-based paging.
        let skip = usize::try_from(cursor).unwrap_or(usize::MAX);
        let keys = self
            .hub
            .kv_list(
                bucket,
                String::new(),
                String::new(),
                skip.saturating_add(LIST_PAGE + 1),
            )
            .await?;
        let page: Vec<String> = keys
            .into_iter()
            .skip(skip)
            .map(|k| k.key)
            .collect::<Vec<_>>();
        let more = page.len() > LIST_PAGE;
        let page: Vec<String> = page.into_iter().take(LIST_PAGE).collect();
        let next = more.then(|| cursor + page.len() as u64);
        Ok((page, next))
    }

    async fn increment(&self, bucket: &str, key: &str, delta: u64) -> anyhow::Result<u64> {
        for _ in 0..INCREMENT_ATTEMPTS {
            let (current, condition) = match self.entry(bucket, key).await? {
                Some(entry) => {
                    let text = std::str::from_utf8(&entry.value).unwrap_or("");
                    let number: u64 = text.trim().parse().map_err(|_| {
                        anyhow::anyhow!(
                            "key `{key}` holds a value that is not a decimal number, so it \
                             cannot be incremented"
                        )
                    })?;
                    (number, KvCondition::Revision(entry.revision))
                }
                None => (0, KvCondition::Absent),
            };
            let next = current
                .checked_add(delta)
                .ok_or_else(|| anyhow::anyhow!("incrementing `{key}` would overflow a u64"))?;
            if self
                .write(bucket, key, Bytes::from(next.to_string()), condition)
                .await?
            {
                return Ok(next);
            }
            // Another writer got there first: read again.
        }
        anyhow::bail!("`{key}` changed too often to increment; try again")
    }

    async fn compare_and_swap(
        &self,
        bucket: &str,
        key: &str,
        current: Option<&[u8]>,
        new: Vec<u8>,
    ) -> anyhow::Result<bool> {
        check_value_size(&new)?;
        // Compare the value, then write only if its revision is the one read.
        let condition = match (self.entry(bucket, key).await?, current) {
            (Some(entry), Some(expected)) if entry.value == expected => {
                KvCondition::Revision(entry.revision)
            }
            (None, None) => KvCondition::Absent,
            (Some(_), _) | (None, Some(_)) => return Ok(false),
        };
        // False when another writer got there first.
        self.write(bucket, key, Bytes::from(new), condition).await
    }
}

/// Refuses values over the KV limit.
fn check_value_size(value: &[u8]) -> anyhow::Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        anyhow::bail!(
            "the value is {} bytes, over the KV limit of {} bytes",
            value.len(),
            MAX_VALUE_BYTES
        );
    }
    Ok(())
}

/// wasi:config for one function version: its variables, the secrets it was
/// granted, and its credential.
struct FunctionConfigSource {
    services: Arc<NodeServices>,
    function: String,
    /// The function's creation time, bound into its credentials.
    generation: i64,
    version: u64,
    grants: Grants,
    variables: BTreeMap<String, String>,
    /// Secrets exposed as environment variables: granted by that, and
    /// readable only as such.
    env_secrets: std::collections::BTreeSet<String>,
}

impl FunctionConfigSource {
    async fn secret(&self, name: &str) -> Result<Option<String>, String> {
        let value = self
            .services
            .secrets
            .reveal(name)
            .await
            .map_err(|e| format!("cannot read secret `{name}`: {e}"))?;
        Ok(value.map(|v| v.as_str().to_string()))
    }
}

#[async_trait::async_trait]
impl ConfigSource for FunctionConfigSource {
    async fn get(&self, key: &str) -> Result<Option<String>, String> {
        if key == CREDENTIAL_KEY {
            return self
                .services
                .auth
                .mint_credential(&self.function, self.generation, self.version, &self.grants)
                .map(Some)
                .map_err(|e| e.to_string());
        }
        if key == API_URL_KEY {
            return Ok(self.services.api_url.get().cloned());
        }
        if key == S3_KEY_KEY {
            let (id, secret) = self
                .services
                .auth
                .mint_s3_key(&self.function, self.generation, self.version, &self.grants)
                .map_err(|e| e.to_string())?;
            return Ok(Some(format!("{id}:{}", secret.as_str())));
        }
        if key == S3_URL_KEY {
            return Ok(self.services.s3_url.get().cloned());
        }
        if let Some(value) = self.variables.get(key) {
            return Ok(Some(value.clone()));
        }
        if self.grants.secrets.iter().any(|s| s == key) {
            return self.secret(key).await;
        }
        // Not a variable and not granted: say so if it is a secret, so the
        // function's author learns what to grant (the attempt is logged by
        // the runtime).
        let exists = self
            .services
            .secrets
            .exists(key)
            .await
            .map_err(|e| format!("cannot look up `{key}`: {e}"))?;
        if exists {
            return Err(format!(
                "secret `{key}` is not granted to function `{}` (deploy with --secret {key})",
                self.function
            ));
        }
        Ok(None)
    }

    async fn env_secret(&self, name: &str) -> Result<Option<String>, String> {
        if !self.env_secrets.contains(name) {
            return Err(format!(
                "secret `{name}` is not exposed to function `{}` (deploy with --env-secret VAR={name})",
                self.function
            ));
        }
        self.secret(name).await
    }

    async fn get_all(&self) -> Result<Vec<(String, String)>, String> {
        let mut all: Vec<(String, String)> = self
            .variables
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for name in &self.grants.secrets {
            if let Some(value) = self.secret(name).await? {
                all.push((name.clone(), value));
            }
        }
        all.sort();
        Ok(all)
    }
}
