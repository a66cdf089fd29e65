//! One generation as the proxy sees it: its private address, what is in
//! flight to it, and (HTTP) its idle keep-alive connections.
//!
//! Retiring an upstream drops its idle connections and, once nothing is in
//! flight, reports it drained exactly once: the guardian then sends the
//! generation its stop signal.
//!
//! The idle pool is bounded: at most [`POOL_MAX`] connections per proxy
//! thread, each closed after [`POOL_IDLE`] without use, so that clients that
//! came and went do not leave the app holding connections (and
//! descriptors) nobody will use.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::client::conn::http1::SendRequest;
use tokio::task::AbortHandle;

/// Idle keep-alive connections kept per proxy thread and generation.
pub const POOL_MAX: usize = 64;

/// How long a pooled connection may stay unused before it is closed (or
/// `--idle-timeout`, if shorter).
pub const POOL_IDLE: Duration = Duration::from_secs(15);

/// The body sent to a generation: the client's (bounded by a stall
/// timeout), or none (a replay).
pub type UpBody = Either<super::body::Bounded<hyper::body::Incoming>, Empty<Bytes>>;

/// A client connection to a generation: the request sender, and the task
/// that drives the connection, which is stopped (closing the socket) when
/// this is dropped.
#[derive(Debug)]
pub struct UpConn {
    /// Sends requests on it.
    pub sender: SendRequest<UpBody>,
    /// The connection's task.
    pub task: AbortHandle,
    /// When it was last checked in.
    idle_since: Instant,
}

impl UpConn {
    /// A connection driven by `task`.
    pub fn new(sender: SendRequest<UpBody>, task: AbortHandle) -> UpConn {
        UpConn {
            sender,
            task,
            idle_since: Instant::now(),
        }
    }
}

impl Drop for UpConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Called with the generation number when a retired upstream is drained.
pub type OnDrained = Box<dyn Fn(u64) + Send + Sync>;

/// A generation behind the proxy.
pub struct Upstream {
    /// Its generation number.
    pub generation: u64,
    /// Its private address.
    pub addr: SocketAddr,
    active: AtomicUsize,
    retired: AtomicBool,
    reported: AtomicBool,
    /// Idle keep-alive connections, one pool per proxy thread (a
    /// connection is driven by the thread that opened it).
    idle: Vec<Mutex<Vec<UpConn>>>,
    /// How long a pooled connection may stay unused.
    pool_idle: Duration,
    on_drained: OnDrained,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("generation", &self.generation)
            .field("addr", &self.addr)
            .field("active", &self.active())
            .field("retired", &self.retired.load(Ordering::SeqCst))
            .finish()
    }
}

/// Marks one request or connection in flight to an upstream while alive.
#[derive(Debug)]
pub struct Active(Arc<Upstream>);

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.retired.load(Ordering::SeqCst)
        {
            self.0.report();
        }
    }
}

impl Upstream {
    /// A new upstream for `generation` at `addr`, whose pooled connections
    /// are closed after `pool_idle` unused.
    pub fn new(
        generation: u64,
        addr: SocketAddr,
        pool_idle: Duration,
        on_drained: OnDrained,
    ) -> Arc<Upstream> {
        Arc::new(Upstream {
            generation,
            addr,
            active: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            idle: (0..super::threads())
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            pool_idle,
            on_drained,
        })
    }

    /// Counts something in flight until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::SeqCst);
        Active(Arc::clone(self))
    }

    /// Counts something in flight, unless the upstream was retired: a
    /// retired generation may already have been told to stop. (`retire`
    /// stores then reads the count; this adds then reads the flag; with
    /// sequential consistency one of the two always sees the other.)
    pub fn enter_if_open(self: &Arc<Self>) -> Option<Active> {
        let active = self.enter();
        (!self.is_retired()).then_some(active)
    }

    /// How much is in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Whether it was retired.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// No new traffic; report drained once nothing is in flight.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        for pool in &self.idle {
            pool.lock().map(|mut idle| idle.clear()).ok();
        }
        if self.active() == 0 {
            self.report();
        }
    }

    fn report(&self) {
        if !self.reported.swap(true, Ordering::SeqCst) {
            (self.on_drained)(self.generation);
        }
    }

    /// An idle keep-alive connection to it, if one is still open.
    pub fn checkout(&self) -> Option<UpConn> {
        let mut idle = self.idle.get(super::slot())?.lock().ok()?;
        let now = Instant::now();
        idle.retain(|c| !c.sender.is_closed() && now.duration_since(c.idle_since) < self.pool_idle);
        // A connection just checked in may not be ready for a moment yet:
        // keep it, take a ready one.
        let ready = idle.iter().rposition(|c| c.sender.is_ready())?;
        Some(idle.swap_remove(ready))
    }

    /// Keeps a connection whose last exchange completed, for reuse; closes
    /// it instead if the pool is full.
    pub fn checkin(&self, mut conn: UpConn) {
        if conn.sender.is_closed() {
            return;
        }
        if let Some(Ok(mut idle)) = self.idle.get(super::slot()).map(Mutex::lock)
            // Under the lock: `retire` clears the pools under it too, so a
            // connection never lands in a retired pool.
            && !self.is_retired()
            && idle.len() < POOL_MAX
        {
            conn.idle_since = Instant::now();
            idle.push(conn);
        }
    }

    /// Closes this thread's pooled connections that have been idle for
    /// [`POOL_IDLE`] (or were closed by the app).
    pub fn sweep(&self) {
        if let Some(Ok(mut idle)) = self.idle.get(super::slot()).map(Mutex::lock) {
            let now = Instant::now();
            idle.retain(|c| {
                !c.sender.is_closed() && now.duration_since(c.idle_since) < self.pool_idle
            });
        }
    }

    /// Pooled connections on this thread.
    pub fn pooled(&self) -> usize {
        self.idle
            .get(super::slot())
            .and_then(|p| p.lock().ok().map(|p| p.len()))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn drained_is_reported_once_when_the_last_request_ends() {
        let reported = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&reported);
        let u = Upstream::new(
            7,
            "127.0.0.1:1".parse().unwrap(),
            POOL_IDLE,
            Box::new(move |g| {
                seen.fetch_add(g, Ordering::SeqCst);
            }),
        );
        let a = u.enter();
        let b = u.enter();
        u.retire();
        assert_eq!(reported.load(Ordering::SeqCst), 0, "two in flight");
        drop(a);
        assert_eq!(reported.load(Ordering::SeqCst), 0, "one in flight");
        drop(b);
        assert_eq!(reported.load(Ordering::SeqCst), 7);
        drop(u.enter());
        assert_eq!(reported.load(Ordering::SeqCst), 7, "reported once");
    }

    #[test]
    fn an_idle_upstream_is_drained_at_once() {
        let reported = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&reported);
        let u = Upstream::new(
            1,
            "127.0.0.1:1".parse().unwrap(),
            POOL_IDLE,
            Box::new(move |_| seen.store(true, Ordering::SeqCst)),
        );
        u.retire();
        assert!(reported.load(Ordering::SeqCst));
    }
}
