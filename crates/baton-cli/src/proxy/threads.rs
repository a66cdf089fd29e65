//! The proxy's threads: each a single-threaded runtime that accepts on
//! every listener and keeps a client connection, its requests and their
//! upstream connections to itself; started once, stopped to drain.

use std::net::TcpListener as StdTcpListener;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::route::{Mode, Proxy};
use super::{http, pool, slot, tcp};

/// The proxy's threads: stop them to drain client connections.
#[derive(Debug)]
pub struct Handle {
    stop: watch::Sender<bool>,
    /// Threads still running, and the news when one ends.
    alive: Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>,
}

impl Handle {
    /// Stops accepting and drains client connections (HTTP: lame duck);
    /// nothing is cut: each thread ends once its connections have.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Completes once every thread has ended (after [`Handle::stop`]).
    pub fn finished(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let alive = Arc::clone(&self.alive);
        async move { wait_ended(&alive).await }
    }
}

async fn wait_ended(alive: &(std::sync::atomic::AtomicUsize, tokio::sync::Notify)) {
    let (alive, ended) = alive;
    loop {
        let news = ended.notified();
        tokio::pin!(news);
        news.as_mut().enable();
        if alive.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return;
        }
        news.await;
    }
}

/// The default number of proxy threads: half the cores (at least one), so
/// that the app behind the proxy keeps the other half.
pub fn default_threads() -> usize {
    (std::thread::available_parallelism().map_or(2, |n| n.get()) / 2).max(1)
}

/// Starts the proxy: `threads` threads, each with a single-threaded
/// runtime that accepts on (duplicates of) every listener and keeps each
/// client connection, its requests and their upstream connections on that
/// one thread: no cross-thread wakeups on the data path. `listeners` are
/// duplicates of baton's (`true` marks a Unix socket).
pub fn start(
    mode: Mode,
    listeners: Vec<(std::os::fd::OwnedFd, bool)>,
    proxy: Arc<Proxy>,
    threads: usize,
) -> std::io::Result<Handle> {
    let (stop, stopped) = watch::channel(false);
    let n = slot::init_threads(threads);
    let alive = Arc::new((
        std::sync::atomic::AtomicUsize::new(n),
        tokio::sync::Notify::new(),
    ));
    for index in 0..n {
        let mine = listeners
            .iter()
            .map(|(fd, unix)| Ok((fd.try_clone()?, *unix)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (proxy, stopped) = (Arc::clone(&proxy), stopped.clone());
        let alive = Arc::clone(&alive);
        std::thread::Builder::new()
            .name(format!("baton-proxy-{index}"))
            .spawn(move || {
                // Signals go to the guardian's thread alone (an upgrade
                // counts on it to keep them across its exec).
                let _ = crate::sys::exec::block_signals();
                slot::enter(index);
                runtime.block_on(async move {
                    let ticks = slot::start_ticks();
                    let listeners: Vec<baton::serve::AsyncListener> = mine
                        .into_iter()
                        .filter_map(|(fd, unix)| {
                            let listener = if unix {
                                baton::Listener::Unix(std::os::unix::net::UnixListener::from(fd))
                            } else {
                                baton::Listener::Tcp(StdTcpListener::from(fd))
                            };
                            baton::serve::AsyncListener::from_listener(listener).ok()
                        })
                        .collect();
                    match mode {
                        Mode::Http => {
                            let period =
                                (proxy.limits.pool_idle() / 4).max(Duration::from_millis(100));
                            let sweeper = tokio::spawn(pool::watch(period));
                            http::serve(listeners, Arc::clone(&proxy), stopped).await;
                            sweeper.abort();
                            // Its connections go with its runtime; a
                            // thread started again (`resume`) begins anew.
                            pool::forget_thread();
                        }
                        Mode::Tcp => tcp::serve(listeners, Arc::clone(&proxy), stopped).await,
                    }
                    // Relays and spliced upgrades run as their own tasks:
                    // they end before the runtime goes.
                    let open = || {
                        proxy
                            .counters
                            .open_streams
                            .load(std::sync::atomic::Ordering::SeqCst)
                    };
                    while open() > 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    ticks.abort();
                });
                let (count, ended) = &*alive;
                count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                ended.notify_waiters();
            })?;
    }
    Ok(Handle { stop, alive })
}
