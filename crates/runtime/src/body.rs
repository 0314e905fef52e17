//! Request and response bodies cut off at the function's size limits.
//!
//! A declared `content-length` over the limit is refused before the guest
//! runs; these wrappers catch the bodies that do not declare a length (or
//! stream more than they declared) while they flow.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use wasmtime_wasi_http::Error;

/// What the body wrappers of one invocation observed.
#[derive(Debug, Default)]
pub(crate) struct BodyFlags {
    request_too_large: AtomicBool,
    response_too_large: AtomicBool,
    response_abandoned: AtomicBool,
    /// The guest failed (trap, timeout, memory) after its response head
    /// was sent: the body must end in an error, not look complete.
    guest_failed: AtomicBool,
}

impl BodyFlags {
    pub(crate) fn request_too_large(&self) -> bool {
        self.request_too_large.load(Ordering::Relaxed)
    }

    pub(crate) fn response_too_large(&self) -> bool {
        self.response_too_large.load(Ordering::Relaxed)
    }

    /// Whether the response body was dropped before all of it was sent:
    /// the client went away (hyper drops the body with the connection).
    pub(crate) fn response_abandoned(&self) -> bool {
        self.response_abandoned.load(Ordering::Relaxed)
    }

    /// Marks the guest failed. Called before its store (which holds the
    /// body's sending end) is dropped, so the body sees the mark when its
    /// channel closes.
    pub(crate) fn mark_guest_failed(&self) {
        self.guest_failed.store(true, Ordering::Release);
    }

    fn guest_failed(&self) -> bool {
        self.guest_failed.load(Ordering::Acquire)
    }
}

/// Which direction a [`LimitedBody`] carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    Request,
    Response,
}

impl Direction {
    fn error(self, max: u64) -> Error {
        match self {
            Direction::Request => Error::HttpRequestBodySize(Some(max)),
            Direction::Response => Error::HttpResponseBodySize(Some(max)),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body as the guest reads it: streamed from the client, or
    /// already buffered by the host.
    #[project = RequestBodyProjection]
    pub(crate) enum RequestBody<B> {
        Streaming { #[pin] body: B },
        Buffered { data: Option<Bytes> },
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Error>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self.project() {
            RequestBodyProjection::Streaming { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(Into::into))),
            RequestBodyProjection::Buffered { data } => {
                Poll::Ready(data.take().map(|data| Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming { body } => body.is_end_stream(),
            RequestBody::Buffered { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming { body } => body.size_hint(),
            RequestBody::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A body that fails with the wasi:http size error once more than `max`
    /// bytes went through it. A response body watched with
    /// [`LimitedBody::watch_abandon`] also flags being dropped unfinished.
    pub(crate) struct LimitedBody<B: Body> {
        #[pin]
        inner: B,
        left: u64,
        max: u64,
        exceeded: bool,
        direction: Direction,
        flags: Arc<BodyFlags>,
        // Watching for a drop before the end; the length the head declared.
        watch: bool,
        declared: Option<u64>,
        // Whether the body ended (its last frame, or an error) while read.
        ended: bool,
    }

    impl<B: Body> PinnedDrop for LimitedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.watch || *this.ended || this.inner.is_end_stream() {
                return;
            }
            // hyper stops reading a body once its declared length is sent
            // and may drop it before the guest closes it: that is complete.
            let sent = *this.max - *this.left;
            if this.declared.is_some_and(|declared| sent >= declared) {
                return;
            }
            this.flags.response_abandoned.store(true, Ordering::Relaxed);
        }
    }
}

impl<B: Body> LimitedBody<B> {
    pub(crate) fn new(inner: B, max: u64, direction: Direction, flags: Arc<BodyFlags>) -> Self {
        Self {
            inner,
            left: max,
            max,
            exceeded: false,
            direction,
            flags,
            watch: false,
            declared: None,
            ended: false,
        }
    }

    /// Flags the body as abandoned if it is dropped before its end, given
    /// the length its head declared, if any.
    pub(crate) fn watch_abandon(mut self, declared: Option<u64>) -> Self {
        self.watch = true;
        self.declared = declared;
        self
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Error>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.project();
        if *this.exceeded {
            return Poll::Ready(Some(Err(this.direction.error(*this.max))));
        }
        let frame = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                // The guest's side failed: an error, not an abandoned body.
                *this.ended = true;
                return Poll::Ready(Some(Err(error.into())));
            }
            None => {
                *this.ended = true;
                // A guest that dies mid-body drops the body's channel, which
                // wasi-http ends like a finished body: make it an error, so
                // the connection is cut (no last chunk) and the client knows.
                if matches!(this.direction, Direction::Response) && this.flags.guest_failed() {
                    return Poll::Ready(Some(Err(Error::InternalError(Some(
                        "the function failed before its response body was complete".into(),
                    )))));
                }
                return Poll::Ready(None);
            }
        };
        let len = frame.data_ref().map_or(0, |data| data.len() as u64);
        if len > *this.left {
            // Deliver exactly up to the limit, then fail on the next poll.
            *this.exceeded = true;
            match this.direction {
                Direction::Request => this.flags.request_too_large.store(true, Ordering::Relaxed),
                Direction::Response => this.flags.response_too_large.store(true, Ordering::Relaxed),
            }
            *this.ended = true;
            let left = std::mem::take(this.left) as usize;
            if let Ok(mut data) = frame.into_data()
                && left > 0
            {
                data.truncate(left);
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            return Poll::Ready(Some(Err(this.direction.error(*this.max))));
        }
        *this.left -= len;
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    async fn collect(bytes: &'static [u8], max: u64) -> (Result<Bytes, Error>, Arc<BodyFlags>) {
        let flags = Arc::new(BodyFlags::default());
        let inner =
            Full::new(Bytes::from_static(bytes)).map_err(|never| -> Error { match never {} });
        let body = LimitedBody::new(inner, max, Direction::Request, flags.clone());
        let collected = body.collect().await.map(|c| c.to_bytes());
        (collected, flags)
    }

    #[tokio::test]
    async fn a_body_at_the_limit_passes() {
        let (bytes, flags) = collect(b"12345", 5).await;
        let bytes = bytes.unwrap();
        assert_eq!(&bytes[..], b"12345");
        assert!(!flags.request_too_large());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_fails_and_is_flagged() {
        let (bytes, flags) = collect(b"123456", 5).await;
        let error = bytes.unwrap_err();
        assert!(matches!(error, Error::HttpRequestBodySize(Some(5))));
        assert!(flags.request_too_large());
        assert!(!flags.response_too_large());
    }

    #[tokio::test]
    async fn exactly_the_limit_is_delivered_before_the_error() {
        let flags = Arc::new(BodyFlags::default());
        let inner =
            Full::new(Bytes::from_static(b"123456")).map_err(|never| -> Error { match never {} });
        let mut body = LimitedBody::new(inner, 4, Direction::Response, flags.clone());
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"1234");
        assert!(body.frame().await.unwrap().is_err());
        assert!(flags.response_too_large());
    }

    /// A response body of two frames, "abc" then "def", ending after them.
    fn two_frames() -> impl Body<Data = Bytes, Error = Error> {
        let frames: Vec<Result<Frame<Bytes>, Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"def"))),
        ];
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_response_whose_guest_failed_ends_in_an_error_not_complete() {
        let flags = Arc::new(BodyFlags::default());
        let mut body = LimitedBody::new(two_frames(), 100, Direction::Response, flags.clone());
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        flags.mark_guest_failed();
        assert!(body.frame().await.unwrap().is_err());
        // A guest that did not fail ends its body cleanly.
        let flags = Arc::new(BodyFlags::default());
        let body = LimitedBody::new(two_frames(), 100, Direction::Response, flags);
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"abcdef");
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_is_abandoned() {
        let watched = |declared| {
            let flags = Arc::new(BodyFlags::default());
            let body = LimitedBody::new(two_frames(), 100, Direction::Response, flags.clone())
                .watch_abandon(declared);
            (body, flags)
        };
        // Dropped after one frame of two: the client went away.
        let (mut body, flags) = watched(None);
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert!(flags.response_abandoned());
        // Read to its end: not abandoned.
        let (body, flags) = watched(None);
        body.collect().await.unwrap();
        assert!(!flags.response_abandoned());
        // Dropped once its declared length went out (hyper stops there).
        let (mut body, flags) = watched(Some(6));
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert!(!flags.response_abandoned());
        // An unwatched body (HEAD, 204, 304, requests) is never flagged.
        let flags = Arc::new(BodyFlags::default());
        drop(LimitedBody::new(
            two_frames(),
            100,
            Direction::Response,
            flags.clone(),
        ));
        assert!(!flags.response_abandoned());
    }
}
