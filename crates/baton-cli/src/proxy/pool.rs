//! Idle keep-alive connections to a generation, kept for the next request.
//!
//! A pooled connection carries the next client's request, so whatever the
//! app sends on it while it is idle would be read as the next client's
//! answer. The rules that keep one client's answer from reaching another:
//! - only a connection whose exchange provably ended comes back (the
//!   exchange decides: see `proxy::http`), with nothing read beyond its
//!   answer;
//! - each is checked out only after a real `recv(MSG_PEEK)` finds nothing
//!   waiting on it (a runtime's cached readiness can lag behind bytes that
//!   already arrived);
//! - while it is idle, its readiness wakes this thread's watcher
//!   ([`watch`]), which closes a connection at once when anything arrives
//!   on it (bytes out of turn, or the app's close), as nginx's keep-alive
//!   cache does;
//! - the oldest is handed out first, so that a connection rests in the
//!   pool as long as the traffic allows, and late bytes have the most time
//!   to show themselves.
//!
//! Bounds: at most [`POOL_MAX`] connections per proxy thread and
//! generation, each closed after [`POOL_IDLE`] (or `--idle-timeout`, if
//! shorter) unused, swept also when no request comes. Each proxy thread
//! has its own part of each pool (a connection is driven by the runtime of
//! the thread that opened it); [`Pool::close`] empties them all.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::Interest;

use crate::sys::socket::{Waiting, waiting};

/// Idle keep-alive connections kept per proxy thread and generation.
pub const POOL_MAX: usize = 64;

/// How long a pooled connection may stay unused before it is closed (or
/// `--idle-timeout`, if shorter).
pub const POOL_IDLE: Duration = Duration::from_secs(15);

/// A keep-alive connection to a generation, and what was read from it but
/// not yet relayed (nothing, while it is pooled).
#[derive(Debug)]
pub struct UpConn {
    /// The socket.
    pub stream: tokio::net::TcpStream,
    /// Bytes read from the app, not yet relayed.
    pub buf: BytesMut,
    /// When it was last checked in.
    idle_since: Instant,
}

impl UpConn {
    /// A fresh connection.
    pub fn new(stream: tokio::net::TcpStream) -> UpConn {
        UpConn {
            stream,
            buf: BytesMut::new(),
            idle_since: Instant::now(),
        }
    }

    /// Whether nothing has arrived on it, asked of the kernel; bytes that
    /// did are counted in `stray`.
    fn quiet(&self, stray: &AtomicU64) -> bool {
        match waiting(self.stream.as_fd()) {
            Waiting::Nothing => true,
            Waiting::Bytes => {
                stray.fetch_add(1, Ordering::Relaxed);
                false
            }
            Waiting::End => false,
        }
    }

    /// Asks to be woken through `cx` when anything arrives on it. `false`
    /// if something already has (or it broke): it must not be reused.
    fn watch(&self, cx: &mut Context<'_>, stray: &AtomicU64) -> bool {
        match self.stream.poll_read_ready(cx) {
            // Registered: nothing seen yet.
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readiness the runtime keeps from before (an answer read in
            // full leaves it set), or news: the kernel tells which. When it
            // is stale, clearing it lets the next poll register.
            Poll::Ready(Ok(())) => {
                if !self.quiet(stray) {
                    return false;
                }
                let _ = self.stream.try_io(Interest::READABLE, || {
                    Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                });
                match self.stream.poll_read_ready(cx) {
                    Poll::Pending => true,
                    // Something arrived since the peek, or a readiness the
                    // runtime will not let go: the sweep looks again.
                    Poll::Ready(Ok(())) => self.quiet(stray),
                    Poll::Ready(Err(_)) => false,
                }
            }
        }
    }
}

/// One proxy thread's part of a pool.
#[derive(Debug, Default)]
struct Part {
    /// Oldest first.
    conns: VecDeque<UpConn>,
    /// Listed in this thread's watch list.
    listed: bool,
}

/// A generation's idle connections, one part per proxy thread.
#[derive(Debug)]
pub struct Pool {
    parts: Vec<Mutex<Part>>,
    /// How long a connection may stay unused.
    max_idle: Duration,
    /// No more check-ins (the generation was retired).
    closed: AtomicBool,
    /// Connections closed because the app sent bytes on them that no
    /// request asked for (shared by all pools of the proxy).
    stray: Arc<AtomicU64>,
}

thread_local! {
    /// This thread's watcher and the pools it keeps an eye on.
    static WATCH: RefCell<Watch> = const {
        RefCell::new(Watch { waker: None, pools: Vec::new() })
    };
}

#[derive(Debug)]
struct Watch {
    waker: Option<Waker>,
    pools: Vec<Weak<Pool>>,
}

impl Pool {
    /// An empty pool with a part for each of `threads` proxy threads, whose
    /// connections are closed after `max_idle` unused; connections closed
    /// for bytes out of turn are counted in `stray`.
    pub fn new(threads: usize, max_idle: Duration, stray: Arc<AtomicU64>) -> Arc<Pool> {
        Arc::new(Pool {
            parts: (0..threads.max(1))
                .map(|_| Mutex::new(Part::default()))
                .collect(),
            max_idle,
            closed: AtomicBool::new(false),
            stray,
        })
    }

    fn part(&self) -> Option<std::sync::MutexGuard<'_, Part>> {
        self.parts.get(super::slot::slot())?.lock().ok()
    }

    /// The oldest idle connection on this thread that is still open and
    /// quiet; those found closed, stale or too old are closed on the way.
    pub fn checkout(&self) -> Option<UpConn> {
        let mut part = self.part()?;
        let now = Instant::now();
        while let Some(conn) = part.conns.pop_front() {
            if now.duration_since(conn.idle_since) < self.max_idle && conn.quiet(&self.stray) {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection whose exchange provably ended, for reuse; closes
    /// it instead if anything is left of the answer, anything arrived
    /// since, the pool is closed or full.
    pub fn checkin(self: &Arc<Self>, mut conn: UpConn) {
        if !conn.buf.is_empty() {
            // Bytes after the answer, read with it.
            self.stray.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let watching = WATCH.with(|w| w.borrow().waker.clone());
        let waker = watching.as_ref().unwrap_or(Waker::noop());
        if !conn.watch(&mut Context::from_waker(waker), &self.stray) {
            return;
        }
        let Some(mut part) = self.part() else {
            return;
        };
        // Under the lock: `close` empties the parts under it too, so a
        // connection never lands in a closed pool.
        if self.closed.load(Ordering::SeqCst) || part.conns.len() >= POOL_MAX {
            return;
        }
        conn.idle_since = Instant::now();
        part.conns.push_back(conn);
        if watching.is_some() && !part.listed {
            part.listed = true;
            WATCH.with(|w| w.borrow_mut().pools.push(Arc::downgrade(self)));
        }
    }

    /// Closes every idle connection and takes no more.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for part in &self.parts {
            part.lock().map(|mut p| p.conns.clear()).ok();
        }
    }

    /// Idle connections on this thread.
    pub fn idle(&self) -> usize {
        self.part().map_or(0, |p| p.conns.len())
    }

    /// Closes this thread's connections that were idle too long or on
    /// which anything arrived; watches the others through `cx`.
    /// `false` once the pool is closed: the watcher forgets it.
    fn sweep(&self, cx: &mut Context<'_>) -> bool {
        let Some(mut part) = self.part() else {
            return false;
        };
        let now = Instant::now();
        let max_idle = self.max_idle;
        let stray = &*self.stray;
        part.conns
            .retain(|c| now.duration_since(c.idle_since) < max_idle && c.watch(cx, stray));
        let open = !self.closed.load(Ordering::SeqCst);
        part.listed = open;
        open
    }
}

thread_local! {
    /// How often this thread's watcher sweeps: the shortest any proxy on
    /// the thread asked for.
    static PERIOD: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::from_secs(3600)) };
}

/// A proxy on this thread wants its pools swept at least every `period`
/// (a quarter of their idle time).
pub fn want_period(period: Duration) {
    PERIOD.with(|p| p.set(p.get().min(period)));
    // The watcher takes it at once.
    WATCH.with(|w| {
        if let Some(waker) = &w.borrow().waker {
            waker.wake_by_ref();
        }
    });
}

/// This proxy thread's pool watcher, run for as long as the thread runs:
/// woken when anything arrives on an idle connection of any pool on this
/// thread, and every period [`want_period`] asked for; closes what must
/// not be reused.
pub async fn watch() {
    let mut period = PERIOD.with(std::cell::Cell::get);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    std::future::poll_fn(|cx| {
        let wanted = PERIOD.with(std::cell::Cell::get);
        if wanted < period {
            period = wanted;
            tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        while tick.poll_tick(cx).is_ready() {}
        let pools = WATCH.with(|w| {
            let mut w = w.borrow_mut();
            if !w.waker.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
                w.waker = Some(cx.waker().clone());
            }
            std::mem::take(&mut w.pools)
        });
        let kept: Vec<Weak<Pool>> = pools
            .into_iter()
            .filter(|p| p.upgrade().is_some_and(|p| p.sweep(cx)))
            .collect();
        WATCH.with(|w| {
            let mut w = w.borrow_mut();
            // Pools listed while this ran come after the ones kept.
            let mut added = std::mem::replace(&mut w.pools, kept);
            w.pools.append(&mut added);
        });
        Poll::<()>::Pending
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A pooled connection to a local server; the server's side of it.
    async fn pooled(pool: &Arc<Pool>) -> std::net::TcpStream {
        checked_in(pool, 1).await
    }

    /// Checks a new connection in; `added`: how many the pool gains.
    async fn checked_in(pool: &Arc<Pool>, added: usize) -> std::net::TcpStream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().unwrap();
        let before = pool.idle();
        pool.checkin(UpConn::new(stream));
        assert_eq!(pool.idle(), before + added);
        server
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn bytes_the_runtime_has_not_seen_yet_keep_a_connection_from_checkout() {
        runtime().block_on(async {
            let stray = Arc::new(AtomicU64::new(0));
            let pool = Pool::new(1, POOL_IDLE, Arc::clone(&stray));
            let mut server = pooled(&pool).await;
            // Delivered on loopback before `write` returns; the runtime has
            // not polled for events since (nothing here awaits).
            server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
            assert!(pool.checkout().is_none());
            assert_eq!(stray.load(Ordering::Relaxed), 1);
            // A quiet one is handed out, the oldest first.
            let first = pooled(&pool).await;
            let _second = pooled(&pool).await;
            let conn = pool.checkout().expect("quiet");
            assert_eq!(
                conn.stream.local_addr().unwrap(),
                first.peer_addr().unwrap(),
                "oldest first"
            );
            // A closed one is not, and is not counted as stray.
            drop(_second);
            assert!(pool.checkout().is_none());
            assert_eq!(stray.load(Ordering::Relaxed), 1);
        });
    }

    #[test]
    fn the_watcher_closes_a_connection_the_moment_bytes_arrive_on_it() {
        runtime().block_on(async {
            // No sweep for an hour: only the bytes' arrival can wake it.
            let watcher = {
                want_period(Duration::from_secs(3600));
                tokio::spawn(watch())
            };
            tokio::task::yield_now().await;
            let stray = Arc::new(AtomicU64::new(0));
            let pool = Pool::new(1, POOL_IDLE, Arc::clone(&stray));
            let mut server = pooled(&pool).await;
            let mut quiet = pooled(&pool).await;
            server.write_all(b"late").unwrap();
            tokio::time::timeout(Duration::from_secs(10), async {
                while pool.idle() != 1 {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("closed by the watcher");
            assert_eq!(stray.load(Ordering::Relaxed), 1);
            // baton's side is closed (with the bytes unread: a reset).
            server
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut byte = [0u8; 1];
            match std::io::Read::read(&mut server, &mut byte) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("still open: {other:?}"),
            }
            // The quiet one is still there, and is watched too.
            quiet.write_all(b"x").unwrap();
            tokio::time::timeout(Duration::from_secs(10), async {
                while pool.idle() != 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("closed by the watcher");
            // A closed pool takes nothing more.
            pool.close();
            let _server = checked_in(&pool, 0).await;
            watcher.abort();
        });
    }
}
