//! Health checks: `/healthz` (the process answers) and `/readyz` (the node
//! can take work: its stores answer, its ledger and log writers run, it is
//! not shutting down). Served without a token on the gateway, the admin API
//! and the metrics listener, so a load balancer or an orchestrator can probe
//! any of them.
//!
//! On the gateway these two exact paths belong to the node and win over any
//! function route (a route `/` still serves `/healthz/x` and everything
//! else); a deploy whose route is `/healthz` or `/readyz` (or below them) is
//! refused, see [`reserved_route`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mayfly_store::Registry;
use serde::Serialize;

use crate::ledger::Ledger;
use crate::logs::LogHub;

/// The liveness path.
pub const HEALTHZ: &str = "/healthz";
/// The readiness path.
pub const READYZ: &str = "/readyz";

/// How long the readiness probe waits for the store before calling it
/// unavailable: an orchestrator's probe usually times out after 1 to 5 s.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the readiness check looks at.
pub struct Health {
    registry: Arc<dyn Registry>,
    ledger: Arc<Ledger>,
    logs: Arc<LogHub>,
    closing: AtomicBool,
}

/// The answer of a health check, as JSON.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HealthReport {
    /// `ok`, `ready` or `not_ready`.
    pub status: &'static str,
    /// Why the node is not ready (empty when it is).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

impl Health {
    /// Checks over the node's registry (probed with one read), ledger and
    /// log writers.
    pub fn new(registry: Arc<dyn Registry>, ledger: Arc<Ledger>, logs: Arc<LogHub>) -> Self {
        Self {
            registry,
            ledger,
            logs,
            closing: AtomicBool::new(false),
        }
    }

    /// The node has begun to shut down: `/readyz` answers 503 from now on,
    /// so load balancers stop sending work before the listeners close.
    pub fn set_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// Whether the node is shutting down.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// The readiness check: every reason the node cannot take work now.
    pub async fn readiness(&self) -> HealthReport {
        let mut reasons = Vec::new();
        if self.closing() {
            reasons.push("the node is shutting down".to_string());
        }
        if !self.ledger.writer_alive() {
            reasons.push(
                "the ledger writer has stopped: usage records cannot be stored; restart the node \
                 and read its log for the cause"
                    .to_string(),
            );
        }
        if !self.logs.writer_alive() {
            reasons.push(
                "the log writer has stopped: guest logs cannot be stored; restart the node and \
                 read its log for the cause"
                    .to_string(),
            );
        }
        // One cheap read (a name no function can have) proves the store
        // answers: a locked or unreachable store shows here.
        match tokio::time::timeout(STORE_PROBE_TIMEOUT, self.registry.function("-readyz-")).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => reasons.push(format!("the function store fails: {error}")),
            Err(_) => reasons.push(format!(
                "the function store did not answer within {STORE_PROBE_TIMEOUT:?}"
            )),
        }
        HealthReport {
            status: if reasons.is_empty() {
                "ready"
            } else {
                "not_ready"
            },
            reasons,
        }
    }
}

/// The liveness answer: the process is up and serving.
pub fn liveness() -> HealthReport {
    HealthReport {
        status: "ok",
        reasons: Vec::new(),
    }
}

impl HealthReport {
    /// 200 when ok or ready, 503 otherwise.
    pub fn http_status(&self) -> http::StatusCode {
        if self.reasons.is_empty() {
            http::StatusCode::OK
        } else {
            http::StatusCode::SERVICE_UNAVAILABLE
        }
    }

    /// The report as a JSON body.
    pub fn json(&self) -> String {
        // A struct of strings always serialises.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// The whole answer (status, JSON, never cached), for the gateway and
    /// the admin API alike; each wraps the body in its own body type.
    pub fn response(&self) -> http::Response<String> {
        let mut response = http::Response::new(self.json());
        *response.status_mut() = self.http_status();
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        response
    }
}

/// Whether a route's path would shadow the node's health paths: the route
/// (`/healthz`, `host/readyz/x`) is refused at deploy with the message
/// returned.
pub fn reserved_route(route: &str) -> Option<String> {
    let text = route.trim();
    let path = match text.find('/') {
        Some(at) => &text[at..],
        None => return None,
    };
    let path = path.trim_end_matches('/');
    [HEALTHZ, READYZ]
        .into_iter()
        .find(|reserved| {
            path.eq_ignore_ascii_case(reserved)
                || path
                    .get(..reserved.len() + 1)
                    .is_some_and(|head| head.eq_ignore_ascii_case(&format!("{reserved}/")))
        })
        .map(|reserved| {
            format!(
                "route `{}` is under {reserved}, which the node keeps for its health checks \
                 (/healthz: the process is up; /readyz: it can take work): choose another \
                 path, e.g. `/app{reserved}`",
                route.escape_debug()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_wrong() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stores = mayfly_store::Stores::sqlite(dir.path()).unwrap();
        let metrics = crate::metering::Metrics::new();
        let ledger = Arc::new(
            Ledger::start(
                stores.usage.clone(),
                metrics.ledger.clone(),
                runtime.handle().clone(),
            )
            .unwrap(),
        );
        let logs = LogHub::start(
            stores.logs.clone(),
            stores.log_feed.clone(),
            runtime.handle().clone(),
        )
        .unwrap();
        let health = Health::new(stores.registry.clone(), ledger.clone(), logs.clone());
        let ready = runtime.block_on(health.readiness());
        assert_eq!(ready.status, "ready", "{ready:?}");
        assert_eq!(ready.http_status(), http::StatusCode::OK);
        assert_eq!(ready.json(), r#"{"status":"ready"}"#);

        health.set_closing();
        ledger.close();
        let report = runtime.block_on(health.readiness());
        assert_eq!(report.http_status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(report.status, "not_ready");
        assert!(report.reasons[0].contains("shutting down"), "{report:?}");
        assert!(report.reasons[1].contains("ledger writer"), "{report:?}");
        assert_eq!(report.reasons.len(), 2, "{report:?}");
        logs.close();
        let report = runtime.block_on(health.readiness());
        assert!(report.reasons[2].contains("log writer"), "{report:?}");
        // The answer both servers send: status, JSON, never cached.
        let answer = report.response();
        assert_eq!(answer.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers()["content-type"], "application/json");
        assert_eq!(answer.headers()["cache-control"], "no-store");
        assert!(
            answer
                .body()
                .starts_with(r#"{"status":"not_ready","reasons":["#)
        );
    }

    #[test]
    fn health_paths_cannot_be_routes() {
        for route in [
            "/healthz",
            "/healthz/",
            "/readyz/deep",
            "/HEALTHZ",
            "example.com/readyz",
        ] {
            assert!(reserved_route(route).is_some(), "{route}");
        }
        for route in ["/", "/health", "/healthzz", "/app/healthz", "example.com/"] {
            assert!(reserved_route(route).is_none(), "{route}");
        }
    }
}
