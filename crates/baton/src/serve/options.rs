//! What a server is told: how it drains ([`Drain`]) and what bounds its
//! client connections ([`Options`]); and what a drain did
//! ([`DrainReport`]).

use std::sync::Arc;
use std::time::Duration;

use super::caps::Connections;

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
