//! The worker rules (`--workers N`): a generation is a pool of N worker
//! processes, each with its own notification socket, `LISTEN_PID` and
//! `BATON_WORKER`, all started from the same release.
//!
//! - a generation is ready once every worker is;
//! - while it starts, one worker that fails fails the generation (the
//!   reload rolls back as with one process);
//! - while it serves, a worker that dies is replaced alone (same release,
//!   same index) after a delay that doubles with its own consecutive
//!   failures, within its own start limit ([`super::super::backoff`], the
//!   rule a generation follows); one over its limit stays down and the
//!   generation serves degraded; only when no worker is left and none is
//!   to restart is the generation over;
//! - during a bake, any worker that exits reverts the release;
//! - `--max-rss`: a worker above the limit gets a successor first, and is
//!   retired gracefully once the successor is ready.
//!
//! With one worker (the default) a generation behaves exactly as a single
//! process always has: its exit is the generation's.
//!
//! These rules work on one [`Generation`]'s data; the policy asks them and
//! applies the generation rules to what they answer.

use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::actions::{Action, SignalCause};
use crate::exit::ExitStatus;
use crate::guardian::backoff::Next;
use crate::guardian::generation::{Generation, Slot, State, Worker, WorkerRecord};
use crate::knobs::{PolicyConfig, later};
use crate::spec::{RestartMode, Signal};

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

/// Worker `w` of a serving generation died at `now` with `status` after
/// running for `lived`: whether and when it starts again. With no other
/// worker serving (`others`), nothing serves meanwhile: it starts again
/// after the base delay, however often it failed.
fn crashed(
    w: &mut Worker,
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
            w.restart_at = Some(later(now, delay));
            Crash::Restart { delay }
        }
    }
}

/// `signal` to each process of `g`.
pub fn signal_all<W>(g: &Generation, signal: Signal, cause: SignalCause) -> Vec<Action<W>> {
    g.processes
        .iter()
        .map(|p| Action::Signal {
            slot: p.slot(g.id),
            pid: p.process.pid,
            signal,
            cause,
        })
        .collect()
}

/// SIGKILL to each process group of `g`.
pub fn kill_all<W>(g: &Generation) -> Vec<Action<W>> {
    g.processes
        .iter()
        .map(|p| Action::KillGroup {
            slot: p.slot(g.id),
            pid: p.process.pid,
        })
        .collect()
}

/// Worker process `slot` of `g` started (one of a new generation's, a
/// replacement, or a successor).
pub fn spawned(g: &mut Generation, slot: Slot, record: WorkerRecord) {
    let w = g.worker(slot.worker);
    w.incarnation = w.incarnation.max(slot.incarnation);
    g.processes.push(record);
}

/// What a worker's readiness means for its generation.
#[derive(Debug, PartialEq, Eq)]
pub enum Ready<W> {
    /// Nothing more.
    Nothing,
    /// Every worker of the starting generation is ready: it is.
    Generation,
    /// It took its place: these predecessors retire.
    Retire(Vec<Action<W>>),
}

/// Worker process `slot` of `g` passed its readiness check: once every
/// worker of a starting generation is ready, the generation is; a worker
/// started to replace one takes its place, and its predecessor (a
/// `--max-rss` successor's) is retired.
pub fn ready<W>(g: &mut Generation, cfg: &PolicyConfig, slot: Slot) -> Ready<W> {
    let (id, workers) = (g.id, cfg.workers.max(1));
    let Some(p) = g.process_mut(slot).filter(|p| !p.ready) else {
        return Ready::Nothing;
    };
    p.ready = true;
    let pid = p.process.pid;
    match g.state {
        State::Starting => {
            let all = g.processes.len();
            let ready = g.processes.iter().filter(|p| p.serves()).count();
            if all == ready && all == workers {
                return Ready::Generation;
            }
            if workers > 1 {
                debug!(
                    generation = id,
                    worker = slot.worker,
                    pid,
                    ready,
                    of = workers,
                    "worker ready"
                );
            }
            Ready::Nothing
        }
        State::Serving | State::Baking | State::Ready => {
            info!(
                generation = id,
                worker = slot.worker,
                pid,
                "worker ready: it takes its place"
            );
            let mut retire = Vec::new();
            for q in &mut g.processes {
                if q.worker == slot.worker && q.incarnation < slot.incarnation && !q.replaced {
                    q.replaced = true;
                    retire.push(Action::Signal {
                        slot: q.slot(id),
                        pid: q.process.pid,
                        signal: cfg.stop_signal,
                        cause: SignalCause::Retire,
                    });
                }
            }
            Ready::Retire(retire)
        }
        State::Draining | State::Killed => Ready::Nothing,
    }
}

/// What a worker's exit means for its generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exited {
    /// Nothing more: the others serve on, or it restarts.
    Nothing,
    /// The generation is over (no process left and none to restart; or,
    /// with one worker, its process is the generation).
    Over {
        /// The pid that exited, if known.
        pid: Option<i32>,
    },
    /// It exited during the bake: the release is reverted (and the
    /// generation is over once [`over`] says so).
    Revert {
        /// Why, in words.
        why: String,
        /// The pid that exited, if known.
        pid: Option<i32>,
    },
}

/// Whether `g` is over: no process left and no worker to restart.
pub fn over(g: &Generation) -> bool {
    g.processes.is_empty() && !g.workers.iter().any(|w| w.restart_at.is_some())
}

/// Worker process `slot` of `g` exited at `now` with `status`.
pub fn exited(
    g: &mut Generation,
    cfg: &PolicyConfig,
    now: Instant,
    slot: Slot,
    status: ExitStatus,
) -> Exited {
    let id = g.id;
    let state = g.state;
    let record = g
        .processes
        .iter()
        .position(|p| p.slot(id) == slot)
        .map(|i| g.processes.remove(i));
    let pid = record.as_ref().map(|r| r.process.pid);
    let replaced = record.as_ref().is_some_and(|r| r.replaced);
    let lived = record
        .as_ref()
        .and_then(|r| r.started)
        .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
    let serving = matches!(state, State::Serving | State::Baking | State::Ready);
    let pool_over = |g: &Generation| {
        if over(g) {
            Exited::Over { pid }
        } else {
            Exited::Nothing
        }
    };
    let successor_failed = !record.as_ref().is_some_and(|r| r.ready)
        && g.processes
            .iter()
            .any(|p| p.worker == slot.worker && p.incarnation < slot.incarnation && !p.replaced);
    if serving && successor_failed {
        warn!(generation = id, worker = slot.worker, pid, status = %status.word(), "max-rss: the successor {status} before it was ready; the worker serves on");
        return Exited::Nothing;
    }
    if replaced && serving {
        // A predecessor that handed over (`--max-rss`).
        info!(generation = id, worker = slot.worker, pid, status = %status.word(), "exit: replaced worker {status}");
        return pool_over(g);
    }
    if cfg.workers <= 1 {
        return Exited::Over { pid };
    }
    match state {
        // One worker failed before the generation was ready: it fails
        // (the others' process groups are killed).
        State::Starting => Exited::Over { pid },
        State::Baking => Exited::Revert {
            why: format!(
                "worker {} (pid {}) {status} during the bake",
                slot.worker,
                pid.unwrap_or_default()
            ),
            pid,
        },
        State::Serving => {
            crashed_log(g, cfg, now, slot, pid.unwrap_or_default(), status, lived);
            pool_over(g)
        }
        State::Ready | State::Draining | State::Killed => pool_over(g),
    }
}

/// Worker process `slot` of `g` (asked for by [`Action::SpawnWorker`])
/// could not be started: whether the generation is over. A replacement's
/// failure counts as its crash; a `--max-rss` successor's leaves the
/// worker serving as it is.
pub fn spawn_failed(
    g: &mut Generation,
    cfg: &PolicyConfig,
    now: Instant,
    slot: Slot,
    error: &std::io::Error,
) -> bool {
    let (generation, index) = (g.id, slot.worker);
    let predecessor = g
        .processes
        .iter()
        .any(|p| p.worker == index && p.incarnation < slot.incarnation && !p.replaced);
    if predecessor {
        warn!(generation, worker = index, error = %error, "max-rss: the successor could not be started; the worker serves on");
        return false;
    }
    warn!(generation, worker = index, error = %error, "restart: worker {index} could not be started");
    crashed_log(
        g,
        cfg,
        now,
        slot,
        0,
        ExitStatus::Exited(127),
        Duration::ZERO,
    );
    over(g)
}

/// Worker `slot` of serving generation `g` died: its replacement is
/// scheduled, or it stays down; logged.
fn crashed_log(
    g: &mut Generation,
    cfg: &PolicyConfig,
    now: Instant,
    slot: Slot,
    pid: i32,
    status: ExitStatus,
    lived: Duration,
) {
    let (generation, index) = (g.id, slot.worker);
    let alive = g.processes.len();
    let others = g.processes.iter().any(WorkerRecord::serves);
    let crash = crashed(g.worker(index), status, lived, now, cfg, others);
    let st = status.word();
    match crash {
        Crash::NotRestarted if others => {
            warn!(generation, worker = index, pid, status = %st, alive, "exit: worker {index} {status} and is not restarted (--restart); the others serve on");
        }
        Crash::NotRestarted => {
            warn!(generation, worker = index, pid, status = %st, alive, "exit: worker {index} {status} and is not restarted (--restart); no worker serves now");
        }
        Crash::Limit { restarts, interval } => {
            error!(generation, worker = index, pid, status = %st, alive,
                "exit: worker {index} {status}; start limit hit ({restarts} restarts within {}): it stays down, the generation serves degraded",
                humantime::format_duration(interval));
        }
        Crash::Restart { delay } if others => {
            warn!(generation, worker = index, pid, status = %st, alive, restart_in_ms = delay.as_millis() as u64,
                "exit: worker {index} {status}; the others serve on, and it restarts soon");
        }
        Crash::Restart { delay } => {
            warn!(generation, worker = index, pid, status = %st, alive, restart_in_ms = delay.as_millis() as u64,
                "exit: worker {index} {status}; no worker serves now: it restarts after the base delay");
        }
    }
}

/// `--max-rss`: worker process `slot` of serving generation `g` grew past
/// the limit: its successor, unless it already has one (one at a time per
/// worker). It is retired once the successor is ready.
pub fn too_big(g: &mut Generation, slot: Slot) -> Option<Slot> {
    if g.state != State::Serving || !g.process(slot).is_some_and(WorkerRecord::serves) {
        return None;
    }
    let w = g.worker(slot.worker);
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

/// The replacements of `g`'s workers due at `now`, each taken off the
/// schedule; started only if `g` still serves (`serving`).
pub fn due(g: &mut Generation, now: Instant, serving: bool) -> Vec<Slot> {
    let serving = serving && matches!(g.state, State::Serving | State::Baking | State::Ready);
    let mut due = Vec::new();
    for (index, w) in g.workers.iter_mut().enumerate() {
        if w.restart_at.is_none_or(|t| t > now) {
            continue;
        }
        w.restart_at = None;
        if !serving {
            continue;
        }
        w.backoff.restarted(now);
        w.restarts += 1;
        w.incarnation += 1;
        due.push(Slot {
            generation: g.id,
            worker: index as u32,
            incarnation: w.incarnation,
        });
    }
    due
}

/// When `g`'s next worker replacement is due.
pub fn next_restart(g: &Generation) -> Option<Instant> {
    g.workers.iter().filter_map(|w| w.restart_at).min()
}

/// After an upgrade or an adoption: a worker of `g` (`workers` of them)
/// with no live process that is not down starts again at `now` (it died
/// while no baton watched, or its replacement was pending).
pub fn restore(g: &mut Generation, now: Instant, workers: usize) {
    if g.workers.len() < workers {
        g.workers.resize(workers, Worker::default());
    }
    for (index, w) in g.workers.iter_mut().enumerate() {
        let live = g.processes.iter().any(|p| p.worker as usize == index);
        if !live && !w.down && w.restart_at.is_none() {
            w.restart_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Outcome, Policy, Trigger};
    use super::*;
    use crate::guardian::generation::{Process, Route};
    use crate::spec::StartLimit;

    const MS: Duration = Duration::from_millis(1);
    const CRASH: ExitStatus = ExitStatus::Exited(1);

    type P = Policy<u32>;

    fn cfg(workers: usize) -> PolicyConfig {
        PolicyConfig {
            restart_delay: 100 * MS,
            restart_delay_max: 800 * MS,
            stable_after: 5000 * MS,
            start_limit: StartLimit::Limit {
                burst: 3,
                interval: 10_000 * MS,
            },
            workers,
            ..PolicyConfig::default()
        }
    }

    fn spawn(p: &mut P, slot: Slot, now: Instant) {
        let pid = (slot.generation * 100
            + u64::from(slot.worker) * 10
            + u64::from(slot.incarnation)) as i32;
        let mut record = WorkerRecord::started(
            slot,
            Process {
                pid,
                start_time: None,
            },
            Route::Sockets,
            None,
        );
        record.started = Some(now);
        p.worker_spawned(slot, record);
    }

    /// Generation 1 of `cfg.workers` workers, serving from `t0`.
    fn serving(cfg: PolicyConfig, t0: Instant) -> P {
        let n = cfg.workers;
        let mut p = P::new(cfg);
        assert!(matches!(
            p.start(t0)[..],
            [Action::Spawn { generation: 1, .. }]
        ));
        for i in 0..n as u32 {
            spawn(&mut p, Slot::new(1, i), t0);
        }
        p.spawned(1, Route::Sockets, 1);
        for i in 0..n as u32 {
            let a = p.worker_ready(t0, Slot::new(1, i));
            if i + 1 < n as u32 {
                assert!(a.is_empty(), "ready only once every worker is: {a:?}");
                assert_eq!(p.serving(), None);
            }
        }
        assert_eq!(p.serving(), Some(1));
        p
    }

    fn respawned(a: &[Action<u32>]) -> Vec<Slot> {
        a.iter()
            .filter_map(|a| match a {
                Action::SpawnWorker { slot } => Some(*slot),
                _ => None,
            })
            .collect()
    }

    fn workers(p: &P) -> Vec<Worker> {
        p.generations()
            .next()
            .expect("a generation")
            .workers
            .clone()
    }

    #[test]
    fn a_dead_worker_is_replaced_alone_after_its_own_delay() {
        let t0 = Instant::now();
        let mut p = serving(cfg(3), t0);
        let w1 = Slot::new(1, 1);
        assert!(p.worker_exited(t0 + 10 * MS, w1, CRASH).is_empty());
        assert_eq!(p.next_deadline(), Some(t0 + 110 * MS));
        assert!(respawned(&p.tick(t0 + 109 * MS)).is_empty());
        let next = Slot {
            incarnation: 1,
            ..w1
        };
        assert_eq!(respawned(&p.tick(t0 + 110 * MS)), [next]);
        assert_eq!(p.next_deadline(), None, "taken off the schedule");
        spawn(&mut p, next, t0 + 110 * MS);
        assert!(p.worker_ready(t0 + 120 * MS, next).is_empty());
        let w = workers(&p);
        assert_eq!((w[1].restarts, w[1].incarnation), (1, 1));
        assert_eq!((w[0].incarnation, w[2].incarnation), (0, 0));
        // Its next failure waits twice as long; another worker's own first
        // failure does not.
        let t1 = t0 + 200 * MS;
        p.worker_exited(t1, next, CRASH);
        p.worker_exited(t1, Slot::new(1, 2), CRASH);
        assert_eq!(respawned(&p.tick(t1 + 100 * MS)), [Slot::new(1, 2).next()]);
        assert_eq!(
            respawned(&p.tick(t1 + 200 * MS)),
            [Slot {
                incarnation: 2,
                ..w1
            }]
        );
        assert_eq!(p.serving(), Some(1), "the generation served throughout");
    }

    #[test]
    fn a_worker_over_its_start_limit_stays_down_and_the_pool_serves_degraded() {
        let t0 = Instant::now();
        let mut p = serving(cfg(2), t0);
        let mut now = t0;
        let mut slot = Slot::new(1, 0);
        for _ in 0..3 {
            p.worker_exited(now, slot, CRASH);
            now = p.next_deadline().expect("scheduled");
            let again = respawned(&p.tick(now));
            assert_eq!(again, [slot.next()]);
            slot = slot.next();
            spawn(&mut p, slot, now);
            p.worker_ready(now, slot);
        }
        assert!(p.worker_exited(now, slot, CRASH).is_empty());
        let w = workers(&p);
        assert!(w[0].down && !w[1].down, "{w:?}");
        assert_eq!(p.next_deadline(), None, "nothing to restart");
        assert_eq!(p.state(1), Some(State::Serving), "worker 1 serves on");
        // The last worker leaving ends the generation (and, restarting it,
        // the policy's own rules apply).
        let a = p.worker_exited(now + 20_000 * MS, Slot::new(1, 1), CRASH);
        assert!(respawned(&a).is_empty());
        assert_eq!(p.state(1), Some(State::Serving), "worker 1 restarts");
        let later = p.next_deadline().expect("worker 1 restarts");
        assert_eq!(respawned(&p.tick(later)), [Slot::new(1, 1).next()]);
    }

    #[test]
    fn with_restart_never_the_whole_pool_may_go_down_and_baton_stops() {
        let t0 = Instant::now();
        let never = PolicyConfig {
            restart: RestartMode::Never,
            ..cfg(2)
        };
        let mut p = serving(never, t0);
        assert!(p.worker_exited(t0 + MS, Slot::new(1, 0), CRASH).is_empty());
        assert_eq!(p.state(1), Some(State::Serving));
        let a = p.worker_exited(t0 + 2 * MS, Slot::new(1, 1), CRASH);
        assert!(p.is_stopping(), "the generation is over and not restarted");
        assert!(a.contains(&Action::Exit { code: 1 }), "{a:?}");
    }

    #[test]
    fn on_failure_a_clean_exit_is_not_restarted_and_always_restarts_it() {
        let t0 = Instant::now();
        let mut p = serving(cfg(2), t0);
        p.worker_exited(t0 + MS, Slot::new(1, 0), ExitStatus::Exited(0));
        assert!(workers(&p)[0].down);
        let always = PolicyConfig {
            restart: RestartMode::Always,
            ..cfg(2)
        };
        let mut p = serving(always, t0);
        p.worker_exited(t0 + MS, Slot::new(1, 0), ExitStatus::Exited(0));
        assert!(p.next_deadline().is_some());
    }

    #[test]
    fn with_no_other_worker_serving_a_worker_restarts_after_the_base_delay() {
        let t0 = Instant::now();
        // While worker 1 serves, worker 0's delay grows...
        let mut p = serving(cfg(2), t0);
        let mut now = t0;
        let mut slot = Slot::new(1, 0);
        let mut delays = Vec::new();
        for _ in 0..3 {
            p.worker_exited(now, slot, CRASH);
            let at = p.next_deadline().expect("scheduled");
            delays.push(at - now);
            now = at + 20_000 * MS;
            slot = slot.next();
            assert_eq!(respawned(&p.tick(now)), [slot]);
            spawn(&mut p, slot, now);
            p.worker_ready(now, slot);
        }
        assert_eq!(delays, [100 * MS, 200 * MS, 400 * MS]);
        // ...but with nothing else serving it comes back after the base
        // delay, however often it failed.
        p.worker_exited(now, Slot::new(1, 1), ExitStatus::Exited(0));
        p.worker_exited(now, slot, CRASH);
        let at = p.next_deadline().expect("scheduled");
        assert_eq!(at - now, 100 * MS);
    }

    #[test]
    fn max_rss_gives_a_worker_one_successor_at_a_time_then_retires_it() {
        let t0 = Instant::now();
        let mut p = serving(cfg(2), t0);
        let old = Slot::new(1, 1);
        let a = p.worker_too_big(old);
        let next = old.next();
        assert_eq!(respawned(&a), [next]);
        assert!(p.worker_too_big(old).is_empty(), "one successor at a time");
        spawn(&mut p, next, t0 + MS);
        let a = p.worker_ready(t0 + 2 * MS, next);
        assert_eq!(
            a,
            [Action::Signal {
                slot: old,
                pid: 110,
                signal: crate::spec::Signal::TERM,
                cause: SignalCause::Retire,
            }]
        );
        // Its exit is no crash.
        assert!(
            p.worker_exited(t0 + 3 * MS, old, ExitStatus::Signaled(15))
                .is_empty()
        );
        assert_eq!(p.next_deadline(), None);
        let w = workers(&p);
        assert_eq!(
            (w[1].rss_replacements, w[1].restarts, w[1].incarnation),
            (1, 0, 1)
        );
        // A successor that cannot start leaves the worker serving.
        let a = p.worker_too_big(next);
        let third = next.next();
        assert_eq!(respawned(&a), [third]);
        let e = std::io::Error::other("no");
        assert!(p.worker_spawn_failed(t0 + 4 * MS, third, &e).is_empty());
        assert_eq!(p.next_deadline(), None, "no restart: the worker serves on");
    }

    #[test]
    fn one_worker_failing_before_ready_fails_the_generation_and_a_bake_reverts() {
        let t0 = Instant::now();
        let mut p = serving(cfg(2), t0);
        p.trigger(t0 + MS, Trigger::Control, Some(7));
        spawn(&mut p, Slot::new(2, 0), t0 + MS);
        spawn(&mut p, Slot::new(2, 1), t0 + MS);
        p.spawned(2, Route::Sockets, 2);
        p.worker_ready(t0 + 2 * MS, Slot::new(2, 0));
        let a = p.worker_exited(t0 + 3 * MS, Slot::new(2, 1), CRASH);
        assert!(
            a.contains(&Action::KillGroup {
                slot: Slot::new(2, 0),
                pid: 200
            }),
            "the other worker goes: {a:?}"
        );
        assert!(a.iter().any(|a| matches!(
            a,
            Action::Report {
                outcome: Outcome::RolledBack { .. },
                ..
            }
        )));
        assert_eq!(p.serving(), Some(1));
        // During a bake, any worker's exit reverts.
        let baked = PolicyConfig {
            bake: Some(1000 * MS),
            ..cfg(2)
        };
        let mut p = serving(baked, t0);
        p.trigger(t0 + MS, Trigger::Control, Some(7));
        for i in 0..2 {
            spawn(&mut p, Slot::new(2, i), t0 + MS);
        }
        p.spawned(2, Route::Sockets, 2);
        for i in 0..2 {
            p.worker_ready(t0 + 2 * MS, Slot::new(2, i));
        }
        assert_eq!(p.state(2), Some(State::Baking));
        let a = p.worker_exited(t0 + 3 * MS, Slot::new(2, 1), CRASH);
        assert_eq!(p.stats().reverts.exited, 1, "{a:?}");
        assert_eq!(p.state(2), Some(State::Draining));
    }

    #[test]
    fn after_an_adoption_a_missing_worker_starts_again() {
        let t0 = Instant::now();
        let p = serving(cfg(3), t0);
        // Worker 2 died while no baton watched: the adopter finds no live
        // process for it.
        let mut snap = p.record();
        snap.generations[0].processes.retain(|r| r.worker != 2);
        let mut back = P::restore(cfg(3), snap);
        assert_eq!(back.next_deadline(), None);
        back.restore_workers(t0 + MS);
        assert_eq!(back.next_deadline(), Some(t0 + MS));
        assert_eq!(respawned(&back.tick(t0 + MS)), [Slot::new(1, 2).next()]);
    }
}
