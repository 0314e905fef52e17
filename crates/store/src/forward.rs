//! The forwarding contract: a request for a function this node does not
//! run (its placement names labels the node lacks) goes to a node that
//! runs it, and that node's answer comes back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// A request on its way to the node that runs its function, as that
/// node's invoker takes it: the gateway already routed it, so `uri` is the
/// path (prefix stripped if the route says so) and query the guest sees,
/// and `headers` include the route headers the first node set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedRequest {
    /// What started it, for the usage record: `http` or `invoke`.
    pub trigger: String,
    /// Whether the caller is an operator (admin invoke), who may read why
    /// a function failed; a public client is not.
    pub operator: bool,
    /// The HTTP method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers in order, repeated names kept; values are raw bytes.
    pub headers: Vec<(String, Bytes)>,
    /// The whole body.
    pub body: Bytes,
}

/// The answer of the node that ran a forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedResponse {
    /// HTTP status code.
    pub status: u16,
    /// Headers in order (`x-mayfly-node` names the node that served it).
    pub headers: Vec<(String, Bytes)>,
    /// The whole body.
    pub body: Bytes,
}

impl ForwardedResponse {
    /// A plain-text answer of the node itself (or of forwarding), not of
    /// a guest.
    pub fn text(status: u16, message: String) -> Self {
        Self {
            status,
            headers: vec![(
                "content-type".to_string(),
                Bytes::from_static(b"text/plain; charset=utf-8"),
            )],
            body: Bytes::from(message),
        }
    }
}

/// Why a forward got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No node that runs the function is reachable.
    #[error("no node that runs the function is reachable")]
    NoNode,
    /// A node took the request but did not answer in time.
    #[error("the node running the function did not answer within {0:?}")]
    Timeout(Duration),
    /// The request's body is larger than forwarding carries.
    #[error("the request body is {size} bytes, over the {limit} bytes a forwarded request carries")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The largest body forwarding carries ([`Forwarder::max_body`]).
        limit: usize,
    },
    /// The fleet's messaging failed.
    #[error("forwarding failed: {0}")]
    Failed(String),
}

/// Runs forwarded requests on this node: the platform's side of
/// [`Forwarder::answer`].
#[async_trait::async_trait]
pub trait ForwardHandler: Send + Sync {
    /// Runs `request` through `function`'s `live` alias, as the gateway
    /// would have, and answers with the whole response.
    async fn handle(&self, function: &str, request: ForwardedRequest) -> ForwardedResponse;
}

/// Carries requests between the nodes of a fleet.
///
/// A node on its own forwards nothing ([`NoForwarding`]). A fleet back-end
/// sends each forward to one of the nodes that announced the function with
/// [`Forwarder::answer`], the nearest one when it can tell.
#[async_trait::async_trait]
pub trait Forwarder: Send + Sync {
    /// This node's name when it is part of a fleet (and so may forward and
    /// tells clients which node served them); `None` on its own.
    fn node(&self) -> Option<&str>;

    /// The largest body a forwarded request or response may have, in bytes
    /// (both ends hold it whole).
    fn max_body(&self) -> usize;

    /// Sends `request` to a node running `function` and waits up to
    /// `timeout` for its answer.
    async fn forward(
        &self,
        function: &str,
        request: ForwardedRequest,
        timeout: Duration,
    ) -> Result<ForwardedResponse, ForwardError>;

    /// From now on this node answers forwarded requests for exactly
    /// `functions` (those it runs), through `handler`; it stops answering
    /// for the others. Must not block: called on every catalog change.
    fn answer(&self, functions: Vec<String>, handler: Arc<dyn ForwardHandler>);
}

/// The forwarder of a node on its own: it runs every function itself.
#[derive(Debug, Default)]
pub struct NoForwarding;

#[async_trait::async_trait]
impl Forwarder for NoForwarding {
    fn node(&self) -> Option<&str> {
        None
    }

    fn max_body(&self) -> usize {
        0
    }

    async fn forward(
        &self,
        _function: &str,
        _request: ForwardedRequest,
        _timeout: Duration,
    ) -> Result<ForwardedResponse, ForwardError> {
        Err(ForwardError::NoNode)
    }

    fn answer(&self, _functions: Vec<String>, _handler: Arc<dyn ForwardHandler>) {}
}

/// Whether a node with `labels` runs a function placed at `placement`:
/// its labels hold every pair (an empty placement: every node does).
pub fn placement_matches(
    labels: &BTreeMap<String, String>,
    placement: &BTreeMap<String, String>,
) -> bool {
    placement
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// A placement or label set as users write it: `region=eu,site=a`.
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks one label (of a node's `--labels` or a function's placement):
/// key and value are each 1-63 letters, digits, `-`, `_` or `.`.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    let well_formed = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if well_formed(key) && well_formed(value) {
        Ok(())
    } else {
        Err(format!(
            "label `{}={}`: keys and values are 1-63 letters, digits, `-`, `_` or `.`",
            key.escape_debug(),
            value.escape_debug()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_node_matches_when_its_labels_hold_every_pair() {
        let node = labels(&[("region", "eu"), ("site", "a")]);
        assert!(placement_matches(&node, &labels(&[])));
        assert!(placement_matches(&node, &labels(&[("site", "a")])));
        assert!(placement_matches(
            &node,
            &labels(&[("region", "eu"), ("site", "a")])
        ));
        assert!(!placement_matches(&node, &labels(&[("site", "b")])));
        assert!(!placement_matches(
            &node,
            &labels(&[("site", "a"), ("tier", "gpu")])
        ));
        assert!(!placement_matches(&labels(&[]), &labels(&[("site", "a")])));
        // Values compare exactly.
        assert!(!placement_matches(&node, &labels(&[("site", "A")])));
    }

    #[test]
    fn labels_are_checked_and_written_as_users_do() {
        assert!(check_label("site", "fra-1.b_2").is_ok());
        for (key, value) in [("", "a"), ("site", ""), ("si te", "a"), ("site", "a=b")] {
            let error = check_label(key, value).unwrap_err();
            assert!(error.contains("1-63 letters"), "{error}");
        }
        assert!(check_label(&"k".repeat(64), "a").is_err());
        assert_eq!(
            labels_text(&labels(&[("site", "a"), ("region", "eu")])),
            "region=eu,site=a"
        );
    }
}
