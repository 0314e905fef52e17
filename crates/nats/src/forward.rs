//! Forwarding over NATS request/reply: a request for function `f` goes to
//! `<ns>.fwd.f`, where every node running `f` listens in the queue group
//! `fwd`, so exactly one of them (the nearest, for a server cluster or
//! leaf nodes) takes it; "no responders" says at once that none runs.
//!
//! A message is `[head length: u32 big-endian][head: JSON][body]`. Every
//! message stays under `min(256 KiB, max_payload / 2)`: a larger one could
//! be refused by a server further along with a smaller limit, which closes
//! the link (see docs/edge-design.md §5.2). A body that does not fit in
//! the request (or the answer) with its head stays with its sender, which
//! serves it in chunks on a subject of its own named in the head
//! (`<ns>.fwd.pull.<node>.<id>`); the receiver fetches them, up to
//! [`WINDOW`] at a time, each a request/reply of its own.

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
/// The largest body forwarding carries, in chunks: both ends hold it whole.
const MAX_BODY: usize = 64 << 20;
/// Chunks fetched at once.
const WINDOW: usize = 16;
/// How long one chunk may take to arrive.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node keeps serving the chunks of a response nobody fetches.
const SERVE_RESPONSE_FOR: Duration = Duration::from_secs(60);

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

    /// The body bytes one message carries besides its head.
    fn chunk_size(&self) -> usize {
        self.max_message.saturating_sub(HEAD_ROOM).max(1)
    }

    /// A fresh subject to serve one body's chunks on.
    fn pull_subject(&self) -> String {
        pull_subject(&self.prefix, &self.node)
    }
}

fn pull_subject(prefix: &str, node: &str) -> String {
    format!("{prefix}.pull.{node}.{}", uuid::Uuid::now_v7().simple())
}

/// Where a body that did not fit in its message waits, and its length.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Pulled {
    #[serde(default)]
    body_len: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pull: Option<String>,
}

/// Answers each chunk request on `requests` (its payload: the chunk's
/// index, a u32 big-endian) with that slice of `body`, until aborted.
/// Returns once every chunk was served at least once.
async fn serve_chunks(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    body: Bytes,
    chunk: usize,
) {
    let count = body.len().div_ceil(chunk);
    let mut served = vec![false; count];
    let mut left = count;
    while let Some(request) = requests.next().await {
        let Some(reply) = request.reply else { continue };
        let index = request
            .payload
            .get(..4)
            .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
            .map(|bytes| u32::from_be_bytes(bytes) as usize);
        let Some(index) = index.filter(|index| *index < count) else {
            continue;
        };
        let start = index * chunk;
        let end = (start + chunk).min(body.len());
        answer(&client, reply, body.slice(start..end)).await;
        if let Some(first) = served.get_mut(index).filter(|done| !**done) {
            *first = true;
            left -= 1;
            if left == 0 {
                return;
            }
        }
    }
}

/// Fetches the `body_len` bytes served in chunks of `chunk` on `pull`.
async fn fetch_chunks(
    client: &async_nats::Client,
    pull: &str,
    body_len: usize,
    chunk: usize,
) -> Result<Bytes, String> {
    if body_len > MAX_BODY {
        return Err(format!(
            "{body_len} bytes is over the {MAX_BODY} bytes forwarding carries"
        ));
    }
    let count = body_len.div_ceil(chunk);
    let mut chunks = futures::stream::iter(0..count)
        .map(|index| {
            let ask = async_nats::Request::new()
                .payload(Bytes::copy_from_slice(&(index as u32).to_be_bytes()))
                .timeout(Some(CHUNK_TIMEOUT));
            client.send_request(pull.to_string(), ask)
        })
        .buffered(WINDOW);
    let mut body = BytesMut::with_capacity(body_len);
    while let Some(answer) = chunks.next().await {
        let answer = answer.map_err(|e| format!("a chunk did not arrive: {e}"))?;
        body.extend_from_slice(&answer.payload);
    }
    if body.len() != body_len {
        return Err(format!("{} bytes arrived of {body_len}", body.len()));
    }
    Ok(body.freeze())
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
        MAX_BODY
    }

    async fn forward(
        &self,
        function: &str,
        request: ForwardedRequest,
        timeout: Duration,
    ) -> Result<ForwardedResponse, ForwardError> {
        if request.body.len() > MAX_BODY {
            return Err(ForwardError::TooLarge {
                size: request.body.len(),
                limit: MAX_BODY,
            });
        }
        let chunk = self.chunk_size();
        // A body over one chunk stays here, served until the answer comes.
        let (payload, serving) = if request.body.len() > chunk {
            let pull = self.pull_subject();
            let chunks = self
                .client
                .subscribe(pull.clone())
                .await
                .map_err(|e| ForwardError::Failed(e.to_string()))?;
            let serving = tokio::spawn(serve_chunks(
                self.client.clone(),
                chunks,
                request.body.clone(),
                chunk,
            ));
            let body_len = request.body.len();
            let head_only = ForwardedRequest {
                body: Bytes::new(),
                ..request
            };
            let pulled = Pulled {
                body_len,
                pull: Some(pull),
            };
            (encode_request(&head_only, &pulled)?, Some(serving))
        } else {
            (encode_request(&request, &Pulled::default())?, None)
        };
        let ask = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        let answer = self.client.send_request(self.subject(function), ask).await;
        if let Some(serving) = serving {
            serving.abort();
        }
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => {
                return Err(match error.kind() {
                    RequestErrorKind::NoResponders => ForwardError::NoNode,
                    RequestErrorKind::TimedOut => ForwardError::Timeout(timeout),
                    _ => ForwardError::Failed(error.to_string()),
                });
            }
        };
        let (mut response, pulled) = decode_response(&answer.payload)?;
        if let Some(pull) = pulled.pull {
            response.body = fetch_chunks(&self.client, &pull, pulled.body_len, chunk)
                .await
                .map_err(|e| ForwardError::Failed(format!("the response body: {e}")))?;
        }
        Ok(response)
    }

    fn answer(&self, functions: Vec<String>, handler: Arc<dyn ForwardHandler>) {
        let mut answering = self.answering.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: std::collections::HashSet<&str> =
            functions.iter().map(String::as_str).collect();
        answering.retain(|function, task| {
            let keep = wanted.contains(function.as_str()) && !task.is_finished();
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
                self.node.clone(),
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
    node: String,
    max_message: usize,
    handler: Arc<dyn ForwardHandler>,
) {
    let mut requests = match client
        .queue_subscribe(subject.clone(), QUEUE.to_string())
        .await
    {
        Ok(requests) => requests,
        Err(error) => {
            tracing::error!(%function, "cannot answer forwarded requests: {error}");
            return;
        }
    };
    let chunk = max_message.saturating_sub(HEAD_ROOM).max(1);
    // `<ns>.fwd`, for this node's chunk subjects.
    let prefix = subject
        .strip_suffix(&format!(".{function}"))
        .unwrap_or(&subject)
        .to_string();
    while let Some(message) = requests.next().await {
        let Some(reply) = message.reply else { continue };
        let (client, function, handler) = (client.clone(), function.clone(), handler.clone());
        let (prefix, node) = (prefix.clone(), node.clone());
        tokio::spawn(async move {
            let response = match receive(&client, &message.payload, chunk).await {
                Ok(request) => handler.handle(&function, request).await,
                Err(error) => ForwardedResponse::text(
                    502,
                    format!("the forwarded request is not readable: {error}\n"),
                ),
            };
            let payload = if response.body.len() > chunk {
                send_pulled(&client, &prefix, &node, response, chunk).await
            } else {
                encode_response(&response, &Pulled::default())
            };
            let payload = match payload {
                Ok(payload) => payload,
                Err(error) => {
                    match encode_response(
                        &ForwardedResponse::text(502, format!("{error}\n")),
                        &Pulled::default(),
                    ) {
                        Ok(payload) => payload,
                        Err(_) => return,
                    }
                }
            };
            answer(&client, reply, payload).await;
        });
    }
}

/// A forwarded request, its body fetched if it was left with its sender.
async fn receive(
    client: &async_nats::Client,
    payload: &Bytes,
    chunk: usize,
) -> Result<ForwardedRequest, ForwardError> {
    let (mut request, pulled) = decode_request(payload)?;
    if let Some(pull) = pulled.pull {
        request.body = fetch_chunks(client, &pull, pulled.body_len, chunk)
            .await
            .map_err(|e| ForwardError::Failed(format!("the request body: {e}")))?;
    }
    Ok(request)
}

/// The answer's head, its body served in chunks (for a while) on a subject
/// of this node's.
async fn send_pulled(
    client: &async_nats::Client,
    prefix: &str,
    node: &str,
    response: ForwardedResponse,
    chunk: usize,
) -> Result<Bytes, ForwardError> {
    if response.body.len() > MAX_BODY {
        return Err(ForwardError::Failed(format!(
            "the function's response is {} bytes, over the {MAX_BODY} bytes forwarding carries: \
             call a node that runs the function directly",
            response.body.len()
        )));
    }
    let pull = pull_subject(prefix, node);
    let chunks = client
        .subscribe(pull.clone())
        .await
        .map_err(|e| ForwardError::Failed(e.to_string()))?;
    let pulled = Pulled {
        body_len: response.body.len(),
        pull: Some(pull),
    };
    let serving = serve_chunks(client.clone(), chunks, response.body.clone(), chunk);
    tokio::spawn(async move {
        // Ends when every chunk was fetched, or when the requester gave up.
        let _ = tokio::time::timeout(SERVE_RESPONSE_FOR, serving).await;
    });
    let head_only = ForwardedResponse {
        body: Bytes::new(),
        ..response
    };
    encode_response(&head_only, &pulled)
}

async fn answer(client: &async_nats::Client, reply: Subject, payload: Bytes) {
    if let Err(error) = client.publish(reply, payload).await {
        tracing::debug!("cannot answer a forwarded request: {error}");
    }
}

/// The head of a forwarded request on the wire.
#[derive(Serialize, Deserialize)]
struct RequestHead {
    #[serde(flatten)]
    pulled: Pulled,
    trigger: String,
    operator: bool,
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
}

/// The head of a forwarded response on the wire.
#[derive(Serialize, Deserialize)]
struct ResponseHead {
    #[serde(flatten)]
    pulled: Pulled,
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

fn encode_request(request: &ForwardedRequest, pulled: &Pulled) -> Result<Bytes, ForwardError> {
    let head = RequestHead {
        pulled: pulled.clone(),
        trigger: request.trigger.clone(),
        operator: request.operator,
        method: request.method.clone(),
        uri: request.uri.clone(),
        headers: to_wire(&request.headers),
    };
    frame(&head, &request.body)
}

fn decode_request(payload: &Bytes) -> Result<(ForwardedRequest, Pulled), ForwardError> {
    let (head, body): (RequestHead, Bytes) = unframe(payload)?;
    let request = ForwardedRequest {
        trigger: head.trigger,
        operator: head.operator,
        method: head.method,
        uri: head.uri,
        headers: from_wire(head.headers)?,
        body,
    };
    Ok((request, head.pulled))
}

fn encode_response(response: &ForwardedResponse, pulled: &Pulled) -> Result<Bytes, ForwardError> {
    let head = ResponseHead {
        pulled: pulled.clone(),
        status: response.status,
        headers: to_wire(&response.headers),
    };
    frame(&head, &response.body)
}

fn decode_response(payload: &Bytes) -> Result<(ForwardedResponse, Pulled), ForwardError> {
    let (head, body): (ResponseHead, Bytes) = unframe(payload)?;
    let response = ForwardedResponse {
        status: head.status,
        headers: from_wire(head.headers)?,
        body,
    };
    Ok((response, head.pulled))
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
        let pulled = Pulled {
            body_len: 7,
            pull: Some("mf.fwd.pull.a.1".into()),
        };
        let (decoded, read) = decode_request(&encode_request(&request, &pulled).unwrap()).unwrap();
        assert_eq!(decoded, request);
        assert_eq!((read.body_len, read.pull), (7, pulled.pull));
        let response = ForwardedResponse {
            status: 201,
            headers: vec![("x-mayfly-node".into(), Bytes::from_static(b"a"))],
            body: Bytes::from_static(b"done"),
        };
        let wire = encode_response(&response, &Pulled::default()).unwrap();
        let (decoded, read) = decode_response(&wire).unwrap();
        assert_eq!(decoded, response);
        assert!(read.pull.is_none());
    }

    #[test]
    fn a_truncated_message_is_an_error() {
        assert!(decode_request(&Bytes::from_static(b"\x00\x00\x01\x00{}")).is_err());
        assert!(decode_response(&Bytes::from_static(b"\x00")).is_err());
    }
}
