//! Serving HTTP/1.1 with a lame-duck drain, timeouts and a connection limit
//! (feature `hyper`).
//!
//! Closing idle keep-alive connections the moment shutdown starts (what most
//! servers do) races with clients that are sending their next request on
//! them: the request meets a closed socket and fails. The drain here never
//! closes a connection under a busy client:
//!
//! 1. On shutdown, stop accepting. The listening socket itself stays open in
//!    the supervisor, so new connections wait in the kernel's queue for the
//!    next generation.
//! 2. Every response sent from then on carries `Connection: close`, so a busy
//!    client finishes its request and reconnects, to the next generation.
//! 3. A connection with no request in flight is closed only after it has
//!    stayed idle for [`Drain::idle_grace`].
//! 4. At [`Drain::deadline`] whatever is left is cut.
//!
//! Invariant: once draining, a connection is closed by the server only (a)
//! after a response that said `Connection: close`, (b) after `idle_grace`
//! without a request (counted from the start of the drain at the earliest),
//! or (c) at the deadline. Upgraded connections (WebSocket) leave hyper at
//! the upgrade: they are the app's to close, and end when the process exits.
//!
//! Outside a drain, [`Options`] bound what a client can hold:
//!
//! - **header timeout**: from the accept (or from the first byte of a later
//!   request on a keep-alive connection) to the end of the request head. A
//!   client that connects and sends nothing is cut by this timeout.
//! - **idle timeout**: a keep-alive connection with no request in flight and
//!   no byte of a new one is closed after this long; so is a connection whose
//!   client stops reading the response it asked for (writes blocked that
//!   long). The idle timer never runs while a request is in flight.
//! - **connection limit** ([`Connections`]): at most `max` connections at
//!   once, shared by every listener (and every thread) that serves with the
//!   same limit. At the limit the oldest connection that has not sent a byte
//!   yet is closed to make room (what nginx does with reusable connections);
//!   if there is none, accepting pauses and new clients wait in the kernel's
//!   accept queue: they are delayed, not refused.
//! - **half-close**: a client that sends its request and then shuts down its
//!   write side (`shutdown(SHUT_WR)`) still gets its response.
//!
//! A connection that has not sent a byte costs a small task and its socket:
//! hyper's buffers are allocated only once the first byte is readable.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::listen::Listener;

/// How a server drains on shutdown.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// How long a connection with no request in flight is kept open after
    /// shutdown began, in case its client is about to send one.
    pub idle_grace: Duration,
    /// How long the whole drain may take; connections still open then are
    /// cut. Keep it below the supervisor's stop timeout (baton's and
    /// systemd's default: 30 s), so that the app exits on its own, shutdown
    /// hooks included, before it is killed.
    pub deadline: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            idle_grace: Duration::from_millis(500),
            deadline: Duration::from_secs(20),
        }
    }
}

/// How a server treats its client connections: drain, timeouts, limit.
///
/// ```
/// use std::time::Duration;
/// use baton::serve::{Connections, Options};
///
/// let mut options = Options::default();
/// options.header_timeout = Some(Duration::from_secs(5));
/// options.connections = Connections::new(10_000);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// The drain on shutdown.
    pub drain: Drain,
    /// How long a client may take to send a request head, counted from the
    /// accept or from the first byte of a later request; `None` for no
    /// limit. Default: 10 s.
    pub header_timeout: Option<Duration>,
    /// How long a keep-alive connection may stay idle between requests, and
    /// how long a client may leave a response unread; `None` for no limit.
    /// Default: 60 s.
    pub idle_timeout: Option<Duration>,
    /// Whether a client that shut down its write side after its request
    /// still gets the response. Default: yes.
    pub half_close: bool,
    /// The connection limit and counters, shared with whoever else serves
    /// with the same value. Default: no limit (but counted).
    pub connections: Arc<Connections>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            drain: Drain::default(),
            header_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(60)),
            half_close: true,
            connections: Connections::new(usize::MAX),
        }
    }
}

impl From<Drain> for Options {
    fn from(drain: Drain) -> Self {
        Options {
            drain,
            ..Options::default()
        }
    }
}

/// What a drained server did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Connections accepted over the server's life.
    pub connections: u64,
    /// Connections still open at the deadline, and cut.
    pub cut_at_deadline: usize,
}

/// A listener registered with the tokio runtime.
#[derive(Debug)]
#[non_exhaustive]
pub enum AsyncListener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// Unix-domain stream socket.
    Unix(tokio::net::UnixListener),
}

impl AsyncListener {
    /// Registers an inherited listener with the current tokio runtime, setting
    /// it non-blocking first (tokio requires it, and an inherited socket is
    /// blocking by default). Must be called within a runtime.
    pub fn from_listener(listener: Listener) -> io::Result<AsyncListener> {
        listener.set_nonblocking(true)?;
        match listener {
            Listener::Tcp(l) => Ok(AsyncListener::Tcp(tokio::net::TcpListener::from_std(l)?)),
            Listener::Unix(l) => Ok(AsyncListener::Unix(tokio::net::UnixListener::from_std(l)?)),
        }
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            AsyncListener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
            AsyncListener::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
        }
    }
}

impl From<tokio::net::TcpListener> for AsyncListener {
    fn from(l: tokio::net::TcpListener) -> Self {
        AsyncListener::Tcp(l)
    }
}

impl From<tokio::net::UnixListener> for AsyncListener {
    fn from(l: tokio::net::UnixListener) -> Self {
        AsyncListener::Unix(l)
    }
}

/// Accepts on a listener, never spinning on a stale hang-up.
///
/// A listening socket shut down by another process that holds it (an app
/// calling `shutdown(2)` on an inherited listener) reports a hang-up, and
/// tokio keeps a hang-up readiness for good: once the supervisor makes the
/// socket listen again, tokio's own accept would retry forever inside one
/// poll. This acceptor sees the hang-up with the `WouldBlock` and registers
/// the socket afresh instead.
#[derive(Debug)]
pub struct Acceptor {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    unix: bool,
}

impl Acceptor {
    /// Takes over `listener` (registered anew with the current runtime).
    pub fn new(listener: AsyncListener) -> io::Result<Acceptor> {
        let (fd, unix) = match listener {
            AsyncListener::Tcp(l) => (std::os::fd::OwnedFd::from(l.into_std()?), false),
            AsyncListener::Unix(l) => (std::os::fd::OwnedFd::from(l.into_std()?), true),
        };
        Ok(Acceptor {
            fd: crate::sys::register_readable(fd)?,
            unix,
        })
    }

    /// Accepts one connection.
    pub async fn accept(&mut self) -> io::Result<Stream> {
        self.accept_from().await.map(|(stream, _)| stream)
    }

    /// Accepts one connection, with the client's address (TCP only),
    /// which then costs no system call of its own.
    pub async fn accept_from(&mut self) -> io::Result<(Stream, Option<SocketAddr>)> {
        let (conn, peer) = self.accept_raw().await?;
        Ok(if self.unix {
            let std = std::os::unix::net::UnixStream::from(conn);
            (Stream::Unix(tokio::net::UnixStream::from_std(std)?), None)
        } else {
            let std = std::net::TcpStream::from(conn);
            (Stream::Tcp(tokio::net::TcpStream::from_std(std)?), peer)
        })
    }

    /// Accepts one connection as a bare non-blocking socket, not registered
    /// with the runtime (for a server that registers it only if it must
    /// wait on it), with the client's address (TCP only).
    pub async fn accept_raw(&mut self) -> io::Result<(std::os::fd::OwnedFd, Option<SocketAddr>)> {
        use std::os::fd::AsFd;
        loop {
            let mut ready = self.fd.readable().await?;
            let hung_up = ready.ready().is_read_closed();
            let accepted = ready.try_io(|fd| crate::sys::accept_nonblocking(fd.as_fd()));
            drop(ready);
            match accepted {
                Ok(accepted) => return accepted,
                // Nothing to accept. After a hang-up that readiness would
                // never clear: start over with a fresh registration.
                // (On failure the old registration stays, and the caller
                // backs off before trying again.)
                Err(_) if hung_up => {
                    let copy = self.fd.get_ref().try_clone()?;
                    self.fd = crate::sys::register_readable(copy)?;
                }
                Err(_) => {}
            }
        }
    }

    /// Whether this listens on a Unix socket.
    pub fn is_unix(&self) -> bool {
        self.unix
    }
}

/// An accepted client connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stream {
    /// TCP.
    Tcp(tokio::net::TcpStream),
    /// Unix-domain stream socket.
    Unix(tokio::net::UnixStream),
}

/// A client connection waited on for its first byte ([`first_byte`]).
pub trait FirstByte {
    /// Waits until the client has sent something (or closed).
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Whether the client has sent something not yet read.
    fn has_data(&self) -> bool;
}

impl FirstByte for Stream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        Stream::readable(self)
    }

    fn has_data(&self) -> bool {
        Stream::has_data(self)
    }
}

impl Stream {
    /// Waits until the client has sent something (or closed). tokio's
    /// readiness can be a false positive (a fresh socket shows readable), so
    /// it is confirmed by a peek that consumes nothing.
    pub async fn readable(&self) -> io::Result<()> {
        use std::os::fd::AsFd;
        loop {
            let peeked = match self {
                Stream::Tcp(s) => {
                    s.readable().await?;
                    s.try_io(tokio::io::Interest::READABLE, || {
                        crate::sys::peek(s.as_fd())
                    })
                }
                Stream::Unix(s) => {
                    s.readable().await?;
                    s.try_io(tokio::io::Interest::READABLE, || {
                        crate::sys::peek(s.as_fd())
                    })
                }
            };
            match peeked {
                Ok(_) => return Ok(()),
                // Not really readable: tokio cleared the readiness; wait.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the client has sent something not yet read (without
    /// waiting or consuming it).
    pub fn has_data(&self) -> bool {
        use std::os::fd::AsFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        };
        matches!(crate::sys::peek(fd), Ok(n) if n > 0)
    }

    /// The client's address (TCP only).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok(),
            Stream::Unix(_) => None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A cap on concurrent connections, shared across listeners and threads,
/// and counters of what the cap and the timeouts did.
///
/// Each connection holds a [`Ticket`] for its whole life. At the cap,
/// [`Connections::admit`] closes the oldest connection that has not sent a
/// byte yet ([`Ticket::spoke`] was not called) and waits for its slot; with
/// none to close, it waits for any slot to free up.
#[derive(Debug)]
pub struct Connections {
    max: usize,
    state: Mutex<Slots>,
    freed: Notify,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Slots {
    open: usize,
    next_id: u64,
    /// Connections that have not sent a byte, oldest first, with the
    /// notification that closes them.
    silent: BTreeMap<u64, Arc<Notify>>,
    /// Connections asked to make room that have not closed yet: while one
    /// is on its way out, no other is evicted.
    leaving: std::collections::BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    evicted: AtomicU64,
    paused: AtomicU64,
    header_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
}

/// A snapshot of [`Connections`]' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: usize,
    /// The cap.
    pub max: usize,
    /// Connections admitted so far.
    pub accepted: u64,
    /// Silent connections closed to make room for a new one.
    pub evicted: u64,
    /// Times accepting paused because every slot was busy.
    pub paused: u64,
    /// Connections cut because a request head was not complete in time.
    pub header_timeouts: u64,
    /// Connections closed after the idle timeout (idle between requests, or
    /// a client not reading its response).
    pub idle_timeouts: u64,
}

impl Connections {
    /// A limit of `max` concurrent connections (at least 1).
    pub fn new(max: usize) -> Arc<Connections> {
        Arc::new(Connections {
            max: max.max(1),
            state: Mutex::new(Slots::default()),
            freed: Notify::new(),
            counters: Counters::default(),
        })
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The counters.
    pub fn stats(&self) -> ConnectionStats {
        let open = self.slots().open;
        let c = &self.counters;
        ConnectionStats {
            open,
            max: self.max,
            accepted: c.accepted.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            paused: c.paused.load(Ordering::Relaxed),
            header_timeouts: c.header_timeouts.load(Ordering::Relaxed),
            idle_timeouts: c.idle_timeouts.load(Ordering::Relaxed),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // The lock guards plain counters and a map; a panic while holding it
        // cannot leave them inconsistent in a way that matters more than
        // refusing to serve.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a connection closed because its client took longer than the
    /// header timeout to send a request head (for servers of their own
    /// that share these counters, such as a proxy).
    pub fn count_header_timeout(&self) {
        self.counters
            .header_timeouts
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection closed after the idle timeout.
    pub fn count_idle_timeout(&self) {
        self.counters.idle_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Completes once no connection is open.
    pub async fn closed(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.slots().open == 0 {
                return;
            }
            freed.await;
        }
    }

    /// A slot for a connection already accepted when the server stops
    /// accepting: it is served even above the cap (one per listener at
    /// most), rather than dropped.
    pub fn admit_over_cap(self: &Arc<Self>) -> Ticket {
        let mut slots = self.slots();
        slots.open += 1;
        slots.next_id += 1;
        let id = slots.next_id;
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        Ticket {
            connections: Arc::clone(self),
            id,
            evict: Arc::new(Notify::new()),
        }
    }

    /// A slot for one connection: at once below the cap; at the cap, after
    /// the oldest silent connection was closed, or after any connection
    /// ended.
    pub async fn admit(self: &Arc<Self>) -> Ticket {
        let mut paused = false;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so no release can slip in between.
            freed.as_mut().enable();
            {
                let mut slots = self.slots();
                if slots.open < self.max {
                    slots.open += 1;
                    slots.next_id += 1;
                    let id = slots.next_id;
                    let evict = Arc::new(Notify::new());
                    slots.silent.insert(id, Arc::clone(&evict));
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    return Ticket {
                        connections: Arc::clone(self),
                        id,
                        evict,
                    };
                }
                if !slots.leaving.is_empty() {
                    // A slot is about to be freed.
                } else if let Some((id, evict)) = slots.silent.pop_first() {
                    slots.leaving.insert(id);
                    evict.notify_one();
                } else if !paused {
                    paused = true;
                    self.counters.paused.fetch_add(1, Ordering::Relaxed);
                }
            }
            freed.await;
        }
    }
}

/// One connection's slot in [`Connections`]; freed when dropped.
#[derive(Debug)]
pub struct Ticket {
    connections: Arc<Connections>,
    id: u64,
    evict: Arc<Notify>,
}

impl Ticket {
    /// The client sent something: it is no longer a candidate for eviction.
    /// If it had just been chosen to make room, it declines (it is not
    /// silent after all) and the admission waiting for room chooses another.
    pub fn spoke(&self) {
        let declined = {
            let mut slots = self.connections.slots();
            slots.silent.remove(&self.id);
            slots.leaving.remove(&self.id)
        };
        if declined {
            self.connections.freed.notify_waiters();
        }
    }

    /// Completes when this connection was chosen to make room.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut slots = self.connections.slots();
            slots.open = slots.open.saturating_sub(1);
            slots.silent.remove(&self.id);
            if slots.leaving.remove(&self.id) {
                // Asked to make room, and did not decline.
                self.connections
                    .counters
                    .evicted
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        // Every waiting admission looks again (each registered before it
        // looked, so none misses this): one takes the slot, the others may
        // have a silent connection to ask to leave.
        self.connections.freed.notify_waiters();
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// Serves `service` on every listener until `shutdown` completes, then drains
/// as the [module docs](self) describe and returns. Uses the default
/// [`Options`] with `drain`.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// use baton::serve::{AsyncListener, Drain, serve};
/// use hyper::{Response, service::service_fn};
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let hello = service_fn(|_req| async {
///     Ok::<_, std::convert::Infallible>(Response::new("hello\n".to_owned()))
/// });
/// let shutdown = baton::shutdown::signal()?;
/// serve([AsyncListener::from(listener)], hello, async { shutdown.await; }, Drain::default()).await?;
/// # Ok(()) }
/// ```
pub async fn serve<S, B>(
    listeners: impl IntoIterator<Item = AsyncListener>,
    service: S,
    shutdown: impl Future<Output = ()>,
    drain: Drain,
) -> io::Result<DrainReport>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    serve_with(listeners, service, shutdown, Options::from(drain)).await
}

/// [`serve`] with explicit [`Options`]: timeouts and a connection limit.
pub async fn serve_with<S, B>(
    listeners: impl IntoIterator<Item = AsyncListener>,
    service: S,
    shutdown: impl Future<Output = ()>,
    options: Options,
) -> io::Result<DrainReport>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (draining_tx, draining) = watch::channel(false);
    let mut acceptors = JoinSet::new();
    for listener in listeners {
        acceptors.spawn(accept_loop(
            listener,
            service.clone(),
            draining.clone(),
            options.clone(),
        ));
    }
    shutdown.await;
    // Ignore the error: it only means every acceptor already ended.
    let _ = draining_tx.send(true);
    let mut report = DrainReport::default();
    while let Some(done) = acceptors.join_next().await {
        let part = done.map_err(io::Error::other)?;
        report.connections += part.connections;
        report.cut_at_deadline += part.cut_at_deadline;
    }
    Ok(report)
}

/// Serves an axum `Router` with [`serve`]'s drain (feature `axum`).
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// use baton::serve::{AsyncListener, Drain, serve_router};
///
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let shutdown = baton::shutdown::signal()?;
/// serve_router([AsyncListener::from(listener)], app, async { shutdown.await; }, Drain::default()).await?;
/// # Ok(()) }
/// ```
#[cfg(feature = "axum")]
pub async fn serve_router(
    listeners: impl IntoIterator<Item = AsyncListener>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
    drain: Drain,
) -> io::Result<DrainReport> {
    serve_router_with(listeners, router, shutdown, Options::from(drain)).await
}

/// [`serve_router`] with explicit [`Options`] (feature `axum`).
#[cfg(feature = "axum")]
pub async fn serve_router_with(
    listeners: impl IntoIterator<Item = AsyncListener>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
    options: Options,
) -> io::Result<DrainReport> {
    let service = hyper_util::service::TowerToHyperService::new(router);
    serve_with(listeners, service, shutdown, options).await
}

/// Accepts on one listener until draining starts, then waits for its
/// connections to finish, up to the drain deadline.
async fn accept_loop<S, B>(
    listener: AsyncListener,
    service: S,
    draining: watch::Receiver<bool>,
    options: Options,
) -> DrainReport
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut conns = JoinSet::new();
    let mut report = DrainReport::default();
    let mut watch_drain = draining.clone();
    let serve_one = |conns: &mut JoinSet<()>, stream: Stream, ticket: Ticket| {
        if let Stream::Tcp(s) = &stream {
            // Latency matters more than packet count for request/response.
            let _ = s.set_nodelay(true);
        }
        conns.spawn(connection(
            stream,
            ticket,
            service.clone(),
            draining.clone(),
            options.clone(),
        ));
    };
    let mut listener = Acceptor::new(listener).ok();
    'accepting: while let Some(current) = listener.as_mut() {
        // Accept first, then wait for a slot: at the limit, only a client
        // that is really waiting makes a silent one give way. A connection
        // once accepted is never dropped unserved: not when another one
        // ends, and not when the drain starts (it is served over the cap).
        let accepted = tokio::select! {
            biased;
            () = drained(&mut watch_drain) => break,
            // Finished connections are reaped as they end, so that their
            // memory goes at once (accept is cancel-safe).
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = current.accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            // Out of fds, a connection reset before accept, or a listener
            // shut down until the supervisor re-arms it: back off briefly
            // instead of spinning, and keep serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        report.connections += 1;
        let ticket = tokio::select! {
            biased;
            ticket = options.connections.admit() => ticket,
            () = drained(&mut watch_drain) => {
                serve_one(&mut conns, stream, options.connections.admit_over_cap());
                break 'accepting;
            }
        };
        serve_one(&mut conns, stream, ticket);
    }
    // Stop accepting: close this process's copy of the listening socket. The
    // supervisor's copy keeps the socket (and its queue) alive.
    drop(listener);
    let deadline = tokio::time::sleep(options.drain.deadline);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = conns.join_next() => if next.is_none() { break },
            _ = &mut deadline => {
                report.cut_at_deadline = conns.len();
                conns.abort_all();
                break;
            }
        }
    }
    report
}

/// Completes once draining has begun (or the server is gone).
async fn drained(draining: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means "stop".
    let _ = draining.wait_for(|d| *d).await;
}

/// Serves one connection: waits (cheaply) for its first byte, then hands it
/// to hyper under the timeouts of [`Options`].
async fn connection<S, B>(
    stream: Stream,
    ticket: Ticket,
    service: S,
    mut draining: watch::Receiver<bool>,
    options: Options,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let born = Instant::now();
    // Until the first byte: no hyper state at all. Bounded by the header
    // timeout, by eviction at the connection limit, and by the idle grace
    // once draining.
    // Most clients send their request with (or right after) the handshake:
    // then there is nothing to wait for.
    let spoke =
        stream.has_data() || first_byte(&stream, &ticket, &options, &mut draining, born).await;
    if !spoke {
        return;
    }
    ticket.spoke();
    // Boxed, so that a silent connection's task stays small.
    Box::pin(exchange(stream, ticket, born, service, draining, options)).await;
}

/// Waits for a connection's first byte, holding nothing but the socket:
/// `false` if the connection should close unserved instead. The wait is
/// bounded by the header timeout from `born` (the accept; counted), by
/// eviction at the connection cap (unless the request arrived meanwhile),
/// and by the drain's idle grace once `draining` turns true.
pub async fn first_byte(
    stream: &impl FirstByte,
    ticket: &Ticket,
    options: &Options,
    draining: &mut watch::Receiver<bool>,
    born: Instant,
) -> bool {
    let header_deadline = options.header_timeout.and_then(|t| born.checked_add(t));
    let mut grace_over: Option<Instant> = None;
    loop {
        tokio::select! {
            ready = stream.readable() => return ready.is_ok(),
            () = sleep_until_opt(header_deadline) => {
                options.connections.count_header_timeout();
                return false;
            }
            // Chosen to make room: unless its request arrived meanwhile.
            () = ticket.evicted() => return stream.has_data(),
            () = drained(draining), if grace_over.is_none() => {
                grace_over = Instant::now().checked_add(options.drain.idle_grace);
                if grace_over.is_none() {
                    return false;
                }
            }
            () = sleep_until_opt(grace_over) => return false,
        }
    }
}

/// The HTTP part of a connection's life.
async fn exchange<S, B>(
    stream: Stream,
    ticket: Ticket,
    born: Instant,
    service: S,
    mut draining: watch::Receiver<bool>,
    options: Options,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let peer = stream.peer_addr().map(PeerAddr);
    let activity = Arc::new(Activity::new(born));
    // The first request's head is timed from the accept.
    activity.head_nanos.store(0, Ordering::Relaxed);
    let tracked = Tracked {
        inner: service,
        activity: Arc::clone(&activity),
        draining: draining.clone(),
        peer,
    };
    let io = Timed {
        inner: stream,
        activity: Arc::clone(&activity),
        // The slot goes with the socket, through an upgrade too.
        _ticket: ticket,
    };
    let mut builder = http1::Builder::new();
    builder.half_close(options.half_close);
    let conn = builder
        .serve_connection(TokioIo::new(io), tracked)
        .with_upgrades();
    tokio::pin!(conn);
    loop {
        let now = Instant::now();
        let wake = match activity.expired(now, &options) {
            Expiry::Now(which) => {
                let counter = match which {
                    Which::Header => &options.connections.counters.header_timeouts,
                    Which::Idle => &options.connections.counters.idle_timeouts,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                // Idle: hyper closes an idle connection at once and lets a
                // request that just started finish. A stalled head or a
                // client that does not read is cut.
                if which == Which::Idle && activity.is_idle() {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
                return;
            }
            Expiry::At(at) => Some(at),
            Expiry::Never => None,
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            () = sleep_until_opt(wake) => {}
            () = drained(&mut draining) => break,
        }
    }
    // Draining. Every connection gets the full grace from the start of the
    // drain, even one that was idle long before.
    activity.touch();
    let idle_grace = options.drain.idle_grace;
    loop {
        let wait = match activity.idle_for() {
            Some(idle) if idle >= idle_grace => {
                conn.as_mut().graceful_shutdown();
                break;
            }
            Some(idle) => idle_grace - idle,
            None => idle_grace,
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    let _ = conn.await;
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// "Not set" for the timestamps of [`Activity`].
const UNSET: u64 = u64::MAX;

/// What a connection is doing, shared by its I/O, its service and its task.
/// Times are nanoseconds after `born`.
#[derive(Debug)]
struct Activity {
    born: Instant,
    /// Requests in flight: from the end of the head to the end of the
    /// response body.
    in_flight: AtomicUsize,
    /// The last request start or response end.
    last_nanos: AtomicU64,
    /// When the first byte of the next request head arrived (with nothing
    /// in flight), or [`UNSET`].
    head_nanos: AtomicU64,
    /// Since when writes to the client have been blocked, or [`UNSET`].
    blocked_nanos: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Header,
    Idle,
}

#[derive(Debug)]
enum Expiry {
    Now(Which),
    At(Instant),
    Never,
}

impl Activity {
    fn new(born: Instant) -> Activity {
        Activity {
            born,
            in_flight: AtomicUsize::new(0),
            last_nanos: AtomicU64::new(0),
            head_nanos: AtomicU64::new(UNSET),
            blocked_nanos: AtomicU64::new(UNSET),
        }
    }

    fn nanos(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(UNSET - 1)
    }

    fn at(&self, nanos: u64) -> Instant {
        // `nanos` was measured from `born`, so this is a past instant.
        self.born
            .checked_add(Duration::from_nanos(nanos))
            .unwrap_or(self.born)
    }

    fn touch(&self) {
        self.last_nanos.store(self.nanos(), Ordering::Relaxed);
    }

    /// Marks the start of a request head, if none is under way.
    fn head_started(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            let _ = self.head_nanos.compare_exchange(
                UNSET,
                self.nanos(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// No request in flight and no byte of a new one.
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_nanos.load(Ordering::Relaxed) == UNSET
    }

    /// `None` while a request is in flight, else how long it has been idle.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed));
        Some(self.born.elapsed().saturating_sub(last))
    }

    /// Whether a timeout of `options` has run out, or when to look again.
    fn expired(&self, now: Instant, options: &Options) -> Expiry {
        let deadline = |since: u64, timeout: Option<Duration>, which| match timeout {
            None => Expiry::Never,
            Some(t) => match self.at(since).checked_add(t) {
                Some(at) if now >= at => Expiry::Now(which),
                Some(at) => Expiry::At(at),
                None => Expiry::Never,
            },
        };
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            // A request is being served: only a client that does not read
            // its response counts. Blocked writes are not signalled to the
            // task, so look again at a quarter of the timeout.
            let Some(idle) = options.idle_timeout else {
                return Expiry::Never;
            };
            let blocked = self.blocked_nanos.load(Ordering::Relaxed);
            if blocked != UNSET
                && let Expiry::Now(which) = deadline(blocked, Some(idle), Which::Idle)
            {
                return Expiry::Now(which);
            }
            return match now.checked_add((idle / 4).max(Duration::from_millis(100))) {
                Some(at) => Expiry::At(at),
                None => Expiry::Never,
            };
        }
        let head = self.head_nanos.load(Ordering::Relaxed);
        if head != UNSET {
            return deadline(head, options.header_timeout, Which::Header);
        }
        // Idle. A new head may start at any moment without waking this
        // task, so look again within the header timeout: its deadline is
        // then known, and kept, to the millisecond.
        let idle = deadline(
            self.last_nanos.load(Ordering::Relaxed),
            options.idle_timeout,
            Which::Idle,
        );
        let look_again = options.header_timeout.and_then(|t| now.checked_add(t));
        match (idle, look_again) {
            (Expiry::At(at), Some(again)) => Expiry::At(at.min(again)),
            (Expiry::Never, Some(again)) => Expiry::At(again),
            (idle, _) => idle,
        }
    }
}

/// The client's socket, noting reads (a new head starting) and blocked
/// writes (a client not reading) in [`Activity`].
struct Timed {
    inner: Stream,
    activity: Arc<Activity>,
    _ticket: Ticket,
}

impl AsyncRead for Timed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.head_started();
        }
        polled
    }
}

impl Timed {
    fn note_write<T>(&self, polled: &Poll<io::Result<T>>) {
        let blocked = &self.activity.blocked_nanos;
        if polled.is_pending() {
            if blocked.load(Ordering::Relaxed) == UNSET {
                blocked.store(self.activity.nanos(), Ordering::Relaxed);
            }
        } else if blocked.load(Ordering::Relaxed) != UNSET {
            blocked.store(UNSET, Ordering::Relaxed);
        }
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.note_write(&polled);
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Marks a request in flight for as long as it lives.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.head_nanos.store(UNSET, Ordering::Relaxed);
        activity.touch();
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client's address, in every request's extensions (TCP listeners
/// only): `req.extensions().get::<PeerAddr>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Wraps the app's service: tracks activity, adds the peer address to each
/// request, and adds `Connection: close` to responses once draining has
/// begun.
#[derive(Debug)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    draining: watch::Receiver<bool>,
    peer: Option<PeerAddr>,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(peer);
        }
        let guard = InFlight::start(Arc::clone(&self.activity));
        let response = self.inner.call(req);
        let draining = self.draining.clone();
        Box::pin(async move {
            let mut response = response.await?;
            if *draining.borrow() {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            // The request stays in flight until its body is sent.
            Ok(response.map(|inner| TrackedBody {
                inner: Box::pin(inner),
                guard: Some(guard),
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is done.
#[derive(Debug)]
struct TrackedBody<B> {
    inner: Pin<Box<B>>,
    guard: Option<InFlight>,
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if frame.is_none() || this.inner.is_end_stream() {
            this.guard.take();
        }
        Poll::Ready(frame)
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

    /// `f`, which must complete within a generous bound.
    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("completed in time")
    }

    /// Lets every other task on this (current-thread) runtime run until it
    /// waits.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_silent_connection_makes_room() {
        let c = Connections::new(3);
        let oldest = c.admit().await;
        let talker = c.admit().await;
        talker.spoke();
        let younger = c.admit().await;
        let next = tokio::spawn({
            let c = Arc::clone(&c);
            async move { c.admit().await }
        });
        // The oldest silent one is asked to go; the one that spoke is not.
        within(oldest.evicted()).await;
        settle().await;
        assert!(!next.is_finished(), "admitted before a slot was free");
        drop(oldest);
        let admitted = within(next).await.expect("admission");
        let s = c.stats();
        assert_eq!((s.open, s.evicted, s.paused), (3, 1, 0));
        drop((talker, younger, admitted));
        assert_eq!(c.stats().open, 0);
    }

    #[tokio::test]
    async fn a_connection_chosen_to_make_room_that_spoke_meanwhile_stays() {
        let c = Connections::new(2);
        let first = c.admit().await;
        let second = c.admit().await;
        let next = tokio::spawn({
            let c = Arc::clone(&c);
            async move { c.admit().await }
        });
        within(first.evicted()).await;
        // Its request had arrived after all: it declines, and the next
        // silent one is asked instead.
        first.spoke();
        within(second.evicted()).await;
        drop(second);
        let _admitted = within(next).await.expect("admission");
        let s = c.stats();
        assert_eq!((s.open, s.evicted), (2, 1));
        drop(first);
    }

    #[tokio::test]
    async fn several_admissions_at_the_cap_each_make_room() {
        // One accept loop per listener and thread share a cap: two waiting
        // admissions must each get a silent connection to leave.
        let c = Connections::new(2);
        let first = c.admit().await;
        let second = c.admit().await;
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let c = Arc::clone(&c);
                tokio::spawn(async move { c.admit().await })
            })
            .collect();
        within(first.evicted()).await;
        drop(first);
        within(second.evicted()).await;
        drop(second);
        for w in waiters {
            let _admitted = within(w).await.expect("admission");
        }
        assert_eq!(c.stats().evicted, 2);
    }

    #[tokio::test]
    async fn with_nobody_silent_admission_waits_for_a_slot() {
        let c = Connections::new(1);
        let busy = c.admit().await;
        busy.spoke();
        let next = tokio::spawn({
            let c = Arc::clone(&c);
            async move { c.admit().await }
        });
        settle().await;
        assert!(!next.is_finished());
        assert_eq!(c.stats().paused, 1);
        drop(busy);
        let _admitted = within(next).await.expect("admission");
        assert_eq!(c.stats().accepted, 2);
    }

    #[test]
    fn timeouts_by_state() {
        let born = Instant::now();
        let options = Options {
            header_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(60)),
            ..Options::default()
        };
        let a = Activity::new(born);
        // Idle since "born": the idle timeout applies, looked at again within
        // the header timeout (a head may start unseen).
        assert!(
            matches!(a.expired(born, &options), Expiry::At(at) if at == born + Duration::from_secs(10))
        );
        assert!(matches!(
            a.expired(born + Duration::from_secs(55), &options),
            Expiry::At(at) if at == born + Duration::from_secs(60)
        ));
        assert!(matches!(
            a.expired(born + Duration::from_secs(60), &options),
            Expiry::Now(Which::Idle)
        ));
        // A head under way: the header timeout, from its first byte.
        a.head_nanos.store(0, Ordering::Relaxed);
        assert!(matches!(
            a.expired(born + Duration::from_secs(10), &options),
            Expiry::Now(Which::Header)
        ));
        // In flight: nothing runs out while the client reads.
        let guard = InFlight::start(Arc::new(Activity::new(born)));
        let busy = &guard.0;
        assert!(matches!(
            busy.expired(born + Duration::from_secs(3600), &options),
            Expiry::At(_)
        ));
        // ... but a client that stopped reading for the idle timeout is cut.
        busy.blocked_nanos.store(0, Ordering::Relaxed);
        assert!(matches!(
            busy.expired(born + Duration::from_secs(61), &options),
            Expiry::Now(Which::Idle)
        ));
        // No timeouts: never.
        let none = Options {
            header_timeout: None,
            idle_timeout: None,
            ..Options::default()
        };
        assert!(matches!(
            a.expired(born + Duration::from_secs(1 << 30), &none),
            Expiry::Never
        ));
    }
}
