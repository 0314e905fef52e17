//! wasi:nn (`wasi:nn@0.2.0-rc-2024-10-28`, world `ml`): model inference for
//! functions, on tract's pure-Rust ONNX backend.
//!
//! Models are named objects of the platform ([`ModelSource`]); a function
//! reaches only the ones it was granted, through `graph::load-by-name`. Each
//! model is parsed once per node per digest ([`NnHost`]'s graph cache),
//! optimised once per input shape ([`OnnxModel`]) and shared read-only by
//! every instance: a load is an `Arc` clone.
//! `compute` runs on the node's inference threads, one per permit, so an
//! inference never holds an async worker and the node bounds how many run at
//! once. A function that never imports wasi:nn pays nothing: the host state
//! is the per-node [`NnHost`] plus entries in the invocation's resource table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, IntoTValue, IntoTensor, OutletId, Symbol, TDim,
    TValue, Tensor as TractTensor, TractResult, TypedModel, TypedSimplePlan,
};
use tract_onnx::tract_hir::prelude::IntoRunnable;
use wasmtime::component::Resource;

use super::CapsView;
use super::inference_threads::InferenceThreads;
use super::nn_bindings::wasi::nn::errors::{self, ErrorCode};
use super::nn_bindings::wasi::nn::graph::{self, ExecutionTarget, GraphEncoding};
use super::nn_bindings::wasi::nn::inference;
use super::nn_bindings::wasi::nn::tensor::{self, TensorType};

/// Where the node finds the models functions load by name.
#[async_trait::async_trait]
pub trait ModelSource: Send + Sync {
    /// The digest of the model called `name` now; Ok(None) if there is none.
    async fn digest(&self, name: &str) -> Result<Option<String>, String>;
    /// The ONNX bytes stored under `digest`; Ok(None) if they are gone.
    async fn bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, String>;
}

/// Bounds of the wasi:nn host.
#[derive(Debug, Clone, Copy)]
pub struct NnLimits {
    /// Inferences running at once on this node (each takes one inference
    /// thread for its length).
    pub max_concurrent_inferences: usize,
    /// Largest tensor a guest may build or receive, in bytes (also bounded
    /// by the function's memory limit).
    pub max_tensor_bytes: usize,
    /// Largest model `graph::load` parses from raw bytes.
    pub max_load_bytes: usize,
    /// Parsed models kept in the graph cache; the least recently loaded one
    /// goes first.
    pub max_cached_models: usize,
}

impl Default for NnLimits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            max_concurrent_inferences: cores,
            max_tensor_bytes: 64 << 20,
            max_load_bytes: 64 << 20,
            max_cached_models: 32,
        }
    }
}

/// A parsed ONNX model ready to run, shared read-only by every instance:
/// the decluttered graph, the names of its inputs and outputs, and the
/// plans that run it.
///
/// Most models declare a symbolic batch dimension (`N,3,224,224`). A plan
/// optimised for the symbolic shape runs with generic kernels; one optimised
/// for the concrete shape a function sends lets tract fold the shapes and
/// choose fixed kernels. For the orientation classifier of `bench/nn.sh` a
/// `1,3,224,224` plan ran an inference in 5.8 ms against 24.5 ms for the
/// symbolic one (natively, single-threaded, same outputs to 1e-6). So each
/// distinct size of the symbolic axes gets a plan of its own, built on first
/// use on the inference thread (the first request with that size pays for it,
/// as the first request pays for parsing), up to [`MAX_SHAPE_PLANS`]; other
/// shapes run on the symbolic plan.
pub struct OnnxModel {
    /// Decluttered, not yet optimised: what each shape's plan starts from.
    typed: TypedModel,
    /// Input dimensions that are one symbol each, which a tensor's shape
    /// binds: (input, axis, symbol).
    symbolic_axes: Vec<(usize, usize, Symbol)>,
    /// Plans by the sizes of the symbolic axes they were specialised for
    /// (in `symbolic_axes`' order); each cell is built once, by the first
    /// inference that needs it.
    by_shape: Mutex<HashMap<Vec<usize>, Arc<PlanCell>>>,
    /// The plan for any shape: built at parse time for a model with no
    /// symbolic dimension (it is then the only plan), otherwise on first
    /// need.
    general: PlanCell,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// The size of the ONNX bytes, which the parsed graph and each plan
    /// hold about once each (its weights dominate).
    model_bytes: u64,
    /// Plans built so far.
    plans: AtomicU64,
}

/// Plans specialised per model; beyond them, shapes share the symbolic plan
/// (so a guest sending ever new shapes cannot make the node optimise and
/// hold a plan per request).
pub const MAX_SHAPE_PLANS: usize = 4;

/// A plan built at most once; a failure is kept too (and reported by every
/// run that needs it).
type PlanCell = OnceLock<Result<Arc<TypedSimplePlan>, String>>;

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

impl OnnxModel {
    /// Parses ONNX bytes and declutters the graph (CPU-heavy: call it off the
    /// async workers). The error says what tract could not read. A model
    /// with fixed input shapes is also planned now; one with symbolic shapes
    /// is planned per shape when it runs (see [`OnnxModel::check`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let typed = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .map_err(|e| format!("not a model tract can read as ONNX: {e:#}"))?
            .into_typed()
            .and_then(|typed| typed.into_decluttered())
            .map_err(|e| format!("the ONNX model cannot be optimised for running: {e:#}"))?;
        let name = |outlet: OutletId| {
            typed
                .outlet_label(outlet)
                .unwrap_or(&typed.node(outlet.node).name)
                .to_string()
        };
        let input_outlets = typed.input_outlets().map_err(|e| format!("{e:#}"))?;
        let inputs = input_outlets
            .iter()
            .map(|o| typed.node(o.node).name.clone())
            .collect();
        let outputs = typed
            .output_outlets()
            .map_err(|e| format!("{e:#}"))?
            .iter()
            .map(|o| name(*o))
            .collect();
        let mut symbolic_axes = Vec::new();
        for (input, outlet) in input_outlets.iter().enumerate() {
            let fact = typed.outlet_fact(*outlet).map_err(|e| format!("{e:#}"))?;
            for (axis, dim) in fact.shape.iter().enumerate() {
                if let TDim::Sym(symbol) = dim {
                    symbolic_axes.push((input, axis, symbol.clone()));
                }
            }
        }
        let model = Self {
            typed,
            symbolic_axes,
            by_shape: Mutex::default(),
            general: OnceLock::new(),
            inputs,
            outputs,
            model_bytes: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            plans: AtomicU64::new(0),
        };
        if model.symbolic_axes.is_empty() {
            model.check()?;
        }
        Ok(model)
    }

    /// Builds the plan for any shape now: tells whether tract can run the
    /// model at all (`mayfly model put` refuses a model it cannot).
    pub fn check(&self) -> Result<(), String> {
        self.general_plan().map(drop)
    }

    /// The memory the parsed model holds, estimated: the size of its ONNX
    /// bytes for the graph and again for each plan built.
    pub fn resident_bytes(&self) -> u64 {
        let copies = 1 + self.plans.load(Ordering::Relaxed);
        self.model_bytes.saturating_mul(copies)
    }

    /// The names of the model's inputs, in order.
    pub fn inputs(&self) -> &[String] {
        &self.inputs
    }

    /// The names of the model's outputs, in order.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// Runs the model on `inputs` (one per input, in order), on the plan
    /// for their shapes. CPU-bound, and the first run of a shape also
    /// optimises its plan.
    pub fn run(&self, inputs: Vec<TractTensor>) -> Result<Vec<TractTensor>, String> {
        let plan = self.plan_for(&inputs)?;
        let inputs = inputs.into_iter().map(IntoTValue::into_tvalue).collect();
        let outputs = plan.run(inputs).map_err(|e| format!("{e:#}"))?;
        Ok(outputs.into_iter().map(TValue::into_tensor).collect())
    }

    fn plan_for(&self, inputs: &[TractTensor]) -> Result<Arc<TypedSimplePlan>, String> {
        // The sizes the inputs give the symbolic axes: the plan's key. A
        // tensor whose other axes do not fit shares the plan of its sizes,
        // and tract refuses it when it runs.
        let sizes: Option<Vec<usize>> = self
            .symbolic_axes
            .iter()
            .map(|(input, axis, _)| inputs.get(*input)?.shape().get(*axis).copied())
            .collect();
        // No symbolic axis, or a rank tract will refuse with its own message.
        let Some(sizes) = sizes.filter(|sizes| !sizes.is_empty()) else {
            return self.general_plan();
        };
        let cell = {
            let mut by_shape = self.lock_plans();
            match by_shape.get(&sizes) {
                Some(cell) => cell.clone(),
                None if by_shape.len() < MAX_SHAPE_PLANS => {
                    by_shape.entry(sizes.clone()).or_default().clone()
                }
                None => return self.general_plan(),
            }
        };
        // Outside the map's lock: another shape's plan may be built at the
        // same time; a second inference of this shape waits for this one.
        let plan = cell.get_or_init(|| {
            let bound = self.bind(&sizes)?;
            self.build_plan(self.typed.set_symbols(&bound))
        });
        match plan {
            Ok(plan) => Ok(plan.clone()),
            Err(_) => {
                // A failed plan keeps no place among the shapes'; the
                // symbolic plan may still run what it could not.
                let mut by_shape = self.lock_plans();
                if by_shape.get(&sizes).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                    by_shape.remove(&sizes);
                }
                drop(by_shape);
                self.general_plan()
            }
        }
    }

    /// The symbols' values for the sizes of `symbolic_axes`; an error if one
    /// symbol is given two sizes (say N in two inputs): no plan fits.
    fn bind(&self, sizes: &[usize]) -> Result<HashMap<Symbol, TDim>, String> {
        let mut bound = HashMap::new();
        for ((_, _, symbol), size) in self.symbolic_axes.iter().zip(sizes) {
            let dim = TDim::Val(i64::try_from(*size).unwrap_or(i64::MAX));
            if bound
                .insert(symbol.clone(), dim.clone())
                .is_some_and(|was| was != dim)
            {
                return Err(format!("`{symbol}` is given two sizes"));
            }
        }
        Ok(bound)
    }

    /// Optimises `typed` into a plan, counted in the model's memory.
    fn build_plan(&self, typed: TractResult<TypedModel>) -> Result<Arc<TypedSimplePlan>, String> {
        let plan = typed
            .and_then(|typed| typed.into_optimized())
            .and_then(|typed| typed.into_runnable())
            .map_err(|e| format!("the ONNX model cannot be planned: {e:#}"))?;
        self.plans.fetch_add(1, Ordering::Relaxed);
        Ok(plan)
    }

    fn lock_plans(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<usize>, Arc<PlanCell>>> {
        self.by_shape.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn general_plan(&self) -> Result<Arc<TypedSimplePlan>, String> {
        self.general
            .get_or_init(|| self.build_plan(Ok(self.typed.clone())))
            .clone()
    }
}

/// The node's wasi:nn host: where models come from, the graph cache and the
/// inference threads. One per node, shared by every function.
pub struct NnHost {
    source: Arc<dyn ModelSource>,
    limits: NnLimits,
    graphs: Mutex<GraphCache>,
    threads: InferenceThreads,
}

/// Parsed models by digest, each loaded once however many instances ask at
/// the same moment (the cell is the single flight).
#[derive(Default)]
struct GraphCache {
    entries: HashMap<String, CacheEntry>,
    clock: u64,
}

struct CacheEntry {
    cell: Arc<tokio::sync::OnceCell<Arc<OnnxModel>>>,
    last_used: u64,
    /// When an instance last loaded it, for eviction under memory pressure.
    last_used_at: Instant,
}

/// A parsed model in the graph cache that no instance holds: what evicting
/// it would give back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleModel {
    /// The model's digest (the key [`NnHost::evict`] takes).
    pub digest: String,
    /// Estimated memory it holds.
    pub bytes: u64,
    /// How long since an instance last loaded it.
    pub idle: Duration,
}

impl std::fmt::Debug for NnHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NnHost")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl NnHost {
    /// A host serving models from `source` within `limits`.
    pub fn new(source: Arc<dyn ModelSource>, limits: NnLimits) -> Arc<Self> {
        Arc::new(Self {
            source,
            limits,
            graphs: Mutex::new(GraphCache::default()),
            threads: InferenceThreads::new(limits.max_concurrent_inferences),
        })
    }

    /// How many parsed models the cache holds.
    pub fn cached_models(&self) -> usize {
        self.lock().entries.len()
    }

    /// Drops the parsed model of `digest` (after its model was deleted, or
    /// under memory pressure); instances that hold it keep it until they
    /// end, and the next load parses it again.
    pub fn evict(&self, digest: &str) {
        self.lock().entries.remove(digest);
    }

    /// Memory held by every parsed model in the cache (estimated), and the
    /// ones no running instance holds, which eviction would give back: the
    /// autoscaler weighs them against the node's memory budget beside warm
    /// functions.
    pub fn resident_models(&self) -> (u64, Vec<IdleModel>) {
        let cache = self.lock();
        let mut total = 0u64;
        let mut idle = Vec::new();
        for (digest, entry) in &cache.entries {
            let Some(model) = entry.cell.get() else {
                continue; // still loading
            };
            total = total.saturating_add(model.resident_bytes());
            // The cache holds one reference; more are instances using it.
            if Arc::strong_count(model) == 1 {
                idle.push(IdleModel {
                    digest: digest.clone(),
                    bytes: model.resident_bytes(),
                    idle: entry.last_used_at.elapsed(),
                });
            }
        }
        (total, idle)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GraphCache> {
        self.graphs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The parsed model stored under `digest`, from the cache or parsed now
    /// on an inference thread (parsing is as CPU-heavy as running).
    async fn graph(&self, digest: &str) -> Result<Arc<OnnxModel>, String> {
        let cell = {
            let mut cache = self.lock();
            cache.clock += 1;
            let now = cache.clock;
            if !cache.entries.contains_key(digest)
                && cache.entries.len() >= self.limits.max_cached_models.max(1)
                && let Some(oldest) = cache
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone())
            {
                cache.entries.remove(&oldest);
            }
            let entry = cache
                .entries
                .entry(digest.to_string())
                .or_insert_with(|| CacheEntry {
                    cell: Arc::default(),
                    last_used: now,
                    last_used_at: Instant::now(),
                });
            entry.last_used = now;
            entry.last_used_at = Instant::now();
            entry.cell.clone()
        };
        let model = cell
            .get_or_try_init(|| async {
                let bytes = self
                    .source
                    .bytes(digest)
                    .await?
                    .ok_or_else(|| format!("its bytes (sha256:{digest}) are missing"))?;
                let parsed = self
                    .threads
                    .run(move || OnnxModel::parse(&bytes))
                    .await
                    .map(|(parsed, _)| parsed)??;
                Ok::<_, String>(Arc::new(parsed))
            })
            .await;
        match model {
            Ok(model) => Ok(model.clone()),
            Err(e) => {
                // Not cached: a failure from a store that comes back is
                // retried by the next load.
                self.lock().entries.remove(digest);
                Err(e)
            }
        }
    }
}

/// A loaded graph (`wasi:nn/graph.graph`). (`pub` only because the
/// generated bindings re-export it.)
pub struct Graph {
    model: Arc<OnnxModel>,
}

/// An execution context (`wasi:nn/inference.graph-execution-context`).
pub struct ExecutionContext {
    model: Arc<OnnxModel>,
}

/// A tensor (`wasi:nn/tensor.tensor`) as the guest built it or an inference
/// returned it.
pub struct Tensor {
    dimensions: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

/// A wasi:nn error (`wasi:nn/errors.error`): its code and its message.
pub struct NnError {
    code: ErrorCode,
    data: String,
}

/// What a wasi:nn call returns: the guest's value or its error resource; the
/// outer error traps.
type NnResult<T> = wasmtime::Result<Result<T, Resource<NnError>>>;

impl CapsView<'_> {
    /// Hands the guest an error resource, logging `message` in the
    /// invocation's stderr when the author must act on it.
    fn nn_fail<T>(&mut self, code: ErrorCode, message: String) -> NnResult<T> {
        self.deny(&format!("wasi:nn: {message}"));
        let error = self.table.push(NnError {
            code,
            data: message,
        })?;
        Ok(Err(error))
    }

    /// The node's wasi:nn host, if it runs models.
    fn nn(&self) -> Option<Arc<NnHost>> {
        self.caps.nn.clone()
    }
}

/// Bytes of one element of `ty`; `None` for the types tract is not given
/// here (half precision).
fn element_bytes(ty: TensorType) -> Option<usize> {
    match ty {
        TensorType::Fp32 | TensorType::I32 => Some(4),
        TensorType::Fp64 | TensorType::I64 => Some(8),
        TensorType::U8 => Some(1),
        TensorType::Fp16 | TensorType::Bf16 => None,
    }
}

fn type_name(ty: TensorType) -> &'static str {
    match ty {
        TensorType::Fp16 => "FP16",
        TensorType::Fp32 => "FP32",
        TensorType::Fp64 => "FP64",
        TensorType::Bf16 => "BF16",
        TensorType::U8 => "U8",
        TensorType::I32 => "I32",
        TensorType::I64 => "I64",
    }
}

/// Checks that `data` holds exactly the elements `dimensions` describe.
fn check_tensor(
    dimensions: &[u32],
    ty: TensorType,
    data_len: usize,
    limits: &NnLimits,
) -> Result<(), (ErrorCode, String)> {
    let element = element_bytes(ty).ok_or_else(|| {
        (
            ErrorCode::UnsupportedOperation,
            format!(
                "{} tensors are not supported: use FP32, FP64, U8, I32 or I64",
                type_name(ty)
            ),
        )
    })?;
    let expected = dimensions
        .iter()
        .try_fold(element, |n, d| n.checked_mul(*d as usize))
        .ok_or_else(|| {
            (
                ErrorCode::TooLarge,
                format!("a tensor of dimensions {dimensions:?} is too large to address"),
            )
        })?;
    if expected > limits.max_tensor_bytes {
        return Err((
            ErrorCode::TooLarge,
            format!(
                "a tensor of dimensions {dimensions:?} ({expected} bytes) is over the node's \
                 limit of {} bytes per tensor",
                limits.max_tensor_bytes
            ),
        ));
    }
    if expected != data_len {
        return Err((
            ErrorCode::InvalidArgument,
            format!(
                "the tensor's data is {data_len} bytes but dimensions {dimensions:?} of {} \
                 need {expected}",
                type_name(ty)
            ),
        ));
    }
    Ok(())
}

/// The tract tensor of a guest's tensor (little-endian, row-major).
fn to_tract(tensor: &Tensor) -> Result<TractTensor, String> {
    let shape: Vec<usize> = tensor.dimensions.iter().map(|d| *d as usize).collect();
    let dt = match tensor.ty {
        TensorType::Fp32 => DatumType::F32,
        TensorType::Fp64 => DatumType::F64,
        TensorType::I32 => DatumType::I32,
        TensorType::I64 => DatumType::I64,
        TensorType::U8 => DatumType::U8,
        TensorType::Fp16 | TensorType::Bf16 => {
            return Err(format!(
                "{} tensors are not supported",
                type_name(tensor.ty)
            ));
        }
    };
    // wasi:nn tensors are little-endian, as is every target the node runs
    // on, so the bytes go in with one copy (element by element it took
    // ~0.3 ms of a 600 KB image tensor), into memory not zeroed first.
    const { assert!(cfg!(target_endian = "little")) };
    let need = shape
        .iter()
        .try_fold(dt.size_of(), |n, d| n.checked_mul(*d));
    if need != Some(tensor.data.len()) {
        return Err(format!(
            "the tensor holds {} bytes, which its dimensions {:?} do not fit",
            tensor.data.len(),
            tensor.dimensions,
        ));
    }
    // SAFETY: `dt` is one of the plain number types above, for which every
    // bit pattern is a valid value, and tract checks the length again.
    #[expect(
        unsafe_code,
        reason = "tract's only constructor from bytes that skips zeroing is unsafe"
    )]
    let converted = unsafe { TractTensor::from_raw_dt(dt, &shape, &tensor.data) };
    converted.map_err(|e| format!("{e:#}"))
}

/// A guest tensor of a tract output; outputs of a type wasi:nn cannot
/// describe are converted to FP32.
fn from_tract(tensor: &TractTensor) -> Result<Tensor, String> {
    let dimensions = tensor
        .shape()
        .iter()
        .map(|d| u32::try_from(*d).map_err(|_| format!("an output dimension {d} is over 2^32")))
        .collect::<Result<Vec<_>, _>>()?;
    fn encode<T: tract_onnx::prelude::Datum + Copy, const N: usize>(
        tensor: &TractTensor,
        to: fn(T) -> [u8; N],
    ) -> Result<Vec<u8>, String> {
        let values = tensor
            .to_plain_array_view::<T>()
            .map_err(|e| format!("{e:#}"))?;
        Ok(values.iter().flat_map(|v| to(*v)).collect())
    }
    let (ty, data) = match tensor.datum_type() {
        DatumType::F32 => (TensorType::Fp32, encode(tensor, f32::to_le_bytes)?),
        DatumType::F64 => (TensorType::Fp64, encode(tensor, f64::to_le_bytes)?),
        DatumType::I32 => (TensorType::I32, encode(tensor, i32::to_le_bytes)?),
        DatumType::I64 => (TensorType::I64, encode(tensor, i64::to_le_bytes)?),
        DatumType::U8 => (TensorType::U8, encode(tensor, u8::to_le_bytes)?),
        DatumType::Bool => {
            let as_u8 = tensor
                .cast_to::<u8>()
                .map_err(|e| format!("{e:#}"))?
                .into_owned();
            (TensorType::U8, encode(&as_u8, u8::to_le_bytes)?)
        }
        other => {
            let as_f32 = tensor
                .cast_to::<f32>()
                .map_err(|e| format!("an output of type {other:?} cannot be returned: {e:#}"))?
                .into_owned();
            (TensorType::Fp32, encode(&as_f32, f32::to_le_bytes)?)
        }
    };
    Ok(Tensor {
        dimensions,
        ty,
        data,
    })
}

impl graph::Host for CapsView<'_> {
    async fn load(
        &mut self,
        builder: Vec<Vec<u8>>,
        encoding: GraphEncoding,
        _target: ExecutionTarget,
    ) -> NnResult<Resource<Graph>> {
        let Some(nn) = self.nn() else {
            return self.nn_fail(ErrorCode::UnsupportedOperation, no_models());
        };
        if !matches!(encoding, GraphEncoding::Onnx | GraphEncoding::Autodetect) {
            return self.nn_fail(
                ErrorCode::InvalidEncoding,
                "this node runs ONNX models only (tract): load with graph-encoding onnx"
                    .to_string(),
            );
        }
        let bytes = match <[Vec<u8>; 1]>::try_from(builder) {
            Ok([bytes]) => bytes,
            Err(_) => Vec::new(),
        };
        if bytes.is_empty() {
            return self.nn_fail(
                ErrorCode::InvalidArgument,
                "load takes exactly one non-empty builder holding the .onnx bytes".to_string(),
            );
        }
        if bytes.len() > nn.limits.max_load_bytes {
            return self.nn_fail(
                ErrorCode::TooLarge,
                format!(
                    "a model of {} bytes is over the node's limit of {} bytes for load; upload \
                     it with `mayfly model put NAME FILE.onnx` and use load-by-name",
                    bytes.len(),
                    nn.limits.max_load_bytes
                ),
            );
        }
        match nn.threads.run(move || OnnxModel::parse(&bytes)).await {
            Ok((Ok(model), _)) => Ok(Ok(self.table.push(Graph {
                model: Arc::new(model),
            })?)),
            Ok((Err(e), _)) => self.nn_fail(ErrorCode::InvalidEncoding, e),
            Err(e) => self.nn_fail(ErrorCode::RuntimeError, e),
        }
    }

    async fn load_by_name(&mut self, name: String) -> NnResult<Resource<Graph>> {
        if !self.caps.models.contains(&name) {
            return self.nn_fail(
                ErrorCode::Security,
                format!(
                    "model `{name}` is not granted to this function: grant it with \
                     `--model {name}` (or `models = [\"{name}\"]` under the function's \
                     [functions.NAME.grants]) and deploy again"
                ),
            );
        }
        let Some(nn) = self.nn() else {
            return self.nn_fail(ErrorCode::UnsupportedOperation, no_models());
        };
        let digest = match nn.source.digest(&name).await {
            Ok(Some(digest)) => digest,
            Ok(None) => {
                return self.nn_fail(
                    ErrorCode::NotFound,
                    format!(
                        "model `{name}` does not exist: upload it with \
                         `mayfly model put {name} FILE.onnx`"
                    ),
                );
            }
            Err(e) => {
                return self.nn_fail(
                    ErrorCode::RuntimeError,
                    format!("model `{name}` cannot be looked up: {e}"),
                );
            }
        };
        match nn.graph(&digest).await {
            Ok(model) => Ok(Ok(self.table.push(Graph { model })?)),
            Err(e) => self.nn_fail(
                ErrorCode::RuntimeError,
                format!("model `{name}` (sha256:{digest}) cannot be loaded: {e}"),
            ),
        }
    }
}

fn no_models() -> String {
    "this node runs no models (wasi:nn is not configured)".to_string()
}

impl graph::HostGraph for CapsView<'_> {
    async fn init_execution_context(
        &mut self,
        graph: Resource<Graph>,
    ) -> NnResult<Resource<ExecutionContext>> {
        let model = self.table.get(&graph)?.model.clone();
        Ok(Ok(self.table.push(ExecutionContext { model })?))
    }

    async fn drop(&mut self, graph: Resource<Graph>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

impl inference::Host for CapsView<'_> {}

impl inference::HostGraphExecutionContext for CapsView<'_> {
    async fn compute(
        &mut self,
        context: Resource<ExecutionContext>,
        inputs: Vec<(String, Resource<Tensor>)>,
    ) -> NnResult<Vec<(String, Resource<Tensor>)>> {
        let Some(nn) = self.nn() else {
            return self.nn_fail(ErrorCode::UnsupportedOperation, no_models());
        };
        let model = self.table.get(&context)?.model.clone();
        if inputs.len() != model.inputs.len() {
            return self.nn_fail(
                ErrorCode::InvalidArgument,
                format!(
                    "the model takes {} input(s) ({}) but compute got {}",
                    model.inputs.len(),
                    model.inputs.join(", "),
                    inputs.len()
                ),
            );
        }
        // By name; a single input may be passed under any name.
        let mut ordered: Vec<Option<TractTensor>> = model.inputs.iter().map(|_| None).collect();
        for (position, (name, tensor)) in inputs.iter().enumerate() {
            let slot = match model.inputs.iter().position(|n| n == name) {
                Some(slot) => slot,
                None if model.inputs.len() == 1 => 0,
                None => {
                    return self.nn_fail(
                        ErrorCode::InvalidArgument,
                        format!(
                            "input {position} is named `{name}`, which is not one of the \
                             model's inputs: {}",
                            model.inputs.join(", ")
                        ),
                    );
                }
            };
            let converted = to_tract(self.table.get(tensor)?);
            match converted {
                Ok(t) => ordered[slot] = Some(t),
                Err(e) => return self.nn_fail(ErrorCode::InvalidArgument, e),
            }
        }
        let Some(ordered) = ordered.into_iter().collect::<Option<Vec<_>>>() else {
            return self.nn_fail(
                ErrorCode::InvalidArgument,
                format!(
                    "compute needs one tensor per model input: {}",
                    model.inputs.join(", ")
                ),
            );
        };
        let run_model = model.clone();
        let waiting_since = Instant::now();
        let ran = nn.threads.run(move || run_model.run(ordered)).await;
        *self.awaited_inference += waiting_since.elapsed();
        let (outputs, ran) = match ran {
            Ok((Ok(outputs), ran)) => (outputs, ran),
            Ok((Err(e), ran)) => {
                *self.extra_cpu += ran;
                return self.nn_fail(ErrorCode::RuntimeError, format!("inference failed: {e}"));
            }
            Err(e) => return self.nn_fail(ErrorCode::RuntimeError, e),
        };
        *self.extra_cpu += ran;
        let mut results = Vec::with_capacity(outputs.len());
        for (name, output) in model.outputs.iter().zip(&outputs) {
            let tensor = match from_tract(output) {
                Ok(tensor) => tensor,
                Err(e) => return self.nn_fail(ErrorCode::RuntimeError, e),
            };
            if tensor.data.len() > nn.limits.max_tensor_bytes
                || !self.memory.fits_transient(tensor.data.len())
            {
                return self.nn_fail(
                    ErrorCode::TooLarge,
                    format!(
                        "output `{name}` is {} bytes: over the node's tensor limit ({} bytes) \
                         or the function's memory limit",
                        tensor.data.len(),
                        nn.limits.max_tensor_bytes
                    ),
                );
            }
            results.push((name.clone(), self.table.push(tensor)?));
        }
        Ok(Ok(results))
    }

    async fn drop(&mut self, context: Resource<ExecutionContext>) -> wasmtime::Result<()> {
        self.table.delete(context)?;
        Ok(())
    }
}

impl tensor::Host for CapsView<'_> {}

impl tensor::HostTensor for CapsView<'_> {
    async fn new(
        &mut self,
        dimensions: Vec<u32>,
        ty: TensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<Tensor>> {
        // The constructor cannot return an error: a bad tensor traps, with
        // the reason in the log.
        let limits = self
            .caps
            .nn
            .as_ref()
            .map(|nn| nn.limits)
            .unwrap_or_default();
        if let Err((_, message)) = check_tensor(&dimensions, ty, data.len(), &limits) {
            self.deny(&format!("wasi:nn: {message}"));
            wasmtime::bail!("wasi:nn tensor refused: {message}");
        }
        if !self.memory.fits_transient(data.len()) {
            let message = format!(
                "a tensor of {} bytes does not fit in the function's memory limit",
                data.len()
            );
            self.deny(&format!("wasi:nn: {message}"));
            wasmtime::bail!("wasi:nn tensor refused: {message}");
        }
        Ok(self.table.push(Tensor {
            dimensions,
            ty,
            data,
        })?)
    }

    async fn dimensions(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.dimensions.clone())
    }

    async fn ty(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&tensor)?.ty)
    }

    async fn data(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&tensor)?.data.clone())
    }

    async fn drop(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<()> {
        self.table.delete(tensor)?;
        Ok(())
    }
}

impl errors::Host for CapsView<'_> {}

impl errors::HostError for CapsView<'_> {
    async fn code(&mut self, error: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&error)?.code)
    }

    async fn data(&mut self, error: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.data.clone())
    }

    async fn drop(&mut self, error: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_checked_against_their_dimensions_and_limits() {
        let limits = NnLimits {
            max_tensor_bytes: 1024,
            ..NnLimits::default()
        };
        assert!(check_tensor(&[2, 2], TensorType::Fp32, 16, &limits).is_ok());
        let (code, message) = check_tensor(&[2, 2], TensorType::Fp32, 15, &limits).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidArgument);
        assert!(message.contains("need 16"), "{message}");
        let (code, message) =
            check_tensor(&[1, 3, 224, 224], TensorType::Fp32, 602_112, &limits).unwrap_err();
        assert_eq!(code, ErrorCode::TooLarge);
        assert!(message.contains("limit of 1024"), "{message}");
        let (code, _) =
            check_tensor(&[u32::MAX, u32::MAX, u32::MAX], TensorType::I64, 0, &limits).unwrap_err();
        assert_eq!(code, ErrorCode::TooLarge);
        let (code, _) = check_tensor(&[1], TensorType::Fp16, 2, &limits).unwrap_err();
        assert_eq!(code, ErrorCode::UnsupportedOperation);
    }

    #[test]
    fn tensors_round_trip_through_tract() {
        let values = [1.5f32, -2.0, 0.25, 8.0, 3.0, -0.5];
        let tensor = Tensor {
            dimensions: vec![2, 3],
            ty: TensorType::Fp32,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let tract = to_tract(&tensor).unwrap();
        assert_eq!(tract.shape(), &[2, 3]);
        let back = from_tract(&tract).unwrap();
        assert_eq!(back.dimensions, tensor.dimensions);
        assert_eq!(back.data, tensor.data);
        assert_eq!(back.ty, TensorType::Fp32);
        let short = Tensor {
            dimensions: vec![2, 3],
            ty: TensorType::Fp32,
            data: vec![0; 20],
        };
        let error = to_tract(&short).unwrap_err();
        assert!(error.contains("20 bytes"), "{error}");
    }

    /// A model computing `y = x · w` with `x` of shape `[batch, 3]`, `w` a
    /// constant `[3, 2]`; `batch` is the symbol `N`, or a fixed size.
    fn matmul_model(batch: Option<i64>) -> Vec<u8> {
        use prost::Message;
        use tract_onnx::pb::{
            GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
            TypeProto, ValueInfoProto, tensor_shape_proto::Dimension,
            tensor_shape_proto::dimension::Value as Dim, type_proto,
        };
        let float = tract_onnx::pb::tensor_proto::DataType::Float as i32;
        let value = |name: &str, dims: Vec<Dim>| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: float,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .into_iter()
                            .map(|d| Dimension {
                                value: Some(d),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let rows = || batch.map_or_else(|| Dim::DimParam("N".into()), Dim::DimValue);
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                node: vec![NodeProto {
                    input: vec!["x".into(), "w".into()],
                    output: vec!["y".into()],
                    op_type: "MatMul".into(),
                    ..Default::default()
                }],
                initializer: vec![TensorProto {
                    name: "w".into(),
                    dims: vec![3, 2],
                    data_type: float,
                    float_data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                    ..Default::default()
                }],
                input: vec![value("x", vec![rows(), Dim::DimValue(3)])],
                output: vec![value("y", vec![rows(), Dim::DimValue(2)])],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Runs the matmul model on `batch` rows of `[r, r + 1, r + 2]`, checking
    /// every output against the product computed here.
    fn run_matmul(model: &OnnxModel, batch: usize) {
        let x: Vec<f32> = (0..batch * 3).map(|i| (i / 3 + i % 3) as f32).collect();
        let outputs = model
            .run(vec![TractTensor::from_shape(&[batch, 3], &x).unwrap()])
            .unwrap();
        let y = outputs[0].to_plain_array_view::<f32>().unwrap();
        assert_eq!(y.shape(), &[batch, 2]);
        for row in 0..batch {
            let r = row as f32;
            let want = [
                r + 3.0 * (r + 1.0) + 5.0 * (r + 2.0),
                2.0 * r + 4.0 * (r + 1.0) + 6.0 * (r + 2.0),
            ];
            assert_eq!([y[[row, 0]], y[[row, 1]]], want, "batch {batch}, row {row}");
        }
    }

    #[test]
    fn each_input_shape_gets_a_plan_of_its_own_up_to_the_limit() {
        let bytes = matmul_model(None);
        let model = OnnxModel::parse(&bytes).unwrap();
        let size = bytes.len() as u64;
        // Parsed, not planned: the plan waits for a shape.
        assert_eq!(model.resident_bytes(), size);
        run_matmul(&model, 1);
        run_matmul(&model, 1);
        assert_eq!(model.resident_bytes(), 2 * size, "one plan for batch 1");
        // Rows of 4 where the model takes 3: batch 1's plan refuses them,
        // and no plan is built for them.
        let wrong = TractTensor::from_shape(&[1, 4], &[0f32; 4]).unwrap();
        assert!(model.run(vec![wrong]).is_err());
        assert_eq!(model.resident_bytes(), 2 * size);
        for batch in 2..=MAX_SHAPE_PLANS {
            run_matmul(&model, batch);
        }
        let specialised = 1 + MAX_SHAPE_PLANS as u64;
        assert_eq!(model.resident_bytes(), specialised * size);
        // Past the limit, new shapes share the symbolic plan: one more plan,
        // however many shapes follow.
        for batch in MAX_SHAPE_PLANS + 1..MAX_SHAPE_PLANS + 4 {
            run_matmul(&model, batch);
        }
        assert_eq!(model.resident_bytes(), (specialised + 1) * size);
        // The specialised plans still serve their shapes.
        run_matmul(&model, 2);
        assert_eq!(model.resident_bytes(), (specialised + 1) * size);
    }

    #[test]
    fn a_model_of_fixed_shapes_is_planned_when_parsed() {
        let bytes = matmul_model(Some(2));
        let model = OnnxModel::parse(&bytes).unwrap();
        assert_eq!(model.resident_bytes(), 2 * bytes.len() as u64);
        run_matmul(&model, 2);
        assert_eq!(model.resident_bytes(), 2 * bytes.len() as u64);
        let error = model
            .run(vec![TractTensor::from_shape(&[1, 3], &[0f32; 3]).unwrap()])
            .unwrap_err();
        assert!(!error.is_empty());
    }

    #[test]
    fn bytes_that_are_not_onnx_are_refused_with_the_reason() {
        let error = OnnxModel::parse(b"not a model").unwrap_err();
        assert!(error.contains("ONNX"), "{error}");
    }

    /// The backend against the reference outputs of the `onnx` wheel's
    /// light models (`onnx/backend/test/data/light`, fetched by
    /// `cargo xtask onnx-light` into `MAYFLY_ONNX_LIGHT`): the input is
    /// onnx's dummy data (`arange(n) / n` in the input's shape), the
    /// tolerance onnx's own (rtol 1e-3). Models tract cannot load are listed,
    /// not failed; every model it loads must match.
    #[test]
    fn light_models_match_the_onnx_reference_outputs() {
        let Some(dir) = std::env::var_os("MAYFLY_ONNX_LIGHT") else {
            eprintln!("MAYFLY_ONNX_LIGHT is not set: run `cargo xtask onnx-light`; skipped");
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let mut models: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
            .collect();
        models.sort();
        assert!(!models.is_empty(), "no .onnx files in {}", dir.display());
        let (mut matched, mut unsupported) = (Vec::new(), Vec::new());
        for path in &models {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(path).unwrap();
            let model = match OnnxModel::parse(&bytes) {
                Ok(model) => model,
                Err(e) => {
                    unsupported.push(format!("{name}: {e}"));
                    continue;
                }
            };
            let inference = tract_onnx::onnx()
                .model_for_read(&mut std::io::Cursor::new(&bytes))
                .unwrap();
            let inputs = (0..model.inputs().len())
                .map(|i| {
                    let shape = inference
                        .input_fact(i)
                        .unwrap()
                        .shape
                        .as_concrete_finite()
                        .unwrap()
                        .unwrap_or_else(|| panic!("{name}: input {i} has no concrete shape"));
                    let n: usize = shape.iter().product();
                    let values: Vec<f32> = (0..n).map(|k| (k as f64 / n as f64) as f32).collect();
                    TractTensor::from_shape(&shape, &values).unwrap()
                })
                .collect();
            let outputs = match model.run(inputs) {
                Ok(outputs) => outputs,
                Err(e) => {
                    unsupported.push(format!("{name}: runs with error {e}"));
                    continue;
                }
            };
            for (i, got) in outputs.iter().enumerate() {
                let reference = dir.join(format!("{name}_output_{i}.pb"));
                let proto =
                    tract_onnx::tensor::proto_from_reader(std::fs::File::open(&reference).unwrap())
                        .unwrap();
                let want = tract_onnx::tensor::load_tensor(
                    &tract_onnx::data_resolver::FopenDataResolver,
                    &proto,
                    None,
                )
                .unwrap();
                assert_eq!(got.shape(), want.shape(), "{name} output {i}");
                let got = got.cast_to::<f32>().unwrap();
                let want = want.cast_to::<f32>().unwrap();
                let got = got.to_plain_array_view::<f32>().unwrap();
                let want = want.to_plain_array_view::<f32>().unwrap();
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!(
                        (g - w).abs() <= 1e-3 * w.abs() + 1e-5,
                        "{name} output {i}: {g} against the reference {w}"
                    );
                }
            }
            matched.push(name);
        }
        eprintln!("matched the reference: {}", matched.join(", "));
        eprintln!("unsupported by tract: {unsupported:#?}");
        assert!(!matched.is_empty(), "no light model ran");
    }
}
