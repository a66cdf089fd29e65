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

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::task::JoinSet;

mod acceptor;
mod caps;
mod options;
mod timeouts;

pub use acceptor::{Acceptor, AsyncListener, FirstByte, Stream};
pub use caps::{ConnectionStats, Connections, Ticket};
pub use options::{Drain, DrainReport, Options};

type BoxError = Box<dyn StdError + Send + Sync>;
use timeouts::{Activity, Expiry, InFlight, Timed, Which};

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
                match which {
                    Which::Header => options.connections.count_header_timeout(),
                    Which::Idle => options.connections.count_idle_timeout(),
                }
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
