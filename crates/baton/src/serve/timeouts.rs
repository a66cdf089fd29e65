//! A connection's clock: what it is doing ([`Activity`]: in flight, idle,
//! sending a head), which timeout applies, and the I/O wrapper that stamps
//! each read and bounds each write ([`Timed`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::acceptor::Stream;
use super::caps::Ticket;
use super::options::Options;

/// "Not set" for the timestamps of [`Activity`].
pub(super) const UNSET: u64 = u64::MAX;

/// What a connection is doing, shared by its I/O, its service and its task.
/// Times are nanoseconds after `born`.
#[derive(Debug)]
pub(super) struct Activity {
    pub(super) born: Instant,
    /// Requests in flight: from the end of the head to the end of the
    /// response body.
    pub(super) in_flight: AtomicUsize,
    /// The last request start or response end.
    pub(super) last_nanos: AtomicU64,
    /// When the first byte of the next request head arrived (with nothing
    /// in flight), or [`UNSET`].
    pub(super) head_nanos: AtomicU64,
    /// Since when writes to the client have been blocked, or [`UNSET`].
    pub(super) blocked_nanos: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    Header,
    Idle,
}

#[derive(Debug)]
pub(super) enum Expiry {
    Now(Which),
    At(Instant),
    Never,
}

impl Activity {
    pub(super) fn new(born: Instant) -> Activity {
        Activity {
            born,
            in_flight: AtomicUsize::new(0),
            last_nanos: AtomicU64::new(0),
            head_nanos: AtomicU64::new(UNSET),
            blocked_nanos: AtomicU64::new(UNSET),
        }
    }

    pub(super) fn nanos(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(UNSET - 1)
    }

    pub(super) fn at(&self, nanos: u64) -> Instant {
        // `nanos` was measured from `born`, so this is a past instant.
        self.born
            .checked_add(Duration::from_nanos(nanos))
            .unwrap_or(self.born)
    }

    pub(super) fn touch(&self) {
        self.last_nanos.store(self.nanos(), Ordering::Relaxed);
    }

    /// Marks the start of a request head, if none is under way.
    pub(super) fn head_started(&self) {
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
    pub(super) fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_nanos.load(Ordering::Relaxed) == UNSET
    }

    /// `None` while a request is in flight, else how long it has been idle.
    pub(super) fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed));
        Some(self.born.elapsed().saturating_sub(last))
    }

    /// Whether a timeout of `options` has run out, or when to look again.
    pub(super) fn expired(&self, now: Instant, options: &Options) -> Expiry {
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
pub(super) struct Timed {
    pub(super) inner: Stream,
    pub(super) activity: Arc<Activity>,
    pub(super) _ticket: Ticket,
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
    pub(super) fn note_write<T>(&self, polled: &Poll<io::Result<T>>) {
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
pub(super) struct InFlight(pub(super) Arc<Activity>);

impl InFlight {
    pub(super) fn start(activity: Arc<Activity>) -> InFlight {
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
