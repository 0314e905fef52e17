//! The deploy upload's multipart parser, shielded from a bug of multer 3.1
//! (the parser under axum's [`Multipart`]).
//!
//! While multer looks for the first boundary it reads the body twice in one
//! poll, and if the second read brings the rest of the body *and* its end,
//! it reports "incomplete multipart stream" without looking at the bytes it
//! just read. That happens to a well-formed upload whose first read finds
//! nothing yet (the head arrived alone) and whose body then arrives whole:
//! about one deploy in 5,000-10,000 from a client that writes the head and
//! the body separately (ureq does). Ending the body one poll after its last
//! bytes keeps multer off that path; it costs one task wake-up per upload.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{FromRequest, Multipart, Request};
use bytes::Bytes;
use http_body::{Frame, SizeHint};

/// `request`'s body as multipart/form-data, parsed as it streams in.
pub(super) async fn multipart(request: Request) -> Result<Multipart, MultipartRejection> {
    let (parts, body) = request.into_parts();
    let body = Body::new(EndLate {
        inner: body,
        state: State::Start,
    });
    Multipart::from_request(Request::from_parts(parts, body), &()).await
}

/// A body that reports its end on the poll after the one that gave its
/// last frame.
struct EndLate {
    inner: Body,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// No frame yet: an empty body ends at once.
    Start,
    /// The last poll gave a frame.
    AfterFrame,
    /// The inner body ended; the end is reported at the next poll.
    Ended,
}

impl http_body::Body for EndLate {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.state == State::Ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(frame)) => {
                self.state = State::AfterFrame;
                Poll::Ready(Some(frame))
            }
            Poll::Ready(None) if self.state == State::AfterFrame => {
                self.state = State::Ended;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => {
                self.state = State::Ended;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Ended
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body stream that follows a script: `P` not ready yet (and wakes
    /// its task), `D` the next chunk, then the end.
    struct Scripted {
        script: std::vec::IntoIter<char>,
        chunks: std::vec::IntoIter<Bytes>,
    }

    impl futures::Stream for Scripted {
        type Item = Result<Bytes, std::io::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.script.next() {
                Some('P') => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Some(_) => Poll::Ready(self.chunks.next().map(Ok)),
                None => Poll::Ready(None),
            }
        }
    }

    fn upload(script: &str, chunks: Vec<Bytes>) -> Request {
        let body = Body::from_stream(Scripted {
            script: script.chars().collect::<Vec<_>>().into_iter(),
            chunks: chunks.into_iter(),
        });
        Request::builder()
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(body)
            .unwrap_or_default()
    }

    async fn parts(mut multipart: Multipart) -> Result<Vec<(String, usize)>, String> {
        let mut parts = Vec::new();
        while let Some(field) = multipart.next_field().await.map_err(|e| e.body_text())? {
            let name = field.name().unwrap_or_default().to_string();
            let bytes = field.bytes().await.map_err(|e| e.body_text())?;
            parts.push((name, bytes.len()));
        }
        Ok(parts)
    }

    const BODY: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"component\"\r\n\r\n\
                          \0asm\x01\0\0\0\r\n--XyZ\r\nContent-Disposition: form-data; \
                          name=\"config\"\r\n\r\n{}\r\n--XyZ--\r\n";

    #[tokio::test]
    async fn a_whole_body_arriving_after_a_wait_is_parsed() {
        // The case multer refuses on its own: nothing at the first read,
        // then every byte and the end at the next.
        for script in ["PD", "D", "PPD", "DP", "PDP"] {
            let request = upload(script, vec![Bytes::from_static(BODY)]);
            let multipart = multipart(request).await.map_err(|e| e.to_string());
            let parsed = match multipart {
                Ok(multipart) => parts(multipart).await,
                Err(e) => Err(e),
            };
            assert_eq!(
                parsed,
                Ok(vec![
                    ("component".to_string(), 8),
                    ("config".to_string(), 2)
                ]),
                "{script}"
            );
        }
    }

    #[tokio::test]
    async fn a_body_split_anywhere_is_parsed() {
        for at in 1..BODY.len() {
            let chunks = vec![
                Bytes::from_static(&BODY[..at]),
                Bytes::from_static(&BODY[at..]),
            ];
            for script in ["PDPD", "PDD", "DPD"] {
                let request = upload(script, chunks.clone());
                let parsed = match multipart(request).await {
                    Ok(multipart) => parts(multipart).await,
                    Err(e) => Err(e.to_string()),
                };
                assert!(parsed.is_ok(), "{script} split at {at}: {parsed:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_cut_body_is_still_refused() {
        let request = upload("PD", vec![Bytes::from_static(&BODY[..BODY.len() - 9])]);
        let parsed = match multipart(request).await {
            Ok(multipart) => parts(multipart).await,
            Err(e) => Err(e.to_string()),
        };
        assert!(parsed.is_err(), "{parsed:?}");
    }
}
