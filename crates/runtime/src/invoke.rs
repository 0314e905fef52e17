//! One request, one fresh instance: the hot path of the node.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use wasmtime::Store;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p2::types::{HostIncomingRequest, HostResponseOutparam};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::body::{BodyFlags, Direction, LimitedBody, RequestBody};
use crate::logs::{GuestOutput, LogSink, LogStream};
use crate::meter::{CpuMetered, MemoryMeter};
use crate::outbound::DenyAllOutbound;

/// The response a guest produced. Its body streams from the guest, which may
/// still be running while the caller sends it.
pub type InvocationResponse = http::Response<HyperOutgoingBody>;

/// Who an invocation is, for its log lines and usage report.
#[derive(Debug, Clone)]
pub struct RequestLabels {
    /// Function name.
    pub function: String,
    /// Function version serving the request.
    pub version: u64,
    /// Request id, unique per invocation and returned to the client.
    pub request_id: String,
    /// What started the invocation: `http`, `invoke`, …
    pub trigger: &'static str,
    /// Whether this invocation had to load the function from disk first.
    pub cold_start: bool,
}

/// Limits applied to one invocation.
#[derive(Debug, Clone)]
pub struct InvocationLimits {
    /// Largest linear memory, all of the instance's memories together.
    pub memory_bytes: usize,
    /// Wall-clock time from instantiation to the end of the response body.
    pub timeout: Duration,
    /// Bytes of stdout and of stderr kept per invocation; the rest is
    /// dropped after a truncation marker.
    pub max_log_bytes: usize,
    /// Largest request body handed to the guest.
    pub max_request_bytes: u64,
    /// Largest response body sent on from the guest.
    pub max_response_bytes: u64,
}

impl Default for InvocationLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 128 << 20,
            timeout: Duration::from_secs(30),
            max_log_bytes: 1 << 20,
            max_request_bytes: 16 << 20,
            max_response_bytes: 16 << 20,
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

/// How an invocation ended, for billing and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest answered and finished its response.
    Ok,
    /// The guest trapped, answered with an error, sent no response, or broke
    /// a body size limit.
    Error,
    /// The invocation ran past its timeout.
    Timeout,
    /// The guest needed more memory than its limit allows.
    Oom,
    /// The node shut down before the invocation finished.
    Killed,
}

/// What one invocation used and how it ended. Reported once, when the guest
/// is done (after the response body, not just its head).
#[derive(Debug, Clone)]
pub struct InvocationReport {
    /// When the invocation started, by the wall clock.
    pub started_at: SystemTime,
    /// From the start to the guest's end.
    pub wall: Duration,
    /// Time a worker thread spent running the guest's task: instantiation,
    /// guest code and the host calls it made (the wall time of each poll;
    /// it excludes waiting on I/O, timers and the client).
    pub cpu: Duration,
    /// Most linear memory the instance held at once.
    pub peak_memory_bytes: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// The HTTP status the client received, if the invocation got that far.
    pub status: Option<u16>,
}

/// Follows every invocation whose guest runs: `started` once it is about to
/// run, `finished` once it is over, always as a pair. A request refused
/// before its guest runs (too large) produces neither. Called on the request
/// path: neither may block (queue and return).
pub trait ReportSink: Send + Sync {
    /// An invocation is about to run.
    fn started(&self, _labels: &RequestLabels) {}

    /// One finished invocation.
    fn finished(&self, labels: &RequestLabels, report: InvocationReport);
}

/// Per-invocation host state: the `T` of the wasmtime `Store`.
pub(crate) struct InvocationState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: DenyAllOutbound,
    memory: MemoryMeter,
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
    lifecycle: Arc<Lifecycle>,
}

/// How a guest's run ended, before it is turned into an outcome.
enum End {
    Returned(Result<(), InvocationError>),
    TimedOut,
    Killed,
}

impl Function {
    pub(crate) fn new(pre: ProxyPre<InvocationState>, lifecycle: Arc<Lifecycle>) -> Self {
        Self { pre, lifecycle }
    }

    /// Runs `request` in a fresh instance and returns the guest's response as
    /// soon as its head is ready. The guest keeps running in its own task
    /// while the body streams, bounded by `limits.timeout`; failures after the
    /// head was sent are logged and end the body early. When the guest is
    /// done, `reports` receives what it used and how it ended; a request
    /// refused before the guest ran (too large) produces no report.
    pub async fn handle<B>(
        &self,
        request: http::Request<B>,
        labels: Arc<RequestLabels>,
        limits: &InvocationLimits,
        logs: Arc<dyn LogSink>,
        reports: Arc<dyn ReportSink>,
    ) -> Result<InvocationResponse, InvocationError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        // A client that trickles a chunked body holds buffer memory, not an
        // instance; the function's timeout bounds that too.
        let request = tokio::time::timeout(
            limits.timeout,
            admit_request(request, limits.max_request_bytes),
        )
        .await
        .map_err(|_| InvocationError::RequestBodyTimeout(limits.timeout))??;
        let started_at = SystemTime::now();
        let started = Instant::now();
        let flags = Arc::new(BodyFlags::default());
        let request = request.map(|body| {
            LimitedBody::new(
                body,
                limits.max_request_bytes,
                Direction::Request,
                flags.clone(),
            )
        });

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
            memory: MemoryMeter::new(limits.memory_bytes),
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| &mut state.memory);
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

        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        let guest = GuestRun {
            pre: self.pre.clone(),
            lifecycle: self.lifecycle.clone(),
            labels,
            limits: limits.clone(),
            flags,
            reports,
            started_at,
            started,
        };
        guest.reports.started(&guest.labels);
        let in_flight = InFlight::enter(&self.lifecycle);
        tokio::spawn(async move {
            guest
                .run(store, incoming, outparam, response_rx, head_tx)
                .await;
            drop(in_flight);
        });

        match head_rx.await {
            Ok(head) => head,
            Err(_) => Err(InvocationError::Unavailable(
                "the invocation task ended without an answer".into(),
            )),
        }
    }
}

type ResponseReceiver =
    tokio::sync::oneshot::Receiver<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;
type HeadSender = tokio::sync::oneshot::Sender<Result<InvocationResponse, InvocationError>>;

/// Everything the invocation's task needs besides the store.
struct GuestRun {
    pre: ProxyPre<InvocationState>,
    lifecycle: Arc<Lifecycle>,
    labels: Arc<RequestLabels>,
    limits: InvocationLimits,
    flags: Arc<BodyFlags>,
    reports: Arc<dyn ReportSink>,
    started_at: SystemTime,
    started: Instant,
}

impl GuestRun {
    /// Runs the guest to its end, hands the response head to the caller as
    /// soon as the guest sets it, and reports the invocation.
    async fn run(
        self,
        mut store: Store<InvocationState>,
        incoming: Resource<HostIncomingRequest>,
        outparam: Resource<HostResponseOutparam>,
        mut response_rx: ResponseReceiver,
        head_tx: HeadSender,
    ) {
        let mut head_tx = Some(head_tx);
        let mut awaiting_head = true;
        let mut status = None;
        let mut head_failed = false;
        let (end, cpu) = {
            let pre = &self.pre;
            let mut guest = std::pin::pin!(CpuMetered::new(async {
                let proxy = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| InvocationError::Unavailable(format!("{e:#}")))?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, incoming, outparam)
                    .await
                    .map_err(classify_guest_error)
            }));
            let deadline = tokio::time::sleep(self.limits.timeout);
            let mut deadline = std::pin::pin!(deadline);
            let mut killed = std::pin::pin!(self.lifecycle.kill.cancelled());
            let end = loop {
                tokio::select! {
                    biased;
                    head = &mut response_rx, if awaiting_head => {
                        // A completed receiver must not be polled again.
                        awaiting_head = false;
                        // An error means the outparam was dropped unset; the
                        // guest's end says why.
                        if let Ok(head) = head
                            && let Some(tx) = head_tx.take()
                        {
                            (status, head_failed) = self.send_head(tx, head);
                        }
                    }
                    result = guest.as_mut() => break End::Returned(result),
                    () = &mut deadline => break End::TimedOut,
                    () = &mut killed => break End::Killed,
                }
            };
            (end, guest.cpu())
        };

        // The guest may have set its response in the same poll it returned.
        if awaiting_head
            && let Ok(head) = response_rx.try_recv()
            && let Some(tx) = head_tx.take()
        {
            (status, head_failed) = self.send_head(tx, head);
        }

        let wall = self.started.elapsed();
        let memory = &store.data().memory;
        let (peak_memory, refused) = (memory.peak(), memory.refused());
        // Frees the instance slot and flushes the last partial log line.
        drop(store);

        let failure = match end {
            End::Returned(Ok(())) => None,
            End::Returned(Err(_)) if refused => {
                Some(InvocationError::OutOfMemory(self.limits.memory_bytes))
            }
            End::Returned(Err(error)) => Some(error),
            End::TimedOut => Some(InvocationError::Timeout(self.limits.timeout)),
            End::Killed => Some(InvocationError::Killed),
        };
        let outcome = match &failure {
            None if head_tx.is_none() && !head_failed && !self.flags.response_too_large() => {
                Outcome::Ok
            }
            Some(InvocationError::Timeout(_)) => Outcome::Timeout,
            Some(InvocationError::OutOfMemory(_)) => Outcome::Oom,
            Some(InvocationError::Killed) => Outcome::Killed,
            _ => Outcome::Error,
        };
        if let Some(error) = &failure {
            tracing::warn!(
                function = %self.labels.function,
                version = self.labels.version,
                request_id = %self.labels.request_id,
                "invocation failed: {error}"
            );
        }
        if let Some(tx) = head_tx {
            let error = if self.flags.request_too_large() {
                InvocationError::RequestTooLarge(self.limits.max_request_bytes)
            } else {
                failure.unwrap_or(InvocationError::NoResponse)
            };
            status = Some(error.status().as_u16());
            let _ = tx.send(Err(error));
        }

        self.reports.finished(
            &self.labels,
            InvocationReport {
                started_at: self.started_at,
                wall,
                cpu,
                peak_memory_bytes: peak_memory as u64,
                outcome,
                status,
            },
        );
    }

    /// Hands the guest's response head to the caller, with its body bounded
    /// by the response limit. Returns the status the client gets and whether
    /// it is an error in place of the guest's response.
    fn send_head(
        &self,
        tx: HeadSender,
        head: Result<hyper::Response<HyperOutgoingBody>, ErrorCode>,
    ) -> (Option<u16>, bool) {
        let max = self.limits.max_response_bytes;
        let answer = match head {
            Ok(response) if declared_length(response.headers()).is_some_and(|len| len > max) => {
                Err(InvocationError::ResponseTooLarge(max))
            }
            Ok(response) => Ok(response.map(|body| {
                LimitedBody::new(body, max, Direction::Response, self.flags.clone()).boxed_unsync()
            })),
            Err(code) => Err(InvocationError::ErrorCode(format!("{code:?}"))),
        };
        let status = match &answer {
            Ok(response) => response.status(),
            Err(error) => error.status(),
        };
        let failed = answer.is_err();
        let _ = tx.send(answer);
        (Some(status.as_u16()), failed)
    }
}

/// Refuses a request whose body is over `max` before any guest runs. A body
/// of unknown length (chunked) is read into memory first, up to `max`, so it
/// gets the same 413 instead of failing inside a guest that may already have
/// answered; a body of declared length streams to the guest as it arrives.
async fn admit_request<B>(
    request: http::Request<B>,
    max: u64,
) -> Result<http::Request<RequestBody<B>>, InvocationError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    let (parts, body) = request.into_parts();
    let body = match declared_length(&parts.headers) {
        Some(len) if len > max => return Err(InvocationError::RequestTooLarge(max)),
        None if !body.is_end_stream() => {
            let mut body = std::pin::pin!(body);
            let mut buffer = bytes::BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    InvocationError::BadRequest(format!(
                        "the request body could not be read: {}",
                        e.into()
                    ))
                })?;
                if let Ok(data) = frame.into_data() {
                    if (buffer.len() + data.len()) as u64 > max {
                        return Err(InvocationError::RequestTooLarge(max));
                    }
                    buffer.extend_from_slice(&data);
                }
            }
            RequestBody::Buffered {
                data: Some(buffer.freeze()),
            }
        }
        _ => RequestBody::Streaming { body },
    };
    Ok(http::Request::from_parts(parts, body))
}

/// The body length a message declares, if it declares a valid one.
fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn classify_guest_error(error: wasmtime::Error) -> InvocationError {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => InvocationError::Trap(trap.to_string()),
        None => InvocationError::Trap(format!("{error:#}")),
    }
}

/// Instances running on the node, and the switch that ends them all when
/// the node shuts down.
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    in_flight: AtomicUsize,
    idle: tokio::sync::Notify,
    pub(crate) kill: CancellationToken,
}

impl Lifecycle {
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Returns once no invocation is running.
    pub(crate) async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            // Register before checking, so a decrement in between still wakes us.
            idle.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Counts one invocation as running until dropped.
struct InFlight(Arc<Lifecycle>);

impl InFlight {
    fn enter(lifecycle: &Arc<Lifecycle>) -> Self {
        lifecycle.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(lifecycle.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
