//! Where new traffic goes: the proxy's shared state between the guardian
//! (which switches generations) and the proxy threads (which read it on
//! every request): the current generation's workers, a canary split, the
//! wait for a generation when none is serving, the limits, the counters.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::pool;
use super::upstream::{self, Upstream};

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

/// What the app behind `--proxy http` speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1: HTTP/2 requests are carried to the app as HTTP/1.1.
    #[default]
    H1,
    /// Cleartext HTTP/2 by prior knowledge (gRPC servers): every request,
    /// HTTP/1 or HTTP/2, goes to the app as an HTTP/2 stream.
    H2c,
}

impl UpstreamProtocol {
    /// As written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::H1 => "h1",
            UpstreamProtocol::H2c => "h2c",
        }
    }
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
    /// What the app speaks (HTTP).
    pub upstream_protocol: UpstreamProtocol,
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

    /// After a refused connect to `upstream` (nothing was sent): the
    /// request moves to the next generation, at most twice in all
    /// (`tries`); false when it cannot.
    pub async fn reroute(
        &self,
        upstream: &mut Arc<Upstream>,
        active: &mut upstream::Active,
        tries: &mut u8,
    ) -> bool {
        if *tries >= 2 {
            return false;
        }
        *tries += 1;
        self.counters
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(next) = self.next(Some(upstream)).await
            && let Some(entered) = next.enter_if_open()
        {
            (*upstream, *active) = (next, entered);
            return true;
        }
        false
    }

    /// `upstream` could not be reached (nothing was sent): counted as its
    /// failed answer; why, for the client.
    pub fn unreachable(&self, upstream: &Upstream, e: &dyn std::fmt::Display) -> String {
        upstream.record(true);
        self.counters
            .upstream_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!(
            "generation {} at {}: {e}",
            upstream.generation, upstream.addr
        )
    }

    /// `upstream` sent no answer within the upstream timeout: counted as
    /// its failed answer; why, for the client.
    pub fn timed_out(&self, upstream: &Upstream) -> String {
        upstream.record(true);
        self.counters
            .upstream_timeouts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!(
            "generation {} did not answer within {} (--upstream-timeout)",
            upstream.generation,
            humantime::format_duration(self.limits.upstream_timeout)
        )
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
    pub open_streams: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections to the app closed because it sent bytes on them that no
    /// request asked for (a body after an answer to HEAD, or after a 204 or
    /// 304; more than an answer's length; an answer to nothing).
    pub stray_answers: Arc<std::sync::atomic::AtomicU64>,
}
