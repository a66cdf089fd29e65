//! HTTP/2 in `--proxy http`: cleartext HTTP/2 by prior knowledge (h2c,
//! what gRPC clients speak) on the same port as HTTP/1, and the app
//! reached over h2c (`--upstream-protocol h2c`).
//!
//! A connection whose first bytes are the 24-byte HTTP/2 preface is
//! served here; the framing, flow control and HPACK are hyper's and the
//! `h2` crate's. Each stream is a request forwarded on its own: it goes to
//! the generation that is current when it starts, so a long-lived client
//! connection reaches every new generation, while the streams a retired
//! generation still answers finish there (its connection takes no new
//! one). With `--upstream-protocol h2c`, HTTP/1 clients are served here
//! too (hyper's HTTP/1 server): their requests are carried to the app as
//! HTTP/2 streams.
//!
//! What bounds a connection:
//! - at most [`MAX_STREAMS`] concurrent streams, a header list of at most
//!   [`MAX_HEADER_LIST`] bytes (however many CONTINUATION frames carry it);
//! - streams the client opens and resets at once (CVE-2023-44487): at most
//!   [`MAX_PENDING_RESETS`] pending, and at most [`MAX_ERROR_RESETS`] streams
//!   reset for the client's errors, then GOAWAY and close;
//! - a connection with no open stream for the idle timeout gets GOAWAY;
//!   the app must send an answer's head within the upstream timeout (504,
//!   or DEADLINE_EXCEEDED for gRPC); an answer's body may pause as long as
//!   it likes (gRPC streams do);
//! - at a stop and during `--shutdown-delay`, GOAWAY: streams in progress
//!   finish, new ones go elsewhere; a connection whose streams do not end
//!   is cut at the stop timeout.
//!
//! gRPC answers are judged by their `grpc-status` (in the trailers, or in
//! the head of a Trailers-Only answer): UNKNOWN, DEADLINE_EXCEEDED,
//! INTERNAL and UNAVAILABLE count as failed answers for `--bake`'s judge.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tracing::debug;

use super::conn_io::{ClientSocket, Stamp, sleep_until, stopped};
use super::frames::FrameWatch;
use super::route::{Proxy, UpstreamProtocol};
use super::senders::{self, Sender};
use super::socket::{Side, Socket};
use super::upstream::{Active, Upstream};
use baton::serve::Ticket;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Concurrent streams per client connection.
pub const MAX_STREAMS: u32 = 100;

/// The largest header list a client may send (as HTTP/1's head).
pub const MAX_HEADER_LIST: u32 = super::conn_io::MAX_HEAD as u32;

/// Streams a client opened and reset before they were served.
pub const MAX_PENDING_RESETS: usize = 20;

/// Streams reset for a client's protocol errors, per connection.
pub const MAX_ERROR_RESETS: usize = 256;

/// What a connection's first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Opening {
    /// The HTTP/2 preface.
    H2,
    /// Anything else: HTTP/1.
    Http1,
    /// A beginning of the preface: read more.
    Unsure,
}

/// What `first` (the first bytes a client sent) opens.
pub fn opening(first: &[u8]) -> Opening {
    let n = first.len().min(PREFACE.len());
    if first[..n] != PREFACE[..n] {
        Opening::Http1
    } else if n == PREFACE.len() {
        Opening::H2
    } else {
        Opening::Unsure
    }
}

/// Whether a relayed connection's first bytes are HTTP/2's: the whole
/// preface, or (a short first read) at least its request line.
pub fn opens_h2(first: &[u8]) -> bool {
    match opening(first) {
        Opening::H2 => true,
        Opening::Unsure => first.len() >= 16,
        Opening::Http1 => false,
    }
}

/// gRPC status codes that count as a failed answer.
const GRPC_FAILED: [u32; 4] = [2, 4, 13, 14];

/// gRPC's UNIMPLEMENTED, DEADLINE_EXCEEDED and UNAVAILABLE.
const GRPC_UNIMPLEMENTED: u32 = 12;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_UNAVAILABLE: u32 = 14;
const GRPC_INVALID_ARGUMENT: u32 = 3;

/// One client connection served by hyper.
#[derive(Debug)]
struct Conn {
    proxy: Arc<Proxy>,
    peer: Option<IpAddr>,
    local: Option<SocketAddr>,
    /// Streams (requests) open, and when the last one ended.
    open: AtomicUsize,
    last: Stamp,
    /// The client flooded control frames: the last stream it opened.
    flooded: std::sync::Mutex<Option<u32>>,
    /// This connection's own connection to an h2c app, and its generation.
    h2c: std::sync::Mutex<Option<(Arc<Upstream>, H2Sender)>>,
}

type H2Sender = hyper::client::conn::http2::SendRequest<Incoming>;

impl Conn {
    /// Its h2c connection to `upstream`, if it has one that is open.
    fn h2c_to(&self, upstream: &Arc<Upstream>) -> Option<Sender> {
        let kept = self.h2c.lock().ok()?;
        let (to, sender) = kept.as_ref()?;
        (Arc::ptr_eq(to, upstream) && !sender.is_closed()).then(|| Sender::H2(sender.clone()))
    }

    /// Keeps `sender`, a new h2c connection to `upstream`, for the next
    /// streams (the one it replaces closes once its streams are done).
    fn keep_h2c(&self, upstream: &Arc<Upstream>, sender: &H2Sender) {
        if let Ok(mut kept) = self.h2c.lock() {
            *kept = Some((Arc::clone(upstream), sender.clone()));
        }
    }
}

/// A stream counted open while alive.
#[derive(Debug)]
struct Open(Arc<Conn>);

impl Open {
    fn new(conn: &Arc<Conn>) -> Open {
        conn.open.fetch_add(1, Ordering::SeqCst);
        Open(Arc::clone(conn))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.last.touch();
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves one client connection with hyper: HTTP/2 (`h2`, the preface
/// is in `read` or still to come) or HTTP/1. `read` holds what was read
/// from the client so far.
pub async fn serve(
    socket: Socket,
    read: BytesMut,
    h2: bool,
    peer: Option<IpAddr>,
    ticket: Ticket,
    proxy: Arc<Proxy>,
    mut draining: watch::Receiver<bool>,
) {
    let _ticket = ticket;
    // hyper writes a head and a body apart, and HTTP/2 multiplexes small
    // frames: Nagle's algorithm would hold each second write for the
    // client's delayed ACK.
    Side(&socket).no_delay();
    let local = Side(&socket).local_addr();
    let conn = Arc::new(Conn {
        proxy,
        peer,
        local,
        open: AtomicUsize::new(0),
        last: Stamp::new(),
        flooded: std::sync::Mutex::new(None),
        h2c: std::sync::Mutex::new(None),
    });
    let socket = Arc::new(socket);
    let io = TokioIo::new(Rewind {
        read: read.freeze(),
        socket: Arc::clone(&socket),
        watch: h2.then(|| FrameWatch::new(PREFACE.len())),
        conn: Arc::clone(&conn),
    });
    let service = {
        let conn = Arc::clone(&conn);
        hyper::service::service_fn(move |request| {
            let conn = Arc::clone(&conn);
            async move { Ok::<_, Infallible>(forward(request, conn).await) }
        })
    };
    if h2 {
        let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
            .max_local_error_reset_streams(MAX_ERROR_RESETS)
            .initial_stream_window_size(super::conn_io::H2_STREAM_WINDOW)
            .initial_connection_window_size(super::conn_io::H2_CONNECTION_WINDOW)
            .serve_connection(io, service);
        drive(served, |c| c.graceful_shutdown(), &conn, &mut draining).await;
        flood_goaway(&conn, &socket).await;
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .max_buf_size(super::conn_io::MAX_HEAD)
            .max_headers(super::http::wire::MAX_HEADERS)
            .header_read_timeout(conn.proxy.limits.serve.header_timeout);
        let served = builder.serve_connection(io, service);
        drive(served, |c| c.graceful_shutdown(), &conn, &mut draining).await;
    }
}

/// Tells a client that flooded why its connection ends (hyper was stopped
/// by the flood before it could).
async fn flood_goaway(conn: &Conn, socket: &Socket) {
    let last = conn.flooded.lock().ok().and_then(|f| *f);
    if let Some(last) = last {
        debug!(
            last_stream = last,
            "closing an HTTP/2 connection that flooded control frames"
        );
        let goaway = super::frames::goaway_calm(last);
        let mut side = Side(socket);
        // Then what the client still sends is read and dropped (at most a
        // second and 1 MiB), so that the close is not a reset that takes
        // the GOAWAY with it.
        let linger = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            side.write_all(&goaway).await?;
            side.shutdown().await?;
            let (mut sink, mut total) = ([0u8; 16 * 1024], 0usize);
            while total < 1 << 20 {
                match side.read(&mut sink).await? {
                    0 => break,
                    n => total += n,
                }
            }
            Ok::<_, io::Error>(())
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), linger).await;
    }
}

/// Runs `served` to its end: GOAWAY (HTTP/1: close once idle) at a stop,
/// in the lame duck, or after the idle timeout with no stream open; cut
/// once the drain's deadline passed after that.
async fn drive<C: Future>(
    served: C,
    graceful: fn(Pin<&mut C>),
    conn: &Conn,
    draining: &mut watch::Receiver<bool>,
) {
    let mut served = std::pin::pin!(served);
    let options = &conn.proxy.limits.serve;
    let idle = options.idle_timeout;
    let mut ticks = super::slot::ticks();
    let mut closing: Option<Instant> = None;
    loop {
        if closing.is_none() && conn.proxy.lame_duck.load(Ordering::Relaxed) {
            graceful(served.as_mut());
            closing = Some(Instant::now());
        }
        let deadline = match closing {
            Some(since) => since.checked_add(options.drain.deadline),
            None => idle.and_then(|idle| conn.last.last().checked_add(idle)),
        };
        tokio::select! {
            _ = served.as_mut() => return,
            () = stopped(draining), if closing.is_none() => {
                graceful(served.as_mut());
                closing = Some(Instant::now());
            }
            () = tick(&mut ticks), if closing.is_none() => {}
            () = sleep_until(deadline) => {
                if closing.is_some() {
                    debug!("cutting an HTTP/2 connection whose streams outlived the drain");
                    return;
                }
                let quiet = idle.is_some_and(|idle| conn.last.last().elapsed() >= idle);
                if conn.open.load(Ordering::SeqCst) == 0 && quiet {
                    options.connections.count_idle_timeout();
                    graceful(served.as_mut());
                    closing = Some(Instant::now());
                } else if quiet {
                    // Streams are open: the idle clock starts again when
                    // the last one ends.
                    conn.last.touch();
                }
            }
        }
    }
}

/// The thread's next one-second tick (never, without one).
async fn tick(ticks: &mut Option<watch::Receiver<()>>) {
    match ticks {
        Some(t) => {
            if t.changed().await.is_err() {
                *ticks = None;
            }
        }
        None => std::future::pending().await,
    }
}

/// The body of an answer to a client: the app's, relayed, or baton's own.
type Out = Either<Relayed, Full<Bytes>>;

/// Forwards one request (an HTTP/2 stream, or an HTTP/1 request when the
/// app speaks h2c) to the current generation.
async fn forward(request: Request<Incoming>, conn: Arc<Conn>) -> Response<Out> {
    let open = Open::new(&conn);
    let proxy = &conn.proxy;
    let counters = &proxy.counters;
    let grpc = is_grpc(request.headers());
    let h2c = proxy.limits.upstream_protocol == UpstreamProtocol::H2c;
    if grpc && !h2c {
        return own_answer(
            grpc,
            StatusCode::BAD_GATEWAY,
            GRPC_UNIMPLEMENTED,
            "baton reaches this app over HTTP/1.1, which cannot carry gRPC: \
             run baton with --upstream-protocol h2c",
        );
    }
    let mut request = match rewrite(request, &conn, h2c) {
        Ok(request) => request,
        Err((status, why)) => return own_answer(grpc, status, GRPC_INVALID_ARGUMENT, why),
    };
    let Some((mut upstream, mut active)) = proxy.acquire().await else {
        counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
        return own_answer(
            grpc,
            StatusCode::SERVICE_UNAVAILABLE,
            GRPC_UNAVAILABLE,
            "no generation is serving",
        );
    };
    let (mut connect_retries, mut resent) = (0, false);
    loop {
        let sender = match (resent, h2c) {
            (true, _) => None,
            (false, true) => conn.h2c_to(&upstream),
            (false, false) => upstream.senders().take(),
        };
        let mut sender = match sender {
            Some(sender) => sender,
            None => match connect_under_cap(proxy, &upstream, h2c, !resent && !h2c).await {
                Ok(sender) => {
                    if let Sender::H2(new) = &sender {
                        conn.keep_h2c(&upstream, new);
                    }
                    sender
                }
                Err(e) => {
                    if proxy
                        .reroute(&mut upstream, &mut active, &mut connect_retries)
                        .await
                    {
                        continue;
                    }
                    let why = proxy.unreachable(&upstream, &e);
                    return own_answer(grpc, StatusCode::BAD_GATEWAY, GRPC_UNAVAILABLE, &why);
                }
            },
        };
        let timeout = proxy.limits.upstream_timeout;
        match tokio::time::timeout(timeout, sender.send(request)).await {
            Err(_) => {
                let why = proxy.timed_out(&upstream);
                return own_answer(
                    grpc,
                    StatusCode::GATEWAY_TIMEOUT,
                    GRPC_DEADLINE_EXCEEDED,
                    &why,
                );
            }
            Ok(Ok(answer)) => {
                let back = matches!(sender, Sender::H1(_)).then_some(sender);
                return relay(answer, upstream, active, back, grpc, open);
            }
            Ok(Err(failed)) => match *failed {
                (e, Some(unsent)) if !resent => {
                    // None of it reached the app (a kept connection it
                    // had closed): once more, on a new connection.
                    debug!(generation = upstream.generation, error = %e, "sending again on a new connection");
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    (request, resent) = (unsent, true);
                }
                (e, _) => {
                    upstream.record(true);
                    counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    let why = format!("generation {}: {}", upstream.generation, describe(&e));
                    return own_answer(grpc, StatusCode::BAD_GATEWAY, GRPC_UNAVAILABLE, &why);
                }
            },
        }
    }
}

/// A connection to `upstream`: a new one once the connection cap has room
/// for it, or (`reuse`) one of its kept ones given back meanwhile; within
/// the upstream timeout.
async fn connect_under_cap(
    proxy: &Proxy,
    upstream: &Upstream,
    h2c: bool,
    reuse: bool,
) -> io::Result<Sender> {
    let opening = async {
        loop {
            let returned = upstream.senders().returned();
            tokio::select! {
                ticket = proxy.connections().admit() => {
                    return senders::open(upstream.addr, h2c, ticket).await;
                }
                () = returned, if reuse => {
                    if let Some(sender) = upstream.senders().take() {
                        return Ok(sender);
                    }
                }
            }
        }
    };
    tokio::time::timeout(proxy.limits.upstream_timeout, opening)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no room for a connection to the app under the connection cap (--max-connections)",
            ))
        })
}

/// An error with its causes (hyper's own says only "http2 error").
fn describe(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Whether a request is gRPC.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Headers that belong to one connection (RFC 9113 §8.2.2), never passed
/// on: those named by `Connection`, and the usual hop-by-hop ones (`TE`
/// but `trailers`, which gRPC needs).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Why a request cannot be forwarded: the status and reason baton answers.
type Refused = (StatusCode, &'static str);

/// The host a request is for: its `:authority` (or absolute URI), which
/// wins over `Host` (RFC 9113 §8.3.1), else its one `Host`; checked to be
/// a host and port, nothing more (no user info, no path). `None`: neither
/// was sent.
fn authority_of(parts: &hyper::http::request::Parts) -> Result<Option<Authority>, Refused> {
    let hosts: Vec<&HeaderValue> = parts.headers.get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err((StatusCode::BAD_REQUEST, "more than one Host header"));
    }
    let given = match parts.uri.authority() {
        Some(a) => Some(a.as_str().to_owned()),
        None => hosts
            .first()
            .map(|h| h.to_str().map(str::to_owned))
            .transpose()
            .map_err(|_| (StatusCode::BAD_REQUEST, "a Host that is not text"))?,
    };
    let Some(given) = given else {
        return Ok(None);
    };
    match given.parse::<Authority>() {
        Ok(a) if !a.as_str().contains('@') && !a.host().is_empty() => Ok(Some(a)),
        _ => Err((
            StatusCode::BAD_REQUEST,
            "a Host that is not a host and port",
        )),
    }
}

/// The request as the app gets it: hop-by-hop headers out (and names with
/// an underscore, as on HTTP/1), forwarding headers in, `Host` from the
/// request's authority, in the app's version of HTTP.
fn rewrite(
    request: Request<Incoming>,
    conn: &Conn,
    h2c: bool,
) -> Result<Request<Incoming>, Refused> {
    let (mut parts, body) = request.into_parts();
    if parts.method == hyper::Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied"));
    }
    let authority = match authority_of(&parts)? {
        Some(a) => a,
        // HTTP/1.1 requires Host (RFC 9112 §3.2); an HTTP/1.0 request, or
        // an HTTP/2 one without `:authority`, is for the address it came to.
        None if parts.version == Version::HTTP_11 => {
            return Err((StatusCode::BAD_REQUEST, "no Host header"));
        }
        None => conn
            .local
            .and_then(|a| a.to_string().parse::<Authority>().ok())
            .unwrap_or_else(|| Authority::from_static("localhost")),
    };
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    if !conn.proxy.limits.keep_underscores {
        let odd: Vec<HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().contains('_'))
            .cloned()
            .collect();
        for name in odd {
            headers.remove(name);
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if let Some(ip) = conn.peer {
        forwarding(headers, ip, Some(authority.as_str()));
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    headers.remove(header::HOST);
    if h2c {
        // Built from its parts, never from text: the authority cannot
        // reach into the path.
        parts.version = Version::HTTP_2;
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|_| {
                (
                    StatusCode::BAD_REQUEST,
                    "a request target that is not a path",
                )
            })?;
    } else {
        parts.version = Version::HTTP_11;
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                "a Host that is not a host and port",
            )
        })?;
        headers.insert(header::HOST, host);
        parts.uri = Uri::from(path);
    }
    Ok(Request::from_parts(parts, body))
}

/// `X-Forwarded-For` and `Forwarded`: what the client sent, then this hop.
fn forwarding(headers: &mut HeaderMap, ip: IpAddr, host: Option<&str>) {
    let joined = |headers: &HeaderMap, name: &HeaderName| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| format!("{v}, "))
            .collect::<String>()
    };
    let xff = HeaderName::from_static("x-forwarded-for");
    let fwd = HeaderName::from_static("forwarded");
    let for_ = if ip.is_ipv6() {
        format!("for=\"[{ip}]\";proto=http")
    } else {
        format!("for={ip};proto=http")
    };
    // A quoted host only when it cannot break out of its quotes.
    let host = host
        .filter(|h| !h.contains(['"', '\\']))
        .map(|h| format!(";host=\"{h}\""))
        .unwrap_or_default();
    let xff_value = format!("{}{ip}", joined(headers, &xff));
    let fwd_value = format!("{}{for_}{host}", joined(headers, &fwd));
    headers.remove(&xff);
    headers.remove(&fwd);
    if let Ok(v) = HeaderValue::try_from(xff_value) {
        headers.insert(xff, v);
    }
    if let Ok(v) = HeaderValue::try_from(fwd_value) {
        headers.insert(fwd, v);
    }
}

/// The gRPC status in `headers`, if any.
fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Relays the app's answer; it is judged by its status, or (gRPC) by its
/// `grpc-status` when that comes.
fn relay(
    answer: Response<Incoming>,
    upstream: Arc<Upstream>,
    active: Active,
    back: Option<Sender>,
    grpc: bool,
    open: Open,
) -> Response<Out> {
    let (mut parts, body) = answer.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    let verdict = if parts.status.is_server_error() {
        Some(true)
    } else if grpc {
        grpc_status(&parts.headers).map(|s| GRPC_FAILED.contains(&s))
    } else {
        Some(false)
    };
    if let Some(failed) = verdict {
        upstream.record(failed);
    }
    let relayed = Relayed {
        body,
        upstream,
        active: Some(active),
        back,
        judged: verdict.is_some(),
        _open: open,
    };
    Response::from_parts(parts, Either::Left(relayed))
}

/// An answer of baton's own: for gRPC, Trailers-Only with a status and a
/// message; else the HTTP status and a line of text.
fn own_answer(grpc: bool, status: StatusCode, code: u32, why: &str) -> Response<Out> {
    let mut answer = if grpc {
        let mut answer = Response::new(Either::Right(Full::new(Bytes::new())));
        let headers = answer.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code));
        if let Ok(message) = HeaderValue::try_from(percent_encode(why)) {
            headers.insert("grpc-message", message);
        }
        answer
    } else {
        let mut answer = Response::new(Either::Right(Full::new(Bytes::from(format!(
            "{} {}: {why}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )))));
        *answer.status_mut() = status;
        answer.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        answer
    };
    answer
        .headers_mut()
        .insert("x-baton-error", HeaderValue::from_static("1"));
    answer
}

/// `grpc-message`'s percent-encoding (gRPC over HTTP/2: printable ASCII
/// but `%` as is).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The app's answer body, relayed: judged by its gRPC trailers; the
/// generation's connection (HTTP/1.1) is given back once it ended, and
/// the request stops counting as in flight.
struct Relayed {
    body: Incoming,
    upstream: Arc<Upstream>,
    active: Option<Active>,
    back: Option<Sender>,
    judged: bool,
    _open: Open,
}

impl Relayed {
    fn judge(&mut self, failed: bool) {
        if !self.judged {
            self.judged = true;
            self.upstream.record(failed);
        }
    }

    fn ended(&mut self) {
        if let Some(sender) = self.back.take() {
            self.upstream.senders().keep(sender);
        }
        self.active = None;
    }
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    // A gRPC answer's verdict (an answer judged by its
                    // HTTP status was judged at its head).
                    let failed = grpc_status(trailers).is_none_or(|s| GRPC_FAILED.contains(&s));
                    this.judge(failed);
                }
                // hyper asks no further once the body says it ended.
                if this.body.is_end_stream() {
                    this.judge(true);
                    this.ended();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.judge(true);
                this.back = None;
                this.active = None;
            }
            Poll::Ready(None) => {
                // A gRPC answer that ended without a status failed.
                this.judge(true);
                this.ended();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client socket, with what was read from it before hyper took it;
/// HTTP/2 frames are watched for floods on their way in.
struct Rewind {
    read: Bytes,
    socket: Arc<Socket>,
    watch: Option<FrameWatch>,
    conn: Arc<Conn>,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
        } else {
            std::task::ready!(this.socket.poll_read(cx, buf))?;
        }
        if let Some(watch) = &mut this.watch
            && watch.feed(&buf.filled()[before..], Instant::now())
        {
            if let Ok(mut flooded) = this.conn.flooded.lock() {
                *flooded = Some(watch.last_stream);
            }
            return Poll::Ready(Err(io::Error::other("control frame flood")));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut Side(&self.socket)).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut Side(&self.socket)).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut Side(&self.socket)).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut Side(&self.socket)).poll_shutdown(cx)
    }
}
