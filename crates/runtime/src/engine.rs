//! The shared wasmtime engine, its linker and the epoch ticker.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use wasmtime::component::{Component, Linker};
use wasmtime::error::Context as _;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::caps;
use crate::fair::GuestPool;
use crate::invoke::{Function, Handler, Lifecycle};
use crate::state::InvocationState;
use crate::validate::{self, CompiledComponent, DeployError, HandlerKind};

/// Bytes of each pool slot's memory and tables kept resident between
/// instances (see `linear_memory_keep_resident`) when the kernel can tell
/// which pages a request dirtied (PAGEMAP_SCAN): 2 MiB covers what a typical
/// Rust guest touches per request, its shadow stack (the first 1 MiB)
/// included, so resetting a slot needs no `madvise` at all.
const KEEP_RESIDENT_SCANNED: usize = 2 << 20;
/// Without PAGEMAP_SCAN the whole kept region is memset on every reset, so
/// keep it small.
const KEEP_RESIDENT_UNSCANNED: usize = 64 * 1024;

/// Components whose largest memory starts at this many wasm pages (4 MiB)
/// or more run on the big-memory engine: interpreters snapshotted at build
/// time (componentize-py: 197 pages, componentize-js: 145), whose every
/// fresh instance starts from a memory image of megabytes. Rust guests
/// start at 17.
const BIG_MEMORY_PAGES: u64 = 64;
/// The big-memory engine resets the first 16 MiB of a slot by copying the
/// image back over it (or zeroing) instead of scanning for dirty pages and
/// `madvise`-ing the rest away. PAGEMAP_SCAN reports at most 32 runs of
/// dirty pages per reset (wasmtime 48's `MAX_REGIONS`) and an interpreter
/// dirties pages all over its image (reference counts, its heap), so the
/// scan stopped early and the rest was decommitted: each request then took
/// ~255 page faults, most of them copy-on-write faults that flush the TLB
/// of every core. A 12–16 MiB copy costs less than that. Measured on the
/// python-http template's echo, 2 cores, wrk -t2 -c64, 3 alternating runs:
/// 3.2–3.3 → 1.1–1.2 ms of node CPU per request, 588–608 → 1578–1713
/// req/s; js-http 0.76–0.94 → 0.35–0.39 ms, 2063–2542 → 4775–5422 req/s.
/// The cost is memory: a slot keeps up to this much resident, so
/// the engine keeps fewer idle slots warm ([`BIG_WARM_SLOTS`]).
const KEEP_RESIDENT_BIG: usize = 16 << 20;
/// Tables are memset up to this much on every reset of a big-memory slot.
const TABLE_KEEP_RESIDENT_BIG: usize = 64 * 1024;
/// Idle slots of the big-memory engine kept with their image and resident
/// pages for the next instance of the same component: at most
/// 32 × 16 MiB resident for slots no instance uses.
const BIG_WARM_SLOTS: u32 = 32;

/// Node-wide settings of the runtime, fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Most guest instances alive at once on this node; sizes the pooling
    /// allocator's slots.
    pub max_instances: u32,
    /// Largest linear memory any one instance may grow to, in bytes. The
    /// per-function memory limit is enforced below this.
    pub max_instance_memory: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_instances: 1000,
            max_instance_memory: 1 << 30,
        }
    }
}

/// The compiler and executor of components: one per node.
///
/// Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Runtime {
    /// For WASI 0.2 components: the hot path, without async support.
    p2: EngineAndLinker,
    /// For WASI 0.2 components with a memory of [`BIG_MEMORY_PAGES`] or
    /// more: the same code generation as `p2` (so it loads `p2`'s
    /// artifacts), with slots reset by copying rather than page faults.
    /// Built at the first such load, so nodes without one (and every
    /// node's start) do not pay for a third engine and linker.
    p2_big: OnceLock<Result<EngineAndLinker, String>>,
    /// Artifacts found to need `p2_big`: a later load (a cold start after
    /// the function was unloaded) goes straight to it instead of loading
    /// into `p2` first. Artifact paths are content-addressed, so the answer
    /// never changes; one entry per big component.
    big_artifacts: Mutex<HashSet<PathBuf>>,
    config: RuntimeConfig,
    /// For WASI 0.3 components (and any other needing async support). Built
    /// at the first deploy or load that needs it: a pool's stacks alone are
    /// a guard-page `mprotect` per instance slot, a few ms of every node
    /// start that most nodes never use.
    p3: OnceLock<Result<EngineAndLinker, String>>,
    fingerprint: String,
    lifecycle: Arc<Lifecycle>,
}

/// How an engine's pool resets a slot's memory between instances.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slots {
    /// Small memories: reset the pages a request dirtied, found by
    /// PAGEMAP_SCAN.
    Small,
    /// Big memory images: copy the image back over the first
    /// [`KEEP_RESIDENT_BIG`] bytes.
    Big,
}

/// One wasmtime engine and the linker of the host interfaces for it.
struct EngineAndLinker {
    engine: Engine,
    linker: Linker<InvocationState>,
}

impl EngineAndLinker {
    /// An engine with the pooling allocator and epoch interruption; with
    /// `p3`, also the component model's async support (streams, futures,
    /// async lifts) and the WASI 0.3 interfaces beside 0.2's.
    fn new(config: &RuntimeConfig, p3: bool, slots: Slots) -> anyhow::Result<Self> {
        let mut pool = PoolingAllocationConfig::new();
        let (keep_resident, table_keep_resident, scan) = match slots {
            Slots::Small if PoolingAllocationConfig::is_pagemap_scan_available() => (
                KEEP_RESIDENT_SCANNED,
                KEEP_RESIDENT_SCANNED,
                wasmtime::Enabled::Auto,
            ),
            Slots::Small => (
                KEEP_RESIDENT_UNSCANNED,
                KEEP_RESIDENT_UNSCANNED,
                wasmtime::Enabled::Auto,
            ),
            Slots::Big => {
                pool.max_unused_warm_slots(BIG_WARM_SLOTS);
                (
                    KEEP_RESIDENT_BIG,
                    TABLE_KEEP_RESIDENT_BIG,
                    wasmtime::Enabled::No,
                )
            }
        };
        // A Rust wasm32-wasip2 component holds a handful of core instances
        // (the program plus the shims that wit-component generates), each
        // with at most a few tables, so size those pools with headroom.
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances.saturating_mul(8))
            .total_memories(config.max_instances.saturating_mul(2))
            .total_tables(config.max_instances.saturating_mul(8))
            .total_stacks(config.max_instances)
            .max_memory_size(config.max_instance_memory)
            // Reset the first pages of a slot with memset instead of madvise:
            // it saves a syscall and the TLB shootdown it causes on every
            // request (an IPI to every other core), and costs at most this
            // much resident memory per slot. PAGEMAP_SCAN (Linux 6.7+) finds
            // the pages a request dirtied, so only those are reset.
            // Measured with bench/events.sh: 9.6k → 19.5–22k events/s.
            .linear_memory_keep_resident(keep_resident)
            .table_keep_resident(table_keep_resident)
            .pagemap_scan(scan);

        let mut wasm = code_config(p3);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).context("failed to create the wasmtime engine")?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .context("failed to link the WASI interfaces")?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .context("failed to link the wasi:http interfaces")?;
        if p3 {
            // WASI 0.3 names (`@0.3.0`) never clash with 0.2's, which 0.3
            // guests use too (Rust's standard library on wasm32-wasip2).
            wasmtime_wasi::p3::add_to_linker(&mut linker)
                .context("failed to link the WASI 0.3 interfaces")?;
            wasmtime_wasi_http::p3::add_to_linker(&mut linker)
                .context("failed to link the wasi:http 0.3 interfaces")?;
        }
        crate::limiter::add_to_linker(&mut linker)
            .context("failed to meter the wasi:http fields")?;
        caps::add_to_linker(&mut linker, InvocationState::caps_view)
            .context("failed to link the wasi:keyvalue and wasi:config interfaces")?;
        caps::add_compat_to_linker(&mut linker, InvocationState::caps_view).context(
            "failed to link the other versions of the wasi:keyvalue and wasi:config interfaces",
        )?;
        caps::add_nn_to_linker(&mut linker, InvocationState::caps_view)
            .context("failed to link the wasi:nn interfaces")?;
        Ok(Self { engine, linker })
    }
}

/// The settings that decide an engine's generated code; the instance
/// allocator is set apart, since it does not change the code (wasmtime's
/// compatibility hash leaves it out).
fn code_config(p3: bool) -> Config {
    let mut wasm = Config::new();
    wasm.epoch_interruption(true)
        // With it, every store carries the state of concurrent calls and
        // every call goes through it: WASI 0.2 guests never use it and
        // run faster on an engine without it.
        .concurrency_support(p3)
        .wasm_component_model_async(p3);
    wasm
}

/// Builds an engine of `cell` on first use, with its epoch ticker.
fn lazy_engine<'a>(
    cell: &'a OnceLock<Result<EngineAndLinker, String>>,
    config: &RuntimeConfig,
    p3: bool,
    slots: Slots,
    what: &str,
) -> anyhow::Result<&'a EngineAndLinker> {
    let built = cell.get_or_init(|| {
        let built =
            EngineAndLinker::new(config, p3, slots).map_err(|error| format!("{error:#}"))?;
        spawn_epoch_ticker(&[&built.engine]).map_err(|error| format!("{error:#}"))?;
        Ok(built)
    });
    built
        .as_ref()
        .map_err(|error| anyhow::anyhow!("failed to create the {what} engine: {error}"))
}

impl Runtime {
    /// Builds the engines (Cranelift, async, pooling allocator, epoch
    /// interruption; one for WASI 0.2 components, one with the component
    /// model's async support for WASI 0.3 ones), links the host interfaces
    /// (WASI, wasi:http and the [`crate::CAPABILITY_INTERFACES`]), and starts
    /// the epoch ticker.
    pub fn new(config: &RuntimeConfig) -> anyhow::Result<Arc<Self>> {
        let p2 = EngineAndLinker::new(config, false, Slots::Small)?;
        // The p3 engine is built on first use, but its code settings are
        // part of every artifact's key from the start: an engine without a
        // pool hashes the same (a test checks it) and costs no stacks.
        let p3_code = Engine::new(&code_config(true))
            .context("failed to create the wasmtime engine for WASI 0.3")?;
        let fingerprint = engine_fingerprint(&[&p2.engine, &p3_code]);
        spawn_epoch_ticker(&[&p2.engine])?;
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let pool = GuestPool::new(threads).context("failed to start the guest thread pool")?;
        Ok(Arc::new(Self {
            p2,
            p2_big: OnceLock::new(),
            big_artifacts: Mutex::new(HashSet::new()),
            config: config.clone(),
            p3: OnceLock::new(),
            fingerprint,
            lifecycle: Arc::new(Lifecycle::new(config.max_instances as usize, pool)),
        }))
    }

    /// Identifies the engine's code-generation settings. Compiled artifacts
    /// are only valid for an engine with the same fingerprint, so it is part
    /// of every artifact's cache key.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Validates an uploaded component and compiles it to a serialized
    /// artifact. CPU-heavy (Cranelift): call it off the async runtime.
    pub fn compile(&self, wasm: &[u8]) -> Result<CompiledComponent, DeployError> {
        validate::compile(
            (&self.p2.engine, &self.p2.linker),
            || {
                self.p3()
                    .map(|p3| (&p3.engine, &p3.linker))
                    .map_err(|error| DeployError::Internal(format!("{error:#}")))
            },
            wasm,
        )
    }

    /// Loads a serialized artifact produced by [`Runtime::compile`] from disk
    /// and pre-links it, ready to serve requests. The file is memory-mapped,
    /// so resident memory grows only with the code a function runs. With
    /// `reuse`, the function keeps its instances between requests (the hot
    /// tier).
    ///
    /// The bytes are run as machine code: the caller must have checked them
    /// against the checksum recorded when they were written (the platform
    /// loads only through `BlobStore::verified_path`), since a damaged
    /// artifact can crash the whole process rather than fail to load.
    pub fn load_artifact(&self, path: &Path, reuse: bool) -> anyhow::Result<Function> {
        // SAFETY: artifacts are only ever written by `Runtime::compile` into
        // the node's own data directory (never uploaded by users), their
        // bytes are verified against the SHA-256 recorded when they were
        // written before they get here, and the engine fingerprint in their
        // cache key guarantees they were produced with compatible settings;
        // wasmtime additionally checks its own version and settings header
        // before using the code.
        // Which engine compiled it is not recorded: wasmtime's own header
        // check refuses the other engine's artifact before using any code.
        let known_big = self
            .big_artifacts
            .lock()
            .is_ok_and(|big| big.contains(path));
        if known_big {
            return self.load_big(path, reuse);
        }
        #[expect(unsafe_code, reason = "deserializing our own compiled artifacts")]
        let loaded = unsafe { Component::deserialize_file(&self.p2.engine, path) }
            .map(|component| (component, &self.p2))
            .or_else(|p2_error| {
                let p3 = self
                    .p3()
                    .map_err(|error| wasmtime::Error::msg(format!("{error:#}")))?;
                #[expect(unsafe_code, reason = "deserializing our own compiled artifacts")]
                unsafe { Component::deserialize_file(&p3.engine, path) }
                    .map(|component| (component, p3))
                    .map_err(|_| p2_error)
            });
        let (component, engine) =
            loaded.with_context(|| format!("failed to load artifact {}", path.display()))?;
        if std::ptr::eq(engine, &self.p2) && has_big_memory(&component) {
            // Loaded again, into the engine whose pool suits it; the first
            // load is dropped (its mapping of the file with it).
            drop(component);
            if let Ok(mut big) = self.big_artifacts.lock() {
                big.insert(path.to_path_buf());
            }
            return self.load_big(path, reuse);
        }
        self.prepare(engine, &component, reuse)
    }

    /// Loads a WASI 0.2 artifact with a big memory into `p2_big`.
    fn load_big(&self, path: &Path, reuse: bool) -> anyhow::Result<Function> {
        let big = self.p2_big()?;
        // SAFETY: as in `load_artifact`, which alone calls this; `p2_big`
        // compiles exactly as `p2`, so wasmtime's header check accepts
        // `p2`'s artifacts.
        #[expect(unsafe_code, reason = "deserializing our own compiled artifacts")]
        let component = unsafe { Component::deserialize_file(&big.engine, path) }
            .with_context(|| format!("failed to load artifact {}", path.display()))?;
        self.prepare(big, &component, reuse)
    }

    /// The big-memory engine, built (with its epoch ticker) on first use.
    /// It compiles exactly as p2 (a test checks it), so it is not in the
    /// fingerprint.
    fn p2_big(&self) -> anyhow::Result<&EngineAndLinker> {
        lazy_engine(&self.p2_big, &self.config, false, Slots::Big, "big-memory")
    }

    /// The engine with async support, built (with its epoch ticker) on
    /// first use.
    fn p3(&self) -> anyhow::Result<&EngineAndLinker> {
        lazy_engine(&self.p3, &self.config, true, Slots::Small, "WASI 0.3")
    }

    fn prepare(
        &self,
        engine: &EngineAndLinker,
        component: &Component,
        reuse: bool,
    ) -> anyhow::Result<Function> {
        let pre = engine
            .linker
            .instantiate_pre(component)
            .context("failed to link the component")?;
        let exports: Vec<String> = component
            .component_type()
            .exports(&engine.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let Ok(kind) = HandlerKind::of_exports(exports.iter().map(String::as_str)) else {
            anyhow::bail!(
                "the component exports no wasi:http handler this host serves (it exports: {})",
                exports.join(", ")
            );
        };
        let handler = Handler::new(kind, pre).with_context(|| match kind {
            HandlerKind::P2 => "the component is not a wasi:http proxy",
            HandlerKind::P3 => "the component is not a wasi:http service",
        })?;
        let image = component.image_range();
        let code_bytes = (image.end as usize).saturating_sub(image.start as usize);
        Ok(Function::new(
            handler,
            self.lifecycle.clone(),
            reuse,
            code_bytes,
        ))
    }

    /// Invocations running now, on every function of this runtime.
    pub fn in_flight(&self) -> usize {
        self.lifecycle.in_flight()
    }

    /// Idle kept instances of reused functions, waiting for requests.
    pub fn kept_instances(&self) -> usize {
        self.lifecycle.kept()
    }

    /// Ends every running invocation (outcome `killed`) and every one that
    /// starts from now on: the last step of a shutdown, after the grace
    /// period. Returns once they have all reported.
    pub async fn kill_all(&self) {
        self.lifecycle.kill.cancel();
        self.lifecycle.idle().await;
    }

    /// Returns once no invocation is running.
    pub async fn idle(&self) {
        self.lifecycle.idle().await;
    }
}

/// Whether one of `component`'s memories starts at [`BIG_MEMORY_PAGES`] or
/// more (unknown, as for a component instantiating an imported module,
/// counts as small).
fn has_big_memory(component: &Component) -> bool {
    component
        .resources_required()
        .and_then(|required| required.max_initial_memory_size)
        .is_some_and(|pages| pages >= BIG_MEMORY_PAGES)
}

fn engine_fingerprint(engines: &[&Engine]) -> String {
    // The hash covers wasmtime's version and every setting that affects the
    // compiled code; the std hasher is deterministic for a given binary, and
    // a different binary may recompile once, which is the safe direction.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for engine in engines {
        engine.precompile_compatibility_hash().hash(&mut hasher);
    }
    format!("{:016x}", hasher.finish())
}

fn spawn_epoch_ticker(engines: &[&Engine]) -> anyhow::Result<()> {
    let weak: Vec<_> = engines.iter().map(|engine| engine.weak()).collect();
    std::thread::Builder::new()
        .name("mayfly-epoch".into())
        .spawn(move || {
            // Until the runtime (which holds every engine) is dropped.
            while let Some(engines) = weak
                .iter()
                .map(|weak| weak.upgrade())
                .collect::<Option<Vec<_>>>()
            {
                for engine in &engines {
                    engine.increment_epoch();
                }
                // Not held while asleep: the runtime's drop must end them.
                drop(engines);
                std::thread::sleep(crate::fair::EPOCH_TICK);
            }
        })
        .context("failed to start the epoch ticker thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime with a two-slot pool.
    fn small_runtime() -> Arc<Runtime> {
        Runtime::new(&RuntimeConfig {
            max_instances: 2,
            max_instance_memory: 16 << 20,
        })
        .unwrap()
    }

    #[test]
    fn links_wasi_http_and_the_capability_interfaces_together() {
        // Two bindings defining the same interface, or a capability binding
        // at odds with the WIT, would fail here rather than at a deploy.
        let runtime = small_runtime();
        assert!(matches!(
            runtime.compile(b"\0asm\x01\0\0\0"),
            Err(DeployError::CoreModule)
        ));
        // The lazily built engine links the WASI 0.3 interfaces as well.
        runtime.p3().unwrap();
    }

    #[test]
    fn the_lazy_p3_engine_compiles_as_the_fingerprint_says() {
        // The fingerprint hashes an engine without a pool in place of the
        // p3 engine, which is built later: their code must be the same.
        let runtime = small_runtime();
        let p3_code = Engine::new(&code_config(true)).unwrap();
        assert_eq!(
            runtime.fingerprint(),
            engine_fingerprint(&[&runtime.p2.engine, &runtime.p3().unwrap().engine])
        );
        assert_eq!(
            engine_fingerprint(&[&p3_code]),
            engine_fingerprint(&[&runtime.p3().unwrap().engine])
        );
    }

    #[test]
    fn the_big_memory_engine_compiles_as_the_p2_engine() {
        // It loads artifacts compiled by `p2` and is not in the fingerprint:
        // only its pool may differ.
        let runtime = small_runtime();
        let big = runtime.p2_big().unwrap();
        assert_eq!(
            engine_fingerprint(&[&runtime.p2.engine]),
            engine_fingerprint(&[&big.engine])
        );
    }
}
