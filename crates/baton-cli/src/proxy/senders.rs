//! Connections to a generation for requests that hyper carries: HTTP/2
//! clients, and HTTP/1 clients when the app speaks h2c
//! (`--upstream-protocol`).
//!
//! To an HTTP/1.1 app: per proxy thread and per generation, idle
//! connections, each taken for one request and given back when its answer
//! ended; a retired generation's are dropped (one in use is not given
//! back). To an h2c app: one connection per client connection (kept by
//! it, see `http2.rs`), so that a client that stops reading holds up its
//! own streams only, and the app's stream limit applies per client.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::health::connect;
use super::slot;

/// Idle HTTP/1.1 connections kept per thread and generation.
const MAX_IDLE: usize = 64;

/// The largest header list accepted from the app (as from clients).
const MAX_HEADER_LIST: u32 = super::conn_io::MAX_HEAD as u32;

/// A connection to a generation, ready for a request.
#[derive(Debug)]
pub enum Sender {
    /// HTTP/1.1: one request at a time.
    H1(http1::SendRequest<Incoming>),
    /// h2c: a handle on the thread's multiplexed connection.
    H2(http2::SendRequest<Incoming>),
}

/// Why a request got no answer: the error, and the request when none of
/// it was sent (it may go again).
pub type SendError = Box<(hyper::Error, Option<Request<Incoming>>)>;

impl Sender {
    /// Sends `request` and waits for the answer's head.
    pub async fn send(
        &mut self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, SendError> {
        let unsent = |e: hyper::Error, request| Err(Box::new((e, Some(request))));
        match self {
            Sender::H1(s) => {
                if let Err(e) = s.ready().await {
                    return unsent(e, request);
                }
                s.try_send_request(request).await.map_err(|mut e| {
                    let back = e.take_message();
                    Box::new((e.into_error(), back))
                })
            }
            Sender::H2(s) => {
                if let Err(e) = s.ready().await {
                    return unsent(e, request);
                }
                s.try_send_request(request).await.map_err(|mut e| {
                    let back = e.take_message();
                    Box::new((e.into_error(), back))
                })
            }
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// Idle connections and when each was given back, oldest first.
    h1: std::collections::VecDeque<(http1::SendRequest<Incoming>, std::time::Instant)>,
}

/// One generation's connections, per proxy thread.
#[derive(Debug)]
pub struct Senders {
    slots: Vec<Mutex<Slot>>,
    /// How long an idle connection is kept.
    max_idle: std::time::Duration,
    closed: AtomicBool,
    /// An HTTP/1.1 connection was given back: a request waiting for room
    /// under the connection cap may take it instead.
    returned: tokio::sync::Notify,
}

impl Senders {
    /// Empty, for `threads` proxy threads; idle connections are closed
    /// after `max_idle` (checked when the pool is used).
    pub fn new(threads: usize, max_idle: std::time::Duration) -> Senders {
        Senders {
            max_idle,
            slots: (0..threads.max(1)).map(|_| Mutex::default()).collect(),
            closed: AtomicBool::new(false),
            returned: tokio::sync::Notify::new(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Slot) -> T) -> Option<T> {
        let slot = self
            .slots
            .get(slot::slot())
            .or_else(|| self.slots.first())?;
        slot.lock().ok().map(|mut s| f(&mut s))
    }

    /// One of this thread's idle HTTP/1.1 connections.
    pub fn take(&self) -> Option<Sender> {
        let max_idle = self.max_idle;
        self.with(|slot| {
            expire(slot, max_idle);
            while let Some((s, _)) = slot.h1.pop_back() {
                if !s.is_closed() {
                    return Some(Sender::H1(s));
                }
            }
            None
        })
        .flatten()
    }

    /// Keeps an HTTP/1.1 connection whose answer ended, for the next
    /// request (not once retired).
    pub fn keep(&self, sender: Sender) {
        let Sender::H1(s) = sender else { return };
        if self.closed.load(Ordering::SeqCst) || s.is_closed() {
            return;
        }
        let max_idle = self.max_idle;
        self.with(|slot| {
            expire(slot, max_idle);
            if slot.h1.len() < MAX_IDLE {
                slot.h1.push_back((s, std::time::Instant::now()));
            }
        });
        self.returned.notify_one();
    }

    /// Completes when a connection may have been given back.
    pub async fn returned(&self) {
        self.returned.notified().await;
    }

    /// Drops every connection kept: the generation is retired.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for slot in &self.slots {
            if let Ok(mut s) = slot.lock() {
                *s = Slot::default();
            }
        }
    }

    /// HTTP/1.1 connections kept idle (for tests).
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.lock().ok().map(|s| s.h1.len()))
            .sum()
    }
}

/// Closes the slot's connections idle for longer than `max_idle`.
fn expire(slot: &mut Slot, max_idle: std::time::Duration) {
    while slot
        .h1
        .front()
        .is_some_and(|(s, at)| s.is_closed() || at.elapsed() > max_idle)
    {
        slot.h1.pop_front();
    }
}

/// A new connection to `addr`, h2c or HTTP/1.1; its driver runs as a task
/// of this thread until the connection ends, holding `ticket`: a place
/// under the proxy's connection cap, so that an HTTP/2 client's streams
/// (each of which may need a connection to an HTTP/1.1 app) cannot take
/// more descriptors than the cap allows.
pub async fn open(addr: SocketAddr, h2c: bool, ticket: baton::serve::Ticket) -> io::Result<Sender> {
    let stream = connect(addr).await?;
    // Requests go out as a head and a body (or several streams' frames)
    // in separate writes: none may wait on the app's delayed ACK.
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    let failed = |e: hyper::Error| io::Error::other(format!("handshake: {e}"));
    if h2c {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_LIST)
            // What the app may send ahead of a slow client: held by baton.
            .initial_stream_window_size(super::conn_io::H2_STREAM_WINDOW * 4)
            .initial_connection_window_size(super::conn_io::H2_CONNECTION_WINDOW * 2)
            .handshake(io)
            .await
            .map_err(failed)?;
        drive(conn, ticket);
        Ok(Sender::H2(sender))
    } else {
        let io = TokioIo::new(QuickAck(io.into_inner(), false));
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(super::conn_io::MAX_HEAD.max(8192) * 2)
            .handshake(io)
            .await
            .map_err(failed)?;
        drive(conn, ticket);
        Ok(Sender::H1(sender))
    }
}

/// Drives a connection to the app on this thread until it ends, holding
/// `ticket` (its place under the connection cap) until then.
fn drive<C>(conn: C, ticket: baton::serve::Ticket)
where
    C: std::future::Future + Send + 'static,
{
    tokio::spawn(async move {
        let _ticket = ticket;
        let _ = conn.await;
    });
}

/// A connection to an HTTP/1.1 app that acknowledges at once what
/// arrived when an answer comes in parts: an app that writes a head and a
/// body apart (Python's `http.server`) would otherwise wait, by Nagle's
/// algorithm, for a delayed ACK (40 ms on Linux) before it sends the
/// body. Quick ACKs are not sticky: one system call per wait within an
/// answer; answers that arrive whole cost nothing.
struct QuickAck(tokio::net::TcpStream, bool);

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        match &polled {
            // Waiting for the rest of what began to arrive.
            std::task::Poll::Pending if self.1 => {
                let _ = rustix::net::sockopt::set_tcp_quickack(&self.0, true);
            }
            std::task::Poll::Ready(Ok(())) if buf.filled().len() > before => self.1 = true,
            _ => {}
        }
        polled
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        // A request goes out: its answer has not begun.
        self.1 = false;
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        self.1 = false;
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
