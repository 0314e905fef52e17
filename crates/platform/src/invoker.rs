//! The request path: an [`Invoker`] takes a request for a target (an
//! alias of a function, from the catalog snapshot), picks its version,
//! reads the start of the body, takes an admission slot, loads the version
//! if it is cold, hands the request to `Function::handle` and reports the
//! outcome. The gateway, the admin API's `invoke` and the event
//! dispatcher all run functions through it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mayfly_runtime::{HyperOutgoingBody, InvocationError, RequestLabels};
use prometheus_client::metrics::counter::Counter;

use crate::admission::{Admission, Permit, Throttled};
use crate::artifacts::Artifacts;
use crate::catalog::{Catalog, Deployed, Target};
use crate::logs::LogHub;
use crate::metering::FunctionMeter;
use crate::preread::preread;
use crate::rollout::Observed;
use crate::tiers::Running;
use crate::validate::valid_request_id;

/// Header carrying the invocation's request id back to the client: always
/// minted by the node (a UUIDv7 in hex), unique per invocation, the id of
/// its usage record and log lines, like Lambda's `x-amzn-RequestId`.
pub const REQUEST_ID_HEADER: &str = "x-mayfly-request-id";

/// Header of the client's own correlation id (1 to 64 of
/// `[A-Za-z0-9._-]`). A request may bring one (here, or in
/// [`REQUEST_ID_HEADER`] as older clients do); it is echoed back in this
/// header, kept in the usage record as `client_request_id`, and pins the
/// version of a split alias so a retry lands where the first try did. It is
/// never the invocation's identity: replays are separate invocations.
pub const CLIENT_REQUEST_ID_HEADER: &str = "x-mayfly-client-request-id";

/// Header telling the client which version served its request.
pub const VERSION_HEADER: &str = "x-mayfly-version";

/// Who receives an invocation's answer when the node, not the guest,
/// answers: the guest's own responses pass through unchanged either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A public client of the gateway. A failed function's 500 says only
    /// that it failed and the request id: why (a trap's text, the guest's
    /// error) is the function's internals. It goes to the function's logs
    /// and the node's log, both under that request id.
    Public,
    /// An operator invoking through the admin API, who may read why.
    Operator,
}

/// Runs requests through deployed functions.
pub struct Invoker {
    /// What is deployed, swapped whole on every change.
    catalog: Arc<ArcSwap<Catalog>>,
    admission: Arc<Admission>,
    /// Loads cold versions.
    artifacts: Arc<Artifacts>,
    /// Where guests' log lines go.
    logs: Arc<LogHub>,
    /// Requests refused with 413: a body over the function's limit.
    pub(crate) requests_too_large: Counter,
    /// Carries requests for functions placed on other nodes.
    pub(crate) forward: Arc<dyn mayfly_store::Forwarder>,
    /// `x-mayfly-node`'s value on a fleet node (its name): set on every
    /// gateway response; `None` on a node on its own.
    pub(crate) node_header: Option<http::HeaderValue>,
}

impl Invoker {
    /// An invoker over `catalog`, admitting through `admission`.
    pub(crate) fn new(
        catalog: Arc<ArcSwap<Catalog>>,
        admission: Arc<Admission>,
        artifacts: Arc<Artifacts>,
        logs: Arc<LogHub>,
        requests_too_large: Counter,
        forward: Arc<dyn mayfly_store::Forwarder>,
    ) -> Self {
        let node_header = forward
            .node()
            .and_then(|node| http::HeaderValue::from_str(node).ok());
        Self {
            catalog,
            admission,
            artifacts,
            logs,
            requests_too_large,
            forward,
            node_header,
        }
    }

    /// The current catalog: read it, then let it go (a snapshot held long
    /// keeps unloaded versions alive).
    pub fn catalog(&self) -> arc_swap::Guard<Arc<Catalog>> {
        self.catalog.load()
    }

    /// Runs `request` through the version of `target` (an alias) that its
    /// client id (else its fresh request id) picks, and always produces a
    /// response: the guest's, or an error response with a short body.
    /// `trigger` says what started it (`http`, `invoke`, …) for the usage
    /// record, `caller` who reads the node's error answers. The response
    /// carries the node's request id, the client's id if it sent one, and
    /// the version that served it.
    pub async fn invoke<B>(
        &self,
        target: &Target,
        request: http::Request<B>,
        trigger: &'static str,
        caller: Caller,
    ) -> http::Response<HyperOutgoingBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let request_id = new_request_id();
        let client_id = client_request_id(request.headers());
        let (function, observed) = target.pick(client_id.as_deref().unwrap_or(&request_id));
        // A replayed client id runs and is billed, but only its first
        // invocation is judged by an automatic canary.
        let observed = match (observed, client_id.as_deref()) {
            (Some(observed), Some(id)) if !observed.first_sight(id) => None,
            (observed, _) => observed,
        };
        let function: &Deployed = function;
        // The start of the body arrives before a slot is taken, so a client
        // trickling its body holds no slot meanwhile (see `preread`).
        let request = match preread(request, function.limits.timeout).await {
            Ok(request) => request,
            Err(error) => {
                let (status, message) = error.response();
                let mut response = text_response(status, format!("{message}\n"));
                if let Ok(value) = http::HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert(REQUEST_ID_HEADER, value);
                }
                return response;
            }
        };
        let result = match self
            .admit(function, &request_id, client_id.as_deref(), trigger)
            .await
        {
            Ok(permit) => {
                self.run(
                    function,
                    request,
                    AdmittedInvocation {
                        request_id: request_id.clone(),
                        client_id: client_id.clone(),
                        trigger,
                        permit,
                        observed,
                    },
                )
                .await
            }
            Err(throttled) => {
                let mut response = text_response(
                    http::StatusCode::TOO_MANY_REQUESTS,
                    format!("{}: {throttled}; retry later\n", function.name),
                );
                if throttled != Throttled::Gone {
                    // Slots free up as invocations end; one second is the
                    // header's smallest unit.
                    response.headers_mut().insert(
                        http::header::RETRY_AFTER,
                        http::HeaderValue::from_static("1"),
                    );
                }
                Ok(response)
            }
        };
        let mut response = match result {
            Ok(response) => response,
            Err((status, _))
                if status == http::StatusCode::INTERNAL_SERVER_ERROR
                    && caller == Caller::Public =>
            {
                text_response(
                    status,
                    format!("the function failed; request id {request_id}\n"),
                )
            }
            Err((status, message)) => text_response(status, format!("{message}\n")),
        };
        if let Ok(value) = http::HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        if let Some(value) = client_id.and_then(|id| http::HeaderValue::from_str(&id).ok()) {
            response
                .headers_mut()
                .insert(CLIENT_REQUEST_ID_HEADER, value);
        }
        response
            .headers_mut()
            .insert(VERSION_HEADER, function.version_header.clone());
        response
    }

    /// Takes an admission slot for one invocation, waiting in the
    /// function's queue if it is full; a refusal is metered as throttled.
    pub(crate) async fn admit(
        &self,
        function: &Deployed,
        request_id: &str,
        client_id: Option<&str>,
        trigger: &'static str,
    ) -> Result<Permit, Throttled> {
        let queue_timeout = Duration::from_millis(function.scaling.queue_timeout_ms);
        let admitted = Instant::now();
        match self.admission.acquire(&function.key, queue_timeout).await {
            Ok(permit) => {
                if !permit.waited.is_zero() {
                    function.meter.queued(permit.waited);
                }
                Ok(permit)
            }
            Err(throttled) => {
                function.meter.throttled(
                    request_id,
                    client_id,
                    function.version,
                    trigger,
                    admitted.elapsed(),
                );
                Err(throttled)
            }
        }
    }

    /// Runs an admitted request: loads the function if it is cold, then
    /// hands the request to an instance. The permit and the activity count
    /// are held until the guest is done, not just until its response head.
    pub(crate) async fn run<B>(
        &self,
        function: &Deployed,
        request: http::Request<B>,
        invocation: AdmittedInvocation,
    ) -> Result<http::Response<HyperOutgoingBody>, (http::StatusCode, String)>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let AdmittedInvocation {
            request_id,
            client_id,
            trigger,
            permit,
            observed,
        } = invocation;
        let running = Running::start(&function.activity);
        // Timed only when this request loads the function: its init time.
        let mut load = std::time::Duration::ZERO;
        let loaded = function
            .tier
            .get_or_load(async || {
                let began = std::time::Instant::now();
                let loaded = self
                    .artifacts
                    .load(&function.artifact, function.scaling.reuse)
                    .await;
                load = began.elapsed();
                loaded
            })
            .await;
        let (loaded, cold_start) = loaded.map_err(|error| {
            tracing::error!(function = %function.name, "cannot load function: {error}");
            (
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "the function could not be loaded".to_string(),
            )
        })?;
        let labels = Arc::new(RequestLabels {
            function: function.name.clone(),
            version: function.version,
            request_id,
            trigger,
            cold_start,
            load,
        });
        let logs: Arc<dyn mayfly_runtime::LogSink> = self.logs.clone();
        let reports: Arc<dyn mayfly_runtime::ReportSink> = Arc::new(PermitHolder {
            meter: function.meter.clone(),
            client_id,
            observed,
            held: std::sync::Mutex::new(Some((permit, running))),
        });
        loaded
            .handle(
                request,
                labels,
                function.caps.clone(),
                &function.limits,
                logs,
                reports,
            )
            .await
            .map_err(|error| {
                if matches!(error, InvocationError::RequestTooLarge(_)) {
                    self.requests_too_large.inc();
                }
                (error.status(), error.to_string())
            })
    }
}

/// An invocation that holds its admission permit, on its way to
/// [`Invoker::run`]: its ids, what started it, the permit and the rollout
/// judging it, if any.
pub(crate) struct AdmittedInvocation {
    /// The node's id of the invocation.
    pub(crate) request_id: String,
    /// The client's correlation id, if it sent one.
    pub(crate) client_id: Option<String>,
    /// What started it, for the usage record.
    pub(crate) trigger: &'static str,
    /// The admission slot, held until the guest is done.
    pub(crate) permit: Permit,
    /// The automatic canary judging this invocation, if any.
    pub(crate) observed: Option<Observed>,
}

/// Holds an admitted invocation's admission permit (and its activity
/// count) until the guest is done, or until the request is refused before
/// a guest runs; meanwhile it is the invocation's report sink, forwarding
/// to the function's meter and to the rollout judging its version, if any.
struct PermitHolder {
    meter: Arc<FunctionMeter>,
    /// The client's correlation id, for the usage record.
    client_id: Option<String>,
    observed: Option<Observed>,
    held: std::sync::Mutex<Option<(Permit, Running)>>,
}

impl mayfly_runtime::ReportSink for PermitHolder {
    fn started(&self, labels: &RequestLabels) {
        if let Some(observed) = &self.observed {
            observed.started();
        }
        self.meter.started(labels);
    }

    fn finished(&self, labels: &RequestLabels, report: mayfly_runtime::InvocationReport) {
        if let Some(observed) = &self.observed {
            observed.record(&report);
        }
        self.meter
            .finished_for(labels, report, self.client_id.as_deref());
        // Free the slot now: the sink itself may outlive the guest a little.
        drop(self.held.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// The client's correlation id, if the request brings a valid one: from
/// [`CLIENT_REQUEST_ID_HEADER`], else from [`REQUEST_ID_HEADER`] (where
/// clients sent it before the node minted every id). An invalid one is
/// ignored, as before.
fn client_request_id(headers: &http::HeaderMap) -> Option<String> {
    [CLIENT_REQUEST_ID_HEADER, REQUEST_ID_HEADER]
        .into_iter()
        .find_map(|name| headers.get(name))
        .and_then(|value| value.to_str().ok())
        .filter(|id| valid_request_id(id))
        .map(str::to_string)
}

/// A new request id: a UUIDv7 in hex, so ids sort by time.
pub(crate) fn new_request_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Bytes known in full, as the gateway's body type.
pub fn whole_body(body: impl Into<Bytes>) -> HyperOutgoingBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A plain-text response in the gateway's body type.
pub fn text_response(
    status: http::StatusCode,
    body: impl Into<Bytes>,
) -> http::Response<HyperOutgoingBody> {
    let mut response = http::Response::new(whole_body(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
