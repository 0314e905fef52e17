//! What a function may reach beyond its sandbox: key-value buckets
//! (wasi:keyvalue), configuration values and secrets (wasi:config) and
//! outbound HTTP.
//!
//! Least privilege: linking these interfaces grants nothing. Each deployed
//! version carries its [`Capabilities`], and every call is checked against
//! them; a refusal is the interface's own error plus a `mayfly:` line in the
//! invocation's stderr log, so the function's author sees what to grant.
//! Storage lives above this crate, behind [`KeyValueBackend`] and
//! [`ConfigSource`].

mod config;
mod inference_threads;
mod keyvalue;
mod keyvalue_draft2;
mod nn;
mod resources;

pub use nn::{IdleModel, ModelSource, NnHost, NnLimits, OnnxModel};

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use wasmtime::component::{HasData, Linker, ResourceTable};

use crate::logs::GuestOutput;
use crate::meter::MemoryMeter;
use crate::outbound::OutboundPolicy;

/// Host bindings of `wit/`: the WASI drafts Mayfly implements, at the
/// versions of their own repositories.
mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "mayfly:host/capabilities",
        imports: {
            // Host calls await the platform's stores (SQLite runs off the
            // async runtime). Only a bad resource handle traps.
            "wasi:config": async,
            default: async | trappable,
        },
        with: {
            "wasi:keyvalue/store.bucket": super::resources::Bucket,
        },
        trappable_error_type: {
            "wasi:keyvalue/store.error" => super::resources::KvError,
        },
    });
}

/// Host bindings of `wit/compat/`: other versions of the same drafts, as
/// other hosts ship them (wasi:config 0.2.0-rc.1 in wasmtime-wasi-config,
/// 0.2.0-draft-2024-09-27 and wasi:keyvalue 0.2.0-draft2 in Spin 3). Each is
/// a thin adapter over the same grants and stores.
mod compat {
    wasmtime::component::bindgen!({
        path: "wit/compat",
        world: "mayfly:compat/capabilities",
        imports: {
            "wasi:config": async,
            default: async | trappable,
        },
        with: {
            "wasi:keyvalue/store@0.2.0-draft2.bucket": super::resources::Bucket,
            "wasi:keyvalue/atomics@0.2.0-draft2.cas": super::resources::Cas,
        },
        trappable_error_type: {
            "wasi:keyvalue/store@0.2.0-draft2.error" => super::resources::KvError,
        },
    });
}

/// Host bindings of `wit/nn/`: wasi:nn at the version wasmtime-wasi-nn 48
/// ships. Every call is async: `load-by-name` awaits the model store and
/// `compute` awaits the blocking pool.
mod nn_bindings {
    wasmtime::component::bindgen!({
        path: "wit/nn",
        world: "wasi:nn/ml",
        imports: { default: async | trappable },
        with: {
            "wasi:nn/graph.graph": super::nn::Graph,
            "wasi:nn/tensor.tensor": super::nn::Tensor,
            "wasi:nn/inference.graph-execution-context": super::nn::ExecutionContext,
            "wasi:nn/errors.error": super::nn::NnError,
        },
    });
}

/// What one function may reach beyond its sandbox; built by the platform per
/// deployed version and shared by its invocations.
pub struct Capabilities {
    /// KV buckets the function may open through wasi:keyvalue (its grants).
    pub kv_buckets: BTreeSet<String>,
    /// The bucket `open("")` opens: the function's own default store,
    /// which no other function can be granted. `None`: `open("")` is
    /// denied like any ungranted bucket.
    pub default_kv_bucket: Option<String>,
    /// Where granted buckets live.
    pub keyvalue: Arc<dyn KeyValueBackend>,
    /// Variables and granted secrets, read through wasi:config.
    pub config: Arc<dyn ConfigSource>,
    /// Outbound HTTP allow-list.
    pub outbound: Arc<OutboundPolicy>,
    /// Environment variables every instance starts with
    /// (wasi:cli/environment).
    pub env: Vec<(String, String)>,
    /// Environment variables whose values are secrets, as (variable,
    /// secret name): read through [`ConfigSource::env_secret`] as each
    /// instance starts, so a rotated secret reaches the next instance.
    pub env_secrets: Vec<(String, String)>,
    /// Models the function may load by name through wasi:nn (its grants).
    pub models: BTreeSet<String>,
    /// The node's wasi:nn host; `None`: every wasi:nn call fails with
    /// `unsupported-operation`.
    pub nn: Option<Arc<NnHost>>,
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capabilities")
            .field("kv_buckets", &self.kv_buckets)
            .field("outbound", &self.outbound)
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

impl Capabilities {
    /// Nothing granted: no buckets, empty config, deny-all outbound.
    pub fn none() -> Arc<Self> {
        Arc::new(Self {
            kv_buckets: BTreeSet::new(),
            default_kv_bucket: None,
            keyvalue: Arc::new(NoBuckets),
            config: Arc::new(EmptyConfig),
            outbound: Arc::new(OutboundPolicy::deny_all()),
            env: Vec::new(),
            env_secrets: Vec::new(),
            models: BTreeSet::new(),
            nn: None,
        })
    }
}

/// Where key-value buckets live. The host checks grants before calling it,
/// so it only ever sees buckets the function may use.
#[async_trait::async_trait]
pub trait KeyValueBackend: Send + Sync {
    /// The value of `key`, or `None` if it is not set.
    async fn get(&self, bucket: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    /// Sets `key` to `value`, replacing any previous value.
    async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> anyhow::Result<()>;
    /// Removes `key`; an absent key is not an error.
    async fn delete(&self, bucket: &str, key: &str) -> anyhow::Result<()>;
    /// Whether `key` is set.
    async fn exists(&self, bucket: &str, key: &str) -> anyhow::Result<bool>;
    /// Keys in order, `cursor` = how many keys were already returned; returns
    /// the next page and the cursor of the page after it (None at the end).
    async fn list_keys(
        &self,
        bucket: &str,
        cursor: u64,
    ) -> anyhow::Result<(Vec<String>, Option<u64>)>;
    /// Adds `delta` to the key's value read as a decimal u64 (absent = 0),
    /// atomically; returns the new value.
    async fn increment(&self, bucket: &str, key: &str, delta: u64) -> anyhow::Result<u64>;
    /// Sets `key` to `new` only if it still holds `current` (`None`: only if
    /// it is absent), atomically; returns whether it did. A key that changed
    /// is `Ok(false)`, not an error.
    async fn compare_and_swap(
        &self,
        bucket: &str,
        key: &str,
        current: Option<&[u8]>,
        new: Vec<u8>,
    ) -> anyhow::Result<bool>;
}

/// The configuration values and secrets one function sees.
#[async_trait::async_trait]
pub trait ConfigSource: Send + Sync {
    /// The value of `key`: Ok(None) if it is not set; Err(message) when it
    /// exists but the function may not read it (the message says how to
    /// grant it).
    async fn get(&self, key: &str) -> Result<Option<String>, String>;
    /// Every value the function may read.
    async fn get_all(&self) -> Result<Vec<(String, String)>, String>;
    /// The value of secret `name`, which the function exposes as an
    /// environment variable: Ok(None) if it does not exist.
    async fn env_secret(&self, name: &str) -> Result<Option<String>, String> {
        Err(format!("secret `{name}` cannot be read here"))
    }
}

/// The backend of [`Capabilities::none`]: no bucket is ever granted, so it is
/// never reached; it fails rather than pretend to store anything.
struct NoBuckets;

#[async_trait::async_trait]
impl KeyValueBackend for NoBuckets {
    async fn get(&self, _: &str, _: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Err(no_buckets())
    }
    async fn set(&self, _: &str, _: &str, _: Vec<u8>) -> anyhow::Result<()> {
        Err(no_buckets())
    }
    async fn delete(&self, _: &str, _: &str) -> anyhow::Result<()> {
        Err(no_buckets())
    }
    async fn exists(&self, _: &str, _: &str) -> anyhow::Result<bool> {
        Err(no_buckets())
    }
    async fn list_keys(&self, _: &str, _: u64) -> anyhow::Result<(Vec<String>, Option<u64>)> {
        Err(no_buckets())
    }
    async fn increment(&self, _: &str, _: &str, _: u64) -> anyhow::Result<u64> {
        Err(no_buckets())
    }
    async fn compare_and_swap(
        &self,
        _: &str,
        _: &str,
        _: Option<&[u8]>,
        _: Vec<u8>,
    ) -> anyhow::Result<bool> {
        Err(no_buckets())
    }
}

fn no_buckets() -> anyhow::Error {
    anyhow::anyhow!("no key-value store is configured")
}

/// The config of [`Capabilities::none`]: nothing is set.
struct EmptyConfig;

#[async_trait::async_trait]
impl ConfigSource for EmptyConfig {
    async fn get(&self, _: &str) -> Result<Option<String>, String> {
        Ok(None)
    }
    async fn get_all(&self) -> Result<Vec<(String, String)>, String> {
        Ok(Vec::new())
    }
}

/// What the capability host functions of one invocation work with: borrowed
/// from the store's data for the length of one call.
pub(crate) struct CapsView<'a> {
    pub(crate) caps: &'a Capabilities,
    pub(crate) table: &'a mut ResourceTable,
    /// The invocation's stderr, where refusals are explained.
    pub(crate) stderr: &'a GuestOutput,
    /// The invocation's memory meter: results the host builds for the guest
    /// must fit in what its limit leaves.
    pub(crate) memory: &'a mut MemoryMeter,
    /// Time the invocation's host work ran off its own task (wasi:nn
    /// `compute` on the blocking pool), added to its CPU time.
    pub(crate) extra_cpu: &'a mut std::time::Duration,
    /// Time the invocation waited for inferences in its first slice, which
    /// does not count toward the slice (see `fair::FirstSlice`).
    pub(crate) awaited_inference: &'a mut std::time::Duration,
}

impl CapsView<'_> {
    /// Explains a refusal in the invocation's log and the node's.
    fn deny(&self, line: &str) {
        let labels = self.stderr.labels();
        tracing::warn!(
            function = %labels.function,
            version = labels.version,
            request_id = %labels.request_id,
            "{line}"
        );
        self.stderr.host_line(&format!("mayfly: {line}"));
    }
}

struct HasCaps;

impl HasData for HasCaps {
    type Data<'a> = CapsView<'a>;
}

/// Links wasi:keyvalue (store, atomics, batch) and wasi:config (store) at
/// their 0.2.0-draft versions.
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> CapsView<'_>,
) -> wasmtime::Result<()> {
    use bindings::wasi::{config, keyvalue};
    keyvalue::store::add_to_linker::<T, HasCaps>(linker, view)?;
    keyvalue::atomics::add_to_linker::<T, HasCaps>(linker, view)?;
    keyvalue::batch::add_to_linker::<T, HasCaps>(linker, view)?;
    config::store::add_to_linker::<T, HasCaps>(linker, view)?;
    Ok(())
}

/// Links the other versions other hosts ship: wasi:keyvalue 0.2.0-draft2
/// (store, atomics, batch), wasi:config 0.2.0-rc.1 and
/// 0.2.0-draft-2024-09-27 (store).
pub(crate) fn add_compat_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> CapsView<'_>,
) -> wasmtime::Result<()> {
    use compat::wasi::keyvalue;
    keyvalue::store::add_to_linker::<T, HasCaps>(linker, view)?;
    keyvalue::atomics::add_to_linker::<T, HasCaps>(linker, view)?;
    keyvalue::batch::add_to_linker::<T, HasCaps>(linker, view)?;
    compat::wasi::config0_2_0_rc_1::store::add_to_linker::<T, HasCaps>(linker, view)?;
    compat::wasi::config0_2_0_draft_2024_09_27::store::add_to_linker::<T, HasCaps>(linker, view)?;
    Ok(())
}

/// Links wasi:nn (`wasi:nn@0.2.0-rc-2024-10-28`: tensor, graph, inference,
/// errors).
pub(crate) fn add_nn_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> CapsView<'_>,
) -> wasmtime::Result<()> {
    use nn_bindings::wasi::nn;
    nn::errors::add_to_linker::<T, HasCaps>(linker, view)?;
    nn::tensor::add_to_linker::<T, HasCaps>(linker, view)?;
    nn::inference::add_to_linker::<T, HasCaps>(linker, view)?;
    nn::graph::add_to_linker::<T, HasCaps>(linker, view)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    //! Shared fixtures for the capability host tests.

    use std::sync::{Arc, Mutex};

    use crate::labels::RequestLabels;
    use crate::logs::{GuestOutput, LogSink, LogStream};

    /// Collects the lines written to a stream.
    #[derive(Default)]
    pub(crate) struct Lines(pub(crate) Mutex<Vec<String>>);

    impl LogSink for Lines {
        fn line(&self, _: &RequestLabels, _: LogStream, line: &str) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(line.to_string());
        }
    }

    impl Lines {
        pub(crate) fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
        }
    }

    /// A stderr stream writing into `lines`.
    pub(crate) fn stderr(lines: &Arc<Lines>) -> GuestOutput {
        GuestOutput::new(
            RequestLabels::for_test("f"),
            lines.clone(),
            LogStream::Stderr,
            1 << 20,
        )
    }
}
