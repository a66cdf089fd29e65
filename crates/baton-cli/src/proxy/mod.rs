//! Proxy mode (`--proxy http|tcp`): for apps that bind their own port and
//! will never read `LISTEN_FDS`. baton keeps the public listeners and
//! accepts every client connection itself; each generation listens on a
//! private loopback port of its own (handed in `$PORT`); new traffic goes to
//! the generation that is current, switched atomically when a new one is
//! ready.
//!
//! Invariants:
//! - a client connection belongs to baton, never to a generation: after a
//!   switch its next request goes to the new generation, so a reload never
//!   closes a connection under a client (HTTP mode);
//! - a retired generation gets its stop signal only once nothing baton sent
//!   it is still in flight (or at the stop timeout);
//! - a request is retried (once) only when no byte of it reached the
//!   generation: a refused connect, or a pooled connection found closed.
//!
//! The proxy runs on its own multi-threaded runtime, in its own thread, so
//! the data path uses every core while the guardian's event loop stays
//! single-threaded. They talk through [`Proxy`] (shared, lock-light) and the
//! guardian's event channel (drained upstreams).

mod conn_io;
pub mod http;
pub mod pool;
mod socket;
pub mod tcp;
pub mod upstream;

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use upstream::Upstream;

/// Which protocol the proxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// HTTP/1.1: client connections are baton's; requests go to the
    /// current generation.
    Http,
    /// A byte relay for any protocol; a connection stays with the generation
    /// it was paired with.
    Tcp,
}

/// What bounds the proxy's connections and waits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Client connections: header and idle timeouts, half-close, the
    /// connection cap (shared by every proxy thread), the drain.
    pub serve: baton::serve::Options,
    /// How long a generation may take to start answering a request (HTTP),
    /// and the longest pause within its answer's body.
    pub upstream_timeout: Duration,
    /// Pass on request header names with underscores (HTTP).
    pub keep_underscores: bool,
    /// Close a connection to the app after a request with a body (HTTP).
    pub close_after_body: bool,
}

impl Limits {
    /// How long a pooled connection to a generation may stay unused:
    /// [`pool::POOL_IDLE`], or the idle timeout if shorter.
    pub fn pool_idle(&self) -> Duration {
        self.serve
            .idle_timeout
            .map_or(pool::POOL_IDLE, |idle| idle.min(pool::POOL_IDLE))
    }
}

impl Mode {
    /// The mode as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Tcp => "tcp",
        }
    }
}

/// The generation new traffic goes to, shared by the guardian (which
/// switches it) and the proxy (which reads it on every request).
#[derive(Debug)]
pub struct Proxy {
    /// The serving generation's worker processes (one, without
    /// `--workers`); requests go round the members.
    current: watch::Sender<Vec<Arc<Upstream>>>,
    turn: std::sync::atomic::AtomicUsize,
    /// A canary split (`--canary`): the previous generation's workers,
    /// kept warm, and the share of new requests (per cent) the current one
    /// gets; 100: no split.
    split: std::sync::RwLock<Vec<Arc<Upstream>>>,
    split_percent: std::sync::atomic::AtomicU8,
    split_count: std::sync::atomic::AtomicU64,
    /// How long a request waits for a generation when none can take it.
    pub wait: Duration,
    /// Timeouts and caps.
    pub limits: Limits,
    /// For metrics.
    pub counters: Counters,
    /// baton is about to stop (`--shutdown-delay`): answers carry
    /// `Connection: close`, so keep-alive clients reconnect elsewhere.
    pub lame_duck: std::sync::atomic::AtomicBool,
}

impl Proxy {
    /// A proxy with no generation yet.
    pub fn new(wait: Duration, limits: Limits) -> Arc<Proxy> {
        Arc::new(Proxy {
            current: watch::Sender::new(Vec::new()),
            turn: std::sync::atomic::AtomicUsize::new(0),
            split: std::sync::RwLock::new(Vec::new()),
            split_percent: std::sync::atomic::AtomicU8::new(100),
            split_count: std::sync::atomic::AtomicU64::new(0),
            wait,
            limits,
            counters: Counters::default(),
            lame_duck: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The client connections' cap and counters.
    pub fn connections(&self) -> &Arc<baton::serve::Connections> {
        &self.limits.serve.connections
    }

    /// The serving generation's workers.
    pub fn members(&self) -> Vec<Arc<Upstream>> {
        self.current.borrow().clone()
    }

    /// The next of `members` in turn other than `avoid` and not retired.
    fn pick(
        &self,
        members: &[Arc<Upstream>],
        avoid: Option<&Arc<Upstream>>,
    ) -> Option<Arc<Upstream>> {
        use std::sync::atomic::Ordering;
        let n = members.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &members[(start + i) % n])
            .find(|m| !m.is_retired() && avoid.is_none_or(|a| !Arc::ptr_eq(a, m)))
            .cloned()
    }

    /// A worker of the current generation, if one is serving.
    pub fn current(&self) -> Option<Arc<Upstream>> {
        self.pick(&self.current.borrow(), None)
    }

    /// Sends new traffic to `members` from now on (or to nobody).
    pub fn switch(&self, members: Vec<Arc<Upstream>>) {
        self.current.send_replace(members);
    }

    /// Splits new traffic: `percent` to the current generation, the rest
    /// to `other`'s workers (empty, or 100: no split).
    pub fn split(&self, other: Vec<Arc<Upstream>>, percent: u8) {
        use std::sync::atomic::Ordering;
        let percent = if other.is_empty() {
            100
        } else {
            percent.min(100)
        };
        if let Ok(mut slot) = self.split.write() {
            *slot = other;
        }
        self.split_percent.store(percent, Ordering::SeqCst);
    }

    /// The other side of a canary split, for this request, if it is its
    /// turn: requests are counted out, so the shares are exact.
    fn split_turn(&self) -> Option<Arc<Upstream>> {
        use std::sync::atomic::Ordering;
        let percent = u64::from(self.split_percent.load(Ordering::Relaxed));
        if percent >= 100 {
            return None;
        }
        let n = self.split_count.fetch_add(1, Ordering::Relaxed);
        if n % 100 < percent {
            return None;
        }
        let other = self.split.read().ok()?;
        self.pick(&other, None)
    }

    /// A worker of the current generation, counted as in flight; waits
    /// for one when there is none. Never a retired one (see
    /// [`Upstream::enter_if_open`]).
    pub async fn acquire(&self) -> Option<(Arc<Upstream>, upstream::Active)> {
        if let Some(other) = self.split_turn()
            && let Some(active) = other.enter_if_open()
        {
            return Some((other, active));
        }
        let mut failed: Option<Arc<Upstream>> = None;
        for _ in 0..8 {
            let picked = self.pick(&self.current.borrow(), failed.as_ref());
            let candidate = match picked {
                Some(c) => c,
                None => self.next(failed.as_ref()).await?,
            };
            if let Some(active) = candidate.enter_if_open() {
                return Some((candidate, active));
            }
            failed = Some(candidate);
        }
        None
    }

    /// A current worker other than `failed`: waits (up to [`Proxy::wait`])
    /// for a switch when there is none, as clients of a socket-passing
    /// reload wait in the accept queue.
    pub async fn next(&self, failed: Option<&Arc<Upstream>>) -> Option<Arc<Upstream>> {
        let usable = |members: &Vec<Arc<Upstream>>| {
            members
                .iter()
                .any(|m| !m.is_retired() && failed.is_none_or(|f| !Arc::ptr_eq(f, m)))
        };
        let mut rx = self.current.subscribe();
        let found = tokio::time::timeout(self.wait, rx.wait_for(usable)).await;
        match found {
            Ok(Ok(members)) => {
                let members = members.clone();
                self.pick(&members, failed)
            }
            _ => None,
        }
    }
}

/// A free loopback port for a generation to listen on. The port is
/// released before the app binds it; another process taking it in between
/// makes that generation fail its check and roll back.
pub fn private_port() -> std::io::Result<u16> {
    Ok(StdTcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// How long a connect to a generation may take. On loopback it is
/// immediate unless the app's accept queue is full, when the kernel drops
/// the SYN and retries for about two minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `addr` within [`CONNECT_TIMEOUT`], treating a TCP
/// self-connection as refused: with nothing listening on a loopback port in
/// the ephemeral range, a connect can pick that very port as its source and
/// "succeed" by connecting to itself (a simultaneous open).
///
/// On a proxy thread the timeout is checked at the thread's one-second
/// tick (so it is 10 to 11 s) instead of with a timer of its own: a timer
/// due before every other one makes the runtime wake its own event loop
/// through an eventfd, two system calls for each connection.
pub async fn connect(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    connect_within(addr, CONNECT_TIMEOUT).await
}

/// [`connect`] with a time limit of one's own.
async fn connect_within(
    addr: SocketAddr,
    limit: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out (the app's accept queue is full?)",
        )
    };
    let connecting = tokio::net::TcpStream::connect(addr);
    let stream = match TICKS.with(|t| t.borrow().clone()) {
        Some(mut ticks) => {
            let started = std::time::Instant::now();
            let mut connecting = std::pin::pin!(connecting);
            loop {
                tokio::select! {
                    biased;
                    connected = &mut connecting => break connected?,
                    // No more ticks: the thread is ending.
                    ticked = ticks.changed() => {
                        if ticked.is_err() || started.elapsed() >= limit {
                            return Err(timed_out());
                        }
                    }
                }
            }
        }
        None => tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| timed_out())??,
    };
    // Connected to itself: its own address is the one it connected to.
    if stream.local_addr()? == addr {
        return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
    }
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The address of a generation's private port.
pub fn private_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How a generation is checked for readiness in proxy mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// A TCP connect to its private port succeeds.
    Tcp,
    /// `GET PATH` on its private port answers 2xx.
    Http(String),
}

impl std::str::FromStr for Health {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Health::Tcp),
            _ => match s.strip_prefix("http:") {
                Some(path) if path.starts_with('/') => Ok(Health::Http(path.to_owned())),
                _ => Err(format!(
                    "invalid health check {s:?}: expected tcp or http:/PATH"
                )),
            },
        }
    }
}

impl Health {
    /// Checks the generation at `addr` once.
    pub async fn passes(&self, addr: SocketAddr) -> bool {
        let check = async {
            let mut stream = connect(addr).await.ok()?;
            let Health::Http(path) = self else {
                return Some(());
            };
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await.ok()?;
            // "HTTP/1.1 2xx"
            (head.starts_with(b"HTTP/1.") && head[9] == b'2').then_some(())
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), check).await,
            Ok(Some(()))
        )
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests (HTTP) or connections (TCP) retried on another attempt.
    pub retries: std::sync::atomic::AtomicU64,
    /// Requests answered 502/503 by the proxy, or cut by a broken upstream.
    pub upstream_errors: std::sync::atomic::AtomicU64,
    /// Requests answered 504: no answer within `--upstream-timeout`.
    pub upstream_timeouts: std::sync::atomic::AtomicU64,
    /// TCP relays closed after `--idle-timeout` without a byte either way.
    pub idle_relays: std::sync::atomic::AtomicU64,
    /// TCP relays and spliced upgrades still open (waited for at stop).
    pub open_streams: std::sync::atomic::AtomicUsize,
    /// Connections to the app closed because it sent bytes on them that no
    /// request asked for (a body after an answer to HEAD, or after a 204 or
    /// 304; more than an answer's length; an answer to nothing).
    pub stray_answers: Arc<std::sync::atomic::AtomicU64>,
}

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

/// How many proxy threads run, set once at start.
static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

thread_local! {
    /// Which proxy thread this is (0 elsewhere).
    static SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// This proxy thread's one-second tick (none elsewhere).
    static TICKS: std::cell::RefCell<Option<watch::Receiver<()>>> =
        const { std::cell::RefCell::new(None) };
}

/// Starts this proxy thread's one-second tick, for coarse deadlines that
/// must not each cost a timer. Within the thread's runtime.
fn start_ticks() -> tokio::task::JoinHandle<()> {
    let (tick, ticks) = watch::channel(());
    TICKS.with(|t| *t.borrow_mut() = Some(ticks));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            tick.send_replace(());
        }
    })
}

/// The number of proxy threads.
pub fn threads() -> usize {
    *THREADS.get().unwrap_or(&1)
}

/// This proxy thread's index, for per-thread state (connection pools).
pub fn slot() -> usize {
    SLOT.with(std::cell::Cell::get)
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
    let n = *THREADS.get_or_init(|| threads.max(1));
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
                SLOT.with(|s| s.set(index));
                runtime.block_on(async move {
                    let ticks = start_ticks();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_the_app_never_completes_times_out_on_a_proxy_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let ticks = start_ticks();
            // A listener whose accept queue holds one connection; the
            // kernel drops the SYNs of the next ones.
            let fd = rustix::net::socket(
                rustix::net::AddressFamily::INET,
                rustix::net::SocketType::STREAM,
                None,
            )
            .unwrap();
            rustix::net::bind(&fd, &SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            rustix::net::listen(&fd, 0).unwrap();
            let addr = crate::sys::socket::tcp_local_addr(&fd).unwrap();
            let limit = Duration::from_secs(2);
            let _queued = connect_within(addr, limit)
                .await
                .expect("the first one is queued");
            let started = std::time::Instant::now();
            let second = connect_within(addr, limit).await;
            assert_eq!(
                second.map(|_| ()).unwrap_err().kind(),
                std::io::ErrorKind::TimedOut
            );
            assert!(started.elapsed() >= limit);
            ticks.abort();
        });
    }
}
