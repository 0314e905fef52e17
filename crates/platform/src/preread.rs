//! The start of a request body, read before the request takes an admission
//! slot.
//!
//! A slot is the node's scarce resource; a client that trickles its body
//! (one byte a second) must not hold one while it does. So the gateway
//! waits, without a slot, until the body has ended or its first
//! [`PREREAD_BYTES`] have arrived, for at most the function's timeout. Most
//! bodies are smaller than that and arrive whole before the guest starts;
//! a larger one streams its rest to the guest as before. Only this much is
//! held per request, so the memory a slow client pins is bounded by the
//! connection count, never by a body size.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;

/// Bytes of a request body read before admission, at most (one frame may
/// take it a little over).
pub(crate) const PREREAD_BYTES: u64 = 64 * 1024;

/// Why the start of a body could not be read.
#[derive(Debug)]
pub(crate) enum PrereadError {
    /// It did not arrive within the time given.
    Timeout(Duration),
    /// The node's body timeout ran out while the body was still arriving.
    BodyTimeout,
    /// The body failed (the client reset the stream, a malformed chunk).
    Failed(String),
}

impl PrereadError {
    /// The answer to the client: 408 or 400, with what to do.
    pub(crate) fn response(&self) -> (http::StatusCode, String) {
        match self {
            PrereadError::Timeout(deadline) => (
                http::StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}: send it without pauses \
                     (the function's timeout bounds the wait)",
                    humantime::format_duration(*deadline)
                ),
            ),
            PrereadError::BodyTimeout => (
                http::StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive within the node's body timeout: \
                 send it without pauses"
                    .to_string(),
            ),
            PrereadError::Failed(error) => (
                http::StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {error}"),
            ),
        }
    }
}

/// A body whose first frames were read already: they come first, then the
/// rest of the original body, if it had not ended.
pub(crate) struct Prefixed<B> {
    frames: VecDeque<Frame<Bytes>>,
    /// Data bytes in `frames`.
    buffered: u64,
    rest: Option<B>,
}

impl<B> Prefixed<B> {
    /// `body` untouched (nothing read).
    fn whole(body: B) -> Self {
        Self {
            frames: VecDeque::new(),
            buffered: 0,
            rest: Some(body),
        }
    }
}

/// Reads the start of `request`'s body (see the module docs) within
/// `deadline`. A request without a body returns at once, untouched.
pub(crate) async fn preread<B>(
    request: http::Request<B>,
    deadline: Duration,
) -> Result<http::Request<Prefixed<B>>, PrereadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    let (parts, mut body) = request.into_parts();
    if body.is_end_stream() {
        return Ok(http::Request::from_parts(parts, Prefixed::whole(body)));
    }
    let mut frames = VecDeque::new();
    let mut buffered = 0u64;
    let read = async {
        while buffered < PREREAD_BYTES {
            match body.frame().await {
                None => return Ok(true),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        buffered += data.len() as u64;
                    }
                    frames.push_back(frame);
                }
                Some(Err(error)) => {
                    return Err(match error.into() {
                        // The node's body timeout (see `connections`) ran
                        // out first: that is a timeout, not a bad body.
                        wasmtime_wasi_http::Error::ConnectionReadTimeout => {
                            PrereadError::BodyTimeout
                        }
                        other => PrereadError::Failed(format!("{other}")),
                    });
                }
            }
        }
        Ok(body.is_end_stream())
    };
    let ended = tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| PrereadError::Timeout(deadline))??;
    let prefixed = Prefixed {
        frames,
        buffered,
        rest: (!ended).then_some(body),
    };
    Ok(http::Request::from_parts(parts, prefixed))
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.frames.pop_front() {
            if let Some(data) = frame.data_ref() {
                this.buffered -= data.len() as u64;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.rest {
            None => SizeHint::with_exact(self.buffered),
            Some(rest) => {
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(self.buffered));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(self.buffered));
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt as _, Full, StreamBody};

    use super::*;

    type Chunks = StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, wasmtime_wasi_http::Error>>>,
    >;

    fn chunks(sizes: &[usize]) -> Chunks {
        let frames: Vec<_> = sizes
            .iter()
            .map(|&n| Ok(Frame::data(Bytes::from(vec![b'x'; n]))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    fn request<B>(body: B) -> http::Request<B> {
        http::Request::new(body)
    }

    #[tokio::test]
    async fn a_small_body_is_read_whole_and_replayed() {
        let request = preread(request(chunks(&[10, 20, 30])), Duration::from_secs(5))
            .await
            .unwrap();
        let body = request.into_body();
        assert!(body.rest.is_none(), "the body had ended");
        assert_eq!(body.size_hint().exact(), Some(60));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 60);
    }

    #[tokio::test]
    async fn a_large_body_stops_at_the_limit_and_streams_the_rest() {
        let sizes = [16 * 1024; 10];
        let request = preread(request(chunks(&sizes)), Duration::from_secs(5))
            .await
            .unwrap();
        let body = request.into_body();
        assert_eq!(body.buffered, PREREAD_BYTES);
        assert!(body.rest.is_some());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 160 * 1024);
    }

    #[tokio::test]
    async fn an_empty_body_is_not_touched() {
        let request = preread(
            request(
                Full::new(Bytes::new())
                    .map_err(|never: Infallible| -> wasmtime_wasi_http::Error { match never {} }),
            ),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(request.body().is_end_stream());
    }

    #[tokio::test]
    async fn a_trickling_body_times_out() {
        // One byte every 50 ms, for ever.
        let trickle = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let frame: Result<Frame<Bytes>, wasmtime_wasi_http::Error> =
                Ok(Frame::data(Bytes::from_static(b"x")));
            Some((frame, ()))
        });
        let body = StreamBody::new(Box::pin(trickle));
        let result = preread(request(body), Duration::from_millis(200)).await;
        assert!(matches!(result, Err(PrereadError::Timeout(_))));
    }
}
