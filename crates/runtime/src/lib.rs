//! Mayfly's runtime layer: everything that touches wasmtime.
//!
//! This crate validates uploaded components, compiles them once into
//! serialized artifacts, loads artifacts into pre-linked [`Function`]s and runs
//! one fresh instance per request. It knows nothing about storage, routing or
//! the admin API: the platform crate above it decides where artifacts live and
//! which function a request reaches. Host capabilities reach guests through
//! small traits ([`LogSink`] for stdout/stderr, [`KeyValueBackend`] and
//! [`ConfigSource`] behind wasi:keyvalue and wasi:config) so that embedded
//! and cluster back-ends plug in from above; what each function may reach is
//! its [`Capabilities`].

mod body;
mod caps;
mod compiler;
mod engine;
mod fair;
mod host_limits;
mod invoke;
mod labels;
mod limiter;
mod logs;
mod meter;
mod outbound;
mod p3;
mod state;
mod validate;

pub use caps::{
    Capabilities, ConfigSource, IdleModel, KeyValueBackend, ModelSource, NnHost, NnLimits,
    OnnxModel,
};
pub use compiler::{CompileLimits, Compiler, WorkerArgs, run_worker};
pub use engine::{Runtime, RuntimeConfig};
pub use invoke::{
    Function, InvocationLimits, InvocationReport, InvocationResponse, Outcome, ReportSink,
};
pub use labels::RequestLabels;
pub use logs::{LogSink, LogStream};
pub use outbound::{MAX_OUTBOUND_IN_FLIGHT, OutboundPolicy};
pub use state::InvocationError;
pub use validate::{
    CAPABILITY_INTERFACES, CompiledComponent, DeployError, HOST_INTERFACES, HandlerKind,
    P3_HOST_INTERFACES, P3_VERSION,
};
pub use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
