//! The proxy's threads: each a single-threaded runtime that accepts on
//! every listener and keeps a client connection, its requests and their
//! upstream connections to itself. Started once, with the first proxy, and
//! shared by every service's proxy; a proxy is stopped to drain (its
//! serving ends on each thread, the threads stay).

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

/// A proxy's serving on one thread, made on that thread (its future
/// holds the thread's own runtime objects).
type Job = Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send>;

/// The proxy's threads, started with the first proxy and shared by every
/// proxy after it (a baton that runs several services has one set): each
/// a single-threaded runtime with its one-second tick and its pool
/// watcher, serving the jobs it is given.
static SHARED: std::sync::Mutex<Vec<tokio::sync::mpsc::UnboundedSender<Job>>> =
    std::sync::Mutex::new(Vec::new());

/// The senders of jobs to the `n` proxy threads, started if need be.
fn shared(n: usize) -> std::io::Result<Vec<tokio::sync::mpsc::UnboundedSender<Job>>> {
    let mut threads = SHARED
        .lock()
        .map_err(|_| std::io::Error::other("the proxy threads' lock"))?;
    while threads.len() < n {
        let index = threads.len();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, mut jobs) = tokio::sync::mpsc::unbounded_channel::<Job>();
        std::thread::Builder::new()
            .name(format!("baton-proxy-{index}"))
            .spawn(move || {
                // Signals go to the guardian's thread alone (an upgrade
                // counts on it to keep them across its exec).
                let _ = crate::sys::exec::block_signals();
                slot::enter(index);
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let _ticks = slot::start_ticks();
                    let _watch = tokio::task::spawn_local(pool::watch());
                    while let Some(job) = jobs.recv().await {
                        tokio::task::spawn_local(job());
                    }
                });
            })?;
        threads.push(tx);
    }
    Ok(threads[..n].to_vec())
}

/// Starts the proxy on the proxy threads (`threads` of them, the first
/// time; every proxy after the first uses the same): on each, it accepts
/// on (duplicates of) every listener and keeps each client connection,
/// its requests and their upstream connections on that one thread: no
/// cross-thread wakeups on the data path. `listeners` are duplicates of
/// baton's (`true` marks a Unix socket).
pub fn start(
    mode: Mode,
    listeners: Vec<(std::os::fd::OwnedFd, bool)>,
    proxy: Arc<Proxy>,
    threads: usize,
) -> std::io::Result<Handle> {
    let (stop, stopped) = watch::channel(false);
    let n = slot::init_threads(threads);
    let senders = shared(n)?;
    let alive = Arc::new((
        std::sync::atomic::AtomicUsize::new(n),
        tokio::sync::Notify::new(),
    ));
    for tx in senders {
        let mine = listeners
            .iter()
            .map(|(fd, unix)| Ok((fd.try_clone()?, *unix)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let (proxy, stopped) = (Arc::clone(&proxy), stopped.clone());
        let alive = Arc::clone(&alive);
        let job: Job = Box::new(move || {
            Box::pin(async move {
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
                        pool::want_period(
                            (proxy.limits.pool_idle() / 4).max(Duration::from_millis(100)),
                        );
                        http::serve(listeners, Arc::clone(&proxy), stopped).await;
                    }
                    Mode::Tcp => tcp::serve(listeners, Arc::clone(&proxy), stopped).await,
                }
                // Relays and spliced upgrades run as their own tasks: the
                // proxy has ended once they have.
                let open = || {
                    proxy
                        .counters
                        .open_streams
                        .load(std::sync::atomic::Ordering::SeqCst)
                };
                while open() > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let (count, ended) = &*alive;
                count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                ended.notify_waiters();
            })
        });
        if tx.send(job).is_err() {
            return Err(std::io::Error::other("a proxy thread has gone"));
        }
    }
    Ok(Handle { stop, alive })
}
