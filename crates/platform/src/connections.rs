//! Connection hygiene for the node's listeners (the gateway and the admin
//! API, plain or TLS): every connection is watched from accept to close.
//!
//! - A connection with nothing in flight and nothing sent is closed after
//!   the *idle timeout* (a new connection that never speaks, a kept-alive
//!   one between requests).
//! - Once a client starts sending on such a connection (the first byte of a
//!   request head, or of a TLS handshake), the head must be complete within
//!   the *header timeout*; slowloris clients that trickle a head are closed.
//! - A request's body must arrive in full within the *body timeout* of its
//!   head; past it the reader (the guest, or the admin handler) gets a
//!   read-timeout error. This is separate from a function's own timeout.
//! - Each listener holds at most *max connections*. At the cap a new
//!   connection pushes out the oldest one with no request in flight (idle
//!   and slow-head connections are the cheapest to lose and the first a
//!   flood fills); when every connection has a request in flight the new
//!   one is refused at once (plain HTTP gets a 503 with a message).
//!
//! The timeouts are enforced here rather than by hyper's own HTTP/1 header
//! timer because hyper starts that timer as soon as a connection waits for
//! a head, so it would also end idle kept-alive connections, and HTTP/2 and
//! the protocol sniffing of `auto::Builder` have no such timer at all.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default for [`ConnectionLimits::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`ConnectionLimits::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`ConnectionLimits::body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default connection cap of the gateway.
pub const DEFAULT_GATEWAY_MAX_CONNECTIONS: usize = 10_000;
/// Default connection cap of the admin API.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 256;
/// File descriptors kept out of both caps for everything else the node
/// opens: databases, blobs, artifacts, guests' outbound connections.
pub const RESERVED_FILES: u64 = 512;
/// Streams one HTTP/2 connection may run at once.
const MAX_CONCURRENT_STREAMS: u32 = 128;
/// HTTP/2 pings find peers that vanished while a request was in flight.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often at most a listener warns that it is at its cap.
const WARN_EVERY_MS: u64 = 10_000;

/// Reads a timeout such as `10s` or `500ms`: from 1 ms to 24 h.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() || duration > Duration::from_secs(24 * 3600) {
        return Err("give a time from 1ms to 24h, e.g. 10s".to_string());
    }
    Ok(duration)
}

/// How long a listener's connections may take and how many it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time from the first byte of a request head (or TLS handshake) to
    /// its end.
    pub header_timeout: Duration,
    /// Time a connection may stay open with no request in flight and
    /// nothing received.
    pub idle_timeout: Duration,
    /// Time from a request's head to the last byte of its body.
    pub body_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// The gateway's defaults.
    pub const fn gateway() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_connections: DEFAULT_GATEWAY_MAX_CONNECTIONS,
        }
    }

    /// The admin API's defaults.
    pub const fn admin() -> Self {
        Self {
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            ..Self::gateway()
        }
    }
}

/// The limits of both listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// The public gateway's.
    pub gateway: ConnectionLimits,
    /// The admin API's: its own cap, so a flooded gateway leaves it room.
    pub admin: ConnectionLimits,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            gateway: ConnectionLimits::gateway(),
            admin: ConnectionLimits::admin(),
        }
    }
}

impl ListenerLimits {
    /// Lowers the caps so that both listeners full, plus
    /// [`RESERVED_FILES`], fit in `open_files` descriptors: a gateway at
    /// its cap must leave the admin API its own connections. Returns a
    /// description of the change when the caps were lowered.
    pub fn fit_open_files(&mut self, open_files: u64) -> Option<String> {
        let available = usize::try_from(open_files.saturating_sub(RESERVED_FILES))
            .unwrap_or(usize::MAX)
            .max(2);
        let before = (self.gateway.max_connections, self.admin.max_connections);
        // The admin API keeps at least an eighth of what is left.
        self.admin.max_connections = self.admin.max_connections.clamp(1, (available / 8).max(1));
        self.gateway.max_connections = self
            .gateway
            .max_connections
            .clamp(1, (available - self.admin.max_connections).max(1));
        let after = (self.gateway.max_connections, self.admin.max_connections);
        (before != after).then(|| {
            format!(
                "the open-file limit is {open_files}: connection caps lowered to {} (gateway) and \
                 {} (admin API) to leave {RESERVED_FILES} files for the node; raise the hard \
                 limit (`ulimit -Hn`, LimitNOFILE=) to allow more",
                after.0, after.1
            )
        })
    }
}

/// A listener's hyper connection builder: HTTP/1.1 and HTTP/2 with a timer.
fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own HTTP/1 head timer is switched off (it defaults to 30 s
    // once a timer is set): it runs from the moment a connection waits for
    // a head, so it would also end idle kept-alive connections, and it
    // allocates a timer per request. The watchdog below does the job for
    // both protocols.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    builder
}

/// Marks "nothing received since the connection went idle".
const NONE: u64 = u64::MAX;

/// One open connection's state, shared by its I/O, its service and its
/// watchdog. Times are milliseconds since the listener's `base`.
struct Conn {
    base: Instant,
    in_flight: AtomicU32,
    idle_since: AtomicU64,
    head_since: AtomicU64,
    evicted: AtomicBool,
    /// Wakes the watchdog when the listener pushes the connection out.
    wake: Notify,
}

impl Conn {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// Notes that bytes arrived: while idle, the first of them starts the
    /// header timeout.
    fn received(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == NONE
        {
            self.head_since.store(self.now(), Ordering::Relaxed);
        }
    }
}

/// Holds a connection busy while a request is in flight (from its head
/// until its response body is done or dropped).
struct InFlight(Arc<Conn>);

impl InFlight {
    fn enter(conn: &Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let conn = &self.0;
        if conn.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            conn.head_since.store(NONE, Ordering::Relaxed);
            conn.idle_since.store(conn.now(), Ordering::Relaxed);
        }
    }
}

/// Why the watchdog ended a connection.
#[derive(Debug, Clone, Copy)]
enum Ended {
    Idle,
    Header,
    Evicted,
}

/// Resolves when the connection must close: idle or head timeout passed
/// with no request in flight, or the listener pushed it out.
///
/// Requests and reads do not wake it (that would cost two task wake-ups per
/// request): it looks at the connection at least every `tick`, the shorter
/// of the two timeouts, and otherwise sleeps until the deadline the state
/// it saw implies. A head or an idle spell that starts after a look has a
/// deadline at least `tick` away, so the next look still comes before it
/// and every close is on time.
async fn watchdog(conn: &Conn, limits: &ConnectionLimits) -> Ended {
    let tick = limits.header_timeout.min(limits.idle_timeout);
    let sleep = tokio::time::sleep(tick);
    tokio::pin!(sleep);
    loop {
        if conn.evicted.load(Ordering::Relaxed) {
            return Ended::Evicted;
        }
        let now = Instant::now();
        let mut wake = now + tick;
        if conn.in_flight.load(Ordering::Relaxed) == 0 {
            let head = conn.head_since.load(Ordering::Relaxed);
            let (deadline, why) = if head == NONE {
                let idle = conn.idle_since.load(Ordering::Relaxed);
                (conn.at(idle) + limits.idle_timeout, Ended::Idle)
            } else {
                (conn.at(head) + limits.header_timeout, Ended::Header)
            };
            if now >= deadline {
                return why;
            }
            wake = wake.min(deadline);
        }
        sleep.as_mut().reset(wake);
        tokio::select! {
            () = &mut sleep => {}
            () = conn.wake.notified() => {}
        }
    }
}

/// A listener's open connections, oldest first.
struct Listener {
    name: &'static str,
    limits: ConnectionLimits,
    base: Instant,
    open: Mutex<Table>,
    last_warning: AtomicU64,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    by_age: BTreeMap<u64, Arc<Conn>>,
    evicted: u64,
    refused: u64,
}

impl Listener {
    /// Registers a new connection, pushing out the oldest idle one at the
    /// cap; `None` when every connection is busy and this one is refused.
    fn admit(&self) -> Option<(u64, Arc<Conn>)> {
        let mut table = self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if table.by_age.len() >= self.limits.max_connections {
            let oldest_idle = table
                .by_age
                .iter()
                .find(|(_, conn)| conn.in_flight.load(Ordering::Relaxed) == 0)
                .map(|(id, _)| *id);
            let full = match oldest_idle.and_then(|id| table.by_age.remove(&id)) {
                Some(conn) => {
                    conn.evicted.store(true, Ordering::Relaxed);
                    conn.wake.notify_one();
                    table.evicted += 1;
                    false
                }
                None => {
                    table.refused += 1;
                    true
                }
            };
            let (evicted, refused) = (table.evicted, table.refused);
            drop(table);
            self.warn_full(evicted, refused);
            if full {
                return None;
            }
            table = self
                .open
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
        }
        let id = table.next_id;
        table.next_id += 1;
        let conn = Arc::new(Conn {
            base: self.base,
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            evicted: AtomicBool::new(false),
            wake: Notify::new(),
        });
        conn.idle_since.store(conn.now(), Ordering::Relaxed);
        table.by_age.insert(id, conn.clone());
        Some((id, conn))
    }

    fn close(&self, id: u64) {
        let mut table = self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        table.by_age.remove(&id);
    }

    /// Warns at most every [`WARN_EVERY_MS`] that the cap was reached.
    fn warn_full(&self, evicted: u64, refused: u64) {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_warning.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= WARN_EVERY_MS)
            && self
                .last_warning
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                listener = self.name,
                max_connections = self.limits.max_connections,
                evicted,
                refused,
                "{} is at its connection cap: idle connections are closed to make room, new ones \
                 refused while all are busy (raise --max-connections if this is real traffic)",
                self.name
            );
        }
    }
}

/// Unregisters a connection when its task ends, however it ends.
struct Registered<'a>(&'a Listener, u64);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.close(self.1);
    }
}

/// What a listener does with a fresh TCP stream before HTTP: nothing, or
/// a TLS handshake.
pub(crate) trait Handshake: Clone + Send + Sync + 'static {
    /// The stream HTTP runs over.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Runs the handshake.
    fn handshake(
        &self,
        stream: TrackedIo<TcpStream>,
    ) -> impl Future<Output = io::Result<Self::Io>> + Send;
    /// Whether a refused client can be told so in plain HTTP.
    fn plain(&self) -> bool;
}

/// No handshake: plain HTTP.
#[derive(Clone, Copy)]
pub(crate) struct Plain;

impl Handshake for Plain {
    type Io = TrackedIo<TcpStream>;

    async fn handshake(&self, stream: TrackedIo<TcpStream>) -> io::Result<Self::Io> {
        Ok(stream)
    }

    fn plain(&self) -> bool {
        true
    }
}

/// Serves `service` on `listener` until `shutdown` is cancelled, then stops
/// accepting, asks open connections to finish their requests and waits for
/// them up to `grace` (`None`: as long as they take).
pub(crate) async fn serve<H, S, B>(
    name: &'static str,
    listener: TcpListener,
    limits: ConnectionLimits,
    handshake: H,
    service: S,
    shutdown: CancellationToken,
    grace: Option<Duration>,
) where
    H: Handshake,
    S: hyper::service::Service<http::Request<TimedBody>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener_state = Arc::new(Listener {
        name,
        limits,
        base: Instant::now(),
        open: Mutex::new(Table::default()),
        last_warning: AtomicU64::new(0),
    });
    let builder = Arc::new(builder());
    let tasks = TaskTracker::new();
    let refusal: Arc<[u8]> = refusal(name, limits.max_connections).into();
    let refusing = Arc::new(AtomicU32::new(0));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off
                    // instead of spinning on the same error.
                    tracing::warn!("{name} accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Some((id, conn)) = listener_state.admit() else {
            if handshake.plain() {
                refuse(stream, &refusal, &refusing);
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let listener_state = listener_state.clone();
        let builder = builder.clone();
        let handshake = handshake.clone();
        let service = service.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _registered = Registered(&listener_state, id);
            let io = TrackedIo {
                inner: stream,
                conn: conn.clone(),
            };
            let work = async {
                // A handshake still under way at shutdown is dropped: it
                // has no request in flight.
                let io = tokio::select! {
                    io = handshake.handshake(io) => match io {
                        Ok(io) => io,
                        Err(error) => {
                            tracing::debug!("{name} handshake failed: {error}");
                            return;
                        }
                    },
                    () = shutdown.cancelled() => return,
                };
                let service = Tracked {
                    inner: service,
                    conn: conn.clone(),
                    body_timeout: limits.body_timeout,
                    peer: ClientAddr(peer),
                };
                let connection = builder.serve_connection(TokioIo::new(io), service);
                tokio::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(error) = result {
                    tracing::debug!("{name} connection ended: {error}");
                }
            };
            tokio::select! {
                () = work => {}
                why = watchdog(&conn, &limits) => {
                    tracing::debug!("{name}: closing a connection ({why:?})");
                }
            }
        });
    }
    drop(listener);
    tasks.close();
    match grace {
        Some(grace) => {
            if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
                tracing::warn!("{name}: requests still open after the {grace:?} grace period");
            }
        }
        None => tasks.wait().await,
    }
}

/// Refusals being delivered at once, at most; past that a refused
/// connection is just closed.
const MAX_REFUSING: u32 = 64;
/// How long a refused client gets to read its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Tells a refused plain-HTTP client why and closes its connection. The
/// request it already sent is read and dropped for a moment after the
/// answer: closing a socket with unread input sends a reset, which makes
/// the client's kernel discard the answer before the client reads it.
fn refuse(stream: TcpStream, refusal: &Arc<[u8]>, refusing: &Arc<AtomicU32>) {
    if refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let (refusal, refusing) = (refusal.clone(), refusing.clone());
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSAL_LINGER, async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut stream = stream;
            stream.write_all(&refusal).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            io::Result::Ok(())
        })
        .await;
        refusing.fetch_sub(1, Ordering::Relaxed);
    });
}

/// The answer a plain-HTTP client gets when the listener is full.
fn refusal(name: &str, cap: usize) -> Vec<u8> {
    let body = format!(
        "the {name} is at its limit of {cap} connections, all with requests in flight: retry later\n"
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A TCP stream that tells its connection's watchdog when bytes arrive.
pub(crate) struct TrackedIo<T> {
    inner: T,
    conn: Arc<Conn>,
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.conn.received();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The address of the client that sent a request (the TCP peer), in the
/// request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// A listener's service wrapped to mark its connection busy per request,
/// to put the body timeout on each request body and to tell the handler
/// who the client is ([`ClientAddr`]).
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    conn: Arc<Conn>,
    body_timeout: Duration,
    peer: ClientAddr,
}

impl<S, B> hyper::service::Service<http::Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<TimedBody>, Response = http::Response<B>>,
{
    type Response = http::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let busy = InFlight::enter(&self.conn);
        let timeout = self.body_timeout;
        let mut request = request.map(|body| TimedBody::new(body, timeout));
        request.extensions_mut().insert(self.peer);
        TrackedFuture {
            inner: self.inner.call(request),
            busy: Some(busy),
        }
    }
}

pin_project_lite::pin_project! {
    /// A service's response future holding its connection busy.
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        busy: Option<InFlight>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let busy = this.busy.take();
        Poll::Ready(Ok(response.map(|inner| TrackedBody { inner, _busy: busy })))
    }
}

pin_project_lite::pin_project! {
    /// A response body holding its connection busy until it is done.
    pub(crate) struct TrackedBody<B> {
        #[pin]
        inner: B,
        _busy: Option<InFlight>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection failed or the client sent a malformed body.
    #[error("the request body could not be read: {0}")]
    Read(#[from] hyper::Error),
    /// The body did not finish arriving in time.
    #[error("the request body did not arrive within {0:?} of its head (the body timeout)")]
    TimedOut(Duration),
}

impl From<BodyError> for wasmtime_wasi_http::Error {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::Read(error) => Self::Hyper(error),
            BodyError::TimedOut(_) => Self::ConnectionReadTimeout,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that must finish arriving by a deadline set when its
    /// head arrived. The timer is only armed when a read has to wait, so a
    /// request without a body (or whose body is already buffered) costs
    /// one clock read.
    pub struct TimedBody {
        #[pin]
        inner: Incoming,
        deadline: Instant,
        timeout: Duration,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl TimedBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Instant::now() + timeout,
            timeout,
            timer: None,
        }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(BodyError::Read)));
        }
        let deadline = *this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(BodyError::TimedOut(*this.timeout))))
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

    #[test]
    fn caps_fit_the_open_file_limit() {
        let mut limits = ListenerLimits::default();
        assert_eq!(limits.fit_open_files(1 << 20), None);
        assert_eq!(limits, ListenerLimits::default());

        let note = limits.fit_open_files(1024).unwrap_or_default();
        assert!(note.contains("open-file limit is 1024"), "{note}");
        assert_eq!(limits.admin.max_connections, 64);
        assert_eq!(limits.gateway.max_connections, 512 - 64);

        let mut tiny = ListenerLimits::default();
        tiny.fit_open_files(10);
        assert!(tiny.gateway.max_connections >= 1 && tiny.admin.max_connections >= 1);
    }

    #[test]
    fn refusal_is_a_complete_http_answer() {
        let text = String::from_utf8(refusal("gateway", 5)).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(body.contains("limit of 5 connections"), "{body}");
    }
}
