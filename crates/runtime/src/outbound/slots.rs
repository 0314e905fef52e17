//! An invocation's outbound connection slots, and what frees one when the
//! guest holds them all with responses it is not reading.
//!
//! A request holds one of [`MAX_OUTBOUND_IN_FLIGHT`] slots from before it
//! connects until its response body is dropped, so one invocation can never
//! hold more connections than that. A guest that starts more requests than
//! there are slots and then waits for one that has no slot yet, while every
//! slot holds a response the guest has not reached, would wait for its
//! timeout: the request waits for a slot, and the slots wait for the guest.
//! Awaiting 64 requests in reverse order does that every time; awaiting
//! them in order did it when tokio polled the requests out of order (a
//! fan-out test answered 504 after 60 s once in CI).
//!
//! Workers cancels the least recently used open connection when a Worker is
//! deadlocked on its connection limit; so do these slots. When a request is
//! waiting, no slot belongs to a request still sending or awaiting its
//! response head, and no held body is in the middle of a read (its last
//! poll was `Pending`), nothing the invocation holds can make progress: the
//! body used least recently is closed (reading it fails with an error that
//! says why) and its slot goes to the waiting request. (A body whose read
//! the guest abandoned mid-way still counts as being read; the invocation's
//! timeout then ends the wait, as before.) Written here because
//! the condition is about wasi:http's bodies; no semaphore crate has it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::Error;

use super::{MAX_OUTBOUND_IN_FLIGHT, hyper_error};

/// One invocation's slots (hooks are made per invocation).
pub(crate) struct Slots {
    permits: Arc<Semaphore>,
    /// Requests waiting for a slot; read without the lock on every frame.
    waiting: AtomicUsize,
    /// A logical clock for "least recently used".
    clock: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The response bodies holding slots (ended ones included), each until
    /// it is dropped or closed.
    bodies: Vec<Arc<Mutex<Held>>>,
}

/// A response body and the slot it holds, shared by the body and the slots
/// so that the slots can close it.
struct Held {
    /// `None` once the body was closed or dropped, which frees both.
    open: Option<(hyper::body::Incoming, OwnedSemaphorePermit)>,
    /// Its last poll returned `Pending`: the guest is waiting on it.
    reading: bool,
    last_used: u64,
}

/// A slot taken by a request that has not received its response head yet;
/// dropped (the request failed), it frees the slot.
pub(crate) struct Sending {
    slots: Arc<Slots>,
    slot: OwnedSemaphorePermit,
}

impl Slots {
    /// [`MAX_OUTBOUND_IN_FLIGHT`] free slots.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(MAX_OUTBOUND_IN_FLIGHT)),
            waiting: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        })
    }

    /// Takes a slot, waiting while all are held; while it waits, a body
    /// that blocks the invocation is closed to free one (see the module).
    pub(crate) async fn take(self: &Arc<Self>) -> Result<Sending, Error> {
        let slot = match self.permits.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let _waiting = Waiting::new(self);
                self.unblock();
                // Nothing closes the semaphore; an error rather than a panic
                // if that ever changes.
                self.permits.clone().acquire_owned().await.map_err(|_| {
                    Error::InternalError(Some("the outbound request slots are closed".into()))
                })?
            }
        };
        Ok(Sending {
            slots: self.clone(),
            slot,
        })
    }

    /// Closes the least recently used body if nothing else can free a slot
    /// for a waiting request.
    fn unblock(&self) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let closed = {
            let mut state = lock(&self.state);
            // Only when bodies hold every slot: a slot held by a request
            // still sending (or just taken) frees itself or becomes a body.
            let mut holding = 0;
            let mut victim: Option<(u64, &Arc<Mutex<Held>>)> = None;
            for body in &state.bodies {
                let held = lock(body);
                if held.open.is_none() {
                    continue;
                }
                if held.reading {
                    // That read ends, or its between-bytes timeout does.
                    return;
                }
                holding += 1;
                if victim.is_none_or(|(used, _)| held.last_used < used) {
                    victim = Some((held.last_used, body));
                }
            }
            let Some((_, body)) = victim.filter(|_| holding == MAX_OUTBOUND_IN_FLIGHT) else {
                return;
            };
            let body = body.clone();
            // Out of the list, so that a guest keeping closed bodies does
            // not lengthen every later scan.
            state.bodies.retain(|other| !Arc::ptr_eq(other, &body));
            lock(&body).open.take()
        };
        // Dropped outside the locks: the permit wakes the waiter.
        drop(closed);
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }
}

/// Counts a request as waiting while it lives.
struct Waiting<'a>(&'a Slots);

impl<'a> Waiting<'a> {
    fn new(slots: &'a Slots) -> Self {
        slots.waiting.fetch_add(1, Ordering::AcqRel);
        Self(slots)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Sending {
    /// The response head arrived: its body holds the slot from now on.
    pub(crate) fn received(self, incoming: hyper::body::Incoming) -> HeldBody {
        let held = Arc::new(Mutex::new(Held {
            open: Some((incoming, self.slot)),
            reading: false,
            last_used: self.slots.tick(),
        }));
        lock(&self.slots.state).bodies.push(held.clone());
        // Every slot may now hold a body the guest is not reading.
        self.slots.unblock();
        HeldBody {
            slots: self.slots.clone(),
            held,
        }
    }
}

/// A response body holding its request's slot until dropped.
pub(crate) struct HeldBody {
    slots: Arc<Slots>,
    held: Arc<Mutex<Held>>,
}

impl HeldBody {
    /// The next frame, or the error that says the body was closed to free
    /// its slot.
    pub(crate) fn poll_frame(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let polled = {
            let mut held = lock(&self.held);
            let Some((incoming, _)) = held.open.as_mut() else {
                return Poll::Ready(Some(Err(closed_for_room())));
            };
            let polled = Pin::new(incoming).poll_frame(cx);
            held.reading = polled.is_pending();
            held.last_used = self.slots.tick();
            polled
        };
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(frame) => {
                // The guest may now wait on something else.
                self.slots.unblock();
                Poll::Ready(frame.map(|f| f.map_err(hyper_error)))
            }
        }
    }

    /// Whether the body has ended (a closed one has).
    pub(crate) fn is_end_stream(&self) -> bool {
        lock(&self.held)
            .open
            .as_ref()
            .is_none_or(|(incoming, _)| incoming.is_end_stream())
    }

    /// The body's size hint; nothing more is coming from a closed one.
    pub(crate) fn size_hint(&self) -> http_body::SizeHint {
        lock(&self.held).open.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            |(incoming, _)| incoming.size_hint(),
        )
    }
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        let freed = {
            let mut state = lock(&self.slots.state);
            state.bodies.retain(|body| !Arc::ptr_eq(body, &self.held));
            lock(&self.held).open.take()
        };
        drop(freed);
    }
}

fn closed_for_room() -> Error {
    Error::InternalError(Some(format!(
        "this response's connection was closed to free an outbound slot: the invocation \
         held all {MAX_OUTBOUND_IN_FLIGHT} with responses it was not reading while another \
         request waited for one; read or drop responses before starting more requests than \
         that"
    )))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A server that answers every request with a head promising 5 bytes of
    /// body and then sends none, keeping the connection open.
    async fn silent_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
                    let _ = stream.write_all(head).await;
                    // Held open, body unsent, until the client closes it.
                    let _ = stream.read(&mut buffer).await;
                });
            }
        });
        address
    }

    /// Takes a slot and fetches a response head on a connection of its own.
    async fn held_body(slots: &Arc<Slots>, address: std::net::SocketAddr) -> HeldBody {
        let sending = slots.take().await.unwrap();
        let stream = TcpStream::connect(address).await.unwrap();
        let (mut send, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::get("/")
            .header("host", "test")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        sending.received(response.into_body())
    }

    fn poll_once(body: &HeldBody) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        body.poll_frame(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test]
    async fn the_least_recently_used_unread_body_makes_room_for_a_waiting_request() {
        let address = silent_server().await;
        let slots = Slots::new();
        let mut bodies = Vec::new();
        for _ in 0..MAX_OUTBOUND_IN_FLIGHT {
            bodies.push(held_body(&slots, address).await);
        }
        // The guest waits on the second body's data (its poll was Pending):
        // a read in progress, so a waiting request closes nothing.
        assert!(poll_once(&bodies[1]).is_pending());
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a slot was freed during a read");

        // The read ends (here: the body is dropped) and the request proceeds.
        drop(bodies.remove(1));
        let sending = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiting request got no slot")
            .unwrap()
            .unwrap();
        drop(sending);

        // Every slot held by bodies not being read: the next request closes
        // the one used least recently (the first), not a later one.
        bodies.push(held_body(&slots, address).await);
        let sending = tokio::time::timeout(Duration::from_secs(10), slots.take())
            .await
            .expect("a request waited behind bodies nobody reads")
            .unwrap();
        match poll_once(&bodies[0]) {
            Poll::Ready(Some(Err(error))) => {
                assert!(format!("{error:?}").contains("closed to free an outbound slot"))
            }
            other => panic!("the closed body polled as {other:?}"),
        }
        for body in &bodies[1..] {
            assert!(poll_once(body).is_pending(), "a later body was closed");
        }
        drop(sending);
    }
}
