//! One generation: one start of the app, from spawn to exit.
//!
//! A generation's *data* ([`Generation`]: its number, processes, route,
//! state and timestamps) is owned by the policy, in the one map of
//! generations; it is plain and serializable (timestamps as nanoseconds of
//! `CLOCK_MONOTONIC`, which survives an `execve` and means the same to any
//! process on the host), so it can be handed to another baton or written to
//! disk. Its *runtime handles* ([`Handles`]: tasks, the readiness gate, the
//! proxy's upstream) belong to the running process only and are kept apart,
//! keyed by worker process ([`Slot`]); they can be rebuilt from the data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::AbortHandle;

use super::readiness::Gate;
use crate::spec::Signal;

/// Where a generation is in its life:
/// `Starting → Ready → Baking → Serving → Draining → (Killed) → gone`.
/// Today a generation goes from `Starting` to `Serving` the moment it is
/// ready; `Ready` and `Baking` are the steps a deploy can hold it at (a
/// canary share, a bake window) before it serves alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Spawned, not ready yet.
    Starting,
    /// Ready, not yet given traffic.
    Ready,
    /// Given traffic, and watched before its predecessor is retired.
    Baking,
    /// The generation that serves.
    Serving,
    /// Asked to stop; finishing what it has.
    Draining,
    /// Sent SIGKILL; waiting to be reaped.
    Killed,
}

impl State {
    /// The state as a lowercase word (as in `status --json`).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Baking => "baking",
            State::Serving => "serving",
            State::Draining => "draining",
            State::Killed => "killed",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One process of a generation (a pool of one today).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Its pid.
    pub pid: i32,
    /// When it started, in clock ticks after boot (`/proc/<pid>/stat`,
    /// field 22): with the pid, it tells this process from a later one that
    /// reuses the pid.
    pub start_time: Option<u64>,
}

/// One process of a generation's pool (`--workers`): the generation, the
/// worker's index (0..N), and which start of that worker it is (0, then 1,
/// 2, … for replacements). Runtime handles, events and children are keyed
/// by it; the policy sees generations only.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Slot {
    /// The generation.
    pub generation: u64,
    /// The worker's index.
    pub worker: u32,
    /// Which start of the worker.
    pub incarnation: u32,
}

impl Slot {
    /// Worker `worker`'s first process in generation `generation`.
    pub fn new(generation: u64, worker: u32) -> Slot {
        Slot {
            generation,
            worker,
            incarnation: 0,
        }
    }

    /// A short token for it: `3`, `3.w1`, `3.w1.2` (the keeper's key, and
    /// output prefixes).
    pub fn label(&self) -> String {
        match (self.worker, self.incarnation) {
            (0, 0) => self.generation.to_string(),
            (w, 0) => format!("{}.w{w}", self.generation),
            (w, n) => format!("{}.w{w}.{n}", self.generation),
        }
    }

    /// Parses [`Slot::label`].
    pub fn parse_label(label: &str) -> Option<Slot> {
        let mut parts = label.split('.');
        let generation = parts.next()?.parse().ok()?;
        let worker = match parts.next() {
            Some(w) => w.strip_prefix('w')?.parse().ok()?,
            None => 0,
        };
        let incarnation = match parts.next() {
            Some(n) => n.parse().ok()?,
            None => 0,
        };
        parts.next().is_none().then_some(Slot {
            generation,
            worker,
            incarnation,
        })
    }

    /// Every slot of `generation`, in a map keyed by slots.
    pub fn range(generation: u64) -> std::ops::RangeInclusive<Slot> {
        Slot::new(generation, 0)..=Slot {
            generation,
            worker: u32::MAX,
            incarnation: u32::MAX,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.worker, self.incarnation) {
            (0, 0) => write!(f, "{}", self.generation),
            (w, 0) => write!(f, "{}/worker {w}", self.generation),
            (w, n) => write!(f, "{}/worker {w} (start {})", self.generation, n + 1),
        }
    }
}

/// How clients reach a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Route {
    /// Through the listening sockets it inherited.
    Sockets,
    /// Through baton's proxy, to its private loopback port.
    Private {
        /// The port.
        port: u16,
    },
}

/// A generation's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// 1, 2, … in order of spawning.
    pub id: u64,
    /// Where it is in its life.
    pub state: State,
    /// Its processes, once spawned.
    pub processes: Vec<Process>,
    /// How clients reach it.
    pub route: Route,
    /// When it was spawned.
    #[serde(with = "stamp")]
    pub spawned_at: Instant,
    /// When it entered `state`.
    #[serde(with = "stamp")]
    pub state_since: Instant,
    /// How long it took to become ready.
    pub ready_after: Option<Duration>,
    /// The deadline of its state: ready timeout, stop timeout, or the grace
    /// after SIGKILL.
    #[serde(with = "stamp::option")]
    pub deadline: Option<Instant>,
    /// The release it runs (see `release.rs`), once spawned.
    #[serde(default)]
    pub release: Option<u64>,
}

impl Generation {
    /// A generation that is about to be spawned.
    pub fn new(id: u64, now: Instant, deadline: Option<Instant>) -> Generation {
        Generation {
            id,
            state: State::Starting,
            processes: Vec::new(),
            route: Route::Sockets,
            spawned_at: now,
            state_since: now,
            ready_after: None,
            deadline,
            release: None,
        }
    }

    /// The pid of its main process, once spawned.
    pub fn pid(&self) -> Option<i32> {
        self.processes.first().map(|p| p.pid)
    }

    /// Moves it to `state` at `now`.
    pub fn enter(&mut self, state: State, now: Instant, deadline: Option<Instant>) {
        self.state = state;
        self.state_since = now;
        self.deadline = deadline;
    }
}

/// What a running baton holds for a generation besides its data; dropped
/// (tasks aborted) when the generation is gone.
#[derive(Debug, Default)]
pub struct Handles {
    /// Its process's pid (0 until spawned).
    pub pid: i32,
    /// When its process started (`/proc` start time).
    pub start_time: Option<u64>,
    /// Whether it has said it is ready.
    pub ready: bool,
    /// It is being replaced (its successor is starting, or took over):
    /// no new traffic, and its exit is no crash.
    pub replaced: bool,
    /// When it was started.
    pub started_at: Option<Instant>,
    /// How clients reach it.
    pub route: Option<Route>,
    /// Tasks working for it (its notification reader, readiness checks).
    pub tasks: Vec<AbortHandle>,
    /// How it is judged ready.
    pub gate: Gate,
    /// The `--ready exec:` check running for it, if any.
    pub check: Option<i32>,
    /// Ports it listens on by itself (not baton's sockets), once seen.
    pub self_bound: Vec<SocketAddr>,
    /// When it was asked to stop after its successor became ready.
    pub retired_at: Option<Instant>,
    /// Proxy mode: how the proxy reaches it.
    pub upstream: Option<Arc<crate::proxy::Upstream>>,
    /// Proxy mode: the stop signal held back until its traffic drained.
    pub pending_stop: Option<Signal>,
    /// Its last `STATUS=`.
    pub status: Option<String>,
    /// A second descriptor of its notification socket, and the socket's
    /// address (handed over by an upgrade).
    pub notify: Option<(std::os::fd::OwnedFd, String)>,
    /// Second descriptors of the read ends of its `--log-prefix` pipes
    /// (stdout, stderr), handed over by an upgrade.
    pub log_readers: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
}

impl Handles {
    /// The handles of a process already running (handed over by an
    /// upgrade, or adopted), started at `now` as far as this baton knows.
    pub fn running(process: Process, ready: bool, route: Option<Route>, now: Instant) -> Handles {
        let mut h = Handles::default();
        h.pid = process.pid;
        h.start_time = process.start_time;
        h.ready = ready;
        h.started_at = Some(now);
        h.route = route;
        h
    }
}

impl Drop for Handles {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(check) = self.check {
            let _ = crate::sys::signal::send_group(check, Signal::KILL);
        }
    }
}

/// Instants as nanoseconds of `CLOCK_MONOTONIC`, for serde.
pub(crate) mod stamp {
    use std::time::Instant;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &Instant, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(crate::sys::clock::monotonic_ns(*at))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        Ok(crate::sys::clock::instant(u64::deserialize(d)?))
    }

    pub mod option {
        use std::time::Instant;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(at: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
            match at {
                Some(at) => s.serialize_some(&crate::sys::clock::monotonic_ns(*at)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Instant>, D::Error> {
            Ok(Option::<u64>::deserialize(d)?.map(crate::sys::clock::instant))
        }
    }

    pub mod vec {
        use std::time::Instant;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(at: &[Instant], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(at.iter().map(|a| crate::sys::clock::monotonic_ns(*a)))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Instant>, D::Error> {
            Ok(Vec::<u64>::deserialize(d)?
                .into_iter()
                .map(crate::sys::clock::instant)
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_goes_through_json_and_back() {
        let now = Instant::now();
        let mut g = Generation::new(7, now, Some(now + Duration::from_secs(30)));
        g.processes.push(Process {
            pid: 4242,
            start_time: Some(123),
        });
        g.route = Route::Private { port: 40000 };
        g.enter(State::Serving, now + Duration::from_millis(300), None);
        g.ready_after = Some(Duration::from_millis(300));
        let json = serde_json::to_string(&g).expect("serialize");
        let back: Generation = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back.id, 7);
        assert_eq!(back.state, State::Serving);
        assert_eq!(back.pid(), Some(4242));
        assert_eq!(back.route, g.route);
        // Instants survive to within the clock's sampling (well under 1 ms).
        let off = |a: Instant, b: Instant| a.max(b) - a.min(b);
        assert!(off(back.spawned_at, g.spawned_at) < Duration::from_millis(1));
        assert!(off(back.state_since, g.state_since) < Duration::from_millis(1));
        assert_eq!(back.deadline, None);
    }
}
