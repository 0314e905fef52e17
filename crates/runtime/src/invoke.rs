//! One request, one fresh instance: the hot path of the node.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::logs::{GuestOutput, LogSink, LogStream};
use crate::outbound::DenyAllOutbound;

/// The response a guest produced. Its body streams from the guest, which may
/// still be running while the caller sends it.
pub type InvocationResponse = http::Response<HyperOutgoingBody>;

/// Who an invocation is, for its log lines.
#[derive(Debug, Clone)]
pub struct RequestLabels {
    /// Function name.
    pub function: String,
    /// Function version serving the request.
    pub version: u64,
    /// Request id, unique per invocation and returned to the client.
    pub request_id: String,
}

/// Limits applied to one invocation.
#[derive(Debug, Clone)]
pub struct InvocationLimits {
    /// Largest linear memory the guest may grow to.
    pub memory_bytes: usize,
    /// Wall-clock time from instantiation to the end of the response body.
    pub timeout: Duration,
    /// Bytes of stdout and of stderr kept per invocation; the rest is
    /// dropped after a truncation marker.
    pub max_log_bytes: usize,
}

impl Default for InvocationLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 128 << 20,
            timeout: Duration::from_secs(30),
            max_log_bytes: 1 << 20,
        }
    }
}

/// Why an invocation produced no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvocationError {
    /// The guest trapped (panicked, hit `unreachable`, ran out of stack, …)
    /// before it sent a response.
    #[error("the function trapped: {0}")]
    Trap(String),
    /// The guest answered with a wasi:http error code instead of a response.
    #[error("the function returned an error instead of a response: {0}")]
    ErrorCode(String),
    /// The guest returned without ever setting a response.
    #[error("the function returned without sending a response")]
    NoResponse,
    /// The invocation ran past its timeout.
    #[error("the function did not respond within {0:?}")]
    Timeout(Duration),
    /// The request could not be handed to the guest.
    #[error("the request cannot be handed to the function: {0}")]
    BadRequest(String),
    /// The node could not run the invocation (for example, no free instance
    /// slot).
    #[error("the node could not run the function: {0}")]
    Unavailable(String),
}

/// Per-invocation host state: the `T` of the wasmtime `Store`.
pub(crate) struct InvocationState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: DenyAllOutbound,
    limits: StoreLimits,
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

/// A deployed function, compiled and pre-linked: instantiating it per request
/// only allocates a slot and runs the guest's start-up.
#[derive(Clone)]
pub struct Function {
    pre: ProxyPre<InvocationState>,
}

impl Function {
    pub(crate) fn new(pre: ProxyPre<InvocationState>) -> Self {
        Self { pre }
    }

    /// Runs `request` in a fresh instance and returns the guest's response as
    /// soon as its head is ready. The guest keeps running in its own task
    /// while the body streams, bounded by `limits.timeout`; failures after the
    /// head was sent are logged and end the body early.
    pub async fn handle<B>(
        &self,
        request: http::Request<B>,
        labels: Arc<RequestLabels>,
        limits: &InvocationLimits,
        logs: Arc<dyn LogSink>,
    ) -> Result<InvocationResponse, InvocationError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let stdout = GuestOutput::new(
            labels.clone(),
            logs.clone(),
            LogStream::Stdout,
            limits.max_log_bytes,
        );
        let stderr = GuestOutput::new(
            labels.clone(),
            logs,
            LogStream::Stderr,
            limits.max_log_bytes,
        );
        let state = InvocationState {
            wasi: WasiCtxBuilder::new().stdout(stdout).stderr(stderr).build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            outbound: DenyAllOutbound,
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .instances(usize::MAX)
                .build(),
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| &mut state.limits);
        // Yield to the async runtime at every epoch tick so a busy guest
        // never starves other requests on the same worker thread.
        store.epoch_deadline_async_yield_and_update(1);

        let (response_tx, response_rx) = tokio::sync::oneshot::channel();
        let incoming = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)
            .map_err(|e| InvocationError::BadRequest(format!("{e:#}")))?;
        let outparam = store
            .data_mut()
            .http()
            .new_response_outparam(response_tx)
            .map_err(|e| InvocationError::Unavailable(format!("{e:#}")))?;

        let pre = self.pre.clone();
        let timeout = limits.timeout;
        let task_labels = labels.clone();
        let task = tokio::spawn(async move {
            let run = async {
                let proxy = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| InvocationError::Unavailable(format!("{e:#}")))?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, incoming, outparam)
                    .await
                    .map_err(classify_guest_error)
            };
            let result = match tokio::time::timeout(timeout, run).await {
                Ok(result) => result,
                Err(_) => Err(InvocationError::Timeout(timeout)),
            };
            if let Err(error) = &result {
                tracing::warn!(
                    function = %task_labels.function,
                    version = task_labels.version,
                    request_id = %task_labels.request_id,
                    "invocation failed: {error}"
                );
            }
            result
        });

        match response_rx.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(code)) => Err(InvocationError::ErrorCode(format!("{code:?}"))),
            // The outparam was dropped unset: the task's result says why.
            Err(_) => match task.await {
                Ok(Ok(())) => Err(InvocationError::NoResponse),
                Ok(Err(error)) => Err(error),
                Err(join) => Err(InvocationError::Unavailable(join.to_string())),
            },
        }
    }
}

fn classify_guest_error(error: wasmtime::Error) -> InvocationError {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => InvocationError::Trap(trap.to_string()),
        None => InvocationError::Trap(format!("{error:#}")),
    }
}
