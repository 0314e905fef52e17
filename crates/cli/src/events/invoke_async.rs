//! `mayfly invoke --async`: the invocation queued as an event, delivered
//! and retried by the node.

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use mayfly_store::RetryPolicy;

use crate::client::{AdminClient, millis, query, segment};
use crate::flags::{INVOKE_ASYNC_FLAGS, duration_in, ms, naming_flags, number_in};
use crate::output::text;

/// `mayfly invoke --async` and its retry settings.
#[derive(Debug, Args)]
pub struct AsyncArgs {
    /// Queue the invocation and return its event id at once; the node
    /// delivers it as a CloudEvent, retrying failures.
    #[arg(long = "async")]
    pub async_invoke: bool,
    /// Deliveries before the event goes to the dead-letter queue (node default 3).
    #[arg(
        long,
        value_name = "N",
        requires = "async_invoke",
        value_parser = number_in(1, Some(RetryPolicy::MAX_ATTEMPTS))
    )]
    pub max_attempts: Option<u32>,
    /// Wait before retrying a failed delivery, e.g. 1s (node default 1s).
    #[arg(
        long,
        requires = "async_invoke",
        value_parser = duration_in(ms(0), ms(RetryPolicy::MAX_BACKOFF_MS))
    )]
    pub backoff: Option<Duration>,
}

/// `mayfly invoke --async`: queues the invocation and prints its event id.
pub fn run(
    client: &AdminClient,
    json: bool,
    name: &str,
    body: Option<&[u8]>,
    path: &str,
    headers: &[(String, String)],
    delivery: &AsyncArgs,
) -> anyhow::Result<()> {
    let url = format!(
        "/v1/functions/{}/invoke{}",
        segment(name),
        query(&[
            ("async", Some("true".to_string())),
            ("path", Some(path.to_string())),
            ("max_attempts", delivery.max_attempts.map(|n| n.to_string())),
            (
                "backoff_ms",
                delivery.backoff.map(|d| millis(d).to_string())
            ),
        ])
    );
    let queued: Value = client
        .send_json("POST", &url, headers, body)
        .map_err(|e| naming_flags(e, INVOKE_ASYNC_FLAGS))?;
    if json {
        println!("{queued}");
    } else {
        println!("{}", text(&queued["event_id"]));
    }
    Ok(())
}
