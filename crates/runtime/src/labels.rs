//! The names of one invocation, shared by its log lines, its usage report
//! and the guest pool's per-function turns.

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
    /// How long loading the function took this invocation, before it was
    /// handed to the runtime: zero unless `cold_start`.
    pub load: std::time::Duration,
}

#[cfg(test)]
impl RequestLabels {
    /// Labels of a warm HTTP request `r` to version 1 of `function`, for
    /// unit tests.
    pub(crate) fn for_test(function: &str) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            function: function.into(),
            version: 1,
            request_id: "r".into(),
            trigger: "http",
            cold_start: false,
            load: std::time::Duration::ZERO,
        })
    }
}
