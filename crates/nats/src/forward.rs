//! Forwarding over NATS request/reply: a request for function `f` goes to
//! `<ns>.fwd.f`, where every node running `f` listens in the queue group
//! `fwd`, so exactly one of them (the nearest, for a server cluster or
//! leaf nodes) takes it; "no responders" says at once that none runs.
//!
//! One message each way, head and body together:
//! `[head length: u32 big-endian][head: JSON][body]`. Every message stays
//! under `min(256 KiB, max_payload / 2)`: a larger one could be refused
//! by a server further along with a smaller limit, which closes the link
//! (see docs/edge-design.md §5.2). Larger bodies are refused (413 for a
//! request, 502 for a response) rather than chunked, for now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{RequestErrorKind, Subject};
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use mayfly_store::{ForwardError, ForwardHandler, ForwardedRequest, ForwardedResponse, Forwarder};
use serde::{Deserialize, Serialize};

use crate::Fleet;

/// The largest message forwarding publishes, whatever the servers allow.
const MAX_MESSAGE: usize = 256 * 1024;
/// Room kept in each message for its head (method, URI, headers).
const HEAD_ROOM: usize = 16 * 1024;
/// The queue group of every forwarding subscription.
const QUEUE: &str = "fwd";

/// The NATS forwarder of a fleet node.
pub struct NatsForwarder {
    client: async_nats::Client,
    /// `<ns>.fwd`, the prefix of every function's subject.
    prefix: String,
    node: String,
    max_message: usize,
    /// The answering task of each function this node runs; aborting it
    /// drops its subscription, which unsubscribes.
    answering: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl NatsForwarder {
    /// A forwarder on `fleet`'s connection.
    pub fn new(fleet: &Fleet) -> Self {
        let client = fleet.client().clone();
        let max_message = MAX_MESSAGE.min(client.server_info().max_payload / 2);
        Self {
            prefix: fleet.subject("fwd"),
            node: fleet.node_name().to_string(),
            max_message,
            client,
            answering: Mutex::default(),
        }
    }

    fn subject(&self, function: &str) -> String {
        format!("{}.{function}", self.prefix)
    }
}

impl Drop for NatsForwarder {
    fn drop(&mut self) {
        let answering = self.answering.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, task) in answering.drain() {
            task.abort();
        }
    }
}

#[async_trait::async_trait]
impl Forwarder for NatsForwarder {
    fn node(&self) -> Option<&str> {
        Some(&self.node)
    }

    fn max_body(&self) -> usize {
        self.max_message.saturating_sub(HEAD_ROOM)
    }

    async fn forward(
        &self,
        function: &str,
        request: ForwardedRequest,
        timeout: Duration,
    ) -> Result<ForwardedResponse, ForwardError> {
        let payload = encode_request(&request)?;
        if payload.len() > self.max_message {
            return Err(ForwardError::TooLarge {
                size: payload.len(),
                limit: self.max_message,
            });
        }
        let ask = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        match self.client.send_request(self.subject(function), ask).await {
            Ok(answer) => decode_response(&answer.payload),
            Err(error) => Err(match error.kind() {
                RequestErrorKind::NoResponders => ForwardError::NoNode,
                RequestErrorKind::TimedOut => ForwardError::Timeout(timeout),
                _ => ForwardError::Failed(error.to_string()),
            }),
        }
    }

    fn answer(&self, functions: Vec<String>, handler: Arc<dyn ForwardHandler>) {
        let mut answering = self.answering.lock().unwrap_or_else(|p| p.into_inner());
        answering.retain(|function, task| {
            let keep = functions.contains(function) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("cannot answer forwarded requests: no async runtime");
            return;
        };
        for function in functions {
            if answering.contains_key(&function) {
                continue;
            }
            let task = runtime.spawn(answer_function(
                self.client.clone(),
                self.subject(&function),
                function.clone(),
                self.max_message,
                handler.clone(),
            ));
            answering.insert(function, task);
        }
    }
}

/// Answers forwarded requests for `function` on `subject` until aborted,
/// each in its own task so a slow invocation holds up no other.
async fn answer_function(
    client: async_nats::Client,
    subject: String,
    function: String,
    max_message: usize,
    handler: Arc<dyn ForwardHandler>,
) {
    let mut requests = match client.queue_subscribe(subject, QUEUE.to_string()).await {
        Ok(requests) => requests,
        Err(error) => {
            tracing::error!(%function, "cannot answer forwarded requests: {error}");
            return;
        }
    };
    while let Some(message) = requests.next().await {
        let Some(reply) = message.reply else { continue };
        let (client, function, handler) = (client.clone(), function.clone(), handler.clone());
        tokio::spawn(async move {
            let response = match decode_request(&message.payload) {
                Ok(request) => handler.handle(&function, request).await,
                Err(error) => text(
                    502,
                    format!("the forwarded request is not readable: {error}"),
                ),
            };
            let payload = match encode_response(&response, max_message) {
                Ok(payload) => payload,
                Err(error) => {
                    match encode_response(&text(502, format!("{error}\n")), max_message) {
                        Ok(payload) => payload,
                        Err(_) => return,
                    }
                }
            };
            answer(&client, reply, payload).await;
        });
    }
}

async fn answer(client: &async_nats::Client, reply: Subject, payload: Bytes) {
    if let Err(error) = client.publish(reply, payload).await {
        tracing::debug!("cannot answer a forwarded request: {error}");
    }
}

/// A plain-text response made by forwarding itself.
fn text(status: u16, message: String) -> ForwardedResponse {
    ForwardedResponse {
        status,
        headers: vec![(
            "content-type".to_string(),
            Bytes::from_static(b"text/plain; charset=utf-8"),
        )],
        body: Bytes::from(message),
    }
}

/// The head of a forwarded request on the wire.
#[derive(Serialize, Deserialize)]
struct RequestHead {
    trigger: String,
    operator: bool,
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
}

/// The head of a forwarded response on the wire.
#[derive(Serialize, Deserialize)]
struct ResponseHead {
    status: u16,
    headers: Vec<(String, String)>,
}

/// Header values are bytes, and only mostly text: each byte goes as the
/// character of the same number (Latin-1), which JSON carries losslessly.
fn to_wire(headers: &[(String, Bytes)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| (name.clone(), value.iter().map(|&b| char::from(b)).collect()))
        .collect()
}

fn from_wire(headers: Vec<(String, String)>) -> Result<Vec<(String, Bytes)>, ForwardError> {
    headers
        .into_iter()
        .map(|(name, value)| {
            let bytes: Result<Vec<u8>, _> = value.chars().map(u8::try_from).collect();
            bytes
                .map(|bytes| (name, Bytes::from(bytes)))
                .map_err(|_| ForwardError::Failed("a forwarded header value is not bytes".into()))
        })
        .collect()
}

fn frame(head: &impl Serialize, body: &[u8]) -> Result<Bytes, ForwardError> {
    let head = serde_json::to_vec(head).map_err(|e| ForwardError::Failed(e.to_string()))?;
    let length = u32::try_from(head.len())
        .map_err(|_| ForwardError::Failed("the forwarded head is too large".into()))?;
    let mut framed = BytesMut::with_capacity(4 + head.len() + body.len());
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(&head);
    framed.extend_from_slice(body);
    Ok(framed.freeze())
}

fn unframe<T: for<'de> Deserialize<'de>>(payload: &Bytes) -> Result<(T, Bytes), ForwardError> {
    let unreadable = || ForwardError::Failed("a forwarded message is truncated".into());
    let length: [u8; 4] = payload
        .get(..4)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(unreadable)?;
    let end = 4 + u32::from_be_bytes(length) as usize;
    let head = payload.get(4..end).ok_or_else(unreadable)?;
    let head = serde_json::from_slice(head)
        .map_err(|e| ForwardError::Failed(format!("a forwarded head is not readable: {e}")))?;
    Ok((head, payload.slice(end..)))
}

fn encode_request(request: &ForwardedRequest) -> Result<Bytes, ForwardError> {
    let head = RequestHead {
        trigger: request.trigger.clone(),
        operator: request.operator,
        method: request.method.clone(),
        uri: request.uri.clone(),
        headers: to_wire(&request.headers),
    };
    frame(&head, &request.body)
}

fn decode_request(payload: &Bytes) -> Result<ForwardedRequest, ForwardError> {
    let (head, body): (RequestHead, Bytes) = unframe(payload)?;
    Ok(ForwardedRequest {
        trigger: head.trigger,
        operator: head.operator,
        method: head.method,
        uri: head.uri,
        headers: from_wire(head.headers)?,
        body,
    })
}

/// The response as one message, or why it does not fit in one.
fn encode_response(response: &ForwardedResponse, max_message: usize) -> Result<Bytes, String> {
    let head = ResponseHead {
        status: response.status,
        headers: to_wire(&response.headers),
    };
    let framed = frame(&head, &response.body).map_err(|e| e.to_string())?;
    if framed.len() > max_message {
        return Err(format!(
            "the function's response is {} bytes, over the {max_message} bytes a forwarded \
             response carries: call a node that runs the function directly",
            framed.len()
        ));
    }
    Ok(framed)
}

fn decode_response(payload: &Bytes) -> Result<ForwardedResponse, ForwardError> {
    let (head, body): (ResponseHead, Bytes) = unframe(payload)?;
    Ok(ForwardedResponse {
        status: head.status,
        headers: from_wire(head.headers)?,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_cross_the_wire_unchanged() {
        let request = ForwardedRequest {
            trigger: "http".into(),
            operator: false,
            method: "POST".into(),
            uri: "/api/x?y=1".into(),
            headers: vec![
                ("x-a".into(), Bytes::from_static(b"1")),
                ("x-a".into(), Bytes::from_static(b"2")),
                ("x-raw".into(), Bytes::from_static(&[0xff, b'a', 0x80])),
            ],
            body: Bytes::from_static(b"body \x00 bytes"),
        };
        let wire = encode_request(&request).unwrap();
        assert_eq!(decode_request(&wire).unwrap(), request);
        let response = ForwardedResponse {
            status: 201,
            headers: vec![("x-mayfly-node".into(), Bytes::from_static(b"a"))],
            body: Bytes::from_static(b"done"),
        };
        let wire = encode_response(&response, MAX_MESSAGE).unwrap();
        assert_eq!(decode_response(&wire).unwrap(), response);
    }

    #[test]
    fn a_response_over_one_message_is_refused_with_the_limit() {
        let response = ForwardedResponse {
            status: 200,
            headers: vec![],
            body: Bytes::from(vec![0u8; 1000]),
        };
        let error = encode_response(&response, 500).unwrap_err();
        assert!(error.contains("over the 500 bytes"), "{error}");
    }

    #[test]
    fn a_truncated_message_is_an_error() {
        assert!(decode_request(&Bytes::from_static(b"\x00\x00\x01\x00{}")).is_err());
        assert!(decode_response(&Bytes::from_static(b"\x00")).is_err());
    }
}
