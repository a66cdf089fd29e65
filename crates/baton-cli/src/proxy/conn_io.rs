//! The proxy's I/O pieces: reads into a connection's buffer, writes of
//! a head and a body in one system call, timeouts, buffers kept per thread
//! for the next connection, `TCP_NODELAY` only where it matters, and the
//! byte relay both ways (tcp mode, and upgraded HTTP connections).

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest request or response head accepted (HTTP/1), and the
/// largest header list (HTTP/2).
pub const MAX_HEAD: usize = 64 * 1024;

/// HTTP/2: how much of a request body (per stream), and of all of a
/// connection's, a client may send ahead of the app's reading: what baton
/// may hold for it. What an h2c app may send ahead of a slow client is
/// bounded by four and two times these.
pub const H2_STREAM_WINDOW: u32 = 64 * 1024;
pub const H2_CONNECTION_WINDOW: u32 = 256 * 1024;

/// How much a read asks for, and what a connection's buffer starts with.
pub const READ: usize = 8 * 1024;

/// `f`, bounded by `limit` when there is one.
pub async fn bounded<T>(
    limit: Option<Duration>,
    f: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, f)
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
        None => f.await,
    }
}

/// Writes all of `a` then all of `b`, in as few system calls as the
/// socket takes.
pub async fn write_two<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut a: &[u8],
    mut b: &[u8],
) -> io::Result<()> {
    while !a.is_empty() {
        let n = w
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    if !b.is_empty() {
        w.write_all(b).await?;
    }
    Ok(())
}

/// Reads more into `buf`; `Ok(0)` at the end of the stream.
pub async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.is_empty() {
        // Start over at the front of the allocation.
        buf.clear();
    }
    if buf.capacity() - buf.len() < READ / 2 {
        buf.reserve(READ);
    }
    r.read_buf(buf).await
}

/// Sleeps until `at`; never, without one.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Completes once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// When something last happened on a connection (a byte moved), for the
/// timeouts that count from it; shared by the futures that move them.
#[derive(Debug)]
pub struct Stamp {
    start: Instant,
    /// Nanoseconds after `start`.
    last: AtomicU64,
}

impl Stamp {
    /// Now.
    pub fn new() -> Stamp {
        Stamp {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Something happened now.
    pub fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    /// When it last happened.
    pub fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// A connection's buffers: what was read from the client, and the heads
/// being written to the app and to the client.
#[derive(Debug)]
pub struct Buffers {
    pub read: BytesMut,
    pub up_head: Vec<u8>,
    pub out: Vec<u8>,
}

/// Buffers kept per proxy thread, at most.
const SPARE_MAX: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<Buffers>> = const { RefCell::new(Vec::new()) };
}

impl Buffers {
    /// A set of buffers, from this thread's spares if there are any.
    pub fn take() -> Buffers {
        SPARE
            .with(|s| s.borrow_mut().pop())
            .unwrap_or_else(|| Buffers {
                read: BytesMut::with_capacity(READ),
                up_head: Vec::with_capacity(512),
                out: Vec::with_capacity(512),
            })
    }

    /// Keeps these buffers for the next connection on this thread, unless
    /// they grew (a large head) or enough are kept.
    pub fn give_back(mut self) {
        if self.read.capacity() > 2 * READ
            || self.up_head.capacity() > 4096
            || self.out.capacity() > 4096
        {
            return;
        }
        self.read.clear();
        if self.read.capacity() < READ {
            self.read.reserve(READ);
        }
        SPARE.with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARE_MAX {
                spare.push(self);
            }
        });
    }
}

/// A client socket's write side: it can turn Nagle's algorithm off, and
/// tell the address the client connected to.
pub trait ClientSocket {
    /// Sets `TCP_NODELAY` (nothing for a Unix socket).
    fn no_delay(&self);

    /// The local address of a TCP connection (none for a Unix socket).
    fn local_addr(&self) -> Option<std::net::SocketAddr>;
}

impl ClientSocket for tokio::net::tcp::WriteHalf<'_> {
    fn no_delay(&self) {
        let _ = self.as_ref().set_nodelay(true);
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.as_ref().local_addr().ok()
    }
}

impl ClientSocket for tokio::net::unix::WriteHalf<'_> {
    fn no_delay(&self) {}

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        None
    }
}

/// The write side of a client connection. Nagle's algorithm holds a small
/// write back only while an earlier one is unacknowledged, so the first
/// write of a connection never waits: `TCP_NODELAY` is set before the
/// second, which spares a system call on every connection that carries one
/// answer written at once.
#[derive(Debug)]
pub struct ClientWriter<W> {
    inner: W,
    wrote: bool,
    nodelay: bool,
}

impl<W: ClientSocket> ClientWriter<W> {
    pub fn new(inner: W) -> ClientWriter<W> {
        ClientWriter {
            inner,
            wrote: false,
            nodelay: false,
        }
    }

    /// The local address of a TCP connection.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn before_write(&mut self) {
        if self.wrote && !self.nodelay {
            self.inner.no_delay();
            self.nodelay = true;
        }
    }
}

impl<W: AsyncWrite + ClientSocket + Unpin> AsyncWrite for ClientWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.before_write();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.wrote = true;
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.before_write();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.wrote = true;
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Copies between the client's halves and the generation's socket until
/// both directions have ended, either side failed (a reset), or nothing
/// moved for `idle` (then counted in `idle_relays`). `first` sees the first bytes the client sends.
pub async fn copy_both_ways<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    client_r: R,
    client_w: W,
    server: &mut tokio::net::TcpStream,
    idle: Option<Duration>,
    idle_relays: &AtomicU64,
    first: impl FnOnce(&[u8]),
) {
    let moved = Stamp::new();
    let (mut up_r, mut up_w) = server.split();
    let (mut to_app, mut to_client) = (Buffers::take(), Buffers::take());
    let ends = AtomicU8::new(0);
    {
        // A reset or a failed write on either side ends both directions:
        // the other side is closed rather than left waiting for bytes
        // that have nowhere to go.
        let copy = async {
            tokio::try_join!(
                pipe(client_r, &mut up_w, &mut to_app.read, &ends, &moved, first),
                pipe(
                    &mut up_r,
                    client_w,
                    &mut to_client.read,
                    &ends,
                    &moved,
                    |_| {}
                ),
            )
        };
        let mut copy = std::pin::pin!(copy);
        loop {
            // Wake at the idle deadline of the last byte moved; a relay with
            // traffic just looks again.
            let deadline = idle.and_then(|idle| moved.last().checked_add(idle));
            tokio::select! {
                _ = copy.as_mut() => break,
                () = sleep_until(deadline) => {
                    if idle.is_some_and(|idle| moved.last().elapsed() >= idle) {
                        idle_relays.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
    to_app.give_back();
    to_client.give_back();
}

/// Copies one direction until its reader ends, then passes the end on: a
/// shutdown of the writer's sending side if the other direction still
/// runs (half-close), nothing if it is over too (closing will do).
async fn pipe<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut r: R,
    mut w: W,
    buf: &mut BytesMut,
    ends: &AtomicU8,
    moved: &Stamp,
    first: impl FnOnce(&[u8]),
) -> std::io::Result<()> {
    let mut first = Some(first);
    loop {
        buf.clear();
        if read_more(&mut r, buf).await? == 0 {
            if ends.fetch_add(1, Ordering::Relaxed) == 0 {
                w.shutdown().await?;
            }
            return Ok(());
        }
        if let Some(first) = first.take() {
            first(buf);
        }
        moved.touch();
        w.write_all(buf).await?;
        moved.touch();
    }
}

/// Counts a relay or splice as open while alive.
#[derive(Debug)]
pub struct OpenStream(Arc<std::sync::atomic::AtomicUsize>);

impl OpenStream {
    /// Counts one more open in `open`, until dropped.
    pub fn new(open: &Arc<std::sync::atomic::AtomicUsize>) -> OpenStream {
        open.fetch_add(1, Ordering::SeqCst);
        OpenStream(Arc::clone(open))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
