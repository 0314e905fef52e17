//! Mayfly's scaling policies, free of wasmtime, storage and time sources.
//!
//! The node's autoscaler (in `mayfly-platform`) and the trace-replay
//! simulator (`mayfly simulate`) drive the same [`KeepAlivePolicy`] code:
//! the node with the real clock, the simulator with a simulated one. Every
//! time here is a [`Duration`](std::time::Duration) since some origin the
//! caller chooses.
//!
//! - [`FixedKeepAlive`]: the baseline, loaded for a fixed time after every
//!   invocation.
//! - [`HybridHistogram`]: learns each function's idle times and pre-warms
//!   and keeps alive around them (Shahrad et al., "Serverless in the Wild",
//!   USENIX ATC 2020).
//! - [`parse_policy`]: a policy from its command-line spelling.
//! - [`trace`], [`synthetic`] and [`simulate()`]: replay real or synthetic
//!   invocation traces against several policies and compare cold starts
//!   with the memory kept warm for nothing.

mod hybrid;
mod parse;
mod policy;
pub mod simulate;
pub mod synthetic;
pub mod trace;

pub use hybrid::HybridHistogram;
pub use parse::{PolicyError, parse_policy};
pub use policy::{FixedKeepAlive, FunctionKeepAlive, KeepAlivePolicy, Windows};
pub use simulate::{PolicyResult, render_table, simulate};
pub use synthetic::SyntheticConfig;
pub use trace::{FunctionTrace, Invocation, TraceError};
