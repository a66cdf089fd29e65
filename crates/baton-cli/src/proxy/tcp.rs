//! `--proxy tcp`: a layer-4 relay for any protocol. Each accepted client
//! connection is paired with a new connection to the current generation and
//! the bytes are copied both ways; a connection stays with the generation it
//! was paired with until either side closes it (or that generation is
//! killed at the stop timeout).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::debug;

use super::Proxy;
use baton::serve::{AsyncListener, Stream, Ticket};

/// Accepts on `listeners` and relays until `stop` turns true; then stops
/// accepting (relays in progress go on).
pub async fn serve(listeners: Vec<AsyncListener>, proxy: Arc<Proxy>, stop: watch::Receiver<bool>) {
    let mut loops = JoinSet::new();
    for listener in listeners {
        loops.spawn(accept_loop(listener, Arc::clone(&proxy), stop.clone()));
    }
    while loops.join_next().await.is_some() {}
}

async fn accept_loop(listener: AsyncListener, proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            () = stopped(&mut stop) => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Then a slot under the connection cap. In tcp mode nothing is
        // evicted (some protocols wait for the server to speak first), and
        // a connection once accepted is relayed, over the cap at a stop.
        let ticket = tokio::select! {
            ticket = proxy.connections().admit() => ticket,
            () = stopped(&mut stop) => proxy.connections().admit_over_cap(),
        };
        ticket.spoke();
        if let Stream::Tcp(s) = &stream {
            let _ = s.set_nodelay(true);
        }
        tokio::spawn(relay(stream, ticket, Arc::clone(&proxy)));
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Pairs one client connection with the current generation and copies
/// until either side closes, or nothing moved either way for the idle
/// timeout.
async fn relay(client: Stream, ticket: Ticket, proxy: Arc<Proxy>) {
    let _ticket = ticket;
    let _open = super::http::OpenStream(Arc::clone(&proxy));
    proxy.counters.open_streams.fetch_add(1, Ordering::SeqCst);
    let Some((mut upstream, mut active)) = proxy.acquire().await else {
        return;
    };
    let mut retried = false;
    let server = loop {
        match super::connect(upstream.addr).await {
            Ok(server) => break server,
            Err(e) => {
                // Nothing was sent: the next generation, once.
                if !retried {
                    retried = true;
                    proxy.counters.retries.fetch_add(1, Ordering::Relaxed);
                    if let Some(next) = proxy.next(Some(&upstream)).await
                        && let Some(entered) = next.enter_if_open()
                    {
                        (upstream, active) = (next, entered);
                        continue;
                    }
                }
                debug!(generation = upstream.generation, error = %e, "cannot reach the generation; closing the client connection");
                return;
            }
        }
    };
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Touched::new(client, started, Arc::clone(&last));
    let mut server = Touched::new(server, started, Arc::clone(&last));
    let idle = proxy.limits.serve.idle_timeout;
    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
    tokio::pin!(copy);
    loop {
        // Wake at the idle deadline of the last byte moved; a relay with
        // traffic just looks again.
        let deadline = idle.and_then(|idle| {
            let moved = Duration::from_nanos(last.load(Ordering::Relaxed));
            started.checked_add(moved)?.checked_add(idle)
        });
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = copy.as_mut() => break,
            () = sleep => {
                let moved = Duration::from_nanos(last.load(Ordering::Relaxed));
                if idle.is_some_and(|idle| started.elapsed().saturating_sub(moved) >= idle) {
                    proxy.counters.idle_relays.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
    drop(active);
}

/// A socket that notes when a byte last moved through it.
struct Touched<T> {
    inner: T,
    started: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Touched<T> {
    fn new(inner: T, started: Instant, last: Arc<AtomicU64>) -> Touched<T> {
        Touched {
            inner,
            started,
            last,
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Touched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
