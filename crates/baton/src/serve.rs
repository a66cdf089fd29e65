//! Serving HTTP/1.1 with a lame-duck drain (feature `hyper`).
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
//! or (c) at the deadline. A client that stalls halfway through a request is
//! bounded by the deadline. Upgraded connections (WebSocket) leave hyper at
//! the upgrade: they are the app's to close, and end when the process exits.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
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

type BoxError = Box<dyn StdError + Send + Sync>;

/// Serves `service` on every listener until `shutdown` completes, then drains
/// as the [module docs](self) describe and returns.
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
    let (draining_tx, draining) = watch::channel(false);
    let mut acceptors = JoinSet::new();
    for listener in listeners {
        acceptors.spawn(accept_loop(
            listener,
            service.clone(),
            draining.clone(),
            drain,
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
    let service = hyper_util::service::TowerToHyperService::new(router);
    serve(listeners, service, shutdown, drain).await
}

/// Accepts on one listener until draining starts, then waits for its
/// connections to finish, up to the drain deadline.
async fn accept_loop<S, B>(
    listener: AsyncListener,
    service: S,
    draining: watch::Receiver<bool>,
    drain: Drain,
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
    loop {
        tokio::select! {
            biased;
            () = drained(&mut watch_drain) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = accept(&listener) => match accepted {
                Ok(Accepted::Tcp(stream)) => {
                    report.connections += 1;
                    // Latency matters more than packet count for request/response.
                    let _ = stream.set_nodelay(true);
                    let peer = stream.peer_addr().ok();
                    conns.spawn(connection(stream, peer, service.clone(), draining.clone(), drain.idle_grace));
                }
                Ok(Accepted::Unix(stream)) => {
                    report.connections += 1;
                    conns.spawn(connection(stream, None, service.clone(), draining.clone(), drain.idle_grace));
                }
                // Out of fds or a connection reset before accept: back off
                // briefly instead of spinning, and keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
    // Stop accepting: close this process's copy of the listening socket. The
    // supervisor's copy keeps the socket (and its queue) alive.
    drop(listener);
    let deadline = tokio::time::sleep(drain.deadline);
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

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &AsyncListener) -> io::Result<Accepted> {
    match listener {
        AsyncListener::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        AsyncListener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

/// Serves one connection; once draining starts, closes it only when it is
/// idle for `idle_grace` (or after a `Connection: close` response).
async fn connection<I, S, B>(
    io: I,
    peer: Option<SocketAddr>,
    service: S,
    mut draining: watch::Receiver<bool>,
    idle_grace: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity::new());
    let tracked = Tracked {
        inner: service,
        activity: Arc::clone(&activity),
        draining: draining.clone(),
        peer: peer.map(PeerAddr),
    };
    let conn = http1::Builder::new()
        .serve_connection(TokioIo::new(io), tracked)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = drained(&mut draining) => {}
    }
    // Every connection gets the full grace from the start of the drain, even
    // one that was idle long before.
    activity.touch();
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

/// When a connection last did something, and whether a request is in flight.
#[derive(Debug)]
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// Nanoseconds after `born` of the last request start or response end.
    last_nanos: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_nanos: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.store(nanos, Ordering::Relaxed);
    }

    /// `None` while a request is in flight, else how long it has been idle.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed));
        Some(self.born.elapsed().saturating_sub(last))
    }
}

/// Marks a request in flight for as long as it lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
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
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(peer);
        }
        let guard = InFlight::start(Arc::clone(&self.activity));
        let response = self.inner.call(req);
        let draining = self.draining.clone();
        Box::pin(async move {
            let mut response = response.await;
            if let Ok(response) = &mut response
                && *draining.borrow()
            {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            drop(guard);
            response
        })
    }
}
