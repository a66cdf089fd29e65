//! What the caps and filters turned away, said at most once per interval.
//!
//! A flood (idle clients at the connection cap, datagrams from another user
//! on a notify socket) must not become a flood of log lines: each condition
//! is counted (and exported as a metric) as it happens, and logged here as
//! one summary line per [`INTERVAL`] at most, the first one promptly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton::serve::{ConnectionStats, Connections};
use tracing::warn;

/// The shortest time between two summary lines of one kind.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Connections that must have closed (since the peak) before freed memory
/// is returned to the system.
pub const TRIM_AFTER: usize = 500;

/// Notifications refused before they reach the loop, shared with the
/// notify sockets' readers.
#[derive(Debug, Default)]
pub struct Rejected {
    count: AtomicU64,
    last: Mutex<Option<String>>,
}

impl Rejected {
    /// Counting from `count` (handed over by an upgrade).
    pub fn starting_at(count: u64) -> Rejected {
        Rejected {
            count: AtomicU64::new(count),
            last: Mutex::new(None),
        }
    }

    /// Counts one refused datagram; `what` describes it.
    pub fn note(&self, what: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last.lock() {
            *last = Some(what);
        }
    }

    /// How many so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// At most `burst` events per `window`; the rest are counted.
#[derive(Debug)]
pub struct Throttle {
    window: Duration,
    burst: u32,
    started: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl Throttle {
    /// A throttle of `burst` per `window`.
    pub fn new(burst: u32, window: Duration) -> Throttle {
        Throttle {
            window,
            burst,
            started: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether one more event may be logged now. When a new window opens,
    /// the number suppressed in the last one is returned too.
    pub fn allow(&mut self, now: Instant) -> (bool, u64) {
        let mut dropped = 0;
        let expired = self
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if expired {
            dropped = std::mem::take(&mut self.suppressed);
            self.started = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            (true, dropped)
        } else {
            self.suppressed += 1;
            (false, dropped)
        }
    }
}

/// One connection cap being watched.
#[derive(Debug)]
struct Watched {
    name: &'static str,
    connections: Arc<Connections>,
    seen: ConnectionStats,
    said_at: Option<Instant>,
}

/// The reporter, run from the guardian's housekeeping tick.
#[derive(Debug)]
pub struct Pressure {
    caps: Vec<Watched>,
    /// The most connections open at once since memory was last trimmed.
    peak_open: usize,
    rejected: Arc<Rejected>,
    rejected_seen: u64,
    rejected_said_at: Option<Instant>,
    /// The proxy's count of connections closed for bytes the app sent out
    /// of turn; what was last said of it, and when.
    stray: Option<Arc<AtomicU64>>,
    stray_seen: u64,
    stray_said_at: Option<Instant>,
}

impl Pressure {
    /// Watches `rejected`, each named connection cap and (proxy mode) the
    /// count of connections closed for bytes the app sent out of turn.
    pub fn new(
        rejected: Arc<Rejected>,
        caps: Vec<(&'static str, Arc<Connections>)>,
        stray: Option<Arc<AtomicU64>>,
    ) -> Pressure {
        Pressure {
            caps: caps
                .into_iter()
                .map(|(name, connections)| Watched {
                    name,
                    seen: connections.stats(),
                    connections,
                    said_at: None,
                })
                .collect(),
            rejected,
            rejected_seen: 0,
            rejected_said_at: None,
            peak_open: 0,
            stray,
            stray_seen: 0,
            stray_said_at: None,
        }
    }

    /// Connections to the app closed because it sent bytes on them that no
    /// request asked for (proxy mode).
    pub fn stray_answers(&self) -> u64 {
        self.stray.as_ref().map_or(0, |s| s.load(Ordering::Relaxed))
    }

    /// Whether enough connections closed since the peak that their memory
    /// should go back to the system (see `sys::memory`): at least
    /// [`TRIM_AFTER`] fewer, and half the peak or less.
    pub fn should_trim(&mut self) -> bool {
        let open: usize = self.caps.iter().map(|w| w.connections.stats().open).sum();
        self.peak_open = self.peak_open.max(open);
        let trim = self.peak_open - open >= TRIM_AFTER && open <= self.peak_open / 2;
        if trim {
            self.peak_open = open;
        }
        trim
    }

    /// The watched caps, by name.
    pub fn caps(&self) -> impl Iterator<Item = (&'static str, &Arc<Connections>)> {
        self.caps.iter().map(|w| (w.name, &w.connections))
    }

    /// Logs what happened since the last line of each kind, if that line is
    /// at least [`INTERVAL`] old.
    pub fn report(&mut self, now: Instant) {
        let due =
            |at: Option<Instant>| at.is_none_or(|t| now.saturating_duration_since(t) >= INTERVAL);
        for w in &mut self.caps {
            if !due(w.said_at) {
                continue;
            }
            let s = w.connections.stats();
            let evicted = s.evicted - w.seen.evicted;
            let paused = s.paused - w.seen.paused;
            if evicted > 0 || paused > 0 {
                warn!(
                    socket = w.name,
                    open = s.open,
                    max = s.max,
                    evicted,
                    paused,
                    header_timeouts = s.header_timeouts - w.seen.header_timeouts,
                    "connection cap reached: silent connections closed to make room, or accepting \
                     paused (new clients wait in the kernel's queue)"
                );
                w.seen = s;
                w.said_at = Some(now);
            }
        }
        let rejected = self.rejected.count();
        if rejected > self.rejected_seen && due(self.rejected_said_at) {
            let last = self
                .rejected
                .last
                .lock()
                .ok()
                .and_then(|l| l.clone())
                .unwrap_or_default();
            warn!(
                ignored = rejected - self.rejected_seen,
                last = %last,
                "ignored notifications: only the app's own user (or root) may notify, and with \
                 --notify-access main only the generation's main process"
            );
            self.rejected_seen = rejected;
            self.rejected_said_at = Some(now);
        }
        let stray = self.stray_answers();
        if stray > self.stray_seen && due(self.stray_said_at) {
            warn!(
                connections = stray - self.stray_seen,
                "the app sent bytes past the end of its answers (a body after an answer to HEAD, \
                 more than an answer's Content-Length, an answer to nothing); baton closed the \
                 connections it saw them on before reusing them, but bytes that arrive after a \
                 connection carried the next request reach that request's client: fix the app's \
                 framing"
            );
            self.stray_seen = stray;
            self.stray_said_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_a_burst_through_then_counts() {
        let t0 = Instant::now();
        let mut t = Throttle::new(2, Duration::from_secs(10));
        assert_eq!(t.allow(t0), (true, 0));
        assert_eq!(t.allow(t0), (true, 0));
        assert_eq!(t.allow(t0), (false, 0));
        assert_eq!(t.allow(t0 + Duration::from_secs(9)), (false, 0));
        // A new window: the two suppressed are reported once.
        assert_eq!(t.allow(t0 + Duration::from_secs(10)), (true, 2));
        assert_eq!(t.allow(t0 + Duration::from_secs(11)), (true, 0));
    }
}
