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

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::backoff::{Backoff, Next};
use super::children::Exit;
use super::generation::{Slot, State};
use super::release::Release;
use super::{Guardian, sys};
use crate::exit::ExitStatus;
use crate::knobs::PolicyConfig;
use crate::spec::{RestartMode, Signal};

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
    /// Its restart delay and start limit (the same rule as a generation's).
    pub backoff: Backoff,
    /// Replacements after it died.
    pub restarts: u32,
    /// Replacements because it grew past `--max-rss`.
    pub rss_replacements: u32,
    /// When its replacement starts.
    pub restart_at: Option<Instant>,
    /// It exceeded its start limit (or `--restart` said no): it stays down.
    pub down: bool,
}

/// What follows the death of a serving worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// `--restart` says no: it stays down.
    NotRestarted,
    /// Its start limit is hit: it stays down.
    Limit {
        /// Restarts within the interval.
        restarts: usize,
        /// The limit's interval.
        interval: Duration,
    },
    /// It starts again after `delay`.
    Restart {
        /// How long from now.
        delay: Duration,
    },
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

    /// Worker `index` of a serving generation died at `now` with `status`
    /// after running for `lived`: whether and when it starts again. With
    /// no other worker ready (`others`), nothing serves meanwhile: it starts
    /// again after the base delay, however often it failed.
    pub fn crashed(
        &mut self,
        index: u32,
        status: ExitStatus,
        lived: Duration,
        now: Instant,
        cfg: &PolicyConfig,
        others: bool,
    ) -> Crash {
        let restart = match cfg.restart {
            RestartMode::Never => false,
            RestartMode::OnFailure => !status.success(),
            RestartMode::Always => true,
        };
        let w = self.worker(index);
        if !restart {
            w.down = true;
            return Crash::NotRestarted;
        }
        match w.backoff.failed(now, Some(lived), cfg) {
            Next::Limit { restarts, interval } => {
                w.down = true;
                Crash::Limit { restarts, interval }
            }
            Next::Restart { at, delay } if others => {
                w.restart_at = Some(at);
                Crash::Restart { delay }
            }
            Next::Restart { delay, .. } => {
                let delay = delay.min(cfg.restart_delay);
                w.restart_at = Some(crate::knobs::later(now, delay));
                Crash::Restart { delay }
            }
        }
    }

    /// The workers whose replacement is due at `now`; each is taken off
    /// the schedule (see [`Pool::restart`] to start it).
    pub fn due(&mut self, now: Instant) -> Vec<u32> {
        let mut due = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            if w.restart_at.is_some_and(|t| t <= now) {
                w.restart_at = None;
                due.push(i as u32);
            }
        }
        due
    }

    /// Worker `index` starts again at `now`: its next incarnation.
    pub fn restart(&mut self, index: u32, now: Instant) -> u32 {
        let w = self.worker(index);
        w.backoff.restarted(now);
        w.restarts += 1;
        w.incarnation += 1;
        w.incarnation
    }

    /// When the next replacement is due.
    pub fn next_restart(&self) -> Option<Instant> {
        self.workers.iter().filter_map(|w| w.restart_at).min()
    }

    /// Whether a replacement is scheduled.
    pub fn restarting(&self) -> bool {
        self.workers.iter().any(|w| w.restart_at.is_some())
    }

    /// `--max-rss`: the successor of worker process `slot`, which grew past
    /// the limit; none if it already has one (one at a time).
    pub fn rss_successor(&mut self, slot: Slot) -> Option<Slot> {
        let w = self.worker(slot.worker);
        if w.incarnation > slot.incarnation {
            return None;
        }
        w.incarnation += 1;
        w.rss_replacements += 1;
        Some(Slot {
            incarnation: w.incarnation,
            ..slot
        })
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
        if let Some(h) = &handles {
            self.observed.exited(exit.status);
            if let Some(at) = h.retired_at {
                self.observed
                    .drained(self.event_at.saturating_duration_since(at));
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
                let pending = self.pools.get(&generation).is_some_and(Pool::restarting);
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
        let (generation, index) = (slot.generation, slot.worker);
        let alive = self.handles.range(Slot::range(generation)).count();
        let others = self
            .handles
            .range(Slot::range(generation))
            .any(|(_, h)| h.ready && !h.replaced);
        let crash = self.pools.entry(generation).or_default().crashed(
            index,
            status,
            lived,
            self.event_at,
            &self.cfg.policy,
            others,
        );
        match crash {
            Crash::NotRestarted if others => {
                warn!(generation, worker = index, pid, status = %status.word(), alive, "exit: worker {index} {status} and is not restarted (--restart); the others serve on");
            }
            Crash::NotRestarted => {
                warn!(generation, worker = index, pid, status = %status.word(), alive, "exit: worker {index} {status} and is not restarted (--restart); no worker serves now");
            }
            Crash::Limit { restarts, interval } => {
                error!(generation, worker = index, pid, status = %status.word(), alive,
                    "exit: worker {index} {status}; start limit hit ({restarts} restarts within {}): it stays down, the generation serves degraded",
                    humantime::format_duration(interval));
            }
            Crash::Restart { delay } if others => {
                warn!(generation, worker = index, pid, status = %status.word(), alive, restart_in_ms = delay.as_millis() as u64,
                    "exit: worker {index} {status}; the others serve on, and it restarts soon");
            }
            Crash::Restart { delay } => {
                warn!(generation, worker = index, pid, status = %status.word(), alive, restart_in_ms = delay.as_millis() as u64,
                    "exit: worker {index} {status}; no worker serves now: it restarts after the base delay");
            }
        }
    }

    /// Starts the replacements that are due.
    pub(super) fn restart_workers(&mut self, now: Instant) {
        let generations: Vec<u64> = self.pools.keys().copied().collect();
        for generation in generations {
            let serving = !self.policy.is_stopping()
                && matches!(
                    self.policy.state(generation),
                    Some(State::Serving | State::Baking | State::Ready)
                );
            let Some(pool) = self.pools.get_mut(&generation) else {
                continue;
            };
            let release = pool.release.clone();
            for index in pool.due(now) {
                if !serving {
                    continue;
                }
                let Some(pool) = self.pools.get_mut(&generation) else {
                    continue;
                };
                let slot = Slot {
                    generation,
                    worker: index,
                    incarnation: pool.restart(index, now),
                };
                let Some(release) = &release else {
                    continue;
                };
                match self.spawn_slot(slot, release) {
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
    }

    /// The next worker replacement due, if any.
    pub(super) fn next_worker_restart(&self) -> Option<Instant> {
        self.pools.values().filter_map(Pool::next_restart).min()
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
            // One successor at a time per worker.
            let Some(next) = pool.rss_successor(slot) else {
                continue;
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
            self.observed.rss_replacements += 1;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::StartLimit;

    const MS: Duration = Duration::from_millis(1);

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            restart_delay: 100 * MS,
            restart_delay_max: 800 * MS,
            stable_after: 5000 * MS,
            start_limit: StartLimit::Limit {
                burst: 3,
                interval: 10_000 * MS,
            },
            ..PolicyConfig::default()
        }
    }

    const CRASH: ExitStatus = ExitStatus::Exited(1);

    #[test]
    fn a_dead_worker_is_replaced_alone_after_its_own_delay() {
        let (cfg, t0) = (cfg(), Instant::now());
        let mut pool = Pool::new(3, None);
        assert_eq!(
            pool.crashed(1, CRASH, 10 * MS, t0, &cfg, true),
            Crash::Restart { delay: 100 * MS }
        );
        assert!(pool.restarting());
        assert_eq!(pool.next_restart(), Some(t0 + 100 * MS));
        assert!(pool.due(t0 + 99 * MS).is_empty());
        assert_eq!(pool.due(t0 + 100 * MS), [1]);
        assert!(!pool.restarting(), "taken off the schedule");
        assert_eq!(pool.restart(1, t0 + 100 * MS), 1, "its next incarnation");
        assert_eq!(pool.workers[1].restarts, 1);
        assert_eq!(
            (pool.workers[0].incarnation, pool.workers[2].incarnation),
            (0, 0)
        );
        // Its next failure waits twice as long; another worker's own first
        // failure does not.
        assert_eq!(
            pool.crashed(1, CRASH, 10 * MS, t0 + 200 * MS, &cfg, true),
            Crash::Restart { delay: 200 * MS }
        );
        assert_eq!(
            pool.crashed(2, CRASH, 10 * MS, t0 + 200 * MS, &cfg, true),
            Crash::Restart { delay: 100 * MS }
        );
        assert_eq!(pool.due(t0 + 300 * MS), [2]);
        assert_eq!(pool.due(t0 + 400 * MS), [1]);
        // A worker that served long enough starts over from the first delay.
        pool.restart(1, t0 + 400 * MS);
        assert_eq!(
            pool.crashed(1, CRASH, 6000 * MS, t0 + 6400 * MS, &cfg, true),
            Crash::Restart { delay: 100 * MS }
        );
    }

    #[test]
    fn a_worker_over_its_start_limit_stays_down_and_the_pool_serves_degraded() {
        let (cfg, t0) = (cfg(), Instant::now());
        let mut pool = Pool::new(2, None);
        let mut now = t0;
        for _ in 0..3 {
            assert!(matches!(
                pool.crashed(0, CRASH, 10 * MS, now, &cfg, true),
                Crash::Restart { .. }
            ));
            now = pool.next_restart().expect("scheduled");
            assert_eq!(pool.due(now), [0]);
            pool.restart(0, now);
        }
        assert_eq!(
            pool.crashed(0, CRASH, 10 * MS, now, &cfg, true),
            Crash::Limit {
                restarts: 3,
                interval: 10_000 * MS
            }
        );
        assert!(pool.workers[0].down && !pool.workers[1].down);
        assert!(!pool.restarting());
        // Outside the interval the count starts over, for a worker not yet
        // down.
        let later = now + 20_000 * MS;
        assert!(matches!(
            pool.crashed(1, CRASH, 10 * MS, later, &cfg, true),
            Crash::Restart { .. }
        ));
    }

    #[test]
    fn with_restart_never_or_on_failure_a_worker_may_stay_down() {
        let t0 = Instant::now();
        let never = PolicyConfig {
            restart: RestartMode::Never,
            ..cfg()
        };
        let mut pool = Pool::new(2, None);
        for i in 0..2 {
            assert_eq!(
                pool.crashed(i, CRASH, MS, t0, &never, true),
                Crash::NotRestarted
            );
        }
        assert!(
            pool.workers.iter().all(|w| w.down),
            "the whole pool is down"
        );
        assert!(pool.next_restart().is_none());
        let mut pool = Pool::new(1, None);
        assert_eq!(
            pool.crashed(0, ExitStatus::Exited(0), MS, t0, &cfg(), true),
            Crash::NotRestarted,
            "on-failure: a clean exit is not restarted"
        );
        let always = PolicyConfig {
            restart: RestartMode::Always,
            ..cfg()
        };
        let mut pool = Pool::new(1, None);
        assert!(matches!(
            pool.crashed(0, ExitStatus::Exited(0), MS, t0, &always, true),
            Crash::Restart { .. }
        ));
    }

    #[test]
    fn with_no_other_worker_ready_a_worker_restarts_after_the_base_delay() {
        let (cfg, t0) = (cfg(), Instant::now());
        let mut pool = Pool::new(2, None);
        let mut now = t0;
        // Its delay grows while another worker serves...
        for _ in 0..3 {
            pool.crashed(0, CRASH, 10 * MS, now, &cfg, true);
            now = pool.next_restart().expect("scheduled");
            pool.due(now);
            pool.restart(0, now);
        }
        assert_eq!(
            pool.crashed(0, CRASH, 10 * MS, now + 20_000 * MS, &cfg, true),
            Crash::Restart { delay: 800 * MS }
        );
        // ...but with nothing serving it comes back after the base delay.
        let mut pool = Pool::new(2, None);
        let mut now = t0;
        for _ in 0..3 {
            assert_eq!(
                pool.crashed(1, CRASH, 10 * MS, now, &cfg, false),
                Crash::Restart { delay: 100 * MS }
            );
            now = pool.next_restart().expect("scheduled");
            pool.due(now);
            pool.restart(1, now);
        }
    }

    #[test]
    fn max_rss_gives_a_worker_one_successor_at_a_time() {
        let mut pool = Pool::new(2, None);
        let slot = Slot {
            generation: 4,
            worker: 1,
            incarnation: 0,
        };
        let next = pool.rss_successor(slot).expect("a successor");
        assert_eq!((next.generation, next.worker, next.incarnation), (4, 1, 1));
        assert!(
            pool.rss_successor(slot).is_none(),
            "the first still has a successor starting"
        );
        let after = pool.rss_successor(next).expect("the successor's own");
        assert_eq!(after.incarnation, 2);
        assert_eq!(pool.workers[1].rss_replacements, 2);
        assert_eq!(pool.workers[0].incarnation, 0);
    }
}
