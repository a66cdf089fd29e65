//! The connection cap shared by every listener and thread that serve with
//! it ([`Connections`]): admission, eviction of the oldest silent
//! connection, pausing at the cap, and the counters of what the cap and the
//! timeouts did. Each connection holds a [`Ticket`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A cap on concurrent connections, shared across listeners and threads,
/// and counters of what the cap and the timeouts did.
///
/// Each connection holds a [`Ticket`] for its whole life. At the cap,
/// [`Connections::admit`] closes the oldest connection that has not sent a
/// byte yet ([`Ticket::spoke`] was not called) and waits for its slot; with
/// none to close, it waits for any slot to free up.
#[derive(Debug)]
pub struct Connections {
    max: usize,
    state: Mutex<Slots>,
    freed: Notify,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Slots {
    open: usize,
    next_id: u64,
    /// Connections that have not sent a byte, oldest first, with the
    /// notification that closes them.
    silent: BTreeMap<u64, Arc<Notify>>,
    /// Connections asked to make room that have not closed yet: while one
    /// is on its way out, no other is evicted.
    leaving: std::collections::BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    evicted: AtomicU64,
    paused: AtomicU64,
    header_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
}

/// A snapshot of [`Connections`]' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: usize,
    /// The cap.
    pub max: usize,
    /// Connections admitted so far.
    pub accepted: u64,
    /// Silent connections closed to make room for a new one.
    pub evicted: u64,
    /// Times accepting paused because every slot was busy.
    pub paused: u64,
    /// Connections cut because a request head was not complete in time.
    pub header_timeouts: u64,
    /// Connections closed after the idle timeout (idle between requests, or
    /// a client not reading its response).
    pub idle_timeouts: u64,
}

impl Connections {
    /// A limit of `max` concurrent connections (at least 1).
    pub fn new(max: usize) -> Arc<Connections> {
        Arc::new(Connections {
            max: max.max(1),
            state: Mutex::new(Slots::default()),
            freed: Notify::new(),
            counters: Counters::default(),
        })
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The counters.
    pub fn stats(&self) -> ConnectionStats {
        let open = self.slots().open;
        let c = &self.counters;
        ConnectionStats {
            open,
            max: self.max,
            accepted: c.accepted.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            paused: c.paused.load(Ordering::Relaxed),
            header_timeouts: c.header_timeouts.load(Ordering::Relaxed),
            idle_timeouts: c.idle_timeouts.load(Ordering::Relaxed),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // The lock guards plain counters and a map; a panic while holding it
        // cannot leave them inconsistent in a way that matters more than
        // refusing to serve.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a connection closed because its client took longer than the
    /// header timeout to send a request head (for servers of their own
    /// that share these counters, such as a proxy).
    pub fn count_header_timeout(&self) {
        self.counters
            .header_timeouts
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection closed after the idle timeout.
    pub fn count_idle_timeout(&self) {
        self.counters.idle_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Completes once no connection is open.
    pub async fn closed(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.slots().open == 0 {
                return;
            }
            freed.await;
        }
    }

    /// A slot for a connection already accepted when the server stops
    /// accepting: it is served even above the cap (one per listener at
    /// most), rather than dropped.
    pub fn admit_over_cap(self: &Arc<Self>) -> Ticket {
        let mut slots = self.slots();
        slots.open += 1;
        slots.next_id += 1;
        let id = slots.next_id;
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        Ticket {
            connections: Arc::clone(self),
            id,
            evict: Arc::new(Notify::new()),
        }
    }

    /// A slot for one connection: at once below the cap; at the cap, after
    /// the oldest silent connection was closed, or after any connection
    /// ended.
    pub async fn admit(self: &Arc<Self>) -> Ticket {
        let mut paused = false;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so no release can slip in between.
            freed.as_mut().enable();
            {
                let mut slots = self.slots();
                if slots.open < self.max {
                    slots.open += 1;
                    slots.next_id += 1;
                    let id = slots.next_id;
                    let evict = Arc::new(Notify::new());
                    slots.silent.insert(id, Arc::clone(&evict));
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    return Ticket {
                        connections: Arc::clone(self),
                        id,
                        evict,
                    };
                }
                if !slots.leaving.is_empty() {
                    // A slot is about to be freed.
                } else if let Some((id, evict)) = slots.silent.pop_first() {
                    slots.leaving.insert(id);
                    evict.notify_one();
                } else if !paused {
                    paused = true;
                    self.counters.paused.fetch_add(1, Ordering::Relaxed);
                }
            }
            freed.await;
        }
    }
}

/// One connection's slot in [`Connections`]; freed when dropped.
#[derive(Debug)]
pub struct Ticket {
    connections: Arc<Connections>,
    id: u64,
    evict: Arc<Notify>,
}

impl Ticket {
    /// The client sent something: it is no longer a candidate for eviction.
    /// If it had just been chosen to make room, it declines (it is not
    /// silent after all) and the admission waiting for room chooses another.
    pub fn spoke(&self) {
        let declined = {
            let mut slots = self.connections.slots();
            slots.silent.remove(&self.id);
            slots.leaving.remove(&self.id)
        };
        if declined {
            self.connections.freed.notify_waiters();
        }
    }

    /// Completes when this connection was chosen to make room.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut slots = self.connections.slots();
            slots.open = slots.open.saturating_sub(1);
            slots.silent.remove(&self.id);
            if slots.leaving.remove(&self.id) {
                // Asked to make room, and did not decline.
                self.connections
                    .counters
                    .evicted
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        // Every waiting admission looks again (each registered before it
        // looked, so none misses this): one takes the slot, the others may
        // have a silent connection to ask to leave.
        self.connections.freed.notify_waiters();
    }
}
