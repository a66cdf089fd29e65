//! `--workers N`: a generation is a pool of N worker processes, each with
//! its own notification socket, `LISTEN_PID` and `BATON_WORKER`, all
//! started from the same release.
//!
//! The policy decides for generations; this room decides for workers:
//!
//! - a generation is ready once every worker is;
//! - while it starts, one worker that fails fails the generation (the
//!   reload rolls back as with one process);
//! - while it serves, a worker that dies is replaced alone (same release,
//!   same index) after a delay that doubles with its own consecutive
//!   failures, within its own start limit; one over its limit stays down
//!   and the generation serves degraded; only when no worker is left does
//!   the policy hear the generation ended;
//! - during a bake, any worker that exits reverts the release;
//! - `--max-rss`: a worker above the limit gets a successor first, and is
//!   retired gracefully once the successor is ready.
//!
//! With one worker (the default) a generation behaves exactly as a single
//! process always has: its exit goes straight to the policy.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::children::Exit;
use super::generation::{Slot, State};
use super::release::Release;
use super::{Guardian, sys};
use crate::exit::ExitStatus;
use crate::knobs::later;
use crate::spec::{RestartMode, Signal, StartLimit};

/// A generation's workers.
#[derive(Debug, Default)]
pub struct Pool {
    /// The release they run (replacements start from it).
    pub release: Option<Release>,
    /// Per worker index.
    pub workers: Vec<Worker>,
}

/// One worker index of a pool, across its replacements.
#[derive(Debug, Default, Clone)]
pub struct Worker {
    /// Its latest start (the slot's incarnation).
    pub incarnation: u32,
    /// Consecutive failures (for the restart delay).
    pub failures: u32,
    /// Replacements after it died.
    pub restarts: u32,
    /// Replacements because it grew past `--max-rss`.
    pub rss_replacements: u32,
    /// Recent restarts (for the start limit).
    pub recent: VecDeque<Instant>,
    /// When its replacement starts.
    pub restart_at: Option<Instant>,
    /// It exceeded its start limit (or `--restart` said no): it stays down.
    pub down: bool,
}

impl Pool {
    /// A pool of `n` workers running `release`.
    pub fn new(n: usize, release: Option<Release>) -> Pool {
        Pool {
            release,
            workers: vec![Worker::default(); n],
        }
    }

    /// A handed-over or adopted `slot` is this worker's latest start so
    /// far.
    pub fn note_incarnation(pool: &mut Pool, slot: Slot) {
        let w = pool.worker(slot.worker);
        w.incarnation = w.incarnation.max(slot.incarnation);
    }

    fn worker(&mut self, index: u32) -> &mut Worker {
        let i = index as usize;
        if self.workers.len() <= i {
            self.workers.resize(i + 1, Worker::default());
        }
        &mut self.workers[i]
    }
}

impl Guardian {
    /// Each generation's workers as `status` shows them, and whether one
    /// is down.
    pub(super) fn describe_workers(
        &self,
    ) -> std::collections::BTreeMap<u64, (Vec<crate::control::proto::WorkerInfo>, bool)> {
        use crate::control::proto::WorkerInfo;
        let mut out = std::collections::BTreeMap::new();
        for g in self.policy.generations() {
            let pool = self.pools.get(&g.id);
            let mut workers: Vec<WorkerInfo> = self
                .handles
                .range(Slot::range(g.id))
                .map(|(slot, h)| {
                    let w = pool.and_then(|p| p.workers.get(slot.worker as usize));
                    WorkerInfo {
                        worker: slot.worker,
                        pid: h.pid,
                        state: if h.replaced {
                            "replaced"
                        } else if h.ready {
                            "ready"
                        } else {
                            "starting"
                        }
                        .to_owned(),
                        rss_bytes: sys::inspect::rss(h.pid),
                        restarts: w.map_or(0, |w| w.restarts),
                        rss_replacements: w.map_or(0, |w| w.rss_replacements),
                    }
                })
                .collect();
            let mut degraded = false;
            if let Some(pool) = pool {
                for (i, w) in pool.workers.iter().enumerate() {
                    let i = i as u32;
                    if workers.iter().any(|x| x.worker == i) {
                        continue;
                    }
                    degraded |= w.down;
                    workers.push(WorkerInfo {
                        worker: i,
                        pid: 0,
                        state: if w.down { "down" } else { "restarting" }.to_owned(),
                        rss_bytes: None,
                        restarts: w.restarts,
                        rss_replacements: w.rss_replacements,
                    });
                }
            }
            workers.sort_by_key(|w| w.worker);
            out.insert(g.id, (workers, degraded));
        }
        out
    }

    /// A worker process exited.
    pub(super) fn worker_exited(&mut self, slot: Slot, exit: Exit) {
        let generation = slot.generation;
        let state = self.policy.state(generation);
        if state == Some(State::Starting)
            && let Some(handles) = self.handles.get(&slot)
        {
            self.failed_hint = self.launch.failure_hint(slot, exit.pid, handles);
        }
        if self.cfg.log_prefix {
            self.orphans.release(slot);
        }
        let handles = self.handles.remove(&slot);
        if let Some(h) = &handles
            && let Ok(mut m) = self.metrics.lock()
        {
            m.exited(exit.status);
            if let Some(at) = h.retired_at {
                m.drained(self.event_at.saturating_duration_since(at));
            }
        }
        self.check_listeners(Some((generation, exit.pid)));
        let replaced = handles.as_ref().is_some_and(|h| h.replaced);
        let lived = handles
            .as_ref()
            .and_then(|h| h.started_at)
            .map_or(Duration::ZERO, |t| {
                self.event_at.saturating_duration_since(t)
            });
        let left = self.handles.range(Slot::range(generation)).count();
        self.sync_processes(generation);
        let status = exit.status;
        let ended = |g: &mut Guardian| {
            let actions = g.policy.exited(g.event_at, generation, status);
            g.apply(actions);
        };
        let serving = matches!(state, Some(State::Serving | State::Baking | State::Ready));
        if replaced && serving {
            // A predecessor that handed over (`--max-rss`), or a worker
            // of a generation being retired.
            info!(generation, worker = slot.worker, pid = exit.pid, status = %status.word(), "exit: replaced worker {status}");
            if left == 0 {
                ended(self);
            }
            return;
        }
        if self.cfg.workers <= 1 {
            ended(self);
            return;
        }
        match state {
            None => {}
            // One worker failed before the generation was ready: it fails
            // (the policy kills the others' process groups).
            Some(State::Starting) => ended(self),
            Some(State::Baking) => {
                let why = format!(
                    "worker {} (pid {}) {status} during the bake",
                    slot.worker, exit.pid
                );
                let actions = self.policy.revert(self.event_at, "exited", why);
                self.apply(actions);
                if left == 0 {
                    ended(self);
                }
            }
            Some(State::Serving) => {
                self.worker_crashed(slot, exit.pid, status, lived);
                let pending = self
                    .pools
                    .get(&generation)
                    .is_some_and(|p| p.workers.iter().any(|w| w.restart_at.is_some()));
                if left == 0 && !pending {
                    ended(self);
                }
            }
            Some(_) if left == 0 => ended(self),
            Some(_) => {}
        }
    }

    /// Worker `slot` of a serving generation died: its replacement is
    /// scheduled, or it stays down.
    fn worker_crashed(&mut self, slot: Slot, pid: i32, status: ExitStatus, lived: Duration) {
        let cfg = self.cfg.policy.clone();
        let now = self.event_at;
        let (generation, index) = (slot.generation, slot.worker);
        let restart = match cfg.restart {
            RestartMode::Never => false,
            RestartMode::OnFailure => !status.success(),
            RestartMode::Always => true,
        };
        let alive = self.handles.range(Slot::range(generation)).count();
        let w = self.pools.entry(generation).or_default().worker(index);
        if !restart {
            w.down = true;
            warn!(generation, worker = index, pid, status = %status.word(), alive, "exit: worker {index} {status} and is not restarted (--restart); the others serve on");
            return;
        }
        if lived >= cfg.stable_after {
            w.failures = 0;
        }
        if let StartLimit::Limit { burst, interval } = cfg.start_limit {
            w.recent
                .retain(|t| now.saturating_duration_since(*t) < interval);
            if w.recent.len() >= burst as usize {
                w.down = true;
                error!(generation, worker = index, pid, status = %status.word(), alive,
                    "exit: worker {index} {status}; start limit hit ({burst} restarts within {}): it stays down, the generation serves degraded",
                    humantime::format_duration(interval));
                return;
            }
        }
        let delay = cfg
            .restart_delay
            .saturating_mul(1u32 << w.failures.min(16))
            .min(cfg.restart_delay_max);
        w.failures += 1;
        w.restart_at = Some(later(now, delay));
        warn!(generation, worker = index, pid, status = %status.word(), alive, restart_in_ms = delay.as_millis() as u64,
            "exit: worker {index} {status}; the others serve on, and it restarts soon");
    }

    /// Starts the replacements that are due.
    pub(super) fn restart_workers(&mut self, now: Instant) {
        let due: Vec<(u64, u32)> = self
            .pools
            .iter()
            .flat_map(|(g, p)| {
                p.workers
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.restart_at.is_some_and(|t| t <= now))
                    .map(move |(i, _)| (*g, i as u32))
            })
            .collect();
        for (generation, index) in due {
            let Some(pool) = self.pools.get_mut(&generation) else {
                continue;
            };
            let release = pool.release.clone();
            let w = pool.worker(index);
            w.restart_at = None;
            if !matches!(
                self.policy.state(generation),
                Some(State::Serving | State::Baking | State::Ready)
            ) {
                continue;
            }
            w.recent.push_back(now);
            w.restarts += 1;
            w.incarnation += 1;
            let slot = Slot {
                generation,
                worker: index,
                incarnation: w.incarnation,
            };
            let Some(release) = release else {
                continue;
            };
            match self.spawn_slot(slot, &release) {
                Ok(_) => {
                    info!(
                        generation,
                        worker = index,
                        "restart: worker {index} started again"
                    );
                    self.sync_processes(generation);
                }
                Err(e) => {
                    warn!(generation, worker = index, error = %e, "restart: worker {index} could not be started");
                    self.worker_crashed(slot, 0, ExitStatus::Exited(127), Duration::ZERO);
                }
            }
        }
    }

    /// The next worker replacement due, if any.
    pub(super) fn next_worker_restart(&self) -> Option<Instant> {
        self.pools
            .values()
            .flat_map(|p| p.workers.iter().filter_map(|w| w.restart_at))
            .min()
    }

    /// `--max-rss`: a serving worker above the limit gets a successor; it
    /// is retired once the successor is ready (see `ready`).
    pub(super) fn check_rss(&mut self) {
        let Some(limit) = self.cfg.max_rss else {
            return;
        };
        let Some(generation) = self.policy.serving() else {
            return;
        };
        let candidates: Vec<(Slot, i32)> = self
            .handles
            .range(Slot::range(generation))
            .filter(|(_, h)| h.ready && !h.replaced && h.pid > 0)
            .map(|(s, h)| (*s, h.pid))
            .collect();
        for (slot, pid) in candidates {
            let Some(rss) = sys::inspect::rss(pid) else {
                continue;
            };
            if rss <= limit {
                continue;
            }
            let Some(pool) = self.pools.get_mut(&generation) else {
                continue;
            };
            let release = pool.release.clone();
            let w = pool.worker(slot.worker);
            // One successor at a time per worker.
            if w.incarnation > slot.incarnation {
                continue;
            }
            w.incarnation += 1;
            w.rss_replacements += 1;
            let next = Slot {
                generation,
                worker: slot.worker,
                incarnation: w.incarnation,
            };
            warn!(
                generation,
                worker = slot.worker,
                pid,
                rss_mb = rss >> 20,
                limit_mb = limit >> 20,
                "max-rss: worker {} uses {} MB, over the limit: starting its successor, then retiring it",
                slot.worker,
                rss >> 20
            );
            if let Ok(mut m) = self.metrics.lock() {
                m.rss_replacements += 1;
            }
            let Some(release) = release else {
                continue;
            };
            if let Err(e) = self.spawn_slot(next, &release) {
                warn!(generation, worker = slot.worker, error = %e, "max-rss: the successor could not be started; the worker serves on");
            } else {
                self.sync_processes(generation);
            }
        }
    }

    /// Asks worker process `slot` to drain with `signal`: no new traffic,
    /// then the signal (see [`super::launch::Launch::drain`]).
    pub(super) fn retire_slot(&mut self, slot: Slot, signal: Signal) {
        let handover_us = self.event_at.elapsed().as_micros() as u64;
        let Some(handles) = self.handles.get_mut(&slot) else {
            return;
        };
        handles.replaced = true;
        let pid = handles.pid;
        self.cut_over();
        let cx = super::launch::Cx {
            cfg: &self.cfg,
            children: &mut self.children,
            events: &self.events,
        };
        if let Some(handles) = self.handles.get_mut(&slot) {
            self.launch
                .drain(cx, slot, pid, signal, handles, handover_us);
        }
    }
}
