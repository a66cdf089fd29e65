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

use super::backoff::Backoff;
use super::readiness::Gate;
use super::stamp;
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

/// A process, told apart from a later one that reuses its pid.
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

    /// The next start of the same worker.
    pub fn next(self) -> Slot {
        Slot {
            incarnation: self.incarnation.saturating_add(1),
            ..self
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

/// One worker process of a generation: the one description of it that the
/// policy decides on, the handover passes to an upgraded baton and the
/// state file keeps for an adopting one. Runtime things (tasks, descriptors)
/// are in [`Handles`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The worker's index (0..N).
    #[serde(default)]
    pub worker: u32,
    /// Which start of that worker.
    #[serde(default)]
    pub incarnation: u32,
    /// Its pid and start time.
    #[serde(flatten)]
    pub process: Process,
    /// It passed its readiness check.
    #[serde(default)]
    pub ready: bool,
    /// It is being replaced (its successor is starting or took over, or
    /// its generation was retired): no new traffic, and its exit is no
    /// crash.
    #[serde(default)]
    pub replaced: bool,
    /// How clients reach it (its own port in proxy mode).
    #[serde(default)]
    pub route: Option<Route>,
    /// Its notification socket's address.
    #[serde(default)]
    pub notify: Option<String>,
    /// When it started, as far as a baton saw.
    #[serde(default, with = "stamp::option")]
    pub started: Option<Instant>,
    /// Reserved for an identity stronger than pid and start time (a
    /// pidfd's inode, as a keeper holding pidfds would see it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u64>,
}

impl WorkerRecord {
    /// A process just started as `slot`.
    pub fn started(slot: Slot, process: Process, route: Route, notify: Option<String>) -> Self {
        WorkerRecord {
            worker: slot.worker,
            incarnation: slot.incarnation,
            process,
            ready: false,
            replaced: false,
            route: Some(route),
            notify,
            started: None,
            identity: None,
        }
    }

    /// Its slot in generation `generation`.
    pub fn slot(&self, generation: u64) -> Slot {
        Slot {
            generation,
            worker: self.worker,
            incarnation: self.incarnation,
        }
    }

    /// It takes traffic: ready, and not being replaced.
    pub fn serves(&self) -> bool {
        self.ready && !self.replaced
    }
}

/// One worker index of a generation's pool, across its replacements.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    /// Its latest start (the slot's incarnation).
    pub incarnation: u32,
    /// Its restart delay and start limit (the same rule as a generation's).
    pub backoff: Backoff,
    /// Replacements after it died.
    pub restarts: u32,
    /// Replacements because it grew past `--max-rss`.
    pub rss_replacements: u32,
    /// When its replacement starts.
    #[serde(with = "stamp::option")]
    pub restart_at: Option<Instant>,
    /// It exceeded its start limit (or `--restart` said no): it stays down.
    pub down: bool,
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
    /// Its worker processes, once spawned (one per worker, two while
    /// one hands over to its successor).
    pub processes: Vec<WorkerRecord>,
    /// Its pool of workers (`--workers`), by index.
    #[serde(default)]
    pub workers: Vec<Worker>,
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
            workers: Vec::new(),
            route: Route::Sockets,
            spawned_at: now,
            state_since: now,
            ready_after: None,
            deadline,
            release: None,
        }
    }

    /// The pid of its first process, once spawned.
    pub fn pid(&self) -> Option<i32> {
        self.processes.first().map(|p| p.process.pid)
    }

    /// Its worker process `slot`.
    pub fn process(&self, slot: Slot) -> Option<&WorkerRecord> {
        self.processes
            .iter()
            .find(|p| p.worker == slot.worker && p.incarnation == slot.incarnation)
    }

    /// Its worker process `slot`, to change.
    pub fn process_mut(&mut self, slot: Slot) -> Option<&mut WorkerRecord> {
        self.processes
            .iter_mut()
            .find(|p| p.worker == slot.worker && p.incarnation == slot.incarnation)
    }

    /// Worker `index` of its pool (grown to hold it).
    pub fn worker(&mut self, index: u32) -> &mut Worker {
        let i = index as usize;
        if self.workers.len() <= i {
            self.workers.resize(i + 1, Worker::default());
        }
        &mut self.workers[i]
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
    /// Its process's pid (0 until spawned); the rest of what is known of
    /// the process is its [`WorkerRecord`], in the policy.
    pub pid: i32,
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
    /// How many times the loop said it is still not ready.
    pub reminded: u32,
    /// A pidfd of its process (what the keeper is given a copy of).
    pub pidfd: Option<std::os::fd::OwnedFd>,
    /// A second descriptor of its notification socket (handed over by an
    /// upgrade).
    pub notify: Option<std::os::fd::OwnedFd>,
    /// Second descriptors of the read ends of its `--log-prefix` pipes
    /// (stdout, stderr), handed over by an upgrade.
    pub log_readers: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
}

impl Handles {
    /// The handles of process `pid`, with nothing running for it yet.
    pub fn of(pid: i32) -> Handles {
        let mut h = Handles::default();
        h.pid = pid;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_goes_through_json_and_back() {
        let now = Instant::now();
        let mut g = Generation::new(7, now, Some(now + Duration::from_secs(30)));
        g.processes.push(WorkerRecord::started(
            Slot::new(7, 0),
            Process {
                pid: 4242,
                start_time: Some(123),
            },
            Route::Sockets,
            None,
        ));
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
