//! One generation as the proxy sees it: its private address, what is in
//! flight to it, and (HTTP) its idle keep-alive connections.
//!
//! Retiring an upstream drops its idle connections and, once nothing is in
//! flight, reports it drained exactly once: the guardian then sends the
//! generation its stop signal.
//!
//! Its idle connections are a [`Pool`] (see `pool.rs` for what may be
//! reused and for how long).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::judge::{Tally, clearly_worse};
use super::pool::Pool;
use super::senders::Senders;

/// Called with the generation number when a retired upstream is drained.
pub type OnDrained = Box<dyn Fn(u64) + Send + Sync>;

/// Called with the generation number and why, once, when a release on
/// probation answers clearly worse than its baseline.
pub type OnWorse = Box<dyn Fn(u64, String) + Send + Sync>;

/// What a release on probation is compared with.
#[derive(Debug)]
pub enum Baseline {
    /// The previous generation's failure rate before the cutover.
    Before(Tally),
    /// The previous generation over the same window (a canary split): its
    /// workers' tally now minus their tally at the start of the bake.
    Beside(Vec<Arc<Upstream>>, Tally),
}

/// The summed tally of `upstreams` (a generation's workers).
pub fn tally_of(upstreams: &[Arc<Upstream>]) -> Tally {
    upstreams.iter().fold((0, 0), |(a, f), u| {
        let (ua, uf) = u.tally();
        (a + ua, f + uf)
    })
}

/// Judges a release on probation by its answers (`--max-error-rate`).
pub struct Judge {
    /// What it is compared with.
    pub baseline: Baseline,
    /// Its own tally at the start of the bake.
    pub since: Tally,
    /// The failure rate it must stay under (0..1).
    pub max_rate: f64,
    /// Told once when it fails.
    pub on_worse: OnWorse,
}

impl std::fmt::Debug for Judge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Judge")
            .field("baseline", &self.baseline)
            .field("since", &self.since)
            .field("max_rate", &self.max_rate)
            .finish()
    }
}

/// A generation behind the proxy.
pub struct Upstream {
    /// Its generation number.
    pub generation: u64,
    /// Its private address.
    pub addr: SocketAddr,
    active: AtomicUsize,
    retired: AtomicBool,
    reported: AtomicBool,
    /// Idle keep-alive connections (HTTP).
    pool: Arc<Pool>,
    /// Connections hyper drives (HTTP/2 clients, an h2c app).
    senders: Senders,
    on_drained: OnDrained,
    /// Answers relayed (HTTP): all, and failed (5xx, no answer, timeout).
    answers: AtomicU64,
    failures: AtomicU64,
    /// Set while it is on probation.
    judge: Mutex<Option<Judge>>,
    judged: AtomicBool,
    /// When its first failed answer on probation came.
    first_failure: Mutex<Option<Instant>>,
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
        stray: Arc<AtomicU64>,
        on_drained: OnDrained,
    ) -> Arc<Upstream> {
        Arc::new(Upstream {
            generation,
            addr,
            active: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            pool: Pool::new(super::slot::threads(), pool_idle, stray),
            senders: Senders::new(super::slot::threads(), pool_idle),
            on_drained,
            answers: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            judge: Mutex::new(None),
            judged: AtomicBool::new(false),
            first_failure: Mutex::new(None),
        })
    }

    /// Answers so far: (all, failed).
    pub fn tally(&self) -> Tally {
        (
            self.answers.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// Counts one answer (HTTP); judges it if it is on probation.
    pub fn record(&self, failed: bool) {
        self.answers.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
            if self.judged.load(Ordering::Relaxed) {
                self.judge_now();
            }
        }
    }

    /// Puts it on probation (or, with `None`, ends it).
    pub fn set_judge(&self, judge: Option<Judge>) {
        if let Ok(mut first) = self.first_failure.lock() {
            *first = None;
        }
        if let Ok(mut slot) = self.judge.lock() {
            self.judged.store(judge.is_some(), Ordering::SeqCst);
            *slot = judge;
        }
    }

    fn judge_now(&self) {
        let Ok(mut slot) = self.judge.lock() else {
            return;
        };
        let Some(judge) = slot.as_ref() else {
            return;
        };
        let (all, failed) = self.tally();
        let new = (all - judge.since.0, failed - judge.since.1);
        let base = match &judge.baseline {
            Baseline::Before(t) => *t,
            Baseline::Beside(old, at) => {
                let (a, f) = tally_of(old);
                (a.saturating_sub(at.0), f.saturating_sub(at.1))
            }
        };
        let now = Instant::now();
        let first = self
            .first_failure
            .lock()
            .map(|mut f| *f.get_or_insert(now))
            .unwrap_or(now);
        if let Some(why) = clearly_worse(new, base, judge.max_rate) {
            let why = format!(
                "{why}; decided {} ms after its first failed answer",
                now.duration_since(first).as_millis()
            );
            (judge.on_worse)(self.generation, why);
            self.judged.store(false, Ordering::SeqCst);
            *slot = None;
        }
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
        self.pool.close();
        self.senders.close();
        if self.active() == 0 {
            self.report();
        }
    }

    fn report(&self) {
        if !self.reported.swap(true, Ordering::SeqCst) {
            (self.on_drained)(self.generation);
        }
    }

    /// Its idle keep-alive connections.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Its connections that hyper drives.
    pub fn senders(&self) -> &Senders {
        &self.senders
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
            crate::proxy::pool::POOL_IDLE,
            Arc::default(),
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
    fn a_failing_upstream_on_probation_is_reported_once() {
        let told = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&told);
        let u = Upstream::new(
            3,
            "127.0.0.1:1".parse().unwrap(),
            crate::proxy::pool::POOL_IDLE,
            Arc::default(),
            Box::new(|_| {}),
        );
        u.record(false);
        u.set_judge(Some(Judge {
            baseline: Baseline::Before((100, 0)),
            since: u.tally(),
            max_rate: 0.05,
            on_worse: Box::new(move |g, _| {
                seen.fetch_add(g, Ordering::SeqCst);
            }),
        }));
        for _ in 0..100 {
            u.record(true);
        }
        assert_eq!(told.load(Ordering::SeqCst), 3, "once");
    }

    #[test]
    fn an_idle_upstream_is_drained_at_once() {
        let reported = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&reported);
        let u = Upstream::new(
            1,
            "127.0.0.1:1".parse().unwrap(),
            crate::proxy::pool::POOL_IDLE,
            Arc::default(),
            Box::new(move |_| seen.store(true, Ordering::SeqCst)),
        );
        u.retire();
        assert!(reported.load(Ordering::SeqCst));
    }
}
