//! `--proxy http`: an HTTP/1.1 reverse proxy in front of the current
//! generation.
//!
//! Each client connection is one task on its proxy thread. A request head
//! is parsed in place ([`wire`]), rewritten once (hop-by-hop headers out,
//! forwarding headers in) and sent to the current generation over a pooled
//! keep-alive connection; the answer's head is rewritten the same way and
//! its body relayed as it comes, with no copy of the body beyond the read
//! buffer it arrived in. Bodies stream both ways, framed by
//! `Content-Length` or chunked (relayed verbatim); `Upgrade` requests
//! (WebSocket) are spliced once both sides agreed (101). `Host` is kept;
//! `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` are added.
//!
//! What bounds a connection (`baton::serve::Options`):
//! - the first request head must arrive within the header timeout of the
//!   accept, a later one within the header timeout of its first byte; an
//!   idle keep-alive connection is closed after the idle timeout;
//! - a client that stops sending its body, or stops reading its answer, is
//!   cut after the idle timeout; the app must start answering within the
//!   upstream timeout of the end of the body (or of its last read of it),
//!   and keep the answer's body coming within it, or the client gets a 504
//!   (or, once the answer started, a closed connection);
//! - at a stop, answers carry `Connection: close` and idle connections are
//!   closed after the drain's idle grace.
//!
//! Retries: a request is sent again only when nothing of it can have
//! reached a generation (a refused connect: to the next generation, twice),
//! or, once, when it is idempotent, has no body, and the generation closed
//! the connection without answering.

pub mod wire;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::debug;

use super::conn_io::{
    Buffers, ClientSocket, ClientWriter, OpenStream, READ, Stamp, bounded, copy_both_ways,
    read_more, sleep_until, stopped, write_two,
};
use super::health::connect;
use super::pool::UpConn;
use super::route::Proxy;
use super::socket::{Side, Socket};
use super::upstream::Active;
use super::upstream::Upstream;
use baton::serve::{Acceptor, AsyncListener, Ticket};
use wire::{Chunked, Framing, Request};

pub use super::conn_io::MAX_HEAD;

/// Accepts on `listeners` and serves until `stop` turns true; then stops
/// accepting and drains: answers carry `Connection: close`, and each
/// connection ends after its request in flight (or after the idle grace).
pub async fn serve(listeners: Vec<AsyncListener>, proxy: Arc<Proxy>, stop: watch::Receiver<bool>) {
    let mut loops = JoinSet::new();
    for listener in listeners {
        loops.spawn(accept_loop(listener, Arc::clone(&proxy), stop.clone()));
    }
    while loops.join_next().await.is_some() {}
}

async fn accept_loop(listener: AsyncListener, proxy: Arc<Proxy>, stop: watch::Receiver<bool>) {
    let Ok(mut listener) = Acceptor::new(listener) else {
        return;
    };
    let mut conns = JoinSet::new();
    let mut watch = stop.clone();
    let tcp = !listener.is_unix();
    let spawn = |conns: &mut JoinSet<()>, fd, peer, ticket| {
        conns.spawn(connection(
            Socket::new(fd, tcp),
            peer,
            ticket,
            Arc::clone(&proxy),
            stop.clone(),
        ));
    };
    loop {
        // Accept first, then wait for a slot (see `baton::serve`): at the
        // cap the oldest silent connection makes room, and an accepted
        // connection is never dropped unserved.
        let accepted = tokio::select! {
            biased;
            () = stopped(&mut watch) => break,
            // Reaped as they end, so that their memory goes at once.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept_raw() => accepted,
        };
        let (fd, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let ticket = tokio::select! {
            biased;
            ticket = proxy.connections().admit() => ticket,
            () = stopped(&mut watch) => {
                spawn(&mut conns, fd, peer, proxy.connections().admit_over_cap());
                break;
            }
        };
        spawn(&mut conns, fd, peer, ticket);
    }
    // Stop accepting; baton's own copy keeps the socket and its queue.
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// One client connection: waits (holding no buffer) for its first byte,
/// then serves its requests.
async fn connection(
    socket: Socket,
    peer: Option<std::net::SocketAddr>,
    ticket: Ticket,
    proxy: Arc<Proxy>,
    mut draining: watch::Receiver<bool>,
) {
    let born = Instant::now();
    let options = &proxy.limits.serve;
    // Most clients send their request with the handshake: read it at once.
    let mut buffers = Buffers::take();
    match crate::sys::socket::recv_now(socket.fd(), &mut buffers.read) {
        Ok(0) => return,
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            // A silent connection holds no buffer while it waits.
            buffers.give_back();
            if !baton::serve::first_byte(&socket, &ticket, options, &mut draining, born).await {
                return;
            }
            buffers = Buffers::take();
        }
        Err(_) => return,
    }
    ticket.spoke();
    let peer = peer.map(|a| a.ip().to_canonical());
    // HTTP/2 by prior knowledge starts with its preface; with an h2c app,
    // HTTP/1 clients go through hyper too.
    let h2 = match read_opening(&socket, &mut buffers.read, &proxy, born).await {
        Some(h2) => h2,
        None => return,
    };
    if h2 || proxy.limits.upstream_protocol == super::route::UpstreamProtocol::H2c {
        let read = std::mem::take(&mut buffers.read);
        buffers.give_back();
        Box::pin(super::http2::serve(
            socket, read, h2, peer, ticket, proxy, draining,
        ))
        .await;
        return;
    }
    let side = Side(&socket);
    let client = Client::new(
        side,
        ClientWriter::new(side),
        buffers,
        peer,
        proxy,
        draining,
        born,
        ticket,
    );
    // Boxed, so that a silent connection's task stays small.
    Box::pin(client.run()).await;
}

/// Whether the connection opens with the HTTP/2 preface, reading on
/// while what came is a beginning of it (within the header timeout);
/// `None`: the client closed or stalled.
async fn read_opening(
    socket: &Socket,
    read: &mut BytesMut,
    proxy: &Proxy,
    born: Instant,
) -> Option<bool> {
    let deadline = proxy
        .limits
        .serve
        .header_timeout
        .and_then(|t| born.checked_add(t));
    let mut r = Side(socket);
    loop {
        match super::http2::opening(read) {
            super::http2::Opening::H2 => return Some(true),
            super::http2::Opening::Http1 => return Some(false),
            super::http2::Opening::Unsure => {}
        }
        tokio::select! {
            got = read_more(&mut r, read) => match got {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
            () = sleep_until(deadline) => {
                proxy.limits.serve.connections.count_header_timeout();
                return None;
            }
        }
    }
}

/// How an exchange ended for the client connection.
#[derive(Debug, PartialEq, Eq)]
enum After {
    /// Ready for the next request.
    KeepAlive,
    /// Close, the client having sent nothing more we know of.
    Close,
    /// Close, after reading (and dropping) what the client still sends, so
    /// that the answer is not lost to a reset.
    Linger,
}

/// How far a request's body got once the answer's head arrived.
enum Sent {
    /// All of it (or there was none).
    Done,
    /// Not all: the answer came first; the rest can still go.
    Rest(Body),
    /// The app stopped taking it.
    Refused,
}

/// Why a request got no answer from a generation.
enum Failed {
    /// The generation took too long (`--upstream-timeout`).
    Timeout,
    /// It closed the connection before a byte of an answer: the request may
    /// be sent again if it is safe to.
    Unanswered(io::Error),
    /// It answered with something that is not HTTP, or broke off.
    Bad(String),
    /// The client went away or stalled while sending its body.
    Client,
}

struct Client<R, W: ClientSocket> {
    r: R,
    w: ClientWriter<W>,
    /// Read from the client, not yet used.
    buf: BytesMut,
    /// The head being sent to the generation (kept for a replay).
    up_head: Vec<u8>,
    /// The head being sent to the client.
    out: Vec<u8>,
    /// Where the request head in `buf` ends, as far as it was looked at.
    head_end: wire::HeadEnd,
    hop: wire::Hop,
    proxy: Arc<Proxy>,
    draining: watch::Receiver<bool>,
    /// The accept, for the first head's timeout.
    born: Instant,
    served: u64,
    /// The end of the last answer, for the idle timeout.
    last: Instant,
    _ticket: Ticket,
}

impl<R, W: ClientSocket> Drop for Client<R, W> {
    fn drop(&mut self) {
        Buffers {
            read: std::mem::take(&mut self.buf),
            up_head: std::mem::take(&mut self.up_head),
            out: std::mem::take(&mut self.out),
        }
        .give_back();
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + ClientSocket + Unpin> Client<R, W> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        r: R,
        w: ClientWriter<W>,
        buffers: Buffers,
        peer: Option<IpAddr>,
        proxy: Arc<Proxy>,
        draining: watch::Receiver<bool>,
        born: Instant,
        ticket: Ticket,
    ) -> Self {
        Client {
            r,
            w,
            buf: buffers.read,
            up_head: buffers.up_head,
            out: buffers.out,
            head_end: wire::HeadEnd::default(),
            hop: wire::Hop {
                peer,
                keep_underscores: proxy.limits.keep_underscores,
            },
            proxy,
            draining,
            born,
            served: 0,
            last: born,
            _ticket: ticket,
        }
    }

    async fn run(mut self) {
        let after = loop {
            let request = match self.read_request().await {
                Ok(request) => request,
                Err(after) => break after,
            };
            let after = self.exchange(&request).await;
            self.served += 1;
            self.last = Instant::now();
            if after != After::KeepAlive {
                break after;
            }
            // A connection that is idle again keeps a small buffer only.
            if self.buf.is_empty() && self.buf.capacity() > 4 * READ {
                self.buf = BytesMut::new();
            }
        };
        if after == After::Linger {
            let _ = self.w.shutdown().await;
            // Bounded: at most a second and 1 MiB.
            let mut sink = 0usize;
            let linger = async {
                while sink < 1 << 20 {
                    self.buf.clear();
                    match read_more(&mut self.r, &mut self.buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => sink += n,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
        }
    }

    /// The next request head, parsed and rewritten into `up_head`, or how
    /// to close the connection (the client closed it, a timeout, a bad
    /// head: answered, then closed).
    async fn read_request(&mut self) -> Result<Request, After> {
        let proxy = Arc::clone(&self.proxy);
        let options = &proxy.limits.serve;
        // The first head is timed from the accept; a later one from its
        // first byte; an idle connection from the end of the last answer.
        let mut head_from = if self.served == 0 {
            Some(self.born)
        } else if !self.buf.is_empty() {
            Some(Instant::now())
        } else {
            None
        };
        let mut drain_at: Option<Instant> = None;
        // The buffer's front moved since the last head.
        self.head_end.reset();
        loop {
            if self.head_end.complete(&self.buf) {
                match wire::parse_request(&self.buf, self.hop, &mut self.up_head) {
                    Ok(Some(request)) if request.head_len <= MAX_HEAD => {
                        self.buf.advance(request.head_len);
                        if request.needs_host {
                            wire::add_host(&mut self.up_head, self.w.local_addr());
                        }
                        return Ok(request);
                    }
                    Ok(Some(_)) => {
                        return Err(self.reject(431, "request head too large").await);
                    }
                    Ok(None) => {}
                    Err(why) => return Err(self.reject(why.status, why.reason).await),
                }
            }
            if self.buf.len() > MAX_HEAD {
                return Err(self.reject(431, "request head too large").await);
            }
            let deadline = match head_from {
                Some(from) => options.header_timeout.and_then(|t| from.checked_add(t)),
                None => {
                    let idle = options.idle_timeout.and_then(|t| self.last.checked_add(t));
                    match drain_at.and_then(|at| at.checked_add(options.drain.idle_grace)) {
                        Some(grace) => Some(idle.map_or(grace, |idle| idle.min(grace))),
                        None => idle,
                    }
                }
            };
            let draining_now = head_from.is_none() && drain_at.is_none();
            tokio::select! {
                read = read_more(&mut self.r, &mut self.buf) => match read {
                    Ok(0) | Err(_) => return Err(After::Close),
                    Ok(_) => {
                        if head_from.is_none() {
                            head_from = Some(Instant::now());
                        }
                    }
                },
                () = sleep_until(deadline) => {
                    if head_from.is_some() {
                        options.connections.count_header_timeout();
                    } else if drain_at.is_none() {
                        options.connections.count_idle_timeout();
                    }
                    return Err(After::Close);
                }
                () = stopped(&mut self.draining), if draining_now => {
                    drain_at = Some(Instant::now());
                }
            }
        }
    }

    /// Answers a request that cannot be served; the connection then
    /// closes (after what else the client sent).
    async fn reject(&mut self, status: u16, why: &str) -> After {
        wire::error_response(&mut self.out, status, why, true, false);
        let limit = self.proxy.limits.serve.idle_timeout;
        match bounded(limit, self.w.write_all(&self.out)).await {
            Ok(()) => After::Linger,
            Err(_) => After::Close,
        }
    }

    /// Sends an answer of baton's own (an error) to the client.
    async fn answer_error(
        &mut self,
        request: &Request,
        status: u16,
        why: &str,
        body_read: bool,
    ) -> After {
        let close = !body_read || self.closing(request);
        wire::error_response(&mut self.out, status, why, close, request.head_method);
        let limit = self.proxy.limits.serve.idle_timeout;
        if bounded(limit, self.w.write_all(&self.out)).await.is_err() {
            return After::Close;
        }
        match (close, body_read) {
            (false, _) => After::KeepAlive,
            (true, true) => After::Close,
            (true, false) => After::Linger,
        }
    }

    /// Whether this answer closes the connection: the client asked, or
    /// baton is stopping.
    fn closing(&self, request: &Request) -> bool {
        request.close || self.proxy.lame_duck.load(Ordering::Relaxed) || *self.draining.borrow()
    }

    /// Forwards one request and relays its answer.
    async fn exchange(&mut self, request: &Request) -> After {
        let proxy = Arc::clone(&self.proxy);
        let counters = &proxy.counters;
        let Some((mut upstream, mut active)) = proxy.acquire().await else {
            counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
            let body_read = request.framing == Framing::None;
            return self
                .answer_error(request, 503, "no generation is serving", body_read)
                .await;
        };
        let (mut connect_retries, mut replayed, mut fresh) = (0, false, false);
        loop {
            let pooled = if fresh {
                None
            } else {
                upstream.pool().checkout()
            };
            fresh = false;
            let mut conn = match pooled {
                Some(conn) => conn,
                None => match connect(upstream.addr).await {
                    Ok(stream) => UpConn::new(stream),
                    Err(e) => {
                        if proxy
                            .reroute(&mut upstream, &mut active, &mut connect_retries)
                            .await
                        {
                            continue;
                        }
                        let why = proxy.unreachable(&upstream, &e);
                        let body_read = request.framing == Framing::None;
                        return self.answer_error(request, 502, &why, body_read).await;
                    }
                },
            };
            let sent = if replayed {
                self.send_bodiless(&mut conn, request.http10).await
            } else {
                self.send(&mut conn, request).await
            };
            let sent = match sent {
                Ok(sent) => sent,
                Err(failed) => {
                    let body_read = request.framing == Framing::None || replayed;
                    let why = match failed {
                        Failed::Client => return After::Close,
                        Failed::Timeout => {
                            let why = proxy.timed_out(&upstream);
                            return self.answer_error(request, 504, &why, body_read).await;
                        }
                        Failed::Unanswered(e) if request.replayable && !replayed => {
                            debug!(generation = upstream.generation, error = %e, "retrying a request no generation answered");
                            replayed = true;
                            counters.retries.fetch_add(1, Ordering::Relaxed);
                            let failed = Arc::clone(&upstream);
                            drop(active);
                            let Some((next, entered)) = proxy.acquire().await else {
                                counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
                                return self
                                    .answer_error(request, 502, "no generation is serving", true)
                                    .await;
                            };
                            // The same generation (a stale keep-alive
                            // connection): at once, on a new connection.
                            fresh = Arc::ptr_eq(&next, &failed);
                            (upstream, active) = (next, entered);
                            continue;
                        }
                        Failed::Unanswered(e) => e.to_string(),
                        Failed::Bad(why) => why,
                    };
                    upstream.record(true);
                    counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    let why = format!("generation {}: {why}", upstream.generation);
                    return self.answer_error(request, 502, &why, body_read).await;
                }
            };
            return self.respond(request, conn, upstream, active, sent).await;
        }
    }

    /// Sends the request (head, then body as it comes) and reads the head
    /// of the answer into `conn.buf`, relaying informational (1xx) answers.
    /// Returns how far the body got.
    async fn send(&mut self, conn: &mut UpConn, request: &Request) -> Result<Sent, Failed> {
        if request.framing == Framing::None {
            return self.send_bodiless(conn, request.http10).await;
        }
        let timeout = self.proxy.limits.upstream_timeout;
        let stall = self.proxy.limits.serve.idle_timeout;
        let mut state = Body::new(request.framing);
        let (answered, sent) = {
            let Client {
                r, w, buf, up_head, ..
            } = &mut *self;
            let (mut up_r, mut up_w) = conn.stream.split();
            // When the body last moved to the app.
            let progress = Stamp::new();
            let state = &mut state;
            let body = async {
                up_w.write_all(up_head).await.map_err(|e| (true, e))?;
                progress.touch();
                relay_body(r, buf, &mut up_w, state, stall, timeout, &progress).await
            };
            let head = read_head(&mut up_r, &mut conn.buf, w, request.http10);
            tokio::pin!(body, head);
            let mut sent = None;
            loop {
                // The app's time to answer runs from the end of the body,
                // or from the last part it took.
                let deadline = progress.last().checked_add(timeout);
                tokio::select! {
                    done = &mut body, if sent.is_none() => match done {
                        Ok(()) => {
                            sent = Some(Sent::Done);
                            progress.touch();
                        }
                        // The client stalled or went away.
                        Err((false, _)) => return Err(Failed::Client),
                        // The app stopped taking the body: its answer, if
                        // any, still counts.
                        Err((true, _)) => sent = Some(Sent::Refused),
                    },
                    answered = &mut head => break (answered, sent),
                    () = sleep_until(deadline) => {
                        if progress.last().checked_add(timeout).is_some_and(|at| at <= Instant::now()) {
                            return Err(Failed::Timeout);
                        }
                    }
                }
            }
        };
        // An answer before the end of the body: the rest goes on beside it.
        answered.map(|()| sent.unwrap_or(Sent::Rest(state)))
    }

    /// Sends the head alone and reads the answer's head.
    async fn send_bodiless(&mut self, conn: &mut UpConn, http10: bool) -> Result<Sent, Failed> {
        let timeout = self.proxy.limits.upstream_timeout;
        if let Err(e) = conn.stream.write_all(&self.up_head).await {
            return Err(Failed::Unanswered(e));
        }
        let (mut up_r, _) = conn.stream.split();
        let head = read_head(&mut up_r, &mut conn.buf, &mut self.w, http10);
        match tokio::time::timeout(timeout, head).await {
            Ok(answered) => answered.map(|()| Sent::Done),
            Err(_) => Err(Failed::Timeout),
        }
    }

    /// Passes the generation's answer on; the connection goes back to the
    /// pool once its body has been relayed in full.
    async fn respond(
        &mut self,
        request: &Request,
        mut conn: UpConn,
        upstream: Arc<Upstream>,
        active: Active,
        sent: Sent,
    ) -> After {
        let proxy = Arc::clone(&self.proxy);
        // An answer that came before the end of the body closes the client
        // connection unless the rest of the body then arrives in full.
        let body_done = matches!(sent, Sent::Done);
        let close = !body_done || self.closing(request);
        // The connection to the app is reused only when its exchange
        // ended: the whole body went before the answer came (and, with
        // `--close-after-body`, there was none: an app that answers without
        // reading a body takes it as the next request).
        let reuse =
            body_done && (request.framing == Framing::None || !proxy.limits.close_after_body);
        let response = match wire::parse_response(
            &conn.buf,
            request,
            upstream.generation,
            close,
            &mut self.out,
        ) {
            Ok(Some(response)) => response,
            // `read_head` returns only once a head is complete and valid.
            Ok(None) | Err(_) => {
                upstream.record(true);
                proxy
                    .counters
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                return self
                    .answer_error(
                        request,
                        502,
                        "the generation's answer is not HTTP",
                        body_done,
                    )
                    .await;
            }
        };
        conn.buf.advance(response.head_len);
        upstream.record(response.status >= 500);
        let stall = proxy.limits.serve.idle_timeout;
        if response.status == 101 && request.upgrade {
            // Head and whatever followed it, then the two streams spliced.
            if bounded(stall, write_two(&mut self.w, &self.out, &conn.buf))
                .await
                .is_err()
            {
                return After::Close;
            }
            conn.buf.clear();
            let _open = OpenStream::new(&proxy.counters.open_streams);
            let _active = active;
            // What the client sent after its handshake goes first; then a
            // relay as in tcp mode (half-close, `--idle-timeout`).
            if bounded(stall, conn.stream.write_all(&self.buf))
                .await
                .is_err()
            {
                return After::Close;
            }
            self.buf.clear();
            copy_both_ways(
                &mut self.r,
                &mut self.w,
                &mut conn.stream,
                proxy.limits.serve.idle_timeout,
                &proxy.counters.idle_relays,
                |_| {},
            )
            .await;
            return After::Close;
        }
        // Head and the first part of the body in one write; the rest of
        // the request's body, if any, alongside (some apps answer as they
        // read).
        let timeout = proxy.limits.upstream_timeout;
        let (mut up_r, mut up_w) = conn.stream.split();
        let answer = relay_first_and_rest(
            &mut self.w,
            &self.out,
            &mut up_r,
            &mut conn.buf,
            response.framing,
            response.dechunk,
            Some(timeout),
            stall,
        );
        let (relayed, body_done) = match sent {
            Sent::Rest(mut state) => {
                let moved = Stamp::new();
                let rest = relay_body(
                    &mut self.r,
                    &mut self.buf,
                    &mut up_w,
                    &mut state,
                    stall,
                    timeout,
                    &moved,
                );
                let (relayed, rest) = tokio::join!(answer, rest);
                (relayed, rest.is_ok())
            }
            Sent::Done | Sent::Refused => (answer.await, body_done),
        };
        drop(active);
        match relayed {
            Ok(()) => {
                if response.reusable && reuse {
                    upstream.pool().checkin(conn);
                }
                match (response.close, body_done) {
                    (false, _) => After::KeepAlive,
                    (true, true) => After::Close,
                    (true, false) => After::Linger,
                }
            }
            Err(Broken::Client) => After::Close,
            Err(Broken::App) => {
                // A broken or stalled answer: the client connection is cut,
                // so that the client sees it is incomplete.
                proxy
                    .counters
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                After::Close
            }
        }
    }
}

/// Which side broke a relay.
enum Broken {
    Client,
    App,
}

/// Writes the answer's head with what part of its body is already read,
/// then relays the rest of the body.
#[allow(clippy::too_many_arguments)]
async fn relay_first_and_rest<W: AsyncWrite + Unpin>(
    w: &mut W,
    head: &[u8],
    up_r: &mut tokio::net::tcp::ReadHalf<'_>,
    buf: &mut BytesMut,
    framing: Framing,
    dechunk: bool,
    timeout: Option<Duration>,
    stall: Option<Duration>,
) -> Result<(), Broken> {
    if dechunk {
        // An HTTP/1.0 client of a chunked answer: the data alone, then close.
        bounded(stall, w.write_all(head))
            .await
            .map_err(|_| Broken::Client)?;
        return relay_dechunked(up_r, buf, w, timeout, stall).await;
    }
    let mut state = Body::new(framing);
    let take = state.take(buf).map_err(|_| Broken::App)?;
    bounded(stall, write_two(w, head, &buf[..take]))
        .await
        .map_err(|_| Broken::Client)?;
    buf.advance(take);
    while !state.done() {
        // The answer comes in parts: acknowledge what arrived at once, so
        // that an app that waits for the acknowledgement before it sends
        // the rest (Nagle's algorithm: a head and a body written apart)
        // does not wait for a delayed one (40 ms on Linux). Quick ACKs are
        // not sticky, so this costs a system call per wait, and only
        // answers that come in parts wait.
        let _ = rustix::net::sockopt::set_tcp_quickack(up_r.as_ref(), true);
        let n = bounded(timeout, read_more(up_r, buf))
            .await
            .map_err(|_| Broken::App)?;
        if n == 0 {
            return if framing == Framing::Close {
                Ok(())
            } else {
                Err(Broken::App)
            };
        }
        let take = state.take(buf).map_err(|_| Broken::App)?;
        bounded(stall, w.write_all(&buf[..take]))
            .await
            .map_err(|_| Broken::Client)?;
        buf.advance(take);
    }
    Ok(())
}

/// A chunked answer's data alone, for an HTTP/1.0 client.
async fn relay_dechunked<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    w: &mut W,
    timeout: Option<Duration>,
    stall: Option<Duration>,
) -> Result<(), Broken> {
    let mut chunked = Chunked::default();
    let mut data = Vec::new();
    loop {
        data.clear();
        let used = chunked
            .feed(buf, Some(&mut data))
            .map_err(|_| Broken::App)?;
        buf.advance(used);
        bounded(stall, w.write_all(&data))
            .await
            .map_err(|_| Broken::Client)?;
        if chunked.done() {
            return Ok(());
        }
        let n = bounded(timeout, read_more(r, buf))
            .await
            .map_err(|_| Broken::App)?;
        if n == 0 {
            return Err(Broken::App);
        }
    }
}

/// Where a body being relayed is.
#[derive(Clone)]
enum Body {
    /// So many bytes to go.
    Length(u64),
    Chunked(Chunked),
    /// Until the sender closes.
    Close,
}

impl Body {
    fn new(framing: Framing) -> Body {
        match framing {
            Framing::None => Body::Length(0),
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(Chunked::default()),
            Framing::Close => Body::Close,
        }
    }

    /// How much of `buf` belongs to the body, without taking it.
    fn peek(&self, buf: &[u8]) -> Result<usize, &'static str> {
        self.clone().take(buf)
    }

    /// How much of `buf` belongs to the body, taken.
    fn take(&mut self, buf: &[u8]) -> Result<usize, &'static str> {
        match self {
            Body::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                Ok(n)
            }
            Body::Chunked(chunked) => chunked.feed(buf, None),
            Body::Close => Ok(buf.len()),
        }
    }

    fn done(&self) -> bool {
        match self {
            Body::Length(left) => *left == 0,
            Body::Chunked(chunked) => chunked.done(),
            Body::Close => false,
        }
    }
}

/// Relays a request body from the client (`buf` holds what was already
/// read) to the app. Errors say which side failed: `true` for the app.
/// A write to the app that blocks longer than `write_limit` (it stopped
/// reading) fails as the app's.
async fn relay_body<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    w: &mut W,
    state: &mut Body,
    stall: Option<Duration>,
    write_limit: Duration,
    progress: &Stamp,
) -> Result<(), (bool, io::Error)> {
    // Cancel-safe: this future is dropped when the answer comes first and
    // another picks up where it stopped, so `state` and `buf` only ever
    // count what a write has taken.
    loop {
        let invalid = |why| (false, io::Error::new(io::ErrorKind::InvalidData, why));
        let mut take = state.peek(buf).map_err(invalid)?;
        while take > 0 {
            let n = bounded(Some(write_limit), w.write(&buf[..take]))
                .await
                .map_err(|e| (true, e))?;
            if n == 0 {
                return Err((true, io::ErrorKind::WriteZero.into()));
            }
            state.take(&buf[..n]).map_err(invalid)?;
            buf.advance(n);
            take -= n;
            progress.touch();
        }
        if state.done() {
            return Ok(());
        }
        match bounded(stall, read_more(r, buf)).await {
            Ok(0) => return Err((false, io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) => return Err((false, e)),
        }
    }
}

/// Reads the head of the generation's answer into `buf`, relaying (and
/// dropping) informational answers (1xx other than 101) to the client.
async fn read_head<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    client: &mut W,
    http10_client: bool,
) -> Result<(), Failed> {
    let mut answered = false;
    let mut end = wire::HeadEnd::default();
    loop {
        if end.complete(buf) {
            match wire::head_len(buf) {
                Ok(Some((len, status))) if (100..200).contains(&status) && status != 101 => {
                    if !http10_client && client.write_all(&buf[..len]).await.is_err() {
                        return Err(Failed::Client);
                    }
                    buf.advance(len);
                    end.reset();
                    answered = true;
                    continue;
                }
                Ok(Some((len, _))) if len <= MAX_HEAD => return Ok(()),
                Ok(Some(_)) => return Err(Failed::Bad("answer head too large".into())),
                Ok(None) => {}
                Err(why) => return Err(Failed::Bad(format!("invalid answer: {why}"))),
            }
        }
        if buf.len() > MAX_HEAD {
            return Err(Failed::Bad("answer head too large".into()));
        }
        match read_more(r, buf).await {
            Ok(0) if buf.is_empty() && !answered => {
                return Err(Failed::Unanswered(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before an answer",
                )));
            }
            Err(e) if buf.is_empty() && !answered => return Err(Failed::Unanswered(e)),
            Ok(0) => {
                return Err(Failed::Bad(
                    "connection closed within the answer head".into(),
                ));
            }
            Err(e) => return Err(Failed::Bad(e.to_string())),
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! One client connection's exchanges, with the client side in memory
    //! (a duplex pipe) and an app on a loopback socket that answers by
    //! script: what reaches the app, on which connection, and what comes
    //! back.
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, DuplexStream, WriteHalf};
    use tokio::net::TcpListener;

    impl ClientSocket for WriteHalf<DuplexStream> {
        fn no_delay(&self) {}

        fn local_addr(&self) -> Option<std::net::SocketAddr> {
            Some(([127, 0, 0, 1], 8080).into())
        }
    }

    /// An app that answers each request head by its path: `/ok` (a short
    /// answer naming the connection), `/head` (to HEAD: a head with a
    /// length, then the body in a second write), `/extra` (an answer, then
    /// stray bytes once the test says so). Counts the connections it
    /// accepted.
    async fn app(
        stray: Arc<(tokio::sync::Notify, tokio::sync::Notify)>,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let stray = Arc::clone(&stray);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        let body = format!("conn={n}");
                        let ok = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if head.contains(" /head ") {
                            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                                .await
                                .unwrap();
                            s.write_all(b"FORGE").await.unwrap();
                        } else if head.contains(" /extra ") {
                            s.write_all(ok.as_bytes()).await.unwrap();
                            stray.0.notified().await;
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nFORGED")
                                .await;
                            // On loopback, in baton's receive queue now.
                            stray.1.notify_one();
                        } else {
                            s.write_all(ok.as_bytes()).await.unwrap();
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn proxy_for(addr: std::net::SocketAddr) -> Arc<Proxy> {
        let limits = super::super::route::Limits {
            serve: baton::serve::Options::default(),
            upstream_timeout: Duration::from_secs(30),
            keep_underscores: false,
            close_after_body: false,
            upstream_protocol: Default::default(),
        };
        let proxy = Proxy::new(Duration::from_secs(5), limits);
        proxy.switch(vec![Upstream::new(
            1,
            addr,
            Duration::from_secs(60),
            Arc::clone(&proxy.counters.stray_answers),
            Box::new(|_| {}),
        )]);
        proxy
    }

    /// A client connection served by a `Client` on this task's runtime;
    /// the test's end of it.
    async fn client(proxy: &Arc<Proxy>) -> DuplexStream {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(theirs);
        let ticket = proxy.connections().admit().await;
        let (_stop, draining) = watch::channel(false);
        let client = Client::new(
            r,
            ClientWriter::new(w),
            Buffers::take(),
            Some([10, 0, 0, 1].into()),
            Arc::clone(proxy),
            draining,
            Instant::now(),
            ticket,
        );
        tokio::spawn(async move {
            let _stop = _stop;
            client.run().await;
        });
        ours
    }

    /// Reads one answer (head and a body by its Content-Length).
    async fn answer(c: &mut DuplexStream) -> (String, String) {
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut b = [0u8; 1];
            assert_eq!(c.read(&mut b).await.unwrap(), 1, "closed: {buf:?}");
            buf.push(b[0]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse().unwrap());
        let mut body = vec![0; if head.contains("x-head") { 0 } else { length }];
        c.read_exact(&mut body).await.unwrap();
        (head, String::from_utf8(body).unwrap())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_kept_connection_to_the_app_carries_the_next_request() {
        runtime().block_on(async {
            let (addr, accepted) = app(Arc::default()).await;
            let proxy = proxy_for(addr);
            let mut c = client(&proxy).await;
            for _ in 0..3 {
                c.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap();
                let (head, body) = answer(&mut c).await;
                assert!(head.starts_with("http/1.1 200"), "{head}");
                assert_eq!(body, "conn=1");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
            // Pipelined: answered in order, on the same connection.
            c.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(answer(&mut c).await.1, "conn=1");
            assert_eq!(answer(&mut c).await.1, "conn=1");
        });
    }

    #[test]
    fn after_an_answer_to_head_the_app_connection_is_not_reused() {
        runtime().block_on(async {
            let (addr, accepted) = app(Arc::default()).await;
            let proxy = proxy_for(addr);
            let mut c = client(&proxy).await;
            c.write_all(b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                c.read_exact(&mut b).await.unwrap();
                head.push(b[0]);
            }
            assert!(head.starts_with(b"HTTP/1.1 200"));
            // The body the app sends anyway never reaches the next answer.
            c.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let (head, body) = answer(&mut c).await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert_eq!(body, "conn=2");
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
        });
    }

    #[test]
    fn bytes_the_app_sends_on_an_idle_connection_never_become_an_answer() {
        runtime().block_on(async {
            let stray = Arc::new((tokio::sync::Notify::new(), tokio::sync::Notify::new()));
            let (addr, accepted) = app(Arc::clone(&stray)).await;
            let proxy = proxy_for(addr);
            let mut c = client(&proxy).await;
            c.write_all(b"GET /extra HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(answer(&mut c).await.1, "conn=1");
            // The app writes out of turn while its connection is pooled.
            stray.0.notify_one();
            stray.1.notified().await;
            // Whatever the runtime has seen of them, the checkout's peek
            // finds the bytes.
            c.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let (_, body) = answer(&mut c).await;
            assert_eq!(body, "conn=2");
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
            assert!(proxy.counters.stray_answers.load(Ordering::Relaxed) >= 1);
        });
    }

    #[test]
    fn a_request_without_host_is_refused_before_the_app_and_http10_gets_one() {
        runtime().block_on(async {
            let (addr, accepted) = app(Arc::default()).await;
            let proxy = proxy_for(addr);
            let mut c = client(&proxy).await;
            c.write_all(b"GET /ok HTTP/1.1\r\n\r\n").await.unwrap();
            let (head, _) = answer(&mut c).await;
            assert!(head.starts_with("http/1.1 400"), "{head}");
            assert_eq!(accepted.load(Ordering::SeqCst), 0);
            let mut c = client(&proxy).await;
            c.write_all(b"GET /ok HTTP/1.0\r\n\r\n").await.unwrap();
            let (head, body) = answer(&mut c).await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(head.contains("connection: close"), "{head}");
            assert_eq!(body, "conn=1");
        });
    }
}
