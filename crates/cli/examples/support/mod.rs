//! Helpers the benchmark drivers share (`mod support;` in each example).

// Each driver uses a subset.
#![allow(dead_code)]

use std::time::Duration;

/// A client that hands back every status as an answer (the drivers check
/// statuses themselves) and gives up on a request after `timeout`.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .new_agent()
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
