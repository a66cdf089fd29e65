//! Bodies on their way through the proxy, bounded in time: a client that
//! stops sending its request body, or an app that stops sending its
//! answer, is cut after a timeout ([`Bounded`]); how far a request body has
//! gone ([`Progress`]) tells when the app's time to answer starts.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body whose frames must keep coming: if none arrives within `limit`
/// of the last (or of the first poll), it fails. The timer is armed only
/// while the body is waiting, so a body that is always ready costs none.
pub struct Bounded<B> {
    inner: B,
    limit: Option<std::time::Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Told of each frame taken, and of the end.
    progress: Option<Arc<Progress>>,
}

impl<B: Body> Bounded<B> {
    /// `inner`, failing after `limit` without a frame (`None`: never).
    pub fn new(inner: B, limit: Option<std::time::Duration>) -> Bounded<B> {
        Bounded {
            inner,
            limit,
            timer: None,
            progress: None,
        }
    }

    /// Reports each frame taken, and the end of the body (at once if it is
    /// empty), to `progress`.
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Bounded<B> {
        if self.inner.is_end_stream() {
            progress.end();
        } else {
            self.progress = Some(progress);
        }
        self
    }
}

/// How far a request body has gone to the app: when a part was last taken,
/// and whether it is complete. The upstream timeout counts from the end of
/// the body, or from the last part taken if the app stops reading.
#[derive(Debug)]
pub struct Progress {
    started: std::time::Instant,
    /// Nanoseconds after `started` of the last part taken.
    last: std::sync::atomic::AtomicU64,
    ended: tokio::sync::Notify,
}

impl Progress {
    /// Nothing taken yet.
    pub fn new() -> Progress {
        Progress {
            started: std::time::Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
            ended: tokio::sync::Notify::new(),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    /// The body is complete (a permit is kept for the waiter).
    pub fn end(&self) {
        self.ended.notify_one();
    }

    /// Completes `timeout` after the end of the body, or once the app took
    /// nothing of it for `timeout`.
    pub async fn deadline(&self, timeout: std::time::Duration) {
        loop {
            let last = std::time::Duration::from_nanos(self.last.load(Ordering::Relaxed));
            let stalled_at = self.started + last + timeout;
            tokio::select! {
                () = self.ended.notified() => break,
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(stalled_at)) => {
                    let last = std::time::Duration::from_nanos(self.last.load(Ordering::Relaxed));
                    if self.started.elapsed().saturating_sub(last) >= timeout {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(timeout).await;
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl<B> std::fmt::Debug for Bounded<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounded")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// A body that stalled past its limit.
#[derive(Debug)]
struct Stalled(std::time::Duration);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no data for {}", humantime::format_duration(self.0))
    }
}

impl std::error::Error for Stalled {}

impl<B> Body for Bounded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.timer = None;
                if let Some(progress) = &self.progress {
                    progress.touch();
                    if frame.is_none() || self.inner.is_end_stream() {
                        progress.end();
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let Some(limit) = self.limit else {
                    return Poll::Pending;
                };
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled(limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
