//! What a deployed function may reach beyond its sandbox, built from its
//! grants: the runtime's [`Capabilities`] backed by the node's stores.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use mayfly_runtime::{Capabilities, ConfigSource, KeyValueBackend, OutboundPolicy};
use mayfly_store::{FunctionConfig, Grants, KvCondition};

use crate::error::PlatformError;
use crate::platform::Platform;
use crate::validate::{MAX_VALUE_BYTES, check_name, check_secret_name};

/// wasi:config key under which a function reads its per-invocation
/// credential (minted on read, so functions that never ask pay nothing).
pub const CREDENTIAL_KEY: &str = "mayfly.credential";
/// wasi:config key holding the admin API's URL, where the credential works.
pub const API_URL_KEY: &str = "mayfly.api_url";

/// Keys listed per page of wasi:keyvalue `list-keys`.
const LIST_PAGE: usize = 1000;
/// Attempts of an `increment` that keeps losing its compare-and-swap.
const INCREMENT_ATTEMPTS: usize = 64;

/// Builds the capabilities of `function` at `version` from its config.
/// Fails (with a message for the deployer) if its outbound allow-list does
/// not parse.
pub(crate) fn capabilities(
    platform: &Weak<Platform>,
    keyvalue: &Arc<dyn KeyValueBackend>,
    function: &str,
    generation: i64,
    version: u64,
    config: &FunctionConfig,
) -> Result<Arc<Capabilities>, String> {
    let outbound = OutboundPolicy::parse(&config.grants.outbound)?;
    Ok(Arc::new(Capabilities {
        kv_buckets: config.grants.kv.iter().cloned().collect(),
        keyvalue: keyvalue.clone(),
        config: Arc::new(FunctionConfigSource {
            platform: platform.clone(),
            function: function.to_string(),
            generation,
            version,
            grants: config.grants.clone(),
            variables: config.variables.clone(),
        }),
        outbound: Arc::new(outbound),
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
    ] {
        for name in names {
            check_name(kind, name)?;
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
                 (`{CREDENTIAL_KEY}`, `{API_URL_KEY}`): rename it"
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
    Ok(())
}

/// wasi:keyvalue over the node's KV store. Buckets a function was not
/// granted never get here: the runtime refuses to open them.
pub(crate) struct NodeKeyValue {
    pub(crate) platform: Weak<Platform>,
}

impl NodeKeyValue {
    fn platform(&self) -> anyhow::Result<Arc<Platform>> {
        self.platform
            .upgrade()
            .ok_or_else(|| anyhow::anyhow!("the node is shutting down"))
    }
}

#[async_trait::async_trait]
impl KeyValueBackend for NodeKeyValue {
    async fn get(&self, bucket: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match self.platform()?.events().kv_get(bucket, key).await {
            Ok(entry) => Ok(Some(entry.value)),
            Err(PlatformError::Missing(_)) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> anyhow::Result<()> {
        check_value_size(&value)?;
        self.platform()?
            .events()
            .kv_put(bucket, key, Bytes::from(value), KvCondition::Any)
            .await?;
        Ok(())
    }

    async fn delete(&self, bucket: &str, key: &str) -> anyhow::Result<()> {
        match self
            .platform()?
            .events()
            .kv_delete(bucket, key, KvCondition::Any)
            .await
        {
            // Deleting a missing key is not an error in wasi:keyvalue.
            Ok(()) | Err(PlatformError::Missing(_)) => Ok(()),
            Err(error) => Err(error.into()),
        }
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
            .platform()?
            .events()
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
        let platform = self.platform()?;
        let events = platform.events();
        for _ in 0..INCREMENT_ATTEMPTS {
            let (current, condition) = match events.kv_get(bucket, key).await {
                Ok(entry) => {
                    let text = std::str::from_utf8(&entry.value).unwrap_or("");
                    let number: u64 = text.trim().parse().map_err(|_| {
                        anyhow::anyhow!(
                            "key `{key}` holds a value that is not a decimal number, so it \
                             cannot be incremented"
                        )
                    })?;
                    (number, KvCondition::Revision(entry.revision))
                }
                Err(PlatformError::Missing(_)) => (0, KvCondition::Absent),
                Err(error) => return Err(error.into()),
            };
            let next = current
                .checked_add(delta)
                .ok_or_else(|| anyhow::anyhow!("incrementing `{key}` would overflow a u64"))?;
            match events
                .kv_put(bucket, key, Bytes::from(next.to_string()), condition)
                .await
            {
                Ok(_) => return Ok(next),
                // Another writer got there first: read again.
                Err(PlatformError::PreconditionFailed(_)) => continue,
                Err(error) => return Err(error.into()),
            }
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
        let platform = self.platform()?;
        let events = platform.events();
        // Compare the value, then write only if its revision is the one read.
        let condition = match (events.kv_get(bucket, key).await, current) {
            (Ok(entry), Some(expected)) if entry.value == expected => {
                KvCondition::Revision(entry.revision)
            }
            (Err(PlatformError::Missing(_)), None) => KvCondition::Absent,
            (Ok(_), _) | (Err(PlatformError::Missing(_)), Some(_)) => return Ok(false),
            (Err(error), _) => return Err(error.into()),
        };
        match events
            .kv_put(bucket, key, Bytes::from(new), condition)
            .await
        {
            Ok(_) => Ok(true),
            // Another writer got there first.
            Err(PlatformError::PreconditionFailed(_)) => Ok(false),
            Err(error) => Err(error.into()),
        }
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
    platform: Weak<Platform>,
    function: String,
    /// The function's creation time, bound into its credentials.
    generation: i64,
    version: u64,
    grants: Grants,
    variables: BTreeMap<String, String>,
}

impl FunctionConfigSource {
    fn platform(&self) -> Result<Arc<Platform>, String> {
        self.platform
            .upgrade()
            .ok_or_else(|| "the node is shutting down".to_string())
    }

    async fn secret(&self, name: &str) -> Result<Option<String>, String> {
        let platform = self.platform()?;
        let value = platform
            .secrets()
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
            let platform = self.platform()?;
            return platform
                .auth()
                .mint_credential(&self.function, self.generation, self.version, &self.grants)
                .map(Some)
                .map_err(|e| e.to_string());
        }
        if key == API_URL_KEY {
            return Ok(self.platform()?.api_url().map(str::to_string));
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
        let platform = self.platform()?;
        let exists = platform
            .secrets()
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
