//! One request, one fresh instance: the hot path of the node.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use wasmtime::Store;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p2::types::{HostIncomingRequest, HostResponseOutparam};
use wasmtime_wasi_http::p3::bindings::ServicePre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpView};

use crate::body::{BodyFlags, Direction, LimitedBody, RequestBody};
use crate::caps::Capabilities;
use crate::fair::{FIRST_SLICE_TICKS, FirstSlice, GuestPool};
use crate::labels::RequestLabels;
use crate::logs::{GuestOutput, LogSink, LogStream};
use crate::meter::{CpuMetered, MemoryMeter};
use crate::state::{InvocationError, InvocationState, classify_guest_error, outbound_hooks};
use crate::validate::HandlerKind;

/// The response a guest produced. Its body streams from the guest, which may
/// still be running while the caller sends it.
pub type InvocationResponse = http::Response<HyperOutgoingBody>;

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
    /// Hand a request body of unknown length (chunked) to the guest as it
    /// arrives instead of reading it whole first. Past `max_request_bytes`
    /// the guest's read then fails, and the client gets 413 if the guest
    /// had not answered yet.
    pub streaming_request: bool,
}

impl Default for InvocationLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 128 << 20,
            timeout: Duration::from_secs(30),
            max_log_bytes: 1 << 20,
            max_request_bytes: 16 << 20,
            max_response_bytes: 16 << 20,
            streaming_request: false,
        }
    }
}

/// How an invocation ended, for billing and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest answered and finished its response; or a streamed request
    /// body went over its limit while the guest read it (the client's
    /// doing: the client got 413 if the guest had not answered).
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
    /// The client went away before the response was done (before its head
    /// could be handed over, or while its body was still flowing), and the
    /// guest then failed or finished unheard. Not the function's error: a
    /// guest whose writes fail because nobody reads them is not broken.
    ClientClosed,
}

/// What one invocation used and how it ended. Reported once, when the guest
/// is done (after the response body, not just its head).
#[derive(Debug, Clone)]
pub struct InvocationReport {
    /// When the invocation started, by the wall clock.
    pub started_at: SystemTime,
    /// From the start to the guest's end.
    pub wall: Duration,
    /// The part of `wall` spent instantiating the guest, measured only for
    /// a cold start (zero otherwise, and for WASI 0.3 components, whose
    /// instantiation is part of their call).
    pub instantiate: Duration,
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

/// A pre-linked component, by the wasi:http handler it exports.
#[derive(Clone)]
pub(crate) enum Handler {
    /// `wasi:http/incoming-handler@0.2.x`.
    P2(ProxyPre<InvocationState>),
    /// `wasi:http/handler@0.3.x`: never kept (reuse is refused at deploy).
    P3(ServicePre<InvocationState>),
}

impl Handler {
    /// The handler of `kind` that `pre` exports; an error if it does not
    /// export it as the handler's types require.
    pub(crate) fn new(
        kind: HandlerKind,
        pre: wasmtime::component::InstancePre<InvocationState>,
    ) -> wasmtime::Result<Self> {
        Ok(match kind {
            HandlerKind::P2 => Handler::P2(ProxyPre::new(pre)?),
            HandlerKind::P3 => Handler::P3(ServicePre::new(pre)?),
        })
    }

    /// The engine the handler was linked on.
    fn engine(&self) -> &wasmtime::Engine {
        match self {
            Handler::P2(pre) => pre.engine(),
            Handler::P3(pre) => pre.engine(),
        }
    }
}

/// One request's call of its handler, ready to run in the invocation's task.
enum Call {
    P2 {
        pre: ProxyPre<InvocationState>,
        /// A kept instance to call instead of a new one.
        proxy: Option<Proxy>,
        incoming: Resource<HostIncomingRequest>,
        outparam: Resource<HostResponseOutparam>,
    },
    P3 {
        pre: ServicePre<InvocationState>,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        response_tx: crate::p3::ResponseSender,
    },
}

/// A deployed function, compiled and pre-linked: instantiating it per request
/// only allocates a slot and runs the guest's start-up.
///
/// A function loaded for reuse (the hot tier) keeps its instances after a
/// successful request and hands them to later requests, one at a time.
#[derive(Clone)]
pub struct Function {
    pre: Handler,
    lifecycle: Arc<Lifecycle>,
    kept: Option<Arc<KeptInstances>>,
    /// Size of the compiled code image, mapped from the artifact while loaded.
    code_bytes: usize,
}

/// How a guest's run ended, before it is turned into an outcome.
enum End {
    /// With the instance to keep, if it may be kept.
    Returned(Result<Option<Proxy>, InvocationError>),
    TimedOut,
    Killed,
}

impl Function {
    pub(crate) fn new(
        pre: Handler,
        lifecycle: Arc<Lifecycle>,
        reuse: bool,
        code_bytes: usize,
    ) -> Self {
        // A 0.3 instance is never kept: the deploy refuses `reuse` for it.
        let reuse = reuse && matches!(pre, Handler::P2(_));
        let kept = reuse.then(|| {
            let kept = Arc::new(KeptInstances::default());
            lifecycle.register(&kept);
            kept
        });
        Self {
            pre,
            lifecycle,
            kept,
            code_bytes,
        }
    }

    /// Which wasi:http handler the function exports.
    pub fn handler_kind(&self) -> HandlerKind {
        match self.pre {
            Handler::P2(_) => HandlerKind::P2,
            Handler::P3(_) => HandlerKind::P3,
        }
    }

    /// Whether this function keeps and reuses its instances.
    pub fn reuses_instances(&self) -> bool {
        self.kept.is_some()
    }

    /// Instances kept idle, waiting for a request (0 unless reused).
    pub fn kept_instances(&self) -> usize {
        self.kept.as_ref().map_or(0, |kept| kept.len())
    }

    /// Linear memory held by the idle kept instances, in bytes.
    fn kept_memory_bytes(&self) -> u64 {
        self.kept.as_ref().map_or(0, |kept| kept.memory_bytes())
    }

    /// Memory the loaded function holds between requests: its mapped code
    /// and its kept instances' linear memory, in bytes.
    pub fn resident_bytes(&self) -> u64 {
        self.code_bytes as u64 + self.kept_memory_bytes()
    }

    /// Drops the kept instances that have been idle for `idle` or longer
    /// and returns how many: how the hot pool shrinks after a burst.
    pub fn reap_kept(&self, idle: Duration) -> usize {
        self.kept
            .as_ref()
            .map_or(0, |kept| kept.take_idle_for(idle, &self.lifecycle).len())
    }

    /// Drops every kept instance, now and as running ones finish: the
    /// function is being unloaded.
    pub fn close(&self) {
        if let Some(kept) = &self.kept {
            kept.closed.store(true, Ordering::Release);
            drop(kept.take_idle_for(Duration::ZERO, &self.lifecycle));
        }
    }

    /// Runs `request` in an instance (a fresh one, or a kept one when the
    /// function reuses them) and returns the guest's response as soon as its
    /// head is ready. The guest keeps running in its own task while the body
    /// streams, bounded by `limits.timeout`; failures after the head was sent
    /// are logged and end the body early. The guest reaches what `caps`
    /// grants and nothing more. When the guest is done, `reports`
    /// receives what it used and how it ended; a request refused before the
    /// guest ran (too large) produces no report.
    pub async fn handle<B>(
        &self,
        request: http::Request<B>,
        labels: Arc<RequestLabels>,
        caps: Arc<Capabilities>,
        limits: &InvocationLimits,
        logs: Arc<dyn LogSink>,
        reports: Arc<dyn ReportSink>,
    ) -> Result<InvocationResponse, InvocationError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let head_request = request.method() == http::Method::HEAD;
        // A client that trickles a chunked body holds buffer memory, not an
        // instance; the function's timeout bounds that too.
        let request = tokio::time::timeout(
            limits.timeout,
            admit_request(request, limits.max_request_bytes, limits.streaming_request),
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

        let kept = self
            .kept
            .as_ref()
            .and_then(|kept| kept.take(&self.lifecycle));
        let (mut store, proxy, served) = match kept {
            Some(kept) => {
                let mut store = kept.store;
                let state = store.data_mut();
                state.stdout.rebind(labels.clone(), limits.max_log_bytes);
                state.stderr.rebind(labels.clone(), limits.max_log_bytes);
                // Handles left by the last invocation count from the start
                // (nothing to recount if nothing was charged).
                if state.memory.host() > 0 {
                    crate::host_limits::recount(&mut state.memory, &mut state.table);
                }
                state.memory.start_invocation(limits.memory_bytes);
                state.outbound = outbound_hooks(&caps, &state.stderr);
                state.caps = caps;
                (store, Some(kept.proxy), kept.served)
            }
            None => {
                let (secret_env, unread) = secret_environment(&caps).await;
                let store = self.new_store(&labels, caps, limits, &logs, &secret_env);
                for message in unread {
                    store.data().explain(&message);
                }
                (store, None, 0)
            }
        };
        // A fresh slice: the guest runs in the foreground until it ends.
        let slice_spent = Arc::new(AtomicBool::new(false));
        store.data_mut().slice_spent = slice_spent.clone();
        store.data_mut().slice = FirstSlice::new();
        store.set_epoch_deadline(FIRST_SLICE_TICKS);

        let (response_tx, response_rx) = tokio::sync::oneshot::channel();
        let fresh = proxy.is_none();
        let call = match &self.pre {
            Handler::P2(pre) => {
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
                Call::P2 {
                    pre: pre.clone(),
                    proxy,
                    incoming,
                    outparam,
                }
            }
            Handler::P3(pre) => Call::P3 {
                pre: pre.clone(),
                request: request.map(|body| body.boxed_unsync()),
                response_tx,
            },
        };

        if fresh {
            // A fresh instance needs a pool slot: give back an idle kept
            // instance of some function if the pool is full.
            self.lifecycle.make_room();
        }
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        let guest = GuestRun {
            lifecycle: self.lifecycle.clone(),
            kept: self.kept.clone(),
            served,
            labels,
            limits: limits.clone(),
            flags,
            reports,
            logs,
            head_request,
            started_at,
            started,
        };
        guest.reports.started(&guest.labels);
        let in_flight = InFlight::enter(&self.lifecycle);
        let task_labels = guest.labels.clone();
        self.lifecycle.pool.spawn(
            Box::pin(async move {
                guest.run(store, call, response_rx, head_tx).await;
                drop(in_flight);
            }),
            task_labels,
            slice_spent,
        );

        match head_rx.await {
            Ok(head) => head,
            Err(_) => Err(InvocationError::Unavailable(
                "the invocation task ended without an answer".into(),
            )),
        }
    }

    /// A store for a fresh instance, its stdout and stderr wired to `logs`,
    /// its environment `caps.env` then `secret_env`.
    fn new_store(
        &self,
        labels: &Arc<RequestLabels>,
        caps: Arc<Capabilities>,
        limits: &InvocationLimits,
        logs: &Arc<dyn LogSink>,
        secret_env: &[(String, String)],
    ) -> Store<InvocationState> {
        let stdout = GuestOutput::new(
            labels.clone(),
            logs.clone(),
            LogStream::Stdout,
            limits.max_log_bytes,
        );
        let stderr = GuestOutput::new(
            labels.clone(),
            logs.clone(),
            LogStream::Stderr,
            limits.max_log_bytes,
        );
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .envs(&caps.env)
            .envs(secret_env)
            .build();
        let state = InvocationState {
            wasi,
            outbound: outbound_hooks(&caps, &stderr),
            caps,
            stdout,
            stderr,
            http: WasiHttpCtx::new(),
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(crate::host_limits::MAX_TABLE_ENTRIES);
                table
            },
            memory: MemoryMeter::new(limits.memory_bytes),
            slice_spent: Arc::default(),
            slice: FirstSlice::new(),
            extra_cpu: Duration::ZERO,
        };
        let mut store = Store::new(self.pre.engine(), state);
        // The meter, with host memory recounted before it refuses a growth.
        store.limiter(|state| state);
        // At every epoch tick the guest yields to the async runtime, so a
        // busy guest never holds a worker thread for more than a tick; the
        // first time, it also marks the invocation as CPU-bound.
        store.epoch_deadline_callback(|context| {
            let state = context.data();
            if state.slice.spent() {
                state.slice_spent.store(true, Ordering::Release);
            }
            Ok(wasmtime::UpdateDeadline::Yield(1))
        });
        store
    }
}

/// A kept instance serves at most this many requests, then is replaced: a
/// guest that leaks memory or host resources a little per request cannot
/// grow without bound (the same safety valve as a worker's max requests).
const MAX_REQUESTS_PER_KEPT_INSTANCE: u32 = 10_000;

/// An instance of a reused function, idle between requests.
struct KeptInstance {
    store: Store<InvocationState>,
    proxy: Proxy,
    idle_since: Instant,
    served: u32,
}

/// The idle instances of one reused function. The most recently used one is
/// handed out first, so a steady load keeps few instances busy and the rest
/// age out.
#[derive(Default)]
pub(crate) struct KeptInstances {
    idle: Mutex<Vec<KeptInstance>>,
    /// Set when the function is unloaded: returning instances are dropped.
    closed: AtomicBool,
}

impl KeptInstances {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<KeptInstance>> {
        // Never held across guest code; a poisoned lock still holds a valid Vec.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn memory_bytes(&self) -> u64 {
        self.lock()
            .iter()
            .map(|kept| kept.store.data().memory.current() as u64)
            .sum()
    }

    fn take(&self, lifecycle: &Lifecycle) -> Option<KeptInstance> {
        let kept = self.lock().pop();
        if kept.is_some() {
            lifecycle.kept.fetch_sub(1, Ordering::AcqRel);
        }
        kept
    }

    /// Returns an instance after a successful request, unless the function
    /// was unloaded meanwhile or the instance has served its share.
    fn put(&self, mut kept: KeptInstance, lifecycle: &Lifecycle) {
        if self.closed.load(Ordering::Acquire) || kept.served >= MAX_REQUESTS_PER_KEPT_INSTANCE {
            return;
        }
        kept.idle_since = Instant::now();
        self.lock().push(kept);
        lifecycle.kept.fetch_add(1, Ordering::AcqRel);
    }

    /// Removes the instances idle for `idle` or longer. The caller drops
    /// them outside the lock (dropping a store returns its pool slot).
    fn take_idle_for(&self, idle: Duration, lifecycle: &Lifecycle) -> Vec<KeptInstance> {
        let now = Instant::now();
        let mut kept = self.lock();
        // Oldest first: the vector is in order of return.
        let stale = kept
            .iter()
            .take_while(|k| now.duration_since(k.idle_since) >= idle)
            .count();
        let taken: Vec<KeptInstance> = kept.drain(..stale).collect();
        drop(kept);
        lifecycle.kept.fetch_sub(taken.len(), Ordering::AcqRel);
        taken
    }

    fn oldest_idle_since(&self) -> Option<Instant> {
        self.lock().first().map(|k| k.idle_since)
    }

    fn take_oldest(&self, lifecycle: &Lifecycle) -> Option<KeptInstance> {
        let mut kept = self.lock();
        if kept.is_empty() {
            return None;
        }
        let oldest = kept.remove(0);
        drop(kept);
        lifecycle.kept.fetch_sub(1, Ordering::AcqRel);
        Some(oldest)
    }
}

type ResponseReceiver =
    tokio::sync::oneshot::Receiver<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;
type HeadSender = tokio::sync::oneshot::Sender<Result<InvocationResponse, InvocationError>>;

/// Everything the invocation's task needs besides the store.
struct GuestRun {
    lifecycle: Arc<Lifecycle>,
    /// Where the instance goes back after a successful request, if kept.
    kept: Option<Arc<KeptInstances>>,
    /// Requests the instance served before this one.
    served: u32,
    labels: Arc<RequestLabels>,
    limits: InvocationLimits,
    flags: Arc<BodyFlags>,
    reports: Arc<dyn ReportSink>,
    /// Where the platform's own line about a failure goes, beside the
    /// guest's output.
    logs: Arc<dyn LogSink>,
    /// Whether the request was a HEAD, whose response carries no body.
    head_request: bool,
    started_at: SystemTime,
    started: Instant,
}

impl GuestRun {
    /// Runs the guest to its end, hands the response head to the caller as
    /// soon as the guest sets it, and reports the invocation.
    async fn run(
        self,
        mut store: Store<InvocationState>,
        call: Call,
        mut response_rx: ResponseReceiver,
        head_tx: HeadSender,
    ) {
        let mut head_tx = Some(head_tx);
        let mut awaiting_head = true;
        let mut status = None;
        let mut head_failed = false;
        // Whether the caller was gone when the head was ready for it.
        let mut head_unheard = false;
        let mut instantiate = Duration::ZERO;
        let cold_start = self.labels.cold_start;
        let (end, cpu) = {
            let mut guest = std::pin::pin!(CpuMetered::new(async {
                match call {
                    Call::P2 {
                        pre,
                        proxy,
                        incoming,
                        outparam,
                    } => {
                        let proxy = match proxy {
                            Some(proxy) => proxy,
                            None => {
                                // Timed for a cold start only: the clock
                                // costs the warm path nothing then.
                                let began = cold_start.then(Instant::now);
                                let proxy = pre
                                    .instantiate_async(&mut store)
                                    .await
                                    .map_err(|e| InvocationError::Unavailable(format!("{e:#}")))?;
                                if let Some(began) = began {
                                    instantiate = began.elapsed();
                                }
                                proxy
                            }
                        };
                        proxy
                            .wasi_http_incoming_handler()
                            .call_handle(&mut store, incoming, outparam)
                            .await
                            .map_err(classify_guest_error)?;
                        Ok(Some(proxy))
                    }
                    Call::P3 {
                        pre,
                        request,
                        response_tx,
                    } => crate::p3::serve(&mut store, &pre, request, response_tx)
                        .await
                        .map(|()| None),
                }
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
                            (status, head_failed, head_unheard) = self.send_head(tx, head);
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
            (status, head_failed, head_unheard) = self.send_head(tx, head);
        }

        let wall = self.started.elapsed();
        // wasi:nn inference ran on the blocking pool, outside the polls
        // metered above; taken, so a kept instance starts its next call at 0.
        let cpu = cpu + std::mem::take(&mut store.data_mut().extra_cpu);
        let memory = &store.data().memory;
        let (peak_memory, refused) = (memory.peak(), memory.refused());
        let mut finished_instance = None;
        let mut failure = match end {
            End::Returned(Ok(proxy)) => {
                finished_instance = proxy;
                None
            }
            End::Returned(Err(_)) if refused => {
                Some(InvocationError::OutOfMemory(self.limits.memory_bytes))
            }
            End::Returned(Err(error)) => Some(error),
            End::TimedOut => Some(InvocationError::Timeout(self.limits.timeout)),
            End::Killed => Some(InvocationError::Killed),
        };
        if failure.is_some() && head_tx.is_none() {
            // The head went out: the body must not end as if complete.
            self.flags.mark_guest_failed();
        }
        // A streamed request body went over its limit while the guest read
        // it: the guest's read failed, and what it did about that (answer
        // with an error code, trap on the failed read, not answer) is the
        // client's doing, not a failure of the function. Its timeout, its
        // memory and the node's shutdown still count.
        let body_refused = self.flags.request_too_large();
        let outcome = match &failure {
            None if head_tx.is_none() && !head_failed && !self.flags.response_too_large() => {
                Outcome::Ok
            }
            Some(InvocationError::Timeout(_)) => Outcome::Timeout,
            Some(InvocationError::OutOfMemory(_)) => Outcome::Oom,
            Some(InvocationError::Killed) => Outcome::Killed,
            _ if body_refused && !self.flags.response_too_large() => Outcome::Ok,
            _ => Outcome::Error,
        };
        let refused_not_failed = body_refused && outcome == Outcome::Ok;
        if let Some(error) = &failure
            && !refused_not_failed
        {
            tracing::warn!(
                function = %self.labels.function,
                version = self.labels.version,
                request_id = %self.labels.request_id,
                "invocation failed: {error}"
            );
        }
        // What the function's author reads in its logs about a failure the
        // client is only told the request id of.
        let mut failure_line = failure
            .as_ref()
            .map(|error| format!("mayfly: the invocation failed: {error}"));
        if let Some(tx) = head_tx {
            let error = if body_refused {
                InvocationError::RequestTooLarge(self.limits.max_request_bytes)
            } else {
                failure.take().unwrap_or(InvocationError::NoResponse)
            };
            status = Some(error.status().as_u16());
            failure_line = Some(format!("mayfly: the invocation failed: {error}"));
            // Gone before any answer (a request body that stopped arriving
            // with its client can be why the guest failed).
            head_unheard = tx.send(Err(error)).is_err();
        } else if failure_line.is_none() && self.flags.response_too_large() {
            failure_line = Some(format!(
                "mayfly: the invocation failed: {}",
                InvocationError::ResponseTooLarge(self.limits.max_response_bytes)
            ));
        }
        if refused_not_failed {
            let answer =
                status.map_or_else(String::new, |status| format!("; the client got {status}"));
            let then = failure
                .as_ref()
                .map_or_else(String::new, |error| format!(", and after that {error}"));
            failure_line = Some(format!(
                "mayfly: {}, so the function's read of it failed{then}{answer}",
                InvocationError::RequestTooLarge(self.limits.max_request_bytes)
            ));
        }
        // A guest that fails (or finishes) because its client left is not
        // at fault; limits it broke and the node's shutdown still count.
        let client_gone = head_unheard || self.flags.response_abandoned();
        let outcome = match outcome {
            Outcome::Ok | Outcome::Error if client_gone => Outcome::ClientClosed,
            outcome => outcome,
        };
        if head_unheard {
            // The client never received it.
            status = None;
        }
        if outcome == Outcome::ClientClosed {
            failure_line = Some(match failure_line {
                Some(line) => format!("{line} (after the client went away)"),
                None => "mayfly: the client went away before the response was done".to_string(),
            });
        }

        // Only an instance that finished a request cleanly is reused: after a
        // trap, a timeout or a broken limit its state cannot be trusted.
        match (&self.kept, finished_instance) {
            (Some(kept), Some(proxy)) if outcome == Outcome::Ok => {
                let state = store.data();
                state.stdout.finish();
                state.stderr.finish();
                let kept_instance = KeptInstance {
                    store,
                    proxy,
                    idle_since: Instant::now(),
                    served: self.served.saturating_add(1),
                };
                kept.put(kept_instance, &self.lifecycle);
            }
            // Frees the instance slot and flushes the last partial log line.
            _ => drop(store),
        }
        // After the guest's own last line, and whatever its log cap: one
        // line per invocation cannot flood the log. A log line holds no
        // newline, and an error's text (a backtrace) may.
        if let Some(line) = failure_line {
            let line: Vec<&str> = line
                .lines()
                .map(str::trim)
                .filter(|part| !part.is_empty())
                .collect();
            self.logs
                .line(&self.labels, LogStream::Stderr, &line.join("; "));
        }

        self.reports.finished(
            &self.labels,
            InvocationReport {
                started_at: self.started_at,
                wall,
                instantiate,
                cpu,
                peak_memory_bytes: peak_memory as u64,
                outcome,
                status,
            },
        );
    }

    /// Hands the guest's response head to the caller, with its body bounded
    /// by the response limit. Returns the status the client gets, whether
    /// it is an error in place of the guest's response, and whether the
    /// caller was already gone.
    fn send_head(
        &self,
        tx: HeadSender,
        head: Result<hyper::Response<HyperOutgoingBody>, ErrorCode>,
    ) -> (Option<u16>, bool, bool) {
        let max = self.limits.max_response_bytes;
        let answer = match head {
            Ok(response) => {
                let declared = declared_length(response.headers());
                if declared.is_some_and(|len| len > max) {
                    Err(InvocationError::ResponseTooLarge(max))
                } else {
                    // Only a body the client should receive in full can be
                    // abandoned: HEAD, 1xx, 204 and 304 answers carry none.
                    let status = response.status();
                    let has_body = !self.head_request
                        && !status.is_informational()
                        && status != http::StatusCode::NO_CONTENT
                        && status != http::StatusCode::NOT_MODIFIED;
                    Ok(response.map(|body| {
                        let body =
                            LimitedBody::new(body, max, Direction::Response, self.flags.clone());
                        if has_body {
                            body.watch_abandon(declared).boxed_unsync()
                        } else {
                            body.boxed_unsync()
                        }
                    }))
                }
            }
            // A guest passing on the failed read of a streamed body over
            // its limit: the client gets what it would without the guest.
            Err(_) if self.flags.request_too_large() => Err(InvocationError::RequestTooLarge(
                self.limits.max_request_bytes,
            )),
            Err(code) => Err(InvocationError::ErrorCode(format!("{code:?}"))),
        };
        let status = match &answer {
            Ok(response) => response.status(),
            Err(error) => error.status(),
        };
        let failed = answer.is_err();
        let unheard = tx.send(answer).is_err();
        (Some(status.as_u16()), failed, unheard)
    }
}

/// The environment variables a fresh instance of a function with `caps`
/// reads from secrets (its plain ones come straight from `caps.env`), and a
/// message for each secret that could not be read (its variable is left
/// unset, and the message goes to the invocation's log, where the author
/// looks).
async fn secret_environment(caps: &Capabilities) -> (Vec<(String, String)>, Vec<String>) {
    let mut env = Vec::new();
    let mut unread = Vec::new();
    for (variable, secret) in &caps.env_secrets {
        match caps.config.env_secret(secret).await {
            Ok(Some(value)) => env.push((variable.clone(), value)),
            Ok(None) => unread.push(format!(
                "environment variable `{variable}` is unset: secret `{secret}` does not exist \
                 (`mayfly secret set {secret}`)"
            )),
            Err(error) => unread.push(format!(
                "environment variable `{variable}` is unset: {error}"
            )),
        }
    }
    (env, unread)
}

/// Refuses a request whose body is over `max` before any guest runs. A body
/// of unknown length (chunked) is read into memory first, up to `max`, so it
/// gets the same 413 instead of failing inside a guest that may already have
/// answered, unless the function asked for `streaming` bodies; a body of
/// declared length streams to the guest as it arrives.
async fn admit_request<B>(
    request: http::Request<B>,
    max: u64,
    streaming: bool,
) -> Result<http::Request<RequestBody<B>>, InvocationError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    let (parts, body) = request.into_parts();
    let body = match declared_length(&parts.headers) {
        Some(len) if len > max => return Err(InvocationError::RequestTooLarge(max)),
        None if !streaming && !body.is_end_stream() => {
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

/// Instances running on the node, the pool that runs CPU-bound ones, and
/// the switch that ends them all when the node shuts down.
pub(crate) struct Lifecycle {
    in_flight: AtomicUsize,
    idle: tokio::sync::Notify,
    pub(crate) kill: CancellationToken,
    /// Pool slots: instances running plus kept idle ones may not exceed it.
    pub(crate) max_instances: usize,
    /// Idle kept instances, over every reused function.
    kept: AtomicUsize,
    /// Every reused function's kept instances, to free a slot when the pool
    /// is full. Entries of unloaded functions are pruned as they are found.
    kept_sets: Mutex<Vec<Weak<KeptInstances>>>,
    /// Where guests go once their first slice is spent.
    pool: GuestPool,
}

impl Lifecycle {
    pub(crate) fn new(max_instances: usize, pool: GuestPool) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            kill: CancellationToken::new(),
            max_instances,
            kept: AtomicUsize::new(0),
            kept_sets: Mutex::default(),
            pool,
        }
    }

    fn register(&self, kept: &Arc<KeptInstances>) {
        let mut sets = self.kept_sets.lock().unwrap_or_else(|p| p.into_inner());
        sets.retain(|set| set.strong_count() > 0);
        sets.push(Arc::downgrade(kept));
    }

    /// Idle kept instances on the node.
    pub(crate) fn kept(&self) -> usize {
        self.kept.load(Ordering::Acquire)
    }

    /// Drops the longest-idle kept instance (of any function) when running
    /// and kept instances fill every pool slot, so a new instance can start.
    fn make_room(&self) {
        if self.kept() == 0 || self.in_flight() + self.kept() < self.max_instances {
            return;
        }
        let sets: Vec<Arc<KeptInstances>> = {
            let sets = self.kept_sets.lock().unwrap_or_else(|p| p.into_inner());
            sets.iter().filter_map(Weak::upgrade).collect()
        };
        let oldest = sets
            .iter()
            .filter_map(|set| set.oldest_idle_since().map(|since| (since, set)))
            .min_by_key(|(since, _)| *since);
        if let Some((_, set)) = oldest {
            drop(set.take_oldest(self));
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunked-like body: `frames` data frames of `size` bytes, no length.
    fn unsized_body(
        frames: usize,
        size: usize,
    ) -> impl http_body::Body<Data = Bytes, Error = wasmtime_wasi_http::Error> {
        let frames =
            (0..frames).map(move |_| Ok(http_body::Frame::data(Bytes::from(vec![b'x'; size]))));
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    fn request<B>(body: B, declared: Option<u64>) -> http::Request<B> {
        let mut request = http::Request::new(body);
        if let Some(len) = declared {
            request
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, len.into());
        }
        request
    }

    #[tokio::test]
    async fn an_unsized_body_is_buffered_unless_the_function_streams() {
        // Without the opt-in: read whole, and refused at once past the limit.
        let admitted = admit_request(request(unsized_body(4, 100), None), 400, false)
            .await
            .unwrap();
        assert!(matches!(admitted.body(), RequestBody::Buffered { .. }));
        let refused = admit_request(request(unsized_body(5, 100), None), 400, false).await;
        assert!(matches!(
            refused,
            Err(InvocationError::RequestTooLarge(400))
        ));

        // With it: handed over unread, whatever its size; the limit is
        // checked as the guest reads it.
        let admitted = admit_request(request(unsized_body(5, 100), None), 400, true)
            .await
            .unwrap();
        assert!(matches!(admitted.body(), RequestBody::Streaming { .. }));
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_in_both_modes() {
        for streaming in [false, true] {
            let refused =
                admit_request(request(unsized_body(5, 100), Some(500)), 400, streaming).await;
            assert!(
                matches!(refused, Err(InvocationError::RequestTooLarge(400))),
                "streaming: {streaming}"
            );
            let admitted = admit_request(request(unsized_body(4, 100), Some(400)), 400, streaming)
                .await
                .unwrap();
            assert!(matches!(admitted.body(), RequestBody::Streaming { .. }));
        }
    }
}
