//! The guardian's decisions, free of effects: events go in (a trigger, a
//! generation's readiness or exit, the passing of time), actions come out
//! (spawn, signal, kill, report, exit). The event loop in `guardian/mod.rs`
//! carries the actions out; everything here is tested with a fake clock.
//!
//! Invariants:
//!
//! - at most one generation is starting, and at most one is serving; older
//!   ones are draining, each for at most the stop timeout;
//! - a generation is asked to stop only after its successor is ready, or
//!   when baton itself stops;
//! - reloads are serialized: triggers during a reload coalesce into at most
//!   one more, and everyone who asked is told the outcome of a reload that
//!   began after they asked;
//! - a generation that fails before it is ready is killed and the serving
//!   one is not touched (rollback);
//! - a serving generation that dies is replaced after a delay that doubles
//!   with each consecutive failure (up to a ceiling), so an app that crashes
//!   at once is never restarted in a busy loop.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

mod actions;
mod ending;
mod workers;

pub use actions::{Action, Outcome, Pick, SignalCause, Snapshot, Stats, Trigger};
use ending::{Stopping, log_exit};
pub use workers::Crash;
use workers::{kill_all, signal_all};

use super::backoff::{Backoff, Next};
use super::generation::{Generation, Route, Slot, State, Worker, WorkerRecord};
use crate::error::RollbackReason;
use crate::exit::ExitStatus;
use crate::knobs::later;
pub use crate::knobs::{PolicyConfig, Reverts};
use crate::spec::RestartMode;

#[derive(Debug)]
struct InFlight<W> {
    generation: u64,
    waiters: Vec<W>,
    trigger: Trigger,
}

/// A release on probation after its cutover (`--bake`).
#[derive(Debug)]
struct Baking<W> {
    /// The new generation.
    generation: u64,
    /// Who asked for the reload: told once the bake is over.
    waiters: Vec<W>,
    trigger: Trigger,
    /// When it became ready.
    ready_after: Duration,
    /// The previous generation, kept running meanwhile (proxy mode).
    standby: Option<u64>,
}

/// The guardian's state and decisions. `W` is whatever identifies a waiter
/// for a reload's outcome (a reply channel in the real loop).
#[derive(Debug)]
pub struct Policy<W> {
    cfg: PolicyConfig,
    gens: BTreeMap<u64, Generation>,
    next_id: u64,
    serving: Option<u64>,
    in_flight: Option<InFlight<W>>,
    baking: Option<Baking<W>>,
    queued: Option<(Vec<W>, Trigger)>,
    restart_at: Option<Instant>,
    /// Crash restarts of the serving generation: delay and start limit.
    backoff: Backoff,
    ever_ready: bool,
    stopping: Option<Stopping>,
    /// When the shutdown delay ends (`--shutdown-delay`): a stop was asked
    /// for, and baton serves on, not ready, until then.
    lame_duck: Option<Instant>,
    stats: Stats,
}

type Actions<W> = Vec<Action<W>>;

impl<W> Policy<W> {
    /// A policy with nothing started yet.
    pub fn new(cfg: PolicyConfig) -> Policy<W> {
        Policy {
            cfg,
            gens: BTreeMap::new(),
            next_id: 1,
            serving: None,
            in_flight: None,
            baking: None,
            queued: None,
            restart_at: None,
            backoff: Backoff::default(),
            ever_ready: false,
            stopping: None,
            lame_duck: None,
            stats: Stats::default(),
        }
    }

    /// The state to hand over, or why it cannot be now (a reload under way,
    /// baton stopping).
    pub fn snapshot(&self) -> Result<Snapshot, String> {
        if let Some(f) = &self.in_flight {
            return Err(format!(
                "a reload is under way (generation {} is starting); try again once it is done",
                f.generation
            ));
        }
        if let Some(b) = &self.baking {
            return Err(format!(
                "generation {} is baking (--bake); try again once its bake is over",
                b.generation
            ));
        }
        if self.stopping.is_some() {
            return Err("baton is stopping".to_owned());
        }
        if self.lame_duck.is_some() {
            return Err("baton is shutting down (--shutdown-delay)".to_owned());
        }
        Ok(self.record())
    }

    /// The state as it is now, reload or not (for the state file: a
    /// generation still starting is listed as such).
    pub fn record(&self) -> Snapshot {
        Snapshot {
            generations: self.gens.values().cloned().collect(),
            next_id: self.next_id,
            serving: self.serving,
            restart_at: self.restart_at,
            failures: self.backoff.failures,
            ever_ready: self.ever_ready,
            recent_restarts: self.backoff.recent.clone(),
            stats: self.stats.clone(),
        }
    }

    /// Whether a generation has ever been ready.
    pub fn ever_ready(&self) -> bool {
        self.ever_ready
    }

    /// New settings (`baton update`): the generations started from now on
    /// follow them; those running keep what they were started with.
    pub fn reconfigure(&mut self, cfg: PolicyConfig) {
        self.cfg = cfg;
    }

    /// A policy that goes on from `snapshot` (handed over by a previous
    /// baton) with the knobs of `cfg`.
    pub fn restore(cfg: PolicyConfig, snapshot: Snapshot) -> Policy<W> {
        let mut p = Policy::new(cfg);
        p.gens = snapshot
            .generations
            .into_iter()
            .map(|g| (g.id, g))
            .collect();
        p.next_id = snapshot.next_id;
        p.serving = snapshot.serving;
        p.restart_at = snapshot.restart_at;
        p.backoff = Backoff {
            failures: snapshot.failures,
            recent: snapshot.recent_restarts,
        };
        p.ever_ready = snapshot.ever_ready;
        p.stats = snapshot.stats;
        p
    }

    /// Starts generation 1.
    pub fn start(&mut self, now: Instant) -> Actions<W> {
        self.begin(now, Vec::new(), Trigger::Start)
    }

    /// A reload was asked for; `waiter` (if any) will get its outcome.
    pub fn trigger(&mut self, now: Instant, trigger: Trigger, waiter: Option<W>) -> Actions<W> {
        if self.stopping.is_some() || self.lame_duck.is_some() {
            if self.lame_duck.is_some() {
                info!(%trigger, "reload refused: baton is shutting down (--shutdown-delay)");
            }
            return match waiter {
                Some(w) => vec![Action::Report {
                    waiters: vec![w],
                    outcome: Outcome::RolledBack {
                        generation: None,
                        pid: None,
                        reason: RollbackReason::Stopping,
                        serving: self.serving.filter(|_| self.stopping.is_none()),
                    },
                }],
                None => Vec::new(),
            };
        }
        let busy = self
            .in_flight
            .as_ref()
            .map(|f| f.generation)
            .or(self.baking.as_ref().map(|b| b.generation));
        if let Some(busy) = busy {
            let queued = self.queued.get_or_insert_with(|| (Vec::new(), trigger));
            queued.0.extend(waiter);
            debug!(
                %trigger,
                busy,
                "reload coalesced: it will follow the one in progress (or baking)"
            );
            return Vec::new();
        }
        self.begin(now, waiter.into_iter().collect(), trigger)
    }

    /// Every worker of generation `id` was spawned (see `worker_spawned`),
    /// from release `release`, reached by `route`.
    pub fn spawned(&mut self, id: u64, route: Route, release: u64) {
        let workers = self.cfg.workers.max(1);
        if let Some(g) = self.gens.get_mut(&id) {
            g.route = route;
            g.release = Some(release);
            if g.workers.len() < workers {
                g.workers.resize(workers, Worker::default());
            }
        }
    }

    /// Worker process `slot` started (see [`workers::spawned`]).
    pub fn worker_spawned(&mut self, slot: Slot, record: WorkerRecord) {
        if let Some(g) = self.gens.get_mut(&slot.generation) {
            workers::spawned(g, slot, record);
        }
    }

    /// Worker process `slot` passed its readiness check (see
    /// [`workers::ready`]).
    pub fn worker_ready(&mut self, now: Instant, slot: Slot) -> Actions<W> {
        let Some(g) = self.gens.get_mut(&slot.generation) else {
            return Vec::new();
        };
        match workers::ready(g, &self.cfg, slot) {
            workers::Ready::Nothing => Vec::new(),
            workers::Ready::Generation => self.ready(now, slot.generation),
            workers::Ready::Retire(actions) => actions,
        }
    }

    /// Worker process `slot` exited with `status` (see
    /// [`workers::exited`]).
    pub fn worker_exited(&mut self, now: Instant, slot: Slot, status: ExitStatus) -> Actions<W> {
        let id = slot.generation;
        let Some(g) = self.gens.get_mut(&id) else {
            return Vec::new();
        };
        match workers::exited(g, &self.cfg, now, slot, status) {
            workers::Exited::Nothing => Vec::new(),
            workers::Exited::Over { pid } => self.ended(now, id, pid, status),
            workers::Exited::Revert { why, pid } => {
                let mut actions = self.revert(now, "exited", why);
                if self.gens.get(&id).is_some_and(workers::over) {
                    actions.extend(self.ended(now, id, pid, status));
                }
                actions
            }
        }
    }

    /// Worker process `slot`, asked for by [`Action::SpawnWorker`], could
    /// not be started (see [`workers::spawn_failed`]).
    pub fn worker_spawn_failed(
        &mut self,
        now: Instant,
        slot: Slot,
        error: &std::io::Error,
    ) -> Actions<W> {
        let id = slot.generation;
        let over = self
            .gens
            .get_mut(&id)
            .is_some_and(|g| workers::spawn_failed(g, &self.cfg, now, slot, error));
        if over {
            self.ended(now, id, None, ExitStatus::Exited(127))
        } else {
            Vec::new()
        }
    }

    /// `--max-rss`: serving worker process `slot` grew past the limit (see
    /// [`workers::too_big`]).
    pub fn worker_too_big(&mut self, slot: Slot) -> Actions<W> {
        self.gens
            .get_mut(&slot.generation)
            .and_then(|g| workers::too_big(g, slot))
            .map(|slot| Action::SpawnWorker { slot })
            .into_iter()
            .collect()
    }

    /// After an upgrade or an adoption (see [`workers::restore`]).
    pub fn restore_workers(&mut self, now: Instant) {
        let workers = self.cfg.workers.max(1);
        if let Some(g) = self.serving.and_then(|id| self.gens.get_mut(&id)) {
            workers::restore(g, now, workers);
        }
    }

    /// Generation `id` could not be spawned.
    pub fn spawn_failed(&mut self, now: Instant, id: u64, error: &std::io::Error) -> Actions<W> {
        self.gens.remove(&id);
        let reason = RollbackReason::Spawn {
            message: error.to_string(),
            errno: error.raw_os_error(),
        };
        self.fail_in_flight(now, id, None, reason)
    }

    /// Generation `id` said it is ready.
    pub fn ready(&mut self, now: Instant, id: u64) -> Actions<W> {
        let in_flight = self.in_flight.as_ref().is_some_and(|f| f.generation == id);
        let Some(g) = self.gens.get_mut(&id) else {
            return Vec::new();
        };
        if g.state != State::Starting || !in_flight {
            debug!(generation = id, phase = ?g.state, "ignoring readiness of a generation that is not starting");
            return Vec::new();
        }
        let ready_after = now.saturating_duration_since(g.spawned_at);
        g.state = State::Serving;
        g.state_since = now;
        g.deadline = None;
        g.ready_after = Some(ready_after);
        let pid = g.pid().unwrap_or_default();
        self.ever_ready = true;
        info!(
            generation = id,
            pid,
            ready_ms = ready_after.as_millis() as u64,
            "ready"
        );

        let done = self.in_flight.take();
        // A requested reload that replaces a serving generation is baked
        // (a rollback goes back to a release that already passed).
        let bake = self.cfg.bake.filter(|_| {
            self.serving.is_some()
                && done
                    .as_ref()
                    .is_some_and(|d| d.trigger.requested() && d.trigger != Trigger::Rollback)
        });
        let mut actions = Vec::new();
        let mut standby = None;
        if let Some(old_id) = self.serving.replace(id)
            && let Some(old) = self.gens.get_mut(&old_id)
            && old.state == State::Serving
        {
            if bake.is_some() && self.cfg.keep_warm {
                old.enter(State::Ready, now, None);
                standby = Some(old_id);
            } else {
                actions.extend(self.retire(now, old_id));
            }
        }
        if let (Some(bake), Some(done)) = (bake, &done)
            && let Some(g) = self.gens.get_mut(&id)
        {
            g.enter(State::Baking, now, Some(later(now, bake)));
            info!(
                generation = id,
                pid,
                bake_ms = bake.as_millis() as u64,
                standby,
                "bake: generation {id} serves on probation"
            );
            self.baking = Some(Baking {
                generation: id,
                waiters: Vec::new(),
                trigger: done.trigger,
                ready_after,
                standby,
            });
        }
        let Some(done) = done else {
            return actions;
        };
        if let Some(b) = &mut self.baking
            && b.generation == id
        {
            // Told once the bake is over.
            b.waiters = done.waiters;
            return actions;
        }
        if done.trigger.requested() {
            self.stats.reloads_ok += 1;
            self.stats.last_reload = Some(format!(
                "generation {id} (pid {pid}) ready after {} ms",
                ready_after.as_millis()
            ));
        }
        actions.push(Action::Report {
            waiters: done.waiters,
            outcome: Outcome::Reloaded {
                generation: id,
                pid,
                ready_after,
                baked: None,
            },
        });
        if let Some((waiters, trigger)) = self.queued.take() {
            actions.extend(self.begin(now, waiters, trigger));
        }
        actions
    }

    /// The release on probation passed its bake: it serves alone, the
    /// generation kept warm is retired, and whoever asked is told.
    fn pass_bake(&mut self, now: Instant) -> Actions<W> {
        let Some(b) = self.baking.take() else {
            return Vec::new();
        };
        let id = b.generation;
        let mut actions = Vec::new();
        let mut pid = 0;
        if let Some(g) = self.gens.get_mut(&id) {
            g.enter(State::Serving, now, None);
            pid = g.pid().unwrap_or_default();
        }
        info!(generation = id, pid, "bake passed: generation {id} serves");
        if let Some(old_id) = b.standby
            && self.state(old_id) == Some(State::Ready)
        {
            actions.extend(self.retire(now, old_id));
        }
        if b.trigger.requested() {
            self.stats.reloads_ok += 1;
            self.stats.last_reload = Some(format!(
                "generation {id} (pid {pid}) ready after {} ms, passed its bake",
                b.ready_after.as_millis()
            ));
        }
        actions.push(Action::Report {
            waiters: b.waiters,
            outcome: Outcome::Reloaded {
                generation: id,
                pid,
                ready_after: b.ready_after,
                baked: self.cfg.bake,
            },
        });
        if let Some((waiters, trigger)) = self.queued.take() {
            actions.extend(self.begin(now, waiters, trigger));
        }
        actions
    }

    /// The release on probation failed (`cause`: `exited`, `error_rate`):
    /// the previous release serves again, at once from the generation kept
    /// warm (proxy mode) or from a new generation of it (sockets mode,
    /// clients wait in the accept queue).
    pub fn revert(&mut self, now: Instant, cause: &str, why: String) -> Actions<W> {
        let Some(b) = self.baking.take() else {
            return Vec::new();
        };
        let id = b.generation;
        let pid = self.gens.get(&id).and_then(Generation::pid);
        let mut actions: Actions<W> = self.retire(now, id).into_iter().collect();
        self.serving = None;
        if let Some(old_id) = b.standby
            && let Some(old) = self.gens.get_mut(&old_id)
            && old.state == State::Ready
        {
            old.enter(State::Serving, now, None);
            self.serving = Some(old_id);
        }
        if b.trigger.requested() {
            self.stats.reloads_failed += 1;
        }
        match cause {
            "error_rate" => self.stats.reverts.error_rate += 1,
            _ => self.stats.reverts.exited += 1,
        }
        let outcome = Outcome::RolledBack {
            generation: Some(id),
            pid,
            reason: RollbackReason::Reverted {
                cause: cause.to_owned(),
                why,
            },
            serving: self.serving,
        };
        let message = outcome.message();
        error!(
            generation = id,
            pid,
            cause,
            serving = self.serving,
            "revert: {message}"
        );
        self.stats.last_reload = Some(format!("reverted: {message}"));
        actions.push(Action::Report {
            waiters: b.waiters,
            outcome,
        });
        if self.serving.is_none() {
            // Sockets mode: the previous release starts again.
            actions.extend(self.begin(now, Vec::new(), Trigger::Revert));
        } else if let Some((waiters, trigger)) = self.queued.take() {
            actions.extend(self.begin(now, waiters, trigger));
        }
        actions
    }

    /// Asks generation `id` to drain (its successor serves): the stop
    /// signal to each of its processes, and the stop timeout from now.
    fn retire(&mut self, now: Instant, id: u64) -> Actions<W> {
        let Some(g) = self.gens.get_mut(&id) else {
            return Vec::new();
        };
        g.enter(
            State::Draining,
            now,
            Some(later(now, self.cfg.stop_timeout)),
        );
        for p in &mut g.processes {
            p.replaced = true;
        }
        signal_all(g, self.cfg.stop_signal, SignalCause::Retire)
    }

    /// The generation on probation, and the one kept warm beside it.
    pub fn baking(&self) -> Option<(u64, Option<u64>)> {
        self.baking.as_ref().map(|b| (b.generation, b.standby))
    }

    /// Generation `id` is over: its last process exited with `status`
    /// (any left are swept).
    pub fn exited(&mut self, now: Instant, id: u64, status: ExitStatus) -> Actions<W> {
        self.ended(now, id, None, status)
    }

    /// Generation `id` is over: its process `pid` (if known) exited last
    /// with `status`.
    fn ended(&mut self, now: Instant, id: u64, pid: Option<i32>, status: ExitStatus) -> Actions<W> {
        let Some(g) = self.gens.remove(&id) else {
            return Vec::new();
        };
        let pid = pid.or(g.pid()).unwrap_or_default();
        let lived = now.saturating_duration_since(g.state_since);
        // The process groups of any process left may still hold stragglers
        // (and copies of the listening sockets): sweep them. (The group of
        // the one that exited was swept before it was reaped.)
        let mut actions = kill_all(&g);

        if let Some(stopping) = &mut self.stopping {
            stopping.exited(&g, status, self.cfg.stop_signal);
            log_exit(&g, pid, status, lived);
            if self.gens.is_empty() {
                actions.push(Action::Exit {
                    code: self.exit_code(),
                });
            }
            return actions;
        }

        match g.state {
            State::Starting => {
                let reason = RollbackReason::Exited { status };
                actions.extend(self.fail_in_flight(now, id, Some(pid), reason));
            }
            State::Baking => {
                let why = format!(
                    "generation {id} (pid {pid}) {status} {} ms after its cutover",
                    lived.as_millis()
                );
                actions.extend(self.revert(now, "exited", why));
            }
            State::Ready => {
                warn!(
                    generation = id,
                    pid,
                    status = %status.word(),
                    "exit: generation {id}, kept warm during a bake, {status}; a revert would now start it again"
                );
                if let Some(b) = &mut self.baking
                    && b.standby == Some(id)
                {
                    b.standby = None;
                }
            }
            State::Serving => {
                self.serving = None;
                let restart = match self.cfg.restart {
                    RestartMode::Never => false,
                    RestartMode::OnFailure => !status.success(),
                    RestartMode::Always => true,
                };
                if let Some(next) = &self.in_flight {
                    warn!(
                        generation = id,
                        pid,
                        status = %status.word(),
                        starting = next.generation,
                        "exit: the serving generation {status}; its successor is already starting"
                    );
                } else if !restart {
                    warn!(
                        generation = id,
                        pid,
                        status = %status.word(),
                        restart = self.cfg.restart.as_str(),
                        "exit: the serving generation {status} and is not restarted (--restart); stopping"
                    );
                    actions.extend(self.shut_down(now, Some(status.shell_code())));
                } else {
                    match self.schedule_restart(now, Some(lived)) {
                        Some(delay) => {
                            warn!(
                                generation = id,
                                pid,
                                status = %status.word(),
                                restart_in_ms = delay.as_millis() as u64,
                                "exit: the serving generation {status}; the listeners stay open and a new generation starts soon"
                            )
                        }
                        None => {
                            warn!(
                                generation = id,
                                pid,
                                status = %status.word(),
                                "exit: the serving generation {status}"
                            );
                            actions.extend(self.shut_down(now, Some(1)));
                        }
                    }
                }
            }
            State::Draining | State::Killed => log_exit(&g, pid, status, lived),
        }
        actions
    }

    /// Deadlines that have passed by `now`: ready timeouts, stop timeouts,
    /// scheduled restarts.
    pub fn tick(&mut self, now: Instant) -> Actions<W> {
        let mut actions = Vec::new();
        let due: Vec<u64> = self
            .gens
            .values()
            .filter(|g| g.deadline.is_some_and(|d| d <= now))
            .map(|g| g.id)
            .collect();
        for id in due {
            let Some(g) = self.gens.get_mut(&id) else {
                continue;
            };
            let pid = g.pid().unwrap_or_default();
            match g.state {
                State::Starting => {
                    g.state = State::Killed;
                    g.state_since = now;
                    g.deadline = Some(later(now, self.cfg.kill_grace));
                    actions.extend(kill_all(g));
                    let reason = RollbackReason::NotReady {
                        timeout: humantime::format_duration(self.cfg.ready_timeout).to_string(),
                        hint: self.cfg.not_ready_hint.clone(),
                    };
                    actions.extend(self.fail_in_flight(now, id, Some(pid), reason));
                }
                State::Draining => {
                    warn!(
                        generation = id,
                        pid,
                        stop_timeout_ms = self.cfg.stop_timeout.as_millis() as u64,
                        "kill: still running after the stop timeout; sending SIGKILL to its process group"
                    );
                    g.state = State::Killed;
                    g.state_since = now;
                    g.deadline = Some(later(now, self.cfg.kill_grace));
                    actions.extend(kill_all(g));
                }
                State::Killed => {
                    error!(
                        generation = id,
                        pid,
                        "process survived SIGKILL (stuck in the kernel?); no longer waiting for it"
                    );
                    self.gens.remove(&id);
                    if self.stopping.is_some() && self.gens.is_empty() {
                        actions.push(Action::Exit {
                            code: self.exit_code(),
                        });
                    }
                }
                State::Baking => actions.extend(self.pass_bake(now)),
                State::Ready | State::Serving => {}
            }
        }
        if self.restart_at.is_some_and(|t| t <= now)
            && self.stopping.is_none()
            && self.in_flight.is_none()
        {
            self.stats.restarts += 1;
            self.backoff.restarted(now);
            actions.extend(self.begin(now, Vec::new(), Trigger::Restart));
        }
        let serving = self.stopping.is_none();
        for g in self.gens.values_mut() {
            let due = workers::due(g, now, serving);
            actions.extend(due.into_iter().map(|slot| Action::SpawnWorker { slot }));
        }
        if self.lame_duck.is_some_and(|t| t <= now) {
            self.lame_duck = None;
            info!("shutdown: the delay is over; stopping");
            actions.extend(self.stop_now(now, "shutdown delay over"));
        }
        actions
    }

    /// Stop everything: the stop signal to every generation, then exit with
    /// the serving generation's status. A second call kills at once.
    /// With `--shutdown-delay`, the first request only begins the delay
    /// (see [`Action::LameDuck`]) and the stop proper follows when it ends,
    /// or at once on a second request.
    pub fn stop(&mut self, now: Instant, why: &str) -> Actions<W> {
        if let Some(delay) = self.cfg.shutdown_delay
            && self.stopping.is_none()
            && self.lame_duck.is_none()
        {
            self.lame_duck = Some(later(now, delay));
            info!(
                reason = why,
                delay_ms = delay.as_millis() as u64,
                "shutdown: not ready any more (/readyz 503); serving on for {} before stopping",
                humantime::format_duration(delay)
            );
            return vec![Action::LameDuck { delay }];
        }
        if self.lame_duck.take().is_some() {
            info!(
                reason = why,
                "stop requested again: the rest of the shutdown delay is skipped"
            );
        }
        self.stop_now(now, why)
    }

    /// The stop proper (a second one kills).
    fn stop_now(&mut self, now: Instant, why: &str) -> Actions<W> {
        if let Some(stopping) = &mut self.stopping {
            if stopping.forced {
                return Vec::new();
            }
            stopping.forced = true;
            warn!(
                reason = why,
                "stop requested again: killing every generation now"
            );
            let mut actions = Vec::new();
            for g in self.gens.values_mut() {
                if g.state != State::Killed && !g.processes.is_empty() {
                    g.state = State::Killed;
                    g.state_since = now;
                    g.deadline = Some(later(now, self.cfg.kill_grace));
                    actions.extend(kill_all(g));
                }
            }
            return actions;
        }
        info!(reason = why, signal = %self.cfg.stop_signal, "stop");
        self.shut_down(now, None)
    }

    /// The earliest moment `tick` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let gens = self.gens.values().filter_map(|g| g.deadline);
        let restart = self.restart_at.filter(|_| self.stopping.is_none());
        gens.chain(restart)
            .chain(self.gens.values().filter_map(workers::next_restart))
            .chain(self.lame_duck)
            .min()
    }

    /// Every live generation, oldest first.
    pub fn generations(&self) -> impl Iterator<Item = &Generation> {
        self.gens.values()
    }

    /// The generation now serving.
    pub fn serving(&self) -> Option<u64> {
        self.serving
    }

    /// The reload in progress, if any.
    pub fn starting(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|f| f.generation)
    }

    /// Whether baton is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// When the shutdown delay ends, while it runs.
    pub fn lame_duck(&self) -> Option<Instant> {
        self.lame_duck
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The state of generation `id`, if it is alive.
    pub fn state(&self, id: u64) -> Option<State> {
        self.gens.get(&id).map(|g| g.state)
    }

    fn begin(&mut self, now: Instant, waiters: Vec<W>, trigger: Trigger) -> Actions<W> {
        self.restart_at = None;
        let id = self.next_id;
        self.next_id += 1;
        self.gens.insert(
            id,
            Generation::new(id, now, Some(later(now, self.cfg.ready_timeout))),
        );
        self.in_flight = Some(InFlight {
            generation: id,
            waiters,
            trigger,
        });
        if trigger != Trigger::Start {
            info!(generation = id, %trigger, serving = self.serving, "reload");
        }
        let release = match trigger {
            Trigger::Rollback => Pick::Previous,
            // A crash restart runs what last passed, not a file a deploy
            // put at the path since (that takes a reload).
            Trigger::Revert | Trigger::Restart => Pick::Current,
            _ => Pick::Command,
        };
        vec![Action::Spawn {
            generation: id,
            release,
        }]
    }

    /// The in-flight generation `id` failed before it was ready.
    fn fail_in_flight(
        &mut self,
        now: Instant,
        id: u64,
        pid: Option<i32>,
        reason: RollbackReason,
    ) -> Actions<W> {
        let Some(done) = self.in_flight.take_if(|f| f.generation == id) else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        if done.trigger.requested() {
            self.stats.reloads_failed += 1;
        }
        let outcome = Outcome::RolledBack {
            generation: Some(id),
            pid,
            reason: reason.clone(),
            serving: self.serving,
        };
        let message = outcome.message();
        error!(
            generation = id,
            pid,
            serving = self.serving,
            "rollback: {message}"
        );
        if done.trigger.requested() {
            self.stats.last_reload = Some(format!("rolled back: {message}"));
        }
        actions.push(Action::Report {
            waiters: done.waiters,
            outcome,
        });
        if !self.ever_ready {
            let code = match &reason {
                RollbackReason::Spawn {
                    errno: Some(libc::ENOENT),
                    ..
                } => 127,
                RollbackReason::Spawn {
                    errno: Some(libc::EACCES),
                    ..
                } => 126,
                _ => 1,
            };
            error!(code, "the first generation never became ready; giving up");
            actions.extend(self.shut_down(now, Some(code)));
            return actions;
        }
        if self.serving.is_none() {
            match self.schedule_restart(now, None) {
                Some(delay) => info!(
                    restart_in_ms = delay.as_millis() as u64,
                    "restart scheduled"
                ),
                None => {
                    actions.extend(self.shut_down(now, Some(1)));
                    return actions;
                }
            }
        }
        if let Some((waiters, trigger)) = self.queued.take() {
            actions.extend(self.begin(now, waiters, trigger));
        }
        actions
    }

    /// Schedules the next crash restart (the generation that failed ran
    /// for `lived`), or returns `None` when the start limit forbids it (the
    /// caller then stops).
    fn schedule_restart(&mut self, now: Instant, lived: Option<Duration>) -> Option<Duration> {
        match self.backoff.failed(now, lived, &self.cfg) {
            Next::Restart { at, delay } => {
                self.restart_at = Some(at);
                Some(delay)
            }
            Next::Limit { restarts, interval } => {
                let window = humantime::format_duration(interval);
                let burst = match self.cfg.start_limit {
                    crate::spec::StartLimit::Limit { burst, .. } => burst as usize,
                    crate::spec::StartLimit::Off => restarts,
                };
                error!(
                    restarts,
                    "start limit hit: {restarts} restarts within {window} (--start-limit {burst}/{window}); giving up"
                );
                None
            }
        }
    }

    fn shut_down(&mut self, now: Instant, code: Option<u8>) -> Actions<W> {
        self.stopping = Some(Stopping::new(self.serving, code));
        self.restart_at = None;
        self.lame_duck = None;
        let mut actions = Vec::new();
        let stopping = |generation| Outcome::RolledBack {
            generation,
            pid: None,
            reason: RollbackReason::Stopping,
            serving: None,
        };
        if let Some(f) = self.in_flight.take() {
            actions.push(Action::Report {
                waiters: f.waiters,
                outcome: stopping(Some(f.generation)),
            });
        }
        if let Some(b) = self.baking.take() {
            actions.push(Action::Report {
                waiters: b.waiters,
                outcome: stopping(Some(b.generation)),
            });
        }
        if let Some((waiters, _)) = self.queued.take() {
            actions.push(Action::Report {
                waiters,
                outcome: stopping(None),
            });
        }
        // A generation with no process left (every worker waiting out its
        // restart delay) has nothing to wait for.
        self.gens.retain(|id, g| {
            let empty = g.processes.is_empty()
                && matches!(g.state, State::Ready | State::Baking | State::Serving);
            if empty {
                info!(
                    generation = *id,
                    "stop: generation {id} has no process left (its workers wait to restart)"
                );
            }
            !empty
        });
        for g in self.gens.values_mut() {
            if matches!(
                g.state,
                State::Starting | State::Ready | State::Baking | State::Serving
            ) && !g.processes.is_empty()
            {
                g.state = State::Draining;
                g.state_since = now;
                g.deadline = Some(later(now, self.cfg.stop_timeout));
                actions.extend(signal_all(g, self.cfg.stop_signal, SignalCause::Stop));
            }
        }
        if self.gens.is_empty() {
            actions.push(Action::Exit {
                code: self.exit_code(),
            });
        }
        actions
    }

    fn exit_code(&self) -> u8 {
        self.stopping.as_ref().map_or(0, Stopping::code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guardian::generation::{Slot, WorkerRecord};
    use crate::spec::{Signal, StartLimit};

    type P = Policy<u32>;

    const MS: Duration = Duration::from_millis(1);

    /// Generation `id` was spawned as `pid`.
    fn spawn_as(p: &mut P, id: u64, pid: i32) {
        let process = crate::guardian::generation::Process {
            pid,
            start_time: None,
        };
        let slot = Slot::new(id, 0);
        p.worker_spawned(
            slot,
            WorkerRecord::started(slot, process, Route::Sockets, None),
        );
        p.spawned(id, Route::Sockets, 1);
    }

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            ready_timeout: 1000 * MS,
            stop_timeout: 2000 * MS,
            restart_delay: 100 * MS,
            restart_delay_max: 800 * MS,
            stable_after: 5000 * MS,
            kill_grace: 500 * MS,
            start_limit: StartLimit::Off,
            ..PolicyConfig::default()
        }
    }

    fn spawns(actions: &[Action<u32>]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn { generation, .. } => Some(*generation),
                _ => None,
            })
            .collect()
    }

    fn reports(actions: Vec<Action<u32>>) -> Vec<(Vec<u32>, Outcome)> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Report { waiters, outcome } => Some((waiters, outcome)),
                _ => None,
            })
            .collect()
    }

    /// A policy with generation 1 serving as pid 100.
    fn serving(t0: Instant) -> P {
        let mut p = P::new(cfg());
        assert_eq!(spawns(&p.start(t0)), vec![1]);
        spawn_as(&mut p, 1, 100);
        let actions = p.ready(t0 + 10 * MS, 1);
        assert!(
            actions.iter().all(|a| matches!(a, Action::Report { .. })),
            "{actions:?}"
        );
        assert_eq!(p.serving(), Some(1));
        p
    }

    #[test]
    fn reload_retires_the_old_generation_only_once_the_new_one_is_ready() {
        let t0 = Instant::now();
        let mut p = serving(t0);
        let a = p.trigger(t0 + 100 * MS, Trigger::Control, Some(7));
        assert_eq!(
            a,
            vec![Action::Spawn {
                generation: 2,
                release: Pick::Command
            }]
        );
        spawn_as(&mut p, 2, 200);
        // Time passes within the ready timeout: nothing happens to gen 1.
        assert!(p.tick(t0 + 900 * MS).is_empty());
        assert_eq!(p.state(1), Some(State::Serving));

        let a = p.ready(t0 + 400 * MS, 2);
        assert_eq!(
            a[0],
            Action::Signal {
                slot: Slot::new(1, 0),
                pid: 100,
                signal: Signal::TERM,
                cause: SignalCause::Retire
            }
        );
        assert_eq!(
            reports(a),
            vec![(
                vec![7],
                Outcome::Reloaded {
                    generation: 2,
                    pid: 200,
                    ready_after: 300 * MS,
                    baked: None,
                }
            )]
        );
        assert_eq!(p.serving(), Some(2));
        assert_eq!(p.state(1), Some(State::Draining));

        // The old one drains and exits; its group is swept, nothing else.
        let a = p.exited(t0 + 500 * MS, 1, ExitStatus::Exited(0));
        assert_eq!(
            a,
            vec![Action::KillGroup {
                slot: Slot::new(1, 0),
                pid: 100
            }]
        );
        assert_eq!(p.stats().reloads_ok, 1);
    }

    #[test]
    fn a_storm_of_triggers_gives_at_most_two_reloads() {
        let t0 = Instant::now();
        let mut p = serving(t0);
        let mut spawned = Vec::new();
        for i in 0..100 {
            spawned.extend(spawns(&p.trigger(
                t0 + MS * i,
                Trigger::Signal(Signal::HUP),
                Some(i),
            )));
        }
        assert_eq!(spawned, vec![2]);
        spawn_as(&mut p, 2, 200);
        let a = p.ready(t0 + 200 * MS, 2);
        // Generation 2's waiter is the first trigger; the 99 others wait for
        // the one queued reload, which starts now.
        assert_eq!(spawns(&a), vec![3]);
        let r = reports(a);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, vec![0]);
        spawn_as(&mut p, 3, 300);
        let a = p.ready(t0 + 400 * MS, 3);
        assert!(spawns(&a).is_empty());
        let r = reports(a);
        assert_eq!(r[0].0, (1..100).collect::<Vec<u32>>());
        assert!(matches!(r[0].1, Outcome::Reloaded { generation: 3, .. }));
    }

    #[test]
    fn a_generation_that_exits_before_ready_rolls_back() {
        let t0 = Instant::now();
        let mut p = serving(t0);
        p.trigger(t0, Trigger::Control, Some(1));
        spawn_as(&mut p, 2, 200);
        let a = p.exited(t0 + 50 * MS, 2, ExitStatus::Exited(3));
        assert!(
            !a.iter().any(|a| matches!(
                a,
                Action::Signal { slot, .. } | Action::KillGroup { slot, .. } if slot.generation == 1
            )),
            "generation 1 must not be touched: {a:?}"
        );
        let r = reports(a);
        assert_eq!(
            r[0].1,
            Outcome::RolledBack {
                generation: Some(2),
                pid: Some(200),
                reason: RollbackReason::Exited {
                    status: ExitStatus::Exited(3)
                },
                serving: Some(1),
            }
        );
        assert_eq!(p.serving(), Some(1));
        assert_eq!(p.stats().reloads_failed, 1);
        // No restart: something is serving.
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn a_generation_that_is_never_ready_is_killed_and_rolled_back() {
        let t0 = Instant::now();
        let mut p = serving(t0);
        p.trigger(t0, Trigger::Control, Some(1));
        spawn_as(&mut p, 2, 200);
        assert_eq!(p.next_deadline(), Some(t0 + 1000 * MS));
        let a = p.tick(t0 + 1000 * MS);
        assert_eq!(
            a[0],
            Action::KillGroup {
                slot: Slot::new(2, 0),
                pid: 200
            }
        );
        let r = reports(a);
        assert!(matches!(
            &r[0].1,
            Outcome::RolledBack {
                reason: RollbackReason::NotReady { .. },
                serving: Some(1),
                ..
            }
        ));
        // A late READY=1 from the killed generation changes nothing.
        assert!(p.ready(t0 + 1001 * MS, 2).is_empty());
        assert_eq!(p.serving(), Some(1));
        p.exited(t0 + 1002 * MS, 2, ExitStatus::Signaled(9));
        assert_eq!(p.state(2), None);
    }

    #[test]
    fn a_draining_generation_is_killed_after_the_stop_timeout() {
        let t0 = Instant::now();
        let mut p = serving(t0);
        p.trigger(t0, Trigger::Control, None);
        spawn_as(&mut p, 2, 200);
        p.ready(t0 + 100 * MS, 2);
        assert_eq!(p.next_deadline(), Some(t0 + 2100 * MS));
        assert!(p.tick(t0 + 2099 * MS).is_empty());
        let a = p.tick(t0 + 2100 * MS);
        assert_eq!(
            a,
            vec![Action::KillGroup {
                slot: Slot::new(1, 0),
                pid: 100
            }]
        );
        assert_eq!(p.state(1), Some(State::Killed));
    }

    #[test]
    fn a_crashed_generation_is_replaced_with_growing_delays() {
        let t0 = Instant::now();
        let mut p = serving(t0);
        let mut now = t0 + 20 * MS;
        let a = p.exited(now, 1, ExitStatus::Signaled(11));
        assert!(spawns(&a).is_empty(), "no immediate respawn");
        let mut delays = Vec::new();
        for id in 2..7 {
            let at = p.next_deadline().expect("a restart is scheduled");
            delays.push(at - now);
            assert!(p.tick(at - MS).is_empty());
            assert_eq!(spawns(&p.tick(at)), vec![id]);
            spawn_as(&mut p, id, id as i32 * 100);
            now = at + MS;
            // It crashes at once, again.
            p.exited(now, id, ExitStatus::Exited(1));
        }
        assert_eq!(delays, [100, 200, 400, 800, 800].map(|n| n * MS));
        assert_eq!(p.serving(), None);
    }

    #[test]
    fn a_reload_while_a_restart_is_pending_starts_at_once() {
        let t0 = Instant::now();
        let mut p = serving(t0);
        p.exited(t0, 1, ExitStatus::Exited(1));
        assert_eq!(
            spawns(&p.trigger(t0 + MS, Trigger::Control, Some(1))),
            vec![2]
        );
        assert_eq!(
            p.next_deadline(),
            Some(t0 + MS + 1000 * MS),
            "only the ready timeout"
        );
    }

    #[test]
    fn the_first_generation_failing_ends_baton() {
        let t0 = Instant::now();
        let mut p = P::new(cfg());
        p.start(t0);
        spawn_as(&mut p, 1, 100);
        let a = p.exited(t0, 1, ExitStatus::Exited(2));
        assert!(a.contains(&Action::Exit { code: 1 }), "{a:?}");

        let mut p = P::new(cfg());
        p.start(t0);
        let err = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert!(
            p.spawn_failed(t0, 1, &err)
                .contains(&Action::Exit { code: 127 })
        );

        let mut p = P::new(cfg());
        p.start(t0);
        let err = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(
            p.spawn_failed(t0, 1, &err)
                .contains(&Action::Exit { code: 126 })
        );

        // Never ready: killed, then baton exits once it is reaped.
        let mut p = P::new(cfg());
        p.start(t0);
        spawn_as(&mut p, 1, 100);
        let a = p.tick(t0 + 1000 * MS);
        assert!(a.contains(&Action::KillGroup {
            slot: Slot::new(1, 0),
            pid: 100
        }));
        assert!(!a.iter().any(|a| matches!(a, Action::Exit { .. })));
        let a = p.exited(t0 + 1001 * MS, 1, ExitStatus::Signaled(9));
        assert!(a.contains(&Action::Exit { code: 1 }), "{a:?}");
    }

    #[test]
    fn stop_signals_everyone_and_exits_with_the_serving_status() {
        let t0 = Instant::now();
        let mut p = serving(t0);
        p.trigger(t0, Trigger::Control, Some(9));
        spawn_as(&mut p, 2, 200);
        let a = p.stop(t0 + MS, "SIGTERM");
        assert!(a.contains(&Action::Signal {
            slot: Slot::new(1, 0),
            pid: 100,
            signal: Signal::TERM,
            cause: SignalCause::Stop
        }));
        assert!(a.contains(&Action::Signal {
            slot: Slot::new(2, 0),
            pid: 200,
            signal: Signal::TERM,
            cause: SignalCause::Stop
        }));
        let r = reports(a);
        assert_eq!(r[0].0, vec![9]);
        assert!(matches!(
            r[0].1,
            Outcome::RolledBack {
                reason: RollbackReason::Stopping,
                ..
            }
        ));
        // Triggers while stopping are refused at once.
        let r = reports(p.trigger(t0 + 2 * MS, Trigger::Control, Some(10)));
        assert_eq!(r[0].0, vec![10]);

        assert!(
            !p.exited(t0 + 3 * MS, 2, ExitStatus::Exited(0))
                .iter()
                .any(|a| matches!(a, Action::Exit { .. }))
        );
        // Dying of the stop signal baton sent is a clean stop.
        let a = p.exited(t0 + 4 * MS, 1, ExitStatus::Signaled(15));
        assert!(a.contains(&Action::Exit { code: 0 }), "{a:?}");
    }

    #[test]
    fn the_exit_code_of_a_requested_stop() {
        let t0 = Instant::now();
        // (how generation 1 ends, how generation 2 ends, baton's code)
        let cases: &[(ExitStatus, ExitStatus, u8)] = &[
            (ExitStatus::Exited(0), ExitStatus::Exited(0), 0),
            (ExitStatus::Signaled(15), ExitStatus::Exited(0), 0),
            // The app's own code, the serving generation's first.
            (ExitStatus::Exited(3), ExitStatus::Exited(0), 3),
            (ExitStatus::Exited(3), ExitStatus::Exited(4), 4),
            // A signal baton did not send: 128+N.
            (ExitStatus::Signaled(11), ExitStatus::Exited(0), 139),
        ];
        for (old, new, code) in cases {
            let mut p = serving(t0);
            p.trigger(t0, Trigger::Control, None);
            spawn_as(&mut p, 2, 200);
            p.ready(t0 + MS, 2);
            p.stop(t0 + 2 * MS, "SIGTERM");
            p.exited(t0 + 3 * MS, 1, *old);
            let a = p.exited(t0 + 4 * MS, 2, *new);
            assert!(
                a.contains(&Action::Exit { code: *code }),
                "{old:?} {new:?}: {a:?}"
            );
        }
        // Killed at the stop timeout: 137.
        let mut p = serving(t0);
        p.stop(t0, "SIGTERM");
        p.tick(t0 + 2000 * MS);
        let a = p.exited(t0 + 2001 * MS, 1, ExitStatus::Signaled(9));
        assert!(a.contains(&Action::Exit { code: 137 }), "{a:?}");
    }

    #[test]
    fn a_stop_during_the_first_start_is_clean_when_it_dies_of_the_stop_signal() {
        let t0 = Instant::now();
        let mut p = P::new(cfg());
        p.start(t0);
        spawn_as(&mut p, 1, 100);
        p.stop(t0 + MS, "SIGINT");
        let a = p.exited(t0 + 2 * MS, 1, ExitStatus::Signaled(15));
        assert!(a.contains(&Action::Exit { code: 0 }), "{a:?}");
    }

    #[test]
    fn restart_policies() {
        let t0 = Instant::now();
        let first_ready = |restart| {
            let mut p = P::new(PolicyConfig { restart, ..cfg() });
            p.start(t0);
            spawn_as(&mut p, 1, 100);
            p.ready(t0, 1);
            p
        };
        // never: the app exiting ends baton with its status.
        let a = first_ready(RestartMode::Never).exited(t0 + MS, 1, ExitStatus::Exited(4));
        assert!(a.contains(&Action::Exit { code: 4 }), "{a:?}");
        // on-failure: a clean exit ends baton; a crash restarts.
        let a = first_ready(RestartMode::OnFailure).exited(t0 + MS, 1, ExitStatus::Exited(0));
        assert!(a.contains(&Action::Exit { code: 0 }), "{a:?}");
        let mut p = first_ready(RestartMode::OnFailure);
        let a = p.exited(t0 + MS, 1, ExitStatus::Signaled(11));
        assert!(!a.iter().any(|a| matches!(a, Action::Exit { .. })));
        assert!(p.next_deadline().is_some());
        // always: even a clean exit restarts.
        let mut p = first_ready(RestartMode::Always);
        let a = p.exited(t0 + MS, 1, ExitStatus::Exited(0));
        assert!(!a.iter().any(|a| matches!(a, Action::Exit { .. })));
        assert!(p.next_deadline().is_some());
    }

    #[test]
    fn a_generation_with_no_process_left_is_not_waited_for_at_a_stop() {
        let t0 = Instant::now();
        let mut p = P::new(PolicyConfig {
            workers: 2,
            ..cfg()
        });
        p.start(t0);
        for i in 0..2 {
            let slot = Slot::new(1, i);
            let process = crate::guardian::generation::Process {
                pid: 100 + i as i32,
                start_time: None,
            };
            p.worker_spawned(
                slot,
                WorkerRecord::started(slot, process, Route::Sockets, None),
            );
        }
        p.spawned(1, Route::Sockets, 1);
        for i in 0..2 {
            p.worker_ready(t0, Slot::new(1, i));
        }
        // Both workers died and wait out their restart delay.
        for i in 0..2 {
            p.worker_exited(t0 + MS, Slot::new(1, i), ExitStatus::Exited(1));
        }
        assert_eq!(p.state(1), Some(State::Serving));
        let actions = p.stop(t0 + 2 * MS, "test");
        assert!(
            actions.iter().any(|a| matches!(a, Action::Exit { .. })),
            "exits at once: {actions:?}"
        );
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Signal { .. })),
            "signals nobody: {actions:?}"
        );
    }

    #[test]
    fn the_start_limit_stops_a_crash_loop() {
        let t0 = Instant::now();
        let limit = StartLimit::Limit {
            burst: 3,
            interval: 60_000 * MS,
        };
        let mut p = P::new(PolicyConfig {
            start_limit: limit,
            ..cfg()
        });
        p.start(t0);
        spawn_as(&mut p, 1, 100);
        p.ready(t0, 1);
        let mut last = p.exited(t0 + MS, 1, ExitStatus::Exited(1));
        for id in 2..=4 {
            let at = p.next_deadline().expect("restart scheduled");
            assert_eq!(spawns(&p.tick(at)), vec![id]);
            spawn_as(&mut p, id, id as i32 * 100);
            p.ready(at + MS, id);
            last = p.exited(at + 2 * MS, id, ExitStatus::Exited(1));
        }
        // The fourth crash within the minute: three restarts were allowed.
        assert!(last.contains(&Action::Exit { code: 1 }), "{last:?}");
        assert!(p.is_stopping());
    }

    #[test]
    fn a_second_stop_kills_at_once() {
        let t0 = Instant::now();
        let mut p = serving(t0);
        p.stop(t0, "SIGTERM");
        let a = p.stop(t0 + MS, "SIGINT");
        assert_eq!(
            a,
            vec![Action::KillGroup {
                slot: Slot::new(1, 0),
                pid: 100
            }]
        );
        assert!(p.stop(t0 + 2 * MS, "SIGINT").is_empty());
        let a = p.exited(t0 + 3 * MS, 1, ExitStatus::Signaled(9));
        assert!(a.contains(&Action::Exit { code: 137 }));
    }

    #[test]
    fn a_generation_stable_long_enough_resets_the_backoff() {
        let t0 = Instant::now();
        let mut p = serving(t0);
        p.exited(t0 + 20 * MS, 1, ExitStatus::Exited(1));
        let at = p.next_deadline().expect("restart");
        p.tick(at);
        spawn_as(&mut p, 2, 200);
        p.ready(at + MS, 2);
        // Generation 2 serves for longer than stable_after, then dies.
        let later = at + 6000 * MS;
        p.exited(later, 2, ExitStatus::Exited(1));
        assert_eq!(p.next_deadline(), Some(later + 100 * MS));
    }

    /// A policy with `--bake 5s` (and `keep_warm` for proxy mode), generation
    /// 1 serving, and generation 2 ready at t0+200ms after a reload asked
    /// by waiter 7.
    fn baking(t0: Instant, keep_warm: bool) -> (P, Actions<u32>) {
        let mut p = P::new(PolicyConfig {
            bake: Some(5000 * MS),
            keep_warm,
            ..cfg()
        });
        p.start(t0);
        spawn_as(&mut p, 1, 100);
        p.ready(t0 + 10 * MS, 1);
        p.trigger(t0 + 100 * MS, Trigger::Control, Some(7));
        spawn_as(&mut p, 2, 200);
        let a = p.ready(t0 + 200 * MS, 2);
        (p, a)
    }

    #[test]
    fn a_baked_release_is_reported_only_when_its_bake_is_over() {
        let t0 = Instant::now();
        let (mut p, a) = baking(t0, false);
        // Sockets mode: the old generation is retired at once; nobody is
        // told yet.
        assert!(reports(a).is_empty());
        assert_eq!(p.state(2), Some(State::Baking));
        assert_eq!(p.state(1), Some(State::Draining));
        assert!(p.snapshot().is_err(), "no upgrade during a bake");
        // A reload asked during the bake waits for it.
        assert!(
            p.trigger(t0 + 300 * MS, Trigger::Control, Some(8))
                .is_empty()
        );
        let a = p.tick(t0 + 5200 * MS);
        assert_eq!(p.state(2), Some(State::Serving));
        let spawned = spawns(&a);
        let r = reports(a);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, vec![7]);
        assert!(matches!(r[0].1, Outcome::Reloaded { generation: 2, .. }));
        assert_eq!(spawned, vec![3], "the queued reload starts");
        assert_eq!(p.stats().reloads_ok, 1);
    }

    #[test]
    fn a_release_that_exits_during_its_bake_is_reverted_to_the_previous_one() {
        let t0 = Instant::now();
        let (mut p, _) = baking(t0, false);
        // Even a clean exit counts.
        let a = p.exited(t0 + 2200 * MS, 2, ExitStatus::Exited(0));
        assert!(a.contains(&Action::Spawn {
            generation: 3,
            release: Pick::Current
        }));
        let r = reports(a);
        assert_eq!(r[0].0, vec![7]);
        assert!(matches!(
            &r[0].1,
            Outcome::RolledBack {
                generation: Some(2),
                reason: RollbackReason::Reverted { cause, .. },
                serving: None,
                ..
            } if cause == "exited"
        ));
        assert_eq!(p.stats().reloads_failed, 1);
        // The revert generation is not baked.
        spawn_as(&mut p, 3, 300);
        p.ready(t0 + 2400 * MS, 3);
        assert_eq!(p.state(3), Some(State::Serving));
        assert_eq!(p.serving(), Some(3));
    }

    #[test]
    fn in_proxy_mode_the_old_generation_is_kept_warm_and_a_revert_switches_back() {
        let t0 = Instant::now();
        let (mut p, a) = baking(t0, true);
        assert!(
            !a.iter().any(|x| matches!(x, Action::Signal { .. })),
            "{a:?}"
        );
        assert_eq!(p.state(1), Some(State::Ready));
        assert_eq!(p.baking(), Some((2, Some(1))));
        let a = p.revert(t0 + 1000 * MS, "error_rate", "500s".into());
        assert_eq!(p.serving(), Some(1));
        assert_eq!(p.state(1), Some(State::Serving));
        assert_eq!(p.state(2), Some(State::Draining));
        assert!(spawns(&a).is_empty(), "no restart: a switch back");
        assert!(a.iter().any(|x| matches!(
            x,
            Action::Signal {
                slot,
                cause: SignalCause::Retire,
                ..
            } if slot.generation == 2
        )));
        // Passed instead: the warm one drains.
        let (mut p, _) = baking(t0, true);
        let a = p.tick(t0 + 5200 * MS);
        assert_eq!(p.state(1), Some(State::Draining));
        assert!(a.iter().any(|x| matches!(
            x,
            Action::Signal {
                slot,
                cause: SignalCause::Retire,
                ..
            } if slot.generation == 1
        )));
    }

    #[test]
    fn a_shutdown_delay_serves_on_not_ready_then_stops_or_stops_at_a_second_request() {
        let t0 = Instant::now();
        let delayed = PolicyConfig {
            shutdown_delay: Some(3000 * MS),
            ..cfg()
        };
        let mut p = P::new(delayed.clone());
        p.start(t0);
        spawn_as(&mut p, 1, 100);
        p.ready(t0 + MS, 1);
        let a = p.stop(t0 + 10 * MS, "test");
        assert_eq!(a, vec![Action::LameDuck { delay: 3000 * MS }]);
        assert!(!p.is_stopping(), "it serves on");
        assert_eq!(p.lame_duck(), Some(t0 + 3010 * MS));
        assert!(p.snapshot().is_err(), "no upgrade meanwhile");
        let refused = reports(p.trigger(t0 + 20 * MS, Trigger::Control, Some(7)));
        assert!(
            matches!(
                &refused[..],
                [(w, Outcome::RolledBack { reason: RollbackReason::Stopping, serving: Some(1), .. })] if w == &[7]
            ),
            "{refused:?}"
        );
        assert_eq!(p.next_deadline(), Some(t0 + 3010 * MS));
        assert!(p.tick(t0 + 3009 * MS).is_empty());
        let a = p.tick(t0 + 3010 * MS);
        assert!(p.is_stopping() && p.lame_duck().is_none());
        assert!(a.contains(&Action::Signal {
            slot: Slot::new(1, 0),
            pid: 100,
            signal: Signal::TERM,
            cause: SignalCause::Stop,
        }));
        // A second request skips the rest of the delay.
        let mut p = P::new(delayed);
        p.start(t0);
        spawn_as(&mut p, 1, 100);
        p.ready(t0 + MS, 1);
        p.stop(t0 + 10 * MS, "first");
        let a = p.stop(t0 + 20 * MS, "second");
        assert!(p.is_stopping(), "{a:?}");
        assert!(matches!(
            a[..],
            [Action::Signal {
                cause: SignalCause::Stop,
                ..
            }]
        ));
    }
}
