//! The host side of one invocation: the state its store holds (WASI,
//! wasi:http, the capabilities, the memory meter) and the ways it can fail.
//! Shared by both handler kinds (`invoke.rs` for WASI 0.2, `p3.rs` for 0.3)
//! and by the linkers (`engine.rs`, `validate.rs`).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::caps::{Capabilities, CapsView};
use crate::fair::FirstSlice;
use crate::logs::GuestOutput;
use crate::meter::MemoryMeter;
use crate::outbound::OutboundHooks;

/// Why an invocation produced no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvocationError {
    /// The guest trapped (panicked, hit `unreachable`, ran out of stack, …)
    /// before it sent a response.
    #[error("the function trapped: {0}")]
    Trap(String),
    /// The guest needed more linear memory than its limit allows.
    #[error("the function ran out of memory: its limit is {} MiB", .0 >> 20)]
    OutOfMemory(usize),
    /// The guest answered with a wasi:http error code instead of a response.
    #[error("the function returned an error instead of a response: {0}")]
    ErrorCode(String),
    /// The guest returned without ever setting a response.
    #[error("the function returned without sending a response")]
    NoResponse,
    /// The invocation ran past its timeout.
    #[error("the function did not respond within {0:?}")]
    Timeout(Duration),
    /// The request body is larger than the function accepts.
    #[error("the request body is over this function's limit of {0} bytes")]
    RequestTooLarge(u64),
    /// A body of unknown length did not finish arriving within the
    /// function's timeout.
    #[error("the request body did not arrive within {0:?}")]
    RequestBodyTimeout(Duration),
    /// The guest declared a response body larger than its limit.
    #[error("the function's response is over its limit of {0} bytes")]
    ResponseTooLarge(u64),
    /// The request could not be handed to the guest.
    #[error("the request cannot be handed to the function: {0}")]
    BadRequest(String),
    /// The node could not run the invocation (for example, no free instance
    /// slot).
    #[error("the node could not run the function: {0}")]
    Unavailable(String),
    /// The node shut down before the invocation finished.
    #[error("the node shut down before the function finished")]
    Killed,
}

impl InvocationError {
    /// The HTTP status a client receives for this failure.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            InvocationError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            InvocationError::RequestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            InvocationError::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            InvocationError::BadRequest(_) => StatusCode::BAD_REQUEST,
            InvocationError::Unavailable(_) | InvocationError::Killed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            InvocationError::Trap(_)
            | InvocationError::OutOfMemory(_)
            | InvocationError::ErrorCode(_)
            | InvocationError::NoResponse
            | InvocationError::ResponseTooLarge(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Per-invocation host state: the `T` of the wasmtime `Store`.
pub(crate) struct InvocationState {
    pub(crate) wasi: WasiCtx,
    pub(crate) stdout: GuestOutput,
    pub(crate) stderr: GuestOutput,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    /// What this invocation may reach; replaced when a kept instance serves
    /// the next request.
    pub(crate) caps: Arc<Capabilities>,
    /// Outbound HTTP under `caps.outbound`, refusals logged to `stderr`.
    pub(crate) outbound: OutboundHooks,
    pub(crate) memory: MemoryMeter,
    /// Set by the epoch callback when the guest's slice ends: the current
    /// invocation is CPU-bound and moves to the guest pool (see `fair`).
    pub(crate) slice_spent: Arc<AtomicBool>,
    /// The current invocation's first slice, which the epoch callback asks
    /// whether it is spent.
    pub(crate) slice: FirstSlice,
    /// Host work done for this invocation on other threads (wasi:nn
    /// inference), counted in its CPU time.
    pub(crate) extra_cpu: Duration,
}

impl InvocationState {
    /// The part of the state the wasi:keyvalue and wasi:config host uses.
    pub(crate) fn caps_view(&mut self) -> CapsView<'_> {
        CapsView {
            caps: &self.caps,
            table: &mut self.table,
            stderr: &self.stderr,
            memory: &mut self.memory,
            extra_cpu: &mut self.extra_cpu,
            awaited_inference: &mut self.slice.awaited_inference,
        }
    }

    /// The memory meter and the resource table, for charging host memory.
    pub(crate) fn host_parts(&mut self) -> (&mut MemoryMeter, &mut ResourceTable) {
        (&mut self.memory, &mut self.table)
    }

    /// Explains a host refusal in the invocation's stderr log, where the
    /// function's author looks.
    pub(crate) fn explain(&self, message: &str) {
        self.stderr.host_line(&format!("mayfly: {message}"));
    }
}

/// Outbound HTTP hooks for `caps`, explaining each refused request in the
/// invocation's stderr log.
pub(crate) fn outbound_hooks(caps: &Capabilities, stderr: &GuestOutput) -> OutboundHooks {
    let stderr = stderr.clone();
    OutboundHooks::new(
        caps.outbound.clone(),
        Box::new(move |message| stderr.host_line(&format!("mayfly: {message}"))),
    )
}

impl WasiView for InvocationState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InvocationState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// The error of a guest that failed: its trap's text when it trapped.
pub(crate) fn classify_guest_error(error: wasmtime::Error) -> InvocationError {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => InvocationError::Trap(trap.to_string()),
        None => InvocationError::Trap(format!("{error:#}")),
    }
}
